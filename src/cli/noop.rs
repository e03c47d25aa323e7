//! `tollgate bench-noop`, hidden: a no-op `tollgate.v1.RateLimiter`, the
//! ceiling for the ghz benchmark (`benches/ghz/run.sh`, scenario (e)).
//!
//! It serves the same service, with reflection, over the same tonic
//! transport settings as Tollgate (TCP_NODELAY and keepalive on accepted
//! connections), in the same binary (so with the same allocator and
//! runtime), and answers every `ShouldAllow` with a fixed allow of the same
//! shape Tollgate sends, without deciding anything. What Tollgate costs
//! beyond this is the cost of deciding. A subcommand rather than an example
//! so that the benchmark builds one binary, without the dev-dependencies an
//! example pulls in.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tollgate::pb;
use tollgate::pb::tollgate::v1;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

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

/// Serves the no-op service on `addr` until the process is stopped.
pub(crate) async fn bench_noop(addr: SocketAddr) -> anyhow::Result<()> {
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
