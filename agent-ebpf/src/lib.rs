#![no_std]
// The library target only exists so that `agent` can name this crate as a build dependency
// (cargo then rebuilds the agent when the kernel programs change). The programs are in main.rs.
