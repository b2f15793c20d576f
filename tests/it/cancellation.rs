//! Dropping the future at every poll: the connection that goes back to the pool is never
//! inside a transaction, and the row can be locked at once by another session.

use rowlock::testing::wait_for_blocked_by;
use rowlock::{
    LockOptions, Transaction, TransactionOptions, with_locked_row, with_locked_rows,
    with_transaction,
};

use crate::support::{Account, WAIT, accounts, balance, in_transaction, lockable_now, poll_limit};

/// Drives `make(n)` with at most n polls for n = 0, 1, 2, … until one run completes, checking
/// pool hygiene after each cancelled run. Returns how many runs were cancelled.
macro_rules! cancel_at_every_poll {
    ($db:expr, $pool:expr, $make:expr) => {{
        let mut other = $db.client().await.unwrap();
        let mut cancelled = 0;
        for n in 0.. {
            let done = poll_limit($make, n).await;
            // With a one-connection pool, this waits until cleanup handed the connection
            // back (or closed it), so the checks below see the settled state.
            drop(
                tokio::time::timeout(WAIT, $pool.get())
                    .await
                    .expect("pool slot")
                    .unwrap(),
            );
            assert_eq!(in_transaction(&other).await, 0, "after {n} polls");
            assert!(
                lockable_now(&mut other, 1).await,
                "row lockable at once after {n} polls"
            );
            match done {
                Some(result) => {
                    let _done = result.expect("the uncancelled run succeeds");
                    break;
                }
                None => cancelled += 1,
            }
            assert!(n < 1000, "never completed");
        }
        assert!(cancelled >= 2, "the future had await points to cancel at");
        cancelled
    }};
}

#[tokio::test]
async fn with_locked_row_cancelled_at_every_poll() {
    let (db, pool) = accounts(1).await;
    let pool = {
        drop(pool);
        db.pool(1)
    };
    cancel_at_every_poll!(db, pool, {
        let pool = pool.clone();
        async move {
            with_locked_row(&pool, &1, &LockOptions::new(), |tx, acc: Account| {
                Box::pin(async move {
                    tx.execute(
                        "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                        &[&acc.id],
                    )
                    .await?;
                    tx.execute("INSERT INTO audit VALUES ($1, NULL)", &[&acc.id])
                        .await?;
                    Ok::<_, rowlock::Error>(())
                })
            })
            .await
        }
    });
    let client = db.client().await.unwrap();
    // Exactly one run committed: cancelled runs left nothing behind... unless COMMIT itself
    // was in flight when dropped, which commits. Audit rows count the committed runs, and the
    // balance must agree with them.
    let audits: i64 = client
        .query_one("SELECT count(*) FROM audit", &[])
        .await
        .unwrap()
        .get(0);
    assert!(audits >= 1);
    assert_eq!(balance(&client, 1).await, 100 + audits);
}

#[tokio::test]
async fn with_locked_rows_cancelled_at_every_poll() {
    let (db, _) = accounts(3).await;
    let pool = db.pool(1);
    cancel_at_every_poll!(db, pool, {
        let pool = pool.clone();
        async move {
            with_locked_rows(
                &pool,
                &[3, 1],
                &LockOptions::new(),
                |tx, rows: Vec<Account>| {
                    Box::pin(async move {
                        let stmt = tx
                            .prepare_cached(
                                "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                            )
                            .await?;
                        for acc in &rows {
                            tx.execute_on_commit(&stmt, vec![Box::new(acc.id)]);
                        }
                        Ok::<_, rowlock::Error>(())
                    })
                },
            )
            .await
        }
    });
    let client = db.client().await.unwrap();
    assert_eq!(
        balance(&client, 1).await,
        balance(&client, 3).await,
        "all or nothing"
    );
}

#[tokio::test]
async fn with_transaction_cancelled_at_every_poll() {
    let (db, _) = accounts(1).await;
    let pool = db.pool(1);
    cancel_at_every_poll!(db, pool, {
        let pool = pool.clone();
        async move {
            with_transaction(&pool, &TransactionOptions::new(), |tx| {
                Box::pin(async move {
                    tx.query("SELECT * FROM accounts WHERE id = 1 FOR UPDATE", &[])
                        .await?;
                    tx.execute("UPDATE accounts SET balance = balance + 1", &[])
                        .await?;
                    Ok::<_, rowlock::Error>(())
                })
            })
            .await
        }
    });
}

#[tokio::test]
async fn dropping_a_call_blocked_on_a_lock_cancels_the_wait() {
    let (db, _) = accounts(1).await;
    let pool = db.pool(1);
    let observer = db.client().await.unwrap();
    let holder = db.session().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM accounts WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let call = tokio::spawn({
        let pool = pool.clone();
        async move {
            with_locked_row(&pool, &1, &LockOptions::new(), |_, _: Account| {
                Box::pin(async { Ok::<_, rowlock::Error>(()) })
            })
            .await
        }
    });
    wait_for_blocked_by(&observer, holder.pid(), 1, WAIT)
        .await
        .unwrap();
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    // The holder still holds its lock, so only a cancel request can end the wait; once it
    // has, the cleaned connection returns to the one-slot pool.
    let conn = tokio::time::timeout(WAIT, pool.get())
        .await
        .expect("the waiting statement was cancelled and the connection returned")
        .unwrap();
    let blocked: i64 = observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            &[&holder.pid()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(blocked, 0, "nobody waits behind the holder any more");
    conn.batch_execute("SELECT 1").await.unwrap();
    drop(conn);
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(in_transaction(&observer).await, 0);
}

#[tokio::test]
async fn dropping_a_transaction_with_a_statement_in_flight_cleans_up() {
    let (db, _) = accounts(1).await;
    let pool = db.pool(1);
    let observer = db.client().await.unwrap();
    let tx = Transaction::begin(&pool, &TransactionOptions::new())
        .await
        .unwrap();
    tx.execute("UPDATE accounts SET balance = 0 WHERE id = 1", &[])
        .await
        .unwrap();
    let slow = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        tx.execute("SELECT pg_sleep(60)", &[]),
    )
    .await;
    assert!(slow.is_err(), "the statement was still running");
    drop(tx);
    let conn = tokio::time::timeout(WAIT, pool.get())
        .await
        .expect("cleanup finished")
        .unwrap();
    let sleeping: i64 = observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'SELECT pg_sleep%'
               AND state = 'active'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sleeping, 0, "the in-flight statement was cancelled");
    assert_eq!(in_transaction(&observer).await, 0);
    assert_eq!(balance(&observer, 1).await, 100);
    drop(conn);
}
