//! The Redis store: one Lua script decides a batch of charges, each
//! atomically on its own, on standalone Redis, a Sentinel-managed primary, or
//! Redis Cluster.
//!
//! # Fewer round trips than decisions
//! Every charge goes through its node's [`coalesce`] queue: while one script
//! call is in flight, the charges that arrive queue up, and the next call
//! carries all of them (on Cluster, per hash slot). One charge alone goes out
//! at once; under load, one `EVALSHA` decides many. The charges of one
//! [`Store::check_and_take_each`] call join the same queues. Each charge
//! succeeds or fails on its own: a charge whose keys fail (another type)
//! fails alone, and only a call that fails as a whole (a timeout, a lost
//! connection, `READONLY`, `OOM`) fails every charge it carried. On
//! Cluster, each batch is one command to its slot's node, whose
//! redirections are followed one command at a time (see `cluster.rs`).
//!
//! # Atomicity, per topology
//! Every key carries a hash tag (see [`keys`]): its scope, and with the
//! scope's `hash_tag: identity` its identity too. A charge whose buckets
//! share a tag is one script on one node: exactly atomic on standalone, on
//! Sentinel and on Cluster. On Cluster, a charge whose buckets have
//! different tags spans slots: an identity's buckets beside a per-scope one
//! under `hash_tag: identity`, or an atomic batch across scopes. It is
//! decided by *reserve and refund*: each slot's part is one atomic script,
//! the identity's parts before the scope's shared one, and if any part
//! denies, the parts that took give their tokens back in another round
//! trip. Others may see the reservation meanwhile (admitting less, never
//! more); a denied charge takes nothing. A settlement across slots is one
//! call per slot too, the one holding a reservation's record applied at
//! most once, and ordered so that a failure between them admits less
//! (see `cross_slot.rs`): the one place where a settle is not all or
//! nothing.
//! That path, with batches of charges, is in `cross_slot.rs`; the
//! connections are in `lanes.rs`, behind the topologies of `topology.rs`.
//!
//! # Scripts
//! The script is called by SHA. A node that answers `NOSCRIPT` (a fresh
//! Cluster node, a promoted replica, after `SCRIPT FLUSH`) gets `SCRIPT LOAD`
//! (on standalone and Sentinel, then the refused batch, which did not run,
//! is sent once more; on Cluster, on the node that refused it, see
//! `cluster.rs`). Nothing is ever charged twice: only replies that prove a
//! script did not run are followed, never a timeout or a dropped connection.
//!
//! # Failure
//! A [`breaker`] sits in front (on Cluster, one per hash slot): after a few
//! failures in a row, calls fail at once for a short cool-down, then probe.
//! A background prober also pings Redis once per cool-down (and once at
//! start), so the breaker opens and closes, and health follows Redis, even
//! without traffic. Errors become [`StoreError`]s, and the limiter applies
//! each scope's `failure_mode`.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::future::join_all;
use redis::{ErrorKind, ServerErrorKind, Value};

use super::{
    Charge, ChargeOutcome, Condition, PenaltyAnswer, PenaltyOp, Settled, Settlement, Store,
    StoreError,
};
use crate::config::RedisConfig;
use crate::store::ban_cache::BanFeed;

pub mod breaker;
mod clock;
mod cluster;
mod coalesce;
mod cross_slot;
mod demand;
mod eviction;
mod invalidation;
pub mod keys;
mod lanes;
mod lease;
mod penalties;
mod script;
mod topology;

pub use breaker::BreakerSettings;
pub use keys::DEFAULT_PREFIX;
pub use topology::BuildError;

use breaker::{Breaker, SlotBreakers};
use cluster::TryAgain;
use coalesce::{BatchCall, Coalescer, Reply};
use topology::{CallError, Request, Topology};

/// The Redis store. Cheap to clone: clones share pools and breaker.
#[derive(Debug, Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    topology: Topology,
    /// The script's SHA1, for `EVALSHA`.
    sha: String,
    /// The lease script's SHA1 (`lease.lua`).
    lease_sha: String,
    /// The quota demand script's SHA1 (`demand.lua`).
    demand_sha: String,
    /// Every key starts with it: the schema version, or a test's namespace.
    prefix: String,
    /// Bounds each round trip.
    response_timeout: Duration,
    /// Bounds the prober's connects, which refill lanes that decisions'
    /// short timeouts gave up on.
    connect_timeout: Duration,
    /// Redis's health: the prober's, and on standalone and Sentinel (one
    /// primary) the decisions' too.
    breaker: Breaker,
    /// On Cluster, the decisions' breakers: one per hash slot.
    slot_breakers: Option<SlotBreakers>,
    /// Concurrent charges bound for one node (on Cluster, one slot) share
    /// one script call.
    coalescer: Coalescer<script::Encoded>,
    /// So do concurrent lease operations, in a call of their own script.
    lease_coalescer: Coalescer<lease::Encoded>,
    /// Where calendar windows are offered around.
    clock: clock::ReplicaClock,
    /// Redis's eviction policy, as last read, and what to do about it.
    eviction: eviction::Eviction,
    /// Operator bans and unbans made through other replicas, as heard on
    /// the subscription (`invalidation.rs`), for the ban cache.
    ban_feed: Arc<BanFeed>,
    /// Where that subscription connects; taken by
    /// [`RedisStore::spawn_ban_subscriber`].
    ban_source: std::sync::Mutex<Option<invalidation::Source>>,
}

impl RedisStore {
    /// Checks what only the Redis client can: that every URL is one it can
    /// use. Pushes `store.redis.urls[i]: problem`; runs before any port is
    /// bound, beside the config's own validation.
    pub fn check_settings(config: &RedisConfig, problems: &mut Vec<String>) {
        for (i, url) in config.urls.iter().enumerate() {
            // A wrong scheme is the config's own finding; don't say it twice.
            let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
            if let (true, Err(e)) = (scheme_ok, topology::check_url(url)) {
                problems.push(format!("store.redis.urls[{i}]: {e}"));
            }
        }
        topology::check_tls(config, problems);
    }

    /// Builds the store from its config. Does not connect: Tollgate starts
    /// while Redis is down. Call [`RedisStore::spawn_prober`] to track it.
    pub fn new(config: &RedisConfig) -> Result<Self, BuildError> {
        let settings = BreakerSettings {
            threshold: config.breaker_threshold,
            cool_down: config.breaker_cool_down,
        };
        let topology = Topology::build(config)?;
        // On Cluster a ping proves the subscribed node, not the bus a
        // change crosses to reach it: hold no longer than without a feed
        // (`invalidation.rs`).
        let ban_feed = if topology.is_cluster() {
            BanFeed::with_hold(crate::store::ban_cache::MAX_HOLD)
        } else {
            BanFeed::new()
        };
        Ok(Self {
            inner: Arc::new(Inner {
                slot_breakers: topology.is_cluster().then(|| SlotBreakers::new(settings)),
                topology,
                sha: script::sha1(),
                lease_sha: lease::sha1(),
                demand_sha: demand::sha1(),
                prefix: config.key_prefix.clone(),
                response_timeout: config.response_timeout,
                connect_timeout: config.connect_timeout,
                breaker: Breaker::new(settings),
                coalescer: Coalescer::default(),
                lease_coalescer: Coalescer::default(),
                clock: clock::ReplicaClock::new(config.host_clock_skew_us),
                eviction: eviction::Eviction::new(config.on_evicting_policy),
                ban_feed: Arc::new(ban_feed),
                ban_source: std::sync::Mutex::new(Some(invalidation::Source::of(config)?)),
            }),
        })
    }

    /// Starts the background prober: it pings Redis once now (opening the
    /// breaker at once if Redis is down) and then every `every`, counting
    /// like any call, so the breaker opens and closes without traffic and
    /// health follows Redis on an idle replica. It stops by itself once the
    /// store is dropped.
    pub fn spawn_prober(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            if let Some(inner) = weak.upgrade() {
                match inner.ping().await {
                    Ok(()) => {
                        inner.check_eviction(inner.response_timeout).await;
                    }
                    Err(e) => {
                        inner.breaker.trip(&e);
                        inner.lost_if_opened(true);
                    }
                }
            }
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut ticks: u32 = 0;
            loop {
                tick.tick().await;
                ticks = ticks.wrapping_add(1);
                let Some(inner) = weak.upgrade() else { return };
                // A Cluster connection waits on every node, a dead one too.
                inner.topology.warm(inner.connect_timeout * 4).await;
                // Closed, it pings anyway, so an idle replica notices a dead
                // Redis too; open, it waits its turn to probe.
                if inner.breaker.admit() {
                    match inner.ping().await {
                        Ok(()) => {
                            inner.breaker.succeeded();
                            // On reconnect, while it evicts (to see it
                            // fixed), and now and then (a failover, a
                            // CONFIG SET): read the policy again.
                            if inner.eviction.due() || ticks.is_multiple_of(eviction::RECHECK_TICKS)
                            {
                                inner.check_eviction(inner.response_timeout).await;
                            }
                        }
                        Err(e) => inner.lost_if_opened(inner.breaker.failed(&e)),
                    }
                }
            }
        })
    }
}

impl RedisStore {
    /// What tells this replica's ban cache of bans and unbans made through
    /// other replicas; live once [`RedisStore::spawn_ban_subscriber`] runs.
    pub fn ban_feed(&self) -> Arc<BanFeed> {
        self.inner.ban_feed.clone()
    }

    /// Starts the subscription that feeds [`RedisStore::ban_feed`] (see
    /// `invalidation.rs`): made again whenever it ends, until the store
    /// and the feed are dropped. `None` when already started.
    pub fn spawn_ban_subscriber(&self) -> Option<tokio::task::JoinHandle<()>> {
        let source = self.inner.ban_source.lock().ok()?.take()?;
        Some(invalidation::spawn(
            Arc::downgrade(&self.inner.ban_feed),
            source,
            invalidation::channel(&self.inner.prefix),
            self.inner.connect_timeout + self.inner.response_timeout,
        ))
    }
}

impl Inner {
    /// When Redis is lost (the breaker just opened), every held connection
    /// is suspect: a dead server's sockets fail only when next written to,
    /// and a silent one's never do. Drop them all, so the first calls after
    /// recovery go out on fresh connections.
    ///
    /// Not on Cluster: its one connection holds a connection per node and
    /// remakes each by itself, and a new one would wait on every node.
    fn lost_if_opened(&self, opened: bool) {
        if opened {
            // The next contact is a reconnect: read the policy again then.
            self.eviction.reconnecting();
        }
        if opened && !self.topology.is_cluster() {
            self.topology.forget_connections();
        }
    }

    async fn ping(&self) -> Result<(), CallError> {
        let ping = redis::cmd("PING");
        self.topology
            .call::<Value>(Request::Cmd(&ping), self.response_timeout)
            .await
            .map(|_| ())
    }

    /// Reads Redis's `maxmemory-policy` (see `eviction.rs`) and records
    /// it; `Some(why)` when it can evict Tollgate's keys. A failed read is
    /// not Redis's failure: the breaker never hears of it.
    async fn check_eviction(&self, timeout: Duration) -> Option<String> {
        let mut info = redis::cmd("INFO");
        info.arg("memory");
        match self
            .topology
            .call::<Value>(Request::Cmd(&info), timeout)
            .await
        {
            Ok(reply) => self.eviction.read(&reply),
            Err(e) => {
                tracing::debug!(error = %e, "could not read Redis's maxmemory-policy");
                None
            }
        }
    }

    /// Queues one encoded charge on its node's next call and waits for its
    /// part of the reply.
    async fn submit(
        self: &Arc<Self>,
        node: u16,
        encoded: script::Encoded,
    ) -> Result<Reply, StoreError> {
        let answer = self.coalescer.submit(self, node, encoded);
        let reply = self.await_batch(answer).await?;
        self.clock.observe(reply.now);
        Ok(reply)
    }

    /// Waits for an item's part of its batch's reply: queued behind at most
    /// one call in flight, then its own call; the coalescer's task bounds
    /// both by [`Inner::batch_patience`].
    async fn await_batch(
        &self,
        answer: tokio::sync::oneshot::Receiver<Result<Reply, StoreError>>,
    ) -> Result<Reply, StoreError> {
        answer
            .await
            .map_err(|_| StoreError::transient("Redis batch task ended"))?
    }

    /// How long a coalesced item may wait for its answer: one call in
    /// flight ahead of it, then its own.
    fn batch_patience(&self) -> Duration {
        self.response_timeout.saturating_mul(2)
    }

    /// Submits what `encode` makes of the offered instant; if no offered
    /// window held Redis's clock (the charge ran nothing), encodes it once
    /// more around Redis's clock, which the reply just taught, and sends
    /// that. A replica's clock off by days then costs one round trip, once,
    /// and never a failure.
    async fn submit_windows(
        self: &Arc<Self>,
        node: u16,
        encode: impl Fn(u64) -> script::Encoded,
    ) -> Result<Reply, StoreError> {
        let reply = self.submit(node, encode(self.clock.offer_at_us())).await?;
        if script::missed_window(&reply.ints) {
            return self.submit(node, encode(self.clock.offer_at_us())).await;
        }
        Ok(reply)
    }

    /// The node (on Cluster, the hash slot) of a charge's first bucket.
    fn node_of(&self, first: Option<&super::BucketCharge<'_>>) -> u16 {
        match first {
            // Standalone and Sentinel batch everything on one node.
            Some(first) if self.topology.is_cluster() => keys::slot(&first.key),
            _ => 0,
        }
    }

    /// Applies one settlement: one script call (coalesced with others), on
    /// the buckets' hash slot; on Cluster, one whose buckets span slots (a
    /// settle or a refund under `hash_tag: identity`) goes by
    /// `cross_slot.rs`.
    async fn settle(self: &Arc<Self>, settlement: &Settlement<'_>) -> Result<Settled, StoreError> {
        let mut slots = settlement.buckets.iter().map(|b| keys::slot(&b.charge.key));
        let first = slots.next();
        if self.topology.is_cluster() && slots.any(|s| Some(s) != first) {
            return self.settle_across(settlement).await;
        }
        self.settle_on_node(settlement).await
    }

    /// Applies a settlement whose buckets share a node (on Cluster, a slot).
    async fn settle_on_node(
        self: &Arc<Self>,
        settlement: &Settlement<'_>,
    ) -> Result<Settled, StoreError> {
        if settlement.buckets.is_empty() {
            return Ok(Settled::Applied(Vec::new()));
        }
        let node = self.node_of(settlement.buckets.first().map(|b| &b.charge));
        let reply = self
            .submit_windows(node, |at| {
                script::encode_settle(&self.prefix, settlement, at)
            })
            .await?;
        script::settled(settlement, reply.now, &reply.ints)
    }

    /// Decides one charge whose buckets share a node (on Cluster, a hash
    /// slot) in its node's next script call. `marks`: its reply carries
    /// each bucket's ledger even if the charge did not ask for it.
    async fn one(
        self: &Arc<Self>,
        charge: &Charge<'_>,
        marks: bool,
    ) -> Result<ChargeOutcome, StoreError> {
        let node = self.node_of(charge.buckets.first());
        let marked = charge.marks || marks;
        let reply = self
            .submit_windows(node, |at| script::encode(&self.prefix, charge, marked, at))
            .await?;
        script::outcome(charge, reply.now, &reply.ints)
    }

    /// True when `charge`'s buckets (and its lease's pool) cannot go in one
    /// script call: on Cluster, when they span hash slots.
    fn spans_nodes(&self, charge: &Charge<'_>) -> bool {
        self.topology.is_cluster()
            && charge.buckets.split_first().is_some_and(|(first, rest)| {
                let slot = keys::slot(&first.key);
                rest.iter().any(|b| keys::slot(&b.key) != slot)
                    || charge
                        .lease
                        .as_ref()
                        .is_some_and(|l| keys::slot(&l.pool) != slot)
            })
    }

    /// The breaker that guards `charge`: its slot's on Cluster, else none
    /// (the one breaker guards the whole call).
    fn breaker_for(&self, charge: &Charge<'_>) -> Option<Arc<Breaker>> {
        self.breaker_for_key(&charge.buckets.first()?.key)
    }

    /// The breaker of `key`'s slot on Cluster, else none.
    fn breaker_for_key(&self, key: &super::BucketKey<'_>) -> Option<Arc<Breaker>> {
        Some(self.slot_breakers.as_ref()?.get(keys::slot(key)))
    }
}

impl BatchCall<script::Encoded> for Inner {
    fn patience(&self) -> Duration {
        self.batch_patience()
    }

    /// One `EVALSHA` for the whole batch. On standalone and Sentinel, a
    /// `NOSCRIPT` (which ran nothing) loads the script and sends the same
    /// batch once more. On Cluster, `node` is the batch's hash slot; see
    /// [`Inner::call_on_cluster`].
    async fn call(&self, node: u16, batch: &[&script::Encoded]) -> Vec<Result<Reply, StoreError>> {
        if self.topology.is_cluster() {
            return self.call_on_cluster(node, batch).await;
        }
        let cmd = script::decide_call(&self.sha, batch.iter().copied());
        coalesce::split(batch, self.call_once(&cmd).await)
    }
}

impl Inner {
    /// Sends a standalone or Sentinel script call; on `NOSCRIPT` loads the
    /// decision script and sends it once more.
    async fn call_once(&self, cmd: &redis::Cmd) -> Result<Vec<i64>, StoreError> {
        self.eval_loading(cmd, script::SOURCE).await
    }

    /// Sends the standalone or Sentinel `EVALSHA` `cmd` of the script whose
    /// source is `source`; on `NOSCRIPT` (which ran nothing) loads it and
    /// sends `cmd` once more. Never resent after a timeout.
    pub(super) async fn eval_loading(
        &self,
        cmd: &redis::Cmd,
        source: &str,
    ) -> Result<Vec<i64>, StoreError> {
        let timeout = self.response_timeout;
        for attempt in 0..2 {
            match self
                .topology
                .call::<Vec<i64>>(Request::Cmd(cmd), timeout)
                .await
            {
                Ok(ints) => return Ok(ints),
                Err(CallError::Redis(e))
                    if attempt == 0 && e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) =>
                {
                    let mut load = redis::cmd("SCRIPT");
                    load.arg("LOAD").arg(source);
                    self.topology
                        .call::<Value>(Request::Cmd(&load), timeout)
                        .await
                        .map_err(call_failed)?;
                }
                Err(e) => return Err(call_failed(e)),
            }
        }
        Err(StoreError::transient("Redis kept answering NOSCRIPT"))
    }

    /// A batch on Cluster: one command to the slot's node, following only
    /// `MOVED`, `ASK`, `TRYAGAIN` and `NOSCRIPT` (`cluster.rs`), never
    /// resent after a timeout or a dropped connection. During a slot
    /// migration, a batch whose keys are split between the two nodes gets
    /// `TRYAGAIN` (it ran nothing): then each charge goes alone, to wherever
    /// its own keys are, so one charge's keys never hold up another's.
    async fn call_on_cluster(
        &self,
        slot: u16,
        batch: &[&script::Encoded],
    ) -> Vec<Result<Reply, StoreError>> {
        let timeout = self.response_timeout;
        let cmd = script::decide_call(&self.sha, batch.iter().copied());
        if batch.len() == 1 {
            let result = cluster::eval(&self.topology, &cmd, slot, timeout, TryAgain::Wait).await;
            return coalesce::split(batch, result.map_err(call_failed));
        }
        match cluster::eval(&self.topology, &cmd, slot, timeout, TryAgain::Return).await {
            Err(CallError::Redis(e))
                if e.kind() == ErrorKind::Server(ServerErrorKind::TryAgain) =>
            {
                let alone = batch.iter().map(|&charge| async move {
                    let cmd = script::decide_call(&self.sha, std::iter::once(charge));
                    let result = cluster::eval(&self.topology, &cmd, slot, timeout, TryAgain::Wait)
                        .await
                        .map_err(call_failed);
                    coalesce::split(&[charge], result).pop().unwrap_or_else(|| {
                        Err(StoreError::permanent("a script call answered no charge"))
                    })
                });
                join_all(alone).await
            }
            result => coalesce::split(batch, result.map_err(call_failed)),
        }
    }
}

/// Every failure to reach Redis may pass: a restart, a failover, a timeout.
fn call_failed(e: CallError) -> StoreError {
    StoreError::transient(e)
}

impl Store for RedisStore {
    async fn penalties(&self, op: &PenaltyOp<'_>) -> Result<PenaltyAnswer, StoreError> {
        self.inner.penalties(op).await
    }

    async fn check_and_take_each(
        &self,
        charges: &[Charge<'_>],
    ) -> Vec<Result<ChargeOutcome, StoreError>> {
        self.take(charges).await
    }

    /// One charge on one node, the common case, goes straight to its
    /// node's queue behind its breaker: no plan, no list of work, no join.
    /// A charge that spans Cluster slots takes the batch path, which
    /// reserves and refunds.
    async fn check_and_take_one(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, StoreError> {
        let inner = &self.inner;
        if charge.buckets.is_empty() || inner.spans_nodes(charge) {
            return self
                .take(std::slice::from_ref(charge))
                .await
                .pop()
                .unwrap_or_else(|| Err(StoreError::permanent("store returned no outcome")));
        }
        let slot_breaker = inner.breaker_for(charge);
        let breaker = slot_breaker.as_deref().unwrap_or(&inner.breaker);
        if !breaker.admit() {
            return Err(circuit_open());
        }
        let result = inner.one(charge, false).await;
        let opened = record(breaker, std::slice::from_ref(&result));
        // On Cluster, a slot's breaker only: its node's connection is the
        // client's to remake.
        if slot_breaker.is_none() {
            inner.lost_if_opened(opened);
        }
        result
    }

    async fn settle(&self, settlement: &Settlement<'_>) -> Result<Settled, StoreError> {
        let inner = &self.inner;
        let breaker = match settlement.buckets.first() {
            Some(first) if inner.slot_breakers.is_some() => {
                inner.breaker_for_key(&first.charge.key)
            }
            _ => None,
        };
        let breaker = breaker.as_deref().unwrap_or(&inner.breaker);
        if !breaker.admit() {
            return Err(circuit_open());
        }
        let result = inner.settle(settlement).await;
        let opened = match &result {
            Err(e) if e.transient => breaker.failed(e),
            _ => {
                breaker.succeeded();
                false
            }
        };
        if inner.slot_breakers.is_none() {
            inner.lost_if_opened(opened);
        }
        result
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

    fn is_available(&self) -> bool {
        !self.inner.breaker.is_open()
    }

    fn condition(&self) -> Condition {
        let evicting = self.inner.eviction.policy();
        Condition {
            clock_skew_us: self.inner.clock.skew_us(),
            unready: evicting.is_some() && self.inner.eviction.refuses(),
            evicting_policy: evicting,
            ban_changes_heard: Some(self.inner.ban_feed.is_live()),
        }
    }

    /// Redis keys carry the limit's shape, so a reload that changes a limit
    /// starts new buckets: nothing derived from the old rules is kept here,
    /// and keys are made per scope on demand.
    fn rules_replaced(&self, _: &[&str]) {}
}

impl RedisStore {
    /// The start-up check of Redis's eviction policy: with
    /// `on_evicting_policy: refuse`, an evicting policy refuses the start.
    /// A Redis that cannot be reached now is checked when it is (then an
    /// evicting policy makes the replica unready instead).
    pub async fn check_at_start(&self) -> Result<(), BuildError> {
        let inner = &self.inner;
        // The first call also connects: give it the time for both.
        let timeout = inner.connect_timeout + inner.response_timeout;
        match inner.check_eviction(timeout).await {
            Some(why) if inner.eviction.refuses() => Err(BuildError::EvictingPolicy(why)),
            _ => Ok(()),
        }
    }

    /// Decides `charges` behind the breaker.
    async fn take(&self, charges: &[Charge<'_>]) -> Vec<Result<ChargeOutcome, StoreError>> {
        let inner = &self.inner;
        if inner.slot_breakers.is_some() {
            return self.check_and_take_by_slot(charges).await;
        }
        if !inner.breaker.admit() {
            return vec![Err(circuit_open()); charges.len()];
        }
        let results = inner.decide(charges).await;
        inner.lost_if_opened(record(&inner.breaker, &results));
        results
    }

    /// Cluster: each charge passes its own slot's breaker, and the outcome
    /// is recorded there only.
    async fn check_and_take_by_slot(
        &self,
        charges: &[Charge<'_>],
    ) -> Vec<Result<ChargeOutcome, StoreError>> {
        let inner = &self.inner;
        let breakers: Vec<Option<Arc<Breaker>>> =
            charges.iter().map(|c| inner.breaker_for(c)).collect();
        let admitted: Vec<usize> = (0..charges.len())
            .filter(|&i| breakers[i].as_ref().is_none_or(|b| b.admit()))
            .collect();
        let work: Vec<Charge<'_>> = admitted.iter().map(|&i| charges[i].clone()).collect();
        let decided = if work.is_empty() {
            Vec::new()
        } else {
            inner.decide(&work).await
        };
        let mut results: Vec<Result<ChargeOutcome, StoreError>> =
            (0..charges.len()).map(|_| Err(circuit_open())).collect();
        for (&i, result) in admitted.iter().zip(decided) {
            if let Some(b) = &breakers[i] {
                // A slot's breaker only; its node's connection is the
                // client's to remake.
                record(b, std::slice::from_ref(&result));
            }
            results[i] = result;
        }
        results
    }
}

fn circuit_open() -> StoreError {
    StoreError::transient("Redis circuit open: not calling Redis during the cool-down")
}

/// Counts `results` on `breaker`: any transient failure is a failure. A
/// permanent error is about the request, not Redis's health. True when this
/// opened the breaker.
fn record(breaker: &Breaker, results: &[Result<ChargeOutcome, StoreError>]) -> bool {
    match results
        .iter()
        .find_map(|r| r.as_ref().err().filter(|e| e.transient))
    {
        Some(e) => breaker.failed(e),
        None => {
            breaker.succeeded();
            false
        }
    }
}
