//! A throwaway PostgreSQL cluster started from the installed server binaries.

use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;

use tokio_postgres::{Config, NoTls};

use super::HarnessError;
use super::database::TestDatabase;

/// How long the server may take to start before the harness gives up.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings for a test cluster: durability off (nothing needs to survive a crash of a
/// throwaway cluster), enough connections for concurrent tests, loopback only.
const SERVER_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "300"),
    ("shared_buffers", "128MB"),
    ("listen_addresses", "127.0.0.1"),
    ("log_min_messages", "warning"),
];

/// Watches stdin; when it closes (the owning process exited, however it exited), stops what
/// runs in the directory and removes it. Every process writes its pid to a file the script
/// knows, and they stop in an order that leaves nothing to restart anything: failover managers
/// first (`run/manager-*.pid`: none may start a server again), then poolers and proxies
/// (`pgbouncer.pid`, `run/proxy-*.pid`), then the servers (`data/postmaster.pid` of the
/// cluster, or of each node's directory), then the configuration store (`run/store-*.pid`).
/// Each group is signalled at once, given 10 s, then killed.
pub(crate) const GUARDIAN_SCRIPT: &str = r#"
trap '' INT TERM HUP
dir="$1"
while read -r _line; do :; done
stop() {
  sig="$1"; shift; pids=""
  for f in "$@"; do
    pid=$(head -n 1 "$f" 2>/dev/null)
    [ -n "$pid" ] && kill "-$sig" "$pid" 2>/dev/null && pids="$pids $pid"
  done
  i=0
  for pid in $pids; do
    while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 200 ]; do sleep 0.05; i=$((i+1)); done
    kill -KILL "$pid" 2>/dev/null
  done
}
stop TERM "$dir"/run/manager-*.pid
stop INT "$dir"/pgbouncer.pid "$dir"/run/proxy-*.pid
stop QUIT "$dir"/data/postmaster.pid "$dir"/*/data/postmaster.pid
stop TERM "$dir"/run/store-*.pid
rm -rf "$dir"
"#;

/// How to stop the server ([`TestCluster::stop`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive] // mirrors pg_ctl's shutdown modes.
pub enum StopMode {
    /// Disconnect clients, roll back their transactions, checkpoint (`SIGINT`).
    Fast,
    /// Quit at once without a checkpoint, like a crash; recovery runs at the next start
    /// (`SIGQUIT`).
    Immediate,
}

/// A PostgreSQL server for tests: either the one `DATABASE_URL` names, or a throwaway cluster
/// this process started.
///
/// A throwaway cluster lives in a temporary directory, listens on a free loopback port, runs
/// as an unprivileged user (the `postgres` system user, or `nobody`, when the tests run as
/// root), and is stopped and deleted by a small guardian process when its owner goes away:
/// when the `TestCluster` is dropped, and also when the test process exits or is killed
/// (Rust never drops statics: [`TestCluster::shared`]'s cluster is stopped by an `atexit`
/// handler that tells the guardian and waits for it, and, in a killed process, by the
/// guardian noticing that its stdin, a pipe from the test process, has closed).
#[derive(Debug)]
pub struct TestCluster {
    config: Config,
    url: String,
    embedded: Option<Embedded>,
    /// The port of a PgBouncer in front of the server (transaction pooling), if started.
    pooler_port: Option<u16>,
    /// Template databases made so far (see `create_database_with`).
    templates: tokio::sync::Mutex<Vec<String>>,
}

#[derive(Debug)]
struct Embedded {
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    run_as: Option<String>,
    /// Server settings on top of (or instead of) [`SERVER_SETTINGS`].
    settings: Vec<(String, String)>,
    server: Mutex<Option<Child>>,
    pooler: Mutex<Option<Child>>,
    guardian: Mutex<Option<(Child, ChildStdin)>>,
}

static SHARED: OnceLock<Result<TestCluster, String>> = OnceLock::new();

/// Has the process stop the shared cluster when it exits normally (the test harness returns
/// from `main` or calls `std::process::exit`, which runs the C library's `atexit` handlers):
/// its guardian is told at once and waited for, so the cluster is gone before the test
/// process is, not a moment after it. A process killed by a signal runs no handler; its
/// guardian still notices the closed pipe and stops the cluster then.
fn stop_shared_at_exit() {
    extern "C" fn stop_shared() {
        let Some(Ok(cluster)) = SHARED.get() else {
            return;
        };
        let Some(embedded) = &cluster.embedded else {
            return;
        };
        // Another thread may hold the lock while the process exits: leave it to the guardian.
        let Ok(mut guardian) = embedded.guardian.try_lock() else {
            return;
        };
        if let Some((mut child, stdin)) = guardian.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }
    // SAFETY: `atexit` only records the function pointer; `stop_shared` takes no arguments,
    // does not unwind (it panics nowhere: every failure is ignored) and touches only
    // `SHARED`, a static that outlives every handler.
    #[allow(unsafe_code)]
    unsafe {
        atexit(stop_shared);
    }
}

unsafe extern "C" {
    /// The C library's `atexit(3)`.
    fn atexit(callback: extern "C" fn()) -> std::ffi::c_int;
}

impl TestCluster {
    /// The process-wide cluster: the `DATABASE_URL` server if that variable is set, otherwise
    /// a throwaway cluster started on first use and stopped when the process exits.
    ///
    /// Blocks while the cluster starts (a second or two, once per process).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), rowlock_testing::HarnessError> {
    /// let db = rowlock_testing::TestCluster::shared()?.create_database().await?;
    /// let handle = db.db(4);
    /// # Ok(()) }
    /// ```
    pub fn shared() -> Result<&'static TestCluster, HarnessError> {
        SHARED
            .get_or_init(|| {
                let cluster = TestCluster::from_env().map_err(|e| e.to_string())?;
                stop_shared_at_exit();
                Ok(cluster)
            })
            .as_ref()
            .map_err(|e| HarnessError::Start(e.clone()))
    }

    /// The `DATABASE_URL` server if set, else a new throwaway cluster owned by the returned
    /// value.
    ///
    /// With `ROWLOCK_TEST_PGBOUNCER=1` (or the path of a `pgbouncer` binary), a throwaway
    /// cluster also gets a PgBouncer in front of it, in transaction pooling mode; see
    /// [`TestCluster::start_behind_pgbouncer`].
    pub fn from_env() -> Result<TestCluster, HarnessError> {
        let pgbouncer = std::env::var("ROWLOCK_TEST_PGBOUNCER")
            .ok()
            .filter(|v| !v.trim().is_empty() && v != "0");
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => {
                if pgbouncer.is_some() {
                    return Err(HarnessError::Config(
                        "ROWLOCK_TEST_PGBOUNCER starts a PgBouncer in front of a throwaway \
                         cluster; unset DATABASE_URL, or point DATABASE_URL at your own \
                         PgBouncer instead"
                            .into(),
                    ));
                }
                TestCluster::external(&url)
            }
            _ => match pgbouncer.as_deref() {
                Some("1") => TestCluster::start_behind_pgbouncer(None),
                Some(path) => TestCluster::start_behind_pgbouncer(Some(Path::new(path))),
                None => TestCluster::start(),
            },
        }
    }

    /// Starts a throwaway cluster and a PgBouncer in front of it (`pool_mode = transaction`),
    /// run as the same unprivileged user and stopped with the cluster. `binary` defaults to
    /// `pgbouncer` on `PATH` or in `/usr/sbin` (Debian's `pgbouncer` package).
    ///
    /// [`TestDatabase::db`] then connects through PgBouncer and sets
    /// [`StatementCache::Transaction`](rowlock::StatementCache::Transaction) as the process
    /// default; [`TestDatabase::client`] and [`TestDatabase::session`] still connect to the
    /// server directly (lock holders and observers need a session of their own).
    pub fn start_behind_pgbouncer(binary: Option<&Path>) -> Result<TestCluster, HarnessError> {
        let binary = match binary {
            Some(path) => path.to_path_buf(),
            None => find_pgbouncer()?,
        };
        let mut cluster = TestCluster::start()?;
        let embedded = cluster.embedded.as_ref().expect("start() embeds a cluster");
        let mut last_error = None;
        for _ in 0..5 {
            let port = free_port()?;
            match embedded.start_pooler(&binary, port) {
                Ok(()) => {
                    cluster.pooler_port = Some(port);
                    return Ok(cluster);
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("five attempts were made"))
    }

    /// The port of the PgBouncer in front of this cluster, if one was started.
    pub fn pgbouncer_port(&self) -> Option<u16> {
        self.pooler_port
    }

    /// Connection settings for database `dbname` through the PgBouncer, if one was started.
    pub(super) fn pooled_config(&self, dbname: &str) -> Option<Config> {
        let port = self.pooler_port?;
        let mut config = Config::new();
        config
            .host("127.0.0.1")
            .port(port)
            .user("postgres")
            .dbname(dbname)
            .application_name("rowlock-testing")
            .connect_timeout(Duration::from_secs(10));
        Some(config)
    }

    /// Uses an existing server. Its role must be allowed to create databases.
    pub fn external(url: &str) -> Result<TestCluster, HarnessError> {
        let config = Config::from_str(url)
            .map_err(|e| HarnessError::Config(format!("DATABASE_URL is not valid: {e}")))?;
        Ok(TestCluster {
            config,
            url: url.to_string(),
            embedded: None,
            pooler_port: None,
            templates: tokio::sync::Mutex::default(),
        })
    }

    /// Starts a new throwaway cluster, whatever `DATABASE_URL` says. Use this for tests that
    /// stop or restart the server, so they do not disturb other tests.
    ///
    /// Server binaries are looked up in `ROWLOCK_PG_BINDIR`, then on `PATH`, then via
    /// `pg_config --bindir`, then under `/usr/lib/postgresql/*/bin` (newest version first).
    pub fn start() -> Result<TestCluster, HarnessError> {
        TestCluster::start_with(&[])
    }

    /// [`start`](Self::start) with server settings of the caller's on top of the test
    /// defaults (which turn durability off: `fsync`, `synchronous_commit` and
    /// `full_page_writes` are `off`). `&[("fsync", "on"), ("synchronous_commit", "on"),
    /// ("full_page_writes", "on")]` gives a server that keeps every acknowledged commit.
    ///
    /// A name or value with a NUL or a newline is refused with [`HarnessError::Config`].
    pub fn start_with(settings: &[(&str, &str)]) -> Result<TestCluster, HarnessError> {
        let embedded = Embedded::new(settings)?;
        embedded.init()?;
        TestCluster::serve(embedded)
    }

    /// [`start`](Self::start) with TLS: the server listens with `ssl = on` and a certificate
    /// for `localhost` and `127.0.0.1` signed by a certificate authority made for this cluster
    /// alone. Returns the cluster and that authority's certificate (PEM), for clients to
    /// trust (e.g. `rowlock::Builder::root_certificate_pem`, feature `rustls`,
    /// with a URL ending in `sslmode=require`). Plain connections are still accepted.
    pub fn start_with_tls() -> Result<(TestCluster, String), HarnessError> {
        let certs = self_signed()?;
        let mut embedded = Embedded::new(&[])?;
        let (cert, key) = (
            embedded.dir.join("server.crt"),
            embedded.dir.join("server.key"),
        );
        std::fs::write(&cert, &certs.server_cert).map_err(|e| io("writing server.crt", e))?;
        std::fs::write(&key, &certs.server_key).map_err(|e| io("writing server.key", e))?;
        // The server refuses a key others can read.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io("setting permissions on server.key", e))?;
        if let Some(user) = &embedded.run_as {
            chown(&cert, user)?;
            chown(&key, user)?;
        }
        for (name, value) in [
            ("ssl", "on".to_string()),
            ("ssl_cert_file", cert.display().to_string()),
            ("ssl_key_file", key.display().to_string()),
        ] {
            embedded.settings.push((name.to_string(), value));
        }
        embedded.init()?;
        Ok((TestCluster::serve(embedded)?, certs.ca_cert))
    }

    /// Starts a streaming standby of this cluster (embedded clusters only): a base backup
    /// taken with `pg_basebackup -R` (which writes the standby's connection settings) into a
    /// new temporary directory, run as the same unprivileged user, on a port of its own, and
    /// stopped with its own guardian like any throwaway cluster. `settings` are added to the
    /// test defaults, as for [`start_with`](Self::start_with).
    ///
    /// Databases created on this cluster appear on the standby once it has replayed them: see
    /// [`wait_for_replay`](Self::wait_for_replay). For synchronous replication, call
    /// [`set_synchronous_standby`](Self::set_synchronous_standby) on this cluster.
    pub fn start_standby(&self, settings: &[(&str, &str)]) -> Result<TestCluster, HarnessError> {
        let primary = self.embedded()?;
        let standby = Embedded::new(settings)?;
        standby.base_backup_from(primary.port)?;
        TestCluster::serve(standby)
    }

    /// Makes every standby synchronous (`synchronous_standby_names = '*'`), or none, and
    /// reloads the configuration. With it on, a commit is acknowledged only once a standby
    /// has flushed it (and waits while no standby is connected).
    pub async fn set_synchronous_standby(&self, on: bool) -> Result<(), HarnessError> {
        let client = self.admin_client().await?;
        let value = if on { "'*'" } else { "''" };
        // Two messages: ALTER SYSTEM cannot run in the implicit transaction of a multi-statement
        // query.
        client
            .batch_execute(&format!(
                "ALTER SYSTEM SET synchronous_standby_names = {value}"
            ))
            .await
            .map_err(HarnessError::Sql)?;
        client
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .map_err(HarnessError::Sql)
    }

    /// Promotes this standby to a primary (`pg_promote`, waiting up to 60 s for it to
    /// finish). Fails if the server is not a standby.
    pub async fn promote(&self) -> Result<(), HarnessError> {
        let client = self.admin_client().await?;
        let promoted: bool = client
            .query_one("SELECT pg_promote(true, 60)", &[])
            .await
            .map_err(HarnessError::Sql)?
            .get(0);
        if promoted {
            Ok(())
        } else {
            Err(HarnessError::Timeout(
                Duration::from_secs(60),
                "the standby to finish promotion".into(),
            ))
        }
    }

    /// Turns this stopped old primary into a streaming standby of `primary` (after a failover
    /// promoted it): the data directory is replaced by a base backup of `primary`
    /// (`pg_basebackup -R`), and the server starts again on the same port, so clients that
    /// still point at this address reach a standby. Stops this server first if it runs.
    pub fn rejoin_as_standby_of(&self, primary: &TestCluster) -> Result<(), HarnessError> {
        let old = self.embedded()?;
        let new_primary = primary.embedded()?;
        old.stop_server(StopMode::Fast)?;
        std::fs::remove_dir_all(old.data())
            .map_err(|e| io("removing the old primary's data directory", e))?;
        old.base_backup_from(new_primary.port)?;
        old.start_server()
    }

    /// Waits until `standby` has replayed everything this primary has written so far (for
    /// example a database just created on it).
    pub async fn wait_for_replay(
        &self,
        standby: &TestCluster,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let primary = self.admin_client().await?;
        let lsn: String = primary
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(HarnessError::Sql)?
            .get(0);
        let standby = standby.admin_client().await?;
        let deadline = Instant::now() + timeout;
        loop {
            let caught_up: bool = standby
                .query_one(
                    "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                    &[&lsn],
                )
                .await
                .map_err(HarnessError::Sql)?
                .get(0);
            if caught_up {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout(
                    timeout,
                    format!("the standby to replay up to {lsn}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The port the server listens on (embedded clusters), for multi-host URLs such as
    /// `postgres://postgres@127.0.0.1:<primary>,127.0.0.1:<standby>/db?target_session_attrs=read-write`.
    pub fn port(&self) -> Option<u16> {
        self.embedded.as_ref().map(|e| e.port)
    }

    /// Starts the server of a new cluster directory and builds the handle.
    fn serve(mut embedded: Embedded) -> Result<TestCluster, HarnessError> {
        let mut last_error = None;
        for _ in 0..5 {
            embedded.port = free_port()?;
            match embedded.start_server() {
                Ok(()) => {
                    last_error = None;
                    break;
                }
                // Another process may have taken the port between probe and bind: retry.
                Err(e) => last_error = Some(e),
            }
        }
        if let Some(e) = last_error {
            return Err(e);
        }
        let mut config = Config::new();
        config
            .host("127.0.0.1")
            .port(embedded.port)
            .user("postgres")
            .dbname("postgres")
            .application_name("rowlock-testing")
            .connect_timeout(Duration::from_secs(10));
        let url = format!("postgres://postgres@127.0.0.1:{}/postgres", embedded.port);
        Ok(TestCluster {
            config,
            url,
            embedded: Some(embedded),
            pooler_port: None,
            templates: tokio::sync::Mutex::default(),
        })
    }

    /// Connection settings for the cluster's maintenance database (`postgres`, or the
    /// database `DATABASE_URL` names).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The connection URL of the maintenance database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// True for a throwaway cluster started by this process (false for `DATABASE_URL`).
    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// The directory holding the server's binaries (`pgbench` is there too), for an embedded
    /// cluster.
    pub fn bindir(&self) -> Option<&Path> {
        self.embedded.as_ref().map(|e| e.bindir.as_path())
    }

    /// The server's log file, for an embedded cluster.
    pub fn log_file(&self) -> Option<PathBuf> {
        self.embedded.as_ref().map(|e| e.dir.join("postgres.log"))
    }

    /// Creates a fresh, empty database and returns a handle to it. Tests that each use their
    /// own database can run in parallel.
    pub async fn create_database(&'static self) -> Result<TestDatabase, HarnessError> {
        TestDatabase::create(self).await
    }

    /// Creates a fresh database as a copy of one on which `setup` (any `;`-separated SQL: a
    /// schema, migrations, seed rows) has run. The template is made once per process and
    /// `setup` text, on first use; each call then copies it (`CREATE DATABASE … TEMPLATE`),
    /// which is faster than running the setup again. On a `DATABASE_URL` server, which
    /// outlives the process, no template is left behind: each database runs `setup` itself.
    /// What `#[rowlock_testing::test(setup = …)]` uses.
    pub async fn create_database_with(
        &'static self,
        setup: &str,
    ) -> Result<TestDatabase, HarnessError> {
        if !self.is_embedded() {
            let db = TestDatabase::create(self).await?;
            db.client()
                .await?
                .batch_execute(setup)
                .await
                .map_err(|e| setup_failed(setup, e))?;
            return Ok(db);
        }
        let template = self.template(setup).await?;
        TestDatabase::create_from(self, &template).await
    }

    /// The template database for `setup`, made on first use.
    async fn template(&self, setup: &str) -> Result<String, HarnessError> {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut hasher = DefaultHasher::new();
        setup.hash(&mut hasher);
        let name = format!(
            "rowlock_tpl_{}_{:016x}",
            std::process::id(),
            hasher.finish()
        );
        // One maker at a time, so two tests do not both create it; across runtimes (each
        // test has its own), hence a lock that needs none.
        let mut made = self.templates.lock().await;
        if made.contains(&name) {
            return Ok(name);
        }
        let admin = connect(&self.config).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(HarnessError::Sql)?;
        let mut config = self.config.clone();
        config
            .dbname(&name)
            .application_name("rowlock-testing setup");
        let ran = match connect(&config).await {
            Ok(client) => client
                .batch_execute(setup)
                .await
                .map_err(|e| setup_failed(setup, e)),
            Err(e) => Err(e),
        };
        if let Err(e) = ran {
            // Half made: gone, so that the next test with this setup runs it again (and is
            // told the same) rather than finding the name taken.
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await;
            return Err(e);
        }
        // A template is copied only when nobody is connected to it: wait until the setup
        // session has gone, as the server reports it.
        let started = Instant::now();
        loop {
            let sessions: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                    &[&name],
                )
                .await
                .map_err(HarnessError::Sql)?
                .get(0);
            if sessions == 0 {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(HarnessError::Timeout(
                    Duration::from_secs(30),
                    format!("the setup session to leave template {name}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        made.push(name.clone());
        Ok(name)
    }

    /// Creates a fresh database on a cluster that is not `'static` (one from
    /// [`TestCluster::start`]); the handle borrows it through an `Arc`.
    pub async fn create_database_owned(
        self: &std::sync::Arc<Self>,
    ) -> Result<TestDatabase, HarnessError> {
        TestDatabase::create_owned(self.clone()).await
    }

    /// Opens a plain connection to the maintenance database.
    pub async fn admin_client(&self) -> Result<tokio_postgres::Client, HarnessError> {
        connect(&self.config).await
    }

    /// Terminates a backend (`pg_terminate_backend`), as an administrator or a crash would.
    /// Returns whether a backend with that pid existed.
    pub async fn terminate_backend(&self, pid: i32) -> Result<bool, HarnessError> {
        let client = self.admin_client().await?;
        let row = client
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .map_err(HarnessError::Sql)?;
        Ok(row.get(0))
    }

    /// Stops the server (embedded clusters only). Connections fail until
    /// [`start_again`](Self::start_again).
    pub fn stop(&self, mode: StopMode) -> Result<(), HarnessError> {
        self.embedded()?.stop_server(mode)
    }

    /// Starts a stopped server again on the same port and data.
    pub fn start_again(&self) -> Result<(), HarnessError> {
        self.embedded()?.start_server()
    }

    /// Stops and starts the server.
    pub fn restart(&self, mode: StopMode) -> Result<(), HarnessError> {
        let e = self.embedded()?;
        e.stop_server(mode)?;
        e.start_server()
    }

    fn embedded(&self) -> Result<&Embedded, HarnessError> {
        self.embedded.as_ref().ok_or_else(|| {
            HarnessError::Unsupported(
                "stopping or restarting needs a throwaway cluster; this one is DATABASE_URL's"
                    .into(),
            )
        })
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(e) = &self.embedded {
            e.stop_pooler();
            let _ = e.stop_server(StopMode::Immediate);
            // Closing the guardian's stdin makes it remove the directory; wait for it so the
            // cluster is gone when drop returns.
            let guardian = e.guardian.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some((mut child, stdin)) = guardian {
                drop(stdin);
                let _ = child.wait();
            }
        }
    }
}

impl Embedded {
    /// A new cluster directory, watched by its own guardian from the start.
    fn new(settings: &[(&str, &str)]) -> Result<Embedded, HarnessError> {
        for (name, value) in settings {
            if [name, value]
                .iter()
                .any(|t| t.contains(['\0', '\n', '\r']) || t.is_empty())
            {
                return Err(HarnessError::Config(format!(
                    "server setting {name:?} = {value:?}: names and values must be non-empty, \
                     without NUL or newlines"
                )));
            }
        }
        let bindir = find_bindir()?;
        let run_as = unprivileged_user()?;
        let dir = tempfile::Builder::new()
            .prefix("rowlock-pg-")
            .tempdir()
            .map_err(|e| io("creating a temporary directory", e))?
            .keep();
        // From here on the guardian owns `dir`: it removes it however we exit.
        let guardian = spawn_guardian(&dir)?;
        let embedded = Embedded {
            dir: dir.clone(),
            bindir,
            port: 0,
            run_as,
            settings: settings
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            server: Mutex::new(None),
            pooler: Mutex::new(None),
            guardian: Mutex::new(Some(guardian)),
        };
        if let Some(user) = &embedded.run_as {
            chown_dir(&embedded.dir, user)?;
        }
        Ok(embedded)
    }

    /// Fills the (absent) data directory with a base backup of the server on `port`, with the
    /// settings that make it a streaming standby of it (`pg_basebackup -R`).
    fn base_backup_from(&self, port: u16) -> Result<(), HarnessError> {
        let mut command = self.command("pg_basebackup");
        command
            .arg("-D")
            .arg(self.data())
            .args(["-R", "-X", "stream", "-c", "fast", "-h", "127.0.0.1"])
            .arg("-p")
            .arg(port.to_string())
            .args(["-U", "postgres"])
            .current_dir(&self.dir);
        run_tool(&mut command, "pg_basebackup")
    }

    fn command(&self, program: &str) -> Command {
        self.command_at(&self.bindir.join(program))
    }

    /// Runs `path` as the server's user.
    fn command_at(&self, path: &Path) -> Command {
        command_as(self.run_as.as_deref(), path)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn init(&self) -> Result<(), HarnessError> {
        let mut command = self.command("initdb");
        command
            .arg("-D")
            .arg(self.data())
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"])
            .current_dir(&self.dir);
        run_tool(&mut command, "initdb")
    }

    fn start_server(&self) -> Result<(), HarnessError> {
        let mut server = self.server.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(child) = server.as_mut() {
            if child
                .try_wait()
                .map_err(|e| io("checking the server", e))?
                .is_none()
            {
                return Ok(()); // already running
            }
        }
        let log_path = self.dir.join("postgres.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| io("opening the server log", e))?;
        let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.dir);
        for (name, value) in SERVER_SETTINGS {
            if !self.settings.iter().any(|(n, _)| n == name) {
                cmd.arg("-c").arg(format!("{name}={value}"));
            }
        }
        for (name, value) in &self.settings {
            cmd.arg("-c").arg(format!("{name}={value}"));
        }
        let mut child = cmd
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(|e| io("opening the server log", e))?,
            )
            .stderr(log)
            // Its own process group: a Ctrl-C aimed at `cargo test` does not hit the server;
            // the guardian stops it instead.
            .process_group(0)
            .spawn()
            .map_err(|e| io("starting postgres", e))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().map_err(|e| io("checking the server", e))? {
                return Err(HarnessError::Start(format!(
                    "postgres exited during startup ({status}); its log says: {}",
                    log_tail(&log_path, log_offset)
                )));
            }
            if self.ready()? {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(HarnessError::Start(format!(
                    "postgres did not become ready within {START_TIMEOUT:?}; its log says: {}",
                    log_tail(&log_path, log_offset)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *server = Some(child);
        Ok(())
    }

    /// Starts PgBouncer on `port` in front of this cluster's server.
    fn start_pooler(&self, binary: &Path, port: u16) -> Result<(), HarnessError> {
        let child = start_pgbouncer(
            &self.dir,
            self.run_as.as_deref(),
            binary,
            port,
            self.port,
            "",
        )?;
        *self.pooler.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        Ok(())
    }

    fn stop_pooler(&self) {
        let child = self.pooler.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut child) = child else {
            return;
        };
        // runuser may stand between us and PgBouncer: signal the pid PgBouncer wrote.
        if let Some(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid"))
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
        {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(pid.to_string())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The postmaster writes its state on line 8 of `postmaster.pid`; "ready" means it
    /// accepts connections (this is what `pg_ctl -w` waits for).
    fn ready(&self) -> Result<bool, HarnessError> {
        let Ok(text) = std::fs::read_to_string(self.data().join("postmaster.pid")) else {
            return Ok(false);
        };
        Ok(text.lines().nth(7).map(str::trim) == Some("ready"))
    }

    fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    fn stop_server(&self, mode: StopMode) -> Result<(), HarnessError> {
        let mut server = self.server.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut child) = server.take() else {
            return Ok(());
        };
        if let Some(pid) = self.postmaster_pid() {
            let signal = match mode {
                StopMode::Fast => "-INT",
                StopMode::Immediate => "-QUIT",
            };
            let _ = Command::new("kill")
                .arg(signal)
                .arg(pid.to_string())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if child
                .try_wait()
                .map_err(|e| io("stopping the server", e))?
                .is_some()
            {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // The postmaster's children may outlive it by a moment; wait for the pid file to go
        // (the last thing a clean or immediate shutdown removes) so a restart can bind.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.data().join("postmaster.pid").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

/// A command running `path` as `user` (through `runuser`), or as this process's user.
pub(crate) fn command_as(user: Option<&str>, path: &Path) -> Command {
    match user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(user).arg("--").arg(path);
            c
        }
        None => Command::new(path),
    }
}

/// Writes a PgBouncer configuration into `dir` (transaction pooling, every database to
/// `127.0.0.1:target`, plus `extra` lines of the `[pgbouncer]` section) and starts PgBouncer on
/// `port`, as `user`; returns once it listens. It writes its pid to `dir/pgbouncer.pid`, where
/// the guardian finds it.
pub(crate) fn start_pgbouncer(
    dir: &Path,
    user: Option<&str>,
    binary: &Path,
    port: u16,
    target: u16,
    extra: &str,
) -> Result<Child, HarnessError> {
    let config = format!(
        "[databases]\n\
         * = host=127.0.0.1 port={target}\n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = trust\n\
         auth_file = {dir}/pgbouncer.users\n\
         pool_mode = transaction\n\
         max_client_conn = 2000\n\
         default_pool_size = 40\n\
         max_db_connections = 40\n\
         pidfile = {dir}/pgbouncer.pid\n\
         logfile = {dir}/pgbouncer.log\n\
         log_connections = 0\n\
         log_disconnections = 0\n\
         ignore_startup_parameters = extra_float_digits,options\n\
         {extra}",
        dir = dir.display(),
    );
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).map_err(|e| io("writing the PgBouncer files", e))
    };
    write("pgbouncer.ini", &config)?;
    write("pgbouncer.users", "\"postgres\" \"\"\n")?;
    if let Some(user) = user {
        for name in ["pgbouncer.ini", "pgbouncer.users"] {
            chown(&dir.join(name), user)?;
        }
    }
    let mut child = command_as(user, binary)
        .arg(dir.join("pgbouncer.ini"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| io(&format!("starting {}", binary.display()), e))?;
    let deadline = Instant::now() + START_TIMEOUT;
    let log_path = dir.join("pgbouncer.log");
    loop {
        if let Some(status) = child.try_wait().map_err(|e| io("checking PgBouncer", e))? {
            return Err(HarnessError::Start(format!(
                "pgbouncer exited during startup ({status}); its log says: {}",
                log_tail(&log_path, 0)
            )));
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(HarnessError::Start(format!(
                "pgbouncer did not listen within {START_TIMEOUT:?}; its log says: {}",
                log_tail(&log_path, 0)
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn spawn_guardian(dir: &Path) -> Result<(Child, ChildStdin), HarnessError> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(GUARDIAN_SCRIPT)
        .arg("rowlock-guardian")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| io("starting the cluster guardian (sh)", e))?;
    let stdin = child.stdin.take().expect("stdin was piped");
    Ok((child, stdin))
}

pub(crate) fn log_tail(path: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        use std::io::Seek as _;
        let _ = f.seek(std::io::SeekFrom::Start(from));
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// A certificate authority made for one cluster, and the server's certificate it signed.
struct SelfSigned {
    ca_cert: String,
    server_cert: String,
    server_key: String,
}

fn self_signed() -> Result<SelfSigned, HarnessError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let failed = |e: rcgen::Error| HarnessError::Start(format!("making a test certificate: {e}"));
    let ca_key = KeyPair::generate().map_err(failed)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "rowlock test cluster CA");
    let ca = ca.self_signed(&ca_key).map_err(failed)?;
    let server_key = KeyPair::generate().map_err(failed)?;
    let mut server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .map_err(failed)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server = server
        .signed_by(&server_key, &ca, &ca_key)
        .map_err(failed)?;
    Ok(SelfSigned {
        ca_cert: ca.pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
    })
}

pub(crate) fn io(what: &str, e: std::io::Error) -> HarnessError {
    HarnessError::Io(format!("{what}: {e}"))
}

pub(crate) fn free_port() -> Result<u16, HarnessError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| io("finding a free port", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| io("finding a free port", e))?
        .port();
    Ok(port)
}

fn has_server(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("postgres").is_file()
}

/// The directory of the installed PostgreSQL server binaries (`initdb`, `postgres`, and
/// `pgbench` next to them), searched as [`TestCluster::start`] does.
pub fn server_bindir() -> Result<PathBuf, HarnessError> {
    find_bindir()
}

pub(crate) fn find_bindir() -> Result<PathBuf, HarnessError> {
    if let Some(dir) = std::env::var_os("ROWLOCK_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if has_server(&dir) {
            return Ok(dir);
        }
        return Err(HarnessError::NoBinaries(format!(
            "ROWLOCK_PG_BINDIR={} has no initdb and postgres",
            dir.display()
        )));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.is_file() {
                // Debian links initdb into PATH; the real directory holds postgres too.
                let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
                if let Some(parent) = real.parent() {
                    if has_server(parent) {
                        return Ok(parent.to_path_buf());
                    }
                }
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir).ok_or_else(|| {
        HarnessError::NoBinaries(
            "no PostgreSQL server binaries (initdb, postgres) found on PATH, via \
             `pg_config --bindir`, or under /usr/lib/postgresql/*/bin. Install the server \
             (Debian/Ubuntu: `apt-get install postgresql`; Fedora: `dnf install \
             postgresql-server`; macOS: `brew install postgresql`), set ROWLOCK_PG_BINDIR to \
             its bin directory, or set DATABASE_URL to use a running server"
                .into(),
        )
    })
}

pub(crate) fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// PostgreSQL refuses to run as root: pick an unprivileged user to run it as.
pub(crate) fn unprivileged_user() -> Result<Option<String>, HarnessError> {
    let uid = command_output("id", &["-u"])
        .ok_or_else(|| HarnessError::Io("could not run `id -u`".into()))?;
    if uid != "0" {
        return Ok(None);
    }
    if command_output("runuser", &["--help"]).is_none() {
        return Err(HarnessError::Start(
            "running as root needs `runuser` (util-linux) to start PostgreSQL as an \
             unprivileged user"
                .into(),
        ));
    }
    for user in ["postgres", "nobody"] {
        if command_output("id", &["-u", user]).is_some() {
            return Ok(Some(user.to_string()));
        }
    }
    Err(HarnessError::Start(
        "running as root, and neither a `postgres` nor a `nobody` user exists to run \
         PostgreSQL as (it refuses to run as root); create one, e.g. `useradd postgres`"
            .into(),
    ))
}

pub(crate) fn find_pgbouncer() -> Result<PathBuf, HarnessError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("pgbouncer"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            HarnessError::NoBinaries(
                "pgbouncer not found on PATH or in /usr/sbin (Debian/Ubuntu: `apt-get install \
                 pgbouncer`); or set ROWLOCK_TEST_PGBOUNCER to its path"
                    .into(),
            )
        })
}

/// Gives `path` to `user` (looked up with `id`).
pub(crate) fn chown(path: &Path, user: &str) -> Result<(), HarnessError> {
    let uid = command_output("id", &["-u", user]).and_then(|s| s.parse::<u32>().ok());
    let gid = command_output("id", &["-g", user]).and_then(|s| s.parse::<u32>().ok());
    let (Some(uid), Some(gid)) = (uid, gid) else {
        return Err(HarnessError::Start(format!(
            "could not look up user {user}"
        )));
    };
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| {
        io(
            &format!("handing {} to the server's user", path.display()),
            e,
        )
    })
}

/// Gives the cluster directory to `user`, readable by it alone (initdb requires 0700).
pub(crate) fn chown_dir(dir: &Path, user: &str) -> Result<(), HarnessError> {
    chown(dir, user)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io("setting permissions on the cluster directory", e))
}

/// Connects to `config` and drives the connection on the current runtime.
pub(super) async fn connect(config: &Config) -> Result<tokio_postgres::Client, HarnessError> {
    let (client, conn) = config.connect(NoTls).await.map_err(HarnessError::Connect)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Runs a server tool to completion; a failure carries its exit status and standard error.
fn run_tool(command: &mut Command, tool: &str) -> Result<(), HarnessError> {
    let out = command
        .output()
        .map_err(|e| io(&format!("running {tool}"), e))?;
    if !out.status.success() {
        return Err(HarnessError::Start(format!(
            "{tool} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A test's setup SQL failed with `e`: where in `setup` the server points (its position counts
/// characters from 1), as a line, a column and that line's text.
pub(crate) fn setup_failed(setup: &str, e: tokio_postgres::Error) -> HarnessError {
    let position = e.as_db_error().and_then(|db| match db.position()? {
        tokio_postgres::error::ErrorPosition::Original(at) => Some(*at as usize),
        tokio_postgres::error::ErrorPosition::Internal { .. } => None,
    });
    let location = position
        .and_then(|at| {
            let before: String = setup.chars().take(at.saturating_sub(1)).collect();
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            let text = setup.lines().nth(line - 1)?.trim();
            // A setup written on one long line: the line's start, not all of it.
            let shown: String = text.chars().take(100).collect();
            let more = if shown.len() < text.len() { "…" } else { "" };
            Some(format!(
                " at line {line}, column {column} (`{shown}{more}`)"
            ))
        })
        .unwrap_or_default();
    HarnessError::Setup { location, error: e }
}
