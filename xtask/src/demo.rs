//! The demo: two unmodified services (a python http.server app and stock nginx), a real client
//! (curl), and sonde printing the resulting traces.
use std::{
    fs,
    io::{BufRead, BufReader},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{setup, util};

/// Kills (SIGINT, then SIGKILL) a child when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn wait_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not start listening on port {port}")
}

/// Starts sonde and waits until its programs are attached. stdout is inherited.
pub fn start_sonde(sonde: &Path, args: &[&str]) -> Result<Guard> {
    let mut child = Command::new(sonde)
        .arg("run")
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", sonde.display()))?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("  [sonde] {line}");
            if line.contains(" tracing ") {
                let _ = tx.send(());
            }
        }
    });
    let guard = Guard(child);
    rx.recv_timeout(Duration::from_secs(30))
        .context("sonde did not report that it is tracing within 30 s")?;
    Ok(guard)
}

pub fn run() -> Result<()> {
    setup::setup(false)?;
    let sonde = setup::build_release()?;
    let root = util::workspace_root();
    let tmp = std::env::temp_dir().join(format!("sonde-demo-{}", std::process::id()));
    fs::create_dir_all(&tmp)?;

    let pay_port = free_port()?;
    let orders_port = free_port()?;
    let conf = fs::read_to_string(root.join("deploy/demo/payments-nginx.conf"))?
        .replace("__PREFIX__", &tmp.to_string_lossy())
        .replace("__PORT__", &pay_port.to_string());
    let conf_path = tmp.join("nginx.conf");
    fs::write(&conf_path, conf)?;

    eprintln!(
        "demo: starting payments (nginx) on :{pay_port} and orders (python) on :{orders_port}"
    );
    let nginx = if util::have("nginx") {
        "nginx"
    } else {
        "/usr/sbin/nginx"
    };
    let _payments = Guard(
        Command::new(nginx)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&tmp)
            .env("OTEL_SERVICE_NAME", "payments")
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?,
    );
    let _orders = Guard(
        Command::new("python3")
            .arg(root.join("deploy/demo/orders.py"))
            .arg(orders_port.to_string())
            .env("OTEL_SERVICE_NAME", "orders")
            .env("PAYMENTS_URL", format!("http://127.0.0.1:{pay_port}"))
            .spawn()
            .context("starting orders.py")?,
    );
    wait_port(pay_port, "nginx")?;
    wait_port(orders_port, "orders.py")?;

    eprintln!("demo: starting sonde (traces every process; prints trace trees)");
    let sonde_guard = start_sonde(
        &sonde,
        &[
            "--output",
            "console",
            "--stats-interval",
            "0",
            "--service-name",
            "nginx=payments",
        ],
    )?;

    for path in ["/order/1", "/order/2", "/order/13", "/nope"] {
        let url = format!("http://127.0.0.1:{orders_port}{path}");
        let out = util::output(Command::new("curl").args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ]))?;
        eprintln!("demo: curl {url} -> {out}");
    }
    // Let the last responses reach the kernel ring buffer, then stop sonde: it prints every
    // trace it holds on the way out.
    std::thread::sleep(Duration::from_millis(1500));
    drop(sonde_guard);
    let _ = fs::remove_dir_all(&tmp);
    Ok(())
}
