//! Arbitrary bytes → the pure HTTP/1 parsers of `sonde::protocol::http1`.
//!
//! Input: `[cut a] [cut b] message bytes...`. Besides "never a panic", checks the properties
//! that reassembly relies on when a message is split across events:
//! - a head parsed whole parses the same from exactly its own bytes, is `Partial` on any
//!   shorter prefix, and ends where `find_head_end` says it does;
//! - `classify_start` never says `No` to a prefix of something it accepts;
//! - a chunked body walked in pieces (some of them skipped as uncaptured, when `skip` allows)
//!   ends exactly where it ends walked whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sonde::protocol::http1::{
    ChunkProgress, ChunkedBody, MessageKind, Parsed, Start, classify_start, find_head_end,
    looks_non_http, parse_request, parse_response,
};

fn check_head<T: Clone + PartialEq + std::fmt::Debug>(
    data: &[u8],
    cut: usize,
    parse: impl Fn(&[u8]) -> Parsed<T>,
) -> Option<(T, usize)> {
    let Parsed::Complete(head, n) = parse(data) else {
        return None;
    };
    assert!(n > 0 && n <= data.len());
    assert_eq!(
        parse(&data[..n]),
        Parsed::Complete(head.clone(), n),
        "own bytes"
    );
    let k = cut % n;
    assert_eq!(parse(&data[..k]), Parsed::Partial, "prefix of {k} bytes");
    if !matches!(data.first(), Some(b'\r' | b'\n')) {
        assert_eq!(find_head_end(data, 0), Some(n), "find_head_end");
    }
    Some((head, n))
}

fn walk_chunked(data: &[u8], cuts: &[usize], skip_odd: bool) -> (usize, ChunkProgress) {
    let mut c = ChunkedBody::new();
    let mut at = 0;
    for (i, &end) in cuts.iter().chain([&data.len()]).enumerate() {
        let end = end.clamp(at, data.len());
        let piece = &data[at..end];
        if skip_odd && i % 2 == 1 && c.clone().skip(piece.len() as u64) {
            // Only chunk data can be skipped: walking the same bytes must agree.
            let mut fed = c.clone();
            let (n, p) = fed.feed(piece);
            assert_eq!((n, p), (piece.len(), ChunkProgress::NeedMore));
            assert!(c.skip(piece.len() as u64));
            assert_eq!(c, fed, "skip and feed disagree");
            at = end;
            continue;
        }
        let (n, p) = c.feed(piece);
        assert!(n <= piece.len());
        if p != ChunkProgress::NeedMore {
            return (at + n, p);
        }
        assert_eq!(n, piece.len());
        at = end;
    }
    (at, ChunkProgress::NeedMore)
}

fuzz_target!(|input: &[u8]| {
    let (a, b, data) = match input {
        [a, b, rest @ ..] => (usize::from(*a), usize::from(*b), rest),
        _ => return,
    };
    let cut = a * 256 + b;

    if let Some((h, n)) = check_head(data, cut, parse_request) {
        assert!(h.method.len() + h.target.len() <= n);
        let _ = h.body();
    }
    if let Some((h, _)) = check_head(data, cut, parse_response) {
        for m in [None, Some("GET"), Some("HEAD"), Some("CONNECT")] {
            let _ = h.body(m);
        }
    }

    for kind in [
        None,
        Some(MessageKind::Request),
        Some(MessageKind::Response),
    ] {
        if let Start::Yes(k) = classify_start(data, kind) {
            let p = classify_start(&data[..cut % (data.len() + 1)], kind);
            assert!(
                p == Start::NeedMore || p == Start::Yes(k),
                "prefix of an accepted start: {p:?}"
            );
        }
    }

    let _ = looks_non_http(data);
    let from = a % (data.len() + 4);
    if let Some(e) = find_head_end(data, from) {
        assert!(e >= from + 2 && e <= data.len() && data[e - 1] == b'\n');
    }

    let whole = walk_chunked(data, &[], false);
    assert!(whole.0 <= data.len());
    let cuts = [a.min(b), a.max(b)];
    assert_eq!(walk_chunked(data, &cuts, false), whole, "cuts {cuts:?}");
    let cuts = [a % 7, a % 7 + b];
    let skipped = walk_chunked(data, &cuts, true);
    assert_eq!(skipped, whole, "cuts {cuts:?}, middle skipped");
});
