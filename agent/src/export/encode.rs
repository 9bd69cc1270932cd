//! Our [`Span`]s → the protobuf bytes of one OTLP `ExportTraceServiceRequest`, written
//! directly into a reused buffer.
//!
//! The message is the one [`super::convert::to_request`] builds (same grouping: one
//! `ResourceSpans` per process in order of first appearance, one `ScopeSpans` "sonde" in
//! each), but without building it: no owned `opentelemetry-proto` structs, no allocation per
//! attribute, and every length computed once. Tests check the output byte for byte against
//! prost encoding `to_request`, and decode it with `opentelemetry-proto`.
use foldhash::HashMap;
use std::sync::Arc;

use super::convert::{SCOPE_NAME, SCOPE_VERSION, span_flags};
use crate::span::{AttrValue, Resource, Span, SpanKind, Status};

// Field numbers, from opentelemetry/proto/{collector/trace,trace,common,resource}/v1.
const REQUEST_RESOURCE_SPANS: u32 = 1;
const RESOURCE_SPANS_RESOURCE: u32 = 1;
const RESOURCE_SPANS_SCOPE_SPANS: u32 = 2;
const RESOURCE_ATTRIBUTES: u32 = 1;
const SCOPE_SPANS_SCOPE: u32 = 1;
const SCOPE_SPANS_SPANS: u32 = 2;
const SCOPE_NAME_FIELD: u32 = 1;
const SCOPE_VERSION_FIELD: u32 = 2;
const SPAN_TRACE_ID: u32 = 1;
const SPAN_SPAN_ID: u32 = 2;
const SPAN_TRACE_STATE: u32 = 3;
const SPAN_PARENT_SPAN_ID: u32 = 4;
const SPAN_NAME: u32 = 5;
const SPAN_KIND: u32 = 6;
const SPAN_START: u32 = 7;
const SPAN_END: u32 = 8;
const SPAN_ATTRIBUTES: u32 = 9;
const SPAN_STATUS: u32 = 15;
const SPAN_FLAGS: u32 = 16;
const STATUS_MESSAGE: u32 = 2;
const STATUS_CODE: u32 = 3;
const KEY_VALUE_KEY: u32 = 1;
const KEY_VALUE_VALUE: u32 = 2;
const ANY_STRING: u32 = 1;
const ANY_INT: u32 = 3;
const ANY_ARRAY: u32 = 5;
const ARRAY_VALUES: u32 = 1;

/// `SpanKind` enum values.
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
/// `Status.StatusCode.STATUS_CODE_ERROR`.
const STATUS_ERROR: u64 = 2;

/// Protobuf wire types.
#[derive(Clone, Copy)]
#[repr(u32)]
enum WireType {
    Varint = 0,
    SixtyFourBit = 1,
    LengthDelimited = 2,
    ThirtyTwoBit = 5,
}

/// Bytes of `v` as a varint.
#[inline(always)]
fn encoded_len_varint(v: u64) -> usize {
    // 1 byte per 7 bits, at least 1.
    ((((v | 1).ilog2() * 9) + 73) / 64) as usize
}

#[inline(always)]
fn encode_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[inline(always)]
fn key_len(tag: u32) -> usize {
    encoded_len_varint(u64::from(tag << 3))
}

#[inline(always)]
fn encode_key(tag: u32, wt: WireType, out: &mut Vec<u8>) {
    encode_varint(u64::from(tag << 3 | wt as u32), out);
}

/// Bytes of a length-delimited field whose body is `len` bytes.
#[inline]
fn delimited(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// Bytes of a string/bytes field, omitted (proto3 default) when empty.
#[inline]
fn opt_bytes(tag: u32, len: usize) -> usize {
    if len == 0 { 0 } else { delimited(tag, len) }
}

#[inline]
fn put_delimited_header(tag: u32, len: usize, out: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
}

#[inline]
fn put_bytes(tag: u32, b: &[u8], out: &mut Vec<u8>) {
    put_delimited_header(tag, b.len(), out);
    out.extend_from_slice(b);
}

#[inline]
fn put_opt_bytes(tag: u32, b: &[u8], out: &mut Vec<u8>) {
    if !b.is_empty() {
        put_bytes(tag, b, out);
    }
}

/// Body of an `AnyValue` (oneof members are written even when they hold a default).
fn any_value_len(v: &AttrValue) -> usize {
    match v {
        AttrValue::Str(s) => delimited(ANY_STRING, s.len()),
        AttrValue::Int(i) => key_len(ANY_INT) + encoded_len_varint(*i as u64),
        AttrValue::StrList(l) => delimited(ANY_ARRAY, array_len(l)),
    }
}

/// Body of an `ArrayValue` of strings.
fn array_len(l: &[String]) -> usize {
    l.iter()
        .map(|s| delimited(ARRAY_VALUES, delimited(ANY_STRING, s.len())))
        .sum()
}

fn put_any_value(v: &AttrValue, out: &mut Vec<u8>) {
    match v {
        AttrValue::Str(s) => put_bytes(ANY_STRING, s.as_bytes(), out),
        AttrValue::Int(i) => {
            encode_key(ANY_INT, WireType::Varint, out);
            encode_varint(*i as u64, out);
        }
        AttrValue::StrList(l) => {
            put_delimited_header(ANY_ARRAY, array_len(l), out);
            for s in l {
                put_delimited_header(ARRAY_VALUES, delimited(ANY_STRING, s.len()), out);
                put_bytes(ANY_STRING, s.as_bytes(), out);
            }
        }
    }
}

/// Body of a `KeyValue`.
#[inline]
fn key_value_len(k: &str, v: &AttrValue) -> usize {
    opt_bytes(KEY_VALUE_KEY, k.len()) + delimited(KEY_VALUE_VALUE, any_value_len(v))
}

fn put_key_value(tag: u32, k: &str, v: &AttrValue, out: &mut Vec<u8>) {
    let any = any_value_len(v);
    put_delimited_header(
        tag,
        opt_bytes(KEY_VALUE_KEY, k.len()) + delimited(KEY_VALUE_VALUE, any),
        out,
    );
    put_opt_bytes(KEY_VALUE_KEY, k.as_bytes(), out);
    put_delimited_header(KEY_VALUE_VALUE, any, out);
    put_any_value(v, out);
}

fn status_len(description: &str) -> usize {
    opt_bytes(STATUS_MESSAGE, description.len()) + key_len(STATUS_CODE) + 1
}

/// Body of a `Span`.
fn span_len(s: &Span) -> usize {
    let mut n = delimited(SPAN_TRACE_ID, 16) + delimited(SPAN_SPAN_ID, 8);
    n += opt_bytes(
        SPAN_TRACE_STATE,
        s.trace_state.as_deref().map_or(0, str::len),
    );
    if s.parent_span_id.is_some() {
        n += delimited(SPAN_PARENT_SPAN_ID, 8);
    }
    if span_flags(s) != 0 {
        n += key_len(SPAN_FLAGS) + 4;
    }
    n += opt_bytes(SPAN_NAME, s.name.len());
    n += key_len(SPAN_KIND) + 1;
    if s.start_unix_ns != 0 {
        n += key_len(SPAN_START) + 8;
    }
    if s.end_unix_ns != 0 {
        n += key_len(SPAN_END) + 8;
    }
    for (k, v) in &s.attributes {
        n += delimited(SPAN_ATTRIBUTES, key_value_len(k, v));
    }
    if let Status::Error { description } = &s.status {
        n += delimited(SPAN_STATUS, status_len(description));
    }
    n
}

fn put_span(s: &Span, len: usize, out: &mut Vec<u8>) {
    put_delimited_header(SCOPE_SPANS_SPANS, len, out);
    put_bytes(SPAN_TRACE_ID, &s.trace_id.0, out);
    put_bytes(SPAN_SPAN_ID, &s.span_id.0, out);
    put_opt_bytes(
        SPAN_TRACE_STATE,
        s.trace_state.as_deref().unwrap_or("").as_bytes(),
        out,
    );
    if let Some(p) = &s.parent_span_id {
        put_bytes(SPAN_PARENT_SPAN_ID, &p.0, out);
    }
    put_opt_bytes(SPAN_NAME, s.name.as_bytes(), out);
    encode_key(SPAN_KIND, WireType::Varint, out);
    out.push(match s.kind {
        SpanKind::Server => KIND_SERVER,
        SpanKind::Client => KIND_CLIENT,
    } as u8);
    for (tag, t) in [(SPAN_START, s.start_unix_ns), (SPAN_END, s.end_unix_ns)] {
        if t != 0 {
            encode_key(tag, WireType::SixtyFourBit, out);
            out.extend_from_slice(&t.to_le_bytes());
        }
    }
    for (k, v) in &s.attributes {
        put_key_value(SPAN_ATTRIBUTES, k, v, out);
    }
    if let Status::Error { description } = &s.status {
        put_delimited_header(SPAN_STATUS, status_len(description), out);
        put_opt_bytes(STATUS_MESSAGE, description.as_bytes(), out);
        encode_key(STATUS_CODE, WireType::Varint, out);
        out.push(STATUS_ERROR as u8);
    }
    // Written in field-number order, like prost: `flags` (16) comes last.
    let flags = span_flags(s);
    if flags != 0 {
        encode_key(SPAN_FLAGS, WireType::ThirtyTwoBit, out);
        out.extend_from_slice(&flags.to_le_bytes());
    }
}

fn resource_len(r: &Resource) -> usize {
    r.attributes
        .iter()
        .map(|(k, v)| delimited(RESOURCE_ATTRIBUTES, key_value_len(k, v)))
        .sum()
}

fn scope_len() -> usize {
    opt_bytes(SCOPE_NAME_FIELD, SCOPE_NAME.len())
        + opt_bytes(SCOPE_VERSION_FIELD, SCOPE_VERSION.len())
}

/// One process's spans within a request.
struct Group {
    /// Indices into the spans, in order.
    spans: Vec<u32>,
    /// Sum of the spans' framed sizes.
    spans_len: usize,
}

/// Reusable scratch for [`Encoder::encode`]: keeps its allocations between requests.
#[derive(Default)]
pub struct Encoder {
    /// Resource address (identity of the process) → index into `groups`.
    index: HashMap<usize, usize>,
    groups: Vec<Group>,
    /// Body length of each span, by index.
    lens: Vec<u32>,
}

impl Encoder {
    /// Appends the encoded `ExportTraceServiceRequest` for `spans` to `out`; returns its size.
    pub fn encode(&mut self, spans: &[Span], out: &mut Vec<u8>) -> usize {
        let start = out.len();
        self.lens.clear();
        let mut used = 0;
        for (i, s) in spans.iter().enumerate() {
            let len = span_len(s);
            self.lens.push(len as u32);
            let g = *self
                .index
                .entry(Arc::as_ptr(&s.resource) as usize)
                .or_insert_with(|| {
                    if used == self.groups.len() {
                        self.groups.push(Group {
                            spans: Vec::new(),
                            spans_len: 0,
                        });
                    }
                    let g = &mut self.groups[used];
                    g.spans.clear();
                    g.spans_len = 0;
                    used += 1;
                    used - 1
                });
            let g = &mut self.groups[g];
            g.spans.push(i as u32);
            g.spans_len += delimited(SCOPE_SPANS_SPANS, len);
        }
        let scope = scope_len();
        for g in &self.groups[..used] {
            // The Arc in the first span of the group keeps the Resource alive.
            let resource = &spans[g.spans[0] as usize].resource;
            let res_len = resource_len(resource);
            let scope_spans = delimited(SCOPE_SPANS_SCOPE, scope) + g.spans_len;
            let rs_len = delimited(RESOURCE_SPANS_RESOURCE, res_len)
                + delimited(RESOURCE_SPANS_SCOPE_SPANS, scope_spans);
            out.reserve(delimited(REQUEST_RESOURCE_SPANS, rs_len));
            put_delimited_header(REQUEST_RESOURCE_SPANS, rs_len, out);
            put_delimited_header(RESOURCE_SPANS_RESOURCE, res_len, out);
            for (k, v) in &resource.attributes {
                put_key_value(RESOURCE_ATTRIBUTES, k, v, out);
            }
            put_delimited_header(RESOURCE_SPANS_SCOPE_SPANS, scope_spans, out);
            put_delimited_header(SCOPE_SPANS_SCOPE, scope, out);
            put_opt_bytes(SCOPE_NAME_FIELD, SCOPE_NAME.as_bytes(), out);
            put_opt_bytes(SCOPE_VERSION_FIELD, SCOPE_VERSION.as_bytes(), out);
            for &i in &g.spans {
                put_span(&spans[i as usize], self.lens[i as usize] as usize, out);
            }
        }
        self.index.clear();
        out.len() - start
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;

    use super::*;
    use crate::export::convert::{
        tests::{resource, span},
        to_request,
    };
    use crate::span::SpanId;

    fn encode_request(spans: &[Span]) -> Vec<u8> {
        let mut out = Vec::new();
        Encoder::default().encode(spans, &mut out);
        out
    }

    fn decoded(bytes: &[u8]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest::decode(bytes).expect("valid protobuf")
    }

    fn sample() -> Vec<Span> {
        let (a, b, c) = (resource(1, "front"), resource(2, "back"), resource(3, "db"));
        let mut spans = vec![
            span(&a, 1, 1, None, SpanKind::Server, 1000, 500, 200),
            span(&b, 1, 3, Some(2), SpanKind::Server, 1100, 200, 503),
            span(&a, 1, 2, Some(1), SpanKind::Client, 1050, 300, 200),
            span(&c, 2, 4, None, SpanKind::Server, 5000, 10, 404),
            span(&b, 2, 5, None, SpanKind::Client, 6000, 10, 200),
        ];
        // Edge values: empty and long strings, negative and zero ints, no flags, zero times,
        // trace state, error without description, non-ASCII.
        spans[0].trace_state = Some("vendor=x,other=y".into());
        spans[0].parent_span_id = Some(SpanId([9; 8]));
        spans[1].attributes.push(("x.empty", AttrValue::from("")));
        spans[1].attributes.push(("x.neg", AttrValue::Int(-1)));
        spans[1].attributes.push(("x.zero", AttrValue::Int(0)));
        spans[1]
            .attributes
            .push(("x.long", AttrValue::from("é".repeat(300))));
        spans[2].flags = 0;
        spans[2].start_unix_ns = 0;
        spans[3].status = Status::Error {
            description: String::new(),
        };
        spans[4].name = "".into();
        spans[4].attributes.push((
            "x.list",
            AttrValue::StrList(vec![String::new(), "a".into(), "b".repeat(200)]),
        ));
        spans
    }

    #[test]
    fn varints_match_prost() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            16383,
            16384,
            u32::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ]
        .into_iter()
        .chain((0..64).map(|b| 1u64 << b))
        .chain((1..64).map(|b| (1u64 << b) - 1))
        {
            let mut ours = Vec::new();
            encode_varint(v, &mut ours);
            let mut theirs = Vec::new();
            prost::encoding::encode_varint(v, &mut theirs);
            assert_eq!(ours, theirs, "{v}");
            assert_eq!(encoded_len_varint(v), theirs.len(), "{v}");
        }
    }

    #[test]
    fn decodes_to_what_the_reference_conversion_builds() {
        let spans = sample();
        let bytes = encode_request(&spans);
        assert_eq!(decoded(&bytes), to_request(&spans));
        // prost writes the same fields in the same order: byte for byte identical.
        assert_eq!(bytes, to_request(&spans).encode_to_vec());
    }

    #[test]
    fn reuse_keeps_requests_independent() {
        let spans = sample();
        let mut enc = Encoder::default();
        let mut out = Vec::new();
        let n1 = enc.encode(&spans, &mut out);
        out.clear();
        // A second, smaller request with fewer resources: nothing of the first leaks in.
        let n2 = enc.encode(&spans[3..4], &mut out);
        assert_eq!(n2, out.len());
        assert!(n2 < n1);
        assert_eq!(decoded(&out), to_request(&spans[3..4]));
        out.clear();
        enc.encode(&spans, &mut out);
        assert_eq!(decoded(&out), to_request(&spans));
        out.clear();
        assert_eq!(enc.encode(&[], &mut out), 0);
    }

    #[test]
    fn appends_after_existing_bytes() {
        let spans = sample();
        let mut out = b"prefix".to_vec();
        let n = Encoder::default().encode(&spans, &mut out);
        assert_eq!(&out[..6], b"prefix");
        assert_eq!(n, out.len() - 6);
        assert_eq!(decoded(&out[6..]), to_request(&spans));
    }

    #[test]
    fn many_resources_and_spans() {
        let resources: Vec<_> = (0..50).map(|p| resource(p, &format!("svc{p}"))).collect();
        let spans: Vec<Span> = (0..2000u32)
            .map(|i| {
                let r = &resources[(i * 7 % 50) as usize];
                span(
                    r,
                    (i % 251) as u8,
                    (i % 253) as u8,
                    None,
                    SpanKind::Client,
                    1 + i as u64,
                    5,
                    200 + (i % 400) as i64,
                )
            })
            .collect();
        let bytes = encode_request(&spans);
        assert_eq!(decoded(&bytes), to_request(&spans));
    }
}
