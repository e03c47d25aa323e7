//! Every HTTP rendering of a decision: the rate-limit headers (through
//! `tollgate-headers`, which the server shares) and the
//! `application/problem+json` body of a 429.
//!
//! One HTTP response can carry several decisions (an MCP batch is one atomic
//! batch with an entry per distinct operation), so everything here takes a
//! slice.
//!
//! The headers are rendered by `tollgate_headers::middleware`, whose docs
//! give the mapping from token buckets to the draft's fields; its test
//! vectors (`clients/headers/vectors.json`) are the ones the Go client
//! checks, so both clients answer alike. In short:
//!
//! - `RateLimit-Policy: "<rule>";q=<capacity>;w=<seconds>`, one item per rule
//!   that applied, `w` the bucket's refill period (left out when Tollgate did
//!   not report it).
//! - `RateLimit: "<rule>";r=<remaining>;t=<seconds>`: every rule when
//!   allowed, with `t` the time until full; only the rules that denied on a
//!   denial, with `t` the time until the request would pass, so
//!   `Retry-After` is never earlier than any `t` (draft section 6).
//! - Seconds are always rounded up: a client that waits that long is not
//!   early. A rule name outside visible ASCII is percent-encoded.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
pub use tollgate_headers::ceil_secs;

use crate::decision::{BucketStatus, Decision};

/// The draft-11 field naming a quota policy.
pub const RATELIMIT_POLICY: HeaderName =
    HeaderName::from_static(tollgate_headers::RATELIMIT_POLICY);
/// The draft-11 field with the current service limit.
pub const RATELIMIT: HeaderName = HeaderName::from_static(tollgate_headers::RATELIMIT);
/// Legacy: the capacity of the most restrictive bucket.
pub const X_RATELIMIT_LIMIT: HeaderName =
    HeaderName::from_static(tollgate_headers::X_RATELIMIT_LIMIT);
/// Legacy: the tokens left in it.
pub const X_RATELIMIT_REMAINING: HeaderName =
    HeaderName::from_static(tollgate_headers::X_RATELIMIT_REMAINING);
/// Legacy: seconds until it is full again.
pub const X_RATELIMIT_RESET: HeaderName =
    HeaderName::from_static(tollgate_headers::X_RATELIMIT_RESET);

/// The problem type of draft-11 section 5.1.
pub const QUOTA_EXCEEDED_TYPE: &str =
    "https://iana.org/assignments/http-problem-types#quota-exceeded";
/// The problem type of draft-11 section 5.3, for a caller Tollgate's
/// penalty box has banned.
pub const ABNORMAL_USAGE_TYPE: &str =
    "https://iana.org/assignments/http-problem-types#abnormal-usage-detected";
/// The media type of an RFC 9457 problem document.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Which rate-limit headers to render: `legacy` adds `X-RateLimit-Limit`,
/// `X-RateLimit-Remaining` and `X-RateLimit-Reset` (seconds until full),
/// for clients written against the older, de-facto headers.
pub use tollgate_headers::middleware::Options as HeaderOptions;

/// True when any decision denied.
pub fn denied(decisions: &[Decision]) -> bool {
    decisions.iter().any(|d| !d.allowed)
}

/// For a denial: the time after which every denied decision would pass, the
/// longest of their `retry_after`s. Entries of an atomic batch denied only
/// because another entry was ([`Decision::denied_by_batch`]) have no wait of
/// their own and are skipped. `None` when nothing was denied, or when one
/// denial can never pass (no retry can succeed, so none is promised). The
/// same wait as the `Retry-After` that [`render`] writes.
pub fn retry_after(decisions: &[Decision]) -> Option<Duration> {
    tollgate_headers::middleware::retry_after(&views(decisions))
}

/// The rules that denied, each once, in order of appearance.
pub fn violated_policies(decisions: &[Decision]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for rule in decisions.iter().flat_map(Decision::violated_policies) {
        if !out.contains(&rule) {
            out.push(rule);
        }
    }
    out
}

/// The headers for a response carrying these decisions: `RateLimit-Policy`
/// and `RateLimit` (and the legacy trio if asked) when any rule applied, and
/// `Retry-After` on a denial a retry can pass. Decisions made locally by the
/// failure policy, or degraded by Tollgate, add nothing: no bucket was
/// consulted, so there is nothing true to say.
pub fn render(decisions: &[Decision], options: HeaderOptions) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in tollgate_headers::middleware::render(&views(decisions), options) {
        // Names are the crate's constants and values visible ASCII, so
        // neither can fail; if one ever did, leaving the header out is
        // better than a panic.
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            headers.insert(name, value);
        }
    }
    let (policy, limit) = lease_items(decisions);
    append_items(&mut headers, "ratelimit-policy", &policy);
    append_items(&mut headers, "ratelimit", &limit);
    headers
}

/// The quota unit parameter of a concurrency limit's `RateLimit-Policy`
/// item: its quota counts requests in flight, so the item has no `w`.
pub const CONCURRENT_UNIT: &str = ";qu=\"concurrent-requests\"";

/// The `RateLimit-Policy` and `RateLimit` items of the leases behind
/// `decisions` (docs/leases.md): `"<rule>";q=<concurrency>;qu="concurrent-requests"`
/// per pool that applied; `"<rule>";r=<slots left>` for a lease held, or
/// `"<rule>";r=0;t=<seconds>` for a full pool (t when a retry can pass). A
/// degraded lease says nothing. Rendered here rather than in
/// `tollgate-headers`, whose output the Go client and the server share
/// through the test vectors.
fn lease_items(decisions: &[Decision]) -> (Vec<String>, Vec<String>) {
    let (mut policy, mut limit) = (Vec::new(), Vec::new());
    for d in decisions {
        let Some(l) = d
            .lease
            .as_ref()
            .filter(|l| !l.degraded && !l.rule.is_empty())
        else {
            continue;
        };
        let rule = tollgate_headers::sf_string(&l.rule);
        policy.push(format!("{rule};q={}{CONCURRENT_UNIT}", l.limit));
        if l.granted {
            limit.push(format!("{rule};r={}", l.limit.saturating_sub(l.in_flight)));
        } else if d.lease_denied() {
            let t = d
                .retry_after
                .map(|r| format!(";t={}", ceil_secs(r)))
                .unwrap_or_default();
            limit.push(format!("{rule};r=0{t}"));
        }
    }
    (policy, limit)
}

fn append_items(headers: &mut HeaderMap, name: &'static str, items: &[String]) {
    if items.is_empty() {
        return;
    }
    let mut value = headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_default();
    for item in items {
        if !value.is_empty() {
            value.push_str(", ");
        }
        value.push_str(item);
    }
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

fn views(decisions: &[Decision]) -> Vec<tollgate_headers::Decision<'_>> {
    decisions
        .iter()
        .map(|d| tollgate_headers::Decision {
            allowed: d.allowed,
            degraded: d.degraded,
            retry_after: d.retry_after,
            reason: Some(d.reason.as_str()).filter(|r| !r.is_empty()),
            limit: d.limit,
            remaining: d.remaining,
            reset_after: d.reset_after,
            buckets: d.buckets.iter().map(bucket).collect(),
        })
        .collect()
}

fn bucket(b: &BucketStatus) -> tollgate_headers::Bucket<'_> {
    tollgate_headers::Bucket {
        rule: &b.rule,
        limit: b.limit,
        remaining: b.remaining,
        reset_after: b.reset_after,
        retry_after: b.retry_after,
        exhausted: b.exhausted,
        refill_period: b.refill_period,
    }
}

/// The `application/problem+json` body of a 429 (RFC 9457, with draft-11's
/// `quota-exceeded` type, or `abnormal-usage-detected` for a banned
/// caller, and `violated-policies` member).
pub fn problem_details(decisions: &[Decision]) -> Vec<u8> {
    problem_details_with_status(decisions, http::StatusCode::TOO_MANY_REQUESTS)
}

/// [`problem_details`] for a refusal answered with another status: 503
/// for a full concurrency pool that protects a backend (see
/// [`crate::layer::Concurrency::deny_status`]).
pub fn problem_details_with_status(decisions: &[Decision], status: http::StatusCode) -> Vec<u8> {
    let banned = decisions.iter().any(|d| !d.allowed && d.banned);
    let (kind, title) = if banned {
        (ABNORMAL_USAGE_TYPE, "Abnormal usage detected")
    } else {
        (QUOTA_EXCEEDED_TYPE, "Quota exceeded")
    };
    let mut body = serde_json::json!({
        "type": kind,
        "title": title,
        "status": status.as_u16(),
        "violated-policies": violated_policies(decisions),
    });
    let reasons: Vec<&str> = decisions
        .iter()
        .filter(|d| !d.allowed && !d.reason.is_empty())
        .map(|d| d.reason.as_str())
        .collect();
    let detail = match retry_after(decisions) {
        Some(r) => format!("Retry in {} s.", ceil_secs(r)),
        None if !reasons.is_empty() => reasons.join("; "),
        None => "This request cannot be allowed by retrying it.".to_owned(),
    };
    body["detail"] = detail.into();
    body.to_string().into_bytes()
}

/// A plain RFC 9457 problem document, for the layer's other refusals (bad
/// input, an oversized body, Tollgate unavailable while failing closed).
pub fn problem(status: http::StatusCode, title: &str, detail: &str) -> Vec<u8> {
    serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{BucketStatus, FailureCause};

    fn bucket(rule: &str, limit: u64, remaining: u64, reset_ms: u64) -> BucketStatus {
        BucketStatus {
            rule: rule.into(),
            limit,
            remaining,
            reset_after: Duration::from_millis(reset_ms),
            retry_after: None,
            exhausted: false,
            refill_period: None,
        }
    }

    fn allowed() -> Decision {
        Decision {
            allowed: true,
            limit: 3,
            remaining: 2,
            reset_after: Duration::from_millis(3_334),
            rule: "per-user".into(),
            buckets: vec![
                bucket("global", 1000, 990, 600),
                bucket("per-user", 3, 2, 3_334),
            ],
            ..Decision::default()
        }
    }

    fn denied_per_user(retry_ms: u64) -> Decision {
        let mut per_user = bucket("per-user", 3, 0, 10_000);
        per_user.exhausted = true;
        per_user.retry_after = Some(Duration::from_millis(retry_ms));
        Decision {
            allowed: false,
            retry_after: Some(Duration::from_millis(retry_ms)),
            limit: 3,
            remaining: 0,
            reset_after: Duration::from_millis(10_000),
            rule: "per-user".into(),
            buckets: vec![bucket("global", 1000, 990, 600), per_user],
            ..Decision::default()
        }
    }

    fn get<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn seconds_round_up() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_nanos(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(3)), 3);
        assert_eq!(ceil_secs(Duration::from_millis(3_001)), 4);
    }

    #[test]
    fn an_allowed_response_lists_every_policy_and_its_limit() {
        let h = render(&[allowed()], HeaderOptions::default());
        assert_eq!(
            get(&h, "ratelimit-policy"),
            Some(r#""global";q=1000, "per-user";q=3"#)
        );
        assert_eq!(
            get(&h, "ratelimit"),
            Some(r#""global";r=990;t=1, "per-user";r=2;t=4"#)
        );
        assert_eq!(get(&h, "retry-after"), None);
        assert_eq!(get(&h, "x-ratelimit-limit"), None);
    }

    #[test]
    fn a_denial_shows_the_violated_policy_and_a_rounded_up_retry_after() {
        let h = render(&[denied_per_user(2_100)], HeaderOptions { legacy: true });
        assert_eq!(
            get(&h, "ratelimit-policy"),
            Some(r#""global";q=1000, "per-user";q=3"#)
        );
        assert_eq!(get(&h, "ratelimit"), Some(r#""per-user";r=0;t=3"#));
        assert_eq!(get(&h, "retry-after"), Some("3"));
        assert_eq!(get(&h, "x-ratelimit-limit"), Some("3"));
        assert_eq!(get(&h, "x-ratelimit-remaining"), Some("0"));
        assert_eq!(get(&h, "x-ratelimit-reset"), Some("10"));
    }

    #[test]
    fn legacy_headers_follow_the_bucket_with_least_left() {
        let h = render(&[allowed()], HeaderOptions { legacy: true });
        assert_eq!(get(&h, "x-ratelimit-limit"), Some("3"));
        assert_eq!(get(&h, "x-ratelimit-remaining"), Some("2"));
        assert_eq!(get(&h, "x-ratelimit-reset"), Some("4"));
    }

    #[test]
    fn several_decisions_merge_per_rule_and_retry_after_is_the_longest() {
        let mut other = denied_per_user(5_500);
        other.buckets[1].remaining = 0;
        let both = [allowed(), denied_per_user(1_000), other];
        let h = render(&both, HeaderOptions::default());
        assert_eq!(get(&h, "ratelimit"), Some(r#""per-user";r=0;t=6"#));
        assert_eq!(get(&h, "retry-after"), Some("6"));
        assert_eq!(violated_policies(&both), ["per-user"]);
    }

    #[test]
    fn a_denial_no_retry_can_pass_promises_no_retry_after() {
        let mut never = denied_per_user(1_000);
        never.retry_after = None;
        never.buckets[1].retry_after = None;
        never.reason = "cost 5 is more than per-user's capacity 3".into();
        let h = render(
            &[never.clone(), denied_per_user(1_000)],
            HeaderOptions::default(),
        );
        assert_eq!(get(&h, "retry-after"), None);
        assert_eq!(get(&h, "ratelimit"), Some(r#""per-user";r=0;t=1"#));
        let body: serde_json::Value = serde_json::from_slice(&problem_details(&[never])).unwrap();
        assert_eq!(body["detail"], "cost 5 is more than per-user's capacity 3");
    }

    #[test]
    fn the_policy_carries_the_refill_period_as_w_in_whole_seconds_rounded_up() {
        let mut d = allowed();
        d.buckets[0].refill_period = Some(Duration::from_secs(60));
        d.buckets[1].refill_period = Some(Duration::from_millis(1_500));
        let h = render(&[d.clone()], HeaderOptions::default());
        assert_eq!(
            get(&h, "ratelimit-policy"),
            Some(r#""global";q=1000;w=60, "per-user";q=3;w=2"#)
        );
        // A server that does not report the period gets no w, not a wrong one.
        d.buckets[1].refill_period = None;
        let h = render(&[d], HeaderOptions::default());
        assert_eq!(
            get(&h, "ratelimit-policy"),
            Some(r#""global";q=1000;w=60, "per-user";q=3"#)
        );
    }

    /// An atomic batch denied by one entry denies the others too; they carry
    /// no wait of their own and must not hide the wait of the entry that did.
    #[test]
    fn an_atomic_batch_denial_takes_its_wait_from_the_entries_that_denied() {
        let bystander = Decision {
            allowed: false,
            buckets: vec![bucket("global", 1000, 990, 600), bucket("fetch", 5, 3, 800)],
            ..Decision::default()
        };
        let denier = denied_per_user(4_200);
        assert!(bystander.denied_by_batch());
        assert!(!denier.denied_by_batch());
        assert!(!allowed().denied_by_batch());
        let both = [bystander, denier];
        assert_eq!(retry_after(&both), Some(Duration::from_millis(4_200)));
        let h = render(&both, HeaderOptions { legacy: true });
        assert_eq!(get(&h, "retry-after"), Some("5"));
        assert_eq!(get(&h, "ratelimit"), Some(r#""per-user";r=0;t=5"#));
        assert_eq!(get(&h, "x-ratelimit-limit"), Some("3"));
        assert_eq!(violated_policies(&both), ["per-user"]);
        let body: serde_json::Value = serde_json::from_slice(&problem_details(&both)).unwrap();
        assert_eq!(body["detail"], "Retry in 5 s.");
    }

    #[test]
    fn local_and_degraded_decisions_render_nothing() {
        let local = Decision::fail_open(FailureCause::DeadlineExceeded);
        assert!(render(&[local], HeaderOptions { legacy: true }).is_empty());
    }

    /// The same rule as the server's: a name outside visible ASCII is
    /// percent-encoded, so it can be read back, not replaced by `?`.
    #[test]
    fn rule_names_are_escaped_as_structured_field_strings() {
        let mut d = allowed();
        d.buckets[0].rule = r#"a"b\c"#.into();
        d.buckets[1].rule = "per-üser\t".into();
        let h = render(&[d], HeaderOptions::default());
        assert_eq!(
            get(&h, "ratelimit-policy"),
            Some(r#""a\"b\\c";q=1000, "per-%C3%BCser%09";q=3"#)
        );
    }

    #[test]
    fn the_problem_body_is_quota_exceeded_with_violated_policies() {
        let body: serde_json::Value =
            serde_json::from_slice(&problem_details(&[denied_per_user(2_100)])).unwrap();
        assert_eq!(body["type"], QUOTA_EXCEEDED_TYPE);
        assert_eq!(body["status"], 429);
        assert_eq!(body["violated-policies"], serde_json::json!(["per-user"]));
        assert_eq!(body["detail"], "Retry in 3 s.");
    }

    #[test]
    fn a_banned_caller_gets_the_abnormal_usage_problem_type() {
        let mut banned = denied_per_user(90_000);
        banned.banned = true;
        banned.buckets.clear();
        let body: serde_json::Value = serde_json::from_slice(&problem_details(&[banned])).unwrap();
        assert_eq!(body["type"], ABNORMAL_USAGE_TYPE);
        assert_eq!(body["title"], "Abnormal usage detected");
        assert_eq!(body["detail"], "Retry in 90 s.");
    }

    fn leased(granted: bool, in_flight: u64) -> Decision {
        Decision {
            allowed: granted,
            retry_after: (!granted).then(|| Duration::from_millis(2_500)),
            lease: Some(crate::lease::Lease {
                granted,
                limit: 3,
                in_flight,
                rule: "streams".into(),
                ..crate::lease::Lease::default()
            }),
            ..Decision::default()
        }
    }

    #[test]
    fn a_lease_adds_a_concurrent_requests_policy_and_the_slots_left() {
        let h = render(&[leased(true, 2)], HeaderOptions::default());
        assert_eq!(
            get(&h, "ratelimit-policy"),
            Some(r#""streams";q=3;qu="concurrent-requests""#)
        );
        assert_eq!(get(&h, "ratelimit"), Some(r#""streams";r=1"#));

        let h = render(&[leased(false, 3)], HeaderOptions::default());
        assert_eq!(get(&h, "ratelimit"), Some(r#""streams";r=0;t=3"#));
        assert_eq!(get(&h, "retry-after"), Some("3"));
        assert_eq!(violated_policies(&[leased(false, 3)]), ["streams"]);

        let mut degraded = leased(true, 0);
        degraded.lease.as_mut().unwrap().degraded = true;
        assert!(render(&[degraded], HeaderOptions::default()).is_empty());
    }
}
