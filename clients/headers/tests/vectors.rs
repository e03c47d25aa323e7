//! `vectors.json`: decisions in, exact headers out, for both renderers. The
//! Go client's tests read the same file (its `middleware` half), so the two
//! clients cannot drift apart without one of them failing.
//!
//! The file also has rules of its own, checked here: every key present (no
//! defaults to disagree on), and no optional wait of zero, since Go's client
//! reads a zero `time.Duration` as "none".

use std::time::Duration;

use serde_json::{Map, Value};
use tollgate_headers::{Bucket, Decision, Headers, envoy, middleware};

const VECTORS: &str = include_str!("../vectors.json");

/// The longest wait Go's `time.Duration` holds.
const MAX_GO_NANOS: u64 = i64::MAX as u64;

struct Vector {
    name: String,
    decisions: Vec<Decision<'static>>,
    legacy: bool,
    middleware: Headers,
    draft: envoy::Draft,
    envoy: Headers,
}

fn vectors() -> Vec<Vector> {
    let file: Value = serde_json::from_str(VECTORS).expect("vectors.json is JSON");
    let file = object(&file, "vectors.json");
    keys(file, "vectors.json", &["about", "vectors"]);
    let list = file["vectors"].as_array().expect("`vectors` is a list");
    list.iter().map(vector).collect()
}

fn vector(v: &Value) -> Vector {
    let v = object(v, "a vector");
    let name = string(&v["name"], "name").to_owned();
    let at = |field: &str| format!("{name}: {field}");
    keys(
        v,
        &name,
        &["name", "why", "decisions", "middleware", "envoy"],
    );
    string(&v["why"], &at("why"));
    let decisions = v["decisions"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: a list", at("decisions")))
        .iter()
        .enumerate()
        .map(|(i, d)| decision(d, &at(&format!("decisions[{i}]"))))
        .collect();
    let m = object(&v["middleware"], &at("middleware"));
    keys(m, &at("middleware"), &["legacy", "headers"]);
    let e = object(&v["envoy"], &at("envoy"));
    keys(e, &at("envoy"), &["draft", "headers"]);
    let draft = match string(&e["draft"], &at("envoy.draft")) {
        "off" => envoy::Draft::Off,
        "draft-11" => envoy::Draft::Draft11,
        other => panic!(
            "{}: {other:?} is neither off nor draft-11",
            at("envoy.draft")
        ),
    };
    Vector {
        legacy: boolean(&m["legacy"], &at("middleware.legacy")),
        middleware: headers(&m["headers"], &at("middleware.headers")),
        draft,
        envoy: headers(&e["headers"], &at("envoy.headers")),
        decisions,
        name,
    }
}

fn decision(d: &Value, at: &str) -> Decision<'static> {
    let d = object(d, at);
    keys(
        d,
        at,
        &[
            "allowed",
            "degraded",
            "retry_after_ns",
            "reason",
            "limit",
            "remaining",
            "reset_after_ns",
            "buckets",
        ],
    );
    let field = |name: &str| format!("{at}.{name}");
    Decision {
        allowed: boolean(&d["allowed"], &field("allowed")),
        degraded: boolean(&d["degraded"], &field("degraded")),
        retry_after: optional_wait(&d["retry_after_ns"], &field("retry_after_ns")),
        reason: match &d["reason"] {
            Value::Null => None,
            v => {
                let reason = leak(string(v, &field("reason")));
                assert!(
                    !reason.is_empty(),
                    "{}: absent is null, not \"\"",
                    field("reason")
                );
                Some(reason)
            }
        },
        limit: number(&d["limit"], &field("limit")),
        remaining: number(&d["remaining"], &field("remaining")),
        reset_after: wait(&d["reset_after_ns"], &field("reset_after_ns")),
        buckets: d["buckets"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: a list", field("buckets")))
            .iter()
            .enumerate()
            .map(|(i, b)| bucket(b, &field(&format!("buckets[{i}]"))))
            .collect(),
    }
}

fn bucket(b: &Value, at: &str) -> Bucket<'static> {
    let b = object(b, at);
    keys(
        b,
        at,
        &[
            "rule",
            "limit",
            "remaining",
            "reset_after_ns",
            "retry_after_ns",
            "exhausted",
            "refill_period_ns",
        ],
    );
    let field = |name: &str| format!("{at}.{name}");
    Bucket {
        rule: leak(string(&b["rule"], &field("rule"))),
        limit: number(&b["limit"], &field("limit")),
        remaining: number(&b["remaining"], &field("remaining")),
        reset_after: wait(&b["reset_after_ns"], &field("reset_after_ns")),
        retry_after: optional_wait(&b["retry_after_ns"], &field("retry_after_ns")),
        exhausted: boolean(&b["exhausted"], &field("exhausted")),
        refill_period: optional_wait(&b["refill_period_ns"], &field("refill_period_ns")),
    }
}

fn headers(h: &Value, at: &str) -> Headers {
    h.as_array()
        .unwrap_or_else(|| panic!("{at}: a list of [name, value]"))
        .iter()
        .map(|pair| match pair.as_array().map(Vec::as_slice) {
            Some([Value::String(name), Value::String(value)]) => {
                (leak(name) as &'static str, value.clone())
            }
            _ => panic!("{at}: {pair} is not [name, value]"),
        })
        .collect()
}

fn object<'v>(v: &'v Value, at: &str) -> &'v Map<String, Value> {
    v.as_object()
        .unwrap_or_else(|| panic!("{at}: an object, not {v}"))
}

/// Exactly these keys: a missing one would be a default the Go reader
/// might not share, an unknown one a typo.
fn keys(o: &Map<String, Value>, at: &str, expected: &[&str]) {
    let mut got: Vec<&str> = o.keys().map(String::as_str).collect();
    let mut want = expected.to_vec();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want, "{at}: keys");
}

fn string<'v>(v: &'v Value, at: &str) -> &'v str {
    v.as_str()
        .unwrap_or_else(|| panic!("{at}: a string, not {v}"))
}

fn boolean(v: &Value, at: &str) -> bool {
    v.as_bool()
        .unwrap_or_else(|| panic!("{at}: true or false, not {v}"))
}

fn number(v: &Value, at: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{at}: a whole number, not {v}"))
}

fn wait(v: &Value, at: &str) -> Duration {
    let ns = number(v, at);
    assert!(
        ns <= MAX_GO_NANOS,
        "{at}: more than Go's time.Duration holds"
    );
    Duration::from_nanos(ns)
}

fn optional_wait(v: &Value, at: &str) -> Option<Duration> {
    if v.is_null() {
        return None;
    }
    let d = wait(v, at);
    assert!(
        !d.is_zero(),
        "{at}: Go reads a zero wait as none; write null, or test zero in Rust alone"
    );
    Some(d)
}

/// The vectors live for the whole test run; leaking their strings lets the
/// borrowed views hold them without a second owner.
fn leak(s: &str) -> &'static str {
    Box::leak(s.to_owned().into_boxed_str())
}

#[test]
fn the_middleware_renders_every_vector_exactly() {
    let all = vectors();
    let mut failed = Vec::new();
    for v in &all {
        let got = middleware::render(&v.decisions, middleware::Options { legacy: v.legacy });
        if got != v.middleware {
            failed.push(format!(
                "{}:\n  got  {got:?}\n  want {:?}",
                v.name, v.middleware
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn envoy_headers_render_every_vector_exactly() {
    let all = vectors();
    let mut failed = Vec::new();
    for v in &all {
        // Envoy's overall code: allowed when every descriptor was.
        let allowed = v.decisions.iter().all(|d| d.allowed);
        let got = envoy::render(&v.decisions, allowed, v.draft);
        if got != v.envoy {
            failed.push(format!("{}:\n  got  {got:?}\n  want {:?}", v.name, v.envoy));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// The file is meant to cover these cases; a rewrite that dropped one would
/// leave both clients unchecked there.
#[test]
fn the_vectors_cover_the_hard_cases() {
    let all = vectors();
    let rules = || {
        all.iter()
            .flat_map(|v| &v.decisions)
            .flat_map(|d| &d.buckets)
    };
    assert!(rules().any(|b| !b.rule.is_ascii()), "a non-ASCII name");
    assert!(rules().any(|b| b.rule.contains('"')));
    assert!(rules().any(|b| b.rule.contains('\\')));
    assert!(rules().any(|b| b.rule.chars().any(char::is_control)));
    assert!(rules().any(|b| b.limit == u64::MAX));
    assert!(rules().any(|b| b.retry_after == Some(Duration::from_nanos(MAX_GO_NANOS))));
    assert!(rules().any(|b| b.reset_after.is_zero()));
    assert!(rules().any(|b| b.refill_period.is_none()));
    let decisions = || all.iter().flat_map(|v| &v.decisions);
    assert!(decisions().any(|d| d.reason.is_some() && d.retry_after.is_none()));
    assert!(decisions().any(Decision::denied_by_batch));
    assert!(decisions().any(|d| d.degraded && !d.buckets.is_empty()));
    assert!(all.iter().any(|v| !v.legacy) && all.iter().any(|v| v.legacy));
    assert!(all.iter().any(|v| v.draft == envoy::Draft::Off));
    let retry_after = |h: &Headers| h.iter().any(|(k, _)| *k == tollgate_headers::RETRY_AFTER);
    assert!(
        all.iter()
            .any(|v| { v.decisions.iter().any(|d| !d.allowed) && !retry_after(&v.middleware) })
    );
}
