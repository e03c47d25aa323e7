//! Charge now, settle later: reservations, settles and refunds.
//!
//! A request with `settle_within` is decided like any other, with its cost
//! as the estimate; when allowed, the limiter signs a [`Reservation`] of the
//! buckets it took from. [`Limiter::settle`] applies the real cost to those
//! buckets, atomically, once, on any replica with the same key. Envoy's
//! negative hits are refunds without a reservation
//! ([`Limiter::refund_together_on`]).

use std::time::Duration;

use super::plan::{self, Joint};
use super::reservation::{MAX_TOKEN_LEN, Reservation, ReservedBucket, TokenError};
use super::{BucketReport, DecideError, Decision, Limiter, Request, Rules};
use crate::store::{
    BucketCharge, BucketKey, Charge, ChargeOutcome, Once, Open, SettleBucket, Settled, Store,
    StoreError,
};
use crate::window::Window;

/// Why a settle was refused. Nothing changed in any case.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SettleError {
    /// The token is not a reservation this deployment signed, unaltered.
    #[error("reservation: {0}")]
    Token(#[from] TokenError),
    /// Settled before, on this replica or another.
    #[error("reservation was already settled; a reservation settles once")]
    AlreadySettled,
    /// Its `settle_within` ran out; the estimate stands.
    #[error("reservation expired: its settle_within ran out, so the estimate stands")]
    Expired,
    /// The store could not answer; settling again is safe (it applies once).
    #[error("rate-limit store unavailable, settle again later: {0}")]
    Store(StoreError),
}

/// What a settle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// The scope the reservation charged.
    pub scope: String,
    /// The estimate it was made with (the cost taken from each bucket).
    pub estimate: u64,
    /// Each bucket it charged, after the settle.
    pub buckets: Vec<BucketReport>,
}

impl<S: Store, E> Limiter<S, E> {
    /// Decides `req` (with `settle_within`) and, when allowed, signs a
    /// reservation of every bucket it took from. A degraded answer (the
    /// store failed open) took nothing, and carries no reservation.
    pub(super) async fn reserve(
        &self,
        rules: &Rules,
        req: &Request<'_>,
        buckets: &plan::Buckets<'_, '_>,
    ) -> Result<Decision, DecideError> {
        // Refuse, before taking anything, a reservation whose token would
        // be too long to settle.
        let size: usize = buckets
            .iter()
            .map(|p| Reservation::bucket_len(&p.charge))
            .sum();
        if Reservation::token_len(size) > MAX_TOKEN_LEN {
            return Err(DecideError::TooBigToReserve {
                buckets: buckets.len(),
                max: MAX_TOKEN_LEN,
            });
        }
        let within = req.settle_within.unwrap_or_default();
        let within_us = u64::try_from(within.as_micros()).unwrap_or(u64::MAX);
        let id = self.signer.new_id();
        // The store records the id with the take, and only a recorded id
        // settles: a lost record refuses a settle, never allows a replay.
        let charge = Charge {
            marks: true,
            open: Some(Open { id, within_us }),
            penalty: plan::penalty(rules, req, buckets),
            ..plan::charge(buckets, false)
        };
        let outcome = match self.store.check_and_take_one(&charge).await {
            Ok(outcome) => outcome,
            Err(e) => return plan::failed(rules, req.scope, e),
        };
        let mut decision = plan::decision(buckets, &outcome);
        // Nothing to settle when only shadow buckets without room applied.
        let charged = buckets
            .iter()
            .zip(&outcome.buckets)
            .any(|(p, o)| !p.charge.shadow || o.conforms);
        if outcome.allowed && charged {
            let reservation = Reservation {
                id,
                deadline_us: outcome.now_us.saturating_add(within_us),
                scope: req.scope.to_owned(),
                caller: req.caller.map(str::to_owned),
                buckets: buckets
                    .iter()
                    .zip(&outcome.buckets)
                    // A shadow bucket without room was not charged.
                    .filter(|(p, o)| !p.charge.shadow || o.conforms)
                    .map(|(p, o)| ReservedBucket {
                        rule: p.charge.key.rule.to_owned(),
                        identity: p.charge.key.identity.map(str::to_owned),
                        operation: p.charge.key.operation.map(str::to_owned),
                        shape: p.charge.shape,
                        window: p.limit.window.as_ref().map(Window::tag).unwrap_or_default(),
                        cost: p.charge.cost,
                        reserve: p.charge.reserve,
                        mark: o.mark,
                    })
                    .collect(),
            };
            decision.reservation = Some(self.signer.sign(&reservation));
        }
        Ok(decision)
    }

    /// Settles the reservation in `token` at its real cost: the difference
    /// from the estimate is given back to (or taken from) every bucket it
    /// charged, atomically. Refused, changing nothing, when the token is
    /// forged or altered, already settled, or past its deadline.
    pub async fn settle(&self, token: &str, actual: u64) -> Result<Settlement, SettleError> {
        let reservation = self.signer.verify(token)?;
        self.settle_reservation(&reservation, actual).await
    }

    /// What `token` claims, unverified: for checking a caller's grant
    /// before telling it whether the token is genuine.
    pub fn peek(&self, token: &str) -> Result<Reservation, TokenError> {
        super::reservation::peek(token)
    }

    /// The reservation in `token`, if this deployment signed it, unaltered.
    pub fn verify(&self, token: &str) -> Result<Reservation, TokenError> {
        self.signer.verify(token)
    }

    /// [`Limiter::settle`] for a verified reservation.
    pub async fn settle_reservation(
        &self,
        reservation: &Reservation,
        actual: u64,
    ) -> Result<Settlement, SettleError> {
        self.settle_reservation_on(&self.rules(), reservation, actual)
            .await
    }

    /// [`Limiter::settle_reservation`] against the rule set `rules`, a
    /// snapshot the caller already read (and authorised the settle on).
    pub async fn settle_reservation_on(
        &self,
        rules: &Rules,
        reservation: &Reservation,
        actual: u64,
    ) -> Result<Settlement, SettleError> {
        // Each budget's window: the live rule's, or (after a reload removed
        // it) rebuilt from its tag, so the reservation still settles.
        let windows: Vec<Option<Window>> = reservation
            .buckets
            .iter()
            .map(|b| window_of(rules, &reservation.scope, b))
            .collect();
        // The live tag: one a reload changed finds no open record under
        // the new keys, so the settle is refused (the estimate stands).
        let hash_tag = rules.hash_tag_of(&reservation.scope);
        let parts: Vec<SettleBucket<'_>> = reservation
            .buckets
            .iter()
            .zip(&windows)
            .map(|(b, window)| SettleBucket {
                charge: BucketCharge {
                    key: BucketKey {
                        scope: &reservation.scope,
                        rule: &b.rule,
                        identity: b.identity.as_deref(),
                        operation: b.operation.as_deref(),
                        hash_tag,
                    },
                    shape: b.shape,
                    cost: b.cost,
                    shadow: false,
                    // The headroom the reservation's priority had to leave
                    // bounds its debt: a sheddable settle never eats it.
                    reserve: b.reserve,
                    window: window.as_ref(),
                    // A settle never waits.
                    max_delay: std::time::Duration::ZERO,
                },
                actual,
                mark: Some(b.mark),
            })
            .collect();
        let settlement = crate::store::Settlement {
            buckets: parts,
            once: Some(Once {
                id: reservation.id,
                deadline_us: reservation.deadline_us,
            }),
        };
        match self.store.settle(&settlement).await {
            Ok(Settled::Applied(outcomes)) => Ok(Settlement {
                scope: reservation.scope.clone(),
                estimate: reservation.buckets.first().map_or(0, |b| b.cost),
                buckets: reservation
                    .buckets
                    .iter()
                    .zip(&settlement.buckets)
                    .zip(&outcomes)
                    .map(|((b, part), o)| BucketReport {
                        rule: rule_name(&b.rule).into(),
                        limit: b.shape.capacity,
                        period: Duration::from_nanos(part.charge.shape.period),
                        remaining: o.remaining,
                        reset_after: o.reset_after,
                        retry_after: None,
                        exhausted: o.remaining == 0,
                        shadow: false,
                    })
                    .collect(),
            }),
            Ok(Settled::AlreadySettled) => Err(SettleError::AlreadySettled),
            Ok(Settled::Expired) => Err(SettleError::Expired),
            Err(e) => Err(SettleError::Store(e)),
        }
    }

    /// Gives `reqs`' costs back to the buckets they draw on, together: an
    /// Envoy descriptor with `is_negative_hits`. A bucket is never fuller
    /// than full, and the answer always allows. A store failure follows the
    /// scopes' failure mode, like a decision.
    pub async fn refund_together_on(
        &self,
        rules: &Rules,
        reqs: &[Request<'_>],
    ) -> Result<Vec<Decision>, DecideError> {
        let joint = match Joint::plan(rules, reqs).map(Joint::for_refund) {
            Ok(joint) => joint,
            // An unknown scope has nothing to refund.
            Err(_) => return Ok(vec![allowed(); reqs.len()]),
        };
        let Some(charge) = joint.charge() else {
            return Ok(joint.nothing_to_charge());
        };
        let refund = charge.buckets.iter().map(|&b| SettleBucket {
            charge: b,
            actual: 0,
            mark: None,
        });
        self.settle_joint(rules, reqs, &joint, refund, "a refund")
            .await
    }

    /// Applies `buckets` (the settle of `joint`'s one charge) and answers
    /// every request allowed, with what its buckets hold after: a refund,
    /// or usage admitted elsewhere. `what` names the call should the store
    /// take it for a reservation's settle. A store failure follows the
    /// scopes' failure mode, like a decision.
    pub(super) async fn settle_joint<'b>(
        &self,
        rules: &Rules,
        reqs: &[Request<'_>],
        joint: &Joint<'_, '_>,
        buckets: impl Iterator<Item = SettleBucket<'b>>,
        what: &str,
    ) -> Result<Vec<Decision>, DecideError> {
        let settlement = crate::store::Settlement {
            buckets: buckets.collect(),
            once: None,
        };
        match self.store.settle(&settlement).await {
            Ok(Settled::Applied(buckets)) => Ok(joint.decisions(&ChargeOutcome {
                allowed: true,
                buckets: buckets.into(),
                now_us: 0,
                delay: Duration::ZERO,
                lease: None,
                penalty: Default::default(),
            })),
            Ok(_) => Err(DecideError::StoreUnavailable {
                scope: reqs.first().map(|r| r.scope.to_owned()).unwrap_or_default(),
                source: StoreError::permanent(format!("{what} was refused as a reservation")),
            }),
            Err(e) => joint.failed(rules, reqs, e),
        }
    }
}

fn allowed() -> Decision {
    Decision {
        allowed: true,
        ..Decision::default()
    }
}

/// The rule name reported for a bucket kept under `key_name`.
fn rule_name(key_name: &str) -> &str {
    key_name.split_once('~').map_or(key_name, |(name, _)| name)
}

/// The window of a reserved budget, `None` for a token bucket.
fn window_of(rules: &Rules, scope: &str, b: &ReservedBucket) -> Option<Window> {
    if b.window.is_empty() {
        return None;
    }
    let live = rules
        .scope(scope)
        .and_then(|s| s.limits.iter().find(|l| *l.key_name == *b.rule))
        .and_then(|l| l.window.clone());
    live.or_else(|| Window::from_tag(&b.window))
}
