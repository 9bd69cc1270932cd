//! Top-level wiring: the only module that knows about threads, the runtime and channels.
//!
//! ```text
//! kernel ring buffer ──(pipeline thread: decode → conn → span)──► SpanSender ──► export task
//! ```
//! The pipeline is one synchronous thread: every stage is plain code over owned state, so a
//! span costs no locks or channel hops until it is handed to the exporter in batches.
use std::{
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use agent_common::ConnId;
use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};

use crate::{
    cli::RunConfig,
    clock::BootClock,
    conn::{ConnLimits, ConnTable, Exchange, RequestStart},
    events::{self, Event, Reorder},
    export::{self, ExportConfig, SpanSender},
    metrics::Stats,
    probes::{LoadOptions, Probes},
    process::{Registry, Selector, select},
    span::{
        Span,
        assemble::{Assembler, LinkOptions},
        http::SpanOptions,
    },
};

/// Runs until SIGINT/SIGTERM, then flushes and detaches.
pub fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let selector = Selector::new(cfg.pids.clone(), cfg.exe.clone(), cfg.ports.clone())?;
    let registry = Registry::new().with_service_names(&cfg.service_names)?;
    let export_cfg = ExportConfig::from_env(cfg.output.map(Into::into))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sonde-export")
        .enable_all()
        .build()
        .context("starting the export runtime")?;
    let stats = Arc::new(Stats::default());

    let (mut probes, ring) = Probes::load(&LoadOptions {
        capture_bytes: cfg.capture_bytes,
        ring_bytes: cfg.ring_mib << 20,
        max_conns: cfg.max_conns,
        filter_pids: selector.is_filtering(),
        propagate: cfg.propagate,
    })?;
    if !probes.args_from_regs() {
        log::info!("data syscalls are hooked at entry and exit (arguments saved per thread)");
    }
    let self_pid = std::process::id();
    let mut selected = Default::default();
    if selector.is_filtering() {
        selected = selector.scan(Path::new("/proc"), self_pid);
        for &pid in &selected {
            probes.trace_pid(pid)?;
        }
    }
    log::info!(
        "sonde {} tracing {} ({} selected now); exporting to {}",
        env!("CARGO_PKG_VERSION"),
        selector.describe(),
        if selector.is_filtering() {
            selected.len().to_string()
        } else {
            "all".into()
        },
        export_cfg.describe()
    );

    let (sender, export_task) = {
        let _guard = rt.enter();
        let export = export::spawn(export_cfg, stats.clone());
        if let Some(addr) = cfg.metrics_addr {
            crate::metrics_server::spawn(addr, stats.clone())
                .with_context(|| format!("serving metrics on {addr} (--metrics-addr)"))?;
        }
        export
    };
    let stop = Arc::new(AtomicBool::new(false));
    let pipeline = Pipeline {
        conns: ConnTable::new(ConnLimits {
            max_conns: cfg.max_conns as usize,
            idle_timeout_ns: cfg.idle_timeout * 1_000_000_000,
            ..Default::default()
        }),
        registry,
        assembler: Assembler::with_links(
            BootClock::sample(),
            SpanOptions {
                redact_params: cfg.redact_params.clone(),
            },
            LinkOptions {
                same_host: !cfg.no_same_host_links,
                ..Default::default()
            },
        ),
        sender,
        stats: stats.clone(),
        probes,
        selector,
        selected,
        self_pid,
        drain: Duration::from_millis(cfg.drain_ms),
        hold_ns: cfg.reorder_ms * 1_000_000,
        stats_interval: Duration::from_secs(cfg.stats_interval),
        exchanges: Vec::with_capacity(1024),
        starts: Vec::with_capacity(64),
        spans: Vec::with_capacity(1024),
        dead_conns: Vec::new(),
        trace_sdk: cfg.trace_sdk_processes,
        sdk_skipped: Default::default(),
    };
    let stop_flag = stop.clone();
    let handle = std::thread::Builder::new()
        .name("sonde-pipeline".into())
        .spawn(move || pipeline.run(ring, &stop_flag))
        .context("starting the pipeline thread")?;

    rt.block_on(wait_for_signal())?;
    log::info!("stopping: flushing pending spans");
    stop.store(true, Ordering::Relaxed);
    let probes = handle
        .join()
        .map_err(|_| anyhow::anyhow!("pipeline thread panicked"))?;
    rt.block_on(export_task.shutdown());
    log::info!("{}", stats_line(&stats, &probes));
    drop(probes); // detaches every program
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

/// The periodic (and final) accounting line: every counter of every hop.
fn stats_line(stats: &Stats, probes: &Probes) -> String {
    refresh_kernel_counters(stats, probes);
    let parts: Vec<String> = stats
        .snapshot()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!("stats: {}", parts.join(" "))
}

fn refresh_kernel_counters(stats: &Stats, probes: &Probes) {
    if let Ok(mut k) = stats.kernel.lock() {
        *k = probes.counters();
    }
}

struct Pipeline {
    conns: ConnTable,
    registry: Registry,
    assembler: Assembler,
    sender: SpanSender,
    stats: Arc<Stats>,
    probes: Probes,
    selector: Selector,
    selected: std::collections::HashSet<u32>,
    self_pid: u32,
    drain: Duration,
    /// Reorder window (see `events::Reorder`).
    hold_ns: u64,
    stats_interval: Duration,
    exchanges: Vec<Exchange>,
    starts: Vec<RequestStart>,
    spans: Vec<Span>,
    /// Connections of a process that just exited (scratch).
    dead_conns: Vec<ConnId>,
    trace_sdk: bool,
    sdk_skipped: foldhash::HashSet<u32>,
}

impl Pipeline {
    fn run(mut self, mut ring: RingBuf<MapData>, stop: &AtomicBool) -> Probes {
        let mut reorder = Reorder::default();
        let mut last_expire = Instant::now();
        let mut last_scan = Instant::now();
        let mut last_stats = Instant::now();
        // Idle backoff: while nothing arrives, poll less often (up to 4× --drain-ms). The
        // kernel still wakes us early when the buffer fills, so bursts are not delayed.
        let mut wait = self.drain;
        // exec and fork events select new processes as they start; the scan of /proc only
        // catches what they cannot show (a process starting to listen on a --port, lost
        // events), or everything when those tracepoints are missing.
        let rescan_every = if self.selector.watches_ports() || !self.probes.sees_process_starts() {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(10)
        };
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            if !stopping {
                wait_readable(&ring, wait);
            }
            let before = reorder.len();
            while let Some(item) = ring.next() {
                // Process starts are acted on at once, not in timestamp order: the sooner a
                // new process is selected, the fewer of its first requests are missed.
                if events::is_process_start(&item) {
                    // A reused pid: the previous process with it ends (its last exchanges
                    // and Resource, its selection) before the new one is looked at.
                    if let Some(exit_ts) =
                        events::started_pid(&item).and_then(|p| reorder.held_exit(p))
                    {
                        reorder.release(exit_ts, |rec| self.handle(rec));
                    }
                    self.on_process_start(&item);
                } else {
                    reorder.push(&item);
                }
            }
            wait = if reorder.len() > before {
                self.drain
            } else {
                (wait * 2).min(self.drain * 4)
            };
            // Hold back what is younger than the reorder window, so that records committed
            // late by another CPU still take their place in timestamp order.
            let until = if stopping {
                u64::MAX
            } else {
                BootClock::now_monotonic_ns().saturating_sub(self.hold_ns)
            };
            let mut n = 0u32;
            let mut slice_start = Instant::now();
            reorder.release(until, |rec| {
                self.handle(rec);
                n += 1;
                // A drain can take milliseconds; a traced thread waiting for this CPU should
                // not wait that long. Yielding is a cheap syscall when nobody waits, and a
                // switch (the point) when somebody does.
                if n.is_multiple_of(4) && slice_start.elapsed() >= YIELD_AFTER {
                    std::thread::yield_now();
                    slice_start = Instant::now();
                }
            });
            self.flush();

            if stopping {
                self.conns.drain(&self.stats, &mut self.exchanges);
                self.assemble_pending();
                self.flush();
                return self.probes;
            }
            if last_expire.elapsed() >= Duration::from_secs(1) {
                last_expire = Instant::now();
                let now = BootClock::now_monotonic_ns();
                self.conns.expire(now, &self.stats, &mut self.exchanges);
                self.assemble_pending();
                self.flush();
                self.assembler.expire(now);
                self.assembler.refresh_clock();
                refresh_kernel_counters(&self.stats, &self.probes);
            }
            if self.selector.is_filtering() && last_scan.elapsed() >= rescan_every {
                last_scan = Instant::now();
                self.rescan();
            }
            if !self.stats_interval.is_zero() && last_stats.elapsed() >= self.stats_interval {
                last_stats = Instant::now();
                log::info!("{}", stats_line(&self.stats, &self.probes));
            }
        }
    }

    /// One record, all the way to spans: decode → connection table → identity decisions for
    /// requests that started → spans for exchanges that completed.
    fn handle(&mut self, record: &[u8]) {
        Stats::inc(&self.stats.events);
        let ev = match events::decode(record) {
            Ok(ev) => ev,
            Err(e) => {
                Stats::inc(&self.stats.decode_errors);
                log::debug!("undecodable event: {e}");
                return;
            }
        };
        if let Event::Open(o) = &ev {
            // Read the Resource while the process is surely alive (short-lived clients may be
            // gone by the time their exchange completes).
            self.registry.resource_or(o.conn.tgid, o.comm());
            self.check_sdk(o.conn.tgid);
        }
        if let Event::ProcessExit { tgid, .. } = ev {
            self.conns.conns_of(tgid, &mut self.dead_conns);
        }
        self.conns.on_event(&ev, &self.stats, &mut self.exchanges);
        self.conns.take_starts(&mut self.starts);
        for st in self.starts.drain(..) {
            self.assembler.on_start(&st);
        }
        self.assemble_pending();
        if let Event::ProcessExit { tgid, .. } = ev {
            // Spans already assembled keep their Arc<Resource>; the next process with this
            // pid is read afresh.
            self.registry.forget(tgid);
            self.assembler.forget_process(tgid);
            self.probes.forget_conns(&self.dead_conns);
            self.dead_conns.clear();
            if self.sdk_skipped.remove(&tgid) && !self.selector.is_filtering() {
                self.probes.forget_pid(tgid);
            }
            if self.selected.remove(&tgid) {
                self.probes.forget_pid(tgid);
            }
        }
        if self.spans.len() >= 1024 {
            self.flush();
        }
    }

    fn assemble_pending(&mut self) {
        for ex in self.exchanges.drain(..) {
            let tgid = ex.conn.tgid;
            let resource = self.registry.resource(tgid);
            let span = self.assembler.assemble(ex, resource);
            if self.sdk_skipped.contains(&tgid) {
                Stats::inc(&self.stats.sdk_spans_skipped);
                continue;
            }
            self.spans.push(span);
        }
    }

    /// A process running its own OpenTelemetry SDK already makes these spans: stop tracing
    /// it (unless asked to), so that no request is reported twice.
    fn check_sdk(&mut self, tgid: u32) {
        if self.trace_sdk || self.sdk_skipped.contains(&tgid) {
            return;
        }
        let Some(why) = self.registry.sdk(tgid) else {
            return;
        };
        log::info!(
            "pid {tgid} runs an OpenTelemetry SDK ({why}): not traced (--trace-sdk-processes traces it too)"
        );
        let res = if self.selector.is_filtering() {
            self.selected.remove(&tgid);
            self.probes.forget_pid(tgid);
            Ok(())
        } else {
            self.probes.exclude_pid(tgid)
        };
        if let Err(e) = res {
            log::warn!("cannot exclude pid {tgid}: {e}");
        }
        self.sdk_skipped.insert(tgid);
    }

    /// Hands the spans built so far to the exporter.
    fn flush(&mut self) {
        if self.spans.is_empty() {
            return;
        }
        Stats::add(&self.stats.spans, self.spans.len() as u64);
        self.sender.send(std::mem::take(&mut self.spans));
    }

    /// An exec or fork event (filter mode): select or drop that process now.
    fn on_process_start(&mut self, record: &[u8]) {
        Stats::inc(&self.stats.events);
        let pid = match events::decode(record) {
            Ok(Event::ProcessExec { tgid }) => {
                // A new executable: its Resource (service name, ...) is read afresh.
                self.registry.forget(tgid);
                tgid
            }
            Ok(Event::ProcessFork { parent, child }) if self.selected.contains(&parent) => child,
            Ok(_) => return,
            Err(e) => {
                Stats::inc(&self.stats.decode_errors);
                log::debug!("undecodable event: {e}");
                return;
            }
        };
        if self.selector.is_filtering() {
            self.decide_started(pid);
        }
    }

    /// Selects `pid` if it now matches, or drops it if it no longer does. A newly selected
    /// process has its children decided too: the kernel reports forks of traced processes
    /// only, so children forked before sonde marked the parent (it saw the exec late) are
    /// caught here.
    fn decide_started(&mut self, pid: u32) {
        let proc_root = Path::new("/proc");
        let mut todo = vec![pid];
        // At most this many children are looked at; the periodic rescan finds the rest.
        let mut budget = 256usize;
        while let Some(pid) = todo.pop() {
            if pid == self.self_pid || self.sdk_skipped.contains(&pid) {
                continue;
            }
            if !self.selector.matches(proc_root, pid) {
                if self.selected.remove(&pid) {
                    self.probes.forget_pid(pid);
                }
                continue;
            }
            if self.selected.insert(pid) {
                start_tracing(&mut self.probes, pid, " (started)");
                // Read its Resource while it surely runs: a short-lived process may be gone
                // by the time its first connection is handled.
                self.registry.resource(pid);
                let children = select::children(proc_root, pid);
                let take = children.len().min(budget);
                budget -= take;
                todo.extend_from_slice(&children[..take]);
            }
        }
    }

    fn rescan(&mut self) {
        let mut now = self.selector.scan(Path::new("/proc"), self.self_pid);
        now.retain(|p| !self.sdk_skipped.contains(p));
        for &pid in now.difference(&self.selected) {
            start_tracing(&mut self.probes, pid, "");
        }
        for &pid in self.selected.difference(&now) {
            self.probes.forget_pid(pid);
        }
        self.selected = now;
    }
}

/// Adds `pid` to the kernel's traced set; `why` ends the log line.
fn start_tracing(probes: &mut Probes, pid: u32, why: &str) {
    match probes.trace_pid(pid) {
        Ok(()) => log::info!("tracing pid {pid}{why}"),
        Err(e) => log::warn!("cannot select pid {pid}: {e}"),
    }
}

/// Longest stretch of event handling before the pipeline yields the CPU.
const YIELD_AFTER: Duration = Duration::from_micros(50);

/// Waits until the ring buffer signals data or `timeout` passes. The kernel side suppresses
/// wakeups except when the buffer fills, so the timeout is the normal drain cadence.
fn wait_readable(ring: &RingBuf<MapData>, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: ring.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd. EINTR and errors just mean "drain now".
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
}
