//! A light gRPC load generator for `tollgate.v1.RateLimiter/ShouldAllow`.
//!
//! ghz is what users reach for, but on a two-core machine it spends more CPU
//! than the server it measures. This client does the same job for a tenth of
//! the CPU, so the benchmarks can show the server's own limit.
//!
//! `cargo run --release -p tollgate-bench-tools --bin loadgen -- --addr http://127.0.0.1:50051 \
//!    --scope bench --concurrency 50 --requests 100000 --identities 10000`
//!
//! Prints one line: `requests=… allowed=… errors=… seconds=… rps=… p50_us=… p99_us=…`.
//! Bounded by `--requests` and `--seconds`, whichever comes first.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use tollgate::pb::tollgate::v1::ShouldAllowRequest;
use tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    #[arg(long, default_value = "bench")]
    scope: String,
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    #[arg(long, default_value_t = 4)]
    connections: usize,
    #[arg(long, default_value_t = 100_000)]
    requests: u64,
    #[arg(long, default_value_t = 10_000)]
    identities: u64,
    /// Stop after this many seconds even if requests remain.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Send at most this many requests per second in all (paced per task);
    /// 0 sends as fast as answers come. The soak test uses a fixed rate.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Print the summary as JSON, in the shape of ghz's `-O json` (the
    /// fields the benchmark scripts read).
    #[arg(long)]
    json: bool,
}

#[allow(clippy::disallowed_methods)] // a benchmark client measures wall time
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections.max(1) {
        let channel = Channel::from_shared(args.addr.clone())?
            .tcp_nodelay(true)
            .connect()
            .await?;
        channels.push(channel);
    }
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.concurrency);
    for i in 0..args.concurrency {
        let mut client = RateLimiterClient::new(channels[i % channels.len()].clone());
        let (next, scope, total, ids) = (
            next.clone(),
            args.scope.clone(),
            args.requests,
            args.identities.max(1),
        );
        let mut pace = (args.rate > 0).then(|| {
            let every = Duration::from_secs_f64(args.concurrency as f64 / args.rate as f64);
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut allowed, mut errors) = (Vec::new(), 0u64, 0u64);
            loop {
                if let Some(tick) = &mut pace {
                    tick.tick().await;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total || Instant::now() >= deadline {
                    break;
                }
                let request = ShouldAllowRequest {
                    scope: scope.clone(),
                    identity: format!("user-{}", n % ids),
                    operation: "op".into(),
                    ..Default::default()
                };
                let sent = Instant::now();
                match client.should_allow(request).await {
                    Ok(r) => allowed += u64::from(r.into_inner().allowed),
                    Err(_) => errors += 1,
                }
                latencies.push(sent.elapsed().as_micros() as u32);
            }
            (latencies, allowed, errors)
        }));
    }
    let (mut latencies, mut allowed, mut errors) = (Vec::new(), 0, 0);
    for t in tasks {
        let (l, a, e) = t.await?;
        latencies.extend(l);
        allowed += a;
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let count = latencies.len() as u64;
    let rps = count as f64 / seconds;
    if args.json {
        println!(
            "{{\"count\":{count},\"rps\":{rps:.1},\"allowed\":{allowed},\"statusCodeDistribution\":{{\"OK\":{}}},\
             \"latencyDistribution\":[{{\"percentage\":50,\"latency\":{}}},{{\"percentage\":99,\"latency\":{}}}]}}",
            count - errors,
            u64::from(pct(0.50)) * 1000,
            u64::from(pct(0.99)) * 1000
        );
    } else {
        println!(
            "requests={count} allowed={allowed} errors={errors} seconds={seconds:.3} rps={rps:.0} p50_us={} p99_us={}",
            pct(0.50),
            pct(0.99)
        );
    }
    Ok(())
}
