//! Each finding of issue 9, as the test that caught it: over-admission
//! paths, leaks in the memory bound, batches where one charge's failure
//! decided another's, reloads that kept stale state, and silent Redis
//! failures. The fault matrix itself is in `fault_matrix.rs`.

use std::time::Duration;

use tollgate::bucket::Shape;
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
