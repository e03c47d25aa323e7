//! Tollgate: a rate-limit decision service.
//!
//! Callers ask `ShouldAllow(scope, identity, operation)` over gRPC; Tollgate
//! answers allow or deny with an exact retry-after, from token buckets kept
//! per scope, identity, operation, or identity and operation, and from
//! calendar budgets. A request may reserve an estimate and `Settle` its real
//! cost later ([`limiter::reservation`]), and low priorities keep off a
//! limit's headroom.
//!
//! `ARCHITECTURE.md`, at the repository's root, is the map in full: each
//! room, its architecture invariants and its boundary, the order of the
//! layers, and what `tests/architecture/` checks of them. It is the only
//! copy of the invariants; this is the short map.
//!
//! # Module map
//! From the bottom layer up; each module names only those below it.
//! - [`bucket`], [`window`]: bucket math and budget windows, in integers.
//! - [`config`]: the typed, validated configuration, as plain data.
//! - [`pb`]: the generated protobuf and gRPC code.
//! - [`store`]: the [`store::Store`] trait (the atomicity contract), the
//!   embedded store, the Redis store and the deny cache.
//! - [`limiter`]: config → rules → the buckets a request draws on → one
//!   charge → a decision; reservations and settles.
//! - [`observe`]: metrics, the audit log, logs, heavy hitters, the status page.
//! - [`error`]: domain errors → gRPC statuses.
//! - [`api`]: the gRPC services: proto ⇄ domain, validation, authorization.
//! - [`net`]: the transport below the API: TLS, cancellable connections,
//!   the in-flight cap.
//! - [`reload`]: the one snapshot a reload swaps; [`shutdown`], [`watch`]:
//!   signals and the stop sequence, reload on file change.
//! - [`server`]: prepares a config and serves it.
//!
//! The binary (`src/main.rs`, with its `cli` module) parses arguments, loads
//! the config and calls [`server::run`], or runs one of the gRPC clients.
//!
//! # The request path
//! 1. `api` validates the request and borrows it as a `limiter::Request`.
//! 2. `limiter` finds the scope's limits that match and names their buckets.
//! 3. `store` checks every bucket and takes the cost from all or none, atomically.
//! 4. `limiter` turns the outcome into a `Decision`, or applies the failure mode.
//! 5. `api` answers with the proto response.

#![warn(clippy::unwrap_used)]

pub mod api;
pub mod bucket;
pub mod config;
pub mod error;
pub mod limiter;
pub mod net;
pub mod observe;
pub mod pb;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod watch;
pub mod window;
