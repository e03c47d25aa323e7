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

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use deadpool_redis::{PoolError, Runtime};
use redis::aio::ConnectionLike;
use redis::{
    Cmd, ConnectionInfo, ErrorKind, FromRedisValue, IntoConnectionInfo, RedisError, ServerErrorKind,
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
}

/// One request: a single command (which Cluster routes by its keys, or fans
/// out, as it does `SCRIPT LOAD` to every primary). A batch of charges is one
/// command, so there is no pipeline.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Request<'a> {
    Cmd(&'a Cmd),
}

/// Connections to one of the three topologies.
pub(crate) enum Topology {
    Standalone(Lanes<deadpool_redis::Pool>),
    Sentinel(Lanes<deadpool_redis::sentinel::Pool>),
    Cluster(Lanes<deadpool_redis::cluster::Pool>),
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (mode, status) = match self {
            Self::Standalone(l) => ("standalone", l.pool.status()),
            Self::Sentinel(l) => ("sentinel", l.pool.status()),
            Self::Cluster(l) => ("cluster", l.pool.status()),
        };
        f.debug_struct("Topology")
            .field("mode", &mode)
            .field("pool", &status)
            .finish()
    }
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
/// must parse, and only a standalone server can use it (deadpool-redis
/// builds Sentinel's and Cluster's node connections itself, without a way to
/// pass a CA; there, add the CA to the system's roots, e.g. `SSL_CERT_FILE`).
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
fn sentinel_node(config: &RedisConfig) -> deadpool_redis::sentinel::SentinelNodeConnectionInfo {
    // The data nodes speak TLS when the sentinels do.
    let tls_mode = config.urls.iter().find_map(|u| {
        u.starts_with("rediss://").then(|| {
            if u.ends_with("#insecure") || config.tls.danger_accept_invalid_certificates {
                deadpool_redis::sentinel::TlsMode::Insecure
            } else {
                deadpool_redis::sentinel::TlsMode::Secure
            }
        })
    });
    deadpool_redis::sentinel::SentinelNodeConnectionInfo {
        tls_mode,
        redis_connection_info: Some(deadpool_redis::RedisConnectionInfo {
            db: 0,
            username: config.username.clone(),
            password: config.password.as_ref().map(|p| p.expose().to_owned()),
            protocol: deadpool_redis::ProtocolVersion::RESP2,
        }),
    }
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
        let infos = config
            .urls
            .iter()
            .map(|u| {
                u.as_str()
                    .into_connection_info()
                    .and_then(|i| with_tls(with_auth(i, config), config))
                    .map(with_nodelay)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(BuildError::Url)?;
        let client = |e: RedisError| BuildError::Client(e.to_string());
        let connect = Some(config.connect_timeout);
        let lanes = config.pool_size.max(1);
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
                Self::Standalone(Lanes::new(
                    tuned!(deadpool_redis::Pool::builder(manager)),
                    lanes,
                ))
            }
            RedisMode::Sentinel => {
                let manager = deadpool_redis::sentinel::Manager::new(
                    sentinel_infos(config)?,
                    config.master_name.clone().unwrap_or_default(),
                    Some(sentinel_node(config)),
                    deadpool_redis::sentinel::SentinelServerType::Master,
                )
                .map_err(client)?;
                Self::Sentinel(Lanes::new(
                    tuned!(deadpool_redis::sentinel::Pool::builder(manager)),
                    lanes,
                ))
            }
            RedisMode::Cluster => {
                // One cluster connection already multiplexes over every node;
                // a few cover many concurrent decisions.
                let manager =
                    deadpool_redis::cluster::Manager::new(infos, false).map_err(client)?;
                Self::Cluster(Lanes::new(
                    tuned!(deadpool_redis::cluster::Pool::builder(manager)),
                    lanes,
                ))
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
            Self::Standalone(l) => l.call(request, timeout).await,
            Self::Sentinel(l) => l.call(request, timeout).await,
            Self::Cluster(l) => l.call(request, timeout).await,
        }
    }
}

/// Turns Nagle's algorithm off: redis-rs leaves it on, and a small script
/// call written while an earlier one is unacknowledged would wait for the
/// delayed ACK. (Sentinel's data-node settings, built by deadpool-redis, have
/// no TCP field; there a batch waits for the previous reply, so Nagle rarely
/// holds one back.)
fn with_nodelay(info: ConnectionInfo) -> ConnectionInfo {
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    info.set_tcp_settings(tcp)
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
pub(crate) trait Pooled: Send + Sync {
    /// A pooled connection, holding its place in the pool.
    type Conn: Send;
    /// A clone of the multiplexed connection inside, for one call.
    type Handle: ConnectionLike + Clone + Send;
    fn checkout(&self) -> impl Future<Output = Result<Self::Conn, PoolError>> + Send;
    fn handle(conn: &Self::Conn) -> Self::Handle;
    /// Takes a connection out of the pool for good.
    fn discard(conn: Self::Conn);
    fn forget_idle(&self);
}

macro_rules! pooled {
    ($pool:ty, $conn:ty, $handle:ty) => {
        impl Pooled for $pool {
            type Conn = $conn;
            type Handle = $handle;
            fn checkout(&self) -> impl Future<Output = Result<Self::Conn, PoolError>> + Send {
                self.get()
            }
            fn handle(conn: &Self::Conn) -> Self::Handle {
                <$handle>::clone(conn)
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

pooled!(
    deadpool_redis::Pool,
    deadpool_redis::Connection,
    redis::aio::MultiplexedConnection
);
pooled!(
    deadpool_redis::sentinel::Pool,
    deadpool_redis::sentinel::Connection,
    redis::aio::MultiplexedConnection
);
pooled!(
    deadpool_redis::cluster::Pool,
    deadpool_redis::cluster::Connection,
    redis::cluster_async::ClusterConnection
);

/// Connections held out of the pool and shared.
///
/// deadpool-redis pings (`UNWATCH` + `PING`) every connection it hands out,
/// which would make each decision two round trips. So each lane keeps one
/// connection checked out, and every call clones its multiplexed handle:
/// a decision is one round trip, and concurrent calls pipeline over the
/// lanes' connections. The pool still creates connections, within its
/// timeouts. A lane whose connection fails is emptied, discarding the
/// connection, and refilled from the pool by the next call that lands on it.
pub(crate) struct Lanes<P: Pooled> {
    pool: P,
    lanes: Box<[Lane<P>]>,
    next: AtomicUsize,
}

struct Lane<P: Pooled> {
    /// The held connection, its handle, and a generation that tells a
    /// failing call whether the connection it used is still the held one.
    held: parking_lot::Mutex<Option<Held<P>>>,
    generation: AtomicU64,
    /// Only one call refills a lane; the others wait for its connection
    /// rather than take more from the pool. Held across a connect, so async.
    filling: tokio::sync::Mutex<()>,
    /// Failed refills so far. A call that waited on `filling` while a refill
    /// failed fails at once instead of trying its own connect: against a
    /// dead Redis, a queue of waiters would otherwise pay one connect
    /// timeout each, in turn, before the breaker could open.
    fill_failures: AtomicU64,
}

/// A lane's connection: `(generation, pooled connection, handle)`.
type Held<P> = (u64, <P as Pooled>::Conn, <P as Pooled>::Handle);

impl<P: Pooled> Lanes<P> {
    fn new(pool: P, lanes: usize) -> Self {
        Self {
            pool,
            lanes: (0..lanes)
                .map(|_| Lane {
                    held: parking_lot::Mutex::new(None),
                    generation: AtomicU64::new(0),
                    filling: tokio::sync::Mutex::new(()),
                    fill_failures: AtomicU64::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    async fn call<T: FromRedisValue>(
        &self,
        request: Request<'_>,
        timeout: Duration,
    ) -> Result<T, CallError> {
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        let lane = &self.lanes[at];
        let (generation, mut conn) = match lane.current() {
            Some(held) => held,
            None => lane.fill(&self.pool).await?,
        };
        let sent = async {
            match request {
                Request::Cmd(cmd) => cmd.query_async::<T>(&mut conn).await,
            }
        };
        match tokio::time::timeout(timeout, sent).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                if e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly) {
                    self.forget_all();
                } else if poisons_connection(&e) {
                    lane.empty(Some(generation));
                }
                Err(CallError::Redis(e))
            }
            // A slow answer is not a broken connection: keep it.
            Err(_) => Err(CallError::Timeout(timeout)),
        }
    }

    fn forget_all(&self) {
        for lane in self.lanes.iter() {
            lane.empty(None);
        }
        self.pool.forget_idle();
    }
}

impl<P: Pooled> Lane<P> {
    fn current(&self) -> Option<(u64, P::Handle)> {
        self.held
            .lock()
            .as_ref()
            .map(|(generation, _, handle)| (*generation, handle.clone()))
    }

    async fn fill(&self, pool: &P) -> Result<(u64, P::Handle), CallError> {
        let failures = self.fill_failures.load(Ordering::Acquire);
        let _filling = self.filling.lock().await;
        if let Some(held) = self.current() {
            return Ok(held);
        }
        if self.fill_failures.load(Ordering::Acquire) != failures {
            return Err(CallError::ConnectJustFailed);
        }
        let conn = match pool.checkout().await {
            Ok(conn) => conn,
            Err(e) => {
                self.fill_failures.fetch_add(1, Ordering::Release);
                return Err(e.into());
            }
        };
        let handle = P::handle(&conn);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.held.lock() = Some((generation, conn, handle.clone()));
        Ok((generation, handle))
    }

    /// Discards the held connection: any, or only the given generation.
    fn empty(&self, generation: Option<u64>) {
        let taken = {
            let mut held = self.held.lock();
            match (&*held, generation) {
                (Some((current, _, _)), Some(g)) if *current != g => None,
                _ => held.take(),
            }
        };
        if let Some((_, conn, _)) = taken {
            P::discard(conn);
        }
    }
}
