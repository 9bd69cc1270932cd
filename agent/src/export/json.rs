//! JSON Lines output: one object per span.
//!
//! ```json
//! {"trace_id":"4bf9…","span_id":"00f0…","parent_span_id":null,"name":"GET /orders",
//!  "kind":"SERVER","start_unix_ns":1700000000000000000,"end_unix_ns":1700000000012340000,
//!  "duration_ms":12.34,"flags":1,"trace_state":null,
//!  "attributes":{"http.request.method":"GET","http.response.status_code":200},
//!  "status":{"code":"UNSET"},
//!  "resource":{"pid":1201,"service.name":"frontend","attributes":{"service.name":"frontend"}}}
//! ```
use serde_json::{Map, Value, json};

use crate::span::{AttrValue, Span, SpanKind, Status};

fn attr_json(v: &AttrValue) -> Value {
    match v {
        AttrValue::Str(s) => Value::String(s.to_string()),
        AttrValue::Int(i) => Value::from(*i),
        AttrValue::StrList(l) => Value::from(l.clone()),
    }
}

pub fn span_json(s: &Span) -> Value {
    let attributes: Map<String, Value> = s
        .attributes
        .iter()
        .map(|(k, v)| (k.to_string(), attr_json(v)))
        .collect();
    let resource_attributes: Map<String, Value> = s
        .resource
        .attributes
        .iter()
        .map(|(k, v)| (k.clone(), attr_json(v)))
        .collect();
    let status = match &s.status {
        Status::Unset => json!({"code": "UNSET"}),
        Status::Error { description } => json!({"code": "ERROR", "message": description}),
    };
    json!({
        "trace_id": s.trace_id.to_string(),
        "span_id": s.span_id.to_string(),
        "parent_span_id": s.parent_span_id.map(|p| p.to_string()),
        "name": s.name,
        "kind": match s.kind { SpanKind::Server => "SERVER", SpanKind::Client => "CLIENT" },
        "start_unix_ns": s.start_unix_ns,
        "end_unix_ns": s.end_unix_ns,
        "duration_ms": s.end_unix_ns.saturating_sub(s.start_unix_ns) as f64 / 1e6,
        "flags": s.flags,
        "trace_state": s.trace_state,
        "attributes": attributes,
        "status": status,
        "resource": {
            "pid": s.resource.pid,
            "service.name": s.resource.service_name,
            "attributes": resource_attributes,
        },
    })
}

/// Appends one line per span to `out`.
pub(crate) fn render_lines(spans: &[Span], out: &mut String) {
    for s in spans {
        out.push_str(&span_json(s).to_string());
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::convert::tests::{resource, span};

    #[test]
    fn one_object_per_line() {
        let r = resource(42, "web");
        let a = span(&r, 1, 1, None, SpanKind::Server, 1_000, 2_500_000, 200);
        let b = span(&r, 1, 2, Some(1), SpanKind::Client, 2_000, 1_000_000, 503);
        let mut out = String::new();
        render_lines(&[a, b], &mut out);
        let lines: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["trace_id"], "01010101010101010101010101010101");
        assert_eq!(lines[0]["span_id"], "0101010101010101");
        assert_eq!(lines[0]["parent_span_id"], Value::Null);
        assert_eq!(lines[0]["kind"], "SERVER");
        assert_eq!(lines[0]["duration_ms"], 2.5);
        assert_eq!(lines[0]["attributes"]["http.response.status_code"], 200);
        assert_eq!(lines[0]["status"]["code"], "UNSET");
        assert_eq!(lines[0]["resource"]["pid"], 42);
        assert_eq!(lines[0]["resource"]["attributes"]["service.name"], "web");
        assert_eq!(
            lines[0]["resource"]["attributes"]["process.command_args"][1],
            "--port"
        );
        assert_eq!(lines[1]["parent_span_id"], "0101010101010101");
        assert_eq!(lines[1]["kind"], "CLIENT");
        assert_eq!(lines[1]["status"]["code"], "ERROR");
        assert_eq!(lines[1]["status"]["message"], "HTTP 503");
    }
}
