//! In-process decision throughput of the limiter over the embedded store,
//! the embedded store's memory per active bucket, the cost of recording a
//! decision in the heavy hitters, and of parsing a Redis batch reply.
//!
//! Run: `cargo bench --bench limiter`. Single-threaded: each figure is one
//! core's cost per decision.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group};
use tollgate::config::Config;
use tollgate::limiter::{BucketReport, Decision, Limiter, Request, Rules};
use tollgate::observe::hitters::Hitters;
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

/// What `Observer::decided` adds for the heavy hitters: one `record` per
/// decision, measured on decisions the limiter really made.
fn recording(c: &mut Criterion) {
    let l = limiter();
    let mut g = c.benchmark_group("record");
    g.throughput(Throughput::Elements(1));
    let one = ready(l.decide(&Request::new("one", "alice", "x"))).expect("decide");
    let four = ready(l.decide(&Request::new("four", "alice", "tools/call:a"))).expect("decide");
    let hitters = Hitters::default();
    g.bench_function("1_bucket_hot_identity", |b| {
        b.iter(|| hitters.record(black_box("one"), black_box("alice"), black_box(&one)))
    });
    g.bench_function("4_buckets_hot_identity", |b| {
        b.iter(|| hitters.record(black_box("four"), black_box("alice"), black_box(&four)))
    });
    // Every record a new identity: each one takes over the smallest counter.
    let ids: Vec<String> = (0..100_000).map(|i| format!("user-{i:07}")).collect();
    let hitters = Hitters::default();
    g.bench_function("1_bucket_100k_identities", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % ids.len();
            hitters.record("one", &ids[i], &one)
        })
    });
    g.finish();
}

/// The heavy hitters' most memory for one rule: a million distinct
/// identities (16 bytes each) over an hour, every one denied, so every
/// summary of every slot of every window is full.
fn hitters_memory() {
    let denied = Decision {
        buckets: vec![BucketReport {
            rule: "per-user".into(),
            limit: 10,
            period: Duration::from_secs(1),
            remaining: 0,
            reset_after: Duration::ZERO,
            retry_after: None,
            exhausted: true,
            shadow: false,
        }]
        .into(),
        ..Decision::default()
    };
    let hitters = Hitters::default();
    for i in 0..1_000_000u64 {
        // Spread over an hour: 3.6 ms apart.
        hitters.record_at(i * 3_600_000, "one", &format!("user-{i:011}"), &denied);
    }
    println!(
        "hitters: one rule, 1,000,000 identities of 16 bytes over an hour: {} bytes ({} counters per summary)",
        hitters.memory_bytes(),
        hitters.sizes().counters
    );
}

/// What the redis crate's parser costs Tollgate for one coalesced call's
/// reply: the decision script's reply for 12 one-bucket charges (`now`,
/// then status, conforms, ticks, frac per charge) as Redis sends it, an
/// array of integers, and the same integers packed little-endian in one
/// bulk string (the form weighed in docs/benchmarks.md and dropped: packing
/// them cost Redis more than parsing them costs here).
fn redis_reply(c: &mut Criterion) {
    let now = 1_765_000_000_123_456_i64;
    let mut ints = vec![now];
    for i in 0..12 {
        ints.extend([1, 1, now + 1_000 + i, 37 * i]);
    }
    let mut array = format!("*{}\r\n", ints.len());
    for n in &ints {
        array += &format!(":{n}\r\n");
    }
    let packed: Vec<u8> = ints.iter().flat_map(|n| n.to_le_bytes()).collect();
    let mut bulk = format!("${}\r\n", packed.len()).into_bytes();
    bulk.extend(&packed);
    bulk.extend(b"\r\n");
    let mut g = c.benchmark_group("redis_reply");
    g.throughput(Throughput::Elements(12));
    g.bench_function("12_charges_integer_array", |b| {
        b.iter(|| {
            let value = redis::parse_redis_value(black_box(array.as_bytes())).unwrap();
            redis::from_redis_value::<Vec<i64>>(value).unwrap()
        })
    });
    g.bench_function("12_charges_packed_string", |b| {
        b.iter(|| {
            let value = redis::parse_redis_value(black_box(&bulk)).unwrap();
            let bytes = redis::from_redis_value::<Vec<u8>>(value).unwrap();
            bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect::<Vec<i64>>()
        })
    });
    g.finish();
}

criterion_group!(benches, decisions, recording, redis_reply);

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs each
    // bench once without it, in test mode. Keep that fast.
    if std::env::args().any(|a| a == "--bench") {
        memory_per_bucket();
        hitters_memory();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
