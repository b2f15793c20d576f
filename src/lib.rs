#![doc = include_str!("../README.md")]
#![doc = include_str!("../docs/layout.md")]
#![deny(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![deny(rustdoc::broken_intra_doc_links)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// Layers, bottom to top: a module imports only modules of its own layer or of layers below
// it, never one above, and there are no cycles (`.ci/layers` checks both). See "Layout" in
// the crate docs.

// 1. The error, and who held a lock.
mod diagnostics;
mod error;

// 2. The model: lock modes and strengths, options, the retry schedule (knows nothing of
//    transactions), row types, outcomes, closure futures.
mod lock;
mod options;
mod outcome;
mod policy;
mod row;
mod scoped;
mod sql_text;

// 3. The handle (pool, defaults, what was learned per row type), the transaction guard, and
//    the one way it pipelines requests.
mod db;
mod flush;
mod transaction;

// 4. The attempt loop.
mod attempt;
mod trace;

// 5. The operations, as methods of the handle and of the transaction.
mod api;

pub mod guide;

#[cfg(feature = "assignment")]
#[cfg_attr(docsrs, doc(cfg(feature = "assignment")))]
pub mod assignment;

pub use deadpool_postgres;
pub use tokio_postgres;

pub use crate::api::advisory::AdvisoryKey;
pub use crate::api::claim::{Claim, Compare, Direction};
pub use crate::api::commit_outcome::CommitStatus;
pub use crate::api::executor::Executor;
pub use crate::api::lease::{Lease, Leased};
pub use crate::api::set::{LockSet, LockedRows};
pub use crate::api::transition::Transition;
pub use crate::db::{Builder, Connector, Db};
pub use crate::diagnostics::{Blocker, RowRef};
pub use crate::error::{Error, ErrorKind, TransactionRef};
pub use crate::lock::{Lock, LockMode, LockStrength};
pub use crate::options::{Isolation, StatementCache, TransactionOptions};
pub use crate::outcome::Outcome;
pub use crate::policy::{RetryEvent, RetryPolicy};
pub use crate::row::{Key, KeyValue, LockableRow, MisfitColumn, Table};
pub use crate::transaction::{AsStatement, OwnedParam, Savepoint, Transaction};
/// `#[derive(LockableRow)]`: see [the trait](trait@LockableRow) and the guide's
/// [row types](crate::guide::handle#row-types-derive-them).
/// The generated code names the crate `::rowlock`: keep that name for the dependency.
#[cfg(feature = "derive")]
#[cfg_attr(docsrs, doc(cfg(feature = "derive")))]
pub use rowlock_macros::LockableRow;

/// `#[rowlock_testing::test]`, defined with the derive; use it through `rowlock-testing`.
#[cfg(feature = "derive")]
#[doc(hidden)]
pub use rowlock_macros::test as __test_attribute;

pub use crate::scoped::{BoxFuture, ScopedBoxFuture, ScopedFuture};
