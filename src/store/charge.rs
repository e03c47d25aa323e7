//! What a store is asked to do, and what it answers: charges of buckets,
//! settlements of earlier charges, and their outcomes, with the bucket math
//! each store applies to them (in its own ticks).
//!
//! The types are plain data; the contract that says how a store must apply
//! them is [`super::Store`]'s.

use std::time::Duration;

use smallvec::SmallVec;

use super::lease::{LeaseCall, LeaseOutcome};
use super::penalty::{Penalty, PenaltyOutcome};
use crate::bucket::{Budget, Ledger, Mark, Shape, Tat, Verdict, Wait};
use crate::config::HashTag;
use crate::window::Window;

/// Names one bucket. Stores encode it into their own key format; every part
/// that a caller controls (`identity`, `operation`) must be escaped or hashed
/// there, so that no value can address another bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BucketKey<'a> {
    /// The scope whose rule this bucket belongs to. Validated, not escaped.
    pub scope: &'a str,
    /// The rule (limit) name within the scope. From the config, not callers.
    pub rule: &'a str,
    /// The caller's identity, for per-identity buckets.
    pub identity: Option<&'a str>,
    /// The operation, for per-operation buckets.
    pub operation: Option<&'a str>,
    /// Which of the parts above choose the bucket's Redis hash slot: its
    /// scope's setting. Part of the key, so a change starts fresh buckets
    /// where it moves them. The embedded store ignores it.
    pub hash_tag: HashTag,
}

/// One bucket's part in a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketCharge<'a> {
    /// Which bucket.
    pub key: BucketKey<'a>,
    /// Its capacity and refill period.
    pub shape: Shape,
    /// Tokens to take from it, at least 1.
    pub cost: u64,
    /// A shadow bucket is judged and, when it has room, charged, but it never
    /// causes a denial. It lets operators try a limit before enforcing it.
    pub shadow: bool,
    /// Tokens the request must leave in the bucket: the headroom that its
    /// priority may not take. It conforms only when the bucket holds
    /// `cost + reserve`, and then `cost` is taken. 0 for CRITICAL.
    pub reserve: u64,
    /// Set for a calendar budget: `shape.capacity` is then the budget per
    /// window, and the bucket counts spend in the window that holds the
    /// store's clock instead of refilling at a rate.
    pub window: Option<&'a Window>,
    /// Shaping: the longest the request may wait for this bucket (the
    /// limit's `max_delay`, no longer than the request's `max_wait`). A
    /// request this bucket would let through within it is admitted with
    /// that wait instead of denied. Zero: no wait, today's answer. Ignored
    /// for shadow buckets and budgets, which never delay.
    pub max_delay: Duration,
}

impl<'a> BucketCharge<'a> {
    /// A plain token-bucket charge: enforced, no headroom, no window.
    pub fn new(key: BucketKey<'a>, shape: Shape, cost: u64) -> Self {
        Self {
            key,
            shape,
            cost,
            shadow: false,
            reserve: 0,
            window: None,
            max_delay: Duration::ZERO,
        }
    }
}

impl BucketCharge<'_> {
    /// Judges this charge against `stored` at `now`, all in the store's
    /// ticks (the shape too). `window_end` is the end of a budget's current
    /// window; token buckets ignore it.
    pub fn judge(&self, stored: Tat, now: u64, window_end: u64) -> Verdict {
        match self.window {
            None => self
                .shape
                .judge_keeping(stored, now, self.cost, self.reserve),
            Some(_) => Budget {
                amount: self.shape.capacity,
            }
            .judge(stored, window_end, now, self.cost, self.reserve),
        }
    }

    /// [`BucketCharge::judge`] for a request that may wait up to
    /// `max_delay` (in ticks of `tick_ns` nanoseconds, rounded down, so a
    /// wait never exceeds it). The verdict `conforms` when the bucket lets
    /// the request through within that wait, and its `retry_after` is then
    /// the time until it would within the bound ([`Wait::Beyond`]). The
    /// second value is the wait, 0 when it conforms now.
    pub fn judge_shaped(
        &self,
        stored: Tat,
        now: u64,
        window_end: u64,
        tick_ns: u64,
    ) -> (Verdict, u64) {
        let verdict = self.judge(stored, now, window_end);
        if self.shadow || self.window.is_some() || self.max_delay.is_zero() {
            return (verdict, 0);
        }
        let bound = u64::try_from(self.max_delay.as_nanos() / u128::from(tick_ns.max(1)))
            .unwrap_or(u64::MAX);
        match verdict.wait_within(bound) {
            Wait::Now | Wait::Never => (verdict, 0),
            Wait::After(wait) => (
                Verdict {
                    conforms: true,
                    retry_after: None,
                    ..verdict
                },
                wait,
            ),
            Wait::Beyond(retry) => (
                Verdict {
                    retry_after: Some(retry),
                    ..verdict
                },
                0,
            ),
        }
    }

    /// The state this charge leaves when its request is released `wait`
    /// ticks after `now`: `verdict.after` for no wait, else the tokens taken
    /// as of the release ([`Shape::take_at`]). Budgets never wait.
    pub fn taken_at(&self, verdict: &Verdict, now: u64, wait: u64) -> Tat {
        if wait == 0 || self.window.is_some() {
            verdict.after
        } else {
            self.shape
                .take_at(verdict.before, now.saturating_add(wait), self.cost)
        }
    }

    /// The state after settling this charge (taken earlier) at `actual`,
    /// in the store's ticks (nanoseconds: the Redis script does its own).
    /// Debt is bounded by the charge's `reserve` (the headroom the
    /// reservation's priority had to leave): see [`Shape::settle`] and
    /// [`Budget::settle`].
    pub fn settle(
        &self,
        stored: Tat,
        ledger: Ledger,
        now: u64,
        window_end: u64,
        part: &SettleBucket<'_>,
    ) -> (Tat, Ledger) {
        match self.window {
            None => self.shape.settle(
                stored,
                ledger,
                now,
                self.cost,
                part.actual,
                part.mark,
                self.reserve,
            ),
            Some(_) => {
                let budget = Budget {
                    amount: self.shape.capacity,
                };
                let state = budget.settle(
                    stored,
                    window_end,
                    self.cost,
                    part.actual,
                    part.mark,
                    self.reserve,
                );
                (state, ledger)
            }
        }
    }

    /// What a store reports of this bucket left in `state` at `now` (the
    /// shape and all times in ticks of `tick_ns` nanoseconds).
    pub fn outcome(
        &self,
        conforms: bool,
        retry_after: Option<u64>,
        mark: Mark,
        now: u64,
        tick_ns: u64,
    ) -> BucketOutcome {
        let state = mark.taken;
        let time = |ticks: u64| Duration::from_nanos(ticks.saturating_mul(tick_ns));
        let (remaining, reset_after) = match self.window {
            None => (
                self.shape.remaining(state, now),
                self.shape.reset_after(state, now),
            ),
            Some(_) => (
                Budget {
                    amount: self.shape.capacity,
                }
                .remaining(state, state.ticks),
                state.ticks.saturating_sub(now),
            ),
        };
        BucketOutcome {
            conforms,
            remaining,
            reset_after: time(reset_after),
            retry_after: retry_after.map(time),
            mark,
        }
    }
}

/// A set of buckets to charge together: all of them or none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Charge<'a> {
    /// The buckets, each key at most once. One bucket, the common case,
    /// stays inline: a single-bucket decision builds no list on its way to
    /// the store or back.
    pub buckets: SmallVec<[BucketCharge<'a>; 1]>,
    /// Judge, but take nothing.
    pub dry_run: bool,
    /// Every bucket's outcome must carry its ledger ([`BucketOutcome::mark`]):
    /// a reservation needs it to bound its settle. Other answers may leave
    /// it out (the Redis script then replies with half the numbers).
    pub marks: bool,
    /// A reservation to open when the charge takes (allowed, not a dry
    /// run), in the same atomic step: its id is recorded for `within_us` of
    /// the store's clock, and only a recorded id settles, once
    /// ([`Store::settle`](super::Store::settle) removes it). A record that
    /// is lost (evicted) can only refuse a settle, never allow a second.
    pub open: Option<Open>,
    /// The scope's penalty box, for a charge on one caller's behalf: a
    /// banned caller is denied before any bucket is read, and a denial by a
    /// bucket that strikes is counted, in the same atomic step (see
    /// [`super::penalty`]). `None`: no penalty box applies.
    pub penalty: Option<Penalty<'a>>,
    /// A lease taken with the buckets, in the same atomic step: a
    /// [`super::LeaseOp::Acquire`] (its own `dry_run` is ignored: the charge's
    /// applies). The pool is judged at the same instant as the buckets, by
    /// the rules of [`super::lease`]; the charge is allowed only when the
    /// pool has room for it too (or the id is live, counted once), and
    /// then, unless a dry run, the lease is recorded with the take. Refused
    /// by the pool, nothing is taken from any bucket; denied by a bucket,
    /// no lease is recorded. The pool must be in the buckets' hash slot.
    /// `None`: no lease.
    pub lease: Option<LeaseCall<'a>>,
}

/// A reservation opened by a charge: see [`Charge::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open {
    /// The reservation's random id.
    pub id: [u8; 16],
    /// How long it may be settled, in microseconds from the store's clock
    /// at the charge: its deadline is [`ChargeOutcome::now_us`] plus this.
    pub within_us: u64,
}

impl<'a> Charge<'a> {
    /// A charge of `buckets` that takes (no dry run) and needs no ledgers.
    pub fn of(buckets: impl IntoIterator<Item = BucketCharge<'a>>) -> Self {
        Self {
            buckets: buckets.into_iter().collect(),
            dry_run: false,
            marks: false,
            open: None,
            penalty: None,
            lease: None,
        }
    }
}

/// What a store reports about one bucket of a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketOutcome {
    /// True when the bucket held its cost at the moment of decision.
    pub conforms: bool,
    /// Whole tokens left after the decision (after taking, if taken).
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset_after: Duration,
    /// Until the bucket holds its cost, when it does not now and ever can.
    pub retry_after: Option<Duration>,
    /// The bucket's raw state after the decision, in the store's own ticks
    /// (a TAT; for a budget, its window's end and spend), with its ledger
    /// of refunds. Opaque outside the store: a reservation carries it back
    /// to [`Store::settle`], which gives back no more than the reservation
    /// still holds.
    pub mark: Mark,
}

/// The outcome of one charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeOutcome {
    /// True when every non-shadow bucket conformed, and so (unless dry run)
    /// the cost was taken from every one of them.
    pub allowed: bool,
    /// One per bucket, in the order of the charge; inline for one bucket.
    pub buckets: SmallVec<[BucketOutcome; 1]>,
    /// The store's clock at the decision, in microseconds since the Unix
    /// epoch: a reservation's deadline counts from it.
    pub now_us: u64,
    /// Shaping: how long an allowed request must wait before it proceeds
    /// (the largest wait of its buckets); its tokens were taken as of then.
    /// Zero when it may proceed at once, and for a denial.
    pub delay: Duration,
    /// What the penalty box did: a ban in force (then `allowed` is false,
    /// and `buckets` is empty: none was read), a strike counted.
    pub penalty: PenaltyOutcome,
    /// The charge's lease ([`Charge::lease`]): the pool's own verdict in
    /// `ok` (room for it, or the id already live) and `expires_at_us` (the
    /// expiry it has or would have), the pool's live weight, its earliest
    /// expiry when it had no room, and the expired leases removed. The
    /// lease is held only when the charge is `allowed` and not a dry run.
    /// `None` when the charge carried no lease, or a ban answered it before
    /// anything was read.
    pub lease: Option<LeaseOutcome>,
}

/// One bucket's part in a settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettleBucket<'a> {
    /// The bucket as it was charged; its `cost` is what was taken then.
    pub charge: BucketCharge<'a>,
    /// The real cost. More than `charge.cost` takes the extra (at most the
    /// capacity more, and bounded by `charge.reserve`); less gives back the
    /// difference (see [`crate::bucket::Shape::settle`]).
    pub actual: u64,
    /// What the charge left the bucket in ([`BucketOutcome::mark`]): a
    /// refund gives back no more than the charge still holds. `None` for a
    /// caller's plain refund (Envoy's negative hits), bounded only by a
    /// full bucket.
    pub mark: Option<Mark>,
}

/// Applies real costs to buckets charged earlier: a reservation's settle,
/// a refund, or Cluster's give-back after a cross-slot denial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement<'a> {
    /// The buckets, each key at most once.
    pub buckets: Vec<SettleBucket<'a>>,
    /// A reservation's id and deadline: applied only while the reservation
    /// is open (its charge recorded it, [`Charge::open`], and no settle has
    /// removed it), so at most once, and only while the store's clock is
    /// before the deadline. `None`: applied unconditionally (a refund).
    pub once: Option<Once>,
}

/// What makes a settlement happen at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Once {
    /// The reservation's random id.
    pub id: [u8; 16],
    /// The last moment it may be settled, in the store's clock, microseconds
    /// since the Unix epoch.
    pub deadline_us: u64,
}

/// What a settlement did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Applied to every bucket; their states after it, in order.
    Applied(Vec<BucketOutcome>),
    /// The reservation was settled before; nothing changed.
    AlreadySettled,
    /// The deadline has passed; nothing changed, the estimate stands.
    Expired,
}
