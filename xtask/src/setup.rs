//! Idempotent setup: pinned toolchain components, bpf-linker built against that toolchain's own
//! LLVM, and the system packages the demo and tests use.
use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::util::{self, have};

/// Debian packages: (binary to look for, package).
const APT_DEMO: &[(&str, &str)] = &[("nginx", "nginx"), ("curl", "curl")];
const APT_TESTS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("capsh", "libcap2-bin"),
    ("wrk", "wrk"),
    ("bpftool", "bpftool"),
];

/// Where project-owned tools live across runs (not inside the clone: CI clones afresh).
pub fn tools_dir() -> PathBuf {
    std::env::var_os("SONDE_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/sonde")
        })
}

struct Toolchain {
    /// e.g. `1.99.1-x86_64-unknown-linux-gnu`
    name: String,
    sysroot: PathBuf,
    /// e.g. `libLLVM.so.23.1-rust-1.99.1-stable`
    llvm_lib: String,
    llvm_major: u32,
}

fn toolchain() -> Result<Toolchain> {
    let root = util::workspace_root();
    let sysroot = PathBuf::from(
        util::output(
            Command::new("rustc")
                .current_dir(&root)
                .args(["--print", "sysroot"]),
        )?
        .trim(),
    );
    let name = sysroot
        .file_name()
        .ok_or_else(|| anyhow!("odd sysroot {}", sysroot.display()))?
        .to_string_lossy()
        .into_owned();
    let llvm_lib = fs::read_dir(sysroot.join("lib"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        .ok_or_else(|| anyhow!("no libLLVM.so.*-rust-* in {}/lib", sysroot.display()))?;
    let llvm_major = llvm_lib
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| anyhow!("cannot read the LLVM version from {llvm_lib}"))?;
    Ok(Toolchain {
        name,
        sysroot,
        llvm_lib,
        llvm_major,
    })
}

pub fn setup(for_tests: bool) -> Result<()> {
    let tc = toolchain()?;
    ensure_rust_src(&tc)?;
    ensure_bpf_linker(&tc)?;
    let mut pkgs: Vec<(&str, &str)> = APT_DEMO.to_vec();
    if for_tests {
        pkgs.extend_from_slice(APT_TESTS);
    }
    ensure_apt(&pkgs)?;
    if for_tests {
        ensure_python_peers()?;
        ensure_node_peers()?;
    }
    Ok(())
}

/// The OpenTelemetry Python SDK peers of the interop tests (Flask under
/// `opentelemetry-instrument`).
const PIP_PEERS: &[&str] = &[
    "flask",
    "requests",
    "opentelemetry-distro",
    "opentelemetry-exporter-otlp-proto-http",
    "opentelemetry-instrumentation-flask",
    "opentelemetry-instrumentation-requests",
];

fn ensure_python_peers() -> Result<()> {
    let present = Command::new("python3")
        .args(["-c", "import flask, requests, opentelemetry.instrumentation.flask, opentelemetry.exporter.otlp.proto.http"])
        .status()
        .is_ok_and(|s| s.success())
        && have("opentelemetry-instrument");
    if present {
        return Ok(());
    }
    eprintln!("setup: pip install {}", PIP_PEERS.join(" "));
    util::run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(PIP_PEERS),
    )?;
    // pyenv installs console scripts behind shims that need a rehash.
    if have("pyenv") {
        let _ = Command::new("pyenv").arg("rehash").status();
    }
    Ok(())
}

/// express and the OpenTelemetry Node SDK, from tests/node/package-lock.json.
fn ensure_node_peers() -> Result<()> {
    let dir = util::workspace_root().join("tests/node");
    if dir
        .join("node_modules/@opentelemetry/auto-instrumentations-node")
        .is_dir()
        && dir.join("node_modules/express").is_dir()
    {
        return Ok(());
    }
    if !have("npm") {
        bail!("npm is needed for the Node interop tests: install nodejs and npm");
    }
    eprintln!("setup: npm ci in tests/node");
    util::run(Command::new("npm").current_dir(&dir).args([
        "ci",
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
    ]))
}

fn ensure_rust_src(tc: &Toolchain) -> Result<()> {
    if tc
        .sysroot
        .join("lib/rustlib/src/rust/library/core")
        .is_dir()
    {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to {}", tc.name);
    util::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        &tc.name,
    ]))
}

/// bpf-linker must use the same LLVM as rustc. It is built against the toolchain's own
/// libLLVM through a prefix whose lib/ holds symlinks to it, and kept per toolchain; a stamp
/// records which libLLVM it was built for, so a toolchain change rebuilds it.
fn ensure_bpf_linker(tc: &Toolchain) -> Result<()> {
    let dir = tools_dir().join(format!("bpf-linker-{}", tc.name));
    let bin = dir.join("bin/bpf-linker");
    let stamp = dir.join("llvm-stamp");
    if bin.is_file() && fs::read_to_string(&stamp).ok().as_deref() == Some(tc.llvm_lib.as_str()) {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker against {} (LLVM {}); this takes a minute",
        tc.llvm_lib, tc.llvm_major
    );
    let prefix = dir.join("llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib)?;
    let target = tc.sysroot.join("lib").join(&tc.llvm_lib);
    for link in [tc.llvm_lib.as_str(), "libLLVM.so"] {
        let l = lib.join(link);
        let _ = fs::remove_file(&l);
        symlink(&target, &l).with_context(|| format!("symlink {}", l.display()))?;
    }
    util::run(
        util::cargo()
            .current_dir(util::workspace_root())
            .env("LLVM_PREFIX", &prefix)
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--no-default-features",
            ])
            .arg("--features")
            .arg(format!("llvm-{}", tc.llvm_major))
            .arg("--root")
            .arg(&dir),
    )?;
    fs::write(&stamp, &tc.llvm_lib)?;
    Ok(())
}

fn ensure_apt(pkgs: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .filter(|(bin, _)| !have(bin) && !Path::new("/usr/sbin").join(bin).is_file())
        .map(|(_, p)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        bail!("missing {missing:?} and no apt-get: install them by hand");
    }
    eprintln!("setup: apt-get install {}", missing.join(" "));
    util::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["update", "-qq"]),
    )?;
    util::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

/// Builds the release binary with its kernel programs; returns its path.
pub fn build_release() -> Result<PathBuf> {
    let tc = toolchain()?;
    let root = util::workspace_root();
    let linker_bin = tools_dir()
        .join(format!("bpf-linker-{}", tc.name))
        .join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![linker_bin];
    paths.extend(std::env::split_paths(&path));
    util::run(
        util::cargo()
            .current_dir(&root)
            .env("PATH", std::env::join_paths(paths)?)
            .args(["build", "--release", "-p", "agent"]),
    )?;
    Ok(root.join("target/release/sonde"))
}
