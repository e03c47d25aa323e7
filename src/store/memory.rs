//! The embedded store: sharded in-memory buckets, bounded by activity.
//!
//! Buckets are spread over shards by key hash, each shard a short critical
//! section behind its own mutex, so concurrent decisions on different keys
//! rarely meet. A charge that spans shards locks them in index order, which
//! keeps multi-bucket decisions atomic without deadlock.
//!
//! Time comes from `tokio::time`, so tests can pause and advance it.
//!
//! # Room per scope
//! `max_bytes` bounds the store; half of it is reserved, split evenly
//! among the configured scopes, and the other half is shared, first come.
//! A scope may always grow into its own reservation, and into the shared
//! half only while the others' unused reservations stay free: so one
//! scope's traffic, however many new identities it sends, can never take
//! the room another scope's limits need ([`Room`]).

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use hashbrown::HashTable;
use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;
use tokio::time::Instant;

use super::keys::KeyPart;
use super::lease::{LeaseCall, LeaseOp, LeaseOutcome, Pool};
use super::penalty::{
    Ban, BanCursor, BanEntry, BanPosition, Penalty, PenaltyAnswer, PenaltyKey, PenaltyOp,
    PenaltyOutcome, Record,
};
use super::{
    BucketCharge, BucketOutcome, Charge, ChargeOutcome, Condition, Settled, Settlement, Store,
    StoreError,
};
use crate::bucket::{Ledger, Mark, Tat, Verdict};
use crate::config::{DEFAULT_MAX_BYTES, DEFAULT_SHARDS};

/// Most decisions touch a handful of buckets; up to this many stay on the stack.
const INLINE: usize = 4;

/// One bucket's state, with its key's hash kept so the table never rehashes keys.
#[derive(Debug)]
struct Entry {
    hash: u64,
    key: Box<[u8]>,
    tat: Tat,
    /// Refunds given since the bucket was made (see [`Ledger`]).
    ledger: Ledger,
}

type Table = HashTable<Entry>;

/// The embedded, in-process store.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shards: Box<[Mutex<Table>]>,
    /// Seeded per process (SipHash), so callers cannot aim many keys at one
    /// shard or one probe chain.
    hasher: RandomState,
    /// The clock's zero: ticks are nanoseconds since the Unix epoch,
    /// counted as `wall_at_epoch` plus the monotonic (tokio) time since
    /// `epoch`. Monotonic, so a wall-clock step never moves a bucket, and
    /// paused tokio time moves it in tests; wall-based, so budgets' calendar
    /// windows and reservations' deadlines have a date.
    epoch: Instant,
    /// The wall clock at `epoch`, nanoseconds since the Unix epoch.
    wall_at_epoch: u64,
    /// Concurrency pools with a live lease (see [`super::lease`]); an
    /// emptied pool is dropped, so this holds active pools only.
    leases: Mutex<hashbrown::HashMap<Box<[u8]>, Pool>>,
    /// Open reservations' ids, each kept until its deadline (ticks) or its
    /// settle, which removes it: only an open id settles, so a reservation
    /// settles at most once. Counted in `held`.
    open: Mutex<std::collections::HashMap<[u8; 16], u64>>,
    /// Bytes held now by buckets, across shards, as [`MemoryStore::bytes_of`]
    /// counts them.
    held: AtomicUsize,
    /// The most bytes held at once. A charge that would create buckets
    /// beyond it fails as a store error (and the scope's failure mode
    /// decides), so memory stays bounded even when every caller is new and
    /// sends the longest keys it may.
    max_bytes: usize,
    /// Bucket bytes per scope, and the room kept for each configured one.
    room: Mutex<Room>,
    /// Penalty-box records by caller (see [`super::penalty`]), each with
    /// when it may be forgotten, in shards by key hash. A charge that
    /// carries a penalty locks its caller's shard before any bucket's, and
    /// holds it through its decision, so the ban check, the charge and the
    /// strike are one step. Counted in `held` and in its scope's room like
    /// buckets.
    penalties: Box<[Mutex<Records>]>,
}

/// Penalty-box records by their key ([`penalty_key`]), each with the tick
/// after which it may be forgotten, and the reason of the operator's ban
/// with that ban's end (it names no later ban).
type Records = std::collections::HashMap<Box<[u8]>, (Record, u64, Option<(u64, Box<str>)>)>;

/// The bytes a penalty record keyed `key` with `reason` accounts for.
fn record_bytes(key: &[u8], reason: Option<&(u64, Box<str>)>) -> usize {
    PENALTY_OVERHEAD + key.len() + reason.map_or(0, |(_, r)| r.len())
}

/// Bucket bytes per scope, and the room reserved for each configured scope.
///
/// A scope may add `bytes` when, after it, the store's buckets plus every
/// *other* configured scope's unused reservation still fit `max_bytes`. So
/// each configured scope can always fill its own reservation (half the
/// store over the number of scopes), whatever the others did; a scope alone
/// can use the whole store but the others' reservations.
///
/// Kept under one short lock, taken only when buckets are made or swept,
/// never on a decision that finds its buckets.
#[derive(Debug, Default)]
struct Room {
    /// Bucket bytes held per scope name (only configured scopes reach the
    /// store, so the names are bounded by the config's history), and
    /// whether the scope is configured now (and so has a reservation).
    scopes: hashbrown::HashMap<Box<[u8]>, (usize, bool)>,
    /// Bytes reserved for each configured scope.
    reserve: usize,
    /// The configured scopes' unused reservations, summed.
    unused: usize,
    /// Bucket bytes held, all scopes.
    total: usize,
}

impl Room {
    /// A configured scope's unused reservation.
    fn unused_of(&self, held: usize, configured: bool) -> usize {
        if configured {
            self.reserve.saturating_sub(held)
        } else {
            0
        }
    }

    /// Takes `bytes` for `scope` if the others' unused reservations still
    /// fit beside them in `max`.
    fn take(&mut self, scope: &[u8], bytes: usize, max: usize) -> bool {
        let (held, configured) = self.scopes.get(scope).copied().unwrap_or((0, false));
        let own_before = self.unused_of(held, configured);
        let others = self.unused - own_before;
        if self.total + bytes + others > max {
            return false;
        }
        let own_after = self.unused_of(held + bytes, configured);
        self.unused = others + own_after;
        self.total += bytes;
        match self.scopes.get_mut(scope) {
            Some(entry) => entry.0 = held + bytes,
            None => {
                self.scopes.insert(scope.into(), (bytes, false));
            }
        }
        true
    }

    /// Gives back `bytes` of `scope`'s.
    fn give(&mut self, scope: &[u8], bytes: usize) {
        if let Some((held, configured)) = self.scopes.get(scope).copied() {
            let own_before = self.unused_of(held, configured);
            let after = held.saturating_sub(bytes);
            self.unused = self.unused - own_before + self.unused_of(after, configured);
            self.total = self.total.saturating_sub(held - after);
            if let Some(entry) = self.scopes.get_mut(scope) {
                entry.0 = after;
            }
        }
    }

    /// The configured scopes are now `names`: half of `max` is reserved,
    /// split evenly among them.
    fn configure(&mut self, names: &[&str], max: usize) {
        self.reserve = max / 2 / names.len().max(1);
        for (_, configured) in self.scopes.values_mut() {
            *configured = false;
        }
        for name in names {
            self.scopes
                .entry(name.as_bytes().into())
                .or_insert((0, false))
                .1 = true;
        }
        // Scopes gone from the config and holding nothing are forgotten.
        self.scopes
            .retain(|_, (held, configured)| *configured || *held > 0);
        self.unused = self
            .scopes
            .values()
            .map(|&(held, configured)| self.unused_of(held, configured))
            .sum();
    }
}

/// The scope part of a key [`encode`] made: the first part, plain.
fn scope_of(key: &[u8]) -> &[u8] {
    let len = key
        .get(17..21)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, |b| u32::from_le_bytes(b) as usize);
    key.get(21..21 + len).unwrap_or_default()
}

/// What one bucket costs besides its key, in bytes: the entry in its table
/// (hash, boxed key, state, ledger: 64 B) at the table's load factor and growth
/// slack, and the key's own allocation. `cargo bench --bench limiter`
/// measured 150 B of RSS per bucket over a million buckets with 12-byte
/// identities (keys of 55 bytes) before the ledger's 24 bytes joined the
/// entry; the bound counts such a bucket as 199, so it errs high.
pub const BUCKET_OVERHEAD: usize = 144;

impl MemoryStore {
    /// A store with `shards` shards (rounded up to a power of two) and the
    /// default bound on bytes.
    pub fn new(shards: usize) -> Self {
        Self::with_max_bytes(shards, DEFAULT_MAX_BYTES)
    }

    /// A store whose buckets hold at most `max_bytes` bytes at once.
    #[expect(
        clippy::disallowed_methods,
        reason = "the embedded store is the store: its clock starts at the wall clock, once, then runs on tokio's monotonic time"
    )]
    pub fn with_max_bytes(shards: usize, max_bytes: usize) -> Self {
        Self::with_wall_clock(shards, max_bytes, std::time::SystemTime::now())
    }

    /// [`MemoryStore::with_max_bytes`], with the store's clock starting at
    /// `wall` (its ticks then follow tokio's monotonic time). Lets tests put
    /// a budget's window boundary where they want it.
    pub fn with_wall_clock(shards: usize, max_bytes: usize, wall: std::time::SystemTime) -> Self {
        let n = shards.max(1).next_power_of_two();
        let wall_at_epoch = wall
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Self {
            inner: Arc::new(Inner {
                shards: (0..n).map(|_| Mutex::new(HashTable::new())).collect(),
                hasher: RandomState::new(),
                epoch: Instant::now(),
                wall_at_epoch,
                leases: Mutex::default(),
                open: Mutex::default(),
                held: AtomicUsize::new(0),
                max_bytes,
                room: Mutex::default(),
                penalties: (0..PENALTY_SHARDS).map(|_| Mutex::default()).collect(),
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

    /// What holding `bucket` costs against the bound, in bytes: its key as
    /// stored (long caller parts hashed) plus [`BUCKET_OVERHEAD`].
    pub fn bytes_of(bucket: &BucketCharge<'_>) -> usize {
        BUCKET_OVERHEAD + encoded_len(bucket)
    }

    /// Bytes held now by buckets, as [`MemoryStore::bytes_of`] counts them.
    pub fn bytes_held(&self) -> usize {
        self.inner.held.load(Ordering::Relaxed)
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
    /// Fails only when the charge would create buckets beyond the bound.
    pub fn decide(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, StoreError> {
        self.inner.decide(charge)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(DEFAULT_SHARDS)
    }
}

/// Where one bucket of a charge lives.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Its key: `buf[start..end]`.
    start: usize,
    end: usize,
    hash: u64,
    shard: usize,
}

impl Inner {
    fn now(&self) -> u64 {
        let ns = Instant::now().duration_since(self.epoch).as_nanos();
        // Tick zero means "absent" (TAT 0 is far in the past, a full bucket).
        u64::try_from(ns)
            .unwrap_or(u64::MAX)
            .saturating_add(self.wall_at_epoch)
    }

    fn sweep(&self) -> usize {
        let now = self.now();
        let mut left = 0;
        for shard in self.shards.iter() {
            let mut table = shard.lock();
            let mut freed = 0;
            let mut room = self.room.lock();
            table.retain(|e| {
                let keep = !e.tat.is_full_at(now);
                if !keep {
                    let bytes = BUCKET_OVERHEAD + e.key.len();
                    freed += bytes;
                    room.give(scope_of(&e.key), bytes);
                }
                keep
            });
            drop(room);
            self.held.fetch_sub(freed, Ordering::Relaxed);
            left += table.len();
        }
        self.sweep_penalties(now);
        let mut open = self.open.lock();
        let before = open.len();
        open.retain(|_, deadline| *deadline >= now);
        self.held
            .fetch_sub((before - open.len()) * MARKER_BYTES, Ordering::Relaxed);
        left
    }

    fn decide(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, StoreError> {
        match &charge.lease {
            Some(lease) => self.decide_leased(charge, lease),
            None => self.decide_unleased(charge),
        }
    }

    fn decide_unleased(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, StoreError> {
        match &charge.penalty {
            Some(penalty) => self.decide_penalized(charge, penalty),
            None => self.decide_plain(charge),
        }
    }

    fn decide_plain(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, StoreError> {
        let Some(open) = charge.open.filter(|_| !charge.dry_run) else {
            return self.decide_any(charge);
        };
        // Room for the record first: a full store takes nothing. The record
        // goes in before the outcome (and so the id) is out: no settle can
        // look for it in between.
        if self.held.fetch_add(MARKER_BYTES, Ordering::Relaxed) + MARKER_BYTES > self.max_bytes {
            self.held.fetch_sub(MARKER_BYTES, Ordering::Relaxed);
            return Err(self.full());
        }
        let outcome = self.decide_any(charge);
        match &outcome {
            Ok(o) if o.allowed => {
                let deadline = o.now_us.saturating_add(open.within_us);
                let ticks = deadline.saturating_mul(1_000).saturating_add(999);
                if self.open.lock().insert(open.id, ticks).is_some() {
                    self.held.fetch_sub(MARKER_BYTES, Ordering::Relaxed);
                }
            }
            _ => {
                self.held.fetch_sub(MARKER_BYTES, Ordering::Relaxed);
            }
        }
        outcome
    }

    fn decide_any(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, StoreError> {
        if let [bucket] = charge.buckets.as_slice() {
            return self.decide_one(bucket, charge.dry_run);
        }
        let mut buf: SmallVec<[u8; 256]> = SmallVec::new();
        let slots = self.slots(charge, &mut buf);
        // Every shard the charge touches, locked before reading any state:
        // no one else's write can land between the check and the take.
        let mut guards = self.lock(&slots);
        let now = self.now();

        let mut verdicts: SmallVec<[(Verdict, bool, Ledger); INLINE]> = SmallVec::new();
        let mut allowed = true;
        // Shaping: the largest wait of the buckets, the request's release.
        let mut wait = 0;
        for (bucket, slot) in charge.buckets.iter().zip(&slots) {
            let key = &buf[slot.start..slot.end];
            let table = guard_for(&mut guards, slot.shard);
            let found = table
                .find(slot.hash, |e| *e.key == *key)
                .map(|e| (e.tat, e.ledger));
            let stored = found.map(|(tat, _)| tat).unwrap_or_default();
            let (verdict, own) = bucket.judge_shaped(stored, now, window_end(bucket, now), 1);
            allowed &= verdict.conforms || bucket.shadow;
            wait = wait.max(own);
            let ledger = found.map_or_else(|| Ledger::new(now), |(_, l)| l);
            verdicts.push((verdict, found.is_none(), ledger));
        }

        let take = allowed && !charge.dry_run;
        // Only buckets that will be inserted count: an absent shadow bucket
        // that cannot hold its cost is judged but never written, and counting
        // it would leak room in the bound for good (the sweeper only gives
        // back what it removes).
        let new: SmallVec<[(&[u8], usize); INLINE]> = verdicts
            .iter()
            .zip(&slots)
            .filter(|((v, absent, _), _)| take && *absent && v.conforms)
            .map(|(_, slot)| {
                let key = &buf[slot.start..slot.end];
                (scope_of(key), BUCKET_OVERHEAD + key.len())
            })
            .collect();
        // Reserve room before writing any: a full store fails it, taking nothing.
        self.make_room(&new)?;
        let mut outcomes = SmallVec::with_capacity(slots.len());
        for ((bucket, (verdict, _, ledger)), slot) in
            charge.buckets.iter().zip(&verdicts).zip(&slots)
        {
            let taken = take && verdict.conforms;
            let state = if taken {
                bucket.taken_at(verdict, now, wait)
            } else {
                verdict.before
            };
            let mark = Mark {
                taken: state,
                ledger: *ledger,
            };
            if taken {
                let key = &buf[slot.start..slot.end];
                let table = guard_for(&mut guards, slot.shard);
                match table.find_mut(slot.hash, |e| *e.key == *key) {
                    Some(e) => e.tat = state,
                    None => insert(table, slot.hash, key, mark),
                }
            }
            outcomes.push(outcome(bucket, verdict, mark, now));
        }
        Ok(ChargeOutcome {
            allowed,
            buckets: outcomes,
            now_us: now / 1_000,
            delay: Duration::from_nanos(if allowed { wait } else { 0 }),
            lease: None,
            penalty: Default::default(),
        })
    }

    /// Locks the shards of `slots`, each once, in index order, which keeps
    /// charges that span shards free of deadlock.
    fn lock(&self, slots: &[Slot]) -> SmallVec<[(usize, MutexGuard<'_, Table>); INLINE]> {
        let mut order: SmallVec<[usize; INLINE]> = slots.iter().map(|s| s.shard).collect();
        order.sort_unstable();
        order.dedup();
        order.iter().map(|&i| (i, self.shards[i].lock())).collect()
    }

    /// Encodes every key of `charge` into `buf` and hashes each once.
    fn slots(
        &self,
        charge: &Charge<'_>,
        buf: &mut SmallVec<[u8; 256]>,
    ) -> SmallVec<[Slot; INLINE]> {
        let mask = self.shards.len() - 1;
        charge
            .buckets
            .iter()
            .map(|bucket| {
                let start = buf.len();
                encode(buf, bucket);
                let hash = self.hasher.hash_one(&buf[start..]);
                Slot {
                    start,
                    end: buf.len(),
                    hash,
                    // The table uses the low bits; the shard takes higher ones.
                    shard: (hash >> 40) as usize & mask,
                }
            })
            .collect()
    }
}

/// The most concurrency pools with a live lease the embedded store holds;
/// an acquire that would open one more fails alone (a permanent error).
pub const MAX_LEASE_POOLS: usize = 100_000;

impl Inner {
    /// Applies one lease call under the pools' lock, at one instant of the
    /// store's clock (microseconds, as on Redis).
    fn lease(&self, call: &LeaseCall<'_>) -> Result<LeaseOutcome, StoreError> {
        let now_us = self.now() / 1_000;
        let key = pool_key(call);
        let mut pools = self.leases.lock();
        if !pools.contains_key(&key) {
            if !matches!(call.op, LeaseOp::Acquire { .. }) {
                return Ok(Pool::default().apply(call, now_us));
            }
            if pools.len() >= MAX_LEASE_POOLS {
                return Err(pools_full());
            }
        }
        let pool = pools.entry(key.clone()).or_default();
        let outcome = pool.apply(call, now_us);
        if pool.is_empty() {
            pools.remove(&key);
        }
        Ok(outcome)
    }
}

impl Inner {
    /// A charge with a lease: the pool judged and the charge decided under
    /// the pools' lock, so no lease call meets the pool between the two;
    /// the lease is recorded only when the charge took. A pool without
    /// room turns the charge into a dry run (judged, nothing taken).
    fn decide_leased(
        &self,
        charge: &Charge<'_>,
        lease: &LeaseCall<'_>,
    ) -> Result<ChargeOutcome, StoreError> {
        let LeaseOp::Acquire {
            limit,
            weight,
            reserve,
            ttl_us,
            ..
        } = lease.op
        else {
            return Err(StoreError::permanent("a charge's lease must be an acquire"));
        };
        let acquire = |dry_run| LeaseCall {
            op: LeaseOp::Acquire {
                limit,
                weight,
                reserve,
                ttl_us,
                dry_run,
            },
            ..*lease
        };
        let key = pool_key(lease);
        let mut pools = self.leases.lock();
        if !pools.contains_key(&key) && pools.len() >= MAX_LEASE_POOLS {
            return Err(pools_full());
        }
        let now_us = self.now() / 1_000;
        let pool = pools.entry(key.clone()).or_default();
        let mut judged = pool.apply(&acquire(true), now_us);
        let inner = Charge {
            lease: None,
            dry_run: charge.dry_run || !judged.ok,
            ..charge.clone()
        };
        let outcome = self.decide_unleased(&inner).map(|mut o| {
            if !judged.ok {
                o.allowed = false;
                o.delay = Duration::ZERO;
            }
            if o.allowed && !charge.dry_run {
                let taken = pool.apply(&acquire(false), now_us);
                (judged.in_flight, judged.expires_at_us) = (taken.in_flight, taken.expires_at_us);
            }
            let banned = o.penalty.banned.is_some_and(|b| !b.started);
            o.lease = (!banned).then_some(judged);
            o
        });
        if pool.is_empty() {
            pools.remove(&key);
        }
        outcome
    }
}

/// The error of an acquire that would open one pool too many.
fn pools_full() -> StoreError {
    StoreError::permanent("the embedded store holds its most concurrency pools")
}

/// A pool's key: scope, rule and the caller's parts (long ones hashed),
/// each length-prefixed so no value can reach another pool.
fn pool_key(call: &LeaseCall<'_>) -> Box<[u8]> {
    let pool = &call.pool;
    let mut out = Vec::with_capacity(64 + pool.scope.len() + pool.rule.len());
    let mut push = |tag: u8, bytes: &[u8]| {
        out.push(tag);
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    push(b's', pool.scope.as_bytes());
    push(b'r', pool.rule.as_bytes());
    for part in [pool.identity, pool.operation] {
        match KeyPart::of(part) {
            KeyPart::Absent => push(b'a', &[]),
            KeyPart::Plain(v) => push(b'p', v.as_bytes()),
            KeyPart::Hashed(h) => push(b'h', &h),
        }
    }
    out.into_boxed_slice()
}

/// What the store reports of one bucket left as `mark` says at `now`.
fn outcome(bucket: &BucketCharge<'_>, verdict: &Verdict, mark: Mark, now: u64) -> BucketOutcome {
    bucket.outcome(verdict.conforms, verdict.retry_after, mark, now, 1)
}

/// The end of a budget's current window at `now` (ticks are Unix
/// nanoseconds); 0 for a token bucket, which has none.
fn window_end(bucket: &BucketCharge<'_>, now: u64) -> u64 {
    bucket.window.map_or(0, |w| w.bounds(now).1)
}

/// What remembering one open reservation costs against the bound.
const MARKER_BYTES: usize = 64;

/// Shards of penalty records: boxed callers' charges rarely meet on one.
const PENALTY_SHARDS: usize = 16;

/// What one penalty record costs against the bound besides its key: the
/// record and its deadline (48 B) in a `HashMap` entry at its load factor,
/// and the key's allocation; counted high like [`BUCKET_OVERHEAD`].
pub const PENALTY_OVERHEAD: usize = 144;

/// A penalty record's key: its scope, identity (hashed when long) and
/// operation, each tagged and length-prefixed like a bucket's parts.
fn penalty_key(key: &PenaltyKey<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + key.scope.len());
    for part in [
        KeyPart::Plain(key.scope),
        KeyPart::of(Some(key.identity)),
        KeyPart::of(key.operation),
    ] {
        match part {
            KeyPart::Absent => out.push(0),
            KeyPart::Plain(s) => {
                out.push(1);
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            KeyPart::Hashed(h) => {
                out.push(2);
                out.extend_from_slice(&h);
            }
        }
    }
    out
}

/// The outcome of a charge whose caller is banned until `until` (ticks).
fn banned(until: u64, now: u64, started: bool) -> PenaltyOutcome {
    PenaltyOutcome {
        banned: Some(Ban {
            retry_after: Duration::from_nanos(until.saturating_sub(now)),
            until_us: until / 1_000,
            started,
        }),
        struck: started,
    }
}

/// True when `outcome` is a denial by a bucket whose denial strikes.
fn strikes(penalty: &Penalty<'_>, outcome: &ChargeOutcome) -> bool {
    !outcome.allowed
        && outcome
            .buckets
            .iter()
            .zip(&penalty.strikes_from)
            .any(|(b, &strikes)| strikes && !b.conforms)
}

impl Inner {
    /// A charge behind a penalty box: the ban check, the charge and the
    /// strike under the penalty lock, so they are one step.
    fn decide_penalized(
        &self,
        charge: &Charge<'_>,
        penalty: &Penalty<'_>,
    ) -> Result<ChargeOutcome, StoreError> {
        let key = penalty_key(&penalty.key);
        let mut records = self.penalty_shard(&key).lock();
        let now = self.now();
        let found = records.get(key.as_slice()).map(|(r, _, _)| *r);
        let mut record = found.unwrap_or_default();
        if record.banned_at(now) {
            return Ok(ChargeOutcome {
                allowed: false,
                buckets: SmallVec::new(),
                now_us: now / 1_000,
                delay: std::time::Duration::ZERO,
                lease: None,
                penalty: banned(record.ban_until, now, false),
            });
        }
        let mut outcome = self.decide_plain(charge)?;
        if !penalty.forced && (charge.dry_run || !strikes(penalty, &outcome)) {
            return Ok(outcome);
        }
        let scope = penalty.key.scope.as_bytes();
        // A full store counts no strike for a caller it holds no record
        // of: the denial stands, and nothing else changes.
        if found.is_none()
            && self
                .make_room(&[(scope, PENALTY_OVERHEAD + key.len())])
                .is_err()
        {
            return Ok(outcome);
        }
        let started = record.strike(&penalty.rule, now);
        let forget_at = record.forget_at(&penalty.rule);
        match records.get_mut(key.as_slice()) {
            Some(held) => (held.0, held.1) = (record, forget_at),
            None => {
                records.insert(key.into(), (record, forget_at, None));
            }
        }
        outcome.penalty = if started {
            banned(record.ban_until, now, true)
        } else {
            PenaltyOutcome {
                banned: None,
                struck: true,
            }
        };
        Ok(outcome)
    }

    /// The shard that holds the record keyed `key`.
    fn penalty_shard(&self, key: &[u8]) -> &Mutex<Records> {
        &self.penalties[(self.hasher.hash_one(key) >> 40) as usize % PENALTY_SHARDS]
    }

    /// Forgets the penalty records that mean nothing at `now` any more.
    fn sweep_penalties(&self, now: u64) {
        let mut freed: Vec<(Box<[u8]>, usize)> = Vec::new();
        for shard in self.penalties.iter() {
            shard.lock().retain(|key, (_, forget_at, reason)| {
                let keep = *forget_at > now;
                if !keep {
                    freed.push((key.clone(), record_bytes(key, reason.as_ref())));
                }
                keep
            });
        }
        let mut room = self.room.lock();
        for (key, bytes) in freed {
            room.give(penalty_scope(&key), bytes);
            self.held.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

impl Inner {
    /// An operator's ban, unban or listing, under the caller's shard's
    /// lock (a listing: each shard's in turn).
    fn penalties(&self, op: &PenaltyOp<'_>) -> Result<PenaltyAnswer, StoreError> {
        let now = self.now();
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        match *op {
            PenaltyOp::Ban {
                key,
                duration,
                forget,
                reason,
            } => {
                let k = penalty_key(&key);
                let mut records = self.penalty_shard(&k).lock();
                let found = records.remove(k.as_slice());
                let (mut record, forget_at, old) = found.clone().unwrap_or_default();
                record.ban_until = now.saturating_add(ns(duration));
                let why = (!reason.is_empty()).then(|| (record.ban_until, reason.into()));
                let (had, needs) = (
                    found.as_ref().map_or(0, |_| record_bytes(&k, old.as_ref())),
                    record_bytes(&k, why.as_ref()),
                );
                if let Err(e) = self.resize(key.scope.as_bytes(), had, needs) {
                    if let Some(found) = found {
                        records.insert(k.into(), found);
                    }
                    return Err(e);
                }
                let keep = record.ban_until.saturating_add(ns(forget)).max(forget_at);
                records.insert(k.into(), (record, keep, why));
                Ok(PenaltyAnswer::Banned(Ban {
                    retry_after: duration,
                    until_us: record.ban_until / 1_000,
                    started: true,
                }))
            }
            PenaltyOp::Unban { key } => {
                let k = penalty_key(&key);
                let gone = self.penalty_shard(&k).lock().remove(k.as_slice());
                if let Some((_, _, reason)) = &gone {
                    let bytes = record_bytes(&k, reason.as_ref());
                    self.room.lock().give(key.scope.as_bytes(), bytes);
                    self.held.fetch_sub(bytes, Ordering::Relaxed);
                }
                Ok(PenaltyAnswer::Unbanned(
                    gone.is_some_and(|(r, _, _)| r.banned_at(now)),
                ))
            }
            PenaltyOp::List {
                scope,
                after,
                limit,
            } => Ok(self.list_bans(scope, now, after, limit)),
        }
    }
}

impl Inner {
    /// A page of `scope`'s bans in force at `now`, by ban end then caller.
    fn list_bans(
        &self,
        scope: &str,
        now: u64,
        after: Option<BanCursor<'_>>,
        limit: u64,
    ) -> PenaltyAnswer {
        let mut bans: Vec<Listed> = Vec::new();
        for shard in self.penalties.iter() {
            bans.extend(
                shard
                    .lock()
                    .iter()
                    .filter(|(k, (r, _, _))| {
                        r.banned_at(now) && penalty_scope(k) == scope.as_bytes()
                    })
                    .map(|(k, (r, _, why))| {
                        // A reason names the ban it came with, not a later one.
                        let reason = why.as_ref().filter(|(until, _)| *until == r.ban_until);
                        (r.ban_until, k.clone(), reason.map(|(_, r)| r.clone()))
                    }),
            );
        }
        bans.sort_unstable();
        page_of(bans, now, after, limit)
    }
}

/// A ban listed: its end, its record's key, its reason.
type Listed = (u64, Box<[u8]>, Option<Box<str>>);

/// The page of `bans` (ban end and key, sorted) after `after`.
fn page_of(bans: Vec<Listed>, now: u64, after: Option<BanCursor<'_>>, limit: u64) -> PenaltyAnswer {
    let total = bans.len() as u64;
    let from = after.map_or(0, |c| {
        bans.partition_point(|(until, key, _)| {
            BanCursor {
                until: *until,
                caller: key,
            } <= c
        })
    });
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = bans.len().saturating_sub(from) > limit;
    let page = bans
        .into_iter()
        .skip(from)
        .take(limit)
        .map(|(until, key, reason)| {
            let (identity, operation) = penalty_caller(&key);
            BanEntry {
                identity,
                operation,
                remaining: Duration::from_nanos(until - now),
                until_us: until / 1_000,
                position: BanPosition {
                    until,
                    caller: key.into_vec(),
                },
                reason: reason.map(String::from).unwrap_or_default(),
            }
        })
        .collect();
    PenaltyAnswer::Listed {
        total,
        bans: page,
        more,
    }
}

/// The identity and operation of a key [`penalty_key`] made, a hashed part
/// as `#` and its SHA-256 in hex.
fn penalty_caller(key: &[u8]) -> (String, Option<String>) {
    let mut at = 0;
    let mut next = || -> Option<String> {
        let tag = *key.get(at)?;
        at += 1;
        match tag {
            1 => {
                let len = u32::from_le_bytes(key.get(at..at + 4)?.try_into().ok()?) as usize;
                let text = key.get(at + 4..at + 4 + len)?;
                at += 4 + len;
                Some(String::from_utf8_lossy(text).into_owned())
            }
            2 => {
                let hash = key.get(at..at + 32)?;
                at += 32;
                Some(format!("#{}", hex(hash)))
            }
            _ => None,
        }
    };
    let _scope = next();
    let identity = next().unwrap_or_default();
    (identity, next())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The scope of a key [`penalty_key`] made: its first part, plain.
fn penalty_scope(key: &[u8]) -> &[u8] {
    let len = key
        .get(1..5)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, |b| u32::from_le_bytes(b) as usize);
    key.get(5..5 + len).unwrap_or_default()
}

impl Inner {
    /// The common case, one bucket: one key, one lock, no lists.
    fn decide_one(
        &self,
        bucket: &BucketCharge<'_>,
        dry_run: bool,
    ) -> Result<ChargeOutcome, StoreError> {
        // Most keys fit the stack; longer ones (long Envoy descriptors) go
        // to the heap.
        let len = encoded_len(bucket);
        let mut stack = [0u8; 256];
        let mut heap = Vec::new();
        let key: &mut [u8] = if len <= stack.len() {
            &mut stack[..len]
        } else {
            heap.resize(len, 0);
            &mut heap
        };
        encode_into(key, bucket);
        let key = &*key;
        let hash = self.hasher.hash_one(key);
        let mut table = self.shards[(hash >> 40) as usize & (self.shards.len() - 1)].lock();
        let now = self.now();
        let found = table.find_mut(hash, |e| *e.key == *key);
        let (stored, ledger) = found
            .as_ref()
            .map_or_else(|| (Tat::default(), Ledger::new(now)), |e| (e.tat, e.ledger));
        let (verdict, wait) = bucket.judge_shaped(stored, now, window_end(bucket, now), 1);
        let allowed = verdict.conforms || bucket.shadow;
        let taken = allowed && !dry_run && verdict.conforms;
        let mark = Mark {
            taken: if taken {
                bucket.taken_at(&verdict, now, wait)
            } else {
                verdict.before
            },
            ledger,
        };
        if taken {
            match found {
                Some(e) => e.tat = mark.taken,
                None => {
                    self.make_room(&[(scope_of(key), BUCKET_OVERHEAD + key.len())])?;
                    insert(&mut table, hash, key, mark);
                }
            }
        }
        drop(table);
        Ok(ChargeOutcome {
            allowed,
            buckets: smallvec::smallvec![outcome(bucket, &verdict, mark, now)],
            now_us: now / 1_000,
            delay: Duration::from_nanos(if allowed { wait } else { 0 }),
            lease: None,
            penalty: Default::default(),
        })
    }

    /// Applies a settlement: every bucket's shard locked (in index order)
    /// and the open ids locked, so the check that it is open, the changes
    /// and the removal of its record are one step.
    fn settle(&self, settlement: &Settlement<'_>) -> Result<Settled, StoreError> {
        let charge = Charge::of(settlement.buckets.iter().map(|b| b.charge));
        let mut buf: SmallVec<[u8; 256]> = SmallVec::new();
        let slots = self.slots(&charge, &mut buf);
        let mut guards = self.lock(&slots);
        let mut open = self.open.lock();
        let now = self.now();
        if let Some(once) = settlement.once {
            if now / 1_000 > once.deadline_us {
                return Ok(Settled::Expired);
            }
            if !open.contains_key(&once.id) {
                return Ok(Settled::AlreadySettled);
            }
        }
        // Every new state first, so that running out of room changes nothing.
        let mut states: SmallVec<[(Mark, bool); INLINE]> = SmallVec::new();
        let mut new: SmallVec<[(&[u8], usize); INLINE]> = SmallVec::new();
        for (part, slot) in settlement.buckets.iter().zip(&slots) {
            let key = &buf[slot.start..slot.end];
            let table = guard_for(&mut guards, slot.shard);
            let found = table
                .find(slot.hash, |e| *e.key == *key)
                .map(|e| (e.tat, e.ledger));
            let (stored, ledger) = found.unwrap_or_else(|| (Tat::default(), Ledger::new(now)));
            let end = window_end(&part.charge, now);
            let (state, ledger) = part.charge.settle(stored, ledger, now, end, part);
            // An absent bucket is full: only debt needs a new entry.
            let insert = found.is_none() && !state.is_full_at(now);
            if insert {
                new.push((scope_of(key), BUCKET_OVERHEAD + key.len()));
            }
            let mark = Mark {
                taken: state,
                ledger,
            };
            states.push((mark, insert));
        }
        // The open record is already counted: it was made with the charge.
        self.make_room(&new)?;
        let mut outcomes = Vec::with_capacity(slots.len());
        for ((part, slot), &(mark, new)) in settlement.buckets.iter().zip(&slots).zip(&states) {
            let key = &buf[slot.start..slot.end];
            let table = guard_for(&mut guards, slot.shard);
            if new {
                insert(table, slot.hash, key, mark);
            } else if let Some(e) = table.find_mut(slot.hash, |e| *e.key == *key) {
                e.tat = mark.taken;
                e.ledger = mark.ledger;
            }
            outcomes.push(part.charge.outcome(true, None, mark, now, 1));
        }
        if let Some(once) = settlement.once
            && open.remove(&once.id).is_some()
        {
            self.held.fetch_sub(MARKER_BYTES, Ordering::Relaxed);
        }
        Ok(Settled::Applied(outcomes))
    }

    /// Takes room for new buckets (`(scope, bytes)` each), or fails as the
    /// store being full (for that scope) and takes nothing.
    fn make_room(&self, buckets: &[(&[u8], usize)]) -> Result<(), StoreError> {
        let bytes = buckets.iter().map(|(_, b)| b).sum::<usize>();
        if bytes == 0 {
            return Ok(());
        }
        if self.held.fetch_add(bytes, Ordering::Relaxed) + bytes > self.max_bytes {
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            return Err(self.full());
        }
        let mut room = self.room.lock();
        for (i, &(scope, b)) in buckets.iter().enumerate() {
            if !room.take(scope, b, self.max_bytes) {
                for &(scope, b) in &buckets[..i] {
                    room.give(scope, b);
                }
                drop(room);
                self.held.fetch_sub(bytes, Ordering::Relaxed);
                return Err(StoreError::transient(format!(
                    "embedded store full for scope {}: the rest of store.memory.max_bytes \
                     ({}) is kept for the other scopes",
                    String::from_utf8_lossy(scope),
                    self.max_bytes
                )));
            }
        }
        Ok(())
    }

    /// Grows or shrinks what one record of `scope` accounts for, from
    /// `had` bytes to `needs`; refused, as [`Inner::make_room`], when the
    /// store or the scope's room is full.
    fn resize(&self, scope: &[u8], had: usize, needs: usize) -> Result<(), StoreError> {
        if needs > had {
            return self.make_room(&[(scope, needs - had)]);
        }
        let freed = had - needs;
        if freed > 0 {
            self.room.lock().give(scope, freed);
            self.held.fetch_sub(freed, Ordering::Relaxed);
        }
        Ok(())
    }

    fn full(&self) -> StoreError {
        StoreError::transient(format!(
            "embedded store full: {} bytes of buckets held, the most is {} (store.memory.max_bytes)",
            self.held.load(Ordering::Relaxed),
            self.max_bytes
        ))
    }
}

/// Adds a bucket the table does not hold yet.
fn insert(table: &mut Table, hash: u64, key: &[u8], mark: Mark) {
    table.insert_unique(
        hash,
        Entry {
            hash,
            key: key.into(),
            tat: mark.taken,
            ledger: mark.ledger,
        },
        |e| e.hash,
    );
}

fn guard_for<'g, 'm>(
    guards: &'g mut [(usize, MutexGuard<'m, Table>)],
    shard: usize,
) -> &'g mut Table {
    let at = guards.partition_point(|(i, _)| *i < shard);
    &mut guards[at].1
}

/// Bytes of one part of the encoding.
fn part_len(part: KeyPart<'_>) -> usize {
    match part {
        KeyPart::Absent => 1,
        KeyPart::Plain(s) => 5 + s.len(),
        KeyPart::Hashed(h) => 1 + h.len(),
    }
}

/// The parts of a bucket's key: scope and rule (from the config, never
/// hashed), then identity and operation (hashed when long).
fn key_parts<'k>(bucket: &BucketCharge<'k>) -> [KeyPart<'k>; 4] {
    let key = &bucket.key;
    [
        KeyPart::Plain(key.scope),
        KeyPart::Plain(key.rule),
        KeyPart::of(key.identity),
        KeyPart::of(key.operation),
    ]
}

/// The length of [`encode`]'s output for `bucket`.
fn encoded_len(bucket: &BucketCharge<'_>) -> usize {
    16 + key_parts(bucket).into_iter().map(part_len).sum::<usize>()
}

/// [`encode`] into a slice of exactly [`encoded_len`] bytes.
fn encode_into(out: &mut [u8], bucket: &BucketCharge<'_>) {
    // The shape first: a reload that changes a limit starts new buckets.
    out[..8].copy_from_slice(&bucket.shape.capacity.to_le_bytes());
    out[8..16].copy_from_slice(&bucket.shape.period.to_le_bytes());
    let mut at = 16;
    for part in key_parts(bucket) {
        match part {
            KeyPart::Absent => out[at] = 0,
            KeyPart::Plain(s) => {
                out[at] = 1;
                // Parts are validated to far below 4 GiB.
                out[at + 1..at + 5].copy_from_slice(&(s.len() as u32).to_le_bytes());
                out[at + 5..at + 5 + s.len()].copy_from_slice(s.as_bytes());
            }
            KeyPart::Hashed(h) => {
                out[at] = 2;
                out[at + 1..at + 1 + h.len()].copy_from_slice(&h);
            }
        }
        at += part_len(part);
    }
}

/// Encodes a bucket's key unambiguously: its shape, then every part tagged
/// (absent, plain and length-prefixed, or hashed), so no value of one part
/// can spill into the next.
fn encode(out: &mut SmallVec<[u8; 256]>, bucket: &BucketCharge<'_>) {
    let start = out.len();
    out.resize(start + encoded_len(bucket), 0);
    encode_into(&mut out[start..], bucket);
}

impl Store for MemoryStore {
    async fn check_and_take_each(
        &self,
        charges: &[Charge<'_>],
    ) -> Vec<Result<ChargeOutcome, StoreError>> {
        charges.iter().map(|c| self.inner.decide(c)).collect()
    }

    async fn check_and_take_one(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, StoreError> {
        self.inner.decide(charge)
    }

    async fn settle(&self, settlement: &Settlement<'_>) -> Result<Settled, StoreError> {
        self.inner.settle(settlement)
    }

    async fn penalties(&self, op: &PenaltyOp<'_>) -> Result<PenaltyAnswer, StoreError> {
        self.inner.penalties(op)
    }

    /// The embedded store is always available: it lives in this process.
    async fn lease(&self, call: &LeaseCall<'_>) -> Result<LeaseOutcome, StoreError> {
        self.inner.lease(call)
    }

    /// One process is one replica: no others, everything asked granted.
    async fn demand(
        &self,
        call: &crate::store::DemandCall<'_>,
    ) -> Result<crate::store::DemandAnswer, StoreError> {
        Ok(call.alone(self.inner.now() / 1_000))
    }

    fn is_available(&self) -> bool {
        true
    }

    /// Buckets are keyed by their shape, so a reload that changes a limit
    /// starts new ones: nothing derived from the old rules is kept. The
    /// scopes' names set the room each one keeps.
    fn rules_replaced(&self, scopes: &[&str]) {
        self.inner
            .room
            .lock()
            .configure(scopes, self.inner.max_bytes);
    }

    /// It lives in this process: no clock of its own to drift, nothing
    /// evicted behind its back.
    fn condition(&self) -> Condition {
        Condition::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pools_past_the_bound_fail_alone_and_a_freed_one_makes_room() {
        let store = MemoryStore::default();
        fn call(identity: &str, op: LeaseOp) -> LeaseCall<'_> {
            LeaseCall {
                pool: crate::store::BucketKey {
                    scope: "s",
                    rule: "r",
                    identity: Some(identity),
                    operation: None,
                    hash_tag: Default::default(),
                },
                lease_id: "l",
                op,
            }
        }
        let acquire = LeaseOp::Acquire {
            limit: 1,
            weight: 1,
            reserve: 0,
            ttl_us: 60_000_000,
            dry_run: false,
        };
        for i in 0..MAX_LEASE_POOLS {
            let id = i.to_string();
            assert!(store.lease(&call(&id, acquire)).await.unwrap().ok);
        }
        let over = store.lease(&call("one-more", acquire)).await.unwrap_err();
        assert!(!over.transient, "{over}");
        // Renewing or releasing in an absent pool opens none.
        assert!(
            !store
                .lease(&call("one-more", LeaseOp::Release))
                .await
                .unwrap()
                .ok
        );
        assert!(store.lease(&call("0", LeaseOp::Release)).await.unwrap().ok);
        assert!(store.lease(&call("one-more", acquire)).await.unwrap().ok);
    }

    #[test]
    fn a_scope_that_fills_the_store_leaves_the_others_their_reservations() {
        let mut room = Room::default();
        room.configure(&["a", "b", "c"], 600);
        assert_eq!(room.reserve, 100);
        // Alone, `a` gets everything but the others' reservations.
        let mut took = 0;
        while room.take(b"a", 10, 600) {
            took += 10;
        }
        assert_eq!(took, 400);
        for scope in [&b"b"[..], b"c"] {
            for _ in 0..10 {
                assert!(room.take(scope, 10, 600), "within its reservation");
            }
            assert!(!room.take(scope, 10, 600), "the store is full now");
        }
        // What the sweeper gives back is room again, for whoever asks.
        room.give(b"a", 30);
        assert!(room.take(b"b", 30, 600));
        assert_eq!(room.total, 600);
    }

    #[test]
    fn a_reload_moves_the_reservations() {
        let mut room = Room::default();
        room.configure(&["a"], 600);
        assert!(room.take(b"a", 500, 600));
        room.configure(&["a", "b"], 600);
        assert_eq!(room.unused, 150, "b's reservation, unused");
        assert!(
            !room.take(b"a", 10, 600),
            "a is past what leaves b its room"
        );
        assert!(room.take(b"b", 100, 600));
    }

    #[test]
    fn the_scope_is_read_back_from_a_key() {
        let shape = crate::bucket::Shape {
            capacity: 1,
            period: 1,
        };
        let bucket = BucketCharge {
            key: super::super::BucketKey {
                scope: "tenant-a",
                rule: "r",
                identity: Some("x"),
                operation: None,
                hash_tag: Default::default(),
            },
            shape,
            cost: 1,
            shadow: false,
            reserve: 0,
            window: None,
            max_delay: std::time::Duration::ZERO,
        };
        let mut buf = SmallVec::new();
        encode(&mut buf, &bucket);
        assert_eq!(scope_of(&buf), b"tenant-a");
    }

    #[tokio::test]
    async fn an_operators_reason_counts_against_the_bound_and_is_given_back() {
        let store = MemoryStore::with_max_bytes(1, 2_048);
        let key = PenaltyKey {
            scope: "s",
            identity: "bot",
            operation: None,
        };
        let ban = |reason| PenaltyOp::Ban {
            key,
            duration: Duration::from_secs(60),
            forget: Duration::from_secs(60),
            reason,
        };
        let long = "r".repeat(256);
        store.penalties(&ban("")).await.unwrap();
        let bare = store.bytes_held();
        store.penalties(&ban(&long)).await.unwrap();
        assert_eq!(store.bytes_held(), bare + 256, "the reason is counted");
        store.penalties(&ban("short")).await.unwrap();
        assert_eq!(store.bytes_held(), bare + 5, "a shorter one gives back");
        // Past the bound: refused, and the ban and its reason stand.
        let many = "m".repeat(256);
        let full = MemoryStore::with_max_bytes(1, bare + 100);
        full.penalties(&ban("")).await.unwrap();
        assert!(full.penalties(&ban(&many)).await.is_err(), "over the bound");
        let list = PenaltyOp::List {
            scope: "s",
            after: None,
            limit: 10,
        };
        let Ok(PenaltyAnswer::Listed { bans, .. }) = full.penalties(&list).await else {
            panic!("not a listing");
        };
        assert_eq!((bans.len(), bans[0].reason.as_str()), (1, ""));
        store.penalties(&PenaltyOp::Unban { key }).await.unwrap();
        assert_eq!(store.bytes_held(), 0, "an unban gives every byte back");
    }
}
