//! Traced processes: their OpenTelemetry Resource (read from /proc) and which ones to trace.
use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use foldhash::HashMap;

use crate::span::{AttrValue, Resource};

pub mod select;

pub use select::{Selector, SelectorError};

/// Caches one Resource per live process. Entries are dropped when the process exits.
pub struct Registry {
    proc_root: PathBuf,
    host_name: String,
    cache: HashMap<u32, Arc<Resource>>,
    /// `--service-name GLOB=NAME` rules, for processes without OTEL_SERVICE_NAME (or that
    /// overwrite their environment, as nginx does with its process titles).
    names: Vec<(globset::GlobMatcher, String)>,
    /// Processes found running an OpenTelemetry SDK, with the evidence.
    sdk: HashMap<u32, String>,
}

impl Registry {
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    pub fn with_proc_root(root: impl Into<PathBuf>) -> Self {
        Registry {
            proc_root: root.into(),
            host_name: host_name(),
            cache: HashMap::default(),
            names: Vec::new(),
            sdk: HashMap::default(),
        }
    }

    /// Adds `GLOB=NAME` service-name rules (matched against the executable's path and name).
    pub fn with_service_names(mut self, rules: &[String]) -> Result<Self, SelectorError> {
        for r in rules {
            let (glob, name) = r
                .split_once('=')
                .ok_or_else(|| SelectorError::Rule(r.clone()))?;
            let g = globset::Glob::new(glob)
                .map_err(|e| SelectorError::Glob(glob.to_string(), e))?
                .compile_matcher();
            self.names.push((g, name.to_string()));
        }
        Ok(self)
    }

    /// The Resource of `pid`, read from /proc on first use. A process that is already gone
    /// gets a minimal Resource (`unknown_service`, pid) rather than being dropped.
    pub fn resource(&mut self, pid: u32) -> Arc<Resource> {
        self.resource_or(pid, "")
    }

    /// Like [`Registry::resource`]; `comm` (the kernel's task name) names a process whose
    /// /proc entry is already gone.
    pub fn resource_or(&mut self, pid: u32, comm: &str) -> Arc<Resource> {
        if let Some(r) = self.cache.get(&pid) {
            return r.clone();
        }
        let dir = process_dir(&self.proc_root, pid);
        let r = Arc::new(read_resource(
            &self.proc_root,
            pid,
            &dir,
            &self.host_name,
            comm,
            &self.names,
        ));
        if let Some(marker) = sdk_marker(&dir) {
            self.sdk.insert(pid, marker);
        }
        self.cache.insert(pid, r.clone());
        r
    }

    /// Why `pid` is believed to run an OpenTelemetry SDK (it then makes its own spans), if it
    /// does. Known once its Resource has been read.
    pub fn sdk(&self, pid: u32) -> Option<&str> {
        self.sdk.get(&pid).map(String::as_str)
    }

    /// The process exited: its next incarnation (pid reuse) must be read afresh.
    pub fn forget(&mut self, pid: u32) {
        self.cache.remove(&pid);
        self.sdk.remove(&pid);
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// `/proc/PID` of a process, or, when its main thread has exited while other threads run on
/// (a zombie leader, whose `exe`, `environ`, `cmdline` and `fd` read as gone or empty), the
/// directory of a live thread, `/proc/PID/task/TID`, which shows the same process.
pub fn process_dir(proc_root: &Path, pid: u32) -> PathBuf {
    live_dir(proc_root.join(pid.to_string()))
}

/// [`process_dir`] of the process at `dir` (`/proc/PID`).
pub(crate) fn live_dir(dir: PathBuf) -> PathBuf {
    if fs::read_link(dir.join("exe")).is_ok() {
        return dir;
    }
    let leader = dir.file_name().map(|n| n.to_os_string());
    fs::read_dir(dir.join("task"))
        .ok()
        .and_then(|tasks| {
            tasks
                .flatten()
                .filter(|t| Some(t.file_name()) != leader)
                .map(|t| t.path())
                .find(|t| fs::read_link(t.join("exe")).is_ok())
        })
        .unwrap_or(dir)
}

/// Environment of the process at `dir` (its [`process_dir`]) as (key, value) pairs; empty
/// when unreadable.
pub fn environ(dir: &Path) -> Vec<(String, String)> {
    fs::read(dir.join("environ"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter_map(|kv| {
                    let s = String::from_utf8_lossy(kv);
                    let (k, v) = s.split_once('=')?;
                    Some((k.to_string(), v.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Parses OTEL_RESOURCE_ATTRIBUTES (`k=v,k2=v2`, percent-encoded values).
pub fn parse_resource_attributes(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let k = k.trim();
            if k.is_empty() {
                return None;
            }
            Some((k.to_string(), percent_decode(v.trim())))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Seconds-since-boot ticks at which the process started (field 22 of /proc/PID/stat).
pub fn start_ticks(proc_root: &Path, pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Evidence that a process runs an OpenTelemetry SDK or auto-instrumentation agent, from its
/// command line and environment: `opentelemetry-instrument` (Python), `--require
/// @opentelemetry/...` or NODE_OPTIONS (Node), `-javaagent:...opentelemetry...` (Java), the
/// .NET auto-instrumentation profiler, or PYTHONPATH pointing into opentelemetry's
/// auto-instrumentation. An SDK set up in code alone leaves no such trace: use `--pid`/`--exe`
/// selection for those. `dir` is the process's [`process_dir`].
pub fn sdk_marker(dir: &Path) -> Option<String> {
    let args = fs::read(dir.join("cmdline")).ok().unwrap_or_default();
    for a in args.split(|&c| c == 0) {
        let a = String::from_utf8_lossy(a);
        if a.contains("opentelemetry") {
            return Some(format!("command line: {a}"));
        }
    }
    for (k, v) in environ(dir) {
        let hit = match k.as_str() {
            "NODE_OPTIONS" | "JAVA_TOOL_OPTIONS" | "PYTHONPATH" | "_JAVA_OPTIONS" => {
                v.contains("opentelemetry")
            }
            "OTEL_DOTNET_AUTO_HOME" => true,
            _ => false,
        };
        if hit {
            return Some(format!("environment: {k}"));
        }
    }
    None
}

/// Command lines can carry credentials (`curl -H 'Authorization: …'`, `--password x`,
/// `https://user:pw@host`): such values are replaced by `REDACTED` before export.
pub fn sanitize_args(args: Vec<String>) -> Vec<String> {
    const SECRET_FLAGS: [&str; 7] = [
        "-u",
        "--user",
        "--password",
        "--pass",
        "--token",
        "--api-key",
        "--proxy-user",
    ];
    const SECRET_HEADERS: [&str; 4] = [
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
    ];
    const SECRET_KEYS: [&str; 8] = [
        "password",
        "passwd",
        "secret",
        "token",
        "apikey",
        "api_key",
        "api-key",
        "access_key",
    ];
    let mut out = Vec::with_capacity(args.len());
    let mut redact_next = false;
    for a in args {
        if redact_next {
            redact_next = false;
            out.push("REDACTED".to_string());
            continue;
        }
        let lower = a.to_ascii_lowercase();
        if SECRET_FLAGS.contains(&lower.as_str()) {
            redact_next = true;
            out.push(a);
            continue;
        }
        if let Some((flag, _)) = a.split_once('=') {
            let f = flag.to_ascii_lowercase();
            let key = f.trim_start_matches('-');
            if SECRET_FLAGS.contains(&f.as_str()) || SECRET_KEYS.iter().any(|k| key.ends_with(k)) {
                out.push(format!("{flag}=REDACTED"));
                continue;
            }
        }
        if SECRET_HEADERS.iter().any(|h| {
            lower
                .trim_start()
                .strip_prefix(h)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        }) {
            let name = a.split(':').next().unwrap_or("");
            out.push(format!("{name}: REDACTED"));
            continue;
        }
        // scheme://user:password@host
        if let Some(i) = a.find("://") {
            let rest = &a[i + 3..];
            let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            if let Some(at) = rest[..auth_end].rfind('@') {
                out.push(format!("{}REDACTED@{}", &a[..i + 3], &rest[at + 1..]));
                continue;
            }
        }
        out.push(a);
    }
    out
}

fn runtime_language(exe_name: &str) -> &'static str {
    let n = exe_name.to_ascii_lowercase();
    if n.starts_with("python") || n == "uwsgi" || n == "gunicorn" {
        "python"
    } else if n == "node" || n == "nodejs" || n == "bun" || n == "deno" {
        "nodejs"
    } else if n == "java" {
        "java"
    } else if n == "ruby" || n == "puma" {
        "ruby"
    } else if n.starts_with("php") {
        "php"
    } else if n == "dotnet" {
        "dotnet"
    } else {
        "native"
    }
}

/// The Resource of process `pid`, whose entries are read from `dir` (its [`process_dir`]).
fn read_resource(
    proc_root: &Path,
    pid: u32,
    dir: &Path,
    host: &str,
    comm_hint: &str,
    names: &[(globset::GlobMatcher, String)],
) -> Resource {
    let exe_path = fs::read_link(dir.join("exe")).ok().map(|p| {
        p.to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string()
    });
    let args: Vec<String> = fs::read(dir.join("cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default();
    // The process's name, not a thread's (threads may be named apart).
    let comm = fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| comm_hint.to_string());
    let exe_name = exe_path
        .as_deref()
        .and_then(|p| p.rsplit('/').next())
        .map(str::to_string)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| comm.clone());

    let env = environ(dir);
    let get = |k: &str| env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.clone());
    let res_attrs = get("OTEL_RESOURCE_ATTRIBUTES")
        .map(|s| parse_resource_attributes(&s))
        .unwrap_or_default();
    let service_name = get("OTEL_SERVICE_NAME")
        .filter(|s| !s.is_empty())
        .or_else(|| {
            res_attrs
                .iter()
                .find(|(k, _)| k == "service.name")
                .map(|(_, v)| v.clone())
        })
        .or_else(|| {
            let path = exe_path.as_deref().unwrap_or("");
            names
                .iter()
                .find(|(g, _)| g.is_match(path) || g.is_match(&exe_name))
                .map(|(_, n)| n.clone())
        })
        .unwrap_or_else(|| {
            if exe_name.is_empty() {
                "unknown_service".to_string()
            } else {
                exe_name.clone()
            }
        });

    let start = start_ticks(proc_root, pid).unwrap_or(0);
    let mut attrs: Vec<(String, AttrValue)> = Vec::with_capacity(16);
    // User-provided attributes first; sonde's own keys below override none of them except
    // the ones that describe the process itself.
    for (k, v) in &res_attrs {
        if k != "service.name" {
            attrs.push((k.clone(), AttrValue::from(v.clone())));
        }
    }
    let mut set = |k: &str, v: AttrValue| {
        attrs.retain(|(ek, _)| ek != k);
        attrs.push((k.to_string(), v));
    };
    set("service.name", AttrValue::from(service_name.clone()));
    set(
        "service.instance.id",
        AttrValue::from(format!("{host}:{pid}:{start}")),
    );
    set("process.pid", AttrValue::Int(pid as i64));
    if !exe_name.is_empty() {
        set("process.executable.name", AttrValue::from(exe_name.clone()));
    }
    if let Some(p) = &exe_path {
        set("process.executable.path", AttrValue::from(p.clone()));
    }
    if !args.is_empty() {
        set(
            "process.command_args",
            AttrValue::StrList(sanitize_args(args)),
        );
    }
    set("host.name", AttrValue::text(host));
    set("telemetry.sdk.name", AttrValue::Str("sonde".into()));
    set(
        "telemetry.sdk.language",
        AttrValue::Str(runtime_language(&exe_name).into()),
    );
    set(
        "telemetry.sdk.version",
        AttrValue::Str(env!("CARGO_PKG_VERSION").into()),
    );
    set("telemetry.distro.name", AttrValue::Str("sonde".into()));
    set(
        "telemetry.distro.version",
        AttrValue::Str(env!("CARGO_PKG_VERSION").into()),
    );
    Resource {
        pid,
        service_name,
        attributes: attrs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc(pid: u32, env: &[u8], cmdline: &[u8]) -> tempdir::Dir {
        let d = tempdir::Dir::new();
        let p = d.0.join(pid.to_string());
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join("environ"), env).unwrap();
        fs::write(p.join("cmdline"), cmdline).unwrap();
        fs::write(p.join("comm"), "myapp\n").unwrap();
        fs::write(
            p.join("stat"),
            format!("{pid} (my app) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 4242 0 0"),
        )
        .unwrap();
        d
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!(
                    "sonde-proc-{}-{}",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn attr<'a>(r: &'a Resource, k: &str) -> Option<&'a AttrValue> {
        r.attributes.iter().find(|(ek, _)| ek == k).map(|(_, v)| v)
    }

    #[test]
    fn a_process_whose_main_thread_exited_is_read_through_a_live_thread() {
        // The leader's entries read as gone or empty; thread 11 shows the process.
        let d = fake_proc(10, b"", b"");
        let leader = d.0.join("10");
        let thread = leader.join("task/11");
        fs::create_dir_all(leader.join("task/10")).unwrap();
        fs::create_dir_all(&thread).unwrap();
        fs::write(thread.join("environ"), b"OTEL_SERVICE_NAME=orders\0").unwrap();
        fs::write(thread.join("cmdline"), b"python3\0app.py\0").unwrap();
        std::os::unix::fs::symlink("/usr/bin/python3.11", thread.join("exe")).unwrap();
        assert_eq!(process_dir(&d.0, 10), thread);
        let r = Registry::with_proc_root(&d.0).resource(10);
        assert_eq!(r.service_name, "orders");
        assert_eq!(
            attr(&r, "process.executable.name"),
            Some(&AttrValue::Str("python3.11".into()))
        );
        assert_eq!(
            attr(&r, "process.command_args"),
            Some(&AttrValue::StrList(vec!["python3".into(), "app.py".into()]))
        );
        // A process with its leader alive is read from its own directory.
        std::os::unix::fs::symlink("/usr/bin/python3.11", leader.join("exe")).unwrap();
        assert_eq!(process_dir(&d.0, 10), leader);
    }

    #[test]
    fn service_name_precedence() {
        let d = fake_proc(
            10,
            b"PATH=/bin\0OTEL_SERVICE_NAME=orders\0OTEL_RESOURCE_ATTRIBUTES=service.name=x,deployment.environment=prod%20eu\0",
            b"python3\0app.py\0",
        );
        let mut reg = Registry::with_proc_root(&d.0);
        let r = reg.resource(10);
        assert_eq!(r.service_name, "orders");
        assert_eq!(
            attr(&r, "deployment.environment"),
            Some(&AttrValue::Str("prod eu".into()))
        );
        assert_eq!(attr(&r, "process.pid"), Some(&AttrValue::Int(10)));
        assert_eq!(
            attr(&r, "process.command_args"),
            Some(&AttrValue::StrList(vec!["python3".into(), "app.py".into()]))
        );
        assert!(attr(&r, "service.instance.id").is_some());
        assert_eq!(
            attr(&r, "telemetry.distro.name"),
            Some(&AttrValue::Str("sonde".into()))
        );

        let d = fake_proc(
            11,
            b"OTEL_RESOURCE_ATTRIBUTES=service.name=payments\0",
            b"x\0",
        );
        assert_eq!(
            Registry::with_proc_root(&d.0).resource(11).service_name,
            "payments"
        );

        let d = fake_proc(12, b"", b"x\0");
        // No exe link in the fake tree: falls back to comm.
        assert_eq!(
            Registry::with_proc_root(&d.0).resource(12).service_name,
            "myapp"
        );
        assert_eq!(start_ticks(&d.0, 12), Some(4242));
    }

    #[test]
    fn dead_process_gets_minimal_resource() {
        let d = tempdir::Dir::new();
        let r = Registry::with_proc_root(&d.0).resource(999_999);
        assert_eq!(r.service_name, "unknown_service");
        assert_eq!(r.pid, 999_999);
        // With the kernel's task name, a process that already exited keeps its identity.
        let r = Registry::with_proc_root(&d.0).resource_or(999_998, "curl");
        assert_eq!(r.service_name, "curl");
        assert_eq!(
            attr(&r, "process.executable.name"),
            Some(&AttrValue::Str("curl".into()))
        );
    }

    #[test]
    fn command_args_never_carry_credentials() {
        let args = [
            "curl",
            "-H",
            "Authorization: Bearer hunter2",
            "-u",
            "bob:pw1",
            "--password=pw2",
            "https://al:pw3@h.example/x",
            "-H",
            "cookie:sid=pw4",
            "DB_TOKEN=pw5",
            "-v",
        ]
        .map(String::from)
        .to_vec();
        let out = sanitize_args(args).join(" ");
        for secret in ["hunter2", "pw1", "pw2", "pw3", "pw4", "pw5"] {
            assert!(!out.contains(secret), "{secret} leaked: {out}");
        }
        assert!(
            out.contains("https://REDACTED@h.example/x") && out.contains("-v"),
            "{out}"
        );
    }

    #[test]
    fn service_name_rules_apply_without_otel_service_name() {
        let d = fake_proc(13, b"", b"x\0");
        let mut reg = Registry::with_proc_root(&d.0)
            .with_service_names(&["my*=shop".into()])
            .unwrap();
        assert_eq!(reg.resource(13).service_name, "shop");
        assert!(
            Registry::new()
                .with_service_names(&["nope".into()])
                .is_err()
        );
    }

    #[test]
    fn detects_sdk_processes() {
        let d = fake_proc(
            20,
            b"PATH=/bin\0",
            b"/usr/bin/opentelemetry-instrument\0python\0app.py\0",
        );
        let mut reg = Registry::with_proc_root(&d.0);
        reg.resource(20);
        assert!(reg.sdk(20).unwrap().contains("opentelemetry-instrument"));
        let d = fake_proc(
            21,
            b"NODE_OPTIONS=--require @opentelemetry/auto-instrumentations-node/register\0",
            b"node\0app.js\0",
        );
        assert_eq!(
            sdk_marker(&process_dir(&d.0, 21)).as_deref(),
            Some("environment: NODE_OPTIONS")
        );
        let d = fake_proc(22, b"OTEL_SERVICE_NAME=plain\0", b"python3\0app.py\0");
        assert_eq!(
            sdk_marker(&process_dir(&d.0, 22)),
            None,
            "OTEL_SERVICE_NAME alone is no SDK"
        );
    }

    #[test]
    fn reads_own_process() {
        let mut reg = Registry::new();
        let r = reg.resource(std::process::id());
        assert!(attr(&r, "process.executable.path").is_some());
        reg.forget(std::process::id());
        assert!(reg.is_empty());
    }
}
