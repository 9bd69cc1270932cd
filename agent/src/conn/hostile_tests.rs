//! Hostile and malformed traffic: bad chunk sizes, absurd Content-Lengths, header bombs, NUL
//! bytes, binary garbage, TLS and HTTP/2 on a plain port, slowloris, responses nobody asked
//! for, thousands of pipelined requests.
//!
//! Each case checks what a user would expect to see (exchanges and counters), that nothing
//! panics, that memory stays bounded (heap bytes live on the test's thread are measured by a
//! tracking allocator) and that valid traffic after the garbage is traced again whenever it
//! can be: on the same connection once it resynchronises, or else on a new one. The same
//! messages seed the `http1_parse` and `conn_stream` fuzz targets (`agent/fuzz`).
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;

use agent_common::{MAX_CAPTURE, ROLE_CLIENT, ROLE_SERVER, ROLE_UNKNOWN};

use super::*;
use crate::events::{Direction, Role, decode, encode};

const TGID: u32 = 300;
const IN: Direction = Direction::Ingress;
const OUT: Direction = Direction::Egress;

/// Heap accounting per thread: each test runs on its own thread, so the bytes live on it are
/// the test's own.
mod heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn add(delta: isize) {
        let _ = LIVE.try_with(|live| {
            let v = live.get() + delta;
            live.set(v);
            let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
        });
    }

    pub struct Tracking;

    // SAFETY: forwards to the system allocator unchanged; only counts.
    unsafe impl GlobalAlloc for Tracking {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            // SAFETY: same contract as ours.
            let p = unsafe { System.alloc(l) };
            if !p.is_null() {
                add(l.size() as isize);
            }
            p
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            // SAFETY: same contract as ours.
            let p = unsafe { System.alloc_zeroed(l) };
            if !p.is_null() {
                add(l.size() as isize);
            }
            p
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            // SAFETY: same contract as ours.
            unsafe { System.dealloc(p, l) };
            add(-(l.size() as isize));
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            // SAFETY: same contract as ours.
            let q = unsafe { System.realloc(p, l, new) };
            if !q.is_null() {
                add(new as isize - l.size() as isize);
            }
            q
        }
    }

    #[global_allocator]
    static A: Tracking = Tracking;

    /// Bytes live on this thread now.
    pub fn live() -> isize {
        LIVE.with(Cell::get)
    }

    /// Runs `f` and returns its result and the peak of bytes live on this thread during it,
    /// above the level at its start.
    pub fn peak<R>(f: impl FnOnce() -> R) -> (R, usize) {
        let base = live();
        PEAK.with(|p| p.set(base));
        let r = f();
        let peak = PEAK.with(Cell::get);
        (r, (peak - base).max(0) as usize)
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

fn counts(exchanges: u64, resyncs: u64, not_http: u64, dropped: u64) -> Counts {
    Counts {
        exchanges,
        resyncs,
        not_http,
        dropped,
        evicted: 0,
    }
}

/// A connection table fed event by event (records built by `events::encode` and decoded, as
/// the pipeline gets them), with per-direction stream positions kept for the caller.
struct Feed {
    table: ConnTable,
    stats: Stats,
    out: Vec<Exchange>,
    /// Exchanges taken out of `out` by [`Feed::flush`].
    flushed: u64,
    pos: HashMap<(u32, usize), u64>,
    ts: u64,
}

impl Feed {
    fn new() -> Self {
        Self::with(ConnLimits::default())
    }

    fn with(limits: ConnLimits) -> Self {
        Feed {
            table: ConnTable::new(limits),
            stats: Stats::default(),
            out: Vec::new(),
            flushed: 0,
            pos: HashMap::new(),
            ts: 1_000_000,
        }
    }

    fn id(fd: u32) -> ConnId {
        ConnId {
            tgid: TGID,
            fd,
            generation: 1,
        }
    }

    fn tick(&mut self) -> u64 {
        self.ts += 1_000;
        self.ts
    }

    fn on(&mut self, record: &[u8]) {
        let ev = decode(record).expect("a valid record");
        self.table.on_event(&ev, &self.stats, &mut self.out);
        self.table.take_starts(&mut Vec::new());
        assert!(self.table.len() <= self.table.limits.max_conns);
        assert_eq!(
            self.out.len() as u64 + self.flushed,
            self.stats.exchanges.load(Relaxed)
        );
    }

    /// Forgets the exchanges so far (keeping `out`'s capacity), and the stream positions of
    /// connection `fd`.
    fn flush(&mut self, fd: u32) {
        self.flushed += self.out.len() as u64;
        self.out.clear();
        self.pos.retain(|k, _| k.0 != fd);
    }

    fn open(&mut self, fd: u32, role: Role) {
        let ts = self.tick();
        let role = match role {
            Role::Server => ROLE_SERVER,
            Role::Client => ROLE_CLIENT,
            Role::Unknown => ROLE_UNKNOWN,
        };
        self.on(&encode::open(
            Self::id(fd),
            ts,
            role,
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:50000".parse().unwrap(),
        ));
    }

    /// One data event of `len` bytes of which `captured` are the captured prefix.
    fn event(&mut self, fd: u32, dir: Direction, captured: &[u8], len: u64) {
        let ts = self.tick();
        let p = self.pos.entry((fd, dir_index(dir))).or_insert(0);
        let at = *p;
        *p = p.saturating_add(len);
        self.on(&encode::data(Self::id(fd), ts, 7, dir, at, len, captured));
    }

    /// `bytes` as events of at most `chunk` bytes, all captured.
    fn send_in(&mut self, fd: u32, dir: Direction, bytes: &[u8], chunk: usize) {
        for c in bytes.chunks(chunk) {
            self.event(fd, dir, c, c.len() as u64);
        }
    }

    /// `bytes` as the kernel would deliver a stream of reads/writes of at most the capture
    /// size each.
    fn send(&mut self, fd: u32, dir: Direction, bytes: &[u8]) {
        self.send_in(fd, dir, bytes, MAX_CAPTURE);
    }

    /// `bytes` in one syscall: only its first `MAX_CAPTURE` bytes are captured.
    fn write_once(&mut self, fd: u32, dir: Direction, bytes: &[u8]) {
        let cap = bytes.len().min(MAX_CAPTURE);
        self.event(fd, dir, &bytes[..cap], bytes.len() as u64);
    }

    fn close(&mut self, fd: u32) {
        let ts = self.tick();
        self.on(&encode::close(Self::id(fd), ts));
    }

    /// A server connection: requests in, responses out.
    fn server(&mut self, fd: u32, exchanges: &[(&[u8], &[u8])]) {
        for (req, resp) in exchanges {
            self.send(fd, IN, req);
            self.send(fd, OUT, resp);
        }
    }

    fn counts(&self) -> Counts {
        let s = &self.stats;
        Counts {
            exchanges: s.exchanges.load(Relaxed),
            resyncs: s.parse_resyncs.load(Relaxed),
            not_http: s.conns_not_http.load(Relaxed),
            dropped: s.requests_dropped.load(Relaxed),
            evicted: s.conns_evicted.load(Relaxed),
        }
    }

    /// (target, status, outcome) of every exchange so far.
    fn seen(&self) -> Vec<(String, Option<u16>, Outcome)> {
        self.out
            .iter()
            .map(|e| {
                (
                    e.request.target.clone(),
                    e.response.as_ref().map(|r| r.status),
                    e.outcome.clone(),
                )
            })
            .collect()
    }
}

fn x(target: &str, status: Option<u16>, outcome: Outcome) -> (String, Option<u16>, Outcome) {
    (target.to_string(), status, outcome)
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").into_bytes()
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

fn chunked_resp(body: &[u8]) -> Vec<u8> {
    [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        body,
    ]
    .concat()
}

/// A fresh server connection `fd` with one good exchange (so that it is known to be HTTP).
fn warmed(f: &mut Feed, fd: u32) {
    f.open(fd, Role::Server);
    f.server(fd, &[(&get("/warm"), OK)]);
}

/// Valid traffic on a new connection is traced whatever happened before.
fn new_connection_still_works(f: &mut Feed, fd: u32) {
    let before = f.out.len();
    f.open(fd, Role::Server);
    f.server(fd, &[(&get("/fresh"), OK)]);
    let last = &f.out[before..];
    assert_eq!(last.len(), 1, "{last:#?}");
    assert_eq!(last[0].request.target, "/fresh");
    assert_eq!(last[0].outcome, Outcome::Complete);
}

#[test]
fn bad_chunk_sizes_lose_the_response_then_resync() {
    for (name, body) in [
        ("non-hex", &b"zz\r\nhello\r\n0\r\n\r\n"[..]),
        ("2^64", b"10000000000000000\r\nx\r\n0\r\n\r\n"),
        ("negative", b"-5\r\nhello\r\n0\r\n\r\n"),
        ("size then garbage", b"5 x\r\nhello\r\n0\r\n\r\n"),
        ("empty", b"\r\nhello\r\n0\r\n\r\n"),
        ("data longer than size", b"2\r\nhello\r\n0\r\n\r\n"),
    ] {
        let mut f = Feed::new();
        warmed(&mut f, 1);
        f.server(1, &[(&get("/bad"), &chunked_resp(body))]);
        // The next exchange on the same connection is traced again.
        f.server(1, &[(&get("/next"), OK)]);
        f.close(1);
        assert_eq!(
            f.seen(),
            [
                x("/warm", Some(200), Outcome::Complete),
                x("/bad", Some(200), Outcome::ResponseUnparseable),
                x("/next", Some(200), Outcome::Complete),
            ],
            "{name}"
        );
        assert_eq!(f.counts(), counts(3, 1, 0, 0), "{name}");
    }
}

#[test]
fn huge_chunk_size_is_skipped_by_count_without_buffering() {
    let mut f = Feed::new();
    f.open(1, Role::Server);
    f.send(1, IN, &get("/huge"));
    let head = chunked_resp(b"ffffffffffffffff\r\n");
    let big = vec![b'z'; 1 << 20];
    let (_, peak) = heap::peak(|| {
        f.send(1, OUT, &head);
        // 8 MiB of "chunk data" in big mostly uncaptured writes, then 1 MiB all captured.
        for _ in 0..8 {
            f.write_once(1, OUT, &big);
        }
        f.send(1, OUT, &big);
    });
    assert!(peak < 64 * 1024, "{peak} bytes");
    f.close(1);
    // The response never ended: the exchange ends with the connection, its status known.
    assert_eq!(f.seen(), [x("/huge", Some(200), Outcome::ConnectionClosed)]);
    assert_eq!(f.counts(), counts(1, 0, 0, 0));
}

#[test]
fn bad_chunk_size_in_a_request_body_keeps_the_request() {
    let mut f = Feed::new();
    warmed(&mut f, 1);
    let req = b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\nabc\r\n0\r\n\r\n";
    f.server(1, &[(req, OK), (&get("/next"), OK)]);
    assert_eq!(
        f.seen(),
        [
            x("/warm", Some(200), Outcome::Complete),
            x("/up", Some(200), Outcome::Complete),
            x("/next", Some(200), Outcome::Complete),
        ]
    );
    assert_eq!(f.counts(), counts(3, 1, 0, 0));
}

#[test]
fn huge_content_lengths_are_followed_by_count() {
    // 2^63-1 (the largest accepted has 19 digits) on a request: everything after its head is
    // body. The response still pairs.
    let mut f = Feed::new();
    f.open(1, Role::Server);
    f.send(
        1,
        IN,
        b"POST /max HTTP/1.1\r\nContent-Length: 9223372036854775807\r\n\r\nabc",
    );
    f.send(
        1,
        OUT,
        b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n",
    );
    let big = vec![b'a'; 1 << 20];
    for _ in 0..4 {
        f.write_once(1, IN, &big);
    }
    // Still inside the body: not requests.
    f.event(1, IN, b"GET /swallowed HTTP/1.1\r\n\r\n", 1 << 61);
    f.event(1, IN, b"GET /swallowed HTTP/1.1\r\n\r\n", 1 << 61);
    assert_eq!(f.seen(), [x("/max", Some(413), Outcome::Complete)]);
    assert_eq!(f.counts(), counts(1, 0, 0, 0));
    // The body ends inside uncaptured bytes that run on: whatever request followed is lost;
    // stream positions saturate at 2^64 without overflowing anything.
    f.event(1, IN, b"GET /lost HTTP/1.1\r\n\r\n", u64::MAX);
    f.event(1, IN, b"GET /late HTTP/1.1\r\n\r\n", u64::MAX);
    f.close(1);
    assert_eq!(f.seen(), [x("/max", Some(413), Outcome::Complete)]);
    assert_eq!(f.counts(), counts(1, 1, 0, 1));

    // 1e18 on a response: the body never ends; the exchange ends with the connection, and a
    // request sent meanwhile too.
    let mut f = Feed::new();
    f.open(1, Role::Server);
    f.send(1, IN, &get("/big"));
    f.send(
        1,
        OUT,
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000000000\r\n\r\nabc",
    );
    f.send(1, IN, &get("/behind"));
    f.close(1);
    assert_eq!(
        f.seen(),
        [
            x("/big", Some(200), Outcome::ConnectionClosed),
            x("/behind", None, Outcome::ConnectionClosed),
        ]
    );
    assert_eq!(f.counts(), counts(2, 0, 0, 0));
    new_connection_still_works(&mut f, 2);
}

#[test]
fn invalid_content_lengths_are_garbage() {
    let bad: [&[u8]; 7] = [
        b"Content-Length: -1\r\n",
        b"Content-Length: 18446744073709551615\r\n",
        b"Content-Length: 0x10\r\n",
        b"Content-Length: 18446744073709551616\r\n",
        b"Content-Length: 99999999999999999999\r\n",
        b"Content-Length: 3\r\nContent-Length: 4\r\n",
        b"Content-Length: 3, 4\r\n",
    ];
    for h in bad {
        let name = String::from_utf8_lossy(h);
        // In a request on a fresh connection: not HTTP (its first bytes are no valid head).
        let mut f = Feed::new();
        f.open(1, Role::Server);
        f.server(
            1,
            &[(&[&b"POST /x HTTP/1.1\r\n"[..], h, b"\r\nabcd"].concat(), OK)],
        );
        f.server(1, &[(&get("/ignored"), OK)]);
        assert_eq!(f.counts(), counts(0, 0, 1, 0), "{name}");
        new_connection_still_works(&mut f, 2);

        // In a request once HTTP was seen: a resync; the garbage's own response is unpaired
        // and the next request is traced again.
        let mut f = Feed::new();
        warmed(&mut f, 1);
        f.server(
            1,
            &[(&[&b"POST /x HTTP/1.1\r\n"[..], h, b"\r\nabcd"].concat(), OK)],
        );
        f.server(1, &[(&get("/next"), OK)]);
        assert_eq!(
            f.seen(),
            [
                x("/warm", Some(200), Outcome::Complete),
                x("/next", Some(200), Outcome::Complete),
            ],
            "{name}"
        );
        assert_eq!(f.counts(), counts(2, 1, 0, 0), "{name}");

        // In a response: its request ends unparseable; the next exchange is traced.
        let mut f = Feed::new();
        f.open(1, Role::Server);
        f.server(
            1,
            &[(
                &get("/a"),
                &[&b"HTTP/1.1 200 OK\r\n"[..], h, b"\r\nabcd"].concat(),
            )],
        );
        f.server(1, &[(&get("/b"), OK)]);
        assert_eq!(
            f.seen(),
            [
                x("/a", None, Outcome::ResponseUnparseable),
                x("/b", Some(200), Outcome::Complete),
            ],
            "{name}"
        );
        assert_eq!(f.counts(), counts(2, 1, 0, 0), "{name}");
    }
}

fn header_bomb(headers: usize) -> Vec<u8> {
    let mut b = b"GET /bomb HTTP/1.1\r\n".to_vec();
    for i in 0..headers {
        b.extend(format!("x-{i}: v\r\n").bytes());
    }
    b.extend(b"\r\n");
    b
}

fn long_header_line(bytes: usize) -> Vec<u8> {
    let mut b = b"GET /long HTTP/1.1\r\nX-Long: ".to_vec();
    b.resize(b.len() + bytes, b'a');
    b.extend(b"\r\n\r\n");
    b
}

#[test]
fn header_bombs_are_dropped_within_the_head_limit() {
    for (name, bomb) in [
        ("100k headers", header_bomb(100_000)),
        ("1 MiB header line", long_header_line(1 << 20)),
    ] {
        // Read in capture-sized pieces: the head is dropped once it passes the limit; the rest
        // of it never looks like a message start, so the connection is given up.
        let mut f = Feed::new();
        warmed(&mut f, 1);
        let (_, peak) = heap::peak(|| {
            f.send(1, IN, &bomb);
            f.send(
                1,
                OUT,
                b"HTTP/1.1 431 Too Large\r\nContent-Length: 0\r\n\r\n",
            );
            f.server(1, &[(&get("/after"), OK)]);
        });
        // The head buffer is bounded by the 64 KiB limit (plus transient parser state).
        assert!(peak < 1024 * 1024, "{name}: {peak} bytes");
        assert_eq!(f.counts(), counts(1, 1, 1, 1), "{name}");
        new_connection_still_works(&mut f, 2);

        // Written at once: only the first 16 KiB are captured, the head cannot be complete.
        // The next request starts a new event: traced.
        let mut f = Feed::new();
        warmed(&mut f, 1);
        let (_, peak) = heap::peak(|| {
            f.write_once(1, IN, &bomb);
            f.send(
                1,
                OUT,
                b"HTTP/1.1 431 Too Large\r\nContent-Length: 0\r\n\r\n",
            );
            f.server(1, &[(&get("/after"), OK)]);
        });
        assert!(peak < 1024 * 1024, "{name}: {peak} bytes");
        assert_eq!(
            f.seen(),
            [
                x("/warm", Some(200), Outcome::Complete),
                x("/after", Some(200), Outcome::Complete),
            ],
            "{name}"
        );
        assert_eq!(f.counts(), counts(2, 1, 0, 1), "{name}");
    }
}

#[test]
fn head_buffer_never_exceeds_the_limit() {
    let limits = ConnLimits {
        max_head_bytes: 1024,
        ..ConnLimits::default()
    };
    // Byte by byte, a head three times the limit: dropped as soon as it passes the limit.
    let mut f = Feed::with(limits.clone());
    f.open(1, Role::Server);
    let bomb = long_header_line(3000);
    let (_, peak) = heap::peak(|| f.send_in(1, IN, &bomb, 1));
    assert!(peak < 8 * 1024, "{peak} bytes");
    // Dropped (a resync), then given up: 1-byte events that never start a message.
    assert_eq!(f.counts(), counts(0, 1, 1, 1));
    // A head just under the limit, byte by byte: parsed.
    let mut f = Feed::with(limits);
    f.open(1, Role::Server);
    let req = long_header_line(1024 - 32);
    assert_eq!(req.len(), 1024);
    f.send_in(1, IN, &req, 1);
    f.send(1, OUT, OK);
    assert_eq!(f.seen(), [x("/long", Some(200), Outcome::Complete)]);
    // In one event too.
    f.send(1, IN, &req);
    f.send(1, OUT, OK);
    assert_eq!(f.counts(), counts(2, 0, 0, 0));
}

#[test]
fn many_small_headers_within_the_limit_still_parse() {
    // 5000 headers in 40 KiB: more than the parser's stack slots, within the head limit.
    let mut f = Feed::new();
    f.open(1, Role::Server);
    let req = header_bomb(5000);
    assert!(req.len() < 64 * 1024);
    f.server(1, &[(&req, OK)]);
    assert_eq!(f.seen(), [x("/bomb", Some(200), Outcome::Complete)]);
    assert_eq!(f.counts(), counts(1, 0, 0, 0));
}

#[test]
fn nul_bytes_in_heads() {
    for req in [
        &b"GET /a\x00b HTTP/1.1\r\n\r\n"[..],
        b"GET / HTTP/1.1\x00\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-\x00: b\r\n\r\n",
        b"\x00GET / HTTP/1.1\r\n\r\n",
    ] {
        let name = String::from_utf8_lossy(req);
        // First bytes of a connection: not HTTP.
        let mut f = Feed::new();
        f.open(1, Role::Server);
        f.server(1, &[(req, OK), (&get("/ignored"), OK)]);
        assert_eq!(f.counts(), counts(0, 0, 1, 0), "{name}");
        new_connection_still_works(&mut f, 2);
        // Later: a resync; the next request is traced.
        let mut f = Feed::new();
        warmed(&mut f, 1);
        f.server(1, &[(req, OK), (&get("/next"), OK)]);
        assert_eq!(f.counts(), counts(2, 1, 0, 0), "{name}");
        assert_eq!(f.out[1].request.target, "/next", "{name}");
    }
    // In a response head: the request ends unparseable, the next exchange is traced.
    let mut f = Feed::new();
    f.open(1, Role::Server);
    f.server(
        1,
        &[
            (
                &get("/a"),
                b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n",
            ),
            (&get("/b"), OK),
        ],
    );
    assert_eq!(
        f.seen(),
        [
            x("/a", None, Outcome::ResponseUnparseable),
            x("/b", Some(200), Outcome::Complete),
        ]
    );
    assert_eq!(f.counts(), counts(2, 1, 0, 0));
}

fn prng(mut s: u64) -> impl FnMut() -> u8 {
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 24) as u8
    }
}

#[test]
fn binary_garbage() {
    let mut rnd = prng(0x9e37_79b9_7f4a_7c15);
    let noise: Vec<u8> = (0..256 * 1024).map(|_| rnd()).collect();
    // As the first bytes of a connection seen opening: not HTTP at once.
    let mut f = Feed::new();
    f.open(1, Role::Server);
    f.send(1, IN, &noise);
    f.send(1, OUT, &noise);
    f.server(1, &[(&get("/ignored"), OK)]);
    assert_eq!(f.counts(), counts(0, 0, 1, 0));
    new_connection_still_works(&mut f, 2);

    // On a connection joined mid-stream: given up after a bounded number of events.
    let mut f = Feed::new();
    f.open(1, Role::Unknown);
    let (_, peak) = heap::peak(|| f.send_in(1, IN, &noise, 512));
    assert!(peak < 64 * 1024, "{peak} bytes");
    assert_eq!(f.counts(), counts(0, 0, 1, 0));
    new_connection_still_works(&mut f, 2);

    // After HTTP was seen, a burst of garbage costs one resync; HTTP after it is traced.
    let mut f = Feed::new();
    warmed(&mut f, 1);
    f.send(1, IN, &noise[..1000]);
    f.server(1, &[(&get("/next"), OK)]);
    assert_eq!(f.counts(), counts(2, 1, 0, 0));
    // A lot of garbage: the connection is given up.
    f.send_in(1, IN, &noise, 1000);
    f.server(1, &[(&get("/gone"), OK)]);
    assert_eq!(f.counts(), counts(2, 2, 1, 0));
    new_connection_still_works(&mut f, 2);
}

const CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x00\xf4\x01\x00\x00\xf0\x03\x03\x8a\x1f\x6c\x92\x00\x01\
\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x20\x21\x22\x23\x24\x25\x26\x27\x28\x29\
\x00\x3e\x13\x02\x13\x03\x13\x01\xc0\x2c\xc0\x30\x00\x9f\xcc\xa9\xcc\xa8\x01\x00\x00\x75\x00\x00";
const SERVER_HELLO: &[u8] = b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03\x11\x22";

#[test]
fn tls_on_a_plain_port_is_not_http() {
    for role in [Role::Server, Role::Client, Role::Unknown] {
        let mut f = Feed::new();
        f.open(1, role);
        // Client's hello on the direction that carries requests for that role.
        let (hello_dir, reply_dir) = if role == Role::Client {
            (OUT, IN)
        } else {
            (IN, OUT)
        };
        f.send(1, hello_dir, CLIENT_HELLO);
        f.send(1, reply_dir, SERVER_HELLO);
        // Application data that happens to look like HTTP is no longer parsed.
        f.send(1, hello_dir, &get("/inside-tls"));
        f.send(1, reply_dir, OK);
        f.close(1);
        assert_eq!(f.counts(), counts(0, 0, 1, 0), "{role:?}");
        new_connection_still_works(&mut f, 2);
    }
    // A server answering plain HTTP with a TLS alert (or the reverse): the request ends
    // unparseable.
    let mut f = Feed::new();
    f.open(1, Role::Server);
    f.server(1, &[(&get("/a"), b"\x15\x03\x03\x00\x02\x02\x46")]);
    f.close(1);
    assert_eq!(f.seen(), [x("/a", None, Outcome::ResponseUnparseable)]);
    assert_eq!(f.counts(), counts(1, 1, 0, 0));
}

#[test]
fn http2_preface_is_not_http1() {
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00";
    for role in [Role::Server, Role::Unknown] {
        let mut f = Feed::new();
        f.open(1, role);
        f.send(1, IN, preface);
        f.send(1, OUT, b"\x00\x00\x00\x04\x01\x00\x00\x00\x00");
        f.send(1, IN, &get("/h2-frames"));
        f.send(1, OUT, OK);
        assert_eq!(f.counts(), counts(0, 0, 1, 0), "{role:?}");
        new_connection_still_works(&mut f, 2);
    }
}

#[test]
fn slowloris_one_byte_events_still_parse() {
    let mut f = Feed::new();
    f.open(1, Role::Server);
    let req = b"POST /slow?x=1 HTTP/1.1\r\nHost: slow.example\r\nUser-Agent: loris/1\r\n\
        Content-Length: 5\r\n\r\nhello";
    let (_, peak) = heap::peak(|| {
        f.send_in(1, IN, req, 1);
        f.send_in(1, OUT, OK, 1);
    });
    assert!(peak < 16 * 1024, "{peak} bytes");
    assert_eq!(f.seen(), [x("/slow?x=1", Some(200), Outcome::Complete)]);
    let ex = &f.out[0];
    assert_eq!(ex.request.host.as_deref(), Some("slow.example"));
    assert_eq!(ex.request.user_agent.as_deref(), Some("loris/1"));
    // Starts at the event with the request's first byte, ends at the response's last byte.
    assert_eq!(ex.start_ns, 1_000_000 + 2_000);
    assert_eq!(
        ex.end_ns,
        1_000_000 + 1_000 * (1 + req.len() + OK.len()) as u64
    );
    assert_eq!(f.counts(), counts(1, 0, 0, 0));
    // Unknown method token, also byte by byte.
    f.send_in(1, IN, b"PROPFIND /dav HTTP/1.1\r\nDepth: 1\r\n\r\n", 1);
    f.send_in(1, OUT, OK, 1);
    assert_eq!(f.out[1].request.method, "PROPFIND");
    assert_eq!(f.counts(), counts(2, 0, 0, 0));
}

#[test]
fn response_before_any_request() {
    // On a server connection: unpaired, ignored; the exchange after it is traced.
    let mut f = Feed::new();
    f.open(1, Role::Server);
    f.send(1, OUT, OK);
    f.server(1, &[(&get("/a"), OK)]);
    assert_eq!(f.seen(), [x("/a", Some(200), Outcome::Complete)]);
    assert_eq!(f.counts(), counts(1, 0, 0, 0));
    // A response arriving on the request direction cannot be a request: not HTTP.
    let mut f = Feed::new();
    f.open(1, Role::Server);
    f.send(1, IN, OK);
    f.server(1, &[(&get("/a"), OK)]);
    assert_eq!(f.counts(), counts(0, 0, 1, 0));
    // Joined mid-stream: a response first decides the side; the next exchange is traced.
    let mut f = Feed::new();
    f.open(1, Role::Unknown);
    f.send(1, IN, OK);
    f.send(1, OUT, &get("/c"));
    f.send(1, IN, OK);
    assert_eq!(f.seen(), [x("/c", Some(200), Outcome::Complete)]);
    assert_eq!(f.out[0].side, Side::Client);
    assert_eq!(f.counts(), counts(1, 0, 0, 0));
}

#[test]
fn thousands_of_pipelined_requests_are_bounded_and_counted() {
    const N: usize = 20_000;
    let limits = ConnLimits::default();
    let max = limits.max_pipelined;
    let mut f = Feed::with(limits);
    f.open(1, Role::Server);
    let reqs: Vec<u8> = (0..N).flat_map(|i| get(&format!("/{i}"))).collect();
    let resps: Vec<u8> = (0..N)
        .flat_map(|i| {
            format!("HTTP/1.1 {} X\r\nContent-Length: 0\r\n\r\n", 200 + i % 300).into_bytes()
        })
        .collect();
    let (_, peak) = heap::peak(|| f.send(1, IN, &reqs));
    // At most `max_pipelined` requests are held, whatever N (the requests take ~620 KB; what
    // is allocated beyond the queue is per event: one event's request starts).
    assert!(reqs.len() > 600_000);
    assert!(peak < 512 * 1024, "{peak} bytes");
    f.send(1, OUT, &resps);
    // The oldest requests were dropped for room; their responses are skipped, so the last
    // `max_pipelined` requests pair with their own responses.
    assert_eq!(f.out.len(), max);
    for (k, ex) in f.out.iter().enumerate() {
        let i = N - max + k;
        assert_eq!(ex.request.target, format!("/{i}"));
        assert_eq!(
            ex.response.as_ref().map(|r| r.status),
            Some(200 + (i % 300) as u16)
        );
        assert_eq!(ex.outcome, Outcome::Complete);
    }
    assert_eq!(f.counts(), counts(max as u64, 0, 0, (N - max) as u64));
    // Interleaved, the same traffic loses nothing.
    let mut f = Feed::new();
    f.open(1, Role::Server);
    for i in 0..N {
        f.send(1, IN, &get(&format!("/{i}")));
        f.send(1, OUT, OK);
    }
    assert_eq!(f.counts(), counts(N as u64, 0, 0, 0));
}

#[test]
fn many_connections_are_bounded_by_eviction() {
    let limits = ConnLimits {
        max_conns: 16,
        ..ConnLimits::default()
    };
    let mut f = Feed::with(limits);
    let req = get("/open");
    let (mut closed, mut other) = (0, 0);
    // Warm up: the table and the output at their working size.
    for fd in 0..32 {
        f.open(fd, Role::Server);
        f.send(fd, IN, &req);
    }
    let (_, peak) = heap::peak(|| {
        for fd in 32..10_000 {
            f.open(fd, Role::Server);
            f.send(fd, IN, &req);
            for e in &f.out {
                if e.outcome == Outcome::ConnectionClosed {
                    closed += 1;
                } else {
                    other += 1;
                }
            }
            f.flush(fd - 16);
        }
    });
    // Evicted connections end their pending requests; the table stays at its limit, and so
    // does the memory it uses.
    assert_eq!(f.table.len(), 16);
    assert_eq!(f.counts().evicted, 10_000 - 16);
    assert_eq!(f.counts().exchanges, 10_000 - 16);
    assert_eq!((closed, other), (10_000 - 16, 0));
    assert!(peak < 16 * 1024, "{peak} bytes");
}
