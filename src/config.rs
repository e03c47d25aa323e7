//! Typed configuration: parsed once, validated whole, before any port is bound.
//!
//! The source is a YAML file, overlaid with environment variables of the form
//! `TOLLGATE_<PATH>` where nested keys are joined by `__`, for example
//! `TOLLGATE_LISTEN=0.0.0.0:50051` or `TOLLGATE_STORE__KIND=memory`. The
//! environment is passed in, never read here, so tests stay hermetic.
//!
//! Every error names the field it is about, as a path such as
//! `scopes[0].limits[2].capacity`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where Tollgate listens when nothing says otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
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
/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "TOLLGATE";

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
    /// envoyproxy/ratelimit YAML files or directories of them, whose domains
    /// become scopes beside the ones below.
    #[serde(default)]
    pub envoy_ratelimit_configs: Vec<PathBuf>,
    /// Whether Envoy RLS answers carry `x-ratelimit-*` and `retry-after`
    /// headers for Envoy to add to the client's response.
    #[serde(default)]
    pub envoy_response_headers: bool,
    /// The rate-limited scopes.
    #[serde(default)]
    pub scopes: Vec<ScopeConfig>,
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_owned()
}

/// Where bucket state lives.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Which backend.
    #[serde(default)]
    pub kind: StoreKind,
    /// Tuning of the embedded store.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// The Redis store, used when `kind` is `redis`.
    #[serde(default)]
    pub redis: RedisConfig,
}

/// The store backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// In-process; state is lost on restart and not shared between replicas.
    #[default]
    Memory,
    /// Redis (standalone, Sentinel or Cluster), shared by every replica.
    Redis,
}

/// Tuning of the embedded store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Number of lock shards; rounded up to a power of two.
    #[serde(default = "default_shards")]
    pub shards: usize,
    /// How often full buckets are dropped.
    #[serde(default = "default_sweep", with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// The most buckets held at once. A decision that would create more
    /// fails as a store error, so the scope's failure mode applies.
    #[serde(default = "default_max_buckets")]
    pub max_buckets: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            shards: default_shards(),
            sweep_interval: default_sweep(),
            max_buckets: default_max_buckets(),
        }
    }
}

fn default_shards() -> usize {
    crate::store::memory::DEFAULT_SHARDS
}

fn default_max_buckets() -> usize {
    crate::store::memory::DEFAULT_MAX_BUCKETS
}

fn default_sweep() -> Duration {
    crate::store::memory::DEFAULT_SWEEP_INTERVAL
}

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
    fn one(problem: impl Into<String>) -> Self {
        Self {
            problems: vec![problem.into()],
        }
    }
}

impl Config {
    /// Reads `path` (YAML), overlays `env` (pairs such as
    /// `("TOLLGATE_LISTEN", "0.0.0.0:50051")`; others are ignored) and
    /// validates the result.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(format!("{}: cannot read: {e}", path.display())))?;
        let mut config = Self::from_yaml_with_env(&text, env)?;
        // Relative envoy config paths are relative to the file naming them.
        if let Some(dir) = path.parent() {
            for p in &mut config.envoy_ratelimit_configs {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        Ok(config)
    }

    /// Parses YAML text and validates it.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::from_yaml_with_env(text, std::iter::empty())
    }

    /// Parses YAML text, overlays `env`, and validates.
    pub fn from_yaml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let prefix = format!("{ENV_PREFIX}_");
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .collect();
        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Yaml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("_")
                    .separator("__")
                    .source(Some(env)),
            )
            .build()
            .map_err(|e| ConfigError::one(e.to_string()))?;
        let config: Config = raw
            .try_deserialize()
            .map_err(|e| ConfigError::one(dotted_paths(&e.to_string())))?;
        config.validate()?;
        Ok(config)
    }

    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen
            .parse()
            .map_err(|e| ConfigError::one(format!("listen: {e}: {:?}", self.listen)))
    }

    /// Checks everything serde cannot: ranges, uniqueness, globs.
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
        if self.store.memory.shards == 0 || self.store.memory.shards > 65_536 {
            problems.push("store.memory.shards: must be between 1 and 65536".to_owned());
        }
        if self.store.memory.max_buckets == 0 {
            problems.push("store.memory.max_buckets: must be > 0".to_owned());
        }
        if self.store.memory.sweep_interval < Duration::from_millis(10) {
            problems.push("store.memory.sweep_interval: must be at least 10ms".to_owned());
        }
        if self.store.kind == StoreKind::Redis {
            self.store.redis.validate(&mut problems);
        }
        let mut names = HashSet::new();
        for (i, scope) in self.scopes.iter().enumerate() {
            let at = format!("scopes[{i}]");
            check_name(&mut problems, &format!("{at}.name"), &scope.name);
            if !names.insert(scope.name.as_str()) {
                problems.push(format!("{at}.name: duplicate scope {:?}", scope.name));
            }
            validate_limits(&mut problems, &at, &scope.limits);
            if let Some(keys) = &scope.descriptor_keys {
                for (field, key) in [("identity", &keys.identity), ("operation", &keys.operation)] {
                    if let Some(key) = key {
                        check_name(&mut problems, &format!("{at}.descriptor_keys.{field}"), key);
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

/// Validates a scope's limits, pushing `path: problem` entries.
pub fn validate_limits(problems: &mut Vec<String>, at: &str, limits: &[LimitConfig]) {
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

fn check_name(problems: &mut Vec<String>, at: &str, name: &str) {
    if name.is_empty() {
        problems.push(format!("{at}: must not be empty"));
    } else if name.len() > MAX_NAME_LEN {
        problems.push(format!("{at}: must be at most {MAX_NAME_LEN} bytes"));
    } else if name.chars().any(char::is_control) {
        problems.push(format!("{at}: must not contain control characters"));
    }
}

/// The config crate writes paths as `scopes[0]limits[1]per`; we write
/// `scopes[0].limits[1].per` everywhere else, so mend its messages.
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

/// How Tollgate reaches Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// One server; `urls` holds it.
    #[default]
    Standalone,
    /// A primary found through Sentinels; `urls` holds the sentinels.
    Sentinel,
    /// Redis Cluster; `urls` holds seed nodes.
    Cluster,
}

/// A secret: deserialised like a string, never printed.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret given in code rather than in the config file.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The Redis store: topology, credentials, timeouts and circuit breaker.
/// Its Debug print redacts the password and any password inside a URL.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Standalone, Sentinel or Cluster.
    #[serde(default)]
    pub mode: RedisMode,
    /// `redis://` or `rediss://` URLs: the server, the sentinels, or cluster
    /// seed nodes. Credentials in a URL are used but better kept below.
    #[serde(default)]
    pub urls: Vec<String>,
    /// The Sentinel master's name; required in sentinel mode.
    #[serde(default)]
    pub master_name: Option<String>,
    /// ACL user for the data nodes (and the sentinels' URLs carry their own).
    #[serde(default)]
    pub username: Option<String>,
    /// Password for the data nodes. Redacted from every log and Debug print.
    #[serde(default)]
    pub password: Option<Secret>,
    /// How long one decision's round trip may take before it counts as a
    /// failure. Small, because a slow Redis must not make every call slow.
    #[serde(default = "default_redis_response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
    /// How long opening a connection may take.
    #[serde(default = "default_redis_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a decision may wait for a free pooled connection.
    #[serde(default = "default_redis_wait_timeout", with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Pooled connections. Each is multiplexed, so a few carry many calls.
    #[serde(default = "default_redis_pool_size")]
    pub pool_size: usize,
    /// Prefix of every key; its number is the schema version. Tests and
    /// tenants sharing a Redis use their own.
    #[serde(default = "default_redis_key_prefix")]
    pub key_prefix: String,
    /// Consecutive failures that open the circuit breaker.
    #[serde(default = "default_breaker_threshold")]
    pub breaker_threshold: u32,
    /// How long the open breaker fails calls at once before probing Redis.
    #[serde(default = "default_breaker_cool_down", with = "humantime_serde")]
    pub breaker_cool_down: Duration,
}

/// Default `store.redis.response_timeout`.
pub const DEFAULT_REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_millis(50);
/// Default `store.redis.connect_timeout`.
pub const DEFAULT_REDIS_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Default `store.redis.wait_timeout`.
pub const DEFAULT_REDIS_WAIT_TIMEOUT: Duration = Duration::from_millis(50);
/// Default `store.redis.pool_size`.
pub const DEFAULT_REDIS_POOL_SIZE: usize = 8;
/// Default `store.redis.breaker_threshold`.
pub const DEFAULT_BREAKER_THRESHOLD: u32 = 3;
/// Default `store.redis.breaker_cool_down`.
pub const DEFAULT_BREAKER_COOL_DOWN: Duration = Duration::from_millis(500);

fn default_redis_response_timeout() -> Duration {
    DEFAULT_REDIS_RESPONSE_TIMEOUT
}
fn default_redis_connect_timeout() -> Duration {
    DEFAULT_REDIS_CONNECT_TIMEOUT
}
fn default_redis_wait_timeout() -> Duration {
    DEFAULT_REDIS_WAIT_TIMEOUT
}
fn default_redis_pool_size() -> usize {
    DEFAULT_REDIS_POOL_SIZE
}
fn default_redis_key_prefix() -> String {
    crate::store::redis::DEFAULT_PREFIX.to_owned()
}
fn default_breaker_threshold() -> u32 {
    DEFAULT_BREAKER_THRESHOLD
}
fn default_breaker_cool_down() -> Duration {
    DEFAULT_BREAKER_COOL_DOWN
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            mode: RedisMode::default(),
            urls: Vec::new(),
            master_name: None,
            username: None,
            password: None,
            response_timeout: DEFAULT_REDIS_RESPONSE_TIMEOUT,
            connect_timeout: DEFAULT_REDIS_CONNECT_TIMEOUT,
            wait_timeout: DEFAULT_REDIS_WAIT_TIMEOUT,
            pool_size: DEFAULT_REDIS_POOL_SIZE,
            key_prefix: default_redis_key_prefix(),
            breaker_threshold: DEFAULT_BREAKER_THRESHOLD,
            breaker_cool_down: DEFAULT_BREAKER_COOL_DOWN,
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `redis://user:secret@host` → `redis://user:<redacted>@host`.
        let urls: Vec<String> = self
            .urls
            .iter()
            .map(|u| {
                let Some((scheme, rest)) = u.split_once("://") else {
                    return u.clone();
                };
                let authority = rest.split('/').next().unwrap_or_default();
                match authority.rsplit_once('@') {
                    Some((userinfo, _)) => {
                        let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                        format!("{scheme}://{user}:<redacted>{}", &rest[userinfo.len()..])
                    }
                    None => u.clone(),
                }
            })
            .collect();
        f.debug_struct("RedisConfig")
            .field("mode", &self.mode)
            .field("urls", &urls)
            .field("master_name", &self.master_name)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("response_timeout", &self.response_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("wait_timeout", &self.wait_timeout)
            .field("pool_size", &self.pool_size)
            .field("key_prefix", &self.key_prefix)
            .field("breaker_threshold", &self.breaker_threshold)
            .field("breaker_cool_down", &self.breaker_cool_down)
            .finish()
    }
}

impl RedisConfig {
    /// Checks the Redis settings, pushing `store.redis.<field>: problem`.
    fn validate(&self, problems: &mut Vec<String>) {
        let at = "store.redis";
        if self.urls.is_empty() {
            problems.push(format!("{at}.urls: required when store.kind is redis"));
        }
        for (i, url) in self.urls.iter().enumerate() {
            if let Err(e) = crate::store::redis::check_url(url) {
                problems.push(format!("{at}.urls[{i}]: {e}"));
            }
        }
        if self.mode == RedisMode::Standalone && self.urls.len() > 1 {
            problems.push(format!("{at}.urls: standalone mode takes one url"));
        }
        match (&self.master_name, self.mode) {
            (None, RedisMode::Sentinel) => {
                problems.push(format!("{at}.master_name: required when mode is sentinel"))
            }
            (Some(_), RedisMode::Standalone | RedisMode::Cluster) => problems.push(format!(
                "{at}.master_name: only meaningful when mode is sentinel"
            )),
            (Some(name), RedisMode::Sentinel) if name.is_empty() => {
                problems.push(format!("{at}.master_name: must not be empty"))
            }
            _ => {}
        }
        for (field, value) in [
            ("response_timeout", self.response_timeout),
            ("connect_timeout", self.connect_timeout),
            ("wait_timeout", self.wait_timeout),
            ("breaker_cool_down", self.breaker_cool_down),
        ] {
            if value < Duration::from_millis(1) || value > Duration::from_secs(60) {
                problems.push(format!("{at}.{field}: must be between 1ms and 60s"));
            }
        }
        if self.pool_size == 0 || self.pool_size > 1024 {
            problems.push(format!("{at}.pool_size: must be between 1 and 1024"));
        }
        if self.breaker_threshold == 0 {
            problems.push(format!("{at}.breaker_threshold: must be at least 1"));
        }
        let prefix = &self.key_prefix;
        if prefix.len() > 64 {
            problems.push(format!("{at}.key_prefix: must be at most 64 bytes"));
        }
        if prefix.contains(['{', '}']) || prefix.chars().any(char::is_control) {
            problems.push(format!(
                "{at}.key_prefix: must not contain braces (they would pick the hash slot) or control characters"
            ));
        }
    }
}
