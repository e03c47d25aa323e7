//! Redis key schema: a versioned prefix, the scope as the hash tag, then the
//! rule and the caller's parts, each escaped so no value can reach another key.
//!
//! ```text
//! <prefix>{<scope>}:<rule>:<identity>:<operation>      e.g. tg1:{payments}:per-user:alice:*
//! ```
//!
//! - Every part is percent-escaped: bytes outside `[A-Za-z0-9-_.~@+/=]`
//!   become `%XX`. So `:`, `{`, `}`, `%`, `*`, spaces and all non-ASCII bytes
//!   are escaped, separators cannot be forged, and the mapping is injective.
//! - An absent part (a per-scope bucket has no identity) is `*`, which no
//!   escaped value can be; an empty value is the empty string.
//! - The hash tag is the escaped scope, or `%` for an empty scope (a lone `%`
//!   is never produced by escaping; an empty tag `{}` would hash the whole key
//!   and scatter one scope's buckets over slots). The prefix may not contain
//!   braces, so the scope's tag is the first one in the key and callers can
//!   never choose a slot.
//! - Values are not hashed: the API caps identity and operation at 256 bytes,
//!   so a key is at most a few kilobytes, and escaping cannot collide.

use std::fmt::Write as _;

use crate::store::BucketKey;

/// The default prefix (a config default); the number is the schema's version.
pub use crate::config::DEFAULT_REDIS_KEY_PREFIX as DEFAULT_PREFIX;

/// The key of one bucket.
pub(crate) fn bucket_key(prefix: &str, key: &BucketKey<'_>) -> String {
    let mut out = String::with_capacity(prefix.len() + 16 + key.scope.len() + key.rule.len());
    out.push_str(prefix);
    out.push('{');
    push_tag(&mut out, key.scope);
    out.push_str("}:");
    push_escaped(&mut out, key.rule);
    for part in [key.identity, key.operation] {
        out.push(':');
        match part {
            Some(value) => push_escaped(&mut out, value),
            None => out.push('*'),
        }
    }
    out
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

    fn key<'a>(identity: Option<&'a str>, operation: Option<&'a str>) -> BucketKey<'a> {
        BucketKey {
            scope: "payments",
            rule: "per-user",
            identity,
            operation,
        }
    }

    #[test]
    fn layout_is_prefix_tag_rule_parts() {
        assert_eq!(
            bucket_key("tg1:", &key(Some("alice"), None)),
            "tg1:{payments}:per-user:alice:*"
        );
    }

    #[test]
    fn separators_and_braces_are_escaped() {
        let k = bucket_key("tg1:", &key(Some("a:b}{c"), Some("%*")));
        assert_eq!(k, "tg1:{payments}:per-user:a%3Ab%7D%7Bc:%25%2A");
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
        assert_eq!(k, "tg1:{payments}:per-user:%C3%A9%7B:*");
        assert!(k.is_ascii());
    }

    #[test]
    fn an_empty_scope_still_has_a_tag() {
        let k = BucketKey {
            scope: "",
            rule: "r",
            identity: None,
            operation: None,
        };
        assert_eq!(bucket_key("p:", &k), "p:{%}:r:*:*");
        assert_eq!(hash_tag(&k), "%");
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
