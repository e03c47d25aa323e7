//! The one compiler: validated config data → [`Rules`].
//!
//! Scopes from Tollgate's own config and domains from envoyproxy/ratelimit
//! YAML both become [`ScopeRules`] here, and nowhere else. Validation is the
//! config's job; the compiler checks again only what would otherwise panic
//! or build a wrong rule (a config assembled in code skips the loader).

use std::sync::Arc;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::descriptors::{DescriptorKeys, DescriptorNode, DescriptorTree, ValueMatch};
use super::lease::Pool;
use super::limit::{Limit, LimitKind};
use super::penalty::{IdentityLists, ScopePenalty};
use super::rules::{Rules, ScopeRules};
use crate::bucket::Shape;
use crate::config::{
    Config, ConfigError, DEFAULT_MAX_LEASE, EnvoyDescriptor, EnvoyDomain, EnvoyValue, FailureMode,
    HashTag, LimitConfig,
};
use crate::window::Window;

impl Rules {
    /// Compiles a config: its scopes, and its envoyproxy/ratelimit domains
    /// (read when the config was loaded). Refuses a config that does not
    /// validate, naming every problem.
    pub fn compile(config: &Config) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut scopes =
            hashbrown::HashMap::with_capacity(config.scopes.len() + config.envoy_domains.len());
        for s in &config.scopes {
            let (concurrency, rates): (Vec<_>, Vec<_>) =
                s.limits.iter().partition(|l| l.concurrency.is_some());
            let limits = rates
                .into_iter()
                .map(compile_limit)
                .collect::<Result<Vec<_>, _>>()?;
            let pools = concurrency
                .into_iter()
                .map(compile_pool)
                .collect::<Result<Vec<_>, _>>()?;
            let scope = ScopeRules {
                name: s.name.as_str().into(),
                failure_mode: s.failure_mode.unwrap_or(config.failure_mode),
                limits,
                descriptor_tree: DescriptorTree::default(),
                descriptor_keys: s.descriptor_keys.clone().map(|k| DescriptorKeys {
                    identity: k.identity,
                    operation: k.operation,
                    priority: k.priority,
                    lease_id: k.lease_id,
                }),
                hash_tag: s.hash_tag.unwrap_or(config.hash_tag),
                penalty: s.penalty.as_ref().map(ScopePenalty::compile),
                lists: IdentityLists {
                    allow: identity_globs(&s.allow, "allow")?,
                    deny: identity_globs(&s.deny, "deny")?,
                },
                pools,
            };
            scopes.insert(scope.name.clone(), scope);
        }
        for domain in &config.envoy_domains {
            let mut scope = compile_domain(domain, config.failure_mode);
            scope.hash_tag = config.hash_tag;
            scopes.insert(scope.name.clone(), scope);
        }
        Ok(Self {
            scopes,
            unknown_scope: config.unknown_scope,
            failure_mode: config.failure_mode,
            envoy_shadow_mode: config.envoy_shadow_mode,
            envoy_quota_mode: config.envoy_quota_mode,
        })
    }
}

/// A concurrency limit: a [`Limit`] for matching (its shape's capacity is
/// the concurrency, so headroom shares are of it), and the pool's bounds.
fn compile_pool(config: &LimitConfig) -> Result<Pool, ConfigError> {
    let concurrency = config.concurrency.unwrap_or(1);
    let mut plain = config.clone();
    plain.concurrency = None;
    plain.capacity = concurrency;
    let limit = compile_limit(&plain)?;
    Ok(Pool {
        limit,
        concurrency,
        max_lease: config.max_lease.unwrap_or(DEFAULT_MAX_LEASE),
        weight: config.weight.unwrap_or(1),
    })
}

fn compile_limit(config: &LimitConfig) -> Result<Limit, ConfigError> {
    let operations =
        match &config.operations {
            None => None,
            Some(globs) => Some(glob_set(globs).map_err(|e| {
                ConfigError::one(format!("limit {:?}: operations: {e}", config.name))
            })?),
        };
    let (shape, window) = match (config.budget, &config.window) {
        (Some(budget), Some(window)) => {
            let window = Window::parse(window, config.time_zone.as_deref())
                .map_err(|e| ConfigError::one(format!("limit {:?}: window: {e}", config.name)))?;
            let shape = Shape {
                capacity: budget,
                period: nanos(window.nominal()),
            };
            (shape, Some(window))
        }
        _ => (
            Shape {
                capacity: config.capacity,
                period: nanos(config.refill_period),
            },
            None,
        ),
    };
    let headroom = config.headroom.unwrap_or_default();
    let name: Arc<str> = config.name.as_str().into();
    Ok(Limit {
        key_name: match &window {
            Some(w) => format!("{}~{}", config.name, w.tag()).into(),
            None => name.clone(),
        },
        name,
        per: config.per,
        operations,
        when: config
            .when
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        shape,
        window,
        reserve: [
            0,
            headroom.normal.of(shape.capacity),
            headroom.sheddable.of(shape.capacity),
        ],
        shadow: config.shadow,
        replaces: Vec::new(),
        replaceable: true,
        kind: LimitKind::Bucket,
        quota: false,
        metadata: None,
        max_delay: config.max_delay.unwrap_or_default(),
    })
}

fn glob_set(globs: &[String]) -> Result<GlobSet, globset::Error> {
    let mut set = GlobSetBuilder::new();
    for g in globs {
        // `*` crosses `/`: operations such as `tools/call:*` are not paths.
        set.add(GlobBuilder::new(g).literal_separator(false).build()?);
    }
    set.build()
}

fn compile_domain(domain: &EnvoyDomain, failure_mode: FailureMode) -> ScopeRules {
    ScopeRules {
        name: domain.name.as_str().into(),
        failure_mode,
        limits: Vec::new(),
        descriptor_tree: DescriptorTree {
            roots: domain.descriptors.iter().map(compile_descriptor).collect(),
        },
        descriptor_keys: None,
        hash_tag: HashTag::default(),
        penalty: None,
        lists: IdentityLists::default(),
        pools: Vec::new(),
    }
}

/// An allow or deny list, `None` when empty.
fn identity_globs(globs: &[String], field: &str) -> Result<Option<GlobSet>, ConfigError> {
    if globs.is_empty() {
        return Ok(None);
    }
    glob_set(globs)
        .map(Some)
        .map_err(|e| ConfigError::one(format!("{field}: {e}")))
}

fn compile_descriptor(d: &EnvoyDescriptor) -> DescriptorNode {
    let limit = d.rate_limit.as_ref().map(|r| {
        let shape = Shape {
            capacity: r.requests_per_unit,
            period: nanos(r.unit),
        };
        let mut limit = Limit::for_descriptor(&r.name, shape, d.shadow);
        limit.replaces = r.replaces.iter().map(|n| Arc::from(n.as_str())).collect();
        limit.replaceable = r.named;
        limit.kind = if r.unlimited {
            LimitKind::Unlimited
        } else if r.requests_per_unit == 0 {
            LimitKind::Nothing
        } else {
            LimitKind::Bucket
        };
        limit.quota = d.quota;
        limit.metadata = d.metadata.clone().map(Arc::new);
        limit
    });
    DescriptorNode {
        key: d.key.clone(),
        value: match &d.value {
            EnvoyValue::Any => ValueMatch::Any,
            EnvoyValue::Exact(v) => ValueMatch::Exact(v.clone()),
            EnvoyValue::Pattern(p) => ValueMatch::wildcard(p),
        },
        share: d.share_threshold,
        limit,
        children: d.children.iter().map(compile_descriptor).collect(),
    }
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_become_refill_periods_and_names_default_to_the_path() {
        let domain = crate::config::envoy::parse(
            "domain: d\ndescriptors:\n  - key: user\n    value: vip*\n    rate_limit: {unit: MINUTE, requests_per_unit: 60}\n    descriptors:\n      - key: path\n        rate_limit: {unit: day, requests_per_unit: 5, name: daily}\n",
            "f.yaml",
        )
        .unwrap();
        let scope = compile_domain(&domain, FailureMode::Open);
        let minute = scope.descriptor_tree.find(&[("user", "vip-1")]).unwrap();
        assert_eq!(&*minute.name, "user_vip*");
        assert_eq!(minute.shape.capacity, 60);
        assert_eq!(minute.shape.period, 60_000_000_000);
        let daily = scope
            .descriptor_tree
            .find(&[("user", "vip-1"), ("path", "/x")])
            .unwrap();
        assert_eq!(&*daily.name, "daily");
        assert_eq!(daily.shape.period, 86_400_000_000_000);
        assert!(scope.descriptor_tree.find(&[("user", "bob")]).is_none());
    }

    #[test]
    fn a_scope_without_a_hash_tag_takes_the_top_level_one() {
        let mut config = Config::from_yaml(
            "hash_tag: identity\nscopes:\n  - name: a\n  - name: b\n    hash_tag: scope\n",
        )
        .unwrap();
        // An envoyproxy/ratelimit domain has no scope entry: it takes it too.
        let domain = crate::config::envoy::parse("domain: d\ndescriptors: []\n", "d.yaml");
        config.envoy_domains.push(domain.unwrap());
        let rules = Rules::compile(&config).unwrap();
        assert_eq!(rules.hash_tag_of("a"), HashTag::Identity);
        assert_eq!(rules.hash_tag_of("b"), HashTag::Scope);
        assert_eq!(rules.hash_tag_of("d"), HashTag::Identity);
        let config = Config::from_yaml("scopes:\n  - name: a\n").unwrap();
        assert_eq!(
            Rules::compile(&config).unwrap().hash_tag_of("a"),
            HashTag::Scope
        );
    }

    #[test]
    fn a_config_that_does_not_validate_is_not_compiled() {
        let mut config = Config::from_yaml("scopes:\n  - name: a\n").unwrap();
        config.scopes[0].name.clear();
        let err = Rules::compile(&config).unwrap_err().to_string();
        assert!(err.contains("scopes[0].name: must not be empty"), "{err}");
    }
}
