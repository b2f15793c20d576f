//! Real faults against a real server: a lock holder's backend terminated, an immediate
//! server restart under load, an exhausted db, idle-in-transaction and statement timeouts
//! inside the closure, and a soak with random cancellation. Each test asserts what the caller
//! sees and what the database holds afterwards.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rowlock::assignment::{AssignmentError, accept_proposal, migrate, withdraw_proposal};
use rowlock::deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use rowlock::tokio_postgres::error::SqlState;
use rowlock::tokio_postgres::{Client, Config, NoTls, Row};
use rowlock::{
    Claim, Compare, Db, Direction, ErrorKind, Lock, LockMode, LockableRow, Outcome, Table,
    TransactionOptions,
};
use rowlock_testing::{StopMode, TestCluster, wait_for_blocked_by};
use tokio::sync::oneshot;

use crate::assignment::violations;
use crate::support::{Account, WAIT, accounts, backend_pid, balance, in_transaction};

/// Polls `condition` every 10 ms until it holds; panics with `what` after `limit`.
pub(crate) async fn until<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn backend_exists(observer: &Client, pid: i32) -> bool {
    observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 1
}

/// `calls` concurrent `with_locked_row` calls, each adding 1 to one of accounts `1..=rows`;
/// all must be `Done`.
async fn increment_concurrently(db: &Db, calls: i64, rows: i64) {
    let options = Lock::new();
    let keys: Vec<i64> = (0..calls).map(|i| 1 + i % rows).collect();
    let calls = keys.iter().map(|key| {
        db.with_locked_row::<Account, _, rowlock::Error, _>(key, &options, |tx, acc| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                    &[&acc.id],
                )
                .await?;
                Ok(())
            })
        })
    });
    for result in futures_util::future::join_all(calls).await {
        assert!(result.unwrap().is_done());
    }
}

fn pool_with_wait_timeout(config: &Config, max_size: usize, wait: Duration) -> Db {
    let manager = Manager::from_config(
        config.clone(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Db::from_pool(
        Pool::builder(manager)
            .max_size(max_size)
            .wait_timeout(Some(wait))
            .runtime(Runtime::Tokio1)
            .build()
            .unwrap(),
    )
}

/// A small xorshift generator: reproducible randomness without a dependency.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test]
async fn holder_terminated_while_a_waiter_is_blocked() {
    let (pg, db) = accounts(2).await;
    let observer = pg.client().await.unwrap();
    let (pid_tx, pid_rx) = oneshot::channel::<i32>();
    let mut pid_tx = Some(pid_tx);
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let mut go_rx = Some(go_rx);
    let holder = tokio::spawn({
        let db = db.clone();
        async move {
            db.with_locked_row::<Account, _, rowlock::Error, _>(&1, &Lock::new(), move |tx, acc| {
                let pid_tx = pid_tx.take().expect("the closure runs once");
                let go_rx = go_rx.take().expect("the closure runs once");
                Box::pin(async move {
                    tx.execute("UPDATE accounts SET balance = 0 WHERE id = $1", &[&acc.id])
                        .await?;
                    let pid: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
                    pid_tx.send(pid).unwrap();
                    let _ = go_rx.await;
                    // The backend is gone by now: this statement fails.
                    tx.query_one("SELECT 1", &[]).await?;
                    Ok(())
                })
            })
            .await
        }
    });
    let holder_pid = tokio::time::timeout(WAIT, pid_rx).await.unwrap().unwrap();
    let waiter = tokio::spawn({
        let db = db.clone();
        async move {
            db.with_locked_row::<Account, _, rowlock::Error, _>(&1, &Lock::new(), |_, acc| {
                Box::pin(async move { Ok(acc.balance) })
            })
            .await
        }
    });
    wait_for_blocked_by(&observer, holder_pid, 1, WAIT)
        .await
        .unwrap();

    let cluster = TestCluster::shared().unwrap();
    assert!(cluster.terminate_backend(holder_pid).await.unwrap());

    // The waiter proceeds as soon as the holder's backend is gone, and sees the row as it
    // was: the holder's uncommitted write died with it.
    let seen = tokio::time::timeout(WAIT, waiter)
        .await
        .expect("the waiter proceeds once the holder's backend is gone")
        .unwrap()
        .unwrap();
    assert_eq!(seen.done(), Some(100));

    go_tx.send(()).unwrap();
    let err = holder
        .await
        .unwrap()
        .expect_err("the holder's connection is gone");
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    assert_eq!(
        balance(&observer, 1).await,
        100,
        "nothing the holder wrote is visible"
    );

    // The db serves new calls on all its connections at once.
    increment_concurrently(&db, 8, 2).await;
    assert_eq!(balance(&observer, 1).await, 104);
    assert_eq!(in_transaction(&observer).await, 0);
}

#[tokio::test]
async fn immediate_restart_under_load_recovers_and_keeps_the_invariant() {
    // Its own cluster: the restart must not disturb other tests.
    let cluster = Arc::new(
        tokio::task::spawn_blocking(TestCluster::start)
            .await
            .unwrap()
            .unwrap(),
    );
    let pg = cluster.create_database_owned().await.unwrap();
    // Test clusters trade durability for speed (synchronous_commit = off): a crash may then
    // lose acknowledged commits. This test checks that no acknowledged commit is lost, so it
    // runs with PostgreSQL's default durability.
    pg.client()
        .await
        .unwrap()
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET synchronous_commit = on",
            pg.name()
        ))
        .await
        .unwrap();
    let db = pg.db(16);
    migrate(&db).await.unwrap();
    let (projects, per) = (3_000_i64, 3_i64);
    pg.client()
        .await
        .unwrap()
        .batch_execute(&format!(
            "INSERT INTO projects (title) SELECT 'p' || g FROM generate_series(1, {projects}) g;
             INSERT INTO proposals (project_id, freelancer)
               SELECT p, 'f' || f FROM generate_series(1, {projects}) p,
                                      generate_series(1, {per}) f ORDER BY p, f;"
        ))
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let oks = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let accepted_ok = Arc::new(Mutex::new(Vec::<i64>::new()));
    let kinds = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let tasks: Vec<_> = (0..32_u64)
        .map(|t| {
            let (db, stop, oks, failures) =
                (db.clone(), stop.clone(), oks.clone(), failures.clone());
            let (accepted_ok, kinds) = (accepted_ok.clone(), kinds.clone());
            tokio::spawn(async move {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t + 1).wrapping_mul(0x2545_F491));
                while !stop.load(Ordering::Relaxed) {
                    let proposal = 1 + rng.below((projects * per) as u64) as i64;
                    let mode = if rng.below(2) == 0 {
                        LockMode::Wait
                    } else {
                        LockMode::NoWait
                    };
                    match accept_proposal(&db, proposal, mode).await {
                        Ok(()) => {
                            accepted_ok.lock().unwrap().push(proposal);
                            oks.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(AssignmentError::Db(e)) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            *kinds
                                .lock()
                                .unwrap()
                                .entry(format!("{:?}", e.kind()))
                                .or_default() += 1;
                            // Pace the retries of a caller facing a down server.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(_) => {} // already assigned, busy, not pending: business as usual
                    }
                }
            })
        })
        .collect();

    until(WAIT, "accepts succeed before the restart", || async {
        oks.load(Ordering::Relaxed) >= 100
    })
    .await;
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop(StopMode::Immediate))
        .await
        .unwrap()
        .unwrap();
    let failed_before = failures.load(Ordering::Relaxed);
    until(WAIT, "calls fail while the server is down", || async {
        failures.load(Ordering::Relaxed) >= failed_before + 64
    })
    .await;
    let ok_while_down = oks.load(Ordering::Relaxed);
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.start_again())
        .await
        .unwrap()
        .unwrap();
    let back = Instant::now();
    until(
        Duration::from_secs(10),
        "the pool recovers once the server is back",
        || async { oks.load(Ordering::Relaxed) >= ok_while_down + 50 },
    )
    .await;
    let recovery = back.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    eprintln!(
        "restart under load: recovered {recovery:?} after the server was back; errors by kind: {:?}",
        kinds.lock().unwrap()
    );

    // Failures were connection-class errors, never a false success or something unexplained.
    for kind in kinds.lock().unwrap().keys() {
        assert!(
            ["Closed", "Unreachable", "CommitOutcomeUnknown"].contains(&kind.as_str()),
            "unexpected error kind during the outage: {kind}"
        );
    }
    let client = pg.client().await.unwrap();
    let row = client
        .query_one(
            "SELECT
               (SELECT count(*) FROM projects p WHERE p.status = 'assigned' AND
                  (SELECT count(*) FROM proposals WHERE project_id = p.id AND status = 'accepted') <> 1),
               (SELECT count(*) FROM projects p WHERE p.status = 'open' AND
                  EXISTS (SELECT 1 FROM proposals WHERE project_id = p.id AND status = 'accepted'))",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (0, 0),
        "invariant"
    );
    // Every accept reported as done is committed.
    let reported: Vec<i64> = accepted_ok.lock().unwrap().clone();
    let committed: i64 = client
        .query_one(
            "SELECT count(*) FROM proposals WHERE id = ANY($1) AND status = 'accepted'",
            &[&reported],
        )
        .await
        .unwrap()
        .get(0);
    let distinct: BTreeSet<i64> = reported.iter().copied().collect();
    assert_eq!(distinct.len(), reported.len(), "no proposal accepted twice");
    assert_eq!(
        committed as usize,
        reported.len(),
        "every reported accept committed"
    );
    assert_eq!(in_transaction(&client).await, 0);
}

#[tokio::test]
async fn an_exhausted_pool_times_out_then_everyone_completes() {
    let (pg, _) = accounts(3).await;
    let observer = pg.client().await.unwrap();
    let db = pool_with_wait_timeout(pg.config(), 2, Duration::from_secs(1));

    // Two holders take both connections and keep their locks.
    let mut releases = Vec::new();
    let mut holders = Vec::new();
    for id in [1_i64, 2] {
        let (held_tx, held_rx) = oneshot::channel::<()>();
        let mut held_tx = Some(held_tx);
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let mut release_rx = Some(release_rx);
        let db = db.clone();
        holders.push(tokio::spawn(async move {
            db.with_locked_row::<Account, _, rowlock::Error, _>(
                &id,
                &Lock::new(),
                move |tx, acc| {
                    let held_tx = held_tx.take().expect("the closure runs once");
                    let release_rx = release_rx.take().expect("the closure runs once");
                    Box::pin(async move {
                        tx.execute(
                            "UPDATE accounts SET balance = balance - 1 WHERE id = $1",
                            &[&acc.id],
                        )
                        .await?;
                        held_tx.send(()).unwrap();
                        let _ = release_rx.await;
                        Ok(())
                    })
                },
            )
            .await
        }));
        tokio::time::timeout(WAIT, held_rx).await.unwrap().unwrap();
        releases.push(release_tx);
    }

    // A third caller cannot get a connection: a db timeout, and its closure never runs.
    let err = db
        .with_locked_row::<Account, (), rowlock::Error, _>(&3, &Lock::new(), |_, _| {
            panic!("no connection, so no closure")
        })
        .await
        .expect_err("the pool is exhausted");
    assert_eq!(err.kind(), ErrorKind::PoolTimeout, "{err}");
    assert_eq!(balance(&observer, 3).await, 100);

    // A caller waiting for a connection gets one as soon as a holder finishes, and then
    // waits for nothing: the holder's row lock went with its commit.
    let waiting = tokio::spawn({
        let db = db.clone();
        async move {
            db.with_locked_row::<Account, _, rowlock::Error, _>(&1, &Lock::new(), |_, acc| {
                Box::pin(async move { Ok(acc.balance) })
            })
            .await
        }
    });
    until(WAIT, "the caller waits for a connection", || async {
        db.pool().status().waiting == 1
    })
    .await;
    releases.remove(0).send(()).unwrap();
    assert_eq!(waiting.await.unwrap().unwrap().done(), Some(99));
    assert!(holders.remove(0).await.unwrap().unwrap().is_done());

    // The second holder finishes; then 32 callers share the two connections and all complete.
    releases.remove(0).send(()).unwrap();
    assert!(holders.remove(0).await.unwrap().unwrap().is_done());
    increment_concurrently(&db, 32, 3).await;
    let total: i64 = observer
        .query_one("SELECT sum(balance)::int8 FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 300 - 2 + 32);
    assert!(db.pool().status().size <= 2);
}

#[tokio::test]
async fn idle_in_transaction_timeout_fires_in_a_slow_closure() {
    let (pg, _) = accounts(1).await;
    let db = pg.db(1);
    let observer = Arc::new(pg.client().await.unwrap());
    let limit = Duration::from_millis(200);
    let options =
        Lock::new().transaction(TransactionOptions::new().idle_in_transaction_timeout(limit));
    let err = db
        .with_locked_row::<Account, (), rowlock::Error, _>(&1, &options, {
            let observer = observer.clone();
            move |tx, acc| {
                let observer = observer.clone();
                Box::pin(async move {
                    tx.execute("UPDATE accounts SET balance = 0 WHERE id = $1", &[&acc.id])
                        .await?;
                    let pid: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
                    // The closure is slow (it awaits something else) until the server gives up.
                    until(WAIT, "the server ends the idle session", || async {
                        !backend_exists(&observer, pid).await
                    })
                    .await;
                    tx.execute("UPDATE accounts SET balance = 1 WHERE id = $1", &[&acc.id])
                        .await?;
                    Ok(())
                })
            }
        })
        .await
        .expect_err("the session was ended");
    assert_eq!(err.kind(), ErrorKind::IdleInTransactionTimeout, "{err}");
    // The server's words, and the limit the transaction set.
    assert!(
        err.to_string()
            .contains("idle-in-transaction timeout (idle_in_transaction_session_timeout 200ms)"),
        "{err}"
    );
    assert_eq!(balance(&observer, 1).await, 100, "nothing committed");
    assert_eq!(
        db.pool().status().size,
        0,
        "the dead connection was not returned"
    );

    // The same db serves the next call on a fresh connection.
    let outcome = db
        .with_locked_row::<Account, _, rowlock::Error, _>(&1, &Lock::new(), |_, acc| {
            Box::pin(async move { Ok(acc.balance) })
        })
        .await
        .unwrap();
    assert_eq!(outcome.done(), Some(100));
}

/// What a closure does after its session was ended.
#[derive(Clone, Copy)]
enum After {
    Statement,
    Nothing,
    Swallowed,
}

/// Queues the write that would zero account `id`'s balance at commit, and returns the
/// transaction's backend pid. Every statement is prepared and kept: the first use of SQL text
/// is prepared and closed after, and a close still waiting for its answer when the server ends
/// the session would be handed the server's last message (the driver routes it to the oldest
/// request waiting for an answer).
async fn zero_on_commit(tx: &rowlock::Transaction, id: i64) -> Result<i32, rowlock::Error> {
    let update = tx
        .prepare_cached("UPDATE accounts SET balance = 0 WHERE id = $1")
        .await?;
    tx.execute_on_commit(&update, &[&id]).await?;
    let pid = tx.prepare_cached("SELECT pg_backend_pid()").await?;
    Ok(tx.query_one(&pid, &[]).await?.get(0))
}

/// How a session ended by the server reaches the caller: in the server's words and with its
/// SQLSTATE, whether the next statement or the `COMMIT` finds it gone. The server says why
/// while no request waits for an answer, so the driver's own error is only "connection
/// closed". Ended three ways: an `idle_in_transaction_session_timeout` set on the server side
/// (not through rowlock's option), `pg_terminate_backend` before another statement, and the
/// same before the commit.
#[tokio::test]
async fn a_session_the_server_ended_is_reported_in_its_words() {
    let (pg, _) = accounts(1).await;
    let observer = Arc::new(pg.client().await.unwrap());
    // The harness's pool (built with `Connector`), and one the handle's builder made.
    let built = pg.db_with(Db::builder().max_size(1)).unwrap();
    // (how the session ends, what the closure does after: a statement whose error it
    // returns, none, or a statement whose error it swallows)
    for (db, end, after) in [
        (pg.db(1), "idle", After::Statement),
        (pg.db(1), "terminate", After::Statement),
        (pg.db(1), "terminate", After::Nothing),
        (pg.db(1), "terminate", After::Swallowed),
        (built.clone(), "idle", After::Statement),
        (built, "terminate", After::Nothing),
    ] {
        let err = db
            .with_locked_row::<Account, (), rowlock::Error, _>(&1, &Lock::new(), {
                let observer = observer.clone();
                move |tx, acc| {
                    let observer = observer.clone();
                    Box::pin(async move {
                        let pid = zero_on_commit(tx, acc.id).await?;
                        if end == "idle" {
                            tx.batch_execute(
                                "SET LOCAL idle_in_transaction_session_timeout = '100ms'",
                            )
                            .await?;
                        } else {
                            observer
                                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                                .await
                                .unwrap();
                        }
                        until(WAIT, "the server ends the session", || async {
                            !backend_exists(&observer, pid).await
                        })
                        .await;
                        match after {
                            After::Statement => drop(tx.execute("SELECT 1", &[]).await?),
                            After::Swallowed => drop(tx.execute("SELECT 1", &[]).await),
                            After::Nothing => {}
                        }
                        Ok(())
                    })
                }
            })
            .await
            .expect_err("the session was ended");
        let shown = err.to_string();
        let (kind, state, words) = match end {
            "idle" => (
                ErrorKind::IdleInTransactionTimeout,
                SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                "terminating connection due to idle-in-transaction timeout",
            ),
            _ => (
                ErrorKind::Closed,
                SqlState::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
            ),
        };
        assert_eq!(err.kind(), kind, "{shown}");
        assert_eq!(err.sql_state(), Some(&state), "{shown}");
        // (Behind PgBouncer the server's error may instead come as the answer to the next
        // request, which the driver reports as it is: the same kind, words and SQLSTATE.)
        assert!(shown.contains(words), "{shown}");
        let step = match after {
            After::Statement => "while running a statement",
            After::Nothing | After::Swallowed => "while committing",
        };
        assert!(shown.contains(step), "{shown}");
        assert_eq!(err.as_db_error().map(|e| e.code()), Some(&state));
        assert_eq!(err.is_retryable(), kind == ErrorKind::Closed, "{shown}");
        assert_eq!(balance(&observer, 1).await, 100, "nothing committed");
    }
}

/// The server ends the session while a statement runs: its last message is that statement's
/// answer, and the connection's task sees only the end of the stream. A closure that swallows
/// the statement's error and returns `Ok` is told at commit, in the server's words, whichever
/// of the two learns of the end first.
#[tokio::test]
async fn a_session_the_server_ended_during_a_swallowed_statement_is_reported_at_commit() {
    let (pg, _) = accounts(1).await;
    let observer = Arc::new(pg.client().await.unwrap());
    let db = pg.db(1);
    for _ in 0..5 {
        let err = db
            .with_locked_row::<Account, (), rowlock::Error, _>(&1, &Lock::new(), {
                let observer = observer.clone();
                move |tx, acc| {
                    let observer = observer.clone();
                    Box::pin(async move {
                        let pid = zero_on_commit(tx, acc.id).await?;
                        let terminate = tokio::spawn(async move {
                            until(WAIT, "the statement sleeps on the server", || async {
                                observer
                                    .query_opt(
                                        "SELECT 1 FROM pg_stat_activity \
                                         WHERE pid = $1 AND wait_event = 'PgSleep'",
                                        &[&pid],
                                    )
                                    .await
                                    .unwrap()
                                    .is_some()
                            })
                            .await;
                            observer
                                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                                .await
                                .unwrap();
                        });
                        let slept = tx.batch_execute("SELECT pg_sleep(30)").await;
                        terminate.await.unwrap();
                        let slept = slept.expect_err("the session was ended");
                        assert_eq!(
                            slept.sql_state(),
                            Some(&SqlState::ADMIN_SHUTDOWN),
                            "{slept}"
                        );
                        Ok(())
                    })
                }
            })
            .await
            .expect_err("the session was ended");
        let shown = err.to_string();
        assert_eq!(err.kind(), ErrorKind::Closed, "{shown}");
        assert_eq!(err.sql_state(), Some(&SqlState::ADMIN_SHUTDOWN), "{shown}");
        assert!(
            shown.contains("terminating connection due to administrator command"),
            "{shown}"
        );
        assert!(shown.contains("while committing"), "{shown}");
        assert_eq!(balance(&observer, 1).await, 100, "nothing committed");
    }
}

#[tokio::test]
async fn statement_timeout_in_the_closure_is_its_own_kind_and_rolls_back() {
    let (pg, _) = accounts(1).await;
    let db = pg.db(1);
    let observer = pg.client().await.unwrap();
    let options = Lock::new()
        .transaction(TransactionOptions::new().statement_timeout(Duration::from_millis(100)));
    let err = db
        .with_locked_row::<Account, (), rowlock::Error, _>(&1, &options, |tx, acc| {
            Box::pin(async move {
                tx.execute("UPDATE accounts SET balance = 0 WHERE id = $1", &[&acc.id])
                    .await?;
                tx.execute("SELECT pg_sleep(30)", &[]).await?;
                Ok(())
            })
        })
        .await
        .expect_err("the statement timed out");
    assert_eq!(err.kind(), ErrorKind::StatementTimeout, "{err}");
    assert_eq!(err.sql_state(), Some(&SqlState::QUERY_CANCELED));
    assert_eq!(balance(&observer, 1).await, 100, "rolled back");
    assert_eq!(in_transaction(&observer).await, 0);
    let pid_before: i32 = backend_pid(&db).await;
    assert!(
        backend_exists(&observer, pid_before).await,
        "the connection was kept: it is clean"
    );
}

#[derive(Debug)]
struct Job {
    id: i64,
}

impl LockableRow for Job {
    type Key = i64;
    const TABLE: Table = Table::new("jobs");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    fn from_row(row: &Row) -> Result<Self, rowlock::tokio_postgres::Error> {
        Ok(Job {
            id: row.try_get("id")?,
        })
    }
    fn key(&self) -> i64 {
        self.id
    }
}

/// What a soak call reported, to compare with what the database holds.
#[derive(Default)]
struct Reported {
    accepted: BTreeSet<i64>,
    withdrawn: BTreeSet<i64>,
    jobs_done: Vec<i64>,
}

#[tokio::test]
async fn soak_mixed_traffic_with_random_cancellation_keeps_every_invariant() {
    let secs: u64 = std::env::var("ROWLOCK_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let pg = TestCluster::shared()
        .unwrap()
        .create_database()
        .await
        .unwrap();
    let db = pg.db(16);
    migrate(&db).await.unwrap();
    let (projects, per, jobs) = (2_000_i64, 4_i64, 200_000_i64);
    let client = pg.client().await.unwrap();
    client
        .batch_execute(&format!(
            "INSERT INTO projects (title) SELECT 'p' || g FROM generate_series(1, {projects}) g;
             INSERT INTO proposals (project_id, freelancer)
               SELECT p, 'f' || f FROM generate_series(1, {projects}) p,
                                      generate_series(1, {per}) f ORDER BY p, f;
             CREATE TABLE jobs (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending',
                                done_count int NOT NULL DEFAULT 0);
             CREATE INDEX jobs_pending ON jobs (id) WHERE status = 'pending';
             INSERT INTO jobs (id) SELECT g FROM generate_series(1, {jobs}) g;
             ANALYZE;"
        ))
        .await
        .unwrap();

    let claim = Arc::new(
        Claim::new()
            .filter("status", Compare::Eq, "pending")
            .order_by("id", Direction::Asc),
    );
    let reported = Arc::new(Mutex::new(Reported::default()));
    let counts = Arc::new(Mutex::new(BTreeMap::<&'static str, u64>::new()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..32_u64)
        .map(|t| {
            let (db, claim, reported, counts) =
                (db.clone(), claim.clone(), reported.clone(), counts.clone());
            tokio::spawn(async move {
                let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ (t + 1).wrapping_mul(0x9E37_79B9));
                while Instant::now() < deadline {
                    let count = |what: &'static str| {
                        *counts.lock().unwrap().entry(what).or_default() += 1;
                    };
                    // A quarter of the calls are cancelled at a random point (0–20 ms).
                    let cancel_after =
                        (rng.below(4) == 0).then(|| Duration::from_micros(rng.below(20_000)));
                    let proposal = 1 + rng.below((projects * per) as u64) as i64;
                    let timeout = Duration::from_millis(1 + rng.below(50));
                    let opts = match rng.below(3) {
                        0 => Lock::new().mode(LockMode::Wait),
                        1 => Lock::new().mode(LockMode::Wait).lock_timeout(timeout),
                        _ => Lock::no_wait(),
                    };
                    let n = 1 + rng.below(10) as usize;
                    let which = rng.below(3);
                    let call = {
                        let (db, claim, reported) = (&db, &claim, &reported);
                        async move {
                            match which {
                                0 => {
                                    let r = accept_proposal(db, proposal, &opts).await;
                                    if r.is_ok() {
                                        reported.lock().unwrap().accepted.insert(proposal);
                                    }
                                    r.is_ok()
                                }
                                1 => {
                                    let r = withdraw_proposal(db, proposal).await;
                                    if r.is_ok() {
                                        reported.lock().unwrap().withdrawn.insert(proposal);
                                    }
                                    r.is_ok()
                                }
                                _ => {
                                    let r = db
                                        .claim(claim, n, |tx, jobs: Vec<Job>| {
                                            Box::pin(async move {
                                                let ids: Vec<i64> =
                                                    jobs.iter().map(|j| j.id).collect();
                                                tx.execute(
                                                    "UPDATE jobs SET status = 'done',
                                                        done_count = done_count + 1
                                                 WHERE id = ANY($1)",
                                                    &[&ids],
                                                )
                                                .await?;
                                                Ok::<_, rowlock::Error>(ids)
                                            })
                                        })
                                        .await;
                                    match r {
                                        Ok(Outcome::Done(ids)) => {
                                            reported.lock().unwrap().jobs_done.extend(ids);
                                            true
                                        }
                                        _ => false,
                                    }
                                }
                            }
                        }
                    };
                    match cancel_after {
                        Some(after) => match tokio::time::timeout(after, call).await {
                            Ok(true) => count("ok"),
                            Ok(false) => count("refused"),
                            Err(_) => count("cancelled"),
                        },
                        None => {
                            if call.await {
                                count("ok")
                            } else {
                                count("refused")
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    eprintln!("soak {secs} s: {:?}", counts.lock().unwrap());
    let counts = counts.lock().unwrap().clone();
    assert!(counts.get("ok").copied().unwrap_or(0) > 100, "{counts:?}");
    assert!(
        counts.get("cancelled").copied().unwrap_or(0) > 10,
        "{counts:?}"
    );

    // Cancelled calls clean up in spawned tasks: wait until none is left in a transaction.
    until(WAIT, "no session idle in transaction", || async {
        in_transaction(&client).await == 0
    })
    .await;

    let jobs_row = client
        .query_one(
            "SELECT (SELECT count(*) FROM jobs WHERE done_count > 1),
                    (SELECT count(*) FROM jobs WHERE (status = 'done') <> (done_count = 1))",
            &[],
        )
        .await
        .unwrap();
    let (assigned, open) = violations(&client).await;
    let violations: (i64, i64, i64, i64) = (assigned, open, jobs_row.get(0), jobs_row.get(1));
    assert_eq!(
        violations,
        (0, 0, 0, 0),
        "assignment and exactly-once invariants"
    );

    // Every success a caller saw is in the database.
    let reported = std::mem::take(&mut *reported.lock().unwrap());
    let accepted: Vec<i64> = reported.accepted.iter().copied().collect();
    let withdrawn: Vec<i64> = reported.withdrawn.iter().copied().collect();
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM proposals WHERE id = ANY($1) AND status = 'accepted'),
                    (SELECT count(*) FROM proposals WHERE id = ANY($2) AND status = 'withdrawn')",
            &[&accepted, &withdrawn],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0) as usize, accepted.len());
    assert_eq!(row.get::<_, i64>(1) as usize, withdrawn.len());
    let done: BTreeSet<i64> = reported.jobs_done.iter().copied().collect();
    assert_eq!(
        done.len(),
        reported.jobs_done.len(),
        "no job reported done twice"
    );
    let committed: i64 = client
        .query_one(
            "SELECT count(*) FROM jobs WHERE id = ANY($1) AND status = 'done'",
            &[&reported.jobs_done],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(committed as usize, done.len(), "every reported job is done");
}
