//! Row locking: lock one row or several rows by key, run the caller's code, commit.
//!
//! Round trips of [`Db::with_locked_row`]: one for `BEGIN` + `SET LOCAL` + the locking `SELECT`
//! (sent in one flush), plus one the first time a connection prepares the statement, plus the
//! closure's own, plus one for `COMMIT` (carrying any writes queued with
//! [`Transaction::execute_on_commit`]). `SkipLocked` adds one when no row came back, to tell
//! "skipped" from "not found".

use std::collections::BTreeSet;
use std::sync::Arc;

use std::future::Future;

use crate::scoped::ScopedBoxFuture;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::attempt::{LockStep, run_locked};
use crate::db::Db;
use crate::diagnostics::BlockerQuery;
use crate::error::{Error, ErrorKind, Step};
use crate::lock::{Lock, LockMode};
use crate::options::millis_ceil;
use crate::outcome::{Outcome, RowRef};
use crate::row::{Columns, Key, LockableRow, Names, Params, decode_row, decode_rows};
use crate::transaction::{Rows, Transaction};

/// The reply to the locking statement, before the caller sees it.
enum LockReply {
    Rows(Rows),
    /// `55P03`: lock not available, or lock timeout.
    Contended(Error),
}

impl LockReply {
    /// The locked rows, or the outcome a contended lock ends with: `busy` for a lock that
    /// was not available, `timed_out` for a wait that exceeded the lock timeout.
    fn rows_or<O>(
        self,
        busy: impl FnOnce(Error) -> O,
        timed_out: impl FnOnce(Error) -> O,
    ) -> Result<Rows, O> {
        match self {
            LockReply::Rows(rows) => Ok(rows),
            LockReply::Contended(e) if e.kind() == ErrorKind::LockTimeout => Err(timed_out(e)),
            LockReply::Contended(e) => Err(busy(e)),
        }
    }
}

impl Transaction {
    /// Locks the row of `R` with this key inside this transaction, and returns it.
    ///
    /// Of `options.transaction` only the lock timeout is used here (the transaction is already
    /// open); it is applied with `SET LOCAL` in the same flush as the locking `SELECT`, and
    /// lasts until the transaction ends.
    ///
    /// **The transaction can go on after every outcome.** When the lock can fail
    /// ([`LockMode::NoWait`], or a lock timeout set here or on the transaction), the locking
    /// statement runs in a savepoint that rides in the same flush; after
    /// [`Outcome::LockNotAvailable`] or [`Outcome::LockTimeout`] it is rolled back (with the
    /// next statement, no extra round trip), so you can try another row, lock something else,
    /// or return the outcome and commit what you wrote. Such a lock takes a subtransaction id:
    /// more than 64 in one transaction slow the server down, so lock many rows with
    /// [`lock_rows`](Self::lock_rows) rather than `lock_row` in a loop. Other errors (a
    /// deadlock, a lost connection) abort the transaction, as PostgreSQL does.
    ///
    /// Invalid options or names give [`ErrorKind::InvalidArgument`] before anything is sent.
    ///
    /// ```no_run
    /// # use rowlock::{LockableRow, Table, tokio_postgres::{Row, Error as PgError}};
    /// # struct Account { id: i64 }
    /// # impl LockableRow for Account {
    /// #     type Key = i64;
    /// #     const TABLE: Table = Table::new("accounts");
    /// #     const KEY_COLUMNS: &'static [&'static str] = &["id"];
    /// #     fn from_row(row: &Row) -> Result<Self, PgError> { Ok(Account { id: row.try_get("id")? }) }
    /// #     fn key(&self) -> i64 { self.id }
    /// # }
    /// # async fn demo(db: &rowlock::Db) -> Result<(), rowlock::Error> {
    /// use rowlock::{Lock, Outcome, TransactionOptions};
    ///
    /// let tx = db.begin(TransactionOptions::new()).await?;
    /// if let Outcome::Done(account) = tx.lock_row::<Account>(&1, Lock::no_wait()).await? {
    ///     tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = $1", &[&account.id])
    ///         .await?;
    /// }
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn lock_row<R: LockableRow>(
        &self,
        key: &R::Key,
        options: impl Into<Lock>,
    ) -> Result<Outcome<R>, Error> {
        let options = options.into();
        options.validate()?;
        let names = self.db().names::<R>()?;
        self.lock_one(&names, key, &options, true).await
    }

    /// Locks the rows of `R` with these keys inside this transaction, in ascending key order,
    /// and returns them in ascending key order (by `Key`'s `Ord`).
    ///
    /// Duplicate keys are locked once. All rows or none: if a key has no row,
    /// [`Outcome::NotFound`] lists the missing rows; with `SkipLocked`,
    /// [`Outcome::Skipped`] lists the rows locked elsewhere (any rows that were locked stay
    /// locked until this transaction ends). An empty key list gives
    /// [`ErrorKind::InvalidArgument`] before anything is sent; any number of keys is one
    /// statement (an array parameter per key column).
    pub async fn lock_rows<R: LockableRow>(
        &self,
        keys: &[R::Key],
        options: impl Into<Lock>,
    ) -> Result<Outcome<Vec<R>>, Error> {
        let options = options.into();
        options.validate()?;
        let names = self.db().names::<R>()?;
        let keys = sorted_keys::<R>(keys)?;
        self.lock_many(&names, &keys, &options, true).await
    }

    /// The columns rowlock's statements read for a row type in this transaction: the row
    /// type's own, or, when it lists none, the table's columns as the server lists them on this
    /// connection (a statement prepared once per connection and never run; later calls find
    /// it in the connection's cache without sending anything).
    ///
    /// With [`StatementCache::Transaction`](crate::StatementCache::Transaction) no statement
    /// outlives the transaction (rowlock's own go unnamed), and parsing one locks the table
    /// until the transaction ends, so it cannot change under them: the row type's own list
    /// serves.
    pub(crate) async fn columns_for(&self, names: &Names) -> Result<Arc<Columns>, Error> {
        if !names.needs_columns() || self.statements_per_transaction() {
            return Ok(names.declared().clone());
        }
        let describe = || self.cached_statement(&names.describe_sql);
        let described = if self.begun() {
            // Inside the transaction: a failure here is one of the transaction's.
            self.run(Step::Lock, describe).await
        } else {
            // Before `BEGIN` leaves: a cache hit sends nothing, so `BEGIN` still rides with
            // the lock statement; a miss prepares outside any transaction, once per
            // connection.
            describe().await.map_err(|e| Error::from_pg(e, Step::Lock))
        }
        .map_err(|e| e.naming_missing_table(&names.describe_sql, &names.table))?;
        names.learned(described.columns())
    }

    /// `e` from a statement rendered with `columns`, naming a column of the row type's that
    /// the table no longer has; the connection's statements are forgotten if asking the
    /// server for the columns again cures it.
    pub(crate) fn missing_column(
        &self,
        names: &Names,
        e: Error,
        sql: &str,
        columns: &Columns,
    ) -> Error {
        let e = names.missing_column(e, sql, columns);
        if e.is_stale_plan() {
            self.forget_statements();
        }
        e
    }

    pub(crate) async fn lock_one<R: LockableRow>(
        &self,
        names: &Names,
        key: &R::Key,
        options: &Lock,
        in_callers_tx: bool,
    ) -> Result<Outcome<R>, Error> {
        let columns = self.columns_for(names).await?;
        let sql = names.lock_sql(options, 1, &columns);
        let mut params = Params::new();
        key.push_params(&mut params);
        let reply = self.lock_query(&sql, &params, options, in_callers_tx);
        let rows = match reply
            .await
            .map_err(|e| {
                self.missing_column(names, e, &sql, &columns)
                    .misfit_named(|i| names.key_param(i, false))
            })?
            .rows_or(Outcome::LockNotAvailable, Outcome::LockTimeout)
            .map_err(|o| about(o, || [RowRef::of::<R>(key)]))
        {
            Ok(rows) => rows,
            Err(contended) => return Ok(contended),
        };
        match rows.len() {
            1 => decode_row(&rows[0], Step::Lock).map(Outcome::Done),
            0 if options.mode == LockMode::SkipLocked => {
                // Boxed: the rare path, and its statement's future would double the lock's.
                if Box::pin(self.matching::<R>(names, &columns, std::slice::from_ref(key)))
                    .await?
                    .is_empty()
                {
                    Ok(Outcome::NotFound(vec![RowRef::of::<R>(key)]))
                } else {
                    Ok(Outcome::Skipped(vec![RowRef::of::<R>(key)]))
                }
            }
            0 => Ok(Outcome::NotFound(vec![RowRef::of::<R>(key)])),
            n => Err(not_unique(names, n, 1)),
        }
    }

    /// The rows of `R` with these keys (sorted, deduplicated), locked in key order. A plain
    /// function mapping the future, so the lock step's future holds no second state machine.
    pub(crate) fn lock_many<'a, R: LockableRow>(
        &'a self,
        names: &'a Names,
        keys: &'a [R::Key],
        options: &'a Lock,
        in_callers_tx: bool,
    ) -> impl Future<Output = Result<Outcome<Vec<R>>, Error>> + Send + 'a {
        use futures_util::FutureExt as _;
        self.lock_many_as_asked::<R>(names, keys, options, in_callers_tx)
            .map(|locked| Ok(locked?.map(|(rows, _)| rows)))
    }

    /// [`lock_many`](Self::lock_many), and for each key found under another spelling
    /// (`citext`: `ALICE` found the row `alice`), the key asked for and the row's own key.
    pub(crate) async fn lock_many_as_asked<R: LockableRow>(
        &self,
        names: &Names,
        keys: &[R::Key],
        options: &Lock,
        in_callers_tx: bool,
    ) -> Result<Outcome<(Vec<R>, Vec<(R::Key, R::Key)>)>, Error> {
        let columns = self.columns_for(names).await?;
        // ORDER BY makes PostgreSQL lock in key order, so overlapping callers cannot deadlock.
        let sql = names.lock_sql(options, keys.len(), &columns);
        let arrays = key_arrays(keys);
        let params = bind_keys(keys, &arrays);
        let reply = self.lock_query(&sql, &params, options, in_callers_tx);
        let reply = reply.await.map_err(|e| {
            self.missing_column(names, e, &sql, &columns)
                .misfit_named(|i| names.key_param(i, !arrays.is_empty()))
        })?;
        let rows = match reply.rows_or(Outcome::LockNotAvailable, Outcome::LockTimeout) {
            Ok(rows) => rows,
            Err(contended) => return Ok(about(contended, || refs::<R>(keys))),
        };
        if rows.len() > keys.len() {
            return Err(not_unique(names, rows.len(), keys.len()));
        }
        let mut locked: Vec<R> = decode_rows(&rows, Step::Lock)?;
        locked.sort_by_key(R::key);
        let got: BTreeSet<R::Key> = locked.iter().map(R::key).collect();
        if got.len() != locked.len() {
            return Err(not_unique(names, locked.len(), got.len()));
        }
        let missing: Vec<R::Key> = keys.iter().filter(|k| !got.contains(k)).cloned().collect();
        if missing.is_empty() {
            return Ok(Outcome::Done((locked, Vec::new())));
        }
        // A key no row has in `Key`'s terms may still have one in the server's (`citext`, a
        // nondeterministic collation: `ALICE` locked the row `alice`): the server says which.
        // Boxed: the rare path, and its statement's future would double the lock's.
        let matches = Box::pin(self.matching::<R>(names, &columns, &missing)).await?;
        let (mut skipped, mut not_found, mut as_asked) = (Vec::new(), Vec::new(), Vec::new());
        for (at, key) in missing.into_iter().enumerate() {
            match matches.iter().find(|(i, _)| *i == at) {
                // One of the rows locked above.
                Some((_, row)) if got.contains(row) => as_asked.push((key, row.clone())),
                // There, and locked by another transaction.
                Some(_) if options.mode == LockMode::SkipLocked => skipped.push(key),
                _ => not_found.push(key),
            }
        }
        Ok(if !not_found.is_empty() {
            Outcome::NotFound(refs::<R>(&not_found))
        } else if !skipped.is_empty() {
            Outcome::Skipped(refs::<R>(&skipped))
        } else {
            Outcome::Done((locked, as_asked))
        })
    }

    /// Sends the locking statement, mapping `55P03` to a contention reply rather than an
    /// error.
    ///
    /// Inside the caller's own transaction (`in_callers_tx`), the call's lock timeout goes
    /// ahead of it (`SET LOCAL`, same flush), and when the lock can fail (`NoWait`, a lock
    /// timeout) the statement runs in a savepoint (same flush again) that is rolled back if the
    /// lock was not taken: the transaction stays usable, at no extra round trip.
    async fn lock_query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        options: &Lock,
        in_callers_tx: bool,
    ) -> Result<LockReply, Error> {
        let mut savepoint = None;
        if in_callers_tx {
            let call_timeout = options.transaction.lock_timeout;
            if let Some(t) = call_timeout {
                self.queue_statement(format!("SET LOCAL lock_timeout = {}", millis_ceil(t)));
            }
            let may_fail = options.mode == LockMode::NoWait
                || (options.mode == LockMode::Wait
                    && self.lock_may_time_out(call_timeout.is_some()));
            if may_fail {
                savepoint = Some(self.open_savepoint()?);
            }
        }
        let conn = self.conn();
        let sent = self.run_sql(Step::Lock, sql, params, |statement| async move {
            statement.rows::<Rows>(conn, params).await
        });
        let reply = match sent.await {
            Ok(rows) => Ok(LockReply::Rows(rows)),
            Err(e) => match e.kind() {
                // Only lock_timeout can raise 55P03 while waiting in Wait mode.
                ErrorKind::LockNotAvailable if options.mode == LockMode::Wait => {
                    Ok(LockReply::Contended(e.reclassified(
                        ErrorKind::LockTimeout,
                        "waited longer than lock_timeout for a row lock",
                    )))
                }
                ErrorKind::LockNotAvailable | ErrorKind::LockTimeout => Ok(LockReply::Contended(e)),
                _ => Err(e),
            },
        };
        if let Some(id) = savepoint {
            self.end_savepoint(id, matches!(reply, Ok(LockReply::Contended(_))));
        }
        reply
    }

    /// Which of `keys` have a row, read without locking (plain reads are never blocked by row
    /// locks), as the server compares keys ([`Names::match_sql`]): for each row found, the
    /// position in `keys` of the key it matched and the row's own key.
    async fn matching<R: LockableRow>(
        &self,
        names: &Names,
        columns: &Columns,
        keys: &[R::Key],
    ) -> Result<Vec<(usize, R::Key)>, Error> {
        let arrays = <R::Key as Key>::arrays(keys);
        let params = bind_keys(keys, &arrays);
        let conn = self.conn();
        let rows: Vec<Row> = self
            .run_sql(
                Step::Lock,
                &names.match_sql(columns),
                &params,
                |statement| statement.rows(conn, &params),
            )
            .await?;
        rows.iter()
            .map(|r| {
                // The last column (a table's own column may share its name).
                let at: i64 = r.try_get(r.len() - 1).map_err(Error::decode)?;
                let row = decode_row::<R>(r, Step::Lock)?;
                Ok((usize::try_from(at - 1).unwrap_or(usize::MAX), row.key()))
            })
            .collect()
    }
}

/// Several keys as arrays, one per key column ([`Key::arrays`]); none for one key.
fn key_arrays<K: Key>(keys: &[K]) -> Vec<Box<dyn ToSql + Sync + Send + '_>> {
    if keys.len() > 1 {
        K::arrays(keys)
    } else {
        Vec::new()
    }
}

/// The parameters of a statement for `keys` written by [`Names::where_bound_keys`]: the
/// `arrays` of several keys, or one key's values.
fn bind_keys<'a, K: Key>(
    keys: &'a [K],
    arrays: &'a [Box<dyn ToSql + Sync + Send + 'a>],
) -> Params<'a> {
    if arrays.is_empty() {
        let mut params = Params::new();
        for key in keys {
            key.push_params(&mut params);
        }
        params
    } else {
        arrays.iter().map(|a| &**a as &(dyn ToSql + Sync)).collect()
    }
}

/// The rows of `R` with these keys, for an outcome or an error to name.
pub(crate) fn refs<R: LockableRow>(keys: &[R::Key]) -> Vec<RowRef> {
    keys.iter().map(RowRef::of::<R>).collect()
}

/// A contended outcome naming the rows its statement asked for (built only on that path).
fn about<T, I: IntoIterator<Item = RowRef>>(
    outcome: Outcome<T>,
    rows: impl FnOnce() -> I,
) -> Outcome<T> {
    match outcome {
        Outcome::LockNotAvailable(e) => Outcome::LockNotAvailable(e.about_rows(rows())),
        Outcome::LockTimeout(e) => Outcome::LockTimeout(e.about_rows(rows())),
        other => other,
    }
}

fn not_unique(names: &Names, rows: usize, keys: usize) -> Error {
    Error::with_kind(
        ErrorKind::KeyNotUnique,
        format!(
            "{} key {} matched {rows} rows for {keys} key(s); declare a primary key or unique \
             column set",
            names.table,
            names.key_tuple()
        ),
    )
    .at(Step::Lock)
}

pub(crate) fn sorted_keys<R: LockableRow>(keys: &[R::Key]) -> Result<Vec<R::Key>, Error> {
    if keys.is_empty() {
        return Err(Error::invalid(
            "no keys given: pass at least one key to lock",
        ));
    }
    // Any number of keys: several keys travel as one array parameter per key column.
    let set: BTreeSet<R::Key> = keys.iter().cloned().collect();
    Ok(set.into_iter().collect())
}

impl Db {
    /// Opens a pooled transaction, locks the row of `R` with this key, runs `f` with the
    /// transaction and the row, and commits if `f` returns `Ok`.
    ///
    /// What the caller gets back:
    /// - `Ok(Outcome::Done(v))`: the row was locked, `f` returned `Ok(v)`, and the transaction
    ///   committed.
    /// - `Ok(Outcome::NotFound | Skipped | LockNotAvailable | LockTimeout)`: see the table on
    ///   [`Outcome`]; `f` did not run and nothing was committed.
    /// - `Err(e)` from `f`: the transaction was rolled back and `e` is returned as is.
    /// - `Err(E::from(rowlock::Error))`: invalid options or names (refused before a connection
    ///   is taken; [`ErrorKind::InvalidArgument`]), pool failures, a lost connection, a key
    ///   that matches several rows ([`ErrorKind::KeyNotUnique`]), or a failed commit, including
    ///   [`ErrorKind::TransactionAborted`] when a statement in `f` failed but `f` returned
    ///   `Ok`.
    ///
    /// With a retry policy ([`Lock::retry`], or the handle's), each attempt opens a new
    /// transaction, locks the row again and calls `f` again, which is why `f` is `FnMut`:
    /// clone into the future what it moves. Lock contention is retried only when the policy
    /// says so; [`ErrorKind::RetriesExhausted`] is returned if a retried failure persists.
    ///
    /// If `f` panics or this future is dropped at any await point, the transaction is rolled
    /// back and its connection cleaned before reuse (see [`Transaction`]).
    ///
    /// ```no_run
    /// # use rowlock::{LockableRow, Table, tokio_postgres::{Row, Error as PgError}};
    /// # struct Account { id: i64, balance: i64 }
    /// # impl LockableRow for Account {
    /// #     type Key = i64;
    /// #     const TABLE: Table = Table::new("accounts");
    /// #     const KEY_COLUMNS: &'static [&'static str] = &["id"];
    /// #     fn from_row(row: &Row) -> Result<Self, PgError> {
    /// #         Ok(Account { id: row.try_get("id")?, balance: row.try_get("balance")? })
    /// #     }
    /// #     fn key(&self) -> i64 { self.id }
    /// # }
    /// # async fn demo(db: &rowlock::Db) -> Result<(), rowlock::Error> {
    /// use rowlock::{Lock, Outcome};
    ///
    /// let outcome = db
    ///     .with_locked_row(&1, Lock::no_wait(), |tx, account: Account| Box::pin(async move {
    ///         tx.execute("UPDATE accounts SET balance = $2 WHERE id = $1",
    ///                    &[&account.id, &(account.balance - 10)]).await?;
    ///         Ok::<_, rowlock::Error>(account.balance - 10)
    ///     }))
    ///     .await?;
    /// match outcome {
    ///     Outcome::Done(balance) => println!("new balance {balance}"),
    ///     Outcome::LockNotAvailable(e) => println!("busy: {e}"),
    ///     other => println!("{other}"),
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// [`ErrorKind::InvalidArgument`]: crate::ErrorKind::InvalidArgument
    /// [`ErrorKind::KeyNotUnique`]: crate::ErrorKind::KeyNotUnique
    /// [`ErrorKind::TransactionAborted`]: crate::ErrorKind::TransactionAborted
    /// [`ErrorKind::RetriesExhausted`]: crate::ErrorKind::RetriesExhausted
    pub async fn with_locked_row<'a, R, T, E, F>(
        &self,
        key: &R::Key,
        options: impl Into<Lock>,
        f: F,
    ) -> Result<Outcome<T>, E>
    where
        R: LockableRow,
        E: From<Error>,
        F: for<'t> FnMut(&'t Transaction, R) -> ScopedBoxFuture<'a, 't, Result<T, E>>,
    {
        let options = options.into();
        options.validate()?;
        let names = self.names::<R>()?;
        let step = RowLock::<R> {
            names: &names,
            key,
            options: &options,
        };
        run_locked(
            Some(("with_locked_row", &names.spelled)),
            self,
            &options.transaction,
            &step,
            f,
        )
        .await
    }

    /// Like [`Db::with_locked_row`](Self::with_locked_row) for several keys of one table: locks
    /// every row, in ascending key order (so callers locking overlapping sets in different
    /// orders cannot deadlock), then runs `f` with the rows in ascending key order.
    ///
    /// All rows or none: `f` runs only when every key was locked. Duplicate keys are locked
    /// once. Missing rows give [`Outcome::NotFound`] listing them; with `SkipLocked`, rows
    /// locked elsewhere give [`Outcome::Skipped`] listing them. An empty key list is refused
    /// with [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) before a
    /// connection is taken; any number of keys is one statement (an array parameter per key
    /// column). Retries, drops and errors as for
    /// [`Db::with_locked_row`](Self::with_locked_row).
    pub async fn with_locked_rows<'a, R, T, E, F>(
        &self,
        keys: &[R::Key],
        options: impl Into<Lock>,
        f: F,
    ) -> Result<Outcome<T>, E>
    where
        R: LockableRow,
        E: From<Error>,
        F: for<'t> FnMut(&'t Transaction, Vec<R>) -> ScopedBoxFuture<'a, 't, Result<T, E>>,
    {
        let options = options.into();
        options.validate()?;
        let names = self.names::<R>()?;
        let keys = sorted_keys::<R>(keys)?;
        let step = RowsLock::<R> {
            names: &names,
            keys: &keys,
            options: &options,
        };
        run_locked(
            Some(("with_locked_rows", &names.spelled)),
            self,
            &options.transaction,
            &step,
            f,
        )
        .await
    }
}

/// One row by key (`with_locked_row`). The lock timeout was set with `BEGIN`.
struct RowLock<'a, R: LockableRow> {
    names: &'a Names,
    key: &'a R::Key,
    options: &'a Lock,
}

impl<R: LockableRow> LockStep for RowLock<'_, R> {
    type Locked = Outcome<R>;
    fn lock<'t>(
        &'t self,
        tx: &'t Transaction,
    ) -> impl Future<Output = Result<Outcome<R>, Error>> + Send + 't {
        tx.lock_one::<R>(self.names, self.key, self.options, false)
    }
    fn blockers(&self, _: &Error) -> Option<BlockerQuery<'_>> {
        self.options
            .find_blockers
            .then(|| holders_of::<R>(self.names, std::slice::from_ref(self.key)))
    }
}

/// Rows by sorted, deduplicated keys (`with_locked_rows`).
struct RowsLock<'a, R: LockableRow> {
    names: &'a Names,
    keys: &'a [R::Key],
    options: &'a Lock,
}

impl<R: LockableRow> LockStep for RowsLock<'_, R> {
    type Locked = Outcome<Vec<R>>;
    fn lock<'t>(
        &'t self,
        tx: &'t Transaction,
    ) -> impl Future<Output = Result<Self::Locked, Error>> + Send + 't {
        tx.lock_many::<R>(self.names, self.keys, self.options, false)
    }
    fn blockers(&self, _: &Error) -> Option<BlockerQuery<'_>> {
        self.options
            .find_blockers
            .then(|| holders_of::<R>(self.names, self.keys))
    }
}

/// How to find the holders of the rows of `keys`: the same `WHERE` as the locking statement
/// (one key's values, or arrays of several).
pub(crate) fn holders_of<'a, R: LockableRow>(
    names: &'a Names,
    keys: &'a [R::Key],
) -> BlockerQuery<'a> {
    let filter = names.where_bound_keys(keys.len());
    let arrays = key_arrays(keys);
    let mut params = Vec::new();
    if arrays.is_empty() {
        for key in keys {
            key.push_params(&mut params);
        }
    }
    BlockerQuery::rows(&names.table, &filter, params).with_arrays(arrays)
}
