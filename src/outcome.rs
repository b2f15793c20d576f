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
/// From [`with_locked_row`](crate::with_locked_row) and the other calls that open their own
/// transaction: in every case but `Done` the transaction was rolled back and the closure did
/// not run. From [`Transaction::lock_row`](crate::Transaction::lock_row) inside your own
/// transaction: in every case the transaction can go on (see there).
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

/// What a locked call can end with, for the shared attempt loop: the lock-contention error
/// (if that is what happened) and a short name for spans.
pub(crate) trait Contended: Sized {
    /// The error of `LockNotAvailable` / `LockTimeout`, if that is what happened.
    fn contention_mut(&mut self) -> Option<&mut Error>;
    /// The same, by value.
    fn into_contention(self) -> Option<Error>;
    /// A short name for spans and logs.
    fn label(&self) -> &'static str;
}

/// What a lock step produced: the locked value for the closure, or an outcome that ends the
/// call without running it.
pub(crate) trait Locked: Sized {
    /// What the closure gets.
    type Value;
    /// What the call returns, carrying the closure's `T` when done.
    type Output<T>: Contended;
    /// `Ok` with the locked value, or the outcome to return as it is.
    fn split<T>(self) -> Result<Self::Value, Self::Output<T>>;
    /// The call's result after the closure returned `value` and the transaction committed.
    fn done<T>(value: T) -> Self::Output<T>;
}

impl<T> Contended for Outcome<T> {
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
    fn label(&self) -> &'static str {
        match self {
            Outcome::Done(_) => "done",
            Outcome::NotFound => "not_found",
            Outcome::Skipped => "skipped",
            Outcome::LockNotAvailable(_) => "lock_not_available",
            Outcome::LockTimeout(_) => "lock_timeout",
        }
    }
}

impl<R> Locked for Outcome<R> {
    type Value = R;
    type Output<T> = Outcome<T>;
    fn split<T>(self) -> Result<R, Outcome<T>> {
        match self {
            Outcome::Done(row) => Ok(row),
            other => Err(other.map(|_| unreachable!("Done is handled above"))),
        }
    }
    fn done<T>(value: T) -> Outcome<T> {
        Outcome::Done(value)
    }
}

impl<T, K> Contended for RowsOutcome<T, K> {
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
    fn label(&self) -> &'static str {
        match self {
            RowsOutcome::Done(_) => "done",
            RowsOutcome::NotFound(_) => "not_found",
            RowsOutcome::Skipped(_) => "skipped",
            RowsOutcome::LockNotAvailable(_) => "lock_not_available",
            RowsOutcome::LockTimeout(_) => "lock_timeout",
        }
    }
}

impl<R, K> Locked for RowsOutcome<R, K> {
    type Value = R;
    type Output<T> = RowsOutcome<T, K>;
    fn split<T>(self) -> Result<R, RowsOutcome<T, K>> {
        match self {
            RowsOutcome::Done(rows) => Ok(rows),
            other => Err(other.map(|_| unreachable!("Done is handled above"))),
        }
    }
    fn done<T>(value: T) -> RowsOutcome<T, K> {
        RowsOutcome::Done(value)
    }
}

/// A claim's result: `Some` with the closure's value, `None` when nothing was free. Never
/// contended (`SKIP LOCKED` does not wait or fail).
impl<T> Contended for Option<T> {
    fn contention_mut(&mut self) -> Option<&mut Error> {
        None
    }
    fn into_contention(self) -> Option<Error> {
        None
    }
    fn label(&self) -> &'static str {
        if self.is_some() { "done" } else { "empty" }
    }
}

/// Claimed rows: an empty claim ends the call with `None`.
impl<R> Locked for Vec<R> {
    type Value = Vec<R>;
    type Output<T> = Option<T>;
    fn split<T>(self) -> Result<Vec<R>, Option<T>> {
        if self.is_empty() { Err(None) } else { Ok(self) }
    }
    fn done<T>(value: T) -> Option<T> {
        Some(value)
    }
}

/// The call result of [`with_transaction`](crate::with_transaction): the closure's value.
pub(crate) struct Plain<T>(pub(crate) T);

/// A transaction that locks nothing up front is never contended.
impl<T> Contended for Plain<T> {
    fn contention_mut(&mut self) -> Option<&mut Error> {
        None
    }
    fn into_contention(self) -> Option<Error> {
        None
    }
    fn label(&self) -> &'static str {
        "done"
    }
}

/// What the lock step of [`with_transaction`](crate::with_transaction) takes: nothing.
pub(crate) struct Nothing;

impl Locked for Nothing {
    type Value = ();
    type Output<T> = Plain<T>;
    fn split<T>(self) -> Result<(), Plain<T>> {
        Ok(())
    }
    fn done<T>(value: T) -> Plain<T> {
        Plain(value)
    }
}
