//! Options of the transactions rowlock opens, and how they are rendered into one `BEGIN`.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::Duration;

use crate::error::Error;
use crate::policy::RetryPolicy;

/// Transaction isolation level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
// Exhaustive: the SQL standard's four levels, which PostgreSQL accepts.
pub enum Isolation {
    /// `READ COMMITTED`: each statement sees data committed before it began. Lockers that
    /// waited re-check their `WHERE` against the newest row version.
    ReadCommitted,
    /// `REPEATABLE READ`: one snapshot for the transaction; a concurrently changed row that you
    /// lock or update raises `40001`.
    RepeatableRead,
    /// `SERIALIZABLE`: as if transactions ran one at a time; conflicts raise `40001`.
    Serializable,
}

impl Isolation {
    fn sql(self) -> &'static str {
        match self {
            Isolation::ReadCommitted => "READ COMMITTED",
            Isolation::RepeatableRead => "REPEATABLE READ",
            Isolation::Serializable => "SERIALIZABLE",
        }
    }
}

/// Where the statements rowlock prepares live: the connection's cache, or only the transaction.
///
/// **Behind PgBouncer in transaction pooling mode, use [`StatementCache::Transaction`].** There
/// a client connection is served by a different server connection in each transaction, so a
/// statement prepared and cached in one transaction may not exist in the next (`26000`), or a
/// statement name may already be taken on the server connection (`42P05`).
///
/// - [`Connection`](Self::Connection) (the default): statements go into the connection's cache
///   (kept by the handle, per connection, bounded by
///   [`Builder::statement_cache_limit`](crate::Builder::statement_cache_limit)) and are reused
///   by later transactions. Fastest on a direct connection.
/// - [`Transaction`](Self::Transaction): no prepared statement outlives the transaction on
///   the server connection. rowlock's own statements (locks, claims, transitions, advisory
///   locks) and your SQL text are prepared once per handle, to learn their parameter types
///   (one extra round trip, the statement closed at once), and from then on sent unnamed:
///   parsed, bound and run in the request that uses them, as on a direct connection (writes
///   queued with [`Transaction::execute_on_commit`](crate::Transaction::execute_on_commit)
///   too). A statement you prepare
///   ([`Transaction::prepare_cached`](crate::Transaction::prepare_cached)) is prepared the
///   first time the transaction asks for it (one extra round trip per distinct statement per
///   transaction), reused within the transaction, and closed before `COMMIT` or `ROLLBACK` is
///   sent (writes queued with it go ahead of `COMMIT`, one round trip more): prefer SQL text
///   here.
///
/// Set it for a handle with [`Builder::statement_cache`](crate::Builder::statement_cache) (one line where the handle is built,
/// so no call can forget it), or per call with [`TransactionOptions::statement_cache`].
///
/// In `Transaction` mode, do not keep a [`Statement`](tokio_postgres::Statement) after its
/// transaction ended, and do not call deadpool's `prepare_cached` on the raw client
/// ([`Transaction::client`](crate::Transaction::client)): both would leave a statement on the
/// server connection. tokio-postgres also caches the statements it uses to look up custom types
/// (enums, composites, domains) on each client; behind transaction pooling, pass such values as
/// text or cast them in SQL.
#[doc(alias = "pgbouncer")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive] // other caching strategies (e.g. protocol-level names PgBouncer 1.21 tracks) may come.
pub enum StatementCache {
    /// Cache prepared statements per connection, for later transactions.
    #[default]
    Connection,
    /// Keep no prepared statement past its transaction (PgBouncer transaction pooling).
    Transaction,
}

/// Options for a transaction opened by [`Db::with_transaction`](crate::Db::with_transaction),
/// [`Db::begin`](crate::Db::begin)(crate::Db::begin) or the locking functions.
///
/// Timeouts are applied with `SET LOCAL`, so they end with the transaction and never leak
/// into the pooled session (safe behind PgBouncer transaction pooling).
///
/// ```
/// use std::time::Duration;
/// use rowlock::{Isolation, TransactionOptions};
///
/// let opts = TransactionOptions::new()
///     .isolation(Isolation::Serializable)
///     .statement_timeout(Duration::from_secs(5));
/// assert!(opts.validate().is_ok());
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive] // more options may come; construct with `new()` and the setters.
pub struct TransactionOptions {
    /// Isolation level; `None` keeps the server's `default_transaction_isolation`.
    pub isolation: Option<Isolation>,
    /// `READ ONLY`.
    pub read_only: bool,
    /// `DEFERRABLE` (meaningful only with `SERIALIZABLE READ ONLY`).
    pub deferrable: bool,
    /// `SET LOCAL lock_timeout`.
    pub lock_timeout: Option<Duration>,
    /// `SET LOCAL statement_timeout`.
    pub statement_timeout: Option<Duration>,
    /// `SET LOCAL idle_in_transaction_session_timeout`.
    pub idle_in_transaction_timeout: Option<Duration>,
    /// Record the transaction id with `BEGIN`, so a commit whose outcome is unknown can be
    /// resolved later.
    pub track_commit_outcome: bool,
    /// Where prepared statements live; `None` uses the handle's
    /// ([`Builder::statement_cache`](crate::Builder::statement_cache)).
    pub statement_cache: Option<StatementCache>,
    /// How the call is retried; `None` uses the handle's
    /// ([`Builder::retry`](crate::Builder::retry)), one attempt unless set there.
    pub retry: Option<RetryPolicy>,
    /// `SET LOCAL plan_cache_mode = force_custom_plan` (claims: lets partial indexes match
    /// bound filter values).
    pub(crate) force_custom_plans: bool,
}

impl TransactionOptions {
    /// The server's defaults: its default isolation level, read-write, no timeouts.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the isolation level. Defaults to the server's `default_transaction_isolation`
    /// (normally READ COMMITTED), so a server-wide setting is respected.
    #[must_use]
    pub fn isolation(mut self, isolation: Isolation) -> Self {
        self.isolation = Some(isolation);
        self
    }

    /// Makes the transaction `READ ONLY`. Defaults to `false`. Row locks cannot be taken in a
    /// read-only transaction, so the locking functions refuse this option. A write in it
    /// (sent at once or queued for commit) fails with [`ErrorKind::Db`](crate::ErrorKind::Db)
    /// and SQLSTATE `25006`, is not retried, and rolls the transaction back; the connection
    /// stays pooled (the same SQLSTATE in any other transaction means the server became a
    /// standby: [`ErrorKind::ReadOnly`](crate::ErrorKind::ReadOnly)).
    #[must_use]
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Makes the transaction `DEFERRABLE`. Defaults to `false`.
    #[must_use]
    pub fn deferrable(mut self, deferrable: bool) -> Self {
        self.deferrable = deferrable;
        self
    }

    /// Bounds every lock wait with `SET LOCAL lock_timeout`. Between 1 ms and `i32::MAX` ms;
    /// refused otherwise when used. Defaults to none.
    #[must_use]
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = Some(timeout);
        self
    }

    /// Bounds every statement with `SET LOCAL statement_timeout` (expiry: `57014`). Between
    /// 1 ms and `i32::MAX` ms; refused otherwise when used. Defaults to none.
    #[must_use]
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        self
    }

    /// Ends the session if the transaction sits idle (no statement running, e.g. while the
    /// closure awaits something else) for longer than `timeout`, with
    /// `SET LOCAL idle_in_transaction_session_timeout`, so a stalled caller cannot hold its
    /// locks indefinitely. Between 1 ms and `i32::MAX` ms; refused otherwise when used.
    /// Defaults to none (the server's setting applies).
    ///
    /// The server ends such a session with a `FATAL` error that arrives while no request is
    /// pending, so the driver only sees a closed connection. Because rowlock set the timeout
    /// and timed the idle period, it reports the next statement's or `COMMIT`'s failure as
    /// [`ErrorKind::IdleInTransactionTimeout`](crate::ErrorKind::IdleInTransactionTimeout)
    /// (nothing committed; the connection is closed, not reused). A timeout configured only on
    /// the server shows as [`ErrorKind::Closed`](crate::ErrorKind::Closed).
    #[must_use]
    pub fn idle_in_transaction_timeout(mut self, timeout: Duration) -> Self {
        self.idle_in_transaction_timeout = Some(timeout);
        self
    }

    /// Records the transaction id (`pg_current_xact_id()`) in the same flush as `BEGIN`, so
    /// that if the connection is lost while `COMMIT` is in flight, the
    /// [`ErrorKind::CommitOutcomeUnknown`](crate::ErrorKind::CommitOutcomeUnknown) error
    /// carries it and [`Db::resolve_commit`](crate::Db::resolve_commit) can ask the server whether the
    /// transaction committed. Costs no round trip, but assigns a transaction id even to
    /// transactions that write nothing. Defaults to `false`.
    #[must_use]
    pub fn track_commit_outcome(mut self, track: bool) -> Self {
        self.track_commit_outcome = track;
        self
    }

    /// Chooses where this transaction's prepared statements live, overriding the handle's
    /// [`Builder::statement_cache`](crate::Builder::statement_cache). Use
    /// [`StatementCache::Transaction`] behind PgBouncer in transaction pooling mode.
    #[must_use]
    pub fn statement_cache(mut self, cache: StatementCache) -> Self {
        self.statement_cache = Some(cache);
        self
    }

    /// Retries the call under `policy` (a [`RetryPolicy`], or a number of attempts): each
    /// attempt is a new transaction, and the caller's code runs again in it. Overrides the
    /// handle's [`Builder::retry`](crate::Builder::retry); defaults to one attempt.
    ///
    /// ```
    /// use rowlock::{Isolation, TransactionOptions};
    ///
    /// let opts = TransactionOptions::new().isolation(Isolation::Serializable).retry(5);
    /// assert!(opts.validate().is_ok());
    /// ```
    #[must_use]
    pub fn retry(mut self, policy: impl Into<RetryPolicy>) -> Self {
        self.retry = Some(policy.into());
        self
    }

    /// Checks the options without touching the database.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(policy) = &self.retry {
            policy.validate()?;
        }
        if let Some(t) = self.lock_timeout {
            validate_timeout("lock_timeout", t)?;
        }
        if let Some(t) = self.statement_timeout {
            validate_timeout("statement_timeout", t)?;
        }
        if let Some(t) = self.idle_in_transaction_timeout {
            validate_timeout("idle_in_transaction_timeout", t)?;
        }
        Ok(())
    }

    /// Whether `BEGIN` needs nothing after it: no isolation, access mode, timeout, tracking
    /// or plan setting (where statements live and how the call is retried do not show in it).
    pub(crate) fn is_plain(&self) -> bool {
        let TransactionOptions {
            isolation,
            read_only,
            deferrable,
            lock_timeout,
            statement_timeout,
            idle_in_transaction_timeout,
            track_commit_outcome,
            statement_cache: _,
            retry: _,
            force_custom_plans,
        } = self;
        isolation.is_none()
            && !read_only
            && !deferrable
            && lock_timeout.is_none()
            && statement_timeout.is_none()
            && idle_in_transaction_timeout.is_none()
            && !track_commit_outcome
            && !force_custom_plans
    }

    /// The one simple-query string that opens the transaction: `BEGIN …; SET LOCAL …`, and a
    /// `SELECT` of the transaction id (`xid`, when tracked) and the server process id (`pid`,
    /// when `report_pid`). Only fixed keywords and validated integers go into it.
    pub(crate) fn begin_sql(&self, report_pid: bool) -> Cow<'static, str> {
        if self.is_plain() && !report_pid {
            // The common case: no allocation per transaction.
            return Cow::Borrowed("BEGIN");
        }
        let mut sql = String::from("BEGIN");
        if let Some(level) = self.isolation {
            sql.push_str(" ISOLATION LEVEL ");
            sql.push_str(level.sql());
        }
        if self.read_only {
            sql.push_str(" READ ONLY");
        }
        if self.deferrable {
            sql.push_str(" DEFERRABLE");
        }
        for (name, value) in [
            ("lock_timeout", self.lock_timeout),
            ("statement_timeout", self.statement_timeout),
            (
                "idle_in_transaction_session_timeout",
                self.idle_in_transaction_timeout,
            ),
        ] {
            if let Some(t) = value {
                // Integer milliseconds from a validated Duration: no caller text reaches SQL.
                let _ = write!(sql, "; SET LOCAL {name} = {}", millis_ceil(t));
            }
        }
        if self.force_custom_plans {
            sql.push_str("; SET LOCAL plan_cache_mode = force_custom_plan");
        }
        // The server's identity rides with the id, for `resolve_commit` to refuse to ask any
        // other server (a promoted standby shares the system identifier, not the timeline).
        const TRACKED: &str = "; SELECT pg_current_xact_id() AS xid, \
             (SELECT system_identifier FROM pg_control_system()) AS sysid, \
             substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) AS tli";
        match (self.track_commit_outcome, report_pid) {
            (true, true) => {
                sql.push_str(TRACKED);
                sql.push_str(", pg_backend_pid() AS pid");
            }
            (true, false) => sql.push_str(TRACKED),
            (false, true) => sql.push_str("; SELECT pg_backend_pid() AS pid"),
            (false, false) => {}
        }
        Cow::Owned(sql)
    }
}

const MAX_TIMEOUT_MS: u128 = i32::MAX as u128;

pub(crate) fn millis_ceil(t: Duration) -> u128 {
    t.as_nanos().div_ceil(1_000_000)
}

/// PostgreSQL takes timeouts as whole milliseconds up to `INT_MAX`, and `0` means "disabled",
/// which is never what a caller asking for a timeout wants. The pool's timeouts and a lease's
/// duration are held to the same range.
pub(crate) fn validate_timeout(name: &str, t: Duration) -> Result<(), Error> {
    if t < Duration::from_millis(1) {
        // What to do instead, where there is something: only a server setting reads 0 as
        // "none", and only a lock has a mode that fails at once.
        let instead = match name {
            "lock_timeout" => {
                "; PostgreSQL treats 0 as no timeout, use LockMode::NoWait to fail at once"
            }
            "statement_timeout" | "idle_in_transaction_timeout" => {
                "; PostgreSQL treats 0 as no timeout: leave it unset for none"
            }
            _ => "",
        };
        return Err(Error::invalid(format!(
            "{name} must be at least 1 ms (got {t:?}){instead}"
        )));
    }
    if millis_ceil(t) > MAX_TIMEOUT_MS {
        return Err(Error::invalid(format!(
            "{name} must be at most {MAX_TIMEOUT_MS} ms (about 24.8 days), got {t:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_sql_renders_all_options() {
        assert_eq!(TransactionOptions::new().begin_sql(false), "BEGIN");
        assert_eq!(
            TransactionOptions::new()
                .track_commit_outcome(true)
                .begin_sql(true),
            "BEGIN; SELECT pg_current_xact_id() AS xid, \
             (SELECT system_identifier FROM pg_control_system()) AS sysid, \
             substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) AS tli, pg_backend_pid() AS pid"
        );
        let o = TransactionOptions::new()
            .isolation(Isolation::Serializable)
            .read_only(true)
            .deferrable(true)
            .lock_timeout(Duration::from_micros(1500))
            .statement_timeout(Duration::from_secs(2));
        assert_eq!(
            o.begin_sql(false),
            "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE; \
             SET LOCAL lock_timeout = 2; SET LOCAL statement_timeout = 2000"
        );
    }

    #[test]
    fn timeouts_are_validated() {
        assert!(validate_timeout("t", Duration::ZERO).is_err());
        // Each says what to do instead only where that applies.
        let said = |name| {
            validate_timeout(name, Duration::ZERO)
                .unwrap_err()
                .to_string()
        };
        assert!(said("lock_timeout").contains("LockMode::NoWait"));
        assert!(said("statement_timeout").contains("leave it unset"));
        assert!(!said("statement_timeout").contains("NoWait"));
        for name in ["wait_timeout", "create_timeout", "a lease's duration"] {
            let text = said(name);
            assert!(text.contains("at least 1 ms"), "{text}");
            assert!(
                !text.contains("NoWait") && !text.contains("PostgreSQL"),
                "{text}"
            );
        }
        assert!(validate_timeout("t", Duration::from_millis(i32::MAX as u64)).is_ok());
        assert!(validate_timeout("t", Duration::from_millis(i32::MAX as u64 + 1)).is_err());
        let o = TransactionOptions::new().statement_timeout(Duration::ZERO);
        assert!(o.validate().unwrap_err().is_invalid_argument());
    }
}
