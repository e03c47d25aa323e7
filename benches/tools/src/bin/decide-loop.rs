//! A fixed loop of 200,000 operations on the embedded store, for
//! instruction counts that do not depend on how busy the machine is:
//!
//! `cargo build --release -p tollgate-bench-tools --bin decide-loop && valgrind --tool=callgrind \
//!    target/release/decide-loop [single|headroom|budget|reserve|settle]`
//!
//! Divide callgrind's `Collected` by 200,000 for instructions per operation:
//! - `single` (the default): a single-bucket decision;
//! - `headroom`: the same, SHEDDABLE against a limit with headroom;
//! - `budget`: a single-budget decision (`window: day` in Europe/Paris);
//! - `reserve`: a single-bucket decision with `settle_within`, signing its
//!   reservation;
//! - `settle`: settling a reservation (the 200,000 reservations are made
//!   first; subtract a `reserve` run's count to leave the settles).

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tollgate::config::Config;
use tollgate::limiter::{Limiter, Priority, Request, Rules};
use tollgate::store::memory::MemoryStore;

/// The embedded store never waits: one poll completes a decision.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the memory store never waits"),
    }
}

const N: usize = 200_000;

fn main() -> anyhow::Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "single".into());
    let limit = match mode.as_str() {
        "budget" => {
            "{name: daily, per: identity, budget: 1000000000000, window: day, time_zone: Europe/Paris}"
        }
        "headroom" => {
            "{name: per-user, per: identity, capacity: 50000000, refill_period: 1s, headroom: {normal: 10%, sheddable: 30%}}"
        }
        _ => "{name: per-user, per: identity, capacity: 50000000, refill_period: 1s}",
    };
    let yaml = format!("scopes:\n  - name: one\n    limits:\n      - {limit}\n");
    let config = Config::from_yaml(&yaml)?;
    let l = Limiter::new(Rules::compile(&config)?, MemoryStore::default());
    let mut r = Request::new("one", "alice", "tools/call:search");
    match mode.as_str() {
        "headroom" => r.priority = Priority::Sheddable,
        "reserve" | "settle" => r.settle_within = Some(Duration::from_secs(3600)),
        _ => {}
    }
    if std::env::var_os("SIZES").is_some() {
        eprintln!(
            "future {} decision {} request {} charge {} outcome {}",
            std::mem::size_of_val(&l.decide(&r)),
            std::mem::size_of::<tollgate::limiter::Decision>(),
            std::mem::size_of::<Request<'_>>(),
            std::mem::size_of::<tollgate::store::BucketCharge<'_>>(),
            std::mem::size_of::<tollgate::store::ChargeOutcome>(),
        );
    }
    let mut done = 0u64;
    if mode == "settle" {
        let tokens: Vec<String> = (0..N)
            .filter_map(|_| ready(l.decide(&r)).ok()?.reservation)
            .collect();
        for token in &tokens {
            done += u64::from(ready(l.settle(token, 0)).is_ok());
        }
    } else {
        for _ in 0..N {
            done += u64::from(ready(l.decide(&r))?.allowed);
        }
    }
    println!("{mode}: {done} done");
    Ok(())
}
