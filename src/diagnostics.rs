//! Who holds the lock: gathered only when a lock was not available or a lock wait timed out,
//! never on the success path.
//!
//! After `NOWAIT` fails or `lock_timeout` fires, the caller is no longer waiting, so
//! `pg_blocking_pids()` has nothing to report for it. The holder is found from what the lock
//! leaves behind instead:
//!
//! - a row lock: the row's `xmax` is the locking transaction's id, matched against
//!   `pg_stat_activity.backend_xid`. Shared locks held by several transactions at once (a
//!   MultiXact in `xmax`) are not resolved to backends: the list is then empty;
//! - an advisory lock: the granted `advisory` entry in `pg_locks`.
//!
//! The query runs on the caller's own connection right after its `ROLLBACK`, inside a short
//! read-only transaction (so it also works behind PgBouncer's transaction pooling), and is
//! bounded by a timeout; if it fails, the outcome is returned without blockers.
//!
//! **Privileges:** `pg_stat_activity` shows another role's sessions' `query` (and hides
//! `xact_start`, `state` and `backend_xid`) only to superusers and members of
//! `pg_read_all_stats`. Without them, a blocker of another role is still found by advisory
//! lock (`pg_locks` is readable by all), while a row-lock blocker of another role is not found
//! (its `backend_xid` is hidden). Grant with `GRANT pg_read_all_stats TO app_role;`.

use std::fmt;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use crate::row::{Key, Names};

/// A session holding a lock that this call could not take, as `pg_stat_activity` described
/// it just after the failure. See [`Error::blockers`](crate::Error::blockers).
#[derive(Debug, Clone, PartialEq)]
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
    /// Its current or last query (`<insufficient privilege>` without the privileges above).
    pub query: Option<String>,
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
        if let Some(query) = &self.query {
            let query: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
            let short: String = query.chars().take(120).collect();
            let more = if short.len() < query.len() { "…" } else { "" };
            write!(f, ", query: {short}{more}")?;
        }
        Ok(())
    }
}

/// Parameters of a blocker query, owned so the query can run after the lock step returned.
trait Params: Send + Sync {
    fn params(&self) -> Vec<&(dyn ToSql + Sync)>;
}

impl<K: Key> Params for Vec<K> {
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let mut out = Vec::new();
        for key in self {
            key.push_params(&mut out);
        }
        out
    }
}

/// How to find the holders of a lock that could not be taken.
pub(crate) struct BlockerQuery {
    sql: String,
    params: Box<dyn Params>,
}

impl fmt::Debug for BlockerQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockerQuery")
            .field("sql", &self.sql)
            .finish()
    }
}

const SELECT: &str = "SELECT a.pid, coalesce(a.application_name, ''), \
     extract(epoch FROM clock_timestamp() - a.xact_start)::float8, a.state, a.query \
     FROM pg_stat_activity a WHERE a.pid <> pg_backend_pid() AND ";

/// How long the blocker query may take before the outcome is returned without it.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

impl BlockerQuery {
    /// Holders of the row locks on these keys of `names`' table.
    pub(crate) fn rows<K: Key>(names: &Names, keys: Vec<K>) -> Self {
        BlockerQuery {
            sql: format!(
                "{SELECT}a.backend_xid IN (SELECT xmax FROM {} {}) ORDER BY a.xact_start",
                names.table,
                names.where_keys(keys.len())
            ),
            params: Box::new(keys),
        }
    }

    /// Holders of the advisory lock whose `pg_locks` key is (`classid`, `objid`, `objsubid`).
    pub(crate) fn advisory(classid: u32, objid: u32, objsubid: i16) -> Self {
        BlockerQuery {
            sql: format!(
                "{SELECT}a.pid IN (SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' \
                 AND l.granted AND l.database = (SELECT oid FROM pg_database \
                 WHERE datname = current_database()) AND l.classid = $1::int8::oid \
                 AND l.objid = $2::int8::oid AND l.objsubid = $3::int8) ORDER BY a.xact_start"
            ),
            params: Box::new(vec![
                i64::from(classid),
                i64::from(objid),
                i64::from(objsubid),
            ]),
        }
    }

    /// Runs the query in a short read-only transaction on `client`, which must be idle.
    pub(crate) async fn run(&self, client: &Client) -> Option<Vec<Blocker>> {
        let work = async {
            client.batch_execute("BEGIN READ ONLY").await?;
            let rows = client.query(&self.sql, &self.params.params()).await;
            client.batch_execute("COMMIT").await?;
            rows
        };
        let rows = tokio::time::timeout(QUERY_TIMEOUT, work).await.ok()?.ok()?;
        Some(
            rows.iter()
                .map(|r| Blocker {
                    pid: r.get(0),
                    application_name: r.get(1),
                    transaction_age: r
                        .get::<_, Option<f64>>(2)
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .map(Duration::from_secs_f64),
                    state: r.get(3),
                    query: r.get(4),
                })
                .collect(),
        )
    }
}
