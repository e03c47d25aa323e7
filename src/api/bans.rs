//! `tollgate.v1.Admin`'s penalty-box calls: Ban, Unban and ListBans,
//! validated here and kept by the store, so every replica sharing it sees
//! the same bans. Each ban and unban is an audit line.

use std::time::Duration;

use tonic::Status;

use super::tollgate::duration;
use super::validate::{self, MAX_IDENTITY_LEN, MAX_OPERATION_LEN, MAX_SCOPE_LEN};
use crate::config::PenaltyPer;
use crate::limiter::Rules;
use crate::limiter::penalty::ScopePenalty;
use crate::pb::tollgate::v1 as pb;
use crate::store::{BanPosition, PenaltyAnswer, PenaltyKey, PenaltyOp, Store};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The longest ban an operator may set.
pub const MAX_BAN: Duration = Duration::from_secs(366 * 24 * 3600);
/// The longest `reason`, in bytes.
pub const MAX_REASON_LEN: usize = 256;
/// Bans per ListBans page when the request says 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// The most bans per ListBans page.
pub const MAX_PAGE_SIZE: u32 = 1_000;

/// The longest `page_token` ListBans gives: a ban's end and the store's
/// key of a caller (at most a few hundred bytes), base64.
pub const MAX_PAGE_TOKEN_LEN: usize = 2_048;

/// The page token that resumes after `position`: the ban's end, a dot,
/// and the caller's store key in URL-safe base64. A place, not a count, so
/// bans ending between two pages shift nothing.
fn token(position: &BanPosition) -> String {
    format!(
        "{}.{}",
        position.until,
        URL_SAFE_NO_PAD.encode(&position.caller)
    )
}

/// The position a [`token`] names, if `text` is one.
fn from_token(text: &str) -> Option<BanPosition> {
    if text.len() > MAX_PAGE_TOKEN_LEN {
        return None;
    }
    let (until, caller) = text.split_once('.')?;
    Some(BanPosition {
        until: until.parse().ok()?,
        caller: URL_SAFE_NO_PAD.decode(caller).ok()?,
    })
}

/// The penalty box of `scope`, or why it cannot be used.
fn penalty_of<'r>(rules: &'r Rules, scope: &str) -> Result<&'r ScopePenalty, Status> {
    validate::text("scope", scope, MAX_SCOPE_LEN, true)?;
    rules
        .scope(scope)
        .and_then(|s| s.penalty.as_ref())
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "scope: scope {scope:?} has no penalty box (no `penalty:` in its config)"
            ))
        })
}

/// The record key for `identity` and `operation` in a scope boxed by
/// `penalty`, validated.
fn key<'a>(
    penalty: &ScopePenalty,
    scope: &'a str,
    identity: &'a str,
    operation: &'a str,
) -> Result<PenaltyKey<'a>, Status> {
    validate::text("identity", identity, MAX_IDENTITY_LEN, true)?;
    let operation = match penalty.per {
        PenaltyPer::Identity if !operation.is_empty() => {
            return Err(validate::invalid(
                "operation",
                "this scope bans per identity; leave it empty",
            )
            .into());
        }
        PenaltyPer::Identity => None,
        PenaltyPer::IdentityOperation => {
            validate::text("operation", operation, MAX_OPERATION_LEN, true)?;
            Some(operation)
        }
    };
    Ok(PenaltyKey {
        scope,
        identity,
        operation,
    })
}

fn unavailable(e: crate::store::StoreError) -> Status {
    Status::unavailable(format!("rate-limit store unavailable: {e}"))
}

/// Bans a caller: `req` validated against `rules`, then the store.
pub(super) async fn ban(
    store: &impl Store,
    rules: &Rules,
    caller: &str,
    req: &pb::BanRequest,
) -> Result<pb::BanResponse, Status> {
    let penalty = penalty_of(rules, &req.scope)?;
    let key = key(penalty, &req.scope, &req.identity, &req.operation)?;
    let length = req
        .duration
        .as_ref()
        .and_then(|d| {
            let secs = u64::try_from(d.seconds).ok()?;
            Some(Duration::new(secs, u32::try_from(d.nanos).ok()?))
        })
        .filter(|d| (Duration::from_millis(1)..=MAX_BAN).contains(d))
        .ok_or_else(|| validate::invalid("duration", "must be between 1ms and 366d"))?;
    validate::text("reason", &req.reason, MAX_REASON_LEN, false)?;
    let op = PenaltyOp::Ban {
        key,
        duration: length,
        forget: Duration::from_nanos(penalty.rule.forgive_ns),
        reason: &req.reason,
    };
    let PenaltyAnswer::Banned(ban) = store.penalties(&op).await.map_err(unavailable)? else {
        return Err(Status::internal(
            "the store answered a ban with something else",
        ));
    };
    tracing::warn!(
        target: "tollgate::audit",
        caller,
        scope = req.scope,
        identity = req.identity,
        operation = req.operation,
        ban_ms = length.as_millis() as u64,
        until_us = ban.until_us,
        reason = req.reason,
        "banned by an operator"
    );
    Ok(pb::BanResponse {
        remaining: Some(duration(ban.retry_after)),
        until_unix_micros: i64::try_from(ban.until_us).unwrap_or(i64::MAX),
    })
}

/// Lifts a caller's ban and clears its history.
pub(super) async fn unban(
    store: &impl Store,
    rules: &Rules,
    caller: &str,
    req: &pb::UnbanRequest,
) -> Result<pb::UnbanResponse, Status> {
    let penalty = penalty_of(rules, &req.scope)?;
    let key = key(penalty, &req.scope, &req.identity, &req.operation)?;
    validate::text("reason", &req.reason, MAX_REASON_LEN, false)?;
    let answer = store
        .penalties(&PenaltyOp::Unban { key })
        .await
        .map_err(unavailable)?;
    let was_banned = matches!(answer, PenaltyAnswer::Unbanned(true));
    tracing::warn!(
        target: "tollgate::audit",
        caller,
        scope = req.scope,
        identity = req.identity,
        operation = req.operation,
        was_banned,
        reason = req.reason,
        "unbanned by an operator"
    );
    Ok(pb::UnbanResponse { was_banned })
}

/// One page of a scope's bans.
pub(super) async fn list(
    store: &impl Store,
    rules: &Rules,
    req: &pb::ListBansRequest,
) -> Result<pb::ListBansResponse, Status> {
    penalty_of(rules, &req.scope)?;
    let size = match req.page_size {
        0 => DEFAULT_PAGE_SIZE,
        n if n > MAX_PAGE_SIZE => {
            return Err(validate::invalid(
                "page_size",
                format!("is {n}; the most allowed is {MAX_PAGE_SIZE}"),
            )
            .into());
        }
        n => n,
    };
    let after = match req.page_token.as_str() {
        "" => None,
        t => Some(
            from_token(t)
                .ok_or_else(|| validate::invalid("page_token", "is not a token ListBans gave"))?,
        ),
    };
    let op = PenaltyOp::List {
        scope: &req.scope,
        after: after.as_ref().map(BanPosition::cursor),
        limit: u64::from(size),
    };
    let PenaltyAnswer::Listed { total, bans, more } =
        store.penalties(&op).await.map_err(unavailable)?
    else {
        return Err(Status::internal(
            "the store answered a listing with something else",
        ));
    };
    let next_page_token = match bans.last() {
        Some(last) if more => token(&last.position),
        _ => String::new(),
    };
    Ok(pb::ListBansResponse {
        next_page_token,
        total,
        bans: bans
            .into_iter()
            .map(|b| pb::BannedCaller {
                identity: b.identity,
                operation: b.operation.unwrap_or_default(),
                remaining: Some(duration(b.remaining)),
                until_unix_micros: i64::try_from(b.until_us).unwrap_or(i64::MAX),
                reason: b.reason,
            })
            .collect(),
    })
}
