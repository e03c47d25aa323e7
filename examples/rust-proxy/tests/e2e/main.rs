//! End-to-end tests of tollgate-client and rust-proxy against real processes:
//! the `tollgate` binary with a temp config, the `rust-proxy` binary, and an
//! upstream HTTP server. One test binary, so CI links once; see
//! `support.rs` for how the binaries are found.

// Test modules share fixtures with `pub`; nothing leaves this binary.
#![allow(unreachable_pub)]

mod client;
mod latency;
mod leases;
mod mcp;
mod proxy;
mod reservations;
mod shaping;
mod support;
