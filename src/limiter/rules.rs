//! Compiled rules: which buckets apply to a request.

use std::sync::Arc;

use super::Request;
use super::descriptors::{DescriptorKeys, DescriptorTree};
use super::limit::{Limit, LimitKind};
use crate::config::{FailureMode, HashTag, Per, UnknownScope};
use crate::store::{BucketCharge, BucketKey};

/// The live rule set: every scope, compiled. Swapped whole on reload.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Keys come from the config only; callers look up but never insert, so
    /// a fast non-keyed hash cannot be turned against it.
    pub(super) scopes: hashbrown::HashMap<Arc<str>, ScopeRules>,
    /// What happens to requests for scopes not listed.
    pub unknown_scope: UnknownScope,
    /// The failure mode of scopes that set none, and of unknown scopes.
    pub failure_mode: FailureMode,
    /// `envoy_shadow_mode`: every Envoy descriptor's limits are shadow.
    pub envoy_shadow_mode: bool,
    /// `envoy_quota_mode`: every Envoy descriptor is a quota descriptor.
    pub envoy_quota_mode: bool,
}

/// One scope's limits.
#[derive(Debug, Clone)]
pub struct ScopeRules {
    /// The scope's name.
    pub name: Arc<str>,
    /// What decisions in this scope do when the store cannot answer.
    pub failure_mode: FailureMode,
    /// In config order; every one that matches applies.
    pub limits: Vec<Limit>,
    /// Envoy descriptor rules (scopes from envoyproxy/ratelimit YAML): the
    /// one limit a descriptor's entries lead to applies as well.
    pub descriptor_tree: DescriptorTree,
    /// Which Envoy descriptor entries are the identity and the operation.
    pub descriptor_keys: Option<DescriptorKeys>,
    /// Which parts of its buckets' keys choose their Redis hash slot.
    pub hash_tag: HashTag,
    /// The scope's penalty box, if it has one.
    pub penalty: Option<super::penalty::ScopePenalty>,
    /// Identities the penalty box spares, and identities always denied.
    pub lists: super::penalty::IdentityLists,
    /// Its concurrency limits, in config order; rate decisions never see
    /// them (see [`super::lease`]).
    pub pools: Vec<super::Pool>,
}

impl Rules {
    /// The rules of `scope`, if it is configured.
    pub fn scope(&self, scope: &str) -> Option<&ScopeRules> {
        self.scopes.get(scope)
    }

    /// Every scope, in no particular order.
    pub fn scopes(&self) -> impl Iterator<Item = &ScopeRules> {
        self.scopes.values()
    }

    /// The hash tag of `scope`'s keys: the default for a scope a reload
    /// removed.
    pub fn hash_tag_of(&self, scope: &str) -> HashTag {
        self.scope(scope).map_or(HashTag::default(), |s| s.hash_tag)
    }

    /// The failure mode that governs `scope`.
    pub fn failure_mode_of(&self, scope: &str) -> FailureMode {
        self.scope(scope)
            .map_or(self.failure_mode, |s| s.failure_mode)
    }
}

impl ScopeRules {
    /// The buckets `req` draws on, in limit order, each charged `req.cost`.
    pub fn buckets<'r, 'q>(&'r self, req: &Request<'q>, out: &mut impl Extend<Planned<'r, 'q>>)
    where
        'r: 'q,
    {
        let matching = self.limits.iter().filter(|l| l.matches(req));
        // An unlimited rule, or one that admits nothing, has no bucket; the
        // joint planner reads them from the tree itself.
        let by_descriptor = self
            .descriptor_tree
            .find(req.entries)
            .filter(|l| l.kind == LimitKind::Bucket);
        for limit in matching.chain(by_descriptor) {
            let (identity, operation) = match limit.per {
                Per::Scope => (None, None),
                Per::Identity => (Some(req.identity), None),
                Per::Operation => (None, Some(req.operation)),
                Per::IdentityOperation => (Some(req.identity), Some(req.operation)),
            };
            out.extend(std::iter::once(Planned {
                limit,
                charge: BucketCharge {
                    key: BucketKey {
                        scope: &self.name,
                        rule: &limit.key_name,
                        identity,
                        operation,
                        hash_tag: self.hash_tag,
                    },
                    shape: limit.shape,
                    cost: req.cost,
                    shadow: limit.shadow,
                    reserve: limit.reserve_for(req.priority),
                    window: limit.window.as_ref(),
                    max_delay: limit.max_delay.min(req.max_wait.unwrap_or_default()),
                },
            }));
        }
    }
}

/// A bucket chosen for a request, with the limit it came from.
#[derive(Debug, Clone, Copy)]
pub struct Planned<'r, 'q> {
    /// The limit.
    pub limit: &'r Limit,
    /// What to ask of the store.
    pub charge: BucketCharge<'q>,
}
