//! The in-flight cap: a tower layer that answers `RESOURCE_EXHAUSTED` at
//! once when `grpc.max_in_flight` calls are already being handled, instead
//! of letting calls queue until memory runs out.
//!
//! A call holds its place from the moment its headers arrive until its
//! response is ready, across every connection. Health checks are never
//! shed: a saturated replica is busy, not dead, and its probes must say so
//! through health itself.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tower::{Layer, Service};

use crate::observe::metrics::Metrics;

/// Paths that the cap never sheds.
const EXEMPT_PREFIX: &str = "/grpc.health.v1.Health/";

/// Caps calls in flight across every connection.
#[derive(Debug, Clone)]
pub struct InFlightLimitLayer {
    permits: Arc<Semaphore>,
    max: usize,
    metrics: Arc<Metrics>,
}

impl InFlightLimitLayer {
    /// At most `max` calls at once; each refusal is counted in `metrics`.
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            metrics,
        }
    }
}

impl<S> Layer<S> for InFlightLimitLayer {
    type Service = InFlightLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`InFlightLimitLayer`] makes.
#[derive(Debug, Clone)]
pub struct InFlightLimit<S> {
    inner: S,
    layer: InFlightLimitLayer,
}

impl<S, B> Service<http::Request<B>> for InFlightLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path().starts_with(EXEMPT_PREFIX) {
            return ResponseFuture::Running {
                inner: self.inner.call(request),
                _permit: None,
            };
        }
        match self.layer.permits.clone().try_acquire_owned() {
            Ok(permit) => ResponseFuture::Running {
                inner: self.inner.call(request),
                _permit: Some(permit),
            },
            Err(_) => {
                self.layer.metrics.call_shed();
                let status = Status::resource_exhausted(format!(
                    "{} calls are in flight, the most allowed (grpc.max_in_flight); retry later",
                    self.layer.max
                ));
                ResponseFuture::Refused {
                    response: Some(status.into_http()),
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of [`InFlightLimit`]: the inner call holding its permit,
    /// or the refusal.
    #[project = Projected]
    #[derive(Debug)]
    pub enum ResponseFuture<F> {
        /// Handled; the permit is released when the response is ready (or
        /// the call is dropped).
        Running { #[pin] inner: F, _permit: Option<OwnedSemaphorePermit> },
        /// Refused at the cap.
        Refused { response: Option<http::Response<Body>> },
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Running { inner, .. } => inner.poll(cx),
            Projected::Refused { response } => match response.take() {
                Some(r) => Poll::Ready(Ok(r)),
                None => Poll::Pending,
            },
        }
    }
}
