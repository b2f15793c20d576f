//! One executor trait: a repository function used inside a locked call and outside it, on
//! every kind of client, with rowlock's error tracking kept.

use rowlock::{ErrorKind, Executor, Lock, Outcome, TransactionOptions};

use rowlock_testing::wait_for_blocked_by;

use crate::support::{Account, WAIT, accounts, balance, notes};

/// A repository function as a service writes it.
async fn add_note(pg: &impl Executor, account: i64, note: &str) -> Result<u64, rowlock::Error> {
    pg.execute(
        "INSERT INTO audit (account_id, note) VALUES ($1, $2)",
        &[&account, &note],
    )
    .await
}

#[tokio::test]
async fn a_repository_function_runs_on_every_client() {
    let (pg, db) = accounts(1).await;
    // Inside a locked call, in rowlock's transaction.
    let outcome = db
        .with_locked_row(&1, &Lock::new(), |tx, acc: Account| {
            Box::pin(async move { add_note(tx, acc.id, "a").await })
        })
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Done(1)));
    // On a pooled connection, outside any transaction; spawned, so the future is Send.
    let object = db.pool().get().await.unwrap();
    tokio::spawn(async move { add_note(&object, 1, "b").await })
        .await
        .unwrap()
        .unwrap();
    // Through the handle, outside any transaction: a transaction of its own.
    let handle = db.clone();
    tokio::spawn(async move { add_note(&handle, 1, "b2").await })
        .await
        .unwrap()
        .unwrap();
    // On a plain tokio-postgres client, and in its transaction.
    let mut client = pg.client().await.unwrap();
    add_note(&client, 1, "c").await.unwrap();
    let tx = client.transaction().await.unwrap();
    add_note(&tx, 1, "d").await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(notes(&client).await, ["a", "b", "b2", "c", "d"]);
    assert_eq!(notes(&db).await, ["a", "b", "b2", "c", "d"]);
    // A failure is rowlock's error, with the server's message.
    let err = add_note(&client, 1, "a").await.unwrap_err();
    assert_eq!(err.sql_state().map(|s| s.code()), Some("23505"), "{err}");
}

#[tokio::test]
async fn errors_through_the_trait_are_still_tracked() {
    let (pg, db) = accounts(1).await;
    pg.client()
        .await
        .unwrap()
        .execute("INSERT INTO audit VALUES (1, 'a')", &[])
        .await
        .unwrap();
    let err = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move {
                add_note(tx, 1, "b").await?;
                let _ = add_note(tx, 1, "a").await; // swallowed
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TransactionAborted);
    assert_eq!(
        notes(&pg.client().await.unwrap()).await,
        ["a"],
        "nothing committed"
    );
}

/// The handle as an executor, outside any transaction, goes through rowlock's one path: a
/// call dropped while its statement waits cancels it, so the pool's one connection serves the
/// next caller at once (a deadpool `Object`, which the docs showed for this before, goes back
/// to the pool still running the statement); SQL that would change the pooled session is
/// refused; a prepared statement, which belongs to one connection, is refused.
#[tokio::test]
async fn the_handle_runs_each_statement_in_a_transaction_of_its_own() {
    let (pg, db) = accounts(2).await; // a pool of one connection
    let holder = pg.session().await.unwrap();
    holder.execute("BEGIN", &[]).await.unwrap();
    holder
        .execute("SELECT 1 FROM accounts WHERE id = 1 FOR UPDATE", &[])
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let db = db.clone();
        async move {
            db.execute(
                "UPDATE accounts SET balance = balance + 1 WHERE id = 1",
                &[],
            )
            .await
        }
    });
    let observer = pg.client().await.unwrap();
    wait_for_blocked_by(&observer, holder.pid(), 1, WAIT)
        .await
        .unwrap();
    waiting.abort(); // a cancelled request
    let _ = waiting.await;
    // The holder still holds row 1: a connection still running the update would make this
    // wait for it.
    let updated = tokio::time::timeout(
        WAIT,
        db.execute(
            "UPDATE accounts SET balance = balance + 10 WHERE id = 2",
            &[],
        ),
    )
    .await
    .expect("the pool's connection is free")
    .unwrap();
    assert_eq!(updated, 1);
    holder.execute("ROLLBACK", &[]).await.unwrap();
    assert_eq!(
        balance(&observer, 1).await,
        100,
        "the dropped update never committed"
    );
    assert_eq!(balance(&observer, 2).await, 110);

    // What a transaction refuses, the handle refuses, before anything is sent.
    let err = db
        .batch_execute("SET statement_timeout = '1ms'")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    let timeout: String = db
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "0", "the pooled session is unchanged");
    // A prepared statement belongs to one connection.
    let conn = db.pool().get().await.unwrap();
    let statement = conn.prepare("SELECT 1").await.unwrap();
    drop(conn);
    let err = db.query(&statement, &[]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("SQL text"), "{err}");
}
