//! The ban cache: a banned caller answered from memory, in front of any
//! store.
//!
//! # Why a local ban is exact
//! A store that answers "banned, for `t` more" has decided that no charge
//! of this caller is judged before `t` has passed (see
//! [`super::penalty`]): a ban never shortens by itself. So until then the
//! same caller's charges in that scope are denied, with the ban's end as
//! their wait, and nothing is taken. The cache answers exactly that, with
//! no store call.
//!
//! `t` counts from the moment the charge was *sent*, so a local ban ends no
//! later than the store's: the cache never denies past the real end.
//!
//! # What lifts a ban early
//! Only an operator's unban (or a reload that drops the scope's penalty
//! box, which clears the cache). An unban through this replica forgets the
//! caller here at once ([`BanCache::forget`]); another replica learns it
//! from the store, because **no entry answers for more than [`MAX_HOLD`]**
//! after its send, however long the ban: then the store is asked once more
//! (and, still banned, says so again). So a banned caller costs each
//! replica at most one store call per [`MAX_HOLD`], and an unban reaches
//! every replica within it.
//!
//! # Bounded
//! At most [`MAX_ENTRIES`] entries of at most [`MAX_ENTRY_BYTES`] each (an
//! identity or operation over 64 bytes is kept as its SHA-256), so
//! [`MAX_BYTES`] in all. A shard drops its expired entries when it is
//! full, or once per [`MAX_HOLD`] as it learns; if none has expired, the
//! new ban is not cached, and the store keeps answering it.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hashbrown::HashTable;
use parking_lot::Mutex;
use smallvec::SmallVec;
use tokio::time::Instant;

use super::deny_cache::Part;
use super::penalty::{Ban, PenaltyAnswer, PenaltyKey, PenaltyOp, PenaltyOutcome};
use super::{Charge, ChargeOutcome, Settled, Settlement, Store, StoreError};

/// The most bans held at once, over all shards.
pub const MAX_ENTRIES: usize = 65_536;

/// The longest a ban is answered locally before the store is asked again.
pub const MAX_HOLD: Duration = Duration::from_secs(1);

/// The most bytes one held ban accounts for (see [`BanCache::bytes`]).
pub const MAX_ENTRY_BYTES: usize = 384;

/// The most bytes the cache holds: [`MAX_ENTRIES`] × [`MAX_ENTRY_BYTES`].
pub const MAX_BYTES: usize = MAX_ENTRIES * MAX_ENTRY_BYTES;

const SHARDS: usize = 16;

/// A store with the ban cache in front of it.
#[derive(Debug)]
pub struct BanCache<S> {
    inner: S,
    /// Bans answered here, without the store.
    answered: AtomicU64,
    shards: Box<[Mutex<Shard>]>,
    /// Seeded per process, so callers cannot aim identities at one chain.
    hasher: RandomState,
}

#[derive(Debug)]
struct Shard {
    table: HashTable<Entry>,
    /// When its expired entries were last dropped.
    swept: Instant,
}

/// One banned caller.
#[derive(Debug)]
struct Entry {
    hash: u64,
    scope: Part,
    identity: Part,
    operation: Option<Part>,
    /// Send time plus the store's wait: when the ban ends, at the latest.
    ends: Instant,
    /// Until when this entry answers: `ends`, but at most [`MAX_HOLD`]
    /// after the send.
    until: Instant,
    /// The ban's end on the store's clock, as the store said.
    until_us: u64,
}

impl Entry {
    fn is(&self, key: &PenaltyKey<'_>) -> bool {
        let op = match (&self.operation, key.operation) {
            (None, None) => true,
            (Some(p), Some(t)) => p.is(t),
            _ => false,
        };
        op && self.scope.is(key.scope) && self.identity.is(key.identity)
    }

    fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.scope.heap_bytes()
            + self.identity.heap_bytes()
            + self.operation.as_ref().map_or(0, Part::heap_bytes)
    }

    fn outcome(&self, now: Instant) -> ChargeOutcome {
        ChargeOutcome {
            allowed: false,
            buckets: SmallVec::new(),
            now_us: 0,
            delay: std::time::Duration::ZERO,
            penalty: PenaltyOutcome {
                banned: Some(Ban {
                    retry_after: self.ends.saturating_duration_since(now),
                    until_us: self.until_us,
                    started: false,
                }),
                struck: false,
            },
        }
    }
}

impl<S: Store> BanCache<S> {
    /// `inner` with the ban cache in front.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            answered: AtomicU64::new(0),
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        table: HashTable::new(),
                        swept: Instant::now(),
                    })
                })
                .collect(),
            hasher: RandomState::new(),
        }
    }

    /// The store behind the cache.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Bans held now, expired or not.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().table.len()).sum()
    }

    /// True when no ban is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the held bans account for; at most [`MAX_BYTES`].
    pub fn bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().table.iter().map(Entry::bytes).sum::<usize>())
            .sum()
    }

    /// Bans answered locally so far.
    pub fn answered_locally(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Forgets `key`'s ban, if held: after an unban through this replica.
    pub fn forget(&self, key: &PenaltyKey<'_>) {
        let hash = self.hash(key);
        let mut shard = self.shard(hash).lock();
        if let Ok(entry) = shard.table.find_entry(hash, |e| e.is(key)) {
            entry.remove();
        }
    }

    /// Forgets every ban held.
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            shard.lock().table.clear();
        }
    }

    fn hash(&self, key: &PenaltyKey<'_>) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        &self.shards[(hash >> 40) as usize % SHARDS]
    }

    /// The local answer for `charge` at `now`, if its caller is banned.
    fn answer(&self, charge: &Charge<'_>, now: Instant) -> Option<ChargeOutcome> {
        let key = &charge.penalty.as_ref()?.key;
        let hash = self.hash(key);
        let mut shard = self.shard(hash).lock();
        let entry = shard.table.find_entry(hash, |e| e.is(key)).ok()?;
        if now < entry.get().until {
            self.answered.fetch_add(1, Ordering::Relaxed);
            return Some(entry.get().outcome(now));
        }
        entry.remove();
        None
    }

    /// Keeps a ban the store reported for `charge`, sent at `sent`.
    fn learn(&self, charge: &Charge<'_>, outcome: &ChargeOutcome, sent: Instant) {
        let (Some(penalty), Some(ban)) = (&charge.penalty, outcome.penalty.banned) else {
            return;
        };
        self.hold(&penalty.key, &ban, sent);
    }

    /// Keeps `key`'s ban, learned from a call sent at `sent`.
    fn hold(&self, key: &PenaltyKey<'_>, ban: &Ban, sent: Instant) {
        let hash = self.hash(key);
        let mut shard = self.shard(hash).lock();
        let now = Instant::now();
        if now.saturating_duration_since(shard.swept) >= MAX_HOLD
            || shard.table.len() >= MAX_ENTRIES / SHARDS
        {
            shard.table.retain(|e| e.until > now);
            shard.swept = now;
            if shard.table.len() >= MAX_ENTRIES / SHARDS {
                return;
            }
        }
        let entry = Entry {
            hash,
            scope: Part::of(key.scope),
            identity: Part::of(key.identity),
            operation: key.operation.map(Part::of),
            ends: sent + ban.retry_after,
            until: sent + ban.retry_after.min(MAX_HOLD),
            until_us: ban.until_us,
        };
        match shard.table.find_entry(hash, |e| e.is(key)) {
            Ok(mut old) => *old.get_mut() = entry,
            Err(_) => {
                shard.table.insert_unique(hash, entry, |e| e.hash);
            }
        }
    }
}

impl<S: Store> Store for BanCache<S> {
    async fn check_and_take_each(
        &self,
        charges: &[Charge<'_>],
    ) -> Vec<Result<ChargeOutcome, StoreError>> {
        if charges.iter().all(|c| c.penalty.is_none()) {
            // No penalty box involved: nothing to answer or learn.
            return self.inner.check_and_take_each(charges).await;
        }
        let sent = Instant::now();
        let local: Vec<Option<ChargeOutcome>> =
            charges.iter().map(|c| self.answer(c, sent)).collect();
        super::deny_cache::ask_the_rest(&self.inner, charges, local, |charge, outcome| {
            self.learn(charge, outcome, sent);
        })
        .await
    }

    async fn check_and_take_one(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, StoreError> {
        if charge.penalty.is_none() {
            return self.inner.check_and_take_one(charge).await;
        }
        let sent = Instant::now();
        if let Some(local) = self.answer(charge, sent) {
            return Ok(local);
        }
        let outcome = self.inner.check_and_take_one(charge).await?;
        self.learn(charge, &outcome, sent);
        Ok(outcome)
    }

    async fn lease(&self, call: &super::LeaseCall<'_>) -> Result<super::LeaseOutcome, StoreError> {
        self.inner.lease(call).await
    }

    async fn demand(
        &self,
        call: &super::DemandCall<'_>,
    ) -> Result<super::DemandAnswer, StoreError> {
        self.inner.demand(call).await
    }

    async fn settle(&self, settlement: &Settlement<'_>) -> Result<Settled, StoreError> {
        self.inner.settle(settlement).await
    }

    /// A ban set through this replica is answered here from then on; an
    /// unban through it is seen here at once (other replicas: within
    /// [`MAX_HOLD`]).
    async fn penalties(&self, op: &PenaltyOp<'_>) -> Result<PenaltyAnswer, StoreError> {
        let sent = Instant::now();
        let answer = self.inner.penalties(op).await?;
        match (op, &answer) {
            (PenaltyOp::Ban { key, .. }, PenaltyAnswer::Banned(ban)) => {
                self.hold(key, ban, sent);
            }
            (PenaltyOp::Unban { key }, _) => self.forget(key),
            _ => {}
        }
        Ok(answer)
    }

    fn is_available(&self) -> bool {
        self.inner.is_available()
    }

    /// A reload may drop or change a scope's penalty box: start afresh.
    fn rules_replaced(&self, scopes: &[&str]) {
        self.clear();
        self.inner.rules_replaced(scopes);
    }

    fn condition(&self) -> super::Condition {
        self.inner.condition()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::penalty::{Penalty, PenaltyRule};

    #[test]
    fn an_entry_with_every_part_at_its_longest_kept_fits_its_bound() {
        // Three parts of 64 bytes; a longer one is a digest inline.
        let most = std::mem::size_of::<Entry>() + 3 * 64;
        assert!(most <= MAX_ENTRY_BYTES, "{most} > {MAX_ENTRY_BYTES}");
    }

    fn penalized(identity: &str) -> Charge<'_> {
        let rule = PenaltyRule {
            strikes: 1,
            within_ns: 1,
            ban_ns: 1,
            factor: 1,
            max_ban_ns: 1,
            forgive_ns: 1,
        };
        Charge {
            penalty: Some(Penalty {
                key: PenaltyKey {
                    scope: "s",
                    identity,
                    operation: None,
                },
                rule,
                strikes_from: SmallVec::new(),
                forced: false,
            }),
            ..Charge::default()
        }
    }

    fn banned_for(secs: u64) -> ChargeOutcome {
        ChargeOutcome {
            allowed: false,
            buckets: SmallVec::new(),
            now_us: 0,
            delay: std::time::Duration::ZERO,
            penalty: PenaltyOutcome {
                banned: Some(Ban {
                    retry_after: Duration::from_secs(secs),
                    until_us: 1,
                    started: true,
                }),
                struck: true,
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn more_bans_than_it_may_hold_are_not_held_and_the_bound_stays() {
        let cache = BanCache::new(MemoryStore::default());
        let long = "x".repeat(300);
        let sent = Instant::now();
        for i in 0..MAX_ENTRIES + 5_000 {
            let identity = format!("{long}{i}");
            cache.learn(&penalized(&identity), &banned_for(3600), sent);
        }
        assert!(cache.len() <= MAX_ENTRIES, "{} held", cache.len());
        assert!(cache.len() > MAX_ENTRIES / 2, "each shard fills up");
        assert!(cache.bytes() <= MAX_BYTES, "{} bytes", cache.bytes());
        // A held ban answers; so does each one until its hold is over.
        let held = format!("{long}0");
        let local = cache.answer(&penalized(&held), sent).expect("held");
        assert_eq!(
            local.penalty.banned.unwrap().retry_after,
            Duration::from_secs(3600)
        );
        tokio::time::advance(MAX_HOLD).await;
        assert!(cache.answer(&penalized(&held), Instant::now()).is_none());
        // Once their hold is over, a full shard makes room again.
        cache.learn(&penalized("late"), &banned_for(60), Instant::now());
        assert!(cache.answer(&penalized("late"), Instant::now()).is_some());
        cache.forget(&penalized("late").penalty.unwrap().key);
        assert!(cache.answer(&penalized("late"), Instant::now()).is_none());
    }
}
