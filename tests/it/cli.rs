//! The `tollgate` binary: check-config, allow, serve with signals.

use crate::common;

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{TestServer, ask, free_port, req};
use tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

pub(crate) fn config_file(dir: &tempfile::TempDir, yaml: &str) -> std::path::PathBuf {
    let path = dir.path().join("tollgate.yaml");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(yaml.as_bytes()))
        .expect("write config");
    path
}

fn limits(capacity: u64) -> String {
    format!(
        "scopes:\n  - name: demo\n    limits:\n      - {{name: per-user, per: identity, capacity: {capacity}, refill_period: 1h}}\n"
    )
}

/// A `tollgate serve` child process, killed on drop.
pub(crate) struct Serve(pub(crate) Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig}");
}

pub(crate) async fn connect(port: u16) -> RateLimiterClient<tonic::transport::Channel> {
    for _ in 0..200 {
        if let Ok(c) = RateLimiterClient::connect(format!("http://127.0.0.1:{port}")).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("server on port {port} never came up");
}

pub(crate) fn serve(path: &std::path::Path, port: u16) -> Serve {
    Serve(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(path)
            // The environment override is part of what is tested here.
            .env("TOLLGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tollgate"),
    )
}

#[test]
fn check_config_prints_a_summary_of_the_example() {
    let out = Command::new(BIN)
        .args(["check-config", "deploy/tollgate.example.yaml"])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("scope github-mcp"), "{stdout}");
    assert!(stdout.contains("hash_tag scope,"), "{stdout}");
    assert!(
        stdout.contains("per-user-search: 5 per 1m per IdentityOperation"),
        "{stdout}"
    );
}

#[test]
fn check_config_envoy_compat_reports_each_file_and_what_differs() {
    let run = |dir: &str| {
        let out = Command::new(BIN)
            .args(["check-config", "--envoy-compat", dir])
            .output()
            .expect("run");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    // A runtime root: its <subdirectory>/config/ files are read.
    let (ok, stdout) = run("tests/corpus/envoy/runtime/current");
    assert!(ok, "{stdout}");
    for line in [
        "ratelimit/config/quota.yaml: loaded, domain \"quota\"",
        "  differs: descriptors[0].quota_mode:",
        "  differs: descriptors[0].detailed_metric: no per-value metric",
        "differs in every file:",
        "4 loaded, 0 refused",
    ] {
        assert!(stdout.contains(line), "{line} not in\n{stdout}");
    }
    let (ok, stdout) = run("tests/corpus/envoy/refused/duplicate-domain");
    assert!(!ok, "{stdout}");
    assert!(
        stdout.contains("b.yaml: refused\n  domain \"twice\" is already defined in"),
        "{stdout}"
    );
    let (ok, stdout) = run("tests/corpus/envoy/refused");
    assert!(!ok, "{stdout}");
    assert!(stdout.contains("self_replaces.yaml: refused\n"), "{stdout}");
    assert!(stdout.contains("duplicate-domain: skipped"), "{stdout}");
}

/// Runs `check-config` on `path`, asserts that it fails, and returns stderr.
fn check_config_fails(path: &std::path::Path) -> String {
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(path)
        .output()
        .expect("run");
    assert!(
        !out.status.success(),
        "check-config accepted {}",
        path.display()
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn check_config_names_every_bad_field_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config_file(
        &dir,
        "scopes:\n  - name: x\n    limits:\n      - {name: a, per: identity, capacity: 0, refill_period: 1s}\n      - {name: b, per: scope, capacity: 1, refill_period: 0s}\n",
    );
    let stderr = check_config_fails(&path);
    assert!(
        stderr.contains("scopes[0].limits[0].capacity: must be > 0"),
        "{stderr}"
    );
    assert!(
        stderr.contains("scopes[0].limits[1].refill_period: must be between"),
        "{stderr}"
    );

    let path = config_file(
        &dir,
        "scopes:\n  - name: x\n    limits:\n      - {name: a, per: everyone, capacity: 1, refill_period: 1s}\n",
    );
    let stderr = check_config_fails(&path);
    assert!(stderr.contains("scopes[0].limits[0].per"), "{stderr}");

    let path = config_file(&dir, "scopes:\n  - name: x\n    hash_tag: user\n");
    let stderr = check_config_fails(&path);
    assert!(
        stderr.contains("scopes[0].hash_tag: must be scope, identity or identity_operation"),
        "{stderr}"
    );
}

#[test]
fn serve_refuses_a_bad_config_before_binding_any_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config_file(&dir, "listen: 127.0.0.1:1\nscopes:\n  - name: \"\"\n");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // Port 1 would fail to bind as non-root; the error is the config's, not the bind's.
    assert!(
        stderr.contains("scopes[0].name: must not be empty"),
        "{stderr}"
    );
    assert!(!stderr.contains("binding"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_takes_a_lease_with_lease_id_and_prints_it() {
    let yaml = r#"
scopes:
  - name: streams
    limits:
      - {name: one-at-a-time, per: identity, concurrency: 1, max_lease: 1m}
"#;
    let server = TestServer::start(yaml).await;
    let run = |lease: &str| {
        Command::new(BIN)
            .args(["allow", "--addr", &server.url(), "--scope", "streams"])
            .args([
                "--identity",
                "kim",
                "--lease-id",
                lease,
                "--lease-ttl",
                "30s",
            ])
            .output()
            .expect("run")
    };
    let first = tokio::task::block_in_place(|| run("r1"));
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{stdout}");
    assert!(stdout.starts_with("ALLOWED"), "{stdout}");
    assert!(
        stdout.contains("lease r1 (one-at-a-time): held, 1/1 in flight"),
        "{stdout}"
    );
    // The pool holds one: another lease id is refused while r1 lives.
    let second = tokio::task::block_in_place(|| run("r2"));
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(stdout.starts_with("DENIED retry_after="), "{stdout}");
    assert!(
        stdout.contains("lease r2 (one-at-a-time): not held"),
        "{stdout}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_prints_the_decision() {
    let server = TestServer::start(&limits(1)).await;
    let run = |identity: &str| {
        Command::new(BIN)
            .args([
                "allow",
                "--addr",
                &server.url(),
                "--scope",
                "demo",
                "--identity",
                identity,
                "--operation",
                "read",
            ])
            .output()
            .expect("run")
    };
    let first = tokio::task::block_in_place(|| run("kim"));
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{stdout}");
    assert!(
        stdout.starts_with("ALLOWED rule=per-user limit=1 remaining=0"),
        "{stdout}"
    );
    let second = tokio::task::block_in_place(|| run("kim"));
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(stdout.starts_with("DENIED retry_after="), "{stdout}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_and_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config_file(&dir, &format!("drain_delay: 500ms\n{}", limits(1_000_000)));
    let port = free_port();
    let mut child = serve(&path, port);
    let client = connect(port).await;

    // Callers keep calling through the signal. A call may be refused before
    // it starts, but none may fail any other way, and calls keep completing
    // during the drain delay.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let signalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..8)
        .map(|i| {
            let mut c = client.clone();
            let (stop, signalled) = (stop.clone(), signalled.clone());
            tokio::spawn(async move {
                let mut ok_after_signal = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let after = signalled.load(std::sync::atomic::Ordering::SeqCst);
                    match c.should_allow(req("demo", &format!("u{i}"), "op")).await {
                        Ok(r) => {
                            assert!(r.into_inner().allowed);
                            ok_after_signal += u32::from(after);
                        }
                        Err(s) if refused_before_start(&s) => {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(s) => panic!("a call failed: {s:?}"),
                    }
                }
                ok_after_signal
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(&child.0, "-TERM");
    signalled.store(true, std::sync::atomic::Ordering::SeqCst);
    let status = tokio::task::spawn_blocking(move || {
        let status = child.0.wait().expect("wait");
        (status, child)
    });
    let (status, _child) = tokio::time::timeout(Duration::from_secs(10), status)
        .await
        .expect("exits within 10s")
        .expect("join");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut ok = 0;
    for c in callers {
        ok += c.await.expect("caller");
    }
    assert!(status.success(), "exit status {status:?}");
    assert!(ok > 0, "calls are still served during the drain delay");
}

/// How a call looks when the server refused it before starting it: no
/// connection (UNAVAILABLE), or the connection's GOAWAY reached the client
/// before the request went out (CANCELLED, or hyper's GoAway error for a
/// stream above the server's last-stream-id, which it never processed).
fn refused_before_start(s: &tonic::Status) -> bool {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled => true,
        tonic::Code::Internal => format!("{s:?}").contains("GoAway"),
        _ => false,
    }
}

/// Opens a raw HTTP/2 stream to the server on `port` and sends only the
/// headers of a `ShouldAllow`: the call has started, its body not yet sent.
async fn start_call(port: u16) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("tcp");
    let (mut h2, mut connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let mut ping_pong = connection.ping_pong().expect("ping handle");
    tokio::spawn(connection);
    let request = http::Request::post(format!(
        "http://127.0.0.1:{port}/tollgate.v1.RateLimiter/ShouldAllow"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .expect("request");
    let call = h2.send_request(request, false).expect("send headers");
    // The server reads frames in order, so once it answers a PING sent after
    // the HEADERS, the call has started on its side: a signal sent now finds
    // it in flight, however slow the machine.
    ping_pong
        .ping(h2::Ping::opaque())
        .await
        .expect("ping answered");
    call
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_when_sigterm_arrives_still_completes() {
    use prost::Message as _;
    use tollgate::pb::tollgate::v1::{ShouldAllowRequest, ShouldAllowResponse};

    let dir = tempfile::tempdir().expect("tempdir");
    let path = config_file(&dir, &limits(10));
    let port = free_port();
    let mut child = serve(&path, port);
    let _ready = connect(port).await;

    // The call has started, and its body is still on its way.
    let (response, mut body) = start_call(port).await;

    signal(&child.0, "-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Now finish the request: the server must still answer it in full.
    let message = ShouldAllowRequest {
        scope: "demo".into(),
        identity: "late".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    body.send_data(bytes::Bytes::from(frame), true)
        .expect("send body");

    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("answered")
        .expect("response");
    assert_eq!(response.status(), 200);
    let mut stream = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = stream.data().await {
        let chunk = chunk.expect("data");
        let _ = stream.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = stream
        .trailers()
        .await
        .expect("trailers")
        .expect("grpc trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..]),
        "{trailers:?}"
    );
    let answer = ShouldAllowResponse::decode(&data[5..]).expect("a ShouldAllowResponse");
    assert!(answer.allowed);
    assert_eq!((answer.rule.as_str(), answer.remaining), ("per-user", 9));

    let status = tokio::task::spawn_blocking(move || child.0.wait().expect("wait"))
        .await
        .expect("join");
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn sighup_reloads_a_good_config_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config_file(&dir, &limits(3));
    let port = free_port();
    let child = serve(&path, port);
    let mut c = connect(port).await;
    assert_eq!(ask(&mut c, req("demo", "lee", "op")).await.limit, 3);

    // A bad file is refused; the old rules keep serving.
    config_file(&dir, &limits(0));
    signal(&child.0, "-HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ask(&mut c, req("demo", "lee", "op")).await.limit, 3);

    config_file(&dir, &limits(7));
    signal(&child.0, "-HUP");
    assert_eq!(common::wait_for_limit(&mut c, "demo", "lee", 7).await, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_still_running_when_the_shutdown_grace_ends_is_cancelled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config_file(&dir, &format!("shutdown_grace: 500ms\n{}", limits(10)));
    let port = free_port();
    let mut child = serve(&path, port);
    let _ready = connect(port).await;

    // A call whose body never comes: without a bound, the server would wait
    // for it forever after SIGTERM.
    let (response, _body) = start_call(port).await;

    let asked = tokio::time::Instant::now();
    signal(&child.0, "-TERM");
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || child.0.wait().expect("wait")),
    )
    .await
    .expect("exits once the grace has run out, not never")
    .expect("join");
    let took = asked.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took >= Duration::from_millis(500),
        "the call had its grace first: exited after {took:?}"
    );
    // The stuck call got no answer: its connection was closed under it.
    let answer = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("the stream ends");
    assert!(answer.is_err(), "cancelled, not answered: {answer:?}");
}

/// Issue 9, finding 8: a reload that changes a setting only a restart can
/// apply says so (it used to be silently ignored), and human-format logs
/// written to a pipe or a file carry no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_restart_only_settings_and_piped_logs_have_no_colour() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config_file(&dir, &limits(3));
    let port = free_port();
    let mut child = serve(&path, port);
    let mut c = connect(port).await;
    assert_eq!(ask(&mut c, req("demo", "lee", "op")).await.limit, 3);

    config_file(
        &dir,
        &format!("log: {{level: debug}}\ndrain_delay: 1ms\n{}", limits(4)),
    );
    signal(&child.0, "-HUP");
    assert_eq!(common::wait_for_limit(&mut c, "demo", "lee", 4).await, 4);
    signal(&child.0, "-TERM");
    let mut stderr = child.0.stderr.take().expect("piped");
    let log = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).expect("read");
        text
    })
    .await
    .expect("join");
    assert!(
        log.contains("take effect only on restart") && log.contains("settings=log"),
        "{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a piped log: {log:?}"
    );
}

/// Runs `check-config` on `path` with `env` set; its status and output.
fn check_config_with_env(path: &std::path::Path, env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(path)
        .envs(env.iter().copied())
        .output()
        .expect("run");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn a_harness_variable_that_names_no_section_is_ignored_with_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config_file(&dir, &limits(3));
    // Test harnesses and wrappers export such names for their own use.
    let (ok, text) = check_config_with_env(
        &path,
        &[
            ("TOLLGATE_BIN", "/usr/local/bin/tollgate"),
            ("TOLLGATE_FAILURE_MODE", "closed"),
        ],
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("TOLLGATE_BIN") && text.contains("ignored"),
        "{text}"
    );
    // Under a known section, a typo is still refused with its path.
    let (ok, text) = check_config_with_env(&path, &[("TOLLGATE_STORE__KIDN", "memory")]);
    assert!(!ok, "{text}");
    assert!(text.contains("store: unknown field `kidn`"), "{text}");
    // And a bad value of a known key, as before.
    let (ok, text) = check_config_with_env(&path, &[("TOLLGATE_FAILURE_MODE", "sideways")]);
    assert!(!ok, "{text}");
    assert!(text.contains("failure_mode"), "{text}");
}
