//! Transitions: one conditional statement, typed outcomes, and the races they must survive.

use rowlock::tokio_postgres::{Error as PgError, Row};
use rowlock::{ErrorKind, LockableRow, Outcome, RowRef, Table, TransactionOptions, Transition};
use rowlock_testing::wait_for_blocked_by;

use crate::support::{Account, WAIT, accounts, backend_pid, database};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Task {
    id: i64,
    status: String,
    owner: Option<String>,
}

impl LockableRow for Task {
    type Key = i64;
    const TABLE: Table = Table::new("tasks");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    const COLUMNS: &'static [&'static str] = &["id", "status", "owner"];
    fn from_row(row: &Row) -> Result<Self, PgError> {
        Ok(Task {
            id: row.try_get("id")?,
            status: row.try_get("status")?,
            owner: row.try_get("owner")?,
        })
    }
    fn key(&self) -> i64 {
        self.id
    }
}

const TASKS: &str = "CREATE TABLE tasks (id bigint PRIMARY KEY, status text NOT NULL, owner text);
                     CREATE TABLE history (task_id bigint, note text);
                     INSERT INTO tasks (id, status) VALUES (1, 'open'), (2, 'done');";

fn take() -> Transition {
    Transition::new("status = 'taken', owner = $1").when("status = 'open'")
}

/// Task `id`'s status as another session reads it.
async fn status_of(pg: &rowlock_testing::TestDatabase, id: i64) -> String {
    pg.client()
        .await
        .unwrap()
        .query_one("SELECT status FROM tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

fn task(id: i64, status: &str, owner: Option<&str>) -> Task {
    Task {
        id,
        status: status.into(),
        owner: owner.map(Into::into),
    }
}

#[tokio::test]
async fn done_conflict_and_not_found_in_one_statement() {
    let (_db, db) = database(TASKS, 2).await;
    let take = take();
    let done = db.transition::<Task>(&1, &take, &[&"ann"]).await.unwrap();
    assert_eq!(done, Outcome::Done(task(1, "taken", Some("ann"))));
    // Already taken: the conflict carries the row as it is now.
    let again = db.transition::<Task>(&1, &take, &[&"bob"]).await.unwrap();
    assert_eq!(again, Outcome::Conflict(task(1, "taken", Some("ann"))));
    let other = db.transition::<Task>(&2, &take, &[&"bob"]).await.unwrap();
    assert_eq!(other, Outcome::Conflict(task(2, "done", None)));
    let missing = db.transition::<Task>(&9, &take, &[&"bob"]).await.unwrap();
    assert_eq!(missing, Outcome::NotFound(vec![RowRef::of::<Task>(&9)]));
}

#[tokio::test]
async fn then_statements_run_only_when_the_row_changed() {
    let (pg, db) = database(TASKS, 2).await;
    let take = take().then("INSERT INTO history SELECT id, 'taken by ' || $1 FROM changed");
    assert!(
        db.transition::<Task>(&1, &take, &[&"ann"])
            .await
            .unwrap()
            .is_done()
    );
    let conflict = db.transition::<Task>(&1, &take, &[&"bob"]).await.unwrap();
    assert!(matches!(conflict, Outcome::Conflict(_)));
    let rows = pg
        .client()
        .await
        .unwrap()
        .query("SELECT task_id, note FROM history", &[])
        .await
        .unwrap();
    let notes: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(notes, vec![(1, "taken by ann".to_string())]);
}

/// A transition that finds the row being changed waits, then checks its condition on the new
/// version: two takers from the same state never both win.
#[tokio::test]
async fn a_concurrent_change_is_seen_after_the_wait() {
    let (pg, db) = database(TASKS, 2).await;
    let holder = pg.client().await.unwrap();
    holder
        .batch_execute("BEGIN; UPDATE tasks SET status = 'taken', owner = 'zoe' WHERE id = 1")
        .await
        .unwrap();
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let take = take();
    let pool2 = db.clone();
    let racer = tokio::spawn(async move {
        let take = take;
        pool2.transition::<Task>(&1, &take, &[&"ann"]).await
    });
    let observer = pg.client().await.unwrap();
    wait_for_blocked_by(&observer, holder_pid, 1, WAIT)
        .await
        .unwrap();
    holder.batch_execute("COMMIT").await.unwrap();
    let outcome = racer.await.unwrap().unwrap();
    assert_eq!(
        outcome,
        Outcome::Conflict(task(1, "taken", Some("zoe"))),
        "the conflict reports the state committed by the other transaction"
    );
}

#[tokio::test]
async fn many_takers_exactly_one_wins() {
    let (pg, db) = database(TASKS, 8).await;
    let take = std::sync::Arc::new(take());
    let mut handles = Vec::new();
    for i in 0..32 {
        let (db, take) = (db.clone(), take.clone());
        handles.push(tokio::spawn(async move {
            let name = format!("worker {i}");
            db.transition::<Task>(&1, &take, &[&name]).await
        }));
    }
    let mut winners = 0;
    for h in handles {
        match h.await.unwrap().unwrap() {
            Outcome::Done(_) => winners += 1,
            Outcome::Conflict(t) => assert_eq!(t.status, "taken"),
            other => panic!("task 1 exists: {other}"),
        }
    }
    assert_eq!(winners, 1);
    let owner: Option<String> = pg
        .client()
        .await
        .unwrap()
        .query_one("SELECT owner FROM tasks WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert!(owner.unwrap().starts_with("worker "));
}

#[tokio::test]
async fn bad_transitions_are_refused_before_anything_is_sent() {
    let (pg, db) = database(TASKS, 1).await;
    let cases: Vec<(Transition, Vec<&str>, &str)> = vec![
        (Transition::new("  "), vec![], "SET list is empty"),
        (take().when(""), vec!["x"], "condition is empty"),
        (
            Transition::new("status = 'x'; DROP TABLE tasks"),
            vec![],
            "may not contain ';'",
        ),
        (Transition::new("owner = $2"), vec!["a", "b"], "not $1"),
        (take(), vec![], "passed 0"),
        (take(), vec!["a", "b"], "passed 2"),
        (
            take().guard("SELECT 1 FROM history"),
            vec!["a"],
            "as `target`",
        ),
        (
            take().then("DELETE FROM history"),
            vec!["a"],
            "as `changed`",
        ),
        (
            // `changed` only inside a literal does not count.
            take().then("INSERT INTO history VALUES (1, 'changed')"),
            vec!["a"],
            "as `changed`",
        ),
    ];
    for (t, params, expected) in cases {
        let params: Vec<&(dyn rowlock::tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn rowlock::tokio_postgres::types::ToSql + Sync))
            .collect();
        let err = db.transition::<Task>(&1, &t, &params).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{t:?}: {err}");
        assert!(err.to_string().contains(expected), "{t:?}: {err}");
    }
    assert_eq!(status_of(&pg, 1).await, "open");
    // SQL the server rejects fails when prepared, before it runs; the message says where.
    let err = db
        .transition::<Task>(&1, &Transition::new("no_such_column = 1"), &[])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Db);
    assert!(err.to_string().contains("running a transition"), "{err}");
    assert!(err.to_string().contains("no_such_column"), "{err}");
}

#[tokio::test]
async fn a_key_that_is_not_unique_is_reported() {
    let (_db, db) = database(
        "CREATE TABLE tasks (id bigint, status text NOT NULL, owner text);
         INSERT INTO tasks (id, status) VALUES (1, 'open'), (1, 'open');",
        1,
    )
    .await;
    let err = db
        .transition::<Task>(&1, &take(), &[&"ann"])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::KeyNotUnique, "{err}");
}

/// Inside a caller's transaction the change is the caller's to commit or roll back.
#[tokio::test]
async fn inside_a_transaction_it_commits_with_the_transaction() {
    let (_db, db) = accounts(1).await;
    let debit = Transition::new("balance = balance - $1").when("balance >= $1");
    let tx = db.begin(&TransactionOptions::new()).await.unwrap();
    let done = tx
        .transition::<Account>(&1, &debit, &[&60_i64])
        .await
        .unwrap();
    assert_eq!(done.done().unwrap().balance, 40);
    let short = tx
        .transition::<Account>(&1, &debit, &[&60_i64])
        .await
        .unwrap();
    assert_eq!(short, Outcome::Conflict(Account { id: 1, balance: 40 }));
    tx.rollback().await.unwrap();
    let again = db
        .transition::<Account>(&1, &debit, &[&60_i64])
        .await
        .unwrap();
    assert_eq!(again, Outcome::Done(Account { id: 1, balance: 40 }));
}

/// `SELECT *` row types survive a column added while the db is warm.
#[tokio::test]
async fn a_migration_while_the_pool_is_warm() {
    let (pg, db) = accounts(1).await;
    let credit = Transition::new("balance = balance + $1");
    for _ in 0..2 {
        let done = db.transition::<Account>(&1, &credit, &[&1_i64]).await;
        assert!(done.unwrap().is_done());
    }
    pg.client()
        .await
        .unwrap()
        .batch_execute("ALTER TABLE accounts ADD COLUMN note text")
        .await
        .unwrap();
    let after = db
        .transition::<Account>(&1, &credit, &[&1_i64])
        .await
        .unwrap();
    assert_eq!(
        after,
        Outcome::Done(Account {
            id: 1,
            balance: 103
        })
    );
}

/// A guard reaches another table; the rows it locks are locked after the target row.
#[tokio::test]
async fn guards_decide_with_other_rows() {
    let (_db, db) = database(
        "CREATE TABLE tasks (id bigint PRIMARY KEY, status text NOT NULL, owner text);
         CREATE TABLE workers (name text PRIMARY KEY, active boolean NOT NULL);
         INSERT INTO tasks (id, status) VALUES (1, 'open');
         INSERT INTO workers VALUES ('ann', true), ('bob', false);",
        1,
    )
    .await;
    let take = take().guard(
        "SELECT 1 FROM workers w WHERE w.name = $1 AND w.active AND target.status = 'open' \
         FOR KEY SHARE OF w",
    );
    let refused = db.transition::<Task>(&1, &take, &[&"bob"]).await.unwrap();
    assert_eq!(refused, Outcome::Conflict(task(1, "open", None)));
    let done = db.transition::<Task>(&1, &take, &[&"ann"]).await.unwrap();
    assert_eq!(done, Outcome::Done(task(1, "taken", Some("ann"))));
}

/// The usual conflict (the row as the statement saw it does not meet the condition) is read
/// without a lock: inside a caller's transaction it leaves the row free for others.
#[tokio::test]
async fn a_plain_conflict_takes_no_lock() {
    let (pg, db) = database(TASKS, 1).await;
    let tx = db.begin(&TransactionOptions::new()).await.unwrap();
    let done = tx.transition::<Task>(&2, &take(), &[&"ann"]).await.unwrap();
    assert_eq!(done, Outcome::Conflict(task(2, "done", None)));
    let other = pg.client().await.unwrap();
    other
        .batch_execute("SET lock_timeout = '1ms'; SELECT * FROM tasks WHERE id = 2 FOR UPDATE")
        .await
        .expect("the conflicting row is not locked by the transition");
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn a_value_of_the_wrong_type_names_the_callers_placeholder_and_changes_nothing() {
    let (pg, db) = database(TASKS, 2).await;
    let take = Transition::new("status = 'taken', owner = $1").when("status = $2");
    let cases: [(&[&(dyn rowlock::tokio_postgres::types::ToSql + Sync)], &str); 2] = [
        (&[&5_i32, &"open"], "parameter $1 of the transition"),
        (&[&"ann", &5_i32], "parameter $2 of the transition"),
    ];
    for (params, expected) in cases {
        let err = db.transition::<Task>(&1, &take, params).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        let text = err.to_string();
        assert!(text.contains(expected), "{text}");
        assert!(
            text.contains("Rust type `i32`"),
            "the driver's cause: {text}"
        );
        assert!(
            !text.contains("serializing parameter"),
            "no 0-based index: {text}"
        );
        // Inside a transaction, the same.
        let take = &take;
        let inside = db
            .with_transaction(&TransactionOptions::new(), |tx| {
                Box::pin(async move { tx.transition::<Task>(&1, take, params).await })
            })
            .await
            .unwrap_err();
        assert_eq!(inside.kind(), ErrorKind::InvalidArgument, "{inside}");
        assert!(inside.to_string().contains(expected), "{inside}");
    }
    // A key type that does not fit the key column.
    #[derive(Debug)]
    struct NarrowKey;
    impl LockableRow for NarrowKey {
        type Key = i32;
        const TABLE: Table = Table::new("tasks");
        const KEY_COLUMNS: &'static [&'static str] = &["id"];
        fn from_row(_: &Row) -> Result<Self, PgError> {
            Ok(NarrowKey)
        }
        fn key(&self) -> i32 {
            0
        }
    }
    let err = db
        .transition::<NarrowKey>(&1, &take, &[&"ann", &"open"])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("the key of \"tasks\""), "{err}");
    assert_eq!(status_of(&pg, 1).await, "open", "nothing changed");
}

/// A transition's pooled connection is to a server that no longer accepts writes (as after a
/// failover; here the session is made read-only): with a retry policy on the handle the
/// statement runs again on a new connection; without one the caller gets the retryable
/// `ReadOnly`. Either way the connection is not pooled again, and nothing ran on it.
#[tokio::test]
async fn the_handles_retry_policy_reruns_a_transition_refused_by_a_read_only_server() {
    let (pg, plain) = database(TASKS, 1).await;
    let retrying = pg
        .db_with(
            rowlock::Db::builder()
                .max_size(1)
                .retry(rowlock::RetryPolicy::new().max_attempts(3)),
        )
        .unwrap();
    for (db, retried) in [(&plain, false), (&retrying, true)] {
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
        let result = db.transition::<Task>(&1, &take(), &[&"ann"]).await;
        if retried {
            assert_eq!(
                result.unwrap(),
                Outcome::Done(task(1, "taken", Some("ann")))
            );
        } else {
            let err = result.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ReadOnly, "{err}");
            assert!(err.is_retryable(), "{err}");
            assert_eq!(status_of(&pg, 1).await, "open", "nothing ran");
        }
        let now: i32 = backend_pid(db).await;
        assert_ne!(now, pid, "the read-only connection was not pooled again");
    }
}

/// The handle's lock and statement timeouts bound a transition as they bound every other
/// call ("every lock wait of every call"): before, a transition ran outside any transaction
/// and neither applied, so it waited for the holder of its row as long as the holder kept it.
/// Both directly and behind PgBouncer.
#[tokio::test]
async fn the_handles_lock_and_statement_timeouts_bound_a_transition() {
    let (pg, _) = database(TASKS, 1).await;
    let db = pg
        .db_with(
            rowlock::Db::builder()
                .max_size(2)
                .lock_timeout(std::time::Duration::from_millis(100))
                .statement_timeout(std::time::Duration::from_millis(300)),
        )
        .unwrap();
    let holder = pg.client().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM tasks WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let waited = tokio::time::timeout(WAIT, db.transition::<Task>(&1, &take(), &[&"ann"]))
        .await
        .expect("the lock timeout ends the wait, not the holder");
    // The answer every locking call gives a lock timeout: an outcome, not an error.
    let Outcome::LockTimeout(err) = waited.unwrap() else {
        panic!("a lock timeout is Outcome::LockTimeout");
    };
    assert_eq!(err.kind(), ErrorKind::LockTimeout, "{err}");
    assert_eq!(err.rows(), [RowRef::of::<Task>(&1)], "{err}");
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(status_of(&pg, 1).await, "open", "nothing changed");
    let slow =
        Transition::new("status = 'taken'").when("status = 'open' AND pg_sleep(2) IS NOT NULL");
    let err = tokio::time::timeout(WAIT, db.transition::<Task>(&1, &slow, &[]))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StatementTimeout, "{err}");
    assert_eq!(status_of(&pg, 1).await, "open", "nothing changed");
    // And a transition that neither waits nor runs long is as before.
    assert_eq!(
        db.transition::<Task>(&1, &take(), &[&"ann"]).await.unwrap(),
        Outcome::Done(task(1, "taken", Some("ann")))
    );
    assert_eq!(
        db.transition::<Task>(&1, &take(), &[&"bob"]).await.unwrap(),
        Outcome::Conflict(task(1, "taken", Some("ann")))
    );
}

/// Inside the caller's transaction, a lock timeout set on it ends a transition's wait with
/// `Outcome::LockTimeout`, and the transaction goes on (the statement ran in a savepoint):
/// before, the transition failed with an error and the transaction was aborted.
#[tokio::test]
async fn a_lock_timeout_inside_your_transaction_is_an_outcome_and_the_transaction_goes_on() {
    let (pg, _) = database(TASKS, 1).await;
    let db = pg.db(2);
    let holder = pg.client().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM tasks WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let options = TransactionOptions::new().lock_timeout(std::time::Duration::from_millis(100));
    let tx = db.begin(&options).await.unwrap();
    // The holder keeps the row until after the wait has ended: the timeout fires every time.
    let waited = tokio::time::timeout(WAIT, tx.transition::<Task>(&1, &take(), &[&"ann"]))
        .await
        .expect("the lock timeout ends the wait, not the holder")
        .unwrap();
    let Outcome::LockTimeout(err) = waited else {
        panic!("{waited:?}");
    };
    assert_eq!(err.kind(), ErrorKind::LockTimeout, "{err}");
    assert_eq!(err.rows(), [RowRef::of::<Task>(&1)], "{err}");
    // The transaction goes on: another row, a write of its own, and the commit.
    tx.execute(
        "INSERT INTO history (task_id, note) VALUES (1, 'busy, try later')",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        tx.transition::<Task>(&2, &take(), &[&"ann"]).await.unwrap(),
        Outcome::Conflict(task(2, "done", None))
    );
    tx.commit().await.unwrap();
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(status_of(&pg, 1).await, "open", "nothing changed");
    let notes = pg
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM history", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(notes, 1, "the transaction's own write committed");
}
