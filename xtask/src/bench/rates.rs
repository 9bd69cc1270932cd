//! Part 1 of the benchmark, cost per request at fixed rates: paired rounds without and with
//! sonde, and extra runs with the kernel's BPF run-time statistics on.
use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::Result;

use super::load::{self, Histogram, LoadResult};
use super::procs::{self, Cpu, Nginx, Sonde, SondeStats};
use super::receiver::Receiver;
use super::{Plan, median, select_nginx};

#[derive(Default)]
pub(super) struct RateSide {
    pub(super) requests: u64,
    pub(super) errors: u64,
    pub(super) late: u64,
    pub(super) secs: f64,
    hist: Histogram,
    pub(super) client_cpu_ns: u64,
    pub(super) nginx_cpu: Cpu,
    pub(super) sonde_cpu: Cpu,
    pub(super) spans: u64,
    pub(super) stats: SondeStats,
    /// Per round: nginx CPU per request (µs), p50 and p99 (µs).
    pub(super) rounds: Vec<[f64; 3]>,
    /// Per round: cores other jobs used meanwhile.
    pub(super) foreign: Vec<f64>,
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

    pub(super) fn per_req_us(&self, ns: u64) -> f64 {
        ns as f64 / 1e3 / self.requests.max(1) as f64
    }

    /// The generator fell behind its schedule (> 1% of requests sent > 1 ms late), or other
    /// jobs took more than 0.2 cores in some round.
    fn disturbed(&self) -> bool {
        self.late * 100 > self.requests + self.errors
            || self.foreign.iter().any(|&f| f > FOREIGN_LIMIT)
    }

    pub(super) fn foreign_max(&self) -> f64 {
        self.foreign.iter().copied().fold(0.0, f64::max)
    }

    /// Share of requests sent more than 1 ms after their due time, and errors if any.
    pub(super) fn late_share(&self) -> String {
        let mut s = format!(
            "{:.1}%",
            100.0 * self.late as f64 / (self.requests + self.errors).max(1) as f64
        );
        if self.errors > 0 {
            let _ = write!(s, " ({} errors)", self.errors);
        }
        s
    }

    pub(super) fn p(&self, q: f64) -> f64 {
        self.hist.quantile(q) as f64 / 1e3
    }
}

pub(super) struct RateRow {
    pub(super) rate: u64,
    pub(super) without: RateSide,
    pub(super) with: RateSide,
    /// From extra runs with BPF statistics on.
    pub(super) bpf: Vec<BpfRun>,
}

/// Run time of sonde's programs in a run with BPF statistics on.
pub(super) struct BpfRun {
    /// All programs, every process's syscalls.
    pub(super) ns: u64,
    /// Programs on the syscalls nginx serves with (`recvfrom`, `writev`); the generator uses
    /// `read`/`write`, so these runs are nginx's.
    nginx_ns: u64,
    pub(super) requests: u64,
}

/// Syscalls nginx serves a keep-alive `return 200` with (and the generator never makes).
const NGINX_SYSCALLS: [&str; 2] = ["recvfrom", "writev"];

impl RateRow {
    /// Median over the BPF runs of all programs' run time per request (µs).
    pub(super) fn bpf_us(&self) -> Option<f64> {
        self.bpf_median(|b| b.ns)
    }

    /// Median over the BPF runs of the run time on nginx's syscalls per request (µs).
    pub(super) fn nginx_bpf_us(&self) -> Option<f64> {
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
    pub(super) fn paired(&self, i: usize) -> Vec<f64> {
        self.with
            .rounds
            .iter()
            .zip(&self.without.rounds)
            .map(|(w, wo)| w[i] - wo[i])
            .collect()
    }

    /// Median of the paired differences of figure `i`.
    pub(super) fn added(&self, i: usize) -> f64 {
        median(&self.paired(i))
    }

    /// The paired differences of figure `i` as "median (min … max)".
    pub(super) fn added_text(&self, i: usize, digits: usize) -> String {
        let v = self.paired(i);
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{:+.digits$} ({lo:+.digits$} … {hi:+.digits$})", median(&v))
    }

    /// Whether the middle half of the paired differences of figure `i` spans more than
    /// `target`: the machine's noise then exceeds what is measured.
    pub(super) fn noisy(&self, i: usize, target: f64) -> bool {
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
pub(super) const FOREIGN_LIMIT: f64 = 0.2;

pub(super) fn fixed_rates(
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
