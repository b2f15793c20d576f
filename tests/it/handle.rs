//! The handle: its defaults under every call, what its constructors refuse, and what clones
//! share.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rowlock::{Db, ErrorKind, Lock, Outcome, RetryPolicy, TransactionOptions};

use crate::support::{Account, accounts};

const RAISE_40001: &str =
    "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = 'serialization_failure'; END $$";

fn touch(
    _: &rowlock::Transaction,
    _: Account,
) -> rowlock::BoxFuture<'_, Result<(), rowlock::Error>> {
    Box::pin(async { Ok(()) })
}

/// Fails its first call with a serialization failure; says which call it was.
fn conflict_once(
    calls: Arc<AtomicU32>,
) -> impl for<'t> FnMut(&'t rowlock::Transaction) -> rowlock::BoxFuture<'t, Result<u32, rowlock::Error>>
{
    move |tx| {
        let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            if call == 1 {
                tx.batch_execute(RAISE_40001).await?;
            }
            Ok(call)
        })
    }
}

#[test]
fn the_handle_is_cheap_to_share() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<Db>();
}

#[tokio::test]
async fn the_handles_lock_timeout_bounds_every_call_unless_the_call_sets_its_own() {
    let (pg, _) = accounts(1).await;
    let db = pg
        .db_with(
            Db::builder()
                .max_size(2)
                .lock_timeout(Duration::from_millis(50)),
        )
        .unwrap();
    let holder = pg.session().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM accounts WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let outcome = db.with_locked_row(&1, Lock::wait(), touch).await.unwrap();
    assert!(matches!(outcome, Outcome::LockTimeout(_)), "{outcome:?}");
    // The call's own timeout wins: still a timeout, but after the call's 300 ms.
    let started = std::time::Instant::now();
    let outcome = db
        .with_locked_row(
            &1,
            Lock::wait().lock_timeout(Duration::from_millis(300)),
            touch,
        )
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::LockTimeout(_)), "{outcome:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert!(
        db.with_locked_row(&1, Lock::wait(), touch)
            .await
            .unwrap()
            .is_done()
    );
}

#[tokio::test]
async fn the_handles_retry_policy_reruns_every_call_unless_the_call_sets_its_own() {
    let (pg, _) = accounts(1).await;
    let db = pg
        .db_with(
            Db::builder()
                .max_size(2)
                .retry(RetryPolicy::new().max_attempts(3)),
        )
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let call = db
        .with_transaction(TransactionOptions::new(), conflict_once(calls.clone()))
        .await
        .unwrap();
    assert_eq!(call, 2, "retried under the handle's policy");

    calls.store(0, Ordering::SeqCst);
    let once = TransactionOptions::new().retry(1);
    let err = db
        .with_transaction(once, conflict_once(calls.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SerializationFailure, "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the call's policy wins");
}

#[tokio::test]
async fn a_bare_number_of_attempts_retries_a_busy_row() {
    let (pg, db) = accounts(1).await;
    let holder = pg.session().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM accounts WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let err = db
        .with_locked_row(&1, Lock::no_wait().retry(3), touch)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RetriesExhausted, "{err}");
    assert_eq!(err.attempts(), Some(3));
    let last = err.last_attempt().expect("the last failure");
    assert_eq!(last.kind(), ErrorKind::LockNotAvailable, "{last}");
    assert_eq!(last.rows(), [rowlock::RowRef::of::<Account>(&1)]);
    holder.batch_execute("ROLLBACK").await.unwrap();
    let outcome = db
        .with_locked_row(&1, Lock::no_wait().retry(3), touch)
        .await
        .unwrap();
    assert!(outcome.is_done());
}

#[tokio::test]
async fn begin_refuses_a_retry_policy_and_takes_no_connection() {
    let (_pg, db) = accounts(1).await;
    let err = db
        .begin(TransactionOptions::new().retry(3))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert_eq!(db.pool().status().size, 0, "no connection was opened");
}

#[test]
fn constructors_refuse_what_could_never_connect() {
    for url in [
        "",
        "   ",
        "user=app dbname=app",
        "host=localhost dbname=app",
        "s3cret",
    ] {
        let err = Db::from_url(url).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{url:?}: {err}");
    }
    let err = Db::builder().build().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    let pool = rowlock::deadpool_postgres::Pool::builder(rowlock::deadpool_postgres::Manager::new(
        "host=localhost user=app".parse().unwrap(),
        rowlock::tokio_postgres::NoTls,
    ))
    .build()
    .unwrap();
    let err = Db::builder()
        .pool(pool)
        .check_primary(true)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
}

#[test]
fn debug_output_names_no_secret() {
    let db = Db::from_url("postgres://app:s3cret@localhost/app").unwrap();
    let shown = format!("{db:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("max_size"), "{shown}");
}
