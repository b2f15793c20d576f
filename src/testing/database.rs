//! A fresh database per test.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::{Client, Config, NoTls};

use super::{HarnessError, TestCluster, connect};
use crate::row::quote_ident;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A database created for one test. On a throwaway cluster it is left in place (the cluster
/// is deleted at exit, and a failed test's data can be inspected until then); on a
/// `DATABASE_URL` server it is dropped when this handle is dropped, unless the thread is
/// panicking (a failed test), so its data can be inspected.
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
        Self::create_in(cluster, None).await
    }

    pub(super) async fn create_owned(
        cluster: Arc<TestCluster>,
    ) -> Result<TestDatabase, HarnessError> {
        Self::create_in(&cluster.clone(), Some(cluster)).await
    }

    async fn create_in(
        cluster: &TestCluster,
        keep: Option<Arc<TestCluster>>,
    ) -> Result<TestDatabase, HarnessError> {
        let name = format!(
            "rowlock_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let admin = cluster.config().clone();
        let client = connect(&admin).await?;
        let quoted = quote_ident(&name).map_err(|e| HarnessError::Config(e.to_string()))?;
        client
            .batch_execute(&format!("CREATE DATABASE {quoted}"))
            .await
            .map_err(HarnessError::Sql)?;
        let mut config = admin.clone();
        config.dbname(&name);
        let pooled = cluster.pooled_config(&name);
        Ok(TestDatabase {
            name,
            config,
            admin,
            pooled,
            drop_on_drop: !cluster.is_embedded(),
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

    /// True when [`pool`](Self::pool) connects through PgBouncer.
    pub fn is_behind_pgbouncer(&self) -> bool {
        self.pooled.is_some()
    }

    /// Connection settings for this database (direct to the server).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A deadpool pool of at most `max_size` connections to this database, recycled with the
    /// `Fast` method (rowlock never returns a connection inside a transaction).
    ///
    /// When the cluster has a PgBouncer in front
    /// ([`TestCluster::start_behind_pgbouncer`]), the pool connects through it, and
    /// [`StatementCache::Transaction`](crate::StatementCache::Transaction) becomes the pool's
    /// mode, as a service behind PgBouncer would set it.
    pub fn pool(&self, max_size: usize) -> Pool {
        let manager = Manager::from_config(
            self.pooled.as_ref().unwrap_or(&self.config).clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_size)
            .build()
            .expect("a pool without timeouts or hooks always builds");
        if self.pooled.is_some() {
            crate::StatementCache::Transaction.set_for_pool(&pool);
        }
        pool
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
        let Ok(quoted) = quote_ident(&self.name) else {
            return;
        };
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
