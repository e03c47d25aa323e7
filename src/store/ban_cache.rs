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
//! Only an operator (an unban, or a ban that replaces a longer one), or a
//! reload that drops the scope's penalty box, which clears the cache. An
//! operator call through this replica is seen here at once
//! ([`BanCache::forget`]). Other replicas learn it in one of two ways:
//!
//! - **fed**: a store that tells every replica of each operator change
//!   ([`BanFeed`]; Redis publishes it from the script that made the
//!   change) has the affected entry dropped as the message arrives. While
//!   the feed is proven live, an entry answers up to [`FED_HOLD`] (on
//!   Redis Cluster, [`MAX_HOLD`]: there a live subscription proves less);
//! - **unfed** (no feed, or a feed not proven live: its connection is down,
//!   being remade, or has not answered a ping for a while): **no entry
//!   answers for more than [`MAX_HOLD`]** after its send; then the store is
//!   asked again. So a change a lost feed missed reaches this replica
//!   within [`MAX_HOLD`], as without a feed.
//!
//! A feed is *proven live* at `now` when the subscription the entry was
//! learned under is still the current one and a ping sent on it less than
//! [`MAX_HOLD`] before `now` came back: a ping's answer follows every
//! message published before the ping, so a change missed by a feed that
//! died silently was published after that ping's send, and is served
//! stale for less than [`MAX_HOLD`].
//!
//! A charge in flight while a change arrives is not learned (its answer
//! may predate the change): every forget bumps a counter the charge read
//! at its send.
//!
//! # Bounded
//! At most [`MAX_ENTRIES`] entries of at most [`MAX_ENTRY_BYTES`] each (an
//! identity or operation over 64 bytes is kept as its SHA-256), so
//! [`MAX_BYTES`] in all. A shard drops its expired entries when it is
//! full, or once per [`MAX_HOLD`] as it learns; if none has expired, the
//! new ban is not cached, and the store keeps answering it.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
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

/// The longest a ban is answered locally, unfed, before the store is asked
/// again: the longest an operator's change can go unseen here.
pub const MAX_HOLD: Duration = Duration::from_secs(1);

/// The longest a ban is answered locally while a [`BanFeed`] whose pings
/// prove every change delivered is live. Not needed while the feed works
/// (it drops changed entries); it bounds what a mistake could cost, at one
/// store call per banned caller and replica per 10 s. A feed whose pings
/// prove less (Redis Cluster's: see [`BanFeed::with_hold`]) holds less.
pub const FED_HOLD: Duration = Duration::from_secs(10);

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
    /// The entries; shared with the feed, which drops changed ones.
    table: Arc<Table>,
    /// Operator changes made through other replicas, if the store tells.
    feed: Option<Arc<BanFeed>>,
}

/// The held bans.
#[derive(Debug)]
struct Table {
    shards: Box<[Mutex<Shard>]>,
    /// Seeded per process, so callers cannot aim identities at one chain.
    hasher: RandomState,
    /// Bumped by every forget: a charge sent before one is not learned.
    changes: AtomicU64,
}

/// What tells a replica's ban cache of the operator changes made through
/// other replicas: a subscription the store keeps (on Redis, to the
/// channel the penalty script publishes on; see `redis/invalidation.rs`).
/// The store reports here when it subscribes, when a ping on the
/// subscription comes back, when it loses it, and each change it hears.
#[derive(Debug)]
pub struct BanFeed {
    /// The subscription now: its number, or 0 while there is none.
    current: AtomicU64,
    /// Subscriptions made so far.
    made: AtomicU64,
    /// When the last ping that came back on the current subscription was
    /// sent, in nanoseconds since `base`.
    confirmed_ns: AtomicU64,
    base: Instant,
    /// The cache it feeds, once one is attached.
    table: OnceLock<Weak<Table>>,
    /// The longest an entry answers while the feed vouches for it.
    hold: Duration,
}

impl Default for BanFeed {
    fn default() -> Self {
        Self::with_hold(FED_HOLD)
    }
}

impl BanFeed {
    /// A feed with no subscription yet, whose vouching holds a ban up to
    /// [`FED_HOLD`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A feed whose vouching holds a ban up to `hold` (at least
    /// [`MAX_HOLD`]): less than [`FED_HOLD`] where a live subscription
    /// does not prove every change delivered.
    pub fn with_hold(hold: Duration) -> Self {
        Self {
            current: AtomicU64::new(0),
            made: AtomicU64::new(0),
            confirmed_ns: AtomicU64::new(0),
            base: Instant::now(),
            table: OnceLock::new(),
            hold: hold.max(MAX_HOLD),
        }
    }

    /// A subscription whose `SUBSCRIBE` was sent at `sent` is confirmed:
    /// every change published from then on arrives.
    pub fn subscribed(&self, sent: Instant) {
        let number = self.made.fetch_add(1, Ordering::AcqRel) + 1;
        self.confirmed_ns
            .store(self.since_base(sent), Ordering::Release);
        self.current.store(number, Ordering::Release);
    }

    /// A ping sent at `sent` on the current subscription came back.
    pub fn confirmed(&self, sent: Instant) {
        self.confirmed_ns
            .fetch_max(self.since_base(sent), Ordering::AcqRel);
    }

    /// The subscription is gone: until the next, entries answer unfed.
    pub fn lost(&self) {
        self.current.store(0, Ordering::Release);
    }

    /// True while subscribed.
    pub fn is_live(&self) -> bool {
        self.current.load(Ordering::Acquire) != 0
    }

    /// An operator changed `key`'s ban (`None`: some ban, unknown which):
    /// the cache drops it (or everything) now.
    pub fn changed(&self, key: Option<&PenaltyKey<'_>>) {
        let Some(table) = self.table.get().and_then(Weak::upgrade) else {
            return;
        };
        match key {
            Some(key) => table.forget(key),
            None => table.clear(),
        }
    }

    fn since_base(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The subscription a charge sent now is learned under (0: none).
    fn subscription(&self) -> u64 {
        self.current.load(Ordering::Acquire)
    }

    /// True when an entry learned under `subscription` may answer at
    /// `now` past [`MAX_HOLD`]: that subscription is still current and a
    /// ping sent less than [`MAX_HOLD`] ago came back.
    fn vouches(&self, subscription: u64, now: Instant) -> bool {
        if subscription == 0 || self.current.load(Ordering::Acquire) != subscription {
            return false;
        }
        let confirmed = self.confirmed_ns.load(Ordering::Acquire);
        let since = MAX_HOLD.as_nanos() as u64;
        self.since_base(now) < confirmed.saturating_add(since)
    }
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
    /// Until when this entry answers unfed: `ends`, but at most
    /// [`MAX_HOLD`] after the send.
    until: Instant,
    /// Until when it may answer while its feed vouches for it: `ends`,
    /// but at most the feed's hold after the send (`until` with no feed).
    fed_until: Instant,
    /// The feed's subscription when the charge was sent (0: none).
    subscription: u64,
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
            lease: None,
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

impl Table {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        table: HashTable::new(),
                        swept: Instant::now(),
                    })
                })
                .collect(),
            hasher: RandomState::new(),
            changes: AtomicU64::new(0),
        }
    }

    fn hash(&self, key: &PenaltyKey<'_>) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        &self.shards[(hash >> 40) as usize % SHARDS]
    }

    fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    fn forget(&self, key: &PenaltyKey<'_>) {
        // Bumped before the removal: a charge that read the old count may
        // still be in flight, and must not put the ban back.
        self.changes.fetch_add(1, Ordering::AcqRel);
        let hash = self.hash(key);
        let mut shard = self.shard(hash).lock();
        if let Ok(entry) = shard.table.find_entry(hash, |e| e.is(key)) {
            entry.remove();
        }
    }

    fn clear(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        for shard in self.shards.iter() {
            shard.lock().table.clear();
        }
    }
}

/// What a charge read when it was sent, for learning from its answer.
#[derive(Debug, Clone, Copy)]
struct Sent {
    at: Instant,
    /// The table's changes then.
    changes: u64,
    /// The feed's subscription then (0: none).
    subscription: u64,
}

impl<S: Store> BanCache<S> {
    /// `inner` with the ban cache in front, unfed: every ban is held at
    /// most [`MAX_HOLD`].
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            answered: AtomicU64::new(0),
            table: Arc::new(Table::new()),
            feed: None,
        }
    }

    /// `inner` with the ban cache in front, told of other replicas'
    /// operator changes by `feed`: bans are held up to the feed's hold while
    /// the feed is proven live. A feed serves one cache; a second is left
    /// unfed.
    pub fn with_feed(inner: S, feed: Option<Arc<BanFeed>>) -> Self {
        let mut cache = Self::new(inner);
        if let Some(feed) = feed
            && feed.table.set(Arc::downgrade(&cache.table)).is_ok()
        {
            cache.feed = Some(feed);
        }
        cache
    }

    /// The store behind the cache.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The feed, if this cache has one.
    pub fn feed(&self) -> Option<&Arc<BanFeed>> {
        self.feed.as_ref()
    }

    /// Bans held now, expired or not.
    pub fn len(&self) -> usize {
        self.table.shards.iter().map(|s| s.lock().table.len()).sum()
    }

    /// True when no ban is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the held bans account for; at most [`MAX_BYTES`].
    pub fn bytes(&self) -> usize {
        self.table
            .shards
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
        self.table.forget(key);
    }

    /// Forgets every ban held.
    pub fn clear(&self) {
        self.table.clear();
    }

    fn sent(&self) -> Sent {
        Sent {
            at: Instant::now(),
            changes: self.table.changes(),
            subscription: self.feed.as_ref().map_or(0, |f| f.subscription()),
        }
    }

    /// The local answer for `charge` at `now`, if its caller is banned.
    fn answer(&self, charge: &Charge<'_>, now: Instant) -> Option<ChargeOutcome> {
        let key = &charge.penalty.as_ref()?.key;
        let hash = self.table.hash(key);
        let mut shard = self.table.shard(hash).lock();
        let entry = shard.table.find_entry(hash, |e| e.is(key)).ok()?;
        let e = entry.get();
        let fed = || {
            now < e.fed_until
                && self
                    .feed
                    .as_ref()
                    .is_some_and(|f| f.vouches(e.subscription, now))
        };
        if now < e.until || fed() {
            self.answered.fetch_add(1, Ordering::Relaxed);
            return Some(e.outcome(now));
        }
        entry.remove();
        None
    }

    /// Keeps a ban the store reported for `charge`, sent as `sent` says.
    fn learn(&self, charge: &Charge<'_>, outcome: &ChargeOutcome, sent: Sent) {
        let (Some(penalty), Some(ban)) = (&charge.penalty, outcome.penalty.banned) else {
            return;
        };
        self.hold(&penalty.key, &ban, sent);
    }

    /// Keeps `key`'s ban, learned from a call sent as `sent` says; not if
    /// an operator change arrived meanwhile (the answer may predate it).
    fn hold(&self, key: &PenaltyKey<'_>, ban: &Ban, sent: Sent) {
        let hash = self.table.hash(key);
        let mut shard = self.table.shard(hash).lock();
        if self.table.changes() != sent.changes {
            return;
        }
        let now = Instant::now();
        if now.saturating_duration_since(shard.swept) >= MAX_HOLD
            || shard.table.len() >= MAX_ENTRIES / SHARDS
        {
            shard.table.retain(|e| e.until > now || e.fed_until > now);
            shard.swept = now;
            if shard.table.len() >= MAX_ENTRIES / SHARDS {
                return;
            }
        }
        let fed_hold = self.feed.as_ref().map_or(MAX_HOLD, |f| f.hold);
        let entry = Entry {
            hash,
            scope: Part::of(key.scope),
            identity: Part::of(key.identity),
            operation: key.operation.map(Part::of),
            ends: sent.at + ban.retry_after,
            until: sent.at + ban.retry_after.min(MAX_HOLD),
            fed_until: sent.at + ban.retry_after.min(fed_hold),
            subscription: sent.subscription,
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
        let sent = self.sent();
        let local: Vec<Option<ChargeOutcome>> =
            charges.iter().map(|c| self.answer(c, sent.at)).collect();
        super::deny_cache::ask_the_rest(&self.inner, charges, local, |charge, outcome| {
            self.learn(charge, outcome, sent);
        })
        .await
    }

    async fn check_and_take_one(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, StoreError> {
        if charge.penalty.is_none() {
            return self.inner.check_and_take_one(charge).await;
        }
        let sent = self.sent();
        if let Some(local) = self.answer(charge, sent.at) {
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
    /// unban through it is seen here at once (other replicas: as the feed
    /// delivers it, or within [`MAX_HOLD`]).
    async fn penalties(&self, op: &PenaltyOp<'_>) -> Result<PenaltyAnswer, StoreError> {
        let sent = self.sent();
        let answer = self.inner.penalties(op).await;
        match (op, &answer) {
            (PenaltyOp::Ban { key, .. }, Ok(PenaltyAnswer::Banned(ban))) => {
                // The store's answer replaces whatever was held.
                self.forget(key);
                let sent = Sent {
                    changes: self.table.changes(),
                    ..sent
                };
                self.hold(key, ban, sent);
            }
            // Even a failed call may have changed the store: forget.
            (PenaltyOp::Ban { key, .. } | PenaltyOp::Unban { key }, _) => self.forget(key),
            _ => {}
        }
        answer
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
            lease: None,
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
        let sent = cache.sent();
        for i in 0..MAX_ENTRIES + 5_000 {
            let identity = format!("{long}{i}");
            cache.learn(&penalized(&identity), &banned_for(3600), sent);
        }
        assert!(cache.len() <= MAX_ENTRIES, "{} held", cache.len());
        assert!(cache.len() > MAX_ENTRIES / 2, "each shard fills up");
        assert!(cache.bytes() <= MAX_BYTES, "{} bytes", cache.bytes());
        // A held ban answers; so does each one until its hold is over.
        let held = format!("{long}0");
        let local = cache.answer(&penalized(&held), sent.at).expect("held");
        assert_eq!(
            local.penalty.banned.unwrap().retry_after,
            Duration::from_secs(3600)
        );
        tokio::time::advance(MAX_HOLD).await;
        assert!(cache.answer(&penalized(&held), Instant::now()).is_none());
        // Once their hold is over, a full shard makes room again.
        cache.learn(&penalized("late"), &banned_for(60), cache.sent());
        assert!(cache.answer(&penalized("late"), Instant::now()).is_some());
        cache.forget(&penalized("late").penalty.unwrap().key);
        assert!(cache.answer(&penalized("late"), Instant::now()).is_none());
    }

    fn fed() -> (Arc<BanFeed>, BanCache<MemoryStore>) {
        let feed = Arc::new(BanFeed::new());
        let cache = BanCache::with_feed(MemoryStore::default(), Some(feed.clone()));
        assert!(cache.feed().is_some());
        (feed, cache)
    }

    fn held(cache: &BanCache<MemoryStore>, identity: &str) -> bool {
        cache.answer(&penalized(identity), Instant::now()).is_some()
    }

    #[tokio::test(start_paused = true)]
    async fn a_fed_ban_is_held_while_pings_come_back_and_dropped_when_a_change_arrives() {
        let (feed, cache) = fed();
        feed.subscribed(Instant::now());
        cache.learn(&penalized("bot"), &banned_for(3600), cache.sent());
        for _ in 0..10 {
            tokio::time::advance(MAX_HOLD / 2).await;
            feed.confirmed(Instant::now());
            assert!(held(&cache, "bot"), "vouched for past MAX_HOLD");
        }
        feed.changed(Some(&penalized("bot").penalty.unwrap().key));
        assert!(!held(&cache, "bot"), "dropped as the change arrives");
        // Learned again; then the pings stop coming back: it answers until
        // MAX_HOLD after the last one that did was sent, and not after.
        cache.learn(&penalized("bot"), &banned_for(3600), cache.sent());
        tokio::time::advance(MAX_HOLD * 2).await;
        feed.confirmed(Instant::now());
        tokio::time::advance(MAX_HOLD - Duration::from_nanos(1)).await;
        assert!(held(&cache, "bot"));
        tokio::time::advance(Duration::from_nanos(1)).await;
        assert!(!held(&cache, "bot"), "unproven feed: back to MAX_HOLD");
        // However well fed, never past FED_HOLD after the send.
        cache.learn(&penalized("bot"), &banned_for(3600), cache.sent());
        for _ in 0..(FED_HOLD.as_secs() - 1) {
            tokio::time::advance(Duration::from_secs(1)).await;
            feed.confirmed(Instant::now());
        }
        tokio::time::advance(Duration::from_millis(999)).await;
        feed.confirmed(Instant::now());
        assert!(held(&cache, "bot"));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!held(&cache, "bot"), "FED_HOLD reached");
    }

    #[tokio::test(start_paused = true)]
    async fn without_its_subscription_a_ban_is_held_at_most_max_hold() {
        let (feed, cache) = fed();
        // Learned with no subscription: MAX_HOLD, whatever comes later.
        cache.learn(&penalized("early"), &banned_for(3600), cache.sent());
        feed.subscribed(Instant::now());
        cache.learn(&penalized("bot"), &banned_for(3600), cache.sent());
        tokio::time::advance(MAX_HOLD / 2).await;
        feed.lost();
        assert!(held(&cache, "bot"), "within MAX_HOLD of its send");
        // The subscription is made again: changes in between were missed,
        // so the new one does not vouch for bans learned under the old.
        feed.subscribed(Instant::now());
        tokio::time::advance(MAX_HOLD / 2).await;
        feed.confirmed(Instant::now());
        assert!(!held(&cache, "bot"));
        assert!(!held(&cache, "early"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_feed_that_proves_less_holds_no_longer_than_none() {
        let feed = Arc::new(BanFeed::with_hold(MAX_HOLD));
        let cache = BanCache::with_feed(MemoryStore::default(), Some(feed.clone()));
        feed.subscribed(Instant::now());
        cache.learn(&penalized("bot"), &banned_for(3600), cache.sent());
        tokio::time::advance(MAX_HOLD - Duration::from_nanos(1)).await;
        feed.confirmed(Instant::now());
        assert!(held(&cache, "bot"));
        tokio::time::advance(Duration::from_nanos(1)).await;
        feed.confirmed(Instant::now());
        assert!(!held(&cache, "bot"), "vouched for, but at most MAX_HOLD");
        // And the change still arrives at once.
        cache.learn(&penalized("bot"), &banned_for(3600), cache.sent());
        feed.changed(Some(&penalized("bot").penalty.unwrap().key));
        assert!(!held(&cache, "bot"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_charge_in_flight_across_a_change_is_not_learned() {
        let (feed, cache) = fed();
        feed.subscribed(Instant::now());
        let sent = cache.sent();
        feed.changed(None);
        cache.learn(&penalized("bot"), &banned_for(3600), sent);
        assert!(!held(&cache, "bot"), "its answer may predate the unban");
        cache.learn(&penalized("bot"), &banned_for(3600), cache.sent());
        assert!(held(&cache, "bot"));
        // An unfed cache's feed is never attached twice.
        let second = BanCache::with_feed(MemoryStore::default(), Some(feed));
        assert!(second.feed().is_none());
    }
}
