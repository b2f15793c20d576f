//! Ending a transaction without committing: `ROLLBACK`, cancelling a request that may still
//! run, and never returning a connection to the pool inside a transaction.

use std::time::Duration;

use deadpool_postgres::Object;
use tokio_postgres::{Client, NoTls};

use super::state::Ending;
use super::{Transaction, lock};
use crate::diagnostics::{Blocker, BlockerQuery, QUERY_TIMEOUT, blocker};
use crate::error::{Error, ErrorKind, Step, is_cancel};
use crate::flush::{Flush, Reply, Side, reported_pid};
use crate::options::TransactionOptions;

/// How long cleanup after a dropped or failed transaction may take before the connection is
/// closed instead of returned to the pool.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

impl Transaction {
    /// Rolls the transaction back and returns the connection to the pool.
    ///
    /// If `ROLLBACK` fails, the connection is closed rather than returned, and the error is
    /// returned ([`ErrorKind::Closed`] when the connection was already gone: the server rolls
    /// back by itself then).
    pub async fn rollback(mut self) -> Result<(), Error> {
        self.end(true).await
    }

    pub(crate) async fn rollback_quietly(mut self) {
        let _ = self.end(false).await;
    }

    /// Ends the transaction with `ROLLBACK` (after cancelling a request that may still run),
    /// then releases or discards the connection.
    pub(super) async fn end(&mut self, report: bool) -> Result<(), Error> {
        let ending = self.state().ending();
        self.close_statements();
        match ending {
            Ending::Release => {
                self.release();
                Ok(())
            }
            Ending::Discard => {
                self.discard();
                if report {
                    Err(Error::with_kind(
                        ErrorKind::Closed,
                        "the connection was lost; the server rolled the transaction back",
                    )
                    .at(Step::Rollback))
                } else {
                    Ok(())
                }
            }
            Ending::Rollback { cancel_first } => {
                let cancel = self.cancel(cancel_first).resolve().await;
                let client = self
                    .client
                    .take()
                    .expect("rowlock: transaction ended twice");
                match cleanup(client, cancel, false).await {
                    Ok(()) => Ok(()),
                    Err(e) if report => Err(Error::from_pg(e, Step::Rollback)),
                    Err(_) => Ok(()),
                }
            }
        }
    }

    /// Rolls back and begins again with `options` on the same connection, for a lock step
    /// whose cached statement went stale (a migration): nothing of the caller's has run yet,
    /// and another pooled connection could hold the same stale statement. Gives up (closing
    /// the connection) if the `ROLLBACK` fails or a request may still be running.
    pub(crate) async fn restart(mut self, options: &TransactionOptions) -> Result<Self, Error> {
        let ending = self.state().ending();
        let dirty = self.take_dirty();
        let rolled_back = match ending {
            Ending::Release => true,
            Ending::Rollback {
                cancel_first: false,
            } => matches!(
                tokio::time::timeout(CLEANUP_TIMEOUT, dirty.conn().batch_execute("ROLLBACK")).await,
                Ok(Ok(()))
            ),
            _ => false,
        };
        match dirty.clean(rolled_back) {
            Some(client) => Ok(Transaction::on(
                self.db.clone(),
                client,
                self.statements.clone(),
                options,
            )),
            None => Err(Error::with_kind(
                ErrorKind::Closed,
                "the connection could not be rolled back to prepare a changed statement again",
            )
            .at(Step::Rollback)),
        }
    }

    /// Rolls back after a lock that could not be taken and, when `query` says how and the
    /// connection is clean, asks the server on the same connection who holds the lock,
    /// recording it on `contention`.
    pub(crate) async fn rollback_and_find_blockers(
        mut self,
        query: Option<BlockerQuery<'_>>,
        contention: &mut Error,
    ) {
        let clean = self.state().ending()
            == Ending::Rollback {
                cancel_first: false,
            };
        let Some(query) = query.filter(|_| clean) else {
            return self.rollback_quietly().await;
        };
        let dirty = self.take_dirty();
        // Boxed: asked for by the call (`Lock::find_blockers`), and a large future.
        let lookup = Box::pin(rollback_and_look_up(
            dirty.conn(),
            &query,
            self.statements_per_transaction(),
        ));
        if let Ok(Some(blockers)) = tokio::time::timeout(QUERY_TIMEOUT, lookup).await {
            contention.set_blockers(blockers);
            dirty.release();
        }
        // A failed or timed-out lookup may leave a transaction open: `dirty` closes it.
    }

    /// Takes the connection out of the guard (closing this transaction's own statements
    /// first), to be released only once the server is known to be outside a transaction.
    fn take_dirty(&mut self) -> Dirty {
        self.close_statements();
        Dirty(self.client.take())
    }

    /// Returns the connection to the pool: only called when the server is known to be
    /// outside a transaction.
    pub(super) fn release(&mut self) {
        self.client.take();
    }

    /// The connection back to the pool, or closed when `close` (the session was changed).
    pub(super) fn release_or_close(&mut self, close: bool) {
        if close {
            self.discard();
        } else {
            self.release();
        }
    }

    /// Closes the connection instead of returning it to the pool.
    pub(super) fn discard(&mut self) {
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

/// Ends the transaction open on `conn` with `ROLLBACK` and runs the blocker lookup in a short
/// read-only transaction of its own (so that, behind PgBouncer, it stays on one server
/// connection). Two round trips: `ROLLBACK`, `BEGIN` and the statement's `Parse` in one flush,
/// then the query and `COMMIT` in the next. With `close_before_commit`
/// ([`StatementCache::Transaction`](crate::StatementCache::Transaction)) the statement is
/// closed before `COMMIT` leaves, at the cost of a third.
///
/// `None` if anything failed: the connection may then still be inside a transaction.
async fn rollback_and_look_up(
    conn: &Client,
    query: &BlockerQuery<'_>,
    close_before_commit: bool,
) -> Option<Vec<Blocker>> {
    let statement = Flush::new(conn)
        .before(Side::Simple("ROLLBACK; BEGIN READ ONLY"))
        .send(conn.prepare(query.sql()))
        .await
        .ok()?;
    let rows: Vec<tokio_postgres::Row> = if close_before_commit {
        let rows = crate::flush::query(conn, &statement, &query.params()).await;
        drop(statement);
        conn.batch_execute("COMMIT").await.ok()?;
        rows.ok()?
    } else {
        Flush::new(conn)
            .send_then(
                crate::flush::query(conn, &statement, &query.params()),
                Side::Simple("COMMIT"),
            )
            .await
            .ok()?
    };
    rows.iter().map(blocker).collect::<Result<_, _>>().ok()
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

    /// The connection, if `clean` (the server confirmed it is outside a transaction); else it
    /// is closed.
    fn clean(mut self, clean: bool) -> Option<Object> {
        if clean { self.0.take() } else { None }
    }
}

impl Drop for Dirty {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(Object::take(client));
        }
    }
}

/// How to stop a request that may still be running before `ROLLBACK`.
#[derive(Debug, Clone, Copy)]
pub(super) enum Cancel {
    /// Nothing is running.
    No,
    /// PostgreSQL's cancel request, to the host the connection was made to.
    Request,
    /// Behind a pooler: `pg_cancel_backend` of the server process `BEGIN` reported, from
    /// a new connection. A cancel request through PgBouncer 1.18 can crash it when
    /// the canceller closes its socket first (tokio-postgres closes at once), and the
    /// connection's cancel key names PgBouncer's client, not the server process. `None`:
    /// the server process could not be learnt (`BEGIN`'s reply failed, or did not come within
    /// [`CLEANUP_TIMEOUT`]), nothing can be cancelled.
    Backend(Option<i32>),
}

/// A [`Cancel`] whose server process may still be on its way in `BEGIN`'s reply.
pub(super) struct ToCancel {
    cancel: Cancel,
    /// The reporting `BEGIN`'s reply, not read yet (a call dropped before it was).
    reply: Option<Reply>,
}

impl ToCancel {
    /// The cancel to send: with `BEGIN`'s reply still unread, the server process is read from
    /// it first. `BEGIN` ran before the request in flight, so its reply is already there or
    /// on its way; the wait is bounded by [`CLEANUP_TIMEOUT`] all the same.
    async fn resolve(self) -> Cancel {
        match self.reply {
            Some(reply) => {
                let pid = tokio::time::timeout(CLEANUP_TIMEOUT, reported_pid(reply)).await;
                Cancel::Backend(pid.ok().flatten())
            }
            None => self.cancel,
        }
    }
}

impl Cancel {
    /// Whether no cancel is sent, so none can interrupt a later statement on the connection.
    fn none_sent(self) -> bool {
        matches!(self, Cancel::No | Cancel::Backend(None))
    }
}

impl Transaction {
    /// How a request still in flight is stopped on this transaction's connection.
    fn cancel(&self, in_flight: bool) -> ToCancel {
        let cancel = match (in_flight, self.statements_per_transaction()) {
            (false, _) => Cancel::No,
            (true, false) => Cancel::Request,
            (true, true) => Cancel::Backend(self.reported.pid.get().copied()),
        };
        let reply = match cancel {
            Cancel::Backend(None) => self.reported.take_pending(),
            _ => None,
        };
        ToCancel { cancel, reply }
    }
}

/// Ends whatever the server is doing on `client`.
///
/// Without a request in flight: `ROLLBACK`, and the connection returns to the pool only if
/// the server acknowledged it. With one: it is cancelled first (see [`Cancel`]), so a lock
/// wait cannot hold up the `ROLLBACK`, and the connection is closed even after a successful
/// `ROLLBACK`. PostgreSQL acts on a cancel request asynchronously (tokio-postgres returns once
/// it is sent), so a reused connection could see a late cancel interrupt the next borrower's
/// statement. Closing it makes that impossible, and the acknowledged `ROLLBACK` means the
/// locks are already released when this returns. Behind a pooler, the server process comes
/// with `BEGIN`'s reply (read first by [`ToCancel::resolve`] if the call was dropped before
/// it had read it); if it cannot be learnt, nothing can be cancelled: the `ROLLBACK`
/// queues behind the request in flight, and the connection returns to the pool once it is
/// acknowledged (no cancel was sent, so none can arrive late); if the request is still
/// waiting (a lock wait) when [`CLEANUP_TIMEOUT`] runs out, the connection is closed. Closing
/// at once would not end such a wait sooner: a backend waiting for a lock notices its client
/// is gone only once it has the lock. And it would leave the server rolling back after the
/// slot is free, so the next caller could find the row still locked.
///
/// `bounded`: the `ROLLBACK` gets [`CLEANUP_TIMEOUT`], for cleanups no caller waits for (a
/// dropped guard's task), which must not hold a pooled connection forever. A caller that
/// awaits a plain `ROLLBACK` waits for it as for any statement, without a timer on the hot
/// failure path.
pub(super) async fn cleanup(
    client: Object,
    cancel: Cancel,
    bounded: bool,
) -> Result<(), tokio_postgres::Error> {
    let dirty = Dirty(Some(client));
    match cancel {
        Cancel::No => {}
        // The cancels are boxed: rare, and large futures (a connection of their own) that
        // would otherwise make every rollback's future as large.
        Cancel::Request => {
            // Best effort: the cancel connection uses no TLS; if it fails, the ROLLBACK
            // timeout below still bounds the wait.
            let token = dirty.conn().cancel_token();
            let cancel = Box::pin(token.cancel_query(NoTls));
            let _ = tokio::time::timeout(CLEANUP_TIMEOUT, cancel).await;
        }
        Cancel::Backend(Some(pid)) => {
            let cancel = Box::pin(cancel_backend(dirty.conn(), pid));
            let _ = tokio::time::timeout(CLEANUP_TIMEOUT, cancel).await;
        }
        Cancel::Backend(None) => {}
    }
    // A late cancel can interrupt the ROLLBACK itself (57014); it is consumed by doing so, so a
    // second ROLLBACK then runs normally.
    let mut result = Ok(());
    for _ in 0..2 {
        let rollback = dirty.conn().batch_execute("ROLLBACK");
        // After a cancel the ROLLBACK may still wait behind the cancelled statement: bounded.
        let done = if bounded || !matches!(cancel, Cancel::No) {
            tokio::time::timeout(CLEANUP_TIMEOUT, rollback).await
        } else {
            Ok(rollback.await)
        };
        match done {
            Ok(Ok(())) => {
                if cancel.none_sent() {
                    dirty.release();
                }
                return Ok(());
            }
            Ok(Err(e)) if is_cancel(&e) => result = Err(e),
            Ok(Err(e)) => return Err(e),
            Err(_elapsed) => return result,
        }
    }
    result
}

/// `pg_cancel_backend(pid)` from a new connection made like the pool's (outside its size
/// limit: the pool may have no connection to spare). The signal is delivered before the
/// function returns, so it is acted on (or, if the process went idle meanwhile, ignored)
/// before the `ROLLBACK` that follows.
async fn cancel_backend(client: &Object, pid: i32) {
    use deadpool::managed::Manager as _;
    let Some(pool) = Object::pool(client) else {
        return;
    };
    if let Ok(other) = pool.manager().create().await {
        // Simple protocol, no prepared statement: behind transaction pooling. The pid is the
        // server's integer, not caller input.
        let _ = other
            .batch_execute(&format!("SELECT pg_cancel_backend({pid})"))
            .await;
    }
}

/// Queues `ROLLBACK` on `client` now, in the caller's thread, and returns the connection to the
/// pool at once: whatever is sent on it afterwards (the next borrower's statements, the pool's
/// recycling check) reaches the server after the `ROLLBACK`, so the next borrower of this
/// connection finds the row free, and a caller on another connection finds it free as soon as
/// the server has read one more message. tokio-postgres writes a request into the
/// connection's queue on its first poll (the property [`Flush`] rests on too), so one poll with
/// a no-op waker sends it; the reply is read and discarded by the connection task. Only for a
/// connection with no request in flight: one still running would hold the `ROLLBACK` (and the
/// next borrower) behind it.
fn queue_rollback(client: Object) {
    use futures_util::FutureExt as _;
    match client.batch_execute("ROLLBACK").now_or_never() {
        // Queued (pending), or already answered: the connection is clean for the next borrower.
        None | Some(Ok(())) => drop(client),
        // The connection is closed: it must not go back to the pool.
        Some(Err(_)) => drop(Object::take(client)),
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let ending = {
            let mut st = lock(&self.state);
            // Closed before the ROLLBACK is queued (see `close_statements`).
            drop(st.take_statements());
            st.ending()
        };
        match ending {
            Ending::Release => {} // Nothing was sent: the connection is clean.
            Ending::Discard => drop(Object::take(client)),
            Ending::Rollback {
                cancel_first: false,
            } => queue_rollback(client),
            Ending::Rollback { cancel_first } => match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    let cancel = self.cancel(cancel_first);
                    handle.spawn(async move {
                        let _ = cleanup(client, cancel.resolve().await, true).await;
                    });
                }
                // No runtime to roll back on: close the connection; the server rolls back.
                Err(_) => drop(Object::take(client)),
            },
        }
    }
}
