//! Limits for AI and MCP traffic, over the wire, on every store: settle
//! later (refund, debt, once, forged, expired), calendar budgets, priority
//! headroom; the same cases on the embedded store and on Redis standalone,
//! Sentinel and Cluster, and a reservation settled across two replicas.

use std::time::{Duration, UNIX_EPOCH};

use tollgate::config::{Config, RedisMode, StoreKind};
use tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient;
use tollgate::pb::tollgate::v1::{
    Priority, SettleRequest, SettleResponse, ShouldAllowRequest, ShouldAllowResponse,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::common::redis::{Cluster, Sentinel, Standalone, store_config};
use crate::common::{TestServer, to_std};

/// The scopes every case uses; each case keeps to its own identities.
const SCOPES: &str = r#"
reservations:
  secret: "an-example-secret-of-at-least-32-bytes!"
scopes:
  - name: llm
    limits:
      # 10 tokens per 10 s: one per second.
      - { name: tokens, per: identity, capacity: 10, refill_period: 10s }
  - name: spend
    limits:
      - { name: per-window, per: identity, budget: 5, window: 2s }
      - { name: burst, per: identity, capacity: 4, refill_period: 100ms }
  - name: agents
    limits:
      - name: shared
        per: identity
        capacity: 100
        refill_period: 1h
        headroom: { normal: 10%, sheddable: 30% }
  - name: steady
    limits:
      - name: rate
        per: identity
        capacity: 10
        refill_period: 10s
        headroom: { normal: 10%, sheddable: 30% }
"#;

type Client = RateLimiterClient<Channel>;

fn request(scope: &str, identity: &str, cost: u32) -> ShouldAllowRequest {
    ShouldAllowRequest {
        scope: scope.into(),
        identity: identity.into(),
        cost,
        ..Default::default()
    }
}

fn reserving(identity: &str, estimate: u32, within: Duration) -> ShouldAllowRequest {
    ShouldAllowRequest {
        settle_within: Some(within.try_into().unwrap()),
        ..request("llm", identity, estimate)
    }
}

async fn ask(c: &mut Client, r: ShouldAllowRequest) -> ShouldAllowResponse {
    c.should_allow(r).await.expect("decided").into_inner()
}

async fn settle(c: &mut Client, reservation: &str, actual: u64) -> Result<SettleResponse, Status> {
    c.settle(SettleRequest {
        reservation: reservation.to_owned(),
        actual_cost: actual,
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Tokens left for `identity` in scope llm, from a dry run.
async fn left(c: &mut Client, identity: &str) -> u64 {
    let dry = ShouldAllowRequest {
        dry_run: true,
        ..request("llm", identity, 1)
    };
    ask(c, dry).await.remaining
}

async fn a_settle_below_the_estimate_gives_the_difference_back(c: &mut Client) {
    let r = ask(c, reserving("refund", 10, Duration::from_secs(60))).await;
    assert!(r.allowed && !r.reservation.is_empty(), "{r:?}");
    assert_eq!(r.remaining, 0);
    let s = settle(c, &r.reservation, 3).await.expect("settles");
    assert_eq!(s.estimate, 10);
    // 7 back, give or take the refill since (one token a second).
    assert!((7..=8).contains(&s.buckets[0].remaining), "{s:?}");
    assert!(ask(c, request("llm", "refund", 7)).await.allowed);
    assert!(!ask(c, request("llm", "refund", 2)).await.allowed);
}

async fn a_settle_above_the_estimate_puts_the_bucket_in_debt(c: &mut Client) {
    let r = ask(c, reserving("debt", 5, Duration::from_secs(60))).await;
    assert!(r.allowed);
    // 15 real against 10 of capacity: 5 tokens of debt.
    let s = settle(c, &r.reservation, 15).await.expect("settles");
    assert_eq!(s.buckets[0].remaining, 0);
    let denied = ask(c, request("llm", "debt", 1)).await;
    assert!(!denied.allowed);
    // The debt (5 s) and then one token (1 s): about 6 s, exactly as GCRA
    // counts it, less the little time gone by.
    let wait = to_std(&denied.retry_after).expect("a retry_after");
    assert!(
        wait > Duration::from_millis(5_500) && wait <= Duration::from_secs(6),
        "{wait:?}"
    );
}

async fn a_reservation_settles_once(c: &mut Client) {
    let r = ask(c, reserving("once", 4, Duration::from_secs(60))).await;
    settle(c, &r.reservation, 1).await.expect("first settle");
    let before = left(c, "once").await;
    let again = settle(c, &r.reservation, 0).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    assert!(again.message().contains("already settled"), "{again:?}");
    assert!(
        left(c, "once").await <= before + 1,
        "a refused settle gives nothing back"
    );
}

async fn a_forged_or_altered_reservation_is_refused(c: &mut Client) {
    let r = ask(c, reserving("forged", 4, Duration::from_secs(60))).await;
    let mut altered = r.reservation.clone().into_bytes();
    let i = altered.len() / 2;
    altered[i] = if altered[i] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    for token in [altered.as_str(), "not-a-reservation", ""] {
        let e = settle(c, token, 0).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{token:?}: {e:?}");
        assert!(e.message().starts_with("reservation"), "{e:?}");
    }
    let e = settle(c, &r.reservation, u64::from(u32::MAX) + 1)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("actual_cost"), "{e:?}");
    // The genuine one still settles.
    settle(c, &r.reservation, 4).await.expect("genuine settles");
}

async fn an_expired_reservation_is_refused_and_the_estimate_stands(c: &mut Client) {
    let r = ask(c, reserving("expired", 8, Duration::from_millis(50))).await;
    assert!(r.allowed);
    tokio::time::sleep(Duration::from_millis(120)).await;
    let e = settle(c, &r.reservation, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("expired"), "{e:?}");
    assert!(left(c, "expired").await <= 3, "nothing was given back");
}

async fn budgets_and_buckets_are_charged_all_or_nothing(c: &mut Client) {
    // A cost of 5 is over the burst bucket's capacity of 4: denied with no
    // retry_after, and the budget beside it, which had room, spends nothing.
    let over = ask(c, request("spend", "mix", 5)).await;
    assert!(!over.allowed && over.retry_after.is_none(), "{over:?}");
    let budget = over
        .buckets
        .iter()
        .find(|b| b.rule == "per-window")
        .unwrap();
    assert!(!budget.exhausted);
    assert_eq!(budget.remaining, 5);
    let two = ask(c, request("spend", "mix", 2)).await;
    assert!(two.allowed);
    let budget = two.buckets.iter().find(|b| b.rule == "per-window").unwrap();
    assert_eq!(budget.remaining, 3, "{two:?}");
}

async fn a_budget_denial_waits_for_the_next_window(c: &mut Client) {
    // Two costs of 2 leave 1 of the 5; a third is over the budget. The
    // burst bucket (4 per 100 ms) is full again before each call, so the
    // budget is the one that denies.
    let id = "next-window";
    for _ in 0..5 {
        let mut ok = true;
        for cost in [2, 2] {
            ok &= ask(c, request("spend", id, cost)).await.allowed;
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
        let r = ask(c, request("spend", id, 2)).await;
        if ok && !r.allowed {
            let budget = r.buckets.iter().find(|b| b.rule == "per-window").unwrap();
            assert!(budget.exhausted, "the budget denies: {r:?}");
            assert_eq!(budget.remaining, 1);
            let wait = to_std(&r.retry_after).expect("until the next window");
            assert!(wait <= Duration::from_secs(2), "{wait:?}");
            assert_eq!(to_std(&budget.reset_after), Some(wait));
            tokio::time::sleep(wait + Duration::from_millis(5)).await;
            // A fresh window (the burst bucket refills slowly: ask for 1).
            let fresh = ask(c, request("spend", id, 1)).await;
            let budget = fresh.buckets.iter().find(|b| b.rule == "per-window");
            assert_eq!(budget.map(|b| b.remaining), Some(4), "{fresh:?}");
            return;
        }
        // A window boundary fell inside the three calls: wait it out.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    panic!("five windows in a row were split by a boundary");
}

async fn headroom_under_contention_keeps_the_shares(c: &mut Client) {
    // 100 SHEDDABLE and 100 CRITICAL calls at once on one bucket of 100:
    // SHEDDABLE may take at most 70; CRITICAL takes the rest, exactly.
    let calls = (0..200).map(|i| {
        let mut c = c.clone();
        async move {
            let priority = if i % 2 == 0 {
                Priority::Sheddable
            } else {
                Priority::Critical
            };
            let r = ShouldAllowRequest {
                priority: priority.into(),
                ..request("agents", "crowd", 1)
            };
            (priority, ask(&mut c, r).await)
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    let admitted = |p: Priority| answers.iter().filter(|(q, r)| *q == p && r.allowed).count();
    let (shed, critical) = (admitted(Priority::Sheddable), admitted(Priority::Critical));
    assert!(shed <= 70, "{shed} sheddable admitted");
    assert_eq!(shed + critical, 100, "{shed} + {critical}");
    // Every denied SHEDDABLE call was told the wait for its own priority:
    // until the bucket holds 1 + 30 tokens, at one token per 36 s, from the
    // `remaining` it saw.
    for (_, r) in answers
        .iter()
        .filter(|(p, r)| *p == Priority::Sheddable && !r.allowed)
    {
        let wait = to_std(&r.retry_after).expect("a retry_after");
        let missing = 31 - u32::try_from(r.remaining).unwrap();
        let token = Duration::from_secs(36);
        assert!(
            wait > token * (missing - 1) && wait <= token * missing,
            "{wait:?} with {} left",
            r.remaining
        );
    }
}

async fn retry_after_is_exact_for_each_priority(c: &mut Client) {
    // 10 per 10 s; NORMAL leaves 1, SHEDDABLE leaves 3.
    let take = |p: Priority, cost: u32| ShouldAllowRequest {
        priority: p.into(),
        ..request("steady", "exact", cost)
    };
    assert!(ask(c, take(Priority::Critical, 7)).await.allowed);
    let shed = ask(c, take(Priority::Sheddable, 1)).await;
    assert!(!shed.allowed, "3 left, SHEDDABLE must leave 3");
    // It needs 4: one more token, under a second away.
    let wait = to_std(&shed.retry_after).unwrap();
    assert!(wait <= Duration::from_secs(1), "{wait:?}");
    let normal = ask(c, take(Priority::Normal, 2)).await;
    assert!(normal.allowed, "NORMAL may take 2 of 3, leaving 1");
    let normal = ask(c, take(Priority::Normal, 1)).await;
    assert!(!normal.allowed);
    let wait = to_std(&normal.retry_after).unwrap();
    assert!(wait <= Duration::from_secs(1), "{wait:?}");
    tokio::time::sleep(wait).await;
    let again = ask(c, take(Priority::Normal, 1)).await;
    assert!(again.allowed, "at its retry_after, NORMAL passes");
}

/// Runs every case against a server on `config`, naming each as it goes.
async fn conforms(config: Config) {
    let server = TestServer::start_config(config).await;
    let mut c = server.client().await;
    macro_rules! cases {
        ($($case:ident),* $(,)?) => {
            $(
                eprintln!("case {}", stringify!($case));
                $case(&mut c).await;
            )*
        };
    }
    cases!(
        a_settle_below_the_estimate_gives_the_difference_back,
        a_settle_above_the_estimate_puts_the_bucket_in_debt,
        a_reservation_settles_once,
        a_forged_or_altered_reservation_is_refused,
        an_expired_reservation_is_refused_and_the_estimate_stands,
        budgets_and_buckets_are_charged_all_or_nothing,
        a_budget_denial_waits_for_the_next_window,
        headroom_under_contention_keeps_the_shares,
        retry_after_is_exact_for_each_priority,
    );
}

fn on_redis(mode: RedisMode, urls: Vec<String>, prefix: &str) -> Config {
    let mut config = Config::from_yaml(SCOPES).unwrap();
    config.store.kind = StoreKind::Redis;
    config.store.redis = store_config(mode, urls, prefix);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_keeps_the_ai_limits() {
    conforms(Config::from_yaml(SCOPES).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_standalone_keeps_the_ai_limits() {
    let redis = Standalone::start();
    conforms(on_redis(RedisMode::Standalone, vec![redis.url()], "ai")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sentinel_keeps_the_ai_limits() {
    let redis = Sentinel::start();
    conforms(on_redis(RedisMode::Sentinel, redis.urls(), "ai")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_keeps_the_ai_limits() {
    let redis = Cluster::start();
    conforms(on_redis(RedisMode::Cluster, redis.urls(), "ai")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_made_on_one_replica_settles_on_another_once() {
    let redis = Standalone::start();
    let config = || on_redis(RedisMode::Standalone, vec![redis.url()], "replicas");
    let (one, two) = (
        TestServer::start_config(config()).await,
        TestServer::start_config(config()).await,
    );
    let (mut a, mut b) = (one.client().await, two.client().await);
    let r = ask(&mut a, reserving("roaming", 10, Duration::from_secs(60))).await;
    assert!(r.allowed);
    let s = settle(&mut b, &r.reservation, 2)
        .await
        .expect("the other replica settles");
    assert!((8..=9).contains(&s.buckets[0].remaining), "{s:?}");
    for c in [&mut a, &mut b] {
        let e = settle(c, &r.reservation, 2).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    }
    // A replica with another key refuses the token as forged.
    let mut other = config();
    other.reservations.secret = Some(tollgate::config::Secrets::One(
        tollgate::config::Secret::new("another-deployment-s-secret-32-bytes-long"),
    ));
    let three = TestServer::start_config(other).await;
    let e = settle(&mut three.client().await, &r.reservation, 2)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settle_within_and_priority_are_invalid_arguments_naming_the_field() {
    let server = TestServer::start_config(Config::from_yaml(SCOPES).unwrap()).await;
    let mut c = server.client().await;
    let cases = [
        (
            reserving("x", 1, Duration::from_secs(2 * 3600)),
            "settle_within",
        ),
        (reserving("x", 1, Duration::ZERO), "settle_within"),
        (
            ShouldAllowRequest {
                priority: 7,
                ..request("llm", "x", 1)
            },
            "priority",
        ),
    ];
    for (r, field) in cases {
        let e = c.should_allow(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with(field), "{e:?}");
    }
    let batch = tollgate::pb::tollgate::v1::ShouldAllowBatchRequest {
        requests: vec![reserving("x", 1, Duration::from_secs(1))],
        atomic: false,
    };
    let e = c.should_allow_batch(batch).await.unwrap_err();
    assert!(
        e.message().starts_with("requests[0].settle_within"),
        "{e:?}"
    );
    let e = settle(&mut c, &"A".repeat(16 * 1024 + 1), 0)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("16384"), "{e:?}");
    // Nothing was taken by any of them.
    assert_eq!(left(&mut c, "x").await, 10);
}

/// The embedded store remembers each settled reservation until its
/// deadline, within `store.memory.max_bytes` like its buckets: a settle
/// that finds no room fails as a store error and changes nothing.
#[tokio::test]
async fn open_reservations_count_against_the_memory_bound() {
    use tollgate::bucket::Shape;
    use tollgate::store::memory::MemoryStore;
    use tollgate::store::{
        BucketCharge, BucketKey, Charge, Once, Open, SettleBucket, Settled, Settlement, Store,
        StoreExt,
    };

    let bucket = BucketCharge::new(
        BucketKey {
            scope: "s",
            rule: "r",
            identity: Some("a"),
            operation: None,
            hash_tag: Default::default(),
        },
        Shape {
            capacity: 10,
            period: 3_600_000_000_000,
        },
        5,
    );
    let reserve = |id| Charge {
        buckets: smallvec::smallvec![bucket],
        dry_run: false,
        marks: true,
        lease: None,
        open: Some(Open {
            id,
            within_us: 60_000_000,
        }),
        penalty: None,
    };
    // Room for the one bucket, not for the record of an open reservation.
    let store = MemoryStore::with_max_bytes(1, MemoryStore::bytes_of(&bucket) + 10);
    let e = store
        .check_and_take_one(&reserve([1; 16]))
        .await
        .unwrap_err();
    assert!(e.message.contains("max_bytes"), "{e:?}");
    let dry = store.check_and_take_single(&bucket, true).await.unwrap();
    assert_eq!(
        dry.buckets[0].remaining, 10,
        "the refused reservation took nothing"
    );
    // With room, the record is kept until the settle, which frees it.
    let store = MemoryStore::with_max_bytes(1, MemoryStore::bytes_of(&bucket) + 100);
    let taken = store.check_and_take_one(&reserve([2; 16])).await.unwrap();
    assert!(taken.allowed);
    assert!(store.bytes_held() > MemoryStore::bytes_of(&bucket));
    let settlement = Settlement {
        buckets: vec![SettleBucket {
            charge: bucket,
            actual: 0,
            mark: Some(taken.buckets[0].mark),
        }],
        once: Some(Once {
            id: [2; 16],
            deadline_us: taken.now_us + 60_000_000,
        }),
    };
    assert!(matches!(
        store.settle(&settlement).await,
        Ok(Settled::Applied(_))
    ));
    assert_eq!(store.bytes_held(), MemoryStore::bytes_of(&bucket));
    // Not open any more: a second settle is refused.
    assert_eq!(
        store.settle(&settlement).await.unwrap(),
        Settled::AlreadySettled
    );
    // A refund without a record needs none, and is applied.
    let refund = Settlement {
        once: None,
        ..settlement
    };
    assert!(matches!(
        store.settle(&refund).await,
        Ok(Settled::Applied(_))
    ));
}

/// A day budget resets at local midnight: the embedded store on a paused
/// clock that starts a second before midnight in Paris.
#[tokio::test(start_paused = true)]
async fn a_day_budget_resets_at_midnight_on_a_paused_clock() {
    use tollgate::bucket::Shape;
    use tollgate::store::memory::MemoryStore;
    use tollgate::store::{BucketCharge, BucketKey, Charge, Store};
    use tollgate::window::Window;

    // 2026-03-29 is the night Paris moves to summer time; its midnight is
    // 2026-03-28T23:00:00Z. Start 1 s before.
    let midnight = UNIX_EPOCH + Duration::from_secs(1_774_738_800);
    let store = MemoryStore::with_wall_clock(4, 1 << 20, midnight - Duration::from_secs(1));
    let window = Window::parse("day", Some("Europe/Paris")).unwrap();
    let mut budget = BucketCharge::new(
        BucketKey {
            scope: "s",
            rule: "daily",
            identity: Some("team"),
            operation: None,
            hash_tag: Default::default(),
        },
        Shape {
            capacity: 100,
            period: 86_400_000_000_000,
        },
        60,
    );
    budget.window = Some(&window);
    let charge = |cost| {
        let mut b = budget;
        b.cost = cost;
        Charge {
            buckets: smallvec::smallvec![b],
            dry_run: false,
            marks: false,
            lease: None,
            open: None,
            penalty: None,
        }
    };
    let spend = store.check_and_take_one(&charge(60)).await.unwrap();
    assert!(spend.allowed);
    let over = store.check_and_take_one(&charge(60)).await.unwrap();
    assert!(!over.allowed);
    assert_eq!(over.buckets[0].remaining, 40);
    // Exactly one second, to the nanosecond, until the window starts.
    assert_eq!(over.buckets[0].retry_after, Some(Duration::from_secs(1)));
    tokio::time::advance(Duration::from_nanos(999_999_999)).await;
    assert!(!store.check_and_take_one(&charge(60)).await.unwrap().allowed);
    tokio::time::advance(Duration::from_nanos(1)).await;
    let next = store.check_and_take_one(&charge(60)).await.unwrap();
    assert!(next.allowed, "a new day: {next:?}");
    assert_eq!(next.buckets[0].remaining, 40);
    // That day is 23 hours long (the clocks go forward).
    assert_eq!(next.buckets[0].reset_after, Duration::from_secs(23 * 3600));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_s_key_expires_at_its_window_s_end_and_an_open_reservation_at_its_deadline() {
    let redis = Standalone::start();
    let server =
        TestServer::start_config(on_redis(RedisMode::Standalone, vec![redis.url()], "expiry"))
            .await;
    let mut c = server.client().await;
    let mut conn = crate::common::redis::conn(redis.server.port).unwrap();
    // The spend's window is 2 s, aligned to the epoch on Redis's clock: start
    // in its first half, so it cannot end (taking its key) while this reads.
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut conn).unwrap();
    let into_ms = secs % 2 * 1_000 + micros / 1_000;
    if into_ms >= 1_000 {
        tokio::time::sleep(Duration::from_millis(2_010 - into_ms)).await;
    }
    assert!(ask(&mut c, request("spend", "ttl", 1)).await.allowed);
    let r = ask(&mut c, reserving("ttl", 1, Duration::from_secs(30))).await;
    let keys = |conn: &mut redis::Connection| -> Vec<String> {
        redis::cmd("KEYS").arg("test:expiry:*").query(conn).unwrap()
    };
    // The open reservation's record lives until its deadline, or its settle.
    let marker = keys(&mut conn)
        .into_iter()
        .find(|k| k.contains(":%open:"))
        .unwrap();
    let ms: i64 = redis::cmd("PTTL").arg(&marker).query(&mut conn).unwrap();
    assert!(ms > 25_000 && ms <= 30_001, "{marker}: {ms} ms");
    settle(&mut c, &r.reservation, 1).await.expect("settles");
    let keys = keys(&mut conn);
    assert!(!keys.contains(&marker), "the settle removes {marker}");
    let mut ttl = |key: &str| -> i64 { redis::cmd("PTTL").arg(key).query(&mut conn).unwrap() };
    let budget = keys
        .iter()
        .find(|k| k.contains("per-window~2000000us"))
        .unwrap();
    // It ends with its window: between what is left of the window on
    // Redis's clock just before and just after the read (PX rounds up to
    // the millisecond).
    let mut clock = crate::common::redis::conn(redis.server.port).unwrap();
    let mut window_left = || -> i64 {
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query(&mut clock).unwrap();
        2_000 - (secs % 2 * 1_000 + micros / 1_000)
    };
    let before = window_left();
    let ms = ttl(budget);
    let after = window_left();
    assert!(ms > 0 && ms <= 2_000, "{budget}: {ms} ms");
    assert!(
        after - 1 <= ms && ms <= before + 1,
        "{budget}: {ms} ms, the window had {before} to {after} ms left"
    );
    // Every key Tollgate wrote expires (or already has: -2): memory
    // follows active keys. -1 would be a key without an expiry.
    for key in &keys {
        assert_ne!(ttl(key), -1, "{key} never expires");
    }
}

#[test]
fn bad_budgets_headroom_and_reservations_are_refused_with_their_field_paths() {
    let limit = |body: &str| {
        format!("scopes:\n  - name: s\n    limits:\n      - {{ name: l, per: identity, {body} }}\n")
    };
    let cases = [
        (
            limit("budget: 1125899906842625, window: day"),
            "scopes[0].limits[0].budget: must be between 1 and 1125899906842624",
        ),
        (
            limit("budget: 10, window: fortnight"),
            "scopes[0].limits[0].window: \"fortnight\" is not day, week, month",
        ),
        (
            limit("budget: 10, window: day, time_zone: Mars/Base"),
            "scopes[0].limits[0].time_zone: unknown IANA time zone",
        ),
        (
            limit("budget: 10, window: 1h, time_zone: Europe/Paris"),
            "scopes[0].limits[0].time_zone: a fixed window",
        ),
        (
            limit("budget: 10, capacity: 5, refill_period: 1s, window: day"),
            "scopes[0].limits[0].budget: a budget has no capacity",
        ),
        (
            limit("capacity: 10, refill_period: 1s, headroom: { normal: 30%, sheddable: 10% }"),
            "scopes[0].limits[0].headroom.sheddable: must be at least headroom.normal",
        ),
        (
            limit("capacity: 10, refill_period: 1s, headroom: { normal: 100% }"),
            "100% must be below 100%",
        ),
        (
            "reservations: { secret: short }\n".to_owned(),
            "reservations.secret: must be at least 32 bytes",
        ),
        (
            "reservations: { max_settle_within: 8d }\n".to_owned(),
            "reservations.max_settle_within: must be between 1ms and 7d",
        ),
    ];
    for (yaml, want) in cases {
        let err = Config::from_yaml(&yaml).unwrap_err().to_string();
        assert!(err.contains(want), "{yaml}\n{err}");
    }
}
