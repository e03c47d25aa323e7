//! The lanes: a few connections held open per topology, each call bounded
//! in time, each connection dropped after a poisoning error or repeated
//! timeouts.
//!
//! Connections are held in [`Lanes`] rather than checked out of the pool
//! per call, because deadpool pings each connection it hands out: that
//! would be a second round trip. A lane whose connection timed out
//! [`TIMEOUTS_TO_DROP`] times in a row drops it, so a primary that went
//! silent without closing its sockets is not kept for good; refilling a lane
//! is bounded by the caller's timeout too. The pools behind the lanes
//! ([`Pooled`]) are deadpool's for standalone, and the redis client's own
//! connections for Sentinel and Cluster (see `topology.rs`).

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{ErrorKind, FromRedisValue, RedisError, RedisResult, ServerErrorKind};

use super::topology::{CallError, Request, TIMEOUTS_TO_DROP};

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
    fn checkout(&self) -> impl Future<Output = Result<Self::Conn, CallError>> + Send;
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
            async fn checkout(&self) -> Result<Self::Conn, CallError> {
                Ok(self.get().await?)
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

/// Makes Sentinel connections: each asks the sentinels for the primary.
pub(crate) struct SentinelConnector {
    /// The client needs `&mut` to ask; held across that, so async.
    pub(super) client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    pub(super) connection: redis::AsyncConnectionConfig,
}

impl Pooled for SentinelConnector {
    type Conn = redis::aio::MultiplexedConnection;
    type Handle = redis::aio::MultiplexedConnection;
    async fn checkout(&self) -> Result<Self::Conn, CallError> {
        let mut client = self.client.lock().await;
        Ok(client
            .get_async_connection_with_config(&self.connection)
            .await?)
    }
    fn handle(conn: &Self::Conn) -> Self::Handle {
        conn.clone()
    }
    fn discard(conn: Self::Conn) {
        drop(conn);
    }
    fn forget_idle(&self) {}
}

/// Makes Cluster connections, with the client's retries off.
pub(crate) struct ClusterConnector {
    pub(super) client: redis::cluster::ClusterClient,
}

impl Pooled for ClusterConnector {
    type Conn = redis::cluster_async::ClusterConnection;
    type Handle = redis::cluster_async::ClusterConnection;
    async fn checkout(&self) -> Result<Self::Conn, CallError> {
        Ok(self.client.get_async_connection().await?)
    }
    fn handle(conn: &Self::Conn) -> Self::Handle {
        conn.clone()
    }
    fn discard(conn: Self::Conn) {
        drop(conn);
    }
    fn forget_idle(&self) {}
}

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
    /// Drop a connection after [`TIMEOUTS_TO_DROP`] timeouts in a row, or
    /// an error that breaks it. Not on Cluster: its one connection spans
    /// every node and reconnects to each by itself, and one silent or dead
    /// node must not cost the live ones their connection (making a new one
    /// waits on every node, the dead one included). The slot breakers fail
    /// the dead node's calls fast instead.
    pub(super) drop_on_errors: bool,
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
    /// Timeouts in a row on the held connection. A connection to a peer
    /// that went silent never errors by itself; this drops it.
    timeouts: std::sync::atomic::AtomicU32,
}

/// A lane's connection: `(generation, pooled connection, handle, the core
/// whose runtime made it)`.
type Held<P> = (u64, <P as Pooled>::Conn, <P as Pooled>::Handle, Option<u16>);

impl<P: Pooled> Lanes<P> {
    /// How many lanes there are.
    pub(super) fn len(&self) -> usize {
        self.lanes.len()
    }

    pub(super) fn new(pool: P, lanes: usize) -> Self {
        Self {
            drop_on_errors: true,
            pool,
            lanes: (0..lanes)
                .map(|_| Lane {
                    held: parking_lot::Mutex::new(None),
                    generation: AtomicU64::new(0),
                    filling: tokio::sync::Mutex::new(()),
                    fill_failures: AtomicU64::new(0),
                    timeouts: std::sync::atomic::AtomicU32::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub(super) async fn call<T: FromRedisValue>(
        &self,
        request: Request<'_>,
        timeout: Duration,
    ) -> Result<T, CallError> {
        self.run(timeout, |mut conn| async move {
            match request {
                Request::Cmd(cmd) => cmd.query_async::<T>(&mut conn).await,
            }
        })
        .await
    }

    /// Runs `f` on a lane's connection, filling the lane first if it is
    /// empty; both bounded by `timeout`.
    pub(super) async fn run<T, F, Fut>(&self, timeout: Duration, f: F) -> Result<T, CallError>
    where
        F: FnOnce(P::Handle) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let started = tokio::time::Instant::now();
        // A thread pinned to a core keeps to its own lane, with a
        // connection it made, so the connection's driver task runs on its
        // own runtime. With more cores than lanes, the rest share.
        let pinned =
            crate::store::affinity::current().filter(|&c| usize::from(c) < self.lanes.len());
        let at = match pinned {
            Some(core) => usize::from(core),
            None => self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len(),
        };
        let lane = &self.lanes[at];
        let (generation, conn) = match lane.current(pinned) {
            Some(held) => held,
            None => tokio::time::timeout(timeout, lane.fill(&self.pool, pinned))
                .await
                .map_err(|_| CallError::Timeout(timeout))??,
        };
        let left = timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, f(conn)).await {
            Ok(Ok(reply)) => {
                lane.timeouts.store(0, Ordering::Relaxed);
                Ok(reply)
            }
            Ok(Err(e)) => {
                let readonly = e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly);
                if self.drop_on_errors && readonly {
                    self.forget_all();
                } else if self.drop_on_errors && poisons_connection(&e) {
                    lane.empty(Some(generation));
                }
                Err(CallError::Redis(e))
            }
            Err(_) => {
                // One slow answer is not a broken connection; several in a
                // row are a peer that went silent.
                if self.drop_on_errors
                    && lane.timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= TIMEOUTS_TO_DROP
                {
                    lane.empty(Some(generation));
                }
                Err(CallError::Timeout(timeout))
            }
        }
    }

    pub(super) async fn warm(&self, timeout: Duration) {
        for lane in self.lanes.iter().filter(|l| l.current(None).is_none()) {
            if tokio::time::timeout(timeout, lane.fill(&self.pool, None))
                .await
                .is_err()
            {
                return;
            }
        }
    }

    pub(super) fn forget_all(&self) {
        for lane in self.lanes.iter() {
            lane.empty(None);
        }
        self.pool.forget_idle();
    }
}

impl<P: Pooled> Lane<P> {
    /// The held connection, for any caller; for one pinned to `core`, only
    /// a connection that core made.
    fn current(&self, core: Option<u16>) -> Option<(u64, P::Handle)> {
        self.held
            .lock()
            .as_ref()
            .filter(|held| core.is_none() || held.3 == core)
            .map(|(generation, _, handle, _)| (*generation, handle.clone()))
    }

    /// Fills the lane, or for a caller pinned to `core`, replaces a
    /// connection another runtime made with one of its own.
    async fn fill(&self, pool: &P, core: Option<u16>) -> Result<(u64, P::Handle), CallError> {
        let failures = self.fill_failures.load(Ordering::Acquire);
        let _filling = self.filling.lock().await;
        if let Some(held) = self.current(core) {
            return Ok(held);
        }
        if self.fill_failures.load(Ordering::Acquire) != failures {
            return Err(CallError::ConnectJustFailed);
        }
        // A connection another runtime made is let go first (taken out of
        // the pool, freeing its place for this core's); calls already on it
        // finish.
        if let Some((_, old, _, _)) = self.held.lock().take() {
            P::discard(old);
        }
        let conn = match pool.checkout().await {
            Ok(conn) => conn,
            Err(e) => {
                self.fill_failures.fetch_add(1, Ordering::Release);
                return Err(e);
            }
        };
        let handle = P::handle(&conn);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let made_by = crate::store::affinity::current();
        *self.held.lock() = Some((generation, conn, handle.clone(), made_by));
        Ok((generation, handle))
    }

    /// Discards the held connection: any, or only the given generation.
    fn empty(&self, generation: Option<u64>) {
        let taken = {
            let mut held = self.held.lock();
            match (&*held, generation) {
                (Some((current, _, _, _)), Some(g)) if *current != g => None,
                _ => held.take(),
            }
        };
        if let Some((_, conn, _, _)) = taken {
            self.timeouts.store(0, Ordering::Relaxed);
            P::discard(conn);
        }
    }
}
