//! Process lifecycle: a traced process's exit ends its connections; in filter mode, exec and
//! fork report processes as they start so userspace can select them before they serve.

use core::ptr::addr_of;

use agent_common::*;
use aya_ebpf::{
    bindings::BPF_RB_FORCE_WAKEUP,
    helpers::generated::bpf_ktime_get_ns,
    macros::{map, tracepoint},
    maps::Array,
    programs::TracePointContext,
};

use super::{ARGS, CONFIG, EVENTS, cfg_u32, count, emit_header, ids, traced, wakeup_flags};

#[tracepoint]
pub fn process_exit(ctx: TracePointContext) -> u32 {
    let (id, tgid, tid) = ids();
    if !traced(tgid) {
        return 0;
    }
    // A thread killed inside a syscall never reaches its exit hook.
    let _ = ARGS.remove(&id);
    // The process ends with its last thread, which the kernel reports where it can. The
    // leader may leave first (pthread_exit) while other threads go on serving.
    let group_dead_at = cfg_u32(addr_of!(CONFIG.exit_group_dead));
    let ends = if group_dead_at != 0 {
        // SAFETY: offset from the tracepoint's format file; the read is checked.
        matches!(unsafe { ctx.read_at::<u8>(group_dead_at as usize) }, Ok(v) if v != 0)
    } else {
        tgid == tid
    };
    if !ends {
        return 0;
    }
    emit_header(
        EV_PROC_EXIT,
        tid,
        ConnId {
            tgid,
            fd: 0,
            generation: 0,
        },
    );
    0
}

// ---- process selection (filter mode) -------------------------------------------------------

/// Time of the last forced wakeup for a selection event (one slot).
#[map]
static SELECT_WAKE: Array<u64> = Array::with_max_entries(1, 0);

const CLONE_THREAD: u64 = 0x0001_0000;

/// Emits a selection event and wakes the reader at once (at most once per millisecond), so
/// that a process that starts after sonde is traced before it serves its first requests.
#[inline(always)]
fn emit_selection(kind: u8, tid: u32, tgid: u32, child: u32) {
    // SAFETY: helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let hdr = EventHeader {
        kind,
        _pad: [0; 3],
        tid,
        ts_ns: now,
        conn: ConnId {
            tgid,
            fd: child,
            generation: 0,
        },
    };
    let mut flags = wakeup_flags();
    if let Some(last) = SELECT_WAKE.get_ptr_mut(0) {
        // SAFETY: one u64 slot; a racing update only costs an extra wakeup.
        unsafe {
            if now.wrapping_sub(*last) > 1_000_000 {
                *last = now;
                flags = BPF_RB_FORCE_WAKEUP as u64;
            }
        }
    }
    if EVENTS.output(&hdr, flags).is_err() {
        count(Counter::RingbufFull);
    }
}

#[tracepoint]
pub fn process_exec(_ctx: TracePointContext) -> u32 {
    if cfg_u32(addr_of!(CONFIG.filter_pids)) == 0 {
        return 0;
    }
    let (_, tgid, tid) = ids();
    if tgid == cfg_u32(addr_of!(CONFIG.self_tgid)) {
        return 0;
    }
    emit_selection(EV_PROC_EXEC, tid, tgid, 0);
    0
}

/// task/task_newtask: a new task; only new processes forked by traced ones are reported.
#[tracepoint]
pub fn new_task(ctx: TracePointContext) -> u32 {
    let pid_off = cfg_u32(addr_of!(CONFIG.newtask_pid));
    if cfg_u32(addr_of!(CONFIG.filter_pids)) == 0 || pid_off == 0 {
        return 0;
    }
    // SAFETY: offsets from the tracepoint's format file; reads are checked by the helper.
    let flags = unsafe { ctx.read_at::<u64>(cfg_u32(addr_of!(CONFIG.newtask_flags)) as usize) };
    match flags {
        Ok(f) if f & CLONE_THREAD == 0 => {}
        _ => return 0,
    }
    let (_, tgid, tid) = ids();
    if !traced(tgid) {
        return 0;
    }
    // SAFETY: as above.
    let Ok(child) = (unsafe { ctx.read_at::<u32>(pid_off as usize) }) else {
        return 0;
    };
    emit_selection(EV_PROC_FORK, tid, tgid, child);
    0
}
