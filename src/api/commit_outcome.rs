//! Finding out whether a transaction committed when the connection died during `COMMIT`.

use deadpool_postgres::Pool;

use crate::error::{Error, Step};

/// What the server says became of a transaction ([`resolve_commit`]).
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
    /// The server no longer knows (the id is older than the commit log it keeps). Fall back
    /// to checking the data, e.g. an idempotency key the transaction wrote.
    Unknown,
}

/// Asks the server what became of transaction `transaction_id`, on a fresh pooled connection
/// (`pg_xact_status`).
///
/// Use it after [`ErrorKind::CommitOutcomeUnknown`](crate::ErrorKind::CommitOutcomeUnknown):
/// the id is in [`Error::transaction_id`] when the transaction was opened with
/// [`TransactionOptions::track_commit_outcome`](crate::TransactionOptions::track_commit_outcome).
///
/// The pattern that makes the ambiguous case safe end to end: give each logical operation an
/// idempotency key, write it in the same transaction (a unique column), and on
/// `CommitOutcomeUnknown` resolve the commit: `Committed` means done, `Aborted` means run it
/// again, `InProgress` means ask again, and `Unknown` means look the key up, since the key is
/// there exactly when the transaction committed.
///
/// ```no_run
/// # async fn demo(pool: &rowlock::deadpool_postgres::Pool) -> Result<(), rowlock::Error> {
/// use rowlock::{CommitStatus, ErrorKind, TransactionOptions, resolve_commit, with_transaction};
///
/// let opts = TransactionOptions::new().track_commit_outcome(true);
/// let result = with_transaction(pool, &opts, |tx| Box::pin(async move {
///     tx.execute("INSERT INTO payments (idempotency_key, amount) VALUES ('k-42', 10)", &[]).await?;
///     Ok::<_, rowlock::Error>(())
/// }))
/// .await;
/// if let Err(e) = &result {
///     if let (ErrorKind::CommitOutcomeUnknown, Some(xid)) = (e.kind(), e.transaction_id()) {
///         match resolve_commit(pool, xid).await? {
///             CommitStatus::Committed => println!("it went through"),
///             CommitStatus::Aborted => println!("safe to try again"),
///             other => println!("not known yet: {other:?}; check the idempotency key"),
///         }
///     }
/// }
/// # Ok(()) }
/// ```
pub async fn resolve_commit(pool: &Pool, transaction_id: u64) -> Result<CommitStatus, Error> {
    let client = pool.get().await.map_err(Error::from_pool)?;
    let row = client
        .query_one(
            "SELECT pg_xact_status($1::text::xid8)",
            &[&transaction_id.to_string()],
        )
        .await
        .map_err(|e| Error::from_pg(e, Step::Statement))?;
    let status: Option<String> = row
        .try_get(0)
        .map_err(|e| Error::from_pg(e, Step::Statement))?;
    Ok(match status.as_deref() {
        Some("committed") => CommitStatus::Committed,
        Some("aborted") => CommitStatus::Aborted,
        Some("in progress") => CommitStatus::InProgress,
        _ => CommitStatus::Unknown,
    })
}
