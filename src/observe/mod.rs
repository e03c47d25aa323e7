//! Observability: what Tollgate tells operators about itself.
//!
//! - [`metrics`]: Prometheus metrics on their own port, with bounded labels;
//! - [`audit`]: the rate-limited denial log;
//! - [`logs`]: the tracing subscriber;
//! - [`hitters`]: heavy hitters and utilization per rule, over
//!   [`sketch`]'s space-saving summaries;
//! - [`status`]: the live status page on the metrics port;
//! - [`Observer`]: what every API does after a decision.

pub mod audit;
pub mod hitters;
pub mod in_flight;
pub mod logs;
pub mod metrics;
pub mod rlqs;
pub mod sketch;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use crate::limiter::{DecideError, Decision, Request, Rules, SettleError, Settlement};
use audit::Audit;
use hitters::Hitters;
use metrics::Metrics;

/// What every API does after a decision: count it, time it, audit denials,
/// and feed the heavy hitters.
#[derive(Debug, Default)]
pub struct Observer {
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// Heavy hitters and utilization per rule.
    pub hitters: Arc<Hitters>,
    audit: Audit,
}

impl Observer {
    /// An observer reporting to `metrics`, with default-sized hitters.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self::with_hitters(metrics, Arc::default())
    }

    /// An observer reporting to `metrics` and `hitters`.
    pub fn with_hitters(metrics: Arc<Metrics>, hitters: Arc<Hitters>) -> Self {
        Self {
            metrics,
            hitters,
            audit: Audit::default(),
        }
    }

    /// Records the result of deciding `req` through `api`.
    pub fn decided(
        &self,
        api: &'static str,
        rules: &Rules,
        req: &Request<'_>,
        result: Result<&Decision, &DecideError>,
        took: Duration,
    ) {
        match result {
            Ok(d) => {
                self.metrics.decision(api, rules, req.scope, d, took);
                self.hitters.record(req.scope, req.identity, d);
                if d.penalty.banned.is_some_and(|b| b.started) {
                    self.audit.banned(&self.metrics, api, req, d);
                }
                if !d.allowed {
                    self.audit.denied(
                        &self.metrics,
                        api,
                        req.scope,
                        req.identity,
                        req.operation,
                        d,
                    );
                }
            }
            Err(_) => self.metrics.unavailable(api, rules, req.scope),
        }
    }

    /// Records a settle: counted by result, and its refusals logged at
    /// debug (a replayed or expired token is the caller's business).
    pub fn settled(&self, scope: &str, result: Result<&Settlement, &SettleError>) {
        let label = match result {
            Ok(_) => "settled",
            Err(SettleError::AlreadySettled) => "already_settled",
            Err(SettleError::Expired) => "expired",
            Err(SettleError::Token(_)) => "invalid",
            Err(SettleError::Store(_)) => "unavailable",
        };
        self.metrics.settle(label);
        if let Err(e) = result {
            tracing::debug!(scope, error = %e, "settle refused");
        }
    }

    /// Records a call refused by caller authorization: counted by `caller`
    /// (a configured name, or `_unauthenticated`) and audited, sampled.
    pub fn refused(&self, api: &'static str, caller: &str, scope: &str, why: &str) {
        self.metrics.access_denied(api, caller);
        self.audit.refused(&self.metrics, api, caller, scope, why);
    }
}
