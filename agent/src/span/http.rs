//! HTTP exchange → span, per the stable OpenTelemetry HTTP semantic conventions.
//! <https://opentelemetry.io/docs/specs/semconv/http/http-spans/>
use std::{
    net::{IpAddr, SocketAddr},
    ops::Range,
    sync::Arc,
};

use super::{
    AttrValue, Attribute, Resource, Span, SpanId, SpanKind, Status, TraceContext, TraceId,
};
use crate::{
    clock::BootClock,
    conn::{Exchange, Outcome, Side},
    protocol::http1::STANDARD_METHODS,
};

/// Query parameters whose values are always redacted (the conventions' list).
const REDACTED_PARAMS: [&str; 4] = ["AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature"];

#[derive(Clone, Debug, Default)]
pub struct SpanOptions {
    /// Extra query parameter names whose values are replaced by `REDACTED`.
    pub redact_params: Vec<String>,
}

/// Parent and trace identity chosen for a new span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lineage {
    pub trace_id: TraceId,
    pub parent: Option<SpanId>,
    pub flags: u8,
}

impl Lineage {
    /// A new root: fresh trace id, sampled.
    pub fn root() -> Self {
        Lineage {
            trace_id: TraceId::random(),
            parent: None,
            flags: 1,
        }
    }

    pub fn from_context(tc: &TraceContext) -> Self {
        Lineage {
            trace_id: tc.trace_id,
            parent: Some(tc.parent_id),
            flags: tc.flags,
        }
    }
}

/// Default lineage of an exchange: a SERVER span continues an incoming `traceparent`; anything
/// else starts a new trace (in-process and cross-process linking refine this upstream).
pub fn default_lineage(ex: &Exchange) -> Lineage {
    ex.request
        .traceparent
        .as_deref()
        .and_then(|v| TraceContext::parse(v.as_bytes()))
        .map(|tc| Lineage::from_context(&tc))
        .unwrap_or_else(Lineage::root)
}

/// Builds the span for `ex`, moving its strings into attributes where they are used as-is.
pub fn build(
    ex: Exchange,
    lineage: Lineage,
    span_id: SpanId,
    resource: Arc<Resource>,
    clock: &BootClock,
    opts: &SpanOptions,
) -> Span {
    let mut req = ex.request;
    let mut attrs: Vec<Attribute> = Vec::with_capacity(14);

    // The methods the conventions know; anything else is reported as `_OTHER`.
    let method: &'static str = STANDARD_METHODS
        .into_iter()
        .find(|m| *m == req.method)
        .unwrap_or("_OTHER");
    attrs.push(("http.request.method", method.into()));
    if method == "_OTHER" {
        attrs.push(("http.request.method_original", AttrValue::text(&req.method)));
    }

    let tracestate = req.tracestate.take().filter(|_| lineage.parent.is_some());
    let user_agent = req.user_agent.take();
    let forwarded_for = req.forwarded_for.take();
    let (path, query) = split_target(&req.target);
    let path_at = range_in(&req.target, path);
    let query = query.map(|q| redact_query(q, &opts.redact_params));
    let (host, host_port) = req.host.as_deref().map(split_host).unwrap_or((None, None));
    let host_at = host
        .zip(req.host.as_deref())
        .and_then(|(h, all)| range_in(all, h));

    let status_code = ex.response.as_ref().map(|r| r.status);
    if let Some(code) = status_code {
        attrs.push(("http.response.status_code", AttrValue::Int(code as i64)));
    }
    attrs.push((
        "network.protocol.version",
        if req.minor_version == 0 { "1.0" } else { "1.1" }.into(),
    ));
    // Formatted once: also the client address (server side) or the server (client side,
    // without a Host header).
    let peer_ip = ex.remote.map(|r| ip_text(r.ip()));
    if let (Some(peer), Some(ip)) = (ex.remote, &peer_ip) {
        attrs.push(("network.peer.address", ip.clone().into()));
        attrs.push(("network.peer.port", AttrValue::Int(peer.port() as i64)));
    }
    if let Some(ua) = user_agent {
        attrs.push(("user_agent.original", ua.into()));
    }

    let kind = match ex.side {
        Side::Server => {
            attrs.push(("url.scheme", "http".into()));
            let server_port = host_port.or(ex.local.map(|l| l.port()));
            let host = match host_at {
                Some(r) => req.host.as_mut().map(|all| take_range(all, r)),
                None => host.map(AttrValue::text),
            };
            let path = match path_at {
                Some(r) => take_range(&mut req.target, r),
                None => AttrValue::text(path),
            };
            attrs.push(("url.path", path));
            if let Some(q) = query {
                attrs.push(("url.query", q.into()));
            }
            if let Some(h) = host {
                attrs.push(("server.address", h));
            }
            if let Some(p) = server_port {
                attrs.push(("server.port", AttrValue::Int(p as i64)));
            }
            if let Some(c) = forwarded_for.or(peer_ip) {
                attrs.push(("client.address", c.into()));
            }
            SpanKind::Server
        }
        Side::Client => {
            let (addr, port) = client_server(host, host_port, peer_ip, ex.remote);
            attrs.push((
                "url.full",
                url_full(&req.target, addr.as_deref(), port, query.as_deref()).into(),
            ));
            if let Some(a) = addr {
                attrs.push(("server.address", a.into()));
            }
            if let Some(p) = port {
                attrs.push(("server.port", AttrValue::Int(p as i64)));
            }
            SpanKind::Client
        }
    };

    // Status: 5xx is an error on both sides, 4xx only for clients; no response at all is an
    // error with a descriptive error.type.
    let (status, error_type) = match (status_code, &ex.outcome) {
        (Some(code), Outcome::Complete)
            if code >= 500 || (code >= 400 && kind == SpanKind::Client) =>
        {
            (
                Status::Error {
                    description: String::new(),
                },
                Some(code.to_string()),
            )
        }
        (_, Outcome::Complete) => (Status::Unset, None),
        (_, other) => {
            let t = match other {
                Outcome::ConnectionClosed => "connection_closed",
                Outcome::ResponseUnparseable => "response_unparseable",
                Outcome::TimedOut => "timeout",
                Outcome::Complete => unreachable!("handled above"),
            };
            (
                Status::Error {
                    description: format!("no complete response: {t}"),
                },
                Some(t.to_string()),
            )
        }
    };
    if let Some(t) = error_type {
        attrs.push(("error.type", t.into()));
    }

    let start = clock.to_unix_ns(ex.start_ns);
    let end = clock.to_unix_ns(ex.end_ns.max(ex.start_ns));
    Span {
        trace_id: lineage.trace_id,
        span_id,
        parent_span_id: lineage.parent,
        flags: lineage.flags,
        trace_state: tracestate,
        name: if method == "_OTHER" { "HTTP" } else { method }.into(),
        kind,
        start_unix_ns: start,
        end_unix_ns: end,
        attributes: attrs,
        status,
        resource,
    }
}

/// Splits a request-target into path and query. Absolute-form targets lose scheme and
/// authority; `*` (OPTIONS) is kept as the path.
fn split_target(target: &str) -> (&str, Option<&str>) {
    let t = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
        .map(|rest| rest.find('/').map_or("/", |i| &rest[i..]))
        .unwrap_or(target);
    let t = t.split('#').next().unwrap_or(t);
    match t.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (t, None),
    }
}

/// Where `part` lies in `whole`, if it is a subslice of it (not, say, a constant).
fn range_in(whole: &str, part: &str) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= whole.len()).then_some(start..end)
}

/// The text at `r` of `s` as an attribute: when `r` starts `s`, `s` itself, cut down in place
/// and moved (the path before a query, the host before a port: no allocation per span);
/// otherwise a copy.
fn take_range(s: &mut String, r: Range<usize>) -> AttrValue {
    if r.start == 0 && s.is_char_boundary(r.end) {
        let mut whole = std::mem::take(s);
        whole.truncate(r.end);
        whole.into()
    } else {
        AttrValue::text(s.get(r).unwrap_or_default())
    }
}

/// Splits a Host header value into host and port ("[::1]:80", "example.com", "a:8080").
fn split_host(h: &str) -> (Option<&str>, Option<u16>) {
    let h = h.trim();
    if h.is_empty() {
        return (None, None);
    }
    if let Some(rest) = h.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').unwrap_or((rest, ""));
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return (Some(addr), port);
    }
    match h.rsplit_once(':') {
        Some((a, p)) if !a.contains(':') => (Some(a), p.parse().ok()),
        _ => (Some(h), None),
    }
}

fn client_server(
    host: Option<&str>,
    host_port: Option<u16>,
    peer_ip: Option<String>,
    remote: Option<SocketAddr>,
) -> (Option<String>, Option<u16>) {
    match host {
        Some(h) => (Some(h.to_string()), host_port.or(Some(80))),
        None => (peer_ip, remote.map(|r| r.port())),
    }
}

/// `url.full` for a client span: never includes user:password.
fn url_full(target: &str, host: Option<&str>, port: Option<u16>, query: Option<&str>) -> String {
    let (path, _) = split_target(target);
    let authority = if target.starts_with("http://") || target.starts_with("https://") {
        let rest = target.split_once("://").map(|x| x.1).unwrap_or("");
        let auth = rest.split(['/', '?']).next().unwrap_or("");
        auth.rsplit_once('@').map_or(auth, |x| x.1).to_string()
    } else {
        match (host, port) {
            (Some(h), Some(p)) if p != 80 => {
                if h.contains(':') {
                    format!("[{h}]:{p}")
                } else {
                    format!("{h}:{p}")
                }
            }
            (Some(h), _) if h.contains(':') => format!("[{h}]"),
            (Some(h), _) => h.to_string(),
            (None, _) => String::new(),
        }
    };
    let scheme = if target.starts_with("https://") {
        "https"
    } else {
        "http"
    };
    match query {
        Some(q) => format!("{scheme}://{authority}{path}?{q}"),
        None => format!("{scheme}://{authority}{path}"),
    }
}

/// An address as text: IPv4 written digit by digit (this runs twice per span, and the
/// `Display` formatting machinery costs several times more), IPv6 by `Display`.
fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut s = String::with_capacity(15);
    for (i, o) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        if o >= 100 {
            s.push(char::from(b'0' + o / 100));
        }
        if o >= 10 {
            s.push(char::from(b'0' + o / 10 % 10));
        }
        s.push(char::from(b'0' + o % 10));
    }
    s
}

/// Replaces the values of sensitive query parameters with `REDACTED`.
fn redact_query(q: &str, extra: &[String]) -> String {
    let sensitive =
        |k: &str| REDACTED_PARAMS.contains(&k) || extra.iter().any(|e| e.eq_ignore_ascii_case(k));
    if !q
        .split('&')
        .any(|kv| sensitive(kv.split('=').next().unwrap_or("")))
    {
        return q.to_string();
    }
    q.split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if sensitive(k) => format!("{k}=REDACTED"),
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ip_text_matches_display() {
        use std::net::{Ipv4Addr, Ipv6Addr};
        for o in [0u8, 1, 9, 10, 55, 99, 100, 101, 199, 200, 255] {
            for ip in [
                Ipv4Addr::new(o, 0, o, 255),
                Ipv4Addr::new(127, o, 1, o),
                Ipv4Addr::new(o, o, o, o),
            ] {
                assert_eq!(super::ip_text(ip.into()), ip.to_string());
            }
        }
        let v6 = Ipv6Addr::LOCALHOST;
        assert_eq!(super::ip_text(v6.into()), "::1");
    }

    use agent_common::ConnId;

    use super::*;
    use crate::protocol::http1::{RequestHead, ResponseHead};

    fn exchange(side: Side, method: &str, target: &str, status: Option<u16>) -> Exchange {
        Exchange {
            conn: ConnId::default(),
            side,
            local: Some("127.0.0.1:8080".parse().unwrap()),
            remote: Some("127.0.0.1:50000".parse().unwrap()),
            request: RequestHead {
                method: method.to_owned().into(),
                target: target.into(),
                minor_version: 1,
                host: Some("shop.local:8080".into()),
                user_agent: Some("curl/8".into()),
                ..Default::default()
            },
            response: status.map(|s| ResponseHead {
                status: s,
                minor_version: 1,
                ..Default::default()
            }),
            outcome: if status.is_some() {
                Outcome::Complete
            } else {
                Outcome::ConnectionClosed
            },
            start_ns: 1_000,
            end_ns: 3_000,
            request_tid: 1,
            response_tid: 1,
        }
    }

    fn res() -> Arc<Resource> {
        Arc::new(Resource {
            pid: 1,
            service_name: "svc".into(),
            attributes: vec![],
        })
    }

    fn span(ex: &Exchange) -> Span {
        build(
            ex.clone(),
            default_lineage(ex),
            SpanId::random(),
            res(),
            &BootClock::with_offset(10),
            &SpanOptions::default(),
        )
    }

    fn s(span: &Span, k: &str) -> Option<String> {
        span.attr(k).map(|v| match v {
            AttrValue::Str(s) => s.to_string(),
            AttrValue::Int(i) => i.to_string(),
            AttrValue::StrList(l) => l.join(","),
        })
    }

    #[test]
    fn server_span_attributes_and_status() {
        let sp = span(&exchange(
            Side::Server,
            "GET",
            "/orders/7?id=1&sig=abc",
            Some(200),
        ));
        assert_eq!(sp.name, "GET");
        assert_eq!(sp.kind, SpanKind::Server);
        assert_eq!((sp.start_unix_ns, sp.end_unix_ns), (1_010, 3_010));
        assert_eq!(s(&sp, "url.path").as_deref(), Some("/orders/7"));
        assert_eq!(s(&sp, "url.query").as_deref(), Some("id=1&sig=REDACTED"));
        assert_eq!(s(&sp, "server.address").as_deref(), Some("shop.local"));
        assert_eq!(s(&sp, "server.port").as_deref(), Some("8080"));
        assert_eq!(s(&sp, "client.address").as_deref(), Some("127.0.0.1"));
        assert_eq!(s(&sp, "http.response.status_code").as_deref(), Some("200"));
        assert_eq!(s(&sp, "network.protocol.version").as_deref(), Some("1.1"));
        assert_eq!(sp.status, Status::Unset);
        assert!(sp.parent_span_id.is_none());

        let sp = span(&exchange(Side::Server, "GET", "/", Some(404)));
        assert_eq!(sp.status, Status::Unset, "4xx is not a server error");
        let sp = span(&exchange(Side::Server, "GET", "/", Some(503)));
        assert!(matches!(sp.status, Status::Error { .. }));
        assert_eq!(s(&sp, "error.type").as_deref(), Some("503"));
    }

    #[test]
    fn server_span_strings_taken_whole_or_in_part() {
        let mut ex = exchange(Side::Server, "GET", "/whole", Some(200));
        ex.request.host = Some("shop.local".into());
        ex.request.user_agent = Some("curl/8".into());
        ex.request.forwarded_for = Some("10.1.2.3".into());
        let sp = span(&ex);
        assert_eq!(s(&sp, "url.path").as_deref(), Some("/whole"));
        assert_eq!(s(&sp, "url.query"), None);
        assert_eq!(s(&sp, "server.address").as_deref(), Some("shop.local"));
        assert_eq!(
            s(&sp, "server.port").as_deref(),
            Some("8080"),
            "from the socket"
        );
        assert_eq!(s(&sp, "user_agent.original").as_deref(), Some("curl/8"));
        assert_eq!(s(&sp, "client.address").as_deref(), Some("10.1.2.3"));
        assert_eq!(s(&sp, "network.peer.address").as_deref(), Some("127.0.0.1"));

        let mut ex = exchange(Side::Server, "GET", "http://h.example/p#frag", Some(200));
        ex.request.host = Some("[::1]:9".into());
        let sp = span(&ex);
        assert_eq!(s(&sp, "url.path").as_deref(), Some("/p"));
        assert_eq!(s(&sp, "server.address").as_deref(), Some("::1"));
        assert_eq!(s(&sp, "server.port").as_deref(), Some("9"));

        // Absolute form without a path: "/", which is no part of the target.
        let sp = span(&exchange(
            Side::Server,
            "GET",
            "http://h.example",
            Some(200),
        ));
        assert_eq!(s(&sp, "url.path").as_deref(), Some("/"));
        let target = String::from("/p?q");
        assert_eq!(super::range_in(&target, "/"), None);
        assert_eq!(super::range_in(&target, &target[3..]), Some(3..4));
    }

    #[test]
    fn client_span_url_full_and_status() {
        let sp = span(&exchange(Side::Client, "POST", "/pay?x=1", Some(404)));
        assert_eq!(sp.kind, SpanKind::Client);
        assert_eq!(
            s(&sp, "url.full").as_deref(),
            Some("http://shop.local:8080/pay?x=1")
        );
        assert!(
            matches!(sp.status, Status::Error { .. }),
            "4xx is a client error"
        );
        let mut ex = exchange(
            Side::Client,
            "GET",
            "http://user:pw@h.example/a?b",
            Some(200),
        );
        ex.request.host = Some("h.example".into());
        let sp = span(&ex);
        assert_eq!(s(&sp, "url.full").as_deref(), Some("http://h.example/a?b"));
        assert_eq!(s(&sp, "server.port").as_deref(), Some("80"));
    }

    #[test]
    fn unknown_method_and_missing_response() {
        let sp = span(&exchange(Side::Server, "FOO", "/", None));
        assert_eq!(sp.name, "HTTP");
        assert_eq!(s(&sp, "http.request.method").as_deref(), Some("_OTHER"));
        assert_eq!(
            s(&sp, "http.request.method_original").as_deref(),
            Some("FOO")
        );
        assert_eq!(s(&sp, "error.type").as_deref(), Some("connection_closed"));
        assert!(matches!(sp.status, Status::Error { .. }));
    }

    #[test]
    fn continues_incoming_traceparent() {
        let mut ex = exchange(Side::Server, "GET", "/", Some(200));
        ex.request.traceparent =
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".into());
        ex.request.tracestate = Some("k=v".into());
        let sp = span(&ex);
        assert_eq!(sp.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(sp.parent_span_id.unwrap().to_string(), "00f067aa0ba902b7");
        assert_eq!(sp.flags, 0);
        assert_eq!(sp.trace_state.as_deref(), Some("k=v"));
    }

    #[test]
    fn host_and_query_helpers() {
        assert_eq!(split_host("[::1]:81"), (Some("::1"), Some(81)));
        assert_eq!(split_host("a.b"), (Some("a.b"), None));
        assert_eq!(split_target("http://x/y?z"), ("/y", Some("z")));
        assert_eq!(split_target("*"), ("*", None));
        assert_eq!(
            redact_query("token=1&a=2", &["Token".into()]),
            "token=REDACTED&a=2"
        );
    }
}
