//! Grants a caller got around (issue 19, item 8): an Envoy check without
//! `dry_run`, many descriptors without `batch`, a settle of another
//! caller's reservation, an admin reading scopes outside its grant, and a
//! settle that tells a valid token from a forged one before the grant.

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor::Entry,
};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::google::protobuf::UInt64Value;
use tollgate::pb::tollgate::v1::admin_client::AdminClient;
use tollgate::pb::tollgate::v1::{
    ExplainRequest, SettleRequest, ShouldAllowRequest, TopIdentitiesRequest, UtilizationRequest,
};
use tonic::Code;

use crate::common::redis::Standalone;
use crate::common::{TestServer, req, sha256_hex, with_token};

const EDGE: &str = "edge-token-a1";
const GATEWAY: &str = "gateway-token-b2";
const OTHER: &str = "other-token-c3";
const AUDITOR: &str = "auditor-token-d4";

/// The store part of the config: the embedded store, or a Redis of its own
/// with this test's key prefix.
enum Backend {
    Memory,
    Redis(Standalone),
}

impl Backend {
    fn yaml(&self, prefix: &str) -> String {
        // Key prefixes are short; the test's name, hashed, keeps them apart.
        let prefix = &sha256_hex(prefix)[..12];
        match self {
            Self::Memory => String::new(),
            Self::Redis(redis) => format!(
                "store:\n  kind: redis\n  redis:\n    urls: [\"{}\"]\n    key_prefix: \"test:grants:{prefix}:\"\n",
                redis.url()
            ),
        }
    }
}

async fn start(backend: &Backend, prefix: &str) -> TestServer {
    let yaml = format!(
        "{}failure_mode: closed
callers:
  - {{name: edge, token_sha256: {}, scopes: [api]}}
  - {{name: gateway, token_sha256: {}, scopes: [api], dry_run: true, batch: true}}
  - {{name: other, token_sha256: {}, scopes: [api, llm]}}
  - {{name: auditor, token_sha256: {}, scopes: [api], admin: true}}
scopes:
  - name: api
    descriptor_keys: {{identity: user}}
    limits: [{{name: per-user, per: identity, capacity: 3, refill_period: 1h}}]
  - name: llm
    limits: [{{name: tokens, per: identity, capacity: 100, refill_period: 1h}}]
",
        backend.yaml(prefix),
        sha256_hex(EDGE),
        sha256_hex(GATEWAY),
        sha256_hex(OTHER),
        sha256_hex(AUDITOR),
    );
    TestServer::start(&yaml).await
}

fn descriptor(user: &str, hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: vec![Entry {
            key: "user".into(),
            value: user.into(),
        }],
        hits_addend: hits.map(|value| UInt64Value { value }),
        ..Default::default()
    }
}

fn rls(descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: "api".into(),
        descriptors,
        ..Default::default()
    }
}

/// What `alice` has left in `api`, asked as a dry run by the gateway.
async fn left(server: &TestServer, user: &str) -> u64 {
    let mut client = server.client().await;
    let r = ShouldAllowRequest {
        dry_run: true,
        ..req("api", user, "")
    };
    client
        .should_allow(with_token(GATEWAY, r))
        .await
        .expect("gateway may dry-run")
        .into_inner()
        .remaining
}

/// Runs `$body(backend, prefix)` on the embedded store and on Redis.
macro_rules! on_each_store {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test]
            async fn on_memory() {
                super::$body(super::Backend::Memory, concat!(stringify!($name), "-m")).await;
            }

            #[tokio::test]
            async fn on_redis() {
                let redis = crate::common::redis::Standalone::start();
                super::$body(
                    super::Backend::Redis(redis),
                    concat!(stringify!($name), "-r"),
                )
                .await;
            }
        }
    };
}

on_each_store!(an_envoy_check_needs_the_dry_run_grant, envoy_check);
async fn envoy_check(backend: Backend, prefix: &str) {
    let server = start(&backend, prefix).await;
    let mut envoy = RateLimitServiceClient::new(server.channel().await);
    // `hits_addend: 0` reads the bucket without taking: a dry run.
    let e = envoy
        .should_rate_limit(with_token(EDGE, rls(vec![descriptor("alice", Some(0))])))
        .await
        .expect_err("a check without the dry_run grant is refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("dry_run"), "{e:?}");
    let ok = envoy
        .should_rate_limit(with_token(GATEWAY, rls(vec![descriptor("alice", Some(0))])))
        .await
        .expect("the gateway holds dry_run");
    assert_eq!(ok.into_inner().statuses[0].limit_remaining, 3);
    assert_eq!(left(&server, "alice").await, 3, "a check takes nothing");
}

on_each_store!(
    an_envoy_request_of_many_descriptors_needs_the_batch_grant,
    envoy_batch
);
async fn envoy_batch(backend: Backend, prefix: &str) {
    let server = start(&backend, prefix).await;
    let mut envoy = RateLimitServiceClient::new(server.channel().await);
    let many: Vec<_> = (0..64)
        .map(|i| descriptor(&format!("u{i}"), None))
        .collect();
    let e = envoy
        .should_rate_limit(with_token(EDGE, rls(many.clone())))
        .await
        .expect_err("a batch without the batch grant is refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("batch"), "{e:?}");
    assert_eq!(
        left(&server, "u0").await,
        3,
        "a refused batch takes nothing"
    );
    let e = envoy
        .should_rate_limit(with_token(EDGE, rls(many[..9].to_vec())))
        .await
        .expect_err("nine descriptors are a batch");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // A route's own few descriptors (one per rate_limits action) are not.
    envoy
        .should_rate_limit(with_token(EDGE, rls(many[..8].to_vec())))
        .await
        .expect("eight descriptors need no batch grant");
    envoy
        .should_rate_limit(with_token(GATEWAY, rls(many)))
        .await
        .expect("the gateway holds batch");
    assert_eq!(left(&server, "u0").await, 1);
    assert_eq!(left(&server, "u63").await, 2);
}

/// A reservation of cost 2 on `api` for `user`, made by `token`'s caller.
async fn reserve(server: &TestServer, token: &str, scope: &str, user: &str) -> String {
    let mut client = server.client().await;
    let r = ShouldAllowRequest {
        cost: 2,
        settle_within: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        ..req(scope, user, "")
    };
    let answer = client
        .should_allow(with_token(token, r))
        .await
        .expect("reserve")
        .into_inner();
    assert!(answer.allowed, "{answer:?}");
    assert!(!answer.reservation.is_empty(), "{answer:?}");
    answer.reservation
}

fn settle(token: &str, reservation: &str, actual: u64) -> tonic::Request<SettleRequest> {
    with_token(
        token,
        SettleRequest {
            reservation: reservation.to_owned(),
            actual_cost: actual,
        },
    )
}

on_each_store!(
    a_reservation_settles_only_for_the_caller_that_made_it,
    settle_by_owner
);
async fn settle_by_owner(backend: Backend, prefix: &str) {
    let server = start(&backend, prefix).await;
    let mut client = server.client().await;
    let token = reserve(&server, EDGE, "api", "alice").await;
    assert_eq!(left(&server, "alice").await, 1);
    // `other` may decide on `api` too, but did not make this reservation:
    // settling it at 0 would hand edge's tokens back.
    let e = client
        .settle(settle(OTHER, &token, 0))
        .await
        .expect_err("another caller's reservation is refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("only the caller that made it"),
        "{e:?}"
    );
    assert_eq!(
        left(&server, "alice").await,
        1,
        "a refused settle takes nothing"
    );
    client
        .settle(settle(EDGE, &token, 0))
        .await
        .expect("the caller that reserved settles");
    assert_eq!(left(&server, "alice").await, 3);
}

on_each_store!(
    a_settle_outside_the_grant_cannot_tell_a_valid_token_from_a_forged_one,
    settle_oracle
);
async fn settle_oracle(backend: Backend, prefix: &str) {
    let server = start(&backend, prefix).await;
    let mut client = server.client().await;
    let valid = reserve(&server, OTHER, "llm", "bob").await;
    // Alter one character of the signature (the last 43 characters).
    let mut chars: Vec<char> = valid.chars().collect();
    let i = chars.len() - 10;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    let forged: String = chars.into_iter().collect();
    let mut seen = Vec::new();
    for token in [&valid, &forged] {
        let e = client
            .settle(settle(EDGE, token, 0))
            .await
            .expect_err("edge may not settle on llm");
        seen.push((e.code(), e.message().to_owned()));
    }
    assert_eq!(seen[0].0, Code::PermissionDenied, "{seen:?}");
    assert_eq!(seen[0], seen[1], "valid and forged tokens must look alike");
    // A caller granted the scope still learns a forgery for what it is.
    let e = client
        .settle(settle(OTHER, &forged, 0))
        .await
        .expect_err("forged");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

on_each_store!(an_admin_grant_reads_only_its_scopes, admin_scopes);
async fn admin_scopes(backend: Backend, prefix: &str) {
    let server = start(&backend, prefix).await;
    let mut client = server.client().await;
    let mut admin = AdminClient::new(server.channel().await);
    for (token, scope) in [(OTHER, "llm"), (EDGE, "api")] {
        client
            .should_allow(with_token(token, req(scope, "secret-tenant", "")))
            .await
            .expect("decide");
    }
    let top = admin
        .top_identities(with_token(AUDITOR, TopIdentitiesRequest::default()))
        .await
        .expect("top of every scope granted")
        .into_inner();
    assert!(!top.rules.is_empty(), "{top:?}");
    assert!(top.rules.iter().all(|r| r.scope == "api"), "{top:?}");
    let e = admin
        .top_identities(with_token(
            AUDITOR,
            TopIdentitiesRequest {
                scope: "llm".into(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("llm is outside the auditor's scopes");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    let usage = admin
        .utilization(with_token(AUDITOR, UtilizationRequest::default()))
        .await
        .expect("utilization of every scope granted")
        .into_inner();
    assert!(!usage.rules.is_empty(), "{usage:?}");
    assert!(usage.rules.iter().all(|r| r.scope == "api"), "{usage:?}");
    let e = admin
        .utilization(with_token(
            AUDITOR,
            UtilizationRequest {
                scope: "llm".into(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("llm is outside the auditor's scopes");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    let e = admin
        .explain(with_token(
            AUDITOR,
            ExplainRequest {
                request: Some(req("llm", "secret-tenant", "")),
            },
        ))
        .await
        .expect_err("llm is outside the auditor's scopes");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    admin
        .explain(with_token(
            AUDITOR,
            ExplainRequest {
                request: Some(req("api", "secret-tenant", "")),
            },
        ))
        .await
        .expect("explain on a granted scope");
}

on_each_store!(
    a_rotated_reservation_secret_keeps_open_reservations_settleable,
    rotation
);
async fn rotation(backend: Backend, prefix: &str) {
    let (a, b) = ("a".repeat(32), "b".repeat(32));
    let dir = tempfile::tempdir().expect("tempdir");
    let (file_a, file_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::write(&file_a, format!("{a}\n")).expect("write");
    std::fs::write(&file_b, format!("{b}\n")).expect("write");
    let yaml = |reservations: String, capacity: u64| {
        format!(
            "{}failure_mode: closed\nreservations: {reservations}\nscopes:
  - name: llm
    limits: [{{name: tokens, per: identity, capacity: {capacity}, refill_period: 1h}}]\n",
            backend.yaml(prefix)
        )
    };
    // The single form, as before.
    let server = TestServer::start(&yaml(format!("{{secret: \"{a}\"}}"), 100)).await;
    let mut client = server.client().await;
    let reserve =
        async |client: &mut tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient<
            _,
        >| {
            let r = ShouldAllowRequest {
                cost: 2,
                settle_within: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..req("llm", "carol", "")
            };
            client
                .should_allow(r)
                .await
                .expect("reserve")
                .into_inner()
                .reservation
        };
    let (old_1, old_2) = (reserve(&mut client).await, reserve(&mut client).await);
    let settle =
        async |client: &mut tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient<
            _,
        >,
               token: &str| {
            client
                .settle(SettleRequest {
                    reservation: token.to_owned(),
                    actual_cost: 1,
                })
                .await
        };

    // Rotate: sign with b, still verify a (files, as a list).
    let files = format!("{{secret_file: [{:?}, {:?}]}}", file_b, file_a);
    server.reload(&yaml(files, 101)).await;
    let limit = crate::common::wait_for_limit(&mut client, "llm", "probe", 101).await;
    assert_eq!(limit, 101, "the list form reloads");
    settle(&mut client, &old_1)
        .await
        .expect("a reservation signed before the rotation settles");
    let new = reserve(&mut client).await;

    // Retire a: only b verifies.
    server
        .reload(&yaml(format!("{{secret: [\"{b}\"]}}"), 102))
        .await;
    crate::common::wait_for_limit(&mut client, "llm", "probe", 102).await;
    settle(&mut client, &new)
        .await
        .expect("a reservation signed with the new key settles");
    let e = settle(&mut client, &old_2)
        .await
        .expect_err("a retired key no longer verifies");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("forged"), "{e:?}");
}

on_each_store!(
    an_envoy_request_costs_one_store_call_per_kind_it_carries,
    envoy_store_calls
);
async fn envoy_store_calls(backend: Backend, prefix: &str) {
    let metrics = crate::common::free_port();
    let yaml = format!(
        "{}failure_mode: closed
metrics: {{listen: \"127.0.0.1:{metrics}\"}}
scopes:
  - name: api
    descriptor_keys: {{identity: user}}
    limits: [{{name: per-user, per: identity, capacity: 100, refill_period: 1h}}]
",
        backend.yaml(prefix)
    );
    let server = TestServer::start(&yaml).await;
    let mut envoy = RateLimitServiceClient::new(server.channel().await);
    let calls = async || {
        let text = crate::common::metrics_get(metrics, "/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix("tollgate_store_duration_seconds_count "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let refund = || RateLimitDescriptor {
        is_negative_hits: true,
        ..descriptor("r", Some(1))
    };
    let cases: [(&str, Vec<RateLimitDescriptor>, u64); 5] = [
        ("a charge", vec![descriptor("a", None)], 1),
        (
            "charges",
            vec![descriptor("a", None), descriptor("b", Some(2))],
            1,
        ),
        (
            "a check and a charge",
            vec![descriptor("a", Some(0)), descriptor("b", None)],
            2,
        ),
        ("a refund", vec![refund()], 1),
        (
            "a refund, a check and a charge",
            vec![refund(), descriptor("a", Some(0)), descriptor("b", None)],
            3,
        ),
    ];
    for (what, descriptors, want) in cases {
        let before = calls().await;
        let r = envoy
            .should_rate_limit(rls(descriptors))
            .await
            .expect("decided")
            .into_inner();
        assert_eq!(r.overall_code, 1, "{what}: {r:?}");
        assert_eq!(calls().await - before, want, "store calls for {what}");
    }
}

on_each_store!(
    a_long_envoy_identity_is_listed_by_a_prefix_and_its_hash,
    long_identity_listed
);
async fn long_identity_listed(backend: Backend, prefix: &str) {
    // No descriptor_keys: the whole descriptor is the identity.
    let yaml = format!(
        "{}failure_mode: closed
scopes:
  - name: api
    limits: [{{name: per-caller, per: identity, capacity: 2, refill_period: 1h}}]
",
        backend.yaml(prefix)
    );
    let server = TestServer::start(&yaml).await;
    let mut envoy = RateLimitServiceClient::new(server.channel().await);
    let long = RateLimitDescriptor {
        entries: (0..16)
            .map(|i| Entry {
                key: format!("k{i:02}"),
                value: "v".repeat(256),
            })
            .collect(),
        ..Default::default()
    };
    for _ in 0..3 {
        envoy
            .should_rate_limit(rls(vec![long.clone()]))
            .await
            .expect("decided");
    }
    envoy
        .should_rate_limit(rls(vec![descriptor("alice", None)]))
        .await
        .expect("decided");
    let mut admin = AdminClient::new(server.channel().await);
    let top = admin
        .top_identities(TopIdentitiesRequest::default())
        .await
        .expect("top")
        .into_inner();
    // A descriptor used whole is listed in its canonical form, which opens
    // with a marker byte.
    let listed: Vec<&str> = top
        .rules
        .iter()
        .flat_map(|r| &r.identities)
        .map(|c| c.identity.trim_start_matches('\u{1}'))
        .collect();
    assert!(listed.contains(&"user=alice"), "{listed:?}");
    let shown = listed
        .iter()
        .find(|i| i.starts_with("k00="))
        .expect("the long identity is listed");
    assert!(shown.len() <= 128, "{shown}");
    assert!(shown.contains("…sha256:"), "{shown}");
}
