//! The store: where bucket state lives, behind one atomic operation.
//!
//! This file is the contract: the [`Store`] trait and its error. What a
//! store is asked and answers is in [`charge`]; the stores themselves are
//! [`memory`] (the embedded default) and [`redis`]; [`ban_cache`],
//! [`deny_cache`] and [`observed`] wrap any store, and [`build`] assembles the stack a config
//! asks for.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

pub mod affinity;
pub mod ban_cache;
pub mod build;
pub mod charge;
pub mod demand;
pub mod deny_cache;
pub mod keys;
pub mod lease;
pub mod memory;
pub mod observed;
pub mod penalty;
pub mod redis;

pub use build::{AnyStore, Served, build, build_served, check_settings};
pub use charge::{
    BucketCharge, BucketKey, BucketOutcome, Charge, ChargeOutcome, Once, Open, SettleBucket,
    Settled, Settlement,
};
pub use demand::{DemandAnswer, DemandCall, Others};
pub use lease::{LeaseCall, LeaseOp, LeaseOutcome, LiveLease};
pub use observed::{Observed, StoreObserver};
pub use penalty::{
    Ban, BanCursor, BanEntry, BanPosition, Penalty, PenaltyAnswer, PenaltyKey, PenaltyOp,
    PenaltyOutcome, PenaltyRule,
};
pub use redis::BuildError;

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
/// For each [`Charge`], a store judges every bucket against one instant of
/// its own clock and then either takes each bucket's cost from every bucket
/// of the charge, or from none of them:
///
/// - the charge is *allowed* when every non-shadow bucket holds its cost;
///   then, unless `dry_run`, every non-shadow bucket is charged, and so is
///   every shadow bucket that holds its cost;
/// - otherwise nothing is taken from any bucket.
///
/// A charge that carries a [`Penalty`] is judged behind its caller's
/// penalty box in the same atomic step: a caller banned at that instant is
/// denied with nothing read or taken, and a denial that strikes is counted
/// (and may start a ban) together with it (see [`penalty`]).
///
/// No other decision may observe a state between the check and the take. The
/// charges of one call are independent of each other: each is atomic on its
/// own, they may be decided in any order, and one charge's failure never
/// changes another's outcome.
///
/// A bucket that is absent is full. A store may forget a bucket once it has
/// refilled completely, so memory grows with active buckets only.
///
/// Leases of concurrency limits are the eighth method, [`Store::lease`]:
/// one operation on one pool, atomic on its own, with the rules stated in
/// [`lease`] (a lease is live while the store's clock is before its
/// expiry; expired leases are removed before anything is counted).
///
/// The ninth, [`Store::demand`], shares what Envoy quota streams hold of a
/// limit across replicas, by the rules of [`demand`].
///
/// # Nine methods, all required
/// Every method is required, so a decorator (the deny cache, the observed
/// store, [`AnyStore`]) cannot forget to pass one on; conveniences built on
/// them live in [`StoreExt`], which every store gets for free.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Atomically checks and takes, per charge: one result per charge, in
    /// order, each decided (or failed) on its own.
    fn check_and_take_each(
        &self,
        charges: &[Charge<'_>],
    ) -> impl Future<Output = Vec<Result<ChargeOutcome, StoreError>>> + Send;

    /// Atomically checks and takes one charge: the limiter's common call.
    /// A store answers it without building the lists of the batch path; a
    /// charge of one bucket then allocates nothing on the embedded store.
    fn check_and_take_one(
        &self,
        charge: &Charge<'_>,
    ) -> impl Future<Output = Result<ChargeOutcome, StoreError>> + Send;

    /// Applies a settlement atomically: to every bucket or to none. A
    /// settlement with [`Once`] is applied at most once, on any replica,
    /// and only before its deadline; the store remembers its id until then.
    fn settle(
        &self,
        settlement: &Settlement<'_>,
    ) -> impl Future<Output = Result<Settled, StoreError>> + Send;

    /// The penalty box's operator side: bans, unbans and listings, on the
    /// store's clock. A ban set here is what charges behind the scope's
    /// penalty box meet (see [`penalty`]).
    fn penalties(
        &self,
        op: &PenaltyOp<'_>,
    ) -> impl Future<Output = Result<PenaltyAnswer, StoreError>> + Send;

    /// Applies one lease operation to its pool atomically, by the rules of
    /// [`lease`], on the store's own clock: never more than the limit's
    /// weight live at any instant, an acquire of a live id counted once.
    fn lease(
        &self,
        call: &LeaseCall<'_>,
    ) -> impl Future<Output = Result<LeaseOutcome, StoreError>> + Send;

    /// Publishes one replica's quota demand for a group and answers the
    /// other replicas' live demand, by the rules of [`demand`], on the
    /// store's clock: the sum of what replicas may hold never exceeds the
    /// limit.
    fn demand(
        &self,
        call: &DemandCall<'_>,
    ) -> impl Future<Output = Result<DemandAnswer, StoreError>> + Send;

    /// True while the store can answer: used for health reporting.
    fn is_available(&self) -> bool;

    /// Told the configured scopes' names at start and after each reload
    /// (once the new rules serve): a store that keeps anything derived from
    /// the old rules (the deny cache) drops it, and one that bounds its
    /// memory keeps room for each scope. A store that keeps nothing of the
    /// kind passes it on or does nothing.
    fn rules_replaced(&self, scopes: &[&str]);

    /// What the store knows of its backend besides whether it answers:
    /// read by the health watcher for readiness and metrics, not per call.
    fn condition(&self) -> Condition;
}

/// What a store knows of its backend besides whether it answers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Condition {
    /// The backend's clock minus this replica's, in microseconds, once
    /// measured (Redis: from every script reply's `TIME`).
    pub clock_skew_us: Option<i64>,
    /// The backend's eviction policy, when it can evict Tollgate's keys
    /// (Redis's `maxmemory-policy` other than `noeviction`).
    pub evicting_policy: Option<Arc<str>>,
    /// True when the store answers but this replica should not take
    /// traffic (an evicting policy under `on_evicting_policy: refuse`).
    pub unready: bool,
    /// Whether other replicas' operator bans and unbans reach this one at
    /// once (Redis: its subscription is up); `None` for a store no other
    /// replica shares.
    pub ban_changes_heard: Option<bool>,
}

/// Conveniences over [`Store`], for every store.
pub trait StoreExt: Store {
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

    /// [`Store::check_and_take_one`] for a charge of the one bucket `bucket`.
    fn check_and_take_single(
        &self,
        bucket: &BucketCharge<'_>,
        dry_run: bool,
    ) -> impl Future<Output = Result<ChargeOutcome, StoreError>> + Send {
        async move {
            let charge = Charge {
                buckets: smallvec::smallvec![*bucket],
                dry_run,
                marks: false,
                open: None,
                lease: None,
                penalty: None,
            };
            self.check_and_take_one(&charge).await
        }
    }
}

impl<S: Store + ?Sized> StoreExt for S {}
