//! rowlock's own transaction guard over a pooled connection.
//!
//! Why not `tokio_postgres::Transaction`: `Client::transaction()` waits for `BEGIN`'s reply
//! before anything else can be sent, which costs a round trip per transaction, and its
//! `commit()` reports success when the server turned `COMMIT` into `ROLLBACK` after an error
//! that the caller swallowed. This guard sends `BEGIN` (and its `SET LOCAL`s) in the same
//! flush as the first statement, can send queued writes in the same flush as `COMMIT`, and
//! tracks every error on its own path so an aborted transaction is never reported committed.
//!
//! Round trips: `BEGIN` costs none of its own; each statement costs one (fewer when the
//! caller polls several together); `commit` costs one, including the writes queued with
//! [`Transaction::execute_on_commit`]; a first-time `prepare_cached` on a connection costs one.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, Pool};
use futures_util::future::{BoxFuture, join};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row, SimpleQueryMessage, Statement, ToStatement};

use crate::error::{Error, ErrorKind, Step};
use crate::options::{StatementCache, TransactionOptions};
use crate::pipeline::{Request, join_in_order};
use crate::retry::{RetryPolicy, with_transaction_retry};

/// How long cleanup after a dropped or failed transaction may take before the connection is
/// closed instead of returned to the pool.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// A parameter owned by a queued statement (see [`Transaction::execute_on_commit`]).
pub type OwnedParam = Box<dyn ToSql + Send + Sync>;

/// An open transaction on a pooled connection.
///
/// Obtained from [`Transaction::begin`], or handed to the closures of
/// [`with_transaction`](crate::with_transaction) and [`with_locked_row`](crate::with_locked_row).
/// Its methods take `&self`, so several statements can be polled together (for example with
/// `futures::try_join!`) and share one round trip.
///
/// `BEGIN` is not sent on its own: it goes out in the same flush as the first statement.
///
/// **Errors are tracked.** Any server error on a statement run through this guard marks the
/// transaction aborted (as PostgreSQL does); [`commit`](Self::commit) then rolls back and
/// returns [`ErrorKind::TransactionAborted`] with the root cause's SQLSTATE, even if the
/// caller ignored the error.
///
/// **On drop** without `commit`/`rollback` (an early return, a panic, a cancelled future), the
/// transaction is rolled back by a task spawned on the current Tokio runtime, and the
/// connection goes back to the pool only after the `ROLLBACK` succeeded. If a statement was
/// still in flight, a cancel request is sent first so a lock wait cannot linger, and the
/// connection is closed after the `ROLLBACK` instead of reused (a late cancel must not hit
/// the next borrower). If there is no runtime, or cleanup fails, the connection is closed
/// (the server then rolls back). A connection is never returned to the pool inside a
/// transaction.
pub struct Transaction {
    client: Option<Object>,
    state: Mutex<State>,
    /// [`StatementCache::Transaction`]: statements are prepared per transaction.
    per_transaction: bool,
    /// `idle_in_transaction_session_timeout` set by the options.
    idle_timeout: Option<Duration>,
}

#[derive(Default)]
struct State {
    /// `BEGIN …` not yet sent; taken by the first request.
    begin: Option<String>,
    /// `BEGIN` was sent: the server may have a transaction open.
    open: bool,
    /// The first error that aborted the transaction on the server.
    failure: Option<Failure>,
    /// A request was dropped before its reply arrived: the server's state is not known.
    uncertain: bool,
    /// The connection is gone.
    broken: bool,
    /// The caller used the raw client: errors there were not seen.
    raw: bool,
    /// Writes to send in the same flush as `COMMIT`.
    deferred: Vec<(Statement, Vec<OwnedParam>)>,
    /// `BEGIN` also asks for the transaction id.
    track: bool,
    /// The transaction id, when tracked.
    xid: Option<u64>,
    /// The statements this transaction prepared, when `per_transaction`; closed before the
    /// transaction ends.
    statements: HashMap<String, Statement>,
    /// When the last request finished, tracked only with an idle timeout.
    idle_since: Option<Instant>,
}

/// The error for a connection the server closed because the transaction sat idle too long.
fn idle_timeout_error(step: Step, limit: Option<Duration>, cause: Option<Error>) -> Error {
    let err = Error::with_kind(
        ErrorKind::IdleInTransactionTimeout,
        format!(
            "the server ended the session: the transaction was idle for longer than \
             idle_in_transaction_session_timeout ({limit:?}); nothing was committed"
        ),
    )
    .at(step);
    match cause {
        Some(cause) => err.with_source(cause),
        None => err,
    }
}

#[derive(Clone)]
struct Failure {
    kind: ErrorKind,
    sql_state: Option<SqlState>,
}

impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state();
        f.debug_struct("Transaction")
            .field("open", &st.open)
            .field("aborted", &st.failure.as_ref().map(|x| x.kind))
            .field("uncertain", &st.uncertain)
            .field("broken", &st.broken)
            .field("queued_on_commit", &st.deferred.len())
            .finish()
    }
}

/// Marks the transaction uncertain if dropped before `done()`: a request may be in flight.
struct InFlight<'a> {
    state: &'a Mutex<State>,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            lock(self.state).uncertain = true;
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state stays consistent even if a holder panicked: every update is a single store.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Transaction {
    /// Takes a connection from `pool` and prepares a transaction with `options`.
    ///
    /// Invalid options are refused before a connection is taken. Pool errors are returned
    /// as [`ErrorKind::PoolTimeout`] / [`ErrorKind::Pool`] / [`ErrorKind::Closed`]. Nothing is
    /// sent yet: `BEGIN` leaves with the first statement.
    ///
    /// ```no_run
    /// # async fn demo(pool: &rowlock::deadpool_postgres::Pool) -> Result<(), rowlock::Error> {
    /// use rowlock::{Transaction, TransactionOptions};
    ///
    /// let tx = Transaction::begin(pool, &TransactionOptions::new()).await?;
    /// tx.execute("UPDATE counters SET n = n + 1 WHERE id = $1", &[&1_i64]).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn begin(pool: &Pool, options: &TransactionOptions) -> Result<Transaction, Error> {
        options.validate()?;
        Self::begin_unchecked(pool, options).await
    }

    pub(crate) async fn begin_unchecked(
        pool: &Pool,
        options: &TransactionOptions,
    ) -> Result<Transaction, Error> {
        let client = pool.get().await.map_err(Error::from_pool)?;
        Ok(Transaction {
            client: Some(client),
            state: Mutex::new(State {
                begin: Some(options.begin_sql()),
                track: options.track_commit_outcome,
                ..State::default()
            }),
            per_transaction: options.effective_statement_cache() == StatementCache::Transaction,
            idle_timeout: options.idle_in_transaction_timeout,
        })
    }

    /// Whether the server's idle-in-transaction timeout has had time to fire.
    fn idle_timeout_elapsed(&self, st: &State) -> bool {
        match (self.idle_timeout, st.idle_since) {
            (Some(limit), Some(since)) => since.elapsed() >= limit,
            _ => false,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(crate) fn conn(&self) -> &Object {
        // `client` is only taken by `commit`/`rollback`/`drop`, which consume the guard.
        self.client
            .as_ref()
            .expect("rowlock: transaction used after it ended")
    }

    /// Runs one request, preceded in the same flush by `BEGIN` if it has not been sent, and
    /// records its error.
    pub(crate) async fn run<T>(
        &self,
        step: Step,
        request: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, Error> {
        let (begin, track, idled_out) = {
            let mut st = self.state();
            if st.broken {
                return Err(Error::with_kind(
                    ErrorKind::Closed,
                    "the connection of this transaction was lost earlier",
                )
                .at(step));
            }
            let begin = st.begin.take();
            st.open |= begin.is_some();
            (begin, st.track, self.idle_timeout_elapsed(&st))
        };
        let mut flight = InFlight {
            state: &self.state,
            done: false,
        };
        let result = match begin {
            None => request.await.map_err(|e| (e, step)),
            Some(sql) => match join(self.send_begin(&sql, track), request).await {
                (Ok(()), r) => r.map_err(|e| (e, step)),
                (Err(e), _) => Err((e, Step::Begin)),
            },
        };
        flight.done = true;
        if self.idle_timeout.is_some() {
            self.state().idle_since = Some(Instant::now());
        }
        result.map_err(|(e, step)| {
            let err = Error::from_pg(e, step);
            let err = if idled_out && err.kind() == ErrorKind::Closed {
                idle_timeout_error(step, self.idle_timeout, Some(err))
            } else {
                err
            };
            self.record(err)
        })
    }

    /// Sends `BEGIN …` (with the `SET LOCAL`s); when tracking, reads back the transaction id.
    async fn send_begin(&self, sql: &str, track: bool) -> Result<(), tokio_postgres::Error> {
        if !track {
            return self.conn().batch_execute(sql).await;
        }
        let messages = self.conn().simple_query(sql).await?;
        let xid = messages.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse::<u64>().ok()),
            _ => None,
        });
        self.state().xid = xid;
        Ok(())
    }

    /// What has gone wrong with the transaction on the server so far, as an error: the root
    /// cause of an abort, or the lost connection. Used to classify an attempt whose closure
    /// returned its own error.
    pub(crate) fn failure(&self) -> Option<Error> {
        let st = self.state();
        if st.broken {
            return Some(
                Error::with_kind(ErrorKind::Closed, "the connection was lost").at(Step::Statement),
            );
        }
        st.failure.as_ref().map(|f| {
            Error::with_kind(f.kind, "a statement failed and aborted the transaction")
                .at(Step::Statement)
                .with_sql_state(f.sql_state.clone())
        })
    }

    /// Notes what an error means for the transaction and returns it, enriched with the root
    /// cause when the server only said "current transaction is aborted" (25P02).
    fn record(&self, err: Error) -> Error {
        let mut st = self.state();
        match err.kind() {
            ErrorKind::Closed | ErrorKind::IdleInTransactionTimeout => st.broken = true,
            // Driver-side errors (a parameter that does not serialize…) happen before
            // anything is sent; the server's transaction is unaffected.
            ErrorKind::Driver | ErrorKind::Decode => {}
            kind => {
                let aborted_only = kind == ErrorKind::TransactionAborted;
                match &st.failure {
                    Some(root) if aborted_only => {
                        return err.with_sql_state(root.sql_state.clone());
                    }
                    Some(root) if root.kind != ErrorKind::TransactionAborted => {}
                    _ => {
                        st.failure = Some(Failure {
                            kind,
                            sql_state: err.sql_state().cloned(),
                        })
                    }
                }
            }
        }
        err
    }

    /// Prepares a statement, reusing a cached one. A cache hit sends nothing.
    ///
    /// With [`StatementCache::Connection`] (the default) the cache is the connection's
    /// (deadpool-postgres's `prepare_cached`); with [`StatementCache::Transaction`] it is this
    /// transaction's, and the statement is closed before the transaction ends.
    pub async fn prepare_cached(&self, query: &str) -> Result<Statement, Error> {
        self.run(Step::Statement, self.cached_statement(query))
            .await
    }

    /// The cached statement for `query`, in the cache [`StatementCache`] selects. Called inside
    /// [`run`](Self::run), so a first prepare rides with `BEGIN`.
    pub(crate) async fn cached_statement(
        &self,
        query: &str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if !self.per_transaction {
            return self.conn().prepare_cached(query).await;
        }
        if let Some(stmt) = self.state().statements.get(query) {
            return Ok(stmt.clone());
        }
        let stmt = self.conn().prepare(query).await?;
        self.state()
            .statements
            .insert(query.to_owned(), stmt.clone());
        Ok(stmt)
    }

    /// Drops this transaction's own statement cache ([`StatementCache::Transaction`]): each
    /// statement no one else holds is closed (a `Close` message, queued ahead of whatever is
    /// sent next on the connection, so still inside the transaction).
    fn close_statements(&self) {
        if self.per_transaction {
            let statements = std::mem::take(&mut self.state().statements);
            drop(statements);
        }
    }

    /// Prepares a statement without caching it.
    pub async fn prepare(&self, query: &str) -> Result<Statement, Error> {
        self.run(Step::Statement, self.conn().prepare(query)).await
    }

    /// Runs a statement and returns its rows. A `&str` is prepared first (an extra round
    /// trip); pass a [`Statement`] from [`prepare_cached`](Self::prepare_cached) to avoid it.
    pub async fn query<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.run(Step::Statement, self.conn().query(statement, params))
            .await
    }

    /// Runs a statement that returns exactly one row; zero or several rows are an error.
    pub async fn query_one<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.run(Step::Statement, self.conn().query_one(statement, params))
            .await
    }

    /// Runs a statement that returns at most one row.
    pub async fn query_opt<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.run(Step::Statement, self.conn().query_opt(statement, params))
            .await
    }

    /// Runs a statement and returns the number of rows it affected.
    pub async fn execute<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.run(Step::Statement, self.conn().execute(statement, params))
            .await
    }

    /// Runs one or more `;`-separated statements with the simple query protocol (no
    /// parameters).
    pub async fn batch_execute(&self, sql: &str) -> Result<(), Error> {
        self.run(Step::Statement, self.conn().batch_execute(sql))
            .await
    }

    /// Queues a write to be sent in the same flush as `COMMIT`, saving a round trip.
    ///
    /// Use it for the final writes whose results you do not need. If a queued write fails,
    /// the server rolls the transaction back, and [`commit`](Self::commit) returns that
    /// error. Queued writes are discarded if the transaction rolls back.
    ///
    /// ```no_run
    /// # async fn demo(tx: &rowlock::Transaction) -> Result<(), rowlock::Error> {
    /// let stmt = tx.prepare_cached("UPDATE projects SET status = $2 WHERE id = $1").await?;
    /// tx.execute_on_commit(&stmt, vec![Box::new(7_i64), Box::new("assigned")]);
    /// # Ok(()) }
    /// ```
    pub fn execute_on_commit(&self, statement: &Statement, params: Vec<OwnedParam>) {
        self.state().deferred.push((statement.clone(), params));
    }

    /// The underlying client, for calls this guard does not wrap (`COPY`, `query_raw`, …).
    ///
    /// Sends `BEGIN` first if it is still pending. Errors on the raw client are not seen by
    /// the guard, so [`commit`](Self::commit) then checks the transaction state in the same
    /// flush as `COMMIT` (one extra statement, no extra round trip).
    pub async fn client(&self) -> Result<&tokio_postgres::Client, Error> {
        self.run(Step::Begin, async { Ok(()) }).await?;
        self.state().raw = true;
        Ok(self.conn())
    }

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
        let early = {
            let mut st = self.state();
            let early = self.per_transaction && st.failure.is_none() && !st.broken;
            early.then(|| std::mem::take(&mut st.deferred))
        };
        if let Some(deferred) = early.filter(|d| !d.is_empty()) {
            // StatementCache::Transaction: a statement is closed when its last handle drops,
            // and the queued writes hold theirs until their replies arrive, so they are sent
            // and acknowledged before COMMIT (one extra round trip) to close them inside the
            // transaction.
            let sent = self
                .run(Step::Commit, send_deferred(self.conn(), &deferred))
                .await;
            drop(deferred);
            if let Err(e) = sent {
                let _ = self.end(false).await;
                return Err(e);
            }
        }
        let (failure, broken, verify, begin, deferred) = {
            let mut st = self.state();
            (
                st.failure.clone(),
                st.broken,
                st.uncertain || st.raw,
                st.begin.take(),
                std::mem::take(&mut st.deferred),
            )
        };
        // StatementCache::Transaction: close this transaction's statements before COMMIT.
        self.close_statements();
        if broken {
            self.discard();
            return Err(Error::with_kind(
                ErrorKind::Closed,
                "the connection was lost before COMMIT was sent; nothing was committed",
            )
            .at(Step::Commit));
        }
        if self.conn().is_closed() {
            // The server already closed the session (terminated backend, idle timeout,
            // restart): COMMIT cannot leave, so the outcome is known.
            let idled_out = self.idle_timeout_elapsed(&self.state());
            self.discard();
            return Err(if idled_out {
                idle_timeout_error(Step::Commit, self.idle_timeout, None)
            } else {
                Error::with_kind(
                    ErrorKind::Closed,
                    "the server closed the connection before COMMIT was sent; nothing was \
                     committed",
                )
                .at(Step::Commit)
            });
        }
        if let Some(root) = failure {
            let _ = self.end(false).await;
            return Err(Error::with_kind(
                ErrorKind::TransactionAborted,
                "an earlier statement failed, so the transaction was rolled back",
            )
            .at(Step::Commit)
            .with_sql_state(root.sql_state));
        }
        if begin.is_some() && deferred.is_empty() {
            // Nothing was ever sent, and only BEGIN would be: there is nothing to commit.
            self.release();
            return Ok(());
        }
        self.state().open = true;

        // Build the pipeline: [BEGIN] [queued writes…] [probe] COMMIT.
        let params: Vec<Vec<&(dyn ToSql + Sync)>> = deferred
            .iter()
            .map(|(_, ps)| ps.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect())
            .collect();
        let conn = self.conn();
        let mut requests: Vec<Request<'_, Result<(), tokio_postgres::Error>>> = Vec::new();
        let track = self.state().track;
        if let Some(sql) = &begin {
            requests.push(Box::pin(self.send_begin(sql, track)));
        }
        for ((stmt, _), ps) in deferred.iter().zip(&params) {
            requests.push(Box::pin(
                async move { conn.execute(stmt, ps).await.map(|_| ()) },
            ));
        }
        // After an unseen error, "SELECT 1" fails with 25P02 and the server skips the COMMIT
        // of the same query string, so an aborted transaction cannot pass for committed.
        let commit_sql = if verify { "SELECT 1; COMMIT" } else { "COMMIT" };
        requests.push(Box::pin(conn.batch_execute(commit_sql)));
        let mut flight = InFlight {
            state: &self.state,
            done: false,
        };
        let mut results = join_in_order(requests).await;
        flight.done = true;
        drop(flight);
        let commit_result = results.pop().expect("COMMIT is always queued");
        drop(params);

        // The first failing request is the root cause; later ones only echo 25P02.
        let first_error = results.into_iter().find_map(Result::err);
        match (first_error, commit_result) {
            (None, Ok(())) => {
                self.release();
                Ok(())
            }
            (Some(e), _) => {
                let err = Error::from_pg(e, Step::Commit);
                if err.kind() == ErrorKind::Closed {
                    // COMMIT left in the same flush: it may have reached the server.
                    return Err(self.outcome_unknown(err));
                }
                // The server turned COMMIT into ROLLBACK. Make sure the session is idle.
                let _ = self.end(false).await;
                Err(err)
            }
            (None, Err(e)) => {
                let err = Error::from_pg(e, Step::Commit);
                if err.kind() == ErrorKind::Closed {
                    return Err(self.outcome_unknown(err));
                }
                if verify && err.kind() == ErrorKind::TransactionAborted {
                    // The probe failed: COMMIT was skipped and the transaction is still open.
                    let _ = self.end(false).await;
                    return Err(Error::with_kind(
                        ErrorKind::TransactionAborted,
                        "a statement not seen by rowlock had failed, so the transaction was \
                         rolled back",
                    )
                    .at(Step::Commit)
                    .with_sql_state(err.sql_state().cloned())
                    .with_source(err));
                }
                // COMMIT itself failed (serialization failure, deferred constraint…): the
                // server ended the transaction.
                self.release();
                Err(err)
            }
        }
    }

    fn outcome_unknown(&mut self, cause: Error) -> Error {
        let xid = self.state().xid;
        self.discard();
        Error::with_kind(
            ErrorKind::CommitOutcomeUnknown,
            "the connection was lost while COMMIT was in flight; the transaction may or may \
             not have committed",
        )
        .at(Step::Commit)
        .with_transaction_id(xid)
        .with_source(cause)
    }

    /// The transaction id recorded with `BEGIN` when
    /// [`TransactionOptions::track_commit_outcome`] is on and a statement has been sent.
    pub fn transaction_id(&self) -> Option<u64> {
        self.state().xid
    }

    /// Rolls the transaction back and returns the connection to the pool.
    ///
    /// If `ROLLBACK` fails, the connection is closed rather than returned, and the error is
    /// returned ([`ErrorKind::Closed`] when the connection was already gone: the server rolls
    /// back by itself then).
    pub async fn rollback(mut self) -> Result<(), Error> {
        self.end(true).await
    }

    /// Ends the transaction with `ROLLBACK` (after cancelling a request that may still run),
    /// then releases or discards the connection.
    async fn end(&mut self, report: bool) -> Result<(), Error> {
        let (open, uncertain, broken) = {
            let mut st = self.state();
            st.deferred.clear();
            (st.open, st.uncertain, st.broken)
        };
        self.close_statements();
        if broken {
            self.discard();
            return if report {
                Err(Error::with_kind(
                    ErrorKind::Closed,
                    "the connection was lost; the server rolled the transaction back",
                )
                .at(Step::Rollback))
            } else {
                Ok(())
            };
        }
        if !open {
            self.release();
            return Ok(());
        }
        let client = self
            .client
            .take()
            .expect("rowlock: transaction ended twice");
        match cleanup(client, uncertain).await {
            Ok(()) => Ok(()),
            Err(e) if report => Err(Error::from_pg(e, Step::Rollback)),
            Err(_) => Ok(()),
        }
    }

    pub(crate) async fn rollback_quietly(mut self) {
        let _ = self.end(false).await;
    }

    /// Rolls back after a lock that could not be taken, then, on the same connection and only
    /// if it is clean, asks the server who holds the lock and records it on `contention`.
    pub(crate) async fn rollback_and_find_blockers(mut self, contention: &mut Error) {
        let Some(query) = contention.take_blocker_query() else {
            return self.rollback_quietly().await;
        };
        let (open, uncertain, broken) = {
            let st = self.state();
            (st.open, st.uncertain, st.broken)
        };
        if !open || uncertain || broken {
            return self.rollback_quietly().await;
        }
        self.close_statements();
        let client = self
            .client
            .take()
            .expect("rowlock: transaction ended twice");
        let dirty = Dirty(Some(client));
        match tokio::time::timeout(CLEANUP_TIMEOUT, dirty.conn().batch_execute("ROLLBACK")).await {
            Ok(Ok(())) => {}
            _ => return, // `dirty` closes the connection
        }
        // The locks are released: from here on the caller waits only for the diagnosis.
        if let Some(blockers) = query.run(dirty.conn()).await {
            contention.set_blockers(blockers);
            dirty.release();
        }
        // A failed or timed-out diagnosis may leave its transaction open: `dirty` closes it.
    }

    /// Returns the connection to the pool: only called when the server is known to be
    /// outside a transaction.
    fn release(&mut self) {
        self.client.take();
    }

    /// Closes the connection instead of returning it to the pool.
    fn discard(&mut self) {
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

/// Sends queued writes in one flush and waits for all their replies; the first error wins.
async fn send_deferred(
    conn: &Object,
    deferred: &[(Statement, Vec<OwnedParam>)],
) -> Result<(), tokio_postgres::Error> {
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = deferred
        .iter()
        .map(|(_, ps)| ps.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect())
        .collect();
    let requests: Vec<Request<'_, Result<(), tokio_postgres::Error>>> = deferred
        .iter()
        .zip(&params)
        .map(|((stmt, _), ps)| -> Request<'_, _> {
            Box::pin(async move { conn.execute(stmt, ps).await.map(|_| ()) })
        })
        .collect();
    join_in_order(requests)
        .await
        .into_iter()
        .find_map(Result::err)
        .map_or(Ok(()), Err)
}

/// A connection whose transaction state is not known to be clean: closed (not returned to the
/// pool) when dropped, unless [`release`](Dirty::release)d. Guards every cleanup path,
/// including a cleanup future that is itself dropped (runtime shutdown, a cancelled
/// `rollback()`).
struct Dirty(Option<Object>);

impl Dirty {
    fn conn(&self) -> &Object {
        self.0
            .as_ref()
            .expect("a Dirty connection is present until released or dropped")
    }

    /// The server confirmed the session is outside a transaction: back to the pool.
    fn release(mut self) {
        self.0.take();
    }
}

impl Drop for Dirty {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(Object::take(client));
        }
    }
}

/// Ends whatever the server is doing on `client`.
///
/// Without a request in flight: `ROLLBACK`, and the connection returns to the pool only if
/// the server acknowledged it. With one (`cancel_first`): a cancel request first, so a lock
/// wait cannot hold up the `ROLLBACK`, and then the connection is closed even after a
/// successful `ROLLBACK`. PostgreSQL acts on a cancel request asynchronously (tokio-postgres
/// returns once it is sent), so a reused connection could see a late cancel interrupt the next
/// borrower's statement. Closing it makes that impossible, and the acknowledged `ROLLBACK`
/// means the locks are already released when this returns.
async fn cleanup(client: Object, cancel_first: bool) -> Result<(), tokio_postgres::Error> {
    let dirty = Dirty(Some(client));
    if cancel_first {
        // Best effort: the cancel connection uses no TLS; if it fails, the ROLLBACK timeout
        // below still bounds the wait.
        let token = dirty.conn().cancel_token();
        let _ = tokio::time::timeout(CLEANUP_TIMEOUT, token.cancel_query(NoTls)).await;
    }
    // A late cancel can interrupt the ROLLBACK itself (57014); it is consumed by doing so, so a
    // second ROLLBACK then runs normally.
    let mut result = Ok(());
    for _ in 0..2 {
        match tokio::time::timeout(CLEANUP_TIMEOUT, dirty.conn().batch_execute("ROLLBACK")).await {
            Ok(Ok(())) => {
                if !cancel_first {
                    dirty.release();
                }
                return Ok(());
            }
            Ok(Err(e)) if e.code() == Some(&SqlState::QUERY_CANCELED) => result = Err(e),
            Ok(Err(e)) => return Err(e),
            Err(_elapsed) => return result,
        }
    }
    result
}

impl Drop for Transaction {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let (open, uncertain, broken) = {
            let mut st = lock(&self.state);
            // Closed before the ROLLBACK is queued (see `close_statements`).
            st.deferred.clear();
            st.statements.clear();
            (st.open, st.uncertain, st.broken)
        };
        if !open {
            return; // Nothing was sent: the connection is clean.
        }
        if broken {
            drop(Object::take(client));
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    let _ = cleanup(client, uncertain).await;
                });
            }
            // No runtime to roll back on: close the connection; the server rolls back.
            Err(_) => drop(Object::take(client)),
        }
    }
}

/// Runs `f` in a transaction: commits if it returns `Ok`, rolls back if it returns `Err`.
///
/// - Invalid `options` are refused with [`ErrorKind::InvalidArgument`] before a connection is
///   taken.
/// - Pool and connection failures are returned as [`Error`] (converted into `E`).
/// - If `f` returns `Err(e)`, the transaction is rolled back and `e` is returned unchanged.
/// - If `f` returns `Ok(v)` but a statement in it failed (even one whose error `f`
///   swallowed), the transaction is rolled back and
///   [`ErrorKind::TransactionAborted`] is returned: never a false success.
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
pub async fn with_transaction<T, E, F>(
    pool: &Pool,
    options: &TransactionOptions,
    f: F,
) -> Result<T, E>
where
    E: From<Error>,
    F: for<'t> FnOnce(&'t Transaction) -> BoxFuture<'t, Result<T, E>>,
{
    let mut f = Some(f);
    with_transaction_retry(pool, options, &RetryPolicy::once(), move |tx| {
        let f = f
            .take()
            .expect("a one-attempt policy calls the closure once");
        f(tx)
    })
    .await
}
