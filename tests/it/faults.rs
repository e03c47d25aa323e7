//! Each finding of issue 9, as the test that caught it: over-admission
//! paths, leaks in the memory bound, batches where one charge's failure
//! decided another's, reloads that kept stale state, and silent Redis
//! failures. The fault matrix itself is in `fault_matrix.rs`.

use std::time::Duration;

use crate::common::redis::{Standalone, conn};
use tollgate::bucket::Shape;
use tollgate::config::Config;
use tollgate::limiter::{Limiter, Request, Rules};
use tollgate::store::memory::MemoryStore;
use tollgate::store::{BucketCharge, BucketKey, Charge, Store};

const SEC: u64 = 1_000_000_000;

fn bucket<'a>(rule: &'a str, identity: Option<&'a str>, capacity: u64) -> BucketCharge<'a> {
    BucketCharge {
        key: BucketKey {
            scope: "s",
            rule,
            identity,
            operation: None,
        },
        shape: Shape {
            capacity,
            period: 3600 * SEC,
        },
        cost: 1,
        shadow: false,
    }
}

/// Finding 1: an absent shadow bucket that cannot hold the cost was counted
/// against the bound but never inserted, so the store filled up for good.
#[tokio::test]
async fn absent_shadow_buckets_that_cannot_pay_do_not_fill_the_memory_bound() {
    let store = MemoryStore::with_max_buckets(1, 5);
    let ids: Vec<String> = (0..50).map(|i| format!("id{i}")).collect();
    for id in &ids {
        let mut scope = bucket("per-scope", None, 1_000);
        scope.cost = 2;
        let mut shadow = bucket("shadow", Some(id), 1);
        shadow.shadow = true;
        shadow.cost = 2;
        let out = store
            .check_and_take_one(&Charge {
                buckets: vec![scope, shadow],
                dry_run: false,
            })
            .await
            .expect("the store is not full: only the scope's bucket is held");
        assert!(out.allowed);
    }
    assert_eq!(store.len(), 1);
}

fn limiter(yaml: &str, store: MemoryStore) -> Limiter<MemoryStore> {
    let config = Config::from_yaml(yaml).expect("valid config");
    Limiter::new(Rules::compile(&config).expect("rules"), store)
}

/// Finding 2, embedded store: in a batch, a fresh identity that meets a full
/// store must not turn an exhausted identity's denial into a degraded allow.
#[tokio::test]
async fn in_a_batch_one_failed_charge_does_not_decide_the_others() {
    let yaml = "scopes:\n  - name: s\n    limits:\n      - { name: per-user, per: identity, capacity: 1, refill_period: 1h }\n";
    let limiter = limiter(yaml, MemoryStore::with_max_buckets(1, 1));
    let spent = Request::new("s", "spent", "op");
    assert!(limiter.decide(&spent).await.unwrap().allowed);
    for _ in 0..3 {
        let got = limiter
            .decide_each(&[spent, Request::new("s", "fresh", "op")])
            .await;
        let spent = got[0].as_ref().unwrap();
        assert!(!spent.allowed && !spent.degraded, "{spent:?}");
        assert!(spent.retry_after.is_some());
        let fresh = got[1].as_ref().unwrap();
        assert!(fresh.allowed && fresh.degraded, "the full store fails open");
    }
}

/// Finding 2, Redis: a pipeline in which one script call fails still
/// reports the others' outcomes, which were decided and charged.
#[tokio::test]
async fn in_a_redis_pipeline_one_failed_reply_does_not_fail_the_others() {
    let redis = Standalone::start();
    let store = redis.store("batch-indep");
    let charge = |id: &'static str| Charge {
        buckets: vec![bucket("per-user", Some(id), 1)],
        dry_run: false,
    };
    assert!(
        store
            .check_and_take_one(&charge("spent"))
            .await
            .unwrap()
            .allowed
    );
    // A key of the wrong type makes that one script call fail.
    let mut admin = conn(redis.server.port).unwrap();
    let _: () = ::redis::cmd("HSET")
        .arg("test:batch-indep:{s}:per-user:broken:*")
        .arg("f")
        .arg("v")
        .query(&mut admin)
        .unwrap();
    let got = store
        .check_and_take_each(&[charge("spent"), charge("broken"), charge("fresh")])
        .await;
    let spent = got[0].as_ref().expect("decided");
    assert!(!spent.allowed, "spent stays denied");
    assert!(got[1].is_err(), "the broken key fails on its own");
    assert!(got[2].as_ref().expect("decided").allowed);
}
