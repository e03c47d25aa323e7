//! The embedded store: sharded in-memory buckets, bounded by activity.
//!
//! Buckets are spread over shards by key hash, each shard a short critical
//! section behind its own mutex, so concurrent decisions on different keys
//! rarely meet. A charge that spans shards locks them in index order, which
//! keeps multi-bucket decisions atomic without deadlock.
//!
//! Time comes from `tokio::time`, so tests can pause and advance it.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use tokio::time::Instant;

use super::{BucketKey, BucketOutcome, Charge, ChargeOutcome, Store, StoreError};
use crate::limiter::bucket::Tat;

/// Default number of shards: enough that two cores never wait on each other,
/// small enough that a sweep is cheap.
pub const DEFAULT_SHARDS: usize = 64;

/// How often the sweeper drops buckets that have refilled completely.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(10);

type Map = HashMap<Box<[u8]>, Tat>;
type Shard = Mutex<Map>;

/// The embedded, in-process store.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shards: Box<[Shard]>,
    /// Picks a key's shard. Seeded per process, so callers cannot aim many
    /// keys at one shard.
    hasher: RandomState,
    /// The clock's zero: ticks are nanoseconds since this instant.
    epoch: Instant,
}

impl MemoryStore {
    /// A store with `shards` shards (rounded up to a power of two).
    pub fn new(shards: usize) -> Self {
        let n = shards.max(1).next_power_of_two();
        Self {
            inner: Arc::new(Inner {
                shards: (0..n).map(|_| Mutex::new(HashMap::new())).collect(),
                hasher: RandomState::new(),
                epoch: Instant::now(),
            }),
        }
    }

    /// Starts a background task that drops full buckets every `every`. It
    /// stops by itself once the store is dropped. Needs a tokio runtime.
    pub fn spawn_sweeper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.sweep();
            }
        })
    }

    /// Drops every bucket that is full now. Returns how many remain.
    pub fn sweep(&self) -> usize {
        self.inner.sweep()
    }

    /// Buckets held now, full or not.
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// True when no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides one charge. Synchronous: the embedded store never waits.
    pub fn decide(&self, charge: &Charge<'_>) -> ChargeOutcome {
        self.inner.decide(charge)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(DEFAULT_SHARDS)
    }
}

impl Inner {
    fn now(&self) -> u64 {
        let ns = Instant::now().duration_since(self.epoch).as_nanos();
        // Tick zero means "absent"; start the clock one hour in so that a
        // fresh store's buckets are full (TAT 0 is far in the past).
        u64::try_from(ns).unwrap_or(u64::MAX) + 3_600_000_000_000
    }

    fn shard_of(&self, key: &[u8]) -> usize {
        (self.hasher.hash_one(key) as usize) & (self.shards.len() - 1)
    }

    fn sweep(&self) -> usize {
        let now = self.now();
        let mut left = 0;
        for shard in self.shards.iter() {
            let mut map = shard.lock();
            map.retain(|_, tat| !tat.is_full_at(now));
            left += map.len();
        }
        left
    }

    fn decide(&self, charge: &Charge<'_>) -> ChargeOutcome {
        let keys: Vec<Box<[u8]>> = charge.buckets.iter().map(|b| encode(&b.key)).collect();
        let shard_ids: Vec<usize> = keys.iter().map(|k| self.shard_of(k)).collect();
        let mut order = shard_ids.clone();
        order.sort_unstable();
        order.dedup();
        // Lock every shard the charge touches, in index order, before reading
        // any state: the check and the take see no one else's writes between.
        let mut guards: Vec<(usize, MutexGuard<'_, Map>)> =
            order.iter().map(|&i| (i, self.shards[i].lock())).collect();
        let now = self.now();

        let mut verdicts = Vec::with_capacity(keys.len());
        let mut allowed = true;
        for (bucket, (key, shard)) in charge.buckets.iter().zip(keys.iter().zip(&shard_ids)) {
            let map = guard_for(&mut guards, *shard);
            let stored = map.get(key).copied().unwrap_or_default();
            let verdict = bucket.shape.judge(stored, now, bucket.cost);
            allowed &= verdict.conforms || bucket.shadow;
            verdicts.push(verdict);
        }

        let take = allowed && !charge.dry_run;
        let mut outcomes = Vec::with_capacity(keys.len());
        for ((bucket, verdict), (key, shard)) in charge
            .buckets
            .iter()
            .zip(&verdicts)
            .zip(keys.into_iter().zip(shard_ids))
        {
            let taken = take && verdict.conforms;
            let state = if taken { verdict.after } else { verdict.before };
            if taken {
                guard_for(&mut guards, shard).insert(key, state);
            }
            outcomes.push(BucketOutcome {
                conforms: verdict.conforms,
                remaining: bucket.shape.remaining(state, now),
                reset_after: Duration::from_nanos(bucket.shape.reset_after(state, now)),
                retry_after: verdict.retry_after.map(Duration::from_nanos),
            });
        }
        ChargeOutcome {
            allowed,
            buckets: outcomes,
        }
    }
}

fn guard_for<'g, 'm>(guards: &'g mut [(usize, MutexGuard<'m, Map>)], shard: usize) -> &'g mut Map {
    let at = guards.partition_point(|(i, _)| *i < shard);
    &mut guards[at].1
}

/// Encodes a key unambiguously: every part is length-prefixed, so no value of
/// one part can spill into the next.
fn encode(key: &BucketKey<'_>) -> Box<[u8]> {
    let parts = [Some(key.scope), Some(key.rule), key.identity, key.operation];
    let len: usize = parts.iter().map(|p| 5 + p.map_or(0, str::len)).sum();
    let mut out = Vec::with_capacity(len);
    for part in parts {
        match part {
            None => out.push(0),
            Some(s) => {
                out.push(1);
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
    }
    out.into_boxed_slice()
}

impl Store for MemoryStore {
    async fn check_and_take(
        &self,
        charges: &[Charge<'_>],
    ) -> Result<Vec<ChargeOutcome>, StoreError> {
        Ok(charges.iter().map(|c| self.inner.decide(c)).collect())
    }
}
