//! The streams of one replica and the shares they hold: who draws on which
//! group of buckets, what each was told, and the outboxes to tell them;
//! and what the rest of the fleet holds of each group, as the store says.
//!
//! One `std` mutex, held for plain computation and non-blocking sends only.
//! Each group is one (scope, identity, operation): the streams whose
//! `BucketId`s map to it draw on the same Tollgate buckets, so they split
//! each limit that applies. Shares are computed by
//! [`crate::limiter::shares`]; this file keeps the state between reports.
//!
//! Across replicas, each replica publishes per group what its streams may
//! hold, ask and number (`Store::demand`), and grows its streams' shares
//! only within what the store grants it, so the fleet's shares never sum
//! above the limit. A group's publications are serialized on this replica
//! (one async gate per group, held across the store call): the store's
//! entry for this replica then never says less than its streams may hold.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::service::rate_limit_quota::v3::{BucketId, RateLimitQuotaResponse};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;

use super::wire::{self, Assignment};
use crate::config::HashTag;
use crate::limiter::shares::{self, Fleet, Member, Pool};
use crate::observe::rlqs::RlqsMetrics;
use crate::store::{BucketKey, DemandAnswer, DemandCall, Others, Store, StoreError};

/// Where a stream's answers go.
pub(crate) type Outbox = mpsc::Sender<Result<RateLimitQuotaResponse, Status>>;

/// A group of buckets: (scope, identity, operation).
pub(crate) type GroupKey = (String, String, String);

/// How long a replica's entry for a group lives in the store unless
/// written again: longer than an assignment lives in Envoy
/// ([`wire::ASSIGNMENT_TTL`], 15 s) plus one report, so a replica that
/// stops writing (it died) is counted until every share it gave out has
/// expired in its Envoys.
pub const DEMAND_TTL: Duration = Duration::from_secs(20);

/// The most replicas a group keeps entries for; a replica past it gets no
/// share of that group (its streams are denied) until an entry expires.
pub const MAX_REPLICAS: u64 = 64;

/// While the store holds back a group's growth (another replica's streams
/// still hold the rest), the group is published again this often, up to
/// [`GROWTH_RETRIES`] times: a report interval, after which the streams'
/// own reports take over.
pub const GROWTH_RETRY_EVERY: Duration = Duration::from_secs(1);

/// See [`GROWTH_RETRY_EVERY`].
pub const GROWTH_RETRIES: u32 = 5;

/// Every stream of this replica, and the groups their buckets draw on.
#[derive(Debug)]
pub struct Hub {
    state: Mutex<State>,
    next: AtomicU64,
    /// This replica's id in the store's demand entries: random per process.
    replica: u64,
    /// Streams, seats and shares, as they change.
    metrics: RlqsMetrics,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            next: AtomicU64::default(),
            replica: replica_id(),
            metrics: RlqsMetrics::default(),
        }
    }
}

/// A random id for this process.
fn replica_id() -> u64 {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 8];
    // The system's random source failing leaves a fixed id: replicas then
    // share one entry, which still never over-admits (each keeps what it
    // was granted) but splits the limit less evenly.
    let _ = SystemRandom::new().fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

#[derive(Debug, Default)]
struct State {
    streams: HashMap<u64, Outbox>,
    /// Open streams per connection (the peer's address and port).
    connections: HashMap<Option<SocketAddr>, usize>,
    groups: HashMap<GroupKey, Group>,
    /// Groups whose shares are to be sent again when a denial ends, and
    /// when: one timer per group at most, however many reports arrive
    /// meanwhile, pushed back when a later denial runs longer.
    resends: HashMap<GroupKey, Instant>,
    /// Groups whose held-back growth is being retried: one task per group.
    retrying: HashSet<GroupKey>,
}

/// One group on this replica.
#[derive(Debug, Default)]
struct Group {
    seats: HashMap<u64, Seat>,
    /// The rest of the fleet, as the store last answered.
    others: Others,
    /// The limits that apply, their rule names, and the scope's hash tag,
    /// as of the last report: to publish again when a stream leaves.
    pools: Vec<Pool>,
    rules: Vec<Arc<str>>,
    hash_tag: HashTag,
    /// Held across a publication: one at a time per group.
    gate: Arc<tokio::sync::Mutex<()>>,
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
    /// The scope's hash tag, to place the group's demand in the store.
    pub(crate) hash_tag: HashTag,
    /// Set when a bucket of the group is empty: deny everywhere this long.
    pub(crate) deny_for: Option<Duration>,
}

/// What one publication asks the store, prepared under the lock.
struct Publication {
    /// The binding limit's rule, which names the store's entry.
    rule: Arc<str>,
    /// Places the entry in the scope's slot.
    hash_tag: HashTag,
    /// What the streams would hold at their targets, with what they still
    /// hold: the most this replica asks to hold.
    held_milli: u64,
    /// What they ask for, for the other replicas' water-fill.
    ask_milli: u64,
    /// How many they are, likewise.
    streams: u64,
    /// The binding limit's rate, which live entries never sum above.
    limit_milli: u64,
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

    /// Forgets a stream and every share it held; answers the groups it
    /// left, to publish again.
    pub(crate) fn close(&self, stream: u64, peer: Option<SocketAddr>) -> Vec<GroupKey> {
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
        let mut left = Vec::new();
        for (key, group) in &mut state.groups {
            if let Some(seat) = group.seats.remove(&stream) {
                self.vacate(key, &seat);
                left.push(key.clone());
            }
        }
        left
    }

    /// Gives up one stream's seat in `group` (an abandoned bucket); true
    /// when it held one, so the group is to be published again.
    pub(crate) fn leave(&self, stream: u64, group: &GroupKey) -> bool {
        let mut state = self.lock();
        let seat = state
            .groups
            .get_mut(group)
            .and_then(|g| g.seats.remove(&stream));
        if let Some(seat) = &seat {
            self.vacate(group, seat);
        }
        seat.is_some()
    }

    /// Open streams, and seats held across all groups.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        let seats = state.groups.values().map(|g| g.seats.len()).sum();
        (state.streams.len(), seats)
    }

    /// Takes in a report: confirms what the stream held, publishes the
    /// group's demand to the store, rebalances the group within what the
    /// store grants, and sends every stream whose share moved its new one
    /// (and the reporter its own, unchanged or not, which extends it).
    /// True when the store granted less than the streams' targets: other
    /// replicas still hold the rest (see [`Hub::republish`]).
    pub(crate) async fn report<S: Store>(&self, store: &S, r: Report) -> bool {
        let gate = self.gate(&r.group);
        let _one_at_a_time = gate.lock().await;
        let Some(publication) = self.prepare(Some(&r), &r.group) else {
            return false;
        };
        let answer = self.publish(store, &r.group, &publication).await;
        let blocked = held_back(&answer, &publication);
        self.apply(Some(&r), &r.group, answer);
        blocked
    }

    /// Publishes `group` again: after a stream left it, so the others (here
    /// and on other replicas) may grow into what it gave back; and while
    /// its growth is held back, so it grows as soon as another replica's
    /// streams have confirmed a shrink, not only at its own next report.
    /// Forgets the group once no stream of this replica draws on it. True
    /// while growth is still held back.
    pub(crate) async fn republish<S: Store>(&self, store: &S, group: &GroupKey) -> bool {
        let gate = self.gate(group);
        let _one_at_a_time = gate.lock().await;
        let mut blocked = false;
        if let Some(publication) = self.prepare(None, group) {
            let answer = self.publish(store, group, &publication).await;
            blocked = held_back(&answer, &publication);
            self.apply(None, group, answer);
        }
        let mut state = self.lock();
        if state.groups.get(group).is_some_and(|g| g.seats.is_empty()) {
            state.groups.remove(group);
            blocked = false;
        }
        blocked
    }

    /// Claims the retries of `group`'s held-back growth: true when none
    /// runs for it yet, so the caller starts one (and ends it).
    pub(crate) fn claim_retry(&self, group: &GroupKey) -> bool {
        self.lock().retrying.insert(group.clone())
    }

    /// Ends the retries of `group`.
    pub(crate) fn end_retry(&self, group: &GroupKey) {
        self.lock().retrying.remove(group);
    }

    /// The group's gate, creating the group if new.
    fn gate(&self, group: &GroupKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut state = self.lock();
        state.groups.entry(group.clone()).or_default().gate.clone()
    }

    /// Under the lock: records the report (demand, confirmation of what the
    /// stream held) and says what to publish: what the group's streams
    /// would hold if each reached its target among the fleet as last seen.
    /// `None` when there is nothing to share (no limit applies: the
    /// reporter is told so).
    fn prepare(&self, r: Option<&Report>, key: &GroupKey) -> Option<Publication> {
        let mut state = self.lock();
        let State {
            streams, groups, ..
        } = &mut *state;
        let group = groups.get_mut(key)?;
        if let Some(r) = r {
            group.pools.clone_from(&r.pools);
            group.rules.clone_from(&r.rules);
            group.hash_tag = r.hash_tag;
            let seat = group.seats.entry(r.stream).or_insert_with(|| {
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
                send(streams, r.stream, &r.bucket_id, Assignment::AllowAll);
                return None;
            }
        }
        let (binding, rule) = binding(&group.pools, &group.rules)?;
        let members: Vec<Member> = group.seats.values().map(|s| s.member).collect();
        let fleet = fleet_of(group.others);
        let targets = fleet_targets(&group.pools, &members, fleet);
        Some(Publication {
            rule,
            hash_tag: group.hash_tag,
            held_milli: shares::wanted(&members, &targets),
            ask_milli: shares::asks(binding, &members, fleet)
                .into_iter()
                .fold(0, u64::saturating_add),
            streams: members.len() as u64,
            limit_milli: binding.rate_milli,
        })
    }

    /// Asks the store for the group's share of the fleet.
    async fn publish<S: Store>(
        &self,
        store: &S,
        group: &GroupKey,
        p: &Publication,
    ) -> Result<DemandAnswer, StoreError> {
        let call = DemandCall {
            key: BucketKey {
                scope: &group.0,
                rule: &p.rule,
                identity: Some(&group.1),
                operation: Some(&group.2),
                hash_tag: p.hash_tag,
            },
            replica: self.replica,
            held_milli: p.held_milli,
            ask_milli: p.ask_milli,
            streams: p.streams,
            limit_milli: p.limit_milli,
            ttl_us: u64::try_from(DEMAND_TTL.as_micros()).unwrap_or(u64::MAX),
            max_replicas: MAX_REPLICAS,
        };
        let answer = store.demand(&call).await;
        if let Err(e) = &answer {
            tracing::debug!(error = %e, "rlqs: demand not shared; shares may shrink, not grow");
        }
        answer
    }

    /// Under the lock: rebalances the group within what the store granted
    /// (on a store failure, within what its streams hold: nothing grows)
    /// and sends what moved.
    fn apply(&self, r: Option<&Report>, key: &GroupKey, answer: Result<DemandAnswer, StoreError>) {
        let mut state = self.lock();
        let State {
            streams, groups, ..
        } = &mut *state;
        let Some(group) = groups.get_mut(key) else {
            return;
        };
        let ids: Vec<u64> = group.seats.keys().copied().collect();
        let members: Vec<Member> = ids.iter().map(|id| group.seats[id].member).collect();
        let cap = match answer {
            Ok(a) => {
                group.others = a.others;
                a.granted_milli
            }
            Err(_) => shares::held(&members),
        };
        let fleet = fleet_of(group.others);
        let (rates, bursts) = plan(&group.pools, &members, fleet, cap);
        let rules = group.rules.clone();
        for (k, id) in ids.iter().enumerate() {
            let Some(seat) = group.seats.get_mut(id) else {
                continue;
            };
            let moved = rates[k] != seat.member.assigned;
            self.metrics
                .share(&key.0, &seat.rules, -signed(seat.member.assigned));
            self.metrics.share(&key.0, &rules, signed(rates[k]));
            seat.rules.clone_from(&rules);
            let m = &mut seat.member;
            m.outstanding = m.outstanding.max(m.assigned).max(rates[k]);
            m.assigned = rates[k];
            seat.burst = bursts[k];
            let reporter = r.is_some_and(|r| r.stream == *id);
            // While a bucket of the group is empty, every member is denied
            // instead; the shares stand for when the denial ends.
            let a = match r.and_then(|r| r.deny_for) {
                Some(wait) => Assignment::Deny(wait),
                None if moved || reporter => wire::assignment(rates[k], bursts[k]),
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
        let seats = &state.groups.get(group)?.seats;
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

/// True when the store answered with less than the group asked for.
fn held_back(answer: &Result<DemandAnswer, StoreError>, p: &Publication) -> bool {
    answer
        .as_ref()
        .is_ok_and(|a| a.granted_milli < p.held_milli)
}

/// The limit that binds the group in the store: the one of least rate.
/// The fleet's entries for the group are checked against it, which keeps
/// every limit's sum within its rate, since all share one set of streams.
fn binding(pools: &[Pool], rules: &[Arc<str>]) -> Option<(Pool, Arc<str>)> {
    let (pool, rule) = pools.iter().zip(rules).min_by_key(|(p, _)| p.rate_milli)?;
    Some((*pool, rule.clone()))
}

fn fleet_of(others: Others) -> Fleet {
    Fleet {
        streams: others.streams,
        ask_milli: others.ask_milli,
    }
}

/// Each member's target among the fleet: the least any pool gives it.
fn fleet_targets(pools: &[Pool], members: &[Member], fleet: Fleet) -> Vec<u64> {
    let mut out = vec![u64::MAX; members.len()];
    for pool in pools {
        for (t, new) in out
            .iter_mut()
            .zip(shares::targets_among(*pool, members, fleet))
        {
            *t = (*t).min(new);
        }
    }
    out
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Each member's share: the least any pool gives it, growing only within
/// `cap` (what the store granted this replica) and each pool's rate, so
/// that every pool's sum stays within its limit; and its burst, the least
/// of its parts.
fn plan(pools: &[Pool], members: &[Member], fleet: Fleet, cap: u64) -> (Vec<u64>, Vec<u64>) {
    let mut rates = vec![u64::MAX; members.len()];
    for pool in pools {
        let targets = shares::targets_among(*pool, members, fleet);
        let new = shares::rebalance_to(members, &targets, cap.min(pool.rate_milli));
        for (r, new) in rates.iter_mut().zip(new) {
            *r = (*r).min(new);
        }
    }
    if pools.is_empty() {
        rates.fill(0);
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
