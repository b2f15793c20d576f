//! The reference workflow: accept exactly one proposal, under races.

use std::sync::Arc;
use std::time::Duration;

use rowlock::Db;
use rowlock::assignment::{
    AssignmentError, ONE_ACCEPTED_INDEX, ProjectStatus, ProposalStatus, accept_proposal,
    accept_proposal_in_one_statement, create_project, migrate, project_details, submit_proposal,
    withdraw_proposal,
};
use rowlock::tokio_postgres::Client;
use rowlock::{Lock, LockMode, RetryPolicy};
use rowlock_testing::{TestCluster, TestDatabase, wait_for_blocked_by};

use crate::support::WAIT;

#[path = "../../examples/common/flawed.rs"]
mod flawed;

async fn setup(pool_size: usize) -> (TestDatabase, Db) {
    let pg = TestCluster::shared()
        .unwrap()
        .create_database()
        .await
        .unwrap();
    let db = pg.db(pool_size);
    migrate(&db).await.unwrap();
    (pg, db)
}

/// `projects` open projects with `per` pending proposals each: project p has proposals
/// (p-1)*per+1 ..= p*per.
pub(crate) async fn seed(client: &Client, projects: i64, per: i64) {
    client
        .execute(
            "INSERT INTO projects (title) SELECT 'project ' || g FROM generate_series(1, $1::int8) g",
            &[&projects],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO proposals (project_id, freelancer)
             SELECT p, 'freelancer ' || f FROM generate_series(1, $1::int8) p,
                                               generate_series(1, $2::int8) f ORDER BY p, f",
            &[&projects, &per],
        )
        .await
        .unwrap();
}

/// Counts of invariant violations: (assigned projects without exactly one accepted proposal
/// or with pending ones, open projects with an accepted proposal).
pub(crate) async fn violations(client: &Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT
               (SELECT count(*) FROM projects p WHERE p.status = 'assigned' AND (
                  (SELECT count(*) FROM proposals WHERE project_id = p.id AND status = 'accepted') <> 1
                  OR EXISTS (SELECT 1 FROM proposals WHERE project_id = p.id AND status = 'pending'))),
               (SELECT count(*) FROM projects p WHERE p.status = 'open' AND
                  EXISTS (SELECT 1 FROM proposals WHERE project_id = p.id AND status = 'accepted'))",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// (projects, proposals, proposals no longer pending).
async fn counts(c: &Client) -> (i64, i64, i64) {
    let row = c
        .query_one(
            "SELECT (SELECT count(*) FROM projects), (SELECT count(*) FROM proposals),
                    (SELECT count(*) FROM proposals WHERE status <> 'pending')",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

async fn accepted_count(client: &Client, project_id: i64) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM proposals WHERE project_id = $1 AND status = 'accepted'",
            &[&project_id],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn accept_assigns_the_project_and_rejects_the_others() {
    let (_db, db) = setup(4).await;
    let project = create_project(&db, "  Build a dashboard  ").await.unwrap();
    assert_eq!(project.title, "Build a dashboard");
    assert_eq!(project.status, ProjectStatus::Open);
    let mut ids = Vec::new();
    for who in ["ada", "grace", "linus"] {
        ids.push(submit_proposal(&db, project.id, who).await.unwrap().id);
    }
    accept_proposal(&db, ids[1], LockMode::Wait).await.unwrap();
    let details = project_details(&db, project.id).await.unwrap();
    assert_eq!(details.project.status, ProjectStatus::Assigned);
    let statuses: Vec<ProposalStatus> = details.proposals.iter().map(|p| p.status).collect();
    assert_eq!(
        statuses,
        [
            ProposalStatus::Rejected,
            ProposalStatus::Accepted,
            ProposalStatus::Rejected
        ]
    );
    // Idempotent migrations.
    migrate(&db).await.unwrap();
    let (a, b) = tokio::join!(migrate(&db), migrate(&db));
    a.unwrap();
    b.unwrap();
}

#[tokio::test]
async fn the_flawed_version_double_accepts_without_the_index_and_fails_with_it() {
    let (pg, _pool) = setup(2).await;
    let (a, b) = (pg.client().await.unwrap(), pg.client().await.unwrap());
    for with_index in [false, true] {
        a.batch_execute("TRUNCATE projects, proposals RESTART IDENTITY")
            .await
            .unwrap();
        if with_index {
            migrate(&pg.db(1)).await.unwrap();
        } else {
            a.batch_execute(&format!("DROP INDEX {ONE_ACCEPTED_INDEX}"))
                .await
                .unwrap();
        }
        seed(&a, 1, 2).await;
        // A has read the project as open and is about to write…
        let project = flawed::read(&a, 1)
            .await
            .unwrap()
            .expect("looks acceptable");
        // …while B accepts the other proposal, start to finish.
        assert!(flawed::accept(&b, 2).await.unwrap());
        let result = flawed::write(&a, project, 1).await;
        if with_index {
            let err = result.unwrap_err();
            assert_eq!(
                err.code(),
                Some(&rowlock::tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
            );
            assert_eq!(
                accepted_count(&a, 1).await,
                1,
                "the index kept the invariant"
            );
        } else {
            result.unwrap();
            assert_eq!(accepted_count(&a, 1).await, 2, "both managers won");
        }
    }
}

#[tokio::test]
async fn the_locked_version_makes_the_loser_wait_then_see_already_assigned() {
    let (pg, db) = setup(4).await;
    let a = pg.session().await.unwrap();
    seed(&a, 1, 2).await;
    // A holds the project lock, as accept_proposal does between its check and its writes.
    a.batch_execute("BEGIN; SELECT * FROM projects WHERE id = 1 FOR NO KEY UPDATE")
        .await
        .unwrap();
    let b = tokio::spawn({
        let db = db.clone();
        async move { accept_proposal(&db, 2, LockMode::Wait).await }
    });
    let observer = pg.client().await.unwrap();
    wait_for_blocked_by(&observer, a.pid(), 1, WAIT)
        .await
        .unwrap();
    assert!(!b.is_finished(), "B waits for A");
    a.batch_execute(
        "UPDATE projects SET status = 'assigned' WHERE id = 1;
         UPDATE proposals SET status = 'accepted' WHERE id = 1;
         UPDATE proposals SET status = 'rejected' WHERE project_id = 1 AND id <> 1;
         COMMIT",
    )
    .await
    .unwrap();
    let err = b.await.unwrap().unwrap_err();
    assert!(
        matches!(err, AssignmentError::AlreadyAssigned(1)),
        "{err:?}"
    );
    assert_eq!(accepted_count(&observer, 1).await, 1);

    // NoWait: told "busy" at once instead of waiting.
    let project = create_project(&db, "second").await.unwrap();
    let proposal = submit_proposal(&db, project.id, "ada").await.unwrap();
    a.batch_execute("BEGIN").await.unwrap();
    a.execute(
        "SELECT * FROM projects WHERE id = $1 FOR NO KEY UPDATE",
        &[&project.id],
    )
    .await
    .unwrap();
    let err = accept_proposal(&db, proposal.id, LockMode::NoWait)
        .await
        .unwrap_err();
    assert!(matches!(err, AssignmentError::Busy), "{err:?}");
    a.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn stress_many_managers_never_break_the_invariant() {
    let tasks = 64;
    let (projects, per) = (2_000_i64, 4_i64);
    let (pg, db) = setup(tasks + 4).await;
    let client = pg.client().await.unwrap();
    seed(&client, projects, per).await;
    let nowait = Arc::new(
        Lock::new()
            .mode(LockMode::NoWait)
            .retry(RetryPolicy::new().retry_lock_contention(true)),
    );
    let workers: Vec<_> = (0..tasks as u64)
        .map(|t| {
            let (db, nowait) = (db.clone(), nowait.clone());
            tokio::spawn(async move {
                let mut seed =
                    0xA5A5_5A5A_1234_5678_u64 ^ (t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let mut accepted = 0;
                for i in 0..60 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let proposal = (seed % (projects * per) as u64) as i64 + 1;
                    let result = if i % 2 == 0 {
                        accept_proposal(&db, proposal, LockMode::Wait).await
                    } else {
                        accept_proposal(&db, proposal, &*nowait).await
                    };
                    match result {
                        Ok(()) => accepted += 1,
                        Err(
                            AssignmentError::AlreadyAssigned(_)
                            | AssignmentError::NotPending { .. }
                            | AssignmentError::Busy,
                        ) => {}
                        Err(e) => panic!("unexpected failure: {e:?}"),
                    }
                }
                accepted
            })
        })
        .collect();
    let mut accepted = 0;
    for w in workers {
        accepted += w.await.unwrap();
    }
    assert_eq!(violations(&client).await, (0, 0));
    let assigned: i64 = client
        .query_one(
            "SELECT count(*) FROM projects WHERE status = 'assigned'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        assigned, accepted,
        "every reported success is one assigned project"
    );
}

#[tokio::test]
async fn accept_and_withdraw_racing_end_in_exactly_one_outcome() {
    let rounds = 200;
    let (pg, db) = setup(16).await;
    let client = pg.client().await.unwrap();
    seed(&client, rounds, 1).await;
    let races: Vec<_> = (1..=rounds)
        .map(|p| {
            let db = db.clone();
            tokio::spawn(async move {
                let (accept, withdraw) = tokio::join!(
                    accept_proposal(&db, p, LockMode::Wait),
                    withdraw_proposal(&db, p)
                );
                (p, accept.is_ok(), withdraw.is_ok(), accept, withdraw)
            })
        })
        .collect();
    let mut accepts = 0;
    for race in races {
        let (p, accepted, withdrawn, accept, withdraw) = race.await.unwrap();
        assert!(
            accepted != withdrawn,
            "project {p}: {accept:?} / {withdraw:?}"
        );
        let loser = if accepted {
            withdraw.unwrap_err()
        } else {
            accept.unwrap_err()
        };
        assert!(
            matches!(loser, AssignmentError::NotPending { .. }),
            "{loser:?}"
        );
        accepts += accepted as i64;
        let details = project_details(&db, p).await.unwrap();
        let expected = if accepted {
            (ProjectStatus::Assigned, ProposalStatus::Accepted)
        } else {
            (ProjectStatus::Open, ProposalStatus::Withdrawn)
        };
        assert_eq!(
            (details.project.status, details.proposals[0].status),
            expected
        );
    }
    assert_eq!(violations(&client).await, (0, 0));
    assert!(accepts <= rounds);
}

#[tokio::test]
async fn bad_input_gets_typed_errors_and_writes_nothing() {
    let (pg, db) = setup(4).await;
    let client = pg.client().await.unwrap();
    let project = create_project(&db, "p").await.unwrap();
    let mine = submit_proposal(&db, project.id, "ada").await.unwrap();
    let other = submit_proposal(&db, project.id, "grace").await.unwrap();
    let before = counts(&client).await;
    let long = "x".repeat(201);
    for title in ["", "   ", long.as_str(), "a\0b"] {
        let err = create_project(&db, title).await.unwrap_err();
        assert!(
            matches!(err, AssignmentError::InvalidInput(_)),
            "{title:?}: {err:?}"
        );
    }
    for name in ["", &"y".repeat(101)] {
        let err = submit_proposal(&db, project.id, name).await.unwrap_err();
        assert!(matches!(err, AssignmentError::InvalidInput(_)), "{err:?}");
    }
    let err = submit_proposal(&db, project.id, "ada").await.unwrap_err();
    assert!(
        matches!(err, AssignmentError::DuplicateProposal { .. }),
        "{err:?}"
    );
    let err = submit_proposal(&db, 9_999, "ada").await.unwrap_err();
    assert!(
        matches!(err, AssignmentError::ProjectNotFound(9_999)),
        "{err:?}"
    );
    let err = accept_proposal(&db, 9_999, LockMode::Wait)
        .await
        .unwrap_err();
    assert!(
        matches!(err, AssignmentError::ProposalNotFound(9_999)),
        "{err:?}"
    );
    let err = withdraw_proposal(&db, 9_999).await.unwrap_err();
    assert!(
        matches!(err, AssignmentError::ProposalNotFound(9_999)),
        "{err:?}"
    );
    let err = project_details(&db, 9_999).await.unwrap_err();
    assert!(
        matches!(err, AssignmentError::ProjectNotFound(9_999)),
        "{err:?}"
    );
    assert_eq!(counts(&client).await, before, "nothing was written");

    withdraw_proposal(&db, mine.id).await.unwrap();
    let err = accept_proposal(&db, mine.id, LockMode::Wait)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AssignmentError::NotPending {
                status: ProposalStatus::Withdrawn,
                ..
            }
        ),
        "{err:?}"
    );
    let err = withdraw_proposal(&db, mine.id).await.unwrap_err();
    assert!(matches!(err, AssignmentError::NotPending { .. }), "{err:?}");
    accept_proposal(&db, other.id, LockMode::Wait)
        .await
        .unwrap();
    let err = submit_proposal(&db, project.id, "linus").await.unwrap_err();
    assert!(matches!(err, AssignmentError::ProjectNotOpen(_)), "{err:?}");
    let timeout = Lock::new().lock_timeout(Duration::ZERO);
    let err = accept_proposal(&db, other.id, &timeout).await.unwrap_err();
    assert!(
        matches!(&err, AssignmentError::Db(e) if e.is_invalid_argument()),
        "{err:?}"
    );
    // Logged with `{e}`, the workflow's error says what failed.
    let said = err.to_string();
    assert!(
        said.starts_with("database failure: invalid argument"),
        "{said}"
    );
}

/// The one-statement accept under the same races: K managers per project at once (each on a
/// different proposal), and an accept racing a withdrawal of the same proposal.
#[tokio::test]
async fn the_one_statement_accept_keeps_the_invariant_under_races() {
    let (projects, per) = (150_i64, 4_i64);
    let (pg, db) = setup(16).await;
    let client = pg.client().await.unwrap();
    seed(&client, projects, per).await;
    let mut handles = Vec::new();
    for project in 1..=projects {
        for k in 0..per {
            let db = db.clone();
            let proposal = (project - 1) * per + k + 1;
            handles.push(tokio::spawn(async move {
                if k == 3 {
                    // The last proposal of each project is also being withdrawn.
                    let (accept, withdraw) = tokio::join!(
                        accept_proposal_in_one_statement(&db, project, proposal),
                        withdraw_proposal(&db, proposal)
                    );
                    assert!(
                        !(accept.is_ok() && withdraw.is_ok()),
                        "proposal {proposal} both accepted and withdrawn"
                    );
                    (project, accept)
                } else {
                    (
                        project,
                        accept_proposal_in_one_statement(&db, project, proposal).await,
                    )
                }
            }));
        }
    }
    let mut winners = vec![0; projects as usize + 1];
    for h in handles {
        let (project, result) = h.await.unwrap();
        match result {
            Ok(()) => winners[project as usize] += 1,
            Err(AssignmentError::AlreadyAssigned(p)) => assert_eq!(p, project),
            Err(AssignmentError::NotPending { .. }) => {}
            Err(e) => panic!("project {project}: {e:?}"),
        }
    }
    assert!(
        winners[1..].iter().all(|&w| w == 1),
        "every project has exactly one winning accept"
    );
    assert_eq!(violations(&client).await, (0, 0));
}

#[tokio::test]
async fn the_one_statement_accept_reports_typed_errors_and_writes_nothing() {
    let (pg, db) = setup(4).await;
    let client = pg.client().await.unwrap();
    let p = create_project(&db, "p").await.unwrap();
    let q = create_project(&db, "q").await.unwrap();
    let mine = submit_proposal(&db, p.id, "ada").await.unwrap();
    let other = submit_proposal(&db, p.id, "grace").await.unwrap();
    let elsewhere = submit_proposal(&db, q.id, "linus").await.unwrap();
    let before = counts(&client).await;
    for (project, proposal) in [(9_999, mine.id), (p.id, 9_999), (p.id, elsewhere.id)] {
        let err = accept_proposal_in_one_statement(&db, project, proposal)
            .await
            .unwrap_err();
        let expected = if project == 9_999 {
            matches!(err, AssignmentError::ProjectNotFound(9_999))
        } else {
            matches!(err, AssignmentError::ProposalNotFound(id) if id == proposal)
        };
        assert!(expected, "({project}, {proposal}): {err:?}");
    }
    assert_eq!(counts(&client).await, before, "nothing was written");
    withdraw_proposal(&db, mine.id).await.unwrap();
    let err = accept_proposal_in_one_statement(&db, p.id, mine.id)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AssignmentError::NotPending {
                status: ProposalStatus::Withdrawn,
                ..
            }
        ),
        "{err:?}"
    );
    accept_proposal_in_one_statement(&db, p.id, other.id)
        .await
        .unwrap();
    let details = project_details(&db, p.id).await.unwrap();
    assert_eq!(details.project.status, ProjectStatus::Assigned);
    let err = accept_proposal_in_one_statement(&db, p.id, other.id)
        .await
        .unwrap_err();
    assert!(
        matches!(err, AssignmentError::AlreadyAssigned(_)),
        "{err:?}"
    );
    assert_eq!(violations(&client).await, (0, 0));
}

/// With a lock timeout on the handle, the one-statement accept of a project another session
/// holds is `AssignmentError::LockTimeout`, as the locking accept reports it, and writes
/// nothing (the transition's `Outcome::LockTimeout` must not read as "no such project").
#[tokio::test]
async fn the_one_statement_accept_reports_the_handles_lock_timeout() {
    let (pg, _) = setup(1).await;
    let db = pg
        .db_with(
            Db::builder()
                .max_size(2)
                .lock_timeout(Duration::from_millis(100)),
        )
        .unwrap();
    let p = create_project(&db, "p").await.unwrap();
    let mine = submit_proposal(&db, p.id, "ada").await.unwrap();
    let holder = pg.client().await.unwrap();
    holder.execute("BEGIN", &[]).await.unwrap();
    holder
        .execute("SELECT 1 FROM projects WHERE id = $1 FOR UPDATE", &[&p.id])
        .await
        .unwrap();
    let client = pg.client().await.unwrap();
    let before = counts(&client).await;
    let err = tokio::time::timeout(WAIT, accept_proposal_in_one_statement(&db, p.id, mine.id))
        .await
        .expect("the lock timeout ends the wait, not the holder")
        .unwrap_err();
    assert!(matches!(err, AssignmentError::LockTimeout), "{err:?}");
    let locked = tokio::time::timeout(WAIT, accept_proposal(&db, mine.id, LockMode::Wait))
        .await
        .expect("the lock timeout ends the wait, not the holder")
        .unwrap_err();
    assert!(matches!(locked, AssignmentError::LockTimeout), "{locked:?}");
    holder.execute("ROLLBACK", &[]).await.unwrap();
    assert_eq!(counts(&client).await, before, "nothing was written");
    accept_proposal_in_one_statement(&db, p.id, mine.id)
        .await
        .unwrap();
}
