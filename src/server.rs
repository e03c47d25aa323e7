//! Builds the store and services from a prepared config, and serves until
//! shut down.
//!
//! [`Prepared::load`] does everything that can refuse a config (parse,
//! validate, compile the rules, check the store's settings) before any port
//! is bound. [`run`] takes the result with a bound listener and a control
//! channel, so tests drive it on `127.0.0.1:0` exactly as `main` does on the
//! configured address. The stop sequence itself lives in [`crate::shutdown`],
//! and the reload procedure and its snapshot in [`crate::reload`].

mod cores;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_server::RateLimitQuotaServiceServer;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::layer::util::{Identity, Stack};

use crate::api::{AdminApi, EnvoyRateLimitApi, LeasesApi, QuotaApi, RateLimiterApi, Settings};
use crate::config::{Config, ConfigError, GrpcConfig};
use crate::limiter::{Limiter, Signer};
use crate::net::bounds::InFlightLimitLayer;
use crate::net::cancel::Cancellable;
use crate::net::tls::{self, Conn, Tls};
use crate::observe::Observer;
use crate::observe::hitters::{Hitters, Sizes};
use crate::observe::metrics::Metrics;
use crate::observe::status::Board;
use crate::pb;
use crate::pb::tollgate::v1::admin_server::AdminServer;
use crate::pb::tollgate::v1::leases_server::LeasesServer;
use crate::pb::tollgate::v1::rate_limiter_server::RateLimiterServer;
pub use crate::reload::Prepared;
use crate::reload::{self, Reloader};
use crate::shutdown::{self, Control};
use crate::store::{self, BuildError, PenaltyAnswer, PenaltyOp, Served, Store};
use crate::watch::FileWatch;

/// The health service name that tracks readiness, besides the empty name.
/// It is also NOT_SERVING while the store is unavailable (the Redis circuit
/// is open); the empty name stays SERVING then, because Tollgate still
/// answers, by each scope's failure mode.
pub const HEALTH_SERVICE: &str = "tollgate.v1.RateLimiter";

/// How often health re-reads the store's availability.
pub const STORE_HEALTH_INTERVAL: Duration = Duration::from_millis(200);

/// The limiter every service shares, with the reload snapshot it holds.
type SharedLimiter = Arc<Limiter<Served<Metrics>, Settings>>;

/// The gRPC router, behind the in-flight cap.
type Routes = Router<Stack<InFlightLimitLayer, Identity>>;

/// Reset streams that one connection may cause before it is sent GOAWAY:
/// a client that keeps opening streams past `max_concurrent_streams` (each
/// refused with REFUSED_STREAM) is cut off. hyper's default through tonic
/// is no limit at all.
pub const MAX_LOCAL_RESET_STREAMS: usize = 1024;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A listener could not be bound.
    #[error("bind: {0}")]
    Bind(std::io::Error),
    /// Reflection could not be built from the descriptors.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A core's thread or runtime could not be started.
    #[error("starting a core: {0}")]
    Runtime(std::io::Error),
    /// The store could not be built (it is not connected yet, so this is
    /// about settings, never about Redis being down).
    #[error(transparent)]
    Store(#[from] BuildError),
}

/// Serves `prepared` on `listener` until [`Control::Shutdown`] arrives or the
/// control channel closes, then runs the stop sequence.
pub async fn run(
    prepared: Prepared,
    listener: TcpListener,
    mut control: mpsc::Receiver<Control>,
) -> Result<(), ServerError> {
    let Prepared {
        config,
        rules,
        source,
        tls: (grpc_tls, metrics_tls),
    } = prepared;
    let metrics = Arc::new(Metrics::new());
    let store = store::build_served(&config.store, metrics.clone())?;
    store.inner().inner().inner().check_at_start().await?;
    let signer = Signer::with_secrets(&crate::reload::secrets(&config));
    let hitters = Arc::new(Hitters::new(Sizes {
        counters: config.analytics.counters,
        top_k: config.analytics.top_k,
    }));
    let observer = Arc::new(Observer::with_hitters(metrics.clone(), hitters.clone()));
    let snapshot = reload::snapshot(&config, rules, &observer);
    let limiter: SharedLimiter =
        Arc::new(Limiter::from_generation(snapshot, store).with_signer(signer));
    let stopped = CancellationToken::new();
    for tls in [&grpc_tls, &metrics_tls].into_iter().flatten() {
        tls.spawn_reloader(stopped.clone());
    }
    let board = Arc::new(Board::new(hitters, limiter.clone(), store_kind(&config)));
    let ban_board = board.clone();
    serve_metrics(&config, &observer, &board, metrics_tls, &stopped).await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_service_status(HEALTH_SERVICE, ServingStatus::Serving)
        .await;
    let watcher = tokio::spawn(watch_store(
        limiter.clone(),
        health.clone(),
        metrics.clone(),
    ));
    let bans = tokio::spawn(watch_bans(
        limiter.clone(),
        metrics.clone(),
        ban_board.clone(),
    ));
    for name in source.iter().flat_map(|s| &s.ignored) {
        tracing::warn!("{name} ignored: it names no config section");
    }
    let mut reloader = Reloader::new(
        source,
        limiter.clone(),
        observer.clone(),
        board,
        config.clone(),
    );
    warn_if_exposed(&config);
    let router = routes(&config.grpc, &limiter, &observer, health_service)?;
    let router = router.add_service(quota_service(&config, &limiter, &observer));

    let stopping = CancellationToken::new();
    let stop = async {
        shutdown::until_shutdown(&mut control, || reloader.reload()).await;
        watcher.abort();
        bans.abort();
        let drain_delay = reloader.drain_delay();
        shutdown::drain(&health, &["", HEALTH_SERVICE], drain_delay).await;
        stopping.cancel();
    };
    let serving = cores::Serving {
        router,
        tls: grpc_tls,
        observer: observer.clone(),
        cancel: CancellationToken::new(),
        stopping: stopping.clone(),
    };
    serve(serving, listener, &config, stop).await?;
    stopped.cancel();
    tracing::info!("stopped");
    Ok(())
}

/// Serves on the shared runtime, or on a runtime per core (`grpc.cores`),
/// until `stop` ends and the calls in flight finish or the grace runs out.
async fn serve(
    serving: cores::Serving,
    listener: TcpListener,
    config: &Config,
    stop: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let grpc = &config.grpc;
    let grace = config.shutdown_grace;
    tracing::info!(addr = ?listener.local_addr().ok(), tls = serving.tls.is_some(), cores = grpc.cores, "serving");
    let (stopping, cancel) = (serving.stopping.clone(), serving.cancel.clone());
    if grpc.cores == 0 {
        let tcp = tls::incoming(listener);
        let conns = incoming(tcp, serving.tls, &serving.observer, &cancel, grpc);
        let serve = serving.router.serve_with_incoming_shutdown(conns, stop);
        shutdown::serve_with_grace(serve, stopping, cancel, grace).await?;
    } else {
        // Should this future be dropped (a test that drops its server),
        // the cores stop too.
        let _guards = (stopping.clone().drop_guard(), cancel.clone().drop_guard());
        let cores = cores::spawn(serving, listener, grpc)?;
        let serve = async move { tokio::join!(stop, cores).1 };
        shutdown::serve_with_grace(serve, stopping, cancel, grace).await?;
    }
    Ok(())
}

/// Says at start-up what an open or plaintext setup exposes.
fn warn_if_exposed(config: &Config) {
    if config.reservations.secret.is_none() && config.store.kind == crate::config::StoreKind::Redis
    {
        tracing::warn!(
            "no reservations.secret: reservations are signed with a random key of this process, so other replicas refuse them as forged"
        );
    }
    match &config.callers {
        None => tracing::warn!(
            "no callers configured: anyone who reaches the port may decide on any scope"
        ),
        Some(callers)
            if config.tls.is_none() && callers.iter().any(|c| c.token_sha256.is_some()) =>
        {
            tracing::warn!("bearer tokens without tls: anyone on the path can read and replay them")
        }
        Some(_) => {}
    }
}

/// Runs [`run`] on a background task, returning its control channel. When
/// the config came from a file and `reload.watch` is on, a change to the
/// config's files sends [`Control::Reload`] on the same channel.
pub fn spawn(
    prepared: Prepared,
    listener: TcpListener,
) -> (
    mpsc::Sender<Control>,
    tokio::task::JoinHandle<Result<(), ServerError>>,
) {
    let (tx, rx) = mpsc::channel(4);
    let watch = watch_files(&prepared, &tx);
    let serving = async move {
        let _watch = watch;
        run(prepared, listener, rx).await
    };
    (tx, tokio::spawn(serving))
}

/// Starts watching the config's files, if asked to. A watch that cannot
/// start is logged, and SIGHUP still reloads.
fn watch_files(prepared: &Prepared, control: &mpsc::Sender<Control>) -> Option<FileWatch> {
    let source = prepared.source.as_ref()?;
    let reload = &prepared.config.reload;
    if !reload.watch {
        return None;
    }
    let mut paths = vec![source.path.clone()];
    paths.extend(prepared.config.envoy_ratelimit_configs.iter().cloned());
    match crate::watch::spawn(paths, reload.debounce, control) {
        Ok(watch) => Some(watch),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config files; SIGHUP still reloads");
            None
        }
    }
}

/// The store's name on the status page: `memory`, or `redis (cluster)`.
fn store_kind(config: &Config) -> String {
    match config.store.kind {
        crate::config::StoreKind::Memory => "memory".to_owned(),
        crate::config::StoreKind::Redis => {
            format!("redis ({:?})", config.store.redis.mode).to_lowercase()
        }
    }
}

/// Every gRPC service on one port: ours, Envoy's RLS, admin, health,
/// reflection, each bounded by `grpc`, behind the in-flight cap.
fn routes(
    grpc: &GrpcConfig,
    limiter: &SharedLimiter,
    observer: &Arc<Observer>,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<Routes, ServerError> {
    let max = grpc.max_message_size;
    let descriptors = [
        pb::FILE_DESCRIPTOR_SET,
        pb::ENVOY_RLS_FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ];
    let mut v1 = tonic_reflection::server::Builder::configure();
    let mut v1alpha = tonic_reflection::server::Builder::configure();
    for set in descriptors {
        v1 = v1.register_encoded_file_descriptor_set(set);
        v1alpha = v1alpha.register_encoded_file_descriptor_set(set);
    }
    // Who may call, and what else a reload changes, each service reads
    // from the limiter's snapshot (see `crate::reload`).
    let ours =
        RateLimiterApi::new(limiter.clone(), observer.clone()).with_max_batch(grpc.max_batch);
    let envoy = EnvoyRateLimitApi::new(limiter.clone(), observer.clone())
        .with_max_descriptors(grpc.max_envoy_descriptors);
    let admin = AdminApi::new(limiter.clone(), observer.hitters.clone());
    let leases = LeasesApi::new(limiter.clone(), observer.clone());
    Ok(server_builder(grpc, &observer.metrics)
        .add_service(health_service.max_decoding_message_size(max))
        .add_service(v1.build_v1()?.max_decoding_message_size(max))
        .add_service(v1alpha.build_v1alpha()?.max_decoding_message_size(max))
        .add_service(RateLimiterServer::new(ours).max_decoding_message_size(max))
        .add_service(RateLimitServiceServer::new(envoy).max_decoding_message_size(max))
        .add_service(AdminServer::new(admin).max_decoding_message_size(max))
        .add_service(LeasesServer::new(leases).max_decoding_message_size(max)))
}

/// Envoy's quota streaming (RLQS), on the same port and grants.
fn quota_service(
    config: &Config,
    limiter: &SharedLimiter,
    observer: &Arc<Observer>,
) -> RateLimitQuotaServiceServer<QuotaApi<Served<Metrics>>> {
    let api = QuotaApi::new(limiter.clone(), config.rlqs.clone())
        .with_metrics(observer.metrics.rlqs.clone());
    RateLimitQuotaServiceServer::new(api).max_decoding_message_size(config.grpc.max_message_size)
}

/// The HTTP/2 bounds of `grpc`, and the in-flight cap.
fn server_builder(
    grpc: &GrpcConfig,
    metrics: &Arc<Metrics>,
) -> tonic::transport::Server<Stack<InFlightLimitLayer, Identity>> {
    tonic::transport::Server::builder()
        .max_concurrent_streams(grpc.max_concurrent_streams)
        .http2_max_header_list_size(grpc.max_header_list_size)
        .http2_keepalive_interval(Some(grpc.keepalive_interval))
        .http2_keepalive_timeout(Some(grpc.keepalive_timeout))
        // GOAWAY at the age; `incoming` closes the connection after the
        // grace (see `net::cancel::Cancellable`).
        .max_connection_age(grpc.max_connection_age)
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_RESET_STREAMS))
        .layer(InFlightLimitLayer::new(grpc.max_in_flight, metrics.clone()))
}

/// Binds and serves the metrics port, if configured, until `stopped`.
async fn serve_metrics(
    config: &Config,
    observer: &Arc<Observer>,
    board: &Arc<Board>,
    tls: Option<Tls>,
    stopped: &CancellationToken,
) -> Result<(), ServerError> {
    let Some(addr) = &config.metrics.listen else {
        return Ok(());
    };
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| ConfigError::one(format!("metrics.listen: {e}")))?;
    let listener = TcpListener::bind(addr).await.map_err(ServerError::Bind)?;
    tracing::info!(addr = ?listener.local_addr().ok(), tls = tls.is_some(), "serving metrics");
    let listener =
        tls::MetricsListener::new(listener, tls, observer.clone()).map_err(ServerError::Bind)?;
    let metrics = &observer.metrics;
    let (metrics, stopped) = (metrics.clone(), stopped.clone());
    let status = crate::observe::status::routes(board.clone());
    tokio::spawn(async move {
        let shutdown = async move { stopped.cancelled().await };
        if let Err(e) = crate::observe::metrics::serve(listener, metrics, status, shutdown).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok(())
}

/// Keeps [`HEALTH_SERVICE`] in step with the store's availability, logging
/// nothing itself: the store logs its own state changes.
async fn watch_store<S: Store, E>(
    limiter: Arc<Limiter<S, E>>,
    health: HealthReporter,
    metrics: Arc<Metrics>,
) {
    let mut tick = tokio::time::interval(STORE_HEALTH_INTERVAL);
    let mut last = None;
    loop {
        tick.tick().await;
        let condition = limiter.store().condition();
        metrics.store_condition(&condition);
        // Ready while the store answers and nothing in its condition (an
        // evicting Redis under `on_evicting_policy: refuse`) says to stay
        // out of rotation.
        let up = limiter.store().is_available() && !condition.unready;
        if last != Some(up) {
            let status = if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(HEALTH_SERVICE, status).await;
            last = Some(up);
        }
    }
}

/// How often the gauge of active bans is read from the store.
pub const BANS_GAUGE_INTERVAL: Duration = Duration::from_secs(10);
/// Bans the status page shows per scope.
pub const BANS_SHOWN: u64 = 10;

/// Keeps `tollgate_bans_active{scope}` and the status page's bans in step
/// with the store: one listing of the first [`BANS_SHOWN`] per scope with a
/// penalty box, every [`BANS_GAUGE_INTERVAL`]. A failed read leaves the
/// last values.
async fn watch_bans<S: Store, E>(
    limiter: Arc<Limiter<S, E>>,
    metrics: Arc<Metrics>,
    board: Arc<Board>,
) {
    let mut tick = tokio::time::interval(BANS_GAUGE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let rules = limiter.rules();
        for scope in rules.scopes().filter(|s| s.penalty.is_some()) {
            let list = PenaltyOp::List {
                scope: &scope.name,
                after: None,
                limit: BANS_SHOWN,
            };
            let listed = limiter.store().penalties(&list).await;
            if let Ok(PenaltyAnswer::Listed { total, bans, .. }) = listed {
                metrics.bans_active(&scope.name, total);
                board.banned(&scope.name, total, &bans);
            }
        }
    }
}

/// The connections of `tcp` (a listener's, or a core's share of them),
/// through [`tls::accept`], each one cancellable at the end of the shutdown
/// grace or of `max_connection_age` plus its grace. Nagle's algorithm is
/// off on each ([`tls::incoming`]): without that, a small answer waits for
/// the client's delayed ACK (up to 40 ms on Linux); under ghz at 50 callers
/// that capped the server at 4,000 decisions/s with a p99 of 49 ms, while
/// it used a fifth of one core.
fn incoming<S>(
    tcp: S,
    tls: Option<Tls>,
    observer: &Arc<Observer>,
    cancel: &CancellationToken,
    grpc: &GrpcConfig,
) -> impl Stream<Item = std::io::Result<Cancellable<Conn>>> + use<S>
where
    S: Stream<Item = std::io::Result<TcpStream>> + Send + Unpin + 'static,
{
    let cancel = cancel.clone();
    let deadline = grpc.max_connection_age + grpc.max_connection_age_grace;
    tokio_stream::wrappers::ReceiverStream::new(tls::accept(tcp, tls, observer.clone()))
        .map(move |conn| Ok(Cancellable::new(conn, &cancel).with_deadline(deadline)))
}
