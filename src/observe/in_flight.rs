//! A replica's view of the weight in flight per concurrency limit, for
//! `tollgate_leases_in_flight{scope,rule}`.
//!
//! Every store answer to a lease call carries its pool's live weight after
//! the call. This keeps the latest one per pool this replica called on, and
//! forgets a pool `max_lease` after that call (by then every lease it saw
//! has expired or been renewed by someone else), or at once when the
//! weight was 0. The gauge is the sum per scope and rule. It is what this
//! replica saw, not a store-side sum: see docs/leases.md#metrics.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// The most pools one replica keeps; a pool first seen while the map is
/// full (after forgetting the expired) is not counted until room frees.
pub const MAX_TRACKED_POOLS: usize = 10_000;

/// (scope, rule): the gauge's labels, configured names only.
pub type Labels = (Arc<str>, Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolId {
    labels: Labels,
    id: [u8; 16],
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    in_flight: u64,
    forget_at: Instant,
}

/// The latest weight seen per pool, bounded.
#[derive(Debug)]
pub struct InFlight {
    pools: Mutex<HashMap<PoolId, Seen>>,
    /// Every (scope, rule) ever reported, so that an emptied one reads 0
    /// rather than vanishing; bounded by the configured names.
    known: Mutex<HashSet<Labels>>,
    max_pools: usize,
}

impl Default for InFlight {
    fn default() -> Self {
        Self::with_max_pools(MAX_TRACKED_POOLS)
    }
}

impl InFlight {
    /// A view keeping at most `max_pools` pools.
    pub fn with_max_pools(max_pools: usize) -> Self {
        Self {
            pools: Mutex::default(),
            known: Mutex::default(),
            max_pools,
        }
    }

    /// Records a pool's weight after a call at `now`; false when the pool
    /// could not be kept (the map is full of pools not yet forgotten).
    pub fn record(
        &self,
        labels: &Labels,
        id: [u8; 16],
        in_flight: u64,
        max_lease: Duration,
        now: Instant,
    ) -> bool {
        {
            let mut known = self.known.lock();
            if !known.contains(labels) {
                known.insert(labels.clone());
            }
        }
        let key = PoolId {
            labels: labels.clone(),
            id,
        };
        let mut pools = self.pools.lock();
        if in_flight == 0 {
            pools.remove(&key);
            return true;
        }
        if !pools.contains_key(&key) && pools.len() >= self.max_pools {
            pools.retain(|_, s| s.forget_at > now);
            if pools.len() >= self.max_pools {
                return false;
            }
        }
        let forget_at = now + max_lease;
        pools.insert(
            key,
            Seen {
                in_flight,
                forget_at,
            },
        );
        true
    }

    /// The sum per (scope, rule) at `now`, forgetting pools past their
    /// time; every (scope, rule) ever recorded is present, 0 when empty.
    pub fn sums(&self, now: Instant) -> HashMap<Labels, u64> {
        let mut out: HashMap<Labels, u64> =
            self.known.lock().iter().map(|l| (l.clone(), 0)).collect();
        let mut pools = self.pools.lock();
        pools.retain(|_, s| s.forget_at > now);
        for (k, s) in pools.iter() {
            let sum = out.entry(k.labels.clone()).or_default();
            *sum = sum.saturating_add(s.in_flight);
        }
        out
    }

    /// Pools kept now (forgotten ones included until the next sum).
    pub fn pools(&self) -> usize {
        self.pools.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(rule: &str) -> Labels {
        ("s".into(), rule.into())
    }

    fn id(n: u8) -> [u8; 16] {
        [n; 16]
    }

    #[test]
    fn the_latest_weight_per_pool_is_summed_per_rule_and_forgotten_after_max_lease() {
        let view = InFlight::default();
        let t0 = Instant::now();
        let lease = Duration::from_secs(60);
        view.record(&labels("a"), id(1), 2, lease, t0);
        view.record(&labels("a"), id(1), 3, lease, t0);
        view.record(&labels("a"), id(2), 1, lease, t0 + Duration::from_secs(30));
        view.record(&labels("b"), id(1), 5, lease, t0);
        let sums = view.sums(t0 + Duration::from_secs(1));
        assert_eq!((sums[&labels("a")], sums[&labels("b")]), (4, 5));
        // id(1)'s last call was at t0: forgotten at t0 + max_lease.
        let later = view.sums(t0 + lease);
        assert_eq!((later[&labels("a")], later[&labels("b")]), (1, 0));
        view.record(&labels("a"), id(2), 0, lease, t0 + lease);
        assert_eq!(view.sums(t0 + lease)[&labels("a")], 0);
        assert_eq!(view.pools(), 0);
    }

    #[test]
    fn the_map_is_bounded_and_frees_room_as_pools_are_forgotten() {
        let view = InFlight::with_max_pools(3);
        let t0 = Instant::now();
        let (short, long) = (Duration::from_secs(1), Duration::from_secs(60));
        view.record(&labels("a"), id(1), 1, short, t0);
        view.record(&labels("a"), id(2), 1, long, t0);
        view.record(&labels("a"), id(3), 1, long, t0);
        // Full: a fourth pool is not kept, a kept one still updates.
        assert!(!view.record(&labels("a"), id(4), 1, long, t0));
        assert!(view.record(&labels("a"), id(3), 2, long, t0));
        assert_eq!(view.pools(), 3);
        assert_eq!(view.sums(t0)[&labels("a")], 4);
        // Once id(1) is past its max_lease, its room goes to a new pool.
        assert!(view.record(&labels("a"), id(4), 7, long, t0 + short));
        assert_eq!(view.pools(), 3);
        assert_eq!(view.sums(t0 + short)[&labels("a")], 10);
    }
}
