//! The operations, as methods of [`crate::Db`] (and of [`crate::Transaction`] inside the
//! caller's transaction): each names its lock step and hands it to the attempt loop
//! ([`crate::attempt`]).

pub(crate) mod advisory;
pub(crate) mod claim;
pub(crate) mod claim_sql;
pub(crate) mod commit_outcome;
pub(crate) mod executor;
pub(crate) mod lease;
pub(crate) mod rows;
pub(crate) mod set;
pub(crate) mod transaction;
pub(crate) mod transition;
