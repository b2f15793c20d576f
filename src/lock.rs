//! The lock model: how to lock (mode), how strongly (strength), and for how long to wait.

use std::time::Duration;

use crate::error::Error;
use crate::options::TransactionOptions;

/// What to do when another transaction holds a conflicting lock on a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
// Exhaustive: the three wait policies of PostgreSQL's locking clause, unchanged since 9.5.
pub enum LockMode {
    /// Wait for the lock (bounded by the lock timeout, if one is set). Plain `FOR …`.
    #[default]
    Wait,
    /// Fail at once with lock-not-available (`55P03`). `FOR … NOWAIT`.
    NoWait,
    /// Leave locked rows out of the result at once, without an error. `FOR … SKIP LOCKED`.
    SkipLocked,
}

impl LockMode {
    pub(crate) fn clause(self) -> &'static str {
        match self {
            LockMode::Wait => "",
            LockMode::NoWait => " NOWAIT",
            LockMode::SkipLocked => " SKIP LOCKED",
        }
    }
}

/// The row-lock strength, as in PostgreSQL's locking clause.
///
/// Conflicts (a requested lock waits for a held one marked X):
///
/// | requested \ held | KEY SHARE | SHARE | NO KEY UPDATE | UPDATE |
/// |---|---|---|---|---|
/// | `KeyShare` | | | | X |
/// | `Share` | | | X | X |
/// | `NoKeyUpdate` | | X | X | X |
/// | `Update` | X | X | X | X |
///
/// Plain `UPDATE`s take NO KEY UPDATE; `DELETE` and key-changing updates take UPDATE; inserting
/// a row whose foreign key references the row takes KEY SHARE. So [`NoKeyUpdate`](Self::NoKeyUpdate)
/// is the usual choice for read-check-update: it excludes other writers but lets foreign-key
/// inserts proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
// Exhaustive: PostgreSQL's four row-level lock strengths, unchanged since 9.3.
pub enum LockStrength {
    /// `FOR UPDATE`: conflicts with every other row lock. The default, as in most ORMs.
    #[default]
    Update,
    /// `FOR NO KEY UPDATE`: like UPDATE but does not block `FOR KEY SHARE` (foreign-key checks).
    NoKeyUpdate,
    /// `FOR SHARE`: a shared lock that blocks writers but not other SHARE/KEY SHARE lockers.
    Share,
    /// `FOR KEY SHARE`: the weakest lock; blocks only `FOR UPDATE` (deletes, key changes).
    KeyShare,
}

impl LockStrength {
    /// Every strength, strongest first.
    pub const ALL: &'static [LockStrength] = &[
        LockStrength::Update,
        LockStrength::NoKeyUpdate,
        LockStrength::Share,
        LockStrength::KeyShare,
    ];

    pub(crate) fn clause(self) -> &'static str {
        match self {
            LockStrength::Update => "FOR UPDATE",
            LockStrength::NoKeyUpdate => "FOR NO KEY UPDATE",
            LockStrength::Share => "FOR SHARE",
            LockStrength::KeyShare => "FOR KEY SHARE",
        }
    }

    /// Whether a lock of strength `self` must wait for a lock of strength `held` taken by
    /// another transaction (PostgreSQL's row-lock conflict table).
    pub fn conflicts_with(self, held: LockStrength) -> bool {
        use LockStrength::*;
        matches!(
            (self, held),
            (Update, _) | (_, Update) | (NoKeyUpdate, NoKeyUpdate | Share) | (Share, NoKeyUpdate)
        )
    }
}

/// How [`Db::with_locked_row`](crate::Db::with_locked_row) and friends lock: mode, strength, lock
/// timeout, and the options of the transaction they open.
///
/// ```
/// use std::time::Duration;
/// use rowlock::{LockMode, Lock, LockStrength};
///
/// let opts = Lock::new()
///     .mode(LockMode::Wait)
///     .strength(LockStrength::NoKeyUpdate)
///     .lock_timeout(Duration::from_millis(500));
/// assert!(opts.validate().is_ok());
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive] // more knobs may come; construct with `new()` and the setters.
pub struct Lock {
    /// Wait, fail at once, or skip.
    pub mode: LockMode,
    /// Lock strength.
    pub strength: LockStrength,
    /// Options of the transaction (its `lock_timeout` included) that [`Db::with_locked_row`](crate::Db::with_locked_row) and
    /// [`Db::with_locked_rows`](crate::Db::with_locked_rows) open.
    pub transaction: TransactionOptions,
    /// When the lock is not available or the wait times out, find out who holds it
    /// ([`Error::blockers`](crate::Error::blockers)).
    pub find_blockers: bool,
}

impl Lock {
    /// `FOR UPDATE`, waiting without a timeout (PostgreSQL's own default), in a transaction
    /// with the server's default isolation level.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// `FOR UPDATE`, waiting (the same as [`new`](Self::new)).
    #[must_use]
    pub fn wait() -> Self {
        Self::default()
    }

    /// `FOR UPDATE NOWAIT`: a row another transaction holds is
    /// [`Outcome::LockNotAvailable`](crate::Outcome::LockNotAvailable) at once.
    #[must_use]
    pub fn no_wait() -> Self {
        Self::default().mode(LockMode::NoWait)
    }

    /// `FOR UPDATE SKIP LOCKED`: a row another transaction holds is
    /// [`Outcome::Skipped`](crate::Outcome::Skipped).
    #[must_use]
    pub fn skip_locked() -> Self {
        Self::default().mode(LockMode::SkipLocked)
    }

    /// Sets the lock mode. Defaults to [`LockMode::Wait`].
    #[must_use]
    pub fn mode(mut self, mode: LockMode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the lock strength. Defaults to [`LockStrength::Update`].
    #[must_use]
    pub fn strength(mut self, strength: LockStrength) -> Self {
        self.strength = strength;
        self
    }

    /// When the lock is not available or the wait times out, asks the server who holds it, so
    /// that [`Error::blockers`](crate::Error::blockers) can name the sessions: two more round
    /// trips, on that failure path only; the guide's
    /// [Who holds the lock](crate::guide::outcomes#who-holds-the-lock) says what it finds with
    /// which privileges. Applies to the
    /// calls that open their own transaction
    /// ([`with_locked_row(s)`](crate::Db::with_locked_row),
    /// [`Db::with_locked_set`](crate::Db::with_locked_set),
    /// [`Db::with_advisory_lock`](crate::Db::with_advisory_lock)). Defaults to off: `NoWait`
    /// exists to fail fast, and a busy row is an ordinary outcome that should cost what
    /// success costs.
    #[must_use]
    pub fn find_blockers(mut self, find: bool) -> Self {
        self.find_blockers = find;
        self
    }

    /// Bounds every lock wait in the transaction with `SET LOCAL lock_timeout` (never a session
    /// `SET`, so it is safe behind PgBouncer transaction pooling). With [`LockMode::Wait`] an
    /// expiry is reported as a lock timeout, distinct from `NoWait`'s lock-not-available.
    /// Must be between 1 ms and `i32::MAX` ms; sub-millisecond parts round up (PostgreSQL counts
    /// whole milliseconds). Out-of-range values are refused when the options are used, with
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument), not clamped.
    /// The same setting as [`TransactionOptions::lock_timeout`] on
    /// [`transaction`](Self::transaction). Defaults to none (wait forever).
    #[must_use]
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.transaction.lock_timeout = Some(timeout);
        self
    }

    /// Retries the call under `policy` (a [`RetryPolicy`](crate::RetryPolicy), or a number
    /// of attempts), each attempt in a new transaction: the same as
    /// [`TransactionOptions::retry`] on [`transaction`](Self::transaction). Lock contention
    /// (`NoWait`'s busy row, a lock timeout) is retried only when the policy says
    /// [`retry_lock_contention`](crate::RetryPolicy::retry_lock_contention); a bare number
    /// of attempts turns it on, since a caller asking `Lock::no_wait().retry(3)` means it.
    #[must_use]
    pub fn retry(mut self, policy: impl Into<crate::RetryPolicy>) -> Self {
        self.transaction.retry = Some(policy.into());
        self
    }

    /// Sets the isolation level of the transaction (see [`TransactionOptions::isolation`]).
    #[must_use]
    pub fn isolation(mut self, isolation: crate::Isolation) -> Self {
        self.transaction.isolation = Some(isolation);
        self
    }

    /// Bounds every statement of the transaction (see
    /// [`TransactionOptions::statement_timeout`]). It bounds the lock statement's wait too,
    /// and then fails the call with [`ErrorKind::StatementTimeout`](crate::ErrorKind::StatementTimeout),
    /// not [`Outcome::LockTimeout`](crate::Outcome::LockTimeout): set a
    /// [`lock_timeout`](Self::lock_timeout) below it for the outcome.
    #[must_use]
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.transaction.statement_timeout = Some(timeout);
        self
    }

    /// Sets the options of the transaction opened around the lock. Defaults to
    /// [`TransactionOptions::new`].
    #[must_use]
    pub fn transaction(mut self, transaction: TransactionOptions) -> Self {
        self.transaction = transaction;
        self
    }

    /// Checks the options without touching the database; the locking functions call this
    /// before taking a connection.
    pub fn validate(&self) -> Result<(), Error> {
        self.transaction.validate()?;
        if self.transaction.read_only {
            return Err(Error::invalid(
                "row locks cannot be taken in a read-only transaction (PostgreSQL refuses \
                 SELECT ... FOR <strength> there); drop read_only",
            ));
        }
        Ok(())
    }

    /// `FOR <strength>[ NOWAIT | SKIP LOCKED]`.
    pub(crate) fn clause(&self) -> String {
        format!("{}{}", self.strength.clause(), self.mode.clause())
    }
}

impl From<&Lock> for Lock {
    fn from(lock: &Lock) -> Self {
        lock.clone()
    }
}

impl From<LockMode> for Lock {
    fn from(mode: LockMode) -> Self {
        Lock::new().mode(mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_table_matches_postgres_docs() {
        use LockStrength::*;
        // Rows: requested; columns: held KEY SHARE, SHARE, NO KEY UPDATE, UPDATE.
        let table = [
            (KeyShare, [false, false, false, true]),
            (Share, [false, false, true, true]),
            (NoKeyUpdate, [false, true, true, true]),
            (Update, [true, true, true, true]),
        ];
        for (requested, row) in table {
            for (held, expected) in [KeyShare, Share, NoKeyUpdate, Update].into_iter().zip(row) {
                assert_eq!(
                    requested.conflicts_with(held),
                    expected,
                    "{requested:?} vs {held:?}"
                );
            }
        }
    }

    #[test]
    fn clauses_render() {
        let o = Lock::new()
            .strength(LockStrength::KeyShare)
            .mode(LockMode::SkipLocked);
        assert_eq!(o.clause(), "FOR KEY SHARE SKIP LOCKED");
        let o = Lock::no_wait();
        assert_eq!(o.clause(), "FOR UPDATE NOWAIT");
    }

    #[test]
    fn bad_timeouts_are_refused() {
        for t in [
            Duration::ZERO,
            Duration::from_micros(999),
            Duration::from_secs(u64::MAX),
        ] {
            let e = Lock::new().lock_timeout(t).validate().unwrap_err();
            assert!(e.is_invalid_argument(), "{t:?}");
        }
        assert!(
            Lock::new()
                .lock_timeout(Duration::from_millis(1))
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn read_only_lock_is_refused() {
        let o = Lock::new().transaction(TransactionOptions::new().read_only(true));
        assert!(o.validate().unwrap_err().is_invalid_argument());
    }
}
