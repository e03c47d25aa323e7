//! `tollgate_client::Client` and the layer in this process, against the real
//! Tollgate binary: batch order, atomic batches, refill periods, input
//! checks, deadlines, the failure modes and the breaker, the extractors the
//! proxy does not use, and the MCP layer's inner body.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tollgate_client::layer::{Extractor, McpLayer, PeerIdentity, RequestBody, TollgateLayer};
use tollgate_client::{Client, Decision, DecisionRequest, Error, FailureCause, FailureMode};
use tower::{Layer, ServiceExt};

use crate::support::Tollgate;

const LIMITS: &str = "
scopes:
  - name: demo
    limits:
      - name: per-user
        per: identity
        capacity: 3
        refill_period: 10s
      - name: premium
        per: identity
        when: { tier: premium }
        capacity: 1
        refill_period: 10s
";

fn client(tollgate: &Tollgate) -> Client {
    Client::builder(tollgate.endpoint())
        .deadline(Duration::from_secs(2))
        .build()
        .unwrap()
}

fn ask(identity: &str) -> DecisionRequest {
    DecisionRequest::new("demo").with_identity(identity)
}

#[tokio::test]
async fn a_batch_is_decided_entry_by_entry_in_order() {
    let tollgate = Tollgate::start(LIMITS);
    let client = client(&tollgate);
    let batch: Vec<_> = ["a", "a", "b", "a", "a"].into_iter().map(ask).collect();
    let decisions = client.should_allow_batch(&batch).await.unwrap();
    let allowed: Vec<bool> = decisions.iter().map(|d| d.allowed).collect();
    assert_eq!(allowed, [true, true, true, true, false]);
    let denied = &decisions[4];
    assert_eq!(denied.rule, "per-user");
    assert!(
        denied
            .retry_after
            .is_some_and(|r| r <= Duration::from_secs(4))
    );
    assert_eq!(denied.violated_policies().collect::<Vec<_>>(), ["per-user"]);
    assert!(denied.local.is_none() && !denied.degraded);
    assert!(client.should_allow_batch(&[]).await.unwrap().is_empty());
}

/// Two operations of one caller, refilling over an hour: no whole token comes
/// back while a test runs, so a token seen missing was taken.
const PER_OPERATION: &str = "
scopes:
  - name: demo
    limits:
      - name: per-op
        per: identity_operation
        capacity: 2
        refill_period: 1h
      - name: per-user
        per: identity
        capacity: 10
        refill_period: 1h
";

fn op(identity: &str, operation: &str) -> DecisionRequest {
    ask(identity).with_operation(operation)
}

/// What each bucket of `d` has left, by rule.
fn remaining(d: &Decision) -> Vec<(&str, u64)> {
    d.buckets
        .iter()
        .map(|b| (b.rule.as_str(), b.remaining))
        .collect()
}

#[tokio::test]
async fn an_atomic_batch_denied_by_one_entry_takes_nothing_from_any() {
    let tollgate = Tollgate::start(PER_OPERATION);
    let client = client(&tollgate);
    for _ in 0..2 {
        assert!(
            client
                .should_allow(&op("alice", "b"))
                .await
                .unwrap()
                .allowed
        );
    }
    // "a" has room; "b" has none, so the batch is denied whole.
    let batch = [op("alice", "a"), op("alice", "b")];
    let decisions = client.should_allow_batch_atomic(&batch).await.unwrap();
    assert!(decisions.iter().all(|d| !d.allowed), "{decisions:?}");
    assert!(decisions[0].denied_by_batch(), "{:?}", decisions[0]);
    assert_eq!(decisions[0].retry_after, None);
    assert!(decisions[1].retry_after.is_some(), "{:?}", decisions[1]);
    assert_eq!(
        decisions[1].violated_policies().collect::<Vec<_>>(),
        ["per-op"]
    );
    // a's tokens are untouched: one call of a leaves per-op 2-1 and per-user
    // 8-1 (the two calls of b took 2 of 10).
    let d = client.should_allow(&batch[0]).await.unwrap();
    assert_eq!(remaining(&d), [("per-op", 1), ("per-user", 7)]);

    // The control: without atomic, the same batch lets a take its token
    // although b is denied.
    for _ in 0..2 {
        assert!(client.should_allow(&op("bob", "b")).await.unwrap().allowed);
    }
    let bobs = [op("bob", "a"), op("bob", "b")];
    let decisions = client.should_allow_batch(&bobs).await.unwrap();
    assert!(decisions[0].allowed && !decisions[1].allowed);
    let d = client.should_allow(&bobs[0]).await.unwrap();
    assert_eq!(remaining(&d), [("per-op", 0), ("per-user", 6)]);
}

#[tokio::test]
async fn an_atomic_batch_sums_the_cost_of_a_bucket_its_entries_share() {
    let tollgate = Tollgate::start(PER_OPERATION);
    let client = client(&tollgate);
    // Each entry fits per-user's 10 alone; the six together need 12.
    let batch: Vec<_> = ["a", "b", "c", "d", "e", "f"]
        .into_iter()
        .map(|o| op("alice", o).with_cost(2))
        .collect();
    let decisions = client.should_allow_batch_atomic(&batch).await.unwrap();
    assert!(decisions.iter().all(|d| !d.allowed), "{decisions:?}");
    let d = client.should_allow(&batch[0]).await.unwrap();
    assert_eq!(remaining(&d), [("per-op", 0), ("per-user", 8)]);
}

#[tokio::test]
async fn buckets_report_their_refill_period() {
    let tollgate = Tollgate::start(PER_OPERATION);
    let client = client(&tollgate);
    let d = client.should_allow(&op("alice", "a")).await.unwrap();
    let periods: Vec<_> = d.buckets.iter().map(|b| b.refill_period).collect();
    let hour = Some(Duration::from_secs(3600));
    assert_eq!(periods, [hour, hour]);
}

#[tokio::test]
async fn attributes_select_tiered_rules_and_cost_over_capacity_never_passes() {
    let tollgate = Tollgate::start(LIMITS);
    let client = client(&tollgate);
    let premium = ask("p").with_attribute("tier", "premium");
    let d = client.should_allow(&premium).await.unwrap();
    assert!(d.allowed);
    assert_eq!(d.buckets.len(), 2, "{d:?}");
    assert!(!client.should_allow(&premium).await.unwrap().allowed);

    let d = client.should_allow(&ask("q").with_cost(4)).await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.retry_after, None, "no retry can pass");
    assert!(!d.reason.is_empty());
}

#[tokio::test]
async fn bad_input_is_refused_before_it_is_sent() {
    let tollgate = Tollgate::start(LIMITS);
    let client = client(&tollgate);
    let err = client
        .should_allow(&ask(&"x".repeat(300)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidRequest { field, .. } if field == "identity"),
        "{err}"
    );
    let batch = [ask("a"), DecisionRequest::new("")];
    let err = client.should_allow_batch(&batch).await.unwrap_err();
    assert!(err.to_string().contains("requests[1].scope"), "{err}");
    assert!(err.is_invalid_input());
}

#[tokio::test]
async fn an_unreachable_tollgate_fails_open_or_closed_as_configured() {
    let mut tollgate = Tollgate::start(LIMITS);
    let endpoint = tollgate.endpoint();
    tollgate.stop();

    let open = Client::builder(&endpoint).build().unwrap();
    let d = open.should_allow(&ask("a")).await.unwrap();
    assert!(d.allowed && d.degraded);
    assert!(
        matches!(d.local, Some(FailureCause::Unreachable(_))),
        "{d:?}"
    );
    let all = open
        .should_allow_batch(&[ask("a"), ask("b")])
        .await
        .unwrap();
    assert!(all.iter().all(|d| d.allowed && d.local.is_some()));

    let closed = Client::builder(&endpoint)
        .failure_mode(FailureMode::Closed)
        .build()
        .unwrap();
    let err = closed.should_allow(&ask("a")).await.unwrap_err();
    assert!(
        matches!(err, Error::Unavailable(FailureCause::Unreachable(_))),
        "{err}"
    );
}

#[tokio::test]
async fn a_stalled_tollgate_costs_one_deadline_per_call_until_the_breaker_opens() {
    let tollgate = Tollgate::start(LIMITS);
    let client = Client::builder(tollgate.endpoint())
        .deadline(Duration::from_millis(200))
        .circuit_breaker(2, Duration::from_millis(1_500))
        .build()
        .unwrap();
    assert!(
        client
            .should_allow(&ask("a"))
            .await
            .unwrap()
            .local
            .is_none()
    );

    tollgate.pause();
    for _ in 0..2 {
        let started = tokio::time::Instant::now();
        let d = client.should_allow(&ask("a")).await.unwrap();
        assert_eq!(d.local, Some(FailureCause::DeadlineExceeded));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }
    // Two failures in a row: answered here, without waiting.
    let started = tokio::time::Instant::now();
    let d = client.should_allow(&ask("a")).await.unwrap();
    assert_eq!(d.local, Some(FailureCause::CircuitOpen));
    assert!(started.elapsed() < Duration::from_millis(50));

    // After the cool-down, Tollgate is asked again and answers.
    tollgate.resume();
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let d = client
        .with_deadline(Duration::from_secs(2))
        .should_allow(&ask("z"))
        .await
        .unwrap();
    assert!(d.local.is_none(), "{d:?}");
}

/// The inner service of the in-process layer tests. It takes the request
/// body type the caller sends: the layer does not wrap it.
async fn ok(_: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"inner"))))
}

#[tokio::test]
async fn the_layer_reads_the_mtls_peer_and_attributes_from_extensions_and_headers() {
    let tollgate = Tollgate::start(LIMITS);
    let layer = TollgateLayer::new(client(&tollgate), Extractor::fixed("demo"))
        .identity(Extractor::peer())
        .attribute("tier", Extractor::header(HeaderName::from_static("x-tier")));
    let service = layer.layer(tower::service_fn(ok));
    let request = |peer: &str| {
        let mut r = Request::builder()
            .uri("/")
            .header("x-tier", "premium")
            .body(Full::new(Bytes::new()))
            .unwrap();
        r.extensions_mut().insert(PeerIdentity(peer.to_owned()));
        r
    };

    let r = service
        .clone()
        .oneshot(request("spiffe://a"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let limits = r.headers()["ratelimit"].to_str().unwrap().to_owned();
    assert!(limits.contains(r#""premium";r=0"#), "{limits}");
    assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "inner");
    // The premium bucket of this peer is empty; another peer has its own.
    let r = service
        .clone()
        .oneshot(request("spiffe://a"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let r = service
        .clone()
        .oneshot(request("spiffe://b"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_layer_answers_400_for_a_missing_scope_or_an_oversized_key() {
    let tollgate = Tollgate::start(LIMITS);
    let layer = TollgateLayer::new(
        client(&tollgate),
        Extractor::header(HeaderName::from_static("x-tenant")),
    )
    .identity(Extractor::from_fn(|parts| {
        parts.uri.query().map(str::to_owned)
    }));
    let service = layer.layer(tower::service_fn(ok));
    let get = |uri: &str, tenant: Option<&str>| {
        let mut r = Request::builder().uri(uri);
        if let Some(t) = tenant {
            r = r.header("x-tenant", t);
        }
        r.body(Full::new(Bytes::new())).unwrap()
    };
    let r = service.clone().oneshot(get("/", None)).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let long = format!("/?{}", "u".repeat(300));
    let r = service
        .clone()
        .oneshot(get(&long, Some("demo")))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("identity"));
    let r = service
        .clone()
        .oneshot(get("/?u1", Some("demo")))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// The inner service under the MCP layer: it gets the bytes the layer read,
/// and echoes them.
async fn echo(
    request: Request<RequestBody<Full<Bytes>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let Ok(body) = request.into_body().collect().await;
    Ok(Response::new(Full::new(body.to_bytes())))
}

#[tokio::test]
async fn the_mcp_layer_charges_each_call_and_hands_the_body_on() {
    // An hour's refill: no token comes back during the test.
    let tollgate = Tollgate::start(
        "
scopes:
  - name: demo
    limits:
      - name: per-user
        per: identity
        capacity: 3
        refill_period: 1h
",
    );
    let limits = TollgateLayer::new(client(&tollgate), Extractor::fixed("demo"))
        .identity(Extractor::header(HeaderName::from_static("x-user")));
    let service = McpLayer::new(limits)
        .path("/mcp")
        .layer(tower::service_fn(echo));
    let post = |path: &str, body: &'static str| {
        Request::builder()
            .method("POST")
            .uri(path)
            .header("x-user", "mia")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let ratelimit = |r: &Response<_>| r.headers()["ratelimit"].to_str().unwrap().to_owned();

    // Two calls: two tokens, and the body reaches the inner service whole.
    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":2,"method":"ping"}]"#;
    let r = service.clone().oneshot(post("/mcp", batch)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        ratelimit(&r).starts_with(r#""per-user";r=1;"#),
        "{}",
        ratelimit(&r)
    );
    assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), batch);
    // Off the MCP path, one plain request: the last token.
    let r = service.clone().oneshot(post("/other", "x")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        ratelimit(&r).starts_with(r#""per-user";r=0;"#),
        "{}",
        ratelimit(&r)
    );
    // On it, JSON that is not JSON-RPC is charged once, and refused as a
    // JSON-RPC call without an id.
    let r = service
        .clone()
        .oneshot(post("/mcp", "\"not json-rpc\""))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["content-type"], "application/json");
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["id"], serde_json::Value::Null);
    assert_eq!(error["error"]["code"], 429);
}
