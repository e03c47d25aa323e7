//! Real Redis topologies for tests: Debian's `redis-server` and
//! `redis-sentinel` on free loopback ports in temp dirs, killed on drop.
#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use tempfile::TempDir;
use tollgate::config::{RedisConfig, RedisMode};
use tollgate::store::redis::RedisStore;

/// Polls `f` every 50 ms until it returns true or `within` passes.
pub fn wait_until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let tries = within.as_millis() / 50;
    for _ in 0..tries {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {within:?} waiting for {what}");
}

/// A port `p` such that `p` and `p + 10000` (Cluster's bus) are free now.
/// Both stay below Linux's ephemeral range (32768 and up), so no outgoing
/// connection of a parallel test can take one between this check and the
/// server's bind.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let seed = (std::process::id() % 400) as u16 * 20;
    loop {
        let p = 20_000 + (seed + NEXT.fetch_add(1, Ordering::Relaxed)) % 2_760;
        if TcpListener::bind(("127.0.0.1", p)).is_ok()
            && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok()
        {
            return p;
        }
    }
}

/// A synchronous connection for checks and administration.
pub fn conn(port: u16) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))?
        .get_connection_with_timeout(Duration::from_millis(500))
}

/// `CLUSTER MYID` of the node on `port`.
pub fn node_id(port: u16) -> String {
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query(&mut conn(port).unwrap())
        .unwrap()
}

/// `EVALSHA` calls the nodes on `ports` ran since they started (or since
/// their stats were reset), summed.
pub fn evalsha_calls(ports: &[u16]) -> u64 {
    ports
        .iter()
        .map(|&port| {
            let stats: String = redis::cmd("INFO")
                .arg("commandstats")
                .query(&mut conn(port).unwrap())
                .unwrap();
            stats
                .lines()
                .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
                .and_then(|r| r.split(',').next()?.parse().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// One `redis-server` (or `redis-sentinel`) process.
#[derive(Debug)]
pub struct Server {
    pub port: u16,
    dir: PathBuf,
    program: &'static str,
    args: Vec<String>,
    child: Option<Child>,
}

impl Server {
    fn spawn(program: &'static str, dir: &Path, port: u16, args: Vec<String>) -> Self {
        let dir = dir.join(port.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Self {
            port,
            dir,
            program,
            args,
            child: None,
        };
        s.start();
        s
    }

    /// Starts a data node.
    pub fn redis(dir: &Path, port: u16, extra: &[&str]) -> Self {
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn("redis-server", dir, port, args)
    }

    /// Starts a sentinel whose `sentinel.conf` is `conf` (port and bind
    /// lines are added).
    pub fn sentinel(dir: &Path, port: u16, conf: &str) -> Self {
        let sdir = dir.join(port.to_string());
        std::fs::create_dir_all(&sdir).unwrap();
        std::fs::write(
            sdir.join("sentinel.conf"),
            format!("port {port}\nbind 127.0.0.1\nprotected-mode no\n{conf}"),
        )
        .unwrap();
        Self::spawn("redis-sentinel", dir, port, Vec::new())
    }

    /// (Re)starts the process with its original arguments, and waits for PING.
    pub fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("log")).unwrap();
        let mut cmd = Command::new(self.program);
        if self.program == "redis-sentinel" {
            cmd.arg(self.dir.join("sentinel.conf"));
        }
        let child = cmd
            .args(&self.args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{} not runnable ({e}); run scripts/install-test-deps.sh",
                    self.program
                )
            });
        self.child = Some(child);
        let port = self.port;
        // Any answer will do, NOAUTH included: the server is up.
        wait_until(Duration::from_secs(10), "redis to answer PING", || {
            conn(port).is_ok_and(|mut c| match redis::cmd("PING").query::<String>(&mut c) {
                Ok(_) => true,
                Err(e) => !e.is_io_error() && !e.is_connection_refusal(),
            })
        });
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the process: SIGSTOP makes a
    /// server that keeps its sockets open but never answers.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("running");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// SIGKILLs the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A stopped process still dies of SIGKILL.
        self.kill();
    }
}

/// The store settings tests use: a unique key prefix, short timeouts.
pub fn store_config(mode: RedisMode, urls: Vec<String>, prefix: &str) -> RedisConfig {
    RedisConfig {
        mode,
        urls,
        master_name: (mode == RedisMode::Sentinel).then(|| "mymaster".to_owned()),
        key_prefix: format!("test:{prefix}:"),
        response_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        wait_timeout: Duration::from_millis(500),
        breaker_cool_down: Duration::from_millis(200),
        ..RedisConfig::default()
    }
}

/// One standalone server.
#[derive(Debug)]
pub struct Standalone {
    pub server: Server,
    _dir: TempDir,
}

impl Standalone {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::redis(dir.path(), free_port(), &[]);
        Self { server, _dir: dir }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.server.port)
    }

    pub fn config(&self, prefix: &str) -> RedisConfig {
        store_config(RedisMode::Standalone, vec![self.url()], prefix)
    }

    pub fn store(&self, prefix: &str) -> RedisStore {
        RedisStore::new(&self.config(prefix)).unwrap()
    }
}

/// One primary, one replica, three sentinels (quorum 2).
#[derive(Debug)]
pub struct Sentinel {
    pub primary: Server,
    pub replica: Server,
    pub sentinels: Vec<Server>,
    _dir: TempDir,
}

impl Sentinel {
    pub fn start() -> Self {
        let p = free_port();
        Self::start_at(p, p)
    }

    /// Starts the primary on `p`, and has the sentinels (and so clients)
    /// reach it at `monitor` (a fault proxy in front of it, say).
    pub fn start_at(p: u16, monitor: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let primary = Server::redis(dir.path(), p, &[]);
        let replica = Server::redis(
            dir.path(),
            free_port(),
            &["--replicaof", "127.0.0.1", &p.to_string()],
        );
        let sentinels: Vec<Server> = (0..3)
            .map(|_| {
                let port = free_port();
                let sdir = dir.path().join(port.to_string());
                std::fs::create_dir_all(&sdir).unwrap();
                std::fs::write(
                    sdir.join("sentinel.conf"),
                    format!(
                        "port {port}\nbind 127.0.0.1\nprotected-mode no\n\
                         sentinel monitor mymaster 127.0.0.1 {monitor} 2\n\
                         sentinel down-after-milliseconds mymaster 1000\n\
                         sentinel failover-timeout mymaster 3000\n\
                         sentinel parallel-syncs mymaster 1\n"
                    ),
                )
                .unwrap();
                Server::spawn("redis-sentinel", dir.path(), port, Vec::new())
            })
            .collect();
        let s = Self {
            primary,
            replica,
            sentinels,
            _dir: dir,
        };
        // Failover needs the sentinels to know the replica and each other.
        for sentinel in &s.sentinels {
            let port = sentinel.port;
            wait_until(Duration::from_secs(20), "sentinels to meet", || {
                let Ok(mut c) = conn(port) else { return false };
                let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                    .arg("REPLICAS")
                    .arg("mymaster")
                    .query(&mut c)
                    .unwrap_or_default();
                let peers: Vec<redis::Value> = redis::cmd("SENTINEL")
                    .arg("SENTINELS")
                    .arg("mymaster")
                    .query(&mut c)
                    .unwrap_or_default();
                !replicas.is_empty() && peers.len() >= 2
            });
        }
        s
    }

    pub fn urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}/", s.port))
            .collect()
    }

    pub fn store(&self, prefix: &str) -> RedisStore {
        RedisStore::new(&store_config(RedisMode::Sentinel, self.urls(), prefix)).unwrap()
    }
}

/// Three primaries, no replicas, every slot assigned.
#[derive(Debug)]
pub struct Cluster {
    pub nodes: Vec<Server>,
    _dir: TempDir,
}

impl Cluster {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a cluster whose nodes get `extra` arguments too.
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<Server> = (0..3)
            .map(|_| {
                let mut args = vec![
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ];
                args.extend_from_slice(extra);
                Server::redis(dir.path(), free_port(), &args)
            })
            .collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(status.success(), "redis-cli --cluster create failed");
        for node in &nodes {
            let port = node.port;
            wait_until(Duration::from_secs(20), "cluster_state:ok", || {
                conn(port)
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            });
        }
        Self { nodes, _dir: dir }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
            .collect()
    }

    pub fn store(&self, prefix: &str) -> RedisStore {
        RedisStore::new(&store_config(RedisMode::Cluster, self.urls(), prefix)).unwrap()
    }
}

/// A standalone server that also listens with TLS (a self-signed
/// certificate) and requires a password on both ports.
#[derive(Debug)]
pub struct Secured {
    pub server: Server,
    pub tls_port: u16,
    _dir: TempDir,
}

impl Secured {
    pub const PASSWORD: &'static str = "s3cret:{not}logged";

    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let status = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=127.0.0.1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl could not make a certificate");
        let tls_port = free_port();
        let server = Server::redis(
            dir.path(),
            free_port(),
            &[
                "--requirepass",
                Self::PASSWORD,
                "--tls-port",
                &tls_port.to_string(),
                "--tls-cert-file",
                cert.to_str().unwrap(),
                "--tls-key-file",
                key.to_str().unwrap(),
                "--tls-ca-cert-file",
                cert.to_str().unwrap(),
                "--tls-auth-clients",
                "no",
            ],
        );
        Self {
            server,
            tls_port,
            _dir: dir,
        }
    }

    /// An admin connection on the plain port.
    pub fn admin(&self) -> redis::Connection {
        let mut c = conn(self.server.port).unwrap();
        let _: () = redis::cmd("AUTH")
            .arg(Self::PASSWORD)
            .query(&mut c)
            .unwrap();
        c
    }
}

/// A scope name whose hash slot the node on `port` serves, as a primary.
pub fn scope_on(port: u16, prefix: &str) -> String {
    let mut c = conn(port).unwrap();
    let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut c).unwrap();
    let mut ranges = Vec::new();
    for range in slots {
        let redis::Value::Array(parts) = range else {
            continue;
        };
        let (Some(redis::Value::Int(lo)), Some(redis::Value::Int(hi))) =
            (parts.first(), parts.get(1))
        else {
            continue;
        };
        let owner = match parts.get(2) {
            Some(redis::Value::Array(node)) => match node.get(1) {
                Some(redis::Value::Int(p)) => *p as u16,
                _ => continue,
            },
            _ => continue,
        };
        if owner == port {
            ranges.push((*lo, *hi));
        }
    }
    (0..10_000)
        .map(|i| format!("{prefix}{i}"))
        .find(|name| {
            let slot: i64 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(name)
                .query(&mut c)
                .unwrap();
            ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&slot))
        })
        .expect("a scope on that node")
}
