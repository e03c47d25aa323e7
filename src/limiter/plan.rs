//! The planner: requests → charges, and store outcomes → decisions. Pure.
//!
//! Every way of deciding (one request, independent requests, requests
//! decided together) plans here, so the unknown-scope case, the empty plan
//! and the failure mode are written once. [`super::Limiter`] only adds the
//! call to the store between the two halves.

use smallvec::SmallVec;

use super::limit::{Limit, LimitKind};
use super::rules::{Planned, Rules};
use super::{BucketReport, DecideError, Decision, Request};
use crate::config::{FailureMode, UnknownScope};
use crate::store::{BucketCharge, BucketOutcome, Charge, ChargeOutcome, StoreError};

/// One request's buckets; a handful at most in practice, kept on the stack.
pub(crate) type Buckets<'r, 'q> = SmallVec<[Planned<'r, 'q>; 4]>;

/// What one request needs: its buckets charged together, or an answer
/// without the store.
pub(crate) type Plan<'r, 'q> = Result<Buckets<'r, 'q>, Unplanned>;

/// Why a request needs no store call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unplanned {
    /// Its scope is not configured.
    UnknownScope,
    /// No limit of its scope applies to it.
    NoBucket,
    /// Its identity is on the scope's deny list.
    DenyListed,
}

impl Unplanned {
    /// The decision for a request that needs no store call.
    pub(crate) fn decision(self, rules: &Rules, scope: &str) -> Decision {
        match self {
            Self::UnknownScope => unknown_scope(rules, scope),
            Self::NoBucket => allowed(),
            Self::DenyListed => Decision {
                allowed: false,
                deny_listed: true,
                reason: Some(format!("the identity is on scope {scope:?}'s deny list")),
                ..Decision::default()
            },
        }
    }
}

/// Plans one request into `buckets`, which the caller owns so the plan is
/// built in place: returning it, or a `Decision`, by value cost up to 200
/// instructions of copying on the single-bucket path (callgrind).
#[inline]
pub(crate) fn plan_into<'r, 'q>(
    rules: &'r Rules,
    req: &Request<'q>,
    buckets: &mut Buckets<'r, 'q>,
) -> Result<(), Unplanned>
where
    'r: 'q,
{
    let scope = rules.scope(req.scope).ok_or(Unplanned::UnknownScope)?;
    if scope.lists.denies(req.identity) {
        return Err(Unplanned::DenyListed);
    }
    scope.buckets(req, buckets);
    if buckets.is_empty() {
        Err(Unplanned::NoBucket)
    } else {
        Ok(())
    }
}

/// Plans one request, for callers that keep many plans.
pub(crate) fn plan<'r, 'q>(rules: &'r Rules, req: &Request<'q>) -> Plan<'r, 'q>
where
    'r: 'q,
{
    let mut buckets = Buckets::new();
    plan_into(rules, req, &mut buckets).map(|()| buckets)
}

/// The store charge for a request's buckets.
pub(crate) fn charge<'q>(buckets: &[Planned<'_, 'q>], dry_run: bool) -> Charge<'q> {
    // Pushed one by one, as in `decision_of`: a single bucket stays inline.
    let mut list = SmallVec::new();
    for p in buckets {
        list.push(p.charge);
    }
    Charge {
        buckets: list,
        dry_run,
        marks: false,
        open: None,
        lease: None,
        penalty: None,
    }
}

/// The penalty part of `req`'s charge, when its scope has a penalty box.
pub(crate) fn penalty<'q>(
    rules: &Rules,
    req: &Request<'q>,
    buckets: &[Planned<'_, 'q>],
) -> Option<crate::store::Penalty<'q>> {
    let scope = buckets.first()?.charge.key.scope;
    let rules = rules.scope(req.scope)?;
    if rules.lists.allows(req.identity) {
        // Allow-listed: spared the penalty box, not the limits.
        return None;
    }
    rules.penalty.as_ref()?.part(scope, req, buckets)
}

/// What a request gets when the store failed: the scope's failure mode.
pub(crate) fn failed(rules: &Rules, scope: &str, e: StoreError) -> Result<Decision, DecideError> {
    match rules.failure_mode_of(scope) {
        FailureMode::Open => Ok(degraded()),
        FailureMode::Closed => Err(DecideError::StoreUnavailable {
            scope: scope.to_owned(),
            source: e,
        }),
    }
}

/// The decisions of independent requests, in order, from their plans and
/// the store's result for each plan that charged (in the same order). Each
/// request gets its own charge's result: one charge's failure never decides
/// another request.
pub(crate) fn each(
    rules: &Rules,
    reqs: &[Request<'_>],
    plans: Vec<Plan<'_, '_>>,
    outcomes: Vec<Result<ChargeOutcome, StoreError>>,
) -> Vec<Result<Decision, DecideError>> {
    let mut outcomes = outcomes.into_iter();
    reqs.iter()
        .zip(plans)
        .map(|(req, plan)| match plan {
            Err(why) => Ok(why.decision(rules, req.scope)),
            Ok(buckets) => match outcomes.next() {
                Some(Ok(outcome)) => Ok(decision(&buckets, &outcome)),
                Some(Err(e)) => failed(rules, req.scope, e),
                None => failed(
                    rules,
                    req.scope,
                    StoreError::permanent("store returned too few outcomes"),
                ),
            },
        })
        .collect()
}

/// Requests planned to be decided together, as one atomic charge.
#[derive(Debug)]
pub(crate) struct Joint<'r, 'q> {
    /// Every bucket planned, in request order, that no other planned rule
    /// `replaces`.
    buckets: Vec<JointBucket<'r, 'q>>,
    /// One charge per distinct bucket: requests drawing on the same bucket
    /// add their costs, so the bucket is judged on what they take in all.
    slots: Vec<BucketCharge<'q>>,
    /// True only when every request is a dry run.
    dry_run: bool,
    /// How many requests were planned.
    requests: usize,
    /// Per request: what its descriptor rule says beyond its buckets.
    specials: Vec<Special<'r>>,
}

/// What an Envoy descriptor's rule says beyond the buckets it charges.
#[derive(Debug, Clone, Copy, Default)]
struct Special<'r> {
    /// A quota-mode descriptor: its own limit alone does not deny the
    /// request ([`Decision::overall`]).
    quota: bool,
    /// Its rule is `unlimited`.
    unlimited: bool,
    /// Its rule admits nothing (`requests_per_unit: 0`), with the rule's
    /// scope, and whether it denies (it is neither shadow nor under the
    /// global shadow mode).
    nothing: Option<(&'r Limit, &'r str, bool)>,
    /// Its rule when it charges no bucket (unlimited, or admits nothing),
    /// with its scope: its `replaces` still drop other rules.
    unbucketed: Option<(&'r Limit, &'r str)>,
}

impl<'r> Special<'r> {
    /// The special of a descriptor whose rule in the tree is `rule`, under
    /// the global quota and shadow modes `quota` and `shadow`.
    fn of(rule: Option<&'r Limit>, scope: &'r str, quota: bool, shadow: bool) -> Self {
        let kind = rule.map(|l| l.kind);
        let unlimited = kind == Some(LimitKind::Unlimited);
        Self {
            // Upstream leaves unlimited descriptors out of the quota count.
            quota: !unlimited && (quota || rule.is_some_and(|l| l.quota)),
            unlimited,
            nothing: rule
                .filter(|l| l.kind == LimitKind::Nothing)
                .map(|l| (l, scope, !l.shadow && !shadow)),
            unbucketed: rule
                .filter(|l| l.kind != LimitKind::Bucket)
                .map(|l| (l, scope)),
        }
    }

    /// Its rule admits nothing and denies.
    fn blocks(&self) -> bool {
        self.nothing.is_some_and(|(_, _, enforced)| enforced)
    }
}

/// A joint plan's requests, their buckets by owner, and what each
/// descriptor's rule says beyond them.
type Gathered<'r, 'q> = (Vec<(Planned<'r, 'q>, usize)>, Vec<Special<'r>>);

/// One planned bucket of a joint plan.
#[derive(Debug)]
struct JointBucket<'r, 'q> {
    planned: Planned<'r, 'q>,
    /// The request it is for.
    owner: usize,
    /// Its index in [`Joint::slots`].
    slot: usize,
}

impl<'r, 'q> Joint<'r, 'q>
where
    'r: 'q,
{
    /// Plans `reqs` together. `Err` holds the denial every request gets when
    /// one names an unknown scope that is denied (boxed: it is rare, and a
    /// `Decision` holds its first bucket inline).
    pub(crate) fn plan(rules: &'r Rules, reqs: &[Request<'q>]) -> Result<Self, Box<Decision>> {
        Self::plan_some(rules, reqs, &vec![true; reqs.len()])
    }

    /// Plans together the requests of `reqs` that `include` marks; the
    /// others draw on nothing, and their decisions are placeholders.
    pub(crate) fn plan_some(
        rules: &'r Rules,
        reqs: &[Request<'q>],
        include: &[bool],
    ) -> Result<Self, Box<Decision>> {
        let (planned, mut specials) = Self::gather(rules, reqs, include)?;
        let mut replaced: Vec<(&str, &str)> = planned
            .iter()
            .flat_map(|(p, _)| {
                let scope = p.charge.key.scope;
                p.limit.replaces.iter().map(move |r| (scope, &**r))
            })
            .collect();
        for (l, scope) in specials.iter().filter_map(|s| s.unbucketed) {
            replaced.extend(l.replaces.iter().map(|r| (scope, &**r)));
        }
        let is_replaced =
            |scope: &str, l: &Limit| l.replaceable && replaced.contains(&(scope, &*l.name));
        for s in &mut specials {
            if s.nothing.is_some_and(|(l, scope, _)| is_replaced(scope, l)) {
                s.nothing = None;
            }
        }
        let mut joint = Self {
            buckets: Vec::with_capacity(planned.len()),
            slots: Vec::with_capacity(planned.len()),
            dry_run: reqs.iter().all(|r| r.dry_run) || specials.iter().any(Special::blocks),
            requests: reqs.len(),
            specials,
        };
        for (planned, owner) in planned {
            if is_replaced(planned.charge.key.scope, planned.limit) {
                continue;
            }
            let slot = joint.slot_for(planned.charge);
            joint.buckets.push(JointBucket {
                planned,
                owner,
                slot,
            });
        }
        joint.merge_headroom();
        Ok(joint)
    }

    /// Each included request's buckets, and for an Envoy descriptor (one
    /// with entries) what its rule in the tree says beyond them. Under the
    /// global shadow mode an Envoy descriptor's buckets are all shadow.
    fn gather(
        rules: &'r Rules,
        reqs: &[Request<'q>],
        include: &[bool],
    ) -> Result<Gathered<'r, 'q>, Box<Decision>> {
        let mut planned = Vec::new();
        let mut specials = vec![Special::default(); reqs.len()];
        let mut denied = None;
        let included = reqs.iter().enumerate().filter(|(i, _)| include[*i]);
        for (owner, req) in included {
            let Some(scope) = rules.scope(req.scope) else {
                let d = unknown_scope(rules, req.scope);
                if !d.allowed {
                    denied = Some(d);
                }
                continue;
            };
            if scope.lists.denies(req.identity) {
                denied = Some(Unplanned::DenyListed.decision(rules, req.scope));
                continue;
            }
            let mut mine = Buckets::new();
            scope.buckets(req, &mut mine);
            let envoy = !req.entries.is_empty();
            let shadow = envoy && rules.envoy_shadow_mode;
            if envoy {
                let rule = scope.descriptor_tree.find(req.entries);
                specials[owner] = Special::of(rule, &scope.name, rules.envoy_quota_mode, shadow);
            }
            planned.extend(mine.into_iter().map(|mut p| {
                p.charge.shadow |= shadow;
                (p, owner)
            }));
        }
        match denied {
            Some(d) => Err(Box::new(d)),
            None => Ok((planned, specials)),
        }
    }

    /// The plan of a refund: a rule that admits nothing refuses no refund.
    pub(crate) fn for_refund(mut self) -> Self {
        for s in &mut self.specials {
            s.nothing = None;
        }
        self.dry_run = false;
        self
    }

    /// Gives each shared slot the headroom its requests leave together. A
    /// batch on one bucket is allowed when some order of its requests lets
    /// each keep its own priority's headroom; the order that does, if any,
    /// takes the requests with the most headroom first. So the bucket must
    /// hold, for every request `k`, the costs of the requests with at least
    /// its headroom `R_k`, plus `R_k`; the slot's reserve is the largest of
    /// those needs less the summed cost. `[CRITICAL 1, SHEDDABLE 9]` on 10
    /// tokens with 3 of sheddable headroom needs 9 + 3: denied, in either
    /// order, where keeping the first entry's headroom allowed one order.
    fn merge_headroom(&mut self) {
        let mut parts: Vec<Vec<(u64, u64)>> = vec![Vec::new(); self.slots.len()];
        for b in &self.buckets {
            parts[b.slot].push((b.planned.charge.reserve, b.planned.charge.cost));
        }
        for (slot, mut part) in self.slots.iter_mut().zip(parts) {
            if part.len() < 2 {
                continue;
            }
            // Most headroom first; requests with equal headroom count
            // together, so each need is taken after its last equal.
            part.sort_unstable_by_key(|p| std::cmp::Reverse(p.0));
            let (mut sum, mut need) = (0u64, 0u64);
            for (i, &(reserve, cost)) in part.iter().enumerate() {
                sum = sum.saturating_add(cost);
                if part.get(i + 1).is_none_or(|next| next.0 != reserve) {
                    need = need.max(sum.saturating_add(reserve));
                }
            }
            slot.reserve = need.saturating_sub(slot.cost);
        }
    }

    /// The slot of `charge`'s bucket, adding its cost to a slot already there.
    fn slot_for(&mut self, charge: BucketCharge<'q>) -> usize {
        match self.slots.iter().position(|s| s.key == charge.key) {
            Some(at) => {
                let s = &mut self.slots[at];
                s.cost = s.cost.saturating_add(charge.cost);
                // A bucket enforced by any request is enforced.
                s.shadow &= charge.shadow;
                // Shaping: the shared bucket waits no longer than any of
                // its requests may.
                s.max_delay = s.max_delay.min(charge.max_delay);
                at
            }
            None => {
                self.slots.push(charge);
                self.slots.len() - 1
            }
        }
    }

    /// The one store charge, or `None` when no bucket applies.
    pub(crate) fn charge(&self) -> Option<Charge<'q>> {
        (!self.slots.is_empty()).then(|| Charge {
            buckets: self.slots.iter().copied().collect(),
            dry_run: self.dry_run,
            marks: false,
            open: None,
            lease: None,
            penalty: None,
        })
    }

    /// True when a denial of this charge may not stand: two quota-mode
    /// descriptors or more, so some being over may be answered by a second
    /// charge without them ([`quota_retry`]).
    pub(crate) fn quota_may_retry(&self) -> bool {
        self.specials.iter().filter(|s| s.quota).count() >= 2
    }

    /// The penalty part of the joint charge: only when every request is
    /// the same caller's in one scope (an Envoy request's descriptors, as a
    /// rule), so one record answers for the whole charge. A bucket's
    /// denial strikes when any request drawing on it counts it; with
    /// `quota_strikes` false, a quota-mode descriptor's requests do not
    /// count theirs (its denial may not stand).
    pub(crate) fn penalty(
        &self,
        rules: &Rules,
        reqs: &[Request<'q>],
        quota_strikes: bool,
    ) -> Option<crate::store::Penalty<'q>> {
        let (first, rest) = reqs.split_first()?;
        let same = |r: &Request<'q>| {
            r.scope == first.scope && r.identity == first.identity && r.operation == first.operation
        };
        if !rest.iter().all(same) {
            return None;
        }
        let mine: Vec<Planned<'r, 'q>> = self.buckets.iter().map(|b| b.planned).collect();
        let mut part = penalty(rules, first, &mine)?;
        let mut flags: SmallVec<[bool; 4]> = SmallVec::from_elem(false, self.slots.len());
        for (b, &strikes) in self.buckets.iter().zip(&part.strikes_from) {
            let quota = self.specials.get(b.owner).is_some_and(|s| s.quota);
            flags[b.slot] |= strikes && (quota_strikes || !quota);
        }
        part.strikes_from = flags;
        Some(part)
    }

    /// Every request's decision from the joint outcome: all allowed or all
    /// denied. A shared bucket reports the summed cost it was judged on. A
    /// rule that admits nothing denies them all, and is reported as a
    /// bucket of capacity 0 that can never pass.
    pub(crate) fn decisions(&self, outcome: &ChargeOutcome) -> Vec<Decision> {
        let allowed = outcome.allowed && !self.specials.iter().any(Special::blocks);
        (0..self.requests)
            .map(|i| {
                let (mine, outcomes): (Vec<Planned<'r, 'q>>, Vec<BucketOutcome>) = self
                    .buckets
                    .iter()
                    .filter(|b| b.owner == i)
                    .map(|b| {
                        let mut p = b.planned;
                        p.charge.cost = self.slots[b.slot].cost;
                        p.charge.reserve = self.slots[b.slot].reserve;
                        (p, outcome.buckets.get(b.slot).copied().unwrap_or(UNSET))
                    })
                    .unzip();
                let mut d = decision(
                    &mine,
                    &ChargeOutcome {
                        allowed: outcome.allowed,
                        buckets: outcomes.into(),
                        now_us: outcome.now_us,
                        delay: outcome.delay,
                        lease: None,
                        penalty: outcome.penalty,
                    },
                );
                d.allowed = allowed;
                if !allowed {
                    d.delay = std::time::Duration::ZERO;
                }
                self.specials[i].apply(&mut d);
                d
            })
            .collect()
    }

    /// The decisions when no bucket applies: allowed, unless a rule that
    /// admits nothing denies.
    pub(crate) fn nothing_to_charge(&self) -> Vec<Decision> {
        self.decisions(&ChargeOutcome {
            allowed: true,
            buckets: SmallVec::new(),
            now_us: 0,
            delay: std::time::Duration::ZERO,
            lease: None,
            penalty: Default::default(),
        })
    }

    /// The decisions when the store failed: the strictest failure mode among
    /// the scopes involved rules.
    pub(crate) fn failed(
        &self,
        rules: &Rules,
        reqs: &[Request<'_>],
        e: StoreError,
    ) -> Result<Vec<Decision>, DecideError> {
        match reqs
            .iter()
            .find(|r| rules.failure_mode_of(r.scope) == FailureMode::Closed)
        {
            Some(r) => Err(DecideError::StoreUnavailable {
                scope: r.scope.to_owned(),
                source: e,
            }),
            None => Ok(vec![degraded(); self.requests]),
        }
    }
}

impl Special<'_> {
    /// Marks `d` with what the descriptor's rule says beyond its buckets.
    fn apply(&self, d: &mut Decision) {
        d.quota = self.quota;
        d.unlimited = self.unlimited;
        let Some((l, _, enforced)) = self.nothing else {
            return;
        };
        d.buckets.push(BucketReport {
            rule: l.name.clone(),
            limit: 0,
            period: std::time::Duration::from_nanos(l.shape.period),
            remaining: 0,
            reset_after: std::time::Duration::ZERO,
            retry_after: None,
            exhausted: true,
            shadow: !enforced,
        });
        if enforced {
            d.primary = Some(d.buckets.len() - 1);
            d.retry_after = None;
            d.reason = Some(format!(
                "rule {:?} admits no requests (requests_per_unit: 0)",
                l.name
            ));
        }
    }
}

/// When decisions made together were denied only because some of their
/// quota-mode descriptors were over (every other descriptor had room, and
/// some quota descriptor did too): which requests to charge again, the
/// quota descriptors that were over left out. `None` when a second charge
/// cannot change the answer.
pub(crate) fn quota_retry(first: &[Decision]) -> Option<Vec<bool>> {
    if Decision::overall(first) {
        return None;
    }
    let over: Vec<bool> = first.iter().map(Decision::over).collect();
    let (mut quota, mut quota_over) = (0, 0);
    for (d, &o) in first.iter().zip(&over) {
        if o && !d.quota {
            return None;
        }
        quota += usize::from(d.quota);
        quota_over += usize::from(d.quota && o);
    }
    if quota_over == 0 || quota_over == quota {
        return None;
    }
    Some(
        first
            .iter()
            .zip(&over)
            .map(|(d, &o)| !(d.quota && o))
            .collect(),
    )
}

/// True when decisions made together, denied for good, owe a strike their
/// charge did not count: it was made with quota-mode descriptors' strikes
/// held back ([`Joint::penalty`]), no retry followed, and an over bucket's
/// limit strikes in the scope's penalty box.
pub(crate) fn strike_owed(rules: &Rules, reqs: &[Request<'_>], first: &[Decision]) -> bool {
    let Some(penalty) = reqs
        .first()
        .and_then(|r| rules.scope(r.scope))
        .and_then(|s| s.penalty.as_ref())
    else {
        return false;
    };
    !Decision::overall(first)
        && !first.iter().any(|d| d.banned() || d.penalty.struck)
        && first
            .iter()
            .filter(|d| d.over())
            .flat_map(|d| &d.buckets)
            .any(|b| b.exhausted && !b.shadow && penalty.strikes_on(&b.rule))
}

/// Stands in for an outcome a store failed to return; never read as allowing,
/// because the joint outcome's `allowed` decides.
const UNSET: BucketOutcome = BucketOutcome {
    conforms: false,
    remaining: 0,
    reset_after: std::time::Duration::ZERO,
    retry_after: None,
    mark: crate::bucket::Mark::EMPTY,
};

fn allowed() -> Decision {
    Decision {
        allowed: true,
        ..Decision::default()
    }
}

fn degraded() -> Decision {
    Decision {
        allowed: true,
        degraded: true,
        ..Decision::default()
    }
}

fn unknown_scope(rules: &Rules, scope: &str) -> Decision {
    match rules.unknown_scope {
        UnknownScope::Allow => allowed(),
        UnknownScope::Deny => Decision {
            allowed: false,
            reason: Some(format!("scope {scope:?} is not configured")),
            ..Decision::default()
        },
    }
}

/// Builds the decision for one request from the store's outcome.
pub(crate) fn decision(planned: &[Planned<'_, '_>], outcome: &ChargeOutcome) -> Decision {
    let mut d = decision_of(planned, outcome.allowed, &outcome.buckets);
    if outcome.allowed {
        d.delay = outcome.delay;
    }
    d.penalty = outcome.penalty;
    // A reported strike may start a ban on a request that was allowed: it
    // stands as decided (it took its cost), and the ban meets the next.
    if let Some(ban) = outcome.penalty.banned.filter(|_| !outcome.allowed) {
        // Banned: denied until the ban ends, whatever the buckets say.
        d.allowed = false;
        d.retry_after = Some(ban.retry_after);
        d.reason = None;
    }
    d
}

/// Builds the decision for one request from whether the store allowed it
/// and its buckets' outcomes, in plan order.
pub(crate) fn decision_of(
    planned: &[Planned<'_, '_>],
    allowed: bool,
    outcomes: &[BucketOutcome],
) -> Decision {
    // Pushed one by one: collecting through SmallVec's `Extend` cost about
    // 140 instructions more per single-bucket decision (callgrind).
    let mut buckets: SmallVec<[BucketReport; 1]> = SmallVec::new();
    for (p, o) in planned.iter().zip(outcomes) {
        buckets.push(report(p, o));
    }
    let mut d = Decision {
        allowed,
        ..Decision::default()
    };
    if allowed {
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
            d.reason = Some(never_reason(&planned[i].charge, b));
        } else if let Some((i, b)) = denying().max_by_key(|(_, b)| b.retry_after) {
            d.primary = Some(i);
            d.retry_after = b.retry_after;
        }
    }
    d.buckets = buckets;
    d
}

/// Why a bucket can never hold what a request needs of it.
fn never_reason(charge: &crate::store::BucketCharge<'_>, b: &BucketReport) -> String {
    let what = if charge.window.is_some() {
        "budget"
    } else {
        "capacity"
    };
    if charge.reserve > 0 {
        format!(
            "cost {} plus the {} of headroom this priority must leave exceed the {what} {} of rule {:?}",
            charge.cost, charge.reserve, b.limit, b.rule
        )
    } else {
        format!(
            "cost {} exceeds the {what} {} of rule {:?}",
            charge.cost, b.limit, b.rule
        )
    }
}

fn report(p: &Planned<'_, '_>, o: &BucketOutcome) -> BucketReport {
    BucketReport {
        rule: p.limit.name.clone(),
        limit: p.charge.shape.capacity,
        period: std::time::Duration::from_nanos(p.charge.shape.period),
        remaining: o.remaining,
        reset_after: o.reset_after,
        retry_after: o.retry_after,
        exhausted: !o.conforms,
        shadow: p.charge.shadow,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Config;

    const CONFIG: &str = "
scopes:
  - name: a
    failure_mode: closed
    limits:
      - { name: per-user, per: identity, capacity: 5, refill_period: 1s }
      - { name: per-scope, per: scope, capacity: 9, refill_period: 1s }
  - name: b
    limits:
      - { name: search, per: identity, capacity: 2, refill_period: 1s, operations: [search] }
";

    fn rules(extra: &str) -> Rules {
        Rules::compile(&Config::from_yaml(&format!("{extra}{CONFIG}")).unwrap()).unwrap()
    }

    fn outcome(allowed: bool, remaining: &[u64]) -> ChargeOutcome {
        ChargeOutcome {
            allowed,
            buckets: remaining
                .iter()
                .map(|&r| BucketOutcome {
                    conforms: r > 0 || allowed,
                    remaining: r,
                    reset_after: Duration::from_millis(100),
                    retry_after: (!allowed && r == 0).then_some(Duration::from_millis(7)),
                    mark: crate::bucket::Mark::default(),
                })
                .collect(),
            now_us: 0,
            delay: Duration::ZERO,
            lease: None,
            penalty: Default::default(),
        }
    }

    #[test]
    fn a_request_plans_one_bucket_per_matching_limit_in_order() {
        let rules = rules("");
        let plan = plan(&rules, &Request::new("a", "ann", "x")).unwrap();
        let names: Vec<&str> = plan.iter().map(|p| p.charge.key.rule).collect();
        assert_eq!(names, ["per-user", "per-scope"]);
        assert_eq!(plan[0].charge.key.identity, Some("ann"));
        assert_eq!(plan[1].charge.key.identity, None);
    }

    #[test]
    fn unknown_scopes_and_empty_plans_need_no_store() {
        let allow = rules("");
        assert_eq!(
            plan(&allow, &Request::new("zz", "", "")).unwrap_err(),
            Unplanned::UnknownScope
        );
        assert!(Unplanned::UnknownScope.decision(&allow, "zz").allowed);
        let deny = rules("unknown_scope: deny\n");
        let d = Unplanned::UnknownScope.decision(&deny, "zz");
        assert!(!d.allowed && d.retry_after.is_none() && d.reason.is_some());
        // Scope b's only limit is for the `search` operation.
        assert_eq!(
            plan(&allow, &Request::new("b", "ann", "list")).unwrap_err(),
            Unplanned::NoBucket
        );
    }

    #[test]
    fn a_denial_reports_the_longest_wait_and_no_wait_for_cost_over_capacity() {
        let rules = rules("");
        let buckets = plan(&rules, &Request::new("a", "ann", "x")).unwrap();
        let d = decision(&buckets, &outcome(false, &[0, 3]));
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(Duration::from_millis(7)));
        assert_eq!(d.primary().map(|b| &*b.rule), Some("per-user"));
        let mut over = outcome(false, &[0, 3]);
        over.buckets[0].retry_after = None;
        let d = decision(&buckets, &over);
        assert_eq!(d.retry_after, None);
        assert!(d.reason.unwrap().contains("exceeds the capacity 5"));
    }

    #[test]
    fn the_failure_mode_of_the_scope_decides_a_store_failure() {
        let rules = rules("");
        let e = StoreError::transient("down");
        assert!(matches!(
            failed(&rules, "a", e.clone()),
            Err(DecideError::StoreUnavailable { .. })
        ));
        let d = failed(&rules, "b", e).unwrap();
        assert!(d.allowed && d.degraded);
    }

    #[test]
    fn independent_requests_each_take_their_own_outcome() {
        let rules = rules("");
        let reqs = [
            Request::new("zz", "", ""),
            Request::new("a", "ann", "x"),
            Request::new("b", "bo", "search"),
        ];
        let plans: Vec<Plan<'_, '_>> = reqs.iter().map(|r| plan(&rules, r)).collect();
        let got = each(
            &rules,
            &reqs,
            plans,
            vec![Ok(outcome(true, &[4, 8])), Ok(outcome(false, &[0]))],
        );
        assert!(
            got[0].as_ref().unwrap().allowed,
            "unknown scope allowed without the store"
        );
        assert_eq!(got[1].as_ref().unwrap().buckets.len(), 2);
        assert!(!got[2].as_ref().unwrap().allowed);
        // Too few outcomes is a store failure, decided by the failure mode.
        let plans: Vec<Plan<'_, '_>> = reqs.iter().map(|r| plan(&rules, r)).collect();
        let got = each(&rules, &reqs, plans, vec![Ok(outcome(true, &[4, 8]))]);
        assert!(got[2].as_ref().unwrap().degraded);
        // One charge's failure decides that request only.
        let plans: Vec<Plan<'_, '_>> = reqs.iter().map(|r| plan(&rules, r)).collect();
        let got = each(
            &rules,
            &reqs,
            plans,
            vec![Err(StoreError::transient("full")), Ok(outcome(false, &[0]))],
        );
        assert!(got[1].is_err(), "scope a fails closed");
        assert!(!got[2].as_ref().unwrap().allowed, "b's denial stands");
    }

    #[test]
    fn requests_together_share_one_slot_per_bucket_with_summed_cost() {
        let rules = rules("");
        let mut one = Request::new("a", "ann", "x");
        one.cost = 2;
        let mut two = Request::new("a", "bo", "x");
        two.cost = 3;
        two.dry_run = true;
        let joint = Joint::plan(&rules, &[one, two]).unwrap();
        let charge = joint.charge().unwrap();
        // ann's and bo's own buckets, and the scope's bucket once, charged 5.
        let costs: Vec<(&str, Option<&str>, u64)> = charge
            .buckets
            .iter()
            .map(|b| (b.key.rule, b.key.identity, b.cost))
            .collect();
        assert_eq!(
            costs,
            [
                ("per-user", Some("ann"), 2),
                ("per-scope", None, 5),
                ("per-user", Some("bo"), 3)
            ]
        );
        assert!(!charge.dry_run, "a dry run only when every request is one");
        let ds = joint.decisions(&outcome(false, &[3, 0, 2]));
        assert!(ds.iter().all(|d| !d.allowed));
        assert_eq!(ds[1].buckets.len(), 2);
        assert_eq!(
            ds[1].buckets[1].remaining, 0,
            "bo sees the shared bucket's outcome"
        );
    }

    #[test]
    fn together_an_unknown_scope_denies_all_when_unknown_scopes_are_denied() {
        let rules = rules("unknown_scope: deny\n");
        let reqs = [Request::new("a", "ann", "x"), Request::new("zz", "", "")];
        let denial = Joint::plan(&rules, &reqs).unwrap_err();
        assert!(!denial.allowed);
        let closed = Joint::plan(&rules, &reqs[..1]).unwrap();
        assert!(
            closed
                .failed(&rules, &reqs[..1], StoreError::transient("down"))
                .is_err()
        );
    }

    fn judged(allowed: bool, quota: bool, over: bool) -> Decision {
        let mut d = decision(&[], &outcome(allowed, &[]));
        d.quota = quota;
        if over {
            d.buckets.push(BucketReport {
                rule: "r".into(),
                limit: 1,
                period: Duration::from_secs(1),
                remaining: 0,
                reset_after: Duration::ZERO,
                retry_after: None,
                exhausted: true,
                shadow: false,
            });
        }
        d
    }

    #[test]
    fn quota_descriptors_are_charged_again_only_when_some_but_not_all_are_over() {
        // Rate-limit descriptor fine, one quota over, one not: retry without it.
        let first = [
            judged(false, false, false),
            judged(false, true, true),
            judged(false, true, false),
        ];
        assert!(!Decision::overall(&first));
        assert_eq!(quota_retry(&first), Some(vec![true, false, true]));
        // Every quota over, or a rate-limit descriptor over: the denial stands.
        let all = [judged(false, true, true), judged(false, true, true)];
        assert_eq!(quota_retry(&all), None);
        let rate = [
            judged(false, false, true),
            judged(false, true, false),
            judged(false, true, true),
        ];
        assert_eq!(quota_retry(&rate), None);
        // After the retry: an over quota descriptor alone does not deny.
        let after = [
            judged(true, false, false),
            judged(false, true, true),
            judged(true, true, false),
        ];
        assert!(Decision::overall(&after));
        assert!(!Decision::overall(&[judged(false, true, true)]));
        assert_eq!(quota_retry(&after), None, "allowed: nothing to retry");
    }
}
