//! Primary failover with real servers: a primary and a streaming standby started from the
//! installed binaries, the primary killed under load, the standby promoted, a multi-host db
//! that finds the new primary; connections to a standby never reused; commit outcomes never
//! guessed across servers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rowlock::Db;
use rowlock::assignment::{AssignmentError, accept_proposal, migrate};
use rowlock::tokio_postgres::error::SqlState;
use rowlock::{CommitStatus, ErrorKind, Lock, Outcome, RetryPolicy, TransactionOptions};
use rowlock_testing::{StopMode, TestCluster, TestDatabase};

use crate::assignment::{seed, violations};
use crate::faults::{Rng, until};
use crate::support::{Account, WAIT, backend_pid};

/// A primary (with PostgreSQL's default durability: a commit waits for its WAL) and a
/// streaming standby of it, on their own clusters; a database with the assignment schema and
/// an `accounts` table, replayed on the standby.
struct Pair {
    primary: Arc<TestCluster>,
    standby: Arc<TestCluster>,
    pg: TestDatabase,
}

async fn pair(synchronous: bool) -> Pair {
    let primary = tokio::task::spawn_blocking(|| {
        TestCluster::start_with(&[("synchronous_commit", "on"), ("fsync", "on")])
    })
    .await
    .unwrap()
    .expect("primary");
    let primary = Arc::new(primary);
    let p = primary.clone();
    let standby = tokio::task::spawn_blocking(move || p.start_standby(&[]))
        .await
        .unwrap()
        .expect("standby");
    let standby = Arc::new(standby);
    if synchronous {
        primary.set_synchronous_standby(true).await.unwrap();
        let admin = primary.admin_client().await.unwrap();
        until(WAIT, "the standby is synchronous", || async {
            admin
                .query_opt(
                    "SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync'",
                    &[],
                )
                .await
                .unwrap()
                .is_some()
        })
        .await;
    }
    let pg = primary.create_database_owned().await.unwrap();
    let db = pg.db(2);
    migrate(&db).await.unwrap();
    pg.client()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 8) g;
             CREATE TABLE acks (task int, seq int, PRIMARY KEY (task, seq));",
        )
        .await
        .unwrap();
    primary.wait_for_replay(&standby, WAIT).await.unwrap();
    Pair {
        primary,
        standby,
        pg,
    }
}

impl Pair {
    /// Both servers, primary first, with `target_session_attrs=read-write`: connections go to
    /// whichever accepts writes.
    fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?target_session_attrs=read-write&connect_timeout=2",
            self.primary.port().unwrap(),
            self.standby.port().unwrap(),
            self.pg.name()
        )
    }

    /// A db on the standby alone, as one made before a failover turned its server into a
    /// standby.
    fn standby_pool(&self, options: rowlock::Builder) -> Db {
        self.pool_on(&self.standby, options)
    }

    /// A db on one server of the pair, whatever its role.
    fn pool_on(&self, server: &TestCluster, options: rowlock::Builder) -> Db {
        let url = format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            server.port().unwrap(),
            self.pg.name()
        );
        options.config(url.parse().unwrap()).build().unwrap()
    }
}

#[tokio::test]
async fn a_connection_to_a_standby_is_never_reused() {
    let pair = pair(false).await;
    let db = pair.standby_pool(Db::builder().max_size(2));
    // Reads work on a standby, and the connection is pooled as usual.
    let first = backend_pid(&db).await;
    assert_eq!(backend_pid(&db).await, first, "pooled and reused");
    assert_eq!(db.pool().status().size, 1);

    // A lock is a write: refused (25006), classified, and the connection closed.
    let err = db
        .with_locked_row(&1_i64, &Lock::new(), |_, _: Account| {
            Box::pin(async { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly, "{err}");
    assert_eq!(err.sql_state(), Some(&SqlState::READ_ONLY_SQL_TRANSACTION));
    assert!(err.is_retryable());
    assert_eq!(db.pool().status().size, 0, "the connection did not go back");

    // The same from a write inside a transaction, and from a caller that swallowed it.
    let err = db
        .with_transaction(&TransactionOptions::new(), |tx| {
            Box::pin(async move {
                let _ = tx.execute("UPDATE accounts SET balance = 1", &[]).await;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.sql_state(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err}"
    );
    assert_eq!(db.pool().status().size, 0);

    // The retry helpers run it again on a new connection (here, the standby again).
    let policy = RetryPolicy::new()
        .max_attempts(3)
        .base_delay(Duration::from_millis(1));
    let err = db
        .with_transaction(TransactionOptions::new().retry(&policy), |tx| {
            Box::pin(async move {
                tx.execute("UPDATE accounts SET balance = 1", &[]).await?;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RetriesExhausted, "{err}");
    assert_eq!(err.attempts(), Some(3));
    assert_eq!(
        db.pool().status().size,
        0,
        "no attempt's connection went back"
    );
}

#[tokio::test]
async fn check_primary_refuses_a_pooled_standby_connection() {
    let pair = pair(false).await;
    let plain = pair.standby_pool(Db::builder().max_size(1));
    let p = backend_pid(&plain).await;
    assert_eq!(backend_pid(&plain).await, p, "without the check: reused");

    let checked = pair.standby_pool(Db::builder().max_size(1).check_primary(true));
    let first = backend_pid(&checked).await; // new: not checked
    let second = backend_pid(&checked).await; // pooled: checked, refused, replaced
    assert_ne!(
        first, second,
        "the pooled standby connection was not handed out"
    );

    // On the primary the check passes and connections are reused.
    let primary = Db::builder()
        .max_size(1)
        .check_primary(true)
        .config(pair.url().parse().unwrap())
        .build()
        .unwrap();
    let p = backend_pid(&primary).await;
    assert_eq!(backend_pid(&primary).await, p);
}

#[tokio::test]
async fn resolve_commit_asks_only_the_server_that_ran_the_transaction() {
    let pair = pair(false).await;
    let on_primary = pair.pg.db(2);
    let tracked = TransactionOptions::new().track_commit_outcome(true);
    let tx = on_primary.begin(&tracked).await.unwrap();
    tx.execute(
        "UPDATE accounts SET balance = balance + 1 WHERE id = 1",
        &[],
    )
    .await
    .unwrap();
    let reference = tx.transaction_ref().expect("recorded with BEGIN");
    tx.commit().await.unwrap();
    assert_eq!(
        on_primary.resolve_commit(&reference).await.unwrap(),
        CommitStatus::Committed
    );
    // An id this server never assigned is not a guess either.
    let future = rowlock::TransactionRef {
        id: reference.id + 1_000_000,
        ..reference
    };
    assert_eq!(
        on_primary.resolve_commit(&future).await.unwrap(),
        CommitStatus::Unknown
    );
    // Another system (the shared test cluster) is never asked.
    let elsewhere = TestCluster::shared()
        .unwrap()
        .create_database()
        .await
        .unwrap()
        .db(1);
    assert_eq!(
        elsewhere.resolve_commit(&reference).await.unwrap(),
        CommitStatus::ServerChanged
    );
    // The standby (same system, in recovery), then promoted (same system, new timeline).
    pair.primary
        .wait_for_replay(&pair.standby, WAIT)
        .await
        .unwrap();
    let standby = pair.standby_pool(Db::builder().max_size(1));
    assert_eq!(
        standby.resolve_commit(&reference).await.unwrap(),
        CommitStatus::ServerChanged
    );
    let p = pair.primary.clone();
    tokio::task::spawn_blocking(move || p.stop(StopMode::Immediate))
        .await
        .unwrap()
        .unwrap();
    pair.standby.promote().await.unwrap();
    assert_eq!(
        standby.resolve_commit(&reference).await.unwrap(),
        CommitStatus::ServerChanged,
        "a promoted standby is on a new timeline: it is not asked"
    );
}

/// What the load saw.
#[derive(Default)]
struct Seen {
    /// Error kinds, counted.
    kinds: BTreeMap<String, u64>,
    /// Accepts reported done: (proposal, when).
    accepted: Vec<(i64, Instant)>,
    /// Counter calls reported done: (task, seq, when).
    acked: Vec<(i32, i32, Instant)>,
}

/// 32 tasks of `accept_proposal` and a `with_locked_row` counter through a multi-host db;
/// the primary is killed (immediate shutdown) and the standby promoted. Prints how long after
/// the promotion calls succeeded again, and (asynchronous replication) how many acknowledged
/// commits were lost.
async fn failover_under_load(synchronous: bool) {
    let mode = if synchronous {
        "synchronous"
    } else {
        "asynchronous"
    };
    let pair = pair(synchronous).await;
    let (projects, per) = (2_000_i64, 3_i64);
    seed(&pair.pg.client().await.unwrap(), projects, per).await;
    let db = Db::builder()
        .max_size(32)
        .create_timeout(Duration::from_secs(3))
        .wait_timeout(Duration::from_secs(5))
        .config(pair.url().parse().unwrap())
        .build()
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let oks = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let tasks: Vec<_> = (0..32_i32)
        .map(|t| {
            let (db, stop, oks, seen) = (db.clone(), stop.clone(), oks.clone(), seen.clone());
            tokio::spawn(async move {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1).wrapping_mul(0x2545_F491));
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    let failure = if t % 2 == 0 {
                        let proposal = 1 + rng.below((projects * per) as u64) as i64;
                        match accept_proposal(&db, proposal, rowlock::LockMode::Wait).await {
                            Ok(()) => {
                                seen.lock()
                                    .unwrap()
                                    .accepted
                                    .push((proposal, Instant::now()));
                                None
                            }
                            Err(AssignmentError::Db(e)) => Some(e),
                            Err(_) => None, // already assigned, not pending: business as usual
                        }
                    } else {
                        seq += 1;
                        let account = i64::from(t % 8) + 1;
                        let done = db
                            .with_locked_row(&account, &Lock::new(), |tx, a: Account| {
                                Box::pin(async move {
                                    tx.execute(
                                        "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                                        &[&a.id],
                                    )
                                    .await?;
                                    tx.execute("INSERT INTO acks VALUES ($1, $2)", &[&t, &seq])
                                        .await?;
                                    Ok::<_, rowlock::Error>(())
                                })
                            })
                            .await;
                        match done {
                            Ok(Outcome::Done(())) => {
                                seen.lock().unwrap().acked.push((t, seq, Instant::now()));
                                None
                            }
                            Ok(other) => panic!("account {account}: {other:?}"),
                            Err(e) => Some(e),
                        }
                    };
                    match failure {
                        None => {
                            oks.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(e) => {
                            *seen
                                .lock()
                                .unwrap()
                                .kinds
                                .entry(format!("{:?}", e.kind()))
                                .or_default() += 1;
                            // Pace a caller facing a server that is down.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            })
        })
        .collect();

    until(WAIT, "calls succeed before the failover", || async {
        oks.load(Ordering::Relaxed) >= 200
    })
    .await;
    let p = pair.primary.clone();
    tokio::task::spawn_blocking(move || p.stop(StopMode::Immediate))
        .await
        .unwrap()
        .unwrap();
    let killed = Instant::now();
    // Calls fail while there is no primary.
    until(WAIT, "calls fail while there is no primary", || async {
        seen.lock().unwrap().kinds.values().sum::<u64>() >= 32
    })
    .await;
    pair.standby.promote().await.unwrap();
    let promoted = Instant::now();
    let oks_at_promotion = oks.load(Ordering::Relaxed);
    until(
        Duration::from_secs(30),
        "calls succeed on the new primary",
        || async { oks.load(Ordering::Relaxed) > oks_at_promotion },
    )
    .await;
    let recovered = promoted.elapsed();
    until(WAIT, "many calls succeed on the new primary", || async {
        oks.load(Ordering::Relaxed) >= oks_at_promotion + 200
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    // The data is in the test database, on the new primary.
    let mut config = pair.standby.config().clone();
    config.dbname(pair.pg.name());
    let (client, connection) = config
        .connect(rowlock::tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let accepted: BTreeSet<i64> = client
        .query("SELECT id FROM proposals WHERE status = 'accepted'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let acks: BTreeSet<(i32, i32)> = client
        .query("SELECT task, seq FROM acks", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let lost_accepts: Vec<_> = seen
        .accepted
        .iter()
        .filter(|(p, _)| !accepted.contains(p))
        .collect();
    let lost_acks: Vec<_> = seen
        .acked
        .iter()
        .filter(|(t, s, _)| !acks.contains(&(*t, *s)))
        .collect();
    let lost = lost_accepts.len() + lost_acks.len();
    eprintln!(
        "failover ({mode} replication): calls succeeded again {recovered:?} after the promotion \
         ({:?} after the primary was killed); {} calls reported done, {lost} of them lost; \
         errors by kind: {:?}",
        promoted.duration_since(killed) + recovered,
        seen.accepted.len() + seen.acked.len(),
        seen.kinds
    );
    // Every call reported done after the promotion ran on the new primary: it is there.
    assert!(
        lost_accepts.iter().all(|(_, at)| *at < promoted)
            && lost_acks.iter().all(|(_, _, at)| *at < promoted),
        "a call reported done on the new primary is missing"
    );
    if synchronous {
        assert_eq!(
            lost, 0,
            "synchronous replication loses no acknowledged commit"
        );
    }
    // Errors were those of a server going away and of one not yet promoted.
    for kind in seen.kinds.keys() {
        assert!(
            [
                "Closed",
                "Unreachable",
                "CommitOutcomeUnknown",
                "ReadOnly",
                "PoolTimeout",
                "Db"
            ]
            .contains(&kind.as_str()),
            "unexpected error kind during the failover: {kind}"
        );
    }
    assert_eq!(violations(&client).await, (0, 0), "invariant");
    assert!(recovered < Duration::from_secs(30));
}

#[tokio::test]
async fn failover_with_synchronous_replication_loses_no_acknowledged_commit() {
    failover_under_load(true).await;
}

#[tokio::test]
async fn failover_with_asynchronous_replication_reports_what_it_lost() {
    failover_under_load(false).await;
}

/// After a failover the old primary comes back as a standby of the new one, at its old
/// address: a db listing both hosts writes only to the new primary, and a db that still
/// points at the old address alone gets `ReadOnly` and never keeps those connections.
#[tokio::test]
async fn an_old_primary_back_as_a_standby_never_takes_a_write() {
    let pair = pair(false).await;
    let both = Db::builder()
        .max_size(4)
        .check_primary(true)
        .config(pair.url().parse().unwrap())
        .build()
        .unwrap();
    let old_address = pair.pool_on(&pair.primary, Db::builder().max_size(2));
    let bump = |db: Db| async move {
        db.with_locked_row(&1_i64, &Lock::new(), |tx, a: Account| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                    &[&a.id],
                )
                .await?;
                Ok::<_, rowlock::Error>(())
            })
        })
        .await
    };
    assert!(bump(both.clone()).await.unwrap().is_done());
    assert!(bump(old_address.clone()).await.unwrap().is_done());
    // Both writes are on the standby before the primary goes (asynchronous replication).
    pair.primary
        .wait_for_replay(&pair.standby, WAIT)
        .await
        .unwrap();

    let p = pair.primary.clone();
    tokio::task::spawn_blocking(move || p.stop(StopMode::Immediate))
        .await
        .unwrap()
        .unwrap();
    pair.standby.promote().await.unwrap();
    let (old, new) = (pair.primary.clone(), pair.standby.clone());
    tokio::task::spawn_blocking(move || old.rejoin_as_standby_of(&new))
        .await
        .unwrap()
        .expect("the old primary rejoins as a standby");

    // The db listing both hosts finds the new primary, past the old one (now read-only).
    for _ in 0..4 {
        assert!(bump(both.clone()).await.unwrap().is_done());
    }
    let port: i32 = both
        .pool()
        .get()
        .await
        .unwrap()
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        port,
        i32::from(pair.standby.port().unwrap()),
        "writes go to the new primary"
    );

    // The db still pointing at the old address reaches a standby: refused, never kept.
    let err = bump(old_address.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly, "{err}");
    assert_eq!(old_address.pool().status().size, 0);
    let balance = crate::support::balance(&both.pool().get().await.unwrap(), 1).await;
    assert_eq!(balance, 6, "two writes before the failover, four after");
}
