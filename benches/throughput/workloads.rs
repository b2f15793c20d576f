//! The workloads, each in four implementations running the same SQL: a pgbench script,
//! hand-written tokio-postgres on its own connection and on a connection checked out of a
//! deadpool `Pool` per transaction, and rowlock's public API.
//!
//! Round trips per transaction: pgbench sends one statement per round trip (4 to 6; its
//! one-statement workloads 3 with `BEGIN`/`COMMIT`, 1 without); the hand-written forms and
//! rowlock take 2 on the lock path (`BEGIN` pipelined with the locking SELECT, the writes
//! pipelined with `COMMIT`) and 1 on the one-statement paths (`accept_cas`: a transition;
//! `claim_one`, `claim_batch`, `claim_spread`: claim-and-mark).
//!
//! Each hand-written form reads the columns of the rows it gets that rowlock's row types decode
//! (a locked counter's id, a project's id and status, the claimed jobs' ids), as a service
//! would: rowlock hands its caller typed rows, so the comparison includes that work on both
//! sides.

use futures_util::future::{join, join3};
use rowlock::deadpool_postgres::Object;
use rowlock::tokio_postgres::{Client, Error as PgError, Row, Statement};
use rowlock::{Claim, Direction, Lock, LockStrength, LockableRow, Outcome, Table, Transition};

pub const PROPOSALS_PER_PROJECT: i64 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Accept,
    /// The accept as one conditional statement (a transition): no lock held across a round
    /// trip.
    AcceptCas,
    HotRow,
    Spread,
    /// Claim-and-mark of one row in one statement.
    ClaimOne,
    /// Claim-and-mark of 100 rows in one statement.
    ClaimBatch,
    /// `claim_batch` from a random start in the id range, wrapping around
    /// (`Claim::start_at`): claimers rarely meet.
    ClaimSpread,
    /// The lock path's claim of one row: claim with `BEGIN`, mark with `COMMIT`.
    ClaimLocked,
    /// Every transaction asks for a row another session holds, with `NOWAIT`: the cost of a
    /// rejection. pgbench stops a client at the first error, so it has no column here.
    NowaitBusy,
}

/// The rows the `nowait_busy` holder keeps locked during its runs.
pub const HELD_COUNTERS: i64 = 16;
/// What the holder runs (and keeps open) before a `nowait_busy` run.
pub const HOLD: &str = "BEGIN; SELECT * FROM counters WHERE id <= 16 FOR UPDATE";

impl Workload {
    pub const ALL: [Workload; 9] = [
        Workload::Accept,
        Workload::AcceptCas,
        Workload::HotRow,
        Workload::Spread,
        Workload::ClaimOne,
        Workload::ClaimBatch,
        Workload::ClaimSpread,
        Workload::ClaimLocked,
        Workload::NowaitBusy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Accept => "accept",
            Workload::AcceptCas => "accept_cas",
            Workload::HotRow => "hot_row",
            Workload::Spread => "spread",
            Workload::ClaimOne => "claim_one",
            Workload::ClaimBatch => "claim_batch",
            Workload::ClaimSpread => "claim_spread",
            Workload::ClaimLocked => "claim_locked",
            Workload::NowaitBusy => "nowait_busy",
        }
    }

    /// Whether pgbench can run it.
    pub fn has_pgbench(self) -> bool {
        self != Workload::NowaitBusy
    }

    /// Rows a claim transaction takes (claims are measured in jobs/s too).
    pub fn batch(self) -> i64 {
        match self {
            Workload::ClaimBatch | Workload::ClaimSpread => 100,
            _ => 1,
        }
    }

    pub fn is_claim(self) -> bool {
        matches!(
            self,
            Workload::ClaimOne
                | Workload::ClaimBatch
                | Workload::ClaimSpread
                | Workload::ClaimLocked
        )
    }

    pub fn is_accept(self) -> bool {
        matches!(self, Workload::Accept | Workload::AcceptCas)
    }

    /// The pgbench script: the same statements, one per round trip.
    pub fn pgbench_script(self, sizes: &Sizes) -> String {
        match self {
            Workload::Accept => format!(
                "\\set proposal random(1, {proposals})
\\set project (:proposal - 1) / {per} + 1
BEGIN;
SELECT (status = 'open')::int AS open FROM projects WHERE id = :project FOR NO KEY UPDATE \\gset
\\if :open = 1
UPDATE projects SET status = 'assigned' WHERE id = :project;
UPDATE proposals SET status = 'accepted' WHERE id = :proposal;
UPDATE proposals SET status = 'rejected' WHERE project_id = :project AND id <> :proposal AND status = 'pending';
\\endif
COMMIT;
",
                proposals = sizes.projects * PROPOSALS_PER_PROJECT,
                per = PROPOSALS_PER_PROJECT
            ),
            // One statement, committed on its own.
            Workload::AcceptCas => format!(
                "\\set proposal random(1, {proposals})
\\set project (:proposal - 1) / {per} + 1
{sql};
",
                proposals = sizes.projects * PROPOSALS_PER_PROJECT,
                per = PROPOSALS_PER_PROJECT,
                sql = ACCEPT_CAS
                    .replace("$1", ":project")
                    .replace("$2", ":proposal")
            ),
            Workload::HotRow | Workload::Spread => format!(
                "\\set id {}
BEGIN;
SELECT n FROM counters WHERE id = :id FOR UPDATE;
UPDATE counters SET n = n + 1 WHERE id = :id;
COMMIT;
",
                if self == Workload::HotRow {
                    "1".to_string()
                } else {
                    format!("random(1, {})", sizes.counters)
                }
            ),
            Workload::NowaitBusy => String::new(),
            Workload::ClaimSpread => format!(
                "\\set start random(1, {jobs})
BEGIN;
{sql};
COMMIT;
",
                jobs = sizes.jobs,
                sql = CLAIM_MARK_FROM
                    .replace("$1", &self.batch().to_string())
                    .replace("$2", ":start")
            ),
            // pgbench cannot carry a set of ids from one statement to the next, so its claim
            // marks the rows in the same statement: one round trip fewer than the others.
            Workload::ClaimOne | Workload::ClaimBatch | Workload::ClaimLocked => format!(
                "BEGIN;
WITH claimed AS MATERIALIZED (SELECT id FROM jobs WHERE status = 'pending' ORDER BY id LIMIT {} FOR NO KEY UPDATE SKIP LOCKED) UPDATE jobs SET status = 'done', claims = claims + 1 FROM claimed WHERE jobs.id = claimed.id;
COMMIT;
",
                self.batch()
            ),
        }
    }
}

pub struct Sizes {
    pub projects: i64,
    pub counters: i64,
    pub jobs: i64,
}

pub const SCHEMA: &str = "
CREATE TABLE projects (id bigint PRIMARY KEY, title text NOT NULL,
                       status text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'assigned')));
CREATE TABLE proposals (id bigint PRIMARY KEY, project_id bigint NOT NULL REFERENCES projects (id),
                        status text NOT NULL DEFAULT 'pending');
CREATE INDEX proposals_project ON proposals (project_id);
CREATE UNIQUE INDEX proposals_one_accepted ON proposals (project_id) WHERE status = 'accepted';
CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0);
CREATE TABLE jobs (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending',
                   claims int NOT NULL DEFAULT 0);
CREATE INDEX jobs_pending ON jobs (id) WHERE status = 'pending';
";

pub async fn load(client: &Client, sizes: &Sizes) -> Result<(), PgError> {
    client.batch_execute(SCHEMA).await?;
    client
        .execute(
            "INSERT INTO projects (id, title) SELECT g, 'p' || g FROM generate_series(1, $1::int8) g",
            &[&sizes.projects],
        )
        .await?;
    client
        .execute(
            "INSERT INTO proposals (id, project_id)
             SELECT g, (g - 1) / $2 + 1 FROM generate_series(1, $1::int8 * $2) g",
            &[&sizes.projects, &PROPOSALS_PER_PROJECT],
        )
        .await?;
    client
        .execute(
            "INSERT INTO counters (id) SELECT g FROM generate_series(1, $1::int4) g",
            &[&(sizes.counters as i32)],
        )
        .await?;
    client
        .execute(
            "INSERT INTO jobs (id) SELECT g FROM generate_series(1, $1::int8) g",
            &[&sizes.jobs],
        )
        .await?;
    client.batch_execute("VACUUM ANALYZE").await
}

/// Puts the workload's data back to its starting state after a run.
pub async fn reset(client: &Client, workload: Workload) -> Result<(), PgError> {
    let sql = match workload {
        Workload::Accept | Workload::AcceptCas => {
            "UPDATE proposals SET status = 'pending' WHERE status <> 'pending';
             UPDATE projects SET status = 'open' WHERE status <> 'open';"
        }
        Workload::HotRow | Workload::Spread | Workload::NowaitBusy => return Ok(()),
        Workload::ClaimOne
        | Workload::ClaimBatch
        | Workload::ClaimSpread
        | Workload::ClaimLocked => {
            "UPDATE jobs SET status = 'pending', claims = 0 WHERE status <> 'pending';"
        }
    };
    client.batch_execute(sql).await?;
    let table = if workload.is_accept() {
        "projects, proposals"
    } else {
        "jobs"
    };
    client.batch_execute(&format!("VACUUM {table}")).await
}

/// State read before and after a run, to check it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub counter_sum: i64,
    pub doubly_accepted: i64,
    pub jobs_done: i64,
    pub jobs_claimed_twice: i64,
    pub claims_sum: i64,
}

pub async fn snapshot(client: &Client) -> Result<Snapshot, PgError> {
    let row = client
        .query_one(
            "SELECT (SELECT coalesce(sum(n), 0)::int8 FROM counters),
                    (SELECT count(*) FROM (SELECT project_id FROM proposals WHERE status = 'accepted'
                                           GROUP BY project_id HAVING count(*) > 1) d),
                    (SELECT count(*) FROM jobs WHERE status = 'done'),
                    (SELECT count(*) FROM jobs WHERE claims > 1),
                    (SELECT coalesce(sum(claims), 0)::int8 FROM jobs)",
            &[],
        )
        .await?;
    Ok(Snapshot {
        counter_sum: row.get(0),
        doubly_accepted: row.get(1),
        jobs_done: row.get(2),
        jobs_claimed_twice: row.get(3),
        claims_sum: row.get(4),
    })
}

/// xorshift64: per-client random keys without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: i64) -> i64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as i64
    }
}

const LOCK_PROJECT: &str = "SELECT * FROM projects WHERE id = $1 FOR NO KEY UPDATE";
const ASSIGN: &str = "UPDATE projects SET status = 'assigned' WHERE id = $1";
const ACCEPT: &str = "UPDATE proposals SET status = 'accepted' WHERE id = $1";
const REJECT: &str = "UPDATE proposals SET status = 'rejected' WHERE project_id = $1 AND id <> $2 AND status = 'pending'";
/// The accept as one statement, written by hand: the project changes only while open, and the
/// proposals change only with it.
const ACCEPT_CAS: &str = "WITH assign AS (UPDATE projects SET status = 'assigned' WHERE id = $1 AND status = 'open' RETURNING id), accept AS (UPDATE proposals SET status = 'accepted' FROM assign WHERE proposals.id = $2), reject AS (UPDATE proposals SET status = 'rejected' FROM assign WHERE proposals.project_id = assign.id AND proposals.id <> $2 AND proposals.status = 'pending') SELECT count(*) FROM assign";
const LOCK_COUNTER: &str = "SELECT * FROM counters WHERE id = $1 FOR UPDATE";
const BUMP: &str = "UPDATE counters SET n = n + 1 WHERE id = $1";
const LOCK_COUNTER_NOWAIT: &str = "SELECT * FROM counters WHERE id = $1 FOR UPDATE NOWAIT";
const CLAIM: &str = "WITH claimed AS MATERIALIZED (SELECT * FROM jobs WHERE status = 'pending' \
                     ORDER BY id LIMIT $1 FOR NO KEY UPDATE SKIP LOCKED) \
                     SELECT * FROM claimed ORDER BY id";
const MARK_DONE: &str = "UPDATE jobs SET status = 'done', claims = claims + 1 WHERE id = ANY($1)";
/// Claim-and-mark, written by hand: the same statement rowlock generates.
const CLAIM_MARK: &str = "WITH claimed AS MATERIALIZED (SELECT id FROM jobs WHERE status = 'pending' \
                          ORDER BY id LIMIT $1 FOR NO KEY UPDATE SKIP LOCKED), \
                          marked AS (UPDATE jobs SET status = 'done', claims = claims + 1 \
                          FROM claimed WHERE jobs.id = claimed.id RETURNING jobs.*) \
                          SELECT * FROM marked ORDER BY id";
/// Claim-and-mark from a start (`$2`), wrapping around, written by hand: rows from the start
/// on, then rows before it; the outer `LIMIT` stops pulling once it has `$1` rows.
const CLAIM_MARK_FROM: &str = "WITH claimed AS MATERIALIZED (SELECT * FROM (\
                               SELECT * FROM (SELECT id FROM jobs WHERE status = 'pending' \
                               AND id >= $2 ORDER BY id LIMIT $1 FOR NO KEY UPDATE SKIP LOCKED) a \
                               UNION ALL \
                               SELECT * FROM (SELECT id FROM jobs WHERE status = 'pending' \
                               AND id < $2 ORDER BY id LIMIT $1 FOR NO KEY UPDATE SKIP LOCKED) b\
                               ) w LIMIT $1), \
                               marked AS (UPDATE jobs SET status = 'done', claims = claims + 1 \
                               FROM claimed WHERE jobs.id = claimed.id RETURNING jobs.*) \
                               SELECT * FROM marked ORDER BY id";

/// The statements a hand-written client prepared on its own connection.
pub struct Stmts {
    lock_project: Statement,
    assign: Statement,
    accept: Statement,
    reject: Statement,
    accept_cas: Statement,
    lock_counter: Statement,
    lock_counter_nowait: Statement,
    bump: Statement,
    claim: Statement,
    mark_done: Statement,
    claim_mark: Statement,
    claim_mark_from: Statement,
}

/// A hand-written client: its own connection and prepared statements, or a pool it checks a
/// connection out of per transaction (statements from the connection's `prepare_cached`).
pub enum Hand {
    Own(Client, Box<Stmts>),
    Pooled(rowlock::deadpool_postgres::Pool),
}

/// Where a transaction's statements come from.
enum Source<'a> {
    Own(&'a Stmts),
    Pooled(&'a Object),
}

impl Source<'_> {
    async fn get(&self, pick: fn(&Stmts) -> &Statement, sql: &str) -> Result<Statement, PgError> {
        match self {
            Source::Own(s) => Ok(pick(s).clone()),
            Source::Pooled(o) => o.prepare_cached(sql).await,
        }
    }
}

impl Hand {
    pub async fn new(client: Client) -> Result<Hand, PgError> {
        let stmts = Stmts {
            lock_project: client.prepare(LOCK_PROJECT).await?,
            assign: client.prepare(ASSIGN).await?,
            accept: client.prepare(ACCEPT).await?,
            reject: client.prepare(REJECT).await?,
            accept_cas: client.prepare(ACCEPT_CAS).await?,
            lock_counter: client.prepare(LOCK_COUNTER).await?,
            lock_counter_nowait: client.prepare(LOCK_COUNTER_NOWAIT).await?,
            bump: client.prepare(BUMP).await?,
            claim: client.prepare(CLAIM).await?,
            mark_done: client.prepare(MARK_DONE).await?,
            claim_mark: client.prepare(CLAIM_MARK).await?,
            claim_mark_from: client.prepare(CLAIM_MARK_FROM).await?,
        };
        Ok(Hand::Own(client, Box::new(stmts)))
    }

    /// One transaction; returns the rows it processed (claims) or 1.
    pub async fn run(
        &self,
        workload: Workload,
        rng: &mut Rng,
        sizes: &Sizes,
    ) -> Result<i64, Box<dyn std::error::Error + Send + Sync>> {
        match self {
            Hand::Own(client, stmts) => {
                Ok(run_hand(client, Source::Own(stmts), workload, rng, sizes).await?)
            }
            Hand::Pooled(pool) => {
                let obj = pool.get().await?;
                Ok(run_hand(&obj, Source::Pooled(&obj), workload, rng, sizes).await?)
            }
        }
    }
}

async fn run_hand(
    c: &Client,
    st: Source<'_>,
    workload: Workload,
    rng: &mut Rng,
    sizes: &Sizes,
) -> Result<i64, PgError> {
    match workload {
        Workload::Accept => {
            let proposal = rng.below(sizes.projects * PROPOSALS_PER_PROJECT) + 1;
            let project = (proposal - 1) / PROPOSALS_PER_PROJECT + 1;
            let lock = st.get(|s| &s.lock_project, LOCK_PROJECT).await?;
            let (begin, row) =
                join(c.batch_execute("BEGIN"), c.query_one(&lock, &[&project])).await;
            begin?;
            // The columns rowlock's `Project` decodes.
            let row = row?;
            let project: i64 = row.get("id");
            let open = row.get::<_, &str>("status") == "open";
            if open {
                let assign = st.get(|s| &s.assign, ASSIGN).await?;
                let accept = st.get(|s| &s.accept, ACCEPT).await?;
                let reject = st.get(|s| &s.reject, REJECT).await?;
                let ((assign, accept, reject), commit) = join(
                    join3(
                        c.execute(&assign, &[&project]),
                        c.execute(&accept, &[&proposal]),
                        c.execute(&reject, &[&project, &proposal]),
                    ),
                    c.batch_execute("COMMIT"),
                )
                .await;
                assign?;
                accept?;
                reject?;
                commit?;
            } else {
                c.batch_execute("COMMIT").await?;
            }
            Ok(1)
        }
        Workload::AcceptCas => {
            let proposal = rng.below(sizes.projects * PROPOSALS_PER_PROJECT) + 1;
            let project = (proposal - 1) / PROPOSALS_PER_PROJECT + 1;
            let cas = st.get(|s| &s.accept_cas, ACCEPT_CAS).await?;
            // Whether this call assigned the project, as rowlock's outcome tells it.
            let _assigned: i64 = c.query_one(&cas, &[&project, &proposal]).await?.get(0);
            Ok(1)
        }
        Workload::HotRow | Workload::Spread => {
            let id = if workload == Workload::HotRow {
                1
            } else {
                rng.below(sizes.counters) as i32 + 1
            };
            let lock = st.get(|s| &s.lock_counter, LOCK_COUNTER).await?;
            let (begin, row) = join(c.batch_execute("BEGIN"), c.query_one(&lock, &[&id])).await;
            begin?;
            // The column rowlock's `Counter` decodes, used as rowlock's closure uses it.
            let id: i32 = row?.get("id");
            let bump = st.get(|s| &s.bump, BUMP).await?;
            let (bump, commit) = join(c.execute(&bump, &[&id]), c.batch_execute("COMMIT")).await;
            bump?;
            commit?;
            Ok(1)
        }
        Workload::NowaitBusy => {
            let id = rng.below(HELD_COUNTERS) as i32 + 1;
            let lock = st
                .get(|s| &s.lock_counter_nowait, LOCK_COUNTER_NOWAIT)
                .await?;
            let (begin, row) = join(c.batch_execute("BEGIN"), c.query_one(&lock, &[&id])).await;
            begin?;
            let rejected = row.is_err_and(|e| {
                e.code() == Some(&rowlock::tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
            });
            c.batch_execute("ROLLBACK").await?;
            // 1 per rejection; the check fails the run if a held row was ever locked.
            Ok(i64::from(rejected))
        }
        Workload::ClaimOne | Workload::ClaimBatch => {
            let claim = st.get(|s| &s.claim_mark, CLAIM_MARK).await?;
            Ok(job_ids(c.query(&claim, &[&workload.batch()]).await?).len() as i64)
        }
        Workload::ClaimSpread => {
            let start = rng.below(sizes.jobs) + 1;
            let claim = st.get(|s| &s.claim_mark_from, CLAIM_MARK_FROM).await?;
            Ok(job_ids(c.query(&claim, &[&workload.batch(), &start]).await?).len() as i64)
        }
        Workload::ClaimLocked => {
            let claim = st.get(|s| &s.claim, CLAIM).await?;
            let (begin, rows) = join(
                c.batch_execute("BEGIN"),
                c.query(&claim, &[&workload.batch()]),
            )
            .await;
            begin?;
            let ids = job_ids(rows?);
            let n = ids.len() as i64;
            if ids.is_empty() {
                c.batch_execute("COMMIT").await?;
            } else {
                let mark = st.get(|s| &s.mark_done, MARK_DONE).await?;
                let (mark, commit) =
                    join(c.execute(&mark, &[&ids]), c.batch_execute("COMMIT")).await;
                mark?;
                commit?;
            }
            Ok(n)
        }
    }
}

/// The claimed jobs' ids, the column rowlock's `Job` decodes: what a worker needs to process
/// them.
fn job_ids(rows: Vec<Row>) -> Vec<i64> {
    rows.iter().map(|r| r.get("id")).collect()
}

struct Project {
    id: i64,
    open: bool,
}

impl LockableRow for Project {
    type Key = i64;
    const TABLE: Table = Table::new("projects");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    fn from_row(row: &Row) -> Result<Self, PgError> {
        Ok(Project {
            id: row.try_get("id")?,
            open: row.try_get::<_, &str>("status")? == "open",
        })
    }
    fn key(&self) -> i64 {
        self.id
    }
}

struct Counter {
    id: i32,
}

impl LockableRow for Counter {
    type Key = i32;
    const TABLE: Table = Table::new("counters");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    fn from_row(row: &Row) -> Result<Self, PgError> {
        Ok(Counter {
            id: row.try_get("id")?,
        })
    }
    fn key(&self) -> i32 {
        self.id
    }
}

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

/// The accept as a rowlock transition: the same statement shape as the hand-written
/// `ACCEPT_CAS`.
pub fn accept_transition() -> Transition {
    Transition::new("status = 'assigned'")
        .when("status = 'open'")
        .then("UPDATE proposals SET status = 'accepted' FROM changed WHERE proposals.id = $1")
        .then(
            "UPDATE proposals SET status = 'rejected' FROM changed WHERE proposals.project_id = \
             changed.id AND proposals.id <> $1 AND proposals.status = 'pending'",
        )
}

/// What a rowlock client reuses across transactions, as a service's worker would keep them.
pub struct Prepared {
    pub claim: Claim,
    pub claim_mark: Claim,
    /// Moved to a new start before each claim.
    pub claim_mark_from: Claim,
    pub accept: Transition,
}

impl Prepared {
    pub fn new() -> Prepared {
        let mark = || claim().mark("status = 'done', claims = claims + 1", vec![]);
        Prepared {
            claim: claim(),
            claim_mark: mark(),
            claim_mark_from: mark().start_at(1_i64),
            accept: accept_transition(),
        }
    }
}

/// One transaction through rowlock's public API; returns the rows processed or 1.
pub async fn with_rowlock(
    db: &rowlock::Db,
    workload: Workload,
    rng: &mut Rng,
    sizes: &Sizes,
    prepared: &mut Prepared,
) -> Result<i64, rowlock::Error> {
    match workload {
        Workload::Accept => {
            let proposal = rng.below(sizes.projects * PROPOSALS_PER_PROJECT) + 1;
            let project = (proposal - 1) / PROPOSALS_PER_PROJECT + 1;
            let opts = Lock::new().strength(LockStrength::NoKeyUpdate);
            let outcome = db
                .with_locked_row(&project, &opts, |tx, p: Project| {
                    Box::pin(async move {
                        if p.open {
                            let assign = tx.prepare_cached(ASSIGN).await?;
                            let accept = tx.prepare_cached(ACCEPT).await?;
                            let reject = tx.prepare_cached(REJECT).await?;
                            tx.execute_on_commit(&assign, &[&p.id]).await?;
                            tx.execute_on_commit(&accept, &[&proposal]).await?;
                            tx.execute_on_commit(&reject, &[&p.id, &proposal]).await?;
                        }
                        Ok::<_, rowlock::Error>(())
                    })
                })
                .await?;
            outcome.into_result().map(|()| 1)
        }
        Workload::AcceptCas => {
            let proposal = rng.below(sizes.projects * PROPOSALS_PER_PROJECT) + 1;
            let project = (proposal - 1) / PROPOSALS_PER_PROJECT + 1;
            // Done or Conflict (already assigned): both are a completed transaction.
            let outcome = db
                .transition::<Project>(&project, &prepared.accept, &[&proposal])
                .await?;
            assert!(
                !matches!(outcome, rowlock::Outcome::NotFound(_)),
                "project {project} exists"
            );
            Ok(1)
        }
        Workload::HotRow | Workload::Spread => {
            let id = if workload == Workload::HotRow {
                1
            } else {
                rng.below(sizes.counters) as i32 + 1
            };
            let outcome = db
                .with_locked_row(&id, &Lock::new(), |tx, c: Counter| {
                    Box::pin(async move {
                        let bump = tx.prepare_cached(BUMP).await?;
                        tx.execute_on_commit(&bump, &[&c.id]).await?;
                        Ok::<_, rowlock::Error>(())
                    })
                })
                .await?;
            if let Outcome::Done(()) = outcome {
                Ok(1)
            } else {
                outcome.into_result().map(|()| 1)
            }
        }
        Workload::NowaitBusy => {
            let id = rng.below(HELD_COUNTERS) as i32 + 1;
            let nowait = Lock::no_wait();
            let outcome = db
                .with_locked_row(&id, &nowait, |_, _: Counter| {
                    Box::pin(async { Ok::<_, rowlock::Error>(()) })
                })
                .await?;
            match outcome {
                Outcome::LockNotAvailable(_) => Ok(1),
                other => other.into_result().map(|()| 0),
            }
        }
        Workload::ClaimOne | Workload::ClaimBatch => {
            let jobs: Vec<Job> = db
                .claim_and_mark(&prepared.claim_mark, workload.batch() as usize)
                .await?;
            Ok(jobs.len() as i64)
        }
        Workload::ClaimSpread => {
            let start = rng.below(sizes.jobs) + 1;
            let claim = std::mem::take(&mut prepared.claim_mark_from).start_at(start);
            let jobs: Result<Vec<Job>, _> =
                db.claim_and_mark(&claim, workload.batch() as usize).await;
            prepared.claim_mark_from = claim;
            Ok(jobs?.len() as i64)
        }
        Workload::ClaimLocked => {
            let claimed = db
                .claim(
                    &prepared.claim,
                    workload.batch() as usize,
                    |tx, jobs: Vec<Job>| {
                        Box::pin(async move {
                            let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
                            let n = ids.len() as i64;
                            let mark = tx.prepare_cached(MARK_DONE).await?;
                            tx.execute_on_commit(&mark, &[&ids]).await?;
                            Ok::<_, rowlock::Error>(n)
                        })
                    },
                )
                .await?;
            Ok(claimed.done().unwrap_or(0))
        }
    }
}

/// The claim rowlock runs: the same rows and order as the hand-written `CLAIM`. The constant
/// condition is SQL, as the hand-written statement has it, so that one generic plan uses the
/// partial index (a `filter` value is a bound parameter, planned per call).
pub fn claim() -> Claim {
    Claim::new()
        .where_sql("status = 'pending'", vec![])
        .order_by("id", Direction::Asc)
}
