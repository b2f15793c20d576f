//! Waiting for an observable lock state instead of sleeping and hoping.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::HarnessError;

const POLL: Duration = Duration::from_millis(5);

/// Waits until at least `count` sessions are blocked by the session with pid `holder`
/// (`holder = ANY(pg_blocking_pids(pid))`), and returns the blocked sessions' pids.
///
/// `observer` must be a connection that is not itself involved in the locks. Fails with
/// [`HarnessError::Timeout`] after `timeout`.
pub async fn wait_for_blocked_by(
    observer: &Client,
    holder: i32,
    count: usize,
    timeout: Duration,
) -> Result<Vec<i32>, HarnessError> {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = observer
            .query(
                "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)) \
                 ORDER BY pid",
                &[&holder],
            )
            .await
            .map_err(HarnessError::Sql)?;
        if rows.len() >= count {
            return Ok(rows.iter().map(|r| r.get(0)).collect());
        }
        if Instant::now() > deadline {
            return Err(HarnessError::Timeout(
                timeout,
                format!(
                    "{count} session(s) blocked by pid {holder} (saw {})",
                    rows.len()
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the session with pid `pid` is waiting for a lock
/// (`pg_stat_activity.wait_event_type = 'Lock'`), and returns the pids blocking it.
pub async fn wait_until_blocked(
    observer: &Client,
    pid: i32,
    timeout: Duration,
) -> Result<Vec<i32>, HarnessError> {
    let deadline = Instant::now() + timeout;
    loop {
        let row = observer
            .query_opt(
                "SELECT pg_blocking_pids(pid) FROM pg_stat_activity \
                 WHERE pid = $1 AND wait_event_type = 'Lock'",
                &[&pid],
            )
            .await
            .map_err(HarnessError::Sql)?;
        if let Some(row) = row {
            let blockers: Vec<i32> = row.get(0);
            if !blockers.is_empty() {
                return Ok(blockers);
            }
        }
        if Instant::now() > deadline {
            return Err(HarnessError::Timeout(
                timeout,
                format!("pid {pid} to wait for a lock"),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}
