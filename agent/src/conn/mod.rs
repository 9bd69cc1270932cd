//! Connection tracking and stream reassembly: turns decoded kernel events into HTTP/1.x
//! request/response exchanges.
//!
//! IMPLEMENTATION PENDING (helper).
use std::net::SocketAddr;

use agent_common::ConnId;

use crate::protocol::http1::{RequestHead, ResponseHead};

/// Which side of the exchange the traced process was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The process received the request (SERVER span).
    Server,
    /// The process sent the request (CLIENT span).
    Client,
}

/// How an exchange ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A final response was seen in full.
    Complete,
    /// The connection closed (or the process exited) before a complete response.
    ConnectionClosed,
    /// The response stream became unparseable, or bytes were lost in its head.
    ResponseUnparseable,
    /// Nothing happened for the idle timeout.
    TimedOut,
}

/// One request with its response (if any), as seen on one connection of one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub conn: ConnId,
    pub side: Side,
    /// Socket addresses of the traced process's end and of its peer, when known.
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    pub request: RequestHead,
    pub response: Option<ResponseHead>,
    pub outcome: Outcome,
    /// Kernel monotonic ns of the syscall that carried the request's first byte.
    pub start_ns: u64,
    /// Kernel monotonic ns of the syscall that carried the response's last byte (or of the
    /// event that ended the exchange).
    pub end_ns: u64,
    /// Thread that read (server) or wrote (client) the request's first byte.
    pub request_tid: u32,
    /// Thread that wrote (server) or read (client) the response's first byte; 0 if none.
    pub response_tid: u32,
}
