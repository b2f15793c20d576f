//! The attempt loop every call runs through: take a connection and open a transaction, run
//! the call's lock step, then either return the outcome that ends the call (rolled back, with
//! who holds the lock) or run the caller's closure on what was locked and commit; classify
//! the result, and ask the retry schedule ([`crate::policy`]) whether to go again.
//!
//! The entry points ([`crate::api`]) differ only in their lock step: rows by key, a claim, an
//! advisory lock, or nothing at all (`with_transaction`).

use std::future::Future;

use crate::db::Db;
use crate::scoped::ScopedBoxFuture;

use crate::diagnostics::BlockerQuery;
use crate::error::Error;
use crate::options::TransactionOptions;
use crate::outcome::{Contended, Locked};
use crate::policy::{Backoff, RetryPolicy};
use crate::trace::{self, Mark, Recorder};
use crate::transaction::Transaction;

/// The lock step of a call: takes the locks inside the attempt's transaction.
pub(crate) trait LockStep: Sync {
    /// What it produced.
    type Locked: Locked;
    /// Takes the locks.
    fn lock<'t>(
        &'t self,
        tx: &'t Transaction,
    ) -> impl Future<Output = Result<Self::Locked, Error>> + Send + 't;
    /// How to find who holds the lock, when it could not be taken (`failed` says which:
    /// [`Error::rows`]).
    fn blockers(&self, failed: &Error) -> Option<BlockerQuery<'_>> {
        let _ = failed;
        None
    }
}

/// What the call returns when the closure returned `T`.
type Output<S, T> = <<S as LockStep>::Locked as Locked>::Output<T>;
/// What the closure is given.
type Value<S> = <<S as LockStep>::Locked as Locked>::Value;

/// Runs attempts until one succeeds, one fails for good, or the retry policy (the call's, else
/// the handle's, else one attempt) gives up; inside a `rowlock.locked_call` span when `call`
/// names one (feature `tracing`). The call's options, with the handle's defaults under them,
/// are checked before a connection is taken.
pub(crate) async fn run_locked<'a, S, T, E, F>(
    call: Option<(&'static str, &str)>,
    db: &Db,
    options: &TransactionOptions,
    step: &S,
    mut f: F,
) -> Result<Output<S, T>, E>
where
    S: LockStep,
    E: From<Error>,
    F: for<'t> FnMut(&'t Transaction, Value<S>) -> ScopedBoxFuture<'a, 't, Result<T, E>>,
{
    let options = db.options(options);
    options.validate()?;
    let once;
    let policy = match &options.retry {
        Some(policy) => policy,
        None => {
            once = RetryPolicy::once();
            &once
        }
    };
    trace::locked_call(call, async {
        let mut rec = Recorder::new(call.is_some());
        let result = attempts(db, &options, policy, step, &mut f, &mut rec).await;
        rec.finish(result.as_ref().map_or("error", Contended::label));
        result
    })
    .await
}

async fn attempts<'a, S, T, E, F>(
    db: &Db,
    options: &TransactionOptions,
    policy: &RetryPolicy,
    step: &S,
    f: &mut F,
    rec: &mut Recorder,
) -> Result<Output<S, T>, E>
where
    S: LockStep,
    E: From<Error>,
    F: for<'t> FnMut(&'t Transaction, Value<S>) -> ScopedBoxFuture<'a, 't, Result<T, E>>,
{
    let mut backoff = Backoff::new(policy)?;
    loop {
        rec.attempt(backoff.failed_attempts() + 1);
        match attempt(db, options, policy, step, f, rec).await {
            Ok(output) => return Ok(output),
            Err(Failure::Stop(e)) => return Err(e),
            Err(Failure::Retry(cause)) => backoff.wait(cause).await?,
        }
    }
}

/// Why an attempt did not produce a value.
enum Failure<E> {
    /// Give the caller this error.
    Stop(E),
    /// Try again (if the policy allows), because of this.
    Retry(Error),
}

fn failure<E: From<Error>>(error: Error, policy: &RetryPolicy) -> Failure<E> {
    if policy.retries(&error) {
        Failure::Retry(error)
    } else {
        Failure::Stop(error.into())
    }
}

/// One attempt: a new transaction, the lock step, and then the closure and the commit, or the
/// outcome that ends the call.
async fn attempt<'a, S, T, E, F>(
    db: &Db,
    options: &TransactionOptions,
    policy: &RetryPolicy,
    step: &S,
    f: &mut F,
    rec: &mut Recorder,
) -> Result<Output<S, T>, Failure<E>>
where
    S: LockStep,
    E: From<Error>,
    F: for<'t> FnMut(&'t Transaction, Value<S>) -> ScopedBoxFuture<'a, 't, Result<T, E>>,
{
    let mut tx = Transaction::begin_unchecked(db, options)
        .await
        .map_err(|e| failure(e, policy))?;
    let started = Mark::now();
    let mut locked = step.lock(&tx).await;
    if locked.as_ref().is_err_and(Error::is_stale_plan) {
        // A migration changed the table under the cached lock statement (now forgotten):
        // again on the same connection, since another could hold the same stale statement.
        tx = tx.restart(options).await.map_err(|e| failure(e, policy))?;
        locked = step.lock(&tx).await;
    }
    rec.lock_wait(started);
    let value = match locked.map(Locked::split) {
        Ok(Ok(value)) => value,
        Ok(Err(outcome)) => return not_locked(tx, outcome, step, policy).await,
        Err(e) => {
            tx.rollback_quietly().await;
            return Err(failure(e, policy));
        }
    };
    let locked_at = Mark::now();
    let result = f(&tx, value).await;
    let settled = settle(tx, result, policy).await.map(S::Locked::done);
    rec.hold(locked_at);
    settled
}

/// Commits or rolls back after the closure, and classifies the result.
async fn settle<T, E: From<Error>>(
    tx: Transaction,
    result: Result<T, E>,
    policy: &RetryPolicy,
) -> Result<T, Failure<E>> {
    match result {
        Ok(value) => match tx.commit().await {
            Ok(()) => Ok(value),
            Err(e) => Err(failure(e, policy)),
        },
        Err(e) => {
            // The caller's own error is never retried, unless the server had already failed
            // the transaction retryably (the closure mapped a 40001 into its own error).
            let cause = tx.failure();
            tx.rollback_quietly().await;
            // With one attempt nothing is retried, so the caller's error goes out as it is.
            match cause {
                Some(cause) if policy.may_retry() && policy.retries(&cause) => {
                    Err(Failure::Retry(cause))
                }
                _ => Err(Failure::Stop(e)),
            }
        }
    }
}

/// When the lock step did not lock: rolls back, and decides whether the attempt is retried
/// (lock contention, when the policy asks) or its outcome returned, with who holds the lock.
async fn not_locked<S: LockStep, O: Contended, E>(
    tx: Transaction,
    mut outcome: O,
    step: &S,
    policy: &RetryPolicy,
) -> Result<O, Failure<E>> {
    match outcome.contention_mut() {
        Some(e) if policy.retries(e) => {
            tx.rollback_quietly().await;
            let cause = outcome.into_contention().expect("matched just above");
            Err(Failure::Retry(cause))
        }
        Some(e) => {
            tx.rollback_and_find_blockers(step.blockers(e), e).await;
            Ok(outcome)
        }
        None => {
            tx.rollback_quietly().await;
            Ok(outcome)
        }
    }
}
