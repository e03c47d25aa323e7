//! `envoy.service.ratelimit.v3.RateLimitService`: Envoy's rate-limit API.
//!
//! The request's `domain` is the scope, and each descriptor becomes one
//! limiter request:
//! - its entries, in order, select a limit from the scope's descriptor rules
//!   (scopes loaded from envoyproxy/ratelimit YAML);
//! - the scope's `descriptor_keys` name the entries that are the identity and
//!   the operation; without them the whole descriptor (`user=alice,path=/x`)
//!   is the identity, so each distinct descriptor has its own buckets;
//! - every entry is also an attribute, for `when`.
//!
//! All descriptors of a request are decided together: if any is over its
//! limit, none takes tokens. A descriptor that reaches a concurrency limit
//! holds a lease named by its `descriptor_keys.lease_id` entry, with the
//! rates, all or nothing (`lease.rs`).

mod lease;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit, rate_limit::Unit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use tonic::{Request, Response, Status};

use super::Settings;
use super::auth::Privilege;
use super::headers::Draft;
use super::validate::{
    self, MAX_DESCRIPTOR_ENTRIES, MAX_DESCRIPTOR_KEY_LEN, MAX_DESCRIPTOR_VALUE_LEN, MAX_SCOPE_LEN,
};
use crate::config::security::DEFAULT_MAX_ENVOY_DESCRIPTORS;
use crate::error::InvalidField;
use crate::limiter::descriptors::canonical;
use crate::limiter::{self, BucketReport, Decision, LeaseError, Limiter, Priority, ScopeRules};
use crate::observe::Observer;
use crate::store::Store;

/// The most descriptors a request may carry without the `batch` grant.
/// Envoy sends one per `rate_limits` action that matches (route and virtual
/// host together), which is a handful; more is a batch of decisions.
pub const UNBATCHED_DESCRIPTORS: usize = 8;

/// Serves Envoy's RLS v3 over a shared limiter.
#[derive(Debug)]
pub struct EnvoyRateLimitApi<S> {
    /// Its snapshot also says who may call and which rate-limit headers
    /// answers carry.
    limiter: Arc<Limiter<S, Settings>>,
    /// Counts, times and audits decisions, denials per rule included.
    observer: Arc<Observer>,
    /// `grpc.max_envoy_descriptors`.
    max_descriptors: usize,
}

impl<S> EnvoyRateLimitApi<S> {
    /// Serves `limiter` to the callers its snapshot grants (the domain is
    /// the scope), reporting to `observer`.
    pub fn new(limiter: Arc<Limiter<S, Settings>>, observer: Arc<Observer>) -> Self {
        Self {
            limiter,
            observer,
            max_descriptors: DEFAULT_MAX_ENVOY_DESCRIPTORS,
        }
    }

    /// Accepts requests of up to `max_descriptors` descriptors.
    pub fn with_max_descriptors(self, max_descriptors: usize) -> Self {
        Self {
            max_descriptors,
            ..self
        }
    }
}

/// One descriptor, validated and translated; a limiter request borrows it.
struct Described<'a> {
    entries: Vec<(&'a str, &'a str)>,
    identity: Cow<'a, str>,
    operation: &'a str,
    attributes: HashMap<String, String>,
    cost: u64,
    priority: Priority,
    kind: Kind,
    /// The lease id, when the descriptor reaches one of the scope's
    /// concurrency limits: it acquires that lease (a check: would it
    /// fit?), or with `is_negative_hits` releases it.
    lease: Option<&'a str>,
}

/// What a descriptor asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Take its hits: the usual case.
    Charge,
    /// `hits_addend: 0`: would one more hit pass? Takes nothing.
    Check,
    /// `is_negative_hits`: give its hits back. Always OK.
    Refund,
}

impl<'a> Described<'a> {
    fn request(&'a self, scope: &'a str) -> limiter::Request<'a> {
        limiter::Request {
            scope,
            identity: &self.identity,
            operation: self.operation,
            cost: self.cost,
            dry_run: self.kind == Kind::Check,
            attributes: &self.attributes,
            entries: &self.entries,
            priority: self.priority,
            settle_within: None,
            caller: None,
            // Envoy's RLS v3 has no delay: a limit with `max_delay` answers
            // it as it would any caller that cannot wait.
            max_wait: None,
            strike: false,
        }
    }
}

/// Validates the request; translates each descriptor under the rules of
/// its `scope` (its domain), if configured.
fn to_domain<'a>(
    req: &'a RateLimitRequest,
    scope: Option<&ScopeRules>,
    max_descriptors: usize,
) -> Result<Vec<Described<'a>>, InvalidField> {
    validate::text("domain", &req.domain, MAX_SCOPE_LEN, true)?;
    if req.descriptors.is_empty() {
        return Err(validate::invalid("descriptors", "must not be empty"));
    }
    if req.descriptors.len() > max_descriptors {
        return Err(validate::invalid(
            "descriptors",
            format!(
                "has {} entries; the most allowed is {max_descriptors} (grpc.max_envoy_descriptors)",
                req.descriptors.len()
            ),
        ));
    }
    req.descriptors
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let at = format!("descriptors[{i}]");
            let mut described = describe(d, &at, req.hits_addend, scope)?;
            described.lease = lease::lease_id(&described, scope, &req.domain, &at)?;
            Ok(described)
        })
        .collect()
}

fn describe<'a>(
    d: &'a RateLimitDescriptor,
    at: &str,
    request_hits: u32,
    scope: Option<&ScopeRules>,
) -> Result<Described<'a>, InvalidField> {
    let keys = scope.and_then(|s| s.descriptor_keys.as_ref());
    if d.limit.is_some() {
        // Limits come from the operator's validated config only. A bucket's
        // state is meaningful against one capacity and period; letting each
        // request bring its own would break the never-over-admit promise.
        return Err(validate::invalid(
            &format!("{at}.limit"),
            "per-descriptor limit overrides are not supported; \
             configure the limit in Tollgate instead",
        ));
    }
    validate_entries(d, at)?;
    let entries: Vec<(&str, &str)> = d
        .entries
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()))
        .collect();
    let value_of = |key: &Option<String>| {
        key.as_deref()
            .and_then(|k| entries.iter().find(|(ek, _)| *ek == k))
            .map(|(_, v)| *v)
    };
    let priority_key = keys.and_then(|k| k.priority.as_deref());
    let lease_key = keys.and_then(|k| k.lease_id.as_deref());
    // A rule reached through a `share_threshold` wildcard keeps one bucket
    // for every value the wildcard matches.
    let shared = || scope.and_then(|s| s.descriptor_tree.shared_identity(&entries));
    let identity = match keys.and_then(|k| value_of(&k.identity)) {
        Some(v) => Cow::Borrowed(v),
        None => Cow::Owned(shared().unwrap_or_else(|| {
            // The priority and the lease id are not part of who the
            // caller is: one caller's requests share buckets and a pool.
            let who: Vec<(&str, &str)> = entries
                .iter()
                .copied()
                .filter(|(k, _)| Some(*k) != priority_key && Some(*k) != lease_key)
                .collect();
            canonical(&who)
        })),
    };
    let operation = keys.and_then(|k| value_of(&k.operation)).unwrap_or("");
    let priority = priority_of(&entries, priority_key);
    // A descriptor's own `hits_addend` of 0 is a check; absent, the
    // request's applies, where 0 means 1 (as in envoyproxy/ratelimit).
    let (hits, kind) = match &d.hits_addend {
        Some(h) if h.value == 0 && !d.is_negative_hits => (1, Kind::Check),
        Some(h) => (h.value, Kind::Charge),
        None => (u64::from(request_hits), Kind::Charge),
    };
    let kind = if d.is_negative_hits {
        Kind::Refund
    } else {
        kind
    };
    Ok(Described {
        attributes: entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        entries,
        identity,
        operation,
        // A refund of 0 gives nothing back; anything else is at least 1.
        cost: if kind == Kind::Refund {
            hits
        } else {
            hits.max(1)
        },
        priority,
        kind,
        lease: None,
    })
}

/// Checks a descriptor's entries: how many, and each key and value.
fn validate_entries(d: &RateLimitDescriptor, at: &str) -> Result<(), InvalidField> {
    if d.entries.is_empty() {
        return Err(validate::invalid(
            &format!("{at}.entries"),
            "must not be empty",
        ));
    }
    if d.entries.len() > MAX_DESCRIPTOR_ENTRIES {
        return Err(validate::invalid(
            &format!("{at}.entries"),
            format!(
                "has {} entries; the most allowed is {MAX_DESCRIPTOR_ENTRIES}",
                d.entries.len()
            ),
        ));
    }
    for (j, e) in d.entries.iter().enumerate() {
        let here = format!("{at}.entries[{j}]");
        validate::text(&format!("{here}.key"), &e.key, MAX_DESCRIPTOR_KEY_LEN, true)?;
        validate::text(
            &format!("{here}.value"),
            &e.value,
            MAX_DESCRIPTOR_VALUE_LEN,
            false,
        )?;
    }
    Ok(())
}

/// The priority a descriptor's `priority_key` entry names; normal when the
/// scope names no key or the descriptor lacks the entry.
///
/// A value that names no priority is SHEDDABLE, not an error: the entry
/// usually comes from a client's header, and an error would let Envoy
/// (without `failure_mode_deny`) pass the request unlimited. The lowest
/// priority gains a caller nothing.
fn priority_of(entries: &[(&str, &str)], priority_key: Option<&str>) -> Priority {
    let Some(key) = priority_key else {
        return Priority::Normal;
    };
    match entries.iter().find(|(k, _)| *k == key) {
        None => Priority::Normal,
        Some((_, value)) => Priority::parse(value).unwrap_or(Priority::Sheddable),
    }
}

impl<S: Store> EnvoyRateLimitApi<S> {
    /// Decides a request's descriptors: refunds first (they always pass),
    /// then the checks, as a dry run; then the charges together, or, when
    /// a check denied, the charges as a dry run too, so a denied request
    /// takes nothing. Decisions come back in descriptor order. Each kind
    /// present is one store call, so a request costs at most three, plus
    /// one for each kind whose quota-mode descriptors are charged again
    /// (`Limiter::decide_together_on`; docs/envoy.md; a test counts them).
    async fn decide(
        &self,
        rules: &limiter::Rules,
        requests: &[limiter::Request<'_>],
        kinds: &[Kind],
    ) -> Result<Vec<Decision>, limiter::DecideError> {
        let of = |kind: Kind| -> Vec<limiter::Request<'_>> {
            requests
                .iter()
                .zip(kinds)
                .filter(|(_, k)| **k == kind)
                .map(|(r, _)| *r)
                .collect()
        };
        let (refunds, checks, mut charges) = (of(Kind::Refund), of(Kind::Check), of(Kind::Charge));
        let refunded = if refunds.is_empty() {
            Vec::new()
        } else {
            self.limiter.refund_together_on(rules, &refunds).await?
        };
        let checked = if checks.is_empty() {
            Vec::new()
        } else {
            self.limiter.decide_together_on(rules, &checks).await?
        };
        if !Decision::overall(&checked) {
            for r in &mut charges {
                r.dry_run = true;
            }
        }
        let charged = if charges.is_empty() {
            Vec::new()
        } else {
            self.limiter.decide_together_on(rules, &charges).await?
        };
        let mut parts = [
            refunded.into_iter(),
            checked.into_iter(),
            charged.into_iter(),
        ];
        Ok(kinds
            .iter()
            .map(|k| {
                let part = match k {
                    Kind::Refund => &mut parts[0],
                    Kind::Check => &mut parts[1],
                    Kind::Charge => &mut parts[2],
                };
                part.next().unwrap_or_default()
            })
            .collect())
    }
}

#[tonic::async_trait]
impl<S: Store> RateLimitService for EnvoyRateLimitApi<S> {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let started = tokio::time::Instant::now();
        // One load: the grants, the rules and the header setting of one
        // config, from the descriptor keys to the headers.
        let snapshot = self.limiter.snapshot();
        let (rules, settings) = (&snapshot.rules, &snapshot.extra);
        let caller = settings.access.identify("envoy", &request)?;
        let req = request.into_inner();
        let scope = rules.scope(&req.domain);
        let described = to_domain(&req, scope, self.max_descriptors)?;
        authorize(settings, caller.as_deref(), &req.domain, &described)?;
        let requests: Vec<limiter::Request<'_>> =
            described.iter().map(|d| d.request(&req.domain)).collect();
        let kinds: Vec<Kind> = described.iter().map(|d| d.kind).collect();
        let leases: Vec<Option<&str>> = described.iter().map(|d| d.lease).collect();
        let result = if leases.iter().all(Option::is_none) {
            let decided = self.decide(rules, &requests, &kinds).await;
            decided.map(|d| (d, Vec::new())).map_err(LeaseError::from)
        } else {
            // Boxed, as in ShouldAllow: the lease path's future is large, and
            // inline it would size (and copy) every call's future.
            Box::pin(self.decide_leased(rules, &requests, &kinds, &leases)).await
        };
        let took = started.elapsed();
        let (decisions, held) = match result {
            Ok(decided) => decided,
            Err(e) => {
                if let (Some(first), LeaseError::Decide(e)) = (requests.first(), &e) {
                    self.observer.decided("envoy", rules, first, Err(e), took);
                }
                return Err(e.into());
            }
        };
        for (i, (r, d)) in requests.iter().zip(&decisions).enumerate() {
            // A release is a lease call, counted as one; it decides no rate.
            if !(kinds[i] == Kind::Refund && leases[i].is_some()) {
                self.observer.decided("envoy", rules, r, Ok(d), took);
            }
        }
        let mut response = to_proto(&decisions, &held, settings.envoy_headers);
        if settings.envoy_dynamic_metadata {
            let passed = passed_metadata(scope, &described, &decisions);
            response.dynamic_metadata = Some(super::envoy_metadata::answer(&req, passed));
        }
        Ok(Response::new(response))
    }
}

/// Checks the caller's grants: the domain, and the Envoy forms of the
/// grants ShouldAllow checks. A check reads a bucket without taking (a dry
/// run), and many descriptors are many decisions at once (a batch); a
/// route's own few are not a batch.
fn authorize(
    settings: &Settings,
    caller: Option<&super::auth::Caller>,
    domain: &str,
    described: &[Described<'_>],
) -> Result<(), Status> {
    settings
        .access
        .check_decision("envoy", caller, "domain", domain, false)?;
    let needs = [
        (
            described.iter().any(|d| d.kind == Kind::Check),
            Privilege::DryRun,
        ),
        (described.len() > UNBATCHED_DESCRIPTORS, Privilege::Batch),
        // A lease's release gives back only what its own acquire took.
        (
            described
                .iter()
                .any(|d| d.kind == Kind::Refund && d.lease.is_none()),
            Privilege::Refund,
        ),
    ];
    for (needed, privilege) in needs {
        if needed {
            settings
                .access
                .check_privilege("envoy", caller, privilege, domain)?;
        }
    }
    Ok(())
}

/// The `metadata:` blocks of the rules of the descriptors that passed, in
/// request order: a descriptor whose status is OK and whose rule in the
/// tree was charged (not replaced, not unlimited), as upstream hands back.
fn passed_metadata<'r>(
    scope: Option<&'r ScopeRules>,
    described: &[Described<'_>],
    decisions: &[Decision],
) -> Vec<&'r crate::config::envoy::Metadata> {
    let Some(scope) = scope else {
        return Vec::new();
    };
    described
        .iter()
        .zip(decisions)
        .filter(|(_, d)| !over_limit(d))
        .filter_map(|(desc, d)| {
            let rule = scope.descriptor_tree.find(&desc.entries)?;
            let charged = d.buckets.iter().any(|b| b.rule == rule.name);
            charged.then_some(rule.metadata.as_deref()?)
        })
        .collect()
}

/// True when this descriptor's own limits (or its unknown scope) denied.
fn over_limit(d: &Decision) -> bool {
    !d.allowed
        && (d.banned()
            || d.buckets.iter().any(|b| b.exhausted && !b.shadow)
            || (d.buckets.is_empty() && d.reason.is_some()))
}

/// The header an Envoy answer carries when a descriptor's caller is banned.
pub const BANNED_HEADER: (&str, &str) = ("x-tollgate-denied", "banned");

/// The answer to a request decided as `decisions`, whose descriptors held
/// the leases `held` (empty when none did).
fn to_proto(
    decisions: &[Decision],
    held: &[Option<lease::Held>],
    headers_draft: Option<Draft>,
) -> RateLimitResponse {
    let allowed = Decision::overall(decisions);
    let statuses = decisions
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if let Some(h) = held.get(i).and_then(Option::as_ref) {
                return lease_status(d, h);
            }
            let code = if over_limit(d) {
                Code::OverLimit
            } else {
                Code::Ok
            };
            // A descriptor that did not deny, in a request that another one
            // denied, has no primary bucket: report its tightest.
            let primary = d.primary().or_else(|| {
                d.buckets
                    .iter()
                    .filter(|b| !b.shadow)
                    .min_by_key(|b| b.remaining)
            });
            // An unlimited rule has no limit and all of it left, as upstream
            // reports it.
            let unlimited = d.unlimited && primary.is_none();
            // A banned caller may come back when its ban ends.
            let reset = match d.penalty.banned {
                Some(ban) => Some(duration(ban.retry_after)),
                None => primary.map(|b| duration(b.reset_after)),
            };
            DescriptorStatus {
                code: code.into(),
                current_limit: primary.map(current_limit),
                limit_remaining: if unlimited {
                    u32::MAX
                } else {
                    primary.map_or(0, |b| clamp_u32(b.remaining))
                },
                duration_until_reset: reset,
                ..DescriptorStatus::default()
            }
        })
        .collect();
    let mut response_headers_to_add = match headers_draft {
        Some(draft) => headers(decisions, allowed, draft),
        None => Vec::new(),
    };
    // Why, for a banned caller, whatever the header settings: a client
    // that keeps retrying should learn it is in the penalty box.
    if decisions.iter().any(Decision::banned) {
        response_headers_to_add.push(HeaderValue {
            key: BANNED_HEADER.0.to_owned(),
            value: BANNED_HEADER.1.to_owned(),
            ..HeaderValue::default()
        });
    }
    RateLimitResponse {
        overall_code: if allowed { Code::Ok } else { Code::OverLimit }.into(),
        statuses,
        response_headers_to_add,
        ..RateLimitResponse::default()
    }
}

/// The status of a descriptor that holds a lease: `OVER_LIMIT` until the
/// earliest live lease expires when its pool refused it; otherwise its
/// rates' status, or, with no rate of its own, the pool's room left.
fn lease_status(d: &Decision, h: &lease::Held) -> DescriptorStatus {
    let room = clamp_u32(h.lease.limit.saturating_sub(h.lease.in_flight));
    if h.refused {
        return DescriptorStatus {
            code: Code::OverLimit.into(),
            limit_remaining: 0,
            duration_until_reset: h.lease.retry_after.map(duration),
            ..DescriptorStatus::default()
        };
    }
    let primary = d.primary().or_else(|| {
        d.buckets
            .iter()
            .filter(|b| !b.shadow)
            .min_by_key(|b| b.remaining)
    });
    DescriptorStatus {
        code: if over_limit(d) {
            Code::OverLimit
        } else {
            Code::Ok
        }
        .into(),
        current_limit: primary.map(current_limit),
        limit_remaining: primary.map_or(room, |b| clamp_u32(b.remaining).min(room)),
        duration_until_reset: primary.map(|b| duration(b.reset_after)),
        ..DescriptorStatus::default()
    }
}

/// The rate-limit headers for Envoy to add to the client's response.
fn headers(decisions: &[Decision], allowed: bool, draft: Draft) -> Vec<HeaderValue> {
    super::headers::render(decisions, allowed, draft)
        .into_iter()
        .map(|(key, value)| HeaderValue {
            key: key.to_owned(),
            value,
            ..HeaderValue::default()
        })
        .collect()
}

/// Envoy's units, longest last.
const UNITS: [(Unit, u64); 7] = [
    (Unit::Second, 1),
    (Unit::Minute, 60),
    (Unit::Hour, 3600),
    (Unit::Day, 86_400),
    (Unit::Week, 7 * 86_400),
    (Unit::Month, 30 * 86_400),
    (Unit::Year, 365 * 86_400),
];

/// A bucket as Envoy's "requests per unit". Exact when the refill period is a
/// unit; otherwise the rate over the next unit up, rounded down.
fn current_limit(b: &BucketReport) -> RateLimit {
    let period = b.period.as_nanos().max(1);
    let (unit, secs) = UNITS
        .iter()
        .find(|(_, secs)| u128::from(*secs) * 1_000_000_000 >= period)
        .copied()
        .unwrap_or((Unit::Year, 365 * 86_400));
    let per_unit = u128::from(b.limit) * u128::from(secs) * 1_000_000_000 / period;
    RateLimit {
        name: b.rule.to_string(),
        requests_per_unit: u32::try_from(per_unit).unwrap_or(u32::MAX),
        unit: unit.into(),
    }
}

fn clamp_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;

    use super::*;
    use crate::config::Config;
    use crate::store::memory::MemoryStore;
    use crate::store::{Charge, ChargeOutcome, StoreError};

    const CONFIG: &str = "
failure_mode: closed
scopes:
  - name: api
    descriptor_keys: { identity: user }
    limits:
      - { name: per-user, per: identity, capacity: 1, refill_period: 1h }
      - { name: try-me, per: identity, capacity: 1, refill_period: 1h, shadow: true }
";

    fn api<S: Store>(config: &str, store: S) -> EnvoyRateLimitApi<S> {
        let config = Config::from_yaml(config).unwrap();
        let rules = crate::limiter::Rules::compile(&config).unwrap();
        let observer = Arc::new(Observer::default());
        let snapshot = crate::limiter::Generation {
            rules: Arc::new(rules),
            extra: Settings::open(observer.clone()),
        };
        EnvoyRateLimitApi::new(
            Arc::new(Limiter::from_generation(snapshot, store)),
            observer,
        )
    }

    fn alice() -> Request<RateLimitRequest> {
        Request::new(RateLimitRequest {
            domain: "api".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "user".into(),
                    value: "alice".into(),
                }],
                ..RateLimitDescriptor::default()
            }],
            hits_addend: 0,
        })
    }

    #[tokio::test]
    async fn denials_are_counted_per_rule_and_shadow_ones_apart() {
        let api = api(CONFIG, MemoryStore::new(1));
        let code = async |api: &EnvoyRateLimitApi<MemoryStore>| {
            api.should_rate_limit(alice())
                .await
                .unwrap()
                .into_inner()
                .overall_code
        };
        assert_eq!(code(&api).await, Code::Ok as i32);
        assert_eq!(code(&api).await, Code::OverLimit as i32);
        assert_eq!(code(&api).await, Code::OverLimit as i32);
        let text = api.observer.metrics.encode();
        let has = |line: &str| assert!(text.contains(line), "{line} not in\n{text}");
        has(
            r#"tollgate_decisions_total{api="envoy",scope="api",rule="per-user",result="denied"} 2"#,
        );
        has(r#"tollgate_shadow_denials_total{api="envoy",scope="api",rule="try-me"} 2"#);
        assert!(!text.contains(r#"rule="try-me",result="denied""#), "{text}");
    }

    /// A store that is down, to see the failure modes at the API edge.
    #[derive(Debug)]
    struct DownStore;

    impl Store for DownStore {
        async fn check_and_take_each(
            &self,
            charges: &[Charge<'_>],
        ) -> Vec<Result<ChargeOutcome, StoreError>> {
            vec![Err(StoreError::transient("connection refused")); charges.len()]
        }

        async fn check_and_take_one(&self, _: &Charge<'_>) -> Result<ChargeOutcome, StoreError> {
            Err(StoreError::transient("connection refused"))
        }

        async fn settle(
            &self,
            _: &crate::store::Settlement<'_>,
        ) -> Result<crate::store::Settled, StoreError> {
            Err(StoreError::transient("connection refused"))
        }

        async fn penalties(
            &self,
            _: &crate::store::PenaltyOp<'_>,
        ) -> Result<crate::store::PenaltyAnswer, StoreError> {
            Err(StoreError::transient("connection refused"))
        }

        async fn lease(
            &self,
            _: &crate::store::LeaseCall<'_>,
        ) -> Result<crate::store::LeaseOutcome, StoreError> {
            Err(StoreError::transient("connection refused"))
        }

        async fn demand(
            &self,
            _: &crate::store::DemandCall<'_>,
        ) -> Result<crate::store::DemandAnswer, StoreError> {
            Err(StoreError::transient("connection refused"))
        }

        fn is_available(&self) -> bool {
            false
        }

        fn rules_replaced(&self, _: &[&str]) {}

        fn condition(&self) -> crate::store::Condition {
            crate::store::Condition::default()
        }
    }

    #[tokio::test]
    async fn a_down_store_is_unavailable_when_closed_and_ok_when_open() {
        let closed = api(CONFIG, DownStore);
        let status = closed.should_rate_limit(alice()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

        let open = api(&CONFIG.replace("closed", "open"), DownStore);
        let r = open.should_rate_limit(alice()).await.unwrap().into_inner();
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses[0].code, Code::Ok as i32);
    }

    const POOL: &str = "
failure_mode: closed
scopes:
  - name: backend
    descriptor_keys: { operation: route, lease_id: lease_id }
    limits:
      - { name: slow, per: operation, concurrency: 1, max_lease: 1m }
";

    /// `[route=slow, lease_id=<id>]`, sent on stream done when `done`.
    fn slow(id: &str, done: bool) -> Request<RateLimitRequest> {
        let entry = |key: &str, value: &str| Entry {
            key: key.into(),
            value: value.into(),
        };
        Request::new(RateLimitRequest {
            domain: "backend".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![entry("route", "slow"), entry("lease_id", id)],
                is_negative_hits: done,
                ..RateLimitDescriptor::default()
            }],
            hits_addend: 0,
        })
    }

    #[tokio::test]
    async fn lease_calls_are_counted_and_a_down_store_follows_the_failure_mode() {
        let pool = api(POOL, MemoryStore::new(1));
        for (id, done, want) in [
            ("a", false, Code::Ok),
            ("b", false, Code::OverLimit),
            ("a", true, Code::Ok),
            ("b", false, Code::Ok),
        ] {
            let r = pool.should_rate_limit(slow(id, done)).await.unwrap();
            assert_eq!(r.into_inner().overall_code, want as i32, "{id} {done}");
        }
        let text = pool.observer.metrics.encode();
        for line in [
            r#"tollgate_lease_calls_total{scope="backend",rule="slow",call="acquire",result="granted"} 2"#,
            r#"tollgate_lease_calls_total{scope="backend",rule="slow",call="acquire",result="refused"} 1"#,
            r#"tollgate_lease_calls_total{scope="backend",rule="slow",call="release",result="released"} 1"#,
            r#"tollgate_leases_in_flight{scope="backend",rule="slow"} 1"#,
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }

        let closed = api(POOL, DownStore);
        let status = closed
            .should_rate_limit(slow("c", false))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        let open = api(&POOL.replace("closed", "open"), DownStore);
        for done in [false, true] {
            let r = open.should_rate_limit(slow("c", done)).await.unwrap();
            assert_eq!(r.into_inner().overall_code, Code::Ok as i32);
        }
    }

    fn bucket(limit: u64, period: Duration) -> BucketReport {
        BucketReport {
            rule: Arc::from("r"),
            limit,
            period,
            remaining: 0,
            reset_after: Duration::ZERO,
            retry_after: None,
            exhausted: false,
            shadow: false,
        }
    }

    #[test]
    fn current_limit_is_exact_for_whole_units_and_rounded_down_otherwise() {
        let l = current_limit(&bucket(10, Duration::from_secs(60)));
        assert_eq!((l.requests_per_unit, l.unit), (10, Unit::Minute.into()));
        let l = current_limit(&bucket(3, Duration::from_secs(10)));
        assert_eq!((l.requests_per_unit, l.unit), (18, Unit::Minute.into()));
        let l = current_limit(&bucket(5, Duration::from_millis(1500)));
        assert_eq!((l.requests_per_unit, l.unit), (200, Unit::Minute.into()));
    }
}
