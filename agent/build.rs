//! Builds the kernel programs (`agent-ebpf`) for the bpf target and leaves the object in
//! OUT_DIR, where `probes::loader` embeds it with `include_bytes_aligned!`.
use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        // Userspace-only build (unit tests, fuzzing): embed an empty object; the loader then
        // refuses to start with a clear error.
        let out = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?);
        std::fs::write(out.join("sonde"), b"")?;
        std::fs::write(out.join("sonde-propagate"), b"")?;
        return Ok(());
    }
    let toolchain = env::var("RUSTUP_TOOLCHAIN").unwrap_or_default();
    // The eBPF crate needs `-Z build-std=core`; the pinned toolchain is stable, so unlock it
    // for that build only (aya-build reads this variable).
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    add_bpf_linker_to_path(&toolchain)?;

    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "agent-ebpf")
        .ok_or_else(|| anyhow!("agent-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let toolchain_name = toolchain
        .split_once("-x86_64")
        .or_else(|| toolchain.split_once("-aarch64"))
        .map(|(v, _)| v.to_string())
        .unwrap_or(toolchain.clone());
    let tc = if toolchain_name.is_empty() {
        aya_build::Toolchain::Custom("1.99.1")
    } else {
        aya_build::Toolchain::Custom(Box::leak(toolchain_name.into_boxed_str()))
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: root.as_str(),
            ..Default::default()
        }],
        tc,
    )
}

/// `cargo xtask setup` installs bpf-linker into a per-toolchain directory; put it on PATH for
/// the nested eBPF build when it is not on PATH already.
fn add_bpf_linker_to_path(toolchain: &str) -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=SONDE_TOOLS_DIR");
    println!("cargo:rerun-if-env-changed=PATH");
    if which_on_path("bpf-linker").is_some() {
        return Ok(());
    }
    let base = env::var_os("SONDE_TOOLS_DIR")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sonde")))
        .ok_or_else(|| anyhow!("neither SONDE_TOOLS_DIR nor HOME is set"))?;
    let bin = base.join(format!("bpf-linker-{toolchain}")).join("bin");
    if !bin.join("bpf-linker").exists() {
        return Err(anyhow!(
            "bpf-linker for toolchain {toolchain} not found on PATH or in {}: run `cargo xtask setup`",
            bin.display()
        ));
    }
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![bin];
    paths.extend(env::split_paths(&path));
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("PATH", env::join_paths(paths)?) };
    Ok(())
}

fn which_on_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
