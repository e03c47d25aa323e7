//! The deny cache: an exact local answer for a bucket that just denied, in
//! front of any store.
//!
//! # Why a local denial is exact
//! When the store denies `cost` from a bucket with `retry_after = t`, the
//! bucket cannot hold `cost` tokens before `t` has passed: refill is steady,
//! and everyone else can only take tokens, never add them. So until then the
//! same request, `cost` from the same bucket of the same shape, is denied
//! again, and its wait is `t` minus the time gone by. The cache answers
//! exactly that, with no store call.
//!
//! `t` is counted from the moment the request was *sent* to the store, not
//! from when the answer came back. The store decided somewhere in between,
//! so the cached deadline is never later than the real one: the cache stops
//! answering a little early (by at most the round trip), and the store
//! answers from then on. A local denial therefore never denies what the
//! store would allow; its `retry_after` is the store's, shrinking with time,
//! short of the exact value by at most the round trip in which the store
//! decided (it is exact on the embedded store, where no time passes). On
//! Redis the deadline is Redis's time and the cache counts on this host's
//! monotonic clock; two clocks that tick at rates a few parts per million
//! apart move the deadline by as many millionths of `t`.
//!
//! # What it covers
//! - A charge behind a penalty box is never answered here: its denial is
//!   a strike the store counts. Once the caller is banned, the ban cache
//!   (`ban_cache.rs`) answers it. Nor is a charge that takes a lease: its
//!   pool is judged with its buckets.
//! - Only charges of one enforced bucket are answered locally. A charge of
//!   several buckets needs every bucket's state for its exact `retry_after`,
//!   and a shadow bucket never denies, so those always go to the store.
//! - One entry per bucket and shape, answering its own cost only, so a rule
//!   whose shape changes on reload never meets an old entry; a reload also
//!   clears the cache ([`Store::rules_replaced`]), so a rule that turns
//!   shadow or goes away is never answered from before.
//! - A take through this replica drops the entries of the buckets it took
//!   from, so this replica's own answers stay exact. Takes by other replicas
//!   only push the real wait further out: for a shared bucket the cached
//!   `retry_after` is then a lower bound, as the store's own is.
//! - Refunds: the cache only ever denies. A settle or refund through this
//!   replica drops the entries of the buckets it touched. If tokens come
//!   back early any other way (a settle-for-less or an Envoy refund on
//!   another replica), it may deny a request the store would now allow:
//!   longer than needed, never an admission. How much longer is bounded by
//!   [`MAX_HOLD`]: an entry answers for at most that long after its send,
//!   then the store is asked again, however far off the wait. A slow bucket
//!   (ten a day) or a budget (until its window ends) can make the wait
//!   hours; with the hold, a hot key over such a limit costs one store call
//!   per hold per replica, and a refund elsewhere is seen within the hold.
//!   The local answer still carries the store's whole wait, shrinking.
//! - Budgets: a denied budget cannot hold the cost again before its window
//!   ends (spend only grows within a window); the local answer carries the
//!   remaining the store reported.
//! - Shaping: a charge that may wait (a bucket with a `max_delay`) is never
//!   answered here nor held: whether it passes depends on its wait, and a
//!   denial held for a request that could not wait would deny one that can.
//!   A delayed take through this replica drops entries like any take.
//! - Priorities: an entry answers only the same cost with the same headroom
//!   to keep, so a CRITICAL request is never denied on a SHEDDABLE one's
//!   behalf.
//! - Bounded: at most [`MAX_ENTRIES`] entries of at most
//!   [`MAX_ENTRY_BYTES`] each (a key part over 64 bytes, such as an Envoy
//!   descriptor used whole as the identity, is kept as its SHA-256), so
//!   40 MiB in all. A shard drops its expired entries once per
//!   [`MAX_HOLD`] as it learns, and when full; if none are expired, the new
//!   denial simply is not cached.

use std::future::Future;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

use hashbrown::HashTable;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::{
    BucketCharge, BucketOutcome, Charge, ChargeOutcome, PenaltyAnswer, PenaltyOp, Settled,
    Settlement, Store, StoreError,
};
use crate::bucket::{Mark, Shape, Tat};

/// The most denials held at once, over all shards.
pub const MAX_ENTRIES: usize = 65_536;

/// The longest a denial is answered locally before the store is asked
/// again, whatever its wait (see the module's doc).
pub const MAX_HOLD: std::time::Duration = std::time::Duration::from_secs(1);

const SHARDS: usize = 16;

/// The most bytes one held denial accounts for (see [`DenyCache::bytes`]).
pub const MAX_ENTRY_BYTES: usize = 640;

/// A store with the deny cache in front of it, or (when off) just the store.
#[derive(Debug)]
pub struct DenyCache<S> {
    inner: S,
    cache: Option<Cache>,
}

#[derive(Debug)]
struct Cache {
    /// Denials answered here, without the store.
    answered: AtomicU64,
    shards: Box<[Mutex<Shard>]>,
    /// Seeded per process, so callers cannot aim identities at one chain.
    hasher: RandomState,
}

/// One shard of held denials.
#[derive(Debug)]
struct Shard {
    table: HashTable<Entry>,
    /// When its expired entries were last dropped: at most every
    /// [`MAX_HOLD`], so an entry outlives its `until` by at most that.
    swept: Instant,
}

/// The longest key part an entry keeps as text; a longer one is kept as
/// its SHA-256, as the store keys do, so an entry's bytes are bounded
/// whatever a caller sends.
const MAX_KEPT: usize = 64;

/// A key part as an entry keeps it: short text as is, long text hashed.
#[derive(Debug)]
pub(super) enum Part {
    Text(Box<str>),
    Digest([u8; 32]),
}

impl Part {
    pub(super) fn of(text: &str) -> Self {
        if text.len() <= MAX_KEPT {
            Self::Text(text.into())
        } else {
            Self::Digest(digest(text))
        }
    }

    /// True when this is `text`'s part.
    pub(super) fn is(&self, text: &str) -> bool {
        match self {
            Self::Text(t) => **t == *text,
            Self::Digest(d) => text.len() > MAX_KEPT && digest(text) == *d,
        }
    }

    pub(super) fn heap_bytes(&self) -> usize {
        match self {
            Self::Text(t) => t.len(),
            Self::Digest(_) => 0,
        }
    }
}

fn digest(text: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// One bucket that denied: who, for what, and until when.
#[derive(Debug)]
struct Entry {
    hash: u64,
    scope: Part,
    rule: Part,
    identity: Option<Part>,
    operation: Option<Part>,
    shape: Shape,
    cost: u64,
    /// The headroom the denied request had to leave: a request of another
    /// priority is judged on another amount, so it is not answered here.
    reserve: u64,
    /// Send time plus the store's `retry_after`: the cost cannot be held
    /// before this.
    retry_at: Instant,
    /// Until when this entry answers: `retry_at`, but at most [`MAX_HOLD`]
    /// after the send.
    until: Instant,
    /// Send time plus the store's `reset_after`, for the reported state.
    full_at: Instant,
    /// A budget's remaining as the store reported it (`None`: a token
    /// bucket, whose remaining follows from its shape and `full_at`).
    budget_left: Option<u64>,
}

impl Entry {
    /// True for an entry about `b`'s bucket (of the same shape), whatever
    /// the cost.
    fn is(&self, b: &BucketCharge<'_>) -> bool {
        let same = |part: &Option<Part>, text: Option<&str>| match (part, text) {
            (None, None) => true,
            (Some(p), Some(t)) => p.is(t),
            _ => false,
        };
        self.shape == b.shape
            && self.scope.is(b.key.scope)
            && self.rule.is(b.key.rule)
            && same(&self.identity, b.key.identity)
            && same(&self.operation, b.key.operation)
    }

    /// The bytes this entry accounts for.
    fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.scope.heap_bytes()
            + self.rule.heap_bytes()
            + self.identity.as_ref().map_or(0, Part::heap_bytes)
            + self.operation.as_ref().map_or(0, Part::heap_bytes)
    }

    /// The store's answer, as it stands at `now` (before `until`).
    fn outcome(&self, now: Instant) -> ChargeOutcome {
        let reset_after = self.full_at.saturating_duration_since(now);
        let remaining = self
            .budget_left
            .unwrap_or_else(|| self.refilled(reset_after));
        ChargeOutcome {
            allowed: false,
            buckets: smallvec::smallvec![BucketOutcome {
                conforms: false,
                remaining: remaining.min((self.cost + self.reserve).saturating_sub(1)),
                reset_after,
                retry_after: Some(self.retry_at - now),
                mark: Mark::default(),
            }],
            // Only a reservation reads the store's clock, and a denial
            // makes none.
            now_us: 0,
            delay: std::time::Duration::ZERO,
            lease: None,
            penalty: Default::default(),
        }
    }

    /// A token bucket's whole tokens when it is `reset_after` from full.
    fn refilled(&self, reset_after: std::time::Duration) -> u64 {
        // Shapes are in nanoseconds, like every `BucketCharge`.
        let ns = u64::try_from(reset_after.as_nanos()).unwrap_or(u64::MAX);
        let base = self.shape.period;
        self.shape.remaining(
            Tat {
                ticks: base.saturating_add(ns),
                frac: 0,
            },
            base,
        )
    }
}

/// The one bucket a charge must have for a local answer. A charge behind
/// a penalty box is never answered here: each of its denials is a strike
/// the store must count (the ban cache answers it once it is banned).
fn cacheable<'c, 'a>(charge: &'c Charge<'a>) -> Option<&'c BucketCharge<'a>> {
    match charge.buckets.as_slice() {
        // A shaped request (one that may wait) is never answered from a
        // denial held for another, nor held: its answer depends on its wait.
        // Nor is a charge with a penalty box: each denial must reach the
        // store to count as a strike.
        // Nor one with a lease: its pool must be judged (and its expired
        // leases removed) with the buckets.
        [b] if !b.shadow
            && b.max_delay.is_zero()
            && charge.penalty.is_none()
            && charge.lease.is_none() =>
        {
            Some(b)
        }
        _ => None,
    }
}

impl<S: Store> DenyCache<S> {
    /// `inner` with the cache in front when `on`, else `inner` alone.
    pub fn new(inner: S, on: bool) -> Self {
        let cache = on.then(|| Cache {
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
        });
        Self { inner, cache }
    }

    /// The store behind the cache.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Denials held now, expired or not.
    pub fn len(&self) -> usize {
        self.cache
            .as_ref()
            .map_or(0, |c| c.shards.iter().map(|s| s.lock().table.len()).sum())
    }

    /// Bytes the held denials account for: each entry and the text it
    /// keeps. At most [`MAX_ENTRY_BYTES`] per entry.
    pub fn bytes(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| {
            c.shards
                .iter()
                .map(|s| s.lock().table.iter().map(Entry::bytes).sum::<usize>())
                .sum()
        })
    }

    /// Denials answered locally so far, without asking the store.
    pub fn answered_locally(&self) -> u64 {
        self.cache
            .as_ref()
            .map_or(0, |c| c.answered.load(Ordering::Relaxed))
    }

    /// True when no denial is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Cache {
    fn hash(&self, b: &BucketCharge<'_>) -> u64 {
        let mut h = self.hasher.build_hasher();
        b.key.hash(&mut h);
        b.shape.hash(&mut h);
        h.finish()
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        &self.shards[(hash >> 40) as usize % SHARDS]
    }

    /// The local answer for `charge` at `now`, if it has one.
    fn answer(&self, charge: &Charge<'_>, now: Instant) -> Option<ChargeOutcome> {
        let b = cacheable(charge)?;
        let hash = self.hash(b);
        let mut shard = self.shard(hash).lock();
        let entry = shard.table.find_entry(hash, |e| e.is(b)).ok()?;
        if entry.get().cost != b.cost || entry.get().reserve != b.reserve {
            return None;
        }
        if now < entry.get().until {
            self.answered.fetch_add(1, Ordering::Relaxed);
            return Some(entry.get().outcome(now));
        }
        entry.remove();
        None
    }

    /// Keeps a denial the store gave for `charge`, sent at `sent`; after a
    /// take, forgets what it held about the charge's buckets.
    fn learn(&self, charge: &Charge<'_>, outcome: &ChargeOutcome, sent: Instant) {
        if outcome.allowed && !charge.dry_run {
            self.forget(&charge.buckets);
            return;
        }
        let (Some(b), false) = (cacheable(charge), outcome.allowed) else {
            return;
        };
        let Some(BucketOutcome {
            retry_after: Some(wait),
            reset_after,
            remaining,
            ..
        }) = outcome.buckets.first().copied()
        else {
            return;
        };
        let hash = self.hash(b);
        let mut shard = self.shard(hash).lock();
        let now = Instant::now();
        // Expired entries go once a hold has passed, or when the shard is
        // full, so they never sit until it fills.
        if now.saturating_duration_since(shard.swept) >= MAX_HOLD
            || shard.table.len() >= MAX_ENTRIES / SHARDS
        {
            shard.table.retain(|e| e.until > now);
            shard.swept = now;
            if shard.table.len() >= MAX_ENTRIES / SHARDS {
                return;
            }
        }
        let table = &mut shard.table;
        let entry = Entry {
            hash,
            scope: Part::of(b.key.scope),
            rule: Part::of(b.key.rule),
            identity: b.key.identity.map(Part::of),
            operation: b.key.operation.map(Part::of),
            shape: b.shape,
            cost: b.cost,
            reserve: b.reserve,
            retry_at: sent + wait,
            until: sent + wait.min(MAX_HOLD),
            full_at: sent + reset_after,
            budget_left: b.window.map(|_| remaining),
        };
        match table.find_entry(hash, |e| e.is(b)) {
            Ok(mut old) => *old.get_mut() = entry,
            Err(_) => {
                table.insert_unique(hash, entry, |e| e.hash);
            }
        }
    }

    /// Drops the entries of `buckets`. After a take through this replica, a
    /// denial held for another cost would wait too little: still a correct
    /// denial, but no longer the exact retry_after this replica's own takes
    /// allow it to give. After a refund, it could wait too long.
    fn forget<'b, 'k: 'b>(&self, buckets: impl IntoIterator<Item = &'b BucketCharge<'k>>) {
        for b in buckets {
            let hash = self.hash(b);
            let mut shard = self.shard(hash).lock();
            if let Ok(entry) = shard.table.find_entry(hash, |e| e.is(b)) {
                entry.remove();
            }
        }
    }

    fn clear(&self) {
        for shard in self.shards.iter() {
            shard.lock().table.clear();
        }
    }
}

impl<S: Store> DenyCache<S> {
    /// One charge: the local answer if the cache has one, else `ask` the
    /// store and learn from its answer.
    async fn one<F, Fut>(&self, charge: &Charge<'_>, ask: F) -> Result<ChargeOutcome, StoreError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<ChargeOutcome, StoreError>>,
    {
        let Some(cache) = &self.cache else {
            return ask().await;
        };
        let sent = Instant::now();
        if let Some(local) = cache.answer(charge, sent) {
            return Ok(local);
        }
        let outcome = ask().await?;
        cache.learn(charge, &outcome, sent);
        Ok(outcome)
    }
}

impl<S: Store> Store for DenyCache<S> {
    /// Leases pass through: the cache knows buckets only.
    async fn lease(&self, call: &super::LeaseCall<'_>) -> Result<super::LeaseOutcome, StoreError> {
        self.inner.lease(call).await
    }

    /// Quota demand passes through: it takes no tokens.
    async fn demand(
        &self,
        call: &super::DemandCall<'_>,
    ) -> Result<super::DemandAnswer, StoreError> {
        self.inner.demand(call).await
    }

    async fn check_and_take_each(
        &self,
        charges: &[Charge<'_>],
    ) -> Vec<Result<ChargeOutcome, StoreError>> {
        let Some(cache) = &self.cache else {
            return self.inner.check_and_take_each(charges).await;
        };
        let sent = Instant::now();
        let local: Vec<Option<ChargeOutcome>> =
            charges.iter().map(|c| cache.answer(c, sent)).collect();
        ask_the_rest(&self.inner, charges, local, |charge, outcome| {
            cache.learn(charge, outcome, sent);
        })
        .await
    }

    async fn check_and_take_one(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, StoreError> {
        self.one(charge, || self.inner.check_and_take_one(charge))
            .await
    }

    async fn settle(&self, settlement: &Settlement<'_>) -> Result<Settled, StoreError> {
        let settled = self.inner.settle(settlement).await;
        if let (Some(cache), Ok(Settled::Applied(_))) = (&self.cache, &settled) {
            // A refund may bring tokens back before a held denial's deadline.
            cache.forget(settlement.buckets.iter().map(|b| &b.charge));
        }
        settled
    }

    async fn penalties(&self, op: &PenaltyOp<'_>) -> Result<PenaltyAnswer, StoreError> {
        self.inner.penalties(op).await
    }

    fn is_available(&self) -> bool {
        self.inner.is_available()
    }

    fn rules_replaced(&self, scopes: &[&str]) {
        if let Some(cache) = &self.cache {
            cache.clear();
        }
        self.inner.rules_replaced(scopes);
    }

    fn condition(&self) -> super::Condition {
        self.inner.condition()
    }
}

/// Answers `charges` from `local` where it holds an answer, and asks
/// `inner` for the others in one call, handing each store answer to
/// `learn`: what a cache in front of a store does with a batch. Per charge:
/// a failed charge teaches nothing, and never hides the others' outcomes.
pub(super) async fn ask_the_rest<S: Store>(
    inner: &S,
    charges: &[Charge<'_>],
    local: Vec<Option<ChargeOutcome>>,
    mut learn: impl FnMut(&Charge<'_>, &ChargeOutcome),
) -> Vec<Result<ChargeOutcome, StoreError>> {
    if local.iter().all(Option::is_none) {
        // Nothing answered here: ask for the batch as it is, uncopied.
        let answers = inner.check_and_take_each(charges).await;
        for (charge, outcome) in charges.iter().zip(&answers) {
            if let Ok(outcome) = outcome {
                learn(charge, outcome);
            }
        }
        return answers;
    }
    let asked: Vec<Charge<'_>> = charges
        .iter()
        .zip(&local)
        .filter(|(_, l)| l.is_none())
        .map(|(c, _)| c.clone())
        .collect();
    let answers = if asked.is_empty() {
        Vec::new()
    } else {
        inner.check_and_take_each(&asked).await
    };
    for (charge, outcome) in asked.iter().zip(&answers) {
        if let Ok(outcome) = outcome {
            learn(charge, outcome);
        }
    }
    let mut answers = answers.into_iter();
    local
        .into_iter()
        .map(|l| match l {
            Some(local) => Ok(local),
            None => answers
                .next()
                .unwrap_or_else(|| Err(StoreError::permanent("store returned too few outcomes"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_with_every_part_at_its_longest_kept_fits_its_bound() {
        // Four parts of MAX_KEPT bytes; a longer one is a digest inline.
        let most = std::mem::size_of::<Entry>() + 4 * MAX_KEPT;
        assert!(most <= MAX_ENTRY_BYTES, "{most} > {MAX_ENTRY_BYTES}");
    }
}
