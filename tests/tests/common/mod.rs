//! Harness for the root-only integration tests: start sonde, real servers and real clients,
//! and clean every one of them up (RAII guards), whatever the test's outcome.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
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
    let p = Proc::spawn(
        service,
        Command::new("python3")
            .arg(fixture("app.py"))
            .arg(port.to_string())
            .env("OTEL_SERVICE_NAME", service)
            .env_remove("OTEL_RESOURCE_ATTRIBUTES"),
    );
    wait_port(port);
    (p, port)
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
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("sonde-nginx-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("big.txt"), "b".repeat(100_000)).unwrap();
    let conf = std::fs::read_to_string(fixture("nginx.conf"))
        .unwrap()
        .replace("__PREFIX__", dir.to_str().unwrap())
        .replace("__PORT__", &port.to_string());
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let bin = if std::path::Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    };
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
