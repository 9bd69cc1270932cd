//! Which processes to trace: `--pid`, `--exe GLOB`, `--port PORT`, or everything.
//!
//! With no selector every process is traced (the kernel filter is off). With selectors the
//! kernel traces only the tgids userspace puts in its PIDS map; userspace rescans /proc
//! periodically so that matching processes started later are picked up.
use std::{collections::HashSet, fs, path::Path};

use globset::{Glob, GlobSet, GlobSetBuilder};

#[derive(Debug, thiserror::Error)]
pub enum SelectorError {
    #[error("invalid --exe pattern {0:?}: {1}")]
    Glob(String, globset::Error),
    #[error("invalid --service-name rule {0:?}: expected GLOB=NAME, e.g. 'nginx=payments'")]
    Rule(String),
}

#[derive(Clone, Debug, Default)]
pub struct Selector {
    pids: Vec<u32>,
    exe: Option<GlobSet>,
    exe_patterns: Vec<String>,
    ports: Vec<u16>,
}

impl Selector {
    pub fn new(pids: Vec<u32>, exe: Vec<String>, ports: Vec<u16>) -> Result<Self, SelectorError> {
        let set = if exe.is_empty() {
            None
        } else {
            let mut b = GlobSetBuilder::new();
            for p in &exe {
                b.add(Glob::new(p).map_err(|e| SelectorError::Glob(p.clone(), e))?);
            }
            Some(
                b.build()
                    .map_err(|e| SelectorError::Glob(exe.join(","), e))?,
            )
        };
        Ok(Selector {
            pids,
            exe: set,
            exe_patterns: exe,
            ports,
        })
    }

    /// True when only selected processes are traced.
    pub fn is_filtering(&self) -> bool {
        !self.pids.is_empty() || self.exe.is_some() || !self.ports.is_empty()
    }

    pub fn describe(&self) -> String {
        if !self.is_filtering() {
            return "every process (except sonde)".into();
        }
        let mut parts = vec![];
        if !self.pids.is_empty() {
            parts.push(format!("pid {:?}", self.pids));
        }
        if !self.exe_patterns.is_empty() {
            parts.push(format!("exe {:?}", self.exe_patterns));
        }
        if !self.ports.is_empty() {
            parts.push(format!("listening port {:?}", self.ports));
        }
        parts.join(" or ")
    }

    /// Whether an executable path or name matches `--exe` (full path or file name).
    fn exe_matches(&self, path: &str) -> bool {
        let Some(set) = &self.exe else { return false };
        let name = path.rsplit('/').next().unwrap_or(path);
        set.is_match(path) || set.is_match(name)
    }

    /// Whether listening ports select processes (which a process can start doing at any time,
    /// so only a periodic scan notices).
    pub fn watches_ports(&self) -> bool {
        !self.ports.is_empty()
    }

    /// Whether process `pid` (live under `proc_root`) matches.
    pub fn matches(&self, proc_root: &Path, pid: u32) -> bool {
        let listen_inodes = if self.ports.is_empty() {
            HashSet::new()
        } else {
            listening_inodes(proc_root, &self.ports)
        };
        self.pids.contains(&pid)
            || self.matches_dir(&super::process_dir(proc_root, pid), &listen_inodes)
    }

    /// Whether the process at `/proc/PID` runs a `--exe` executable or owns one of the
    /// listening sockets.
    fn matches_dir(&self, dir: &Path, listen_inodes: &HashSet<u64>) -> bool {
        if self.exe.is_some()
            && let Ok(exe) = fs::read_link(dir.join("exe"))
            && self.exe_matches(&exe.to_string_lossy())
        {
            return true;
        }
        !listen_inodes.is_empty() && owns_any_socket(dir, listen_inodes)
    }

    /// All live processes under `proc_root` that match, excluding `self_pid`.
    pub fn scan(&self, proc_root: &Path, self_pid: u32) -> HashSet<u32> {
        let mut out: HashSet<u32> = self
            .pids
            .iter()
            .copied()
            .filter(|p| proc_root.join(p.to_string()).exists())
            .collect();
        let listen_inodes = if self.ports.is_empty() {
            HashSet::new()
        } else {
            listening_inodes(proc_root, &self.ports)
        };
        if self.exe.is_none() && listen_inodes.is_empty() {
            out.remove(&self_pid);
            return out;
        }
        let Ok(dir) = fs::read_dir(proc_root) else {
            return out;
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == self_pid {
                continue;
            }
            if self.matches_dir(&super::live_dir(entry.path()), &listen_inodes) {
                out.insert(pid);
            }
        }
        out.remove(&self_pid);
        out
    }
}

/// Inodes of TCP sockets listening on one of `ports` (from /proc/net/tcp and tcp6).
fn listening_inodes(proc_root: &Path, ports: &[u16]) -> HashSet<u64> {
    let mut out = HashSet::new();
    for f in ["net/tcp", "net/tcp6"] {
        let Ok(text) = fs::read_to_string(proc_root.join(f)) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if cols.len() < 10 || cols[3] != "0A" {
                continue;
            }
            let port = cols[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if port.is_some_and(|p| ports.contains(&p))
                && let Ok(inode) = cols[9].parse()
            {
                out.insert(inode);
            }
        }
    }
    out
}

/// The live children of process `pid`: from `/proc/PID/task/*/children`, or where the kernel
/// lacks those files (CONFIG_PROC_CHILDREN), from every process's parent in `/proc/*/stat`.
pub fn children(proc_root: &Path, pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(proc_root.join(pid.to_string()).join("task")) else {
        return Vec::new();
    };
    let mut found = false;
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(text) = fs::read_to_string(task.path().join("children")) {
            found = true;
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    if found {
        out
    } else {
        children_by_parent(proc_root, pid)
    }
}

fn children_by_parent(proc_root: &Path, pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            fs::read_to_string(proc_root.join(p.to_string()).join("stat"))
                .ok()
                .and_then(|stat| parent_of(&stat))
                == Some(pid)
        })
        .collect()
}

/// The parent pid in a `/proc/PID/stat` line: the field after the state, which follows the
/// command name's closing parenthesis (the name itself may hold spaces and parentheses).
fn parent_of(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn owns_any_socket(pid_dir: &Path, inodes: &HashSet<u64>) -> bool {
    let Ok(fds) = fs::read_dir(pid_dir.join("fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path())
            .ok()
            .and_then(|l| {
                l.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            })
            .is_some_and(|i| inodes.contains(&i))
    })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn default_traces_everything() {
        let s = Selector::new(vec![], vec![], vec![]).unwrap();
        assert!(!s.is_filtering());
    }

    #[test]
    fn finds_self_by_port_and_exe_but_excludes_self_pid() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let me = std::process::id();
        let s = Selector::new(vec![], vec![], vec![port]).unwrap();
        assert!(s.scan(Path::new("/proc"), 0).contains(&me));
        assert!(!s.scan(Path::new("/proc"), me).contains(&me));

        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_string_lossy().to_string();
        let s = Selector::new(vec![], vec![format!("{}*", &name[..3])], vec![]).unwrap();
        assert!(s.scan(Path::new("/proc"), 0).contains(&me));
        let s = Selector::new(vec![me, 4_000_000], vec![], vec![]).unwrap();
        assert_eq!(s.scan(Path::new("/proc"), 0), HashSet::from([me]));
    }

    #[test]
    fn finds_children_both_ways() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let proc_root = Path::new("/proc");
        assert!(children_by_parent(proc_root, me).contains(&child.id()));
        assert!(children(proc_root, me).contains(&child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!children(proc_root, me).contains(&child.id()));
        assert_eq!(parent_of("42 (a) b (c)) S 7 42 42 0"), Some(7));
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn bad_glob_is_an_error() {
        assert!(Selector::new(vec![], vec!["[".into()], vec![]).is_err());
    }
}
