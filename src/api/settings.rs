//! What the gRPC edge keeps beside the rules in the reload snapshot: who may
//! call, which headers Envoy's answers carry, and the longest
//! `settle_within`. Built from a config and swapped with its rules as one
//! [`Snapshot`] (`crate::reload` builds and swaps it); every call loads the
//! snapshot once and reads all of it from there.

use std::sync::Arc;
use std::time::Duration;

use super::auth::Authorizer;
use super::headers::Draft;
use crate::config::Config;
use crate::config::reservations::DEFAULT_MAX_SETTLE_WITHIN;
use crate::limiter::Generation;
use crate::observe::Observer;

/// Everything a reload swaps, as the APIs read it: the rules, and the
/// [`Settings`] beside them.
pub type Snapshot = Generation<Settings>;

/// The reloadable settings of the gRPC edge.
#[derive(Debug)]
pub struct Settings {
    /// The `callers:` grants.
    pub access: Authorizer,
    /// The rate-limit headers Envoy's answers carry, `None` for none
    /// (`envoy_response_headers`, `envoy_ratelimit_draft`).
    pub envoy_headers: Option<Draft>,
    /// `envoy_dynamic_metadata`: Envoy's answers carry dynamic metadata in
    /// envoyproxy/ratelimit's shape.
    pub envoy_dynamic_metadata: bool,
    /// `reservations.max_settle_within`: the longest `settle_within` a
    /// request may ask for.
    pub max_settle_within: Duration,
}

impl Settings {
    /// The settings `config` asks for, reporting refusals to `observer`.
    pub fn new(config: &Config, observer: Arc<Observer>) -> Self {
        Self {
            access: Authorizer::new(config.callers.as_deref(), observer),
            envoy_headers: config
                .envoy_response_headers
                .then_some(config.envoy_ratelimit_draft),
            envoy_dynamic_metadata: config.envoy_dynamic_metadata,
            max_settle_within: config.reservations.max_settle_within,
        }
    }

    /// Anyone may call, Envoy's answers carry no headers, and
    /// `settle_within` has its default bound: for tests.
    pub fn open(observer: Arc<Observer>) -> Self {
        Self {
            access: Authorizer::new(None, observer),
            envoy_headers: None,
            envoy_dynamic_metadata: false,
            max_settle_within: DEFAULT_MAX_SETTLE_WITHIN,
        }
    }
}
