//! Explanations: which limits of a scope apply to a request, and why the
//! others do not. Pure; [`super::Limiter::explain`] adds the bucket states
//! from a dry run.

use std::sync::Arc;
use std::time::Duration;

use super::{Decision, Request, ScopeRules};
use crate::config::Per;

/// One limit of a scope, as it stands towards one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitExplained {
    /// The rule's name.
    pub rule: Arc<str>,
    /// What its buckets are kept per.
    pub per: Per,
    /// Its capacity.
    pub capacity: u64,
    /// Its refill period.
    pub period: Duration,
    /// True for a shadow limit, which never denies.
    pub shadow: bool,
    /// Why it does not apply; `None` when it does.
    pub skipped_because: Option<String>,
}

/// Everything [`super::Limiter::explain`] tells about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// False when the scope is not configured.
    pub scope_configured: bool,
    /// Every limit of the scope, in config order.
    pub limits: Vec<LimitExplained>,
    /// What the request would get now; nothing was taken to learn it.
    pub decision: Decision,
}

/// Every limit of `scope` with whether it applies to `req`, and why not.
pub fn limits(scope: &ScopeRules, req: &Request<'_>) -> Vec<LimitExplained> {
    scope
        .limits
        .iter()
        .map(|l| LimitExplained {
            rule: l.name.clone(),
            per: l.per,
            capacity: l.shape.capacity,
            period: Duration::from_nanos(l.shape.period),
            shadow: l.shadow,
            skipped_because: skipped_because(l, req),
        })
        .collect()
}

pub(super) fn skipped_because(limit: &super::Limit, req: &Request<'_>) -> Option<String> {
    if let Some(ops) = &limit.operations
        && !ops.is_match(req.operation)
    {
        return Some(format!(
            "operation {:?} matches none of its operations",
            req.operation
        ));
    }
    let missing: Vec<String> = limit
        .when
        .iter()
        .filter(|(k, v)| req.attributes.get(k) != Some(v))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    (!missing.is_empty()).then(|| format!("needs attributes {}", missing.join(", ")))
}
