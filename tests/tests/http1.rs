//! HTTP/1.x tracing of unmodified processes, end to end: real servers (python http.server,
//! nginx), real clients (curl, raw sockets), real kernel programs, a real OTLP receiver.
//! Root only; run serially by `cargo xtask test`.
mod common;

use std::time::Duration;

use common::*;

fn attr<'a>(s: &'a ReceivedSpan, k: &str) -> &'a str {
    s.attr(k)
        .unwrap_or_else(|| panic!("span {} lacks {k}: {:?}", s.name, s.attributes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_server_and_curl_client_over_grpc() {
    require_root();
    let rx = Receiver::start().await;
    let (app, port) = python_app("pyshop");
    let sonde = Sonde::start(
        &["--output", "otlp"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.grpc_endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    let url = format!("http://127.0.0.1:{port}/ok?item=7&sig=secret");
    let (code, body) = curl(&[
        "-A",
        "sonde-test/1.0",
        "-H",
        "Authorization: Bearer hunter2",
        &url,
    ]);
    assert_eq!((code, body.as_str()), (200, "hello\n"));

    let spans = wait_spans(&rx, "pyshop", SERVER, 1).await;
    let server = of_service(&spans, "pyshop");
    assert_eq!(server.len(), 1, "exactly one server span: {server:?}");
    let s = server[0];
    assert_eq!(s.kind, SERVER);
    assert_eq!(s.name, "GET");
    assert_eq!(s.via, "grpc");
    assert_eq!(attr(s, "http.request.method"), "GET");
    assert_eq!(attr(s, "url.path"), "/ok");
    assert_eq!(attr(s, "url.query"), "item=7&sig=REDACTED");
    assert_eq!(attr(s, "url.scheme"), "http");
    assert_eq!(attr(s, "http.response.status_code"), "200");
    assert_eq!(attr(s, "server.address"), "127.0.0.1");
    assert_eq!(attr(s, "server.port"), port.to_string());
    assert_eq!(attr(s, "client.address"), "127.0.0.1");
    assert_eq!(attr(s, "network.peer.address"), "127.0.0.1");
    assert!(attr(s, "network.peer.port").parse::<u16>().unwrap() > 0);
    assert_eq!(attr(s, "network.protocol.version"), "1.1");
    assert_eq!(attr(s, "user_agent.original"), "sonde-test/1.0");
    assert_eq!(s.status_code, 0, "200 leaves status unset");
    // No traceparent was sent, but curl is traced on this host too: the server span is the
    // child of curl's client span (checked below).
    assert_eq!(s.trace_id.len(), 32);
    assert!(s.end_ns >= s.start_ns && s.end_ns - s.start_ns < 5_000_000_000);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    assert!(
        now.abs_diff(s.start_ns) < 60_000_000_000,
        "wall-clock timestamps"
    );
    // Resource: one per process, read from the traced process itself.
    assert_eq!(s.res("process.pid"), Some(app.pid().to_string().as_str()));
    assert_eq!(s.res("telemetry.distro.name"), Some("sonde"));
    assert!(
        s.res("process.executable.name")
            .unwrap()
            .starts_with("python")
    );
    assert!(s.res("host.name").is_some() && s.res("service.instance.id").is_some());
    // Credentials never leave the host.
    assert!(!format!("{:?}", spans).contains("hunter2"));

    // curl's side: a CLIENT span in curl's own Resource.
    let client: Vec<_> = spans
        .iter()
        .filter(|x| {
            x.kind == CLIENT
                && x.res("process.executable.name") == Some("curl")
                && x.attr("server.port") == Some(port.to_string().as_str())
        })
        .collect();
    assert_eq!(client.len(), 1, "one curl client span: {client:?}");
    let c = client[0];
    assert_eq!(
        attr(c, "url.full"),
        format!("http://127.0.0.1:{port}/ok?item=7&sig=REDACTED")
    );
    assert_eq!(attr(c, "server.address"), "127.0.0.1");
    assert_eq!(attr(c, "server.port"), port.to_string());
    assert_eq!(attr(c, "http.response.status_code"), "200");
    assert_eq!(
        (&s.trace_id, &s.parent_span_id),
        (&c.trace_id, &c.span_id),
        "same-host link"
    );
    assert!(c.parent_span_id.is_empty(), "curl's request is the root");
    sonde.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_pipelining_chunked_head_and_error_statuses_over_http() {
    require_root();
    let rx = Receiver::start().await;
    let (app, port) = python_app("pyapi");
    let sonde = Sonde::start(
        &["--pid", &app.pid().to_string(), "--output", "otlp"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.http_endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    let mut c = Raw::connect(port);
    // Keep-alive: three requests one after another on one connection.
    for _ in 0..3 {
        c.send(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read_responses(&[false]), vec![200]);
    }
    // Pipelining: three requests in one write, then three responses.
    c.send(
        b"GET /status/404 HTTP/1.1\r\nHost: a\r\n\r\nGET /chunked HTTP/1.1\r\nHost: a\r\n\r\nHEAD /ok HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    // python's http.server answers pipelined requests one at a time, in order.
    assert_eq!(c.read_responses(&[false, false, true]), vec![404, 200, 200]);
    c.send(b"POST /status/500 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(c.read_responses(&[false]), vec![500]);
    c.send(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read_responses(&[false]), vec![200]);

    let spans = wait_spans(&rx, "pyapi", SERVER, 8).await;
    let mut server: Vec<_> = of_service(&spans, "pyapi");
    server.sort_by_key(|s| s.start_ns);
    let got: Vec<(String, String, String)> = server
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                attr(s, "url.path").to_string(),
                attr(s, "http.response.status_code").to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String, String)> = [
        ("GET", "/ok", "200"),
        ("GET", "/ok", "200"),
        ("GET", "/ok", "200"),
        ("GET", "/status/404", "404"),
        ("GET", "/chunked", "200"),
        ("HEAD", "/ok", "200"),
        ("POST", "/status/500", "500"),
        ("GET", "/ok", "200"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(got, want);
    assert!(server.iter().all(|s| s.via == "http"));
    // Status: 404 is not a server error; 500 is.
    assert_eq!(server[3].status_code, 0);
    assert_eq!(server[6].status_code, 2, "500 → STATUS_CODE_ERROR");
    assert_eq!(attr(server[6], "error.type"), "500");
    // Every span on one connection has the same peer port, and each its own id and trace.
    let peer = attr(server[0], "network.peer.port");
    assert!(server.iter().all(|s| attr(s, "network.peer.port") == peer));
    let mut ids: Vec<_> = server.iter().map(|s| &s.span_id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 8);
    // With --pid only the selected process is traced: the raw client here is the test process.
    assert!(
        spans.iter().all(|s| s.service() == Some("pyapi")),
        "{spans:?}"
    );
    let log = sonde.stop();
    assert_eq!(stat(&log, "kernel_ringbuf_full"), Some(0), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_after_8k_of_headers_is_continued() {
    require_root();
    let rx = Receiver::start().await;
    let (app, port) = python_app("pyctx");
    let sonde = Sonde::start(
        &["--pid", &app.pid().to_string(), "--output", "otlp"],
        &[
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                &format!("{}/v1/traces", rx.http_endpoint()),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    let mut req = String::from("GET /ok HTTP/1.1\r\nHost: ctx.local\r\n");
    for i in 0..90 {
        req.push_str(&format!("X-Filler-{i:02}: {}\r\n", "f".repeat(100)));
    }
    assert!(req.len() > 8192);
    req.push_str("traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n");
    req.push_str("tracestate: vendor=x\r\n\r\n");
    let mut c = Raw::connect(port);
    c.send(req.as_bytes());
    assert_eq!(c.read_responses(&[false]), vec![200]);

    let spans = wait_spans(&rx, "pyctx", SERVER, 1).await;
    let s = of_service(&spans, "pyctx")[0];
    assert_eq!(s.trace_id, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(s.parent_span_id, "b7ad6b7169203331");
    assert_eq!(s.trace_state, "vendor=x");
    assert_eq!(s.flags & 0xff, 1, "sampled flag carried");
    assert_eq!(attr(s, "server.address"), "ctx.local");
    sonde.stop();
}

/// With `--exe`, a server started after sonde is selected when it execs (master) and forks
/// (worker), before it serves: its very first request becomes a span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_started_after_sonde_is_traced_from_its_first_request() {
    require_root();
    let rx = Receiver::start().await;
    let dir = std::env::temp_dir().join(format!("sonde-late-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("nginx-late");
    std::fs::copy(system_nginx(), &exe).unwrap();
    let sonde = Sonde::start(
        &[
            "--exe",
            exe.to_str().unwrap(),
            "--service-name",
            "nginx-late=late",
            "--output",
            "otlp",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.grpc_endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    let ng = nginx_exe(&exe, "nginx.conf", "late");
    // The first request, as soon as the port accepts (well within the periodic rescan).
    let (code, _) = curl(&[&format!("http://127.0.0.1:{}/status/404", ng.port)]);
    assert_eq!(code, 404);
    let spans = wait_spans(&rx, "late", SERVER, 1).await;
    let first = of_service(&spans, "late");
    assert_eq!(first.len(), 1, "{spans:?}");
    assert_eq!(attr(first[0], "url.path"), "/status/404");
    assert_eq!(attr(first[0], "http.response.status_code"), "404");
    drop(ng);
    let log = sonde.stop();
    // Master (exec) and worker (fork) were both selected as they started.
    assert!(log.matches("(started)").count() >= 2, "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that is gone before sonde handles its connection (a CLI run, a cron job) keeps its
/// own service.name: a process selected as it starts has its Resource read then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_client_keeps_its_service_name() {
    require_root();
    let rx = Receiver::start().await;
    let (_server, port) = python_app("pyshortserver");
    let dir = std::env::temp_dir().join(format!("sonde-short-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("curl-short");
    let curl_path = std::process::Command::new("sh")
        .args(["-c", "command -v curl"])
        .output()
        .unwrap()
        .stdout;
    std::fs::copy(String::from_utf8(curl_path).unwrap().trim(), &exe).unwrap();
    let sonde = Sonde::start(
        &["--exe", exe.to_str().unwrap(), "--output", "otlp"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.grpc_endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    let out = std::process::Command::new(&exe)
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}/ok?short=1"))
        .env("OTEL_SERVICE_NAME", "shortclient")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    let spans = rx
        .wait_for(
            |s| s.iter().any(|s| s.kind == CLIENT),
            Duration::from_secs(20),
        )
        .await;
    let log = sonde.stop();
    let _ = std::fs::remove_dir_all(&dir);
    let client: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.kind == CLIENT).collect();
    assert_eq!(client.len(), 1, "{spans:?}\n{log}");
    assert_eq!(client[0].service(), Some("shortclient"), "{log}");
    assert_eq!(
        attr(client[0], "url.full"),
        format!("http://127.0.0.1:{port}/ok?short=1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_writev_sendfile_and_connection_opened_before_sonde() {
    require_root();
    let rx = Receiver::start().await;
    let ng = nginx("edge");
    // A keep-alive connection opened and used before sonde starts.
    let mut early = Raw::connect(ng.port);
    early.send(b"GET /ok HTTP/1.1\r\nHost: edge\r\n\r\n");
    assert_eq!(early.read_responses(&[false]), vec![200]);

    let sonde = Sonde::start(
        &[
            "--exe",
            "nginx",
            "--service-name",
            "nginx=edge",
            "--output",
            "otlp",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.grpc_endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    early.send(b"GET /ok HTTP/1.1\r\nHost: edge\r\n\r\n");
    assert_eq!(early.read_responses(&[false]), vec![200]);
    early.send(b"GET /big.txt HTTP/1.1\r\nHost: edge\r\n\r\nGET /status/500 HTTP/1.1\r\nHost: edge\r\n\r\n");
    assert_eq!(early.read_responses(&[false, false]), vec![200, 500]);
    let (code, _) = curl(&[&format!("http://127.0.0.1:{}/status/404", ng.port)]);
    assert_eq!(code, 404);

    let spans = wait_spans(&rx, "edge", SERVER, 4).await;
    let mut s = of_service(&spans, "edge");
    s.sort_by_key(|x| x.start_ns);
    let got: Vec<_> = s
        .iter()
        .map(|x| (attr(x, "url.path"), attr(x, "http.response.status_code")))
        .collect();
    assert_eq!(
        got,
        vec![
            ("/ok", "200"),
            ("/big.txt", "200"),
            ("/status/500", "500"),
            ("/status/404", "404")
        ]
    );
    assert!(s[0].res("process.executable.name") == Some("nginx"));
    sonde.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_export_traffic_never_becomes_spans() {
    require_root();
    // The receiver runs in this (traced) test process and speaks HTTP/1.1: if sonde traced its
    // own exports, the receiver's side would produce `POST /v1/traces` server spans, forever.
    let rx = Receiver::start().await;
    let (_app, port) = python_app("pyself");
    let sonde = Sonde::start(
        &["--output", "otlp"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.http_endpoint()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    for _ in 0..5 {
        let (code, _) = curl(&[&format!("http://127.0.0.1:{port}/ok")]);
        assert_eq!(code, 200);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let spans = wait_spans(&rx, "pyself", SERVER, 5).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let spans_after = rx.spans();
    assert!(rx.requests() >= 2, "several export requests were made");
    for s in spans.iter().chain(spans_after.iter()) {
        assert_ne!(
            s.attr("url.path"),
            Some("/v1/traces"),
            "export traffic traced: {s:?}"
        );
        assert_ne!(
            s.res("process.pid"),
            Some(sonde.proc.pid().to_string().as_str()),
            "sonde traced itself"
        );
    }
    let log = sonde.stop();
    assert!(
        stat(&log, "kernel_self_conns_skipped").unwrap_or(0) >= 1,
        "{log}"
    );
}
