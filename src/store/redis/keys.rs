//! Redis key schema: a versioned prefix, the hash tag (the scope, and as the
//! scope's `hash_tag` says, the identity and the operation), the rule
//! and its shape, then the caller's parts, each escaped (or hashed, when
//! long) so no value can reach another key.
//!
//! ```text
//! <prefix>{<tag>}:<rule>:<capacity>/<period µs>:<identity>:<operation>
//! e.g. tg2:{payments}:per-user:100/60000000:alice:*        (hash_tag: scope)
//!      tg2:{payments:alice}:per-user:100/60000000:alice:*  (hash_tag: identity)
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
//!   and scatter one scope's buckets over slots). With the scope's
//!   `hash_tag: identity`, a bucket that has an identity adds `:` and its
//!   part (escaped, or hashed when long) to the tag; with
//!   `identity_operation`, the operation follows likewise (with `*` for an
//!   absent identity). A bucket without those parts keeps the scope's tag,
//!   so per-scope buckets keep their keys whatever the setting. The prefix
//!   may not contain braces, so this tag is the first one in the key, and
//!   since escaping removes every brace, callers can never choose a slot:
//!   they can only be spread by the hash of their own name.

use std::fmt::Write as _;

use crate::config::HashTag;
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
    push_tag(&mut out, key);
    out.push_str("}:");
    push_escaped(&mut out, key.rule);
    // The script's units: microseconds, a stray sub-microsecond rounded up.
    let period_us = bucket.shape.period.div_ceil(1_000).max(1);
    let _ = write!(out, ":{}/{period_us}", bucket.shape.capacity);
    for part in [key.identity, key.operation] {
        out.push(':');
        push_part(&mut out, part);
    }
    out
}

/// A caller's part as keys write it: `*` when absent, else escaped, or `#`
/// and its SHA-256 in hex when long.
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

/// The key that records a reservation as open (made, not yet settled), in
/// the hash slot of the buckets it charged (`bucket`, any of them):
/// `<prefix>{<tag>}:%open:<id in hex>`. No bucket key has a rule part
/// starting with `%o` (escaping writes `%` only before two hex digits).
pub fn open_key(prefix: &str, bucket: &BucketCharge<'_>, id: &[u8; 16]) -> String {
    let mut out = String::with_capacity(prefix.len() + 48 + bucket.key.scope.len());
    out.push_str(prefix);
    out.push('{');
    push_tag(&mut out, &bucket.key);
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
    push_scope_tag(&mut out, key.scope);
    out.push_str("}:%pen");
    for part in [Some(key.identity), key.operation] {
        out.push(':');
        push_part(&mut out, part);
    }
    out
}

/// The hash of the reasons operators gave for a scope's bans,
/// `<prefix>{<scope>}:%bans:why` (field: the index's member, value: the
/// ban's end in µs, `:`, the reason), in the scope's hash slot.
pub fn reasons_key(prefix: &str, scope: &str) -> String {
    bans_key(prefix, scope) + ":why"
}

/// The key of a scope's index of bans in force, in its hash slot: a
/// sorted set whose members are the caller parts of penalty keys (after
/// `%pen:`) and whose scores are the bans' ends, for listing them:
/// `<prefix>{<scope>}:%bans`.
pub fn bans_key(prefix: &str, scope: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 16 + scope.len());
    out.push_str(prefix);
    out.push('{');
    push_scope_tag(&mut out, scope);
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

/// A scope's own tag, as `hash_tag: scope` writes it: the penalty box's
/// keys live there whatever the scope's buckets use (config allows a
/// penalty box only with `hash_tag: scope`).
fn push_scope_tag(out: &mut String, scope: &str) {
    if scope.is_empty() {
        out.push('%');
    } else {
        push_escaped(out, scope);
    }
}

/// The two keys of a concurrency pool, in the hash slot of its scope's
/// buckets of the same tag: `<prefix>{<tag>}:<rule>:%lease:<identity>:<operation>`
/// (the sorted set of live leases) and the same with `%leasew` (their
/// weights). No bucket key has a shape part starting with `%l` (escaping
/// writes `%` only before two hex digits, and `l` is not one).
pub fn lease_keys(prefix: &str, key: &BucketKey<'_>) -> [String; 2] {
    [":%lease", ":%leasew"].map(|kind| {
        let mut out = String::with_capacity(prefix.len() + 48 + key.scope.len() + key.rule.len());
        out.push_str(prefix);
        out.push('{');
        push_tag(&mut out, key);
        out.push_str("}:");
        push_escaped(&mut out, key.rule);
        out.push_str(kind);
        for part in [key.identity, key.operation] {
            out.push(':');
            push_part(&mut out, part);
        }
        out
    })
}

/// The key of a group's quota demand (see [`crate::store::demand`]), in
/// the hash slot of its scope's buckets of the same tag:
/// `<prefix>{<tag>}:<rule>:%rlqs:<identity>:<operation>`, a hash of one
/// entry per replica. Like [`lease_keys`], no bucket key has a shape part
/// starting with `%r` (`r` is not a hex digit).
pub fn demand_key(prefix: &str, key: &BucketKey<'_>) -> String {
    let mut out = String::with_capacity(prefix.len() + 48 + key.scope.len() + key.rule.len());
    out.push_str(prefix);
    out.push('{');
    push_tag(&mut out, key);
    out.push_str("}:");
    push_escaped(&mut out, key.rule);
    out.push_str(":%rlqs");
    for part in [key.identity, key.operation] {
        out.push(':');
        push_part(&mut out, part);
    }
    out
}

/// The hash tag of a bucket's key: buckets with equal tags share a slot.
pub(crate) fn hash_tag(key: &BucketKey<'_>) -> String {
    let mut out = String::new();
    push_tag(&mut out, key);
    out
}

/// True when the bucket's tag holds more than its scope: its slot is its
/// identity's (or identity and operation's), not the one its scope's
/// shared buckets are in.
pub(crate) fn spreads(key: &BucketKey<'_>) -> bool {
    match key.hash_tag {
        HashTag::Scope => false,
        HashTag::Identity => key.identity.is_some(),
        HashTag::IdentityOperation => key.identity.is_some() || key.operation.is_some(),
    }
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

/// The tag: the scope, then the parts its `hash_tag` names that the bucket
/// has. Escaped parts hold no `:`, so the scope ends at the first one.
fn push_tag(out: &mut String, key: &BucketKey<'_>) {
    push_scope_tag(out, key.scope);
    let (identity, operation) = match key.hash_tag {
        HashTag::Scope => (None, None),
        HashTag::Identity => (key.identity, None),
        HashTag::IdentityOperation => (key.identity, key.operation),
    };
    if identity.is_none() && operation.is_none() {
        return;
    }
    out.push(':');
    push_part(out, identity);
    if operation.is_some() {
        out.push(':');
        push_part(out, operation);
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
                hash_tag: HashTag::Scope,
            },
            shape: crate::bucket::Shape {
                capacity: 100,
                period: 60_000_000_000,
            },
            cost: 1,
            shadow: false,
            reserve: 0,
            window: None,
            max_delay: std::time::Duration::ZERO,
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

    fn tagged<'a>(
        tag: HashTag,
        identity: Option<&'a str>,
        operation: Option<&'a str>,
    ) -> BucketCharge<'a> {
        let mut b = key(identity, operation);
        b.key.hash_tag = tag;
        b
    }

    #[test]
    fn the_tag_adds_the_parts_the_scope_names() {
        let at = |tag, identity, operation| bucket_key("tg2:", &tagged(tag, identity, operation));
        let (id, op) = (Some("a:b"), Some("tools/call"));
        assert_eq!(
            at(HashTag::Identity, id, None),
            "tg2:{payments:a%3Ab}:per-user:100/60000000:a%3Ab:*"
        );
        assert_eq!(
            at(HashTag::Identity, id, op),
            "tg2:{payments:a%3Ab}:per-user:100/60000000:a%3Ab:tools/call"
        );
        assert_eq!(
            at(HashTag::IdentityOperation, id, op),
            "tg2:{payments:a%3Ab:tools/call}:per-user:100/60000000:a%3Ab:tools/call"
        );
        assert_eq!(
            at(HashTag::IdentityOperation, None, op),
            "tg2:{payments:*:tools/call}:per-user:100/60000000:*:tools/call"
        );
        // A bucket without the named parts keeps the scope's key.
        for tag in [HashTag::Identity, HashTag::IdentityOperation] {
            assert_eq!(at(tag, None, None), at(HashTag::Scope, None, None));
        }
        // An identity's open records share its buckets' slot.
        let b = tagged(HashTag::Identity, id, None);
        assert!(open_key("tg2:", &b, &[0; 16]).starts_with("tg2:{payments:a%3Ab}:%open:"));
        assert_eq!(slot(&b.key), slot(&tagged(HashTag::Identity, id, op).key));
    }

    #[test]
    fn a_tagged_identity_cannot_pick_its_slot_or_grow_the_key() {
        // Braces in an identity are escaped: the tag stays the first one.
        let k = bucket_key("p:", &tagged(HashTag::Identity, Some("}{x}"), None));
        assert_eq!(k.matches('{').count(), 1, "{k}");
        assert!(k.starts_with("p:{payments:%7D%7Bx%7D}:"), "{k}");
        // A long identity is hashed in the tag as in the key.
        let long = "x".repeat(20_000);
        let k = bucket_key(
            "p:",
            &tagged(HashTag::IdentityOperation, Some(&long), Some(&long)),
        );
        assert!(k.len() < 400, "{}", k.len());
        // Different identities spread over slots.
        let slots: std::collections::HashSet<u16> = (0..100)
            .map(|i| format!("user-{i}"))
            .map(|id| slot(&tagged(HashTag::Identity, Some(&id), None).key))
            .collect();
        assert!(slots.len() > 90, "{}", slots.len());
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
                hash_tag: HashTag::Identity,
            })
        };
        assert_eq!(at("foo"), 12182);
        assert_eq!(at("123456789"), 0x31C3);
    }
}
