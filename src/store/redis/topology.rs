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
//! timeout, so a slow Redis turns into a prompt error.

use std::future::Future;
use std::time::Duration;

use deadpool_redis::{PoolError, Runtime};
use redis::aio::ConnectionLike;
use redis::{
    Cmd, ConnectionInfo, ErrorKind, FromRedisValue, IntoConnectionInfo, Pipeline, RedisError,
    ServerErrorKind,
};

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
}

/// One request: a pipeline (one round trip to one node) or a single command
/// (which Cluster may fan out, as it does `SCRIPT LOAD` to every primary).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Request<'a> {
    Pipe(&'a Pipeline),
    Cmd(&'a Cmd),
}

/// A pool of connections to one of the three topologies.
pub(crate) enum Topology {
    Standalone(deadpool_redis::Pool),
    Sentinel(deadpool_redis::sentinel::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (mode, status) = match self {
            Self::Standalone(p) => ("standalone", p.status()),
            Self::Sentinel(p) => ("sentinel", p.status()),
            Self::Cluster(p) => ("cluster", p.status()),
        };
        f.debug_struct("Topology")
            .field("mode", &mode)
            .field("pool", &status)
            .finish()
    }
}

/// Checks that `url` is a Redis URL this build can use.
pub fn check_url(url: &str) -> Result<(), String> {
    match url.split_once("://").map(|(scheme, _)| scheme) {
        Some("redis" | "rediss") => {}
        _ => return Err("must start with redis:// or rediss://".to_owned()),
    }
    url.into_connection_info()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl Topology {
    /// Builds the pools. Connects lazily, so Tollgate starts while Redis is
    /// down and serves by its failure mode until Redis comes.
    pub(crate) fn build(config: &RedisConfig) -> Result<Self, BuildError> {
        let infos = config
            .urls
            .iter()
            .map(|u| {
                u.as_str()
                    .into_connection_info()
                    .map(|i| with_auth(i, config))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(BuildError::Url)?;
        let client = |e: RedisError| BuildError::Client(e.to_string());
        let connect = Some(config.connect_timeout);
        // The same pool settings for each topology's builder type.
        macro_rules! tuned {
            ($builder:expr) => {
                $builder
                    .max_size(config.pool_size)
                    .wait_timeout(Some(config.wait_timeout))
                    .create_timeout(connect)
                    .recycle_timeout(connect)
                    .runtime(Runtime::Tokio1)
                    .build()
                    .map_err(|e| BuildError::Client(e.to_string()))?
            };
        }
        Ok(match config.mode {
            RedisMode::Standalone => {
                let info = infos
                    .into_iter()
                    .next()
                    .ok_or_else(|| BuildError::Client("urls: none given".to_owned()))?;
                let connection = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(connect)
                    .set_response_timeout(Some(config.response_timeout));
                let manager =
                    deadpool_redis::Manager::new_with_config(info, connection).map_err(client)?;
                Self::Standalone(tuned!(deadpool_redis::Pool::builder(manager)))
            }
            RedisMode::Sentinel => {
                // The data nodes speak TLS when the sentinels do.
                let tls_mode = config.urls.iter().find_map(|u| {
                    u.starts_with("rediss://").then(|| {
                        if u.ends_with("#insecure") {
                            deadpool_redis::sentinel::TlsMode::Insecure
                        } else {
                            deadpool_redis::sentinel::TlsMode::Secure
                        }
                    })
                });
                let node = deadpool_redis::sentinel::SentinelNodeConnectionInfo {
                    tls_mode,
                    redis_connection_info: Some(deadpool_redis::RedisConnectionInfo {
                        db: 0,
                        username: config.username.clone(),
                        password: config.password.as_ref().map(|p| p.expose().to_owned()),
                        protocol: deadpool_redis::ProtocolVersion::RESP2,
                    }),
                };
                let manager = deadpool_redis::sentinel::Manager::new(
                    config.urls.iter().map(String::as_str).collect(),
                    config.master_name.clone().unwrap_or_default(),
                    Some(node),
                    deadpool_redis::sentinel::SentinelServerType::Master,
                )
                .map_err(client)?;
                Self::Sentinel(tuned!(deadpool_redis::sentinel::Pool::builder(manager)))
            }
            RedisMode::Cluster => {
                // One cluster connection already multiplexes over every node;
                // a few cover many concurrent decisions.
                let manager =
                    deadpool_redis::cluster::Manager::new(infos, false).map_err(client)?;
                Self::Cluster(tuned!(deadpool_redis::cluster::Pool::builder(manager)))
            }
        })
    }

    /// True for Cluster, where one script call must stay within one slot.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Sends `request` on a pooled connection, bounded by `timeout`.
    pub(crate) async fn call<T: FromRedisValue>(
        &self,
        request: Request<'_>,
        timeout: Duration,
    ) -> Result<T, CallError> {
        match self {
            Self::Standalone(p) => call(p, request, timeout).await,
            Self::Sentinel(p) => call(p, request, timeout).await,
            Self::Cluster(p) => call(p, request, timeout).await,
        }
    }

    /// Drops every idle connection, after one said `READONLY`: they may all
    /// point at a demoted primary. New ones ask the sentinels again.
    pub(crate) fn forget_connections(&self) {
        match self {
            Self::Standalone(p) => p.forget_idle(),
            Self::Sentinel(p) => p.forget_idle(),
            Self::Cluster(p) => p.forget_idle(),
        }
    }
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

/// True for an error after which the connection should not be reused.
pub(crate) fn poisons_connection(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
}

/// What the three pools have in common.
trait Pooled {
    type Conn: ConnectionLike + Send;
    fn checkout(&self) -> impl Future<Output = Result<Self::Conn, PoolError>> + Send;
    /// Takes a connection out of the pool for good.
    fn discard(conn: Self::Conn);
    fn forget_idle(&self);
}

macro_rules! pooled {
    ($pool:ty, $conn:ty) => {
        impl Pooled for $pool {
            type Conn = $conn;
            fn checkout(&self) -> impl Future<Output = Result<Self::Conn, PoolError>> + Send {
                self.get()
            }
            fn discard(conn: Self::Conn) {
                drop(<$conn>::take(conn));
            }
            fn forget_idle(&self) {
                self.retain(|_, _| false);
            }
        }
    };
}

pooled!(deadpool_redis::Pool, deadpool_redis::Connection);
pooled!(
    deadpool_redis::sentinel::Pool,
    deadpool_redis::sentinel::Connection
);
pooled!(
    deadpool_redis::cluster::Pool,
    deadpool_redis::cluster::Connection
);

async fn call<P: Pooled + Sync, T: FromRedisValue>(
    pool: &P,
    request: Request<'_>,
    timeout: Duration,
) -> Result<T, CallError> {
    let mut conn = pool.checkout().await?;
    let sent = async {
        match request {
            Request::Pipe(pipe) => pipe.query_async::<T>(&mut conn).await,
            Request::Cmd(cmd) => cmd.query_async::<T>(&mut conn).await,
        }
    };
    match tokio::time::timeout(timeout, sent).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(e)) => {
            if poisons_connection(&e) {
                P::discard(conn);
                if e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly) {
                    pool.forget_idle();
                }
            }
            Err(CallError::Redis(e))
        }
        Err(_) => Err(CallError::Timeout(timeout)),
    }
}
