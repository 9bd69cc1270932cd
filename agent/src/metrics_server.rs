//! Prometheus self-metrics endpoint (`--metrics-addr`, off by default): `GET /metrics` serves
//! every counter of [`Stats::snapshot`] (the kernel's included) as `sonde_<name>_total`, plus
//! `sonde_process_resident_memory_bytes`, in the Prometheus text format 0.0.4.
//!
//! Hostile clients cost little: at most [`MAX_CONNECTIONS`] connections are served at once
//! (more wait in the kernel's accept queue), and a request head must arrive within
//! [`HEADER_TIMEOUT`].
use std::{convert::Infallible, fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::metrics::Stats;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds `addr` now (so that a busy port is a startup error), then serves on the current
/// tokio runtime. Returns the bound address (useful with port 0).
pub fn spawn(addr: SocketAddr, stats: Arc<Stats>) -> std::io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(std_listener)?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = serve_on(listener, stats).await {
            log::error!("metrics endpoint stopped: {e}");
        }
    });
    log::info!("serving self-metrics at http://{local}/metrics");
    Ok(local)
}

/// Binds `addr` and serves until the runtime stops.
pub async fn serve(addr: SocketAddr, stats: Arc<Stats>) -> std::io::Result<()> {
    serve_on(TcpListener::bind(addr).await?, stats).await
}

/// Serves `GET /metrics` on `listener` until the runtime stops.
pub async fn serve_on(listener: TcpListener, stats: Arc<Stats>) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::debug!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(stats.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            drop(permit);
        });
    }
}

async fn handle(
    stats: Arc<Stats>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, ctype, body) = if req.uri().path() != "/metrics" {
        (StatusCode::NOT_FOUND, "text/plain", "not found\n".into())
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        )
    } else {
        (
            StatusCode::OK,
            CONTENT_TYPE,
            render(&stats, resident_bytes()),
        )
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    Ok(resp)
}

/// The exposition: one `sonde_<name>_total` counter per [`Stats::snapshot`] entry, then the
/// resident set size (when known).
pub fn render(stats: &Stats, resident_bytes: Option<u64>) -> String {
    let mut s = String::with_capacity(2048);
    let mut counters = stats.snapshot();
    // Until the pipeline first copies the kernel counters, they are 0: every series exists
    // from the first scrape on.
    for name in crate::probes::loader::COUNTER_NAMES {
        if !counters.iter().any(|(n, _)| *n == name) {
            counters.push((name, 0));
        }
    }
    for (name, value) in counters {
        let _ = writeln!(s, "# TYPE sonde_{name}_total counter");
        let _ = writeln!(s, "sonde_{name}_total {value}");
    }
    if let Some(rss) = resident_bytes {
        s.push_str("# HELP sonde_process_resident_memory_bytes Resident memory size in bytes.\n");
        s.push_str("# TYPE sonde_process_resident_memory_bytes gauge\n");
        let _ = writeln!(s, "sonde_process_resident_memory_bytes {rss}");
    }
    s
}

/// This process's resident set size, from /proc/self/statm.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, req: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn renders_every_counter_and_rss() {
        let stats = Stats::default();
        Stats::add(&stats.spans, 7);
        *stats.kernel.lock().unwrap() = vec![("kernel_ringbuf_full", 3)];
        let text = render(&stats, Some(4096));
        assert!(text.contains("# TYPE sonde_spans_total counter\nsonde_spans_total 7\n"));
        assert!(text.contains("sonde_kernel_ringbuf_full_total 3\n"));
        assert!(text.contains("sonde_process_resident_memory_bytes 4096\n"));
        // Kernel counters not copied yet are there, as 0.
        let fresh = render(&Stats::default(), None);
        for name in crate::probes::loader::COUNTER_NAMES {
            assert!(
                fresh.contains(&format!("\nsonde_{name}_total 0\n")),
                "{name}"
            );
        }
        for (name, _) in stats.snapshot() {
            assert!(text.contains(&format!("\nsonde_{name}_total ")), "{name}");
        }
        assert!(resident_bytes().is_some_and(|b| b > 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_metrics_over_http() {
        let stats = Arc::new(Stats::default());
        let addr = spawn("127.0.0.1:0".parse().unwrap(), stats.clone()).unwrap();
        Stats::add(&stats.spans_exported, 42);
        let resp = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(resp.contains("text/plain; version=0.0.4"), "{resp}");
        assert!(resp.contains("\nsonde_spans_exported_total 42\n"), "{resp}");
        assert!(
            resp.contains("\nsonde_process_resident_memory_bytes "),
            "{resp}"
        );

        let resp = get(
            addr,
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
        let resp = get(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
        // Garbage gets an error answer (or a close), never a hang.
        let resp =
            tokio::time::timeout(Duration::from_secs(5), get(addr, "\x00\x01garbage\r\n\r\n"))
                .await
                .expect("answered");
        assert!(
            resp.is_empty() || resp.starts_with("HTTP/1.1 400"),
            "{resp}"
        );
    }
}
