//! The socket-level half of propagation: only in the `sonde-propagate` object, because a
//! sockhash needs CAP_NET_ADMIN, which sonde does not otherwise need. See propagate.rs.
use agent_common::*;
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_CONNECT_CB, sk_action,
    },
    helpers::generated::{bpf_get_socket_cookie, bpf_msg_pull_data},
    macros::{map, sk_msg, sock_ops},
    maps::{LruHashMap, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};

use crate::programs::{
    count, ids,
    propagate::{
        CTX_MAX_AGE_NS, INJECTED, LINE_SCAN, PROC_CTX, SCAN, THREAD_CTX, enabled, is_method_start,
        launder, now, random_bytes,
    },
    traced,
};

/// Client sockets of traced processes (key: socket cookie).
#[map]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(65536, 0);
/// Sockets marked at connect(), waiting to be established.
#[map]
static PROP_MARK: LruHashMap<u64, u8> = LruHashMap::with_max_entries(16384, 0);

#[sock_ops]
pub fn sonde_sockops(ctx: SockOpsContext) -> u32 {
    if !enabled() {
        return 1;
    }
    // SAFETY: the context is a valid bpf_sock_ops.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match ctx.op() {
        // connect(): runs in the connecting task, so the process is known here.
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let (_, tgid, _) = ids();
            if traced(tgid) {
                let _ = PROP_MARK.insert(&cookie, &1, 0);
            }
        }
        // Established (possibly in softirq): sockets can only be added to a map now.
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: plain lookup.
            if unsafe { PROP_MARK.get(&cookie) }.is_some() {
                let _ = PROP_MARK.remove(&cookie);
                let mut key = cookie;
                // SAFETY: `ops` is the program's context.
                if SOCKS
                    .update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64)
                    .is_ok()
                {
                    count(Counter::PropagatedSockets);
                }
            }
        }
        _ => {}
    }
    1
}

#[sk_msg]
pub fn sonde_skmsg(ctx: SkMsgContext) -> u32 {
    inject(&ctx);
    sk_action::SK_PASS
}

#[inline(always)]
fn inject(ctx: &SkMsgContext) {
    let (id, tgid, tid) = ids();
    if !traced(tgid) {
        return;
    }
    let size = ctx.size() as usize;
    if size < 16 {
        return;
    }
    let want = if size < SCAN { size } else { SCAN };
    // SAFETY: valid context; range within the message.
    if unsafe { bpf_msg_pull_data(ctx.msg, 0, want as u32, 0) } != 0 {
        return;
    }
    let data = ctx.data();
    let end = ctx.data_end();
    if data + 4 > end {
        return;
    }
    // SAFETY: bounds checked against data_end just above.
    let head = unsafe { *(data as *const [u8; 4]) };
    if !is_method_start(&head) {
        return;
    }
    // End of the request line.
    let mut line_end = 0usize;
    let mut i = 0usize;
    while i < LINE_SCAN {
        if data + i + 1 > end {
            break;
        }
        // SAFETY: bounds checked.
        if unsafe { *((data + i) as *const u8) } == b'\n' {
            line_end = i + 1;
            break;
        }
        i += 1;
    }
    if line_end == 0 {
        return;
    }
    let line_end = launder(line_end as u64) as usize & 255;
    if line_end == 0 {
        return;
    }
    // Already carries a traceparent (an SDK, or a proxy forwarding one): leave it alone.
    let mut j = line_end;
    while j < SCAN {
        if data + j + 12 > end {
            break;
        }
        let p = (data + j) as *const u8;
        // SAFETY: 12 bytes available.
        let hit = unsafe {
            *p.sub(1) == b'\n'
                && (*p | 0x20) == b't'
                && (*p.add(1) | 0x20) == b'r'
                && (*p.add(2) | 0x20) == b'a'
                && (*p.add(3) | 0x20) == b'c'
                && (*p.add(4) | 0x20) == b'e'
                && (*p.add(5) | 0x20) == b'p'
                && (*p.add(6) | 0x20) == b'a'
                && (*p.add(7) | 0x20) == b'r'
                && (*p.add(8) | 0x20) == b'e'
                && (*p.add(9) | 0x20) == b'n'
                && (*p.add(10) | 0x20) == b't'
                && *p.add(11) == b':'
        };
        if hit {
            count(Counter::InjectSkippedHasHeader);
            return;
        }
        j += 1;
    }

    let ts = now();
    let fresh = |c: ServingCtx| c.inflight == 1 && ts - c.ts_ns < CTX_MAX_AGE_NS;
    // SAFETY: values copied out immediately.
    let thread = unsafe { THREAD_CTX.get(&id) }.copied();
    let trace_id = match thread {
        Some(c) if fresh(c) => c.trace_id,
        Some(c) if c.inflight > 1 => random_bytes::<16>(),
        _ => match unsafe { PROC_CTX.get(&tgid) }.copied() {
            Some(c) if fresh(c) => c.trace_id,
            _ => random_bytes::<16>(),
        },
    };
    let span_id = random_bytes::<8>();
    let _ = tid;

    let mut line = [0u8; TRACEPARENT_LINE_LEN];
    let prefix = b"traceparent: 00-";
    let hex = b"0123456789abcdef";
    let mut k = 0;
    while k < 16 {
        line[k] = prefix[k];
        k += 1;
    }
    let mut b = 0;
    while b < 16 {
        line[16 + 2 * b] = hex[(trace_id[b] >> 4) as usize];
        line[17 + 2 * b] = hex[(trace_id[b] & 15) as usize];
        b += 1;
    }
    line[48] = b'-';
    b = 0;
    while b < 8 {
        line[49 + 2 * b] = hex[(span_id[b] >> 4) as usize];
        line[50 + 2 * b] = hex[(span_id[b] & 15) as usize];
        b += 1;
    }
    line[65] = b'-';
    line[66] = b'0';
    line[67] = b'1';
    line[68] = b'\r';
    line[69] = b'\n';

    let at = line_end as u32;
    if ctx.push_data(at, TRACEPARENT_LINE_LEN as u32, 0).is_err() {
        count(Counter::InjectFailed);
        return;
    }
    // SAFETY: valid context; the range was just inserted.
    let pulled = unsafe { bpf_msg_pull_data(ctx.msg, at, at + TRACEPARENT_LINE_LEN as u32, 0) };
    let data = ctx.data();
    let end = ctx.data_end();
    if pulled != 0 || data + TRACEPARENT_LINE_LEN > end {
        // Never send the inserted bytes unwritten: take them out again.
        let _ = ctx.pop_data(at, TRACEPARENT_LINE_LEN as u32, 0);
        count(Counter::InjectFailed);
        return;
    }
    let mut w = 0;
    while w < TRACEPARENT_LINE_LEN {
        // SAFETY: `data + TRACEPARENT_LINE_LEN <= end` checked above.
        unsafe { *((data + w) as *mut u8) = line[w] };
        w += 1;
    }
    // One contiguous message, so it leaves as one segment: split in parts, the tail could wait
    // behind Nagle's algorithm for the peer's delayed ACK (40 ms per request).
    let total = size + TRACEPARENT_LINE_LEN;
    if total <= MAX_CAPTURE {
        // SAFETY: valid context; the whole message.
        let _ = unsafe { bpf_msg_pull_data(ctx.msg, 0, total as u32, 0) };
    }
    count(Counter::Injected);
    let _ = INJECTED.insert(
        &id,
        &InjectedCtx {
            trace_id,
            span_id,
            ts_ns: ts,
        },
        BPF_ANY as u64,
    );
}
