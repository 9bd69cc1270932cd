//! Byte fixtures fed as events, each one re-fed with its events split at every byte boundary
//! (and every pair of boundaries for short fixtures): results must not depend on how the
//! kernel happened to cut the stream, and timestamps must follow the bytes.
use std::net::SocketAddr;

use super::*;
use crate::events::{DataInfo, Direction, Event, OpenInfo, Role};

const C: ConnId = ConnId {
    tgid: 100,
    fd: 7,
    generation: 1,
};
const IN_TID: u32 = 11;
const OUT_TID: u32 = 22;
const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn local() -> SocketAddr {
    "10.0.0.1:8080".parse().unwrap()
}
fn remote() -> SocketAddr {
    "10.0.0.2:40000".parse().unwrap()
}

#[derive(Clone, Debug)]
enum Step {
    Open(Role),
    Data {
        dir: Direction,
        bytes: Vec<u8>,
        /// Captured prefix (the rest of the syscall's bytes are not captured).
        cap: Option<usize>,
        /// Never delivered (ring buffer full): only its bytes' positions are consumed.
        lost: bool,
    },
    Close,
    Exit,
}

fn data(dir: Direction, b: &[u8]) -> Step {
    Step::Data {
        dir,
        bytes: b.to_vec(),
        cap: None,
        lost: false,
    }
}
fn inn(b: &[u8]) -> Step {
    data(Direction::Ingress, b)
}
fn out(b: &[u8]) -> Step {
    data(Direction::Egress, b)
}
fn lost(dir: Direction, b: &[u8]) -> Step {
    Step::Data {
        dir,
        bytes: b.to_vec(),
        cap: None,
        lost: true,
    }
}
fn trunc(dir: Direction, b: &[u8], cap: usize) -> Step {
    Step::Data {
        dir,
        bytes: b.to_vec(),
        cap: Some(cap),
        lost: false,
    }
}

fn tid_of(dir: Direction) -> u32 {
    match dir {
        Direction::Ingress => IN_TID,
        Direction::Egress => OUT_TID,
    }
}

fn base_ts(step: usize) -> u64 {
    (step as u64 + 1) * 100_000
}

/// Where the delivered steps start and end in the global byte space that splits index.
fn step_ranges(steps: &[Step]) -> Vec<Option<(usize, usize)>> {
    let mut at = 0;
    steps
        .iter()
        .map(|s| match s {
            Step::Data { bytes, lost, .. } if !*lost => {
                let r = (at, at + bytes.len());
                at += bytes.len();
                Some(r)
            }
            _ => None,
        })
        .collect()
}

/// Piece boundaries (offsets within the step) for a set of global split points.
fn cuts(range: (usize, usize), splits: &[usize]) -> Vec<usize> {
    let mut c = vec![0];
    c.extend(
        splits
            .iter()
            .filter(|&&p| p > range.0 && p < range.1)
            .map(|p| p - range.0),
    );
    c.push(range.1 - range.0);
    c
}

/// Timestamp of the event that carries byte `off` of step `step` under `splits`.
fn ts_at(steps: &[Step], splits: &[usize], step: usize, off: usize) -> u64 {
    match step_ranges(steps)[step] {
        Some(r) => {
            let c = cuts(r, splits);
            let piece = c
                .windows(2)
                .position(|w| off >= w[0] && off < w[1])
                .unwrap();
            base_ts(step) + piece as u64
        }
        None => base_ts(step),
    }
}

#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
struct Counts {
    exchanges: u64,
    resyncs: u64,
    not_http: u64,
    dropped: u64,
    evicted: u64,
}

fn counts(stats: &Stats) -> Counts {
    use std::sync::atomic::Ordering::Relaxed;
    Counts {
        exchanges: stats.exchanges.load(Relaxed),
        resyncs: stats.parse_resyncs.load(Relaxed),
        not_http: stats.conns_not_http.load(Relaxed),
        dropped: stats.requests_dropped.load(Relaxed),
        evicted: stats.conns_evicted.load(Relaxed),
    }
}

/// Feeds the steps as events, cut at `splits`.
fn run(steps: &[Step], splits: &[usize], limits: &ConnLimits) -> (Vec<Exchange>, Counts, usize) {
    let mut table = ConnTable::new(limits.clone());
    let stats = Stats::default();
    let mut outv = Vec::new();
    let ranges = step_ranges(steps);
    let mut pos = [0u64; 2];
    for (k, s) in steps.iter().enumerate() {
        let ts = base_ts(k);
        match s {
            Step::Open(role) => table.on_event(
                &Event::Open(OpenInfo {
                    conn: C,
                    ts_ns: ts,
                    tid: C.tgid,
                    role: *role,
                    local: Some(local()),
                    remote: Some(remote()),
                    comm: [0; 16],
                }),
                &stats,
                &mut outv,
            ),
            Step::Data {
                dir,
                bytes,
                cap,
                lost,
            } => {
                let p = &mut pos[dir_index(*dir)];
                if *lost {
                    *p += bytes.len() as u64;
                    continue;
                }
                let c = cuts(ranges[k].unwrap(), splits);
                let cap = cap.unwrap_or(bytes.len());
                for (j, w) in c.windows(2).enumerate() {
                    let (a, b) = (w[0], w[1]);
                    let captured = &bytes[a.min(cap)..b.min(cap)];
                    table.on_event(
                        &Event::Data(DataInfo {
                            ctx: Default::default(),
                            conn: C,
                            ts_ns: ts + j as u64,
                            tid: tid_of(*dir),
                            dir: *dir,
                            pos: *p + a as u64,
                            len: (b - a) as u64,
                            data: captured,
                        }),
                        &stats,
                        &mut outv,
                    );
                }
                *p += bytes.len() as u64;
            }
            Step::Close => table.on_event(&Event::Close { conn: C, ts_ns: ts }, &stats, &mut outv),
            Step::Exit => table.on_event(
                &Event::ProcessExit {
                    tgid: C.tgid,
                    ts_ns: ts,
                },
                &stats,
                &mut outv,
            ),
        }
    }
    let n = table.len();
    (outv, counts(&stats), n)
}

/// An expected exchange; `start`/`end` are (step, byte offset in the step) of the request's
/// first and the response's last byte (offset ignored for Close/Exit steps).
#[derive(Clone, Debug)]
struct Exp {
    method: &'static str,
    target: &'static str,
    status: Option<u16>,
    outcome: Outcome,
    start: (usize, usize),
    end: (usize, usize),
}

fn exp(
    method: &'static str,
    target: &'static str,
    status: Option<u16>,
    outcome: Outcome,
    start: (usize, usize),
    end: (usize, usize),
) -> Exp {
    Exp {
        method,
        target,
        status,
        outcome,
        start,
        end,
    }
}

/// `(step, offset of the last byte)` of a data step.
fn last_byte(steps: &[Step], step: usize) -> (usize, usize) {
    match &steps[step] {
        Step::Data { bytes, .. } => (step, bytes.len() - 1),
        _ => (step, 0),
    }
}

fn check_one(
    steps: &[Step],
    splits: &[usize],
    limits: &ConnLimits,
    exps: &[Exp],
    want: Counts,
    baseline: Option<&[Exchange]>,
) -> Vec<Exchange> {
    let (got, c, _) = run(steps, splits, limits);
    let ctx = format!("splits {splits:?}");
    assert_eq!(c, want, "counters, {ctx}\n{got:#?}");
    assert_eq!(got.len(), exps.len(), "exchange count, {ctx}\n{got:#?}");
    for (i, (g, e)) in got.iter().zip(exps).enumerate() {
        let ctx = format!("exchange {i}, {ctx}");
        assert_eq!(g.request.method, e.method, "{ctx}");
        assert_eq!(g.request.target, e.target, "{ctx}");
        assert_eq!(g.response.as_ref().map(|r| r.status), e.status, "{ctx}");
        assert_eq!(g.outcome, e.outcome, "{ctx}");
        assert_eq!(g.conn, C, "{ctx}");
        assert_eq!(
            g.start_ns,
            ts_at(steps, splits, e.start.0, e.start.1),
            "start_ns, {ctx}"
        );
        if e.outcome == Outcome::ResponseUnparseable {
            // Ends when the loss is noticed: which piece of that event depends on the split.
            let base = base_ts(e.end.0);
            assert!((base..base + 1000).contains(&g.end_ns), "end_ns, {ctx}");
        } else {
            assert_eq!(
                g.end_ns,
                ts_at(steps, splits, e.end.0, e.end.1),
                "end_ns, {ctx}"
            );
        }
        if let Some(base) = baseline {
            // Everything else is identical to the unsplit run.
            let mut a = g.clone();
            let mut b = base[i].clone();
            (a.start_ns, a.end_ns, b.start_ns, b.end_ns) = (0, 0, 0, 0);
            assert_eq!(a, b, "{ctx}");
        }
    }
    got
}

/// Runs a fixture unsplit, split at every inner byte boundary, and (if short) at every pair.
fn check_with(steps: &[Step], limits: &ConnLimits, exps: &[Exp], want: Counts) -> Vec<Exchange> {
    let base = check_one(steps, &[], limits, exps, want, None);
    let ranges: Vec<(usize, usize)> = step_ranges(steps).into_iter().flatten().collect();
    let total = ranges.last().map_or(0, |r| r.1);
    let inner: Vec<usize> = (1..total)
        .filter(|p| ranges.iter().any(|r| *p > r.0 && *p < r.1))
        .collect();
    for &p in &inner {
        check_one(steps, &[p], limits, exps, want, Some(&base));
    }
    if total < 300 {
        for (i, &p) in inner.iter().enumerate() {
            for &q in &inner[i + 1..] {
                check_one(steps, &[p, q], limits, exps, want, Some(&base));
            }
        }
    }
    base
}

fn check(steps: &[Step], exps: &[Exp], want: Counts) -> Vec<Exchange> {
    check_with(steps, &ConnLimits::default(), exps, want)
}

fn n_ok(n: u64) -> Counts {
    Counts {
        exchanges: n,
        ..Counts::default()
    }
}

const OK: Outcome = Outcome::Complete;

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: example.com\r\n\r\n").into_bytes()
}
fn resp(status: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn simple_get() {
    let req = format!(
        "GET /hello?x=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8.5\r\n\
         traceparent: {TP}\r\nX-Forwarded-For: 1.2.3.4, 5.6.7.8\r\n\r\n"
    );
    let steps = [
        Step::Open(Role::Server),
        inn(req.as_bytes()),
        out(&resp(200, "hello")),
        Step::Close,
    ];
    let got = check(
        &steps,
        &[exp(
            "GET",
            "/hello?x=1",
            Some(200),
            OK,
            (1, 0),
            last_byte(&steps, 2),
        )],
        n_ok(1),
    );
    let x = &got[0];
    assert_eq!(x.side, Side::Server);
    assert_eq!((x.local, x.remote), (Some(local()), Some(remote())));
    assert_eq!((x.request_tid, x.response_tid), (IN_TID, OUT_TID));
    assert_eq!(x.request.host.as_deref(), Some("example.com"));
    assert_eq!(x.request.user_agent.as_deref(), Some("curl/8.5"));
    assert_eq!(x.request.traceparent.as_deref(), Some(TP));
    assert_eq!(x.request.forwarded_for.as_deref(), Some("1.2.3.4"));
    assert_eq!(x.request.minor_version, 1);
    assert_eq!(x.response.as_ref().unwrap().content_length, Some(5));
}

#[test]
fn keep_alive_three_exchanges() {
    let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let steps = [
        Step::Open(Role::Server),
        inn(&get("/1")),
        out(&resp(200, "one")),
        inn(&get("/2")),
        out(chunked),
        inn(&get("/3")),
        out(&resp(201, "")),
    ];
    check(
        &steps,
        &[
            exp("GET", "/1", Some(200), OK, (1, 0), last_byte(&steps, 2)),
            exp("GET", "/2", Some(200), OK, (3, 0), last_byte(&steps, 4)),
            exp("GET", "/3", Some(201), OK, (5, 0), last_byte(&steps, 6)),
        ],
        n_ok(3),
    );
}

#[test]
fn pipelined_three_requests_then_three_responses() {
    let (r1, r2, r3) = (get("/a"), get("/bb"), get("/ccc"));
    let reqs = [r1.clone(), r2.clone(), r3].concat();
    let (s1, s2) = (resp(200, "A"), resp(404, "BB"));
    let steps = [
        Step::Open(Role::Server),
        inn(&reqs),
        out(&[s1.clone(), s2.clone()].concat()),
        out(&resp(500, "C")),
    ];
    check(
        &steps,
        &[
            exp("GET", "/a", Some(200), OK, (1, 0), (2, s1.len() - 1)),
            exp(
                "GET",
                "/bb",
                Some(404),
                OK,
                (1, r1.len()),
                last_byte(&steps, 2),
            ),
            exp(
                "GET",
                "/ccc",
                Some(500),
                OK,
                (1, r1.len() + r2.len()),
                last_byte(&steps, 3),
            ),
        ],
        n_ok(3),
    );
}

#[test]
fn chunked_response_with_extensions_and_trailers() {
    let body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
        5;foo=bar\r\nhello\r\n6 ; ext=\"q;x\"\r\n world\r\nA\r\n0123456789\r\n\
        0;last\r\nX-Trailer: t\r\nY: 2\r\n\r\n";
    let steps = [
        Step::Open(Role::Server),
        inn(&get("/c")),
        out(body),
        inn(&get("/next")),
        out(&resp(200, "ok")),
    ];
    check(
        &steps,
        &[
            exp("GET", "/c", Some(200), OK, (1, 0), last_byte(&steps, 2)),
            exp("GET", "/next", Some(200), OK, (3, 0), last_byte(&steps, 4)),
        ],
        n_ok(2),
    );
}

#[test]
fn chunked_request_body() {
    let req = b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n";
    let steps = [
        Step::Open(Role::Server),
        inn(req),
        out(&resp(200, "")),
        inn(&get("/b")),
        out(&resp(200, "")),
    ];
    check(
        &steps,
        &[
            exp("POST", "/up", Some(200), OK, (1, 0), last_byte(&steps, 2)),
            exp("GET", "/b", Some(200), OK, (3, 0), last_byte(&steps, 4)),
        ],
        n_ok(2),
    );
}

#[test]
fn head_response_has_no_body() {
    let steps = [
        Step::Open(Role::Server),
        inn(b"HEAD /big HTTP/1.1\r\nHost: h\r\n\r\n"),
        out(b"HTTP/1.1 200 OK\r\nContent-Length: 123456\r\n\r\n"),
        inn(&get("/after")),
        out(&resp(200, "x")),
    ];
    let got = check(
        &steps,
        &[
            exp("HEAD", "/big", Some(200), OK, (1, 0), last_byte(&steps, 2)),
            exp("GET", "/after", Some(200), OK, (3, 0), last_byte(&steps, 4)),
        ],
        n_ok(2),
    );
    assert_eq!(
        got[0].response.as_ref().unwrap().content_length,
        Some(123456)
    );
}

#[test]
fn no_content_and_not_modified_have_no_body() {
    let steps = [
        Step::Open(Role::Server),
        inn(&get("/204")),
        out(b"HTTP/1.1 204 No Content\r\n\r\n"),
        inn(&get("/304")),
        out(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"),
        inn(&get("/200")),
        out(&resp(200, "z")),
    ];
    check(
        &steps,
        &[
            exp("GET", "/204", Some(204), OK, (1, 0), last_byte(&steps, 2)),
            exp("GET", "/304", Some(304), OK, (3, 0), last_byte(&steps, 4)),
            exp("GET", "/200", Some(200), OK, (5, 0), last_byte(&steps, 6)),
        ],
        n_ok(3),
    );
}

#[test]
fn expect_100_continue() {
    let steps = [
        Step::Open(Role::Server),
        inn(b"POST /f HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n"),
        out(b"HTTP/1.1 100 Continue\r\n\r\n"),
        inn(b"hello world"),
        out(&resp(201, "")),
        inn(&get("/g")),
        out(&resp(200, "")),
    ];
    let got = check(
        &steps,
        &[
            exp("POST", "/f", Some(201), OK, (1, 0), last_byte(&steps, 4)),
            exp("GET", "/g", Some(200), OK, (5, 0), last_byte(&steps, 6)),
        ],
        n_ok(2),
    );
    assert!(got[0].request.expect_continue);
    assert_eq!(got[0].request.content_length, Some(11));
}

#[test]
fn http10_close_delimited_response() {
    let steps = [
        Step::Open(Role::Server),
        inn(b"GET /old HTTP/1.0\r\n\r\n"),
        out(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nsome body"),
        out(b" and more body, GET / HTTP/1.1 inside is just body"),
        Step::Close,
    ];
    let got = check(
        &steps,
        &[exp("GET", "/old", Some(200), OK, (1, 0), (4, 0))],
        n_ok(1),
    );
    assert_eq!(got[0].request.minor_version, 0);
    assert_eq!(got[0].response.as_ref().unwrap().minor_version, 0);
}

#[test]
fn close_delimited_response_ends_at_process_exit() {
    let steps = [
        Step::Open(Role::Server),
        inn(b"GET /x HTTP/1.1\r\n\r\n"),
        out(b"HTTP/1.1 200 OK\r\n\r\nbody"),
        Step::Exit,
    ];
    check(
        &steps,
        &[exp("GET", "/x", Some(200), OK, (1, 0), (3, 0))],
        n_ok(1),
    );
}

fn filler_headers(bytes: usize) -> String {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < bytes {
        s.push_str(&format!("X-Filler-{i}: {}\r\n", "v".repeat(90)));
        i += 1;
    }
    s
}

#[test]
fn big_request_head_with_late_traceparent() {
    let req = format!(
        "GET /big HTTP/1.1\r\nHost: h\r\n{}TraceParent: {TP}\r\nTRACESTATE: a=1\r\n{}\r\n",
        filler_headers(8 * 1024),
        filler_headers(8 * 1024)
    );
    assert!(req.len() > 16 * 1024);
    let steps = [
        Step::Open(Role::Server),
        inn(req.as_bytes()),
        out(&resp(200, "ok")),
    ];
    let got = check(
        &steps,
        &[exp(
            "GET",
            "/big",
            Some(200),
            OK,
            (1, 0),
            last_byte(&steps, 2),
        )],
        n_ok(1),
    );
    assert_eq!(got[0].request.traceparent.as_deref(), Some(TP));
    assert_eq!(got[0].request.tracestate.as_deref(), Some("a=1"));
}

#[test]
fn two_hundred_fifty_headers() {
    let mut req = String::from("GET /many HTTP/1.1\r\n");
    for i in 0..250 {
        req.push_str(&format!("h{i}: {i}\r\n"));
    }
    req.push_str(&format!("traceparent: {TP}\r\n\r\n"));
    let steps = [
        Step::Open(Role::Server),
        inn(req.as_bytes()),
        out(&resp(200, "")),
    ];
    let got = check(
        &steps,
        &[exp(
            "GET",
            "/many",
            Some(200),
            OK,
            (1, 0),
            last_byte(&steps, 2),
        )],
        n_ok(1),
    );
    assert_eq!(got[0].request.traceparent.as_deref(), Some(TP));
}

#[test]
fn truncated_capture_inside_bodies() {
    // A request body and a response body far larger than what was captured.
    let mut post = b"POST /u HTTP/1.1\r\nContent-Length: 5000\r\n\r\n".to_vec();
    let head_len = post.len();
    post.extend(std::iter::repeat_n(b'a', 5000));
    let mut big = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'b', 100_000));
    let steps = [
        Step::Open(Role::Server),
        trunc(Direction::Ingress, &post, head_len + 10),
        trunc(Direction::Egress, &big, 100),
        inn(&get("/next")),
        out(&resp(200, "ok")),
    ];
    // Split points only matter around captured bytes; fixtures this big are checked at a
    // sample of split points to keep the test fast.
    let exps = [
        exp("POST", "/u", Some(200), OK, (1, 0), last_byte(&steps, 2)),
        exp("GET", "/next", Some(200), OK, (3, 0), last_byte(&steps, 4)),
    ];
    let base = check_one(&steps, &[], &ConnLimits::default(), &exps, n_ok(2), None);
    let ranges: Vec<(usize, usize)> = step_ranges(&steps).into_iter().flatten().collect();
    let total = ranges.last().unwrap().1;
    for p in (1..total).filter(|p| p % 97 == 0 || *p < head_len + 20 || (5000..5200).contains(p)) {
        if ranges.iter().any(|r| p > r.0 && p < r.1) {
            check_one(
                &steps,
                &[p],
                &ConnLimits::default(),
                &exps,
                n_ok(2),
                Some(&base),
            );
        }
    }
}

#[test]
fn sendfile_like_empty_data_inside_body() {
    let steps = [
        Step::Open(Role::Server),
        inn(&get("/file")),
        out(b"HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n"),
        trunc(Direction::Egress, &[0u8; 20000], 0),
        inn(&get("/next")),
        out(&resp(200, "ok")),
    ];
    let exps = [
        exp("GET", "/file", Some(200), OK, (1, 0), last_byte(&steps, 3)),
        exp("GET", "/next", Some(200), OK, (4, 0), last_byte(&steps, 5)),
    ];
    let base = check_one(&steps, &[], &ConnLimits::default(), &exps, n_ok(2), None);
    // Split the head events everywhere, the sendfile event at a few places.
    let ranges: Vec<(usize, usize)> = step_ranges(&steps).into_iter().flatten().collect();
    for p in 1..ranges.last().unwrap().1 {
        let in_sendfile = p > ranges[2].0 && p < ranges[2].1;
        if ranges.iter().any(|r| p > r.0 && p < r.1) && (!in_sendfile || p % 1000 == 0) {
            check_one(
                &steps,
                &[p],
                &ConnLimits::default(),
                &exps,
                n_ok(2),
                Some(&base),
            );
        }
    }
}

#[test]
fn gap_inside_request_head_resyncs() {
    let r1 = format!("GET /lost HTTP/1.1\r\nHost: h\r\ntraceparent: {TP}\r\n\r\n");
    let (a, b) = r1.as_bytes().split_at(10);
    let steps = [
        Step::Open(Role::Server),
        inn(&get("/first")),
        out(&resp(200, "1")),
        lost(Direction::Ingress, a),
        inn(b),
        out(&resp(200, "lost's response")),
        inn(&get("/after")),
        out(&resp(200, "3")),
    ];
    check(
        &steps,
        &[
            exp("GET", "/first", Some(200), OK, (1, 0), last_byte(&steps, 2)),
            exp("GET", "/after", Some(200), OK, (6, 0), last_byte(&steps, 7)),
        ],
        Counts {
            exchanges: 2,
            resyncs: 1,
            dropped: 1,
            ..Counts::default()
        },
    );
}

#[test]
fn gap_inside_response_head_gives_unparseable_exchange() {
    let r = resp(200, "lost");
    let (a, b) = r.split_at(12);
    let steps = [
        Step::Open(Role::Server),
        inn(&get("/1")),
        lost(Direction::Egress, a),
        out(b),
        inn(&get("/2")),
        out(&resp(404, "nope")),
    ];
    let got = check(
        &steps,
        &[
            exp(
                "GET",
                "/1",
                None,
                Outcome::ResponseUnparseable,
                (1, 0),
                (3, 0),
            ),
            exp("GET", "/2", Some(404), OK, (4, 0), last_byte(&steps, 5)),
        ],
        Counts {
            exchanges: 2,
            resyncs: 1,
            ..Counts::default()
        },
    );
    assert_eq!(got[0].response_tid, 0);
}

#[test]
fn lost_whole_response_detected_at_next_one() {
    // Response 1 lost entirely; the gap is noticed when response 2 arrives.
    let steps = [
        Step::Open(Role::Server),
        inn(&get("/1")),
        lost(Direction::Egress, &resp(200, "one")),
        inn(&get("/2")),
        out(&resp(200, "two")),
    ];
    check(
        &steps,
        &[
            exp(
                "GET",
                "/1",
                None,
                Outcome::ResponseUnparseable,
                (1, 0),
                (4, 0),
            ),
            exp("GET", "/2", Some(200), OK, (3, 0), last_byte(&steps, 4)),
        ],
        Counts {
            exchanges: 2,
            resyncs: 1,
            ..Counts::default()
        },
    );
}

#[test]
fn gap_inside_body_is_harmless() {
    let mut r = b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n".to_vec();
    r.extend([b'x'; 300]);
    let (a, rest) = r.split_at(100);
    let (b, c) = rest.split_at(150);
    let steps = [
        Step::Open(Role::Server),
        inn(&get("/1")),
        out(a),
        lost(Direction::Egress, b),
        out(c),
        inn(&get("/2")),
        out(&resp(200, "two")),
    ];
    check(
        &steps,
        &[
            exp("GET", "/1", Some(200), OK, (1, 0), last_byte(&steps, 4)),
            exp("GET", "/2", Some(200), OK, (5, 0), last_byte(&steps, 6)),
        ],
        n_ok(2),
    );
}

#[test]
fn chunk_header_in_uncaptured_bytes_loses_sync() {
    // One write holds several chunks; only the first is captured, so the next chunk header is
    // in missing bytes: that response is unparseable, the next exchange is fine.
    let mut body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        body.extend(b"10\r\n0123456789abcdef\r\n");
    }
    body.extend(b"0\r\n\r\n");
    let cap = body.len() - 40;
    let steps = [
        Step::Open(Role::Server),
        inn(&get("/1")),
        trunc(Direction::Egress, &body, cap),
        inn(&get("/2")),
        out(&resp(200, "two")),
    ];
    let got = check(
        &steps,
        &[
            exp(
                "GET",
                "/1",
                Some(200),
                Outcome::ResponseUnparseable,
                (1, 0),
                (2, 0),
            ),
            exp("GET", "/2", Some(200), OK, (3, 0), last_byte(&steps, 4)),
        ],
        Counts {
            exchanges: 2,
            resyncs: 1,
            ..Counts::default()
        },
    );
    assert!(got[0].response.as_ref().unwrap().chunked);
}

fn prng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut r = prng(seed);
    let mut v: Vec<u8> = (0..n).map(|_| r() as u8).collect();
    if let Some(b) = v.first_mut() {
        *b = 0x01; // never a plausible message start
    }
    v
}

const TLS_CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x8a\x1b\x22\x90\
    \x00\x00\x20\x13\x01\x13\x02\x13\x03\xc0\x2b\xc0\x2f";
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00";

fn not_http() -> Counts {
    Counts {
        not_http: 1,
        ..Counts::default()
    }
}

#[test]
fn garbage_connections_are_not_http() {
    for role in [Role::Server, Role::Client, Role::Unknown] {
        for first in [TLS_CLIENT_HELLO, H2_PREFACE] {
            let steps = [
                Step::Open(role),
                inn(first),
                out(b"\x17\x03\x03\x00\x10garbage-reply"),
                inn(&get("/never-parsed")),
                Step::Close,
            ];
            if role == Role::Unknown {
                // Joined mid-stream: recognised by a signature in the first event seen, so
                // only whole records are checked.
                let (got, c, _) = run(&steps, &[], &ConnLimits::default());
                assert!(got.is_empty());
                assert_eq!(c, not_http());
            } else {
                check(&steps, &[], not_http());
            }
        }
    }
    // Random bytes on a connection seen opening: not HTTP at the first byte.
    let steps = [
        Step::Open(Role::Server),
        inn(&random_bytes(1, 200)),
        out(&random_bytes(2, 50)),
        Step::Close,
    ];
    check(&steps, &[], not_http());
}

#[test]
fn random_bytes_on_preexisting_connection_are_given_up() {
    // A connection sonde did not see open may be joined mid-message: it gets a few events to
    // show a message start before it is given up.
    let mut steps = vec![Step::Open(Role::Unknown)];
    for i in 0..80 {
        steps.push(inn(&random_bytes(10 + i, 40)));
    }
    steps.push(inn(&get("/too-late")));
    steps.push(out(&resp(200, "")));
    let limits = ConnLimits::default();
    let (got, c, _) = run(&steps, &[], &limits);
    assert!(got.is_empty());
    assert_eq!(c, not_http());
}

#[test]
fn garbage_mid_stream_then_valid_request_resyncs() {
    let steps = [
        Step::Open(Role::Server),
        inn(&get("/1")),
        out(&resp(200, "1")),
        inn(b"\x00\x01garbage that is not http\x7f\xff"),
        out(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"),
        inn(&get("/2")),
        out(&resp(200, "2")),
    ];
    check(
        &steps,
        &[
            exp("GET", "/1", Some(200), OK, (1, 0), last_byte(&steps, 2)),
            exp("GET", "/2", Some(200), OK, (5, 0), last_byte(&steps, 6)),
        ],
        Counts {
            exchanges: 2,
            resyncs: 1,
            ..Counts::default()
        },
    );
}

#[test]
fn garbage_that_never_resyncs_abandons_the_connection() {
    let mut steps = vec![
        Step::Open(Role::Server),
        inn(&get("/1")),
        out(&resp(200, "1")),
    ];
    for i in 0..70 {
        steps.push(inn(&random_bytes(100 + i, 30)));
    }
    steps.push(inn(&get("/ignored")));
    let (got, c, len) = run(&steps, &[], &ConnLimits::default());
    assert_eq!(got.len(), 1);
    assert_eq!(
        c,
        Counts {
            exchanges: 1,
            resyncs: 1,
            not_http: 1,
            ..Counts::default()
        }
    );
    assert_eq!(len, 1, "kept (ignored) until it closes");
}

#[test]
fn unknown_role_server_detected_from_traffic() {
    // Pre-existing connection, joined in the middle of a response body.
    let steps = [
        Step::Open(Role::Unknown),
        out(b"tail of a body from before sonde started"),
        inn(&get("/1")),
        out(&resp(200, "1")),
    ];
    let got = check(
        &steps,
        &[exp(
            "GET",
            "/1",
            Some(200),
            OK,
            (2, 0),
            last_byte(&steps, 3),
        )],
        n_ok(1),
    );
    assert_eq!(got[0].side, Side::Server);
}

#[test]
fn connection_never_opened_is_tracked_as_unknown() {
    // The Open event was lost; the first message is a request going out: client side.
    let steps = [
        out(&get("/c")),
        inn(&resp(200, "c")),
        out(&get("/d")),
        inn(&resp(200, "d")),
    ];
    let got = check(
        &steps,
        &[
            exp("GET", "/c", Some(200), OK, (0, 0), last_byte(&steps, 1)),
            exp("GET", "/d", Some(200), OK, (2, 0), last_byte(&steps, 3)),
        ],
        n_ok(2),
    );
    assert_eq!(got[0].side, Side::Client);
    assert_eq!((got[0].local, got[0].remote), (None, None));
}

#[test]
fn unknown_role_client_detected_from_response_first() {
    // Joined while a response was coming in: the ingress response says "client side".
    let steps = [
        Step::Open(Role::Unknown),
        inn(&resp(200, "orphan")),
        out(&get("/next")),
        inn(&resp(200, "n")),
    ];
    let got = check(
        &steps,
        &[exp(
            "GET",
            "/next",
            Some(200),
            OK,
            (2, 0),
            last_byte(&steps, 3),
        )],
        n_ok(1),
    );
    assert_eq!(got[0].side, Side::Client);
}

#[test]
fn client_side_egress_requests() {
    let req = format!(
        "POST /api HTTP/1.1\r\nHost: svc\r\ntraceparent: {TP}\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    let steps = [
        Step::Open(Role::Client),
        out(req.as_bytes()),
        inn(&resp(200, "ok")),
    ];
    let got = check(
        &steps,
        &[exp(
            "POST",
            "/api",
            Some(200),
            OK,
            (1, 0),
            last_byte(&steps, 2),
        )],
        n_ok(1),
    );
    let x = &got[0];
    assert_eq!(x.side, Side::Client);
    assert_eq!((x.request_tid, x.response_tid), (OUT_TID, IN_TID));
    assert_eq!(x.request.traceparent.as_deref(), Some(TP));
}

#[test]
fn close_with_pending_request() {
    let steps = [Step::Open(Role::Server), inn(&get("/slow")), Step::Close];
    let got = check(
        &steps,
        &[exp(
            "GET",
            "/slow",
            None,
            Outcome::ConnectionClosed,
            (1, 0),
            (2, 0),
        )],
        n_ok(1),
    );
    assert_eq!(got[0].response_tid, 0);
}

#[test]
fn close_during_response_body_keeps_the_head() {
    let steps = [
        Step::Open(Role::Server),
        inn(&get("/partial")),
        out(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 100\r\n\r\nonly some"),
        Step::Close,
    ];
    check(
        &steps,
        &[exp(
            "GET",
            "/partial",
            Some(502),
            Outcome::ConnectionClosed,
            (1, 0),
            (3, 0),
        )],
        n_ok(1),
    );
}

#[test]
fn server_errors_and_not_found() {
    let steps = [
        Step::Open(Role::Server),
        inn(&get("/missing")),
        out(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found"),
        inn(b"DELETE /x HTTP/1.1\r\n\r\n"),
        out(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"),
    ];
    check(
        &steps,
        &[
            exp(
                "GET",
                "/missing",
                Some(404),
                OK,
                (1, 0),
                last_byte(&steps, 2),
            ),
            exp("DELETE", "/x", Some(500), OK, (3, 0), last_byte(&steps, 4)),
        ],
        n_ok(2),
    );
}

#[test]
fn unknown_method_token_is_accepted_with_http_version() {
    let steps = [
        Step::Open(Role::Unknown),
        inn(b"PROPFIND /dav HTTP/1.1\r\nDepth: 1\r\n\r\n"),
        out(&resp(207, "")),
    ];
    check(
        &steps,
        &[exp(
            "PROPFIND",
            "/dav",
            Some(207),
            OK,
            (1, 0),
            last_byte(&steps, 2),
        )],
        n_ok(1),
    );
}

#[test]
fn head_larger_than_limit_is_dropped() {
    let limits = ConnLimits {
        max_head_bytes: 1024,
        ..ConnLimits::default()
    };
    let big = format!("GET /big HTTP/1.1\r\n{}\r\n", filler_headers(2000));
    let steps = [
        Step::Open(Role::Server),
        inn(big.as_bytes()),
        out(b"HTTP/1.1 431 Too Large\r\nContent-Length: 0\r\n\r\n"),
        inn(&get("/small")),
        out(&resp(200, "s")),
    ];
    check_with(
        &steps,
        &limits,
        &[exp(
            "GET",
            "/small",
            Some(200),
            OK,
            (3, 0),
            last_byte(&steps, 4),
        )],
        Counts {
            exchanges: 1,
            resyncs: 1,
            dropped: 1,
            ..Counts::default()
        },
    );
}

#[test]
fn switching_protocols_ends_http() {
    let steps = [
        Step::Open(Role::Server),
        inn(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
        out(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
        inn(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"),
        out(b"\x81\x05hello"),
        Step::Close,
    ];
    check(
        &steps,
        &[exp(
            "GET",
            "/ws",
            Some(101),
            OK,
            (1, 0),
            last_byte(&steps, 2),
        )],
        n_ok(1),
    );
}

#[test]
fn connect_tunnel_ends_http() {
    let steps = [
        Step::Open(Role::Client),
        out(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
        inn(b"HTTP/1.1 200 Connection established\r\n\r\n"),
        out(TLS_CLIENT_HELLO),
        inn(b"\x16\x03\x03\x00\x10server hello...."),
        Step::Close,
    ];
    check(
        &steps,
        &[exp(
            "CONNECT",
            "example.com:443",
            Some(200),
            OK,
            (1, 0),
            last_byte(&steps, 2),
        )],
        n_ok(1),
    );
}

#[test]
fn pipelined_response_loss_drops_ambiguous_requests() {
    let reqs = [get("/a"), get("/b"), get("/c")].concat();
    let steps = [
        Step::Open(Role::Server),
        inn(&get("/0")),
        inn(&get("/00")),
        out(&[resp(200, "0"), resp(200, "00")].concat()), // pipelining observed
        inn(&reqs),
        lost(Direction::Egress, &resp(200, "a")),
        out(&resp(200, "b")),
        out(&resp(200, "c")),
        inn(&get("/d")),
        out(&resp(200, "d")),
    ];
    check(
        &steps,
        &[
            exp(
                "GET",
                "/0",
                Some(200),
                OK,
                (1, 0),
                (3, resp(200, "0").len() - 1),
            ),
            exp("GET", "/00", Some(200), OK, (2, 0), last_byte(&steps, 3)),
            exp(
                "GET",
                "/a",
                None,
                Outcome::ResponseUnparseable,
                (4, 0),
                (6, 0),
            ),
            exp("GET", "/d", Some(200), OK, (8, 0), last_byte(&steps, 9)),
        ],
        Counts {
            exchanges: 4,
            resyncs: 1,
            dropped: 2,
            ..Counts::default()
        },
    );
}

#[test]
fn pipeline_overflow_drops_oldest_waiting_requests() {
    let limits = ConnLimits {
        max_pipelined: 2,
        ..ConnLimits::default()
    };
    let steps = [
        Step::Open(Role::Server),
        inn(&[get("/1"), get("/2"), get("/3")].concat()),
        out(&[resp(200, "1"), resp(200, "2"), resp(200, "3")].concat()),
    ];
    let (got, c, _) = run(&steps, &[], &limits);
    // /1 was dropped to make room: its response is skipped, /2 and /3 keep their own.
    let paths: Vec<_> = got.iter().map(|x| x.request.target.as_str()).collect();
    assert_eq!(paths, ["/2", "/3"]);
    assert_eq!(c.dropped, 1);
}

#[test]
fn open_for_known_conn_is_ignored_and_new_generation_ends_old() {
    let stats = Stats::default();
    let mut outv = Vec::new();
    let mut t = ConnTable::new(ConnLimits::default());
    let open = |conn: ConnId, ts| {
        Event::Open(OpenInfo {
            conn,
            ts_ns: ts,
            tid: 1,
            role: Role::Server,
            local: None,
            remote: None,
            comm: [0; 16],
        })
    };
    let req = get("/g1");
    let d = |conn: ConnId, ts, data: &'static [u8]| {
        Event::Data(DataInfo {
            ctx: Default::default(),
            conn,
            ts_ns: ts,
            tid: 5,
            dir: Direction::Ingress,
            pos: 0,
            len: data.len() as u64,
            data,
        })
    };
    t.on_event(&open(C, 1), &stats, &mut outv);
    let req: &'static [u8] = Box::leak(req.into_boxed_slice());
    t.on_event(&d(C, 2, req), &stats, &mut outv);
    t.on_event(&open(C, 3), &stats, &mut outv); // duplicate: ignored
    assert!(outv.is_empty());
    let c2 = ConnId { generation: 2, ..C };
    t.on_event(&open(c2, 10), &stats, &mut outv);
    assert_eq!(outv.len(), 1);
    assert_eq!(outv[0].outcome, Outcome::ConnectionClosed);
    assert_eq!(
        outv[0].end_ns, 2,
        "ended at the old connection's last activity"
    );
    // Stale events of the old generation are ignored.
    t.on_event(&d(C, 11, req), &stats, &mut outv);
    t.on_event(&Event::Close { conn: C, ts_ns: 12 }, &stats, &mut outv);
    assert_eq!((outv.len(), t.len()), (1, 1));
    t.on_event(
        &Event::Close {
            conn: c2,
            ts_ns: 13,
        },
        &stats,
        &mut outv,
    );
    assert!(t.is_empty());
}

fn pending_get(t: &mut ConnTable, stats: &Stats, outv: &mut Vec<Exchange>, conn: ConnId, ts: u64) {
    static REQ: &[u8] = b"GET /p HTTP/1.1\r\n\r\n";
    t.on_event(
        &Event::Open(OpenInfo {
            conn,
            ts_ns: ts,
            tid: 1,
            role: Role::Server,
            local: None,
            remote: None,
            comm: [0; 16],
        }),
        stats,
        outv,
    );
    t.on_event(
        &Event::Data(DataInfo {
            ctx: Default::default(),
            conn,
            ts_ns: ts,
            tid: 1,
            dir: Direction::Ingress,
            pos: 0,
            len: REQ.len() as u64,
            data: REQ,
        }),
        stats,
        outv,
    );
}

#[test]
fn eviction_at_max_conns_ends_least_recently_active() {
    let stats = Stats::default();
    let mut outv = Vec::new();
    let mut t = ConnTable::new(ConnLimits {
        max_conns: 2,
        ..ConnLimits::default()
    });
    let id = |fd| ConnId {
        tgid: 1,
        fd,
        generation: 1,
    };
    pending_get(&mut t, &stats, &mut outv, id(1), 10);
    pending_get(&mut t, &stats, &mut outv, id(2), 20);
    // Activity on fd 1 makes fd 2 the least recently active.
    t.on_event(
        &Event::Open(OpenInfo {
            conn: id(1),
            ts_ns: 25,
            tid: 1,
            role: Role::Server,
            local: None,
            remote: None,
            comm: [0; 16],
        }),
        &stats,
        &mut outv,
    );
    t.on_event(
        &Event::Data(DataInfo {
            ctx: Default::default(),
            conn: id(1),
            ts_ns: 26,
            tid: 1,
            dir: Direction::Egress,
            pos: 0,
            len: 0,
            data: b"",
        }),
        &stats,
        &mut outv,
    );
    pending_get(&mut t, &stats, &mut outv, id(3), 30);
    assert_eq!(t.len(), 2);
    assert_eq!(outv.len(), 1);
    assert_eq!(outv[0].conn, id(2));
    assert_eq!(outv[0].outcome, Outcome::ConnectionClosed);
    assert_eq!(counts(&stats).evicted, 1);
}

#[test]
fn process_exit_ends_all_its_connections() {
    let stats = Stats::default();
    let mut outv = Vec::new();
    let mut t = ConnTable::new(ConnLimits::default());
    for (tgid, fd) in [(1, 3), (1, 4), (2, 3), (1, 9)] {
        let conn = ConnId {
            tgid,
            fd,
            generation: 5,
        };
        pending_get(&mut t, &stats, &mut outv, conn, 10);
    }
    // What the pipeline hands the kernel side to forget.
    let mut ids = Vec::new();
    t.conns_of(1, &mut ids);
    let mut fds: Vec<u32> = ids.iter().map(|c| c.fd).collect();
    fds.sort_unstable();
    assert_eq!(fds, [3, 4, 9]);
    assert!(ids.iter().all(|c| c.tgid == 1 && c.generation == 5));
    t.on_event(
        &Event::ProcessExit { tgid: 1, ts_ns: 50 },
        &stats,
        &mut outv,
    );
    assert_eq!(outv.len(), 3);
    assert!(outv.iter().all(|x| x.conn.tgid == 1 && x.end_ns == 50));
    assert!(outv.iter().all(|x| x.outcome == Outcome::ConnectionClosed));
    assert_eq!(t.len(), 1);
    ids.clear();
    t.conns_of(1, &mut ids);
    assert!(ids.is_empty());
    t.on_event(
        &Event::ProcessExit { tgid: 1, ts_ns: 60 },
        &stats,
        &mut outv,
    );
    t.on_event(
        &Event::ProcessExit { tgid: 2, ts_ns: 70 },
        &stats,
        &mut outv,
    );
    assert_eq!((outv.len(), t.len()), (4, 0));
}

#[test]
fn expire_and_drain() {
    let stats = Stats::default();
    let mut outv = Vec::new();
    let mut t = ConnTable::new(ConnLimits {
        idle_timeout_ns: 1000,
        ..ConnLimits::default()
    });
    let id = |fd| ConnId {
        tgid: 1,
        fd,
        generation: 1,
    };
    pending_get(&mut t, &stats, &mut outv, id(1), 100);
    pending_get(&mut t, &stats, &mut outv, id(2), 900);
    t.expire(1050, &stats, &mut outv);
    assert!(outv.is_empty());
    t.expire(1500, &stats, &mut outv);
    assert_eq!(outv.len(), 1);
    assert_eq!(
        (outv[0].conn, outv[0].outcome.clone(), outv[0].end_ns),
        (id(1), Outcome::TimedOut, 1500)
    );
    assert_eq!(t.len(), 1);
    t.drain(&stats, &mut outv);
    assert_eq!(outv.len(), 2);
    assert_eq!(
        (outv[1].conn, outv[1].outcome.clone(), outv[1].end_ns),
        (id(2), Outcome::ConnectionClosed, 900)
    );
    assert!(t.is_empty());
    assert_eq!(counts(&stats).exchanges, 2);
}

#[test]
fn duplicate_and_overlapping_events_are_tolerated() {
    let req = get("/dup");
    let r = resp(200, "ok");
    let stats = Stats::default();
    let mut outv = Vec::new();
    let mut t = ConnTable::new(ConnLimits::default());
    fn ev(dir: Direction, pos: u64, data: &[u8]) -> DataInfo<'_> {
        DataInfo {
            ctx: Default::default(),
            conn: C,
            ts_ns: 5,
            tid: 1,
            dir,
            pos,
            len: data.len() as u64,
            data,
        }
    }
    t.on_event(
        &Event::Data(ev(Direction::Ingress, 0, &req[..10])),
        &stats,
        &mut outv,
    );
    t.on_event(
        &Event::Data(ev(Direction::Ingress, 0, &req[..10])),
        &stats,
        &mut outv,
    );
    t.on_event(
        &Event::Data(ev(Direction::Ingress, 5, &req[5..])),
        &stats,
        &mut outv,
    );
    t.on_event(
        &Event::Data(ev(Direction::Egress, 0, &r)),
        &stats,
        &mut outv,
    );
    assert_eq!(outv.len(), 1);
    assert_eq!(outv[0].request.target, "/dup");
}

/// Random bytes, random valid-looking fragments, random splits, gaps, truncation, events on
/// several connections, random closes: nothing may panic and the table stays bounded.
#[test]
fn fuzz_random_input_never_panics() {
    let fragments: [&[u8]; 14] = [
        b"GET / HTTP/1.1\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"Content-Length: 5\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"\r\n",
        b"5\r\nhello\r\n",
        b"0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HEAD /h HTTP/1.0\r\n\r\n",
        b"fffffffffffffffff\r\n",
        b"HTTP/1.1 101 Switching\r\n\r\n",
        b"Content-Length: 99999999999999999999\r\n",
        b"\x16\x03\x01",
        b"POST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    ];
    let limits = ConnLimits {
        max_conns: 8,
        max_head_bytes: 512,
        max_pipelined: 4,
        idle_timeout_ns: 10_000,
    };
    for seed in 0..300u64 {
        let mut r = prng(seed + 1);
        let stats = Stats::default();
        let mut outv = Vec::new();
        let mut t = ConnTable::new(limits.clone());
        let mut pos = [[0u64; 2]; 12];
        let mut ts = 0u64;
        for _ in 0..300 {
            ts += r() % 500;
            let fd = (r() % 12) as u32;
            let conn = ConnId {
                tgid: (fd % 3) + 1,
                fd,
                generation: 1 + r().is_multiple_of(50) as u64,
            };
            match r() % 20 {
                0 => t.on_event(
                    &Event::Open(OpenInfo {
                        conn,
                        ts_ns: ts,
                        tid: 1,
                        role: [Role::Server, Role::Client, Role::Unknown][(r() % 3) as usize],
                        local: None,
                        remote: None,
                        comm: [0; 16],
                    }),
                    &stats,
                    &mut outv,
                ),
                1 => {
                    t.on_event(&Event::Close { conn, ts_ns: ts }, &stats, &mut outv);
                    pos[fd as usize] = [0, 0];
                }
                2 => t.on_event(
                    &Event::ProcessExit {
                        tgid: conn.tgid,
                        ts_ns: ts,
                    },
                    &stats,
                    &mut outv,
                ),
                3 => t.expire(ts, &stats, &mut outv),
                _ => {
                    let mut buf = Vec::new();
                    for _ in 0..(r() % 6) {
                        if r().is_multiple_of(3) {
                            let n = (r() % 64) as usize;
                            buf.extend((0..n).map(|_| r() as u8));
                        } else {
                            buf.extend_from_slice(fragments[(r() % 14) as usize]);
                        }
                    }
                    let dir = if r().is_multiple_of(2) {
                        Direction::Ingress
                    } else {
                        Direction::Egress
                    };
                    let p = &mut pos[fd as usize][dir_index(dir)];
                    // Occasional gaps, rewinds and huge lengths.
                    match r() % 10 {
                        0 => *p = p.saturating_add(r() % 100),
                        1 => *p = p.saturating_sub(r() % 10),
                        _ => {}
                    }
                    let extra = match r() % 10 {
                        0 => r() % 100_000,
                        1 => u64::MAX / 2,
                        _ => 0,
                    };
                    let cap = (r() as usize) % (buf.len() + 1);
                    let data = if r().is_multiple_of(4) {
                        &buf[..cap]
                    } else {
                        &buf[..]
                    };
                    let len = buf.len() as u64 + extra;
                    t.on_event(
                        &Event::Data(DataInfo {
                            ctx: Default::default(),
                            conn,
                            ts_ns: ts,
                            tid: 2,
                            dir,
                            pos: *p,
                            len,
                            data,
                        }),
                        &stats,
                        &mut outv,
                    );
                    *p = p.saturating_add(len);
                }
            }
            assert!(t.len() <= limits.max_conns);
        }
        t.drain(&stats, &mut outv);
        assert!(t.is_empty());
        assert_eq!(counts(&stats).exchanges, outv.len() as u64);
    }
}

/// Every fixture byte stream, cut into random pieces with random gaps and truncation: no
/// panic, and exchanges are never invented out of nothing.
#[test]
fn fuzz_fixture_streams_with_random_loss() {
    let stream_in = [
        get("/1"),
        get("/2"),
        b"POST /3 HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd".to_vec(),
    ]
    .concat();
    let stream_out = [
        resp(200, "1"),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n".to_vec(),
        resp(201, ""),
    ]
    .concat();
    for seed in 0..2000u64 {
        let mut r = prng(seed + 7);
        let stats = Stats::default();
        let mut outv = Vec::new();
        let mut t = ConnTable::new(ConnLimits::default());
        let mut at = [0usize; 2];
        let streams = [&stream_in, &stream_out];
        let mut ts = 0;
        while at[0] < stream_in.len() || at[1] < stream_out.len() {
            let d = (r() % 2) as usize;
            let s = streams[d];
            if at[d] >= s.len() {
                continue;
            }
            let n = 1 + (r() as usize) % (s.len() - at[d]);
            let piece = &s[at[d]..at[d] + n];
            ts += 1;
            if !r().is_multiple_of(8) {
                let cap = if r().is_multiple_of(6) {
                    (r() as usize) % (n + 1)
                } else {
                    n
                };
                t.on_event(
                    &Event::Data(DataInfo {
                        ctx: Default::default(),
                        conn: C,
                        ts_ns: ts,
                        tid: 1,
                        dir: if d == 0 {
                            Direction::Ingress
                        } else {
                            Direction::Egress
                        },
                        pos: at[d] as u64,
                        len: n as u64,
                        data: &piece[..cap],
                    }),
                    &stats,
                    &mut outv,
                );
            }
            at[d] += n;
        }
        t.on_event(
            &Event::Close {
                conn: C,
                ts_ns: ts + 1,
            },
            &stats,
            &mut outv,
        );
        assert!(outv.len() <= 3, "seed {seed}: {outv:#?}");
        for x in &outv {
            assert!(["/1", "/2", "/3"].contains(&x.request.target.as_str()));
            assert!(x.end_ns >= x.start_ns);
        }
    }
}

/// Throughput of the simplest traffic: a small GET and a small Content-Length response, one
/// event each, on 1000 keep-alive connections. Run with
/// `cargo test --release -p agent --lib conn::tests::throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput() {
    let req = b"GET /api/v1/items?id=42 HTTP/1.1\r\nHost: svc.local\r\nUser-Agent: bench/1.0\r\n\
        Accept: */*\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n";
    let resp = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\
        Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\n{\"ok\": true }";
    let conns = 1000u32;
    let rounds = 1000u64;
    let stats = Stats::default();
    let mut outv = Vec::with_capacity(1024);
    let mut t = ConnTable::new(ConnLimits::default());
    let start = std::time::Instant::now();
    let mut ts = 0;
    for round in 0..rounds {
        for fd in 0..conns {
            let conn = ConnId {
                tgid: 1 + fd % 16,
                fd,
                generation: 1,
            };
            ts += 1;
            for (dir, data, n) in [
                (Direction::Ingress, &req[..], req.len() as u64),
                (Direction::Egress, &resp[..], resp.len() as u64),
            ] {
                t.on_event(
                    &Event::Data(DataInfo {
                        ctx: Default::default(),
                        conn,
                        ts_ns: ts,
                        tid: 1,
                        dir,
                        pos: round * n,
                        len: n,
                        data,
                    }),
                    &stats,
                    &mut outv,
                );
            }
            if outv.len() >= 1024 {
                outv.clear();
            }
        }
    }
    let el = start.elapsed();
    let n = u64::from(conns) * rounds;
    assert_eq!(counts(&stats).exchanges, n);
    println!(
        "{n} exchanges in {el:?}: {:.0} exchanges/s",
        n as f64 / el.as_secs_f64()
    );
}

#[test]
fn unknown_role_pipelined_requests_pair_fifo() {
    let (r1, r2) = (get("/p1"), get("/p2"));
    let steps = [
        Step::Open(Role::Unknown),
        inn(&[r1.clone(), r2.clone(), get("/p3")].concat()),
        out(&resp(200, "1")),
        out(&[resp(201, "2"), resp(202, "3")].concat()),
    ];
    check(
        &steps,
        &[
            exp("GET", "/p1", Some(200), OK, (1, 0), last_byte(&steps, 2)),
            exp(
                "GET",
                "/p2",
                Some(201),
                OK,
                (1, r1.len()),
                (3, resp(201, "2").len() - 1),
            ),
            exp(
                "GET",
                "/p3",
                Some(202),
                OK,
                (1, r1.len() + r2.len()),
                last_byte(&steps, 3),
            ),
        ],
        n_ok(3),
    );
}

#[test]
fn early_hints_and_stray_crlf_between_messages() {
    let steps = [
        Step::Open(Role::Server),
        // Some old clients send CRLF after a body; servers ignore it.
        inn(b"POST /form HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\r\n"),
        out(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"),
        out(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        inn(&get("/again")),
        out(&resp(200, "")),
    ];
    check(
        &steps,
        &[
            exp("POST", "/form", Some(200), OK, (1, 0), last_byte(&steps, 3)),
            exp("GET", "/again", Some(200), OK, (4, 0), last_byte(&steps, 5)),
        ],
        n_ok(2),
    );
}

#[test]
fn joined_mid_download_waits_for_next_response() {
    // Pre-existing connection: a long response body is in flight when sonde starts. The
    // request direction is in sync; the response direction waits for a message start as long
    // as it takes instead of giving the connection up.
    let mut steps = vec![Step::Open(Role::Unknown)];
    for i in 0..100 {
        steps.push(out(&random_bytes(500 + i, 16 * 1024)));
        if i == 0 {
            steps.push(inn(&get("/next")));
        }
    }
    steps.push(out(&resp(200, "n")));
    let n = steps.len();
    let (got, c, _) = run(&steps, &[], &ConnLimits::default());
    assert_eq!(c, n_ok(1));
    assert_eq!(got[0].request.target, "/next");
    assert_eq!(got[0].end_ns, base_ts(n - 1));
}

#[test]
fn pipelined_request_loss_skips_its_response() {
    let steps = [
        Step::Open(Role::Server),
        inn(&get("/0")),
        inn(&get("/00")),
        out(&[resp(200, "0"), resp(200, "00")].concat()), // pipelining observed
        inn(&get("/a")),
        lost(Direction::Ingress, &get("/b")),
        inn(&get("/c")),
        out(&resp(200, "a")),
        out(&resp(404, "b")),
        out(&resp(500, "c")),
    ];
    check(
        &steps,
        &[
            exp(
                "GET",
                "/0",
                Some(200),
                OK,
                (1, 0),
                (3, resp(200, "0").len() - 1),
            ),
            exp("GET", "/00", Some(200), OK, (2, 0), last_byte(&steps, 3)),
            exp("GET", "/a", Some(200), OK, (4, 0), last_byte(&steps, 7)),
            exp("GET", "/c", Some(500), OK, (6, 0), last_byte(&steps, 9)),
        ],
        Counts {
            exchanges: 4,
            resyncs: 1,
            dropped: 1,
            ..Counts::default()
        },
    );
}
