//! Chooses each span's identity and parent, then builds it.
use std::sync::Arc;

use super::{
    Resource, Span, SpanId,
    http::{self, SpanOptions},
};
use crate::{clock::BootClock, conn::Exchange};

pub struct Assembler {
    clock: BootClock,
    opts: SpanOptions,
}

impl Assembler {
    pub fn new(clock: BootClock, opts: SpanOptions) -> Self {
        Assembler { clock, opts }
    }

    /// Re-reads the wall clock offset (NTP may have slewed it).
    pub fn refresh_clock(&mut self) {
        self.clock = BootClock::sample();
    }

    /// Drops per-process state of an exited process.
    pub fn forget_process(&mut self, _tgid: u32) {}

    pub fn assemble(&mut self, ex: &Exchange, resource: Arc<Resource>) -> Span {
        let lineage = http::default_lineage(ex);
        http::build(
            ex,
            lineage,
            SpanId::random(),
            resource,
            &self.clock,
            &self.opts,
        )
    }
}
