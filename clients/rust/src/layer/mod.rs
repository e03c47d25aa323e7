//! The tower layers: ask Tollgate about each HTTP request before the inner
//! service sees it.
//!
//! - [`TollgateLayer`] makes [`Tollgate`]: one decision per HTTP request,
//!   with keys from the request head. The inner service gets the request
//!   as it came, body type and all.
//! - [`McpLayer`] stacks MCP extraction on top of a `TollgateLayer`, making
//!   [`Mcp`]`<Tollgate<S>>`: on the MCP endpoint it reads the body, and each
//!   JSON-RPC call in it is decided (a batch all or nothing). Only this
//!   layer changes the inner service's body type, to [`RequestBody`], since
//!   it hands on the bytes it read.
//!
//! What the caller sees:
//!
//! - Allowed: the request goes on, and the response gets `RateLimit-Policy`
//!   and `RateLimit` (and `X-RateLimit-*` if asked). With
//!   [`TollgateLayer::max_wait`], a request allowed for later is held for
//!   its delay first, and the response gets `RateLimit-Delay`.
//! - Denied: a 429 with `Retry-After`, the same headers, and an
//!   `application/problem+json` body; on an MCP endpoint, a JSON-RPC error.
//! - With [`TollgateLayer::concurrency`]: a lease held until the response
//!   body ends or is dropped; a full pool is a 429 (or 503, if asked) with
//!   `Retry-After`.
//! - Tollgate unavailable: the client's [`crate::FailureMode`] decides; when
//!   closed, a 503.
//! - Bad input (no scope, a key over Tollgate's length limits): a 400.
//!
//! ```no_run
//! use http::HeaderName;
//! use tollgate_client::Client;
//! use tollgate_client::layer::{Extractor, McpLayer, TollgateLayer};
//!
//! # fn doc() -> Result<(), tollgate_client::Error> {
//! let client = Client::builder("127.0.0.1:50051").build()?;
//! let limits = TollgateLayer::new(client, Extractor::fixed("github-mcp"))
//!     .identity(Extractor::header(HeaderName::from_static("x-user")));
//! // A plain HTTP API: Router::new().route(...).layer(limits)
//! let mcp = McpLayer::new(limits).path("/mcp");
//! // An MCP server: Router::new().route("/mcp", ...).layer(mcp)
//! # let _ = mcp; Ok(()) }
//! ```

mod body;
mod check;
mod extract;
mod future;
mod lease;
mod mcp;

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower::{Layer, Service};

use crate::client::Client;
use crate::headers::HeaderOptions;

pub use body::{RequestBody, ResponseBody};
pub use extract::{Extractor, PeerIdentity};
pub use future::ResponseFuture;
pub use lease::{Concurrency, DEFAULT_LEASE_TTL};
pub use mcp::{DEFAULT_MAX_BODY_BYTES, Mcp, McpFuture, McpLayer};

/// The layer's name before it became [`TollgateLayer`] (tower has its own
/// `RateLimitLayer`). Kept for one release.
#[deprecated(note = "renamed `TollgateLayer`; the alias goes in the next release")]
pub type RateLimitLayer = TollgateLayer;

/// The service's name before it became [`Tollgate`]. Kept for one release.
#[deprecated(note = "renamed `Tollgate`; the alias goes in the next release")]
pub type RateLimit<S> = Tollgate<S>;

/// Applies [`Tollgate`] to a service. Build it with [`TollgateLayer::new`]
/// and the builder methods; every clone shares one configuration and the
/// client's one connection.
#[derive(Clone, Debug)]
pub struct TollgateLayer {
    config: Arc<Config>,
}

#[derive(Clone, Debug)]
struct Config {
    client: Client,
    scope: Extractor,
    /// Absent means anonymous: every caller shares the identity bucket.
    identity: Option<Extractor>,
    /// Absent means no operation (only limits without `operations` apply).
    /// Under [`McpLayer`], it is the operation of bodies that are not
    /// JSON-RPC.
    operation: Option<Extractor>,
    attributes: Vec<(String, Extractor)>,
    headers: HeaderOptions,
    /// Shaping: the longest a request may be held before it goes on; `None`
    /// never holds one (allowed now, or a 429).
    max_wait: Option<std::time::Duration>,
    /// Holds a lease per request when set.
    concurrency: Option<Concurrency>,
}

impl TollgateLayer {
    /// Asks `client` about every request, in the scope that `scope` extracts.
    /// A request without a scope gets a 400.
    pub fn new(client: Client, scope: Extractor) -> Self {
        Self {
            config: Arc::new(Config {
                client,
                scope,
                identity: None,
                operation: None,
                attributes: Vec::new(),
                headers: HeaderOptions::default(),
                max_wait: None,
                concurrency: None,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// Where the caller's identity comes from. When it is absent from a
    /// request, the caller is anonymous.
    #[must_use]
    pub fn identity(self, identity: Extractor) -> Self {
        self.edit(|c| c.identity = Some(identity))
    }

    /// Where the operation comes from, such as [`Extractor::path`].
    #[must_use]
    pub fn operation(self, operation: Extractor) -> Self {
        self.edit(|c| c.operation = Some(operation))
    }

    /// Adds an attribute (for tiered rules, `when: {tier: premium}`); left
    /// out of requests where it is absent.
    #[must_use]
    pub fn attribute(self, name: impl Into<String>, value: Extractor) -> Self {
        let name = name.into();
        self.edit(|c| c.attributes.push((name, value)))
    }

    /// Shaping: asks with [`crate::DecisionRequest::max_wait`] `max_wait`,
    /// so a limit with `max_delay` may admit a request for later instead of
    /// denying it; the layer then holds the request for the decision's
    /// [`crate::Decision::delay`] (never more than `max_wait`) before the
    /// inner service sees it, and the response says so in a
    /// `RateLimit-Delay` header (seconds, to the millisecond). A caller that
    /// goes away meanwhile drops the future, and nothing goes on.
    #[must_use]
    pub fn max_wait(self, max_wait: std::time::Duration) -> Self {
        self.edit(|c| c.max_wait = Some(max_wait))
    }

    /// Holds a lease in the scope's concurrency limit for the lifetime of
    /// each request (under [`McpLayer`], of each `tools/call`): see
    /// [`Concurrency`].
    #[must_use]
    pub fn concurrency(self, concurrency: Concurrency) -> Self {
        self.edit(|c| c.concurrency = Some(concurrency))
    }

    /// Also add `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
    /// `X-RateLimit-Reset`, for clients that expect them.
    #[must_use]
    pub fn legacy_headers(self, on: bool) -> Self {
        self.edit(|c| c.headers.legacy = on)
    }
}

impl<S> Layer<S> for TollgateLayer {
    type Service = Tollgate<S>;

    fn layer(&self, inner: S) -> Tollgate<S> {
        Tollgate {
            inner,
            config: self.config.clone(),
        }
    }
}

/// A service that asks Tollgate before calling the inner one. Made by
/// [`TollgateLayer`].
#[derive(Clone, Debug)]
pub struct Tollgate<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Tollgate<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The decision comes first and takes time, so the future keeps the
        // service that was just polled ready, and this one keeps a clone
        // (as tower's AsyncFilter does).
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(check::decide(self.config.clone(), request), ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names before `TollgateLayer` and `Tollgate` still compile, for one
    /// release; this test goes with them.
    #[tokio::test]
    #[allow(deprecated)]
    async fn the_old_names_still_name_the_layer_and_its_service() {
        let client = Client::builder("127.0.0.1:1").build().unwrap();
        let layer: RateLimitLayer = TollgateLayer::new(client, Extractor::fixed("demo"));
        let service: RateLimit<()> = layer.layer(());
        let _: Tollgate<()> = service;
    }
}
