//! Ask Tollgate before serving a request.
//!
//! Tollgate is a rate-limit decision service; this crate is what a Rust proxy
//! or gateway needs to call it, without compiling the server:
//!
//! - [`Client`]: the `tollgate.v1` gRPC client. One reused connection, a
//!   deadline on every call, plain and atomic batches, and a local
//!   [`FailureMode`] (with a circuit breaker) for when Tollgate is
//!   unreachable, slow, or answers `UNAVAILABLE`. For LLM and MCP calls
//!   whose cost is known only afterwards, a request can reserve an estimate
//!   ([`DecisionRequest::with_settle_within`]) and [`Client::settle`] the
//!   real cost later; a [`Priority`] sheds background work before the user
//!   at the screen.
//! - [`layer::TollgateLayer`]: a `tower::Layer` for HTTP services (axum,
//!   hyper, tonic). It extracts scope, identity and operation from each
//!   request (a header, the path, the mTLS peer, or a closure), passes
//!   allowed requests on with `RateLimit` headers, and answers denied ones
//!   with a 429. The inner service keeps its request body type.
//! - [`layer::McpLayer`], MCP-aware extraction stacked on top of it (and
//!   [`mcp`], what it charges): on an MCP endpoint each JSON-RPC call is
//!   decided, and a denial is a JSON-RPC error.
//! - [`lease`] and [`layer::Concurrency`]: concurrency limits. A request
//!   can take a lease with its rates ([`DecisionRequest::with_lease`]), and
//!   the layer can hold one for the lifetime of each request, renewing it
//!   while the response streams and releasing it when the body ends.
//! - [`headers`]: every HTTP rendering of a decision
//!   (draft-ietf-httpapi-ratelimit-headers-11, `Retry-After`, problem+json);
//!   the headers come from `tollgate-headers`, which the server shares.
//!
//! The request path through the layers, in five lines:
//!
//! 1. on an MCP endpoint, the MCP layer reads the body (capped);
//! 2. the extractors build a [`DecisionRequest`] from the request head, one
//!    per distinct JSON-RPC operation on an MCP endpoint;
//! 3. [`Client`] asks Tollgate, within the deadline;
//! 4. allowed: the inner service is called, and headers are added;
//! 5. denied: a 429 is written here, and the inner service never runs.

pub mod client;
pub mod decision;
pub mod error;
pub mod headers;
pub mod layer;
pub mod lease;
pub mod mcp;
pub mod pb;

pub use client::{Client, ClientBuilder, FailureMode};
pub use decision::{
    BucketStatus, Decision, DecisionRequest, FailureCause, Priority, Reservation, Settlement,
};
pub use error::Error;
pub use lease::{Lease, LeaseTarget};

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
