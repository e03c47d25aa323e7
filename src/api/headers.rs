//! Rate-limit response headers for Envoy's `response_headers_to_add`.
//!
//! The rendering itself lives in the `tollgate-headers` crate
//! (`clients/headers`, its `envoy` module), which the Rust client shares and
//! whose test vectors the Go client checks too; this file only hands it the
//! limiter's decisions.

use tollgate_headers::envoy;

pub use crate::config::RateLimitDraft as Draft;
use crate::limiter::{BucketReport, Decision};

/// The headers for a request decided as `decisions` (one per descriptor),
/// which were `allowed` together, as `(lower-case name, value)` pairs.
pub fn render(decisions: &[Decision], allowed: bool, draft: Draft) -> Vec<(&'static str, String)> {
    let views: Vec<tollgate_headers::Decision<'_>> = decisions.iter().map(view).collect();
    let draft = match draft {
        Draft::Off => envoy::Draft::Off,
        Draft::Draft11 => envoy::Draft::Draft11,
    };
    envoy::render(&views, allowed, draft)
}

fn view(d: &Decision) -> tollgate_headers::Decision<'_> {
    let primary = d.primary();
    tollgate_headers::Decision {
        allowed: d.allowed,
        degraded: d.degraded,
        retry_after: d.retry_after,
        reason: d.reason.as_deref(),
        limit: primary.map_or(0, |b| b.limit),
        remaining: primary.map_or(0, |b| b.remaining),
        reset_after: primary.map(|b| b.reset_after).unwrap_or_default(),
        // A shadow limit never denies, so the headers never name it.
        buckets: d.buckets.iter().filter(|b| !b.shadow).map(bucket).collect(),
    }
}

fn bucket(b: &BucketReport) -> tollgate_headers::Bucket<'_> {
    tollgate_headers::Bucket {
        rule: &b.rule,
        limit: b.limit,
        remaining: b.remaining,
        reset_after: b.reset_after,
        retry_after: b.retry_after,
        exhausted: b.exhausted,
        refill_period: Some(b.period),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn bucket(rule: &str, remaining: u64, exhausted: bool, shadow: bool) -> BucketReport {
        BucketReport {
            rule: Arc::from(rule),
            limit: 10,
            period: Duration::from_secs(60),
            remaining,
            reset_after: Duration::from_millis(30_500),
            retry_after: exhausted.then_some(Duration::from_millis(5_200)),
            exhausted,
            shadow,
        }
    }

    fn get<'a>(h: &'a [(&str, String)], name: &str) -> Option<&'a str> {
        h.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    /// A shadow limit that ran out is not what denied, and its rule is not
    /// one the caller is held to.
    #[test]
    fn shadow_limits_are_never_named() {
        let decisions = [Decision {
            allowed: false,
            retry_after: Some(Duration::from_millis(5_200)),
            buckets: vec![
                bucket("trial", 0, true, true),
                bucket("per-user", 0, true, false),
            ]
            .into(),
            primary: Some(1),
            ..Decision::default()
        }];
        let h = render(&decisions, false, Draft::Draft11);
        assert_eq!(get(&h, "ratelimit-policy"), Some(r#""per-user";q=10;w=60"#));
        assert_eq!(get(&h, "ratelimit"), Some(r#""per-user";r=0;t=6"#));
        assert_eq!(get(&h, "x-ratelimit-limit"), Some("10, 10;w=60"));
        let h = render(&decisions, false, Draft::Off);
        assert_eq!(get(&h, "ratelimit"), None);
        assert_eq!(get(&h, "retry-after"), Some("6"));
    }
}
