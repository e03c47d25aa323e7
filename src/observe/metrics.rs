//! Prometheus metrics, served over HTTP on a port of their own.
//!
//! Labels have bounded cardinality: `scope` is a configured scope name (or
//! `_unconfigured`), `rule` a configured rule name; no label ever carries an
//! identity, an operation, or any other caller-chosen string.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::limiter::{Decision, Rules};
use crate::store::{Condition, StoreError, StoreObserver};

/// The `scope` label of requests for scopes that are not configured.
pub const UNCONFIGURED: &str = "_unconfigured";

/// How a decision ended: `allowed`, `denied`, `degraded` (allowed without
/// the store, fail-open) or `unavailable` (the store failed, fail-closed).
type Outcome = &'static str;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    api: &'static str,
    scope: Arc<str>,
    rule: Arc<str>,
    result: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    api: &'static str,
    scope: Arc<str>,
    rule: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccessLabels {
    api: &'static str,
    caller: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreErrorLabels {
    transient: bool,
}

/// Every metric Tollgate exports.
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    shadow_denials: Family<RuleLabels, Counter>,
    decision_seconds: Histogram,
    store_seconds: Histogram,
    store_errors: Family<StoreErrorLabels, Counter>,
    store_available: Gauge<i64, AtomicI64>,
    store_clock_skew: Gauge<f64, AtomicU64>,
    store_evicting: Gauge<i64, AtomicI64>,
    reloads: Family<ReloadLabels, Counter>,
    audit_suppressed: Counter<u64, AtomicU64>,
    access_denied: Family<AccessLabels, Counter>,
    calls_shed: Counter<u64, AtomicU64>,
    settles: Family<ReloadLabels, Counter>,
    shaping: Shaping,
    /// Envoy quota streaming's series.
    pub rlqs: super::rlqs::RlqsMetrics,
    /// Penalty-box strikes and bans started, by configured scope.
    penalties: PenaltyMetrics,
    leases: Leases,
}

struct PenaltyMetrics {
    strikes: Family<ScopeLabels, Counter>,
    bans_started: Family<ScopeLabels, Counter>,
    active: Family<ScopeLabels, Gauge<i64, AtomicI64>>,
    /// 1 while other replicas' operator changes reach this one at once.
    changes_heard: Gauge<i64, AtomicI64>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeaseLabels {
    scope: Arc<str>,
    rule: Arc<str>,
    call: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    scope: Arc<str>,
    rule: Arc<str>,
}

/// Concurrency limits' metrics (issue 20): lease calls by result, and
/// leases that expired without a release (a caller died or forgot).
struct Leases {
    calls: Family<LeaseLabels, Counter>,
    expired: Family<PoolLabels, Counter>,
    in_flight: Family<PoolLabels, Gauge>,
    /// What `in_flight` is set from at each scrape.
    seen: super::in_flight::InFlight,
}

impl Leases {
    fn register(registry: &mut Registry) -> Self {
        let calls = Family::<LeaseLabels, Counter>::default();
        registry.register(
            "lease_calls",
            "Lease calls (acquire, renew, release) by scope, rule and result",
            calls.clone(),
        );
        let expired = Family::<PoolLabels, Counter>::default();
        registry.register(
            "leases_expired",
            "Leases removed at their expiry, never released, by scope and rule: the leak signal",
            expired.clone(),
        );
        let in_flight = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "leases_in_flight",
            "Weight held by live leases, by scope and rule, in the pools this replica called on \
             within their max_lease (see docs/leases.md#metrics)",
            in_flight.clone(),
        );
        Self {
            calls,
            expired,
            in_flight,
            seen: super::in_flight::InFlight::default(),
        }
    }

    /// Sets the gauge from the pools seen, at `now`.
    fn refresh(&self, now: tokio::time::Instant) {
        for ((scope, rule), sum) in self.seen.sums(now) {
            let labels = PoolLabels { scope, rule };
            self.in_flight
                .get_or_create(&labels)
                .set(i64::try_from(sum).unwrap_or(i64::MAX));
        }
    }
}

/// Shaping's metrics (issue 24): admissions with a delay, and the delays.
struct Shaping {
    delayed: Family<RuleLabels, Counter>,
    delay_seconds: Family<RuleLabels, Histogram, fn() -> Histogram>,
}

impl Shaping {
    fn register(registry: &mut Registry) -> Self {
        let delayed = Family::<RuleLabels, Counter>::default();
        registry.register(
            "delayed_admissions",
            "Requests allowed with a delay (shaping), by API, scope and rule",
            delayed.clone(),
        );
        let delay_seconds: Family<RuleLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| {
                // 1ms .. ~2.5 min: a limit's max_delay is at most 1h.
                Histogram::new(exponential_buckets(1e-3, 2.5, 14))
            });
        registry.register(
            "admission_delay_seconds",
            "The delay of each request allowed with one (shaping), by API, scope and rule",
            delay_seconds.clone(),
        );
        Self {
            delayed,
            delay_seconds,
        }
    }

    fn record(&self, labels: RuleLabels, delay: Duration) {
        self.delay_seconds
            .get_or_create(&labels)
            .observe(delay.as_secs_f64());
        self.delayed.get_or_create(&labels).inc();
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The two latency histograms: a whole decision, and one store call.
fn register_durations(registry: &mut Registry) -> (Histogram, Histogram) {
    // 1µs .. ~4s: the embedded store answers in microseconds, Redis in
    // fractions of a millisecond, a struggling Redis in its timeout.
    let decision_seconds = Histogram::new(exponential_buckets(1e-6, 2.5, 17));
    registry.register(
        "decision_duration_seconds",
        "Time to decide one request, input validation to answer",
        decision_seconds.clone(),
    );
    let store_seconds = Histogram::new(exponential_buckets(1e-6, 2.5, 17));
    registry.register(
        "store_duration_seconds",
        "Time of one call to the store",
        store_seconds.clone(),
    );
    (decision_seconds, store_seconds)
}

fn register_settles(registry: &mut Registry) -> Family<ReloadLabels, Counter> {
    let settles = Family::<ReloadLabels, Counter>::default();
    registry.register(
        "settles",
        "Settles of reservations by result: settled, already_settled, expired, invalid, unavailable",
        settles.clone(),
    );
    settles
}

/// The gauges of the store's condition: available, clock skew, and an
/// evicting policy.
fn register_store_condition(
    registry: &mut Registry,
) -> (
    Gauge<i64, AtomicI64>,
    Gauge<f64, AtomicU64>,
    Gauge<i64, AtomicI64>,
) {
    let store_available = Gauge::default();
    registry.register(
        "store_available",
        "1 while the store answers, 0 while it is down (circuit open)",
        store_available.clone(),
    );
    let store_clock_skew = Gauge::<f64, AtomicU64>::default();
    registry.register(
        "store_clock_skew_seconds",
        "Redis's clock minus this replica's, from the last script reply (0 until measured)",
        store_clock_skew.clone(),
    );
    let store_evicting = Gauge::default();
    registry.register(
        "store_evicting_policy",
        "1 while Redis's maxmemory-policy can evict Tollgate's keys (see store.redis.on_evicting_policy)",
        store_evicting.clone(),
    );
    (store_available, store_clock_skew, store_evicting)
}

/// Known series exist from the start, at zero: a dashboard panel or a
/// `rate()` alert then sees 0, not nothing, before the first event.
fn zero_known_series(
    reloads: &Family<ReloadLabels, Counter>,
    store_errors: &Family<StoreErrorLabels, Counter>,
) {
    for result in ["accepted", "refused"] {
        reloads.get_or_create(&ReloadLabels { result }).inc_by(0);
    }
    for transient in [true, false] {
        store_errors
            .get_or_create(&StoreErrorLabels { transient })
            .inc_by(0);
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Decisions by API, scope, deciding rule and result",
            decisions.clone(),
        );
        let shadow_denials = Family::<RuleLabels, Counter>::default();
        registry.register(
            "shadow_denials",
            "Requests a shadow limit would have denied (it did not)",
            shadow_denials.clone(),
        );
        let (decision_seconds, store_seconds) = register_durations(&mut registry);
        let store_errors = Family::<StoreErrorLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Store calls that failed",
            store_errors.clone(),
        );
        let (store_available, store_clock_skew, store_evicting) =
            register_store_condition(&mut registry);
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads by result",
            reloads.clone(),
        );
        let audit_suppressed = Counter::default();
        registry.register(
            "audit_lines_suppressed",
            "Denial audit lines dropped by the audit log's own rate limit",
            audit_suppressed.clone(),
        );
        let access_denied = Family::<AccessLabels, Counter>::default();
        registry.register(
            "access_denied",
            "Calls refused by caller authorization, by API and configured caller name",
            access_denied.clone(),
        );
        let calls_shed = Counter::default();
        registry.register(
            "calls_shed",
            "Calls refused with RESOURCE_EXHAUSTED because grpc.max_in_flight were running",
            calls_shed.clone(),
        );
        zero_known_series(&reloads, &store_errors);
        Self {
            rlqs: super::rlqs::RlqsMetrics::register(&mut registry),
            shaping: Shaping::register(&mut registry),
            penalties: register_penalties(&mut registry), // before `registry` moves
            leases: Leases::register(&mut registry),
            settles: register_settles(&mut registry),
            registry,
            access_denied,
            calls_shed,
            decisions,
            shadow_denials,
            decision_seconds,
            store_seconds,
            store_errors,
            store_available,
            store_clock_skew,
            store_evicting,
            reloads,
            audit_suppressed,
        }
    }

    /// Counts one lease call of a configured pool (`scope` and `rule` come
    /// from the config, so labels stay bounded), and the expired leases it
    /// found.
    pub fn lease(
        &self,
        scope: &Arc<str>,
        rule: &Arc<str>,
        call: &'static str,
        result: &'static str,
        expired: u64,
    ) {
        let labels = LeaseLabels {
            scope: scope.clone(),
            rule: rule.clone(),
            call,
            result,
        };
        self.leases.calls.get_or_create(&labels).inc();
        if expired > 0 {
            let pool = PoolLabels {
                scope: scope.clone(),
                rule: rule.clone(),
            };
            self.leases.expired.get_or_create(&pool).inc_by(expired);
        }
    }

    /// Notes a pool's weight in flight after a lease call the store
    /// answered (`d.seen`), for `tollgate_leases_in_flight`; `scope` is a
    /// configured scope, `d.rule` a configured rule.
    pub fn lease_seen(&self, scope: &Arc<str>, d: &crate::limiter::LeaseDecision) {
        let Some(seen) = d.seen.filter(|_| !d.rule.is_empty()) else {
            return;
        };
        let labels = (scope.clone(), d.rule.clone());
        let now = tokio::time::Instant::now();
        self.leases
            .seen
            .record(&labels, seen.id, d.in_flight, seen.max_lease, now);
    }

    /// Counts one decision of `api` ("tollgate" or "envoy") and its latency.
    pub fn decision(
        &self,
        api: &'static str,
        rules: &Rules,
        scope: &str,
        decision: &Decision,
        took: Duration,
    ) {
        let (scope, rule) = labels(rules, scope, decision);
        let result = if decision.degraded {
            "degraded"
        } else if decision.allowed {
            "allowed"
        } else if decision.banned() {
            "banned"
        } else {
            "denied"
        };
        if decision.penalty.struck {
            let labels = ScopeLabels {
                scope: scope.clone(),
            };
            self.penalties.strikes.get_or_create(&labels).inc();
            if decision.penalty.banned.is_some_and(|b| b.started) {
                self.penalties.bans_started.get_or_create(&labels).inc();
            }
        }
        for b in decision.buckets.iter().filter(|b| b.shadow && b.exhausted) {
            self.shadow_denials
                .get_or_create(&RuleLabels {
                    api,
                    scope: scope.clone(),
                    rule: b.rule.clone(),
                })
                .inc();
        }
        if decision.allowed && !decision.delay.is_zero() {
            let labels = RuleLabels {
                api,
                scope: scope.clone(),
                rule: rule.clone(),
            };
            self.shaping.record(labels, decision.delay);
        }
        self.decisions
            .get_or_create(&DecisionLabels {
                api,
                scope,
                rule,
                result,
            })
            .inc();
        self.decision_seconds.observe(took.as_secs_f64());
    }

    /// Makes the shadow-denial series of every shadow limit in `rules`
    /// exist at zero, on both APIs, so they are there before the first
    /// shadow denial (at start and after each reload). Series of limits a
    /// reload removed stay, as counters do.
    pub fn known_rules(&self, rules: &Rules) {
        for scope in rules.scopes() {
            let descriptors = scope.descriptor_tree.limits();
            let limits = scope.limits.iter().chain(descriptors);
            for limit in limits.filter(|l| l.shadow) {
                for api in ["tollgate", "envoy"] {
                    self.shadow_denials
                        .get_or_create(&RuleLabels {
                            api,
                            scope: scope.name.clone(),
                            rule: limit.name.clone(),
                        })
                        .inc_by(0);
                }
            }
        }
    }

    /// Makes the penalty series of every scope with a penalty box exist at
    /// zero (at start and after each reload).
    pub fn known_penalties(&self, rules: &Rules) {
        for scope in rules.scopes().filter(|s| s.penalty.is_some()) {
            let labels = ScopeLabels {
                scope: scope.name.clone(),
            };
            self.penalties.strikes.get_or_create(&labels).inc_by(0);
            self.penalties.bans_started.get_or_create(&labels).inc_by(0);
            let _ = self.penalties.active.get_or_create(&labels);
        }
    }

    /// Sets how many callers of `scope` are banned now.
    pub fn bans_active(&self, scope: &Arc<str>, banned: u64) {
        let labels = ScopeLabels {
            scope: scope.clone(),
        };
        let n = i64::try_from(banned).unwrap_or(i64::MAX);
        self.penalties.active.get_or_create(&labels).set(n);
    }

    /// Counts a decision refused because the store failed in closed mode.
    pub fn unavailable(&self, api: &'static str, rules: &Rules, scope: &str) {
        let (scope, _) = labels(rules, scope, &Decision::default());
        self.decisions
            .get_or_create(&DecisionLabels {
                api,
                scope,
                rule: "".into(),
                result: "unavailable",
            })
            .inc();
    }

    /// Counts a settle by its result: `settled`, `already_settled`,
    /// `expired`, `invalid` or `unavailable`.
    pub fn settle(&self, result: &'static str) {
        self.settles.get_or_create(&ReloadLabels { result }).inc();
    }

    /// Exports what the store knows of its backend (read by the health
    /// watcher, not per call).
    pub fn store_condition(&self, condition: &Condition) {
        let skew = condition.clock_skew_us.unwrap_or(0);
        self.store_clock_skew.set(skew as f64 / 1e6);
        self.store_evicting
            .set(i64::from(condition.evicting_policy.is_some()));
        self.penalties
            .changes_heard
            .set(i64::from(condition.ban_changes_heard.unwrap_or(true)));
    }

    /// Counts a config reload.
    pub fn reload(&self, accepted: bool) {
        let result = if accepted { "accepted" } else { "refused" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// Counts a call refused by authorization. `caller` must be a configured
    /// name or `_unauthenticated`, never something a caller sent.
    pub fn access_denied(&self, api: &'static str, caller: &str) {
        self.access_denied
            .get_or_create(&AccessLabels {
                api,
                caller: caller.into(),
            })
            .inc();
    }

    /// Counts a call shed at the in-flight cap.
    pub fn call_shed(&self) {
        self.calls_shed.inc();
    }

    /// Counts an audit line that was not written.
    pub fn audit_suppressed(&self) {
        self.audit_suppressed.inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        self.leases.refresh(tokio::time::Instant::now());
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The bounded labels of a decision: configured names only.
fn labels(rules: &Rules, scope: &str, decision: &Decision) -> (Arc<str>, Arc<str>) {
    match rules.scope(scope) {
        Some(s) => (
            s.name.clone(),
            decision
                .primary()
                .map_or_else(|| "".into(), |b| b.rule.clone()),
        ),
        None => (UNCONFIGURED.into(), "".into()),
    }
}

fn register_penalties(registry: &mut Registry) -> PenaltyMetrics {
    let strikes = Family::<ScopeLabels, Counter>::default();
    registry.register(
        "penalty_strikes",
        "Denials counted as strikes by a scope's penalty box",
        strikes.clone(),
    );
    let bans = Family::<ScopeLabels, Counter>::default();
    registry.register(
        "bans_started",
        "Bans a scope's penalty box started (strikes reached)",
        bans.clone(),
    );
    let active = Family::<ScopeLabels, Gauge<i64, AtomicI64>>::default();
    registry.register(
        "bans_active",
        "Callers banned now in a scope, as the store lists them (read every 10 s)",
        active.clone(),
    );
    let changes_heard = Gauge::default();
    registry.register(
        "ban_changes_subscribed",
        "1 while this replica hears other replicas' operator bans and unbans at once (or, on the embedded store, has none to hear); 0 while its subscription is down and its ban cache holds a ban at most 1 s",
        changes_heard.clone(),
    );
    PenaltyMetrics {
        strikes,
        bans_started: bans,
        active,
        changes_heard,
    }
}

/// The store reports each call here (see [`crate::store::observed`]).
impl StoreObserver for Metrics {
    fn store_called(&self, took: Duration) {
        self.store_seconds.observe(took.as_secs_f64());
    }

    fn store_available(&self, available: bool) {
        self.store_available.set(i64::from(available));
    }

    fn store_failed(&self, error: &StoreError) {
        self.store_errors
            .get_or_create(&StoreErrorLabels {
                transient: error.transient,
            })
            .inc();
    }
}

/// Serves `GET /metrics`, and the routes of `more` (the status page), on
/// `listener` (plain TCP, or the server's TLS listener) until `shutdown`
/// resolves.
pub async fn serve<L>(
    listener: L,
    metrics: Arc<Metrics>,
    more: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: fmt::Debug,
{
    let app = more.route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
