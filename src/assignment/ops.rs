//! The operations. Each is one transaction; SQL lives in the constants next to it.

use super::error::AssignmentError;
use super::model::{Project, ProjectDetails, ProjectStatus, Proposal, ProposalStatus};
use crate::{
    Db, Isolation, Lock, LockMode, LockStrength, Outcome, Transaction, TransactionOptions,
    Transition,
};

const MAX_TITLE: usize = 200;
const MAX_FREELANCER: usize = 100;

const INSERT_PROJECT: &str = "INSERT INTO projects (title) VALUES ($1) RETURNING *";
const INSERT_PROPOSAL: &str = "INSERT INTO proposals (project_id, freelancer) VALUES ($1, $2) \
                               ON CONFLICT (project_id, freelancer) DO NOTHING RETURNING *";
const FIND_PROPOSAL: &str = "SELECT project_id, status FROM proposals WHERE id = $1";
const PROPOSAL_STATUS: &str = "SELECT status FROM proposals WHERE id = $1";
const WITHDRAW: &str = "UPDATE proposals SET status = 'withdrawn', updated_at = now() \
                        WHERE id = $1 AND status = 'pending'";
const ACCEPT: &str = "UPDATE proposals SET status = 'accepted', updated_at = now() \
                      WHERE id = $1 AND status = 'pending'";
const ASSIGN: &str = "UPDATE projects SET status = 'assigned', updated_at = now() WHERE id = $1";
const REJECT_OTHERS: &str = "UPDATE proposals SET status = 'rejected', updated_at = now() \
                             WHERE project_id = $1 AND id <> $2 AND status = 'pending'";
const SELECT_PROJECT: &str = "SELECT * FROM projects WHERE id = $1";
const SELECT_PROPOSALS: &str = "SELECT * FROM proposals WHERE project_id = $1 ORDER BY id";

/// Trims `value` and checks it is 1..=`max` characters with no NUL.
fn text(what: &str, value: &str, max: usize) -> Result<String, AssignmentError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(AssignmentError::InvalidInput(format!("{what} is empty")));
    }
    if value.chars().count() > max {
        return Err(AssignmentError::InvalidInput(format!(
            "{what} is longer than {max} characters"
        )));
    }
    if value.contains('\0') {
        return Err(AssignmentError::InvalidInput(format!(
            "{what} contains a NUL character"
        )));
    }
    Ok(value.to_string())
}

/// Posts a project (open). The title is trimmed and must be 1 to 200 characters.
pub async fn create_project(db: &Db, title: &str) -> Result<Project, AssignmentError> {
    let title = text("title", title, MAX_TITLE)?;
    db.with_transaction(TransactionOptions::new(), |tx| {
        let title = &title;
        Box::pin(async move {
            let row = tx.query_one(INSERT_PROJECT, &[title]).await?;
            Ok(crate::LockableRow::from_row(&row).map_err(crate::Error::decode)?)
        })
    })
    .await
}

/// Submits `freelancer`'s proposal to an open project.
///
/// Holds the project `FOR SHARE` while checking it is open and inserting, so it cannot slip in
/// while an accept is assigning the project (that accept holds `FOR NO KEY UPDATE`, which
/// conflicts): a proposal is never left pending on an assigned project.
pub async fn submit_proposal(
    db: &Db,
    project_id: i64,
    freelancer: &str,
) -> Result<Proposal, AssignmentError> {
    let freelancer = text("freelancer", freelancer, MAX_FREELANCER)?;
    let share = Lock::new().strength(LockStrength::Share);
    let outcome = db
        .with_locked_row(&project_id, share, |tx, project: Project| {
            // The closure runs again on a retry (the handle may have a policy): each attempt
            // gets its own copy.
            let freelancer = freelancer.clone();
            Box::pin(async move {
                if project.status != ProjectStatus::Open {
                    return Err(AssignmentError::ProjectNotOpen(project.id));
                }
                match tx
                    .query_opt(INSERT_PROPOSAL, &[&project.id, &freelancer])
                    .await?
                {
                    Some(row) => Ok(Proposal::from_row(&row).map_err(crate::Error::decode)?),
                    None => Err(AssignmentError::DuplicateProposal {
                        project_id: project.id,
                        freelancer,
                    }),
                }
            })
        })
        .await?;
    match outcome {
        Outcome::Done(proposal) => Ok(proposal),
        _ => Err(AssignmentError::ProjectNotFound(project_id)),
    }
}

/// Withdraws a pending proposal. Races with [`accept_proposal`] end in exactly one winner:
/// both change the proposal only while it is pending.
pub async fn withdraw_proposal(db: &Db, proposal_id: i64) -> Result<(), AssignmentError> {
    db.with_transaction(TransactionOptions::new(), |tx| {
        Box::pin(async move {
            if tx.execute(WITHDRAW, &[&proposal_id]).await? == 1 {
                return Ok(());
            }
            Err(not_pending(tx, proposal_id).await)
        })
    })
    .await
}

/// Why a conditional update of a proposal changed nothing: it does not exist, or it is no
/// longer pending.
async fn not_pending(tx: &Transaction, proposal_id: i64) -> AssignmentError {
    match tx.query_opt(PROPOSAL_STATUS, &[&proposal_id]).await {
        Ok(Some(row)) => AssignmentError::NotPending {
            id: proposal_id,
            status: row.get(0),
        },
        Ok(None) => AssignmentError::ProposalNotFound(proposal_id),
        Err(e) => e.into(),
    }
}

/// Accepts a proposal: locks its project and then the proposal, checks the project is open
/// and the proposal pending, then assigns the project, accepts the proposal and rejects every
/// other pending proposal, in one transaction of two round trips (`BEGIN` with the locking
/// query, then the writes with `COMMIT`).
///
/// `options` gives the mode, the lock timeout and the retry policy (a [`LockMode`] alone
/// will do); the strength is always `NO KEY UPDATE`. With [`LockMode::Wait`] a concurrent
/// accept on the same project waits and then gets [`AssignmentError::AlreadyAssigned`]; with
/// [`LockMode::NoWait`] (and [`LockMode::SkipLocked`], which acts like it here) it gets
/// [`AssignmentError::Busy`] at once, as it does when a withdrawal of the same proposal is in
/// flight.
pub async fn accept_proposal(
    db: &Db,
    proposal_id: i64,
    options: impl Into<Lock>,
) -> Result<(), AssignmentError> {
    let options = options.into();
    // The lock timeout travels with BEGIN; the locking query says whether to wait.
    let lock = match options.mode {
        LockMode::Wait => LOCK_FOR_ACCEPT,
        LockMode::NoWait | LockMode::SkipLocked => LOCK_FOR_ACCEPT_NOWAIT,
    };
    db.with_transaction(options.transaction, |tx| {
        Box::pin(async move { accept_in(tx, proposal_id, lock).await })
    })
    .await
}

/// Locks the project reached through the proposal, then the proposal (the order of the
/// `FOR … OF` list and of the join: always the project first, as every accept does, so
/// concurrent accepts cannot deadlock), and reads both rows' latest states.
const LOCK_FOR_ACCEPT: &str = "SELECT pj.id, pj.status, pr.status FROM projects pj \
    JOIN proposals pr ON pr.project_id = pj.id WHERE pr.id = $1 \
    FOR NO KEY UPDATE OF pj, pr";
const LOCK_FOR_ACCEPT_NOWAIT: &str = "SELECT pj.id, pj.status, pr.status FROM projects pj \
    JOIN proposals pr ON pr.project_id = pj.id WHERE pr.id = $1 \
    FOR NO KEY UPDATE OF pj, pr NOWAIT";

/// Two round trips: `BEGIN` with the locking query, then the writes with `COMMIT`.
async fn accept_in(tx: &Transaction, proposal_id: i64, lock: &str) -> Result<(), AssignmentError> {
    // Both rows are locked: nothing read here can change before the commit.
    let stmt = tx.prepare_cached(lock).await?;
    let row = tx
        .query_opt(&stmt, &[&proposal_id])
        .await?
        .ok_or(AssignmentError::ProposalNotFound(proposal_id))?;
    let decode = crate::Error::decode;
    let project_id: i64 = row.try_get(0).map_err(decode)?;
    let project: ProjectStatus = row.try_get(1).map_err(decode)?;
    let status: ProposalStatus = row.try_get(2).map_err(decode)?;
    if project != ProjectStatus::Open {
        return Err(AssignmentError::AlreadyAssigned(project_id));
    }
    if status != ProposalStatus::Pending {
        return Err(AssignmentError::NotPending {
            id: proposal_id,
            status,
        });
    }
    // The rest needs no answer: send it with COMMIT. The rejection runs after the lock, with
    // a new snapshot, so it also sees proposals submitted just before the lock was granted.
    let assign = tx.prepare_cached(ASSIGN).await?;
    let accept = tx.prepare_cached(ACCEPT).await?;
    let reject = tx.prepare_cached(REJECT_OTHERS).await?;
    tx.execute_on_commit(&assign, &[&project_id]).await?;
    tx.execute_on_commit(&accept, &[&proposal_id]).await?;
    tx.execute_on_commit(&reject, &[&project_id, &proposal_id])
        .await?;
    Ok(())
}

/// The accept as one statement (see [`accept_proposal_in_one_statement`]): the project
/// changes only while open, and only if the proposal (locked after the project) is one of its
/// pending ones; the accept and the rejections ride with it.
fn accept_transition() -> Transition {
    Transition::new("status = 'assigned', updated_at = now()")
        .when("status = 'open'")
        .guard(
            "SELECT 1 FROM proposals p WHERE p.id = $1 AND p.project_id = target.id \
             AND p.status = 'pending' FOR UPDATE OF p",
        )
        .then(
            "UPDATE proposals SET status = 'accepted', updated_at = now() FROM changed \
             WHERE proposals.id = $1",
        )
        .then(
            "UPDATE proposals SET status = 'rejected', updated_at = now() FROM changed \
             WHERE proposals.project_id = changed.id AND proposals.id <> $1 \
             AND proposals.status = 'pending'",
        )
}

/// [`accept_proposal`] as one statement, a [`Transition`] of the project: one round trip, no
/// lock held across the network, so a manager's slow connection never holds up the others.
/// The caller names the project too (as in `POST /projects/{project}/proposals/{id}/accept`);
/// a proposal of another project is [`AssignmentError::ProposalNotFound`].
///
/// The same outcomes as [`accept_proposal`] with [`LockMode::Wait`]: of concurrent accepts
/// on one project exactly one wins and the others get [`AssignmentError::AlreadyAssigned`];
/// an accept racing a withdrawal of the same proposal either wins (the withdrawal then sees
/// `NotPending`) or gets [`AssignmentError::NotPending`]. Failure outcomes cost a second
/// round trip to say which proposal state stopped it. With a lock timeout on the handle
/// ([`Builder::lock_timeout`](crate::Builder::lock_timeout)), a project another transaction
/// holds longer is [`AssignmentError::LockTimeout`], and nothing was written.
///
/// One difference, from the single statement's single snapshot: a proposal submitted while
/// this statement waits for the project's lock (the submission commits just before the
/// accept) is not rejected with the others; it stays `pending` on the assigned project, and
/// accepting it later fails with `AlreadyAssigned`. [`accept_proposal`] rejects it, since its
/// rejection runs after the lock with a new snapshot.
pub async fn accept_proposal_in_one_statement(
    db: &Db,
    project_id: i64,
    proposal_id: i64,
) -> Result<(), AssignmentError> {
    let accept = accept_transition();
    match db
        .transition::<Project>(&project_id, &accept, &[&proposal_id])
        .await?
    {
        Outcome::Done(_) => Ok(()),
        Outcome::Conflict(project) if project.status != ProjectStatus::Open => {
            Err(AssignmentError::AlreadyAssigned(project_id))
        }
        // Open, so the guard stopped it: say what is wrong with the proposal.
        Outcome::Conflict(_) => {
            let read = TransactionOptions::new().read_only(true);
            let found = db
                .with_transaction(read, |tx| {
                    Box::pin(async move { tx.query_opt(FIND_PROPOSAL, &[&proposal_id]).await })
                })
                .await?;
            match found {
                Some(row) if row.get::<_, i64>(0) == project_id => {
                    Err(AssignmentError::NotPending {
                        id: proposal_id,
                        status: row.get(1),
                    })
                }
                _ => Err(AssignmentError::ProposalNotFound(proposal_id)),
            }
        }
        Outcome::NotFound(_) => Err(AssignmentError::ProjectNotFound(project_id)),
        // The handle's lock timeout ended the wait for the project: as `accept_proposal`
        // reports it.
        Outcome::LockTimeout(e) | Outcome::LockNotAvailable(e) => Err(e.into()),
        // A transition does not skip rows; should one, the project was not there to accept.
        Outcome::Skipped(_) => Err(AssignmentError::ProjectNotFound(project_id)),
    }
}

/// A project and its proposals, read from one snapshot.
pub async fn project_details(db: &Db, project_id: i64) -> Result<ProjectDetails, AssignmentError> {
    let snapshot = TransactionOptions::new()
        .isolation(Isolation::RepeatableRead)
        .read_only(true);
    db.with_transaction(snapshot, |tx| {
        Box::pin(async move {
            let (project, proposals) = futures_util::future::join(
                tx.query_opt(SELECT_PROJECT, &[&project_id]),
                tx.query(SELECT_PROPOSALS, &[&project_id]),
            )
            .await;
            let project = project?.ok_or(AssignmentError::ProjectNotFound(project_id))?;
            let decode = crate::Error::decode;
            Ok(ProjectDetails {
                project: crate::LockableRow::from_row(&project).map_err(decode)?,
                proposals: proposals?
                    .iter()
                    .map(Proposal::from_row)
                    .collect::<Result<_, _>>()
                    .map_err(decode)?,
            })
        })
    })
    .await
}
