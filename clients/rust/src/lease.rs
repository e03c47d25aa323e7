//! Concurrency limits (`concurrency: N`, see docs/leases.md): the lease a
//! [`crate::DecisionRequest::with_lease`] takes with its rates, and the
//! calls that renew and release it.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::client::Client;
use crate::decision::FailureCause;
use crate::error::Error;
use crate::pb::tollgate::v1 as pb;

/// The longest lease id Tollgate accepts, in bytes.
pub const MAX_LEASE_ID_BYTES: usize = 128;

/// The lease a decision took with its rates, when the request carried a
/// lease id and one of the scope's concurrency limits matched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lease {
    /// True when the lease is held: the request was allowed. A request the
    /// rates denied gave its lease back.
    pub granted: bool,
    /// The lease id, as sent.
    pub id: String,
    /// Time the lease has left, when granted.
    pub ttl: Duration,
    /// The lease's expiry, microseconds since the Unix epoch on the store's
    /// clock; 0 when not held or degraded.
    pub expires_at_unix_micros: u64,
    /// The pool's weight held by live leases after the call.
    pub in_flight: u64,
    /// The pool's `concurrency`.
    pub limit: u64,
    /// The concurrency limit's name.
    pub rule: String,
    /// The store could not answer and the scope fails open: granted, but
    /// not recorded.
    pub degraded: bool,
}

impl From<pb::LeaseGrant> for Lease {
    fn from(g: pb::LeaseGrant) -> Self {
        Self {
            granted: g.granted,
            id: g.lease_id,
            ttl: g
                .ttl
                .and_then(|d| Duration::try_from(d).ok())
                .unwrap_or_default(),
            expires_at_unix_micros: g.expires_at_unix_micros,
            in_flight: g.in_flight,
            limit: g.limit,
            rule: g.rule,
            degraded: g.degraded,
        }
    }
}

/// Which lease: the scope, identity, operation and attributes choose the
/// pool (send those the lease was taken with), `lease_id` the lease in it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseTarget {
    /// The scope.
    pub scope: String,
    /// The caller.
    pub identity: String,
    /// The operation.
    pub operation: String,
    /// The attributes.
    pub attributes: BTreeMap<String, String>,
    /// The lease's id.
    pub lease_id: String,
}

impl LeaseTarget {
    fn to_proto(&self) -> pb::LeaseTarget {
        pb::LeaseTarget {
            scope: self.scope.clone(),
            identity: self.identity.clone(),
            operation: self.operation.clone(),
            attributes: self
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            lease_id: self.lease_id.clone(),
        }
    }
}

fn ttl(ttl: Option<Duration>) -> Option<prost_types::Duration> {
    ttl.and_then(|d| prost_types::Duration::try_from(d).ok())
}

impl Client {
    /// Sets a live lease's expiry to now + `ttl` on Tollgate's store clock
    /// (`None`: the limit's `max_lease`). `Ok(false)` means the lease is
    /// gone (expired or released): stop the work, or acquire again. The
    /// failure mode does not apply: when Tollgate cannot answer, this is
    /// [`Error::Unavailable`], and the lease runs on to its expiry.
    pub async fn renew_lease(
        &self,
        target: &LeaseTarget,
        lease_ttl: Option<Duration>,
    ) -> Result<bool, Error> {
        if !self.breaker_allows() {
            return Err(Error::Unavailable(FailureCause::CircuitOpen));
        }
        let mut call = tonic::Request::new(pb::RenewRequest {
            target: Some(target.to_proto()),
            ttl: ttl(lease_ttl),
        });
        call.set_timeout(self.deadline());
        let mut grpc = self.leases.clone();
        let answer = tokio::time::timeout(self.deadline(), grpc.renew(call)).await;
        match self.sort(answer)? {
            Ok(r) => Ok(r.renewed),
            Err(cause) => Err(Error::Unavailable(cause)),
        }
    }

    /// Gives a lease back. Idempotent: an unknown or expired lease is fine.
    /// The failure mode does not apply: when Tollgate cannot answer, this is
    /// [`Error::Unavailable`], and the slot comes back at the lease's
    /// expiry.
    pub async fn release_lease(&self, target: &LeaseTarget) -> Result<(), Error> {
        if !self.breaker_allows() {
            return Err(Error::Unavailable(FailureCause::CircuitOpen));
        }
        let mut call = tonic::Request::new(pb::ReleaseRequest {
            target: Some(target.to_proto()),
        });
        call.set_timeout(self.deadline());
        let mut grpc = self.leases.clone();
        let answer = tokio::time::timeout(self.deadline(), grpc.release(call)).await;
        match self.sort(answer)? {
            Ok(_) => Ok(()),
            Err(cause) => Err(Error::Unavailable(cause)),
        }
    }
}
