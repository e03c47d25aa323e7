//! Quota demand shared across replicas: what a store is asked when a
//! replica publishes what its Envoy quota streams hold of one limit, and
//! what it answers (the rest of the fleet's view, and how much this replica
//! may hold).
//!
//! Each replica keeps one entry per group (a limit's bucket, as a
//! [`BucketKey`]): the rate its streams may hold, what they ask for, and
//! how many they are, with an expiry on the store's clock. The rules, the
//! same on every store:
//!
//! - before anything is counted, every entry whose expiry is at or before
//!   the store's now is removed;
//! - a replica may always keep or lower what it holds; it may raise it only
//!   out of what the other live entries leave of the limit:
//!   `granted = min(asked, max(its live entry, limit − others))`, so the
//!   sum of live entries never exceeds the limit;
//! - a replica without a live entry is refused (granted 0, nothing written)
//!   while [`DemandCall::max_replicas`] others are live: storage per group is
//!   bounded whatever the number of replicas;
//! - the entry is written with the granted rate and lives `ttl_us`.
//!
//! The embedded store serves one process, so one replica: it grants what is
//! asked and knows no others. The Redis store applies the rules in one
//! script call (`redis/demand.lua`), on Redis's clock.

use super::BucketKey;

/// One replica's publication for one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemandCall<'a> {
    /// The group: its scope, the limit's rule, and the identity and
    /// operation its streams map to; `hash_tag` places the entry with the
    /// scope's buckets of the same tag.
    pub key: BucketKey<'a>,
    /// This replica's id, random per process.
    pub replica: u64,
    /// The rate this replica's streams may hold after the call, in
    /// millitokens per second: at least what they hold now.
    pub held_milli: u64,
    /// What its streams ask for (demand with slack), in millitokens/s.
    pub ask_milli: u64,
    /// How many of its streams draw on the group.
    pub streams: u64,
    /// The limit's rate R, in millitokens per second.
    pub limit_milli: u64,
    /// How long the entry lives unless written again, in microseconds.
    pub ttl_us: u64,
    /// The most replicas a group keeps entries for.
    pub max_replicas: u64,
}

/// The other replicas' live entries, summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Others {
    /// What they may hold, in millitokens per second.
    pub held_milli: u64,
    /// What their streams ask for, in millitokens per second.
    pub ask_milli: u64,
    /// Their streams.
    pub streams: u64,
    /// How many replicas.
    pub replicas: u64,
}

/// What a store answers to a [`DemandCall`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemandAnswer {
    /// What this replica may now hold, in millitokens per second: what it
    /// asked, or less when the others leave less (never less than its live
    /// entry held, unless it asked for less).
    pub granted_milli: u64,
    /// The others' live entries.
    pub others: Others,
    /// The store's clock at the call, in microseconds.
    pub now_us: u64,
}

/// Values a store keeps exactly: Redis's Lua holds numbers as doubles,
/// exact to 2^53. Rates are clamped to this before they are sent.
pub const MAX_DEMAND_VALUE: u64 = 1 << 50;

impl DemandCall<'_> {
    /// The embedded store's answer: one process is one replica, so there
    /// are no others and everything asked is granted.
    pub fn alone(&self, now_us: u64) -> DemandAnswer {
        DemandAnswer {
            granted_milli: self.held_milli,
            others: Others::default(),
            now_us,
        }
    }
}
