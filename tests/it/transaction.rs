//! with_transaction and the transaction guard: options, pipelined commit, error tracking.

use std::time::Duration;

use rowlock::tokio_postgres::error::SqlState;
use rowlock::{ErrorKind, Isolation, StatementCache, TransactionOptions};

use crate::support::{accounts, backend_pid, balance, in_transaction};

#[tokio::test]
async fn commit_on_ok_rollback_on_err() {
    let (pg, db) = accounts(2).await;
    let other = pg.client().await.unwrap();
    let n: u64 = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move { tx.execute("UPDATE accounts SET balance = 1", &[]).await })
        })
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(balance(&other, 1).await, 1);
    let err = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move {
                tx.execute("UPDATE accounts SET balance = 2", &[]).await?;
                Err::<(), _>(
                    rowlock::Outcome::<()>::NotFound(vec![])
                        .into_result()
                        .unwrap_err(),
                )
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RowNotFound);
    assert_eq!(balance(&other, 1).await, 1);
    assert_eq!(in_transaction(&other).await, 0);
}

#[tokio::test]
async fn options_reach_the_server() {
    let (_db, db) = accounts(1).await;
    let opts = TransactionOptions::new()
        .isolation(Isolation::Serializable)
        .read_only(true)
        .deferrable(true)
        .lock_timeout(Duration::from_millis(1234))
        .statement_timeout(Duration::from_secs(7));
    let settings = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move {
                let row = tx
                    .query_one(
                        "SELECT current_setting('transaction_isolation'),
                            current_setting('transaction_read_only'),
                            current_setting('transaction_deferrable'),
                            current_setting('lock_timeout'),
                            current_setting('statement_timeout')",
                        &[],
                    )
                    .await?;
                Ok::<_, rowlock::Error>((0..5).map(|i| row.get::<_, String>(i)).collect::<Vec<_>>())
            })
        })
        .await
        .unwrap();
    assert_eq!(settings, ["serializable", "on", "on", "1234ms", "7s"]);
    // SET LOCAL ended with the transaction: the pooled session is back to defaults.
    let after = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move {
                let row = tx
                    .query_one("SELECT current_setting('lock_timeout')", &[])
                    .await?;
                Ok::<String, rowlock::Error>(row.get(0))
            })
        })
        .await
        .unwrap();
    assert_eq!(after, "0");
    let err = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move { tx.execute("UPDATE accounts SET balance = 0", &[]).await })
        })
        .await
        .unwrap_err();
    assert_eq!(err.sql_state(), Some(&SqlState::READ_ONLY_SQL_TRANSACTION));
}

#[tokio::test]
async fn statement_timeout_is_its_own_kind() {
    let (_db, db) = accounts(1).await;
    let opts = TransactionOptions::new().statement_timeout(Duration::from_millis(50));
    let err = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move { tx.execute("SELECT pg_sleep(10)", &[]).await })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StatementTimeout, "{err}");
    assert_eq!(err.sql_state(), Some(&SqlState::QUERY_CANCELED));
}

#[tokio::test]
async fn a_failing_queued_write_fails_the_commit_and_nothing_is_kept() {
    let (pg, db) = accounts(2).await;
    let other = pg.client().await.unwrap();
    let err = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move {
                tx.execute("UPDATE accounts SET balance = 5 WHERE id = 1", &[])
                    .await?;
                let ins = tx
                    .prepare_cached("INSERT INTO audit VALUES ($1, $2)")
                    .await?;
                tx.execute_on_commit(&ins, &[&1_i64, &"dup"]).await?;
                tx.execute_on_commit(&ins, &[&2_i64, &"dup"]).await?;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.sql_state(), Some(&SqlState::UNIQUE_VIOLATION), "{err}");
    assert_eq!(balance(&other, 1).await, 100);
    let audits: i64 = other
        .query_one("SELECT count(*) FROM audit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(audits, 0);
    assert_eq!(in_transaction(&other).await, 0);
}

#[tokio::test]
async fn queued_writes_alone_commit_in_one_flush_with_begin() {
    let (pg, db) = accounts(1).await;
    let other = pg.client().await.unwrap();
    // Prepare outside the transaction so the statement is cached on the pooled connection.
    {
        let conn = db.pool().get().await.unwrap();
        conn.prepare_cached("UPDATE accounts SET balance = $2 WHERE id = $1")
            .await
            .unwrap();
    }
    let tx = db.begin(&TransactionOptions::new()).await.unwrap();
    let stmt = tx
        .prepare_cached("UPDATE accounts SET balance = $2 WHERE id = $1")
        .await
        .unwrap();
    tx.execute_on_commit(&stmt, &[&1_i64, &77_i64])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(balance(&other, 1).await, 77);
}

#[tokio::test]
async fn a_statement_found_in_the_cache_sends_nothing_not_even_begin() {
    let (pg, db) = accounts(1).await;
    let observer = pg.client().await.unwrap();
    const SQL: &str = "SELECT balance FROM accounts WHERE id = $1";
    // The connection's cache, named so the test means the same behind PgBouncer (whose handles
    // default to the transaction's own); the statement is never run.
    let options = TransactionOptions::new().statement_cache(StatementCache::Connection);
    // The first use prepares it (its Parse rides with BEGIN) and caches it on the connection.
    db.with_transaction(&options, |tx| {
        Box::pin(async move {
            tx.prepare_cached(SQL).await?;
            Ok::<_, rowlock::Error>(())
        })
    })
    .await
    .unwrap();
    // The same connection again (the only one opened): a hit leaves the session outside any
    // transaction.
    let observer = &observer;
    let open = db
        .with_transaction(&options, |tx| {
            Box::pin(async move {
                tx.prepare_cached(SQL).await?;
                Ok::<_, rowlock::Error>(in_transaction(observer).await)
            })
        })
        .await
        .unwrap();
    assert_eq!(open, 0, "a cache hit sent BEGIN");
    assert_eq!(db.pool().status().size, 1, "one connection served both");
}

#[tokio::test]
async fn queued_writes_borrow_their_values_and_run_in_order() {
    let (pg, db) = accounts(1).await;
    let other = pg.client().await.unwrap();
    // Ten writes (past the few a transaction holds inline), each depending on the one before:
    // the balance is doubled and a note records the value seen, in queue order; NULLs and
    // borrowed strings travel as they would through `execute`.
    let notes: Vec<String> = (0..10).map(|i| format!("note {i}")).collect();
    db.with_transaction(&TransactionOptions::new(), |tx| {
        let notes = &notes;
        Box::pin(async move {
            let double = tx
                .prepare_cached("UPDATE accounts SET balance = balance * 2 WHERE id = $1")
                .await?;
            let note = tx
                .prepare_cached(
                    "INSERT INTO audit SELECT $1, $2 || ' ' || balance || coalesce($3, '') \
                     FROM accounts WHERE id = 1",
                )
                .await?;
            for (i, text) in notes.iter().enumerate() {
                let account: Option<i64> = if i % 2 == 0 { Some(1) } else { None };
                let suffix: Option<&str> = None;
                tx.execute_on_commit(&double, &[&1_i64]).await?;
                tx.execute_on_commit(&note, &[&account, text, &suffix])
                    .await?;
            }
            Ok::<_, rowlock::Error>(())
        })
    })
    .await
    .unwrap();
    assert_eq!(balance(&other, 1).await, 100 << 10);
    let rows = other
        .query("SELECT account_id, note FROM audit ORDER BY note", &[])
        .await
        .unwrap();
    let got: Vec<(Option<i64>, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want: Vec<(Option<i64>, String)> = (0..10)
        .map(|i| {
            let account = if i % 2 == 0 { Some(1) } else { None };
            (account, format!("note {i} {}", 100 << (i + 1)))
        })
        .collect();
    assert_eq!(got, want);
}

/// Queues `set` (`UPDATE accounts SET balance = $2 WHERE id = $1`) with too few values, then
/// with a value of the wrong type (text for bigint) after one that fits: both refused as
/// `InvalidArgument` naming what does not fit.
async fn refuses_misfits<T: ?Sized + rowlock::AsStatement>(tx: &rowlock::Transaction, set: &T) {
    let err = tx.execute_on_commit(set, &[&1_i64]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(
        err.to_string()
            .contains("takes 2 parameter(s); 1 were given"),
        "{err}"
    );
    let err = tx
        .execute_on_commit(set, &[&1_i64, &"lots"])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(
        err.to_string().contains("parameter $2 has the wrong type"),
        "{err}"
    );
}

#[tokio::test]
async fn a_queued_write_that_does_not_fit_is_refused_and_nothing_is_queued() {
    let (pg, db) = accounts(1).await;
    let other = pg.client().await.unwrap();
    let tx = db.begin(&TransactionOptions::new()).await.unwrap();
    let stmt = tx
        .prepare_cached("UPDATE accounts SET balance = $2 WHERE id = $1")
        .await
        .unwrap();
    refuses_misfits(&tx, &stmt).await;
    // The transaction goes on: a write that fits is queued and committed, alone.
    tx.execute_on_commit(&stmt, &[&1_i64, &7_i64])
        .await
        .unwrap();
    assert!(format!("{tx:?}").contains("queued_on_commit: 1"), "{tx:?}");
    tx.commit().await.unwrap();
    assert_eq!(balance(&other, 1).await, 7);
}

/// A write queued as SQL text: refused as a prepared one is when its values do not fit (the
/// text's types are learned on its first use, the transaction's one wait), refused when it is
/// a savepoint command, and committed with the transaction otherwise.
#[tokio::test]
async fn a_queued_text_write_is_refused_as_a_prepared_one_is_and_commits_otherwise() {
    let (pg, db) = accounts(2).await;
    let other = pg.client().await.unwrap();
    const SET: &str = "UPDATE accounts SET balance = $2 WHERE id = $1";
    let tx = db.begin(&TransactionOptions::new()).await.unwrap();
    refuses_misfits(&tx, SET).await;
    let err = tx
        .execute_on_commit("SAVEPOINT later", &[])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(format!("{tx:?}").contains("queued_on_commit: 0"), "{tx:?}");
    tx.execute_on_commit(SET, &[&1_i64, &7_i64]).await.unwrap();
    tx.execute_on_commit(&SET.to_string(), &[&2_i64, &8_i64])
        .await
        .unwrap();
    assert!(format!("{tx:?}").contains("queued_on_commit: 2"), "{tx:?}");
    assert_eq!(balance(&other, 1).await, 100, "nothing sent before COMMIT");
    tx.commit().await.unwrap();
    assert_eq!(balance(&other, 1).await, 7);
    assert_eq!(balance(&other, 2).await, 8);
    // A text the server cannot prepare fails where it is queued, and aborts the transaction.
    let tx = db.begin(&TransactionOptions::new()).await.unwrap();
    let err = tx
        .execute_on_commit("UPDATE accounts SET nope = $1", &[&1_i64])
        .await
        .unwrap_err();
    assert_eq!(err.sql_state().map(|s| s.code()), Some("42703"), "{err}");
    assert!(tx.commit().await.is_err());
    assert_eq!(balance(&other, 1).await, 7);
}

#[tokio::test]
async fn a_statement_whose_values_do_not_fit_is_refused_as_a_queued_write_is() {
    let (pg, db) = accounts(1).await;
    let other = pg.client().await.unwrap();
    let tx = db.begin(&TransactionOptions::new()).await.unwrap();
    let sql = "UPDATE accounts SET balance = $2 WHERE id = $1";
    let stmt = tx.prepare_cached(sql).await.unwrap();
    // Text for bigint, through every statement method, as text and prepared: the same kind
    // and the same words as `execute_on_commit`, naming the placeholder as the SQL spells it
    // (`$2`), not by the driver's 0-based "parameter 1".
    let text_value: &(dyn rowlock::tokio_postgres::types::ToSql + Sync) = &"lots";
    let misfits = [
        tx.execute(sql, &[&1_i64, text_value]).await.unwrap_err(),
        tx.execute(&stmt, &[&1_i64, text_value]).await.unwrap_err(),
        tx.query(&stmt, &[&1_i64, text_value]).await.unwrap_err(),
        tx.query_one(sql, &[&1_i64, text_value]).await.unwrap_err(),
        tx.query_opt(&stmt, &[&1_i64, text_value])
            .await
            .unwrap_err(),
    ];
    for err in &misfits {
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert!(
            err.to_string().contains("parameter $2 has the wrong type"),
            "{err}"
        );
    }
    // Too few values, as text and prepared.
    for err in [
        tx.execute(sql, &[&1_i64]).await.unwrap_err(),
        tx.query(&stmt, &[&1_i64]).await.unwrap_err(),
    ] {
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert!(
            err.to_string()
                .contains("takes 2 parameter(s); 1 were given"),
            "{err}"
        );
    }
    // Nothing was sent: the transaction goes on and commits.
    assert_eq!(tx.execute(&stmt, &[&1_i64, &7_i64]).await.unwrap(), 1);
    tx.commit().await.unwrap();
    assert_eq!(balance(&other, 1).await, 7);
}

#[tokio::test]
async fn error_on_the_raw_client_is_caught_at_commit() {
    let (pg, db) = accounts(1).await;
    let other = pg.client().await.unwrap();
    let tx = db.begin(&TransactionOptions::new()).await.unwrap();
    tx.execute("UPDATE accounts SET balance = 3", &[])
        .await
        .unwrap();
    let raw = tx.client().await.unwrap();
    assert!(
        raw.batch_execute("SELECT no_such_column FROM accounts")
            .await
            .is_err()
    );
    let err = tx.commit().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TransactionAborted, "{err}");
    assert_eq!(balance(&other, 1).await, 100);
    assert_eq!(in_transaction(&other).await, 0);
}

/// A `COMMIT` (or `ROLLBACK`) sent on the raw client ends the transaction under the guard:
/// what the guard sends after it runs on its own, outside the lock. The commit says so
/// instead of reporting one committed transaction, and the connection, whose session the raw
/// client may have changed too, is not pooled again.
#[tokio::test]
async fn a_transaction_ended_on_the_raw_client_is_not_reported_committed() {
    let (pg, db) = accounts(2).await;
    let other = pg.client().await.unwrap();
    for end in ["COMMIT", "ROLLBACK"] {
        let result = db
            .with_locked_row(
                &1_i64,
                rowlock::Lock::new(),
                |tx, a: crate::support::Account| {
                    Box::pin(async move {
                        tx.execute("UPDATE accounts SET balance = 1 WHERE id = $1", &[&a.id])
                            .await?;
                        let raw = tx.client().await?;
                        raw.batch_execute(end)
                            .await
                            .map_err(|e| tx.client_error(e))?;
                        tx.execute("UPDATE accounts SET balance = 2 WHERE id = 2", &[])
                            .await?;
                        Ok::<_, rowlock::Error>(())
                    })
                },
            )
            .await;
        let err = result.unwrap_err();
        assert_eq!(
            err.sql_state(),
            Some(&SqlState::NO_ACTIVE_SQL_TRANSACTION),
            "{err}"
        );
        assert!(err.to_string().contains("ended on the raw client"), "{err}");
        assert!(!err.is_retryable(), "{err}");
        // Not pooled again, and nothing left open.
        assert_eq!(db.pool().status().size, 0, "{end}");
        assert_eq!(in_transaction(&other).await, 0);
    }
    // What ran after the raw COMMIT committed on its own: the error says so.
    assert_eq!(balance(&other, 2).await, 2);
}

#[tokio::test]
async fn commit_error_from_the_server_is_reported() {
    let (pg, db) = accounts(1).await;
    let other = pg.client().await.unwrap();
    other
        .batch_execute(
            "ALTER TABLE audit DROP CONSTRAINT audit_note_key;
             ALTER TABLE audit ADD CONSTRAINT audit_note_key UNIQUE (note)
                 DEFERRABLE INITIALLY DEFERRED",
        )
        .await
        .unwrap();
    let err = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move {
                tx.execute("INSERT INTO audit VALUES (1, 'x'), (1, 'x')", &[])
                    .await?;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.sql_state(), Some(&SqlState::UNIQUE_VIOLATION), "{err}");
    let audits: i64 = other
        .query_one("SELECT count(*) FROM audit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(audits, 0);
}

/// A write in a transaction the caller opened `READ ONLY` fails with `25006`, as a write on a
/// standby does; but the server is fine, so it is `Db` (not `ReadOnly`): not retried, and the
/// connection goes back to the pool. Whether the write is sent at once or queued for commit.
#[tokio::test]
async fn a_write_in_a_read_only_transaction_is_not_taken_for_a_standby() {
    let (pg, _) = accounts(1).await;
    let db = pg.db_with(rowlock::Db::builder().max_size(1)).unwrap();
    let pid = backend_pid(&db).await;
    let opts = TransactionOptions::new()
        .read_only(true)
        .retry(rowlock::RetryPolicy::new().max_attempts(3));
    for queued in [false, true] {
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let err = db
            .with_transaction(&opts, |tx| {
                attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Box::pin(async move {
                    let sql = "UPDATE accounts SET balance = 0 WHERE id = $1";
                    if queued {
                        let stmt = tx.prepare_cached(sql).await?;
                        tx.execute_on_commit(&stmt, &[&1_i64]).await?;
                    } else {
                        tx.execute(sql, &[&1_i64]).await?;
                    }
                    Ok::<_, rowlock::Error>(())
                })
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Db, "queued {queued}: {err}");
        assert_eq!(
            err.sql_state(),
            Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
            "{err}"
        );
        assert!(!err.is_retryable(), "{err}");
        assert_eq!(attempts.into_inner(), 1, "queued {queued}: not retried");
        assert!(err.to_string().contains("READ ONLY"), "{err}");
        // The connection was kept: the same server process serves the next call.
        assert_eq!(backend_pid(&db).await, pid, "queued {queued}");
    }
    let other = pg.client().await.unwrap();
    assert_eq!(balance(&other, 1).await, 100);
}

/// A write queued for commit on a connection whose server refuses writes (as after a
/// failover; here the session is made read-only) fails with the retryable `ReadOnly`, and the
/// connection is closed, not pooled again: with a retry policy the transaction runs again on
/// a new connection. Before, the commit's errors skipped that check: the connection went back
/// to the pool and every retry drew it again.
#[tokio::test]
async fn a_queued_write_refused_by_a_read_only_server_is_retried_on_a_new_connection() {
    let (pg, _) = accounts(1).await;
    for retried in [false, true] {
        let mut builder = rowlock::Db::builder().max_size(1);
        if retried {
            builder = builder.retry(rowlock::RetryPolicy::new().max_attempts(3));
        }
        let db = pg.db_with(builder).unwrap();
        let pid: i32 = {
            let conn = db.pool().get().await.unwrap();
            conn.batch_execute("SET default_transaction_read_only = on")
                .await
                .unwrap();
            conn.query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0)
        };
        let result = db
            .with_transaction(&TransactionOptions::new(), |tx| {
                Box::pin(async move {
                    let stmt = tx
                        .prepare_cached("UPDATE accounts SET balance = balance + 1 WHERE id = $1")
                        .await?;
                    tx.execute_on_commit(&stmt, &[&1_i64]).await?;
                    Ok::<_, rowlock::Error>(())
                })
            })
            .await;
        if retried {
            result.unwrap();
        } else {
            let err = result.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ReadOnly, "{err}");
            assert!(err.is_retryable(), "{err}");
        }
        let now = backend_pid(&db).await;
        assert_ne!(now, pid, "the read-only connection was not pooled again");
    }
    let other = pg.client().await.unwrap();
    assert_eq!(balance(&other, 1).await, 101, "written once, by the retry");
}

/// SQL sent through the guard that would end its transaction under it (the row lock released
/// mid-call, later statements in autocommit, the call still reported `Done`) or change the
/// pooled session for later calls is refused before anything is sent: the lock is still held,
/// the transaction goes on and commits. Before, each was sent and the call returned `Done`.
#[tokio::test]
async fn statements_that_would_end_the_transaction_or_leak_into_the_pool_are_refused() {
    let (pg, _) = accounts(1).await;
    let db = pg.db_with(rowlock::Db::builder().max_size(1)).unwrap();
    let other = pg.client().await.unwrap();
    let refused = [
        "COMMIT",
        "rollback",
        "END",
        "BEGIN",
        "SET statement_timeout = '5ms'",
        "UPDATE accounts SET balance = 0; COMMIT",
    ];
    for sql in refused {
        let outcome = db
            .with_locked_row(
                &1_i64,
                rowlock::Lock::new(),
                |tx, a: crate::support::Account| {
                    let other = &other;
                    Box::pin(async move {
                        for err in [
                            tx.batch_execute(sql).await.unwrap_err(),
                            tx.execute(sql, &[]).await.unwrap_err(),
                            tx.prepare_cached(sql).await.unwrap_err(),
                        ] {
                            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{sql}: {err}");
                            assert!(err.to_string().contains("is refused"), "{sql}: {err}");
                        }
                        // Nothing was sent: the row is still locked, and the transaction goes on.
                        let busy = other
                            .query("SELECT 1 FROM accounts WHERE id = 1 FOR UPDATE NOWAIT", &[])
                            .await
                            .unwrap_err();
                        assert_eq!(busy.code(), Some(&SqlState::LOCK_NOT_AVAILABLE), "{sql}");
                        tx.execute(
                            "UPDATE accounts SET balance = $2 WHERE id = $1",
                            &[&a.id, &(a.balance + 1)],
                        )
                        .await?;
                        Ok::<_, rowlock::Error>(())
                    })
                },
            )
            .await
            .unwrap();
        assert_eq!(outcome, rowlock::Outcome::Done(()), "{sql}");
    }
    assert_eq!(balance(&other, 1).await, 100 + refused.len() as i64);
    // The one pooled session kept its defaults.
    let timeout = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move {
                let row = tx.query_one("SHOW statement_timeout", &[]).await?;
                Ok::<String, rowlock::Error>(row.get(0))
            })
        })
        .await
        .unwrap();
    assert_eq!(timeout, "0");
    // A savepoint command is followed only when it runs as text: preparing one is refused.
    let err = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move { tx.prepare_cached("SAVEPOINT s").await.map(drop) })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
}

/// State a transaction's SQL leaves in its session on purpose (a temporary table without
/// `ON COMMIT DROP`, a `LISTEN`) would reach the next caller of the pooled connection: before,
/// that caller's `CREATE TEMP TABLE` of the same name failed with `42P07` ("relation already
/// exists"). The connection is now closed when such a transaction ends, committed or not; a
/// temporary table that ends with the transaction keeps it pooled.
#[tokio::test]
async fn a_transaction_that_leaves_state_in_its_session_does_not_pool_its_connection() {
    let (pg, _) = accounts(1).await;
    let db = pg.db_with(rowlock::Db::builder().max_size(1)).unwrap();
    let opts = TransactionOptions::new();
    let first = backend_pid(&db).await;
    for sql in [
        "CREATE TEMP TABLE scratch (x int) ON COMMIT DROP; INSERT INTO scratch VALUES (1)",
        "CREATE TEMP TABLE scratch (x int) ON COMMIT DROP; INSERT INTO scratch VALUES (2)",
    ] {
        db.with_transaction(&opts, |tx| {
            Box::pin(async move { tx.batch_execute(sql).await })
        })
        .await
        .unwrap();
    }
    assert_eq!(backend_pid(&db).await, first, "nothing outlived those");
    let mut seen = vec![first];
    for round in 0..2 {
        db.with_transaction(&opts, |tx| {
            Box::pin(async move {
                tx.batch_execute(
                    "CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1)",
                )
                .await
            })
        })
        .await
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let now = backend_pid(&db).await;
        assert!(!seen.contains(&now), "round {round}: a fresh session");
        seen.push(now);
    }
    // Rolled back (the closure's own error) after a LISTEN: closed too.
    let err = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move {
                tx.batch_execute("LISTEN jobs").await?;
                rowlock::Outcome::<()>::NotFound(vec![]).into_result()
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RowNotFound, "{err}");
    let now = backend_pid(&db).await;
    assert!(!seen.contains(&now), "a fresh session after the LISTEN");
    seen.push(now);
    // An SQL-level prepared statement outlasts a rollback: a failing batch after it still
    // closes the connection.
    let err = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move {
                tx.batch_execute("PREPARE p AS SELECT 1; SELECT 1 / 0")
                    .await
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.sql_state().map(|s| s.code()), Some("22012"), "{err}");
    let now = backend_pid(&db).await;
    assert!(!seen.contains(&now), "a fresh session after the PREPARE");
    seen.push(now);
    // A session-level advisory lock, and a setting made for the session by function: before,
    // the lock stayed held by the pooled connection (no other session could take the key)
    // and the setting reached every later caller.
    let locker = now;
    for sql in [
        "SELECT pg_advisory_lock(42)",
        "SELECT set_config('application_name', 'leaked', false)",
    ] {
        db.with_transaction(&opts, |tx| {
            Box::pin(async move { tx.query_one(sql, &[]).await.map(drop) })
        })
        .await
        .unwrap();
        let now = backend_pid(&db).await;
        assert!(!seen.contains(&now), "a fresh session after {sql}");
        seen.push(now);
    }
    let other = pg.client().await.unwrap();
    // The closed connection's backend releases its locks as it exits: once it is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while other
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&locker],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "backend {locker} still there"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let free: bool = other
        .query_one("SELECT pg_try_advisory_lock(42)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(free, "the session lock ended with its connection");
    let name: String = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move {
                Ok::<_, rowlock::Error>(
                    tx.query_one("SELECT current_setting('application_name')", &[])
                        .await?
                        .get(0),
                )
            })
        })
        .await
        .unwrap();
    assert_ne!(name, "leaked");
    // Prepared, such a statement would run unseen: refused.
    let err = db
        .with_transaction(&opts, |tx| {
            Box::pin(async move { tx.prepare_cached("LISTEN jobs").await.map(drop) })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
}

/// A queued text whose learned types the server refuses at `COMMIT` (class `42`: a migration
/// dropped the column it sets) is learned again on its next use, as a text run at once is:
/// the next transaction's queue call fails at once, naming the column, instead of queuing
/// a write that fails again at its commit.
#[tokio::test]
async fn a_queued_text_refused_at_commit_is_learned_again() {
    let (pg, db) = accounts(1).await;
    let admin = pg.client().await.unwrap();
    admin
        .batch_execute("ALTER TABLE accounts ADD COLUMN flag int")
        .await
        .unwrap();
    const SET: &str = "UPDATE accounts SET flag = $2 WHERE id = $1";
    let queue = |v: i32| {
        let db = db.clone();
        async move {
            let tx = db.begin(&TransactionOptions::new()).await?;
            tx.execute_on_commit(SET, &[&1_i64, &v]).await?;
            tx.commit().await
        }
    };
    queue(1).await.unwrap();
    admin
        .batch_execute("ALTER TABLE accounts DROP COLUMN flag")
        .await
        .unwrap();
    let at_commit = queue(2).await.unwrap_err();
    assert_eq!(
        at_commit.sql_state().map(|s| s.code()),
        Some("42703"),
        "{at_commit}"
    );
    assert!(at_commit.to_string().contains("committing"), "{at_commit}");
    let at_queue = queue(3).await.unwrap_err();
    assert_eq!(
        at_queue.sql_state().map(|s| s.code()),
        Some("42703"),
        "{at_queue}"
    );
    assert!(
        at_queue.to_string().contains("running a statement"),
        "{at_queue}"
    );
}
