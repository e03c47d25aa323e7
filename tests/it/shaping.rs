//! Shaping (issue 24): a limit with `max_delay` admits a request that would
//! conform soon with a `delay` instead of denying it, and the promise moves
//! from decision times to release times (decided at + delay): over any
//! interval `t` the cost released is at most `C + r·t`.

use std::time::Duration;

use futures_util::future::join_all;
use tollgate::bucket::Shape;
use tollgate::config::Config;
use tollgate::limiter::{Decision, Limiter, Request, Rules};
use tollgate::pb::tollgate::v1::ShouldAllowRequest;
use tollgate::store::memory::MemoryStore;
use tollgate::store::{BucketCharge, BucketKey, Charge, Store, StoreExt};

use crate::common::TestServer;
use crate::common::redis::{Standalone, conn};

const MS: Duration = Duration::from_millis(1);

const SPREAD: &str = r#"
scopes:
  - name: agents
    limits:
      - { name: per-team, per: identity, capacity: 10, refill_period: 1s, max_delay: 2s }
  - name: pair
    limits:
      - { name: per-team, per: identity, capacity: 10, refill_period: 1s, max_delay: 2s }
      - { name: per-scope, per: scope, capacity: 5, refill_period: 1s, max_delay: 500ms }
"#;

/// For the tests on a real clock: one token every 10 s, so the time the
/// calls themselves take never refills one.
const SLOW: &str = r#"
scopes:
  - name: slow
    descriptor_keys: { identity: team }
    limits:
      - { name: per-team, per: identity, capacity: 10, refill_period: 100s, max_delay: 20s }
"#;

fn limiter(yaml: &str) -> Limiter<MemoryStore> {
    let config = Config::from_yaml(yaml).expect("valid config");
    Limiter::new(
        Rules::compile(&config).expect("rules"),
        MemoryStore::default(),
    )
}

fn waiting<'a>(scope: &'a str, identity: &'a str, max_wait: Option<Duration>) -> Request<'a> {
    Request {
        max_wait,
        ..Request::new(scope, identity, "op")
    }
}

async fn decide(l: &Limiter<MemoryStore>, r: &Request<'_>) -> Decision {
    l.decide(r).await.expect("decide")
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_30_is_spread_at_the_rate_to_the_tick() {
    let l = limiter(SPREAD);
    let r = waiting("agents", "team-a", Some(2 * Duration::from_secs(1)));
    let mut answers = Vec::new();
    for _ in 0..32 {
        answers.push(decide(&l, &r).await);
    }
    for (i, d) in answers[..10].iter().enumerate() {
        assert!(d.allowed && d.delay.is_zero(), "request {i}: {d:?}");
    }
    for (i, d) in answers[10..30].iter().enumerate() {
        let want = 100 * MS * (i as u32 + 1);
        assert!(d.allowed, "request {}: {d:?}", i + 10);
        assert_eq!(d.delay, want, "request {}", i + 10);
    }
    for d in &answers[30..] {
        assert!(!d.allowed && d.delay.is_zero(), "{d:?}");
        // The same request would be admitted, with a delay of exactly
        // max_delay, 0.1 s from now.
        assert_eq!(d.retry_after, Some(100 * MS));
    }
    tokio::time::advance(100 * MS - Duration::from_nanos(1)).await;
    assert!(!decide(&l, &r).await.allowed, "a nanosecond early");
    tokio::time::advance(Duration::from_nanos(1)).await;
    let on_time = decide(&l, &r).await;
    assert!(on_time.allowed);
    assert_eq!(on_time.delay, 2 * Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_max_wait_shorter_than_the_delay_is_denied_and_takes_nothing() {
    let l = limiter(SPREAD);
    let patient = waiting("agents", "team-a", Some(Duration::from_secs(2)));
    for _ in 0..12 {
        assert!(decide(&l, &patient).await.allowed);
    }
    // The next needs 0.3 s: a caller that can wait 0.25 s is denied, told
    // when a wait of 0.25 s would do, and takes nothing.
    let hurried = waiting("agents", "team-a", Some(250 * MS));
    let d = decide(&l, &hurried).await;
    assert!(!d.allowed && d.delay.is_zero(), "{d:?}");
    assert_eq!(d.retry_after, Some(50 * MS));
    // A caller that cannot wait at all keeps today's answer.
    let d = decide(&l, &waiting("agents", "team-a", None)).await;
    assert!(!d.allowed);
    assert_eq!(d.retry_after, Some(300 * MS));
    // Nothing was taken: the next patient request waits 0.3 s, not more.
    let d = decide(&l, &patient).await;
    assert_eq!((d.allowed, d.delay), (true, 300 * MS));
}

#[tokio::test(start_paused = true)]
async fn several_buckets_wait_for_the_slowest_all_or_nothing() {
    let l = limiter(SPREAD);
    let r = waiting("pair", "team-a", Some(Duration::from_secs(2)));
    // The scope's bucket (5/s) runs out first: 0.2 s apart from then on.
    for i in 0..5 {
        assert_eq!(decide(&l, &r).await.delay, Duration::ZERO, "request {i}");
    }
    for i in 1..=2u32 {
        let d = decide(&l, &r).await;
        assert_eq!((d.allowed, d.delay), (true, 200 * MS * i));
    }
    // The scope's max_delay is 0.5 s: the next needs 0.6 s there, so it is
    // denied, and team-a's own bucket (which would let it through at once)
    // keeps its tokens.
    let d = decide(&l, &r).await;
    assert!(!d.allowed, "{d:?}");
    assert_eq!(d.retry_after, Some(100 * MS));
    let own = d.buckets.iter().find(|b| &*b.rule == "per-team").unwrap();
    assert_eq!(own.remaining, 3, "10 less the 7 admitted");
}

fn burst_bucket(rule: &str) -> BucketCharge<'_> {
    BucketCharge {
        max_delay: Duration::from_secs(2),
        ..BucketCharge::new(
            BucketKey {
                scope: "shaping",
                rule,
                identity: Some("fleet"),
                operation: None,
                hash_tag: Default::default(),
            },
            Shape {
                capacity: 10,
                period: 1_000_000_000,
            },
            1,
        )
    }
}

/// Checks the release times (µs, any order) of unit-cost requests against
/// `C + r·t` on every interval, widened by `slack_us`: for the `k`
/// releases between two of them, `(k - C)·P <= C·(t + slack)`.
fn assert_released_within_the_limit(mut releases: Vec<u64>, slack_us: u64, what: &str) {
    const C: u64 = 10;
    const P_US: u64 = 1_000_000;
    releases.sort_unstable();
    for i in 0..releases.len() {
        for j in i..releases.len() {
            let k = (j - i + 1) as u64;
            let t = releases[j] - releases[i] + slack_us;
            assert!(
                k.saturating_sub(C) * P_US <= C * t,
                "{what}: {k} released in {t} µs: {:?}",
                &releases[i..=j]
            );
        }
    }
}

/// Two replicas' stores on one Redis, 200 concurrent charges per round:
/// every release (Redis's clock at the decision plus the delay) keeps the
/// limit, in each of 5 rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_release_at_most_the_limit_over_any_interval() {
    let redis = Standalone::start();
    let stores = [redis.store("shaping"), redis.store("shaping")];
    for round in 0..5 {
        let rule = format!("round-{round}");
        let charges = (0..200).map(|i| {
            let store = stores[i % 2].clone();
            let rule = rule.clone();
            tokio::spawn(async move {
                let charge = Charge::of([burst_bucket(&rule)]);
                store.check_and_take_one(&charge).await
            })
        });
        let mut releases = Vec::new();
        let mut denied = 0;
        for outcome in join_all(charges).await {
            let o = outcome.unwrap().expect("store answers");
            if o.allowed {
                assert!(o.delay <= Duration::from_secs(2), "{o:?}");
                releases.push(o.now_us + o.delay.as_micros() as u64);
            } else {
                let wait = o.buckets[0].retry_after.expect("a retry can pass");
                assert!(wait <= Duration::from_secs(1), "{o:?}");
                denied += 1;
            }
        }
        let delayed = releases.len().saturating_sub(10);
        eprintln!(
            "round {round}: {} admitted ({delayed} delayed), {denied} denied",
            releases.len()
        );
        assert!(releases.len() >= 30 && denied > 0, "round {round}");
        assert_released_within_the_limit(releases, 0, &format!("round {round}"));
    }
}

/// The same through two Tollgate servers: the answers carry only the
/// delay, so each decision's instant is bracketed by Redis's `TIME` read
/// before and after the burst, and the check allows that much slack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tollgate_servers_release_at_most_the_limit() {
    let redis = Standalone::start();
    let yaml = format!(
        r#"
store:
  kind: redis
  redis:
    urls: ["{}"]
    key_prefix: "test:shaping-servers:"
    response_timeout: 2s
    wait_timeout: 2s
    connect_timeout: 2s
failure_mode: closed
scopes:
  - name: agents
    limits:
      - {{ name: per-team, per: identity, capacity: 10, refill_period: 1s, max_delay: 2s }}
"#,
        redis.url()
    );
    let config = || Config::from_yaml(&yaml).unwrap();
    let replicas = [
        TestServer::start_config(config()).await,
        TestServer::start_config(config()).await,
    ];
    let clients = [replicas[0].client().await, replicas[1].client().await];
    let redis_now = || -> u64 {
        let (s, us): (u64, u64) = redis::cmd("TIME")
            .query(&mut conn(redis.server.port).unwrap())
            .unwrap();
        s * 1_000_000 + us
    };
    for round in 0..5 {
        let identity = format!("fleet-{round}");
        let before = redis_now();
        let calls = (0..200).map(|i| {
            let mut client = clients[i % 2].clone();
            let request = ShouldAllowRequest {
                scope: "agents".into(),
                identity: identity.clone(),
                max_wait: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                ..Default::default()
            };
            tokio::spawn(async move { client.should_allow(request).await })
        });
        let answers = join_all(calls).await;
        let after = redis_now();
        let mut delays = Vec::new();
        for answer in answers {
            let a = answer.unwrap().expect("no store error").into_inner();
            assert!(!a.degraded);
            if a.allowed {
                let d = crate::common::to_std(&a.delay).unwrap_or_default();
                assert!(d <= Duration::from_secs(2), "{a:?}");
                delays.push(d.as_micros() as u64);
            }
        }
        let slack = after - before;
        eprintln!(
            "round {round}: {} admitted through 2 servers, decided within {slack} µs",
            delays.len()
        );
        assert!(delays.len() >= 30, "round {round}");
        assert_released_within_the_limit(delays, slack, &format!("servers, round {round}"));
    }
}

/// The conformance of a shaped charge on any store: a burst of 30 against
/// 10/s with waits up to 2 s gets 10 at once and 20 waits spaced by the
/// rate (Redis's clock moves between calls, so the waits are bounds), and a
/// denial takes nothing.
pub(crate) async fn a_shaped_burst_is_spread_and_a_denial_takes_nothing(store: &impl Store) {
    let b = burst_bucket("conformance-shaped");
    let started = tokio::time::Instant::now();
    let mut waits = Vec::new();
    for _ in 0..30 {
        let o = store.check_and_take_single(&b, false).await.unwrap();
        assert!(o.allowed, "{o:?}");
        waits.push(o.delay);
    }
    let elapsed = started.elapsed();
    assert!(waits[..10].iter().all(|w| w.is_zero()), "{waits:?}");
    for pair in waits[10..].windows(2) {
        assert!(pair[1] <= pair[0] + 100 * MS, "never faster: {waits:?}");
    }
    assert!(waits[29] <= 2 * Duration::from_secs(1), "{waits:?}");
    assert!(
        waits[29] + elapsed >= 2 * Duration::from_secs(1),
        "{waits:?}"
    );
    // One that cannot wait long enough is denied and takes nothing: a dry
    // run that may wait longer sees the same wait before and after it.
    let hurried = BucketCharge {
        max_delay: 500 * MS,
        ..b
    };
    let patient = BucketCharge {
        max_delay: 3 * Duration::from_secs(1),
        ..b
    };
    let before = store.check_and_take_single(&patient, true).await.unwrap();
    let o = store.check_and_take_single(&hurried, false).await.unwrap();
    assert!(!o.allowed && o.delay.is_zero(), "{o:?}");
    assert!(o.buckets[0].retry_after.is_some());
    let after = store.check_and_take_single(&patient, true).await.unwrap();
    assert!(before.allowed && after.allowed && !before.delay.is_zero());
    assert!(
        after.delay <= before.delay,
        "the denial took nothing: {before:?} then {after:?}"
    );
}

#[test]
fn a_max_delay_the_limit_cannot_keep_is_refused_with_its_path() {
    let limit = |fields: &str| {
        format!(
            "scopes:\n  - name: s\n    limits:\n      - {{ name: l, per: identity, {fields} }}\n"
        )
    };
    let cases = [
        (
            "budget: 10, window: day, max_delay: 1s",
            "scopes[0].limits[0].max_delay: a budget has no rate",
        ),
        (
            "capacity: 10, refill_period: 1s, shadow: true, max_delay: 1s",
            "scopes[0].limits[0].max_delay: a shadow limit never denies",
        ),
        (
            "capacity: 10, refill_period: 1s, max_delay: 2h",
            "scopes[0].limits[0].max_delay: must be between 1ms and 1h",
        ),
        (
            "capacity: 10, refill_period: 1s, max_delay: 0s",
            "scopes[0].limits[0].max_delay: must be between 1ms and 1h",
        ),
        (
            "capacity: 10, refill_period: 1s, max_delay: 1500ns",
            "scopes[0].limits[0].max_delay: must be between 1ms and 1h",
        ),
    ];
    for (fields, want) in cases {
        let yaml = limit(fields);
        let err = Config::from_yaml(&yaml).unwrap_err().to_string();
        assert!(err.contains(want), "{yaml}\n{err}");
    }
    Config::from_yaml(&limit("capacity: 10, refill_period: 1s, max_delay: 1h"))
        .expect("1h is the most");
}

#[tokio::test]
async fn a_bad_max_wait_is_invalid_argument_naming_it_and_takes_nothing() {
    let server = TestServer::start(SLOW).await;
    let mut client = server.client().await;
    let ask = |seconds: i64, nanos: i32| ShouldAllowRequest {
        scope: "slow".into(),
        identity: "team-b".into(),
        max_wait: Some(prost_types::Duration { seconds, nanos }),
        ..Default::default()
    };
    for (seconds, nanos) in [(-1, 0), (3601, 0), (0, -5)] {
        let status = client.should_allow(ask(seconds, nanos)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with("max_wait: "), "{status:?}");
    }
    // Nothing was taken: the bucket still holds all 10.
    let a = client.should_allow(ask(20, 0)).await.unwrap().into_inner();
    assert_eq!((a.allowed, a.remaining), (true, 9));
    // Through the wire, a delayed allow carries `delay`: one token, 10 s.
    for _ in 0..9 {
        client.should_allow(ask(20, 0)).await.unwrap();
    }
    let a = client.should_allow(ask(20, 0)).await.unwrap().into_inner();
    let delay = crate::common::to_std(&a.delay).expect("a delay");
    let ten = Duration::from_secs(10);
    assert!(
        a.allowed && delay > ten - Duration::from_secs(1) && delay <= ten,
        "{a:?}"
    );
    // Zero is the same as unset: no wait, denied as before.
    let a = client.should_allow(ask(0, 0)).await.unwrap().into_inner();
    assert!(!a.allowed && a.delay.is_none(), "{a:?}");
}

#[tokio::test]
async fn delayed_admissions_are_counted_with_their_delays_per_rule() {
    let metrics = crate::common::free_port();
    let server = TestServer::start(&format!(
        "metrics: {{ listen: 127.0.0.1:{metrics} }}\n{SLOW}"
    ))
    .await;
    let mut client = server.client().await;
    for _ in 0..12 {
        let r = ShouldAllowRequest {
            scope: "slow".into(),
            identity: "team-c".into(),
            max_wait: Some(prost_types::Duration {
                seconds: 20,
                nanos: 0,
            }),
            ..Default::default()
        };
        assert!(client.should_allow(r).await.unwrap().into_inner().allowed);
    }
    let text = crate::common::metrics_get(metrics, "/metrics").await;
    let labels = r#"{api="tollgate",scope="slow",rule="per-team"}"#;
    let line = |name: &str| {
        let prefix = format!("{name}{labels} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("{name} in\n{text}"))
            .to_owned()
    };
    assert_eq!(line("tollgate_delayed_admissions_total"), "2");
    assert_eq!(line("tollgate_admission_delay_seconds_count"), "2");
    let sum: f64 = line("tollgate_admission_delay_seconds_sum")
        .parse()
        .unwrap();
    assert!(
        sum > 28.0 && sum <= 30.0,
        "10 s and 20 s, less the time between calls: {sum}"
    );
}

/// Envoy's RLS v3 has no delay: a limit with `max_delay` answers Envoy
/// OVER_LIMIT where a caller that could wait would get a delay.
#[tokio::test]
async fn envoy_gets_over_limit_where_a_delay_would_be_needed() {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;

    let server = TestServer::start(SLOW).await;
    let mut envoy = RateLimitServiceClient::new(server.channel().await);
    let request = RateLimitRequest {
        domain: "slow".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "team".into(),
                value: "team-e".into(),
            }],
            ..Default::default()
        }],
        hits_addend: 0,
    };
    let mut codes = Vec::new();
    for _ in 0..11 {
        let answer = envoy.should_rate_limit(request.clone()).await.unwrap();
        codes.push(answer.into_inner().overall_code);
    }
    // The bucket holds 10: the eleventh would need 10 s of delay.
    assert_eq!(codes[..10], [Code::Ok as i32; 10]);
    assert_eq!(codes[10], Code::OverLimit as i32);
    // The same request over tollgate.v1 with max_wait is delayed instead.
    let mut client = server.client().await;
    let a = client
        .should_allow(ShouldAllowRequest {
            scope: "slow".into(),
            identity: "team-e".into(),
            max_wait: Some(prost_types::Duration {
                seconds: 20,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(a.allowed && a.delay.is_some(), "{a:?}");
}

/// The deny cache never answers a request that may wait from a denial held
/// for one that could not, and never holds a shaped denial: a later
/// request with a longer wait must reach the store and pass.
#[tokio::test(start_paused = true)]
async fn the_deny_cache_never_denies_what_a_wait_would_pass() {
    use tollgate::store::deny_cache::DenyCache;
    let store = DenyCache::new(MemoryStore::default(), true);
    let plain = BucketCharge {
        max_delay: Duration::ZERO,
        ..burst_bucket("cached")
    };
    for _ in 0..10 {
        assert!(
            store
                .check_and_take_single(&plain, false)
                .await
                .unwrap()
                .allowed
        );
    }
    // Denied without a wait, twice: the second is answered locally.
    assert!(
        !store
            .check_and_take_single(&plain, false)
            .await
            .unwrap()
            .allowed
    );
    assert!(
        !store
            .check_and_take_single(&plain, false)
            .await
            .unwrap()
            .allowed
    );
    assert_eq!(store.answered_locally(), 1);
    // A request that may wait goes to the store and is admitted for later.
    let shaped = burst_bucket("cached");
    let o = store.check_and_take_single(&shaped, false).await.unwrap();
    assert_eq!((o.allowed, o.delay), (true, 100 * MS));
    // A shaped denial is not held: a longer wait passes right after it.
    let short = BucketCharge {
        max_delay: 50 * MS,
        ..shaped
    };
    assert!(
        !store
            .check_and_take_single(&short, false)
            .await
            .unwrap()
            .allowed
    );
    let o = store.check_and_take_single(&shaped, false).await.unwrap();
    assert_eq!((o.allowed, o.delay), (true, 200 * MS));
    assert_eq!(store.answered_locally(), 1, "only the unshaped repeat");
}

const COMBINED: &str = r#"
scopes:
  - name: agents
    limits:
      - name: per-team
        per: identity
        capacity: 10
        refill_period: 1s
        max_delay: 2s
        headroom: { normal: 20%, sheddable: 50% }
"#;

/// Headroom: a request waits until the bucket holds its cost plus the
/// headroom its priority must leave. A dry run reports the delay and takes
/// nothing.
#[tokio::test(start_paused = true)]
async fn each_priority_waits_for_its_own_headroom() {
    use tollgate::limiter::Priority;
    let l = limiter(COMBINED);
    let critical = Request {
        priority: Priority::Critical,
        ..waiting("agents", "team-a", Some(Duration::from_secs(2)))
    };
    for _ in 0..10 {
        assert_eq!(decide(&l, &critical).await.delay, Duration::ZERO);
    }
    for (priority, want) in [
        (Priority::Critical, 100 * MS),
        (Priority::Normal, 300 * MS),
        (Priority::Sheddable, 600 * MS),
    ] {
        let dry = Request {
            priority,
            dry_run: true,
            ..critical
        };
        let d = decide(&l, &dry).await;
        assert_eq!((d.allowed, d.delay), (true, want), "{priority:?}");
    }
}

/// A reservation made with a delay settles as any other: settling for
/// nothing gives its token back, so the next wait is as before it.
#[tokio::test(start_paused = true)]
async fn a_delayed_reservation_settles_like_any_other() {
    let l = limiter(SPREAD);
    let r = waiting("agents", "team-a", Some(Duration::from_secs(2)));
    for _ in 0..10 {
        decide(&l, &r).await;
    }
    let reserve = Request {
        settle_within: Some(Duration::from_secs(60)),
        ..r
    };
    let d = decide(&l, &reserve).await;
    assert_eq!((d.allowed, d.delay), (true, 100 * MS));
    let token = d.reservation.expect("a reservation");
    l.settle(&token, 0).await.expect("settles");
    let d = decide(&l, &r).await;
    assert_eq!(
        (d.allowed, d.delay),
        (true, 100 * MS),
        "the token came back"
    );
}

/// An atomic batch: a bucket its entries share waits no longer than the
/// entry that can wait least, and every entry gets the one delay.
#[tokio::test(start_paused = true)]
async fn an_atomic_batch_waits_as_one_within_its_least_patient_entry() {
    let l = limiter(SPREAD);
    let patient = waiting("agents", "team-a", Some(Duration::from_secs(2)));
    for _ in 0..10 {
        decide(&l, &patient).await;
    }
    let both = [patient, patient];
    let ds = l.decide_together(&both).await.expect("decide");
    for d in &ds {
        assert_eq!((d.allowed, d.delay), (true, 200 * MS), "{d:?}");
    }
    let hurried = waiting("agents", "team-a", None);
    let ds = l
        .decide_together(&[patient, hurried])
        .await
        .expect("decide");
    assert!(ds.iter().all(|d| !d.allowed && d.delay.is_zero()), "{ds:?}");
    // It took nothing: the next lone request waits 0.3 s.
    assert_eq!(decide(&l, &patient).await.delay, 300 * MS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_asks_with_max_wait_and_prints_the_delay() {
    let server = TestServer::start(SLOW).await;
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["allow", "--addr", &server.url(), "--scope", "slow"])
            .args(["--identity", "team-f"])
            .args(extra)
            .output()
            .expect("run");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let drained = tokio::task::block_in_place(|| run(&["--cost", "10"]));
    assert!(drained.starts_with("ALLOWED rule=per-team"), "{drained}");
    let held = tokio::task::block_in_place(|| run(&["--max-wait", "20s"]));
    assert!(held.starts_with("ALLOWED delay=9."), "{held}");
    let denied = tokio::task::block_in_place(|| run(&["--max-wait", "5s"]));
    assert!(denied.starts_with("DENIED retry_after="), "{denied}");
}

/// On Cluster, a charge whose buckets span hash slots (two scopes) is
/// decided without delay: its parts could not agree on one release. It is
/// allowed now or denied, as if the caller could not wait, and a denial
/// takes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_cluster_a_charge_across_slots_is_decided_without_delay() {
    let redis = tokio::task::spawn_blocking(crate::common::redis::Cluster::start)
        .await
        .unwrap();
    let store = redis.store("shaping-slots");
    let bucket = |scope| BucketCharge {
        key: BucketKey {
            scope,
            ..burst_bucket("x").key
        },
        ..burst_bucket("x")
    };
    let (a, b) = (bucket("scope-a"), bucket("scope-b"));
    for _ in 0..10 {
        assert!(
            store
                .check_and_take_single(&a, false)
                .await
                .unwrap()
                .allowed
        );
    }
    // Alone, a's bucket would admit the next with a delay.
    let alone = store.check_and_take_single(&a, true).await.unwrap();
    assert!(alone.allowed && !alone.delay.is_zero(), "{alone:?}");
    // Together with b's (another slot), it is denied, with no delay.
    let both = store.check_and_take_one(&Charge::of([a, b])).await.unwrap();
    assert!(!both.allowed && both.delay.is_zero(), "{both:?}");
    // b gave back what its part took: it still holds all 10.
    let b_left = store.check_and_take_single(&b, true).await.unwrap();
    assert_eq!(b_left.buckets[0].remaining, 10, "{b_left:?}");
}
