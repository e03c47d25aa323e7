//! [`McpLayer`]: MCP extraction stacked on top of a [`TollgateLayer`]. On the
//! MCP endpoint, [`Mcp`] reads the POST body (under a cap) and hands the
//! JSON-RPC calls in it to the [`Tollgate`] service beneath, which charges
//! each call (see [`crate::mcp`] for what is charged and how). Every other
//! request goes to that service as it came.
//!
//! The layer builds the `Tollgate` service itself, from the `TollgateLayer`
//! it was given, so the two cannot be stacked in the wrong order or charge
//! a request twice.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::body::RequestBody;
use super::{Tollgate, TollgateLayer};

/// The most bytes of an MCP request body the layer reads, unless set.
/// Bigger bodies get a 413 before anything is charged.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// Stacks MCP-aware extraction on top of a [`TollgateLayer`]: on the MCP
/// endpoint, each JSON-RPC call in a POST body is decided, with its method
/// (and tool, prompt or resource) as the operation, and a batch is charged
/// all or nothing. Other requests are decided as the `TollgateLayer` would.
///
/// Use it instead of that layer, not beside it: it makes the
/// [`Tollgate`] service itself.
#[derive(Clone, Debug)]
pub struct McpLayer {
    tollgate: TollgateLayer,
    settings: Arc<Settings>,
}

#[derive(Clone, Debug)]
struct Settings {
    /// Absent means every POST is read as JSON-RPC.
    path: Option<String>,
    /// The most body bytes read; past it, a 413 and nothing charged.
    max_body_bytes: usize,
    /// The JSON-RPC error code of a denied call.
    error_code: i64,
}

impl McpLayer {
    /// MCP extraction on every POST, with a 1 MiB body cap, deciding with
    /// `tollgate`'s client, keys and headers.
    pub fn new(tollgate: TollgateLayer) -> Self {
        Self {
            tollgate,
            settings: Arc::new(Settings {
                path: None,
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
                error_code: crate::mcp::RATE_LIMITED_CODE,
            }),
        }
    }

    /// Only POSTs to this path are read as JSON-RPC; other requests are
    /// decided as plain HTTP requests. The path is compared decoded,
    /// cleaned and in ASCII lower case, so `/mcp/`, `//mcp` and `/MCP` are
    /// the endpoint `/mcp` too: a server that normalises paths would hand
    /// them to the MCP handler.
    #[must_use]
    pub fn path(mut self, path: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.settings).path = Some(path.into());
        self
    }

    /// The most body bytes read; a bigger body is refused with a 413.
    #[must_use]
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        Arc::make_mut(&mut self.settings).max_body_bytes = max;
        self
    }

    /// The JSON-RPC error code of a denied call; by default
    /// [`crate::mcp::RATE_LIMITED_CODE`] (429). [`crate::mcp::PROPOSED_RATE_LIMITED_CODE`]
    /// is SEP-3304's proposal, [`crate::mcp::LEGACY_RATE_LIMITED_CODE`] what
    /// earlier versions sent.
    #[must_use]
    pub fn error_code(mut self, code: i64) -> Self {
        Arc::make_mut(&mut self.settings).error_code = code;
        self
    }
}

impl Settings {
    fn applies<B>(&self, request: &Request<B>) -> bool {
        request.method() == http::Method::POST
            && self
                .path
                .as_deref()
                .is_none_or(|p| crate::mcp::path_matches(p, request.uri().path()))
    }
}

impl<S> Layer<S> for McpLayer {
    type Service = Mcp<Tollgate<S>>;

    fn layer(&self, inner: S) -> Self::Service {
        Mcp {
            inner: self.tollgate.layer(inner),
            settings: self.settings.clone(),
        }
    }
}

/// What [`Mcp`] read from a body, for the [`Tollgate`] service beneath:
/// it travels in the request's extensions.
#[derive(Clone, Debug)]
pub(crate) enum McpBody {
    /// Decide on what the body holds: JSON-RPC calls, or something else,
    /// which is charged once as a plain request.
    Read {
        body: crate::mcp::Body,
        /// The JSON-RPC error code of a denial.
        error_code: i64,
    },
    /// Bigger than the cap: a 413, with nothing charged.
    TooLarge { cap: usize },
    /// A Content-Encoding other than identity: a 415, with nothing charged.
    /// The body is not decoded (see docs/mcp.md for why).
    Encoded(String),
    /// The body broke off while being read: a 400.
    Unreadable(String),
}

/// Reads MCP bodies for the [`Tollgate`] service inside it. Made by
/// [`McpLayer`].
#[derive(Clone, Debug)]
pub struct Mcp<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S, B> Service<Request<B>> for Mcp<S>
where
    S: Service<Request<RequestBody<B>>> + Clone,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = McpFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if !self.settings.applies(&request) {
            let future = self.inner.call(request.map(RequestBody::streaming));
            return McpFuture {
                state: State::Calling { future },
            };
        }
        // Reading the body takes time, so the future keeps the service that
        // was just polled ready, and this one keeps a clone.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        McpFuture {
            state: State::Reading {
                read: read(&self.settings, request),
                service: Some(ready),
            },
        }
    }
}

type ReadFuture<B> = Pin<Box<dyn Future<Output = Request<RequestBody<B>>> + Send>>;

/// Reads the body under `cap`, and puts what it holds into the extensions.
/// A body over the cap, by its `Content-Length` or by what arrives, is not
/// kept: the service beneath refuses the request without calling further.
fn read<B>(settings: &Settings, request: Request<B>) -> ReadFuture<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (cap, error_code) = (settings.max_body_bytes, settings.error_code);
    Box::pin(async move {
        let (mut parts, body) = request.into_parts();
        if let Some(coding) = content_encoding(&parts.headers) {
            parts.extensions.insert(McpBody::Encoded(coding));
            return Request::from_parts(parts, RequestBody::read(Bytes::new()));
        }
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let (read, bytes) = if declared.is_some_and(|n| n > cap as u64) {
            (McpBody::TooLarge { cap }, Bytes::new())
        } else {
            match Limited::new(body, cap).collect().await {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    let body = crate::mcp::parse(&bytes);
                    (McpBody::Read { body, error_code }, bytes)
                }
                Err(e) if e.is::<LengthLimitError>() => (McpBody::TooLarge { cap }, Bytes::new()),
                Err(e) => (McpBody::Unreadable(e.to_string()), Bytes::new()),
            }
        };
        parts.extensions.insert(read);
        Request::from_parts(parts, RequestBody::read(bytes))
    })
}

/// The body's Content-Encoding, or `None` when it lists no coding but
/// `identity`.
fn content_encoding(headers: &http::HeaderMap) -> Option<String> {
    let values: Vec<&[u8]> = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .map(http::HeaderValue::as_bytes)
        .collect();
    let encoded = values.iter().any(|v| {
        v.split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
            .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"))
    });
    encoded.then(|| {
        values
            .iter()
            .map(|v| String::from_utf8_lossy(v))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

pin_project! {
    /// The response future of [`Mcp`]: first the body, then the call.
    pub struct McpFuture<S, B>
    where
        S: Service<Request<RequestBody<B>>>,
    {
        #[pin]
        state: State<S, S::Future, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, F, B> {
        /// Reading the body; `service` was polled ready and waits for it.
        Reading { read: ReadFuture<B>, service: Option<S> },
        /// The service beneath has the request.
        Calling { #[pin] future: F },
    }
}

impl<S, B> fmt::Debug for McpFuture<S, B>
where
    S: Service<Request<RequestBody<B>>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Reading { .. } => "Reading",
            State::Calling { .. } => "Calling",
        };
        f.debug_struct("McpFuture").field("state", &state).finish()
    }
}

impl<S, B> Future for McpFuture<S, B>
where
    S: Service<Request<RequestBody<B>>>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Reading { read, service } => {
                    let request = ready!(read.as_mut().poll(cx));
                    let Some(mut service) = service.take() else {
                        // Only reachable by polling again after Ready, which
                        // the Future contract forbids.
                        panic!("McpFuture polled after completion");
                    };
                    let future = service.call(request);
                    this.state.set(State::Calling { future });
                }
                StateProj::Calling { future } => return future.poll(cx),
            }
        }
    }
}
