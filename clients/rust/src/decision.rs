//! The question (`DecisionRequest`) and the answer (`Decision`), as plain Rust
//! types, with the input checks Tollgate would make and the translation to and
//! from the generated proto types.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::error::Error;
use crate::pb::tollgate::v1 as pb;

/// The most bytes in a scope; Tollgate refuses longer ones.
pub const MAX_SCOPE_BYTES: usize = 128;
/// The most bytes in an identity or an operation.
pub const MAX_VALUE_BYTES: usize = 256;
/// The most attributes on one request.
pub const MAX_ATTRIBUTES: usize = 16;
/// The most bytes in an attribute name.
pub const MAX_ATTRIBUTE_NAME_BYTES: usize = 64;
/// The most requests in one `ShouldAllowBatch` call.
pub const MAX_BATCH: usize = 256;
/// The shortest `settle_within`.
pub const MIN_SETTLE_WITHIN: Duration = Duration::from_millis(1);
/// The longest `settle_within` any Tollgate accepts. Each server has its own
/// bound, `reservations.max_settle_within` (1 h unless set, 7 d at most), and
/// refuses a longer one with [`Error::InvalidArgument`] naming
/// `settle_within`.
pub const MAX_SETTLE_WITHIN: Duration = Duration::from_secs(7 * 24 * 3600);
/// The most bytes in a reservation token.
pub const MAX_RESERVATION_BYTES: usize = 16 * 1024;
/// The longest `max_wait` Tollgate accepts.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// How much of a limit's headroom a request may take.
///
/// A limit with `headroom: {normal: 10%, sheddable: 30%}` lets a
/// [`Priority::Normal`] request take all but the last 10% of the bucket (or
/// budget), and a [`Priority::Sheddable`] one all but the last 30%, so
/// background work is shed before interactive users. A denial's
/// `retry_after` is exact for the request's priority. Limits without
/// `headroom` treat every priority alike.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Priority {
    /// The default: may not take `headroom.normal`.
    #[default]
    Normal,
    /// May take a limit's whole capacity, headroom included: the user at the
    /// screen, a health check.
    Critical,
    /// Shed first: may not take `headroom.sheddable`. Background agents,
    /// batch jobs, prefetching.
    Sheddable,
}

impl From<Priority> for pb::Priority {
    fn from(p: Priority) -> Self {
        match p {
            Priority::Normal => Self::Normal,
            Priority::Critical => Self::Critical,
            Priority::Sheddable => Self::Sheddable,
        }
    }
}

/// One question to Tollgate: may this caller do this now?
///
/// Built with [`DecisionRequest::new`] and the `with_*` methods. Nothing is
/// checked until the request is sent; then [`crate::Client`] applies the same
/// limits Tollgate does, so a bad value costs no round trip and comes back as
/// [`Error::InvalidRequest`] naming the field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecisionRequest {
    /// The tenant, MCP server or gateway whose rules apply.
    pub scope: String,
    /// The caller; empty means anonymous (one shared bucket per scope).
    pub identity: String,
    /// What the caller is doing, e.g. `tools/call:search` or a route.
    pub operation: String,
    /// Tokens to take; 0 means 1.
    pub cost: u32,
    /// Decide, but take nothing.
    pub dry_run: bool,
    /// Selects tiered rules, e.g. `tier=premium`.
    pub attributes: BTreeMap<String, String>,
    /// Which headroom the request may take; see [`Priority`].
    pub priority: Priority,
    /// When set, `cost` is an estimate: an allowed decision carries a
    /// [`Reservation`], which [`crate::Client::settle`] turns into the real
    /// cost within this time (after it, the estimate stands). Between
    /// [`MIN_SETTLE_WITHIN`] and the server's `reservations.max_settle_within`
    /// (1 h unless set). Only for [`crate::Client::should_allow`]: a batch
    /// cannot reserve.
    pub settle_within: Option<Duration>,
    /// Shaping: the longest this caller can wait before proceeding. A limit
    /// with `max_delay` then admits a request it would let through within
    /// that time with a [`Decision::delay`] instead of denying it. `None`:
    /// the caller cannot wait (allow now or deny). At most [`MAX_WAIT`].
    pub max_wait: Option<Duration>,
    /// Counts this request as a strike in the scope's penalty box whatever
    /// it is decided: report a failed login as a dry run with a strike.
    pub strike: bool,
    /// Also takes a lease of this id in the scope's concurrency limit that
    /// matches, all or nothing with the rates: a full pool denies the
    /// request (taking no tokens), and a request the rates deny gives its
    /// lease back. [`Decision::lease`] says what is held. 1 to
    /// [`crate::lease::MAX_LEASE_ID_BYTES`] bytes; not in a batch.
    pub lease_id: Option<String>,
    /// The lease's time to live; `None` means the limit's `max_lease`.
    pub lease_ttl: Option<Duration>,
}

impl DecisionRequest {
    /// A request in `scope`, anonymous, with no operation and a cost of 1.
    pub fn new(scope: impl Into<String>) -> Self {
        Self {
            scope: scope.into(),
            ..Self::default()
        }
    }

    /// Sets the caller's identity.
    #[must_use]
    pub fn with_identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = identity.into();
        self
    }

    /// Sets the operation.
    #[must_use]
    pub fn with_operation(mut self, operation: impl Into<String>) -> Self {
        self.operation = operation.into();
        self
    }

    /// Sets the number of tokens to take.
    #[must_use]
    pub fn with_cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self
    }

    /// Asks without taking anything.
    #[must_use]
    pub fn with_dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Adds an attribute.
    #[must_use]
    pub fn with_attribute(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(name.into(), value.into());
        self
    }

    /// Sets the priority, which decides how much of a limit's headroom the
    /// request may take.
    #[must_use]
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Says the caller can wait up to `max_wait` before proceeding: see
    /// [`DecisionRequest::max_wait`].
    #[must_use]
    pub fn with_max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = Some(max_wait);
        self
    }

    /// Makes `cost` an estimate, to be settled within `within`: see
    /// [`DecisionRequest::settle_within`] and [`crate::Client::settle`].
    #[must_use]
    pub fn with_settle_within(mut self, within: Duration) -> Self {
        self.settle_within = Some(within);
        self
    }

    /// Takes a lease `id` with the rates: see [`DecisionRequest::lease_id`].
    #[must_use]
    pub fn with_lease(mut self, id: impl Into<String>, ttl: Option<Duration>) -> Self {
        self.lease_id = Some(id.into());
        self.lease_ttl = ttl;
        self
    }

    /// The lease this request asks for, as [`crate::Client::renew_lease`]
    /// and [`crate::Client::release_lease`] name it.
    pub fn lease_target(&self) -> crate::lease::LeaseTarget {
        crate::lease::LeaseTarget {
            scope: self.scope.clone(),
            identity: self.identity.clone(),
            operation: self.operation.clone(),
            attributes: self.attributes.clone(),
            lease_id: self.lease_id.clone().unwrap_or_default(),
        }
    }

    /// Checks the request against Tollgate's input limits. `prefix` is put
    /// before the field name, such as `requests[2].`.
    pub(crate) fn validate(&self, prefix: &str) -> Result<(), Error> {
        let field = |name: &str| format!("{prefix}{name}");
        if self.scope.is_empty() {
            return Err(Error::invalid(field("scope"), "must not be empty"));
        }
        check_text(&field("scope"), &self.scope, MAX_SCOPE_BYTES)?;
        check_text(&field("identity"), &self.identity, MAX_VALUE_BYTES)?;
        check_text(&field("operation"), &self.operation, MAX_VALUE_BYTES)?;
        if self.attributes.len() > MAX_ATTRIBUTES {
            return Err(Error::invalid(
                field("attributes"),
                format!(
                    "has {} entries; the most allowed is {MAX_ATTRIBUTES}",
                    self.attributes.len()
                ),
            ));
        }
        for (name, value) in &self.attributes {
            let path = field(&format!("attributes[{name:?}]"));
            if name.is_empty() {
                return Err(Error::invalid(path, "name must not be empty"));
            }
            check_text(&path, name, MAX_ATTRIBUTE_NAME_BYTES)?;
            check_text(&path, value, MAX_VALUE_BYTES)?;
        }
        if let Some(within) = self.settle_within
            && !(MIN_SETTLE_WITHIN..=MAX_SETTLE_WITHIN).contains(&within)
        {
            return Err(Error::invalid(
                field("settle_within"),
                format!("must be between {MIN_SETTLE_WITHIN:?} and {MAX_SETTLE_WITHIN:?}"),
            ));
        }
        if let Some(id) = &self.lease_id {
            if id.is_empty() {
                return Err(Error::invalid(field("lease_id"), "must not be empty"));
            }
            check_text(&field("lease_id"), id, crate::lease::MAX_LEASE_ID_BYTES)?;
        }
        if self.max_wait.is_some_and(|w| w > MAX_WAIT) {
            return Err(Error::invalid(
                field("max_wait"),
                format!("must be at most {MAX_WAIT:?}"),
            ));
        }
        Ok(())
    }

    /// [`DecisionRequest::validate`] for entry `i` of a batch, which cannot
    /// reserve.
    pub(crate) fn validate_in_batch(&self, i: usize) -> Result<(), Error> {
        let prefix = format!("requests[{i}].");
        self.validate(&prefix)?;
        if self.settle_within.is_some() {
            return Err(Error::invalid(
                format!("{prefix}settle_within"),
                "is not supported in a batch: reserve with Client::should_allow",
            ));
        }
        if self.lease_id.is_some() {
            return Err(Error::invalid(
                format!("{prefix}lease_id"),
                "is not supported in a batch: take a lease with Client::should_allow",
            ));
        }
        Ok(())
    }

    pub(crate) fn to_proto(&self) -> pb::ShouldAllowRequest {
        pb::ShouldAllowRequest {
            scope: self.scope.clone(),
            identity: self.identity.clone(),
            operation: self.operation.clone(),
            cost: self.cost,
            dry_run: self.dry_run,
            attributes: self
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            priority: pb::Priority::from(self.priority).into(),
            // Checked by `validate` to fit.
            settle_within: self
                .settle_within
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
            max_wait: self
                .max_wait
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
            strike: self.strike,
            lease_id: self.lease_id.clone().unwrap_or_default(),
            lease_ttl: self
                .lease_ttl
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
        }
    }
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), Error> {
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("is {} bytes; the most allowed is {max}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// Tollgate's answer, or the local one the failure policy gave.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// True when the request may proceed.
    pub allowed: bool,
    /// When denied and a retry can succeed: the earliest moment, from now, at
    /// which the same request would pass if nobody else consumed first (a
    /// lower bound for buckets shared with other callers). `None` when
    /// allowed, or when no retry can ever pass (see `reason`).
    pub retry_after: Option<Duration>,
    /// Capacity of the most restrictive bucket; 0 when no rule applied.
    pub limit: u64,
    /// Whole tokens left in that bucket.
    pub remaining: u64,
    /// Time until that bucket is full again.
    pub reset_after: Duration,
    /// That bucket's rule; empty when no rule applied.
    pub rule: String,
    /// Every bucket that applied, in the order of the scope's limits.
    pub buckets: Vec<BucketStatus>,
    /// True when the request was allowed without being counted: by Tollgate
    /// because its store was down, or locally because Tollgate could not be
    /// asked (then `local` says why).
    pub degraded: bool,
    /// Why a denial has no `retry_after`, such as a cost over capacity.
    pub reason: String,
    /// Set when this decision was made here, by the client's failure policy
    /// ([`crate::FailureMode::Open`]), because Tollgate could not answer.
    pub local: Option<FailureCause>,
    /// Set when allowed with [`DecisionRequest::settle_within`]: what to
    /// hand [`crate::Client::settle`] once the real cost is known. `None`
    /// for a denial, a dry run, and a degraded answer (which took nothing,
    /// so there is nothing to settle).
    pub reservation: Option<Reservation>,
    /// Shaping: when allowed for later (the request said it could wait,
    /// [`DecisionRequest::max_wait`]), how long to wait before proceeding;
    /// zero to proceed at once.
    pub delay: Duration,
    /// True when the caller is in the scope's penalty box (or on its deny
    /// list): `retry_after` runs to the ban's end, and nothing was taken.
    pub banned: bool,
    /// True when the request's concurrency limit had no room for its lease
    /// (the server's `DENIAL_REASON_CONCURRENCY_LIMITED`): then `rule` and
    /// `limit` are that limit's, and `retry_after` an upper bound.
    pub concurrency_limited: bool,
    /// Set when the request carried a lease id and one of the scope's
    /// concurrency limits matched: see [`Decision::lease_denied`].
    pub lease: Option<crate::lease::Lease>,
}

impl Decision {
    /// True when the request was denied by its concurrency limit: the pool
    /// was full, and no rate was charged. Then `retry_after` is an upper
    /// bound of the wait (the earliest live lease's expiry), not a lower
    /// one. (A request the rates denied has an ungranted lease too, but is
    /// not this.) A server older than the denial reason is read by the
    /// shape of its answer: an ungranted lease and no bucket.
    pub fn lease_denied(&self) -> bool {
        !self.allowed
            && !self.banned
            && (self.concurrency_limited
                || (self.buckets.is_empty() && self.lease.as_ref().is_some_and(|l| !l.granted)))
    }

    /// The fail-open answer: allowed, degraded, counted nowhere.
    pub(crate) fn fail_open(cause: FailureCause) -> Self {
        Self {
            allowed: true,
            degraded: true,
            local: Some(cause),
            ..Self::default()
        }
    }

    /// True when this is an entry of an atomic batch
    /// ([`crate::Client::should_allow_batch_atomic`]) that was denied only
    /// because another entry was: none of its own buckets ran out, and it
    /// has neither a `retry_after` nor a `reason` of its own. Such an entry
    /// says nothing about when the batch may pass; the entries that denied
    /// do.
    pub fn denied_by_batch(&self) -> bool {
        !self.allowed
            && self.retry_after.is_none()
            && self.reason.is_empty()
            && !self.buckets.iter().any(|b| b.exhausted)
    }

    /// The rules of the buckets that denied this request: those that did not
    /// hold the cost. Empty when allowed.
    pub fn violated_policies(&self) -> impl Iterator<Item = &str> {
        let denied = !self.allowed;
        let pool = self
            .lease
            .as_ref()
            .filter(|l| self.lease_denied() && !l.rule.is_empty())
            .map(|l| l.rule.as_str());
        self.buckets
            .iter()
            .filter(move |b| denied && b.exhausted)
            .map(|b| b.rule.as_str())
            .chain(pool)
    }
}

/// A reservation: an opaque token, signed by Tollgate, naming what an allowed
/// request with [`DecisionRequest::settle_within`] took. Any replica that
/// shares the signing key (`reservations.secret`) settles it, once, before
/// its deadline.
///
/// It can be kept as text ([`Reservation::as_str`]) and rebuilt with
/// [`Reservation::new`], say to settle from another process.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reservation(String);

impl Reservation {
    /// A reservation from its token, as [`Reservation::as_str`] gave it.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The token, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What [`crate::Client::settle`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settlement {
    /// The estimate the reservation was made with: the cost it took from
    /// each bucket, before the settle applied the difference.
    pub estimate: u64,
    /// Every bucket the reservation charged, after the settle, in the order
    /// of the scope's limits. `remaining` is 0 while a bucket is in debt (the
    /// real cost was over the estimate and over what the bucket held).
    pub buckets: Vec<BucketStatus>,
}

impl From<pb::SettleResponse> for Settlement {
    fn from(r: pb::SettleResponse) -> Self {
        Self {
            estimate: r.estimate,
            buckets: r.buckets.into_iter().map(BucketStatus::from).collect(),
        }
    }
}

/// The state of one bucket that applied to a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BucketStatus {
    /// The name of the limit this bucket belongs to.
    pub rule: String,
    /// The bucket's capacity (its burst).
    pub limit: u64,
    /// Whole tokens left after this decision.
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset_after: Duration,
    /// Set when this bucket alone would deny: the time until it holds the
    /// cost. `None` when it has enough, or can never have enough.
    pub retry_after: Option<Duration>,
    /// True when this bucket does not hold the cost now.
    pub exhausted: bool,
    /// The time in which the empty bucket refills completely: with `limit`,
    /// its rate. It is the window `w` of the `RateLimit-Policy` field. `None`
    /// when Tollgate did not report it (a server older than the field).
    pub refill_period: Option<Duration>,
}

/// Why Tollgate could not answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureCause {
    /// No connection could be made, or it broke.
    Unreachable(String),
    /// No answer within the deadline.
    DeadlineExceeded,
    /// Tollgate answered `UNAVAILABLE`: its store is down and the scope
    /// fails closed, or it is shutting down.
    Unavailable(String),
    /// Recent calls failed, so this one was not attempted; see
    /// [`crate::ClientBuilder::circuit_breaker`].
    CircuitOpen,
}

impl fmt::Display for FailureCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable(m) => write!(f, "Tollgate is unreachable: {m}"),
            Self::DeadlineExceeded => f.write_str("Tollgate did not answer within the deadline"),
            Self::Unavailable(m) => write!(f, "Tollgate answered UNAVAILABLE: {m}"),
            Self::CircuitOpen => f.write_str("recent calls to Tollgate failed; not asking for now"),
        }
    }
}

/// A proto duration as a std one; a negative one (never sent) is zero.
fn duration(d: Option<prost_types::Duration>) -> Option<Duration> {
    d.map(|d| Duration::try_from(d).unwrap_or(Duration::ZERO))
}

impl From<pb::ShouldAllowResponse> for Decision {
    fn from(r: pb::ShouldAllowResponse) -> Self {
        Self {
            allowed: r.allowed,
            retry_after: duration(r.retry_after),
            limit: r.limit,
            remaining: r.remaining,
            reset_after: duration(r.reset_after).unwrap_or_default(),
            rule: r.rule,
            buckets: r.buckets.into_iter().map(BucketStatus::from).collect(),
            degraded: r.degraded,
            reason: r.reason,
            local: None,
            reservation: Some(r.reservation)
                .filter(|t| !t.is_empty())
                .map(Reservation),
            delay: duration(r.delay).unwrap_or_default(),
            banned: r.denial_reason == pb::DenialReason::Banned as i32,
            concurrency_limited: r.denial_reason == pb::DenialReason::ConcurrencyLimited as i32,
            lease: r.lease.map(crate::lease::Lease::from),
        }
    }
}

impl From<pb::BucketStatus> for BucketStatus {
    fn from(b: pb::BucketStatus) -> Self {
        Self {
            rule: b.rule,
            limit: b.limit,
            remaining: b.remaining,
            reset_after: duration(b.reset_after).unwrap_or_default(),
            retry_after: duration(b.retry_after),
            exhausted: b.exhausted,
            refill_period: duration(b.refill_period),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field_like_tollgate_does() {
        let long = "x".repeat(257);
        let err = DecisionRequest::new("demo")
            .with_identity(long)
            .validate("requests[3].")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid request: requests[3].identity: is 257 bytes; the most allowed is 256"
        );
        let err = DecisionRequest::new("demo")
            .with_attribute("tier", "a\nb")
            .validate("")
            .unwrap_err();
        assert!(err.to_string().contains("attributes[\"tier\"]"), "{err}");
        assert!(DecisionRequest::new("").validate("").is_err());
        assert!(DecisionRequest::new("demo").validate("").is_ok());
    }

    #[test]
    fn settle_within_is_checked_and_refused_in_a_batch() {
        let reserve = |d| DecisionRequest::new("llm").with_settle_within(d);
        assert!(reserve(Duration::from_secs(60)).validate("").is_ok());
        for d in [Duration::ZERO, MAX_SETTLE_WITHIN + Duration::from_secs(1)] {
            let err = reserve(d).validate("").unwrap_err();
            assert!(
                matches!(&err, Error::InvalidRequest { field, .. } if field == "settle_within"),
                "{err}"
            );
        }
        let err = reserve(Duration::from_secs(60))
            .validate_in_batch(0)
            .unwrap_err();
        assert!(
            err.to_string().contains("requests[0].settle_within"),
            "{err}"
        );
    }

    #[test]
    fn priority_and_settle_within_reach_the_proto() {
        let p = DecisionRequest::new("llm")
            .with_priority(Priority::Sheddable)
            .with_settle_within(Duration::from_millis(1_500))
            .to_proto();
        assert_eq!(p.priority(), pb::Priority::Sheddable);
        let within = p.settle_within.unwrap();
        assert_eq!((within.seconds, within.nanos), (1, 500_000_000));
        let p = DecisionRequest::new("llm").to_proto();
        assert_eq!(p.priority(), pb::Priority::Normal);
        assert!(p.settle_within.is_none());
    }

    #[test]
    fn violated_policies_are_the_exhausted_buckets_of_a_denial() {
        let bucket = |rule: &str, exhausted| BucketStatus {
            rule: rule.into(),
            exhausted,
            ..BucketStatus::default()
        };
        let mut d = Decision {
            allowed: false,
            buckets: vec![bucket("global", false), bucket("per-user", true)],
            ..Decision::default()
        };
        assert_eq!(d.violated_policies().collect::<Vec<_>>(), ["per-user"]);
        d.allowed = true;
        assert_eq!(d.violated_policies().count(), 0);
    }

    #[test]
    fn a_full_pool_beside_rates_is_a_lease_denial_by_its_reason() {
        let answer = |reason: pb::DenialReason| pb::ShouldAllowResponse {
            rule: "streams".into(),
            buckets: vec![pb::BucketStatus {
                rule: "per-user".into(),
                ..pb::BucketStatus::default()
            }],
            denial_reason: reason.into(),
            lease: Some(pb::LeaseGrant {
                rule: "streams".into(),
                ..pb::LeaseGrant::default()
            }),
            ..pb::ShouldAllowResponse::default()
        };
        let full = Decision::from(answer(pb::DenialReason::ConcurrencyLimited));
        assert!(full.concurrency_limited && full.lease_denied());
        assert_eq!(full.violated_policies().collect::<Vec<_>>(), ["streams"]);
        // Without the reason, an answer that carries buckets is not the
        // pool's (an older server's rate denial looks so).
        let rates = Decision::from(answer(pb::DenialReason::RateLimited));
        assert!(!rates.lease_denied());
    }
}
