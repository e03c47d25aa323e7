//! The live status page on the metrics port: as plain HTML (no script
//! run), and in a real headless Chromium against a server under traffic,
//! whose screenshot is saved as `target/status-page.png`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::common::webdriver::Browser;
use crate::common::{TestServer, ask, free_port, metrics_get, req};

fn config(metrics: u16, per_user: u64) -> String {
    format!(
        // Reloads come from the test alone, not also from the file watch.
        "metrics:\n  listen: 127.0.0.1:{metrics}\nreload: {{watch: false}}\nscopes:
  - name: github-mcp
    limits:
      - {{name: per-user, per: identity, capacity: {per_user}, refill_period: 10s}}
      - {{name: search, per: identity_operation, capacity: 5, refill_period: 2s, operations: [\"tools/call:search\"]}}
      - {{name: global, per: scope, capacity: 100000, refill_period: 1s}}
  - name: checkout
    failure_mode: closed
    limits:
      - {{name: per-ip, per: identity, capacity: 30, refill_period: 1s}}
"
    )
}

#[tokio::test]
async fn the_page_reads_without_javascript_and_escapes_identities() {
    let metrics = free_port();
    let server = TestServer::start(&config(metrics, 3)).await;
    let mut c = server.client().await;
    let hostile = "<img src=x onerror=alert(1)>";
    for who in ["alice", "alice", "alice", "alice", hostile] {
        ask(&mut c, req("github-mcp", who, "tools/call:fetch")).await;
    }
    let page = metrics_get(metrics, "/").await;
    assert!(page.starts_with("<!doctype html>"), "{page}");
    assert!(!page.contains(hostile), "an identity went out unescaped");
    assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;"));
    for shown in [
        "scope <code>github-mcp</code>",
        "per-user",
        "<td>alice</td><td class=\"n\">4</td>",
        "class=\"spark decided\"",
        "config version <b id=\"config-version\">1</b>",
        "memory: available",
    ] {
        assert!(page.contains(shown), "{shown} missing from the page");
    }
    assert!(
        !page.contains("src=\"http") && !page.contains("href=\"http"),
        "nothing is fetched from elsewhere"
    );
    let json: Value = serde_json::from_str(&metrics_get(metrics, "/status.json?window=5m").await)
        .expect("status.json is JSON");
    assert_eq!(json["window"], "5m");
    let rule = &json["scopes"][1]["rules"][0];
    assert_eq!(rule["name"], "per-user");
    assert_eq!(rule["top_denials"][0]["identity"], "alice");
    assert_eq!(rule["top_denials"][0]["count"], 1);
    server.shutdown().await;
}

/// Sends `identities` calls in a loop until `stop`, for at most 40 s.
fn traffic(server: &TestServer, identities: &'static [&'static str], stop: Arc<AtomicBool>) {
    let url = server.url();
    tokio::spawn(async move {
        let mut c =
            tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient::connect(url)
                .await
                .expect("connect");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
            n += 1;
            let who = identities[n % identities.len()];
            let op = if n.is_multiple_of(3) {
                "tools/call:search"
            } else {
                "tools/call:fetch"
            };
            let _ = c.should_allow(req("github-mcp", who, op)).await;
            if n.is_multiple_of(4) {
                let _ = c.should_allow(req("checkout", who, "pay")).await;
            }
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    });
}

/// Evaluates `script` until it returns true, for up to 20 s.
async fn until(browser: &Browser, what: &str, script: &str) {
    for _ in 0..200 {
        if browser.eval(script).await == Value::Bool(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: never true in the page");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_shows_live_traffic_identities_and_charts() {
    let metrics = free_port();
    let server = TestServer::start(&config(metrics, 40)).await;
    // A reload refused and one accepted, for the history.
    server.reload("scopes: [{name: bad, limits: [{name: x, per: identity, capacity: 0, refill_period: 1s}]}]").await;
    // Let the first reload read its file before the next write begins.
    for _ in 0..100 {
        if metrics_get(metrics, "/status.json")
            .await
            .contains("refused")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.reload(&config(metrics, 30)).await;
    let stop = Arc::new(AtomicBool::new(false));
    const CROWD: &[&str] = &[
        "alice", "alice", "alice", "alice", "alice", "alice", "bob", "bob", "bob", "carol",
        "dmitri", "erin", "farah",
    ];
    traffic(&server, CROWD, stop.clone());
    let browser = Browser::start(1400, 1500).await;
    browser.goto(&format!("http://127.0.0.1:{metrics}/")).await;
    until(
        &browser,
        "the script polled",
        "return Number(document.body.dataset.polls) >= 1",
    )
    .await;
    // An identity that appears only after the page loaded: the script must
    // bring it in, without a reload.
    browser
        .eval("window.sameDocument = true; return true")
        .await;
    traffic(&server, &["late-arrival"], stop.clone());
    until(
        &browser,
        "late-arrival in the top table",
        "return [...document.querySelectorAll('tbody.top-decisions td')]
            .some(td => td.textContent === 'late-arrival')",
    )
    .await;
    until(
        &browser,
        "alice denied",
        "return [...document.querySelectorAll('tbody.top-denials td')]
            .some(td => td.textContent === 'alice')",
    )
    .await;
    // The charts drew traffic: some point of a decisions line is off the floor.
    until(
        &browser,
        "a decisions chart above zero",
        "return [...document.querySelectorAll('svg.spark.decided polyline')]
            .some(p => p.getAttribute('points').split(' ').some(xy => Number(xy.split(',')[1]) < 19))",
    )
    .await;
    assert_eq!(
        browser.eval("return window.sameDocument === true").await,
        Value::Bool(true)
    );
    let history = browser
        .eval("return document.querySelector('#reloads tbody').textContent")
        .await;
    let history = history.as_str().unwrap_or_default();
    assert!(
        history.contains("refused") && history.contains("accepted"),
        "{history}"
    );
    assert!(
        history.contains("scopes[0].limits[0].capacity"),
        "{history}"
    );
    // A few more polls, so the charts carry some history, then the picture.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/status-page.png");
    browser.screenshot(&shot).await;
    assert!(std::fs::metadata(&shot).expect("screenshot").len() > 10_000);
    stop.store(true, Ordering::Relaxed);
    browser.quit().await;
    server.shutdown().await;
}
