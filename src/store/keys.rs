//! What every store puts in a bucket's key besides the names: the bucket's
//! shape, and caller-controlled parts hashed when they are long.
//!
//! - **Shape.** A key names the capacity and refill period it was charged
//!   with, so a reload that changes a limit starts that limit's buckets
//!   afresh (full) instead of reading old state in new units. That makes
//!   loosening take effect at once, and lets a tightened limit through at
//!   most one burst of its *new* capacity. The old keys expire by themselves.
//! - **Long parts.** An identity or operation longer than [`MAX_PLAIN_PART`]
//!   bytes is replaced by its SHA-256, so a key is bounded whatever a
//!   caller sends (an Envoy descriptor used whole as the identity can run
//!   to 18 KB). Short parts stay readable. A hashed part is marked so that
//!   it can never equal a plain one, and SHA-256 makes two long values
//!   sharing a key as unlikely as a SHA-256 collision.

use sha2::{Digest, Sha256};

/// Longest identity or operation kept as it is in a key, in bytes; longer
/// ones are hashed.
pub const MAX_PLAIN_PART: usize = 64;

/// One caller-controlled part of a key, as a store should write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPart<'a> {
    /// Absent: the bucket is not per identity (or operation).
    Absent,
    /// At most [`MAX_PLAIN_PART`] bytes, kept as it is.
    Plain(&'a str),
    /// The SHA-256 of a longer value.
    Hashed([u8; 32]),
}

impl<'a> KeyPart<'a> {
    /// The part for `value`.
    pub fn of(value: Option<&'a str>) -> Self {
        match value {
            None => Self::Absent,
            Some(v) if v.len() <= MAX_PLAIN_PART => Self::Plain(v),
            Some(v) => Self::Hashed(Sha256::digest(v.as_bytes()).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_parts_stay_and_long_ones_are_hashed() {
        let short = "a".repeat(MAX_PLAIN_PART);
        assert_eq!(KeyPart::of(Some(&short)), KeyPart::Plain(&short));
        let long = "a".repeat(MAX_PLAIN_PART + 1);
        assert!(matches!(KeyPart::of(Some(&long)), KeyPart::Hashed(_)));
        assert_ne!(
            KeyPart::of(Some(&long)),
            KeyPart::of(Some(&"a".repeat(MAX_PLAIN_PART + 2)))
        );
        assert_eq!(KeyPart::of(None), KeyPart::Absent);
    }
}
