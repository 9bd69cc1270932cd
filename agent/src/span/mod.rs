//! Exporter-neutral span model, and the assembly of spans from HTTP exchanges.
//!
//! Nothing here knows about OTLP or any wire format: `export` converts.
use std::{borrow::Cow, sync::Arc};

pub mod assemble;
pub mod http;
pub mod trace_context;

pub use trace_context::{SpanId, TraceContext, TraceId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
}

/// Text that is usually a constant ("GET", "1.1", "http"): borrowed then, owned otherwise,
/// so that most attributes of a span cost no allocation.
pub type Text = Cow<'static, str>;

#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(Text),
    Int(i64),
    StrList(Vec<String>),
}

impl AttrValue {
    /// A copy of borrowed text (for text that is not `'static`).
    pub fn text(s: &str) -> Self {
        AttrValue::Str(Cow::Owned(s.to_owned()))
    }
}
impl From<String> for AttrValue {
    fn from(s: String) -> Self {
        AttrValue::Str(Cow::Owned(s))
    }
}
impl From<&'static str> for AttrValue {
    fn from(s: &'static str) -> Self {
        AttrValue::Str(Cow::Borrowed(s))
    }
}
impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        AttrValue::Int(v)
    }
}

/// A key/value attribute. Keys are OpenTelemetry semantic-convention names.
pub type Attribute = (&'static str, AttrValue);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Unset,
    Error { description: String },
}

/// The entity that produced spans: one traced process (an OTel Resource).
#[derive(Debug, PartialEq)]
pub struct Resource {
    pub pid: u32,
    /// `service.name`, also in `attributes`; kept apart for printing.
    pub service_name: String,
    pub attributes: Vec<(String, AttrValue)>,
}

#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    /// W3C trace flags (bit 0 = sampled).
    pub flags: u8,
    pub trace_state: Option<String>,
    pub name: Text,
    pub kind: SpanKind,
    /// Wall-clock nanoseconds since the Unix epoch.
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: Vec<Attribute>,
    pub status: Status,
    pub resource: Arc<Resource>,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}
