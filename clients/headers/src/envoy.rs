//! The headers the server asks Envoy to add to its response
//! (`response_headers_to_add` of RLS v3), for every descriptor of one
//! request.
//!
//! Two families, from the same buckets:
//!
//! - legacy, always: `x-ratelimit-limit` (`<capacity>, <capacity>;w=<refill
//!   seconds>`), `x-ratelimit-remaining` and `x-ratelimit-reset` of the most
//!   restrictive bucket, and `retry-after` on a denial a retry can pass;
//! - with [`Draft::Draft11`] (a setting, as the draft still moves):
//!   `ratelimit-policy` lists each bucket's policy as
//!   `"<rule>";q=<capacity>;w=<refill seconds>`, and `ratelimit` its state
//!   as `"<rule>";r=<remaining>;t=<seconds>`, where `t` is the time until the
//!   request's cost is back for a bucket that denied it, else the time until
//!   the bucket is full again.
//!
//! Unlike [`crate::middleware`], `ratelimit` lists every rule on a denial
//! too, the deciding one first, and the legacy trio comes from the buckets
//! rather than from a decision's summary.

use crate::{
    Bucket, Decision, Headers, RATELIMIT, RATELIMIT_POLICY, RETRY_AFTER, X_RATELIMIT_LIMIT,
    X_RATELIMIT_REMAINING, X_RATELIMIT_RESET, ceil_secs, limit_item, list, policy_item,
};

/// Which draft of the `RateLimit` and `RateLimit-Policy` fields to add
/// beside the legacy headers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Draft {
    /// The legacy headers only.
    Off,
    /// draft-ietf-httpapi-ratelimit-headers-11.
    #[default]
    Draft11,
}

/// The headers for a request whose descriptors were decided as `decisions`
/// and which was `allowed` as a whole (the answer's `overall_code`).
pub fn render(decisions: &[Decision<'_>], allowed: bool, draft: Draft) -> Headers {
    let buckets = || decisions.iter().flat_map(|d| &d.buckets);
    // The most restrictive bucket: the one that made callers wait longest
    // when denied (of equal waits, the last), else the one with the fewest
    // tokens left (of equals, the first).
    let primary = if allowed {
        buckets().min_by_key(|b| b.remaining)
    } else {
        buckets()
            .filter(|b| b.exhausted)
            .max_by_key(|b| b.retry_after)
    };
    let mut out = Headers::new();
    if let Some(b) = primary {
        let limit = match b.refill_period {
            Some(w) => format!("{}, {};w={}", b.limit, b.limit, ceil_secs(w)),
            None => b.limit.to_string(),
        };
        out.push((X_RATELIMIT_LIMIT, limit));
        out.push((X_RATELIMIT_REMAINING, b.remaining.to_string()));
        out.push((X_RATELIMIT_RESET, ceil_secs(b.reset_after).to_string()));
    }
    // A denial with a reason (a cost over a capacity, an unknown scope) can
    // never pass by waiting: promise no retry then.
    if !allowed && decisions.iter().all(|d| d.reason.is_none()) {
        let retry = decisions.iter().filter_map(|d| d.retry_after).max();
        if let Some(r) = retry {
            out.push((RETRY_AFTER, ceil_secs(r).to_string()));
        }
    }
    if draft == Draft::Draft11 {
        // Each rule once, in request order; the primary bucket first, so a
        // client that reads only the first member reads the one that matters.
        let mut listed: Vec<&Bucket<'_>> = primary.into_iter().collect();
        for b in buckets() {
            if !listed.iter().any(|seen| seen.rule == b.rule) {
                listed.push(b);
            }
        }
        if !listed.is_empty() {
            let policy = list(&listed, |s, b| {
                policy_item(s, b.rule, b.limit, b.refill_period.map(ceil_secs));
            });
            let state = list(&listed, |s, b| {
                let t = match (b.exhausted, b.retry_after) {
                    (true, Some(retry)) => retry,
                    _ => b.reset_after,
                };
                limit_item(s, b.rule, b.remaining, Some(ceil_secs(t)));
            });
            out.push((RATELIMIT_POLICY, policy));
            out.push((RATELIMIT, state));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn get<'h>(h: &'h Headers, name: &str) -> Option<&'h str> {
        h.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    fn bucket(rule: &str, limit: u64, remaining: u64, exhausted: bool) -> Bucket<'_> {
        Bucket {
            rule,
            limit,
            refill_period: Some(Duration::from_secs(60)),
            remaining,
            reset_after: Duration::from_millis(30_500),
            retry_after: exhausted.then_some(Duration::from_millis(5_200)),
            exhausted,
        }
    }

    #[test]
    fn draft_11_lists_every_policy_with_the_deciding_one_first() {
        let decisions = [Decision {
            allowed: false,
            retry_after: Some(Duration::from_millis(5_200)),
            buckets: vec![
                bucket("per-user", 10, 4, false),
                bucket("search", 2, 0, true),
            ],
            ..Decision::default()
        }];
        let h = render(&decisions, false, Draft::Draft11);
        assert_eq!(
            get(&h, RATELIMIT_POLICY),
            Some(r#""search";q=2;w=60, "per-user";q=10;w=60"#)
        );
        assert_eq!(
            get(&h, RATELIMIT),
            Some(r#""search";r=0;t=6, "per-user";r=4;t=31"#)
        );
        assert_eq!(get(&h, RETRY_AFTER), Some("6"));
        assert_eq!(get(&h, X_RATELIMIT_REMAINING), Some("0"));
        let h = render(&decisions, false, Draft::Off);
        assert_eq!(get(&h, RATELIMIT), None);
        assert_eq!(get(&h, X_RATELIMIT_LIMIT), Some("2, 2;w=60"));
    }
}
