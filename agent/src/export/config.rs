//! Export configuration from the standard OpenTelemetry environment variables.
//!
//! <https://opentelemetry.io/docs/specs/otel/protocol/exporter/> and
//! <https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/>:
//! signal-specific `OTEL_EXPORTER_OTLP_TRACES_*` override the generic `OTEL_EXPORTER_OTLP_*`;
//! a generic endpoint gets `/v1/traces` appended for HTTP and is used as is for gRPC; a
//! signal-specific endpoint is always used as is. Empty values count as unset.
use std::fmt;
use std::time::Duration;

/// Where spans go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// Human-readable trace trees on stdout.
    Console,
    /// One JSON object per span per line on stdout.
    Json,
    /// OTLP to a collector.
    Otlp,
}

/// OTLP transport (`OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `grpc`: tonic, `/opentelemetry.proto.collector.trace.v1.TraceService/Export`.
    Grpc,
    /// `http/protobuf` (the spec's default): `POST .../v1/traces`, `application/x-protobuf`.
    HttpProtobuf,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// `OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

/// Retry policy for retryable export failures: exponential backoff with jitter, within a
/// total time budget per batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per batch, the first included. Default 5.
    pub max_attempts: u32,
    /// First backoff; doubled after each failure. Default 1 s.
    pub initial_backoff: Duration,
    /// Backoff cap (before jitter). Default 5 s.
    pub max_backoff: Duration,
    /// Total time one batch may take, attempts and waits included (`OTEL_BSP_EXPORT_TIMEOUT`,
    /// default 30 s). A `Retry-After` beyond it gives up at once.
    pub budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5),
            budget: Duration::from_secs(30),
        }
    }
}

/// A custom CA (`OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE`), trusted in addition to the
/// system roots for https endpoints.
#[derive(Clone, PartialEq, Eq)]
pub struct CaCertificate {
    pub path: String,
    /// PEM contents, read when the configuration is built.
    pub pem: Vec<u8>,
}

impl fmt::Debug for CaCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CaCertificate({:?}, {} bytes)",
            self.path,
            self.pem.len()
        )
    }
}

/// Everything the exporter needs. Build it with [`ExportConfig::from_env`] (or
/// [`ExportConfig::from_lookup`] in tests); [`Default`] is the console output with the
/// documented defaults.
#[derive(Clone, PartialEq, Eq)]
pub struct ExportConfig {
    pub output: OutputKind,
    /// Default `http/protobuf`.
    pub protocol: Protocol,
    /// Full URL requests go to. Defaults: `http://localhost:4318/v1/traces` (HTTP),
    /// `http://localhost:4317` (gRPC).
    pub endpoint: String,
    /// Extra request headers (gRPC metadata), names lowercase. Values may be credentials:
    /// never log them.
    pub headers: Vec<(String, String)>,
    /// Per-request timeout. Default 10 s. Also bounds [`super::ExportTask::shutdown`].
    pub timeout: Duration,
    /// Default none (the spec's default).
    pub compression: Compression,
    pub ca_certificate: Option<CaCertificate>,
    /// `OTEL_BSP_SCHEDULE_DELAY`: longest a span waits before being sent. Default 1 s.
    pub schedule_delay: Duration,
    /// `OTEL_BSP_MAX_QUEUE_SIZE`: spans waiting to be exported, at most; more are dropped and
    /// counted. Default 8192.
    pub max_queue_size: usize,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`: spans per request, at most. Default 512 (the
    /// specification's), never more than `max_queue_size`. About 210 KB of protobuf for HTTP
    /// server spans: each request is one socket write, and on kernels without preemption a
    /// long write holds its CPU until it is done.
    pub max_export_batch_size: usize,
    pub retry: RetryPolicy,
    /// Console: a trace is printed once no span of it arrived for this long. Default 1 s.
    pub console_quiet: Duration,
    /// Console: spans held while waiting for traces to complete, at most; beyond it the
    /// oldest traces are printed early. Default 10 000.
    pub console_max_spans: usize,
}

pub const DEFAULT_HTTP_ENDPOINT: &str = "http://localhost:4318/v1/traces";
pub const DEFAULT_GRPC_ENDPOINT: &str = "http://localhost:4317";

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            output: OutputKind::Console,
            protocol: Protocol::HttpProtobuf,
            endpoint: DEFAULT_HTTP_ENDPOINT.to_string(),
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
            compression: Compression::None,
            ca_certificate: None,
            schedule_delay: Duration::from_millis(1000),
            max_queue_size: 8192,
            max_export_batch_size: 512,
            retry: RetryPolicy::default(),
            console_quiet: Duration::from_secs(1),
            console_max_spans: 10_000,
        }
    }
}

impl fmt::Debug for ExportConfig {
    /// Like a derived `Debug`, but header values are redacted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(k, _)| format!("{k}=<redacted>"))
            .collect();
        f.debug_struct("ExportConfig")
            .field("output", &self.output)
            .field("protocol", &self.protocol)
            .field("endpoint", &self.endpoint)
            .field("headers", &headers)
            .field("timeout", &self.timeout)
            .field("compression", &self.compression)
            .field("ca_certificate", &self.ca_certificate)
            .field("schedule_delay", &self.schedule_delay)
            .field("max_queue_size", &self.max_queue_size)
            .field("max_export_batch_size", &self.max_export_batch_size)
            .field("retry", &self.retry)
            .field("console_quiet", &self.console_quiet)
            .field("console_max_spans", &self.console_max_spans)
            .finish()
    }
}

/// A bad export setting; the message names the variable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{var}: {message}")]
pub struct ConfigError {
    /// The environment variable (or setting) at fault.
    pub var: String,
    pub message: String,
}

fn err(var: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var: var.to_string(),
        message: message.into(),
    }
}

const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

impl ExportConfig {
    /// From the process environment. `forced`: the CLI's `--output`; without it, OTLP when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, else
    /// console.
    pub fn from_env(forced: Option<OutputKind>) -> Result<Self, ConfigError> {
        Self::from_lookup(forced, |k| std::env::var(k).ok())
    }

    /// As [`ExportConfig::from_env`], reading variables through `env`.
    pub fn from_lookup(
        forced: Option<OutputKind>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        // Empty means unset (spec). Returns (variable actually used, value).
        let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let pick = |suffix: &str| {
            let specific = format!("OTEL_EXPORTER_OTLP_TRACES_{suffix}");
            match get(&specific) {
                Some(v) => Some((specific, v)),
                None => {
                    let generic = format!("OTEL_EXPORTER_OTLP_{suffix}");
                    get(&generic).map(|v| (generic, v))
                }
            }
        };

        let mut cfg = ExportConfig::default();
        let endpoint_set = get(ENDPOINT).is_some() || get(TRACES_ENDPOINT).is_some();
        cfg.output = forced.unwrap_or(if endpoint_set {
            OutputKind::Otlp
        } else {
            OutputKind::Console
        });

        // Batch processor settings apply to every output (they bound the queue).
        if let Some(v) = get("OTEL_BSP_SCHEDULE_DELAY") {
            cfg.schedule_delay = Duration::from_millis(parse_u64("OTEL_BSP_SCHEDULE_DELAY", &v)?);
        }
        if let Some(v) = get("OTEL_BSP_MAX_QUEUE_SIZE") {
            cfg.max_queue_size = parse_positive("OTEL_BSP_MAX_QUEUE_SIZE", &v)?;
        }
        if let Some(v) = get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
            cfg.max_export_batch_size = parse_positive("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", &v)?;
        }
        // Spec: the batch size must be <= the queue size.
        cfg.max_export_batch_size = cfg.max_export_batch_size.min(cfg.max_queue_size);
        if let Some(v) = get("OTEL_BSP_EXPORT_TIMEOUT") {
            let ms = parse_u64("OTEL_BSP_EXPORT_TIMEOUT", &v)?;
            if ms == 0 {
                return Err(err("OTEL_BSP_EXPORT_TIMEOUT", "must be > 0 (milliseconds)"));
            }
            cfg.retry.budget = Duration::from_millis(ms);
        }

        if cfg.output != OutputKind::Otlp {
            return Ok(cfg);
        }

        if let Some((var, v)) = pick("PROTOCOL") {
            cfg.protocol = match v.trim() {
                "grpc" => Protocol::Grpc,
                "http/protobuf" => Protocol::HttpProtobuf,
                "http/json" => {
                    return Err(err(
                        &var,
                        "http/json is not supported, use http/protobuf or grpc",
                    ));
                }
                other => {
                    return Err(err(
                        &var,
                        format!("unknown protocol {other:?}: expected grpc or http/protobuf"),
                    ));
                }
            };
        }

        let (var, endpoint) = if let Some(v) = get(TRACES_ENDPOINT) {
            (TRACES_ENDPOINT, v.trim().to_string())
        } else if let Some(v) = get(ENDPOINT) {
            let v = v.trim();
            match cfg.protocol {
                Protocol::Grpc => (ENDPOINT, v.to_string()),
                Protocol::HttpProtobuf => (ENDPOINT, append_traces_path(v)),
            }
        } else {
            let default = match cfg.protocol {
                Protocol::Grpc => DEFAULT_GRPC_ENDPOINT,
                Protocol::HttpProtobuf => DEFAULT_HTTP_ENDPOINT,
            };
            ("default endpoint", default.to_string())
        };
        validate_endpoint(var, &endpoint)?;
        cfg.endpoint = endpoint;

        if let Some((var, v)) = pick("HEADERS") {
            cfg.headers = parse_headers(&var, &v)?;
        }
        if let Some((var, v)) = pick("TIMEOUT") {
            let ms = parse_u64(&var, &v)?;
            if ms == 0 {
                return Err(err(&var, "must be > 0 (milliseconds)"));
            }
            cfg.timeout = Duration::from_millis(ms);
        }
        if let Some((var, v)) = pick("COMPRESSION") {
            cfg.compression = match v.trim() {
                "gzip" => Compression::Gzip,
                "none" => Compression::None,
                other => {
                    return Err(err(
                        &var,
                        format!("unknown compression {other:?}: expected gzip or none"),
                    ));
                }
            };
        }
        if let Some((var, path)) = pick("CERTIFICATE") {
            let path = path.trim().to_string();
            let pem = std::fs::read(&path)
                .map_err(|e| err(&var, format!("cannot read {path:?}: {e}")))?;
            super::tls::client_config(Some(&pem), false)
                .map_err(|m| err(&var, format!("{path:?}: {m}")))?;
            cfg.ca_certificate = Some(CaCertificate { path, pem });
        }
        for suffix in ["CLIENT_KEY", "CLIENT_CERTIFICATE", "INSECURE"] {
            if let Some((var, _)) = pick(suffix) {
                log::warn!("{var} is not supported by sonde's exporter and is ignored");
            }
        }
        Ok(cfg)
    }

    /// One line for the startup log. Never shows header values (they may be credentials).
    pub fn describe(&self) -> String {
        match self.output {
            OutputKind::Console => format!(
                "console output (trace trees on stdout; queue {} spans)",
                self.max_queue_size
            ),
            OutputKind::Json => format!(
                "JSON output (one span per line on stdout; queue {} spans)",
                self.max_queue_size
            ),
            OutputKind::Otlp => {
                let mut s = format!(
                    "OTLP {} to {}, compression {}, timeout {} ms, batch {} / queue {} spans every {} ms",
                    self.protocol.as_str(),
                    self.endpoint,
                    match self.compression {
                        Compression::None => "none",
                        Compression::Gzip => "gzip",
                    },
                    self.timeout.as_millis(),
                    self.max_export_batch_size,
                    self.max_queue_size,
                    self.schedule_delay.as_millis(),
                );
                if !self.headers.is_empty() {
                    let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
                    s += &format!(", headers [{}]", names.join(", "));
                }
                if let Some(ca) = &self.ca_certificate {
                    s += &format!(", CA {}", ca.path);
                }
                s
            }
        }
    }
}

/// Generic endpoint + `/v1/traces`, with exactly one slash between them.
fn append_traces_path(base: &str) -> String {
    format!("{}/v1/traces", base.trim_end_matches('/'))
}

fn validate_endpoint(var: &str, endpoint: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| err(var, format!("invalid URL {endpoint:?}: {e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(err(
                var,
                format!("{endpoint:?} must start with http:// or https://"),
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(err(var, format!("{endpoint:?} has no host")));
    }
    Ok(())
}

fn parse_u64(var: &str, v: &str) -> Result<u64, ConfigError> {
    v.trim().parse::<u64>().map_err(|_| {
        err(
            var,
            format!("{v:?} is not a non-negative integer (milliseconds or count)"),
        )
    })
}

fn parse_positive(var: &str, v: &str) -> Result<usize, ConfigError> {
    match v.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(err(var, format!("{v:?} is not a positive integer"))),
    }
}

/// `k=v,k2=v2` (W3C Baggage-like), keys and values percent-decoded and trimmed, keys
/// lowercased. Empty entries are skipped.
pub(crate) fn parse_headers(var: &str, v: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for entry in v.split(',') {
        if entry.trim().is_empty() {
            continue;
        }
        let Some((k, val)) = entry.split_once('=') else {
            return Err(err(
                var,
                format!("entry {:?} is not key=value", entry.trim()),
            ));
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s.trim())
                .decode_utf8()
                .map(|c| c.trim().to_string())
                .map_err(|_| err(var, "a percent-encoded header is not UTF-8"))
        };
        let k = decode(k)?.to_ascii_lowercase();
        let val = decode(val)?;
        if k.is_empty() {
            return Err(err(var, "empty header name"));
        }
        if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
            return Err(err(var, format!("invalid header name {k:?}")));
        }
        if http::HeaderValue::from_str(&val).is_err() {
            // Don't echo the value: it may be a credential.
            return Err(err(var, format!("invalid value for header {k:?}")));
        }
        out.push((k, val));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<ExportConfig, ConfigError> {
        cfg_forced(None, vars)
    }
    fn cfg_forced(
        forced: Option<OutputKind>,
        vars: &[(&str, &str)],
    ) -> Result<ExportConfig, ConfigError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ExportConfig::from_lookup(forced, |k| m.get(k).cloned())
    }

    #[test]
    fn output_selection() {
        assert_eq!(cfg(&[]).unwrap().output, OutputKind::Console);
        assert_eq!(cfg(&[(ENDPOINT, "")]).unwrap().output, OutputKind::Console);
        assert_eq!(
            cfg(&[(ENDPOINT, "http://c:4318")]).unwrap().output,
            OutputKind::Otlp
        );
        assert_eq!(
            cfg(&[(TRACES_ENDPOINT, "http://c:4318/x")]).unwrap().output,
            OutputKind::Otlp
        );
        let c = cfg_forced(Some(OutputKind::Console), &[(ENDPOINT, "http://c:4318")]).unwrap();
        assert_eq!(c.output, OutputKind::Console);
        // Forced OTLP without endpoint: the defaults.
        let c = cfg_forced(Some(OutputKind::Otlp), &[]).unwrap();
        assert_eq!(c.endpoint, "http://localhost:4318/v1/traces");
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        let c = cfg_forced(
            Some(OutputKind::Otlp),
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
        )
        .unwrap();
        assert_eq!(c.endpoint, "http://localhost:4317");
        // OTLP settings are not validated for console/json output.
        let c = cfg_forced(
            Some(OutputKind::Json),
            &[("OTEL_EXPORTER_OTLP_TIMEOUT", "soon")],
        )
        .unwrap();
        assert_eq!(c.output, OutputKind::Json);
    }

    #[test]
    fn endpoints_per_spec() {
        let ep = |vars: &[(&str, &str)]| cfg(vars).unwrap().endpoint;
        assert_eq!(
            ep(&[(ENDPOINT, "http://c:4318")]),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            ep(&[(ENDPOINT, "http://c:4318/")]),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            ep(&[(ENDPOINT, "https://c/otlp/")]),
            "https://c/otlp/v1/traces"
        );
        // gRPC: as is.
        assert_eq!(
            ep(&[
                (ENDPOINT, "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            ]),
            "http://c:4317"
        );
        // Signal-specific: as is, and it wins over the generic one.
        assert_eq!(
            ep(&[
                (ENDPOINT, "http://generic:4318"),
                (TRACES_ENDPOINT, "http://c:9999/custom")
            ]),
            "http://c:9999/custom"
        );
        assert_eq!(ep(&[(TRACES_ENDPOINT, "http://c:4318/")]), "http://c:4318/");
    }

    #[test]
    fn signal_specific_overrides_generic() {
        let c = cfg(&[
            (ENDPOINT, "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "5000"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "b=2"),
        ])
        .unwrap();
        assert_eq!(c.protocol, Protocol::Grpc);
        assert_eq!(c.endpoint, "http://c:4317");
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.compression, Compression::Gzip);
        assert_eq!(c.headers, vec![("b".to_string(), "2".to_string())]);

        let c = cfg(&[
            (ENDPOINT, "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "5000"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ])
        .unwrap();
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert_eq!(c.timeout, Duration::from_millis(5000));
        assert_eq!(c.compression, Compression::Gzip);
    }

    #[test]
    fn headers_are_decoded() {
        let h = parse_headers(
            "H",
            "api-key=secret%3Dvalue, Authorization = Basic%20dXNlcjpwYXNz ,,x-a=b=c",
        )
        .unwrap();
        assert_eq!(
            h,
            vec![
                ("api-key".into(), "secret=value".into()),
                ("authorization".into(), "Basic dXNlcjpwYXNz".into()),
                ("x-a".into(), "b=c".into()),
            ]
        );
        assert!(parse_headers("H", "novalue").is_err());
        assert!(parse_headers("H", "=v").is_err());
        assert!(parse_headers("H", "bad name=v").is_err());
        let e = parse_headers("H", "k=a%0Ab").unwrap_err();
        assert!(!e.to_string().contains("a\nb"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases: &[(&str, &str)] = &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "udp"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "justakey"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem"),
            ("OTEL_BSP_SCHEDULE_DELAY", "-1"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "many"),
            ("OTEL_BSP_EXPORT_TIMEOUT", "0"),
        ];
        for (var, val) in cases {
            let e = cfg(&[(ENDPOINT, "http://c:4318"), (var, val)]).unwrap_err();
            assert_eq!(e.var, *var, "{e}");
            assert!(e.to_string().starts_with(var), "{e}");
        }
        let e = cfg(&[
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
            (ENDPOINT, "http://c"),
        ])
        .unwrap_err();
        assert!(e.message.contains("use http/protobuf or grpc"), "{e}");
        for bad in ["c:4318", "ftp://c:21", "http://", "not a url"] {
            let e = cfg(&[(ENDPOINT, bad)]).unwrap_err();
            assert_eq!(e.var, ENDPOINT, "{bad}: {e}");
            let e = cfg(&[(TRACES_ENDPOINT, bad)]).unwrap_err();
            assert_eq!(e.var, TRACES_ENDPOINT, "{bad}: {e}");
        }
    }

    #[test]
    fn batch_settings() {
        let c = cfg(&[]).unwrap();
        assert_eq!(
            (c.schedule_delay, c.max_queue_size, c.max_export_batch_size),
            (Duration::from_millis(1000), 8192, 512)
        );
        let c = cfg(&[
            ("OTEL_BSP_SCHEDULE_DELAY", "250"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1000"),
            ("OTEL_BSP_EXPORT_TIMEOUT", "7000"),
        ])
        .unwrap();
        assert_eq!(c.schedule_delay, Duration::from_millis(250));
        assert_eq!(c.max_queue_size, 100);
        assert_eq!(c.max_export_batch_size, 100, "clamped to the queue size");
        assert_eq!(c.retry.budget, Duration::from_secs(7));
    }

    #[test]
    fn certificate_is_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("sonde-cert-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        let e = cfg(&[
            (ENDPOINT, "https://c:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                bad.to_str().unwrap(),
            ),
        ])
        .unwrap_err();
        assert_eq!(e.var, "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE");
        let good = dir.join("good.pem");
        std::fs::write(&good, super::super::tls::tests::TEST_CA_PEM).unwrap();
        let c = cfg(&[
            (ENDPOINT, "https://c:4318"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", good.to_str().unwrap()),
        ])
        .unwrap();
        assert_eq!(c.ca_certificate.unwrap().path, good.to_str().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn describe_and_debug_hide_header_values() {
        let c = cfg(&[
            (ENDPOINT, "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "authorization=Bearer%20s3cr3t",
            ),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ])
        .unwrap();
        let d = c.describe();
        assert!(d.contains("grpc") && d.contains("http://c:4317") && d.contains("gzip"));
        assert!(d.contains("authorization"), "{d}");
        assert!(!d.contains("s3cr3t"), "{d}");
        assert!(!format!("{c:?}").contains("s3cr3t"));
        assert!(cfg(&[]).unwrap().describe().contains("console"));
    }
}
