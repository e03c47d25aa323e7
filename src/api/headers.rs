//! Rate-limit response headers, rendered in one place for every caller that
//! asks for them (Envoy's `response_headers_to_add` today).
//!
//! Two families, from the same buckets:
//! - legacy: `x-ratelimit-limit`, `x-ratelimit-remaining`,
//!   `x-ratelimit-reset`, plus `retry-after` on a denial a retry can pass;
//! - IETF draft-ietf-httpapi-ratelimit-headers-11 (behind a setting, as the
//!   draft still moves): `ratelimit-policy` lists each enforced bucket's
//!   policy as `"<rule>";q=<capacity>;w=<refill seconds>`, and `ratelimit`
//!   its state as `"<rule>";r=<remaining>;t=<seconds>`, where `t` is the time
//!   until the request's cost is back for a bucket that denied it, else the
//!   time until the bucket is full again.

use std::time::Duration;

pub use crate::config::RateLimitDraft as Draft;
use crate::limiter::{BucketReport, Decision};

/// The headers for a request decided as `decisions` (one per descriptor),
/// which were `allowed` together, as `(lower-case name, value)` pairs.
pub fn render(decisions: &[Decision], allowed: bool, draft: Draft) -> Vec<(&'static str, String)> {
    let enforced = || {
        decisions
            .iter()
            .flat_map(|d| &d.buckets)
            .filter(|b| !b.shadow)
    };
    // The most restrictive bucket: the one that made callers wait longest
    // when denied, else the one with the fewest tokens left.
    let primary = if allowed {
        enforced().min_by_key(|b| b.remaining)
    } else {
        enforced()
            .filter(|b| b.exhausted)
            .max_by_key(|b| b.retry_after)
    };
    let mut out = Vec::new();
    if let Some(b) = primary {
        out.push((
            "x-ratelimit-limit",
            format!("{}, {};w={}", b.limit, b.limit, ceil_secs(b.period)),
        ));
        out.push(("x-ratelimit-remaining", b.remaining.to_string()));
        out.push(("x-ratelimit-reset", ceil_secs(b.reset_after).to_string()));
    }
    // A denial with a reason (a cost over a capacity, an unknown scope) can
    // never pass by waiting: promise no retry then.
    if !allowed && decisions.iter().all(|d| d.reason.is_none()) {
        let retry = decisions.iter().filter_map(|d| d.retry_after).max();
        if let Some(r) = retry {
            out.push(("retry-after", ceil_secs(r).to_string()));
        }
    }
    if draft == Draft::Draft11 {
        // Each rule once, in request order; the primary bucket first, so a
        // client that reads only the first member reads the one that matters.
        let mut buckets: Vec<&BucketReport> = primary.into_iter().collect();
        for b in enforced() {
            if !buckets.iter().any(|seen| seen.rule == b.rule) {
                buckets.push(b);
            }
        }
        if !buckets.is_empty() {
            out.push(("ratelimit-policy", join(&buckets, policy)));
            out.push(("ratelimit", join(&buckets, state)));
        }
    }
    out
}

fn join(buckets: &[&BucketReport], item: fn(&BucketReport) -> String) -> String {
    buckets
        .iter()
        .map(|b| item(b))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One `RateLimit-Policy` member.
fn policy(b: &BucketReport) -> String {
    format!(
        "{};q={};w={}",
        sf_string(&b.rule),
        b.limit,
        ceil_secs(b.period)
    )
}

/// One `RateLimit` member.
fn state(b: &BucketReport) -> String {
    let t = match (b.exhausted, b.retry_after) {
        (true, Some(retry)) => retry,
        _ => b.reset_after,
    };
    format!(
        "{};r={};t={}",
        sf_string(&b.rule),
        b.remaining,
        ceil_secs(t)
    )
}

/// A structured-field string (RFC 9651): printable ASCII in quotes, with `"`
/// and `\` escaped. A rule name with other characters has them
/// percent-encoded, so the field always parses.
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u8; 4];
                for byte in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{byte:02X}"));
                }
            }
        }
    }
    out.push('"');
    out
}

/// Whole seconds, rounded up: a client that waits this long is not early.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn bucket(rule: &str, limit: u64, remaining: u64, exhausted: bool) -> BucketReport {
        BucketReport {
            rule: Arc::from(rule),
            limit,
            period: Duration::from_secs(60),
            remaining,
            reset_after: Duration::from_millis(30_500),
            retry_after: exhausted.then_some(Duration::from_millis(5_200)),
            exhausted,
            shadow: false,
        }
    }

    fn get<'a>(h: &'a [(&str, String)], name: &str) -> Option<&'a str> {
        h.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn draft_11_lists_every_enforced_policy_with_the_deciding_one_first() {
        let decisions = [Decision {
            allowed: false,
            retry_after: Some(Duration::from_millis(5_200)),
            buckets: vec![
                bucket("per-user", 10, 4, false),
                bucket("search", 2, 0, true),
            ]
            .into(),
            primary: Some(1),
            ..Decision::default()
        }];
        let h = render(&decisions, false, Draft::Draft11);
        assert_eq!(
            get(&h, "ratelimit-policy"),
            Some(r#""search";q=2;w=60, "per-user";q=10;w=60"#)
        );
        assert_eq!(
            get(&h, "ratelimit"),
            Some(r#""search";r=0;t=6, "per-user";r=4;t=31"#)
        );
        assert_eq!(get(&h, "retry-after"), Some("6"));
        assert_eq!(get(&h, "x-ratelimit-remaining"), Some("0"));
        let h = render(&decisions, false, Draft::Off);
        assert_eq!(get(&h, "ratelimit"), None);
        assert_eq!(get(&h, "x-ratelimit-limit"), Some("2, 2;w=60"));
    }

    #[test]
    fn seconds_round_up_so_a_client_is_never_early() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn rule_names_always_make_a_valid_structured_field_string() {
        assert_eq!(sf_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(sf_string("café"), "\"caf%C3%A9\"");
    }
}
