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
    EbpfContext,
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

#[path = "data.rs"]
mod data;
#[path = "process.rs"]
mod process;
#[path = "propagate.rs"]
pub(crate) mod propagate;
use data::{save_args, take_args};
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
    exit_group_dead: 0,
    _pad: 0,
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
    unsafe { record_u64(ctx, 16 + 8 * n) }
}

#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: sys_exit records hold the return value at offset 16.
    unsafe { record_u64(ctx, 16) as i64 }
}

/// The 8-byte field at `off` of the tracepoint record, loaded straight from the context: the
/// verifier allows aligned loads inside the record, where `read_at` costs a
/// `bpf_probe_read_kernel` call (two per data syscall on the exit path).
///
/// # Safety
/// `off` must be a constant, 8-aligned offset of a field inside the record.
#[inline(always)]
unsafe fn record_u64(ctx: &TracePointContext, off: usize) -> u64 {
    // SAFETY: per the contract; the verifier rejects the program otherwise.
    unsafe { read_volatile(ctx.as_ptr().cast::<u8>().add(off).cast::<u64>()) }
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
