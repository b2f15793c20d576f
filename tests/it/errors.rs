//! Errors are printed once: walking an error's `source()` chain, no link repeats what another
//! already says (its whole text, its kind, its SQLSTATE). Each error here is a real one, made
//! by the server.

use std::error::Error as StdError;
use std::time::Duration;

use rowlock::tokio_postgres::Client;
use rowlock::{
    Claim, Direction, ErrorKind, Lock, Outcome, RetryPolicy, Transaction, TransactionOptions,
};

use crate::support::{Account, accounts};

/// The texts of `err` and of every `source()` below it.
fn chain(err: &(dyn StdError + 'static)) -> Vec<String> {
    let mut texts = Vec::new();
    let mut link = Some(err);
    while let Some(e) = link {
        texts.push(e.to_string());
        link = e.source();
    }
    texts
}

/// Asserts that no text in the chain repeats: no link contains another link's whole text,
/// each SQLSTATE is printed at most once, and each rowlock kind is named by one rowlock link
/// only (the server's own message may use the same words).
fn assert_printed_once(err: &rowlock::Error) {
    let texts = chain(err);
    for (i, a) in texts.iter().enumerate() {
        for (j, b) in texts.iter().enumerate() {
            assert!(
                i == j || b.is_empty() || !a.contains(b.as_str()),
                "link {i} repeats link {j}: {texts:#?}"
            );
        }
    }
    let joined = texts.join("\n");
    for code in joined
        .match_indices("SQLSTATE ")
        .map(|(at, _)| &joined[at..at + 14])
    {
        assert_eq!(
            joined.matches(code).count(),
            1,
            "{code} printed more than once: {texts:#?}"
        );
    }
    let mut ours = Vec::new();
    let mut link: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = link {
        if let Some(e) = e.downcast_ref::<rowlock::Error>() {
            ours.push((e.kind().to_string(), e.to_string()));
        }
        link = e.source();
    }
    for (kind, _) in &ours {
        let naming = ours.iter().filter(|(_, text)| text.contains(kind)).count();
        assert_eq!(naming, 1, "{kind:?} named more than once: {texts:#?}");
    }
}

fn never(_: &Transaction, _: Account) -> rowlock::BoxFuture<'_, Result<(), rowlock::Error>> {
    panic!("the row is held elsewhere")
}

async fn hold_row_1(pg: &rowlock_testing::TestDatabase) -> Client {
    let holder = pg.client().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM accounts WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    holder
}

#[tokio::test]
async fn contention_errors_are_printed_once() {
    let (pg, db) = accounts(1).await;
    let _holder = hold_row_1(&pg).await;

    let nowait = Lock::no_wait();
    let outcome = db.with_locked_row(&1, &nowait, never).await.unwrap();
    let Outcome::LockNotAvailable(e) = outcome else {
        panic!("{outcome:?}")
    };
    assert_printed_once(&e);

    // A lock timeout is the same 55P03, told apart: one error, not one inside the other.
    let timeout = Lock::new().lock_timeout(Duration::from_millis(20));
    let outcome = db.with_locked_row(&1, &timeout, never).await.unwrap();
    let Outcome::LockTimeout(e) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(e.kind(), ErrorKind::LockTimeout);
    let inner = e.source().and_then(|s| s.downcast_ref::<rowlock::Error>());
    assert!(inner.is_none(), "not wrapped in a second rowlock error");
    assert_printed_once(&e);

    // Retries that run out: one line says the policy gave up and why the last attempt failed
    // (a log line of `{e}` must say it), and nothing of it is printed twice.
    let policy = RetryPolicy::new()
        .max_attempts(2)
        .base_delay(Duration::from_millis(1))
        .retry_lock_contention(true);
    let e = db
        .with_locked_row(&1, nowait.clone().retry(&policy), never)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RetriesExhausted);
    assert_eq!(e.sql_state().map(|s| s.code()), Some("55P03"));
    assert_printed_once(&e);
    let last = e.last_attempt().expect("the last failure");
    assert_eq!(last.kind(), ErrorKind::LockNotAvailable);
    assert!(
        e.to_string()
            .ends_with(&format!("; the last failed with: {last}")),
        "{e}"
    );
}

#[tokio::test]
async fn commit_and_statement_errors_are_printed_once() {
    let (_db, db) = accounts(1).await;
    let opts = TransactionOptions::new();

    // A statement error the closure swallowed: the commit reports the root cause's state.
    let e = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move {
                let _ = tx.execute("INSERT INTO accounts VALUES (1, 0)", &[]).await;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TransactionAborted);
    assert_eq!(e.sql_state().map(|s| s.code()), Some("23505"));
    assert_printed_once(&e);

    // An error on the raw client, which rowlock does not see: the probe finds it at COMMIT.
    let e = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move {
                let client = tx.client().await?;
                let _ = client.batch_execute("SELECT 1/0").await;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TransactionAborted);
    assert_printed_once(&e);

    // An error on the raw client, returned through `Transaction::client_error`: classified
    // as rowlock's own statements' errors are, and printed once.
    let e = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move {
                let client = tx.client().await?;
                client
                    .batch_execute("SELECT 1/0")
                    .await
                    .map_err(|e| tx.client_error(e))?;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Db);
    assert_eq!(e.sql_state().map(|s| s.code()), Some("22012"));
    assert!(e.to_string().contains("running a statement"), "{e}");
    assert_printed_once(&e);

    // The caller's own statement error, returned with `?`.
    let e = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move {
                tx.execute("INSERT INTO accounts VALUES (1, 0)", &[])
                    .await?;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(e.sql_state().map(|s| s.code()), Some("23505"));
    assert_printed_once(&e);
}

#[tokio::test]
async fn decode_errors_name_no_step_they_did_not_fail_in() {
    let (_db, db) = accounts(1).await;
    // A closure decoding an INSERT's RETURNING row with the wrong type.
    let e = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move {
                let row = tx
                    .query_one("INSERT INTO accounts VALUES (2, 5) RETURNING balance", &[])
                    .await?;
                let wrong: Result<String, _> = row.try_get(0);
                wrong.map_err(rowlock::Error::decode)
            })
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Decode);
    assert!(!e.to_string().contains("locking"), "{e}");
    assert_printed_once(&e);

    // A claim naming a column the table does not have.
    let claim = Claim::new()
        .filter_null("no_such_column")
        .order_by("id", Direction::Asc);
    let e = db
        .claim(&claim, 1, |_, _: Vec<Account>| {
            Box::pin(async move { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap_err();
    assert!(e.is_invalid_argument(), "{e:?}");
    assert_printed_once(&e);
}

/// The error of `sql` run in a transaction of its own.
async fn statement_error(db: &rowlock::Db, sql: &'static str) -> rowlock::Error {
    db.with_transaction(TransactionOptions::new(), |tx| {
        Box::pin(async move { tx.execute(sql, &[]).await })
    })
    .await
    .unwrap_err()
}

#[tokio::test]
async fn display_carries_the_servers_and_the_drivers_message_once() {
    let (_db, db) = accounts(1).await;
    let opts = TransactionOptions::new();
    let e = statement_error(&db, "SELECT * FROM no_such_table").await;
    let shown = e.to_string();
    assert!(
        shown.contains("relation \"no_such_table\" does not exist") && shown.contains("42P01"),
        "{shown}"
    );
    assert!(e.as_db_error().is_some(), "still reachable with its fields");
    assert_printed_once(&e);

    // A value of the wrong type: refused as an invalid argument naming the placeholder, with
    // the driver's words for the two types.
    let e = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move { tx.execute("SELECT $1::int8", &[&1_i32]).await })
        })
        .await
        .unwrap_err();
    let shown = e.to_string();
    assert_eq!(e.kind(), rowlock::ErrorKind::InvalidArgument, "{shown}");
    assert!(
        shown.contains("parameter $1 has the wrong type")
            && shown.contains("i32")
            && shown.contains("int8"),
        "{shown}"
    );
    assert_printed_once(&e);
}

/// A row type names its table as written, quoted, so `Widgets` is not the `widgets` that an
/// unquoted `CREATE TABLE Widgets` made. The server's "relation \"Widgets\" does not exist"
/// alone sent a user looking for a missing migration; every path that renders the row type's
/// table now says why (and, for a table really missing, where else to look).
#[tokio::test]
async fn a_table_named_in_another_case_says_why_it_is_missing() {
    use rowlock::tokio_postgres::{Error as PgError, Row};
    use rowlock::{LockSet, LockableRow, LockedRows, Table, Transition};

    #[derive(Debug)]
    struct Cased {
        id: i64,
    }
    impl LockableRow for Cased {
        type Key = i64;
        const TABLE: Table = Table::new("Widgets");
        const KEY_COLUMNS: &'static [&'static str] = &["id"];
        fn from_row(row: &Row) -> Result<Self, PgError> {
            Ok(Cased {
                id: row.try_get("id")?,
            })
        }
        fn key(&self) -> i64 {
            self.id
        }
    }
    #[derive(Debug)]
    struct Missing;
    impl LockableRow for Missing {
        type Key = i64;
        const TABLE: Table = Table::new("gadgets");
        const KEY_COLUMNS: &'static [&'static str] = &["id"];
        const COLUMNS: &'static [&'static str] = &["id"];
        fn from_row(_: &Row) -> Result<Self, PgError> {
            Ok(Missing)
        }
        fn key(&self) -> i64 {
            0
        }
    }

    let (pg, db) = accounts(0).await;
    pg.client()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE Widgets (id bigint PRIMARY KEY); INSERT INTO widgets VALUES (1)",
        )
        .await
        .unwrap();
    let case_hint = |what: &str, err: rowlock::Error| {
        assert_eq!(
            err.sql_state().map(|s| s.code()),
            Some("42P01"),
            "{what}: {err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("case counts") && text.contains("\"widgets\""),
            "{what}: {text}"
        );
    };
    let row = db
        .with_locked_row(&1, Lock::new(), |_, w: Cased| {
            Box::pin(async move { Ok::<_, rowlock::Error>(w.id) })
        })
        .await
        .unwrap_err();
    case_hint("with_locked_row", row);
    let rows = db
        .with_locked_rows(&[1, 2], Lock::new(), |_, w: Vec<Cased>| {
            Box::pin(async move { Ok::<_, rowlock::Error>(w.len()) })
        })
        .await
        .unwrap_err();
    case_hint("with_locked_rows", rows);
    let set = LockSet::new().row::<Cased>(&1).unwrap();
    let set = db
        .with_locked_set(&set, Lock::new(), |_, _: LockedRows| {
            Box::pin(async move { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap_err();
    case_hint("with_locked_set", set);
    let transition = db
        .transition::<Cased>(&1, &Transition::new("id = id"), &[])
        .await
        .unwrap_err();
    case_hint("transition", transition);
    let claim = Claim::new().order_by("id", Direction::Asc);
    let claimed = db
        .claim_and_mark::<Cased>(&claim.clone().mark("id = id", vec![]), 1)
        .await;
    case_hint("claim_and_mark", claimed.unwrap_err());
    let tx = db.begin(TransactionOptions::new()).await.unwrap();
    case_hint(
        "Transaction::lock_row",
        tx.lock_row::<Cased>(&1, Lock::new()).await.unwrap_err(),
    );
    drop(tx);
    // A table that is missing in every case: where else to look.
    let missing = db
        .with_locked_row(&1, Lock::new(), |_, _: Missing| {
            Box::pin(async move { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap_err();
    let text = missing.to_string();
    assert!(text.contains("search_path"), "{text}");
    assert!(!text.contains("case counts"), "{text}");
    assert_printed_once(&missing);
}

/// A log line of `{e}` carries what psql shows of a server error: the detail (a violated
/// key's values, a deadlock's cycle) and the hint, on one line, and a message that only
/// repeats the kind (`deadlock detected`) once.
#[tokio::test]
async fn display_carries_the_servers_detail_and_hint_on_one_line() {
    let (_db, db) = accounts(2).await;
    let e = statement_error(&db, "INSERT INTO accounts VALUES (1, 0)").await;
    let shown = e.to_string();
    assert!(shown.contains("Key (id)=(1) already exists."), "{shown}");
    assert_printed_once(&e);

    let e = statement_error(&db, "SELECT balanc FROM accounts").await;
    let shown = e.to_string();
    assert!(
        shown.contains("hint: Perhaps you meant to reference the column \"accounts.balance\""),
        "{shown}"
    );
    assert_printed_once(&e);

    // Two transactions updating rows 1 and 2 in opposite orders, no retry: one is the victim.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let run = |first: i64, second: i64| {
        let (db, barrier) = (db.clone(), barrier.clone());
        tokio::spawn(async move {
            db.with_transaction(TransactionOptions::new(), move |tx| {
                let barrier = barrier.clone();
                Box::pin(async move {
                    let stmt = "UPDATE accounts SET balance = balance + 1 WHERE id = $1";
                    tx.execute(stmt, &[&first]).await?;
                    tokio::time::timeout(Duration::from_secs(30), barrier.wait())
                        .await
                        .expect("both hold their first row");
                    tx.execute(stmt, &[&second]).await?;
                    Ok::<_, rowlock::Error>(())
                })
            })
            .await
        })
    };
    let (a, b) = tokio::join!(run(1, 2), run(2, 1));
    let e = match (a.unwrap(), b.unwrap()) {
        (Ok(()), Err(e)) | (Err(e), Ok(())) => e,
        other => panic!("one victim, one winner: {other:?}"),
    };
    assert_eq!(e.kind(), ErrorKind::Deadlock, "{e}");
    let shown = e.to_string();
    assert_eq!(shown.matches("deadlock detected").count(), 1, "{shown}");
    assert!(
        shown.contains("waits for ShareLock on transaction") && !shown.contains('\n'),
        "the cycle, on one line: {shown}"
    );
    assert!(
        shown.contains(". Hint: See server log") && !shown.contains(".;"),
        "a sentence follows a sentence: {shown}"
    );
    assert_printed_once(&e);
}
