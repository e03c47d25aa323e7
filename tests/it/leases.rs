//! Concurrency limits: leases on the embedded store (tokio's clock paused,
//! exact to the microsecond tick) and on real Redis topologies (two
//! replicas, i.e. two stores with their own connections, on one Redis),
//! and the bounds of `tollgate.v1.Leases` over the wire.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tollgate::config::Config;
use tollgate::limiter::{LeaseAction, LeaseDecision, LeaseError, Limiter, Request, Rules};
use tollgate::pb::tollgate::v1::leases_client::LeasesClient;
use tollgate::pb::tollgate::v1::{AcquireRequest, LeaseTarget, ReleaseRequest, RenewRequest};
use tollgate::store::Store;
use tollgate::store::memory::MemoryStore;
use tollgate::store::redis::RedisStore;

use crate::common::TestServer;
use crate::common::redis::{Cluster, Sentinel, Standalone, evalsha_calls};

const POOLS: &str = r#"
scopes:
  - name: llm
    failure_mode: open
    limits:
      - name: streams
        per: identity
        concurrency: 5
        max_lease: 1m
  - name: big
    limits:
      - name: many
        per: scope
        concurrency: 10000
  - name: mixed
    limits:
      - {name: one-stream, per: identity, concurrency: 1}
      - {name: two-per-hour, per: identity, capacity: 2, refill_period: 1h}
  - name: gate
    limits:
      - {name: five-at-once, per: identity, concurrency: 5, max_lease: 1m}
      - {name: three-an-hour, per: identity, capacity: 3, refill_period: 1h}
  - name: strict
    failure_mode: closed
    limits:
      - name: streams
        per: identity
        concurrency: 5
"#;

fn rules(yaml: &str) -> Rules {
    Rules::compile(&Config::from_yaml(yaml).expect("valid config")).expect("rules")
}

async fn lease<S: Store>(
    l: &Limiter<S>,
    scope: &str,
    identity: &str,
    id: &str,
    action: LeaseAction,
) -> Result<LeaseDecision, LeaseError> {
    let req = Request::new(scope, identity, "chat");
    l.lease_on(&l.rules(), &req, id, action).await
}

fn acquire(ttl: Duration) -> LeaseAction {
    LeaseAction::Acquire {
        weight: None,
        ttl: Some(ttl),
    }
}

/// 200 acquires (each sent `tries` times, the repeats as retries with the
/// same lease id) for one pool of 5, spread over two replicas, 5 rounds:
/// exactly 5 distinct leases are granted each round.
async fn exactly_five_of_200<S: Store>(replicas: [Arc<Limiter<S>>; 2], tries: usize) {
    for round in 0..5 {
        let identity = format!("user-{tries}-{round}");
        let calls = (0..200).flat_map(|i| (0..tries).map(move |t| (i, t)));
        let answers = join_all(calls.map(|(i, t)| {
            let l = replicas[(i + t) % 2].clone();
            let identity = identity.clone();
            async move {
                let id = format!("req-{i}");
                let d = lease(&l, "llm", &identity, &id, acquire(Duration::from_secs(30))).await;
                (id, d.expect("the store answers"))
            }
        }))
        .await;
        let granted: HashSet<&str> = answers
            .iter()
            .filter(|(_, d)| d.ok)
            .map(|(id, _)| id.as_str())
            .collect();
        assert_eq!(granted.len(), 5, "round {round}: {granted:?}");
        for (_, d) in &answers {
            assert!(d.in_flight <= 5, "round {round}: {d:?}");
            assert!(!d.degraded);
            if !d.ok {
                let wait = d.retry_after.expect("a refusal names the earliest expiry");
                assert!(wait <= Duration::from_secs(30), "{wait:?}");
            }
        }
    }
}

async fn replicas_hold_the_pool_to_five(a: RedisStore, b: RedisStore) {
    let rules = rules(POOLS);
    let replicas = [
        Arc::new(Limiter::new(rules.clone(), a)),
        Arc::new(Limiter::new(rules, b)),
    ];
    exactly_five_of_200(replicas.clone(), 1).await;
    exactly_five_of_200(replicas, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_standalone_grant_exactly_five_of_200() {
    let redis = Standalone::start();
    replicas_hold_the_pool_to_five(redis.store("leases-a"), redis.store("leases-a")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_cluster_grant_exactly_five_of_200() {
    let redis = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    replicas_hold_the_pool_to_five(redis.store("leases-c"), redis.store("leases-c")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_sentinel_grant_exactly_five_of_200() {
    let redis = tokio::task::spawn_blocking(Sentinel::start).await.unwrap();
    replicas_hold_the_pool_to_five(redis.store("leases-s"), redis.store("leases-s")).await;
}

#[tokio::test(start_paused = true)]
async fn an_unreleased_slot_comes_back_at_its_expiry_and_not_a_tick_before() {
    let l = Limiter::new(rules(POOLS), MemoryStore::default());
    let ttl = Duration::from_secs(10);
    for i in 0..5 {
        assert!(
            lease(&l, "llm", "bob", &format!("held-{i}"), acquire(ttl))
                .await
                .unwrap()
                .ok
        );
    }
    tokio::time::advance(ttl - Duration::from_micros(1)).await;
    let early = lease(&l, "llm", "bob", "late", acquire(ttl)).await.unwrap();
    assert!(
        !early.ok,
        "one tick before the expiry the slots are still held"
    );
    assert_eq!(early.in_flight, 5);
    assert_eq!(early.retry_after, Some(Duration::from_micros(1)));
    tokio::time::advance(Duration::from_micros(1)).await;
    let at = lease(&l, "llm", "bob", "late", acquire(ttl)).await.unwrap();
    assert!(at.ok, "at the expiry the slots are free");
    assert_eq!(at.in_flight, 1, "all five expired leases were removed");
}

/// Holds a lease of `ttl` across 3× its ttl by renewing every half ttl,
/// with the pool full; then lets it lapse, and a renew reports it lost.
async fn renew_keeps_a_lease_and_a_late_renew_is_lost<S: Store>(
    l: &Limiter<S>,
    ttl: Duration,
    sleep: impl AsyncFn(Duration),
) {
    let who = format!("renewer-{}", ttl.as_micros());
    for i in 0..5 {
        assert!(
            lease(l, "llm", &who, &format!("l{i}"), acquire(ttl))
                .await
                .unwrap()
                .ok
        );
    }
    for _ in 0..6 {
        sleep(ttl / 2).await;
        for i in 0..5 {
            let renew = LeaseAction::Renew { ttl: Some(ttl) };
            let r = lease(l, "llm", &who, &format!("l{i}"), renew)
                .await
                .unwrap();
            assert!(r.ok, "renewed within its ttl");
            assert_eq!(r.ttl, ttl);
        }
        assert!(
            !lease(l, "llm", &who, "other", acquire(ttl))
                .await
                .unwrap()
                .ok
        );
    }
    sleep(ttl + ttl / 10).await;
    let late = LeaseAction::Renew { ttl: Some(ttl) };
    let lost = lease(l, "llm", &who, "l0", late).await.unwrap();
    assert!(!lost.ok, "a renew after the expiry reports the lease lost");
    let release = lease(l, "llm", &who, "l0", LeaseAction::Release)
        .await
        .unwrap();
    assert!(release.ok, "releasing a lost lease is fine");
    assert_eq!(release.in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn renew_keeps_a_lease_alive_on_the_embedded_store() {
    let l = Limiter::new(rules(POOLS), MemoryStore::default());
    renew_keeps_a_lease_and_a_late_renew_is_lost(&l, Duration::from_secs(2), async |d| {
        tokio::time::advance(d).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_keeps_a_lease_alive_on_redis() {
    let redis = Standalone::start();
    let l = Limiter::new(rules(POOLS), redis.store("leases-renew"));
    renew_keeps_a_lease_and_a_late_renew_is_lost(&l, Duration::from_millis(400), async |d| {
        tokio::time::sleep(d).await
    })
    .await;
    // Nothing is left behind once the last lease is gone.
    let mut conn = crate::common::redis::conn(redis.server.port).unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("test:leases-renew:*")
        .query(&mut conn)
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_store_fails_open_with_degraded_leases_or_closed() {
    let port = crate::common::free_port();
    let config = crate::common::redis::store_config(
        tollgate::config::RedisMode::Standalone,
        vec![format!("redis://127.0.0.1:{port}/")],
        "leases-dead",
    );
    let l = Limiter::new(rules(POOLS), RedisStore::new(&config).unwrap());
    let ttl = Duration::from_secs(5);
    let open = lease(&l, "llm", "eve", "x", acquire(ttl)).await.unwrap();
    assert!(open.ok && open.degraded, "{open:?}");
    let renew = lease(&l, "llm", "eve", "x", LeaseAction::Renew { ttl: None }).await;
    assert!(
        renew.as_ref().is_ok_and(|r| r.ok && r.degraded),
        "{renew:?}"
    );
    let release = lease(&l, "llm", "eve", "x", LeaseAction::Release).await;
    assert!(
        release.as_ref().is_ok_and(|r| r.ok && r.degraded),
        "{release:?}"
    );
    let closed = lease(&l, "strict", "eve", "x", acquire(ttl)).await;
    assert!(
        matches!(closed, Err(LeaseError::StoreUnavailable { .. })),
        "{closed:?}"
    );
}

fn target(lease_id: &str) -> Option<LeaseTarget> {
    Some(LeaseTarget {
        scope: "llm".into(),
        identity: "carol".into(),
        operation: "chat".into(),
        lease_id: lease_id.into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn each_bound_exceeded_is_invalid_argument_naming_its_field_and_takes_nothing() {
    let server = TestServer::start(POOLS).await;
    let mut c = LeasesClient::new(server.channel().await);
    let ttl = |secs: i64| {
        Some(prost_types::Duration {
            seconds: secs,
            nanos: 0,
        })
    };
    let cases = [
        (
            AcquireRequest {
                target: target(&"x".repeat(129)),
                ..Default::default()
            },
            "target.lease_id",
        ),
        (
            AcquireRequest {
                target: target(""),
                ..Default::default()
            },
            "target.lease_id",
        ),
        (
            AcquireRequest {
                target: target("a\u{7}"),
                ..Default::default()
            },
            "target.lease_id",
        ),
        (
            AcquireRequest {
                target: target("w"),
                weight: 6,
                ..Default::default()
            },
            "weight",
        ),
        (
            AcquireRequest {
                target: target("t"),
                ttl: ttl(61),
                ..Default::default()
            },
            "ttl",
        ),
        (
            AcquireRequest {
                target: target("t"),
                ttl: ttl(0),
                ..Default::default()
            },
            "ttl",
        ),
        (
            AcquireRequest {
                target: target("t"),
                ttl: ttl(-1),
                ..Default::default()
            },
            "ttl",
        ),
        (
            AcquireRequest {
                target: None,
                ..Default::default()
            },
            "target",
        ),
    ];
    for (req, field) in cases {
        let e = c.acquire(req.clone()).await.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{req:?}");
        assert!(
            e.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            e.message()
        );
    }
    let e = c
        .renew(RenewRequest {
            target: target("r"),
            ttl: ttl(3600),
        })
        .await
        .expect_err("refused");
    assert!(e.message().starts_with("ttl:"), "{}", e.message());
    // Nothing was taken: the whole pool is still free, by weight.
    let full = AcquireRequest {
        target: target("ok"),
        weight: 5,
        ..Default::default()
    };
    let granted = c.acquire(full.clone()).await.unwrap().into_inner();
    assert!(granted.granted, "{granted:?}");
    assert_eq!((granted.in_flight, granted.limit), (5, 5));
    assert!(granted.expires_at_unix_micros > 0);
    // Acquires are idempotent: the same lease, counted once.
    let again = c.acquire(full).await.unwrap().into_inner();
    assert_eq!(again.expires_at_unix_micros, granted.expires_at_unix_micros);
    assert_eq!(again.in_flight, 5);
    let released = c
        .release(ReleaseRequest {
            target: target("ok"),
        })
        .await
        .unwrap();
    assert_eq!(released.into_inner().in_flight, 0);
    let twice = c
        .release(ReleaseRequest {
            target: target("ok"),
        })
        .await;
    assert!(twice.is_ok(), "release is idempotent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_leases_expiring_together_are_all_removed_on_redis() {
    let redis = Standalone::start();
    let l = Arc::new(Limiter::new(rules(POOLS), redis.store("leases-many")));
    let ttl = Duration::from_secs(4);
    let granted = join_all((0..3_000).map(|i| {
        let l = l.clone();
        async move { lease(&l, "big", "", &format!("m{i}"), acquire(ttl)).await }
    }))
    .await;
    assert!(
        granted
            .iter()
            .all(|g| g.as_ref().is_ok_and(|g| g.ok && !g.degraded))
    );
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let after = lease(&l, "big", "", "next", acquire(ttl)).await.unwrap();
    assert!(after.ok);
    assert_eq!(
        after.in_flight, 1,
        "every expired lease and its weight is gone"
    );
}

#[tokio::test]
async fn lease_calls_and_leases_expired_unreleased_are_counted_per_rule() {
    let metrics = crate::common::free_port();
    let server = TestServer::start(&format!(
        "metrics: {{ listen: 127.0.0.1:{metrics} }}\n{POOLS}"
    ))
    .await;
    let mut c = LeasesClient::new(server.channel().await);
    let short = Some(prost_types::Duration {
        seconds: 0,
        nanos: 1_000_000,
    });
    for id in ["leak-1", "leak-2"] {
        let req = AcquireRequest {
            target: target(id),
            ttl: short,
            ..Default::default()
        };
        assert!(c.acquire(req).await.unwrap().into_inner().granted);
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let lost = c
        .renew(RenewRequest {
            target: target("leak-1"),
            ttl: None,
        })
        .await
        .unwrap();
    assert!(!lost.into_inner().renewed);
    c.release(ReleaseRequest {
        target: target("leak-2"),
    })
    .await
    .unwrap();
    let text = crate::common::metrics_get(metrics, "/metrics").await;
    for line in [
        r#"tollgate_lease_calls_total{scope="llm",rule="streams",call="acquire",result="granted"} 2"#,
        r#"tollgate_lease_calls_total{scope="llm",rule="streams",call="renew",result="lost"} 1"#,
        r#"tollgate_lease_calls_total{scope="llm",rule="streams",call="release",result="released"} 1"#,
        r#"tollgate_leases_expired_total{scope="llm",rule="streams"} 2"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
}

#[tokio::test]
async fn explain_names_the_pool_and_its_live_weight_and_records_nothing() {
    use tollgate::pb::tollgate::v1::ExplainRequest;
    use tollgate::pb::tollgate::v1::ShouldAllowRequest;
    use tollgate::pb::tollgate::v1::admin_client::AdminClient;
    let server = TestServer::start(POOLS).await;
    let mut c = LeasesClient::new(server.channel().await);
    for id in ["e1", "e2"] {
        let req = AcquireRequest {
            target: target(id),
            weight: 2,
            ..Default::default()
        };
        assert!(c.acquire(req).await.unwrap().into_inner().granted);
    }
    let mut admin = AdminClient::new(server.channel().await);
    let ask = ShouldAllowRequest {
        scope: "llm".into(),
        identity: "carol".into(),
        operation: "chat".into(),
        ..Default::default()
    };
    for _ in 0..2 {
        let e = admin
            .explain(ExplainRequest {
                request: Some(ask.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        let pool = &e.pools[0];
        assert_eq!(
            (pool.rule.as_str(), pool.per.as_str()),
            ("streams", "identity")
        );
        assert!(pool.applies && pool.in_flight_known, "{pool:?}");
        assert_eq!(
            (pool.in_flight, pool.concurrency),
            (4, 5),
            "the probe holds nothing"
        );
        assert!(e.limits.is_empty(), "a pool is not a bucket limit");
        assert!(e.live_leases_known);
        let ids: HashSet<_> = e.live_leases.iter().map(|l| l.lease_id.as_str()).collect();
        assert_eq!(ids, HashSet::from(["e1", "e2"]));
        assert!(
            e.live_leases
                .iter()
                .all(|l| l.weight == 2 && l.expires_at_unix_micros > 0)
        );
        assert_eq!(e.live_leases_not_listed, 0);
    }
}

/// 150 live leases in a per-scope pool and 1 expired: Explain's read
/// lists the first 100 by expiry, counts all 150, and changes nothing (the
/// expired lease is still there for the next call to count as leaked).
async fn a_listing_is_bounded_and_read_only<S: Store>(l: &Limiter<S>, wait: Duration) {
    let held = async |id: &str, ttl| lease(l, "big", "", id, acquire(ttl)).await;
    for i in 0..150 {
        let ttl = Duration::from_secs(60) + Duration::from_millis(i);
        assert!(held(&format!("l{i:03}"), ttl).await.unwrap().ok);
    }
    assert!(held("brief", Duration::from_millis(1)).await.unwrap().ok);
    tokio::time::sleep(wait).await;
    // The store's read alone: bounded, and it removes nothing.
    let rules = l.rules();
    let call = tollgate::store::LeaseCall {
        pool: tollgate::store::BucketKey {
            scope: "big",
            rule: "many",
            identity: None,
            operation: None,
            hash_tag: rules.scope("big").unwrap().hash_tag,
        },
        lease_id: "",
        op: tollgate::store::LeaseOp::List { max: 3 },
    };
    let three = l.store().lease(&call).await.unwrap();
    assert_eq!((three.live.len(), three.live_total), (3, 150));
    assert_eq!((three.in_flight, three.expired), (150, 0));
    let next = held("next", Duration::from_secs(1)).await.unwrap();
    assert_eq!(next.expired, 1, "the listing removed nothing");
    // Explain's: the first 100 of the 151 live now, soonest expiry first.
    let req = Request::new("big", "", "chat");
    let pools = l.explain_pools(&rules, &req).await;
    let (live, total) = pools[0].live.clone().expect("the store answered");
    assert_eq!((live.len(), total), (100, 151));
    let ids: Vec<_> = live.iter().map(|l| l.lease_id.to_string()).collect();
    let mut want = vec!["next".to_owned()];
    want.extend((0..99).map(|i| format!("l{i:03}")));
    assert_eq!(ids, want, "soonest expiry first, the expired skipped");
    assert!(live.iter().all(|l| l.weight == 1));
    assert!(
        live.windows(2)
            .all(|w| w[0].expires_at_us <= w[1].expires_at_us)
    );
}

#[tokio::test(start_paused = true)]
async fn explain_lists_at_most_100_live_leases_on_the_embedded_store() {
    let l = Limiter::new(rules(POOLS), MemoryStore::default());
    a_listing_is_bounded_and_read_only(&l, Duration::from_millis(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_lists_at_most_100_live_leases_on_redis() {
    let redis = Standalone::start();
    let l = Limiter::new(rules(POOLS), redis.store("leases-list"));
    a_listing_is_bounded_and_read_only(&l, Duration::from_millis(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_lists_at_most_100_live_leases_on_cluster() {
    let redis = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let l = Limiter::new(rules(POOLS), redis.store("leases-list-c"));
    a_listing_is_bounded_and_read_only(&l, Duration::from_millis(20)).await;
}

/// `tollgate_leases_in_flight`: the latest weight per pool this replica
/// called on, summed per scope and rule, forgotten `max_lease` after.
async fn the_gauge_sums_the_pools_seen(store: &str) {
    let metrics = crate::common::free_port();
    let server = TestServer::start(&format!(
        "metrics: {{ listen: 127.0.0.1:{metrics} }}\n{store}{POOLS}  - name: brief
    limits:
      - {{name: quick, per: identity, concurrency: 5, max_lease: 1s}}
"
    ))
    .await;
    let mut c = LeasesClient::new(server.channel().await);
    let to = |scope: &str, identity: &str, id: &str| {
        Some(LeaseTarget {
            scope: scope.into(),
            identity: identity.into(),
            operation: "chat".into(),
            lease_id: id.into(),
            ..Default::default()
        })
    };
    for (scope, who, id, weight) in [
        ("llm", "alice", "a1", 2),
        ("llm", "alice", "a2", 1),
        ("llm", "bob", "b1", 1),
        ("big", "alice", "s1", 1),
        ("big", "bob", "s2", 1),
        ("brief", "carol", "q1", 1),
    ] {
        let req = AcquireRequest {
            target: to(scope, who, id),
            weight,
            ..Default::default()
        };
        assert!(c.acquire(req).await.unwrap().into_inner().granted);
    }
    // A ShouldAllow that takes a lease is seen too.
    let with_lease = tollgate::pb::tollgate::v1::ShouldAllowRequest {
        scope: "mixed".into(),
        identity: "dave".into(),
        lease_id: "m1".into(),
        ..Default::default()
    };
    let answer = server.client().await.should_allow(with_lease).await;
    assert!(answer.unwrap().into_inner().allowed);
    let gauge = |text: &str, scope: &str, rule: &str| {
        let head = format!(r#"tollgate_leases_in_flight{{scope="{scope}",rule="{rule}"}} "#);
        text.lines()
            .find_map(|l| l.strip_prefix(&head)?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{head} in\n{text}"))
    };
    let text = crate::common::metrics_get(metrics, "/metrics").await;
    assert_eq!(gauge(&text, "llm", "streams"), 4, "alice's 3 and bob's 1");
    assert_eq!(
        gauge(&text, "big", "many"),
        2,
        "one pool, its latest weight"
    );
    assert_eq!(gauge(&text, "brief", "quick"), 1);
    assert_eq!(gauge(&text, "mixed", "one-stream"), 1);
    c.release(ReleaseRequest {
        target: to("llm", "alice", "a1"),
    })
    .await
    .unwrap();
    // brief's pool is forgotten max_lease (1s) after its last call, with
    // no call since: its lease has expired by then.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let text = crate::common::metrics_get(metrics, "/metrics").await;
    assert_eq!(gauge(&text, "llm", "streams"), 2);
    assert_eq!(gauge(&text, "brief", "quick"), 0);
}

#[tokio::test]
async fn the_in_flight_gauge_on_the_embedded_store() {
    the_gauge_sums_the_pools_seen("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_gauge_on_redis() {
    let redis = Standalone::start();
    let store = format!(
        "store: {{ kind: redis, redis: {{ urls: [\"{}\"], key_prefix: \"test:gauge:\" }} }}\n",
        redis.url()
    );
    the_gauge_sums_the_pools_seen(&store).await;
}

#[tokio::test]
async fn should_allow_with_a_lease_takes_the_rates_and_the_lease_or_neither() {
    use tollgate::pb::tollgate::v1::{DenialReason, ShouldAllowRequest};
    let server = TestServer::start(POOLS).await;
    let mut rates = server.client().await;
    let mut leases = LeasesClient::new(server.channel().await);
    let ask = |lease_id: &str, dry_run: bool| ShouldAllowRequest {
        scope: "mixed".into(),
        identity: "dave".into(),
        lease_id: lease_id.into(),
        dry_run,
        ..Default::default()
    };
    let remaining =
        async |c: &mut tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient<_>| {
            let probe = ShouldAllowRequest {
                lease_id: String::new(),
                ..ask("", true)
            };
            c.should_allow(probe).await.unwrap().into_inner().remaining
        };
    let first = rates
        .should_allow(ask("s1", false))
        .await
        .unwrap()
        .into_inner();
    let lease = first.lease.clone().expect("a lease");
    assert!(first.allowed && lease.granted, "{first:?}");
    assert_eq!(
        (
            lease.lease_id.as_str(),
            lease.rule.as_str(),
            lease.in_flight
        ),
        ("s1", "one-stream", 1)
    );
    assert_eq!(remaining(&mut rates).await, 1);
    // The lease is full: denied, and no token taken.
    let second = rates
        .should_allow(ask("s2", false))
        .await
        .unwrap()
        .into_inner();
    assert!(!second.allowed && !second.lease.as_ref().expect("a lease").granted);
    assert!(second.retry_after.is_some(), "{second:?}");
    // Told apart from a rate denial, and named: the limit that refused it.
    assert_eq!(
        (
            second.denial_reason(),
            second.rule.as_str(),
            second.limit,
            second.remaining
        ),
        (DenialReason::ConcurrencyLimited, "one-stream", 1, 0),
        "{second:?}"
    );
    assert_eq!(second.reset_after, second.retry_after);
    assert_eq!(
        remaining(&mut rates).await,
        1,
        "a refused lease takes no tokens"
    );
    let target = |id: &str| {
        Some(LeaseTarget {
            scope: "mixed".into(),
            identity: "dave".into(),
            lease_id: id.into(),
            ..Default::default()
        })
    };
    leases
        .release(ReleaseRequest {
            target: target("s1"),
        })
        .await
        .unwrap();
    assert!(
        rates
            .should_allow(ask("s3", false))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    leases
        .release(ReleaseRequest {
            target: target("s3"),
        })
        .await
        .unwrap();
    // The rates are spent: denied, and the lease it took is given back.
    let spent = rates
        .should_allow(ask("s4", false))
        .await
        .unwrap()
        .into_inner();
    assert!(!spent.allowed, "{spent:?}");
    assert_eq!(
        (spent.denial_reason(), spent.rule.as_str()),
        (DenialReason::RateLimited, "two-per-hour"),
        "{spent:?}"
    );
    let given_back = spent.lease.expect("a lease");
    assert!(!given_back.granted);
    assert_eq!(
        given_back.in_flight, 0,
        "a request the rates deny holds no lease"
    );
    let free = AcquireRequest {
        target: target("s5"),
        dry_run: true,
        ..Default::default()
    };
    let probe = leases.acquire(free).await.unwrap().into_inner();
    assert_eq!((probe.granted, probe.in_flight), (true, 0));
    // Bounds: a lease id too long is refused naming it, taking nothing.
    let e = rates
        .should_allow(ask(&"x".repeat(129), false))
        .await
        .expect_err("refused");
    assert!(e.message().starts_with("lease_id:"), "{}", e.message());
}

/// Rates and a lease in one store step, on Redis with two replicas: 200
/// concurrent ShouldAllow-with-a-lease for one identity (a pool of 5, a
/// rate of 3 an hour), 5 rounds: exactly 3 admitted, each holding its
/// lease; no answer ever sees more than 3 in flight (a request the rates
/// deny never holds a slot, not even while its rates are decided); and,
/// asked one at a time, each decision is exactly one script call.
async fn rates_and_a_lease_are_one_step(a: RedisStore, b: RedisStore, ports: &[u16]) {
    let rules = rules(POOLS);
    let replicas = [
        Arc::new(Limiter::new(rules.clone(), a)),
        Arc::new(Limiter::new(rules, b)),
    ];
    let ttl = Some(Duration::from_secs(30));
    for round in 0..5 {
        let identity = format!("gated-{round}");
        let answers = join_all((0..200).map(|i| {
            let l = replicas[i % 2].clone();
            let identity = identity.clone();
            async move {
                let req = Request::new("gate", &identity, "chat");
                let id = format!("req-{i}");
                let rules = l.rules();
                l.decide_leased(&rules, &req, &id, ttl)
                    .await
                    .expect("the store answers")
            }
        }))
        .await;
        let admitted: Vec<_> = answers.iter().filter(|(d, _)| d.allowed).collect();
        assert_eq!(admitted.len(), 3, "round {round}");
        for (d, lease) in &answers {
            let lease = lease.as_ref().expect("a pool applies");
            assert_eq!(lease.ok, d.allowed, "round {round}: {d:?} {lease:?}");
            assert!(
                lease.in_flight <= 3,
                "round {round}: a denied request held a slot: {lease:?}"
            );
        }
        let probe = lease(
            &replicas[0],
            "gate",
            &identity,
            "probe",
            LeaseAction::Release,
        )
        .await;
        assert_eq!(probe.expect("answers").in_flight, 3, "round {round}");
    }
    let before = evalsha_calls(ports);
    for i in 0..10 {
        let l = &replicas[i % 2];
        let req = Request::new("gate", "one-at-a-time", "chat");
        l.decide_leased(&l.rules(), &req, &format!("seq-{i}"), ttl)
            .await
            .expect("the store answers");
    }
    assert_eq!(
        evalsha_calls(ports) - before,
        10,
        "one script call per decision, allowed or denied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rates_and_a_lease_are_one_step_on_standalone() {
    let redis = Standalone::start();
    let ports = [redis.server.port];
    rates_and_a_lease_are_one_step(redis.store("gate"), redis.store("gate"), &ports).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rates_and_a_lease_are_one_step_on_sentinel() {
    let redis = tokio::task::spawn_blocking(Sentinel::start).await.unwrap();
    let ports = [redis.primary.port];
    rates_and_a_lease_are_one_step(redis.store("gate"), redis.store("gate"), &ports).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rates_and_a_lease_are_one_step_on_cluster() {
    let redis = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let ports: Vec<u16> = redis.nodes.iter().map(|n| n.port).collect();
    rates_and_a_lease_are_one_step(redis.store("gate"), redis.store("gate"), &ports).await;
}

/// On Redis a pool's two keys live exactly as long as its latest live
/// lease: set by the acquire that makes the pool, grown (never shortened)
/// by one that outlives the rest, cut back by a release, gone with the
/// last lease; and the same for a lease taken with a request's rates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_s_keys_live_as_long_as_its_latest_lease_on_redis() {
    let redis = Standalone::start();
    let l = Limiter::new(rules(POOLS), redis.store("pool-ttl"));
    let mut c = crate::common::redis::conn(redis.server.port).unwrap();
    let mut ttls = |pattern: &str| -> Vec<i64> {
        let mut keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query(&mut c).unwrap();
        keys.sort();
        keys.iter()
            .map(|k| redis::cmd("PTTL").arg(k).query(&mut c).unwrap())
            .collect()
    };
    let pattern = "test:pool-ttl:*%lease*:gina:*";
    let within = |ttls: &[i64], secs: i64| {
        ttls.len() == 2
            && ttls
                .iter()
                .all(|&t| t > (secs - 2) * 1000 && t <= secs * 1000)
    };
    let take = async |id: &str, secs: u64| {
        let d = lease(&l, "llm", "gina", id, acquire(Duration::from_secs(secs))).await;
        assert!(d.expect("answers").ok, "{id}");
    };
    take("short", 10).await;
    assert!(within(&ttls(pattern), 10), "{:?}", ttls(pattern));
    take("long", 50).await;
    assert!(within(&ttls(pattern), 50), "grown: {:?}", ttls(pattern));
    take("middle", 30).await;
    assert!(
        within(&ttls(pattern), 50),
        "never shortened: {:?}",
        ttls(pattern)
    );
    lease(&l, "llm", "gina", "long", LeaseAction::Release)
        .await
        .unwrap();
    assert!(within(&ttls(pattern), 30), "cut back: {:?}", ttls(pattern));
    for id in ["short", "middle"] {
        lease(&l, "llm", "gina", id, LeaseAction::Release)
            .await
            .unwrap();
    }
    assert!(ttls(pattern).is_empty(), "gone with the last lease");
    // The same through the decision script, with the rates.
    let req = Request::new("gate", "gina", "chat");
    let ttl = Some(Duration::from_secs(20));
    let (d, _) = l.decide_leased(&l.rules(), &req, "g1", ttl).await.unwrap();
    assert!(d.allowed);
    assert!(within(&ttls(pattern), 20), "{:?}", ttls(pattern));
}
