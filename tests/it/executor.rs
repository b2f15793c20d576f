//! One executor trait: a repository function used inside a locked call and outside it, on
//! every kind of client, with rowlock's error tracking kept.

use rowlock::{ErrorKind, Executor, Lock, Outcome, TransactionOptions};

use crate::support::{Account, accounts, notes};

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
    // On a plain tokio-postgres client, and in its transaction.
    let mut client = pg.client().await.unwrap();
    add_note(&client, 1, "c").await.unwrap();
    let tx = client.transaction().await.unwrap();
    add_note(&tx, 1, "d").await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(notes(&client).await, ["a", "b", "c", "d"]);
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
