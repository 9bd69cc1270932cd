//! A lean OTLP/HTTP trace receiver on 127.0.0.1: accepts `POST /v1/traces` (protobuf,
//! uncompressed) and counts the spans in each request by walking the protobuf framing, without
//! decoding anything else. Cheap enough not to compete with what is being measured.
use std::{
    io::{self, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::Result;

#[derive(Default)]
struct Counters {
    spans: AtomicU64,
    requests: AtomicU64,
    /// Requests that were not counted (not protobuf, compressed, malformed).
    rejected: AtomicU64,
}

pub struct Receiver {
    port: u16,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    pub fn start() -> Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (counters.clone(), stop.clone());
        std::thread::Builder::new()
            .name("otlp-receiver".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s.load(Relaxed) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let c = c.clone();
                    // Ends when the exporter closes the connection.
                    let _ = std::thread::Builder::new()
                        .name("otlp-conn".into())
                        .spawn(move || serve(conn, &c));
                }
            })?;
        Ok(Receiver {
            port,
            counters,
            stop,
        })
    }

    /// For `OTEL_EXPORTER_OTLP_ENDPOINT` (exporters append `/v1/traces`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn spans(&self) -> u64 {
        self.counters.spans.load(Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Relaxed)
    }

    pub fn rejected(&self) -> u64 {
        self.counters.rejected.load(Relaxed)
    }

    pub fn reset(&self) {
        self.counters.spans.store(0, Relaxed);
        self.counters.requests.store(0, Relaxed);
        self.counters.rejected.store(0, Relaxed);
    }

    /// Waits until `want` spans arrived, or nothing arrived for `quiet`; returns the count.
    pub fn settle(&self, want: u64, quiet: Duration) -> u64 {
        let mut last = self.spans();
        let mut since = Instant::now();
        loop {
            let n = self.spans();
            if n >= want {
                return n;
            }
            if n != last {
                last = n;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(mut s: TcpStream, c: &Counters) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(1 << 20);
    loop {
        match one_request(&mut s, &mut buf) {
            Ok(Some(body)) => {
                let status = match body.and_then(|b| count_spans(&b)) {
                    Some(n) => {
                        c.spans.fetch_add(n, Relaxed);
                        c.requests.fetch_add(1, Relaxed);
                        "200 OK"
                    }
                    None => {
                        c.rejected.fetch_add(1, Relaxed);
                        "400 Bad Request"
                    }
                };
                // An empty body is an empty ExportTraceServiceResponse: full success.
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/x-protobuf\r\n\
                     Content-Length: 0\r\n\r\n"
                );
                if s.write_all(resp.as_bytes()).is_err() {
                    return;
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
}

/// Reads one request. `Ok(None)`: the connection closed. `Ok(Some(None))`: a request that
/// cannot be counted (compressed, not protobuf).
fn one_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<Option<Vec<u8>>>> {
    let mut tmp = [0u8; 65536];
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::other("request head too large"));
        }
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    };
    let countable = header("content-type").is_some_and(|t| t.starts_with("application/x-protobuf"))
        && header("content-encoding").is_none_or(|e| e == "identity");
    buf.drain(..head_end);
    let body = if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        read_chunked(s, buf, &mut tmp)?
    } else {
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < len {
            let n = s.read(&mut tmp)?;
            if n == 0 {
                return Ok(None);
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        // Not `drain(..).collect()`: xtask is a debug build, and that copies byte by byte.
        let rest = buf.split_off(len);
        std::mem::replace(buf, rest)
    };
    Ok(Some(countable.then_some(body)))
}

fn read_chunked(s: &mut TcpStream, buf: &mut Vec<u8>, tmp: &mut [u8]) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut fill = |buf: &mut Vec<u8>| -> io::Result<()> {
        let n = s.read(tmp)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
        Ok(())
    };
    loop {
        let line_end = loop {
            if let Some(i) = find(buf, b"\r\n") {
                break i;
            }
            fill(buf)?;
        };
        let size_hex = String::from_utf8_lossy(&buf[..line_end]);
        let size = usize::from_str_radix(size_hex.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| io::Error::other("bad chunk size"))?;
        buf.drain(..line_end + 2);
        while buf.len() < size + 2 {
            fill(buf)?;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
        if size == 0 {
            // No trailers from exporters.
            return Ok(body);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Calls `f(field number, bytes)` for every length-delimited field of message `b`, skipping
/// the others. None if `b` is not a well-formed message.
fn each_len(b: &[u8], mut f: impl FnMut(u64, &[u8]) -> Option<()>) -> Option<()> {
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i)?;
        match key & 7 {
            0 => {
                varint(b, &mut i)?;
            }
            1 => i += 8,
            2 => {
                let len = usize::try_from(varint(b, &mut i)?).ok()?;
                let end = i.checked_add(len).filter(|&e| e <= b.len())?;
                f(key >> 3, &b[i..end])?;
                i = end;
            }
            5 => i += 4,
            _ => return None,
        }
    }
    (i == b.len()).then_some(())
}

/// Spans in an `ExportTraceServiceRequest`: resource_spans (1) → scope_spans (2) → spans (2).
pub fn count_spans(req: &[u8]) -> Option<u64> {
    let mut n = 0;
    each_len(req, |field, resource_spans| {
        if field != 1 {
            return Some(());
        }
        each_len(resource_spans, |field, scope_spans| {
            if field != 2 {
                return Some(());
            }
            each_len(scope_spans, |field, _span| {
                n += u64::from(field == 2);
                Some(())
            })
        })
    })?;
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len_field(field: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(field << 3) | 2, payload.len() as u8];
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn counts_spans_through_the_nesting() {
        let span = [len_field(5, b"GET"), vec![0x39, 1, 2, 3, 4, 5, 6, 7, 8]].concat();
        let scope = [
            len_field(1, &len_field(1, b"sonde")),
            len_field(2, &span),
            len_field(2, &span),
        ]
        .concat();
        let resource_spans = [
            len_field(1, &len_field(1, b"attrs")),
            len_field(2, &scope),
            len_field(3, b"schema"),
        ]
        .concat();
        let req = [len_field(1, &resource_spans), len_field(1, &resource_spans)].concat();
        assert_eq!(count_spans(&req), Some(4));
        assert_eq!(count_spans(&[]), Some(0));
        assert_eq!(count_spans(&req[..req.len() - 1]), None);
    }
}
