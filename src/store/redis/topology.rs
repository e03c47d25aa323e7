//! The three ways to reach Redis — standalone, Sentinel, Cluster — behind one
//! pooled, time-bounded call.
//!
//! - Standalone: one pool of multiplexed connections to the server.
//! - Sentinel: each new connection asks the sentinels for the current
//!   primary, so a failover is followed without a restart. A connection that
//!   answers `READONLY` points at a demoted primary: it is discarded, with
//!   every idle one, and the next connection finds the new primary.
//! - Cluster: redis-rs's cluster connection follows `MOVED`/`ASK` and
//!   refreshes its slot map on topology changes.
//!
//! deadpool has no timeouts by default: the pool's wait and create timeouts
//! bound getting a connection, and every call is bounded by the response
//! timeout, so a slow Redis turns into a prompt error. Connections are held
//! in [`Lanes`] rather than checked out per call, because deadpool pings
//! each connection it hands out: that would be a second round trip.
//!
//! # Silent failures
//! A primary that stops answering without closing its sockets (SIGSTOP, a
//! lost host, a partition that drops packets) would otherwise be kept for
//! good: a timeout says nothing about the connection. So every socket has
//! `TCP_NODELAY`, TCP keepalive and `TCP_USER_TIMEOUT`, and a lane whose
//! connection timed out [`TIMEOUTS_TO_DROP`] times in a row drops it; the
//! next connection asks the sentinels again (or the cluster's slot map).
//! Refilling a lane is bounded by the caller's timeout too, so a decision
//! never waits for a whole connect timeout.
//!
//! Sentinel and Cluster connections are made by the redis client directly
//! (deadpool's managers cannot pass TCP settings, nor turn off the Cluster
//! client's retries; see `cluster.rs` for why those must be off).

use std::future::Future;
use std::time::Duration;

use deadpool_redis::{PoolError, Runtime};
use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
use redis::{
    Cmd, ConnectionInfo, ErrorKind, FromRedisValue, IntoConnectionInfo, RedisError, RedisResult,
};

use super::lanes::{ClusterConnector, Lanes, SentinelConnector};
use crate::config::{RedisConfig, RedisMode};

/// Why a call to Redis failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// No connection within the wait and connect timeouts.
    #[error("no Redis connection: {0}")]
    Pool(#[from] PoolError),
    /// Redis did not answer within the response timeout.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis or the connection reported an error.
    #[error("Redis: {0}")]
    Redis(#[from] RedisError),
    /// Another call's connect to this lane failed while this one waited.
    #[error("no Redis connection: a connect attempt just failed")]
    ConnectJustFailed,
}

/// Why the store could not be built from its config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A URL could not be read.
    #[error("store.redis.urls: {0}")]
    Url(RedisError),
    /// The client or pool rejected the settings.
    #[error("store.redis: {0}")]
    Client(String),
    /// Redis may evict Tollgate's keys, and the config says to refuse.
    #[error("store.redis.on_evicting_policy: {0}")]
    EvictingPolicy(String),
}

/// One request: a single command (which Cluster routes by its keys, or fans
/// out, as it does `SCRIPT LOAD` to every primary). A batch of charges is one
/// command, so there is no pipeline.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Request<'a> {
    Cmd(&'a Cmd),
}

/// Consecutive timeouts after which a lane drops its connection.
pub(crate) const TIMEOUTS_TO_DROP: u32 = 2;

/// Connections to one of the three topologies.
pub(crate) enum Topology {
    Standalone(Lanes<deadpool_redis::Pool>),
    Sentinel(Lanes<SentinelConnector>),
    Cluster(Lanes<ClusterConnector>),
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (mode, lanes) = match self {
            Self::Standalone(l) => ("standalone", l.len()),
            Self::Sentinel(l) => ("sentinel", l.len()),
            Self::Cluster(l) => ("cluster", l.len()),
        };
        f.debug_struct("Topology")
            .field("mode", &mode)
            .field("lanes", &lanes)
            .finish()
    }
}

/// The socket settings of every connection to Redis: no Nagle (a decision
/// is one small write that must not wait for an ACK), keepalive probes, and
/// a user timeout, so the kernel gives up on a peer that stopped
/// acknowledging within about a second instead of after many minutes.
pub(crate) fn tcp_settings(config: &RedisConfig) -> TcpSettings {
    let user_timeout = (config.response_timeout * 4).max(Duration::from_secs(1));
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(
            TcpKeepalive::new()
                .with_time(Duration::from_secs(1))
                .with_interval(Duration::from_secs(1))
                .with_retries(3),
        )
        .set_user_timeout(user_timeout)
}

/// Checks that `url` is a Redis URL this build can use.
pub(crate) fn check_url(url: &str) -> Result<(), String> {
    match url.split_once("://").map(|(scheme, _)| scheme) {
        Some("redis" | "rediss") => {}
        _ => return Err("must start with redis:// or rediss://".to_owned()),
    }
    url.into_connection_info()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Checks `store.redis.tls` against what this build can do: the CA file
/// must parse, and only a standalone server can use it (the Sentinel and
/// Cluster clients connect to the nodes the servers name, and take no CA
/// for those connections; there, add the CA to the system's roots, e.g.
/// `SSL_CERT_FILE`).
pub(crate) fn check_tls(config: &RedisConfig, problems: &mut Vec<String>) {
    if config.tls.ca_file.is_none() {
        return;
    }
    if config.mode != RedisMode::Standalone {
        problems.push(
            "store.redis.tls.ca_file: only standalone mode supports it; for sentinel and \
             cluster, add the CA to the system's roots (SSL_CERT_FILE)"
                .to_owned(),
        );
        return;
    }
    for (i, url) in config.urls.iter().enumerate() {
        if let Err(e) = url
            .as_str()
            .into_connection_info()
            .and_then(|info| with_tls(info, config))
        {
            problems.push(format!("store.redis.urls[{i}]: with tls.ca_file: {e}"));
        }
    }
}

/// How to reach the data nodes that the sentinels name.
fn sentinel_node(config: &RedisConfig) -> redis::sentinel::SentinelNodeConnectionInfo {
    let mut redis_info = redis::RedisConnectionInfo::default();
    if let Some(user) = &config.username {
        redis_info = redis_info.set_username(user);
    }
    if let Some(password) = &config.password {
        redis_info = redis_info.set_password(password.expose());
    }
    let mut node = redis::sentinel::SentinelNodeConnectionInfo::default()
        .set_redis_connection_info(redis_info)
        .set_tcp_settings(tcp_settings(config));
    // The data nodes speak TLS when the sentinels do.
    if let Some(u) = config.urls.iter().find(|u| u.starts_with("rediss://")) {
        node = node.set_tls_mode(
            if u.ends_with("#insecure") || config.tls.danger_accept_invalid_certificates {
                redis::TlsMode::Insecure
            } else {
                redis::TlsMode::Secure
            },
        );
    }
    node
}

/// The sentinels' own connection info: their credentials, and TLS settings.
fn sentinel_infos(config: &RedisConfig) -> Result<Vec<ConnectionInfo>, BuildError> {
    config
        .urls
        .iter()
        .map(|u| {
            let info = with_tls(u.as_str().into_connection_info()?, config)?;
            let mut settings = info.redis_settings().clone();
            if let Some(user) = &config.sentinel_username {
                settings = settings.set_username(user);
            }
            if let Some(password) = &config.sentinel_password {
                settings = settings.set_password(password.expose());
            }
            Ok(info.set_redis_settings(settings))
        })
        .collect::<Result<_, RedisError>>()
        .map_err(BuildError::Url)
}

/// Applies `store.redis.tls` to a `rediss://` address: the CA file to trust
/// instead of the system's roots, or (loudly named) no verification at all.
fn with_tls(info: ConnectionInfo, config: &RedisConfig) -> Result<ConnectionInfo, RedisError> {
    let redis::ConnectionAddr::TcpTls {
        host,
        port,
        insecure,
        tls_params,
    } = info.addr().clone()
    else {
        return Ok(info);
    };
    let insecure = insecure || config.tls.danger_accept_invalid_certificates;
    let info = info.set_addr(redis::ConnectionAddr::TcpTls {
        host,
        port,
        insecure,
        tls_params,
    });
    match &config.tls.ca_file {
        Some(ca) if !insecure => {
            let root_cert = std::fs::read(ca).map_err(|e| {
                RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "store.redis.tls.ca_file",
                    format!("cannot read {}: {e}", ca.display()),
                ))
            })?;
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            };
            Ok(redis::Client::build_with_tls(info, certs)?
                .get_connection_info()
                .clone())
        }
        _ => Ok(info),
    }
}

impl Topology {
    /// Builds the pools. Connects lazily, so Tollgate starts while Redis is
    /// down and serves by its failure mode until Redis comes.
    pub(crate) fn build(config: &RedisConfig) -> Result<Self, BuildError> {
        let tcp = tcp_settings(config);
        let infos = node_infos(config)?;
        let client = |e: RedisError| BuildError::Client(e.to_string());
        let connect = Some(config.connect_timeout);
        let lanes = config.pool_size.max(1);
        let connection = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(connect)
            .set_response_timeout(Some(config.response_timeout));
        Ok(match config.mode {
            RedisMode::Standalone => {
                let info = infos
                    .into_iter()
                    .next()
                    .ok_or_else(|| BuildError::Client("urls: none given".to_owned()))?;
                let manager =
                    deadpool_redis::Manager::new_with_config(info, connection).map_err(client)?;
                let pool = deadpool_redis::Pool::builder(manager)
                    .max_size(config.pool_size)
                    .wait_timeout(Some(config.wait_timeout))
                    .create_timeout(connect)
                    .recycle_timeout(connect)
                    .runtime(Runtime::Tokio1)
                    .build()
                    .map_err(|e| BuildError::Client(e.to_string()))?;
                Self::Standalone(Lanes::new(pool, lanes))
            }
            RedisMode::Sentinel => Self::Sentinel(Lanes::new(
                SentinelConnector {
                    client: tokio::sync::Mutex::new(sentinel_client(config)?),
                    connection,
                },
                lanes,
            )),
            RedisMode::Cluster => {
                // Retries off: the client would resend a whole request after
                // a redirect or a dropped connection, possibly after the
                // script ran. `cluster.rs` follows MOVED and ASK itself.
                // No response timeout inside the client either: it treats
                // one as a broken node and reconnects, and while it does,
                // it holds every other node's calls too. Our own timeout
                // bounds each call; the slot breakers fail a silent
                // node's calls fast.
                let cluster = redis::cluster::ClusterClientBuilder::new(infos)
                    .retries(0)
                    .tcp_settings(tcp)
                    .connection_timeout(config.connect_timeout)
                    .build()
                    .map_err(client)?;
                // One cluster connection multiplexes over every node, with a
                // connection per node that it remakes by itself.
                let mut lanes = Lanes::new(ClusterConnector { client: cluster }, 1);
                lanes.drop_on_errors = false;
                Self::Cluster(lanes)
            }
        })
    }

    /// True for Cluster, where one script call must stay within one slot.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Sends `request` on a pooled connection, bounded by `timeout` (and
    /// so is getting the connection, if its lane is empty).
    pub(crate) async fn call<T: FromRedisValue>(
        &self,
        request: Request<'_>,
        timeout: Duration,
    ) -> Result<T, CallError> {
        match self {
            Self::Standalone(l) => l.call(request, timeout).await,
            Self::Sentinel(l) => l.call(request, timeout).await,
            Self::Cluster(l) => l.call(request, timeout).await,
        }
    }

    /// Runs `f` on a Cluster connection, bounded by `timeout`, with the
    /// lanes' bookkeeping (timeouts and broken connections drop it).
    /// `None` unless this is a Cluster.
    pub(crate) async fn with_cluster<T, F, Fut>(
        &self,
        timeout: Duration,
        f: F,
    ) -> Option<Result<T, CallError>>
    where
        F: FnOnce(redis::cluster_async::ClusterConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        match self {
            Self::Cluster(l) => Some(l.run(timeout, f).await),
            _ => None,
        }
    }

    /// Connects every empty lane, each bounded by `timeout`. The prober
    /// calls it, so lanes refill even when decisions' short timeouts give
    /// up on a slow connect.
    pub(crate) async fn warm(&self, timeout: Duration) {
        match self {
            Self::Standalone(l) => l.warm(timeout).await,
            Self::Sentinel(l) => l.warm(timeout).await,
            Self::Cluster(l) => l.warm(timeout).await,
        }
    }

    /// Drops every connection, after one said `READONLY`: they may all
    /// point at a demoted primary. New ones ask the sentinels again.
    pub(crate) fn forget_connections(&self) {
        match self {
            Self::Standalone(l) => l.forget_all(),
            Self::Sentinel(l) => l.forget_all(),
            Self::Cluster(l) => l.forget_all(),
        }
    }
}

/// Each URL's connection info, with the config's credentials, TLS and
/// socket settings.
pub(crate) fn node_infos(config: &RedisConfig) -> Result<Vec<ConnectionInfo>, BuildError> {
    let tcp = tcp_settings(config);
    config
        .urls
        .iter()
        .map(|u| {
            u.as_str()
                .into_connection_info()
                .and_then(|i| with_tls(with_auth(i, config), config))
                .map(|i| i.set_tcp_settings(tcp.clone()))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(BuildError::Url)
}

/// A client that asks the sentinels for the current primary.
pub(crate) fn sentinel_client(
    config: &RedisConfig,
) -> Result<redis::sentinel::SentinelClient, BuildError> {
    let tcp = tcp_settings(config);
    let sentinels = sentinel_infos(config)?
        .into_iter()
        .map(|i| i.set_tcp_settings(tcp.clone()))
        .collect();
    redis::sentinel::SentinelClient::build(
        sentinels,
        config.master_name.clone().unwrap_or_default(),
        Some(sentinel_node(config)),
        redis::sentinel::SentinelServerType::Master,
    )
    .map_err(|e| BuildError::Client(e.to_string()))
}

fn with_auth(info: ConnectionInfo, config: &RedisConfig) -> ConnectionInfo {
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &config.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &config.password {
        settings = settings.set_password(password.expose());
    }
    info.set_redis_settings(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_socket_has_nodelay_keepalive_and_a_user_timeout() {
        let config = RedisConfig {
            response_timeout: Duration::from_millis(50),
            ..RedisConfig::default()
        };
        let tcp = tcp_settings(&config);
        assert!(tcp.nodelay(), "Nagle would hold a decision for an ACK");
        assert!(tcp.keepalive().is_some());
        assert_eq!(tcp.user_timeout(), Some(Duration::from_secs(1)));
    }
}
