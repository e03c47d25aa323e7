//! The store as a shared resource: clock skew, a full embedded store, cache memory.
//!
//! Each test replays over the wire, against a served Tollgate, how one
//! party's fault (a replica's clock, a tenant's traffic, Redis's eviction
//! policy) once reached everyone else's limits.

use std::time::Duration;

use tokio::net::TcpListener;
use tollgate::config::{Config, OnEvictingPolicy};
use tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::redis::{Server, Standalone, free_port as redis_port};
use crate::common::{TestServer, ask, free_port, metrics_get, req};

/// Asks `n` times as `identity` (or, with `None`, as a new identity each
/// time); returns (allowed, degraded).
async fn count(
    c: &mut RateLimiterClient<Channel>,
    scope: &str,
    identity: Option<&str>,
    n: usize,
) -> (usize, usize) {
    let (mut allowed, mut degraded) = (0, 0);
    for i in 0..n {
        let who = identity.map_or_else(|| format!("new-{i}"), str::to_owned);
        let r = ask(c, req(scope, &who, "op")).await;
        allowed += usize::from(r.allowed);
        degraded += usize::from(r.degraded);
    }
    (allowed, degraded)
}

async fn readiness(server: &TestServer) -> ServingStatus {
    let mut health = HealthClient::new(server.channel().await);
    health
        .check(HealthCheckRequest {
            service: "tollgate.v1.RateLimiter".into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status()
}

/// Waits up to 10 s for readiness to become `want`.
async fn wait_readiness(server: &TestServer, want: ServingStatus) -> ServingStatus {
    let mut seen = readiness(server).await;
    for _ in 0..200 {
        if seen == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        seen = readiness(server).await;
    }
    seen
}

/// The value of the metric line that starts with `series`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

// --- 9c: known series exist at zero -------------------------------------

#[tokio::test]
async fn known_counters_are_exported_at_zero_on_a_fresh_server() {
    let metrics = free_port();
    let server = TestServer::start(&format!(
        "metrics:\n  listen: 127.0.0.1:{metrics}\nreload: {{watch: false}}\nscopes:
  - name: shop
    limits:
      - {{name: trial, per: identity, capacity: 5, refill_period: 1s, shadow: true}}
      - {{name: enforced, per: identity, capacity: 5, refill_period: 1s}}
"
    ))
    .await;
    let text = metrics_get(metrics, "/metrics").await;
    for series in [
        "tollgate_config_reloads_total{result=\"accepted\"} 0",
        "tollgate_config_reloads_total{result=\"refused\"} 0",
        "tollgate_store_errors_total{transient=\"true\"} 0",
        "tollgate_store_errors_total{transient=\"false\"} 0",
        "tollgate_shadow_denials_total{api=\"tollgate\",scope=\"shop\",rule=\"trial\"} 0",
        "tollgate_shadow_denials_total{api=\"envoy\",scope=\"shop\",rule=\"trial\"} 0",
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    assert!(
        !text.contains("rule=\"enforced\"} 0"),
        "only shadow limits have shadow series"
    );
    drop(server);
}

// --- 2: a skewed replica clock ------------------------------------------

const THREE_DAYS_US: i64 = 3 * 86_400 * 1_000_000;

fn skewed(redis: &Standalone, prefix: &str, skew_us: i64, metrics: u16) -> Config {
    let mut config = Config::from_yaml(&format!(
        "metrics:\n  listen: 127.0.0.1:{metrics}\nscopes:
  - name: budgeted
    limits:
      - {{name: daily, per: identity, budget: 5, window: day}}
  - name: plain
    limits:
      - {{name: burst, per: identity, capacity: 3, refill_period: 1h}}
"
    ))
    .expect("config");
    config.store.kind = tollgate::config::StoreKind::Redis;
    config.store.redis = redis.config(prefix);
    config.store.redis.host_clock_skew_us = skew_us;
    config
}

#[tokio::test]
async fn a_replica_clock_days_behind_redis_neither_fails_open_nor_trips_the_breaker() {
    let redis = Standalone::start();
    let metrics = free_port();
    let server =
        TestServer::start_config(skewed(&redis, "skew-behind", -THREE_DAYS_US, metrics)).await;
    let mut c = server.client().await;
    let (allowed, degraded) = count(&mut c, "budgeted", Some("alice"), 20).await;
    assert_eq!(
        (allowed, degraded),
        (5, 0),
        "a budget of 5 admits 5, on Redis's day"
    );
    let (allowed, degraded) = count(&mut c, "plain", Some("bob"), 10).await;
    assert_eq!((allowed, degraded), (3, 0), "another scope keeps its limit");
    assert_eq!(readiness(&server).await, ServingStatus::Serving);
    // The health watcher exports the skew within its interval.
    let (mut text, mut skew) = (String::new(), 0.0);
    for _ in 0..50 {
        text = metrics_get(metrics, "/metrics").await;
        skew = metric(&text, "tollgate_store_clock_skew_seconds ")
            .unwrap_or_else(|| panic!("no skew gauge in:\n{text}"));
        if skew != 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        (skew - 259_200.0).abs() < 60.0,
        "Redis is 3 days ahead of the replica: {skew}"
    );
    assert_eq!(
        metric(&text, "tollgate_store_errors_total{transient=\"true\"} "),
        Some(0.0),
        "no store error was counted:\n{text}"
    );
}

#[tokio::test]
async fn a_replica_clock_days_ahead_of_redis_keeps_the_budget() {
    let redis = Standalone::start();
    let server =
        TestServer::start_config(skewed(&redis, "skew-ahead", THREE_DAYS_US, free_port())).await;
    let mut c = server.client().await;
    let (allowed, degraded) = count(&mut c, "budgeted", Some("alice"), 12).await;
    assert_eq!((allowed, degraded), (5, 0));
    assert_eq!(readiness(&server).await, ServingStatus::Serving);
}

// --- 4: a full embedded store -------------------------------------------

#[tokio::test]
async fn one_scope_filling_the_embedded_store_leaves_another_scopes_limits_whole() {
    let server = TestServer::start(
        "reload: {watch: false}\nstore: {memory: {max_bytes: 1MiB, sweep_interval: 1h}}\nscopes:
  - name: attacker
    limits:
      - {name: per-user, per: identity, capacity: 5, refill_period: 1h}
  - name: victim
    limits:
      - {name: all, per: scope, capacity: 5, refill_period: 1h}
      - {name: per-user, per: identity, capacity: 3, refill_period: 1h}
",
    )
    .await;
    let mut c = server.client().await;
    // Past the 5,376 requests that filled the whole store before.
    let (_, attacker_degraded) = count(&mut c, "attacker", None, 7_000).await;
    assert!(
        attacker_degraded > 0,
        "the attacker reached its own bound (and its own failure mode)"
    );
    let (allowed, degraded) = count(&mut c, "victim", Some("v"), 20).await;
    assert_eq!((allowed, degraded), (3, 0), "3 per identity still holds");
    let (allowed, degraded) = count(&mut c, "victim", None, 20).await;
    assert_eq!(
        (allowed, degraded),
        (2, 0),
        "5 per scope still holds, new identities included"
    );
}

// --- 3: an eviction policy that can drop open-reservation records ------

const EVICTING: [&str; 7] = [
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
];

fn on_redis(port: u16, prefix: &str, on_evicting: OnEvictingPolicy, metrics: u16) -> Config {
    let mut config = Config::from_yaml(&format!(
        "metrics:\n  listen: 127.0.0.1:{metrics}\nscopes:
  - name: s
    limits:
      - {{name: burst, per: identity, capacity: 3, refill_period: 1h}}
"
    ))
    .expect("config");
    config.store.kind = tollgate::config::StoreKind::Redis;
    config.store.redis = crate::common::redis::store_config(
        tollgate::config::RedisMode::Standalone,
        vec![format!("redis://127.0.0.1:{port}/")],
        prefix,
    );
    config.store.redis.on_evicting_policy = on_evicting;
    config
}

/// Starts Tollgate on `config`; the server task's end, if it ends (refuses
/// to start) within 5 s.
async fn start_or_refuse(config: Config) -> Result<TestServer, String> {
    let prepared = tollgate::server::Prepared::new(config, None).expect("valid config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (control, mut task) = tollgate::server::spawn(prepared, listener);
    match tokio::time::timeout(Duration::from_secs(5), &mut task).await {
        Ok(ended) => Err(match ended.expect("server task") {
            Ok(()) => "stopped without an error".to_owned(),
            Err(e) => e.to_string(),
        }),
        Err(_) => Ok(TestServer::spawned(addr, control, task)),
    }
}

#[tokio::test]
async fn tollgate_refuses_to_start_on_a_redis_that_can_evict_its_keys() {
    let dir = tempfile::tempdir().expect("dir");
    for policy in EVICTING {
        let redis = Server::redis(dir.path(), redis_port(), &["--maxmemory-policy", policy]);
        let refused = start_or_refuse(on_redis(
            redis.port,
            &format!("evict-{policy}"),
            OnEvictingPolicy::Refuse,
            free_port(),
        ))
        .await
        .err()
        .unwrap_or_else(|| panic!("started on maxmemory-policy {policy}"));
        assert!(
            refused.contains(policy) && refused.contains("store.redis.on_evicting_policy"),
            "{policy}: {refused}"
        );
    }
    let redis = Server::redis(
        dir.path(),
        redis_port(),
        &["--maxmemory-policy", "noeviction"],
    );
    let server = start_or_refuse(on_redis(
        redis.port,
        "evict-none",
        OnEvictingPolicy::Refuse,
        free_port(),
    ))
    .await
    .expect("noeviction starts");
    let mut c = server.client().await;
    assert_eq!(count(&mut c, "s", Some("a"), 5).await, (3, 0));
}

#[tokio::test]
async fn with_warn_an_evicting_redis_serves_and_says_so_in_metrics() {
    let dir = tempfile::tempdir().expect("dir");
    let redis = Server::redis(
        dir.path(),
        redis_port(),
        &["--maxmemory-policy", "volatile-lru"],
    );
    let metrics = free_port();
    let server = start_or_refuse(on_redis(
        redis.port,
        "evict-warn",
        OnEvictingPolicy::Warn,
        metrics,
    ))
    .await
    .expect("warn starts");
    let mut c = server.client().await;
    assert_eq!(count(&mut c, "s", Some("a"), 5).await, (3, 0));
    let text = metrics_get(metrics, "/metrics").await;
    assert_eq!(
        metric(&text, "tollgate_store_evicting_policy "),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn an_evicting_redis_found_on_reconnect_makes_the_replica_unready_until_fixed() {
    let dir = tempfile::tempdir().expect("dir");
    let port = redis_port();
    let metrics = free_port();
    // Redis is not up yet: Tollgate starts and waits for it.
    let server = start_or_refuse(on_redis(
        port,
        "evict-later",
        OnEvictingPolicy::Refuse,
        metrics,
    ))
    .await
    .expect("starts while Redis is down");
    let redis = Server::redis(dir.path(), port, &["--maxmemory-policy", "allkeys-lru"]);
    let mut c = server.client().await;
    // Until the prober's next probe, answers are degraded; then Redis decides.
    let mut reached = false;
    for _ in 0..100 {
        if !ask(&mut c, req("s", "probe", "op")).await.degraded {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reached, "Tollgate reached Redis once it was up");
    let mut text = String::new();
    for _ in 0..100 {
        text = metrics_get(metrics, "/metrics").await;
        if metric(&text, "tollgate_store_evicting_policy ") == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(&text, "tollgate_store_evicting_policy "),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        wait_readiness(&server, ServingStatus::NotServing).await,
        ServingStatus::NotServing
    );
    // Decisions still go to Redis: unready, not failing open.
    assert_eq!(count(&mut c, "s", Some("a"), 5).await, (3, 0));
    let mut admin = crate::common::redis::conn(redis.port).expect("conn");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query(&mut admin)
        .expect("config set");
    assert_eq!(
        wait_readiness(&server, ServingStatus::Serving).await,
        ServingStatus::Serving
    );
}

#[tokio::test]
async fn on_cluster_one_evicting_primary_refuses_the_start() {
    let cluster = crate::common::redis::Cluster::start();
    let set = |port: u16, policy: &str| {
        let mut admin = crate::common::redis::conn(port).expect("conn");
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg(policy)
            .query(&mut admin)
            .expect("config set");
    };
    let config = || {
        let mut c = on_redis(
            cluster.nodes[0].port,
            "evict-cluster",
            OnEvictingPolicy::Refuse,
            free_port(),
        );
        c.store.redis.mode = tollgate::config::RedisMode::Cluster;
        c.store.redis.urls = cluster.urls();
        c
    };
    set(cluster.nodes[2].port, "volatile-ttl");
    let refused = start_or_refuse(config())
        .await
        .err()
        .expect("refused: one primary evicts");
    assert!(refused.contains("volatile-ttl"), "{refused}");
    set(cluster.nodes[2].port, "noeviction");
    let server = start_or_refuse(config()).await.expect("starts");
    let mut c = server.client().await;
    assert_eq!(count(&mut c, "s", Some("a"), 5).await, (3, 0));
}
