//! Behind PgBouncer in transaction pooling mode: why `StatementCache::Transaction` exists, and
//! that it leaves nothing behind on the server connections.
//!
//! These tests start their own cluster with a PgBouncer in front (they need `pgbouncer`
//! installed; CI installs it). They build their pools by hand and set the statement cache per
//! call, so they do not change the process-wide default other tests run with.

use std::sync::Arc;

use rowlock::Db;
use rowlock::deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use rowlock::tokio_postgres::error::SqlState;
use rowlock::tokio_postgres::{Client, Config, NoTls};
use rowlock::{Lock, StatementCache, Transaction, TransactionOptions};
use rowlock_testing::{HarnessError, TestCluster};

use crate::support::{Account, AppError};

/// A cluster behind PgBouncer, or `None` (with a note) when `pgbouncer` is not installed.
fn cluster() -> Option<Arc<TestCluster>> {
    match TestCluster::start_behind_pgbouncer(None) {
        Ok(c) => Some(Arc::new(c)),
        Err(HarnessError::NoBinaries(why)) => {
            eprintln!("skipped: {why}");
            None
        }
        Err(e) => panic!("starting a cluster behind PgBouncer: {e}"),
    }
}

fn pool_of_one(config: &Config) -> Db {
    let manager = Manager::from_config(
        config.clone(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    // Behind PgBouncer, as the harness's handles are.
    Db::builder()
        .pool(Pool::builder(manager).max_size(1).build().unwrap())
        .statement_cache(rowlock::StatementCache::Transaction)
        .build()
        .unwrap()
}

async fn connect(config: &Config) -> Client {
    let (client, conn) = config.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

fn lock_options(cache: StatementCache) -> Lock {
    Lock::new().transaction(TransactionOptions::new().statement_cache(cache))
}

/// The server process running the transaction, asked with a statement from `prepare_cached`.
fn pid_cached(tx: &Transaction) -> rowlock::BoxFuture<'_, Result<i32, rowlock::Error>> {
    Box::pin(async move {
        let stmt = tx.prepare_cached("SELECT pg_backend_pid()").await?;
        Ok(tx.query_one(&stmt, &[]).await?.get(0))
    })
}

/// Prepared statements on the server connection this transaction runs on, not counting the
/// statement that asks.
async fn prepared_here(tx: &Transaction) -> Result<i64, rowlock::Error> {
    let row = tx
        .query_one(
            "SELECT count(*) FILTER (WHERE statement NOT LIKE '%pg_prepared_statements%')
             FROM pg_prepared_statements",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn connection_cached_statements_break_behind_pgbouncer_per_transaction_ones_do_not() {
    let Some(cluster) = cluster() else { return };
    let pg = cluster.create_database_owned().await.unwrap();
    pg.client()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO accounts VALUES (1, 100), (2, 100);",
        )
        .await
        .unwrap();
    let bouncer = pg.pgbouncer_config().expect("behind PgBouncer").clone();
    let db = pool_of_one(&bouncer);
    let per_tx = lock_options(StatementCache::Transaction);

    // 1. A statement is prepared and cached on the client connection; PgBouncer ran it on
    //    server connection X.
    let on_connection = TransactionOptions::new().statement_cache(StatementCache::Connection);
    let x = db
        .with_transaction(&on_connection, pid_cached)
        .await
        .unwrap();

    // 2. Another client takes X for a transaction of its own (it is the only idle server).
    let other = connect(&bouncer).await;
    other.batch_execute("BEGIN").await.unwrap();
    let held: i32 = other
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        held, x,
        "precondition: the other client holds server connection X"
    );

    // 3. The next transaction of the same client connection runs on a new server
    //    connection, where the cached statement does not exist: the transaction fails (a
    //    retryable stale statement; the cache is emptied, so a retry prepares it there).
    let err = db
        .with_transaction(&on_connection, pid_cached)
        .await
        .expect_err("a connection-cached statement is missing on another server connection");
    assert_eq!(
        err.sql_state(),
        Some(&SqlState::INVALID_SQL_STATEMENT_NAME),
        "{err}"
    );
    assert!(err.is_retryable(), "{err}");

    // 4. Per-transaction statements work on whichever server connection the transaction
    //    gets, including writes queued for COMMIT…
    let y = db
        .with_locked_row::<Account, _, rowlock::Error, _>(&1, &per_tx, |tx, acc| {
            Box::pin(async move {
                let stmt = tx
                    .prepare_cached("UPDATE accounts SET balance = $2 WHERE id = $1")
                    .await?;
                tx.execute_on_commit(&stmt, &[&acc.id, &(acc.balance + 1)])
                    .await?;
                Ok(tx
                    .query_one("SELECT pg_backend_pid()", &[])
                    .await?
                    .get::<_, i32>(0))
            })
        })
        .await
        .unwrap()
        .done()
        .expect("row 1 is free");
    assert_ne!(y, x, "ran on another server connection");

    // 5. …and leave no prepared statement behind on it.
    let opts = TransactionOptions::new().statement_cache(StatementCache::Transaction);
    let (pid, left) = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move {
                let pid: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
                Ok::<_, rowlock::Error>((pid, prepared_here(tx).await?))
            })
        })
        .await
        .unwrap();
    assert_eq!(pid, y, "still the same server connection");
    assert_eq!(
        left, 0,
        "statements were closed before the transactions ended"
    );

    other.batch_execute("COMMIT").await.unwrap();
    let balance = crate::support::balance(&pg.client().await.unwrap(), 1).await;
    assert_eq!(balance, 101, "the queued write committed once");
}

#[tokio::test]
async fn per_transaction_statements_are_reused_within_the_transaction_and_closed_at_rollback() {
    let Some(cluster) = cluster() else { return };
    let pg = cluster.create_database_owned().await.unwrap();
    // Direct to the server: the same connection every time, so leftovers would be visible.
    let db = pool_of_one(pg.config());
    let opts = TransactionOptions::new().statement_cache(StatementCache::Transaction);
    let err = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move {
                let a = tx.prepare_cached("SELECT 1").await?;
                let b = tx.prepare_cached("SELECT 1").await?;
                assert_eq!(a.columns().len(), b.columns().len());
                assert_eq!(prepared_here(tx).await?, 1, "prepared once, reused");
                tx.prepare_cached("SELECT 2").await?;
                assert_eq!(prepared_here(tx).await?, 2);
                Err::<(), _>(AppError::Conflict)
            })
        })
        .await;
    assert!(err.is_err());
    let left = db
        .with_transaction(&opts, |tx| Box::pin(prepared_here(tx)))
        .await
        .unwrap();
    assert_eq!(left, 0, "closed before ROLLBACK");
}
