//! What can go wrong in the workflow, as values a handler can map to HTTP statuses.

use crate::{Error, ErrorKind};

use super::model::ProposalStatus;

/// A workflow failure. Each variant names one situation a caller handles differently; the
/// comment says the HTTP status a service would usually answer with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive] // the workflow may grow new refusals.
pub enum AssignmentError {
    /// Bad input (empty or over-long text…); nothing was written. 422.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// No project has this id. 404.
    #[error("project {0} not found")]
    ProjectNotFound(i64),
    /// No proposal has this id. 404.
    #[error("proposal {0} not found")]
    ProposalNotFound(i64),
    /// The project already has an accepted proposal. 409.
    #[error("project {0} is already assigned")]
    AlreadyAssigned(i64),
    /// Proposals can only be submitted to an open project. 409.
    #[error("project {0} is not open for proposals")]
    ProjectNotOpen(i64),
    /// This freelancer already submitted a proposal to this project. 409.
    #[error("{freelancer} already submitted a proposal to project {project_id}")]
    DuplicateProposal {
        /// The project.
        project_id: i64,
        /// The freelancer.
        freelancer: String,
    },
    /// The proposal is no longer pending (accepted, rejected or withdrawn). 409.
    #[error("proposal {id} is {} and can no longer change", .status.as_str())]
    NotPending {
        /// The proposal.
        id: i64,
        /// Its status now.
        status: ProposalStatus,
    },
    /// `NoWait`: another request holds the project right now. 409, "try again in a moment".
    #[error("the project is busy; try again in a moment")]
    Busy,
    /// The lock wait exceeded the lock timeout. 503 or 409.
    #[error("timed out waiting for the project")]
    LockTimeout,
    /// The database failed (connection, pool, retries exhausted…). 500. `Display` ends with
    /// rowlock's error, so a log line of `{e}` says what failed; it is also the `source`.
    #[error("database failure: {0}")]
    Db(#[source] Error),
}

impl From<Error> for AssignmentError {
    fn from(e: Error) -> Self {
        match e.kind() {
            ErrorKind::LockNotAvailable => AssignmentError::Busy,
            ErrorKind::LockTimeout => AssignmentError::LockTimeout,
            // NoWait with retries that kept finding the project busy.
            ErrorKind::RetriesExhausted
                if e.sql_state() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
            {
                AssignmentError::Busy
            }
            _ => AssignmentError::Db(e),
        }
    }
}
