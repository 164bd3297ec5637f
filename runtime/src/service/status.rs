//! The one place errors become `tonic::Status`. Nothing we can classify is `INTERNAL`.

use tonic::Status;

use crate::driver::DriverError;
use crate::store::StoreError;

/// Why a request was not served.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("no council for role {0}")]
    UnknownRole(String),
    #[error("{running} deliberations are running (limit {limit}); retry later")]
    Overloaded { running: usize, limit: usize },
    #[error("deliberation exceeded its deadline of {0:?}")]
    DeadlineExceeded(std::time::Duration),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("deliberation failed: {0}")]
    DeliberationFailed(String),
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let message = e.to_string();
        match e {
            ServiceError::InvalidArgument { .. } => Status::invalid_argument(message),
            ServiceError::UnknownRole(_) => Status::not_found(message),
            ServiceError::Overloaded { .. } => Status::resource_exhausted(message),
            ServiceError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            ServiceError::Store(StoreError::AlreadyExists { .. }) => {
                Status::already_exists(message)
            }
            ServiceError::Store(StoreError::NotFound { .. }) => Status::not_found(message),
            ServiceError::Store(StoreError::Unavailable { .. } | StoreError::Corrupt { .. }) => {
                Status::unavailable(message)
            }
            ServiceError::NotImplemented(_) => Status::unimplemented(message),
            // Too many agents failed (usually the backend): retrying can succeed.
            ServiceError::DeliberationFailed(_) => Status::unavailable(message),
            // A protocol error between driver and state machine is our bug.
            ServiceError::Driver(_) => Status::internal(message),
        }
    }
}

pub fn invalid(field: &'static str, reason: impl Into<String>) -> ServiceError {
    ServiceError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}
