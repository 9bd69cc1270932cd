//! `sonde check`: can this kernel, with these privileges, run sonde? Each line says what was
//! checked, whether it passed, and what to do if not.
use std::{fs, path::Path};

use super::{
    btf,
    loader::{LoadOptions, Probes, ensure_tracefs, exit_group_dead_offset},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Optional feature missing: sonde runs, with less.
    Warn,
    /// sonde cannot run.
    Fail,
}

#[derive(Debug)]
pub struct Finding {
    pub what: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

fn finding(what: &'static str, verdict: Verdict, detail: impl Into<String>) -> Finding {
    Finding {
        what,
        verdict,
        detail: detail.into(),
    }
}

/// Capability bits (include/uapi/linux/capability.h).
const CAPS: &[(u32, &str, bool)] = &[
    (39, "CAP_BPF", true),
    (38, "CAP_PERFMON", true),
    (19, "CAP_SYS_PTRACE", false),
    (2, "CAP_DAC_READ_SEARCH", false),
    (21, "CAP_SYS_ADMIN", false),
];

fn effective_caps() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
}

fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut it = release
        .split(['.', '-'])
        .filter_map(|p| p.parse::<u32>().ok());
    match (it.next(), it.next()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

/// Runs every check. `try_load` also loads and attaches the programs (then detaches them).
pub fn run(try_load: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    let rel = kernel_release();
    out.push(if kernel_at_least(&rel, 5, 8) {
        finding(
            "kernel version",
            Verdict::Pass,
            format!("{rel} (>= 5.8: ring buffer, CAP_BPF)"),
        )
    } else {
        finding(
            "kernel version",
            Verdict::Fail,
            format!("{rel}: sonde needs Linux >= 5.8"),
        )
    });

    let btf_path = Path::new(btf::VMLINUX_BTF);
    out.push(match btf::kernel_offsets(btf_path) {
        Ok(_) => finding(
            "kernel BTF",
            Verdict::Pass,
            format!("{} (struct offsets resolved)", btf_path.display()),
        ),
        Err(e) => finding(
            "kernel BTF",
            Verdict::Fail,
            format!("{e}: use a kernel built with CONFIG_DEBUG_INFO_BTF=y"),
        ),
    });

    out.push(match ensure_tracefs() {
        Ok(()) => finding("tracefs", Verdict::Pass, "mounted"),
        Err(e) => finding("tracefs", Verdict::Fail, e.to_string()),
    });
    let tp_root = [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.is_dir());
    let present = |tp: &str| tp_root.is_some_and(|r| r.join(tp).is_dir());
    let tp = "syscalls/sys_enter_read";
    out.push(if present(tp) {
        finding(
            "syscall tracepoints",
            Verdict::Pass,
            format!("{tp} present"),
        )
    } else {
        finding(
            "syscall tracepoints",
            Verdict::Fail,
            format!("{tp} missing: needs CONFIG_FTRACE_SYSCALLS=y"),
        )
    });
    let tp = "sched/sched_process_exit";
    out.push(if present(tp) {
        let ends = if exit_group_dead_offset() != 0 {
            "reports group_dead: a process ends with its last thread"
        } else {
            "no group_dead (Linux < 6.16): a process is taken to end with its main thread"
        };
        finding(
            "sched tracepoints",
            Verdict::Pass,
            format!("{tp} present, {ends}"),
        )
    } else {
        finding(
            "sched tracepoints",
            Verdict::Warn,
            format!("{tp} missing: process exits are noticed later"),
        )
    });
    let kprobes =
        tp_root.is_some_and(|r| r.parent().is_some_and(|t| t.join("kprobe_events").exists()));
    out.push(finding(
        "kprobes (optional)",
        if kprobes {
            Verdict::Pass
        } else {
            Verdict::Warn
        },
        if kprobes {
            "available (not needed)"
        } else {
            "unavailable: fine, sonde uses syscall tracepoints"
        },
    ));
    let cgroup2 = Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists()
        || Path::new("/sys/fs/cgroup/cgroup.procs").exists();
    out.push(finding(
        "cgroup v2 (optional)",
        if cgroup2 {
            Verdict::Pass
        } else {
            Verdict::Warn
        },
        if cgroup2 {
            "mounted"
        } else {
            "not mounted: context propagation features are unavailable"
        },
    ));

    match effective_caps() {
        Some(caps) => {
            let all = caps & (1 << 21) != 0;
            for &(bit, name, required) in CAPS {
                let has = caps & (1u64 << bit) != 0 || (all && (bit == 39 || bit == 38));
                let verdict = match (has, required) {
                    (true, _) => Verdict::Pass,
                    (false, true) => Verdict::Fail,
                    (false, false) => Verdict::Warn,
                };
                let why = match name {
                    "CAP_BPF" => "load programs and maps",
                    "CAP_PERFMON" => "attach tracepoints, read kernel memory",
                    "CAP_SYS_PTRACE" => {
                        "read other processes' /proc/PID/environ and exe (service.name)"
                    }
                    "CAP_DAC_READ_SEARCH" => "read /proc of processes owned by other users",
                    _ => "mount tracefs (only if it is not mounted)",
                };
                out.push(finding(
                    name,
                    verdict,
                    if has { format!("held ({why})") } else { format!("missing: needed to {why}; run as root or see deploy/systemd/sonde.service") },
                ));
            }
        }
        None => out.push(finding(
            "capabilities",
            Verdict::Warn,
            "cannot read /proc/self/status",
        )),
    }

    let memlock = rlimit_memlock();
    out.push(finding(
        "RLIMIT_MEMLOCK",
        Verdict::Pass,
        format!("{memlock}: not needed on kernels >= 5.11 (memory is charged to the cgroup)"),
    ));

    if try_load && !out.iter().any(|f| f.verdict == Verdict::Fail) {
        out.push(match Probes::load(&LoadOptions::default()) {
            Ok((p, _ring)) => {
                let skipped = p.skipped.clone();
                let hooks = if p.args_from_regs() {
                    "arguments read at exit (reads hooked at exit only, sends stamped per CPU at entry)"
                } else {
                    "arguments saved per thread at entry (no bpf_task_pt_regs)"
                };
                drop(p);
                if skipped.is_empty() {
                    finding(
                        "load + attach programs",
                        Verdict::Pass,
                        format!("all programs verified and attached, then detached; {hooks}"),
                    )
                } else {
                    finding(
                        "load + attach programs",
                        Verdict::Warn,
                        format!("optional tracepoints missing: {}", skipped.join(", ")),
                    )
                }
            }
            Err(e) => finding("load + attach programs", Verdict::Fail, e.to_string()),
        });
    }
    out
}

fn rlimit_memlock() -> String {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return "unknown".into();
    }
    if r.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        format!("{} KiB", r.rlim_cur / 1024)
    }
}

/// Renders findings as the table `sonde check` prints.
pub fn render(findings: &[Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        let v = match f.verdict {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        s.push_str(&format!("{v}  {:<24} {}\n", f.what, f.detail));
    }
    let fails = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Fail)
        .count();
    s.push_str(&if fails == 0 {
        "sonde can run on this machine.\n".to_string()
    } else {
        format!("{fails} required check(s) failed: sonde cannot run until they are fixed.\n")
    });
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_compare() {
        assert!(kernel_at_least("6.18.44-fc-v769", 5, 8));
        assert!(kernel_at_least("5.8.0", 5, 8));
        assert!(!kernel_at_least("5.4.0-100-generic", 5, 8));
        assert!(!kernel_at_least("garbage", 5, 8));
    }

    #[test]
    fn render_counts_failures() {
        let f = vec![
            finding("a", Verdict::Pass, "ok"),
            finding("b", Verdict::Fail, "no"),
        ];
        let r = render(&f);
        assert!(r.contains("FAIL  b"));
        assert!(r.contains("1 required check(s) failed"));
    }
}
