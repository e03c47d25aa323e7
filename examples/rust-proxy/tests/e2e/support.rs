//! Real processes for the end-to-end tests: the `tollgate` binary on a free
//! port with a temp YAML config, the `rust-proxy` binary, and an upstream
//! HTTP server in the test's runtime. All are stopped on drop.
//!
//! Finding the binaries:
//! - `rust-proxy`: `CARGO_BIN_EXE_rust-proxy`, which cargo sets for tests of
//!   the package that owns the binary (this one) and builds first.
//! - `tollgate`: `$TOLLGATE_BIN` if set, else `tollgate` next to
//!   `rust-proxy` in the same target directory. `cargo test` at the
//!   workspace root builds it there (the server package has integration
//!   tests, so cargo builds its binary); with `cargo test -p rust-proxy`
//!   alone, run `cargo build --bin tollgate` first or set `TOLLGATE_BIN`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tempfile::TempDir;

/// The `tollgate` binary to start.
pub fn tollgate_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TOLLGATE_BIN") {
        return PathBuf::from(path);
    }
    let path = PathBuf::from(env!("CARGO_BIN_EXE_rust-proxy")).with_file_name("tollgate");
    assert!(
        path.exists(),
        "no Tollgate binary at {}: run `cargo build --bin tollgate` (or `cargo test` at the \
         workspace root, which builds it), or set TOLLGATE_BIN",
        path.display()
    );
    path
}

/// A port that was free a moment ago. Another process can take it before we
/// bind it, so callers retry.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Waits until something accepts connections at `addr`, or `child` exits.
/// True when it is up.
fn wait_until_listening(addr: SocketAddr, child: &mut Child, within: Duration) -> bool {
    let step = Duration::from_millis(20);
    let tries = within.as_millis() / step.as_millis();
    for _ in 0..tries {
        if TcpStream::connect_timeout(&addr, step).is_ok() {
            return true;
        }
        if matches!(child.try_wait(), Ok(Some(_))) {
            return false;
        }
        std::thread::sleep(step);
    }
    false
}

/// Polls `ready` every 20 ms for at most `within`.
fn wait_for(ready: impl Fn() -> bool, within: Duration) -> bool {
    let step = Duration::from_millis(20);
    for _ in 0..within.as_millis() / step.as_millis() {
        if ready() {
            return true;
        }
        std::thread::sleep(step);
    }
    false
}

/// A running `tollgate serve`.
#[derive(Debug)]
pub struct Tollgate {
    child: Child,
    pub addr: SocketAddr,
    dir: TempDir,
}

impl Tollgate {
    /// Starts Tollgate with `scopes` (the YAML of the `scopes:` key and
    /// anything else, without `listen`) on a free port.
    pub fn start(scopes: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("tollgate.yaml");
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            std::fs::write(&config, format!("listen: {addr}\n{scopes}")).expect("write config");
            let log = std::fs::File::create(dir.path().join("tollgate.log")).expect("log file");
            let mut command = Command::new(tollgate_bin());
            // Tollgate reads TOLLGATE_* variables that name a config
            // section as overrides (TOLLGATE_LISTEN would move it): the config is
            // the file written above and nothing else.
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("TOLLGATE_") {
                    command.env_remove(name);
                }
            }
            let mut child = command
                .arg("serve")
                .arg("--config")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .expect("start tollgate");
            // Something answering at `addr` may be another test's server
            // that took the same free port first (this one then exits on
            // its failed bind): only this child's own "serving" line, with
            // the address, says the port is ours.
            let ours = || {
                let needle = addr.to_string();
                self_log(&dir)
                    .lines()
                    .any(|l| l.contains("serving") && l.contains(&needle))
            };
            if wait_until_listening(addr, &mut child, Duration::from_secs(30))
                && wait_for(ours, Duration::from_secs(10))
                && matches!(child.try_wait(), Ok(None))
            {
                return Self { child, addr, dir };
            }
            // Lost the port to someone else, or a bad config: try again,
            // then show the log.
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("tollgate did not start; log:\n{}", self_log(&dir));
    }

    /// `HOST:PORT`, as the proxy's `--tollgate` takes it.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// Stops it for good (SIGKILL).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes it (SIGSTOP): connections stay open, nothing is answered.
    /// Returns once every thread is stopped: `kill` only queues the signal,
    /// and a thread still running could answer one more call.
    pub fn pause(&self) {
        self.signal("-STOP");
        let tasks = PathBuf::from(format!("/proc/{}/task", self.child.id()));
        let stopped = || {
            std::fs::read_dir(&tasks).is_ok_and(|dir| {
                dir.flatten().all(|task| {
                    // The state is the field after the parenthesised name.
                    std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                        stat.rsplit_once(") ")
                            .is_some_and(|(_, rest)| rest.starts_with(['T', 't']))
                    })
                })
            })
        };
        for _ in 0..200 {
            if stopped() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("tollgate did not stop within 2 s of SIGSTOP");
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        self_log(&self.dir)
    }
}

fn self_log(dir: &TempDir) -> String {
    std::fs::read_to_string(dir.path().join("tollgate.log")).unwrap_or_default()
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        self.resume_quietly();
        self.stop();
        if std::thread::panicking() {
            eprintln!("tollgate's log:\n{}", self.log());
        }
    }
}

impl Tollgate {
    fn resume_quietly(&self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
    }
}

/// A running `rust-proxy`.
#[derive(Debug)]
pub struct Proxy {
    child: Child,
    pub addr: SocketAddr,
}

impl Proxy {
    /// Starts rust-proxy with `args` (everything but `--listen`) on a port the
    /// OS picks, and learns the port from its first line of output.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rust-proxy"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rust-proxy");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let Some(addr) = line
            .trim()
            .strip_prefix("rust-proxy listening on ")
            .and_then(|a| a.parse().ok())
        else {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = stderr.read_to_string(&mut err);
            }
            let _ = child.kill();
            panic!("rust-proxy did not start ({read:?}): {line}{err}");
        };
        Self { child, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request the upstream received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When it arrived (its head; the body is read after).
    pub at: tokio::time::Instant,
}

/// An upstream HTTP server that answers 200 `upstream saw <path>` and
/// records every request.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .fallback(record)
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, seen, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(
    State(seen): State<Arc<Mutex<Vec<Seen>>>>,
    request: Request,
) -> (StatusCode, String) {
    let at = tokio::time::Instant::now();
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    seen.lock().expect("lock").push(Seen {
        method: parts.method,
        path: path.clone(),
        headers: parts.headers,
        body,
        at,
    });
    (StatusCode::OK, format!("upstream saw {path}"))
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// An HTTP/1.1 client for the tests.
#[derive(Clone, Debug)]
pub struct Http(HttpClient<HttpConnector, Full<Bytes>>);

impl Http {
    pub fn new() -> Self {
        Self(HttpClient::builder(TokioExecutor::new()).build_http())
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut request = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request.body(Full::new(body.into())).expect("request");
        let response = self.0.request(request).await.expect("HTTP request");
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.expect("body").to_bytes(),
        }
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(Method::GET, url, headers, Bytes::new()).await
    }

    pub async fn post(&self, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
        self.send(Method::POST, url, headers, body).await
    }
}

/// Sends a chunked POST (no Content-Length) of `len` bytes over a raw socket
/// and returns the status line, so a body cap is tested on a stream whose
/// size is not announced.
pub fn post_chunked(addr: SocketAddr, path: &str, len: usize) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    // The proxy may answer and close before it has read everything; a write
    // error then is expected, the status line is what counts.
    let _ = stream.write_all(head.as_bytes());
    let chunk = vec![b' '; 1024];
    let mut sent = 0;
    while sent < len {
        let n = chunk.len().min(len - sent);
        if stream.write_all(format!("{n:x}\r\n").as_bytes()).is_err()
            || stream.write_all(&chunk[..n]).is_err()
            || stream.write_all(b"\r\n").is_err()
        {
            break;
        }
        sent += n;
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).expect("status line");
    status.trim().to_owned()
}
