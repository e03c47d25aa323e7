//! Bucket math: GCRA in integers, exact to the tick.
//!
//! A bucket of capacity `C` that refills in `P` ticks is stored as one number,
//! its *theoretical arrival time* (TAT): the moment at which it would be full
//! again. Taking `n` tokens moves the TAT forward by `n·P/C` ticks, and a
//! request conforms when the TAT it would leave is at most `P` ticks ahead of
//! now. This is exactly a token bucket with burst `C` and rate `C/P`.
//!
//! `n·P/C` is rarely a whole number of ticks, so the TAT is kept as an exact
//! rational `ticks + frac/C` with `0 <= frac < C`. Nothing is rounded, so no
//! drift accumulates and `retry_after` is exact. The Redis script keeps the
//! same two integers (in microseconds), and this module is its reference.
//!
//! A tick is whatever unit the caller's clock counts: nanoseconds for the
//! embedded store, microseconds on Redis.

/// The shape of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    /// The most tokens the bucket holds: its burst.
    pub capacity: u64,
    /// Ticks for an empty bucket to refill completely.
    pub period: u64,
}

/// A bucket's theoretical arrival time, `ticks + frac / capacity`.
///
/// The default (zero) is "long ago": a full bucket, the same as an absent one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tat {
    /// Whole ticks.
    pub ticks: u64,
    /// Fraction of a tick, in units of `1/capacity`.
    pub frac: u64,
}

impl Tat {
    /// True when a bucket in this state is full at `now`, and so may be forgotten.
    pub fn is_full_at(self, now: u64) -> bool {
        self.ticks < now || (self.ticks == now && self.frac == 0)
    }
}

/// What one bucket says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// True when the bucket holds `cost` tokens now.
    pub conforms: bool,
    /// The state after taking `cost`; meaningful only when `conforms`.
    pub after: Tat,
    /// The state now, before taking anything.
    pub before: Tat,
    /// Ticks until the bucket holds `cost` tokens. `None` when it already
    /// does, or when `cost` exceeds the capacity and never can.
    pub retry_after: Option<u64>,
}

impl Shape {
    /// Judges taking `cost` tokens at `now` from a bucket whose stored state is
    /// `stored` (`Tat::default()` when absent). Pure: the caller decides
    /// whether to keep `after`.
    pub fn judge(self, stored: Tat, now: u64, cost: u64) -> Verdict {
        let before = self.normalise(stored, now);
        if cost > self.capacity {
            return Verdict {
                conforms: false,
                after: before,
                before,
                retry_after: None,
            };
        }
        let after = self.advance(before, cost);
        let limit = now.saturating_add(self.period);
        let conforms = after.ticks < limit || (after.ticks == limit && after.frac == 0);
        let retry_after = if conforms {
            None
        } else {
            // Earliest t with after - t <= period, i.e. t = ceil(after - period).
            let t = after.ticks - self.period + u64::from(after.frac > 0);
            Some(t - now)
        };
        Verdict {
            conforms,
            after,
            before,
            retry_after,
        }
    }

    /// Whole tokens a bucket in state `tat` holds at `now`.
    pub fn remaining(self, tat: Tat, now: u64) -> u64 {
        let tat = self.normalise(tat, now);
        // tokens = floor((now + P - tat) · C / P), with tat = ticks + frac/C.
        // 64-bit when it fits (the usual case), 128-bit otherwise.
        if let Some(full) = self.period.checked_mul(self.capacity)
            && let Some(ahead) = (tat.ticks - now)
                .checked_mul(self.capacity)
                .and_then(|a| a.checked_add(tat.frac))
        {
            return (full.saturating_sub(ahead) / self.period).min(self.capacity);
        }
        let ahead = u128::from(tat.ticks - now) * u128::from(self.capacity) + u128::from(tat.frac);
        let full = u128::from(self.period) * u128::from(self.capacity);
        let left = full.saturating_sub(ahead) / u128::from(self.period);
        u64::try_from(left).unwrap_or(u64::MAX).min(self.capacity)
    }

    /// Ticks until a bucket in state `tat` is full, rounded up.
    pub fn reset_after(self, tat: Tat, now: u64) -> u64 {
        let tat = self.normalise(tat, now);
        tat.ticks - now + u64::from(tat.frac > 0)
    }

    /// The state as of `now`: never earlier than now, and with its fraction
    /// reduced below the capacity (a reload may have changed the capacity).
    fn normalise(self, tat: Tat, now: u64) -> Tat {
        let c = self.capacity.max(1);
        // Only a capacity lowered by a reload leaves frac >= c: skip the
        // division otherwise, as it is the costliest step on this path.
        let tat = if tat.frac < c {
            tat
        } else {
            Tat {
                ticks: tat.ticks.saturating_add(tat.frac / c),
                frac: tat.frac % c,
            }
        };
        if tat.is_full_at(now) {
            Tat {
                ticks: now,
                frac: 0,
            }
        } else {
            tat
        }
    }

    /// `tat + cost·P/C`, exactly.
    fn advance(self, tat: Tat, cost: u64) -> Tat {
        // 64-bit when it fits (the usual case), 128-bit otherwise.
        if let Some(total) = cost
            .checked_mul(self.period)
            .and_then(|t| t.checked_add(tat.frac))
        {
            return Tat {
                ticks: tat.ticks.saturating_add(total / self.capacity),
                frac: total % self.capacity,
            };
        }
        let c = u128::from(self.capacity);
        let total = u128::from(tat.frac) + u128::from(cost) * u128::from(self.period);
        let whole = u64::try_from(total / c).unwrap_or(u64::MAX);
        Tat {
            ticks: tat.ticks.saturating_add(whole),
            // Less than the capacity, which is a u64.
            frac: (total % c) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn full_bucket_admits_its_capacity_then_denies() {
        let shape = Shape {
            capacity: 3,
            period: SEC,
        };
        let mut tat = Tat::default();
        for _ in 0..3 {
            let v = shape.judge(tat, 10 * SEC, 1);
            assert!(v.conforms);
            tat = v.after;
        }
        let v = shape.judge(tat, 10 * SEC, 1);
        assert!(!v.conforms);
        // One token comes back every P/C = 333_333_333.33 ns.
        assert_eq!(v.retry_after, Some(333_333_334));
        assert_eq!(shape.remaining(tat, 10 * SEC), 0);
        assert_eq!(shape.reset_after(tat, 10 * SEC), SEC);
    }

    #[test]
    fn cost_over_capacity_is_never_allowed() {
        let shape = Shape {
            capacity: 5,
            period: SEC,
        };
        let v = shape.judge(Tat::default(), SEC, 6);
        assert!(!v.conforms);
        assert_eq!(v.retry_after, None);
    }

    #[test]
    fn fractional_refill_accumulates_without_drift() {
        let shape = Shape {
            capacity: 3,
            period: 1_000,
        };
        // Drain, then take one token every 333.33 ticks for a long time: the
        // exact rational keeps pace, where a rounded interval would drift.
        let mut now = 1_000_000;
        let mut tat = shape.judge(Tat::default(), now, 3).after;
        for i in 0..30_000u64 {
            let v = shape.judge(tat, now, 1);
            match v.retry_after {
                Some(wait) => now += wait,
                None => panic!("bucket should be empty at step {i}"),
            }
            let v = shape.judge(tat, now, 1);
            assert!(v.conforms, "step {i}");
            tat = v.after;
        }
        // 30_000 tokens take exactly 10_000_000 ticks after the drain.
        assert_eq!(tat.ticks, 1_000_000 + 1_000 + 10_000_000);
        assert_eq!(tat.frac, 0);
    }
}
