//! Chooses each span's identity and parent, then builds it.
//!
//! Identity is decided when a request *starts* (its head was parsed), because the calls a
//! request causes complete before it does. Three links, in order of authority:
//!
//! 1. **Incoming `traceparent`** on a server request continues that trace.
//! 2. **Same host, no headers:** a server request whose connection is the far end of a
//!    traced client connection on this host (socket addresses mirrored) is the child of that
//!    client request. Requests on one connection pair up in order. When the request also
//!    carries a `traceparent` of a *different* trace (set by an SDK in the caller), the
//!    header wins.
//! 3. **Inside a process:** a client request is the child of the server request being served
//!    on the same thread, if that thread serves exactly one (thread-per-request servers). If
//!    the thread serves none and the whole process serves exactly one, that one (thread
//!    pools). Otherwise — an event loop (Node, asyncio, tokio) with several requests in flight
//!    — there is no parent: no parent is better than a wrong one.
//!
//! Guard rails: a context is adopted only while fresh (`max_context_age_ns`), a server request
//! parents at most `max_children` calls, a same-host client context is adopted once, and a
//! child never starts before its parent.
use std::{collections::VecDeque, net::SocketAddr, sync::Arc};

use agent_common::ConnId;
use foldhash::HashMap;

use super::{
    Resource, Span, SpanId, TraceContext, TraceId,
    http::{self, Lineage, SpanOptions},
};
use crate::{
    clock::BootClock,
    conn::{Exchange, RequestStart, Side},
    events::KernelCtx,
};

#[derive(Clone, Debug)]
pub struct LinkOptions {
    /// Link server requests to traced client requests of this host by socket addresses.
    pub same_host: bool,
    /// Calls one server request may parent.
    pub max_children: u32,
    /// Oldest context that may still be adopted.
    pub max_context_age_ns: u64,
    /// Same-host client contexts kept waiting for their server side (oldest dropped).
    pub max_pending_peers: usize,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions {
            same_host: true,
            max_children: 1000,
            max_context_age_ns: 300_000_000_000,
            max_pending_peers: 65536,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Ctx {
    span_id: SpanId,
    lineage: Lineage,
    start_ns: u64,
    /// Thread that started the request (finds a server's `by_thread` entry without a scan).
    tid: u32,
}

#[derive(Clone, Copy, Debug)]
struct OpenServer {
    ctx: Ctx,
    children: u32,
}

type PeerKey = (SocketAddr, SocketAddr);

pub struct Assembler {
    clock: BootClock,
    opts: SpanOptions,
    link: LinkOptions,
    /// Server requests started and not yet complete, per connection (FIFO: pipelining).
    servers: HashMap<ConnId, VecDeque<Ctx>>,
    /// The same, per (tgid, tid) and per tgid, for in-process parenting.
    by_thread: HashMap<(u32, u32), Vec<OpenServer>>,
    by_process: HashMap<u32, Vec<OpenServer>>,
    /// Client requests started and not yet complete, per connection.
    clients: HashMap<ConnId, VecDeque<Ctx>>,
    /// Client requests waiting for their same-host server side, by (client local, remote).
    peers: HashMap<PeerKey, VecDeque<Ctx>>,
    peer_count: usize,
}

impl Assembler {
    pub fn new(clock: BootClock, opts: SpanOptions) -> Self {
        Self::with_links(clock, opts, LinkOptions::default())
    }

    pub fn with_links(clock: BootClock, opts: SpanOptions, link: LinkOptions) -> Self {
        Assembler {
            clock,
            opts,
            link,
            servers: HashMap::default(),
            by_thread: HashMap::default(),
            by_process: HashMap::default(),
            clients: HashMap::default(),
            peers: HashMap::default(),
            peer_count: 0,
        }
    }

    /// Re-reads the wall clock offset (NTP may have slewed it).
    pub fn refresh_clock(&mut self) {
        self.clock = BootClock::sample();
    }

    /// Decides the identity of a request that just started.
    pub fn on_start(&mut self, st: &RequestStart) {
        let header = st
            .traceparent
            .as_deref()
            .and_then(|v| TraceContext::parse(v.as_bytes()));
        let ctx = match st.side {
            Side::Server => {
                let peer = self.take_peer(st);
                let lineage = match (header, peer) {
                    (Some(h), Some(p)) if p.lineage.trace_id != h.trace_id => {
                        Lineage::from_context(&h)
                    }
                    (_, Some(p)) => Lineage {
                        trace_id: p.lineage.trace_id,
                        parent: Some(p.span_id),
                        flags: p.lineage.flags,
                    },
                    (Some(h), None) => Lineage::from_context(&h),
                    // Propagation mode: the kernel already propagates this trace id from
                    // this request's calls; the span must be in it.
                    (None, None) => match st.kernel_ctx {
                        KernelCtx::Server { trace_id } => Lineage {
                            trace_id: TraceId(trace_id),
                            parent: None,
                            flags: 1,
                        },
                        _ => Lineage::root(),
                    },
                };
                let ctx = Ctx {
                    span_id: SpanId::random(),
                    lineage,
                    start_ns: st.start_ns,
                    tid: st.tid,
                };
                let open = OpenServer { ctx, children: 0 };
                self.by_thread
                    .entry((st.conn.tgid, st.tid))
                    .or_default()
                    .push(open);
                self.by_process.entry(st.conn.tgid).or_default().push(open);
                self.servers.entry(st.conn).or_default().push_back(ctx);
                ctx
            }
            Side::Client => {
                let injected = match st.kernel_ctx {
                    KernelCtx::Injected { trace_id, span_id } => {
                        Some((TraceId(trace_id), SpanId(span_id)))
                    }
                    _ => None,
                };
                let parent = self.in_process_parent(st);
                let lineage = match (parent, injected) {
                    // What went on the wire is the truth downstream: keep the parent only if
                    // it is in the injected trace.
                    (Some(p), Some((t, _))) if p.lineage.trace_id == t => Lineage {
                        trace_id: t,
                        parent: Some(p.span_id),
                        flags: p.lineage.flags,
                    },
                    (_, Some((t, _))) => Lineage {
                        trace_id: t,
                        parent: None,
                        flags: 1,
                    },
                    (Some(p), None) => Lineage {
                        trace_id: p.lineage.trace_id,
                        parent: Some(p.span_id),
                        flags: p.lineage.flags,
                    },
                    // The process propagates a context itself (it runs an SDK, or forwards
                    // the header): join that trace.
                    (None, None) => header
                        .map(|h| Lineage::from_context(&h))
                        .unwrap_or_else(Lineage::root),
                };
                let ctx = Ctx {
                    span_id: injected.map(|(_, s)| s).unwrap_or_else(SpanId::random),
                    lineage,
                    start_ns: st.start_ns,
                    tid: st.tid,
                };
                self.clients.entry(st.conn).or_default().push_back(ctx);
                if let (true, Some(l), Some(r)) = (self.link.same_host, st.local, st.remote) {
                    self.add_peer((l, r), ctx);
                }
                ctx
            }
        };
        let _ = ctx;
    }

    fn add_peer(&mut self, key: PeerKey, ctx: Ctx) {
        if self.peer_count >= self.link.max_pending_peers {
            // Bounded: sweep stale entries first; if still full, skip linking this one.
            self.sweep_peers(ctx.start_ns);
            if self.peer_count >= self.link.max_pending_peers {
                return;
            }
        }
        let q = self.peers.entry(key).or_default();
        if q.len() >= 64 {
            q.pop_front();
            self.peer_count -= 1;
        }
        q.push_back(ctx);
        self.peer_count += 1;
    }

    /// The traced client request on this host whose bytes this server request is reading.
    fn take_peer(&mut self, st: &RequestStart) -> Option<Ctx> {
        if !self.link.same_host {
            return None;
        }
        let (l, r) = (st.local?, st.remote?);
        // The client's local address is our remote one and vice versa.
        let q = self.peers.get_mut(&(r, l))?;
        let mut found = None;
        while let Some(c) = q.front().copied() {
            if c.start_ns > st.start_ns {
                // Written after we read: not ours (clocks are one, so this is a later request).
                break;
            }
            q.pop_front();
            self.peer_count -= 1;
            if st.start_ns - c.start_ns <= self.link.max_context_age_ns {
                found = Some(c);
                break;
            }
        }
        // An emptied queue stays until `expire` (keep-alive connections reuse it).
        found
    }

    fn in_process_parent(&mut self, st: &RequestStart) -> Option<Ctx> {
        let max_age = self.link.max_context_age_ns;
        let max_children = self.link.max_children;
        let usable = |o: &OpenServer| {
            o.ctx.start_ns <= st.start_ns
                && st.start_ns - o.ctx.start_ns <= max_age
                && o.children < max_children
        };
        let on_thread = self.by_thread.get(&(st.conn.tgid, st.tid));
        let pick = match on_thread.map(|v| v.as_slice()).unwrap_or(&[]) {
            [one] => usable(one).then_some(one.ctx),
            [] => match self.by_process.get(&st.conn.tgid).map(|v| v.as_slice()) {
                Some([one]) => usable(one).then_some(one.ctx),
                _ => None,
            },
            _ => None, // several requests in flight on this thread: ambiguous
        }?;
        for list in [
            self.by_thread.get_mut(&(st.conn.tgid, st.tid)),
            self.by_process.get_mut(&st.conn.tgid),
        ]
        .into_iter()
        .flatten()
        {
            for o in list.iter_mut().filter(|o| o.ctx.span_id == pick.span_id) {
                o.children += 1;
            }
        }
        Some(pick)
    }

    /// Builds the span of a completed exchange with the identity chosen at its start.
    pub fn assemble(&mut self, ex: Exchange, resource: Arc<Resource>) -> Span {
        let ctx = match ex.side {
            Side::Server => {
                let ctx = pop_matching(&mut self.servers, &ex.conn, ex.start_ns);
                if let Some(c) = ctx {
                    self.close_server(ex.conn.tgid, c);
                }
                ctx
            }
            Side::Client => pop_matching(&mut self.clients, &ex.conn, ex.start_ns),
        };
        let (lineage, span_id) = match ctx {
            Some(c) => (c.lineage, c.span_id),
            None => (http::default_lineage(&ex), SpanId::random()),
        };
        http::build(ex, lineage, span_id, resource, &self.clock, &self.opts)
    }

    /// The server request `c` of process `tgid` completed: it parents nothing from now on.
    fn close_server(&mut self, tgid: u32, c: Ctx) {
        fn close<K: std::hash::Hash + Eq>(
            map: &mut HashMap<K, Vec<OpenServer>>,
            key: K,
            span: SpanId,
        ) {
            // An emptied list stays (with its allocation) for this thread's next request;
            // `expire` drops idle ones.
            if let Some(v) = map.get_mut(&key) {
                v.retain(|o| o.ctx.span_id != span);
            }
        }
        close(&mut self.by_thread, (tgid, c.tid), c.span_id);
        close(&mut self.by_process, tgid, c.span_id);
    }

    /// Drops per-process state of an exited process.
    pub fn forget_process(&mut self, tgid: u32) {
        self.by_process.remove(&tgid);
        self.by_thread.retain(|(t, _), _| *t != tgid);
        self.servers.retain(|c, _| c.tgid != tgid);
        self.clients.retain(|c, _| c.tgid != tgid);
    }

    /// Drops contexts too old to adopt (call periodically with the current monotonic time).
    pub fn expire(&mut self, now_ns: u64) {
        let cutoff = now_ns.saturating_sub(self.link.max_context_age_ns);
        self.sweep_peers(now_ns);
        for map in [&mut self.servers, &mut self.clients] {
            map.retain(|_, q| {
                q.retain(|c| c.start_ns >= cutoff);
                !q.is_empty()
            });
        }
        {
            let map = &mut self.by_thread;
            map.retain(|_, v| {
                v.retain(|o| o.ctx.start_ns >= cutoff);
                !v.is_empty()
            });
        }
        self.by_process.retain(|_, v| {
            v.retain(|o| o.ctx.start_ns >= cutoff);
            !v.is_empty()
        });
    }

    fn sweep_peers(&mut self, now_ns: u64) {
        let cutoff = now_ns.saturating_sub(self.link.max_context_age_ns);
        let mut n = 0;
        self.peers.retain(|_, q| {
            q.retain(|c| c.start_ns >= cutoff);
            n += q.len();
            !q.is_empty()
        });
        self.peer_count = n;
    }

    /// Contexts held (for tests and self-metrics).
    pub fn held(&self) -> usize {
        self.servers.values().map(VecDeque::len).sum::<usize>()
            + self.clients.values().map(VecDeque::len).sum::<usize>()
            + self.peer_count
    }
}

/// Pops the context started at `start_ns` (older ones belong to requests that were lost).
/// An emptied queue stays for the connection's next request; `expire` drops idle ones.
fn pop_matching(
    map: &mut HashMap<ConnId, VecDeque<Ctx>>,
    conn: &ConnId,
    start_ns: u64,
) -> Option<Ctx> {
    let q = map.get_mut(conn)?;
    let mut found = None;
    while let Some(c) = q.front().copied() {
        if c.start_ns > start_ns {
            break;
        }
        q.pop_front();
        if c.start_ns == start_ns {
            found = Some(c);
            break;
        }
    }
    found
}

#[cfg(test)]
#[path = "assemble_tests.rs"]
mod tests;
