//! `rlqs`: Envoy's Rate Limit Quota Service (quota streaming), as plain data.
//!
//! Which Envoy domains Tollgate hands quota for, how a `BucketId` (a map of
//! string to string built by Envoy's `bucket_matchers`) names an identity
//! and an operation, what a bucket nothing maps gets, and the bounds on what
//! one stream can make Tollgate hold. See docs/rlqs.md.

use serde::Deserialize;

/// Default `rlqs.max_buckets_per_stream`.
pub const DEFAULT_MAX_BUCKETS_PER_STREAM: usize = 1024;
/// Default `rlqs.max_reports_per_message`.
pub const DEFAULT_MAX_REPORTS_PER_MESSAGE: usize = 1024;
/// Default `rlqs.max_streams_per_connection`. Envoy opens one stream per
/// domain on a connection; a handful covers a gateway with several domains.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: usize = 8;
/// The largest value any `rlqs.max_*` bound may be set to.
pub const MAX_RLQS_BOUND: usize = 100_000;

/// The `rlqs` section. Absent: the service still answers, and every bucket
/// gets the `unmatched` blanket rule (ALLOW_ALL by default).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlqsConfig {
    /// The Envoy domains Tollgate hands shares for; each is a scope.
    #[serde(default)]
    pub domains: Vec<RlqsDomainConfig>,
    /// What a bucket of an unknown domain, or a `BucketId` without the
    /// identity key, is told: `allow_all` or `deny_all`.
    #[serde(default)]
    pub unmatched: BlanketRule,
    /// Buckets one stream may hold. A bucket past it is answered with the
    /// `unmatched` rule and holds nothing.
    #[serde(default = "default_buckets")]
    pub max_buckets_per_stream: usize,
    /// Bucket reports one message may carry; more ends the stream with
    /// `INVALID_ARGUMENT`.
    #[serde(default = "default_reports")]
    pub max_reports_per_message: usize,
    /// Quota streams one connection may hold open at once; one more is
    /// refused with `RESOURCE_EXHAUSTED`.
    #[serde(default = "default_streams")]
    pub max_streams_per_connection: usize,
}

impl Default for RlqsConfig {
    fn default() -> Self {
        Self {
            domains: Vec::new(),
            unmatched: BlanketRule::default(),
            max_buckets_per_stream: DEFAULT_MAX_BUCKETS_PER_STREAM,
            max_reports_per_message: DEFAULT_MAX_REPORTS_PER_MESSAGE,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
        }
    }
}

fn default_buckets() -> usize {
    DEFAULT_MAX_BUCKETS_PER_STREAM
}

fn default_reports() -> usize {
    DEFAULT_MAX_REPORTS_PER_MESSAGE
}

fn default_streams() -> usize {
    DEFAULT_MAX_STREAMS_PER_CONNECTION
}

/// One domain: which `BucketId` keys are the identity and the operation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlqsDomainConfig {
    /// Envoy's `domain`, which is the scope whose limits are shared.
    pub domain: String,
    /// The `BucketId` key whose value is the identity. A bucket without it
    /// is unmatched.
    pub identity: String,
    /// The `BucketId` key whose value is the operation; absent, or missing
    /// from a bucket: the empty operation.
    #[serde(default)]
    pub operation: Option<String>,
}

/// A blanket rule, as Envoy's `RateLimitStrategy.blanket_rule`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlanketRule {
    /// Let every request of the bucket through.
    #[default]
    AllowAll,
    /// Deny every request of the bucket.
    DenyAll,
}

impl RlqsConfig {
    /// Adds `rlqs.*` problems to `problems`; `scopes` are the names of the
    /// configured scopes, which every domain must be.
    pub(super) fn validate(&self, problems: &mut Vec<String>, scopes: &[&str]) {
        for (name, value) in [
            ("max_buckets_per_stream", self.max_buckets_per_stream),
            ("max_reports_per_message", self.max_reports_per_message),
            (
                "max_streams_per_connection",
                self.max_streams_per_connection,
            ),
        ] {
            if !(1..=MAX_RLQS_BOUND).contains(&value) {
                problems.push(format!(
                    "rlqs.{name}: must be 1 to {MAX_RLQS_BOUND}, not {value}"
                ));
            }
        }
        for (i, d) in self.domains.iter().enumerate() {
            let at = format!("rlqs.domains[{i}]");
            if !scopes.contains(&d.domain.as_str()) {
                problems.push(format!(
                    "{at}.domain: {:?} names no configured scope",
                    d.domain
                ));
            }
            if self.domains[..i].iter().any(|e| e.domain == d.domain) {
                problems.push(format!("{at}.domain: duplicate domain {:?}", d.domain));
            }
            if d.identity.is_empty() {
                problems.push(format!("{at}.identity: must not be empty"));
            }
            if d.operation.as_deref() == Some("") {
                problems.push(format!("{at}.operation: must not be empty"));
            }
        }
    }

    /// The mapping for `domain`, if configured.
    pub fn domain(&self, domain: &str) -> Option<&RlqsDomainConfig> {
        self.domains.iter().find(|d| d.domain == domain)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn a_domain_that_names_no_scope_and_a_zero_bound_are_refused_by_path() {
        let e = Config::from_yaml(
            "rlqs:\n  max_buckets_per_stream: 0\n  domains:\n    - { domain: nowhere, identity: tenant }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("rlqs.max_buckets_per_stream: must be 1 to 100000, not 0"),
            "{e}"
        );
        assert!(
            e.contains("rlqs.domains[0].domain: \"nowhere\" names no configured scope"),
            "{e}"
        );
    }
}
