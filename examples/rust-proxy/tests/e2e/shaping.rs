//! Shaping (issue 24) through the rust-proxy process: a burst against a
//! limit with `max_delay` reaches the upstream spread at the rate, with no
//! 429, when the proxy runs with `--max-wait`.

use std::time::Duration;

use crate::support::{Http, Proxy, Tollgate, Upstream};

const TEN_PER_SECOND_SHAPED: &str = "
scopes:
  - name: demo
    limits:
      - { name: per-team, per: identity, capacity: 10, refill_period: 1s, max_delay: 2s }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_30_reaches_the_upstream_spread_at_the_rate_with_no_429() {
    let tollgate = Tollgate::start(TEN_PER_SECOND_SHAPED);
    let upstream = Upstream::start().await;
    let (t, u) = (tollgate.endpoint(), upstream.url());
    let proxy = Proxy::start(&[
        "--upstream",
        &u,
        "--tollgate",
        &t,
        "--scope",
        "demo",
        "--identity-header",
        "x-team",
        "--deadline",
        "2s",
        "--max-wait",
        "2s",
    ]);
    let url = proxy.url("/tools");
    let start = tokio::time::Instant::now();
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..30 {
        let url = url.clone();
        burst.spawn(async move { Http::new().get(&url, &[("x-team", "team-a")]).await });
    }
    let replies = burst.join_all().await;
    let mut delayed = 0;
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        if let Some(wait) = r.header("ratelimit-delay") {
            let wait: f64 = wait.parse().expect("seconds");
            assert!(wait > 0.0 && wait <= 2.0, "{wait}");
            delayed += 1;
        }
    }
    assert_eq!(delayed, 20, "ten pass at once, twenty are held");
    let mut arrivals: Vec<Duration> = upstream.seen().iter().map(|s| s.at - start).collect();
    arrivals.sort();
    assert_eq!(arrivals.len(), 30);
    let shown: Vec<String> = arrivals
        .iter()
        .map(|a| format!("{:.3}", a.as_secs_f64()))
        .collect();
    eprintln!(
        "upstream arrival times (s after the burst was sent): {}",
        shown.join(" ")
    );
    // At 10/s: the k-th arrival after the first ten is at least k·0.1 s
    // after the first (less the spread of the burst's own decisions), and
    // the burst is through in about 2 s.
    for k in 10..30 {
        let want = Duration::from_millis(100 * (k as u64 - 9));
        let got = arrivals[k] - arrivals[0];
        assert!(
            got + Duration::from_millis(150) >= want,
            "arrival {k} came {got:?} after the first, want at least {want:?}"
        );
    }
    assert!(arrivals[29] <= Duration::from_secs(3), "{arrivals:?}");
}
