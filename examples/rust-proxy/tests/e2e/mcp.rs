//! MCP through the rust-proxy process with `--mcp`: JSON-RPC calls charged
//! per tool, batches charged all or nothing, notifications free, bodies
//! capped and handed on unchanged.

use serde_json::json;

use crate::support::{Http, Proxy, Tollgate, Upstream, post_chunked};

/// Two calls per tool per caller, ten calls of anything per caller.
const MCP_LIMITS: &str = r#"
scopes:
  - name: mcp
    limits:
      - name: per-tool
        per: identity_operation
        operations: ["tools/call:*"]
        capacity: 2
        refill_period: 20s
      - name: per-user
        per: identity
        capacity: 10
        refill_period: 20s
"#;

struct Setup {
    _tollgate: Tollgate,
    upstream: Upstream,
    proxy: Proxy,
    http: Http,
}

async fn setup(limits: &str, extra: &[&str]) -> Setup {
    let tollgate = Tollgate::start(limits);
    let upstream = Upstream::start().await;
    let (t, u) = (tollgate.endpoint(), upstream.url());
    let mut args = vec![
        "--upstream",
        &u,
        "--tollgate",
        &t,
        "--scope",
        "mcp",
        "--identity-header",
        "x-user",
        "--deadline",
        "2s",
        "--mcp",
        "--mcp-path",
        "/mcp",
    ];
    args.extend_from_slice(extra);
    let proxy = Proxy::start(&args);
    Setup {
        _tollgate: tollgate,
        upstream,
        proxy,
        http: Http::new(),
    }
}

fn call(id: u64, tool: &str) -> serde_json::Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": tool, "arguments": {"q": "rust"}}})
}

impl Setup {
    async fn post(&self, user: &str, body: &serde_json::Value) -> crate::support::Reply {
        self.http
            .post(
                &self.proxy.url("/mcp"),
                &[("x-user", user), ("content-type", "application/json")],
                body.to_string(),
            )
            .await
    }
}

#[tokio::test]
async fn each_tool_call_is_charged_and_a_denial_is_a_json_rpc_error() {
    let s = setup(MCP_LIMITS, &[]).await;
    for id in 1..=2 {
        let r = s.post("alice", &call(id, "search")).await;
        assert_eq!(r.status, 200);
        assert!(r.header("ratelimit").unwrap().contains(r#""per-tool";r="#));
    }
    let r = s.post("alice", &call(3, "search")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "retry-after {retry}");
    assert_eq!(
        r.header("ratelimit"),
        Some(format!(r#""per-tool";r=0;t={retry}"#).as_str())
    );
    let error = r.json();
    assert_eq!(error["jsonrpc"], "2.0");
    assert_eq!(error["id"], 3);
    assert_eq!(error["error"]["code"], 429);
    assert_eq!(error["error"]["data"]["retryAfterSeconds"], retry);
    assert!(error["error"]["data"]["retryAfterMs"].as_u64().unwrap() <= retry * 1000);
    assert_eq!(
        error["error"]["data"]["violatedPolicies"],
        json!(["per-tool"])
    );

    // Another tool has its own bucket; the first body reached upstream as sent.
    assert_eq!(s.post("alice", &call(4, "fetch")).await.status, 200);
    let seen = s.upstream.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].body, call(1, "search").to_string());
    assert_eq!(seen[0].path, "/mcp");
    assert_eq!(seen[0].method, http::Method::POST);
}

#[tokio::test]
async fn notifications_and_responses_are_never_charged() {
    let s = setup(MCP_LIMITS, &[]).await;
    let notification = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let response = json!({"jsonrpc": "2.0", "id": 9, "result": {}});
    for _ in 0..12 {
        let r = s.post("bob", &notification).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("ratelimit"), None, "no decision was made");
        assert_eq!(s.post("bob", &response).await.status, 200);
    }
    // Past per-user's 10, yet both tool calls still pass: nothing was taken.
    assert_eq!(s.post("bob", &call(1, "search")).await.status, 200);
    let r = s.post("bob", &call(2, "search")).await;
    assert_eq!(r.status, 200);
    assert!(r.header("ratelimit").unwrap().contains(r#""per-user";r=8"#));
    assert_eq!(s.upstream.seen().len(), 26);
}

#[tokio::test]
async fn a_batch_is_refused_whole_when_any_call_in_it_is_denied() {
    let s = setup(MCP_LIMITS, &[]).await;
    assert_eq!(s.post("carol", &call(1, "search")).await.status, 200);

    // Two searches with one left: one entry of cost 2, denied atomically,
    // so the one token is still there afterwards.
    let both = json!([call(2, "search"), call(3, "search")]);
    let r = s.post("carol", &both).await;
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    let errors = r.json();
    let errors = errors.as_array().expect("a batch denial is an array");
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[0]["id"], 2);
    assert_eq!(errors[1]["id"], 3);
    assert_eq!(errors[1]["error"]["code"], 429);
    assert_eq!(s.post("carol", &call(4, "search")).await.status, 200);

    // Now search is empty. A batch of a fetch, a search and a notification:
    // the search is denied, so the whole batch is refused, and only the two
    // calls get error objects.
    let mixed = json!([
        call(5, "fetch"),
        call(6, "search"),
        {"jsonrpc": "2.0", "method": "notifications/progress"},
    ]);
    let r = s.post("carol", &mixed).await;
    assert_eq!(r.status, 429);
    let errors = r.json();
    let ids: Vec<_> = errors
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(ids, [json!(5), json!(6)]);
    // No part of a refused batch reached the upstream.
    assert_eq!(s.upstream.seen().len(), 2);

    // The fetch in the refused batch took nothing: both of fetch's tokens
    // are there, so a fetch now leaves one. (Charged, it would leave none:
    // a token comes back only every 10 s.)
    let r = s.post("carol", &call(7, "fetch")).await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("ratelimit")
            .unwrap()
            .contains(r#""per-tool";r=1;"#),
        "{r:?}"
    );
}

/// Limits per tool and per caller that refill over an hour: no whole token
/// comes back while a test runs, so a token seen missing was taken.
const HOURLY_LIMITS: &str = r#"
scopes:
  - name: mcp
    limits:
      - name: search
        per: identity_operation
        operations: ["tools/call:search"]
        capacity: 2
        refill_period: 1h
      - name: fetch
        per: identity_operation
        operations: ["tools/call:fetch"]
        capacity: 5
        refill_period: 1h
      - name: per-user
        per: identity
        capacity: 10
        refill_period: 1h
"#;

#[tokio::test]
async fn a_refused_mixed_batch_takes_nothing_from_the_calls_that_had_room() {
    let s = setup(HOURLY_LIMITS, &[]).await;
    // Search is spent: search 0 of 2 left, per-user 8 of 10.
    for id in 1..=2 {
        assert_eq!(s.post("gus", &call(id, "search")).await.status, 200);
    }
    // fetch and tools/list have room (fetch needs 2 of 5, per-user 4 of 8);
    // search has none, so the batch is refused whole.
    let mixed = json!([
        call(3, "fetch"),
        call(4, "fetch"),
        call(5, "search"),
        {"jsonrpc": "2.0", "id": 6, "method": "tools/list"},
    ]);
    let r = s.post("gus", &mixed).await;
    assert_eq!(r.status, 429);
    assert_eq!(s.upstream.seen().len(), 2, "only the two searches passed");
    // The wait is search's (a token every 30 minutes); the calls denied only
    // because search was do not hide it.
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1790..=1800).contains(&retry), "retry-after {retry}");
    assert_eq!(
        r.header("ratelimit"),
        Some(format!(r#""search";r=0;t={retry}"#).as_str())
    );
    assert_eq!(
        r.header("ratelimit-policy"),
        Some(r#""fetch";q=5;w=3600, "per-user";q=10;w=3600, "search";q=2;w=3600"#)
    );
    let errors = r.json();
    let errors = errors.as_array().expect("a batch denial is an array");
    assert_eq!(errors.len(), 4);
    for (e, id) in errors.iter().zip(3..) {
        assert_eq!(e["id"], id);
        assert_eq!(e["error"]["data"]["retryAfterSeconds"], retry);
        assert_eq!(e["error"]["data"]["violatedPolicies"], json!(["search"]));
    }

    // Nothing was taken: a fetch now leaves fetch 5-1 and per-user 8-1, as
    // if the batch had never been sent. Charging its fetches and tools/list
    // would have left fetch 2 and per-user 4.
    let r = s.post("gus", &call(7, "fetch")).await;
    assert_eq!(r.status, 200);
    let limits = r.header("ratelimit").unwrap();
    assert!(
        limits.starts_with(r#""fetch";r=4;"#) && limits.contains(r#""per-user";r=7;"#),
        "{limits}"
    );
    // A batch that fits is charged whole: fetch to 2, per-user to 4.
    let fits = json!([
        call(8, "fetch"),
        call(9, "fetch"),
        {"jsonrpc": "2.0", "id": 10, "method": "tools/list"},
    ]);
    let r = s.post("gus", &fits).await;
    assert_eq!(r.status, 200);
    let limits = r.header("ratelimit").unwrap();
    assert!(
        limits.starts_with(r#""fetch";r=2;"#) && limits.contains(r#""per-user";r=4;"#),
        "{limits}"
    );
}

#[tokio::test]
async fn a_batch_of_allowed_calls_reaches_upstream_unchanged() {
    let s = setup(MCP_LIMITS, &[]).await;
    let batch = json!([
        call(1, "search"),
        {"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": "file:///x"}},
        {"jsonrpc": "2.0", "id": 3, "method": "prompts/get", "params": {"name": "p"}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
    ]);
    // Pretty-printed, to show the bytes are handed on as they came.
    let text = serde_json::to_string_pretty(&batch).unwrap();
    let r = s
        .http
        .post(
            &s.proxy.url("/mcp"),
            &[("x-user", "dan"), ("content-type", "application/json")],
            text.clone(),
        )
        .await;
    assert_eq!(r.status, 200);
    // Three calls: per-user has 10 - 3 left.
    assert!(
        r.header("ratelimit").unwrap().contains(r#""per-user";r=7"#),
        "{r:?}"
    );
    assert_eq!(s.upstream.seen()[0].body, text);
}

#[tokio::test]
async fn a_body_over_the_cap_is_refused_with_413_and_never_charged() {
    let s = setup(MCP_LIMITS, &["--max-body-bytes", "4096"]).await;
    // Announced size over the cap.
    let big = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                     "params": {"name": "search", "arguments": {"q": "x".repeat(5000)}}});
    let r = s.post("erin", &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    // Unannounced (chunked) size over the cap.
    let status = post_chunked(s.proxy.addr, "/mcp", 8192);
    assert!(status.contains(" 413 "), "{status}");
    assert!(s.upstream.seen().is_empty());
    // Under the cap is fine, and erin's buckets are untouched.
    let r = s.post("erin", &call(1, "search")).await;
    assert_eq!(r.status, 200);
    assert!(r.header("ratelimit").unwrap().contains(r#""per-user";r=9"#));
}

#[tokio::test]
async fn other_requests_on_an_mcp_proxy_are_charged_as_plain_requests() {
    let s = setup(MCP_LIMITS, &[]).await;
    // Not JSON at all: refused here, with nothing charged.
    let r = s
        .http
        .post(&s.proxy.url("/mcp"), &[("x-user", "fay")], "not json")
        .await;
    assert_eq!(r.status, 400);
    // JSON but not JSON-RPC: charged once (per-user), with the path as the
    // operation, and handed on for the MCP server to refuse.
    let r = s
        .http
        .post(
            &s.proxy.url("/mcp"),
            &[("x-user", "fay")],
            "\"not json-rpc\"",
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("ratelimit"), Some(r#""per-user";r=9;t=2"#));
    // A GET (the SSE stream) and a POST elsewhere: plain requests.
    let r = s.http.get(&s.proxy.url("/mcp"), &[("x-user", "fay")]).await;
    assert_eq!(r.status, 200);
    assert!(r.header("ratelimit").unwrap().contains(r#""per-user";r=8"#));
    assert_eq!(s.upstream.seen()[0].body, "\"not json-rpc\"");
}

/// Three pings: three calls to charge.
const THREE_PINGS: &str = r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"},{"jsonrpc":"2.0","id":3,"method":"ping"}]"#;

/// One call per caller: enough to tell one charge from three.
const ONE_CALL: &str = r#"
scopes:
  - name: mcp
    limits:
      - name: per-user
        per: identity
        capacity: 1
        refill_period: 60s
"#;

impl Setup {
    async fn post_raw(
        &self,
        path: &str,
        body: &'static [u8],
        headers: &[(&str, &str)],
    ) -> crate::support::Reply {
        let mut all = vec![("x-user", "dave")];
        all.extend_from_slice(headers);
        self.http.post(&self.proxy.url(path), &all, body).await
    }
}

#[tokio::test]
async fn ambiguous_bodies_are_parse_errors_that_charge_and_forward_nothing() {
    let s = setup(ONE_CALL, &[]).await;
    let bom_batch = [b"\xEF\xBB\xBF".as_slice(), THREE_PINGS.as_bytes()].concat();
    let bodies: [&[u8]; 5] = [
        br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","Method":"tools/call","params":{"name":"search"}}"#,
        br#"{"jsonrpc":"2.0","id":1,"Method":"tools/call","params":{"name":"search"},"result":{}}"#,
        br#"{"jsonrpc":"2.0","id":1,"Method":"tools/call","method":"notifications/initialized"}"#,
        br#"{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call"}"#,
        &bom_batch,
    ];
    for body in bodies {
        let r = s
            .http
            .post(&s.proxy.url("/mcp"), &[("x-user", "dave")], body.to_vec())
            .await;
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(body));
        assert_eq!(r.header("content-type"), Some("application/json"));
        let error = r.json();
        assert_eq!(error["error"]["code"], -32700);
        assert_eq!(error["id"], serde_json::Value::Null);
    }
    assert!(
        s.upstream.seen().is_empty(),
        "a refused body reached upstream"
    );
    // Nothing was charged: dave's one call is still there.
    let one = br#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#;
    assert_eq!(s.post_raw("/mcp", one, &[]).await.status, 200);
}

#[tokio::test]
async fn path_variants_of_the_mcp_endpoint_are_charged_per_call() {
    let s = setup(ONE_CALL, &[]).await;
    for path in ["/mcp/", "//mcp", "/MCP", "/x/../mcp", "/%6Dcp"] {
        // Three calls, one token: refused whole however the path is spelled.
        let r = s.post_raw(path, THREE_PINGS.as_bytes(), &[]).await;
        assert_eq!(r.status, 429, "POST {path}");
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    assert!(s.upstream.seen().is_empty());
}

#[tokio::test]
async fn compressed_bodies_are_415_and_charge_nothing() {
    let s = setup(ONE_CALL, &[]).await;
    for coding in ["gzip", "br", "identity, gzip", "GZIP"] {
        let r = s
            .post_raw(
                "/mcp",
                THREE_PINGS.as_bytes(),
                &[("content-encoding", coding)],
            )
            .await;
        assert_eq!(r.status, 415, "Content-Encoding {coding}");
        assert_eq!(r.header("accept-encoding"), Some("identity"));
    }
    assert!(s.upstream.seen().is_empty());
    let one = br#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#;
    let r = s
        .post_raw("/mcp", one, &[("content-encoding", "identity")])
        .await;
    assert_eq!(
        r.status, 200,
        "identity is no encoding, and nothing was charged"
    );
}

#[tokio::test]
async fn the_denial_code_is_429_unless_configured() {
    let one = br#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#;
    for (flag, want) in [
        (None, 429),
        (Some("-32023"), -32023),
        (Some("-32029"), -32029),
    ] {
        let extra: Vec<&str> = flag
            .map(|f| vec!["--mcp-error-code", f])
            .unwrap_or_default();
        let s = setup(ONE_CALL, &extra).await;
        assert_eq!(s.post_raw("/mcp", one, &[]).await.status, 200);
        let r = s.post_raw("/mcp", one, &[]).await;
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["error"]["code"], want, "--mcp-error-code {flag:?}");
    }
}
