//! Scopes and their limits: what callers are limited by.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::Deserialize;

/// The largest capacity a bucket may have. The Redis script keeps exact
/// integers in Lua's doubles (53 bits); with `capacity² < 2^53` every
/// intermediate value stays exact.
pub const MAX_CAPACITY: u64 = 50_000_000;
/// The largest budget per window. With spend (debt included) kept below
/// 2^52, the Redis script's numbers stay exact in Lua's doubles.
pub const MAX_BUDGET: u64 = 1 << 50;
/// The shortest refill period.
pub const MIN_REFILL_PERIOD: Duration = Duration::from_millis(1);
/// The longest refill period.
pub const MAX_REFILL_PERIOD: Duration = Duration::from_secs(366 * 24 * 3600);

/// The longest a limit may make a request wait (`max_delay`): the bound of
/// a shaped bucket's TAT ahead of now is `refill_period` plus this.
pub const MAX_MAX_DELAY: Duration = Duration::from_secs(3600);
/// The largest concurrency limit: the most weight (and so leases) one pool
/// holds live at once. It bounds a pool's memory, and the work of a script
/// call, which is at most linear in the leases that expire in it.
pub const MAX_CONCURRENCY: u64 = 10_000;
/// A concurrency limit's `max_lease` when it sets none.
pub const DEFAULT_MAX_LEASE: Duration = Duration::from_secs(300);
/// The shortest `max_lease` a concurrency limit may set.
pub const MIN_MAX_LEASE: Duration = Duration::from_secs(1);
/// The longest `max_lease`: the longest a crashed caller can hold a slot.
pub const MAX_MAX_LEASE: Duration = Duration::from_secs(24 * 3600);

/// The longest scope or rule name.
pub const MAX_NAME_LEN: usize = 128;

/// What a decision does when the store cannot answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Allow, and mark the response `degraded`.
    #[default]
    Open,
    /// Refuse with gRPC UNAVAILABLE, which callers can tell from a denial.
    Closed,
}

/// What to do with a request whose scope is not configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownScope {
    /// Allow, with an empty `rule`.
    #[default]
    Allow,
    /// Deny, with no retry_after and a reason.
    Deny,
}

/// One scope: a tenant, MCP server or gateway domain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeConfig {
    /// The scope's name, as callers send it.
    pub name: String,
    /// Overrides the top-level `failure_mode` for this scope.
    #[serde(default)]
    pub failure_mode: Option<FailureMode>,
    /// The limits; every one that matches a request applies.
    #[serde(default)]
    pub limits: Vec<LimitConfig>,
    /// For Envoy's RLS: which descriptor entries are the identity and the
    /// operation. Absent: the whole descriptor is the identity.
    #[serde(default)]
    pub descriptor_keys: Option<DescriptorKeysConfig>,
    /// Which parts of a bucket's key choose its Redis Cluster hash slot
    /// (see [`HashTag`]); absent, the top-level `hash_tag`. The embedded
    /// store ignores it.
    #[serde(default)]
    pub hash_tag: Option<HashTag>,
    /// The penalty box: callers denied again and again are banned for a
    /// while (see [`super::penalty`]). Absent: no one is ever banned.
    #[serde(default)]
    pub penalty: Option<super::penalty::PenaltyConfig>,
    /// Identities (or globs) the penalty box never bans; their limits
    /// still apply.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Identities (or globs) always denied in this scope, without a store
    /// call: a ban with no end.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// Which parts of a bucket's key pick its Redis hash slot: buckets with the
/// same tag share a slot, so a charge of them is one atomic script call on
/// Cluster, and a charge whose buckets have different tags is decided by
/// reserve and refund. Only the Redis store reads it; on standalone and
/// Sentinel every key is on one node anyway, and the tag changes only the
/// key's text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum HashTag {
    /// The scope alone: all of a scope's buckets share one slot, so every
    /// request is one script, and one scope is one shard's work. The
    /// default: it keeps every decision and every settle atomic, and the
    /// keys of configs written before the choice existed.
    #[default]
    Scope,
    /// The scope and the identity: an identity's buckets (per identity, per
    /// identity and operation, its budgets and open reservations) share a
    /// slot, and identities spread over the Cluster. Per-scope and
    /// per-operation buckets stay in the scope's slot.
    Identity,
    /// The scope, the identity and the operation: each (identity,
    /// operation) pair's buckets get a slot of their own, for one identity
    /// too hot for one shard. Its per-identity buckets are then in another
    /// slot than its per-pair ones.
    IdentityOperation,
}

/// Names the Envoy descriptor entries that a scope reads, such as
/// `{ identity: user, operation: path }`. Every entry is also an attribute.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorKeysConfig {
    /// The entry key whose value is the identity.
    #[serde(default)]
    pub identity: Option<String>,
    /// The entry key whose value is the operation.
    #[serde(default)]
    pub operation: Option<String>,
    /// The entry key whose value is the request's priority: `critical`,
    /// `normal` or `sheddable` (any case). Absent entry: `normal`.
    #[serde(default)]
    pub priority: Option<String>,
    /// The entry key whose value is a lease id (Envoy's `x-request-id`,
    /// through a `request_headers` action): a descriptor that reaches one
    /// of the scope's concurrency limits holds the lease of that id, and
    /// gives it back when the same descriptor comes with
    /// `is_negative_hits`. Required when the scope has a concurrency limit:
    /// a lease taken without an id could never be given back.
    #[serde(default)]
    pub lease_id: Option<String>,
}

/// One limit: a family of token buckets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// The rule name reported in responses; unique within the scope.
    pub name: String,
    /// What one bucket is kept per.
    pub per: Per,
    /// Operation globs (`*`, `?`, `[...]`); absent means every operation.
    #[serde(default)]
    pub operations: Option<Vec<String>>,
    /// Applies only when the request's attributes hold all of these.
    #[serde(default)]
    pub when: BTreeMap<String, String>,
    /// The burst: the most tokens the bucket holds. A token bucket needs
    /// it and `refill_period`; a budget has neither.
    #[serde(default)]
    pub capacity: u64,
    /// Time for an empty bucket to refill; the rate is capacity/refill_period.
    #[serde(default, with = "humantime_serde")]
    pub refill_period: Duration,
    /// A calendar budget instead of a token bucket: at most this much spent
    /// per `window`, reset to nothing spent at each window's start.
    #[serde(default)]
    pub budget: Option<u64>,
    /// A budget's window: `day`, `week` (from Monday), `month`, or a fixed
    /// duration aligned to the Unix epoch (`1h`, `10s`).
    #[serde(default)]
    pub window: Option<String>,
    /// The IANA time zone calendar windows follow (DST-aware); default UTC.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// Headroom kept from lower priorities, as shares of the capacity (or
    /// budget): a NORMAL request may not take the last `normal`, a
    /// SHEDDABLE one not the last `sheddable`. CRITICAL may take everything.
    #[serde(default)]
    pub headroom: Option<HeadroomConfig>,
    /// Judge and count, but never deny because of this limit.
    #[serde(default)]
    pub shadow: bool,
    /// Shaping: a request this limit would let through within this long
    /// is admitted with that delay instead of denied (when the request
    /// says it may wait that long: its `max_wait`). Absent: no delay.
    #[serde(default, with = "humantime_serde")]
    pub max_delay: Option<Duration>,
    /// A concurrency limit instead of a bucket: at most this much weight
    /// held at once by live leases (see `docs/leases.md`).
    #[serde(default)]
    pub concurrency: Option<u64>,
    /// A concurrency limit's longest lease (and so the longest a crashed
    /// caller holds a slot): an acquire or renew may ask for at most this
    /// time to live. Default [`DEFAULT_MAX_LEASE`].
    #[serde(default, with = "humantime_serde")]
    pub max_lease: Option<Duration>,
    /// A concurrency limit's weight for an acquire that names none; 1 when
    /// absent.
    #[serde(default)]
    pub weight: Option<u64>,
}

/// `headroom: {normal: 10%, sheddable: 30%}`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadroomConfig {
    /// The share NORMAL requests may not take.
    #[serde(default)]
    pub normal: Percent,
    /// The share SHEDDABLE requests may not take; at least `normal`.
    #[serde(default)]
    pub sheddable: Percent,
}

/// A whole percentage, written `10%` (or `10`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Percent(pub u8);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        let n = match Raw::deserialize(d)? {
            Raw::Number(n) => n,
            Raw::Text(t) => t
                .trim()
                .strip_suffix('%')
                .unwrap_or(&t)
                .trim()
                .parse::<u64>()
                .map_err(|_| {
                    serde::de::Error::custom(format!("{t:?} is not a whole percentage like 10%"))
                })?,
        };
        u8::try_from(n)
            .ok()
            .filter(|&n| n < 100)
            .map(Percent)
            .ok_or_else(|| serde::de::Error::custom(format!("{n}% must be below 100%")))
    }
}

impl Percent {
    /// The share of `whole`, rounded up: headroom is never smaller than
    /// stated, so the lower priority never takes more than its share.
    pub fn of(self, whole: u64) -> u64 {
        let v = u128::from(whole) * u128::from(self.0);
        u64::try_from(v.div_ceil(100)).unwrap_or(u64::MAX)
    }
}

impl HashTag {
    /// Its name in the config.
    pub fn name(self) -> &'static str {
        match self {
            Self::Scope => "scope",
            Self::Identity => "identity",
            Self::IdentityOperation => "identity_operation",
        }
    }
}

impl<'de> Deserialize<'de> for HashTag {
    /// By hand, so a wrong value is answered with the choices.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "scope" => Ok(Self::Scope),
            "identity" => Ok(Self::Identity),
            "identity_operation" => Ok(Self::IdentityOperation),
            _ => Err(serde::de::Error::custom(format!(
                "must be scope, identity or identity_operation, not {text:?}"
            ))),
        }
    }
}

/// What a bucket is kept per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Per {
    /// One bucket for the whole scope.
    Scope,
    /// One per identity.
    Identity,
    /// One per operation.
    Operation,
    /// One per identity and operation pair.
    IdentityOperation,
}

/// Validates one scope at `at` (such as `scopes[2]`), pushing
/// `path: problem` entries. Uniqueness across scopes is the caller's.
pub(crate) fn validate_scope(problems: &mut Vec<String>, at: &str, scope: &ScopeConfig) {
    check_name(problems, &format!("{at}.name"), &scope.name);
    validate_limits(problems, at, &scope.limits);
    if let Some(penalty) = &scope.penalty {
        penalty.validate(problems, at, &scope.limits);
        for (j, limit) in scope.limits.iter().enumerate() {
            if limit.max_delay.is_some() {
                problems.push(format!(
                    "{at}.limits[{j}].max_delay: not supported in a scope with a penalty box \
                     (a delayed request is neither a denial nor a strike yet)"
                ));
            }
        }
    }
    for (field, list) in [("allow", &scope.allow), ("deny", &scope.deny)] {
        for (k, glob) in list.iter().enumerate() {
            if glob.is_empty() {
                problems.push(format!("{at}.{field}[{k}]: must not be empty"));
            } else if let Err(e) = globset::Glob::new(glob) {
                problems.push(format!("{at}.{field}[{k}]: {}", e.kind()));
            }
        }
    }
    if let Some(keys) = &scope.descriptor_keys {
        for (field, key) in [
            ("identity", &keys.identity),
            ("operation", &keys.operation),
            ("priority", &keys.priority),
            ("lease_id", &keys.lease_id),
        ] {
            if let Some(key) = key {
                check_name(problems, &format!("{at}.descriptor_keys.{field}"), key);
            }
        }
        validate_lease_key(problems, at, keys, &scope.limits);
    }
}

/// Checks `descriptor_keys.lease_id` of a scope Envoy reaches (it has
/// `descriptor_keys`): required when the scope has a concurrency limit, for
/// an Envoy descriptor that reached the pool without a lease id would hold
/// a slot no descriptor could give back (until `max_lease`); and not an
/// entry that is also the identity, operation or priority.
fn validate_lease_key(
    problems: &mut Vec<String>,
    at: &str,
    keys: &DescriptorKeysConfig,
    limits: &[LimitConfig],
) {
    let Some(lease_key) = &keys.lease_id else {
        if let Some((j, pool)) = limits
            .iter()
            .enumerate()
            .find(|(_, l)| l.concurrency.is_some())
        {
            problems.push(format!(
                "{at}.descriptor_keys.lease_id: is required: Envoy descriptors reach the \
                 concurrency limit {:?} ({at}.limits[{j}]), and a lease taken without an id \
                 could never be released (it would hold its slot until max_lease); name the \
                 entry that carries the request id, such as `lease_id: lease_id`",
                pool.name
            ));
        }
        return;
    };
    for (field, key) in [
        ("identity", &keys.identity),
        ("operation", &keys.operation),
        ("priority", &keys.priority),
    ] {
        if key.as_ref() == Some(lease_key) {
            problems.push(format!(
                "{at}.descriptor_keys.lease_id: {lease_key:?} is also descriptor_keys.{field}; \
                 a lease id is unique per request, so it cannot also be the {field}"
            ));
        }
    }
}

/// Validates a scope's limits, pushing `path: problem` entries.
fn validate_limits(problems: &mut Vec<String>, at: &str, limits: &[LimitConfig]) {
    let mut rules = HashSet::new();
    for (j, limit) in limits.iter().enumerate() {
        let at = format!("{at}.limits[{j}]");
        check_name(problems, &format!("{at}.name"), &limit.name);
        if !rules.insert(limit.name.as_str()) {
            problems.push(format!("{at}.name: duplicate limit {:?}", limit.name));
        }
        match (limit.concurrency, limit.budget) {
            (Some(n), _) => validate_concurrency(problems, &at, limit, n),
            (None, Some(budget)) => validate_budget(problems, &at, limit, budget),
            (None, None) => validate_bucket(problems, &at, limit),
        }
        if limit.concurrency.is_none() {
            for (field, set) in [
                ("max_lease", limit.max_lease.is_some()),
                ("weight", limit.weight.is_some()),
            ] {
                if set {
                    problems.push(format!(
                        "{at}.{field}: only a concurrency limit has one (add `concurrency`)"
                    ));
                }
            }
        }
        if let Some(h) = limit.headroom
            && h.sheddable.0 < h.normal.0
        {
            problems.push(format!(
                "{at}.headroom.sheddable: must be at least headroom.normal ({}%): sheddable requests come last",
                h.normal.0
            ));
        }
        if let Some(delay) = limit.max_delay
            && limit.concurrency.is_none()
        {
            validate_max_delay(problems, &at, limit, delay);
        }
        if let Some(ops) = &limit.operations {
            if ops.is_empty() {
                problems.push(format!(
                    "{at}.operations: must not be empty (leave it out to match every operation)"
                ));
            }
            for (k, op) in ops.iter().enumerate() {
                if let Err(e) = globset::Glob::new(op) {
                    problems.push(format!("{at}.operations[{k}]: {}", e.kind()));
                }
            }
        }
        for key in limit.when.keys() {
            if key.is_empty() {
                problems.push(format!("{at}.when: attribute names must not be empty"));
            }
        }
    }
}

/// Checks a limit's `max_delay` (shaping): token buckets that enforce
/// only, 1ms to [`MAX_MAX_DELAY`], whole microseconds (Redis's tick).
fn validate_max_delay(problems: &mut Vec<String>, at: &str, limit: &LimitConfig, delay: Duration) {
    if limit.budget.is_some() {
        problems.push(format!(
            "{at}.max_delay: a budget has no rate to spread requests at; only a token bucket delays"
        ));
    } else if limit.shadow {
        problems.push(format!(
            "{at}.max_delay: a shadow limit never denies, so it never delays"
        ));
    } else if !(Duration::from_millis(1)..=MAX_MAX_DELAY).contains(&delay) {
        problems.push(format!("{at}.max_delay: must be between 1ms and 1h"));
    } else if !delay.subsec_nanos().is_multiple_of(1_000) {
        problems.push(format!(
            "{at}.max_delay: must be a whole number of microseconds"
        ));
    }
}

/// Checks a token bucket's fields.
fn validate_bucket(problems: &mut Vec<String>, at: &str, limit: &LimitConfig) {
    if limit.capacity == 0 {
        problems.push(format!(
            "{at}.capacity: must be > 0 (or give `budget` and `window` for a budget)"
        ));
    } else if limit.capacity > MAX_CAPACITY {
        problems.push(format!("{at}.capacity: must be at most {MAX_CAPACITY}"));
    }
    let period = limit.refill_period;
    if period < MIN_REFILL_PERIOD || period > MAX_REFILL_PERIOD {
        problems.push(format!("{at}.refill_period: must be between 1ms and 366d"));
    } else if !period.subsec_nanos().is_multiple_of(1_000) {
        problems.push(format!(
            "{at}.refill_period: must be a whole number of microseconds"
        ));
    }
    for (field, set) in [
        ("window", limit.window.is_some()),
        ("time_zone", limit.time_zone.is_some()),
    ] {
        if set {
            problems.push(format!(
                "{at}.{field}: only a budget has one (add `budget`)"
            ));
        }
    }
}

/// Checks a concurrency limit's fields, and names each field it cannot
/// have: a pool has no rate, no window, no delay, and is never a shadow.
fn validate_concurrency(problems: &mut Vec<String>, at: &str, limit: &LimitConfig, n: u64) {
    if n == 0 || n > MAX_CONCURRENCY {
        problems.push(format!(
            "{at}.concurrency: must be between 1 and {MAX_CONCURRENCY}"
        ));
    }
    if let Some(lease) = limit.max_lease {
        if !(MIN_MAX_LEASE..=MAX_MAX_LEASE).contains(&lease) {
            problems.push(format!("{at}.max_lease: must be between 1s and 24h"));
        } else if !lease.subsec_nanos().is_multiple_of(1_000) {
            problems.push(format!(
                "{at}.max_lease: must be a whole number of microseconds"
            ));
        }
    }
    if let Some(w) = limit.weight
        && (w == 0 || w > n)
    {
        problems.push(format!(
            "{at}.weight: must be between 1 and concurrency ({n})"
        ));
    }
    for (field, set) in [
        ("capacity", limit.capacity != 0),
        ("refill_period", !limit.refill_period.is_zero()),
        ("budget", limit.budget.is_some()),
        ("window", limit.window.is_some()),
        ("time_zone", limit.time_zone.is_some()),
        ("max_delay", limit.max_delay.is_some()),
        ("shadow", limit.shadow),
    ] {
        if set {
            problems.push(format!(
                "{at}.{field}: a concurrency limit counts leases held at once; it cannot have one"
            ));
        }
    }
}

/// Checks a budget's fields.
fn validate_budget(problems: &mut Vec<String>, at: &str, limit: &LimitConfig, budget: u64) {
    if budget == 0 || budget > MAX_BUDGET {
        problems.push(format!("{at}.budget: must be between 1 and {MAX_BUDGET}"));
    }
    if limit.capacity != 0 || !limit.refill_period.is_zero() {
        problems.push(format!(
            "{at}.budget: a budget has no capacity or refill_period (it resets at each window)"
        ));
    }
    let Some(window) = &limit.window else {
        problems.push(format!(
            "{at}.window: a budget needs one: day, week, month, or a duration such as 1h"
        ));
        return;
    };
    match window.as_str() {
        "day" | "week" | "month" => {
            if let Some(zone) = &limit.time_zone
                && jiff::tz::TimeZone::get(zone).is_err()
            {
                problems.push(format!("{at}.time_zone: unknown IANA time zone {zone:?}"));
            }
        }
        other => match humantime::parse_duration(other) {
            Err(_) => problems.push(format!(
                "{at}.window: {other:?} is not day, week, month or a duration such as 1h"
            )),
            Ok(d) if d < MIN_REFILL_PERIOD || d > MAX_REFILL_PERIOD => {
                problems.push(format!("{at}.window: must be between 1ms and 366d"));
            }
            Ok(d) if !d.subsec_nanos().is_multiple_of(1_000) => problems.push(format!(
                "{at}.window: must be a whole number of microseconds"
            )),
            Ok(_) if limit.time_zone.is_some() => problems.push(format!(
                "{at}.time_zone: a fixed window is aligned to the Unix epoch; only day, week and month follow a time zone"
            )),
            Ok(_) => {}
        },
    }
}

/// Checks a scope, rule or key name: not empty, not too long, printable.
pub(crate) fn check_name(problems: &mut Vec<String>, at: &str, name: &str) {
    if name.is_empty() {
        problems.push(format!("{at}: must not be empty"));
    } else if name.len() > MAX_NAME_LEN {
        problems.push(format!("{at}: must be at most {MAX_NAME_LEN} bytes"));
    } else if name.chars().any(char::is_control) {
        problems.push(format!("{at}: must not contain control characters"));
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn problems(limit: &str) -> String {
        let yaml = format!("scopes:\n  - name: s\n    limits:\n      - {limit}\n");
        match Config::from_yaml(&yaml) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_concurrency_limit_parses_with_its_defaults() {
        let yaml = "scopes:\n  - name: s\n    limits:\n      - {name: streams, per: identity, concurrency: 3}\n";
        let config = Config::from_yaml(yaml).unwrap();
        let limit = &config.scopes[0].limits[0];
        assert_eq!(limit.concurrency, Some(3));
        assert_eq!(limit.max_lease, None);
    }

    #[test]
    fn concurrency_bounds_are_refused_by_field_path() {
        let at = "scopes[0].limits[0]";
        for (limit, want) in [
            (
                "{name: c, per: scope, concurrency: 0}",
                "concurrency: must be between 1 and 10000",
            ),
            (
                "{name: c, per: scope, concurrency: 10001}",
                "concurrency: must be between",
            ),
            (
                "{name: c, per: scope, concurrency: 3, max_lease: 25h}",
                "max_lease: must be between 1s and 24h",
            ),
            (
                "{name: c, per: scope, concurrency: 3, max_lease: 10ms}",
                "max_lease: must be between",
            ),
            (
                "{name: c, per: scope, concurrency: 3, weight: 4}",
                "weight: must be between 1 and concurrency (3)",
            ),
        ] {
            let got = problems(limit);
            assert!(got.contains(&format!("{at}.{want}")), "{limit}: {got}");
        }
    }

    /// Envoy reaches a scope's pools through `descriptor_keys`; without a
    /// lease id entry an acquire could never be released.
    #[test]
    fn an_envoy_scope_with_a_pool_needs_a_lease_id_entry() {
        let yaml = |keys: &str| {
            format!(
                "scopes:\n  - name: s\n    descriptor_keys: {keys}\n    limits:\n      \
                 - {{name: r, per: identity, capacity: 5, refill_period: 1s}}\n      \
                 - {{name: streams, per: identity, concurrency: 3}}\n"
            )
        };
        let err = |keys: &str| match Config::from_yaml(&yaml(keys)) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        let got = err("{identity: user}");
        assert!(
            got.contains("scopes[0].descriptor_keys.lease_id: is required")
                && got.contains("\"streams\" (scopes[0].limits[1])"),
            "{got}"
        );
        let got = err("{identity: user, lease_id: user}");
        assert!(
            got.contains(
                "scopes[0].descriptor_keys.lease_id: \"user\" is also descriptor_keys.identity"
            ),
            "{got}"
        );
        assert_eq!(err("{identity: user, lease_id: lease_id}"), "");
        // A scope Envoy maps no descriptor onto (no descriptor_keys) keeps
        // its pools for tollgate.v1 callers.
        let plain =
            "scopes:\n  - name: s\n    limits:\n      - {name: c, per: scope, concurrency: 3}\n";
        assert!(Config::from_yaml(plain).is_ok());
    }

    #[test]
    fn a_concurrency_limit_names_each_field_it_cannot_have() {
        for field in [
            "capacity: 3",
            "refill_period: 1s",
            "budget: 5",
            "window: day",
            "max_delay: 1s",
            "shadow: true",
        ] {
            let got = problems(&format!("{{name: c, per: scope, concurrency: 3, {field}}}"));
            let name = field.split(':').next().unwrap();
            assert!(
                got.contains(&format!("scopes[0].limits[0].{name}: a concurrency limit")),
                "{field}: {got}"
            );
        }
        let got = problems("{name: c, per: scope, capacity: 3, refill_period: 1s, max_lease: 1m}");
        assert!(
            got.contains("scopes[0].limits[0].max_lease: only a concurrency limit"),
            "{got}"
        );
    }
}
