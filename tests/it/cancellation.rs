//! Dropping the future at every poll: the connection that goes back to the db is never
//! inside a transaction, and the row can be locked at once by another session.

use std::sync::Arc;

use rowlock::tokio_postgres::Client;
use rowlock::{Claim, Direction, Lock, Outcome, StatementCache, TransactionOptions, Transition};
use rowlock_testing::wait_for_blocked_by;
use tokio::sync::Notify;

use crate::support::{Account, WAIT, accounts, balance, in_transaction, lockable_now, poll_limit};

/// Drives `make(n)` with at most n polls for n = 0, 1, 2, … until one run completes, checking
/// db hygiene after each cancelled run. Returns how many runs were cancelled.
macro_rules! cancel_at_every_poll {
    ($pg:expr, $db:expr, $make:expr) => {{
        let mut other = $pg.client().await.unwrap();
        let mut cancelled = 0;
        for n in 0.. {
            let done = poll_limit($make, n).await;
            // With a one-connection db, this waits until cleanup handed the connection
            // back (or closed it), so the checks below see the settled state.
            drop(
                tokio::time::timeout(WAIT, $db.pool().get())
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
    let (pg, db) = accounts(1).await;
    let db = {
        drop(db);
        pg.db(1)
    };
    cancel_at_every_poll!(pg, db, {
        let db = db.clone();
        async move {
            db.with_locked_row(&1, &Lock::new(), |tx, acc: Account| {
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
    let client = pg.client().await.unwrap();
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
    let (pg, _) = accounts(3).await;
    let db = pg.db(1);
    cancel_at_every_poll!(pg, db, {
        let db = db.clone();
        async move {
            db.with_locked_rows(&[3, 1], &Lock::new(), |tx, rows: Vec<Account>| {
                Box::pin(async move {
                    let stmt = tx
                        .prepare_cached("UPDATE accounts SET balance = balance + 1 WHERE id = $1")
                        .await?;
                    for acc in &rows {
                        tx.execute_on_commit(&stmt, &[&acc.id]).await?;
                    }
                    Ok::<_, rowlock::Error>(())
                })
            })
            .await
        }
    });
    let client = pg.client().await.unwrap();
    assert_eq!(
        balance(&client, 1).await,
        balance(&client, 3).await,
        "all or nothing"
    );
}

#[tokio::test]
async fn with_transaction_cancelled_at_every_poll() {
    let (pg, _) = accounts(1).await;
    let db = pg.db(1);
    cancel_at_every_poll!(pg, db, {
        let db = db.clone();
        async move {
            db.with_transaction(&TransactionOptions::new(), |tx| {
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
    let (pg, _) = accounts(1).await;
    let db = pg.db(1);
    let observer = pg.client().await.unwrap();
    let holder = pg.session().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM accounts WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let call = tokio::spawn({
        let db = db.clone();
        async move {
            db.with_locked_row(&1, &Lock::new(), |_, _: Account| {
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
    // has, the cleaned connection returns to the one-slot db.
    let conn = tokio::time::timeout(WAIT, db.pool().get())
        .await
        .expect("the waiting statement was cancelled and the connection returned")
        .unwrap();
    assert_eq!(
        blocked_behind(&observer, holder.pid()).await,
        0,
        "nobody waits behind the holder any more"
    );
    conn.batch_execute("SELECT 1").await.unwrap();
    drop(conn);
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(in_transaction(&observer).await, 0);
}

#[tokio::test]
async fn dropping_a_transaction_with_a_statement_in_flight_cleans_up() {
    let (pg, _) = accounts(1).await;
    let db = pg.db(1);
    let observer = pg.client().await.unwrap();
    let tx = db.begin(&TransactionOptions::new()).await.unwrap();
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
    let conn = tokio::time::timeout(WAIT, db.pool().get())
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

/// A call dropped while its `COMMIT` runs (here a deferred trigger that sleeps; in production a
/// wait for a synchronous standby): the `COMMIT` is cancelled like any statement in flight, so
/// the transaction rolls back, and the one connection of the pool serves the next call.
#[tokio::test]
async fn a_call_dropped_while_its_commit_runs_keeps_nothing() {
    let (pg, _) = accounts(1).await;
    let db = pg.db(1);
    let observer = pg.client().await.unwrap();
    observer
        .batch_execute(
            "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep(60); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON audit
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();",
        )
        .await
        .unwrap();
    let call = db.with_locked_row(&1, Lock::new(), |tx, acc: Account| {
        Box::pin(async move {
            tx.execute("UPDATE accounts SET balance = 0 WHERE id = $1", &[&acc.id])
                .await?;
            tx.execute("INSERT INTO audit VALUES ($1, NULL)", &[&acc.id])
                .await?;
            Ok::<_, rowlock::Error>(())
        })
    });
    // Dropped once the server shows the COMMIT running (in the trigger's sleep).
    let committing = async {
        loop {
            let n: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND query = 'COMMIT'
                       AND state = 'active' AND wait_event = 'PgSleep'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if n == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    };
    tokio::select! {
        result = call => panic!("the call finished during a 60 s commit: {result:?}"),
        seen = tokio::time::timeout(WAIT, committing) => seen.expect("the COMMIT was seen running"),
    }
    let outcome = tokio::time::timeout(
        WAIT,
        db.with_locked_row(&1, &Lock::no_wait(), |_, acc: Account| {
            Box::pin(async move { Ok::<_, rowlock::Error>(acc.balance) })
        }),
    )
    .await
    .expect("the next call is not held up by the dropped commit")
    .unwrap();
    assert!(matches!(outcome, Outcome::Done(100)), "{outcome:?}");
    let audits: i64 = observer
        .query_one("SELECT count(*) FROM audit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(audits, 0, "the cancelled commit kept nothing");
    assert_eq!(in_transaction(&observer).await, 0);
}

/// With statements prepared per transaction (the PgBouncer setting), the server process to
/// cancel comes in `BEGIN`'s reply. A call dropped before it read that reply (here: polled
/// once, so `BEGIN` and the claim's prepare were sent, then never again while the prepare
/// waits for the table lock) must still cancel what it sent: the cleanup reads the reply
/// first. Before, nothing was cancelled, and the statement waited on the server until the
/// lock holder finished.
#[tokio::test]
async fn a_call_dropped_before_reading_begins_reply_still_cancels_its_statement() {
    let (pg, _) = accounts(2).await;
    let db = pg.db(1);
    let observer = pg.client().await.unwrap();
    let holder = pg.session().await.unwrap();
    holder
        .batch_execute("BEGIN; LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // An idle connection in the pool: the call's first poll checks it out at once.
    drop(db.pool().get().await.unwrap());
    let claim = Claim::new()
        .order_by("id", Direction::Asc)
        .mark("balance = balance - 1", vec![])
        .transaction(TransactionOptions::new().statement_cache(StatementCache::Transaction));
    let mut call = Box::pin(db.claim_and_mark::<Account>(&claim, 2));
    assert!(
        futures_util::poll!(call.as_mut()).is_pending(),
        "the first poll sends BEGIN and the prepare, then waits"
    );
    wait_for_blocked_by(&observer, holder.pid(), 1, WAIT)
        .await
        .unwrap();
    drop(call);
    next_caller_runs_and_nothing_waits(&db, &observer, holder.pid()).await;
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(balance(&observer, 1).await, 100, "nothing was marked");
    assert_eq!(in_transaction(&observer).await, 0);
}

/// After a call was dropped while its statement waited for `holder`'s lock: unrelated work
/// on the one pooled connection runs at once, and no statement still waits behind `holder`
/// (the dropped one was cancelled, not left waiting for the lock).
async fn next_caller_runs_and_nothing_waits(db: &rowlock::Db, observer: &Client, holder: i32) {
    let next = tokio::time::timeout(WAIT, async {
        let conn = db.pool().get().await.unwrap();
        conn.query_one("SELECT count(*) FROM audit", &[]).await
    })
    .await
    .expect("the next caller is not held up by the dropped call's statement")
    .unwrap();
    assert_eq!(next.get::<_, i64>(0), 0);
    assert_eq!(
        blocked_behind(observer, holder).await,
        0,
        "the dropped call's statement was cancelled, not left waiting for the lock"
    );
}

/// Sessions of this database waiting for a lock that `holder` holds.
async fn blocked_behind(observer: &Client, holder: i32) -> i64 {
    observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            &[&holder],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_dropped_transition_waiting_for_a_lock_does_not_hold_up_the_next_caller() {
    let (pg, _) = accounts(2).await;
    let db = pg.db(1);
    let observer = pg.client().await.unwrap();
    let holder = pg.session().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM accounts WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let add = Transition::new("balance = balance + 1");
    let call = tokio::spawn({
        let (db, add) = (db.clone(), add.clone());
        async move { db.transition::<Account>(&1, &add, &[]).await }
    });
    wait_for_blocked_by(&observer, holder.pid(), 1, WAIT)
        .await
        .unwrap();
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    // The holder keeps its lock throughout: if the dropped call's connection went back to the
    // one-slot db with its statement still waiting, this call would wait behind it.
    let next = tokio::time::timeout(WAIT, db.transition::<Account>(&2, &add, &[]))
        .await
        .expect("the next caller is not held up by the dropped call's statement")
        .unwrap();
    assert!(matches!(
        next,
        Outcome::Done(Account {
            id: 2,
            balance: 101
        })
    ));
    assert_eq!(blocked_behind(&observer, holder.pid()).await, 0);
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        balance(&observer, 1).await,
        100,
        "the cancelled statement changed nothing"
    );
    assert_eq!(in_transaction(&observer).await, 0);
}

#[tokio::test]
async fn a_dropped_claim_and_mark_waiting_for_a_lock_does_not_hold_up_the_next_caller() {
    let (pg, _) = accounts(2).await;
    let db = pg.db(1);
    let observer = pg.client().await.unwrap();
    let holder = pg.session().await.unwrap();
    holder
        .batch_execute("BEGIN; LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let claim = Claim::new()
        .order_by("id", Direction::Asc)
        .mark("balance = balance - 1", vec![]);
    let call = tokio::spawn({
        let db = db.clone();
        async move { db.claim_and_mark::<Account>(&claim, 2).await }
    });
    wait_for_blocked_by(&observer, holder.pid(), 1, WAIT)
        .await
        .unwrap();
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    next_caller_runs_and_nothing_waits(&db, &observer, holder.pid()).await;
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        balance(&observer, 1).await,
        100,
        "the cancelled claim marked nothing"
    );
    assert_eq!(
        balance(&observer, 2).await,
        100,
        "the cancelled claim marked nothing"
    );
}

#[tokio::test]
async fn a_row_is_free_at_once_after_a_call_dropped_between_statements() {
    let (pg, _) = accounts(1).await;
    let db = pg.db(4);
    let (wait, no_wait) = (Lock::new(), Lock::no_wait());
    for round in 0..50 {
        let locked = Arc::new(Notify::new());
        let call = db.with_locked_row(&1, &wait, {
            let locked = locked.clone();
            move |_, _: Account| {
                let locked = locked.clone();
                Box::pin(async move {
                    locked.notify_one();
                    std::future::pending::<()>().await;
                    Ok::<_, rowlock::Error>(())
                })
            }
        });
        // Run the call until its closure holds the row, then drop it there: no statement
        // is in flight.
        tokio::select! {
            _ = call => unreachable!("the closure never finishes"),
            () = locked.notified() => {}
        }
        let relock = db
            .with_locked_row(&1, &no_wait, |_, acc: Account| {
                Box::pin(async move { Ok::<_, rowlock::Error>(acc.id) })
            })
            .await
            .unwrap();
        assert_eq!(
            relock.done(),
            Some(1),
            "round {round}: the row is free at once"
        );
    }
}
