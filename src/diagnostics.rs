//! Who holds the lock: gathered only when asked (`Lock::find_blockers`) and a lock was
//! not available or a lock wait timed out, never on the success path.
//!
//! After `NOWAIT` fails or `lock_timeout` fires, the caller is no longer waiting, so
//! `pg_blocking_pids()` has nothing to report for it. The holder is found from what the lock
//! leaves behind instead:
//!
//! - a row lock: the row's `xmax` is the locking transaction's id (or a subtransaction's),
//!   matched against the `ExclusiveLock` every transaction id's owner holds in `pg_locks`; a
//!   MultiXact in `xmax` (shared locks taken by several transactions, of which some may have
//!   ended) is resolved to its members that are still running (`XMAX_HOLDERS`);
//! - an advisory lock: the granted `advisory` entry in `pg_locks`.
//!
//! The transaction guard runs the query on the caller's own connection right after its
//! `ROLLBACK`, inside a short read-only transaction (so it also works behind PgBouncer's
//! transaction pooling), bounded by a timeout; if it fails, the outcome is returned without
//! blockers.
//!
//! **Privileges:** `pg_stat_activity` shows another role's sessions' `query`, `xact_start` and
//! `state` only to superusers and members of `pg_read_all_stats`. Without them, a blocker of
//! another role is still found (`pg_locks` and `pg_get_multixact_members` are open to all), with
//! its pid and `application_name`; its state and transaction age are `None` and its query is
//! `<insufficient privilege>`. Grant with `GRANT pg_read_all_stats TO app_role;`.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

/// A session holding a lock that this call could not take, as `pg_stat_activity` described
/// it just after the failure. See [`Error::blockers`](crate::Error::blockers).
///
/// `Display` and `Debug` leave out the blocking session's query text, which can carry another
/// user's data; [`query_text`](Blocker::query_text) returns it.
#[derive(Clone, PartialEq)]
#[non_exhaustive] // more columns of pg_stat_activity may be added.
pub struct Blocker {
    /// The blocking backend's process id (`pg_terminate_backend` takes it).
    pub pid: i32,
    /// Its `application_name` (empty if it set none).
    pub application_name: String,
    /// How long its transaction has been open, if visible to this role.
    pub transaction_age: Option<Duration>,
    /// Its state (`active`, `idle in transaction`, …), if visible to this role.
    pub state: Option<String>,
    /// Its current or last query: see [`query_text`](Self::query_text).
    pub(crate) query: Option<String>,
}

impl Blocker {
    /// The blocking session's current or last query, as `pg_stat_activity` shows it
    /// (`<insufficient privilege>` without the privileges above).
    ///
    /// **Sensitive:** it is another session's SQL, and can carry another user's data (literal
    /// values, names, tokens). It is left out of `Display` and `Debug`, so logging an error
    /// never prints it; show it only where such data may go.
    pub fn query_text(&self) -> Option<&str> {
        self.query.as_deref()
    }
}

impl fmt::Debug for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Blocker")
            .field("pid", &self.pid)
            .field("application_name", &self.application_name)
            .field("transaction_age", &self.transaction_age)
            .field("state", &self.state)
            .field(
                "query",
                &self.query.as_ref().map(|_| "<redacted: see query_text()>"),
            )
            .finish()
    }
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}", self.pid)?;
        if !self.application_name.is_empty() {
            write!(f, " ({})", self.application_name)?;
        }
        if let Some(state) = &self.state {
            write!(f, ", {state}")?;
        }
        if let Some(age) = self.transaction_age {
            write!(f, ", transaction open {:.1} s", age.as_secs_f64())?;
        }
        Ok(())
    }
}

/// How to find the holders of a lock that could not be taken: a statement over
/// `pg_stat_activity` and its parameters (the keys that were being locked).
pub(crate) struct BlockerQuery<'a> {
    sql: String,
    params: Vec<&'a (dyn ToSql + Sync)>,
    /// Parameters after `params` that the query owns (arrays of several keys).
    arrays: Vec<Box<dyn ToSql + Sync + Send + 'a>>,
}

impl fmt::Debug for BlockerQuery<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockerQuery")
            .field("sql", &self.sql)
            .finish()
    }
}

const SELECT: &str = "SELECT a.pid, coalesce(a.application_name, ''), \
     extract(epoch FROM clock_timestamp() - a.xact_start)::float8, a.state, a.query \
     FROM pg_stat_activity a WHERE a.pid <> pg_backend_pid() AND ";

/// The transaction ids holding a lock on row `r`, from its `xmax`: that id itself when a
/// running transaction owns it (one locker or updater, top-level or a subtransaction: each
/// holds an `ExclusiveLock` on its own id in `pg_locks`), else, when it is a MultiXact still on
/// disk (several lockers, or one left of several), its members. Which of the two an `xmax` is
/// lives in the tuple's header, which SQL cannot read; the order of the tests keeps
/// `pg_get_multixact_members` to values inside the live MultiXact range (`mxid_age` above 0
/// and no older than the oldest database's `datminmxid`), where it cannot fail.
const XMAX_HOLDERS: &str = "CASE WHEN EXISTS (SELECT 1 FROM pg_locks p \
     WHERE p.locktype = 'transactionid' AND p.transactionid = r.xmax) \
     OR mxid_age(r.xmax) <= 0 \
     OR mxid_age(r.xmax) > (SELECT max(mxid_age(datminmxid)) FROM pg_database) \
     THEN ARRAY[r.xmax] \
     ELSE ARRAY(SELECT m.xid FROM pg_get_multixact_members(r.xmax) m) END";

/// How long the lookup may take before the outcome is returned without it.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

impl<'a> BlockerQuery<'a> {
    /// Holders of the row locks on the rows of `table` (a rendered name) that `filter` (a
    /// `WHERE` clause over `params`) selects: the sessions owning a transaction id in each
    /// row's `xmax` (see [`XMAX_HOLDERS`]).
    pub(crate) fn rows(table: &str, filter: &str, params: Vec<&'a (dyn ToSql + Sync)>) -> Self {
        BlockerQuery {
            sql: format!(
                "{SELECT}a.pid IN (SELECT l.pid FROM pg_locks l \
                 WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted \
                 AND l.transactionid = ANY (SELECT x FROM (SELECT xmax FROM {table} {filter}) r, \
                 unnest({XMAX_HOLDERS}) x)) ORDER BY a.xact_start"
            ),
            params,
            arrays: Vec::new(),
        }
    }

    /// The same query with `arrays` as its parameters after the borrowed ones.
    pub(crate) fn with_arrays(mut self, arrays: Vec<Box<dyn ToSql + Sync + Send + 'a>>) -> Self {
        self.arrays = arrays;
        self
    }

    /// Holders of the advisory lock whose `pg_locks` key is (`classid`, `objid`, `objsubid`).
    pub(crate) fn advisory(key: &'a [i64; 3]) -> Self {
        BlockerQuery {
            sql: format!(
                "{SELECT}a.pid IN (SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' \
                 AND l.granted AND l.database = (SELECT oid FROM pg_database \
                 WHERE datname = current_database()) AND l.classid = $1::int8::oid \
                 AND l.objid = $2::int8::oid AND l.objsubid = $3::int8) ORDER BY a.xact_start"
            ),
            params: key.iter().map(|k| k as &(dyn ToSql + Sync)).collect(),
            arrays: Vec::new(),
        }
    }

    /// The lookup statement.
    pub(crate) fn sql(&self) -> &str {
        &self.sql
    }

    /// Its parameters.
    pub(crate) fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let arrays = self.arrays.iter().map(|a| &**a as &(dyn ToSql + Sync));
        self.params.iter().copied().chain(arrays).collect()
    }
}

/// A row of the lookup statement.
pub(crate) fn blocker(r: &Row) -> Result<Blocker, tokio_postgres::Error> {
    Ok(Blocker {
        pid: r.try_get(0)?,
        application_name: r.try_get(1)?,
        transaction_age: r
            .try_get::<_, Option<f64>>(2)?
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64),
        state: r.try_get(3)?,
        query: r.try_get(4)?,
    })
}

/// A row named in an [`Outcome`](crate::Outcome) or an [`Error`](crate::Error): its table (as
/// the row type names it: `name` or `schema.name`) and its key (as the key's `Debug` prints
/// it). [`RowRef::of`] names the row of a row type, to compare.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive] // more detail may be added.
pub struct RowRef {
    /// The row's table, as the row type names it.
    pub table: Cow<'static, str>,
    /// The row's key, as its `Debug` implementation prints it.
    pub key: String,
}

impl std::fmt::Display for RowRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} key {}", self.table, self.key)
    }
}
