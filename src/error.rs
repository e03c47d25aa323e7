//! The one place where domain errors become gRPC statuses.

use tonic::Status;

use crate::limiter::reservation::TokenError;
use crate::limiter::{DecideError, LeaseError, SettleError};

/// A request field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidField {
    /// The field's path in the request, such as `attributes["tier"]`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl From<InvalidField> for Status {
    fn from(e: InvalidField) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

impl From<DecideError> for Status {
    fn from(e: DecideError) -> Self {
        match e {
            // UNAVAILABLE, not a denial: the caller can tell "the limiter is
            // down" from "you are over your limit", and Envoy applies its
            // failure_mode_deny.
            DecideError::StoreUnavailable { .. } => Status::unavailable(e.to_string()),
            DecideError::TooBigToReserve { .. } => Status::invalid_argument(e.to_string()),
        }
    }
}

impl From<SettleError> for Status {
    fn from(e: SettleError) -> Self {
        match e {
            SettleError::Token(TokenError::Malformed | TokenError::Forged) => {
                Status::invalid_argument(e.to_string())
            }
            SettleError::AlreadySettled | SettleError::Expired => {
                Status::failed_precondition(e.to_string())
            }
            SettleError::Store(_) => Status::unavailable(e.to_string()),
        }
    }
}

impl From<LeaseError> for Status {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            // UNAVAILABLE, as for decisions: not a refusal of the lease.
            LeaseError::StoreUnavailable { .. } => Status::unavailable(e.to_string()),
            LeaseError::Decide(e) => e.into(),
        }
    }
}
