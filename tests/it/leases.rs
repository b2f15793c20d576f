//! Leases on claimed rows: a worker that vanishes gives its rows back when the lease ends, and
//! nobody else gets them before; a worker whose lease was taken over changes nothing.

use std::time::Duration;

use rowlock::tokio_postgres::{Client, Error as PgError, Row};
use rowlock::{Claim, Compare, Direction, ErrorKind, Lease, Leased, LockableRow, Outcome, Table};

use crate::support::{WAIT, database};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Job {
    id: i64,
    status: String,
}

impl LockableRow for Job {
    type Key = i64;
    const TABLE: Table = Table::new("jobs");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    const COLUMNS: &'static [&'static str] = &["id", "status"];
    fn from_row(row: &Row) -> Result<Self, PgError> {
        Ok(Job {
            id: row.try_get("id")?,
            status: row.try_get("status")?,
        })
    }
    fn key(&self) -> i64 {
        self.id
    }
}

const JOBS: &str = "CREATE TABLE jobs (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending',
                                       leased_until timestamptz, attempts integer NOT NULL DEFAULT 0);
                    INSERT INTO jobs (id) SELECT generate_series(1, 5);";

fn pending(lease: &Lease) -> Claim {
    Claim::new()
        .filter("status", Compare::Eq, "pending")
        .order_by("id", Direction::Asc)
        .lease(lease.clone())
}

/// Waits until the server's clock is past every lease: a condition read from the server, not
/// a guess at how long to sleep.
async fn until_leases_expired(client: &Client) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let expired: bool = client
            .query_one(
                "SELECT coalesce(bool_and(leased_until <= now()), true) FROM jobs
                 WHERE leased_until IS NOT NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if expired {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "leases never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_killed_workers_jobs_are_claimed_again_after_the_lease_and_by_nobody_before() {
    lease_lifecycle(false).await;
}

/// The same with a lock and statement timeout on the handle: claims, extensions, releases and
/// completions then run in transactions of their own (for the timeouts' `SET LOCAL`s), and
/// the lease's fence holds the same.
#[tokio::test]
async fn leases_hold_the_same_under_the_handles_timeouts() {
    lease_lifecycle(true).await;
}

async fn lease_lifecycle(timeouts: bool) {
    let (pg, db) = database(JOBS, 4).await;
    let db = if timeouts {
        pg.db_with(
            rowlock::Db::builder()
                .max_size(4)
                .lock_timeout(Duration::from_secs(5))
                .statement_timeout(Duration::from_secs(10)),
        )
        .unwrap()
    } else {
        db
    };
    let observer = pg.client().await.unwrap();
    let lease = Lease::new(Duration::from_millis(800));
    let claim = pending(&lease);

    // A worker claims three jobs and is killed mid-job: its task never finishes.
    let (claimed_tx, claimed_rx) = tokio::sync::oneshot::channel();
    let worker = tokio::spawn({
        let (db, claim) = (db.clone(), claim.clone());
        async move {
            let jobs = db.claim_and_mark::<Leased<Job>>(&claim, 3).await.unwrap();
            claimed_tx.send(jobs).unwrap();
            std::future::pending::<()>().await;
        }
    });
    let dead: Vec<Leased<Job>> = claimed_rx.await.unwrap();
    worker.abort();
    assert_eq!(dead.iter().map(|j| j.row.id).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(dead.iter().all(|j| j.attempt == 1));

    // Before the lease ends nobody gets them: another worker takes the two others only.
    let other: Vec<Leased<Job>> = db.claim_and_mark(&claim, 5).await.unwrap();
    assert_eq!(other.iter().map(|j| j.row.id).collect::<Vec<_>>(), [4, 5]);
    for job in &other {
        let done = job
            .complete(&db, &lease, "status = 'done'", &[])
            .await
            .unwrap();
        assert!(matches!(done, Outcome::Done(Job { ref status, .. }) if status == "done"));
    }
    assert!(
        db.claim_and_mark::<Leased<Job>>(&claim, 5)
            .await
            .unwrap()
            .is_empty()
    );

    // After it, they are claimable again, as a second attempt.
    until_leases_expired(&observer).await;
    let again: Vec<Leased<Job>> = db.claim_and_mark(&claim, 5).await.unwrap();
    assert_eq!(
        again.iter().map(|j| j.row.id).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(again.iter().all(|j| j.attempt == 2));

    // The dead worker's stale lease changes nothing, whatever it tries.
    let stale = &dead[0];
    let tried = stale
        .complete(&db, &lease, "status = 'done'", &[])
        .await
        .unwrap();
    assert!(matches!(tried, Outcome::Conflict(Job { ref status, .. }) if status == "pending"));
    assert!(matches!(
        stale.extend(&db, &lease).await.unwrap(),
        Outcome::Conflict(_)
    ));
    assert!(matches!(
        stale.release(&db, &lease).await.unwrap(),
        Outcome::Conflict(_)
    ));

    // The new holder extends, releases one (claimable at once, attempt counted), completes
    // the others.
    assert!(matches!(
        again[0].extend(&db, &lease).await.unwrap(),
        Outcome::Done(_)
    ));
    assert!(matches!(
        again[0].release(&db, &lease).await.unwrap(),
        Outcome::Done(_)
    ));
    let retried: Vec<Leased<Job>> = db.claim_and_mark(&claim, 5).await.unwrap();
    assert_eq!(retried.len(), 1);
    assert_eq!((retried[0].row.id, retried[0].attempt), (1, 3));
    for job in retried.iter().chain(&again[1..]) {
        let result = "ok";
        let done = job
            .complete(&db, &lease, "status = 'done', note = $1", &[&result])
            .await;
        // `note` does not exist: the caller's own SQL is the caller's error, and nothing changed.
        let err = done.map(|_| ()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Db, "{err}");
        let done = job
            .complete(&db, &lease, "status = $1", &[&"done"])
            .await
            .unwrap();
        assert!(matches!(done, Outcome::Done(_)), "{done:?}");
    }
    let left: i64 = observer
        .query_one(
            "SELECT count(*) FROM jobs WHERE status <> 'done' OR leased_until IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "every job done exactly once, no lease left");
}

#[tokio::test]
async fn a_claim_without_a_lease_cannot_hand_out_leases() {
    let (pg, db) = database(JOBS, 1).await;
    let claim = Claim::new()
        .order_by("id", Direction::Asc)
        .mark("status = 'running'", vec![]);
    let err = db
        .claim_and_mark::<Leased<Job>>(&claim, 1)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    let running: i64 = pg
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM jobs WHERE status <> 'pending'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(running, 0, "refused before anything was marked");
    let zero = Claim::new()
        .order_by("id", Direction::Asc)
        .lease(Lease::new(Duration::ZERO));
    let err = db
        .claim_and_mark::<Leased<Job>>(&zero, 1)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
}

/// A lease's errors speak of the lease, not of the transition or claim it is built on: the
/// step (`updating a lease`), a `complete` value by its place in the caller's `set`, and a
/// lease column the table lacks.
#[tokio::test]
async fn a_leases_errors_name_the_lease() {
    let (_pg, db) = database(JOBS, 1).await;
    let lease = Lease::new(Duration::from_secs(30));
    let jobs = db
        .claim_and_mark::<Leased<Job>>(&pending(&lease), 1)
        .await
        .unwrap();
    // An int for a text column, as `$1` of the caller's `set`.
    let err = jobs[0]
        .complete(&db, &lease, "status = $1", &[&7_i32])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    let shown = err.to_string();
    assert!(
        shown.contains("while updating a lease")
            && shown.contains("parameter $1 of complete's set has the wrong type"),
        "{shown}"
    );
    // Still held, and completed once the value fits.
    let done = jobs[0]
        .complete(&db, &lease, "status = $1", &[&"done"])
        .await
        .unwrap();
    assert_eq!(done.done().map(|j| j.status), Some("done".to_string()));

    let elsewhere = Lease::new(Duration::from_secs(30)).until_column("lease_ends");
    let err = db
        .claim_and_mark::<Leased<Job>>(&pending(&elsewhere), 1)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    let shown = err.to_string();
    assert!(
        shown.contains("the lease)") && shown.contains("lease_ends"),
        "{shown}"
    );
}
