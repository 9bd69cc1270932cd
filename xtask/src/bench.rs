//! Benchmarks (not tests): figures and ratios measured side by side in one run, printed as a
//! Markdown report (also written to `target/bench-report.md`).
//!
//! 1. Cost per request at fixed rates: nginx (keep-alive, `return 200`) driven by a
//!    rate-limited generator, without and with `sonde run --exe <nginx> --output otlp`
//!    exporting to a lean local OTLP/HTTP receiver (spans counted). CPU from
//!    /proc/PID/task/*/schedstat (ns), cross-checked with utime+stime of /proc/PID/stat.
//! 2. Saturation: nginx + wrk, no sonde / hooks attached but matching nothing / tracing,
//!    alternating rounds, medians.
//! 3. Pipeline: recorded events replayed through reassembly → parse → span → OTLP encode on
//!    one thread (`agent/examples/bench.rs pipeline`).
//! 4. Export throughput over gRPC and HTTP/protobuf (`agent/examples/bench.rs export`), and
//!    sonde's RSS idle and with 10k open connections.
mod load;
mod procs;
mod receiver;
mod report;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{setup, util};
use load::{Histogram, LoadResult};
use procs::{Cpu, Nginx, Proc, Sonde, SondeStats};
use receiver::Receiver;

/// What to run; `--quick` is a shorter smoke run of everything.
struct Plan {
    rates: Vec<u64>,
    rate_secs: u64,
    /// Rounds per rate, alternating the order (without, with / with, without); the
    /// with − without differences are taken per round and their median reported.
    rate_rounds: usize,
    /// Runs per rate with BPF statistics on (median reported).
    bpf_runs: usize,
    /// Keep-alive connections of the fixed-rate generator.
    conns: usize,
    sat_rounds: usize,
    sat_secs: u64,
    pipeline_exchanges: usize,
    pipeline_reps: usize,
    export_spans: usize,
    hold_conns: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                rates: vec![10_000, 50_000],
                rate_secs: 3,
                rate_rounds: 1,
                bpf_runs: 1,
                conns: 16,
                sat_rounds: 1,
                sat_secs: 3,
                pipeline_exchanges: 100_000,
                pipeline_reps: 1,
                export_spans: 50_000,
                hold_conns: 10_000,
            }
        } else {
            Plan {
                rates: vec![2_000, 10_000, 50_000],
                rate_secs: 5,
                rate_rounds: 6,
                bpf_runs: 3,
                conns: 16,
                sat_rounds: 3,
                sat_secs: 10,
                pipeline_exchanges: 200_000,
                pipeline_reps: 3,
                export_spans: 200_000,
                hold_conns: 10_000,
            }
        }
    }
}

pub fn run(quick: bool, rates_only: &[u64], saturation_only: bool) -> Result<()> {
    let started = Instant::now();
    setup::setup(true)?;
    let sonde = setup::build_release()?;
    let mut plan = Plan::new(quick);
    // SONDE_BENCH_BIN: another sonde build to measure, for an A/B of a change (partial runs).
    let other = std::env::var_os("SONDE_BENCH_BIN").map(PathBuf::from);
    if !rates_only.is_empty() {
        plan.rates = rates_only.to_vec();
        return only_rates(&plan, &other.unwrap_or(sonde));
    }
    if saturation_only {
        return only_saturation(&plan, &other.unwrap_or(sonde));
    }
    let example = build_example()?;
    let nofile = procs::raise_nofile(65_536)?;
    if (plan.hold_conns as u64) + 1024 > nofile {
        bail!(
            "RLIMIT_NOFILE is {nofile}: too low for {} connections",
            plan.hold_conns
        );
    }

    let machine = procs::machine();
    eprintln!("bench: {machine}");
    let nginx = Nginx::start(nofile)?;
    let rx = Receiver::start()?;
    let wrk = wrk_version();
    let header = format!(
        "Machine: {machine}.  \nnginx {} (1 worker), {wrk}; all traffic on 127.0.0.1; sonde \
         exports OTLP/HTTP (protobuf, uncompressed, default batching) to a local receiver that \
         counts spans. Run: `cargo xtask bench{}`. Other jobs may share this machine: figures \
         are as measured, not cleaned up.",
        nginx.version,
        if quick { " --quick" } else { "" }
    );

    let mut raw = String::new();
    let fixed = fixed_rates(&plan, &sonde, &nginx, &rx, &mut raw)?;
    let sat = saturation(&plan, &sonde, &nginx, &rx, &mut raw)?;
    let pipe = pipeline(&plan, &example)?;
    let export = export(&plan, &example)?;
    let mem = memory(&plan, &sonde, &nginx, &rx)?;
    if rx.rejected() > 0 {
        let line = format!(
            "- warning: the OTLP receiver rejected {} export requests (not counted)",
            rx.rejected()
        );
        eprintln!("bench: {line}");
        raw.push_str(&line);
        raw.push('\n');
    }
    drop(rx);
    drop(nginx);

    let report = report::render(
        &plan, &header, &fixed, &sat, &pipe, &export, &mem, &raw, started,
    );
    println!("{report}");
    let path = util::workspace_root().join("target/bench-report.md");
    fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "bench: report written to {} ({:.0} s in all)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// nginx and the receiver for a partial run.
fn partial_rig() -> Result<(Nginx, Receiver)> {
    let nofile = procs::raise_nofile(65_536)?;
    Ok((Nginx::start(nofile)?, Receiver::start()?))
}

/// `--rates-only`: the fixed-rate runs alone: their per-run lines, then per rate the figures
/// over all its rounds.
fn only_rates(plan: &Plan, sonde: &Path) -> Result<()> {
    let (nginx, rx) = partial_rig()?;
    let mut raw = String::new();
    let rows = fixed_rates(plan, sonde, &nginx, &rx, &mut raw)?;
    for r in &rows {
        println!(
            "{} req/s: sonde {:.2} µs/req, nginx {:.2} → {:.2} µs/req (added {}), BPF {:.2} \
             µs/req ({:.2} on nginx's syscalls), p99 {:.1} → {:.1} µs (added {})",
            r.rate,
            r.with.per_req_us(r.with.sonde_cpu.sched_ns),
            r.without.per_req_us(r.without.nginx_cpu.sched_ns),
            r.with.per_req_us(r.with.nginx_cpu.sched_ns),
            r.added_text(0, 2),
            r.bpf_us().unwrap_or(f64::NAN),
            r.nginx_bpf_us().unwrap_or(f64::NAN),
            r.without.p(0.99),
            r.with.p(0.99),
            r.added_text(2, 1),
        );
    }
    Ok(())
}

/// `--saturation-only`: the saturation rounds alone, then the median ratios.
fn only_saturation(plan: &Plan, sonde: &Path) -> Result<()> {
    let (nginx, rx) = partial_rig()?;
    let mut raw = String::new();
    let sat = saturation(plan, sonde, &nginx, &rx, &mut raw)?;
    let base = sat.get(&Mode::NoSonde).map_or(0.0, SatMode::median_rps);
    for (mode, m) in &sat {
        println!(
            "{}: median {:.0} req/s, ratio {:.3}; {} spans / {} requests",
            mode.label(),
            m.median_rps(),
            m.median_rps() / base,
            m.spans,
            m.requests
        );
    }
    Ok(())
}

/// Builds `agent/examples/bench.rs` in release mode. Same PATH as `setup::build_release`
/// (bpf-linker first): the agent's build script watches PATH, so a different one would
/// rebuild the kernel programs each time.
fn build_example() -> Result<PathBuf> {
    let root = util::workspace_root();
    let sysroot = util::output(
        Command::new("rustc")
            .current_dir(&root)
            .args(["--print", "sysroot"]),
    )?;
    let toolchain = Path::new(sysroot.trim())
        .file_name()
        .context("odd sysroot")?
        .to_string_lossy()
        .into_owned();
    let mut paths = vec![
        setup::tools_dir()
            .join(format!("bpf-linker-{toolchain}"))
            .join("bin"),
    ];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    util::run(
        util::cargo()
            .current_dir(&root)
            .env("PATH", std::env::join_paths(paths)?)
            .args(["build", "--release", "-p", "agent", "--example", "bench"]),
    )?;
    Ok(root.join("target/release/examples/bench"))
}

fn wrk_version() -> String {
    Command::new("wrk")
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let first = text.lines().next()?.to_string();
            Some(first.split(" [").next().unwrap_or(&first).to_string())
        })
        .unwrap_or_else(|| "wrk".into())
}

/// `--exe` selecting exactly our nginx.
fn select_nginx(nginx: &Nginx) -> Vec<String> {
    vec!["--exe".into(), nginx.exe.to_string_lossy().into_owned()]
}

// ---- 1. fixed rates ---------------------------------------------------------------------

#[derive(Default)]
struct RateSide {
    requests: u64,
    errors: u64,
    late: u64,
    secs: f64,
    hist: Histogram,
    client_cpu_ns: u64,
    nginx_cpu: Cpu,
    sonde_cpu: Cpu,
    spans: u64,
    stats: SondeStats,
    /// Per round: nginx CPU per request (µs), p50 and p99 (µs).
    rounds: Vec<[f64; 3]>,
    /// Per round: cores other jobs used meanwhile.
    foreign: Vec<f64>,
}

impl RateSide {
    fn add(&mut self, l: &LoadResult, nginx_cpu: Cpu, foreign: f64) {
        self.foreign.push(foreign);
        self.rounds.push([
            nginx_cpu.ns() as f64 / 1e3 / l.ok.max(1) as f64,
            l.hist.quantile(0.5) as f64 / 1e3,
            l.hist.quantile(0.99) as f64 / 1e3,
        ]);
        self.requests += l.ok;
        self.errors += l.errors;
        self.late += l.late;
        self.secs += l.wall.as_secs_f64();
        self.hist.merge(&l.hist);
        self.client_cpu_ns += l.client_cpu_ns;
        self.nginx_cpu = self.nginx_cpu + nginx_cpu;
    }

    fn per_req_us(&self, ns: u64) -> f64 {
        ns as f64 / 1e3 / self.requests.max(1) as f64
    }

    /// The generator fell behind its schedule (> 1% of requests sent > 1 ms late), or other
    /// jobs took more than 0.2 cores in some round.
    fn disturbed(&self) -> bool {
        self.late * 100 > self.requests + self.errors
            || self.foreign.iter().any(|&f| f > FOREIGN_LIMIT)
    }

    fn foreign_max(&self) -> f64 {
        self.foreign.iter().copied().fold(0.0, f64::max)
    }

    /// Share of requests sent more than 1 ms after their due time, and errors if any.
    fn late_share(&self) -> String {
        let mut s = format!(
            "{:.1}%",
            100.0 * self.late as f64 / (self.requests + self.errors).max(1) as f64
        );
        if self.errors > 0 {
            let _ = write!(s, " ({} errors)", self.errors);
        }
        s
    }

    fn p(&self, q: f64) -> f64 {
        self.hist.quantile(q) as f64 / 1e3
    }
}

struct RateRow {
    rate: u64,
    without: RateSide,
    with: RateSide,
    /// From extra runs with BPF statistics on.
    bpf: Vec<BpfRun>,
}

/// Run time of sonde's programs in a run with BPF statistics on.
struct BpfRun {
    /// All programs, every process's syscalls.
    ns: u64,
    /// Programs on the syscalls nginx serves with (`recvfrom`, `writev`); the generator uses
    /// `read`/`write`, so these runs are nginx's.
    nginx_ns: u64,
    requests: u64,
}

/// Syscalls nginx serves a keep-alive `return 200` with (and the generator never makes).
const NGINX_SYSCALLS: [&str; 2] = ["recvfrom", "writev"];

impl RateRow {
    /// Median over the BPF runs of all programs' run time per request (µs).
    fn bpf_us(&self) -> Option<f64> {
        self.bpf_median(|b| b.ns)
    }

    /// Median over the BPF runs of the run time on nginx's syscalls per request (µs).
    fn nginx_bpf_us(&self) -> Option<f64> {
        self.bpf_median(|b| b.nginx_ns)
    }

    fn bpf_median(&self, ns: impl Fn(&BpfRun) -> u64) -> Option<f64> {
        let v: Vec<f64> = self
            .bpf
            .iter()
            .map(|b| ns(b) as f64 / 1e3 / b.requests.max(1) as f64)
            .collect();
        (!v.is_empty()).then(|| median(&v))
    }

    /// Per round, with − without of figure `i` (see `RateSide::rounds`): the two runs of a
    /// round are back to back, so slow drifts of the machine cancel out.
    fn paired(&self, i: usize) -> Vec<f64> {
        self.with
            .rounds
            .iter()
            .zip(&self.without.rounds)
            .map(|(w, wo)| w[i] - wo[i])
            .collect()
    }

    /// Median of the paired differences of figure `i`.
    fn added(&self, i: usize) -> f64 {
        median(&self.paired(i))
    }

    /// The paired differences of figure `i` as "median (min … max)".
    fn added_text(&self, i: usize, digits: usize) -> String {
        let v = self.paired(i);
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{:+.digits$} ({lo:+.digits$} … {hi:+.digits$})", median(&v))
    }

    /// Whether the middle half of the paired differences of figure `i` spans more than
    /// `target`: the machine's noise then exceeds what is measured.
    fn noisy(&self, i: usize, target: f64) -> bool {
        let mut v = self.paired(i);
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        v.is_empty()
            || q(0.75) - q(0.25) > target
            || median(&v) < -target
            || self.without.disturbed()
            || self.with.disturbed()
    }
}

/// Cores other jobs may take during a run before a comparison is called noisy.
const FOREIGN_LIMIT: f64 = 0.2;

fn fixed_rates(
    plan: &Plan,
    sonde: &Path,
    nginx: &Nginx,
    rx: &Receiver,
    raw: &mut String,
) -> Result<Vec<RateRow>> {
    let dur = Duration::from_secs(plan.rate_secs);
    let mut rows = Vec::new();
    for &rate in &plan.rates {
        let mut row = RateRow {
            rate,
            without: RateSide::default(),
            with: RateSide::default(),
            bpf: Vec::new(),
        };
        for round in 0..plan.rate_rounds {
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for traced in order {
                eprintln!(
                    "bench: [1] {rate} req/s for {} s, {} sonde (round {})",
                    plan.rate_secs,
                    if traced { "with" } else { "without" },
                    round + 1
                );
                if !traced {
                    let (n0, w) = (nginx.cpu(), procs::Window::start());
                    let l = load::fixed_rate(nginx.port, rate, dur, plan.conns)?;
                    let n = nginx.cpu().since(&n0);
                    let foreign = w.foreign_cores(n.ns());
                    log_rate_run(raw, rate, "without", &l, n, foreign, None);
                    row.without.add(&l, n, foreign);
                    continue;
                }
                rx.reset();
                let s = Sonde::start(sonde, &select_nginx(nginx), &rx.endpoint())?;
                std::thread::sleep(Duration::from_millis(300));
                let (c0, n0, w) = (Cpu::of(s.pid()), nginx.cpu(), procs::Window::start());
                let l = load::fixed_rate(nginx.port, rate, dur, plan.conns)?;
                let n = nginx.cpu().since(&n0);
                let foreign = w.foreign_cores(n.ns() + Cpu::of(s.pid()).since(&c0).ns());
                // Every span exported (sonde sends a batch at least every second).
                rx.settle(l.ok, Duration::from_secs(3));
                let c = Cpu::of(s.pid()).since(&c0);
                let stats = s.stop()?;
                let spans = rx.spans();
                log_rate_run(raw, rate, "with", &l, n, foreign, Some((c, spans, &stats)));
                row.with.add(&l, n, foreign);
                row.with.sonde_cpu = row.with.sonde_cpu + c;
                row.with.spans += spans;
                procs::add_stats(&mut row.with.stats, &stats);
            }
        }
        for _ in 0..plan.bpf_runs {
            match bpf_run(plan, rate, sonde, nginx, rx, raw)? {
                Some(b) => row.bpf.push(b),
                None => break,
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

/// One more run with sonde and the kernel's BPF run-time statistics on (they cost a little
/// themselves, so the runs above go without): time spent in sonde's programs per request.
/// Every hooked syscall on the machine counts (the generator's and other jobs' ones are
/// filtered out early but still run the program), so this bounds nginx's share from above.
fn bpf_run(
    plan: &Plan,
    rate: u64,
    sonde: &Path,
    nginx: &Nginx,
    rx: &Receiver,
    raw: &mut String,
) -> Result<Option<BpfRun>> {
    let stats_on = match procs::BpfStats::enable() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench: no BPF run-time statistics: {e}");
            return Ok(None);
        }
    };
    let secs = plan.rate_secs.min(5);
    eprintln!("bench: [1] {rate} req/s for {secs} s, with sonde and BPF run-time statistics");
    rx.reset();
    let s = Sonde::start(sonde, &select_nginx(nginx), &rx.endpoint())?;
    std::thread::sleep(Duration::from_millis(300));
    let before = procs::bpf_run_time(s.pid());
    let l = load::fixed_rate(nginx.port, rate, Duration::from_secs(secs), plan.conns)?;
    let after = procs::bpf_run_time(s.pid());
    drop(stats_on);
    rx.settle(l.ok, Duration::from_secs(3));
    let stats = s.stop()?;
    // Per program: (name, ns, runs) over the load.
    let progs: Vec<(String, u64, u64)> = after
        .iter()
        .map(|(name, &(ns, runs))| {
            let (ns0, runs0) = before.get(name).copied().unwrap_or_default();
            (name.clone(), ns - ns0, runs - runs0)
        })
        .filter(|p| p.2 > 0)
        .collect();
    let ns: u64 = progs.iter().map(|p| p.1).sum();
    let runs: u64 = progs.iter().map(|p| p.2).sum();
    let nginx_ns: u64 = progs
        .iter()
        .filter(|p| NGINX_SYSCALLS.iter().any(|s| p.0.contains(s)))
        .map(|p| p.1)
        .sum();
    let per_prog: Vec<String> = progs
        .iter()
        .map(|(name, ns, runs)| {
            format!(
                "{name} {:.2}×{:.0} ns",
                *runs as f64 / l.ok.max(1) as f64,
                *ns as f64 / (*runs).max(1) as f64
            )
        })
        .collect();
    let line = format!(
        "- {rate} req/s with sonde, BPF statistics on: {} ok; sonde's programs ran {runs} times \
         ({:.1} per request) for {:.2} ms = {:.2} µs per request, {:.2} µs of it on nginx's \
         {} (runs per request × ns per run: {}); {} spans; {}; losses: {}",
        l.ok,
        runs as f64 / l.ok.max(1) as f64,
        ns as f64 / 1e6,
        ns as f64 / 1e3 / l.ok.max(1) as f64,
        nginx_ns as f64 / 1e3 / l.ok.max(1) as f64,
        NGINX_SYSCALLS.join(" + "),
        per_prog.join(", "),
        rx.spans(),
        procs::summary(&stats),
        procs::losses(&stats)
    );
    eprintln!("bench: {line}");
    raw.push_str(&line);
    raw.push('\n');
    Ok(Some(BpfRun {
        ns,
        nginx_ns,
        requests: l.ok,
    }))
}

fn log_rate_run(
    raw: &mut String,
    rate: u64,
    side: &str,
    l: &LoadResult,
    nginx: Cpu,
    foreign: f64,
    sonde: Option<(Cpu, u64, &SondeStats)>,
) {
    let per = |ns: u64| ns as f64 / 1e3 / l.ok.max(1) as f64;
    let mut line = format!(
        "- {rate} req/s {side} sonde: {} ok, {} errors, {} late, {:.2} s; p50 {:.1} µs, p99 \
         {:.1} µs; nginx {:.2} µs/req ({:.2} by ticks); client {:.2} µs/req; other jobs \
         {foreign:.2} cores",
        l.ok,
        l.errors,
        l.late,
        l.wall.as_secs_f64(),
        l.hist.quantile(0.5) as f64 / 1e3,
        l.hist.quantile(0.99) as f64 / 1e3,
        per(nginx.sched_ns),
        per(nginx.ticks_ns),
        per(l.client_cpu_ns),
    );
    if let Some((c, spans, stats)) = sonde {
        let _ = write!(
            line,
            "; sonde {:.2} µs/req ({:.2} by ticks); {spans} spans received; {}; losses: {}",
            per(c.sched_ns),
            per(c.ticks_ns),
            procs::summary(stats),
            procs::losses(stats)
        );
    }
    eprintln!("bench: {line}");
    raw.push_str(&line);
    raw.push('\n');
}

// ---- 2. saturation ----------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    NoSonde,
    Hooks,
    Tracing,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::NoSonde => "no sonde",
            Mode::Hooks => "hooks only (sonde --pid <idle process>)",
            Mode::Tracing => "tracing nginx, exporting OTLP",
        }
    }
}

#[derive(Default)]
struct SatMode {
    rps: Vec<f64>,
    requests: u64,
    spans: u64,
    sonde_cores: Vec<f64>,
    stats: SondeStats,
    /// Rounds in which spans < requests.
    short_rounds: usize,
    /// Per round: cores other jobs used meanwhile.
    foreign: Vec<f64>,
}

impl SatMode {
    fn median_rps(&self) -> f64 {
        median(&self.rps)
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

fn saturation(
    plan: &Plan,
    sonde: &Path,
    nginx: &Nginx,
    rx: &Receiver,
    raw: &mut String,
) -> Result<BTreeMap<Mode, SatMode>> {
    let idle = Proc::spawn("sleep", Command::new("sleep").arg("100000"))?;
    let modes = [Mode::NoSonde, Mode::Hooks, Mode::Tracing];
    let mut out: BTreeMap<Mode, SatMode> = BTreeMap::new();
    for round in 0..plan.sat_rounds {
        for i in 0..modes.len() {
            // Rotate the order every round so that no mode always runs first.
            let mode = modes[(i + round) % modes.len()];
            eprintln!(
                "bench: [2] saturation round {}: {}, wrk -t1 -c50 -d{}s",
                round + 1,
                mode.label(),
                plan.sat_secs
            );
            rx.reset();
            let s = match mode {
                Mode::NoSonde => None,
                Mode::Hooks => Some(Sonde::start(
                    sonde,
                    &["--pid".into(), idle.pid().to_string()],
                    &rx.endpoint(),
                )?),
                Mode::Tracing => Some(Sonde::start(sonde, &select_nginx(nginx), &rx.endpoint())?),
            };
            if s.is_some() {
                std::thread::sleep(Duration::from_millis(300));
            }
            let c0 = s.as_ref().map(|s| Cpu::of(s.pid()));
            let (n0, w) = (nginx.cpu(), procs::Window::start());
            let (requests, secs, rps) = wrk(nginx.port, plan.sat_secs)?;
            let sonde_ns = match (&s, c0) {
                (Some(s), Some(c0)) => Cpu::of(s.pid()).since(&c0).ns(),
                _ => 0,
            };
            let foreign = w.foreign_cores(nginx.cpu().since(&n0).ns() + sonde_ns);
            let cores = sonde_ns as f64 / 1e9 / secs;
            let m = out.entry(mode).or_default();
            m.rps.push(rps);
            m.requests += requests;
            m.foreign.push(foreign);
            let mut line = format!(
                "- saturation round {}, {}: {requests} requests in {secs:.2} s = {rps:.0} req/s; \
                 other jobs {foreign:.2} cores",
                round + 1,
                mode.label()
            );
            if let Some(s) = s {
                if mode == Mode::Tracing {
                    rx.settle(requests, Duration::from_secs(3));
                }
                let stats = s.stop()?;
                m.sonde_cores.push(cores);
                let _ = write!(line, "; sonde {cores:.2} cores");
                if mode == Mode::Tracing {
                    let spans = rx.spans();
                    m.spans += spans;
                    if spans < requests {
                        m.short_rounds += 1;
                    }
                    let _ = write!(
                        line,
                        "; {spans} spans received in {} OTLP requests; {}; losses: {}",
                        rx.requests(),
                        procs::summary(&stats),
                        procs::losses(&stats)
                    );
                }
                procs::add_stats(&mut m.stats, &stats);
            }
            eprintln!("bench: {line}");
            raw.push_str(&line);
            raw.push('\n');
        }
    }
    drop(idle);
    Ok(out)
}

/// Runs wrk; returns (requests, seconds, requests/s).
fn wrk(port: u16, secs: u64) -> Result<(u64, f64, f64)> {
    let out = util::output(Command::new("wrk").args([
        "-t1",
        "-c50",
        &format!("-d{secs}s"),
        &format!("http://127.0.0.1:{port}/ok"),
    ]))?;
    let line = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .with_context(|| format!("no request count in wrk's output:\n{out}"))?;
    let mut words = line.split_whitespace();
    let requests: u64 = words.next().unwrap_or("").parse()?;
    let dur = words.nth(2).unwrap_or("").trim_end_matches(',').to_string();
    let secs = parse_wrk_duration(&dur).with_context(|| format!("wrk duration {dur:?}"))?;
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(requests as f64 / secs);
    if out.contains("Non-2xx") || out.contains("Socket errors") {
        eprintln!("bench: wrk reported errors:\n{out}");
    }
    Ok((requests, secs, rps))
}

fn parse_wrk_duration(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (v, unit) = s.split_at(split);
    let v: f64 = v.parse().ok()?;
    Some(match unit {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return None,
    })
}

// ---- 3. pipeline, 4. export ---------------------------------------------------------------

type Fields = BTreeMap<String, String>;

/// Runs the example with `args`, echoes its output, returns its `RESULT` lines' fields.
fn run_example(example: &Path, args: &[&str]) -> Result<Vec<Fields>> {
    let out = util::output(Command::new(example).args(args))?;
    let mut results = Vec::new();
    for line in out.lines() {
        match line.strip_prefix("RESULT ") {
            Some(r) => results.push(
                r.split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            None => eprintln!("bench:   {line}"),
        }
    }
    if results.is_empty() {
        bail!("{} {args:?} printed no RESULT line", example.display());
    }
    Ok(results)
}

fn num(f: &Fields, k: &str) -> f64 {
    f.get(k).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

fn pipeline(plan: &Plan, example: &Path) -> Result<Fields> {
    eprintln!(
        "bench: [3] pipeline replay, {} exchanges over 100 connections",
        plan.pipeline_exchanges
    );
    let n = plan.pipeline_exchanges.to_string();
    let reps = plan.pipeline_reps.to_string();
    let mut r = run_example(
        example,
        &[
            "pipeline",
            "--exchanges",
            &n,
            "--conns",
            "100",
            "--reps",
            &reps,
        ],
    )?;
    Ok(r.remove(0))
}

fn export(plan: &Plan, example: &Path) -> Result<Vec<Fields>> {
    let n = plan.export_spans.to_string();
    let mut out = Vec::new();
    for (protocol, compression) in [
        ("grpc", "none"),
        ("http/protobuf", "none"),
        ("grpc", "gzip"),
        ("http/protobuf", "gzip"),
    ] {
        eprintln!("bench: [4] export {protocol} ({compression}), {n} spans");
        let mut r = run_example(
            example,
            &[
                "export",
                "--spans",
                &n,
                "--protocol",
                protocol,
                "--compression",
                compression,
            ],
        )?;
        out.push(r.remove(0));
    }
    Ok(out)
}

// ---- 4. memory --------------------------------------------------------------------------

struct Memory {
    idle_kib: u64,
    idle_anon_kib: u64,
    idle_cpu_ms_per_s: f64,
    wave1_kib: u64,
    wave1_anon_kib: u64,
    wave2_kib: u64,
    wave2_anon_kib: u64,
    closed_kib: u64,
    peak_kib: u64,
    conns: usize,
    spans: u64,
    stats: SondeStats,
}

fn memory(plan: &Plan, sonde: &Path, nginx: &Nginx, rx: &Receiver) -> Result<Memory> {
    let n = plan.hold_conns;
    eprintln!("bench: [4] sonde memory: idle, then {n} open connections (twice)");
    rx.reset();
    let s = Sonde::start(sonde, &select_nginx(nginx), &rx.endpoint())?;
    let pid = s.pid();
    let kib = |f: &str| procs::status_kib(pid, f).unwrap_or(0);
    std::thread::sleep(Duration::from_secs(1));
    let c0 = Cpu::of(pid);
    let idle_secs = 3.0;
    std::thread::sleep(Duration::from_secs_f64(idle_secs));
    let idle_cpu_ms_per_s = Cpu::of(pid).since(&c0).ns() as f64 / 1e6 / idle_secs;
    let (idle_kib, idle_anon_kib) = (kib("VmRSS"), kib("RssAnon"));
    let settle = Duration::from_secs(2);

    let conns = load::open_connections(nginx.port, n, 500)?;
    std::thread::sleep(settle);
    let (wave1_kib, wave1_anon_kib) = (kib("VmRSS"), kib("RssAnon"));
    drop(conns);
    std::thread::sleep(Duration::from_secs(1));
    let conns = load::open_connections(nginx.port, n, 500)?;
    std::thread::sleep(settle);
    let (wave2_kib, wave2_anon_kib) = (kib("VmRSS"), kib("RssAnon"));
    drop(conns);
    std::thread::sleep(Duration::from_secs(1));
    let closed_kib = kib("VmRSS");
    let peak_kib = kib("VmHWM");
    rx.settle(2 * n as u64, Duration::from_secs(3));
    let stats = s.stop()?;
    let m = Memory {
        idle_kib,
        idle_anon_kib,
        idle_cpu_ms_per_s,
        wave1_kib,
        wave1_anon_kib,
        wave2_kib,
        wave2_anon_kib,
        closed_kib,
        peak_kib,
        conns: n,
        spans: rx.spans(),
        stats,
    };
    eprintln!(
        "bench: RSS idle {} KiB, {n} conns {} KiB, again {} KiB, closed {} KiB, peak {} KiB; \
         {} spans received for {} requests; {}; losses: {}",
        m.idle_kib,
        m.wave1_kib,
        m.wave2_kib,
        m.closed_kib,
        m.peak_kib,
        m.spans,
        2 * n,
        procs::summary(&m.stats),
        procs::losses(&m.stats)
    );
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(rounds: &[[f64; 3]]) -> RateSide {
        RateSide {
            rounds: rounds.to_vec(),
            foreign: vec![0.0; rounds.len()],
            ..Default::default()
        }
    }

    #[test]
    fn added_is_the_median_of_per_round_differences() {
        // One round where the machine hiccupped during the traced run: the pooled figures
        // would carry it, the paired median does not.
        let row = RateRow {
            rate: 2000,
            without: side(&[[10.0, 20.0, 60.0], [11.0, 21.0, 70.0], [10.5, 20.5, 65.0]]),
            with: side(&[[11.0, 21.0, 70.0], [16.0, 22.0, 190.0], [11.5, 21.5, 80.0]]),
            bpf: Vec::new(),
        };
        assert_eq!(row.paired(0), vec![1.0, 5.0, 1.0]);
        assert_eq!(row.added(0), 1.0);
        assert_eq!(row.added(2), 15.0);
        assert_eq!(row.added_text(2, 1), "+15.0 (+10.0 … +120.0)");
        // p99 differences 10, 120, 15: the middle half spans 110 µs, more than the target.
        assert!(row.noisy(2, 25.0));
        assert!(!row.noisy(1, 5.0));
        assert_eq!(row.bpf_us(), None);
    }
}
