//! The Redis store on one real `redis-server`: concurrency across clients,
//! expiry and memory, script reloads, Redis dying and returning, and the
//! whole service over the wire.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::common::redis::{Secured, Standalone, conn, evalsha_calls, store_config, wait_until};
use crate::common::store::charge;
use tollgate::config::{Config, RedisMode, Secret};
use tollgate::limiter::{DecideError, Limiter, Request, Rules};
use tollgate::pb::tollgate::v1::ShouldAllowRequest;
use tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient;
use tollgate::server::{self, HEALTH_SERVICE};
use tollgate::store::redis::RedisStore;
use tollgate::store::redis::keys::bucket_key;
use tollgate::store::{AnyStore, BucketCharge, Charge, Store, StoreExt};

fn now_us(port: u16) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query(&mut conn(port).unwrap()).unwrap();
    s * 1_000_000 + us
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_on_one_bucket_never_over_admit() {
    let redis = Standalone::start();
    // Two independent stores, as two Tollgate replicas would have.
    let stores = [redis.store("hammer"), redis.store("hammer")];
    let (capacity, period) = (50, Duration::from_secs(1));
    let allowed = Arc::new(AtomicU64::new(0));
    let start = now_us(redis.server.port);
    let run_for = Duration::from_millis(1500);
    let deadline = tokio::time::Instant::now() + run_for;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = stores[i % 2].clone();
        let allowed = allowed.clone();
        tasks.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < deadline {
                let out = store
                    .check_and_take(&[charge("shared", capacity, period)])
                    .await
                    .expect("Redis answers");
                if out[0].allowed {
                    allowed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = Duration::from_micros(now_us(redis.server.port) - start);
    let allowed = allowed.load(Ordering::Relaxed);
    let rate = capacity as f64 / period.as_secs_f64();
    let bound = capacity as f64 + rate * elapsed.as_secs_f64();
    eprintln!("allowed {allowed} in {elapsed:?}; bound {bound:.1}");
    assert!(
        allowed as f64 <= bound,
        "over-admitted: {allowed} > {bound}"
    );
    // Saturated callers take nearly every token: the first decision comes
    // right after `start`, the last right before the end.
    assert!(
        allowed as f64 >= 0.9 * (capacity as f64 + rate * run_for.as_secs_f64()) - 5.0,
        "under-admitted: {allowed} of {bound}"
    );
}

#[tokio::test]
async fn a_bucket_expires_when_full_and_its_memory_is_measured() {
    let redis = Standalone::start();
    let store = redis.store("expiry");
    let out = store
        .check_and_take(&[charge("alice", 10, Duration::from_secs(1))])
        .await
        .unwrap();
    assert!(out[0].allowed);
    let mut c = conn(redis.server.port).unwrap();
    let key = &bucket_key(
        "test:expiry:",
        &charge("alice", 10, Duration::from_secs(1)).buckets[0],
    );
    let pttl: i64 = redis::cmd("PTTL").arg(key).query(&mut c).unwrap();
    // One token of 10 per second comes back in 100 ms: so does fullness.
    assert!((50..=100).contains(&pttl), "PTTL {pttl}");
    // A drained bucket lives for its whole refill period.
    let drain_bucket = BucketCharge {
        cost: 1_000,
        ..charge("bob", 1_000, Duration::from_millis(300)).buckets[0]
    };
    let drain = Charge {
        buckets: smallvec::smallvec![drain_bucket],
        dry_run: false,
        marks: false,
        lease: None,
        open: None,
        penalty: None,
    };
    assert!(store.check_and_take(&[drain]).await.unwrap()[0].allowed);
    let key = &bucket_key("test:expiry:", &drain_bucket);
    let pttl: i64 = redis::cmd("PTTL").arg(key).query(&mut c).unwrap();
    assert!((250..=300).contains(&pttl), "PTTL {pttl}");
    let bytes: i64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(key)
        .query(&mut c)
        .unwrap();
    eprintln!("MEMORY USAGE of one bucket ({key}): {bytes} bytes");
    assert!(bytes < 128, "{bytes} bytes per bucket");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let exists: i64 = redis::cmd("EXISTS").arg(key).query(&mut c).unwrap();
    assert_eq!(exists, 0, "a full bucket is forgotten");
}

/// A bucket's state as the script stores it: its TAT in microseconds and
/// the fraction of a microsecond beyond it, in capacity-ths.
fn stored_state(admin: &mut redis::Connection, key: &str) -> (i64, i64) {
    let v: Vec<u8> = redis::cmd("GET").arg(key).query(admin).unwrap();
    assert_eq!(v.len(), 12, "a plain bucket is 12 bytes");
    let ticks = i64::from_le_bytes(v[..8].try_into().unwrap());
    let frac = i32::from_le_bytes(v[8..].try_into().unwrap());
    (ticks, i64::from(frac))
}

/// The one-bucket path's arithmetic, read back from Redis. 7 tokens per
/// 10 s is an emission interval of 1,428,571 µs and 3/7 µs, so the
/// fraction carries into a whole microsecond every few takes: each take
/// must move the stored TAT by exactly one interval, which a wrong
/// quotient, remainder or carry would not, and no take may be lost or
/// doubled (over-admission) on the way. The denial that follows answers
/// its `retry_after` and `reset_after` exactly from that state.
#[tokio::test]
async fn a_lone_bucket_moves_by_exactly_one_interval_at_an_uneven_rate() {
    let redis = Standalone::start();
    let store = redis.store("uneven");
    let c = charge("alice", 7, Duration::from_secs(10));
    let key = bucket_key("test:uneven:", &c.buckets[0]);
    let mut admin = conn(redis.server.port).unwrap();
    let (q, r) = (10_000_000 / 7, 10_000_000 % 7);
    assert_eq!((q, r), (1_428_571, 3));
    let mut next: Option<(i64, i64)> = None;
    for take in 1..=7 {
        let out = store
            .check_and_take(std::slice::from_ref(&c))
            .await
            .unwrap();
        assert!(out[0].allowed, "take {take}");
        assert_eq!(out[0].buckets[0].remaining, 7 - take);
        let (ticks, frac) = stored_state(&mut admin, &key);
        if let Some(expected) = next {
            assert_eq!((ticks, frac), expected, "take {take}");
        } else {
            // A fresh bucket: one interval past Redis's clock.
            let now = now_us(redis.server.port) as i64;
            assert!(ticks > now && ticks <= now + q, "TAT {ticks} at {now}");
            assert_eq!(frac, r);
        }
        let f = frac + r;
        next = Some((ticks + q + f / 7, f % 7));
    }
    // Empty: the eighth is denied and changes nothing.
    let before = stored_state(&mut admin, &key);
    let out = store
        .check_and_take(std::slice::from_ref(&c))
        .await
        .unwrap();
    assert!(!out[0].allowed);
    assert_eq!(stored_state(&mut admin, &key), before);
    // Its waits are exact on Redis's clock, to the microsecond, rounded up:
    // one token is back at TAT + one interval − the period, the bucket is
    // full at TAT. An off-by-one in the fraction or a rounding down shows.
    let (ticks, frac) = before;
    let now = out[0].now_us as i64;
    let ceil = |whole: i64, sevenths: i64| whole + sevenths / 7 + i64::from(sevenths % 7 > 0);
    let retry = ceil(ticks + q - 10_000_000 - now, frac + r);
    let reset = ceil(ticks - now, frac);
    let b = &out[0].buckets[0];
    assert_eq!(
        (b.retry_after, b.reset_after),
        (
            Some(Duration::from_micros(retry as u64)),
            Duration::from_micros(reset as u64)
        ),
        "TAT {ticks} + {frac}/7 µs at {now}"
    );
}

/// Fresh buckets of different limits decided in one script call each get
/// the expiry of their own limit: the script reuses the last fresh
/// bucket's PX text only when it is the same.
#[tokio::test]
async fn fresh_buckets_of_different_limits_in_one_call_keep_their_own_expiry() {
    let redis = Standalone::start();
    let store = redis.store("mixed");
    // Loads the script, so the call below is one EVALSHA.
    store
        .check_and_take(&[charge("warm", 1, Duration::from_secs(1))])
        .await
        .unwrap();
    let ids: Vec<String> = (0..16).map(|i| format!("u{i}")).collect();
    // Alternating: 10 per second (full again after 100 ms) and 1 per 10 s
    // (after 10 s).
    let charges: Vec<Charge<'_>> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            if i % 2 == 0 {
                charge(id, 10, Duration::from_secs(1))
            } else {
                charge(id, 1, Duration::from_secs(10))
            }
        })
        .collect();
    let calls = evalsha_calls(&[redis.server.port]);
    // On this single-threaded runtime every charge is queued before the
    // coalescer's task runs, so they share one call.
    let out = store.check_and_take(&charges).await.unwrap();
    assert_eq!(evalsha_calls(&[redis.server.port]) - calls, 1, "one call");
    assert!(out.iter().all(|o| o.allowed));
    let mut admin = conn(redis.server.port).unwrap();
    for (i, c) in charges.iter().enumerate() {
        let key = bucket_key("test:mixed:", &c.buckets[0]);
        let pttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut admin).unwrap();
        let within = if i % 2 == 0 { 50..=100 } else { 9_000..=10_000 };
        assert!(within.contains(&pttl), "charge {i}: PTTL {pttl}");
    }
}

#[tokio::test]
async fn a_flushed_script_is_reloaded_and_the_charge_taken_once() {
    let redis = Standalone::start();
    let store = redis.store("noscript");
    let c = charge("alice", 10, Duration::from_secs(60));
    assert_eq!(
        store
            .check_and_take(std::slice::from_ref(&c))
            .await
            .unwrap()[0]
            .buckets[0]
            .remaining,
        9
    );
    let mut admin = conn(redis.server.port).unwrap();
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut admin).unwrap();
    let batch = [c.clone(), c.clone()];
    let out = store.check_and_take(&batch).await.unwrap();
    let mut left: Vec<u64> = out.iter().map(|o| o.buckets[0].remaining).collect();
    left.sort_unstable();
    assert_eq!(left, [7, 8], "each charge of the batch taken exactly once");
}

fn config(url: &str, prefix: &str) -> Config {
    Config::from_yaml(&format!(
        r#"
listen: 127.0.0.1:0
store:
  kind: redis
  redis:
    mode: standalone
    urls: ["{url}"]
    key_prefix: "test:{prefix}:"
    response_timeout: 200ms
    connect_timeout: 200ms
    breaker_threshold: 2
    breaker_cool_down: 200ms
failure_mode: open
scopes:
  - name: lenient
    limits:
      - {{ name: per-user, per: identity, capacity: 100, refill_period: 1m }}
  - name: strict
    failure_mode: closed
    limits:
      - {{ name: per-user, per: identity, capacity: 100, refill_period: 1m }}
"#
    ))
    .expect("valid config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dying_fails_open_or_closed_as_configured_and_recovers() {
    let mut redis = Standalone::start();
    let config = config(&redis.url(), "dying");
    let store = RedisStore::new(&config.store.redis).unwrap();
    let _prober = store.spawn_prober(config.store.redis.breaker_cool_down);
    let limiter = Limiter::new(
        Rules::compile(&config).unwrap(),
        AnyStore::Redis(store.clone()),
    );
    let lenient = Request::new("lenient", "alice", "op");
    let strict = Request::new("strict", "alice", "op");
    let d = limiter.decide(&lenient).await.unwrap();
    assert!(d.allowed && !d.degraded);
    assert!(limiter.decide(&strict).await.unwrap().allowed);

    redis.server.kill();
    let d = limiter.decide(&lenient).await.unwrap();
    assert!(d.allowed && d.degraded, "open: allowed and degraded");
    assert!(matches!(
        limiter.decide(&strict).await,
        Err(DecideError::StoreUnavailable { .. })
    ));
    assert!(!store.is_available(), "the breaker opened");

    // With the breaker open, a decision costs microseconds, not a timeout.
    let t = tokio::time::Instant::now();
    for _ in 0..1_000 {
        let d = limiter.decide(&lenient).await.unwrap();
        assert!(d.degraded);
    }
    let per_call = t.elapsed() / 1_000;
    eprintln!("decision with Redis down and the breaker open: {per_call:?}");
    assert!(per_call < Duration::from_millis(1), "{per_call:?} per call");

    redis.server.start();
    let back = tokio::time::Instant::now();
    let s = store.clone();
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(10), "the breaker to close", || {
            s.is_available()
        })
    })
    .await
    .unwrap();
    eprintln!("breaker closed {:?} after Redis restarted", back.elapsed());
    let d = limiter.decide(&strict).await.unwrap();
    assert!(d.allowed && !d.degraded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_decides_on_redis_over_the_wire_and_health_follows_it() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let mut redis = Standalone::start();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_control, _serving) = server::spawn(
        server::Prepared::new(config(&redis.url(), "wire"), None).unwrap(),
        listener,
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    let channel = loop {
        match channel.connect().await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let mut client = RateLimiterClient::new(channel.clone());
    let ask = |cost| ShouldAllowRequest {
        scope: "strict".into(),
        identity: "wire:{user}".into(),
        operation: "op".into(),
        cost,
        ..Default::default()
    };
    let r = client.should_allow(ask(60)).await.unwrap().into_inner();
    assert!(r.allowed && !r.degraded);
    assert_eq!(r.remaining, 40);
    let r = client.should_allow(ask(60)).await.unwrap().into_inner();
    assert!(!r.allowed);
    let wait = r.retry_after.expect("retry_after");
    // 20 more tokens at 100 per minute: 12 s, less what has refilled.
    assert!(
        wait.seconds == 11 || (wait.seconds == 12 && wait.nanos == 0),
        "{wait:?}"
    );

    let mut health = HealthClient::new(channel);
    let status = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    redis.server.kill();
    // The closed scope now answers UNAVAILABLE, distinct from a denial.
    let e = client.should_allow(ask(1)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    // The prober notices within a cool-down, with or without traffic.
    assert_eq!(
        readiness(&mut health, ServingStatus::NotServing).await,
        ServingStatus::NotServing as i32
    );
    let live = health.check(status("")).await.unwrap().into_inner().status;
    assert_eq!(
        live,
        ServingStatus::Serving as i32,
        "still answering, by failure mode"
    );

    redis.server.start();
    assert_eq!(
        readiness(&mut health, ServingStatus::Serving).await,
        ServingStatus::Serving as i32
    );
}

/// Polls the readiness service until it reports `want` (or five seconds
/// pass), returning the last status seen.
async fn readiness(
    health: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
    want: tonic_health::pb::health_check_response::ServingStatus,
) -> i32 {
    let mut seen = -1;
    for _ in 0..100 {
        seen = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: HEALTH_SERVICE.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if seen == want as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}

#[tokio::test]
async fn the_store_speaks_tls_and_authenticates() {
    let redis = Secured::start();
    let tls = |fragment: &str, password: Option<&str>| {
        let mut config = store_config(
            RedisMode::Standalone,
            vec![format!("rediss://127.0.0.1:{}/{fragment}", redis.tls_port)],
            "tls",
        );
        config.password = password.map(Secret::new);
        RedisStore::new(&config).unwrap()
    };
    let c = charge("alice", 10, Duration::from_secs(60));

    // The self-signed certificate is not trusted unless the URL says so.
    let e = tls("", Some(Secured::PASSWORD))
        .check_and_take(std::slice::from_ref(&c))
        .await
        .unwrap_err();
    assert!(e.transient, "{e}");
    // Without the password, Redis refuses; the message never carries it.
    let e = tls("#insecure", None)
        .check_and_take(std::slice::from_ref(&c))
        .await
        .unwrap_err();
    assert!(!e.message.contains(Secured::PASSWORD));

    let store = tls("#insecure", Some(Secured::PASSWORD));
    let out = store
        .check_and_take(std::slice::from_ref(&c))
        .await
        .unwrap();
    assert!(out[0].allowed);
    assert_eq!(out[0].buckets[0].remaining, 9);
    let exists: i64 = redis::cmd("EXISTS")
        .arg(bucket_key("test:tls:", &c.buckets[0]))
        .query(&mut redis.admin())
        .unwrap();
    assert_eq!(exists, 1, "the decision went over TLS to this server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_decision_is_one_command_in_one_round_trip() {
    let redis = Standalone::start();
    let store = redis.store("one-trip");
    // Warm up: connections open, the script loaded.
    let warm = charge("warm", 10, Duration::from_secs(1));
    store
        .check_and_take(std::slice::from_ref(&warm))
        .await
        .unwrap();
    let mut admin = conn(redis.server.port).unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut admin)
        .unwrap();
    let ids: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let tasks: Vec<_> = ids
        .chunks(50)
        .map(|chunk| {
            let (store, chunk) = (store.clone(), chunk.to_vec());
            tokio::spawn(async move {
                for id in &chunk {
                    let c = charge(id, 10, Duration::from_secs(1));
                    assert!(store.check_and_take(&[c]).await.unwrap()[0].allowed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut admin)
        .unwrap();
    let calls = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    // Commandstats counts the script's own TIME, MGET, GET and SET too;
    // every other command would be a client's.
    let total: u64 = stats
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_")?.split_once(":calls="))
        .filter(|(name, _)| {
            !["info", "config|resetstat", "time", "mget", "get", "set"].contains(name)
        })
        .filter_map(|(_, r)| r.split(',').next()?.parse::<u64>().ok())
        .sum();
    // Concurrent decisions may share a call (coalescing): at most one each.
    assert!(calls("evalsha") <= 200, "{stats}");
    assert_eq!(total, calls("evalsha"), "no other command:\n{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readonly_answer_drops_every_connection_and_the_store_recovers() {
    let (primary, other) = (Standalone::start(), Standalone::start());
    let store = primary.store("readonly");
    // Fill every lane: each call lands on the next one.
    for i in 0..20 {
        let id = format!("user-{i}");
        let c = charge(&id, 10, Duration::from_secs(60));
        assert!(store.check_and_take(&[c]).await.unwrap()[0].allowed);
    }
    let mut admin = conn(primary.server.port).unwrap();
    // Client connections, not counting the replication link (flags=M).
    let clients = |admin: &mut redis::Connection| -> usize {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(admin).unwrap();
        list.lines().filter(|l| !l.contains("flags=M")).count()
    };
    let before = clients(&mut admin);
    assert!(before > 1, "the store holds connections");

    // The server is demoted, as a failed-over primary would be.
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(other.server.port)
        .query(&mut admin)
        .unwrap();
    let c = charge("after", 10, Duration::from_secs(60));
    let e = store
        .check_and_take(std::slice::from_ref(&c))
        .await
        .unwrap_err();
    assert!(e.transient, "{e}");
    assert!(e.message.to_lowercase().contains("read only"), "{e}");
    // Only the admin connection is left.
    let mut admin = tokio::task::spawn_blocking(move || {
        wait_until(
            Duration::from_secs(5),
            "the store to drop its connections",
            || clients(&mut admin) == 1,
        );
        admin
    })
    .await
    .unwrap();

    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut admin)
        .unwrap();
    let out = store
        .check_and_take(std::slice::from_ref(&c))
        .await
        .unwrap();
    assert!(out[0].allowed, "new connections write again");
}

/// The ids of the clients connected to Redis, less `conn`'s own.
fn client_ids(c: &mut redis::Connection) -> Vec<u64> {
    let me: u64 = redis::cmd("CLIENT").arg("ID").query(c).unwrap();
    let list: String = redis::cmd("CLIENT").arg("LIST").query(c).unwrap();
    list.lines()
        .filter_map(|l| l.strip_prefix("id=")?.split(' ').next()?.parse().ok())
        .filter(|id| *id != me)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stops_answering_is_replaced() {
    let s = Standalone::start();
    let mut config = s.config("tg-stall:");
    config.pool_size = 1;
    config.response_timeout = Duration::from_millis(50);
    let store = RedisStore::new(&config).unwrap();
    let period = Duration::from_secs(60);
    store
        .check_and_take(&[charge("a", 1000, period)])
        .await
        .unwrap();
    let mut admin = conn(s.server.port).unwrap();
    let before = client_ids(&mut admin);
    assert!(!before.is_empty());

    // Redis stops answering (SIGSTOP): the calls time out.
    let info: String = redis::cmd("INFO").arg("server").query(&mut admin).unwrap();
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .unwrap()
        .trim()
        .to_owned();
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    for _ in 0..3 {
        let r = store.check_and_take(&[charge("a", 1000, period)]).await;
        assert!(r.is_err(), "{r:?}");
    }
    signal("-CONT");

    // Decisions resume, on a new connection: the stalled one was dropped.
    let mut resumed = false;
    for _ in 0..100 {
        if store
            .check_and_take(&[charge("a", 1000, period)])
            .await
            .is_ok()
        {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(resumed);
    let after = client_ids(&mut admin);
    for id in &before {
        assert!(
            !after.contains(id),
            "connection {id} was kept: {before:?} -> {after:?}"
        );
    }
}
