//! Envoy quota streaming's metrics: streams, the buckets they hold, the
//! shares assigned per scope and rule, and the usage Envoys report.
//!
//! Labels are bounded like every other metric: `scope` is a configured
//! scope (or `_unconfigured`), `rule` a configured rule name; never a
//! `BucketId` value.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    scope: Arc<str>,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShareLabels {
    scope: Arc<str>,
    rule: Arc<str>,
}

/// The RLQS series, registered with the others.
#[derive(Debug, Clone, Default)]
pub struct RlqsMetrics {
    streams: Gauge<i64, AtomicI64>,
    buckets: Gauge<i64, AtomicI64>,
    reports: Family<ScopeLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    assigned: Family<ShareLabels, Gauge<i64, AtomicI64>>,
}

impl RlqsMetrics {
    /// Registers every RLQS series in `registry`.
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "rlqs_streams",
            "Open Envoy quota streams on this replica",
            m.streams.clone(),
        );
        registry.register(
            "rlqs_buckets",
            "Buckets that quota streams hold a share of, on this replica",
            m.buckets.clone(),
        );
        registry.register(
            "rlqs_bucket_reports",
            "Bucket usage reports received from Envoys, by scope",
            m.reports.clone(),
        );
        registry.register(
            "rlqs_requests",
            "Requests Envoys reported, by scope and result (allowed or denied): the fleet's admission, to set against the limit",
            m.requests.clone(),
        );
        registry.register(
            "rlqs_assigned_millitokens_per_second",
            "The shares assigned to quota streams, summed per scope and rule, in thousandths of a token per second",
            m.assigned.clone(),
        );
        m
    }

    /// A stream opened (`1`) or closed (`-1`).
    pub fn stream(&self, delta: i64) {
        self.streams.inc_by(delta);
    }

    /// A bucket seat taken (`1`) or given up (`-1`).
    pub fn bucket(&self, delta: i64) {
        self.buckets.inc_by(delta);
    }

    /// One bucket report of `scope`, with the requests it counted.
    pub fn report(&self, scope: &str, allowed: u64, denied: u64) {
        let scope: Arc<str> = Arc::from(scope);
        self.reports
            .get_or_create(&ScopeLabels {
                scope: scope.clone(),
            })
            .inc();
        for (result, n) in [("allowed", allowed), ("denied", denied)] {
            self.requests
                .get_or_create(&RequestLabels {
                    scope: scope.clone(),
                    result,
                })
                .inc_by(n);
        }
    }

    /// A share of `scope`'s `rules` moved by `delta` millitokens a second.
    pub fn share(&self, scope: &str, rules: &[Arc<str>], delta: i64) {
        if delta == 0 {
            return;
        }
        for rule in rules {
            self.assigned
                .get_or_create(&ShareLabels {
                    scope: Arc::from(scope),
                    rule: rule.clone(),
                })
                .inc_by(delta);
        }
    }
}
