//! Developer tasks. `cargo xtask demo` and `cargo xtask test` are the README's two commands:
//! both set up everything they need first (idempotently), on a fresh machine too.
mod bench;
mod demo;
mod fuzz;
mod setup;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "sonde developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces, bpf-linker and the system packages (idempotent).
    Setup {
        /// Also install what the tests need (Python and Node SDK peers, capsh, ...).
        #[arg(long)]
        tests: bool,
    },
    /// Build the release `sonde` binary (kernel programs included).
    Build,
    /// Set up, build, and run the demo: unmodified services traced, the trace printed.
    Demo,
    /// Set up and run every test: unit tests, then the root-only integration tests.
    Test {
        /// Only the integration tests whose names contain this.
        filter: Option<String>,
    },
    /// Fuzz the parsers and the event decoder (cargo-fuzz, AddressSanitizer).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
    },
    /// Set up and run the benchmarks (overhead, throughput, pipeline, export, memory).
    Bench {
        /// Shorter runs (for a smoke check).
        #[arg(long)]
        quick: bool,
        /// Only the fixed-rate part, at these rates (req/s, comma-separated): a quick A/B
        /// of sonde's cost per request.
        #[arg(long, value_delimiter = ',')]
        rates_only: Vec<u64>,
        /// Only the saturation part (no sonde / hooks only / tracing, alternating rounds).
        #[arg(long, conflicts_with = "rates_only")]
        saturation_only: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup { tests } => setup::setup(tests),
        Cmd::Build => setup::build_release().map(|_| ()),
        Cmd::Demo => demo::run(),
        Cmd::Test { filter } => test(filter),
        Cmd::Fuzz { seconds } => fuzz::fuzz(seconds),
        Cmd::Bench {
            quick,
            rates_only,
            saturation_only,
        } => bench::run(quick, &rates_only, saturation_only),
    }
}

fn test(filter: Option<String>) -> Result<()> {
    setup::setup(true)?;
    let sonde = setup::build_release()?;
    let root = util::workspace_root();
    // Unit tests: everything that needs no privileges.
    util::run(util::cargo().current_dir(&root).args([
        "test",
        "--workspace",
        "--exclude",
        "tests",
        "--exclude",
        "agent-ebpf",
    ]))?;
    // A short fuzzing run of every target (a longer one: `cargo xtask fuzz`).
    fuzz::fuzz(20)?;
    // Root-only integration tests: real kernels, servers and clients; serial, since they share
    // the kernel's tracepoints and the machine's two cores.
    let mut cmd = util::cargo();
    cmd.current_dir(&root)
        .env("SONDE_BIN", &sonde)
        .args(["test", "--release", "-p", "tests", "--"])
        .arg("--test-threads=1");
    if let Some(f) = filter {
        cmd.arg(f);
    }
    util::run(&mut cmd)
}
