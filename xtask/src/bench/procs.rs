//! The processes the benchmarks start (nginx, sonde, an idle process) with RAII cleanup, and
//! what /proc says about them (CPU time, memory) and about the machine.
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::demo::{free_port, wait_port};

/// A child process, stopped (SIGTERM, then SIGKILL) when dropped. Never signals a pid it has
/// already reaped.
pub struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    pub fn spawn(name: &'static str, cmd: &mut Command) -> Result<Proc> {
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc { child, name })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits up to `timeout`; the exit status if it exited.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Some(st);
        }
        // SAFETY: plain syscall; the child is not reaped yet, so the pid is still ours.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.terminate(Duration::from_secs(5)).is_none() {
            eprintln!("bench: {} did not stop on SIGTERM; killing it", self.name);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Raises this process's open-file limit (inherited by everything it starts) to `n`, or as
/// far as the hard limit allows without CAP_SYS_RESOURCE; returns the new soft limit.
pub fn raise_nofile(n: u64) -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    for (cur, max) in [
        (n, n.max(lim.rlim_max)),
        (n.min(lim.rlim_max), lim.rlim_max),
    ] {
        let new = libc::rlimit {
            rlim_cur: cur.max(lim.rlim_cur),
            rlim_max: max,
        };
        // SAFETY: valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            return Ok(new.rlim_cur);
        }
    }
    bail!(
        "cannot raise RLIMIT_NOFILE: {}",
        std::io::Error::last_os_error()
    )
}

// ---- nginx ----------------------------------------------------------------------------

/// Like tests/fixtures/nginx.conf (one worker, keep-alive, `return 200`), with room for the
/// 10k-connection memory run.
const NGINX_CONF: &str = r#"daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile __NOFILE__;
pid __PREFIX__/nginx.pid;
error_log __PREFIX__/error.log warn;
events { worker_connections 16384; multi_accept on; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path __PREFIX__/body;
    proxy_temp_path __PREFIX__/proxy;
    fastcgi_temp_path __PREFIX__/fastcgi;
    uwsgi_temp_path __PREFIX__/uwsgi;
    scgi_temp_path __PREFIX__/scgi;
    server {
        listen 127.0.0.1:__PORT__ backlog=4096;
        location = /ok { default_type text/plain; return 200 "ok\n"; }
    }
}
"#;

/// Stock nginx run from a private copy of its binary, so that `--exe <that path>` selects
/// this nginx only (other people's nginx on this machine stay untraced).
pub struct Nginx {
    proc: Proc,
    pub port: u16,
    /// Path of the binary copy: the `--exe` glob.
    pub exe: PathBuf,
    pub version: String,
    dir: PathBuf,
}

impl Nginx {
    /// `nofile`: the open-file limit nginx may give its worker.
    pub fn start(nofile: u64) -> Result<Nginx> {
        let system = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .context("nginx not found (cargo xtask setup installs it)")?;
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("sonde-bench-{}", std::process::id()));
        fs::create_dir_all(dir.join("bin"))?;
        let exe = dir.join("bin/nginx");
        fs::copy(&system, &exe).with_context(|| format!("copying {}", system.display()))?;
        let conf = NGINX_CONF
            .replace("__PREFIX__", &dir.to_string_lossy())
            .replace("__PORT__", &port.to_string())
            .replace("__NOFILE__", &nofile.to_string());
        fs::write(dir.join("nginx.conf"), conf)?;
        let out = Command::new(&exe).arg("-v").output()?;
        let version = String::from_utf8_lossy(&out.stderr)
            .trim()
            .trim_start_matches("nginx version: ")
            .to_string();
        let proc = Proc::spawn(
            "nginx",
            Command::new(&exe)
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .arg("-p")
                .arg(&dir)
                .stdin(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        let nginx = Nginx {
            proc,
            port,
            exe,
            version,
            dir,
        };
        wait_port(port, "nginx")?;
        Ok(nginx)
    }

    /// CPU time of the master and its workers.
    pub fn cpu(&self) -> Cpu {
        let mut pids = children(self.proc.pid());
        pids.push(self.proc.pid());
        pids.iter().map(|&p| Cpu::of(p)).sum()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.proc.terminate(Duration::from_secs(5));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---- sonde ----------------------------------------------------------------------------

/// A running `sonde run ...`; its log is collected (warnings echoed).
pub struct Sonde {
    proc: Proc,
    log: Arc<Mutex<Vec<String>>>,
}

/// `name=value` counters of sonde's final `stats:` line.
pub type SondeStats = BTreeMap<String, u64>;

/// Counters that say data was lost or dropped somewhere.
pub const LOSS_COUNTERS: &[&str] = &[
    "kernel_ringbuf_full",
    "kernel_conn_table_full",
    "kernel_args_table_full",
    "kernel_read_user_failed",
    "decode_errors",
    "conns_evicted",
    "parse_resyncs",
    "requests_dropped",
    "spans_queue_dropped",
    "spans_export_failed",
    // sonde's own exporter connections are never traced here (its collector is the bench),
    // so a non-zero count means traced connections mistaken for them.
    "kernel_self_conns_skipped",
];

impl Sonde {
    /// Starts `sonde run ARGS` exporting OTLP/HTTP to `endpoint`, and waits until it traces.
    pub fn start(bin: &Path, args: &[String], endpoint: &str) -> Result<Sonde> {
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .args(args)
            .args(["--output", "otlp", "--stats-interval", "0"])
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .env_remove("OTEL_EXPORTER_OTLP_HEADERS")
            .env_remove("OTEL_BSP_SCHEDULE_DELAY")
            .env_remove("OTEL_BSP_MAX_QUEUE_SIZE")
            .env_remove("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
            .env("OTEL_EXPORTER_OTLP_COMPRESSION", "none")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn("sonde", &mut cmd)?;
        let stderr = proc.child.stderr.take().expect("piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(" tracing ") {
                    let _ = tx.send(());
                }
                if line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("  [sonde] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let log = log.lock().unwrap().join("\n");
            bail!("sonde did not start tracing within 60 s:\n{log}");
        }
        Ok(Sonde { proc, log })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGTERM (sonde flushes its spans), waits for a clean exit, returns its final counters.
    pub fn stop(mut self) -> Result<SondeStats> {
        let st = self.proc.terminate(Duration::from_secs(30));
        // Let the reader thread take the last lines.
        std::thread::sleep(Duration::from_millis(100));
        let log = self.log.lock().unwrap().clone();
        match st {
            Some(s) if s.success() => {}
            other => bail!(
                "sonde did not exit cleanly ({other:?}):\n{}",
                log.join("\n")
            ),
        }
        let line = log
            .iter()
            .rev()
            .find_map(|l| l.split_once("stats: ").map(|(_, s)| s.to_string()))
            .context("sonde printed no stats line")?;
        Ok(line
            .split_whitespace()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }
}

/// The non-zero loss counters, `name=value` joined, or `none`.
pub fn losses(stats: &SondeStats) -> String {
    let v: Vec<String> = LOSS_COUNTERS
        .iter()
        .filter_map(|k| {
            stats
                .get(*k)
                .filter(|v| **v > 0)
                .map(|v| format!("{k}={v}"))
        })
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(" ")
    }
}

/// The pipeline's main counters (where spans come from), for the raw log.
pub fn summary(stats: &SondeStats) -> String {
    [
        "kernel_data_events",
        "events",
        "exchanges",
        "spans",
        "spans_exported",
    ]
    .iter()
    .map(|k| format!("{k}={}", stats.get(*k).copied().unwrap_or(0)))
    .collect::<Vec<_>>()
    .join(" ")
}

/// Adds counters (several runs).
pub fn add_stats(total: &mut SondeStats, s: &SondeStats) {
    for (k, v) in s {
        *total.entry(k.clone()).or_default() += v;
    }
}

// ---- BPF run time ---------------------------------------------------------------------

/// The bpf(2) syscall with `attr` as its `union bpf_attr`; returns what the syscall returns.
///
/// # Safety
/// `attr` must have the layout `cmd` expects, and any pointer in it must be valid for what
/// the kernel reads or writes through it.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &T) -> libc::c_long {
    // SAFETY: the kernel reads `size_of::<T>()` bytes of `attr`, which outlives the call.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            size_of::<T>() as libc::c_uint,
        )
    }
}

/// Keeps the kernel's BPF run-time statistics on while alive (`BPF_ENABLE_STATS`: reference
/// counted by the kernel, off again when the last holder closes its fd; no sysctl changed).
pub struct BpfStats(#[allow(dead_code)] OwnedFd);

impl BpfStats {
    pub fn enable() -> Result<BpfStats> {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        // union bpf_attr { struct { __u32 type; } enable_stats; }: BPF_STATS_RUN_TIME = 0.
        // SAFETY: the attribute layout of BPF_ENABLE_STATS; no pointers in it.
        let fd = unsafe { bpf(BPF_ENABLE_STATS, &[0u32; 2]) };
        if fd < 0 {
            bail!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a new fd that nothing else owns.
        Ok(BpfStats(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }
}

/// Program name → (run time in ns, runs) of the BPF programs `pid` holds open, from
/// /proc/PID/fdinfo (counted while [`BpfStats`] is on); names from the kernel's program info.
pub fn bpf_run_time(pid: u32) -> BTreeMap<String, (u64, u64)> {
    let mut progs: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return BTreeMap::new();
    };
    for e in dir.flatten() {
        let Ok(info) = fs::read_to_string(e.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        // Program fds carry run_time_ns; link fds name a prog_id but no run time.
        if let (Some(id), Some(ns), Some(runs)) =
            (field("prog_id"), field("run_time_ns"), field("run_cnt"))
        {
            progs.insert(id, (ns, runs));
        }
    }
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (id, (ns, runs)) in progs {
        let name = prog_name(id as u32).unwrap_or_else(|| format!("prog {id}"));
        let e = out.entry(name).or_default();
        e.0 += ns;
        e.1 += runs;
    }
    out
}

/// A BPF program's name (the kernel keeps 15 bytes of it), by id.
fn prog_name(id: u32) -> Option<String> {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // union bpf_attr: { __u32 prog_id; __u32 next_id; __u32 open_flags; }
    // SAFETY: the attribute layout of BPF_PROG_GET_FD_BY_ID; no pointers in it.
    let fd = unsafe { bpf(BPF_PROG_GET_FD_BY_ID, &[id, 0, 0]) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_prog_info: `name` (16 bytes) at offset 64. Zeroed tail: the kernel accepts a
    // longer buffer than its struct as long as the extra bytes are zero.
    let mut info = [0u8; 256];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: the kernel writes at most `info_len` bytes into `info`, which outlives the call.
    let r = unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &attr) };
    if r != 0 {
        return None;
    }
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

// ---- /proc ----------------------------------------------------------------------------

/// CPU time of a process, two ways: the scheduler's ns-precise run time summed over its live
/// threads (`/proc/PID/task/*/schedstat`), and utime+stime of `/proc/PID/stat` (clock ticks,
/// exited threads included).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    pub sched_ns: u64,
    pub ticks_ns: u64,
}

impl Cpu {
    pub fn of(pid: u32) -> Cpu {
        let mut sched_ns = 0;
        if let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) {
            for t in dir.flatten() {
                sched_ns += fs::read_to_string(t.path().join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        // SAFETY: plain libc call.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let ticks_ns = stat_fields(pid)
            .map(|f| {
                // utime and stime: fields 14 and 15, i.e. 11 and 12 after the comm.
                let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                (t(11) + t(12)) * 1_000_000_000 / hz
            })
            .unwrap_or(0);
        Cpu { sched_ns, ticks_ns }
    }

    /// The precise figure when available.
    pub fn ns(&self) -> u64 {
        if self.sched_ns > 0 {
            self.sched_ns
        } else {
            self.ticks_ns
        }
    }

    pub fn since(&self, earlier: &Cpu) -> Cpu {
        Cpu {
            sched_ns: self.sched_ns.saturating_sub(earlier.sched_ns),
            ticks_ns: self.ticks_ns.saturating_sub(earlier.ticks_ns),
        }
    }
}

impl std::ops::Add for Cpu {
    type Output = Cpu;
    fn add(self, o: Cpu) -> Cpu {
        Cpu {
            sched_ns: self.sched_ns + o.sched_ns,
            ticks_ns: self.ticks_ns + o.ticks_ns,
        }
    }
}

impl std::iter::Sum for Cpu {
    fn sum<I: Iterator<Item = Cpu>>(iter: I) -> Cpu {
        iter.fold(Cpu::default(), |a, b| a + b)
    }
}

/// CPU time other jobs took from this machine during a measured window: busy time of all
/// cores (/proc/stat, steal included: time the hypervisor gave to others) minus what the
/// benchmark's own processes used.
pub struct Window {
    start: Instant,
    busy_ns: u64,
    self_ns: u64,
    children_ns: u64,
}

impl Window {
    pub fn start() -> Window {
        Window {
            start: Instant::now(),
            busy_ns: machine_busy_ns(),
            self_ns: Cpu::of(std::process::id()).ticks_ns,
            children_ns: reaped_children_ns(),
        }
    }

    /// Average cores used by other jobs since `start`; `ours_ns`: CPU of the benchmark's
    /// other live processes (nginx, sonde) over the window. This process (all its threads)
    /// and children reaped meanwhile (wrk) are counted here.
    pub fn foreign_cores(&self, ours_ns: u64) -> f64 {
        let busy = machine_busy_ns().saturating_sub(self.busy_ns);
        let own = Cpu::of(std::process::id())
            .ticks_ns
            .saturating_sub(self.self_ns)
            + reaped_children_ns().saturating_sub(self.children_ns)
            + ours_ns;
        busy.saturating_sub(own) as f64 / 1e9 / self.start.elapsed().as_secs_f64()
    }
}

/// Busy time of all CPUs since boot (user, nice, system, irq, softirq, steal), in ns.
fn machine_busy_ns() -> u64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum();
    // SAFETY: plain libc call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    busy * 1_000_000_000 / hz
}

/// CPU time of this process's children that have been waited for (wrk), in ns.
fn reaped_children_ns() -> u64 {
    // SAFETY: zeroed rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Fields of /proc/PID/stat after the `(comm)`: index 0 is the state (field 3).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Direct children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            stat_fields(p)
                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                .is_some_and(|ppid| ppid == pid)
        })
        .collect()
}

/// A `kB` field of /proc/PID/status (VmRSS, VmHWM, RssAnon, ...), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// CPU model, cores, memory, kernel, load; one line.
pub fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_kib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {:.1} GiB RAM, Linux {}, load average {}",
        mem_kib as f64 / (1024.0 * 1024.0),
        kernel.trim(),
        load_average()
    )
}

/// The 1-minute load average.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}
