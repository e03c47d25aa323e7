//! In-process decision throughput of the limiter over the embedded store,
//! and the embedded store's memory per active bucket.
//!
//! Run: `cargo bench --bench limiter`. Single-threaded: each figure is one
//! core's cost per decision.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, Throughput, criterion_group};
use tollgate::config::Config;
use tollgate::limiter::{Limiter, Request, Rules};
use tollgate::store::memory::MemoryStore;

const RULES: &str = r#"
scopes:
  - name: one
    limits:
      - {name: per-user, per: identity, capacity: 50000000, refill_period: 1s}
  - name: four
    limits:
      - {name: global, per: scope, capacity: 50000000, refill_period: 1s}
      - {name: per-user, per: identity, capacity: 50000000, refill_period: 1s}
      - {name: per-user-hour, per: identity, capacity: 50000000, refill_period: 1h}
      - {name: per-op, per: identity_operation, operations: ["tools/call:*"], capacity: 50000000, refill_period: 1s}
"#;

fn limiter() -> Limiter<MemoryStore> {
    let config = Config::from_yaml(RULES).expect("valid");
    Limiter::new(
        Rules::compile(&config).expect("rules"),
        MemoryStore::default(),
    )
}

/// The embedded store never waits, so one poll completes a decision; this
/// measures the decision, not an executor.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the memory store never waits"),
    }
}

fn decisions(c: &mut Criterion) {
    let l = limiter();
    let mut g = c.benchmark_group("decide");
    g.throughput(Throughput::Elements(1));
    g.bench_function("1_bucket", |b| {
        let r = Request::new("one", "alice", "tools/call:search");
        b.iter(|| black_box(ready(l.decide(black_box(&r))).expect("decide").allowed))
    });
    g.bench_function("4_buckets", |b| {
        let r = Request::new("four", "alice", "tools/call:search");
        b.iter(|| black_box(ready(l.decide(black_box(&r))).expect("decide").allowed))
    });
    let n = if std::env::args().any(|a| a == "--bench") {
        1_000_000
    } else {
        1_000
    };
    let ids: Vec<String> = (0..n).map(|i| format!("user-{i}")).collect();
    g.bench_function("1_bucket_1M_identities", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % ids.len();
            let r = Request::new("one", &ids[i], "tools/call:search");
            black_box(ready(l.decide(&r)).expect("decide").allowed)
        })
    });
    g.finish();
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Fills the store with one million active buckets and reports the growth.
fn memory_per_bucket() {
    const N: usize = 1_000_000;
    let l = limiter();
    let ids: Vec<String> = (0..N).map(|i| format!("user-{i:07}")).collect();
    let before = rss();
    for id in &ids {
        let _ = ready(l.decide(&Request::new("one", id, "op")));
    }
    let after = rss();
    assert_eq!(l.store().len(), N);
    println!(
        "memory: {N} active buckets (identity of 12 bytes) grew RSS by {:.1} MiB: {} bytes per bucket; the bound counts {} per bucket",
        (after - before) as f64 / (1 << 20) as f64,
        (after - before) / N as u64,
        l.store().bytes_held() / N
    );
}

criterion_group!(benches, decisions);

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs each
    // bench once without it, in test mode. Keep that fast.
    if std::env::args().any(|a| a == "--bench") {
        memory_per_bucket();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
