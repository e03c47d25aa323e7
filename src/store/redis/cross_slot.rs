//! The batch path: many charges in one call, and on Cluster the charges
//! whose buckets span hash slots, decided by *reserve and refund*.
//!
//! Each charge becomes one script call's work (coalesced with others on
//! its node), or on Cluster one per slot it touches (an identity's buckets
//! and its scope's under `hash_tag: identity`, or an atomic batch whose
//! entries name different scopes). A charge split over slots is allowed
//! only when every part is; if any part denies or fails, the parts that
//! took give their tokens back in another round trip, bounded by the
//! ledgers their takes left. Others may see the reservation meanwhile
//! (admitting less, never more); a denied charge takes nothing. An
//! identity's parts go before its scope's shared one (`run_phased`), and a
//! settlement over slots is applied part by part (`settle_across`).
//! A lone charge on one node never comes here: see
//! [`Store::check_and_take_one`](super::Store::check_and_take_one) for
//! `RedisStore`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use super::{Inner, keys};
use crate::store::{
    BucketCharge, BucketKey, BucketOutcome, Charge, ChargeOutcome, SettleBucket, Settled,
    Settlement, StoreError,
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

/// Bucket indices grouped by hash tag (`tags`, one per bucket), in
/// first-seen order.
fn split_by_tag(tags: impl IntoIterator<Item = String>) -> Vec<Vec<usize>> {
    let mut parts: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, tag) in tags.into_iter().enumerate() {
        match parts.iter_mut().find(|(t, _)| *t == tag) {
            Some((_, part)) => part.push(i),
            None => parts.push((tag, vec![i])),
        }
    }
    parts.into_iter().map(|(_, part)| part).collect()
}

/// The part of a charge split over slots that holds (or held) its
/// reservation's record: the first whose buckets are in an identity's slot.
/// `key` gives bucket `i`'s key.
fn record_part<'k, 'a: 'k>(
    parts: &[Vec<usize>],
    key: impl Fn(usize) -> &'k BucketKey<'a>,
) -> Option<usize> {
    parts
        .iter()
        .position(|part| part.iter().any(|&i| keys::spreads(key(i))))
}

/// One charge's outcome from its parts' (`done`, by work index): allowed
/// when every part was, failed when any part failed.
fn outcome_of(
    charge: &Charge<'_>,
    plan: &Plan,
    done: &[Result<ChargeOutcome, StoreError>],
) -> Result<ChargeOutcome, StoreError> {
    if let Some(e) = plan.iter().find_map(|(w, _)| done[*w].as_ref().err()) {
        return Err(e.clone());
    }
    if charge.lease.is_some() && plan.len() != 1 {
        // `work` sent none of it: see there.
        return Err(StoreError::permanent(
            "a charge's lease pool and buckets must share one hash slot",
        ));
    }
    let allowed = plan
        .iter()
        .all(|(w, _)| done[*w].as_ref().is_ok_and(|o| o.allowed));
    let mut buckets = smallvec::smallvec![UNSET; charge.buckets.len()];
    let (mut now_us, mut delay) = (0, Duration::ZERO);
    for (w, part) in plan {
        if let Ok(o) = &done[*w] {
            now_us = o.now_us;
            delay = delay.max(o.delay);
            for (k, &i) in part.iter().enumerate() {
                buckets[i] = o.buckets[k];
            }
        }
    }
    Ok(ChargeOutcome {
        allowed,
        buckets,
        now_us,
        delay: if allowed { delay } else { Duration::ZERO },
        // A lone part carried the charge's penalty box and lease, and its
        // outcome is the charge's; a split charge carries neither.
        lease: match plan.as_slice() {
            [(w, _)] => done[*w].as_ref().ok().and_then(|o| o.lease.clone()),
            _ => None,
        },
        penalty: match plan.as_slice() {
            [(w, _)] => done[*w].as_ref().map(|o| o.penalty).unwrap_or_default(),
            _ => Default::default(),
        },
    })
}

/// What the parts of a charge that was not allowed must give back: each
/// part that took (not one that was only judged), as a settlement bounded
/// by the state its take left, with the charge's bucket indices it covers.
fn refunds_of<'a>(
    charge: &Charge<'a>,
    plan: &Plan,
    work: &[Charge<'a>],
    done: &[Result<ChargeOutcome, StoreError>],
) -> Vec<(Settlement<'a>, Vec<usize>)> {
    let mut out = Vec::new();
    for (w, part) in plan {
        let Ok(took) = &done[*w] else { continue };
        if !took.allowed || work[*w].dry_run {
            continue;
        }
        let taken: Vec<(usize, usize)> = part
            .iter()
            .enumerate()
            .filter(|&(k, &i)| !charge.buckets[i].shadow || took.buckets[k].conforms)
            .map(|(k, &i)| (k, i))
            .collect();
        if taken.is_empty() {
            continue;
        }
        // Each bucket's state after the take bounds the refund: no more
        // than the reservation still holds.
        let settlement = Settlement {
            buckets: taken
                .iter()
                .map(|&(k, i)| SettleBucket {
                    charge: charge.buckets[i],
                    actual: 0,
                    mark: Some(took.buckets[k].mark),
                })
                .collect(),
            once: None,
        };
        out.push((settlement, taken.iter().map(|&(_, i)| i).collect()));
    }
    out
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
                split_by_tag(charge.buckets.iter().map(|b| keys::hash_tag(&b.key)))
            } else {
                vec![(0..charge.buckets.len()).collect()]
            };
            let mut plan = Vec::with_capacity(parts.len());
            // A lease goes in one script with its buckets or not at all: a
            // charge whose pool and buckets span slots is not sent, and
            // fails (`outcome_of`). The limiter sends a lease with its rates
            // only under `hash_tag: scope`, where they share the slot.
            let lease_apart = charge.lease.as_ref().is_some_and(|l| {
                parts.len() != 1
                    || (self.topology.is_cluster()
                        && charge
                            .buckets
                            .first()
                            .is_some_and(|b| keys::slot(&b.key) != keys::slot(&l.pool)))
            });
            if lease_apart {
                plans.push(plan);
                continue;
            }
            // A reservation's record goes with its one part, or with its
            // first part in an identity's slot (decided first), where its
            // settle looks for it (see `settle_across`). One split over
            // scopes' slots alone opens nothing, so it cannot settle (the
            // estimate stands) rather than settle twice.
            let lone = parts.len() == 1;
            let record = match parts.len() {
                1 => Some(0),
                _ => record_part(&parts, |i| &charge.buckets[i].key),
            };
            for (n, part) in parts.into_iter().enumerate() {
                plan.push((work.len(), part.clone()));
                work.push(Charge {
                    // Shaping: the parts of a split charge are decided on
                    // their own, and could not agree on one release, so
                    // such a charge is decided without waits.
                    buckets: part
                        .iter()
                        .map(|&i| BucketCharge {
                            max_delay: if lone {
                                charge.buckets[i].max_delay
                            } else {
                                Duration::ZERO
                            },
                            ..charge.buckets[i]
                        })
                        .collect(),
                    dry_run: charge.dry_run,
                    marks: charge.marks,
                    open: charge.open.filter(|_| record == Some(n)),
                    // A penalty box's key shares its scope's slot, as the
                    // buckets of one caller's charge do under `hash_tag:
                    // scope` (the only tag a penalty box is allowed with): a
                    // charge split over slots mixes scopes and carries none.
                    lease: charge.lease.filter(|_| lone),
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
        let (mut work, plans) = self.work(charges);
        // A charge split over slots needs its parts' ledgers, to bound the
        // refund should another part deny.
        let split = plans.iter().any(|p| p.len() > 1);
        let done = self.run_phased(&mut work, &plans, split).await;

        let mut outcomes = Vec::with_capacity(charges.len());
        let mut refunds: Vec<Settlement<'_>> = Vec::new();
        let mut refunded: Vec<(usize, Vec<usize>)> = Vec::new();
        for (c, (charge, plan)) in charges.iter().zip(&plans).enumerate() {
            let outcome = outcome_of(charge, plan, &done);
            // Reserve and refund: a part that took while another part denied
            // (or failed) gives its tokens back, so a charge that is not
            // allowed takes nothing.
            if !outcome.as_ref().is_ok_and(|o| o.allowed) && !charge.dry_run {
                for (settlement, taken) in refunds_of(charge, plan, &work, &done) {
                    refunds.push(settlement);
                    refunded.push((c, taken));
                }
            }
            outcomes.push(outcome);
        }
        if !refunds.is_empty() {
            self.refund(&refunds, &refunded, &mut outcomes).await;
        }
        outcomes
    }

    /// Runs the work in two rounds when a charge spans an identity's slot
    /// and its scope's (`hash_tag: identity`): the identity's parts first,
    /// then the scope's shared part, taken only if they all allowed, and
    /// else only judged (a dry run, so the denial still reports every
    /// bucket). An identity over its own limit then never reserves from,
    /// nor refunds to, the bucket every identity shares: it cannot make
    /// others wait by being denied, and concurrent refunds to one hot
    /// bucket (which its ledger bounds conservatively) do not arise from
    /// it. Other work, and charges across scopes, go in the first round.
    async fn run_phased(
        self: &Arc<Self>,
        work: &mut [Charge<'_>],
        plans: &[Plan],
        marks: bool,
    ) -> Vec<Result<ChargeOutcome, StoreError>> {
        let mut later = vec![false; work.len()];
        for plan in plans {
            let spreads = |w: usize| work[w].buckets.iter().any(|b| keys::spreads(&b.key));
            // A dry run takes nothing, so its parts may all go at once.
            let takes = plan.first().is_some_and(|(w, _)| !work[*w].dry_run);
            if takes && plan.iter().any(|(w, _)| spreads(*w)) {
                for (w, _) in plan.iter().filter(|(w, _)| !spreads(*w)) {
                    later[*w] = true;
                }
            }
        }
        let first: Vec<usize> = (0..work.len()).filter(|&w| !later[w]).collect();
        let mut done: Vec<Result<ChargeOutcome, StoreError>> = (0..work.len())
            .map(|_| Err(StoreError::permanent("a part was never run")))
            .collect();
        let round: Vec<Charge<'_>> = first.iter().map(|&w| work[w].clone()).collect();
        for (&w, result) in first.iter().zip(self.run(&round, marks).await) {
            done[w] = result;
        }
        if first.len() == work.len() {
            return done;
        }
        for plan in plans {
            let ready = plan
                .iter()
                .all(|(w, _)| later[*w] || done[*w].as_ref().is_ok_and(|o| o.allowed));
            for (w, _) in plan.iter().filter(|(w, _)| later[*w]) {
                work[*w].dry_run |= !ready;
            }
        }
        let second: Vec<usize> = (0..work.len()).filter(|&w| later[w]).collect();
        let round: Vec<Charge<'_>> = second.iter().map(|&w| work[w].clone()).collect();
        for (&w, result) in second.iter().zip(self.run(&round, marks).await) {
            done[w] = result;
        }
        done
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

    /// Applies a settlement whose buckets span hash slots, one script call
    /// per slot. A refund (no [`Once`](crate::store::Once)) is applied in every slot at once:
    /// each part only gives back, so a part that fails leaves its tokens
    /// taken (admitting less, never more), and its error is the answer.
    ///
    /// A reservation's settle (with `Once`) goes by its record, which its
    /// charge opened in its first part in an identity's slot (see
    /// [`Inner::work`]): that part is settled with the record, atomically
    /// and at most once, and the other parts without it. The order keeps
    /// every failure on the side of admitting less: a refund below the
    /// estimate gives back elsewhere only after the record's part applied
    /// (so never twice), and a settle above it takes its extra elsewhere
    /// first (so an interrupted or refused settle has taken more, never
    /// less). A charge split over scopes' slots alone opened no record: its
    /// settle is answered as the script answers one with no record.
    pub(super) async fn settle_across(
        self: &Arc<Self>,
        settlement: &Settlement<'_>,
    ) -> Result<Settled, StoreError> {
        let buckets = &settlement.buckets;
        let parts = split_by_tag(buckets.iter().map(|b| keys::hash_tag(&b.charge.key)));
        let mut after = vec![UNSET; buckets.len()];
        let Some(once) = settlement.once else {
            let all: Vec<usize> = (0..parts.len()).collect();
            self.settle_parts(buckets, &parts, &all, &mut after).await?;
            return Ok(Settled::Applied(after));
        };
        let Some(record) = record_part(&parts, |i| &buckets[i].charge.key) else {
            return Ok(Settled::AlreadySettled);
        };
        let rest: Vec<usize> = (0..parts.len()).filter(|&n| n != record).collect();
        let debt = buckets.iter().any(|b| b.actual > b.charge.cost);
        if debt {
            self.settle_parts(buckets, &parts, &rest, &mut after)
                .await?;
        }
        let with_record = Settlement {
            buckets: parts[record].iter().map(|&i| buckets[i]).collect(),
            once: Some(once),
        };
        match self.settle_on_node(&with_record).await? {
            Settled::Applied(outcomes) => {
                for (&i, outcome) in parts[record].iter().zip(outcomes) {
                    after[i] = outcome;
                }
            }
            refused => return Ok(refused),
        }
        if !debt {
            self.settle_parts(buckets, &parts, &rest, &mut after)
                .await?;
        }
        Ok(Settled::Applied(after))
    }

    /// Applies the parts `which` of a settlement's `buckets` unconditionally
    /// (no record), one script call per part, all at once, and writes each
    /// bucket's state after it into `after`. The first failure is the
    /// answer; the other parts were applied.
    async fn settle_parts(
        self: &Arc<Self>,
        buckets: &[SettleBucket<'_>],
        parts: &[Vec<usize>],
        which: &[usize],
        after: &mut [BucketOutcome],
    ) -> Result<(), StoreError> {
        let settlements: Vec<Settlement<'_>> = which
            .iter()
            .map(|&n| Settlement {
                buckets: parts[n].iter().map(|&i| buckets[i]).collect(),
                once: None,
            })
            .collect();
        let done = join_all(settlements.iter().map(|s| self.settle_on_node(s))).await;
        for (&n, result) in which.iter().zip(done) {
            let Settled::Applied(outcomes) = result? else {
                return Err(StoreError::permanent("a refund was answered as a settle"));
            };
            for (&i, outcome) in parts[n].iter().zip(outcomes) {
                after[i] = outcome;
            }
        }
        Ok(())
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
