//! One limit: which requests it applies to, and the shape of its buckets.
//!
//! Rules from Tollgate's own config and from envoyproxy/ratelimit descriptors
//! both end up as a [`Limit`]; this is its one home.

use std::sync::Arc;

use globset::GlobSet;

use super::Request;
use crate::bucket::Shape;
use crate::config::Per;

/// One limit, ready to match.
#[derive(Debug, Clone)]
pub struct Limit {
    /// The rule name reported in responses.
    pub name: Arc<str>,
    /// What one bucket is kept per.
    pub per: Per,
    /// Matches the operation; `None` matches every operation.
    pub operations: Option<GlobSet>,
    /// Attributes the request must carry, all of them.
    pub when: Vec<(String, String)>,
    /// Capacity and refill period, in nanoseconds.
    pub shape: Shape,
    /// Never causes a denial.
    pub shadow: bool,
    /// Rules of the same scope that this one stands in for: when a request
    /// decided together draws on both, those are dropped (envoyproxy's
    /// `replaces`).
    pub replaces: Vec<Arc<str>>,
}

impl Limit {
    /// The limit of a descriptor rule. The API passes the whole descriptor as
    /// the identity, so each distinct descriptor (user, path, ...) has its
    /// own bucket.
    pub fn for_descriptor(name: &str, shape: Shape, shadow: bool) -> Self {
        Self {
            name: Arc::from(name),
            per: Per::Identity,
            operations: None,
            when: Vec::new(),
            shape,
            shadow,
            replaces: Vec::new(),
        }
    }

    /// True when this limit applies to `req`.
    pub fn matches(&self, req: &Request<'_>) -> bool {
        if let Some(ops) = &self.operations
            && !ops.is_match(req.operation)
        {
            return false;
        }
        self.when
            .iter()
            .all(|(k, v)| req.attributes.get(k).is_some_and(|have| have == v))
    }
}
