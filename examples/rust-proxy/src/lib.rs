//! rust-proxy: an HTTP reverse proxy that asks Tollgate about every request,
//! built on `tollgate_client::layer::TollgateLayer` (and `McpLayer` with
//! `--mcp`). It is an example first: the whole of the rate limiting is
//! [`limited_router`]; the rest is a plain forwarder.
//!
//! - [`Args`]: the command line (the same flags as the Go example proxy).
//! - [`limited_router`]: forwarder + layer; [`plain_router`]: forwarder only,
//!   to measure what the layer adds.
//! - [`serve`]: serves a router until a shutdown future resolves.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderName};
use http::{HeaderMap, StatusCode, Uri};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tollgate_client::layer::{Concurrency, Extractor, McpLayer, TollgateLayer};
use tollgate_client::{Client, FailureMode};

/// The command line.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "rust-proxy", version, about)]
pub struct Args {
    /// Address to listen on; port 0 picks a free one (printed on start).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "HOST:PORT")]
    pub listen: SocketAddr,
    /// Where allowed requests go, such as `http://127.0.0.1:3000`; its path,
    /// if any, is put before each request's.
    #[arg(long, value_name = "URL")]
    pub upstream: Uri,
    /// Tollgate's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051", value_name = "HOST:PORT")]
    pub tollgate: String,
    /// The Tollgate scope every request is decided in.
    #[arg(long)]
    pub scope: String,
    /// The header naming the caller; without it, the client's IP address is
    /// the identity.
    #[arg(long, value_name = "NAME")]
    pub identity_header: Option<HeaderName>,
    /// MCP-aware extraction: each JSON-RPC call in a POST body is decided,
    /// with its method (and tool, prompt or resource) as the operation.
    /// Without it, the operation is the request path.
    #[arg(long)]
    pub mcp: bool,
    /// With --mcp, only POSTs to this path are read as JSON-RPC.
    #[arg(long, value_name = "PATH")]
    pub mcp_path: Option<String>,
    /// With --mcp, the JSON-RPC error code of a denied call: 429 by default
    /// (outside the range MCP reserves); -32023 is SEP-3304's proposal,
    /// -32029 what earlier versions sent.
    #[arg(long, default_value_t = tollgate_client::mcp::RATE_LIMITED_CODE, allow_hyphen_values = true)]
    pub mcp_error_code: i64,
    /// With --mcp, the largest body read; bigger ones get a 413.
    #[arg(long, default_value_t = tollgate_client::layer::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// What to do when Tollgate cannot answer: `open` lets requests through
    /// uncounted, `closed` answers 503.
    #[arg(long, default_value = "open", value_parser = parse_failure_mode)]
    pub failure_mode: FailureMode,
    /// How long to wait for Tollgate's answer, such as `50ms` or `1s`.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub deadline: Duration,
    /// Also send `X-RateLimit-Limit`, `-Remaining` and `-Reset`.
    #[arg(long)]
    pub legacy_headers: bool,
    /// Shaping: hold a request up to this long (such as `2s`) when a limit
    /// with `max_delay` admits it for later, instead of a 429. Absent: never.
    #[arg(long, value_parser = parse_duration)]
    pub max_wait: Option<Duration>,
    /// Hold a lease in the scope's concurrency limit for the lifetime of
    /// each request (with --mcp, of each tools/call), renewed while the
    /// response streams and released when it ends or the client goes away.
    #[arg(long)]
    pub concurrency: bool,
    /// With --concurrency, each lease's time to live, renewed every third
    /// of it; at most the limit's `max_lease`.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// With --concurrency, the status when the pool is full: 429, or 503
    /// for a pool protecting the upstream.
    #[arg(long, default_value_t = 429, value_parser = parse_deny_status)]
    pub concurrency_status: u16,
}

fn parse_deny_status(s: &str) -> Result<u16, String> {
    match s {
        "429" => Ok(429),
        "503" => Ok(503),
        _ => Err(format!("{s:?}: want 429 or 503")),
    }
}

fn parse_failure_mode(s: &str) -> Result<FailureMode, String> {
    match s {
        "open" => Ok(FailureMode::Open),
        "closed" => Ok(FailureMode::Closed),
        _ => Err(format!("{s:?} is neither `open` nor `closed`")),
    }
}

/// `<n>ms`, `<n>s` or `<n>us`, with a whole number `n`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a whole number and a unit, such as 50ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "us" => Ok(Duration::from_micros(n)),
        _ => Err(format!("{s:?}: the unit must be us, ms or s")),
    }
}

/// The forwarder behind the rate-limit layer that `args` describe.
pub fn limited_router(args: &Args) -> Result<Router, tollgate_client::Error> {
    let client = Client::builder(&args.tollgate)
        .deadline(args.deadline)
        .failure_mode(args.failure_mode)
        .build()?;
    let identity = match &args.identity_header {
        Some(name) => Extractor::header(name.clone()),
        // No header: the peer's IP address, from axum's connection info.
        None => Extractor::from_fn(|parts| {
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip().to_string())
        }),
    };
    let mut limits = TollgateLayer::new(client, Extractor::fixed(&args.scope))
        .identity(identity)
        .operation(Extractor::path())
        .legacy_headers(args.legacy_headers);
    if let Some(max_wait) = args.max_wait {
        limits = limits.max_wait(max_wait);
    }
    if args.concurrency {
        let status =
            StatusCode::from_u16(args.concurrency_status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
        limits = limits.concurrency(
            Concurrency::new()
                .ttl(args.lease_ttl)
                .deny_status(status)
                .on_renew_failure(|t, e| match e {
                    None => eprintln!(
                        "rust-proxy: lease {} lost; the response goes on",
                        t.lease_id
                    ),
                    Some(e) => eprintln!("rust-proxy: renewing lease {}: {e}", t.lease_id),
                }),
        );
    }
    let router = plain_router(args.upstream.clone());
    if !args.mcp {
        return Ok(router.layer(limits));
    }
    // MCP extraction on top of the same limits: it builds the Tollgate
    // service itself, so `limits` is not added again.
    let mut mcp = McpLayer::new(limits)
        .max_body_bytes(args.max_body_bytes)
        .error_code(args.mcp_error_code);
    if let Some(path) = &args.mcp_path {
        mcp = mcp.path(path);
    }
    Ok(router.layer(mcp))
}

/// A forwarder to `upstream`, without rate limiting.
pub fn plain_router(upstream: Uri) -> Router {
    let http = HttpClient::builder(TokioExecutor::new()).build_http();
    Router::new().fallback(forward).with_state(Upstream {
        base: upstream,
        http,
    })
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets
/// requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

#[derive(Clone, Debug)]
struct Upstream {
    base: Uri,
    http: HttpClient<HttpConnector, Body>,
}

/// Headers that belong to one connection, not to the request (RFC 9110
/// section 7.6.1), so a proxy must not pass them on.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
}

async fn forward(State(upstream): State<Upstream>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let prefix = upstream.base.path().trim_end_matches('/');
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut target = http::uri::Builder::new().path_and_query(format!("{prefix}{path}"));
    if let Some(scheme) = upstream.base.scheme() {
        target = target.scheme(scheme.clone());
    }
    if let Some(authority) = upstream.base.authority() {
        target = target.authority(authority.clone());
    }
    parts.uri = match target.build() {
        Ok(uri) => uri,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad path: {e}")).into_response(),
    };
    // The upstream connection is HTTP/1.1 whatever the client spoke.
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    // The upstream's own name, as the client sets it from the URI.
    parts.headers.remove(header::HOST);
    if let Some(peer) = parts.extensions.get::<ConnectInfo<SocketAddr>>()
        && let Ok(v) = http::HeaderValue::try_from(peer.0.ip().to_string())
    {
        parts.headers.append("x-forwarded-for", v);
    }
    match upstream
        .http
        .request(http::Request::from_parts(parts, body))
        .await
    {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            // The client's connection has its own version; hyper picks it.
            parts.version = http::Version::default();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => (StatusCode::BAD_GATEWAY, format!("upstream: {e}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("750us"), Ok(Duration::from_micros(750)));
        assert!(parse_duration("50").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("1.5s").is_err());
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
