//! Writes the seed corpus under `corpus/<target>/` (run from `agent/fuzz`):
//! `AYA_BUILD_SKIP=1 cargo run --example gen_corpus`. Seeds are small and deterministic; the
//! same malformed messages are unit-tested in `agent/src/conn/hostile_tests.rs`.
use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use agent_common::{ConnId, ROLE_CLIENT, ROLE_SERVER};
use sonde::events::{Direction, encode};
use sonde_fuzz::{RoleOp, Script};

const GET: &[u8] =
    b"GET /orders/7?id=1&token=abc HTTP/1.1\r\nHost: shop.local:8080\r\nUser-Agent: curl/8\r\n\
traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\ntracestate: k=v\r\n\r\n";
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nT: 1\r\n\r\n";
const POST_CHUNKED: &[u8] =
    b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
const NO_CONTENT: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
const CLOSE_DELIMITED: &[u8] = b"HTTP/1.0 200 OK\r\n\r\nuntil the close";
const TLS_HELLO: &[u8] = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\x5e\x2f\x00\x01\x02\x03";
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00";

/// Malformed messages (also the http1_parse seeds).
fn malformed() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<(&'static str, Vec<u8>)> = vec![
        ("chunk_nonhex", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("chunk_overflow", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\nx\r\n".to_vec()),
        ("chunk_negative", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("chunk_huge", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nxyz".to_vec()),
        ("cl_max", b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\nabc".to_vec()),
        ("cl_1e18", b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000000000\r\n\r\nabc".to_vec()),
        ("cl_negative", b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec()),
        ("cl_conflict", b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec()),
        ("nul_request_line", b"GET /a\x00b HTTP/1.1\r\n\r\n".to_vec()),
        ("nul_header", b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n".to_vec()),
        ("tls_hello", TLS_HELLO.to_vec()),
        ("h2_preface", H2_PREFACE.to_vec()),
        ("garbage", (0..200u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()),
        ("interim_then_final", [CONTINUE, OK].concat()),
        ("no_content", NO_CONTENT.to_vec()),
        ("close_delimited", CLOSE_DELIMITED.to_vec()),
        ("post_chunked", POST_CHUNKED.to_vec()),
        ("chunked", CHUNKED.to_vec()),
        ("get", GET.to_vec()),
        ("unknown_method", b"PROPFIND /dav HTTP/1.1\r\nDepth: 1\r\n\r\n".to_vec()),
        ("forwarded", b"GET http://x/y HTTP/1.0\r\nForwarded: for=\"[2001:db8::1]:4711\"\r\nX-Forwarded-For: 1.2.3.4, 5.6.7.8\r\n\r\n".to_vec()),
    ];
    let mut bomb = b"GET /bomb HTTP/1.1\r\n".to_vec();
    for i in 0..300 {
        bomb.extend(format!("x-{i}: v\r\n").bytes());
    }
    bomb.extend(b"\r\n");
    v.push(("header_bomb", bomb));
    let mut long = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 5000));
    long.extend(b"\r\n\r\n");
    v.push(("long_header_line", long));
    v
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for t in ["http1_parse", "conn_stream", "events_decode"] {
        let d = root.join(t);
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
    }

    // http1_parse: two cut bytes, then the message.
    let d = root.join("http1_parse");
    for (name, msg) in malformed() {
        write(&d, name, &[&[0, 17][..], &msg].concat());
    }

    // conn_stream: scripts (see src/lib.rs).
    let d = root.join("conn_stream");
    let srv = |s: Script| s.open(0, RoleOp::Server, true);
    let exchange = |s: Script, req: &[u8], resp: &[u8], chunk| {
        s.data(0, false, req, chunk).data(0, true, resp, chunk)
    };
    write(
        &d,
        "get_ok",
        &exchange(srv(Script::new(2, 3, 3)), GET, OK, 255)
            .close(0)
            .finish(),
    );
    write(
        &d,
        "keepalive_split",
        &exchange(
            exchange(srv(Script::new(2, 3, 3)), GET, CHUNKED, 7),
            POST_CHUNKED,
            [CONTINUE, NO_CONTENT].concat().as_slice(),
            3,
        )
        .close(0)
        .finish(),
    );
    write(
        &d,
        "pipelined",
        &srv(Script::new(1, 2, 1))
            .data(0, false, &[GET, GET, GET].concat(), 255)
            .data(0, true, &[OK, OK, OK].concat(), 255)
            .finish(),
    );
    write(
        &d,
        "client_close_delimited",
        &Script::new(2, 3, 3)
            .open(1, RoleOp::Client, true)
            .data(1, true, b"GET / HTTP/1.0\r\n\r\n", 255)
            .data(1, false, CLOSE_DELIMITED, 255)
            .exit(0)
            .finish(),
    );
    write(
        &d,
        "unknown_role_midstream",
        &Script::new(4, 3, 3)
            .open(2, RoleOp::Unknown, true)
            .data(2, true, b"ody bytes", 255)
            .data(2, true, OK, 255)
            .data(2, false, GET, 255)
            .data(2, true, OK, 255)
            .tick(200)
            .expire()
            .finish(),
    );
    write(
        &d,
        "gaps_and_truncation",
        &srv(Script::new(2, 3, 3))
            .data(0, false, GET, 255)
            .data_with(0, true, &OK[..30], 255, 0, 1 << 20)
            .data_with(0, false, GET, 255, 10, 0)
            .data(0, true, OK, 255)
            .finish(),
    );
    write(
        &d,
        "tls_on_plain_port",
        &srv(Script::new(2, 3, 3))
            .data(0, false, TLS_HELLO, 255)
            .data(0, true, b"\x16\x03\x03\x00\x10", 255)
            .close(0)
            .finish(),
    );
    write(
        &d,
        "garbage_then_valid",
        &srv(Script::new(2, 3, 3))
            .data(0, false, GET, 255)
            .data(0, true, OK, 255)
            .data(0, false, b"\x00\x01garbage\xff\xfe", 255)
            .data(0, false, GET, 255)
            .data(0, true, OK, 255)
            .finish(),
    );
    write(
        &d,
        "head_too_big",
        &srv(Script::new(2, 0, 3))
            .data(0, false, GET, 5)
            .open(1, RoleOp::Server, true)
            .data(1, false, b"GET / HTTP/1.1\n\n", 255)
            .finish(),
    );
    write(
        &d,
        "evictions",
        &exchange(
            Script::new(1, 3, 3)
                .open(0, RoleOp::Server, true)
                .open(1, RoleOp::Client, true)
                .open(2, RoleOp::Server, true)
                .data(2, false, GET, 255),
            GET,
            OK,
            255,
        )
        .finish(),
    );
    write(
        &d,
        "slowloris",
        &exchange(srv(Script::new(2, 3, 3)), GET, OK, 1).finish(),
    );

    // events_decode: one record each, then a stream of them (`[len | release flag] record`),
    // out of timestamp order.
    let d = root.join("events_decode");
    let c = ConnId {
        tgid: 7,
        fd: 3,
        generation: 1,
    };
    let l: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let r: SocketAddr = "[::ffff:10.0.0.2]:5555".parse().unwrap();
    let recs = [
        encode::open(c, 1, ROLE_SERVER, l, r),
        encode::data(
            c,
            2,
            8,
            Direction::Ingress,
            0,
            18,
            b"GET / HTTP/1.1\r\n\r\n",
        ),
        encode::data(c, 3, 8, Direction::Egress, 0, 1000, &OK[..20]),
        encode::close(c, 4),
    ];
    write(&d, "open", &recs[0]);
    write(&d, "data", &recs[1]);
    write(&d, "close", &recs[3]);
    write(
        &d,
        "open_client_v6",
        &encode::open(c, 1, ROLE_CLIENT, "[::1]:1".parse().unwrap(), r),
    );
    let mut stream = Vec::new();
    for (i, rec) in [&recs[1], &recs[0], &recs[3], &recs[2]]
        .into_iter()
        .enumerate()
    {
        assert!(rec.len() < 128);
        stream.push(rec.len() as u8 | if i == 2 { 0x80 } else { 0 });
        stream.extend_from_slice(rec);
    }
    write(&d, "stream", &stream);
    println!("seeds written under {}", root.display());
}
