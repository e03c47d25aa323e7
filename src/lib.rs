//! Tollgate: a rate-limit decision service.
//!
//! Callers ask `ShouldAllow(scope, identity, operation)` over gRPC; Tollgate
//! answers allow or deny with an exact retry-after, from token buckets kept
//! per scope, identity, operation, or identity and operation.
//!
//! # Module map
//! - [`config`]: the typed, validated configuration; [`envoy_config`]:
//!   envoyproxy/ratelimit YAML loaded as extra scopes.
//! - [`api`]: the gRPC edge; proto ⇄ domain, input validation.
//! - [`limiter`]: rules → buckets → [`limiter::Decision`]; pure, no I/O.
//! - [`store`]: the [`store::Store`] trait (the atomicity contract), the
//!   embedded store, and the Redis store (one Lua script per decision).
//! - [`server`]: wires a config into a running gRPC server, with health and
//!   reflection; [`shutdown`]: signals.
//! - [`error`]: the one mapping from domain errors to gRPC statuses.
//! - [`metrics`]: Prometheus metrics on their own port; [`audit`]: the
//!   rate-limited denial log.
//!
//! # The request path
//! 1. `api` validates the request and borrows it as a `limiter::Request`.
//! 2. `limiter` finds the scope's limits that match and names their buckets.
//! 3. `store` checks every bucket and takes the cost from all or none, atomically.
//! 4. `limiter` turns the outcome into a `Decision` (retry-after, the most
//!    restrictive bucket), or applies the failure mode if the store failed.
//! 5. `api` answers with the proto response.

#![warn(clippy::unwrap_used)]

pub mod api;
pub mod audit;
pub mod cli;
pub mod config;
pub mod envoy_config;
pub mod error;
pub mod limiter;
pub mod metrics;
pub mod pb;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
