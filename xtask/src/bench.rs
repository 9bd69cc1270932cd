//! Benchmarks (not tests): figures and ratios measured side by side in one run.
use anyhow::{Result, bail};

pub fn run(_quick: bool) -> Result<()> {
    bail!("benchmarks are not implemented yet")
}
