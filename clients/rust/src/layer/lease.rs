//! [`Concurrency`]: a lease in the scope's concurrency limit for the
//! lifetime of each request, renewed while the response streams and
//! released when its body ends or is dropped.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, StatusCode};
use tokio::sync::oneshot;

use crate::client::Client;
use crate::error::Error;
use crate::lease::{LeaseTarget, MAX_LEASE_ID_BYTES};

/// The lease time to live unless [`Concurrency::ttl`] sets one: a proxy
/// that dies mid-request holds its slot for at most this long after its
/// last renew. It must not exceed the limit's `max_lease` (default 5m).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);

type OnRenewFailure = Arc<dyn Fn(&LeaseTarget, Option<&Error>) + Send + Sync>;

/// Holds a lease in the scope's concurrency limit (`concurrency: N`, see
/// docs/leases.md) for the lifetime of each request; give it to
/// [`super::TollgateLayer::concurrency`].
///
/// The lease is taken with the rates in the one `ShouldAllow` (all or
/// nothing), renewed every third of its TTL while the inner service works
/// and its response body streams, and released when the body ends, or when
/// the response future or body is dropped (the client went away). A scope
/// with no concurrency limit matching the request holds nothing. Under
/// [`super::McpLayer`], only a body of one `tools/call` takes a lease.
///
/// A full pool answers 429 with `Retry-After` (the earliest live lease's
/// expiry, an upper bound), or the status set by
/// [`Concurrency::deny_status`]. A renew that finds the lease gone (after a
/// stall longer than the TTL) stops renewing and tells
/// [`Concurrency::on_renew_failure`]: the response goes on, unleased.
#[derive(Clone)]
pub struct Concurrency {
    pub(crate) ttl: Duration,
    pub(crate) request_id_header: Option<HeaderName>,
    pub(crate) deny_status: StatusCode,
    pub(crate) on_renew_failure: Option<OnRenewFailure>,
}

impl std::fmt::Debug for Concurrency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Concurrency")
            .field("ttl", &self.ttl)
            .field("request_id_header", &self.request_id_header)
            .field("deny_status", &self.deny_status)
            .finish_non_exhaustive()
    }
}

impl Default for Concurrency {
    fn default() -> Self {
        Self::new()
    }
}

impl Concurrency {
    /// Leases of [`DEFAULT_LEASE_TTL`], random lease ids, and 429 for a
    /// full pool.
    pub fn new() -> Self {
        Self {
            ttl: DEFAULT_LEASE_TTL,
            request_id_header: None,
            deny_status: StatusCode::TOO_MANY_REQUESTS,
            on_renew_failure: None,
        }
    }

    /// Each lease's time to live, renewed every third of it. At most the
    /// limit's `max_lease` (Tollgate refuses a longer one: every request
    /// is then a 400).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_millis(3));
        self
    }

    /// Takes the lease id from this header (1 to 128 visible ASCII bytes),
    /// such as Envoy's `x-request-id`, so leases match logs. Only when a
    /// trusted proxy in front sets it: two requests with one id share one
    /// lease, so a client choosing its own ids could run any number at
    /// once. Without it, or when the value is not usable, the id is random.
    #[must_use]
    pub fn request_id_header(mut self, name: HeaderName) -> Self {
        self.request_id_header = Some(name);
        self
    }

    /// The status of a request refused because the pool is full: 429 (the
    /// default: the caller is over its share) or 503 (a pool protecting a
    /// backend shared by all callers). Any other status is taken as 429.
    #[must_use]
    pub fn deny_status(mut self, status: StatusCode) -> Self {
        self.deny_status = if status == StatusCode::SERVICE_UNAVAILABLE {
            status
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        self
    }

    /// Hears of each renew that failed: `None` when the lease was gone (the
    /// response goes on, unleased, and is not renewed again), or the error
    /// when Tollgate could not answer (tried again at the next tick).
    #[must_use]
    pub fn on_renew_failure(
        mut self,
        f: impl Fn(&LeaseTarget, Option<&Error>) + Send + Sync + 'static,
    ) -> Self {
        self.on_renew_failure = Some(Arc::new(f));
        self
    }

    /// The lease id of a request: its request id header, if set and
    /// usable, else a fresh one.
    pub(crate) fn lease_id(&self, parts: &Parts) -> String {
        let given = self
            .request_id_header
            .as_ref()
            .and_then(|name| parts.headers.get(name))
            .and_then(|v| v.to_str().ok())
            .filter(|v| usable_id(v));
        given.map_or_else(fresh_id, str::to_owned)
    }
}

fn usable_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_LEASE_ID_BYTES && v.bytes().all(|b| (b'!'..=b'~').contains(&b))
}

/// 128 bits in hex: a per-process counter (never repeats here) hashed with
/// two randomly keyed SipHashes (differs between processes), so no random
/// number crate is needed.
fn fresh_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut out = String::with_capacity(32);
    for _ in 0..2 {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_u32(std::process::id());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// The leases of one response. Dropping it (the body ended or was
/// dropped) stops the renewer, which then releases them.
#[derive(Debug)]
pub(crate) struct LeaseGuard {
    _stop: oneshot::Sender<()>,
}

/// Starts renewing `targets` every `ttl / 3`, until the guard is dropped;
/// then releases them.
pub(crate) fn hold(client: Client, targets: Vec<LeaseTarget>, c: &Concurrency) -> LeaseGuard {
    let (stop, mut stopped) = oneshot::channel::<()>();
    let (ttl, report) = (c.ttl, c.on_renew_failure.clone());
    tokio::spawn(async move {
        let mut live = targets.clone();
        while !live.is_empty() {
            // Ok: the guard was dropped (the sender's drop closes it).
            if tokio::time::timeout(ttl / 3, &mut stopped).await.is_ok() {
                break;
            }
            let mut kept = Vec::with_capacity(live.len());
            for t in live {
                match client.renew_lease(&t, Some(ttl)).await {
                    Ok(true) => kept.push(t),
                    Ok(false) => {
                        if let Some(f) = &report {
                            f(&t, None);
                        }
                    }
                    Err(e) => {
                        if let Some(f) = &report {
                            f(&t, Some(&e));
                        }
                        kept.push(t);
                    }
                }
            }
            live = kept;
        }
        // Every lease, lost ones included: a release is idempotent.
        for t in &targets {
            let _ = client.release_lease(t).await;
        }
    });
    LeaseGuard { _stop: stop }
}
