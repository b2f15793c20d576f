//! When a lock is not available or a lock wait times out, the error names who holds it.

use std::time::Duration;

use rowlock::tokio_postgres::{Client, NoTls};
use rowlock::{AdvisoryKey, Lock, Outcome, RetryPolicy};

use crate::support::{Account, Seat, accounts};

/// A session with its own application_name, holding row 1 of `accounts` in an open
/// transaction, and the advisory lock 77.
async fn holder(pg: &rowlock_testing::TestDatabase) -> (Client, i32) {
    let mut config = pg.config().clone();
    config.application_name("billing-batch");
    let (client, conn) = config.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(
            "BEGIN; SELECT * FROM accounts WHERE id = 1 FOR UPDATE;
             SELECT pg_advisory_xact_lock(77)",
        )
        .await
        .unwrap();
    // Its last query carries a value another user must not see in our logs.
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid(), 'secret-42'", &[])
        .await
        .unwrap()
        .get(0);
    (client, pid)
}

fn never(
    _: &rowlock::Transaction,
    _: Account,
) -> rowlock::BoxFuture<'_, Result<(), rowlock::Error>> {
    panic!("the row is held elsewhere")
}

#[tokio::test]
async fn lock_not_available_and_lock_timeout_name_the_holder() {
    let (pg, db) = accounts(2).await;
    let (_holder, pid) = holder(&pg).await;

    // Not asked for: nothing is looked up, the failure costs what success costs.
    let nowait = Lock::no_wait();
    let outcome = db
        .with_locked_row::<Account, _, rowlock::Error, _>(&1, &nowait, never)
        .await
        .unwrap();
    let Outcome::LockNotAvailable(err) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(err.blockers().is_none());

    let nowait = nowait.find_blockers(true);
    let outcome = db
        .with_locked_row::<Account, _, rowlock::Error, _>(&1, &nowait, never)
        .await
        .unwrap();
    let Outcome::LockNotAvailable(err) = outcome else {
        panic!("{outcome:?}")
    };
    let blockers = err.blockers().expect("gathered on this failure path");
    assert_eq!(blockers.len(), 1, "{blockers:?}");
    let b = &blockers[0];
    assert_eq!(b.pid, pid);
    assert_eq!(b.application_name, "billing-batch");
    assert_eq!(b.state.as_deref(), Some("idle in transaction"));
    assert!(b.transaction_age.is_some());
    assert!(b.query_text().unwrap().contains("pg_backend_pid"), "{b:?}");
    let shown = err.to_string();
    assert!(
        shown.contains(&format!("held by pid {pid} (billing-batch)")),
        "{shown}"
    );
    // Another session's SQL is never printed by Display or Debug.
    for printed in [shown, format!("{err:?}"), format!("{b:?}"), b.to_string()] {
        assert!(!printed.contains("secret-42"), "{printed}");
        assert!(!printed.contains("pg_backend_pid"), "{printed}");
    }

    // The same for a lock wait that timed out, through the retry form.
    let timeout = Lock::new()
        .lock_timeout(Duration::from_millis(50))
        .find_blockers(true);
    let outcome = db
        .with_locked_row::<Account, _, rowlock::Error, _>(
            &1,
            timeout.clone().retry(RetryPolicy::new()),
            never,
        )
        .await
        .unwrap();
    let Outcome::LockTimeout(err) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(err.blockers().unwrap()[0].pid, pid);

    // A free row: done, and nothing to report.
    let outcome = db
        .with_locked_row::<Account, _, rowlock::Error, _>(&2, &nowait, |_, a| {
            Box::pin(async move { Ok(a.id) })
        })
        .await
        .unwrap();
    assert_eq!(outcome.done(), Some(2));

    // The connection that ran the diagnosis went back to the db clean.
    let status = db.pool().status();
    assert_eq!(status.size, status.available, "{status:?}");
}

/// Several rows: the lookup selects the same rows as the locking statement (arrays of keys,
/// one per key column), for a key of one column and a composite key.
#[tokio::test]
async fn a_set_of_rows_names_the_holder_of_any_of_them() {
    let (pg, db) = accounts(3).await;
    let (holder, pid) = holder(&pg).await;
    let nowait = Lock::no_wait().find_blockers(true);
    // The pids an outcome names as holders; it must be busy.
    let holders = |outcome: Outcome<()>| -> Vec<i32> {
        let Outcome::LockNotAvailable(err) = outcome else {
            panic!("{outcome:?}")
        };
        err.blockers().unwrap().iter().map(|b| b.pid).collect()
    };
    let outcome = db
        .with_locked_rows(&[3, 1, 2], &nowait, |_, _: Vec<Account>| {
            Box::pin(async { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap();
    assert_eq!(holders(outcome), [pid]);

    pg.client()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE seats (show int, seat text, PRIMARY KEY (show, seat));
             INSERT INTO seats VALUES (1, 'A1'), (1, 'A2'), (2, 'A1');",
        )
        .await
        .unwrap();
    holder
        .batch_execute("SELECT * FROM seats WHERE show = 2 AND seat = 'A1' FOR UPDATE")
        .await
        .unwrap();
    let keys = [
        (1, "A2".to_string()),
        (2, "A1".to_string()),
        (1, "A1".to_string()),
    ];
    let outcome = db
        .with_locked_rows(&keys, &nowait, |_, _: Vec<Seat>| {
            Box::pin(async { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap();
    assert_eq!(holders(outcome), [pid]);
    // The rows nobody holds are free.
    let outcome = db
        .with_locked_rows(&keys[..1], &nowait, |_, seats: Vec<Seat>| {
            Box::pin(async move { Ok::<_, rowlock::Error>(seats.len()) })
        })
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Done(1));
}

#[tokio::test]
async fn advisory_lock_contention_names_the_holder() {
    let (pg, db) = accounts(1).await;
    let (_holder, pid) = holder(&pg).await;
    let nowait = Lock::no_wait().find_blockers(true);
    let outcome = db
        .with_advisory_lock(AdvisoryKey::single(77), &nowait, |_| {
            Box::pin(async { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap();
    let Outcome::LockNotAvailable(err) = outcome else {
        panic!("{outcome:?}")
    };
    let blockers = err.blockers().unwrap();
    assert_eq!(blockers.iter().map(|b| b.pid).collect::<Vec<_>>(), [pid]);

    // A key in the pair space with the same bits is a different lock: nobody holds it.
    let outcome = db
        .with_advisory_lock(AdvisoryKey::pair(0, 77), &nowait, |_| {
            Box::pin(async { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap();
    assert!(outcome.is_done());

    let high = AdvisoryKey::single(-2); // both 32-bit halves non-zero
    let (_holder2, pid2) = session_running(&pg, "BEGIN; SELECT pg_advisory_xact_lock(-2)").await;
    let outcome = db
        .with_advisory_lock(high, &nowait, |_| {
            Box::pin(async { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap();
    let Outcome::LockNotAvailable(err) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(err.blockers().unwrap()[0].pid, pid2);
}

/// The pids a `NoWait` lock on account `id` finds holding it (the outcome must be busy).
async fn holders_of(db: &rowlock::Db, id: i64) -> Vec<i32> {
    let nowait = Lock::no_wait().find_blockers(true);
    let outcome = db
        .with_locked_row::<Account, _, rowlock::Error, _>(&id, &nowait, never)
        .await
        .unwrap();
    let Outcome::LockNotAvailable(err) = outcome else {
        panic!("{outcome:?}")
    };
    let mut pids: Vec<i32> = err.blockers().unwrap().iter().map(|b| b.pid).collect();
    pids.sort_unstable();
    pids
}

/// A session of `pg` that ran `sql`, and its pid.
async fn session_running(pg: &rowlock_testing::TestDatabase, sql: &str) -> (Client, i32) {
    let client = pg.client().await.unwrap();
    client.batch_execute(sql).await.unwrap();
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    (client, pid)
}

/// A row's `xmax` is not always the holder's top-level transaction id: a lock taken inside a
/// savepoint leaves the subtransaction's id, and shared locks of several transactions (a
/// foreign key's inserts take them) leave a MultiXact, which stays in the row after some of
/// them end. Each names its running holders.
#[tokio::test]
async fn holders_behind_a_savepoint_or_a_multixact_are_named() {
    let (pg, db) = accounts(3).await;

    let (_in_savepoint, pid) = session_running(
        &pg,
        "BEGIN; SELECT 1; SAVEPOINT s; SELECT * FROM accounts WHERE id = 1 FOR UPDATE",
    )
    .await;
    assert_eq!(holders_of(&db, 1).await, [pid]);

    let share = "BEGIN; SELECT * FROM accounts WHERE id = 2 FOR KEY SHARE";
    let (first, pid1) = session_running(&pg, share).await;
    let (second, pid2) = session_running(&pg, share).await;
    let mut both = vec![pid1, pid2];
    both.sort_unstable();
    assert_eq!(holders_of(&db, 2).await, both);
    // One of them ends; the MultiXact stays in the row, with one member running.
    second.batch_execute("COMMIT").await.unwrap();
    assert_eq!(holders_of(&db, 2).await, [pid1]);
    first.batch_execute("COMMIT").await.unwrap();
    let free = db
        .with_locked_row(&2, Lock::no_wait(), |_, a: Account| {
            Box::pin(async move { Ok::<_, rowlock::Error>(a.id) })
        })
        .await
        .unwrap();
    assert_eq!(free.done(), Some(2));

    // A row locked by a transaction that updated it: the updater.
    let (_updater, pid) = session_running(
        &pg,
        "BEGIN; UPDATE accounts SET balance = balance + 1 WHERE id = 3",
    )
    .await;
    assert_eq!(holders_of(&db, 3).await, [pid]);
}

/// A caller without `pg_read_all_stats` still learns who holds the row when the holder is
/// another role: its pid and application name (`pg_locks` is open to every role); its state,
/// age and query are hidden by the server.
#[tokio::test]
async fn a_holder_of_another_role_is_named_without_extra_privileges() {
    let (pg, _) = accounts(1).await;
    let admin = pg.client().await.unwrap();
    let may_create_roles: bool = admin
        .query_one(
            "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if !may_create_roles {
        eprintln!("skipped: the test role may not create roles");
        return;
    }
    let role = format!("{}_reader", pg.name());
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN; GRANT ALL ON accounts TO \"{role}\""
        ))
        .await
        .unwrap();
    let mut config = pg.config().clone();
    config.user(&role);
    let db = rowlock::Db::builder()
        .config(config)
        .max_size(2)
        .build()
        .unwrap();
    let (holder, pid) = holder(&pg).await;

    let nowait = Lock::no_wait().find_blockers(true);
    let outcome = db
        .with_locked_row::<Account, _, rowlock::Error, _>(&1, &nowait, never)
        .await
        .unwrap();
    let Outcome::LockNotAvailable(err) = outcome else {
        panic!("{outcome:?}")
    };
    let blockers = err.blockers().unwrap();
    assert_eq!(blockers.len(), 1, "{blockers:?}");
    let b = &blockers[0];
    assert_eq!((b.pid, b.application_name.as_str()), (pid, "billing-batch"));
    assert_eq!((b.state.as_deref(), b.transaction_age), (None, None));
    assert_eq!(b.query_text(), Some("<insufficient privilege>"));

    drop(holder);
    drop(db);
    admin
        .batch_execute(&format!(
            "REVOKE ALL ON accounts FROM \"{role}\"; DROP ROLE \"{role}\""
        ))
        .await
        .unwrap();
}

/// A lock set names the holders of the rows of the table whose lock failed, whichever table
/// of the set that is.
#[tokio::test]
async fn a_lock_set_names_the_holder_of_the_table_that_failed() {
    let (pg, db) = accounts(3).await;
    pg.client()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE seats (show int, seat text, PRIMARY KEY (show, seat));
             INSERT INTO seats VALUES (1, 'A1'), (2, 'A1');",
        )
        .await
        .unwrap();
    let (_accounts_holder, accounts_pid) = holder(&pg).await; // account 1
    let (_seats_holder, seats_pid) = session_running(
        &pg,
        "BEGIN; SELECT * FROM seats WHERE show = 2 AND seat = 'A1' FOR UPDATE",
    )
    .await;
    let nowait = Lock::no_wait().find_blockers(true);
    let holders = async |set: rowlock::LockSet| -> (Vec<rowlock::RowRef>, Vec<i32>) {
        let outcome = db
            .with_locked_set(&set, &nowait, |_, _| {
                Box::pin(async { Ok::<_, rowlock::Error>(()) })
            })
            .await
            .unwrap();
        let Outcome::LockNotAvailable(err) = outcome else {
            panic!("{outcome:?}")
        };
        let pids = err.blockers().unwrap().iter().map(|b| b.pid).collect();
        (err.rows().to_vec(), pids)
    };
    // accounts are locked first: the set fails there.
    let set = rowlock::LockSet::new()
        .row::<Seat>(&(1, "A1".to_string()))
        .unwrap()
        .rows::<Account>(&[2, 1])
        .unwrap();
    let (rows, pids) = holders(set).await;
    assert!(rows.iter().any(|r| r.is::<Account>(&1)), "{rows:?}");
    assert_eq!(pids, [accounts_pid]);
    // accounts free, seats held: the set fails at seats, and names their holder.
    let set = rowlock::LockSet::new()
        .row::<Seat>(&(2, "A1".to_string()))
        .unwrap()
        .row::<Account>(&2)
        .unwrap();
    let (rows, pids) = holders(set).await;
    assert_eq!(rows, [rowlock::RowRef::of::<Seat>(&(2, "A1".to_string()))]);
    assert_eq!(pids, [seats_pid]);
}
