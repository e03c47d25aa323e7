//! Typed configuration: parsed once, validated whole, before any port is bound.
//!
//! The source is a YAML file, overlaid with environment variables of the form
//! `TOLLGATE_<PATH>` where nested keys are joined by `__`, for example
//! `TOLLGATE_LISTEN=0.0.0.0:50051` or `TOLLGATE_STORE__KIND=memory` (only
//! variables whose first part names a top-level key: see [`is_override`]). The
//! environment is passed in, never read here, so tests stay hermetic.
//!
//! Every error names the field it is about, as a path such as
//! `scopes[0].limits[2].capacity`.
//!
//! This module is plain data and its validation: it imports nothing else
//! from the crate. The limiter compiles it into rules; the stores read their
//! own settings from it.
//!
//! - [`scopes`]: scopes and their limits;
//! - [`store`]: the embedded store's and Redis's settings;
//! - [`envoy`]: envoyproxy/ratelimit YAML files, read as extra scopes;
//! - [`penalty`]: a scope's penalty box (strikes, escalating bans);
//! - [`analytics`]: heavy hitters, and reload on file change.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub mod analytics;
pub mod envoy;
pub mod penalty;
pub mod reservations;
pub mod rlqs;
pub mod scopes;
pub mod security;
pub mod store;

pub use analytics::{AnalyticsConfig, ReloadConfig};
pub use envoy::{EnvoyDescriptor, EnvoyDomain, EnvoyRateLimit, EnvoyValue};
pub use penalty::{
    DEFAULT_FORGIVE_AFTER, DEFAULT_MAX_BAN, DEFAULT_PENALTY_FACTOR, PenaltyConfig, PenaltyOn,
    PenaltyPer,
};
pub use reservations::{ReservationsConfig, SecretFiles, Secrets};
pub use rlqs::{BlanketRule, RlqsConfig, RlqsDomainConfig};
pub use scopes::{
    DEFAULT_MAX_LEASE, DescriptorKeysConfig, FailureMode, HashTag, HeadroomConfig, LimitConfig,
    MAX_BUDGET, MAX_CAPACITY, MAX_CONCURRENCY, MAX_MAX_DELAY, MAX_MAX_LEASE, MAX_NAME_LEN,
    MAX_REFILL_PERIOD, MIN_MAX_LEASE, MIN_REFILL_PERIOD, Per, Percent, ScopeConfig, UnknownScope,
};
pub use security::{CallerConfig, GrpcConfig, TlsConfig};
pub use store::{
    DEFAULT_BREAKER_COOL_DOWN, DEFAULT_BREAKER_THRESHOLD, DEFAULT_MAX_BYTES,
    DEFAULT_REDIS_CONNECT_TIMEOUT, DEFAULT_REDIS_KEY_PREFIX, DEFAULT_REDIS_POOL_SIZE,
    DEFAULT_REDIS_RESPONSE_TIMEOUT, DEFAULT_REDIS_WAIT_TIMEOUT, DEFAULT_SHARDS,
    DEFAULT_SWEEP_INTERVAL, MemoryConfig, OnEvictingPolicy, RedisConfig, RedisMode, RedisTlsConfig,
    Secret, StoreConfig, StoreKind,
};

/// Where Tollgate listens when nothing says otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "TOLLGATE";

/// The config's top-level keys. A `TOLLGATE_*` variable is an override
/// only when its first part names one of them; others (`TOLLGATE_BIN`, set
/// by a harness for its own use) are ignored, with a warning at start-up.
/// A unit test holds this list to the fields of [`Config`].
pub const SECTIONS: &[&str] = &[
    "listen",
    "store",
    "failure_mode",
    "unknown_scope",
    "hash_tag",
    "log",
    "metrics",
    "drain_delay",
    "shutdown_grace",
    "envoy_ratelimit_configs",
    "envoy_response_headers",
    "envoy_ratelimit_draft",
    "envoy_shadow_mode",
    "envoy_quota_mode",
    "envoy_dynamic_metadata",
    "envoy_merge_domains",
    "scopes",
    "tls",
    "callers",
    "grpc",
    "analytics",
    "reload",
    "reservations",
    "rlqs",
];

/// Whether the environment variable `name` overrides the config: it is
/// `TOLLGATE_<SECTION>` or `TOLLGATE_<SECTION>__<PATH>` for a top-level
/// key `SECTION` (any case). Under a known section, every part must still
/// name a key, or the config is refused.
pub fn is_override(name: &str) -> bool {
    let Some(path) = name
        .strip_prefix(ENV_PREFIX)
        .and_then(|rest| rest.strip_prefix('_'))
    else {
        return false;
    };
    let section = path.split("__").next().unwrap_or_default();
    SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(section))
}
/// Default `shutdown_grace`: how long calls still in flight after the drain
/// may run before they are cancelled. Kubernetes gives a pod 30 s in all by
/// default; this leaves room for `drain_delay` within it.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The gRPC listen address, for `tollgate.v1` and Envoy's RLS alike.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Where bucket state lives.
    #[serde(default)]
    pub store: StoreConfig,
    /// What to do when the store cannot answer; scopes may override it.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// What to do with a request for a scope that is not configured.
    #[serde(default)]
    pub unknown_scope: UnknownScope,
    /// The Redis hash tag of scopes that set none, and of every
    /// envoyproxy/ratelimit domain (see [`HashTag`]).
    #[serde(default)]
    pub hash_tag: HashTag,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// How long to keep answering, with health NOT_SERVING, after a shutdown
    /// signal and before refusing new calls, so load balancers can drain.
    #[serde(default, with = "humantime_serde")]
    pub drain_delay: Option<Duration>,
    /// After the drain, how long calls already in flight may run before they
    /// are cancelled, so a stuck call cannot hold the process up forever.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// envoyproxy/ratelimit YAML files or directories of them, whose domains
    /// become scopes beside the ones below.
    #[serde(default)]
    pub envoy_ratelimit_configs: Vec<PathBuf>,
    /// The domains read from `envoy_ratelimit_configs` when the config was
    /// loaded; a reload reads them again.
    #[serde(skip)]
    pub envoy_domains: Vec<EnvoyDomain>,
    /// Whether Envoy RLS answers carry rate-limit headers (`x-ratelimit-*`,
    /// `retry-after`, and the draft's fields below) for Envoy to add to the
    /// client's response.
    #[serde(default)]
    pub envoy_response_headers: bool,
    /// Which IETF `RateLimit` header draft to render beside the legacy
    /// headers, when `envoy_response_headers` is on. A setting, because the
    /// draft is still moving.
    #[serde(default)]
    pub envoy_ratelimit_draft: RateLimitDraft,
    /// Every Envoy descriptor's limits are shadow: judged, charged when they
    /// have room, counted, never denying (upstream's `SHADOW_MODE`).
    #[serde(default)]
    pub envoy_shadow_mode: bool,
    /// Every Envoy descriptor is a quota-mode descriptor (upstream's
    /// `QUOTA_MODE`).
    #[serde(default)]
    pub envoy_quota_mode: bool,
    /// Envoy answers carry dynamic metadata in envoyproxy/ratelimit's shape
    /// (upstream's `RESPONSE_DYNAMIC_METADATA`).
    #[serde(default)]
    pub envoy_dynamic_metadata: bool,
    /// A domain may be spread over several envoyproxy/ratelimit files, whose
    /// top-level descriptors are merged (upstream's `MERGE_DOMAIN_CONFIG`).
    #[serde(default)]
    pub envoy_merge_domains: bool,
    /// The rate-limited scopes.
    #[serde(default)]
    pub scopes: Vec<ScopeConfig>,
    /// TLS on the gRPC listener; absent: plaintext.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Who may call, and what each caller may touch. Absent: anyone who
    /// reaches the port may decide on any scope (see docs/security.md).
    /// Present but empty: nobody may.
    #[serde(default)]
    pub callers: Option<Vec<CallerConfig>>,
    /// Bounds on what callers can make the gRPC listener hold.
    #[serde(default)]
    pub grpc: GrpcConfig,
    /// Heavy hitters and utilization.
    #[serde(default)]
    pub analytics: AnalyticsConfig,
    /// Reload on file change.
    #[serde(default)]
    pub reload: ReloadConfig,
    /// Settle-later reservations.
    #[serde(default)]
    pub reservations: ReservationsConfig,
    /// Envoy quota streaming (RLQS): domains, the bucket mapping, bounds.
    #[serde(default)]
    pub rlqs: RlqsConfig,
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_owned()
}

fn default_shutdown_grace() -> Duration {
    DEFAULT_SHUTDOWN_GRACE
}

/// Logging.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `human` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `tollgate=debug`; `RUST_LOG` wins.
    #[serde(default)]
    pub level: Option<String>,
}

/// Prometheus metrics.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where to serve `GET /metrics`, such as `127.0.0.1:9464`. Absent: off.
    #[serde(default)]
    pub listen: Option<String>,
    /// TLS on the metrics listener (with `client_ca`, scrapers need a
    /// client certificate); absent: plaintext.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// The IETF draft of the `RateLimit` and `RateLimit-Policy` header fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum RateLimitDraft {
    /// Legacy `x-ratelimit-*` headers only.
    #[serde(rename = "off")]
    Off,
    /// draft-ietf-httpapi-ratelimit-headers-11.
    #[default]
    #[serde(rename = "draft-11")]
    Draft11,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// For people at a terminal.
    #[default]
    Human,
    /// One JSON object per line, for collectors.
    Json,
}

/// A configuration that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// Each entry is `path: problem`.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}", self.problems.join("; "))
    }
}

impl ConfigError {
    /// An error with a single `path: problem`.
    pub fn one(problem: impl Into<String>) -> Self {
        Self {
            problems: vec![problem.into()],
        }
    }

    /// `Ok` when `problems` is empty, else the error holding them all.
    pub fn check(problems: Vec<String>) -> Result<(), Self> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Self { problems })
        }
    }
}

/// A YAML syntax error, led by where it is (`line 3 column 9: …`), so that
/// every problem names its place, a field or a position.
fn syntax_error(message: &str) -> String {
    let at = message.find(" line ").and_then(|i| {
        let mut words = message[i..].split_whitespace();
        let (_, line, _, column) = (words.next()?, words.next()?, words.next()?, words.next()?);
        Some(format!(
            "line {line} column {}",
            column.trim_end_matches(|c: char| !c.is_ascii_digit())
        ))
    });
    match at {
        Some(at) => format!("{at}: not valid YAML: {message}"),
        None => format!("config: {message}"),
    }
}

/// Where a running server's config comes from, so that a reload (SIGHUP, or
/// a file change) reads it again the same way.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The YAML file.
    pub path: PathBuf,
    /// The `TOLLGATE_*` overrides, captured once at start-up.
    pub env: Vec<(String, String)>,
    /// The `TOLLGATE_*` variables that name no config section, ignored;
    /// start-up warns of each.
    pub ignored: Vec<String>,
}

impl ConfigSource {
    /// A source reading `path`, overlaid with the `TOLLGATE_*` pairs of `env`.
    pub fn new(path: impl Into<PathBuf>, env: impl IntoIterator<Item = (String, String)>) -> Self {
        let prefix = format!("{ENV_PREFIX}_");
        let (env, ignored): (Vec<_>, Vec<_>) = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .partition(|(k, _)| is_override(k));
        Self {
            path: path.into(),
            env,
            ignored: ignored.into_iter().map(|(k, _)| k).collect(),
        }
    }

    /// Reads and validates the config now.
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(&self.path, self.env.iter().cloned())
    }
}

impl Config {
    /// Reads `path` (YAML), overlays `env` (pairs such as
    /// `("TOLLGATE_LISTEN", "0.0.0.0:50051")`; others are ignored), reads the
    /// envoyproxy/ratelimit files it names, and validates the result.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(format!("{}: cannot read: {e}", path.display())))?;
        let mut config = Self::parse(&text, env)?;
        // Relative paths (envoy configs, certificates, secret files) are
        // relative to the file naming them.
        if let Some(dir) = path.parent() {
            for p in &mut config.envoy_ratelimit_configs {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
            for tls in [&mut config.tls, &mut config.metrics.tls]
                .into_iter()
                .flatten()
            {
                tls.resolve(dir);
            }
            config.store.redis.resolve(dir);
            config.reservations.resolve(dir);
        }
        config.finish()
    }

    /// Parses YAML text and validates it.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::from_yaml_with_env(text, std::iter::empty())
    }

    /// Parses YAML text, overlays `env`, reads the envoyproxy/ratelimit files
    /// it names (relative to the working directory), and validates.
    pub fn from_yaml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::parse(text, env)?.finish()
    }

    /// YAML and environment into the typed config, not yet validated.
    fn parse(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let env: ::config::Map<String, String> =
            env.into_iter().filter(|(k, _)| is_override(k)).collect();
        let raw = ::config::Config::builder()
            .add_source(::config::File::from_str(text, ::config::FileFormat::Yaml))
            .add_source(
                ::config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("_")
                    .separator("__")
                    .source(Some(env)),
            )
            .build()
            .map_err(|e| ConfigError::one(syntax_error(&e.to_string())))?;
        raw.try_deserialize()
            .map_err(|e| ConfigError::one(field_first(&dotted_paths(&e.to_string()))))
    }

    /// Reads the envoyproxy/ratelimit files, then validates the whole.
    fn finish(mut self) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        self.store.read_secrets(&mut problems);
        self.reservations.read_secret(&mut problems);
        match envoy::load_all(&self.envoy_ratelimit_configs) {
            Ok(domains) if self.envoy_merge_domains => match envoy::merge(domains) {
                Ok(domains) => self.envoy_domains = domains,
                Err(e) => problems.extend(e.problems),
            },
            Ok(domains) => self.envoy_domains = domains,
            Err(e) => problems.extend(e.problems),
        }
        if let Err(e) = self.validate() {
            problems.extend(e.problems);
        }
        ConfigError::check(problems)?;
        Ok(self)
    }

    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen
            .parse()
            .map_err(|e| ConfigError::one(format!("listen: {e}: {:?}", self.listen)))
    }

    /// Checks everything serde cannot: ranges, uniqueness, globs. This is
    /// the one place that refuses a scope defined twice, whether in
    /// `scopes` or as an envoyproxy/ratelimit domain.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Err(e) = self.listen_addr() {
            problems.extend(e.problems);
        }
        if let Some(m) = &self.metrics.listen
            && let Err(e) = m.parse::<SocketAddr>()
        {
            problems.push(format!("metrics.listen: {e}: {m:?}"));
        }
        if self.shutdown_grace > Duration::from_secs(3600) {
            problems.push("shutdown_grace: must be at most 1h".to_owned());
        }
        self.store.validate(&mut problems);
        if let Some(tls) = &self.tls {
            tls.validate(&mut problems, "tls");
        }
        if let Some(tls) = &self.metrics.tls {
            tls.validate(&mut problems, "metrics.tls");
            if self.metrics.listen.is_none() {
                problems.push("metrics.tls: needs metrics.listen".to_owned());
            }
        }
        if let Some(callers) = &self.callers {
            let mtls = self.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
            security::validate_callers(&mut problems, callers, mtls);
        }
        self.grpc.validate(&mut problems);
        self.analytics.validate(&mut problems);
        self.reload.validate(&mut problems);
        self.reservations.validate(&mut problems);
        // Where each scope name was first defined, for the duplicate message.
        let mut defined: HashMap<&str, String> = HashMap::new();
        for (i, scope) in self.scopes.iter().enumerate() {
            let at = format!("scopes[{i}]");
            scopes::validate_scope(&mut problems, &at, scope);
            if scope.penalty.is_some() && scope.hash_tag.unwrap_or(self.hash_tag) != HashTag::Scope
            {
                // The penalty box's record and its scope's list of bans
                // live in the scope's slot, with the charge they judge.
                problems.push(format!(
                    "{at}.penalty: needs hash_tag scope (a penalty box and identity-spread \
                     buckets are not supported together yet)"
                ));
            }
            if defined.contains_key(scope.name.as_str()) {
                problems.push(format!("{at}.name: duplicate scope {:?}", scope.name));
            } else {
                defined.insert(&scope.name, format!("{at} of the Tollgate config"));
            }
        }
        for domain in &self.envoy_domains {
            match defined.get(domain.name.as_str()) {
                Some(first) => problems.push(format!(
                    "{}: domain: {:?} is already defined in {first}",
                    domain.origin, domain.name
                )),
                None => {
                    defined.insert(&domain.name, domain.origin.clone());
                }
            }
        }
        let names: Vec<&str> = defined.keys().copied().collect();
        self.rlqs.validate(&mut problems, &names);
        ConfigError::check(problems)
    }
}

/// The config crate writes paths as `scopes[0]limits[1]per`; we write
/// `scopes[0].limits[1].per` everywhere else, so mend its messages.
/// The config crate says `problem for key \`a.b\``; we say `a.b: problem`,
/// like every other problem. A message without a key is about the whole.
fn field_first(message: &str) -> String {
    match message.rsplit_once(" for key `") {
        Some((problem, key)) => format!("{}: {problem}", key.trim_end_matches('`')),
        None if message.contains(": ") => message.to_owned(),
        None => format!("config: {message}"),
    }
}

fn dotted_paths(message: &str) -> String {
    let mut out = String::with_capacity(message.len() + 8);
    let mut chars = message.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == ']' && chars.peek().is_some_and(|n| n.is_alphabetic() || *n == '_') {
            out.push('.');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_the_configs_top_level_keys() {
        // serde lists every field of `Config` when it meets an unknown one.
        let e = Config::from_yaml("not_a_section: 1")
            .unwrap_err()
            .to_string();
        let (_, listed) = e.split_once("expected one of ").unwrap();
        let keys: Vec<&str> = listed
            .split(',')
            .map(|k| k.trim().trim_matches('`'))
            .collect();
        assert_eq!(keys, SECTIONS);
    }

    #[test]
    fn a_penalty_box_is_refused_beside_spread_buckets_and_delays() {
        let yaml = |top: &str, extra: &str, delay: &str| {
            format!(
                "{top}scopes:\n  - name: a\n    {extra}\n    penalty: {{ strikes: 3, within: 1m, ban: 1m }}\n    limits:\n      - {{ name: l, per: identity, capacity: 1, refill_period: 1s{delay} }}\n"
            )
        };
        assert!(Config::from_yaml(&yaml("", "hash_tag: scope", "")).is_ok());
        for (top, extra) in [
            ("", "hash_tag: identity"),
            ("hash_tag: identity\n", "allow: []"),
        ] {
            let e = Config::from_yaml(&yaml(top, extra, ""))
                .unwrap_err()
                .to_string();
            assert!(e.contains("scopes[0].penalty: needs hash_tag scope"), "{e}");
        }
        let e = Config::from_yaml(&yaml("", "allow: []", ", max_delay: 1s"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "scopes[0].limits[0].max_delay: not supported in a scope with a penalty box"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_scope_s_hash_tag_defaults_to_the_scope_and_a_bad_one_names_its_field() {
        let yaml = |tag: &str| {
            format!(
                "scopes:\n  - name: a\n    limits: []\n  - name: b\n    {tag}\n    limits: []\n"
            )
        };
        let config = Config::from_yaml(&yaml("hash_tag: identity_operation")).unwrap();
        assert_eq!(config.hash_tag, HashTag::Scope);
        assert_eq!(config.scopes[0].hash_tag, None);
        assert_eq!(config.scopes[1].hash_tag, Some(HashTag::IdentityOperation));
        let e = Config::from_yaml(&yaml("hash_tag: user"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("scopes[1].hash_tag: must be scope, identity or identity_operation"),
            "{e}"
        );
        let e = Config::from_yaml("hash_tag: slot\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("hash_tag: must be scope, identity"), "{e}");
        let env = [("TOLLGATE_HASH_TAG".to_owned(), "identity".to_owned())];
        let config = Config::from_yaml_with_env("scopes: []\n", env).unwrap();
        assert_eq!(config.hash_tag, HashTag::Identity);
    }

    #[test]
    fn only_variables_naming_a_section_are_overrides() {
        for yes in [
            "TOLLGATE_LISTEN",
            "TOLLGATE_STORE__KIND",
            "TOLLGATE_store__kidn",
        ] {
            assert!(is_override(yes), "{yes}");
        }
        for no in [
            "TOLLGATE_BIN",
            "TOLLGATE",
            "TOLLGATE_",
            "TOLLGATEX_LISTEN",
            "LISTEN",
        ] {
            assert!(!is_override(no), "{no}");
        }
    }
}
