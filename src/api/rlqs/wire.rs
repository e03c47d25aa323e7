//! RLQS answers as Envoy reads them: blanket rules and token buckets, never
//! `requests_per_time_unit` (Envoy ignores it and lets traffic through).

use std::time::Duration;

use envoy_types::pb::envoy::r#type::v3::rate_limit_strategy::{BlanketRule, Strategy};
use envoy_types::pb::envoy::r#type::v3::{RateLimitStrategy, TokenBucket};
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::BucketAction;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action::{
    AbandonAction, BucketAction as Action, QuotaAssignmentAction,
};
use envoy_types::pb::envoy::service::rate_limit_quota::v3::{BucketId, RateLimitQuotaResponse};
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};

use crate::config::BlanketRule as ConfiguredRule;
use crate::limiter::shares;

/// How long an assignment lasts unless re-sent: three of Envoy's 5 s
/// reports, so one lost report does not let it lapse. With Tollgate gone,
/// an Envoy keeps its share this long, then applies its own fallback.
pub const ASSIGNMENT_TTL: Duration = Duration::from_secs(15);

/// What one bucket is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Assignment {
    /// Let everything through (no limit applies, or `rlqs.unmatched`).
    AllowAll,
    /// Deny everything (`rlqs.unmatched`) for the TTL.
    DenyAll,
    /// Deny everything for this long: a bucket of the group is empty.
    Deny(Duration),
    /// A share, in millitokens per second, with its burst in tokens.
    Share {
        /// The share.
        rate_milli: u64,
        /// Its burst.
        burst: u64,
    },
    /// Forget the bucket: it has been idle.
    Abandon,
}

impl From<ConfiguredRule> for Assignment {
    fn from(rule: ConfiguredRule) -> Self {
        match rule {
            ConfiguredRule::AllowAll => Self::AllowAll,
            ConfiguredRule::DenyAll => Self::DenyAll,
        }
    }
}

/// A share as an assignment.
pub(crate) fn assignment(rate_milli: u64, burst: u64) -> Assignment {
    Assignment::Share { rate_milli, burst }
}

/// One response holding `actions`.
pub(crate) fn response(actions: Vec<BucketAction>) -> RateLimitQuotaResponse {
    RateLimitQuotaResponse {
        bucket_action: actions,
    }
}

/// The action for `bucket_id`.
pub(crate) fn action(bucket_id: &BucketId, a: Assignment) -> BucketAction {
    let (strategy, ttl) = match a {
        Assignment::Abandon => {
            return BucketAction {
                bucket_id: Some(bucket_id.clone()),
                bucket_action: Some(Action::AbandonAction(AbandonAction {})),
            };
        }
        Assignment::AllowAll => (blanket(BlanketRule::AllowAll), ASSIGNMENT_TTL),
        Assignment::DenyAll => (blanket(BlanketRule::DenyAll), ASSIGNMENT_TTL),
        // Envoy reads the TTL in whole seconds: round up, so the denial
        // does not end before the bucket has a token again.
        Assignment::Deny(wait) => (
            blanket(BlanketRule::DenyAll),
            Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)),
        ),
        Assignment::Share { rate_milli, burst } => {
            (token_bucket(rate_milli, burst), ASSIGNMENT_TTL)
        }
    };
    BucketAction {
        bucket_id: Some(bucket_id.clone()),
        bucket_action: Some(Action::QuotaAssignmentAction(QuotaAssignmentAction {
            assignment_time_to_live: Some(seconds(ttl.as_secs())),
            rate_limit_strategy: Some(strategy),
        })),
    }
}

fn blanket(rule: BlanketRule) -> RateLimitStrategy {
    RateLimitStrategy {
        strategy: Some(Strategy::BlanketRule(rule.into())),
    }
}

/// A token bucket never faster than the share, holding at least one token
/// (Envoy's bucket starts full, and an empty one denies everything); a
/// share too small for one token a minute denies for the TTL.
fn token_bucket(rate_milli: u64, burst: u64) -> RateLimitStrategy {
    let Some((per_fill, secs)) = shares::token_bucket_of(rate_milli) else {
        return blanket(BlanketRule::DenyAll);
    };
    let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    let mut interval = seconds(secs);
    // Envoy compares only the nanos of two fill intervals to decide whether
    // an assignment changed, and reads the interval in whole seconds. A
    // few nanoseconds equal to the seconds make every interval compare
    // unequal to every other without changing the rate Envoy computes.
    interval.nanos = i32::try_from(secs).unwrap_or(0);
    RateLimitStrategy {
        strategy: Some(Strategy::TokenBucket(TokenBucket {
            max_tokens: clamp(burst.max(1)),
            tokens_per_fill: Some(UInt32Value {
                value: clamp(per_fill),
            }),
            fill_interval: Some(interval),
        })),
    }
}

fn seconds(secs: u64) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(secs).unwrap_or(i64::MAX),
        nanos: 0,
    }
}
