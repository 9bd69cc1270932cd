//! sonde: zero-code distributed tracing for unmodified services.
//!
//! Data flows one way; each module only uses the ones downstream of it:
//!
//! ```text
//! probes (load/attach) ─► events (decode) ─► conn (reassembly) ─► protocol (pure parsers)
//!                                              │
//!                                              ▼
//!                         process (Resources) ─► span (assembly) ─► export (OTLP / console)
//! ```
//!
//! Only [`app`] knows about threads, tasks and channels.
pub mod app;
pub mod cli;
pub mod clock;
pub mod conn;
pub mod events;
pub mod export;
pub mod metrics;
pub mod metrics_server;
pub mod probes;
pub mod process;
pub mod protocol;
pub mod span;
