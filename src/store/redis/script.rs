//! The decision script: its arguments going in and its reply coming out.
//!
//! The script (`decide.lua`) keeps GCRA state in exact integer microseconds
//! and returns each bucket's raw TAT with Redis's `now`; this side turns that
//! into remaining, reset_after and retry_after with [`Shape`]'s 128-bit math,
//! the same code the embedded store uses, so the two cannot disagree.

use std::time::Duration;

use redis::Cmd;

use super::keys::bucket_key;
use crate::bucket::{Shape, Tat};
use crate::store::{BucketOutcome, Charge, ChargeOutcome, StoreError};

/// The script's source.
pub(crate) const SOURCE: &str = include_str!("decide.lua");

/// Why a script reply could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("decision script replied with {got} integers, expected {expected}")]
pub(crate) struct BadReply {
    got: usize,
    expected: usize,
}

/// The script's SHA1, as `EVALSHA` wants it.
pub(crate) fn sha1() -> String {
    redis::Script::new(SOURCE).get_hash().to_owned()
}

/// A bucket's shape in the script's unit, microseconds. Config validation
/// keeps periods whole microseconds; a stray sub-microsecond rounds up, so
/// the refill is never faster than configured.
fn shape_us(shape: Shape) -> Shape {
    Shape {
        capacity: shape.capacity.max(1),
        period: shape.period.div_ceil(1_000).max(1),
    }
}

/// What the script does with a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Decide, and take unless the charge is a dry run.
    Decide,
    /// Give back each bucket's cost, undoing an earlier take exactly.
    Refund,
}

/// One charge's part of a batch call, encoded once by the caller (keys
/// escaped, shapes in microseconds), so a batch only concatenates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Encoded {
    /// The charge's bucket keys, in order.
    pub(crate) keys: Vec<String>,
    /// Its numbers, packed as the script unpacks them: `mode: u8, n: u16`,
    /// then `capacity: i32, period: i64, ±cost: i64` per bucket, little-endian.
    pub(crate) numbers: Vec<u8>,
}

impl Encoded {
    /// Integers the script answers for this charge: status, then a triple
    /// per bucket.
    pub(crate) fn reply_len(&self) -> usize {
        1 + 3 * self.keys.len()
    }
}

/// Encodes one charge for a batch call. The charge must have a bucket.
pub(crate) fn encode(prefix: &str, charge: &Charge<'_>, mode: Mode) -> Encoded {
    let mut numbers = Vec::with_capacity(3 + 20 * charge.buckets.len());
    numbers.push(match (mode, charge.dry_run) {
        (Mode::Refund, _) => 2u8,
        (Mode::Decide, true) => 1,
        (Mode::Decide, false) => 0,
    });
    // A charge has a handful of buckets: the limiter plans one per limit.
    let n = u16::try_from(charge.buckets.len()).unwrap_or(u16::MAX);
    numbers.extend_from_slice(&n.to_le_bytes());
    for b in charge.buckets.iter().take(usize::from(n)) {
        let shape = shape_us(b.shape);
        // Config caps capacity at 50,000,000 and periods at 366 days, and
        // costs come from a u32; saturate rather than wrap if one ever is not.
        let capacity = i32::try_from(shape.capacity).unwrap_or(i32::MAX);
        let period = i64::try_from(shape.period).unwrap_or(i64::MAX);
        let cost = i64::try_from(b.cost.max(1)).unwrap_or(i64::MAX);
        numbers.extend_from_slice(&capacity.to_le_bytes());
        numbers.extend_from_slice(&period.to_le_bytes());
        numbers.extend_from_slice(&(if b.shadow { -cost } else { cost }).to_le_bytes());
    }
    Encoded {
        keys: charge
            .buckets
            .iter()
            .take(usize::from(n))
            .map(|b| bucket_key(prefix, b))
            .collect(),
        numbers,
    }
}

/// One `EVALSHA` deciding every charge of `batch`, in order: every key,
/// then all the numbers as one argument.
pub(crate) fn evalsha<'a>(sha: &str, batch: impl Iterator<Item = &'a Encoded> + Clone) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    let keys: usize = batch.clone().map(|e| e.keys.len()).sum();
    cmd.arg(sha).arg(keys);
    let mut numbers = Vec::new();
    for e in batch {
        for key in &e.keys {
            cmd.arg(key.as_str());
        }
        numbers.extend_from_slice(&e.numbers);
    }
    cmd.arg(numbers);
    cmd
}

/// Reads one charge's part of a batch reply (`status`, then a triple per
/// bucket), decided at `now`. A status of -1 is that charge's own failure.
pub(crate) fn outcome(
    charge: &Charge<'_>,
    now: i64,
    reply: &[i64],
) -> Result<ChargeOutcome, StoreError> {
    let expected = 1 + 3 * charge.buckets.len();
    if reply.len() != expected {
        return Err(StoreError::permanent(BadReply {
            got: reply.len(),
            expected,
        }));
    }
    if reply[0] == -1 {
        // About this charge's keys only (one holds another type), so it
        // does not count against Redis's health. Nothing was taken.
        return Err(StoreError::permanent(
            "a key of this charge holds a value of another type in Redis",
        ));
    }
    let int = |v: i64| u64::try_from(v).unwrap_or(0);
    let now = int(now);
    let buckets = charge
        .buckets
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let at = 1 + 3 * i;
            let conforms = reply[at] == 1;
            let state = Tat {
                ticks: int(reply[at + 1]),
                frac: int(reply[at + 2]),
            };
            let shape = shape_us(b.shape);
            // A bucket that did not conform was left as it was, so judging
            // it again here gives the script's own verdict and its exact wait.
            let retry_after = if conforms {
                None
            } else {
                shape.judge(state, now, b.cost.max(1)).retry_after
            };
            BucketOutcome {
                conforms,
                remaining: shape.remaining(state, now),
                reset_after: Duration::from_micros(shape.reset_after(state, now)),
                retry_after: retry_after.map(Duration::from_micros),
            }
        })
        .collect();
    Ok(ChargeOutcome {
        allowed: reply[0] == 1,
        buckets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BucketCharge, BucketKey};

    fn charge(cost: u64) -> Charge<'static> {
        Charge {
            buckets: vec![BucketCharge {
                key: BucketKey {
                    scope: "s",
                    rule: "r",
                    identity: Some("i"),
                    operation: None,
                },
                shape: Shape {
                    capacity: 3,
                    period: 1_000_000_000,
                },
                cost,
                shadow: false,
            }],
            dry_run: false,
        }
    }

    #[test]
    fn a_batch_is_every_key_then_every_charge_s_numbers_packed() {
        let one = encode("tg1:", &charge(2), Mode::Decide);
        let mut shadow = charge(1);
        shadow.buckets[0].shadow = true;
        shadow.dry_run = true;
        let two = encode("tg1:", &shadow, Mode::Decide);
        let cmd = evalsha("abc", [&one, &two].into_iter());
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let text = |i: usize| String::from_utf8_lossy(&args[i]).into_owned();
        assert_eq!(
            (0..5).map(text).collect::<Vec<_>>(),
            [
                "EVALSHA",
                "abc",
                "2",
                "tg1:{s}:r:3/1000000:i:*",
                "tg1:{s}:r:3/1000000:i:*"
            ]
        );
        let mut numbers = vec![0u8, 1, 0];
        numbers.extend(3i32.to_le_bytes());
        numbers.extend(1_000_000i64.to_le_bytes());
        numbers.extend(2i64.to_le_bytes());
        numbers.extend([1u8, 1, 0]);
        numbers.extend(3i32.to_le_bytes());
        numbers.extend(1_000_000i64.to_le_bytes());
        numbers.extend((-1i64).to_le_bytes());
        assert_eq!(args[5], numbers);
        assert_eq!(args.len(), 6);
        assert_eq!(one.reply_len(), 4);
    }

    #[test]
    fn a_denied_bucket_gets_its_exact_wait() {
        // Empty bucket: TAT one full period ahead of now.
        let now = 10_000_000;
        let reply = [0, 0, now + 1_000_000, 0];
        let out = outcome(&charge(1), now, &reply).unwrap();
        assert!(!out.allowed);
        let b = out.buckets[0];
        assert_eq!(b.remaining, 0);
        assert_eq!(b.reset_after, Duration::from_secs(1));
        // One token every 333_333.33 µs, rounded up.
        assert_eq!(b.retry_after, Some(Duration::from_micros(333_334)));
    }

    #[test]
    fn a_short_reply_is_an_error_not_a_panic() {
        assert!(outcome(&charge(1), 2, &[1, 2]).is_err());
    }

    #[test]
    fn a_failed_charge_is_its_own_error() {
        let e = outcome(&charge(1), 2, &[-1, 0, 0, 0]).unwrap_err();
        assert!(!e.transient);
    }

    #[test]
    fn the_sha_matches_the_source() {
        assert_eq!(sha1().len(), 40);
    }
}
