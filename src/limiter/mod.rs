//! The limiter: rules → which buckets apply → one atomic charge → [`Decision`].
//!
//! It knows no proto types and no Redis types. Everything but the call to
//! the store is pure and synchronous: [`compile`] turns config into
//! [`Rules`], [`rules`] names the buckets a request draws on, and [`plan`]
//! turns requests into charges and the store's outcomes into decisions.
//! [`Limiter`] is the thin async shell that puts the [`Store`] call between
//! the two halves. Its rules live in a [`Generation`], swapped whole on
//! reload with whatever the layers above keep beside them; readers never
//! block.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use smallvec::SmallVec;

use crate::store::{Charge, PenaltyOutcome, Store, StoreError};

pub mod compile;
pub mod descriptors;
pub mod explain;
pub mod lease;
pub mod limit;
pub mod penalty;
pub(crate) mod plan;
pub mod reservation;
pub mod rules;
mod settle;
pub mod shares;
mod usage;

pub use lease::{
    EXPLAIN_MAX_LEASES, LeaseAction, LeaseDecision, LeaseError, Pool, PoolExplained, PoolSeen,
    TogetherLeased,
};
pub use limit::Limit;
use plan::{Joint, Plan};
pub use reservation::Signer;
pub use rules::{Rules, ScopeRules};
pub use settle::{SettleError, Settlement};

/// One question to the limiter. Validated by the caller (the API layer).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The scope whose rules apply.
    pub scope: &'a str,
    /// The caller; empty is the anonymous caller.
    pub identity: &'a str,
    /// What the caller is doing.
    pub operation: &'a str,
    /// Tokens to take, at least 1.
    pub cost: u64,
    /// Judge, but take nothing.
    pub dry_run: bool,
    /// Selects tiered limits.
    pub attributes: &'a HashMap<String, String>,
    /// An Envoy descriptor's entries, in order; empty for `tollgate.v1`.
    /// They select a limit from the scope's descriptor rules.
    pub entries: &'a [(&'a str, &'a str)],
    /// Which headroom the request may take.
    pub priority: Priority,
    /// When set, `cost` is an estimate: an allowed request gets a
    /// reservation, settled later with the real cost within this time.
    pub settle_within: Option<Duration>,
    /// The configured caller making the request, if callers are
    /// configured: a reservation names it, and only it may settle.
    pub caller: Option<&'a str>,
    /// Shaping: the longest the caller can wait before proceeding. A limit
    /// with `max_delay` then admits with a delay (at most this) instead of
    /// denying. `None`: the caller cannot wait; no delay, ever.
    pub max_wait: Option<Duration>,
    /// Count this request as a strike in the scope's penalty box whatever
    /// its decision (an outcome the caller reports, such as a failed login).
    pub strike: bool,
}

/// How much of a bucket's headroom a request may take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Priority {
    /// May take everything.
    Critical,
    /// May not take a limit's `headroom.normal`.
    #[default]
    Normal,
    /// May not take a limit's `headroom.sheddable`: shed first.
    Sheddable,
}

impl Priority {
    /// The priority's index in a limit's reserves.
    pub fn index(self) -> usize {
        match self {
            Self::Critical => 0,
            Self::Normal => 1,
            Self::Sheddable => 2,
        }
    }

    /// Reads `critical`, `normal` or `sheddable`, in any case.
    pub fn parse(text: &str) -> Option<Self> {
        [
            ("critical", Self::Critical),
            ("normal", Self::Normal),
            ("sheddable", Self::Sheddable),
        ]
        .into_iter()
        .find(|(name, _)| text.eq_ignore_ascii_case(name))
        .map(|(_, p)| p)
    }
}

static NO_ATTRIBUTES: LazyLock<HashMap<String, String>> = LazyLock::new(HashMap::new);

impl<'a> Request<'a> {
    /// A request of cost 1 with no attributes.
    pub fn new(scope: &'a str, identity: &'a str, operation: &'a str) -> Self {
        Self {
            scope,
            identity,
            operation,
            cost: 1,
            dry_run: false,
            attributes: &NO_ATTRIBUTES,
            entries: &[],
            priority: Priority::Normal,
            settle_within: None,
            caller: None,
            max_wait: None,
            strike: false,
        }
    }
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// True when the request may proceed.
    pub allowed: bool,
    /// When denied and a retry can succeed: the earliest moment the same
    /// request would be allowed if nobody else consumed meanwhile.
    pub retry_after: Option<Duration>,
    /// True when the store could not answer and the scope fails open.
    pub degraded: bool,
    /// Why a denial has no retry_after (cost over capacity, unknown scope).
    pub reason: Option<String>,
    /// Every bucket that applied, in limit order. Inline for one bucket,
    /// the common case, so a decision needs no heap.
    pub buckets: SmallVec<[BucketReport; 1]>,
    /// Index into `buckets` of the most restrictive bucket: the one that
    /// denied (longest wait) when denied, else the one with least left.
    pub primary: Option<usize>,
    /// For an allowed request with `settle_within`: the token that settles
    /// it, on any replica.
    pub reservation: Option<String>,
    /// An Envoy quota-mode descriptor's decision: its denial alone does not
    /// deny the request it is part of (see [`Decision::overall`]).
    pub quota: bool,
    /// An Envoy descriptor whose rule is `unlimited`.
    pub unlimited: bool,
    /// Shaping: how long an allowed request must wait before it proceeds;
    /// its tokens were taken as of then. Zero: at once (and for a denial).
    pub delay: Duration,
    /// What the scope's penalty box did: a ban in force (the request is
    /// denied, `retry_after` runs to the ban's end, and `buckets` is empty
    /// unless this very denial started the ban), or a strike counted.
    pub penalty: PenaltyOutcome,
    /// True when the identity is on the scope's `deny:` list: denied with
    /// no `retry_after`, and no store call.
    pub deny_listed: bool,
}

impl Decision {
    /// The most restrictive bucket, if any applied.
    pub fn primary(&self) -> Option<&BucketReport> {
        self.primary.and_then(|i| self.buckets.get(i))
    }

    /// True when one of the decision's own enforced buckets (or a rule that
    /// admits nothing) denied it, rather than another decision made with it.
    pub fn over(&self) -> bool {
        !self.allowed && self.buckets.iter().any(|b| b.exhausted && !b.shadow)
    }

    /// Whether decisions made together pass as one request, as
    /// envoyproxy/ratelimit has it: every decision that is not a quota
    /// descriptor's is allowed, and of the quota descriptors' decisions, if
    /// there are any, at least one is.
    pub fn overall(decisions: &[Decision]) -> bool {
        let quota = || decisions.iter().filter(|d| d.quota);
        decisions.iter().all(|d| d.allowed || d.quota)
            && (quota().next().is_none() || quota().any(|d| d.allowed))
    }

    /// True when the caller is in its scope's penalty box, or on its deny
    /// list.
    pub fn banned(&self) -> bool {
        self.penalty.banned.is_some() || self.deny_listed
    }
}

/// The state of one bucket after a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketReport {
    /// The rule it belongs to.
    pub rule: Arc<str>,
    /// Its capacity.
    pub limit: u64,
    /// Its refill period.
    pub period: Duration,
    /// Whole tokens left after the decision.
    pub remaining: u64,
    /// Until it is full again.
    pub reset_after: Duration,
    /// Until it holds the cost, when it does not now and ever can.
    pub retry_after: Option<Duration>,
    /// True when it did not hold the cost.
    pub exhausted: bool,
    /// True for a shadow limit, which never denies.
    pub shadow: bool,
}

/// Why the limiter could not decide.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DecideError {
    /// The store failed and the scope fails closed.
    #[error("rate-limit store unavailable for scope {scope:?}: {source}")]
    StoreUnavailable {
        /// The scope whose failure mode is `closed`.
        scope: String,
        /// What the store said.
        source: StoreError,
    },
    /// A request with `settle_within` draws on more than a reservation
    /// token can carry; nothing was taken.
    #[error(
        "settle_within: this request draws on {buckets} buckets, more than one reservation can carry ({max} bytes); reserve on fewer limits"
    )]
    TooBigToReserve {
        /// How many buckets it draws on.
        buckets: usize,
        /// The most bytes a token may have.
        max: usize,
    },
}

/// One generation of what a reload swaps: the rules, and `extra`, what the
/// layers above keep beside them (the API's caller grants and header
/// settings). The limiter carries `extra` but never reads it, so it stays
/// below the layers that define it. Swapped whole, as one `Arc`: a call that
/// loads it once sees one config, never the rules of one and the grants of
/// another (`src/reload.rs` says why it is shaped so).
#[derive(Debug)]
pub struct Generation<E = ()> {
    /// The rules decisions are made on. Their own `Arc`, so a reader that
    /// wants only them (the status page, a test) keeps them alone.
    pub rules: Arc<Rules>,
    /// What is swapped with the rules; `()` when nothing is.
    pub extra: E,
}

impl Generation {
    /// A generation of `rules` alone.
    pub fn new(rules: Rules) -> Self {
        Self {
            rules: Arc::new(rules),
            extra: (),
        }
    }
}

/// Decides requests against the live rules and a store.
#[derive(Debug)]
pub struct Limiter<S, E = ()> {
    /// The rules and what is swapped with them, loaded once per call.
    generation: ArcSwap<Generation<E>>,
    store: S,
    /// Signs and verifies reservations.
    signer: Signer,
}

impl<S: Store> Limiter<S> {
    /// A limiter over `store` with `rules`.
    pub fn new(rules: Rules, store: S) -> Self {
        Self::from_generation(Generation::new(rules), store)
    }

    /// Swaps in a new rule set, whole. Decisions under way finish on the old.
    /// (A limiter that carries more than rules swaps it all with
    /// [`Limiter::replace`].)
    pub fn replace_rules(&self, rules: Rules) {
        self.replace(Generation::new(rules));
    }
}

impl<S: Store, E> Limiter<S, E> {
    /// A limiter over `store`, starting with `generation`.
    pub fn from_generation(generation: Generation<E>, store: S) -> Self {
        store.rules_replaced(&scope_names(&generation.rules));
        Self {
            generation: ArcSwap::from_pointee(generation),
            store,
            signer: Signer::random(),
        }
    }

    /// Signs reservations with `signer`: replicas with the same key settle
    /// each other's.
    pub fn with_signer(self, signer: Signer) -> Self {
        Self { signer, ..self }
    }

    /// The signer of reservations; a reload gives it the new secrets.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// The generation in force: load it once per call and decide, authorise
    /// and report on it, so a reload mid-call cannot mix two configs.
    pub fn snapshot(&self) -> Arc<Generation<E>> {
        self.generation.load_full()
    }

    /// The live rules.
    pub fn rules(&self) -> Arc<Rules> {
        self.generation.load().rules.clone()
    }

    /// Swaps in a new generation, whole. Calls under way finish on the old.
    pub fn replace(&self, generation: Generation<E>) {
        let generation = Arc::new(generation);
        self.generation.store(generation.clone());
        self.store.rules_replaced(&scope_names(&generation.rules));
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Decides one request against the live rules.
    pub async fn decide(&self, req: &Request<'_>) -> Result<Decision, DecideError> {
        self.decide_on(&self.generation.load().rules, req).await
    }

    /// Decides one request against `rules`, a snapshot the caller already
    /// read (and authorised the call on).
    pub async fn decide_on(
        &self,
        rules: &Rules,
        req: &Request<'_>,
    ) -> Result<Decision, DecideError> {
        let mut buckets = plan::Buckets::new();
        if let Err(why) = plan::plan_into(rules, req, &mut buckets) {
            return Ok(why.decision(rules, req.scope));
        }
        if req.settle_within.is_some() && !req.dry_run {
            // Boxed: its state would otherwise grow every decision's future.
            return Box::pin(self.reserve(rules, req, &buckets)).await;
        }
        // One bucket, the common case, stays inline in the charge and its
        // outcome: no list is built on the way down or back up.
        let mut charge = plan::charge(&buckets, req.dry_run);
        charge.penalty = plan::penalty(rules, req, &buckets);
        match self.store.check_and_take_one(&charge).await {
            Ok(outcome) => Ok(plan::decision(&buckets, &outcome)),
            Err(e) => plan::failed(rules, req.scope, e),
        }
    }

    /// Decides independent requests, each atomic on its own, with one call to
    /// the store for all of them. Results are in request order.
    pub async fn decide_each(&self, reqs: &[Request<'_>]) -> Vec<Result<Decision, DecideError>> {
        self.decide_each_on(&self.generation.load().rules, reqs)
            .await
    }

    /// [`Limiter::decide_each`] against the rule set `rules`.
    pub async fn decide_each_on(
        &self,
        rules: &Rules,
        reqs: &[Request<'_>],
    ) -> Vec<Result<Decision, DecideError>> {
        let plans: Vec<Plan<'_, '_>> = reqs.iter().map(|r| plan::plan(rules, r)).collect();
        let charges: Vec<_> = plans
            .iter()
            .zip(reqs)
            .filter_map(|(p, r)| match p {
                Ok(buckets) => Some(Charge {
                    penalty: plan::penalty(rules, r, buckets),
                    ..plan::charge(buckets, r.dry_run)
                }),
                Err(_) => None,
            })
            .collect();
        let outcomes = if charges.is_empty() {
            Vec::new()
        } else {
            self.store.check_and_take_each(&charges).await
        };
        plan::each(rules, reqs, plans, outcomes)
    }

    /// Decides requests together, as one atomic charge: if any is denied,
    /// none takes anything. Used for Envoy's multi-descriptor requests. A
    /// bucket drawn on by several requests is charged their summed cost.
    pub async fn decide_together(
        &self,
        reqs: &[Request<'_>],
    ) -> Result<Vec<Decision>, DecideError> {
        self.decide_together_on(&self.generation.load().rules, reqs)
            .await
    }

    /// [`Limiter::decide_together`] against the rule set `rules`, a snapshot
    /// the caller already read from (Envoy's API reads the scope's
    /// `descriptor_keys` there first: both must come from one snapshot, or a
    /// reload between the two reads would mix two configs in one decision).
    ///
    /// Envoy's quota-mode descriptors are the exception to all or nothing:
    /// when only some of them are over, the request passes if the rest of it
    /// does, so it is charged again without them, in a second store call.
    /// Each charge is atomic, so nothing is ever over-admitted; the over
    /// ones take nothing.
    ///
    /// A request strikes at most once, and only when denied for good: with
    /// two quota descriptors or more, the first charge holds back their
    /// strikes; the second charge counts them, and when none follows but
    /// the denial stands on them, one more call reports the strike (a dry
    /// run that takes nothing).
    pub async fn decide_together_on(
        &self,
        rules: &Rules,
        reqs: &[Request<'_>],
    ) -> Result<Vec<Decision>, DecideError> {
        let joint = match Joint::plan(rules, reqs) {
            Ok(joint) => joint,
            Err(denied) => return Ok(vec![*denied; reqs.len()]),
        };
        let held_back = joint.quota_may_retry();
        let first = self
            .charge_together(rules, reqs, &joint, !held_back)
            .await?;
        let Some(keep) = plan::quota_retry(&first) else {
            if held_back && plan::strike_owed(rules, reqs, &first) {
                self.strike_together(rules, reqs, &joint).await;
            }
            return Ok(first);
        };
        let mut second = match Joint::plan_some(rules, reqs, &keep) {
            Ok(joint) => self.charge_together(rules, reqs, &joint, true).await?,
            Err(denied) => return Ok(vec![*denied; reqs.len()]),
        };
        for ((d, first), kept) in second.iter_mut().zip(first).zip(keep) {
            if !kept {
                *d = first;
            }
        }
        Ok(second)
    }

    /// One atomic charge of a joint plan, and its decisions; quota-mode
    /// descriptors' denials strike only with `quota_strikes`.
    async fn charge_together(
        &self,
        rules: &Rules,
        reqs: &[Request<'_>],
        joint: &Joint<'_, '_>,
        quota_strikes: bool,
    ) -> Result<Vec<Decision>, DecideError> {
        let Some(mut charge) = joint.charge() else {
            return Ok(joint.nothing_to_charge());
        };
        charge.penalty = joint.penalty(rules, reqs, quota_strikes);
        let outcome = self.store.check_and_take_one(&charge).await;
        match outcome {
            Ok(outcome) => Ok(joint.decisions(&outcome)),
            Err(e) => joint.failed(rules, reqs, e),
        }
    }
}

impl<S: Store, E> Limiter<S, E> {
    /// Reports the strike a joint charge held back, as a dry run of the
    /// same buckets that takes nothing. A failure loses the strike, not
    /// the answer: the request was decided already. A charge that was a
    /// dry run itself owes none (a dry run never strikes).
    async fn strike_together(&self, rules: &Rules, reqs: &[Request<'_>], joint: &Joint<'_, '_>) {
        let (Some(mut charge), Some(mut penalty)) =
            (joint.charge(), joint.penalty(rules, reqs, true))
        else {
            return;
        };
        if charge.dry_run {
            return;
        }
        penalty.forced = true;
        charge.dry_run = true;
        charge.penalty = Some(penalty);
        let _ = self.store.check_and_take_one(&charge).await;
    }

    /// Which limits of `req`'s scope apply and what each bucket holds now,
    /// from a dry run: nothing is taken. The store's failure mode applies
    /// as to any decision.
    pub async fn explain(&self, req: &Request<'_>) -> Result<explain::Explanation, DecideError> {
        self.explain_on(&self.generation.load().rules, req).await
    }

    /// [`Limiter::explain`] against the rule set `rules`: the limits listed
    /// and the dry run both come from it.
    pub async fn explain_on(
        &self,
        rules: &Rules,
        req: &Request<'_>,
    ) -> Result<explain::Explanation, DecideError> {
        let dry = Request {
            dry_run: true,
            ..*req
        };
        let decision = self.decide_on(rules, &dry).await?;
        let scope = rules.scope(req.scope);
        Ok(explain::Explanation {
            scope_configured: scope.is_some(),
            limits: scope.map(|s| explain::limits(s, req)).unwrap_or_default(),
            decision,
        })
    }
}

/// The configured scopes' names, for [`Store::rules_replaced`].
fn scope_names(rules: &Rules) -> Vec<&str> {
    rules.scopes().map(|s| &*s.name).collect()
}
