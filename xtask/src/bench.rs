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
mod rates;
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
use procs::{Cpu, Nginx, Proc, Sonde, SondeStats};
use rates::{FOREIGN_LIMIT, RateRow, fixed_rates};
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
    // SONDE_BENCH_RATE_SECS (with --rates-only): longer runs, e.g. to profile a steady sonde
    // with perf. Checked before the set-up and build.
    let rate_secs = match std::env::var("SONDE_BENCH_RATE_SECS") {
        Ok(v) => Some(
            v.parse()
                .ok()
                .filter(|&s: &u64| s > 0)
                .with_context(|| format!("SONDE_BENCH_RATE_SECS={v:?}: want whole seconds > 0"))?,
        ),
        Err(_) => None,
    };
    setup::setup(true)?;
    let sonde = setup::build_release()?;
    let mut plan = Plan::new(quick);
    // SONDE_BENCH_BIN: another sonde build to measure, for an A/B of a change (partial runs).
    let other = std::env::var_os("SONDE_BENCH_BIN").map(PathBuf::from);
    if !rates_only.is_empty() {
        plan.rates = rates_only.to_vec();
        if let Some(secs) = rate_secs {
            plan.rate_secs = secs;
        }
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
