//! Plain HTTP through the rust-proxy process: allow, deny, recover, and the
//! failure modes.

use std::time::Duration;

use crate::support::{Http, Proxy, Tollgate, Upstream};

const THREE_PER_10S: &str = "
scopes:
  - name: demo
    limits:
      - name: per-user
        per: identity
        capacity: 3
        refill_period: 10s
";

fn proxy_args<'a>(tollgate: &'a str, upstream: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--upstream",
        upstream,
        "--tollgate",
        tollgate,
        "--scope",
        "demo",
        "--identity-header",
        "x-user",
        "--deadline",
        "2s",
    ];
    args.extend_from_slice(extra);
    args
}

#[tokio::test]
async fn allowed_requests_reach_the_upstream_with_ratelimit_headers() {
    let tollgate = Tollgate::start(THREE_PER_10S);
    let upstream = Upstream::start().await;
    let (t, u) = (tollgate.endpoint(), upstream.url());
    let proxy = Proxy::start(&proxy_args(&t, &u, &[]));
    let http = Http::new();

    for remaining in [2, 1, 0] {
        let r = http
            .get(&proxy.url("/items?x=1"), &[("x-user", "alice")])
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "upstream saw /items");
        assert_eq!(r.header("ratelimit-policy"), Some(r#""per-user";q=3;w=10"#));
        let limit = r.header("ratelimit").expect("RateLimit header");
        assert!(
            limit.starts_with(&format!(r#""per-user";r={remaining};t="#)),
            "{limit}"
        );
        assert_eq!(r.header("retry-after"), None);
        assert_eq!(
            r.header("x-ratelimit-limit"),
            None,
            "legacy headers are off"
        );
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].headers.get("x-user").unwrap(), "alice");
}

#[tokio::test]
async fn a_denial_is_a_429_with_retry_after_ratelimit_headers_and_problem_json() {
    let tollgate = Tollgate::start(THREE_PER_10S);
    let upstream = Upstream::start().await;
    let (t, u) = (tollgate.endpoint(), upstream.url());
    let proxy = Proxy::start(&proxy_args(&t, &u, &["--legacy-headers"]));
    let http = Http::new();
    for _ in 0..3 {
        let r = http.get(&proxy.url("/"), &[("x-user", "alice")]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
    }

    let r = http.get(&proxy.url("/"), &[("x-user", "alice")]).await;
    assert_eq!(r.status, 429);
    // 3 tokens per 10 s: one more is 3.33 s away at most, rounded up.
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=4).contains(&retry), "retry-after {retry}");
    assert_eq!(r.header("ratelimit-policy"), Some(r#""per-user";q=3;w=10"#));
    assert_eq!(
        r.header("ratelimit"),
        Some(format!(r#""per-user";r=0;t={retry}"#).as_str())
    );
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert!(r.header("x-ratelimit-reset").is_some());
    let problem = r.json();
    assert_eq!(
        problem["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(problem["status"], 429);
    assert_eq!(
        problem["violated-policies"],
        serde_json::json!(["per-user"])
    );
    assert_eq!(
        upstream.seen().len(),
        3,
        "the denied request never reached upstream"
    );

    // Buckets are per identity: bob is untouched.
    let r = http.get(&proxy.url("/"), &[("x-user", "bob")]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn waiting_retry_after_lets_the_next_request_through() {
    let tollgate = Tollgate::start(
        "
scopes:
  - name: demo
    limits:
      - name: per-user
        per: identity
        capacity: 1
        refill_period: 1500ms
",
    );
    let upstream = Upstream::start().await;
    let (t, u) = (tollgate.endpoint(), upstream.url());
    let proxy = Proxy::start(&proxy_args(&t, &u, &[]));
    let http = Http::new();
    assert_eq!(
        http.get(&proxy.url("/"), &[("x-user", "a")]).await.status,
        200
    );
    let denied = http.get(&proxy.url("/"), &[("x-user", "a")]).await;
    assert_eq!(denied.status, 429);
    let retry: u64 = denied.header("retry-after").unwrap().parse().unwrap();
    assert!(retry <= 2, "retry-after {retry}");
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let r = http.get(&proxy.url("/"), &[("x-user", "a")]).await;
    assert_eq!(r.status, 200, "allowed once Retry-After has passed");
}

#[tokio::test]
async fn without_an_identity_header_the_client_ip_is_the_identity() {
    let tollgate = Tollgate::start(THREE_PER_10S);
    let upstream = Upstream::start().await;
    let (t, u) = (tollgate.endpoint(), upstream.url());
    let proxy = Proxy::start(&[
        "--upstream",
        &u,
        "--tollgate",
        &t,
        "--scope",
        "demo",
        "--deadline",
        "2s",
    ]);
    let http = Http::new();
    // Different x-user values, one IP: one bucket.
    for user in ["a", "b", "c"] {
        assert_eq!(
            http.get(&proxy.url("/"), &[("x-user", user)]).await.status,
            200
        );
    }
    assert_eq!(
        http.get(&proxy.url("/"), &[("x-user", "d")]).await.status,
        429
    );
    let forwarded = upstream.seen()[0].headers.get("x-forwarded-for").cloned();
    assert_eq!(forwarded.unwrap(), "127.0.0.1");
}

#[tokio::test]
async fn fail_open_lets_requests_through_when_tollgate_is_stopped() {
    let mut tollgate = Tollgate::start(THREE_PER_10S);
    let upstream = Upstream::start().await;
    let (t, u) = (tollgate.endpoint(), upstream.url());
    let proxy = Proxy::start(&proxy_args(&t, &u, &["--failure-mode", "open"]));
    let http = Http::new();
    assert_eq!(
        http.get(&proxy.url("/"), &[("x-user", "a")]).await.status,
        200
    );

    tollgate.stop();
    // More requests than the limit: all pass, uncounted and unlabelled.
    for _ in 0..5 {
        let r = http.get(&proxy.url("/"), &[("x-user", "a")]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("ratelimit"), None, "nothing was counted");
    }
    assert_eq!(upstream.seen().len(), 6);
}

#[tokio::test]
async fn fail_closed_answers_503_when_tollgate_is_stopped() {
    let mut tollgate = Tollgate::start(THREE_PER_10S);
    let upstream = Upstream::start().await;
    let (t, u) = (tollgate.endpoint(), upstream.url());
    let proxy = Proxy::start(&proxy_args(&t, &u, &["--failure-mode", "closed"]));
    let http = Http::new();
    assert_eq!(
        http.get(&proxy.url("/"), &[("x-user", "a")]).await.status,
        200
    );

    tollgate.stop();
    let r = http.get(&proxy.url("/"), &[("x-user", "a")]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.json()["title"], "Rate limiter unavailable");
    assert_eq!(upstream.seen().len(), 1, "nothing passed while closed");
}

#[tokio::test]
async fn a_stalled_tollgate_costs_the_deadline_then_the_failure_policy_applies() {
    let tollgate = Tollgate::start(THREE_PER_10S);
    let upstream = Upstream::start().await;
    let (t, u) = (tollgate.endpoint(), upstream.url());
    let open = Proxy::start(&[
        "--upstream",
        &u,
        "--tollgate",
        &t,
        "--scope",
        "demo",
        "--deadline",
        "300ms",
    ]);
    let closed = Proxy::start(&[
        "--upstream",
        &u,
        "--tollgate",
        &t,
        "--scope",
        "demo",
        "--deadline",
        "300ms",
        "--failure-mode",
        "closed",
    ]);
    let http = Http::new();
    // Open both connections to Tollgate while it answers.
    assert_eq!(http.get(&open.url("/"), &[]).await.status, 200);
    assert_eq!(http.get(&closed.url("/"), &[]).await.status, 200);

    tollgate.pause();
    let started = tokio::time::Instant::now();
    assert_eq!(http.get(&open.url("/"), &[]).await.status, 200);
    assert_eq!(http.get(&closed.url("/"), &[]).await.status, 503);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(5),
        "two calls that each wait out a 300 ms deadline took {took:?}"
    );
    tollgate.resume();
}
