//! Store settings: which backend keeps bucket state, and how it is tuned.
//!
//! Only the shape and ranges of these settings are checked here. Whatever
//! needs the backend's own knowledge (is this a Redis URL its client can use?)
//! the store checks itself, in a step that runs before any port is bound.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default `store.memory.shards`: enough that two cores never wait on each
/// other, small enough that a sweep is cheap.
pub const DEFAULT_SHARDS: usize = 64;
/// Default `store.memory.sweep_interval`: how often full buckets are dropped.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// Default `store.memory.max_bytes`: 256 MiB of buckets, about 1.5 million
/// buckets with short keys (175 B each as counted). The shipped Kubernetes memory limit (512 Mi) is
/// this plus room for the process, connections and the tables' growth.
pub const DEFAULT_MAX_BYTES: usize = 256 << 20;
/// Default `store.redis.key_prefix`. Its number is the key schema's version.
pub const DEFAULT_REDIS_KEY_PREFIX: &str = "tg2:";

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
    /// The exact local deny cache in front of the store. Absent: on for
    /// Redis, where it saves a round trip per repeated denial, off for the
    /// embedded store, which answers a denial as cheaply itself.
    #[serde(default)]
    pub deny_cache: Option<bool>,
}

impl StoreConfig {
    /// Whether the deny cache is on, after the default for the store kind.
    pub fn deny_cache_on(&self) -> bool {
        self.deny_cache.unwrap_or(self.kind == StoreKind::Redis)
    }
}

impl StoreConfig {
    /// Checks the ranges of the store settings, pushing `store.<field>: problem`.
    pub(super) fn validate(&self, problems: &mut Vec<String>) {
        let memory = &self.memory;
        if memory.shards == 0 || memory.shards > 65_536 {
            problems.push("store.memory.shards: must be between 1 and 65536".to_owned());
        }
        if memory.max_bytes < 1 << 20 {
            problems.push("store.memory.max_bytes: must be at least 1MiB".to_owned());
        }
        if memory.sweep_interval < Duration::from_millis(10) {
            problems.push("store.memory.sweep_interval: must be at least 10ms".to_owned());
        }
        if self.kind == StoreKind::Redis {
            self.redis.validate(problems);
        }
    }

    /// Reads the secret files the store settings name.
    pub(super) fn read_secrets(&mut self, problems: &mut Vec<String>) {
        if self.kind == StoreKind::Redis {
            self.redis.read_secrets(problems);
        }
    }
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
    /// The most bytes of buckets held at once (keys included, long caller
    /// parts hashed). A decision that would create more fails as a store
    /// error, so the scope's failure mode applies. An integer of bytes or a
    /// size such as `256MiB`.
    #[serde(default = "default_max_bytes", deserialize_with = "bytes")]
    pub max_bytes: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            shards: default_shards(),
            sweep_interval: default_sweep(),
            max_bytes: default_max_bytes(),
        }
    }
}

fn default_shards() -> usize {
    DEFAULT_SHARDS
}

fn default_max_bytes() -> usize {
    DEFAULT_MAX_BYTES
}

/// A size: an integer of bytes, or a number with `B`, `KiB`, `MiB` or `GiB`.
fn bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(usize),
        Text(String),
    }
    let text = match Size::deserialize(d)? {
        Size::Bytes(n) => return Ok(n),
        Size::Text(t) => t,
    };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        _ => {
            return Err(serde::de::Error::custom(format!(
                "{text:?}: expected bytes, or a size such as 256MiB (units B, KiB, MiB, GiB)"
            )));
        }
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| serde::de::Error::custom(format!("{text:?}: not a size")))
}

fn default_sweep() -> Duration {
    DEFAULT_SWEEP_INTERVAL
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
    /// A file holding the data nodes' password (a mounted Kubernetes
    /// secret), read at start-up; one trailing newline is dropped.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// ACL user for the sentinels themselves (Sentinel's own `requirepass`
    /// / ACL), in sentinel mode.
    #[serde(default)]
    pub sentinel_username: Option<String>,
    /// Password for the sentinels themselves. Redacted like `password`.
    #[serde(default)]
    pub sentinel_password: Option<Secret>,
    /// A file holding the sentinels' password.
    #[serde(default)]
    pub sentinel_password_file: Option<PathBuf>,
    /// TLS settings for `rediss://` URLs.
    #[serde(default)]
    pub tls: RedisTlsConfig,
    /// How long one decision's round trip may take before it counts as a
    /// failure. Small, because a slow Redis must not make every call slow.
    #[serde(default = "default_redis_response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
    /// How long opening a connection may take.
    #[serde(default = "default_redis_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a decision may wait for a free pooled connection
    /// (standalone; Sentinel and Cluster connections are made directly, and
    /// every wait is bounded by `response_timeout` as well).
    #[serde(default = "default_redis_wait_timeout", with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Pooled connections. Each is multiplexed, so a few carry many calls.
    /// Cluster uses one: it already holds a connection per node.
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
    /// What Tollgate does when Redis's `maxmemory-policy` can evict its
    /// keys (every policy but `noeviction`): an evicted bucket is a full
    /// one, and an evicted open-reservation record refuses its settle.
    #[serde(default)]
    pub on_evicting_policy: OnEvictingPolicy,
    /// Tests only, never read from a file: microseconds added to this
    /// host's clock where the Redis store reads it (to offer a budget's
    /// calendar windows), so a test can put a replica's clock days away
    /// from Redis's without changing the machine's.
    #[serde(skip)]
    #[doc(hidden)]
    pub host_clock_skew_us: i64,
}

/// `store.redis.on_evicting_policy`: what to do on a Redis that may evict
/// Tollgate's keys under memory pressure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnEvictingPolicy {
    /// Refuse to start; found later (a Redis reached only after the start,
    /// a failover), report not ready until the policy is `noeviction`.
    #[default]
    Refuse,
    /// Serve anyway (managed Redis whose policy cannot be changed): log it
    /// loudly at start and on each reconnect, and export it as a metric.
    Warn,
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
    DEFAULT_REDIS_KEY_PREFIX.to_owned()
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
            password_file: None,
            sentinel_username: None,
            sentinel_password: None,
            sentinel_password_file: None,
            tls: RedisTlsConfig::default(),
            response_timeout: DEFAULT_REDIS_RESPONSE_TIMEOUT,
            connect_timeout: DEFAULT_REDIS_CONNECT_TIMEOUT,
            wait_timeout: DEFAULT_REDIS_WAIT_TIMEOUT,
            pool_size: DEFAULT_REDIS_POOL_SIZE,
            key_prefix: default_redis_key_prefix(),
            breaker_threshold: DEFAULT_BREAKER_THRESHOLD,
            breaker_cool_down: DEFAULT_BREAKER_COOL_DOWN,
            on_evicting_policy: OnEvictingPolicy::default(),
            host_clock_skew_us: 0,
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
            .field("password_file", &self.password_file)
            .field("sentinel_username", &self.sentinel_username)
            .field("sentinel_password", &self.sentinel_password)
            .field("sentinel_password_file", &self.sentinel_password_file)
            .field("tls", &self.tls)
            .field("response_timeout", &self.response_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("wait_timeout", &self.wait_timeout)
            .field("pool_size", &self.pool_size)
            .field("key_prefix", &self.key_prefix)
            .field("breaker_threshold", &self.breaker_threshold)
            .field("breaker_cool_down", &self.breaker_cool_down)
            .field("on_evicting_policy", &self.on_evicting_policy)
            .field("host_clock_skew_us", &self.host_clock_skew_us)
            .finish()
    }
}

/// TLS towards Redis (`rediss://` URLs), sentinels included.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisTlsConfig {
    /// PEM CA certificates to trust instead of the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Skip certificate verification entirely: anyone on the path can read
    /// and change every decision. For tests against self-signed servers.
    #[serde(default)]
    pub danger_accept_invalid_certificates: bool,
}

impl RedisConfig {
    /// Makes relative file paths relative to `dir`, the config's folder.
    pub(super) fn resolve(&mut self, dir: &Path) {
        let files = [
            self.password_file.as_mut(),
            self.sentinel_password_file.as_mut(),
            self.tls.ca_file.as_mut(),
        ];
        for p in files.into_iter().flatten() {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }

    /// Reads `password_file` and `sentinel_password_file` into the
    /// passwords they stand for.
    pub(super) fn read_secrets(&mut self, problems: &mut Vec<String>) {
        let at = "store.redis";
        let pairs = [
            ("password", &mut self.password, &self.password_file),
            (
                "sentinel_password",
                &mut self.sentinel_password,
                &self.sentinel_password_file,
            ),
        ];
        for (field, secret, file) in pairs {
            let Some(file) = file else { continue };
            if secret.is_some() {
                problems.push(format!(
                    "{at}.{field}_file: give {field} or {field}_file, not both"
                ));
                continue;
            }
            match std::fs::read_to_string(file) {
                Ok(text) => {
                    let text = text.strip_suffix('\n').unwrap_or(&text);
                    let text = text.strip_suffix('\r').unwrap_or(text);
                    *secret = Some(Secret::new(text));
                }
                Err(e) => problems.push(format!(
                    "{at}.{field}_file: cannot read {}: {e}",
                    file.display()
                )),
            }
        }
    }

    /// Checks the Redis settings, pushing `store.redis.<field>: problem`.
    fn validate(&self, problems: &mut Vec<String>) {
        let at = "store.redis";
        for (i, url) in self.urls.iter().enumerate() {
            if url.ends_with("#insecure") {
                problems.push(format!(
                    "{at}.urls[{i}]: #insecure is not accepted; if you must skip \
                     certificate checks, say so with \
                     store.redis.tls.danger_accept_invalid_certificates: true"
                ));
            }
        }
        if let Some(ca) = &self.tls.ca_file
            && let Err(e) = std::fs::metadata(ca)
        {
            problems.push(format!(
                "{at}.tls.ca_file: cannot read {}: {e}",
                ca.display()
            ));
        }
        if self.mode != RedisMode::Sentinel
            && (self.sentinel_username.is_some() || self.sentinel_password.is_some())
        {
            problems.push(format!(
                "{at}.sentinel_password: only meaningful when mode is sentinel"
            ));
        }
        if self.urls.is_empty() {
            problems.push(format!("{at}.urls: required when store.kind is redis"));
        }
        // The client library parses the URLs fully; the store checks that
        // before any port is bound (`store::check_settings`).
        for (i, url) in self.urls.iter().enumerate() {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                problems.push(format!(
                    "{at}.urls[{i}]: must start with redis:// or rediss://"
                ));
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
