//! Shared fixtures: an `accounts` table and its row type, and db-hygiene checks.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use rowlock::Db;
use rowlock::tokio_postgres::{Client, Error as PgError, Row};
use rowlock::{LockableRow, Table};
use rowlock_testing::{TestCluster, TestDatabase};

pub const WAIT: Duration = Duration::from_secs(20);

/// A caller's own error type, as a service would have: its variants flow out of closures
/// unchanged; rowlock's errors convert into it.
#[derive(Debug)]
pub enum AppError {
    Insufficient,
    Conflict,
    #[allow(dead_code)] // carried for Debug output only
    Db(rowlock::Error),
}

impl From<rowlock::Error> for AppError {
    fn from(e: rowlock::Error) -> Self {
        AppError::Db(e)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: i64,
    pub balance: i64,
}

impl LockableRow for Account {
    type Key = i64;
    const TABLE: Table = Table::new("accounts");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    fn from_row(row: &Row) -> Result<Self, PgError> {
        Ok(Account {
            id: row.try_get("id")?,
            balance: row.try_get("balance")?,
        })
    }
    fn key(&self) -> i64 {
        self.id
    }
}

/// A seat of a show: a composite key of an integer and a text (table `seats`, which each
/// test creates with the column types it needs).
#[derive(rowlock::LockableRow, Debug)]
#[rowlock(table = "seats", key("show", "seat"))]
pub struct Seat {
    pub show: i32,
    pub seat: String,
}

/// A fresh database on which `schema` (any `;`-separated SQL) has run, and a db of
/// `pool_size` connections to it.
pub async fn database(schema: &str, pool_size: usize) -> (TestDatabase, Db) {
    let pg = TestCluster::shared()
        .expect("test cluster")
        .create_database()
        .await
        .expect("test database");
    pg.client()
        .await
        .unwrap()
        .batch_execute(schema)
        .await
        .unwrap();
    let db = pg.db(pool_size);
    (pg, db)
}

/// The notes of the `audit` table, in order, read through any executor.
pub async fn notes(pg: &impl rowlock::Executor) -> Vec<String> {
    pg.query("SELECT note FROM audit ORDER BY note", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A fresh database with `accounts` rows 1..=n, each with balance 100.
pub async fn accounts(n: i64) -> (TestDatabase, Db) {
    let pg = TestCluster::shared()
        .expect("test cluster")
        .create_database()
        .await
        .expect("test database");
    let client = pg.client().await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
             CREATE TABLE audit (account_id bigint REFERENCES accounts (id), note text UNIQUE);",
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO accounts SELECT g, 100 FROM generate_series(1, $1::int8) g",
            &[&n],
        )
        .await
        .unwrap();
    let db = pg.db(8);
    (pg, db)
}

/// The pid of the server process behind a pooled connection.
pub async fn backend_pid(db: &Db) -> i32 {
    db.pool()
        .get()
        .await
        .unwrap()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

pub async fn balance(client: &Client, id: i64) -> i64 {
    client
        .query_one("SELECT balance FROM accounts WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

/// Sessions of this database, other than `observer`, that are inside a transaction.
pub async fn in_transaction(observer: &Client) -> i64 {
    observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND state LIKE 'idle in transaction%'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// True if another session can lock row `id` at once (NOWAIT) right now.
pub async fn lockable_now(client: &mut Client, id: i64) -> bool {
    let tx = client.transaction().await.unwrap();
    let ok = tx
        .query(
            "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE NOWAIT",
            &[&id],
        )
        .await
        .is_ok();
    tx.rollback().await.unwrap();
    ok
}

/// Polls `inner` at most `limit` times; returns `None` (dropping `inner`) if it has not
/// completed by then.
pub struct PollLimit<F> {
    inner: Pin<Box<F>>,
    remaining: usize,
}

pub fn poll_limit<F: Future>(inner: F, limit: usize) -> PollLimit<F> {
    PollLimit {
        inner: Box::pin(inner),
        remaining: limit,
    }
}

impl<F: Future> Future for PollLimit<F> {
    type Output = Option<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        self.remaining -= 1;
        self.inner.as_mut().poll(cx).map(Some)
    }
}

/// The keys an outcome names, as their `Debug` prints them.
pub fn keys(rows: &[rowlock::RowRef]) -> Vec<String> {
    rows.iter().map(|r| r.key.clone()).collect()
}
