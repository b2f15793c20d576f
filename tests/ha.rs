//! High availability on the stack teams run: etcd, two Patroni nodes with synchronous
//! replication, HAProxy routing one address to the primary (and PgBouncer in front of it),
//! started by `rowlock_testing::HaStack`. 16 tasks run lock, transition and claim calls
//! through the one address while the primary changes three ways: a planned switchover
//! (`patronictl switchover`), an unplanned failover (the primary's node killed), and the old
//! primary rejoining as a standby. Each phase prints its figures (they are in the guide's
//! high-availability chapter) and asserts what must hold: calls succeed again soon after a
//! hand-written client can write (it runs beside them as a baseline), no
//! acknowledged commit is lost, no call outlives its timeouts, commit-unknown outcomes are
//! resolved as documented, and no write reaches the rejoined node.
//!
//! Without `patroni`, `etcd` or `haproxy` installed the tests print why and pass; CI installs
//! them and sets `ROWLOCK_TEST_HA=require`, which turns a missing package into a failure.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rowlock::tokio_postgres::NoTls;
use rowlock::{
    Claim, CommitStatus, Db, Direction, ErrorKind, Lock, LockableRow, Outcome, RetryPolicy,
    StatementCache, TransactionOptions, TransactionRef, Transition,
};
use rowlock_testing::{HaStack, HarnessError};

/// One stack at a time: two of them on two cores would make Patroni's timing flaky.
static ONE_STACK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TASKS: i32 = 16;
/// Tickets per task, for transitions (each call takes a fresh one).
const TICKETS: i64 = 20_000;

#[derive(LockableRow, Debug)]
#[rowlock(table = "accounts", key = "id")]
struct Account {
    id: i64,
    balance: i64,
}

#[derive(LockableRow, Debug)]
#[rowlock(table = "tickets", key = "id")]
struct Ticket {
    id: i64,
    status: String,
    owner: Option<i32>,
}

#[derive(LockableRow, Debug)]
#[rowlock(table = "jobs", key = "id")]
struct Job {
    id: i64,
    status: String,
    worker: Option<i32>,
}

const SCHEMA: &str = "
    CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
    INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 8) g;
    CREATE TABLE acks (task int, seq int, port int NOT NULL, PRIMARY KEY (task, seq));
    CREATE TABLE tickets (id bigint PRIMARY KEY, status text NOT NULL, owner int);
    INSERT INTO tickets SELECT g, 'open', NULL FROM generate_series(1, 16 * 20000) g;
    CREATE TABLE jobs (id bigint PRIMARY KEY, status text NOT NULL, worker int);
    INSERT INTO jobs SELECT g, 'pending', NULL FROM generate_series(1, 200000) g;
    CREATE INDEX jobs_pending ON jobs (id) WHERE status = 'pending';
    CREATE TABLE probes (at timestamptz NOT NULL);";

/// The handle settings the guide recommends for this stack (with the test stack's timing).
fn handle(stack: &HaStack, pgbouncer: bool) -> Db {
    let retry = RetryPolicy::new()
        .max_attempts(1_000)
        .base_delay(Duration::from_millis(50))
        .max_delay(MAX_DELAY)
        .deadline(deadline(stack));
    let mut builder = Db::builder()
        .url(&stack.url("app"))
        .max_size(TASKS as usize)
        .wait_timeout(Duration::from_secs(5))
        .create_timeout(CREATE_TIMEOUT)
        .statement_timeout(Duration::from_secs(5))
        .lock_timeout(Duration::from_secs(2))
        .retry(retry);
    if pgbouncer {
        builder = builder.statement_cache(StatementCache::Transaction);
    }
    builder.build().unwrap()
}

/// The handle's retry deadline: an unplanned failover must end within it. It takes Patroni's
/// `ttl`, one `loop_wait`, the promotion and one HAProxy check (11.5 s with the test timing,
/// 15 s seen on a loaded machine); three times the `ttl` leaves room for a slow machine.
fn deadline(stack: &HaStack) -> Duration {
    stack.timing().ttl * 3
}

/// The retry policy's longest pause between two attempts.
const MAX_DELAY: Duration = Duration::from_secs(1);
/// The pool's `create_timeout` (a connection HAProxy accepted with no server behind it).
const CREATE_TIMEOUT: Duration = Duration::from_secs(3);

/// The longest a call may take: the retry deadline, plus one last attempt bounded by the
/// pool's wait and create timeouts and the statement timeout, plus scheduling slack.
fn call_bound(stack: &HaStack) -> Duration {
    deadline(stack) + Duration::from_secs(5 + 3 + 5 + 2)
}

/// How much later than a hand-written client rowlock's calls may first succeed on a new
/// primary: one connection attempt that HAProxy accepted before the node was up (the pool's
/// `create_timeout`), one pause of the retry policy, and scheduling slack.
const RESUME_SLACK: Duration = Duration::from_secs(3 + 1 + 2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Lock,
    Transition,
    Claim,
}

/// What a call that succeeded committed.
#[derive(Debug)]
enum Done {
    /// A locked counter: the ack row `(task, seq)`, written on the server at `port`.
    Ack { task: i32, seq: i32, port: i32 },
    /// A ticket taken by the task.
    Ticket { task: i32, id: i64 },
    /// Jobs claimed and marked by the task.
    Jobs { task: i32, ids: Vec<i64> },
}

/// A call that failed with `CommitOutcomeUnknown`: what it may have committed.
#[derive(Debug)]
enum Unknown {
    Ack {
        task: i32,
        seq: i32,
        tx: Option<TransactionRef>,
    },
    Ticket {
        id: i64,
    },
    Jobs,
}

#[derive(Debug)]
struct Call {
    op: Op,
    start: Instant,
    end: Instant,
    result: Result<Done, ErrorKind>,
}

#[derive(Default)]
struct Log {
    calls: Vec<Call>,
    unknown: Vec<Unknown>,
}

/// 16 tasks (lock, transition and claim calls, a third each) through the one address until
/// `stop` is set.
fn spawn_load(
    db: &Db,
    stop: &Arc<AtomicBool>,
    log: &Arc<Mutex<Log>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..TASKS)
        .map(|task| {
            let (db, stop, log) = (db.clone(), stop.clone(), log.clone());
            tokio::spawn(async move {
                let mut seq = 0_i32;
                let tracked =
                    Lock::new().transaction(TransactionOptions::new().track_commit_outcome(true));
                let take = Transition::new("status = 'taken', owner = $1").when("status = 'open'");
                let claim = Claim::new()
                    .where_sql("status = 'pending'", vec![])
                    .order_by("id", Direction::Asc)
                    .mark("status = 'done', worker = $1", vec![Box::new(task)]);
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let op = [Op::Lock, Op::Transition, Op::Claim][(task % 3) as usize];
                    let start = Instant::now();
                    let (result, unknown) = match op {
                        Op::Lock => {
                            let account = i64::from(task % 8) + 1;
                            let r = db
                                .with_locked_row(&account, &tracked, |tx, a: Account| {
                                    Box::pin(async move {
                                        assert!(a.balance >= 0);
                                        let port: i32 = tx
                                            .query_one(
                                                "UPDATE accounts SET balance = balance + 1 \
                                                 WHERE id = $1 RETURNING inet_server_port()",
                                                &[&a.id],
                                            )
                                            .await?
                                            .get(0);
                                        tx.execute(
                                            "INSERT INTO acks VALUES ($1, $2, $3)",
                                            &[&task, &seq, &port],
                                        )
                                        .await?;
                                        Ok::<_, rowlock::Error>(port)
                                    })
                                })
                                .await;
                            match r {
                                Ok(Outcome::Done(port)) => {
                                    (Ok(Done::Ack { task, seq, port }), None)
                                }
                                Ok(other) => panic!("account {account}: {other}"),
                                Err(e) => {
                                    let tx = e.transaction();
                                    (Err(e), Some(Unknown::Ack { task, seq, tx }))
                                }
                            }
                        }
                        Op::Transition => {
                            let id = i64::from(task) * TICKETS + i64::from(seq);
                            match db.transition::<Ticket>(&id, &take, &[&task]).await {
                                Ok(Outcome::Done(t)) => {
                                    assert_eq!((t.status.as_str(), t.owner), ("taken", Some(task)));
                                    (Ok(Done::Ticket { task, id }), None)
                                }
                                Ok(other) => panic!("ticket {id}: {other}"),
                                Err(e) => (Err(e), Some(Unknown::Ticket { id })),
                            }
                        }
                        Op::Claim => match db.claim_and_mark::<Job>(&claim, 3).await {
                            Ok(jobs) => {
                                assert!(
                                    jobs.iter()
                                        .all(|j| j.status == "done" && j.worker == Some(task))
                                );
                                let ids = jobs.iter().map(|j| j.id).collect();
                                (Ok(Done::Jobs { task, ids }), None)
                            }
                            Err(e) => (Err(e), Some(Unknown::Jobs)),
                        },
                    };
                    let failed = result.is_err();
                    let result = result.map_err(|e| {
                        if e.kind() != ErrorKind::CommitOutcomeUnknown {
                            eprintln!("{op:?} failed: {e}");
                        }
                        e.kind()
                    });
                    {
                        let mut log = log.lock().unwrap();
                        if matches!(result, Err(ErrorKind::CommitOutcomeUnknown)) {
                            log.unknown
                                .push(unknown.expect("a failed call says what it tried"));
                        }
                        log.calls.push(Call {
                            op,
                            start,
                            end: Instant::now(),
                            result,
                        });
                    }
                    if failed {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect()
}

/// When the hand-written client's writes succeeded, and the port of the node each ran on.
type Writes = Mutex<Vec<(Instant, i32)>>;

/// A hand-written client, the baseline for how soon a write can succeed through the one
/// address: every 50 ms it opens a new connection (tokio-postgres, the same URL) and writes
/// one row, in the simple protocol, within 2 s. Records when each write succeeded and on which
/// node's port.
fn spawn_probe(url: String, stop: &Arc<AtomicBool>) -> (Arc<Writes>, tokio::task::JoinHandle<()>) {
    let writes = Arc::new(Mutex::new(Vec::new()));
    let (stop, record) = (stop.clone(), writes.clone());
    let task = tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let attempt = async {
                let (client, connection) =
                    rowlock::tokio_postgres::connect(&url, NoTls).await.ok()?;
                let driver = tokio::spawn(connection);
                let messages = client
                    .simple_query("INSERT INTO probes VALUES (now()) RETURNING inet_server_port()")
                    .await
                    .ok();
                drop(client);
                let _ = driver.await;
                messages?.iter().find_map(|m| match m {
                    rowlock::tokio_postgres::SimpleQueryMessage::Row(row) => {
                        row.get(0).and_then(|p| p.parse::<i32>().ok())
                    }
                    _ => None,
                })
            };
            if let Ok(Some(port)) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
                record.lock().unwrap().push((Instant::now(), port));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    (writes, task)
}

/// When the hand-written client first wrote on the server at `port` after `after`.
fn probe_wrote(writes: &Writes, port: i32, after: Instant) -> Option<Instant> {
    writes
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, p)| *at > after && *p == port)
        .map(|(at, _)| *at)
        .min()
}

/// rowlock's calls succeeded on the new primary within one connection attempt and one retry
/// pause (and slack) of the hand-written client's first write there: `lag` is how much later.
fn assert_resumed(lag: Duration) {
    assert!(
        lag <= RESUME_SLACK,
        "calls succeed on the new primary within one connection attempt and one retry pause \
         of a hand-written client's first write there ({lag:?} later)"
    );
}

/// Waits until `f` holds, or panics naming `what` after `timeout`.
async fn until<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Successful lock calls that ran on the server at `port` and ended after `after`.
fn acks_on(log: &Mutex<Log>, port: i32, after: Instant) -> usize {
    log.lock()
        .unwrap()
        .calls
        .iter()
        .filter(|c| c.end > after && matches!(c.result, Ok(Done::Ack { port: p, .. }) if p == port))
        .count()
}

/// What one phase saw.
struct Figures {
    /// From the event to the first lock call that succeeded on the new primary.
    first_success: Duration,
    /// Calls that ended in the phase, and those that failed, by kind.
    calls: usize,
    failed: BTreeMap<String, usize>,
    /// The longest call that ended in the phase.
    longest: Duration,
}

fn figures(log: &Mutex<Log>, from: Instant, to: Instant, new_port: i32) -> Figures {
    let log = log.lock().unwrap();
    let in_phase: Vec<&Call> = log
        .calls
        .iter()
        .filter(|c| c.end >= from && c.end < to)
        .collect();
    let first = in_phase
        .iter()
        .filter(|c| matches!(c.result, Ok(Done::Ack { port, .. }) if port == new_port))
        .map(|c| c.end)
        .min()
        .expect("a lock call succeeded on the new primary");
    let mut failed = BTreeMap::new();
    for c in &in_phase {
        if let Err(kind) = c.result {
            *failed.entry(format!("{:?} {kind:?}", c.op)).or_default() += 1;
        }
    }
    Figures {
        first_success: first.duration_since(from),
        calls: in_phase.len(),
        failed,
        longest: in_phase
            .iter()
            .map(|c| c.end.duration_since(c.start))
            .max()
            .unwrap_or_default(),
    }
}

/// A client on node `name` directly, database `app`.
async fn node_client(stack: &HaStack, name: &str) -> rowlock::tokio_postgres::Client {
    let (client, connection) = stack
        .node_config(name, "app")
        .unwrap()
        .connect(NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// The rows of a two-column query, collected.
async fn pairs<A, B, C>(client: &rowlock::tokio_postgres::Client, sql: &str) -> C
where
    A: for<'r> rowlock::tokio_postgres::types::FromSql<'r>,
    B: for<'r> rowlock::tokio_postgres::types::FromSql<'r>,
    C: FromIterator<(A, B)>,
{
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Every call reported done is on the primary `leader`; returns how many were checked.
async fn assert_nothing_lost(stack: &HaStack, leader: &str, log: &Mutex<Log>) -> usize {
    let client = node_client(stack, leader).await;
    let acks: BTreeSet<(i32, i32)> = pairs(&client, "SELECT task, seq FROM acks").await;
    let taken: BTreeMap<i64, Option<i32>> = pairs(
        &client,
        "SELECT id, owner FROM tickets WHERE status = 'taken'",
    )
    .await;
    let done: BTreeMap<i64, Option<i32>> =
        pairs(&client, "SELECT id, worker FROM jobs WHERE status = 'done'").await;
    let log = log.lock().unwrap();
    let (mut checked, mut lost) = (0, Vec::new());
    for call in &log.calls {
        match &call.result {
            Ok(Done::Ack { task, seq, .. }) => {
                checked += 1;
                if !acks.contains(&(*task, *seq)) {
                    lost.push(format!("ack {task}/{seq}"));
                }
            }
            Ok(Done::Ticket { task, id }) => {
                checked += 1;
                if taken.get(id) != Some(&Some(*task)) {
                    lost.push(format!("ticket {id}"));
                }
            }
            Ok(Done::Jobs { task, ids }) => {
                checked += 1;
                for id in ids {
                    if done.get(id) != Some(&Some(*task)) {
                        lost.push(format!("job {id}"));
                    }
                }
            }
            Err(_) => {}
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged commits are not on the primary: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    checked
}

/// Resolves every lock call whose commit outcome was unknown, and checks each answer against
/// the data: `Committed` only if its ack row is there, `Aborted` only if it is not. Returns
/// the answers, counted.
async fn resolve_unknown(
    stack: &HaStack,
    leader: &str,
    db: &Db,
    log: &Mutex<Log>,
) -> BTreeMap<String, usize> {
    let client = node_client(stack, leader).await;
    let unknown: Vec<(i32, i32, Option<TransactionRef>)> = log
        .lock()
        .unwrap()
        .unknown
        .iter()
        .filter_map(|u| match u {
            Unknown::Ack { task, seq, tx } => Some((*task, *seq, *tx)),
            _ => None,
        })
        .collect();
    let mut answers = BTreeMap::new();
    for (task, seq, tx) in unknown {
        let tx = tx.expect("a tracked transaction carries its reference");
        let status = db.resolve_commit(&tx).await.unwrap();
        let there = client
            .query_opt(
                "SELECT 1 FROM acks WHERE task = $1 AND seq = $2",
                &[&task, &seq],
            )
            .await
            .unwrap()
            .is_some();
        match status {
            CommitStatus::Committed => assert!(there, "resolved Committed, but not there"),
            CommitStatus::Aborted => assert!(!there, "resolved Aborted, but there"),
            _ => {}
        }
        *answers
            .entry(format!(
                "{status:?} ({})",
                if there { "there" } else { "absent" }
            ))
            .or_default() += 1;
    }
    answers
}

async fn start(pgbouncer: bool) -> Option<HaStack> {
    let started = tokio::task::spawn_blocking(move || {
        if pgbouncer {
            HaStack::start_behind_pgbouncer()
        } else {
            HaStack::start()
        }
    })
    .await
    .unwrap();
    match started {
        Ok(stack) => Some(stack),
        Err(HarnessError::NoBinaries(why))
            if std::env::var("ROWLOCK_TEST_HA").as_deref() != Ok("require") =>
        {
            eprintln!("skipped: {why}");
            None
        }
        Err(e) => panic!("starting the stack: {e}"),
    }
}

/// The only failure a caller may see while the primary changes is a commit whose outcome is
/// unknown: everything else (connections cut, a server not accepting writes, no server
/// behind the proxy for a while) is retried by the handle's policy.
fn assert_only_unknown_outcomes(phase: &str, failed: &BTreeMap<String, usize>) {
    let other: Vec<_> = failed
        .keys()
        .filter(|k| !k.ends_with("CommitOutcomeUnknown"))
        .collect();
    assert!(other.is_empty(), "{phase}: calls failed with {other:?}");
}

/// Switchover, failover and rejoin under load, through HAProxy (and PgBouncer).
async fn scenario(pgbouncer: bool) {
    let _one = ONE_STACK.lock().await;
    let Some(stack) = start(pgbouncer).await else {
        return;
    };
    let through = if pgbouncer {
        "PgBouncer → HAProxy"
    } else {
        "HAProxy"
    };
    let first = stack.leader().await.expect("a primary");
    let port = |name: &str| i32::from(stack.node_port(name).unwrap());
    {
        let (admin, connection) = stack
            .node_config(&first, "postgres")
            .unwrap()
            .connect(NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        admin.batch_execute("CREATE DATABASE app").await.unwrap();
        node_client(&stack, &first)
            .await
            .batch_execute(SCHEMA)
            .await
            .unwrap();
    }
    let db = handle(&stack, pgbouncer);
    let bound = call_bound(&stack);
    let ttl = stack.timing().ttl;
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Log::default()));
    let tasks = spawn_load(&db, &stop, &log);
    let (probe, probe_task) = spawn_probe(stack.url("app"), &stop);
    // rowlock's first success on the new primary, and how much later than the hand-written
    // client's first write it came (zero when rowlock was first).
    let behind = |first: Duration, event: Instant, port: i32| {
        probe_wrote(&probe, port, event)
            .map(|at| (event + first).saturating_duration_since(at))
            .unwrap_or_default()
    };
    let start = Instant::now();
    until(
        Duration::from_secs(30),
        "calls succeed on the first primary",
        || async { acks_on(&log, port(&first), start) >= 100 },
    )
    .await;

    // 1. A planned switchover.
    let switch = Instant::now();
    let second = stack.switchover().await.expect("switchover");
    let switched = switch.elapsed();
    until(
        Duration::from_secs(30),
        "calls succeed on the new primary",
        || async { acks_on(&log, port(&second), switch) >= 100 },
    )
    .await;
    // In synchronous mode only the synchronous standby may be promoted: the old primary
    // must be that again before an unplanned failover can happen.
    stack
        .wait_for(&first, "sync", Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}; its log: {}", stack.patroni_log(&first)));
    let resynced = switch.elapsed();
    let crash = Instant::now();
    let s = figures(&log, switch, crash, port(&second));
    let lag = behind(s.first_success, switch, port(&second));
    eprintln!(
        "[{through}] switchover: patronictl took {switched:.1?}; first call on the new primary \
         {:.1?} after it began ({lag:.1?} after the hand-written client's first write there); \
         the old primary was the synchronous standby again after {resynced:.1?}; {} calls, \
         failed: {:?}; longest call {:.1?}",
        s.first_success, s.calls, s.failed, s.longest
    );
    assert_resumed(lag);
    assert!(s.longest <= bound, "a call outlived its timeouts");
    assert_only_unknown_outcomes("switchover", &s.failed);

    // 2. An unplanned failover: the primary's node dies.
    let dead = second.clone();
    let st = &stack;
    tokio::task::block_in_place(|| st.crash(&dead)).unwrap();
    until(
        ttl + Duration::from_secs(15),
        "the other node leads",
        || async { stack.leader().await.as_deref() == Some(first.as_str()) },
    )
    .await;
    let promoted = crash.elapsed();
    until(
        Duration::from_secs(30),
        "calls succeed after the failover",
        || async { acks_on(&log, port(&first), crash) >= 100 },
    )
    .await;
    let rejoin = Instant::now();
    let f = figures(&log, crash, rejoin, port(&first));
    let lag = behind(f.first_success, crash, port(&first));
    eprintln!(
        "[{through}] failover: the other node led {promoted:.1?} after the crash (ttl {ttl:?}); \
         first call on it {:.1?} after the crash ({lag:.1?} after the hand-written client's \
         first write there); {} calls, failed: {:?}; longest call {:.1?}",
        f.first_success, f.calls, f.failed, f.longest
    );
    assert_resumed(lag);
    assert!(f.longest <= bound, "a call outlived its timeouts");
    assert_only_unknown_outcomes("failover", &f.failed);

    // 3. The old primary rejoins as a standby (pg_rewind), under load.
    stack.restart_node(&second).unwrap();
    stack
        .wait_for(&second, "replica", Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}; its log: {}", stack.patroni_log(&second)));
    stack
        .wait_for(&second, "sync", Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}; its log: {}", stack.patroni_log(&second)));
    let rejoined = rejoin.elapsed();
    let after = Instant::now();
    until(
        Duration::from_secs(30),
        "calls go on after the rejoin",
        || async { acks_on(&log, port(&first), after) >= 100 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    probe_task.await.unwrap();
    let r = figures(&log, rejoin, Instant::now(), port(&first));
    eprintln!(
        "[{through}] rejoin: {second} was the synchronous standby again {rejoined:.1?} after \
         its Patroni started; {} calls, failed: {:?}",
        r.calls, r.failed
    );
    assert!(
        r.failed.is_empty(),
        "no call failed while the old primary rejoined (none reached it for a write)"
    );
    let on_old = log
        .lock()
        .unwrap()
        .calls
        .iter()
        .filter(|c| {
            c.end > rejoin
                && matches!(c.result, Ok(Done::Ack { port: p, .. }) if p == port(&second))
        })
        .count();
    assert_eq!(on_old, 0, "no write ran on the rejoined node");

    // Nothing acknowledged was lost, and unknown outcomes resolve as documented.
    let checked = assert_nothing_lost(&stack, &first, &log).await;
    let answers = resolve_unknown(&stack, &first, &db, &log).await;
    let unknown: BTreeMap<&str, usize> =
        log.lock()
            .unwrap()
            .unknown
            .iter()
            .fold(BTreeMap::new(), |mut m, u| {
                *m.entry(match u {
                    Unknown::Ack { .. } => "lock",
                    Unknown::Ticket { .. } => "transition",
                    Unknown::Jobs => "claim",
                })
                .or_default() += 1;
                m
            });
    eprintln!(
        "[{through}] {checked} acknowledged calls checked on the primary: none lost; commit \
         outcome unknown: {unknown:?}; lock calls resolved: {answers:?}"
    );
    // A transition whose outcome was unknown either happened or not; running it again tells.
    let tickets: Vec<i64> = log
        .lock()
        .unwrap()
        .unknown
        .iter()
        .filter_map(|u| match u {
            Unknown::Ticket { id } => Some(*id),
            _ => None,
        })
        .collect();
    let take = Transition::new("status = 'taken', owner = $1").when("status = 'open'");
    for id in tickets {
        let again = db
            .transition::<Ticket>(&id, &take, &[&-1_i32])
            .await
            .unwrap();
        assert!(
            matches!(again, Outcome::Done(_) | Outcome::Conflict(_)),
            "ticket {id}: {again}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switchover_failover_and_rejoin_through_haproxy() {
    scenario(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switchover_failover_and_rejoin_through_pgbouncer_and_haproxy() {
    scenario(true).await;
}
