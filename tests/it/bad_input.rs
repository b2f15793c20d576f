//! Bad input gets a clear error and changes nothing.

use std::time::Duration;

use rowlock::tokio_postgres::error::SqlState;
use rowlock::tokio_postgres::{Error as PgError, Row};
use rowlock::{ErrorKind, Lock, LockableRow, Table, TransactionOptions};

use crate::support::{Account, accounts, balance};

struct HostileTable;
impl LockableRow for HostileTable {
    type Key = i64;
    const TABLE: Table = Table::new("accounts\" WHERE true; DROP TABLE accounts; --");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    fn from_row(_: &Row) -> Result<Self, PgError> {
        Ok(HostileTable)
    }
    fn key(&self) -> i64 {
        0
    }
}

struct HostileColumn;
impl LockableRow for HostileColumn {
    type Key = i64;
    const TABLE: Table = Table::new("accounts");
    const KEY_COLUMNS: &'static [&'static str] = &["id\" = 1 OR true; DELETE FROM accounts; --"];
    fn from_row(_: &Row) -> Result<Self, PgError> {
        Ok(HostileColumn)
    }
    fn key(&self) -> i64 {
        0
    }
}

struct ArityMismatch;
impl LockableRow for ArityMismatch {
    type Key = (i64, i64);
    const TABLE: Table = Table::new("accounts");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    fn from_row(_: &Row) -> Result<Self, PgError> {
        Ok(ArityMismatch)
    }
    fn key(&self) -> (i64, i64) {
        (0, 0)
    }
}

/// `public.accounts` written as one name: a table called "public.accounts", dot included.
struct DottedTable;
impl LockableRow for DottedTable {
    type Key = i64;
    const TABLE: Table = Table::new("public.accounts");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    fn from_row(_: &Row) -> Result<Self, PgError> {
        Ok(DottedTable)
    }
    fn key(&self) -> i64 {
        0
    }
}

fn ok<R>(_: &rowlock::Transaction, _: R) -> rowlock::BoxFuture<'_, Result<(), rowlock::Error>> {
    Box::pin(async { Ok(()) })
}

#[tokio::test]
async fn hostile_identifiers_cannot_inject_sql() {
    let (pg, db) = accounts(2).await;
    let client = pg.client().await.unwrap();
    let err = db
        .with_locked_row(&1, &Lock::new(), ok::<HostileTable>)
        .await
        .unwrap_err();
    assert_eq!(err.sql_state(), Some(&SqlState::UNDEFINED_TABLE), "{err}");
    let err = db
        .with_locked_row(&1, &Lock::new(), ok::<HostileColumn>)
        .await
        .unwrap_err();
    assert_eq!(err.sql_state(), Some(&SqlState::UNDEFINED_COLUMN), "{err}");
    let err = db
        .with_locked_rows(&[1, 2], &Lock::new(), ok::<Vec<HostileColumn>>)
        .await
        .unwrap_err();
    assert_eq!(err.sql_state(), Some(&SqlState::UNDEFINED_COLUMN), "{err}");
    let rows: i64 = client
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2, "the table and its rows are intact");
}

#[tokio::test]
async fn invalid_arguments_are_refused_before_taking_a_connection() {
    let (_db, db) = accounts(1).await;
    let cases: Vec<(&str, Lock)> = vec![
        (
            "zero lock timeout",
            Lock::new().lock_timeout(Duration::ZERO),
        ),
        (
            "sub-ms lock timeout",
            Lock::new().lock_timeout(Duration::from_micros(10)),
        ),
        (
            "absurd lock timeout",
            Lock::new().lock_timeout(Duration::from_secs(1 << 40)),
        ),
        (
            "zero statement timeout",
            Lock::new().transaction(TransactionOptions::new().statement_timeout(Duration::ZERO)),
        ),
        (
            "read-only lock",
            Lock::new().transaction(TransactionOptions::new().read_only(true)),
        ),
    ];
    for (name, opts) in cases {
        let err = db
            .with_locked_row(&1, &opts, ok::<Account>)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{name}: {err}");
        let err = db
            .with_locked_rows(&[1], &opts, ok::<Vec<Account>>)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{name}: {err}");
    }
    let err = db
        .with_locked_row(&(1, 1), &Lock::new(), ok::<ArityMismatch>)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    let err = db
        .with_locked_rows(&[], &Lock::new(), ok::<Vec<Account>>)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    // Found from a service's own crate: the server's "relation \"public.accounts\" does not
    // exist" read as if the schema-qualified table were missing.
    let err = db
        .with_locked_row(&1, &Lock::new(), ok::<DottedTable>)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(
        err.to_string()
            .contains("Table::qualified(\"public\", \"accounts\")"),
        "{err}"
    );
    let bad_tx = TransactionOptions::new().lock_timeout(Duration::ZERO);
    let err = db
        .with_transaction(&bad_tx, |_| Box::pin(async { Ok::<_, rowlock::Error>(()) }))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert_eq!(db.pool().status().size, 0, "no connection was ever opened");
}

#[tokio::test]
async fn a_key_that_matches_several_rows_is_refused_and_rolled_back() {
    let (pg, db) = accounts(0).await;
    let client = pg.client().await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE dup (id bigint, balance bigint); INSERT INTO dup VALUES (1, 1), (1, 2)",
        )
        .await
        .unwrap();
    struct Dup;
    impl LockableRow for Dup {
        type Key = i64;
        const TABLE: Table = Table::new("dup");
        const KEY_COLUMNS: &'static [&'static str] = &["id"];
        fn from_row(_: &Row) -> Result<Self, PgError> {
            Ok(Dup)
        }
        fn key(&self) -> i64 {
            1
        }
    }
    let err = db
        .with_locked_row(&1, &Lock::new(), ok::<Dup>)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::KeyNotUnique, "{err}");
    let err = db
        .with_locked_rows(&[1], &Lock::new(), ok::<Vec<Dup>>)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::KeyNotUnique, "{err}");
}

#[tokio::test]
async fn closed_pool_and_unreachable_server_are_clear_errors() {
    let (_db, db) = accounts(1).await;
    db.pool().close();
    let err = db
        .with_locked_row(&1, &Lock::new(), ok::<Account>)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Pool, "{err}");
    // A log line of `{err}` alone says why: the pool was closed, not "could not get" and no more.
    assert!(err.to_string().contains("the pool is closed"), "{err}");
    assert!(!err.is_retryable(), "{err}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = rowlock::tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("nobody")
        .dbname("nowhere");
    let manager = rowlock::deadpool_postgres::Manager::new(config, rowlock::tokio_postgres::NoTls);
    let dead = rowlock::Db::from_pool(
        rowlock::deadpool_postgres::Pool::builder(manager)
            .max_size(1)
            .build()
            .unwrap(),
    );
    let err = dead
        .with_locked_row(&1, &Lock::new(), ok::<Account>)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unreachable, "{err}");
    assert!(err.is_retryable(), "a server that is down may come back");
}

/// A proxy that accepts connections with no server behind it (HAProxy during a failover)
/// never answers: after the pool's `create_timeout` that is `Unreachable` (retried), not a
/// full pool.
#[tokio::test]
async fn a_server_that_never_answers_is_unreachable_after_the_create_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            held.push(socket); // accepted, never answered
        }
    });
    let db = rowlock::Db::builder()
        .url(&format!("postgres://nobody@127.0.0.1:{port}/nowhere"))
        .create_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let err = db
        .with_locked_row(&1, &Lock::new(), ok::<Account>)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unreachable, "{err}");
    assert!(err.to_string().contains("create_timeout"), "{err}");
    assert!(err.is_retryable());
    silent.abort();
}

#[tokio::test]
async fn connection_killed_inside_the_closure_is_a_closed_error_and_the_pool_recovers() {
    let (pg, db) = accounts(1).await;
    let client = pg.client().await.unwrap();
    let cluster = rowlock_testing::TestCluster::shared().unwrap();
    let err = db
        .with_locked_row(&1, &Lock::new(), |tx, acc: Account| {
            Box::pin(async move {
                tx.execute("UPDATE accounts SET balance = 0 WHERE id = $1", &[&acc.id])
                    .await?;
                let pid: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
                cluster.terminate_backend(pid).await.expect("terminate");
                tx.execute("UPDATE accounts SET balance = 1 WHERE id = $1", &[&acc.id])
                    .await?;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    assert_eq!(
        balance(&client, 1).await,
        100,
        "nothing the dead session wrote is visible"
    );
    let outcome = db
        .with_locked_row(&1, &Lock::new(), ok::<Account>)
        .await
        .unwrap();
    assert!(outcome.is_done(), "the pool serves new calls");
}

#[tokio::test]
async fn connection_strings_that_cannot_connect_are_refused_at_once() {
    for url in ["", "user=app dbname=app", "host=localhost dbname=app"] {
        let err = rowlock::Db::from_url(url).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{url:?}: {err}");
    }
    // The message says which option is wrong (it said only "invalid connection string"), and
    // never prints the password.
    for (url, names) in [
        ("postgres://app:s3cret@localhost:99999/app", "port"),
        (
            "postgres://app:s3cret@localhost/app?sslmode=sometimes",
            "sslmode",
        ),
    ] {
        let err = rowlock::Db::from_url(url).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{url:?}: {err}");
        let text = err.to_string();
        assert!(text.contains(names), "{url:?}: {text}");
        assert!(!text.contains("s3cret"), "{url:?}: {text}");
    }
    // libpq's verify modes, which a service copies from its provider's docs: what to write.
    for url in [
        "postgres://app@localhost/app?sslmode=verify-full",
        "host=localhost user=app sslmode=verify-ca",
    ] {
        let err = rowlock::Db::from_url(url).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{url:?}: {err}");
        let text = err.to_string();
        assert!(
            text.contains("sslmode=require") && text.contains("rustls"),
            "{url:?}: {text}"
        );
    }
    // libpq's other values tokio-postgres does not read (a multi-host URL for failover names
    // `target_session_attrs=primary`): each says what to write instead.
    for (url, write) in [
        (
            "postgres://app@db-a,db-b/app?connect_timeout=2&target_session_attrs=primary",
            "target_session_attrs=read-write",
        ),
        (
            "host=db-a,db-b user=app target_session_attrs=prefer-standby",
            "target_session_attrs=read-write",
        ),
        (
            "postgres://app@db-a/app?target_session_attrs=standby",
            "target_session_attrs=read-write",
        ),
        ("postgres://app@db-a/app?sslmode=allow", "sslmode=prefer"),
    ] {
        let err = rowlock::Db::from_url(url).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{url:?}: {err}");
        let text = err.to_string();
        assert!(
            text.contains("libpq") && text.contains(write),
            "{url:?}: {text}"
        );
    }
}

#[tokio::test]
async fn an_unknown_database_or_role_is_its_own_error_and_not_retried() {
    let (pg, _) = accounts(1).await;
    let base = pg.config().clone();
    let policy = rowlock::RetryPolicy::new();
    for (config, kind) in [
        (
            base.clone().dbname("no_such_database").to_owned(),
            ErrorKind::UnknownDatabase,
        ),
        (
            base.clone().user("no_such_role").to_owned(),
            ErrorKind::AuthenticationFailed,
        ),
    ] {
        let db = rowlock::Db::builder()
            .max_size(1)
            .config(config)
            .build()
            .unwrap();
        let err = db
            .with_locked_row(&1, Lock::new().retry(&policy), |_, _: Account| {
                Box::pin(async { Ok::<_, rowlock::Error>(()) })
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), kind, "{err}");
        assert!(!err.is_retryable(), "{err}");
        assert!(
            err.to_string().contains("no_such_"),
            "the server's message: {err}"
        );
    }
}

/// `accounts` with a key type narrower than its `bigint` column.
#[derive(Debug)]
struct NarrowAccount;

impl LockableRow for NarrowAccount {
    type Key = i32;
    const TABLE: Table = Table::new("accounts");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    fn from_row(_: &Row) -> Result<Self, PgError> {
        Ok(NarrowAccount)
    }
    fn key(&self) -> i32 {
        0
    }
}

#[tokio::test]
async fn a_key_of_the_wrong_type_is_an_invalid_argument_naming_it_on_every_path() {
    let (pg, db) = accounts(2).await;
    let one = db
        .with_locked_row(&1, &Lock::new(), ok::<NarrowAccount>)
        .await
        .unwrap_err();
    let many = db
        .with_locked_rows(&[1, 2], &Lock::new(), ok::<Vec<NarrowAccount>>)
        .await
        .unwrap_err();
    let add = rowlock::Transition::new("balance = balance + 1");
    let moved = db
        .transition::<NarrowAccount>(&1, &add, &[])
        .await
        .map(|_| ())
        .unwrap_err();
    let tx = db.begin(&rowlock::TransactionOptions::new()).await.unwrap();
    let inside = tx
        .lock_row::<NarrowAccount>(&1, &Lock::new())
        .await
        .map(|_| ())
        .unwrap_err();
    tx.commit()
        .await
        .expect("a refused key sent nothing: the transaction is healthy");
    for (err, named) in [
        (one, "the key of \"accounts\""),
        (many, "a key of \"accounts\""),
        (moved, "the key of \"accounts\""),
        (inside, "the key of \"accounts\""),
    ] {
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        let text = err.to_string();
        assert!(text.contains(named), "{text}");
        assert!(text.contains("i32"), "the Rust type: {text}");
    }
    let client = pg.client().await.unwrap();
    assert_eq!(
        crate::support::balance(&client, 1).await,
        100,
        "nothing changed"
    );
}
