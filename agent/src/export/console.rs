//! Console output: spans are held per trace until the trace has been quiet for a while, then
//! printed as a tree (parent → children by `parent_span_id`, children by start time).
//!
//! ```text
//! trace 4bf92f3577b34da6a3ce929d0e0e4736 (3 spans)
//!   SERVER frontend[1201] GET /orders 200 12.34 ms url.path=/orders server=shop:8080
//!     CLIENT frontend[1201] GET 200 8.10 ms url.full=http://backend:9000/items server=backend:9000
//!       SERVER backend[1305] GET /items 200 5.02 ms url.path=/items server=backend:9000
//! ```
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::span::{AttrValue, Span, SpanId, SpanKind, Status, TraceId};

fn attr_str(s: &Span, key: &str) -> Option<String> {
    match s.attr(key)? {
        AttrValue::Str(v) => Some(v.to_string()),
        AttrValue::Int(i) => Some(i.to_string()),
        AttrValue::StrList(l) => Some(l.join(",")),
    }
}

/// One span's line, without indentation or newline.
pub fn render_span_line(s: &Span) -> String {
    let kind = match s.kind {
        SpanKind::Server => "SERVER",
        SpanKind::Client => "CLIENT",
    };
    let status = attr_str(s, "http.response.status_code").unwrap_or_else(|| "-".into());
    let dur_ms = s.end_unix_ns.saturating_sub(s.start_unix_ns) as f64 / 1e6;
    let mut line = format!(
        "{kind} {}[{}] {} {status} {dur_ms:.2} ms",
        s.resource.service_name, s.resource.pid, s.name
    );
    if let Some(p) = attr_str(s, "url.path") {
        let _ = write!(line, " url.path={p}");
    } else if let Some(u) = attr_str(s, "url.full") {
        let _ = write!(line, " url.full={u}");
    }
    if let Some(a) = attr_str(s, "server.address") {
        match attr_str(s, "server.port") {
            Some(p) => {
                let _ = write!(line, " server={a}:{p}");
            }
            None => {
                let _ = write!(line, " server={a}");
            }
        }
    }
    if let Status::Error { description } = &s.status {
        let _ = write!(line, " ERROR");
        if !description.is_empty() {
            let _ = write!(line, " \"{description}\"");
        }
        if let Some(t) = attr_str(s, "error.type")
            && t != *description
        {
            let _ = write!(line, " error.type={t}");
        }
    }
    line
}

fn short(id: SpanId) -> String {
    format!("{}…", &id.to_string()[..8])
}

/// Renders one trace (all `spans` should share a trace id) as a tree, ending with a newline.
/// Spans whose parent is not among `spans` are roots; if they name a parent, it is shown as
/// `(parent 1234abcd… not seen)` above them. Pure: no I/O, no clock.
pub fn render_trace(spans: &[Span]) -> String {
    let mut out = String::new();
    let Some(first) = spans.first() else {
        return out;
    };
    let _ = writeln!(
        out,
        "trace {} ({} span{})",
        first.trace_id,
        spans.len(),
        if spans.len() == 1 { "" } else { "s" }
    );

    // Indices in start order (ties: as given).
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| spans[i].start_unix_ns);
    let mut by_id: HashMap<SpanId, usize> = HashMap::with_capacity(spans.len());
    for &i in &order {
        by_id.entry(spans[i].span_id).or_insert(i);
    }
    let mut children: HashMap<usize, Vec<usize>> = HashMap::new();
    // Roots in start order; a missing parent groups its orphans under one placeholder.
    enum Root {
        Span(usize),
        Missing(SpanId, Vec<usize>),
    }
    let mut roots: Vec<Root> = Vec::new();
    let mut missing: HashMap<SpanId, usize> = HashMap::new();
    for &i in &order {
        match spans[i].parent_span_id {
            Some(p) => match by_id.get(&p) {
                Some(&pi) if pi != i => children.entry(pi).or_default().push(i),
                Some(_) => roots.push(Root::Span(i)),
                None => match missing.get(&p) {
                    Some(&r) => {
                        if let Root::Missing(_, v) = &mut roots[r] {
                            v.push(i)
                        }
                    }
                    None => {
                        missing.insert(p, roots.len());
                        roots.push(Root::Missing(p, vec![i]));
                    }
                },
            },
            None => roots.push(Root::Span(i)),
        }
    }

    let mut visited = vec![false; spans.len()];
    // Iterative depth-first walk: traces can be deep.
    let walk = |start: usize, depth: usize, out: &mut String, visited: &mut Vec<bool>| {
        let mut stack = vec![(start, depth)];
        while let Some((i, d)) = stack.pop() {
            if std::mem::replace(&mut visited[i], true) {
                continue;
            }
            let _ = writeln!(out, "{}{}", "  ".repeat(d), render_span_line(&spans[i]));
            if let Some(kids) = children.get(&i) {
                stack.extend(kids.iter().rev().map(|&k| (k, d + 1)));
            }
        }
    };
    for root in &roots {
        match root {
            Root::Span(i) => walk(*i, 1, &mut out, &mut visited),
            Root::Missing(p, orphans) => {
                let _ = writeln!(out, "  (parent {} not seen)", short(*p));
                for &i in orphans {
                    walk(i, 2, &mut out, &mut visited);
                }
            }
        }
    }
    // Parent cycles (corrupt ids) have no root: print what's left flat rather than lose it.
    for &i in &order {
        if !visited[i] {
            walk(i, 1, &mut out, &mut visited);
        }
    }
    out
}

struct Pending {
    spans: Vec<Span>,
    last_update: Instant,
}

/// Holds spans per trace until the trace is quiet, bounded in spans held.
pub(crate) struct ConsoleCollector {
    traces: HashMap<TraceId, Pending>,
    held: usize,
    quiet: Duration,
    max_spans: usize,
}

impl ConsoleCollector {
    pub(crate) fn new(quiet: Duration, max_spans: usize) -> Self {
        ConsoleCollector {
            traces: HashMap::new(),
            held: 0,
            quiet,
            max_spans: max_spans.max(1),
        }
    }

    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Adds spans; if more than the cap are held, the least recently updated traces are
    /// rendered into `out` early (nothing is dropped). Returns spans rendered.
    pub(crate) fn add(&mut self, spans: Vec<Span>, now: Instant, out: &mut String) -> usize {
        for s in spans {
            self.held += 1;
            let p = self.traces.entry(s.trace_id).or_insert_with(|| Pending {
                spans: Vec::new(),
                last_update: now,
            });
            p.last_update = now;
            p.spans.push(s);
        }
        if self.held <= self.max_spans {
            return 0;
        }
        // Evict down to 3/4 of the cap in one go, oldest first, so this stays rare.
        let target = self.max_spans * 3 / 4;
        let mut ids: Vec<(Instant, TraceId)> = self
            .traces
            .iter()
            .map(|(id, p)| (p.last_update, *id))
            .collect();
        ids.sort_by_key(|&(t, _)| t);
        let mut evict = Vec::new();
        let mut held = self.held;
        for (_, id) in ids {
            if held <= target {
                break;
            }
            held -= self.traces[&id].spans.len();
            evict.push(id);
        }
        self.render(evict, out)
    }

    /// Renders traces quiet for at least the quiet period. Returns spans rendered.
    pub(crate) fn flush_quiet(&mut self, now: Instant, out: &mut String) -> usize {
        let quiet = self.quiet;
        let ids: Vec<TraceId> = self
            .traces
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.last_update) >= quiet)
            .map(|(id, _)| *id)
            .collect();
        self.render(ids, out)
    }

    /// Renders everything held.
    pub(crate) fn flush_all(&mut self, out: &mut String) -> usize {
        let ids: Vec<TraceId> = self.traces.keys().copied().collect();
        self.render(ids, out)
    }

    /// Renders the given traces, earliest-starting first.
    fn render(&mut self, ids: Vec<TraceId>, out: &mut String) -> usize {
        let mut traces: Vec<Vec<Span>> = ids
            .into_iter()
            .filter_map(|id| self.traces.remove(&id))
            .map(|p| p.spans)
            .collect();
        traces.sort_by_key(|t| t.iter().map(|s| s.start_unix_ns).min());
        let mut n = 0;
        for t in traces {
            n += t.len();
            out.push_str(&render_trace(&t));
        }
        self.held -= n;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::convert::tests::{resource, span};

    #[test]
    fn renders_a_three_span_trace() {
        let front = resource(1201, "frontend");
        let back = resource(1305, "backend");
        let ms = 1_000_000;
        let mut server = span(
            &front,
            0xab,
            1,
            None,
            SpanKind::Server,
            1000 * ms,
            12_340_000,
            200,
        );
        server.name = "GET /orders".into();
        let client = span(
            &front,
            0xab,
            2,
            Some(1),
            SpanKind::Client,
            1001 * ms,
            8_100_000,
            503,
        );
        let mut inner = span(
            &back,
            0xab,
            3,
            Some(2),
            SpanKind::Server,
            1002 * ms,
            5_020_000,
            503,
        );
        inner.attributes.push(("error.type", "503".into()));
        // Given out of order: the renderer sorts.
        let text = render_trace(&[inner, server, client]);
        let expected = "\
trace abababababababababababababababab (3 spans)
  SERVER frontend[1201] GET /orders 200 12.34 ms url.path=/api/orders server=shop:8080
    CLIENT frontend[1201] GET 503 8.10 ms url.full=http://backend:9000/orders server=backend:9000 ERROR \"HTTP 503\"
      SERVER backend[1305] GET 503 5.02 ms url.path=/api/orders server=shop:8080 ERROR \"HTTP 503\" error.type=503
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn orphans_siblings_and_cycles() {
        let r = resource(7, "svc");
        let a = span(&r, 1, 0xa1, Some(0x99), SpanKind::Server, 100, 50, 200);
        let b = span(&r, 1, 0xb2, Some(0xa1), SpanKind::Client, 130, 10, 200);
        let c = span(&r, 1, 0xc3, Some(0xa1), SpanKind::Client, 110, 10, 200);
        let d = span(&r, 1, 0xd4, Some(0x99), SpanKind::Server, 200, 50, 200);
        let text = render_trace(&[a, b, c, d]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "trace 01010101010101010101010101010101 (4 spans)");
        assert_eq!(lines[1], "  (parent 99999999… not seen)");
        assert!(lines[2].starts_with("    SERVER svc[7] GET 200 0.00 ms"));
        // Children by start time: c (110) before b (130).
        assert!(lines[3].starts_with("      CLIENT"), "{text}");
        assert_eq!(lines.len(), 6, "{text}");
        assert!(
            lines[5].starts_with("    SERVER"),
            "second orphan, same group: {text}"
        );

        // A parent cycle still prints every span once.
        let x = span(&r, 2, 0x01, Some(0x02), SpanKind::Server, 0, 1, 200);
        let y = span(&r, 2, 0x02, Some(0x01), SpanKind::Client, 1, 1, 200);
        let text = render_trace(&[x, y]);
        assert_eq!(text.lines().count(), 3, "{text}");
        assert_eq!(render_trace(&[]), "");
    }

    #[test]
    fn collector_waits_for_quiet_and_is_bounded() {
        let r = resource(1, "svc");
        let t0 = Instant::now();
        let mut c = ConsoleCollector::new(Duration::from_secs(1), 10);
        let mut out = String::new();
        c.add(
            vec![span(&r, 1, 1, None, SpanKind::Server, 0, 1, 200)],
            t0,
            &mut out,
        );
        assert_eq!(c.flush_quiet(t0 + Duration::from_millis(500), &mut out), 0);
        c.add(
            vec![span(&r, 1, 2, Some(1), SpanKind::Client, 0, 1, 200)],
            t0 + Duration::from_millis(900),
            &mut out,
        );
        assert_eq!(c.flush_quiet(t0 + Duration::from_millis(1500), &mut out), 0);
        assert_eq!(c.flush_quiet(t0 + Duration::from_millis(1900), &mut out), 2);
        assert!(out.starts_with("trace 0101"), "{out}");
        assert_eq!(c.held(), 0);

        // 20 single-span traces through a 10-span cap: the oldest are printed early.
        let mut out = String::new();
        let mut printed = 0;
        for i in 0..20u8 {
            printed += c.add(
                vec![span(&r, 100 + i, i + 1, None, SpanKind::Server, 0, 1, 200)],
                t0 + Duration::from_millis(i as u64),
                &mut out,
            );
            assert!(c.held() <= 10);
        }
        printed += c.flush_all(&mut out);
        assert_eq!(printed, 20);
        assert_eq!(out.matches("trace ").count(), 20);
        assert_eq!(c.held(), 0);
    }
}
