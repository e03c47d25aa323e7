//! What the client and the layer add to a call, measured against the real
//! Tollgate binary. Ignored by default; run in release mode:
//!
//! ```sh
//! cargo test --release -p rust-proxy --test e2e -- --ignored --nocapture latency
//! ```
//!
//! `LATENCY_N` sets the number of measured calls per path (default 2000).
//! Paths are measured in turn, one call each per round, so that drift in the
//! machine's load touches them alike.

use std::time::Duration;

use http::HeaderName;
use rust_proxy::{Args, limited_router, plain_router, serve};
use tokio::time::Instant;
use tollgate_client::pb::tollgate::v1::ShouldAllowRequest;
use tollgate_client::pb::tollgate::v1::rate_limiter_client::RateLimiterClient;
use tollgate_client::{Client, DecisionRequest, FailureMode};

use crate::support::{Http, Proxy, Tollgate, Upstream};

const BENCH_LIMITS: &str = "
scopes:
  - name: bench
    limits:
      - name: per-user
        per: identity
        capacity: 50000000
        refill_period: 1s
";

#[derive(Clone)]
struct Samples {
    name: &'static str,
    micros: Vec<f64>,
}

impl Samples {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            micros: Vec::new(),
        }
    }

    fn record(&mut self, d: Duration) {
        self.micros.push(d.as_secs_f64() * 1e6);
    }

    fn quantile(&self, q: f64) -> f64 {
        let mut v = self.micros.clone();
        v.sort_by(f64::total_cmp);
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v[i]
    }
}

fn table(title: &str, rows: &[Samples], baseline: &Samples) {
    println!("\n{title}");
    println!("| path | n | median µs | p99 µs | median added µs | p99 added µs |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        let (m, p) = (r.quantile(0.5), r.quantile(0.99));
        let (bm, bp) = (baseline.quantile(0.5), baseline.quantile(0.99));
        println!(
            "| {} | {} | {m:.0} | {p:.0} | {:.0} | {:.0} |",
            r.name,
            r.micros.len(),
            m - bm,
            p - bp
        );
    }
}

async fn serve_in_process(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, router, std::future::pending()));
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run in release mode with --ignored --nocapture"]
async fn latency() {
    let n: usize = std::env::var("LATENCY_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let warmup = 200;
    let tollgate = Tollgate::start(BENCH_LIMITS);
    let endpoint = tollgate.endpoint();

    // gRPC: the generated client on its own channel, and tollgate_client.
    let channel = tonic::transport::Channel::from_shared(format!("http://{endpoint}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = RateLimiterClient::new(channel);
    let client = Client::builder(&endpoint)
        .deadline(Duration::from_secs(1))
        .build()
        .unwrap();
    let mut direct = Samples::new("generated tonic client");
    let mut ours = Samples::new("tollgate_client::Client");
    for i in 0..warmup + n {
        let t = Instant::now();
        let r = raw
            .should_allow(ShouldAllowRequest {
                scope: "bench".into(),
                identity: "raw".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let took = t.elapsed();
        assert!(r.into_inner().allowed);
        if i >= warmup {
            direct.record(took);
        }
        let t = Instant::now();
        let d = client
            .should_allow(&DecisionRequest::new("bench").with_identity("client"))
            .await
            .unwrap();
        let took = t.elapsed();
        assert!(d.allowed && d.local.is_none());
        if i >= warmup {
            ours.record(took);
        }
    }
    table(
        "gRPC ShouldAllow, sequential (added = over the generated client)",
        &[direct.clone(), ours],
        &direct,
    );

    // HTTP: straight to the upstream, through the forwarder with and without
    // the layer (in this process), and through the rust-proxy process.
    let upstream = Upstream::start().await;
    let args = Args {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: upstream.url().parse().unwrap(),
        tollgate: endpoint.clone(),
        scope: "bench".into(),
        identity_header: Some(HeaderName::from_static("x-user")),
        mcp: false,
        mcp_path: None,
        max_body_bytes: 1 << 20,
        mcp_error_code: tollgate_client::mcp::RATE_LIMITED_CODE,
        failure_mode: FailureMode::Open,
        deadline: Duration::from_secs(1),
        legacy_headers: false,
        max_wait: None,
        concurrency: false,
        lease_ttl: Duration::from_secs(30),
        concurrency_status: 429,
    };
    let plain = serve_in_process(plain_router(args.upstream.clone())).await;
    let limited = serve_in_process(limited_router(&args).unwrap()).await;
    let (u, t) = (upstream.url(), endpoint.clone());
    let process = Proxy::start(&[
        "--upstream",
        &u,
        "--tollgate",
        &t,
        "--scope",
        "bench",
        "--identity-header",
        "x-user",
        "--deadline",
        "1s",
    ]);
    let targets = [
        ("upstream, direct", format!("{}/", upstream.url())),
        ("forwarder, no layer", format!("{plain}/")),
        ("forwarder + layer", format!("{limited}/")),
        ("rust-proxy process", process.url("/")),
    ];
    let http = Http::new();
    let mut samples: Vec<Samples> = targets.iter().map(|(name, _)| Samples::new(name)).collect();
    for i in 0..warmup + n {
        for ((_, url), s) in targets.iter().zip(&mut samples) {
            let t = Instant::now();
            let r = http.get(url, &[("x-user", "http")]).await;
            let took = t.elapsed();
            assert_eq!(r.status, 200);
            if i >= warmup {
                s.record(took);
            }
        }
    }
    let baseline = samples[1].clone();
    table(
        "HTTP GET, sequential, keep-alive (added = over the forwarder without the layer)",
        &samples,
        &baseline,
    );
}
