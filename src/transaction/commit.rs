//! Committing: plan from the state ([`State::plan_commit`](super::state::State::plan_commit)),
//! send `[BEGIN] [queued writes…] [probe;] COMMIT` in one flush, and classify the replies
//! with a pure function.

use super::Transaction;
use super::state::{CommitPlan, Prelude};
use crate::error::{Error, ErrorKind, Step};
use crate::flush::{At, Flush, Writes};

/// When the raw client was used: after an error rowlock did not see, `SAVEPOINT` fails with
/// `25P02` and the server skips the `COMMIT` of the same query string, so an aborted
/// transaction cannot pass for committed; after a `COMMIT` or `ROLLBACK` sent on the raw
/// client, the session is outside any transaction block and `SAVEPOINT` fails with `25P01`
/// ("can only be used in transaction blocks", also in the implicit block of this query
/// string), so statements that ran on their own after it cannot pass for one committed
/// transaction. `COMMIT` ends the savepoint with the transaction.
const PROBE_AND_COMMIT: &str = "SAVEPOINT rowlock_probe; COMMIT";

/// What the replies to a commit flush mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Committed.
    Committed,
    /// The connection died with `COMMIT` in the same flush: it may have reached the server.
    Unknown,
    /// A request before `COMMIT` failed, so the server turns `COMMIT` into `ROLLBACK`; make
    /// sure the session is idle, report the failure.
    RolledBack,
    /// The probe failed: `COMMIT` was skipped and the transaction is still open.
    ProbeFailed,
    /// The probe found no transaction: the caller ended it on the raw client, and what ran
    /// after that ran on its own.
    EndedByCaller,
    /// `COMMIT` itself failed (serialization failure, deferred constraint…): the server
    /// ended the transaction.
    CommitFailed,
}

/// Classifies a commit flush's outcome: `None` when every request succeeded, else the kind of
/// the first failure and where it stood. Pure.
/// `outside` says that the failure was the server being outside a transaction block.
fn classify(first_failure: Option<(ErrorKind, At)>, verify: bool, outside: bool) -> Verdict {
    match first_failure {
        None => Verdict::Committed,
        Some((ErrorKind::Closed, _)) => Verdict::Unknown,
        Some((_, At::Main)) if verify && outside => Verdict::EndedByCaller,
        Some((ErrorKind::TransactionAborted, At::Main)) if verify => Verdict::ProbeFailed,
        Some((_, At::Main)) => Verdict::CommitFailed,
        Some((_, At::Before(_) | At::After(_))) => Verdict::RolledBack,
    }
}

impl Transaction {
    /// Commits the transaction.
    ///
    /// Sends the queued writes and `COMMIT` in one flush. Returns:
    /// - `Ok(())` only when PostgreSQL committed;
    /// - [`ErrorKind::TransactionAborted`] (rolled back) when an earlier statement failed,
    ///   with the root cause's SQLSTATE;
    /// - the queued write's or `COMMIT`'s own error (e.g. `40001`, a deferred constraint),
    ///   after which nothing is committed;
    /// - [`ErrorKind::CommitOutcomeUnknown`] when the connection was lost while `COMMIT` was
    ///   in flight;
    /// - [`ErrorKind::Closed`] when the connection was lost before `COMMIT` was sent
    ///   (nothing committed).
    ///
    /// A transaction that never sent a statement commits without a round trip.
    /// Dropping the returned future before it completes leaves the outcome unknown; the
    /// connection is cleaned up as described on [`Transaction`].
    pub async fn commit(mut self) -> Result<(), Error> {
        if self.statements_per_transaction() && self.state().writes().any_named() {
            // Writes that bind this transaction's statements go first, so that the statements
            // can be closed before COMMIT. Boxed here and below: paths off the common one keep
            // the commit's future small.
            Box::pin(self.send_queued_ahead()).await?;
        }
        let plan = self.state().plan_commit(self.conn().is_closed());
        // StatementCache::Transaction: close this transaction's statements before COMMIT.
        self.close_statements();
        match plan {
            CommitPlan::Lost => {
                let closed = Error::with_kind(
                    ErrorKind::Closed,
                    "the connection was lost before COMMIT was sent; nothing was committed",
                )
                .at(Step::Commit);
                let err = self.lost(Step::Commit, false, closed);
                self.discard();
                Err(err)
            }
            CommitPlan::ClosedByServer => {
                // Terminated backend, idle timeout, restart: COMMIT cannot leave.
                let idled_out = self.idle_timeout_elapsed(&self.state());
                let closed = Error::with_kind(
                    ErrorKind::Closed,
                    "the server closed the connection before COMMIT was sent; nothing was \
                     committed",
                )
                .at(Step::Commit);
                let err = self.lost(Step::Commit, idled_out, closed);
                self.discard();
                Err(err)
            }
            CommitPlan::Aborted(root) => {
                let _ = Box::pin(self.end(false)).await;
                Err(Error::with_kind(
                    ErrorKind::TransactionAborted,
                    "an earlier statement failed, so the transaction was rolled back",
                )
                .at(Step::Commit)
                .with_sql_state(root.sql_state)
                .with_stale(root.stale))
            }
            CommitPlan::Nothing => {
                self.release();
                Ok(())
            }
            CommitPlan::Send {
                prelude,
                writes,
                verify,
                close,
            } => {
                self.send_commit(prelude.as_ref(), &writes, verify, close)
                    .await
            }
        }
    }

    /// Sends `[BEGIN and queued statements] [queued writes…] [probe;] COMMIT` in one flush
    /// and acts on the verdict.
    async fn send_commit(
        &mut self,
        prelude: Option<&Prelude>,
        writes: &Writes,
        verify: bool,
        close: bool,
    ) -> Result<(), Error> {
        let conn = self.conn();
        let mut flush = Flush::new(conn);
        if let Some(prelude) = prelude {
            flush = flush.before(self.prelude_side(prelude));
        }
        let commit_sql = if verify { PROBE_AND_COMMIT } else { "COMMIT" };
        let flight = super::InFlight(Some(&self.state));
        let reply = flush
            .send_after_writes(writes, conn.batch_execute(commit_sql))
            .await;
        flight.landed();
        // Noted as every statement's error is: a standby's `25006` closes the connection,
        // and in a transaction opened `READ ONLY` it is the caller's write, not a standby.
        let failed = reply
            .err()
            .map(|f| (self.record(Error::from_pg(f.error, Step::Commit)), f.at));
        if let Some((e, _)) = &failed {
            self.forget_stale_texts(e, writes);
        }
        let outside = failed.as_ref().is_some_and(|(e, _)| e.is_no_transaction());
        let verdict = classify(
            failed.as_ref().map(|(e, at)| (e.kind(), *at)),
            verify,
            outside,
        );
        let error = failed.map(|(e, _)| e);
        match verdict {
            Verdict::Committed => {
                self.release_or_close(close);
                Ok(())
            }
            Verdict::Unknown => Err(self.outcome_unknown(error.expect("a failure"))),
            Verdict::RolledBack => {
                let _ = Box::pin(self.end(false)).await;
                Err(error.expect("a failure"))
            }
            Verdict::ProbeFailed => {
                let _ = Box::pin(self.end(false)).await;
                let cause = error.expect("a failure");
                Err(Error::with_kind(
                    ErrorKind::TransactionAborted,
                    "a statement not seen by rowlock had failed, so the transaction was rolled \
                     back",
                )
                .at(Step::Commit)
                .with_sql_state(cause.sql_state().cloned())
                .with_boxed_source(cause.into_source()))
            }
            Verdict::EndedByCaller => {
                // The raw client may have changed the session too: never back to the pool.
                self.discard();
                let cause = error.expect("a failure");
                Err(Error::with_kind(
                    ErrorKind::Db,
                    "the transaction had been ended on the raw client (a COMMIT or ROLLBACK \
                     sent through Transaction::client) before rowlock's COMMIT: its locks were \
                     released then, and each statement sent after it ran and committed on its \
                     own",
                )
                .at(Step::Commit)
                .with_sql_state(cause.sql_state().cloned())
                .with_boxed_source(cause.into_source()))
            }
            Verdict::CommitFailed => {
                self.release_or_close(close);
                Err(error.expect("a failure"))
            }
        }
    }

    /// [`StatementCache::Transaction`](crate::StatementCache::Transaction): a statement is
    /// closed when its last handle drops, and queued writes hold theirs until their replies
    /// arrive, so they are sent and acknowledged before `COMMIT` (one extra round trip) to
    /// close them inside the transaction.
    async fn send_queued_ahead(&mut self) -> Result<(), Error> {
        let writes = self.state().take_queued_if_healthy();
        if writes.is_empty() {
            return Ok(());
        }
        let flush = Flush::new(self.conn());
        let sent = self
            .run(Step::Commit, || async {
                let sent = flush.send_after_writes(&writes, std::future::ready(Ok(())));
                sent.await.map_err(|f| f.error)
            })
            .await;
        if let Err(e) = &sent {
            self.forget_stale_texts(e, &writes);
        }
        drop(writes);
        if let Err(e) = sent {
            let _ = self.end(false).await;
            return Err(e);
        }
        Ok(())
    }

    /// After `e` failed a flush of `writes`: the texts among them are learned again on their
    /// next use when `e` says their learned parameter types may be stale (as a text run at
    /// once would be).
    fn forget_stale_texts(&self, e: &Error, writes: &Writes) {
        if e.may_be_stale_types() {
            for sql in writes.texts() {
                self.db().forget_text_types(sql);
            }
        }
    }

    fn outcome_unknown(&mut self, cause: Error) -> Error {
        let xid = self.transaction_id();
        let transaction = self.transaction_ref();
        self.discard();
        Error::with_kind(
            ErrorKind::CommitOutcomeUnknown,
            "the connection was lost while COMMIT was in flight; the transaction may or may \
             not have committed",
        )
        .at(Step::Commit)
        .with_transaction_id(xid)
        .with_transaction(transaction)
        .with_boxed_source(cause.into_source())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_replies_are_classified() {
        use ErrorKind::*;
        let cases = [
            (None, false, Verdict::Committed),
            (Some((Closed, At::Main)), false, Verdict::Unknown),
            (Some((Closed, At::Before(0))), true, Verdict::Unknown),
            (Some((Db, At::Before(1))), false, Verdict::RolledBack),
            (
                Some((TransactionAborted, At::Before(2))),
                true,
                Verdict::RolledBack,
            ),
            (
                Some((TransactionAborted, At::Main)),
                true,
                Verdict::ProbeFailed,
            ),
            (
                Some((TransactionAborted, At::Main)),
                false,
                Verdict::CommitFailed,
            ),
            (
                Some((SerializationFailure, At::Main)),
                true,
                Verdict::CommitFailed,
            ),
            (Some((Db, At::Main)), false, Verdict::CommitFailed),
        ];
        for (failure, verify, verdict) in cases {
            assert_eq!(
                classify(failure, verify, false),
                verdict,
                "{failure:?}, verify {verify}"
            );
        }
        // Outside a transaction block: ended by the caller only when the probe was sent.
        assert_eq!(
            classify(Some((Db, At::Main)), true, true),
            Verdict::EndedByCaller
        );
        assert_eq!(
            classify(Some((Db, At::Main)), false, true),
            Verdict::CommitFailed
        );
    }
}
