//! The streams of one replica and the shares they hold: who draws on which
//! group of buckets, what each was told, and the outboxes to tell them.
//!
//! One `std` mutex, held for plain computation and non-blocking sends only.
//! Each group is one (scope, identity, operation): the streams whose
//! `BucketId`s map to it draw on the same Tollgate buckets, so they split
//! each limit that applies. Shares are computed by
//! [`crate::limiter::shares`]; this file keeps the state between reports.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::service::rate_limit_quota::v3::{BucketId, RateLimitQuotaResponse};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;

use super::wire::{self, Assignment};
use crate::limiter::shares::{self, Member, Pool};
use crate::observe::rlqs::RlqsMetrics;

/// Where a stream's answers go.
pub(crate) type Outbox = mpsc::Sender<Result<RateLimitQuotaResponse, Status>>;

/// A group of buckets: (scope, identity, operation).
pub(crate) type GroupKey = (String, String, String);

/// Every stream of this replica, and the groups their buckets draw on.
#[derive(Debug, Default)]
pub struct Hub {
    state: Mutex<State>,
    next: AtomicU64,
    /// Streams, seats and shares, as they change.
    metrics: RlqsMetrics,
}

#[derive(Debug, Default)]
struct State {
    streams: HashMap<u64, Outbox>,
    /// Open streams per connection (the peer's address and port).
    connections: HashMap<Option<SocketAddr>, usize>,
    groups: HashMap<GroupKey, HashMap<u64, Seat>>,
    /// Groups whose shares are to be sent again when a denial ends, and
    /// when: one timer per group at most, however many reports arrive
    /// meanwhile, pushed back when a later denial runs longer.
    resends: HashMap<GroupKey, Instant>,
}

/// One stream's place in a group.
#[derive(Debug)]
struct Seat {
    /// Echoed in every action for it.
    bucket_id: BucketId,
    /// Its demand and share, in millitokens per second.
    member: Member,
    /// The burst that goes with its share, in tokens.
    burst: u64,
    /// The rules its share was computed for, whose assigned-rate series
    /// it counts in.
    rules: Vec<Arc<str>>,
}

/// One bucket report, as the hub needs it.
#[derive(Debug)]
pub(crate) struct Report {
    /// The stream that sent it.
    pub(crate) stream: u64,
    /// The group its bucket maps to.
    pub(crate) group: GroupKey,
    /// The bucket, to echo.
    pub(crate) bucket_id: BucketId,
    /// Requests per second it saw, in thousandths, when measured.
    pub(crate) demand_milli: Option<u64>,
    /// The limits that apply to the group.
    pub(crate) pools: Vec<Pool>,
    /// Their rule names, for the metrics.
    pub(crate) rules: Vec<Arc<str>>,
    /// Set when a bucket of the group is empty: deny everywhere this long.
    pub(crate) deny_for: Option<Duration>,
}

impl Hub {
    /// A hub that reports to `metrics`.
    pub fn with_metrics(metrics: RlqsMetrics) -> Self {
        Self {
            metrics,
            ..Self::default()
        }
    }

    /// Its metrics, for the streams to count reports in.
    pub(crate) fn metrics(&self) -> &RlqsMetrics {
        &self.metrics
    }

    /// Opens a stream on `peer`'s connection with its outbox, unless the
    /// connection already holds `max` streams.
    pub(crate) fn open(
        &self,
        peer: Option<SocketAddr>,
        max: usize,
        outbox: Outbox,
    ) -> Result<u64, Status> {
        let mut state = self.lock();
        let open = state.connections.entry(peer).or_default();
        if *open >= max {
            return Err(Status::resource_exhausted(format!(
                "this connection already holds {max} quota streams (rlqs.max_streams_per_connection)"
            )));
        }
        *open += 1;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        state.streams.insert(id, outbox);
        self.metrics.stream(1);
        Ok(id)
    }

    /// Forgets a stream and every share it held.
    pub(crate) fn close(&self, stream: u64, peer: Option<SocketAddr>) {
        let mut state = self.lock();
        if state.streams.remove(&stream).is_some() {
            self.metrics.stream(-1);
        }
        if let Some(open) = state.connections.get_mut(&peer) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                state.connections.remove(&peer);
            }
        }
        state.groups.retain(|group, seats| {
            if let Some(seat) = seats.remove(&stream) {
                self.vacate(group, &seat);
            }
            !seats.is_empty()
        });
    }

    /// Gives up one stream's seat in `group` (an abandoned bucket).
    pub(crate) fn leave(&self, stream: u64, group: &GroupKey) {
        let mut state = self.lock();
        if let Some(seats) = state.groups.get_mut(group) {
            if let Some(seat) = seats.remove(&stream) {
                self.vacate(group, &seat);
            }
            if seats.is_empty() {
                state.groups.remove(group);
            }
        }
    }

    /// Open streams, and seats held across all groups.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        let seats = state.groups.values().map(HashMap::len).sum();
        (state.streams.len(), seats)
    }

    /// Takes in a report: confirms what the stream held, rebalances its
    /// group, and sends every stream whose share moved its new one (and
    /// the reporter its own, unchanged or not, which extends it).
    pub(crate) fn report(&self, r: Report) {
        let mut state = self.lock();
        let State {
            streams, groups, ..
        } = &mut *state;
        let scope = r.group.0.clone();
        let seats = groups.entry(r.group).or_default();
        let seat = seats.entry(r.stream).or_insert_with(|| {
            self.metrics.bucket(1);
            Seat {
                bucket_id: r.bucket_id.clone(),
                member: Member::default(),
                burst: 0,
                rules: Vec::new(),
            }
        });
        if r.demand_milli.is_some() {
            seat.member.demand_milli = r.demand_milli;
        }
        // It has reported since any shrink it was told: it holds no more.
        seat.member.outstanding = seat.member.assigned;
        if r.pools.is_empty() {
            // No limit applies to the group: nothing to share.
            send(streams, r.stream, &r.bucket_id, Assignment::AllowAll);
            return;
        }
        let ids: Vec<u64> = seats.keys().copied().collect();
        let members: Vec<Member> = ids.iter().map(|id| seats[id].member).collect();
        let (rates, bursts) = plan(&r.pools, &members);
        for (k, id) in ids.iter().enumerate() {
            let Some(seat) = seats.get_mut(id) else {
                continue;
            };
            let moved = rates[k] != seat.member.assigned;
            self.metrics
                .share(&scope, &seat.rules, -signed(seat.member.assigned));
            self.metrics.share(&scope, &r.rules, signed(rates[k]));
            seat.rules.clone_from(&r.rules);
            let m = &mut seat.member;
            m.outstanding = m.outstanding.max(m.assigned).max(rates[k]);
            m.assigned = rates[k];
            seat.burst = bursts[k];
            // While a bucket of the group is empty, every member is denied
            // instead; the shares stand for when the denial ends.
            let a = match r.deny_for {
                Some(wait) => Assignment::Deny(wait),
                None if moved || *id == r.stream => wire::assignment(rates[k], bursts[k]),
                None => continue,
            };
            send(streams, *id, &seat.bucket_id, a);
        }
    }

    /// Sends every member of `group` its share again, if its denial has
    /// ended by `now`; otherwise says when it ends. Without this each
    /// Envoy would fall back to its own `expired_assignment_behavior`
    /// until its next report.
    pub(crate) fn resend_if_due(&self, group: &GroupKey, now: Instant) -> Option<Instant> {
        let mut state = self.lock();
        match state.resends.get(group) {
            Some(&until) if until > now => return Some(until),
            _ => state.resends.remove(group),
        };
        let seats = state.groups.get(group)?;
        for (id, seat) in seats {
            let a = wire::assignment(seat.member.assigned, seat.burst);
            send(&state.streams, *id, &seat.bucket_id, a);
        }
        None
    }

    /// Records that `group` is denied until `until`; true when no timer
    /// is waiting for it yet, so the caller starts one.
    pub(crate) fn claim_resend(&self, group: &GroupKey, until: Instant) -> bool {
        match self.lock().resends.entry(group.clone()) {
            Entry::Occupied(mut e) => {
                let later = (*e.get()).max(until);
                e.insert(later);
                false
            }
            Entry::Vacant(e) => {
                e.insert(until);
                true
            }
        }
    }

    /// Takes a seat's share out of the metrics.
    fn vacate(&self, group: &GroupKey, seat: &Seat) {
        self.metrics.bucket(-1);
        self.metrics
            .share(&group.0, &seat.rules, -signed(seat.member.assigned));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the counts half-written: every
        // change under the lock is a few plain assignments.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Each member's share: the least any pool gives it, so that every pool's
/// sum stays within its limit; and its burst, the least of its parts.
fn plan(pools: &[Pool], members: &[Member]) -> (Vec<u64>, Vec<u64>) {
    let mut rates = vec![u64::MAX; members.len()];
    for pool in pools {
        for (r, new) in rates.iter_mut().zip(shares::rebalance(*pool, members)) {
            *r = (*r).min(new);
        }
    }
    let bursts = rates
        .iter()
        .map(|&rate| {
            pools
                .iter()
                .map(|p| shares::burst_of(*p, rate))
                .min()
                .unwrap_or(0)
        })
        .collect();
    (rates, bursts)
}

/// Sends one action to one stream, if it is still there and not behind.
/// A full outbox drops it: the stream's next report brings a fresh one.
fn send(streams: &HashMap<u64, Outbox>, id: u64, bucket_id: &BucketId, a: Assignment) {
    if let Some(outbox) = streams.get(&id) {
        let _ = outbox.try_send(Ok(wire::response(vec![wire::action(bucket_id, a)])));
    }
}
