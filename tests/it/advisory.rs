//! Transaction-scoped advisory locks: contention, waiting, release at commit and rollback.

use std::time::Duration;

use rowlock::tokio_postgres::error::SqlState;
use rowlock::{AdvisoryKey, ErrorKind, Lock, Outcome};
use rowlock_testing::{Session, wait_for_blocked_by};

use crate::support::{AppError, WAIT, accounts};

const KEY: i64 = 4242;

fn ran(_: &rowlock::Transaction) -> rowlock::BoxFuture<'_, Result<&'static str, rowlock::Error>> {
    Box::pin(async { Ok("ran") })
}

/// True if `session` can take `pg_try_advisory_xact_lock(key)` right now (then releases it).
async fn free(session: &Session, key: i64) -> bool {
    let row = session
        .query_one(
            "SELECT pg_try_advisory_xact_lock($1) FROM (SELECT 1) one",
            &[&key],
        )
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test]
async fn nowait_timeout_and_wait_against_a_holder() {
    let (pg, db) = accounts(0).await;
    let holder = pg.session().await.unwrap();
    holder.execute("BEGIN", &[]).await.unwrap();
    holder
        .execute("SELECT pg_advisory_xact_lock($1)", &[&KEY])
        .await
        .unwrap();
    let key = AdvisoryKey::single(KEY);

    let nowait = Lock::no_wait();
    let outcome = db.with_advisory_lock(key, &nowait, ran).await.unwrap();
    assert!(
        matches!(&outcome, Outcome::LockNotAvailable(e) if e.is_lock_not_available()),
        "{outcome:?}"
    );
    // Logged with `{e}`, the error says what it was taking (it said "locking rows").
    let said = outcome.to_string();
    assert!(said.contains("the advisory lock"), "{said}");
    assert!(!said.contains("rows"), "{said}");
    // …and which one: the caller may take several.
    assert!(said.contains("advisory lock 4242"), "{said}");

    let timeout = Lock::new().lock_timeout(Duration::from_millis(100));
    let outcome = db.with_advisory_lock(key, &timeout, ran).await.unwrap();
    let Outcome::LockTimeout(e) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(e.sql_state(), Some(&SqlState::LOCK_NOT_AVAILABLE));
    let said = e.to_string();
    assert!(said.contains("while taking the advisory lock"), "{said}");
    assert!(said.contains("waiting for advisory lock 4242"), "{said}");
    assert!(said.contains("lock timeout"), "{said}");
    assert_eq!(AdvisoryKey::pair(7, 42).to_string(), "(7, 42)");
    // A bare number or pair is a key too (a literal infers as the `i64` of `KEY`).
    let outcome = db.with_advisory_lock(4242, &nowait, ran).await.unwrap();
    assert!(
        matches!(outcome, Outcome::LockNotAvailable(_)),
        "{outcome:?}"
    );
    let outcome = db.with_advisory_lock((7, 42), &nowait, ran).await.unwrap();
    assert!(matches!(outcome, Outcome::Done("ran")), "{outcome:?}");

    // A different key space: pair keys never collide with single keys.
    let outcome = db
        .with_advisory_lock(AdvisoryKey::pair(0, KEY as i32), &nowait, ran)
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Done("ran")), "{outcome:?}");

    let waiter = tokio::spawn({
        let db = db.clone();
        async move { db.with_advisory_lock(key, &Lock::new(), ran).await }
    });
    let observer = pg.client().await.unwrap();
    wait_for_blocked_by(&observer, holder.pid(), 1, WAIT)
        .await
        .unwrap();
    assert!(!waiter.is_finished());
    holder.execute("COMMIT", &[]).await.unwrap();
    let outcome = waiter.await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Done("ran")), "{outcome:?}");
}

#[tokio::test]
async fn the_lock_is_released_at_commit_and_at_rollback() {
    let (pg, db) = accounts(0).await;
    let other = pg.session().await.unwrap();
    let key = AdvisoryKey::single(KEY);
    let nowait = Lock::no_wait();
    let outcome = db
        .with_advisory_lock(key, &nowait, |_| {
            Box::pin(async { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap();
    assert!(outcome.is_done());
    assert!(free(&other, KEY).await, "released at commit");

    let result = db
        .with_advisory_lock(key, &nowait, |_| {
            Box::pin(async { Err::<(), _>(AppError::Conflict) })
        })
        .await;
    assert!(matches!(result, Err(AppError::Conflict)));
    assert!(free(&other, KEY).await, "released at rollback");

    let skip = Lock::skip_locked();
    let err = db.with_advisory_lock(key, &skip, ran).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(
        db.pool().status().size,
        1,
        "the refused call took no new connection"
    );
}
