//! Cross-host context propagation (off by default, `--propagate`): insert a W3C
//! `traceparent` line into outgoing HTTP/1 requests of traced processes that carry none.
//!
//! - A server thread that reads a request records the trace it serves (THREAD_CTX, and
//!   PROC_CTX for thread pools): the trace of a `traceparent` on the first header line (where
//!   sonde itself puts it), else a new one. Answering decrements its in-flight count.
//! - sock_ops (sockmsg.rs, only in the `sonde-propagate` object) marks client sockets of traced processes at connect() and puts them in SOCKS
//!   once established; only those sockets get the sk_msg program (server sockets never do).
//! - sk_msg, on a request that has no `traceparent`, inserts one after the request line. The
//!   trace is the one the thread (or, failing that, the process) serves if exactly one request
//!   is in flight — otherwise a new trace: no parent is better than a wrong one. The span id
//!   is new, and is reported to userspace (INJECTED) to become the CLIENT span's id.
use agent_common::*;
use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use core::ptr::addr_of;

use super::{CONFIG, Scratch, cfg_u32};

#[map]
pub(crate) static THREAD_CTX: LruHashMap<u64, ServingCtx> = LruHashMap::with_max_entries(65536, 0);
#[map]
pub(crate) static PROC_CTX: LruHashMap<u32, ServingCtx> = LruHashMap::with_max_entries(16384, 0);
#[map]
pub(crate) static INJECTED: LruHashMap<u64, InjectedCtx> = LruHashMap::with_max_entries(65536, 0);
#[map]
pub(crate) static TMP: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A serving context older than this is not propagated (a stuck or idle thread).
pub(crate) const CTX_MAX_AGE_NS: u64 = 30_000_000_000;
#[allow(
    dead_code,
    reason = "used by sockmsg.rs, in the sonde-propagate object only"
)]
pub(crate) const SCAN: usize = 512;
pub(crate) const LINE_SCAN: usize = 200;

#[allow(
    dead_code,
    reason = "used by sockmsg.rs, in the sonde-propagate object only"
)]
#[inline(always)]
pub(crate) fn enabled() -> bool {
    cfg_u32(addr_of!(CONFIG.propagate)) != 0
}

#[inline(always)]
pub(crate) fn now() -> u64 {
    // SAFETY: helper with no arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        // SAFETY: helper with no arguments.
        let r = unsafe { bpf_get_prandom_u32() }.to_le_bytes();
        let mut j = 0;
        while j < 4 && i + j < N {
            out[i + j] = r[j];
            j += 1;
        }
        i += 4;
    }
    out
}

#[inline(always)]
pub(crate) fn is_method_start(b: &[u8; 4]) -> bool {
    matches!(
        b,
        b"GET " | b"POST" | b"PUT " | b"DELE" | b"HEAD" | b"PATC" | b"OPTI"
    )
}

#[inline(always)]
fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[inline(always)]
fn at(s: &Scratch, i: usize) -> u8 {
    // Masked so the verifier sees the bound; callers stay below the captured length.
    s.data[i & (MAX_CAPTURE - 1)]
}

/// Stores and reloads `v` through memory the verifier cannot see into: every path that found
/// a different `v` then continues in one state instead of one state each (a scan loop that
/// can stop at any of 200 positions would otherwise multiply everything after it by 200).
#[inline(always)]
pub(crate) fn launder(v: u64) -> u64 {
    match TMP.get_ptr_mut(0) {
        // SAFETY: per-CPU slot owned by this invocation.
        Some(p) => unsafe {
            core::ptr::write_volatile(p, v);
            core::ptr::read_volatile(p)
        },
        None => v,
    }
}

/// The trace id of a `traceparent: 00-<id>-...` line right after the request line.
#[inline(always)]
fn leading_traceparent(s: &Scratch, len: usize) -> Option<[u8; 16]> {
    let mut nl = 0usize;
    let mut i = 0usize;
    while i < LINE_SCAN {
        if i >= len {
            return None;
        }
        if at(s, i) == b'\n' {
            nl = i + 1;
            break;
        }
        i += 1;
    }
    let nl = launder(nl as u64) as usize & 511;
    if nl == 0 || nl + 16 + 32 > len {
        return None;
    }
    let want = b"traceparent: 00-";
    let mut k = 0;
    while k < 16 {
        let c = at(s, nl + k);
        let c = if c.is_ascii_uppercase() { c | 0x20 } else { c };
        if c != want[k] {
            return None;
        }
        k += 1;
    }
    let mut id = [0u8; 16];
    let mut b = 0;
    while b < 16 {
        let hi = hex_val(at(s, nl + 16 + 2 * b))?;
        let lo = hex_val(at(s, nl + 17 + 2 * b))?;
        id[b] = hi << 4 | lo;
        b += 1;
    }
    Some(id)
}

/// A server read: when it starts a request, record the trace this thread now serves.
///
/// A global (non-inlined, exported) function: the verifier checks it once, with unknown
/// arguments, instead of once per path of every data program that calls it.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn sonde_server_read(id: u64, tgid: u32, copied: u64) -> u32 {
    let Some(p) = super::SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch owned by this program invocation.
    let s = unsafe { &mut *p };
    on_server_read(id, tgid, s, copied);
    0
}

#[inline(always)]
fn on_server_read(id: u64, tgid: u32, s: &mut Scratch, copied: u64) {
    if copied < 4 {
        return;
    }
    let head = [at(s, 0), at(s, 1), at(s, 2), at(s, 3)];
    if !is_method_start(&head) {
        return;
    }
    let trace_id = leading_traceparent(s, copied as usize).unwrap_or_else(random_bytes::<16>);
    let ts = now();
    // SAFETY: values copied out immediately.
    let prev = unsafe { THREAD_CTX.get(&id) }.copied();
    let inflight = match prev {
        Some(p) if ts - p.ts_ns < CTX_MAX_AGE_NS => p.inflight + 1,
        _ => 1,
    };
    let ctx = ServingCtx {
        trace_id,
        ts_ns: ts,
        inflight,
        _pad: 0,
    };
    let _ = THREAD_CTX.insert(&id, &ctx, BPF_ANY as u64);
    // SAFETY: as above.
    let pprev = unsafe { PROC_CTX.get(&tgid) }.copied();
    let pinflight = match pprev {
        Some(p) if ts - p.ts_ns < CTX_MAX_AGE_NS => p.inflight + 1,
        _ => 1,
    };
    let _ = PROC_CTX.insert(
        &tgid,
        &ServingCtx {
            inflight: pinflight,
            ..ctx
        },
        BPF_ANY as u64,
    );
    s.hdr.ctx_kind = CTX_SERVER;
    s.hdr.ctx_trace_id = trace_id;
}

/// A server write: a response start ends one in-flight request of this thread and process.
#[inline(always)]
pub(crate) fn on_server_write(id: u64, tgid: u32, s: &mut Scratch, copied: u64) {
    if copied < 5 || [at(s, 0), at(s, 1), at(s, 2), at(s, 3), at(s, 4)] != *b"HTTP/" {
        return;
    }
    if let Some(p) = THREAD_CTX.get_ptr_mut(&id) {
        // SAFETY: map value pointer; a racing update only skews a counter.
        unsafe { (*p).inflight = (*p).inflight.saturating_sub(1) };
    }
    if let Some(p) = PROC_CTX.get_ptr_mut(&tgid) {
        // SAFETY: as above.
        unsafe { (*p).inflight = (*p).inflight.saturating_sub(1) };
    }
}

/// A client write: report the context sk_msg inserted into it, if any.
#[inline(always)]
pub(crate) fn take_injected(id: u64, s: &mut Scratch) {
    // SAFETY: value copied out immediately.
    let Some(inj) = (unsafe { INJECTED.get(&id) }).copied() else {
        return;
    };
    let _ = INJECTED.remove(&id);
    if now() - inj.ts_ns > 1_000_000_000 {
        return;
    }
    s.hdr.ctx_kind = CTX_INJECTED;
    s.hdr.ctx_trace_id = inj.trace_id;
    s.hdr.ctx_span_id = inj.span_id;
}
