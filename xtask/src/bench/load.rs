//! A fixed-rate HTTP/1.1 keep-alive load generator with per-request latency, and a bulk
//! connection opener.
//!
//! One thread per connection, one request in flight per connection. Request `i` is due at
//! `start + i / rate`, connection `k` sends requests `k, k + C, k + 2C, ...`: requests are
//! spread evenly in time (absolute `clock_nanosleep` with 1 ns timer slack) instead of in
//! bursts per timer tick. Latency runs from just before `write` to the last byte of the
//! response. A request sent more than 1 ms after its due time is counted as late (the
//! generator or the server could not keep up).
use std::{
    fs::File,
    io::{self, Read, Write},
    mem::ManuallyDrop,
    net::TcpStream,
    os::fd::{AsRawFd, FromRawFd},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

const REQUEST: &[u8] = b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: sonde-bench\r\n\r\n";

/// A log-linear latency histogram (HDR-like): exact below 128 ns, then 64 buckets per power
/// of two (under 1.6% relative error).
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    n: u64,
}

const SUB: u32 = 7;
const HALF: usize = 1 << (SUB - 1);

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; (1 << SUB) + 64 * HALF],
            n: 0,
        }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < (1 << SUB) {
            return v as usize;
        }
        let top = 63 - v.leading_zeros();
        let shift = top - (SUB - 1);
        let mantissa = (v >> shift) as usize;
        (1 << SUB) + (shift as usize - 1) * HALF + (mantissa - HALF)
    }

    /// Midpoint of bucket `i`.
    fn value(i: usize) -> u64 {
        if i < (1 << SUB) {
            return i as u64;
        }
        let k = i - (1 << SUB);
        let shift = (k / HALF + 1) as u32;
        let low = ((k % HALF + HALF) as u64) << shift;
        low + ((1u64 << shift) - 1) / 2
    }

    pub fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.n += 1;
    }

    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.n += o.n;
    }

    /// The `q` quantile (0..=1), in ns.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i);
            }
        }
        Self::value(self.counts.len() - 1)
    }
}

#[derive(Default)]
pub struct LoadResult {
    /// Requests answered 200.
    pub ok: u64,
    /// Requests not answered (I/O error) or answered with another status.
    pub errors: u64,
    /// Requests sent more than 1 ms after their due time.
    pub late: u64,
    /// From the first due time to the last response.
    pub wall: Duration,
    pub hist: Histogram,
    /// CPU time of the generator's threads.
    pub client_cpu_ns: u64,
}

pub fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn sleep_until(ns: u64) {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: valid timespec; EINTR just wakes us early (the caller does not care).
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
}

fn connect(port: u16) -> io::Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// One client connection. xtask is a debug build, so the per-request path is kept trivial:
/// the first response is parsed (Content-Length framing) and its length remembered; later
/// responses of that exact length starting with `HTTP/1.1 200 ` are taken as they come
/// (nginx's answer to `/ok` never changes length), anything else is parsed again.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    expect: Option<usize>,
}

impl Client {
    fn new(port: u16) -> io::Result<Client> {
        Ok(Client {
            s: connect(port)?,
            buf: Vec::with_capacity(4096),
            expect: None,
        })
    }

    /// Sends one request and reads its response; returns the status and the monotonic time
    /// right after the `read` that completed the response.
    fn exchange(&mut self) -> io::Result<(u16, u64)> {
        (&*self.file()).write_all(REQUEST)?;
        self.read_response()
    }

    /// The socket as a File: its reads and writes are the read(2) and write(2) syscalls
    /// (TcpStream's are recvfrom and sendto), so that BPF statistics per syscall tell the
    /// generator's hooks apart from nginx's (recvfrom and writev).
    fn file(&self) -> ManuallyDrop<File> {
        // SAFETY: the fd stays owned by `self.s`; ManuallyDrop never closes it.
        ManuallyDrop::new(unsafe { File::from_raw_fd(self.s.as_raw_fd()) })
    }

    fn read_response(&mut self) -> io::Result<(u16, u64)> {
        let mut tmp = [0u8; 4096];
        let mut t = mono_ns();
        loop {
            if let Some(n) = self.expect
                && self.buf.len() == n
                && self.buf.starts_with(b"HTTP/1.1 200 ")
            {
                self.buf.clear();
                return Ok((200, t));
            }
            if self.expect.is_none_or(|n| self.buf.len() >= n)
                && let Some((status, len)) = parse_response(&self.buf)
            {
                self.expect = (self.buf.len() == len && status == 200).then_some(len);
                self.buf.drain(..len);
                return Ok((status, t));
            }
            let n = (&*self.file()).read(&mut tmp)?;
            t = mono_ns();
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }
}

/// (status, total length) of the complete response at the start of `buf`, if there is one.
fn parse_response(buf: &[u8]) -> Option<(u16, usize)> {
    let h = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..h]).ok()?;
    let status = head.get(9..12)?.parse().ok()?;
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    (buf.len() >= h + 4 + len).then_some((status, h + 4 + len))
}

/// `rate` requests per second for `duration` over `conns` keep-alive connections to
/// 127.0.0.1:`port`; connections are opened first and closed at the end.
pub fn fixed_rate(port: u16, rate: u64, duration: Duration, conns: usize) -> Result<LoadResult> {
    let total = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let clients = (0..conns)
        .map(|_| Client::new(port))
        .collect::<io::Result<Vec<_>>>()
        .context("connecting to nginx")?;
    let start = mono_ns() + 50_000_000;
    let results: Vec<LoadResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(k, c)| {
                scope.spawn(move || conn_loop(c, k as u64, conns as u64, total, rate, start))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("load thread panicked"))
            .collect()
    });
    let end = mono_ns();
    let mut out = LoadResult {
        wall: Duration::from_nanos(end.saturating_sub(start)),
        ..Default::default()
    };
    for r in &results {
        out.ok += r.ok;
        out.errors += r.errors;
        out.late += r.late;
        out.client_cpu_ns += r.client_cpu_ns;
        out.hist.merge(&r.hist);
    }
    Ok(out)
}

fn conn_loop(mut c: Client, k: u64, stride: u64, total: u64, rate: u64, start: u64) -> LoadResult {
    // SAFETY: plain prctl on the calling thread: timers wake it within 1 ns of their expiry
    // (instead of the default 50 µs slack).
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
    let cpu0 = clock_ns(libc::CLOCK_THREAD_CPUTIME_ID);
    let mut r = LoadResult::default();
    let mut i = k;
    while i < total {
        let due = start + (u128::from(i) * 1_000_000_000 / u128::from(rate)) as u64;
        let now = mono_ns();
        if now < due {
            sleep_until(due);
        } else if now > due + 1_000_000 {
            r.late += 1;
        }
        let t0 = mono_ns();
        match c.exchange() {
            Ok((200, t1)) => {
                r.ok += 1;
                r.hist.record(t1 - t0);
            }
            Ok(_) => r.errors += 1,
            Err(e) => {
                eprintln!("bench: load connection {k}: {e}");
                r.errors += (total - i).div_ceil(stride);
                break;
            }
        }
        i += stride;
    }
    r.client_cpu_ns = clock_ns(libc::CLOCK_THREAD_CPUTIME_ID) - cpu0;
    r
}

/// Opens `n` keep-alive connections to 127.0.0.1:`port`, each sending one request and reading
/// its response, `batch` at a time; returns them open.
pub fn open_connections(port: u16, n: usize, batch: usize) -> Result<Vec<TcpStream>> {
    let mut all: Vec<TcpStream> = Vec::with_capacity(n);
    while all.len() < n {
        let k = batch.min(n - all.len());
        let mut group = Vec::with_capacity(k);
        for _ in 0..k {
            let mut c = Client::new(port)
                .with_context(|| format!("opening connection {}", all.len() + group.len()))?;
            c.s.write_all(REQUEST)?;
            group.push(c);
        }
        for c in &mut group {
            let (status, _) = c.read_response()?;
            if status != 200 {
                bail!("nginx answered {status}");
            }
        }
        all.extend(group.into_iter().map(|c| c.s));
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_round_trip() {
        for v in [0, 1, 127, 128, 129, 255, 256, 1000, 25_000, 1 << 40] {
            let mid = Histogram::value(Histogram::index(v));
            let err = (mid as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err < 0.016, "{v} -> {mid}");
        }
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.016, "{p50}");
        assert_eq!(h.n, 1000);
    }
}
