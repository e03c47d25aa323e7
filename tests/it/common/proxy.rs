//! A TCP fault proxy for tests: forwards 127.0.0.1:port to an upstream
//! until told to blackhole, then forwards nothing on any connection — no
//! reply, no reset, sockets left open — like a partition that drops every
//! packet. Connections made before or during a blackhole stay dead after it
//! lifts (their state was lost, as behind a restarted NAT or load
//! balancer); only new ones work again.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

#[derive(Debug, Default)]
struct State {
    blackholed: AtomicBool,
    /// Bumped by every blackhole and lift; a connection forwards only while
    /// the epoch it was born in lasts and no blackhole is on.
    epoch: AtomicU64,
}

impl State {
    fn alive(&self, born: u64) -> bool {
        !self.blackholed.load(Ordering::Relaxed) && self.epoch.load(Ordering::Relaxed) == born
    }
}

/// The proxy; stops on drop.
#[derive(Debug)]
pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
    tasks: JoinSet<()>,
}

impl Proxy {
    /// Listens on a free loopback port, forwarding to `upstream`.
    pub async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let mut tasks = JoinSet::new();
        let shared = state.clone();
        tasks.spawn(async move {
            let mut pumps = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let born = shared.epoch.load(Ordering::Relaxed);
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                pumps.spawn(pump(cr, sw, shared.clone(), born));
                pumps.spawn(pump(sr, cw, shared.clone(), born));
            }
        });
        Self { port, state, tasks }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// From now on nothing is forwarded, on any connection.
    pub fn blackhole(&self) {
        self.state.blackholed.store(true, Ordering::Relaxed);
        self.state.epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// New connections work again; older ones stay dead.
    pub fn lift(&self) {
        self.state.epoch.fetch_add(1, Ordering::Relaxed);
        self.state.blackholed.store(false, Ordering::Relaxed);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<State>,
    born: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // A dead connection swallows what it reads: the sender sees no
        // error, and no answer ever comes.
        if state.alive(born) && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
