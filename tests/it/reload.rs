//! One reload snapshot, over the wire: a reload swaps the rules, the caller
//! grants, the Envoy header setting and `max_settle_within` together, so
//! under load and reloads back and forth no call is authorised by one
//! config and decided, explained or answered by the other.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor::Entry,
};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use parking_lot::Mutex;
use tollgate::pb::tollgate::v1::admin_client::AdminClient;
use tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient;
use tollgate::pb::tollgate::v1::{ExplainRequest, ShouldAllowBatchRequest, ShouldAllowRequest};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::common::{TestServer, req};

/// The caller whose grants the reloads move between scopes.
const X: &str = "x-token-5b1e";
/// A caller granted every scope under both configs, to see a reload land.
const PROBE: &str = "probe-token-c07d";
/// Reloads, alternating B, A, B, ...
const RELOADS: usize = 120;

/// The two configs a call can be consistent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Config {
    /// X may decide on `s1` and call the admin RPCs; limits are named
    /// `a-…`; Envoy answers carry headers; `settle_within` up to 1m.
    A,
    /// X may decide on `s2` only; limits are named `b-…`; no Envoy
    /// headers; `settle_within` up to 1h.
    B,
}

fn sha256_hex(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn yaml(config: Config) -> String {
    let (tag, scope, admin, headers, max) = match config {
        Config::A => ("a", "s1", true, true, "1m"),
        Config::B => ("b", "s2", false, false, "1h"),
    };
    let limit = |s: &str| {
        format!(
            "  - name: {s}\n    limits: [{{name: {tag}-{s}, per: identity, capacity: 10000000, refill_period: 1s}}]\n"
        )
    };
    format!(
        "envoy_response_headers: {headers}
reservations: {{max_settle_within: {max}}}
callers:
  - {{name: x, token_sha256: {}, scopes: [{scope}], batch: true, admin: {admin}}}
  - {{name: probe, token_sha256: {}, scopes: [\"*\"]}}
scopes:
{}{}",
        sha256_hex(X),
        sha256_hex(PROBE),
        limit("s1"),
        limit("s2"),
    )
}

fn with_token<T>(token: &str, body: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    let value = format!("Bearer {token}").parse().expect("ascii");
    r.metadata_mut().insert("authorization", value);
    r
}

/// Which config an answer is consistent with, or why it fits neither.
type Verdict = Result<Config, String>;

/// A refusal with `code` fits `config`; any other error fits neither.
fn refused(e: &Status, code: Code, config: Config) -> Verdict {
    if e.code() == code {
        Ok(config)
    } else {
        Err(format!("unexpected error {:?}: {}", e.code(), e.message()))
    }
}

/// An answer fits `config` when every rule it names is `config`'s.
fn named(rules: &[&str], want: &str, config: Config) -> Verdict {
    if !rules.is_empty() && rules.iter().all(|r| *r == want) {
        Ok(config)
    } else {
        Err(format!(
            "allowed as {config:?} but answered with rules {rules:?}"
        ))
    }
}

/// The kinds of call the load makes, each with the config its two possible
/// answers fit.
const KINDS: [&str; 8] = [
    "ShouldAllow s1",
    "ShouldAllow s2",
    "ShouldAllowBatch s1 atomic",
    "ShouldAllowBatch s2",
    "ShouldRateLimit s1",
    "ShouldRateLimit s2",
    "Explain s1",
    "ShouldAllow s2 settle_within 30m",
];

/// The clients one load task calls through.
struct Clients {
    ours: RateLimiterClient<Channel>,
    envoy: RateLimitServiceClient<Channel>,
    admin: AdminClient<Channel>,
}

impl Clients {
    async fn new(server: &TestServer) -> Self {
        let channel = server.channel().await;
        Self {
            ours: RateLimiterClient::new(channel.clone()),
            envoy: RateLimitServiceClient::new(channel.clone()),
            admin: AdminClient::new(channel),
        }
    }

    /// Makes call `kind` as X and judges its answer.
    async fn call(&mut self, kind: usize, who: &str) -> Verdict {
        let allow = |scope: &str| with_token(X, req(scope, who, "op"));
        match kind {
            0 => match self.ours.should_allow(allow("s1")).await {
                Ok(r) => named(&[&r.get_ref().rule], "a-s1", Config::A),
                Err(e) => refused(&e, Code::PermissionDenied, Config::B),
            },
            1 => match self.ours.should_allow(allow("s2")).await {
                Ok(r) => named(&[&r.get_ref().rule], "b-s2", Config::B),
                Err(e) => refused(&e, Code::PermissionDenied, Config::A),
            },
            2 | 3 => self.batch(kind == 2, who).await,
            4 | 5 => self.envoy(kind == 4, who).await,
            6 => self.explain(who).await,
            _ => {
                let reserve = ShouldAllowRequest {
                    settle_within: Some(prost_types::Duration {
                        seconds: 30 * 60,
                        nanos: 0,
                    }),
                    ..req("s2", who, "op")
                };
                match self.ours.should_allow(with_token(X, reserve)).await {
                    Ok(r) if r.get_ref().reservation.is_empty() => {
                        Err(format!("allowed without a reservation: {r:?}"))
                    }
                    Ok(r) => named(&[&r.get_ref().rule], "b-s2", Config::B),
                    // A's `max_settle_within` refuses it before its grant.
                    Err(e) => refused(&e, Code::InvalidArgument, Config::A),
                }
            }
        }
    }

    /// Two requests in one batch: on `s1` atomically (A), on `s2` each on
    /// its own (B).
    async fn batch(&mut self, s1: bool, who: &str) -> Verdict {
        let (scope, rule, config, other) = if s1 {
            ("s1", "a-s1", Config::A, Config::B)
        } else {
            ("s2", "b-s2", Config::B, Config::A)
        };
        let batch = ShouldAllowBatchRequest {
            requests: vec![req(scope, who, "op"), req(scope, "other", "op")],
            atomic: s1,
        };
        match self.ours.should_allow_batch(with_token(X, batch)).await {
            Ok(r) => {
                let rules: Vec<&str> = r.get_ref().responses.iter().map(|r| &*r.rule).collect();
                named(&rules, rule, config)
            }
            Err(e) => refused(&e, Code::PermissionDenied, other),
        }
    }

    /// Envoy's RLS: the rule in `current_limit`, and headers only under A.
    async fn envoy(&mut self, s1: bool, who: &str) -> Verdict {
        let (domain, rule, config, other) = if s1 {
            ("s1", "a-s1", Config::A, Config::B)
        } else {
            ("s2", "b-s2", Config::B, Config::A)
        };
        let request = RateLimitRequest {
            domain: domain.into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "user".into(),
                    value: who.into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        match self.envoy.should_rate_limit(with_token(X, request)).await {
            Ok(r) => {
                let r = r.into_inner();
                let headers = !r.response_headers_to_add.is_empty();
                if headers != (config == Config::A) {
                    return Err(format!(
                        "decided as {config:?}, but headers {}",
                        if headers { "on" } else { "off" }
                    ));
                }
                let rules: Vec<&str> = r
                    .statuses
                    .iter()
                    .filter_map(|s| s.current_limit.as_ref())
                    .map(|l| &*l.name)
                    .collect();
                named(&rules, rule, config)
            }
            Err(e) => refused(&e, Code::PermissionDenied, other),
        }
    }

    /// Admin's Explain of `s1`: only A grants X the admin RPCs, and both
    /// the limits and the dry run must be A's.
    async fn explain(&mut self, who: &str) -> Verdict {
        let request = ExplainRequest {
            request: Some(req("s1", who, "op")),
        };
        match self.admin.explain(with_token(X, request)).await {
            Ok(r) => {
                let r = r.into_inner();
                let mut rules: Vec<&str> = r.limits.iter().map(|l| &*l.rule).collect();
                rules.extend(r.decision.as_ref().map(|d| &*d.rule));
                named(&rules, "a-s1", Config::A)
            }
            Err(e) => refused(&e, Code::PermissionDenied, Config::B),
        }
    }
}

/// Asks as the probe until `s1`'s rule is `config`'s: the reload has
/// landed, and its file has been read.
async fn wait_for(probe: &mut RateLimiterClient<Channel>, config: Config) {
    let want = match config {
        Config::A => "a-s1",
        Config::B => "b-s1",
    };
    for _ in 0..2000 {
        let r = probe
            .should_allow(with_token(PROBE, req("s1", "probe", "op")))
            .await
            .expect("the probe may decide on every scope");
        if r.get_ref().rule == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("the reload to {config:?} never landed");
}

/// What the load saw: every kind under each config, and every answer that
/// fit neither.
#[derive(Default)]
struct Seen {
    configs: HashSet<(usize, Config)>,
    calls: usize,
    mixed: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_call_is_authorised_by_one_config_and_decided_by_another() {
    let server = TestServer::start(&yaml(Config::A)).await;
    let mut probe = server.client().await;
    wait_for(&mut probe, Config::A).await;
    let (stop, seen) = (Arc::new(AtomicBool::new(false)), Arc::default());
    let mut load = Vec::new();
    for task in 0..6 {
        let (stop, seen): (_, Arc<Mutex<Seen>>) = (stop.clone(), Arc::clone(&seen));
        let mut clients = Clients::new(&server).await;
        load.push(tokio::spawn(async move {
            // Bounded, whatever happens.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let who = format!("user-{task}");
            let mut kind = task;
            while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                kind = (kind + 1) % KINDS.len();
                let verdict = clients.call(kind, &who).await;
                let mut seen = seen.lock();
                seen.calls += 1;
                match verdict {
                    Ok(config) => {
                        seen.configs.insert((kind, config));
                    }
                    Err(why) => seen.mixed.push(format!("{}: {why}", KINDS[kind])),
                }
            }
        }));
    }
    for n in 0..RELOADS {
        let config = if n % 2 == 0 { Config::B } else { Config::A };
        server.reload(&yaml(config)).await;
        wait_for(&mut probe, config).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("load task");
    }
    let seen = seen.lock();
    assert!(
        seen.mixed.is_empty(),
        "{} of {} calls fit neither config, such as {:#?}",
        seen.mixed.len(),
        seen.calls,
        &seen.mixed[..seen.mixed.len().min(10)]
    );
    for (kind, name) in KINDS.iter().enumerate() {
        for config in [Config::A, Config::B] {
            assert!(
                seen.configs.contains(&(kind, config)),
                "{name} was never answered under {config:?} in {} calls",
                seen.calls
            );
        }
    }
}
