//! Context propagation (`--propagate`): traces that cross hosts (two network namespaces),
//! joins with services running an OpenTelemetry SDK (Python Flask, Node express), and proof
//! that inserting `traceparent` is harmless to the traced applications.
mod common;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

fn node_dir() -> PathBuf {
    workspace().join("tests/node")
}

/// Environment for an SDK-instrumented peer exporting to the test receiver.
fn sdk_env(rx: &Receiver, service: &str) -> Vec<(String, String)> {
    [
        ("OTEL_SERVICE_NAME", service.to_string()),
        ("OTEL_TRACES_EXPORTER", "otlp".into()),
        ("OTEL_METRICS_EXPORTER", "none".into()),
        ("OTEL_LOGS_EXPORTER", "none".into()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", rx.http_endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".into()),
        ("OTEL_SEMCONV_STABILITY_OPT_IN", "http".into()),
        ("OTEL_NODE_RESOURCE_DETECTORS", "env,host,os,process".into()),
        ("OTEL_PROPAGATORS", "tracecontext".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Flask under `opentelemetry-instrument`.
fn flask_sdk(rx: &Receiver, service: &str) -> (Proc, u16) {
    let port = free_port();
    let mut cmd = Command::new("opentelemetry-instrument");
    cmd.arg("python3")
        .arg(fixture("flask_app.py"))
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in sdk_env(rx, service) {
        cmd.env(k, v);
    }
    let p = Proc::spawn(service, &mut cmd);
    wait_port(port);
    (p, port)
}

/// express, unmodified (`sdk: None`) or under the Node SDK.
fn express(rx: Option<&Receiver>, service: &str) -> (Proc, u16) {
    let port = free_port();
    let mut cmd = Command::new("node");
    cmd.current_dir(node_dir());
    if let Some(rx) = rx {
        cmd.arg("--require")
            .arg("@opentelemetry/auto-instrumentations-node/register");
        for (k, v) in sdk_env(rx, service) {
            cmd.env(k, v);
        }
    } else {
        cmd.env("OTEL_SERVICE_NAME", service);
    }
    cmd.arg("app.js")
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let p = Proc::spawn(service, &mut cmd);
    wait_port(port);
    (p, port)
}

fn start_sonde(rx: &Receiver, pids: &[u32], extra: &[&str]) -> Sonde {
    let mut args: Vec<String> = vec!["--output".into(), "otlp".into()];
    for p in pids {
        args.push("--pid".into());
        args.push(p.to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Sonde::start(
        &args,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.grpc_endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    )
}

fn by_sdk<'a>(spans: &'a [ReceivedSpan], sdk: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.res("telemetry.sdk.name") == Some(sdk))
        .collect()
}

/// An SDK-instrumented service calls an unmodified one: the unmodified service's span (made by
/// sonde) joins the SDK's trace under the SDK's CLIENT span; sonde makes no spans for the SDK
/// process itself.
async fn sdk_calls_unmodified(sdk_kind: &str) {
    require_root();
    let rx = Receiver::start().await;
    let (b, b_port) = python_app("plain-b");
    let (sdk, sdk_port) = match sdk_kind {
        "python" => flask_sdk(&rx, "sdk-svc"),
        _ => express(Some(&rx), "sdk-svc"),
    };
    let sonde = start_sonde(&rx, &[b.pid(), sdk.pid()], &["--propagate"]);
    let n = 5;
    for i in 0..n {
        let (code, _) = curl(&[&format!(
            "http://127.0.0.1:{sdk_port}/call?url=http://127.0.0.1:{b_port}/ok%3Fi%3D{i}"
        )]);
        assert_eq!(code, 200);
    }
    let spans = rx
        .wait_for(
            |s| {
                s.iter().filter(|x| x.service() == Some("plain-b")).count() >= n
                    && s.iter()
                        .filter(|x| {
                            x.res("telemetry.sdk.name") == Some("opentelemetry") && x.kind == CLIENT
                        })
                        .count()
                        >= n
            },
            Duration::from_secs(30),
        )
        .await;
    let sdk_spans = by_sdk(&spans, "opentelemetry");
    let mut joined = 0;
    for b_span in spans
        .iter()
        .filter(|s| s.service() == Some("plain-b") && s.kind == SERVER)
    {
        let parent = sdk_spans
            .iter()
            .find(|s| s.span_id == b_span.parent_span_id && s.kind == CLIENT);
        if let Some(p) = parent {
            assert_eq!(p.trace_id, b_span.trace_id);
            joined += 1;
        }
    }
    eprintln!("{sdk_kind} SDK → unmodified: {joined}/{n} joined");
    assert_eq!(
        joined, n,
        "every unmodified span joins the SDK's trace: {spans:#?}"
    );
    assert!(
        !spans
            .iter()
            .any(|s| s.service() == Some("sdk-svc") && s.res("telemetry.sdk.name") == Some("sonde")),
        "sonde must not duplicate the SDK process's spans"
    );
    let log = sonde.stop();
    assert!(log.contains("runs an OpenTelemetry SDK"), "{log}");
}

/// An unmodified service calls an SDK-instrumented one: sonde inserts `traceparent`, so the
/// SDK's SERVER span continues sonde's trace under sonde's CLIENT span.
async fn unmodified_calls_sdk(sdk_kind: &str) {
    require_root();
    let rx = Receiver::start().await;
    let (a, a_port) = python_app("plain-a");
    let (sdk, sdk_port) = match sdk_kind {
        "python" => flask_sdk(&rx, "sdk-svc"),
        _ => express(Some(&rx), "sdk-svc"),
    };
    let sonde = start_sonde(&rx, &[a.pid(), sdk.pid()], &["--propagate"]);
    let n = 5;
    for i in 0..n {
        let (code, _) = curl(&[&format!(
            "http://127.0.0.1:{a_port}/call/{i}?url=http://127.0.0.1:{sdk_port}/ok"
        )]);
        assert_eq!(code, 200);
    }
    let spans = rx
        .wait_for(
            |s| {
                s.iter()
                    .filter(|x| {
                        x.res("telemetry.sdk.name") == Some("opentelemetry") && x.kind == SERVER
                    })
                    .count()
                    >= n
                    && s.iter()
                        .filter(|x| x.service() == Some("plain-a") && x.kind == CLIENT)
                        .count()
                        >= n
            },
            Duration::from_secs(30),
        )
        .await;
    let a_clients: Vec<_> = spans
        .iter()
        .filter(|s| s.service() == Some("plain-a") && s.kind == CLIENT)
        .collect();
    let mut joined = 0;
    for srv in by_sdk(&spans, "opentelemetry")
        .into_iter()
        .filter(|s| s.kind == SERVER)
    {
        if let Some(c) = a_clients.iter().find(|c| c.span_id == srv.parent_span_id) {
            assert_eq!(c.trace_id, srv.trace_id);
            // And sonde's client span hangs under sonde's server span of A.
            assert!(spans.iter().any(|s| s.span_id == c.parent_span_id
                && s.service() == Some("plain-a")
                && s.kind == SERVER
                && s.trace_id == c.trace_id));
            joined += 1;
        }
    }
    eprintln!("unmodified → {sdk_kind} SDK: {joined}/{n} joined");
    assert_eq!(joined, n, "{spans:#?}");
    let log = sonde.stop();
    assert!(
        stat(&log, "kernel_traceparent_injected").unwrap_or(0) >= n as u64,
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flask_sdk_calls_unmodified_service() {
    sdk_calls_unmodified("python").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_service_calls_flask_sdk() {
    unmodified_calls_sdk("python").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn express_sdk_calls_unmodified_service() {
    sdk_calls_unmodified("node").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_service_calls_express_sdk() {
    unmodified_calls_sdk("node").await;
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct TwoHosts {
    a: String,
    b: String,
}

const ADDR_A: &str = "10.213.0.1";
const ADDR_B: &str = "10.213.0.2";

impl TwoHosts {
    fn new() -> TwoHosts {
        let tag = std::process::id() % 10000;
        let h = TwoHosts {
            a: format!("sonde-a{tag}"),
            b: format!("sonde-b{tag}"),
        };
        let sh = |c: &str| {
            let ok = Command::new("sh")
                .arg("-c")
                .arg(c)
                .status()
                .unwrap()
                .success();
            assert!(ok, "{c}");
        };
        let (a, b) = (&h.a, &h.b);
        sh(&format!("ip netns add {a} && ip netns add {b}"));
        sh(&format!("ip link add va{tag} type veth peer name vb{tag}"));
        sh(&format!(
            "ip link set va{tag} netns {a} && ip link set vb{tag} netns {b}"
        ));
        sh(&format!(
            "ip -n {a} addr add {ADDR_A}/24 dev va{tag} && ip -n {a} link set va{tag} up && ip -n {a} link set lo up"
        ));
        sh(&format!(
            "ip -n {b} addr add {ADDR_B}/24 dev vb{tag} && ip -n {b} link set vb{tag} up && ip -n {b} link set lo up"
        ));
        h
    }

    fn spawn_app(&self, ns: &str, addr: &str, service: &str, port: u16) -> Proc {
        let p = Proc::spawn(
            service,
            Command::new("ip")
                .args(["netns", "exec", ns, "python3"])
                .arg(fixture("app.py"))
                .arg(port.to_string())
                .arg(addr)
                .env("OTEL_SERVICE_NAME", service),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let ok = Command::new("ip")
                .args(["netns", "exec", ns, "curl", "-s", "-o", "/dev/null"])
                .arg(format!("http://{addr}:{port}/ok"))
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return p;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{service} did not listen in {ns}");
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_one_trace_per_request() {
    require_root();
    let rx = Receiver::start().await;
    let hosts = TwoHosts::new();
    let (pa, pb) = (free_port(), free_port());
    let a = hosts.spawn_app(&hosts.a, ADDR_A, "host-a", pa);
    let b = hosts.spawn_app(&hosts.b, ADDR_B, "host-b", pb);
    // Same-host socket matching off: only what crosses the wire links the two "hosts".
    let sonde = start_sonde(
        &rx,
        &[a.pid(), b.pid()],
        &["--propagate", "--no-same-host-links"],
    );
    let n = 20;
    for i in 0..n {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &hosts.a,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg(format!(
                "http://{ADDR_A}:{pa}/call/{i}?url=http://{ADDR_B}:{pb}/ok%3Fn%3D{i}"
            ))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    }
    rx.wait_for(
        |s| s.iter().filter(|x| x.service() == Some("host-b")).count() >= n,
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = rx.spans();
    let mut connected = 0;
    for a_srv in spans
        .iter()
        .filter(|s| s.service() == Some("host-a") && s.kind == SERVER)
    {
        let Some(a_cli) = spans
            .iter()
            .find(|s| s.parent_span_id == a_srv.span_id && s.kind == CLIENT)
        else {
            continue;
        };
        let Some(b_srv) = spans
            .iter()
            .find(|s| s.parent_span_id == a_cli.span_id && s.service() == Some("host-b"))
        else {
            continue;
        };
        if a_srv.trace_id == a_cli.trace_id
            && a_cli.trace_id == b_srv.trace_id
            && a_cli
                .attr("url.full")
                .unwrap_or("")
                .ends_with(b_srv.attr("url.query").unwrap_or("?"))
        {
            connected += 1;
        }
    }
    eprintln!("two hosts: {connected}/{n} requests produced a fully connected trace");
    let log = sonde.stop();
    assert_eq!(connected, n, "{log}");
}

/// Runs tests/fixtures/client.py (a traced, keep-alive client) against a server; returns
/// (digest of the responses without Date lines, worst latency ms).
fn run_client(port: u16, path: &str, count: usize) -> (String, f64) {
    let out = Command::new("python3")
        .arg(fixture("client.py"))
        .args(["127.0.0.1", &port.to_string(), path, &count.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    (
        it.next().unwrap().to_string(),
        it.next().unwrap().parse().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagation_is_harmless_byte_identical_and_no_stalls() {
    require_root();
    let rx = Receiver::start().await;
    let ng = nginx("safe-nginx");
    let (_py, py_port) = python_app("safe-python");
    let (_node, node_port) = express(None, "safe-node");
    // nginx as a keep-alive reverse proxy: its upstream sockets are propagation sockets.
    let dir = std::env::temp_dir().join(format!("sonde-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let proxy_port = free_port();
    let conf = std::fs::read_to_string(fixture("nginx-proxy.conf"))
        .unwrap()
        .replace("__PREFIX__", dir.to_str().unwrap())
        .replace("__PORT__", &proxy_port.to_string())
        .replace("__UPSTREAM__", &py_port.to_string());
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let _proxy = Proc::spawn(
        "nginx-proxy",
        Command::new("/usr/sbin/nginx")
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir)
            .stderr(Stdio::null()),
    );
    wait_port(proxy_port);

    let targets = [
        ("nginx keep-alive", ng.port, "/ok"),
        ("python", py_port, "/ok"),
        ("node", node_port, "/ok"),
        ("nginx proxy → python", proxy_port, "/ok"),
    ];
    let count = 1500;
    let mut results = vec![];
    for propagate in [false, true] {
        // Every process traced (the clients too, so that their requests get the header).
        let mut args = vec!["--output", "json"];
        if propagate {
            args.push("--propagate");
        }
        let sonde = Sonde::start(&args, &[]);
        let _ = &rx;
        let mut round = vec![];
        for (name, port, path) in targets {
            let t0 = Instant::now();
            let (digest, worst_ms) = run_client(port, path, count);
            round.push((name, digest, worst_ms, t0.elapsed()));
        }
        let log = sonde.stop();
        let injected = stat(&log, "kernel_traceparent_injected").unwrap_or(0);
        if propagate {
            assert!(
                injected >= (count * 4) as u64,
                "headers were inserted: {injected}"
            );
        } else {
            assert_eq!(injected, 0);
        }
        results.push(round);
    }
    let _ = std::fs::remove_dir_all(&dir);
    for (off, on) in results[0].iter().zip(&results[1]) {
        eprintln!(
            "{}: off {:?} (worst {} ms), on {:?} (worst {} ms)",
            off.0, off.3, off.2, on.3, on.2
        );
        assert_eq!(
            off.1, on.1,
            "{}: responses differ with propagation on",
            off.0
        );
        assert!(on.2 < 1000.0, "{}: a request stalled ({} ms)", on.0, on.2);
    }
}
