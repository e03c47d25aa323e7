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

    /// Shaping (issue 24): requests admitted with a wait are charged as of
    /// their release, and for every interval of release times the
    /// released cost is at most C + r·t, whatever the bounds and even when
    /// another bucket of the charge makes a request wait longer than this
    /// one needs (`extra`), which releases out of decision order.
    #[test]
    fn no_interval_of_releases_holds_more_than_capacity_plus_refill(
        shape in shapes(),
        arrivals in prop::collection::vec(
            (0u64..2_000_000, 1u64..=50, 0u64..5_000_000, 0u64..3_000_000), 1..200),
    ) {
        use tollgate::bucket::Wait;
        let mut now = 1_000_000_000u64;
        let mut tat = Tat::default();
        let mut released: Vec<(u64, u64)> = Vec::new();
        for (gap, cost, bound, extra) in arrivals {
            now += gap;
            let v = shape.judge(tat, now, cost);
            let own = match v.wait_within(bound) {
                Wait::Now => 0,
                Wait::After(d) => d,
                Wait::Beyond(_) | Wait::Never => continue,
            };
            let wait = own.max(extra);
            tat = shape.take_at(tat, now + wait, cost);
            prop_assert!(tat.ticks <= now + wait + shape.period, "conforms at its release");
            released.push((now + wait, cost));
        }
        released.sort_unstable();
        for i in 0..released.len() {
            let mut sum = 0u128;
            for j in i..released.len() {
                sum += u128::from(released[j].1);
                let elapsed = u128::from(released[j].0 - released[i].0);
                let bound = u128::from(shape.capacity) * (u128::from(shape.period) + elapsed);
                prop_assert!(sum * u128::from(shape.period) <= bound,
                    "{sum} released in {elapsed} ticks by {shape:?}");
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
        hash_tag: Default::default(),
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
                        key: key(i), shape: shape(i), cost, shadow: false, reserve: 0, window: None,
                        max_delay: std::time::Duration::ZERO,
                    }).collect(),
                    dry_run: false, marks: false, open: None, penalty: None, lease: None,
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

mod heavy_hitters {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use proptest::prelude::*;
    use tollgate::limiter::{BucketReport, Decision};
    use tollgate::observe::hitters::{Hitters, RankBy, SLOTS, Sizes, Window};
    use tollgate::observe::sketch::{SpaceSaving, max_memory_bytes, merge};

    /// Skewed streams: a few heavy keys among many light ones, of lengths
    /// up to 40 bytes.
    fn stream() -> impl Strategy<Value = Vec<String>> {
        let key = prop_oneof![
            3 => (0u8..4).prop_map(|i| format!("heavy-{i}")),
            2 => (0u16..500).prop_map(|i| format!("light-{i}-{}", "x".repeat(usize::from(i % 30)))),
        ];
        prop::collection::vec(key, 0..3000)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The documented bounds: `count - error <= true <= count`,
        /// `error <= N / m`, every key seen more than `N / m` times is held,
        /// and memory stays under `max_memory_bytes(m, longest key)`.
        #[test]
        fn space_saving_keeps_its_error_bound_and_memory(keys in stream(), m in 1usize..48) {
            let mut s = SpaceSaving::new(m);
            let mut truth: HashMap<&str, u64> = HashMap::new();
            for k in &keys {
                s.record(k, k.len() as u64 * 31 + u64::from(k.as_bytes()[k.len() - 1]));
                *truth.entry(k).or_default() += 1;
            }
            let n = keys.len() as u64;
            let merged = merge([&s]);
            prop_assert_eq!(merged.total, n);
            prop_assert!(merged.error_bound * m as u64 <= n);
            for c in &merged.keys {
                let t = truth[c.key.as_str()];
                prop_assert!(c.count - c.error <= t && t <= c.count, "{:?} true {}", c, t);
                prop_assert!(c.error * m as u64 <= n);
            }
            for (k, &t) in &truth {
                if t * m as u64 > n {
                    prop_assert!(merged.keys.iter().any(|c| c.key == *k), "{} seen {} times is missing", k, t);
                }
            }
            let longest = keys.iter().map(String::len).max().unwrap_or(0);
            prop_assert!(s.memory_bytes() <= max_memory_bytes(m, longest),
                "{} > {}", s.memory_bytes(), max_memory_bytes(m, longest));
        }

        /// Over a sliding window, the lists bound the true counts of the
        /// records the window covers (one window to one window and a slot
        /// back), with an error of at most `N / m`.
        #[test]
        fn windows_bound_the_counts_of_the_records_they_cover(
            records in prop::collection::vec((0u64..200_000, 0u8..30, any::<bool>()), 1..1500),
            m in 2usize..24,
            at in 0u64..200_000,
        ) {
            let hitters = Hitters::new(Sizes { counters: m, top_k: m });
            let window = Window::OneMinute;
            let width = window.span().as_millis() as u64 / SLOTS as u64;
            let mut records = records;
            records.sort_by_key(|r| r.0);
            // Times in milliseconds; the query comes after the last record.
            let now = records.last().map_or(0, |r| r.0) + at % width;
            let oldest = (now / width).saturating_sub(SLOTS as u64) * width;
            let mut truth: HashMap<String, (u64, u64)> = HashMap::new();
            for &(t, who, denied) in &records {
                // Three heavy identities and ten light ones.
                let identity = format!("id-{}", if who < 20 { who % 3 } else { who });
                hitters.record_at(t * 1_000_000, "s", &identity, &decision(denied));
                if t >= oldest {
                    let e = truth.entry(identity).or_default();
                    e.0 += 1;
                    e.1 += u64::from(denied);
                }
            }
            for by in [RankBy::Decisions, RankBy::Denials] {
                let top = hitters.top_at(now * 1_000_000, "s", "r", (window, by), m);
                let pick = |t: &(u64, u64)| if by == RankBy::Decisions { t.0 } else { t.1 };
                let n: u64 = truth.values().map(pick).sum();
                prop_assert_eq!(top.total, n);
                prop_assert!(top.error_bound * m as u64 <= n);
                for c in &top.identities {
                    let t = truth.get(&c.key).map_or(0, pick);
                    prop_assert!(c.count - c.error <= t && t <= c.count, "{:?} true {}", c, t);
                }
                for (k, v) in &truth {
                    if !top.identities.iter().any(|c| c.key == *k) {
                        prop_assert!(pick(v) <= top.absent_at_most);
                    }
                }
            }
        }
    }

    fn decision(denied: bool) -> Decision {
        Decision {
            allowed: !denied,
            buckets: vec![BucketReport {
                rule: Arc::from("r"),
                limit: 10,
                period: Duration::from_secs(1),
                remaining: if denied { 0 } else { 5 },
                reset_after: Duration::ZERO,
                retry_after: None,
                exhausted: denied,
                shadow: false,
            }]
            .into(),
            ..Decision::default()
        }
    }
}

#[path = "properties/fuzz.rs"]
mod fuzz;

#[path = "properties/window.rs"]
mod window;

#[path = "properties/ai.rs"]
mod ai;

#[path = "properties/shares.rs"]
mod shares;
