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
use crate::store::{BucketOutcome, Charge, ChargeOutcome};

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

/// `EVALSHA` for one charge. The charge must have at least one bucket.
pub(crate) fn evalsha(sha: &str, prefix: &str, charge: &Charge<'_>, mode: Mode) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha).arg(charge.buckets.len());
    for b in &charge.buckets {
        cmd.arg(bucket_key(prefix, b));
    }
    cmd.arg(match (mode, charge.dry_run) {
        (Mode::Refund, _) => "2",
        (Mode::Decide, true) => "1",
        (Mode::Decide, false) => "0",
    });
    for b in &charge.buckets {
        let shape = shape_us(b.shape);
        cmd.arg(shape.capacity)
            .arg(shape.period)
            .arg(b.cost.max(1))
            .arg(if b.shadow { "1" } else { "0" });
    }
    cmd
}

/// Reads the script's reply for `charge`.
pub(crate) fn outcome(charge: &Charge<'_>, reply: &[i64]) -> Result<ChargeOutcome, BadReply> {
    let expected = 2 + 3 * charge.buckets.len();
    if reply.len() != expected {
        return Err(BadReply {
            got: reply.len(),
            expected,
        });
    }
    let int = |i: usize| u64::try_from(reply[i]).unwrap_or(0);
    let now = int(1);
    let buckets = charge
        .buckets
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let at = 2 + 3 * i;
            let conforms = reply[at] == 1;
            let state = Tat {
                ticks: int(at + 1),
                frac: int(at + 2),
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
    fn arguments_are_keys_then_flags_then_shape_in_microseconds() {
        let cmd = evalsha("abc", "tg1:", &charge(2), Mode::Decide);
        let args: Vec<String> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            })
            .collect();
        assert_eq!(
            args,
            [
                "EVALSHA",
                "abc",
                "1",
                "tg1:{s}:r:3/1000000:i:*",
                "0",
                "3",
                "1000000",
                "2",
                "0"
            ]
        );
    }

    #[test]
    fn a_denied_bucket_gets_its_exact_wait() {
        // Empty bucket: TAT one full period ahead of now.
        let now = 10_000_000;
        let reply = [0, now, 0, now + 1_000_000, 0];
        let out = outcome(&charge(1), &reply).unwrap();
        assert!(!out.allowed);
        let b = out.buckets[0];
        assert_eq!(b.remaining, 0);
        assert_eq!(b.reset_after, Duration::from_secs(1));
        // One token every 333_333.33 µs, rounded up.
        assert_eq!(b.retry_after, Some(Duration::from_micros(333_334)));
    }

    #[test]
    fn a_short_reply_is_an_error_not_a_panic() {
        assert!(outcome(&charge(1), &[1, 2]).is_err());
    }

    #[test]
    fn the_sha_matches_the_source() {
        assert_eq!(sha1().len(), 40);
    }
}
