//! The reference workflow (feature `assignment`): a freelance project is posted, freelancers
//! submit proposals, a manager accepts exactly one.
//!
//! Two managers clicking "Accept" on two proposals of the same project at the same instant
//! must never both win. [`accept_proposal`] makes that impossible by locking the project row
//! for the whole read-check-write: the loser either waits and then sees
//! [`AssignmentError::AlreadyAssigned`] ([`LockMode::Wait`](crate::LockMode::Wait)), or is
//! told [`AssignmentError::Busy`] at once ([`LockMode::NoWait`](crate::LockMode::NoWait), an
//! HTTP 409 "try again in a moment"). A partial unique index (at most one accepted proposal
//! per project) backs the invariant even for code paths that forget the lock.
//!
//! This module uses only rowlock's public API, as a service of yours would.
//!
//! | operation | locks | typed failures |
//! |---|---|---|
//! | [`create_project`] | — | `InvalidInput` |
//! | [`submit_proposal`] | project `FOR SHARE` (waits for an accept in progress) | `InvalidInput`, `ProjectNotFound`, `ProjectNotOpen`, `DuplicateProposal` |
//! | [`withdraw_proposal`] | the proposal row (conditional `UPDATE`) | `ProposalNotFound`, `NotPending` |
//! | [`accept_proposal`] | project, then proposal, `FOR NO KEY UPDATE` (one query, sent with `BEGIN`; the writes go with `COMMIT`) | `ProposalNotFound`, `AlreadyAssigned`, `NotPending`, `Busy`, `LockTimeout` |
//! | [`accept_proposal_in_one_statement`] | one statement: project `FOR NO KEY UPDATE`, then the proposal `FOR UPDATE` | `ProjectNotFound`, `ProposalNotFound`, `AlreadyAssigned`, `NotPending` |
//! | [`project_details`] | — (one snapshot) | `ProjectNotFound` |
//!
//! Accept and withdraw race cleanly: the accept locks the proposal and reads its latest
//! state, the withdrawal changes it only `WHERE status = 'pending'`, so exactly one of them
//! wins and the other reports `NotPending`.

mod error;
mod model;
mod ops;
mod schema;

pub use error::AssignmentError;
pub use model::{Project, ProjectDetails, ProjectStatus, Proposal, ProposalStatus};
pub use ops::{
    accept_proposal, accept_proposal_in_one_statement, create_project, project_details,
    submit_proposal, withdraw_proposal,
};
pub use schema::{ONE_ACCEPTED_INDEX, migrate};
