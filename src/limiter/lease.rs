//! Concurrency limits: which pool a lease call draws on, the store call,
//! and the failure mode when the store cannot answer.
//!
//! A scope's concurrency limits are compiled into [`Pool`]s beside its
//! bucket limits; rate decisions never see them. A lease call names the
//! same scope, identity, operation and attributes on acquire, renew and
//! release: they choose the pool, the first of the scope's concurrency
//! limits that matches, in config order.

use std::sync::Arc;
use std::time::Duration;

use super::{DecideError, Decision, Limit, Limiter, Request, Rules};
use crate::config::{FailureMode, HashTag, Per, UnknownScope};
use crate::store::{BucketKey, LeaseCall, LeaseOp, LeaseOutcome, LiveLease, Store, StoreError};

/// The shortest time to live a lease may ask for.
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(1);

/// One concurrency limit, ready to match.
#[derive(Debug, Clone)]
pub struct Pool {
    /// Matching and naming: its rule name, `per`, operations and `when`,
    /// and the weight each priority must leave free (`reserve`).
    pub limit: Limit,
    /// The most weight live at once.
    pub concurrency: u64,
    /// The longest time to live a lease may ask for, and the default.
    pub max_lease: Duration,
    /// The weight of an acquire that names none.
    pub weight: u64,
}

/// What a lease call asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAction {
    /// Take a slot (or answer the live lease of the same id).
    Acquire {
        /// The weight; `None`: the pool's.
        weight: Option<u64>,
        /// The time to live; `None`: the pool's `max_lease`.
        ttl: Option<Duration>,
    },
    /// Extend a live lease.
    Renew {
        /// The new time to live; `None`: the pool's `max_lease`.
        ttl: Option<Duration>,
    },
    /// Give the slot back.
    Release,
}

/// The answer to a lease call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseDecision {
    /// Acquire: granted. Renew: renewed (false: the lease is gone). Release:
    /// always true (an unknown or expired lease is fine).
    pub ok: bool,
    /// The pool's rule, empty when no concurrency limit applied.
    pub rule: Arc<str>,
    /// The pool's limit; 0 when none applied.
    pub limit: u64,
    /// The pool's live weight after the call.
    pub in_flight: u64,
    /// The lease's expiry on the store's clock, microseconds since the Unix
    /// epoch; 0 when not known (refused, released, degraded).
    pub expires_at_us: u64,
    /// How long the lease has left, when `ok` for an acquire or renew.
    pub ttl: Duration,
    /// A refused acquire: until the earliest live lease expires. An upper
    /// bound of the wait, since others may release sooner.
    pub retry_after: Option<Duration>,
    /// The store could not answer and the scope fails open: an unrecorded
    /// lease.
    pub degraded: bool,
    /// Why a refusal has no retry_after.
    pub reason: Option<String>,
    /// Leases of the pool that expired unreleased, removed by this call.
    pub expired: u64,
    /// The pool, when the store answered for it (for a replica's view of
    /// the weight in flight); `None` when no pool applied or degraded.
    pub seen: Option<PoolSeen>,
}

/// Which pool a store answer was about, and how long its leases can live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSeen {
    /// The pool among its rule's: a digest of the caller's parts the limit
    /// is kept per (all zero for a per-scope pool), 16 bytes of SHA-256.
    pub id: [u8; 16],
    /// The limit's `max_lease`: the latest lease this answer saw is gone
    /// this long after it, unless renewed.
    pub max_lease: Duration,
}

impl PoolSeen {
    fn of(pool: &Pool, call: &LeaseCall<'_>) -> Self {
        use sha2::{Digest, Sha256};
        let mut id = [0; 16];
        if call.pool.identity.is_some() || call.pool.operation.is_some() {
            let mut h = Sha256::new();
            for part in [call.pool.identity, call.pool.operation] {
                // Length-prefixed, with absence apart from empty.
                match part {
                    None => h.update([0]),
                    Some(v) => {
                        h.update([1]);
                        h.update((v.len() as u64).to_le_bytes());
                        h.update(v.as_bytes());
                    }
                }
            }
            id.copy_from_slice(&h.finalize()[..16]);
        }
        Self {
            id,
            max_lease: pool.max_lease,
        }
    }
}

/// Why a lease call was not decided.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseError {
    /// A request field is out of the pool's bounds; nothing was taken.
    #[error("{field}: {problem}")]
    Invalid {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The store failed and the scope fails closed.
    #[error("lease store unavailable for scope {scope:?}: {source}")]
    StoreUnavailable {
        /// The scope whose failure mode is `closed`.
        scope: String,
        /// What the store said.
        source: StoreError,
    },
    /// A decision with a lease: the rates could not be decided (the lease,
    /// if taken, was given back).
    #[error(transparent)]
    Decide(#[from] DecideError),
}

impl Pool {
    /// The store call for `action` on this pool, its bounds checked.
    fn call<'a>(
        &'a self,
        scope: &'a str,
        hash_tag: crate::config::HashTag,
        req: &Request<'a>,
        lease_id: &'a str,
        action: LeaseAction,
    ) -> Result<LeaseCall<'a>, LeaseError> {
        let (identity, operation) = match self.limit.per {
            Per::Scope => (None, None),
            Per::Identity => (Some(req.identity), None),
            Per::Operation => (None, Some(req.operation)),
            Per::IdentityOperation => (Some(req.identity), Some(req.operation)),
        };
        let op = match action {
            LeaseAction::Acquire { weight, ttl } => LeaseOp::Acquire {
                limit: self.concurrency,
                weight: self.weight_of(weight)?,
                reserve: self.limit.reserve_for(req.priority),
                ttl_us: self.ttl_us(ttl)?,
                dry_run: req.dry_run,
            },
            LeaseAction::Renew { ttl } => LeaseOp::Renew {
                ttl_us: self.ttl_us(ttl)?,
            },
            LeaseAction::Release => LeaseOp::Release,
        };
        Ok(LeaseCall {
            pool: BucketKey {
                scope,
                rule: &self.limit.key_name,
                identity,
                operation,
                hash_tag,
            },
            lease_id,
            op,
        })
    }

    fn weight_of(&self, weight: Option<u64>) -> Result<u64, LeaseError> {
        let w = weight.unwrap_or(self.weight);
        if w == 0 || w > self.concurrency {
            return Err(LeaseError::Invalid {
                field: "weight",
                problem: format!(
                    "must be between 1 and the limit's concurrency ({})",
                    self.concurrency
                ),
            });
        }
        Ok(w)
    }

    /// The time to live in whole microseconds (the stores' tick), rounded
    /// down, within [`MIN_LEASE_TTL`] and `max_lease`.
    fn ttl_us(&self, ttl: Option<Duration>) -> Result<u64, LeaseError> {
        let ttl = ttl.unwrap_or(self.max_lease);
        if !(MIN_LEASE_TTL..=self.max_lease).contains(&ttl) {
            return Err(LeaseError::Invalid {
                field: "ttl",
                problem: format!(
                    "must be between 1ms and the limit's max_lease ({})",
                    humantime::format_duration(self.max_lease)
                ),
            });
        }
        Ok(u64::try_from(ttl.as_micros()).unwrap_or(u64::MAX))
    }
}

impl<S: Store, E> Limiter<S, E> {
    /// Applies one lease call against `rules`, a snapshot the caller
    /// already read (and authorised the call on).
    pub async fn lease_on(
        &self,
        rules: &Rules,
        req: &Request<'_>,
        lease_id: &str,
        action: LeaseAction,
    ) -> Result<LeaseDecision, LeaseError> {
        let Some(scope) = rules.scope(req.scope) else {
            return Ok(unmatched(
                rules.unknown_scope == UnknownScope::Allow,
                action,
            ));
        };
        let Some(pool) = scope.pools.iter().find(|p| p.limit.matches(req)) else {
            return Ok(unmatched(true, action));
        };
        let call = pool.call(&scope.name, scope.hash_tag, req, lease_id, action)?;
        match self.store().lease(&call).await {
            Ok(outcome) => Ok(decided(pool, &call, &outcome)),
            Err(source) => match scope.failure_mode {
                FailureMode::Open => Ok(degraded(pool, &call)),
                FailureMode::Closed => Err(LeaseError::StoreUnavailable {
                    scope: req.scope.to_owned(),
                    source,
                }),
            },
        }
    }
}

/// No concurrency limit applies: nothing to hold. `allow` false for an
/// unknown scope under `unknown_scope: deny`.
fn unmatched(allow: bool, action: LeaseAction) -> LeaseDecision {
    LeaseDecision {
        ok: allow || action == LeaseAction::Release,
        reason: (!allow).then(|| "unknown scope".to_owned()),
        ..LeaseDecision::default()
    }
}

/// The time to live a call asked for (for a degraded answer).
fn ttl_of(call: &LeaseCall<'_>) -> Duration {
    match call.op {
        LeaseOp::Acquire { ttl_us, .. } | LeaseOp::Renew { ttl_us } => {
            Duration::from_micros(ttl_us)
        }
        LeaseOp::Release | LeaseOp::List { .. } => Duration::ZERO,
    }
}

fn decided(pool: &Pool, call: &LeaseCall<'_>, o: &LeaseOutcome) -> LeaseDecision {
    let until = |at: u64| Duration::from_micros(at.saturating_sub(o.now_us));
    let release = call.op == LeaseOp::Release;
    let refused_acquire = !o.ok && matches!(call.op, LeaseOp::Acquire { .. });
    LeaseDecision {
        ok: o.ok || release,
        rule: pool.limit.name.clone(),
        limit: pool.concurrency,
        in_flight: o.in_flight,
        expires_at_us: o.expires_at_us,
        ttl: until(o.expires_at_us),
        retry_after: o.earliest_expiry_us.map(until),
        degraded: false,
        reason: (refused_acquire && o.earliest_expiry_us.is_none())
            .then(|| "weight over the limit's room for this priority".to_owned()),
        expired: o.expired,
        seen: Some(PoolSeen::of(pool, call)),
    }
}

/// One concurrency limit of a scope, explained for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolExplained {
    /// Its rule name.
    pub rule: Arc<str>,
    /// What a pool is kept per.
    pub per: Per,
    /// Its limit.
    pub concurrency: u64,
    /// Its longest lease.
    pub max_lease: Duration,
    /// Why it is not the request's pool; `None` for the pool.
    pub skipped_because: Option<String>,
    /// The pool's live weight now, for the request's pool, when the store
    /// answered a dry run.
    pub in_flight: Option<u64>,
    /// The request's pool's live leases, soonest expiry first, at most
    /// [`EXPLAIN_MAX_LEASES`], and how many are live in all; `None` for
    /// another pool, or when the store did not answer.
    pub live: Option<(Vec<LiveLease>, u64)>,
}

/// The most live leases Explain lists; the rest are counted.
pub const EXPLAIN_MAX_LEASES: u32 = 100;

/// A lease id no caller can send (the API refuses control characters), for
/// the dry run that reads a pool's weight: it can match no real lease.
const PROBE_ID: &str = "\u{0}explain";

impl<S: Store, E> Limiter<S, E> {
    /// The scope's concurrency limits for `req`, in config order: which is
    /// its pool, why the others are not, and the pool's live weight from a
    /// dry-run acquire (which records nothing). A store that cannot answer
    /// leaves the weight unknown.
    pub async fn explain_pools(&self, rules: &Rules, req: &Request<'_>) -> Vec<PoolExplained> {
        let Some(scope) = rules.scope(req.scope) else {
            return Vec::new();
        };
        let mut found = false;
        let mut out = Vec::with_capacity(scope.pools.len());
        for pool in &scope.pools {
            let mut skipped = super::explain::skipped_because(&pool.limit, req);
            if skipped.is_none() && found {
                skipped = Some("an earlier concurrency limit is the pool".to_owned());
            }
            let (mut in_flight, mut live) = (None, None);
            if skipped.is_none() {
                found = true;
                live = self
                    .live_leases(pool, &scope.name, scope.hash_tag, req)
                    .await;
                let probe = LeaseAction::Acquire {
                    weight: Some(1),
                    ttl: Some(MIN_LEASE_TTL),
                };
                let dry = Request {
                    dry_run: true,
                    ..*req
                };
                if let Ok(call) = pool.call(&scope.name, scope.hash_tag, &dry, PROBE_ID, probe) {
                    in_flight = self.store().lease(&call).await.ok().map(|o| o.in_flight);
                }
            }
            out.push(PoolExplained {
                rule: pool.limit.name.clone(),
                per: pool.limit.per,
                concurrency: pool.concurrency,
                max_lease: pool.max_lease,
                skipped_because: skipped,
                in_flight,
                live,
            });
        }
        out
    }

    /// The pool's first live leases and their count, read only.
    async fn live_leases(
        &self,
        pool: &Pool,
        scope: &str,
        hash_tag: crate::config::HashTag,
        req: &Request<'_>,
    ) -> Option<(Vec<LiveLease>, u64)> {
        let mut call = pool
            .call(scope, hash_tag, req, PROBE_ID, LeaseAction::Release)
            .ok()?;
        call.op = LeaseOp::List {
            max: EXPLAIN_MAX_LEASES,
        };
        let o = self.store().lease(&call).await.ok()?;
        Some((o.live, o.live_total))
    }
}

impl<S: Store, E> Limiter<S, E> {
    /// Decides `req` against the scope's rates and, when a concurrency
    /// limit matches, takes the lease `lease_id` with them: all or nothing.
    ///
    /// Under `hash_tag: scope` (the default) the pool and the buckets are
    /// one store step ([`crate::store::Charge::lease`]): judged at one
    /// instant, the lease recorded only when the rates take, the rates
    /// taken only when the pool has room, in one round trip. A denial
    /// takes nothing from either. With no concurrency limit matching, it is
    /// [`Limiter::decide_on`] and the lease is `None`.
    pub async fn decide_leased(
        &self,
        rules: &Rules,
        req: &Request<'_>,
        lease_id: &str,
        ttl: Option<Duration>,
    ) -> Result<(Decision, Option<LeaseDecision>), LeaseError> {
        let Some(scope) = rules.scope(req.scope) else {
            return Ok((self.decide_on(rules, req).await?, None));
        };
        let Some(pool) = scope.pools.iter().find(|p| p.limit.matches(req)) else {
            return Ok((self.decide_on(rules, req).await?, None));
        };
        let weight = None;
        let action = LeaseAction::Acquire { weight, ttl };
        let call = pool.call(&scope.name, scope.hash_tag, req, lease_id, action)?;
        let mut buckets = super::plan::Buckets::new();
        let planned = super::plan::plan_into(rules, req, &mut buckets).is_ok();
        if !planned || scope.hash_tag != HashTag::Scope || req.settle_within.is_some() {
            return self.decide_leased_apart(rules, req, lease_id, ttl).await;
        }
        let mut charge = super::plan::charge(&buckets, req.dry_run);
        charge.penalty = super::plan::penalty(rules, req, &buckets);
        charge.lease = Some(call);
        match self.store().check_and_take_one(&charge).await {
            Ok(outcome) => {
                let mut d = super::plan::decision(&buckets, &outcome);
                let (lease, refused) = lease_of(pool, &call, &charge, req, &outcome);
                if refused {
                    refused_by_pool(&mut d, &lease);
                }
                Ok((d, Some(lease)))
            }
            Err(e) => {
                let d = super::plan::failed(rules, req.scope, e)?;
                let lease = degraded(pool, &call);
                Ok((d, Some(lease)))
            }
        }
    }

    /// [`Limiter::decide_leased`] in steps, where the pool and the buckets
    /// cannot be one store step (a scope whose `hash_tag` may put them in
    /// different Redis slots, a reservation, or no rate to charge): the
    /// lease first; a refused lease denies the request and takes nothing
    /// from any bucket, and a request the rates deny (or cannot decide)
    /// gives the lease back. While the rates are decided the lease is held,
    /// so others may be refused meanwhile (admitting less, never more).
    async fn decide_leased_apart(
        &self,
        rules: &Rules,
        req: &Request<'_>,
        lease_id: &str,
        ttl: Option<Duration>,
    ) -> Result<(Decision, Option<LeaseDecision>), LeaseError> {
        let weight = None;
        let lease = self
            .lease_on(rules, req, lease_id, LeaseAction::Acquire { weight, ttl })
            .await?;
        if !lease.ok {
            let mut denied = Decision::default();
            refused_by_pool(&mut denied, &lease);
            return Ok((denied, Some(lease)));
        }
        let decided = self.decide_on(rules, req).await;
        if decided.as_ref().is_ok_and(|d| d.allowed) {
            return Ok((decided?, Some(lease)));
        }
        let mut given_back = lease;
        if !req.dry_run && !given_back.degraded {
            let released = self
                .lease_on(rules, req, lease_id, LeaseAction::Release)
                .await;
            given_back.in_flight = released.map_or(given_back.in_flight, |r| r.in_flight);
        }
        not_held(&mut given_back);
        Ok((decided?, Some(given_back)))
    }
}

/// The unrecorded lease a scope that fails open grants when the store
/// cannot answer.
fn degraded(pool: &Pool, call: &LeaseCall<'_>) -> LeaseDecision {
    LeaseDecision {
        ok: true,
        rule: pool.limit.name.clone(),
        limit: pool.concurrency,
        ttl: ttl_of(call),
        degraded: true,
        ..LeaseDecision::default()
    }
}

/// The lease of a request a ban answered before its pool was read.
fn unread(pool: &Pool) -> LeaseDecision {
    LeaseDecision {
        rule: pool.limit.name.clone(),
        limit: pool.concurrency,
        ..LeaseDecision::default()
    }
}

/// A lease the request does not hold: refused, or given back.
fn not_held(lease: &mut LeaseDecision) {
    lease.ok = false;
    lease.expires_at_us = 0;
    lease.ttl = Duration::ZERO;
}

/// Denies `d` for a pool without room: it waits for the pool as well as
/// for any bucket that denied it, and says the pool is full.
fn refused_by_pool(d: &mut Decision, lease: &LeaseDecision) {
    let rates_denied = d.buckets.iter().any(|b| b.exhausted && !b.shadow);
    d.retry_after = match (rates_denied, d.retry_after, lease.retry_after) {
        (false, _, pool) => pool,
        (true, Some(rates), Some(pool)) => Some(rates.max(pool)),
        (true, _, _) => None,
    };
    d.allowed = false;
    d.delay = Duration::ZERO;
    if !rates_denied || d.reason.is_none() {
        d.reason = Some(
            lease
                .reason
                .clone()
                .unwrap_or_else(|| format!("concurrency limit {:?} is full", &*lease.rule)),
        );
    }
}

/// The lease of a charge that carried one ([`crate::store::Charge::lease`])
/// for `req`, and whether its pool refused it. Held only when the charge
/// was allowed and recorded: a rule that admits nothing makes an Envoy
/// joint charge a dry run, where the pool had room but nothing was kept.
fn lease_of(
    pool: &Pool,
    call: &LeaseCall<'_>,
    charge: &crate::store::Charge<'_>,
    req: &Request<'_>,
    outcome: &crate::store::ChargeOutcome,
) -> (LeaseDecision, bool) {
    let Some(o) = &outcome.lease else {
        // Banned: no pool was read.
        return (unread(pool), false);
    };
    let mut lease = decided(pool, call, o);
    let recorded = outcome.allowed && (!charge.dry_run || req.dry_run);
    if o.ok && !recorded {
        not_held(&mut lease);
    }
    (lease, !o.ok)
}

/// Requests decided together with one lease, in one store step: see
/// [`Limiter::decide_together_leased`].
#[derive(Debug, Clone)]
pub struct TogetherLeased {
    /// Every request's decision, as [`Limiter::decide_together_on`] gives.
    pub decisions: Vec<Decision>,
    /// The lease: held when `ok` and the requests were allowed.
    pub lease: LeaseDecision,
    /// The pool had no room for it: the requests were denied for it.
    pub refused: bool,
}

impl<S: Store, E> Limiter<S, E> {
    /// Decides `reqs` together, as one atomic charge, with the lease
    /// `lease_id` of `reqs[at]`'s pool in the same store step (Envoy's
    /// request whose one lease descriptor carries rates beside it). `None`
    /// when that cannot be one step, and the caller takes the stepwise
    /// path: no pool matches, the requests span scopes, the scope's
    /// `hash_tag` is not `scope`, a reservation, a quota-mode denial that
    /// could be retried without its quotas, or nothing to charge.
    pub async fn decide_together_leased(
        &self,
        rules: &Rules,
        reqs: &[Request<'_>],
        at: usize,
        lease_id: &str,
    ) -> Result<Option<TogetherLeased>, LeaseError> {
        let Some(req) = reqs.get(at) else {
            return Ok(None);
        };
        let Some(scope) = rules.scope(req.scope) else {
            return Ok(None);
        };
        let Some(pool) = scope.pools.iter().find(|p| p.limit.matches(req)) else {
            return Ok(None);
        };
        let alone = |r: &Request<'_>| r.scope == req.scope && r.settle_within.is_none();
        if scope.hash_tag != HashTag::Scope || !reqs.iter().all(alone) {
            return Ok(None);
        }
        let action = LeaseAction::Acquire {
            weight: None,
            ttl: None,
        };
        let call = pool.call(&scope.name, scope.hash_tag, req, lease_id, action)?;
        let Ok(joint) = super::plan::Joint::plan(rules, reqs) else {
            return Ok(None);
        };
        let Some(mut charge) = joint.charge().filter(|_| !joint.quota_may_retry()) else {
            return Ok(None);
        };
        charge.penalty = joint.penalty(rules, reqs, true);
        charge.lease = Some(call);
        let outcome = match self.store().check_and_take_one(&charge).await {
            Ok(outcome) => outcome,
            Err(e) => {
                let decisions = joint.failed(rules, reqs, e)?;
                let lease = degraded(pool, &call);
                let refused = false;
                return Ok(Some(TogetherLeased {
                    decisions,
                    lease,
                    refused,
                }));
            }
        };
        let decisions = joint.decisions(&outcome);
        let (lease, refused) = lease_of(pool, &call, &charge, req, &outcome);
        Ok(Some(TogetherLeased {
            decisions,
            lease,
            refused,
        }))
    }
}
