//! Arbitrary bytes → a script of connection events (see `sonde_fuzz` for the format) fed to a
//! `ConnTable` with small limits; every exchange is then assembled into a span.
//!
//! Checked after every event: no panic; the table holds at most `max_conns` connections; the
//! exchanges produced match the `exchanges` counter; one event ends at most the pending
//! requests it can reach (each connection's queue is bounded by `max_pipelined`); heads kept
//! in exchanges are bounded by `max_head_bytes`; no exchange comes from fewer than 14 bytes of
//! captured traffic, nor without a request start reported before it; exchanges end no earlier
//! than they start, and `Complete` ones have a response.
//!
//! Events are built with `sonde::events::encode` and decoded, as the pipeline receives them.
#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use agent_common::{ConnId, ROLE_CLIENT, ROLE_SERVER, ROLE_UNKNOWN};
use libfuzzer_sys::fuzz_target;
use sonde::clock::BootClock;
use sonde::conn::{ConnLimits, ConnTable, Exchange, Outcome, RequestStart, Side};
use sonde::events::{Direction, Event, decode as decode_event, encode};
use sonde::metrics::Stats;
use sonde::span::http::{self, SpanOptions};
use sonde::span::{Resource, SpanId, SpanKind};
use sonde_fuzz::{IDLE_TIMEOUT_NS, Op, RoleOp, SLOTS, decode};

const TGID_BASE: u32 = 1000;

fn conn_id(slot: usize, generation: u64) -> ConnId {
    ConnId {
        tgid: TGID_BASE + (slot / 2) as u32,
        fd: 3 + slot as u32,
        generation,
    }
}

/// Length of everything an exchange keeps from its request and response heads.
fn kept_bytes(ex: &Exchange) -> usize {
    let r = &ex.request;
    r.method.len()
        + r.target.len()
        + [
            &r.host,
            &r.user_agent,
            &r.traceparent,
            &r.tracestate,
            &r.forwarded_for,
        ]
        .iter()
        .map(|s| s.as_ref().map_or(0, String::len))
        .sum::<usize>()
}

struct Checker {
    max_head: usize,
    captured: u64,
    seen: usize,
    starts: Vec<RequestStart>,
}

impl Checker {
    fn check_new(&mut self, table: &mut ConnTable, out: &[Exchange], stats: &Stats) {
        assert_eq!(out.len() as u64, stats.exchanges.load(Relaxed));
        table.take_starts(&mut self.starts);
        assert!(
            out.len() <= self.starts.len(),
            "{} exchanges, {} request starts",
            out.len(),
            self.starts.len()
        );
        for ex in &out[self.seen..] {
            assert!(ex.end_ns >= ex.start_ns, "{ex:?}");
            if ex.outcome == Outcome::Complete {
                assert!(ex.response.is_some(), "complete without a response: {ex:?}");
            }
            assert!(
                ex.conn.tgid == TGID_BASE || ex.conn.tgid == TGID_BASE + 1,
                "{ex:?}"
            );
            // Invalid UTF-8 bytes become U+FFFD (3 bytes) in the kept strings; a tracestate
            // list gains one comma per field, each field costing more than that in the head.
            assert!(
                kept_bytes(ex) <= 3 * self.max_head,
                "head fields longer than the head limit: {ex:?}"
            );
        }
        self.seen = out.len();
        // Every exchange has a request head of its own, at least `A / HTTP/1.1\n\n`.
        assert!(
            out.len() as u64 * 14 <= self.captured,
            "{} exchanges from {} captured bytes",
            out.len(),
            self.captured
        );
    }
}

fuzz_target!(|input: &[u8]| {
    let (cfg, ops) = decode(input);
    let limits = ConnLimits {
        max_conns: cfg.max_conns,
        max_head_bytes: cfg.max_head_bytes,
        max_pipelined: cfg.max_pipelined,
        idle_timeout_ns: IDLE_TIMEOUT_NS,
    };
    let per_conn = limits.max_pipelined.max(1);
    let mut table = ConnTable::new(limits);
    let stats = Stats::default();
    let mut out: Vec<Exchange> = Vec::new();
    let mut chk = Checker {
        max_head: cfg.max_head_bytes,
        captured: 0,
        seen: 0,
        starts: Vec::new(),
    };
    let mut generation = [1u64; SLOTS];
    // Next stream position per slot and direction (ingress, egress).
    let mut pos = [[0u64; 2]; SLOTS];
    let mut ts: u64 = 1_000_000_000;
    let local: SocketAddr = "10.1.0.1:8080".parse().unwrap();
    let remote: SocketAddr = "[2001:db8::2]:40000".parse().unwrap();

    for op in &ops {
        ts += 1_000;
        let before = out.len();
        let conns_before = table.len();
        // Exchanges one operation may end: the pending requests of the connections it touches.
        let bound = match op {
            Op::Open { .. } | Op::Data(_) => 3 * per_conn,
            Op::Close { .. } => per_conn,
            Op::Exit { .. } | Op::Expire => conns_before * per_conn,
            Op::Tick { .. } => 0,
        };
        match op {
            Op::Open {
                slot,
                role,
                new_generation,
            } => {
                if *new_generation {
                    generation[*slot] += 1;
                    pos[*slot] = [0, 0];
                }
                let role = match role {
                    RoleOp::Server => ROLE_SERVER,
                    RoleOp::Client => ROLE_CLIENT,
                    RoleOp::Unknown => ROLE_UNKNOWN,
                };
                let rec = encode::open(conn_id(*slot, generation[*slot]), ts, role, local, remote);
                table.on_event(&decode_event(&rec).unwrap(), &stats, &mut out);
            }
            Op::Data(d) => {
                let gen_ = if d.stale {
                    generation[d.slot].saturating_sub(1)
                } else {
                    generation[d.slot]
                };
                let (dir, di) = if d.egress {
                    (Direction::Egress, 1)
                } else {
                    (Direction::Ingress, 0)
                };
                let next = &mut pos[d.slot][di];
                let at = next.saturating_add(d.gap).saturating_sub(d.rewind);
                let len = (d.bytes.len() as u64).saturating_add(d.uncaptured);
                *next = (*next).max(at.saturating_add(len));
                chk.captured += d.bytes.len() as u64;
                let rec = encode::data(
                    conn_id(d.slot, gen_),
                    if d.ts_back { ts - 700 } else { ts },
                    if d.egress { 2 } else { 3 },
                    dir,
                    at,
                    len,
                    d.bytes,
                );
                table.on_event(&decode_event(&rec).unwrap(), &stats, &mut out);
            }
            Op::Close { slot } => {
                let rec = encode::close(conn_id(*slot, generation[*slot]), ts);
                table.on_event(&decode_event(&rec).unwrap(), &stats, &mut out);
            }
            Op::Exit { process } => {
                let ev = Event::ProcessExit {
                    tgid: TGID_BASE + *process as u32,
                    ts_ns: ts,
                };
                table.on_event(&ev, &stats, &mut out);
            }
            Op::Expire => {
                ts += IDLE_TIMEOUT_NS + 1;
                table.expire(ts, &stats, &mut out);
                assert!(table.is_empty(), "every connection was idle");
            }
            Op::Tick { ms } => ts += u64::from(*ms) * 1_000_000,
        }
        assert!(table.len() <= cfg.max_conns);
        assert!(
            out.len() - before <= bound,
            "{op:?} ended {} exchanges (bound {bound})",
            out.len() - before
        );
        chk.check_new(&mut table, &out, &stats);
    }
    let n = table.len();
    let before = out.len();
    table.drain(&stats, &mut out);
    assert!(table.is_empty());
    assert!(out.len() - before <= n * per_conn);
    chk.check_new(&mut table, &out, &stats);

    let resource = Arc::new(Resource {
        pid: TGID_BASE,
        service_name: "fuzz".into(),
        attributes: vec![],
    });
    let clock = BootClock::with_offset(1_700_000_000_000_000_000);
    let opts = SpanOptions {
        redact_params: vec!["token".into()],
    };
    for ex in &out {
        let span = http::build(
            ex.clone(),
            http::default_lineage(ex),
            SpanId::random(),
            resource.clone(),
            &clock,
            &opts,
        );
        assert!(span.end_unix_ns >= span.start_unix_ns);
        assert_eq!(
            span.kind == SpanKind::Server,
            ex.side == Side::Server,
            "{ex:?}"
        );
        assert!(!span.name.is_empty());
    }
});
