//! Linking rules of `assemble`, with completion in the real order.
use super::*;
use crate::{
    conn::Outcome,
    protocol::http1::{RequestHead, ResponseHead},
};

fn res(pid: u32) -> Arc<Resource> {
    Arc::new(Resource {
        pid,
        service_name: format!("svc{pid}"),
        attributes: vec![],
    })
}

fn addr(s: &str) -> Option<SocketAddr> {
    Some(s.parse().unwrap())
}

fn conn(tgid: u32, fd: u32) -> ConnId {
    ConnId {
        tgid,
        fd,
        generation: 1,
    }
}

fn start(c: ConnId, side: Side, tid: u32, ts: u64, l: &str, r: &str) -> RequestStart {
    RequestStart {
        conn: c,
        side,
        local: addr(l),
        remote: addr(r),
        start_ns: ts,
        tid,
        traceparent: None,
        kernel_ctx: KernelCtx::None,
    }
}

fn exchange(st: &RequestStart, end: u64) -> Exchange {
    Exchange {
        conn: st.conn,
        side: st.side,
        local: st.local,
        remote: st.remote,
        request: RequestHead {
            method: "GET".into(),
            target: "/".into(),
            minor_version: 1,
            traceparent: st.traceparent.clone(),
            ..Default::default()
        },
        response: Some(ResponseHead {
            status: 200,
            minor_version: 1,
            ..Default::default()
        }),
        outcome: Outcome::Complete,
        start_ns: st.start_ns,
        end_ns: end,
        request_tid: st.tid,
        response_tid: st.tid,
    }
}

fn asm() -> Assembler {
    Assembler::new(BootClock::with_offset(0), SpanOptions::default())
}

/// A (pid 1) serves a request on thread 11, calls B (pid 2) from the same thread; B serves
/// it. Completion order is the real one: B, then A's call, then A.
#[test]
fn nests_server_client_server_across_processes() {
    let mut a = asm();
    let a_srv = start(
        conn(1, 5),
        Side::Server,
        11,
        100,
        "127.0.0.1:8000",
        "127.0.0.1:40000",
    );
    let a_cli = start(
        conn(1, 6),
        Side::Client,
        11,
        200,
        "127.0.0.1:40001",
        "127.0.0.1:9000",
    );
    let b_srv = start(
        conn(2, 7),
        Side::Server,
        21,
        250,
        "127.0.0.1:9000",
        "127.0.0.1:40001",
    );
    a.on_start(&a_srv);
    a.on_start(&a_cli);
    a.on_start(&b_srv);
    let sb = a.assemble(exchange(&b_srv, 300), res(2));
    let ca = a.assemble(exchange(&a_cli, 350), res(1));
    let sa = a.assemble(exchange(&a_srv, 400), res(1));
    assert_eq!(sa.parent_span_id, None);
    assert_eq!(ca.parent_span_id, Some(sa.span_id));
    assert_eq!(sb.parent_span_id, Some(ca.span_id));
    assert!(sa.trace_id == ca.trace_id && ca.trace_id == sb.trace_id);
    assert_eq!(a.held(), 0, "nothing left behind");
}

#[test]
fn incoming_traceparent_roots_the_chain() {
    let mut a = asm();
    let mut s = start(
        conn(1, 5),
        Side::Server,
        11,
        100,
        "127.0.0.1:8000",
        "127.0.0.1:4",
    );
    s.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    let c = start(
        conn(1, 6),
        Side::Client,
        11,
        200,
        "127.0.0.1:5",
        "127.0.0.1:9000",
    );
    a.on_start(&s);
    a.on_start(&c);
    let cs = a.assemble(exchange(&c, 300), res(1));
    let ss = a.assemble(exchange(&s, 400), res(1));
    assert_eq!(ss.trace_id.to_string(), "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(ss.parent_span_id.unwrap().to_string(), "b7ad6b7169203331");
    assert_eq!(cs.trace_id, ss.trace_id);
    assert_eq!(cs.parent_span_id, Some(ss.span_id));
}

#[test]
fn event_loop_with_two_requests_in_flight_gives_no_parent() {
    let mut a = asm();
    let s1 = start(
        conn(1, 5),
        Side::Server,
        11,
        100,
        "127.0.0.1:8000",
        "127.0.0.1:4",
    );
    let s2 = start(
        conn(1, 6),
        Side::Server,
        11,
        110,
        "127.0.0.1:8000",
        "127.0.0.1:5",
    );
    let c = start(
        conn(1, 7),
        Side::Client,
        11,
        200,
        "127.0.0.1:6",
        "10.0.0.9:80",
    );
    a.on_start(&s1);
    a.on_start(&s2);
    a.on_start(&c);
    let cs = a.assemble(exchange(&c, 300), res(1));
    assert_eq!(cs.parent_span_id, None, "ambiguous: no parent");
    // Thread pool: handled on another thread, but only one request in flight.
    let mut a = asm();
    a.on_start(&s1);
    let c = start(
        conn(1, 7),
        Side::Client,
        99,
        200,
        "127.0.0.1:6",
        "10.0.0.9:80",
    );
    a.on_start(&c);
    let cs = a.assemble(exchange(&c, 300), res(1));
    let ss = a.assemble(exchange(&s1, 400), res(1));
    assert_eq!(cs.parent_span_id, Some(ss.span_id));
}

#[test]
fn keep_alive_requests_do_not_inherit_a_finished_parent() {
    let mut a = asm();
    let s1 = start(
        conn(1, 5),
        Side::Server,
        11,
        100,
        "127.0.0.1:8000",
        "127.0.0.1:4",
    );
    a.on_start(&s1);
    let _ = a.assemble(exchange(&s1, 150), res(1));
    // A call made after the request finished has no parent.
    let c = start(
        conn(1, 7),
        Side::Client,
        11,
        200,
        "127.0.0.1:6",
        "10.0.0.9:80",
    );
    a.on_start(&c);
    assert_eq!(a.assemble(exchange(&c, 300), res(1)).parent_span_id, None);
}

#[test]
fn guard_rails_bound_adoption() {
    let mut a = Assembler::with_links(
        BootClock::with_offset(0),
        SpanOptions::default(),
        LinkOptions {
            max_children: 2,
            max_context_age_ns: 1_000,
            ..Default::default()
        },
    );
    let s = start(
        conn(1, 5),
        Side::Server,
        11,
        100,
        "127.0.0.1:8000",
        "127.0.0.1:4",
    );
    a.on_start(&s);
    let mut parents = vec![];
    for i in 0..3 {
        let c = start(
            conn(1, 10 + i),
            Side::Client,
            11,
            200 + i as u64,
            "127.0.0.1:6",
            "10.0.0.9:80",
        );
        a.on_start(&c);
        parents.push(
            a.assemble(exchange(&c, 300), res(1))
                .parent_span_id
                .is_some(),
        );
    }
    assert_eq!(
        parents,
        vec![true, true, false],
        "at most max_children calls adopt it"
    );
    // Too old to adopt.
    let c = start(
        conn(1, 20),
        Side::Client,
        11,
        5_000,
        "127.0.0.1:6",
        "10.0.0.9:80",
    );
    let mut b = asm();
    b.link.max_context_age_ns = 1_000;
    b.on_start(&s);
    b.on_start(&c);
    assert_eq!(b.assemble(exchange(&c, 6_000), res(1)).parent_span_id, None);
    // A same-host client context is adopted once: a second server request on that
    // connection without its own client request gets none.
    let mut d = asm();
    let cl = start(
        conn(1, 6),
        Side::Client,
        11,
        10,
        "127.0.0.1:40001",
        "127.0.0.1:9000",
    );
    let s1 = start(
        conn(2, 7),
        Side::Server,
        21,
        20,
        "127.0.0.1:9000",
        "127.0.0.1:40001",
    );
    let s2 = start(
        conn(2, 7),
        Side::Server,
        21,
        30,
        "127.0.0.1:9000",
        "127.0.0.1:40001",
    );
    d.on_start(&cl);
    d.on_start(&s1);
    d.on_start(&s2);
    assert!(
        d.assemble(exchange(&s1, 25), res(2))
            .parent_span_id
            .is_some()
    );
    assert!(
        d.assemble(exchange(&s2, 35), res(2))
            .parent_span_id
            .is_none()
    );
    // A client that wrote after the server read is not its parent.
    let mut e = asm();
    let late = start(
        conn(1, 6),
        Side::Client,
        11,
        50,
        "127.0.0.1:40001",
        "127.0.0.1:9000",
    );
    let early = start(
        conn(2, 7),
        Side::Server,
        21,
        40,
        "127.0.0.1:9000",
        "127.0.0.1:40001",
    );
    e.on_start(&early);
    e.on_start(&late);
    assert!(
        e.assemble(exchange(&early, 45), res(2))
            .parent_span_id
            .is_none()
    );
}

/// Propagation mode across hosts (no same-host links): A's request gets the kernel's
/// trace; A's call carries the injected ids; B (another host) sees them as a header.
#[test]
fn kernel_chosen_ids_make_the_wire_and_the_spans_agree() {
    let mut a = Assembler::with_links(
        BootClock::with_offset(0),
        SpanOptions::default(),
        LinkOptions {
            same_host: false,
            ..Default::default()
        },
    );
    let t = [7u8; 16];
    let mut s = start(
        conn(1, 5),
        Side::Server,
        11,
        100,
        "10.0.0.1:8000",
        "10.0.0.9:4",
    );
    s.kernel_ctx = KernelCtx::Server { trace_id: t };
    let mut c = start(
        conn(1, 6),
        Side::Client,
        11,
        200,
        "10.0.0.1:5",
        "10.0.0.2:9000",
    );
    c.kernel_ctx = KernelCtx::Injected {
        trace_id: t,
        span_id: [9; 8],
    };
    let mut b = start(
        conn(2, 7),
        Side::Server,
        21,
        250,
        "10.0.0.2:9000",
        "10.0.0.1:5",
    );
    b.traceparent = Some(format!("00-{}-{}-01", "07".repeat(16), "09".repeat(8)));
    a.on_start(&s);
    a.on_start(&c);
    a.on_start(&b);
    let sb = a.assemble(exchange(&b, 300), res(2));
    let cs = a.assemble(exchange(&c, 350), res(1));
    let ss = a.assemble(exchange(&s, 400), res(1));
    assert_eq!(ss.trace_id, TraceId(t));
    assert_eq!(cs.span_id, SpanId([9; 8]));
    assert_eq!(cs.parent_span_id, Some(ss.span_id));
    assert_eq!(
        (sb.trace_id, sb.parent_span_id),
        (TraceId(t), Some(cs.span_id))
    );
    // Injected into a trace other than the parent's: the wire wins, no parent.
    let mut d = asm();
    d.on_start(&start(
        conn(1, 5),
        Side::Server,
        11,
        100,
        "10.0.0.1:8000",
        "10.0.0.9:4",
    ));
    d.on_start(&c);
    let cs = d.assemble(exchange(&c, 350), res(1));
    assert_eq!((cs.trace_id, cs.parent_span_id), (TraceId(t), None));
}

#[test]
fn same_host_linking_can_be_switched_off_and_headers_of_other_traces_win() {
    let mut a = Assembler::with_links(
        BootClock::with_offset(0),
        SpanOptions::default(),
        LinkOptions {
            same_host: false,
            ..Default::default()
        },
    );
    let cl = start(
        conn(1, 6),
        Side::Client,
        11,
        10,
        "127.0.0.1:40001",
        "127.0.0.1:9000",
    );
    let sv = start(
        conn(2, 7),
        Side::Server,
        21,
        20,
        "127.0.0.1:9000",
        "127.0.0.1:40001",
    );
    a.on_start(&cl);
    a.on_start(&sv);
    assert!(
        a.assemble(exchange(&sv, 25), res(2))
            .parent_span_id
            .is_none()
    );

    let mut b = asm();
    let mut sv = sv.clone();
    sv.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    b.on_start(&cl);
    b.on_start(&sv);
    let s = b.assemble(exchange(&sv, 25), res(2));
    assert_eq!(s.parent_span_id.unwrap().to_string(), "b7ad6b7169203331");
}
