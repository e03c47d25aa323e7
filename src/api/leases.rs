//! `tollgate.v1.Leases`: concurrency limits over the wire. Validates every
//! field, authorises the caller as for a decision on the scope, and calls
//! the limiter's lease path.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::Settings;
use super::tollgate::duration;
use super::validate::{self, MAX_IDENTITY_LEN, MAX_OPERATION_LEN, MAX_SCOPE_LEN};
use crate::error::InvalidField;
use crate::limiter::{self, LeaseAction, LeaseDecision, LeaseError, Limiter, Priority};
use crate::observe::Observer;
use crate::pb::tollgate::v1 as pb;
use crate::store::Store;
use crate::store::lease::MAX_LEASE_ID_LEN;

/// Serves `tollgate.v1.Leases` over a shared limiter.
#[derive(Debug)]
pub struct LeasesApi<S> {
    /// Its snapshot also says who may call.
    limiter: Arc<Limiter<S, Settings>>,
    observer: Arc<Observer>,
}

impl<S> LeasesApi<S> {
    /// Serves `limiter` to the callers its snapshot grants, counting calls
    /// in `observer`'s metrics.
    pub fn new(limiter: Arc<Limiter<S, Settings>>, observer: Arc<Observer>) -> Self {
        Self { limiter, observer }
    }
}

/// A call's result as its metric names it.
pub(super) fn result_of(action: LeaseAction, d: &LeaseDecision) -> (&'static str, &'static str) {
    let (call, ok, not) = match action {
        LeaseAction::Acquire { .. } => ("acquire", "granted", "refused"),
        LeaseAction::Renew { .. } => ("renew", "renewed", "lost"),
        LeaseAction::Release => ("release", "released", "released"),
    };
    let result = match (d.degraded, d.ok) {
        (true, _) => "degraded",
        (false, true) => ok,
        (false, false) => not,
    };
    (call, result)
}

/// Validates a target and borrows it as the limiter's request.
fn target(t: Option<&pb::LeaseTarget>) -> Result<&pb::LeaseTarget, InvalidField> {
    let t = t.ok_or_else(|| validate::invalid("target", "is required"))?;
    validate::text("target.scope", &t.scope, MAX_SCOPE_LEN, true)?;
    validate::text("target.identity", &t.identity, MAX_IDENTITY_LEN, false)?;
    validate::text("target.operation", &t.operation, MAX_OPERATION_LEN, false)?;
    validate::text("target.lease_id", &t.lease_id, MAX_LEASE_ID_LEN, true)?;
    if !t.attributes.is_empty() {
        validate::attributes("target.attributes", t.attributes.iter())?;
    }
    Ok(t)
}

fn request_of(t: &pb::LeaseTarget, priority: Priority, dry_run: bool) -> limiter::Request<'_> {
    limiter::Request {
        attributes: &t.attributes,
        priority,
        dry_run,
        ..limiter::Request::new(&t.scope, &t.identity, &t.operation)
    }
}

/// An optional time to live; a negative one is refused here, its range by
/// the limiter (which knows the limit's `max_lease`).
fn ttl(d: Option<&prost_types::Duration>) -> Result<Option<Duration>, InvalidField> {
    d.map(|d| {
        Duration::try_from(*d)
            .map_err(|_| validate::invalid("ttl", "must be between 1ms and the limit's max_lease"))
    })
    .transpose()
}

fn priority(p: i32) -> Result<Priority, InvalidField> {
    match pb::Priority::try_from(p) {
        Ok(pb::Priority::Normal) => Ok(Priority::Normal),
        Ok(pb::Priority::Critical) => Ok(Priority::Critical),
        Ok(pb::Priority::Sheddable) => Ok(Priority::Sheddable),
        Err(_) => Err(validate::invalid(
            "priority",
            format!("{p} is not a Priority"),
        )),
    }
}

impl<S: Store> LeasesApi<S> {
    /// Authorises the caller on the target's scope, then calls the limiter.
    async fn call<T>(
        &self,
        request: &Request<T>,
        req: &limiter::Request<'_>,
        lease_id: &str,
        action: LeaseAction,
    ) -> Result<LeaseDecision, Status> {
        let snapshot = self.limiter.snapshot();
        let (rules, settings) = (&snapshot.rules, &snapshot.extra);
        let caller = settings.access.identify("tollgate", request)?;
        settings.access.check_decision(
            "tollgate",
            caller.as_deref(),
            "target.scope",
            req.scope,
            req.dry_run,
        )?;
        let d = self.limiter.lease_on(rules, req, lease_id, action).await?;
        // Only a configured pool is counted: its scope and rule come from
        // the config, so the labels stay bounded.
        if !d.rule.is_empty() {
            let (call, result) = result_of(action, &d);
            let scope: Arc<str> = req.scope.into();
            self.observer
                .metrics
                .lease(&scope, &d.rule, call, result, d.expired);
            self.observer.metrics.lease_seen(&scope, &d);
        }
        Ok(d)
    }
}

#[tonic::async_trait]
impl<S: Store> pb::leases_server::Leases for LeasesApi<S> {
    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let body = request.get_ref();
        let t = target(body.target.as_ref())?;
        let action = LeaseAction::Acquire {
            weight: (body.weight > 0).then_some(u64::from(body.weight)),
            ttl: ttl(body.ttl.as_ref())?,
        };
        let req = request_of(t, priority(body.priority)?, body.dry_run);
        let d = self.call(&request, &req, &t.lease_id, action).await?;
        Ok(Response::new(pb::AcquireResponse {
            granted: d.ok,
            lease_id: t.lease_id.clone(),
            ttl: (d.ok && !d.ttl.is_zero()).then(|| duration(d.ttl)),
            expires_at_unix_micros: d.expires_at_us,
            in_flight: d.in_flight,
            limit: d.limit,
            retry_after: d.retry_after.map(duration),
            degraded: d.degraded,
            rule: d.rule.to_string(),
            reason: d.reason.unwrap_or_default(),
        }))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let body = request.get_ref();
        let t = target(body.target.as_ref())?;
        let action = LeaseAction::Renew {
            ttl: ttl(body.ttl.as_ref())?,
        };
        let req = request_of(t, Priority::Normal, false);
        let d = self.call(&request, &req, &t.lease_id, action).await?;
        Ok(Response::new(pb::RenewResponse {
            renewed: d.ok,
            ttl: (d.ok && !d.ttl.is_zero()).then(|| duration(d.ttl)),
            expires_at_unix_micros: d.expires_at_us,
            degraded: d.degraded,
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let body = request.get_ref();
        let t = target(body.target.as_ref())?;
        let req = request_of(t, Priority::Normal, false);
        let d = self
            .call(&request, &req, &t.lease_id, LeaseAction::Release)
            .await?;
        Ok(Response::new(pb::ReleaseResponse {
            in_flight: d.in_flight,
            degraded: d.degraded,
        }))
    }
}

/// A ShouldAllow's lease fields, validated: `None` when it asks for no
/// lease.
pub(super) fn lease_fields(
    req: &pb::ShouldAllowRequest,
) -> Result<Option<(&str, Option<Duration>)>, InvalidField> {
    if req.lease_id.is_empty() && req.lease_ttl.is_none() {
        return Ok(None);
    }
    validate::text("lease_id", &req.lease_id, MAX_LEASE_ID_LEN, true)?;
    let ttl = req
        .lease_ttl
        .map(|d| {
            Duration::try_from(d).map_err(|_| {
                validate::invalid("lease_ttl", "must be between 1ms and the limit's max_lease")
            })
        })
        .transpose()?;
    Ok(Some((&req.lease_id, ttl)))
}

/// True when `d` was denied by its concurrency limit alone: the pool had
/// no room for `lease`, and neither a ban nor a rate denied it.
fn refused_by_pool_alone(d: &limiter::Decision, lease: &LeaseDecision) -> bool {
    !d.allowed
        && !lease.ok
        && !lease.rule.is_empty()
        && !d.banned()
        && !d.deny_listed
        && !d.buckets.iter().any(|b| b.exhausted && !b.shadow)
}

/// The answer to a ShouldAllow that took a lease with its rates, reported
/// to `observer` as any decision is; a denial by the pool alone says so
/// (`DENIAL_REASON_CONCURRENCY_LIMITED`) and names the pool's rule.
pub(super) fn leased_answer(
    observer: &Observer,
    rules: &crate::limiter::Rules,
    req: &limiter::Request<'_>,
    lease_id: &str,
    answer: Result<(limiter::Decision, Option<LeaseDecision>), LeaseError>,
    started: tokio::time::Instant,
) -> Result<Response<pb::ShouldAllowResponse>, Status> {
    let took = started.elapsed();
    match &answer {
        Ok((d, _)) => observer.decided("tollgate", rules, req, Ok(d), took),
        Err(LeaseError::Decide(e)) => observer.decided("tollgate", rules, req, Err(e), took),
        Err(_) => {}
    }
    let (decision, lease) = answer?;
    if let Some(l) = lease.as_ref().filter(|l| !l.rule.is_empty()) {
        let scope: Arc<str> = req.scope.into();
        let action = LeaseAction::Acquire {
            weight: None,
            ttl: None,
        };
        let (call, result) = result_of(action, l);
        observer
            .metrics
            .lease(&scope, &l.rule, call, result, l.expired);
        observer.metrics.lease_seen(&scope, l);
    }
    let by_pool = lease
        .as_ref()
        .filter(|l| refused_by_pool_alone(&decision, l));
    let mut out = super::tollgate::to_proto(decision);
    if let Some(l) = by_pool {
        out.denial_reason = pb::DenialReason::ConcurrencyLimited.into();
        out.rule = l.rule.to_string();
        out.limit = l.limit;
        out.remaining = 0;
        out.reset_after = out.retry_after;
    }
    out.lease = lease.map(|l| pb::LeaseGrant {
        granted: l.ok,
        lease_id: lease_id.to_owned(),
        ttl: (l.ok && !l.ttl.is_zero()).then(|| duration(l.ttl)),
        expires_at_unix_micros: l.expires_at_us,
        in_flight: l.in_flight,
        limit: l.limit,
        rule: l.rule.to_string(),
        degraded: l.degraded,
    });
    Ok(Response::new(out))
}
