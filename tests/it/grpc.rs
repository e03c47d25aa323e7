//! Over-the-wire tests: a real server on 127.0.0.1:0, a tonic client.

use crate::common;

use std::time::Duration;

use crate::common::{TestServer, ask, req, to_std};
use tollgate::pb::tollgate::v1::{ShouldAllowBatchRequest, ShouldAllowRequest};
use tonic::Code;

const CONFIG: &str = r#"
scopes:
  - name: demo
    limits:
      - name: per-user
        per: identity
        capacity: 2
        refill_period: 600ms
  - name: slow
    limits:
      - name: global
        per: scope
        capacity: 100
        refill_period: 1h
  - name: mcp
    limits:
      - name: per-user
        per: identity
        capacity: 10
        refill_period: 1h
      - name: per-user-search
        per: identity_operation
        operations: ["tools/call:search", "tools/call:fetch_*"]
        capacity: 3
        refill_period: 1h
      - name: premium-burst
        per: identity
        when: { tier: premium }
        capacity: 1
        refill_period: 1h
"#;

#[tokio::test]
async fn allow_then_deny_then_allow_again_after_retry_after() {
    let server = TestServer::start(CONFIG).await;
    let mut c = server.client().await;
    for left in [1, 0] {
        let r = ask(&mut c, req("demo", "alice", "op")).await;
        assert!(r.allowed);
        assert_eq!(
            (r.rule.as_str(), r.limit, r.remaining),
            ("per-user", 2, left)
        );
    }
    let denied = ask(&mut c, req("demo", "alice", "op")).await;
    assert!(!denied.allowed);
    let wait = to_std(&denied.retry_after).expect("denial carries retry_after");
    // One token returns every 300ms; some of it has already passed.
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(300),
        "{wait:?}"
    );
    assert_eq!(denied.rule, "per-user");
    assert_eq!(denied.remaining, 0);

    tokio::time::sleep(wait).await;
    let again = ask(&mut c, req("demo", "alice", "op")).await;
    assert!(
        again.allowed,
        "allowed once retry_after has passed: {again:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn five_hundred_concurrent_calls_against_capacity_100_admit_exactly_100() {
    let server = TestServer::start(CONFIG).await;
    let channel = server.channel().await;
    let calls = (0..500).map(|i| {
        let mut c = tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient::new(
            channel.clone(),
        );
        tokio::spawn(async move {
            ask(&mut c, req("slow", &format!("caller-{i}"), "op"))
                .await
                .allowed
        })
    });
    let mut allowed = 0;
    for call in calls {
        allowed += usize::from(call.await.expect("task"));
    }
    assert_eq!(allowed, 100);
    server.shutdown().await;
}

fn bucket<'a>(
    r: &'a tollgate::pb::tollgate::v1::ShouldAllowResponse,
    rule: &str,
) -> &'a tollgate::pb::tollgate::v1::BucketStatus {
    r.buckets
        .iter()
        .find(|b| b.rule == rule)
        .unwrap_or_else(|| panic!("no bucket {rule} in {r:?}"))
}

#[tokio::test]
async fn every_matching_limit_applies_and_a_denial_takes_from_none() {
    let server = TestServer::start(CONFIG).await;
    let mut c = server.client().await;
    // A search matches per-user (10/h) and per-user-search (3/h).
    for i in 1..=3u64 {
        let r = ask(&mut c, req("mcp", "bob", "tools/call:search")).await;
        assert!(r.allowed);
        assert_eq!(r.buckets.len(), 2);
        assert_eq!(bucket(&r, "per-user").remaining, 10 - i);
        assert_eq!(bucket(&r, "per-user-search").remaining, 3 - i);
    }
    let r = ask(&mut c, req("mcp", "bob", "tools/call:search")).await;
    assert!(!r.allowed);
    assert_eq!(r.rule, "per-user-search", "the tightest bucket denies");
    assert!(bucket(&r, "per-user-search").exhausted);
    assert!(!bucket(&r, "per-user").exhausted);
    // 3 tokens per hour: the next one is 20 minutes after the first.
    let wait = to_std(&r.retry_after).expect("retry_after");
    assert!(
        wait > Duration::from_secs(1190) && wait <= Duration::from_secs(1200),
        "{wait:?}"
    );
    // The denial took nothing from per-user: still 7 left.
    assert_eq!(bucket(&r, "per-user").remaining, 7);

    // fetch_* is its own identity_operation bucket; list matches only per-user.
    let r = ask(&mut c, req("mcp", "bob", "tools/call:fetch_url")).await;
    assert!(r.allowed);
    assert_eq!(bucket(&r, "per-user").remaining, 6);
    let r = ask(&mut c, req("mcp", "bob", "tools/list")).await;
    assert!(r.allowed);
    assert_eq!(r.buckets.len(), 1);
    assert_eq!((r.rule.as_str(), r.remaining), ("per-user", 5));
    server.shutdown().await;
}

#[tokio::test]
async fn tiered_limits_apply_only_to_matching_attributes() {
    let server = TestServer::start(CONFIG).await;
    let mut c = server.client().await;
    let premium = || ShouldAllowRequest {
        attributes: [("tier".to_owned(), "premium".to_owned())].into(),
        ..req("mcp", "carol", "tools/list")
    };
    let r = ask(&mut c, premium()).await;
    assert!(r.allowed);
    assert_eq!(r.buckets.len(), 2);
    let r = ask(&mut c, premium()).await;
    assert!(!r.allowed);
    assert_eq!(r.rule, "premium-burst");
    // Without the attribute, only per-user applies: 9 left after one take.
    let r = ask(&mut c, req("mcp", "carol", "tools/list")).await;
    assert!(r.allowed);
    assert_eq!(r.buckets.len(), 1);
    assert_eq!(r.remaining, 8);
    server.shutdown().await;
}

#[tokio::test]
async fn dry_run_decides_but_takes_nothing() {
    let server = TestServer::start(CONFIG).await;
    let mut c = server.client().await;
    let dry = || ShouldAllowRequest {
        dry_run: true,
        ..req("demo", "dave", "op")
    };
    for _ in 0..5 {
        let r = ask(&mut c, dry()).await;
        assert!(r.allowed);
        assert_eq!(r.remaining, 2, "a dry run leaves the bucket full");
    }
    ask(&mut c, req("demo", "dave", "op")).await;
    ask(&mut c, req("demo", "dave", "op")).await;
    let r = ask(&mut c, dry()).await;
    assert!(!r.allowed, "a dry run reports the real answer");
    assert!(r.retry_after.is_some());
    server.shutdown().await;
}

#[tokio::test]
async fn cost_over_capacity_is_denied_with_a_reason_and_no_retry_after() {
    let server = TestServer::start(CONFIG).await;
    let mut c = server.client().await;
    let r = ask(
        &mut c,
        ShouldAllowRequest {
            cost: 3,
            ..req("demo", "erin", "op")
        },
    )
    .await;
    assert!(!r.allowed);
    assert!(r.retry_after.is_none());
    assert!(r.reason.contains("exceeds the capacity 2"), "{}", r.reason);
    // And it took nothing.
    let r = ask(
        &mut c,
        ShouldAllowRequest {
            cost: 2,
            ..req("demo", "erin", "op")
        },
    )
    .await;
    assert!(r.allowed);
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_scopes_are_allowed_with_no_rule_by_default_and_denied_when_configured() {
    let server = TestServer::start(CONFIG).await;
    let mut c = server.client().await;
    let r = ask(&mut c, req("nowhere", "x", "op")).await;
    assert!(r.allowed);
    assert_eq!(r.rule, "");
    assert!(r.buckets.is_empty());
    server.shutdown().await;

    let server = TestServer::start(&format!("unknown_scope: deny\n{CONFIG}")).await;
    let mut c = server.client().await;
    let r = ask(&mut c, req("nowhere", "x", "op")).await;
    assert!(!r.allowed);
    assert!(r.retry_after.is_none());
    assert!(r.reason.contains("not configured"), "{}", r.reason);
    server.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field_and_takes_nothing() {
    let server = TestServer::start(CONFIG).await;
    let mut c = server.client().await;
    let many: std::collections::HashMap<String, String> =
        (0..17).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let cases: Vec<(ShouldAllowRequest, &str)> = vec![
        (req("", "frank", "op"), "scope: must not be empty"),
        (req(&"s".repeat(129), "frank", "op"), "scope: is 129 bytes"),
        (
            req("demo", &"i".repeat(257), "op"),
            "identity: is 257 bytes",
        ),
        (
            req("demo", "frank\u{0}", "op"),
            "identity: must not contain control characters",
        ),
        (
            req("demo", "frank", "a\u{1b}[31m"),
            "operation: must not contain control characters",
        ),
        (
            req("demo", "frank", &"o".repeat(300)),
            "operation: is 300 bytes",
        ),
        (
            ShouldAllowRequest {
                attributes: many,
                ..req("demo", "frank", "op")
            },
            "attributes: has 17 entries",
        ),
        (
            ShouldAllowRequest {
                attributes: [("tier".to_owned(), "x\ny".to_owned())].into(),
                ..req("demo", "frank", "op")
            },
            "attributes[\"tier\"]: must not contain control characters",
        ),
        (
            ShouldAllowRequest {
                attributes: [(String::new(), "v".to_owned())].into(),
                ..req("demo", "frank", "op")
            },
            "attributes[\"\"]: name must not be empty",
        ),
    ];
    for (bad, expected) in cases {
        let status = c.should_allow(bad).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with(expected),
            "{:?} vs {expected:?}",
            status.message()
        );
    }
    // frank's bucket is untouched.
    let r = ask(&mut c, req("demo", "frank", "op")).await;
    assert_eq!(r.remaining, 1);

    let batch = ShouldAllowBatchRequest {
        requests: vec![req("demo", "frank", "op"), req("demo", "fr\tank", "op")],
        atomic: false,
    };
    let status = c.should_allow_batch(batch).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("requests[1].identity:"),
        "{}",
        status.message()
    );
    let r = ask(&mut c, req("demo", "frank", "op")).await;
    assert_eq!(
        r.remaining, 0,
        "the refused batch took nothing, even for its valid entry"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn an_atomic_batch_is_allowed_whole_or_takes_nothing() {
    let server = TestServer::start(CONFIG).await;
    let mut c = server.client().await;
    let search = || req("mcp", "ivy", "tools/call:search");
    let atomic = |requests| ShouldAllowBatchRequest {
        requests,
        atomic: true,
    };
    // Two searches of three fit: both pass, charged together.
    let r = c
        .should_allow_batch(atomic(vec![search(), search()]))
        .await
        .expect("batch")
        .into_inner();
    assert!(r.responses.iter().all(|r| r.allowed), "{r:?}");
    let left = |r: &tollgate::pb::tollgate::v1::ShouldAllowResponse| {
        r.buckets
            .iter()
            .find(|b| b.rule == "per-user-search")
            .map(|b| b.remaining)
    };
    assert_eq!(left(&r.responses[1]), Some(1));
    // Two more do not fit the one left: both are denied, and neither takes
    // anything, not even from the per-user bucket that had room.
    let r = c
        .should_allow_batch(atomic(vec![search(), search()]))
        .await
        .expect("batch")
        .into_inner();
    assert!(r.responses.iter().all(|r| !r.allowed), "{r:?}");
    assert!(r.responses.iter().any(|r| r.retry_after.is_some()), "{r:?}");
    let one = ask(&mut c, search()).await;
    assert!(one.allowed);
    assert_eq!(left(&one), Some(0), "the denied batch took no search token");
    let per_user = one.buckets.iter().find(|b| b.rule == "per-user");
    assert_eq!(per_user.map(|b| b.remaining), Some(7), "10 - 2 - 1");
    assert_eq!(
        per_user.and_then(|b| to_std(&b.refill_period)),
        Some(Duration::from_secs(3600))
    );
    server.shutdown().await;
}

#[tokio::test]
async fn batch_decides_each_request_independently_in_order() {
    let server = TestServer::start(CONFIG).await;
    let mut c = server.client().await;
    let batch = ShouldAllowBatchRequest {
        requests: vec![
            req("demo", "gina", "op"),
            req("demo", "gina", "op"),
            req("demo", "gina", "op"),
            req("demo", "hank", "op"),
            req("elsewhere", "gina", "op"),
        ],
        atomic: false,
    };
    let r = c
        .should_allow_batch(batch)
        .await
        .expect("batch")
        .into_inner();
    let allowed: Vec<bool> = r.responses.iter().map(|r| r.allowed).collect();
    assert_eq!(allowed, [true, true, false, true, true]);
    assert!(r.responses[2].retry_after.is_some());
    server.shutdown().await;
}

#[tokio::test]
async fn health_is_serving_when_ready_and_not_serving_while_draining() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let server = TestServer::start(&format!("drain_delay: 2s\n{CONFIG}")).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "tollgate.v1.RateLimiter"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    server
        .control
        .send(tollgate::shutdown::Control::Shutdown)
        .await
        .expect("send");
    // During the drain delay the server still answers, but says NOT_SERVING.
    let mut status = ServingStatus::Serving;
    for _ in 0..100 {
        status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("still answering while draining")
            .into_inner()
            .status();
        if status == ServingStatus::NotServing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, ServingStatus::NotServing);
    let mut c = server.client().await;
    assert!(
        ask(&mut c, req("demo", "ivan", "op")).await.allowed,
        "calls still served while draining"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn reflection_lists_the_rate_limiter_and_envoy_rls_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = TestServer::start(CONFIG).await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = stream
        .message()
        .await
        .expect("message")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"tollgate.v1.RateLimiter".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"envoy.service.ratelimit.v3.RateLimitService".to_owned()),
        "{names:?}"
    );
    // And a reflection client can fetch the RLS's descriptors by symbol.
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "envoy.service.ratelimit.v3.RateLimitService".to_owned(),
        )),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = stream.message().await.expect("message").expect("answer");
    let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn reload_swaps_rules_whole() {
    let server = TestServer::start(CONFIG).await;
    let mut c = server.client().await;
    assert_eq!(ask(&mut c, req("demo", "judy", "op")).await.limit, 2);
    let bigger = CONFIG.replace("capacity: 2\n", "capacity: 5\n");
    server.reload(&bigger).await;
    assert_eq!(common::wait_for_limit(&mut c, "demo", "judy", 5).await, 5);
    server.shutdown().await;
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test]
async fn metrics_count_decisions_by_scope_rule_and_result_but_never_identity() {
    let addr = format!("127.0.0.1:{}", common::free_port());
    let server = TestServer::start(&format!("metrics: {{listen: \"{addr}\"}}\n{CONFIG}")).await;
    let mut c = server.client().await;
    for _ in 0..3 {
        ask(&mut c, req("demo", "secret-identity-7", "op")).await;
    }
    ask(&mut c, req("not-configured-scope", "x", "op")).await;
    let body = http_get(&addr, "/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains(r#"tollgate_decisions_total{api="tollgate",scope="demo",rule="per-user",result="allowed"} 2"#),
        "{body}"
    );
    assert!(
        body.contains(r#"tollgate_decisions_total{api="tollgate",scope="demo",rule="per-user",result="denied"} 1"#),
        "{body}"
    );
    assert!(body.contains(r#"scope="_unconfigured""#), "{body}");
    assert!(
        !body.contains("secret-identity"),
        "identities never become labels"
    );
    assert!(
        !body.contains("not-configured-scope"),
        "unknown scopes never become labels"
    );
    assert!(
        body.contains("tollgate_decision_duration_seconds_count 4"),
        "{body}"
    );
    assert!(body.contains("tollgate_store_available 1"), "{body}");
    server.shutdown().await;
}
