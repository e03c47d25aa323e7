//! One limit: which requests it applies to, and the shape of its buckets.
//!
//! Rules from Tollgate's own config and from envoyproxy/ratelimit descriptors
//! both end up as a [`Limit`]; this is its one home.

use std::sync::Arc;
use std::time::Duration;

use globset::GlobSet;

use super::{Priority, Request};
use crate::bucket::Shape;
use crate::config::Per;
use crate::config::envoy::Metadata;
use crate::window::Window;

/// What a limit does with the requests it applies to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LimitKind {
    /// Charges a bucket of its shape: every limit of Tollgate's own config,
    /// and envoyproxy/ratelimit's `requests_per_unit` from 1 up.
    #[default]
    Bucket,
    /// envoyproxy/ratelimit's `unlimited: true`: no bucket, always passes.
    Unlimited,
    /// envoyproxy/ratelimit's `requests_per_unit: 0`: no bucket, always
    /// denies (unless shadow), and the request it denies takes nothing.
    Nothing,
}

/// One limit, ready to match.
#[derive(Debug, Clone)]
pub struct Limit {
    /// The rule name reported in responses.
    pub name: Arc<str>,
    /// The name its buckets are kept under: the rule name, and for a budget
    /// its window too (`daily~day@Europe/Paris`), so a reload that changes
    /// the window or zone starts fresh budgets, as a changed shape does.
    pub key_name: Arc<str>,
    /// What one bucket is kept per.
    pub per: Per,
    /// Matches the operation; `None` matches every operation.
    pub operations: Option<GlobSet>,
    /// Attributes the request must carry, all of them.
    pub when: Vec<(String, String)>,
    /// Capacity and refill period, in nanoseconds. A budget's capacity is
    /// its budget, and its period its window's nominal length.
    pub shape: Shape,
    /// Set for a calendar budget.
    pub window: Option<Window>,
    /// Tokens each priority must leave in the bucket, by
    /// [`Priority::index`]: the headroom, rounded up to whole tokens.
    pub reserve: [u64; 3],
    /// Never causes a denial.
    pub shadow: bool,
    /// Rules of the same scope that this one stands in for: when a request
    /// decided together draws on both, those are dropped (envoyproxy's
    /// `replaces`).
    pub replaces: Vec<Arc<str>>,
    /// Whether another rule's `replaces` can drop this one: only a rule
    /// whose `name` was written, as in envoyproxy/ratelimit.
    pub replaceable: bool,
    /// Bucket, unlimited, or admits nothing.
    pub kind: LimitKind,
    /// envoyproxy's `quota_mode`: a descriptor over this limit denies the
    /// request only when every quota descriptor of it is over.
    pub quota: bool,
    /// envoyproxy's `metadata`, handed back to Envoy when the descriptor
    /// passes.
    pub metadata: Option<Arc<Metadata>>,
    /// Shaping: the longest this limit lets a request wait instead of
    /// denying it (bounded again by the request's `max_wait`); zero: never.
    pub max_delay: Duration,
}

impl Limit {
    /// The limit of a descriptor rule. The API passes the whole descriptor as
    /// the identity, so each distinct descriptor (user, path, ...) has its
    /// own bucket.
    pub fn for_descriptor(name: &str, shape: Shape, shadow: bool) -> Self {
        let name: Arc<str> = Arc::from(name);
        Self {
            key_name: name.clone(),
            name,
            per: Per::Identity,
            operations: None,
            when: Vec::new(),
            shape,
            window: None,
            reserve: [0; 3],
            shadow,
            replaces: Vec::new(),
            replaceable: true,
            kind: LimitKind::Bucket,
            quota: false,
            metadata: None,
            max_delay: Duration::ZERO,
        }
    }

    /// Tokens a request of `priority` must leave.
    pub fn reserve_for(&self, priority: Priority) -> u64 {
        self.reserve[priority.index()]
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
