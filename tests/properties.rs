//! Property tests of the bucket math and the embedded store's atomicity.

use std::time::Duration;

use proptest::prelude::*;
use tollgate::bucket::{Shape, Tat};
use tollgate::store::memory::MemoryStore;
use tollgate::store::{BucketCharge, BucketKey, Charge};

/// Small shapes, and shapes near the configured maxima (50M tokens, 366 days
/// in nanoseconds), whose products no longer fit 64 bits.
fn shapes() -> impl Strategy<Value = Shape> {
    prop_oneof![
        (1u64..=1_000, 1u64..=10_000_000),
        (1u64..=50_000_000, 1u64..=31_622_400_000_000_000),
    ]
    .prop_map(|(capacity, period)| Shape { capacity, period })
}

/// A request stream: gaps between arrivals, and costs.
fn arrivals() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((0u64..2_000_000, 1u64..=50), 1..300)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// For every window [t_i, t_j], the admitted cost is at most C + r·(t_j - t_i).
    #[test]
    fn no_interval_admits_more_than_capacity_plus_refill(shape in shapes(), arrivals in arrivals()) {
        let mut now = 1_000_000_000u64;
        let mut tat = Tat::default();
        let mut admitted: Vec<(u64, u64)> = Vec::new();
        for (gap, cost) in arrivals {
            now += gap;
            let v = shape.judge(tat, now, cost);
            if v.conforms {
                tat = v.after;
                admitted.push((now, cost));
            }
        }
        for i in 0..admitted.len() {
            let mut sum = 0u128;
            for j in i..admitted.len() {
                sum += u128::from(admitted[j].1);
                let elapsed = u128::from(admitted[j].0 - admitted[i].0);
                // sum ≤ C + C·elapsed/P, multiplied through by P to stay exact.
                let bound = u128::from(shape.capacity) * (u128::from(shape.period) + elapsed);
                prop_assert!(sum * u128::from(shape.period) <= bound,
                    "{sum} admitted in {elapsed} ticks by {shape:?}");
            }
        }
    }

    /// One tick before retry_after the same request is denied; at it, allowed.
    #[test]
    fn retry_after_is_the_first_tick_that_allows(shape in shapes(), arrivals in arrivals(), cost in 1u64..=1_000) {
        let cost = cost.min(shape.capacity);
        let mut now = 1_000_000_000u64;
        let mut tat = Tat::default();
        for (gap, c) in arrivals {
            now += gap;
            let v = shape.judge(tat, now, c);
            if v.conforms {
                tat = v.after;
            }
        }
        let v = shape.judge(tat, now, cost);
        if let Some(wait) = v.retry_after {
            prop_assert!(!v.conforms);
            prop_assert!(wait >= 1);
            prop_assert!(!shape.judge(tat, now + wait - 1, cost).conforms, "denied one tick early");
            prop_assert!(shape.judge(tat, now + wait, cost).conforms, "allowed at retry_after");
        } else {
            prop_assert!(v.conforms);
        }
    }

    /// Remaining never exceeds the capacity, and a full bucket reports it.
    #[test]
    fn remaining_is_within_capacity(shape in shapes(), arrivals in arrivals()) {
        let mut now = 1_000_000_000u64;
        let mut tat = Tat::default();
        prop_assert_eq!(shape.remaining(tat, now), shape.capacity);
        for (gap, c) in arrivals {
            now += gap;
            let v = shape.judge(tat, now, c);
            if v.conforms {
                tat = v.after;
                prop_assert!(shape.remaining(tat, now) + c <= shape.capacity);
            }
        }
    }
}

fn key(i: usize) -> BucketKey<'static> {
    const IDS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
    BucketKey {
        scope: "s",
        rule: "r",
        identity: Some(IDS[i]),
        operation: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Multi-bucket charges take from all of their buckets or from none.
    #[test]
    fn multi_bucket_charges_are_all_or_nothing(
        charges in prop::collection::vec(
            (prop::collection::btree_set(0usize..6, 1..=4), 1u64..=6), 1..60),
        capacities in prop::collection::vec(1u64..=10, 6),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        rt.block_on(async {
            let store = MemoryStore::new(4);
            let shape = |i: usize| Shape { capacity: capacities[i], period: 3_600_000_000_000 };
            // The model: tokens left per bucket (no refill worth a token in a paused hour).
            let mut left: Vec<u64> = capacities.clone();
            for (buckets, cost) in charges {
                let charge = Charge {
                    buckets: buckets.iter().map(|&i| BucketCharge {
                        key: key(i), shape: shape(i), cost, shadow: false,
                    }).collect(),
                    dry_run: false,
                };
                let outcome = store.decide(&charge).expect("room");
                let fits = buckets.iter().all(|&i| left[i] >= cost);
                prop_assert_eq!(outcome.allowed, fits);
                if fits {
                    for &i in &buckets { left[i] -= cost; }
                }
                for (&i, o) in buckets.iter().zip(&outcome.buckets) {
                    prop_assert_eq!(o.remaining, left[i], "bucket {} after {:?}", i, charge);
                }
                tokio::time::advance(Duration::from_millis(1)).await;
            }
            Ok(())
        })?;
    }
}

#[path = "properties/fuzz.rs"]
mod fuzz;
