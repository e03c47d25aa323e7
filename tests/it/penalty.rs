//! The penalty box: strikes counted with the denials that earn them, bans
//! that escalate exactly and are forgiven, a banned caller answered without
//! touching its buckets, and, across two replicas on Redis (standalone and
//! Cluster), strikes that add up and bans answered from memory.

use std::time::Duration;

use crate::common::TestServer;
use crate::common::redis::{Cluster, Standalone, conn, evalsha_calls};
use crate::common::{ask, req, to_std};
use tollgate::config::Config;
use tollgate::limiter::{Decision, Limiter, Request, Rules};
use tollgate::pb::tollgate::v1::DenialReason;
use tollgate::store::ban_cache::BanCache;
use tollgate::store::memory::MemoryStore;

const ESCALATING: &str = r#"
scopes:
  - name: api
    limits:
      - { name: per-user, per: identity, capacity: 1, refill_period: 1h }
    penalty: { strikes: 20, within: 1m, ban: 1m, factor: 2, max_ban: 5m, forgive_after: 1h }
"#;

fn limiter(yaml: &str) -> Limiter<BanCache<MemoryStore>> {
    let config = Config::from_yaml(yaml).expect("valid config");
    Limiter::new(
        Rules::compile(&config).expect("rules"),
        BanCache::new(MemoryStore::default()),
    )
}

async fn decide(l: &Limiter<BanCache<MemoryStore>>, r: &Request<'_>) -> Decision {
    l.decide(r).await.expect("the embedded store answers")
}

/// Denials 1 ms apart until the caller is banned: how many it took, and
/// the decision that banned.
async fn offend(l: &Limiter<BanCache<MemoryStore>>, r: &Request<'_>) -> (u32, Decision) {
    for denials in 1..=100 {
        let d = decide(l, r).await;
        assert!(!d.allowed, "the bucket is empty: every request is denied");
        if d.banned() {
            return (denials, d);
        }
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    panic!("100 denials and no ban");
}

/// Waits out a ban of exactly `ban`, checking it one nanosecond before its
/// end and letting go at it.
async fn serve_ban(l: &Limiter<BanCache<MemoryStore>>, r: &Request<'_>, ban: Duration) {
    tokio::time::advance(ban - Duration::from_nanos(1)).await;
    let last = decide(l, r).await;
    assert!(last.banned(), "still banned one nanosecond before the end");
    assert_eq!(last.retry_after, Some(Duration::from_nanos(1)));
    tokio::time::advance(Duration::from_nanos(1)).await;
}

#[tokio::test(start_paused = true)]
async fn bans_escalate_exactly_to_the_tick_up_to_max_ban_and_are_forgiven() {
    let l = limiter(ESCALATING);
    let r = Request::new("api", "agent-7", "retry");
    assert!(decide(&l, &r).await.allowed, "the one token");
    for (offence, minutes) in [1u64, 2, 4, 5, 5].into_iter().enumerate() {
        let (denials, d) = offend(&l, &r).await;
        assert_eq!(denials, 20, "offence {offence}: the 20th denial bans");
        let ban = Duration::from_secs(60 * minutes);
        assert_eq!(d.retry_after, Some(ban), "offence {offence}");
        assert!(d.penalty.banned.unwrap().started);
        assert!(
            !d.buckets.is_empty(),
            "the denial that bans read its bucket"
        );
        serve_ban(&l, &r, ban).await;
    }
    // An hour without a strike after the last ban: forgiven, and the bucket
    // has refilled its one token meanwhile.
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert!(decide(&l, &r).await.allowed);
    let (denials, d) = offend(&l, &r).await;
    assert_eq!(denials, 20);
    assert_eq!(d.retry_after, Some(Duration::from_secs(60)), "back to 1m");
}

#[tokio::test(start_paused = true)]
async fn strikes_outside_the_window_start_a_new_count() {
    let l = limiter(ESCALATING);
    let r = Request::new("api", "slow", "retry");
    assert!(decide(&l, &r).await.allowed);
    // 19 denials, then a minute's pause: the window is over.
    for _ in 0..19 {
        assert!(!decide(&l, &r).await.banned());
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    tokio::time::advance(Duration::from_secs(60)).await;
    let (denials, _) = offend(&l, &r).await;
    assert_eq!(denials, 20, "the old window's strikes do not count");
}

const READS_AND_LOGINS: &str = r#"
scopes:
  - name: app
    limits:
      - { name: logins, per: identity, capacity: 1, refill_period: 1h, operations: [login] }
      - { name: reads, per: identity, capacity: 100, refill_period: 366d, operations: [read] }
    penalty: { strikes: 3, within: 1m, ban: 1m, on: [logins] }
"#;

#[tokio::test(start_paused = true)]
async fn a_banned_caller_is_denied_everywhere_in_the_scope_and_takes_nothing() {
    let l = limiter(READS_AND_LOGINS);
    let (login, read) = (
        Request::new("app", "mallory", "login"),
        Request::new("app", "mallory", "read"),
    );
    assert_eq!(decide(&l, &read).await.buckets[0].remaining, 99);
    assert!(decide(&l, &login).await.allowed);
    for _ in 0..2 {
        assert!(!decide(&l, &login).await.banned());
    }
    let banned = decide(&l, &login).await;
    assert!(banned.banned(), "the third failed login bans");
    for _ in 0..50 {
        let d = decide(&l, &read).await;
        assert!(!d.allowed && d.banned());
        assert!(d.buckets.is_empty(), "no bucket was read");
        assert_eq!(d.retry_after, Some(Duration::from_secs(60)));
    }
    assert!(
        l.store().answered_locally() >= 49,
        "after the first answer, from memory"
    );
    tokio::time::advance(Duration::from_secs(60)).await;
    let d = decide(&l, &read).await;
    assert!(d.allowed);
    assert_eq!(
        d.buckets[0].remaining, 98,
        "the 50 banned reads took nothing"
    );
    // Reads never strike: only `logins` is in `on`.
    let other = Request::new("app", "reader", "read");
    for _ in 0..100 {
        decide(&l, &other).await;
    }
    for _ in 0..10 {
        let d = decide(&l, &other).await;
        assert!(!d.allowed && !d.banned() && !d.penalty.struck);
    }
}

#[tokio::test(start_paused = true)]
async fn dry_runs_and_the_anonymous_caller_never_strike() {
    let l = limiter(READS_AND_LOGINS);
    let mut dry = Request::new("app", "tester", "login");
    dry.dry_run = true;
    assert!(
        decide(&l, &Request::new("app", "tester", "login"))
            .await
            .allowed
    );
    for _ in 0..10 {
        let d = decide(&l, &dry).await;
        assert!(!d.allowed && !d.penalty.struck);
    }
    let anon = Request::new("app", "", "login");
    for _ in 0..10 {
        assert!(!decide(&l, &anon).await.banned());
    }
}

/// Every key under `prefix` on the servers on `ports`, with its value.
fn snapshot(ports: &[u16], prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut all = Vec::new();
    for &port in ports {
        let mut c = conn(port).unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query(&mut c)
            .unwrap();
        for k in keys {
            let v: Vec<u8> = redis::cmd("DUMP").arg(&k).query(&mut c).unwrap();
            all.push((k, v));
        }
    }
    all.sort();
    all
}

fn replica_yaml(mode: &str, urls: &[String], prefix: &str) -> String {
    format!(
        r#"
store:
  kind: redis
  redis:
    mode: {mode}
    urls: {urls:?}
    key_prefix: "{prefix}"
    response_timeout: 2s
    wait_timeout: 2s
    connect_timeout: 2s
failure_mode: closed
scopes:
  - name: app
    limits:
      - {{ name: logins, per: identity, capacity: 1, refill_period: 1h, operations: [login] }}
      - {{ name: reads, per: identity, capacity: 100, refill_period: 366d, operations: [read] }}
    penalty: {{ strikes: 10, within: 1m, ban: 1m, on: [logins] }}
"#
    )
}

/// Two replicas on one Redis: strikes from both add up to one ban; after
/// each replica's first banned answer, a banned caller costs no script
/// call; and a banned request writes nothing at all.
async fn two_replicas_share_strikes_and_answer_bans_from_memory(
    mode: &str,
    urls: Vec<String>,
    ports: &[u16],
) {
    let prefix = format!("test:penalty:{mode}:");
    let yaml = replica_yaml(mode, &urls, &prefix);
    let config = || Config::from_yaml(&yaml).unwrap();
    let replicas = [
        TestServer::start_config(config()).await,
        TestServer::start_config(config()).await,
    ];
    let mut clients = [replicas[0].client().await, replicas[1].client().await];
    assert!(
        ask(&mut clients[0], req("app", "bot", "read"))
            .await
            .allowed
    );
    assert!(
        ask(&mut clients[1], req("app", "bot", "login"))
            .await
            .allowed
    );
    // Ten failed logins, alternating replicas: the tenth, on replica 1,
    // bans.
    let mut learned = tokio::time::Instant::now();
    for i in 0..10 {
        learned = tokio::time::Instant::now();
        let a = ask(&mut clients[i % 2], req("app", "bot", "login")).await;
        assert!(!a.allowed);
        let banned = a.denial_reason == DenialReason::Banned as i32;
        assert_eq!(banned, i == 9, "strike {} of 10", i + 1);
        if banned {
            let wait = to_std(&a.retry_after).unwrap();
            assert!(wait <= Duration::from_secs(60) && wait > Duration::from_secs(59));
        }
    }
    let before = snapshot(ports, &prefix);
    let calls = evalsha_calls(ports);
    for i in 0..20 {
        let op = if i % 3 == 0 { "login" } else { "read" };
        let a = ask(&mut clients[i % 2], req("app", "bot", op)).await;
        assert!(!a.allowed);
        assert_eq!(a.denial_reason, DenialReason::Banned as i32);
        assert!(a.buckets.is_empty());
    }
    let calls = evalsha_calls(ports) - calls;
    let took = learned.elapsed();
    if took < tollgate::store::ban_cache::MAX_HOLD {
        assert_eq!(
            calls, 1,
            "replica 0 asks Redis once and learns the ban; replica 1 knew it"
        );
    } else {
        // A slow machine: each replica may ask once more per hold gone by.
        let holds = took.as_millis() / tollgate::store::ban_cache::MAX_HOLD.as_millis();
        assert!(
            calls >= 1 && calls <= 1 + 2 * holds as u64,
            "{calls} in {took:?}"
        );
    }
    assert_eq!(
        snapshot(ports, &prefix),
        before,
        "banned requests write nothing"
    );
    let reads = ask(&mut clients[0], req("app", "other", "read")).await;
    assert!(reads.allowed, "another caller is not banned");
    // The ban the strikes started is listed, from either replica.
    for replica in &replicas {
        let mut admin =
            tollgate::pb::tollgate::v1::admin_client::AdminClient::new(replica.channel().await);
        let list = admin
            .list_bans(tollgate::pb::tollgate::v1::ListBansRequest {
                scope: "app".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let who: Vec<&str> = list.bans.iter().map(|b| b.identity.as_str()).collect();
        assert_eq!((list.total, who), (1, vec!["bot"]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_redis_standalone_share_strikes_and_bans() {
    let redis = Standalone::start();
    let port = redis.server.port;
    two_replicas_share_strikes_and_answer_bans_from_memory(
        "standalone",
        vec![redis.url()],
        &[port],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_redis_cluster_share_strikes_and_bans() {
    let cluster = Cluster::start();
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    two_replicas_share_strikes_and_answer_bans_from_memory("cluster", cluster.urls(), &ports).await;
}

const LISTS: &str = r#"
scopes:
  - name: app
    limits:
      - { name: per-user, per: identity, capacity: 1, refill_period: 1h }
    penalty: { strikes: 3, within: 1m, ban: 1m }
    allow: ["trusted-*"]
    deny: ["evil", "scraper-?"]
"#;

#[tokio::test(start_paused = true)]
async fn the_allow_list_spares_the_box_not_the_limits_and_the_deny_list_costs_no_store_call() {
    let l = limiter(LISTS);
    let trusted = Request::new("app", "trusted-ci", "x");
    assert!(decide(&l, &trusted).await.allowed);
    for _ in 0..20 {
        let d = decide(&l, &trusted).await;
        assert!(!d.allowed, "its limit still applies");
        assert!(!d.banned() && !d.penalty.struck, "but it never strikes");
    }
    let held = l.store().inner().len();
    for who in ["evil", "scraper-1"] {
        let d = decide(&l, &Request::new("app", who, "x")).await;
        assert!(!d.allowed && d.banned() && d.deny_listed);
        assert_eq!(d.retry_after, None, "a deny list has no end");
        assert!(d.reason.unwrap().contains("deny list"));
    }
    assert_eq!(l.store().inner().len(), held, "no bucket was made");
    let bad = Config::from_yaml(&LISTS.replace("\"scraper-?\"", "\"[\"")).unwrap_err();
    assert!(
        bad.problems
            .iter()
            .any(|p| p.starts_with("scopes[0].deny[1]: ")),
        "{:?}",
        bad.problems
    );
}

#[tokio::test]
async fn envoy_answers_a_banned_descriptor_over_limit_until_the_ban_ends_and_says_why() {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;

    let server = TestServer::start(
        r#"
scopes:
  - name: edge
    descriptor_keys: { identity: user }
    limits:
      - { name: per-user, per: identity, capacity: 1, refill_period: 1h }
    penalty: { strikes: 2, within: 1m, ban: 90s }
"#,
    )
    .await;
    let mut envoy = RateLimitServiceClient::new(server.channel().await);
    let request = || RateLimitRequest {
        domain: "edge".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "user".into(),
                value: "looping-agent".into(),
            }],
            ..Default::default()
        }],
        hits_addend: 0,
    };
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(
            envoy
                .should_rate_limit(request())
                .await
                .unwrap()
                .into_inner(),
        );
    }
    assert_eq!(answers[0].overall_code, Code::Ok as i32);
    let banned_header = |a: &envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse| {
        a.response_headers_to_add
            .iter()
            .any(|h| h.key == "x-tollgate-denied" && h.value == "banned")
    };
    assert!(!banned_header(&answers[1]), "one strike is not a ban");
    for a in &answers[2..] {
        assert_eq!(a.overall_code, Code::OverLimit as i32);
        assert!(banned_header(a));
        let reset = a.statuses[0].duration_until_reset.as_ref().unwrap();
        assert!(
            (89..=90).contains(&reset.seconds),
            "until the ban ends: {reset:?}"
        );
    }
}

/// `tollgate <args>`, its stdout, and whether it succeeded.
fn cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .expect("tollgate runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_ban_list_and_unban_across_two_replicas_on_redis() {
    use tollgate::pb::tollgate::v1::admin_client::AdminClient;
    use tollgate::pb::tollgate::v1::{BanRequest, ListBansRequest, UnbanRequest};
    use tollgate::store::ban_cache::MAX_HOLD;

    let redis = Standalone::start();
    let yaml = replica_yaml("standalone", &[redis.url()], "test:penalty:admin:");
    let config = || Config::from_yaml(&yaml).unwrap();
    let replicas = [
        TestServer::start_config(config()).await,
        TestServer::start_config(config()).await,
    ];
    let mut clients = [replicas[0].client().await, replicas[1].client().await];
    let mut admin = [
        AdminClient::new(replicas[0].channel().await),
        AdminClient::new(replicas[1].channel().await),
    ];
    let ban = |identity: &str, secs: i64| BanRequest {
        scope: "app".into(),
        identity: identity.into(),
        duration: Some(prost_types::Duration {
            seconds: secs,
            nanos: 0,
        }),
        reason: "abuse report #42".into(),
        ..Default::default()
    };
    // Banned through replica 0, answered by replica 1.
    let set = admin[0]
        .ban(ban("spammer", 600))
        .await
        .unwrap()
        .into_inner();
    let left = to_std(&set.remaining).unwrap();
    assert!(left > Duration::from_secs(599) && left <= Duration::from_secs(600));
    for client in &mut clients {
        let a = ask(client, req("app", "spammer", "read")).await;
        assert_eq!(a.denial_reason, DenialReason::Banned as i32);
        assert!(to_std(&a.retry_after).unwrap() > Duration::from_secs(598));
    }
    // Four more, listed by ban end from either replica, two to a page.
    for (i, who) in ["b1", "b2", "b3", "b4"].iter().enumerate() {
        admin[1].ban(ban(who, 60 + i as i64)).await.unwrap();
    }
    for a in &mut admin {
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = a
                .list_bans(ListBansRequest {
                    scope: "app".into(),
                    page_size: 2,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(page.total, 5);
            assert!(page.bans.len() <= 2);
            seen.extend(page.bans.into_iter().map(|b| b.identity));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(seen, ["b1", "b2", "b3", "b4", "spammer"]);
    }
    // A replica started now reads the count into its gauge at once.
    let port = crate::common::free_port();
    let metered = format!("metrics:\n  listen: 127.0.0.1:{port}\n{yaml}");
    let third = TestServer::start_config(Config::from_yaml(&metered).unwrap()).await;
    let mut text = String::new();
    for _ in 0..50 {
        text = crate::common::metrics_get(port, "/metrics").await;
        if text.contains("tollgate_bans_active{scope=\"app\"} 5") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        text.contains("tollgate_bans_active{scope=\"app\"} 5"),
        "{text}"
    );
    // So does its status page, with the first bans and the time left.
    let page = crate::common::metrics_get(port, "/").await;
    assert!(page.contains("banned now: <b>5</b>"), "{page}");
    assert!(
        page.contains("<li><code>b1</code>: 59 s left</li>")
            || page.contains("<li><code>b1</code>: 60 s left</li>"),
        "{page}"
    );
    third.shutdown().await;
    let (ok, top) = cli(&["top", "--addr", &replicas[0].url(), "-n", "1", "-k", "2"]);
    assert!(ok, "{top}");
    assert!(top.contains("BANNED in app: 5\n    b1 "), "{top}");
    let (ok, listed) = cli(&[
        "bans",
        "--addr",
        &replicas[0].url(),
        "--addr",
        &replicas[1].url(),
        "--scope",
        "app",
    ]);
    assert!(ok, "{listed}");
    assert!(listed.starts_with("5 ban(s) in scope app"), "{listed}");
    assert!(listed.contains("  spammer  "), "{listed}");
    // The operator's reason is kept with each ban, and listed with it.
    assert_eq!(
        listed.matches("  reason: abuse report #42\n").count(),
        5,
        "{listed}"
    );
    // Unbanned through replica 0: at once there, and on replica 1 as the
    // published change arrives (timed in ban_feed.rs; here within a hold).
    let unban = UnbanRequest {
        scope: "app".into(),
        identity: "spammer".into(),
        ..Default::default()
    };
    assert!(admin[0].unban(unban).await.unwrap().into_inner().was_banned);
    assert!(
        ask(&mut clients[0], req("app", "spammer", "read"))
            .await
            .allowed
    );
    tokio::time::sleep(MAX_HOLD).await;
    assert!(
        ask(&mut clients[1], req("app", "spammer", "read"))
            .await
            .allowed
    );
    let (ok, out) = cli(&[
        "unban",
        "--addr",
        &replicas[1].url(),
        "--scope",
        "app",
        "--identity",
        "b1",
    ]);
    assert!(ok && out.contains("was banned"), "{out}");
    let (ok, out) = cli(&[
        "ban",
        "--addr",
        &replicas[1].url(),
        "--scope",
        "app",
        "--identity",
        "b1",
        "--duration",
        "90s",
    ]);
    assert!(
        ok && out.starts_with("BANNED scope=app identity=b1 for 90.000s"),
        "{out}"
    );
}

#[tokio::test]
async fn operator_calls_refuse_bad_input_naming_the_field() {
    use tollgate::pb::tollgate::v1::admin_client::AdminClient;
    use tollgate::pb::tollgate::v1::{BanRequest, ListBansRequest};

    let server = TestServer::start(READS_AND_LOGINS).await;
    let mut admin = AdminClient::new(server.channel().await);
    let good = BanRequest {
        scope: "app".into(),
        identity: "x".into(),
        duration: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        ..Default::default()
    };
    let refused =
        async |admin: &mut AdminClient<_>, r: BanRequest| admin.ban(r).await.expect_err("refused");
    let e = refused(
        &mut admin,
        BanRequest {
            identity: "i".repeat(257),
            ..good.clone()
        },
    )
    .await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("identity: "), "{}", e.message());
    let e = refused(
        &mut admin,
        BanRequest {
            duration: None,
            ..good.clone()
        },
    )
    .await;
    assert!(e.message().starts_with("duration: "), "{}", e.message());
    let e = refused(
        &mut admin,
        BanRequest {
            operation: "read".into(),
            ..good.clone()
        },
    )
    .await;
    assert!(e.message().starts_with("operation: "), "{}", e.message());
    let e = refused(
        &mut admin,
        BanRequest {
            scope: "nope".into(),
            ..good.clone()
        },
    )
    .await;
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let e = admin
        .list_bans(ListBansRequest {
            scope: "app".into(),
            page_size: 1001,
            ..Default::default()
        })
        .await
        .expect_err("too big a page");
    assert!(e.message().starts_with("page_size: "), "{}", e.message());
    // A token ListBans never gave, or longer than any it gives.
    let long = format!("1.{}", "A".repeat(tollgate::api::bans::MAX_PAGE_TOKEN_LEN));
    for token in ["2", "x.AAAA", "12.!!", long.as_str()] {
        let e = admin
            .list_bans(ListBansRequest {
                scope: "app".into(),
                page_token: token.into(),
                ..Default::default()
            })
            .await
            .expect_err("not a token");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{token}");
        assert!(e.message().starts_with("page_token: "), "{}", e.message());
    }
    admin.ban(good).await.expect("a good ban is taken");
}

#[tokio::test(start_paused = true)]
async fn penalty_records_count_against_the_embedded_store_bound_and_are_swept() {
    let max = 64 * 1024;
    let store = MemoryStore::with_max_bytes(1, max);
    let config = Config::from_yaml(READS_AND_LOGINS).unwrap();
    let l = Limiter::new(Rules::compile(&config).unwrap(), store.clone());
    // Far more callers than fit: each makes a bucket and strikes once.
    let mut degraded = 0;
    for i in 0..2_000 {
        let who = format!("caller-{i:0>200}");
        let login = Request::new("app", &who, "login");
        for _ in 0..2 {
            let d = l.decide(&login).await.expect("fails open, never errors");
            degraded += u32::from(d.degraded);
        }
        assert!(store.bytes_held() <= max, "{} > {max}", store.bytes_held());
    }
    assert!(degraded > 0, "the bound was reached");
    // An hour on, the buckets are full and the strikes forgiven: nothing
    // is left to keep, and the sweeper gives back every byte.
    tokio::time::advance(Duration::from_secs(3600)).await;
    store.sweep();
    assert_eq!(
        store.bytes_held(),
        0,
        "records and buckets give their bytes back"
    );
}

#[tokio::test(start_paused = true)]
async fn strikes_count_in_batches_and_a_banned_caller_cannot_reserve() {
    let l = limiter(READS_AND_LOGINS);
    let login = Request::new("app", "batcher", "login");
    let ds = l.decide_each(&[login, login, login, login]).await;
    let banned: Vec<bool> = ds.iter().map(|d| d.as_ref().unwrap().banned()).collect();
    assert_eq!(banned, [false, false, false, true], "the third strike bans");
    let mut reserve = Request::new("app", "batcher", "read");
    reserve.settle_within = Some(Duration::from_secs(10));
    let d = decide(&l, &reserve).await;
    assert!(d.banned() && d.reservation.is_none());
}

#[tokio::test]
async fn failed_logins_reported_as_strikes_over_grpc_ban_the_guesser() {
    let server = TestServer::start(READS_AND_LOGINS).await;
    let mut client = server.client().await;
    let report = || tollgate::pb::tollgate::v1::ShouldAllowRequest {
        dry_run: true,
        strike: true,
        ..req("app", "guesser", "read")
    };
    for i in 0..3 {
        let a = ask(&mut client, report()).await;
        assert!(a.allowed, "report {i}: the answer stands as decided");
    }
    let next = ask(&mut client, req("app", "guesser", "read")).await;
    assert_eq!(next.denial_reason, DenialReason::Banned as i32);
    assert!(to_std(&next.retry_after).unwrap() > Duration::from_secs(59));
}

const QUOTAS: &str = r#"
envoy_quota_mode: true
scopes:
  - name: edge
    limits:
      - { name: team, per: identity, capacity: 1, refill_period: 1h, when: { quota: team } }
      - { name: org, per: identity, capacity: 100, refill_period: 1h, when: { quota: org } }
    penalty: { strikes: 2, within: 1m, ban: 1m }
"#;

/// Envoy's quota mode: a request whose first charge is denied only because
/// some quota descriptors are over is charged again without them. It
/// strikes at most once, and only when it is denied for good.
#[tokio::test(start_paused = true)]
async fn an_envoy_quota_retry_strikes_only_a_request_denied_for_good_and_only_once() {
    use std::collections::HashMap;
    let l = limiter(QUOTAS);
    let team_attrs = HashMap::from([("quota".to_owned(), "team".to_owned())]);
    let org_attrs = HashMap::from([("quota".to_owned(), "org".to_owned())]);
    // Entries make them Envoy descriptors, which the global quota mode
    // makes quota descriptors.
    let entries = [("user", "agent")];
    let quota = |identity, attrs| Request {
        attributes: attrs,
        entries: &entries,
        ..Request::new("edge", identity, "call")
    };
    let (team, org) = (quota("agent", &team_attrs), quota("agent", &org_attrs));
    // The team quota is spent at once; then every request is denied on it
    // first, and passes on the org quota: no strike, so never banned.
    for i in 0..6 {
        let ds = l.decide_together(&[team, org]).await.unwrap();
        assert!(Decision::overall(&ds), "request {i} passes");
        assert!(ds.iter().all(|d| !d.banned()), "request {i} struck");
    }
    // Denied for good on the team quota alone: one strike each, so the
    // second bans (2 strikes), as if nothing had struck before.
    let alone = l.decide_together(&[team]).await.unwrap();
    assert!(!alone[0].allowed && !alone[0].banned());
    let alone = l.decide_together(&[team]).await.unwrap();
    assert!(alone[0].banned(), "the second denial for good bans");

    // Dry runs never strike, whatever is over.
    let dry = Request {
        dry_run: true,
        ..quota("other", &team_attrs)
    };
    for _ in 0..3 {
        let ds = l.decide_together(&[dry, dry]).await.unwrap();
        assert!(ds.iter().all(|d| !d.banned()), "a dry run struck");
    }
    // Every quota over: the denial stands on them, and its one strike is
    // reported after it (the first charge held it back).
    let twice = quota("other", &team_attrs);
    let ds = l.decide_together(&[twice, twice]).await.unwrap();
    assert!(!Decision::overall(&ds) && ds.iter().all(|d| !d.banned()));
    let ds = l.decide_together(&[twice, twice]).await.unwrap();
    assert!(!Decision::overall(&ds), "denied; its strike starts the ban");
    let ds = l.decide_together(&[twice, twice]).await.unwrap();
    assert!(
        ds.iter().all(Decision::banned),
        "two strikes, one per request"
    );
}
