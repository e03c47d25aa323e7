//! Concurrency limits behind Envoy: descriptors that carry a lease id, over
//! the RLS wire and through a real Envoy 1.40 whose route is held to N
//! concurrent upstream requests (released on stream done), with a slot
//! coming back at `max_lease` when the release never arrives.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use futures_util::future::join_all;
use http_body_util::Full;
use hyper::body::Bytes;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tollgate::config::Config;
use tollgate::pb::tollgate::v1::leases_client::LeasesClient;
use tollgate::pb::tollgate::v1::{AcquireRequest, LeaseTarget, ShouldAllowRequest};
use tonic::transport::Channel;

use crate::common::envoy::descriptor;
use crate::common::{self, TestServer};
use crate::envoy_e2e::{Envoy, Reply, get};

/// A scope Envoy reaches with a pool of 3 slow requests per route;
/// `{max_lease}` and `{rates}` (more limits) are filled in.
const BACKEND: &str = r#"
envoy_response_headers: true
scopes:
  - name: backend
    descriptor_keys: { identity: user, operation: route, lease_id: lease_id }
    limits:
      - { name: slow-requests, per: operation, operations: ["slow"], concurrency: 3, max_lease: {max_lease} }
{rates}"#;

/// A rate of 2 per user per hour, beside the pool.
const PER_USER: &str =
    "      - { name: per-user, per: identity, capacity: 2, refill_period: 1h }\n";

/// The pool alone, on `store` (YAML; empty: the embedded store).
fn backend(max_lease: &str, store: &str) -> String {
    let scope = BACKEND
        .replace("{max_lease}", max_lease)
        .replace("{rates}", "");
    format!("{store}\n{scope}")
}

/// The pool and [`PER_USER`], on the embedded store.
fn backend_with_rates() -> String {
    BACKEND
        .replace("{max_lease}", "30s")
        .replace("{rates}", PER_USER)
}

/// `[user, route=slow, lease_id]`: a request of the slow route.
fn slow(user: &str, lease: &str) -> RateLimitDescriptor {
    descriptor(&[("user", user), ("route", "slow"), ("lease_id", lease)])
}

/// The same descriptor as Envoy sends it on stream done, to release.
fn done(user: &str, lease: &str) -> RateLimitDescriptor {
    RateLimitDescriptor {
        hits_addend: Some(UInt64Value { value: 1 }),
        is_negative_hits: true,
        ..slow(user, lease)
    }
}

fn request(descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: "backend".to_owned(),
        descriptors,
        hits_addend: 0,
    }
}

struct Rls {
    server: TestServer,
    rls: RateLimitServiceClient<Channel>,
}

impl Rls {
    async fn start(yaml: &str) -> Self {
        let server = TestServer::start(yaml).await;
        let rls = RateLimitServiceClient::new(server.channel().await);
        Self { server, rls }
    }

    async fn ask(&mut self, descriptors: Vec<RateLimitDescriptor>) -> RateLimitResponse {
        let r = self.rls.should_rate_limit(request(descriptors)).await;
        r.expect("an answer").into_inner()
    }

    async fn refused(&mut self, descriptors: Vec<RateLimitDescriptor>) -> tonic::Status {
        let r = self.rls.should_rate_limit(request(descriptors)).await;
        r.expect_err("refused")
    }
}

/// The slow route's live leases, by a dry-run acquire that takes nothing.
async fn in_flight(channel: Channel) -> u64 {
    let mut c = LeasesClient::new(channel);
    let probe = AcquireRequest {
        target: Some(LeaseTarget {
            scope: "backend".into(),
            operation: "slow".into(),
            lease_id: "probe".into(),
            ..LeaseTarget::default()
        }),
        dry_run: true,
        ..AcquireRequest::default()
    };
    c.acquire(probe)
        .await
        .expect("dry run")
        .into_inner()
        .in_flight
}

/// Tokens left in `user`'s per-user bucket, by a dry run.
async fn tokens(server: &TestServer, user: &str) -> u64 {
    let dry = ShouldAllowRequest {
        dry_run: true,
        ..common::req("backend", user, "")
    };
    common::ask(&mut server.client().await, dry).await.remaining
}

fn code(r: &RateLimitResponse) -> Code {
    Code::try_from(r.overall_code).expect("a code")
}

fn seconds(d: &Option<envoy_types::pb::google::protobuf::Duration>) -> f64 {
    d.as_ref()
        .map_or(-1.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

#[tokio::test]
async fn a_lease_descriptor_holds_a_slot_until_envoy_sends_it_negative() {
    let mut t = Rls::start(&backend_with_rates()).await;
    for (user, id) in [("a", "r1"), ("b", "r2"), ("c", "r3")] {
        let r = t.ask(vec![slow(user, id)]).await;
        assert_eq!(code(&r), Code::Ok, "{id}: {r:?}");
    }
    // A retried acquire of a live lease counts once.
    assert_eq!(code(&t.ask(vec![slow("a", "r1")]).await), Code::Ok);
    assert_eq!(in_flight(t.server.channel().await).await, 3);
    let full = t.ask(vec![slow("d", "r4")]).await;
    assert_eq!(code(&full), Code::OverLimit, "{full:?}");
    let wait = seconds(&full.statuses[0].duration_until_reset);
    assert!(
        (29.0..=30.0).contains(&wait),
        "until the first lease expires: {wait}"
    );
    assert_eq!(full.statuses[0].limit_remaining, 0);
    let retry = full
        .response_headers_to_add
        .iter()
        .find(|h| h.key == "retry-after");
    assert_eq!(retry.map(|h| h.value.as_str()), Some("30"), "{full:?}");
    // Stream done: the release is always OK, also for a lease never held.
    for id in ["r2", "r2", "never-held"] {
        assert_eq!(code(&t.ask(vec![done("b", id)]).await), Code::Ok);
    }
    assert_eq!(in_flight(t.server.channel().await).await, 2);
    assert_eq!(code(&t.ask(vec![slow("d", "r4")]).await), Code::Ok);
    // d's rate was charged once, by the request the pool admitted.
    assert_eq!(tokens(&t.server, "d").await, 1);
}

#[tokio::test]
async fn a_lease_descriptor_with_hits_addend_zero_asks_without_taking() {
    let mut t = Rls::start(&backend("30s", "")).await;
    let check = |id: &str| RateLimitDescriptor {
        hits_addend: Some(UInt64Value { value: 0 }),
        ..slow("a", id)
    };
    for _ in 0..5 {
        assert_eq!(code(&t.ask(vec![check("c1")]).await), Code::Ok);
    }
    assert_eq!(
        in_flight(t.server.channel().await).await,
        0,
        "checks took nothing"
    );
    for id in ["r1", "r2", "r3"] {
        assert_eq!(code(&t.ask(vec![slow("a", id)]).await), Code::Ok);
    }
    let full = t.ask(vec![check("c1")]).await;
    assert_eq!(code(&full), Code::OverLimit, "{full:?}");
    assert!(seconds(&full.statuses[0].duration_until_reset) > 29.0);
    assert_eq!(in_flight(t.server.channel().await).await, 3);
}

#[tokio::test]
async fn rates_and_a_lease_in_one_request_are_all_or_nothing() {
    let mut t = Rls::start(&backend_with_rates()).await;
    for (user, id) in [("x", "x1"), ("x", "x2"), ("y", "y1")] {
        assert_eq!(code(&t.ask(vec![slow(user, id)]).await), Code::Ok);
    }
    // The pool is full: the request takes no token from erin's rate.
    let r = t.ask(vec![slow("erin", "e1")]).await;
    assert_eq!(code(&r), Code::OverLimit);
    assert_eq!(
        tokens(&t.server, "erin").await,
        2,
        "a denied lease takes no token"
    );
    assert_eq!(code(&t.ask(vec![done("y", "y1")]).await), Code::Ok);
    // x's rate is spent (2 an hour): the lease x3 is taken, then given back.
    let r = t.ask(vec![slow("x", "x3")]).await;
    assert_eq!(code(&r), Code::OverLimit, "{r:?}");
    assert_eq!(
        in_flight(t.server.channel().await).await,
        2,
        "x3 given back"
    );
    // Another descriptor of the request denies: the lease is given back too.
    let r = t
        .ask(vec![slow("fay", "f1"), descriptor(&[("user", "x")])])
        .await;
    assert_eq!(code(&r), Code::OverLimit, "{r:?}");
    assert_eq!(r.statuses[0].code, Code::Ok as i32, "the pool had room");
    assert_eq!(
        in_flight(t.server.channel().await).await,
        2,
        "f1 given back"
    );
    assert_eq!(tokens(&t.server, "fay").await, 2, "and fay's token");
    assert_eq!(code(&t.ask(vec![slow("fay", "f1")]).await), Code::Ok);
    assert_eq!(in_flight(t.server.channel().await).await, 3);
}

#[tokio::test]
async fn bad_lease_descriptors_are_invalid_argument_naming_the_field() {
    let mut t = Rls::start(&backend("30s", "")).await;
    let long = "r".repeat(129);
    for (d, want) in [
        (
            descriptor(&[("user", "a"), ("route", "slow")]),
            "descriptors[0].entries: has no \"lease_id\" entry, yet reaches the concurrency limit \"slow-requests\"",
        ),
        (
            slow("a", &long),
            "descriptors[0].entries[2].value: is 129 bytes; the most allowed is 128",
        ),
        (
            slow("a", ""),
            "descriptors[0].entries[2].value: must not be empty",
        ),
        (
            done("a", ""),
            "descriptors[0].entries[2].value: must not be empty",
        ),
    ] {
        let status = t.refused(vec![d]).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(want), "{want}: {status:?}");
    }
    assert_eq!(in_flight(t.server.channel().await).await, 0, "took nothing");
    // A descriptor that reaches no pool needs no lease id.
    let r = t.ask(vec![descriptor(&[("user", "a")])]).await;
    assert_eq!(code(&r), Code::Ok);
}

#[tokio::test]
async fn a_pool_envoy_reaches_without_a_lease_id_is_refused_at_start_and_on_reload() {
    let good = backend("30s", "");
    let bad = good.replace(", lease_id: lease_id", "");
    let err = Config::from_yaml(&bad).expect_err("refused").to_string();
    assert!(
        err.contains(
            "scopes[0].descriptor_keys.lease_id: is required: Envoy descriptors reach the \
             concurrency limit \"slow-requests\" (scopes[0].limits[0])"
        ),
        "{err}"
    );
    let mut t = Rls::start(&good).await;
    for id in ["r1", "r2", "r3"] {
        assert_eq!(code(&t.ask(vec![slow("a", id)]).await), Code::Ok);
    }
    t.server.reload(&bad).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The old rules keep serving: the pool still holds its three.
    assert_eq!(code(&t.ask(vec![slow("b", "r4")]).await), Code::OverLimit);
    assert_eq!(code(&t.ask(vec![done("a", "r1")]).await), Code::Ok);
    assert_eq!(code(&t.ask(vec![slow("b", "r4")]).await), Code::Ok);
}

/// An upstream that holds each request for its `x-hold-ms` header's
/// milliseconds, counting the requests in flight and the most at once.
#[derive(Debug, Default)]
struct Upstream {
    in_flight: AtomicUsize,
    most: AtomicUsize,
    served: AtomicUsize,
}

impl Upstream {
    async fn start() -> (Arc<Self>, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let me = Arc::new(Self::default());
        let counts = me.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counts = counts.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let counts = counts.clone();
                        async move {
                            let hold = req
                                .headers()
                                .get("x-hold-ms")
                                .and_then(|v| v.to_str().ok()?.parse().ok())
                                .unwrap_or(0);
                            let now = counts.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            counts.most.fetch_max(now, Ordering::SeqCst);
                            counts.served.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(hold)).await;
                            counts.in_flight.fetch_sub(1, Ordering::SeqCst);
                            let body = Full::new(Bytes::from_static(b"ok"));
                            Ok::<_, Infallible>(hyper::Response::new(body))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (me, addr)
    }

    fn reset(&self) {
        self.most.store(0, Ordering::SeqCst);
        self.served.store(0, Ordering::SeqCst);
    }
}

/// The slow route: every request acquires a lease named by Envoy's own
/// `x-request-id` in the `backend` domain, and releases it on stream done,
/// as `deploy/envoy/concurrency.yaml` shows.
fn with_slow_route(yaml: String) -> String {
    let catch_all = "                      routes:\n                        - match: { prefix: \"/\" }\n                          route: { cluster: upstream }\n";
    assert_eq!(yaml.matches(catch_all).count(), 1, "the template's route");
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy/concurrency.yaml"),
    )
    .expect("read deploy/envoy/concurrency.yaml");
    // The example's route, indented as the template's routes are.
    let route: String = example
        .lines()
        .skip_while(|l| !l.starts_with("routes:"))
        .map(|l| format!("                      {l}\n"))
        .collect();
    assert!(route.contains("apply_on_stream_done: true"), "{route}");
    yaml.replace(catch_all, &route)
}

/// Sends `n` requests to the slow route at once, each held `hold` by the
/// upstream; their replies.
async fn burst(envoy: SocketAddr, n: usize, hold: Duration) -> Vec<Reply> {
    let hold = hold.as_millis().to_string();
    let calls = (0..n).map(|_| {
        let hold = hold.clone();
        async move {
            get(envoy, "/slow", &[("x-hold-ms", &hold)])
                .await
                .expect("a reply from Envoy")
        }
    });
    join_all(calls).await
}

fn statuses(replies: &[Reply]) -> (usize, usize) {
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let denied = replies.iter().filter(|r| r.status == 429).count();
    (ok, denied)
}

/// Waits up to `within` for the slow route's pool to hold `want` leases.
async fn wait_in_flight(t: &TestServer, want: u64, within: Duration, why: &str) {
    let start = Instant::now();
    let mut seen = in_flight(t.channel().await).await;
    while seen != want && start.elapsed() < within {
        tokio::time::sleep(Duration::from_millis(20)).await;
        seen = in_flight(t.channel().await).await;
    }
    assert_eq!(seen, want, "{why}");
}

async fn envoy_holds_the_route_to_three(store: &str) {
    let t = TestServer::start(&backend("30s", store)).await;
    let (upstream, addr) = Upstream::start().await;
    let envoy = Envoy::start(addr, t.addr, with_slow_route).await;
    let hold = Duration::from_millis(1500);
    for round in 0..2 {
        upstream.reset();
        let started = Instant::now();
        let replies = burst(envoy.listen, 12, hold).await;
        let (ok, denied) = statuses(&replies);
        let most = upstream.most.load(Ordering::SeqCst);
        assert_eq!(most, 3, "round {round}: at most 3 at once upstream");
        assert!(ok >= 3, "round {round}: {ok} passed: {replies:?}");
        assert_eq!(ok + denied, 12, "{replies:?}\n{}", envoy.log_text());
        assert_eq!(upstream.served.load(Ordering::SeqCst), ok);
        let refused = replies.iter().find(|r| r.status == 429).expect("a 429");
        let retry: u64 = refused
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no retry-after: {refused:?}"));
        assert!((1..=30).contains(&retry), "{retry}");
        // Envoy releases on stream done, after the client has its answer.
        wait_in_flight(&t, 0, Duration::from_secs(5), "released on stream done").await;
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "slots came back long before max_lease (30s)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_holds_a_route_to_three_concurrent_requests_on_the_embedded_store() {
    envoy_holds_the_route_to_three("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_holds_a_route_to_three_concurrent_requests_on_redis() {
    let redis = common::redis::Standalone::start();
    envoy_holds_the_route_to_three(&redis_store(&redis, "envoy-leases")).await;
}

fn redis_store(redis: &common::redis::Standalone, prefix: &str) -> String {
    format!(
        "store:\n  kind: redis\n  redis:\n    urls: [{:?}]\n    key_prefix: \"test:{prefix}:\"\n    \
         response_timeout: 5s\n    wait_timeout: 5s\n",
        redis.url()
    )
}

/// The release never arrives (the Envoy holding three requests is
/// killed): the pool stays full until the leases' `max_lease`, 4 s, then
/// admits again.
async fn a_lost_release_heals_at_max_lease(store: &str) {
    let max_lease = Duration::from_secs(4);
    let t = TestServer::start(&backend("4s", store)).await;
    let (upstream, addr) = Upstream::start().await;
    let doomed = Envoy::start(addr, t.addr, with_slow_route).await;
    let survivor = Envoy::start(addr, t.addr, with_slow_route).await;
    let sent = Instant::now();
    // These three never get an answer: their Envoy dies.
    let listen = doomed.listen;
    let held = tokio::spawn(join_all((0..3).map(move |_| async move {
        let _ = get(listen, "/slow", &[("x-hold-ms", "30000")]).await;
    })));
    while upstream.in_flight.load(Ordering::SeqCst) < 3 {
        assert!(sent.elapsed() < max_lease, "three requests did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let full = sent.elapsed();
    let mut doomed = doomed;
    doomed.child.kill().expect("SIGKILL Envoy"); // no stream done, ever
    let _ = doomed.child.wait();
    held.abort();
    let mut still_full = 0;
    let healed = loop {
        let r = get(survivor.listen, "/slow", &[]).await.expect("a reply");
        let at = sent.elapsed();
        if r.status == 200 {
            break at;
        }
        assert_eq!(r.status, 429, "{r:?}\n{}", survivor.log_text());
        still_full += 1;
        assert!(
            at < full + max_lease + Duration::from_secs(3),
            "never healed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(still_full >= 5, "the pool stayed full before max_lease");
    assert!(
        healed >= max_lease,
        "a slot came back at {healed:?}, before max_lease ({max_lease:?})"
    );
    assert!(
        healed <= full + max_lease + Duration::from_secs(2),
        "a slot came back at {healed:?}, long after max_lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_never_arrives_frees_the_slot_at_max_lease_on_the_embedded_store() {
    a_lost_release_heals_at_max_lease("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_never_arrives_frees_the_slot_at_max_lease_on_redis() {
    let redis = common::redis::Standalone::start();
    a_lost_release_heals_at_max_lease(&redis_store(&redis, "envoy-leak")).await;
}

/// Rates and a lease in one Envoy request are one store call, whatever
/// the answer: allowed, refused by the pool, denied by the rates (the
/// lease then never recorded, so nothing to give back).
#[tokio::test]
async fn rates_and_a_lease_in_one_request_are_one_store_call() {
    let metrics = common::free_port();
    let yaml = format!(
        "metrics: {{listen: \"127.0.0.1:{metrics}\"}}\n{}",
        backend_with_rates()
    );
    let mut t = Rls::start(&yaml).await;
    let calls = async || {
        let text = common::metrics_get(metrics, "/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix("tollgate_store_duration_seconds_count "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    // x1, x2 allowed; y1 fills the pool; erin refused by it; x3 denied by
    // x's rate once y1 is released.
    for (user, id, want) in [
        ("x", "x1", Code::Ok),
        ("x", "x2", Code::Ok),
        ("y", "y1", Code::Ok),
        ("erin", "e1", Code::OverLimit),
    ] {
        let before = calls().await;
        assert_eq!(code(&t.ask(vec![slow(user, id)]).await), want, "{id}");
        assert_eq!(calls().await - before, 1, "{id}: one store call");
    }
    assert_eq!(code(&t.ask(vec![done("y", "y1")]).await), Code::Ok);
    let before = calls().await;
    assert_eq!(code(&t.ask(vec![slow("x", "x3")]).await), Code::OverLimit);
    assert_eq!(calls().await - before, 1, "x3: one store call");
    assert_eq!(in_flight(t.server.channel().await).await, 2, "x3 held none");
}
