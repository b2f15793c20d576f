//! Pools from configuration: a URL, the options' timeouts, and clear refusals.

use std::time::Duration;

use rowlock::{Db, ErrorKind, Lock, Outcome};

use crate::support::{Account, accounts};

#[tokio::test]
async fn a_pool_from_the_test_databases_url_locks_rows() {
    let (pg, _) = accounts(1).await;
    let db = Db::from_url(&pg.url()).unwrap();
    let outcome = db
        .with_locked_row(&1, &Lock::new(), |_, a: Account| {
            Box::pin(async move { Ok::<_, rowlock::Error>(a.balance) })
        })
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Done(100)));
}

#[tokio::test]
async fn the_wait_timeout_refuses_a_caller_when_the_pool_is_exhausted() {
    let (pg, _) = accounts(1).await;
    let options = Db::builder()
        .max_size(1)
        .wait_timeout(Duration::from_millis(100));
    let db = pg.db_with(options).unwrap();
    let held = db.pool().get().await.unwrap();
    let err = db
        .with_locked_row(&1, &Lock::new(), |_, _: Account| {
            Box::pin(async { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PoolTimeout, "{err}");
    // What a log line needs to tell an exhausted pool from a slow server.
    let said = err.to_string();
    assert!(
        said.contains("all 1 connection(s)") && said.contains("wait_timeout (100ms)"),
        "{said}"
    );
    drop(held);
    let outcome = db
        .with_locked_row(&1, &Lock::new(), |_, _: Account| {
            Box::pin(async { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap();
    assert!(outcome.is_done());

    // The usual way a service starves its own pool: the handle, not the closure's
    // transaction, passed to code called inside a locked call. The refusal names that cause.
    let inner = db.clone();
    let err = db
        .with_locked_row(&1, &Lock::new(), |_, _: Account| {
            let inner = inner.clone();
            Box::pin(async move {
                inner
                    .with_transaction(rowlock::TransactionOptions::new(), |tx| {
                        Box::pin(async move { tx.execute("SELECT 1", &[]).await })
                    })
                    .await
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PoolTimeout, "{err}");
    assert!(
        err.to_string().contains("pass the closure's Transaction"),
        "{err}"
    );
}

/// A checkout first takes an idle connection without waiting; when there is none it queues in
/// the pool: the call goes on as soon as a connection comes back, and a caller that gives up
/// while queued leaves the pool whole.
#[tokio::test]
async fn a_call_waits_in_the_pools_queue_when_every_connection_is_in_use() {
    let (pg, _) = accounts(1).await;
    let db = pg
        .db_with(
            Db::builder()
                .max_size(1)
                .wait_timeout(Duration::from_secs(30)),
        )
        .unwrap();
    let held = db.pool().get().await.unwrap();
    let queued = |db: &Db| {
        let db = db.clone();
        tokio::spawn(async move {
            db.with_locked_row(&1, &Lock::new(), |_, a: Account| {
                Box::pin(async move { Ok::<_, rowlock::Error>(a.balance) })
            })
            .await
        })
    };
    // Given up while queued: the pool still has its one connection.
    let gave_up = queued(&db);
    wait_for_waiters(&db, 1).await;
    gave_up.abort();
    assert!(gave_up.await.unwrap_err().is_cancelled());
    wait_for_waiters(&db, 0).await;

    let waiting = queued(&db);
    wait_for_waiters(&db, 1).await;
    drop(held);
    let outcome = waiting.await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Done(100)), "{outcome:?}");
    let status = db.pool().status();
    assert_eq!((status.size, status.available, status.waiting), (1, 1, 0));
}

/// A handle shared by tests, each on its own current-thread runtime (`#[tokio::test]`): a
/// connection another test's runtime opened is replaced at checkout. Its task runs only on
/// that runtime, which ends with its test: a transaction on it failed with "connection closed
/// while running a statement" when the other test ended.
#[test]
fn a_connection_another_threads_runtime_drives_is_replaced_at_checkout() {
    let here = runtime();
    let (_pg, db) = one_connection(&here);
    let balance = |db: &Db| {
        let db = db.clone();
        async move {
            db.with_locked_row(&1, &Lock::new(), |_, a: Account| {
                Box::pin(async move { Ok::<_, rowlock::Error>(a.balance) })
            })
            .await
        }
    };
    // Another "test": opens the pool's one connection on its runtime, then ends when told.
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let (end_tx, end_rx) = tokio::sync::oneshot::channel::<()>();
    let other = {
        let db = db.clone();
        std::thread::spawn(move || {
            let there = runtime();
            there.block_on(async {
                opened_tx.send(balance(&db).await.unwrap()).unwrap();
                end_rx.await.unwrap();
            });
        })
    };
    assert!(matches!(opened_rx.recv().unwrap(), Outcome::Done(100)));
    let mut other = Some((end_tx, other));
    let outcome = here
        .block_on(db.with_locked_row(&1, &Lock::new(), |tx, a: Account| {
            let other = other.take();
            Box::pin(async move {
                if let Some((end, thread)) = other {
                    // The other test ends (and its runtime with it) while this one's
                    // transaction is open.
                    end.send(()).unwrap();
                    tokio::task::spawn_blocking(move || thread.join().unwrap())
                        .await
                        .unwrap();
                }
                tx.execute(
                    "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                    &[&a.id],
                )
                .await?;
                Ok::<_, rowlock::Error>(())
            })
        }))
        .unwrap();
    assert!(outcome.is_done(), "{outcome:?}");
    assert!(matches!(
        here.block_on(balance(&db)).unwrap(),
        Outcome::Done(101)
    ));
}

/// Two runtimes taking turns on one thread (a runtime per `block_on` in synchronous code): a
/// call on the second waited for ever on the connection the first opened, whose task runs
/// only while the first runs.
#[test]
fn runtimes_taking_turns_on_one_thread_each_use_their_own_connections() {
    let first = runtime();
    let (_pg, db) = one_connection(&first);
    let bump = |db: &Db| {
        let db = db.clone();
        async move {
            let lock = Lock::new();
            let call = db.with_locked_row(&1, &lock, |tx, a: Account| {
                Box::pin(async move {
                    tx.execute(
                        "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                        &[&a.id],
                    )
                    .await?;
                    Ok::<_, rowlock::Error>(a.balance + 1)
                })
            });
            tokio::time::timeout(Duration::from_secs(10), call)
                .await
                .expect("the call waited on a connection whose runtime is not running")
                .unwrap()
        }
    };
    let second = runtime();
    assert!(matches!(first.block_on(bump(&db)), Outcome::Done(101)));
    assert!(matches!(second.block_on(bump(&db)), Outcome::Done(102)));
    assert!(matches!(first.block_on(bump(&db)), Outcome::Done(103)));
    assert_eq!(db.pool().status().size, 1);
}

/// A current-thread runtime, as `#[tokio::test]` makes.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The accounts database (made on `rt`) and a handle to it with one connection.
fn one_connection(rt: &tokio::runtime::Runtime) -> (rowlock_testing::TestDatabase, Db) {
    let (pg, _) = rt.block_on(accounts(1));
    let db = pg.db_with(Db::builder().max_size(1)).unwrap();
    (pg, db)
}

/// Waits until `n` callers are queued for a connection of `db`'s pool.
async fn wait_for_waiters(db: &Db, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while db.pool().status().waiting != n {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            db.pool().status()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[test]
fn bad_urls_and_options_are_refused_without_echoing_the_secret() {
    for url in [
        "postgres://app:s3cret@db:not-a-port/app",
        "host=db password=s3cret port=",
        "s3cret",
    ] {
        let err = Db::from_url(url).unwrap_err();
        assert!(err.is_invalid_argument(), "{url}: {err:?}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
    for options in [
        Db::builder().max_size(0),
        Db::builder().wait_timeout(Duration::ZERO),
        Db::builder().create_timeout(Duration::from_micros(10)),
        Db::builder().lock_timeout(Duration::ZERO),
        Db::builder().retry(rowlock::RetryPolicy::new().max_attempts(0)),
    ] {
        let options = options.url("postgres://app@localhost/app");
        assert!(options.build().unwrap_err().is_invalid_argument());
    }
}
