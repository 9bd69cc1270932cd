//! Connection tracking and stream reassembly: turns decoded kernel events into HTTP/1.x
//! request/response exchanges.
//!
//! [`ConnTable`] keeps one entry per connection (bounded, least-recently-active evicted
//! first). Each entry has an HTTP/1 decoder per direction (`stream.rs`) that follows message
//! framing by byte count using the events' stream positions, buffering only heads that span
//! events, and a FIFO of requests waiting for their responses (pipelining).
//!
//! Loss handling, in short:
//! - a gap (lost event) or uncaptured bytes inside a body cost nothing;
//! - inside a head (or where a head must start) they lose that message: the stream waits for
//!   an event whose first bytes start a message (`parse_resyncs`).
//!   - A lost request is counted in `requests_dropped`. Without pipelining its response comes
//!     before the next request and is ignored; on a connection seen pipelining, a marker in
//!     the queue makes its response be skipped.
//!   - A lost response ends its request as [`Outcome::ResponseUnparseable`]. Without
//!     pipelining the next response answers the latest request (requests before it are also
//!     `ResponseUnparseable`); on a pipelining connection the requests queued behind it are
//!     dropped (`requests_dropped`), their pairing being ambiguous.
//! - a connection not seen opening (`Role::Unknown`, or Open lost) is joined mid-stream: each
//!   direction waits for an event whose first bytes start a message, and the first message
//!   decides which side the process is;
//! - a connection whose first bytes cannot be HTTP/1.x (or, joined mid-stream, carry a TLS /
//!   HTTP/2 / SSH signature), or that does not resynchronise within a few events, is ignored
//!   until it closes (`conns_not_http`).
mod stream;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;

use agent_common::ConnId;

use crate::events::{DataInfo, Direction, Event, KernelCtx, Role};
use crate::metrics::Stats;
use crate::protocol::http1::{MessageKind, RequestHead, ResponseHead};
use stream::{Env, Shared, Signal, Stream};

/// Which side of the exchange the traced process was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The process received the request (SERVER span).
    Server,
    /// The process sent the request (CLIENT span).
    Client,
}

/// How an exchange ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A final response was seen in full.
    Complete,
    /// The connection closed (or the process exited) before a complete response.
    ConnectionClosed,
    /// The response stream became unparseable, or bytes were lost in its head.
    ResponseUnparseable,
    /// Nothing happened for the idle timeout.
    TimedOut,
}

/// One request with its response (if any), as seen on one connection of one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub conn: ConnId,
    pub side: Side,
    /// Socket addresses of the traced process's end and of its peer, when known.
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    pub request: RequestHead,
    pub response: Option<ResponseHead>,
    pub outcome: Outcome,
    /// Kernel monotonic ns of the syscall that carried the request's first byte.
    pub start_ns: u64,
    /// Kernel monotonic ns of the syscall that carried the response's last byte (or of the
    /// event that ended the exchange).
    pub end_ns: u64,
    /// Thread that read (server) or wrote (client) the request's first byte.
    pub request_tid: u32,
    /// Thread that wrote (server) or read (client) the response's first byte; 0 if none.
    pub response_tid: u32,
}

/// A request head was just parsed: the moment span identity and parent are decided (the
/// exchange itself completes later, after any calls the request causes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestStart {
    pub conn: ConnId,
    pub side: Side,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    /// Same as the resulting [`Exchange::start_ns`].
    pub start_ns: u64,
    pub tid: u32,
    pub traceparent: Option<String>,
    /// Context the kernel chose for this request (propagation mode).
    pub kernel_ctx: KernelCtx,
}

/// Bounds of the connection table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections tracked at once; beyond, the least recently active one is evicted.
    pub max_conns: usize,
    /// Largest message head; a larger one is abandoned (counted).
    pub max_head_bytes: usize,
    /// Requests waiting for responses per connection.
    pub max_pipelined: usize,
    /// Connections idle for longer are expired by [`ConnTable::expire`].
    pub idle_timeout_ns: u64,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_conns: 65536,
            max_head_bytes: 64 * 1024,
            max_pipelined: 64,
            idle_timeout_ns: 60_000_000_000,
        }
    }
}

/// FxHash-style hasher with a final avalanche, for the integer keys of the table.
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn finish(&self) -> u64 {
        // murmur3 fmix64: every input bit reaches the low bits the table indexes with.
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

const NIL: u32 = u32::MAX;

fn key(c: &ConnId) -> u64 {
    (u64::from(c.tgid) << 32) | u64::from(c.fd)
}

fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// One connection.
struct Conn {
    sh: Shared,
    /// Indexed by [`dir_index`].
    streams: [Stream; 2],
    /// Not (or no longer) HTTP/1: events are only used to keep the entry alive.
    ignored: bool,
    /// Latest event timestamp.
    last_ts: u64,
}

impl Conn {
    fn new() -> Self {
        Conn {
            sh: Shared::new(),
            streams: [
                Stream::new(Direction::Ingress),
                Stream::new(Direction::Egress),
            ],
            ignored: false,
            last_ts: 0,
        }
    }

    fn reset(
        &mut self,
        id: ConnId,
        role: Role,
        local: Option<SocketAddr>,
        remote: Option<SocketAddr>,
        ts: u64,
    ) {
        let req_dir = match role {
            Role::Server => Some(Direction::Ingress),
            Role::Client => Some(Direction::Egress),
            Role::Unknown => None,
        };
        let fresh = req_dir.is_some();
        self.sh.reset(id, local, remote, req_dir);
        for s in &mut self.streams {
            let kind = req_dir.map(|rd| {
                if rd == s.dir {
                    MessageKind::Request
                } else {
                    MessageKind::Response
                }
            });
            s.reset(kind, fresh);
        }
        self.ignored = false;
        self.last_ts = ts;
    }

    fn on_data(&mut self, d: &DataInfo<'_>, env: &mut Env<'_>) {
        let Conn { sh, streams, .. } = self;
        streams[dir_index(d.dir)].feed(sh, env, d);
        if let Some(rd) = sh.req_dir {
            for s in streams.iter_mut().filter(|s| s.kind.is_none()) {
                s.kind = Some(if s.dir == rd {
                    MessageKind::Request
                } else {
                    MessageKind::Response
                });
            }
        }
        match sh.signal.take() {
            None => {}
            Some(Signal::NotHttp | Signal::Abandon) => {
                Stats::inc(&env.stats.conns_not_http);
                sh.finish(env, &Outcome::ResponseUnparseable, d.ts_ns, false);
                self.ignore();
            }
            Some(Signal::Tunnel) => self.ignore(),
        }
    }

    fn ignore(&mut self) {
        self.ignored = true;
        for s in &mut self.streams {
            s.stop();
        }
    }

    /// Ends the connection's pending exchanges. `closed`: the connection really closed, which
    /// completes a close-delimited response.
    fn finish(&mut self, env: &mut Env<'_>, outcome: Outcome, ts: u64, closed: bool) {
        let first_complete = closed
            && self
                .sh
                .req_dir
                .is_some_and(|rd| self.streams[dir_index(stream::other(rd))].until_close_front());
        self.sh.finish(env, &outcome, ts, first_complete);
    }
}

struct Slot {
    conn: Conn,
    /// Recency list (most recent at `head`).
    prev: u32,
    next: u32,
    /// Per-process list.
    tprev: u32,
    tnext: u32,
}

enum Lookup {
    Missing,
    /// Same connection.
    Same(u32),
    /// The entry is an older generation of this (tgid, fd).
    Older(u32),
    /// The event is about an older generation than the entry: stale.
    Stale,
}

/// All tracked connections. Single-threaded; every method is O(1) per event except
/// [`ConnTable::drain`] and process exits (O(connections of that process)).
pub struct ConnTable {
    limits: ConnLimits,
    /// (tgid, fd) -> slot.
    map: FastMap<u64, u32>,
    /// tgid -> first slot of that process's list.
    tgids: FastMap<u32, u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
    /// Request starts not yet taken by [`ConnTable::take_starts`].
    starts: Vec<RequestStart>,
}

impl ConnTable {
    pub fn new(limits: ConnLimits) -> Self {
        ConnTable {
            limits,
            map: FastMap::default(),
            tgids: FastMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            starts: Vec::new(),
        }
    }

    /// Moves the request starts seen since the last call into `out`, in event order. Call it
    /// after each [`ConnTable::on_event`], before handling that event's exchanges.
    pub fn take_starts(&mut self, out: &mut Vec<RequestStart>) {
        out.append(&mut self.starts);
    }

    /// Appends the ids of process `tgid`'s connections to `out`.
    pub fn conns_of(&self, tgid: u32, out: &mut Vec<ConnId>) {
        let mut s = self.tgids.get(&tgid).copied().unwrap_or(NIL);
        while s != NIL {
            let slot = &self.slots[s as usize];
            out.push(slot.conn.sh.id);
            s = slot.tnext;
        }
    }

    /// Connections tracked.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn env<'a>(&mut self, stats: &'a Stats, out: &'a mut Vec<Exchange>) -> Env<'a> {
        Env {
            stats,
            out,
            starts: std::mem::take(&mut self.starts),
            max_head: self.limits.max_head_bytes,
            max_pipelined: self.limits.max_pipelined,
        }
    }

    /// Feeds one event; completed exchanges are pushed to `out`.
    pub fn on_event(&mut self, ev: &Event<'_>, stats: &Stats, out: &mut Vec<Exchange>) {
        let mut env = self.env(stats, out);
        self.on_event_env(ev, &mut env);
        self.starts = env.starts;
    }

    fn on_event_env(&mut self, ev: &Event<'_>, env: &mut Env<'_>) {
        match ev {
            Event::Open(o) => {
                match self.lookup(&o.conn) {
                    Lookup::Same(_) | Lookup::Stale => return,
                    Lookup::Older(s) => self.close_slot(s, None, env),
                    Lookup::Missing => {}
                }
                self.insert(o.conn, o.role, o.local, o.remote, o.ts_ns, env);
            }
            Event::Data(d) => {
                let s = match self.lookup(&d.conn) {
                    Lookup::Same(s) => s,
                    Lookup::Stale => return,
                    Lookup::Older(s) => {
                        self.close_slot(s, None, env);
                        self.insert(d.conn, Role::Unknown, None, None, d.ts_ns, env)
                    }
                    Lookup::Missing => self.insert(d.conn, Role::Unknown, None, None, d.ts_ns, env),
                };
                self.touch(s, d.ts_ns);
                let conn = &mut self.slots[s as usize].conn;
                if !conn.ignored {
                    conn.on_data(d, env);
                }
            }
            Event::Close { conn, ts_ns } => match self.lookup(conn) {
                Lookup::Same(s) => self.close_slot(s, Some(*ts_ns), env),
                Lookup::Older(s) => self.close_slot(s, None, env),
                Lookup::Missing | Lookup::Stale => {}
            },
            Event::ProcessExit { tgid, ts_ns } => {
                let mut s = self.tgids.get(tgid).copied().unwrap_or(NIL);
                while s != NIL {
                    let next = self.slots[s as usize].tnext;
                    self.close_slot(s, Some(*ts_ns), env);
                    s = next;
                }
            }
            // Process selection only.
            Event::ProcessExec { .. } | Event::ProcessFork { .. } => {}
        }
    }

    /// Expires connections idle since before `now_ns - idle_timeout`: their pending requests
    /// become exchanges with [`Outcome::TimedOut`] (ending at `now_ns`).
    pub fn expire(&mut self, now_ns: u64, stats: &Stats, out: &mut Vec<Exchange>) {
        let mut env = self.env(stats, out);
        let cutoff = now_ns.saturating_sub(self.limits.idle_timeout_ns);
        while self.tail != NIL && self.slots[self.tail as usize].conn.last_ts < cutoff {
            let s = self.tail;
            self.slots[s as usize]
                .conn
                .finish(&mut env, Outcome::TimedOut, now_ns, false);
            self.remove(s);
        }
    }

    /// Flushes everything (shutdown): pending requests become exchanges with
    /// [`Outcome::ConnectionClosed`], ending at their connection's last activity.
    pub fn drain(&mut self, stats: &Stats, out: &mut Vec<Exchange>) {
        let mut env = self.env(stats, out);
        while self.tail != NIL {
            let s = self.tail;
            let conn = &mut self.slots[s as usize].conn;
            let ts = conn.last_ts;
            conn.finish(&mut env, Outcome::ConnectionClosed, ts, false);
            self.remove(s);
        }
    }

    fn lookup(&self, id: &ConnId) -> Lookup {
        match self.map.get(&key(id)) {
            None => Lookup::Missing,
            Some(&s) => {
                let have = self.slots[s as usize].conn.sh.id.generation;
                match id.generation.cmp(&have) {
                    std::cmp::Ordering::Equal => Lookup::Same(s),
                    std::cmp::Ordering::Greater => Lookup::Older(s),
                    std::cmp::Ordering::Less => Lookup::Stale,
                }
            }
        }
    }

    /// Ends a connection as closed (at `ts`, or at its last activity) and forgets it.
    fn close_slot(&mut self, s: u32, ts: Option<u64>, env: &mut Env<'_>) {
        let conn = &mut self.slots[s as usize].conn;
        let ts = ts.unwrap_or(conn.last_ts);
        conn.finish(env, Outcome::ConnectionClosed, ts, true);
        self.remove(s);
    }

    fn insert(
        &mut self,
        id: ConnId,
        role: Role,
        local: Option<SocketAddr>,
        remote: Option<SocketAddr>,
        ts: u64,
        env: &mut Env<'_>,
    ) -> u32 {
        while self.map.len() >= self.limits.max_conns.max(1) && self.tail != NIL {
            let s = self.tail;
            let conn = &mut self.slots[s as usize].conn;
            let last = conn.last_ts;
            conn.finish(env, Outcome::ConnectionClosed, last, false);
            self.remove(s);
            Stats::inc(&env.stats.conns_evicted);
        }
        let s = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    conn: Conn::new(),
                    prev: NIL,
                    next: NIL,
                    tprev: NIL,
                    tnext: NIL,
                });
                (self.slots.len() - 1) as u32
            }
        };
        self.slots[s as usize]
            .conn
            .reset(id, role, local, remote, ts);
        self.map.insert(key(&id), s);
        // Recency list: at the front.
        self.link_front(s);
        // Process list: at the front.
        let first = self.tgids.insert(id.tgid, s).unwrap_or(NIL);
        let slot = &mut self.slots[s as usize];
        slot.tprev = NIL;
        slot.tnext = first;
        if first != NIL {
            self.slots[first as usize].tprev = s;
        }
        Stats::inc(&env.stats.conns_opened);
        s
    }

    fn remove(&mut self, s: u32) {
        self.unlink(s);
        let slot = &mut self.slots[s as usize];
        let id = slot.conn.sh.id;
        let (tp, tn) = (slot.tprev, slot.tnext);
        slot.tprev = NIL;
        slot.tnext = NIL;
        slot.conn.ignore();
        slot.conn.sh.pending.clear();
        if tn != NIL {
            self.slots[tn as usize].tprev = tp;
        }
        if tp != NIL {
            self.slots[tp as usize].tnext = tn;
        } else if tn != NIL {
            self.tgids.insert(id.tgid, tn);
        } else {
            self.tgids.remove(&id.tgid);
        }
        self.map.remove(&key(&id));
        self.free.push(s);
    }

    fn link_front(&mut self, s: u32) {
        let old = self.head;
        let slot = &mut self.slots[s as usize];
        slot.prev = NIL;
        slot.next = old;
        if old != NIL {
            self.slots[old as usize].prev = s;
        } else {
            self.tail = s;
        }
        self.head = s;
    }

    fn unlink(&mut self, s: u32) {
        let (p, n) = {
            let slot = &self.slots[s as usize];
            (slot.prev, slot.next)
        };
        if p != NIL {
            self.slots[p as usize].next = n;
        } else {
            self.head = n;
        }
        if n != NIL {
            self.slots[n as usize].prev = p;
        } else {
            self.tail = p;
        }
    }

    /// Marks a connection as the most recently active.
    fn touch(&mut self, s: u32, ts: u64) {
        if self.head != s {
            self.unlink(s);
            self.link_front(s);
        }
        let conn = &mut self.slots[s as usize].conn;
        conn.last_ts = conn.last_ts.max(ts);
    }
}

#[cfg(test)]
mod hostile_tests;
