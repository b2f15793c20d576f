//! A busy row inside the caller's own transaction: "lock User, then Wallet" with `NoWait` or a
//! lock timeout. The busy outcome comes back as what it is, and the transaction goes on.

use std::time::Duration;

use rowlock::tokio_postgres::{Error as PgError, Row};
use rowlock::{
    AdvisoryKey, Lock, LockMode, LockableRow, Outcome, Table, Transaction, TransactionOptions,
};

use crate::support::in_transaction;

#[derive(Debug)]
pub struct User {
    pub id: i64,
}

impl LockableRow for User {
    type Key = i64;
    const TABLE: Table = Table::new("users");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    fn from_row(row: &Row) -> Result<Self, PgError> {
        Ok(User {
            id: row.try_get("id")?,
        })
    }
    fn key(&self) -> i64 {
        self.id
    }
}

#[derive(Debug)]
pub struct Wallet {
    pub user_id: i64,
    pub cents: i64,
}

impl LockableRow for Wallet {
    type Key = i64;
    const TABLE: Table = Table::new("wallets");
    const KEY_COLUMNS: &'static [&'static str] = &["user_id"];
    fn from_row(row: &Row) -> Result<Self, PgError> {
        Ok(Wallet {
            user_id: row.try_get("user_id")?,
            cents: row.try_get("cents")?,
        })
    }
    fn key(&self) -> i64 {
        self.user_id
    }
}

pub async fn users_and_wallets() -> (rowlock_testing::TestDatabase, rowlock::Db) {
    crate::support::database(
        "CREATE TABLE users (id bigint PRIMARY KEY, last_paid timestamptz);
         CREATE TABLE wallets (user_id bigint PRIMARY KEY REFERENCES users, cents bigint);
         INSERT INTO users VALUES (1, NULL); INSERT INTO wallets VALUES (1, 500);",
        4,
    )
    .await
}

/// The seed's transfer: lock the user, then the wallet, then write. A busy row is an
/// outcome, returned as it is.
async fn pay(tx: &Transaction, opts: &Lock) -> Result<Outcome<i64>, rowlock::Error> {
    let Outcome::Done(user) = tx.lock_row::<User>(&1, opts).await? else {
        return Ok(Outcome::NotFound(vec![]));
    };
    let wallet = match tx.lock_row::<Wallet>(&user.id, opts).await? {
        Outcome::Done(wallet) => wallet,
        busy => {
            // The transaction is still usable after a busy row: note the attempt.
            tx.execute(
                "UPDATE users SET last_paid = now() WHERE id = $1",
                &[&user.id],
            )
            .await?;
            return Ok(busy.map(|_| 0));
        }
    };
    tx.execute(
        "UPDATE wallets SET cents = cents - 100 WHERE user_id = $1",
        &[&wallet.user_id],
    )
    .await?;
    Ok(Outcome::Done(wallet.cents - 100))
}

#[tokio::test]
async fn a_busy_wallet_with_nowait_is_the_busy_outcome_then_succeeds() {
    let (pg, db) = users_and_wallets().await;
    let holder = pg.client().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM wallets WHERE user_id = 1 FOR UPDATE")
        .await
        .unwrap();
    let nowait = Lock::no_wait();
    let opts = TransactionOptions::new();
    let first = nowait.clone();
    let outcome = db
        .with_transaction(&opts, move |tx| {
            let first = first.clone();
            Box::pin(async move { pay(tx, &first).await })
        })
        .await
        .expect("a busy row is not an error of the transaction");
    let Outcome::LockNotAvailable(e) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(e.is_lock_not_available(), "{e:?}");
    assert_eq!(e.sql_state().map(|s| s.code()), Some("55P03"));
    // What the transaction did after the busy row was committed.
    let paid: Option<std::time::SystemTime> = holder
        .query_one("SELECT last_paid FROM users WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert!(paid.is_some());

    holder.batch_execute("COMMIT").await.unwrap();
    let outcome = db
        .with_transaction(&opts, move |tx| {
            let nowait = nowait.clone();
            Box::pin(async move { pay(tx, &nowait).await })
        })
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Done(400)), "{outcome:?}");
    assert_eq!(in_transaction(&holder).await, 0);
}

#[tokio::test]
async fn a_lock_timeout_inside_your_transaction_leaves_it_usable() {
    let (pg, db) = users_and_wallets().await;
    let holder = pg.client().await.unwrap();
    holder
        .batch_execute(
            "BEGIN; SELECT * FROM wallets WHERE user_id = 1 FOR UPDATE;
             SELECT pg_advisory_xact_lock(42)",
        )
        .await
        .unwrap();
    let timeout = Lock::new().lock_timeout(Duration::from_millis(50));
    let outcome = db
        .with_transaction(&TransactionOptions::new(), move |tx| {
            let timeout = timeout.clone();
            Box::pin(async move { pay(tx, &timeout).await })
        })
        .await
        .unwrap();
    let Outcome::LockTimeout(e) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(e.is_lock_timeout(), "{e:?}");

    // A transaction whose own options set the lock timeout, waiting for an advisory lock.
    let opts = TransactionOptions::new().lock_timeout(Duration::from_millis(50));
    let rows = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move {
                let waited = tx
                    .advisory_lock(AdvisoryKey::single(42), LockMode::Wait)
                    .await?;
                assert!(matches!(waited, Outcome::LockTimeout(_)), "{waited:?}");
                tx.execute("UPDATE wallets SET cents = cents WHERE user_id = 0", &[])
                    .await
            })
        })
        .await
        .unwrap();
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn other_failures_still_abort_the_transaction() {
    let (_db, db) = users_and_wallets().await;
    // Not a lock failure: the caller's statement error aborts as before.
    let err = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move {
                let nowait = Lock::no_wait();
                let _ = tx.lock_row::<User>(&1, &nowait).await?;
                let _ = tx.execute("SELECT 1/0", &[]).await;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), rowlock::ErrorKind::TransactionAborted);
    assert_eq!(err.sql_state().map(|s| s.code()), Some("22012"));
}
