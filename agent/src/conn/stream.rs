//! One connection's reassembly state: a byte-stream decoder per direction ([`Stream`]) and the
//! state both share ([`Shared`]): the queue of requests waiting for their responses.
//!
//! A stream never buffers bodies: they are skipped by byte count using each event's `pos` and
//! `len`, so bytes that were not captured (truncation, sendfile) or lost (gaps) only matter
//! when they fall where framing has to be read (a head, a chunk-size line).
use std::collections::VecDeque;
use std::mem;
use std::net::SocketAddr;

use agent_common::ConnId;

use super::{Exchange, Outcome, RequestStart, Side};
use crate::events::{DataInfo, Direction, KernelCtx};
use crate::metrics::Stats;
use crate::protocol::http1::{
    self, BodyFraming, ChunkProgress, ChunkedBody, MessageKind, Parsed, RequestHead, ResponseHead,
    Start,
};

/// A stream that has not resynchronised after this many events *and* this many bytes, or after
/// `RESYNC_MAX_EVENTS` events whatever their size, is given up.
const RESYNC_MIN_EVENTS: u32 = 4;
const RESYNC_MAX_BYTES: u64 = 64 * 1024;
const RESYNC_MAX_EVENTS: u32 = 64;
/// Head buffers that grew past this are freed once the head is done (they are rarely needed).
const KEEP_HEAD_CAPACITY: usize = 4096;

/// Per-call context: where exchanges and counters go, and the limits.
pub(super) struct Env<'a> {
    pub stats: &'a Stats,
    pub out: &'a mut Vec<Exchange>,
    /// Requests whose head was just parsed, in event order.
    pub starts: Vec<RequestStart>,
    pub max_head: usize,
    pub max_pipelined: usize,
}

/// What a stream asks its connection to do once the current event is processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Signal {
    /// The connection does not carry HTTP/1.x.
    NotHttp,
    /// Sync was lost and not found again: give up on the connection.
    Abandon,
    /// HTTP/1 ended (101 Switching Protocols, 2xx to CONNECT).
    Tunnel,
}

/// A request waiting for (the end of) its response.
pub(super) struct PendingReq {
    req: RequestHead,
    start_ns: u64,
    tid: u32,
    response: Option<ResponseHead>,
    response_tid: u32,
}

// Markers are rare and small; boxing requests would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub(super) enum Pending {
    Req(PendingReq),
    /// This many requests were lost (gaps, garbage, queue overflow): their responses are to be
    /// skipped so that later ones pair with the right requests.
    Lost(u32),
}

/// Which pending entry the response being read belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    /// The request at the front of the queue.
    Front,
    /// A lost request (front marker).
    Marker,
    /// No request seen for it (e.g. sonde joined the connection mid-exchange).
    Orphan,
}

/// State shared by both directions of a connection.
pub(super) struct Shared {
    pub id: ConnId,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    /// Direction carrying requests, once known.
    pub req_dir: Option<Direction>,
    /// A message head was parsed on this connection.
    pub http_seen: bool,
    /// Pipelining was observed (a response started while later requests were queued).
    pipelined: bool,
    /// The response stream lost sync since the last response head.
    resp_resynced: bool,
    pub pending: VecDeque<Pending>,
    pub signal: Option<Signal>,
}

impl Shared {
    pub fn new() -> Self {
        Shared {
            id: ConnId::default(),
            local: None,
            remote: None,
            req_dir: None,
            http_seen: false,
            pipelined: false,
            resp_resynced: false,
            pending: VecDeque::new(),
            signal: None,
        }
    }

    pub fn reset(
        &mut self,
        id: ConnId,
        local: Option<SocketAddr>,
        remote: Option<SocketAddr>,
        req_dir: Option<Direction>,
    ) {
        self.id = id;
        self.local = local;
        self.remote = remote;
        self.req_dir = req_dir;
        self.http_seen = false;
        self.pipelined = false;
        self.resp_resynced = false;
        self.pending.clear();
        if self.pending.capacity() > 8 {
            self.pending.shrink_to(8);
        }
        self.signal = None;
    }

    fn side(&self) -> Side {
        match self.req_dir {
            Some(Direction::Egress) => Side::Client,
            _ => Side::Server,
        }
    }

    fn emit(&self, env: &mut Env<'_>, p: PendingReq, outcome: Outcome, end_ns: u64) {
        env.out.push(Exchange {
            conn: self.id,
            side: self.side(),
            local: self.local,
            remote: self.remote,
            request: p.req,
            response: p.response,
            outcome,
            start_ns: p.start_ns,
            end_ns: end_ns.max(p.start_ns),
            request_tid: p.tid,
            response_tid: p.response_tid,
        });
        Stats::inc(&env.stats.exchanges);
    }

    /// Makes room in a full queue by turning the oldest request still waiting for its response
    /// head into a lost-request marker. False if there is none.
    fn drop_oldest_waiting(&mut self, env: &mut Env<'_>) -> bool {
        let Some(i) = self
            .pending
            .iter()
            .position(|p| matches!(p, Pending::Req(r) if r.response.is_none()))
        else {
            return false;
        };
        Stats::inc(&env.stats.requests_dropped);
        let mut n = 1u32;
        if let Some(Pending::Lost(m)) = self.pending.get(i + 1) {
            n = n.saturating_add(*m);
            self.pending.remove(i + 1);
        }
        if let Some(Pending::Lost(m)) = i.checked_sub(1).and_then(|j| self.pending.get_mut(j)) {
            *m = m.saturating_add(n);
            self.pending.remove(i);
        } else if let Some(slot) = self.pending.get_mut(i) {
            *slot = Pending::Lost(n);
        }
        true
    }

    /// Keeps fewer than `max_pipelined` requests queued. (Markers, merged when adjacent, are
    /// at most one more entry than requests.)
    fn make_room(&mut self, env: &mut Env<'_>) -> bool {
        while self
            .pending
            .iter()
            .filter(|p| matches!(p, Pending::Req(_)))
            .count()
            >= env.max_pipelined.max(1)
        {
            if !self.drop_oldest_waiting(env) {
                return false;
            }
        }
        true
    }

    fn on_request(
        &mut self,
        env: &mut Env<'_>,
        req: RequestHead,
        start_ns: u64,
        tid: u32,
        kernel_ctx: KernelCtx,
    ) {
        if !self.make_room(env) {
            // Only possible when the limit is 1 and the front request's response is under
            // way: this request's response is to be skipped.
            Stats::inc(&env.stats.requests_dropped);
            self.push_marker();
            return;
        }
        env.starts.push(RequestStart {
            conn: self.id,
            side: self.side(),
            local: self.local,
            remote: self.remote,
            start_ns,
            tid,
            traceparent: req.traceparent.clone(),
            kernel_ctx,
        });
        self.pending.push_back(Pending::Req(PendingReq {
            req,
            start_ns,
            tid,
            response: None,
            response_tid: 0,
        }));
    }

    /// The request stream lost sync where a request starts; `missing`: because bytes were
    /// missing (a request was surely lost), not because of garbage.
    ///
    /// Without pipelining nothing needs doing for the pairing: the lost request's response
    /// comes before the next request and finds no pending request. With pipelining, its
    /// response is to be skipped: a marker takes its place in the queue.
    fn request_lost(&mut self, env: &mut Env<'_>, missing: bool) {
        if missing {
            Stats::inc(&env.stats.requests_dropped);
        }
        if !self.pipelined {
            return;
        }
        self.push_marker();
    }

    /// Appends a lost-request marker (merged with one at the back: markers never sit side by
    /// side, so they at most double the bounded number of queued requests).
    fn push_marker(&mut self) {
        match self.pending.back_mut() {
            Some(Pending::Lost(n)) => *n = n.saturating_add(1),
            _ => self.pending.push_back(Pending::Lost(1)),
        }
    }

    /// A final response head was parsed: pairs it with its request and tells how its body is
    /// delimited.
    fn attach_response(
        &mut self,
        env: &mut Env<'_>,
        head: ResponseHead,
        ts: u64,
        tid: u32,
    ) -> (Target, BodyFraming) {
        if mem::take(&mut self.resp_resynced) && !self.pipelined {
            // Without pipelining, a response answers the latest request: the ones before it
            // had their responses in the bytes that were lost.
            while self.pending.len() > 1 {
                if let Some(Pending::Req(p)) = self.pending.pop_front() {
                    self.emit(env, p, Outcome::ResponseUnparseable, ts);
                }
            }
        }
        if let (Some(Pending::Req(_)), Some(Pending::Req(_))) =
            (self.pending.front(), self.pending.get(1))
        {
            self.pipelined = true;
        }
        match self.pending.front_mut() {
            Some(Pending::Req(p)) => {
                let framing = head.body(Some(&p.req.method));
                p.response = Some(head);
                p.response_tid = tid;
                (Target::Front, framing)
            }
            Some(Pending::Lost(_)) => (Target::Marker, head.body(None)),
            None => (Target::Orphan, head.body(None)),
        }
    }

    fn pop_marker(&mut self) {
        if let Some(Pending::Lost(n)) = self.pending.front_mut() {
            if *n > 1 {
                *n -= 1;
            } else {
                self.pending.pop_front();
            }
        }
    }

    /// The response for `target` ended with its last byte in the event at `ts`.
    fn complete_response(&mut self, env: &mut Env<'_>, target: Target, ts: u64) {
        match target {
            Target::Front => {
                if let Some(Pending::Req(_)) = self.pending.front()
                    && let Some(Pending::Req(p)) = self.pending.pop_front()
                {
                    self.emit(env, p, Outcome::Complete, ts);
                }
            }
            Target::Marker => self.pop_marker(),
            Target::Orphan => {}
        }
    }

    /// The response stream lost sync at `ts`, inside the body of the response for `target`, or
    /// (`None`) at or inside the head of the next response.
    fn response_lost(&mut self, env: &mut Env<'_>, ts: u64, target: Option<Target>) {
        match (target, self.pending.front()) {
            (None | Some(Target::Front), Some(Pending::Req(_))) => {
                if let Some(Pending::Req(p)) = self.pending.pop_front() {
                    self.emit(env, p, Outcome::ResponseUnparseable, ts);
                }
            }
            (None | Some(Target::Marker), Some(Pending::Lost(_))) => self.pop_marker(),
            _ => {}
        }
        if self.pipelined && !self.pending.is_empty() {
            // How many responses the lost bytes held is unknown: the requests still queued
            // cannot be paired reliably. Drop them, keeping their count so that responses that
            // follow are skipped rather than given to later requests.
            let mut n = 0u32;
            for p in self.pending.drain(..) {
                match p {
                    Pending::Req(_) => {
                        Stats::inc(&env.stats.requests_dropped);
                        n = n.saturating_add(1);
                    }
                    Pending::Lost(m) => n = n.saturating_add(m),
                }
            }
            self.pending.push_back(Pending::Lost(n));
        }
        self.resp_resynced = true;
    }

    /// Ends every pending request: the first with `Complete` if `first_complete` (its response
    /// was close-delimited), the others with `outcome`.
    pub fn finish(&mut self, env: &mut Env<'_>, outcome: &Outcome, ts: u64, first_complete: bool) {
        let mut q = mem::take(&mut self.pending);
        for (i, p) in q.drain(..).enumerate() {
            if let Pending::Req(p) = p {
                let o = if i == 0 && first_complete {
                    Outcome::Complete
                } else {
                    outcome.clone()
                };
                self.emit(env, p, o, ts);
            }
        }
        self.pending = q;
    }
}

enum Body {
    Length(u64),
    Chunked(ChunkedBody),
    UntilClose,
}

enum St {
    /// At a message boundary.
    Idle,
    /// Inside a message head; bytes of it are in `head` if it spans events.
    Head,
    Body(Body),
    /// Out of sync: waiting for an event whose first bytes start a message.
    Resync,
    /// No longer parsed.
    Off,
}

enum Head {
    Req(RequestHead),
    Resp(ResponseHead),
}

fn parse_head(kind: MessageKind, buf: &[u8]) -> Parsed<Head> {
    match kind {
        MessageKind::Request => match http1::parse_request(buf) {
            Parsed::Complete(h, n) => Parsed::Complete(Head::Req(h), n),
            Parsed::Partial => Parsed::Partial,
            Parsed::Invalid => Parsed::Invalid,
        },
        MessageKind::Response => match http1::parse_response(buf) {
            Parsed::Complete(h, n) => Parsed::Complete(Head::Resp(h), n),
            Parsed::Partial => Parsed::Partial,
            Parsed::Invalid => Parsed::Invalid,
        },
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// Bytes missing at a message boundary or inside a head (or a head too large): that
    /// message is lost.
    Head,
    /// Bytes that are not a message where one must start: maybe no message at all.
    Garbage,
    /// Inside a body whose framing could not be followed.
    Body,
}

pub(super) fn other(dir: Direction) -> Direction {
    match dir {
        Direction::Ingress => Direction::Egress,
        Direction::Egress => Direction::Ingress,
    }
}

fn crlf_prefix(data: &[u8]) -> usize {
    data.iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count()
}

/// HTTP/1 decoder for one direction of a connection.
pub(super) struct Stream {
    pub dir: Direction,
    /// What this direction carries, once known.
    pub kind: Option<MessageKind>,
    /// Stream position of the next byte expected.
    next_pos: Option<u64>,
    st: St,
    /// Head bytes of a head that spans events (bounded by the head limit).
    head: Vec<u8>,
    /// The current message's first bytes were checked (`msg_kind` is set).
    start_ok: bool,
    msg_kind: MessageKind,
    /// Event that carried the current message's first byte.
    msg_ts: u64,
    msg_tid: u32,
    /// Kernel trace context of the event that started the current message (only when the
    /// message starts at that event's first byte: the kernel looks only there).
    msg_ctx: KernelCtx,
    cur_ctx: KernelCtx,
    /// Timestamp of the latest event seen on this stream.
    last_ts: u64,
    /// At the very first byte of a connection sonde saw open: it must start a message.
    origin: bool,
    /// Out of sync since the last message head (or never in sync yet).
    lost: bool,
    /// Was ever in sync (origin, or a head parsed).
    synced_once: bool,
    resync_events: u32,
    resync_bytes: u64,
    /// Pairing of the response being read.
    target: Target,
}

impl Stream {
    pub fn new(dir: Direction) -> Self {
        Stream {
            dir,
            kind: None,
            next_pos: None,
            st: St::Resync,
            head: Vec::new(),
            start_ok: false,
            msg_kind: MessageKind::Request,
            msg_ts: 0,
            msg_tid: 0,
            msg_ctx: KernelCtx::None,
            cur_ctx: KernelCtx::None,
            last_ts: 0,
            origin: false,
            lost: true,
            synced_once: false,
            resync_events: 0,
            resync_bytes: 0,
            target: Target::Orphan,
        }
    }

    /// Re-initialises for a new connection; `fresh` if sonde saw it open (its first byte at
    /// position 0 starts a message), else it is joined mid-stream.
    pub fn reset(&mut self, kind: Option<MessageKind>, fresh: bool) {
        self.kind = kind;
        self.next_pos = None;
        self.st = if fresh { St::Idle } else { St::Resync };
        self.clear_head();
        self.start_ok = false;
        self.msg_ts = 0;
        self.msg_tid = 0;
        self.msg_ctx = KernelCtx::None;
        self.last_ts = 0;
        self.origin = fresh;
        self.lost = !fresh;
        self.synced_once = fresh;
        self.resync_events = 0;
        self.resync_bytes = 0;
        self.target = Target::Orphan;
    }

    fn clear_head(&mut self) {
        self.head.clear();
        if self.head.capacity() > KEEP_HEAD_CAPACITY {
            self.head = Vec::new();
        }
    }

    /// Stops parsing for good (not HTTP, tunnel, abandoned).
    pub fn stop(&mut self) {
        self.st = St::Off;
        self.clear_head();
    }

    /// True if this direction is reading a close-delimited response for the front request.
    pub fn until_close_front(&self) -> bool {
        matches!(self.st, St::Body(Body::UntilClose))
            && self.msg_kind == MessageKind::Response
            && self.target == Target::Front
    }

    /// Processes one data event of this direction.
    pub fn feed(&mut self, sh: &mut Shared, env: &mut Env<'_>, d: &DataInfo<'_>) {
        if matches!(self.st, St::Off) {
            return;
        }
        let len = d.len.max(d.data.len() as u64);
        if len == 0 {
            return;
        }
        let end = d.pos.saturating_add(len);
        let mut data = d.data;
        let mut tail = len - data.len() as u64;
        // A connection seen opening starts at position 0 in both directions.
        let expected = self.next_pos.or(self.origin.then_some(0));
        match expected {
            None => {}
            Some(p) if end <= p => return, // already seen
            Some(p) if d.pos < p => {
                // Overlap with bytes already seen: drop them.
                let skip = p - d.pos;
                let cut = skip.min(data.len() as u64) as usize;
                data = &data[cut..];
                tail -= skip - cut as u64;
            }
            Some(p) if d.pos > p => {
                let last = self.last_ts;
                self.missing(sh, env, d.pos - p, last, d.ts_ns);
            }
            Some(_) => {}
        }
        self.next_pos = Some(end);
        self.last_ts = d.ts_ns;
        if sh.signal.is_some() {
            return;
        }
        if matches!(self.st, St::Resync) && !self.try_resync(sh, data, len) {
            return;
        }
        if !data.is_empty() {
            self.cur_ctx = d.ctx;
            self.bytes(sh, env, data, d.ts_ns, d.tid);
        }
        if tail > 0 && sh.signal.is_none() {
            self.missing(sh, env, tail, d.ts_ns, d.ts_ns);
        }
    }

    /// In `Resync`: resumes parsing if the event's first bytes can start a message. Every
    /// event spent out of sync counts towards giving up, including ones that only looked like
    /// a message start.
    fn try_resync(&mut self, sh: &mut Shared, data: &[u8], len: u64) -> bool {
        self.resync_events = self.resync_events.saturating_add(1);
        self.resync_bytes = self.resync_bytes.saturating_add(len);
        let rest = data.get(crlf_prefix(data)..).unwrap_or_default();
        if !rest.is_empty() {
            if http1::classify_start(rest, self.kind) != Start::No {
                self.st = St::Idle;
                return true;
            }
            if !sh.http_seen && http1::looks_non_http(rest) {
                sh.signal = Some(Signal::NotHttp);
                return false;
            }
        }
        // A direction never in sync on a connection shown to carry HTTP was joined in the
        // middle of a message (of unknown length): wait for the next message start however
        // long it takes; anything else out of sync for too long is given up.
        let joined_mid_message = !self.synced_once && sh.http_seen;
        if !joined_mid_message
            && ((self.resync_events > RESYNC_MIN_EVENTS && self.resync_bytes > RESYNC_MAX_BYTES)
                || self.resync_events > RESYNC_MAX_EVENTS)
        {
            sh.signal = Some(Signal::Abandon);
        }
        false
    }

    /// Captured bytes, in sync.
    fn bytes(&mut self, sh: &mut Shared, env: &mut Env<'_>, data: &[u8], ts: u64, tid: u32) {
        let mut i = 0;
        while i < data.len() && sh.signal.is_none() {
            match &mut self.st {
                St::Idle => {
                    i += crlf_prefix(&data[i..]);
                    if i < data.len() {
                        self.msg_ts = ts;
                        self.msg_tid = tid;
                        self.msg_ctx = if i == 0 {
                            self.cur_ctx
                        } else {
                            KernelCtx::None
                        };
                        self.start_ok = false;
                        self.head.clear();
                        self.st = St::Head;
                    }
                }
                St::Head => i += self.head_bytes(sh, env, &data[i..], ts),
                St::Body(Body::Length(rem)) => {
                    let take = (*rem).min((data.len() - i) as u64);
                    *rem -= take;
                    i += take as usize;
                    if *rem == 0 {
                        self.message_done(sh, env, ts);
                    }
                }
                St::Body(Body::Chunked(c)) => {
                    let (n, progress) = c.feed(&data[i..]);
                    i += n;
                    match progress {
                        ChunkProgress::NeedMore => {}
                        ChunkProgress::Done => self.message_done(sh, env, ts),
                        ChunkProgress::Invalid => self.lose(sh, env, ts, Loss::Body),
                    }
                }
                St::Body(Body::UntilClose) => i = data.len(),
                St::Resync | St::Off => break,
            }
        }
    }

    /// Bytes of a head (`avail` runs to the end of the event); returns how many were used.
    fn head_bytes(&mut self, sh: &mut Shared, env: &mut Env<'_>, avail: &[u8], ts: u64) -> usize {
        let max = env.max_head;
        if self.head.is_empty() {
            // Fast path: the head starts in this event; parse it in place.
            if !self.start_ok {
                match http1::classify_start(avail, self.kind) {
                    Start::No => {
                        self.garbage(sh, env, ts, http1::looks_non_http(avail));
                        return avail.len();
                    }
                    Start::Yes(k) => {
                        self.start_ok = true;
                        self.msg_kind = k;
                    }
                    Start::NeedMore => {}
                }
            }
            if self.start_ok {
                match parse_head(self.msg_kind, avail) {
                    Parsed::Complete(h, n) if n <= max => {
                        self.on_head(sh, env, h, ts);
                        return n;
                    }
                    Parsed::Complete(..) => {
                        self.lose(sh, env, ts, Loss::Head);
                        return avail.len();
                    }
                    Parsed::Invalid => {
                        self.garbage(sh, env, ts, false);
                        return avail.len();
                    }
                    Parsed::Partial => {}
                }
            }
            if avail.len() > max {
                self.lose(sh, env, ts, Loss::Head);
            } else {
                self.head.extend_from_slice(avail);
            }
            return avail.len();
        }
        // The head spans events: accumulate (bounded) and parse once its end is here.
        let old = self.head.len();
        let take = avail.len().min(max.saturating_add(1).saturating_sub(old));
        self.head.extend_from_slice(&avail[..take]);
        let end = http1::find_head_end(&self.head, old.saturating_sub(3));
        if !self.start_ok {
            match http1::classify_start(&self.head, self.kind) {
                Start::Yes(k) => {
                    self.start_ok = true;
                    self.msg_kind = k;
                }
                Start::NeedMore if end.is_none() => {}
                Start::No | Start::NeedMore => {
                    let sig = http1::looks_non_http(&self.head);
                    self.garbage(sh, env, ts, sig);
                    return avail.len();
                }
            }
        }
        match end {
            Some(e) if e <= max => match parse_head(self.msg_kind, &self.head[..e]) {
                Parsed::Complete(h, n) if n >= old => {
                    self.clear_head();
                    self.on_head(sh, env, h, ts);
                    n - old
                }
                _ => {
                    self.garbage(sh, env, ts, false);
                    avail.len()
                }
            },
            Some(_) => {
                self.lose(sh, env, ts, Loss::Head);
                avail.len()
            }
            None if self.head.len() > max => {
                self.lose(sh, env, ts, Loss::Head);
                avail.len()
            }
            None => take,
        }
    }

    fn on_head(&mut self, sh: &mut Shared, env: &mut Env<'_>, head: Head, ts: u64) {
        sh.http_seen = true;
        self.lost = false;
        self.synced_once = true;
        self.origin = false;
        self.resync_events = 0;
        self.resync_bytes = 0;
        if self.kind.is_none() {
            self.kind = Some(self.msg_kind);
            sh.req_dir = Some(match self.msg_kind {
                MessageKind::Request => self.dir,
                MessageKind::Response => other(self.dir),
            });
        }
        let framing = match head {
            Head::Req(h) => {
                let framing = h.body();
                sh.on_request(env, h, self.msg_ts, self.msg_tid, self.msg_ctx);
                framing
            }
            Head::Resp(h) if h.is_interim() => {
                // 100 Continue & co.: the final response follows.
                self.st = St::Idle;
                return;
            }
            Head::Resp(h) => {
                let (target, framing) = sh.attach_response(env, h, self.msg_ts, self.msg_tid);
                self.target = target;
                framing
            }
        };
        self.st = match framing {
            BodyFraming::None | BodyFraming::Length(0) => {
                self.message_done(sh, env, ts);
                return;
            }
            BodyFraming::Length(n) => St::Body(Body::Length(n)),
            BodyFraming::Chunked => St::Body(Body::Chunked(ChunkedBody::new())),
            BodyFraming::UntilClose => St::Body(Body::UntilClose),
            BodyFraming::Tunnel => {
                self.message_done(sh, env, ts);
                sh.signal = Some(Signal::Tunnel);
                St::Off
            }
        };
    }

    /// The current message ended with its last byte in the event at `ts`.
    fn message_done(&mut self, sh: &mut Shared, env: &mut Env<'_>, ts: u64) {
        if self.msg_kind == MessageKind::Response {
            sh.complete_response(env, self.target, ts);
        }
        self.st = St::Idle;
    }

    /// `n` bytes of this stream are missing (a gap before an event, or its uncaptured tail).
    /// A message that ends inside them ends at `done_ts` (the latest event known to be before
    /// them); a loss is detected at `now_ts`.
    fn missing(&mut self, sh: &mut Shared, env: &mut Env<'_>, n: u64, done_ts: u64, now_ts: u64) {
        match &mut self.st {
            St::Idle | St::Head => self.lose(sh, env, now_ts, Loss::Head),
            St::Body(Body::Length(rem)) => {
                if n < *rem {
                    *rem -= n;
                } else {
                    let over = n > *rem;
                    self.message_done(sh, env, done_ts);
                    if over {
                        self.lose(sh, env, now_ts, Loss::Head);
                    }
                }
            }
            St::Body(Body::Chunked(c)) => {
                if !c.skip(n) {
                    self.lose(sh, env, now_ts, Loss::Body);
                }
            }
            St::Body(Body::UntilClose) | St::Resync | St::Off => {}
        }
    }

    /// Sync is lost: account for the message(s) concerned and wait for a message start.
    fn lose(&mut self, sh: &mut Shared, env: &mut Env<'_>, ts: u64, at: Loss) {
        let missing = at != Loss::Garbage;
        let at = if at == Loss::Garbage { Loss::Head } else { at };
        if !self.lost {
            self.lost = true;
            self.resync_events = 0;
            self.resync_bytes = 0;
            Stats::inc(&env.stats.parse_resyncs);
            match (self.kind, at) {
                (Some(MessageKind::Request), Loss::Head) => sh.request_lost(env, missing),
                (Some(MessageKind::Response), Loss::Head) => sh.response_lost(env, ts, None),
                (Some(MessageKind::Response), Loss::Body) => {
                    sh.response_lost(env, ts, Some(self.target))
                }
                _ => {}
            }
        }
        self.clear_head();
        self.start_ok = false;
        self.st = St::Resync;
    }

    /// Bytes that cannot be a message head where one must start.
    fn garbage(&mut self, sh: &mut Shared, env: &mut Env<'_>, ts: u64, non_http_signature: bool) {
        if !sh.http_seen && (self.origin || non_http_signature) {
            sh.signal = Some(Signal::NotHttp);
            self.stop();
            return;
        }
        self.lose(sh, env, ts, Loss::Garbage);
    }
}
