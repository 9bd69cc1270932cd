//! Offline benchmarks of sonde's userspace, run by `cargo xtask bench` (or by hand:
//! `cargo run --release -p agent --example bench -- pipeline`).
//!
//! - `pipeline`: raw kernel records of keep-alive GET exchanges, laid out exactly as the
//!   kernel programs write them for a server like nginx, replayed on one thread through
//!   decode → reassembly → HTTP/1 parsing → span assembly → OTLP conversion → protobuf
//!   encoding: the work `app::Pipeline` and the exporter do per span, minus the ring buffer
//!   and the network.
//! - `export`: spans pushed through the real exporter (`sonde::export::spawn`) to a lean local
//!   OTLP receiver (prost decode + count), over gRPC or HTTP/protobuf.
//!
//! Both print readable lines, and `RESULT <kind> key=value ...` lines for xtask to parse.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use agent_common::{ConnId, ROLE_SERVER};
use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use sonde::clock::BootClock;
use sonde::conn::{ConnLimits, ConnTable, Exchange, Outcome};
use sonde::events::{self, Direction, Event};
use sonde::export::{self, ExportConfig, OutputKind, encode::Encoder};
use sonde::metrics::Stats;
use sonde::process::Registry;
use sonde::span::Span;
use sonde::span::assemble::Assembler;
use sonde::span::http::SpanOptions;

/// Counts this thread's heap allocations (the replay runs on one thread): a figure that,
/// unlike CPU time, does not move with the host.
struct CountingAlloc;

thread_local! {
    static ALLOCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the counter is a const-initialised thread-local
// without a destructor, so touching it never allocates.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

fn allocs() -> u64 {
    ALLOCS.with(std::cell::Cell::get)
}

#[derive(Parser)]
#[command(about = "sonde userspace benchmarks (pipeline replay, exporter throughput)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Replay recorded events through reassembly → parse → span → OTLP encode.
    Pipeline {
        #[arg(long, default_value_t = 200_000)]
        exchanges: usize,
        #[arg(long, default_value_t = 100)]
        conns: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Spans through the real exporter to a local OTLP receiver.
    Export {
        /// Rounded up to a whole number of export batches (the exporter's default size).
        #[arg(long, default_value_t = 200_000)]
        spans: usize,
        /// `grpc` or `http/protobuf`.
        #[arg(long, default_value = "grpc")]
        protocol: String,
        /// `none` or `gzip`.
        #[arg(long, default_value = "none")]
        compression: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Pipeline {
            exchanges,
            conns,
            reps,
        } => pipeline(exchanges, conns, reps),
        Cmd::Export {
            spans,
            protocol,
            compression,
        } => export_bench(spans, &protocol, &compression),
    }
}

// ---- recorded events ---------------------------------------------------------------------

/// A request as wrk/curl-like clients send it.
fn request(i: usize) -> Vec<u8> {
    format!(
        "GET /ok?item={} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: sonde-bench/1.0\r\n\
         Accept: */*\r\n\r\n",
        i % 1000
    )
    .into_bytes()
}

/// nginx's answer to `return 200 "ok\n"` (head and body in one writev).
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.26.3\r\nDate: Sat, 22 Nov 2025 \
    00:00:00 GMT\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\
    \r\nok\n";

/// Ring-buffer records, back to back, as the kernel lays them out.
struct Records {
    buf: Vec<u8>,
    /// (offset, length) of each record in `buf`.
    at: Vec<(usize, usize)>,
}

impl Records {
    fn push(&mut self, rec: &[u8]) {
        self.at.push((self.buf.len(), rec.len()));
        self.buf.extend_from_slice(rec);
        // The ring buffer keeps records 8-byte aligned.
        self.buf.resize(self.buf.len().next_multiple_of(8), 0);
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.at.iter().map(|&(o, n)| &self.buf[o..o + n])
    }
}

/// `exchanges` keep-alive GETs round-robin over `conns` accepted connections of this process
/// (so that the Resource is read from a live /proc entry), then every connection closes.
fn record(exchanges: usize, conns: usize) -> Records {
    let tgid = std::process::id();
    let tid = tgid + 1;
    let mut r = Records {
        buf: Vec::new(),
        at: Vec::new(),
    };
    let mut ts = BootClock::now_monotonic_ns();
    let mut tick = || {
        ts += 2_500;
        ts
    };
    let id = |c: usize| ConnId {
        tgid,
        fd: 10 + c as u32,
        generation: 1_000 + c as u64,
    };
    let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    for c in 0..conns {
        let remote = SocketAddr::from(([127, 0, 0, 1], 40_000 + c as u16));
        r.push(&events::encode::open(
            id(c),
            tick(),
            ROLE_SERVER,
            local,
            remote,
        ));
    }
    let mut pos = vec![(0u64, 0u64); conns];
    for i in 0..exchanges {
        let c = i % conns;
        let req = request(i);
        let (rx, tx) = &mut pos[c];
        r.push(&events::encode::data(
            id(c),
            tick(),
            tid,
            Direction::Ingress,
            *rx,
            req.len() as u64,
            &req,
        ));
        *rx += req.len() as u64;
        r.push(&events::encode::data(
            id(c),
            tick(),
            tid,
            Direction::Egress,
            *tx,
            RESPONSE.len() as u64,
            RESPONSE,
        ));
        *tx += RESPONSE.len() as u64;
    }
    for c in 0..conns {
        r.push(&events::encode::close(id(c), tick()));
    }
    r
}

// ---- pipeline replay ----------------------------------------------------------------------

/// Exchanges per assembly batch, as in `app`.
const EXCHANGE_BATCH: usize = 1024;

/// Spans per OTLP request: the exporter's default `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`.
fn export_batch() -> usize {
    ExportConfig::default().max_export_batch_size
}

#[derive(Default, Clone, Copy)]
struct Replay {
    spans: u64,
    complete_200: u64,
    otlp_bytes: u64,
    wall: Duration,
    cpu: Duration,
    /// decode + connection table + HTTP/1 parsing (until exchanges come out).
    reassembly: Duration,
    /// Resource lookup + span building (ids, attributes).
    assemble: Duration,
    /// Spans → OTLP protobuf bytes (the exporter's encoder).
    encode: Duration,
    /// Heap allocations and reallocations during the replay.
    allocs: u64,
}

struct Replayer {
    stats: Stats,
    conns: ConnTable,
    registry: Registry,
    assembler: Assembler,
    exchanges: Vec<Exchange>,
    spans: Vec<Span>,
    /// Spans per OTLP request (`export_batch`, read once).
    batch: usize,
    out: Vec<u8>,
    encoder: Encoder,
    r: Replay,
    /// Keep the spans (for the export benchmark) instead of encoding them.
    keep: Option<Vec<Span>>,
}

impl Replayer {
    fn new(keep: bool) -> Self {
        let batch = export_batch();
        Replayer {
            stats: Stats::default(),
            conns: ConnTable::new(ConnLimits::default()),
            registry: Registry::new(),
            assembler: Assembler::new(BootClock::sample(), SpanOptions::default()),
            exchanges: Vec::with_capacity(EXCHANGE_BATCH),
            spans: Vec::with_capacity(batch),
            batch,
            out: Vec::new(),
            encoder: Encoder::default(),
            r: Replay::default(),
            keep: keep.then(Vec::new),
        }
    }

    fn run(mut self, records: &Records) -> Result<(Replay, Vec<Span>)> {
        let cpu0 = thread_cpu();
        let allocs0 = allocs();
        let t0 = Instant::now();
        let mut seg = t0;
        for rec in records.iter() {
            let ev = events::decode(rec).context("decoding a recorded event")?;
            if let Event::Open(o) = &ev {
                self.registry.resource_or(o.conn.tgid, o.comm());
            }
            self.conns.on_event(&ev, &self.stats, &mut self.exchanges);
            if self.exchanges.len() >= EXCHANGE_BATCH {
                self.r.reassembly += seg.elapsed();
                self.emit(false);
                seg = Instant::now();
            }
        }
        self.r.reassembly += seg.elapsed();
        self.emit(true);
        self.r.wall = t0.elapsed();
        self.r.cpu = thread_cpu() - cpu0;
        self.r.allocs = allocs() - allocs0;
        Ok((self.r, self.keep.unwrap_or_default()))
    }

    fn emit(&mut self, last: bool) {
        let t = Instant::now();
        for ex in self.exchanges.drain(..) {
            if ex.outcome == Outcome::Complete
                && ex.response.as_ref().is_some_and(|r| r.status == 200)
            {
                self.r.complete_200 += 1;
            }
            let resource = self.registry.resource(ex.conn.tgid);
            self.spans.push(self.assembler.assemble(ex, resource));
        }
        self.r.assemble += t.elapsed();
        if let Some(keep) = &mut self.keep {
            self.r.spans += self.spans.len() as u64;
            keep.append(&mut self.spans);
            return;
        }
        while self.spans.len() >= self.batch || (last && !self.spans.is_empty()) {
            let n = self.spans.len().min(self.batch);
            let t = Instant::now();
            self.out.clear();
            self.encoder.encode(&self.spans[..n], &mut self.out);
            std::hint::black_box(&self.out);
            self.r.encode += t.elapsed();
            self.spans.drain(..n);
            self.r.otlp_bytes += self.out.len() as u64;
            self.r.spans += n as u64;
        }
    }
}

fn us_per(d: Duration, n: u64) -> f64 {
    d.as_secs_f64() * 1e6 / n.max(1) as f64
}

fn pipeline(exchanges: usize, conns: usize, reps: usize) -> Result<()> {
    let records = record(exchanges, conns);
    println!(
        "pipeline: {exchanges} exchanges over {conns} connections = {} records, {:.1} MB",
        records.at.len(),
        records.buf.len() as f64 / 1e6
    );
    let mut runs = Vec::new();
    for rep in 0..reps.max(1) {
        let (r, _) = Replayer::new(false).run(&records)?;
        if r.spans != exchanges as u64 || r.complete_200 != exchanges as u64 {
            bail!(
                "replay {rep}: {} spans, {} complete 200s for {exchanges} exchanges",
                r.spans,
                r.complete_200
            );
        }
        println!(
            "  rep {rep}: {:.0} spans/s per CPU-second ({:.0}/s wall); µs/span: reassembly {:.3}, \
             assemble {:.3}, encode {:.3}; {:.0} B/span encoded; {:.2} allocations/span",
            r.spans as f64 / r.cpu.as_secs_f64(),
            r.spans as f64 / r.wall.as_secs_f64(),
            us_per(r.reassembly, r.spans),
            us_per(r.assemble, r.spans),
            us_per(r.encode, r.spans),
            r.otlp_bytes as f64 / r.spans as f64,
            r.allocs as f64 / r.spans as f64,
        );
        runs.push(r);
    }
    // Median by CPU time.
    runs.sort_by_key(|r| r.cpu);
    let r = runs[runs.len() / 2];
    println!(
        "RESULT pipeline exchanges={exchanges} conns={conns} reps={} spans={} cpu_s={:.4} \
         wall_s={:.4} spans_per_cpu_s={:.0} spans_per_wall_s={:.0} reassembly_us={:.4} \
         assemble_us={:.4} encode_us={:.4} bytes_per_span={:.1} allocs_per_span={:.2}",
        runs.len(),
        r.spans,
        r.cpu.as_secs_f64(),
        r.wall.as_secs_f64(),
        r.spans as f64 / r.cpu.as_secs_f64(),
        r.spans as f64 / r.wall.as_secs_f64(),
        us_per(r.reassembly, r.spans),
        us_per(r.assemble, r.spans),
        us_per(r.encode, r.spans),
        r.otlp_bytes as f64 / r.spans as f64,
        r.allocs as f64 / r.spans as f64,
    );
    Ok(())
}

// ---- export -----------------------------------------------------------------------------

fn export_bench(n: usize, protocol: &str, compression: &str) -> Result<()> {
    let n = n.max(1).next_multiple_of(export_batch());
    // Real spans: the pipeline's own output for nginx-like exchanges.
    let (_, spans) = Replayer::new(true).run(&record(n, 100))?;
    if spans.len() != n {
        bail!("built {} spans, wanted {n}", spans.len());
    }
    let chunks: Vec<Vec<Span>> = spans.chunks(EXCHANGE_BATCH).map(<[_]>::to_vec).collect();
    drop(spans);

    let recv_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-recv")
        .enable_all()
        .build()?;
    let received = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let endpoint =
        recv_rt.block_on(start_receiver(protocol, received.clone(), requests.clone()))?;

    let exp_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sonde-export")
        .enable_all()
        .build()?;
    let vars = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", compression),
    ];
    let mut cfg = ExportConfig::from_lookup(Some(OutputKind::Otlp), |k| {
        vars.iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| v.to_string())
    })?;
    // Everything is queued at once: room for all of it (the default 8192 would drop).
    cfg.max_queue_size = n;
    let batch = cfg.max_export_batch_size;
    let stats = Arc::new(Stats::default());
    let (tx, task) = {
        let _guard = exp_rt.enter();
        export::spawn(cfg, stats.clone())
    };

    let exp_cpu0 = threads_cpu("sonde-export");
    let recv_cpu0 = threads_cpu("bench-recv");
    let t = Instant::now();
    for c in chunks {
        tx.send(c);
    }
    let done = || {
        stats.spans_exported.load(Relaxed)
            + stats.spans_export_failed.load(Relaxed)
            + stats.spans_queue_dropped.load(Relaxed)
    };
    while done() < n as u64 {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("export did not finish in 120 s ({} of {n})", done());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let el = t.elapsed();
    let exp_cpu = threads_cpu("sonde-export") - exp_cpu0;
    let recv_cpu = threads_cpu("bench-recv") - recv_cpu0;
    exp_rt.block_on(task.shutdown());
    let exported = stats.spans_exported.load(Relaxed);
    let got = received.load(Relaxed);
    println!(
        "export {protocol} ({compression}): {n} spans in {:.3} s = {:.0} spans/s; exporter \
         {:.2} µs CPU/span, receiver {:.2} µs CPU/span; {} requests (batch {batch}); \
         exported {exported}, received {got}",
        el.as_secs_f64(),
        n as f64 / el.as_secs_f64(),
        us_per(exp_cpu, n as u64),
        us_per(recv_cpu, n as u64),
        requests.load(Relaxed),
    );
    println!(
        "RESULT export protocol={protocol} compression={compression} spans={n} exported={exported} \
         received={got} secs={:.4} spans_per_s={:.0} exporter_cpu_us={:.4} receiver_cpu_us={:.4} \
         requests={}",
        el.as_secs_f64(),
        n as f64 / el.as_secs_f64(),
        us_per(exp_cpu, n as u64),
        us_per(recv_cpu, n as u64),
        requests.load(Relaxed),
    );
    drop(exp_rt);
    drop(recv_rt);
    Ok(())
}

fn count_spans(req: &ExportTraceServiceRequest) -> u64 {
    req.resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len() as u64)
        .sum()
}

struct Counting {
    spans: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Counting {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests.fetch_add(1, Relaxed);
        self.spans
            .fetch_add(count_spans(request.get_ref()), Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A lean OTLP receiver on 127.0.0.1 (prost-decodes each request and counts its spans);
/// returns the endpoint for `OTEL_EXPORTER_OTLP_ENDPOINT`.
async fn start_receiver(
    protocol: &str,
    spans: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    match protocol {
        "grpc" => {
            let svc = TraceServiceServer::new(Counting { spans, requests })
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                .max_decoding_message_size(64 << 20);
            tokio::spawn(async move {
                let incoming = tonic::transport::server::TcpIncoming::from(listener);
                if let Err(e) = tonic::transport::Server::builder()
                    .add_service(svc)
                    .serve_with_incoming(incoming)
                    .await
                {
                    eprintln!("bench receiver (gRPC) stopped: {e}");
                }
            });
        }
        "http/protobuf" => {
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (spans, requests) = (spans.clone(), requests.clone());
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            handle_http(req, spans.clone(), requests.clone())
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        }
        p => bail!("unknown protocol {p:?} (grpc or http/protobuf)"),
    }
    Ok(format!("http://{addr}"))
}

async fn handle_http(
    req: hyper::Request<hyper::body::Incoming>,
    spans: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let gzip = req
        .headers()
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(status(400)),
    };
    let body = if gzip {
        let mut out = Vec::new();
        if std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut out)
            .is_err()
        {
            return Ok(status(400));
        }
        Bytes::from(out)
    } else {
        body
    };
    let Ok(msg) = ExportTraceServiceRequest::decode(body) else {
        return Ok(status(400));
    };
    requests.fetch_add(1, Relaxed);
    spans.fetch_add(count_spans(&msg), Relaxed);
    Ok(status(200))
}

fn status(code: u16) -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(Bytes::new()));
    *r.status_mut() = hyper::StatusCode::from_u16(code).expect("valid status");
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/x-protobuf"),
    );
    r
}

// ---- CPU time ---------------------------------------------------------------------------

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time of this process's threads whose name starts with `prefix` (schedstat, ns).
fn threads_cpu(prefix: &str) -> Duration {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let mut ns = 0u64;
    for t in dir.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        ns += std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
    }
    Duration::from_nanos(ns)
}
