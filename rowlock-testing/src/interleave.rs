//! Races as scripts: sessions of named steps, run in every interleaving (or the ones listed),
//! the way PostgreSQL's own isolation tester runs its specs.
//!
//! A [`Script`] has sessions, each a list of named [`Step`]s (raw SQL, or your own async code
//! on the session: a repository function, a rowlock call). A permutation is an order of all
//! steps that keeps each session's own order; the runner runs one step at a time, in that
//! order, on a fresh copy of the database. When a step waits for a lock, the server says so
//! (`pg_blocking_pids`) and the runner moves on to the next step; the waiting step is reported
//! where it completes. A wait counts only once every connection it waits for is idle or waits
//! itself: one still running a statement with no step of the script running on it is finishing
//! what its step already returned from (a failed statement's error reaches the client before
//! the server releases its locks), so the runner waits for that to end. A step that leaves its
//! connection busy for good is reported as stuck after a minute. Nothing is timed and nothing
//! sleeps to hope: every decision is taken on what the server reports.
//!
//! Each permutation gives a [`Record`]: what every step returned (or its error's kind and
//! SQLSTATE), which steps waited and for whom, and the results of the script's queries at the
//! end. [`Report::assert_matches_file`] compares the records with an expected file (a
//! mismatch fails with a diff; `ROWLOCK_TESTING_BLESS=1` rewrites the file);
//! [`Report::assert_each`] checks an invariant on every permutation.
//!
//! ```no_run
//! use rowlock_testing::interleave::Script;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let report = Script::new("lost update")
//!     .setup("CREATE TABLE counter (n int); INSERT INTO counter VALUES (0);")
//!     .session("a", |s| {
//!         s.sql("a_read", "BEGIN; SELECT n FROM counter")
//!             .sql("a_write", "UPDATE counter SET n = n + 1; COMMIT")
//!     })
//!     .session("b", |s| {
//!         s.sql("b_read", "BEGIN; SELECT n FROM counter")
//!             .sql("b_write", "UPDATE counter SET n = n + 1; COMMIT")
//!     })
//!     .query("n", "SELECT n FROM counter")
//!     .run()
//!     .await?;
//! report.assert_each(|record| record.query("n") == Some("2"));
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::hash::{BuildHasher, RandomState};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Config, SimpleQueryMessage};

use super::{HarnessError, TestCluster, connect};

/// The prefix of `application_name` that marks a script's connections: the runner asks the
/// server which of them wait, and for whom.
const APP_PREFIX: &str = "interleave:";

/// How long a step may run without completing or waiting for a lock before the runner gives
/// up on the permutation (a step stuck on something else than a lock).
const STEP_LIMIT: Duration = Duration::from_secs(60);

/// How often the runner asks the server whether a running step waits for a lock.
const POLL: Duration = Duration::from_millis(2);

/// What a step returns: a short text for the record (a value, a row count, an outcome), or
/// an error.
pub type StepResult = Result<String, StepError>;

/// A step's failure, as the record shows it: the error's kind and SQLSTATE (never its
/// message, which names objects and values that may differ between runs), and the whole text
/// for a human.
#[derive(Debug, Clone)]
pub struct StepError {
    /// `LockNotAvailable`, `SerializationFailure`, `Deadlock`, …: rowlock's
    /// [`ErrorKind`](rowlock::ErrorKind) for rowlock's errors, `Db` for the driver's.
    pub kind: String,
    /// The SQLSTATE, when the server sent one.
    pub sql_state: Option<String>,
    /// The error's text.
    pub message: String,
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error {}", self.kind)?;
        if let Some(state) = &self.sql_state {
            write!(f, " ({state})")?;
        }
        Ok(())
    }
}

impl From<rowlock::Error> for StepError {
    fn from(e: rowlock::Error) -> Self {
        StepError {
            kind: format!("{:?}", e.kind()),
            sql_state: e.sql_state().map(|s| s.code().to_owned()),
            message: e.to_string(),
        }
    }
}

impl From<tokio_postgres::Error> for StepError {
    fn from(e: tokio_postgres::Error) -> Self {
        StepError {
            kind: "Db".into(),
            sql_state: e.code().map(|s| s.code().to_owned()),
            // The server's words: the driver's own text for a server error is "db error".
            message: crate::words(&e),
        }
    }
}

/// One session of a script, as its steps see it: a plain connection for SQL, and a rowlock
/// [`Db`](rowlock::Db) of one connection for rowlock calls. Both carry the session's name, so
/// the runner sees on the server which session waits.
pub struct Session {
    name: String,
    client: Client,
    db: rowlock::Db,
    /// What one step keeps for a later one (an open rowlock transaction), and its type's name.
    kept: std::sync::Mutex<Option<(Box<dyn std::any::Any + Send>, &'static str)>>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session").field("name", &self.name).finish()
    }
}

impl Session {
    /// The session's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The session's own connection: a transaction opened by one step (`BEGIN`) stays open
    /// for its next steps.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A rowlock handle whose pool has this session's one connection (another than
    /// [`client`](Self::client)'s).
    pub fn db(&self) -> &rowlock::Db {
        &self.db
    }

    /// Keeps `value` for a later step of this session (e.g. the rowlock
    /// [`Transaction`](rowlock::Transaction) a step opened and locked rows in, for the next
    /// step to write and commit). Replaces what was kept.
    pub fn keep<T: Send + 'static>(&self, value: T) {
        *self.kept.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Box::new(value), std::any::type_name::<T>()));
    }

    /// Takes what an earlier step kept. Nothing kept, or a value of another type, is an error
    /// of kind `NothingKept` naming both types; a value of another type stays kept.
    pub fn take<T: Send + 'static>(&self) -> Result<T, StepError> {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let what = match kept.take() {
            Some((value, name)) => match value.downcast::<T>() {
                Ok(value) => return Ok(*value),
                Err(value) => {
                    *kept = Some((value, name));
                    format!("a {name}")
                }
            },
            None => "nothing".to_owned(),
        };
        Err(StepError {
            kind: "NothingKept".into(),
            sql_state: None,
            message: format!(
                "session {} kept {what}, and this step takes a {}",
                self.name,
                std::any::type_name::<T>()
            ),
        })
    }
}

/// A step: the code one session runs at one point of a permutation. Add closures with
/// [`SessionSpec::step`]; a type of yours implementing this trait (with `#[async_trait]`) with
/// [`SessionSpec::step_with`].
#[async_trait]
pub trait Step: Send + Sync {
    /// Runs the step on its session.
    async fn run(&self, session: &Session) -> StepResult;
}

/// A closure as a step.
struct FnStep<F>(F);

#[async_trait]
impl<F> Step for FnStep<F>
where
    F: for<'s> Fn(&'s Session) -> rowlock::BoxFuture<'s, StepResult> + Send + Sync,
{
    async fn run(&self, session: &Session) -> StepResult {
        (self.0)(session).await
    }
}

/// SQL run on the session's own connection with the simple protocol (several statements
/// allowed); the record shows the last statement's rows, or its command tag's row count.
struct Sql(String);

#[async_trait]
impl Step for Sql {
    async fn run(&self, session: &Session) -> StepResult {
        let messages = session.client.simple_query(&self.0).await?;
        Ok(describe_messages(&messages))
    }
}

/// Each statement's result, `; `-separated: its rows (`1, open | 2, taken`; `(no rows)`) if it
/// returns rows, else the rows it changed (`1 row`, `3 rows`), or `ok`.
fn describe_messages(messages: &[SimpleQueryMessage]) -> String {
    let mut parts = Vec::new();
    let mut rows: Vec<String> = Vec::new();
    let mut returns_rows = false;
    for m in messages {
        match m {
            SimpleQueryMessage::RowDescription(_) => returns_rows = true,
            SimpleQueryMessage::Row(row) => rows.push(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("NULL").to_owned())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            SimpleQueryMessage::CommandComplete(n) => {
                parts.push(match (returns_rows, *n) {
                    (true, _) if rows.is_empty() => "(no rows)".to_owned(),
                    (true, _) => rows.join(" | "),
                    (false, 0) => "ok".to_owned(),
                    (false, 1) => "1 row".to_owned(),
                    (false, n) => format!("{n} rows"),
                });
                rows.clear();
                returns_rows = false;
            }
            _ => {}
        }
    }
    let informative: Vec<String> = parts.iter().filter(|p| *p != "ok").cloned().collect();
    if informative.is_empty() {
        "ok".to_owned()
    } else {
        informative.join("; ")
    }
}

/// The steps of one session, in order.
pub struct SessionSpec {
    name: String,
    steps: Vec<(String, Arc<dyn Step>)>,
}

impl fmt::Debug for SessionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionSpec")
            .field("name", &self.name)
            .field(
                "steps",
                &self.steps.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl SessionSpec {
    /// Adds a step: the session's own code, `|s| Box::pin(async move { … })` returning a
    /// [`StepResult`] (the text the record shows, or an error; `?` converts rowlock's and the
    /// driver's errors).
    pub fn step<F>(self, name: impl Into<String>, step: F) -> Self
    where
        F: for<'s> Fn(&'s Session) -> rowlock::BoxFuture<'s, StepResult> + Send + Sync + 'static,
    {
        self.step_with(name, FnStep(step))
    }

    /// Adds a step of a type implementing [`Step`].
    pub fn step_with(mut self, name: impl Into<String>, step: impl Step + 'static) -> Self {
        self.steps.push((name.into(), Arc::new(step)));
        self
    }

    /// Adds a step of plain SQL on the session's own connection (several statements may be
    /// separated by `;`, e.g. `BEGIN; SELECT …`).
    pub fn sql(self, name: impl Into<String>, sql: impl Into<String>) -> Self {
        self.step_with(name, Sql(sql.into()))
    }
}

/// A race written as sessions of named steps (see the [module docs](self)).
pub struct Script {
    title: String,
    setup: Vec<String>,
    sessions: Vec<SessionSpec>,
    permutations: Vec<Vec<String>>,
    queries: Vec<(String, String)>,
    max_permutations: usize,
}

impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Script")
            .field("title", &self.title)
            .field("sessions", &self.sessions)
            .field("permutations", &self.permutations)
            .finish_non_exhaustive()
    }
}

impl Script {
    /// A script with this title and nothing in it yet.
    pub fn new(title: impl Into<String>) -> Self {
        Script {
            title: title.into(),
            setup: Vec::new(),
            sessions: Vec::new(),
            permutations: Vec::new(),
            queries: Vec::new(),
            max_permutations: 1000,
        }
    }

    /// SQL run once, before the permutations, on a template database that every permutation
    /// copies (the schema and the rows the race starts from).
    pub fn setup(mut self, sql: impl Into<String>) -> Self {
        self.setup.push(sql.into());
        self
    }

    /// Adds a session, its steps added by `steps`.
    pub fn session(
        mut self,
        name: impl Into<String>,
        steps: impl FnOnce(SessionSpec) -> SessionSpec,
    ) -> Self {
        self.sessions.push(steps(SessionSpec {
            name: name.into(),
            steps: Vec::new(),
        }));
        self
    }

    /// Runs this permutation (step names in order; every step once, each session's steps in
    /// their order). Without any, every permutation runs.
    pub fn permutation<I, S>(mut self, steps: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.permutations
            .push(steps.into_iter().map(Into::into).collect());
        self
    }

    /// A query whose result is recorded after each permutation (its rows, as
    /// [`Record::query`] gives them), e.g. the rows an invariant is about.
    pub fn query(mut self, name: impl Into<String>, sql: impl Into<String>) -> Self {
        self.queries.push((name.into(), sql.into()));
        self
    }

    /// Most permutations generated when none are listed (default 1000): more is refused with
    /// [`HarnessError::Config`], naming the count, before anything runs.
    pub fn max_permutations(mut self, max: usize) -> Self {
        self.max_permutations = max;
        self
    }

    /// Runs the script on the process-wide test cluster ([`TestCluster::shared`]).
    pub async fn run(&self) -> Result<Report, HarnessError> {
        self.run_on(TestCluster::shared()?).await
    }

    /// Runs the script on `cluster`: the setup once on a template database, then each
    /// permutation on a fresh copy of it, dropped afterwards.
    pub async fn run_on(&self, cluster: &TestCluster) -> Result<Report, HarnessError> {
        let permutations = self.plan()?;
        let admin = connect(cluster.config()).await?;
        let tag = RandomState::new().hash_one(0_u8);
        let template = format!("interleave_{}_{tag:016x}", std::process::id());
        admin
            .batch_execute(&format!("CREATE DATABASE {template}"))
            .await
            .map_err(HarnessError::Sql)?;
        let result = self
            .run_all(cluster, &admin, &template, &permutations)
            .await;
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {template} WITH (FORCE)"))
            .await;
        result
    }

    async fn run_all(
        &self,
        cluster: &TestCluster,
        admin: &Client,
        template: &str,
        permutations: &[Vec<(usize, usize)>],
    ) -> Result<Report, HarnessError> {
        {
            let setup = connect(&on_database(cluster.config(), template, "setup")).await?;
            for sql in &self.setup {
                setup
                    .batch_execute(sql)
                    .await
                    .map_err(|e| crate::cluster::setup_failed(sql, e))?;
            }
        }
        let mut records = Vec::with_capacity(permutations.len());
        for (i, order) in permutations.iter().enumerate() {
            let database = format!("{template}_{i}");
            admin
                .batch_execute(&format!("CREATE DATABASE {database} TEMPLATE {template}"))
                .await
                .map_err(HarnessError::Sql)?;
            let started = Instant::now();
            let record = self.run_one(cluster, &database, order).await;
            let elapsed = started.elapsed();
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                .await;
            let mut record = record?;
            record.elapsed = elapsed;
            records.push(record);
        }
        Ok(Report {
            title: self.title.clone(),
            records,
        })
    }

    /// The permutations to run, as (session, step) pairs: the listed ones, checked, or all.
    fn plan(&self) -> Result<Vec<Vec<(usize, usize)>>, HarnessError> {
        let mut names = BTreeMap::new();
        for (s, session) in self.sessions.iter().enumerate() {
            for (k, (name, _)) in session.steps.iter().enumerate() {
                if names.insert(name.clone(), (s, k)).is_some() {
                    return Err(HarnessError::Config(format!(
                        "script {:?}: two steps are named {name:?}",
                        self.title
                    )));
                }
            }
        }
        if names.is_empty() {
            return Err(HarnessError::Config(format!(
                "script {:?} has no steps",
                self.title
            )));
        }
        if self.permutations.is_empty() {
            let lengths: Vec<usize> = self.sessions.iter().map(|s| s.steps.len()).collect();
            let count = interleavings(&lengths);
            if count > self.max_permutations as u128 {
                return Err(HarnessError::Config(format!(
                    "script {:?}: sessions of {lengths:?} steps have {count} permutations, more \
                     than the cap of {}; list the ones that matter with permutation(..) or \
                     raise the cap with max_permutations(..)",
                    self.title, self.max_permutations
                )));
            }
            return Ok(all_interleavings(&lengths));
        }
        self.permutations
            .iter()
            .map(|p| {
                let order = p
                    .iter()
                    .map(|name| {
                        names.get(name).copied().ok_or_else(|| {
                            HarnessError::Config(format!(
                                "script {:?}: permutation {p:?} names no step {name:?}",
                                self.title
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mut next = vec![0; self.sessions.len()];
                for &(s, k) in &order {
                    if k != next[s] {
                        return Err(HarnessError::Config(format!(
                            "script {:?}: permutation {p:?} does not run session {:?}'s steps \
                             once each, in order",
                            self.title, self.sessions[s].name
                        )));
                    }
                    next[s] += 1;
                }
                if next
                    .iter()
                    .zip(&self.sessions)
                    .any(|(n, s)| *n != s.steps.len())
                {
                    return Err(HarnessError::Config(format!(
                        "script {:?}: permutation {p:?} leaves steps out",
                        self.title
                    )));
                }
                Ok(order)
            })
            .collect()
    }

    /// Runs one permutation on `database`.
    async fn run_one(
        &self,
        cluster: &TestCluster,
        database: &str,
        order: &[(usize, usize)],
    ) -> Result<Record, HarnessError> {
        let mut sessions = Vec::with_capacity(self.sessions.len());
        for (i, spec) in self.sessions.iter().enumerate() {
            let app = format!("{APP_PREFIX}{}", spec.name);
            let config = on_database(cluster.config(), database, &app);
            let client = connect(&config).await?;
            // Of sessions deadlocked together, the first (lowest deadlock_timeout) finds the
            // deadlock and fails, whatever the load (where the role may set it; a role that
            // may not keeps the server's setting, and the first to wait fails).
            let _ = client
                .batch_execute(&format!("SET deadlock_timeout = '{}ms'", 200 * (i + 1)))
                .await;
            let db = rowlock::Db::builder()
                .config(config)
                .max_size(1)
                .build()
                .map_err(|e| HarnessError::Config(e.to_string()))?;
            sessions.push(Arc::new(Session {
                name: spec.name.clone(),
                client,
                db,
                kept: std::sync::Mutex::new(None),
            }));
        }
        let observer = connect(&on_database(cluster.config(), database, "observer")).await?;
        let mut run = Run::default();
        for &(s, k) in order {
            let (name, step) = &self.sessions[s].steps[k];
            // Sessions deadlocked with each other: the server breaks the cycle (failing one of
            // them) without any other step running, so wait for that.
            while run.running.iter().any(|r| r.session == s)
                && run.deadlocked(&blocked_sessions(&observer).await?)
            {
                run.progress(&observer).await?;
            }
            if let Some(waiting) = run.running.iter().find(|r| r.session == s) {
                run.lines.push(Line::Invalid {
                    step: name.clone(),
                    waiting: waiting.step.clone(),
                });
                for r in run.running.drain(..) {
                    r.task.abort();
                }
                return Ok(Record::finish(
                    order_names(self, order),
                    run.lines,
                    Vec::new(),
                ));
            }
            let (session, step) = (sessions[s].clone(), step.clone());
            run.running.push(Running {
                session: s,
                session_name: self.sessions[s].name.clone(),
                step: name.clone(),
                task: tokio::spawn(async move { step.run(&session).await }),
                reported_waiting: false,
            });
            run.settle(&observer).await?;
        }
        // Every step has started: whatever still waits finishes once what it waits for does
        // (a deadlock is broken by the server failing one of the waiters).
        while !run.running.is_empty() {
            run.progress(&observer).await?;
        }
        let mut results = Vec::with_capacity(self.queries.len());
        for (name, sql) in &self.queries {
            let messages = observer
                .simple_query(sql)
                .await
                .map_err(HarnessError::Sql)?;
            results.push((name.clone(), describe_messages(&messages)));
        }
        Ok(Record::finish(order_names(self, order), run.lines, results))
    }
}

fn order_names(script: &Script, order: &[(usize, usize)]) -> Vec<String> {
    order
        .iter()
        .map(|&(s, k)| script.sessions[s].steps[k].0.clone())
        .collect()
}

/// Connection settings for `database`, named `application_name` on the server.
fn on_database(config: &Config, database: &str, application_name: &str) -> Config {
    let mut config = config.clone();
    config.dbname(database).application_name(application_name);
    config
}

/// A step started and not yet completed.
struct Running {
    session: usize,
    session_name: String,
    step: String,
    task: JoinHandle<StepResult>,
    reported_waiting: bool,
}

/// The state of one permutation's run.
#[derive(Default)]
struct Run {
    running: Vec<Running>,
    lines: Vec<Line>,
}

impl Run {
    /// After a step started: waits until every running step has completed or waits for a
    /// lock (as the server reports it), recording completions and first waits.
    async fn settle(&mut self, observer: &Client) -> Result<(), HarnessError> {
        let started = Instant::now();
        loop {
            self.complete_finished().await;
            if self.running.is_empty() {
                return Ok(());
            }
            let blocked = blocked_sessions(observer).await?;
            // A step counts as waiting only if its task is still running after the server
            // said its session waits, and no connection it waits for is still busy without a
            // step of the script running on it: that one is finishing what its step already
            // returned from (a failed statement's error reaches the client before the server
            // aborts the transaction and releases its locks) and the wait is about to end.
            if self.running.iter().all(|r| {
                blocked.get(&r.session_name).is_some_and(|b| {
                    b.busy
                        .iter()
                        .all(|s| self.running.iter().any(|o| &o.session_name == s))
                }) && !r.task.is_finished()
            }) {
                for r in &mut self.running {
                    if !r.reported_waiting {
                        r.reported_waiting = true;
                        self.lines.push(Line::Waits {
                            step: r.step.clone(),
                            on: blocked[&r.session_name].on.clone(),
                        });
                    }
                }
                return Ok(());
            }
            self.check_limit(started)?;
            tokio::time::sleep(POLL).await;
        }
    }

    /// With nothing left to start: waits until a running step completes, then settles.
    async fn progress(&mut self, observer: &Client) -> Result<(), HarnessError> {
        let started = Instant::now();
        let before = self.running.len();
        loop {
            self.complete_finished().await;
            if self.running.len() < before {
                return self.settle(observer).await;
            }
            self.check_limit(started)?;
            tokio::time::sleep(POLL).await;
        }
    }

    /// Whether every running step waits, and only for sessions whose steps are waiting too:
    /// a deadlock, which the server breaks after its `deadlock_timeout`.
    fn deadlocked(&self, blocked: &BTreeMap<String, Blocked>) -> bool {
        !self.running.is_empty()
            && self.running.iter().all(|r| {
                blocked.get(&r.session_name).is_some_and(|b| {
                    !b.on.is_empty()
                        && b.on
                            .iter()
                            .all(|b| self.running.iter().any(|o| &o.session_name == b))
                })
            })
    }

    fn check_limit(&self, started: Instant) -> Result<(), HarnessError> {
        if started.elapsed() <= STEP_LIMIT {
            return Ok(());
        }
        Err(HarnessError::Timeout(
            STEP_LIMIT,
            format!(
                "steps {:?} to complete or wait for a lock",
                self.running.iter().map(|r| &r.step).collect::<Vec<_>>()
            ),
        ))
    }

    /// Records the steps whose task finished. Several finishing between two looks are put in
    /// causal order, the same on every run: the step that just started first (its effect
    /// released the others), then steps that failed while waiting (a deadlock's victim, whose
    /// failure releases its locks), then the other waiters in the order they started.
    async fn complete_finished(&mut self) {
        let mut finished = Vec::new();
        let mut i = 0;
        let mut position = 0;
        while i < self.running.len() {
            if self.running[i].task.is_finished() {
                finished.push((position, self.running.remove(i)));
            } else {
                i += 1;
            }
            position += 1;
        }
        let mut done = Vec::with_capacity(finished.len());
        for (position, r) in finished {
            let result = match r.task.await {
                Ok(result) => result,
                Err(e) => Err(StepError {
                    kind: "Panic".into(),
                    sql_state: None,
                    message: e.to_string(),
                }),
            };
            let key = (r.reported_waiting, result.is_ok(), position);
            done.push((key, r.step, r.reported_waiting, result));
        }
        done.sort_by_key(|(key, ..)| *key);
        for (_, step, after_waiting, result) in done {
            self.lines.push(Line::Done {
                step,
                result: result.map_err(|e| Failed {
                    shown: e.to_string(),
                    message: e.message,
                }),
                after_waiting,
            });
        }
    }
}

/// Whom a session of the script waits for.
struct Blocked {
    /// The sessions it waits for (by name; a connection that is not a session's by its
    /// `application_name`).
    on: Vec<String>,
    /// Those of them with a connection still running a statement, and not waiting for a lock
    /// itself.
    busy: Vec<String>,
}

/// The sessions of the script that wait for a lock, each with whom it waits for.
async fn blocked_sessions(observer: &Client) -> Result<BTreeMap<String, Blocked>, HarnessError> {
    // Every backend once: its session's name (another connection keeps its
    // `application_name`), and whether it runs a statement without waiting for a lock.
    const BLOCKED: &str = "WITH a AS ( \
            SELECT pid, datname, application_name LIKE $1 || '%' AS ours, \
                   CASE WHEN application_name LIKE $1 || '%' \
                        THEN substr(application_name, length($1) + 1) \
                        ELSE coalesce(application_name, '') END AS name, \
                   state = 'active' AND wait_event_type IS DISTINCT FROM 'Lock' AS busy \
            FROM pg_catalog.pg_stat_activity) \
        SELECT w.name, \
               coalesce(array_agg(DISTINCT b.name) FILTER (WHERE b.pid IS NOT NULL), '{}'), \
               coalesce(array_agg(DISTINCT b.name) FILTER (WHERE b.busy), '{}') \
        FROM a w LEFT JOIN a b ON b.pid = ANY (pg_catalog.pg_blocking_pids(w.pid)) \
        WHERE w.datname = current_database() AND w.ours \
          AND cardinality(pg_catalog.pg_blocking_pids(w.pid)) > 0 \
        GROUP BY 1";
    let rows = observer
        .query(BLOCKED, &[&APP_PREFIX])
        .await
        .map_err(HarnessError::Sql)?;
    Ok(rows
        .iter()
        .map(|row| {
            let blocked = Blocked {
                on: row.get(1),
                busy: row.get(2),
            };
            (row.get::<_, String>(0), blocked)
        })
        .collect())
}

/// A step's error in a record: what the record shows (kind and SQLSTATE, stable between
/// runs) and the error's whole text, for a human.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failed {
    shown: String,
    message: String,
}

/// A line of a permutation's record.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    /// A step completed.
    Done {
        step: String,
        result: Result<String, Failed>,
        after_waiting: bool,
    },
    /// A step waits for a lock held by these sessions.
    Waits { step: String, on: Vec<String> },
    /// A step could not start: its session still waits in an earlier step.
    Invalid { step: String, waiting: String },
}

/// What one permutation did: its steps' results in the order they completed, who waited for
/// whom, and the queries' results at the end.
#[derive(Debug, Clone)]
pub struct Record {
    order: Vec<String>,
    lines: Vec<Line>,
    queries: Vec<(String, String)>,
    elapsed: Duration,
}

impl Record {
    fn finish(order: Vec<String>, lines: Vec<Line>, queries: Vec<(String, String)>) -> Record {
        Record {
            order,
            lines,
            queries,
            elapsed: Duration::ZERO,
        }
    }

    /// The steps in the order this permutation started them.
    pub fn order(&self) -> &[String] {
        &self.order
    }

    /// What `step` returned (`Ok` with its text, `Err` with `error Kind (SQLSTATE)`), or
    /// `None` if it did not run (an invalid permutation).
    pub fn result(&self, step: &str) -> Option<Result<&str, &str>> {
        self.lines.iter().find_map(|l| match l {
            Line::Done {
                step: s, result, ..
            } if s == step => Some(match result {
                Ok(text) => Ok(text.as_str()),
                Err(e) => Err(e.shown.as_str()),
            }),
            _ => None,
        })
    }

    /// The whole text of `step`'s error, if it failed: the record shows only its kind and
    /// SQLSTATE, which stay the same between runs; this names the objects and values.
    pub fn error_message(&self, step: &str) -> Option<&str> {
        self.lines.iter().find_map(|l| match l {
            Line::Done {
                step: s,
                result: Err(e),
                ..
            } if s == step => Some(e.message.as_str()),
            _ => None,
        })
    }

    /// Each failed step's whole error text, a line each (for a human reading a failure).
    fn error_messages(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().filter_map(|l| match l {
            Line::Done {
                step,
                result: Err(e),
                ..
            } => Some((step.as_str(), e.message.as_str())),
            _ => None,
        })
    }

    /// Whether `step` waited for a lock.
    pub fn waited(&self, step: &str) -> bool {
        self.lines
            .iter()
            .any(|l| matches!(l, Line::Waits { step: s, .. } if s == step))
    }

    /// The result of the script's query `name` at the end of the permutation.
    pub fn query(&self, name: &str) -> Option<&str> {
        self.queries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r.as_str())
    }

    /// Whether the permutation could not run to its end: a step's session still waited in
    /// an earlier step (as the isolation tester reports an invalid permutation).
    pub fn is_invalid(&self) -> bool {
        self.lines.iter().any(|l| matches!(l, Line::Invalid { .. }))
    }

    /// How long the permutation took (not part of the text compared with expected files).
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "permutation {}", self.order.join(" "))?;
        for line in &self.lines {
            match line {
                Line::Done {
                    step,
                    result,
                    after_waiting,
                } => {
                    let done = if *after_waiting {
                        " (after waiting)"
                    } else {
                        ""
                    };
                    match result {
                        Ok(text) => writeln!(f, "  {step}: {text}{done}")?,
                        Err(e) => writeln!(f, "  {step}: {}{done}", e.shown)?,
                    }
                }
                Line::Waits { step, on } => {
                    writeln!(f, "  {step}: waits for {}", on.join(", "))?;
                }
                Line::Invalid { step, waiting } => writeln!(
                    f,
                    "  {step}: cannot start, its session waits in {waiting} (invalid permutation)"
                )?,
            }
        }
        for (name, result) in &self.queries {
            writeln!(f, "  {name}: {result}")?;
        }
        Ok(())
    }
}

/// Every permutation's [`Record`] of one run of a [`Script`].
#[derive(Debug, Clone)]
pub struct Report {
    title: String,
    records: Vec<Record>,
}

impl Report {
    /// The records, one per permutation, in the order they ran.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The time each permutation took, one line each (for the test's output; not compared).
    pub fn timings(&self) -> String {
        let mut out = String::new();
        for r in &self.records {
            let _ = writeln!(
                out,
                "{:>8.1} ms  {}",
                r.elapsed.as_secs_f64() * 1000.0,
                r.order.join(" ")
            );
        }
        out
    }

    /// Panics, naming the permutation and printing its record, unless `check` holds for
    /// every permutation that ran to its end.
    pub fn assert_each(&self, check: impl Fn(&Record) -> bool) {
        for r in self.records.iter().filter(|r| !r.is_invalid()) {
            assert!(
                check(r),
                "script {:?}: the check fails for\n{r}{}",
                self.title,
                messages(std::slice::from_ref(r))
            );
        }
    }

    /// Compares the report's text with the file at `path`. A mismatch panics with a unified
    /// diff (expected, then actual); with `ROWLOCK_TESTING_BLESS=1` in the environment the
    /// file is (re)written instead. A missing file fails too, unless blessing.
    pub fn assert_matches_file(&self, path: impl AsRef<Path>) {
        let path = path.as_ref();
        if std::env::var_os("ROWLOCK_TESTING_BLESS").is_some() {
            if let Err(e) = std::fs::write(path, self.to_string()) {
                panic!("writing {}: {e}", path.display());
            }
            return;
        }
        if let Err(diff) = self.compare_with_file(path) {
            panic!("{diff}");
        }
    }

    /// Compares the report's text with the file at `path` (never rewriting it): the diff as
    /// an error.
    pub fn compare_with_file(&self, path: &Path) -> Result<(), String> {
        let actual = self.to_string();
        let expected = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "{}: {e}; run with ROWLOCK_TESTING_BLESS=1 to write it. The report:\n{actual}",
                path.display()
            )
        })?;
        if expected == actual {
            return Ok(());
        }
        let diff = similar::TextDiff::from_lines(&expected, &actual);
        Err(format!(
            "script {:?} does not match {} (run with ROWLOCK_TESTING_BLESS=1 to accept the \
             new output):\n{}{}",
            self.title,
            path.display(),
            diff.unified_diff()
                .context_radius(3)
                .header("expected", "actual"),
            messages(&self.records)
        ))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# {}", self.title)?;
        for r in &self.records {
            writeln!(f)?;
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// The whole text of the steps' errors in `records`, each distinct one once, after a
/// heading; empty when no step failed. For a failure's reader: the records show only kinds.
fn messages(records: &[Record]) -> String {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = String::new();
    for (step, message) in records.iter().flat_map(Record::error_messages) {
        if seen.insert((step, message)) {
            let _ = writeln!(out, "  {step}: {message}");
        }
    }
    if out.is_empty() {
        out
    } else {
        format!("\nthe steps' errors in full:\n{out}")
    }
}

/// The number of interleavings of sessions with these step counts (a multinomial).
fn interleavings(lengths: &[usize]) -> u128 {
    let mut total: u128 = 1;
    let mut placed: u128 = 0;
    for &n in lengths {
        for i in 1..=n as u128 {
            placed += 1;
            total = total.saturating_mul(placed) / i;
        }
    }
    total
}

/// Every interleaving of sessions with these step counts, in lexicographic order of the
/// session indexes (the first session's steps as early as possible first).
fn all_interleavings(lengths: &[usize]) -> Vec<Vec<(usize, usize)>> {
    fn go(
        lengths: &[usize],
        next: &mut Vec<usize>,
        current: &mut Vec<(usize, usize)>,
        out: &mut Vec<Vec<(usize, usize)>>,
    ) {
        if current.len() == lengths.iter().sum::<usize>() {
            out.push(current.clone());
            return;
        }
        for s in 0..lengths.len() {
            if next[s] < lengths[s] {
                current.push((s, next[s]));
                next[s] += 1;
                go(lengths, next, current, out);
                next[s] -= 1;
                current.pop();
            }
        }
    }
    let mut out = Vec::new();
    go(
        lengths,
        &mut vec![0; lengths.len()],
        &mut Vec::new(),
        &mut out,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleavings_are_counted_and_listed_in_order() {
        assert_eq!(interleavings(&[2, 2]), 6);
        assert_eq!(interleavings(&[3, 3, 3]), 1680);
        assert_eq!(interleavings(&[1]), 1);
        let all = all_interleavings(&[2, 1]);
        assert_eq!(
            all,
            [
                vec![(0, 0), (0, 1), (1, 0)],
                vec![(0, 0), (1, 0), (0, 1)],
                vec![(1, 0), (0, 0), (0, 1)],
            ]
        );
        assert_eq!(all_interleavings(&[2, 2]).len(), 6);
    }
}
