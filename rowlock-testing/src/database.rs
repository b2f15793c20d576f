//! A fresh database per test.

use std::hash::{BuildHasher, RandomState};
use std::ops::Deref;
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::{Client, Config, NoTls};

use super::{HarnessError, TestCluster, connect};

/// A database created for one test. On a throwaway cluster it is left in place (the cluster
/// is deleted at exit, and a failed test's data can be inspected until then); on a
/// `DATABASE_URL` server, and on a throwaway cluster behind PgBouncer (whose idle server
/// connections to every finished test's database would add up past `max_connections`), it
/// is dropped when this handle is dropped, unless the thread is panicking (a failed test),
/// so its data can be inspected.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    config: Config,
    admin: Config,
    /// Connection settings through PgBouncer, when the cluster has one.
    pooled: Option<Config>,
    drop_on_drop: bool,
    _cluster: Option<Arc<TestCluster>>,
}

impl TestDatabase {
    pub(super) async fn create(cluster: &TestCluster) -> Result<TestDatabase, HarnessError> {
        Self::create_in(cluster, None, None).await
    }

    pub(super) async fn create_from(
        cluster: &TestCluster,
        template: &str,
    ) -> Result<TestDatabase, HarnessError> {
        Self::create_in(cluster, None, Some(template)).await
    }

    pub(super) async fn create_owned(
        cluster: Arc<TestCluster>,
    ) -> Result<TestDatabase, HarnessError> {
        Self::create_in(&cluster.clone(), Some(cluster), None).await
    }

    async fn create_in(
        cluster: &TestCluster,
        keep: Option<Arc<TestCluster>>,
        template: Option<&str>,
    ) -> Result<TestDatabase, HarnessError> {
        // Unique without shared state: the process, and a number drawn from the standard
        // library's per-instance random hash keys.
        let name = format!(
            "rowlock_test_{}_{:016x}",
            std::process::id(),
            RandomState::new().hash_one(0_u8)
        );
        let admin = cluster.config().clone();
        let client = connect(&admin).await?;
        let quoted = quote_ident(&name);
        let create = match template {
            Some(t) => format!("CREATE DATABASE {quoted} TEMPLATE {}", quote_ident(t)),
            None => format!("CREATE DATABASE {quoted}"),
        };
        client
            .batch_execute(&create)
            .await
            .map_err(HarnessError::Sql)?;
        let mut config = admin.clone();
        config.dbname(&name);
        let pooled = cluster.pooled_config(&name);
        // A throwaway cluster's databases go with it, except behind PgBouncer: it keeps up to
        // `default_pool_size` idle server connections to every database it served, so a run's
        // finished tests would exhaust the server's `max_connections`; dropping the database
        // (`WITH (FORCE)`) ends them.
        let drop_on_drop = !cluster.is_embedded() || pooled.is_some();
        Ok(TestDatabase {
            name,
            config,
            admin,
            pooled,
            drop_on_drop,
            _cluster: keep,
        })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connection settings through the cluster's PgBouncer, if it has one.
    pub fn pgbouncer_config(&self) -> Option<&Config> {
        self.pooled.as_ref()
    }

    /// True when [`db`](Self::db) connects through PgBouncer.
    pub fn is_behind_pgbouncer(&self) -> bool {
        self.pooled.is_some()
    }

    /// Connection settings for this database (direct to the server).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A [`Db`](rowlock::Db) for this database with a pool of at most `max_size` connections,
    /// recycled with the `Fast` method (rowlock never returns a connection inside a
    /// transaction), without timeouts. [`db_with`](Self::db_with) takes a
    /// [`Builder`](rowlock::Builder).
    ///
    /// When the cluster has a PgBouncer in front
    /// ([`TestCluster::start_behind_pgbouncer`]), the pool connects through it, and
    /// [`StatementCache::Transaction`](rowlock::StatementCache::Transaction) becomes the
    /// handle's mode, as a service behind PgBouncer would set it.
    pub fn db(&self, max_size: usize) -> rowlock::Db {
        let manager = Manager::from_connect(
            self.pool_config().clone(),
            rowlock::Connector::new(NoTls),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_size)
            .queue_mode(deadpool_postgres::QueueMode::Lifo)
            .build()
            .expect("a pool without timeouts or hooks always builds");
        self.behind_pgbouncer(rowlock::Db::builder().pool(pool))
            .build()
            .expect("a handle around a built pool with default defaults always builds")
    }

    /// A [`Db`](rowlock::Db) for this database from `builder`'s settings (its connection
    /// settings replaced by this database's; behind PgBouncer, as [`db`](Self::db)).
    pub fn db_with(&self, builder: rowlock::Builder) -> Result<rowlock::Db, rowlock::Error> {
        self.behind_pgbouncer(builder.config(self.pool_config().clone()))
            .build()
    }

    /// A connection URL for this database (`postgres://user@host:port/db`, with the password
    /// if the cluster has one), for code under test that reads `DATABASE_URL`. Through
    /// PgBouncer when the cluster has one, as the handles are.
    pub fn url(&self) -> String {
        config_url(self.pool_config())
    }

    fn pool_config(&self) -> &Config {
        self.pooled.as_ref().unwrap_or(&self.config)
    }

    fn behind_pgbouncer(&self, builder: rowlock::Builder) -> rowlock::Builder {
        if self.pooled.is_some() {
            builder.statement_cache(rowlock::StatementCache::Transaction)
        } else {
            builder
        }
    }

    /// A plain connection to this database.
    pub async fn client(&self) -> Result<Client, HarnessError> {
        connect(&self.config).await
    }

    /// A plain connection that knows its backend pid, for lock-interleaving tests.
    pub async fn session(&self) -> Result<Session, HarnessError> {
        let client = self.client().await?;
        let pid = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(HarnessError::Sql)?
            .get(0);
        Ok(Session { client, pid })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if !self.drop_on_drop || std::thread::panicking() {
            return;
        }
        let admin = self.admin.clone();
        let quoted = quote_ident(&self.name);
        // Drop runs inside the test's runtime, which must not be blocked on: use a thread
        // with a runtime of its own and wait for it.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                let client = connect(&admin).await.ok()?;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// A plain connection with its backend pid.
#[derive(Debug)]
pub struct Session {
    client: Client,
    pid: i32,
}

impl Session {
    /// The server process id of this session (`pg_backend_pid()`).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The client, by value.
    pub fn into_client(self) -> Client {
        self.client
    }
}

impl Deref for Session {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

/// `postgres://user[:password]@host:port/dbname` for `config` (its first host; a Unix socket
/// directory goes into `?host=`), percent-encoding what needs it.
fn config_url(config: &Config) -> String {
    use tokio_postgres::config::Host;
    fn enc(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    let mut url = String::from("postgres://");
    if let Some(user) = config.get_user() {
        url.push_str(&enc(user));
        if let Some(password) = config.get_password() {
            url.push(':');
            url.push_str(&enc(&String::from_utf8_lossy(password)));
        }
        url.push('@');
    }
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let mut socket_dir = None;
    match config.get_hosts().first() {
        Some(Host::Tcp(host)) => url.push_str(&format!("{host}:{port}")),
        Some(Host::Unix(dir)) => {
            url.push_str(&format!(":{port}"));
            socket_dir = Some(dir.display().to_string());
        }
        None => url.push_str(&format!("localhost:{port}")),
    }
    url.push('/');
    url.push_str(&enc(config.get_dbname().unwrap_or("postgres")));
    if let Some(dir) = socket_dir {
        url.push_str("?host=");
        url.push_str(&enc(&dir));
    }
    url
}

/// `name` as a quoted SQL identifier (the harness's own database names: no NUL, short).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
