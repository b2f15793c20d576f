//! Savepoints: nested transactions inside a [`Transaction`], whose errors are recovered by
//! rolling back to them.
//!
//! No savepoint command costs a round trip of its own: `SAVEPOINT` goes out in the same flush
//! as the first statement inside it, and `RELEASE` or `ROLLBACK TO` with the first statement
//! after it (or with `COMMIT`). A savepoint with no statement inside sends nothing.

use std::ops::Deref;

use crate::scoped::ScopedBoxFuture;
use tokio_postgres::Statement;

use super::Transaction;
use super::state::{Failure, NoSavepoint};
use crate::error::{Error, ErrorKind, Step};

mod private {
    pub trait Sealed {}
    impl Sealed for str {}
    impl Sealed for String {}
    impl Sealed for tokio_postgres::Statement {}
}

/// What the statement methods of [`Transaction`] take: SQL text (`str`, `String`) or a
/// prepared [`Statement`], as tokio-postgres's `ToStatement`.
///
/// Given as text, a savepoint command (`SAVEPOINT s`, `RELEASE SAVEPOINT s`, `ROLLBACK TO
/// SAVEPOINT s`) is recognised, so an error recovered with `ROLLBACK TO SAVEPOINT` no longer
/// fails the commit. This trait is sealed.
pub trait AsStatement: private::Sealed {
    /// The SQL text, when the statement is given as text.
    #[doc(hidden)]
    fn sql_text(&self) -> Option<&str>;
    /// The statement, when it is given prepared.
    #[doc(hidden)]
    fn prepared(&self) -> Option<&Statement> {
        None
    }
}

impl AsStatement for str {
    fn sql_text(&self) -> Option<&str> {
        Some(self)
    }
}

impl AsStatement for String {
    fn sql_text(&self) -> Option<&str> {
        Some(self)
    }
}

impl AsStatement for Statement {
    fn sql_text(&self) -> Option<&str> {
        None
    }

    fn prepared(&self) -> Option<&Statement> {
        Some(self)
    }
}

/// A savepoint: a nested transaction inside a [`Transaction`], from
/// [`Transaction::savepoint`].
///
/// Run statements through it (it dereferences to the [`Transaction`]) or through the
/// transaction itself. End it with [`release`](Self::release) to keep its work, or
/// [`rollback`](Self::rollback) to undo it; an error inside it that is rolled back no longer
/// fails the transaction's commit, while one that is not still does.
///
/// **On drop** without `release` or `rollback` (an early return, a `?`, a panic), it is
/// rolled back, as the transaction itself is. Releasing or rolling back an outer savepoint
/// also ends the savepoints inside it; ending those afterwards does nothing.
#[must_use = "a savepoint is rolled back when dropped; call release() to keep its work"]
#[derive(Debug)]
pub struct Savepoint<'t> {
    tx: &'t Transaction,
    id: u32,
    ended: bool,
}

impl Deref for Savepoint<'_> {
    type Target = Transaction;
    fn deref(&self) -> &Transaction {
        self.tx
    }
}

impl Savepoint<'_> {
    /// Keeps the savepoint's work, as part of the transaction (`RELEASE SAVEPOINT`, sent with
    /// the next statement or `COMMIT`).
    ///
    /// If a statement failed inside the savepoint and was not recovered, the work cannot be
    /// kept: the savepoint is rolled back instead and [`ErrorKind::TransactionAborted`] is
    /// returned with the root cause's SQLSTATE; the transaction can go on.
    pub fn release(mut self) -> Result<(), Error> {
        self.ended = true;
        let released = self.tx.state().release_savepoint(self.id);
        released.map_err(|root| {
            self.tx.state().rollback_to_savepoint(self.id);
            aborted_inside(root)
        })
    }

    /// Undoes the savepoint's work (`ROLLBACK TO SAVEPOINT` and `RELEASE SAVEPOINT`, sent with
    /// the next statement or `COMMIT`), including the writes queued inside it with
    /// [`execute_on_commit`](Transaction::execute_on_commit). The transaction is healthy
    /// again, whatever failed inside the savepoint. Until the rollback reaches the server, the
    /// row and advisory locks taken inside the savepoint are still held: before slow work
    /// that must not hold them, run the next statement or end the transaction.
    pub fn rollback(mut self) {
        self.ended = true;
        self.tx.state().rollback_to_savepoint(self.id);
    }
}

impl Drop for Savepoint<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.tx.state().rollback_to_savepoint(self.id);
        }
    }
}

fn aborted_inside(root: Failure) -> Error {
    Error::with_kind(
        ErrorKind::TransactionAborted,
        "a statement inside the savepoint failed, so it was rolled back",
    )
    .at(Step::Statement)
    .with_sql_state(root.sql_state)
}

impl Transaction {
    /// Opens a savepoint (a nested transaction) and returns its guard. Sends nothing:
    /// `SAVEPOINT` goes out with the first statement inside it.
    ///
    /// Refused with [`ErrorKind::TransactionAborted`] (with the root cause's SQLSTATE) when an
    /// earlier statement aborted the transaction, as PostgreSQL would refuse it, and with
    /// [`ErrorKind::Closed`] when the connection was lost. Keep savepoints short and end them:
    /// each one that writes takes a subtransaction id, and more than 64 in one transaction
    /// slow down every session of the server.
    ///
    /// ```no_run
    /// # async fn demo(tx: &rowlock::Transaction) -> Result<(), rowlock::Error> {
    /// use rowlock::tokio_postgres::error::SqlState;
    ///
    /// // Insert, or fall back to an update if the row exists.
    /// let sp = tx.savepoint()?;
    /// match sp.execute("INSERT INTO tags (name, uses) VALUES ($1, 1)", &[&"rust"]).await {
    ///     Ok(_) => sp.release()?,
    ///     Err(e) if e.sql_state() == Some(&SqlState::UNIQUE_VIOLATION) => {
    ///         sp.rollback();
    ///         tx.execute("UPDATE tags SET uses = uses + 1 WHERE name = $1", &[&"rust"]).await?;
    ///     }
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn savepoint(&self) -> Result<Savepoint<'_>, Error> {
        Ok(Savepoint {
            tx: self,
            id: self.open_savepoint()?,
            ended: false,
        })
    }

    /// Opens savepoint `rowlock_sp_<id>` (queued with the next request) and returns its id.
    pub(crate) fn open_savepoint(&self) -> Result<u32, Error> {
        self.state()
            .open_savepoint()
            .map_err(|refused| match refused {
                NoSavepoint::Lost => Error::with_kind(
                    ErrorKind::Closed,
                    "the connection of this transaction was lost earlier",
                )
                .at(Step::Statement),
                NoSavepoint::Aborted(root) => Error::with_kind(
                    ErrorKind::TransactionAborted,
                    "an earlier statement aborted the transaction, so no savepoint can be opened",
                )
                .at(Step::Statement)
                .with_sql_state(root.sql_state),
            })
    }

    /// Ends savepoint `id`: released after a lock that was taken, rolled back after one that
    /// was not (the transaction is healthy again), left open after any other failure (the
    /// transaction stays aborted, as the error says).
    pub(crate) fn end_savepoint(&self, id: u32, rollback: bool) {
        let mut st = self.state();
        if rollback {
            st.rollback_to_savepoint(id);
        } else if st.aborted().is_none() {
            let _ = st.release_savepoint(id);
        }
    }

    /// Queues a simple statement (`SET LOCAL …`) to go out ahead of the next request.
    pub(crate) fn queue_statement(&self, sql: String) {
        self.state().queue_statement(sql);
    }

    /// Runs `f` inside a savepoint: released if `f` returns `Ok`, rolled back if it returns
    /// `Err` (returned unchanged) or panics, or if this future is dropped. If `f` returns `Ok`
    /// but a statement inside it failed and was not recovered, the savepoint is rolled back
    /// and [`ErrorKind::TransactionAborted`] is returned. In every case the transaction can go
    /// on. Nested calls nest savepoints. The release or rollback goes out with the next
    /// statement (see [`Savepoint::rollback`] for what that means for locks).
    ///
    /// ```no_run
    /// # async fn demo(tx: &rowlock::Transaction) -> Result<(), rowlock::Error> {
    /// let inserted = tx
    ///     .with_savepoint(|tx| Box::pin(async move {
    ///         tx.execute("INSERT INTO tags (name, uses) VALUES ('rust', 1)", &[]).await
    ///     }))
    ///     .await;
    /// if inserted.is_err() {
    ///     tx.execute("UPDATE tags SET uses = uses + 1 WHERE name = 'rust'", &[]).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn with_savepoint<'a, T, E, F>(&self, f: F) -> Result<T, E>
    where
        E: From<Error>,
        F: for<'s> FnOnce(&'s Transaction) -> ScopedBoxFuture<'a, 's, Result<T, E>>,
    {
        let savepoint = self.savepoint()?;
        match f(self).await {
            Ok(value) => {
                savepoint.release()?;
                Ok(value)
            }
            Err(e) => {
                savepoint.rollback();
                Err(e)
            }
        }
    }
}
