//! A fixed loop of 200,000 single-bucket decisions on the embedded store,
//! for instruction counts that do not depend on how busy the machine is:
//!
//! `cargo build --release --example decide_loop && valgrind --tool=callgrind \
//!    target/release/examples/decide_loop`
//!
//! Divide callgrind's `Collected` by 200,000 for instructions per decision.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use tollgate::config::Config;
use tollgate::limiter::{Limiter, Request, Rules};
use tollgate::store::memory::MemoryStore;

/// The embedded store never waits: one poll completes a decision.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the memory store never waits"),
    }
}

fn main() -> anyhow::Result<()> {
    let yaml = "scopes:\n  - name: one\n    limits:\n      - {name: per-user, per: identity, capacity: 50000000, refill_period: 1s}\n";
    let config = Config::from_yaml(yaml)?;
    let l = Limiter::new(Rules::compile(&config)?, MemoryStore::default());
    let r = Request::new("one", "alice", "tools/call:search");
    let mut allowed = 0u64;
    for _ in 0..200_000 {
        allowed += u64::from(ready(l.decide(&r))?.allowed);
    }
    println!("{allowed} allowed");
    Ok(())
}
