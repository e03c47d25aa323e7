//! `envoy.service.rate_limit_quota.v3.RateLimitQuotaService`: Envoy's quota
//! streaming (RLQS).
//!
//! Each Envoy holds one stream per domain and reports, every 5 s, how many
//! requests each of its buckets allowed and denied. A stream's first
//! message names the domain (the scope); `rlqs.domains` names the
//! `BucketId` keys that are the identity and the operation. Tollgate
//! charges the reported allowed requests to the real buckets (so quota
//! traffic and `ShouldAllow` share one limit), and hands each stream a
//! share of every limit that applies ([`hub`], [`crate::limiter::shares`]).
//! Anything unmapped gets the `rlqs.unmatched` blanket rule. docs/rlqs.md.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_server::RateLimitQuotaService;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::{
    BucketId, RateLimitQuotaResponse, RateLimitQuotaUsageReports,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Settings;
use super::auth::{Caller, PeerInfo};
use super::validate::{
    self, MAX_DESCRIPTOR_ENTRIES, MAX_DESCRIPTOR_KEY_LEN, MAX_DESCRIPTOR_VALUE_LEN, MAX_SCOPE_LEN,
};
use crate::config::{MAX_CAPACITY, RlqsConfig, RlqsDomainConfig};
use crate::limiter::descriptors::canonical;
use crate::limiter::shares::Pool;
use crate::limiter::{self, Decision, Limiter};
use crate::observe::metrics::UNCONFIGURED;
use crate::observe::rlqs::RlqsMetrics;
use crate::store::Store;

pub mod hub;
pub mod wire;

use hub::{GroupKey, Hub, Outbox, Report};
use wire::Assignment;

/// A bucket reporting no request this many times in a row (Envoy reports
/// every 5 s, so about 15 s) is abandoned, and its share goes back.
pub const IDLE_REPORTS: u32 = 3;

/// A report sooner than this after the bucket's last one does not measure
/// its demand (Envoy reports every 5 s; a bucket's first report, and any
/// sent early, say only that it is there).
const MIN_MEASURED_MS: u64 = 1000;

/// Answers one stream may have queued; past it, pushes to it are dropped
/// until it reads (its next report brings fresh ones).
const OUTBOX: usize = 64;

/// Serves Envoy's RLQS over a shared limiter.
#[derive(Debug)]
pub struct QuotaApi<S> {
    limiter: Arc<Limiter<S, Settings>>,
    config: Arc<RlqsConfig>,
    hub: Arc<Hub>,
}

impl<S> QuotaApi<S> {
    /// Serves `limiter`'s scopes to quota streams under `config`. The
    /// mapping and bounds are read at start-up; a reload changes the rules
    /// and grants, not them.
    pub fn new(limiter: Arc<Limiter<S, Settings>>, config: RlqsConfig) -> Self {
        Self {
            limiter,
            config: Arc::new(config),
            hub: Arc::new(Hub::default()),
        }
    }

    /// The streams and what they hold, for metrics and tests.
    pub fn hub(&self) -> Arc<Hub> {
        self.hub.clone()
    }

    /// Counts streams, buckets, shares and reports in `metrics`.
    pub fn with_metrics(self, metrics: RlqsMetrics) -> Self {
        Self {
            hub: Arc::new(Hub::with_metrics(metrics)),
            ..self
        }
    }
}

#[tonic::async_trait]
impl<S: Store> RateLimitQuotaService for QuotaApi<S> {
    type StreamRateLimitQuotasStream = ReceiverStream<Result<RateLimitQuotaResponse, Status>>;

    async fn stream_rate_limit_quotas(
        &self,
        request: Request<Streaming<RateLimitQuotaUsageReports>>,
    ) -> Result<Response<Self::StreamRateLimitQuotasStream>, Status> {
        let caller = self
            .limiter
            .snapshot()
            .extra
            .access
            .identify("rlqs", &request)?;
        // The connection is its peer's address and port.
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.remote_addr);
        let (outbox, answers) = mpsc::channel(OUTBOX);
        let id = self
            .hub
            .open(peer, self.config.max_streams_per_connection, outbox.clone())?;
        let stream = Stream {
            id,
            peer,
            caller,
            domain: None,
            buckets: HashMap::new(),
            left: Vec::new(),
            limiter: self.limiter.clone(),
            config: self.config.clone(),
            hub: self.hub.clone(),
            outbox,
        };
        tokio::spawn(stream.run(request.into_inner()));
        Ok(Response::new(ReceiverStream::new(answers)))
    }
}

/// One open stream: its domain, its buckets, and where its answers go.
struct Stream<S> {
    id: u64,
    peer: Option<SocketAddr>,
    caller: Option<Arc<Caller>>,
    /// Set by the first message; a later one may repeat it, not change it.
    domain: Option<String>,
    /// Its buckets by their canonical `BucketId`.
    buckets: HashMap<String, Tracked>,
    /// Groups it abandoned while reading a message, to publish again.
    left: Vec<GroupKey>,
    limiter: Arc<Limiter<S, Settings>>,
    config: Arc<RlqsConfig>,
    hub: Arc<Hub>,
    outbox: Outbox,
}

/// What a stream remembers of one bucket.
struct Tracked {
    /// The group it draws on; `None` when unmapped.
    group: Option<GroupKey>,
    /// When its last report arrived, on this server's clock: Envoy's
    /// `time_elapsed` is whole seconds, too coarse for a rate.
    last: Instant,
    /// Reports in a row with no request.
    idle: u32,
}

/// One bucket of a message, after tracking.
struct Mapped {
    index: usize,
    group: GroupKey,
    allowed: u64,
    demand_milli: Option<u64>,
    /// Since the bucket's last report: its usage is spread over it.
    elapsed: Duration,
}

impl<S: Store> Stream<S> {
    async fn run(mut self, mut inbound: Streaming<RateLimitQuotaUsageReports>) {
        // The stream ends when Envoy closes it or it breaks, or when a
        // message is refused (its status is the stream's last answer).
        while let Ok(Some(m)) = inbound.message().await {
            if let Err(status) = self.on_message(m).await {
                let _ = self.outbox.send(Err(status)).await;
                break;
            }
        }
        for group in self.hub.close(self.id, self.peer) {
            self.hub.republish(self.limiter.store(), &group).await;
        }
    }

    async fn on_message(&mut self, m: RateLimitQuotaUsageReports) -> Result<(), Status> {
        let now = Instant::now();
        let domain = self.domain_of(&m.domain)?;
        let snapshot = self.limiter.snapshot();
        snapshot.extra.access.check_decision(
            "rlqs",
            self.caller.as_deref(),
            "domain",
            &domain,
            false,
        )?;
        validate_reports(&m, self.config.max_reports_per_message)?;
        let mapping = self
            .config
            .domain(&domain)
            .filter(|_| snapshot.rules.scope(&domain).is_some())
            .cloned();
        let scope_label = if snapshot.rules.scope(&domain).is_some() {
            domain.as_str()
        } else {
            UNCONFIGURED
        };
        let mut answers = Vec::new();
        let mut mapped = Vec::new();
        for (index, usage) in m.bucket_quota_usages.iter().enumerate() {
            let Some(id) = usage.bucket_id.as_ref() else {
                continue;
            };
            let (allowed, denied) = (usage.num_requests_allowed, usage.num_requests_denied);
            self.hub.metrics().report(scope_label, allowed, denied);
            let seen = allowed.saturating_add(denied);
            match self.track(id, &domain, mapping.as_ref(), seen, now) {
                Track::Answer(a) => answers.push(wire::action(id, a)),
                Track::Mapped(group, demand_milli, elapsed) => mapped.push(Mapped {
                    index,
                    group,
                    allowed: usage.num_requests_allowed,
                    demand_milli,
                    elapsed,
                }),
            }
        }
        if !answers.is_empty() {
            let _ = self.outbox.try_send(Ok(wire::response(answers)));
        }
        if !mapped.is_empty() {
            self.settle(&snapshot.rules, &domain, &m, mapped).await;
        }
        // Abandoned buckets give their shares back to the fleet.
        for group in std::mem::take(&mut self.left) {
            self.hub.republish(self.limiter.store(), &group).await;
        }
        Ok(())
    }

    /// The stream's domain: the first message sets it; a later one may
    /// leave it empty or repeat it.
    fn domain_of(&mut self, sent: &str) -> Result<String, Status> {
        match &self.domain {
            None => {
                validate::text("domain", sent, MAX_SCOPE_LEN, true)?;
                self.domain = Some(sent.to_owned());
                Ok(sent.to_owned())
            }
            Some(d) if sent.is_empty() || sent == d => Ok(d.clone()),
            Some(d) => Err(validate::invalid(
                "domain",
                format!("a stream keeps its first domain {d:?}; open another stream for {sent:?}"),
            )
            .into()),
        }
    }
}

/// What tracking a bucket decided.
enum Track {
    /// Answer it now with this, and do nothing else.
    Answer(Assignment),
    /// It draws on this group; its demand, when measured, and the time
    /// since its last report.
    Mapped(GroupKey, Option<u64>, Duration),
}

impl<S: Store> Stream<S> {
    /// Tracks one bucket's report: a new one takes a place (within
    /// `rlqs.max_buckets_per_stream`), an idle one is abandoned, a mapped
    /// one is measured.
    fn track(
        &mut self,
        id: &BucketId,
        domain: &str,
        mapping: Option<&RlqsDomainConfig>,
        seen: u64,
        now: Instant,
    ) -> Track {
        let key = bucket_key(id);
        let unmatched = Assignment::from(self.config.unmatched);
        if !self.buckets.contains_key(&key) {
            if self.buckets.len() >= self.config.max_buckets_per_stream {
                // Past the bound: answered, but nothing is kept for it.
                return Track::Answer(unmatched);
            }
            let group = mapping.and_then(|m| group_of(domain, m, id));
            let first = Tracked {
                group,
                last: now,
                idle: 0,
            };
            self.buckets.insert(key.clone(), first);
            return match &self.buckets[&key].group {
                Some(g) => Track::Mapped(g.clone(), None, Duration::ZERO),
                None => Track::Answer(unmatched),
            };
        }
        let Some(t) = self.buckets.get_mut(&key) else {
            return Track::Answer(unmatched);
        };
        t.idle = if seen == 0 { t.idle + 1 } else { 0 };
        let elapsed = now.saturating_duration_since(t.last);
        t.last = now;
        if t.idle >= IDLE_REPORTS {
            if let Some(g) = &t.group
                && self.hub.leave(self.id, g)
            {
                self.left.push(g.clone());
            }
            self.buckets.remove(&key);
            return Track::Answer(Assignment::Abandon);
        }
        match &t.group {
            None => Track::Answer(unmatched),
            Some(g) => Track::Mapped(g.clone(), demand_milli(seen, elapsed), elapsed),
        }
    }

    /// Charges the mapped buckets' allowed requests to the real buckets, in
    /// one store call, and hands each report to the hub with the limits
    /// that apply and whether one of them is empty.
    async fn settle(
        &self,
        rules: &limiter::Rules,
        domain: &str,
        m: &RateLimitQuotaUsageReports,
        mapped: Vec<Mapped>,
    ) {
        let requests: Vec<limiter::Request<'_>> = mapped
            .iter()
            .map(|b| limiter::Request {
                // A settle takes at most a bucket's capacity more; the
                // clamp keeps an Envoy's count within what the store takes.
                cost: b.allowed.min(MAX_CAPACITY),
                ..limiter::Request::new(domain, &b.group.1, &b.group.2)
            })
            .collect();
        let decisions = match self.limiter.charge_usage_on(rules, &requests).await {
            Ok(d) => d,
            // The store could not take it (failing closed): the shares
            // stand as they are, and the next report charges its own.
            Err(e) => {
                tracing::debug!(error = %e, "rlqs: usage not charged");
                return;
            }
        };
        for (b, d) in mapped.into_iter().zip(&decisions) {
            let Some(bucket_id) = m.bucket_quota_usages[b.index].bucket_id.clone() else {
                continue;
            };
            let deny_for = empty_for(d, b.elapsed);
            if let Some(wait) = deny_for {
                self.resend_after(b.group.clone(), wait);
            }
            let report = Report {
                stream: self.id,
                group: b.group,
                bucket_id,
                demand_milli: b.demand_milli,
                pools: pools(d),
                rules: d
                    .buckets
                    .iter()
                    .filter(|b| !b.shadow)
                    .map(|b| b.rule.clone())
                    .collect(),
                hash_tag: rules.hash_tag_of(domain),
                deny_for,
            };
            let group = report.group.clone();
            if self.hub.report(self.limiter.store(), report).await {
                self.retry_growth(group);
            }
        }
    }
}

impl<S: Store> Stream<S> {
    /// Publishes `group` again every [`hub::GROWTH_RETRY_EVERY`] while the
    /// store holds its growth back, up to [`hub::GROWTH_RETRIES`] times;
    /// one task per group.
    fn retry_growth(&self, group: GroupKey) {
        if !self.hub.claim_retry(&group) {
            return;
        }
        let (hub, limiter) = (self.hub.clone(), self.limiter.clone());
        tokio::spawn(async move {
            for _ in 0..hub::GROWTH_RETRIES {
                tokio::time::sleep(hub::GROWTH_RETRY_EVERY).await;
                if !hub.republish(limiter.store(), &group).await {
                    break;
                }
            }
            hub.end_retry(&group);
        });
    }
}

impl<S> Stream<S> {
    /// Gives `group` its shares back when a denial of `wait` (rounded up
    /// to whole seconds, as Envoy reads its TTL) ends.
    fn resend_after(&self, group: GroupKey, wait: Duration) {
        let wait = Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
        if !self.hub.claim_resend(&group, Instant::now() + wait) {
            return;
        }
        let hub = self.hub.clone();
        tokio::spawn(async move {
            let mut until = Instant::now() + wait;
            loop {
                tokio::time::sleep_until(until).await;
                match hub.resend_if_due(&group, Instant::now()) {
                    Some(later) => until = later,
                    None => break,
                }
            }
        });
    }
}

/// Requests per second over `elapsed`, in thousandths; `None` for an
/// interval too short to measure.
fn demand_milli(seen: u64, elapsed: Duration) -> Option<u64> {
    let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    (ms >= MIN_MEASURED_MS).then(|| seen.saturating_mul(1_000_000) / ms)
}

/// The limits of a decision's enforced buckets, as pools to share.
fn pools(d: &Decision) -> Vec<Pool> {
    d.buckets
        .iter()
        .filter(|b| !b.shadow)
        .map(|b| {
            let period = b.period.as_nanos().max(1);
            let rate = u128::from(b.limit) * 1_000_000_000_000 / period;
            Pool {
                rate_milli: u64::try_from(rate).unwrap_or(u64::MAX),
                burst: b.limit,
            }
        })
        .collect()
}

/// How long to deny the group: until every enforced bucket of `d` holds a
/// token again (a bucket's wait until full, less the time its other
/// `limit − 1` tokens take), less `elapsed`. The usage was charged at once
/// but spent over the interval since the last report, while the bucket
/// refilled, so only a wait longer than that interval says the group
/// spent more than the bucket could give.
fn empty_for(d: &Decision, elapsed: Duration) -> Option<Duration> {
    d.buckets
        .iter()
        .filter(|b| !b.shadow && b.remaining == 0 && b.limit > 0)
        .map(|b| {
            let rest = b.period.as_nanos() * u128::from(b.limit - 1) / u128::from(b.limit);
            let rest = Duration::from_nanos(u64::try_from(rest).unwrap_or(u64::MAX));
            b.reset_after.saturating_sub(rest).saturating_sub(elapsed)
        })
        .filter(|w| !w.is_zero())
        .max()
}

/// The group a bucket draws on, when its `BucketId` carries the identity.
fn group_of(domain: &str, m: &RlqsDomainConfig, id: &BucketId) -> Option<GroupKey> {
    let identity = id.bucket.get(&m.identity)?;
    let operation = m
        .operation
        .as_ref()
        .and_then(|k| id.bucket.get(k))
        .cloned()
        .unwrap_or_default();
    Some((domain.to_owned(), identity.clone(), operation))
}

/// A `BucketId` as one string, its entries sorted by key.
fn bucket_key(id: &BucketId) -> String {
    let mut entries: Vec<(&str, &str)> = id
        .bucket
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    entries.sort_unstable();
    canonical(&entries)
}

/// Checks a message's size and every `BucketId` in it.
fn validate_reports(m: &RateLimitQuotaUsageReports, max: usize) -> Result<(), Status> {
    let n = m.bucket_quota_usages.len();
    if n > max {
        return Err(validate::invalid(
            "bucket_quota_usages",
            format!("has {n} reports; the most allowed is {max} (rlqs.max_reports_per_message)"),
        )
        .into());
    }
    for (i, u) in m.bucket_quota_usages.iter().enumerate() {
        let at = format!("bucket_quota_usages[{i}].bucket_id");
        let Some(id) = &u.bucket_id else {
            return Err(validate::invalid(&at, "is required").into());
        };
        let entries = id.bucket.len();
        if entries == 0 || entries > MAX_DESCRIPTOR_ENTRIES {
            return Err(validate::invalid(
                &format!("{at}.bucket"),
                format!("has {entries} entries; 1 to {MAX_DESCRIPTOR_ENTRIES} are allowed"),
            )
            .into());
        }
        for (k, v) in &id.bucket {
            validate::text(&format!("{at}.bucket.key"), k, MAX_DESCRIPTOR_KEY_LEN, true)?;
            validate::text(
                &format!("{at}.bucket[{k}]"),
                v,
                MAX_DESCRIPTOR_VALUE_LEN,
                false,
            )?;
        }
    }
    Ok(())
}
