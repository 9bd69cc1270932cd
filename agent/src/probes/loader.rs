//! Loads the embedded kernel object, patches its configuration, attaches every program and
//! hands out the maps userspace needs.
use std::{ffi::CString, path::Path};

use agent_common::{
    COUNTER_COUNT, ConnId, ConnState, KernelConfig, MAX_CAPTURE, PID_EXCLUDE, PID_TRACE, maps,
    pid_slot,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};

use super::btf::{self, BtfError};

/// The kernel objects built by build.rs (empty when built with AYA_BUILD_SKIP=1). The
/// propagation variant adds a sockhash with sock_ops and sk_msg programs; creating a sockhash
/// needs CAP_NET_ADMIN, so the plain object is loaded unless `--propagate` asks for it.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sonde"));
static OBJECT_PROPAGATE: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sonde-propagate"));

/// Program name → (tracepoint category, tracepoint name, required, which argument path).
/// Names stay within the kernel's 15 characters so that bpftool and the BPF statistics tell
/// them apart: `enter_`/`exit_` per syscall, `exitr_` for exits reading the registers and
/// `stamp_` for the entry time of egress syscalls on that path.
#[rustfmt::skip]
const ATTACH: &[(&str, &str, &str, bool, Args)] = &[
    ("exit_accept", "syscalls", "sys_exit_accept", false, Args::Any),
    ("exit_accept4", "syscalls", "sys_exit_accept4", true, Args::Any),
    ("enter_connect", "syscalls", "sys_enter_connect", true, Args::Any),
    ("exit_connect", "syscalls", "sys_exit_connect", true, Args::Any),
    ("enter_close", "syscalls", "sys_enter_close", true, Args::Any),
    ("process_exit", "sched", "sched_process_exit", false, Args::Any),
    ("process_exec", "sched", "sched_process_exec", false, Args::Any),
    ("new_task", "task", "task_newtask", false, Args::Any),
    // Exit programs before entry programs: an argument slot filled at entry always meets its
    // exit program.
    ("exit_read", "syscalls", "sys_exit_read", true, Args::Entry),
    ("enter_read", "syscalls", "sys_enter_read", true, Args::Entry),
    ("exitr_read", "syscalls", "sys_exit_read", true, Args::Regs),
    ("exit_write", "syscalls", "sys_exit_write", true, Args::Entry),
    ("enter_write", "syscalls", "sys_enter_write", true, Args::Entry),
    ("exitr_write", "syscalls", "sys_exit_write", true, Args::Regs),
    ("stamp_write", "syscalls", "sys_enter_write", true, Args::Regs),
    ("exit_readv", "syscalls", "sys_exit_readv", true, Args::Entry),
    ("enter_readv", "syscalls", "sys_enter_readv", true, Args::Entry),
    ("exitr_readv", "syscalls", "sys_exit_readv", true, Args::Regs),
    ("exit_writev", "syscalls", "sys_exit_writev", true, Args::Entry),
    ("enter_writev", "syscalls", "sys_enter_writev", true, Args::Entry),
    ("exitr_writev", "syscalls", "sys_exit_writev", true, Args::Regs),
    ("stamp_writev", "syscalls", "sys_enter_writev", true, Args::Regs),
    ("exit_recvfrom", "syscalls", "sys_exit_recvfrom", true, Args::Entry),
    ("enter_recvfrom", "syscalls", "sys_enter_recvfrom", true, Args::Entry),
    ("exitr_recvfrom", "syscalls", "sys_exit_recvfrom", true, Args::Regs),
    ("exit_sendto", "syscalls", "sys_exit_sendto", true, Args::Entry),
    ("enter_sendto", "syscalls", "sys_enter_sendto", true, Args::Entry),
    ("exitr_sendto", "syscalls", "sys_exit_sendto", true, Args::Regs),
    ("stamp_sendto", "syscalls", "sys_enter_sendto", true, Args::Regs),
    ("exit_recvmsg", "syscalls", "sys_exit_recvmsg", true, Args::Entry),
    ("enter_recvmsg", "syscalls", "sys_enter_recvmsg", true, Args::Entry),
    ("exitr_recvmsg", "syscalls", "sys_exit_recvmsg", true, Args::Regs),
    ("exit_sendmsg", "syscalls", "sys_exit_sendmsg", true, Args::Entry),
    ("enter_sendmsg", "syscalls", "sys_enter_sendmsg", true, Args::Entry),
    ("exitr_sendmsg", "syscalls", "sys_exit_sendmsg", true, Args::Regs),
    ("stamp_sendmsg", "syscalls", "sys_enter_sendmsg", true, Args::Regs),
    ("exit_sendfile", "syscalls", "sys_exit_sendfile64", false, Args::Entry),
    ("enter_sendfile", "syscalls", "sys_enter_sendfile64", false, Args::Entry),
    ("exitr_sendfile", "syscalls", "sys_exit_sendfile64", false, Args::Regs),
    ("stamp_sendfile", "syscalls", "sys_enter_sendfile64", false, Args::Regs),
];

/// How data syscalls get their arguments to the exit hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Args {
    /// Attached either way.
    Any,
    /// An entry program saves them per thread (works on every kernel).
    Entry,
    /// The exit program reads them from the task's saved registers (needs `bpf_task_pt_regs`,
    /// Linux 5.15, and a register map for this architecture). Ingress syscalls need no entry
    /// hook at all; egress ones only a per-CPU entry time stamp.
    Regs,
}

/// Set to `entry` to force the entry/exit pairs with per-thread argument slots (the path
/// older kernels take); any other value, or unset, lets sonde choose.
pub const SYSCALL_ARGS_ENV: &str = "SONDE_SYSCALL_ARGS";

/// Names of the kernel counters, indexed like `agent_common::Counter`.
pub const COUNTER_NAMES: [&str; COUNTER_COUNT as usize] = [
    "kernel_ringbuf_full",
    "kernel_data_events",
    "kernel_truncated_bytes",
    "kernel_read_user_failed",
    "kernel_read_kernel_failed",
    "kernel_conn_table_full",
    "kernel_args_table_full",
    "kernel_conns_opened",
    "kernel_self_conns_skipped",
    "kernel_traceparent_injected",
    "kernel_inject_skipped_has_header",
    "kernel_inject_failed",
    "kernel_propagated_sockets",
    "kernel_egress_stamped_at_exit",
];

/// The capabilities sonde runs with (proven by tests/tests/faults.rs): CAP_BPF and
/// CAP_PERFMON are required; the other two only widen what /proc reveals.
const CAPS_HINT: &str = "the capabilities CAP_BPF and CAP_PERFMON (plus CAP_SYS_PTRACE and \
CAP_DAC_READ_SEARCH to read other processes' /proc entries; see deploy/systemd/sonde.service)";

/// Whether `e` (or an error it wraps) is EPERM: a missing capability.
fn not_permitted(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(libc::EPERM)
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Where cgroup v2 is mounted (hybrid hierarchies put it under `unified`).
fn cgroup2_root() -> Option<&'static Path> {
    // Only cgroup v2 has cgroup.controllers.
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("cgroup.controllers").exists())
}

/// Attaches sock_ops to the root cgroup v2 (it marks client sockets of traced processes) and
/// sk_msg to their socket map (it inserts `traceparent`). Both detach when sonde exits (they
/// are bpf links / map-owned attachments).
fn attach_propagation(ebpf: &mut Ebpf) -> Result<aya::maps::SockHash<MapData, u64>, ProbeError> {
    use aya::{
        maps::SockHash,
        programs::{CgroupAttachMode, SkMsg, SockOps},
    };
    let root = cgroup2_root().ok_or(ProbeError::Propagation(
        "cgroup v2 is not mounted (looked in /sys/fs/cgroup/unified and /sys/fs/cgroup)".into(),
    ))?;
    let cgroup = std::fs::File::open(root)
        .map_err(|e| ProbeError::Propagation(format!("open {}: {e}", root.display())))?;
    let socks: SockHash<MapData, u64> = SockHash::try_from(
        ebpf.take_map(maps::SOCKS)
            .ok_or(ProbeError::Map(maps::SOCKS, "missing".into()))?,
    )
    .map_err(|e| ProbeError::Map(maps::SOCKS, e.to_string()))?;
    let fail = |what: &str, e: &dyn std::error::Error| {
        let mut msg = format!("{what}: {e}");
        let mut src = e.source();
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        ProbeError::Propagation(msg)
    };
    let msg: &mut SkMsg = ebpf
        .program_mut("sonde_skmsg")
        .ok_or(ProbeError::MissingProgram("sonde_skmsg"))?
        .try_into()
        .map_err(|e| fail("sonde_skmsg", &e))?;
    msg.load().map_err(|e| fail("loading sk_msg", &e))?;
    msg.attach(socks.fd())
        .map_err(|e| fail("attaching sk_msg", &e))?;
    let ops: &mut SockOps = ebpf
        .program_mut("sonde_sockops")
        .ok_or(ProbeError::MissingProgram("sonde_sockops"))?
        .try_into()
        .map_err(|e| fail("sonde_sockops", &e))?;
    ops.load().map_err(|e| fail("loading sock_ops", &e))?;
    ops.attach(&cgroup, CgroupAttachMode::Single)
        .map_err(|e| fail("attaching sock_ops to the root cgroup", &e))?;
    log::info!(
        "context propagation on: traceparent is inserted into outgoing HTTP/1 requests of traced processes"
    );
    Ok(socks)
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("context propagation (--propagate) unavailable: {0}")]
    Propagation(String),
    #[error(
        "this sonde binary was built without kernel programs (AYA_BUILD_SKIP); rebuild it with `cargo xtask build`"
    )]
    NoObject,
    #[error("{0}")]
    Btf(#[from] BtfError),
    #[error(
        "tracefs is not mounted and mounting it failed ({0}); run `mount -t tracefs nodev /sys/kernel/tracing`"
    )]
    Tracefs(std::io::Error),
    #[error(
        "loading the kernel programs failed: {0}; sonde needs root or {caps}, and a kernel >= 5.8; `sonde check` tells what is missing",
        caps = CAPS_HINT
    )]
    Load(#[source] Box<aya::EbpfError>),
    #[error(
        "loading kernel program {name} was not permitted: {source}; sonde needs root or {caps}; `sonde check` tells what is missing",
        caps = CAPS_HINT
    )]
    NotPermitted {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("kernel program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("attaching {name} to tracepoint {category}/{tracepoint} failed: {source}")]
    Attach {
        name: &'static str,
        category: &'static str,
        tracepoint: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {0} is missing or of the wrong type: {1}")]
    Map(&'static str, String),
    #[error("updating the traced-process map failed: {0}")]
    MapUpdate(#[from] aya::maps::MapError),
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Bytes copied per syscall (at most `MAX_CAPTURE`).
    pub capture_bytes: u32,
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Kernel connection table capacity.
    pub max_conns: u32,
    /// Trace only processes added with `Probes::trace_pid`.
    pub filter_pids: bool,
    /// Insert `traceparent` into outgoing requests (sock_ops + sk_msg on cgroup v2).
    pub propagate: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            capture_bytes: MAX_CAPTURE as u32,
            ring_bytes: 16 << 20,
            max_conns: 65536,
            filter_pids: false,
            propagate: false,
        }
    }
}

/// Loaded and attached programs. Dropping it detaches everything (links are owned by `ebpf`).
pub struct Probes {
    _ebpf: Ebpf,
    pids: Array<MapData, u64>,
    conns: HashMap<MapData, u64, ConnState>,
    counters: PerCpuArray<MapData, u64>,
    /// The propagation socket map (its sk_msg attachment lives as long as the map).
    _socks: Option<aya::maps::SockHash<MapData, u64>>,
    /// Tracepoints that could not be attached but are optional.
    pub skipped: Vec<String>,
    from_regs: bool,
}

/// Loads (verifies) one tracepoint program without attaching it.
fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), String> {
    let prog: &mut TracePoint = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    prog.load().map_err(|e| e.to_string())
}

/// The format file of tracepoint `group/event`.
fn tracepoint_format(group: &str, event: &str) -> Option<String> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|d| std::fs::read_to_string(format!("{d}/events/{group}/{event}/format")).ok())
}

/// The offset of the field declared `decl` (e.g. `pid_t pid`) in a tracepoint format file.
fn field_offset(format: &str, decl: &str) -> Option<u32> {
    format.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("field:")?;
        let (field, rest) = rest.split_once(';')?;
        if field.trim() != decl {
            return None;
        }
        rest.trim()
            .strip_prefix("offset:")?
            .split(';')
            .next()?
            .parse::<u32>()
            .ok()
    })
}

/// Offsets of `pid` and `clone_flags` in task/task_newtask records, from the event's format
/// file (a stable layout since Linux 3.x, read rather than assumed).
fn newtask_offsets() -> Option<(u32, u32)> {
    parse_newtask_format(&tracepoint_format("task", "task_newtask")?)
}

fn parse_newtask_format(text: &str) -> Option<(u32, u32)> {
    Some((
        field_offset(text, "pid_t pid")?,
        field_offset(text, "u64 clone_flags")?,
    ))
}

/// Offset of `group_dead` in sched/sched_process_exit records (Linux 6.16 and later): whether
/// the exiting thread is the process's last. 0 when the kernel does not report it.
pub(crate) fn exit_group_dead_offset() -> u32 {
    tracepoint_format("sched", "sched_process_exit")
        .and_then(|f| field_offset(&f, "bool group_dead"))
        .unwrap_or(0)
}

/// `word` with the two bits at `shift` set to `value`.
fn with_pid_bits(word: u64, shift: u32, value: u8) -> u64 {
    word & !(3 << shift) | u64::from(value & 3) << shift
}

/// Mounts tracefs if neither of its usual mount points is populated.
pub fn ensure_tracefs() -> Result<(), ProbeError> {
    for p in [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ] {
        if Path::new(p).is_dir() {
            return Ok(());
        }
    }
    let target = CString::new("/sys/kernel/tracing").expect("no NUL");
    let fstype = CString::new("tracefs").expect("no NUL");
    let source = CString::new("nodev").expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(ProbeError::Tracefs(std::io::Error::last_os_error()));
    }
    log::info!("mounted tracefs at /sys/kernel/tracing");
    Ok(())
}

impl Probes {
    /// Loads and attaches. Returns the probes and the ring buffer to read events from.
    pub fn load(opts: &LoadOptions) -> Result<(Probes, RingBuf<MapData>), ProbeError> {
        let object = if opts.propagate {
            OBJECT_PROPAGATE
        } else {
            OBJECT
        };
        if object.is_empty() {
            return Err(ProbeError::NoObject);
        }
        ensure_tracefs()?;
        let (offsets, regs) = btf::read(Path::new(btf::VMLINUX_BTF))?;
        let forced_entry = std::env::var(SYSCALL_ARGS_ENV).is_ok_and(|v| v == "entry");
        let regs = if forced_entry { None } else { regs };
        let newtask = newtask_offsets();
        let config = KernelConfig {
            self_tgid: std::process::id(),
            filter_pids: opts.filter_pids as u32,
            capture_bytes: opts.capture_bytes.min(MAX_CAPTURE as u32),
            // Wake the reader early when a quarter of the buffer is used; otherwise it drains
            // on its own timer (per-event wakeups cost more than the tracing itself).
            wakeup_bytes: opts.ring_bytes / 4,
            offsets,
            propagate: opts.propagate as u32,
            regs_args: regs.map_or([0; 3], |r| r.regs_args),
            newtask_pid: newtask.map_or(0, |o| o.0),
            newtask_flags: newtask.map_or(0, |o| o.1),
            task_nvcsw: regs.map_or(0, |r| r.task_switches[0]),
            task_nivcsw: regs.map_or(0, |r| r.task_switches[1]),
            exit_group_dead: exit_group_dead_offset(),
            _pad: 0,
        };
        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &config, true)
            .map_max_entries(maps::EVENTS, opts.ring_bytes)
            .map_max_entries(maps::CONNS, opts.max_conns)
            .load(object)
            .map_err(|e| ProbeError::Load(Box::new(e)))?;

        let mut args = if regs.is_some() {
            Args::Regs
        } else {
            Args::Entry
        };
        if args == Args::Regs
            && let Err(e) = ["exitr_read", "stamp_write"]
                .into_iter()
                .try_for_each(|p| load_program(&mut ebpf, p))
        {
            log::info!(
                "data syscalls use entry and exit hooks: reading arguments at exit failed to \
                 load ({e})"
            );
            args = Args::Entry;
        }
        let mut skipped = Vec::new();
        for &(name, category, tracepoint, required, path) in ATTACH {
            if path != Args::Any && path != args {
                continue;
            }
            let prog: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or(ProbeError::MissingProgram(name))?
                .try_into()
                .map_err(|source| ProbeError::Attach {
                    name,
                    category,
                    tracepoint,
                    source: Box::new(source),
                })?;
            let res = if prog.fd().is_ok() {
                Ok(())
            } else {
                prog.load()
            };
            let res = res.and_then(|()| prog.attach(category, tracepoint).map(|_| ()));
            match res {
                Ok(()) => {}
                Err(source) if not_permitted(&source) => {
                    return Err(ProbeError::NotPermitted {
                        name,
                        source: Box::new(source),
                    });
                }
                Err(source) if !required => {
                    log::warn!(
                        "optional tracepoint {category}/{tracepoint} not attached: {source}"
                    );
                    skipped.push(format!("{category}/{tracepoint}"));
                }
                Err(source) => {
                    return Err(ProbeError::Attach {
                        name,
                        category,
                        tracepoint,
                        source: Box::new(source),
                    });
                }
            }
        }

        let socks = if opts.propagate {
            Some(attach_propagation(&mut ebpf)?)
        } else {
            None
        };

        let events = RingBuf::try_from(
            ebpf.take_map(maps::EVENTS)
                .ok_or(ProbeError::Map(maps::EVENTS, "missing".into()))?,
        )
        .map_err(|e| ProbeError::Map(maps::EVENTS, e.to_string()))?;
        let pids = Array::try_from(
            ebpf.take_map(maps::PIDS)
                .ok_or(ProbeError::Map(maps::PIDS, "missing".into()))?,
        )
        .map_err(|e| ProbeError::Map(maps::PIDS, e.to_string()))?;
        let conns = HashMap::try_from(
            ebpf.take_map(maps::CONNS)
                .ok_or(ProbeError::Map(maps::CONNS, "missing".into()))?,
        )
        .map_err(|e| ProbeError::Map(maps::CONNS, e.to_string()))?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map(maps::COUNTERS)
                .ok_or(ProbeError::Map(maps::COUNTERS, "missing".into()))?,
        )
        .map_err(|e| ProbeError::Map(maps::COUNTERS, e.to_string()))?;
        Ok((
            Probes {
                _ebpf: ebpf,
                pids,
                conns,
                counters,
                _socks: socks,
                skipped,
                from_regs: args == Args::Regs,
            },
            events,
        ))
    }

    /// Whether exec and fork of processes are reported (both tracepoints attached).
    pub fn sees_process_starts(&self) -> bool {
        !self
            .skipped
            .iter()
            .any(|t| t == "sched/sched_process_exec" || t == "task/task_newtask")
    }

    /// Whether data syscalls read their arguments at exit, from registers (reads need no
    /// entry hook; sends only a per-CPU time stamp).
    pub fn args_from_regs(&self) -> bool {
        self.from_regs
    }

    /// In filter mode, start tracing `pid`.
    pub fn trace_pid(&mut self, pid: u32) -> Result<(), ProbeError> {
        self.mark_pid(pid, PID_TRACE)
    }

    /// Never trace `pid` (e.g. it runs its own OpenTelemetry SDK).
    pub fn exclude_pid(&mut self, pid: u32) -> Result<(), ProbeError> {
        self.mark_pid(pid, PID_EXCLUDE)
    }

    /// Forget `pid` (it exited).
    pub fn forget_pid(&mut self, pid: u32) {
        let _ = self.mark_pid(pid, 0);
    }

    /// Forgets the kernel's state of connections whose process exited. The kernel closed
    /// their fds without a `close()`, so their entries would otherwise stay, and a later
    /// process given the same pid would have its files on those fd numbers reported as
    /// traffic. An entry already taken over by such a process (a newer generation) stays.
    pub fn forget_conns(&mut self, conns: &[ConnId]) {
        for c in conns {
            let key = (c.tgid as u64) << 32 | c.fd as u64;
            if self
                .conns
                .get(&key, 0)
                .is_ok_and(|st| st.generation == c.generation)
            {
                let _ = self.conns.remove(&key);
            }
        }
    }

    /// Sets the two bits of `pid` in PIDS. Only this thread writes the map (the programs only
    /// read it), so reading and writing back the word loses no other tgid's update.
    fn mark_pid(&mut self, pid: u32, value: u8) -> Result<(), ProbeError> {
        let (word, shift) = pid_slot(pid);
        let old = self.pids.get(&word, 0)?;
        let new = with_pid_bits(old, shift, value);
        if new != old {
            self.pids.set(word, &new, 0)?;
        }
        Ok(())
    }

    /// Kernel counters summed over CPUs, named as in `COUNTER_NAMES`.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        COUNTER_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let v = self
                    .counters
                    .get(&(i as u32), 0)
                    .map(|vals| vals.iter().sum())
                    .unwrap_or(0);
                (*name, v)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tgid_has_its_own_two_bits() {
        use agent_common::{PID_MAX_LIMIT, PIDS_WORDS};
        assert!(pid_slot(PID_MAX_LIMIT - 1).0 < PIDS_WORDS);
        // Neighbours in one word: marking one leaves the other as it was.
        let (w1, s1) = pid_slot(4321);
        let (w2, s2) = pid_slot(4322);
        assert_eq!(w1, w2);
        let word = with_pid_bits(with_pid_bits(0, s1, PID_TRACE), s2, PID_EXCLUDE);
        assert_eq!((word >> s1) & 3, u64::from(PID_TRACE));
        assert_eq!((word >> s2) & 3, u64::from(PID_EXCLUDE));
        let word = with_pid_bits(word, s1, 0);
        assert_eq!((word >> s1) & 3, 0);
        assert_eq!((word >> s2) & 3, u64::from(PID_EXCLUDE));
        // The last tgid of a word uses its top bits.
        assert_eq!(pid_slot(31), (0, 62));
        assert_eq!(pid_slot(32), (1, 0));
    }

    #[test]
    fn reads_newtask_offsets_from_its_format() {
        let format = "name: task_newtask\nID: 205\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
            \tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
            \tfield:pid_t pid;\toffset:8;\tsize:4;\tsigned:1;\n\
            \tfield:char comm[16];\toffset:12;\tsize:16;\tsigned:0;\n\
            \tfield:u64 clone_flags;\toffset:32;\tsize:8;\tsigned:0;\n";
        assert_eq!(parse_newtask_format(format), Some((8, 32)));
        assert_eq!(
            parse_newtask_format("format:\n\tfield:pid_t pid;\toffset:8;"),
            None
        );
        let exit = "name: sched_process_exit\nformat:\n\
            \tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
            \tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\
            \tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;\n\
            \tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n";
        assert_eq!(field_offset(exit, "bool group_dead"), Some(32));
        assert_eq!(field_offset(exit, "bool group"), None);
    }
}
