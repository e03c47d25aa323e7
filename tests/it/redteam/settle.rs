//! Red team, settles: a settle far above its estimate, a sheddable settle
//! eating the reserve, an atomic batch mixing priorities on one bucket, and
//! a settle replayed once its marker is gone; over gRPC, on the embedded
//! store and on Redis; and an atomic batch across scopes, which Cluster
//! decides by reserve and refund (issue 19, items 1, 3, 5 and 9b).

use std::time::Duration;

use redis::Commands;
use tollgate::config::{Config, RedisMode, StoreKind};
use tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient;
use tollgate::pb::tollgate::v1::{
    Priority, SettleRequest, ShouldAllowBatchRequest, ShouldAllowRequest, ShouldAllowResponse,
};
use tonic::transport::Channel;

use crate::common::redis::{Cluster, Standalone, store_config};
use crate::common::{TestServer, to_std};

const SCOPES: &str = r#"
reservations:
  secret: "an-example-secret-of-at-least-32-bytes!"
scopes:
  - name: chat
    limits:
      - name: all
        per: scope
        capacity: 1000
        refill_period: 60s
        headroom: { sheddable: 30% }
      - { name: each, per: identity, capacity: 100, refill_period: 60s }
  - name: pool
    limits:
      - name: shared
        per: scope
        capacity: 10
        refill_period: 1h
        headroom: { sheddable: 30% }
  - name: daily
    limits:
      - { name: day, per: identity, budget: 1000, window: 1d }
  - name: slow
    limits:
      - { name: rate, per: identity, capacity: 400, refill_period: 1d }
"#;

type Client = RateLimiterClient<Channel>;

/// Where the test runs: the embedded store, or Redis (and its port, to
/// emulate an eviction).
enum On {
    Memory,
    Redis(Standalone),
}

impl On {
    fn config(&self, prefix: &str) -> Config {
        let mut config = Config::from_yaml(SCOPES).unwrap();
        if let On::Redis(redis) = self {
            config.store.kind = StoreKind::Redis;
            config.store.redis = store_config(RedisMode::Standalone, vec![redis.url()], prefix);
        }
        config
    }

    /// Deletes every record of a reservation (settled or open), as a
    /// `volatile-*` or `allkeys-*` eviction may. Nothing to delete on the embedded store, which evicts
    /// nothing.
    fn evict_markers(&self) {
        if let On::Redis(redis) = self {
            let mut c = crate::common::redis::conn(redis.server.port).unwrap();
            let mut keys: Vec<String> = c.keys("*%settled:*").unwrap();
            keys.extend(c.keys::<_, Vec<String>>("*%open:*").unwrap());
            for k in keys {
                let _: () = c.del(k).unwrap();
            }
        }
    }

    /// The longest lifetime left on any key under `prefix`, on Redis.
    fn longest_ttl(&self, prefix: &str) -> Option<Duration> {
        let On::Redis(redis) = self else { return None };
        let mut c = crate::common::redis::conn(redis.server.port).unwrap();
        let keys: Vec<String> = c.keys(format!("{prefix}*")).unwrap();
        keys.iter()
            .map(|k| {
                let ms: i64 = redis::cmd("PTTL").arg(k).query(&mut c).unwrap();
                Duration::from_millis(u64::try_from(ms).unwrap_or(0))
            })
            .max()
    }
}

fn request(scope: &str, identity: &str, cost: u32, priority: Priority) -> ShouldAllowRequest {
    ShouldAllowRequest {
        scope: scope.into(),
        identity: identity.into(),
        cost,
        priority: priority.into(),
        ..Default::default()
    }
}

fn reserving(scope: &str, identity: &str, cost: u32, priority: Priority) -> ShouldAllowRequest {
    ShouldAllowRequest {
        settle_within: Some(Duration::from_secs(600).try_into().unwrap()),
        ..request(scope, identity, cost, priority)
    }
}

async fn ask(c: &mut Client, r: ShouldAllowRequest) -> ShouldAllowResponse {
    c.should_allow(r).await.expect("decided").into_inner()
}

async fn settle(c: &mut Client, reservation: &str, actual: u64) -> Result<(), tonic::Status> {
    c.settle(SettleRequest {
        reservation: reservation.to_owned(),
        actual_cost: actual,
    })
    .await
    .map(|_| ())
}

/// Item 1: one settle of 2^32 - 1 on a reservation of 1 may lock the scope
/// out for at most one refill period beyond an empty bucket, and never
/// takes the headroom a sheddable reservation had to leave.
async fn one_settle_locks_a_scope_out_for_at_most_one_period(on: &On, prefix: &str) {
    let server = TestServer::start_config(on.config(prefix)).await;
    let mut c = server.client().await;
    let r = ask(&mut c, reserving("chat", "mallory", 1, Priority::Critical)).await;
    assert!(r.allowed, "{r:?}");
    settle(&mut c, &r.reservation, u64::from(u32::MAX))
        .await
        .expect("settles");
    let denied = ask(&mut c, request("chat", "alice", 1, Priority::Critical)).await;
    assert!(!denied.allowed, "the scope is in debt: {denied:?}");
    let wait = to_std(&denied.retry_after).expect("a retry_after");
    // One period of debt past an empty bucket, then one token (60 ms).
    assert!(
        wait <= Duration::from_millis(60_060),
        "one settle locked the scope out for {wait:?}"
    );
    if let Some(ttl) = on.longest_ttl(prefix) {
        assert!(ttl <= Duration::from_secs(121), "a key lives {ttl:?}");
    }
    server.shutdown().await;
}

async fn a_sheddable_settle_leaves_the_reserve(on: &On, prefix: &str) {
    let server = TestServer::start_config(on.config(prefix)).await;
    let mut c = server.client().await;
    let r = ask(&mut c, reserving("chat", "bulk", 1, Priority::Sheddable)).await;
    assert!(r.allowed, "{r:?}");
    settle(&mut c, &r.reservation, u64::from(u32::MAX))
        .await
        .expect("settles");
    // The 30% reserve (300 of 1000) is still there for CRITICAL; per
    // identity buckets hold 100, so three identities take it.
    for who in ["a", "b", "c"] {
        let d = ask(&mut c, request("chat", who, 100, Priority::Critical)).await;
        assert!(d.allowed, "the sheddable settle ate the reserve: {d:?}");
    }
    server.shutdown().await;
}

/// Item 5: an atomic batch on one bucket keeps every entry's headroom,
/// whatever the order.
async fn an_atomic_batch_keeps_every_entrys_headroom(on: &On, prefix: &str) {
    let server = TestServer::start_config(on.config(prefix)).await;
    let mut c = server.client().await;
    let batch = |a: ShouldAllowRequest, b: ShouldAllowRequest| ShouldAllowBatchRequest {
        requests: vec![a, b],
        atomic: true,
    };
    let critical = |n| request("pool", "x", n, Priority::Critical);
    let sheddable = |n| request("pool", "y", n, Priority::Sheddable);
    for (first, second) in [(critical(1), sheddable(9)), (sheddable(9), critical(1))] {
        let out = c
            .should_allow_batch(batch(first, second))
            .await
            .unwrap()
            .into_inner();
        for r in &out.responses {
            assert!(!r.allowed, "a sheddable 9 took the reserve: {out:?}");
            assert!(
                !r.reason.contains("cost 10 exceeds the capacity 10"),
                "false reason: {out:?}"
            );
        }
    }
    // Allowed when some order lets each keep its headroom: the sheddable 1
    // first (leaving 9 >= 3), then the critical 8.
    let out = c
        .should_allow_batch(batch(critical(8), sheddable(1)))
        .await
        .unwrap()
        .into_inner();
    assert!(out.responses.iter().all(|r| r.allowed), "{out:?}");
    server.shutdown().await;
}

/// Item 3: replays of a settle whose marker was evicted give nothing back
/// beyond what the reservation took.
async fn a_replayed_settle_gives_nothing_back_twice(on: &On, prefix: &str) {
    let server = TestServer::start_config(on.config(prefix)).await;
    let mut c = server.client().await;
    for (scope, limit) in [("daily", 1000u64), ("slow", 400)] {
        // Others spend most of the limit first; then one reservation of 100.
        let d = ask(&mut c, request(scope, "m", 300, Priority::Critical)).await;
        assert!(d.allowed, "{d:?}");
        let r = ask(&mut c, reserving(scope, "m", 100, Priority::Critical)).await;
        assert!(r.allowed, "{r:?}");
        let mut admitted = 300 + 100;
        settle(&mut c, &r.reservation, 0).await.expect("settles");
        for _ in 0..20 {
            // Take all there is, then replay the settle.
            loop {
                let d = ask(&mut c, request(scope, "m", 50, Priority::Critical)).await;
                if !d.allowed {
                    break;
                }
                admitted += 50;
            }
            on.evict_markers();
            if settle(&mut c, &r.reservation, 0).await.is_err() {
                break;
            }
        }
        // The reservation's 100 came back once; the 300 taken before it are
        // never given back. (The slow bucket refills 400 a day: a test's
        // seconds add nothing.)
        assert!(
            admitted <= limit + 100,
            "{scope}: {admitted} admitted on a limit of {limit}"
        );
    }
    // A record evicted before the first settle refuses it: the estimate
    // stands, nothing comes back.
    if let On::Redis(_) = on {
        let r = ask(&mut c, reserving("slow", "n", 100, Priority::Critical)).await;
        assert!(r.allowed, "{r:?}");
        on.evict_markers();
        let e = settle(&mut c, &r.reservation, 0).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        let d = ask(&mut c, request("slow", "n", 301, Priority::Critical)).await;
        assert!(!d.allowed, "the estimate stands: {d:?}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_settle_cannot_lock_a_scope_out_for_years() {
    one_settle_locks_a_scope_out_for_at_most_one_period(&On::Memory, "m").await;
    let redis = On::Redis(Standalone::start());
    one_settle_locks_a_scope_out_for_at_most_one_period(&redis, "rt-debt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sheddable_settle_cannot_eat_the_reserve() {
    a_sheddable_settle_leaves_the_reserve(&On::Memory, "m").await;
    let redis = On::Redis(Standalone::start());
    a_sheddable_settle_leaves_the_reserve(&redis, "rt-reserve").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_atomic_batch_cannot_borrow_the_first_entrys_headroom() {
    an_atomic_batch_keeps_every_entrys_headroom(&On::Memory, "m").await;
    let redis = On::Redis(Standalone::start());
    an_atomic_batch_keeps_every_entrys_headroom(&redis, "rt-batch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_replayed_after_its_marker_is_evicted_refunds_nothing_more() {
    a_replayed_settle_gives_nothing_back_twice(&On::Memory, "m").await;
    let redis = On::Redis(Standalone::start());
    a_replayed_settle_gives_nothing_back_twice(&redis, "rt-replay").await;
}

/// Item 9b: an atomic batch whose entries name different scopes spans hash
/// slots on Cluster, and is decided by reserve and refund. A denied one
/// gives back exactly what its allowed part reserved: replayed many times,
/// it takes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_batch_across_cluster_slots_takes_nothing() {
    let redis = Cluster::start();
    let mut config = Config::from_yaml(SCOPES).unwrap();
    config.store.kind = StoreKind::Redis;
    config.store.redis = store_config(RedisMode::Cluster, redis.urls(), "rt-slots");
    let server = TestServer::start_config(config).await;
    let mut c = server.client().await;
    // "slow" has room for 400 a day; "pool" holds 10, so 11 always denies.
    let batch = ShouldAllowBatchRequest {
        requests: vec![
            request("slow", "x", 7, Priority::Critical),
            request("pool", "x", 11, Priority::Critical),
        ],
        atomic: true,
    };
    for _ in 0..20 {
        let out = c
            .should_allow_batch(batch.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(out.responses.iter().all(|r| !r.allowed), "{out:?}");
    }
    // Every one of the 400 is still there: the reservations were refunded
    // exactly (a day's refill in these seconds is well under one token).
    let all = ask(&mut c, request("slow", "x", 400, Priority::Critical)).await;
    assert!(all.allowed, "a denied batch took tokens: {all:?}");
    let allowed = ShouldAllowBatchRequest {
        requests: vec![
            request("daily", "x", 5, Priority::Critical),
            request("pool", "x", 10, Priority::Critical),
        ],
        atomic: true,
    };
    let out = c.should_allow_batch(allowed).await.unwrap().into_inner();
    assert!(out.responses.iter().all(|r| r.allowed), "{out:?}");
    server.shutdown().await;
}
