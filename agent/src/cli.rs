//! Command line. Flags map onto one typed [`RunConfig`]; standard `OTEL_*` variables are read
//! by `export::ExportConfig`.
use std::net::{SocketAddr, ToSocketAddrs};

use clap::{Parser, Subcommand, ValueEnum};

use crate::export::OutputKind;

#[derive(Debug, Parser)]
#[command(
    name = "sonde",
    version,
    about = "Zero-code distributed tracing for unmodified services, via eBPF",
    long_about = "sonde watches the socket syscalls of unmodified processes, turns every HTTP/1.x \
request they serve or make into an OpenTelemetry span, and exports the spans over OTLP \
(OTEL_EXPORTER_OTLP_ENDPOINT) or prints them as trace trees."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace processes and export spans (the default command).
    Run(RunConfig),
    /// Report whether this kernel and these privileges can run sonde, and how to fix what's missing.
    Check {
        /// Only inspect; do not load and attach the programs.
        #[arg(long)]
        no_load: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Trace trees on stdout.
    Console,
    /// One JSON object per span on stdout.
    Json,
    /// OTLP to OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT.
    Otlp,
}

impl From<Output> for OutputKind {
    fn from(o: Output) -> Self {
        match o {
            Output::Console => OutputKind::Console,
            Output::Json => OutputKind::Json,
            Output::Otlp => OutputKind::Otlp,
        }
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct RunConfig {
    /// Trace this process (repeatable). Without --pid/--exe/--port every process is traced.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Trace processes whose executable path or file name matches this glob (repeatable).
    #[arg(long = "exe", value_name = "GLOB")]
    pub exe: Vec<String>,
    /// Trace processes listening on this TCP port (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// service.name for processes whose executable matches GLOB, when they do not set
    /// OTEL_SERVICE_NAME themselves (repeatable), e.g. `--service-name 'nginx=payments'`.
    #[arg(long = "service-name", value_name = "GLOB=NAME")]
    pub service_names: Vec<String>,
    /// Where spans go. Default: OTLP when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set, else console.
    #[arg(long, value_enum, env = "SONDE_OUTPUT")]
    pub output: Option<Output>,
    /// Payload bytes copied per syscall (headers beyond this, in one syscall, are not seen).
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(256..=16384), env = "SONDE_CAPTURE_BYTES")]
    pub capture_bytes: u32,
    /// Kernel ring buffer size in MiB (power of two).
    #[arg(long, default_value_t = 16, value_parser = parse_pow2_mib, env = "SONDE_RING_MIB")]
    pub ring_mib: u32,
    /// Connections tracked at once (kernel and userspace); the least recently active is evicted.
    #[arg(long, default_value_t = 65536, env = "SONDE_MAX_CONNS")]
    pub max_conns: u32,
    /// How often the ring buffer is drained when it is not filling up, in milliseconds.
    /// Each wakeup has a fixed cost: fewer, larger drains cost less CPU per request. The
    /// kernel wakes the reader early when the buffer fills, and spans wait for export
    /// batching anyway, so a longer period costs no data and no visible delay.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub drain_ms: u64,
    /// Events are held this long and processed in timestamp order, so that a request written
    /// on one CPU is seen before the peer's read of it on another (cross-process links).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub reorder_ms: u64,
    /// Insert a W3C `traceparent` header into outgoing HTTP/1 requests of traced processes
    /// that carry none, so that traces continue on other hosts and in SDK-instrumented
    /// services (sk_msg on the client sockets of traced processes; needs cgroup v2).
    #[arg(long, env = "SONDE_PROPAGATE")]
    pub propagate: bool,
    /// Also trace processes that run an OpenTelemetry SDK themselves (by default they are
    /// detected and skipped, so that no request gets two spans).
    #[arg(long)]
    pub trace_sdk_processes: bool,
    /// Do not link server requests to traced client requests of this host by socket
    /// addresses (only `traceparent` headers link processes then).
    #[arg(long)]
    pub no_same_host_links: bool,
    /// Seconds between statistics log lines (0: never).
    #[arg(long, default_value_t = 60, env = "SONDE_STATS_INTERVAL")]
    pub stats_interval: u64,
    /// Query parameter whose value is replaced by REDACTED (repeatable; the conventions'
    /// AWSAccessKeyId, Signature, sig and X-Goog-Signature always are).
    #[arg(long = "redact-param", value_name = "NAME")]
    pub redact_params: Vec<String>,
    /// Seconds without traffic after which a connection is forgotten.
    #[arg(long, default_value_t = 300)]
    pub idle_timeout: u64,
    /// Serve Prometheus self-metrics at http://ADDR/metrics (off by default). ADDR is
    /// HOST:PORT, or just PORT (or :PORT) to listen on 127.0.0.1 only.
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr, env = "SONDE_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// `PORT`, `:PORT` (both 127.0.0.1), `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT` (resolved now).
fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let port_only = s.strip_prefix(':').unwrap_or(s);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("expected HOST:PORT or PORT: {e}"))?
        .next()
        .ok_or_else(|| format!("{s} resolves to no address"))
}

fn parse_pow2_mib(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if v == 0 || !v.is_power_of_two() || v > 1024 {
        return Err("must be a power of two between 1 and 1024".into());
    }
    Ok(v)
}

impl Default for RunConfig {
    fn default() -> Self {
        // Same defaults as the flags.
        let cli = Cli::parse_from(["sonde", "run"]);
        match cli.command {
            Some(Command::Run(c)) => c,
            _ => unreachable!("`run` parses to Run"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_selectors_and_defaults() {
        let cli = Cli::parse_from([
            "sonde", "run", "--pid", "1", "--pid", "2", "--exe", "ngin*", "--port", "80",
            "--output", "json",
        ]);
        let Some(Command::Run(c)) = cli.command else {
            panic!()
        };
        assert_eq!(c.pids, vec![1, 2]);
        assert_eq!(c.exe, vec!["ngin*"]);
        assert_eq!(c.ports, vec![80]);
        assert_eq!(c.output, Some(Output::Json));
        assert_eq!(c.capture_bytes, 16384);
        assert!(Cli::try_parse_from(["sonde", "run", "--ring-mib", "3"]).is_err());
        assert!(Cli::try_parse_from(["sonde", "run", "--capture-bytes", "99999"]).is_err());
        assert_eq!(RunConfig::default().max_conns, 65536);
        assert_eq!(c.metrics_addr, None);
    }

    #[test]
    fn metrics_addr_defaults_to_loopback() {
        let addr = |a: &str| {
            let cli = Cli::try_parse_from(["sonde", "run", "--metrics-addr", a])?;
            let Some(Command::Run(c)) = cli.command else {
                panic!()
            };
            Ok::<_, clap::Error>(c.metrics_addr.unwrap().to_string())
        };
        assert_eq!(addr("9464").unwrap(), "127.0.0.1:9464");
        assert_eq!(addr(":9464").unwrap(), "127.0.0.1:9464");
        assert_eq!(addr("0.0.0.0:9464").unwrap(), "0.0.0.0:9464");
        assert_eq!(addr("[::1]:9464").unwrap(), "[::1]:9464");
        assert!(addr("nope").is_err());
        assert!(addr("127.0.0.1:99999").is_err());
    }
}
