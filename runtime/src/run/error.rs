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
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{limit} deliberations are running (limit {limit}); retry later")]
    Overloaded { limit: usize },
    #[error(
        "task {0} is already being deliberated; watch it with GetDeliberationResult or retry later"
    )]
    AlreadyRunning(String),
    #[error("deliberation exceeded its deadline of {0:?}")]
    DeadlineExceeded(std::time::Duration),
    #[error("the service is shutting down; retry on another replica or later")]
    ShuttingDown,
    #[error("cancelled by the client")]
    Cancelled,
    #[error("missing or invalid bearer token")]
    Unauthenticated,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The deliberation ended without a quorum; `retryable` when a backend error took agents
    /// out (an empty or unusable reply would come again: the run is deterministic).
    #[error("deliberation failed: {reason}")]
    DeliberationFailed { reason: String, retryable: bool },
    /// Another replica judged this run dead and claimed its task: this run stopped.
    #[error("task {0} was taken over by another replica")]
    TakenOver(String),
    /// The run ended without reporting (its task panicked): our bug.
    #[error("the deliberation ended without a result")]
    Lost,
}

impl ServiceError {
    pub fn to_status(&self) -> Status {
        let message = self.to_string();
        match self {
            ServiceError::InvalidArgument { .. } => Status::invalid_argument(message),
            ServiceError::UnknownRole(_) | ServiceError::NotFound(_) => Status::not_found(message),
            ServiceError::FailedPrecondition(_) => Status::failed_precondition(message),
            ServiceError::AlreadyExists(_) => Status::already_exists(message),
            ServiceError::Overloaded { .. } => Status::resource_exhausted(message),
            ServiceError::AlreadyRunning(_) => Status::aborted(message),
            ServiceError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            ServiceError::ShuttingDown => Status::unavailable(message),
            ServiceError::Cancelled => Status::cancelled(message),
            ServiceError::Unauthenticated => Status::unauthenticated(message),
            ServiceError::Store(StoreError::AlreadyExists { .. }) => {
                Status::already_exists(message)
            }
            ServiceError::Store(StoreError::NotFound { .. }) => Status::not_found(message),
            ServiceError::Store(StoreError::Conflict { .. }) => Status::aborted(message),
            ServiceError::Store(StoreError::Unavailable { .. } | StoreError::Corrupt { .. }) => {
                Status::unavailable(message)
            }
            // Too many agents failed: retrying can succeed when the backend was the cause.
            ServiceError::DeliberationFailed {
                retryable: true, ..
            } => Status::unavailable(message),
            // The model's replies were unusable: the same task would fail the same way.
            ServiceError::DeliberationFailed {
                retryable: false, ..
            } => Status::failed_precondition(message),
            ServiceError::TakenOver(_) => Status::aborted(message),
            // A protocol error between driver and state machine, or a lost run, is our bug.
            ServiceError::Driver(_) | ServiceError::Lost => Status::internal(message),
        }
    }

    /// Whether running the same task again can succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            ServiceError::InvalidArgument { .. }
                | ServiceError::UnknownRole(_)
                | ServiceError::Driver(_)
                | ServiceError::Lost
                | ServiceError::Store(StoreError::Corrupt { .. })
                | ServiceError::DeliberationFailed {
                    retryable: false,
                    ..
                }
        )
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        e.to_status()
    }
}

pub fn invalid(field: &'static str, reason: impl Into<String>) -> ServiceError {
    ServiceError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use council_councils::Role;
    use tonic::Code;

    #[test]
    fn every_error_has_its_code() {
        let store = |reason: &str| StoreError::Unavailable {
            store: "s".into(),
            reason: reason.into(),
        };
        let cases = [
            (invalid("rounds", "11"), Code::InvalidArgument),
            (ServiceError::UnknownRole("X".into()), Code::NotFound),
            (ServiceError::NotFound("agent".into()), Code::NotFound),
            (
                ServiceError::FailedPrecondition("last".into()),
                Code::FailedPrecondition,
            ),
            (
                ServiceError::AlreadyExists("agent".into()),
                Code::AlreadyExists,
            ),
            (
                ServiceError::Overloaded { limit: 1 },
                Code::ResourceExhausted,
            ),
            (ServiceError::AlreadyRunning("t".into()), Code::Aborted),
            (
                ServiceError::DeadlineExceeded(std::time::Duration::from_secs(1)),
                Code::DeadlineExceeded,
            ),
            (ServiceError::ShuttingDown, Code::Unavailable),
            (ServiceError::Cancelled, Code::Cancelled),
            (ServiceError::Unauthenticated, Code::Unauthenticated),
            (
                ServiceError::Store(StoreError::AlreadyExists { role: Role::Dev }),
                Code::AlreadyExists,
            ),
            (
                ServiceError::Store(StoreError::NotFound { role: Role::Dev }),
                Code::NotFound,
            ),
            (
                ServiceError::Store(StoreError::Conflict { role: Role::Dev }),
                Code::Aborted,
            ),
            (ServiceError::Store(store("down")), Code::Unavailable),
            (
                ServiceError::DeliberationFailed {
                    reason: "quorum".into(),
                    retryable: true,
                },
                Code::Unavailable,
            ),
            (
                ServiceError::DeliberationFailed {
                    reason: "quorum".into(),
                    retryable: false,
                },
                Code::FailedPrecondition,
            ),
            (ServiceError::TakenOver("t".into()), Code::Aborted),
            (ServiceError::Lost, Code::Internal),
        ];
        for (e, code) in cases {
            let status = e.to_status();
            assert_eq!(status.code(), code, "{e}");
            assert_eq!(status.message(), e.to_string());
        }
        assert!(ServiceError::ShuttingDown.is_retryable());
        assert!(!invalid("x", "y").is_retryable());
        // Only what another try can change is retried.
        let quorum = |retryable| ServiceError::DeliberationFailed {
            reason: "1 of 3 agents still working".into(),
            retryable,
        };
        assert!(quorum(true).is_retryable());
        assert!(!quorum(false).is_retryable());
        assert!(ServiceError::Store(store("down")).is_retryable());
        let corrupt = StoreError::Corrupt {
            store: "s".into(),
            reason: "not a record".into(),
        };
        assert!(!ServiceError::Store(corrupt).is_retryable());
    }
}
