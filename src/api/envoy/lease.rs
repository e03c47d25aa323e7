//! Envoy descriptors that hold leases: which descriptor reaches a
//! concurrency limit, and a request's leases decided with its rates, all
//! or nothing (docs/envoy.md, "Concurrency limits").
//!
//! A descriptor of a scope with `descriptor_keys.lease_id` that reaches one
//! of the scope's concurrency limits (the first that matches, as for
//! `tollgate.v1`) names its lease by that entry: sent on the request path
//! it acquires the lease for the limit's `max_lease`, and sent with
//! `is_negative_hits` (Envoy's `apply_on_stream_done`) it releases it.

use std::sync::Arc;

use super::{Described, EnvoyRateLimitApi, Kind};
use crate::api::leases::result_of;
use crate::api::validate;
use crate::error::InvalidField;
use crate::limiter::{self, Decision, LeaseAction, LeaseDecision, LeaseError, ScopeRules};
use crate::store::Store;
use crate::store::lease::MAX_LEASE_ID_LEN;

/// The lease id of a descriptor that reaches one of its scope's
/// concurrency limits; `None` when it reaches none, or when its scope maps
/// no lease id (the config then has no concurrency limit in a scope with
/// `descriptor_keys`, and a scope without them keeps its pools for
/// `tollgate.v1`). A descriptor that reaches a pool without the entry is
/// refused: holding a slot no later descriptor could name would leak it
/// until `max_lease`, and passing it unheld would break the limit.
pub(super) fn lease_id<'a>(
    d: &Described<'a>,
    scope: Option<&ScopeRules>,
    domain: &str,
    at: &str,
) -> Result<Option<&'a str>, InvalidField> {
    let Some(scope) = scope else {
        return Ok(None);
    };
    let Some(key) = scope
        .descriptor_keys
        .as_ref()
        .and_then(|k| k.lease_id.as_deref())
    else {
        return Ok(None);
    };
    let req = d.request(domain);
    let Some(pool) = scope.pools.iter().find(|p| p.limit.matches(&req)) else {
        return Ok(None);
    };
    let Some(j) = d.entries.iter().position(|(k, _)| *k == key) else {
        return Err(validate::invalid(
            &format!("{at}.entries"),
            format!(
                "has no {key:?} entry, yet reaches the concurrency limit {:?}, which holds a \
                 lease per request (descriptor_keys.lease_id: in Envoy, a request_headers \
                 action on x-request-id)",
                &*pool.limit.name
            ),
        ));
    };
    let id = d.entries[j].1;
    validate::text(
        &format!("{at}.entries[{j}].value"),
        id,
        MAX_LEASE_ID_LEN,
        true,
    )?;
    Ok(Some(id))
}

/// A descriptor's lease after its request was decided.
#[derive(Debug, Clone)]
pub(super) struct Held {
    /// What the store answered (`ok` false once given back).
    pub(super) lease: LeaseDecision,
    /// The pool refused the acquire (or would, for a check): the request
    /// is denied, and the status says `OVER_LIMIT` until `retry_after`.
    pub(super) refused: bool,
    /// This request took the lease and holds it: an acquire granted for
    /// real (not a check, not a dry run after a refusal, not degraded).
    taken: bool,
}

/// Every descriptor's decision, and the lease of each that has one.
pub(super) type Decided = (Vec<Decision>, Vec<Option<Held>>);

impl<S: Store> EnvoyRateLimitApi<S> {
    /// Decides a request some of whose descriptors hold leases, all or
    /// nothing:
    /// 1. the lease calls, one store call each: releases first (always
    ///    OK, touching no bucket), then acquires and checks in request
    ///    order; after a refusal the rest are judged as dry runs;
    /// 2. the rates of every descriptor but the releases, through
    ///    [`EnvoyRateLimitApi::decide`], charged only when no lease was
    ///    refused;
    /// 3. a request denied after all gives back the leases it took.
    ///
    /// The common request, one lease descriptor whose rates and the rest
    /// are charged (no check, no release), goes to the store as one step
    /// with its lease when it can ([`Self::decide_one_step`]). Otherwise it
    /// is not one atomic step: while the rates are decided the leases are
    /// held, so a pool may refuse another request meanwhile (admitting
    /// less, never more).
    pub(super) async fn decide_leased(
        &self,
        rules: &limiter::Rules,
        requests: &[limiter::Request<'_>],
        kinds: &[Kind],
        leases: &[Option<&str>],
    ) -> Result<Decided, LeaseError> {
        if let Some(decided) = self.decide_one_step(rules, requests, kinds, leases).await? {
            return Ok(decided);
        }
        let (held, refused) = self.take_leases(rules, requests, kinds, leases).await?;
        let releases = |i: usize| leases[i].is_some() && kinds[i] == Kind::Refund;
        let rated: Vec<usize> = (0..requests.len()).filter(|&i| !releases(i)).collect();
        let mut asks: Vec<limiter::Request<'_>> = rated.iter().map(|&i| requests[i]).collect();
        let rated_kinds: Vec<Kind> = rated.iter().map(|&i| kinds[i]).collect();
        if refused {
            // A denied request takes nothing; refunds still give back.
            for (r, k) in asks.iter_mut().zip(&rated_kinds) {
                r.dry_run |= *k != Kind::Refund;
            }
        }
        let decided = match self.decide(rules, &asks, &rated_kinds).await {
            Ok(decided) => decided,
            Err(e) => {
                self.give_back(rules, requests, leases, held).await;
                return Err(e.into());
            }
        };
        let released = Decision {
            allowed: true,
            ..Decision::default()
        };
        let mut decisions = vec![released; requests.len()];
        for (i, d) in rated.into_iter().zip(decided) {
            decisions[i] = d;
        }
        for (d, h) in decisions.iter_mut().zip(&held) {
            if let Some(h) = h.as_ref().filter(|h| h.refused) {
                refuse(d, &h.lease);
            }
        }
        let held = if Decision::overall(&decisions) {
            held
        } else {
            self.give_back(rules, requests, leases, held).await
        };
        Ok((decisions, held))
    }

    /// A request of charges only, one of them with a lease: its rates and
    /// its lease in one store call, all or nothing
    /// ([`limiter::Limiter::decide_together_leased`]). `None` when it is
    /// not such a request, or the limiter cannot make it one step.
    async fn decide_one_step(
        &self,
        rules: &limiter::Rules,
        requests: &[limiter::Request<'_>],
        kinds: &[Kind],
        leases: &[Option<&str>],
    ) -> Result<Option<Decided>, LeaseError> {
        let mut with_lease = leases
            .iter()
            .enumerate()
            .filter_map(|(i, l)| Some((i, (*l)?)));
        let (Some((at, id)), None) = (with_lease.next(), with_lease.next()) else {
            return Ok(None);
        };
        if kinds.iter().any(|k| *k != Kind::Charge) {
            return Ok(None);
        }
        let Some(one) = self
            .limiter
            .decide_together_leased(rules, requests, at, id)
            .await?
        else {
            return Ok(None);
        };
        let limiter::TogetherLeased {
            mut decisions,
            lease,
            refused,
        } = one;
        let action = LeaseAction::Acquire {
            weight: None,
            ttl: None,
        };
        self.count(requests[at].scope, action, &lease);
        if refused {
            refuse(&mut decisions[at], &lease);
        }
        let taken = lease.ok && !lease.degraded && !requests[at].dry_run;
        let mut held = vec![None; requests.len()];
        held[at] = Some(Held {
            lease,
            refused,
            taken,
        });
        if !Decision::overall(&decisions) {
            // Denied though its charge took (a descriptor's own rule):
            // give the lease back, as the stepwise path does.
            held = self.give_back(rules, requests, leases, held).await;
        }
        Ok(Some((decisions, held)))
    }

    /// Step 1 of [`EnvoyRateLimitApi::decide_leased`]: each descriptor's
    /// lease call, and whether a pool refused one.
    async fn take_leases(
        &self,
        rules: &limiter::Rules,
        requests: &[limiter::Request<'_>],
        kinds: &[Kind],
        leases: &[Option<&str>],
    ) -> Result<(Vec<Option<Held>>, bool), LeaseError> {
        let mut held: Vec<Option<Held>> = vec![None; requests.len()];
        let mut refused = false;
        let releases = (0..requests.len()).filter(|&i| kinds[i] == Kind::Refund);
        let others = (0..requests.len()).filter(|&i| kinds[i] != Kind::Refund);
        for i in releases.chain(others) {
            let Some(id) = leases[i] else { continue };
            let (action, mut req) = match kinds[i] {
                Kind::Refund => (LeaseAction::Release, requests[i]),
                Kind::Charge | Kind::Check => (
                    LeaseAction::Acquire {
                        weight: None,
                        ttl: None,
                    },
                    requests[i],
                ),
            };
            req.dry_run |= refused;
            let lease = match self.limiter.lease_on(rules, &req, id, action).await {
                Ok(lease) => lease,
                Err(e) => {
                    self.give_back(rules, requests, leases, held).await;
                    return Err(e);
                }
            };
            self.count(req.scope, action, &lease);
            let acquire = action != LeaseAction::Release;
            let no = acquire && !lease.ok;
            refused |= no;
            held[i] = Some(Held {
                taken: acquire && lease.ok && !lease.degraded && !req.dry_run,
                refused: no,
                lease,
            });
        }
        Ok((held, refused))
    }

    /// Releases the leases this request took, as it is denied (or could
    /// not be decided). A release that fails leaves the lease to expire
    /// at its `max_lease`: it admits less meanwhile, never more.
    async fn give_back(
        &self,
        rules: &limiter::Rules,
        requests: &[limiter::Request<'_>],
        leases: &[Option<&str>],
        mut held: Vec<Option<Held>>,
    ) -> Vec<Option<Held>> {
        for (i, h) in held.iter_mut().enumerate() {
            let (Some(h), Some(id)) = (h.as_mut().filter(|h| h.taken), leases[i]) else {
                continue;
            };
            let released = self
                .limiter
                .lease_on(rules, &requests[i], id, LeaseAction::Release)
                .await;
            if let Ok(r) = &released {
                self.count(requests[i].scope, LeaseAction::Release, r);
                h.lease.in_flight = r.in_flight;
            }
            h.taken = false;
            h.lease.ok = false;
            h.lease.expires_at_us = 0;
            h.lease.ttl = std::time::Duration::ZERO;
        }
        held
    }

    /// Counts a lease call of a configured pool, as `tollgate.v1.Leases`
    /// does (its scope and rule come from the config: bounded labels).
    fn count(&self, scope: &str, action: LeaseAction, d: &LeaseDecision) {
        if d.rule.is_empty() {
            return;
        }
        let (call, result) = result_of(action, d);
        let scope: Arc<str> = scope.into();
        self.observer
            .metrics
            .lease(&scope, &d.rule, call, result, d.expired);
        self.observer.metrics.lease_seen(&scope, d);
    }
}

/// A descriptor's decision when its pool refused the lease: denied, until
/// the earliest live lease expires (an upper bound of the wait: another
/// holder may release sooner). Never a quota descriptor's denial, which
/// another descriptor could outvote: a request the pool refused would
/// then pass without a lease.
fn refuse(d: &mut Decision, lease: &LeaseDecision) {
    d.allowed = false;
    d.quota = false;
    d.retry_after = d.retry_after.max(lease.retry_after);
    if lease.reason.is_some() {
        d.reason.clone_from(&lease.reason);
    }
}
