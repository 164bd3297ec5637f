//! The one place errors become `tonic::Status`. Nothing we can classify is `INTERNAL`.

use tonic::Status;

use crate::driver::DriverError;
use crate::store::StoreError;

/// Why a request was not served.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
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

impl RunError {
    pub fn to_status(&self) -> Status {
        let message = self.to_string();
        match self {
            RunError::InvalidArgument { .. } => Status::invalid_argument(message),
            RunError::UnknownRole(_) | RunError::NotFound(_) => Status::not_found(message),
            RunError::FailedPrecondition(_) => Status::failed_precondition(message),
            RunError::AlreadyExists(_) => Status::already_exists(message),
            RunError::Overloaded { .. } => Status::resource_exhausted(message),
            RunError::AlreadyRunning(_) => Status::aborted(message),
            RunError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            RunError::ShuttingDown => Status::unavailable(message),
            RunError::Cancelled => Status::cancelled(message),
            RunError::Unauthenticated => Status::unauthenticated(message),
            RunError::Store(StoreError::AlreadyExists { .. }) => Status::already_exists(message),
            RunError::Store(StoreError::NotFound { .. }) => Status::not_found(message),
            RunError::Store(StoreError::Conflict { .. }) => Status::aborted(message),
            RunError::Store(StoreError::Unavailable { .. } | StoreError::Corrupt { .. }) => {
                Status::unavailable(message)
            }
            // Too many agents failed: retrying can succeed when the backend was the cause.
            RunError::DeliberationFailed {
                retryable: true, ..
            } => Status::unavailable(message),
            // The model's replies were unusable: the same task would fail the same way.
            RunError::DeliberationFailed {
                retryable: false, ..
            } => Status::failed_precondition(message),
            RunError::TakenOver(_) => Status::aborted(message),
            // A protocol error between driver and state machine, or a lost run, is our bug.
            RunError::Driver(_) | RunError::Lost => Status::internal(message),
        }
    }

    /// The class a failure that is not retried carries in its failed event and dead letter:
    /// `invalid` (the request), `unknown_council` (its role), `failed` (anything else).
    pub fn class(&self) -> &'static str {
        match self {
            RunError::UnknownRole(_) => "unknown_council",
            RunError::InvalidArgument { .. } => "invalid",
            _ => "failed",
        }
    }

    /// Whether running the same task again can succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            RunError::InvalidArgument { .. }
                | RunError::UnknownRole(_)
                | RunError::Driver(_)
                | RunError::Lost
                | RunError::Store(StoreError::Corrupt { .. })
                | RunError::DeliberationFailed {
                    retryable: false,
                    ..
                }
        )
    }
}

impl From<RunError> for Status {
    fn from(e: RunError) -> Self {
        e.to_status()
    }
}

pub fn invalid(field: &'static str, reason: impl Into<String>) -> RunError {
    RunError::InvalidArgument {
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
            (RunError::UnknownRole("X".into()), Code::NotFound),
            (RunError::NotFound("agent".into()), Code::NotFound),
            (
                RunError::FailedPrecondition("last".into()),
                Code::FailedPrecondition,
            ),
            (RunError::AlreadyExists("agent".into()), Code::AlreadyExists),
            (RunError::Overloaded { limit: 1 }, Code::ResourceExhausted),
            (RunError::AlreadyRunning("t".into()), Code::Aborted),
            (
                RunError::DeadlineExceeded(std::time::Duration::from_secs(1)),
                Code::DeadlineExceeded,
            ),
            (RunError::ShuttingDown, Code::Unavailable),
            (RunError::Cancelled, Code::Cancelled),
            (RunError::Unauthenticated, Code::Unauthenticated),
            (
                RunError::Store(StoreError::AlreadyExists { role: Role::Dev }),
                Code::AlreadyExists,
            ),
            (
                RunError::Store(StoreError::NotFound { role: Role::Dev }),
                Code::NotFound,
            ),
            (
                RunError::Store(StoreError::Conflict { role: Role::Dev }),
                Code::Aborted,
            ),
            (RunError::Store(store("down")), Code::Unavailable),
            (
                RunError::DeliberationFailed {
                    reason: "quorum".into(),
                    retryable: true,
                },
                Code::Unavailable,
            ),
            (
                RunError::DeliberationFailed {
                    reason: "quorum".into(),
                    retryable: false,
                },
                Code::FailedPrecondition,
            ),
            (RunError::TakenOver("t".into()), Code::Aborted),
            (RunError::Lost, Code::Internal),
        ];
        for (e, code) in cases {
            let status = e.to_status();
            assert_eq!(status.code(), code, "{e}");
            assert_eq!(status.message(), e.to_string());
        }
        assert!(RunError::ShuttingDown.is_retryable());
        assert!(!invalid("x", "y").is_retryable());
        // Only what another try can change is retried.
        let quorum = |retryable| RunError::DeliberationFailed {
            reason: "1 of 3 agents still working".into(),
            retryable,
        };
        assert!(quorum(true).is_retryable());
        assert!(!quorum(false).is_retryable());
        assert!(RunError::Store(store("down")).is_retryable());
        let corrupt = StoreError::Corrupt {
            store: "s".into(),
            reason: "not a record".into(),
        };
        assert!(!RunError::Store(corrupt).is_retryable());
    }

    #[test]
    fn failures_that_are_not_retried_carry_their_class() {
        assert_eq!(invalid("rounds", "11").class(), "invalid");
        assert_eq!(RunError::UnknownRole("X".into()).class(), "unknown_council");
        let failed = RunError::DeliberationFailed {
            reason: "0 of 3 agents still working".into(),
            retryable: false,
        };
        assert_eq!(failed.class(), "failed");
        assert_eq!(RunError::Lost.class(), "failed");
    }
}
