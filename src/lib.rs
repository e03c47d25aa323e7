//! Tollgate: a rate-limit decision service.
//!
//! Callers ask `ShouldAllow(scope, identity, operation)` over gRPC; Tollgate
//! answers allow or deny with an exact retry-after, from token buckets kept
//! per scope, identity, operation, or identity and operation, and from
//! calendar budgets. A request may reserve an estimate and `Settle` its real
//! cost later ([`limiter::reservation`]), and low priorities keep off a
//! limit's headroom.
//!
//! # Module map
//! Leaves first; each module imports only those above it.
//! - [`bucket`]: GCRA bucket math in integers. Imports nothing from the crate.
//! - [`config`]: the typed, validated configuration, envoyproxy/ratelimit
//!   YAML included, as plain data. Imports nothing from the crate.
//! - [`window`]: budget windows, DST-aware. Imports nothing from the crate.
//! - [`store`]: the [`store::Store`] trait (the atomicity contract), the
//!   embedded store, the Redis store (one Lua script per batch of
//!   charges, coalesced per node), and the deny cache in front of any store.
//! - [`limiter`]: config → rules ([`limiter::compile`]), rules → buckets,
//!   and the pure planner ([`limiter::plan`]) around one call to the store;
//!   signed reservations and their settles ([`limiter::reservation`]).
//! - [`observe`]: metrics, the denial audit log, logs, heavy hitters and
//!   utilization per rule, the live status page, and the `Observer` every
//!   API reports to. Recording a decision is in-process only: no store call.
//! - [`api`]: the gRPC edge (`tollgate.v1.RateLimiter`, `tollgate.v1.Admin`,
//!   Envoy's RLS); proto ⇄ domain, input validation. [`pb`] is the
//!   generated code, and [`error`] maps domain errors to gRPC statuses.
//! - [`server`]: prepares a config and serves it; [`shutdown`]: signals,
//!   reload, and the stop sequence (drain, grace, cancel); [`tls`]: the
//!   listeners' TLS, certificates re-read when their files change;
//!   [`watch`]: reload when the config's files change.
//!
//! The binary (`src/main.rs`, with its `cli` module) parses arguments, loads
//! the config, and calls [`server::run`]; it is the one place besides `api`
//! that speaks proto, as the `allow`, `top` and `explain` clients.
//!
//! # The request path
//! 1. `api` validates the request and borrows it as a `limiter::Request`.
//! 2. `limiter` finds the scope's limits that match and names their buckets.
//! 3. `store` checks every bucket and takes the cost from all or none, atomically.
//! 4. `limiter` turns the outcome into a `Decision` (retry-after, the most
//!    restrictive bucket), or applies the failure mode if the store failed.
//! 5. `api` answers with the proto response.
//!
//! # Architecture invariants
//! `tests/it/architecture.rs` checks each of these on every CI run.
//! - **The bucket math is a leaf.** `bucket` imports nothing from the crate,
//!   and no float enters it. Neither does `window`, the calendar math of
//!   budgets: it only maps an instant to its window.
//! - **Config is data.** `config` imports nothing from the rest of the crate:
//!   it parses and validates, and others read it. Only the store judges its
//!   own settings (`store::check_settings`), before any port is bound.
//! - **The layers point one way:** `config`, `bucket`, `window` ← `store` ← `limiter`
//!   ← `observe` ← `api` ← `tls`, `server`. No module imports one to its
//!   right.
//! - **Only `api` knows proto types.** Nothing under `limiter`, `store`,
//!   `config` or `observe` names `pb::`, `tonic::` or `prost`.
//! - **Only the Redis store knows Redis.** `redis::` appears nowhere outside
//!   `store/redis/`.
//! - **The limiter does no I/O of its own.** Its one await is the call to
//!   the `Store` trait; rules, planning and decisions are pure functions.
//! - **Functions stay short.** No function in `src/` runs past 80 lines.

#![warn(clippy::unwrap_used)]

pub mod api;
pub mod bucket;
pub mod config;
pub mod error;
pub mod limiter;
pub mod observe;
pub mod pb;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod tls;
pub mod watch;
pub mod window;
