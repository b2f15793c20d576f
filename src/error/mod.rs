//! The crate's one error type, and the one place where SQLSTATEs are classified.

use std::error::Error as StdError;
use std::fmt;

use tokio_postgres::error::SqlState;

use crate::diagnostics::Blocker;
use crate::diagnostics::RowRef;

mod sqlstate;

pub(crate) use sqlstate::{Refusal, classify_db, is_cancel, is_future_transaction, refusal};
use sqlstate::{classify, connect_kind, is_stale_plan, retryable};

/// What went wrong, as a value you can match on.
///
/// Classification is by SQLSTATE (never by message text, which `lc_messages` translates).
/// `#[non_exhaustive]`: new failure classes can be told apart in later versions without a
/// breaking change, so a `match` needs a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The caller passed something unusable (bad timeout, bad identifier, empty key list…).
    /// Nothing was sent to the server and no connection was taken from the pool.
    InvalidArgument,
    /// Every connection of the pool stayed busy for the pool's `wait_timeout`
    /// ([`Builder::wait_timeout`](crate::Builder::wait_timeout)). (A connection that could
    /// not be *made* in time is [`ErrorKind::Unreachable`].)
    PoolTimeout,
    /// The pool could not hand out a connection for another reason (the pool was closed, the
    /// connection string was refused by the driver, …).
    Pool,
    /// Connecting failed before the server answered: connection refused, unknown host, no
    /// route, no answer within the pool's `create_timeout` (a proxy with no server behind it),
    /// or the server is starting up or shutting down (`57P03`, `57P01`). The OS's or
    /// the server's message is the `source()`. Retried by the retry policies: a server that
    /// restarts or fails over is unreachable for a moment.
    Unreachable,
    /// The server refused the login: wrong password (`28P01`), or no such role or no
    /// `pg_hba.conf` entry for it (`28000`). Not retried.
    AuthenticationFailed,
    /// The server has no database of the name the connection asked for (`3D000`). Not
    /// retried.
    UnknownDatabase,
    /// The connection was lost or closed by the server (I/O error, SQLSTATE class 08,
    /// `57P01` admin shutdown / `pg_terminate_backend`, `57P02`, `57P03`).
    Closed,
    /// `55P03` raised by `NOWAIT`: the row (or table) was locked by another transaction.
    LockNotAvailable,
    /// `55P03` raised by `lock_timeout`: a lock wait lasted longer than the timeout.
    LockTimeout,
    /// `40001` serialization failure: retry the whole transaction.
    SerializationFailure,
    /// `40P01` deadlock detected: PostgreSQL aborted this transaction to break a cycle.
    Deadlock,
    /// `57014` query canceled: `statement_timeout` expired, or the statement was cancelled.
    StatementTimeout,
    /// `25006` read-only SQL transaction: the server no longer accepts writes (a standby, e.g.
    /// an old primary after a failover, or a server set read-only). The connection is closed,
    /// never returned to the pool; the retry helpers run the transaction again on a new
    /// connection (which a multi-host URL with `target_session_attrs=read-write` makes to the
    /// current primary). A write in a transaction opened with
    /// [`TransactionOptions::read_only`](crate::TransactionOptions::read_only) is not this kind:
    /// the server is fine, so it is [`Db`](Self::Db) with the same SQLSTATE, not retried, and
    /// the connection stays pooled.
    ReadOnly,
    /// `25P03`: `idle_in_transaction_session_timeout` ended the session.
    IdleInTransactionTimeout,
    /// The transaction was already aborted by an earlier error (possibly one the caller
    /// swallowed), so it was rolled back instead of committed. [`Error::sql_state`] gives the
    /// root cause's SQLSTATE when it is known (else `25P02`).
    TransactionAborted,
    /// The connection was lost while `COMMIT` was in flight: the transaction may or may not
    /// have committed. Never retried automatically.
    CommitOutcomeUnknown,
    /// The key columns of a [`LockableRow`](crate::LockableRow) matched more than one row for
    /// one key: they do not identify a row. Nothing was run and the transaction rolled back.
    KeyNotUnique,
    /// A row could not be converted ([`LockableRow::from_row`](crate::LockableRow::from_row)
    /// or a column type mismatch).
    Decode,
    /// The row did not exist ([`Outcome::into_result`](crate::Outcome::into_result) of
    /// [`Outcome::NotFound`](crate::Outcome::NotFound)).
    RowNotFound,
    /// The row was locked and `SKIP LOCKED` left it out
    /// ([`Outcome::into_result`](crate::Outcome::into_result) of
    /// [`Outcome::Skipped`](crate::Outcome::Skipped)).
    RowSkipped,
    /// A transition's condition or guard was not met
    /// ([`Outcome::into_result`](crate::Outcome::into_result) of
    /// [`Outcome::Conflict`](crate::Outcome::Conflict)).
    Conflict,
    /// The server runs a PostgreSQL older than rowlock supports (13: rowlock uses
    /// `pg_current_xact_id()` and `pg_xact_status()`), found when a connection of a handle
    /// rowlock built was opened. Not retried.
    UnsupportedServer,
    /// A retry policy ran out of attempts (or of time) on retryable failures.
    /// [`Error::attempts`] says how many attempts were made, [`Error::sql_state`] gives the
    /// last failure's SQLSTATE, and [`Error::last_attempt`] the last failure (its `Display` ends
    /// with it).
    RetriesExhausted,
    /// Any other error reported by the server; see [`Error::sql_state`].
    Db,
    /// An error inside the driver that is not a server error (e.g. `query_one` finding no
    /// row). A value that does not fit its parameter is [`InvalidArgument`](Self::InvalidArgument)
    /// instead, naming the parameter.
    Driver,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::PoolTimeout => "timed out waiting for a pooled connection",
            ErrorKind::Pool => "could not get a pooled connection",
            ErrorKind::Unreachable => "could not reach the server",
            ErrorKind::AuthenticationFailed => "the server refused the login",
            ErrorKind::UnknownDatabase => "the server has no such database",
            ErrorKind::Closed => "connection closed",
            ErrorKind::LockNotAvailable => "lock not available",
            ErrorKind::LockTimeout => "lock timeout",
            ErrorKind::SerializationFailure => "serialization failure",
            ErrorKind::Deadlock => "deadlock detected",
            ErrorKind::StatementTimeout => "statement timeout or cancellation",
            ErrorKind::ReadOnly => "the server does not accept writes (a standby?)",
            ErrorKind::IdleInTransactionTimeout => "idle-in-transaction timeout",
            ErrorKind::TransactionAborted => "transaction aborted by an earlier error",
            ErrorKind::CommitOutcomeUnknown => "commit outcome unknown",
            ErrorKind::KeyNotUnique => "key does not identify a single row",
            ErrorKind::Decode => "could not decode row",
            ErrorKind::RowNotFound => "row not found",
            ErrorKind::RowSkipped => "row skipped because another transaction holds its lock",
            ErrorKind::Conflict => "the transition's condition was not met",
            ErrorKind::UnsupportedServer => "the server's PostgreSQL version is not supported",
            ErrorKind::RetriesExhausted => "retries exhausted",
            ErrorKind::Db => "database error",
            ErrorKind::Driver => "driver error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// A transaction and the server that ran it, recorded with `BEGIN` (no extra round trip) when
/// [`TransactionOptions::track_commit_outcome`](crate::TransactionOptions::track_commit_outcome)
/// is on: what [`Db::resolve_commit`](crate::Db::resolve_commit) needs to ask the right server, and
/// only it, what became of the transaction.
///
/// A streaming standby has its primary's system identifier; promoting it starts a new
/// timeline. So the pair tells the server that ran the transaction (or a server that has its
/// history up to now, on the same timeline) from one that cannot know about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransactionRef {
    /// `pg_current_xact_id()`.
    pub id: u64,
    /// The server's `pg_control_system().system_identifier` (shared by a primary and its
    /// physical standbys).
    pub system_identifier: u64,
    /// The server's WAL timeline when the transaction began (a promotion starts a new one).
    pub timeline: u32,
}

/// The step that failed; printed by `Display` so a log line says where, not only what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Checkout,
    Begin,
    Lock,
    Claim,
    AdvisoryLock,
    Statement,
    Transition,
    Lease,
    Commit,
    Rollback,
}

impl Step {
    fn describe(self) -> &'static str {
        match self {
            Step::Checkout => "checking out a connection",
            Step::Begin => "beginning the transaction",
            Step::Lock => "locking rows",
            Step::Claim => "claiming rows",
            Step::AdvisoryLock => "taking the advisory lock",
            Step::Statement => "running a statement",
            Step::Transition => "running a transition",
            Step::Lease => "updating a lease",
            Step::Commit => "committing",
            Step::Rollback => "rolling back",
        }
    }
}

/// The error type of every fallible rowlock call.
///
/// Opaque on purpose: match on [`kind`](Error::kind), ask the predicates, read the
/// [`sql_state`](Error::sql_state).
///
/// **Printed once.** `Display` says what failed and where, then the server's message with
/// its detail and hint (or the driver's, for a value that could not be converted) and the
/// SQLSTATE, on one line: a handler that logs `{e}` logs everything it needs. The detail is
/// what PostgreSQL and psql show: for a unique violation it holds the key's values (`Key
/// (venue, seat_no)=(hall, 1) already exists.`), for a check or not-null violation the
/// failing row's values, for a deadlock the processes in the cycle. Where row values must not
/// reach the logs, log [`kind`](Error::kind), [`sql_state`](Error::sql_state) and the
/// constraint ([`as_db_error`](Error::as_db_error)) instead of `{e}`.
///
/// So that no reporter prints it twice, a driver error whose text `Display` already carries
/// is not also the `source()`: reach it with
/// [`as_driver_error`](Error::as_driver_error) (and [`as_db_error`](Error::as_db_error) for
/// the server's fields: detail, constraint, …). `source()` is another rowlock error (the last
/// failure of [`ErrorKind::RetriesExhausted`]) or a pool error. Other sessions' SQL is never
/// printed (see [`Blocker::query_text`](crate::Blocker::query_text)).
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    step: Option<Step>,
    sql_state: Option<SqlState>,
    detail: Option<String>,
    attempts: Option<u32>,
    transaction_id: Option<u64>,
    transaction: Option<TransactionRef>,
    source: Option<Source>,
    /// Who held the lock, when gathered.
    blockers: Option<Vec<Blocker>>,
    /// The rows a statement that could not lock asked for.
    rows: smallvec::SmallVec<[RowRef; 1]>,
    /// Preparing the statement again (after asking the server for the table's columns again)
    /// cures it: see [`Error::is_stale_plan`].
    stale: bool,
    /// For a value that did not fit its parameter's type: its position among the statement's
    /// parameters (0-based), for the caller to name it, and why it did not fit.
    misfit: Option<(usize, String)>,
}

/// An error's cause: the driver's error as it came (no second box), or any other.
enum Source {
    Driver(tokio_postgres::Error),
    Boxed(Box<dyn StdError + Send + Sync>),
}

impl Error {
    pub(crate) fn new(kind: ErrorKind) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                step: None,
                sql_state: None,
                detail: None,
                attempts: None,
                transaction_id: None,
                transaction: None,
                source: None,
                blockers: None,
                rows: smallvec::SmallVec::new(),
                stale: false,
                misfit: None,
            }),
        }
    }

    pub(crate) fn invalid(detail: impl Into<String>) -> Self {
        let mut e = Error::new(ErrorKind::InvalidArgument);
        e.inner.detail = Some(detail.into());
        e
    }

    /// A statement that takes `expected` values was given `given`.
    pub(crate) fn wrong_count(expected: usize, given: usize) -> Self {
        Error::invalid(format!(
            "the statement takes {expected} parameter(s); {given} were given"
        ))
    }

    pub(crate) fn with_kind(kind: ErrorKind, detail: impl Into<String>) -> Self {
        let mut e = Error::new(kind);
        e.inner.detail = Some(detail.into());
        e
    }

    pub(crate) fn at(mut self, step: Step) -> Self {
        self.inner.step = Some(step);
        self
    }

    /// The same error told as a step of `step` (an operation built on another: a lease's
    /// update on a transition), when it happened at some step.
    pub(crate) fn within(mut self, step: Step) -> Self {
        if self.inner.step.is_some() {
            self.inner.step = Some(step);
        }
        self
    }

    pub(crate) fn with_sql_state(mut self, state: Option<SqlState>) -> Self {
        self.inner.sql_state = state;
        self
    }

    pub(crate) fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.inner.source = Some(Source::Boxed(Box::new(source)));
        self
    }

    /// The driver's error as the cause, kept as it is (it is a box already).
    fn with_driver_source(mut self, source: tokio_postgres::Error) -> Self {
        self.inner.source = Some(Source::Driver(source));
        self
    }

    fn source_ref(&self) -> Option<&(dyn StdError + Send + Sync + 'static)> {
        match self.inner.source.as_ref()? {
            Source::Driver(e) => Some(e),
            Source::Boxed(e) => Some(&**e),
        }
    }

    pub(crate) fn with_attempts(mut self, attempts: u32) -> Self {
        self.inner.attempts = Some(attempts);
        self
    }

    /// The same error with a description of what the cause's words do not say.
    pub(crate) fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.inner.detail = Some(detail.into());
        self
    }

    /// The same error under another kind and description, keeping its step, SQLSTATE and
    /// cause (a `55P03` that turned out to be a lock timeout, not `NOWAIT`).
    pub(crate) fn reclassified(mut self, kind: ErrorKind, detail: impl Into<String>) -> Self {
        self.inner.kind = kind;
        self.inner.detail = Some(detail.into());
        self
    }

    /// For a statement rowlock rendered from a row type: a column of the row type's
    /// (`columns`, quoted) that the server says does not exist (`42703`: dropped or renamed by
    /// a migration since the row type's columns were listed) becomes [`ErrorKind::Decode`]
    /// naming the column and `table`. The column is read at the error's position in `sql` (a
    /// structured field, never the message text). Other errors, and a missing column written
    /// by the caller (in a transition's `SET`, a claim's filter), pass unchanged.
    pub(crate) fn naming_missing_column(
        self,
        sql: &str,
        table: &str,
        columns: &[String],
        learned: bool,
    ) -> Self {
        if refusal(self.sql_state()) != Some(Refusal::UndefinedColumn) {
            return self;
        }
        match self.identifier_at_error(sql) {
            Some(column) if columns.contains(&column) => {
                let mut e = self.reclassified(
                    ErrorKind::Decode,
                    format!(
                        "the row type reads column {column}, which table {table} does not have \
                         (dropped or renamed by a migration?)"
                    ),
                );
                // A list rowlock learned from the server, not the row type's own: asking
                // again cures it.
                e.inner.stale = learned;
                e
            }
            _ => self,
        }
    }

    /// The identifier at the position the server gave for this error in `sql` (a structured
    /// field, never the message text), if the error is the server's and points into `sql`.
    fn identifier_at_error(&self, sql: &str) -> Option<String> {
        self.as_db_error().and_then(|db| match db.position()? {
            tokio_postgres::error::ErrorPosition::Original(at) => identifier_at(sql, *at as usize),
            tokio_postgres::error::ErrorPosition::Internal { .. } => None,
        })
    }

    /// A statement rowlock rendered for a row type whose table (`table`, as rendered: quoted)
    /// the server does not find (`42P01`, at the table's position in `sql`: a structured
    /// field, never the message text): says why it may be missing. The usual cause is case:
    /// rowlock quotes names, so `Orders` is not the `orders` an unquoted `CREATE TABLE Orders`
    /// made. Other errors, and a missing table written by the caller, pass unchanged.
    pub(crate) fn naming_missing_table(self, sql: &str, table: &str) -> Self {
        if self.sql_state() != Some(&SqlState::UNDEFINED_TABLE) {
            return self;
        }
        let (Some(found), Some(ours)) = (self.identifier_at_error(sql), identifier_at(table, 1))
        else {
            return self;
        };
        if found != ours {
            return self;
        }
        let folded = found.to_lowercase();
        let detail = if folded != found {
            format!(
                "table {table} does not exist: rowlock quotes the row type's table name, so \
                 case counts, and a table created without quotes (CREATE TABLE {name}) is \
                 named in lower case, {folded}: name that in the row type",
                name = found.trim_matches('"'),
            )
        } else {
            format!(
                "table {table} does not exist (not created yet, or in a schema that is not on \
                 the connection's search_path: name the schema in the row type)"
            )
        };
        self.with_detail(detail)
    }

    /// For a driver error raised while binding `params` to a statement whose parameter types
    /// are `types`: which value does not fit, found by running each value's own type check
    /// again (only on this error path, so a call that binds pays nothing), as
    /// [`ErrorKind::InvalidArgument`] naming the parameter by its position; the caller names
    /// it in its own terms with [`misfit_named`](Self::misfit_named). Nothing was sent. Other
    /// errors pass unchanged.
    pub(crate) fn with_misfit(
        self,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        types: &[tokio_postgres::types::Type],
    ) -> Self {
        if self.inner.kind != ErrorKind::Driver {
            return self;
        }
        if params.len() != types.len() {
            let mut e = Error::wrong_count(types.len(), params.len());
            e.inner.step = self.inner.step;
            return e;
        }
        let mut scratch = bytes::BytesMut::new();
        let found = params
            .iter()
            .zip(types)
            .enumerate()
            .find_map(|(i, (p, ty))| {
                scratch.clear();
                p.to_sql_checked(ty, &mut scratch)
                    .err()
                    .map(|cause| (i, cause.to_string()))
            });
        let Some((index, cause)) = found else {
            return self;
        };
        let mut e = Error::misfit(index, cause);
        e.inner.step = self.inner.step;
        e
    }

    /// For a statement the caller prepared and passed in (not SQL text, not one of rowlock's):
    /// a `26000` "prepared statement … does not exist" has a second cause besides a pool that
    /// deallocated it, and the usual one, a [`Statement`](tokio_postgres::Statement) kept past
    /// the transaction that prepared it and used on another pooled connection, which running
    /// the transaction again does not cure while it passes the same statement. Says both.
    /// Other errors pass unchanged.
    pub(crate) fn for_callers_statement(self) -> Self {
        if !self.as_db_error().is_some_and(sqlstate::is_deallocated) {
            return self;
        }
        self.with_detail(format!(
            "this statement does not exist on the transaction's connection: a Statement \
             belongs to the connection that prepared it, so one kept from an earlier \
             transaction fails on any other pooled connection (prepare it inside each \
             transaction: prepare_cached sends nothing once the connection has it); or \
             {DEALLOCATED_BY_POOL}, which running the transaction again cures"
        ))
    }

    /// [`ErrorKind::InvalidArgument`] for the value at `index` (0-based) among a statement's
    /// parameters, which does not fit its type for `cause`; named by its position until the
    /// caller names it with [`misfit_named`](Self::misfit_named).
    pub(crate) fn misfit(index: usize, cause: impl fmt::Display) -> Self {
        let mut e = Error::new(ErrorKind::InvalidArgument);
        e.inner.misfit = Some((index, cause.to_string()));
        e.misfit_named(|i| format!("parameter ${}", i + 1))
    }

    /// Names the value that did not fit (see [`with_misfit`](Self::with_misfit)) by its
    /// position: `name(0)` for the statement's first parameter.
    pub(crate) fn misfit_named(mut self, name: impl FnOnce(usize) -> String) -> Self {
        if let Some((index, cause)) = &self.inner.misfit {
            self.inner.detail = Some(format!("{} has the wrong type: {cause}", name(*index)));
        }
        self
    }

    /// This error's own cause (the driver's error), for an error that replaces it: the new
    /// error takes the cause over instead of wrapping this one, so nothing is printed twice.
    pub(crate) fn into_source(self) -> Option<Box<dyn StdError + Send + Sync>> {
        match self.inner.source? {
            Source::Driver(e) => Some(Box::new(e)),
            Source::Boxed(e) => Some(e),
        }
    }

    /// A connection lost because the server ended its session with `end` (sent while no
    /// request waited for an answer, so the statement that found it gone saw only "connection
    /// closed"): [`ErrorKind::IdleInTransactionTimeout`] for `25P03`, else
    /// [`ErrorKind::Closed`], in the server's words and with its SQLSTATE. The session ended
    /// before `COMMIT` was sent: nothing was committed. `idle_limit`, the transaction's own
    /// idle-in-transaction timeout if it set one, is said with a `25P03`.
    pub(crate) fn session_ended(
        end: tokio_postgres::error::DbError,
        step: Step,
        idle_limit: Option<std::time::Duration>,
    ) -> Self {
        let (kind, limit) = match classify_db(end.code(), end.routine()) {
            ErrorKind::IdleInTransactionTimeout => (
                ErrorKind::IdleInTransactionTimeout,
                idle_limit
                    .map(|l| format!(" (idle_in_transaction_session_timeout {l:?})"))
                    .unwrap_or_default(),
            ),
            _ => (ErrorKind::Closed, String::new()),
        };
        Error::with_kind(
            kind,
            format!(
                "the server ended the session: {}{limit}; nothing was committed",
                end.message()
            ),
        )
        .at(step)
        .with_sql_state(Some(end.code().clone()))
        .with_source(end)
    }

    pub(crate) fn with_boxed_source(
        mut self,
        source: Option<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        self.inner.source = source.map(Source::Boxed);
        self
    }

    /// Names the rows the statement that failed asked for (a lock it could not take).
    pub(crate) fn about_rows(mut self, rows: impl IntoIterator<Item = RowRef>) -> Self {
        self.inner.rows = rows.into_iter().collect();
        self
    }

    /// For [`ErrorKind::LockNotAvailable`] and [`ErrorKind::LockTimeout`] from a call that
    /// locks rows by key: the rows (table and key) the statement that could not lock asked
    /// for. One row when the call or the set's table asked for one; when one statement asked
    /// for several rows of a table, all of them, since PostgreSQL does not say which one was
    /// held. Empty otherwise (claims, advisory locks, the caller's own SQL).
    pub fn rows(&self) -> &[RowRef] {
        &self.inner.rows
    }

    pub(crate) fn set_blockers(&mut self, blockers: Vec<Blocker>) {
        self.inner.blockers = Some(blockers);
    }

    /// The sessions that held the lock this call could not take, for
    /// [`ErrorKind::LockNotAvailable`] and [`ErrorKind::LockTimeout`] outcomes of
    /// [`Db::with_locked_row`](crate::Db::with_locked_row),
    /// [`Db::with_locked_rows`](crate::Db::with_locked_rows),
    /// [`Db::with_locked_set`](crate::Db::with_locked_set) (the holders of the rows
    /// [`rows`](Self::rows) names) and [`Db::with_advisory_lock`](crate::Db::with_advisory_lock)
    /// (when the outcome is returned, not retried), when the call asked with
    /// [`Lock::find_blockers`](crate::Lock::find_blockers).
    ///
    /// `None` when not gathered (not asked for, other errors, locks taken with
    /// [`Transaction::lock_row`](crate::Transaction::lock_row) inside your own transaction, or
    /// the lookup failed); `Some(&[])` when the holder could not be identified (it finished
    /// meanwhile). Gathered on the failure path only; see the guide's
    /// [Who holds the lock](crate::guide::outcomes#who-holds-the-lock) for how and which
    /// privileges it needs.
    pub fn blockers(&self) -> Option<&[Blocker]> {
        self.inner.blockers.as_deref()
    }

    pub(crate) fn with_transaction_id(mut self, xid: Option<u64>) -> Self {
        self.inner.transaction_id = xid;
        self
    }

    pub(crate) fn with_transaction(mut self, transaction: Option<TransactionRef>) -> Self {
        self.inner.transaction = transaction;
        self
    }

    /// Classifies a driver error; the driver error becomes the `source()`.
    pub(crate) fn from_pg(e: tokio_postgres::Error, step: Step) -> Self {
        let kind = classify(&e);
        let state = e.code().cloned();
        let stale = e.as_db_error().is_some_and(is_stale_plan);
        let deallocated = e.as_db_error().is_some_and(sqlstate::is_deallocated);
        let err = Error::new(kind)
            .at(step)
            .with_sql_state(state)
            .with_driver_source(e);
        if stale {
            // What the server's words do not say: why, and what cures it.
            return err.with_detail(if deallocated {
                format!(
                    "{DEALLOCATED_BY_POOL}; they are prepared again, so running the transaction \
                     again succeeds"
                )
            } else {
                "a statement was prepared on this connection before a migration changed the \
                     type of a column it returns; the connection's statements are prepared \
                     again, so running the transaction again succeeds"
                    .to_owned()
            });
        }
        err
    }

    /// Wraps a row-conversion error (from `Row::try_get`, or a [`LockableRow::from_row`]
    /// called by hand) as [`ErrorKind::Decode`], for closures that decode rows themselves.
    ///
    /// ```
    /// # fn demo(row: &rowlock::tokio_postgres::Row) -> Result<i64, rowlock::Error> {
    /// let id: i64 = row.try_get("id").map_err(rowlock::Error::decode)?;
    /// # Ok(id) }
    /// ```
    ///
    /// [`LockableRow::from_row`]: crate::LockableRow::from_row
    pub fn decode(e: tokio_postgres::Error) -> Self {
        Error::new(ErrorKind::Decode).with_source(e)
    }

    /// A failed checkout from a pool of `max_size` connections waiting up to `wait`.
    pub(crate) fn from_pool(
        e: deadpool_postgres::PoolError,
        max_size: usize,
        wait: Option<std::time::Duration>,
    ) -> Self {
        use deadpool_postgres::PoolError;
        match e {
            PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => Error::with_kind(
                ErrorKind::PoolTimeout,
                format!(
                    "all {max_size} connection(s) of the pool stayed in use for its wait_timeout \
                     ({}); if this call runs inside another call's closure, pass the closure's \
                     Transaction instead of the handle: each task holding one connection while \
                     it waits for a second starves the pool",
                    wait.map_or_else(|| "none".to_string(), |d| format!("{d:?}"))
                ),
            )
            .at(Step::Checkout)
            .with_source(e),
            // No server answered in time: opening a connection (a proxy that accepted it
            // with no server behind, during a failover) or checking a pooled one.
            PoolError::Timeout(deadpool_postgres::TimeoutType::Create) => Error::with_kind(
                ErrorKind::Unreachable,
                "no connection was made within the pool's create_timeout",
            )
            .at(Step::Checkout)
            .with_source(e),
            PoolError::Timeout(_) => Error::with_kind(
                ErrorKind::Unreachable,
                "a pooled connection's check did not answer within the pool's recycle_timeout",
            )
            .at(Step::Checkout)
            .with_source(e),
            PoolError::Backend(pg) => {
                let state = pg.code().cloned();
                Error::new(connect_kind(&pg))
                    .at(Step::Checkout)
                    .with_sql_state(state)
                    .with_source(pg)
            }
            PoolError::PostCreateHook(deadpool_postgres::HookError::Message(detail)) => {
                Error::with_kind(ErrorKind::UnsupportedServer, detail).at(Step::Checkout)
            }
            PoolError::PostCreateHook(deadpool_postgres::HookError::Backend(pg)) => {
                let state = pg.code().cloned();
                Error::new(connect_kind(&pg))
                    .at(Step::Checkout)
                    .with_sql_state(state)
                    .with_source(pg)
            }
            PoolError::Closed => Error::with_kind(
                ErrorKind::Pool,
                "the pool is closed (`Pool::close` was called): it hands out no more connections",
            )
            .at(Step::Checkout),
            // What is left (a runtime not configured, a hook's other refusal) says what it is.
            other => Error::with_kind(ErrorKind::Pool, other.to_string())
                .at(Step::Checkout)
                .with_source(other),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The SQLSTATE the server reported, when there is one. For
    /// [`ErrorKind::TransactionAborted`] this is the root cause's SQLSTATE when it is known
    /// (for example `40001` when a swallowed serialization failure aborted the transaction).
    pub fn sql_state(&self) -> Option<&SqlState> {
        self.inner.sql_state.as_ref()
    }

    /// How many attempts a retrying call made, for [`ErrorKind::RetriesExhausted`].
    pub fn attempts(&self) -> Option<u32> {
        self.inner.attempts
    }

    /// The transaction's id (`pg_current_xact_id()`), for
    /// [`ErrorKind::CommitOutcomeUnknown`] when the transaction was opened with
    /// [`TransactionOptions::track_commit_outcome`](crate::TransactionOptions::track_commit_outcome).
    /// Pass the error to [`Db::resolve_commit`](crate::Db::resolve_commit) to learn the outcome.
    pub fn transaction_id(&self) -> Option<u64> {
        self.inner.transaction_id
    }

    /// The transaction and the server it ran on, for [`ErrorKind::CommitOutcomeUnknown`]
    /// when the transaction was opened with
    /// [`TransactionOptions::track_commit_outcome`](crate::TransactionOptions::track_commit_outcome).
    /// Pass it to [`Db::resolve_commit`](crate::Db::resolve_commit).
    pub fn transaction(&self) -> Option<TransactionRef> {
        self.inner.transaction
    }

    /// The server's error (message, detail, constraint, …) when the cause is one.
    pub fn as_db_error(&self) -> Option<&tokio_postgres::error::DbError> {
        self.as_driver_error()
            .and_then(tokio_postgres::Error::as_db_error)
            .or_else(|| self.source_ref()?.downcast_ref())
    }

    /// The driver's error, when the cause is one (a server error, a lost connection, a value
    /// that could not be converted). `Display` already prints its message.
    pub fn as_driver_error(&self) -> Option<&tokio_postgres::Error> {
        self.source_ref()?.downcast_ref()
    }

    /// True for failures that a fresh attempt of the whole transaction, on a fresh connection,
    /// can cure, and that left nothing committed: serialization failures (`40001`), deadlocks
    /// (`40P01`), a server that no longer accepts writes (`25006`, a failover), a connection
    /// lost before `COMMIT` was sent ([`ErrorKind::Closed`]) or not made
    /// ([`ErrorKind::Unreachable`]), including when one of them aborted the transaction and was
    /// swallowed by the caller; and a statement prepared on the connection that no longer
    /// serves (`0A000` after a migration retyped a column it returns, `26000` after the
    /// connection's statements were deallocated), which the failed attempt forgot, so the next
    /// prepares it again. [`RetryPolicy::retries`](crate::RetryPolicy::retries) retries
    /// exactly these (and lock contention when the policy asks for it).
    /// [`ErrorKind::CommitOutcomeUnknown`] is never retryable: the transaction may have
    /// committed.
    pub fn is_retryable(&self) -> bool {
        if self.is_stale_plan() {
            return true;
        }
        match self.inner.kind {
            ErrorKind::TransactionAborted => self
                .inner
                .sql_state
                .as_ref()
                .is_some_and(|s| retryable(classify_db(s, None))),
            kind => retryable(kind),
        }
    }

    /// True when `NOWAIT` found the row (or table) locked.
    pub fn is_lock_not_available(&self) -> bool {
        self.inner.kind == ErrorKind::LockNotAvailable
    }

    /// True when a lock wait exceeded `lock_timeout`.
    pub fn is_lock_timeout(&self) -> bool {
        self.inner.kind == ErrorKind::LockTimeout
    }

    /// True when the connection was lost or closed.
    pub fn is_closed(&self) -> bool {
        self.inner.kind == ErrorKind::Closed
    }

    /// Marks an error that stands for a stale statement's ([`is_stale_plan`](Self::is_stale_plan)).
    pub(crate) fn with_stale(mut self, stale: bool) -> Self {
        self.inner.stale |= stale;
        self
    }

    /// A statement prepared on the connection that no longer serves: its result columns
    /// changed under it (a migration while the connection was pooled: `0A000` "cached plan
    /// must not change result type"), or it was deallocated (`26000`). Preparing the
    /// statement again cures it.
    pub(crate) fn is_stale_plan(&self) -> bool {
        self.inner.stale || self.as_db_error().is_some_and(is_stale_plan)
    }

    /// True when the parameter types learned for the statement may be what the server
    /// refused (SQLSTATE class `42`; see [`sqlstate::may_be_stale_types`]).
    pub(crate) fn may_be_stale_types(&self) -> bool {
        self.as_db_error()
            .is_some_and(|db| sqlstate::may_be_stale_types(db.code()))
    }

    /// True when the server was outside a transaction block where a statement needed one
    /// (`25P01`).
    pub(crate) fn is_no_transaction(&self) -> bool {
        self.as_db_error().is_some_and(sqlstate::is_no_transaction)
    }

    /// True when the caller's input was refused before anything was sent.
    pub fn is_invalid_argument(&self) -> bool {
        self.inner.kind == ErrorKind::InvalidArgument
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.inner.kind);
        if let Some(step) = self.inner.step {
            d.field("step", &step);
        }
        if let Some(state) = &self.inner.sql_state {
            d.field("sql_state", &state.code());
        }
        if let Some(detail) = &self.inner.detail {
            d.field("detail", detail);
        }
        if let Some(attempts) = self.inner.attempts {
            d.field("attempts", &attempts);
        }
        if let Some(xid) = self.inner.transaction_id {
            d.field("transaction_id", &xid);
        }
        if let Some(t) = &self.inner.transaction {
            d.field("transaction", t);
        }
        if let Some(blockers) = &self.inner.blockers {
            d.field("blockers", blockers);
        }
        if let Some(source) = self.source_ref() {
            d.field("source", &source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.inner.kind.describe())?;
        if let Some(step) = self.inner.step {
            write!(f, " while {}", step.describe())?;
        }
        if let Some(detail) = &self.inner.detail {
            write!(f, ": {detail}")?;
        }
        if let Some(driver) = self.as_driver_error() {
            write_driver_message(f, driver, self.inner.kind.describe())?;
        }
        if let Some(attempts) = self.inner.attempts {
            write!(f, " after {attempts} attempt(s)")?;
        }
        if let Some(last) = self.last_attempt() {
            // What a log line needs to act on: why the last attempt failed.
            return write!(f, "; the last failed with: {last}");
        }
        if let Some(state) = self
            .inner
            .sql_state
            .as_ref()
            .filter(|_| !self.cause_prints_state())
        {
            write!(f, " (SQLSTATE {})", state.code())?;
        }
        match self.inner.rows.as_slice() {
            [] => {}
            [row] => write!(f, " on {row}")?,
            [first, rest @ ..] => write!(f, " on one of {first} and {} more", rest.len())?,
        }
        if let Some(blockers) = &self.inner.blockers {
            if let Some(first) = blockers.first() {
                write!(f, "; held by {first}")?;
                if blockers.len() > 1 {
                    write!(f, " (and {} more)", blockers.len() - 1)?;
                }
            }
        }
        Ok(())
    }
}

impl Error {
    /// For [`ErrorKind::RetriesExhausted`]: how the last attempt failed (its kind, SQLSTATE,
    /// blockers…). `Display` prints it after the number of attempts, so a log line of `{e}`
    /// says why the calls kept failing.
    pub fn last_attempt(&self) -> Option<&Error> {
        self.source_ref()
            .and_then(|s| s.downcast_ref::<Error>())
            .filter(|_| self.inner.kind == ErrorKind::RetriesExhausted)
    }

    /// Whether this error's cause is a rowlock error that already prints the same SQLSTATE
    /// (a retry policy's last failure): then `Display` leaves it to the cause.
    fn cause_prints_state(&self) -> bool {
        self.source_ref()
            .and_then(|s| s.downcast_ref::<Error>())
            .is_some_and(|cause| cause.sql_state() == self.sql_state())
    }
}

/// Writes `: <message>` for a driver error: the server's message for a server error, with its
/// detail and hint on the same line, else the driver's own text and its causes (`error
/// deserializing column 1: cannot convert …`); a message that only repeats the kind
/// (`connection closed`, `deadlock detected`) is left out.
fn write_driver_message(
    f: &mut fmt::Formatter<'_>,
    driver: &tokio_postgres::Error,
    kind: &str,
) -> fmt::Result {
    if let Some(db) = driver.as_db_error() {
        // The server's detail may span lines (a deadlock's cycle): one log line keeps it.
        let one_line = |text: &str| text.split('\n').collect::<Vec<_>>().join(" ");
        let parts = [
            Some(db.message())
                .filter(|m| *m != kind)
                .map(str::to_string),
            db.detail().map(one_line),
            db.hint().map(|hint| format!("hint: {}", one_line(hint))),
        ];
        let mut after_sentence = None;
        for part in parts.into_iter().flatten() {
            match after_sentence {
                None => write!(f, ": {part}")?,
                // A detail is written in sentences: what follows it starts one.
                Some(true) => {
                    let mut chars = part.chars();
                    let first = chars.next().map(char::to_uppercase).into_iter().flatten();
                    write!(f, " {}", first.chain(chars).collect::<String>())?;
                }
                Some(false) => write!(f, "; {part}")?,
            }
            after_sentence = Some(part.ends_with('.'));
        }
        return Ok(());
    }
    let mut text = driver.to_string();
    let mut cause = driver.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    if text == kind {
        return Ok(());
    }
    write!(f, ": {text}")
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        // The last attempt's failure is printed by `Display` already: its own cause follows.
        if let Some(last) = self.last_attempt() {
            return last.source();
        }
        // A driver error's text is part of `Display` already (see `as_driver_error`).
        let source = self.source_ref()?;
        if source.is::<tokio_postgres::Error>() {
            return None;
        }
        Some(source as &(dyn StdError + 'static))
    }
}

/// Why a connection no longer holds its prepared statements when a pool deallocated them;
/// part of both stale-statement messages (rowlock's statements, and a caller's).
const DEALLOCATED_BY_POOL: &str = "the connection's prepared statements were deallocated while \
     it was pooled (DISCARD ALL or DEALLOCATE ALL: a pool recycling query? RecyclingMethod::Fast \
     and Clean keep them)";

/// The identifier that starts at character `position` (1-based, as PostgreSQL counts) of
/// `sql`, quoted or not, as written there; of a qualified name (`"t"."c"`), the last part.
fn identifier_at(sql: &str, position: usize) -> Option<String> {
    let rest: String = sql.chars().skip(position.checked_sub(1)?).collect();
    let mut rest = rest.as_str();
    loop {
        let (ident, after) = split_identifier(rest)?;
        match after.strip_prefix('.') {
            Some(next) if split_identifier(next).is_some() => rest = next,
            _ => return Some(ident.to_string()),
        }
    }
}

/// The identifier `text` starts with (quoted or not), and what follows it.
fn split_identifier(text: &str) -> Option<(&str, &str)> {
    let end = if let Some(quoted) = text.strip_prefix('"') {
        let mut at = 0;
        let bytes = quoted.as_bytes();
        loop {
            match bytes.get(at)? {
                b'"' if bytes.get(at + 1) == Some(&b'"') => at += 2,
                b'"' => break at + 2,
                _ => at += 1,
            }
        }
    } else {
        text.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
            .unwrap_or(text.len())
    };
    (end > 0).then(|| text.split_at(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_covers_swallowed_root_causes() {
        let aborted = |s: SqlState| {
            Error::with_kind(ErrorKind::TransactionAborted, "x").with_sql_state(Some(s))
        };
        assert!(aborted(SqlState::T_R_SERIALIZATION_FAILURE).is_retryable());
        assert!(aborted(SqlState::T_R_DEADLOCK_DETECTED).is_retryable());
        assert!(!aborted(SqlState::UNIQUE_VIOLATION).is_retryable());
        assert!(!Error::invalid("x").is_retryable());
    }

    #[test]
    fn display_names_layer_and_state_once() {
        let e = Error::with_kind(ErrorKind::LockTimeout, "row of \"t\"")
            .at(Step::Lock)
            .with_sql_state(Some(SqlState::LOCK_NOT_AVAILABLE));
        assert_eq!(
            e.to_string(),
            "lock timeout while locking rows: row of \"t\" (SQLSTATE 55P03)"
        );
    }

    #[test]
    fn the_identifier_at_an_error_position() {
        let sql = r#"SELECT "id", "bal""ance", note FROM "t""#;
        assert_eq!(identifier_at(sql, 8).as_deref(), Some(r#""id""#));
        assert_eq!(identifier_at(sql, 14).as_deref(), Some(r#""bal""ance""#));
        assert_eq!(identifier_at(sql, 27).as_deref(), Some("note"));
        assert_eq!(identifier_at(sql, 0), None);
        assert_eq!(identifier_at(sql, 100), None);
        assert_eq!(identifier_at(r#"SELECT "open"#, 8), None);
        assert_eq!(identifier_at("SELECT ö1 FROM t", 8).as_deref(), Some("ö1"));
        let qualified = r#"RETURNING "s"."t"."c", x"#;
        assert_eq!(identifier_at(qualified, 11).as_deref(), Some(r#""c""#));
        assert_eq!(identifier_at("t.c + 1", 1).as_deref(), Some("c"));
        assert_eq!(identifier_at("t. + 1", 1).as_deref(), Some("t"));
    }

    #[test]
    fn reclassified_and_exhausted_errors_print_each_fact_once() {
        let state = Some(SqlState::LOCK_NOT_AVAILABLE);
        let timeout = Error::with_kind(ErrorKind::LockNotAvailable, "x")
            .at(Step::Lock)
            .with_sql_state(state.clone())
            .reclassified(
                ErrorKind::LockTimeout,
                "waited longer than lock_timeout for a row lock",
            );
        assert_eq!(timeout.kind(), ErrorKind::LockTimeout);
        assert!(StdError::source(&timeout).is_none(), "not wrapped");
        assert_eq!(
            timeout.to_string(),
            "lock timeout while locking rows: waited longer than lock_timeout for a row lock \
             (SQLSTATE 55P03)"
        );
        let exhausted = Error::new(ErrorKind::RetriesExhausted)
            .with_attempts(3)
            .with_sql_state(state)
            .with_source(timeout);
        assert_eq!(
            exhausted.to_string(),
            "retries exhausted after 3 attempt(s); the last failed with: lock timeout while \
             locking rows: waited longer than lock_timeout for a row lock (SQLSTATE 55P03)"
        );
        assert_eq!(exhausted.sql_state(), Some(&SqlState::LOCK_NOT_AVAILABLE));
    }
}
