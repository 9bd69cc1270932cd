//! One trace across unmodified services on this host: in-process parenting (threaded python
//! server) and same-host socket matching, under sequential and concurrent load.
mod common;

use std::{collections::HashMap, time::Duration};

use common::*;

/// Every A server span has exactly one A client child, which has exactly one B server child,
/// all in one trace; returns the number of such fully connected traces.
fn connected_traces(spans: &[ReceivedSpan], a: &str, b: &str, path_prefix: &str) -> usize {
    let by_id: HashMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut ok = 0;
    for a_srv in spans.iter().filter(|s| {
        s.service() == Some(a)
            && s.kind == SERVER
            && s.attr("url.path")
                .is_some_and(|p| p.starts_with(path_prefix))
    }) {
        let kids: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| {
                s.parent_span_id == a_srv.span_id && s.service() == Some(a) && s.kind == CLIENT
            })
            .collect();
        let [a_cli] = kids.as_slice() else { continue };
        let grandkids: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| {
                s.parent_span_id == a_cli.span_id && s.service() == Some(b) && s.kind == SERVER
            })
            .collect();
        let [b_srv] = grandkids.as_slice() else {
            continue;
        };
        let same_trace = a_srv.trace_id == a_cli.trace_id && a_cli.trace_id == b_srv.trace_id;
        // The B request served must be the one this A request made (no cross-talk): A's
        // client span's url.full carries the same marker as B's url.query.
        let marker_ok = a_cli
            .attr("url.full")
            .zip(b_srv.attr("url.query"))
            .is_some_and(|(full, q)| full.ends_with(q));
        // Children never start before their parents.
        let ordered = a_cli.start_ns >= a_srv.start_ns && b_srv.start_ns >= a_cli.start_ns;
        if same_trace && marker_ok && ordered && by_id.contains_key(a_srv.span_id.as_str()) {
            ok += 1;
        }
    }
    ok
}

/// `entry_hooks`: force the entry + exit hook pairs with per-thread argument slots (the path
/// of kernels without `bpf_task_pt_regs`) instead of exit hooks reading the saved registers.
async fn run_scenario(concurrency: usize, total: usize, entry_hooks: bool) {
    require_root();
    let rx = Receiver::start().await;
    let (a, a_port) = python_app("svc-a");
    let (b, b_port) = python_app("svc-b");
    let sonde = Sonde::start(
        &[
            "--pid",
            &a.pid().to_string(),
            "--pid",
            &b.pid().to_string(),
            "--output",
            "otlp",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.grpc_endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            (
                "SONDE_SYSCALL_ARGS",
                if entry_hooks { "entry" } else { "auto" },
            ),
        ],
    );
    // A's /call route calls B; each request names a distinct B path query so that pairs can
    // be checked for cross-talk.
    let mut handles = vec![];
    let per = total / concurrency;
    for w in 0..concurrency {
        handles.push(std::thread::spawn(move || {
            for i in 0..per {
                let n = w * per + i;
                let url = format!(
                    "http://127.0.0.1:{a_port}/call/{n}?url=http://127.0.0.1:{b_port}/ok%3Fn%3D{n}"
                );
                let mut c = Raw::connect(a_port);
                let path = url.trim_start_matches(&format!("http://127.0.0.1:{a_port}"));
                c.send(
                    format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
                assert_eq!(c.read_responses(&[false]), vec![200]);
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    let spans = rx
        .wait_for(
            |s| {
                s.iter()
                    .filter(|x| x.service() == Some("svc-b") && x.kind == SERVER)
                    .count()
                    >= total
            },
            Duration::from_secs(30),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = if spans.len() < 3 * total {
        rx.spans()
    } else {
        spans
    };
    let connected = connected_traces(&spans, "svc-a", "svc-b", "/call/");
    eprintln!(
        "{connected}/{total} requests produced a fully connected trace ({concurrency} concurrent)"
    );
    let log = sonde.stop();
    assert_eq!(connected, total, "every request fully connected\n{log}");
    // This kernel (6.18) has bpf_task_pt_regs: arguments come from registers unless forced.
    assert_eq!(
        log.contains("data syscalls are hooked at entry and exit"),
        entry_hooks,
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_a_calls_unmodified_b_sequentially() {
    run_scenario(1, 100, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_a_calls_unmodified_b_concurrently() {
    run_scenario(50, 100, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_hooked_at_entry_and_exit_link_the_same() {
    run_scenario(20, 100, true).await;
}
