//! Sending several requests in one flush: the only way rowlock pipelines.
//!
//! tokio-postgres writes a request to the connection when its future is first polled and
//! matches replies in order, so futures that are polled together share a round trip. The
//! server runs requests in the order they were written, so that order must be the order of
//! first polls. A [`Flush`] is a list of side requests around one main request (`BEGIN` and
//! `SET LOCAL`s before a locking `SELECT`, queued writes before `COMMIT`, `SET LOCAL … TO
//! DEFAULT` after a claim); [`Flush::send`] polls all of them, every time, in that order.
//!
//! The main request must write everything it sends on its first poll (one tokio-postgres
//! call on an already prepared statement, or a simple-query string); one that awaits a reply
//! before sending more would let the side requests after it overtake it.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::Poll;

use futures_util::FutureExt as _;
use futures_util::future::join3;

use crate::error::TransactionRef;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, SimpleQueryMessage, Statement};

type PgError = tokio_postgres::Error;

/// What a `BEGIN` reported about its transaction.
#[derive(Debug, Default)]
pub(crate) struct Reported {
    /// `pg_current_xact_id()`.
    pub(crate) xid: OnceLock<u64>,
    /// The id with the server's system identifier and timeline.
    pub(crate) transaction: OnceLock<TransactionRef>,
    /// `pg_backend_pid()`: the server process actually serving the transaction (behind a
    /// pooler, not the one the connection's cancel key names).
    pub(crate) pid: OnceLock<i32>,
}

/// A request whose reply is only checked for an error.
pub(crate) enum Side<'a> {
    /// One or more `;`-separated statements, simple query protocol.
    Simple(&'a str),
    /// `BEGIN …` (with its `SET LOCAL`s) that ends in a `SELECT` of the transaction id
    /// (column `xid`) and/or the server process id (`pid`); they are stored in the cells.
    BeginReporting(&'a str, &'a Reported),
    /// A prepared statement with owned parameters (a write queued for `COMMIT`).
    Execute(&'a Statement, &'a [Box<dyn ToSql + Send + Sync>]),
}

impl<'a> Side<'a> {
    /// The request as a boxed future (the general case; see [`Sides::send`] for the common
    /// one, which is not boxed).
    fn boxed(self, conn: &'a Client) -> Request<'a> {
        match self {
            Side::Simple(sql) => Box::pin(conn.batch_execute(sql)),
            Side::BeginReporting(sql, reported) => Box::pin(async move {
                let messages = conn.simple_query(sql).await?;
                for message in &messages {
                    if let SimpleQueryMessage::Row(row) = message {
                        let column = |name| row.try_get(name).ok().flatten();
                        if let Some(xid) = column("xid").and_then(|v| v.parse().ok()) {
                            let _ = reported.xid.set(xid);
                            // The identifier is an unsigned 64-bit value shown as int8.
                            let sysid = column("sysid").and_then(|v| v.parse::<i64>().ok());
                            let tli = column("tli").and_then(|v| u32::from_str_radix(v, 16).ok());
                            if let (Some(sysid), Some(timeline)) = (sysid, tli) {
                                let _ = reported.transaction.set(TransactionRef {
                                    id: xid,
                                    system_identifier: sysid as u64,
                                    timeline,
                                });
                            }
                        }
                        if let Some(pid) = column("pid").and_then(|v| v.parse().ok()) {
                            let _ = reported.pid.set(pid);
                        }
                    }
                }
                Ok(())
            }),
            Side::Execute(statement, params) => Box::pin(async move {
                let params = params.iter().map(|p| &**p as &(dyn ToSql + Sync));
                conn.execute_raw(statement, params).await.map(|_| ())
            }),
        }
    }
}

type Request<'a> = Pin<Box<dyn Future<Output = Result<(), PgError>> + Send + 'a>>;

/// Where a failed request stood in its flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum At {
    /// The side request at this index before the main one.
    Before(usize),
    /// The main request.
    Main,
    /// The side request at this index after the main one.
    After(usize),
}

/// The first request of a flush that failed, in sending order: the root cause (the server
/// answers every later request of the same transaction with `25P02`).
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) error: PgError,
    pub(crate) at: At,
}

/// Requests to send in one flush, in order: side requests, the main request, side requests.
pub(crate) struct Flush<'a> {
    conn: &'a Client,
    before: Sides<'a>,
    after: Sides<'a>,
}

impl<'a> Flush<'a> {
    pub(crate) fn new(conn: &'a Client) -> Self {
        Flush {
            conn,
            before: Sides::default(),
            after: Sides::default(),
        }
    }

    /// Sends `side` before the main request (after the side requests already added).
    #[must_use]
    pub(crate) fn before(mut self, side: Side<'a>) -> Self {
        self.before.push(side, self.conn);
        self
    }

    /// Sends `side` after the main request (after the side requests already added).
    #[must_use]
    pub(crate) fn after(mut self, side: Side<'a>) -> Self {
        self.after.push(side, self.conn);
        self
    }

    /// Sends every request and waits for every reply. Returns the main request's value, or
    /// the first failure in sending order.
    ///
    /// Built from combinators, not an `async fn`: the main future is moved once, into the
    /// join, so nesting flushes (a `BEGIN` flush around a `SET LOCAL` flush) does not copy it
    /// at every level.
    pub(crate) fn send<T>(
        self,
        main: impl Future<Output = Result<T, PgError>> + 'a,
    ) -> impl Future<Output = Result<T, Failed>> + 'a {
        // `join3` polls its futures in argument order, every time (unlike `tokio::join!`,
        // which rotates its starting point): the order the requests are written in.
        join3(
            self.before.send(self.conn),
            main,
            self.after.send(self.conn),
        )
        .map(|(before, main, after)| first_failure(before, main, after))
    }

    /// Sends only the side requests.
    pub(crate) fn send_sides(self) -> impl Future<Output = Result<(), Failed>> + 'a {
        self.send(std::future::ready(Ok(())))
    }
}

/// The first failure of a flush in sending order: the root cause (the server answers every
/// later request of the same transaction with `25P02`).
fn first_failure<T>(
    before: Option<(usize, PgError)>,
    main: Result<T, PgError>,
    after: Option<(usize, PgError)>,
) -> Result<T, Failed> {
    if let Some((i, error)) = before {
        return Err(Failed {
            error,
            at: At::Before(i),
        });
    }
    let value = main.map_err(|error| Failed {
        error,
        at: At::Main,
    })?;
    match after {
        Some((i, error)) => Err(Failed {
            error,
            at: At::After(i),
        }),
        None => Ok(value),
    }
}

/// Side requests: the first inline (the common case is one `BEGIN` or one `SET LOCAL`), more
/// in a vector, as the futures that send them (`None` once finished).
#[derive(Default)]
struct Sides<'a> {
    first: Option<Side<'a>>,
    rest: Vec<Option<Request<'a>>>,
}

impl<'a> Sides<'a> {
    fn push(&mut self, side: Side<'a>, conn: &'a Client) {
        if self.first.is_none() {
            self.first = Some(side);
        } else {
            self.rest.push(Some(side.boxed(conn)));
        }
    }

    /// Sends every side request, first-polling them in order; the first failure (index and
    /// error), if any.
    async fn send(self, conn: &'a Client) -> Option<(usize, PgError)> {
        let first = self.first?;
        if self.rest.is_empty() {
            // The common case (one `BEGIN`, `SET LOCAL` or queued write): no list.
            let sent = match first {
                Side::Simple(sql) => conn.batch_execute(sql).await,
                other => other.boxed(conn).await,
            };
            return sent.err().map(|e| (0, e));
        }
        let mut first = Some(first.boxed(conn));
        let mut rest = self.rest;
        all_in_order(&mut first, &mut rest).await
    }
}

/// Polls every request, every time, in index order (unlike fair joins, which rotate their
/// starting point), each until it finishes (its slot is then emptied); the first failure in
/// index order, if any. Allocates nothing: the requests are already in their slots.
async fn all_in_order<'a>(
    first: &mut Option<Request<'a>>,
    rest: &mut [Option<Request<'a>>],
) -> Option<(usize, PgError)> {
    let mut failed: Option<(usize, PgError)> = None;
    poll_fn(|cx| {
        let mut pending = false;
        for (i, slot) in std::iter::once(&mut *first)
            .chain(rest.iter_mut())
            .enumerate()
        {
            let Some(request) = slot else { continue };
            match request.as_mut().poll(cx) {
                Poll::Pending => pending = true,
                Poll::Ready(result) => {
                    *slot = None;
                    if let Err(e) = result {
                        if failed.as_ref().is_none_or(|(at, _)| i < *at) {
                            failed = Some((i, e));
                        }
                    }
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn first_polls_happen_in_order_and_every_request_finishes() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let finished = Arc::new(Mutex::new(Vec::new()));
        let mut requests: Vec<Option<Request<'_>>> = (0..40)
            .map(|i| {
                let (log, finished) = (log.clone(), finished.clone());
                let request: Request<'_> = Box::pin(async move {
                    log.lock().unwrap().push(i);
                    // Yield a different number of times so completions interleave.
                    for _ in 0..(40 - i) % 3 {
                        tokio::task::yield_now().await;
                    }
                    finished.lock().unwrap().push(i);
                    Ok(())
                });
                Some(request)
            })
            .collect();
        let mut first = requests.remove(0);
        assert!(all_in_order(&mut first, &mut requests).await.is_none());
        assert_eq!(*log.lock().unwrap(), (0..40).collect::<Vec<_>>());
        let mut done = finished.lock().unwrap().clone();
        done.sort();
        assert_eq!(done, (0..40).collect::<Vec<_>>());
        assert!(first.is_none() && requests.iter().all(Option::is_none));
    }

    #[tokio::test]
    async fn join3_polls_in_argument_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let step = |name: &'static str, yields: usize| {
            let log = log.clone();
            async move {
                for _ in 0..yields {
                    log.lock().unwrap().push(name);
                    tokio::task::yield_now().await;
                }
                name
            }
        };
        let out = join3(step("before", 3), step("main", 2), step("after", 3)).await;
        assert_eq!(out, ("before", "main", "after"));
        let log = log.lock().unwrap();
        assert_eq!(
            &log[..3],
            ["before", "main", "after"],
            "first polls in order"
        );
        assert_eq!(
            &log[3..6],
            ["before", "main", "after"],
            "and every poll after"
        );
    }
}
