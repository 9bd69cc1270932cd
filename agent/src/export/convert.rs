//! Our [`Span`]s → one OTLP `ExportTraceServiceRequest`: one `ResourceSpans` per traced
//! process (grouped by `Arc<Resource>` identity), one `ScopeSpans` ("sonde") in each.
use std::collections::HashMap;
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value,
};
use opentelemetry_proto::tonic::resource::v1::Resource as ProtoResource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span as ProtoSpan, Status as ProtoStatus, span, status,
};

use crate::span::{AttrValue, Resource, Span, SpanKind, Status};

pub const SCOPE_NAME: &str = "sonde";
pub const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Proto `SpanFlags`: bit 8 says bit 9 is meaningful; bit 9 says the parent is remote.
const FLAGS_HAS_IS_REMOTE: u32 = 0x100;
const FLAGS_IS_REMOTE: u32 = 0x200;

pub(crate) fn any_value(v: &AttrValue) -> AnyValue {
    let value = match v {
        AttrValue::Str(s) => any_value::Value::StringValue(s.to_string()),
        AttrValue::Int(i) => any_value::Value::IntValue(*i),
        AttrValue::StrList(l) => any_value::Value::ArrayValue(ArrayValue {
            values: l
                .iter()
                .map(|s| AnyValue {
                    value: Some(any_value::Value::StringValue(s.clone())),
                })
                .collect(),
        }),
    };
    AnyValue { value: Some(value) }
}

fn key_value(k: &str, v: &AttrValue) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(any_value(v)),
        ..Default::default()
    }
}

pub(crate) fn resource(r: &Resource) -> ProtoResource {
    ProtoResource {
        attributes: r.attributes.iter().map(|(k, v)| key_value(k, v)).collect(),
        ..Default::default()
    }
}

/// The proto `flags` of a span: W3C trace flags plus whether the parent is remote.
pub(crate) fn span_flags(s: &Span) -> u32 {
    let mut flags = u32::from(s.flags);
    // A SERVER span's parent came from the request's `traceparent`: another process. For
    // CLIENT spans we don't know, so say nothing.
    if s.parent_span_id.is_some() && s.kind == SpanKind::Server {
        flags |= FLAGS_HAS_IS_REMOTE | FLAGS_IS_REMOTE;
    }
    flags
}

pub(crate) fn span(s: &Span) -> ProtoSpan {
    let flags = span_flags(s);
    ProtoSpan {
        trace_id: s.trace_id.0.to_vec(),
        span_id: s.span_id.0.to_vec(),
        trace_state: s.trace_state.clone().unwrap_or_default(),
        parent_span_id: s.parent_span_id.map(|p| p.0.to_vec()).unwrap_or_default(),
        flags,
        name: s.name.to_string(),
        kind: match s.kind {
            SpanKind::Server => span::SpanKind::Server,
            SpanKind::Client => span::SpanKind::Client,
        } as i32,
        start_time_unix_nano: s.start_unix_ns,
        end_time_unix_nano: s.end_unix_ns,
        attributes: s.attributes.iter().map(|(k, v)| key_value(k, v)).collect(),
        status: match &s.status {
            Status::Unset => None,
            Status::Error { description } => Some(ProtoStatus {
                message: description.clone(),
                code: status::StatusCode::Error as i32,
            }),
        },
        ..Default::default()
    }
}

/// One request for all `spans`, Resources in order of first appearance.
pub fn to_request(spans: &[Span]) -> ExportTraceServiceRequest {
    let mut index: HashMap<*const Resource, usize> = HashMap::new();
    let mut out: Vec<ResourceSpans> = Vec::new();
    for s in spans {
        let i = *index.entry(Arc::as_ptr(&s.resource)).or_insert_with(|| {
            out.push(ResourceSpans {
                resource: Some(resource(&s.resource)),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: SCOPE_NAME.to_string(),
                        version: SCOPE_VERSION.to_string(),
                        ..Default::default()
                    }),
                    spans: Vec::new(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            });
            out.len() - 1
        });
        out[i].scope_spans[0].spans.push(span(s));
    }
    ExportTraceServiceRequest {
        resource_spans: out,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::span::{SpanId, TraceId};

    pub(crate) fn resource(pid: u32, service: &str) -> Arc<Resource> {
        Arc::new(Resource {
            pid,
            service_name: service.to_string(),
            attributes: vec![
                ("service.name".into(), AttrValue::text(service)),
                ("process.pid".into(), AttrValue::Int(pid as i64)),
                (
                    "process.command_args".into(),
                    AttrValue::StrList(vec!["app".into(), "--port".into(), "80".into()]),
                ),
            ],
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn span(
        res: &Arc<Resource>,
        trace: u8,
        id: u8,
        parent: Option<u8>,
        kind: SpanKind,
        start_ns: u64,
        dur_ns: u64,
        status_code: i64,
    ) -> Span {
        let mut attributes = vec![
            ("http.request.method", AttrValue::from("GET")),
            ("http.response.status_code", AttrValue::Int(status_code)),
        ];
        match kind {
            SpanKind::Server => {
                attributes.push(("url.path", "/api/orders".into()));
                attributes.push(("server.address", "shop".into()));
                attributes.push(("server.port", AttrValue::Int(8080)));
            }
            SpanKind::Client => {
                attributes.push(("url.full", "http://backend:9000/orders".into()));
                attributes.push(("server.address", "backend".into()));
                attributes.push(("server.port", AttrValue::Int(9000)));
            }
        }
        Span {
            trace_id: TraceId([trace; 16]),
            span_id: SpanId([id; 8]),
            parent_span_id: parent.map(|p| SpanId([p; 8])),
            flags: 1,
            trace_state: None,
            name: "GET".into(),
            kind,
            start_unix_ns: start_ns,
            end_unix_ns: start_ns + dur_ns,
            attributes,
            status: if status_code >= 500 {
                Status::Error {
                    description: format!("HTTP {status_code}"),
                }
            } else {
                Status::Unset
            },
            resource: res.clone(),
        }
    }

    #[test]
    fn groups_resources_into_one_request() {
        let (a, b, c) = (resource(1, "front"), resource(2, "back"), resource(3, "db"));
        let spans = vec![
            span(&a, 1, 1, None, SpanKind::Server, 1000, 500, 200),
            span(&b, 1, 3, Some(2), SpanKind::Server, 1100, 200, 503),
            span(&a, 1, 2, Some(1), SpanKind::Client, 1050, 300, 200),
            span(&c, 2, 4, None, SpanKind::Server, 5000, 10, 404),
            span(&b, 2, 5, None, SpanKind::Client, 6000, 10, 200),
        ];
        let req = to_request(&spans);
        assert_eq!(req.resource_spans.len(), 3);
        let counts: Vec<usize> = req
            .resource_spans
            .iter()
            .map(|rs| rs.scope_spans[0].spans.len())
            .collect();
        assert_eq!(counts, vec![2, 2, 1]);
        let rs = &req.resource_spans[0];
        let attrs = &rs.resource.as_ref().unwrap().attributes;
        assert_eq!(attrs[0].key, "service.name");
        assert_eq!(
            attrs[0].value.as_ref().unwrap().value,
            Some(any_value::Value::StringValue("front".into()))
        );
        assert_eq!(
            attrs[1].value.as_ref().unwrap().value,
            Some(any_value::Value::IntValue(1))
        );
        match &attrs[2].value.as_ref().unwrap().value {
            Some(any_value::Value::ArrayValue(a)) => assert_eq!(a.values.len(), 3),
            v => panic!("{v:?}"),
        }
        let scope = rs.scope_spans[0].scope.as_ref().unwrap();
        assert_eq!(scope.name, "sonde");
        assert_eq!(scope.version, SCOPE_VERSION);

        let root = &rs.scope_spans[0].spans[0];
        assert_eq!(root.trace_id, vec![1; 16]);
        assert_eq!(root.span_id, vec![1; 8]);
        assert!(root.parent_span_id.is_empty());
        assert_eq!(root.kind, span::SpanKind::Server as i32);
        assert_eq!(root.flags, 1, "no parent: nothing about remoteness");
        assert_eq!(
            (root.start_time_unix_nano, root.end_time_unix_nano),
            (1000, 1500)
        );
        assert_eq!(root.status, None);
        let client = &rs.scope_spans[0].spans[1];
        assert_eq!(client.kind, span::SpanKind::Client as i32);
        assert_eq!(client.parent_span_id, vec![1; 8]);
        assert_eq!(client.flags, 1);
        let server_b = &req.resource_spans[1].scope_spans[0].spans[0];
        assert_eq!(server_b.parent_span_id, vec![2; 8]);
        assert_eq!(server_b.flags, 1 | 0x100 | 0x200, "remote parent");
        let st = server_b.status.as_ref().unwrap();
        assert_eq!(st.code, status::StatusCode::Error as i32);
        assert_eq!(st.message, "HTTP 503");
        assert_eq!(server_b.attributes[1].key, "http.response.status_code");
        assert_eq!(
            server_b.attributes[1].value.as_ref().unwrap().value,
            Some(any_value::Value::IntValue(503))
        );
    }

    #[test]
    fn same_service_different_process_is_another_resource() {
        let (a, b) = (resource(1, "web"), resource(2, "web"));
        let spans = vec![
            span(&a, 1, 1, None, SpanKind::Server, 0, 1, 200),
            span(&b, 1, 2, None, SpanKind::Server, 0, 1, 200),
        ];
        assert_eq!(to_request(&spans).resource_spans.len(), 2);
        assert!(to_request(&[]).resource_spans.is_empty());
    }
}
