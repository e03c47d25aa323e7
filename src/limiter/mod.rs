//! The limiter: rules → which buckets apply → one atomic charge → [`Decision`].
//!
//! It knows no proto types and no Redis types, and it does no I/O of its own:
//! state lives behind the [`Store`] trait. Its rules are swapped whole on
//! reload, and readers never block.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use smallvec::SmallVec;

use crate::config::{FailureMode, UnknownScope};
use crate::store::{BucketCharge, BucketOutcome, Charge, ChargeOutcome, Store, StoreError};

pub mod bucket;
pub mod descriptors;
pub mod rules;

use rules::Planned;
pub use rules::{Limit, Rules, ScopeRules};

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
    /// Every bucket that applied, in limit order.
    pub buckets: Vec<BucketReport>,
    /// Index into `buckets` of the most restrictive bucket: the one that
    /// denied (longest wait) when denied, else the one with least left.
    pub primary: Option<usize>,
}

impl Decision {
    /// The most restrictive bucket, if any applied.
    pub fn primary(&self) -> Option<&BucketReport> {
        self.primary.and_then(|i| self.buckets.get(i))
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
}

/// Decides requests against the live rules and a store.
#[derive(Debug)]
pub struct Limiter<S> {
    rules: ArcSwap<Rules>,
    store: S,
}

impl<S: Store> Limiter<S> {
    /// A limiter over `store` with `rules`.
    pub fn new(rules: Rules, store: S) -> Self {
        Self {
            rules: ArcSwap::from_pointee(rules),
            store,
        }
    }

    /// The live rules.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.load_full()
    }

    /// Swaps in a new rule set, whole. Decisions under way finish on the old.
    pub fn replace_rules(&self, rules: Rules) {
        self.rules.store(Arc::new(rules));
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Decides one request.
    pub async fn decide(&self, req: &Request<'_>) -> Result<Decision, DecideError> {
        let rules = self.rules.load();
        let Some(scope) = rules.scope(req.scope) else {
            return Ok(unknown_scope(&rules, req.scope));
        };
        let mut planned: SmallVec<[Planned<'_, '_>; 4]> = SmallVec::new();
        scope.buckets(req, &mut planned);
        if planned.is_empty() {
            return Ok(Decision {
                allowed: true,
                ..Decision::default()
            });
        }
        let charge = Charge {
            buckets: planned.iter().map(|p| p.charge).collect(),
            dry_run: req.dry_run,
        };
        match self.store.check_and_take_one(&charge).await {
            Ok(outcome) => Ok(decision(&planned, &outcome)),
            Err(e) => store_failed(&rules, req.scope, e),
        }
    }

    /// Decides independent requests, each atomic on its own, with one call to
    /// the store for all of them. Results are in request order.
    pub async fn decide_each(&self, reqs: &[Request<'_>]) -> Vec<Result<Decision, DecideError>> {
        let rules = self.rules.load();
        let mut plans: Vec<Vec<Planned<'_, '_>>> = Vec::with_capacity(reqs.len());
        let mut charges = Vec::with_capacity(reqs.len());
        let mut early: Vec<Option<Decision>> = Vec::with_capacity(reqs.len());
        for req in reqs {
            let mut planned = Vec::new();
            match rules.scope(req.scope) {
                Some(scope) => {
                    scope.buckets(req, &mut planned);
                    early.push(None);
                }
                None => early.push(Some(unknown_scope(&rules, req.scope))),
            }
            if early.last().is_some_and(Option::is_none) && !planned.is_empty() {
                charges.push(Charge {
                    buckets: planned.iter().map(|p| p.charge).collect(),
                    dry_run: req.dry_run,
                });
            }
            plans.push(planned);
        }

        let outcomes = if charges.is_empty() {
            Ok(Vec::new())
        } else {
            self.store.check_and_take(&charges).await
        };

        let mut outcomes = match outcomes {
            Ok(o) => Ok(o.into_iter()),
            Err(e) => Err(e),
        };
        reqs.iter()
            .zip(plans)
            .zip(early)
            .map(|((req, planned), early)| {
                if let Some(d) = early {
                    return Ok(d);
                }
                if planned.is_empty() {
                    return Ok(Decision {
                        allowed: true,
                        ..Decision::default()
                    });
                }
                match &mut outcomes {
                    Ok(it) => match it.next() {
                        Some(outcome) => Ok(decision(&planned, &outcome)),
                        None => store_failed(
                            &rules,
                            req.scope,
                            StoreError::permanent("store returned too few outcomes"),
                        ),
                    },
                    Err(e) => store_failed(&rules, req.scope, e.clone()),
                }
            })
            .collect()
    }

    /// Decides requests together, as one atomic charge: if any is denied,
    /// none takes anything. Used for Envoy's multi-descriptor requests. A
    /// bucket drawn on by several requests is charged their summed cost.
    pub async fn decide_together(
        &self,
        reqs: &[Request<'_>],
    ) -> Result<Vec<Decision>, DecideError> {
        let rules = self.rules.load();
        let mut planned: Vec<Planned<'_, '_>> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        let mut denied_unknown = None;
        for (i, req) in reqs.iter().enumerate() {
            match rules.scope(req.scope) {
                Some(scope) => {
                    let before = planned.len();
                    scope.buckets(req, &mut planned);
                    owner.extend(std::iter::repeat_n(i, planned.len() - before));
                }
                None => {
                    let d = unknown_scope(&rules, req.scope);
                    if !d.allowed {
                        denied_unknown = Some(d);
                    }
                }
            }
        }
        drop_replaced(&mut planned, &mut owner);
        if let Some(d) = denied_unknown {
            return Ok(vec![d; reqs.len()]);
        }

        // One slot per distinct bucket; requests sharing it add their costs.
        let mut slots: Vec<BucketCharge<'_>> = Vec::with_capacity(planned.len());
        let mut slot_of = Vec::with_capacity(planned.len());
        for p in &planned {
            match slots.iter().position(|s| s.key == p.charge.key) {
                Some(at) => {
                    slots[at].cost = slots[at].cost.saturating_add(p.charge.cost);
                    // A bucket enforced by any request is enforced.
                    slots[at].shadow &= p.charge.shadow;
                    slot_of.push(at);
                }
                None => {
                    slot_of.push(slots.len());
                    slots.push(p.charge);
                }
            }
        }
        let dry_run = reqs.iter().all(|r| r.dry_run);
        // What each bucket was charged in all, for the reports below.
        let slot_costs: Vec<u64> = slots.iter().map(|s| s.cost).collect();
        let outcome = if slots.is_empty() {
            ChargeOutcome {
                allowed: true,
                buckets: Vec::new(),
            }
        } else {
            let charge = Charge {
                buckets: slots,
                dry_run,
            };
            match self
                .store
                .check_and_take(std::slice::from_ref(&charge))
                .await
            {
                Ok(mut o) => o
                    .pop()
                    .ok_or_else(|| StoreError::permanent("store returned no outcome")),
                Err(e) => Err(e),
            }
            .or_else(|e| {
                // The strictest failure mode among the scopes involved rules.
                let closed = reqs
                    .iter()
                    .find(|r| rules.failure_mode_of(r.scope) == FailureMode::Closed);
                match closed {
                    Some(r) => Err(DecideError::StoreUnavailable {
                        scope: r.scope.to_owned(),
                        source: e,
                    }),
                    None => Ok(ChargeOutcome {
                        allowed: true,
                        buckets: Vec::new(),
                    }),
                }
            })?
        };
        let degraded = !planned.is_empty() && outcome.buckets.is_empty();

        let mut decisions = Vec::with_capacity(reqs.len());
        for i in 0..reqs.len() {
            // A shared bucket reports the summed cost it was judged on.
            let mine: Vec<Planned<'_, '_>> = planned
                .iter()
                .zip(&owner)
                .zip(&slot_of)
                .filter(|((_, o), _)| **o == i)
                .map(|((p, _), s)| {
                    let mut p = *p;
                    p.charge.cost = slot_costs[*s];
                    p
                })
                .collect();
            if degraded {
                decisions.push(degraded_decision());
                continue;
            }
            let per_bucket = ChargeOutcome {
                allowed: outcome.allowed,
                buckets: slot_of
                    .iter()
                    .zip(&owner)
                    .filter(|(_, o)| **o == i)
                    .map(|(s, _)| outcome.buckets[*s])
                    .collect(),
            };
            let mut d = decision(&mine, &per_bucket);
            d.allowed = outcome.allowed;
            decisions.push(d);
        }
        Ok(decisions)
    }
}

/// Drops the buckets of rules that another planned rule of the same scope
/// `replaces`, keeping `owner` in step.
fn drop_replaced<'r, 'q>(planned: &mut Vec<Planned<'r, 'q>>, owner: &mut Vec<usize>) {
    let replaced: Vec<(&'q str, &'r str)> = planned
        .iter()
        .flat_map(|p| {
            let scope = p.charge.key.scope;
            p.limit.replaces.iter().map(move |r| (scope, &**r))
        })
        .collect();
    if replaced.is_empty() {
        return;
    }
    (*planned, *owner) = std::mem::take(planned)
        .into_iter()
        .zip(std::mem::take(owner))
        .filter(|(p, _)| !replaced.contains(&(p.charge.key.scope, &*p.limit.name)))
        .unzip();
}

fn unknown_scope(rules: &Rules, scope: &str) -> Decision {
    match rules.unknown_scope {
        UnknownScope::Allow => Decision {
            allowed: true,
            ..Decision::default()
        },
        UnknownScope::Deny => Decision {
            allowed: false,
            reason: Some(format!("scope {scope:?} is not configured")),
            ..Decision::default()
        },
    }
}

fn degraded_decision() -> Decision {
    Decision {
        allowed: true,
        degraded: true,
        ..Decision::default()
    }
}

fn store_failed(rules: &Rules, scope: &str, e: StoreError) -> Result<Decision, DecideError> {
    match rules.failure_mode_of(scope) {
        FailureMode::Open => Ok(degraded_decision()),
        FailureMode::Closed => Err(DecideError::StoreUnavailable {
            scope: scope.to_owned(),
            source: e,
        }),
    }
}

/// Builds the decision for one request from the store's outcome. Pure.
fn decision(planned: &[Planned<'_, '_>], outcome: &ChargeOutcome) -> Decision {
    let buckets: Vec<BucketReport> = planned
        .iter()
        .zip(&outcome.buckets)
        .map(|(p, o)| report(p, o))
        .collect();
    let mut d = Decision {
        allowed: outcome.allowed,
        ..Decision::default()
    };
    if outcome.allowed {
        // Least left among the enforced buckets (shadow ones only if alone).
        d.primary = buckets
            .iter()
            .enumerate()
            .filter(|(_, b)| !b.shadow)
            .min_by_key(|(_, b)| b.remaining)
            .or_else(|| buckets.iter().enumerate().min_by_key(|(_, b)| b.remaining))
            .map(|(i, _)| i);
    } else {
        let denying = || {
            buckets
                .iter()
                .enumerate()
                .filter(|(_, b)| b.exhausted && !b.shadow)
        };
        // A bucket whose cost exceeds its capacity can never allow: no retry.
        if let Some((i, b)) = denying().find(|(_, b)| b.retry_after.is_none()) {
            d.primary = Some(i);
            d.reason = Some(format!(
                "cost {} exceeds the capacity {} of rule {:?}",
                planned[i].charge.cost, b.limit, b.rule
            ));
        } else if let Some((i, b)) = denying().max_by_key(|(_, b)| b.retry_after) {
            d.primary = Some(i);
            d.retry_after = b.retry_after;
        }
    }
    d.buckets = buckets;
    d
}

fn report(p: &Planned<'_, '_>, o: &BucketOutcome) -> BucketReport {
    BucketReport {
        rule: p.limit.name.clone(),
        limit: p.charge.shape.capacity,
        period: Duration::from_nanos(p.charge.shape.period),
        remaining: o.remaining,
        reset_after: o.reset_after,
        retry_after: o.retry_after,
        exhausted: !o.conforms,
        shadow: p.charge.shadow,
    }
}
