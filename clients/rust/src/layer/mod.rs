//! The tower layer: asks Tollgate about each HTTP request before the inner
//! service sees it.
//!
//! - Allowed: the request goes on, and the response gets `RateLimit-Policy`
//!   and `RateLimit` (and `X-RateLimit-*` if asked).
//! - Denied: a 429 with `Retry-After`, the same headers, and an
//!   `application/problem+json` body; on an MCP endpoint, a JSON-RPC error.
//! - Tollgate unavailable: the client's [`crate::FailureMode`] decides; when
//!   closed, a 503.
//! - Bad input (no scope, a key over Tollgate's length limits): a 400.
//!
//! ```no_run
//! use http::HeaderName;
//! use tollgate_client::Client;
//! use tollgate_client::layer::{Extractor, Mcp, RateLimitLayer};
//!
//! # fn doc() -> Result<(), tollgate_client::Error> {
//! let client = Client::builder("127.0.0.1:50051").build()?;
//! let layer = RateLimitLayer::new(client, Extractor::fixed("github-mcp"))
//!     .identity(Extractor::header(HeaderName::from_static("x-user")))
//!     .mcp(Mcp::new().path("/mcp"));
//! // axum: Router::new().route(...).layer(layer)
//! # let _ = layer; Ok(()) }
//! ```

mod body;
mod check;
mod extract;
mod future;

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

/// The most bytes of an MCP request body the layer reads, unless set.
/// Bigger bodies get a 413 before anything is charged.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// MCP-aware extraction: on the MCP endpoint, each JSON-RPC call in a POST
/// body is decided, with its method (and tool, prompt or resource) as the
/// operation, and a batch is charged all or nothing. See [`crate::mcp`] for
/// what is charged and how.
#[derive(Clone, Debug)]
pub struct Mcp {
    path: Option<String>,
    max_body_bytes: usize,
}

impl Default for Mcp {
    fn default() -> Self {
        Self::new()
    }
}

impl Mcp {
    /// MCP extraction on every POST, with a 1 MiB body cap.
    pub fn new() -> Self {
        Self {
            path: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// Only POSTs to this exact path are read as JSON-RPC; other requests are
    /// decided as plain HTTP requests.
    #[must_use]
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// The most body bytes read; a bigger body is refused with a 413.
    #[must_use]
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = max;
        self
    }

    fn applies(&self, parts: &http::request::Parts) -> bool {
        parts.method == http::Method::POST
            && self.path.as_deref().is_none_or(|p| p == parts.uri.path())
    }
}

/// Applies [`RateLimit`] to a service. Build it with [`RateLimitLayer::new`]
/// and the builder methods; every clone shares one configuration and the
/// client's one connection.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    config: Arc<Config>,
}

#[derive(Clone, Debug)]
struct Config {
    client: Client,
    scope: Extractor,
    /// Absent means anonymous: every caller shares the identity bucket.
    identity: Option<Extractor>,
    /// Absent means no operation (only limits without `operations` apply).
    /// With MCP on, it is the operation of bodies that are not JSON-RPC.
    operation: Option<Extractor>,
    attributes: Vec<(String, Extractor)>,
    headers: HeaderOptions,
    mcp: Option<Mcp>,
}

impl RateLimitLayer {
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
                mcp: None,
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

    /// Also add `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
    /// `X-RateLimit-Reset`, for clients that expect them.
    #[must_use]
    pub fn legacy_headers(self, on: bool) -> Self {
        self.edit(|c| c.headers.legacy = on)
    }

    /// Turns on MCP-aware extraction.
    #[must_use]
    pub fn mcp(self, mcp: Mcp) -> Self {
        self.edit(|c| c.mcp = Some(mcp))
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            config: self.config.clone(),
        }
    }
}

/// A service that asks Tollgate before calling the inner one. Made by
/// [`RateLimitLayer`].
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
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
