//! A real Tollgate server on `127.0.0.1:0`, stopped when its control channel
//! is dropped.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tollgate::config::Config;
use tollgate::server::{self, Control};

/// A running Tollgate. Dropping it closes the control channel, which stops
/// the server.
pub struct Tollgate {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its control channel, for reloads.
    pub control: mpsc::Sender<Control>,
}

/// Starts Tollgate with `config` on a free port.
pub async fn start_tollgate(config: Config) -> Tollgate {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (control, _task) = server::spawn(config, listener);
    Tollgate { addr, control }
}
