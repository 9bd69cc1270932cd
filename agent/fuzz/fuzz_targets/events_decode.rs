//! Arbitrary bytes → `sonde::events::decode`: never a panic, and what decodes re-encodes to
//! the same event. Then the input is cut into length-prefixed records (`[len: u8] record`)
//! that go through `events::Reorder` (released in timestamp order, none lost or altered) and
//! are fed to a small `ConnTable`, as the pipeline does with ring-buffer records.
#![no_main]

use std::sync::atomic::Ordering::Relaxed;

use libfuzzer_sys::fuzz_target;
use sonde::conn::{ConnLimits, ConnTable};
use sonde::events::{Event, Reorder, decode, encode};
use sonde::metrics::Stats;

fn check_one(rec: &[u8]) {
    match decode(rec) {
        Ok(Event::Data(d)) => {
            assert!(d.data.len() <= rec.len());
            assert!(d.len >= d.data.len() as u64);
            // The encoder writes no kernel trace context; everything else must round-trip.
            let again = encode::data(d.conn, d.ts_ns, d.tid, d.dir, d.pos, d.len, d.data);
            let Ok(Event::Data(e)) = decode(&again) else {
                panic!("re-encoded data record does not decode");
            };
            assert_eq!(
                (e.conn, e.ts_ns, e.tid, e.dir, e.pos, e.len, e.data),
                (d.conn, d.ts_ns, d.tid, d.dir, d.pos, d.len, d.data)
            );
        }
        Ok(Event::Close { conn, ts_ns }) => {
            let again = encode::close(conn, ts_ns);
            assert_eq!(decode(&again), Ok(Event::Close { conn, ts_ns }));
        }
        Ok(Event::Open(o)) => {
            let _ = o.comm();
        }
        Ok(Event::ProcessExec { .. } | Event::ProcessFork { .. }) => {
            assert!(sonde::events::is_process_start(rec));
        }
        Ok(Event::ProcessExit { .. }) | Err(_) => {}
    }
}

fuzz_target!(|input: &[u8]| {
    check_one(input);

    let limits = ConnLimits {
        max_conns: 3,
        max_head_bytes: 256,
        max_pipelined: 4,
        idle_timeout_ns: 1_000_000_000,
    };
    let mut table = ConnTable::new(limits);
    let stats = Stats::default();
    let mut out = Vec::new();
    let mut reorder = Reorder::default();
    let mut pushed = Vec::new();
    let mut released: Vec<Vec<u8>> = Vec::new();
    let mut feed = |rec: &[u8]| {
        released.push(rec.to_vec());
        if let Ok(ev) = decode(rec) {
            table.on_event(&ev, &stats, &mut out);
            assert!(table.len() <= 3);
        }
    };
    let mut rest = input;
    while let Some((&n, tail)) = rest.split_first() {
        let (rec, tail) = tail.split_at(usize::from(n & 0x7f).min(tail.len()));
        rest = tail;
        check_one(rec);
        reorder.push(rec);
        pushed.push(rec.to_vec());
        if n & 0x80 != 0 {
            // Release up to this record's own timestamp (if it has one).
            let until = rec
                .get(8..16)
                .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
            reorder.release(until, &mut feed);
        }
    }
    reorder.release(u64::MAX, &mut feed);
    assert!(reorder.is_empty());
    // Every record comes out once, unchanged.
    let (mut a, mut b) = (pushed, released);
    a.sort();
    b.sort();
    assert_eq!(a, b);
    table.drain(&stats, &mut out);
    assert!(table.is_empty());
    assert_eq!(out.len() as u64, stats.exchanges.load(Relaxed));
});
