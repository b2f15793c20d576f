//! What happened when rowlock tried to lock: typed outcomes instead of parsed messages.

use std::fmt;

pub(crate) use crate::diagnostics::RowRef;
use crate::error::{Error, ErrorKind};

/// What one call did: the one vocabulary of every operation, so one `match` serves every call
/// site.
///
/// | situation | `Wait` | `NoWait` | `SkipLocked` |
/// |---|---|---|---|
/// | rows free | `Done` | `Done` | `Done` |
/// | a row locked by another transaction | waits | `LockNotAvailable` | `Skipped` |
/// | lock timeout expires while waiting | `LockTimeout` | — | — |
/// | no such key | `NotFound` | `NotFound` | `NotFound` |
/// | nothing to claim | `NotFound` (empty) | | |
/// | a transition's condition or guard not met | `Conflict` | | |
///
/// From the calls that open their own transaction ([`Db::with_locked_row`](crate::Db) and the
/// other methods of [`Db`](crate::Db)): in every case but `Done` the transaction was rolled
/// back and the caller's code did not run. From the same operations inside the caller's
/// transaction ([`Transaction::lock_row`](crate::Transaction::lock_row) and its siblings): in
/// every case the transaction can go on.
///
/// Two calls hand back rows rather than an outcome: [`Db::claim_and_mark`](crate::Db::claim_and_mark)
/// and [`Transaction::claim`](crate::Transaction::claim). A claim never waits for a lock nor
/// fails on one (`SKIP LOCKED`), so the rows it got, possibly none, are its whole answer.
///
/// Not `#[non_exhaustive]`: these are the answers PostgreSQL's locking gives, and a handler
/// that matches them all should not need a wildcard arm. A new variant would be a breaking
/// change, made in a new minor version of 0.x.
#[must_use = "an outcome other than Done means the caller's code did not run"]
#[derive(Debug)]
pub enum Outcome<T> {
    /// Every row was locked (or claimed, or changed); carries the caller's value (or the
    /// rows, for the one-statement forms).
    Done(T),
    /// These rows do not exist (table and key, ascending by key). Empty from a claim that
    /// found nothing to claim: no row matched, or every match was locked by another claimer
    /// (`SKIP LOCKED` cannot tell these apart).
    NotFound(Vec<RowRef>),
    /// `SkipLocked`: these rows exist but another transaction holds a conflicting lock.
    Skipped(Vec<RowRef>),
    /// `NoWait`: another transaction holds a conflicting lock (`55P03`); [`Error::rows`] names
    /// the rows the refused statement asked for.
    LockNotAvailable(Error),
    /// A lock wait exceeded the lock timeout (`55P03` from `lock_timeout`); [`Error::rows`]
    /// names the rows the statement waited for.
    LockTimeout(Error),
    /// Only from transitions: the row exists but did not meet the condition, or a guard found
    /// nothing, so nothing changed. Carries the row as the statement decided on it (see
    /// [`Transition`](crate::Transition)).
    Conflict(T),
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

    /// Maps the value of [`Outcome::Done`] (and the row of [`Outcome::Conflict`]).
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Done(v) => Outcome::Done(f(v)),
            Outcome::Conflict(v) => Outcome::Conflict(f(v)),
            Outcome::NotFound(k) => Outcome::NotFound(k),
            Outcome::Skipped(k) => Outcome::Skipped(k),
            Outcome::LockNotAvailable(e) => Outcome::LockNotAvailable(e),
            Outcome::LockTimeout(e) => Outcome::LockTimeout(e),
        }
    }

    /// `Done(v)` becomes `Ok(v)`; anything else an [`Error`] whose kind says what happened
    /// ([`ErrorKind::RowNotFound`], [`ErrorKind::RowSkipped`], [`ErrorKind::LockNotAvailable`],
    /// [`ErrorKind::LockTimeout`], [`ErrorKind::Conflict`]), for callers that treat every
    /// other outcome as a failure.
    pub fn into_result(self) -> Result<T, Error> {
        match self {
            Outcome::Done(v) => Ok(v),
            Outcome::NotFound(rows) if rows.is_empty() => {
                Err(Error::with_kind(ErrorKind::RowNotFound, "no row to claim"))
            }
            Outcome::NotFound(rows) => Err(Error::with_kind(
                ErrorKind::RowNotFound,
                format!("no row {}", list(&rows)),
            )),
            Outcome::Skipped(rows) => Err(Error::with_kind(
                ErrorKind::RowSkipped,
                format!("SKIP LOCKED left out {}", list(&rows)),
            )),
            Outcome::LockNotAvailable(e) | Outcome::LockTimeout(e) => Err(e),
            Outcome::Conflict(_) => Err(Error::with_kind(
                ErrorKind::Conflict,
                "the row did not meet the transition's condition; nothing changed",
            )),
        }
    }
}

/// Outcomes compare by variant and value; the errors of `LockNotAvailable` and `LockTimeout`
/// by their kind only (they carry the server's text, timings and blockers, which differ from
/// one run to the next). For `assert_eq!(outcome, Outcome::Done(…))` in tests.
impl<T: PartialEq> PartialEq for Outcome<T> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Outcome::Done(a), Outcome::Done(b)) | (Outcome::Conflict(a), Outcome::Conflict(b)) => {
                a == b
            }
            (Outcome::NotFound(a), Outcome::NotFound(b))
            | (Outcome::Skipped(a), Outcome::Skipped(b)) => a == b,
            (Outcome::LockNotAvailable(a), Outcome::LockNotAvailable(b))
            | (Outcome::LockTimeout(a), Outcome::LockTimeout(b)) => a.kind() == b.kind(),
            _ => false,
        }
    }
}

/// `done`, `not found: accounts key 7`, `lock not available … on accounts key 7`: for logs.
impl<T> fmt::Display for Outcome<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Done(_) => f.write_str("done"),
            Outcome::NotFound(rows) if rows.is_empty() => f.write_str("nothing to claim"),
            Outcome::NotFound(rows) => write!(f, "not found: {}", list(rows)),
            Outcome::Skipped(rows) => write!(f, "skipped (locked elsewhere): {}", list(rows)),
            // The error's own text starts with its kind ("lock not available …").
            Outcome::LockNotAvailable(e) | Outcome::LockTimeout(e) => write!(f, "{e}"),
            Outcome::Conflict(_) => f.write_str("conflict: the condition was not met"),
        }
    }
}

fn list(rows: &[RowRef]) -> String {
    rows.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
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
            Outcome::NotFound(_) => "not_found",
            Outcome::Skipped(_) => "skipped",
            Outcome::LockNotAvailable(_) => "lock_not_available",
            Outcome::LockTimeout(_) => "lock_timeout",
            Outcome::Conflict(_) => "conflict",
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

/// Claimed rows: an empty claim ends the call with `NotFound`, naming no row.
impl<R> Locked for Vec<R> {
    type Value = Vec<R>;
    type Output<T> = Outcome<T>;
    fn split<T>(self) -> Result<Vec<R>, Outcome<T>> {
        if self.is_empty() {
            Err(Outcome::NotFound(Vec::new()))
        } else {
            Ok(self)
        }
    }
    fn done<T>(value: T) -> Outcome<T> {
        Outcome::Done(value)
    }
}

/// The call result of [`Db::with_transaction`](crate::Db::with_transaction): the closure's value.
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

/// What the lock step of [`Db::with_transaction`](crate::Db::with_transaction) takes: nothing.
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
