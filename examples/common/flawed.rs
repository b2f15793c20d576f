//! THE WRONG WAY — kept only to demonstrate the race. Do not copy.
//!
//! Read, check, write, without a lock: two managers can both read "open" before either
//! writes, and both accept. Shared by the `accept_race` example and the tests.

use rowlock::tokio_postgres::Client;

/// Phase 1 of the flawed accept: read the project and the proposal, no lock. Returns the
/// project id if the proposal looks acceptable (project open, proposal pending).
pub async fn read(
    client: &Client,
    proposal_id: i64,
) -> Result<Option<i64>, rowlock::tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT pr.project_id, p.status = 'open' AND pr.status = 'pending'
             FROM proposals pr JOIN projects p ON p.id = pr.project_id WHERE pr.id = $1",
            &[&proposal_id],
        )
        .await?;
    Ok(row.and_then(|r| r.get::<_, bool>(1).then(|| r.get(0))))
}

/// Phase 2 of the flawed accept: write, trusting what phase 1 saw.
pub async fn write(
    client: &Client,
    project_id: i64,
    proposal_id: i64,
) -> Result<(), rowlock::tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    let result = async {
        client
            .execute(
                "UPDATE projects SET status = 'assigned' WHERE id = $1",
                &[&project_id],
            )
            .await?;
        client
            .execute(
                "UPDATE proposals SET status = 'accepted' WHERE id = $1",
                &[&proposal_id],
            )
            .await?;
        client
            .execute(
                "UPDATE proposals SET status = 'rejected'
                 WHERE project_id = $1 AND id <> $2 AND status = 'pending'",
                &[&project_id, &proposal_id],
            )
            .await
    }
    .await;
    match result {
        Ok(_) => client.batch_execute("COMMIT").await,
        Err(e) => {
            client.batch_execute("ROLLBACK").await?;
            Err(e)
        }
    }
}

/// The whole flawed accept. Returns whether it (thinks it) accepted.
pub async fn accept(
    client: &Client,
    proposal_id: i64,
) -> Result<bool, rowlock::tokio_postgres::Error> {
    match read(client, proposal_id).await? {
        Some(project_id) => write(client, project_id, proposal_id).await.map(|()| true),
        None => Ok(false),
    }
}
