//! The test harness of [rowlock](https://docs.rs/rowlock): real PostgreSQL with no setup, for
//! rowlock's own tests and for yours (add it as a dev-dependency).
//!
//! - [`TestCluster::shared`] gives the process-wide server: the one `DATABASE_URL` names, or
//!   a throwaway cluster started from the installed server binaries in a temporary directory,
//!   on a free loopback port, as an unprivileged user when running as root. No downloads.
//! - [`TestCluster::create_database`] gives each test its own fresh database, so tests run in
//!   parallel; a failed test's database is left for inspection (the whole throwaway cluster
//!   is deleted when the process exits). [`TestCluster::create_database_with`] copies one
//!   from a template its setup SQL made once, and [`macro@test`] hands an async test a
//!   [`rowlock::Db`] on such a copy.
//! - [`interleave`] runs a race written as sessions of named steps in every interleaving,
//!   detecting from the server which step waits for which, and compares the records with an
//!   expected file or checks an invariant on each.
//! - No server outlives the process: a guardian process stops and deletes the cluster when
//!   the test process exits, panics or is killed.
//! - [`wait_for_blocked_by`] and [`wait_until_blocked`] make race tests deterministic: they
//!   wait until the server reports a session blocked on a lock, instead of sleeping.
//! - [`TestCluster::start`], [`TestCluster::restart`], [`TestCluster::terminate_backend`]
//!   serve fault tests.
//! - [`HaStack`] starts the high-availability stack teams run (etcd, two Patroni nodes with
//!   synchronous replication, HAProxy routing one address to the primary, optionally
//!   PgBouncer in front) for switchover and failover tests: `patronictl switchover`, a node
//!   killed, a node rejoining.
//!
//! ```no_run
//! use rowlock_testing::{TestCluster, wait_for_blocked_by};
//! use std::time::Duration;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let db = TestCluster::shared()?.create_database().await?;
//! let holder = db.session().await?;
//! holder.batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);
//!                       BEGIN; SELECT * FROM t FOR UPDATE").await?;
//! let waiter = db.session().await?;
//! let blocked = tokio::spawn(async move {
//!     waiter.batch_execute("SELECT * FROM t FOR UPDATE").await
//! });
//! let observer = db.session().await?;
//! wait_for_blocked_by(&observer, holder.pid(), 1, Duration::from_secs(10)).await?;
//! holder.batch_execute("COMMIT").await?;
//! blocked.await??;
//! # Ok(()) }
//! ```

mod cluster;
mod database;
mod ha;
pub mod interleave;
mod wait;

use std::time::Duration;

pub use cluster::{StopMode, TestCluster, server_bindir};
pub use database::{Session, TestDatabase};
pub use ha::{FAST_TIMING, HaStack, HaTiming};
pub use wait::{wait_for_blocked_by, wait_until_blocked};

/// Why the harness could not provide a server or finish a helper.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive] // more failure classes may be told apart later.
pub enum HarnessError {
    /// A program the harness runs was not found: the PostgreSQL server binaries, or PgBouncer,
    /// Patroni, etcd or HAProxy when asked for; the message names it and says what to install.
    #[error("a program the test harness needs was not found: {0}")]
    NoBinaries(String),
    /// The cluster could not be created or started; the message includes the server's log.
    #[error("could not start the test cluster: {0}")]
    Start(String),
    /// A setting (such as `DATABASE_URL`) is not usable.
    #[error("invalid test configuration: {0}")]
    Config(String),
    /// A file or process operation failed.
    #[error("test harness I/O failed: {0}")]
    Io(String),
    /// Connecting to the test server failed; printed with the server's or the OS's words
    /// (the driver's own text for a server error is only "db error").
    #[error("could not connect to the test server: {}", words(.0))]
    Connect(tokio_postgres::Error),
    /// A query the harness runs failed; printed with the server's words.
    #[error("a test harness query failed: {}", words(.0))]
    Sql(tokio_postgres::Error),
    /// A test's setup SQL failed: the server's words and, when the server points at a place
    /// in it, where (`location`). Nothing of it is kept: the next test with the same setup
    /// runs it again.
    #[error("the setup SQL failed{location}: {}", words(.error))]
    Setup {
        /// Where in the setup the server points: " at line 2, column 3 (" and that line's
        /// text in backquotes and ")"; empty when the server points nowhere.
        location: String,
        /// The server's error.
        error: tokio_postgres::Error,
    },
    /// The operation needs a throwaway cluster but the server is `DATABASE_URL`'s.
    #[error("not supported here: {0}")]
    Unsupported(String),
    /// A wait helper gave up.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

use cluster::connect;

/// What a driver error says: the server's message (with its detail and hint), or the
/// driver's text and its cause (an I/O error, say).
pub(crate) fn words(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.to_string();
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// An async test handed a fresh database, copied from a template its `setup` SQL made once:
///
/// ```no_run
/// #[rowlock_testing::test(setup = "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint);
///                                  INSERT INTO accounts VALUES (1, 100)")]
/// async fn withdraws(db: rowlock::Db) {
///     // … a fresh copy of the schema and rows, for this test alone …
/// }
/// ```
///
/// The function is `async`; it takes nothing, a [`rowlock::Db`] (a pool of 4 connections) or
/// a [`TestDatabase`], and may return a `Result`. `setup` is any `&str` expression (a literal,
/// or a `const` several tests share); `setup_file = "path"` (relative to the crate's
/// `Cargo.toml`) reads the setup from a file. Each test runs on a multi-threaded
/// Tokio runtime of its own, with the shared cluster ([`TestCluster::shared`]). Other
/// attributes (`#[ignore]`, …) are kept.
pub use rowlock::__test_attribute as test;

#[doc(hidden)]
pub mod __private {
    //! What `#[rowlock_testing::test]` expands to; not a stable API.

    use std::future::Future;

    use super::{TestCluster, TestDatabase};

    /// What a test can be handed.
    pub trait TestArg: Sized {
        /// The argument, and the database to keep until the test ends (dropping it drops the
        /// database).
        fn make(db: TestDatabase) -> (Self, Option<TestDatabase>);
    }

    impl TestArg for TestDatabase {
        fn make(db: TestDatabase) -> (Self, Option<TestDatabase>) {
            (db, None)
        }
    }

    impl TestArg for rowlock::Db {
        fn make(db: TestDatabase) -> (Self, Option<TestDatabase>) {
            (db.db(4), Some(db))
        }
    }

    /// Runs `test` on a multi-threaded runtime of its own with a fresh database of the shared
    /// cluster, copied from the template `setup` made (empty `setup`: an empty database).
    /// Panics, naming the cause, when no server can be had.
    pub fn run<A, F, Fut, T>(setup: &str, test: F) -> T
    where
        A: TestArg,
        F: FnOnce(A) -> Fut,
        Fut: Future<Output = T>,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a Tokio runtime for the test");
        let cluster = TestCluster::shared().unwrap_or_else(|e| panic!("test cluster: {e}"));
        runtime.block_on(async move {
            let db = if setup.is_empty() {
                cluster.create_database().await
            } else {
                cluster.create_database_with(setup).await
            }
            .unwrap_or_else(|e| panic!("test database: {e}"));
            let (arg, keep) = A::make(db);
            let out = test(arg).await;
            drop(keep);
            out
        })
    }
}
