//! HTTP/1.x message framing and head parsing (RFC 9112), on top of `httparse`.
//!
//! Everything here is pure and works on borrowed bytes: recognising a plausible message start
//! ([`classify_start`]), finding the end of a head ([`find_head_end`]), parsing a head into the
//! few fields sonde keeps ([`parse_request`], [`parse_response`]), deciding how the body is
//! delimited ([`RequestHead::body`], [`ResponseHead::body`]) and walking a chunked body without
//! buffering it ([`ChunkedBody`]). Connection-level reassembly lives in `crate::conn`.
//!
//! Nothing here panics on any input; nothing allocates more than the kept head fields (plus one
//! bounded header array for heads with more than [`STACK_HEADERS`] lines).
use std::{borrow::Cow, mem::MaybeUninit};

/// What sonde keeps of a request head: only what spans need.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestHead {
    /// Borrowed for the common methods (no allocation per request), owned otherwise.
    pub method: Cow<'static, str>,
    /// The request-target exactly as sent (origin-form `/p?q`, absolute-form `http://h/p`, ...).
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub host: Option<String>,
    pub user_agent: Option<String>,
    /// Raw `traceparent` value (first occurrence, anywhere in the head).
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// Client address from `X-Forwarded-For` (first entry) or `Forwarded: for=`.
    pub forwarded_for: Option<String>,
    pub content_length: Option<u64>,
    pub chunked: bool,
    pub expect_continue: bool,
}

/// What sonde keeps of a (final) response head.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub minor_version: u8,
    pub content_length: Option<u64>,
    pub chunked: bool,
}

/// Request or response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    Request,
    Response,
}

/// Verdict on the first bytes of what should be a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Looks like the start of a message of this kind.
    Yes(MessageKind),
    /// Cannot be the start of an HTTP/1.x message (of the kind asked for).
    No,
    /// Consistent so far; more bytes are needed to decide.
    NeedMore,
}

/// Methods accepted at a message start on sight of `METHOD SP`. Other all-uppercase tokens are
/// accepted only once the request line is seen to end in ` HTTP/1.x`.
const KNOWN_METHODS: [&[u8]; 9] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];
/// Longest method token accepted at a message start.
const MAX_METHOD: usize = 24;
/// Longest request line examined when the method is not a known one.
const MAX_LINE: usize = 16 * 1024;

/// Decides whether `buf` (bytes at a message boundary; leading CR/LF already skipped) can start
/// an HTTP/1.x message: a request (`METHOD SP ...`), a response (`HTTP/1.d SP`), or, with
/// `kind == None`, either.
pub fn classify_start(buf: &[u8], kind: Option<MessageKind>) -> Start {
    match kind {
        Some(MessageKind::Request) => request_start(buf),
        Some(MessageKind::Response) => response_start(buf),
        None => match (response_start(buf), request_start(buf)) {
            (Start::Yes(k), _) | (_, Start::Yes(k)) => Start::Yes(k),
            (Start::No, Start::No) => Start::No,
            _ => Start::NeedMore,
        },
    }
}

fn response_start(buf: &[u8]) -> Start {
    const P: &[u8] = b"HTTP/1.";
    let n = buf.len().min(P.len());
    if buf[..n] != P[..n] {
        return Start::No;
    }
    match (buf.get(7), buf.get(8)) {
        (None, _) => Start::NeedMore,
        (Some(d), _) if !d.is_ascii_digit() => Start::No,
        (Some(_), None) => Start::NeedMore,
        (Some(_), Some(b' ')) => Start::Yes(MessageKind::Response),
        _ => Start::No,
    }
}

fn request_start(buf: &[u8]) -> Start {
    let tok = buf
        .iter()
        .take(MAX_METHOD + 1)
        .take_while(|b| b.is_ascii_uppercase())
        .count();
    if tok > MAX_METHOD {
        return Start::No;
    }
    match buf.get(tok) {
        None => return Start::NeedMore,
        Some(b' ') if tok > 0 => {}
        Some(_) => return Start::No,
    }
    let method = &buf[..tok];
    if KNOWN_METHODS.contains(&method) {
        return Start::Yes(MessageKind::Request);
    }
    // Unknown method: the whole request line must be `TOKEN SP target SP HTTP/1.d`.
    let rest = &buf[tok + 1..];
    let window = &rest[..rest.len().min(MAX_LINE)];
    let Some(nl) = window.iter().position(|&b| b == b'\n') else {
        return if rest.len() > MAX_LINE {
            Start::No
        } else {
            Start::NeedMore
        };
    };
    let mut line = &rest[..nl];
    if let [head @ .., b'\r'] = line {
        line = head;
    }
    const V: &[u8] = b" HTTP/1.";
    if line.len() < V.len() + 2 {
        return Start::No;
    }
    let (target, version) = line.split_at(line.len() - V.len() - 1);
    let ok = version.starts_with(V)
        && version.last().is_some_and(u8::is_ascii_digit)
        && !target.is_empty()
        && target.iter().all(|&b| b > b' ' && b != 0x7f);
    if ok {
        Start::Yes(MessageKind::Request)
    } else {
        Start::No
    }
}

/// True if `buf` starts like a well-known non-HTTP/1 protocol: a TLS record, the HTTP/2
/// connection preface, an SSH banner. Used to give up on a connection at once.
pub fn looks_non_http(buf: &[u8]) -> bool {
    match buf {
        // TLS record: content type 20..=23, legacy version 3.x.
        [0x14..=0x17, 0x03, 0x00..=0x04, ..] => true,
        _ => buf.starts_with(b"PRI * HTTP/2") || buf.starts_with(b"SSH-"),
    }
}

/// Index just past the empty line ending a head (`\n\r\n` or `\n\n`), searching for line
/// feeds from `from` on.
pub fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        let nl = i + buf.get(i..)?.iter().position(|&b| b == b'\n')?;
        match (buf.get(nl + 1), buf.get(nl + 2)) {
            (Some(b'\n'), _) => return Some(nl + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

/// Result of parsing a head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    /// The head, and its length in bytes (the body starts there).
    Complete(T, usize),
    /// Valid so far, not complete.
    Partial,
    /// Not an HTTP/1.x head.
    Invalid,
}

/// Header slots on the stack; heads with more header lines fall back to a heap array.
pub const STACK_HEADERS: usize = 256;
/// Upper bound on header lines of one head (the head size limit bounds it first in practice).
const MAX_HEADERS: usize = 16 * 1024;

fn config() -> httparse::ParserConfig {
    let mut c = httparse::ParserConfig::default();
    // Leniency that common servers and clients also accept; header bytes stay strict.
    c.allow_multiple_spaces_in_request_line_delimiters(true)
        .allow_multiple_spaces_in_response_status_delimiters(true)
        .allow_spaces_after_header_name_in_responses(true);
    c
}

/// Header slots for a head that overflowed the stack array: one per line, bounded.
fn heap_headers(buf: &[u8]) -> Vec<httparse::Header<'_>> {
    let lines = buf.iter().filter(|&&b| b == b'\n').count() + 1;
    vec![httparse::EMPTY_HEADER; lines.min(MAX_HEADERS)]
}

/// Parses a request head at the start of `buf` (which may continue with body bytes).
pub fn parse_request(buf: &[u8]) -> Parsed<RequestHead> {
    let cfg = config();
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match cfg.parse_request_with_uninit_headers(&mut req, buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => build_request(&req, n),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            let mut headers = heap_headers(buf);
            let mut req = httparse::Request::new(&mut headers);
            match cfg.parse_request(&mut req, buf) {
                Ok(httparse::Status::Complete(n)) => build_request(&req, n),
                Ok(httparse::Status::Partial) => Parsed::Partial,
                Err(_) => Parsed::Invalid,
            }
        }
        Err(_) => Parsed::Invalid,
    }
}

/// Parses a response head at the start of `buf` (which may continue with body bytes).
pub fn parse_response(buf: &[u8]) -> Parsed<ResponseHead> {
    let cfg = config();
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    match cfg.parse_response_with_uninit_headers(&mut resp, buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => build_response(&resp, n),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            let mut headers = heap_headers(buf);
            let mut resp = httparse::Response::new(&mut headers);
            match cfg.parse_response(&mut resp, buf) {
                Ok(httparse::Status::Complete(n)) => build_response(&resp, n),
                Ok(httparse::Status::Partial) => Parsed::Partial,
                Err(_) => Parsed::Invalid,
            }
        }
        Err(_) => Parsed::Invalid,
    }
}

/// The standard methods (RFC 9110, PATCH and QUERY): the ones the HTTP semantic conventions
/// name. Parsed heads borrow these instead of allocating.
pub const STANDARD_METHODS: [&str; 10] = [
    "CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE",
];

/// The method as text: a `'static` borrow when it is a standard one.
fn method_text(m: &str) -> Cow<'static, str> {
    match STANDARD_METHODS.into_iter().find(|c| *c == m) {
        Some(c) => Cow::Borrowed(c),
        None => Cow::Owned(m.to_owned()),
    }
}

fn lossy(v: &[u8]) -> String {
    String::from_utf8_lossy(v.trim_ascii()).into_owned()
}

/// Folds one `Content-Length` field value (possibly a list of equal values) into `acc`.
/// Differing or malformed values make the message invalid.
fn add_content_length(acc: &mut Option<u64>, value: &[u8]) -> Result<(), ()> {
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(());
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        match *acc {
            Some(prev) if prev != n => return Err(()),
            _ => *acc = Some(n),
        }
    }
    Ok(())
}

/// Whether the last transfer coding of a `Transfer-Encoding` value is `chunked`.
fn last_coding_is_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .find(|c| !c.is_empty())
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
}

/// The `for=` parameter of the first element of a `Forwarded` value, unquoted.
fn forwarded_for(value: &[u8]) -> Option<String> {
    let first = value.split(|&b| b == b',').next()?;
    first.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        let (name, v) = (&pair[..eq], &pair[eq + 1..]);
        if !name.trim_ascii().eq_ignore_ascii_case(b"for") {
            return None;
        }
        let mut v = v.trim_ascii();
        if let [b'"', inner @ .., b'"'] = v {
            v = inner;
        }
        (!v.is_empty()).then(|| lossy(v))
    })
}

fn build_request(req: &httparse::Request<'_, '_>, len: usize) -> Parsed<RequestHead> {
    let mut head = RequestHead {
        method: method_text(req.method.unwrap_or_default()),
        target: req.path.unwrap_or_default().to_owned(),
        minor_version: req.version.unwrap_or(1),
        ..RequestHead::default()
    };
    let mut te_chunked = None;
    let mut forwarded = None;
    for h in req.headers.iter() {
        let (name, v) = (h.name.as_bytes(), h.value);
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        match name.len() {
            4 if is(b"host") => {
                if head.host.is_none() {
                    head.host = Some(lossy(v));
                }
            }
            6 if is(b"expect") => {
                head.expect_continue |= v.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            }
            9 if is(b"forwarded") => {
                if forwarded.is_none() {
                    forwarded = forwarded_for(v);
                }
            }
            10 if is(b"user-agent") => {
                if head.user_agent.is_none() {
                    head.user_agent = Some(lossy(v));
                }
            }
            10 if is(b"tracestate") => {
                // Several tracestate fields are one list (W3C Trace Context §3.3).
                let v = lossy(v);
                match &mut head.tracestate {
                    Some(s) if !v.is_empty() => {
                        s.push(',');
                        s.push_str(&v);
                    }
                    Some(_) => {}
                    None => head.tracestate = Some(v),
                }
            }
            11 if is(b"traceparent") => {
                if head.traceparent.is_none() {
                    head.traceparent = Some(lossy(v));
                }
            }
            14 if is(b"content-length") => {
                if add_content_length(&mut head.content_length, v).is_err() {
                    return Parsed::Invalid;
                }
            }
            15 if is(b"x-forwarded-for") => {
                if head.forwarded_for.is_none() {
                    let first = v.split(|&b| b == b',').next().unwrap_or_default();
                    let first = first.trim_ascii();
                    if !first.is_empty() {
                        head.forwarded_for = Some(lossy(first));
                    }
                }
            }
            17 if is(b"transfer-encoding") => te_chunked = Some(last_coding_is_chunked(v)),
            _ => {}
        }
    }
    head.chunked = te_chunked == Some(true);
    if head.forwarded_for.is_none() {
        head.forwarded_for = forwarded;
    }
    Parsed::Complete(head, len)
}

fn build_response(resp: &httparse::Response<'_, '_>, len: usize) -> Parsed<ResponseHead> {
    let mut head = ResponseHead {
        status: resp.code.unwrap_or_default(),
        minor_version: resp.version.unwrap_or(1),
        ..ResponseHead::default()
    };
    let mut te = None;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.len() == 14 && name.eq_ignore_ascii_case(b"content-length") {
            if add_content_length(&mut head.content_length, h.value).is_err() {
                return Parsed::Invalid;
            }
        } else if name.len() == 17 && name.eq_ignore_ascii_case(b"transfer-encoding") {
            te = Some(last_coding_is_chunked(h.value));
        }
    }
    head.chunked = te == Some(true);
    if te == Some(false) {
        // A transfer coding other than chunked last: the body runs to the close (RFC 9112 §6.3).
        head.content_length = None;
    }
    Parsed::Complete(head, len)
}

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the connection closes.
    UntilClose,
    /// The connection stops carrying HTTP/1 after this message (101, 2xx to CONNECT).
    Tunnel,
}

impl RequestHead {
    /// Body framing of this request: chunked, else Content-Length, else none.
    pub fn body(&self) -> BodyFraming {
        if self.chunked {
            BodyFraming::Chunked
        } else {
            match self.content_length {
                Some(n) if n > 0 => BodyFraming::Length(n),
                _ => BodyFraming::None,
            }
        }
    }
}

impl ResponseHead {
    /// True for 1xx responses other than 101: interim, followed by the final response.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }

    /// Body framing of this response to a request with `request_method` (None if unknown).
    pub fn body(&self, request_method: Option<&str>) -> BodyFraming {
        let connect = request_method == Some("CONNECT");
        if self.status == 101 || (connect && (200..300).contains(&self.status)) {
            return BodyFraming::Tunnel;
        }
        if request_method == Some("HEAD")
            || (100..200).contains(&self.status)
            || self.status == 204
            || self.status == 304
        {
            return BodyFraming::None;
        }
        if self.chunked {
            return BodyFraming::Chunked;
        }
        match self.content_length {
            Some(0) => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
            None => BodyFraming::UntilClose,
        }
    }
}

/// Longest chunk extension accepted on one chunk-size line.
const MAX_CHUNK_EXT: u32 = 4096;
/// Longest trailer section accepted.
const MAX_TRAILERS: u32 = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    /// Hex digits of a chunk size.
    Size,
    /// Whitespace after the size.
    SizeWs,
    /// Chunk extensions, up to the line end.
    Ext,
    /// Saw CR ending the size line.
    SizeLf,
    /// This many chunk-data bytes to go.
    Data(u64),
    /// CRLF after chunk data.
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Inside a trailer line.
    TrailerLine,
    /// Saw CR of the final empty line.
    EndLf,
    Done,
}

/// Progress of a [`ChunkedBody`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkProgress {
    /// All bytes given were consumed; the body goes on.
    NeedMore,
    /// The body (final chunk and trailers) ended.
    Done,
    /// Not a chunked body.
    Invalid,
}

/// Walks a chunked body (RFC 9112 §7.1) incrementally. Chunk data is skipped by count and never
/// buffered; size lines, extensions and trailers are checked byte by byte, so they may be
/// split across events anywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkedBody {
    state: ChunkState,
    /// Chunk size being read, and its digit count.
    size: u64,
    digits: u8,
    /// Bytes of the current extension, or of the trailer section so far.
    count: u32,
}

impl Default for ChunkedBody {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedBody {
    pub fn new() -> Self {
        ChunkedBody {
            state: ChunkState::Size,
            size: 0,
            digits: 0,
            count: 0,
        }
    }

    /// Consumes bytes of the body from `data`; returns how many were consumed (all of them
    /// unless the body ended or turned out invalid) and the progress.
    pub fn feed(&mut self, data: &[u8]) -> (usize, ChunkProgress) {
        use ChunkState::*;
        let mut i = 0;
        while i < data.len() {
            if let Data(rem) = self.state {
                let take = rem.min((data.len() - i) as u64);
                i += take as usize;
                self.state = if rem == take {
                    DataCr
                } else {
                    Data(rem - take)
                };
                continue;
            }
            let b = data[i];
            i += 1;
            self.state = match (self.state, b) {
                (Size, _) if b.is_ascii_hexdigit() => {
                    if self.digits >= 16 {
                        return (i, ChunkProgress::Invalid);
                    }
                    self.size = self.size << 4 | u64::from((b as char).to_digit(16).unwrap_or(0));
                    self.digits += 1;
                    Size
                }
                (Size, _) if self.digits == 0 => return (i, ChunkProgress::Invalid),
                (Size | SizeWs, b' ' | b'\t') => SizeWs,
                (Size | SizeWs, b';') => {
                    self.count = 0;
                    Ext
                }
                (Size | SizeWs | Ext, b'\r') => SizeLf,
                (Size | SizeWs | Ext | SizeLf, b'\n') => {
                    self.count = 0;
                    if self.size == 0 {
                        TrailerStart
                    } else {
                        Data(self.size)
                    }
                }
                (Ext, _) => {
                    self.count += 1;
                    if self.count > MAX_CHUNK_EXT || (b < b' ' && b != b'\t') || b == 0x7f {
                        return (i, ChunkProgress::Invalid);
                    }
                    Ext
                }
                (DataCr, b'\r') => DataLf,
                (DataCr | DataLf, b'\n') => {
                    self.size = 0;
                    self.digits = 0;
                    Size
                }
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart | EndLf, b'\n') => {
                    self.state = Done;
                    return (i, ChunkProgress::Done);
                }
                (TrailerStart | TrailerLine, _) => {
                    self.count += 1;
                    if self.count > MAX_TRAILERS {
                        return (i, ChunkProgress::Invalid);
                    }
                    if b == b'\n' {
                        TrailerStart
                    } else {
                        TrailerLine
                    }
                }
                _ => return (i, ChunkProgress::Invalid),
            };
        }
        (i, ChunkProgress::NeedMore)
    }

    /// Accounts for `n` body bytes that were not captured. Fine inside chunk data (true);
    /// anywhere else the framing is lost (false).
    pub fn skip(&mut self, n: u64) -> bool {
        if n == 0 {
            return true;
        }
        match self.state {
            ChunkState::Data(rem) if n <= rem => {
                self.state = if n == rem {
                    ChunkState::DataCr
                } else {
                    ChunkState::Data(rem - n)
                };
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(buf: &[u8]) -> RequestHead {
        match parse_request(buf) {
            Parsed::Complete(h, n) => {
                assert_eq!(n, buf.len());
                h
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn classifies_message_starts() {
        use MessageKind::*;
        let yes_req = Start::Yes(Request);
        let yes_resp = Start::Yes(Response);
        for (buf, kind, want) in [
            (&b"GET / HTTP/1.1"[..], None, yes_req),
            (b"GET ", Some(Request), yes_req),
            (b"GE", None, Start::NeedMore),
            (b"", None, Start::NeedMore),
            (b"get / HTTP/1.1", None, Start::No),
            (b"GET/", None, Start::No),
            (b"HTTP/1.1 200 OK", None, yes_resp),
            (b"HTTP/1.1 200 OK", Some(Request), Start::No),
            (b"GET / HTTP/1.1", Some(Response), Start::No),
            (b"HTTP/1", None, Start::NeedMore),
            (b"HTTP/1.1", None, Start::NeedMore),
            (b"HTTP/2 200", None, Start::No),
            (b"HTTP/1.x 200", None, Start::No),
            (b"PROPFIND /a HTTP/1.1\r\n", None, yes_req),
            (b"PROPFIND /a HTTP/1.1\n", None, yes_req),
            (b"PROPFIND /a", None, Start::NeedMore),
            (b"PROPFIND /a HTTP/2.0\r\n", None, Start::No),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", None, Start::No),
            (b"FOO  HTTP/1.1\r\n", None, Start::No),
            (b"\x16\x03\x01\x02\x00", None, Start::No),
            (
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZ / HTTP/1.1\r\n",
                None,
                Start::No,
            ),
        ] {
            assert_eq!(
                classify_start(buf, kind),
                want,
                "{:?}",
                String::from_utf8_lossy(buf)
            );
        }
        assert!(looks_non_http(b"\x16\x03\x01\x02\x00\x01"));
        assert!(looks_non_http(b"\x17\x03\x03\x00\x20"));
        assert!(looks_non_http(b"PRI * HTTP/2.0\r\n"));
        assert!(!looks_non_http(b"GET / HTTP/1.1"));
    }

    #[test]
    fn finds_head_end() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nbody", 0), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\nbody", 0), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n", 0), None);
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r", 0), None);
        assert_eq!(find_head_end(b"x\r\n\r\n", 2), Some(5));
        assert_eq!(
            find_head_end(b"x\r\n\r\n", 3),
            None,
            "searches line feeds from `from` on"
        );
        assert_eq!(find_head_end(b"", 10), None);
    }

    #[test]
    fn parses_request_fields() {
        let h = req(
            b"POST /p?q=1 HTTP/1.1\r\nHOST: example.com:8080\r\nuser-agent: ua/1\r\n\
            X-Forwarded-For:  203.0.113.7 , 10.0.0.1\r\nTraceparent: tp-value \r\n\
            tracestate: a=1\r\nTraceState: b=2\r\nContent-Length: 12\r\nExpect: 100-Continue\r\n\
            Forwarded: for=192.0.2.1\r\n\r\n",
        );
        assert_eq!(h.method, "POST");
        assert_eq!(h.target, "/p?q=1");
        assert_eq!(h.minor_version, 1);
        assert_eq!(h.host.as_deref(), Some("example.com:8080"));
        assert_eq!(h.user_agent.as_deref(), Some("ua/1"));
        assert_eq!(h.forwarded_for.as_deref(), Some("203.0.113.7"));
        assert_eq!(h.traceparent.as_deref(), Some("tp-value"));
        assert_eq!(h.tracestate.as_deref(), Some("a=1,b=2"));
        assert_eq!(h.content_length, Some(12));
        assert!(h.expect_continue && !h.chunked);
        assert_eq!(h.body(), BodyFraming::Length(12));
    }

    #[test]
    fn forwarded_header_and_non_utf8_values() {
        let h = req(b"GET http://x/y HTTP/1.0\r\nForwarded: For=\"[2001:db8::1]:4711\";proto=http, for=1.1.1.1\r\n\
            User-Agent: caf\xe9\r\n\r\n");
        assert_eq!(h.target, "http://x/y");
        assert_eq!(h.minor_version, 0);
        assert_eq!(h.forwarded_for.as_deref(), Some("[2001:db8::1]:4711"));
        assert_eq!(h.user_agent.as_deref(), Some("caf\u{fffd}"));
        assert_eq!(h.body(), BodyFraming::None);
    }

    #[test]
    fn body_framing_of_requests() {
        let h =
            req(b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip, Chunked\r\nContent-Length: 5\r\n\r\n");
        assert!(h.chunked);
        assert_eq!(h.body(), BodyFraming::Chunked);
        let h = req(b"PUT / HTTP/1.1\r\nContent-Length: 7, 7\r\nContent-Length: 7\r\n\r\n");
        assert_eq!(h.body(), BodyFraming::Length(7));
        for bad in [
            &b"PUT / HTTP/1.1\r\nContent-Length: 7\r\nContent-Length: 8\r\n\r\n"[..],
            b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            b"PUT / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            b"PUT / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
            b"PUT /\xff HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse_request(bad), Parsed::Invalid, "{bad:?}");
        }
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\nHost: a"), Parsed::Partial);
    }

    #[test]
    fn many_headers_fall_back_to_the_heap() {
        let mut buf = b"GET /many HTTP/1.1\r\n".to_vec();
        for i in 0..1000 {
            buf.extend(format!("x-h{i}: v\r\n").bytes());
        }
        buf.extend(b"traceparent: late\r\n\r\n");
        let h = req(&buf);
        assert_eq!(h.traceparent.as_deref(), Some("late"));
        // Partial heads beyond the stack array are partial, not errors.
        assert_eq!(parse_request(&buf[..buf.len() - 30]), Parsed::Partial);
    }

    #[test]
    fn response_framing() {
        let parse = |b: &[u8]| match parse_response(b) {
            Parsed::Complete(h, _) => h,
            other => panic!("{other:?}"),
        };
        let ok_cl = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n");
        assert_eq!(ok_cl.body(Some("GET")), BodyFraming::Length(10));
        assert_eq!(ok_cl.body(Some("HEAD")), BodyFraming::None);
        assert_eq!(ok_cl.body(Some("CONNECT")), BodyFraming::Tunnel);
        assert_eq!(ok_cl.body(None), BodyFraming::Length(10));
        let chunked =
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(chunked.body(Some("GET")), BodyFraming::Chunked);
        let other_te =
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(other_te.body(Some("GET")), BodyFraming::UntilClose);
        let no_len = parse(b"HTTP/1.0 200 OK\r\n\r\n");
        assert_eq!(no_len.body(Some("GET")), BodyFraming::UntilClose);
        assert_eq!(no_len.minor_version, 0);
        for (status, interim, framing) in [
            (100, true, BodyFraming::None),
            (103, true, BodyFraming::None),
            (101, false, BodyFraming::Tunnel),
            (204, false, BodyFraming::None),
            (304, false, BodyFraming::None),
            (404, false, BodyFraming::UntilClose),
        ] {
            let h = parse(format!("HTTP/1.1 {status} X\r\n\r\n").as_bytes());
            assert_eq!(h.status, status);
            assert_eq!(h.is_interim(), interim, "{status}");
            assert_eq!(h.body(Some("GET")), framing, "{status}");
        }
        let zero = parse(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(zero.body(Some("POST")), BodyFraming::None);
        // Leniency: no reason phrase, spaces after a header name.
        assert_eq!(
            parse(b"HTTP/1.1 200\r\nContent-Length : 2\r\n\r\n").content_length,
            Some(2)
        );
        assert_eq!(parse_response(b"HTTP/1.1 2000 OK\r\n\r\n"), Parsed::Invalid);
    }

    fn walk(body: &[u8], cuts: &[usize]) -> (usize, ChunkProgress) {
        let mut c = ChunkedBody::new();
        let mut at = 0;
        let mut bounds = cuts.to_vec();
        bounds.push(body.len());
        for b in bounds {
            let (n, p) = c.feed(&body[at..b]);
            if p != ChunkProgress::NeedMore {
                return (at + n, p);
            }
            at = b;
        }
        (at, ChunkProgress::NeedMore)
    }

    #[test]
    fn chunked_body_split_anywhere() {
        let body = b"5;a=b;c=\"d e\"\r\nhello\r\n1A \t; ext\r\nabcdefghijklmnopqrstuvwxyz\r\n\
            0\r\nTrailer-One: 1\r\nTrailer-Two: 2\r\n\r\nNEXT";
        let end = body.len() - 4;
        assert_eq!(walk(body, &[]), (end, ChunkProgress::Done));
        for i in 1..body.len() {
            assert_eq!(walk(body, &[i]), (end, ChunkProgress::Done), "cut {i}");
            for j in i + 1..body.len() {
                assert_eq!(
                    walk(body, &[i, j]),
                    (end, ChunkProgress::Done),
                    "cuts {i} {j}"
                );
            }
        }
        // Bare LF line ends and no trailers.
        assert_eq!(walk(b"3\nabc\n0\n\n", &[]), (9, ChunkProgress::Done));
    }

    #[test]
    fn chunked_body_rejects_garbage_and_skips_data() {
        for bad in [
            &b"\r\n"[..],
            b"g\r\n",
            b"5\r\nhelloXX",
            b"11111111111111111\r\n",
            b"5;\x01\r\n",
            b"0\r\n\r",
        ] {
            let (_, p) = walk(bad, &[]);
            assert_ne!(p, ChunkProgress::Done, "{bad:?}");
        }
        assert_eq!(walk(b"5\r\nhelloXX", &[]).1, ChunkProgress::Invalid);
        let mut c = ChunkedBody::new();
        assert_eq!(c.feed(b"100\r\nab").1, ChunkProgress::NeedMore);
        assert!(c.skip(0x100 - 2));
        assert_eq!(c.feed(b"\r\n0\r\n\r\n"), (7, ChunkProgress::Done));
        let mut c = ChunkedBody::new();
        assert_eq!(c.feed(b"4\r\nab").1, ChunkProgress::NeedMore);
        assert!(!c.skip(5), "skipping past chunk data loses the framing");
        let mut c = ChunkedBody::new();
        assert!(!c.skip(1), "a size line cannot be skipped");
    }

    #[test]
    fn parsers_never_panic_on_prefixes_or_noise() {
        let samples: [&[u8]; 3] = [
            b"GET /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
            b"\x00\xff\r\n\r\n\n\n\r\r: :",
        ];
        for s in samples {
            for i in 0..=s.len() {
                let p = &s[..i];
                let _ = parse_request(p);
                let _ = parse_response(p);
                let _ = classify_start(p, None);
                let _ = find_head_end(p, i / 2);
                let _ = ChunkedBody::new().feed(p);
                let _ = looks_non_http(p);
            }
        }
    }
}
