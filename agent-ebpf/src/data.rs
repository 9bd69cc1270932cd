//! Data syscalls (read/recv*/write/send*/sendfile): their entry and exit programs, and the
//! data event: which connection, where in its stream, and the first bytes that moved.

use super::*;

/// Per CPU: the last egress syscall entry on this CPU (arguments-from-registers path).
#[map]
static STAMPS: PerCpuArray<EntryStamp> = PerCpuArray::with_max_entries(1, 0);

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

/// Remembers a syscall's arguments for its exit. The thread's slot is written in place once
/// it exists: an LRU insert and delete per syscall cost more than the rest of the entry hook.
#[inline(always)]
pub(crate) fn save_args(
    id: u64,
    fd: u64,
    ptr: u64,
    count_: u64,
    kind: u8,
    syscall: u8,
    enter_ns: u64,
) {
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
pub(crate) fn take_args(id: u64, syscall: u8) -> Option<SyscallArgs> {
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
    // The configured bound is loaded (volatile), so this clamp stays in the program even where
    // LLVM can prove `len` small: the verifier tracks ranges less well and must see it.
    let mut len = len;
    let max = cfg_u32(addr_of!(CONFIG.capture_bytes)) as u64;
    if len > max {
        len = max;
    }
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

/// Copies up to `want` bytes gathered from an iovec array (its first `MAX_IOV` segments, read
/// in one helper call).
#[inline(always)]
fn copy_iov(s: &mut Scratch, iov: u64, cnt: u64, want: u64) -> u64 {
    // struct iovec { void *iov_base; size_t iov_len; }
    let mut segs = [[0u64; 2]; MAX_IOV as usize];
    let mut cnt = cnt;
    if cnt > MAX_IOV {
        cnt = MAX_IOV;
    }
    if cnt == 0 {
        return 0;
    }
    // SAFETY: at most MAX_IOV segments, the size of `segs`; the helper validates the source.
    let r = unsafe {
        bpf_probe_read_user(segs.as_mut_ptr().cast(), (cnt * 16) as u32, iov as *const _)
    };
    if r != 0 {
        count(Counter::ReadUserFailed);
        return 0;
    }
    let mut off: u64 = 0;
    for (i, seg) in segs.iter().enumerate() {
        if i as u64 >= cnt || off >= want || off > IOV_OFFSET_LIMIT {
            break;
        }
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
