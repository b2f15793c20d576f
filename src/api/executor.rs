//! One trait for code that runs statements, inside rowlock's transaction or outside it.

use std::future::Future;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, ToStatement};

use crate::db::Db;
use crate::error::{Error, Step};
use crate::options::TransactionOptions;
use crate::transaction::{AsStatement, Transaction};

mod private {
    pub trait Sealed {}
    impl Sealed for crate::Db {}
    impl Sealed for crate::Transaction {}
    impl Sealed for tokio_postgres::Client {}
    impl Sealed for tokio_postgres::Transaction<'_> {}
    impl Sealed for deadpool_postgres::Object {}
    impl Sealed for deadpool_postgres::Transaction<'_> {}
}

/// Runs statements: rowlock's [`Db`] (each statement a transaction of its own) and
/// [`Transaction`] (with its error tracking), a tokio-postgres `Client` or `Transaction`, or a
/// pooled deadpool `Object` or `Transaction`. Write repository functions against
/// `&impl Executor` and call them both inside
/// [`Db::with_locked_row`](crate::Db::with_locked_row)'s closure and outside any transaction.
///
/// **Outside a transaction, pass the [`Db`].** Each statement runs in a transaction of its
/// own through rowlock's one path, as [`Db::with_transaction`] would run it: `BEGIN` rides
/// with the statement and `COMMIT` follows (two round trips), with the handle's lock and
/// statement timeouts and retry policy; what a [`Transaction`] refuses (SQL that would end
/// the transaction or change the pooled session) is refused; and a call dropped while its
/// statement runs cancels it, so a busy connection never goes back to the pool. A deadpool
/// `Object` taken from [`Db::pool`] has none of that: dropped mid-statement, it goes back to
/// the pool still running it, and the next caller waits behind it. A prepared
/// [`Statement`](tokio_postgres::Statement) belongs to the connection that prepared it, and
/// each call through a `Db` may run on another: passing one to a `Db` is refused with
/// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) (pass the SQL text: the
/// handle prepares it once, to learn its parameter types, and then sends it unnamed, in the
/// same round trip as what runs it; see [`Transaction::query`]). Inside a locked call, pass the
/// closure's `tx`, not the `Db`: the handle would run the statement in another transaction on
/// another connection, outside the lock's (and, on a pool of one, wait for the connection the
/// call holds until the pool's `wait_timeout`).
///
/// Through rowlock's [`Transaction`] the guard still sees every error: a statement that fails
/// through this trait, even one whose error is swallowed, still keeps the transaction from
/// being reported committed. (deadpool's `GenericClient` is sealed, so rowlock's `Transaction`
/// cannot be one, and [`Transaction::client`] would bypass the tracking.)
///
/// The methods are native `async` trait methods returning `Send` futures, so the trait is used
/// generically (`&impl Executor`), not as `dyn Executor`: no box per call, and the futures can
/// be spawned. Errors are rowlock's [`Error`]. This trait is sealed.
///
/// ```no_run
/// use rowlock::{Executor, Lock, LockableRow, Outcome};
/// # use rowlock::{Table, tokio_postgres::{Row, Error as PgError}};
/// # struct Account { id: i64 }
/// # impl LockableRow for Account {
/// #     type Key = i64;
/// #     const TABLE: Table = Table::new("accounts");
/// #     const KEY_COLUMNS: &'static [&'static str] = &["id"];
/// #     fn from_row(row: &Row) -> Result<Self, PgError> { Ok(Account { id: row.try_get("id")? }) }
/// #     fn key(&self) -> i64 { self.id }
/// # }
///
/// async fn add_note(db: &impl Executor, account: i64, note: &str) -> Result<u64, rowlock::Error> {
///     db.execute("INSERT INTO audit (account_id, note) VALUES ($1, $2)", &[&account, &note]).await
/// }
///
/// # async fn demo(db: &rowlock::Db) -> Result<(), rowlock::Error> {
/// // Outside a transaction: a transaction of its own, on a pooled connection.
/// add_note(db, 1, "opened").await?;
/// // Inside a locked call, in its transaction:
/// let outcome = db
///     .with_locked_row(&1, Lock::new(), |tx, acc: Account| Box::pin(async move {
///         add_note(tx, acc.id, "locked").await
///     }))
///     .await?;
/// # Ok(()) }
/// ```
pub trait Executor: private::Sealed + Send + Sync {
    /// Runs a statement and returns its rows.
    fn query<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send
    where
        T: ?Sized + ToStatement + AsStatement + Sync;

    /// Runs a statement that returns exactly one row.
    fn query_one<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row, Error>> + Send
    where
        T: ?Sized + ToStatement + AsStatement + Sync;

    /// Runs a statement that returns at most one row.
    fn query_opt<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>, Error>> + Send
    where
        T: ?Sized + ToStatement + AsStatement + Sync;

    /// Runs a statement and returns the number of rows it affected.
    fn execute<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64, Error>> + Send
    where
        T: ?Sized + ToStatement + AsStatement + Sync;

    /// Runs `;`-separated statements with the simple query protocol.
    fn batch_execute(&self, sql: &str) -> impl Future<Output = Result<(), Error>> + Send;
}

impl Executor for Transaction {
    fn query<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send
    where
        T: ?Sized + ToStatement + AsStatement + Sync,
    {
        Transaction::query(self, statement, params)
    }

    fn query_one<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row, Error>> + Send
    where
        T: ?Sized + ToStatement + AsStatement + Sync,
    {
        Transaction::query_one(self, statement, params)
    }

    fn query_opt<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>, Error>> + Send
    where
        T: ?Sized + ToStatement + AsStatement + Sync,
    {
        Transaction::query_opt(self, statement, params)
    }

    fn execute<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64, Error>> + Send
    where
        T: ?Sized + ToStatement + AsStatement + Sync,
    {
        Transaction::execute(self, statement, params)
    }

    fn batch_execute(&self, sql: &str) -> impl Future<Output = Result<(), Error>> + Send {
        Transaction::batch_execute(self, sql)
    }
}

/// A statement through a [`Db`]: text, never a prepared statement of some connection.
fn refuse_prepared<T: ?Sized + AsStatement>(statement: &T) -> Result<(), Error> {
    match statement.prepared() {
        None => Ok(()),
        Some(_) => Err(Error::invalid(
            "a prepared Statement belongs to the connection that prepared it, and each \
             statement through a Db may run on another pooled connection: pass the SQL text \
             (its parameter types are learned once per handle), or run it inside a transaction \
             that prepared it",
        )),
    }
}

/// Through the handle: each statement in a transaction of its own (see the trait's docs).
impl Executor for Db {
    async fn query<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error>
    where
        T: ?Sized + ToStatement + AsStatement + Sync,
    {
        refuse_prepared(statement)?;
        self.with_transaction(TransactionOptions::new(), |tx| {
            Box::pin(async move { tx.query(statement, params).await })
        })
        .await
    }

    async fn query_one<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error>
    where
        T: ?Sized + ToStatement + AsStatement + Sync,
    {
        refuse_prepared(statement)?;
        self.with_transaction(TransactionOptions::new(), |tx| {
            Box::pin(async move { tx.query_one(statement, params).await })
        })
        .await
    }

    async fn query_opt<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error>
    where
        T: ?Sized + ToStatement + AsStatement + Sync,
    {
        refuse_prepared(statement)?;
        self.with_transaction(TransactionOptions::new(), |tx| {
            Box::pin(async move { tx.query_opt(statement, params).await })
        })
        .await
    }

    async fn execute<T>(&self, statement: &T, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Error>
    where
        T: ?Sized + ToStatement + AsStatement + Sync,
    {
        refuse_prepared(statement)?;
        self.with_transaction(TransactionOptions::new(), |tx| {
            Box::pin(async move { tx.execute(statement, params).await })
        })
        .await
    }

    async fn batch_execute(&self, sql: &str) -> Result<(), Error> {
        self.with_transaction(TransactionOptions::new(), |tx| {
            Box::pin(async move { tx.batch_execute(sql).await })
        })
        .await
    }
}

fn driver(e: tokio_postgres::Error) -> Error {
    Error::from_pg(e, Step::Statement)
}

/// The driver's clients and transactions: the same calls, errors converted to rowlock's.
macro_rules! driver_executor {
    ($($ty:ty => $inner:ty),* $(,)?) => {$(
        impl Executor for $ty {
            async fn query<T>(&self, statement: &T, params: &[&(dyn ToSql + Sync)])
                -> Result<Vec<Row>, Error>
            where
                T: ?Sized + ToStatement + AsStatement + Sync,
            {
                <$inner>::query(self, statement, params).await.map_err(driver)
            }

            async fn query_one<T>(&self, statement: &T, params: &[&(dyn ToSql + Sync)])
                -> Result<Row, Error>
            where
                T: ?Sized + ToStatement + AsStatement + Sync,
            {
                <$inner>::query_one(self, statement, params).await.map_err(driver)
            }

            async fn query_opt<T>(&self, statement: &T, params: &[&(dyn ToSql + Sync)])
                -> Result<Option<Row>, Error>
            where
                T: ?Sized + ToStatement + AsStatement + Sync,
            {
                <$inner>::query_opt(self, statement, params).await.map_err(driver)
            }

            async fn execute<T>(&self, statement: &T, params: &[&(dyn ToSql + Sync)])
                -> Result<u64, Error>
            where
                T: ?Sized + ToStatement + AsStatement + Sync,
            {
                <$inner>::execute(self, statement, params).await.map_err(driver)
            }

            async fn batch_execute(&self, sql: &str) -> Result<(), Error> {
                <$inner>::batch_execute(self, sql).await.map_err(driver)
            }
        }
    )*};
}

driver_executor!(
    tokio_postgres::Client => tokio_postgres::Client,
    tokio_postgres::Transaction<'_> => tokio_postgres::Transaction<'_>,
    deadpool_postgres::Object => tokio_postgres::Client,
    deadpool_postgres::Transaction<'_> => tokio_postgres::Transaction<'_>,
);
