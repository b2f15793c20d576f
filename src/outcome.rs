//! What happened when rowlock tried to lock: typed outcomes instead of parsed messages.

use crate::error::{Error, ErrorKind};

/// The outcome of locking one row by key (and, for [`with_locked_row`](crate::with_locked_row),
/// of running the caller's closure on it).
///
/// | situation | `Wait` | `NoWait` | `SkipLocked` |
/// |---|---|---|---|
/// | row free | `Done` | `Done` | `Done` |
/// | row locked by another transaction | waits | `LockNotAvailable` | `Skipped` |
/// | lock timeout expires while waiting | `LockTimeout` | — | — |
/// | no such key | `NotFound` | `NotFound` | `NotFound` |
///
/// In every case but `Done` the transaction was rolled back and the closure did not run.
#[must_use = "an outcome other than Done means the closure did not run"]
#[derive(Debug)]
#[non_exhaustive] // new outcomes may be told apart later; match with a wildcard arm.
pub enum Outcome<T> {
    /// The row was locked; carries the closure's value (or the row, for
    /// [`Transaction::lock_row`](crate::Transaction::lock_row)).
    Done(T),
    /// No row has this key.
    NotFound,
    /// `SkipLocked`: the row exists but another transaction holds a conflicting lock.
    Skipped,
    /// `NoWait`: another transaction holds a conflicting lock (`55P03`).
    LockNotAvailable(Error),
    /// `Wait` with a lock timeout: the wait exceeded it (`55P03` from `lock_timeout`).
    LockTimeout(Error),
}

impl<T> Outcome<T> {
    /// True for [`Outcome::Done`].
    pub fn is_done(&self) -> bool {
        matches!(self, Outcome::Done(_))
    }

    /// The value of [`Outcome::Done`], if that is what happened.
    pub fn done(self) -> Option<T> {
        match self {
            Outcome::Done(v) => Some(v),
            _ => None,
        }
    }

    /// Maps the value of [`Outcome::Done`].
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Done(v) => Outcome::Done(f(v)),
            Outcome::NotFound => Outcome::NotFound,
            Outcome::Skipped => Outcome::Skipped,
            Outcome::LockNotAvailable(e) => Outcome::LockNotAvailable(e),
            Outcome::LockTimeout(e) => Outcome::LockTimeout(e),
        }
    }

    /// `Done(v)` becomes `Ok(v)`; anything else an [`Error`] whose kind says what happened
    /// ([`ErrorKind::RowNotFound`], [`ErrorKind::RowSkipped`], [`ErrorKind::LockNotAvailable`],
    /// [`ErrorKind::LockTimeout`]), for callers that treat every other outcome as a failure.
    pub fn into_result(self) -> Result<T, Error> {
        match self {
            Outcome::Done(v) => Ok(v),
            Outcome::NotFound => Err(Error::with_kind(
                ErrorKind::RowNotFound,
                "no row has this key",
            )),
            Outcome::Skipped => Err(Error::with_kind(
                ErrorKind::RowSkipped,
                "SKIP LOCKED left the row out",
            )),
            Outcome::LockNotAvailable(e) | Outcome::LockTimeout(e) => Err(e),
        }
    }
}

/// The outcome of locking several rows by key: all of them, or none and the reason.
///
/// The closure of [`with_locked_rows`](crate::with_locked_rows) runs only when every requested
/// row was locked. `K` is the key type; missing and skipped keys are listed, never silently
/// dropped.
#[must_use = "an outcome other than Done means the closure did not run"]
#[derive(Debug)]
#[non_exhaustive] // new outcomes may be told apart later; match with a wildcard arm.
pub enum RowsOutcome<T, K> {
    /// Every row was locked; carries the closure's value (or the rows).
    Done(T),
    /// These keys match no row (ascending). Reported before skipped keys.
    NotFound(Vec<K>),
    /// `SkipLocked`: these rows exist but are locked by another transaction (ascending).
    Skipped(Vec<K>),
    /// `NoWait`: a requested row is locked by another transaction.
    LockNotAvailable(Error),
    /// `Wait` with a lock timeout: a lock wait exceeded it.
    LockTimeout(Error),
}

impl<T, K> RowsOutcome<T, K> {
    /// True for [`RowsOutcome::Done`].
    pub fn is_done(&self) -> bool {
        matches!(self, RowsOutcome::Done(_))
    }

    /// The value of [`RowsOutcome::Done`], if that is what happened.
    pub fn done(self) -> Option<T> {
        match self {
            RowsOutcome::Done(v) => Some(v),
            _ => None,
        }
    }

    /// Maps the value of [`RowsOutcome::Done`].
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> RowsOutcome<U, K> {
        match self {
            RowsOutcome::Done(v) => RowsOutcome::Done(f(v)),
            RowsOutcome::NotFound(k) => RowsOutcome::NotFound(k),
            RowsOutcome::Skipped(k) => RowsOutcome::Skipped(k),
            RowsOutcome::LockNotAvailable(e) => RowsOutcome::LockNotAvailable(e),
            RowsOutcome::LockTimeout(e) => RowsOutcome::LockTimeout(e),
        }
    }

    /// `Done(v)` becomes `Ok(v)`; anything else an [`Error`] whose kind says what happened.
    pub fn into_result(self) -> Result<T, Error>
    where
        K: std::fmt::Debug,
    {
        match self {
            RowsOutcome::Done(v) => Ok(v),
            RowsOutcome::NotFound(keys) => Err(Error::with_kind(
                ErrorKind::RowNotFound,
                format!("no rows have keys {keys:?}"),
            )),
            RowsOutcome::Skipped(keys) => Err(Error::with_kind(
                ErrorKind::RowSkipped,
                format!("SKIP LOCKED left out keys {keys:?}"),
            )),
            RowsOutcome::LockNotAvailable(e) | RowsOutcome::LockTimeout(e) => Err(e),
        }
    }
}

/// The lock-contention outcomes of both outcome types, for the retry loop.
pub(crate) trait Contended: Sized {
    /// The error of `LockNotAvailable` / `LockTimeout`, if that is what happened.
    fn contention(&self) -> Option<&Error>;
    /// The same, mutably.
    fn contention_mut(&mut self) -> Option<&mut Error>;
    /// The same, by value.
    fn into_contention(self) -> Option<Error>;
}

impl<T> Outcome<T> {
    /// A short name for spans and logs.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Outcome::Done(_) => "done",
            Outcome::NotFound => "not_found",
            Outcome::Skipped => "skipped",
            Outcome::LockNotAvailable(_) => "lock_not_available",
            Outcome::LockTimeout(_) => "lock_timeout",
        }
    }
}

impl<T, K> RowsOutcome<T, K> {
    /// A short name for spans and logs.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            RowsOutcome::Done(_) => "done",
            RowsOutcome::NotFound(_) => "not_found",
            RowsOutcome::Skipped(_) => "skipped",
            RowsOutcome::LockNotAvailable(_) => "lock_not_available",
            RowsOutcome::LockTimeout(_) => "lock_timeout",
        }
    }
}

impl<T> Contended for Outcome<T> {
    fn contention(&self) -> Option<&Error> {
        match self {
            Outcome::LockNotAvailable(e) | Outcome::LockTimeout(e) => Some(e),
            _ => None,
        }
    }
    fn contention_mut(&mut self) -> Option<&mut Error> {
        match self {
            Outcome::LockNotAvailable(e) | Outcome::LockTimeout(e) => Some(e),
            _ => None,
        }
    }
    fn into_contention(self) -> Option<Error> {
        match self {
            Outcome::LockNotAvailable(e) | Outcome::LockTimeout(e) => Some(e),
            _ => None,
        }
    }
}

impl<T, K> Contended for RowsOutcome<T, K> {
    fn contention(&self) -> Option<&Error> {
        match self {
            RowsOutcome::LockNotAvailable(e) | RowsOutcome::LockTimeout(e) => Some(e),
            _ => None,
        }
    }
    fn contention_mut(&mut self) -> Option<&mut Error> {
        match self {
            RowsOutcome::LockNotAvailable(e) | RowsOutcome::LockTimeout(e) => Some(e),
            _ => None,
        }
    }
    fn into_contention(self) -> Option<Error> {
        match self {
            RowsOutcome::LockNotAvailable(e) | RowsOutcome::LockTimeout(e) => Some(e),
            _ => None,
        }
    }
}
