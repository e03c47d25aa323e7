//! Concurrency leases (issue 20) through the layer in this process and
//! through the rust-proxy process, against the real Tollgate: a pool of N
//! holds N requests at once, renews a lease across a stream longer than
//! three TTLs, and gets a slot back as soon as a response ends or its
//! client goes away.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http::StatusCode;
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::watch;
use tollgate_client::Client;
use tollgate_client::layer::{Concurrency, Extractor, McpLayer, TollgateLayer};

use crate::support::{Http, Proxy, Reply, Tollgate};

/// A scope whose only limit is a pool of `n`, for everyone at once.
fn pool(n: u32) -> String {
    format!(
        "
scopes:
  - name: demo
    limits:
      - {{name: streams, per: scope, concurrency: {n}, max_lease: 1m}}
"
    )
}

/// A pool of `n` beside a rate with room to spare: the pool and the rate
/// are one store step, and the answer carries the rate's bucket.
fn pool_beside_rates(n: u32) -> String {
    format!(
        "{}      - {{name: per-scope, per: scope, capacity: 100, refill_period: 1h}}
",
        pool(n)
    )
}

/// What the test server's handlers share.
#[derive(Clone)]
struct App {
    open: watch::Receiver<bool>,
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

/// `/gate` waits until the gate opens; `/stream?n` sends n tokens 100 ms
/// apart; anything else answers at once.
async fn handle(State(app): State<App>, request: Request) -> Response {
    match request.uri().path() {
        "/gate" => {
            let now = app.running.fetch_add(1, Ordering::SeqCst) + 1;
            app.most.fetch_max(now, Ordering::SeqCst);
            let mut open = app.open.clone();
            let _ = open.wait_for(|o| *o).await;
            app.running.fetch_sub(1, Ordering::SeqCst);
            Response::new(Body::from("done"))
        }
        "/stream" => {
            let n = request
                .uri()
                .query()
                .and_then(|q| q.parse().ok())
                .unwrap_or(10);
            Response::new(Body::new(Ticks::new(n)))
        }
        "/mcp" => {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            if body.windows(6).any(|w| w == b"\"slow\"") {
                let mut open = app.open.clone();
                app.running.fetch_add(1, Ordering::SeqCst);
                let _ = open.wait_for(|o| *o).await;
                app.running.fetch_sub(1, Ordering::SeqCst);
            }
            Response::new(Body::from(r#"{"jsonrpc":"2.0","id":7,"result":{}}"#))
        }
        _ => Response::new(Body::from("ok")),
    }
}

/// A body of `left` frames, one every 100 ms.
struct Ticks {
    left: u32,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Ticks {
    fn new(left: u32) -> Self {
        let sleep = Box::pin(tokio::time::sleep(Duration::from_millis(100)));
        Self { left, sleep }
    }
}

impl http_body::Body for Ticks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        std::task::ready!(this.sleep.as_mut().poll(cx));
        this.left -= 1;
        let next = tokio::time::Instant::now() + Duration::from_millis(100);
        this.sleep.as_mut().reset(next);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"token ")))))
    }
}

/// The test server: the layer with `concurrency` in front of `handle`.
struct Served {
    addr: SocketAddr,
    app: App,
    gate: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    async fn start(tollgate: &Tollgate, concurrency: Concurrency) -> Self {
        let client = Client::builder(tollgate.endpoint())
            .deadline(Duration::from_secs(2))
            .build()
            .unwrap();
        let layer = TollgateLayer::new(client, Extractor::fixed("demo")).concurrency(concurrency);
        Self::start_with(|router| router.layer(layer)).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn wait_running(&self, n: usize) {
        for _ in 0..500 {
            if self.app.running.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{n} requests never ran at once");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.gate.send(true);
        self.task.abort();
    }
}

/// Polls `url` until it answers 200, for at most `within`.
async fn until_ok(url: &str, within: Duration) -> Duration {
    let start = tokio::time::Instant::now();
    while start.elapsed() < within {
        if Http::new().get(url, &[]).await.status == StatusCode::OK {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{url} was not allowed within {within:?}");
}

fn retry_after(r: &Reply) -> u64 {
    r.header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no whole-seconds Retry-After: {r:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_two_holds_two_of_six_at_once_and_frees_them() {
    let tollgate = Tollgate::start(&pool(2));
    let served = Served::start(&tollgate, Concurrency::new().ttl(Duration::from_secs(20))).await;
    let mut six = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let url = served.url("/gate");
        six.spawn(async move { Http::new().get(&url, &[]).await });
    }
    let mut refused = Vec::new();
    for _ in 0..4 {
        let r = tokio::time::timeout(Duration::from_secs(30), six.join_next())
            .await
            .expect("four refusals")
            .unwrap()
            .unwrap();
        refused.push(r);
    }
    for r in &refused {
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{r:?}");
        let wait = retry_after(r);
        assert!((1..=20).contains(&wait), "Retry-After {wait}");
        assert_eq!(
            r.header("ratelimit-policy"),
            Some(r#""streams";q=2;qu="concurrent-requests""#)
        );
        assert!(
            r.header("ratelimit")
                .unwrap()
                .starts_with(r#""streams";r=0;t="#)
        );
        assert_eq!(
            r.json()["violated-policies"],
            serde_json::json!(["streams"])
        );
    }
    served.wait_running(2).await;
    assert_eq!(served.app.running.load(Ordering::SeqCst), 2);
    served.gate.send(true).unwrap();
    let mut left: Vec<String> = Vec::new();
    for r in six.join_all().await {
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        left.push(r.header("ratelimit").unwrap_or_default().to_owned());
    }
    left.sort();
    // Slots left after each took its lease: one, then none.
    assert_eq!(left, [r#""streams";r=0"#, r#""streams";r=1"#]);
    assert_eq!(
        served.app.most.load(Ordering::SeqCst),
        2,
        "at most two ran at once"
    );

    // Released when the bodies ended: two fit again, at once.
    let took = until_ok(&served.url("/fast"), Duration::from_secs(3)).await;
    eprintln!("the pool was free {took:?} after the last response");
    // Each release follows its body's end by a moment (a task sends it), so
    // a request right after another may still see it held; within a
    // second, one sees only itself.
    let mut alone = false;
    for _ in 0..100 {
        let r = Http::new().get(&served.url("/fast"), &[]).await;
        if r.header("ratelimit") == Some(r#""streams";r=1"#) {
            alone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(alone, "the pool never came back to empty");
}

/// A stream over three TTLs long keeps its lease: renewed, so another
/// request during it is still refused; and the slot is back after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_three_ttls_keeps_its_lease() {
    let tollgate = Tollgate::start(&pool(1));
    let ttl = Duration::from_millis(600);
    let lost = Arc::new(AtomicUsize::new(0));
    let counted = lost.clone();
    let concurrency = Concurrency::new().ttl(ttl).on_renew_failure(move |_, e| {
        if e.is_none() {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    let served = Served::start(&tollgate, concurrency).await;
    let url = served.url("/stream?40"); // 4 s: over six TTLs
    let stream = tokio::spawn(async move { Http::new().get(&url, &[]).await });
    let start = tokio::time::Instant::now();
    tokio::time::sleep(ttl * 3 + Duration::from_millis(200)).await;
    let during = Http::new().get(&served.url("/fast"), &[]).await;
    let at = start.elapsed();
    let whole = stream.await.unwrap();
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.body.len(), 40 * "token ".len(), "the stream was cut");
    if at < Duration::from_millis(3500) {
        assert_eq!(
            during.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{at:?} into the stream (TTL {ttl:?}): {during:?}"
        );
    }
    assert_eq!(
        lost.load(Ordering::SeqCst),
        0,
        "no renew found the lease lost"
    );
    until_ok(&served.url("/fast"), Duration::from_secs(3)).await;
}

/// A client that drops its response mid-stream frees the slot at once, not
/// at the lease's expiry a minute later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_mid_stream_frees_its_slot_promptly() {
    let tollgate = Tollgate::start(&pool(1));
    let served = Served::start(&tollgate, Concurrency::new().ttl(Duration::from_secs(60))).await;
    let url = served.url("/stream?600");
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<Bytes>>();
    let response = http.get(url.parse().unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "token ");
    let refused = Http::new().get(&served.url("/fast"), &[]).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{refused:?}");
    drop(body);
    drop(http);
    let took = until_ok(&served.url("/fast"), Duration::from_secs(3)).await;
    eprintln!("the slot came back {took:?} after the client left (lease TTL 60 s)");
}

/// rust-proxy with --concurrency: a slow upstream request holds the only
/// slot; a second is refused with Retry-After until the first ends, with
/// the pool's status and name though a rate with room applied too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_holds_a_lease_per_request_with_its_flag() {
    let tollgate = Tollgate::start(&pool_beside_rates(1));
    let upstream = Served::start_plain().await;
    let (t, u) = (tollgate.endpoint(), format!("http://{}", upstream.addr));
    let proxy = Proxy::start(&[
        "--upstream",
        &u,
        "--tollgate",
        &t,
        "--scope",
        "demo",
        "--deadline",
        "2s",
        "--concurrency",
        "--lease-ttl",
        "10s",
        "--concurrency-status",
        "503",
    ]);
    let url = proxy.url("/gate");
    let first = tokio::spawn(async move { Http::new().get(&url, &[]).await });
    upstream.wait_running(1).await;
    let second = Http::new().get(&proxy.url("/fast"), &[]).await;
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE, "{second:?}");
    assert!((1..=10).contains(&retry_after(&second)));
    assert_eq!(second.json()["status"], 503);
    assert_eq!(
        second.json()["violated-policies"],
        serde_json::json!(["streams"])
    );
    upstream.gate.send(true).unwrap();
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    until_ok(&proxy.url("/fast"), Duration::from_secs(3)).await;
}

/// Under the MCP layer, each tools/call holds a lease while it runs; other
/// methods take none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mcp_layer_holds_a_lease_per_tools_call() {
    let tollgate = Tollgate::start(
        "
scopes:
  - name: demo
    limits:
      - {name: tool-calls, per: scope, operations: [\"tools/call:*\"], concurrency: 1}
",
    );
    let client = Client::builder(tollgate.endpoint())
        .deadline(Duration::from_secs(2))
        .build()
        .unwrap();
    let limits = TollgateLayer::new(client, Extractor::fixed("demo"))
        .concurrency(Concurrency::new().ttl(Duration::from_secs(10)));
    let served =
        Served::start_with(|router| router.layer(McpLayer::new(limits).path("/mcp"))).await;
    let call = |tool: &str| {
        format!(r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"{tool}"}}}}"#)
    };
    let json = [("content-type", "application/json")];
    let url = served.url("/mcp");
    let slow = call("slow");
    let first = tokio::spawn(async move { Http::new().post(&url, &json, slow).await });
    served.wait_running(1).await;
    let second = Http::new()
        .post(&served.url("/mcp"), &json, call("fast"))
        .await;
    assert_eq!(second.status, StatusCode::TOO_MANY_REQUESTS, "{second:?}");
    assert!(second.json()["error"].is_object(), "{second:?}");
    assert!((1..=10).contains(&retry_after(&second)));
    let list = r#"{"jsonrpc":"2.0","id":8,"method":"tools/list"}"#;
    let listed = Http::new().post(&served.url("/mcp"), &json, list).await;
    assert_eq!(listed.status, StatusCode::OK, "tools/list takes no lease");
    served.gate.send(true).unwrap();
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    let mut passed = false;
    for _ in 0..100 {
        let r = Http::new()
            .post(&served.url("/mcp"), &json, call("fast"))
            .await;
        if r.status == StatusCode::OK {
            passed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(passed, "the slot never came back");
}

impl Served {
    /// `handle` behind `wrap`, on a free port.
    async fn start_with(wrap: impl FnOnce(axum::Router) -> axum::Router) -> Self {
        let (gate, open) = watch::channel(false);
        let app = App {
            open,
            running: Arc::default(),
            most: Arc::default(),
        };
        let router = wrap(axum::Router::new().fallback(handle).with_state(app.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            addr,
            app,
            gate,
            task,
        }
    }

    /// `handle` with no layer: an upstream for the proxy.
    async fn start_plain() -> Self {
        Self::start_with(|router| router).await
    }
}

/// A Tollgate the client cannot reach, failing open: requests pass,
/// unleased, with no lease headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tollgate_unreachable_leased_requests_fail_open() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = Client::builder(format!("127.0.0.1:{port}"))
        .deadline(Duration::from_millis(500))
        .build()
        .unwrap();
    let layer =
        TollgateLayer::new(client, Extractor::fixed("demo")).concurrency(Concurrency::new());
    let served = Served::start_with(|router| router.layer(layer)).await;
    for _ in 0..3 {
        let r = Http::new().get(&served.url("/fast"), &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.header("ratelimit-policy"), None);
    }
}

/// A lease that expired while Tollgate was frozen past its TTL is reported
/// lost once, and the stream it covered goes on to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_reported_once_and_the_stream_goes_on() {
    let tollgate = Tollgate::start(&pool(1));
    let lost = Arc::new(AtomicUsize::new(0));
    let counted = lost.clone();
    let concurrency = Concurrency::new()
        .ttl(Duration::from_millis(900))
        .on_renew_failure(move |_, e| {
            if e.is_none() {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
    let served = Served::start(&tollgate, concurrency).await;
    let url = served.url("/stream?50"); // 5 s
    let stream = tokio::spawn(async move { Http::new().get(&url, &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    tollgate.pause();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    tollgate.resume();
    let whole = stream.await.unwrap();
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.body.len(), 50 * "token ".len(), "the stream was cut");
    assert_eq!(
        lost.load(Ordering::SeqCst),
        1,
        "lost once, then no more renewing"
    );
}
