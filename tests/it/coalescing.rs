//! Coalescing on Redis: concurrent decisions share script calls, each still
//! atomic on its own, and replicas together never admit more than the limit.

use std::time::Duration;

use futures_util::future::join_all;

use crate::common::TestServer;
use crate::common::redis::{Standalone, conn, evalsha_calls};
use tollgate::config::Config;
use tollgate::pb::tollgate::v1::ShouldAllowRequest;
use tollgate::store::redis::keys::bucket_key;
use tollgate::store::{Charge, Store, StoreExt};

/// A charge of 1 from a bucket of 3 tokens per minute.
fn charge(identity: &str) -> Charge<'_> {
    crate::common::store::charge(identity, 3, Duration::from_secs(60))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_admit_exactly_the_limit_in_every_round() {
    let redis = Standalone::start();
    let yaml = format!(
        r#"
store:
  kind: redis
  redis:
    urls: ["{}"]
    key_prefix: "test:replicas:"
    response_timeout: 2s
    wait_timeout: 2s
    connect_timeout: 2s
failure_mode: closed
scopes:
  - name: s
    limits:
      - {{ name: per-user, per: identity, capacity: 10, refill_period: 1h }}
"#,
        redis.url()
    );
    let config = || Config::from_yaml(&yaml).unwrap();
    assert!(
        config().store.deny_cache_on(),
        "the deny cache is on for Redis"
    );
    let replicas = [
        TestServer::start_config(config()).await,
        TestServer::start_config(config()).await,
    ];
    let clients = [replicas[0].client().await, replicas[1].client().await];
    let calls_before = evalsha_calls(&[redis.server.port]);
    for round in 0..5 {
        let identity = format!("fresh-{round}");
        let calls = (0..100).map(|i| {
            let mut client = clients[i % 2].clone();
            let request = ShouldAllowRequest {
                scope: "s".into(),
                identity: identity.clone(),
                operation: "op".into(),
                ..Default::default()
            };
            tokio::spawn(async move { client.should_allow(request).await })
        });
        let mut admitted = 0;
        for answer in join_all(calls).await {
            let answer = answer.unwrap().expect("no store error").into_inner();
            assert!(!answer.degraded);
            admitted += u32::from(answer.allowed);
        }
        assert_eq!(admitted, 10, "round {round}: exactly the limit");
    }
    let calls = evalsha_calls(&[redis.server.port]) - calls_before;
    eprintln!("500 decisions on 2 replicas: {calls} EVALSHA");
    assert!(calls < 500, "{calls} script calls for 500 decisions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_charges_share_script_calls_and_each_is_decided_alone() {
    let redis = Standalone::start();
    let store = redis.store("coalesce");
    let ids: Vec<String> = (0..200).map(|i| format!("user-{}", i % 50)).collect();
    let before = evalsha_calls(&[redis.server.port]);
    let outcomes = join_all(ids.iter().map(|id| {
        let store = store.clone();
        let id = id.clone();
        tokio::spawn(async move { store.check_and_take(&[charge(&id)]).await })
    }))
    .await;
    let calls = evalsha_calls(&[redis.server.port]) - before;
    let allowed = outcomes
        .into_iter()
        .filter(|o| o.as_ref().unwrap().as_ref().unwrap()[0].allowed)
        .count();
    eprintln!("200 concurrent decisions: {calls} EVALSHA");
    // 50 identities of capacity 3, four calls each.
    assert_eq!(allowed, 150);
    assert!(
        calls < 200,
        "{calls} script calls for 200 concurrent decisions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_whose_key_fails_fails_alone_in_its_batch() {
    let redis = Standalone::start();
    let store = redis.store("alone");
    // A key of another type where one bucket should be.
    let _: () = redis::cmd("LPUSH")
        .arg(bucket_key("test:alone:", &charge("broken").buckets[0]))
        .arg("x")
        .query(&mut conn(redis.server.port).unwrap())
        .unwrap();
    for _ in 0..5 {
        let ids: [&'static str; 8] = ["broken", "a", "b", "c", "d", "e", "f", "g"];
        let outcomes = join_all(ids.into_iter().map(|id| {
            let store = store.clone();
            tokio::spawn(async move { store.check_and_take(&[charge(id)]).await })
        }))
        .await;
        for (id, o) in ids.iter().zip(outcomes) {
            let o = o.unwrap();
            if *id == "broken" {
                let e = o.unwrap_err();
                assert!(!e.transient, "about the key, not Redis: {e}");
            } else {
                o.unwrap();
            }
        }
    }
    assert!(
        store.is_available(),
        "one bad key does not open the breaker"
    );
    // The failed charge wrote nothing: the key is still the list it was.
    let items: Vec<String> = redis::cmd("LRANGE")
        .arg(bucket_key("test:alone:", &charge("broken").buckets[0]))
        .arg(0)
        .arg(-1)
        .query(&mut conn(redis.server.port).unwrap())
        .unwrap();
    assert_eq!(items, ["x"]);
}

/// A charge of 1 from each of the buckets `rules` of `identity`, each of
/// `capacity` tokens per minute.
fn several<'a>(identity: &'a str, rules: &[&'static str], capacity: u64) -> Charge<'a> {
    let mut c = crate::common::store::charge(identity, capacity, Duration::from_secs(60));
    let first = c.buckets[0];
    c.buckets.clear();
    for rule in rules {
        let mut b = first;
        b.key.rule = rule;
        c.buckets.push(b);
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_of_several_buckets_with_a_key_of_another_type_fails_having_changed_nothing() {
    let redis = Standalone::start();
    let store = redis.store("several");
    let mut admin = conn(redis.server.port).unwrap();
    let key = |c: &Charge<'_>, i: usize| bucket_key("test:several:", &c.buckets[i]);
    let value = |admin: &mut redis::Connection, k: &str| -> Option<Vec<u8>> {
        redis::cmd("GET").arg(k).query(admin).unwrap()
    };
    let exists = |admin: &mut redis::Connection, k: &str| -> bool {
        redis::cmd("EXISTS").arg(k).query(admin).unwrap()
    };
    // A key of another type where a bucket should be.
    let list_at = |admin: &mut redis::Connection, k: &str| {
        let _: () = redis::cmd("LPUSH").arg(k).arg("x").query(admin).unwrap();
    };

    // Taken: bucket a absent, b a list, c holding state.
    let c = several("u", &["a", "b", "c"], 3);
    store
        .check_and_take(&[several("u", &["c"], 3)])
        .await
        .unwrap();
    list_at(&mut admin, &key(&c, 1));
    let held = value(&mut admin, &key(&c, 2)).expect("c holds state");
    let e = store
        .check_and_take(std::slice::from_ref(&c))
        .await
        .unwrap_err();
    assert!(!e.transient, "about the key, not Redis: {e}");
    assert!(!exists(&mut admin, &key(&c, 0)), "bucket a was not made");
    assert_eq!(
        value(&mut admin, &key(&c, 2)),
        Some(held),
        "bucket c untouched"
    );
    let items: Vec<String> = redis::cmd("LRANGE")
        .arg(key(&c, 1))
        .arg(0)
        .arg(-1)
        .query(&mut admin)
        .unwrap();
    assert_eq!(items, ["x"], "the list untouched");

    // Denied by bucket a, with b a list: still a failure, not a denial.
    let d = several("v", &["a", "b", "c"], 1);
    store
        .check_and_take(&[several("v", &["a"], 1)])
        .await
        .unwrap();
    list_at(&mut admin, &key(&d, 1));
    let e = store
        .check_and_take(std::slice::from_ref(&d))
        .await
        .unwrap_err();
    assert!(!e.transient, "about the key, not Redis: {e}");
    assert!(!exists(&mut admin, &key(&d, 2)), "bucket c was not made");

    // A charge naming one bucket twice, absent: taken, as decide() takes it.
    let twice = several("w", &["a", "a"], 3);
    assert!(store.check_and_take(&[twice]).await.unwrap()[0].allowed);
}
