//! Closures that borrow from the caller's scope, whose futures stay `Send`: used in an axum
//! handler and in `tokio::spawn` (those two only have to compile).

use rowlock::Db;
use rowlock::{Lock, Outcome, Savepoint, TransactionOptions};

use crate::support::{Account, accounts};

/// `note` is borrowed from the caller, not moved or cloned into the closure.
async fn annotate(db: &Db, id: i64, note: &str) -> Result<Outcome<u64>, rowlock::Error> {
    db.with_locked_row(&id, &Lock::new(), |tx, acc: Account| {
        Box::pin(async move {
            tx.execute(
                "INSERT INTO audit (account_id, note) VALUES ($1, $2)",
                &[&acc.id, &note],
            )
            .await
        })
    })
    .await
}

/// Borrowing a caller's options and a slice inside `with_transaction` and a savepoint.
async fn annotate_all(db: &Db, notes: &[String], opts: &Lock) -> Result<usize, rowlock::Error> {
    db.with_transaction(&TransactionOptions::new(), |tx| {
        Box::pin(async move {
            let _ = tx.lock_row::<Account>(&1, opts).await?;
            for note in notes {
                let sp: Savepoint<'_> = tx.savepoint()?;
                sp.execute(
                    "INSERT INTO audit (account_id, note) VALUES (1, $1)",
                    &[note],
                )
                .await?;
                sp.release()?;
            }
            Ok(notes.len())
        })
    })
    .await
}

#[tokio::test]
async fn closures_borrow_from_the_callers_scope() {
    let (pg, db) = accounts(1).await;
    let note = format!("note {}", 1);
    let outcome = annotate(&db, 1, &note).await.unwrap();
    assert!(matches!(outcome, Outcome::Done(1)));
    let notes = vec!["a".to_string(), "b".to_string()];
    assert_eq!(annotate_all(&db, &notes, &Lock::new()).await.unwrap(), 2);
    let count: i64 = pg
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM audit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 3);
}

// The futures are Send: an axum handler and a spawned task that borrow inside.

async fn handler(
    axum::extract::State(db): axum::extract::State<Db>,
    axum::extract::Path(id): axum::extract::Path<i64>,
    body: String,
) -> Result<String, axum::http::StatusCode> {
    let trimmed = body.trim();
    match annotate(&db, id, trimmed).await {
        Ok(Outcome::Done(_)) => Ok("ok".into()),
        Ok(_) => Err(axum::http::StatusCode::CONFLICT),
        Err(_) => Err(axum::http::StatusCode::INTERNAL_SERVER_ERROR),
    }
}

#[allow(dead_code)]
fn router(db: Db) -> axum::Router {
    axum::Router::new()
        .route("/accounts/{id}/notes", axum::routing::post(handler))
        .with_state(db)
}

#[allow(dead_code)]
fn spawned(db: Db) -> tokio::task::JoinHandle<Result<usize, rowlock::Error>> {
    tokio::spawn(async move {
        let notes = vec!["spawned".to_string()];
        let opts = Lock::new();
        annotate_all(&db, &notes, &opts).await
    })
}
