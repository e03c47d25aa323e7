//! Ask Tollgate before serving a request.
//!
//! Tollgate is a rate-limit decision service; this crate is what a Rust proxy
//! or gateway needs to call it, without compiling the server:
//!
//! - [`Client`]: the `tollgate.v1` gRPC client. One reused connection, a
//!   deadline on every call, the batch call, and a local [`FailureMode`]
//!   (with a circuit breaker) for when Tollgate is unreachable, slow, or
//!   answers `UNAVAILABLE`.
//! - [`headers`]: every HTTP rendering of a decision, in one place
//!   (draft-ietf-httpapi-ratelimit-headers-11, `Retry-After`, problem+json).
//! - [`DecisionRequest`] and [`Decision`]: the question and the answer, as
//!   plain Rust types; [`Error`]: what can go wrong instead.

pub mod client;
pub mod decision;
pub mod error;
pub mod headers;
pub mod pb;

pub use client::{Client, ClientBuilder, FailureMode};
pub use decision::{BucketStatus, Decision, DecisionRequest, FailureCause};
pub use error::Error;
