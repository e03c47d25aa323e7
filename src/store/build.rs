//! Assembling a store from config: the settings only a store can judge,
//! the store a config asks for ([`AnyStore`]), and the one stack of
//! decorators every server runs ([`Served`]).

use std::sync::Arc;

use super::ban_cache::BanCache;
use super::deny_cache::DenyCache;
use super::observed::{Observed, StoreObserver};
use super::{
    BuildError, Charge, ChargeOutcome, PenaltyAnswer, PenaltyOp, Settled, Settlement, Store,
    StoreError, memory, redis,
};
use crate::config::{ConfigError, StoreConfig, StoreKind};

/// The store a server decides on: the ban cache and the deny cache in
/// front of the observed store, in front of the store the config chose.
/// The caches sit outside the observer, so a local answer is not counted
/// as a store call.
pub type Served<O> = BanCache<DenyCache<Observed<AnyStore, O>>>;

/// Builds [`Served`] for `config`, reporting every store call to
/// `observer`. Needs a tokio runtime (see [`build`]).
pub fn build_served<O: StoreObserver>(
    config: &StoreConfig,
    observer: Arc<O>,
) -> Result<Served<O>, BuildError> {
    let store = build(config)?;
    let feed = store.ban_feed();
    let observed = Observed::new(store, observer);
    Ok(BanCache::with_feed(
        DenyCache::new(observed, config.deny_cache_on()),
        feed,
    ))
}

/// Checks the store settings that only the store itself can judge (such as
/// whether the Redis client can use a URL). Runs before any port is bound,
/// after the config's own validation.
pub fn check_settings(config: &StoreConfig) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    if config.kind == StoreKind::Redis {
        redis::RedisStore::check_settings(&config.redis, &mut problems);
    }
    ConfigError::check(problems)
}

/// Builds the store a config asks for, with its background task (the
/// embedded store's sweeper, or Redis's prober). Needs a tokio runtime.
pub fn build(config: &StoreConfig) -> Result<AnyStore, BuildError> {
    Ok(match config.kind {
        StoreKind::Memory => {
            let memory = &config.memory;
            let store = memory::MemoryStore::with_max_bytes(memory.shards, memory.max_bytes);
            store.spawn_sweeper(memory.sweep_interval);
            AnyStore::Memory(store)
        }
        StoreKind::Redis => {
            let store = redis::RedisStore::new(&config.redis)?;
            store.spawn_prober(config.redis.breaker_cool_down);
            store.spawn_ban_subscriber();
            AnyStore::Redis(store)
        }
    })
}

/// The store chosen by configuration. An enum rather than a trait object, so
/// the embedded store's calls stay static and allocation-free.
#[derive(Debug, Clone)]
pub enum AnyStore {
    /// The embedded store.
    Memory(memory::MemoryStore),
    /// Redis: standalone, Sentinel or Cluster.
    Redis(redis::RedisStore),
}

impl AnyStore {
    /// What tells the ban cache of other replicas' operator bans and
    /// unbans: Redis's subscription; none for the embedded store, which
    /// no other replica shares.
    pub fn ban_feed(&self) -> Option<Arc<super::ban_cache::BanFeed>> {
        match self {
            Self::Memory(_) => None,
            Self::Redis(s) => Some(s.ban_feed()),
        }
    }

    /// What must hold before the server takes traffic: on Redis, an
    /// eviction policy that keeps Tollgate's keys (or the config's leave to
    /// serve on one). Redis being down is not a reason to refuse.
    pub async fn check_at_start(&self) -> Result<(), BuildError> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Redis(s) => s.check_at_start().await,
        }
    }
}

impl Store for AnyStore {
    async fn check_and_take_each(
        &self,
        charges: &[Charge<'_>],
    ) -> Vec<Result<ChargeOutcome, StoreError>> {
        match self {
            Self::Memory(s) => s.check_and_take_each(charges).await,
            Self::Redis(s) => s.check_and_take_each(charges).await,
        }
    }

    async fn check_and_take_one(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, StoreError> {
        match self {
            Self::Memory(s) => s.check_and_take_one(charge).await,
            Self::Redis(s) => s.check_and_take_one(charge).await,
        }
    }

    async fn settle(&self, settlement: &Settlement<'_>) -> Result<Settled, StoreError> {
        match self {
            Self::Memory(s) => s.settle(settlement).await,
            Self::Redis(s) => s.settle(settlement).await,
        }
    }

    async fn penalties(&self, op: &PenaltyOp<'_>) -> Result<PenaltyAnswer, StoreError> {
        match self {
            Self::Memory(s) => s.penalties(op).await,
            Self::Redis(s) => s.penalties(op).await,
        }
    }

    async fn lease(&self, call: &super::LeaseCall<'_>) -> Result<super::LeaseOutcome, StoreError> {
        match self {
            Self::Memory(s) => s.lease(call).await,
            Self::Redis(s) => s.lease(call).await,
        }
    }

    async fn demand(
        &self,
        call: &super::DemandCall<'_>,
    ) -> Result<super::DemandAnswer, StoreError> {
        match self {
            Self::Memory(s) => s.demand(call).await,
            Self::Redis(s) => s.demand(call).await,
        }
    }

    fn is_available(&self) -> bool {
        match self {
            Self::Memory(s) => s.is_available(),
            Self::Redis(s) => s.is_available(),
        }
    }

    fn rules_replaced(&self, scopes: &[&str]) {
        match self {
            Self::Memory(s) => s.rules_replaced(scopes),
            Self::Redis(s) => s.rules_replaced(scopes),
        }
    }

    fn condition(&self) -> super::Condition {
        match self {
            Self::Memory(s) => s.condition(),
            Self::Redis(s) => s.condition(),
        }
    }
}
