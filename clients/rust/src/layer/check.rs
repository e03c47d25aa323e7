//! Deciding one HTTP request: extract the keys, ask Tollgate (once, or per
//! JSON-RPC call when [`super::McpLayer`] read an MCP body), and either hand
//! the request on (with the headers to add to its response) or answer it
//! here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;

use super::Config;
use super::lease::{LeaseGuard, hold};
use super::mcp::McpBody;
use crate::decision::{Decision, DecisionRequest, MAX_BATCH};
use crate::error::Error;
use crate::headers::{self, PROBLEM_JSON};
use crate::mcp;

/// What the check concluded.
// Made and moved once per request; boxing the forwarded request to shrink
// this would cost an allocation on the path every allowed request takes.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Checked<B> {
    /// Call the inner service with this request, and add these headers to
    /// its response.
    Forward {
        request: Request<B>,
        headers: http::HeaderMap,
        /// The request's leases, held until its response body ends.
        lease: Option<LeaseGuard>,
    },
    /// Answer with this, without calling the inner service.
    Respond(Response<Full<Bytes>>),
}

pub(crate) type CheckFuture<B> = Pin<Box<dyn Future<Output = Checked<B>> + Send>>;

pub(crate) fn decide<B>(config: Arc<Config>, request: Request<B>) -> CheckFuture<B>
where
    B: Send + 'static,
{
    Box::pin(async move {
        let (mut parts, body) = request.into_parts();
        let base = match keys(&config, &parts) {
            Ok(base) => base,
            Err(reason) => {
                return Checked::Respond(problem(
                    StatusCode::BAD_REQUEST,
                    "Invalid rate-limit key",
                    &reason,
                ));
            }
        };
        match parts.extensions.remove::<McpBody>() {
            None => {
                let base = with_lease(&config, &parts, base);
                decide_plain(&config, parts, body, base).await
            }
            Some(McpBody::Read {
                body: mcp::Body::JsonRpc { calls, batch },
                error_code,
            }) => decide_mcp(&config, parts, body, base, &calls, batch, error_code).await,
            // Charged once, as a plain request, and refused (if it is) as
            // one JSON-RPC call without an id.
            Some(McpBody::Read {
                body: mcp::Body::Other,
                error_code,
            }) => {
                let call = mcp::Call {
                    id: None,
                    operation: None,
                };
                decide_mcp(&config, parts, body, base, &[call], false, error_code).await
            }
            // Could be read in more than one way: refused, nothing charged.
            Some(McpBody::Read {
                body: mcp::Body::Refused(reason),
                ..
            }) => Checked::Respond(respond(
                StatusCode::BAD_REQUEST,
                mcp::JSON,
                mcp::parse_error(&reason),
                http::HeaderMap::new(),
            )),
            Some(McpBody::TooLarge { cap }) => Checked::Respond(too_large(cap)),
            Some(McpBody::Encoded(coding)) => {
                let mut response = problem(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Compressed MCP body",
                    &format!(
                        "an MCP request body is read as sent, so it may not have Content-Encoding {coding:?}"
                    ),
                );
                response.headers_mut().insert(
                    header::ACCEPT_ENCODING,
                    HeaderValue::from_static("identity"),
                );
                Checked::Respond(response)
            }
            Some(McpBody::Unreadable(reason)) => Checked::Respond(problem(
                StatusCode::BAD_REQUEST,
                "Unreadable request body",
                &reason,
            )),
        }
    })
}

/// A plain HTTP request: one decision, operation from the extractor.
async fn decide_plain<B>(
    config: &Config,
    parts: Parts,
    body: B,
    base: DecisionRequest,
) -> Checked<B> {
    let decision = match config.client.should_allow(&base).await {
        Ok(d) => d,
        Err(e) => return Checked::Respond(error_response(&e)),
    };
    let decisions = [decision];
    if decisions[0].allowed {
        let lease = held(config, std::slice::from_ref(&base), &decisions);
        let mut headers = headers::render(&decisions, config.headers);
        wait_out(&decisions, &mut headers).await;
        Checked::Forward {
            request: Request::from_parts(parts, body),
            headers,
            lease,
        }
    } else {
        Checked::Respond(too_many_requests(config, &decisions))
    }
}

/// The JSON-RPC calls of a POST on the MCP endpoint, charged all or nothing.
///
/// Calls with the same operation become one entry whose cost is their count,
/// and the distinct operations go in one atomic `ShouldAllowBatch`: Tollgate
/// allows every entry, or denies them all and takes nothing, so a refused
/// body costs the caller no token, not even for the calls that had room.
/// (The atomic batch sums the cost of a bucket its entries share, so the
/// grouping changes no decision; it keeps a batch of many calls within
/// [`MAX_BATCH`] entries.) A body with one distinct operation is a single
/// `ShouldAllow`, atomic already.
async fn decide_mcp<B>(
    config: &Config,
    parts: Parts,
    body: B,
    base: DecisionRequest,
    calls: &[mcp::Call],
    batch: bool,
    error_code: i64,
) -> Checked<B> {
    let lease_id = config
        .concurrency
        .as_ref()
        .map(|c| (c.lease_id(&parts), c.ttl));
    let forward = |headers, lease| Checked::Forward {
        request: Request::from_parts(parts, body),
        headers,
        lease,
    };
    if calls.is_empty() {
        // Only notifications and responses: nothing is charged.
        return forward(http::HeaderMap::new(), None);
    }

    // One entry per distinct operation, costing the number of its calls.
    let costs = mcp::charges(calls, &base.operation);
    if costs.len() > MAX_BATCH {
        return Checked::Respond(problem(
            StatusCode::BAD_REQUEST,
            "Too many distinct calls",
            &format!("a JSON-RPC batch may hold at most {MAX_BATCH} distinct operations"),
        ));
    }
    let mut requests: Vec<DecisionRequest> = costs
        .into_iter()
        .map(|(operation, cost)| base.clone().with_operation(operation).with_cost(cost))
        .collect();
    // A lease per tools/call: a body of one call (a batch is decided
    // atomically, which cannot take a lease; see docs/leases.md).
    if let ([one], Some((id, ttl))) = (requests.as_mut_slice(), lease_id)
        && (one.operation == "tools/call" || one.operation.starts_with("tools/call:"))
    {
        *one = std::mem::take(one).with_lease(id, Some(ttl));
    }
    let answer = match requests.as_slice() {
        [one] => config.client.should_allow(one).await.map(|d| vec![d]),
        many => config.client.should_allow_batch_atomic(many).await,
    };
    let decisions = match answer {
        Ok(d) => d,
        Err(e) => return Checked::Respond(error_response(&e)),
    };
    if !headers::denied(&decisions) {
        let lease = held(config, &requests, &decisions);
        let mut headers = headers::render(&decisions, config.headers);
        wait_out(&decisions, &mut headers).await;
        return forward(headers, lease);
    }

    let retry_after = headers::retry_after(&decisions);
    let violated = headers::violated_policies(&decisions);
    let reason = decisions
        .iter()
        .find(|d| !d.allowed && !d.reason.is_empty())
        .map_or("", |d| d.reason.as_str());
    let body = mcp::denial(error_code, calls, batch, retry_after, &violated, reason);
    Checked::Respond(respond(
        deny_status(config, &decisions),
        mcp::JSON,
        body,
        headers::render(&decisions, config.headers),
    ))
}

/// The scope, identity, operation and attributes of a request, or why they
/// cannot be had (the caller's fault: a 400).
fn keys(config: &Config, parts: &Parts) -> Result<DecisionRequest, String> {
    let optional = |e: Option<&super::Extractor>| match e {
        Some(e) => e.extract(parts).map(Option::unwrap_or_default),
        None => Ok(String::new()),
    };
    let scope = config
        .scope
        .extract(parts)?
        .ok_or_else(|| "the request names no rate-limit scope".to_owned())?;
    let mut request = DecisionRequest::new(scope)
        .with_identity(optional(config.identity.as_ref())?)
        .with_operation(optional(config.operation.as_ref())?);
    request.max_wait = config.max_wait;
    for (name, extractor) in &config.attributes {
        if let Some(value) = extractor.extract(parts)? {
            request = request.with_attribute(name.clone(), value);
        }
    }
    Ok(request)
}

/// Shaping: holds an allowed request for the longest delay of its
/// decisions, and says so in `RateLimit-Delay` (seconds, to the
/// millisecond). The delay is never more than the `max_wait` asked with.
async fn wait_out(decisions: &[Decision], headers: &mut http::HeaderMap) {
    let delay = decisions.iter().map(|d| d.delay).max().unwrap_or_default();
    if delay.is_zero() {
        return;
    }
    let shown = format!("{}.{:03}", delay.as_secs(), delay.subsec_millis());
    if let Ok(value) = HeaderValue::from_str(&shown) {
        headers.insert(http::HeaderName::from_static("ratelimit-delay"), value);
    }
    tokio::time::sleep(delay).await;
}

/// Gives `request` a lease id when the layer holds leases.
fn with_lease(config: &Config, parts: &Parts, request: DecisionRequest) -> DecisionRequest {
    match &config.concurrency {
        Some(c) => request.with_lease(c.lease_id(parts), Some(c.ttl)),
        None => request,
    }
}

/// Starts holding the leases an allowed request was granted; a degraded
/// lease is not recorded, so there is nothing to renew or release.
fn held(
    config: &Config,
    requests: &[DecisionRequest],
    decisions: &[Decision],
) -> Option<LeaseGuard> {
    let c = config.concurrency.as_ref()?;
    let targets: Vec<_> = requests
        .iter()
        .zip(decisions)
        .filter(|(_, d)| d.allowed && d.lease.as_ref().is_some_and(|l| l.granted && !l.degraded))
        .map(|(r, _)| r.lease_target())
        .collect();
    (!targets.is_empty()).then(|| hold(config.client.clone(), targets, c))
}

/// 429, or the configured status when a concurrency limit denied.
fn deny_status(config: &Config, decisions: &[Decision]) -> StatusCode {
    match &config.concurrency {
        Some(c) if decisions.iter().any(Decision::lease_denied) => c.deny_status,
        _ => StatusCode::TOO_MANY_REQUESTS,
    }
}

fn too_many_requests(config: &Config, decisions: &[Decision]) -> Response<Full<Bytes>> {
    let status = deny_status(config, decisions);
    respond(
        status,
        PROBLEM_JSON,
        headers::problem_details_with_status(decisions, status),
        headers::render(decisions, config.headers),
    )
}

fn too_large(cap: usize) -> Response<Full<Bytes>> {
    problem(
        StatusCode::PAYLOAD_TOO_LARGE,
        "Request body too large",
        &format!("an MCP request body may be at most {cap} bytes"),
    )
}

/// The answer when Tollgate gave no decision.
fn error_response(error: &Error) -> Response<Full<Bytes>> {
    let (status, title) = match error {
        Error::InvalidRequest { .. } | Error::InvalidArgument(_) => {
            (StatusCode::BAD_REQUEST, "Invalid rate-limit key")
        }
        Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "Rate limiter unavailable"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "Rate limit check failed"),
    };
    problem(status, title, &error.to_string())
}

fn problem(status: StatusCode, title: &str, detail: &str) -> Response<Full<Bytes>> {
    respond(
        status,
        PROBLEM_JSON,
        headers::problem(status, title, detail),
        http::HeaderMap::new(),
    )
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
    headers: http::HeaderMap,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
