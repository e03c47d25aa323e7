//! envoyproxy/ratelimit compatibility, over the wire: the fixtures of
//! `tests/corpus/envoy/` (our own, written from upstream's documented
//! behaviour) load from upstream's runtime layout and decide as upstream's
//! README says, on the embedded store and on Redis; the refused ones are
//! refused, naming the problem.

use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::value::Kind;
use tollgate::config::Config;
use tonic::transport::Channel;

use crate::common::TestServer;
use crate::common::envoy::descriptor;
use crate::common::redis::Standalone;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/envoy")
}

/// `RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY`.
fn runtime_config_dir() -> PathBuf {
    corpus().join("runtime/current/ratelimit/config")
}

/// A config of the corpus's runtime directory, after `extra` (a store, a
/// setting).
fn config(extra: &str) -> String {
    format!(
        "{extra}\nenvoy_dynamic_metadata: true\nenvoy_ratelimit_configs: [{:?}]\n",
        runtime_config_dir()
    )
}

type Client = RateLimitServiceClient<Channel>;

async fn start(yaml: &str) -> (TestServer, Client) {
    let server = TestServer::start_config(Config::from_yaml(yaml).expect("corpus loads")).await;
    let client = RateLimitServiceClient::connect(server.url())
        .await
        .expect("connect");
    (server, client)
}

async fn ask(c: &mut Client, domain: &str, descriptors: &[&[(&str, &str)]]) -> RateLimitResponse {
    let request = RateLimitRequest {
        domain: domain.to_owned(),
        descriptors: descriptors.iter().map(|d| descriptor(d)).collect(),
        hits_addend: 0,
    };
    c.should_rate_limit(request)
        .await
        .expect("answer")
        .into_inner()
}

/// The overall code, then each descriptor's code and remainder.
fn seen(r: &RateLimitResponse) -> (Code, Vec<(Code, u32)>) {
    let code = |c: i32| Code::try_from(c).expect("code");
    (
        code(r.overall_code),
        r.statuses
            .iter()
            .map(|s| (code(s.code), s.limit_remaining))
            .collect(),
    )
}

use Code::{Ok as OK, OverLimit as OVER};

/// Upstream's README, example 3: an address with `requests_per_unit: 0` is
/// always over the limit, and (here) a request it denies takes nothing.
async fn black_list(c: &mut Client) {
    let banned: &[(&str, &str)] = &[("remote_address", "203.0.113.9")];
    let other: &[(&str, &str)] = &[("remote_address", "198.51.100.1")];
    for _ in 0..2 {
        let r = ask(c, "per_ip", &[banned]).await;
        assert_eq!(seen(&r), (OVER, vec![(OVER, 0)]));
        let limit = r.statuses[0].current_limit.as_ref().expect("limit");
        assert_eq!(limit.requests_per_unit, 0);
    }
    let r = ask(c, "per_ip", &[other, banned]).await;
    assert_eq!(seen(&r).0, OVER);
    assert_eq!(seen(&r).1[1].0, OVER);
    // The other address's 2 per hour are all still there.
    assert_eq!(seen(&ask(c, "per_ip", &[other]).await), (OK, vec![(OK, 1)]));
    assert_eq!(seen(&ask(c, "per_ip", &[other]).await), (OK, vec![(OK, 0)]));
    assert_eq!(seen(&ask(c, "per_ip", &[other]).await).0, OVER);
}

/// Upstream's README, examples 9 and 11: `share_threshold` gives a wildcard
/// one bucket for every value; without it each value has its own; a `*`
/// may sit in the middle of a value.
async fn shared_wildcard(c: &mut Client) {
    for path in ["shared/a.pdf", "shared/b.csv", "shared/c.txt"] {
        assert_eq!(seen(&ask(c, "files", &[&[("path", path)]]).await).0, OK);
    }
    let r = ask(c, "files", &[&[("path", "shared/d.txt")]]).await;
    assert_eq!(seen(&r), (OVER, vec![(OVER, 0)]));
    assert_eq!(seen(&ask(c, "files", &[&[("path", "own/a")]]).await).0, OK);
    assert_eq!(
        seen(&ask(c, "files", &[&[("path", "own/a")]]).await).0,
        OVER
    );
    assert_eq!(seen(&ask(c, "files", &[&[("path", "own/b")]]).await).0, OK);
    let action = |id: &str| format!("/api/{id}/action");
    assert_eq!(
        seen(&ask(c, "files", &[&[("path", &action("1"))]]).await).0,
        OK
    );
    assert_eq!(
        seen(&ask(c, "files", &[&[("path", &action("2"))]]).await).0,
        OK
    );
    assert_eq!(
        seen(&ask(c, "files", &[&[("path", &action("1"))]]).await).0,
        OVER
    );
    let r = ask(c, "files", &[&[("path", "/api/1/other")]]).await;
    assert_eq!(r.statuses[0].current_limit, None, "no wildcard matches");
}

/// Quota mode: over only when every quota descriptor is over; a rate-limit
/// descriptor over its limit still denies; what is over takes nothing.
async fn quota_mode(c: &mut Client) {
    let team: &[(&str, &str)] = &[("team_quota", "t")];
    let org: &[(&str, &str)] = &[("org_quota", "o")];
    let user: &[(&str, &str)] = &[("user", "u")];
    let r = ask(c, "quota", &[team, org, user]).await;
    assert_eq!(seen(&r), (OK, vec![(OK, 1), (OK, 0), (OK, 4)]));
    // The org quota is over, the team quota is not: the request passes, and
    // the team quota and the user's limit are charged.
    let r = ask(c, "quota", &[team, org, user]).await;
    assert_eq!(seen(&r), (OK, vec![(OK, 0), (OVER, 0), (OK, 3)]));
    // Both quotas are over: the request is over, and takes nothing.
    let r = ask(c, "quota", &[team, org, user]).await;
    assert_eq!(seen(&r).0, OVER);
    assert_eq!(seen(&r).1[..2], [(OVER, 0), (OVER, 0)]);
    assert_eq!(seen(&ask(c, "quota", &[user]).await), (OK, vec![(OK, 2)]));
    // A rate-limit descriptor over its limit denies, whatever the quotas.
    let busy: &[(&str, &str)] = &[("user", "busy")];
    for _ in 0..5 {
        ask(c, "quota", &[busy]).await;
    }
    let fresh: &[(&str, &str)] = &[("team_quota", "fresh")];
    let r = ask(c, "quota", &[fresh, busy]).await;
    assert_eq!(seen(&r).0, OVER);
    assert_eq!(seen(&ask(c, "quota", &[fresh]).await), (OK, vec![(OK, 1)]));
}

/// Shadow mode, replaces, unlimited and metadata (upstream's examples 5,
/// 6 and 7, and `RESPONSE_DYNAMIC_METADATA`).
async fn other_fields(c: &mut Client) {
    let trial: &[(&str, &str)] = &[("service", "s"), ("user", "trial")];
    for _ in 0..3 {
        assert_eq!(seen(&ask(c, "fields", &[trial]).await).0, OK);
    }
    let amy: &[(&str, &str)] = &[("service", "s"), ("user", "amy")];
    let premium: &[(&str, &str)] = &[("plan", "premium")];
    for left in [2, 1] {
        let r = ask(c, "fields", &[amy, premium]).await;
        assert_eq!(seen(&r), (OK, vec![(OK, 0), (OK, left)]));
        assert_eq!(r.statuses[0].current_limit, None, "per-user was replaced");
    }
    let r = ask(c, "fields", &[&[("ldap", "x")]]).await;
    assert_eq!(seen(&r), (OK, vec![(OK, u32::MAX)]));
    // An unlimited rule replaces too: carl's per-user limit is not charged.
    let carl: &[(&str, &str)] = &[("service", "s"), ("user", "carl")];
    for _ in 0..2 {
        let r = ask(c, "fields", &[carl, &[("staff", "x")]]).await;
        assert_eq!(seen(&r), (OK, vec![(OK, 0), (OK, u32::MAX)]));
    }
    assert_eq!(seen(&ask(c, "fields", &[carl]).await), (OK, vec![(OK, 0)]));
    assert_eq!(seen(&ask(c, "fields", &[carl]).await).0, OVER);
    let r = ask(c, "fields", &[amy]).await;
    assert_eq!(seen(&r), (OK, vec![(OK, 0)]));
    let meta = r.dynamic_metadata.expect("dynamic metadata");
    let text = |v: &envoy_types::pb::google::protobuf::Value| match &v.kind {
        Some(Kind::StringValue(s)) => s.clone(),
        other => format!("{other:?}"),
    };
    assert_eq!(text(&meta.fields["domain"]), "fields");
    let Some(Kind::StructValue(m)) = &meta.fields["metadata"].kind else {
        panic!("{meta:?}");
    };
    assert_eq!(text(&m.fields["tier"]), "standard");
    let Some(Kind::ListValue(list)) = &meta.fields["descriptors"].kind else {
        panic!("{meta:?}");
    };
    assert!(format!("{list:?}").contains("user=amy"), "{list:?}");
    // Over the limit, the descriptor's rule does not pass: no metadata.
    let r = ask(c, "fields", &[amy]).await;
    assert_eq!(seen(&r).0, OVER);
    assert!(
        !r.dynamic_metadata
            .expect("meta")
            .fields
            .contains_key("metadata")
    );
}

async fn run_every_example(yaml: &str) {
    let (_server, mut c) = start(yaml).await;
    black_list(&mut c).await;
    shared_wildcard(&mut c).await;
    quota_mode(&mut c).await;
    other_fields(&mut c).await;
}

#[tokio::test]
async fn the_corpus_decides_as_upstream_documents_on_the_embedded_store() {
    run_every_example(&config("store: { kind: memory }")).await;
}

#[tokio::test]
async fn the_corpus_decides_as_upstream_documents_on_redis() {
    let redis = Standalone::start();
    let store = format!(
        "store:\n  kind: redis\n  redis:\n    urls: [{:?}]\n    key_prefix: \"test:envoy-compat:\"\n{TIMEOUTS}",
        redis.url()
    );
    run_every_example(&config(&store)).await;
}

#[test]
fn every_refused_fixture_is_refused_naming_its_problem() {
    let dir = corpus().join("refused");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("refused/")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    assert!(entries.len() >= 12, "{entries:?}");
    for path in entries {
        let files = if path.is_dir() {
            std::fs::read_dir(&path)
                .expect("dir")
                .map(|e| e.expect("entry").path())
                .collect()
        } else {
            vec![path.clone()]
        };
        let expected: Vec<String> = files
            .iter()
            .flat_map(|f| {
                let text = std::fs::read_to_string(f).expect("fixture");
                text.lines()
                    .filter_map(|l| l.strip_prefix("# refused: ").map(str::to_owned))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(expected.len(), 1, "{path:?} says what it expects once");
        let yaml = format!("envoy_ratelimit_configs: [{path:?}]\n");
        let err = Config::from_yaml(&yaml)
            .expect_err(&format!("{path:?} is refused"))
            .to_string();
        assert!(err.contains(&expected[0]), "{path:?}: {err}");
    }
}

/// Every field of `msg` and of the messages inside it was known to the
/// descriptor: none decoded as unknown.
pub(crate) fn no_unknown_fields(msg: &prost_reflect::DynamicMessage, at: &str) {
    use prost_reflect::Value;
    assert_eq!(msg.unknown_fields().count(), 0, "unknown fields at {at}");
    for (field, value) in msg.fields() {
        let here = format!("{at}.{}", field.name());
        let items: Vec<&Value> = match value {
            Value::List(items) => items.iter().collect(),
            Value::Map(map) => map.values().collect(),
            v => vec![v],
        };
        for item in items {
            if let Value::Message(m) = item {
                no_unknown_fields(m, &here);
            }
        }
    }
}

#[test]
fn the_rls_descriptors_reflection_serves_decode_what_envoy_types_encodes() {
    use envoy_types::pb::envoy::config::core::v3::HeaderValue;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
        DescriptorStatus, Quota, RateLimit, quota::ExpirationSpecifier,
    };
    use envoy_types::pb::google::protobuf::{Duration, Struct, Timestamp, UInt64Value, Value};
    use prost::Message;

    let pool = prost_reflect::DescriptorPool::decode(tollgate::pb::ENVOY_RLS_FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let mut d = descriptor(&[("k", "v")]);
    d.limit = Some(RateLimitOverride {
        requests_per_unit: 3,
        unit: 2,
    });
    d.hits_addend = Some(UInt64Value { value: 7 });
    d.is_negative_hits = true;
    let request = RateLimitRequest {
        domain: "d".into(),
        descriptors: vec![d],
        hits_addend: 2,
    };
    let quota = Quota {
        requests: 4,
        id: "q".into(),
        expiration_specifier: Some(ExpirationSpecifier::ValidUntil(Timestamp {
            seconds: 9,
            nanos: 1,
        })),
    };
    let header = HeaderValue {
        key: "k".into(),
        value: "v".into(),
        raw_value: b"r".to_vec(),
    };
    let response = RateLimitResponse {
        overall_code: 2,
        statuses: vec![DescriptorStatus {
            code: 2,
            current_limit: Some(RateLimit {
                name: "n".into(),
                requests_per_unit: 5,
                unit: 7,
            }),
            limit_remaining: 6,
            duration_until_reset: Some(Duration {
                seconds: 1,
                nanos: 2,
            }),
            quota: Some(quota.clone()),
        }],
        response_headers_to_add: vec![header.clone()],
        request_headers_to_add: vec![header],
        raw_body: b"body".to_vec(),
        dynamic_metadata: Some(Struct {
            fields: [(
                "a".to_owned(),
                Value {
                    kind: Some(Kind::BoolValue(true)),
                },
            )]
            .into(),
        }),
        quota: Some(quota),
    };
    for (name, bytes) in [
        ("RateLimitRequest", request.encode_to_vec()),
        ("RateLimitResponse", response.encode_to_vec()),
    ] {
        let full = format!("envoy.service.ratelimit.v3.{name}");
        let desc = pool.get_message_by_name(&full).expect(&full);
        let msg = prost_reflect::DynamicMessage::decode(desc, bytes.as_slice()).expect(&full);
        no_unknown_fields(&msg, name);
        assert_eq!(msg.encode_to_vec().len(), bytes.len(), "{name}");
    }
    let service = pool
        .get_service_by_name("envoy.service.ratelimit.v3.RateLimitService")
        .expect("service");
    let method = service.methods().next().expect("method");
    assert_eq!(method.name(), "ShouldRateLimit");
}

/// Upstream's `SHADOW_MODE` and `QUOTA_MODE`, as `envoy_shadow_mode` and
/// `envoy_quota_mode`.
#[tokio::test]
async fn the_global_shadow_and_quota_modes_apply_to_every_descriptor() {
    let metrics = crate::common::free_port();
    let extra = format!("envoy_shadow_mode: true\nmetrics: {{listen: \"127.0.0.1:{metrics}\"}}");
    let (server, mut c) = start(&config(&extra)).await;
    let other: &[(&str, &str)] = &[("remote_address", "198.51.100.7")];
    for _ in 0..4 {
        let r = ask(&mut c, "per_ip", &[other]).await;
        assert_eq!(seen(&r).0, OK, "shadow: never denies");
    }
    // Even the black list only counts.
    let banned: &[(&str, &str)] = &[("remote_address", "203.0.113.9")];
    assert_eq!(seen(&ask(&mut c, "per_ip", &[banned]).await).0, OK);
    let text = crate::common::metrics_get(metrics, "/metrics").await;
    for line in [
        r#"tollgate_shadow_denials_total{api="envoy",scope="per_ip",rule="remote_address"} 2"#,
        r#"tollgate_shadow_denials_total{api="envoy",scope="per_ip",rule="remote_address_203.0.113.9"} 1"#,
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
    drop((server, c));

    let (_server, mut c) = start(&config("envoy_quota_mode: true")).await;
    // Two addresses (2 an hour each) in one request act as quotas: with one
    // of them used up, the other carries the request.
    let a: &[(&str, &str)] = &[("remote_address", "192.0.2.1")];
    let b: &[(&str, &str)] = &[("remote_address", "192.0.2.2")];
    ask(&mut c, "per_ip", &[a]).await;
    ask(&mut c, "per_ip", &[a]).await;
    let r = ask(&mut c, "per_ip", &[a, b]).await;
    assert_eq!(seen(&r), (OK, vec![(OVER, 0), (OK, 1)]));
    let r = ask(&mut c, "per_ip", &[a, b]).await;
    assert_eq!(seen(&r), (OK, vec![(OVER, 0), (OK, 0)]));
    let r = ask(&mut c, "per_ip", &[a, b]).await;
    assert_eq!(seen(&r).0, OVER, "every quota over");
}

#[tokio::test]
async fn quota_mode_costs_a_second_store_call_only_when_some_quotas_are_over() {
    let metrics = crate::common::free_port();
    let extra = format!("metrics: {{listen: \"127.0.0.1:{metrics}\"}}");
    let (_server, mut c) = start(&config(&extra)).await;
    let calls = async || {
        let text = crate::common::metrics_get(metrics, "/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix("tollgate_store_duration_seconds_count "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let team: &[(&str, &str)] = &[("team_quota", "calls")];
    let org: &[(&str, &str)] = &[("org_quota", "calls")];
    // (overall, store calls): both have room; org over, team not; both over.
    for (want, want_calls) in [(OK, 1), (OK, 2), (OVER, 1)] {
        let before = calls().await;
        let r = ask(&mut c, "quota", &[team, org]).await;
        assert_eq!(seen(&r).0, want, "{r:?}");
        assert_eq!(calls().await - before, want_calls, "{r:?}");
    }
}

/// Upstream's `MERGE_DOMAIN_CONFIG`, as `envoy_merge_domains`.
#[tokio::test]
async fn merged_domains_draw_their_rules_from_every_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write =
        |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
    write(
        "a.yaml",
        "domain: m\ndescriptors:\n  - key: x\n    rate_limit: {unit: hour, requests_per_unit: 1}\n",
    );
    write(
        "b.yaml",
        "domain: m\ndescriptors:\n  - key: y\n    rate_limit: {unit: hour, requests_per_unit: 2}\n",
    );
    let yaml = |merge: bool| {
        format!(
            "envoy_merge_domains: {merge}\nenvoy_ratelimit_configs: [{:?}]\n",
            dir.path()
        )
    };
    let err = Config::from_yaml(&yaml(false))
        .expect_err("two files, one domain")
        .to_string();
    assert!(err.contains("domain: \"m\" is already defined in"), "{err}");
    let (_server, mut c) = start(&yaml(true)).await;
    let x: &[(&str, &str)] = &[("x", "1")];
    let y: &[(&str, &str)] = &[("y", "1")];
    assert_eq!(
        seen(&ask(&mut c, "m", &[x, y]).await),
        (OK, vec![(OK, 0), (OK, 1)])
    );
    assert_eq!(seen(&ask(&mut c, "m", &[x]).await).0, OVER);
    // A top-level key and value in two files is refused, naming both.
    write(
        "c.yaml",
        "domain: m\ndescriptors:\n  - key: x\n    rate_limit: {unit: hour, requests_per_unit: 5}\n",
    );
    let err = Config::from_yaml(&yaml(true))
        .expect_err("x twice")
        .to_string();
    assert!(
        err.contains(
            "c.yaml: descriptors[0]: repeats the key and value of a descriptor of domain \"m\" in"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_reload_applies_the_envoy_service_settings() {
    let yaml = |on: bool| {
        format!(
            "envoy_dynamic_metadata: {on}\nenvoy_shadow_mode: {on}\nenvoy_ratelimit_configs: [{:?}]\n",
            runtime_config_dir()
        )
    };
    let server = TestServer::start(&yaml(false)).await;
    let mut c = RateLimitServiceClient::connect(server.url())
        .await
        .expect("connect");
    let banned: &[(&str, &str)] = &[("remote_address", "203.0.113.9")];
    let r = ask(&mut c, "per_ip", &[banned]).await;
    assert_eq!((seen(&r).0, r.dynamic_metadata.is_some()), (OVER, false));
    server.reload(&yaml(true)).await;
    let mut last = (OVER, false);
    for _ in 0..50 {
        let r = ask(&mut c, "per_ip", &[banned]).await;
        last = (seen(&r).0, r.dynamic_metadata.is_some());
        if last == (OK, true) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        last,
        (OK, true),
        "shadow mode and dynamic metadata after the reload"
    );
}

/// Store timeouts for the Redis runs: the default 50 ms is what a
/// production store answers in, but a test machine busy with parallel builds
/// can exceed it, and the examples' scopes fail open, which would read as an
/// over-admission.
const TIMEOUTS: &str = "    response_timeout: 5s\n    wait_timeout: 5s\n";

#[tokio::test]
async fn the_corpus_decides_as_upstream_documents_on_a_redis_cluster() {
    let cluster = crate::common::redis::Cluster::start();
    let store = format!(
        "store:\n  kind: redis\n  redis:\n    mode: cluster\n    urls: {:?}\n    key_prefix: \"test:envoy-compat-cluster:\"\n{TIMEOUTS}",
        cluster.urls()
    );
    run_every_example(&config(&store)).await;
}
