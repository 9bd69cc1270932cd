//! HTTP/1.x message framing and head parsing (RFC 9112), on top of `httparse`.
//!
//! IMPLEMENTATION PENDING (helper): see conn/mod.rs for the contract.

/// What sonde keeps of a request head: only what spans need.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
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
