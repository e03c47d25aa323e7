//! Sentinel failover and Redis Cluster, against real processes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::redis::{Cluster, Sentinel, conn, node_id};
use crate::common::store::Load;
use tokio::time::Instant;
use tollgate::store::redis::keys::bucket_key;
use tollgate::store::{Charge, Store, StoreExt};

/// A charge of 1 from a bucket of a million tokens per 10^7 s: the bucket
/// outlives the test (each token takes 10 s to return) and never runs dry.
fn charge<'a>(scope: &'a str, identity: &'a str) -> Charge<'a> {
    let mut c = crate::common::store::charge(
        identity,
        1_000_000,
        Duration::from_nanos(10_000_000_000_000_000),
    );
    c.buckets[0].key.scope = scope;
    c
}

fn role(port: u16) -> String {
    conn(port)
        .and_then(|mut c| redis::cmd("ROLE").query::<Vec<redis::Value>>(&mut c))
        .ok()
        .and_then(|v| v.into_iter().next())
        .and_then(|v| redis::from_redis_value::<String>(v).ok())
        .unwrap_or_default()
}

/// Decides continuously from 4 tasks, each its own identity; a task backs
/// off 5 ms after a failure.
fn start_load(store: &(impl Store + Clone)) -> Load {
    let store = store.clone();
    Load::start(4, Duration::from_millis(5), move |i| {
        let store = store.clone();
        async move {
            let id = format!("user-{i}");
            store.check_and_take(&[charge("load", &id)]).await.is_ok()
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_is_followed_without_restart() {
    let mut topo = tokio::task::spawn_blocking(Sentinel::start).await.unwrap();
    let store = topo.store("failover");
    let _prober = store.spawn_prober(Duration::from_millis(200));
    let load = start_load(&store);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        load.ok.load(Ordering::Relaxed) > 0,
        "decisions before failover"
    );

    // Kill the primary outright: the sentinels notice (down-after 1 s) and
    // promote the replica; new connections ask them where the primary is.
    let t = Instant::now();
    topo.primary.kill();
    let recovery = load.recovered(t, Duration::from_secs(30)).await;
    assert_eq!(role(topo.replica.port), "master");
    let (ok, failed) = load.stop().await;
    eprintln!(
        "primary killed: decisions resumed after {recovery:?} ({ok} decided, {failed} failed during the run)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_spreads_scopes_over_slots_and_reloads_flushed_scripts() {
    let topo = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let store = topo.store("cluster");
    let scopes: Vec<String> = (0..60).map(|i| format!("scope-{i}")).collect();

    // One batch, many scopes: split by slot, each piece one pipeline.
    let batch: Vec<Charge<'_>> = scopes.iter().map(|s| charge(s, "alice")).collect();
    let out = store.check_and_take(&batch).await.unwrap();
    assert!(
        out.iter()
            .all(|o| o.allowed && o.buckets[0].remaining == 999_999)
    );
    for node in &topo.nodes {
        let keys: i64 = redis::cmd("DBSIZE")
            .query(&mut conn(node.port).unwrap())
            .unwrap();
        assert!(keys > 5, "node {} holds {keys} buckets", node.port);
    }

    // Every node forgets the script (as a fresh or promoted node would).
    for node in &topo.nodes {
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query(&mut conn(node.port).unwrap())
            .unwrap();
    }
    let out = store.check_and_take(&batch).await.unwrap();
    assert!(
        out.iter()
            .all(|o| o.allowed && o.buckets[0].remaining == 999_998),
        "reloaded, and each charge taken exactly once"
    );

    // A charge mixing scopes spans slots: reserve in each, refund on denial.
    let narrow = |scope| {
        let mut c = charge(scope, "carol");
        c.buckets[0].shape.capacity = 1;
        c.buckets[0]
    };
    let wide = charge("scope-1", "carol").buckets[0];
    let mixed = Charge {
        buckets: smallvec::smallvec![wide, narrow("scope-2"), narrow("scope-3")],
        dry_run: false,
        marks: false,
        lease: None,
        open: None,
        penalty: None,
    };
    let out = store
        .check_and_take(std::slice::from_ref(&mixed))
        .await
        .unwrap();
    assert!(out[0].allowed);
    let left: Vec<u64> = out[0].buckets.iter().map(|b| b.remaining).collect();
    assert_eq!(left, [999_999, 0, 0]);
    // Now the narrow buckets are empty: denied, and the wide one, reserved
    // in its own slot first, is given back, to its exact stored state.
    let wide_state = || {
        topo.nodes.iter().find_map(|n| {
            redis::cmd("GET")
                .arg(bucket_key("test:cluster:", &wide))
                .query::<Option<Vec<u8>>>(&mut conn(n.port).ok()?)
                .ok()
                .flatten()
        })
    };
    // The TAT and birth (the first 20 bytes) come back exactly; the ledger
    // after them records the refunds given.
    let tat = |v: Vec<u8>| v[..20].to_vec();
    let before = tat(wide_state().expect("the wide bucket is stored"));
    for _ in 0..3 {
        let out = store
            .check_and_take(std::slice::from_ref(&mixed))
            .await
            .unwrap();
        assert!(!out[0].allowed);
        assert!(out[0].buckets[0].conforms && !out[0].buckets[1].conforms);
        assert!(out[0].buckets[1].retry_after.is_some());
        assert_eq!(out[0].buckets[0].remaining, 999_999, "refunded");
    }
    assert_eq!(
        wide_state().map(tat),
        Some(before),
        "the refund undid the reservation exactly"
    );
    let alone = store
        .check_and_take(&[charge("scope-1", "carol")])
        .await
        .unwrap();
    assert_eq!(
        alone[0].buckets[0].remaining, 999_998,
        "a denied cross-slot charge took nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_follows_a_slot_that_moves_between_nodes() {
    let topo = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let store = topo.store("moving");
    let c = charge("roaming", "dave");
    let out = store
        .check_and_take(std::slice::from_ref(&c))
        .await
        .unwrap();
    assert_eq!(out[0].buckets[0].remaining, 999_999);

    // Migrate the scope's slot, with its key, to another primary.
    let key = &bucket_key("test:moving:", &c.buckets[0]);
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(&mut conn(topo.nodes[0].port).unwrap())
        .unwrap();
    let ports: Vec<u16> = topo.nodes.iter().map(|n| n.port).collect();
    let from = *ports
        .iter()
        .find(|&&p| {
            redis::cmd("EXISTS")
                .arg(key)
                .query::<i64>(&mut conn(p).unwrap())
                .is_ok_and(|n| n == 1)
        })
        .expect("one node owns the key");
    let to = *ports.iter().find(|&&p| p != from).unwrap();
    let (from_id, to_id) = (node_id(from), node_id(to));
    let setslot = |port: u16, args: &[&str]| {
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(args)
            .query(&mut conn(port).unwrap())
            .unwrap();
    };
    setslot(to, &["IMPORTING", &from_id]);
    setslot(from, &["MIGRATING", &to_id]);
    let _: () = redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(to)
        .arg("")
        .arg(0)
        .arg(5000)
        .arg("KEYS")
        .arg(key)
        .query(&mut conn(from).unwrap())
        .unwrap();
    for &p in &ports {
        setslot(p, &["NODE", &to_id]);
    }

    // The store's slot map is stale: MOVED sends it to the new owner, and
    // the bucket's state moved along with the key.
    let out = store
        .check_and_take(std::slice::from_ref(&c))
        .await
        .unwrap();
    assert!(out[0].allowed);
    assert_eq!(out[0].buckets[0].remaining, 999_998);
    let moved: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query(&mut conn(to).unwrap())
        .unwrap();
    assert_eq!(moved, 1, "written on the new owner");
}
