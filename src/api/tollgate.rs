//! `tollgate.v1.RateLimiter`: our own API.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::Settings;
use super::auth::Privilege;
use super::validate::{self, MAX_IDENTITY_LEN, MAX_OPERATION_LEN, MAX_SCOPE_LEN};
use crate::config::MAX_MAX_DELAY;
use crate::config::security::DEFAULT_MAX_BATCH;
use crate::error::InvalidField;
use crate::limiter::reservation::MAX_TOKEN_LEN;
use crate::limiter::{self, BucketReport, Decision, Limiter, Priority};
use crate::observe::Observer;
use crate::pb::tollgate::v1 as pb;
use crate::store::Store;

/// Serves `tollgate.v1.RateLimiter` over a shared limiter.
#[derive(Debug)]
pub struct RateLimiterApi<S> {
    /// Its snapshot also says who may call and the longest `settle_within`.
    limiter: Arc<Limiter<S, Settings>>,
    observer: Arc<Observer>,
    /// `grpc.max_batch`.
    max_batch: usize,
}

impl<S> RateLimiterApi<S> {
    /// Serves `limiter` to the callers its snapshot grants, reporting to
    /// `observer`.
    pub fn new(limiter: Arc<Limiter<S, Settings>>, observer: Arc<Observer>) -> Self {
        Self {
            limiter,
            observer,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }

    /// Accepts batches of up to `max_batch`.
    pub fn with_max_batch(self, max_batch: usize) -> Self {
        Self { max_batch, ..self }
    }
}

/// Validates a request and borrows it as the limiter's request. `at` is the
/// request's path in a batch (`requests[3].`), empty for a lone request.
pub(super) fn to_domain<'a>(
    req: &'a pb::ShouldAllowRequest,
    at: &str,
) -> Result<limiter::Request<'a>, InvalidField> {
    // Field paths are only written out for a batch entry; a lone request's
    // are static, so a valid request costs no formatting.
    let path = |name: &'static str| -> Cow<'static, str> {
        if at.is_empty() {
            Cow::Borrowed(name)
        } else {
            Cow::Owned(format!("{at}{name}"))
        }
    };
    validate::text(&path("scope"), &req.scope, MAX_SCOPE_LEN, true)?;
    validate::text(&path("identity"), &req.identity, MAX_IDENTITY_LEN, false)?;
    validate::text(&path("operation"), &req.operation, MAX_OPERATION_LEN, false)?;
    if !req.attributes.is_empty() {
        validate::attributes(&path("attributes"), req.attributes.iter())?;
    }
    let priority = match pb::Priority::try_from(req.priority) {
        Ok(pb::Priority::Normal) => Priority::Normal,
        Ok(pb::Priority::Critical) => Priority::Critical,
        Ok(pb::Priority::Sheddable) => Priority::Sheddable,
        Err(_) => {
            return Err(validate::invalid(
                &path("priority"),
                format!("{} is not a Priority", req.priority),
            ));
        }
    };
    let settle_within = match &req.settle_within {
        None => None,
        Some(d) => Some(
            Duration::try_from(*d)
                .ok()
                .filter(|d| *d >= Duration::from_millis(1))
                .ok_or_else(|| validate::invalid(&path("settle_within"), "must be at least 1ms"))?,
        ),
    };
    let max_wait = max_wait(req, &path("max_wait"))?;
    Ok(limiter::Request {
        scope: &req.scope,
        identity: &req.identity,
        operation: &req.operation,
        cost: u64::from(req.cost.max(1)),
        dry_run: req.dry_run,
        attributes: &req.attributes,
        entries: &[],
        priority,
        settle_within,
        caller: None,
        max_wait,
        strike: req.strike,
    })
}

/// Shaping: the request's `max_wait`, 0 to 1h; zero is the same as unset
/// (the caller cannot wait).
fn max_wait(req: &pb::ShouldAllowRequest, at: &str) -> Result<Option<Duration>, InvalidField> {
    let Some(d) = &req.max_wait else {
        return Ok(None);
    };
    let d = Duration::try_from(*d)
        .ok()
        .filter(|d| *d <= MAX_MAX_DELAY)
        .ok_or_else(|| validate::invalid(at, "must be between 0 and 1h"))?;
    Ok((!d.is_zero()).then_some(d))
}

/// A std duration as a protobuf one.
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

pub(super) fn to_proto(d: Decision) -> pb::ShouldAllowResponse {
    let primary = d.primary().cloned();
    let denial_reason = if d.allowed {
        pb::DenialReason::Unspecified
    } else if d.banned() {
        pb::DenialReason::Banned
    } else if d.buckets.is_empty() {
        pb::DenialReason::Unspecified
    } else {
        pb::DenialReason::RateLimited
    };
    pb::ShouldAllowResponse {
        allowed: d.allowed,
        retry_after: d.retry_after.map(duration),
        limit: primary.as_ref().map_or(0, |b| b.limit),
        remaining: primary.as_ref().map_or(0, |b| b.remaining),
        reset_after: primary.as_ref().map(|b| duration(b.reset_after)),
        rule: primary
            .as_ref()
            .map_or_else(String::new, |b| b.rule.to_string()),
        degraded: d.degraded,
        reason: d.reason.unwrap_or_default(),
        buckets: d.buckets.into_iter().map(bucket_status).collect(),
        reservation: d.reservation.unwrap_or_default(),
        delay: (!d.delay.is_zero()).then(|| duration(d.delay)),
        denial_reason: denial_reason.into(),
        lease: None,
    }
}

fn bucket_status(b: BucketReport) -> pb::BucketStatus {
    pb::BucketStatus {
        rule: b.rule.to_string(),
        limit: b.limit,
        remaining: b.remaining,
        reset_after: Some(duration(b.reset_after)),
        retry_after: b.retry_after.map(duration),
        exhausted: b.exhausted,
        refill_period: Some(duration(b.period)),
    }
}

#[tonic::async_trait]
impl<S: Store> pb::rate_limiter_server::RateLimiter for RateLimiterApi<S> {
    async fn should_allow(
        &self,
        request: Request<pb::ShouldAllowRequest>,
    ) -> Result<Response<pb::ShouldAllowResponse>, Status> {
        let started = tokio::time::Instant::now();
        // One load: the grants, the bound and the rules of one config.
        let snapshot = self.limiter.snapshot();
        let (rules, settings) = (&snapshot.rules, &snapshot.extra);
        let caller = settings.access.identify("tollgate", &request)?;
        let req = request.into_inner();
        let domain = limiter::Request {
            caller: caller.as_deref().map(|c| &*c.name),
            ..to_domain(&req, "")?
        };
        let lease = super::leases::lease_fields(&req)?;
        let max = settings.max_settle_within;
        if domain.settle_within.is_some_and(|d| d > max) {
            return Err(validate::invalid(
                "settle_within",
                format!(
                    "must be at most {} (reservations.max_settle_within)",
                    humantime::format_duration(max)
                ),
            )
            .into());
        }
        settings.access.check_decision(
            "tollgate",
            caller.as_deref(),
            "scope",
            &req.scope,
            req.dry_run,
        )?;
        if let Some((lease_id, ttl)) = lease {
            // Boxed: the lease path's future is about 9 KB, and kept inline it
            // made every call's future that size, copied whole when the call
            // is boxed (10,288 bytes against 3,120 without it).
            let answer = Box::pin(self.limiter.decide_leased(rules, &domain, lease_id, ttl)).await;
            return super::leases::leased_answer(
                &self.observer,
                rules,
                &domain,
                lease_id,
                answer,
                started,
            );
        }
        let result = self.limiter.decide_on(rules, &domain).await;
        self.observer.decided(
            "tollgate",
            rules,
            &domain,
            result.as_ref(),
            started.elapsed(),
        );
        Ok(Response::new(to_proto(result?)))
    }

    async fn should_allow_batch(
        &self,
        request: Request<pb::ShouldAllowBatchRequest>,
    ) -> Result<Response<pb::ShouldAllowBatchResponse>, Status> {
        let snapshot = self.limiter.snapshot();
        let (rules, access) = (&snapshot.rules, &snapshot.extra.access);
        let caller = access.identify("tollgate", &request)?;
        let caller = caller.as_deref();
        access.check_privilege("tollgate", caller, Privilege::Batch, "")?;
        let batch = request.into_inner();
        if batch.requests.len() > self.max_batch {
            return Err(validate::invalid(
                "requests",
                format!(
                    "has {} entries; the most allowed is {} (grpc.max_batch)",
                    batch.requests.len(),
                    self.max_batch
                ),
            )
            .into());
        }
        // Validate and authorize every entry before any takes tokens.
        let domain = batch
            .requests
            .iter()
            .enumerate()
            .map(|(i, r)| {
                if r.settle_within.is_some() {
                    return Err(validate::invalid(
                        &format!("requests[{i}].settle_within"),
                        "is not supported in a batch: reserve with ShouldAllow",
                    ));
                }
                if !r.lease_id.is_empty() || r.lease_ttl.is_some() {
                    return Err(validate::invalid(
                        &format!("requests[{i}].lease_id"),
                        "is not supported in a batch: take a lease with ShouldAllow",
                    ));
                }
                to_domain(r, &format!("requests[{i}]."))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (i, r) in batch.requests.iter().enumerate() {
            let field = format!("requests[{i}].scope");
            access.check_decision("tollgate", caller, &field, &r.scope, r.dry_run)?;
        }
        let started = tokio::time::Instant::now();
        let results = if batch.atomic {
            match self.limiter.decide_together_on(rules, &domain).await {
                Ok(decisions) => decisions.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e); domain.len()],
            }
        } else {
            self.limiter.decide_each_on(rules, &domain).await
        };
        let took = started.elapsed();
        for (req, result) in domain.iter().zip(&results) {
            self.observer
                .decided("tollgate", rules, req, result.as_ref(), took);
        }
        let responses = results
            .into_iter()
            .map(|d| d.map(to_proto))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(pb::ShouldAllowBatchResponse { responses }))
    }

    async fn settle(
        &self,
        request: Request<pb::SettleRequest>,
    ) -> Result<Response<pb::SettleResponse>, Status> {
        let snapshot = self.limiter.snapshot();
        let (rules, access) = (&snapshot.rules, &snapshot.extra.access);
        let caller = access.identify("tollgate", &request)?;
        let req = request.into_inner();
        if req.reservation.is_empty() || req.reservation.len() > MAX_TOKEN_LEN {
            return Err(validate::invalid(
                "reservation",
                format!("must be 1 to {MAX_TOKEN_LEN} bytes: the token ShouldAllow returned"),
            )
            .into());
        }
        if req.actual_cost > u64::from(u32::MAX) {
            return Err(
                validate::invalid("actual_cost", format!("must be at most {}", u32::MAX)).into(),
            );
        }
        let refused = |e: limiter::reservation::TokenError| -> Status {
            let e = limiter::SettleError::from(e);
            self.observer.settled("", Err(&e));
            e.into()
        };
        // The grant is checked on what the token claims, before its
        // signature: a caller outside the claimed scope or owner learns
        // nothing about whether the token is genuine.
        let claimed = self.limiter.peek(&req.reservation).map_err(refused)?;
        // A caller may settle only what it may decide on, and only its own.
        access.check_decision(
            "tollgate",
            caller.as_deref(),
            "reservation",
            &claimed.scope,
            false,
        )?;
        access.check_owner(
            "tollgate",
            caller.as_deref(),
            claimed.caller.as_deref(),
            &claimed.scope,
        )?;
        let reservation = self.limiter.verify(&req.reservation).map_err(refused)?;
        let settled = self
            .limiter
            .settle_reservation_on(rules, &reservation, req.actual_cost)
            .await;
        self.observer.settled(&reservation.scope, settled.as_ref());
        let settled = settled?;
        Ok(Response::new(pb::SettleResponse {
            buckets: settled.buckets.into_iter().map(bucket_status).collect(),
            estimate: settled.estimate,
        }))
    }
}
