//! `cargo xtask fuzz`: runs each cargo-fuzz target of `agent/fuzz` for a fixed time, failing on
//! the first crash (panic, failed invariant, sanitizer report, timeout, memory limit).
//!
//! cargo-fuzz is installed (once, pinned) into the tools directory. It needs nightly features
//! (`-Z sanitizer`): the pinned stable toolchain allows them with `RUSTC_BOOTSTRAP=1`, set for
//! these builds only. Targets are built with AddressSanitizer and debug assertions (overflow
//! checks included).
//!
//! Runs grow a scratch corpus under `agent/fuzz/target/corpus/<target>/` (kept between runs,
//! never committed) seeded read-only from the committed `agent/fuzz/corpus/<target>/`. A
//! crashing input is saved under `agent/fuzz/artifacts/<target>/`; reproduce it with
//! `cargo fuzz run <target> <file>` from `agent/` (with the environment set below).
use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::{setup::tools_dir, util};

/// Version of cargo-fuzz installed (and expected) in the tools directory.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every target of `agent/fuzz/Cargo.toml`, and whether it reads HTTP (gets the dictionary of
/// HTTP tokens, `agent/fuzz/http.dict`).
pub const TARGETS: [(&str, bool); 3] = [
    ("events_decode", false),
    ("http1_parse", true),
    ("conn_stream", true),
];

/// Builds the targets and runs each for `seconds_per_target` seconds.
pub fn fuzz(seconds_per_target: u64) -> Result<()> {
    let cargo_fuzz = ensure_cargo_fuzz()?;
    let fuzz_dir = util::workspace_root().join("agent/fuzz");
    let cmd = |args: &[&str]| {
        let mut c = Command::new(&cargo_fuzz);
        // Run from `agent/`: cargo-fuzz finds its project in `./fuzz`.
        c.current_dir(fuzz_dir.parent().expect("agent/fuzz has a parent"))
            .env("RUSTC_BOOTSTRAP", "1")
            .env("AYA_BUILD_SKIP", "1")
            .arg("fuzz")
            .args(args)
            .args(["--sanitizer", "address", "--debug-assertions"]);
        c
    };
    util::run(&mut cmd(&["build"]))?;
    for (target, http) in TARGETS {
        let scratch = fuzz_dir.join("target/corpus").join(target);
        fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        eprintln!("fuzz: {target} for {seconds_per_target} s");
        let mut run = cmd(&["run", target]);
        run.arg(&scratch)
            .arg(fuzz_dir.join("corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds_per_target}"))
            .arg("-rss_limit_mb=1024")
            .arg("-timeout=10")
            .arg("-print_final_stats=1");
        if http {
            run.arg(format!("-dict={}", fuzz_dir.join("http.dict").display()));
        }
        util::run(&mut run).with_context(|| {
            format!(
                "fuzz target {target} failed: the input is under {}",
                fuzz_dir.join("artifacts").join(target).display()
            )
        })?;
    }
    Ok(())
}

/// Installs cargo-fuzz into `<tools dir>/tools` unless the pinned version is there already.
fn ensure_cargo_fuzz() -> Result<PathBuf> {
    let root = tools_dir().join("tools");
    let bin = root.join("bin/cargo-fuzz");
    let installed = bin.is_file()
        && util::output(Command::new(&bin).arg("--version"))
            .is_ok_and(|v| v.split_whitespace().nth(1) == Some(CARGO_FUZZ_VERSION));
    if !installed {
        eprintln!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        util::run(
            util::cargo()
                .current_dir(util::workspace_root())
                .args(["install", "cargo-fuzz", "--locked", "--force", "--version"])
                .arg(CARGO_FUZZ_VERSION)
                .arg("--root")
                .arg(&root),
        )?;
    }
    Ok(bin)
}
