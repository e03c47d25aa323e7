//! Who may call, over what, and within which bounds: TLS for the two
//! listeners, the `callers:` grants, and the `grpc:` bounds.
//!
//! Plain data and its validation, like the rest of `config`: certificates
//! are parsed by the server, which refuses a bad one before binding.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::scopes::check_name;

/// Default `tls.reload_interval`: how often the certificate files are read
/// again to catch a rotation. Reading three small files is cheap, and
/// cert-manager renews long before expiry.
pub const DEFAULT_TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(10);
/// Default `grpc.max_message_size`: the largest decoded request, in bytes.
/// The largest valid request, a batch of 256 entries each at every field's
/// cap, is about 1.5 MiB; 4 MiB leaves room and matches gRPC's usual default.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;
/// Default `grpc.max_header_list_size`: the most bytes of headers
/// (metadata) one call may send; hyper's own default, made explicit.
pub const DEFAULT_MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Default `grpc.max_concurrent_streams`: calls one connection may have open.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
/// Default `grpc.keepalive_interval`: how often an idle connection is pinged.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default `grpc.keepalive_timeout`: an unanswered ping closes the connection
/// after this long, so dead peers do not hold sockets.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `grpc.max_connection_age`: after this, a connection is asked to
/// go away (HTTP/2 GOAWAY) and the client reconnects, possibly to a new
/// replica, so long-lived Envoy connections spread again after a scale-up.
pub const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(600);
/// Default `grpc.max_connection_age_grace`: how long calls still running on
/// an aged connection may finish before it is closed.
pub const DEFAULT_MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(30);
/// Default `grpc.max_in_flight`: calls being handled at once, across all
/// connections; past it, new calls get RESOURCE_EXHAUSTED at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;
/// The most threads `grpc.cores` may ask for.
pub const MAX_CORES: usize = 256;

/// Default `grpc.max_batch`: entries in one `ShouldAllowBatch`.
pub const DEFAULT_MAX_BATCH: usize = 256;
/// Default `grpc.max_envoy_descriptors`: descriptors in one Envoy request.
pub const DEFAULT_MAX_ENVOY_DESCRIPTORS: usize = 64;

/// A listener's TLS: the server's certificate, and for mutual TLS the CA
/// that client certificates must chain to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates. When set, every client must present a
    /// certificate that chains to one of them, or the handshake fails.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// How often the files are read again; a change is picked up for new
    /// connections, and open connections keep theirs.
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

fn default_reload_interval() -> Duration {
    DEFAULT_TLS_RELOAD_INTERVAL
}

impl TlsConfig {
    /// Makes relative paths relative to `dir`, the config file's folder.
    pub(super) fn resolve(&mut self, dir: &Path) {
        for p in [&mut self.cert, &mut self.key]
            .into_iter()
            .chain(self.client_ca.as_mut())
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }

    pub(super) fn validate(&self, problems: &mut Vec<String>, at: &str) {
        let files = [("cert", Some(&self.cert)), ("key", Some(&self.key))];
        for (field, path) in files
            .into_iter()
            .chain([("client_ca", self.client_ca.as_ref())])
        {
            if let Some(path) = path
                && let Err(e) = std::fs::metadata(path)
            {
                problems.push(format!("{at}.{field}: cannot read {}: {e}", path.display()));
            }
        }
        if self.reload_interval < Duration::from_millis(10) {
            problems.push(format!("{at}.reload_interval: must be at least 10ms"));
        }
    }
}

/// One caller: how it is recognised, and what it may do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerConfig {
    /// Named in `PERMISSION_DENIED` messages, audit lines and the
    /// `caller` label of `tollgate_access_denied_total`.
    pub name: String,
    /// A DNS or URI subject alternative name of the client certificate,
    /// such as `spiffe://prod/ns/edge/sa/gateway`; matched exactly.
    #[serde(default)]
    pub san: Option<String>,
    /// The SHA-256 of the caller's bearer token, in hex. The token itself
    /// never sits in the config (`sha256sum` of the token, without newline).
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// Globs of the scopes (Envoy: domains) this caller may decide on.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// May send `dry_run` requests (they take nothing, but read state).
    #[serde(default)]
    pub dry_run: bool,
    /// May call `ShouldAllowBatch`.
    #[serde(default)]
    pub batch: bool,
    /// May call the admin RPCs.
    #[serde(default)]
    pub admin: bool,
    /// May give tokens back: Envoy descriptors with `is_negative_hits`.
    /// A refund is not tied to an earlier charge, so it is a grant of its
    /// own.
    #[serde(default)]
    pub refund: bool,
}

/// Checks the `callers:` list. `mtls` says whether client certificates are
/// asked for at all (`tls.client_ca`), without which a SAN matches nothing.
pub(super) fn validate_callers(problems: &mut Vec<String>, callers: &[CallerConfig], mtls: bool) {
    let mut names = HashMap::new();
    let mut sans = HashMap::new();
    let mut tokens = HashMap::new();
    for (i, caller) in callers.iter().enumerate() {
        let at = format!("callers[{i}]");
        check_name(problems, &format!("{at}.name"), &caller.name);
        if let Some(first) = names.insert(caller.name.as_str(), i) {
            problems.push(format!(
                "{at}.name: duplicate caller {:?} (also callers[{first}])",
                caller.name
            ));
        }
        match (&caller.san, &caller.token_sha256) {
            (None, None) => problems.push(format!("{at}: needs a san or a token_sha256")),
            (Some(_), Some(_)) => problems.push(format!(
                "{at}: give a san or a token_sha256, not both (make two callers)"
            )),
            _ => {}
        }
        if let Some(san) = &caller.san {
            check_name(problems, &format!("{at}.san"), san);
            if !mtls {
                problems.push(format!(
                    "{at}.san: needs tls.client_ca, or no client certificate is asked for"
                ));
            }
            if let Some(first) = sans.insert(san.as_str(), i) {
                problems.push(format!("{at}.san: also the san of callers[{first}]"));
            }
        }
        if let Some(hash) = &caller.token_sha256 {
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                problems.push(format!("{at}.token_sha256: must be 64 hex digits"));
            } else if let Some(first) = tokens.insert(hash.to_ascii_lowercase(), i) {
                problems.push(format!(
                    "{at}.token_sha256: also the token of callers[{first}]"
                ));
            }
        }
        if caller.scopes.is_empty() {
            problems.push(format!(
                "{at}.scopes: must list at least one scope glob (\"*\" for all)"
            ));
        }
        for (k, glob) in caller.scopes.iter().enumerate() {
            if let Err(e) = globset::Glob::new(glob) {
                problems.push(format!("{at}.scopes[{k}]: {}", e.kind()));
            }
        }
    }
}

/// Bounds on what one caller can make the gRPC listener hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// The largest request message, decoded, in bytes.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    /// The most bytes of headers (gRPC metadata) in one call.
    #[serde(default = "default_max_header_list_size")]
    pub max_header_list_size: u32,
    /// Concurrent calls (HTTP/2 streams) per connection.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Idle connections are pinged this often.
    #[serde(default = "default_keepalive_interval", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// A ping not answered within this closes the connection.
    #[serde(default = "default_keepalive_timeout", with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// A connection older than this is sent GOAWAY.
    #[serde(default = "default_max_connection_age", with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// After `max_connection_age`, calls still running get this long.
    #[serde(default = "default_max_connection_age_grace", with = "humantime_serde")]
    pub max_connection_age_grace: Duration,
    /// Calls handled at once, on every connection together.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Entries in one `ShouldAllowBatch`.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Descriptors in one Envoy `ShouldRateLimit`.
    #[serde(default = "default_max_envoy_descriptors")]
    pub max_envoy_descriptors: usize,
    /// 0: serve every connection on one multi-threaded runtime, a worker
    /// per core. N: serve on N threads, each with its own single-threaded
    /// runtime, connections dealt to them in turn, so that a call (and on
    /// Redis, its batch and its connection) stays on one thread.
    #[serde(default)]
    pub cores: usize,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            max_connection_age: DEFAULT_MAX_CONNECTION_AGE,
            max_connection_age_grace: DEFAULT_MAX_CONNECTION_AGE_GRACE,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_batch: DEFAULT_MAX_BATCH,
            max_envoy_descriptors: DEFAULT_MAX_ENVOY_DESCRIPTORS,
            cores: 0,
        }
    }
}

fn default_max_message_size() -> usize {
    DEFAULT_MAX_MESSAGE_SIZE
}
fn default_max_header_list_size() -> u32 {
    DEFAULT_MAX_HEADER_LIST_SIZE
}
fn default_max_concurrent_streams() -> u32 {
    DEFAULT_MAX_CONCURRENT_STREAMS
}
fn default_keepalive_interval() -> Duration {
    DEFAULT_KEEPALIVE_INTERVAL
}
fn default_keepalive_timeout() -> Duration {
    DEFAULT_KEEPALIVE_TIMEOUT
}
fn default_max_connection_age() -> Duration {
    DEFAULT_MAX_CONNECTION_AGE
}
fn default_max_connection_age_grace() -> Duration {
    DEFAULT_MAX_CONNECTION_AGE_GRACE
}
fn default_max_in_flight() -> usize {
    DEFAULT_MAX_IN_FLIGHT
}
fn default_max_batch() -> usize {
    DEFAULT_MAX_BATCH
}
fn default_max_envoy_descriptors() -> usize {
    DEFAULT_MAX_ENVOY_DESCRIPTORS
}

impl GrpcConfig {
    pub(super) fn validate(&self, problems: &mut Vec<String>) {
        let ranges: [(&str, usize, usize, usize); 7] = [
            ("cores", self.cores, 0, MAX_CORES),
            ("max_message_size", self.max_message_size, 1024, 1 << 30),
            (
                "max_header_list_size",
                self.max_header_list_size as usize,
                1024,
                1 << 24,
            ),
            (
                "max_concurrent_streams",
                self.max_concurrent_streams as usize,
                1,
                1 << 20,
            ),
            ("max_in_flight", self.max_in_flight, 1, 1 << 24),
            ("max_batch", self.max_batch, 1, 1 << 20),
            (
                "max_envoy_descriptors",
                self.max_envoy_descriptors,
                1,
                1 << 20,
            ),
        ];
        for (field, value, min, max) in ranges {
            if value < min || value > max {
                problems.push(format!("grpc.{field}: must be between {min} and {max}"));
            }
        }
        let day = Duration::from_secs(24 * 3600);
        let durations = [
            ("keepalive_interval", self.keepalive_interval, day),
            ("keepalive_timeout", self.keepalive_timeout, day),
            ("max_connection_age", self.max_connection_age, 366 * day),
            (
                "max_connection_age_grace",
                self.max_connection_age_grace,
                day,
            ),
        ];
        for (field, value, max) in durations {
            if value < Duration::from_millis(10) || value > max {
                problems.push(format!(
                    "grpc.{field}: must be between 10ms and {}",
                    humantime::format_duration(max)
                ));
            }
        }
    }
}
