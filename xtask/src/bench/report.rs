//! The Markdown report: the tables of the four parts, the targets with their verdicts, and
//! the raw runs.
use std::{collections::BTreeMap, fmt::Write as _, time::Instant};

use super::{
    FOREIGN_LIMIT, Fields, Memory, Mode, Plan, RateRow, SatMode, median, num, procs,
    procs::SondeStats,
};

/// A Markdown table with padded columns (readable in a terminal too).
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let w: Vec<usize> = (0..head.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([head[i].chars().count(), 3])
                .max()
                .unwrap_or(3)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&w)
            .map(|(c, &w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut s = line(head.iter().map(|h| h.to_string()).collect());
    s += &line(w.iter().map(|&w| "-".repeat(w)).collect());
    for r in rows {
        s += &line(r.clone());
    }
    s
}

fn us(v: f64) -> String {
    format!("{v:.2} µs")
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn rate_label(r: u64) -> String {
    if r.is_multiple_of(1000) {
        format!("{}k", r / 1000)
    } else {
        r.to_string()
    }
}

fn verdict(ok: bool) -> String {
    if ok { "PASS" } else { "MISS" }.to_string()
}

/// A verdict on a comparison whose noise may exceed the effect measured.
fn verdict_noisy(ok: bool, noisy: bool) -> String {
    if noisy {
        format!("{} (noisy)", verdict(ok))
    } else {
        verdict(ok)
    }
}

fn spans_ok(spans: u64, requests: u64, stats: &SondeStats) -> String {
    let losses = procs::losses(stats);
    let missing = requests.saturating_sub(spans);
    let what = if missing == 0 {
        "all spanned".to_string()
    } else if losses == "none" {
        format!("{missing} missing, unaccounted")
    } else {
        format!("{missing} missing")
    };
    format!("{spans} / {requests} ({what})")
}

#[allow(clippy::too_many_arguments)]
pub(super) fn render(
    plan: &Plan,
    header: &str,
    fixed: &[RateRow],
    sat: &BTreeMap<Mode, SatMode>,
    pipe: &Fields,
    export: &[Fields],
    mem: &Memory,
    raw: &str,
    started: Instant,
) -> String {
    let mut out = String::new();
    let foreign: Vec<f64> = fixed
        .iter()
        .flat_map(|r| r.without.foreign.iter().chain(&r.with.foreign))
        .chain(sat.values().flat_map(|m| &m.foreign))
        .copied()
        .collect();
    let _ = writeln!(
        out,
        "## Benchmarks\n\n{header}  \nOther jobs' CPU during the measured runs (machine busy \
         time minus the benchmark's own processes): {:.2} cores on average, {:.2} at most.\n",
        foreign.iter().sum::<f64>() / foreign.len().max(1) as f64,
        foreign.iter().copied().fold(0.0, f64::max)
    );

    // 1.
    let _ = writeln!(
        out,
        "### 1. Cost per request at fixed rates\n\nnginx keep-alive, {} connections, \
         {} s per run, {} round(s) of a run without and a run with sonde back to back, \
         alternating the order; CPU per request = CPU time over all runs / requests, and \
         latency quantiles over all requests, each side pooled; \"added\" = with − without \
         per round, as median (lowest … highest) over the rounds: this VM's noise moves \
         whole runs, and a paired median is what survives it. Kernel share = nginx CPU per \
         request with sonde minus without (the hooks run in nginx's syscalls); BPF programs \
         = run time of sonde's programs per request, median of {} more run(s) with the \
         kernel's BPF statistics on: all of them (every hooked syscall on the machine, the \
         generator's too), and in brackets those on nginx's `recvfrom` and `writev` (the \
         generator uses `read`/`write`, so that is nginx's share measured directly, without \
         the dispatch of the tracepoints themselves); latency from `write` to the last byte \
         of the response.\n",
        plan.conns, plan.rate_secs, plan.rate_rounds, plan.bpf_runs
    );
    let rows: Vec<Vec<String>> = fixed
        .iter()
        .map(|r| {
            let (a, b) = (&r.without, &r.with);
            let nw = a.per_req_us(a.nginx_cpu.ns());
            let nt = b.per_req_us(b.nginx_cpu.ns());
            vec![
                format!("{} req/s", rate_label(r.rate)),
                format!(
                    "{:.0} / {:.0}",
                    a.requests as f64 / a.secs,
                    b.requests as f64 / b.secs
                ),
                format!("{} / {}", a.late_share(), b.late_share()),
                format!("{:.2} / {:.2}", a.foreign_max(), b.foreign_max()),
                us(b.per_req_us(b.sonde_cpu.ns())),
                format!("{nw:.2} → {nt:.2} µs; {}", r.added_text(0, 2)),
                match (r.bpf_us(), r.nginx_bpf_us()) {
                    (Some(all), Some(nginx)) => format!("{} ({})", us(all), us(nginx)),
                    _ => "–".into(),
                },
                format!(
                    "{:.2} → {:.2} µs",
                    a.per_req_us(a.client_cpu_ns),
                    b.per_req_us(b.client_cpu_ns)
                ),
                format!(
                    "{:.1} → {:.1} µs; {}",
                    a.p(0.5),
                    b.p(0.5),
                    r.added_text(1, 1)
                ),
                format!(
                    "{:.1} → {:.1} µs; {}",
                    a.p(0.99),
                    b.p(0.99),
                    r.added_text(2, 1)
                ),
                spans_ok(b.spans, b.requests, &b.stats),
                procs::losses(&b.stats),
            ]
        })
        .collect();
    out += &table(
        &[
            "rate",
            "achieved req/s without / with",
            "sent > 1 ms late without / with",
            "other jobs' CPU (max cores) without / with",
            "sonde CPU / req",
            "nginx CPU / req without → with; kernel share added",
            "sonde's BPF programs / req (on nginx's syscalls)",
            "client CPU / req (untraced)",
            "p50 without → with; added",
            "p99 without → with; added",
            "spans / requests",
            "loss counters",
        ],
        &rows,
    );

    // 2.
    let base = sat
        .get(&Mode::NoSonde)
        .map(SatMode::median_rps)
        .unwrap_or(0.0);
    let _ = writeln!(
        out,
        "\n### 2. Saturation\n\nnginx (1 worker) + `wrk -t1 -c50 -d{}s` on the same 2 cores; \
         {} round(s), modes alternating; median requests/s.\n",
        plan.sat_secs, plan.sat_rounds
    );
    let rows: Vec<Vec<String>> = sat
        .iter()
        .map(|(mode, m)| {
            let rounds: Vec<String> = m.rps.iter().map(|v| format!("{v:.0}")).collect();
            let foreign: Vec<String> = m.foreign.iter().map(|v| format!("{v:.2}")).collect();
            vec![
                mode.label().to_string(),
                format!("{:.0}", m.median_rps()),
                rounds.join(", "),
                foreign.join(", "),
                format!("{:.3}", m.median_rps() / base),
                if m.sonde_cores.is_empty() {
                    "–".into()
                } else {
                    format!("{:.2}", median(&m.sonde_cores))
                },
                if *mode == Mode::Tracing {
                    spans_ok(m.spans, m.requests, &m.stats)
                } else {
                    "–".into()
                },
                if *mode == Mode::Tracing {
                    procs::losses(&m.stats)
                } else {
                    "–".into()
                },
            ]
        })
        .collect();
    out += &table(
        &[
            "mode",
            "req/s (median)",
            "rounds",
            "other jobs' CPU (cores)",
            "ratio to no sonde",
            "sonde CPU (cores)",
            "spans / requests",
            "loss counters",
        ],
        &rows,
    );

    // 3.
    let spans_per_core = num(pipe, "spans_per_cpu_s");
    let total_us = ["reassembly_us", "assemble_us", "encode_us"]
        .iter()
        .map(|k| num(pipe, k))
        .sum::<f64>();
    let _ = writeln!(
        out,
        "\n### 3. Pipeline (one core)\n\n{} recorded keep-alive GET exchanges over {} \
         connections (raw ring-buffer records) replayed through decode → reassembly → HTTP/1 \
         parse → span assembly → OTLP protobuf encoding (the exporter's own encoder) on one \
         thread; median of \
         {} by thread CPU time.\n",
        pipe.get("exchanges").map_or("?", String::as_str),
        pipe.get("conns").map_or("?", String::as_str),
        pipe.get("reps").map_or("?", String::as_str),
    );
    out += &table(
        &[
            "spans/s per core (CPU)",
            "spans/s (wall)",
            "decode + reassembly + parse",
            "span assembly",
            "OTLP encoding",
            "total per span",
            "encoded bytes / span",
            "heap allocations / span",
        ],
        &[vec![
            format!("{spans_per_core:.0}"),
            format!("{:.0}", num(pipe, "spans_per_wall_s")),
            us(num(pipe, "reassembly_us")),
            us(num(pipe, "assemble_us")),
            us(num(pipe, "encode_us")),
            us(total_us),
            format!("{:.0} B", num(pipe, "bytes_per_span")),
            format!("{:.2}", num(pipe, "allocs_per_span")),
        ]],
    );

    // 4.
    let _ = writeln!(
        out,
        "\n### 4. Export and memory\n\nThe real exporter (queue, default batches of 512 spans, retries) \
         sending {} pipeline-built spans to a local receiver (prost decode + count), on this \
         2-core machine; CPU split by thread.\n",
        export
            .first()
            .and_then(|f| f.get("spans"))
            .map_or("?", String::as_str)
    );
    let rows: Vec<Vec<String>> = export
        .iter()
        .map(|f| {
            vec![
                f.get("protocol").cloned().unwrap_or_default(),
                f.get("compression").cloned().unwrap_or_default(),
                format!("{:.0}", num(f, "spans_per_s")),
                us(num(f, "exporter_cpu_us")),
                us(num(f, "receiver_cpu_us")),
                format!(
                    "{} / {}",
                    f.get("received").map_or("?", String::as_str),
                    f.get("spans").map_or("?", String::as_str)
                ),
            ]
        })
        .collect();
    out += &table(
        &[
            "transport",
            "compression",
            "spans/s",
            "exporter CPU / span",
            "receiver CPU / span",
            "received / sent",
        ],
        &rows,
    );
    let per_conn = |kib: u64| (kib.saturating_sub(mem.idle_kib)) as f64 * 1024.0 / mem.conns as f64;
    let _ = writeln!(
        out,
        "\nsonde tracing nginx, exporting; VmRSS (RssAnon) from /proc/PID/status.\n"
    );
    out += &table(
        &["sonde state", "VmRSS", "RssAnon", "note"],
        &[
            vec![
                "idle (no traffic)".into(),
                mib(mem.idle_kib),
                mib(mem.idle_anon_kib),
                format!("idle CPU {:.2} ms/s", mem.idle_cpu_ms_per_s),
            ],
            vec![
                format!("{} open connections", mem.conns),
                mib(mem.wave1_kib),
                mib(mem.wave1_anon_kib),
                format!("{:.0} B per connection over idle", per_conn(mem.wave1_kib)),
            ],
            vec![
                format!("closed, then {} new ones", mem.conns),
                mib(mem.wave2_kib),
                mib(mem.wave2_anon_kib),
                format!("{:.0} B per connection over idle", per_conn(mem.wave2_kib)),
            ],
            vec![
                "all closed".into(),
                mib(mem.closed_kib),
                "".into(),
                format!(
                    "peak VmHWM {}; {}",
                    mib(mem.peak_kib),
                    spans_ok(mem.spans, 2 * mem.conns as u64, &mem.stats)
                ),
            ],
        ],
    );

    // Targets.
    let _ = writeln!(out, "\n### Targets\n");
    let mut rows: Vec<Vec<String>> = Vec::new();
    let per_rate = |f: &dyn Fn(&RateRow) -> f64| -> (String, f64) {
        let v: Vec<String> = fixed
            .iter()
            .map(|r| format!("{:.2} µs at {}", f(r), rate_label(r.rate)))
            .collect();
        let worst = fixed.iter().map(f).fold(f64::NEG_INFINITY, f64::max);
        (v.join(", "), worst)
    };
    let (v, worst) = per_rate(&|r| r.with.per_req_us(r.with.sonde_cpu.ns()));
    rows.push(vec![
        "sonde's own CPU (user + sys, all threads) ≤ 3 µs per traced request".into(),
        v,
        verdict(worst <= 3.0),
    ]);
    let (v, worst) = per_rate(&|r| r.added(0));
    let share_noisy = fixed.iter().any(|r| r.noisy(0, 1.5));
    rows.push(vec![
        "kernel share ≤ 1.5 µs per request (nginx CPU with − without, median over rounds)".into(),
        v,
        verdict_noisy(worst <= 1.5, share_noisy),
    ]);
    let (v, worst) = per_rate(&|r| r.nginx_bpf_us().unwrap_or(f64::INFINITY));
    rows.push(vec![
        "kernel share measured directly ≤ 1.5 µs per request (BPF run time on nginx's \
         recvfrom + writev)"
            .into(),
        v,
        verdict(worst <= 1.5),
    ]);
    match fixed.iter().find(|r| r.rate == 10_000) {
        Some(r) => {
            rows.push(vec![
                "latency added ≤ 5 µs p50 at 10k req/s (median over rounds)".into(),
                format!("{} µs", r.added_text(1, 1)),
                verdict_noisy(r.added(1) <= 5.0, r.noisy(1, 5.0)),
            ]);
            rows.push(vec![
                "latency added ≤ 25 µs p99 at 10k req/s (median over rounds)".into(),
                format!("{} µs", r.added_text(2, 1)),
                verdict_noisy(r.added(2) <= 25.0, r.noisy(2, 25.0)),
            ]);
        }
        None => rows.push(vec![
            "latency added at 10k req/s".into(),
            "not measured".into(),
            "–".into(),
        ]),
    }
    let all: Vec<String> = fixed
        .iter()
        .map(|r| {
            format!(
                "{}/{} at {}",
                r.with.spans,
                r.with.requests,
                rate_label(r.rate)
            )
        })
        .collect();
    let every = fixed
        .iter()
        .all(|r| r.with.spans == r.with.requests && procs::losses(&r.with.stats) == "none");
    rows.push(vec![
        "every request spanned, zero unaccounted loss, up to 50k req/s".into(),
        all.join(", "),
        verdict(every && fixed.iter().any(|r| r.rate >= 50_000)),
    ]);
    rows.push(vec![
        "pipeline ≥ 500k spans/s per core".into(),
        format!("{spans_per_core:.0} spans/s"),
        verdict(spans_per_core >= 500_000.0),
    ]);
    let ratio = |m: Mode| sat.get(&m).map(SatMode::median_rps).unwrap_or(0.0) / base;
    // Baseline rounds more than 15% apart: the ratios say more about the machine than sonde.
    let sat_noisy = sat.get(&Mode::NoSonde).is_some_and(|m| {
        let max = m.rps.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let min = m.rps.iter().copied().fold(f64::INFINITY, f64::min);
        max > min * 1.15
    }) || sat
        .values()
        .any(|m| m.foreign.iter().any(|&f| f > FOREIGN_LIMIT));
    let tracing = sat.get(&Mode::Tracing);
    let sat_spanned = tracing.is_some_and(|t| t.short_rounds == 0 && t.spans >= t.requests);
    rows.push(vec![
        "saturation: tracing / no sonde ≥ 0.75, every request spanned".into(),
        format!(
            "{:.3}; {}",
            ratio(Mode::Tracing),
            tracing.map_or("?".into(), |t| spans_ok(t.spans, t.requests, &t.stats))
        ),
        verdict_noisy(ratio(Mode::Tracing) >= 0.75 && sat_spanned, sat_noisy),
    ]);
    rows.push(vec![
        "saturation: hooks only / no sonde ≈ 0.90 (≥ 0.85)".into(),
        format!("{:.3}", ratio(Mode::Hooks)),
        verdict_noisy(ratio(Mode::Hooks) >= 0.85, sat_noisy),
    ]);
    rows.push(vec![
        "RSS ≤ 64 MiB idle".into(),
        mib(mem.idle_kib),
        verdict(mem.idle_kib <= 64 * 1024),
    ]);
    let bounded =
        mem.peak_kib <= 128 * 1024 && mem.wave2_kib as f64 <= mem.wave1_kib as f64 * 1.1 + 2048.0;
    rows.push(vec![
        format!(
            "RSS bounded with {} connections (peak ≤ 128 MiB, a second wave adds ≤ 10%)",
            mem.conns
        ),
        format!(
            "{} → {} → {}, peak {}",
            mib(mem.idle_kib),
            mib(mem.wave1_kib),
            mib(mem.wave2_kib),
            mib(mem.peak_kib)
        ),
        verdict(bounded),
    ]);
    out += &table(&["target", "measured", "verdict"], &rows);
    let _ = writeln!(
        out,
        "\n(noisy): the middle half of the per-round differences spans more than the target, \
         their median came out negative by more than the target, other jobs took more than \
         {FOREIGN_LIMIT} cores during a run, or the generator fell behind its schedule (> 1% \
         of requests sent > 1 ms late; saturation: baseline rounds > 15% apart). The verdict \
         is then weak evidence either way: rerun on a quiet machine."
    );

    let _ = writeln!(
        out,
        "\n<details><summary>Raw runs</summary>\n\n{raw}\nTotal bench time {:.0} s; load \
         average at the end {}.\n</details>",
        started.elapsed().as_secs_f64(),
        procs::load_average()
    );
    out
}
