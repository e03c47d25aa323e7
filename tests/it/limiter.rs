//! The limiter over the embedded store, with tokio's clock paused: exact
//! timing, no network.

use std::time::Duration;

use tollgate::config::Config;
use tollgate::limiter::{Limiter, Request, Rules};
use tollgate::store::memory::MemoryStore;

fn limiter(yaml: &str) -> Limiter<MemoryStore> {
    let config = Config::from_yaml(yaml).expect("valid config");
    Limiter::new(
        Rules::compile(&config).expect("rules"),
        MemoryStore::default(),
    )
}

const THREE_PER_SECOND: &str = r#"
scopes:
  - name: s
    limits:
      - name: three-per-second
        per: identity
        capacity: 3
        refill_period: 1s
      - name: ten-per-hour
        per: identity
        capacity: 10
        refill_period: 1h
  - name: io
    limits:
      - name: pair
        per: identity_operation
        capacity: 3
        refill_period: 1h
"#;

#[tokio::test(start_paused = true)]
async fn retry_after_is_exact_to_the_nanosecond() {
    let l = limiter(THREE_PER_SECOND);
    let r = Request::new("s", "alice", "op");
    for _ in 0..3 {
        assert!(l.decide(&r).await.expect("decide").allowed);
    }
    let denied = l.decide(&r).await.expect("decide");
    assert!(!denied.allowed);
    // One token per 1s/3 = 333_333_333.3 ns: the next whole nanosecond.
    let wait = denied.retry_after.expect("retry_after");
    assert_eq!(wait, Duration::from_nanos(333_333_334));

    tokio::time::advance(wait - Duration::from_nanos(1)).await;
    let early = l.decide(&r).await.expect("decide");
    assert!(!early.allowed, "one nanosecond early is still denied");
    assert_eq!(early.retry_after, Some(Duration::from_nanos(1)));
    tokio::time::advance(Duration::from_nanos(1)).await;
    assert!(
        l.decide(&r).await.expect("decide").allowed,
        "at retry_after it is allowed"
    );
}

#[tokio::test(start_paused = true)]
async fn denied_request_takes_no_tokens() {
    let l = limiter(THREE_PER_SECOND);
    let r = Request::new("s", "bob", "op");
    for _ in 0..3 {
        l.decide(&r).await.expect("decide");
    }
    // Deny many times; the hourly bucket must still hold 7.
    for _ in 0..50 {
        let d = l.decide(&r).await.expect("decide");
        assert!(!d.allowed);
        let hourly = d
            .buckets
            .iter()
            .find(|b| &*b.rule == "ten-per-hour")
            .expect("bucket");
        assert_eq!(hourly.remaining, 7);
        assert!(!hourly.exhausted);
    }
}

#[tokio::test(start_paused = true)]
async fn several_windows_on_one_key_both_bind() {
    let l = limiter(THREE_PER_SECOND);
    let r = Request::new("s", "carol", "op");
    let mut allowed = 0;
    // 20 seconds at 10 requests per second: the hourly window caps it at 10.
    for _ in 0..200 {
        allowed += usize::from(l.decide(&r).await.expect("decide").allowed);
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    assert_eq!(allowed, 10);
    let d = l.decide(&r).await.expect("decide");
    assert_eq!(&*d.primary().expect("primary").rule, "ten-per-hour");
    // The hourly bucket refills one token per 6 minutes.
    assert!(d.retry_after.expect("retry") > Duration::from_secs(300));
}

#[tokio::test(start_paused = true)]
async fn full_buckets_are_swept_so_memory_follows_active_callers() {
    let store = MemoryStore::default();
    let config = Config::from_yaml(THREE_PER_SECOND).expect("valid");
    let l = Limiter::new(Rules::compile(&config).expect("rules"), store.clone());
    for i in 0..1000 {
        let id = format!("user-{i}");
        l.decide(&Request::new("s", &id, "op"))
            .await
            .expect("decide");
    }
    assert_eq!(store.len(), 2000, "two buckets per identity");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        store.sweep(),
        1000,
        "per-second buckets are full again and dropped"
    );
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(store.sweep(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_sweeper_task_runs_by_itself() {
    let store = MemoryStore::default();
    let _sweeper = store.spawn_sweeper(Duration::from_secs(10));
    let config = Config::from_yaml(THREE_PER_SECOND).expect("valid");
    let l = Limiter::new(Rules::compile(&config).expect("rules"), store.clone());
    l.decide(&Request::new("s", "dan", "op"))
        .await
        .expect("decide");
    assert_eq!(store.len(), 2);
    tokio::time::sleep(Duration::from_secs(3601 + 20)).await;
    assert_eq!(store.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn identities_that_look_alike_keep_separate_buckets() {
    let l = limiter(THREE_PER_SECOND);
    // Values that would collide under naive `a:b` joining.
    let pairs = [
        ("a:b", "c"),
        ("a", "b:c"),
        ("", "a:b:c"),
        ("{a}", ""),
        ("ä", ""),
        ("a\u{300}", ""),
    ];
    for (identity, operation) in pairs {
        for _ in 0..3 {
            let d = l
                .decide(&Request::new("io", identity, operation))
                .await
                .expect("decide");
            assert!(
                d.allowed,
                "({identity:?}, {operation:?}) has its own bucket"
            );
        }
        let d = l
            .decide(&Request::new("io", identity, operation))
            .await
            .expect("decide");
        assert!(
            !d.allowed,
            "and a fourth call is denied: the bucket is real"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_embedded_store_applies_the_failure_mode_and_takes_nothing() {
    let yaml = |mode: &str| {
        format!(
            "scopes:\n  - name: s\n    failure_mode: {mode}\n    limits:\n      - {{name: a, per: identity, capacity: 3, refill_period: 1s}}\n      - {{name: b, per: scope, capacity: 100, refill_period: 1h}}\n"
        )
    };
    for mode in ["open", "closed"] {
        let config = Config::from_yaml(&yaml(mode)).expect("valid");
        // Room for the scope bucket and two identities.
        let store = MemoryStore::with_max_bytes(
            4,
            bytes_of("b", None, 100, 3600) + 2 * bytes_of("a", Some("u1"), 3, 1),
        );
        let l = Limiter::new(Rules::compile(&config).expect("rules"), store.clone());
        for id in ["u1", "u2"] {
            assert!(
                l.decide(&Request::new("s", id, "op"))
                    .await
                    .expect("decide")
                    .allowed
            );
        }
        let third = l.decide(&Request::new("s", "u3", "op")).await;
        match mode {
            "open" => {
                let d = third.expect("fails open");
                assert!(d.allowed && d.degraded, "{d:?}");
            }
            _ => assert!(third.is_err(), "fails closed: {third:?}"),
        }
        assert_eq!(store.len(), 3, "the refused charge created nothing");
        // It took nothing either: the scope bucket had 98, and u1's call now takes one.
        let d = l
            .decide(&Request::new("s", "u1", "op"))
            .await
            .expect("decide");
        let scope_bucket = d.buckets.iter().find(|b| &*b.rule == "b").expect("b");
        assert_eq!(scope_bucket.remaining, 97);
        // Once identities' buckets refill and are swept, there is room again.
        tokio::time::advance(Duration::from_secs(2)).await;
        store.sweep();
        assert!(
            l.decide(&Request::new("s", "u3", "op"))
                .await
                .expect("decide")
                .allowed
        );
    }
}

#[tokio::test(start_paused = true)]
async fn requests_decided_together_report_the_summed_cost_of_a_shared_bucket() {
    let l = limiter(THREE_PER_SECOND);
    let two = Request {
        cost: 2,
        ..Request::new("s", "eve", "op")
    };
    // Each alone fits the 3-token bucket; together they need 4, which no
    // wait can ever provide.
    let d = l.decide_together(&[two, two]).await.expect("decide");
    assert!(d.iter().all(|d| !d.allowed));
    let reason = d[0].reason.as_deref().unwrap_or("");
    assert!(
        reason.starts_with("cost 4 exceeds the capacity 3"),
        "{reason}"
    );
    assert_eq!(d[0].retry_after, None);
}

#[tokio::test(start_paused = true)]
async fn a_full_embedded_store_refuses_new_single_buckets_too() {
    let config = Config::from_yaml(
        "failure_mode: closed\nscopes:\n  - name: s\n    limits:\n      - {name: a, per: identity, capacity: 3, refill_period: 1s}\n",
    )
    .expect("valid");
    let store = MemoryStore::with_max_bytes(4, bytes_of("a", Some("u1"), 3, 1));
    let l = Limiter::new(Rules::compile(&config).expect("rules"), store.clone());
    assert!(
        l.decide(&Request::new("s", "u1", "op"))
            .await
            .expect("room")
            .allowed
    );
    assert!(
        l.decide(&Request::new("s", "u2", "op")).await.is_err(),
        "no room for u2"
    );
    // Existing buckets keep working, and a dry run needs no room.
    assert!(
        l.decide(&Request::new("s", "u1", "op"))
            .await
            .expect("held")
            .allowed
    );
    let dry = Request {
        dry_run: true,
        ..Request::new("s", "u2", "op")
    };
    assert!(l.decide(&dry).await.expect("dry run").allowed);
    assert_eq!(store.len(), 1);
}

/// What a bucket of scope `s` costs against the embedded store's bound.
fn bytes_of(rule: &str, identity: Option<&str>, capacity: u64, period_s: u64) -> usize {
    MemoryStore::bytes_of(&tollgate::store::BucketCharge {
        key: tollgate::store::BucketKey {
            scope: "s",
            rule,
            identity,
            operation: None,
            hash_tag: Default::default(),
        },
        shape: tollgate::bucket::Shape {
            capacity,
            period: period_s * 1_000_000_000,
        },
        cost: 1,
        shadow: false,
        reserve: 0,
        window: None,
        max_delay: std::time::Duration::ZERO,
    })
}
