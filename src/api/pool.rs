//! A production pool in one line: from a URL or `DATABASE_URL`, with timeouts set.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{Config, NoTls};

use crate::error::Error;
use crate::options::validate_timeout;

/// Settings of a pool built by [`pool_from_url`] and [`pool_from_env`].
///
/// ```
/// use std::time::Duration;
/// use rowlock::PoolOptions;
///
/// let options = PoolOptions::new().max_size(32).wait_timeout(Duration::from_secs(2));
/// assert_eq!(options.max_size, 32);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive] // more settings may come; construct with `new()` and the setters.
pub struct PoolOptions {
    /// Most connections open at once.
    pub max_size: usize,
    /// How long a call waits for a free connection before [`ErrorKind::PoolTimeout`].
    ///
    /// [`ErrorKind::PoolTimeout`]: crate::ErrorKind::PoolTimeout
    pub wait_timeout: Duration,
    /// How long opening a new connection may take.
    pub create_timeout: Duration,
    /// How long checking a returned connection may take before it is replaced.
    pub recycle_timeout: Duration,
    /// Check, before handing out a pooled connection, that its server is still a primary
    /// (`SELECT pg_current_wal_lsn()`, which fails on a standby); a connection whose server
    /// went into recovery is closed and another one is taken. One round trip per checkout.
    /// Off by default: rowlock closes such a connection anyway at its first refused write
    /// ([`ErrorKind::ReadOnly`](crate::ErrorKind::ReadOnly)), and new connections go to the
    /// primary when the URL lists every host with `target_session_attrs=read-write`.
    pub check_primary: bool,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
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
        }
    }
}

impl PoolOptions {
    /// The defaults: `4 ×` the cores connections, 5 s to wait for one, 5 s to open one, 5 s
    /// to recycle one.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Most connections open at once (at least 1). Defaults to 4 × the number of cores.
    #[must_use]
    pub fn max_size(mut self, max_size: usize) -> Self {
        self.max_size = max_size;
        self
    }

    /// How long a call waits for a free connection. Defaults to 5 s.
    #[must_use]
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// How long opening a connection may take. Defaults to 5 s.
    #[must_use]
    pub fn create_timeout(mut self, timeout: Duration) -> Self {
        self.create_timeout = timeout;
        self
    }

    /// How long recycling a returned connection may take. Defaults to 5 s.
    #[must_use]
    pub fn recycle_timeout(mut self, timeout: Duration) -> Self {
        self.recycle_timeout = timeout;
        self
    }

    /// Checks that a pooled connection's server is still a primary before handing it out
    /// (see [`check_primary`](Self::check_primary)). Defaults to off.
    #[must_use]
    pub fn check_primary(mut self, check: bool) -> Self {
        self.check_primary = check;
        self
    }

    /// Checks the settings: at least one connection, every timeout at least 1 ms.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_size == 0 {
            return Err(Error::invalid("a pool needs max_size of at least 1"));
        }
        validate_timeout("wait_timeout", self.wait_timeout)?;
        validate_timeout("create_timeout", self.create_timeout)?;
        validate_timeout("recycle_timeout", self.recycle_timeout)
    }

    /// A pool of connections made with `config` (no TLS).
    ///
    /// A `config` that could never connect (no host, no user) is refused with
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) here, rather than as
    /// a failed connection, retried, at the first call.
    pub fn build(&self, config: Config) -> Result<Pool, Error> {
        self.validate()?;
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
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: if self.check_primary {
                    // Fails with "recovery is in progress" on a standby.
                    RecyclingMethod::Custom("SELECT pg_catalog.pg_current_wal_lsn()".into())
                } else {
                    RecyclingMethod::Fast
                },
            },
        );
        Pool::builder(manager)
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

/// A pool for the PostgreSQL URL or key-value connection string `url` (`postgres://user:pw@host/db`,
/// `host=… user=…`), with [`PoolOptions::new`]'s settings. Connections are made when first
/// needed, without TLS: for TLS, build the deadpool `Pool` yourself with your connector.
///
/// A string that does not parse, or names no host or no user (an empty string), is refused
/// with [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument); the message does not
/// repeat the string, which may carry a password.
///
/// ```no_run
/// # fn demo() -> Result<(), rowlock::Error> {
/// let pool = rowlock::pool_from_url("postgres://app@localhost/app")?;
/// # Ok(()) }
/// ```
pub fn pool_from_url(url: &str) -> Result<Pool, Error> {
    let config: Config = url.parse().map_err(|e: tokio_postgres::Error| {
        Error::invalid(format!(
            "not a PostgreSQL connection string (URL or key=value): {e}"
        ))
    })?;
    PoolOptions::new().build(config)
}

/// [`pool_from_url`] with the `DATABASE_URL` environment variable; refused with
/// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) if it is not set.
///
/// ```no_run
/// # fn demo() -> Result<(), rowlock::Error> {
/// let pool = rowlock::pool_from_env()?;
/// # Ok(()) }
/// ```
pub fn pool_from_env() -> Result<Pool, Error> {
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| Error::invalid("DATABASE_URL is not set (or not valid UTF-8)"))?;
    pool_from_url(&url)
}
