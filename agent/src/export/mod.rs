//! Span export: a bounded queue fed by a plain thread ([`SpanSender`]), drained by one tokio
//! task ([`spawn`]) that writes OTLP (gRPC or HTTP/protobuf), console trace trees or JSON
//! lines.
//!
//! OTLP requests are built from `opentelemetry-proto` messages directly: one request carries
//! the spans of many processes, one `ResourceSpans` per process (see shared NOTES: ~3x the
//! throughput and ~100x fewer requests than the SDK exporter, which sends one Resource per
//! request).
//!
//! Memory is bounded: at most `max_queue_size` spans wait in the queue (a full queue makes the
//! producer wait up to 50 ms while the exporter is making progress; then spans are dropped and
//! counted in `spans_queue_dropped`), plus one batch being exported (retries included), plus
//! for the console at most `console_max_spans` waiting for their trace to complete.
//! Every span sent ends up in exactly one of `spans_queue_dropped`, `spans_exported`,
//! `spans_export_failed`.
use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::metrics::Stats;
use crate::span::Span;

pub mod config;
pub mod console;
pub mod convert;
pub mod encode;
pub mod json;
mod otlp;
mod tls;

#[cfg(test)]
mod e2e_tests;

pub use config::{
    CaCertificate, Compression, ConfigError, ExportConfig, OutputKind, Protocol, RetryPolicy,
};
pub use console::render_trace;

/// How long a full queue makes the producer wait for room while the exporter is making
/// progress. The producer (the pipeline thread) then leaves events in the kernel ring buffer,
/// which is sized for bursts, instead of dropping spans it already built.
const BACKPRESSURE_WAIT: Duration = Duration::from_millis(50);
/// The exporter counts as making progress if it took a batch this recently; otherwise (a
/// collector down, retries backing off) a full queue drops at once, as the pipeline must
/// keep reading the ring buffer.
const PROGRESS_WINDOW: Duration = Duration::from_millis(500);

/// Spans waiting for the export task. Locked briefly by both sides.
struct Queue {
    spans: Mutex<VecDeque<Span>>,
    /// Signalled whenever the export task takes spans out.
    room: Condvar,
    /// When the export task last took spans out.
    last_take: Mutex<Instant>,
    max: usize,
    batch: usize,
    /// Wakes the task when a full batch is waiting (or on shutdown).
    notify: Notify,
    closed: AtomicBool,
    /// Spans taken by the task and not yet accounted for (for a forced shutdown).
    in_flight: AtomicUsize,
    stats: Arc<Stats>,
}

impl Queue {
    fn new(max: usize, batch: usize, stats: Arc<Stats>) -> Queue {
        Queue {
            spans: Mutex::new(VecDeque::new()),
            room: Condvar::new(),
            last_take: Mutex::new(Instant::now()),
            max,
            batch,
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            stats,
        }
    }

    fn push(&self, mut spans: Vec<Span>) {
        let n = spans.len();
        if n == 0 {
            return;
        }
        if self.closed.load(Ordering::Acquire) {
            Stats::add(&self.stats.spans_queue_dropped, n as u64);
            return;
        }
        let len = {
            let mut q = self.spans.lock().unwrap();
            let full = |q: &VecDeque<Span>| self.max.saturating_sub(q.len()) < n;
            if full(&q) && self.exporter_progressing() {
                // Full but moving: wait (bounded) for the export task to take a batch.
                let deadline = Instant::now() + BACKPRESSURE_WAIT;
                while full(&q) && !self.closed.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    self.notify.notify_one();
                    q = self.room.wait_timeout(q, deadline - now).unwrap().0;
                }
            }
            let room = self.max.saturating_sub(q.len());
            if room < n {
                // Drop the newest: the tail of this batch (freed after unlocking).
                let excess = spans.split_off(room);
                Stats::add(&self.stats.spans_queue_dropped, excess.len() as u64);
                q.extend(spans);
                drop(q);
                drop(excess);
                self.notify.notify_one();
                return;
            }
            q.extend(spans);
            q.len()
        };
        if len >= self.batch {
            self.notify.notify_one();
        }
    }

    fn take(&self, n: usize) -> Vec<Span> {
        let mut q = self.spans.lock().unwrap();
        let k = n.min(q.len());
        let v: Vec<Span> = q.drain(..k).collect();
        self.in_flight.store(v.len(), Ordering::Release);
        drop(q);
        if !v.is_empty() {
            *self.last_take.lock().unwrap() = Instant::now();
            self.room.notify_all();
        }
        v
    }

    fn exporter_progressing(&self) -> bool {
        self.last_take.lock().unwrap().elapsed() < PROGRESS_WINDOW
    }

    fn done(&self) {
        self.in_flight.store(0, Ordering::Release);
    }

    fn len(&self) -> usize {
        self.spans.lock().unwrap().len()
    }
}

/// The producer's handle: cheap to clone, usable from any thread, never blocks.
#[derive(Clone)]
pub struct SpanSender {
    queue: Arc<Queue>,
}

impl SpanSender {
    /// Queues spans for export. Never blocks: spans beyond the queue bound
    /// (`max_queue_size`), or sent after shutdown began, are dropped and counted in
    /// `stats.spans_queue_dropped`.
    pub fn send(&self, spans: Vec<Span>) {
        self.queue.push(spans);
    }

    /// Spans currently queued.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

/// The shutdown signal as seen by the task: `Some(deadline)` once shutdown began. Dropping
/// the [`ExportTask`] without calling `shutdown` counts as a shutdown with the export
/// timeout as deadline.
pub(crate) struct Shutdown {
    rx: watch::Receiver<Option<Instant>>,
    deadline: Option<Instant>,
    fallback: Duration,
}

impl Shutdown {
    /// The deadline once shutdown began (seen at once, even before `changed` is polled).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline.or_else(|| *self.rx.borrow())
    }

    /// Resolves when shutdown begins; never again after that.
    pub(crate) async fn changed(&mut self) {
        if self.deadline.is_some() {
            return std::future::pending().await;
        }
        match self.rx.changed().await {
            Ok(()) => self.deadline = *self.rx.borrow_and_update(),
            Err(_) => self.deadline = Some(Instant::now() + self.fallback),
        }
        if self.deadline.is_none() {
            // A spurious `None`: keep waiting.
            Box::pin(self.changed()).await
        }
    }
}

/// A `log::warn!` that speaks at most once per period, saying how many it held back.
pub(crate) struct RateLimited {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    pub(crate) fn new(every: Duration) -> Self {
        RateLimited {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Returns whether it logged.
    pub(crate) fn warn(&mut self, msg: impl FnOnce() -> String) -> bool {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < self.every)
        {
            self.suppressed += 1;
            return false;
        }
        self.last = Some(now);
        match std::mem::take(&mut self.suppressed) {
            0 => log::warn!("{}", msg()),
            n => log::warn!("{} ({n} similar messages suppressed)", msg()),
        }
        true
    }
}

/// The running export task; [`ExportTask::shutdown`] flushes and stops it.
pub struct ExportTask {
    handle: JoinHandle<()>,
    shutdown: watch::Sender<Option<Instant>>,
    queue: Arc<Queue>,
    timeout: Duration,
    stats: Arc<Stats>,
}

/// Extra time `shutdown` gives the task past its deadline before aborting it.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(250);

impl ExportTask {
    /// Stops accepting spans, exports everything queued (retrying only while the deadline,
    /// the export timeout from now, allows), prints pending console traces, then returns.
    /// Returns within the export timeout plus a quarter second: whatever could not be sent
    /// by then is counted in `spans_export_failed`.
    pub async fn shutdown(self) {
        let deadline = Instant::now() + self.timeout;
        self.queue.closed.store(true, Ordering::Release);
        let _ = self.shutdown.send(Some(deadline));
        self.queue.notify.notify_one();
        let mut handle = self.handle;
        match tokio::time::timeout_at((deadline + SHUTDOWN_GRACE).into(), &mut handle).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::error!("export task failed: {e}"),
            Err(_) => {
                handle.abort();
                let left = self.queue.take(usize::MAX).len()
                    + self.queue.in_flight.swap(0, Ordering::AcqRel);
                Stats::add(&self.stats.spans_export_failed, left as u64);
                log::warn!("export: shutdown deadline reached; {left} spans not exported");
            }
        }
    }
}

/// Starts the export task on the current tokio runtime (multi-thread: console and JSON
/// output write to stdout with `block_in_place`). Must be called inside the runtime.
pub fn spawn(cfg: ExportConfig, stats: Arc<Stats>) -> (SpanSender, ExportTask) {
    spawn_with_output(cfg, stats, Box::new(std::io::stdout()))
}

/// As [`spawn`], console/JSON output going to `out` (OTLP ignores it).
pub fn spawn_with_output(
    cfg: ExportConfig,
    stats: Arc<Stats>,
    out: Box<dyn Write + Send>,
) -> (SpanSender, ExportTask) {
    let max = cfg.max_queue_size.max(1);
    let queue = Arc::new(Queue::new(
        max,
        cfg.max_export_batch_size.clamp(1, max),
        stats.clone(),
    ));
    let (tx, rx) = watch::channel(None);
    let shutdown = Shutdown {
        rx,
        deadline: None,
        fallback: cfg.timeout,
    };
    let timeout = cfg.timeout;
    let handle = match cfg.output {
        OutputKind::Otlp => match otlp::OtlpExporter::new(&cfg, stats.clone()) {
            Ok(exporter) => tokio::spawn(run_otlp(queue.clone(), cfg, exporter, shutdown)),
            Err(e) => {
                log::error!(
                    "OTLP exporter for {} could not be set up: {e}; spans will be counted as \
                     failed",
                    cfg.endpoint
                );
                tokio::spawn(run_local(
                    queue.clone(),
                    cfg,
                    LocalSink::Discard,
                    stats.clone(),
                    shutdown,
                ))
            }
        },
        OutputKind::Console => {
            let collector =
                console::ConsoleCollector::new(cfg.console_quiet, cfg.console_max_spans);
            tokio::spawn(run_local(
                queue.clone(),
                cfg,
                LocalSink::Console(collector, out),
                stats.clone(),
                shutdown,
            ))
        }
        OutputKind::Json => tokio::spawn(run_local(
            queue.clone(),
            cfg,
            LocalSink::Json(out),
            stats.clone(),
            shutdown,
        )),
    };
    (
        SpanSender {
            queue: queue.clone(),
        },
        ExportTask {
            handle,
            shutdown: tx,
            queue,
            timeout,
            stats,
        },
    )
}

async fn run_otlp(
    queue: Arc<Queue>,
    cfg: ExportConfig,
    mut exporter: otlp::OtlpExporter,
    mut shutdown: Shutdown,
) {
    let stats = queue.stats.clone();
    let mut next_flush = Instant::now() + cfg.schedule_delay;
    loop {
        if let Some(deadline) = shutdown.deadline() {
            loop {
                let batch = queue.take(queue.batch);
                if batch.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    let left = batch.len() + queue.take(usize::MAX).len();
                    Stats::add(&stats.spans_export_failed, left as u64);
                    queue.done();
                    log::warn!("export: shutdown deadline reached; {left} spans not exported");
                    break;
                }
                exporter.export(&batch, &mut shutdown).await;
                queue.done();
            }
            return;
        }
        let now = Instant::now();
        if queue.len() >= queue.batch || now >= next_flush {
            let batch = queue.take(queue.batch);
            if !batch.is_empty() {
                exporter.export(&batch, &mut shutdown).await;
            }
            queue.done();
            next_flush = Instant::now() + cfg.schedule_delay;
            continue;
        }
        tokio::select! {
            _ = queue.notify.notified() => {}
            _ = tokio::time::sleep_until(next_flush.into()) => {}
            _ = shutdown.changed() => {}
        }
    }
}

enum LocalSink {
    Console(console::ConsoleCollector, Box<dyn Write + Send>),
    Json(Box<dyn Write + Send>),
    /// The OTLP exporter could not be built: count everything as failed.
    Discard,
}

/// How often console/JSON output looks at the queue.
const LOCAL_TICK: Duration = Duration::from_millis(200);

async fn run_local(
    queue: Arc<Queue>,
    _cfg: ExportConfig,
    mut sink: LocalSink,
    stats: Arc<Stats>,
    mut shutdown: Shutdown,
) {
    let mut write_log = RateLimited::new(Duration::from_secs(30));
    let mut text = String::new();
    loop {
        let stopping = shutdown.deadline().is_some();
        let spans = queue.take(usize::MAX);
        let now = Instant::now();
        let n_in = spans.len();
        let printed = match &mut sink {
            LocalSink::Console(c, _) => {
                let mut n = c.add(spans, now, &mut text);
                n += if stopping {
                    c.flush_all(&mut text)
                } else {
                    c.flush_quiet(now, &mut text)
                };
                n
            }
            LocalSink::Json(_) => {
                json::render_lines(&spans, &mut text);
                n_in
            }
            LocalSink::Discard => {
                Stats::add(&stats.spans_export_failed, n_in as u64);
                0
            }
        };
        queue.done();
        if !text.is_empty() {
            let out = match &mut sink {
                LocalSink::Console(_, out) | LocalSink::Json(out) => Some(out),
                LocalSink::Discard => None,
            };
            if let Some(out) = out {
                let result = blocking(|| {
                    out.write_all(text.as_bytes())?;
                    out.flush()
                });
                match result {
                    Ok(()) => Stats::add(&stats.spans_exported, printed as u64),
                    Err(e) => {
                        Stats::add(&stats.spans_export_failed, printed as u64);
                        write_log.warn(|| format!("export: writing spans to output failed: {e}"));
                    }
                }
            }
            text.clear();
        }
        if stopping {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(LOCAL_TICK) => {}
            _ = queue.notify.notified() => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Runs blocking I/O without stalling other tasks, where the runtime allows it.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(max: usize, stats: &Arc<Stats>) -> Arc<Queue> {
        Arc::new(Queue::new(max, max, stats.clone()))
    }

    fn spans(n: usize) -> Vec<Span> {
        let r = convert::tests::resource(1, "svc");
        (0..n)
            .map(|i| {
                convert::tests::span(
                    &r,
                    1,
                    i as u8 + 1,
                    None,
                    crate::span::SpanKind::Server,
                    1,
                    1,
                    200,
                )
            })
            .collect()
    }

    #[test]
    fn full_queue_waits_for_a_progressing_exporter() {
        let stats = Arc::new(Stats::default());
        let q = queue(4, &stats);
        q.push(spans(4));
        let taker = {
            let q = q.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(10));
                q.take(4).len()
            })
        };
        q.push(spans(3));
        assert_eq!(taker.join().unwrap(), 4);
        assert_eq!(q.len(), 3);
        assert_eq!(stats.spans_queue_dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn full_queue_drops_at_once_when_the_exporter_is_stuck() {
        let stats = Arc::new(Stats::default());
        let q = queue(4, &stats);
        *q.last_take.lock().unwrap() = Instant::now() - PROGRESS_WINDOW * 2;
        q.push(spans(4));
        let t = Instant::now();
        q.push(spans(3));
        assert!(t.elapsed() < BACKPRESSURE_WAIT, "did not wait");
        assert_eq!(q.len(), 4);
        assert_eq!(stats.spans_queue_dropped.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn full_queue_waits_only_so_long() {
        let stats = Arc::new(Stats::default());
        let q = queue(4, &stats);
        q.push(spans(4));
        let t = Instant::now();
        q.push(spans(2));
        assert!(t.elapsed() >= BACKPRESSURE_WAIT);
        assert_eq!(stats.spans_queue_dropped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn rate_limited_warn() {
        let mut r = RateLimited::new(Duration::from_secs(3600));
        assert!(r.warn(|| "first".into()));
        assert!(!r.warn(|| unreachable!("not formatted when suppressed")));
        assert_eq!(r.suppressed, 1);
    }
}
