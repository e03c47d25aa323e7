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

/// What a token bucket remembers of the refunds it has given, so a later
/// refund knows how far earlier ones have pulled its TAT back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ledger {
    /// When the bucket was made (its first take, in ticks): a bucket
    /// forgotten when full and made again is another bucket.
    pub born: u64,
    /// Every refund given since, summed, as TAT time (`ticks + frac/C`).
    pub given: Tat,
}

impl Ledger {
    /// The ledger of a bucket made at `now`.
    pub fn new(now: u64) -> Self {
        Self {
            born: now,
            given: Tat::default(),
        }
    }
}

/// What a reservation remembers of a bucket it took from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    /// The state the take left (a budget: its window's end and spend).
    pub taken: Tat,
    /// The bucket's ledger then.
    pub ledger: Ledger,
}

impl Mark {
    /// No state and no ledger: [`Mark::default`], usable in a `const`.
    pub const EMPTY: Mark = Mark {
        taken: Tat { ticks: 0, frac: 0 },
        ledger: Ledger {
            born: 0,
            given: Tat { ticks: 0, frac: 0 },
        },
    };
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
        self.judge_keeping(stored, now, cost, 0)
    }

    /// [`Shape::judge`] for a request that must leave `reserve` tokens in
    /// the bucket (the headroom its priority may not take): it conforms when
    /// the bucket holds `cost + reserve`, and takes only `cost`. Its
    /// `retry_after` is the time until the bucket holds `cost + reserve`,
    /// exact for that priority; `None` when that is more than the capacity.
    pub fn judge_keeping(self, stored: Tat, now: u64, cost: u64, reserve: u64) -> Verdict {
        let before = self.normalise(stored, now);
        let need = cost.saturating_add(reserve);
        if need > self.capacity {
            return Verdict {
                conforms: false,
                after: before,
                before,
                retry_after: None,
            };
        }
        let after = self.advance(before, cost);
        // The state the check is made on: as if `reserve` were taken too.
        let check = if reserve == 0 {
            after
        } else {
            self.advance(before, need)
        };
        let limit = now.saturating_add(self.period);
        let conforms = check.ticks < limit || (check.ticks == limit && check.frac == 0);
        let retry_after = if conforms {
            None
        } else {
            // Earliest t with check - t <= period, i.e. t = ceil(check - period).
            let t = check.ticks - self.period + u64::from(check.frac > 0);
            Some(t - now)
        };
        Verdict {
            conforms,
            after,
            before,
            retry_after,
        }
    }

    /// The state after settling a reservation: it took `estimate` tokens,
    /// and the real cost is `actual`. `ledger` is the bucket's record of
    /// refunds; `mark` is what the reservation saw when it took.
    ///
    /// - `actual > estimate`: the extra is taken unconditionally, but never
    ///   more than the capacity, and never past [`Shape::ceiling`]: a
    ///   reservation without headroom (`reserve` 0) may put the bucket at
    ///   most one period into debt (its TAT `2·P` past now), and one with
    ///   headroom never takes the `reserve` tokens its priority had to
    ///   leave. A bucket already past that ceiling is left where it is. So
    ///   no settle can make others wait more than one period longer than
    ///   an empty bucket would.
    /// - `actual < estimate`: the difference is given back, but never more
    ///   than the reservation still holds the bucket back: the TAT it left,
    ///   less every refund given since, less now. Refunds are the only thing
    ///   that pull a TAT back, so that is the least the TAT can have been
    ///   ahead of the clock at any moment since; tokens the reservation took
    ///   that have refilled on their own (and may have been taken by others)
    ///   are never given back, which would admit them twice. A bucket that
    ///   was forgotten and made again since (a different `born`) gives
    ///   nothing back: it was full in between. `mark: None` is a caller's
    ///   plain refund, bounded only by a full bucket. Every refund is added
    ///   to the ledger.
    #[allow(clippy::too_many_arguments)]
    pub fn settle(
        self,
        stored: Tat,
        ledger: Ledger,
        now: u64,
        estimate: u64,
        actual: u64,
        mark: Option<Mark>,
        reserve: u64,
    ) -> (Tat, Ledger) {
        let before = self.normalise(stored, now);
        if actual > estimate {
            let grown = self.advance(before, (actual - estimate).min(self.capacity));
            let ceiling = self.ceiling(now, reserve);
            let after = if !later(grown, ceiling) {
                grown
            } else if later(before, ceiling) {
                before
            } else {
                ceiling
            };
            return (after, ledger);
        }
        let mut give = self.time_of(estimate - actual);
        if let Some(mark) = mark {
            let since = self.minus(ledger.given, mark.ledger.given);
            let held = match since {
                Some(since) if mark.ledger.born == ledger.born => {
                    self.minus(mark.taken, since).and_then(|t| {
                        self.minus(
                            t,
                            Tat {
                                ticks: now,
                                frac: 0,
                            },
                        )
                    })
                }
                _ => None,
            };
            let held = held.unwrap_or_default();
            if (held.ticks, held.frac) < (give.ticks, give.frac) {
                give = held;
            }
        }
        let ledger = Ledger {
            born: ledger.born,
            given: self.plus(ledger.given, give),
        };
        // before - give, never earlier than now.
        let after = match self.minus(before, give) {
            Some(t) if !t.is_full_at(now) => t,
            _ => Tat {
                ticks: now,
                frac: 0,
            },
        };
        (after, ledger)
    }

    /// The furthest a settle's extra may push the TAT at `now`: `2·P` past
    /// now (one period of debt past an empty bucket) for a reservation made
    /// without headroom; for one that had to leave `reserve` tokens, the
    /// TAT at which the bucket holds exactly `reserve`, `now + (C - reserve)·P/C`.
    pub fn ceiling(self, now: u64, reserve: u64) -> Tat {
        let ahead = if reserve == 0 {
            Tat {
                ticks: self.period.saturating_mul(2),
                frac: 0,
            }
        } else {
            self.time_of(self.capacity.saturating_sub(reserve))
        };
        Tat {
            ticks: now.saturating_add(ahead.ticks),
            frac: ahead.frac,
        }
    }

    /// The refill time of `tokens`, `tokens·P/C`, exactly: as many ticks as
    /// fit, and the rest as a fraction of `1/C`.
    pub fn time_of(self, tokens: u64) -> Tat {
        self.advance(Tat::default(), tokens)
    }

    /// `a - b`, both `ticks + frac/C`; `None` when negative.
    fn minus(self, a: Tat, b: Tat) -> Option<Tat> {
        if a.frac >= b.frac {
            Some(Tat {
                ticks: a.ticks.checked_sub(b.ticks)?,
                frac: a.frac - b.frac,
            })
        } else {
            Some(Tat {
                ticks: a.ticks.checked_sub(b.ticks)?.checked_sub(1)?,
                frac: a.frac + self.capacity.max(1) - b.frac,
            })
        }
    }

    /// `a + b`, both `ticks + frac/C`, saturating.
    fn plus(self, a: Tat, b: Tat) -> Tat {
        let c = self.capacity.max(1);
        let frac = a.frac + b.frac;
        let (carry, frac) = if frac >= c { (1, frac - c) } else { (0, frac) };
        Tat {
            ticks: a.ticks.saturating_add(b.ticks).saturating_add(carry),
            frac,
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

// ---------------------------------------------------------------------
// Shaping (issue 24): admit with a delay instead of denying.
//
// A request that does not conform now but would at `now + d` may be
// admitted now with the instruction "wait d", when `d` is within the
// bound it may wait (the limit's `max_delay`, the request's `max_wait`).
// Its tokens are taken as of its release `s = now + D` (`D` the largest
// wait of the charge's buckets): the state it leaves is `max(TAT, s) +
// n·P/C`, at most `s + P`. Each admitted request's slice of TAT time,
// `[max(TAT, s), max(TAT, s) + n·P/C]`, then starts no earlier than its
// release and ends no later than its release plus `P`, and the slices of
// one bucket never overlap. So the cost released (taken at its `s`) in any
// interval `[a, b]` fits in `[a, b + P]`: at most `C + r·(b - a)`, the
// promise of an unshaped bucket, moved from decision times to release
// times.
// ---------------------------------------------------------------------

/// How a request that may wait up to a bound fares against a [`Verdict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// It conforms now.
    Now,
    /// It conforms after this many ticks, within the bound: admitted, to be
    /// released then.
    After(u64),
    /// It would need longer than the bound: denied. This many ticks from
    /// now the same request would be admitted (with a wait of the bound).
    Beyond(u64),
    /// It never conforms: its cost (and reserve) exceeds the capacity.
    Never,
}

impl Verdict {
    /// How this verdict's request fares when it may wait up to `bound`
    /// ticks. A bound of 0 is today's answer: [`Wait::Beyond`] carries the
    /// verdict's own `retry_after`.
    pub fn wait_within(&self, bound: u64) -> Wait {
        if self.conforms {
            return Wait::Now;
        }
        match self.retry_after {
            None => Wait::Never,
            Some(d) if d <= bound => Wait::After(d),
            Some(d) => Wait::Beyond(d - bound),
        }
    }
}

impl Shape {
    /// The state a request of `cost` leaves when it is released at
    /// `release` (at or after its decision, and at or after the time its
    /// own bucket lets it conform): `max(TAT, release) + cost·P/C`.
    pub fn take_at(self, stored: Tat, release: u64, cost: u64) -> Tat {
        self.advance(self.normalise(stored, release), cost)
    }
}

/// True when `a` is later than `b`, both `ticks + frac/C` of one shape.
fn later(a: Tat, b: Tat) -> bool {
    (a.ticks, a.frac) > (b.ticks, b.frac)
}

/// A calendar budget: at most `amount` spent per window, reset to nothing
/// spent at each window's start.
///
/// Its state is a [`Tat`] too, so stores keep both kinds alike: `ticks` is
/// the end of the window the spend counts for, and `frac` the spend. A
/// state whose window is not the current one counts as nothing spent, and
/// may be forgotten once its window has ended ([`Tat::is_full_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The most that may be spent per window.
    pub amount: u64,
}

impl Budget {
    /// The spend so far in the window ending at `window_end`.
    fn spent(stored: Tat, window_end: u64) -> u64 {
        if stored.ticks == window_end {
            stored.frac
        } else {
            0
        }
    }

    /// Judges spending `cost` at `now` in the window ending at `window_end`,
    /// leaving at least `reserve` unspent (a priority's headroom). When
    /// denied, `retry_after` is the time until the next window starts, or
    /// `None` when `cost + reserve` exceeds the whole budget.
    pub fn judge(self, stored: Tat, window_end: u64, now: u64, cost: u64, reserve: u64) -> Verdict {
        let spent = Self::spent(stored, window_end);
        let before = Tat {
            ticks: window_end,
            frac: spent,
        };
        let need = cost.saturating_add(reserve);
        let conforms = spent.saturating_add(need) <= self.amount;
        let retry_after =
            (!conforms && need <= self.amount).then(|| window_end.saturating_sub(now));
        Verdict {
            conforms,
            after: Tat {
                ticks: window_end,
                frac: spent.saturating_add(cost),
            },
            before,
            retry_after,
        }
    }

    /// The state after settling a reservation of `estimate` whose real cost
    /// is `actual`. The extra is spent unconditionally (the window may go
    /// over budget: later requests wait for the next window), but never
    /// more than the budget, and never past [`Budget::ceiling`]: twice the
    /// budget for a reservation without headroom, and for one that had to
    /// leave `reserve` unspent, the budget less that reserve. A spend
    /// already past it stays. The difference is given back only within
    /// the window the reservation spent in (`taken`'s window; `None`: the
    /// current one); a window that has ended has nothing to give back.
    pub fn settle(
        self,
        stored: Tat,
        window_end: u64,
        estimate: u64,
        actual: u64,
        taken: Option<Mark>,
        reserve: u64,
    ) -> Tat {
        let spent = Self::spent(stored, window_end);
        let frac = if actual >= estimate {
            let grown = spent.saturating_add((actual - estimate).min(self.amount));
            grown.min(self.ceiling(reserve).max(spent))
        } else if taken.is_none_or(|m| m.taken.ticks == window_end) {
            spent.saturating_sub(estimate - actual)
        } else {
            spent
        };
        Tat {
            ticks: window_end,
            frac,
        }
    }

    /// The most a settle's extra may bring a window's spend to: twice the
    /// budget without headroom, the budget less `reserve` with it.
    pub fn ceiling(self, reserve: u64) -> u64 {
        if reserve == 0 {
            self.amount.saturating_mul(2)
        } else {
            self.amount.saturating_sub(reserve)
        }
    }

    /// What is left to spend in the window ending at `window_end`.
    pub fn remaining(self, state: Tat, window_end: u64) -> u64 {
        self.amount.saturating_sub(Self::spent(state, window_end))
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

    /// Found by simulation: an older reservation refunded first pulls the
    /// TAT below where a newer one left it. Bounding the newer one's refund
    /// by its own TAT alone then gave back tokens that had refilled and
    /// been taken: a take at t = 22 passed that no order of real costs
    /// could have let through. The ledger subtracts the refunds given since.
    #[test]
    fn a_refund_never_gives_back_what_an_earlier_refund_already_moved() {
        let shape = Shape {
            capacity: 5,
            period: 12,
        };
        let take = |tat: Tat, now: u64, n: u64| {
            let v = shape.judge(tat, now, n);
            assert!(v.conforms, "take {n} at {now}");
            v.after
        };
        let ledger = Ledger::new(10);
        let mark = |taken: Tat, ledger: Ledger| Some(Mark { taken, ledger });
        // t = 17: two reservations, of 3 and 2 tokens.
        let four = take(Tat { ticks: 17, frac: 0 }, 17, 3);
        let five = take(four, 17, 2);
        let (four_mark, five_mark) = (mark(four, ledger), mark(five, ledger));
        // The older one settles for nothing: all of it comes back.
        let (tat, ledger) = shape.settle(five, ledger, 17, 3, 0, four_mark, 0);
        assert_eq!(tat, Tat { ticks: 21, frac: 4 }, "29 - 7.2 = 21.8");
        // t = 20: a take of 4, then the newer reservation settles for 1.
        let tat = take(tat, 20, 4);
        let (tat, _) = shape.settle(tat, ledger, 20, 2, 1, five_mark, 0);
        // It may give back only 29 - 7.2 - 20 = 1.8 ticks, not 2.4.
        assert_eq!(tat, Tat { ticks: 29, frac: 3 }, "31.4 - 1.8 = 29.6");
        // So at t = 22 a take of 2 (4.8 ticks) is denied, as it would be had
        // every reservation charged its real cost when it was made.
        assert!(!shape.judge(tat, 22, 2).conforms);
    }

    /// Issue 19: a settle of 2^32 - 1 on a reservation of 1 puts the
    /// bucket one period into debt past empty, no further; one made with
    /// headroom leaves that headroom; a bucket already deeper stays put.
    #[test]
    fn a_settle_takes_at_most_one_period_of_debt_and_never_the_reserve() {
        let shape = Shape {
            capacity: 1_000,
            period: 60 * SEC,
        };
        let now = 100 * SEC;
        let taken = shape.judge(Tat::default(), now, 1).after;
        let settle = |stored, reserve| {
            shape
                .settle(
                    stored,
                    Ledger::new(now),
                    now,
                    1,
                    u64::from(u32::MAX),
                    None,
                    reserve,
                )
                .0
        };
        // The extra is at most the capacity: 1 + 1000 tokens taken.
        assert_eq!(
            settle(taken, 0),
            Tat {
                ticks: now + 60_060_000_000,
                frac: 0
            }
        );
        // A second such settle meets the ceiling, a period past empty.
        let deep = settle(settle(taken, 0), 0);
        assert_eq!(
            deep,
            Tat {
                ticks: now + 120 * SEC,
                frac: 0
            }
        );
        // A request of one token then waits one period and one token.
        let wait = shape.judge(deep, now, 1).retry_after;
        assert_eq!(wait, Some(60 * SEC + 60_000_000));
        // With 300 tokens of headroom, 300 stay for CRITICAL.
        let shed = settle(taken, 300);
        assert_eq!(shape.remaining(shed, now), 300);
        assert!(shape.judge(shed, now, 300).conforms);
        // Already deeper than the ceiling: left where it was.
        assert_eq!(settle(deep, 300), deep);
        // A budget: twice the amount at most, or the amount less the reserve.
        let budget = Budget { amount: 1_000 };
        let spent = Tat { ticks: 7, frac: 1 };
        let over = |reserve| budget.settle(spent, 7, 1, u64::MAX, None, reserve).frac;
        assert_eq!(over(0), 1_001, "the extra is at most the budget");
        assert_eq!(
            budget
                .settle(
                    Tat {
                        ticks: 7,
                        frac: 1_500
                    },
                    7,
                    1,
                    2_000,
                    None,
                    0
                )
                .frac,
            2_000
        );
        assert_eq!(over(300), 700);
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

    /// Issue 24: 10/s with capacity 10, waits of up to 2 s, 32 requests at
    /// one instant: 10 now, 20 released 0.1 s apart, the rest denied with
    /// the time until a wait of 2 s would do.
    #[test]
    fn a_burst_is_spread_at_the_rate_within_the_bound() {
        let shape = Shape {
            capacity: 10,
            period: SEC,
        };
        let (now, bound) = (50 * SEC, 2 * SEC);
        let mut tat = Tat::default();
        let mut waits = Vec::new();
        for _ in 0..32 {
            let v = shape.judge(tat, now, 1);
            let wait = v.wait_within(bound);
            match wait {
                Wait::Now => tat = v.after,
                Wait::After(d) => tat = shape.take_at(tat, now + d, 1),
                _ => {}
            }
            waits.push(wait);
        }
        assert!(waits[..10].iter().all(|w| *w == Wait::Now));
        for (i, w) in waits[10..30].iter().enumerate() {
            assert_eq!(
                *w,
                Wait::After((i as u64 + 1) * SEC / 10),
                "request {}",
                i + 10
            );
        }
        assert_eq!(waits[30..], [Wait::Beyond(SEC / 10); 2]);
        // A wait beyond the bound is exact: 0.1 s later the same request
        // is admitted with a wait of exactly the bound.
        let v = shape.judge(tat, now + SEC / 10, 1);
        assert_eq!(v.wait_within(bound), Wait::After(bound));
        assert_eq!(v.wait_within(bound - 1), Wait::Beyond(1));
    }

    /// A release later than the bucket's own TAT (another bucket of the
    /// charge waited longer) takes from the release, not from the TAT: the
    /// tokens never refill "into the past".
    #[test]
    fn a_release_after_the_tat_takes_from_the_release() {
        let shape = Shape {
            capacity: 10,
            period: SEC,
        };
        let tat = Tat {
            ticks: 10 * SEC,
            frac: 0,
        };
        assert_eq!(
            shape.take_at(tat, 12 * SEC, 1),
            Tat {
                ticks: 12 * SEC + SEC / 10,
                frac: 0
            }
        );
        assert_eq!(
            shape.take_at(tat, 9 * SEC, 1),
            Tat {
                ticks: 10 * SEC + SEC / 10,
                frac: 0
            }
        );
    }
}
