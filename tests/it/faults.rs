//! Each finding of issue 9, as the test that caught it: over-admission
//! paths, leaks in the memory bound, batches where one charge's failure
//! decided another's, reloads that kept stale state, and silent Redis
//! failures. The fault matrix itself is in `fault_matrix.rs`.

use crate::common::redis::{Standalone, conn};
use tollgate::bucket::Shape;
use tollgate::config::Config;
use tollgate::limiter::{Limiter, Request, Rules};
use tollgate::store::memory::MemoryStore;
use tollgate::store::redis::keys::bucket_key;
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
    let store = MemoryStore::with_max_bytes(
        1,
        5 * MemoryStore::bytes_of(&bucket("per-scope", None, 1_000)),
    );
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
    let room = MemoryStore::bytes_of(&BucketCharge {
        shape: Shape {
            capacity: 1,
            period: 3600 * SEC,
        },
        ..bucket("per-user", Some("spent"), 1)
    });
    let limiter = limiter(yaml, MemoryStore::with_max_bytes(1, room));
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
        .arg(bucket_key(
            "test:batch-indep:",
            &charge("broken").buckets[0],
        ))
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

/// An identity as long as an Envoy descriptor used whole (64 × 16 entries
/// can run to 18 KB).
fn huge_identity(i: usize) -> String {
    format!("{i}:{}", "k=v,".repeat(4_500))
}

/// Finding 3, embedded store: the bound is in bytes, and long identities
/// are hashed, so a flood of 18 KB identities costs a few hundred bytes each.
#[tokio::test]
async fn the_memory_bound_is_in_bytes_and_long_identities_are_hashed() {
    let store = MemoryStore::with_max_bytes(1, 1 << 20);
    let ids: Vec<String> = (0..100).map(huge_identity).collect();
    for id in &ids {
        let c = Charge {
            buckets: vec![bucket("per-user", Some(id), 10)],
            dry_run: false,
        };
        assert!(store.check_and_take_one(&c).await.expect("room").allowed);
    }
    let per_bucket = store.bytes_held() / store.len();
    assert!(per_bucket < 300, "{per_bucket} bytes per bucket");
    // The bound holds in bytes: short keys or long, it stops at 1 MiB.
    let more: Vec<String> = (0..8_000).map(|i| format!("{i:0>100}")).collect();
    let mut refused = 0;
    for id in &more {
        let c = Charge {
            buckets: vec![bucket("per-user", Some(id), 10)],
            dry_run: false,
        };
        refused += usize::from(store.check_and_take_one(&c).await.is_err());
    }
    assert!(refused > 0);
    assert!(store.bytes_held() <= 1 << 20);
}

/// Finding 3, Redis: an 18 KB identity makes a key of a few hundred bytes,
/// not 31 KB, and two long identities still get two buckets.
#[tokio::test]
async fn redis_keys_stay_bounded_for_huge_identities() {
    let redis = Standalone::start();
    let store = redis.store("huge-keys");
    let (a, b) = (huge_identity(1), huge_identity(2));
    for id in [&a, &b, &a] {
        let c = Charge {
            buckets: vec![bucket("per-user", Some(id), 2)],
            dry_run: false,
        };
        assert!(store.check_and_take_one(&c).await.unwrap().allowed);
    }
    let mut admin = conn(redis.server.port).unwrap();
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("test:huge-keys:*")
        .query(&mut admin)
        .unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys.iter().all(|k| k.len() < 200), "{keys:?}");
}

fn rules(limit: &str) -> Rules {
    let yaml = format!(
        "scopes:\n  - name: s\n    limits:\n      - {{ name: per-user, per: identity, {limit} }}\n"
    );
    Rules::compile(&Config::from_yaml(&yaml).expect("valid")).expect("rules")
}

/// Finding 6: a reload that loosens a limit takes effect at once for a
/// caller already limited (it used to read the old state in new units:
/// `retry_after=3593s` after 1/h became 10/s).
#[tokio::test]
async fn loosening_a_limit_on_reload_takes_effect_at_once() {
    let limiter = Limiter::new(rules("capacity: 1, refill_period: 1h"), MemoryStore::new(1));
    let alice = Request::new("s", "alice", "op");
    assert!(limiter.decide(&alice).await.unwrap().allowed);
    assert!(!limiter.decide(&alice).await.unwrap().allowed);
    limiter.replace_rules(rules("capacity: 10, refill_period: 1s"));
    let d = limiter.decide(&alice).await.unwrap();
    assert!(d.allowed, "{d:?}");
}

/// Finding 6: tightening lets through at most one burst of the new capacity.
#[tokio::test]
async fn tightening_a_limit_on_reload_admits_at_most_one_new_burst() {
    let limiter = Limiter::new(
        rules("capacity: 100, refill_period: 1h"),
        MemoryStore::new(1),
    );
    let bob = Request::new("s", "bob", "op");
    for _ in 0..10 {
        assert!(limiter.decide(&bob).await.unwrap().allowed);
    }
    limiter.replace_rules(rules("capacity: 5, refill_period: 1h"));
    let mut allowed = 0;
    for _ in 0..20 {
        allowed += usize::from(limiter.decide(&bob).await.unwrap().allowed);
    }
    assert!(allowed <= 5, "{allowed} allowed after tightening to 5/h");
}
