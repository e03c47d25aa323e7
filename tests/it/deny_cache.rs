//! The deny cache, proved in both directions against the store it fronts:
//! it never allows what the store would deny (it only ever denies), and it
//! never denies what the store would allow, once the state has refilled.

use std::time::Duration;

use crate::common::redis::{Standalone, conn};
use tollgate::bucket::Shape;
use tollgate::store::deny_cache::{DenyCache, MAX_HOLD};
use tollgate::store::memory::MemoryStore;
use tollgate::store::{Charge, ChargeOutcome, SettleBucket, Settlement, Store};
use tollgate::window::Window;

/// A charge of `cost` from a bucket of 5 tokens per second.
fn charge(identity: &str, cost: u64) -> Charge<'_> {
    let mut c = crate::common::store::charge(identity, 5, Duration::from_secs(1));
    c.buckets[0].cost = cost;
    c
}

/// A charge of `cost` against a budget of 100 per `window`.
fn budget<'a>(identity: &'a str, window: &'a Window, cost: u64) -> Charge<'a> {
    let mut c = charge(identity, cost);
    c.buckets[0].shape = Shape {
        capacity: 100,
        period: window.nominal().as_nanos() as u64,
    };
    c.buckets[0].window = Some(window);
    c
}

/// EVALSHA calls since the last `CONFIG RESETSTAT`.
fn evalsha_calls(admin: &mut redis::Connection) -> u64 {
    let stats: String = redis::cmd("INFO").arg("commandstats").query(admin).unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|r| r.split(',').next()?.parse::<u64>().ok())
        .unwrap_or(0)
}

/// The outcome as a caller sees it: the raw state and the store's clock are
/// each store's own (two stores' clocks start apart), and a local answer
/// has neither.
async fn one(store: &impl Store, c: &Charge<'_>) -> ChargeOutcome {
    let mut o = store.check_and_take_one(c).await.unwrap();
    o.now_us = 0;
    for b in &mut o.buckets {
        b.mark = Default::default();
    }
    o
}

/// A small deterministic generator, so a failure replays.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

/// Walks `steps` random requests, waits and (when `others` is set) takes by
/// another replica behind the cache's back, on a cached and a plain store
/// kept in the same state. Returns (denials, local answers).
async fn walk(steps: u32, others: bool, seed: u64) -> (u32, u64) {
    let cached = DenyCache::new(MemoryStore::default(), true);
    let plain = MemoryStore::default();
    let mut rng = Lcg(seed);
    let mut denials = 0;
    for step in 0..steps {
        match rng.next(10) {
            0..=5 => {
                let c = charge("hot", 1 + rng.next(3));
                let got = one(&cached, &c).await;
                let want = one(&plain, &c).await;
                // Both directions: never allows what the store denies, never
                // denies what it allows.
                assert_eq!(
                    got.allowed, want.allowed,
                    "step {step}: {got:?} vs {want:?}"
                );
                let (g, w) = (got.buckets[0], want.buckets[0]);
                if others {
                    // Others' takes only push the real wait further out.
                    assert!(g.retry_after <= w.retry_after, "step {step}");
                } else {
                    assert_eq!(g, w, "step {step}: exact, retry_after included");
                }
                denials += u32::from(!got.allowed);
            }
            6 if others => {
                // Another replica: the same charge on both inner stores.
                let c = charge("hot", 1);
                assert_eq!(one(cached.inner(), &c).await, one(&plain, &c).await);
            }
            _ => tokio::time::advance(Duration::from_millis(rng.next(400))).await,
        }
    }
    (denials, cached.answered_locally())
}

#[tokio::test(start_paused = true)]
async fn a_cached_denial_is_the_store_s_own_answer_at_every_step() {
    let (denials, local) = walk(5_000, false, 7).await;
    assert!(denials > 500, "{denials} denials: the walk must deny often");
    assert!(
        local > 100,
        "{local} local answers: the cache must answer often"
    );
}

#[tokio::test(start_paused = true)]
async fn with_other_replicas_taking_the_cache_still_never_admits_nor_denies_early() {
    let (denials, local) = walk(5_000, true, 11).await;
    assert!(
        denials > 500 && local > 100,
        "{denials} denials, {local} local"
    );
}

#[tokio::test(start_paused = true)]
async fn the_cache_answers_only_until_the_wait_is_over_and_forgets_on_reload() {
    let cached = DenyCache::new(MemoryStore::default(), true);
    for _ in 0..5 {
        assert!(one(&cached, &charge("ann", 1)).await.allowed);
    }
    let denied = one(&cached, &charge("ann", 1)).await;
    let wait = denied.buckets[0].retry_after.unwrap();
    assert_eq!(wait, Duration::from_millis(200));
    assert_eq!(cached.len(), 1);
    tokio::time::advance(wait - Duration::from_nanos(1)).await;
    let again = one(&cached, &charge("ann", 1)).await;
    assert!(!again.allowed);
    assert_eq!(again.buckets[0].retry_after, Some(Duration::from_nanos(1)));
    // A different cost is another question: the store answers it.
    assert!(!one(&cached, &charge("ann", 2)).await.allowed);
    tokio::time::advance(Duration::from_nanos(1)).await;
    assert!(
        one(&cached, &charge("ann", 1)).await.allowed,
        "refilled: the store allows"
    );

    let _ = one(&cached, &charge("ann", 1)).await;
    assert!(!cached.is_empty());
    cached.rules_replaced(&[]);
    assert!(cached.is_empty(), "a reload clears the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_far_over_its_limit_stops_calling_redis_until_its_wait_is_over() {
    let redis = Standalone::start();
    let cached = DenyCache::new(redis.store("deny"), true);
    for _ in 0..5 {
        assert!(one(&cached, &charge("hot", 1)).await.allowed);
    }
    let mut admin = conn(redis.server.port).unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut admin)
        .unwrap();
    let first = one(&cached, &charge("hot", 1)).await;
    assert!(!first.allowed);
    let wait = first.buckets[0].retry_after.unwrap();
    let started = tokio::time::Instant::now();
    let mut denied = 0;
    while started.elapsed() < wait / 2 {
        let out = one(&cached, &charge("hot", 1)).await;
        assert!(!out.allowed);
        assert!(
            out.buckets[0].retry_after.unwrap() <= wait,
            "the wait only shrinks"
        );
        denied += 1;
    }
    let evalsha = evalsha_calls(&mut admin);
    eprintln!("{denied} denials, {evalsha} EVALSHA");
    assert!(denied > 100);
    assert_eq!(evalsha, 1, "only the first denial asked Redis");
    // Once the wait is over the store is asked again, and it allows.
    tokio::time::sleep_until(started + wait).await;
    assert!(one(&cached, &charge("hot", 1)).await.allowed);
}

#[tokio::test(start_paused = true)]
async fn a_budget_s_denial_is_held_for_the_hold_only_so_a_refund_elsewhere_is_seen() {
    // 10:00 UTC: the day's window ends in 14 hours.
    let ten = std::time::UNIX_EPOCH + Duration::from_secs(1_780_000_000 / 86_400 * 86_400 + 36_000);
    let day = Window::parse("day", None).unwrap();
    let cached = DenyCache::new(MemoryStore::with_wall_clock(4, 1 << 20, ten), true);
    assert!(one(&cached, &budget("team", &day, 60)).await.allowed);
    let first = one(&cached, &budget("team", &day, 60)).await;
    assert!(!first.allowed);
    assert_eq!(first.buckets[0].remaining, 40);
    let wait = first.buckets[0].retry_after.unwrap();
    assert_eq!(wait, Duration::from_secs(14 * 3600), "until the day ends");
    assert_eq!(
        cached.answered_locally(),
        0,
        "the first denial is the store's"
    );

    tokio::time::advance(MAX_HOLD / 2).await;
    let held = one(&cached, &budget("team", &day, 60)).await;
    assert_eq!(cached.answered_locally(), 1, "then answered here");
    assert!(!held.allowed);
    assert_eq!(held.buckets[0].retry_after, Some(wait - MAX_HOLD / 2));
    assert_eq!(held.buckets[0].remaining, 40);
    let plain = one(cached.inner(), &budget("team", &day, 60)).await;
    assert_eq!(held, plain, "the local answer is the store's own");

    // Another replica refunds the 60 behind this cache's back: the store
    // would now allow, the cache keeps denying until the hold is over...
    let refund = Settlement {
        buckets: vec![SettleBucket {
            charge: budget("team", &day, 60).buckets[0],
            actual: 0,
            mark: None,
        }],
        once: None,
    };
    cached.inner().settle(&refund).await.unwrap();
    tokio::time::advance(MAX_HOLD / 2 - Duration::from_nanos(1)).await;
    assert!(!one(&cached, &budget("team", &day, 60)).await.allowed);
    assert_eq!(cached.answered_locally(), 2);
    // ...and no longer: then the store is asked, and allows.
    tokio::time::advance(Duration::from_nanos(1)).await;
    assert!(one(&cached, &budget("team", &day, 60)).await.allowed);
    assert_eq!(cached.answered_locally(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_over_its_budget_asks_redis_once_per_hold() {
    let redis = Standalone::start();
    // A year-long window, so the test never straddles its end.
    let year = Window::parse("366d", None).unwrap();
    let cached = DenyCache::new(redis.store("budget-hold"), true);
    assert!(one(&cached, &budget("hot", &year, 100)).await.allowed);
    let mut admin = conn(redis.server.port).unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut admin)
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut denied = 0;
    while started.elapsed() < MAX_HOLD * 3 / 2 {
        assert!(!one(&cached, &budget("hot", &year, 1)).await.allowed);
        denied += 1;
    }
    let evalsha = evalsha_calls(&mut admin);
    eprintln!("{denied} denials, {evalsha} EVALSHA");
    assert!(denied > 100);
    // One at the start, one when the first hold ran out (the second holds
    // past the loop's end).
    assert_eq!(evalsha, 2, "{evalsha} EVALSHA for {denied} denials");
}

#[tokio::test(start_paused = true)]
async fn a_slow_bucket_s_denial_is_held_for_the_hold_only_too() {
    let cached = DenyCache::new(MemoryStore::default(), true);
    // Five a day: a denial waits hours.
    let slow = |cost| {
        let mut c = charge("slow", cost);
        c.buckets[0].shape.period = Duration::from_secs(86_400).as_nanos() as u64;
        c
    };
    for _ in 0..5 {
        assert!(one(&cached, &slow(1)).await.allowed);
    }
    let first = one(&cached, &slow(1)).await;
    assert!(!first.allowed);
    let wait = first.buckets[0].retry_after.unwrap();
    assert!(wait > Duration::from_secs(4 * 3600), "{wait:?}");
    // A refund on another replica gives a token back behind the cache.
    let refund = Settlement {
        buckets: vec![SettleBucket {
            charge: slow(1).buckets[0],
            actual: 0,
            mark: None,
        }],
        once: None,
    };
    cached.inner().settle(&refund).await.unwrap();
    tokio::time::advance(MAX_HOLD - Duration::from_nanos(1)).await;
    let held = one(&cached, &slow(1)).await;
    assert!(!held.allowed);
    assert_eq!(cached.answered_locally(), 1);
    assert_eq!(
        held.buckets[0].retry_after,
        Some(wait - (MAX_HOLD - Duration::from_nanos(1))),
        "the store's whole wait, shrinking"
    );
    tokio::time::advance(Duration::from_nanos(1)).await;
    assert!(
        one(&cached, &slow(1)).await.allowed,
        "the hold is over: the store is asked, and has the refunded token"
    );
}

/// A 16 KiB identity, distinct per `i`: as long as an Envoy descriptor
/// used whole gets.
fn long_identity(i: usize) -> String {
    format!("{i:08}-{}", "x".repeat(16 * 1024))
}

// Paused, so no held denial expires while the test fills the cache.
#[tokio::test(start_paused = true)]
async fn a_held_denial_costs_bounded_bytes_however_long_its_identity() {
    use tollgate::store::deny_cache::MAX_ENTRY_BYTES;
    let cache = DenyCache::new(MemoryStore::new(4), true);
    let n = 2_000;
    for i in 0..n {
        let who = long_identity(i);
        let c = crate::common::store::charge(&who, 1, Duration::from_secs(3600));
        assert!(one(&cache, &c).await.allowed);
        assert!(!one(&cache, &c).await.allowed);
    }
    assert_eq!(cache.len(), n, "every denial is held");
    // Without hashing, each entry would hold its 16 KiB identity.
    const { assert!(MAX_ENTRY_BYTES <= 640) };
    assert!(
        cache.bytes() <= n * MAX_ENTRY_BYTES,
        "{} bytes for {n} entries",
        cache.bytes()
    );
    // A long identity is still told apart from another by its digest.
    let who = long_identity(7);
    let c = crate::common::store::charge(&who, 1, Duration::from_secs(3600));
    assert!(!one(&cache, &c).await.allowed);
    let before = cache.answered_locally();
    let other = long_identity(n + 1);
    let fresh = crate::common::store::charge(&other, 1, Duration::from_secs(3600));
    assert!(
        one(&cache, &fresh).await.allowed,
        "a new identity is not held"
    );
    assert_eq!(cache.answered_locally(), before);
}

#[tokio::test(start_paused = true)]
async fn expired_denials_are_swept_before_their_shard_fills() {
    let cache = DenyCache::new(MemoryStore::new(4), true);
    let deny = async |cache: &DenyCache<MemoryStore>, who: &str| {
        let c = crate::common::store::charge(who, 1, Duration::from_secs(3600));
        assert!(one(cache, &c).await.allowed);
        assert!(!one(cache, &c).await.allowed);
    };
    for i in 0..1_000 {
        deny(&cache, &format!("old-{i}")).await;
    }
    assert_eq!(cache.len(), 1_000);
    // Every held denial expires within MAX_HOLD; far from any shard being
    // full, the next denials sweep them.
    tokio::time::advance(MAX_HOLD * 2).await;
    for i in 0..1_000 {
        deny(&cache, &format!("new-{i}")).await;
    }
    assert_eq!(cache.len(), 1_000, "the expired thousand were swept");
}
