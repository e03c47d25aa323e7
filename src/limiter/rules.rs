//! Compiled rules: which buckets apply to a request.

use std::sync::Arc;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::Request;
use super::bucket::Shape;
use super::descriptors::{DescriptorKeys, DescriptorTree};
use crate::config::{Config, ConfigError, FailureMode, LimitConfig, Per, UnknownScope};
use crate::store::{BucketCharge, BucketKey};

/// The live rule set: every scope, compiled. Swapped whole on reload.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Keys come from the config only; callers look up but never insert, so
    /// a fast non-keyed hash cannot be turned against it.
    scopes: hashbrown::HashMap<Arc<str>, ScopeRules>,
    /// What happens to requests for scopes not listed.
    pub unknown_scope: UnknownScope,
    /// The failure mode of scopes that set none, and of unknown scopes.
    pub failure_mode: FailureMode,
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
}

/// One limit, ready to match.
#[derive(Debug, Clone)]
pub struct Limit {
    /// The rule name reported in responses.
    pub name: Arc<str>,
    /// What one bucket is kept per.
    pub per: Per,
    /// Matches the operation; `None` matches every operation.
    pub operations: Option<GlobSet>,
    /// Attributes the request must carry, all of them.
    pub when: Vec<(String, String)>,
    /// Capacity and refill period, in nanoseconds.
    pub shape: Shape,
    /// Never causes a denial.
    pub shadow: bool,
    /// Rules of the same scope that this one stands in for: when a request
    /// decided together draws on both, those are dropped (envoyproxy's
    /// `replaces`).
    pub replaces: Vec<Arc<str>>,
}

impl Rules {
    /// Compiles a validated config.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let mut scopes = Vec::with_capacity(config.scopes.len());
        for s in &config.scopes {
            let mode = s.failure_mode.unwrap_or(config.failure_mode);
            let mut scope = ScopeRules::compile(&s.name, mode, &s.limits)?;
            scope.descriptor_keys = s.descriptor_keys.clone().map(|k| DescriptorKeys {
                identity: k.identity,
                operation: k.operation,
            });
            scopes.push(scope);
        }
        Self::new(scopes, config.unknown_scope, config.failure_mode)
    }

    /// Builds a rule set; scope names must be unique.
    pub fn new(
        scopes: Vec<ScopeRules>,
        unknown_scope: UnknownScope,
        failure_mode: FailureMode,
    ) -> Result<Self, ConfigError> {
        let mut map = hashbrown::HashMap::with_capacity(scopes.len());
        for scope in scopes {
            let name = scope.name.clone();
            if map.insert(name.clone(), scope).is_some() {
                return Err(ConfigError {
                    problems: vec![format!("scopes: scope {name:?} is defined twice")],
                });
            }
        }
        Ok(Self {
            scopes: map,
            unknown_scope,
            failure_mode,
        })
    }

    /// Adds scopes compiled elsewhere (envoyproxy/ratelimit YAML); their
    /// names must be new.
    pub fn add_scopes(&mut self, scopes: Vec<ScopeRules>) -> Result<(), ConfigError> {
        for scope in scopes {
            let name = scope.name.clone();
            if self.scopes.insert(name.clone(), scope).is_some() {
                return Err(ConfigError {
                    problems: vec![format!("scope {name:?} is defined twice")],
                });
            }
        }
        Ok(())
    }

    /// The rules of `scope`, if it is configured.
    pub fn scope(&self, scope: &str) -> Option<&ScopeRules> {
        self.scopes.get(scope)
    }

    /// Every scope, in no particular order.
    pub fn scopes(&self) -> impl Iterator<Item = &ScopeRules> {
        self.scopes.values()
    }

    /// The failure mode that governs `scope`.
    pub fn failure_mode_of(&self, scope: &str) -> FailureMode {
        self.scope(scope)
            .map_or(self.failure_mode, |s| s.failure_mode)
    }
}

impl ScopeRules {
    /// Compiles one scope's limits (validated by `config`).
    pub fn compile(
        name: &str,
        failure_mode: FailureMode,
        limits: &[LimitConfig],
    ) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        crate::config::validate_limits(&mut problems, &format!("scope {name:?}"), limits);
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        let limits = limits
            .iter()
            .map(Limit::compile)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name: name.into(),
            failure_mode,
            limits,
            descriptor_tree: DescriptorTree::default(),
            descriptor_keys: None,
        })
    }

    /// The buckets `req` draws on, in limit order, each charged `req.cost`.
    pub fn buckets<'r, 'q>(&'r self, req: &Request<'q>, out: &mut impl Extend<Planned<'r, 'q>>)
    where
        'r: 'q,
    {
        let matching = self.limits.iter().filter(|l| l.matches(req));
        let by_descriptor = self.descriptor_tree.find(req.entries);
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
                        rule: &limit.name,
                        identity,
                        operation,
                    },
                    shape: limit.shape,
                    cost: req.cost,
                    shadow: limit.shadow,
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

impl Limit {
    fn compile(config: &LimitConfig) -> Result<Self, ConfigError> {
        let operations = match &config.operations {
            None => None,
            Some(globs) => {
                let mut set = GlobSetBuilder::new();
                for g in globs {
                    let glob = GlobBuilder::new(g)
                        .literal_separator(false)
                        .build()
                        .map_err(|e| ConfigError {
                            problems: vec![format!("limit {:?}: operations: {e}", config.name)],
                        })?;
                    set.add(glob);
                }
                Some(set.build().map_err(|e| ConfigError {
                    problems: vec![format!("limit {:?}: operations: {e}", config.name)],
                })?)
            }
        };
        let period = u64::try_from(config.refill_period.as_nanos()).unwrap_or(u64::MAX);
        Ok(Self {
            name: config.name.as_str().into(),
            per: config.per,
            operations,
            when: config
                .when
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            shape: Shape {
                capacity: config.capacity,
                period,
            },
            shadow: config.shadow,
            replaces: Vec::new(),
        })
    }

    /// True when this limit applies to `req`.
    pub fn matches(&self, req: &Request<'_>) -> bool {
        if let Some(ops) = &self.operations
            && !ops.is_match(req.operation)
        {
            return false;
        }
        self.when
            .iter()
            .all(|(k, v)| req.attributes.get(k).is_some_and(|have| have == v))
    }
}
