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
//! [`Transaction::execute_on_commit`]; a first-time `prepare_cached` on a connection costs one,
//! and so does the first use of a SQL text on the handle (to learn its parameter types).

mod alone;
mod commit;
mod end;
mod savepoint;
mod state;

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use deadpool_postgres::Object;

use crate::db::{Db, Statements};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement, ToStatement};

use crate::error::{Error, ErrorKind, Step};
pub(crate) use crate::flush::Rows;
use crate::flush::{At, Failed, Flush, Learned, Misfit, Reported, Runnable, Side, Writes};
use crate::options::{StatementCache, TransactionOptions};
use crate::sql_text::Read;
use state::{Phase, Prelude, State};

pub(crate) use alone::run_alone;
pub use savepoint::{AsStatement, Savepoint};

/// A value a [`Claim`](crate::Claim) keeps for every call it is used in (its `where_sql` and
/// `mark` values).
pub type OwnedParam = Box<dyn ToSql + Send + Sync>;

/// An open transaction on a pooled connection.
///
/// Obtained from [`Db::begin`](crate::Db::begin), or handed to the closures of
/// [`Db::with_transaction`](crate::Db::with_transaction) and [`Db::with_locked_row`](crate::Db::with_locked_row).
/// Its methods take `&self`, so several statements can be polled together (for example with
/// `futures::try_join!`) and share one round trip.
///
/// `BEGIN` is not sent on its own: it goes out in the same flush as the first statement.
///
/// **Errors are tracked.** Any server error on a statement run through this guard marks the
/// transaction aborted (as PostgreSQL does); [`commit`](Self::commit) then rolls back and
/// returns [`ErrorKind::TransactionAborted`] with the root cause's SQLSTATE, even if the
/// caller ignored the error, unless the error was recovered by rolling back to a savepoint
/// ([`savepoint`](Self::savepoint), or savepoint SQL sent through this guard), as PostgreSQL
/// recovers it.
///
/// **Values that do not fit.** A value whose Rust type does not fit its placeholder's type
/// (text for a `bigint`), or the wrong number of values, fails the statement method (`execute`,
/// `query…`) with [`ErrorKind::InvalidArgument`] naming the placeholder as the SQL spells it
/// (`parameter $2 has the wrong type: …`), as [`execute_on_commit`](Self::execute_on_commit)
/// refuses it: nothing of the statement was sent, and the transaction goes on.
///
/// **SQL it refuses.** Text sent through its methods (`execute`, `query…`, `batch_execute`,
/// `prepare…`) that would end or restart the transaction under the guard (`COMMIT`, `END`,
/// `ROLLBACK` without `TO`, `ABORT`, `PREPARE TRANSACTION`, `BEGIN`, `START TRANSACTION`) or
/// change the pooled session for later borrowers (`SET` without `LOCAL`, other than
/// `SET TRANSACTION` and `SET CONSTRAINTS`) fails with [`ErrorKind::InvalidArgument`] before
/// anything is sent: the transaction and its locks are as they were, and it can go on. Return
/// from your code to commit or roll back; use `SET LOCAL` for a setting. Savepoint commands
/// are followed when sent as text, refused when prepared. Statements that leave state in the
/// session on purpose (`LISTEN`, `PREPARE`, `DEALLOCATE`, `DECLARE … WITH HOLD`,
/// `CREATE TEMP …` without `ON COMMIT DROP`, `LOAD`, a session-level advisory lock such as
/// `pg_advisory_lock(…)`, `set_config(…, false)`) run, and the connection is closed when the
/// transaction ends instead of going back to the pool, so the next caller finds a clean
/// session (a temporary table of the same name, a free `LISTEN`, the advisory key free, the
/// setting as it was; not behind PgBouncer's transaction pooling, which keeps the server
/// session for its next client). Prefer [`advisory_lock`](Self::advisory_lock) and
/// `set_config(…, true)`, which end with the transaction and keep the connection pooled. Text
/// on the raw [`client`](Self::client), in functions and `DO` blocks, and `SELECT … INTO
/// TEMP` are not read.
///
/// **On drop** without `commit`/`rollback` (an early return, a panic, a cancelled future):
/// - with no statement in flight (the usual case: dropped between statements), `ROLLBACK` is
///   queued on the connection inside `drop` itself and the connection goes straight back to
///   the pool, as tokio-postgres's own `Transaction` does. Anything sent on that connection
///   afterwards reaches the server behind the `ROLLBACK`, so the next borrower of the
///   connection finds the rows free;
/// - with a statement still in flight (a lock wait, a slow query), a task spawned on the
///   current Tokio runtime cancels it first (so a lock wait cannot linger), then rolls back
///   and closes the connection instead of reusing it (a late cancel must not hit the next
///   borrower);
/// - if there is no runtime, or cleanup fails, the connection is closed (the server then
///   rolls back).
///
/// A connection is never returned to the pool inside a transaction or with a statement still
/// running.
pub struct Transaction {
    client: Option<Object>,
    /// The handle it was opened from: the names learned about each row type's table.
    db: Db,
    /// The connection's statement cache ([`StatementCache::Connection`]); `None` with
    /// [`StatementCache::Transaction`], where the caller's prepared statements are this
    /// transaction's, kept in its state, and rowlock's own go unnamed ([`Self::run_sql`]).
    statements: Option<Arc<Statements>>,
    state: Mutex<State>,
    /// `idle_in_transaction_session_timeout` set by the options.
    idle_timeout: Option<Duration>,
    /// `BEGIN` also asks for the transaction id and/or the server process id.
    reporting: bool,
    /// The options set a lock timeout: any lock wait can fail with `55P03`.
    lock_timeout: bool,
    /// Opened `READ ONLY`: a refused write (`25006`) is the caller's, not a standby's.
    read_only: bool,
    /// What `BEGIN` reported: the transaction id (when tracked), the server process id (behind
    /// a pooler).
    reported: Reported,
}

impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state();
        let mut d = f.debug_struct("Transaction");
        match st.phase() {
            Phase::NotBegun { .. } => d.field("open", &false),
            Phase::Open { aborted, blind } => d
                .field("open", &true)
                .field("aborted", &aborted.as_ref().map(|x| x.kind))
                .field("unseen", blind),
            Phase::Broken => d.field("broken", &true),
        };
        d.field("queued_on_commit", &st.queued()).finish()
    }
}

/// Marks the transaction as having a request in flight if dropped before [`landed`]: the
/// request may still be running on the server.
///
/// [`landed`]: InFlight::landed
struct InFlight<'a>(Option<&'a Mutex<State>>);

impl InFlight<'_> {
    fn landed(mut self) {
        self.0 = None;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(state) = self.0 {
            lock(state).request_dropped();
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state stays consistent even if a holder panicked: every transition is one call.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The error for a connection the server closed because the transaction sat idle too long.
fn idle_timeout_error(step: Step, limit: Option<Duration>) -> Error {
    let limit = limit.map(|l| format!(" ({l:?})")).unwrap_or_default();
    Error::with_kind(
        ErrorKind::IdleInTransactionTimeout,
        format!(
            "the server ended the session: the transaction was idle for longer than \
             idle_in_transaction_session_timeout{limit}; nothing was committed"
        ),
    )
    .at(step)
}

impl Transaction {
    /// Takes a connection from `db`'s pool and prepares a transaction with `options` (already
    /// checked, the handle's defaults under them).
    pub(crate) async fn begin_unchecked(
        db: &Db,
        options: &TransactionOptions,
    ) -> Result<Transaction, Error> {
        let per_transaction =
            options.statement_cache.unwrap_or(db.statement_cache()) == StatementCache::Transaction;
        let (client, statements) = db.checkout().await?;
        let statements = (!per_transaction).then_some(statements);
        Ok(Self::on(db.clone(), client, statements, options))
    }

    /// The handle this transaction was opened from.
    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// A transaction with `options` on a connection that is outside any transaction, with the
    /// connection's statement cache (`None`: no statement outlives the transaction).
    fn on(
        db: Db,
        client: Object,
        statements: Option<Arc<Statements>>,
        options: &TransactionOptions,
    ) -> Transaction {
        let per_transaction = statements.is_none();
        let writes = Writes::with_spare(db.spare_buffers());
        Transaction {
            statements,
            client: Some(client),
            db,
            // Behind a pooler (`StatementCache::Transaction`), the connection's cancel key names
            // the pooler, not the server process: `BEGIN` reports the process to cancel.
            state: Mutex::new(State::new(options.begin_sql(per_transaction), writes)),
            idle_timeout: options.idle_in_transaction_timeout,
            reporting: options.track_commit_outcome || per_transaction,
            lock_timeout: options.lock_timeout.is_some(),
            read_only: options.read_only,
            reported: Reported::default(),
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

    /// Whether `BEGIN` has been sent.
    pub(crate) fn begun(&self) -> bool {
        !matches!(self.state().phase(), Phase::NotBegun { .. })
    }

    /// Whether no statement may outlive the transaction
    /// ([`StatementCache::Transaction`](crate::StatementCache::Transaction)).
    pub(crate) fn statements_per_transaction(&self) -> bool {
        self.statements.is_none()
    }

    /// Whether a lock wait in this transaction can end in a lock timeout: its options set one,
    /// or the call does.
    pub(crate) fn lock_may_time_out(&self, call_timeout: bool) -> bool {
        self.lock_timeout || call_timeout
    }

    /// Whether the server's idle-in-transaction timeout has had time to fire.
    fn idle_timeout_elapsed(&self, st: &State) -> bool {
        match (self.idle_timeout, st.idle_since()) {
            (Some(limit), Some(since)) => since.elapsed() >= limit,
            _ => false,
        }
    }

    /// The request that sends what goes ahead of the next one: `BEGIN …` (reading back the
    /// transaction id when tracked) and queued statements.
    fn prelude_side<'a>(&'a self, prelude: &'a Prelude) -> Side<'a> {
        if prelude.begins && self.reporting {
            Side::BeginReporting(&prelude.sql, &self.reported)
        } else {
            Side::Simple(&prelude.sql)
        }
    }

    /// Reads SQL text the caller sends through the guard, before anything is sent: refuses
    /// what would end its transaction or change the pooled session (nothing is sent), and
    /// returns the savepoint commands to follow once the text has run
    /// ([`crate::sql_text`]). A prepared statement's text was read when it was prepared.
    fn read_sql(sql: Option<&str>) -> Result<Read, Error> {
        match sql {
            Some(sql) => crate::sql_text::caller_commands(sql),
            None => Ok(Read::default()),
        }
    }

    /// Follows what text the caller sent did: its savepoint commands, once it succeeded, and
    /// state it may have left in the session (then the connection is closed at the end),
    /// whether it succeeded or not: `PREPARE`, `DEALLOCATE` and `LOAD` outlast a rollback.
    fn observe<T>(&self, read: Read, result: &Result<T, Error>) {
        let savepoints = result.is_ok() && !read.savepoints.is_empty();
        if !savepoints && !read.changes_session {
            return;
        }
        let mut st = self.state();
        if savepoints {
            for command in read.savepoints {
                st.observe(command);
            }
        }
        if read.changes_session {
            st.close_at_end();
        }
    }

    /// Runs one request, preceded in the same flush by `BEGIN` if it has not been sent, and
    /// records its error.
    ///
    /// Takes the request as a function that makes it, called where it is awaited: a request
    /// future passed by value would be kept twice in this one (as the argument, and where it
    /// is polled), and a driver request is about a kilobyte.
    pub(crate) async fn run<T, R>(
        &self,
        step: Step,
        request: impl FnOnce() -> R,
    ) -> Result<T, Error>
    where
        R: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let (prelude, idled_out) = {
            let mut st = self.state();
            let Ok(prelude) = st.start_request() else {
                return Err(Error::with_kind(
                    ErrorKind::Closed,
                    "the connection of this transaction was lost earlier",
                )
                .at(step));
            };
            (prelude, self.idle_timeout_elapsed(&st))
        };
        let flight = InFlight(Some(&self.state));
        let result = match &prelude {
            Some(prelude) => {
                Flush::new(self.conn())
                    .before(self.prelude_side(prelude))
                    .send(request())
                    .await
            }
            // Nothing goes with it: the request alone (a cache hit sends nothing at all).
            None => request().await.map_err(|error| Failed {
                error,
                at: At::Main,
            }),
        };
        flight.landed();
        if self.idle_timeout.is_some() {
            self.state().request_done(Instant::now());
        }
        result.map_err(|failed| {
            let step = match &prelude {
                _ if failed.at == At::Main => step,
                Some(p) if p.begins => Step::Begin,
                _ => Step::Statement,
            };
            let err = Error::from_pg(failed.error, step);
            if err.is_stale_plan() {
                // A migration changed a table under the cached statements: prepare afresh.
                self.forget_statements();
            }
            let err = if err.kind() == ErrorKind::Closed {
                self.lost(step, idled_out, err)
            } else {
                err
            };
            self.record(err)
        })
    }

    /// A connection lost at `step`, said as well as it is known: as the server said it, when
    /// `closed` carries its words (kept for what fails on the connection later); in the
    /// server's words when it ended the session while no request waited (an
    /// idle-in-transaction timeout set on the server, `pg_terminate_backend`, a shutdown);
    /// else as the idle timeout of this transaction's options when it had time to fire; else
    /// `closed` as it is.
    fn lost(&self, step: Step, idled_out: bool, closed: Error) -> Error {
        if let Some(end) = closed.as_db_error() {
            // The server's words came with this failure: keep them for what fails next.
            self.db.note_session_end(self.conn(), end);
            return closed;
        }
        if let Some(end) = self.db.session_end(self.conn()) {
            return Error::session_ended(end, step, self.idle_timeout);
        }
        if idled_out {
            idle_timeout_error(step, self.idle_timeout).with_boxed_source(closed.into_source())
        } else {
            closed
        }
    }

    /// What has gone wrong with the transaction on the server so far, as an error: the root
    /// cause of an abort, or the lost connection. Used to classify an attempt whose closure
    /// returned its own error.
    pub(crate) fn failure(&self) -> Option<Error> {
        let st = self.state();
        if st.is_broken() {
            return Some(
                Error::with_kind(ErrorKind::Closed, "the connection was lost").at(Step::Statement),
            );
        }
        st.aborted().map(|f| {
            Error::with_kind(f.kind, "a statement failed and aborted the transaction")
                .at(Step::Statement)
                .with_sql_state(f.sql_state.clone())
                .with_stale(f.stale)
        })
    }

    /// Notes what an error means for the transaction and returns it, enriched with the root
    /// cause when the server only said "current transaction is aborted" (25P02).
    fn record(&self, err: Error) -> Error {
        let err = if self.read_only && err.kind() == ErrorKind::ReadOnly {
            // The transaction itself is read-only: not a sign of a standby.
            err.reclassified(ErrorKind::Db, "a write in a transaction opened READ ONLY")
        } else {
            err
        };
        match self
            .state()
            .record(err.kind(), err.sql_state(), err.is_stale_plan())
        {
            Some(root) => err.with_sql_state(root),
            None => err,
        }
    }

    /// Prepares a statement, reusing a cached one. A cache hit sends nothing.
    ///
    /// With [`StatementCache::Connection`] (the default) the cache is the connection's (kept by
    /// the handle, bounded by [`Builder::statement_cache_limit`](crate::Builder::statement_cache_limit));
    /// with [`StatementCache::Transaction`] it is this transaction's, and the statement is
    /// closed before the transaction ends.
    ///
    /// The statement belongs to this transaction's connection: use it in this transaction.
    /// Kept and passed to a later transaction, it fails on any other pooled connection
    /// (`26000`, an error that says so); prepare it again in each transaction instead, which
    /// costs nothing once the connection has it.
    pub async fn prepare_cached(&self, query: &str) -> Result<Statement, Error> {
        // A hit sends nothing: no request, so nothing of a request's bookkeeping.
        if let Some(statement) = self.statement_in_cache(query) {
            return Ok(statement);
        }
        Self::read_prepared(query)?;
        self.run(Step::Statement, || self.cached_statement(query))
            .await
    }

    /// Reads text the caller prepares: refused as text sent at once is, and so is a
    /// savepoint command or a statement that leaves state in the session (the guard follows
    /// those only when they run as text).
    fn read_prepared(query: &str) -> Result<(), Error> {
        let read = Self::read_sql(Some(query))?;
        if read.savepoints.is_empty() && !read.changes_session {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "`{query}` is a savepoint command or leaves state in the session: send it as \
                 text (`execute`, `batch_execute`), so the transaction follows it (or use \
                 tx.savepoint()); a prepared one would run unseen"
            )))
        }
    }

    /// The statement cached for `query` in the cache [`StatementCache`] selects, if any.
    fn statement_in_cache(&self, query: &str) -> Option<Statement> {
        match &self.statements {
            Some(statements) => Db::cached(statements, query),
            None => self.state().statement(query),
        }
    }

    /// The cached statement for `query`, in the cache [`StatementCache`] selects. Called inside
    /// [`run`](Self::run), so a first prepare rides with `BEGIN`.
    pub(crate) async fn cached_statement(
        &self,
        query: &str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(stmt) = self.statement_in_cache(query) {
            return Ok(stmt);
        }
        // Boxed: a miss is rare, and a prepare's future large; a hit's future stays small.
        let stmt = Box::pin(self.conn().prepare(query)).await?;
        match &self.statements {
            Some(statements) => self.db.remember(statements, query, stmt.clone()),
            None => self.state().remember(query, stmt.clone()),
        }
        Ok(stmt)
    }

    /// Empties the statement caches this transaction uses (the connection's, or its own), so
    /// every statement is prepared again.
    pub(crate) fn forget_statements(&self) {
        match &self.statements {
            Some(statements) => Db::forget_statements(statements),
            None => drop(self.state().take_statements()),
        }
    }

    /// Drops this transaction's own statement cache ([`StatementCache::Transaction`]): each
    /// statement no one else holds is closed (a `Close` message, queued ahead of whatever is
    /// sent next on the connection, so still inside the transaction).
    fn close_statements(&self) {
        if self.statements_per_transaction() {
            let statements = self.state().take_statements();
            drop(statements);
        }
    }

    /// Prepares a statement without caching it. Like [`prepare_cached`](Self::prepare_cached)'s,
    /// it belongs to this transaction's connection.
    pub async fn prepare(&self, query: &str) -> Result<Statement, Error> {
        Self::read_prepared(query)?;
        self.run(Step::Statement, || self.conn().prepare(query))
            .await
    }

    /// Runs a statement and returns its rows.
    ///
    /// SQL text is prepared the first time the handle sees it, to learn its parameter types
    /// (one more round trip, and the statement is closed after); from then on it goes as an
    /// unnamed statement, parsed, bound and run in one request: one round trip, nothing left
    /// prepared on the server, and no cached plan for a migration to make stale. The types
    /// are the handle's, shared by its connections (at most
    /// [`Builder::statement_cache_limit`](crate::Builder::statement_cache_limit) texts); a
    /// value that no longer fits a learned type makes the text learned again before anything
    /// is sent; a statement the server refuses with a SQLSTATE of class `42` (a column's type
    /// a migration changed) fails, and the text is learned again on its next use. Only a
    /// built-in type's oid goes with the statement: the server infers any other (an enum, a
    /// domain) as it did when the text was prepared, so a type dropped and created again by a
    /// migration needs nothing learned again. A [`Statement`] from
    /// [`prepare_cached`](Self::prepare_cached) also saves the server's parse.
    pub async fn query<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error>
    where
        T: ?Sized + ToStatement + AsStatement,
    {
        self.run_statement(statement, params, |st| async move {
            st.rows(self.conn(), params).await
        })
        .await
    }

    /// Runs a statement that returns exactly one row (see [`query`](Self::query) for SQL
    /// text). Zero or several rows are an error of kind [`ErrorKind::Driver`]; the
    /// transaction goes on.
    pub async fn query_one<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error>
    where
        T: ?Sized + ToStatement + AsStatement,
    {
        let mut rows = self.query(statement, params).await?;
        match rows.len() {
            1 => Ok(rows.remove(0)),
            n => Err(unexpected_rows(n, "exactly one")),
        }
    }

    /// Runs a statement that returns at most one row (see [`query`](Self::query) for SQL
    /// text). Several rows are an error of kind [`ErrorKind::Driver`]; the transaction goes
    /// on.
    pub async fn query_opt<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error>
    where
        T: ?Sized + ToStatement + AsStatement,
    {
        let mut rows = self.query(statement, params).await?;
        match rows.len() {
            0 | 1 => Ok(rows.pop()),
            n => Err(unexpected_rows(n, "at most one")),
        }
    }

    /// Runs a statement and returns the number of rows it affected (see
    /// [`query`](Self::query) for SQL text).
    pub async fn execute<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error>
    where
        T: ?Sized + ToStatement + AsStatement,
    {
        self.run_statement(statement, params, |st| async move {
            st.count(self.conn(), params).await
        })
        .await
    }

    /// Runs one of the caller's statements: SQL text is read first (see the type's docs);
    /// `send` binds `params` to the statement and runs it. A driver error from binding becomes
    /// the [`ErrorKind::InvalidArgument`] that names the value that does not fit (or says how
    /// many values the statement takes), as for every other statement rowlock binds: nothing
    /// of the statement was sent, and the transaction goes on.
    async fn run_statement<S, T, R>(
        &self,
        statement: &S,
        params: &[&(dyn ToSql + Sync)],
        send: impl Fn(Runnable) -> R,
    ) -> Result<T, Error>
    where
        S: ?Sized + AsStatement,
        R: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let commands = Self::read_sql(statement.sql_text())?;
        let result = match statement.prepared() {
            Some(st) => self
                .run(Step::Statement, || send(Runnable::Named(st.clone())))
                .await
                .map_err(|e| e.with_misfit(params, st.params()).for_callers_statement()),
            None => {
                let sql = statement.sql_text().unwrap_or_default();
                self.run_text(Step::Statement, sql, params, send).await
            }
        };
        self.observe(commands, &result);
        result
    }

    /// Runs one of rowlock's own statements (a lock, a claim, a transition, …) at `step`:
    /// `send` binds `params` and runs it. With the connection's statements
    /// ([`StatementCache::Connection`](crate::StatementCache::Connection)), the connection's
    /// prepared statement for `sql` (prepared on its first use there, in the same flush as
    /// whatever rides with the request). With per-transaction statements (behind a pooler),
    /// as the caller's text runs ([`run_text`](Self::run_text)): a statement prepared in one
    /// transaction cannot be relied on in the next, so only its parameter types are kept. A
    /// value that does not fit its parameter is the [`ErrorKind::InvalidArgument`] that names
    /// it, either way.
    pub(crate) async fn run_sql<T, R>(
        &self,
        step: Step,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        send: impl Fn(Runnable) -> R,
    ) -> Result<T, Error>
    where
        R: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        if self.statements_per_transaction() {
            return self.run_text(step, sql, params, send).await;
        }
        let prepared = OnceLock::new();
        self.run(step, || async {
            let st = self.cached_statement(sql).await?;
            send(Runnable::Named(prepared.get_or_init(|| st).clone())).await
        })
        .await
        .map_err(|e| match prepared.get() {
            Some(st) => e.with_misfit(params, st.params()),
            None => e,
        })
    }

    /// Runs SQL text `sql` at `step` (see [`query`](Self::query)) as an unnamed statement with
    /// the parameter types the handle learned for it ([`with_learned`](Self::with_learned)).
    async fn run_text<T, R>(
        &self,
        step: Step,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        send: impl Fn(Runnable) -> R,
    ) -> Result<T, Error>
    where
        R: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        self.with_learned(step, sql, params.len(), |learned| async {
            let types = learned.clone();
            self.run(step, || send(Runnable::Unnamed(learned)))
                .await
                .map_err(|e| e.with_misfit(params, &types.types))
        })
        .await
    }

    /// Runs `attempt` with the parameter types the handle learned for the text `sql`, which
    /// takes `count` values. Not learned yet, the text is prepared first to learn them (a
    /// round trip of its own at `step`; `BEGIN` rides with it when still pending; the
    /// statement is closed after). When `attempt` finds a value that does not fit types
    /// learned earlier (nothing was sent), the text is learned again and `attempt` runs once
    /// more: a migration may have changed a column's type. A server error that says the types
    /// may no longer fit (class `42`) makes the handle forget them for the next use.
    async fn with_learned<T, F, Fut>(
        &self,
        step: Step,
        sql: &str,
        count: usize,
        mut attempt: F,
    ) -> Result<T, Error>
    where
        F: FnMut(Arc<Learned>) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let forget_if_stale = |result: Result<T, Error>| {
            if result.as_ref().is_err_and(Error::may_be_stale_types) {
                self.db.forget_text_types(sql);
            }
            result
        };
        if let Some(learned) = self.db.text_types(sql).filter(|l| l.types.len() == count) {
            match attempt(learned).await {
                Err(e) if e.kind() == ErrorKind::InvalidArgument => self.db.forget_text_types(sql),
                result => return forget_if_stale(result),
            }
        }
        // Boxed: the first use of a text; the common path's future stays small.
        let prepared = self
            .run(step, || Box::pin(self.conn().prepare(sql)))
            .await?;
        let learned = self.db.learn_text_types(sql, prepared.params());
        if learned.types.len() != count {
            // Checked here: an unnamed statement's values are not counted by the driver, and
            // the server ends the session on a `Bind` with too few or too many.
            return Err(Error::wrong_count(learned.types.len(), count).at(step));
        }
        forget_if_stale(attempt(learned).await)
    }

    /// Runs one or more `;`-separated statements with the simple query protocol (no
    /// parameters).
    pub async fn batch_execute(&self, sql: &str) -> Result<(), Error> {
        let commands = Self::read_sql(Some(sql))?;
        let result = self
            .run(Step::Statement, || self.conn().batch_execute(sql))
            .await;
        self.observe(commands, &result);
        result
    }

    /// Queues a write to be sent in the same flush as `COMMIT`, saving a round trip.
    ///
    /// Use it for the final writes whose results you do not need. It takes SQL text or a
    /// prepared statement, as [`execute`](Self::execute) does. Each value is encoded at once
    /// with its parameter's type, so the values may borrow and nothing needs to outlive the
    /// call. SQL text goes out as an unnamed statement (parsed, bound and run with the
    /// `COMMIT`, nothing left prepared); its parameter types are learned the first time the
    /// handle sees the text, which is the only time this call waits for the server (one round
    /// trip; `BEGIN` rides with it if it is still pending). On a direct connection a
    /// [`Statement`] from [`prepare_cached`](Self::prepare_cached) saves the server parsing
    /// and planning the write each time (a hot path's choice); behind a pooler
    /// ([`StatementCache::Transaction`](crate::StatementCache::Transaction)) prefer text: a
    /// statement prepared in the transaction has to be closed before `COMMIT`, so writes
    /// that use one are sent and acknowledged first, one round trip more.
    ///
    /// If a queued write fails on the server, the server rolls the transaction back, and
    /// [`commit`](Self::commit) returns that error. Queued writes are discarded if the
    /// transaction rolls back, and a write queued inside a savepoint is discarded when that
    /// savepoint is rolled back (by its guard, or by `ROLLBACK TO SAVEPOINT` sent as SQL), as
    /// the statements sent inside it are undone.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidArgument`] when the number of values is not the statement's number
    /// of parameters, or a value does not fit its parameter's type (the error names the
    /// parameter by position), and for text a savepoint command or a statement that leaves
    /// state in the session (send those with [`execute`](Self::execute), so the transaction
    /// follows them). Nothing is queued: the transaction is as it was, and the caller may
    /// queue a corrected write or go on. Text the server refuses to prepare (a syntax error,
    /// a missing column) fails when its types are learned, as [`execute`](Self::execute)
    /// would, and aborts the transaction. Dropped while it learns a text's types, the call
    /// is a dropped statement (see [`Transaction`]); otherwise it never waits.
    ///
    /// ```no_run
    /// # async fn demo(tx: &rowlock::Transaction) -> Result<(), rowlock::Error> {
    /// let status = String::from("assigned");
    /// tx.execute_on_commit("UPDATE projects SET status = $2 WHERE id = $1", &[&7_i64, &status])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn execute_on_commit<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(), Error>
    where
        T: ?Sized + AsStatement,
    {
        let Some(sql) = statement.sql_text() else {
            let st = statement
                .prepared()
                .expect("a statement is text or prepared");
            return self.queue(Runnable::Named(st.clone()), params);
        };
        Self::read_prepared(sql)?;
        self.with_learned(Step::Statement, sql, params.len(), |learned| {
            std::future::ready(self.queue(Runnable::Unnamed(learned), params))
        })
        .await
    }

    /// Queues a write of `statement` (see [`execute_on_commit`](Self::execute_on_commit)).
    fn queue(&self, statement: Runnable, params: &[&(dyn ToSql + Sync)]) -> Result<(), Error> {
        self.state()
            .writes()
            .push(statement, params)
            .map_err(|misfit| match misfit {
                Misfit::Count { expected, given } => Error::wrong_count(expected, given),
                Misfit::Value(index, cause) => Error::misfit(index, cause),
            })
    }

    /// The underlying client, for calls this guard does not wrap (`COPY`, `query_raw`, …).
    ///
    /// Sends `BEGIN` first if it is still pending. Errors on the raw client are not seen by
    /// the guard, so [`commit`](Self::commit) then checks the transaction state in the same
    /// flush as `COMMIT` (one extra statement, no extra round trip). Turn such an error into
    /// rowlock's with [`client_error`](Self::client_error), so the guard knows it and a
    /// retryable one is retried.
    ///
    /// The guard's refusals do not reach SQL sent here. A `COMMIT` or `ROLLBACK` sent on it
    /// ends the transaction under the guard (its locks are released, and what is sent after
    /// it runs and commits statement by statement): the commit's check finds no transaction
    /// and fails with an error that says so (SQLSTATE `25P01`, not retried), and the
    /// connection is closed. Session settings changed here (`SET` without `LOCAL`,
    /// `LISTEN`, session advisory locks) are not seen, and stay with the pooled connection for
    /// its next user: keep to `SET LOCAL` and transaction-scoped forms.
    pub async fn client(&self) -> Result<&tokio_postgres::Client, Error> {
        self.run(Step::Begin, || async { Ok(()) }).await?;
        self.state().used_raw_client();
        Ok(self.conn())
    }

    /// An error from a statement run on the raw [`client`](Self::client), as rowlock's own
    /// statements' errors are: classified by its SQLSTATE (the same [`kind`](Error::kind),
    /// `sql_state()`, printed once, the driver's error as its `source()`), and noted as what
    /// went wrong with this transaction. Returned from a call's closure, a serialization
    /// failure or a deadlock is then retried by the call's [`RetryPolicy`] as if a statement
    /// of the guard had failed; returned through a type of your own, the call still knows the
    /// cause. (A row-conversion error goes through [`Error::decode`].)
    ///
    /// ```
    /// # async fn demo(tx: &rowlock::Transaction) -> Result<(), rowlock::Error> {
    /// let client = tx.client().await?;
    /// client
    ///     .batch_execute("CREATE TEMP TABLE scratch (n int) ON COMMIT DROP")
    ///     .await
    ///     .map_err(|e| tx.client_error(e))?;
    /// # Ok(()) }
    /// ```
    ///
    /// [`RetryPolicy`]: crate::RetryPolicy
    pub fn client_error(&self, e: tokio_postgres::Error) -> Error {
        self.record(Error::from_pg(e, Step::Statement))
    }

    /// The transaction id recorded with `BEGIN` when
    /// [`TransactionOptions::track_commit_outcome`] is on and a statement has been sent.
    pub fn transaction_id(&self) -> Option<u64> {
        self.reported.xid.get().copied()
    }

    /// The transaction id with the server it runs on, recorded with `BEGIN` when
    /// [`TransactionOptions::track_commit_outcome`] is on and a statement has been sent: log
    /// it, or keep it, to ask [`Db::resolve_commit`](crate::Db::resolve_commit) later.
    pub fn transaction_ref(&self) -> Option<crate::error::TransactionRef> {
        self.reported.transaction.get().copied()
    }
}

/// `query_one` or `query_opt` got `n` rows where it `expected` another number.
fn unexpected_rows(n: usize, expected: &str) -> Error {
    Error::with_kind(
        ErrorKind::Driver,
        format!("query returned an unexpected number of rows: {n}, {expected} expected"),
    )
    .at(Step::Statement)
}
