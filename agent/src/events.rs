//! Decoding of the raw records the kernel programs write to the ring buffer.
//!
//! Pure and allocation-free: a record is borrowed, checked for size and kind, and turned into
//! an [`Event`]. Anything malformed is an error for the caller to count, never a panic.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use agent_common::{
    CTX_INJECTED, CTX_NONE, CTX_SERVER, ConnId, DIR_EGRESS, DIR_INGRESS, DataEventHeader, EV_CLOSE,
    EV_DATA, EV_OPEN, EV_PROC_EXEC, EV_PROC_EXIT, EV_PROC_FORK, EventHeader, OpenEvent,
    ROLE_CLIENT, ROLE_SERVER,
};

/// Direction of bytes relative to the traced process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Read by the process (recv/read).
    Ingress,
    /// Written by the process (send/write).
    Egress,
}

/// Which side of the connection the traced process is, as far as the kernel knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Accepted the connection.
    Server,
    /// Connected the socket.
    Client,
    /// Connection existed before sonde saw it; decided from the traffic.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenInfo {
    pub conn: ConnId,
    pub ts_ns: u64,
    pub tid: u32,
    pub role: Role,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    /// The opening task's name, NUL-padded.
    pub comm: [u8; 16],
}

impl OpenInfo {
    pub fn comm(&self) -> &str {
        let end = self.comm.iter().position(|&c| c == 0).unwrap_or(16);
        std::str::from_utf8(&self.comm[..end]).unwrap_or("")
    }
}

/// Trace context the kernel chose (propagation mode), reported with a data event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KernelCtx {
    #[default]
    None,
    /// A server read that starts a request: the trace the kernel propagates from this
    /// thread's calls.
    Server { trace_id: [u8; 16] },
    /// A client write into which `traceparent: 00-{trace_id}-{span_id}-01` was inserted.
    Injected {
        trace_id: [u8; 16],
        span_id: [u8; 8],
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataInfo<'a> {
    /// Kernel-chosen trace context, if any.
    pub ctx: KernelCtx,
    pub conn: ConnId,
    pub ts_ns: u64,
    pub tid: u32,
    pub dir: Direction,
    /// Stream offset of the first byte (per direction).
    pub pos: u64,
    /// Bytes the syscall moved; `data` holds only the first `data.len()` of them.
    pub len: u64,
    pub data: &'a [u8],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Open(OpenInfo),
    Data(DataInfo<'a>),
    Close {
        conn: ConnId,
        ts_ns: u64,
    },
    ProcessExit {
        tgid: u32,
        ts_ns: u64,
    },
    /// `tgid` called exec (only reported when sonde selects processes).
    ProcessExec {
        tgid: u32,
    },
    /// Traced process `parent` forked process `child` (only reported when sonde selects
    /// processes).
    ProcessFork {
        parent: u32,
        child: u32,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u8),
    #[error("data event claims {claimed} captured bytes but carries {present}")]
    BadCaptureLength { claimed: u32, present: usize },
    #[error("unknown direction {0}")]
    BadDirection(u8),
}

/// Whether a record is an exec or fork event, without decoding it.
pub fn is_process_start(record: &[u8]) -> bool {
    matches!(record.first(), Some(&(EV_PROC_EXEC | EV_PROC_FORK)))
}

fn read<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() < size_of::<T>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    // SAFETY: length checked above; `T` is a `#[repr(C)]` integer-only wire type, valid for any
    // bit pattern; `read_unaligned` makes no alignment assumption.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    let hdr: EventHeader = read(bytes)?;
    match hdr.kind {
        EV_OPEN => {
            let ev: OpenEvent = read(bytes)?;
            let role = match ev.role {
                ROLE_SERVER => Role::Server,
                ROLE_CLIENT => Role::Client,
                _ => Role::Unknown,
            };
            Ok(Event::Open(OpenInfo {
                conn: hdr.conn,
                ts_ns: hdr.ts_ns,
                tid: hdr.tid,
                role,
                local: sockaddr(ev.family, &ev.local_addr, ev.local_port),
                remote: sockaddr(ev.family, &ev.remote_addr, ev.remote_port),
                comm: ev.comm,
            }))
        }
        EV_DATA => {
            let ev: DataEventHeader = read(bytes)?;
            let payload = &bytes[size_of::<DataEventHeader>()..];
            let cap = ev.cap_len as usize;
            if cap > payload.len() {
                return Err(DecodeError::BadCaptureLength {
                    claimed: ev.cap_len,
                    present: payload.len(),
                });
            }
            let dir = match ev.dir {
                DIR_INGRESS => Direction::Ingress,
                DIR_EGRESS => Direction::Egress,
                d => return Err(DecodeError::BadDirection(d)),
            };
            let ctx = match ev.ctx_kind {
                CTX_SERVER => KernelCtx::Server {
                    trace_id: ev.ctx_trace_id,
                },
                CTX_INJECTED => KernelCtx::Injected {
                    trace_id: ev.ctx_trace_id,
                    span_id: ev.ctx_span_id,
                },
                _ => KernelCtx::None,
            };
            Ok(Event::Data(DataInfo {
                ctx,
                conn: hdr.conn,
                ts_ns: hdr.ts_ns,
                tid: hdr.tid,
                dir,
                pos: ev.pos,
                len: ev.len.max(ev.cap_len as u64),
                data: &payload[..cap],
            }))
        }
        EV_CLOSE => Ok(Event::Close {
            conn: hdr.conn,
            ts_ns: hdr.ts_ns,
        }),
        EV_PROC_EXIT => Ok(Event::ProcessExit {
            tgid: hdr.conn.tgid,
            ts_ns: hdr.ts_ns,
        }),
        EV_PROC_EXEC => Ok(Event::ProcessExec {
            tgid: hdr.conn.tgid,
        }),
        EV_PROC_FORK => Ok(Event::ProcessFork {
            parent: hdr.conn.tgid,
            child: hdr.conn.fd,
        }),
        k => Err(DecodeError::UnknownKind(k)),
    }
}

fn sockaddr(family: u8, addr: &[u8; 16], port: u16) -> Option<SocketAddr> {
    let ip = match family {
        4 => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
        6 => {
            let v6 = Ipv6Addr::from(*addr);
            // Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; show them as IPv4.
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Encoders used by tests, benchmarks and fuzzers to produce records exactly as the kernel
/// lays them out.
pub mod encode {
    use super::*;

    fn bytes_of<T: Copy>(v: &T) -> &[u8] {
        // SAFETY: wire types are `#[repr(C)]` with explicit zeroed padding: every byte is
        // initialised.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
    }

    pub fn header(kind: u8, conn: ConnId, ts_ns: u64, tid: u32) -> EventHeader {
        EventHeader {
            kind,
            _pad: [0; 3],
            tid,
            ts_ns,
            conn,
        }
    }

    pub fn open(
        conn: ConnId,
        ts_ns: u64,
        role: u8,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Vec<u8> {
        fn parts(a: SocketAddr) -> (u8, [u8; 16]) {
            match a.ip() {
                IpAddr::V4(v4) => {
                    let mut b = [0; 16];
                    b[..4].copy_from_slice(&v4.octets());
                    (4, b)
                }
                IpAddr::V6(v6) => (6, v6.octets()),
            }
        }
        let (family, local_addr) = parts(local);
        let (_, remote_addr) = parts(remote);
        let ev = OpenEvent {
            hdr: header(EV_OPEN, conn, ts_ns, conn.tgid),
            role,
            family,
            _pad: [0; 2],
            local_port: local.port(),
            remote_port: remote.port(),
            local_addr,
            remote_addr,
            comm: *b"test\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        bytes_of(&ev).to_vec()
    }

    /// A data record; `data` is the captured prefix, `len` the full syscall length.
    pub fn data(
        conn: ConnId,
        ts_ns: u64,
        tid: u32,
        dir: Direction,
        pos: u64,
        len: u64,
        data: &[u8],
    ) -> Vec<u8> {
        let ev = DataEventHeader {
            hdr: header(EV_DATA, conn, ts_ns, tid),
            dir: match dir {
                Direction::Ingress => DIR_INGRESS,
                Direction::Egress => DIR_EGRESS,
            },
            syscall: 0,
            _pad: [0; 2],
            cap_len: data.len() as u32,
            pos,
            len,
            ctx_kind: CTX_NONE,
            _pad2: [0; 7],
            ctx_trace_id: [0; 16],
            ctx_span_id: [0; 8],
        };
        let mut out = bytes_of(&ev).to_vec();
        out.extend_from_slice(data);
        out
    }

    pub fn close(conn: ConnId, ts_ns: u64) -> Vec<u8> {
        bytes_of(&header(EV_CLOSE, conn, ts_ns, conn.tgid)).to_vec()
    }

    /// A process record as the kernel writes it: `EV_PROC_EXIT`, `EV_PROC_EXEC`, or
    /// `EV_PROC_FORK` (whose `child` travels in `conn.fd`).
    pub fn process(kind: u8, tgid: u32, child: u32, ts_ns: u64) -> Vec<u8> {
        let conn = ConnId {
            tgid,
            fd: child,
            generation: 0,
        };
        bytes_of(&header(kind, conn, ts_ns, tgid)).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: ConnId = ConnId {
        tgid: 7,
        fd: 3,
        generation: 99,
    };

    #[test]
    fn round_trips_every_kind() {
        let l: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let r: SocketAddr = "[::1]:5555".parse().unwrap();
        let rec = encode::open(C, 5, ROLE_SERVER, l, "10.0.0.2:9".parse().unwrap());
        match decode(&rec).unwrap() {
            Event::Open(o) => {
                assert_eq!(o.role, Role::Server);
                assert_eq!(o.local, Some(l));
                assert_eq!(o.remote, Some("10.0.0.2:9".parse().unwrap()));
            }
            e => panic!("{e:?}"),
        }
        let rec = encode::open(C, 5, ROLE_CLIENT, r, r);
        assert!(matches!(decode(&rec).unwrap(), Event::Open(o) if o.remote == Some(r)));
        let rec = encode::data(C, 6, 8, Direction::Egress, 10, 100, b"GET");
        match decode(&rec).unwrap() {
            Event::Data(d) => {
                assert_eq!(
                    (d.pos, d.len, d.data, d.dir),
                    (10, 100, &b"GET"[..], Direction::Egress)
                );
            }
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            decode(&encode::close(C, 1)).unwrap(),
            Event::Close { .. }
        ));
    }

    #[test]
    fn rejects_malformed_records() {
        assert_eq!(decode(&[]), Err(DecodeError::Short(0)));
        let mut rec = encode::data(C, 6, 8, Direction::Egress, 10, 100, b"GET");
        rec.truncate(rec.len() - 1);
        assert!(matches!(
            decode(&rec),
            Err(DecodeError::BadCaptureLength { .. })
        ));
        let mut rec = encode::close(C, 1);
        rec[0] = 200;
        assert_eq!(decode(&rec), Err(DecodeError::UnknownKind(200)));
        // Every truncation of every record kind is an error or a valid event, never a panic.
        for full in [
            encode::open(
                C,
                1,
                1,
                "1.2.3.4:5".parse().unwrap(),
                "[::1]:1".parse().unwrap(),
            ),
            encode::data(C, 1, 1, Direction::Ingress, 0, 3, b"abc"),
            encode::close(C, 1),
        ] {
            for n in 0..full.len() {
                let _ = decode(&full[..n]);
            }
        }
    }
}

/// Puts records from all CPUs back into timestamp order.
///
/// The ring buffer orders records by when they were *committed*, which for a write stamped
/// at syscall entry can be after the peer's read of the same bytes (another CPU). Causality
/// across processes (a client's request before the server's read of it) is in *timestamp*
/// order, so records are held for `hold_ns` and released sorted by timestamp.
///
/// Process exits held back are remembered apart ([`Reorder::held_exit`]): a process started
/// with the same pid (pid reuse) must not be acted on before its predecessor has ended.
#[derive(Default)]
pub struct Reorder {
    arena: Vec<u8>,
    /// (timestamp, offset, length) into `arena`.
    items: Vec<(u64, u32, u32)>,
    spare: Vec<u8>,
    /// (tgid, timestamp) of the process exits among `items`.
    exits: Vec<(u32, u64)>,
}

/// A record's timestamp, without decoding it (0 for a record too short to have one).
fn record_ts(record: &[u8]) -> u64 {
    record
        .get(8..16)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(0)
}

/// The pid an exec or fork record starts (the child, for a fork).
pub fn started_pid(record: &[u8]) -> Option<u32> {
    match decode(record) {
        Ok(Event::ProcessExec { tgid }) => Some(tgid),
        Ok(Event::ProcessFork { child, .. }) => Some(child),
        _ => None,
    }
}

impl Reorder {
    pub fn push(&mut self, record: &[u8]) {
        let ts = record_ts(record);
        // Only exit records are decoded here (one byte compared for every other record).
        if record.first() == Some(&EV_PROC_EXIT)
            && let Ok(Event::ProcessExit { tgid, ts_ns }) = decode(record)
        {
            self.exits.push((tgid, ts_ns));
        }
        self.items
            .push((ts, self.arena.len() as u32, record.len() as u32));
        self.arena.extend_from_slice(record);
    }

    /// The timestamp of the latest held-back exit of process `tgid`, if any.
    pub fn held_exit(&self, tgid: u32) -> Option<u64> {
        self.exits
            .iter()
            .filter(|&&(t, _)| t == tgid)
            .map(|&(_, ts)| ts)
            .max()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Calls `f` for every record stamped at or before `until_ns`, in timestamp order (ties in
    /// arrival order), and keeps the rest.
    pub fn release(&mut self, until_ns: u64, mut f: impl FnMut(&[u8])) {
        if self.items.is_empty() {
            return;
        }
        self.items.sort_by_key(|&(ts, _, _)| ts);
        let cut = self.items.partition_point(|&(ts, _, _)| ts <= until_ns);
        self.exits.retain(|&(_, ts)| ts > until_ns);
        for &(_, off, len) in &self.items[..cut] {
            f(&self.arena[off as usize..(off + len) as usize]);
        }
        // Compact what is held back.
        self.spare.clear();
        let mut kept = Vec::with_capacity(self.items.len() - cut);
        for &(ts, off, len) in &self.items[cut..] {
            kept.push((ts, self.spare.len() as u32, len));
            self.spare
                .extend_from_slice(&self.arena[off as usize..(off + len) as usize]);
        }
        std::mem::swap(&mut self.arena, &mut self.spare);
        self.items = kept;
        if self.arena.capacity() > 64 << 20 && self.arena.len() < 1 << 20 {
            self.arena.shrink_to(1 << 20);
            self.spare = Vec::new();
        }
    }
}

#[cfg(test)]
mod reorder_tests {
    use super::*;

    #[test]
    fn started_pid_reads_exec_and_fork_records_only() {
        let exec = encode::process(EV_PROC_EXEC, 42, 0, 5);
        let fork = encode::process(EV_PROC_FORK, 42, 43, 5);
        let exit = encode::process(EV_PROC_EXIT, 42, 0, 5);
        assert_eq!(started_pid(&exec), Some(42));
        assert_eq!(started_pid(&fork), Some(43));
        assert_eq!(started_pid(&exit), None);
        assert_eq!(started_pid(&exec[..18]), None);
        assert!(matches!(
            decode(&fork),
            Ok(Event::ProcessFork {
                parent: 42,
                child: 43
            })
        ));
        assert_eq!(record_ts(&exit), 5);
    }

    #[test]
    fn releases_in_timestamp_order_and_holds_the_rest() {
        let c = ConnId::default();
        let mut r = Reorder::default();
        for ts in [30u64, 10, 20, 50, 40] {
            r.push(&encode::close(c, ts));
        }
        let mut got = vec![];
        r.release(35, |rec| match decode(rec).unwrap() {
            Event::Close { ts_ns, .. } => got.push(ts_ns),
            e => panic!("{e:?}"),
        });
        assert_eq!(got, vec![10, 20, 30]);
        assert_eq!(r.len(), 2);
        r.push(&encode::close(c, 45));
        got.clear();
        r.release(u64::MAX, |rec| {
            if let Ok(Event::Close { ts_ns, .. }) = decode(rec) {
                got.push(ts_ns)
            }
        });
        assert_eq!(got, vec![40, 45, 50]);
        assert!(r.is_empty());
        // Held-back exits are known by pid until released.
        r.push(&encode::process(EV_PROC_EXIT, 42, 0, 60));
        r.push(&encode::process(EV_PROC_EXIT, 43, 0, 70));
        r.push(&encode::process(EV_PROC_EXIT, 42, 0, 80));
        assert_eq!(r.held_exit(42), Some(80));
        assert_eq!(r.held_exit(7), None);
        r.release(75, |_| {});
        assert_eq!((r.held_exit(42), r.held_exit(43)), (Some(80), None));
        r.release(u64::MAX, |_| {});
        assert_eq!(r.held_exit(42), None);
        // Short garbage records are kept and released (decode then rejects them).
        r.push(&[1, 2, 3]);
        let mut n = 0;
        r.release(0, |_| n += 1);
        assert_eq!(n, 1);
    }
}
