//! `with_transaction` and `begin`: transactions that lock nothing up front.

use std::future::Future;

use crate::scoped::ScopedBoxFuture;

use crate::attempt::{LockStep, run_locked};
use crate::db::Db;
use crate::error::Error;
use crate::options::TransactionOptions;
use crate::outcome::Nothing;
use crate::transaction::Transaction;

impl Db {
    /// Runs `f` in a transaction: commits if it returns `Ok`, rolls back if it returns `Err`.
    ///
    /// - Invalid `options` are refused with
    ///   [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) before a connection
    ///   is taken.
    /// - Pool and connection failures are returned as [`Error`] (converted into `E`).
    /// - If `f` returns `Err(e)`, the transaction is rolled back and `e` is returned unchanged.
    /// - If `f` returns `Ok(v)` but a statement in it failed (even one whose error `f`
    ///   swallowed), the transaction is rolled back and
    ///   [`ErrorKind::TransactionAborted`](crate::ErrorKind::TransactionAborted) is returned:
    ///   never a false success.
    /// - With a retry policy ([`TransactionOptions::retry`], or the handle's), serialization
    ///   failures and deadlocks run `f` again in a new transaction (so `f` is `FnMut`);
    ///   [`ErrorKind::RetriesExhausted`](crate::ErrorKind::RetriesExhausted) when the policy
    ///   gives up; [`ErrorKind::CommitOutcomeUnknown`](crate::ErrorKind::CommitOutcomeUnknown)
    ///   is never retried.
    /// - If `f` panics or the returned future is dropped, the transaction is rolled back as
    ///   described on [`Transaction`], and the panic propagates.
    ///
    /// Round trips: `BEGIN` rides with `f`'s first statement, and `COMMIT` with the writes
    /// queued by [`Transaction::execute_on_commit`].
    ///
    /// ```no_run
    /// # async fn demo(db: &rowlock::Db) -> Result<(), rowlock::Error> {
    /// use rowlock::{Isolation, TransactionOptions};
    ///
    /// let opts = TransactionOptions::new().isolation(Isolation::Serializable).retry(5);
    /// let total: i64 = db
    ///     .with_transaction(opts, |tx| Box::pin(async move {
    ///         let row = tx.query_one("SELECT coalesce(sum(balance), 0)::int8 FROM accounts", &[])
    ///             .await?;
    ///         Ok::<_, rowlock::Error>(row.get(0))
    ///     }))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn with_transaction<'a, T, E, F>(
        &self,
        options: impl Into<TransactionOptions>,
        mut f: F,
    ) -> Result<T, E>
    where
        E: From<Error>,
        F: for<'t> FnMut(&'t Transaction) -> ScopedBoxFuture<'a, 't, Result<T, E>>,
    {
        let options = options.into();
        let plain = run_locked(None, self, &options, &NoLock, |tx, ()| f(tx)).await?;
        Ok(plain.0)
    }

    /// Takes a connection and prepares a transaction with `options` (the handle's defaults
    /// under them), for code that cannot live in a closure. Commit it with
    /// [`Transaction::commit`]; dropping it rolls back. Not retried: a retry policy in the
    /// options is refused here with
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument), since only a call
    /// that runs the caller's code can run it again.
    ///
    /// Invalid options are refused before a connection is taken. Pool errors are returned as
    /// [`ErrorKind::PoolTimeout`](crate::ErrorKind::PoolTimeout) and its siblings. Nothing
    /// is sent yet: `BEGIN` leaves with the first statement.
    ///
    /// ```no_run
    /// # async fn demo(db: &rowlock::Db) -> Result<(), rowlock::Error> {
    /// use rowlock::TransactionOptions;
    ///
    /// let tx = db.begin(TransactionOptions::new()).await?;
    /// tx.execute("UPDATE counters SET n = n + 1 WHERE id = $1", &[&1_i64]).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn begin(
        &self,
        options: impl Into<TransactionOptions>,
    ) -> Result<Transaction, Error> {
        let options = options.into();
        if options.retry.is_some() {
            return Err(Error::invalid(
                "begin cannot retry (it does not run the caller's code); use with_transaction \
                 with TransactionOptions::retry",
            ));
        }
        let mut options = self.options(&options);
        options.retry = None;
        options.validate()?;
        Transaction::begin_unchecked(self, &options).await
    }
}

impl From<&TransactionOptions> for TransactionOptions {
    fn from(options: &TransactionOptions) -> Self {
        options.clone()
    }
}

/// The lock step of `with_transaction`: there is nothing to lock.
struct NoLock;

impl LockStep for NoLock {
    type Locked = Nothing;
    fn lock<'t>(
        &'t self,
        _tx: &'t Transaction,
    ) -> impl Future<Output = Result<Nothing, Error>> + Send + 't {
        std::future::ready(Ok(Nothing))
    }
}
