//! One statement on a pooled connection, outside any transaction: PostgreSQL commits it on
//! its own. Used by transitions and claim-and-mark.

use deadpool_postgres::Pool;
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use crate::error::{Error, ErrorKind, Step};

/// Runs `sql` alone in one round trip (a first use on a connection costs one more, to
/// prepare it).
///
/// With `custom_plan`, the statement is planned for these parameter values on every call
/// (parsed unnamed, bound and executed in the same flush, with the parameter types of the
/// connection's prepared copy), as `plan_cache_mode = force_custom_plan` would in a
/// transaction: claims need it to match partial indexes and their `LIMIT`. Otherwise the
/// connection's prepared statement runs (PostgreSQL may switch it to a generic plan).
///
/// A lost connection before the statement was sent is [`ErrorKind::Closed`]; after, it is
/// [`ErrorKind::CommitOutcomeUnknown`]. A statement a migration made stale is prepared again,
/// once.
pub(crate) async fn run_alone(
    pool: &Pool,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    step: Step,
    custom_plan: bool,
) -> Result<Vec<Row>, Error> {
    let client = pool.get().await.map_err(Error::from_pool)?;
    for _ in 0..2 {
        let stmt = client
            .prepare_cached(sql)
            .await
            .map_err(|e| Error::from_pg(e, step))?;
        if client.is_closed() {
            return Err(
                Error::with_kind(ErrorKind::Closed, "the pooled connection was closed").at(step),
            );
        }
        let result = if custom_plan {
            let typed: Vec<(&(dyn ToSql + Sync), Type)> = params
                .iter()
                .zip(stmt.params())
                .map(|(p, t)| (*p, t.clone()))
                .collect();
            client.query_typed(sql, &typed).await
        } else {
            client.query(&stmt, params).await
        };
        match result {
            Ok(rows) => return Ok(rows),
            Err(e) => {
                let err = Error::from_pg(e, step);
                if err.is_stale_plan() {
                    // A migration changed the table under the cached statement: nothing ran.
                    client.statement_cache.clear();
                    continue;
                }
                if err.kind() == ErrorKind::ReadOnly {
                    // A standby now (a failover): never back into the pool.
                    drop(deadpool_postgres::Object::take(client));
                    return Err(err);
                }
                if err.kind() == ErrorKind::Closed {
                    return Err(err.reclassified(
                        ErrorKind::CommitOutcomeUnknown,
                        "the connection was lost after the statement was sent: it may or may \
                         not have committed",
                    ));
                }
                return Err(err);
            }
        }
    }
    Err(Error::with_kind(
        ErrorKind::Db,
        "the statement went stale twice in a row (a migration in progress?)",
    )
    .at(step))
}
