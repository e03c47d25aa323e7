//! End to end behind a real Envoy: Tollgate, a small upstream HTTP server and
//! Envoy started from `deploy/envoy/envoy.yaml` with free ports filled in.
//!
//! Envoy comes from `ENVOY_BIN` (printed by
//! `scripts/install-test-deps.sh`), else from where that script
//! installs it, else `envoy` on PATH. A missing Envoy fails these tests: CI
//! installs it, so a skip would hide a gap.

use crate::common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use http_body_util::Full;
use hyper::body::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate::config::Config;
use tollgate::pb::tollgate::v1::ShouldAllowRequest;
use tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient;
use tonic::transport::Channel;

/// The template's ports, in the order `Envoy::start` fills them.
const TEMPLATE_PORTS: [&str; 4] = [
    "port_value: 10000",
    "port_value: 8080",
    "port_value: 50051",
    "port_value: 9901",
];

pub(crate) fn envoy_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let installed =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-deps/envoy-venv/bin/envoy");
    if installed.is_file() {
        return installed;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("envoy"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "Envoy not found: set ENVOY_BIN to an envoy binary or put `envoy` on PATH \
             (scripts/install-test-deps.sh installs one; scripts/test.sh runs it)"
        )
    })
}

/// A running Envoy, killed on drop.
pub(crate) struct Envoy {
    pub(crate) child: Child,
    pub(crate) listen: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy from the deploy template, pointing at `upstream` and
    /// `rls`, after `edit` has had its way with the YAML.
    pub(crate) async fn start(
        upstream: SocketAddr,
        rls: SocketAddr,
        edit: impl Fn(String) -> String,
    ) -> Self {
        Self::start_with(upstream, rls, edit, &[]).await
    }

    /// [`Envoy::start`], with `extra` command-line arguments.
    async fn start_with(
        upstream: SocketAddr,
        rls: SocketAddr,
        edit: impl Fn(String) -> String,
        extra: &[&str],
    ) -> Self {
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy/envoy.yaml"),
        )
        .expect("read deploy/envoy/envoy.yaml");
        let (listen_port, admin_port) = (common::free_port(), common::free_port());
        let ports = [listen_port, upstream.port(), rls.port(), admin_port];
        let mut yaml = template;
        for (from, port) in TEMPLATE_PORTS.iter().zip(ports) {
            assert_eq!(
                yaml.matches(from).count(),
                1,
                "template must hold {from:?} once"
            );
            yaml = yaml.replace(from, &format!("port_value: {port}"));
        }
        let yaml = edit(yaml);
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, yaml).expect("write envoy.yaml");
        let log = dir.path().join("envoy.log");
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(&config)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
            ])
            .arg("--log-path")
            .arg(&log)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start Envoy ({}): {e}", envoy_binary().display()));
        let mut envoy = Self {
            child,
            listen: SocketAddr::from(([127, 0, 0, 1], listen_port)),
            log,
            _dir: dir,
        };
        envoy.wait_ready(admin_port).await;
        envoy
    }

    async fn wait_ready(&mut self, admin_port: u16) {
        let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
        for _ in 0..300 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("Envoy exited with {status}: {}", self.log_text());
            }
            if let Ok(r) = get(admin, "/ready", &[]).await
                && r.status == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("Envoy not ready after 15s: {}", self.log_text());
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response, as far as these tests care.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 GET: one request per connection.
pub(crate) async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {text:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Reply { status, headers })
}

/// The upstream service: 200 "ok" to everything. Each request header
/// `x-reply-<name>` comes back as the response header `<name>`, so that a
/// test can have the upstream report, say, the tokens a call used.
pub(crate) async fn start_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                    let mut reply = hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
                    for (name, value) in req.headers() {
                        if let Some(name) = name.as_str().strip_prefix("x-reply-") {
                            let name = hyper::header::HeaderName::from_bytes(name.as_bytes())
                                .expect("a header name");
                            reply.headers_mut().insert(name, value.clone());
                        }
                    }
                    Ok::<_, Infallible>(reply)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

const EDGE_LIMITS: &str = r#"
domain: edge
descriptors:
  - key: user
    rate_limit: { unit: second, requests_per_unit: 3 }
  - key: remote_address
    rate_limit: { unit: minute, requests_per_unit: 1000 }
  - key: api_key
    rate_limit: { unit: minute, requests_per_unit: 1 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_enforces_tollgate_limits_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = dir.path().join("edge.yaml");
    std::fs::write(&limits, EDGE_LIMITS).expect("write limits");
    let config = Config::from_yaml(&format!(
        "envoy_response_headers: true\nenvoy_ratelimit_configs: [{:?}]\n",
        limits
    ))
    .expect("config");
    let tollgate = common::tollgate::start_tollgate(config).await;
    let upstream = start_upstream().await;
    let envoy = Envoy::start(upstream, tollgate.addr, |y| y).await;
    let as_user = |user: &'static str| async move {
        get(envoy.listen, "/", &[("x-user-id", user)])
            .await
            .expect("request through Envoy")
    };

    // Warm Envoy's connection to Tollgate, so that alice's burst below is
    // not spread over the connection set-up while her bucket refills.
    assert_eq!(as_user("warm-up").await.status, 200);
    for left in ["2", "1", "0"] {
        let r = as_user("alice").await;
        assert_eq!(r.status, 200, "{r:?}\n{}", envoy.log_text());
        // Envoy adds Tollgate's headers to allowed responses too.
        assert_eq!(r.header("x-ratelimit-remaining"), Some(left), "{r:?}");
        assert_eq!(r.header("retry-after"), None, "{r:?}");
    }
    let denied = as_user("alice").await;
    assert_eq!(denied.status, 429, "{denied:?}");
    assert_eq!(
        denied.header("x-ratelimit-limit"),
        Some("3, 3;w=1"),
        "{denied:?}"
    );
    assert_eq!(
        denied.header("x-ratelimit-remaining"),
        Some("0"),
        "{denied:?}"
    );
    assert!(denied.header("x-ratelimit-reset").is_some(), "{denied:?}");
    // The draft-11 fields reach the client through Envoy too, the bucket
    // that denied first.
    let draft = |name| denied.header(name).unwrap_or_default();
    assert!(
        draft("ratelimit-policy").starts_with(r#""user";q=3;w=1"#),
        "{denied:?}"
    );
    assert!(
        draft("ratelimit").starts_with(r#""user";r=0;t=1"#),
        "{denied:?}"
    );
    let retry: u64 = denied
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no retry-after: {denied:?}"));
    assert_eq!(retry, 1);

    // Another user has buckets of their own.
    assert_eq!(as_user("bob").await.status, 200);

    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(
        as_user("alice").await.status,
        200,
        "alice after retry-after"
    );

    // Several descriptors: [user=dave], [remote_address], [api_key=k1]; the
    // api_key limit (1 a minute) is the tightest and denies the second.
    let with_key = || {
        get(
            envoy.listen,
            "/",
            &[("x-user-id", "dave"), ("x-api-key", "k1")],
        )
    };
    assert_eq!(with_key().await.expect("request").status, 200);
    let denied = with_key().await.expect("request");
    assert_eq!(denied.status, 429, "{denied:?}");
    assert_eq!(
        denied.header("x-ratelimit-limit"),
        Some("1, 1;w=60"),
        "{denied:?}"
    );
    assert_eq!(
        denied
            .header("retry-after")
            .map(|v| v.parse::<u64>().is_ok()),
        Some(true)
    );
    // dave's own bucket was not charged by the denial: two more pass.
    assert_eq!(as_user("dave").await.status, 200);
    assert_eq!(as_user("dave").await.status, 200);
}

const TAGGED_LIMITS: &str = r#"
domain: edge
descriptors:
  - key: user
    metadata:
      tier: standard
      owner: { team: edge }
    rate_limit: { unit: hour, requests_per_unit: 1 }
"#;

/// Envoy's HTTP connection manager, writing each request's status and the
/// rate-limit filter's dynamic metadata to `log`, one line per request.
fn with_access_log(yaml: String, log: &Path) -> String {
    let access_log = format!(
        r#"                stat_prefix: ingress
                access_log:
                  - name: envoy.access_loggers.file
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
                      path: {log:?}
                      log_format:
                        text_format_source:
                          inline_string: "%RESPONSE_CODE% %DYNAMIC_METADATA(envoy.filters.http.ratelimit)%\n"
"#
    );
    assert_eq!(
        yaml.matches(
            "                stat_prefix: ingress
"
        )
        .count(),
        1
    );
    yaml.replace(
        "                stat_prefix: ingress
",
        &access_log,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_logs_the_dynamic_metadata_tollgate_answers_with() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = dir.path().join("edge.yaml");
    std::fs::write(&limits, TAGGED_LIMITS).expect("write limits");
    let config = Config::from_yaml(&format!(
        "envoy_dynamic_metadata: true
envoy_ratelimit_configs: [{limits:?}]
"
    ))
    .expect("config");
    let tollgate = common::tollgate::start_tollgate(config).await;
    let upstream = start_upstream().await;
    let log = dir.path().join("access.log");
    let envoy = Envoy::start_with(
        upstream,
        tollgate.addr,
        |y| with_access_log(y, &log),
        &["--file-flush-interval-msec", "50"],
    )
    .await;
    let as_erin = || get(envoy.listen, "/", &[("x-user-id", "erin")]);
    assert_eq!(as_erin().await.expect("request").status, 200);
    assert_eq!(as_erin().await.expect("request").status, 429);
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if lines.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lines.len(), 2, "{lines:?}\n{}", envoy.log_text());
    let json = |line: &str| -> serde_json::Value {
        let (_, meta) = line.split_once(' ').expect("status and metadata");
        serde_json::from_str(meta).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    let (allowed, denied) = (json(&lines[0]), json(&lines[1]));
    assert!(
        lines[0].starts_with("200 ") && lines[1].starts_with("429 "),
        "{lines:?}"
    );
    assert_eq!(allowed["domain"], "edge", "{allowed}");
    let entries = &allowed["descriptors"][0]["entries"];
    assert!(
        entries
            .as_array()
            .is_some_and(|e| e.iter().any(|v| v == "user=erin")),
        "{allowed}"
    );
    assert_eq!(allowed["metadata"]["tier"], "standard", "{allowed}");
    assert_eq!(allowed["metadata"]["owner"]["team"], "edge", "{allowed}");
    // Over the limit, the rule did not pass: its metadata is not handed back.
    assert_eq!(denied["domain"], "edge", "{denied}");
    assert!(denied.get("metadata").is_none(), "{denied}");
}

/// An RLS that answers as the `x-user-id` descriptor says: a gRPC status
/// name, or `over` for OVER_LIMIT. It probes what Envoy does with each.
#[derive(Debug)]
struct ScriptedRls;

#[tonic::async_trait]
impl RateLimitService for ScriptedRls {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let req = request.into_inner();
        let user = req
            .descriptors
            .iter()
            .flat_map(|d| &d.entries)
            .find(|e| e.key == "user")
            .map(|e| e.value.clone())
            .unwrap_or_default();
        let code = match user.as_str() {
            "ok" => Code::Ok,
            "over" => Code::OverLimit,
            "unavailable" => return Err(tonic::Status::unavailable("store down")),
            "invalid" => return Err(tonic::Status::invalid_argument("bad descriptor")),
            "exhausted" => return Err(tonic::Status::resource_exhausted("busy")),
            "internal" => return Err(tonic::Status::internal("bug")),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Code::Ok
            }
            other => panic!("unexpected user {other:?}"),
        };
        Ok(tonic::Response::new(RateLimitResponse {
            overall_code: code.into(),
            ..RateLimitResponse::default()
        }))
    }
}

async fn start_scripted_rls() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RateLimitServiceServer::new(ScriptedRls))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

/// What the real Envoy answers clients for each RLS outcome, with
/// `failure_mode_deny` false (the template's) and true. Every gRPC error and
/// a timeout count as "the service failed": allowed, or 500 when denying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_applies_failure_mode_deny_to_every_grpc_error() {
    let rls = start_scripted_rls().await;
    let upstream = start_upstream().await;
    let open = Envoy::start(upstream, rls, |y| y).await;
    let closed = Envoy::start(upstream, rls, |y| {
        y.replace("failure_mode_deny: false", "failure_mode_deny: true")
    })
    .await;
    let expect = [
        ("ok", 200, 200),
        ("over", 429, 429),
        ("unavailable", 200, 500),
        ("invalid", 200, 500),
        ("exhausted", 200, 500),
        ("internal", 200, 500),
        ("slow", 200, 500),
    ];
    for (user, when_open, when_closed) in expect {
        let r = get(open.listen, "/", &[("x-user-id", user)])
            .await
            .expect("request");
        assert_eq!(r.status, when_open, "{user} with failure_mode_deny: false");
        let r = get(closed.listen, "/", &[("x-user-id", user)])
            .await
            .expect("request");
        assert_eq!(r.status, when_closed, "{user} with failure_mode_deny: true");
    }
}

/// Envoy's cluster for Tollgate, speaking mTLS with `client` and trusting `ca`.
fn with_mtls(yaml: String, dir: &Path) -> String {
    let socket = format!(
        r#"    - name: tollgate
      type: STATIC
      connect_timeout: 1s
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: localhost
          common_tls_context:
            alpn_protocols: ["h2"]
            tls_certificates:
              - certificate_chain: {{ filename: {client_cert} }}
                private_key: {{ filename: {client_key} }}
            validation_context:
              trusted_ca: {{ filename: {ca} }}
"#,
        client_cert = dir.join("envoy.pem").display(),
        client_key = dir.join("envoy.key").display(),
        ca = dir.join("ca.pem").display(),
    );
    let cluster = "    - name: tollgate\n      type: STATIC\n      connect_timeout: 1s\n";
    assert_eq!(
        yaml.matches(cluster).count(),
        1,
        "the template's tollgate cluster"
    );
    yaml.replace(cluster, &socket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_reaches_tollgate_over_mtls_as_a_named_caller() {
    use crate::common::certs::{Ca, TlsFiles};
    let ca = Ca::new("mesh");
    let files = TlsFiles::new(&ca.server(&[]), Some(&ca));
    let dir = files.dir.path().to_owned();
    let envoy_cert = ca.client("spiffe://test/ns/edge/sa/envoy");
    std::fs::write(dir.join("envoy.pem"), &envoy_cert.cert).expect("write");
    std::fs::write(dir.join("envoy.key"), &envoy_cert.key).expect("write");
    std::fs::write(dir.join("edge.yaml"), EDGE_LIMITS).expect("write limits");
    let config = |scopes: &str| {
        format!(
            "tls: {}\nenvoy_ratelimit_configs: [{:?}]\ncallers:\n  - {{name: envoy, san: spiffe://test/ns/edge/sa/envoy, scopes: [{scopes}]}}\n",
            files.yaml("10s"),
            dir.join("edge.yaml")
        )
    };
    let tollgate = common::TestServer::start(&config("edge")).await;
    let upstream = start_upstream().await;
    // Fail closed, so that a refused connection or call shows as a 500
    // rather than passing unlimited.
    let envoy = Envoy::start(upstream, tollgate.addr, |y| {
        with_mtls(y, &dir).replace("failure_mode_deny: false", "failure_mode_deny: true")
    })
    .await;
    let as_carol = || get(envoy.listen, "/", &[("x-user-id", "carol")]);
    assert_eq!(
        as_carol().await.expect("request").status,
        200,
        "{}",
        envoy.log_text()
    );
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(as_carol().await.expect("request").status);
    }
    // 3 a second: the fourth request within the second is limited.
    assert!(
        statuses.contains(&429),
        "{statuses:?}\n{}",
        envoy.log_text()
    );
    // Revoke the domain: PERMISSION_DENIED is an error to Envoy, which
    // (failing closed) answers 500 instead of passing the request.
    tollgate.reload(&config("other")).await;
    let mut status = 0;
    for _ in 0..100 {
        status = get(envoy.listen, "/", &[("x-user-id", "dan")])
            .await
            .expect("request")
            .status;
        if status == 500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 500, "{}", envoy.log_text());
}

/// Tollgate's side of the LLM-gateway routes: 10 tokens per user, refilled
/// over an hour, so that nothing refills while a test runs.
const LLM_LIMITS: &str = "
envoy_response_headers: true
scopes:
  - name: llm
    descriptor_keys: { identity: user }
    limits:
      - { name: tokens, per: identity, capacity: 10, refill_period: 1h }
";

/// One route's rate-limit action: the descriptor `[user=<x-user-id>]`.
const USER: &str = "actions: [{request_headers: {header_name: x-user-id, descriptor_key: user}}]";

/// Routes whose descriptors carry their own `hits_addend`, which Envoy only
/// sends from a route's `typed_per_filter_config`. Each is a path and its
/// `rate_limits` (flow YAML, `{user}` standing for [`USER`]):
/// - `/take` takes 1 (no `hits_addend`: the request's, 0, means 1);
/// - `/check` asks with `number: 0`: would one more pass? It takes nothing;
/// - `/refund` gives 3 back with `is_negative_hits`;
/// - `/chat` is an LLM call: a check on the request path, then, when the
///   stream is done, a charge of the usage the upstream reported in
///   `x-tokens-used`;
/// - `/reserve` takes an estimate of 5 up front and gives back, when the
///   stream is done, what the upstream reported unused in `x-tokens-unused`.
const LLM_ROUTES: [(&str, &str); 5] = [
    ("/take", "[{{user}}]"),
    ("/check", "[{{user}, hits_addend: {number: 0}}]"),
    (
        "/refund",
        "[{{user}, hits_addend: {number: 3, is_negative_hits: true}}]",
    ),
    (
        "/chat",
        "[{{user}, hits_addend: {number: 0}}, \
          {{user}, apply_on_stream_done: true, hits_addend: {format: '%RESP(x-tokens-used)%'}}]",
    ),
    (
        "/reserve",
        "[{{user}, hits_addend: {number: 5}}, \
          {{user}, apply_on_stream_done: true, \
           hits_addend: {format: '%RESP(x-tokens-unused)%', is_negative_hits: true}}]",
    ),
];

/// The template with its catch-all route replaced by [`LLM_ROUTES`], each
/// asking Tollgate's `llm` scope.
fn with_llm_routes(yaml: String) -> String {
    let catch_all = "                      routes:\n                        - match: { prefix: \"/\" }\n                          route: { cluster: upstream }\n";
    assert_eq!(yaml.matches(catch_all).count(), 1, "the template's route");
    let mut routes = String::from("                      routes:\n");
    for (path, rate_limits) in LLM_ROUTES {
        routes.push_str(&format!(
            r#"                        - match: {{ path: "{path}" }}
                          route: {{ cluster: upstream }}
                          typed_per_filter_config:
                            envoy.filters.http.ratelimit:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute
                              domain: llm
                              rate_limits: {}
"#,
            rate_limits.replace("{user}", USER)
        ));
    }
    yaml.replace(catch_all, &routes)
}

/// Tollgate, the upstream and Envoy with [`LLM_ROUTES`]; a `tollgate.v1`
/// client to look at a user's bucket without touching it.
struct LlmGateway {
    envoy: Envoy,
    client: RateLimiterClient<Channel>,
    _tollgate: common::TestServer,
}

impl LlmGateway {
    async fn start() -> Self {
        let tollgate = common::TestServer::start(LLM_LIMITS).await;
        let client = tollgate.client().await;
        let envoy = Envoy::start(start_upstream().await, tollgate.addr, with_llm_routes).await;
        Self {
            envoy,
            client,
            _tollgate: tollgate,
        }
    }

    /// `user` calls `path` through Envoy, with the upstream replying
    /// `reply` as extra headers.
    async fn call(&self, path: &str, user: &str, reply: &[(&str, &str)]) -> Reply {
        let headers: Vec<(String, String)> = reply
            .iter()
            .map(|(k, v)| (format!("x-reply-{k}"), (*v).to_owned()))
            .chain([("x-user-id".to_owned(), user.to_owned())])
            .collect();
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        get(self.envoy.listen, path, &headers)
            .await
            .unwrap_or_else(|e| panic!("{path} through Envoy: {e}"))
    }

    /// The tokens in `user`'s bucket, by a `tollgate.v1` dry run.
    async fn tokens(&mut self, user: &str) -> u64 {
        let dry = ShouldAllowRequest {
            dry_run: true,
            ..common::req("llm", user, "")
        };
        common::ask(&mut self.client, dry).await.remaining
    }

    /// `call`, which must pass.
    async fn allowed(&self, path: &str, user: &str, reply: &[(&str, &str)]) -> Reply {
        let r = self.call(path, user, reply).await;
        assert_eq!(
            r.status,
            200,
            "{path} as {user}: {r:?}\n{}",
            self.envoy.log_text()
        );
        r
    }

    /// Waits up to two seconds for `user`'s bucket to hold `want` tokens
    /// (Envoy sends stream-done descriptors after the client has its
    /// answer), failing with `why` if it does not.
    async fn expect_tokens(&mut self, user: &str, want: u64, why: &str) {
        let mut seen = self.tokens(user).await;
        for _ in 0..100 {
            if seen == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            seen = self.tokens(user).await;
        }
        assert_eq!(seen, want, "{user}: {why}\n{}", self.envoy.log_text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_hits_addend_zero_checks_without_taking_until_another_route_empties_the_bucket() {
    let mut gw = LlmGateway::start().await;
    for _ in 0..20 {
        let r = gw.allowed("/check", "alice", &[]).await;
        assert_eq!(r.header("x-ratelimit-remaining"), Some("10"), "{r:?}");
    }
    assert_eq!(gw.tokens("alice").await, 10, "20 checks took nothing");
    // Another route shares the bucket and takes from it; the check still
    // passes while a token is left, and sees the count go down.
    for left in (1..10).rev() {
        gw.allowed("/take", "alice", &[]).await;
        let r = gw.allowed("/check", "alice", &[]).await;
        assert_eq!(r.header("x-ratelimit-remaining"), Some(&*left.to_string()));
    }
    gw.allowed("/take", "alice", &[]).await;
    let denied = gw.call("/check", "alice", &[]).await;
    assert_eq!(denied.status, 429, "{denied:?}");
    assert!(denied.header("retry-after").is_some(), "{denied:?}");
    // Another user's check is not affected.
    gw.allowed("/check", "bob", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_negative_hits_give_tokens_back_after_a_denial_and_never_past_full() {
    let mut gw = LlmGateway::start().await;
    for _ in 0..10 {
        gw.allowed("/take", "carol", &[]).await;
    }
    assert_eq!(gw.call("/take", "carol", &[]).await.status, 429);
    // A refund is always OK, even on an empty bucket, and gives 3 back.
    gw.allowed("/refund", "carol", &[]).await;
    assert_eq!(gw.tokens("carol").await, 3);
    for _ in 0..3 {
        gw.allowed("/take", "carol", &[]).await;
    }
    assert_eq!(gw.call("/take", "carol", &[]).await.status, 429);

    // On a full bucket, or one missing less than 3, a refund stops at full.
    gw.allowed("/refund", "dave", &[]).await;
    assert_eq!(gw.tokens("dave").await, 10, "not 13");
    gw.allowed("/take", "dave", &[]).await;
    gw.allowed("/refund", "dave", &[]).await;
    assert_eq!(gw.tokens("dave").await, 10, "not 12");
    for _ in 0..10 {
        gw.allowed("/take", "dave", &[]).await;
    }
    assert_eq!(
        gw.call("/take", "dave", &[]).await.status,
        429,
        "full, not fuller"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_checks_an_llm_call_up_front_and_charges_its_reported_usage_when_done() {
    let mut gw = LlmGateway::start().await;
    let r = gw.allowed("/chat", "erin", &[("x-tokens-used", "6")]).await;
    // The check took nothing: the client saw the full bucket.
    assert_eq!(r.header("x-ratelimit-remaining"), Some("10"), "{r:?}");
    gw.expect_tokens("erin", 4, "6 charged at stream done")
        .await;
    // 4 left: the check passes, and the call uses them all.
    gw.allowed("/chat", "erin", &[("x-tokens-used", "4")]).await;
    gw.expect_tokens("erin", 0, "4 more charged").await;
    let denied = gw.call("/chat", "erin", &[("x-tokens-used", "1")]).await;
    assert_eq!(denied.status, 429, "{denied:?}");
    assert!(denied.header("retry-after").is_some(), "{denied:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_an_estimate_up_front_and_refunds_the_unused_part_when_done() {
    let mut gw = LlmGateway::start().await;
    let r = gw
        .allowed("/reserve", "fay", &[("x-tokens-unused", "3")])
        .await;
    assert_eq!(r.header("x-ratelimit-remaining"), Some("5"), "{r:?}");
    gw.expect_tokens("fay", 8, "5 taken, 3 given back at stream done")
        .await;
    // An estimate that went all unused is all given back.
    gw.allowed("/reserve", "fay", &[("x-tokens-unused", "5")])
        .await;
    gw.expect_tokens("fay", 8, "5 taken, all 5 given back")
        .await;
}
