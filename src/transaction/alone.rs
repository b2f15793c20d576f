//! One statement on a pooled connection, outside any transaction: PostgreSQL commits it on
//! its own. Used by transitions and claim-and-mark. It ends like the transaction guard does
//! (see [`cleanup`]): a call dropped while its statement is in flight cancels the statement
//! and closes the connection, so a busy connection never goes back to the pool.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::Object;

use crate::db::Db;
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use super::end::{Cancel, cleanup};
use crate::error::{Error, ErrorKind, Step};

/// A pooled connection outside any transaction, with the one request it may have in flight.
///
/// On drop with no request in flight, the connection goes back to the pool: nothing is open
/// on the server. With one in flight (the caller's future was dropped while the statement
/// waited for a lock or ran), a task on the current runtime cancels it, waits for a
/// `ROLLBACK` (outside a transaction it only warns, but its reply comes after the cancelled
/// statement ended) and closes the connection, so a late cancel cannot reach the next
/// borrower. The statement may still have committed if it finished before the cancel
/// arrived. Without a runtime the connection is closed at once.
struct Alone {
    client: Option<Object>,
    in_flight: AtomicBool,
}

impl Alone {
    fn conn(&self) -> &Object {
        self.client
            .as_ref()
            .expect("rowlock: the connection is held until the call ends")
    }

    /// Awaits the request `make` makes, marked in flight until its reply arrived. Made here,
    /// not passed in: a request future passed by value would be kept twice in this one.
    async fn send<T, F: Future<Output = T>>(&self, make: impl FnOnce() -> F) -> T {
        self.in_flight.store(true, Ordering::Relaxed);
        let out = make().await;
        self.in_flight.store(false, Ordering::Relaxed);
        out
    }

    /// Closes the connection instead of returning it to the pool.
    fn discard(mut self) {
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

impl Drop for Alone {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        if !self.in_flight.load(Ordering::Relaxed) {
            return; // Idle: back to the pool.
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    let _ = cleanup(client, Cancel::Request, true).await;
                });
            }
            Err(_) => drop(Object::take(client)),
        }
    }
}

/// Runs `sql` alone in one round trip (a first use on a connection costs one more, to
/// prepare it), its rows collected into a `C`.
///
/// With `custom_plan`, the statement is planned for these parameter values on every call
/// (parsed unnamed, bound and executed in the same flush, with the parameter types of the
/// connection's prepared copy), as `plan_cache_mode = force_custom_plan` would in a
/// transaction: claims need it to match partial indexes and their `LIMIT`. Otherwise the
/// connection's prepared statement runs (PostgreSQL may switch it to a generic plan).
///
/// A lost connection before the statement was sent is [`ErrorKind::Closed`]; after, it is
/// [`ErrorKind::CommitOutcomeUnknown`]. A statement a migration made stale is prepared again,
/// once. Dropped while a request is in flight, see [`Alone`].
pub(crate) async fn run_alone<C>(
    db: &Db,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    step: Step,
    custom_plan: bool,
) -> Result<C, Error>
where
    C: Default + Extend<Row> + From<Vec<Row>>,
{
    let (client, statements) = db.checkout().await?;
    let conn = Alone {
        client: Some(client),
        in_flight: AtomicBool::new(false),
    };
    let client = conn.conn();
    for _ in 0..2 {
        let stmt = conn
            .send(|| db.prepare_cached(client, &statements, sql))
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
            conn.send(|| client.query_typed(sql, &typed))
                .await
                .map(C::from)
        } else {
            conn.send(|| crate::flush::query(client, &stmt, params))
                .await
        };
        match result {
            Ok(rows) => return Ok(rows),
            Err(e) => {
                let err = Error::from_pg(e, step).with_misfit(params, stmt.params());
                if err.is_stale_plan() {
                    // A migration changed the table under the cached statement: nothing ran.
                    Db::forget_statements(&statements);
                    continue;
                }
                if err.kind() == ErrorKind::ReadOnly {
                    // A standby now (a failover): never back into the pool.
                    conn.discard();
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
