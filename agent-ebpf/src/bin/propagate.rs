//! sonde's kernel programs plus the socket-level propagation programs (sock_ops, sk_msg),
//! loaded instead of the plain object when `--propagate` is on.
#![no_std]
#![no_main]

#[path = "../programs.rs"]
mod programs;
#[path = "../sockmsg.rs"]
mod sockmsg;
