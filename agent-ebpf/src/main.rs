//! sonde's kernel programs (see programs.rs). This object has no socket-map programs, so it
//! loads with CAP_BPF + CAP_PERFMON alone; `bin/propagate.rs` adds them for `--propagate`.
#![no_std]
#![no_main]

#[path = "programs.rs"]
mod programs;
