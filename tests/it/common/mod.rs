//! Shared test fixtures: a real Tollgate server on 127.0.0.1:0, and a free
//! port for what must be told its port before it starts.
#![allow(dead_code, unreachable_pub)]

pub mod certs;
pub mod envoy;
pub mod proxy;
pub mod redis;
pub mod store;
pub mod tollgate;
pub mod webdriver;

use std::time::Duration;

use ::tollgate::config::{Config, ConfigSource};
use ::tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient;
use ::tollgate::pb::tollgate::v1::{ShouldAllowRequest, ShouldAllowResponse};
use ::tollgate::server::{self, Prepared, ServerError};
use ::tollgate::shutdown::Control;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// A server running in this test's runtime; shut down on drop.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub control: mpsc::Sender<Control>,
    pub task: Option<tokio::task::JoinHandle<Result<(), ServerError>>>,
    /// The config file a reload reads, when started from YAML.
    config_file: Option<tempfile::NamedTempFile>,
}

impl TestServer {
    /// Starts a server on a free port with the YAML config `yaml`, written to
    /// a file so that [`TestServer::reload`] works as SIGHUP does.
    pub async fn start(yaml: &str) -> Self {
        let file = tempfile::NamedTempFile::new().expect("temp config file");
        std::fs::write(file.path(), yaml).expect("write config");
        let source = ConfigSource::new(file.path(), std::iter::empty());
        let prepared = Prepared::load(source).expect("test config is valid");
        let mut server = Self::start_prepared(prepared).await;
        server.config_file = Some(file);
        server
    }

    /// Starts a server with a config built in code; it cannot be reloaded.
    pub async fn start_config(config: Config) -> Self {
        let prepared = Prepared::new(config, None).expect("test config is valid");
        Self::start_prepared(prepared).await
    }

    async fn start_prepared(prepared: Prepared) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (control, task) = server::spawn(prepared, listener);
        Self {
            addr,
            control,
            task: Some(task),
            config_file: None,
        }
    }

    /// Wraps a server already spawned on `addr` (a test that watches its
    /// task end when it refuses to start).
    pub fn spawned(
        addr: std::net::SocketAddr,
        control: mpsc::Sender<Control>,
        task: tokio::task::JoinHandle<Result<(), ServerError>>,
    ) -> Self {
        Self {
            addr,
            control,
            task: Some(task),
            config_file: None,
        }
    }

    /// Rewrites the config file with `yaml` and asks for a reload, as SIGHUP
    /// does. The reload happens on the server's control task, soon after.
    pub async fn reload(&self, yaml: &str) {
        let file = self.config_file.as_ref().expect("started from YAML");
        std::fs::write(file.path(), yaml).expect("write config");
        self.control.send(Control::Reload).await.expect("reload");
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        // The server task may not have polled its listener yet; connecting
        // still succeeds because the socket is already bound and listening.
        Channel::from_shared(self.url())
            .expect("url")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect")
    }

    pub async fn client(&self) -> RateLimiterClient<Channel> {
        RateLimiterClient::new(self.channel().await)
    }

    /// Asks the server to stop and waits until it has.
    pub async fn shutdown(mut self) {
        let _ = self.control.send(Control::Shutdown).await;
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server ran cleanly");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A loopback port that is free now (the system's pick), for a process or
/// config that must be given its port rather than bind port 0 itself.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The body of `GET path` on the metrics port `port` of a server that may
/// still be starting: the gRPC port is bound before the server starts, the
/// metrics port only as it starts, so this gives it a moment.
pub async fn metrics_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = None;
    for _ in 0..100 {
        if let Ok(conn) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            s = Some(conn);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut s = s.expect("metrics port");
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("read");
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// A token's SHA-256 in hex, as a caller grant names it in the config.
pub fn sha256_hex(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `body` as a request carrying `authorization: Bearer <token>`.
pub fn with_token<T>(token: &str, body: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    let value = format!("Bearer {token}").parse().expect("header value");
    r.metadata_mut().insert("authorization", value);
    r
}

/// A request of cost 1.
pub fn req(scope: &str, identity: &str, operation: &str) -> ShouldAllowRequest {
    ShouldAllowRequest {
        scope: scope.into(),
        identity: identity.into(),
        operation: operation.into(),
        ..Default::default()
    }
}

pub async fn ask(
    client: &mut RateLimiterClient<Channel>,
    r: ShouldAllowRequest,
) -> ShouldAllowResponse {
    client
        .should_allow(r)
        .await
        .expect("call succeeds")
        .into_inner()
}

pub fn to_std(d: &Option<prost_types::Duration>) -> Option<Duration> {
    d.as_ref()
        .map(|d| Duration::new(d.seconds as u64, d.nanos as u32))
}

/// Asks until `identity`'s answer reports capacity `want` (a reload has
/// taken effect), for up to two seconds; returns the last limit seen.
pub async fn wait_for_limit(
    client: &mut RateLimiterClient<Channel>,
    scope: &str,
    identity: &str,
    want: u64,
) -> u64 {
    let mut limit = 0;
    for _ in 0..100 {
        limit = ask(client, req(scope, identity, "op")).await.limit;
        if limit == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    limit
}
