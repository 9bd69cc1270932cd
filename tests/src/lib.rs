//! Test support.
//!
//! - [`otlp`]: a real OTLP trace receiver (gRPC via tonic, HTTP/protobuf via hyper, optionally
//!   over TLS) that records every span it is sent, for asserting on what sonde exports.
//! - [`pki`]: a test CA and server certificate for the TLS receiver.
pub mod otlp;
pub mod pki;

pub use otlp::{FailMode, ReceivedSpan, Receiver};
