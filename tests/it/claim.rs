//! SKIP LOCKED work claiming: exactly once, never waiting, never over-claiming.

use std::collections::BTreeSet;
use std::sync::Arc;

use rowlock::Db;
use rowlock::tokio_postgres::error::SqlState;
use rowlock::tokio_postgres::{Error as PgError, Row};
use rowlock::{
    Claim, Compare, Direction, ErrorKind, LockStrength, LockableRow, Outcome, Table, Transaction,
    TransactionOptions,
};
use rowlock_testing::TestDatabase;
use tokio::sync::{Barrier, oneshot};

use crate::support::{WAIT, in_transaction};

#[derive(Debug)]
struct Job {
    id: i64,
}

impl LockableRow for Job {
    type Key = i64;
    const TABLE: Table = Table::new("jobs");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    fn from_row(row: &Row) -> Result<Self, PgError> {
        Ok(Job {
            id: row.try_get("id")?,
        })
    }
    fn key(&self) -> i64 {
        self.id
    }
}

/// `n` pending jobs, the documented partial index, and a table referencing jobs.
async fn jobs(n: i64, pool_size: usize) -> (TestDatabase, Db) {
    let pg = rowlock_testing::TestCluster::shared()
        .unwrap()
        .create_database()
        .await
        .unwrap();
    pg.client()
        .await
        .unwrap()
        .batch_execute(&format!(
            "CREATE TABLE jobs (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending',
                                priority int NOT NULL DEFAULT 0, worker int,
                                claims int NOT NULL DEFAULT 0);
             CREATE INDEX jobs_claimable ON jobs (priority DESC, id) WHERE status = 'pending';
             CREATE TABLE job_notes (job_id bigint NOT NULL REFERENCES jobs (id));
             INSERT INTO jobs (id) SELECT g FROM generate_series(1, {n}) g;
             ANALYZE jobs;"
        ))
        .await
        .unwrap();
    let db = pg.db(pool_size);
    (pg, db)
}

fn pending() -> Claim {
    Claim::new()
        .filter("status", Compare::Eq, "pending")
        .order_by("priority", Direction::Desc)
        .order_by("id", Direction::Asc)
}

/// (rows claimed other than once, rows not done): `(0, 0)` when every row was processed once.
async fn claimed_once_and_done(pg: &TestDatabase) -> (i64, i64) {
    let row = pg
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FILTER (WHERE claims <> 1), count(*) FILTER (WHERE status <> 'done')
             FROM jobs",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// How many rows of `jobs` another session could lock right now.
async fn free_rows(observer: &rowlock::tokio_postgres::Client) -> i64 {
    observer.batch_execute("BEGIN").await.unwrap();
    let free: i64 = observer
        .query_one(
            "SELECT count(*) FROM (SELECT id FROM jobs FOR UPDATE SKIP LOCKED) s",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    observer.batch_execute("ROLLBACK").await.unwrap();
    free
}

fn ids(jobs: &[Job]) -> Vec<i64> {
    jobs.iter().map(|j| j.id).collect()
}

/// Claims and returns the ids without changing the rows.
fn just_ids(
    _: &Transaction,
    jobs: Vec<Job>,
) -> rowlock::BoxFuture<'_, Result<Vec<i64>, rowlock::Error>> {
    Box::pin(async move { Ok(ids(&jobs)) })
}

#[tokio::test]
async fn sixteen_workers_with_random_batches_process_every_row_exactly_once() {
    let total = 20_000;
    let workers = 16;
    let (pg, db) = jobs(total, workers + 2).await;
    let claim = Arc::new(pending());
    let tasks: Vec<_> = (0..workers as i32)
        .map(|w| {
            let (db, claim) = (db.clone(), claim.clone());
            tokio::spawn(async move {
                let mut seed = 0x9E37_79B9_u64 ^ ((w as u64 + 1) * 0x1234_5678_9ABC);
                let mut mine = Vec::new();
                loop {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let n = (seed % 100) as usize + 1;
                    let claimed = db
                        .claim(&claim, n, |tx, jobs: Vec<Job>| {
                            Box::pin(async move {
                                assert!(jobs.len() <= n, "claimed {} of {n}", jobs.len());
                                let ids = ids(&jobs);
                                tx.execute(
                                "UPDATE jobs SET status = 'done', worker = $2, claims = claims + 1
                                 WHERE id = ANY($1)",
                                &[&ids, &w],
                            )
                            .await?;
                                Ok::<_, rowlock::Error>(ids)
                            })
                        })
                        .await
                        .unwrap();
                    match claimed {
                        Outcome::Done(ids) => mine.extend(ids),
                        other => {
                            assert_eq!(other, Outcome::NotFound(vec![]), "nothing left");
                            return mine;
                        }
                    }
                }
            })
        })
        .collect();
    let mut seen = BTreeSet::new();
    let mut claimed = 0;
    for task in tasks {
        let mine = task.await.unwrap();
        claimed += mine.len();
        seen.extend(mine);
    }
    assert_eq!(claimed, total as usize, "claimed sets are disjoint");
    assert_eq!(
        seen,
        (1..=total).collect::<BTreeSet<_>>(),
        "their union is every row"
    );
    assert_eq!(claimed_once_and_done(&pg).await, (0, 0));
}

#[tokio::test]
async fn a_held_claim_is_skipped_and_becomes_claimable_after_rollback() {
    let (_db, db) = jobs(10, 4).await;
    let claim = Arc::new(pending().transaction(TransactionOptions::new().lock_timeout(WAIT)));
    let (claimed_tx, claimed_rx) = oneshot::channel();
    let mut claimed_tx = Some(claimed_tx);
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let mut release_rx = Some(release_rx);
    let holder = tokio::spawn({
        let (db, claim) = (db.clone(), claim.clone());
        async move {
            db.claim(&claim, 3, |_, jobs: Vec<Job>| {
                let claimed_tx = claimed_tx.take().expect("the closure runs once");
                let release_rx = release_rx.take().expect("the closure runs once");
                Box::pin(async move {
                    claimed_tx.send(ids(&jobs)).unwrap();
                    release_rx.await.unwrap();
                    Err::<(), _>(
                        rowlock::Outcome::<()>::Skipped(vec![])
                            .into_result()
                            .unwrap_err(),
                    )
                })
            })
            .await
        }
    });
    assert_eq!(claimed_rx.await.unwrap(), [1, 2, 3]);
    // B never waits for A: it gets the next rows at once.
    let b = db.claim(&claim, 3, just_ids).await.unwrap();
    assert_eq!(b.done(), Some(vec![4, 5, 6]));
    release_tx.send(()).unwrap();
    assert!(
        holder.await.unwrap().is_err(),
        "A's closure failed, so A rolled back"
    );
    let again = db.claim(&claim, 3, just_ids).await.unwrap();
    assert_eq!(
        again.done(),
        Some(vec![1, 2, 3]),
        "A's rows are claimable again"
    );
}

#[tokio::test]
async fn no_key_update_claims_rows_that_foreign_key_inserts_hold() {
    let (pg, db) = jobs(3, 4).await;
    let inserter = pg.client().await.unwrap();
    // Inserting a referencing row takes FOR KEY SHARE on job 1 until commit.
    inserter
        .batch_execute("BEGIN; INSERT INTO job_notes VALUES (1)")
        .await
        .unwrap();
    let got = db
        .claim_one(&pending(), |_, job: Job| {
            Box::pin(async move { Ok::<_, rowlock::Error>(job.id) })
        })
        .await
        .unwrap();
    assert_eq!(
        got.done(),
        Some(1),
        "NO KEY UPDATE does not conflict with KEY SHARE"
    );
    let strict = pending().strength(LockStrength::Update);
    let got = db
        .claim_one(&strict, |_, job: Job| {
            Box::pin(async move { Ok::<_, rowlock::Error>(job.id) })
        })
        .await
        .unwrap();
    assert_eq!(
        got.done(),
        Some(2),
        "FOR UPDATE conflicts with KEY SHARE, so job 1 is skipped"
    );
    inserter.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn concurrent_claims_never_lock_more_than_asked() {
    let total = 100;
    let (workers, n) = (4, 5);
    let (pg, db) = jobs(total, workers + 2).await;
    let claim = Arc::new(pending());
    let all_claimed = Arc::new(Barrier::new(workers + 1));
    let release = Arc::new(Barrier::new(workers + 1));
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (db, claim) = (db.clone(), claim.clone());
            let (all_claimed, release) = (all_claimed.clone(), release.clone());
            tokio::spawn(async move {
                db.claim(&claim, n, |_, jobs: Vec<Job>| {
                    let all_claimed = all_claimed.clone();
                    let release = release.clone();
                    Box::pin(async move {
                        tokio::time::timeout(WAIT, all_claimed.wait())
                            .await
                            .expect("every task reaches the barrier");
                        tokio::time::timeout(WAIT, release.wait())
                            .await
                            .expect("every task reaches the barrier");
                        Ok::<_, rowlock::Error>(jobs.len())
                    })
                })
                .await
            })
        })
        .collect();
    // A worker that fails never reaches the barrier: fail instead of waiting forever.
    if tokio::time::timeout(WAIT, all_claimed.wait())
        .await
        .is_err()
    {
        for task in tasks {
            if task.is_finished() {
                panic!("a worker ended early: {:?}", task.await);
            }
        }
        panic!("the workers did not all claim within {WAIT:?}");
    }
    // Every row a claim holds is one the observer cannot lock.
    let observer = pg.client().await.unwrap();
    let free = free_rows(&observer).await;
    assert_eq!(
        total - free,
        (workers * n) as i64,
        "exactly n rows locked per claim"
    );
    tokio::time::timeout(WAIT, release.wait())
        .await
        .expect("every task reaches the barrier");
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().done(), Some(n));
    }
}

#[tokio::test]
async fn with_the_partial_index_the_claim_is_an_index_scan_with_no_sort_under_the_lock() {
    let (_db, db) = jobs(10_000, 2).await;
    let plan = db.explain_claim::<Job>(&pending(), 10).await.unwrap();
    let text = plan.join("\n");
    let lock = plan
        .iter()
        .position(|l| l.contains("LockRows"))
        .unwrap_or_else(|| panic!("no LockRows node:\n{text}"));
    let under_lock = plan[lock + 1..]
        .iter()
        .find(|l| l.contains("->"))
        .unwrap_or_else(|| panic!("nothing under LockRows:\n{text}"));
    assert!(
        under_lock.contains("Index Scan using jobs_claimable"),
        "{text}"
    );
    let cte_end = plan
        .iter()
        .position(|l| l.contains("CTE Scan"))
        .unwrap_or(plan.len());
    assert!(
        !plan[lock..cte_end].iter().any(|l| l.contains("Sort")),
        "no sort under the lock:\n{text}"
    );
}

#[tokio::test]
async fn an_empty_claim_is_an_ordinary_outcome() {
    let (_db, db) = jobs(0, 2).await;
    let mut ran = false;
    let got = db
        .claim(&pending(), 10, |_, _: Vec<Job>| {
            ran = true;
            Box::pin(async { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap();
    assert_eq!(got, Outcome::NotFound(vec![]));
    assert!(!ran);
}

#[tokio::test]
async fn bad_claims_are_refused_before_anything_is_locked() {
    let (pg, db) = jobs(5, 2).await;
    let observer = pg.client().await.unwrap();
    let cases = [
        (pending(), 0, "n = 0"),
        (
            Claim::new().filter("status", Compare::Eq, "pending"),
            1,
            "no order",
        ),
        (
            Claim::new().order_by("priority", Direction::Asc),
            1,
            "order lacking the key",
        ),
        (
            Claim::new()
                .order_by("id", Direction::Asc)
                .transaction(TransactionOptions::new().read_only(true)),
            1,
            "read only",
        ),
    ];
    for (claim, n, name) in cases {
        let err = db.claim(&claim, n, just_ids).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{name}: {err}");
    }
    assert_eq!(
        db.pool().status().size,
        0,
        "refused before a connection was taken"
    );
    for claim in [
        pending().filter("no_such_column", Compare::Eq, 1_i32),
        Claim::new()
            .order_by("id\"; DROP TABLE jobs; --", Direction::Asc)
            .order_by("id", Direction::Asc),
        pending().mark("no_such_column = 1", vec![]),
    ] {
        let err = db.claim(&claim, 1, just_ids).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert_eq!(err.sql_state(), Some(&SqlState::UNDEFINED_COLUMN));
        // Whichever part of the claim named it, the message says where to look.
        let shown = err.to_string();
        assert!(shown.contains("the mark or the lease)"), "{shown}");
    }
    assert_eq!(in_transaction(&observer).await, 0);
    let left: i64 = observer
        .query_one(
            "SELECT count(*) FROM (SELECT id FROM jobs FOR UPDATE NOWAIT) s",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 5, "nothing is locked and the table is intact");
}

#[tokio::test]
async fn the_closure_runs_with_the_default_plan_cache_mode() {
    let (_db, db) = jobs(3, 2).await;
    let mode = db
        .claim_one(&pending(), |tx, _: Job| {
            Box::pin(async move {
                let row = tx
                    .query_one("SELECT current_setting('plan_cache_mode')", &[])
                    .await?;
                Ok::<String, rowlock::Error>(row.get(0))
            })
        })
        .await
        .unwrap();
    assert_eq!(
        mode.done().as_deref(),
        Some("auto"),
        "the claim's forced custom plans end with it"
    );
}

/// A queue as services write it: an enum status, a bigint attempt count, a due time, queues.
async fn real_queue() -> (TestDatabase, Db) {
    crate::support::database(
        "CREATE TYPE job_status AS ENUM ('pending', 'running', 'done');
             CREATE TABLE jobs (id bigint PRIMARY KEY, status job_status NOT NULL DEFAULT 'pending',
                                attempts bigint NOT NULL DEFAULT 0, queue text NOT NULL,
                                run_at timestamptz NOT NULL DEFAULT now());
             CREATE INDEX jobs_due ON jobs (run_at, id) WHERE status = 'pending';
             INSERT INTO jobs (id, queue, attempts, run_at) VALUES
               (1, 'mail', 0, now() - interval '1 hour'),
               (2, 'sms', 5, now() - interval '1 hour'),
               (3, 'push', 0, now() - interval '1 hour'),
               (4, 'mail', 1, now() + interval '1 hour'),
               (5, 'sms', 2, now() - interval '2 hours');
             UPDATE jobs SET status = 'done' WHERE id = 3;
             INSERT INTO jobs (id, queue, status) SELECT g, 'mail', 'done'
               FROM generate_series(100, 20000) g;
             ANALYZE jobs;",
        2,
    )
    .await
}

#[tokio::test]
async fn enum_integer_and_sql_filters_claim_what_a_real_queue_asks_for() {
    let (_db, db) = real_queue().await;
    let claim = Claim::new()
        .filter("status", Compare::Eq, "pending") // a job_status enum column
        .filter("attempts", Compare::Lt, 3_i32) // an int8 column, an i32 value
        .where_sql(
            "run_at <= now() AND queue = ANY($1)",
            vec![Box::new(vec!["mail".to_string(), "sms".to_string()])],
        )
        .order_by("run_at", Direction::Asc)
        .order_by("id", Direction::Asc);
    let claimed = db
        .claim(&claim, 10, |_, jobs: Vec<Job>| {
            Box::pin(async move {
                Ok::<_, rowlock::Error>(jobs.iter().map(|j| j.id).collect::<Vec<_>>())
            })
        })
        .await
        .unwrap();
    // 2 has too many attempts, 3 is done, 4 is not due; 5 is due earliest.
    assert_eq!(claimed.done(), Some(vec![5, 1]));
    let plan = db
        .explain_claim::<Job>(&claim, 10)
        .await
        .unwrap()
        .join("\n");
    assert!(
        plan.contains("jobs_due"),
        "the partial index serves the enum filter: {plan}"
    );
}

#[tokio::test]
async fn filters_that_cannot_fit_are_refused_before_anything_is_locked() {
    let (_db, db) = real_queue().await;
    let run = |claim: Claim| {
        let db = db.clone();
        async move {
            db.claim(&claim, 1, |_, _: Vec<Job>| {
                Box::pin(async { Ok::<_, rowlock::Error>(()) })
            })
            .await
            .unwrap_err()
        }
    };
    let order = |c: Claim| c.order_by("id", Direction::Asc);
    // A value out of the column's range, a value of another type, a bad predicate.
    for claim in [
        order(Claim::new().filter("status", Compare::Eq, 1_i64)),
        order(Claim::new().filter("attempts", Compare::Eq, 2.5_f64)),
        order(Claim::new().where_sql("queue = $2", vec![Box::new("mail")])),
        order(Claim::new().where_sql("true; DELETE FROM jobs", vec![])),
    ] {
        let err = run(claim).await;
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    }
    // A text value the enum does not have: the server's words, and where it failed (the
    // refusal said neither step nor, before the server's detail, much else).
    let err = run(order(Claim::new().filter("status", Compare::Eq, "bogus"))).await;
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("while claiming rows") && text.contains("\"bogus\""),
        "{text}"
    );
    // A bound value the driver cannot write as its column's type names its filter.
    let err = run(order(Claim::new().filter(
        "id",
        Compare::Eq,
        uuid::Uuid::nil(),
    )))
    .await;
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("the filter on \"id\""), "{err}");
    assert!(
        err.to_string().contains("Uuid") && !err.to_string().contains("Fit"),
        "{err}"
    );
    // `None` compares as NULL and would match no row: refused, naming the filter and the
    // way to say it (before, an empty claim).
    let err = run(order(Claim::new().filter("id", Compare::Eq, None::<i64>))).await;
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("the filter on \"id\"") && text.contains("filter_null"),
        "{text}"
    );
    // `id` is int8, so i64::MAX fits: an ordinary empty claim.
    let fits = order(Claim::new().filter("id", Compare::Eq, i64::MAX));
    let none = db
        .claim(&fits, 1, |_, _: Vec<Job>| {
            Box::pin(async { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap();
    assert_eq!(none, Outcome::NotFound(vec![]));
}

#[tokio::test]
async fn a_claim_extended_after_use_claims_by_its_new_filters() {
    let (_db, db) = jobs(10, 1).await;
    let claim = Claim::new().order_by("id", Direction::Asc);
    // Used once (rendered and cached), then extended: the cache must not outlive the change.
    let got = db
        .claim(&claim, 1, |_, jobs: Vec<Job>| {
            Box::pin(async move { Ok::<_, rowlock::Error>(jobs[0].id) })
        })
        .await
        .unwrap();
    assert_eq!(got.done(), Some(1));
    let claim = claim.filter("id", Compare::Gt, 5_i64);
    let got = db
        .claim(&claim, 1, |_, jobs: Vec<Job>| {
            Box::pin(async move { Ok::<_, rowlock::Error>(jobs[0].id) })
        })
        .await
        .unwrap();
    assert_eq!(got.done(), Some(6));
}

#[derive(Debug, PartialEq, Eq)]
struct MarkedJob {
    id: i64,
    status: String,
    worker: Option<i32>,
    claims: i32,
}

impl LockableRow for MarkedJob {
    type Key = i64;
    const TABLE: Table = Table::new("jobs");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    const COLUMNS: &'static [&'static str] = &["id", "status", "worker", "claims"];
    fn from_row(row: &Row) -> Result<Self, PgError> {
        Ok(MarkedJob {
            id: row.try_get("id")?,
            status: row.try_get("status")?,
            worker: row.try_get("worker")?,
            claims: row.try_get("claims")?,
        })
    }
    fn key(&self) -> i64 {
        self.id
    }
}

fn running(worker: i32) -> Claim {
    pending().mark(
        "status = 'running', worker = $1, claims = claims + 1",
        vec![Box::new(worker)],
    )
}

#[tokio::test]
async fn claim_and_mark_claims_and_updates_in_one_statement() {
    let (pg, db) = jobs(10, 2).await;
    let claim = running(7);
    let first: Vec<MarkedJob> = db.claim_and_mark(&claim, 3).await.unwrap();
    let expected: Vec<MarkedJob> = (1..=3)
        .map(|id| MarkedJob {
            id,
            status: "running".into(),
            worker: Some(7),
            claims: 1,
        })
        .collect();
    assert_eq!(first, expected, "the marked rows, in the claim's order");
    let next: Vec<MarkedJob> = db.claim_and_mark(&claim, 3).await.unwrap();
    assert_eq!(next.iter().map(|j| j.id).collect::<Vec<_>>(), [4, 5, 6]);
    // A row another transaction holds is skipped, never waited for.
    let holder = pg.client().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM jobs WHERE id = 7 FOR UPDATE")
        .await
        .unwrap();
    let skipped: Vec<Job> = db.claim_and_mark(&claim, 2).await.unwrap();
    assert_eq!(ids(&skipped), [8, 9]);
    holder.batch_execute("ROLLBACK").await.unwrap();
    let rest: Vec<Job> = db.claim_and_mark(&claim, 10).await.unwrap();
    assert_eq!(ids(&rest), [7, 10]);
    let none: Vec<Job> = db.claim_and_mark(&claim, 10).await.unwrap();
    assert!(none.is_empty(), "nothing eligible left is not an error");
}

#[tokio::test]
async fn claim_and_mark_from_many_workers_claims_each_row_exactly_once() {
    let (pg, db) = jobs(2_000, 16).await;
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let db = db.clone();
            tokio::spawn(async move {
                let claim = running(w);
                let mut got = Vec::new();
                loop {
                    let batch: Vec<Job> =
                        db.claim_and_mark(&claim, 1 + w as usize % 5).await.unwrap();
                    if batch.is_empty() {
                        return got;
                    }
                    assert!(batch.len() <= 1 + w as usize % 5, "never more than asked");
                    got.extend(ids(&batch));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let unique: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), 2_000, "every job claimed");
    assert_eq!(unique.len(), 2_000, "no job claimed twice");
    let twice: i64 = pg
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM jobs WHERE claims <> 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(twice, 0);
}

#[tokio::test]
async fn a_marked_claim_in_a_claim_closure_rolls_back_with_the_closure() {
    let (_db, db) = jobs(3, 2).await;
    let claim = running(1);
    let failed = db
        .claim(&claim, 2, |_, jobs: Vec<MarkedJob>| {
            Box::pin(async move {
                assert!(jobs.iter().all(|j| j.status == "running" && j.claims == 1));
                Err::<(), _>(crate::support::AppError::Conflict)
            })
        })
        .await;
    assert!(failed.is_err());
    let again: Vec<MarkedJob> = db.claim_and_mark(&claim, 2).await.unwrap();
    assert_eq!(
        again.iter().map(|j| (j.id, j.claims)).collect::<Vec<_>>(),
        [(1, 1), (2, 1)],
        "the rolled-back mark left no trace"
    );
}

#[tokio::test]
async fn claim_and_mark_refuses_bad_input_before_sending() {
    let (_db, db) = jobs(3, 1).await;
    let cases = [
        (pending(), 1, "needs a claim with a mark"),
        (
            pending().mark(" ", vec![]),
            1,
            "mark (its SET list) is empty",
        ),
        (
            pending().mark("worker = $2", vec![Box::new(1)]),
            1,
            "uses $2",
        ),
        (running(1), 0, "at least 1"),
    ];
    for (claim, n, expected) in cases {
        let err = db.claim_and_mark::<Job>(&claim, n).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert!(err.to_string().contains(expected), "{err}");
    }
    let left: Vec<Job> = db.claim_and_mark(&running(1), 5).await.unwrap();
    assert_eq!(
        ids(&left),
        [1, 2, 3],
        "nothing was claimed by the refused calls"
    );
}

fn by_id() -> Claim {
    Claim::new()
        .filter("status", Compare::Eq, "pending")
        .order_by("id", Direction::Asc)
}

async fn claim_ids(db: &Db, claim: &Claim, n: usize) -> Vec<i64> {
    db.claim(claim, n, just_ids)
        .await
        .unwrap()
        .done()
        .unwrap_or_default()
}

#[tokio::test]
async fn a_started_claim_takes_rows_from_its_start_and_wraps_around() {
    let (pg, db) = jobs(10, 2).await;
    assert_eq!(
        claim_ids(&db, &by_id().start_at(7_i64), 3).await,
        [7, 8, 9],
        "from the start on"
    );
    assert_eq!(
        claim_ids(&db, &by_id().start_at(8_i64), 5).await,
        [1, 2, 8, 9, 10],
        "then from the head, returned in the claim's order"
    );
    assert_eq!(
        claim_ids(&db, &by_id().start_at(None::<i64>), 2).await,
        [1, 2],
        "a NULL start is the head"
    );
    assert_eq!(
        claim_ids(&db, &by_id().start_at(11_i64), 2).await,
        [1, 2],
        "a start past the end wraps"
    );
    let descending = Claim::new()
        .filter("status", Compare::Eq, "pending")
        .order_by("id", Direction::Desc)
        .start_at(4_i64);
    assert_eq!(
        claim_ids(&db, &descending, 6).await,
        [10, 9, 4, 3, 2, 1],
        "descending: at or before the start, then from the top"
    );
    // Rows held by another transaction are skipped; the claim goes on past them and wraps.
    let holder = pg.client().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM jobs WHERE id >= 8 FOR UPDATE")
        .await
        .unwrap();
    assert_eq!(claim_ids(&db, &by_id().start_at(8_i64), 2).await, [1, 2]);
    holder.batch_execute("ROLLBACK").await.unwrap();
    // With a mark, in one statement.
    let marked: Vec<Job> = db
        .claim_and_mark(&by_id().mark("status = 'done'", vec![]).start_at(9_i64), 3)
        .await
        .unwrap();
    assert_eq!(ids(&marked), [1, 9, 10]);
    let done: Vec<i64> = pg
        .client()
        .await
        .unwrap()
        .query("SELECT id FROM jobs WHERE status = 'done' ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(done, [1, 9, 10]);
}

#[tokio::test]
async fn a_started_claim_reaches_rows_whose_start_column_is_null() {
    let (pg, db) = jobs(4, 2).await;
    pg.client()
        .await
        .unwrap()
        .batch_execute("UPDATE jobs SET worker = id::int WHERE id <= 2")
        .await
        .unwrap();
    let claim = Claim::new()
        .filter("status", Compare::Eq, "pending")
        .order_by("worker", Direction::Asc)
        .order_by("id", Direction::Asc)
        .start_at(2_i32);
    // worker 2, then worker 1 (before the start), then the two NULL workers.
    assert_eq!(claim_ids(&db, &claim, 10).await, [1, 2, 3, 4]);
}

#[tokio::test]
async fn a_started_claim_never_locks_more_than_asked() {
    let total = 100;
    let (pg, db) = jobs(total, 3).await;
    let observer = pg.client().await.unwrap();
    for (start, n) in [(1_i64, 5), (50, 5), (98, 5), (100, 40), (0, 7)] {
        let claim = by_id().start_at(start);
        let locked = db
            .claim(&claim, n, |_, jobs: Vec<Job>| {
                let observer = &observer;
                Box::pin(async move {
                    let free = free_rows(observer).await;
                    Ok::<_, rowlock::Error>((jobs.len(), total - free))
                })
            })
            .await
            .unwrap();
        assert_eq!(locked.done(), Some((n, n as i64)), "start {start}, n {n}");
    }
}

#[tokio::test]
async fn sixteen_claimers_at_random_starts_claim_each_row_exactly_once() {
    let total = 5_000;
    let (pg, db) = jobs(total, 16).await;
    let workers: Vec<_> = (0..16_u64)
        .map(|w| {
            let db = db.clone();
            tokio::spawn(async move {
                let mut rng = crate::faults::Rng(0x9E37_79B9 * (w + 1));
                let mut got = Vec::new();
                loop {
                    let start = rng.below(total as u64 + 10) as i64;
                    let n = 1 + rng.below(50) as usize;
                    let claim = by_id()
                        .mark("status = 'done', claims = claims + 1", vec![])
                        .start_at(start);
                    let batch: Vec<Job> = db.claim_and_mark(&claim, n).await.unwrap();
                    if batch.is_empty() {
                        return got;
                    }
                    assert!(batch.len() <= n, "never more than asked");
                    got.extend(ids(&batch));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let unique: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), total as usize, "every job claimed once");
    assert_eq!(unique, (1..=total).collect::<BTreeSet<_>>());
    assert_eq!(claimed_once_and_done(&pg).await, (0, 0));
}

#[tokio::test]
async fn a_start_of_the_wrong_type_is_refused_and_claims_nothing() {
    let (_db, db) = jobs(3, 1).await;
    let err = db
        .claim(&by_id().start_at("two"), 2, just_ids)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("start value"), "{err}");
    let err = db
        .claim(&by_id().start_at(2_i32), 2, just_ids)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert_eq!(claim_ids(&db, &by_id(), 5).await, [1, 2, 3]);
}

#[tokio::test]
async fn every_branch_of_a_started_claim_is_an_index_scan_with_no_sort_under_the_lock() {
    let (_db, db) = jobs(10_000, 2).await;
    let claim = pending().start_at(0_i32);
    let plan = db.explain_claim::<Job>(&claim, 10).await.unwrap();
    let text = plan.join("\n");
    let locks: Vec<usize> = plan
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("LockRows"))
        .map(|(i, _)| i)
        .collect();
    assert!(locks.len() >= 2, "from the start, and before it:\n{text}");
    for at in locks {
        // The lock's subtree: up to the next branch.
        let end = plan[at + 1..]
            .iter()
            .position(|l| l.contains("Subquery Scan") || l.contains("CTE Scan"))
            .map_or(plan.len(), |i| at + 1 + i);
        let subtree = plan[at + 1..end].join("\n");
        // A branch the planner proved cannot run (a NULL-start branch, with the start known)
        // may be anything; every other one scans the index in order.
        if subtree.contains("One-Time Filter: false") {
            continue;
        }
        assert!(
            subtree.contains("Index Scan using jobs_claimable") && !subtree.contains("Sort"),
            "an index scan with no sort under the lock:\n{text}"
        );
    }
}

#[tokio::test]
async fn moving_the_start_of_a_used_claim_claims_from_the_new_start() {
    let (_db, db) = jobs(10, 2).await;
    let mut claim = by_id().mark("status = 'done'", vec![]).start_at(3_i64);
    let first: Vec<Job> = db.claim_and_mark(&claim, 2).await.unwrap();
    assert_eq!(ids(&first), [3, 4]);
    claim = claim.start_at(8_i64);
    let second: Vec<Job> = db.claim_and_mark(&claim, 2).await.unwrap();
    assert_eq!(
        ids(&second),
        [8, 9],
        "the rendered claim binds the new start"
    );
    claim = claim.start_at(None::<i64>);
    let third: Vec<Job> = db.claim_and_mark(&claim, 2).await.unwrap();
    assert_eq!(ids(&third), [1, 2]);
}

#[tokio::test]
async fn a_cloned_claim_keeps_its_values_and_takes_its_own_start() {
    let (pg, db) = jobs(10, 2).await;
    let base = by_id()
        .where_sql("id <> $1", vec![Box::new(5_i64)])
        .mark("status = 'done', worker = $1", vec![Box::new(7_i32)])
        .start_at(0_i64);
    let first: Vec<Job> = db.claim_and_mark(&base, 2).await.unwrap();
    assert_eq!(ids(&first), [1, 2]);
    let moved = base.clone().start_at(4_i64);
    let second: Vec<Job> = db.claim_and_mark(&moved, 2).await.unwrap();
    assert_eq!(
        ids(&second),
        [4, 6],
        "from its own start, with the shared filter"
    );
    let third: Vec<Job> = db.claim_and_mark(&base, 2).await.unwrap();
    assert_eq!(ids(&third), [3, 7], "the original keeps its start");
    let workers: Vec<Option<i32>> = pg
        .client()
        .await
        .unwrap()
        .query(
            "SELECT worker FROM jobs WHERE status = 'done' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        workers,
        [Some(7); 6],
        "the mark's value is shared by the clone"
    );
}
