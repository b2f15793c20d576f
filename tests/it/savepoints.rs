//! Savepoints inside a locked call or a transaction: an error recovered by rolling back to a
//! savepoint no longer fails the commit; one that is not recovered still does.

use rowlock::tokio_postgres::error::SqlState;
use rowlock::{ErrorKind, Lock, Outcome, Transaction, TransactionOptions};

use crate::support::{Account, accounts, balance, in_transaction, notes};

/// `audit.note` is unique: inserting `note` twice fails with 23505.
async fn insert_note(tx: &Transaction, note: &str) -> Result<u64, rowlock::Error> {
    tx.execute(
        "INSERT INTO audit (account_id, note) VALUES (1, $1)",
        &[&note],
    )
    .await
}

#[tokio::test]
async fn raw_savepoint_sql_recovers_an_insert_conflict_inside_with_locked_row() {
    let (pg, db) = accounts(1).await;
    let client = pg.client().await.unwrap();
    client
        .execute("INSERT INTO audit VALUES (1, 'seen')", &[])
        .await
        .unwrap();
    // "Insert, or fall back on conflict", as a service writes it with plain SQL.
    let outcome = db
        .with_locked_row(&1, &Lock::new(), |tx, acc: Account| {
            Box::pin(async move {
                tx.batch_execute("SAVEPOINT s").await?;
                let err = insert_note(tx, "seen").await.unwrap_err();
                assert_eq!(err.sql_state(), Some(&SqlState::UNIQUE_VIOLATION));
                tx.execute("ROLLBACK TO SAVEPOINT s", &[]).await?;
                tx.execute(
                    "UPDATE accounts SET balance = $2 WHERE id = $1",
                    &[&acc.id, &(acc.balance + 1)],
                )
                .await?;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap();
    assert!(outcome.is_done(), "{outcome:?}");
    assert_eq!(balance(&client, 1).await, 101, "the UPDATE committed");
    assert_eq!(in_transaction(&client).await, 0);
}

#[tokio::test]
async fn raw_savepoints_two_deep_and_an_unrecovered_error_still_fails_the_commit() {
    let (pg, db) = accounts(1).await;
    let client = pg.client().await.unwrap();
    let opts = TransactionOptions::new();
    db.with_transaction(&opts, |tx| {
        Box::pin(async move {
            insert_note(tx, "a").await?;
            tx.batch_execute("SAVEPOINT outer_sp").await?;
            insert_note(tx, "b").await?;
            tx.batch_execute("savepoint Inner_SP;").await?;
            insert_note(tx, "a").await.unwrap_err();
            tx.batch_execute("ROLLBACK TO inner_sp").await?;
            insert_note(tx, "c").await?;
            tx.batch_execute("RELEASE SAVEPOINT outer_sp").await?;
            Ok::<_, rowlock::Error>(())
        })
    })
    .await
    .unwrap();
    assert_eq!(notes(&client).await, ["a", "b", "c"]);

    // The same error without the rollback to the savepoint: nothing is committed.
    let err = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move {
                insert_note(tx, "d").await?;
                tx.batch_execute("SAVEPOINT s").await?;
                let _ = insert_note(tx, "a").await;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TransactionAborted);
    assert_eq!(err.sql_state(), Some(&SqlState::UNIQUE_VIOLATION));
    assert_eq!(notes(&client).await, ["a", "b", "c"]);
}

#[tokio::test]
async fn savepoint_guards_nest_and_roll_back_what_failed() {
    let (pg, db) = accounts(1).await;
    let client = pg.client().await.unwrap();
    db.with_transaction(&TransactionOptions::new(), |tx| {
        Box::pin(async move {
            insert_note(tx, "a").await?;
            let outer = tx.savepoint()?;
            insert_note(&outer, "b").await?;
            {
                let inner = outer.savepoint()?;
                let err = insert_note(&inner, "a").await.unwrap_err();
                assert_eq!(err.sql_state(), Some(&SqlState::UNIQUE_VIOLATION));
                // Nothing more can run until the savepoint is rolled back...
                assert_eq!(
                    tx.savepoint().unwrap_err().kind(),
                    ErrorKind::TransactionAborted
                );
                inner.rollback();
            }
            // ...and then everything can.
            insert_note(&outer, "c").await?;
            {
                let dropped = outer.savepoint()?;
                insert_note(&dropped, "x").await?;
                // Dropped without release: rolled back, like a transaction.
            }
            outer.release()?;
            Ok::<_, rowlock::Error>(())
        })
    })
    .await
    .unwrap();
    assert_eq!(notes(&client).await, ["a", "b", "c"]);
    assert_eq!(in_transaction(&client).await, 0);
}

#[tokio::test]
async fn releasing_a_savepoint_with_an_unrecovered_error_rolls_it_back_and_says_so() {
    let (pg, db) = accounts(1).await;
    let client = pg.client().await.unwrap();
    db.with_transaction(&TransactionOptions::new(), |tx| {
        Box::pin(async move {
            insert_note(tx, "a").await?;
            let sp = tx.savepoint()?;
            insert_note(&sp, "b").await?;
            let _ = insert_note(&sp, "a").await; // swallowed
            let err = sp.release().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::TransactionAborted);
            assert_eq!(err.sql_state(), Some(&SqlState::UNIQUE_VIOLATION));
            // The transaction goes on without the savepoint's work.
            insert_note(tx, "c").await?;
            Ok::<_, rowlock::Error>(())
        })
    })
    .await
    .unwrap();
    assert_eq!(notes(&client).await, ["a", "c"]);
}

#[tokio::test]
async fn with_savepoint_releases_on_ok_and_rolls_back_on_err() {
    let (pg, db) = accounts(1).await;
    let client = pg.client().await.unwrap();
    db.with_transaction(&TransactionOptions::new(), |tx| {
        Box::pin(async move {
            tx.with_savepoint(|tx| Box::pin(async move { insert_note(tx, "a").await }))
                .await?;
            // Insert, or fall back on conflict.
            let again = tx
                .with_savepoint(|tx| Box::pin(async move { insert_note(tx, "a").await }))
                .await;
            assert_eq!(
                again.unwrap_err().sql_state(),
                Some(&SqlState::UNIQUE_VIOLATION)
            );
            // A closure that swallows its failure is not a success.
            let swallowed = tx
                .with_savepoint(|tx| {
                    Box::pin(async move {
                        insert_note(tx, "b").await?;
                        let _ = insert_note(tx, "a").await;
                        Ok::<_, rowlock::Error>(())
                    })
                })
                .await;
            assert_eq!(swallowed.unwrap_err().kind(), ErrorKind::TransactionAborted);
            insert_note(tx, "c").await?;
            Ok::<_, rowlock::Error>(())
        })
    })
    .await
    .unwrap();
    assert_eq!(notes(&client).await, ["a", "c"]);
}

#[tokio::test]
async fn an_empty_savepoint_sends_nothing_and_a_lone_one_commits_nothing() {
    let (pg, db) = accounts(1).await;
    let client = pg.client().await.unwrap();
    let tx = db.begin(&TransactionOptions::new()).await.unwrap();
    tx.savepoint().unwrap().release().unwrap();
    tx.savepoint().unwrap().rollback();
    tx.commit().await.unwrap();
    assert_eq!(in_transaction(&client).await, 0);
    let outcome = db
        .with_locked_row(&1, &Lock::new(), |tx, _: Account| {
            Box::pin(async move {
                let sp = tx.savepoint()?;
                insert_note(&sp, "kept").await?;
                sp.release()?;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Done(())));
    assert_eq!(notes(&client).await, ["kept"]);
}

#[tokio::test]
async fn savepoint_sql_is_followed_in_several_statements_and_around_comments() {
    let (pg, db) = accounts(1).await;
    let client = pg.client().await.unwrap();
    client
        .execute("INSERT INTO audit VALUES (1, 'seen')", &[])
        .await
        .unwrap();
    db.with_transaction(&TransactionOptions::new(), |tx| {
        Box::pin(async move {
            // A savepoint opened in a batch with other work, a name with a `;` in it.
            tx.batch_execute(
                "UPDATE accounts SET balance = balance + 1 WHERE id = 1; SAVEPOINT \"a;b\"",
            )
            .await?;
            insert_note(tx, "seen").await.unwrap_err();
            // Recovered by a batch that starts with a comment and ends with a release.
            tx.batch_execute(
                "/* back to before the insert */ ROLLBACK TO SAVEPOINT \"a;b\"; \
                 RELEASE SAVEPOINT \"a;b\"",
            )
            .await?;
            // Text that only looks like a savepoint command changes nothing.
            tx.batch_execute("SELECT 'ROLLBACK TO SAVEPOINT x', $$SAVEPOINT y$$ -- RELEASE z")
                .await?;
            insert_note(tx, "new").await?;
            Ok::<_, rowlock::Error>(())
        })
    })
    .await
    .unwrap();
    assert_eq!(
        balance(&client, 1).await,
        101,
        "the batch's UPDATE committed"
    );
    assert_eq!(notes(&client).await, ["new", "seen"]);
}

#[tokio::test]
async fn writes_queued_inside_a_savepoint_go_with_it() {
    let (pg, db) = accounts(1).await;
    let client = pg.client().await.unwrap();
    db.with_transaction(&TransactionOptions::new(), |tx| {
        Box::pin(async move {
            let note = tx
                .prepare_cached("INSERT INTO audit (account_id, note) VALUES (1, $1)")
                .await?;
            tx.execute_on_commit(&note, &[&"before"]).await?;
            // A guard rolled back: its queued write is dropped, the earlier one stays.
            let sp = tx.savepoint()?;
            sp.execute_on_commit(&note, &[&"rolled back"]).await?;
            sp.rollback();
            // Nested: the inner one rolled back with a statement sent inside it, the outer
            // one released.
            let outer = tx.savepoint()?;
            outer.execute_on_commit(&note, &[&"released"]).await?;
            {
                let inner = outer.savepoint()?;
                insert_note(&inner, "sent inside").await?;
                inner
                    .execute_on_commit(&note, &[&"dropped with inner"])
                    .await?;
                // Dropped without release.
            }
            outer.release()?;
            // The closure form, returning an error (the closure borrows the statement).
            let note = &note;
            let failed = tx
                .with_savepoint(|tx| {
                    Box::pin(async move {
                        tx.execute_on_commit(note, &[&"closure failed"]).await?;
                        tx.execute("SELECT 1 / 0", &[]).await?;
                        Ok::<_, rowlock::Error>(())
                    })
                })
                .await;
            assert!(failed.is_err());
            // Savepoint SQL of the caller's own: ROLLBACK TO keeps the savepoint open and
            // drops what was queued after it.
            tx.batch_execute("SAVEPOINT s").await?;
            // Given as text, the same.
            const NOTE: &str = "INSERT INTO audit (account_id, note) VALUES (1, $1)";
            tx.execute_on_commit(NOTE, &[&"before rollback to"]).await?;
            tx.batch_execute("ROLLBACK TO SAVEPOINT s").await?;
            tx.execute_on_commit(NOTE, &[&"after rollback to"]).await?;
            tx.batch_execute("RELEASE SAVEPOINT s").await?;
            Ok::<_, rowlock::Error>(())
        })
    })
    .await
    .unwrap();
    assert_eq!(
        notes(&client).await,
        ["after rollback to", "before", "released"]
    );
    assert_eq!(in_transaction(&client).await, 0);
}

/// `ROLLBACK TO SAVEPOINT` goes out with the transaction's next statement: until then the
/// server still holds what the savepoint locked. Once anything follows, the row is free for
/// others while the transaction goes on.
#[tokio::test]
async fn a_rolled_back_savepoints_locks_end_when_its_rollback_reaches_the_server() {
    let (_pg, db) = accounts(2).await;
    let other = db.clone();
    let busy = |db: rowlock::Db| async move {
        let outcome = db
            .with_locked_row(&1, Lock::no_wait(), |_, _: Account| {
                Box::pin(async { Ok::<_, rowlock::Error>(()) })
            })
            .await
            .unwrap();
        matches!(outcome, Outcome::LockNotAvailable(_))
    };
    db.with_transaction(TransactionOptions::new(), |tx| {
        let other = other.clone();
        Box::pin(async move {
            let sp = tx.savepoint()?;
            assert!(sp.lock_row::<Account>(&1, Lock::new()).await?.is_done());
            sp.rollback();
            assert!(busy(other.clone()).await, "not sent yet: still held");
            tx.execute("SELECT 1", &[]).await?;
            assert!(!busy(other.clone()).await, "rolled back: free");
            Ok::<_, rowlock::Error>(())
        })
    })
    .await
    .unwrap();
}
