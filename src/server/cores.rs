//! Serving on a runtime per core (`grpc.cores`).
//!
//! On the default multi-threaded runtime a call crosses threads several
//! times: hyper's connection task, the call's task, the coalescer's task and
//! the Redis connection's task may each run on either worker, and each
//! crossing is a wake-up through the kernel. Here each of `grpc.cores`
//! threads runs its own single-threaded runtime, and the listener's
//! connections are dealt to them in turn; a connection, its calls, and the
//! coalescer queue and Redis lane they use (see `store::affinity`) then live
//! on one thread. What the threads share (the limiter, its snapshot, the
//! embedded store, metrics) they share as before.
//!
//! The main runtime keeps the rest: accepting, the control loop, reloads,
//! health, the metrics port and the background tasks.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

use super::{Routes, ServerError};
use crate::config::GrpcConfig;
use crate::net::tls::{self, Tls};
use crate::observe::Observer;
use crate::store::affinity;

/// What every core serves with.
#[derive(Clone)]
pub(super) struct Serving {
    pub(super) router: Routes,
    pub(super) tls: Option<Tls>,
    pub(super) observer: Arc<Observer>,
    /// Cuts every connection at the end of the shutdown grace.
    pub(super) cancel: CancellationToken,
    /// Stops accepting and lets the calls in flight finish.
    pub(super) stopping: CancellationToken,
}

/// Starts `grpc.cores` threads serving `listener`'s connections. The
/// returned future ends when every core has stopped (after `stopping`).
pub(super) fn spawn(
    serving: Serving,
    listener: TcpListener,
    grpc: &GrpcConfig,
) -> Result<impl Future<Output = Result<(), ServerError>> + use<>, ServerError> {
    let mut shares = Vec::with_capacity(grpc.cores);
    let mut finished = Vec::with_capacity(grpc.cores);
    for core in 0..grpc.cores {
        let (share, taken) = mpsc::unbounded_channel::<std::net::TcpStream>();
        let (done, finish) = oneshot::channel();
        let core_id = u16::try_from(core).unwrap_or(u16::MAX);
        let (serving, grpc) = (serving.clone(), grpc.clone());
        std::thread::Builder::new()
            .name(format!("tollgate-core-{core}"))
            .spawn(move || {
                affinity::pin(core_id);
                let served = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(serve_share(serving, taken, &grpc)),
                    Err(e) => Err(ServerError::Runtime(e)),
                };
                let _ = done.send(served);
            })
            .map_err(ServerError::Runtime)?;
        shares.push(share);
        finished.push(finish);
    }
    tokio::spawn(deal(listener, shares, serving.stopping));
    Ok(async move {
        for finish in finished {
            match finish.await {
                Ok(served) => served?,
                Err(_) => {
                    return Err(ServerError::Runtime(std::io::Error::other(
                        "a core's thread panicked",
                    )));
                }
            }
        }
        Ok(())
    })
}

/// One core: serves the connections dealt to it until `stopping`.
async fn serve_share(
    serving: Serving,
    taken: mpsc::UnboundedReceiver<std::net::TcpStream>,
    grpc: &GrpcConfig,
) -> Result<(), ServerError> {
    let Serving {
        router,
        tls,
        observer,
        cancel,
        stopping,
    } = serving;
    // Registered with this core's reactor: the main runtime's let go of it.
    let tcp = UnboundedReceiverStream::new(taken).map(tokio::net::TcpStream::from_std);
    let conns = super::incoming(tcp, tls, &observer, &cancel, grpc);
    router
        .serve_with_incoming_shutdown(conns, stopping.cancelled_owned())
        .await?;
    Ok(())
}

/// Accepts on the main runtime and deals each connection to the next core,
/// until `stopping`.
async fn deal(
    listener: TcpListener,
    shares: Vec<mpsc::UnboundedSender<std::net::TcpStream>>,
    stopping: CancellationToken,
) {
    let mut incoming = tls::incoming(listener);
    let mut next = 0usize;
    loop {
        let tcp = tokio::select! {
            () = stopping.cancelled() => return,
            tcp = incoming.next() => tcp,
        };
        match tcp.map(|tcp| tcp.and_then(tokio::net::TcpStream::into_std)) {
            Some(Ok(tcp)) => {
                // A core that stopped drops what it is dealt: closed.
                let _ = shares[next % shares.len()].send(tcp);
                next = next.wrapping_add(1);
            }
            Some(Err(e)) => {
                // Out of file descriptors, most likely: back off.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None => return,
        }
    }
}
