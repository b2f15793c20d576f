//! `with_transaction` and its retrying twin: a transaction that locks nothing up front.

use std::future::Future;

use crate::scoped::ScopedBoxFuture;
use deadpool_postgres::Pool;

use crate::attempt::{LockStep, call_once, run_locked};
use crate::error::Error;
use crate::options::TransactionOptions;
use crate::outcome::Nothing;
use crate::policy::RetryPolicy;
use crate::transaction::Transaction;

/// Runs `f` in a transaction: commits if it returns `Ok`, rolls back if it returns `Err`.
///
/// - Invalid `options` are refused with [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) before a connection is
///   taken.
/// - Pool and connection failures are returned as [`Error`] (converted into `E`).
/// - If `f` returns `Err(e)`, the transaction is rolled back and `e` is returned unchanged.
/// - If `f` returns `Ok(v)` but a statement in it failed (even one whose error `f`
///   swallowed), the transaction is rolled back and
///   [`ErrorKind::TransactionAborted`](crate::ErrorKind::TransactionAborted) is returned: never a false success.
/// - If `f` panics or the returned future is dropped, the transaction is rolled back as
///   described on [`Transaction`], and the panic propagates.
///
/// Round trips: `BEGIN` rides with `f`'s first statement, and `COMMIT` with the writes queued
/// by [`Transaction::execute_on_commit`].
///
/// ```no_run
/// # async fn demo(pool: &rowlock::deadpool_postgres::Pool) -> Result<(), rowlock::Error> {
/// use rowlock::{Isolation, TransactionOptions, with_transaction};
///
/// let opts = TransactionOptions::new().isolation(Isolation::Serializable);
/// let total: i64 = with_transaction(pool, &opts, |tx| Box::pin(async move {
///     let row = tx.query_one("SELECT coalesce(sum(balance), 0)::int8 FROM accounts", &[]).await?;
///     Ok::<_, rowlock::Error>(row.get(0))
/// }))
/// .await?;
/// # Ok(()) }
/// ```
pub async fn with_transaction<'a, T, E, F>(
    pool: &Pool,
    options: &TransactionOptions,
    f: F,
) -> Result<T, E>
where
    E: From<Error>,
    F: for<'t> FnOnce(&'t Transaction) -> ScopedBoxFuture<'a, 't, Result<T, E>>,
{
    options.validate()?;
    let once = RetryPolicy::once();
    let plain = run_locked(
        None,
        pool,
        options,
        &once,
        &NoLock,
        call_once(|tx, ()| f(tx)),
    )
    .await?;
    Ok(plain.0)
}

/// [`with_transaction`](crate::with_transaction), retried under `policy`: each attempt calls
/// `f` again in a new transaction.
///
/// Returns `f`'s value once an attempt commits; `f`'s own error at once (unless the server
/// had already failed the transaction retryably); [`ErrorKind::RetriesExhausted`](crate::ErrorKind::RetriesExhausted) when the
/// policy gives up; [`ErrorKind::CommitOutcomeUnknown`](crate::ErrorKind::CommitOutcomeUnknown) without retrying. Invalid options or
/// policy are refused before a connection is taken. Dropping the future cancels the current
/// attempt as described on [`Transaction`].
///
/// ```no_run
/// # async fn demo(pool: &rowlock::deadpool_postgres::Pool) -> Result<(), rowlock::Error> {
/// use rowlock::{Isolation, RetryPolicy, TransactionOptions, with_transaction_retry};
///
/// let opts = TransactionOptions::new().isolation(Isolation::Serializable);
/// with_transaction_retry(pool, &opts, &RetryPolicy::new(), |tx| Box::pin(async move {
///     let on_call: i64 = tx.query_one("SELECT count(*) FROM doctors WHERE on_call", &[]).await?.get(0);
///     if on_call > 1 {
///         tx.execute("UPDATE doctors SET on_call = false WHERE name = 'alice'", &[]).await?;
///     }
///     Ok::<_, rowlock::Error>(())
/// }))
/// .await?;
/// # Ok(()) }
/// ```
pub async fn with_transaction_retry<'a, T, E, F>(
    pool: &Pool,
    options: &TransactionOptions,
    policy: &RetryPolicy,
    mut f: F,
) -> Result<T, E>
where
    E: From<Error>,
    F: for<'t> FnMut(&'t Transaction) -> ScopedBoxFuture<'a, 't, Result<T, E>>,
{
    options.validate()?;
    let plain = run_locked(None, pool, options, policy, &NoLock, |tx, ()| f(tx)).await?;
    Ok(plain.0)
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
