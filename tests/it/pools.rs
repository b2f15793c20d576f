//! Pools from configuration: a URL, the options' timeouts, and clear refusals.

use std::time::Duration;

use rowlock::{ErrorKind, LockOptions, Outcome, PoolOptions, pool_from_url, with_locked_row};

use crate::support::{Account, accounts};

#[tokio::test]
async fn a_pool_from_the_test_databases_url_locks_rows() {
    let (db, _) = accounts(1).await;
    let pool = pool_from_url(&db.url()).unwrap();
    let outcome = with_locked_row(&pool, &1, &LockOptions::new(), |_, a: Account| {
        Box::pin(async move { Ok::<_, rowlock::Error>(a.balance) })
    })
    .await
    .unwrap();
    assert!(matches!(outcome, Outcome::Done(100)));
}

#[tokio::test]
async fn the_wait_timeout_refuses_a_caller_when_the_pool_is_exhausted() {
    let (db, _) = accounts(1).await;
    let options = PoolOptions::new()
        .max_size(1)
        .wait_timeout(Duration::from_millis(100));
    let pool = db.pool_with(&options).unwrap();
    let held = pool.get().await.unwrap();
    let err = with_locked_row(&pool, &1, &LockOptions::new(), |_, _: Account| {
        Box::pin(async { Ok::<_, rowlock::Error>(()) })
    })
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PoolTimeout, "{err}");
    drop(held);
    let outcome = with_locked_row(&pool, &1, &LockOptions::new(), |_, _: Account| {
        Box::pin(async { Ok::<_, rowlock::Error>(()) })
    })
    .await
    .unwrap();
    assert!(outcome.is_done());
}

#[test]
fn bad_urls_and_options_are_refused_without_echoing_the_secret() {
    for url in [
        "postgres://app:s3cret@db:not-a-port/app",
        "host=db password=s3cret port=",
        "s3cret",
    ] {
        let err = pool_from_url(url).unwrap_err();
        assert!(err.is_invalid_argument(), "{url}: {err:?}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
    for options in [
        PoolOptions::new().max_size(0),
        PoolOptions::new().wait_timeout(Duration::ZERO),
        PoolOptions::new().create_timeout(Duration::from_micros(10)),
    ] {
        assert!(options.validate().unwrap_err().is_invalid_argument());
    }
}
