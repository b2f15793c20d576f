//! Every LockMode × requested LockStrength against a second session holding each strength:
//! blocks, fails, skips or proceeds exactly as PostgreSQL's conflict table says.

use rowlock::{Lock, LockMode, LockStrength, Outcome};
use rowlock_testing::wait_for_blocked_by;

use crate::support::{Account, WAIT, accounts};

fn sql_strength(s: LockStrength) -> &'static str {
    match s {
        LockStrength::Update => "UPDATE",
        LockStrength::NoKeyUpdate => "NO KEY UPDATE",
        LockStrength::Share => "SHARE",
        LockStrength::KeyShare => "KEY SHARE",
    }
}

/// PostgreSQL's documented table, written out independently of `conflicts_with`.
fn documented_conflict(requested: LockStrength, held: LockStrength) -> bool {
    use LockStrength::*;
    let row = |s| match s {
        KeyShare => 0,
        Share => 1,
        NoKeyUpdate => 2,
        Update => 3,
    };
    const TABLE: [[bool; 4]; 4] = [
        // held: KEY SHARE, SHARE, NO KEY UPDATE, UPDATE
        [false, false, false, true], // requested KEY SHARE
        [false, false, true, true],  // SHARE
        [false, true, true, true],   // NO KEY UPDATE
        [true, true, true, true],    // UPDATE
    ];
    TABLE[row(requested)][row(held)]
}

#[tokio::test]
async fn every_mode_and_strength_against_every_held_strength() {
    let (pg, db) = accounts(1).await;
    let observer = pg.client().await.unwrap();
    let mut checked = 0;
    for &held in LockStrength::ALL {
        for &requested in LockStrength::ALL {
            let conflict = documented_conflict(requested, held);
            assert_eq!(requested.conflicts_with(held), conflict);
            for mode in [LockMode::Wait, LockMode::NoWait, LockMode::SkipLocked] {
                let case = format!("held {held:?}, requested {requested:?}, {mode:?}");
                let holder = pg.session().await.unwrap();
                holder
                    .batch_execute(&format!(
                        "BEGIN; SELECT * FROM accounts WHERE id = 1 FOR {}",
                        sql_strength(held)
                    ))
                    .await
                    .unwrap();
                // The lock timeout only turns a wrong wait into a failure instead of a hang.
                let opts = Lock::new()
                    .mode(mode)
                    .strength(requested)
                    .lock_timeout(WAIT);
                let call = {
                    let db = db.clone();
                    tokio::spawn(async move {
                        db.with_locked_row(&1, &opts, |_, acc: Account| {
                            Box::pin(async move { Ok::<_, rowlock::Error>(acc.id) })
                        })
                        .await
                    })
                };
                if conflict && mode == LockMode::Wait {
                    wait_for_blocked_by(&observer, holder.pid(), 1, WAIT)
                        .await
                        .unwrap_or_else(|e| panic!("{case}: expected to block: {e}"));
                    assert!(!call.is_finished(), "{case}");
                    holder.batch_execute("COMMIT").await.unwrap();
                    let outcome = call.await.unwrap().unwrap();
                    assert!(matches!(outcome, Outcome::Done(1)), "{case}: {outcome:?}");
                } else {
                    // Must complete while the holder still holds its lock.
                    let outcome = call.await.unwrap().unwrap();
                    match (conflict, mode) {
                        (false, _) => {
                            assert!(matches!(outcome, Outcome::Done(1)), "{case}: {outcome:?}")
                        }
                        (true, LockMode::NoWait) => assert!(
                            matches!(&outcome, Outcome::LockNotAvailable(e) if e.is_lock_not_available()),
                            "{case}: {outcome:?}"
                        ),
                        (true, _) => {
                            assert!(
                                matches!(outcome, Outcome::Skipped(_)),
                                "{case}: {outcome:?}"
                            )
                        }
                    }
                    holder.batch_execute("COMMIT").await.unwrap();
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 48);
}
