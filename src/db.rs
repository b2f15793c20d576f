//! The handle: one value that owns the pool, the TLS connector, the statement-cache setting
//! and the defaults every call starts from, and whose methods are every operation rowlock
//! offers.

use std::any::TypeId;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, Weak};
use std::time::Duration;

use deadpool::managed::{PoolError, TimeoutType};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::DbError;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::types::Type;
use tokio_postgres::{Config, NoTls, Socket, Statement};

use crate::error::Error;
use crate::flush::{Learned, SpareBuffers};
use crate::options::{StatementCache, TransactionOptions, validate_timeout};
use crate::policy::RetryPolicy;
use crate::row::{LockableRow, Names};

/// The entry point: a pool of connections and the defaults every call starts from.
///
/// Every operation is a method with the same shape: what to lock or claim, one options
/// value, and the code to run while the lock is held:
///
/// ```no_run
/// # use rowlock::{LockableRow, Table, tokio_postgres::{Row, Error as PgError}};
/// # struct Account { id: i64, balance: i64 }
/// # impl LockableRow for Account {
/// #     type Key = i64;
/// #     const TABLE: Table = Table::new("accounts");
/// #     const KEY_COLUMNS: &'static [&'static str] = &["id"];
/// #     fn from_row(row: &Row) -> Result<Self, PgError> {
/// #         Ok(Account { id: row.try_get("id")?, balance: row.try_get("balance")? })
/// #     }
/// #     fn key(&self) -> i64 { self.id }
/// # }
/// # async fn demo() -> Result<(), rowlock::Error> {
/// use rowlock::{Db, Lock, Outcome};
///
/// let db = Db::from_url("postgres://app@localhost/app")?;
/// let outcome = db
///     .with_locked_row(&1, Lock::no_wait().retry(3), |tx, account: Account| Box::pin(async move {
///         tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = $1", &[&account.id])
///             .await?;
///         Ok::<_, rowlock::Error>(account.balance - 10)
///     }))
///     .await?;
/// match outcome {
///     Outcome::Done(balance) => println!("new balance {balance}"),
///     Outcome::LockNotAvailable(_) => println!("busy, try again"),
///     other => println!("{other}"),
/// }
/// # Ok(()) }
/// ```
///
/// Cheap to clone (one reference count), `Send + Sync`: build it once at startup and share
/// it. Clones share the pool, the defaults and what rowlock learned about each row type's
/// table (checked names, statements, the relation a table name resolves to); two handles
/// built separately share nothing, so two databases never mix.
///
/// Building a handle never connects: connections are opened by the first calls that need
/// them, so a server that is down shows as an error of the call
/// ([`ErrorKind::Unreachable`](crate::ErrorKind::Unreachable) and its siblings), not of the
/// constructor. What the constructors refuse, they refuse with
/// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) and nothing else
/// happens: a string that is not a connection string, one that names no host or no user,
/// zero connections, a timeout under 1 ms, a retry policy that cannot run.
#[derive(Clone)]
pub struct Db {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) defaults: Defaults,
    /// The checked names of every row type used through this handle, and what was learned
    /// about its table on this database. Row types are few and their names constants, so
    /// entries are never evicted.
    names: RwLock<ByType>,
    /// Buffers of queued writes, reused by the next transactions.
    spare_buffers: Arc<SpareBuffers>,
    /// rowlock's prepared statements on each connection of the pool, by connection. Read by
    /// every transaction; written only when the pool opened a connection.
    connections: RwLock<ByConnection>,
    /// The parameter types of the caller's SQL text, learned by preparing it once (see
    /// [`Db::text_types`]). They depend on the database's schema only, so they are the
    /// handle's, shared by its connections. Bounded by [`Builder::statement_cache_limit`].
    text_types: RwLock<ByText>,
    /// The timeouts of a checkout's first try, which takes an idle or new connection without
    /// waiting (no timer is started); see [`Db::checkout`].
    first_try: deadpool::managed::Timeouts,
}

/// The statements of each connection, keyed by the address of the connection's
/// deadpool-postgres statement cache (one allocation per connection, for its lifetime). The
/// `Weak` beside each entry keeps that address from being reused by a later connection while
/// the entry exists, and tells when the connection is gone.
type ByConnection = HashMap<usize, (Weak<deadpool_postgres::StatementCache>, Arc<Statements>)>;

/// rowlock's prepared statements on one connection, by SQL text: the per-connection statement
/// cache ([`StatementCache::Connection`]). A hit is a lookup, with no future and nothing sent;
/// a miss prepares on the connection. Bounded by [`Builder::statement_cache_limit`].
#[derive(Default)]
pub(crate) struct Statements {
    by_sql: Mutex<BySql>,
    /// What the [`Connector`] that opened the connection knows of it (where its task runs,
    /// why its session ended); unset for the connections of a pool built with another
    /// connector.
    opened: OnceLock<Arc<Opened>>,
}

/// Statements by SQL text. Every statement a call uses is looked up by its whole text (a
/// transition's is a few hundred bytes): hashed with foldhash, seeded per process, rather
/// than SipHash.
type BySql = HashMap<Box<str>, Statement, foldhash::fast::RandomState>;

/// Parameter types by SQL text.
type ByText = HashMap<Box<str>, Arc<Learned>, foldhash::fast::RandomState>;

impl Statements {
    fn map(&self) -> std::sync::MutexGuard<'_, BySql> {
        self.by_sql.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a [`Connector`] records of a connection it opened.
#[derive(Default)]
pub(crate) struct Opened {
    /// The current-thread runtime that drives the connection's task; `None` on a
    /// multi-thread runtime, whose workers drive it whichever runtime uses the connection.
    home: Option<tokio::runtime::Id>,
    /// Why the session ended.
    end: SessionEnd,
}

impl Opened {
    /// Whether the connection's task runs on a current-thread runtime other than the one this
    /// runs on. Such a runtime moves only while its thread is inside its `block_on`: a
    /// request sent on the connection meanwhile waits for no answer until it runs again, and
    /// when it is dropped (the test that made it has ended) the connection closes under
    /// whatever transaction is using it.
    fn is_foreign(&self) -> bool {
        self.home.is_some_and(|home| {
            tokio::runtime::Handle::try_current().ok().map(|h| h.id()) != Some(home)
        })
    }
}

/// The error with which the server ended a connection's session (`FATAL`: an
/// `idle_in_transaction_session_timeout`, `pg_terminate_backend`, a shutdown), sent while no
/// request was waiting for an answer. The driver's requests then fail only with "connection
/// closed"; this keeps the server's words for them.
///
/// Two records, because the server's last message reaches one of two places: the
/// connection's task, when no request waits for an answer (set when the task ends: to the
/// server's error, or to `None` when the connection ended otherwise, closed by the client or
/// by a network error); or the request that waits, whose failure rowlock notes. A noted
/// error wins: the task of a connection whose last message went to a request ends without
/// words (the end of the stream, or a pooler's own error after the server's).
#[derive(Default)]
pub(crate) struct SessionEnd {
    task: OnceLock<Option<DbError>>,
    noted: OnceLock<DbError>,
}

impl SessionEnd {
    /// The server's error: the one a request was answered with, or the task's once it has
    /// ended; waits up to 5 ms for the task's when `closed` (the driver closes its request
    /// channel a moment before the task records why, and a request on another thread can
    /// fail in between). A rare failure path only.
    fn get(&self, closed: bool) -> Option<DbError> {
        let deadline = std::time::Instant::now() + Duration::from_millis(5);
        loop {
            if let Some(end) = self.noted.get() {
                return Some(end.clone());
            }
            if let Some(end) = self.task.get() {
                return end.clone();
            }
            if !closed || std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::yield_now();
        }
    }
}

tokio::task_local! {
    /// Set only while [`Db::checkout`] waits for the pool: a connection a [`Connector`] opens
    /// for that checkout leaves its record ([`Opened`]) here, to be kept with its statements.
    static OPENED: RefCell<Option<Arc<Opened>>>;
}

/// A deadpool-postgres connector that keeps why the server ended a session: the one the
/// pools [`Builder`] makes use, for a pool the service builds itself ([`Builder::pool`],
/// [`Db::from_pool`]).
///
/// It connects as deadpool-postgres's own connector does (`Config::connect` with the TLS
/// connector `T`, the connection driven by a spawned task). The server says why it ends a
/// session (an `idle_in_transaction_session_timeout`, `pg_terminate_backend`, a shutdown)
/// while no request waits for an answer, so the driver's next request fails only with
/// "connection closed". On connections made by this connector and taken from the pool by
/// rowlock, the error says the server's words and carries its SQLSTATE instead
/// ([`ErrorKind::IdleInTransactionTimeout`](crate::ErrorKind::IdleInTransactionTimeout) for
/// `25P03`, [`ErrorKind::Closed`](crate::ErrorKind::Closed) otherwise). One case stays a bare
/// "connection closed": the driver hands a message from the server to the oldest request
/// waiting for an answer, and when that is a statement close the driver sent on its own (a
/// statement prepared from SQL text is closed as soon as the call that ran it returns), the
/// close takes the server's last words with it. Statements from
/// [`Transaction::prepare_cached`](crate::Transaction::prepare_cached) stay prepared (closed
/// only when the connection's cache starts over past its limit).
///
/// It also notes the current-thread runtime that opens a connection, so that rowlock does not
/// use the connection from another runtime (the [handle guide](crate::guide::handle)'s
/// "Runtimes").
///
/// ```no_run
/// use rowlock::deadpool_postgres::{Manager, ManagerConfig, Pool};
/// use rowlock::tokio_postgres::{Config, NoTls};
///
/// # fn demo(config: Config) -> Result<(), Box<dyn std::error::Error>> {
/// let connector = rowlock::Connector::new(NoTls);
/// let manager = Manager::from_connect(config, connector, ManagerConfig::default());
/// let db = rowlock::Db::from_pool(Pool::builder(manager).max_size(16).build()?);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Connector<T> {
    tls: T,
}

impl<T> Connector<T> {
    /// A connector that makes connections with `tls` (`tokio_postgres::NoTls`, or any
    /// tokio-postgres `MakeTlsConnect`).
    pub fn new(tls: T) -> Self {
        Connector { tls }
    }
}

impl<T> deadpool_postgres::Connect for Connector<T>
where
    T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
    T::Stream: Sync + Send,
    T::TlsConnect: Sync + Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    fn connect(
        &self,
        config: &Config,
    ) -> futures_util::future::BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let tls = self.tls.clone();
        let config = config.clone();
        Box::pin(async move {
            let (client, connection) = config.connect(tls).await?;
            // The task is spawned on this runtime: one with a single thread drives it only
            // while its thread runs it.
            let runtime = tokio::runtime::Handle::current();
            let home = (runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
                .then(|| runtime.id());
            let record = Arc::new(Opened {
                home,
                end: SessionEnd::default(),
            });
            // Outside a checkout (a pool the service resizes itself) nobody asks.
            let _ = OPENED.try_with(|opened| *opened.borrow_mut() = Some(record.clone()));
            let task = tokio::spawn(async move {
                let mut connection = std::pin::pin!(connection);
                // Polled in place, so the connection (and with it every request's channel)
                // is dropped only after the end is recorded: a request that fails because
                // the session ended finds the reason.
                let result = connection.as_mut().await;
                #[cfg(feature = "tracing")]
                if let Err(e) = &result {
                    tracing::warn!(
                        target: "rowlock",
                        error = %e.as_db_error().map_or_else(|| e.to_string(), ToString::to_string),
                        "a pooled connection ended"
                    );
                }
                let _ = record
                    .end
                    .task
                    .set(result.err().and_then(|e| e.as_db_error().cloned()));
            });
            Ok((client, task))
        })
    }
}

/// What a call's options fall back to.
#[derive(Clone, Debug)]
pub(crate) struct Defaults {
    pub(crate) lock_timeout: Option<Duration>,
    pub(crate) statement_timeout: Option<Duration>,
    pub(crate) retry: Option<RetryPolicy>,
    pub(crate) statement_cache: StatementCache,
    /// Most statements kept prepared on one connection ([`StatementCache::Connection`]).
    pub(crate) statement_limit: usize,
}

/// Enough for every statement a service's row types, claims and transitions render, with
/// room for the caller's own; small enough that the server's memory per connection stays
/// bounded when statements are built from input.
const DEFAULT_STATEMENT_LIMIT: usize = 512;

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            lock_timeout: None,
            statement_timeout: None,
            retry: None,
            statement_cache: StatementCache::default(),
            statement_limit: DEFAULT_STATEMENT_LIMIT,
        }
    }
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.inner.pool.status();
        f.debug_struct("Db")
            .field("max_size", &status.max_size)
            .field("connections", &status.size)
            .field("defaults", &self.inner.defaults)
            .finish_non_exhaustive()
    }
}

impl Db {
    /// A handle for the database at `url` (`postgres://user:password@host:port/db?…` or
    /// `key=value` pairs), with the defaults of [`Builder`]: no TLS, unless the `rustls`
    /// feature is on and the URL asks for it (`sslmode=require`).
    pub fn from_url(url: &str) -> Result<Db, Error> {
        Db::builder().url(url).build()
    }

    /// [`from_url`](Self::from_url) with the URL in `DATABASE_URL`; refused when it is unset.
    pub fn from_env() -> Result<Db, Error> {
        Db::builder().env().build()
    }

    /// A handle around a pool the service built itself (its own TLS, hooks or recycling),
    /// with the default defaults. Its connections must be outside any transaction when
    /// returned to it, which is what rowlock ensures for its own. A recycling query that
    /// deallocates prepared statements (`DISCARD ALL`) costs a prepare after every checkout;
    /// see the [migrations guide](crate::guide::migrations). Make its manager with a
    /// [`Connector`] (`Manager::from_connect`), as the handle's own pools are, so that a
    /// session the server ends is reported in the server's words, not as a bare "connection
    /// closed".
    pub fn from_pool(pool: Pool) -> Db {
        Db::assemble(pool, Defaults::default(), Recycling::AsConfigured)
    }

    /// Settings beyond the URL: pool size and timeouts, TLS, statement cache, defaults.
    ///
    /// ```
    /// use std::time::Duration;
    /// use rowlock::{Db, RetryPolicy};
    ///
    /// let db = Db::builder()
    ///     .url("postgres://app@localhost/app")
    ///     .max_size(16)
    ///     .lock_timeout(Duration::from_secs(2))
    ///     .retry(RetryPolicy::new().max_attempts(3))
    ///     .build()?;
    /// # drop(db);
    /// # Ok::<(), rowlock::Error>(())
    /// ```
    pub fn builder() -> Builder {
        Builder::default()
    }

    fn assemble(pool: Pool, defaults: Defaults, recycling: Recycling) -> Db {
        let timeouts = pool.timeouts();
        let first_try = deadpool::managed::Timeouts {
            wait: Some(Duration::ZERO),
            create: timeouts.create,
            recycle: match recycling {
                Recycling::Instant => None,
                Recycling::AsConfigured => timeouts.recycle,
            },
        };
        Db {
            inner: Arc::new(Inner {
                pool,
                defaults,
                names: RwLock::default(),
                spare_buffers: Arc::default(),
                connections: RwLock::default(),
                text_types: RwLock::default(),
                first_try,
            }),
        }
    }

    /// The pool underneath, for what rowlock does not cover (e.g. `LISTEN`, `COPY`). A
    /// connection taken from it must be returned outside any transaction.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// rowlock's statements on `conn` (see [`Statements`]): looked up once per transaction.
    pub(crate) fn statements(&self, conn: &deadpool_postgres::ClientWrapper) -> Arc<Statements> {
        let cache = &conn.statement_cache;
        let key = Arc::as_ptr(cache) as usize;
        // An entry under this address is this connection's: the entry's `Weak` kept the
        // address from being reused since the connection it was made for closed.
        if let Some((_, statements)) = self
            .inner
            .connections
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return statements.clone();
        }
        let mut all = self
            .inner
            .connections
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        // A new connection: forget the closed ones (their statements went with them).
        all.retain(|_, (weak, _)| weak.strong_count() > 0);
        all.entry(key)
            .or_insert_with(|| (Arc::downgrade(cache), Arc::default()))
            .1
            .clone()
    }

    /// The statement cached for `sql` on a connection, if there is one: the hit of
    /// [`prepare_cached`](Self::prepare_cached), without a future.
    pub(crate) fn cached(statements: &Statements, sql: &str) -> Option<Statement> {
        statements.map().get(sql).cloned()
    }

    /// The statement for `sql` on `conn` from its cache `statements`, prepared on a miss: the
    /// one way rowlock's statements are prepared into a connection's cache. A hit is a lookup
    /// (this future holds no request); a miss that takes the cache past
    /// [`Builder::statement_cache_limit`] empties it first (statements in hand stay usable;
    /// the cache's are closed on the server when their last handle drops).
    pub(crate) async fn prepare_cached(
        &self,
        conn: &deadpool_postgres::ClientWrapper,
        statements: &Statements,
        sql: &str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = Self::cached(statements, sql) {
            return Ok(statement);
        }
        // Boxed: the rare path, and the prepare's future is large.
        let statement = Box::pin(conn.prepare(sql)).await?;
        self.remember(statements, sql, statement.clone());
        Ok(statement)
    }

    /// Keeps `statement`, just prepared for `sql`, in a connection's cache; one that has
    /// reached [`Builder::statement_cache_limit`] is emptied first.
    pub(crate) fn remember(&self, statements: &Statements, sql: &str, statement: Statement) {
        self.insert_bounded(&mut statements.map(), sql, statement);
    }

    /// Inserts into one of the handle's maps by SQL text (a connection's statements, the
    /// learned parameter types), emptying it first when it has reached
    /// [`Builder::statement_cache_limit`]: the one bound on what the handle keeps per text.
    fn insert_bounded<V>(
        &self,
        map: &mut HashMap<Box<str>, V, foldhash::fast::RandomState>,
        sql: &str,
        value: V,
    ) {
        if map.len() >= self.statement_limit() {
            map.clear();
        }
        map.insert(sql.into(), value);
    }

    /// The parameter types of `sql` (the caller's SQL text; behind a pooler rowlock's own
    /// too), if this handle has learned them: with them the text runs as an unnamed
    /// statement, parsed, bound and run in one request (one round trip, nothing left prepared
    /// on the server, nothing to close, and no cached plan a migration could make stale).
    /// Learned by [`learn_text_types`](Self::learn_text_types) when the text is first
    /// prepared.
    pub(crate) fn text_types(&self, sql: &str) -> Option<Arc<Learned>> {
        self.inner
            .text_types
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(sql)
            .cloned()
    }

    /// Keeps the parameter types of `sql`, read from the statement prepared for it; a map that
    /// has reached [`Builder::statement_cache_limit`] is emptied first.
    ///
    /// A type of PostgreSQL's own is kept as it is: its oid never changes. Any other (an enum,
    /// a domain, a composite, an extension's type) is kept with oid 0, so that the server
    /// infers it each time, as it did when the text was prepared: its oid is the type's only
    /// until it is dropped, and a migration that creates it again would leave every later
    /// call failing with `XX000` ("cache lookup failed for type …"). Values are still encoded
    /// as the type learned (name, kind and schema are kept).
    pub(crate) fn learn_text_types(&self, sql: &str, types: &[Type]) -> Arc<Learned> {
        let learned = Arc::new(Learned {
            sql: sql.into(),
            types: types.iter().map(inferred_unless_builtin).collect(),
        });
        let mut map = self
            .inner
            .text_types
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.insert_bounded(&mut map, sql, learned.clone());
        learned
    }

    /// Forgets the parameter types of `sql` (the server refused the statement with them: a
    /// migration may have changed a column's type), so its next use prepares it again.
    pub(crate) fn forget_text_types(&self, sql: &str) {
        self.inner
            .text_types
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(sql);
    }

    /// Empties a connection's statement cache, so every statement is prepared again (after a
    /// migration made one stale). The statements in hand stay usable; the cache's are closed
    /// on the server when their last handle drops.
    pub(crate) fn forget_statements(statements: &Statements) {
        statements.map().clear();
    }

    /// Takes a connection from the pool, with its statements: the one way rowlock's
    /// operations get theirs.
    ///
    /// A connection whose task another current-thread runtime drives (a handle shared by
    /// `#[tokio::test]`s, each with its own runtime) is taken out of the pool and closed, and
    /// another taken: that runtime moves only while its thread runs it, and ends with its
    /// test, closing the connection under the transaction using it.
    pub(crate) async fn checkout(
        &self,
    ) -> Result<(deadpool_postgres::Object, Arc<Statements>), Error> {
        let pool = self.pool();
        loop {
            let (got, opened) = OPENED
                .scope(RefCell::new(None), async {
                    // First without waiting: an idle or new connection, with no timer started
                    // (the wait timeout's timer costs more than the rest of the checkout).
                    // When every connection is in use, wait in the pool's queue, with its
                    // timeouts.
                    let got = match pool.timeout_get(&self.inner.first_try).await {
                        Err(PoolError::Timeout(TimeoutType::Wait)) => pool.get().await,
                        got => got,
                    };
                    (got, OPENED.with(RefCell::take))
                })
                .await;
            let conn =
                got.map_err(|e| Error::from_pool(e, pool.status().max_size, pool.timeouts().wait))?;
            let statements = self.statements(&conn);
            if let Some(opened) = opened {
                // A connection opened for this checkout: keep what its connector knows.
                let _ = statements.opened.set(opened);
            }
            if statements.opened.get().is_some_and(|o| o.is_foreign()) {
                // Out of the pool (which opens another in its place when asked), and closed:
                // its task ends when its runtime next runs, or with the runtime. Each turn
                // takes one such connection out, so this ends.
                drop(deadpool_postgres::Object::take(conn));
                continue;
            }
            return Ok((conn, statements));
        }
    }

    /// The error with which the server ended `conn`'s session, if it did and said so: kept by
    /// the [`Connector`] that made `conn`, or noted by [`note_session_end`](Self::note_session_end).
    pub(crate) fn session_end(&self, conn: &deadpool_postgres::ClientWrapper) -> Option<DbError> {
        self.statements(conn)
            .opened
            .get()?
            .end
            .get(conn.is_closed())
    }

    /// Keeps `end`, the server's error that ended `conn`'s session, when it came as the answer
    /// to a request (behind a pooler, or while a statement ran) rather than to the connection
    /// task: what fails on `conn` later (a `COMMIT` after a swallowed error) says it too.
    pub(crate) fn note_session_end(&self, conn: &deadpool_postgres::ClientWrapper, end: &DbError) {
        let statements = self.statements(conn);
        let _ = statements
            .opened
            .get_or_init(Arc::default)
            .end
            .noted
            .set(end.clone());
    }

    /// The call's transaction options with the handle's defaults under them.
    pub(crate) fn options(&self, call: &TransactionOptions) -> TransactionOptions {
        let d = &self.inner.defaults;
        let mut options = call.clone();
        options.lock_timeout = options.lock_timeout.or(d.lock_timeout);
        options.statement_timeout = options.statement_timeout.or(d.statement_timeout);
        options.statement_cache = Some(options.statement_cache.unwrap_or(d.statement_cache));
        if options.retry.is_none() {
            options.retry.clone_from(&d.retry);
        }
        options
    }

    /// Where this handle's transactions take buffers for queued writes.
    pub(crate) fn spare_buffers(&self) -> Arc<SpareBuffers> {
        self.inner.spare_buffers.clone()
    }

    /// Most statements kept prepared on one connection.
    pub(crate) fn statement_limit(&self) -> usize {
        self.inner.defaults.statement_limit
    }

    /// Where this handle's transactions prepare statements unless a call says otherwise.
    pub(crate) fn statement_cache(&self) -> StatementCache {
        self.inner.defaults.statement_cache
    }

    /// The names of `R`, checked the first time (a bad name is refused on every call).
    pub(crate) fn names<R: LockableRow>(&self) -> Result<Arc<Names>, Error> {
        let id = TypeId::of::<R>();
        let read = |map: &ByType| map.get(&id).cloned();
        if let Some(names) = read(
            &self
                .inner
                .names
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        ) {
            return Ok(names);
        }
        let names = Arc::new(Names::render::<R>()?);
        let mut all = self
            .inner
            .names
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(all.entry(id).or_insert(names).clone())
    }
}

/// The names of each row type, by its `TypeId`.
type ByType = HashMap<TypeId, Arc<Names>, BuildHasherDefault<TypeIdHasher>>;

/// Hashes a `TypeId` by its own bits: it is a hash already, and this lookup runs on every
/// call, where SipHash over it would be wasted work.
#[derive(Default)]
struct TypeIdHasher(u64);

impl Hasher for TypeIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Builds a [`Db`]: where to connect, how many connections, TLS, and the defaults of every
/// call. Nothing is checked or connected until [`build`](Self::build).
#[must_use = "a builder does nothing until build()"]
pub struct Builder {
    source: Source,
    max_size: usize,
    wait_timeout: Duration,
    create_timeout: Duration,
    recycle_timeout: Duration,
    check_primary: bool,
    tls: Option<Tls>,
    /// Certificates (PEM) trusted besides the webpki roots, for `sslmode=require`.
    #[cfg(feature = "rustls")]
    roots: Vec<Vec<u8>>,
    defaults: Defaults,
}

enum Source {
    Unset,
    Url(String),
    Env,
    Config(Box<Config>),
    Deadpool(Box<deadpool_postgres::Config>),
    Pool(Pool),
}

/// Makes the pool's manager with the connector the service gave.
type Tls = Box<dyn FnOnce(Config, ManagerConfig) -> Manager + Send>;

impl Default for Builder {
    fn default() -> Self {
        Builder {
            source: Source::Unset,
            // deadpool's own default: a few connections per core keeps the server busy
            // without queueing hundreds of backends on it.
            max_size: 4 * std::thread::available_parallelism().map_or(1, |n| n.get()),
            // A request that cannot get a connection in 5 s is better refused (503) than
            // left to pile up; deadpool's default is to wait forever.
            wait_timeout: Duration::from_secs(5),
            // Connecting to a healthy server takes milliseconds; an unreachable one fails fast.
            create_timeout: Duration::from_secs(5),
            // Recycling only checks the connection is open (rowlock never returns one inside
            // a transaction), so this bounds a stuck socket.
            recycle_timeout: Duration::from_secs(5),
            check_primary: false,
            tls: None,
            #[cfg(feature = "rustls")]
            roots: Vec::new(),
            defaults: Defaults::default(),
        }
    }
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("max_size", &self.max_size)
            .field("wait_timeout", &self.wait_timeout)
            .field("create_timeout", &self.create_timeout)
            .field("recycle_timeout", &self.recycle_timeout)
            .field("check_primary", &self.check_primary)
            .field("tls", &self.tls.is_some())
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// Connects to the database at `url` (URL or `key=value` pairs; checked by
    /// [`build`](Self::build)).
    pub fn url(mut self, url: &str) -> Self {
        self.source = Source::Url(url.to_owned());
        self
    }

    /// Connects to the database in `DATABASE_URL` (read by [`build`](Self::build)).
    pub fn env(mut self) -> Self {
        self.source = Source::Env;
        self
    }

    /// Connects with a tokio-postgres `Config`.
    pub fn config(mut self, config: Config) -> Self {
        self.source = Source::Config(Box::new(config));
        self
    }

    /// Connects with a deadpool-postgres `Config` (e.g. read by `serde` from the service's
    /// settings file); its pool size, when set, is used unless [`max_size`](Self::max_size)
    /// is called afterwards.
    pub fn deadpool_config(mut self, config: deadpool_postgres::Config) -> Self {
        if let Some(size) = config.pool.as_ref().map(|p| p.max_size) {
            self.max_size = size;
        }
        self.source = Source::Deadpool(Box::new(config));
        self
    }

    /// Uses a pool the service built itself: the pool settings of this builder (size,
    /// timeouts, TLS, primary check) are then refused, and only the defaults apply. As for
    /// [`Db::from_pool`], make its manager with a [`Connector`].
    pub fn pool(mut self, pool: Pool) -> Self {
        self.source = Source::Pool(pool);
        self
    }

    /// Most connections open at once (at least 1). Defaults to 4 × the number of cores.
    pub fn max_size(mut self, max_size: usize) -> Self {
        self.max_size = max_size;
        self
    }

    /// How long a call waits for a free connection before
    /// [`ErrorKind::PoolTimeout`](crate::ErrorKind::PoolTimeout). Defaults to 5 s.
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// How long opening a connection may take. Defaults to 5 s.
    pub fn create_timeout(mut self, timeout: Duration) -> Self {
        self.create_timeout = timeout;
        self
    }

    /// How long checking a returned connection may take before it is replaced. Defaults to
    /// 5 s.
    pub fn recycle_timeout(mut self, timeout: Duration) -> Self {
        self.recycle_timeout = timeout;
        self
    }

    /// Checks, before handing out a pooled connection, that its server is still a primary
    /// (`SELECT pg_current_wal_lsn()`, which fails on a standby); a connection whose server
    /// went into recovery is closed and another one is taken. One round trip per checkout.
    /// Off by default: rowlock closes such a connection anyway at its first refused write
    /// ([`ErrorKind::ReadOnly`](crate::ErrorKind::ReadOnly)), and new connections go to the
    /// primary when the URL lists every host with `target_session_attrs=read-write`.
    pub fn check_primary(mut self, check: bool) -> Self {
        self.check_primary = check;
        self
    }

    /// Connects with this TLS connector (any tokio-postgres `MakeTlsConnect`, e.g.
    /// `tokio_postgres_rustls::MakeRustlsConnect` or `postgres_native_tls::MakeTlsConnector`).
    /// The URL's `sslmode` then decides whether TLS is used (`prefer`, the driver's default,
    /// tries it; `require` insists; `disable` never uses it).
    pub fn tls<T>(mut self, tls: T) -> Self
    where
        T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
        T::Stream: Sync + Send,
        T::TlsConnect: Sync + Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        self.tls = Some(Box::new(move |config, manager| {
            Manager::from_connect(config, Connector::new(tls), manager)
        }));
        self
    }

    /// Trusts this certificate (PEM: one or more `-----BEGIN CERTIFICATE-----` blocks, e.g. a
    /// private CA's) besides the webpki roots, when a URL with `sslmode=require` connects over
    /// rustls (feature `rustls`, no [`tls`](Self::tls) connector given). A PEM with no
    /// certificate, or one that does not parse, is refused by [`build`](Self::build).
    #[cfg(feature = "rustls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rustls")))]
    pub fn root_certificate_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.roots.push(pem.as_ref().to_vec());
        self
    }

    /// Bounds every lock wait of every call with `SET LOCAL lock_timeout`, unless the call sets
    /// its own. Between 1 ms and `i32::MAX` ms. Defaults to none (wait forever).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.defaults.lock_timeout = Some(timeout);
        self
    }

    /// Bounds every statement of every call with `SET LOCAL statement_timeout`, unless the
    /// call sets its own. Between 1 ms and `i32::MAX` ms. Defaults to none.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.defaults.statement_timeout = Some(timeout);
        self
    }

    /// Retries every call under `policy` unless the call sets its own
    /// ([`Lock::retry`](crate::Lock::retry), [`TransactionOptions::retry`]). Defaults to one
    /// attempt.
    pub fn retry(mut self, policy: impl Into<RetryPolicy>) -> Self {
        self.defaults.retry = Some(policy.into());
        self
    }

    /// Where prepared statements live. Use [`StatementCache::Transaction`] behind PgBouncer in
    /// transaction pooling mode. Defaults to [`StatementCache::Connection`].
    pub fn statement_cache(mut self, cache: StatementCache) -> Self {
        self.defaults.statement_cache = cache;
        self
    }

    /// Bounds the statements kept prepared on each connection
    /// ([`StatementCache::Connection`]): when preparing one more would pass `limit`, the
    /// connection's cache is emptied (its statements closed on the server) and fills again
    /// with what is used next. Keeps the server's memory per connection bounded when
    /// statements are built from input (claims with varying filters, the caller's own SQL).
    /// At least 1; defaults to 512.
    pub fn statement_cache_limit(mut self, limit: usize) -> Self {
        self.defaults.statement_limit = limit;
        self
    }

    /// Checks every setting and builds the handle. Connects to nothing; each connection the
    /// pool opens later checks once that its server runs PostgreSQL 13 or newer
    /// ([`ErrorKind::UnsupportedServer`](crate::ErrorKind::UnsupportedServer) otherwise; a
    /// pool given with [`pool`](Self::pool) is not checked).
    pub fn build(mut self) -> Result<Db, Error> {
        let source = std::mem::replace(&mut self.source, Source::Unset);
        let tls = self.tls.take();
        if let Some(t) = self.defaults.lock_timeout {
            validate_timeout("lock_timeout", t)?;
        }
        if let Some(t) = self.defaults.statement_timeout {
            validate_timeout("statement_timeout", t)?;
        }
        if let Some(policy) = &self.defaults.retry {
            policy.validate()?;
        }
        if self.defaults.statement_limit == 0 {
            return Err(Error::invalid(
                "statement_cache_limit must be at least 1 (a statement is prepared to run)",
            ));
        }
        let config = match source {
            Source::Unset => {
                return Err(Error::invalid(
                    "the builder was given no database: call url, env, config, deadpool_config \
                     or pool",
                ));
            }
            Source::Pool(pool) => {
                if tls.is_some() || self.check_primary {
                    return Err(Error::invalid(
                        "tls and check_primary configure a pool rowlock builds; this builder \
                         was given a pool already built",
                    ));
                }
                return Ok(Db::assemble(pool, self.defaults, Recycling::AsConfigured));
            }
            Source::Url(url) => parse_url(&url)?,
            Source::Env => {
                let url = std::env::var("DATABASE_URL")
                    .map_err(|_| Error::invalid("DATABASE_URL is not set (or not valid UTF-8)"))?;
                parse_url(&url)?
            }
            Source::Config(config) => *config,
            Source::Deadpool(config) => config.get_pg_config().map_err(|e| {
                Error::invalid(format!("the deadpool-postgres config is not usable: {e}"))
            })?,
        };
        let pool = self.build_pool(config, tls)?;
        let recycling = if self.check_primary {
            Recycling::AsConfigured
        } else {
            // `RecyclingMethod::Fast`: no statement, so nothing to time.
            Recycling::Instant
        };
        Ok(Db::assemble(pool, self.defaults, recycling))
    }

    fn build_pool(&self, config: Config, tls: Option<Tls>) -> Result<Pool, Error> {
        if self.max_size == 0 {
            return Err(Error::invalid("a pool needs max_size of at least 1"));
        }
        validate_timeout("wait_timeout", self.wait_timeout)?;
        validate_timeout("create_timeout", self.create_timeout)?;
        validate_timeout("recycle_timeout", self.recycle_timeout)?;
        if config.get_hosts().is_empty() {
            return Err(Error::invalid(
                "the connection string names no host (e.g. postgres://user@localhost/db, or \
                 host=/var/run/postgresql for a Unix socket)",
            ));
        }
        if config.get_user().is_none() {
            return Err(Error::invalid(
                "the connection string names no user (e.g. postgres://user@localhost/db)",
            ));
        }
        let manager_config = ManagerConfig {
            recycling_method: if self.check_primary {
                // Fails with "recovery is in progress" on a standby.
                RecyclingMethod::Custom("SELECT pg_catalog.pg_current_wal_lsn()".into())
            } else {
                RecyclingMethod::Fast
            },
        };
        let manager = match tls {
            Some(make) => make(config, manager_config),
            None => self.default_manager(config, manager_config)?,
        };
        Pool::builder(manager)
            .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
                Box::pin(async move {
                    // The simple protocol: one message, no prepared statement. Behind a pooler
                    // in transaction mode, a statement prepared outside a transaction may be
                    // gone (another server connection) when it is executed.
                    let messages = client
                        .simple_query("SHOW server_version_num")
                        .await
                        .map_err(deadpool_postgres::HookError::Backend)?;
                    let version = messages.iter().find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(row) => {
                            row.get(0).and_then(|v| v.parse::<i32>().ok())
                        }
                        _ => None,
                    });
                    let Some(version) = version else {
                        return Err(deadpool_postgres::HookError::message(
                            "the server did not report its version (SHOW server_version_num)",
                        ));
                    };
                    match unsupported(version) {
                        Some(detail) => Err(deadpool_postgres::HookError::message(detail)),
                        None => Ok(()),
                    }
                })
            }))
            .max_size(self.max_size)
            // The connection returned last is handed out first: the warmest one (its
            // statements prepared), and one whose queued `ROLLBACK` (a dropped transaction)
            // the server reads before the next borrower's statements.
            .queue_mode(deadpool::managed::QueueMode::Lifo)
            .wait_timeout(Some(self.wait_timeout))
            .create_timeout(Some(self.create_timeout))
            .recycle_timeout(Some(self.recycle_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::invalid(format!("the pool could not be built: {e}")))
    }
}

/// Whether recycling a connection can take long enough to need the pool's recycle timeout.
#[derive(Clone, Copy)]
enum Recycling {
    /// The handle built the pool with `RecyclingMethod::Fast`: a check of the client, no
    /// statement.
    Instant,
    /// A pool the service built, or one that runs a query to recycle (`check_primary`).
    AsConfigured,
}

/// The oldest PostgreSQL rowlock runs on, as `server_version_num` (13.0).
const MIN_SERVER_VERSION: i32 = 130_000;

/// Why a server of this `server_version_num` cannot be used, if it cannot.
fn unsupported(version: i32) -> Option<String> {
    (version < MIN_SERVER_VERSION).then(|| {
        // 10 and later number majors alone (120017 is 12.17); before, 90624 is 9.6.24.
        let major = if version >= 100_000 {
            (version / 10_000).to_string()
        } else {
            format!("{}.{}", version / 10_000, version / 100 % 100)
        };
        format!(
            "the server runs PostgreSQL {major}; rowlock needs 13 or newer \
             (pg_current_xact_id, pg_xact_status)"
        )
    })
}

/// Values libpq reads and tokio-postgres does not, with what to write instead: connection
/// strings are copied from providers' docs and libpq services, which use them.
const LIBPQ_ONLY: &[(&str, &[&str], &str)] = &[
    (
        "sslmode",
        &["verify-ca", "verify-full"],
        "tokio-postgres reads disable, prefer and require. With rowlock's `rustls` feature, \
         sslmode=require verifies the server's certificate chain and its host name, as \
         verify-full does: write that",
    ),
    (
        "sslmode",
        &["allow"],
        "tokio-postgres reads disable, prefer and require: write sslmode=prefer (TLS when the \
         server offers it)",
    ),
    (
        "target_session_attrs",
        &["primary", "standby", "prefer-standby"],
        "tokio-postgres reads any, read-write and read-only. rowlock locks rows, which only a \
         primary can: write target_session_attrs=read-write (the first host that accepts \
         writes)",
    ),
];

fn parse_url(url: &str) -> Result<Config, Error> {
    if url.trim().is_empty() {
        return Err(Error::invalid(
            "the connection string is empty (e.g. postgres://user@localhost/db)",
        ));
    }
    url.parse().map_err(|e: tokio_postgres::Error| {
        // The driver's own text is only "invalid connection string"; its source says which
        // option (never the value, so no password is printed).
        let cause = std::error::Error::source(&e).map(ToString::to_string);
        let libpq = cause.as_deref().and_then(|cause| {
            LIBPQ_ONLY.iter().find_map(|(option, values, advice)| {
                let value = option_value(url, option)?;
                (cause.contains(&format!("`{option}`")) && values.contains(&value))
                    .then(|| format!("{option}={value} is libpq's; {advice}"))
            })
        });
        Error::invalid(libpq.unwrap_or_else(|| {
            let why = cause.map(|c| format!(": {c}")).unwrap_or_default();
            format!("not a PostgreSQL connection string (URL or key=value): {e}{why}")
        }))
    })
}

/// The value `url` gives `option`, in either form (`…?a=b&option=value`, `a=b option=value`),
/// for the options of [`LIBPQ_ONLY`] (their values are never quoted or percent-encoded).
fn option_value<'a>(url: &'a str, option: &str) -> Option<&'a str> {
    url.split(|c: char| c == '?' || c == '&' || c.is_whitespace())
        .find_map(|pair| pair.strip_prefix(option)?.strip_prefix('='))
}

impl Builder {
    /// The manager when the service gave no connector: with the `rustls` feature and a URL
    /// that requires TLS (`sslmode=require`), rustls trusting the webpki roots and the
    /// certificates given; plain TCP otherwise (`sslmode=prefer`, the driver's default, then
    /// connects without TLS, as it does when a server does not offer it).
    fn default_manager(
        &self,
        config: Config,
        manager_config: ManagerConfig,
    ) -> Result<Manager, Error> {
        #[cfg(feature = "rustls")]
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            let tls = rustls_connector(&self.roots)?;
            return Ok(Manager::from_connect(
                config,
                Connector::new(tls),
                manager_config,
            ));
        }
        #[cfg(not(feature = "rustls"))]
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err(Error::invalid(
                "the connection string requires TLS (sslmode=require): turn on rowlock's \
                 `rustls` feature, or give a connector with Builder::tls",
            ));
        }
        Ok(Manager::from_connect(
            config,
            Connector::new(NoTls),
            manager_config,
        ))
    }
}

/// rustls (ring) trusting the webpki roots and `roots` (PEM).
#[cfg(feature = "rustls")]
fn rustls_connector(roots: &[Vec<u8>]) -> Result<tokio_postgres_rustls::MakeRustlsConnect, Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let mut store = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for pem in roots {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::invalid(format!("a root certificate does not parse: {e}")))?;
        if certs.is_empty() {
            return Err(Error::invalid(
                "a root certificate PEM holds no certificate (no BEGIN CERTIFICATE block)",
            ));
        }
        for cert in certs {
            store
                .add(cert)
                .map_err(|e| Error::invalid(format!("a root certificate is not usable: {e}")))?;
        }
    }
    // ring builds with a C compiler alone (aws-lc-rs, rustls's default, may need more). rustls
    // 0.23.48 marks ring's provider deprecated for lacking post-quantum key exchange; the
    // classical groups it offers are what PostgreSQL servers negotiate today.
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::invalid(format!("TLS could not be set up: {e}")))?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// `ty` as an unnamed statement declares its parameter: a built-in type by its oid, any other
/// with oid 0, for the server to infer (see [`Db::learn_text_types`]).
fn inferred_unless_builtin(ty: &Type) -> Type {
    if Type::from_oid(ty.oid()).is_some() {
        ty.clone()
    } else {
        Type::new(
            ty.name().to_owned(),
            0,
            ty.kind().clone(),
            ty.schema().to_owned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_hash_apart_and_are_found() {
        use std::hash::BuildHasher;
        let ids = [
            TypeId::of::<u8>(),
            TypeId::of::<u16>(),
            TypeId::of::<String>(),
            TypeId::of::<Vec<String>>(),
            TypeId::of::<Db>(),
        ];
        let build = BuildHasherDefault::<TypeIdHasher>::default();
        let mut hashes: Vec<u64> = ids.iter().map(|id| build.hash_one(id)).collect();
        hashes.sort_unstable();
        hashes.dedup();
        assert_eq!(hashes.len(), ids.len());
        let map: HashMap<TypeId, usize, BuildHasherDefault<TypeIdHasher>> =
            ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(map[id], i);
        }
    }

    #[test]
    fn servers_older_than_13_are_named() {
        assert_eq!(
            unsupported(120_017).as_deref(),
            Some(
                "the server runs PostgreSQL 12; rowlock needs 13 or newer \
                 (pg_current_xact_id, pg_xact_status)"
            )
        );
        assert_eq!(
            unsupported(90_624).unwrap().split(';').next(),
            Some("the server runs PostgreSQL 9.6")
        );
        assert_eq!(unsupported(130_000), None);
        assert_eq!(unsupported(150_018), None);
    }
}
