//! The headers a rate-limited HTTP service adds to its own responses: the
//! Rust client's tower layer renders them here, and the Go client's
//! middleware renders the same (`vectors.json` checks both).
//!
//! One response can carry several decisions (an MCP batch is one atomic
//! batch with an entry per distinct operation), so everything takes a slice.
//! The mapping from token buckets to draft-11:
//!
//! - `RateLimit-Policy: "<rule>";q=<capacity>;w=<seconds>`, one member per
//!   rule that applied, in order of appearance, with `w` the bucket's refill
//!   period (in which it refills from empty, so `q` per `w` is its rate). A
//!   token bucket has no fixed window; this is the nearest reading of the
//!   draft's `w`, and the one [`crate::envoy`] uses too.
//! - `RateLimit: "<rule>";r=<remaining>;t=<seconds>`. Allowed: every rule,
//!   with `t` the time until its bucket is full again. Denied: only the
//!   rules that denied, with `t` the time until the request would pass, so
//!   `Retry-After` is never earlier than any `t` (draft section 6). A rule
//!   reported by several decisions is one member, with the smallest `r` and
//!   the longest `t`.
//! - `Retry-After` on a denial a retry can pass: the longest wait.
//! - With [`Options::legacy`], `X-RateLimit-Limit`, `-Remaining` and
//!   `-Reset` of the most restrictive decision's bucket.
//!
//! Degraded decisions add nothing: no bucket was consulted, so there is
//! nothing true to say.

use std::time::Duration;

use crate::{
    Decision, Headers, RATELIMIT, RATELIMIT_POLICY, RETRY_AFTER, X_RATELIMIT_LIMIT,
    X_RATELIMIT_REMAINING, X_RATELIMIT_RESET, ceil_secs, limit_item, list, policy_item,
};

/// Which headers to render beside draft-11's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Also render `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
    /// `X-RateLimit-Reset` (seconds until full), for clients written
    /// against the older, de-facto headers.
    pub legacy: bool,
}

/// The headers for a response that carries these decisions.
pub fn render(decisions: &[Decision<'_>], options: Options) -> Headers {
    let denial = decisions.iter().any(|d| !d.allowed);
    let counted = || decisions.iter().filter(|d| !d.degraded);

    let mut policies: Vec<Item<'_>> = Vec::new();
    let mut limits: Vec<Item<'_>> = Vec::new();
    for d in counted() {
        for b in &d.buckets {
            if !policies.iter().any(|p| p.rule == b.rule) {
                policies.push(Item {
                    rule: b.rule,
                    number: b.limit,
                    seconds: b.refill_period.map(ceil_secs),
                });
            }
            let (shown, t) = if denial {
                (!d.allowed && b.exhausted, b.retry_after)
            } else {
                (true, Some(b.reset_after))
            };
            if shown {
                merge_limit(
                    &mut limits,
                    Item {
                        rule: b.rule,
                        number: b.remaining,
                        seconds: t.map(ceil_secs),
                    },
                );
            }
        }
    }

    let mut out = Headers::new();
    if !policies.is_empty() {
        let v = list(&policies, |s, p| {
            policy_item(s, p.rule, p.number, p.seconds)
        });
        out.push((RATELIMIT_POLICY, v));
    }
    if !limits.is_empty() {
        let v = list(&limits, |s, l| limit_item(s, l.rule, l.number, l.seconds));
        out.push((RATELIMIT, v));
    }
    if denial && let Some(r) = retry_after(decisions) {
        out.push((RETRY_AFTER, ceil_secs(r).to_string()));
    }
    if options.legacy
        && let Some(d) = most_restrictive(decisions, denial)
    {
        out.push((X_RATELIMIT_LIMIT, d.limit.to_string()));
        out.push((X_RATELIMIT_REMAINING, d.remaining.to_string()));
        out.push((X_RATELIMIT_RESET, ceil_secs(d.reset_after).to_string()));
    }
    out
}

/// For a denial: the time after which every denied decision would pass, the
/// longest of their waits. Entries of an atomic batch denied only because
/// another entry was ([`Decision::denied_by_batch`]) have no wait of their
/// own and are skipped. `None` when nothing was denied, or when one denial
/// can never pass (no retry can succeed, so none is promised).
pub fn retry_after(decisions: &[Decision<'_>]) -> Option<Duration> {
    let mut longest = None;
    for d in decisions
        .iter()
        .filter(|d| !d.allowed && !d.denied_by_batch())
    {
        let r = d.retry_after?;
        longest = Some(longest.map_or(r, |l: Duration| l.max(r)));
    }
    longest
}

struct Item<'a> {
    rule: &'a str,
    /// `q` of a policy, `r` of a limit.
    number: u64,
    /// `w` of a policy, `t` of a limit.
    seconds: Option<u64>,
}

/// Adds `item`, or folds it into the member of the same rule: several
/// decisions can report one bucket (an identity bucket charged by two
/// operations of one MCP batch). The later, smaller `r` and the longer `t`
/// are the true ones.
fn merge_limit<'a>(items: &mut Vec<Item<'a>>, item: Item<'a>) {
    match items.iter_mut().find(|i| i.rule == item.rule) {
        Some(i) => {
            i.number = i.number.min(item.number);
            i.seconds = match (i.seconds, item.seconds) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
        }
        None => items.push(item),
    }
}

/// The decision the legacy trio describes: on a denial, the denied one with
/// the longest wait (one that can never pass counts as longest; of equal
/// waits, the last); else the one with the fewest tokens left (of equals,
/// the first). Only decisions where a rule applied.
fn most_restrictive<'d, 'a>(
    decisions: &'d [Decision<'a>],
    denial: bool,
) -> Option<&'d Decision<'a>> {
    let applied = decisions.iter().filter(|d| !d.degraded && d.limit > 0);
    if denial {
        applied
            .filter(|d| !d.allowed && !d.denied_by_batch())
            .max_by_key(|d| d.retry_after.unwrap_or(Duration::MAX))
    } else {
        applied.min_by_key(|d| d.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bucket;

    fn get<'h>(h: &'h Headers, name: &str) -> Option<&'h str> {
        h.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    fn bucket(rule: &str, limit: u64, remaining: u64, reset_ms: u64) -> Bucket<'_> {
        Bucket {
            rule,
            limit,
            remaining,
            reset_after: Duration::from_millis(reset_ms),
            ..Bucket::default()
        }
    }

    fn denied_per_user(retry_ms: u64) -> Decision<'static> {
        let mut per_user = bucket("per-user", 3, 0, 10_000);
        per_user.exhausted = true;
        per_user.retry_after = Some(Duration::from_millis(retry_ms));
        Decision {
            allowed: false,
            retry_after: Some(Duration::from_millis(retry_ms)),
            limit: 3,
            reset_after: Duration::from_millis(10_000),
            buckets: vec![bucket("global", 1000, 990, 600), per_user],
            ..Decision::default()
        }
    }

    /// A denial that no retry can pass hides every other wait: promising
    /// one would send the caller back to a certain refusal.
    #[test]
    fn a_denial_no_retry_can_pass_promises_no_retry_after() {
        let mut never = denied_per_user(1_000);
        never.retry_after = None;
        never.buckets[1].retry_after = None;
        never.reason = Some("cost 5 is more than per-user's capacity 3");
        let both = [never, denied_per_user(1_000)];
        assert_eq!(retry_after(&both), None);
        let h = render(&both, Options::default());
        assert_eq!(get(&h, RETRY_AFTER), None);
        assert_eq!(get(&h, RATELIMIT), Some(r#""per-user";r=0;t=1"#));
    }

    /// Rust's `Duration` can say "a wait of zero", which Go's client (where
    /// 0 means none) cannot, so vectors.json leaves this case to this test.
    #[test]
    fn a_zero_wait_is_promised_as_zero_seconds() {
        let h = render(&[denied_per_user(0)], Options::default());
        assert_eq!(get(&h, RETRY_AFTER), Some("0"));
        assert_eq!(get(&h, RATELIMIT), Some(r#""per-user";r=0;t=0"#));
    }

    #[test]
    fn only_degraded_decisions_render_nothing() {
        let degraded = Decision {
            allowed: true,
            degraded: true,
            ..denied_per_user(1)
        };
        assert!(render(&[degraded], Options { legacy: true }).is_empty());
    }
}
