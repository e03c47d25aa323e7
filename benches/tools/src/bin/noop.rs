//! The no-op server: a `tollgate.v1.RateLimiter` that allows everything
//! without deciding, the ceiling for the ghz benchmark
//! (`benches/ghz/run.sh`, scenario (e)). Not for production: it lives here,
//! apart from the `tollgate` binary, so that the shipped binary carries
//! nothing that only measures.
//!
//! `noop [--listen 127.0.0.1:50061]`
//!
//! What Tollgate costs beyond this is the cost of deciding, so everything
//! but the deciding is kept as Tollgate has it, for a fair comparison:
//! - the same allocator with the same settings (mimalloc with `no_thp`, see
//!   the root Cargo.toml);
//! - the same runtime (`#[tokio::main]`: multi-threaded, a worker per
//!   core), as `src/main.rs` starts it;
//! - the same service, with reflection, over the same tonic transport
//!   settings (TCP_NODELAY and keepalive on accepted connections);
//! - an answer of the same shape Tollgate sends for an allow.
//!
//! When one of these changes in Tollgate, change it here too. A binary of
//! this crate, not an example, so that it builds without the server's
//! dev-dependencies.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;
use tollgate::pb;
use tollgate::pb::tollgate::v1;
use tonic::transport::server::TcpIncoming;
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    serve(Args::parse().listen).await
}

/// Serves the no-op service on `addr` until the process is stopped.
async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    tonic::transport::Server::builder()
        .add_service(reflection)
        .add_service(v1::rate_limiter_server::RateLimiterServer::new(Noop))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
