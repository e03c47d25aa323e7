//! Every over-the-wire and integration test, in one binary: each module
//! used to be its own test binary linking the whole crate, which cost
//! minutes of every CI run.

mod admin;
mod ai_limits;
mod ban_feed;
mod cli;
mod cluster_spread;
mod coalescing;
mod common;
mod cores;
mod deny_cache;
mod deploy;
mod docs;
mod envoy_compat;
mod envoy_e2e;
mod envoy_leases;
mod envoy_rls;
mod fault_matrix;
mod faults;
mod grpc;
mod leases;
mod limiter;
mod penalty;
mod redis_config;
mod redis_standalone;
mod redis_topologies;
mod redteam;
mod reload;
mod rlqs;
mod security;
mod shaping;
mod status_page;
mod store_conformance;
mod watch;
