//! A migration while connections are pooled: column changes never break rowlock's own cached
//! statements; a change that breaks the row type is a decode error naming the column.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rowlock::{Claim, Direction, ErrorKind, Lock, Outcome, TransactionOptions, Transition};

use crate::support::{Account, accounts};

async fn bump(db: &rowlock::Db, id: i64) -> Result<(), rowlock::Error> {
    let outcome = db
        .with_locked_row(&id, &Lock::new(), |tx, acc: Account| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE accounts SET balance = $2 WHERE id = $1",
                    &[&acc.id, &(acc.balance + 1)],
                )
                .await
                .map(|_| ())
            })
        })
        .await?;
    assert!(matches!(outcome, Outcome::Done(())), "{outcome:?}");
    Ok(())
}

async fn lock_both(db: &rowlock::Db) {
    let both = db
        .with_locked_rows(&[1, 2], &Lock::new(), |_, rows: Vec<Account>| {
            Box::pin(async move { Ok::<_, rowlock::Error>(rows.len()) })
        })
        .await
        .unwrap();
    assert!(matches!(both, Outcome::Done(2)));
}

#[tokio::test]
async fn a_column_added_under_a_warm_single_connection_pool_breaks_nothing() {
    let (pg, _) = accounts(2).await;
    let db = pg.db(1);
    let admin = pg.client().await.unwrap();
    bump(&db, 1).await.unwrap();
    lock_both(&db).await;
    admin
        .batch_execute("ALTER TABLE accounts ADD COLUMN note text")
        .await
        .unwrap();
    // The one pooled connection cached `SELECT *` before the column existed.
    bump(&db, 1).await.unwrap();
    lock_both(&db).await;
}

#[tokio::test]
async fn column_changes_under_load_break_no_call() {
    let (pg, db) = accounts(4).await;
    let admin = pg.client().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..8)
        .map(|i| {
            let (db, stop, done) = (db.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match bump(&db, i % 4 + 1).await {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.push(e.to_string());
                            0
                        }
                    };
                }
                errors
            })
        })
        .collect();
    // Each change lands while the workers run: wait for fresh progress around it.
    let progress = |at_least: u64| {
        let done = done.clone();
        async move {
            let start = done.load(Ordering::Relaxed);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while done.load(Ordering::Relaxed) < start + at_least {
                assert!(tokio::time::Instant::now() < deadline, "workers stalled");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    for change in [
        "ALTER TABLE accounts ADD COLUMN note text",
        "ALTER TABLE accounts RENAME COLUMN note TO memo",
        "ALTER TABLE accounts ALTER COLUMN memo TYPE varchar(20)",
        "ALTER TABLE accounts DROP COLUMN memo",
    ] {
        progress(50).await;
        admin.batch_execute(change).await.unwrap();
        progress(50).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for w in workers {
        errors.extend(w.await.unwrap());
    }
    assert!(
        errors.is_empty(),
        "{} calls failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    let total: i64 = admin
        .query_one("SELECT sum(balance)::int8 FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 400 + done.load(Ordering::Relaxed) as i64);
}

#[tokio::test]
async fn dropping_a_column_the_row_type_reads_is_a_decode_error_naming_it() {
    let (pg, db) = accounts(1).await;
    bump(&db, 1).await.unwrap();
    pg.client()
        .await
        .unwrap()
        .batch_execute("ALTER TABLE accounts DROP COLUMN balance")
        .await
        .unwrap();
    let err = bump(&db, 1).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode);
    let shown = err.to_string();
    assert!(shown.contains("balance"), "{shown}");
    assert!(shown.contains("table \"accounts\""), "{shown}");
}

/// Locks, transitions and claims `Account` (a row type that lists no columns) inside one
/// transaction of the caller's, and commits.
async fn in_own_transaction(db: &rowlock::Db) -> Result<(), rowlock::Error> {
    let tx = db.begin(&TransactionOptions::new()).await?;
    let locked = tx.lock_row::<Account>(&1, &Lock::new()).await?;
    assert!(locked.is_done());
    let add = Transition::new("balance = balance + 1");
    let moved = tx.transition::<Account>(&2, &add, &[]).await?;
    assert!(matches!(moved, Outcome::Done(Account { id: 2, .. })));
    let claim = Claim::new().order_by("id", Direction::Asc);
    let claimed: Vec<Account> = tx.claim(&claim, 5).await?;
    assert_eq!(
        claimed.len(),
        2,
        "its own locks do not hide rows from its claim"
    );
    tx.commit().await
}

#[tokio::test]
async fn a_column_added_under_a_callers_transaction_breaks_none_of_its_statements() {
    let (pg, _) = accounts(2).await;
    let db = pg.db(1);
    in_own_transaction(&db).await.unwrap();
    pg.client()
        .await
        .unwrap()
        .batch_execute("ALTER TABLE accounts ADD COLUMN note text DEFAULT 'new'")
        .await
        .unwrap();
    // The one pooled connection holds every statement prepared before the column existed;
    // a caller's transaction cannot be restarted, so none of them may fail now.
    in_own_transaction(&db).await.unwrap();
}

#[tokio::test]
async fn a_renamed_column_is_named_with_its_table_on_every_path() {
    let (pg, _) = accounts(2).await;
    let db = pg.db(1);
    in_own_transaction(&db).await.unwrap();
    pg.client()
        .await
        .unwrap()
        .batch_execute("ALTER TABLE accounts RENAME COLUMN balance TO cents")
        .await
        .unwrap();
    let add = Transition::new("id = id");
    let claim = Claim::new().order_by("id", Direction::Asc);
    let tx = db.begin(&TransactionOptions::new()).await.unwrap();
    let in_tx = tx
        .lock_row::<Account>(&1, &Lock::new())
        .await
        .map(|_| ())
        .unwrap_err();
    drop(tx);
    let errors = [
        in_tx,
        db.transition::<Account>(&2, &add, &[])
            .await
            .map(|_| ())
            .unwrap_err(),
        db.claim_and_mark::<Account>(&claim.clone().mark("id = id", vec![]), 1)
            .await
            .map(|_| ())
            .unwrap_err(),
    ];
    for err in errors {
        assert_eq!(err.kind(), ErrorKind::Decode, "{err}");
        let shown = err.to_string();
        assert!(shown.contains("balance"), "{shown}");
        assert!(shown.contains("table \"accounts\""), "{shown}");
    }
    // A column the caller's own SQL names is the caller's mistake, reported as the server's.
    pg.client()
        .await
        .unwrap()
        .batch_execute("ALTER TABLE accounts RENAME COLUMN cents TO balance")
        .await
        .unwrap();
    let typo = Transition::new("balanse = 0");
    let err = db
        .transition::<Account>(&2, &typo, &[])
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Db, "{err}");
}

/// `Account` as the derive writes it: its decode errors name the column, not its position.
#[derive(Debug, rowlock::LockableRow)]
#[rowlock(table = "accounts", key = "id")]
#[expect(dead_code, reason = "never decoded: only its decode errors are read")]
struct Derived {
    id: i64,
    #[rowlock(rename = "balance")]
    cents: i64,
}

/// Every path that hands out `Derived` rows, each failing to decode: its error, shown.
async fn decode_errors_on_every_path(db: &rowlock::Db) -> Vec<String> {
    let tx = db.begin(&TransactionOptions::new()).await.unwrap();
    let in_tx = tx
        .lock_row::<Derived>(&1, &Lock::new())
        .await
        .map(|_| ())
        .unwrap_err();
    drop(tx);
    let claim = Claim::new().order_by("id", Direction::Asc);
    let errors = [
        in_tx,
        db.with_locked_row(&1, &Lock::new(), |_, _: Derived| {
            Box::pin(async move { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .map(|_| ())
        .unwrap_err(),
        db.with_locked_rows(&[1, 2], &Lock::new(), |_, _: Vec<Derived>| {
            Box::pin(async move { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .map(|_| ())
        .unwrap_err(),
        db.transition::<Derived>(&1, &Transition::new("id = id"), &[])
            .await
            .map(|_| ())
            .unwrap_err(),
        db.claim_and_mark::<Derived>(&claim.clone().mark("id = id", vec![]), 2)
            .await
            .map(|_| ())
            .unwrap_err(),
        db.claim(&claim, 2, |_, _: Vec<Derived>| {
            Box::pin(async move { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .map(|_| ())
        .unwrap_err(),
    ];
    errors
        .iter()
        .map(|e| {
            assert_eq!(e.kind(), ErrorKind::Decode, "{e}");
            e.to_string()
        })
        .collect()
}

#[tokio::test]
async fn a_retyped_or_null_column_is_a_decode_error_naming_the_column_not_its_position() {
    let (pg, _) = accounts(2).await;
    let admin = pg.client().await.unwrap();
    admin
        .batch_execute("ALTER TABLE accounts ALTER COLUMN balance TYPE int")
        .await
        .unwrap();
    // A fresh pool per phase: a statement cached before the second migration would fail once
    // in the caller's transaction instead (see the next test).
    for shown in decode_errors_on_every_path(&pg.db(1)).await {
        assert!(
            shown.contains(
                "column \"balance\" of table \"accounts\" does not fit field `cents` of the row type"
            ),
            "{shown}"
        );
        assert!(
            shown.contains("`i64`") && shown.contains("`int4`"),
            "{shown}"
        );
        assert!(!shown.contains("column 1"), "{shown}");
    }
    admin
        .batch_execute(
            "ALTER TABLE accounts ALTER COLUMN balance TYPE bigint, \
             ALTER COLUMN balance DROP NOT NULL; UPDATE accounts SET balance = NULL",
        )
        .await
        .unwrap();
    for shown in decode_errors_on_every_path(&pg.db(1)).await {
        assert!(shown.contains("column \"balance\""), "{shown}");
        assert!(shown.contains("NULL"), "{shown}");
        assert!(!shown.contains("column 1"), "{shown}");
    }
}

#[derive(Debug, rowlock::LockableRow)]
#[rowlock(table = "accounts", key = "id")]
struct Noted {
    id: i64,
    note: String,
}

#[tokio::test]
async fn a_column_widened_under_a_callers_transaction_fails_it_once_and_says_why() {
    let (pg, _) = accounts(1).await;
    let db = pg.db(1);
    let admin = pg.client().await.unwrap();
    admin
        .batch_execute("ALTER TABLE accounts ADD COLUMN note varchar(20) NOT NULL DEFAULT 'n'")
        .await
        .unwrap();
    let lock_in_own_transaction = || async {
        let tx = db.begin(&TransactionOptions::new()).await?;
        let locked = tx.lock_row::<Noted>(&1, &Lock::new()).await?;
        tx.commit().await?;
        Ok::<_, rowlock::Error>(locked)
    };
    assert!(lock_in_own_transaction().await.unwrap().is_done());
    // A compatible change for the row type (a `String` reads both), but the result type of
    // the statement cached on the pooled connection changes: PostgreSQL refuses it once, and
    // a caller's transaction cannot be restarted by rowlock.
    admin
        .batch_execute("ALTER TABLE accounts ALTER COLUMN note TYPE varchar(50)")
        .await
        .unwrap();
    if pg.pgbouncer_config().is_some() {
        // Behind PgBouncer statements are prepared per transaction: none is cached to go stale.
        assert!(lock_in_own_transaction().await.unwrap().is_done());
        return;
    }
    let err = lock_in_own_transaction().await.unwrap_err();
    assert_eq!(err.sql_state().map(|s| s.code()), Some("0A000"), "{err}");
    let shown = err.to_string();
    assert!(
        shown.contains("before a migration changed the type of a column")
            && shown.contains("running the transaction again succeeds"),
        "{shown}"
    );
    // As it says: the connection prepares its statements again.
    assert!(lock_in_own_transaction().await.unwrap().is_done());
    // rowlock's own transactions restart by themselves.
    admin
        .batch_execute("ALTER TABLE accounts ALTER COLUMN note TYPE text")
        .await
        .unwrap();
    let outcome = db
        .with_locked_row(&1, &Lock::new(), |_, n: Noted| {
            Box::pin(async move { Ok::<_, rowlock::Error>(n.note) })
        })
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Done("n".to_string()));
}
