//! Redis key schema: a versioned prefix, the scope as the hash tag, the rule
//! and its shape, then the caller's parts, each escaped (or hashed, when
//! long) so no value can reach another key.
//!
//! ```text
//! <prefix>{<scope>}:<rule>:<capacity>/<period µs>:<identity>:<operation>
//! e.g. tg2:{payments}:per-user:100/60000000:alice:*
//! ```
//!
//! - Every part is percent-escaped: bytes outside `[A-Za-z0-9-_.~@+/=]`
//!   become `%XX`. So `:`, `{`, `}`, `%`, `*`, `#`, spaces and all non-ASCII
//!   bytes are escaped, separators cannot be forged, and the mapping is
//!   injective.
//! - An identity or operation longer than
//!   [`MAX_PLAIN_PART`](crate::store::keys::MAX_PLAIN_PART) bytes is
//!   replaced by `#` and its SHA-256 in hex, so a key stays under about 400
//!   bytes whatever a caller sends. No escaped value starts with `#`.
//! - The shape (capacity, and refill period in microseconds) is part of the
//!   key, so a reload that changes a limit starts fresh buckets for it (see
//!   [`crate::store::keys`]).
//! - An absent part (a per-scope bucket has no identity) is `*`, which no
//!   escaped value can be; an empty value is the empty string.
//! - The hash tag is the escaped scope, or `%` for an empty scope (a lone `%`
//!   is never produced by escaping; an empty tag `{}` would hash the whole key
//!   and scatter one scope's buckets over slots). The prefix may not contain
//!   braces, so the scope's tag is the first one in the key and callers can
//!   never choose a slot.

use std::fmt::Write as _;

use crate::store::keys::KeyPart;
use crate::store::{BucketCharge, BucketKey, PenaltyKey};

/// The default prefix (a config default); the number is the schema's version.
pub use crate::config::DEFAULT_REDIS_KEY_PREFIX as DEFAULT_PREFIX;

/// The key of one bucket.
pub fn bucket_key(prefix: &str, bucket: &BucketCharge<'_>) -> String {
    let key = &bucket.key;
    let mut out = String::with_capacity(prefix.len() + 48 + key.scope.len() + key.rule.len());
    out.push_str(prefix);
    out.push('{');
    push_tag(&mut out, key.scope);
    out.push_str("}:");
    push_escaped(&mut out, key.rule);
    // The script's units: microseconds, a stray sub-microsecond rounded up.
    let period_us = bucket.shape.period.div_ceil(1_000).max(1);
    let _ = write!(out, ":{}/{period_us}", bucket.shape.capacity);
    for part in [key.identity, key.operation] {
        out.push(':');
        match KeyPart::of(part) {
            KeyPart::Absent => out.push('*'),
            KeyPart::Plain(value) => push_escaped(&mut out, value),
            KeyPart::Hashed(hash) => {
                out.push('#');
                for b in hash {
                    // Writing to a String cannot fail.
                    let _ = write!(out, "{b:02x}");
                }
            }
        }
    }
    out
}

/// The key that records a reservation as open (made, not yet settled), in
/// the hash slot of the buckets it charged (`bucket`, any of them):
/// `<prefix>{<scope>}:%open:<id in hex>`. No bucket key has a rule part
/// starting with `%o` (escaping writes `%` only before two hex digits).
pub fn open_key(prefix: &str, bucket: &BucketCharge<'_>, id: &[u8; 16]) -> String {
    let mut out = String::with_capacity(prefix.len() + 48 + bucket.key.scope.len());
    out.push_str(prefix);
    out.push('{');
    push_tag(&mut out, bucket.key.scope);
    out.push_str("}:%open:");
    for b in id {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The key of a caller's penalty-box record, in its scope's hash slot, so
/// one script call reads it with the scope's buckets:
/// `<prefix>{<scope>}:%pen:<identity>:<operation>`, the caller's parts
/// escaped or hashed as a bucket's are (`*` for no operation). No bucket
/// key has a rule part starting with `%p` (escaping writes `%` only before
/// two hex digits).
pub fn penalty_key(prefix: &str, key: &PenaltyKey<'_>) -> String {
    let mut out = String::with_capacity(prefix.len() + 48 + key.scope.len());
    out.push_str(prefix);
    out.push('{');
    push_tag(&mut out, key.scope);
    out.push_str("}:%pen");
    for part in [Some(key.identity), key.operation] {
        out.push(':');
        push_part(&mut out, part);
    }
    out
}

/// The key of a scope's index of bans in force, in its hash slot: a
/// sorted set whose members are the caller parts of penalty keys (after
/// `%pen:`) and whose scores are the bans' ends, for listing them:
/// `<prefix>{<scope>}:%bans`.
pub fn bans_key(prefix: &str, scope: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 16 + scope.len());
    out.push_str(prefix);
    out.push('{');
    push_tag(&mut out, scope);
    out.push_str("}:%bans");
    out
}

/// Reads back a caller part [`penalty_key`] wrote (`<identity>:<op>`): the
/// identity and the operation, unescaped (a hashed part stays `#` and its
/// hex).
pub fn caller_of(member: &str) -> (String, Option<String>) {
    let (identity, operation) = member.split_once(':').unwrap_or((member, "*"));
    let operation = (operation != "*").then(|| unescape(operation));
    (unescape(identity), operation)
}

fn unescape(part: &str) -> String {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One caller-controlled part: `*` when absent, escaped, or `#` and its
/// SHA-256 in hex when long.
fn push_part(out: &mut String, part: Option<&str>) {
    match KeyPart::of(part) {
        KeyPart::Absent => out.push('*'),
        KeyPart::Plain(value) => push_escaped(out, value),
        KeyPart::Hashed(hash) => {
            out.push('#');
            for b in hash {
                // Writing to a String cannot fail.
                let _ = write!(out, "{b:02x}");
            }
        }
    }
}

/// The hash tag of a bucket's key: buckets with equal tags share a slot.
pub(crate) fn hash_tag(key: &BucketKey<'_>) -> String {
    let mut out = String::new();
    push_tag(&mut out, key.scope);
    out
}

/// The Cluster hash slot of a bucket's key (CRC16 of its hash tag, modulo
/// 16384, as Redis computes it): charges with equal slots can share a script
/// call.
pub(crate) fn slot(key: &BucketKey<'_>) -> u16 {
    let mut crc: u16 = 0;
    for &b in hash_tag(key).as_bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

fn push_tag(out: &mut String, scope: &str) {
    if scope.is_empty() {
        out.push('%');
    } else {
        push_escaped(out, scope);
    }
}

fn push_escaped(out: &mut String, value: &str) {
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~@+/=".contains(&b) {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key<'a>(identity: Option<&'a str>, operation: Option<&'a str>) -> BucketCharge<'a> {
        BucketCharge {
            key: BucketKey {
                scope: "payments",
                rule: "per-user",
                identity,
                operation,
            },
            shape: crate::bucket::Shape {
                capacity: 100,
                period: 60_000_000_000,
            },
            cost: 1,
            shadow: false,
            reserve: 0,
            window: None,
        }
    }

    #[test]
    fn layout_is_prefix_tag_rule_parts() {
        assert_eq!(
            bucket_key("tg1:", &key(Some("alice"), None)),
            "tg1:{payments}:per-user:100/60000000:alice:*"
        );
    }

    #[test]
    fn separators_and_braces_are_escaped() {
        let k = bucket_key("tg1:", &key(Some("a:b}{c"), Some("%*")));
        assert_eq!(
            k,
            "tg1:{payments}:per-user:100/60000000:a%3Ab%7D%7Bc:%25%2A"
        );
        // The only braces are the scope's tag.
        assert_eq!(k.matches('{').count(), 1);
        assert_eq!(k.matches('}').count(), 1);
    }

    #[test]
    fn absent_and_empty_parts_differ() {
        assert_ne!(
            bucket_key("tg1:", &key(Some(""), None)),
            bucket_key("tg1:", &key(None, None))
        );
        assert_ne!(
            bucket_key("tg1:", &key(Some("*"), None)),
            bucket_key("tg1:", &key(None, None))
        );
    }

    #[test]
    fn a_value_cannot_spill_into_the_next_part() {
        assert_ne!(
            bucket_key("tg1:", &key(Some("a:b"), Some("c"))),
            bucket_key("tg1:", &key(Some("a"), Some("b:c")))
        );
    }

    #[test]
    fn unicode_is_escaped_bytewise() {
        let k = bucket_key("tg1:", &key(Some("é{"), None));
        assert_eq!(k, "tg1:{payments}:per-user:100/60000000:%C3%A9%7B:*");
        assert!(k.is_ascii());
    }

    #[test]
    fn an_empty_scope_still_has_a_tag() {
        let mut k = key(None, None);
        k.key.scope = "";
        k.key.rule = "r";
        assert_eq!(bucket_key("p:", &k), "p:{%}:r:100/60000000:*:*");
        assert_eq!(hash_tag(&k.key), "%");
    }

    #[test]
    fn long_parts_are_hashed_and_keys_stay_bounded() {
        let long = "x".repeat(20_000);
        let k = bucket_key("tg1:", &key(Some(&long), Some(&long)));
        assert!(k.len() < 200, "{}", k.len());
        assert!(k.ends_with(&format!(":#{}", &k[k.len() - 64..])));
        let other = "x".repeat(20_001);
        assert_ne!(k, bucket_key("tg1:", &key(Some(&other), Some(&long))));
        // A short value that looks like a hash is escaped, so it differs.
        let fake = &k[k.rfind(':').unwrap() + 1..][..40];
        let escaped = bucket_key("tg1:", &key(Some(fake), None));
        assert!(
            !escaped.contains(":#") && escaped.contains(":%23"),
            "{escaped}"
        );
    }

    #[test]
    fn the_shape_is_part_of_the_key() {
        let a = key(Some("alice"), None);
        let mut b = a;
        b.shape.capacity = 10;
        assert_ne!(bucket_key("tg1:", &a), bucket_key("tg1:", &b));
    }

    #[test]
    fn slots_are_redis_s_own() {
        // `CLUSTER KEYSLOT foo` is 12182 and `CLUSTER KEYSLOT 123456789`
        // is 12739 (the CRC16 check value 0x31C3).
        let at = |scope: &'static str| {
            slot(&BucketKey {
                scope,
                rule: "r",
                identity: None,
                operation: None,
            })
        };
        assert_eq!(at("foo"), 12182);
        assert_eq!(at("123456789"), 0x31C3);
    }
}
