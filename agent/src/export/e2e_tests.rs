//! End-to-end: the exporter against the real OTLP receiver of the `tests` crate (gRPC and
//! HTTP/protobuf), retries, outages, and the console / JSON outputs.
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::tests::{FailMode, Receiver};

use super::*;
use crate::export::convert::tests::{resource, span};
use crate::span::{AttrValue, Resource, SpanKind};

fn env_cfg(vars: &[(&str, String)]) -> ExportConfig {
    let m: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let mut cfg = ExportConfig::from_lookup(None, |k| m.get(k).cloned()).unwrap();
    cfg.retry = RetryPolicy {
        max_attempts: 5,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        budget: Duration::from_secs(10),
    };
    cfg
}

/// `n` spans over `procs` processes, two-level traces (server + client child).
fn spans(procs: &[Arc<Resource>], n: usize) -> Vec<Span> {
    (0..n)
        .map(|i| {
            let r = &procs[i % procs.len()];
            let kind = if i % 2 == 0 {
                SpanKind::Server
            } else {
                SpanKind::Client
            };
            let parent = (i % 2 == 1).then(|| (i - 1) as u8);
            let mut s = span(
                r,
                (i / 2) as u8,
                i as u8,
                parent,
                kind,
                1_700_000_000_000_000_000 + i as u64 * 1000,
                500_000,
                if i % 7 == 0 { 503 } else { 200 },
            );
            // Unique ids beyond 256 spans.
            s.span_id.0[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
            s.trace_id.0[..8].copy_from_slice(&((i / 2) as u64 + 1).to_be_bytes());
            if let Some(p) = &mut s.parent_span_id {
                p.0.copy_from_slice(&(i as u64).to_be_bytes());
            }
            s
        })
        .collect()
}

fn procs(n: u32) -> Vec<Arc<Resource>> {
    (0..n)
        .map(|i| resource(1000 + i, &format!("svc-{i}")))
        .collect()
}

fn accounted(stats: &Stats) -> u64 {
    stats.spans_exported.load(Relaxed)
        + stats.spans_export_failed.load(Relaxed)
        + stats.spans_queue_dropped.load(Relaxed)
}

async fn roundtrip(protocol: &str, endpoint: String) {
    let rx = Receiver::start().await;
    let endpoint = if endpoint.is_empty() {
        if protocol == "grpc" {
            rx.grpc_endpoint()
        } else {
            rx.http_endpoint()
        }
    } else {
        endpoint
    };
    let cfg = env_cfg(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", protocol.into()),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip".into()),
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "x-api-key=s3cr%3Dt,x-tenant=a%20b".into(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
    ]);
    assert_eq!(cfg.output, OutputKind::Otlp);
    let stats = Arc::new(Stats::default());
    let (tx, task) = spawn(cfg, stats.clone());
    let procs = procs(3);
    let sent = spans(&procs, 30);
    // The producer is a plain thread.
    let tx2 = tx.clone();
    let batch = sent.clone();
    std::thread::spawn(move || tx2.send(batch)).join().unwrap();

    let got = rx
        .wait_for(|s| s.len() >= 30, Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), 30, "{protocol}");
    assert_eq!(rx.requests(), 1, "one request for three processes");
    assert_eq!(rx.resource_spans(), 3);
    let via = if protocol == "grpc" { "grpc" } else { "http" };
    // Received grouped by process: match by span id.
    let by_id: HashMap<&str, &::tests::ReceivedSpan> =
        got.iter().map(|r| (r.span_id.as_str(), r)).collect();
    assert_eq!(by_id.len(), 30);
    for s in &sent {
        let r = by_id[s.span_id.to_string().as_str()];
        assert_eq!(r.via, via);
        assert_eq!(r.trace_id, s.trace_id.to_string());
        assert_eq!(r.span_id, s.span_id.to_string());
        assert_eq!(
            r.parent_span_id,
            s.parent_span_id.map(|p| p.to_string()).unwrap_or_default()
        );
        assert_eq!(r.name, s.name);
        assert_eq!(r.start_ns, s.start_unix_ns);
        assert_eq!(r.end_ns, s.end_unix_ns);
        assert_eq!(r.service(), Some(s.resource.service_name.as_str()));
        assert_eq!(
            r.res("process.pid"),
            Some(s.resource.pid.to_string().as_str())
        );
        assert_eq!(r.res("process.command_args"), Some("[app, --port, 80]"));
        assert_eq!(r.scope, "sonde");
        match s.kind {
            SpanKind::Server => {
                assert_eq!(r.kind, 2);
                assert_eq!(r.attr("url.path"), Some("/api/orders"));
            }
            SpanKind::Client => {
                assert_eq!(r.kind, 3);
                assert_eq!(r.attr("server.port"), Some("9000"));
            }
        }
        assert_eq!(r.flags & 0xff, 1);
        match &s.status {
            crate::span::Status::Unset => assert_eq!(r.status_code, 0),
            crate::span::Status::Error { description } => {
                assert_eq!(r.status_code, 2);
                assert_eq!(&r.status_message, description);
            }
        }
    }
    let h = rx.last_headers();
    assert_eq!(h.get("x-api-key").map(String::as_str), Some("s3cr=t"));
    assert_eq!(h.get("x-tenant").map(String::as_str), Some("a b"));
    if protocol == "grpc" {
        assert_eq!(h.get("grpc-encoding").map(String::as_str), Some("gzip"));
    } else {
        assert_eq!(h.get("content-encoding").map(String::as_str), Some("gzip"));
        assert_eq!(
            h.get("content-type").map(String::as_str),
            Some("application/x-protobuf")
        );
    }

    // Shutdown flushes what is still queued, without waiting for the schedule.
    tx.send(spans(&procs, 4));
    let t = Instant::now();
    task.shutdown().await;
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(rx.spans().len(), 34);
    assert_eq!(stats.spans_exported.load(Relaxed), 34);
    assert_eq!(stats.export_requests.load(Relaxed), 2);
    assert_eq!(stats.export_retries.load(Relaxed), 0);
    assert_eq!(accounted(&stats), 34);
    // After shutdown: dropped and counted.
    tx.send(spans(&procs, 2));
    assert_eq!(stats.spans_queue_dropped.load(Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_gzip_roundtrip() {
    roundtrip("grpc", String::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_gzip_roundtrip() {
    roundtrip("http/protobuf", String::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_split_by_size_and_uncompressed() {
    for protocol in ["grpc", "http/protobuf"] {
        let rx = Receiver::start().await;
        let mut cfg = env_cfg(&[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                if protocol == "grpc" {
                    rx.grpc_endpoint()
                } else {
                    rx.http_endpoint()
                },
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.into()),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "100".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "50".into()),
        ]);
        cfg.max_queue_size = 10_000;
        let stats = Arc::new(Stats::default());
        let (tx, task) = spawn(cfg, stats.clone());
        tx.send(spans(&procs(10), 1000));
        let got = rx
            .wait_for(|s| s.len() >= 1000, Duration::from_secs(10))
            .await;
        assert_eq!(got.len(), 1000, "{protocol}");
        assert_eq!(rx.requests(), 10, "{protocol}: batches of 100");
        assert_eq!(
            rx.resource_spans(),
            100,
            "{protocol}: 10 processes per request"
        );
        task.shutdown().await;
        assert_eq!(stats.spans_exported.load(Relaxed), 1000);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_batches_are_split() {
    let rx = Receiver::start().await;
    let cfg = env_cfg(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", rx.grpc_endpoint()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
        ("OTEL_BSP_SCHEDULE_DELAY", "20".into()),
    ]);
    let stats = Arc::new(Stats::default());
    let (tx, task) = spawn(cfg, stats.clone());
    // 40 spans of ~200 KB: ~8 MB, over the per-request limit.
    let mut big = spans(&procs(2), 40);
    for s in &mut big {
        s.attributes
            .push(("url.query", AttrValue::from("q".repeat(200_000))));
    }
    tx.send(big);
    let got = rx
        .wait_for(|s| s.len() >= 40, Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), 40);
    assert!(rx.requests() >= 3, "{} requests", rx.requests());
    task.shutdown().await;
    assert_eq!(stats.spans_exported.load(Relaxed), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_custom_ca() {
    let dir = std::env::temp_dir().join(format!("sonde-tls-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ::tests::pki::CA_PEM).unwrap();
    let rx = Receiver::start_tls().await;
    for (protocol, ep) in [
        ("grpc", rx.grpc_endpoint()),
        ("http/protobuf", rx.http_endpoint()),
    ] {
        assert!(ep.starts_with("https://"));
        // Trusting the test CA: delivered.
        let cfg = env_cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", ep.clone()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.into()),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip".into()),
            (
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                ca.to_str().unwrap().into(),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "20".into()),
        ]);
        let stats = Arc::new(Stats::default());
        let (tx, task) = spawn(cfg, stats.clone());
        rx.clear();
        tx.send(spans(&procs(2), 6));
        let got = rx.wait_for(|s| s.len() >= 6, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 6, "{protocol}");
        task.shutdown().await;
        assert_eq!(stats.spans_exported.load(Relaxed), 6);

        // Without it the server is not trusted: nothing delivered, all counted as failed.
        let mut cfg = env_cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", ep),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "20".into()),
        ]);
        cfg.retry.max_attempts = 2;
        let stats = Arc::new(Stats::default());
        let (tx, task) = spawn(cfg, stats.clone());
        rx.clear();
        tx.send(spans(&procs(2), 6));
        wait(|| stats.spans_export_failed.load(Relaxed) == 6).await;
        task.shutdown().await;
        assert_eq!(rx.spans().len(), 0, "{protocol}");
        assert_eq!(stats.spans_exported.load(Relaxed), 0);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_until_the_collector_recovers() {
    for protocol in ["grpc", "http/protobuf"] {
        let rx = Receiver::start().await;
        rx.set_failing(FailMode::UnavailableNext(3));
        let cfg = env_cfg(&[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                if protocol == "grpc" {
                    rx.grpc_endpoint()
                } else {
                    rx.http_endpoint()
                },
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "50".into()),
        ]);
        let stats = Arc::new(Stats::default());
        let (tx, task) = spawn(cfg, stats.clone());
        tx.send(spans(&procs(2), 20));
        let got = rx
            .wait_for(|s| s.len() >= 20, Duration::from_secs(10))
            .await;
        assert_eq!(got.len(), 20, "{protocol}");
        assert_eq!(rx.requests(), 4, "{protocol}: 3 refused + 1 accepted");
        assert_eq!(stats.export_retries.load(Relaxed), 3);
        assert_eq!(stats.export_requests.load(Relaxed), 4);
        task.shutdown().await;
        assert_eq!(stats.spans_exported.load(Relaxed), 20);
        assert_eq!(stats.spans_export_failed.load(Relaxed), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_throttling_and_partial_success() {
    for protocol in ["grpc", "http/protobuf"] {
        let rx = Receiver::start().await;
        let ep = if protocol == "grpc" {
            rx.grpc_endpoint()
        } else {
            rx.http_endpoint()
        };
        let mut cfg = env_cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", ep),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "20".into()),
        ]);
        cfg.retry.max_attempts = 3;
        let stats = Arc::new(Stats::default());
        let (tx, task) = spawn(cfg, stats.clone());

        // Not retryable: one request, all failed.
        rx.set_failing(FailMode::Reject);
        tx.send(spans(&procs(1), 5));
        wait(|| stats.spans_export_failed.load(Relaxed) == 5).await;
        assert_eq!(rx.requests(), 1, "{protocol}");
        assert_eq!(stats.export_retries.load(Relaxed), 0);

        // Throttled (Retry-After: 0 over HTTP): retried up to max_attempts, then failed.
        rx.set_failing(FailMode::Throttle {
            retry_after_secs: 0,
        });
        tx.send(spans(&procs(1), 5));
        wait(|| stats.spans_export_failed.load(Relaxed) == 10).await;
        assert_eq!(rx.requests(), 4, "{protocol}");
        assert_eq!(stats.export_retries.load(Relaxed), 2);

        // Partial success: rejected spans count as failed, the rest as exported.
        rx.set_failing(FailMode::PartialSuccess {
            rejected: 2,
            message: "2 spans too old".into(),
        });
        tx.send(spans(&procs(1), 5));
        wait(|| stats.spans_exported.load(Relaxed) == 3).await;
        assert_eq!(stats.spans_export_failed.load(Relaxed), 12);
        task.shutdown().await;
        assert_eq!(accounted(&stats), 15);
    }
}

async fn wait(cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_bounds_memory_and_shutdown() {
    for protocol in ["grpc", "http/protobuf"] {
        let mut cfg = env_cfg(&[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{}", closed_port()),
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.into()),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000".into()),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100".into()),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "10".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "10".into()),
        ]);
        cfg.retry.max_attempts = 1000;
        cfg.retry.budget = Duration::from_secs(60);
        let stats = Arc::new(Stats::default());
        let (tx, task) = spawn(cfg, stats.clone());
        let p = procs(4);
        let producer = {
            let tx = tx.clone();
            let p = p.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    tx.send(spans(&p, 100));
                    assert!(tx.queued() <= 100);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        producer.join().unwrap();
        assert!(tx.queued() <= 100);
        let dropped = stats.spans_queue_dropped.load(Relaxed);
        assert!(dropped >= 5000 - 110, "{protocol}: dropped {dropped}");
        assert!(stats.export_retries.load(Relaxed) > 0, "{protocol}");
        assert_eq!(stats.spans_exported.load(Relaxed), 0);

        let t = Instant::now();
        task.shutdown().await;
        let took = t.elapsed();
        assert!(
            took < Duration::from_millis(1600),
            "{protocol}: shutdown took {took:?}"
        );
        assert_eq!(
            accounted(&stats),
            5000,
            "{protocol}: every span accounted for"
        );
        assert_eq!(tx.queued(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_collector_times_out() {
    // Accepts connections, never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    let acceptor = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            h.lock().unwrap().push(s);
        }
    });
    for protocol in ["grpc", "http/protobuf"] {
        let mut cfg = env_cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.into()),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "200".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "10".into()),
        ]);
        cfg.retry.max_attempts = 2;
        let stats = Arc::new(Stats::default());
        let (tx, task) = spawn(cfg, stats.clone());
        tx.send(spans(&procs(1), 3));
        wait(|| stats.spans_export_failed.load(Relaxed) == 3).await;
        assert_eq!(stats.export_requests.load(Relaxed), 2, "{protocol}");
        assert_eq!(stats.export_retries.load(Relaxed), 1, "{protocol}");
        let t = Instant::now();
        tx.send(spans(&procs(1), 3));
        task.shutdown().await;
        assert!(
            t.elapsed() < Duration::from_millis(700),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(stats.spans_export_failed.load(Relaxed), 6);
    }
    acceptor.abort();
}

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);
impl Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl SharedBuf {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_prints_quiet_traces_then_the_rest_at_shutdown() {
    let mut cfg = ExportConfig::from_lookup(None, |_| None).unwrap();
    assert_eq!(cfg.output, OutputKind::Console);
    cfg.console_quiet = Duration::from_millis(100);
    let buf = SharedBuf::default();
    let stats = Arc::new(Stats::default());
    let (tx, task) = spawn_with_output(cfg, stats.clone(), Box::new(buf.clone()));
    let p = procs(2);
    tx.send(spans(&p, 6)); // traces 1..=3, two spans each
    wait(|| stats.spans_exported.load(Relaxed) == 6).await;
    let text = buf.text();
    assert_eq!(text.matches("trace ").count(), 3, "{text}");
    assert!(
        text.contains("(2 spans)\n  SERVER svc-0[1000] GET"),
        "{text}"
    );
    assert!(text.contains("\n    CLIENT svc-1[1001] GET"), "{text}");
    tx.send(spans(&p, 2));
    task.shutdown().await;
    assert_eq!(buf.text().matches("trace ").count(), 4);
    assert_eq!(stats.spans_exported.load(Relaxed), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines() {
    let cfg = ExportConfig::from_lookup(Some(OutputKind::Json), |_| None).unwrap();
    let buf = SharedBuf::default();
    let stats = Arc::new(Stats::default());
    let (tx, task) = spawn_with_output(cfg, stats.clone(), Box::new(buf.clone()));
    tx.send(spans(&procs(3), 5));
    task.shutdown().await;
    let text = buf.text();
    assert_eq!(text.lines().count(), 5);
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["resource"]["attributes"]["service.name"].is_string());
    }
    assert_eq!(stats.spans_exported.load(Relaxed), 5);
}

/// Throughput to the local receiver. Run in release:
/// `cargo test -p agent --release --lib export::e2e_tests::throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    const N: usize = 200_000;
    for (protocol, gzip) in [
        ("grpc", "gzip"),
        ("http/protobuf", "gzip"),
        ("grpc", "none"),
        ("http/protobuf", "none"),
    ] {
        let rx = Receiver::start().await;
        let mut cfg = env_cfg(&[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                if protocol == "grpc" {
                    rx.grpc_endpoint()
                } else {
                    rx.http_endpoint()
                },
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.into()),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", gzip.into()),
        ]);
        cfg.max_queue_size = N;
        let stats = Arc::new(Stats::default());
        let (tx, task) = spawn(cfg, stats.clone());
        let p = procs(100);
        let all = spans(&p, N);
        let t = Instant::now();
        for chunk in all.chunks(1000) {
            tx.send(chunk.to_vec());
        }
        wait_long(|| stats.spans_exported.load(Relaxed) as usize >= N).await;
        let el = t.elapsed();
        task.shutdown().await;
        println!(
            "{protocol} {gzip}: {N} spans in {el:?} = {:.0} spans/s, {} requests",
            N as f64 / el.as_secs_f64(),
            rx.requests()
        );
        assert_eq!(rx.spans().len(), N);
    }
}

async fn wait_long(cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(120), "timed out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
