//! Scopes and their limits: what callers are limited by.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::Deserialize;

/// The largest capacity a bucket may have. The Redis script keeps exact
/// integers in Lua's doubles (53 bits); with `capacity² < 2^53` every
/// intermediate value stays exact.
pub const MAX_CAPACITY: u64 = 50_000_000;
/// The shortest refill period.
pub const MIN_REFILL_PERIOD: Duration = Duration::from_millis(1);
/// The longest refill period.
pub const MAX_REFILL_PERIOD: Duration = Duration::from_secs(366 * 24 * 3600);
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
    /// The burst: the most tokens the bucket holds.
    pub capacity: u64,
    /// Time for an empty bucket to refill; the rate is capacity/refill_period.
    #[serde(with = "humantime_serde")]
    pub refill_period: Duration,
    /// Judge and count, but never deny because of this limit.
    #[serde(default)]
    pub shadow: bool,
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
    if let Some(keys) = &scope.descriptor_keys {
        for (field, key) in [("identity", &keys.identity), ("operation", &keys.operation)] {
            if let Some(key) = key {
                check_name(problems, &format!("{at}.descriptor_keys.{field}"), key);
            }
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
        if limit.capacity == 0 {
            problems.push(format!("{at}.capacity: must be > 0"));
        } else if limit.capacity > MAX_CAPACITY {
            problems.push(format!("{at}.capacity: must be at most {MAX_CAPACITY}"));
        }
        let period = limit.refill_period;
        if period < MIN_REFILL_PERIOD || period > MAX_REFILL_PERIOD {
            problems.push(format!("{at}.refill_period: must be between 1ms and 366d"));
        } else if period.subsec_nanos() % 1_000 != 0 {
            problems.push(format!(
                "{at}.refill_period: must be a whole number of microseconds"
            ));
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
