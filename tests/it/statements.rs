//! A bounded set of prepared statements: any number of keys of one column is one statement.

use rowlock::{Lock, LockMode, Outcome, RowRef};

use crate::support::{Account, Seat, accounts, balance};

/// rowlock's statements prepared on the one connection of `db`, seen from inside it.
async fn prepared_on(db: &rowlock::Db) -> i64 {
    let conn = db.pool().get().await.unwrap();
    conn.simple_query("SELECT count(*) FROM pg_prepared_statements")
        .await
        .unwrap()
        .iter()
        .find_map(|m| match m {
            rowlock::tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
            _ => None,
        })
        .unwrap()
}

#[tokio::test]
async fn locking_one_to_a_thousand_keys_prepares_a_bounded_set_of_statements() {
    let (pg, _) = accounts(1000).await;
    let db = pg.db(1);
    let keys: Vec<i64> = (1..=1000).collect();
    for mode in [LockMode::Wait, LockMode::SkipLocked] {
        let options = Lock::new().mode(mode);
        for n in (1..=1000).step_by(7).chain([1000]) {
            // Every other call also asks for a key with no row, so that SkipLocked reads which
            // of the missing keys exist.
            let mut wanted = keys[..n].to_vec();
            if n % 2 == 0 {
                wanted.push(5000 + n as i64);
            }
            let outcome = db
                .with_locked_rows(&wanted, &options, |_, rows: Vec<Account>| {
                    Box::pin(async move { Ok::<_, rowlock::Error>(rows.len()) })
                })
                .await
                .unwrap();
            match outcome {
                Outcome::Done(got) => assert_eq!(got, n),
                Outcome::NotFound(missing) => {
                    assert_eq!(missing, vec![RowRef::of::<Account>(&(5000 + n as i64))])
                }
                other => panic!("{n} keys: {other:?}"),
            }
        }
    }
    // Per mode: the statement for one key and the one for any number of keys; the rows that
    // exist among missing keys (one key, any number); the table's columns (`Account` lists
    // none).
    let prepared = prepared_on(&db).await;
    assert!(
        prepared <= 7,
        "{prepared} statements prepared on one connection"
    );
}

/// Composite keys too: one array per key column, so 1 to 1,000 keys share one statement (and
/// more keys than PostgreSQL's 65,535 bind parameters would allow as a list).
#[tokio::test]
async fn locking_one_to_a_thousand_composite_keys_prepares_a_bounded_set_of_statements() {
    let (pg, _) = accounts(0).await;
    pg.client()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE seats (show int, seat varchar(8), PRIMARY KEY (show, seat));
             INSERT INTO seats SELECT g % 7, 'S' || g FROM generate_series(1, 40000) g;",
        )
        .await
        .unwrap();
    let db = pg.db(1);
    let key = |g: i32| (g % 7, format!("S{g}"));
    for mode in [LockMode::Wait, LockMode::SkipLocked] {
        let options = Lock::new().mode(mode);
        for n in (1..=1000).step_by(7).chain([1000]) {
            let mut wanted: Vec<(i32, String)> = (1..=n).map(key).collect();
            if n % 2 == 0 {
                wanted.push((99, format!("S{n}"))); // no such row
            }
            let outcome = db
                .with_locked_rows(&wanted, &options, |_, rows: Vec<Seat>| {
                    Box::pin(async move {
                        let keys: Vec<(i32, String)> =
                            rows.into_iter().map(|s| (s.show, s.seat)).collect();
                        Ok::<_, rowlock::Error>(keys)
                    })
                })
                .await
                .unwrap();
            match outcome {
                Outcome::Done(got) => {
                    let mut expected: Vec<(i32, String)> = (1..=n).map(key).collect();
                    expected.sort();
                    assert_eq!(got, expected, "{n} keys, in key order");
                }
                Outcome::NotFound(missing) => {
                    assert_eq!(missing, vec![RowRef::of::<Seat>(&(99, format!("S{n}")))])
                }
                other => panic!("{n} keys: {other:?}"),
            }
        }
    }
    let prepared = prepared_on(&db).await;
    assert!(
        prepared <= 7,
        "{prepared} statements prepared on one connection"
    );
    // 40,000 composite keys: 80,000 values, past the 65,535 parameters of one statement.
    let all: Vec<(i32, String)> = (1..=40_000).map(key).collect();
    let locked = db
        .with_locked_rows(&all, &Lock::new(), |_, rows: Vec<Seat>| {
            Box::pin(async move { Ok::<_, rowlock::Error>(rows.len()) })
        })
        .await
        .unwrap();
    assert_eq!(locked, Outcome::Done(40_000));
}

#[tokio::test]
async fn ten_thousand_distinct_filter_values_share_one_statement() {
    let (pg, _) = accounts(3).await;
    let db = pg.db(1);
    let mut claimed = 0;
    for value in 0..10_000_i64 {
        // Text, integers of either width: every value a parameter, never part of the SQL.
        let claim = rowlock::Claim::new()
            .filter("id", rowlock::Compare::Eq, value % 7)
            .filter("balance", rowlock::Compare::Ge, (value % 3) as i32)
            .order_by("id", rowlock::Direction::Asc);
        let got = db
            .claim(&claim, 1, |_, rows: Vec<Account>| {
                Box::pin(async move { Ok::<_, rowlock::Error>(rows.len()) })
            })
            .await
            .unwrap();
        claimed += got.done().unwrap_or(0);
    }
    let expected = (0..10_000_i64)
        .filter(|v| (1..=3).contains(&(v % 7)))
        .count();
    assert_eq!(claimed, expected, "ids 1 to 3 exist");
    let prepared = prepared_on(&db).await;
    assert!(
        prepared <= 2,
        "{prepared} statements prepared on one connection"
    );
}

/// Statements built from input (here: a claim per filter value written as SQL) never grow a
/// connection's prepared statements past the handle's limit.
#[tokio::test]
async fn the_statement_cache_of_a_connection_stays_under_the_handles_limit() {
    if std::env::var_os("ROWLOCK_TEST_PGBOUNCER").is_some() {
        return; // behind PgBouncer, statements are per transaction: nothing accumulates
    }
    let (pg, _) = accounts(10).await;
    let limit = 4;
    let db = pg
        .db_with(
            rowlock::Db::builder()
                .max_size(1)
                .statement_cache_limit(limit),
        )
        .unwrap();
    for n in 0..20 {
        let claim = rowlock::Claim::new()
            .where_sql(format!("balance > {n}"), vec![])
            .order_by("id", rowlock::Direction::Asc);
        let claimed = db
            .claim(&claim, 1, |_, rows: Vec<Account>| {
                Box::pin(async move { Ok::<_, rowlock::Error>(rows.len()) })
            })
            .await
            .unwrap();
        assert_eq!(claimed, Outcome::Done(1));
        // The one-statement paths (claim-and-mark, transitions) keep to the same limit.
        let marked: Vec<Account> = db
            .claim_and_mark(
                &claim.clone().mark(format!("balance = {n} + 100"), vec![]),
                1,
            )
            .await
            .unwrap();
        assert_eq!(marked.len(), 1);
        let add = rowlock::Transition::new(format!("balance = balance + {n}"));
        let moved = db.transition::<Account>(&1, &add, &[]).await.unwrap();
        assert!(moved.is_done(), "{moved:?}");
        let prepared = prepared_on(&db).await;
        assert!(
            prepared <= limit as i64 + 1,
            "{prepared} statements prepared after {} rounds (limit {limit})",
            n + 1
        );
    }
    let err = rowlock::Db::builder()
        .url(&pg.url())
        .statement_cache_limit(0)
        .build()
        .unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
}

/// The statement cache belongs to its connection: a connection that replaces one the server
/// closed prepares its own statements, never runs the closed one's (which would fail with
/// `26000 prepared statement does not exist`, or run another statement of the same name).
#[tokio::test]
async fn a_connection_that_replaces_a_closed_one_prepares_its_own_statements() {
    if std::env::var_os("ROWLOCK_TEST_PGBOUNCER").is_some() {
        return; // behind PgBouncer the server connection is PgBouncer's to replace
    }
    let (pg, _) = accounts(10).await;
    let db = pg.db(1);
    let admin = pg.client().await.unwrap();
    let touch = |id: i64| {
        let db = db.clone();
        async move {
            db.with_locked_row(&id, Lock::new(), |tx, a: Account| {
                Box::pin(async move {
                    let stmt = tx
                        .prepare_cached("UPDATE accounts SET balance = balance + 1 WHERE id = $1")
                        .await?;
                    tx.execute(&stmt, &[&a.id]).await?;
                    Ok::<_, rowlock::Error>(())
                })
            })
            .await
        }
    };
    for round in 0..10 {
        assert_eq!(touch(1).await.unwrap(), Outcome::Done(()), "round {round}");
        // The server closes the pool's one connection; wait until the pool has replaced it.
        let old: i32 = crate::support::backend_pid(&db).await;
        admin
            .execute("SELECT pg_terminate_backend($1)", &[&old])
            .await
            .unwrap();
        let mut replaced = false;
        for _ in 0..100 {
            let conn = db.pool().get().await.unwrap();
            // The closed connection answers with an error, and the pool then replaces it.
            if let Ok(row) = conn.query_one("SELECT pg_backend_pid()", &[]).await {
                if row.get::<_, i32>(0) != old {
                    replaced = true;
                    break;
                }
            }
        }
        assert!(
            replaced,
            "round {round}: the pool kept the closed connection"
        );
        // Both statements (the lock, the caller's update) are prepared on the new connection.
        assert_eq!(touch(2).await.unwrap(), Outcome::Done(()), "round {round}");
    }
    let balance: i64 = admin
        .query_one("SELECT balance FROM accounts WHERE id = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(balance, 100 + 10, "one update per round");
}

/// A `Statement` belongs to the connection that prepared it. One kept past its transaction
/// and passed to a transaction on another pooled connection fails with `26000`; the message
/// said the pool had deallocated statements (`DISCARD ALL`) and that running again succeeds,
/// neither true here. It now names the kept statement first.
#[tokio::test]
async fn a_statement_kept_past_its_transaction_is_named_when_another_connection_lacks_it() {
    use rowlock::TransactionOptions;

    let (pg, _) = accounts(3).await;
    // Direct to the server, also in a run behind PgBouncer: two pooled connections are two
    // server sessions only there.
    let db = rowlock::Db::builder()
        .config(pg.config().clone())
        .max_size(2)
        .build()
        .unwrap();
    let once = TransactionOptions::new();
    let kept = db
        .with_transaction(&once, |tx| {
            Box::pin(async move {
                tx.prepare_cached("SELECT balance FROM accounts WHERE id = $1")
                    .await
            })
        })
        .await
        .unwrap();
    // The pool's one connection, which prepared it, is held here: the next transaction
    // runs on a new one.
    let held = db.pool().get().await.unwrap();
    let prepared_on: i32 = held
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let err = db
        .with_transaction(&once, |tx| {
            let kept = kept.clone();
            Box::pin(async move {
                let pid: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
                assert_ne!(
                    pid, prepared_on,
                    "the transaction runs on another connection"
                );
                tx.query_one(&kept, &[&1_i64]).await?;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.sql_state().map(|s| s.code()), Some("26000"), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("kept from an earlier transaction"),
        "{message}"
    );
    assert!(
        !message.contains("so running the transaction again succeeds"),
        "{message}"
    );
    drop(held);
}

/// A pool whose recycling query deallocates the connection's prepared statements
/// (`DISCARD ALL`, as services copy from PgBouncer's `server_reset_query`): before, every
/// call after the first failed with `26000 prepared statement … does not exist`, for good.
/// rowlock's own statements are prepared again on the spot (the lock step restarts, a
/// one-statement call prepares again); a statement of the caller's cached with
/// `prepare_cached` fails its transaction once, with a retryable error that says why, which a
/// retry policy runs again.
#[tokio::test]
async fn a_pool_that_deallocates_statements_on_recycle_is_survived() {
    use rowlock::deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
    use rowlock::{ErrorKind, RetryPolicy, TransactionOptions, Transition};

    let (pg, _) = accounts(3).await;
    let manager = Manager::from_config(
        pg.config().clone(),
        rowlock::tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Custom("DISCARD ALL".into()),
        },
    );
    let db = rowlock::Db::from_pool(Pool::builder(manager).max_size(1).build().unwrap());
    let count = "SELECT count(*) FROM accounts";
    let bump = Transition::new("balance = balance + 1");
    // Each path twice in a row, so the second call finds its statement deallocated.
    for round in 0..2 {
        let locked = db
            .with_locked_row(&1_i64, Lock::new(), |tx, a: Account| {
                Box::pin(async move {
                    let stmt = tx
                        .prepare_cached("UPDATE accounts SET balance = $2 WHERE id = $1")
                        .await?;
                    tx.execute(&stmt, &[&a.id, &(a.balance + 1)]).await?;
                    Ok::<_, rowlock::Error>(())
                })
            })
            .await
            .unwrap();
        assert_eq!(locked, Outcome::Done(()), "round {round}");
    }
    for round in 0..2 {
        assert!(
            matches!(
                db.transition::<Account>(&2, &bump, &[]).await.unwrap(),
                Outcome::Done(_)
            ),
            "round {round}"
        );
    }
    // The caller's own cached statement, once prepared, is gone after the next recycle.
    macro_rules! counting {
        () => {
            |tx| {
                Box::pin(async move {
                    let stmt = tx.prepare_cached(count).await?;
                    Ok::<i64, rowlock::Error>(tx.query_one(&stmt, &[]).await?.get(0))
                })
            }
        };
    }
    let once = TransactionOptions::new();
    assert_eq!(
        db.with_transaction(&once, counting!()).await.unwrap(),
        3_i64
    );
    let err: rowlock::Error = db.with_transaction(&once, counting!()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Db, "{err}");
    assert_eq!(err.sql_state().map(|s| s.code()), Some("26000"), "{err}");
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("DISCARD ALL"), "{err}");
    // Prepared again by the next call, deallocated when it goes back, and swallowed by the
    // one after: the commit reports the abort, retryable as its cause.
    assert_eq!(
        db.with_transaction(&once, counting!()).await.unwrap(),
        3_i64
    );
    let swallowed = db
        .with_transaction(&once, |tx| {
            Box::pin(async move {
                let stmt = tx.prepare_cached(count).await?;
                let _ = tx.query_one(&stmt, &[]).await;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(
        swallowed.kind(),
        ErrorKind::TransactionAborted,
        "{swallowed}"
    );
    assert!(swallowed.is_retryable(), "{swallowed}");
    // Under a retry policy the second attempt prepares it again.
    let retried = TransactionOptions::new().retry(RetryPolicy::new().max_attempts(2));
    for round in 0..2 {
        assert_eq!(
            db.with_transaction(&retried, counting!()).await.unwrap(),
            3_i64,
            "round {round}"
        );
    }
    let other = pg.client().await.unwrap();
    let balances = [balance(&other, 1).await, balance(&other, 2).await];
    assert_eq!(balances, [102, 102], "each change made once");
}

/// The caller's SQL text is prepared once, to learn its parameter types, and then goes as an
/// unnamed statement: parsed, bound and run in one request, nothing left prepared on the
/// server and nothing to close. Seen in what the client sends, through a recording proxy.
#[tokio::test]
async fn sql_text_is_prepared_once_then_runs_unnamed() {
    let (pg, _) = accounts(2).await;
    let Some(proxy) = crate::proxy::MessageRecorder::start(pg.config()).await else {
        eprintln!("skipped: the server is not on TCP");
        return;
    };
    let db = rowlock::Db::builder()
        .config(proxy.config(pg.config(), pg.name()))
        .max_size(1)
        .build()
        .unwrap();
    const BUMP: &str = "UPDATE accounts SET balance = balance + $2 WHERE id = $1";
    const READ: &str = "SELECT balance FROM accounts WHERE id = $1";
    let read = db
        .with_transaction(rowlock::TransactionOptions::new(), |tx| {
            Box::pin(async move {
                let mut seen = Vec::new();
                for _ in 0..3 {
                    assert_eq!(tx.execute(BUMP, &[&1_i64, &10_i64]).await?, 1);
                    seen.push(tx.query_one(READ, &[&1_i64]).await?.get::<_, i64>(0));
                }
                assert!(tx.query_opt(READ, &[&7_i64]).await?.is_none());
                assert_eq!(tx.query(READ, &[&2_i64]).await?.len(), 1);
                Ok::<_, rowlock::Error>(seen)
            })
        })
        .await
        .unwrap();
    assert_eq!(read, [110, 120, 130]);
    // Through the handle (each statement a transaction of its own), the same texts.
    use rowlock::Executor;
    assert_eq!(db.execute(BUMP, &[&2_i64, &1_i64]).await.unwrap(), 1);
    assert_eq!(
        db.query_one(READ, &[&2_i64])
            .await
            .unwrap()
            .get::<_, i64>(0),
        101
    );
    let parses = proxy.named(b'P');
    let named: Vec<String> = parses.iter().filter(|n| !n.is_empty()).cloned().collect();
    assert_eq!(named.len(), 2, "one prepare per text: {parses:?}");
    assert_eq!(
        parses.len() - named.len(),
        10,
        "every use unnamed, the first after its prepare: {parses:?}"
    );
    assert_eq!(
        proxy.named(b'C'),
        *named,
        "only the two first prepares closed"
    );
    assert_eq!(prepared_on(&db).await, 0, "nothing left prepared");
    assert_eq!(balance(&pg.client().await.unwrap(), 1).await, 130);
}

/// A migration changes the type of a column a learned text binds: a value that fits the new
/// type (and not the learned one) makes the text learned again, and the call succeeds; a
/// value that fits the learned type, which the server then refuses (`42883`), makes the next
/// call learn it again too (and say which parameter does not fit).
#[tokio::test]
async fn sql_text_is_learned_again_after_a_migration_changes_a_parameter_type() {
    let (pg, _) = accounts(1).await;
    let db = pg.db(1);
    let admin = pg.client().await.unwrap();
    admin
        .batch_execute(
            "CREATE TABLE tags (id int PRIMARY KEY, tag int); INSERT INTO tags VALUES (1, 5)",
        )
        .await
        .unwrap();
    use rowlock::Executor;
    const SET: &str = "UPDATE tags SET tag = $2 WHERE id = $1";
    const FIND: &str = "SELECT id FROM tags WHERE tag = $1";
    assert_eq!(db.execute(SET, &[&1_i32, &6_i32]).await.unwrap(), 1);
    assert_eq!(db.query(FIND, &[&6_i32]).await.unwrap().len(), 1);
    admin
        .batch_execute("ALTER TABLE tags ALTER COLUMN tag TYPE text USING tag::text")
        .await
        .unwrap();
    // A text value: does not fit the learned int4, nothing sent, learned again.
    assert_eq!(db.execute(SET, &[&1_i32, &"seven"]).await.unwrap(), 1);
    assert_eq!(db.query(FIND, &[&"seven"]).await.unwrap().len(), 1);
    // Learned as text now; back to an int column, and an int value the server refuses with
    // the learned text type.
    admin
        .batch_execute("ALTER TABLE tags ALTER COLUMN tag TYPE int USING length(tag)")
        .await
        .unwrap();
    let refused = db.query(FIND, &[&"5"]).await.expect_err("int = text");
    assert_eq!(refused.kind(), rowlock::ErrorKind::Db, "{refused}");
    assert_eq!(
        refused.sql_state().map(|s| s.code()),
        Some("42883"),
        "{refused}"
    );
    let misfit = db
        .query(FIND, &[&"5"])
        .await
        .expect_err("a text for an int");
    assert_eq!(
        misfit.kind(),
        rowlock::ErrorKind::InvalidArgument,
        "{misfit}"
    );
    assert!(misfit.to_string().contains("parameter $1"), "{misfit}");
    assert_eq!(db.query(FIND, &[&5_i32]).await.unwrap().len(), 1);
}

/// `query_one` and `query_opt` given another number of rows: an error that says how many,
/// for a prepared statement and for SQL text alike, and the transaction goes on.
#[tokio::test]
async fn a_wrong_number_of_rows_is_an_error_and_the_transaction_goes_on() {
    let (pg, db) = accounts(2).await;
    let bumped = db
        .with_transaction(rowlock::TransactionOptions::new(), |tx| {
            Box::pin(async move {
                let all = tx.prepare_cached("SELECT id FROM accounts").await?;
                for err in [
                    tx.query_one("SELECT id FROM accounts WHERE id = 9", &[])
                        .await
                        .map(drop),
                    tx.query_one(&all, &[]).await.map(drop),
                    tx.query_opt("SELECT id FROM accounts", &[]).await.map(drop),
                    tx.query_opt(&all, &[]).await.map(drop),
                ] {
                    let err = err.expect_err("a wrong number of rows");
                    assert_eq!(err.kind(), rowlock::ErrorKind::Driver, "{err}");
                    assert!(
                        err.to_string().contains("unexpected number of rows"),
                        "{err}"
                    );
                }
                tx.execute("UPDATE accounts SET balance = 1 WHERE id = 1", &[])
                    .await
            })
        })
        .await
        .unwrap();
    assert_eq!(bumped, 1);
    assert_eq!(balance(&pg.client().await.unwrap(), 1).await, 1);
}

/// A Postgres enum as a parameter, by its label.
#[derive(Debug)]
struct Mood(&'static str);

impl rowlock::tokio_postgres::types::ToSql for Mood {
    fn to_sql(
        &self,
        _: &rowlock::tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<rowlock::tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
    {
        out.extend_from_slice(self.0.as_bytes());
        Ok(rowlock::tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &rowlock::tokio_postgres::types::Type) -> bool {
        ty.name() == "mood"
    }

    rowlock::tokio_postgres::types::to_sql_checked!();
}

/// A desk, keyed by its id, with a `mood` enum column.
#[derive(Debug, rowlock::LockableRow)]
#[rowlock(table = "desks", key = "id")]
struct Desk {
    id: i32,
}

/// The enum type a learned text binds is dropped and created again (a new type, a new oid):
/// the next call succeeds, for the caller's text and, behind a pooler, for rowlock's own
/// statement (a transition). Only a built-in type's oid is sent with an unnamed statement;
/// the server infers any other, as it did when the text was prepared (sending the learned oid
/// failed with `XX000`, "cache lookup failed for type", once per text).
#[tokio::test]
async fn a_learned_statement_survives_its_enum_type_created_again() {
    let (pg, db) = accounts(1).await;
    let admin = pg.client().await.unwrap();
    admin
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('calm', 'busy');
             CREATE TABLE desks (id int PRIMARY KEY, mood mood NOT NULL);
             INSERT INTO desks VALUES (1, 'calm')",
        )
        .await
        .unwrap();
    let pooled = rowlock::Db::builder()
        .config(pg.config().clone())
        .statement_cache(rowlock::StatementCache::Transaction)
        .max_size(1)
        .build()
        .unwrap();
    use rowlock::Executor;
    const SET: &str = "UPDATE desks SET mood = $2 WHERE id = $1";
    let to = rowlock::Transition::new("mood = $1");
    assert_eq!(db.execute(SET, &[&1_i32, &Mood("busy")]).await.unwrap(), 1);
    let done = pooled.transition::<Desk>(&1, &to, &[&Mood("calm")]).await;
    assert!(matches!(done, Ok(Outcome::Done(_))), "{done:?}");
    admin
        .batch_execute(
            "ALTER TABLE desks ALTER mood TYPE text;
             DROP TYPE mood;
             CREATE TYPE mood AS ENUM ('calm', 'busy', 'away');
             ALTER TABLE desks ALTER mood TYPE mood USING mood::mood",
        )
        .await
        .unwrap();
    let mood = || async {
        admin
            .query_one("SELECT mood::text FROM desks WHERE id = 1", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    assert_eq!(db.execute(SET, &[&1_i32, &Mood("away")]).await.unwrap(), 1);
    assert_eq!(mood().await, "away");
    let done = pooled.transition::<Desk>(&1, &to, &[&Mood("busy")]).await;
    assert!(matches!(done, Ok(Outcome::Done(_))), "{done:?}");
    assert_eq!(mood().await, "busy");
}

/// Behind a pooler (`StatementCache::Transaction`), rowlock's own statements (a row lock, a
/// lock of several rows, a transition, an advisory lock) and a write queued as text are
/// prepared once per handle, to learn their parameter types, and then go unnamed: parsed,
/// bound and run in the request that uses them, not prepared (a round trip of its own) in
/// every transaction. Seen in what the client sends, through a recording proxy.
#[tokio::test]
async fn behind_a_pooler_rowlocks_statements_are_prepared_once_then_run_unnamed() {
    let (pg, _) = accounts(3).await;
    let Some(proxy) = crate::proxy::MessageRecorder::start(pg.config()).await else {
        eprintln!("skipped: the server is not on TCP");
        return;
    };
    let db = rowlock::Db::builder()
        .config(proxy.config(pg.config(), pg.name()))
        .statement_cache(rowlock::StatementCache::Transaction)
        .max_size(1)
        .build()
        .unwrap();
    let add = rowlock::Transition::new("balance = balance + $1");
    const ROUNDS: usize = 5;
    for _ in 0..ROUNDS {
        let done = db
            .with_locked_row(&1_i64, &Lock::new(), |tx, a: Account| {
                Box::pin(async move {
                    const SET: &str = "UPDATE accounts SET balance = $2 WHERE id = $1";
                    tx.execute_on_commit(SET, &[&a.id, &(a.balance + 1)])
                        .await?;
                    Ok::<_, rowlock::Error>(a.balance)
                })
            })
            .await
            .unwrap();
        assert!(matches!(done, Outcome::Done(_)), "{done:?}");
        let both = db
            .with_locked_rows(&[1_i64, 2], &Lock::new(), |_tx, rows: Vec<Account>| {
                Box::pin(async move { Ok::<_, rowlock::Error>(rows.len()) })
            })
            .await
            .unwrap();
        assert_eq!(both.done(), Some(2));
        let changed = db
            .transition::<Account>(&3, &add, &[&10_i64])
            .await
            .unwrap();
        assert!(matches!(changed, Outcome::Done(_)), "{changed:?}");
        let held = db
            .with_advisory_lock(7, Lock::new().mode(LockMode::NoWait), |_tx| {
                Box::pin(async { Ok::<_, rowlock::Error>(()) })
            })
            .await
            .unwrap();
        assert!(matches!(held, Outcome::Done(())), "{held:?}");
    }
    let parses = proxy.named(b'P');
    let named: Vec<String> = parses.iter().filter(|n| !n.is_empty()).cloned().collect();
    assert_eq!(
        named.len(),
        5,
        "one prepare per statement, on its first use: {parses:?}"
    );
    assert_eq!(
        parses.len() - named.len(),
        5 * ROUNDS,
        "every use unnamed, the first after its prepare: {parses:?}"
    );
    assert_eq!(proxy.named(b'C'), *named, "the first prepares closed");
    assert_eq!(prepared_on(&db).await, 0, "nothing left prepared");
    let client = pg.client().await.unwrap();
    assert_eq!(balance(&client, 1).await, 100 + ROUNDS as i64);
    assert_eq!(balance(&client, 3).await, 100 + 10 * ROUNDS as i64);
}
