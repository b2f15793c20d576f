//! with_locked_row / with_locked_rows: outcomes, commit and rollback, waiting and releasing.

use std::time::{Duration, Instant};

use rowlock::tokio_postgres::error::SqlState;
use rowlock::{
    ErrorKind, Lock, LockMode, LockableRow, Outcome, Table, Transaction, TransactionOptions,
};
use rowlock_testing::wait_for_blocked_by;

use crate::support::{
    Account, AppError, WAIT, accounts, balance, in_transaction, keys, lockable_now,
};

fn debit(
    amount: i64,
) -> impl for<'t> FnMut(&'t Transaction, Account) -> rowlock::BoxFuture<'t, Result<i64, rowlock::Error>>
{
    move |tx, account| {
        Box::pin(async move {
            let new = account.balance - amount;
            tx.execute(
                "UPDATE accounts SET balance = $2 WHERE id = $1",
                &[&account.id, &new],
            )
            .await?;
            Ok(new)
        })
    }
}

#[tokio::test]
async fn done_commits_and_second_session_sees_it() {
    let (pg, db) = accounts(3).await;
    let other = pg.client().await.unwrap();
    let outcome = db
        .with_locked_row(&2, &Lock::new(), debit(30))
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Done(70)), "{outcome:?}");
    assert_eq!(balance(&other, 2).await, 70);
    assert_eq!(in_transaction(&other).await, 0);
}

#[tokio::test]
async fn closure_error_rolls_back_and_flows_out_unchanged() {
    let (pg, db) = accounts(1).await;
    let mut other = pg.client().await.unwrap();
    let result = db
        .with_locked_row(&1, &Lock::new(), |tx, acc: Account| {
            Box::pin(async move {
                tx.execute("UPDATE accounts SET balance = 0 WHERE id = $1", &[&acc.id])
                    .await?;
                Err::<(), _>(AppError::Insufficient)
            })
        })
        .await;
    assert!(matches!(result, Err(AppError::Insufficient)), "{result:?}");
    assert_eq!(balance(&other, 1).await, 100, "the update was rolled back");
    assert!(lockable_now(&mut other, 1).await, "the lock was released");
}

#[tokio::test]
async fn swallowed_database_error_is_not_reported_as_committed() {
    let (pg, db) = accounts(1).await;
    let other = pg.client().await.unwrap();
    let result = db
        .with_locked_row(&1, &Lock::new(), |tx, acc: Account| {
            Box::pin(async move {
                tx.execute("UPDATE accounts SET balance = 1 WHERE id = $1", &[&acc.id])
                    .await?;
                // Fails with 22012; the closure ignores it and says Ok.
                let _ = tx.query("SELECT 1 / 0", &[]).await;
                Ok::<_, rowlock::Error>("looks fine")
            })
        })
        .await;
    let err = result.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TransactionAborted, "{err}");
    assert_eq!(err.sql_state(), Some(&SqlState::DIVISION_BY_ZERO));
    assert_eq!(balance(&other, 1).await, 100, "nothing was committed");
    assert_eq!(in_transaction(&other).await, 0);
}

#[tokio::test]
async fn missing_key_is_not_found_in_every_mode() {
    let (_db, db) = accounts(1).await;
    for mode in [LockMode::Wait, LockMode::NoWait, LockMode::SkipLocked] {
        let mut ran = false;
        let outcome = db
            .with_locked_row(&42, &Lock::new().mode(mode), |_, _: Account| {
                ran = true;
                Box::pin(async { Ok::<_, rowlock::Error>(()) })
            })
            .await
            .unwrap();
        assert!(
            matches!(outcome, Outcome::NotFound(_)),
            "{mode:?}: {outcome:?}"
        );
        assert!(!ran, "closure must not run");
        assert_eq!(
            outcome.into_result().unwrap_err().kind(),
            ErrorKind::RowNotFound
        );
    }
}

/// Session A holds `FOR UPDATE` on row 1 of a fresh database.
async fn held_row() -> (
    rowlock_testing::TestDatabase,
    rowlock::Db,
    rowlock_testing::Session,
) {
    let (pg, db) = accounts(2).await;
    let holder = pg.session().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM accounts WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    (pg, db, holder)
}

#[tokio::test]
async fn nowait_on_a_locked_row_is_lock_not_available_without_waiting() {
    let (_db, db, _holder) = held_row().await;
    // A generous lock_timeout turns an accidental wait into a LockTimeout, not a hang.
    let opts = Lock::no_wait().lock_timeout(WAIT);
    let outcome = db.with_locked_row(&1, &opts, debit(1)).await.unwrap();
    let Outcome::LockNotAvailable(err) = outcome else {
        panic!("expected LockNotAvailable, got {outcome:?}");
    };
    assert!(err.is_lock_not_available() && !err.is_lock_timeout());
    assert_eq!(err.sql_state(), Some(&SqlState::LOCK_NOT_AVAILABLE));
    // Another row is not affected.
    let outcome = db.with_locked_row(&2, &opts, debit(1)).await.unwrap();
    assert!(outcome.is_done());
}

#[tokio::test]
async fn skip_locked_on_a_locked_row_is_skipped_not_not_found() {
    let (_db, db, _holder) = held_row().await;
    let opts = Lock::skip_locked().lock_timeout(WAIT);
    let outcome = db.with_locked_row(&1, &opts, debit(1)).await.unwrap();
    assert!(matches!(outcome, Outcome::Skipped(_)), "{outcome:?}");
    let outcome = db.with_locked_row(&99, &opts, debit(1)).await.unwrap();
    assert!(matches!(outcome, Outcome::NotFound(_)), "{outcome:?}");
}

#[tokio::test]
async fn wait_with_timeout_reports_lock_timeout_after_about_that_long() {
    let (pg, db, _holder) = held_row().await;
    let timeout = Duration::from_millis(300);
    let opts = Lock::new().lock_timeout(timeout);
    let started = Instant::now();
    let outcome = db.with_locked_row(&1, &opts, debit(1)).await.unwrap();
    let waited = started.elapsed();
    let Outcome::LockTimeout(err) = outcome else {
        panic!("expected LockTimeout, got {outcome:?}");
    };
    assert!(err.is_lock_timeout() && !err.is_lock_not_available());
    assert_eq!(err.sql_state(), Some(&SqlState::LOCK_NOT_AVAILABLE));
    assert!(
        waited >= timeout,
        "returned after {waited:?}, before the timeout"
    );
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
    let observer = pg.client().await.unwrap();
    assert_eq!(
        in_transaction(&observer).await,
        1,
        "only the holder is in a transaction"
    );
}

/// A statement timeout bounds the lock's wait too; the server does not say the wait was for a
/// lock, so it is the statement timeout's error. With a lock timeout below it, the outcome.
#[tokio::test]
async fn a_statement_timeout_during_the_lock_wait_is_its_error_and_a_lock_timeout_below_it_the_outcome()
 {
    let (_db, db, _holder) = held_row().await;
    let bounded = Lock::new().statement_timeout(Duration::from_millis(200));
    let err = db
        .with_locked_row(&1, &bounded, debit(1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StatementTimeout, "{err}");
    assert!(err.to_string().contains("while locking rows"), "{err}");
    let outcome = db
        .with_locked_row(
            &1,
            &bounded.clone().lock_timeout(Duration::from_millis(100)),
            debit(1),
        )
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::LockTimeout(_)), "{outcome:?}");
    // The connection was clean both times: another row at once.
    assert!(
        db.with_locked_row(&2, &bounded, debit(1))
            .await
            .unwrap()
            .is_done()
    );
}

#[tokio::test]
async fn wait_blocks_until_the_holder_commits_then_sees_its_write() {
    let (pg, db, holder) = held_row().await;
    let observer = pg.client().await.unwrap();
    let task = tokio::spawn({
        let db = db.clone();
        async move { db.with_locked_row(&1, &Lock::new(), debit(5)).await }
    });
    wait_for_blocked_by(&observer, holder.pid(), 1, WAIT)
        .await
        .unwrap();
    assert!(!task.is_finished());
    holder
        .batch_execute("UPDATE accounts SET balance = 50 WHERE id = 1; COMMIT")
        .await
        .unwrap();
    let outcome = task.await.unwrap().unwrap();
    assert!(
        matches!(outcome, Outcome::Done(45)),
        "re-read the committed row: {outcome:?}"
    );
    assert_eq!(balance(&observer, 1).await, 45);
}

#[tokio::test]
async fn panic_in_closure_rolls_back_and_releases_the_lock() {
    let (pg, db) = accounts(1).await;
    let mut other = pg.client().await.unwrap();
    let task = tokio::spawn({
        let db = db.clone();
        async move {
            db.with_locked_row(&1, &Lock::new(), |tx, acc: Account| {
                Box::pin(async move {
                    tx.execute("UPDATE accounts SET balance = 0 WHERE id = $1", &[&acc.id])
                        .await?;
                    if acc.balance > 0 {
                        panic!("closure panics while holding the lock");
                    }
                    Ok::<_, rowlock::Error>(())
                })
            })
            .await
        }
    });
    assert!(task.await.unwrap_err().is_panic());
    // Rollback runs on a spawned task: a bounded wait for the lock observes it.
    let opts = Lock::new().lock_timeout(WAIT);
    let outcome = db.with_locked_row(&1, &opts, debit(0)).await.unwrap();
    assert!(
        matches!(outcome, Outcome::Done(100)),
        "update rolled back: {outcome:?}"
    );
    assert!(lockable_now(&mut other, 1).await);
    assert_eq!(in_transaction(&other).await, 0);
}

#[tokio::test]
async fn overlapping_multi_row_locks_in_opposite_orders_never_deadlock() {
    let (pg, db) = accounts(2).await;
    let rounds = 1000;
    let transfer = |keys: [i64; 2], db: rowlock::Db| async move {
        db.with_locked_rows(&keys, &Lock::new(), |tx, rows: Vec<Account>| {
            Box::pin(async move {
                assert_eq!(rows.iter().map(|a| a.id).collect::<Vec<_>>(), vec![1, 2]);
                let stmt = tx
                    .prepare_cached("UPDATE accounts SET balance = balance + $2 WHERE id = $1")
                    .await?;
                // Touch the rows in the caller's order: the locks are already held.
                tx.execute(&stmt, &[&keys[0], &-1_i64]).await?;
                tx.execute(&stmt, &[&keys[1], &1_i64]).await?;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
    };
    for _ in 0..rounds {
        let (a, b) = tokio::join!(
            tokio::spawn(transfer([1, 2], db.clone())),
            tokio::spawn(transfer([2, 1], db.clone()))
        );
        for result in [a.unwrap(), b.unwrap()] {
            let outcome = result.unwrap_or_else(|e| panic!("no error expected, got {e}"));
            assert!(outcome.is_done());
        }
    }
    let client = pg.client().await.unwrap();
    // Each round moves 1 from 1 to 2 and 1 from 2 to 1.
    assert_eq!(balance(&client, 1).await, 100);
    assert_eq!(balance(&client, 2).await, 100);
}

#[tokio::test]
async fn multi_row_outcomes_report_missing_and_skipped_keys() {
    let (pg, db) = accounts(3).await;
    fn never(
        _: &Transaction,
        _: Vec<Account>,
    ) -> rowlock::BoxFuture<'_, Result<(), rowlock::Error>> {
        panic!("closure must not run")
    }
    let outcome = db
        .with_locked_rows(&[3, 1, 7, 9, 1], &Lock::new(), never)
        .await
        .unwrap();
    assert!(
        matches!(&outcome, Outcome::NotFound(k) if keys(k) == ["7", "9"]),
        "{outcome:?}"
    );

    let holder = pg.session().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM accounts WHERE id = 2 FOR SHARE")
        .await
        .unwrap();
    let skip = Lock::skip_locked();
    let outcome = db.with_locked_rows(&[1, 2, 3], &skip, never).await.unwrap();
    assert!(
        matches!(&outcome, Outcome::Skipped(k) if keys(k) == ["2"]),
        "{outcome:?}"
    );
    let outcome = db.with_locked_rows(&[1, 2, 8], &skip, never).await.unwrap();
    assert!(
        matches!(&outcome, Outcome::NotFound(k) if keys(k) == ["8"]),
        "{outcome:?}"
    );
    let nowait = Lock::no_wait();
    let outcome = db.with_locked_rows(&[1, 2], &nowait, never).await.unwrap();
    assert!(
        matches!(outcome, Outcome::LockNotAvailable(_)),
        "{outcome:?}"
    );
    // FOR SHARE does not conflict with FOR SHARE: all three are locked.
    let share = Lock::new().strength(rowlock::LockStrength::Share);
    let outcome = db
        .with_locked_rows(&[3, 2, 1], &share, |_, rows: Vec<Account>| {
            Box::pin(async move { Ok::<_, rowlock::Error>(rows.len()) })
        })
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Done(3)), "{outcome:?}");
}

#[derive(Debug)]
struct Seat {
    show: i32,
    seat: String,
    taken_by: Option<String>,
}

impl LockableRow for Seat {
    type Key = (i32, String);
    const TABLE: Table = Table::qualified("booking", "Seats");
    const KEY_COLUMNS: &'static [&'static str] = &["show", "seat"];
    fn from_row(
        row: &rowlock::tokio_postgres::Row,
    ) -> Result<Self, rowlock::tokio_postgres::Error> {
        Ok(Seat {
            show: row.try_get("show")?,
            seat: row.try_get("seat")?,
            taken_by: row.try_get("taken_by")?,
        })
    }
    fn key(&self) -> (i32, String) {
        (self.show, self.seat.clone())
    }
}

/// Creates `booking."Seats"` with three seats (the last taken); a client on the database.
async fn booking(pg: &rowlock_testing::TestDatabase) -> rowlock::tokio_postgres::Client {
    let client = pg.client().await.unwrap();
    client
        .batch_execute(
            r#"CREATE SCHEMA booking;
               CREATE TABLE booking."Seats" (show int, seat text, taken_by text,
                                             PRIMARY KEY (show, seat));
               INSERT INTO booking."Seats" VALUES (1, 'A1', NULL), (1, 'A2', NULL), (2, 'A1', 'x');"#,
        )
        .await
        .unwrap();
    client
}

#[tokio::test]
async fn composite_keys_in_a_qualified_mixed_case_table() {
    let (pg, db) = accounts(0).await;
    let client = booking(&pg).await;
    let outcome = db
        .with_locked_row(&(1, "A2".to_string()), &Lock::new(), |tx, s: Seat| {
            Box::pin(async move {
                assert_eq!(s.taken_by, None);
                tx.execute(
                    r#"UPDATE booking."Seats" SET taken_by = 'me' WHERE show = $1 AND seat = $2"#,
                    &[&s.show, &s.seat],
                )
                .await?;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap();
    assert!(outcome.is_done());
    let keys = [
        (2, "A1".to_string()),
        (1, "A1".to_string()),
        (1, "Z9".to_string()),
    ];
    let outcome = db
        .with_locked_rows(&keys, &Lock::new(), |_, _: Vec<Seat>| {
            Box::pin(async { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap();
    assert!(
        matches!(&outcome, Outcome::NotFound(k) if crate::support::keys(k) == [r#"(1, "Z9")"#])
    );
    let taken: String = client
        .query_one(
            r#"SELECT taken_by FROM booking."Seats" WHERE show = 1 AND seat = 'A2'"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(taken, "me");
}

/// Several composite keys of a schema-qualified, mixed-case table (one array per key column,
/// typed through the quoted table name) with a row held elsewhere: `SkipLocked` names the
/// held row, or the missing one when there is one; `NoWait` is busy.
#[tokio::test]
async fn composite_keys_skip_or_refuse_a_row_held_elsewhere() {
    let (pg, db) = accounts(0).await;
    booking(&pg).await;
    let holder = pg.client().await.unwrap();
    holder
        .batch_execute(
            r#"BEGIN; SELECT * FROM booking."Seats" WHERE show = 1 AND seat = 'A2' FOR UPDATE"#,
        )
        .await
        .unwrap();
    let held = (1, "A2".to_string());
    let missing = (3, "Z9".to_string());
    let free = [(1, "A1".to_string()), (2, "A1".to_string())];
    let run = |keys: Vec<(i32, String)>, lock: Lock| {
        let db = db.clone();
        async move {
            db.with_locked_rows(&keys, &lock, |_, seats: Vec<Seat>| {
                Box::pin(async move { Ok::<_, rowlock::Error>(seats.len()) })
            })
            .await
            .unwrap()
        }
    };
    let skip = Lock::new().mode(LockMode::SkipLocked);
    let mut keys = free.to_vec();
    keys.push(held.clone());
    assert_eq!(
        run(keys.clone(), skip.clone()).await,
        Outcome::Skipped(vec![rowlock::RowRef::of::<Seat>(&held)])
    );
    keys.push(missing.clone());
    assert_eq!(
        run(keys.clone(), skip.clone()).await,
        Outcome::NotFound(vec![rowlock::RowRef::of::<Seat>(&missing)])
    );
    let busy = run(keys, Lock::no_wait()).await;
    assert!(matches!(busy, Outcome::LockNotAvailable(_)), "{busy:?}");
    assert_eq!(run(free.to_vec(), skip).await, Outcome::Done(2));
}

#[tokio::test]
async fn lock_rows_inside_an_open_transaction_and_queued_writes_commit_together() {
    let (pg, db) = accounts(3).await;
    let other = pg.client().await.unwrap();
    let tx = db.begin(&TransactionOptions::new()).await.unwrap();
    let outcome = tx
        .lock_rows::<Account>(&[3, 1], &Lock::new().lock_timeout(WAIT))
        .await
        .unwrap();
    let Outcome::Done(rows) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(rows.iter().map(|a| a.id).collect::<Vec<_>>(), vec![1, 3]);
    let one = tx.lock_row::<Account>(&2, &Lock::new()).await.unwrap();
    assert!(matches!(
        one,
        Outcome::Done(Account {
            id: 2,
            balance: 100
        })
    ));
    let stmt = tx
        .prepare_cached("UPDATE accounts SET balance = $2 WHERE id = $1")
        .await
        .unwrap();
    for id in [1_i64, 2, 3] {
        tx.execute_on_commit(&stmt, &[&id, &(id * 10)])
            .await
            .unwrap();
    }
    assert_eq!(
        balance(&other, 1).await,
        100,
        "queued writes are not sent before commit"
    );
    tx.commit().await.unwrap();
    for id in [1_i64, 2, 3] {
        assert_eq!(balance(&other, id).await, id * 10);
    }
}
