//! Retries against real conflicts: serialization failures, deadlocks, swallowed errors, and
//! commits whose outcome is unknown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rowlock::tokio_postgres::error::SqlState;
use rowlock::{
    CommitStatus, ErrorKind, Isolation, Lock, Outcome, RetryPolicy, Transaction, TransactionOptions,
};
use rowlock_testing::{TestCluster, wait_for_blocked_by};
use tokio::sync::Barrier;

use crate::support::{Account, AppError, WAIT, accounts, balance};

const RAISE_40001: &str =
    "DO $$ BEGIN RAISE EXCEPTION 'forced conflict' USING ERRCODE = '40001'; END $$";

fn serializable() -> TransactionOptions {
    TransactionOptions::new().isolation(Isolation::Serializable)
}

/// Doctors on call; each task takes itself off call only if someone else stays on call.
async fn doctors(n: i64) -> (rowlock_testing::TestDatabase, rowlock::Db) {
    let (pg, _) = accounts(0).await;
    pg.client()
        .await
        .unwrap()
        .batch_execute(&format!(
            "CREATE TABLE doctors (id bigint PRIMARY KEY, on_call bool NOT NULL);
             INSERT INTO doctors SELECT g, true FROM generate_series(1, {n}) g;"
        ))
        .await
        .unwrap();
    let db = pg.db(n as usize + 2);
    (pg, db)
}

/// The write-skew transaction. On the first attempt every task reads before any writes
/// (the barrier), which is exactly the interleaving SERIALIZABLE must refuse.
fn go_off_call(
    id: i64,
    barrier: Arc<Barrier>,
    first: Arc<AtomicU32>,
) -> impl for<'t> FnMut(&'t Transaction) -> rowlock::BoxFuture<'t, Result<bool, rowlock::Error>> {
    move |tx| {
        let barrier = barrier.clone();
        let first_attempt = first.fetch_add(1, Ordering::SeqCst) == 0;
        Box::pin(async move {
            let on_call: i64 = tx
                .query_one("SELECT count(*) FROM doctors WHERE on_call", &[])
                .await?
                .get(0);
            if first_attempt {
                tokio::time::timeout(WAIT, barrier.wait())
                    .await
                    .expect("every task reaches the barrier");
            }
            if on_call > 1 {
                tx.execute("UPDATE doctors SET on_call = false WHERE id = $1", &[&id])
                    .await?;
                return Ok(true);
            }
            Ok(false)
        })
    }
}

#[tokio::test]
async fn write_skew_without_retries_is_refused_with_40001() {
    let n = 6;
    let (pg, db) = doctors(n).await;
    let barrier = Arc::new(Barrier::new(n as usize));
    let tasks: Vec<_> = (1..=n)
        .map(|id| {
            let (db, barrier) = (db.clone(), barrier.clone());
            tokio::spawn(async move {
                let mut f = go_off_call(id, barrier, Arc::new(AtomicU32::new(0)));
                db.with_transaction(&serializable(), move |tx| f(tx)).await
            })
        })
        .collect();
    let mut failures = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::SerializationFailure, "{e}");
                assert_eq!(e.sql_state(), Some(&SqlState::T_R_SERIALIZATION_FAILURE));
                failures += 1;
            }
        }
    }
    assert!(
        failures >= 1,
        "SERIALIZABLE must refuse some of the skewed transactions"
    );
    let on_call: i64 = pg
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM doctors WHERE on_call", &[])
        .await
        .unwrap()
        .get(0);
    assert!(on_call >= 1, "the invariant holds either way");
}

#[tokio::test]
async fn write_skew_with_retries_all_succeed_and_the_result_is_serial() {
    let n = 6;
    let (pg, db) = doctors(n).await;
    let barrier = Arc::new(Barrier::new(n as usize));
    let retries = Arc::new(AtomicU32::new(0));
    let policy = {
        let retries = retries.clone();
        RetryPolicy::new().max_attempts(30).on_retry(move |e| {
            assert_eq!(e.sql_state, Some(SqlState::T_R_SERIALIZATION_FAILURE));
            retries.fetch_add(1, Ordering::SeqCst);
        })
    };
    let tasks: Vec<_> = (1..=n)
        .map(|id| {
            let (db, barrier, policy) = (db.clone(), barrier.clone(), policy.clone());
            tokio::spawn(async move {
                let f = go_off_call(id, barrier, Arc::new(AtomicU32::new(0)));
                db.with_transaction(serializable().retry(&policy), f).await
            })
        })
        .collect();
    let mut went_off = 0;
    for task in tasks {
        if task.await.unwrap().expect("every task eventually commits") {
            went_off += 1;
        }
    }
    assert!(
        retries.load(Ordering::SeqCst) >= 1,
        "conflicts happened and were retried"
    );
    let on_call: i64 = pg
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM doctors WHERE on_call", &[])
        .await
        .unwrap()
        .get(0);
    // Serially, all but one doctor go off call.
    assert_eq!(on_call, 1);
    assert_eq!(went_off, n - 1);
}

#[tokio::test]
async fn deadlocks_are_retried_until_both_succeed() {
    let (pg, db) = accounts(2).await;
    let barrier = Arc::new(Barrier::new(2));
    let attempts = Arc::new(AtomicU32::new(0));
    let deadlocks = Arc::new(AtomicU32::new(0));
    let policy = {
        let deadlocks = deadlocks.clone();
        RetryPolicy::new().on_retry(move |e| {
            assert_eq!(e.kind, ErrorKind::Deadlock);
            deadlocks.fetch_add(1, Ordering::SeqCst);
        })
    };
    let run = |first: i64, second: i64| {
        let (db, barrier, attempts, policy) = (
            db.clone(),
            barrier.clone(),
            attempts.clone(),
            policy.clone(),
        );
        tokio::spawn(async move {
            let mut mine = 0;
            db.with_transaction(TransactionOptions::new().retry(&policy), move |tx| {
                mine += 1;
                attempts.fetch_add(1, Ordering::SeqCst);
                let barrier = barrier.clone();
                let wait = mine == 1;
                Box::pin(async move {
                    let stmt = "UPDATE accounts SET balance = balance + 1 WHERE id = $1";
                    tx.execute(stmt, &[&first]).await?;
                    if wait {
                        tokio::time::timeout(WAIT, barrier.wait())
                            .await
                            .expect("every task reaches the barrier"); // both hold their first row
                    }
                    tx.execute(stmt, &[&second]).await?;
                    Ok::<_, rowlock::Error>(())
                })
            })
            .await
        })
    };
    let (a, b) = tokio::join!(run(1, 2), run(2, 1));
    a.unwrap().unwrap();
    b.unwrap().unwrap();
    assert_eq!(
        deadlocks.load(Ordering::SeqCst),
        1,
        "exactly one victim, retried once"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    let client = pg.client().await.unwrap();
    assert_eq!(balance(&client, 1).await, 102);
    assert_eq!(balance(&client, 2).await, 102);
}

#[tokio::test]
async fn a_swallowed_serialization_failure_is_retried_not_committed() {
    let (pg, db) = accounts(1).await;
    let calls = Arc::new(AtomicU32::new(0));
    let result = db
        .with_transaction(TransactionOptions::new().retry(RetryPolicy::new()), {
            let calls = calls.clone();
            move |tx| {
                let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
                Box::pin(async move {
                    tx.execute("UPDATE accounts SET balance = balance + 1", &[])
                        .await?;
                    if call == 1 {
                        let _ignored = tx.batch_execute(RAISE_40001).await; // swallowed
                    }
                    Ok::<_, rowlock::Error>(call)
                })
            }
        })
        .await
        .unwrap();
    assert_eq!(result, 2, "the first attempt was not reported committed");
    let client = pg.client().await.unwrap();
    assert_eq!(
        balance(&client, 1).await,
        101,
        "only the second attempt's write is kept"
    );

    // Mapped into the caller's own error type: still retried, because the server said 40001.
    let calls = Arc::new(AtomicU32::new(0));
    let result = db
        .with_transaction(TransactionOptions::new().retry(RetryPolicy::new()), {
            let calls = calls.clone();
            move |tx| {
                let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
                Box::pin(async move {
                    if call == 1 && tx.batch_execute(RAISE_40001).await.is_err() {
                        return Err(AppError::Conflict);
                    }
                    Ok(call)
                })
            }
        })
        .await;
    assert!(matches!(result, Ok(2)), "{result:?}");
}

/// A statement on the raw client fails with 40001: rowlock did not run it, so it is retried
/// only when the closure reports it through `Transaction::client_error`.
#[tokio::test]
async fn a_raw_client_serialization_failure_is_retried_once_reported() {
    let (pg, db) = accounts(1).await;
    let client = pg.client().await.unwrap();
    for report in [true, false] {
        let calls = Arc::new(AtomicU32::new(0));
        let result = db
            .with_transaction(TransactionOptions::new().retry(RetryPolicy::new()), {
                let calls = calls.clone();
                move |tx| {
                    let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    Box::pin(async move {
                        tx.execute("UPDATE accounts SET balance = balance + 1", &[])
                            .await?;
                        if call == 1 {
                            let raised = tx.client().await?.batch_execute(RAISE_40001).await;
                            raised.map_err(|e| {
                                if report {
                                    tx.client_error(e)
                                } else {
                                    // Wrapped without telling the transaction.
                                    rowlock::Error::decode(e)
                                }
                            })?;
                        }
                        Ok::<_, rowlock::Error>(call)
                    })
                }
            })
            .await;
        if report {
            assert!(matches!(result, Ok(2)), "{result:?}");
            assert_eq!(calls.load(Ordering::SeqCst), 2);
        } else {
            // rowlock never saw the 40001: the caller's error comes back as it was, once.
            let err = result.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Decode);
            assert_eq!(calls.load(Ordering::SeqCst), 1);
        }
        assert_eq!(
            balance(&client, 1).await,
            101,
            "only the retry's write is kept"
        );
    }
}

#[tokio::test]
async fn the_root_cause_is_found_behind_a_pipelined_25p02() {
    let (_db, db) = accounts(1).await;
    let calls = Arc::new(AtomicU32::new(0));
    let result = db
        .with_transaction(TransactionOptions::new().retry(RetryPolicy::new()), {
            let calls = calls.clone();
            move |tx| {
                let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
                Box::pin(async move {
                    if call == 1 {
                        // Sent in one flush: the server fails the first with 40001 and the
                        // second with 25P02. The closure only looks at the second.
                        let (_first, second) = futures_util::future::join(
                            tx.batch_execute(RAISE_40001),
                            tx.query("SELECT 1", &[]),
                        )
                        .await;
                        let err = second.unwrap_err();
                        assert_eq!(err.kind(), ErrorKind::TransactionAborted);
                        assert_eq!(err.sql_state(), Some(&SqlState::T_R_SERIALIZATION_FAILURE));
                        assert!(err.is_retryable());
                        return Err(err);
                    }
                    Ok(call)
                })
            }
        })
        .await;
    assert!(matches!(result, Ok(2)), "{result:?}");
}

#[tokio::test]
async fn exhaustion_reports_attempts_and_the_last_sqlstate() {
    let (_db, db) = accounts(1).await;
    let calls = Arc::new(AtomicU32::new(0));
    let policy = RetryPolicy::new().max_attempts(3);
    let err = db
        .with_transaction(TransactionOptions::new().retry(&policy), {
            let calls = calls.clone();
            move |tx| {
                calls.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move { tx.batch_execute(RAISE_40001).await })
            }
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RetriesExhausted, "{err}");
    assert_eq!(err.attempts(), Some(3));
    assert_eq!(err.sql_state(), Some(&SqlState::T_R_SERIALIZATION_FAILURE));
    let last = err.last_attempt().expect("the last cause is kept");
    assert_eq!(last.kind(), ErrorKind::SerializationFailure);
    assert!(err.to_string().contains("serialization failure"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn constraint_violations_and_caller_errors_are_never_retried() {
    let (_db, db) = accounts(1).await;
    let calls = Arc::new(AtomicU32::new(0));
    let err = db
        .with_transaction(TransactionOptions::new().retry(RetryPolicy::new()), {
            let calls = calls.clone();
            move |tx| {
                calls.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move { tx.execute("INSERT INTO accounts VALUES (1, 0)", &[]).await })
            }
        })
        .await
        .unwrap_err();
    assert_eq!(err.sql_state(), Some(&SqlState::UNIQUE_VIOLATION));
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let calls = Arc::new(AtomicU32::new(0));
    let result = db
        .with_transaction(TransactionOptions::new().retry(RetryPolicy::new()), {
            let calls = calls.clone();
            move |_tx| {
                calls.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move { Err::<(), _>(AppError::Conflict) })
            }
        })
        .await;
    assert!(matches!(result, Err(AppError::Conflict)));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn lock_contention_is_retried_only_when_asked() {
    let (pg, db) = accounts(1).await;
    let holder = pg.session().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM accounts WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let nowait = Lock::no_wait();
    fn touch(_: &Transaction, _: Account) -> rowlock::BoxFuture<'_, Result<(), rowlock::Error>> {
        Box::pin(async { Ok(()) })
    }
    let outcome = db
        .with_locked_row(&1, nowait.clone().retry(RetryPolicy::new()), touch)
        .await
        .unwrap();
    assert!(
        matches!(outcome, Outcome::LockNotAvailable(_)),
        "{outcome:?}"
    );

    let policy = RetryPolicy::new()
        .max_attempts(3)
        .retry_lock_contention(true);
    let err = db
        .with_locked_row(&1, nowait.clone().retry(&policy), touch)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RetriesExhausted, "{err}");
    assert_eq!(err.attempts(), Some(3));
    assert_eq!(err.sql_state(), Some(&SqlState::LOCK_NOT_AVAILABLE));
}

/// Resolves until the server has finished with the transaction.
async fn settled_status(db: &rowlock::Db, tx: rowlock::TransactionRef) -> CommitStatus {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = db.resolve_commit(&tx).await.unwrap();
        if status != CommitStatus::InProgress || tokio::time::Instant::now() > deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn commit_cut_before_the_server_committed_resolves_to_aborted() {
    let (pg, db) = accounts(0).await;
    let admin = pg.client().await.unwrap();
    admin
        .batch_execute(
            "CREATE TABLE payments (key text PRIMARY KEY);
             CREATE FUNCTION wait_at_commit() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_advisory_xact_lock(42); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER payments_wait AFTER INSERT ON payments
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION wait_at_commit();",
        )
        .await
        .unwrap();
    // The holder owns advisory lock 42, so the deferred trigger blocks inside COMMIT.
    let holder = pg.session().await.unwrap();
    holder
        .batch_execute("SELECT pg_advisory_lock(42)")
        .await
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let call = tokio::spawn({
        let (db, calls) = (db.clone(), calls.clone());
        async move {
            let opts = TransactionOptions::new().track_commit_outcome(true);
            db.with_transaction(opts.clone().retry(RetryPolicy::new()), move |tx| {
                calls.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    tx.execute("INSERT INTO payments VALUES ('k-1')", &[])
                        .await?;
                    Ok::<_, rowlock::Error>(())
                })
            })
            .await
        }
    });
    let waiting = wait_for_blocked_by(&admin, holder.pid(), 1, WAIT)
        .await
        .unwrap();
    let cluster = TestCluster::shared().unwrap();
    assert!(cluster.terminate_backend(waiting[0]).await.unwrap());
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CommitOutcomeUnknown, "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "never retried");
    let tx = err.transaction().expect("tracked transaction");
    assert_eq!(err.transaction_id(), Some(tx.id));
    assert_eq!(settled_status(&db, tx).await, CommitStatus::Aborted);
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM payments", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn commit_whose_reply_was_lost_resolves_to_committed() {
    let (pg, _) = accounts(0).await;
    let admin = pg.client().await.unwrap();
    admin
        .batch_execute("CREATE TABLE payments (key text PRIMARY KEY)")
        .await
        .unwrap();
    let Some(proxy) = crate::proxy::CommitReplyDropper::start(pg.config()).await else {
        eprintln!("the test server is not reachable over TCP: nothing to check");
        return;
    };
    let db = proxy.db(pg.config(), pg.name());
    let calls = Arc::new(AtomicU32::new(0));
    let opts = TransactionOptions::new().track_commit_outcome(true);
    let err = db
        .with_transaction(opts.clone().retry(RetryPolicy::new()), {
            let calls = calls.clone();
            move |tx| {
                calls.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    tx.execute("INSERT INTO payments VALUES ('k-2')", &[])
                        .await?;
                    Ok::<_, rowlock::Error>(())
                })
            }
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CommitOutcomeUnknown, "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "never retried");
    assert!(proxy.dropped_a_commit_reply());
    let tx = err.transaction().expect("tracked transaction");
    let direct = pg.db(1);
    assert_eq!(settled_status(&direct, tx).await, CommitStatus::Committed);
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM payments", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn locked_rows_retry_reruns_the_closure_with_freshly_locked_rows() {
    let (pg, db) = accounts(2).await;
    let calls = Arc::new(AtomicU32::new(0));
    let outcome = db
        .with_locked_rows(&[2, 1], Lock::new().retry(RetryPolicy::new()), {
            let calls = calls.clone();
            move |tx, rows: Vec<Account>| {
                let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
                Box::pin(async move {
                    assert_eq!(rows.len(), 2);
                    tx.execute("UPDATE accounts SET balance = balance + 1", &[])
                        .await?;
                    if call == 1 {
                        tx.batch_execute(RAISE_40001).await?;
                    }
                    Ok::<_, rowlock::Error>(call)
                })
            }
        })
        .await
        .unwrap();
    assert!(matches!(outcome, rowlock::Outcome::Done(2)), "{outcome:?}");
    let client = pg.client().await.unwrap();
    assert_eq!(
        balance(&client, 1).await,
        101,
        "the failed attempt left nothing behind"
    );
}

#[tokio::test]
async fn without_retries_the_callers_own_error_comes_back_unchanged() {
    let (_db, db) = accounts(1).await;
    let result = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move {
                if tx.batch_execute(RAISE_40001).await.is_err() {
                    return Err(AppError::Conflict);
                }
                Ok(())
            })
        })
        .await;
    assert!(matches!(result, Err(AppError::Conflict)), "{result:?}");
}

/// An event, in a table partitioned by day.
#[derive(rowlock::LockableRow, Debug)]
#[rowlock(table = "events", key("id", "day"))]
struct Event {
    id: i64,
    day: i32,
}

/// A row that a concurrent update moved to another partition while the lock waited fails
/// with `40001` even in `READ COMMITTED` (the server cannot follow it across partitions, as
/// it follows an updated row within one table): one attempt returns it as
/// `SerializationFailure`; under a retry policy the next attempt finds the old key gone.
#[tokio::test]
async fn a_row_moved_to_another_partition_while_waiting_is_a_serialization_failure() {
    let (pg, db) = crate::support::database(
        "CREATE TABLE events (id bigint, day int, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
         CREATE TABLE events_a PARTITION OF events FOR VALUES FROM (0) TO (100);
         CREATE TABLE events_b PARTITION OF events FOR VALUES FROM (100) TO (200);
         INSERT INTO events VALUES (1, 5), (2, 5);",
        2,
    )
    .await;
    let admin = pg.client().await.unwrap();
    for (id, policy) in [(1_i64, None), (2, Some(RetryPolicy::new()))] {
        let mover = pg.session().await.unwrap();
        mover
            .batch_execute(&format!(
                "BEGIN; UPDATE events SET day = 150 WHERE id = {id}"
            ))
            .await
            .unwrap();
        let lock = match policy {
            Some(p) => Lock::new().retry(p),
            None => Lock::new(),
        };
        let db = db.clone();
        let call = tokio::spawn(async move {
            db.with_locked_row(&(id, 5), &lock, |_, e: Event| {
                Box::pin(async move { Ok::<_, rowlock::Error>(e.day) })
            })
            .await
        });
        wait_for_blocked_by(&admin, mover.pid(), 1, WAIT)
            .await
            .unwrap();
        mover.batch_execute("COMMIT").await.unwrap();
        let result = call.await.unwrap();
        match id {
            1 => {
                let err = result.unwrap_err();
                assert_eq!(err.kind(), ErrorKind::SerializationFailure, "{err}");
                assert!(err.is_retryable(), "{err}");
            }
            _ => assert!(matches!(result, Ok(Outcome::NotFound(_))), "{result:?}"),
        }
    }
}
