//! The gRPC client: one reused connection, a deadline on every call, and the
//! local failure policy (with a small circuit breaker) for when Tollgate
//! cannot answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::decision::{
    Decision, DecisionRequest, FailureCause, MAX_BATCH, MAX_RESERVATION_BYTES, Reservation,
    Settlement,
};
use crate::error::Error;
use crate::pb::tollgate::v1 as pb;
use crate::pb::tollgate::v1::leases_client::LeasesClient;
use crate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient;

/// How long a call may take, from sending to the answer, unless set.
/// Tollgate answers in well under a millisecond on a LAN; 50 ms leaves room
/// for a slow network while keeping a dead one cheap.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(50);
/// How long opening the connection may take, unless set.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive failures that open the circuit breaker, unless set.
pub const DEFAULT_BREAKER_FAILURES: u32 = 3;
/// How long an open breaker answers locally before trying Tollgate again.
pub const DEFAULT_BREAKER_COOL_DOWN: Duration = Duration::from_millis(500);

/// What the client does when Tollgate cannot answer: it is unreachable, does
/// not answer within the deadline, or answers `UNAVAILABLE`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailureMode {
    /// Allow the request, uncounted: the [`Decision`] has `degraded` set and
    /// `local` says why. Availability over enforcement.
    #[default]
    Open,
    /// Return [`Error::Unavailable`], which the layer turns into a 503.
    Closed,
}

/// Configures a [`Client`]. Made by [`Client::builder`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    endpoint: String,
    deadline: Duration,
    connect_timeout: Duration,
    failure_mode: FailureMode,
    breaker_failures: u32,
    breaker_cool_down: Duration,
}

impl ClientBuilder {
    /// The whole time a call may take; past it the failure policy applies.
    /// Also sent to Tollgate as the gRPC deadline, so it stops working on an
    /// answer nobody waits for.
    #[must_use]
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// How long opening a connection may take.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// What to do when Tollgate cannot answer.
    #[must_use]
    pub fn failure_mode(mut self, mode: FailureMode) -> Self {
        self.failure_mode = mode;
        self
    }

    /// After `failures` consecutive failed calls, answer locally (by the
    /// failure mode) for `cool_down` without asking Tollgate, so that a dead
    /// Tollgate costs each request microseconds rather than a deadline. After
    /// the cool-down, calls go to Tollgate again; one more failure opens the
    /// breaker again, a success closes it. `failures: 0` turns it off.
    #[must_use]
    pub fn circuit_breaker(mut self, failures: u32, cool_down: Duration) -> Self {
        self.breaker_failures = failures;
        self.breaker_cool_down = cool_down;
        self
    }

    /// Builds the client. No connection is made yet: it opens on the first
    /// call, and again after it breaks, so a client built while Tollgate is
    /// down works (by its failure mode) and recovers by itself.
    ///
    /// Must run inside a Tokio runtime, which drives the connection.
    pub fn build(self) -> Result<Client, Error> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::NoRuntime);
        }
        let invalid = |reason: &str| Error::InvalidEndpoint {
            endpoint: self.endpoint.clone(),
            reason: reason.to_owned(),
        };
        let uri = if self.endpoint.contains("://") {
            self.endpoint.clone()
        } else {
            format!("http://{}", self.endpoint)
        };
        if !uri.starts_with("http://") {
            // tonic is built here without TLS; an https endpoint would fail on
            // every call, so refuse it now.
            return Err(invalid("only http:// (plaintext gRPC) is supported"));
        }
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| invalid(&e.to_string()))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        let channel: Channel = endpoint.connect_lazy();
        Ok(Client {
            grpc: RateLimiterClient::new(channel.clone()),
            leases: LeasesClient::new(channel),
            deadline: self.deadline,
            shared: Arc::new(Shared {
                failure_mode: self.failure_mode,
                breaker: Breaker::new(self.breaker_failures, self.breaker_cool_down),
            }),
        })
    }
}

/// A Tollgate client. Cheap to clone: clones share one HTTP/2 connection,
/// which carries any number of calls at once, and one circuit breaker.
#[derive(Clone, Debug)]
pub struct Client {
    grpc: RateLimiterClient<Channel>,
    /// `tollgate.v1.Leases`, on the same connection (see `crate::lease`).
    pub(crate) leases: LeasesClient<Channel>,
    /// Per client value rather than shared, so [`Client::with_deadline`] can
    /// give one call site a different deadline without another connection.
    deadline: Duration,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    failure_mode: FailureMode,
    breaker: Breaker,
}

impl Client {
    /// Starts configuring a client for Tollgate at `endpoint`: `HOST:PORT` or
    /// `http://HOST:PORT`.
    pub fn builder(endpoint: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            endpoint: endpoint.into(),
            deadline: DEFAULT_DEADLINE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            failure_mode: FailureMode::default(),
            breaker_failures: DEFAULT_BREAKER_FAILURES,
            breaker_cool_down: DEFAULT_BREAKER_COOL_DOWN,
        }
    }

    /// This client, with another deadline for its calls.
    #[must_use]
    pub fn with_deadline(&self, deadline: Duration) -> Self {
        Self {
            deadline,
            ..self.clone()
        }
    }

    /// The deadline of this client's calls.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// False while the circuit breaker skips calls.
    pub(crate) fn breaker_allows(&self) -> bool {
        self.shared.breaker.allows_call()
    }

    /// The failure mode this client was built with.
    pub fn failure_mode(&self) -> FailureMode {
        self.shared.failure_mode
    }

    /// Asks Tollgate about one request.
    ///
    /// A denial is `Ok` with `allowed: false`. When Tollgate cannot answer,
    /// the failure mode decides: `Open` gives an allowed, degraded decision
    /// with `local` set; `Closed` gives [`Error::Unavailable`].
    pub async fn should_allow(&self, request: &DecisionRequest) -> Result<Decision, Error> {
        request.validate("")?;
        if !self.shared.breaker.allows_call() {
            return self
                .fail(FailureCause::CircuitOpen)
                .map(Decision::fail_open);
        }
        let mut call = tonic::Request::new(request.to_proto());
        call.set_timeout(self.deadline);
        let mut grpc = self.grpc.clone();
        let answer = tokio::time::timeout(self.deadline, grpc.should_allow(call)).await;
        match self.sort(answer)? {
            Ok(response) => Ok(response.into()),
            Err(cause) => self.fail(cause).map(Decision::fail_open),
        }
    }

    /// Asks about several independent requests in one call (at most
    /// [`MAX_BATCH`]); the decisions come back in order. Tollgate decides
    /// each entry on its own, exactly as [`Client::should_allow`] would, one
    /// after another: the batch is not all-or-nothing (for that, see
    /// [`Client::should_allow_batch_atomic`]).
    ///
    /// When Tollgate cannot answer, `Open` allows every entry (degraded) and
    /// `Closed` fails the whole call.
    pub async fn should_allow_batch(
        &self,
        requests: &[DecisionRequest],
    ) -> Result<Vec<Decision>, Error> {
        self.batch(requests, false).await
    }

    /// Asks about several requests (at most [`MAX_BATCH`]) as one atomic
    /// charge: every one is allowed, or none is and none takes anything. A
    /// bucket that several requests draw on must hold their summed cost.
    ///
    /// When denied, every decision is denied. Those whose own buckets ran out
    /// carry `retry_after` (or a `reason`); the others report
    /// [`Decision::denied_by_batch`]. The batch may pass once the longest
    /// `retry_after` has gone by. When Tollgate cannot answer, the failure
    /// mode applies as in [`Client::should_allow_batch`].
    pub async fn should_allow_batch_atomic(
        &self,
        requests: &[DecisionRequest],
    ) -> Result<Vec<Decision>, Error> {
        self.batch(requests, true).await
    }

    async fn batch(
        &self,
        requests: &[DecisionRequest],
        atomic: bool,
    ) -> Result<Vec<Decision>, Error> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        if requests.len() > MAX_BATCH {
            return Err(Error::invalid(
                "requests",
                format!(
                    "has {} entries; the most allowed is {MAX_BATCH}",
                    requests.len()
                ),
            ));
        }
        for (i, r) in requests.iter().enumerate() {
            r.validate_in_batch(i)?;
        }
        let fail_all = |cause: FailureCause| {
            self.fail(cause)
                .map(|cause| vec![Decision::fail_open(cause); requests.len()])
        };
        if !self.shared.breaker.allows_call() {
            return fail_all(FailureCause::CircuitOpen);
        }
        let mut call = tonic::Request::new(pb::ShouldAllowBatchRequest {
            requests: requests.iter().map(DecisionRequest::to_proto).collect(),
            atomic,
        });
        call.set_timeout(self.deadline);
        let mut grpc = self.grpc.clone();
        let answer = tokio::time::timeout(self.deadline, grpc.should_allow_batch(call)).await;
        let responses = match self.sort(answer)? {
            Ok(batch) => batch.responses,
            Err(cause) => return fail_all(cause),
        };
        if responses.len() != requests.len() {
            return Err(Error::MalformedResponse(format!(
                "{} answers to a batch of {}",
                responses.len(),
                requests.len()
            )));
        }
        Ok(responses.into_iter().map(Decision::from).collect())
    }

    /// Settles a reservation: applies the real cost of a request that was
    /// allowed with [`DecisionRequest::with_settle_within`] (its cost was an
    /// estimate) to every bucket it charged, atomically. Below the estimate,
    /// the difference goes back (never more than the reservation still holds
    /// back); above it, the extra is taken, into debt if need be, so later
    /// requests wait until refill pays it.
    ///
    /// The call has the client's deadline, and the breaker applies, but the
    /// failure mode does not: when Tollgate cannot answer, this is
    /// [`Error::Unavailable`] whatever the mode, since a settle made up
    /// locally would drop the refund or the debt. Settling again is safe (a
    /// reservation settles once), until its `settle_within` runs out; after
    /// a lost answer, the retry may find [`Error::AlreadySettled`], which
    /// then means the first attempt landed.
    ///
    /// Refused, changing nothing: [`Error::InvalidReservation`] (not a token
    /// Tollgate signed, or altered), [`Error::AlreadySettled`],
    /// [`Error::ReservationExpired`] (the estimate stands).
    pub async fn settle(
        &self,
        reservation: &Reservation,
        actual_cost: u32,
    ) -> Result<Settlement, Error> {
        let token = reservation.as_str();
        if token.is_empty() || token.len() > MAX_RESERVATION_BYTES {
            return Err(Error::InvalidReservation(format!(
                "is {} bytes; a reservation is 1 to {MAX_RESERVATION_BYTES}",
                token.len()
            )));
        }
        if !self.shared.breaker.allows_call() {
            return Err(Error::Unavailable(FailureCause::CircuitOpen));
        }
        let mut call = tonic::Request::new(pb::SettleRequest {
            reservation: token.to_owned(),
            actual_cost: u64::from(actual_cost),
        });
        call.set_timeout(self.deadline);
        let mut grpc = self.grpc.clone();
        let answer = tokio::time::timeout(self.deadline, grpc.settle(call)).await;
        match self.sort(answer) {
            Ok(Ok(settled)) => Ok(settled.into()),
            Ok(Err(cause)) => Err(Error::Unavailable(cause)),
            Err(Error::InvalidArgument(message)) if message.starts_with("reservation") => {
                let message = message.strip_prefix("reservation: ").unwrap_or(&message);
                Err(Error::InvalidReservation(message.to_owned()))
            }
            Err(Error::Status {
                code: tonic::Code::FailedPrecondition,
                message,
            }) if message.contains("already settled") => Err(Error::AlreadySettled(message)),
            Err(Error::Status {
                code: tonic::Code::FailedPrecondition,
                message,
            }) if message.contains("expired") => Err(Error::ReservationExpired(message)),
            Err(e) => Err(e),
        }
    }

    /// Sorts a call's outcome into an answer, a failure the policy covers,
    /// or an error it does not; and tells the breaker.
    pub(crate) fn sort<T>(
        &self,
        answer: Result<Result<tonic::Response<T>, tonic::Status>, tokio::time::error::Elapsed>,
    ) -> Result<Result<T, FailureCause>, Error> {
        let status = match answer {
            Ok(Ok(response)) => {
                self.shared.breaker.record_success();
                return Ok(Ok(response.into_inner()));
            }
            Err(_elapsed) => {
                self.shared.breaker.record_failure();
                return Ok(Err(FailureCause::DeadlineExceeded));
            }
            Ok(Err(status)) => status,
        };
        let cause = if let Some(source) = std::error::Error::source(&status) {
            // A status with a source was made here, not sent by Tollgate:
            // tonic's own deadline (from the grpc-timeout we set) fired, or a
            // transport error (connect refused, connection reset).
            if has_in_chain::<tonic::TimeoutExpired>(source) {
                FailureCause::DeadlineExceeded
            } else {
                FailureCause::Unreachable(status.message().to_owned())
            }
        } else {
            match status.code() {
                tonic::Code::Unavailable => FailureCause::Unavailable(status.message().to_owned()),
                tonic::Code::DeadlineExceeded => FailureCause::DeadlineExceeded,
                tonic::Code::Cancelled => FailureCause::Unreachable(status.message().to_owned()),
                code => {
                    // Tollgate answered: it is up, whatever it thought of us.
                    self.shared.breaker.record_success();
                    return Err(if code == tonic::Code::InvalidArgument {
                        Error::InvalidArgument(status.message().to_owned())
                    } else {
                        Error::Status {
                            code,
                            message: status.message().to_owned(),
                        }
                    });
                }
            }
        };
        self.shared.breaker.record_failure();
        Ok(Err(cause))
    }

    /// Applies the failure mode: `Open` hands the cause on for a local
    /// decision, `Closed` turns it into an error.
    pub(crate) fn fail(&self, cause: FailureCause) -> Result<FailureCause, Error> {
        match self.shared.failure_mode {
            FailureMode::Open => Ok(cause),
            FailureMode::Closed => Err(Error::Unavailable(cause)),
        }
    }
}

fn has_in_chain<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<E>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// Counts consecutive failures; past the threshold, calls are answered
/// locally until the cool-down ends. Lock-free: two atomics, relaxed, since a
/// call or two more or less during a transition changes nothing that
/// matters.
#[derive(Debug)]
struct Breaker {
    /// 0 turns the breaker off.
    threshold: u32,
    cool_down: Duration,
    failures: AtomicU32,
    /// Nanoseconds after `epoch` until which calls are answered locally.
    open_until: AtomicU64,
    /// tokio's clock, so tests can pause and advance it.
    epoch: Instant,
}

impl Breaker {
    fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            threshold,
            cool_down,
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn allows_call(&self) -> bool {
        self.threshold == 0 || self.now() >= self.open_until.load(Ordering::Relaxed)
    }

    fn record_success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    fn record_failure(&self) {
        if self.threshold == 0 {
            return;
        }
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures >= self.threshold {
            let cool_down = u64::try_from(self.cool_down.as_nanos()).unwrap_or(u64::MAX);
            self.open_until
                .store(self.now().saturating_add(cool_down), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_after_consecutive_failures_and_closes_after_cool_down() {
        let b = Breaker::new(2, Duration::from_millis(500));
        assert!(b.allows_call());
        b.record_failure();
        assert!(b.allows_call(), "one failure is below the threshold");
        b.record_success();
        b.record_failure();
        assert!(b.allows_call(), "a success resets the count");
        b.record_failure();
        assert!(!b.allows_call(), "two in a row open it");
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(!b.allows_call());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(b.allows_call(), "half-open after the cool-down");
        b.record_failure();
        assert!(!b.allows_call(), "a failed probe opens it again");
    }

    #[tokio::test]
    async fn a_zero_threshold_turns_the_breaker_off() {
        let b = Breaker::new(0, Duration::from_secs(60));
        for _ in 0..10 {
            b.record_failure();
        }
        assert!(b.allows_call());
    }

    #[tokio::test]
    async fn endpoints_without_a_scheme_get_http_and_https_is_refused() {
        assert!(Client::builder("127.0.0.1:1").build().is_ok());
        assert!(Client::builder("http://127.0.0.1:1").build().is_ok());
        let err = Client::builder("https://127.0.0.1:1").build().unwrap_err();
        assert!(matches!(err, Error::InvalidEndpoint { .. }), "{err}");
        let err = Client::builder("not a uri").build().unwrap_err();
        assert!(matches!(err, Error::InvalidEndpoint { .. }), "{err}");
    }

    #[test]
    fn building_outside_a_runtime_is_an_error_not_a_panic() {
        let err = Client::builder("127.0.0.1:1").build().unwrap_err();
        assert!(matches!(err, Error::NoRuntime));
    }
}
