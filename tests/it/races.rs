//! The seed's races as interleaving scripts (rowlock-testing), every permutation each, with
//! expected files under `tests/races/` (`ROWLOCK_TESTING_BLESS=1` rewrites them): the unsafe
//! versions show their anomaly in the permutations where it exists, rowlock's in none.

use std::path::PathBuf;

use rowlock::{Claim, Direction, Lock, LockSet, LockStrength, LockableRow, Outcome, Transaction};
use rowlock::{TransactionOptions, Transition};
use rowlock_testing::interleave::{Report, Script, SessionSpec, StepError};

fn expected(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/races")
        .join(format!("{name}.out"))
}

fn show<T>(outcome: &Outcome<T>) -> String {
    match outcome {
        Outcome::Done(_) => "done".into(),
        other => other
            .to_string()
            .split(':')
            .next()
            .unwrap_or_default()
            .into(),
    }
}

// ---- Two managers accept two proposals of one project -------------------------------------

const PROJECTS: &str = "
    CREATE TABLE projects (id bigint PRIMARY KEY, status text NOT NULL);
    CREATE TABLE proposals (id bigint PRIMARY KEY, project_id bigint NOT NULL, status text NOT NULL);
    INSERT INTO projects VALUES (1, 'open');
    INSERT INTO proposals VALUES (1, 1, 'pending'), (2, 1, 'pending');";

#[derive(Debug, LockableRow)]
#[rowlock(table = "projects", key = "id")]
struct Project {
    id: i64,
    status: String,
}

/// The flawed read-check-write: read the project, decide, write; nothing locked.
fn flawed_manager(s: SessionSpec, name: &str, proposal: i64) -> SessionSpec {
    s.step(format!("{name}_check"), |s| {
        Box::pin(async move {
            s.client().batch_execute("BEGIN").await?;
            let status: String = s
                .client()
                .query_one("SELECT status FROM projects WHERE id = 1", &[])
                .await?
                .get(0);
            let result = status.clone();
            s.keep(status);
            Ok(result)
        })
    })
    .step(format!("{name}_accept"), move |s| {
        Box::pin(async move {
            let status: String = s.take()?;
            if status != "open" {
                s.client().batch_execute("COMMIT").await?;
                return Ok("already assigned".into());
            }
            s.client()
                .execute(
                    "UPDATE proposals SET status = 'accepted' WHERE id = $1",
                    &[&proposal],
                )
                .await?;
            s.client()
                .batch_execute("UPDATE projects SET status = 'assigned' WHERE id = 1; COMMIT")
                .await?;
            Ok("accepted".into())
        })
    })
}

/// The same decision with the project locked by rowlock from the read to the commit.
fn locking_manager(s: SessionSpec, name: &str, proposal: i64) -> SessionSpec {
    s.step(format!("{name}_lock"), |s| {
        Box::pin(async move {
            let tx = s.db().begin(TransactionOptions::new()).await?;
            let outcome = tx
                .lock_row::<Project>(&1, Lock::new().strength(LockStrength::NoKeyUpdate))
                .await?;
            let Outcome::Done(project) = outcome else {
                return Ok(show(&outcome));
            };
            let status = project.status.clone();
            s.keep((tx, project));
            Ok(status)
        })
    })
    .step(format!("{name}_accept"), move |s| {
        Box::pin(async move {
            let (tx, project): (Transaction, Project) = s.take()?;
            if project.status != "open" {
                tx.commit().await?;
                return Ok("already assigned".into());
            }
            tx.execute(
                "UPDATE proposals SET status = 'accepted' WHERE id = $1",
                &[&proposal],
            )
            .await?;
            tx.execute(
                "UPDATE projects SET status = 'assigned' WHERE id = $1",
                &[&project.id],
            )
            .await?;
            tx.commit().await?;
            Ok("accepted".into())
        })
    })
}

fn accepted(report: &Report) -> Vec<usize> {
    report
        .records()
        .iter()
        .map(|r| r.query("accepted").unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn two_managers_without_a_lock_both_accept_in_some_permutations() {
    let report = Script::new("two managers accept, read-check-write without a lock")
        .setup(PROJECTS)
        .session("a", |s| flawed_manager(s, "a", 1))
        .session("b", |s| flawed_manager(s, "b", 2))
        .query(
            "accepted",
            "SELECT count(*) FROM proposals WHERE status = 'accepted'",
        )
        .run()
        .await
        .unwrap();
    eprintln!("{}", report.timings());
    report.assert_matches_file(expected("accept_unsafe"));
    let counts = accepted(&report);
    assert!(counts.contains(&2), "the double accept shows: {counts:?}");
    assert!(
        counts.contains(&1),
        "and the serial orders do not: {counts:?}"
    );
}

#[tokio::test]
async fn two_managers_with_rowlock_accept_exactly_one_in_every_permutation() {
    let report = Script::new("two managers accept, the project locked by rowlock")
        .setup(PROJECTS)
        .session("a", |s| locking_manager(s, "a", 1))
        .session("b", |s| locking_manager(s, "b", 2))
        .query(
            "accepted",
            "SELECT count(*) FROM proposals WHERE status = 'accepted'",
        )
        .run()
        .await
        .unwrap();
    eprintln!("{}", report.timings());
    report.assert_matches_file(expected("accept_rowlock"));
    report.assert_each(|r| r.is_invalid() || r.query("accepted") == Some("1"));
    assert!(
        report.records().iter().any(|r| r.waited("b_lock")),
        "the second lock waits in some permutation"
    );
}

// ---- Lock the user, then the wallet, against a transfer locking the other way -------------

const WALLETS: &str = "
    CREATE TABLE users (id bigint PRIMARY KEY);
    CREATE TABLE wallets (user_id bigint PRIMARY KEY, cents bigint NOT NULL);
    INSERT INTO users VALUES (1);
    INSERT INTO wallets VALUES (1, 500);";

#[derive(Debug, LockableRow)]
#[rowlock(table = "users", key = "id")]
struct User {
    id: i64,
}

#[derive(Debug, LockableRow)]
#[rowlock(table = "wallets", key = "user_id")]
struct Wallet {
    user_id: i64,
}

#[tokio::test]
async fn locking_in_opposite_orders_deadlocks_in_some_permutations() {
    let report = Script::new("user then wallet, against wallet then user, by hand")
        .setup(WALLETS)
        .session("a", |s| {
            s.sql(
                "a_user",
                "BEGIN; SELECT id FROM users WHERE id = 1 FOR UPDATE",
            )
            .sql(
                "a_wallet",
                "SELECT cents FROM wallets WHERE user_id = 1 FOR UPDATE",
            )
            .sql("a_commit", "COMMIT")
        })
        .session("b", |s| {
            s.sql(
                "b_wallet",
                "BEGIN; SELECT cents FROM wallets WHERE user_id = 1 FOR UPDATE",
            )
            .sql("b_user", "SELECT id FROM users WHERE id = 1 FOR UPDATE")
            .sql("b_commit", "COMMIT")
        })
        .run()
        .await
        .unwrap();
    eprintln!("{}", report.timings());
    report.assert_matches_file(expected("lock_order_unsafe"));
    let deadlocks = report
        .records()
        .iter()
        .filter(|r| {
            ["a_wallet", "b_user"].iter().any(|s| {
                r.result(s)
                    .is_some_and(|x| x.is_err_and(|e| e.contains("40P01")))
            })
        })
        .count();
    assert!(deadlocks > 0, "the opposite order deadlocks somewhere");
}

fn set_session(s: SessionSpec, name: &str, wallet_first: bool) -> SessionSpec {
    s.step(format!("{name}_lock"), move |s| {
        Box::pin(async move {
            let set = if wallet_first {
                LockSet::new().row::<Wallet>(&1)?.row::<User>(&1)?
            } else {
                LockSet::new().row::<User>(&1)?.row::<Wallet>(&1)?
            };
            let tx = s.db().begin(TransactionOptions::new()).await?;
            let outcome = tx.lock_set(&set, Lock::wait()).await?;
            s.keep(tx);
            Ok(show(&outcome))
        })
    })
    .step(format!("{name}_commit"), |s| {
        Box::pin(async move {
            let tx: Transaction = s.take()?;
            tx.commit().await?;
            Ok("committed".into())
        })
    })
}

#[tokio::test]
async fn a_lock_set_never_deadlocks_whatever_order_it_was_written_in() {
    let report = Script::new("user then wallet, against wallet then user, as rowlock lock sets")
        .setup(WALLETS)
        .session("a", |s| set_session(s, "a", false))
        .session("b", |s| set_session(s, "b", true))
        .run()
        .await
        .unwrap();
    eprintln!("{}", report.timings());
    report.assert_matches_file(expected("lock_order_rowlock"));
    report.assert_each(|r| {
        r.result("a_lock") == Some(Ok("done")) && r.result("b_lock") == Some(Ok("done"))
    });
}

// ---- NoWait: busy at once ------------------------------------------------------------------

#[derive(Debug, LockableRow)]
#[rowlock(table = "accounts", key = "id")]
struct Account {
    id: i64,
}

#[tokio::test]
async fn no_wait_is_busy_at_once_while_the_row_is_held() {
    let report = Script::new("NoWait while another session holds the row")
        .setup("CREATE TABLE accounts (id bigint PRIMARY KEY); INSERT INTO accounts VALUES (1);")
        .session("a", |s| {
            s.step("a_lock", |s| {
                Box::pin(async move {
                    let tx = s.db().begin(TransactionOptions::new()).await?;
                    let outcome = tx.lock_row::<Account>(&1, Lock::wait()).await?;
                    s.keep(tx);
                    Ok(show(&outcome))
                })
            })
            .step("a_commit", |s| {
                Box::pin(async move {
                    s.take::<Transaction>()?.commit().await?;
                    Ok("committed".into())
                })
            })
        })
        .session("b", |s| {
            s.step("b_nowait", |s| {
                Box::pin(async move {
                    let outcome = s
                        .db()
                        .with_locked_row(&1, Lock::no_wait(), |_, a: Account| {
                            Box::pin(async move { Ok::<_, rowlock::Error>(a.id) })
                        })
                        .await?;
                    Ok(show(&outcome))
                })
            })
        })
        .run()
        .await
        .unwrap();
    report.assert_matches_file(expected("no_wait"));
    report.assert_each(|r| !r.waited("b_nowait"));
}

// ---- SKIP LOCKED claims each job once ------------------------------------------------------

#[derive(Debug, LockableRow)]
#[rowlock(table = "jobs", key = "id")]
struct Job {
    id: i64,
}

fn claimer(s: SessionSpec, name: &str) -> SessionSpec {
    s.step(format!("{name}_claim"), |s| {
        Box::pin(async move {
            let claim = Claim::new()
                .where_sql("status = 'pending'", vec![])
                .order_by("id", Direction::Asc);
            let tx = s.db().begin(TransactionOptions::new()).await?;
            let jobs: Vec<Job> = tx.claim(&claim, 1).await?;
            let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
            s.keep((tx, ids.clone()));
            Ok(format!("{ids:?}"))
        })
    })
    .step(format!("{name}_done"), move |s| {
        Box::pin(async move {
            let (tx, ids): (Transaction, Vec<i64>) = s.take()?;
            tx.execute(
                "UPDATE jobs SET status = 'done', claims = claims + 1 WHERE id = ANY($1)",
                &[&ids],
            )
            .await?;
            tx.commit().await?;
            Ok("committed".into())
        })
    })
}

#[tokio::test]
async fn skip_locked_claims_each_job_exactly_once() {
    let report = Script::new("two workers claim one job each with SKIP LOCKED")
        .setup(
            "CREATE TABLE jobs (id bigint PRIMARY KEY, status text NOT NULL, claims int NOT NULL);
             INSERT INTO jobs SELECT g, 'pending', 0 FROM generate_series(1, 3) g;",
        )
        .session("a", |s| claimer(s, "a"))
        .session("b", |s| claimer(s, "b"))
        .query("claims", "SELECT id, claims FROM jobs ORDER BY id")
        .run()
        .await
        .unwrap();
    report.assert_matches_file(expected("skip_locked"));
    report.assert_each(|r| {
        !r.waited("a_claim")
            && !r.waited("b_claim")
            && r.query("claims").is_some_and(|c| !c.contains(", 2"))
    });
}

// ---- A transition racing a lock holder -----------------------------------------------------

#[derive(Debug, LockableRow)]
#[rowlock(table = "tasks", key = "id")]
struct Task {
    id: i64,
    status: String,
}

#[tokio::test]
async fn a_transition_waits_for_the_holder_and_sees_its_change() {
    let report = Script::new("a transition against a session holding the row")
        .setup(
            "CREATE TABLE tasks (id bigint PRIMARY KEY, status text NOT NULL);
                INSERT INTO tasks VALUES (1, 'open');",
        )
        .session("a", |s| {
            s.step("a_lock", |s| {
                Box::pin(async move {
                    let tx = s.db().begin(TransactionOptions::new()).await?;
                    let outcome = tx.lock_row::<Task>(&1, Lock::wait()).await?;
                    s.keep(tx);
                    Ok(show(&outcome))
                })
            })
            .step("a_close", |s| {
                Box::pin(async move {
                    let tx: Transaction = s.take()?;
                    tx.execute("UPDATE tasks SET status = 'closed' WHERE id = 1", &[])
                        .await?;
                    tx.commit().await?;
                    Ok("committed".into())
                })
            })
        })
        .session("b", |s| {
            s.step("b_take", |s| {
                Box::pin(async move {
                    let take = Transition::new("status = 'taken'").when("status = 'open'");
                    let outcome = s.db().transition::<Task>(&1, &take, &[]).await?;
                    Ok(match outcome {
                        Outcome::Done(t) => format!("done ({})", t.status),
                        Outcome::Conflict(t) => format!("conflict ({})", t.status),
                        other => other.to_string(),
                    })
                })
            })
        })
        .query("status", "SELECT status FROM tasks")
        .run()
        .await
        .unwrap();
    report.assert_matches_file(expected("transition"));
}

// ---- The runner itself ---------------------------------------------------------------------

#[tokio::test]
async fn a_wrong_expectation_fails_with_a_readable_diff() {
    let report = Script::new("one step")
        .session("a", |s| s.sql("a_one", "SELECT 1"))
        .run()
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("rowlock-races-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("wrong.out");
    std::fs::write(&path, "# one step\n\npermutation a_one\n  a_one: 2\n").unwrap();
    let err = report.compare_with_file(&path).unwrap_err();
    assert!(err.contains("-  a_one: 2"), "{err}");
    assert!(err.contains("+  a_one: 1"), "{err}");
    assert!(err.contains("ROWLOCK_TESTING_BLESS=1"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A step's error shows in the record as its kind and SQLSTATE only (stable between runs);
/// its whole text, which names the object, was dropped, so a failing race test said
/// `error Db (42P01)` and nothing more. It is kept for the reader: `Record::error_message`,
/// and after a diff or a failed check. A `take` of the wrong type said the session "kept
/// no" value, and dropped what it had kept.
#[tokio::test]
async fn a_failed_steps_whole_error_reaches_the_reader() {
    let report = Script::new("failing steps")
        .session("a", |s| {
            s.sql("a_missing", "SELECT * FROM no_such_table")
                .step("a_keep", |s| {
                    Box::pin(async move {
                        s.keep(5_i32);
                        Ok("kept".into())
                    })
                })
                .step("a_wrong", |s| Box::pin(async move { s.take::<String>() }))
                .step("a_right", |s| {
                    Box::pin(async move { Ok(s.take::<i32>()?.to_string()) })
                })
        })
        .run()
        .await
        .unwrap();
    let record = &report.records()[0];
    assert_eq!(record.result("a_missing"), Some(Err("error Db (42P01)")));
    let missing = record.error_message("a_missing").unwrap();
    assert!(missing.contains("no_such_table"), "{missing}");
    assert_eq!(record.result("a_wrong"), Some(Err("error NothingKept")));
    let wrong = record.error_message("a_wrong").unwrap();
    assert!(
        wrong.contains("kept a i32") && wrong.contains("takes a alloc::string::String"),
        "{wrong}"
    );
    assert_eq!(
        record.result("a_right"),
        Some(Ok("5")),
        "the i32 stayed kept"
    );
    assert_eq!(record.error_message("a_right"), None);
    // The record's text is unchanged (kinds only); the reader of a mismatch gets the rest.
    assert!(!record.to_string().contains("no_such_table"), "{record}");
    let dir = std::env::temp_dir().join(format!("rowlock-races-msg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("wrong.out");
    std::fs::write(&path, "# failing steps\n").unwrap();
    let err = report.compare_with_file(&path).unwrap_err();
    assert!(err.contains("the steps' errors in full"), "{err}");
    assert!(err.contains("a_missing: "), "{err}");
    assert!(err.contains("no_such_table"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn too_many_permutations_are_refused_before_anything_runs() {
    let script = Script::new("many")
        .session("a", |s| {
            s.sql("a1", "SELECT 1")
                .sql("a2", "SELECT 1")
                .sql("a3", "SELECT 1")
        })
        .session("b", |s| {
            s.sql("b1", "SELECT 1")
                .sql("b2", "SELECT 1")
                .sql("b3", "SELECT 1")
        })
        .max_permutations(10);
    let err = script.run().await.unwrap_err();
    assert!(err.to_string().contains("20 permutations"), "{err}");
    let err = Script::new("bad order")
        .session("a", |s| s.sql("a1", "SELECT 1").sql("a2", "SELECT 1"))
        .permutation(["a2", "a1"])
        .run()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("in order"), "{err}");
}

/// A step's result reaches the client before its backend has finished with it: a failed
/// statement's error is sent before the transaction is aborted and its locks released (as a
/// deadlock's victim's is). A session waiting on such a backend is about to run, not waiting:
/// the runner must not move on as if it were (the next step of the waiting session would be
/// refused as an invalid permutation). Here the holder's last step leaves its connection
/// busy (a statement that sleeps on the server, then rolls back) and returns at once.
#[tokio::test]
async fn a_wait_on_a_backend_still_busy_after_its_step_returned_is_not_settled() {
    let report = Script::new("holder busy after its step returned")
        .setup("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);")
        .session("a", |s| {
            s.sql("a_lock", "BEGIN; SELECT id FROM t WHERE id = 1 FOR UPDATE")
                .step("a_release_later", |s| {
                    Box::pin(async move {
                        let pid: i32 = s
                            .client()
                            .query_one("SELECT pg_backend_pid()", &[])
                            .await?
                            .get(0);
                        // Polled once: the request is on its way to the server, and the
                        // step returns while the server still runs it, once the server is
                        // seen running it (the connection's task may not have written it
                        // yet when the poll returns).
                        let sent = s.client().batch_execute("SELECT pg_sleep(0.3); ROLLBACK");
                        let _ = tokio::time::timeout(std::time::Duration::ZERO, sent).await;
                        let observer = s.db().pool().get().await.map_err(|e| StepError {
                            kind: "Pool".into(),
                            sql_state: None,
                            message: e.to_string(),
                        })?;
                        while observer
                            .query_opt(
                                "SELECT 1 FROM pg_stat_activity \
                                 WHERE pid = $1 AND query LIKE 'SELECT pg_sleep%'",
                                &[&pid],
                            )
                            .await?
                            .is_none()
                        {
                            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                        }
                        Ok("sent".into())
                    })
                })
        })
        .session("b", |s| {
            s.sql("b_lock", "BEGIN; SELECT id FROM t WHERE id = 1 FOR UPDATE")
                .sql("b_commit", "COMMIT")
        })
        .permutation(["a_lock", "b_lock", "a_release_later", "b_commit"])
        .run()
        .await
        .unwrap();
    let record = &report.records()[0];
    assert!(!record.is_invalid(), "{record}");
    assert_eq!(record.result("b_lock"), Some(Ok("1")), "{record}");
    assert!(record.waited("b_lock"), "{record}");
    assert_eq!(record.result("b_commit"), Some(Ok("ok")), "{record}");
}
