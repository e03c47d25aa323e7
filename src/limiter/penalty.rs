//! A scope's penalty box, compiled: which caller a record is about, which
//! limits' denials are strikes, and the part of a charge that carries it
//! to the store (which keeps the records; see `store::penalty`).

use std::sync::Arc;

use globset::GlobSet;
use smallvec::SmallVec;

use super::Request;
use super::rules::Planned;
use crate::config::{PenaltyConfig, PenaltyOn, PenaltyPer};
use crate::store::{Penalty, PenaltyKey, PenaltyRule};

/// A scope's static identity lists, as globs.
#[derive(Debug, Clone, Default)]
pub struct IdentityLists {
    /// Never banned by the penalty box (their limits still apply).
    pub allow: Option<GlobSet>,
    /// Always denied, without a store call.
    pub deny: Option<GlobSet>,
}

impl IdentityLists {
    /// True when `identity` is on the allow list.
    pub fn allows(&self, identity: &str) -> bool {
        self.allow.as_ref().is_some_and(|g| g.is_match(identity))
    }

    /// True when `identity` is on the deny list.
    pub fn denies(&self, identity: &str) -> bool {
        self.deny.as_ref().is_some_and(|g| g.is_match(identity))
    }
}

/// One scope's penalty box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopePenalty {
    /// Strikes, windows and bans, in nanoseconds.
    pub rule: PenaltyRule,
    /// Whether a record is per identity or per identity and operation.
    pub per: PenaltyPer,
    /// The limits whose denials strike; `None`: every limit.
    pub on: Option<Vec<Arc<str>>>,
}

impl ScopePenalty {
    /// Compiles a validated `penalty:` section.
    pub fn compile(config: &PenaltyConfig) -> Self {
        let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Self {
            rule: PenaltyRule {
                strikes: u64::from(config.strikes.max(1)),
                within_ns: ns(config.within),
                ban_ns: ns(config.ban),
                factor: u64::from(config.factor.max(1)),
                max_ban_ns: ns(config.max_ban.max(config.ban)),
                forgive_ns: ns(config.forgive_after),
            },
            per: config.per,
            on: match &config.on {
                PenaltyOn::All => None,
                PenaltyOn::Limits(names) => Some(names.iter().map(|n| n.as_str().into()).collect()),
            },
        }
    }

    /// True when a denial by the limit named `name` strikes.
    pub(crate) fn strikes_on(&self, name: &str) -> bool {
        self.on
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| &**n == name))
    }

    /// The penalty part of the charge for `req` in `scope` drawing on
    /// `buckets`. The anonymous caller (an empty identity) is never boxed:
    /// it is every caller that gave no identity, and one ban would shut
    /// them all out.
    pub(crate) fn part<'q>(
        &self,
        scope: &'q str,
        req: &Request<'q>,
        buckets: &[Planned<'_, 'q>],
    ) -> Option<Penalty<'q>> {
        if req.identity.is_empty() {
            return None;
        }
        let strikes_from: SmallVec<[bool; 4]> = buckets
            .iter()
            .map(|p| {
                !p.charge.shadow
                    && self
                        .on
                        .as_ref()
                        .is_none_or(|names| names.contains(&p.limit.name))
            })
            .collect();
        Some(Penalty {
            key: PenaltyKey {
                scope,
                identity: req.identity,
                operation: match self.per {
                    PenaltyPer::Identity => None,
                    PenaltyPer::IdentityOperation => Some(req.operation),
                },
            },
            rule: self.rule,
            strikes_from,
            forced: req.strike,
        })
    }
}
