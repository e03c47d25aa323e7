//! The no-op server: a `tollgate.v1.RateLimiter` that allows everything
//! without deciding, the ceiling for the ghz benchmark
//! (`benches/ghz/run.sh`, scenario (e)). Not for production: it lives here,
//! apart from the `tollgate` binary, so that the shipped binary carries
//! nothing that only measures.
//!
//! `noop [--listen 127.0.0.1:50061] [--cores N]`
//!
//! What Tollgate costs beyond this is the cost of deciding, so everything
//! but the deciding is kept as Tollgate has it, for a fair comparison:
//! - the same allocator with the same settings (mimalloc with `no_thp`, see
//!   the root Cargo.toml);
//! - the same runtime (multi-threaded, a worker per core, as
//!   `#[tokio::main]` in `src/main.rs` starts it; or with `--cores N`, N
//!   single-threaded runtimes as Tollgate's `grpc.cores` has them);
//! - the same service, with reflection, over the same tonic transport
//!   settings (TCP_NODELAY and keepalive on accepted connections);
//! - an answer of the same shape Tollgate sends for an allow.
//!
//! When one of these changes in Tollgate, change it here too. A binary of
//! this crate, not an example, so that it builds without the server's
//! dev-dependencies.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tollgate::pb;
use tollgate::pb::tollgate::v1;
use tonic::{Request, Response, Status};

/// Tollgate's allocator: see the root Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Serves a no-op RateLimiter until stopped: the ghz benchmark's ceiling.
#[derive(Debug, Parser)]
#[command(name = "noop")]
struct Args {
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:50061")]
    listen: SocketAddr,
    /// 0: one multi-threaded runtime, a worker per core. N: N threads with
    /// a single-threaded runtime each, as Tollgate's `grpc.cores`.
    #[arg(long, default_value_t = 0)]
    cores: usize,
}

#[derive(Debug)]
struct Noop;

#[tonic::async_trait]
impl v1::rate_limiter_server::RateLimiter for Noop {
    async fn should_allow(
        &self,
        request: Request<v1::ShouldAllowRequest>,
    ) -> Result<Response<v1::ShouldAllowResponse>, Status> {
        let _ = request.into_inner();
        let reset = prost_types::Duration {
            seconds: 0,
            nanos: 1_000_000,
        };
        Ok(Response::new(v1::ShouldAllowResponse {
            allowed: true,
            limit: 1000,
            remaining: 999,
            reset_after: Some(reset),
            rule: "per-user".to_owned(),
            buckets: vec![v1::BucketStatus {
                rule: "per-user".to_owned(),
                limit: 1000,
                remaining: 999,
                reset_after: Some(reset),
                retry_after: None,
                exhausted: false,
                // The same answer as a real decision carries, so the ceiling
                // encodes as many bytes.
                refill_period: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
            }],
            ..Default::default()
        }))
    }

    async fn should_allow_batch(
        &self,
        _request: Request<v1::ShouldAllowBatchRequest>,
    ) -> Result<Response<v1::ShouldAllowBatchResponse>, Status> {
        Ok(Response::new(v1::ShouldAllowBatchResponse::default()))
    }

    async fn settle(
        &self,
        _request: Request<v1::SettleRequest>,
    ) -> Result<Response<v1::SettleResponse>, Status> {
        Ok(Response::new(v1::SettleResponse::default()))
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.cores == 0 {
        // What `#[tokio::main]` builds, as `src/main.rs` has it.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return runtime.block_on(serve(args.listen));
    }
    serve_per_core(args.listen, args.cores)
}

/// The service with reflection, as Tollgate serves it.
fn router() -> anyhow::Result<tonic::transport::server::Router> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    Ok(tonic::transport::Server::builder()
        .add_service(reflection)
        .add_service(v1::rate_limiter_server::RateLimiterServer::new(Noop)))
}

/// Serves the no-op service on `addr` until the process is stopped.
async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    router()?
        .serve_with_incoming(tollgate::net::tls::incoming(listener))
        .await?;
    Ok(())
}

/// As Tollgate with `grpc.cores`: `cores` threads, each with a
/// single-threaded runtime, serving the connections dealt to it in turn.
fn serve_per_core(addr: SocketAddr, cores: usize) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let mut shares = Vec::with_capacity(cores);
    for _ in 0..cores {
        let (share, taken) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
        let router = router()?;
        std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let incoming = UnboundedReceiverStream::new(taken).map(|tcp| {
                tcp.set_nonblocking(true)?;
                tokio::net::TcpStream::from_std(tcp)
            });
            runtime.block_on(router.serve_with_incoming(incoming))?;
            Ok(())
        });
        shares.push(share);
    }
    for (n, tcp) in listener.incoming().enumerate() {
        let tcp = tcp?;
        tcp.set_nodelay(true)?;
        shares[n % cores]
            .send(tcp)
            .map_err(|_| anyhow::anyhow!("a core stopped"))?;
    }
    Ok(())
}
