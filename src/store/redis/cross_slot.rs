//! The batch path: many charges in one call, and on Cluster the charges
//! whose buckets span hash slots, decided by *reserve and refund*.
//!
//! Each charge becomes one script call's work (coalesced with others on
//! its node), or on Cluster one per slot it touches (an atomic batch whose
//! entries name different scopes). A charge split over
//! slots is allowed only when every part is; if any part denies or fails,
//! the parts that took give their tokens back in a second round trip,
//! bounded by the ledgers their takes left. Others may see the reservation
//! meanwhile (admitting less, never more); a denied charge takes nothing.
//! A lone charge on one node never comes here: see
//! [`Store::check_and_take_one`](super::Store::check_and_take_one) for
//! `RedisStore`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use super::{Inner, keys};
use crate::store::{
    BucketOutcome, Charge, ChargeOutcome, SettleBucket, Settled, Settlement, StoreError,
};

/// How one charge maps onto script calls: `(work index, bucket indices)` per
/// part. Empty for a charge with no buckets, one part unless a Cluster
/// charge spans hash tags.
type Plan = Vec<(usize, Vec<usize>)>;

/// A bucket outcome not yet filled in; every one is overwritten.
const UNSET: BucketOutcome = BucketOutcome {
    conforms: false,
    remaining: 0,
    reset_after: Duration::ZERO,
    retry_after: None,
    mark: crate::bucket::Mark::EMPTY,
};

/// A charge's bucket indices grouped by hash tag, in first-seen order.
fn split_by_tag(charge: &Charge<'_>) -> Vec<Vec<usize>> {
    let mut parts: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, b) in charge.buckets.iter().enumerate() {
        let tag = keys::hash_tag(&b.key);
        match parts.iter_mut().find(|(t, _)| *t == tag) {
            Some((_, part)) => part.push(i),
            None => parts.push((tag, vec![i])),
        }
    }
    parts.into_iter().map(|(_, part)| part).collect()
}

impl Inner {
    /// The script calls to make: whole charges, or on Cluster the per-slot
    /// parts of a charge whose buckets span hash tags; and, per charge, its
    /// parts.
    pub(super) fn work<'a>(&self, charges: &[Charge<'a>]) -> (Vec<Charge<'a>>, Vec<Plan>) {
        let mut work: Vec<Charge<'a>> = Vec::with_capacity(charges.len());
        let mut plans: Vec<Plan> = Vec::with_capacity(charges.len());
        for charge in charges {
            let parts = if charge.buckets.is_empty() {
                Vec::new()
            } else if self.topology.is_cluster() {
                split_by_tag(charge)
            } else {
                vec![(0..charge.buckets.len()).collect()]
            };
            let mut plan = Vec::with_capacity(parts.len());
            let lone = parts.len() == 1;
            for part in parts {
                plan.push((work.len(), part.clone()));
                work.push(Charge {
                    buckets: part.iter().map(|&i| charge.buckets[i]).collect(),
                    dry_run: charge.dry_run,
                    marks: charge.marks,
                    // A reservation's buckets share its scope's slot; one
                    // split over slots opens nothing, so it cannot settle
                    // (the estimate stands) rather than settle twice.
                    open: charge.open.filter(|_| lone),
                    // A penalty box's key shares its scope's slot, as the
                    // buckets of one caller's charge do: a charge split
                    // over slots mixes scopes and carries none.
                    penalty: charge.penalty.clone().filter(|_| lone),
                });
            }
            plans.push(plan);
        }
        (work, plans)
    }

    /// Decides each charge on its own: a charge whose part failed fails,
    /// and no other charge's outcome depends on it.
    pub(super) async fn decide(
        self: &Arc<Self>,
        charges: &[Charge<'_>],
    ) -> Vec<Result<ChargeOutcome, StoreError>> {
        let (work, plans) = self.work(charges);
        // A charge split over slots needs its parts' ledgers, to bound the
        // refund should another part deny.
        let split = plans.iter().any(|p| p.len() > 1);
        let done = self.run(&work, split).await;

        let mut outcomes = Vec::with_capacity(charges.len());
        let mut refunds: Vec<Settlement<'_>> = Vec::new();
        let mut refunded: Vec<(usize, Vec<usize>)> = Vec::new();
        for (c, (charge, plan)) in charges.iter().zip(&plans).enumerate() {
            let failed = plan.iter().find_map(|(w, _)| done[*w].as_ref().err());
            let allowed = failed.is_none()
                && plan
                    .iter()
                    .all(|(w, _)| done[*w].as_ref().is_ok_and(|o| o.allowed));
            // Reserve and refund: a part that took while another part denied
            // (or failed) gives its tokens back, so a charge that is not
            // allowed takes nothing.
            if !allowed && !charge.dry_run {
                for (w, part) in plan {
                    let Ok(took) = &done[*w] else { continue };
                    if !took.allowed {
                        continue;
                    }
                    let taken: Vec<(usize, usize)> = part
                        .iter()
                        .enumerate()
                        .filter(|&(k, &i)| !charge.buckets[i].shadow || took.buckets[k].conforms)
                        .map(|(k, &i)| (k, i))
                        .collect();
                    if !taken.is_empty() {
                        // Each bucket's state after the take bounds the
                        // refund: no more than the reservation still holds.
                        refunds.push(Settlement {
                            buckets: taken
                                .iter()
                                .map(|&(k, i)| SettleBucket {
                                    charge: charge.buckets[i],
                                    actual: 0,
                                    mark: Some(took.buckets[k].mark),
                                })
                                .collect(),
                            once: None,
                        });
                        refunded.push((c, taken.iter().map(|&(_, i)| i).collect()));
                    }
                }
            }
            if let Some(e) = failed {
                outcomes.push(Err(e.clone()));
                continue;
            }
            let mut buckets = smallvec::smallvec![UNSET; charge.buckets.len()];
            let mut now_us = 0;
            for (w, part) in plan {
                if let Ok(o) = &done[*w] {
                    now_us = o.now_us;
                    for (k, &i) in part.iter().enumerate() {
                        buckets[i] = o.buckets[k];
                    }
                }
            }
            outcomes.push(Ok(ChargeOutcome {
                allowed,
                buckets,
                now_us,
                penalty: Default::default(),
            }));
        }
        if !refunds.is_empty() {
            self.refund(&refunds, &refunded, &mut outcomes).await;
        }
        outcomes
    }

    /// Gives back what the parts in `refunds` reserved (each bounded by the
    /// mark its take left, like any settle), and reports the buckets' state
    /// after it in `outcomes` (`refunded` says where). If this fails, the
    /// reserved tokens stay taken: the limit errs towards admitting less,
    /// never more. The denials stand either way: an error here must not
    /// become a fail-open allow.
    async fn refund(
        self: &Arc<Self>,
        refunds: &[Settlement<'_>],
        refunded: &[(usize, Vec<usize>)],
        outcomes: &mut [Result<ChargeOutcome, StoreError>],
    ) {
        let given_back = join_all(refunds.iter().map(|s| self.settle(s))).await;
        for ((c, taken), back) in refunded.iter().zip(given_back) {
            let back = match back {
                Ok(Settled::Applied(back)) => back,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "refund after a cross-slot denial failed; the reserved tokens stay taken");
                    continue;
                }
            };
            let Ok(outcome) = &mut outcomes[*c] else {
                continue;
            };
            for (k, &i) in taken.iter().enumerate() {
                let bucket = &mut outcome.buckets[i];
                bucket.remaining = back[k].remaining;
                bucket.reset_after = back[k].reset_after;
            }
        }
    }

    /// Decides each work item through its node's coalescer: concurrent
    /// items, from this call and others, share script calls. Outcomes are
    /// in work order, each on its own: an item whose batch failed (or that
    /// waited too long) fails, and the others keep their outcomes.
    /// `marks`: every reply carries each bucket's ledger, whatever its
    /// charge asked.
    async fn run(
        self: &Arc<Self>,
        work: &[Charge<'_>],
        marks: bool,
    ) -> Vec<Result<ChargeOutcome, StoreError>> {
        join_all(work.iter().map(|charge| self.one(charge, marks))).await
    }
}
