//! Finding out whether a transaction committed when the connection died during `COMMIT`.

use crate::db::Db;
use crate::error::{Error, Step, TransactionRef, is_future_transaction};

/// What the server says became of a transaction ([`Db::resolve_commit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive] // mirrors pg_xact_status, which could grow.
pub enum CommitStatus {
    /// The transaction committed: its writes are durable and visible.
    Committed,
    /// The transaction aborted: nothing it wrote is visible. It is safe to run it again.
    Aborted,
    /// The server is still finishing it (its backend has not noticed the lost connection
    /// yet); ask again shortly.
    InProgress,
    /// The server no longer knows (the id is older than the commit log it keeps), or never
    /// assigned it. Fall back to checking the data, e.g. an idempotency key the transaction
    /// wrote.
    Unknown,
    /// The pool's server is not the one that ran the transaction: another system, a standby,
    /// or a standby promoted since (a new timeline; after a failover with asynchronous
    /// replication it may never have received the commit, and its own transaction with the
    /// same id is another one). It was not asked. Check the data (an idempotency key).
    ServerChanged,
}

impl Db {
    /// Asks the server that ran `transaction` what became of it (`pg_xact_status`), on a fresh
    /// pooled connection, after checking it is that server: the same system identifier and the
    /// same timeline (a standby promoted since has a new one). Any other server is not asked:
    /// [`CommitStatus::ServerChanged`]. Two round trips.
    ///
    /// Use it after [`ErrorKind::CommitOutcomeUnknown`](crate::ErrorKind::CommitOutcomeUnknown):
    /// [`Error::transaction`] has the reference when the transaction was opened with
    /// [`TransactionOptions::track_commit_outcome`](crate::TransactionOptions::track_commit_outcome)
    /// (and [`Transaction::transaction_ref`](crate::Transaction::transaction_ref) once it began).
    ///
    /// The pattern that makes the ambiguous case safe end to end: give each logical operation an
    /// idempotency key, write it in the same transaction (a unique column), and on
    /// `CommitOutcomeUnknown` resolve the commit: `Committed` means done, `Aborted` means run it
    /// again, `InProgress` means ask again, and `Unknown` or `ServerChanged` mean look the key up,
    /// since the key is there exactly when the transaction committed (on the server you now write
    /// to).
    ///
    /// ```no_run
    /// # async fn demo(db: &rowlock::Db) -> Result<(), rowlock::Error> {
    /// use rowlock::{CommitStatus, ErrorKind, TransactionOptions};
    ///
    /// let opts = TransactionOptions::new().track_commit_outcome(true);
    /// let result = db
    ///     .with_transaction(opts, |tx| Box::pin(async move {
    ///         tx.execute("INSERT INTO payments (idempotency_key, amount) VALUES ('k-42', 10)", &[])
    ///             .await?;
    ///         Ok::<_, rowlock::Error>(())
    ///     }))
    ///     .await;
    /// if let Err(e) = &result {
    ///     if let (ErrorKind::CommitOutcomeUnknown, Some(tx)) = (e.kind(), e.transaction()) {
    ///         match db.resolve_commit(&tx).await? {
    ///             CommitStatus::Committed => println!("it went through"),
    ///             CommitStatus::Aborted => println!("safe to try again"),
    ///             other => println!("not known here: {other:?}; check the idempotency key"),
    ///         }
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn resolve_commit(
        &self,
        transaction: &TransactionRef,
    ) -> Result<CommitStatus, Error> {
        let (mut client, _) = self.checkout().await?;
        let pg = |e| Error::from_pg(e, Step::Statement);
        // Both questions in one transaction: behind a pooler in transaction mode, a statement
        // is prepared and run on the same server connection only inside one.
        let client = client.transaction().await.map_err(pg)?;
        // The timeline of the WAL being written now: NULL on a standby (in recovery).
        let row = client
            .query_one(
                "SELECT (SELECT system_identifier FROM pg_control_system()), \
                 CASE WHEN pg_is_in_recovery() THEN NULL \
                      ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END",
                &[],
            )
            .await
            .map_err(pg)?;
        let system_identifier: i64 = row.try_get(0).map_err(pg)?;
        let timeline: Option<String> = row.try_get(1).map_err(pg)?;
        let timeline = timeline.and_then(|t| u32::from_str_radix(&t, 16).ok());
        if system_identifier as u64 != transaction.system_identifier
            || timeline != Some(transaction.timeline)
        {
            return Ok(CommitStatus::ServerChanged);
        }
        let status = client
            .query_one(
                "SELECT pg_xact_status($1::text::xid8)",
                &[&transaction.id.to_string()],
            )
            .await;
        let status: Option<String> = match status {
            Ok(row) => row.try_get(0).map_err(pg)?,
            // "transaction ID … is in the future": this server never assigned it.
            Err(e) if is_future_transaction(&e) => {
                return Ok(CommitStatus::Unknown);
            }
            Err(e) => return Err(pg(e)),
        };
        Ok(match status.as_deref() {
            Some("committed") => CommitStatus::Committed,
            Some("aborted") => CommitStatus::Aborted,
            Some("in progress") => CommitStatus::InProgress,
            _ => CommitStatus::Unknown,
        })
    }
}
