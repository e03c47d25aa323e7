//! A fixed loop of 200,000 heavy-hitter recordings, for instruction counts
//! that do not depend on how busy the machine is:
//!
//! `cargo build --release -p tollgate-bench-tools --bin record-loop && valgrind --tool=callgrind \
//!    target/release/record-loop [hot|spread|four] [records]`
//!
//! Subtract the `Collected` of a run with `0` records as the second
//! argument (the set-up), and divide by 200,000 for instructions per record. `hot`: one identity, one
//! bucket; `spread`: 100,000 identities in turn, one bucket, so every
//! record takes over the smallest counter; `four`: one identity, four
//! buckets.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use tollgate::config::Config;
use tollgate::limiter::{Limiter, Request, Rules};
use tollgate::observe::hitters::Hitters;
use tollgate::store::memory::MemoryStore;

/// The embedded store never waits: one poll completes a decision.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the memory store never waits"),
    }
}

const RULES: &str = "
scopes:
  - name: one
    limits:
      - {name: per-user, per: identity, capacity: 50000000, refill_period: 1s}
  - name: four
    limits:
      - {name: a, per: scope, capacity: 50000000, refill_period: 1s}
      - {name: b, per: identity, capacity: 50000000, refill_period: 1s}
      - {name: c, per: identity, capacity: 50000000, refill_period: 1h}
      - {name: d, per: identity_operation, capacity: 50000000, refill_period: 1s}
";

fn main() -> anyhow::Result<()> {
    let shape = std::env::args().nth(1).unwrap_or_else(|| "hot".into());
    let l = Limiter::new(
        Rules::compile(&Config::from_yaml(RULES)?)?,
        MemoryStore::default(),
    );
    let scope = if shape == "four" { "four" } else { "one" };
    let d = ready(l.decide(&Request::new(scope, "alice", "x")))?;
    let ids: Vec<String> = (0..100_000).map(|i| format!("user-{i:07}")).collect();
    let hitters = Hitters::default();
    let n: usize = std::env::args().nth(2).map_or(Ok(200_000), |n| n.parse())?;
    for i in 0..n {
        let who = if shape == "spread" {
            &ids[i % ids.len()]
        } else {
            "alice"
        };
        hitters.record(scope, who, &d);
    }
    println!("{} bytes held", hitters.memory_bytes());
    Ok(())
}
