//! Loading and attaching the kernel programs, and checking that the kernel can run them.
pub mod btf;
pub mod check;
pub mod loader;

pub use loader::{LoadOptions, ProbeError, Probes};
