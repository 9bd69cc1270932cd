//! Self-metrics: every place sonde can lose or drop data has a counter here, so that loss is
//! always accounted for (periodic log line, `--metrics` endpoint, shutdown summary).
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Userspace counters. Relaxed atomics: they are statistics, not synchronisation.
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
            /// Latest copy of the kernel-side counters (refreshed by the pipeline every second).
            pub kernel: std::sync::Mutex<Vec<(&'static str, u64)>>,
        }

        impl Stats {
            /// (name, value) pairs: userspace counters in declaration order, then the kernel's.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                let mut v = vec![$((stringify!($name), self.$name.load(Relaxed)),)*];
                if let Ok(k) = self.kernel.lock() {
                    v.extend(k.iter().copied());
                }
                v
            }
        }
    };
}

counters! {
    /// Ring-buffer records decoded.
    events,
    /// Records that failed to decode (dropped).
    decode_errors,
    /// Connections tracked in userspace.
    conns_opened,
    /// Connections evicted because the table was full (oldest first).
    conns_evicted,
    /// Connections found not to carry HTTP/1.x (ignored from then on).
    conns_not_http,
    /// Streams that lost sync (garbage, gaps in headers) and were resynchronised or abandoned.
    parse_resyncs,
    /// Request/response exchanges completed (including ones without a response).
    exchanges,
    /// Requests dropped before becoming an exchange (pipeline queue overflow, gaps).
    requests_dropped,
    /// Spans built.
    spans,
    /// Spans not exported because their process runs its own OpenTelemetry SDK.
    sdk_spans_skipped,
    /// Spans dropped because the export queue was full.
    spans_queue_dropped,
    /// Spans accepted by the collector (or printed).
    spans_exported,
    /// Spans dropped after export failed for good (non-retryable or retries exhausted).
    spans_export_failed,
    /// Export requests attempted.
    export_requests,
    /// Export attempts that were retried.
    export_retries,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
}
