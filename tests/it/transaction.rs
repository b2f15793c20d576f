//! with_transaction and the transaction guard: options, pipelined commit, error tracking.

use std::time::Duration;

use rowlock::tokio_postgres::error::SqlState;
use rowlock::{ErrorKind, Isolation, TransactionOptions};

use crate::support::{accounts, balance, in_transaction};

#[tokio::test]
async fn commit_on_ok_rollback_on_err() {
    let (pg, db) = accounts(2).await;
    let other = pg.client().await.unwrap();
    let n: u64 = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move { tx.execute("UPDATE accounts SET balance = 1", &[]).await })
        })
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(balance(&other, 1).await, 1);
    let err = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move {
                tx.execute("UPDATE accounts SET balance = 2", &[]).await?;
                Err::<(), _>(
                    rowlock::Outcome::<()>::NotFound(vec![])
                        .into_result()
                        .unwrap_err(),
                )
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RowNotFound);
    assert_eq!(balance(&other, 1).await, 1);
    assert_eq!(in_transaction(&other).await, 0);
}

#[tokio::test]
async fn options_reach_the_server() {
    let (_db, db) = accounts(1).await;
    let opts = TransactionOptions::new()
        .isolation(Isolation::Serializable)
        .read_only(true)
        .deferrable(true)
        .lock_timeout(Duration::from_millis(1234))
        .statement_timeout(Duration::from_secs(7));
    let settings = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move {
                let row = tx
                    .query_one(
                        "SELECT current_setting('transaction_isolation'),
                            current_setting('transaction_read_only'),
                            current_setting('transaction_deferrable'),
                            current_setting('lock_timeout'),
                            current_setting('statement_timeout')",
                        &[],
                    )
                    .await?;
                Ok::<_, rowlock::Error>((0..5).map(|i| row.get::<_, String>(i)).collect::<Vec<_>>())
            })
        })
        .await
        .unwrap();
    assert_eq!(settings, ["serializable", "on", "on", "1234ms", "7s"]);
    // SET LOCAL ended with the transaction: the pooled session is back to defaults.
    let after = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move {
                let row = tx
                    .query_one("SELECT current_setting('lock_timeout')", &[])
                    .await?;
                Ok::<String, rowlock::Error>(row.get(0))
            })
        })
        .await
        .unwrap();
    assert_eq!(after, "0");
    let err = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move { tx.execute("UPDATE accounts SET balance = 0", &[]).await })
        })
        .await
        .unwrap_err();
    assert_eq!(err.sql_state(), Some(&SqlState::READ_ONLY_SQL_TRANSACTION));
}

#[tokio::test]
async fn statement_timeout_is_its_own_kind() {
    let (_db, db) = accounts(1).await;
    let opts = TransactionOptions::new().statement_timeout(Duration::from_millis(50));
    let err = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move { tx.execute("SELECT pg_sleep(10)", &[]).await })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StatementTimeout, "{err}");
    assert_eq!(err.sql_state(), Some(&SqlState::QUERY_CANCELED));
}

#[tokio::test]
async fn a_failing_queued_write_fails_the_commit_and_nothing_is_kept() {
    let (pg, db) = accounts(2).await;
    let other = pg.client().await.unwrap();
    let err = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move {
                tx.execute("UPDATE accounts SET balance = 5 WHERE id = 1", &[])
                    .await?;
                let ins = tx
                    .prepare_cached("INSERT INTO audit VALUES ($1, $2)")
                    .await?;
                tx.execute_on_commit(&ins, vec![Box::new(1_i64), Box::new("dup")]);
                tx.execute_on_commit(&ins, vec![Box::new(2_i64), Box::new("dup")]);
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.sql_state(), Some(&SqlState::UNIQUE_VIOLATION), "{err}");
    assert_eq!(balance(&other, 1).await, 100);
    let audits: i64 = other
        .query_one("SELECT count(*) FROM audit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(audits, 0);
    assert_eq!(in_transaction(&other).await, 0);
}

#[tokio::test]
async fn queued_writes_alone_commit_in_one_flush_with_begin() {
    let (pg, db) = accounts(1).await;
    let other = pg.client().await.unwrap();
    // Prepare outside the transaction so the statement is cached on the pooled connection.
    {
        let conn = db.pool().get().await.unwrap();
        conn.prepare_cached("UPDATE accounts SET balance = $2 WHERE id = $1")
            .await
            .unwrap();
    }
    let tx = db.begin(&TransactionOptions::new()).await.unwrap();
    let stmt = tx
        .prepare_cached("UPDATE accounts SET balance = $2 WHERE id = $1")
        .await
        .unwrap();
    tx.execute_on_commit(&stmt, vec![Box::new(1_i64), Box::new(77_i64)]);
    tx.commit().await.unwrap();
    assert_eq!(balance(&other, 1).await, 77);
}

#[tokio::test]
async fn error_on_the_raw_client_is_caught_at_commit() {
    let (pg, db) = accounts(1).await;
    let other = pg.client().await.unwrap();
    let tx = db.begin(&TransactionOptions::new()).await.unwrap();
    tx.execute("UPDATE accounts SET balance = 3", &[])
        .await
        .unwrap();
    let raw = tx.client().await.unwrap();
    assert!(
        raw.batch_execute("SELECT no_such_column FROM accounts")
            .await
            .is_err()
    );
    let err = tx.commit().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TransactionAborted, "{err}");
    assert_eq!(balance(&other, 1).await, 100);
    assert_eq!(in_transaction(&other).await, 0);
}

#[tokio::test]
async fn commit_error_from_the_server_is_reported() {
    let (pg, db) = accounts(1).await;
    let other = pg.client().await.unwrap();
    other
        .batch_execute(
            "ALTER TABLE audit DROP CONSTRAINT audit_note_key;
             ALTER TABLE audit ADD CONSTRAINT audit_note_key UNIQUE (note)
                 DEFERRABLE INITIALLY DEFERRED",
        )
        .await
        .unwrap();
    let err = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move {
                tx.execute("INSERT INTO audit VALUES (1, 'x'), (1, 'x')", &[])
                    .await?;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.sql_state(), Some(&SqlState::UNIQUE_VIOLATION), "{err}");
    let audits: i64 = other
        .query_one("SELECT count(*) FROM audit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(audits, 0);
}
