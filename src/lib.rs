#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![deny(rustdoc::broken_intra_doc_links)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod advisory;
mod claim;
mod commit_outcome;
mod diagnostics;
mod error;
mod lock;
mod locking;
mod options;
mod outcome;
mod pipeline;
mod retry;
mod row;
mod trace;
mod transaction;

#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

#[cfg(feature = "assignment")]
#[cfg_attr(docsrs, doc(cfg(feature = "assignment")))]
pub mod assignment;

pub use deadpool_postgres;
pub use tokio_postgres;

pub use crate::advisory::{AdvisoryKey, with_advisory_lock};
pub use crate::claim::{
    Claim, Compare, Direction, explain_claim, with_claimed_rows, with_next_locked_row,
};
pub use crate::commit_outcome::{CommitStatus, resolve_commit};
pub use crate::diagnostics::Blocker;
pub use crate::error::{Error, ErrorKind};
pub use crate::lock::{LockMode, LockOptions, LockStrength};
pub use crate::locking::{with_locked_row, with_locked_rows};
pub use crate::options::{Isolation, StatementCache, TransactionOptions};
pub use crate::outcome::{Outcome, RowsOutcome};
pub use crate::retry::{
    RetryEvent, RetryPolicy, with_locked_row_retry, with_locked_rows_retry, with_transaction_retry,
};
pub use crate::row::{Key, KeyValue, LockableRow, Table};
pub use crate::transaction::{OwnedParam, Transaction, with_transaction};

/// The future type the closures of [`with_transaction`], [`with_locked_row`] and
/// [`with_locked_rows`] return: write `Box::pin(async move { … })`.
pub type BoxFuture<'a, T> = futures_util::future::BoxFuture<'a, T>;
