//! The gRPC edge: translate proto ⇄ domain, validate input, call the limiter.
//! Nothing else happens here, and no other library module knows proto types.

pub mod admin;
pub mod auth;
pub mod bans;
pub mod envoy;
mod envoy_metadata;
pub mod headers;
pub mod leases;
pub mod rlqs;
pub mod settings;
pub mod tollgate;
pub mod validate;

pub use admin::AdminApi;
pub use envoy::EnvoyRateLimitApi;
pub use leases::LeasesApi;
pub use rlqs::QuotaApi;
pub use settings::{Settings, Snapshot};
pub use tollgate::RateLimiterApi;
