//! `envoy.service.ratelimit.v3` over the wire, and envoyproxy/ratelimit YAML
//! loaded from files: a real Tollgate on `127.0.0.1:0`, a tonic client.

use crate::common;
use crate::common::envoy::descriptor;

use std::path::Path;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use tollgate::config::Config;
use tonic::transport::Channel;

const NATIVE: &str = r#"
unknown_scope: allow
envoy_response_headers: true
scopes:
  - name: api
    descriptor_keys: { identity: user, operation: path }
    limits:
      - name: per-user
        per: identity
        capacity: 3
        refill_period: 1h
      - name: search
        per: identity_operation
        operations: ["/search*"]
        capacity: 1
        refill_period: 1h
      - name: gold-trial
        per: identity
        when: { plan: trial }
        capacity: 1
        refill_period: 1h
        shadow: true
"#;

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_owned(),
        descriptors,
        hits_addend: 0,
    }
}

async fn client(config: &str) -> (common::tollgate::Tollgate, RateLimitServiceClient<Channel>) {
    let tollgate = common::tollgate::Tollgate::start(config).await;
    let client = RateLimitServiceClient::connect(format!("http://{}", tollgate.addr))
        .await
        .expect("connect");
    (tollgate, client)
}

async fn ask(c: &mut RateLimitServiceClient<Channel>, r: RateLimitRequest) -> RateLimitResponse {
    c.should_rate_limit(r).await.expect("answer").into_inner()
}

async fn refused(c: &mut RateLimitServiceClient<Channel>, r: RateLimitRequest) -> tonic::Status {
    c.should_rate_limit(r).await.expect_err("refused")
}

fn header<'a>(r: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

fn codes(r: &RateLimitResponse) -> Vec<Code> {
    r.statuses
        .iter()
        .map(|s| Code::try_from(s.code).expect("code"))
        .collect()
}

#[tokio::test]
async fn statuses_carry_the_limit_remaining_and_reset_then_deny() {
    let (_t, mut c) = client(NATIVE).await;
    for left in [2, 1, 0] {
        let r = ask(
            &mut c,
            request("api", vec![descriptor(&[("user", "alice")])]),
        )
        .await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        let s = &r.statuses[0];
        assert_eq!(s.code, Code::Ok as i32);
        let limit = s.current_limit.as_ref().expect("current_limit");
        assert_eq!(limit.name, "per-user");
        assert_eq!(
            (limit.requests_per_unit, limit.unit),
            (3, Unit::Hour as i32)
        );
        assert_eq!(s.limit_remaining, left);
        let reset = s.duration_until_reset.expect("reset");
        assert!(reset.seconds > 0 && reset.seconds <= 3600, "{reset:?}");
        assert_eq!(
            header(&r, "x-ratelimit-remaining"),
            Some(&*left.to_string())
        );
        assert_eq!(header(&r, "x-ratelimit-limit"), Some("3, 3;w=3600"));
        assert_eq!(header(&r, "retry-after"), None);
        // draft-ietf-httpapi-ratelimit-headers-11, on by default.
        assert_eq!(
            header(&r, "ratelimit-policy"),
            Some(r#""per-user";q=3;w=3600"#)
        );
        let state = header(&r, "ratelimit").expect("ratelimit");
        assert!(
            state.starts_with(&format!(r#""per-user";r={left};t="#)),
            "{state}"
        );
    }
    let r = ask(
        &mut c,
        request("api", vec![descriptor(&[("user", "alice")])]),
    )
    .await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(codes(&r), [Code::OverLimit]);
    // One token comes back every 20 minutes.
    assert_eq!(header(&r, "retry-after"), Some("1200"));
    assert_eq!(header(&r, "ratelimit"), Some(r#""per-user";r=0;t=1200"#));
    // Another identity has its own bucket.
    let r = ask(&mut c, request("api", vec![descriptor(&[("user", "bob")])])).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
}

#[tokio::test]
async fn the_draft_headers_can_be_turned_off_leaving_the_legacy_ones() {
    let config = NATIVE.replace(
        "envoy_response_headers: true",
        "envoy_response_headers: true\nenvoy_ratelimit_draft: \"off\"",
    );
    let (_t, mut c) = client(&config).await;
    let r = ask(
        &mut c,
        request("api", vec![descriptor(&[("user", "olga")])]),
    )
    .await;
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("2"));
    assert_eq!(header(&r, "ratelimit-policy"), None);
    assert_eq!(header(&r, "ratelimit"), None);
}

#[tokio::test]
async fn hits_addend_counts_at_both_levels_and_a_descriptor_s_zero_is_a_check() {
    let (_t, mut c) = client(NATIVE).await;
    let mut r = request("api", vec![descriptor(&[("user", "carol")])]);
    r.hits_addend = 2;
    assert_eq!(ask(&mut c, r).await.statuses[0].limit_remaining, 1);
    // A per-descriptor zero is a check: would one more hit pass? It takes
    // nothing, whatever the request's own hits_addend says.
    let mut d = descriptor(&[("user", "carol")]);
    d.hits_addend = Some(UInt64Value { value: 0 });
    let mut r = request("api", vec![d.clone()]);
    r.hits_addend = 2;
    for _ in 0..3 {
        let answer = ask(&mut c, r.clone()).await;
        assert_eq!(answer.overall_code, Code::Ok as i32);
        assert_eq!(answer.statuses[0].limit_remaining, 1);
    }
    // A request-level zero still means one.
    let r = request("api", vec![descriptor(&[("user", "carol")])]);
    assert_eq!(ask(&mut c, r).await.statuses[0].limit_remaining, 0);
    // Now empty: the check says so, and still takes nothing.
    let answer = ask(&mut c, request("api", vec![d])).await;
    assert_eq!(answer.overall_code, Code::OverLimit as i32);
    // More than the capacity can never pass: denied, and no retry-after.
    let mut d = descriptor(&[("user", "dan")]);
    d.hits_addend = Some(UInt64Value { value: 4 });
    let r = ask(&mut c, request("api", vec![d])).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(header(&r, "retry-after"), None);
    // Nothing overflows, however large: two huge hits on one shared bucket.
    let huge = || {
        let mut d = descriptor(&[("user", "dan")]);
        d.hits_addend = Some(UInt64Value { value: u64::MAX });
        d
    };
    let r = ask(&mut c, request("api", vec![huge(), huge()])).await;
    assert_eq!(codes(&r), [Code::OverLimit, Code::OverLimit]);
    let mut r = request("api", vec![descriptor(&[("user", "dan")])]);
    r.hits_addend = u32::MAX;
    assert_eq!(ask(&mut c, r).await.overall_code, Code::OverLimit as i32);
}

#[tokio::test]
async fn descriptors_are_decided_together_and_a_denial_takes_nothing() {
    let (_t, mut c) = client(NATIVE).await;
    let search = || descriptor(&[("user", "erin"), ("path", "/search?q=1")]);
    let plain = || descriptor(&[("user", "frank")]);
    let r = ask(&mut c, request("api", vec![plain(), search()])).await;
    assert_eq!(codes(&r), [Code::Ok, Code::Ok]);
    // erin's search limit (1) is spent: the request is denied and frank's
    // descriptor takes nothing, in request order.
    let r = ask(&mut c, request("api", vec![plain(), search()])).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(codes(&r), [Code::Ok, Code::OverLimit]);
    assert_eq!(
        r.statuses[1].current_limit.as_ref().map(|l| &*l.name),
        Some("search")
    );
    assert_eq!(r.statuses[0].limit_remaining, 2, "frank was not charged");
    let r = ask(&mut c, request("api", vec![plain()])).await;
    assert_eq!(r.statuses[0].limit_remaining, 1);
}

#[tokio::test]
async fn shadow_limits_answer_ok_even_when_exhausted() {
    let (_t, mut c) = client(NATIVE).await;
    let trial = || descriptor(&[("user", "gus"), ("plan", "trial")]);
    for _ in 0..3 {
        let r = ask(&mut c, request("api", vec![trial()])).await;
        assert_eq!(r.overall_code, Code::Ok as i32);
    }
    // The enforced per-user limit still denies.
    let r = ask(&mut c, request("api", vec![trial()])).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(
        r.statuses[0].current_limit.as_ref().map(|l| &*l.name),
        Some("per-user")
    );
}

#[tokio::test]
async fn unknown_domains_follow_unknown_scope() {
    let (_t, mut c) = client(NATIVE).await;
    let r = ask(&mut c, request("nope", vec![descriptor(&[("user", "a")])])).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses[0].current_limit, None);

    let deny = NATIVE.replace("unknown_scope: allow", "unknown_scope: deny");
    let (_t, mut c) = client(&deny).await;
    let r = ask(&mut c, request("nope", vec![descriptor(&[("user", "a")])])).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(codes(&r), [Code::OverLimit]);
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let (_t, mut c) = client(NATIVE).await;
    let ok = || descriptor(&[("user", "a")]);
    let cases = [
        (request("api", vec![]), "descriptors: must not be empty"),
        (request("", vec![ok()]), "domain: must not be empty"),
        (
            request("api", vec![ok(), descriptor(&[("user", &"v".repeat(300))])]),
            "descriptors[1].entries[0].value: is 300 bytes; the most allowed is 256",
        ),
        (
            request("api", vec![descriptor(&[("user", "a\u{7}")])]),
            "descriptors[0].entries[0].value: must not contain control characters",
        ),
        (
            request("api", vec![descriptor(&[("", "a")])]),
            "descriptors[0].entries[0].key: must not be empty",
        ),
        (
            request("api", vec![descriptor(&[])]),
            "descriptors[0].entries: must not be empty",
        ),
        (
            request("api", vec![ok(); 65]),
            "descriptors: has 65 entries",
        ),
        (
            request("api", vec![descriptor(&[("k", "v"); 17])]),
            "descriptors[0].entries: has 17 entries",
        ),
    ];
    for (req, want) in cases {
        let status = refused(&mut c, req).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(want),
            "{:?} !~ {want:?}",
            status.message()
        );
    }
    let mut d = ok();
    d.limit = Some(RateLimitOverride {
        requests_per_unit: 10,
        unit: Unit::Second as i32,
    });
    let status = refused(&mut c, request("api", vec![d])).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("descriptors[0].limit: per-descriptor limit overrides are not supported"),
        "{}",
        status.message()
    );
}

const RATELIMIT_YAML: &str = r#"
domain: shop
descriptors:
  # Every user: 2 per hour.
  - key: user
    rate_limit: { unit: hour, requests_per_unit: 2 }
    descriptors:
      # Each user's checkout: 1 per day.
      - key: path
        value: /checkout
        rate_limit: { unit: day, requests_per_unit: 1, name: checkout }
  # Internal callers are never limited.
  - key: user
    value: internal-*
    rate_limit: { unlimited: true }
  # A VIP has a limit of its own.
  - key: user
    value: vip
    rate_limit: { unit: minute, requests_per_unit: 5 }
    detailed_metric: true
"#;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

fn with_envoy_configs(paths: &[&Path]) -> String {
    let list: Vec<String> = paths.iter().map(|p| format!("  - {:?}\n", p)).collect();
    format!("envoy_ratelimit_configs:\n{}", list.concat())
}

#[tokio::test]
async fn envoyproxy_ratelimit_yaml_with_nested_descriptors_decides_as_documented() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "shop.yaml", RATELIMIT_YAML);
    write(dir.path(), "other.yml", "domain: other\ndescriptors: []\n");
    write(dir.path(), "README.txt", "not a config");
    let (_t, mut c) = client(&with_envoy_configs(&[dir.path()])).await;
    let mut go = async |entries: &[(&str, &str)]| {
        let r = ask(&mut c, request("shop", vec![descriptor(entries)])).await;
        let s = &r.statuses[0];
        (
            Code::try_from(r.overall_code).expect("code"),
            s.current_limit.as_ref().map(|l| l.name.clone()),
            s.limit_remaining,
        )
    };
    let hourly = Some("user".to_owned());
    assert_eq!(go(&[("user", "ann")]).await, (Code::Ok, hourly.clone(), 1));
    assert_eq!(go(&[("user", "ann")]).await, (Code::Ok, hourly.clone(), 0));
    assert_eq!(go(&[("user", "ann")]).await.0, Code::OverLimit);
    // Another value of the same key has its own bucket.
    assert_eq!(go(&[("user", "ben")]).await, (Code::Ok, hourly, 1));
    // The nested rule is a separate limit, per user.
    let checkout = Some("checkout".to_owned());
    assert_eq!(
        go(&[("user", "ann"), ("path", "/checkout")]).await,
        (Code::Ok, checkout.clone(), 0)
    );
    assert_eq!(
        go(&[("user", "ann"), ("path", "/checkout")]).await.0,
        Code::OverLimit
    );
    // A path the tree does not know has no limit.
    assert_eq!(
        go(&[("user", "ann"), ("path", "/cart")]).await,
        (Code::Ok, None, 0)
    );
    // Wildcard values and unlimited: all of an unlimited rule is left, as
    // envoyproxy/ratelimit reports it.
    for _ in 0..10 {
        assert_eq!(
            go(&[("user", "internal-batch")]).await,
            (Code::Ok, None, u32::MAX)
        );
    }
    // An exact value beats the any-value rule.
    assert_eq!(
        go(&[("user", "vip")]).await,
        (Code::Ok, Some("user_vip".to_owned()), 4)
    );
}

#[test]
fn a_domain_defined_twice_is_refused_naming_both_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = write(dir.path(), "a.yaml", RATELIMIT_YAML);
    let b = write(dir.path(), "b.yaml", RATELIMIT_YAML);
    let text = format!(
        "{}scopes:\n  - name: other\n",
        with_envoy_configs(&[&a, &b])
    );
    let err = Config::from_yaml(&text).expect_err("duplicate").to_string();
    assert!(
        err.contains(&format!(
            "{}: domain: \"shop\" is already defined in {}",
            b.display(),
            a.display()
        )),
        "{err}"
    );
    // A domain that is also a scope of Tollgate's own config.
    let c = write(dir.path(), "c.yaml", "domain: other\n");
    let err = Config::from_yaml(&format!(
        "{}scopes:\n  - name: other\n",
        with_envoy_configs(&[&c])
    ))
    .expect_err("duplicate")
    .to_string();
    assert!(
        err.contains("is already defined in scopes[0] of the Tollgate config"),
        "{err}"
    );
    // A field in the wrong place names its file and path.
    let d = write(
        dir.path(),
        "d.yaml",
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1, quota_mode: true}\n",
    );
    let err = Config::from_yaml(&with_envoy_configs(&[&d]))
        .expect_err("unsupported")
        .to_string();
    assert!(
        err.contains(&format!(
            "{}: descriptors[0].rate_limit.quota_mode: unknown field",
            d.display()
        )),
        "{err}"
    );
}

#[tokio::test]
async fn a_bad_envoy_file_on_reload_is_refused_and_the_old_rules_keep_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "shop.yaml", RATELIMIT_YAML);
    let text = with_envoy_configs(&[&file]);
    let (t, mut c) = client(&text).await;
    let ann = || request("shop", vec![descriptor(&[("user", "ann")])]);
    assert_eq!(ask(&mut c, ann()).await.statuses[0].limit_remaining, 1);
    write(
        dir.path(),
        "shop.yaml",
        "domain: shop\ndescriptors:\n  - key: user\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n",
    );
    t.reload(&text).await;
    // The reload is handled on the server's control task; give it a moment.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let r = ask(&mut c, ann()).await;
    assert_eq!(
        r.statuses[0].current_limit.as_ref().map(|l| &*l.name),
        Some("user")
    );
    assert_eq!(r.statuses[0].limit_remaining, 0);
}

const TIERS_YAML: &str = r#"
domain: tiers
descriptors:
  - key: user
    rate_limit: { unit: hour, requests_per_unit: 1, name: standard }
  - key: plan
    value: premium
    rate_limit: { unit: hour, requests_per_unit: 3, name: premium, replaces: [{ name: standard }] }
  - key: trial
    rate_limit: { unit: hour, requests_per_unit: 1 }
    shadow_mode: true
"#;

#[tokio::test]
async fn replaces_drops_the_named_limit_and_shadow_mode_never_denies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "tiers.yaml", TIERS_YAML);
    let (_t, mut c) = client(&with_envoy_configs(&[&file])).await;
    let amy = || descriptor(&[("user", "amy")]);
    let premium = || descriptor(&[("plan", "premium")]);
    for _ in 0..3 {
        let r = ask(&mut c, request("tiers", vec![amy(), premium()])).await;
        assert_eq!(codes(&r), [Code::Ok, Code::Ok]);
        // amy's descriptor has no limit left to report: premium replaced it.
        assert_eq!(r.statuses[0].current_limit, None);
    }
    let r = ask(&mut c, request("tiers", vec![amy(), premium()])).await;
    assert_eq!(codes(&r), [Code::Ok, Code::OverLimit]);
    // The standard limit was never charged while replaced.
    let r = ask(&mut c, request("tiers", vec![amy()])).await;
    assert_eq!(codes(&r), [Code::Ok]);
    let r = ask(&mut c, request("tiers", vec![amy()])).await;
    assert_eq!(codes(&r), [Code::OverLimit]);
    for _ in 0..3 {
        let r = ask(
            &mut c,
            request("tiers", vec![descriptor(&[("trial", "t1")])]),
        )
        .await;
        assert_eq!(r.overall_code, Code::Ok as i32);
    }
}

#[test]
fn a_replaces_naming_no_rule_loads_and_one_naming_its_own_rule_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Upstream loads a replaces that names nothing; it replaces nothing, and
    // check-config --envoy-compat says so.
    let file = write(
        dir.path(),
        "dangling.yaml",
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1, replaces: [{name: nope}]}\n",
    );
    let config = Config::from_yaml(&with_envoy_configs(&[&file])).expect("loads");
    assert!(
        config.envoy_domains[0].notes.iter().any(|n| n.contains(
            "descriptors[0].rate_limit.replaces[0].name: names no rate_limit of this file (\"nope\")"
        )),
        "{:?}",
        config.envoy_domains[0].notes
    );
    let file = write(
        dir.path(),
        "self.yaml",
        "domain: e\ndescriptors:\n  - key: k\n    rate_limit: {name: me, unit: second, requests_per_unit: 1, replaces: [{name: me}]}\n",
    );
    let err = Config::from_yaml(&with_envoy_configs(&[&file]))
        .expect_err("self-replacing")
        .to_string();
    assert!(
        err.contains("descriptors[0].rate_limit.replaces[0].name: names this rate_limit itself"),
        "{err}"
    );
}

#[test]
fn descriptor_keys_must_be_names() {
    let err =
        Config::from_yaml("scopes:\n  - name: api\n    descriptor_keys: { identity: \"\" }\n")
            .expect_err("empty key")
            .to_string();
    assert!(
        err.contains("scopes[0].descriptor_keys.identity: must not be empty"),
        "{err}"
    );
}

#[tokio::test]
async fn a_descriptor_without_its_identity_entry_never_shares_a_callers_bucket() {
    let (_t, mut c) = client(NATIVE).await;
    // No `user` entry: the whole descriptor is the identity. A caller whose
    // user value spells that descriptor out must not reach the same bucket.
    let anonymous = || request("api", vec![descriptor(&[("path", "/login")])]);
    let spoofing = || request("api", vec![descriptor(&[("user", "path=/login")])]);
    for _ in 0..3 {
        assert_eq!(codes(&ask(&mut c, spoofing()).await), [Code::Ok]);
    }
    assert_eq!(codes(&ask(&mut c, spoofing()).await), [Code::OverLimit]);
    // The descriptor's own bucket is untouched: three more pass.
    for _ in 0..3 {
        assert_eq!(codes(&ask(&mut c, anonymous()).await), [Code::Ok]);
    }
    assert_eq!(codes(&ask(&mut c, anonymous()).await), [Code::OverLimit]);
}

#[tokio::test]
async fn no_retry_after_when_one_descriptor_can_never_pass() {
    let (_t, mut c) = client(NATIVE).await;
    let search = || descriptor(&[("user", "gus"), ("path", "/search?q=1")]);
    assert_eq!(
        ask(&mut c, request("api", vec![search()]))
            .await
            .overall_code,
        Code::Ok as i32
    );
    // Alone, the spent search bucket promises a retry...
    let r = ask(&mut c, request("api", vec![search()])).await;
    assert!(header(&r, "retry-after").is_some(), "{r:?}");
    // ...but next to a descriptor whose cost exceeds its capacity, waiting
    // can never help, so no retry-after is promised.
    let mut over = descriptor(&[("user", "hal")]);
    over.hits_addend = Some(UInt64Value { value: 4 });
    let r = ask(&mut c, request("api", vec![search(), over])).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(header(&r, "retry-after"), None, "{r:?}");
}

const PRIORITIES: &str = r#"
scopes:
  - name: llm
    descriptor_keys: { identity: team, priority: priority }
    limits:
      - name: tokens
        per: identity
        capacity: 10
        refill_period: 1h
        headroom: { normal: 10%, sheddable: 30% }
"#;

fn with_hits(entries: &[(&str, &str)], hits: u64, negative: bool) -> RateLimitDescriptor {
    RateLimitDescriptor {
        hits_addend: Some(UInt64Value { value: hits }),
        is_negative_hits: negative,
        ..descriptor(entries)
    }
}

#[tokio::test]
async fn negative_hits_give_tokens_back_never_past_full_and_always_answer_ok() {
    let (_t, mut c) = client(PRIORITIES).await;
    let team = [("team", "a"), ("priority", "critical")];
    let r = ask(&mut c, request("llm", vec![with_hits(&team, 8, false)])).await;
    assert_eq!(r.statuses[0].limit_remaining, 2);
    // Envoy gives 5 back (say, at stream end, the real usage was lower).
    let back = ask(&mut c, request("llm", vec![with_hits(&team, 5, true)])).await;
    assert_eq!(back.overall_code, Code::Ok as i32);
    assert_eq!(back.statuses[0].limit_remaining, 7);
    // More than was ever taken: the bucket stops at full.
    let back = ask(&mut c, request("llm", vec![with_hits(&team, 50, true)])).await;
    assert_eq!(back.overall_code, Code::Ok as i32);
    assert_eq!(back.statuses[0].limit_remaining, 10);
    let r = ask(&mut c, request("llm", vec![with_hits(&team, 10, false)])).await;
    assert_eq!(r.overall_code, Code::Ok as i32, "full, not fuller");
    let r = ask(&mut c, request("llm", vec![with_hits(&team, 1, false)])).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
}

#[tokio::test]
async fn the_priority_entry_chooses_the_headroom_and_shares_one_bucket() {
    let (_t, mut c) = client(PRIORITIES).await;
    let as_ = |p: &'static str, hits| {
        request(
            "llm",
            vec![with_hits(&[("team", "b"), ("priority", p)], hits, false)],
        )
    };
    // SHEDDABLE may take 7 of 10, NORMAL 9, CRITICAL all: one bucket, since
    // the priority entry is not part of the identity.
    assert_eq!(
        ask(&mut c, as_("sheddable", 7)).await.overall_code,
        Code::Ok as i32
    );
    assert_eq!(
        ask(&mut c, as_("SHEDDABLE", 1)).await.overall_code,
        Code::OverLimit as i32
    );
    assert_eq!(
        ask(&mut c, as_("normal", 2)).await.overall_code,
        Code::Ok as i32
    );
    assert_eq!(
        ask(&mut c, as_("normal", 1)).await.overall_code,
        Code::OverLimit as i32
    );
    let last = ask(&mut c, as_("critical", 1)).await;
    assert_eq!(last.overall_code, Code::Ok as i32);
    assert_eq!(last.statuses[0].limit_remaining, 0);
    // No priority entry is NORMAL: 10 is more than it may ever take.
    let plain = request("llm", vec![with_hits(&[("team", "c")], 10, false)]);
    assert_eq!(
        ask(&mut c, plain).await.overall_code,
        Code::OverLimit as i32
    );
    // A value that names no priority is SHEDDABLE, never an error that
    // Envoy could turn into an unlimited pass: 8 is over its 7.
    let urgent = |hits| {
        request(
            "llm",
            vec![with_hits(
                &[("team", "c"), ("priority", "urgent!")],
                hits,
                false,
            )],
        )
    };
    assert_eq!(
        ask(&mut c, urgent(8)).await.overall_code,
        Code::OverLimit as i32
    );
    assert_eq!(ask(&mut c, urgent(7)).await.overall_code, Code::Ok as i32);
}

#[tokio::test]
async fn a_refund_of_nothing_gives_nothing_back() {
    let (_t, mut c) = client(PRIORITIES).await;
    let team = [("team", "z"), ("priority", "critical")];
    let r = ask(&mut c, request("llm", vec![with_hits(&team, 5, false)])).await;
    assert_eq!(r.statuses[0].limit_remaining, 5);
    let back = ask(&mut c, request("llm", vec![with_hits(&team, 0, true)])).await;
    assert_eq!(back.overall_code, Code::Ok as i32);
    assert_eq!(back.statuses[0].limit_remaining, 5);
}
