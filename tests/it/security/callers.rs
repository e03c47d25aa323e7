//! Caller grants: by certificate SAN and by bearer token; scopes, dry_run,
//! batch; refusals that take nothing and are counted.

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor::Entry,
};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient;
use tollgate::pb::tollgate::v1::{ShouldAllowBatchRequest, ShouldAllowRequest};
use tonic::Code;
use tonic::transport::Channel;

use super::{free_addr, http_get, metric, tls_channel};
use crate::common::certs::{Ca, TlsFiles};
use crate::common::{TestServer, req, sha256_hex, with_token};

const TOKEN: &str = "batch-jobs-token-7f3a";
const OPS_TOKEN: &str = "ops-token-19c2";

const SCOPES: &str = "
scopes:
  - name: a-1
    limits: [{name: per-user, per: identity, capacity: 3, refill_period: 1h}]
  - name: b
    limits: [{name: per-user, per: identity, capacity: 3, refill_period: 1h}]
";

#[tokio::test]
async fn a_caller_outside_its_scopes_is_denied_and_that_bucket_is_untouched() {
    let ca = Ca::new("callers");
    let files = TlsFiles::new(&ca.server(&[]), Some(&ca));
    let metrics = free_addr();
    let yaml = format!(
        "tls: {}\nmetrics: {{listen: \"{metrics}\"}}\ncallers:
  - {{name: edge, san: spiffe://test/edge, scopes: [\"a-*\"]}}
  - {{name: ops, token_sha256: {}, scopes: [\"*\"]}}
{SCOPES}",
        files.yaml("10s"),
        sha256_hex(OPS_TOKEN)
    );
    let server = TestServer::start(&yaml).await;
    let edge_cert = ca.client("spiffe://test/edge");
    let channel = tls_channel(server.addr, &ca.pem, Some(&edge_cert), "localhost")
        .await
        .unwrap();
    let mut edge = RateLimiterClient::new(channel.clone());

    assert!(
        edge.should_allow(req("a-1", "alice", "op"))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    for _ in 0..5 {
        let e = edge
            .should_allow(req("b", "alice", "op"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert_eq!(
            e.message(),
            "scope: caller \"edge\" may not decide on scope \"b\""
        );
    }
    // Envoy's RLS: the domain is the scope.
    let mut rls = RateLimitServiceClient::new(channel);
    let e = rls
        .should_rate_limit(RateLimitRequest {
            domain: "b".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "user".into(),
                    value: "alice".into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("\"edge\""), "{e:?}");

    // `b`'s bucket for alice still holds all 3: the refusals took nothing.
    let mut ops = RateLimiterClient::new(
        tls_channel(
            server.addr,
            &ca.pem,
            Some(&ca.client("ops.test")),
            "localhost",
        )
        .await
        .unwrap(),
    );
    let seen = ops
        .should_allow(with_token(OPS_TOKEN, req("b", "alice", "op")))
        .await
        .unwrap()
        .into_inner();
    assert!(seen.allowed);
    assert_eq!(seen.remaining, 2, "{seen:?}");

    let tcp = tokio::net::TcpStream::connect(&metrics).await.unwrap();
    let body = http_get(tcp, "/metrics").await.unwrap();
    let refused = metric(
        &body,
        "tollgate_access_denied_total{api=\"tollgate\",caller=\"edge\"}",
    );
    assert_eq!(refused, 5.0, "{body}");
    let envoy = metric(
        &body,
        "tollgate_access_denied_total{api=\"envoy\",caller=\"edge\"}",
    );
    assert_eq!(envoy, 1.0, "{body}");
}

#[tokio::test]
async fn bearer_tokens_are_matched_by_sha256_and_grants_are_enforced() {
    let yaml = format!(
        "callers:
  - {{name: batch-jobs, token_sha256: {}, scopes: [b], dry_run: false}}
{SCOPES}",
        sha256_hex(TOKEN)
    );
    let server = TestServer::start(&yaml).await;
    let mut c = server.client().await;

    let ok = c
        .should_allow(with_token(TOKEN, req("b", "alice", "op")))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.allowed);

    let wrong = c
        .should_allow(with_token("not-the-token", req("b", "alice", "op")))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    let missing = c.should_allow(req("b", "alice", "op")).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");

    let dry = ShouldAllowRequest {
        dry_run: true,
        ..req("b", "alice", "op")
    };
    let e = c.should_allow(with_token(TOKEN, dry)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("\"batch-jobs\""), "{e:?}");
    assert!(e.message().contains("dry_run"), "{e:?}");

    let batch = ShouldAllowBatchRequest {
        requests: vec![req("b", "bob", "op")],
        atomic: false,
    };
    let e = c
        .should_allow_batch(with_token(TOKEN, batch.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("ShouldAllowBatch"), "{e:?}");

    // A reload grants the batch RPC, but not scope a-1 inside it.
    let granted = format!(
        "callers:
  - {{name: batch-jobs, token_sha256: {}, scopes: [b], batch: true}}
{SCOPES}",
        sha256_hex(TOKEN)
    );
    server.reload(&granted).await;
    let mut answer = Err(tonic::Status::unknown("not yet"));
    for _ in 0..100 {
        answer = c.should_allow_batch(with_token(TOKEN, batch.clone())).await;
        if answer.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(answer.unwrap().into_inner().responses.len(), 1);
    let mixed = ShouldAllowBatchRequest {
        requests: vec![req("b", "carol", "op"), req("a-1", "carol", "op")],
        atomic: false,
    };
    let e = c
        .should_allow_batch(with_token(TOKEN, mixed))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().starts_with("requests[1].scope:"), "{e:?}");
    // The whole batch was refused: carol's first entry took nothing.
    let carol = c
        .should_allow(with_token(TOKEN, req("b", "carol", "op")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(carol.remaining, 2);
}

#[tokio::test]
async fn without_callers_everyone_is_served_as_before() {
    let server = TestServer::start(SCOPES).await;
    let mut c: RateLimiterClient<Channel> = server.client().await;
    let batch = ShouldAllowBatchRequest {
        requests: vec![ShouldAllowRequest {
            dry_run: true,
            ..req("b", "x", "op")
        }],
        atomic: false,
    };
    assert!(c.should_allow_batch(batch).await.is_ok());
}

#[test]
fn the_admin_check_needs_an_admin_grant() {
    use std::sync::Arc;
    use tollgate::api::auth::{Authorizer, PeerInfo};
    use tollgate::observe::Observer;

    let yaml = format!(
        "tls: {{cert: /dev/null, key: /dev/null, client_ca: /dev/null}}
callers:
  - {{name: ops, san: spiffe://test/ops, scopes: [\"*\"], admin: true}}
  - {{name: jobs, token_sha256: {}, scopes: [\"*\"]}}
",
        sha256_hex(TOKEN)
    );
    let config = tollgate::config::Config::from_yaml(&yaml).unwrap();
    let auth = Authorizer::new(config.callers.as_deref(), Arc::new(Observer::default()));
    let from_ops = {
        let mut r = tonic::Request::new(());
        r.extensions_mut().insert(PeerInfo {
            remote_addr: None,
            sans: Arc::from(["ops.test".to_owned(), "spiffe://test/ops".to_owned()]),
        });
        r
    };
    let caller = auth.authorize_admin(&from_ops, "Admin/ListScopes").unwrap();
    assert_eq!(caller.map(|c| c.name.to_string()).as_deref(), Some("ops"));

    let e = auth
        .authorize_admin(&with_token(TOKEN, ()), "Admin/ListScopes")
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        e.message(),
        "Admin/ListScopes: caller \"jobs\" may not call the admin RPCs"
    );
    let e = auth
        .authorize_admin(&tonic::Request::new(()), "Admin/ListScopes")
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_client_speaks_mtls_with_a_token() {
    let ca = Ca::new("cli");
    let files = TlsFiles::new(&ca.server(&[]), Some(&ca));
    let yaml = format!(
        "tls: {}\ncallers:\n  - {{name: cli, token_sha256: {}, scopes: [b]}}\n{SCOPES}",
        files.yaml("10s"),
        sha256_hex(TOKEN)
    );
    let server = TestServer::start(&yaml).await;
    let client = ca.client("cli.test");
    let dir = files.dir.path();
    std::fs::write(dir.join("client.pem"), &client.cert).unwrap();
    std::fs::write(dir.join("client.key"), &client.key).unwrap();
    let run = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.args(["allow", "--scope", "b", "--identity", "alice", "--addr"])
            .arg(format!("https://{}", server.addr))
            .arg("--ca-cert")
            .arg(files.ca())
            .arg("--cert")
            .arg(dir.join("client.pem"))
            .arg("--key")
            .arg(dir.join("client.key"))
            .args(["--tls-name", "localhost"]);
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        cmd.output().expect("tollgate runs")
    };
    // Blocking here is fine: the server runs on the other worker thread.
    let (ok, refused) = (run(Some(TOKEN)), run(None));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        stdout.starts_with("ALLOWED"),
        "{stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("match no configured caller"), "{stderr}");
}

/// A refund gives tokens back with no earlier charge to tie it to, so with
/// callers configured it needs its own grant; a refusal gives nothing back.
#[tokio::test]
async fn an_envoy_refund_needs_a_refund_grant() {
    let yaml = |refund: bool| {
        format!(
            "callers:
  - {{name: edge, token_sha256: {}, scopes: [b], refund: {refund}}}
scopes:
  - name: b
    descriptor_keys: {{ identity: user }}
    limits:
      - {{ name: per-user, per: identity, capacity: 3, refill_period: 1h }}
",
            sha256_hex(TOKEN)
        )
    };
    let descriptor = |hits: u64, negative: bool| RateLimitDescriptor {
        entries: vec![Entry {
            key: "user".into(),
            value: "dana".into(),
        }],
        hits_addend: Some(envoy_types::pb::google::protobuf::UInt64Value { value: hits }),
        is_negative_hits: negative,
        ..Default::default()
    };
    let request = |hits, negative| RateLimitRequest {
        domain: "b".into(),
        descriptors: vec![descriptor(hits, negative)],
        hits_addend: 0,
    };
    let server = TestServer::start(&yaml(false)).await;
    let mut rls = RateLimitServiceClient::new(server.channel().await);
    let taken = rls
        .should_rate_limit(with_token(TOKEN, request(3, false)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(taken.statuses[0].limit_remaining, 0);
    let e = rls
        .should_rate_limit(with_token(TOKEN, request(3, true)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("refunds"), "{e:?}");
    // Nothing came back.
    let check = rls
        .should_rate_limit(with_token(TOKEN, request(1, false)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(check.overall_code, 2, "OVER_LIMIT: {check:?}");
    // Granted, the same refund gives the tokens back.
    server.reload(&yaml(true)).await;
    let mut back = Err(tonic::Status::unknown("not yet"));
    for _ in 0..100 {
        back = rls
            .should_rate_limit(with_token(TOKEN, request(3, true)))
            .await;
        if back.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(back.unwrap().into_inner().statuses[0].limit_remaining, 3);
}
