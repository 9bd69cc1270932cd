//! Harness for the root-only integration tests: start sonde, real servers and real clients,
//! and clean every one of them up (RAII guards), whatever the test's outcome.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

pub use tests::{ReceivedSpan, Receiver};

pub const SERVER: i32 = 2;
pub const CLIENT: i32 = 3;

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn sonde_bin() -> PathBuf {
    std::env::var_os("SONDE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/release/sonde"))
}

pub fn fixture(name: &str) -> PathBuf {
    workspace().join("tests/fixtures").join(name)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    panic!("nothing listening on port {port}");
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            name: name.into(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait; returns whether it exited cleanly (status 0) within the timeout.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        signal(self.child.id(), "-TERM");
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
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if self.terminate(Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running sonde. Its stderr is collected (and echoed) for assertions.
pub struct Sonde {
    pub proc: Proc,
    pub log: Arc<Mutex<String>>,
}

impl Sonde {
    /// Starts `sonde run ARGS` with ENV and waits until it reports it is tracing.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Sonde {
        let bin = sonde_bin();
        assert!(
            bin.exists(),
            "{} missing: run `cargo xtask test`",
            bin.display()
        );
        let mut cmd = Command::new(&bin);
        cmd.arg("run")
            .args(args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut proc = Proc::spawn("sonde", &mut cmd);
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        for stream in [
            Box::new(proc.child.stderr.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(proc.child.stdout.take().unwrap()),
        ] {
            let log = log.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("  [sonde] {line}");
                    if line.contains(" tracing ") {
                        let _ = tx.send(());
                    }
                    log.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            panic!("sonde did not start tracing:\n{}", log.lock().unwrap());
        }
        Sonde { proc, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM; asserts a clean exit; returns the full log.
    pub fn stop(mut self) -> String {
        let st = self.proc.terminate(Duration::from_secs(30));
        assert!(
            st.is_some_and(|s| s.success()),
            "sonde did not exit cleanly: {st:?}\n{}",
            self.log()
        );
        std::thread::sleep(Duration::from_millis(100));
        self.log()
    }
}

/// Extracts `name=value` from sonde's last stats line.
pub fn stat(log: &str, name: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains("stats: "))?;
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}="))?.parse().ok())
}

/// The python test app (tests/fixtures/app.py) on a free port.
pub fn python_app(service: &str) -> (Proc, u16) {
    let port = free_port();
    (python_app_on(service, port), port)
}

/// Stock nginx with a test config on a free port; removes its temp dir when dropped.
pub struct Nginx {
    pub proc: Proc,
    pub port: u16,
    dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.proc.terminate(Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn nginx(service: &str) -> Nginx {
    nginx_with("nginx.conf", service)
}

/// curl; returns (status code, body).
pub fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A raw HTTP/1.1 client connection, for keep-alive and pipelining.
pub struct Raw(pub TcpStream);

impl Raw {
    pub fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw(s)
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
    }

    /// Reads `n` complete responses (Content-Length or chunked bodies; HEAD-aware via
    /// `no_body`), returning their status codes.
    pub fn read_responses(&mut self, no_body: &[bool]) -> Vec<u16> {
        let mut buf = Vec::new();
        let mut codes = Vec::new();
        let mut tmp = [0u8; 65536];
        let mut at = 0;
        for &skip_body in no_body {
            loop {
                if let Some(end) = find(&buf[at..], b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[at..at + end]).to_string();
                    let code: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
                    let lower = head.to_ascii_lowercase();
                    let body_start = at + end + 4;
                    let clen = lower
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse::<usize>().unwrap());
                    let chunked = lower.contains("transfer-encoding: chunked");
                    let body_end = if skip_body || code == 204 || code == 304 {
                        Some(body_start)
                    } else if chunked {
                        find(&buf[body_start..], b"0\r\n\r\n").map(|e| body_start + e + 5)
                    } else {
                        let n = clen.unwrap_or(0);
                        (buf.len() >= body_start + n).then_some(body_start + n)
                    };
                    if let Some(e) = body_end {
                        codes.push(code);
                        at = e;
                        break;
                    }
                }
                let n = self.0.read(&mut tmp).expect("response");
                assert!(n > 0, "connection closed early");
                buf.extend_from_slice(&tmp[..n]);
            }
        }
        codes
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Spans of one service.
pub fn of_service<'a>(spans: &'a [ReceivedSpan], svc: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.service() == Some(svc)).collect()
}

/// Waits until `n` spans of `svc` with `kind` arrived (or times out), returning all spans.
pub async fn wait_spans(rx: &Receiver, svc: &str, kind: i32, n: usize) -> Vec<ReceivedSpan> {
    let svc = svc.to_string();
    rx.wait_for(
        move |s| {
            s.iter()
                .filter(|x| x.service() == Some(svc.as_str()) && x.kind == kind)
                .count()
                >= n
        },
        Duration::from_secs(20),
    )
    .await
}

/// Root check: these tests load kernel programs.
pub fn require_root() {
    // SAFETY: trivial libc call.
    let uid = unsafe { libc_geteuid() };
    assert_eq!(
        uid, 0,
        "integration tests need root (they load eBPF programs)"
    );
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

// ---- fault-test helpers ----------------------------------------------------------------------

/// Resident set size of `pid` in KiB (VmRSS), if it is alive.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Raises this process's RLIMIT_NOFILE soft limit to `n`, or to the hard limit if that is
/// lower and cannot be raised (in a user namespace it cannot); returns the soft limit now.
pub fn raise_nofile(n: u64) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        if r.rlim_cur >= n {
            return r.rlim_cur;
        }
        let want = libc::rlimit {
            rlim_cur: n,
            rlim_max: r.rlim_max.max(n),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            return n;
        }
        r.rlim_cur = r.rlim_max;
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &r),
            0,
            "setrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
        r.rlim_cur
    }
}

/// One request on a fresh connection with `Connection: close`; returns (status, body).
/// (Closing also flushes the server's last segment at once: no Nagle/delayed-ACK stalls.)
pub fn oneshot(port: u16, path: &str) -> (u16, Vec<u8>) {
    let mut c = Raw::connect(port);
    c.send(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes());
    let mut buf = Vec::new();
    c.0.read_to_end(&mut buf).expect("response");
    let end = find(&buf, b"\r\n\r\n").expect("a response head");
    let code = String::from_utf8_lossy(&buf[..end])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, buf[end + 4..].to_vec())
}

/// The BPF program ids and link ids `pid` holds open (from /proc/PID/fdinfo).
pub fn bpf_fds(pid: u32) -> (Vec<u32>, Vec<u32>) {
    let mut progs = Vec::new();
    let mut links = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return (progs, links);
    };
    for e in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        for l in info.lines() {
            let id = |p: &str| l.strip_prefix(p).and_then(|v| v.trim().parse::<u32>().ok());
            if let Some(id) = id("prog_id:") {
                progs.push(id);
            } else if let Some(id) = id("link_id:") {
                links.push(id);
            }
        }
    }
    progs.sort_unstable();
    progs.dedup();
    links.sort_unstable();
    links.dedup();
    (progs, links)
}

/// Ids of every BPF program and link loaded in the kernel now (`bpftool -j prog|link show`).
pub fn live_bpf() -> (
    std::collections::HashSet<u32>,
    std::collections::HashSet<u32>,
) {
    let ids = |what: &str| -> std::collections::HashSet<u32> {
        let out = Command::new("bpftool")
            .args(["-j", what, "show"])
            .output()
            .expect("bpftool runs (apt-get install bpftool; `cargo xtask setup --tests`)");
        assert!(out.status.success(), "bpftool {what} show failed");
        // Tiny scan of `"id":N` pairs at the top level of each object (avoids a JSON dep).
        let text = String::from_utf8_lossy(&out.stdout);
        text.split("{\"id\":")
            .skip(1)
            .filter_map(|s| s.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .collect()
    };
    (ids("prog"), ids("link"))
}

/// Polls until none of `progs`/`links` is loaded any more; returns the ones still there.
pub fn wait_bpf_gone(progs: &[u32], links: &[u32], timeout: Duration) -> (Vec<u32>, Vec<u32>) {
    let deadline = Instant::now() + timeout;
    loop {
        let (p, l) = live_bpf();
        let left_p: Vec<u32> = progs.iter().copied().filter(|i| p.contains(i)).collect();
        let left_l: Vec<u32> = links.iter().copied().filter(|i| l.contains(i)).collect();
        if (left_p.is_empty() && left_l.is_empty()) || Instant::now() >= deadline {
            return (left_p, left_l);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Inodes of the sockets `pid` has open.
fn socket_inodes(pid: u32) -> std::collections::HashSet<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Default::default();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|t| {
            t.to_string_lossy()
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .map(str::to_string)
        })
        .collect()
}

/// `pid`'s TCP sockets from /proc/net/tcp{,6}: (state, local port, remote port). States are
/// the kernel's hex codes: "0A" listening, "01" established.
fn tcp_sockets(pid: u32) -> Vec<(String, u16, u16)> {
    let inodes = socket_inodes(pid);
    let port = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|h| u16::from_str_radix(h, 16).ok())
    };
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() > 9
                && inodes.contains(f[9])
                && let (Some(local), Some(remote)) = (port(f[1]), port(f[2]))
            {
                out.push((f[3].to_string(), local, remote));
            }
        }
    }
    out
}

/// TCP ports `pid` listens on.
pub fn listening_ports(pid: u32) -> Vec<u16> {
    tcp_sockets(pid)
        .into_iter()
        .filter(|(st, _, _)| st == "0A")
        .map(|(_, local, _)| local)
        .collect()
}

/// Stock nginx with the fixture config `conf` (placeholders as in nginx.conf).
pub fn nginx_with(conf: &str, service: &str) -> Nginx {
    nginx_exe(Path::new(system_nginx()), conf, service)
}

pub fn system_nginx() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

/// nginx run from `bin` (e.g. a private copy, for `--exe` to select it alone).
pub fn nginx_exe(bin: &Path, conf: &str, service: &str) -> Nginx {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("sonde-nginx-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("big.txt"), "b".repeat(100_000)).unwrap();
    let conf = std::fs::read_to_string(fixture(conf))
        .unwrap()
        .replace("__PREFIX__", dir.to_str().unwrap())
        .replace("__PORT__", &port.to_string());
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let proc = Proc::spawn(
        "nginx",
        Command::new(bin)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir)
            .env("OTEL_SERVICE_NAME", service)
            .stderr(Stdio::null()),
    );
    wait_port(port);
    Nginx { proc, port, dir }
}

/// The python test app on a given port (e.g. one chosen before sonde started).
pub fn python_app_on(service: &str, port: u16) -> Proc {
    let p = Proc::spawn(
        service,
        Command::new("python3")
            .arg(fixture("app.py"))
            .arg(port.to_string())
            .env("OTEL_SERVICE_NAME", service)
            .env_remove("OTEL_RESOURCE_ATTRIBUTES"),
    );
    wait_port(port);
    p
}

/// One `GET path` on a keep-alive connection; returns (status, body). Content-Length bodies.
pub fn get_keepalive(c: &mut Raw, path: &str) -> (u16, Vec<u8>) {
    c.send(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    let mut buf = Vec::new();
    let mut tmp = [0u8; 65536];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let code: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
            let clen: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() >= end + 4 + clen {
                assert_eq!(buf.len(), end + 4 + clen, "unexpected extra bytes");
                return (code, buf[end + 4..].to_vec());
            }
        }
        let n = c.0.read(&mut tmp).expect("response");
        assert!(n > 0, "connection closed early");
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Starts `cmd` (a sonde, possibly wrapped, e.g. by capsh) like [`Sonde::start`] does, but
/// returns the log instead of panicking when it exits before it starts tracing.
pub fn start_sonde_cmd(
    cmd: &mut Command,
    env: &[(&str, &str)],
) -> Result<Sonde, (Option<std::process::ExitStatus>, String)> {
    cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut proc = Proc::spawn("sonde", cmd);
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let mut readers = Vec::new();
    for stream in [
        Box::new(proc.child.stderr.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(proc.child.stdout.take().unwrap()),
    ] {
        let log = log.clone();
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                eprintln!("  [sonde] {line}");
                if line.contains(" tracing ") {
                    let _ = tx.send(true);
                }
                log.lock().unwrap().push_str(&(line + "\n"));
            }
            let _ = tx.send(false);
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut closed = 0;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(true) => return Ok(Sonde { proc, log }),
            Ok(false) => closed += 1,
            Err(_) => {}
        }
        if closed == 2 {
            break;
        }
    }
    let st = proc.terminate(Duration::from_secs(10));
    for r in readers {
        let _ = r.join();
    }
    let text = log.lock().unwrap().clone();
    Err((st, text))
}

/// Local ports of `pid`'s established TCP connections to `remote_port`.
pub fn connected_local_ports(pid: u32, remote_port: u16) -> Vec<u16> {
    tcp_sockets(pid)
        .into_iter()
        .filter(|(st, _, remote)| st == "01" && *remote == remote_port)
        .map(|(_, local, _)| local)
        .collect()
}

/// A TCP connection from `src` (IPv4, e.g. 127.0.0.2:PORT) to 127.0.0.1:`port`.
pub fn connect_from(src: std::net::SocketAddrV4, port: u16) -> TcpStream {
    use std::os::fd::FromRawFd;
    let sin = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on an fd we own; the fd is handed to TcpStream on success
    // and closed on failure.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let from = sin(src);
        let to = sin(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::LOCALHOST,
            port,
        ));
        if libc::bind(fd, &from as *const _ as *const libc::sockaddr, len) != 0
            || libc::connect(fd, &to as *const _ as *const libc::sockaddr, len) != 0
        {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            panic!("connect from {src} to 127.0.0.1:{port}: {e}");
        }
        let s = TcpStream::from_raw_fd(fd);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}
