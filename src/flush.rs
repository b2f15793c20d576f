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

use std::error::Error as StdError;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::Poll;

use bytes::{Buf as _, BufMut as _, BytesMut};
use futures_util::{StreamExt as _, TryStreamExt as _};
use pin_project_lite::pin_project;
use smallvec::SmallVec;

use crate::error::TransactionRef;
use tokio_postgres::types::{Format, IsNull, ToSql, Type};
use tokio_postgres::{Client, Row, SimpleQueryMessage, SimpleQueryStream, Statement};

type PgError = tokio_postgres::Error;

/// The reply of a simple-query request, read as it comes (the stream is `!Unpin`).
pub(crate) type Reply = Pin<Box<SimpleQueryStream>>;

/// What a `BEGIN` reported about its transaction.
#[derive(Default)]
pub(crate) struct Reported {
    /// `pg_current_xact_id()`.
    pub(crate) xid: OnceLock<u64>,
    /// The id with the server's system identifier and timeline.
    pub(crate) transaction: OnceLock<TransactionRef>,
    /// `pg_backend_pid()`: the server process actually serving the transaction (behind a
    /// pooler, not the one the connection's cancel key names).
    pub(crate) pid: OnceLock<i32>,
    /// The reply of the reporting `BEGIN` while it is being read. Kept here rather than in
    /// the flush's future, so that a call dropped before it was read still has it: the
    /// cleanup reads the server process from it and cancels the statement that followed.
    pending: Mutex<Option<Reply>>,
}

impl std::fmt::Debug for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reported")
            .field("xid", &self.xid.get())
            .field("pid", &self.pid.get())
            .finish_non_exhaustive()
    }
}

impl Reported {
    /// Sends the reporting `BEGIN` (written on the first poll, the reply not awaited) and
    /// reads its reply, storing what it reports.
    async fn begin(&self, conn: &Client, sql: &str) -> Result<(), PgError> {
        let stream = conn.simple_query_raw(sql).await?;
        *lock(&self.pending) = Some(Box::pin(stream));
        let read = poll_fn(|cx| {
            let mut pending = lock(&self.pending);
            let Some(stream) = pending.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            loop {
                match stream.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(message))) => self.record(&message),
                    Poll::Ready(Some(Err(e))) => {
                        *pending = None;
                        return Poll::Ready(Err(e));
                    }
                    Poll::Ready(None) => {
                        *pending = None;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        });
        read.await
    }

    /// The reply of a reporting `BEGIN` not read yet, if any.
    pub(crate) fn take_pending(&self) -> Option<Reply> {
        lock(&self.pending).take()
    }

    /// Stores what a row of the reporting `BEGIN`'s reply says.
    fn record(&self, message: &SimpleQueryMessage) {
        let SimpleQueryMessage::Row(row) = message else {
            return;
        };
        let column = |name| row.try_get(name).ok().flatten();
        if let Some(xid) = column("xid").and_then(|v| v.parse().ok()) {
            let _ = self.xid.set(xid);
            // The identifier is an unsigned 64-bit value shown as int8.
            let sysid = column("sysid").and_then(|v| v.parse::<i64>().ok());
            let tli = column("tli").and_then(|v| u32::from_str_radix(v, 16).ok());
            if let (Some(sysid), Some(timeline)) = (sysid, tli) {
                let _ = self.transaction.set(TransactionRef {
                    id: xid,
                    system_identifier: sysid as u64,
                    timeline,
                });
            }
        }
        if let Some(pid) = column("pid").and_then(|v| v.parse().ok()) {
            let _ = self.pid.set(pid);
        }
    }
}

/// Reads the rest of a reporting `BEGIN`'s reply for the server process it names.
pub(crate) async fn reported_pid(mut reply: Reply) -> Option<i32> {
    let reported = Reported::default();
    while let Some(Ok(message)) = reply.next().await {
        reported.record(&message);
    }
    reported.pid.get().copied()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request whose reply is only checked for an error.
pub(crate) enum Side<'a> {
    /// One or more `;`-separated statements, simple query protocol.
    Simple(&'a str),
    /// `BEGIN …` (with its `SET LOCAL`s) that ends in a `SELECT` of the transaction id
    /// (column `xid`) and/or the server process id (`pid`); they are stored in the cells.
    BeginReporting(&'a str, &'a Reported),
}

impl<'a> Side<'a> {
    /// The request as a boxed future (the general case; see [`Sides::send`] for the common
    /// one, which is not boxed).
    fn boxed(self, conn: &'a Client) -> Request<'a> {
        match self {
            Side::Simple(sql) => Box::pin(conn.batch_execute(sql)),
            Side::BeginReporting(sql, reported) => Box::pin(reported.begin(conn, sql)),
        }
    }
}

type Request<'a> = Pin<Box<dyn Future<Output = Result<(), PgError>> + Send + 'a>>;

/// SQL text whose parameter types the handle has learned (`Db::learn_text_types`): what an
/// unnamed statement needs, owned, so that a write queued for `COMMIT` can keep it.
#[derive(Debug)]
pub(crate) struct Learned {
    pub(crate) sql: Box<str>,
    /// As the unnamed statement declares them (see `Db::learn_text_types`).
    pub(crate) types: Box<[Type]>,
}

/// The rows of a statement that usually returns one (no allocation for them).
pub(crate) type Rows = smallvec::SmallVec<[Row; 1]>;

/// How a statement goes to the server.
#[derive(Debug)]
pub(crate) enum Runnable {
    /// A prepared statement: the caller's, rowlock's on this connection, or text prepared for
    /// this use.
    Named(Statement),
    /// SQL text whose parameter types the handle has learned: an unnamed statement, parsed,
    /// bound and run in one request.
    Unnamed(Arc<Learned>),
}

impl Runnable {
    /// The parameter types values are encoded as.
    pub(crate) fn types(&self) -> &[Type] {
        match self {
            Runnable::Named(st) => st.params(),
            Runnable::Unnamed(learned) => &learned.types,
        }
    }

    /// The statement's rows, `params` bound.
    pub(crate) async fn rows<C: Default + Extend<Row>>(
        self,
        conn: &tokio_postgres::Client,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<C, tokio_postgres::Error> {
        match self {
            Runnable::Named(st) => query(conn, &st, params).await,
            Runnable::Unnamed(learned) => {
                conn.query_typed_raw(&learned.sql, typed(params, &learned.types))
                    .await?
                    .try_collect()
                    .await
            }
        }
    }

    /// The number of rows the statement affected, `params` bound.
    pub(crate) async fn count(
        &self,
        conn: &tokio_postgres::Client,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        match self {
            Runnable::Named(st) => conn.execute_raw(st, bind(params)).await,
            Runnable::Unnamed(learned) => {
                let rows = conn
                    .query_typed_raw(&learned.sql, typed(params, &learned.types))
                    .await?;
                let mut rows = std::pin::pin!(rows);
                while rows.try_next().await?.is_some() {}
                Ok(rows.rows_affected().unwrap_or(0))
            }
        }
    }
}

/// Writes queued to go out with `COMMIT`, each value encoded when it is queued.
///
/// A value is encoded at once, with its statement's parameter type, into one buffer as the
/// `Bind` message will carry it (format, length or -1 for `NULL`, bytes): the caller may
/// borrow it, a value of the wrong type fails the call that queues it (and nothing is
/// queued), and a queued write costs no allocation of its own. Sending replays the bytes.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    /// Each write's statement and where its parameters end in `bytes`.
    queued: SmallVec<[(Runnable, usize); INLINE_WRITES]>,
    bytes: BytesMut,
    /// Where `bytes` comes from and goes back to when these writes are dropped.
    spare: Option<Arc<SpareBuffers>>,
}

/// Buffers of queued writes that ended, for the next transactions of the same handle: a
/// transaction that queues writes takes one instead of allocating its own.
#[derive(Debug, Default)]
pub(crate) struct SpareBuffers(Mutex<Vec<BytesMut>>);

impl SpareBuffers {
    /// Most buffers kept, and the largest kept: enough for the transactions that run at once,
    /// without holding on to the memory of a rare large batch.
    const KEPT: usize = 64;
    const KEPT_CAPACITY: usize = 16 * 1024;

    fn take(&self) -> BytesMut {
        let spare = self.0.lock().unwrap_or_else(PoisonError::into_inner).pop();
        spare.unwrap_or_else(|| BytesMut::with_capacity(256))
    }

    fn give(&self, mut buffer: BytesMut) {
        if buffer.capacity() == 0 || buffer.capacity() > Self::KEPT_CAPACITY {
            return;
        }
        buffer.clear();
        let mut spare = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if spare.len() < Self::KEPT {
            spare.push(buffer);
        }
    }
}

impl Drop for Writes {
    fn drop(&mut self) {
        if let Some(spare) = &self.spare {
            spare.give(std::mem::take(&mut self.bytes));
        }
    }
}

/// Queued writes a transaction lists without a heap allocation (their request futures, when
/// sent, are another matter: see `send_writes`).
const INLINE_WRITES: usize = 4;

/// Why a write could not be queued.
#[derive(Debug)]
pub(crate) enum Misfit {
    /// The statement takes `expected` parameters.
    Count { expected: usize, given: usize },
    /// The value at this position (0-based) does not fit its parameter's type.
    Value(usize, Box<dyn StdError + Send + Sync>),
}

impl Writes {
    /// Writes whose buffer comes from, and goes back to, `spare`.
    pub(crate) fn with_spare(spare: Arc<SpareBuffers>) -> Self {
        Writes {
            queued: SmallVec::new(),
            bytes: BytesMut::new(),
            spare: Some(spare),
        }
    }

    /// Takes the writes out, leaving none (the buffer's way back goes with them).
    pub(crate) fn take(&mut self) -> Writes {
        Writes {
            queued: std::mem::take(&mut self.queued),
            bytes: std::mem::take(&mut self.bytes),
            spare: self.spare.clone(),
        }
    }

    /// Queues `statement` with `params`, encoded now. On a misfit nothing is queued.
    pub(crate) fn push(
        &mut self,
        statement: Runnable,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(), Misfit> {
        let types = statement.types();
        if params.len() != types.len() {
            return Err(Misfit::Count {
                expected: types.len(),
                given: params.len(),
            });
        }
        if self.bytes.capacity() == 0 {
            // A spare buffer, or one allocation for the usual few values instead of one per
            // growth step.
            self.bytes = match &self.spare {
                Some(spare) => spare.take(),
                None => BytesMut::with_capacity(256),
            };
        }
        let start = self.bytes.len();
        for (i, (value, ty)) in params.iter().zip(types).enumerate() {
            if let Err(e) = self.encode(*value, ty) {
                self.bytes.truncate(start);
                return Err(Misfit::Value(i, e));
            }
        }
        let end = self.bytes.len();
        self.queued.push((statement, end));
        Ok(())
    }

    fn encode(
        &mut self,
        value: &(dyn ToSql + Sync),
        ty: &Type,
    ) -> Result<(), Box<dyn StdError + Send + Sync>> {
        let binary = matches!(value.encode_format(ty), Format::Binary);
        self.bytes.put_u8(u8::from(binary));
        let at = self.bytes.len();
        self.bytes.put_i32(-1);
        if let IsNull::No = value.to_sql_checked(ty, &mut self.bytes)? {
            let len = i32::try_from(self.bytes.len() - at - 4)
                .map_err(|_| "a value longer than 2 GiB cannot be a parameter")?;
            self.bytes[at..at + 4].copy_from_slice(&len.to_be_bytes());
        } else {
            self.bytes.truncate(at + 4);
        }
        Ok(())
    }

    pub(crate) fn len(&self) -> usize {
        self.queued.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keeps the first `len` writes, dropping those queued after them.
    pub(crate) fn truncate(&mut self, len: usize) {
        if len >= self.queued.len() {
            return;
        }
        self.queued.truncate(len);
        let end = self.queued.last().map_or(0, |(_, end)| *end);
        self.bytes.truncate(end);
    }

    /// Whether a write runs a prepared statement (one this transaction may have to close
    /// before it ends).
    pub(crate) fn any_named(&self) -> bool {
        self.queued
            .iter()
            .any(|(statement, _)| matches!(statement, Runnable::Named(_)))
    }

    /// The SQL text of each write that runs as an unnamed statement.
    pub(crate) fn texts(&self) -> impl Iterator<Item = &str> {
        self.queued
            .iter()
            .filter_map(|(statement, _)| match statement {
                Runnable::Unnamed(learned) => Some(&*learned.sql),
                Runnable::Named(_) => None,
            })
    }

    /// Each write: its statement and its encoded parameters.
    fn iter(&self) -> impl Iterator<Item = (&Runnable, Encoded<'_>)> {
        let mut start = 0;
        self.queued.iter().map(move |(statement, end)| {
            let bytes = &self.bytes[start..*end];
            start = *end;
            let left = statement.types().len();
            (statement, Encoded { bytes, left })
        })
    }
}

/// One write's encoded parameters, as values tokio-postgres binds.
struct Encoded<'a> {
    bytes: &'a [u8],
    left: usize,
}

impl<'a> Iterator for Encoded<'a> {
    type Item = Raw<'a>;

    fn next(&mut self) -> Option<Raw<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let binary = self.bytes.get_u8() == 1;
        let len = self.bytes.get_i32();
        let value = usize::try_from(len).ok().map(|len| {
            let (value, rest) = self.bytes.split_at(len);
            self.bytes = rest;
            value
        });
        Some(Raw { binary, value })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Encoded<'_> {}

/// A value encoded when its write was queued (already checked against its type then).
#[derive(Debug)]
struct Raw<'a> {
    binary: bool,
    value: Option<&'a [u8]>,
}

impl ToSql for Raw<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self.value {
            Some(bytes) => {
                out.put_slice(bytes);
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        self.to_sql(ty, out)
    }

    fn encode_format(&self, _: &Type) -> Format {
        if self.binary {
            Format::Binary
        } else {
            Format::Text
        }
    }
}

/// Sends every queued write, first-polling them in order; the first failure (index and
/// error), if any. One write needs no list.
async fn send_writes(conn: &Client, writes: &Writes) -> Option<(usize, PgError)> {
    if writes.is_empty() {
        return None;
    }
    // Every write's values, then references to them: bound as every other statement's
    // parameters are (`bind`).
    let values: SmallVec<[Raw<'_>; INLINE_VALUES]> =
        writes.iter().flat_map(|(_, encoded)| encoded).collect();
    let refs: SmallVec<[&(dyn ToSql + Sync); INLINE_VALUES]> =
        values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    if writes.len() == 1 {
        let (statement, _) = writes.iter().next()?;
        return write(conn, statement, &refs).await.err().map(|e| (0, e));
    }
    let mut rest = &refs[..];
    // One slice for all of them: a request future is about a kilobyte, too large to keep
    // several inline in every commit's future.
    let slots: Box<[_]> = writes
        .iter()
        .map(|(statement, _)| {
            let (params, after) = rest.split_at(statement.types().len());
            rest = after;
            Some(write(conn, statement, params))
        })
        .collect();
    all_in_order(Box::into_pin(slots).as_mut()).await
}

/// One queued write's request (its rows, if any, read and dropped).
async fn write(
    conn: &Client,
    statement: &Runnable,
    params: &[&(dyn ToSql + Sync)],
) -> Result<(), PgError> {
    statement.count(conn, params).await.map(drop)
}

/// Queued values sent without a heap allocation of their own.
const INLINE_VALUES: usize = 4;

/// Parameters as rowlock binds every statement it sends: one iterator and one value type,
/// so the driver's encoder (generic over both, some 3.5 KB of machine code) is compiled once
/// for all of them instead of once per call site's way of passing values, and a transaction
/// runs through one copy of it.
pub(crate) fn bind<'a>(params: &'a [&'a (dyn ToSql + Sync)]) -> Bound<'a> {
    params.iter().copied()
}

/// Parameters with the types an unnamed statement declares: as [`bind`], one iterator type
/// for every unnamed statement rowlock sends.
pub(crate) fn typed<'a>(
    params: &'a [&'a (dyn ToSql + Sync)],
    types: &'a [Type],
) -> std::iter::Zip<Bound<'a>, std::iter::Cloned<std::slice::Iter<'a, Type>>> {
    bind(params).zip(types.iter().cloned())
}

/// What [`bind`] returns.
pub(crate) type Bound<'a> = std::iter::Copied<std::slice::Iter<'a, &'a (dyn ToSql + Sync)>>;

/// `statement`'s rows, its parameters bound by [`bind`].
pub(crate) async fn query<C: Default + Extend<Row>>(
    conn: &Client,
    statement: &Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<C, PgError> {
    conn.query_raw(statement, bind(params))
        .await?
        .try_collect()
        .await
}

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

/// Requests to send in one flush, in order: side requests, queued writes, the main request,
/// and at most one side request after it ([`send_then`](Self::send_then)).
pub(crate) struct Flush<'a> {
    conn: &'a Client,
    before: Sides<'a>,
}

impl<'a> Flush<'a> {
    pub(crate) fn new(conn: &'a Client) -> Self {
        Flush {
            conn,
            before: Sides::default(),
        }
    }

    /// Sends `side` before the main request (after the side requests already added).
    #[must_use]
    pub(crate) fn before(mut self, side: Side<'a>) -> Self {
        self.before.push(side, self.conn);
        self
    }

    /// Sends every request and waits for every reply. Returns the main request's value, or
    /// the first failure in sending order.
    ///
    /// Not an `async fn`: the main future is moved once, into the [`InOrder`], so nesting
    /// flushes (a `BEGIN` flush around a `SET LOCAL` flush) does not copy it at every level.
    pub(crate) fn send<T>(
        self,
        main: impl Future<Output = Result<T, PgError>> + 'a,
    ) -> impl Future<Output = Result<T, Failed>> + 'a {
        // No writes and nothing after: nothing of their request futures in this one.
        self.send_with(std::future::ready(None), main, std::future::ready(None))
    }

    /// [`send`](Self::send), with `after` sent after `main` (two flushes have one: a claim
    /// that restores `plan_cache_mode`, and a blocker lookup's `COMMIT`). A parameter rather
    /// than a list kept in the flush, so that every other flush carries nothing of it.
    pub(crate) fn send_then<T>(
        self,
        main: impl Future<Output = Result<T, PgError>> + 'a,
        after: Side<'a>,
    ) -> impl Future<Output = Result<T, Failed>> + 'a {
        let conn = self.conn;
        let mut sides = Sides::default();
        sides.push(after, conn);
        self.send_with(std::future::ready(None), main, sides.send(conn))
    }

    /// [`send`](Self::send), with the queued `writes` after the side requests before `main`.
    pub(crate) fn send_after_writes<T>(
        self,
        writes: &'a Writes,
        main: impl Future<Output = Result<T, PgError>> + 'a,
    ) -> impl Future<Output = Result<T, Failed>> + 'a {
        let writes = send_writes(self.conn, writes);
        self.send_with(writes, main, std::future::ready(None))
    }

    fn send_with<T>(
        self,
        writes: impl Future<Output = Option<(usize, PgError)>> + 'a,
        main: impl Future<Output = Result<T, PgError>> + 'a,
        after: impl Future<Output = Option<(usize, PgError)>> + 'a,
    ) -> impl Future<Output = Result<T, Failed>> + 'a {
        let sides_before = self.before.len();
        InOrder::new(
            self.before.send(self.conn),
            writes,
            main,
            after,
            move |sides: Option<(usize, PgError)>,
                  writes: Option<(usize, PgError)>,
                  main,
                  after| {
                let before = sides.or(writes.map(|(i, e)| (sides_before + i, e)));
                first_failure(before, main, after)
            },
        )
    }
}

pin_project! {
    /// Four futures polled in argument order, every time, each until it is ready: the order
    /// the requests are written in (fair joins such as `tokio::join!` rotate their starting
    /// point). Outputs are kept beside the futures and handed to `finish`, so completing moves
    /// no future (futures-util's joins and `map` copy their whole state when they complete).
    struct InOrder<A: Future, B: Future, C: Future, D: Future, F> {
        #[pin]
        a: A,
        #[pin]
        b: B,
        #[pin]
        c: C,
        #[pin]
        d: D,
        outputs: (Option<A::Output>, Option<B::Output>, Option<C::Output>, Option<D::Output>),
        finish: Option<F>,
    }
}

impl<A: Future, B: Future, C: Future, D: Future, F> InOrder<A, B, C, D, F> {
    fn new(a: A, b: B, c: C, d: D, finish: F) -> Self {
        InOrder {
            a,
            b,
            c,
            d,
            outputs: (None, None, None, None),
            finish: Some(finish),
        }
    }
}

impl<A, B, C, D, F, O> Future for InOrder<A, B, C, D, F>
where
    A: Future,
    B: Future,
    C: Future,
    D: Future,
    F: FnOnce(A::Output, B::Output, C::Output, D::Output) -> O,
{
    type Output = O;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<O> {
        let this = self.project();
        let (a, b, c, d) = this.outputs;
        if a.is_none() {
            if let Poll::Ready(v) = this.a.poll(cx) {
                *a = Some(v);
            }
        }
        if b.is_none() {
            if let Poll::Ready(v) = this.b.poll(cx) {
                *b = Some(v);
            }
        }
        if c.is_none() {
            if let Poll::Ready(v) = this.c.poll(cx) {
                *c = Some(v);
            }
        }
        if d.is_none() {
            if let Poll::Ready(v) = this.d.poll(cx) {
                *d = Some(v);
            }
        }
        if a.is_none() || b.is_none() || c.is_none() || d.is_none() {
            return Poll::Pending;
        }
        let finish = this
            .finish
            .take()
            .expect("InOrder polled after it finished");
        Poll::Ready(finish(
            a.take().expect("checked"),
            b.take().expect("checked"),
            c.take().expect("checked"),
            d.take().expect("checked"),
        ))
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

/// Side requests: the first inline (the common case is one `BEGIN` or one `SET LOCAL`); once
/// there are more, all of them in a vector, as the futures that send them (`None` once
/// finished).
#[derive(Default)]
struct Sides<'a> {
    first: Option<Side<'a>>,
    all: Vec<Option<Request<'a>>>,
}

impl<'a> Sides<'a> {
    fn push(&mut self, side: Side<'a>, conn: &'a Client) {
        if self.first.is_none() && self.all.is_empty() {
            self.first = Some(side);
            return;
        }
        if let Some(first) = self.first.take() {
            self.all.push(Some(first.boxed(conn)));
        }
        self.all.push(Some(side.boxed(conn)));
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.all.len()
    }

    /// Sends every side request, first-polling them in order; the first failure (index and
    /// error), if any.
    async fn send(self, conn: &'a Client) -> Option<(usize, PgError)> {
        if let Some(first) = self.first {
            // The common case (one `BEGIN` or `SET LOCAL`): no list.
            let sent = match first {
                Side::Simple(sql) => conn.batch_execute(sql).await,
                other => other.boxed(conn).await,
            };
            return sent.err().map(|e| (0, e));
        }
        let mut all = self.all;
        all_in_order(Pin::new(&mut all[..])).await
    }
}

/// Polls every request, every time, in index order (unlike fair joins, which rotate their
/// starting point), each until it finishes (its slot is then emptied); the first failure in
/// index order, if any. Allocates nothing: the requests are already in their slots.
async fn all_in_order<F>(mut slots: Pin<&mut [Option<F>]>) -> Option<(usize, PgError)>
where
    F: Future<Output = Result<(), PgError>>,
{
    let mut failed: Option<(usize, PgError)> = None;
    poll_fn(|cx| {
        let mut pending = false;
        for i in 0..slots.len() {
            let mut slot = pinned::slot(slots.as_mut(), i);
            let Some(request) = slot.as_mut().as_pin_mut() else {
                continue;
            };
            match request.poll(cx) {
                Poll::Pending => pending = true,
                Poll::Ready(result) => {
                    slot.set(None);
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

/// The crate's one `unsafe` code: pinning projected from a slice to one element, which the
/// standard library does not offer (futures-util's `join_all` does the same inside).
#[allow(unsafe_code)]
mod pinned {
    use std::pin::Pin;

    /// The element at `i` of a pinned slice, pinned. Panics if `i` is out of bounds.
    pub(super) fn slot<T>(slice: Pin<&mut [T]>, i: usize) -> Pin<&mut T> {
        // SAFETY: an element of a pinned slice is itself pinned: a slice never moves its
        // elements, and nothing here moves one out (the `&mut` is re-pinned at once).
        unsafe { slice.map_unchecked_mut(|s| &mut s[i]) }
    }
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
        assert!(all_in_order(Pin::new(&mut requests[..])).await.is_none());
        assert_eq!(*log.lock().unwrap(), (0..40).collect::<Vec<_>>());
        let mut done = finished.lock().unwrap().clone();
        done.sort();
        assert_eq!(done, (0..40).collect::<Vec<_>>());
        assert!(requests.iter().all(Option::is_none));
    }

    #[tokio::test]
    async fn in_order_polls_in_argument_order() {
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
        let out = InOrder::new(
            step("before", 3),
            step("writes", 1),
            step("main", 2),
            step("after", 3),
            |a, b, c, d| (a, b, c, d),
        )
        .await;
        assert_eq!(out, ("before", "writes", "main", "after"));
        let log = log.lock().unwrap();
        assert_eq!(
            &log[..4],
            ["before", "writes", "main", "after"],
            "first polls in order"
        );
        assert_eq!(
            &log[4..7],
            ["before", "main", "after"],
            "and every poll after, skipping what finished"
        );
    }
}
