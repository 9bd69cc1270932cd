//! Wire types shared by the kernel programs (`agent-ebpf`) and the userspace agent.
//!
//! Every type is `#[repr(C)]` with explicit, zeroed padding so that map keys compare
//! byte-for-byte and events decode the same on both sides. Sizes are asserted at compile time.
//! Event kinds are numbered and never reused.
#![no_std]

use core::mem::size_of;

/// Map names, shared so the loader and the kernel object agree (kernel truncates at 15 bytes).
pub mod maps {
    pub const EVENTS: &str = "EVENTS";
    pub const CONNS: &str = "CONNS";
    pub const ARGS: &str = "ARGS";
    pub const PIDS: &str = "PIDS";
    pub const SELF_PORTS: &str = "SELF_PORTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const SCRATCH: &str = "SCRATCH";
    pub const SOCKS: &str = "SOCKS";
    pub const PROP_MARK: &str = "PROP_MARK";
    pub const THREAD_CTX: &str = "THREAD_CTX";
    pub const PROC_CTX: &str = "PROC_CTX";
    pub const INJECTED: &str = "INJECTED";
}

/// Largest number of payload bytes copied from one syscall. A power of two: the kernel masks
/// lengths with `MAX_CAPTURE - 1` so the verifier can bound every copy.
pub const MAX_CAPTURE: usize = 16384;

/// Event kinds (first byte of every event). Never reuse a number.
pub const EV_OPEN: u8 = 1;
pub const EV_DATA: u8 = 2;
pub const EV_CLOSE: u8 = 3;
pub const EV_PROC_EXIT: u8 = 4;
/// A process called exec (filter mode only): its executable may now match `--exe`.
pub const EV_PROC_EXEC: u8 = 5;
/// A traced process forked a child process (filter mode only); header-only, the child's pid
/// in `conn.fd`.
pub const EV_PROC_FORK: u8 = 6;

/// Connection roles as the kernel first saw them.
pub const ROLE_UNKNOWN: u8 = 0;
/// The process accepted this connection (it is the server side).
pub const ROLE_SERVER: u8 = 1;
/// The process connected this socket (it is the client side).
pub const ROLE_CLIENT: u8 = 2;

/// Data direction relative to the traced process.
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// An empty argument slot (the syscall that filled it has exited).
pub const SYS_NONE: u8 = 0;
/// Which syscall produced a data event (diagnostics only).
pub const SYS_READ: u8 = 1;
pub const SYS_WRITE: u8 = 2;
pub const SYS_READV: u8 = 3;
pub const SYS_WRITEV: u8 = 4;
pub const SYS_RECVFROM: u8 = 5;
pub const SYS_SENDTO: u8 = 6;
pub const SYS_RECVMSG: u8 = 7;
pub const SYS_SENDMSG: u8 = 8;
pub const SYS_SENDFILE: u8 = 9;
/// Only in argument slots, never in events.
pub const SYS_CONNECT: u8 = 10;

/// A connection's identity. `gen` is the kernel monotonic time at which sonde first saw the
/// (tgid, fd) pair, so a reused fd or a reused pid yields a new identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnId {
    pub tgid: u32,
    pub fd: u32,
    pub generation: u64,
}
const _: () = assert!(size_of::<ConnId>() == 16);

/// Common header, first in every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    pub kind: u8,
    pub _pad: [u8; 3],
    /// Thread id (kernel pid) that made the syscall.
    pub tid: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC). Data the process wrote (egress) is stamped at
    /// syscall entry, data it read (ingress) at syscall exit: so a byte is always stamped
    /// before the peer can have read it, which keeps cross-process causality in timestamp
    /// order and spans nested.
    pub ts_ns: u64,
    pub conn: ConnId,
}
const _: () = assert!(size_of::<EventHeader>() == 32);

/// A connection became known: accepted, connected, or first seen carrying data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenEvent {
    pub hdr: EventHeader,
    pub role: u8,
    /// 4 or 6 (address family of the socket).
    pub family: u8,
    pub _pad: [u8; 2],
    pub local_port: u16,
    pub remote_port: u16,
    /// IPv4 addresses use the first 4 bytes; network byte order.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Task name (`comm`) of the opener: identifies processes that exit before userspace
    /// can read their /proc entry (curl and other short-lived clients).
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<OpenEvent>() == 88);

/// Bytes moved by one syscall on a tracked connection. `len` is the full count the syscall
/// returned; only the first `cap_len` bytes follow the header (see `MAX_CAPTURE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DataEventHeader {
    pub hdr: EventHeader,
    pub dir: u8,
    pub syscall: u8,
    pub _pad: [u8; 2],
    pub cap_len: u32,
    /// Stream offset (per direction) of the first byte of this syscall.
    pub pos: u64,
    pub len: u64,
    /// Trace context the kernel chose for this syscall (propagation mode): `CTX_*`.
    pub ctx_kind: u8,
    pub _pad2: [u8; 7],
    pub ctx_trace_id: [u8; 16],
    pub ctx_span_id: [u8; 8],
}
const _: () = assert!(size_of::<DataEventHeader>() == 88);

/// No kernel trace context on this event.
pub const CTX_NONE: u8 = 0;
/// A request was read by a server: `ctx_trace_id` is the trace the kernel will propagate
/// from this thread (taken from a leading `traceparent` line, else new).
pub const CTX_SERVER: u8 = 1;
/// `traceparent: 00-<ctx_trace_id>-<ctx_span_id>-01` was inserted into this outgoing request.
pub const CTX_INJECTED: u8 = 2;

/// Context of the server requests a thread (or process) is serving (THREAD_CTX/PROC_CTX).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ServingCtx {
    pub trace_id: [u8; 16],
    /// When the latest request was read.
    pub ts_ns: u64,
    /// Requests read and not yet answered.
    pub inflight: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ServingCtx>() == 32);

/// Context inserted into a thread's latest outgoing request (INJECTED), for the syscall-exit
/// program to report.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InjectedCtx {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub ts_ns: u64,
}
const _: () = assert!(size_of::<InjectedCtx>() == 32);

/// Length of the header line sonde inserts: `traceparent: 00-{32}-{16}-01\r\n`.
pub const TRACEPARENT_LINE_LEN: usize = 70;

/// Kernel-side state of one tracked connection (CONNS value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnState {
    pub generation: u64,
    /// Bytes read / written so far.
    pub pos: [u64; 2],
    pub role: u8,
    /// `CONN_F_*` bits.
    pub flags: u8,
    /// Peer and local ports (host order), for the exporter-connection check.
    pub remote_port: u16,
    pub local_port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<ConnState>() == 32);

/// This connection is not to be reported (e.g. its peer is sonde's own exporter socket).
pub const CONN_F_IGNORE: u8 = 1;
/// The peer was checked against sonde's own exporter ports after the connection carried data
/// (closes the race where the accept completes before sonde's connect() returns).
pub const CONN_F_CHECKED: u8 = 2;

/// Arguments saved at syscall entry for use at exit (ARGS value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SyscallArgs {
    pub fd: u64,
    /// User pointer: buffer, iovec array, msghdr or sockaddr, per `kind`.
    pub ptr: u64,
    /// Buffer length or iovec count.
    pub count: u64,
    pub kind: u8,
    pub syscall: u8,
    pub _pad: [u8; 6],
    /// `bpf_ktime_get_ns()` at syscall entry.
    pub enter_ns: u64,
}
const _: () = assert!(size_of::<SyscallArgs>() == 40);

pub const ARG_BUF: u8 = 1;
pub const ARG_IOVEC: u8 = 2;
pub const ARG_MSGHDR: u8 = 3;
pub const ARG_SOCKADDR: u8 = 4;
pub const ARG_NONE: u8 = 5;

/// Kernel struct offsets read from BTF by userspace and handed to the programs as a global
/// (aya has no CO-RE relocations). All offsets in bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelOffsets {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    pub socket_file: u32,
    pub sk_family: u32,
    pub sk_type: u32,
    pub sk_protocol: u32,
    pub sk_daddr: u32,
    pub sk_rcv_saddr: u32,
    pub sk_dport: u32,
    pub sk_num: u32,
    pub sk_v6_daddr: u32,
    pub sk_v6_rcv_saddr: u32,
}
const _: () = assert!(size_of::<KernelOffsets>() == 64);

/// Runtime configuration handed to the kernel programs as a read-only global.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelConfig {
    /// sonde's own tgid: never traced.
    pub self_tgid: u32,
    /// 1: trace only tgids marked PID_TRACE in PIDS; 0: every process not marked PID_EXCLUDE.
    pub filter_pids: u32,
    /// Bytes copied per syscall, at most `MAX_CAPTURE`.
    pub capture_bytes: u32,
    /// Wake the reader early once this many bytes are waiting in the ring buffer.
    pub wakeup_bytes: u32,
    pub offsets: KernelOffsets,
    /// 1: insert `traceparent` into outgoing HTTP/1 requests of traced processes.
    pub propagate: u32,
    /// Offsets in `struct pt_regs` of syscall arguments 0..3 at syscall exit. Used by the
    /// `exitr_*` exit programs, which need no entry hook.
    pub regs_args: [u32; 3],
    /// Offsets of `pid` and `clone_flags` in the task/task_newtask record (from its format
    /// file); 0: not known, no fork events.
    pub newtask_pid: u32,
    pub newtask_flags: u32,
    /// Offsets of `nvcsw` and `nivcsw` in `struct task_struct`: a thread's context-switch
    /// counts, which tell an egress exit whether this CPU's entry stamp is its own.
    pub task_nvcsw: u32,
    pub task_nivcsw: u32,
    /// Offset of `group_dead` in the sched/sched_process_exit record (Linux 6.16 and later):
    /// the process ends with its last thread. 0: not reported, the thread-group leader's
    /// exit is taken as the process's.
    pub exit_group_dead: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<KernelConfig>() == 120);

/// Kernel-side counters (per-CPU array indices). Never reuse a number.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Ring buffer was full: an event was lost.
    RingbufFull = 0,
    /// Data syscalls reported (events written).
    DataEvents = 1,
    /// Bytes beyond the capture limit that were not copied (still counted in positions).
    TruncatedBytes = 2,
    /// Reading user memory failed.
    ReadUserFailed = 3,
    /// Reading kernel memory (socket lookup) failed.
    ReadKernelFailed = 4,
    /// Connection table was full when inserting.
    ConnTableFull = 5,
    /// Args table was full at syscall entry.
    ArgsTableFull = 6,
    /// Connections opened (all roles).
    ConnsOpened = 7,
    /// Connections skipped because their peer is sonde's exporter.
    SelfConnsSkipped = 8,
    /// `traceparent` headers inserted into outgoing requests.
    Injected = 9,
    /// Outgoing requests left alone because they already carry `traceparent`.
    InjectSkippedHasHeader = 10,
    /// Insertion failed (push/pull refused by the kernel): the request went out unchanged.
    InjectFailed = 11,
    /// Client sockets put under the propagation program.
    PropagatedSockets = 12,
    /// Egress syscalls stamped at exit rather than entry: the thread was switched out in
    /// between (a blocking send), so its entry time was not kept. Not a loss.
    EgressStampedAtExit = 13,
}
pub const COUNTER_COUNT: u32 = 14;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain-old-data, `#[repr(C)]`, every field an integer or integer array, all
    // padding explicit.
    unsafe impl aya::Pod for ConnState {}
    unsafe impl aya::Pod for KernelConfig {}
}

/// PIDS values: in filter mode only PID_TRACE processes are traced; otherwise every process
/// but PID_EXCLUDE ones.
pub const PID_TRACE: u8 = 1;
pub const PID_EXCLUDE: u8 = 2;

/// PIDS is a bitmap array: two bits (a PID_* value) per tgid, 32 tgids per u64 word, indexed
/// directly by tgid. An array lookup is an address computation the verifier inlines; a hash
/// lookup walks a bucket, and at low request rates its cache misses were the largest part of
/// the hooks' cost.
pub const PIDS_PER_WORD: u32 = 32;
/// The largest pid_max on 64-bit Linux (PID_MAX_LIMIT): PIDS covers every possible tgid
/// with 131072 words (1 MiB).
pub const PID_MAX_LIMIT: u32 = 1 << 22;
pub const PIDS_WORDS: u32 = PID_MAX_LIMIT / PIDS_PER_WORD;

/// The word of PIDS holding `tgid`, and the shift of its two bits.
#[inline(always)]
pub const fn pid_slot(tgid: u32) -> (u32, u32) {
    (tgid / PIDS_PER_WORD, (tgid % PIDS_PER_WORD) * 2)
}
