//! sonde's kernel programs: socket syscalls on syscall tracepoints.
//!
//! Syscall tracepoints are a stable ABI present on every production kernel (no kprobes or
//! fentry needed). Exit programs see the result, copy the first bytes that moved and report
//! them with the connection's stream position. On kernels with `bpf_task_pt_regs` (5.15+)
//! they read the syscall's arguments from the registers saved at kernel entry: reads need no
//! entry hook at all, and sends one that only stamps the time in a per-CPU slot. Elsewhere
//! the entry program saves the arguments in the thread's slot. Every loss path bumps a
//! counter in COUNTERS.
//!
//! Tracepoint record layout (include/trace/events/syscalls.h): common header (8 bytes), the
//! syscall number (8 with padding), then six 8-byte argument slots on entry, or the return
//! value at offset 16 on exit.

use core::ptr::{addr_of, addr_of_mut, read_volatile};

use agent_common::*;
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::bpf_get_current_comm,
    helpers::generated::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_current_task_btf, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs,
    },
    macros::{map, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};

#[path = "process.rs"]
mod process;
#[path = "propagate.rs"]
pub(crate) mod propagate;
use propagate::{on_server_write, sonde_server_read, take_injected};

/// Runtime configuration, patched by the loader before the programs are loaded.
#[unsafe(no_mangle)]
pub(crate) static CONFIG: KernelConfig = KernelConfig {
    self_tgid: 0,
    filter_pids: 0,
    capture_bytes: MAX_CAPTURE as u32,
    wakeup_bytes: 1 << 20,
    offsets: KernelOffsets {
        task_files: 0,
        files_fdt: 0,
        fdt_max_fds: 0,
        fdt_fd: 0,
        file_private_data: 0,
        socket_sk: 0,
        socket_file: 0,
        sk_family: 0,
        sk_type: 0,
        sk_protocol: 0,
        sk_daddr: 0,
        sk_rcv_saddr: 0,
        sk_dport: 0,
        sk_num: 0,
        sk_v6_daddr: 0,
        sk_v6_rcv_saddr: 0,
    },
    propagate: 0,
    regs_args: [0; 3],
    newtask_pid: 0,
    newtask_flags: 0,
    task_nvcsw: 0,
    task_nivcsw: 0,
};

// Sizes are defaults; the loader may resize EVENTS and CONNS.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);
/// (tgid << 32 | fd) → connection state. LRU: a missed close can never fill the table.
#[map]
static CONNS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(65536, 0);
/// pid_tgid → arguments saved at syscall entry.
#[map]
static ARGS: LruHashMap<u64, SyscallArgs> = LruHashMap::with_max_entries(16384, 0);
/// tgid → PID_TRACE / PID_EXCLUDE, two bits per tgid (see `pid_slot`), maintained by
/// userspace.
#[map]
static PIDS: Array<u64> = Array::with_max_entries(PIDS_WORDS, 0);
/// Local ports of sonde's own outgoing connections: the other end of those is a collector.
#[map]
/// Key: sonde's local port << 16 | the collector's port. A source port is only unique per
/// destination, so the pair is what identifies sonde's own connection.
static SELF_PORTS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(4096, 0);

#[inline(always)]
fn self_key(sonde_port: u16, collector_port: u16) -> u32 {
    (sonde_port as u32) << 16 | collector_port as u32
}
/// Per CPU: the last egress syscall entry on this CPU (arguments-from-registers path).
#[map]
static STAMPS: PerCpuArray<EntryStamp> = PerCpuArray::with_max_entries(1, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);
#[map]
pub(crate) static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU staging area for a data event (too big for the 512-byte stack). Per-CPU map values
/// are limited to 32 KiB, which bounds the data area below.
#[repr(C)]
pub(crate) struct Scratch {
    pub(crate) hdr: DataEventHeader,
    pub(crate) data: [u8; SCRATCH_DATA],
}
const SCRATCH_DATA: usize = 32768 - size_of::<DataEventHeader>();
/// Largest offset at which a further iovec segment may start: offset + MAX_CAPTURE must stay
/// inside `data` for the verifier, which bounds offset and length independently.
const IOV_OFFSET_LIMIT: u64 = (SCRATCH_DATA - MAX_CAPTURE) as u64;
const MAX_IOV: u64 = 8;

/// An egress syscall's entry, kept for its exit on the same CPU.
#[repr(C)]
#[derive(Clone, Copy)]
struct EntryStamp {
    /// pid_tgid of the thread.
    id: u64,
    /// The thread's context switches so far: unchanged at exit means the thread never left
    /// this CPU, so no other entry can have overwritten the slot, and it is this syscall's.
    switches: u64,
    ts_ns: u64,
    syscall: u8,
    _pad: [u8; 7],
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u16 = 1;
const IPPROTO_TCP: u16 = 6;
const EINPROGRESS: i64 = -115;

#[inline(always)]
pub(crate) fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot; a lost increment under preemption is acceptable for a counter.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub(crate) fn count_n(c: Counter, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: as in `count`.
        unsafe { *p += n };
    }
}

#[inline(always)]
pub(crate) fn cfg_u32(p: *const u32) -> u32 {
    // SAFETY: `p` points into CONFIG; volatile so the loader's patched value is used.
    unsafe { read_volatile(p) }
}

#[inline(always)]
fn offsets() -> &'static KernelOffsets {
    // SAFETY: CONFIG is a read-only global; fields are read through `cfg_u32`.
    unsafe { &*addr_of!(CONFIG.offsets) }
}

/// Whether events from this process are wanted.
#[inline(always)]
pub(crate) fn traced(tgid: u32) -> bool {
    if tgid == cfg_u32(addr_of!(CONFIG.self_tgid)) {
        return false;
    }
    let (word, shift) = pid_slot(tgid);
    let bits = PIDS.get(word).map_or(0, |w| (*w >> shift) & 3) as u8;
    if cfg_u32(addr_of!(CONFIG.filter_pids)) != 0 {
        bits == PID_TRACE
    } else {
        bits != PID_EXCLUDE
    }
}

#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: syscall tracepoint records hold six 8-byte argument slots from offset 16.
    unsafe { ctx.read_at::<u64>(16 + 8 * n) }.unwrap_or(0)
}

#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: sys_exit records hold the return value at offset 16.
    unsafe { ctx.read_at::<i64>(16) }.unwrap_or(-1)
}

#[inline(always)]
fn read_kernel<T: Copy>(base: u64, off: u32) -> Option<T> {
    let mut v = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: bpf_probe_read_kernel validates the source address; the destination is ours.
    let r = unsafe {
        bpf_probe_read_kernel(
            v.as_mut_ptr().cast(),
            size_of::<T>() as u32,
            (base + off as u64) as *const _,
        )
    };
    if r != 0 {
        count(Counter::ReadKernelFailed);
        return None;
    }
    // SAFETY: fully written by the helper on success.
    Some(unsafe { v.assume_init() })
}

#[inline(always)]
fn read_user<T: Copy>(addr: u64) -> Option<T> {
    let mut v = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: bpf_probe_read_user validates the source address.
    let r = unsafe {
        bpf_probe_read_user(
            v.as_mut_ptr().cast(),
            size_of::<T>() as u32,
            addr as *const _,
        )
    };
    if r != 0 {
        count(Counter::ReadUserFailed);
        return None;
    }
    // SAFETY: fully written by the helper on success.
    Some(unsafe { v.assume_init() })
}

/// The `struct sock *` behind `fd` of the current task, if `fd` is a TCP socket.
/// current->files->fdt->fd[fd]->private_data is a `struct socket` whose `file` points back at
/// the file: that back-pointer is how a socket is recognised without knowing `f_op`.
#[inline(always)]
fn tcp_sock(fd: u32) -> Option<u64> {
    let o = offsets();
    // SAFETY: helper with no arguments.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read_kernel(task, cfg_u32(addr_of!(o.task_files)))?;
    let fdt: u64 = read_kernel(files, cfg_u32(addr_of!(o.files_fdt)))?;
    let max_fds: u32 = read_kernel(fdt, cfg_u32(addr_of!(o.fdt_max_fds)))?;
    if fd >= max_fds {
        return None;
    }
    let fd_array: u64 = read_kernel(fdt, cfg_u32(addr_of!(o.fdt_fd)))?;
    let file: u64 = read_kernel(fd_array + 8 * fd as u64, 0)?;
    if file == 0 {
        return None;
    }
    let socket: u64 = read_kernel(file, cfg_u32(addr_of!(o.file_private_data)))?;
    if socket == 0 {
        return None;
    }
    let back: u64 = read_kernel(socket, cfg_u32(addr_of!(o.socket_file)))?;
    if back != file {
        return None;
    }
    let sk: u64 = read_kernel(socket, cfg_u32(addr_of!(o.socket_sk)))?;
    let family: u16 = read_kernel(sk, cfg_u32(addr_of!(o.sk_family)))?;
    let ty: u16 = read_kernel(sk, cfg_u32(addr_of!(o.sk_type)))?;
    let proto: u16 = read_kernel(sk, cfg_u32(addr_of!(o.sk_protocol)))?;
    if (family == AF_INET || family == AF_INET6) && ty == SOCK_STREAM && proto == IPPROTO_TCP {
        Some(sk)
    } else {
        None
    }
}

/// Fills the address fields of `ev` from the socket.
#[inline(always)]
fn fill_tuple(sk: u64, ev: &mut OpenEvent) -> Option<()> {
    let o = offsets();
    let family: u16 = read_kernel(sk, cfg_u32(addr_of!(o.sk_family)))?;
    let dport: u16 = read_kernel(sk, cfg_u32(addr_of!(o.sk_dport)))?;
    let num: u16 = read_kernel(sk, cfg_u32(addr_of!(o.sk_num)))?;
    ev.remote_port = u16::from_be(dport);
    ev.local_port = num;
    if family == AF_INET {
        ev.family = 4;
        let d: [u8; 4] = read_kernel(sk, cfg_u32(addr_of!(o.sk_daddr)))?;
        let s: [u8; 4] = read_kernel(sk, cfg_u32(addr_of!(o.sk_rcv_saddr)))?;
        ev.remote_addr[..4].copy_from_slice(&d);
        ev.local_addr[..4].copy_from_slice(&s);
    } else {
        ev.family = 6;
        ev.remote_addr = read_kernel(sk, cfg_u32(addr_of!(o.sk_v6_daddr)))?;
        ev.local_addr = read_kernel(sk, cfg_u32(addr_of!(o.sk_v6_rcv_saddr)))?;
    }
    Some(())
}

/// Emits a header-only event (close, process exit).
#[inline(always)]
fn emit_header(kind: u8, tid: u32, conn: ConnId) {
    let hdr = EventHeader {
        kind,
        _pad: [0; 3],
        tid,
        // SAFETY: helper with no arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        conn,
    };
    if EVENTS.output(&hdr, wakeup_flags()).is_err() {
        count(Counter::RingbufFull);
    }
}

#[inline(always)]
pub(crate) fn wakeup_flags() -> u64 {
    // Batched wakeups: the reader drains on a timer; only a filling buffer wakes it early.
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) > cfg_u32(addr_of!(CONFIG.wakeup_bytes)) as u64 {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Starts tracking `fd` of `tgid`. Returns the new state, or None if `fd` is not TCP.
/// `now` stamps the open event and becomes the connection's generation; it must not be later
/// than the first data event's timestamp.
#[inline(always)]
fn track(tgid: u32, tid: u32, fd: u32, role: u8, now: u64) -> Option<ConnState> {
    let sk = tcp_sock(fd)?;
    let mut ev = OpenEvent {
        hdr: EventHeader {
            kind: EV_OPEN,
            _pad: [0; 3],
            tid,
            ts_ns: now,
            conn: ConnId {
                tgid,
                fd,
                generation: now,
            },
        },
        role,
        family: 0,
        _pad: [0; 2],
        local_port: 0,
        remote_port: 0,
        local_addr: [0; 16],
        remote_addr: [0; 16],
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    fill_tuple(sk, &mut ev)?;
    let mut st = ConnState {
        generation: now,
        pos: [0; 2],
        role,
        flags: 0,
        remote_port: ev.remote_port,
        local_port: ev.local_port,
        _pad: [0; 2],
    };
    // The far end of sonde's own exporter connection is a collector: never trace it.
    // SAFETY: plain lookup.
    if role != ROLE_CLIENT
        && unsafe { SELF_PORTS.get(&self_key(ev.remote_port, ev.local_port)) }.is_some()
    {
        st.flags = CONN_F_IGNORE;
        count(Counter::SelfConnsSkipped);
    }
    let key = (tgid as u64) << 32 | fd as u64;
    if CONNS.insert(&key, &st, 0).is_err() {
        count(Counter::ConnTableFull);
        return None;
    }
    if st.flags & CONN_F_IGNORE == 0 {
        count(Counter::ConnsOpened);
        if EVENTS.output(&ev, wakeup_flags()).is_err() {
            count(Counter::RingbufFull);
        }
    }
    Some(st)
}

#[inline(always)]
pub(crate) fn ids() -> (u64, u32, u32) {
    // SAFETY: helper with no arguments.
    let id = unsafe { bpf_get_current_pid_tgid() };
    (id, (id >> 32) as u32, id as u32)
}

// ---- accept / connect / close --------------------------------------------------------------

#[tracepoint]
pub fn exit_accept(ctx: TracePointContext) -> u32 {
    on_accept(&ctx);
    0
}

#[tracepoint]
pub fn exit_accept4(ctx: TracePointContext) -> u32 {
    on_accept(&ctx);
    0
}

#[inline(always)]
fn on_accept(ctx: &TracePointContext) {
    let (_, tgid, tid) = ids();
    let fd = ret(ctx);
    if fd < 0 || !traced(tgid) {
        return;
    }
    // SAFETY: helper with no arguments.
    track(tgid, tid, fd as u32, ROLE_SERVER, unsafe {
        bpf_ktime_get_ns()
    });
}

#[tracepoint]
pub fn enter_connect(ctx: TracePointContext) -> u32 {
    let (id, tgid, _) = ids();
    if tgid != cfg_u32(addr_of!(CONFIG.self_tgid)) && !traced(tgid) {
        return 0;
    }
    save_args(id, arg(&ctx, 0), 0, 0, ARG_NONE, SYS_CONNECT, 0);
    0
}

#[tracepoint]
pub fn exit_connect(ctx: TracePointContext) -> u32 {
    let (id, tgid, tid) = ids();
    let Some(args) = take_args(id, SYS_CONNECT) else {
        return 0;
    };
    let r = ret(&ctx);
    if r != 0 && r != EINPROGRESS {
        return 0;
    }
    let fd = args.fd as u32;
    if tgid == cfg_u32(addr_of!(CONFIG.self_tgid)) {
        // Remember our own local port so the collector's side of this connection is skipped.
        if let Some(sk) = tcp_sock(fd) {
            let local = read_kernel::<u16>(sk, cfg_u32(addr_of!(offsets().sk_num)));
            let remote = read_kernel::<u16>(sk, cfg_u32(addr_of!(offsets().sk_dport)));
            if let (Some(l), Some(r)) = (local, remote) {
                let _ = SELF_PORTS.insert(&self_key(l, u16::from_be(r)), &1, 0);
            }
        }
        return 0;
    }
    // SAFETY: helper with no arguments.
    track(tgid, tid, fd, ROLE_CLIENT, unsafe { bpf_ktime_get_ns() });
    0
}

#[tracepoint]
pub fn enter_close(ctx: TracePointContext) -> u32 {
    let (_, tgid, tid) = ids();
    let fd = arg(&ctx, 0) as u32;
    let key = (tgid as u64) << 32 | fd as u64;
    // SAFETY: value copied out immediately.
    let Some(st) = (unsafe { CONNS.get(&key) }).copied() else {
        return 0;
    };
    let _ = CONNS.remove(&key);
    if st.flags & CONN_F_IGNORE != 0 {
        return 0;
    }
    emit_header(
        EV_CLOSE,
        tid,
        ConnId {
            tgid,
            fd,
            generation: st.generation,
        },
    );
    0
}

// ---- data syscalls -------------------------------------------------------------------------

/// Remembers a syscall's arguments for its exit. The thread's slot is written in place once
/// it exists: an LRU insert and delete per syscall cost more than the rest of the entry hook.
#[inline(always)]
fn save_args(id: u64, fd: u64, ptr: u64, count_: u64, kind: u8, syscall: u8, enter_ns: u64) {
    if let Some(slot) = ARGS.get_ptr_mut(&id) {
        // SAFETY: the slot belongs to this thread (keyed by pid_tgid); only it writes there.
        unsafe {
            (*slot).fd = fd;
            (*slot).ptr = ptr;
            (*slot).count = count_;
            (*slot).kind = kind;
            (*slot).enter_ns = enter_ns;
            (*slot).syscall = syscall;
        }
        return;
    }
    let a = SyscallArgs {
        fd,
        ptr,
        count: count_,
        kind,
        syscall,
        _pad: [0; 6],
        enter_ns,
    };
    if ARGS.insert(&id, &a, 0).is_err() {
        count(Counter::ArgsTableFull);
    }
}

/// The arguments saved at entry of `syscall` by this thread, consumed: a later exit of a
/// syscall whose entry saved nothing finds the slot empty.
#[inline(always)]
fn take_args(id: u64, syscall: u8) -> Option<SyscallArgs> {
    let slot = ARGS.get_ptr_mut(&id)?;
    // SAFETY: as in `save_args`.
    unsafe {
        if (*slot).syscall != syscall {
            return None;
        }
        (*slot).syscall = SYS_NONE;
        Some(*slot)
    }
}

/// Entry of a data syscall of a traced process: remember the arguments. Whether `fd` is a
/// TCP connection is settled at exit, and only when bytes moved.
#[inline(always)]
fn data_enter(ctx: &TracePointContext, kind: u8, syscall: u8, dir: u8) {
    let (id, tgid, _) = ids();
    if !traced(tgid) {
        return;
    }
    // Egress events are stamped at entry: a request's send starts its client span, and the
    // peer may read it before this send returns.
    let enter_ns = if dir == DIR_EGRESS {
        // SAFETY: helper with no arguments.
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    save_args(
        id,
        arg(ctx, 0),
        arg(ctx, 1),
        arg(ctx, 2),
        kind,
        syscall,
        enter_ns,
    );
}

/// First data on an accepted connection: if its peer turned out to be sonde's exporter (its
/// connect() returned after our accept), stop tracing it and tell userspace to forget it.
/// Returns whether the connection is still traced.
#[inline(always)]
fn check_peer(st: *mut ConnState, tgid: u32, fd: u32) -> bool {
    // SAFETY: `st` points at this connection's map value; updated in place so the caller's
    // pointer stays valid.
    let cur = unsafe { *st };
    // SAFETY: plain lookup.
    let ours = unsafe { SELF_PORTS.get(&self_key(cur.remote_port, cur.local_port)) }.is_some();
    // SAFETY: as above.
    unsafe { (*st).flags |= if ours { CONN_F_IGNORE } else { CONN_F_CHECKED } };
    if ours {
        count(Counter::SelfConnsSkipped);
        emit_header(
            EV_CLOSE,
            tgid,
            ConnId {
                tgid,
                fd,
                generation: cur.generation,
            },
        );
    }
    !ours
}

/// Exit of a data syscall whose entry hook saved the arguments.
#[inline(always)]
fn data_exit(ctx: &TracePointContext, dir: u8, syscall: u8) {
    let (id, tgid, tid) = ids();
    let Some(args) = take_args(id, syscall) else {
        return;
    };
    emit_data(ctx, id, tgid, tid, dir, &args);
}

/// Exit of a data syscall on the arguments-from-registers path: fd, buffer and count are
/// read back from the registers saved at kernel entry, which the syscall leaves in place.
/// Ingress events are stamped at exit; egress ones take their entry time from this CPU's
/// stamp, or the exit time if the thread was switched out meanwhile (counted).
#[inline(always)]
fn data_exit_regs(ctx: &TracePointContext, kind: u8, syscall: u8, dir: u8) {
    if ret(ctx) <= 0 {
        return;
    }
    let (id, tgid, tid) = ids();
    if !traced(tgid) {
        return;
    }
    let Some(mut args) = regs_args(kind, syscall) else {
        return;
    };
    if dir == DIR_EGRESS {
        args.enter_ns = match take_stamp(id, syscall) {
            Some(ts) => ts,
            None => {
                count(Counter::EgressStampedAtExit);
                // SAFETY: helper with no arguments.
                unsafe { bpf_ktime_get_ns() }
            }
        };
    }
    emit_data(ctx, id, tgid, tid, dir, &args);
}

/// The current thread's context switches so far (voluntary + involuntary).
#[inline(always)]
fn switches() -> u64 {
    // SAFETY: a trusted (BTF) pointer to the current task; the verifier checks the loads
    // against `struct task_struct` (the offsets are read-only constants from BTF).
    unsafe {
        let task = bpf_get_current_task_btf() as *const u8;
        let at = |p: *const u32| read_volatile(task.add(cfg_u32(p) as usize).cast::<u64>());
        at(addr_of!(CONFIG.task_nvcsw)) + at(addr_of!(CONFIG.task_nivcsw))
    }
}

/// Entry of an egress syscall on the arguments-from-registers path: only the time is needed
/// at exit. Every thread's entry is stamped (cheaper than asking whether it is traced); the
/// slot is per CPU, so this is a few stores, no table lookup.
#[inline(always)]
fn stamp(syscall: u8) {
    let Some(p) = STAMPS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot; tracepoint programs do not migrate while they run.
    unsafe {
        *p = EntryStamp {
            id: bpf_get_current_pid_tgid(),
            switches: switches(),
            ts_ns: bpf_ktime_get_ns(),
            syscall,
            _pad: [0; 7],
        };
    }
}

/// This syscall's entry time from the CPU's stamp, if the stamp is this syscall's own.
#[inline(always)]
fn take_stamp(id: u64, syscall: u8) -> Option<u64> {
    let p = STAMPS.get_ptr_mut(0)?;
    // SAFETY: as in `stamp`.
    unsafe {
        if (*p).id != id || (*p).syscall != syscall || (*p).switches != switches() {
            return None;
        }
        (*p).syscall = SYS_NONE;
        Some((*p).ts_ns)
    }
}

/// The current syscall's first three arguments from its saved registers.
#[inline(always)]
fn regs_args(kind: u8, syscall: u8) -> Option<SyscallArgs> {
    // SAFETY: helpers on the current task. The pointer is a kernel (BTF) pointer to the task's
    // `struct pt_regs`; the verifier checks the loads below against that struct's members
    // (the offsets are read-only constants) and makes them fault-safe.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    if regs.is_null() {
        return None;
    }
    // SAFETY: CONFIG is a read-only global.
    let off = unsafe { &*addr_of!(CONFIG.regs_args) };
    let at = |i: usize| {
        // SAFETY: see above.
        unsafe { read_volatile(regs.add(cfg_u32(addr_of!(off[i])) as usize).cast::<u64>()) }
    };
    Some(SyscallArgs {
        fd: at(0),
        ptr: at(1),
        count: at(2),
        kind,
        syscall,
        _pad: [0; 6],
        enter_ns: 0,
    })
}

/// If `args.fd` is (or becomes) a traced TCP connection, reports the bytes the syscall moved.
/// Connections that predate sonde are picked up here, on first use.
#[inline(always)]
fn emit_data(ctx: &TracePointContext, id: u64, tgid: u32, tid: u32, dir: u8, args: &SyscallArgs) {
    let n = ret(ctx);
    if n <= 0 {
        return;
    }
    let n = n as u64;
    let fd = args.fd as u32;
    let key = (tgid as u64) << 32 | fd as u64;
    let st = match CONNS.get_ptr_mut(&key) {
        Some(st) => st,
        None => {
            let now = if dir == DIR_EGRESS {
                args.enter_ns
            } else {
                // SAFETY: helper with no arguments.
                unsafe { bpf_ktime_get_ns() }
            };
            if track(tgid, tid, fd, ROLE_UNKNOWN, now).is_none() {
                return;
            }
            match CONNS.get_ptr_mut(&key) {
                Some(st) => st,
                None => return,
            }
        }
    };
    // SAFETY: pointer into the map value, copied out.
    let cur = unsafe { *st };
    if cur.flags & CONN_F_IGNORE != 0 {
        return;
    }
    if cur.flags & CONN_F_CHECKED == 0 && cur.role != ROLE_CLIENT && !check_peer(st, tgid, fd) {
        return;
    }
    let d = (dir & 1) as usize;
    // SAFETY: pointer into the map value; concurrent syscalls on one socket may race on the
    // position, which at worst misplaces one event (userspace treats it as a gap).
    let (pos, generation) = unsafe {
        let pos = (*st).pos[d];
        (*st).pos[d] = pos + n;
        (pos, (*st).generation)
    };

    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch owned by this program invocation.
    let s = unsafe { &mut *scratch };
    s.hdr = DataEventHeader {
        hdr: EventHeader {
            kind: EV_DATA,
            _pad: [0; 3],
            tid,
            ts_ns: if dir == DIR_EGRESS {
                args.enter_ns
            } else {
                // SAFETY: helper with no arguments.
                unsafe { bpf_ktime_get_ns() }
            },
            conn: ConnId {
                tgid,
                fd,
                generation,
            },
        },
        dir,
        syscall: args.syscall,
        _pad: [0; 2],
        cap_len: 0,
        pos,
        len: n,
        ctx_kind: CTX_NONE,
        _pad2: [0; 7],
        ctx_trace_id: [0; 16],
        ctx_span_id: [0; 8],
    };

    let mut want = cfg_u32(addr_of!(CONFIG.capture_bytes)) as u64;
    if want > n {
        want = n;
    }
    if want > MAX_CAPTURE as u64 {
        want = MAX_CAPTURE as u64;
    }
    let copied = match args.kind {
        ARG_BUF => copy_user(s, 0, args.ptr, want),
        ARG_IOVEC => copy_iov(s, args.ptr, args.count, want),
        ARG_MSGHDR => {
            // struct user_msghdr: msg_iov at 16, msg_iovlen at 24.
            match (
                read_user::<u64>(args.ptr + 16),
                read_user::<u64>(args.ptr + 24),
            ) {
                (Some(iov), Some(cnt)) => copy_iov(s, iov, cnt, want),
                _ => 0,
            }
        }
        _ => 0,
    };
    s.hdr.cap_len = copied as u32;
    if cfg_u32(addr_of!(CONFIG.propagate)) != 0 {
        // SAFETY: `st` still points at this connection's map value.
        let role = unsafe { (*st).role };
        if role != ROLE_CLIENT && dir == DIR_INGRESS {
            sonde_server_read(id, tgid, copied);
        } else if role != ROLE_CLIENT {
            on_server_write(id, tgid, s, copied);
        }
        if dir == DIR_EGRESS {
            take_injected(id, s);
        }
    }
    if n > copied {
        count_n(Counter::TruncatedBytes, n - copied);
    }
    count(Counter::DataEvents);

    let mut size = size_of::<DataEventHeader>() as u64 + copied;
    if size > size_of::<Scratch>() as u64 {
        size = size_of::<Scratch>() as u64;
    }
    // SAFETY: `size` is bounded by the scratch value, which the verifier checks.
    let rec = unsafe { core::slice::from_raw_parts(scratch as *const u8, size as usize) };
    if EVENTS.output(rec, wakeup_flags()).is_err() {
        count(Counter::RingbufFull);
    }
}

/// Copies `len` user bytes from `src` to `s.data[off..]`; returns bytes copied.
#[inline(always)]
fn copy_user(s: &mut Scratch, off: u64, src: u64, len: u64) -> u64 {
    let mut len = len;
    if len > MAX_CAPTURE as u64 {
        len = MAX_CAPTURE as u64;
    }
    let mut off = off;
    if off > IOV_OFFSET_LIMIT {
        off = IOV_OFFSET_LIMIT;
    }
    // SAFETY: off <= IOV_OFFSET_LIMIT and len <= MAX_CAPTURE keep the write inside `data`.
    let r = unsafe {
        bpf_probe_read_user(
            addr_of_mut!(s.data).cast::<u8>().add(off as usize).cast(),
            len as u32,
            src as *const _,
        )
    };
    if r != 0 {
        count(Counter::ReadUserFailed);
        return 0;
    }
    len
}

/// Copies up to `want` bytes gathered from an iovec array.
#[inline(always)]
fn copy_iov(s: &mut Scratch, iov: u64, cnt: u64, want: u64) -> u64 {
    let mut off: u64 = 0;
    for i in 0..MAX_IOV {
        if i >= cnt || off >= want || off > IOV_OFFSET_LIMIT {
            break;
        }
        // struct iovec { void *iov_base; size_t iov_len; }
        let Some(seg) = read_user::<[u64; 2]>(iov + 16 * i) else {
            break;
        };
        let mut n = seg[1];
        if n > want - off {
            n = want - off;
        }
        if n == 0 {
            continue;
        }
        let got = copy_user(s, off, seg[0], n);
        if got == 0 {
            break;
        }
        off += got;
    }
    off
}

/// A data syscall: the entry/exit pair saving the arguments per thread, and the exit program
/// reading them from registers (with, for egress, the entry stamp).
macro_rules! data_syscall {
    ($enter:ident, $exit:ident, $exit_regs:ident, $kind:expr, $sys:expr, $dir:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            data_enter(&ctx, $kind, $sys, $dir);
            0
        }
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            data_exit(&ctx, $dir, $sys);
            0
        }
        #[tracepoint]
        pub fn $exit_regs(ctx: TracePointContext) -> u32 {
            data_exit_regs(&ctx, $kind, $sys, $dir);
            0
        }
    };
}

/// An egress syscall also has the stamping entry program of the registers path.
macro_rules! egress_syscall {
    ($enter:ident, $exit:ident, $stamp:ident, $exit_regs:ident, $kind:expr, $sys:expr) => {
        data_syscall!($enter, $exit, $exit_regs, $kind, $sys, DIR_EGRESS);
        #[tracepoint]
        pub fn $stamp(_ctx: TracePointContext) -> u32 {
            stamp($sys);
            0
        }
    };
}

#[rustfmt::skip]
mod syscalls {
    use super::*;
    data_syscall!(enter_read, exit_read, exitr_read, ARG_BUF, SYS_READ, DIR_INGRESS);
    data_syscall!(enter_readv, exit_readv, exitr_readv, ARG_IOVEC, SYS_READV, DIR_INGRESS);
    data_syscall!(enter_recvfrom, exit_recvfrom, exitr_recvfrom, ARG_BUF, SYS_RECVFROM, DIR_INGRESS);
    data_syscall!(enter_recvmsg, exit_recvmsg, exitr_recvmsg, ARG_MSGHDR, SYS_RECVMSG, DIR_INGRESS);
    egress_syscall!(enter_write, exit_write, stamp_write, exitr_write, ARG_BUF, SYS_WRITE);
    egress_syscall!(enter_writev, exit_writev, stamp_writev, exitr_writev, ARG_IOVEC, SYS_WRITEV);
    egress_syscall!(enter_sendto, exit_sendto, stamp_sendto, exitr_sendto, ARG_BUF, SYS_SENDTO);
    egress_syscall!(enter_sendmsg, exit_sendmsg, stamp_sendmsg, exitr_sendmsg, ARG_MSGHDR, SYS_SENDMSG);
    // sendfile(out_fd, in_fd, ...): bytes leave through out_fd without passing user memory;
    // they still advance the stream position (nginx sends static bodies this way).
    egress_syscall!(enter_sendfile, exit_sendfile, stamp_sendfile, exitr_sendfile, ARG_NONE, SYS_SENDFILE);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
