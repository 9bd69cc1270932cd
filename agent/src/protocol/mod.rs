//! Pure protocol parsers: plain functions and state machines over bytes. No I/O, no async, no
//! aya — testable with byte fixtures and fuzzable.
pub mod http1;
