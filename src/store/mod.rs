//! The store: where bucket state lives, behind one atomic operation.
//!
//! [`Store::check_and_take`] is the seam every backend implements. The
//! embedded [`memory::MemoryStore`] is the default; the Redis store keeps the
//! same contract for many replicas at once.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::bucket::{Budget, Ledger, Mark, Shape, Tat, Verdict};
use crate::config::{ConfigError, StoreConfig, StoreKind};
use crate::window::Window;

pub mod deny_cache;
pub mod keys;
pub mod memory;
pub mod redis;

pub use redis::BuildError;

/// Checks the store settings that only the store itself can judge (such as
/// whether the Redis client can use a URL). Runs before any port is bound,
/// after the config's own validation.
pub fn check_settings(config: &StoreConfig) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    if config.kind == StoreKind::Redis {
        redis::RedisStore::check_settings(&config.redis, &mut problems);
    }
    ConfigError::check(problems)
}

/// Builds the store a config asks for, with its background task (the
/// embedded store's sweeper, or Redis's prober). Needs a tokio runtime.
pub fn build(config: &StoreConfig) -> Result<AnyStore, BuildError> {
    Ok(match config.kind {
        StoreKind::Memory => {
            let memory = &config.memory;
            let store = memory::MemoryStore::with_max_bytes(memory.shards, memory.max_bytes);
            store.spawn_sweeper(memory.sweep_interval);
            AnyStore::Memory(store)
        }
        StoreKind::Redis => {
            let store = redis::RedisStore::new(&config.redis)?;
            store.spawn_prober(config.redis.breaker_cool_down);
            AnyStore::Redis(store)
        }
    })
}

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

    /// The state after settling this charge (taken earlier) at `actual`,
    /// in the store's ticks (nanoseconds: the Redis script does its own).
    /// Debt is bounded: [`MAX_DEBT_US`] past now for a bucket,
    /// [`MAX_SPEND`] for a budget.
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
                MAX_DEBT_US.saturating_mul(1_000),
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
                    MAX_SPEND,
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

/// The furthest a bucket's debt may push its TAT past now, in microseconds
/// (about 8.9 years): more debt than that is not kept. Bounds the Redis
/// script's numbers well below 2^53.
pub const MAX_DEBT_US: u64 = 1 << 48;

/// The most a budget's window may record as spent, debt included: more is
/// not kept. Below 2^53, so the Redis script's numbers stay exact.
pub const MAX_SPEND: u64 = 1 << 52;

/// A set of buckets to charge together: all of them or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge<'a> {
    /// The buckets, each key at most once.
    pub buckets: Vec<BucketCharge<'a>>,
    /// Judge, but take nothing.
    pub dry_run: bool,
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
    /// One per bucket, in the order of the charge.
    pub buckets: Vec<BucketOutcome>,
    /// The store's clock at the decision, in microseconds since the Unix
    /// epoch: a reservation's deadline counts from it.
    pub now_us: u64,
}

/// One bucket's part in a settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettleBucket<'a> {
    /// The bucket as it was charged; its `cost` is what was taken then.
    pub charge: BucketCharge<'a>,
    /// The real cost. More than `charge.cost` takes the extra; less gives
    /// back the difference (see [`crate::bucket::Shape::settle`]).
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
    /// A reservation's id and deadline: applied at most once, and only while
    /// the store's clock is before the deadline. `None`: applied
    /// unconditionally (a refund).
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

/// The outcome of a charge of one bucket, without the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SingleOutcome {
    /// True when the bucket conformed or is a shadow bucket.
    pub allowed: bool,
    /// The bucket's state.
    pub bucket: BucketOutcome,
}

impl SingleOutcome {
    /// The one bucket's outcome out of a charge's.
    pub fn of(outcome: ChargeOutcome) -> Result<Self, StoreError> {
        match outcome.buckets.first() {
            Some(&bucket) => Ok(Self {
                allowed: outcome.allowed,
                bucket,
            }),
            None => Err(StoreError::permanent("store returned no bucket outcome")),
        }
    }
}

/// Why a store could not decide.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    /// True when retrying later may succeed (a timeout, a lost connection, a
    /// failover), false for errors that will recur (a script bug, bad auth).
    pub transient: bool,
    /// What went wrong, for logs. Never contains secrets.
    pub message: Arc<str>,
}

impl StoreError {
    /// A failure that may pass.
    pub fn transient(message: impl fmt::Display) -> Self {
        Self {
            transient: true,
            message: message.to_string().into(),
        }
    }

    /// A failure that will recur until someone changes something.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self {
            transient: false,
            message: message.to_string().into(),
        }
    }
}

/// Where bucket state lives.
///
/// # The atomicity contract
///
/// For each [`Charge`], `check_and_take` judges every bucket against one
/// instant of the store's own clock and then either takes each bucket's cost
/// from every bucket of the charge, or from none of them:
///
/// - the charge is *allowed* when every non-shadow bucket holds its cost;
///   then, unless `dry_run`, every non-shadow bucket is charged, and so is
///   every shadow bucket that holds its cost;
/// - otherwise nothing is taken from any bucket.
///
/// No other decision may observe a state between the check and the take. The
/// charges of one call are independent of each other: each is atomic on its
/// own, they may be decided in any order, and one charge's failure never
/// changes another's outcome. The result holds one result per charge, in
/// order.
///
/// A bucket that is absent is full. A store may forget a bucket once it has
/// refilled completely, so memory grows with active buckets only.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Atomically check and take, per charge: one result per charge, each
    /// decided (or failed) on its own. See the trait's contract.
    fn check_and_take_each(
        &self,
        charges: &[Charge<'_>],
    ) -> impl Future<Output = Vec<Result<ChargeOutcome, StoreError>>> + Send;

    /// [`Store::check_and_take_each`], for callers that want every outcome
    /// or none: the first failure, if any charge failed. Charges that did
    /// not fail were still decided (and charged) on their own.
    fn check_and_take(
        &self,
        charges: &[Charge<'_>],
    ) -> impl Future<Output = Result<Vec<ChargeOutcome>, StoreError>> + Send {
        async move {
            self.check_and_take_each(charges)
                .await
                .into_iter()
                .collect()
        }
    }

    /// Checks and takes for a single charge. The default goes through
    /// [`Store::check_and_take`]; stores may answer without the outer `Vec`.
    fn check_and_take_one(
        &self,
        charge: &Charge<'_>,
    ) -> impl Future<Output = Result<ChargeOutcome, StoreError>> + Send {
        async move {
            self.check_and_take(std::slice::from_ref(charge))
                .await?
                .pop()
                .ok_or_else(|| StoreError::permanent("store returned no outcome"))
        }
    }

    /// [`Store::check_and_take_one`] for a reservation: every bucket's
    /// outcome carries its ledger ([`BucketOutcome::mark`]), which other
    /// answers may leave out (the Redis script then replies with half the
    /// numbers).
    fn check_and_take_marked(
        &self,
        charge: &Charge<'_>,
    ) -> impl Future<Output = Result<ChargeOutcome, StoreError>> + Send {
        self.check_and_take_one(charge)
    }

    /// Checks and takes for a charge of one bucket: the limiter's most
    /// common call. The default goes through [`Store::check_and_take_one`];
    /// the embedded store answers without building a list, so the decision
    /// allocates nothing.
    fn check_and_take_single(
        &self,
        bucket: &BucketCharge<'_>,
        dry_run: bool,
    ) -> impl Future<Output = Result<SingleOutcome, StoreError>> + Send {
        async move {
            let charge = Charge {
                buckets: vec![*bucket],
                dry_run,
            };
            SingleOutcome::of(self.check_and_take_one(&charge).await?)
        }
    }

    /// Applies a settlement atomically: to every bucket or to none. A
    /// settlement with [`Once`] is applied at most once, on any replica,
    /// and only before its deadline; the store remembers its id until then.
    fn settle(
        &self,
        settlement: &Settlement<'_>,
    ) -> impl Future<Output = Result<Settled, StoreError>> + Send;

    /// True while the store can answer: used for health reporting.
    fn is_available(&self) -> bool {
        true
    }

    /// Told when the rules were replaced (a reload), so a store that keeps
    /// anything derived from the old rules (the deny cache) drops it.
    fn rules_replaced(&self) {}
}

/// The store chosen by configuration. An enum rather than a trait object, so
/// the embedded store's calls stay static and allocation-free.
#[derive(Debug, Clone)]
pub enum AnyStore {
    /// The embedded store.
    Memory(memory::MemoryStore),
    /// Redis: standalone, Sentinel or Cluster.
    Redis(redis::RedisStore),
}

impl Store for AnyStore {
    async fn check_and_take_each(
        &self,
        charges: &[Charge<'_>],
    ) -> Vec<Result<ChargeOutcome, StoreError>> {
        match self {
            Self::Memory(s) => s.check_and_take_each(charges).await,
            Self::Redis(s) => s.check_and_take_each(charges).await,
        }
    }

    async fn check_and_take_one(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, StoreError> {
        match self {
            Self::Memory(s) => s.check_and_take_one(charge).await,
            Self::Redis(s) => s.check_and_take_one(charge).await,
        }
    }

    async fn check_and_take_single(
        &self,
        bucket: &BucketCharge<'_>,
        dry_run: bool,
    ) -> Result<SingleOutcome, StoreError> {
        match self {
            Self::Memory(s) => s.check_and_take_single(bucket, dry_run).await,
            Self::Redis(s) => s.check_and_take_single(bucket, dry_run).await,
        }
    }

    async fn check_and_take_marked(
        &self,
        charge: &Charge<'_>,
    ) -> Result<ChargeOutcome, StoreError> {
        match self {
            Self::Memory(s) => s.check_and_take_marked(charge).await,
            Self::Redis(s) => s.check_and_take_marked(charge).await,
        }
    }

    async fn settle(&self, settlement: &Settlement<'_>) -> Result<Settled, StoreError> {
        match self {
            Self::Memory(s) => s.settle(settlement).await,
            Self::Redis(s) => s.settle(settlement).await,
        }
    }

    fn is_available(&self) -> bool {
        match self {
            Self::Memory(s) => s.is_available(),
            Self::Redis(s) => s.is_available(),
        }
    }
}
