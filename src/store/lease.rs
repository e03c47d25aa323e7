//! Concurrency leases: what a store is asked about a pool of leases, what it
//! answers, and the pool arithmetic the embedded store applies (the Redis
//! store's `lease.lua` applies the same rules in one script call).
//!
//! A pool is the set of live leases of one concurrency limit (per scope,
//! identity or operation, as its `per:` says). Each lease has a caller-chosen
//! id, a weight, and an expiry on the store's clock. The rules, the same on
//! every store:
//!
//! - before anything is counted, every lease whose expiry is at or before
//!   the store's now is removed: a lease is live while `now < expires_at`;
//! - an acquire of a live id answers that lease as it is (same expiry,
//!   counted once): acquires are idempotent under retries;
//! - a new lease is granted when the live weights plus its own weight plus
//!   the priority's reserve are at most the limit; a refusal takes nothing
//!   and names the earliest expiry of a live lease;
//! - a renew sets a live lease's expiry to now + ttl; an expired or unknown
//!   lease is reported lost;
//! - a release removes the lease; releasing an unknown one is fine.

use std::collections::{BTreeSet, HashMap};

use super::BucketKey;

/// The longest lease id, in bytes.
pub const MAX_LEASE_ID_LEN: usize = 128;

/// One operation on one lease of one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseCall<'a> {
    /// The pool: its scope, rule (the concurrency limit's name) and the
    /// caller's parts the limit is kept per; its `hash_tag` places it in
    /// the same Redis slot as the scope's buckets of the same tag.
    pub pool: BucketKey<'a>,
    /// The caller-chosen id; 1 to [`MAX_LEASE_ID_LEN`] bytes.
    pub lease_id: &'a str,
    /// What to do.
    pub op: LeaseOp,
}

/// What a [`LeaseCall`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOp {
    /// Take a slot, or answer the live lease of the same id.
    Acquire {
        /// The pool's limit: the most weight live at once.
        limit: u64,
        /// This lease's weight, 1 to `limit`.
        weight: u64,
        /// Weight the request must leave free: its priority's headroom.
        reserve: u64,
        /// How long the lease lives, in microseconds, at least 1.
        ttl_us: u64,
        /// Judge only: nothing is recorded.
        dry_run: bool,
    },
    /// Extend a live lease to now + `ttl_us`.
    Renew {
        /// The new time to live, in microseconds, at least 1.
        ttl_us: u64,
    },
    /// Remove the lease, if live.
    Release,
    /// Read the pool's live leases, soonest expiry first, at most `max` of
    /// them; changes nothing (an expired lease is skipped, not removed).
    /// The call's `lease_id` is ignored.
    List {
        /// The most leases to answer.
        max: u32,
    },
}

/// One live lease, as [`LeaseOp::List`] answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveLease {
    /// The caller-chosen id.
    pub lease_id: Box<str>,
    /// Its expiry in microseconds on the store's clock.
    pub expires_at_us: u64,
    /// Its weight.
    pub weight: u64,
}

/// What a store answers to a [`LeaseCall`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseOutcome {
    /// Acquire: granted (or already held). Renew: renewed. Release: the
    /// lease was live and is now gone.
    pub ok: bool,
    /// The lease's expiry in microseconds on the store's clock, when `ok`
    /// for an acquire or a renew; 0 otherwise.
    pub expires_at_us: u64,
    /// The pool's live weight after the call.
    pub in_flight: u64,
    /// The earliest expiry of a live lease, for a refused acquire whose
    /// weight could ever fit: an upper bound of the wait.
    pub earliest_expiry_us: Option<u64>,
    /// The store's clock at the call, in microseconds.
    pub now_us: u64,
    /// Leases of the pool this call found expired and removed: held until
    /// their expiry and never released (the leak signal).
    pub expired: u64,
    /// [`LeaseOp::List`]: the first live leases, soonest expiry first;
    /// empty for every other operation.
    pub live: Vec<LiveLease>,
    /// [`LeaseOp::List`]: how many leases are live (listed or not); 0 for
    /// every other operation.
    pub live_total: u64,
}

/// A pool of live leases, as the embedded store keeps it.
#[derive(Debug, Default)]
pub struct Pool {
    /// Lease id → (expiry, weight).
    leases: HashMap<Box<str>, (u64, u64)>,
    /// (expiry, id), in expiry order: the next to expire first.
    by_expiry: BTreeSet<(u64, Box<str>)>,
    /// The sum of the live weights.
    in_flight: u64,
}

impl Pool {
    /// True when the pool holds no lease.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// The latest expiry of a lease held, if any.
    pub fn latest_expiry(&self) -> Option<u64> {
        self.by_expiry.last().map(|(at, _)| *at)
    }

    /// Removes every lease expired at `now_us`; returns how many.
    pub fn expire(&mut self, now_us: u64) -> usize {
        let mut removed = 0;
        while let Some((at, _)) = self.by_expiry.first()
            && *at <= now_us
        {
            if let Some((_, id)) = self.by_expiry.pop_first() {
                if let Some((_, weight)) = self.leases.remove(&id) {
                    self.in_flight = self.in_flight.saturating_sub(weight);
                }
                removed += 1;
            }
        }
        removed
    }

    /// Applies `call` at `now_us`, expired leases removed first.
    pub fn apply(&mut self, call: &LeaseCall<'_>, now_us: u64) -> LeaseOutcome {
        if let LeaseOp::List { max } = call.op {
            return self.list(max, now_us);
        }
        let expired = self.expire(now_us) as u64;
        let held = self.leases.get(call.lease_id).copied();
        let (ok, expires_at_us) = match (call.op, held) {
            (LeaseOp::Acquire { .. }, Some((at, _))) => (true, at),
            (
                LeaseOp::Acquire {
                    limit,
                    weight,
                    reserve,
                    ttl_us,
                    dry_run,
                },
                None,
            ) => {
                let fits = self
                    .in_flight
                    .saturating_add(weight)
                    .saturating_add(reserve)
                    <= limit;
                let at = now_us.saturating_add(ttl_us);
                if fits && !dry_run {
                    self.insert(call.lease_id, at, weight);
                }
                (fits, if fits { at } else { 0 })
            }
            (LeaseOp::Renew { ttl_us }, Some((old, weight))) => {
                let at = now_us.saturating_add(ttl_us);
                self.by_expiry.remove(&(old, Box::from(call.lease_id)));
                self.by_expiry.insert((at, Box::from(call.lease_id)));
                self.leases.insert(Box::from(call.lease_id), (at, weight));
                (true, at)
            }
            (LeaseOp::Release, Some((old, weight))) => {
                self.by_expiry.remove(&(old, Box::from(call.lease_id)));
                self.leases.remove(call.lease_id);
                self.in_flight = self.in_flight.saturating_sub(weight);
                (true, 0)
            }
            (LeaseOp::Renew { .. } | LeaseOp::Release | LeaseOp::List { .. }, _) => (false, 0),
        };
        LeaseOutcome {
            ok,
            expires_at_us,
            in_flight: self.in_flight,
            earliest_expiry_us: self.earliest_for(call, ok),
            now_us,
            expired,
            ..LeaseOutcome::default()
        }
    }

    /// The live leases at `now_us`, soonest expiry first, at most `max`:
    /// read only, as on Redis (an expired lease is skipped, left for the
    /// next call that changes the pool to remove and count). `in_flight` is
    /// the live weight.
    fn list(&self, max: u32, now_us: u64) -> LeaseOutcome {
        let live = || self.by_expiry.iter().filter(move |(at, _)| *at > now_us);
        let weight = |id: &str| self.leases.get(id).map_or(0, |&(_, w)| w);
        LeaseOutcome {
            ok: true,
            in_flight: live().map(|(_, id)| weight(id)).sum(),
            now_us,
            live: live()
                .take(max as usize)
                .map(|(at, id)| LiveLease {
                    lease_id: id.clone(),
                    expires_at_us: *at,
                    weight: weight(id),
                })
                .collect(),
            live_total: live().count() as u64,
            ..LeaseOutcome::default()
        }
    }

    fn insert(&mut self, id: &str, at: u64, weight: u64) {
        self.leases.insert(Box::from(id), (at, weight));
        self.by_expiry.insert((at, Box::from(id)));
        self.in_flight = self.in_flight.saturating_add(weight);
    }

    /// A refused acquire's earliest live expiry, unless its weight and
    /// reserve exceed the limit (it can never be granted).
    fn earliest_for(&self, call: &LeaseCall<'_>, ok: bool) -> Option<u64> {
        match call.op {
            LeaseOp::Acquire {
                limit,
                weight,
                reserve,
                ..
            } if !ok && weight.saturating_add(reserve) <= limit => {
                self.by_expiry.first().map(|(at, _)| *at)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HashTag;

    fn call(id: &str, op: LeaseOp) -> LeaseCall<'_> {
        LeaseCall {
            pool: BucketKey {
                scope: "s",
                rule: "r",
                identity: None,
                operation: None,
                hash_tag: HashTag::Scope,
            },
            lease_id: id,
            op,
        }
    }

    fn acquire(weight: u64) -> LeaseOp {
        LeaseOp::Acquire {
            limit: 3,
            weight,
            reserve: 0,
            ttl_us: 100,
            dry_run: false,
        }
    }

    #[test]
    fn weights_fill_the_pool_and_a_repeat_counts_once() {
        let mut pool = Pool::default();
        assert!(pool.apply(&call("a", acquire(2)), 10).ok);
        let again = pool.apply(&call("a", acquire(2)), 20);
        assert_eq!(again.expired, 0);
        assert_eq!(
            (again.ok, again.expires_at_us, again.in_flight),
            (true, 110, 2)
        );
        let refused = pool.apply(&call("b", acquire(2)), 30);
        assert!(!refused.ok);
        assert_eq!(refused.earliest_expiry_us, Some(110));
        assert!(pool.apply(&call("c", acquire(1)), 30).ok);
    }

    #[test]
    fn a_lease_is_live_until_its_expiry_and_not_at_it() {
        let mut pool = Pool::default();
        pool.apply(&call("a", acquire(3)), 0);
        assert!(!pool.apply(&call("b", acquire(1)), 99).ok);
        let after = pool.apply(&call("b", acquire(1)), 100);
        assert_eq!((after.ok, after.expired), (true, 1));
        assert!(!pool.apply(&call("a", LeaseOp::Renew { ttl_us: 5 }), 100).ok);
    }

    #[test]
    fn release_frees_the_weight_and_is_idempotent() {
        let mut pool = Pool::default();
        pool.apply(&call("a", acquire(3)), 0);
        assert!(pool.apply(&call("a", LeaseOp::Release), 1).ok);
        assert!(!pool.apply(&call("a", LeaseOp::Release), 1).ok);
        assert!(pool.is_empty());
        assert_eq!(pool.apply(&call("b", acquire(3)), 2).in_flight, 3);
    }

    #[test]
    fn a_weight_over_the_limit_gets_no_retry_time() {
        let mut pool = Pool::default();
        pool.apply(&call("x", acquire(1)), 0);
        let op = LeaseOp::Acquire {
            limit: 3,
            weight: 3,
            reserve: 1,
            ttl_us: 1,
            dry_run: false,
        };
        let refused = pool.apply(&call("a", op), 0);
        assert_eq!((refused.ok, refused.earliest_expiry_us), (false, None));
    }

    #[test]
    fn a_list_is_bounded_read_only_and_skips_the_expired() {
        let mut pool = Pool::default();
        let at = |ttl_us| LeaseOp::Acquire {
            limit: 10,
            weight: 2,
            reserve: 0,
            ttl_us,
            dry_run: false,
        };
        pool.apply(&call("b", at(300)), 0);
        pool.apply(&call("a", at(200)), 0);
        pool.apply(&call("c", at(400)), 0);
        pool.apply(&call("gone", at(50)), 0);
        let listed = pool.apply(&call("", LeaseOp::List { max: 2 }), 100);
        let ids: Vec<_> = listed.live.iter().map(|l| &*l.lease_id).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(listed.live[0].expires_at_us, 200);
        assert_eq!(listed.live[0].weight, 2);
        assert_eq!((listed.live_total, listed.in_flight), (3, 6));
        assert_eq!((listed.expired, listed.ok), (0, true));
        // Nothing was removed: the next change still finds the expired one.
        assert_eq!(pool.apply(&call("d", at(1)), 100).expired, 1);
        let none = pool.apply(&call("", LeaseOp::List { max: 0 }), 100);
        assert_eq!((none.live.len(), none.live_total), (0, 4));
    }
}
