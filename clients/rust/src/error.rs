//! The client's errors. A denial is not an error: it is a [`crate::Decision`]
//! with `allowed: false`.

use crate::decision::FailureCause;

/// What can go wrong when asking Tollgate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request breaks one of Tollgate's input limits; it was not sent.
    #[error("invalid request: {field}: {reason}")]
    InvalidRequest {
        /// The field's path, such as `identity` or `requests[2].scope`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Tollgate refused the request as invalid (`INVALID_ARGUMENT`); the
    /// message starts with the field's path.
    #[error("Tollgate refused the request: {0}")]
    InvalidArgument(String),
    /// Tollgate could not answer and the client fails closed; or, from
    /// [`crate::Client::settle`], Tollgate could not answer whatever the
    /// failure mode. Settling again is safe: a reservation settles once.
    #[error("{0}")]
    Unavailable(FailureCause),
    /// [`crate::Client::settle`]: the token is not a reservation Tollgate
    /// signed, or it was altered, or another deployment's key signed it.
    /// Nothing changed. The message says which.
    #[error("invalid reservation: {0}")]
    InvalidReservation(String),
    /// [`crate::Client::settle`]: the reservation was settled before, on
    /// this replica or another. Nothing changed. After a settle that ended
    /// in [`Error::Unavailable`] (a lost answer), this means the first
    /// attempt did land.
    #[error("{0}")]
    AlreadySettled(String),
    /// [`crate::Client::settle`]: the reservation's `settle_within` ran out,
    /// so its estimate stands as the cost. Nothing changed.
    #[error("{0}")]
    ReservationExpired(String),
    /// Tollgate answered with another gRPC error, such as `PERMISSION_DENIED`
    /// or `INTERNAL`. Not covered by the failure policy: it means a
    /// misconfiguration or a bug, not an outage.
    #[error("Tollgate answered {code:?}: {message}")]
    Status {
        /// The gRPC status code.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// The endpoint given to [`crate::ClientBuilder`] is not a usable URI.
    #[error("invalid Tollgate endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// [`crate::ClientBuilder::build`] was called outside a Tokio runtime.
    #[error("the Tollgate client must be built inside a Tokio runtime")]
    NoRuntime,
    /// Tollgate's answer did not match the question, such as a batch answer
    /// with the wrong number of entries.
    #[error("malformed answer from Tollgate: {0}")]
    MalformedResponse(String),
}

impl Error {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidRequest {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// True when the caller's input was at fault (the request was invalid),
    /// as opposed to Tollgate or the network.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Self::InvalidRequest { .. } | Self::InvalidArgument(_) | Self::InvalidReservation(_)
        )
    }
}
