//! Each finding of issue 9, as the test that caught it: over-admission
//! paths, leaks in the memory bound, batches where one charge's failure
//! decided another's, reloads that kept stale state, and silent Redis
//! failures. The fault matrix itself is in `fault_matrix.rs`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use crate::common::proxy::Proxy;
use crate::common::redis::{
    Cluster, Sentinel, Standalone, conn, free_port, node_id, scope_on, store_config,
};
use crate::common::store::{Load, charge};
use tollgate::bucket::Shape;
use tollgate::config::{Config, RedisConfig, RedisMode};
use tollgate::limiter::{Limiter, Request, Rules};
use tollgate::store::memory::MemoryStore;
use tollgate::store::redis::RedisStore;
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
            hash_tag: Default::default(),
        },
        shape: Shape {
            capacity,
            period: 3600 * SEC,
        },
        cost: 1,
        shadow: false,
        reserve: 0,
        window: None,
        max_delay: std::time::Duration::ZERO,
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
                buckets: smallvec::smallvec![scope, shadow],
                dry_run: false,
                marks: false,
                lease: None,
                open: None,
                penalty: None,
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
        buckets: smallvec::smallvec![bucket("per-user", Some(id), 1)],
        dry_run: false,
        marks: false,
        lease: None,
        open: None,
        penalty: None,
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
            buckets: smallvec::smallvec![bucket("per-user", Some(id), 10)],
            dry_run: false,
            marks: false,
            lease: None,
            open: None,
            penalty: None,
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
            buckets: smallvec::smallvec![bucket("per-user", Some(id), 10)],
            dry_run: false,
            marks: false,
            lease: None,
            open: None,
            penalty: None,
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
            buckets: smallvec::smallvec![bucket("per-user", Some(id), 2)],
            dry_run: false,
            marks: false,
            lease: None,
            open: None,
            penalty: None,
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

/// Calls `check_and_take_one` from `callers` tasks, each its own identity on
/// `scope`; a task backs off 2 ms after a failure.
fn start_load(store: &RedisStore, scope: &'static str, callers: usize) -> Load {
    let store = store.clone();
    Load::start(callers, Duration::from_millis(2), move |i| {
        let store = store.clone();
        async move {
            let id = format!("caller-{i}");
            let c = one_charge(scope, &id, 1_000_000);
            store.check_and_take_one(&c).await.is_ok()
        }
    })
}

fn fast_config(urls: Vec<String>, mode: RedisMode, prefix: &str) -> RedisConfig {
    RedisConfig {
        response_timeout: Duration::from_millis(100),
        connect_timeout: Duration::from_millis(300),
        breaker_cool_down: Duration::from_millis(200),
        ..store_config(mode, urls, prefix)
    }
}

/// Finding 4: a network blackhole between Tollgate and Redis (no answer, no
/// reset) opens the breaker within about two response timeouts, and when
/// it lifts, decisions resume on new connections: a lane drops a
/// connection after two timeouts in a row instead of keeping it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_redis_is_detected_fast_and_left_for_new_connections() {
    let redis = Standalone::start();
    let proxy = Proxy::start(redis.server.port).await;
    let config = fast_config(vec![proxy.url()], RedisMode::Standalone, "blackhole");
    let store = RedisStore::new(&config).unwrap();
    let _prober = store.spawn_prober(config.breaker_cool_down);
    let load = start_load(&store, "blackhole", 8);
    assert!(load.succeeds(50, Duration::from_secs(5)).await.is_some());

    proxy.blackhole();
    let t = Instant::now();
    while store.is_available() {
        assert!(t.elapsed() < Duration::from_secs(2), "never detected");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let detected = t.elapsed();
    assert!(
        detected <= 2 * config.response_timeout + Duration::from_millis(50),
        "detected after {detected:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert!(
        load.failed.load(Ordering::Relaxed) > 0,
        "the outage was felt"
    );
    proxy.lift();
    let back = load.succeeds(50, Duration::from_secs(5)).await;
    load.stop().await;
    let back = back.expect("decisions resume once the blackhole lifts");
    eprintln!("blackhole: detected after {detected:?}, back {back:?} after it lifted");
}

/// Finding 4: a Sentinel primary that goes silent (SIGSTOP: sockets open,
/// no answers) is left for the promoted replica without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_sentinel_primary_is_left_for_the_promoted_replica() {
    let topo = tokio::task::spawn_blocking(Sentinel::start).await.unwrap();
    let config = fast_config(topo.urls(), RedisMode::Sentinel, "sigstop");
    let store = RedisStore::new(&config).unwrap();
    let _prober = store.spawn_prober(config.breaker_cool_down);
    let load = start_load(&store, "sigstop", 8);
    assert!(load.succeeds(50, Duration::from_secs(5)).await.is_some());
    topo.primary.signal("STOP");
    let t = Instant::now();
    // The sentinels need down-after (1 s) plus an election to promote.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let back = load.succeeds(50, Duration::from_secs(15)).await;
    load.stop().await;
    topo.primary.signal("CONT");
    assert!(back.is_some(), "decisions never resumed on the new primary");
    eprintln!(
        "sentinel SIGSTOP: decisions resumed {:?} after the stop",
        t.elapsed()
    );
}

/// Finding 4, the harder case: the path to a Sentinel primary goes black
/// (no answers, no resets; the sentinels see it too and promote the
/// replica). Connections through the black path never fail by themselves;
/// they are dropped after two timeouts, and new ones find the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_sentinel_primary_is_left_for_the_promoted_replica() {
    let p = free_port();
    let proxy = Proxy::start(p).await;
    let via = proxy.port;
    let topo = tokio::task::spawn_blocking(move || Sentinel::start_at(p, via))
        .await
        .unwrap();
    let config = fast_config(topo.urls(), RedisMode::Sentinel, "blackhole-sentinel");
    let store = RedisStore::new(&config).unwrap();
    let _prober = store.spawn_prober(config.breaker_cool_down);
    let load = start_load(&store, "bh-sentinel", 8);
    assert!(load.succeeds(50, Duration::from_secs(5)).await.is_some());
    proxy.blackhole();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        load.failed.load(Ordering::Relaxed) > 0,
        "the outage was felt"
    );
    let back = load.succeeds(50, Duration::from_secs(15)).await;
    load.stop().await;
    assert!(back.is_some(), "decisions never resumed on the new primary");
    eprintln!(
        "sentinel blackhole: decisions resumed {:?} after it began",
        t.elapsed()
    );
}

/// A charge of 1 from `scope`'s bucket `r`/`identity` of `capacity` tokens
/// per hour.
fn one_charge<'a>(scope: &'a str, identity: &'a str, capacity: u64) -> Charge<'a> {
    let mut c = charge(identity, capacity, Duration::from_secs(3600));
    c.buckets[0].key.scope = scope;
    c
}

/// Finding 5: during a slot migration, a batch whose charges meet both the
/// source (key still there) and the target (`ASK`) is judged once per
/// charge. The client library used to resend the whole pipeline to the
/// target, where the exhausted caller's key is absent: allowed after the
/// source had denied it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_migration_never_runs_a_script_twice() {
    let topo = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let from = topo.nodes[0].port;
    let to = topo.nodes[1].port;
    let scope = scope_on(from, "mig");
    let store = RedisStore::new(&store_config(RedisMode::Cluster, topo.urls(), "migrate")).unwrap();
    let spent = one_charge(&scope, "spent", 1);
    assert!(store.check_and_take_one(&spent).await.unwrap().allowed);
    assert!(!store.check_and_take_one(&spent).await.unwrap().allowed);

    // Start migrating the slot; spent's key stays on the source for now.
    let slot: i64 = ::redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&scope)
        .query(&mut conn(from).unwrap())
        .unwrap();
    let setslot = |port: u16, args: &[&str]| {
        let _: () = ::redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(args)
            .query(&mut conn(port).unwrap())
            .unwrap();
    };
    setslot(to, &["IMPORTING", &node_id(from)]);
    setslot(from, &["MIGRATING", &node_id(to)]);

    for round in 0..3 {
        let fresh = format!("fresh-{round}");
        let got = store
            .check_and_take_each(&[
                one_charge(&scope, "spent", 1),
                one_charge(&scope, &fresh, 1),
            ])
            .await;
        let spent_out = got[0].as_ref().expect("decided on the source");
        assert!(!spent_out.allowed, "round {round}: spent was let through");
        assert!(got[1].as_ref().expect("decided on the target").allowed);
    }
    let on_target: Vec<String> = ::redis::cmd("KEYS")
        .arg("*spent*")
        .query(&mut conn(to).unwrap())
        .unwrap();
    assert!(
        on_target.is_empty(),
        "judged on the target too: {on_target:?}"
    );
}

/// Findings 7 and 8: with one Cluster primary silent, scopes on the live
/// shards are not slowed, the dead shard's calls fail fast once its own
/// breaker opens (successes elsewhere no longer reset it), and `NOSCRIPT`
/// recovery loads the script on the node that asked, not on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_cluster_shard_has_its_own_breaker_and_does_not_block_script_loads() {
    let topo = tokio::task::spawn_blocking(|| {
        Cluster::start_with(&["--cluster-require-full-coverage", "no"])
    })
    .await
    .unwrap();
    let (live, dead) = (topo.nodes[0].port, topo.nodes[2].port);
    let (live_scope, dead_scope) = (scope_on(live, "live"), scope_on(dead, "dead"));
    let config = fast_config(topo.urls(), RedisMode::Cluster, "dead-shard");
    let store = RedisStore::new(&config).unwrap();
    for scope in [&live_scope, &dead_scope] {
        assert!(
            store
                .check_and_take_one(&one_charge(scope, "a", 1_000))
                .await
                .unwrap()
                .allowed
        );
    }
    topo.nodes[2].signal("STOP");
    let _: () = ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut conn(live).unwrap())
        .unwrap();

    let mut slow_dead = 0;
    for i in 0..30 {
        let t = Instant::now();
        let ok = store
            .check_and_take_one(&one_charge(&live_scope, "a", 1_000))
            .await;
        assert!(ok.is_ok(), "call {i}: the live shard answers: {ok:?}");
        assert!(
            t.elapsed() < config.response_timeout,
            "live call took {:?}",
            t.elapsed()
        );
        let t = Instant::now();
        assert!(
            store
                .check_and_take_one(&one_charge(&dead_scope, "a", 1_000))
                .await
                .is_err()
        );
        slow_dead += usize::from(t.elapsed() >= config.response_timeout / 2);
    }
    topo.nodes[2].signal("CONT");
    // The breaker's threshold (3), then about one probe per cool-down.
    assert!(
        slow_dead <= 6,
        "{slow_dead} of 30 dead-shard calls paid the timeout"
    );
}

/// Finding 8: the settings a reload cannot apply are named.
#[test]
fn restart_only_settings_are_told_apart_from_reloadable_ones() {
    let old = Config::from_yaml("scopes: []\n").unwrap();
    let same =
        Config::from_yaml("drain_delay: 3s\nenvoy_response_headers: true\nscopes: []\n").unwrap();
    assert!(tollgate::reload::restart_only_changes(&old, &same).is_empty());
    let new = Config::from_yaml(
        "listen: 127.0.0.1:1\nlog: {format: json}\nmetrics: {listen: 127.0.0.1:2}\nstore: {memory: {shards: 2}}\nshutdown_grace: 1s\nscopes: []\n",
    )
    .unwrap();
    assert_eq!(
        tollgate::reload::restart_only_changes(&old, &new),
        ["listen", "store", "log", "metrics", "shutdown_grace"]
    );
}

/// Finding 8: Envoy's API decides on the rule snapshot it read the
/// descriptor keys from, even when a reload swaps the rules in between.
#[tokio::test]
async fn a_decision_uses_the_snapshot_it_was_given() {
    let limiter = Limiter::new(rules("capacity: 1, refill_period: 1h"), MemoryStore::new(1));
    let old = limiter.rules();
    limiter.replace_rules(rules("capacity: 50, refill_period: 1h"));
    let d = limiter
        .decide_together_on(&old, &[Request::new("s", "eve", "op")])
        .await
        .unwrap();
    assert_eq!(d[0].buckets[0].limit, 1, "the old snapshot's limit");
}
