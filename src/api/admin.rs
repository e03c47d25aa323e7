//! `tollgate.v1.Admin`: heavy hitters, utilization and explanations, for
//! operators. Answers are about this replica; nothing here takes tokens.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::Caller;
use super::bans;
use super::tollgate::{duration, to_domain, to_proto};
use super::validate::{self, MAX_SCOPE_LEN};
use super::{Settings, Snapshot};
use crate::config::{MAX_NAME_LEN, Per};
use crate::limiter::{Limiter, Rules};
use crate::observe::hitters::{Hitters, RankBy, TopList, Usage, Window};
use crate::pb::tollgate::v1 as pb;
use crate::store::Store;

/// Serves `tollgate.v1.Admin` over a shared limiter and its heavy hitters.
#[derive(Debug)]
pub struct AdminApi<S> {
    /// Its snapshot also says who may call.
    limiter: Arc<Limiter<S, Settings>>,
    hitters: Arc<Hitters>,
}

impl<S> AdminApi<S> {
    /// Serves `limiter`'s rules and `hitters`' figures to the callers
    /// `limiter`'s snapshot grants `admin`.
    pub fn new(limiter: Arc<Limiter<S, Settings>>, hitters: Arc<Hitters>) -> Self {
        Self { limiter, hitters }
    }
}

/// Every Admin call passes here first, with the snapshot it then answers
/// from: with callers configured, only a caller whose grant has `admin:
/// true` gets an answer (top identities name users); with none configured,
/// admin is open like every API. The answer is the caller, whose `scopes`
/// still bound what it may read (`None`: every scope).
fn authorize<T>(
    snapshot: &Snapshot,
    request: &Request<T>,
    method: &str,
) -> Result<Option<Arc<Caller>>, Status> {
    snapshot.extra.access.authorize_admin(request, method)
}

/// Whether `caller` may read `scope`: `admin` opens the admin RPCs, not
/// scopes beyond the caller's grant.
fn may_read(caller: Option<&Caller>, scope: &str) -> bool {
    caller.is_none_or(|c| c.may_decide(scope))
}

/// Refuses a request naming a `scope` (at `field`) outside `caller`'s grant.
fn check_scope(
    snapshot: &Snapshot,
    caller: Option<&Caller>,
    method: &str,
    field: &str,
    scope: &str,
) -> Result<(), Status> {
    snapshot
        .extra
        .access
        .check_decision("admin", caller, field, scope, false)
        .map_err(|s| Status::permission_denied(format!("{method}: {}", s.message())))
}

fn window(w: i32) -> Result<Window, Status> {
    match pb::Window::try_from(w) {
        Ok(pb::Window::Unspecified | pb::Window::Window1m) => Ok(Window::OneMinute),
        Ok(pb::Window::Window5m) => Ok(Window::FiveMinutes),
        Ok(pb::Window::Window1h) => Ok(Window::OneHour),
        Err(_) => Err(validate::invalid("window", format!("unknown window {w}")).into()),
    }
}

fn window_to_proto(w: Window) -> i32 {
    match w {
        Window::OneMinute => pb::Window::Window1m,
        Window::FiveMinutes => pb::Window::Window5m,
        Window::OneHour => pb::Window::Window1h,
    }
    .into()
}

fn rank_by(by: i32) -> Result<RankBy, Status> {
    match pb::RankBy::try_from(by) {
        Ok(pb::RankBy::Unspecified | pb::RankBy::Decisions) => Ok(RankBy::Decisions),
        Ok(pb::RankBy::Denials) => Ok(RankBy::Denials),
        Err(_) => Err(validate::invalid("by", format!("unknown ranking {by}")).into()),
    }
}

fn top_to_proto(t: TopList) -> pb::RuleTop {
    pb::RuleTop {
        scope: t.scope,
        rule: t.rule,
        window: window_to_proto(t.window),
        by: match t.by {
            RankBy::Decisions => pb::RankBy::Decisions,
            RankBy::Denials => pb::RankBy::Denials,
        }
        .into(),
        total: t.total,
        error_bound: t.error_bound,
        absent_at_most: t.absent_at_most,
        identities: t
            .identities
            .into_iter()
            .map(|c| pb::IdentityCount {
                identity: c.key,
                count: c.count,
                error: c.error,
            })
            .collect(),
    }
}

fn usage_to_proto(scope: &str, rule: &str, u: &Usage) -> pb::RuleUtilization {
    pb::RuleUtilization {
        scope: scope.to_owned(),
        rule: rule.to_owned(),
        window: window_to_proto(u.window),
        capacity: u.capacity,
        refill_period: Some(duration(u.period)),
        decisions: u.decisions,
        denials: u.denials,
        denied_share: u.denied_share(),
        remaining_histogram: u.fill.to_vec(),
        denied_identities: u32::try_from(u.denied_identities).unwrap_or(u32::MAX),
        decisions_per_second: u.per_second.clone(),
        denials_per_second: u.denied_per_second.clone(),
        hints: u
            .hints()
            .into_iter()
            .map(|h| pb::CapacityHint {
                kind: h.kind.to_owned(),
                figure: h.figure,
                message: h.message,
            })
            .collect(),
    }
}

fn per_name(per: Per) -> &'static str {
    match per {
        Per::Scope => "scope",
        Per::Identity => "identity",
        Per::Operation => "operation",
        Per::IdentityOperation => "identity_operation",
    }
}

impl<S: Store> AdminApi<S> {
    /// Every (scope, rule) to report for `scope`: the configured limits of
    /// `rules` in config order, then rules seen in decisions (Envoy
    /// descriptor rules).
    fn rules_of(
        &self,
        rules: &Rules,
        scope: &str,
    ) -> Vec<(String, String, u64, std::time::Duration)> {
        let mut out: Vec<_> = rules
            .scope(scope)
            .map(|s| {
                s.limits
                    .iter()
                    .map(|l| {
                        let period = std::time::Duration::from_nanos(l.shape.period);
                        (
                            scope.to_owned(),
                            l.name.to_string(),
                            l.shape.capacity,
                            period,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (s, r) in self.hitters.seen() {
            if *s == *scope && !out.iter().any(|(_, name, ..)| *name == *r) {
                out.push((s.to_string(), r.to_string(), 0, std::time::Duration::ZERO));
            }
        }
        out
    }
}

#[tonic::async_trait]
impl<S: Store> pb::admin_server::Admin for AdminApi<S> {
    async fn top_identities(
        &self,
        request: Request<pb::TopIdentitiesRequest>,
    ) -> Result<Response<pb::TopIdentitiesResponse>, Status> {
        let snapshot = self.limiter.snapshot();
        let caller = authorize(&snapshot, &request, "TopIdentities")?;
        let caller = caller.as_deref();
        let req = request.into_inner();
        validate::text("scope", &req.scope, MAX_SCOPE_LEN, false)?;
        if !req.scope.is_empty() {
            check_scope(&snapshot, caller, "TopIdentities", "scope", &req.scope)?;
        }
        validate::text("rule", &req.rule, MAX_NAME_LEN, false)?;
        let (window, by) = (window(req.window)?, rank_by(req.by)?);
        let sizes = self.hitters.sizes();
        let k = match req.limit {
            0 => sizes.top_k,
            n => (n as usize).min(sizes.counters),
        };
        let rules = self
            .hitters
            .seen()
            .into_iter()
            .filter(|(s, r)| {
                (req.scope.is_empty() || **s == *req.scope)
                    && (req.rule.is_empty() || **r == *req.rule)
                    && may_read(caller, s)
            })
            .map(|(s, r)| top_to_proto(self.hitters.top(&s, &r, window, by, k)))
            .collect();
        Ok(Response::new(pb::TopIdentitiesResponse { rules }))
    }

    async fn utilization(
        &self,
        request: Request<pb::UtilizationRequest>,
    ) -> Result<Response<pb::UtilizationResponse>, Status> {
        let snapshot = self.limiter.snapshot();
        let caller = authorize(&snapshot, &request, "Utilization")?;
        let caller = caller.as_deref();
        let req = request.into_inner();
        validate::text("scope", &req.scope, MAX_SCOPE_LEN, false)?;
        if !req.scope.is_empty() {
            check_scope(&snapshot, caller, "Utilization", "scope", &req.scope)?;
        }
        let window = window(req.window)?;
        let scopes = if req.scope.is_empty() {
            let mut all: Vec<String> = snapshot
                .rules
                .scopes()
                .map(|s| s.name.to_string())
                .filter(|s| may_read(caller, s))
                .collect();
            all.sort();
            all
        } else {
            vec![req.scope]
        };
        let mut rules = Vec::new();
        for scope in &scopes {
            for (scope, rule, capacity, period) in self.rules_of(&snapshot.rules, scope) {
                let mut usage = self.hitters.usage(&scope, &rule, window);
                if capacity > 0 {
                    (usage.capacity, usage.period) = (capacity, period);
                }
                rules.push(usage_to_proto(&scope, &rule, &usage));
            }
        }
        Ok(Response::new(pb::UtilizationResponse { rules }))
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let snapshot = self.limiter.snapshot();
        let caller = authorize(&snapshot, &request, "Explain")?;
        let req = request.into_inner().request.unwrap_or_default();
        let domain = to_domain(&req, "request.")?;
        check_scope(
            &snapshot,
            caller.as_deref(),
            "Explain",
            "request.scope",
            &req.scope,
        )?;
        let e = self.limiter.explain_on(&snapshot.rules, &domain).await?;
        let mut pools = self.limiter.explain_pools(&snapshot.rules, &domain).await;
        let live = pools.iter_mut().find_map(|p| p.live.take());
        let pools = pools.into_iter().map(pool_explained).collect();
        let mut buckets = e.decision.buckets.iter();
        let limits = e
            .limits
            .into_iter()
            .map(|l| {
                // The dry run reports the applying limits' buckets in order.
                let bucket = l
                    .skipped_because
                    .is_none()
                    .then(|| buckets.next())
                    .flatten()
                    .map(|b| pb::BucketStatus {
                        rule: b.rule.to_string(),
                        limit: b.limit,
                        refill_period: Some(duration(b.period)),
                        remaining: b.remaining,
                        reset_after: Some(duration(b.reset_after)),
                        retry_after: b.retry_after.map(duration),
                        exhausted: b.exhausted,
                    });
                pb::LimitExplained {
                    rule: l.rule.to_string(),
                    per: per_name(l.per).to_owned(),
                    capacity: l.capacity,
                    refill_period: Some(duration(l.period)),
                    shadow: l.shadow,
                    applies: l.skipped_because.is_none(),
                    skipped_because: l.skipped_because.unwrap_or_default(),
                    bucket,
                }
            })
            .collect();
        Ok(Response::new(pb::ExplainResponse {
            scope_configured: e.scope_configured,
            limits,
            decision: Some(to_proto(e.decision)),
            pools,
            live_leases_known: live.is_some(),
            live_leases_not_listed: live
                .as_ref()
                .map_or(0, |(l, total)| total.saturating_sub(l.len() as u64)),
            live_leases: live.map_or_else(Vec::new, |(l, _)| {
                l.into_iter()
                    .map(|l| pb::LiveLease {
                        lease_id: l.lease_id.into(),
                        expires_at_unix_micros: l.expires_at_us,
                        weight: l.weight,
                    })
                    .collect()
            }),
        }))
    }

    async fn ban(
        &self,
        request: Request<pb::BanRequest>,
    ) -> Result<Response<pb::BanResponse>, Status> {
        let snapshot = self.limiter.snapshot();
        let caller = authorize(&snapshot, &request, "Ban")?;
        let req = request.into_inner();
        validate::text("scope", &req.scope, MAX_SCOPE_LEN, true)?;
        check_scope(&snapshot, caller.as_deref(), "Ban", "scope", &req.scope)?;
        let who = caller.as_ref().map_or("", |c| &*c.name);
        let store = self.limiter.store();
        let answer = bans::ban(store, &snapshot.rules, who, &req).await?;
        Ok(Response::new(answer))
    }

    async fn unban(
        &self,
        request: Request<pb::UnbanRequest>,
    ) -> Result<Response<pb::UnbanResponse>, Status> {
        let snapshot = self.limiter.snapshot();
        let caller = authorize(&snapshot, &request, "Unban")?;
        let req = request.into_inner();
        validate::text("scope", &req.scope, MAX_SCOPE_LEN, true)?;
        check_scope(&snapshot, caller.as_deref(), "Unban", "scope", &req.scope)?;
        let who = caller.as_ref().map_or("", |c| &*c.name);
        let store = self.limiter.store();
        let answer = bans::unban(store, &snapshot.rules, who, &req).await?;
        Ok(Response::new(answer))
    }

    async fn list_bans(
        &self,
        request: Request<pb::ListBansRequest>,
    ) -> Result<Response<pb::ListBansResponse>, Status> {
        let snapshot = self.limiter.snapshot();
        let caller = authorize(&snapshot, &request, "ListBans")?;
        let req = request.into_inner();
        validate::text("scope", &req.scope, MAX_SCOPE_LEN, true)?;
        check_scope(
            &snapshot,
            caller.as_deref(),
            "ListBans",
            "scope",
            &req.scope,
        )?;
        let answer = bans::list(self.limiter.store(), &snapshot.rules, &req).await?;
        Ok(Response::new(answer))
    }
}

fn pool_explained(p: crate::limiter::PoolExplained) -> pb::PoolExplained {
    pb::PoolExplained {
        rule: p.rule.to_string(),
        per: per_name(p.per).to_owned(),
        concurrency: p.concurrency,
        max_lease: Some(duration(p.max_lease)),
        applies: p.skipped_because.is_none(),
        skipped_because: p.skipped_because.unwrap_or_default(),
        in_flight: p.in_flight.unwrap_or_default(),
        in_flight_known: p.in_flight.is_some(),
    }
}
