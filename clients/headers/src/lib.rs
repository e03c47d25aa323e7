//! Tollgate's rate-limit response headers, rendered in one place.
//!
//! Two callers render headers from the same buckets, for two audiences:
//!
//! - [`middleware`]: what an HTTP service answers its own caller, through the
//!   Rust client's tower layer (and, kept equal by `vectors.json`, the Go
//!   client's middleware). draft-ietf-httpapi-ratelimit-headers-11's
//!   `RateLimit-Policy` and `RateLimit`, `Retry-After`, and on request the
//!   legacy `X-RateLimit-*` trio.
//! - [`envoy`]: what the server asks Envoy to add to its response
//!   (`response_headers_to_add` of RLS v3): the legacy trio always, the
//!   draft's fields behind a setting.
//!
//! The two differ on purpose in what they list (see each module), and agree
//! on everything they share: the header names, whole seconds rounded up
//! ([`ceil_secs`]), and how a rule's name is written into a field.
//!
//! # Rule names in a field
//!
//! A rule is named by an RFC 9651 String (`"per-user"`), which the draft
//! allows for a policy's name and which holds only visible ASCII and space.
//! `"` and `\` are escaped with a backslash. Every other byte of the name's
//! UTF-8 (a non-ASCII letter, a control character) is percent-encoded with
//! upper-case hex: `café` is written `"caf%C3%A9"`. Unlike a `?` for each,
//! this keeps the name: percent-decoding gives it back, so a client can
//! match the field to the rule it configured. A `%` already in a name is
//! left as it is, so no ASCII name reads differently than it always has;
//! the price is that a name that itself contains `%` and two hex digits
//! reads the same as the name they would decode to.
//!
//! # The input
//!
//! [`Decision`] and [`Bucket`] are borrowed views. The server and the client
//! build them from their own decision types, so this crate depends on
//! neither, and `vectors.json` can describe every input in plain numbers.

pub mod envoy;
pub mod middleware;

use std::time::Duration;

/// draft-11: the quota policies that applied.
pub const RATELIMIT_POLICY: &str = "ratelimit-policy";
/// draft-11: the current state of those policies.
pub const RATELIMIT: &str = "ratelimit";
/// RFC 9110: whole seconds after which a retry can pass.
pub const RETRY_AFTER: &str = "retry-after";
/// Legacy: the capacity of the most restrictive bucket.
pub const X_RATELIMIT_LIMIT: &str = "x-ratelimit-limit";
/// Legacy: the tokens left in it.
pub const X_RATELIMIT_REMAINING: &str = "x-ratelimit-remaining";
/// Legacy: whole seconds until it is full again.
pub const X_RATELIMIT_RESET: &str = "x-ratelimit-reset";

/// Headers as `(lower-case name, value)` pairs, in the order to send them.
/// Every value is visible ASCII, so it is always a valid header value.
pub type Headers = Vec<(&'static str, String)>;

/// The answer to one request (one descriptor for Envoy, one entry of a
/// batch for the client), as far as the headers need it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision<'a> {
    /// True when the request may proceed.
    pub allowed: bool,
    /// True when it was allowed without being counted (Tollgate's store
    /// was down, or the client could not reach Tollgate and fails open):
    /// no bucket was consulted, so the middleware says nothing of it.
    pub degraded: bool,
    /// On a denial a retry can pass: the wait until it would.
    pub retry_after: Option<Duration>,
    /// Why a denial can never pass by waiting (a cost over a capacity, an
    /// unknown scope). Present means no `Retry-After` is promised.
    pub reason: Option<&'a str>,
    /// The capacity of the most restrictive bucket, as Tollgate reported it
    /// with the decision; 0 when no rule applied. The middleware's legacy
    /// headers show this bucket.
    pub limit: u64,
    /// The tokens left in that bucket.
    pub remaining: u64,
    /// The time until that bucket is full again.
    pub reset_after: Duration,
    /// Every bucket that applied and can deny, in the order of the scope's
    /// limits. Shadow limits, which never deny, are left out by the caller.
    pub buckets: Vec<Bucket<'a>>,
}

impl Decision<'_> {
    /// True for an entry of an atomic batch that was denied only because
    /// another entry was: none of its own buckets ran out, and it has no
    /// wait or reason of its own. It says nothing about when the batch may
    /// pass.
    pub fn denied_by_batch(&self) -> bool {
        !self.allowed
            && self.retry_after.is_none()
            && self.reason.is_none()
            && !self.buckets.iter().any(|b| b.exhausted)
    }
}

/// The state of one bucket after a decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket<'a> {
    /// The rule (limit) it belongs to: the policy's name in the fields.
    pub rule: &'a str,
    /// Its capacity: a policy's `q`.
    pub limit: u64,
    /// Whole tokens left: `r`.
    pub remaining: u64,
    /// The time until it is full again.
    pub reset_after: Duration,
    /// When it does not hold the cost now but can: the time until it does.
    pub retry_after: Option<Duration>,
    /// True when it did not hold the request's cost.
    pub exhausted: bool,
    /// The time in which it refills from empty, so `limit` per this is its
    /// rate: a policy's `w`. `None` when unknown (a server older than the
    /// field), and then no `w` is written rather than a wrong one.
    pub refill_period: Option<Duration>,
}

/// Whole seconds, rounded up: a client that waits this long is not early.
pub fn ceil_secs(d: Duration) -> u64 {
    // Saturating: `Duration::MAX` has a fraction past `u64::MAX` seconds.
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

/// One `RateLimit-Policy` member: `"<rule>";q=<capacity>[;w=<seconds>]`.
fn policy_item(out: &mut String, rule: &str, q: u64, w: Option<u64>) {
    push_rule(out, rule);
    push_param(out, ";q=", q);
    if let Some(w) = w {
        push_param(out, ";w=", w);
    }
}

/// One `RateLimit` member: `"<rule>";r=<remaining>[;t=<seconds>]`.
fn limit_item(out: &mut String, rule: &str, r: u64, t: Option<u64>) {
    push_rule(out, rule);
    push_param(out, ";r=", r);
    if let Some(t) = t {
        push_param(out, ";t=", t);
    }
}

/// A list of members, `, `-separated.
fn list<T>(items: &[T], mut item: impl FnMut(&mut String, &T)) -> String {
    let mut out = String::new();
    for (i, it) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        item(&mut out, it);
    }
    out
}

fn push_param(out: &mut String, key: &str, n: u64) {
    out.push_str(key);
    out.push_str(&n.to_string());
}

/// `rule` as an RFC 9651 String, by the rule in the crate docs: the form
/// every rule name takes in these headers.
pub fn sf_string(rule: &str) -> String {
    let mut out = String::new();
    push_rule(&mut out, rule);
    out
}

/// Writes `rule` as an RFC 9651 String, by the rule in the crate docs.
fn push_rule(out: &mut String, rule: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.reserve(rule.len() + 2);
    out.push('"');
    for byte in rule.bytes() {
        match byte {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(char::from(byte));
            }
            b' '..=b'~' => out.push(char::from(byte)),
            _ => {
                out.push('%');
                out.push(char::from(HEX[usize::from(byte >> 4)]));
                out.push(char::from(HEX[usize::from(byte & 0xF)]));
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quoted(rule: &str) -> String {
        let mut out = String::new();
        push_rule(&mut out, rule);
        out
    }

    #[test]
    fn seconds_round_up_so_a_client_is_never_early() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_nanos(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(2_001)), 3);
        assert_eq!(ceil_secs(Duration::MAX), u64::MAX);
    }

    #[test]
    fn a_rule_name_is_a_valid_string_and_percent_decodes_back() {
        assert_eq!(quoted("per-user"), r#""per-user""#);
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(quoted("café"), r#""caf%C3%A9""#);
        assert_eq!(quoted("tab\there\u{7f}"), r#""tab%09here%7F""#);
        assert_eq!(quoted("日本"), r#""%E6%97%A5%E6%9C%AC""#);
        // Only visible ASCII and space between the quotes, whatever the name.
        let every: String = (0..=0x10FFu32).filter_map(char::from_u32).collect();
        assert!(quoted(&every).bytes().all(|b| (b' '..=b'~').contains(&b)));
    }
}
