//! Transaction-scoped advisory locks: locks on application-chosen keys rather than rows.
//!
//! Only the transaction-scoped functions are used (`pg_advisory_xact_lock`,
//! `pg_try_advisory_xact_lock`): the lock ends with the transaction, on commit, rollback or a
//! lost connection, and never outlives it in a pooled session (session-level advisory locks
//! survive rollback, stack, and are unsafe behind PgBouncer's transaction pooling).

use std::future::Future;

use crate::scoped::ScopedBoxFuture;

use crate::attempt::{LockStep, run_locked};
use crate::db::Db;
use crate::diagnostics::BlockerQuery;
use crate::error::{Error, ErrorKind, Step};
use crate::lock::{Lock, LockMode, LockStrength};
use crate::outcome::Outcome;
use crate::transaction::{Rows, Transaction};

/// The key of an advisory lock: one 64-bit integer, or a pair of 32-bit integers (PostgreSQL
/// keeps the two key spaces apart: `single(k)` and `pair(a, b)` never collide).
///
/// ```
/// use rowlock::AdvisoryKey;
///
/// let nightly = AdvisoryKey::from_name("nightly-report");
/// assert_eq!(nightly, AdvisoryKey::from_name("nightly-report")); // stable across runs
/// let tenant = AdvisoryKey::pair(7, 42);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AdvisoryKey(Repr);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Repr {
    Single(i64),
    Pair(i32, i32),
}

impl AdvisoryKey {
    /// A 64-bit key.
    pub const fn single(key: i64) -> Self {
        AdvisoryKey(Repr::Single(key))
    }

    /// A two-part key, e.g. (kind of resource, id).
    pub const fn pair(a: i32, b: i32) -> Self {
        AdvisoryKey(Repr::Pair(a, b))
    }

    /// A 64-bit key derived from a name: the 64-bit FNV-1a hash of its UTF-8 bytes
    /// (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`), read as a signed integer.
    ///
    /// The function is fixed and documented, so every process and every language that
    /// implements FNV-1a derives the same key from the same name. Different names can collide
    /// (with probability about n²/2⁶⁵ for n names); a collision only makes two unrelated
    /// operations wait for each other, never lets two holders in.
    pub const fn from_name(name: &str) -> Self {
        let bytes = name.as_bytes();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut i = 0;
        while i < bytes.len() {
            hash ^= bytes[i] as u64;
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            i += 1;
        }
        AdvisoryKey(Repr::Single(hash as i64))
    }
}

/// An `i64` is [`AdvisoryKey::single`]: `db.with_advisory_lock(42, …)`.
impl From<i64> for AdvisoryKey {
    fn from(key: i64) -> Self {
        AdvisoryKey::single(key)
    }
}

/// A pair of `i32`s is [`AdvisoryKey::pair`]: `db.with_advisory_lock((7, 42), …)`.
impl From<(i32, i32)> for AdvisoryKey {
    fn from((a, b): (i32, i32)) -> Self {
        AdvisoryKey::pair(a, b)
    }
}

/// The key as `pg_locks` and the SQL functions take it: `42`, or `(7, 42)` for a pair (a key
/// from a name prints as its number).
impl std::fmt::Display for AdvisoryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Repr::Single(k) => write!(f, "{k}"),
            Repr::Pair(a, b) => write!(f, "({a}, {b})"),
        }
    }
}

impl AdvisoryKey {
    /// The lock's key in `pg_locks` (`classid`, `objid`, `objsubid`): a bigint is split into
    /// its high and low 32 bits (objsubid 1), a pair is kept as it is (objsubid 2).
    fn pg_locks_key(self) -> [i64; 3] {
        match self.0 {
            Repr::Single(k) => [(k as u64 >> 32) as i64, i64::from(k as u64 as u32), 1],
            Repr::Pair(x, y) => [i64::from(x as u32), i64::from(y as u32), 2],
        }
    }
}

impl Transaction {
    /// Takes the transaction-scoped advisory lock `key`, held until this transaction ends:
    /// shared for the sharing strengths ([`LockStrength::Share`], [`LockStrength::KeyShare`]:
    /// `pg_advisory_xact_lock_shared`, which other shared holders do not block), exclusive
    /// for the others (the default, [`LockStrength::Update`]). Of the options' transaction
    /// settings only the lock timeout applies here, as the transaction's own.
    ///
    /// - [`LockMode::Wait`]: waits (`pg_advisory_xact_lock`), bounded by the transaction's
    ///   lock timeout if it has one: [`Outcome::LockTimeout`] then; the wait ran in a savepoint
    ///   (same flush) that is rolled back, so the transaction can go on.
    /// - [`LockMode::NoWait`]: tries once (`pg_try_advisory_xact_lock`):
    ///   [`Outcome::LockNotAvailable`] if another transaction holds it. Nothing failed on the
    ///   server, so the transaction can go on.
    /// - [`LockMode::SkipLocked`] has no meaning for a single key and is refused with
    ///   [`ErrorKind::InvalidArgument`] before anything is sent.
    ///
    /// Taking a lock this transaction already holds succeeds at once.
    pub async fn advisory_lock(
        &self,
        key: impl Into<AdvisoryKey>,
        options: impl Into<Lock>,
    ) -> Result<Outcome<()>, Error> {
        let options = options.into();
        options.validate()?;
        self.take_advisory_lock(key.into(), options.mode, shared(options.strength), true)
            .await
    }

    /// [`advisory_lock`](Self::advisory_lock); inside the caller's own transaction
    /// (`in_callers_tx`) a wait that can time out runs in a savepoint, rolled back if it does,
    /// so the transaction stays usable.
    async fn take_advisory_lock(
        &self,
        key: AdvisoryKey,
        mode: LockMode,
        shared: bool,
        in_callers_tx: bool,
    ) -> Result<Outcome<()>, Error> {
        let (wait_sql, try_sql) = match (key.0, shared) {
            (Repr::Single(_), false) => (
                "SELECT pg_advisory_xact_lock($1)",
                "SELECT pg_try_advisory_xact_lock($1)",
            ),
            (Repr::Pair(..), false) => (
                "SELECT pg_advisory_xact_lock($1, $2)",
                "SELECT pg_try_advisory_xact_lock($1, $2)",
            ),
            (Repr::Single(_), true) => (
                "SELECT pg_advisory_xact_lock_shared($1)",
                "SELECT pg_try_advisory_xact_lock_shared($1)",
            ),
            (Repr::Pair(..), true) => (
                "SELECT pg_advisory_xact_lock_shared($1, $2)",
                "SELECT pg_try_advisory_xact_lock_shared($1, $2)",
            ),
        };
        let (single, a, b);
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = match key.0 {
            Repr::Single(k) => {
                single = k;
                vec![&single]
            }
            Repr::Pair(x, y) => {
                (a, b) = (x, y);
                vec![&a, &b]
            }
        };
        let sql = match mode {
            LockMode::Wait => wait_sql,
            LockMode::NoWait => try_sql,
            LockMode::SkipLocked => return Err(skip_locked_refused()),
        };
        let savepoint = if in_callers_tx && mode == LockMode::Wait && self.lock_may_time_out(false)
        {
            Some(self.open_savepoint()?)
        } else {
            None
        };
        let (conn, params) = (self.conn(), &params[..]);
        let sent = self.run_sql(Step::AdvisoryLock, sql, params, |statement| async move {
            statement.rows::<Rows>(conn, params).await
        });
        let outcome = match sent.await {
            // pg_try_advisory_xact_lock says whether it got the lock (its one row); the
            // waiting form returns void.
            Ok(rows) if mode == LockMode::NoWait => match rows[0].try_get::<_, bool>(0) {
                Ok(true) => Ok(Outcome::Done(())),
                Ok(false) => Ok(Outcome::LockNotAvailable(
                    Error::with_kind(
                        ErrorKind::LockNotAvailable,
                        format!("another transaction holds advisory lock {key}"),
                    )
                    .at(Step::AdvisoryLock),
                )),
                Err(e) => Err(Error::decode(e).at(Step::AdvisoryLock)),
            },
            Ok(_) => Ok(Outcome::Done(())),
            Err(e) if e.kind() == ErrorKind::LockTimeout => Ok(Outcome::LockTimeout(
                e.with_detail(format!("waiting for advisory lock {key}")),
            )),
            Err(e) => Err(e),
        };
        if let Some(id) = savepoint {
            self.end_savepoint(id, matches!(outcome, Ok(Outcome::LockTimeout(_))));
        }
        outcome
    }
}

impl Db {
    /// Opens a pooled transaction, takes the advisory lock `key` (mode, lock timeout and retry
    /// from `options`; shared for the sharing strengths, exclusive otherwise, as
    /// [`Transaction::advisory_lock`]), runs `f` while it is held, and commits if `f`
    /// returns `Ok`. The lock is released when the transaction ends, whatever happens.
    ///
    /// Returns [`Outcome::Done`] with `f`'s value, or [`Outcome::LockNotAvailable`] /
    /// [`Outcome::LockTimeout`] without running `f`. Invalid options, or
    /// [`LockMode::SkipLocked`], are refused with [`ErrorKind::InvalidArgument`] before a
    /// connection is taken.
    ///
    /// ```no_run
    /// # async fn demo(db: &rowlock::Db) -> Result<(), rowlock::Error> {
    /// use rowlock::{AdvisoryKey, Lock, Outcome};
    ///
    /// // Only one instance runs the nightly report; the others skip it.
    /// let key = AdvisoryKey::from_name("nightly-report");
    /// match db
    ///     .with_advisory_lock(key, Lock::no_wait(), |tx| Box::pin(async move {
    ///         tx.execute("INSERT INTO reports (day) VALUES (current_date)", &[]).await?;
    ///         Ok::<_, rowlock::Error>(())
    ///     }))
    ///     .await?
    /// {
    ///     Outcome::Done(()) => println!("report written"),
    ///     _ => println!("another instance is on it"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn with_advisory_lock<'a, T, E, F>(
        &self,
        key: impl Into<AdvisoryKey>,
        options: impl Into<Lock>,
        mut f: F,
    ) -> Result<Outcome<T>, E>
    where
        E: From<Error>,
        F: for<'t> FnMut(&'t Transaction) -> ScopedBoxFuture<'a, 't, Result<T, E>>,
    {
        let key = key.into();
        let options = options.into();
        options.validate()?;
        if options.mode == LockMode::SkipLocked {
            return Err(skip_locked_refused().into());
        }
        let step = AdvisoryLock {
            key,
            mode: options.mode,
            shared: shared(options.strength),
            pg_locks_key: options.find_blockers.then(|| key.pg_locks_key()),
        };
        run_locked(
            Some(("with_advisory_lock", "")),
            self,
            &options.transaction,
            &step,
            |tx, ()| f(tx),
        )
        .await
    }
}

/// Whether `strength` asks for the shared advisory lock.
fn shared(strength: LockStrength) -> bool {
    matches!(strength, LockStrength::Share | LockStrength::KeyShare)
}

fn skip_locked_refused() -> Error {
    Error::invalid(
        "an advisory lock can be waited for (Wait) or tried (NoWait); SkipLocked has no \
         meaning for a single key",
    )
}

/// The lock step of [`Db::with_advisory_lock`].
struct AdvisoryLock {
    key: AdvisoryKey,
    mode: LockMode,
    shared: bool,
    /// `[classid, objid, objsubid]` of the lock in `pg_locks`, when asked to find blockers.
    pg_locks_key: Option<[i64; 3]>,
}

impl LockStep for AdvisoryLock {
    type Locked = Outcome<()>;
    fn lock<'t>(
        &'t self,
        tx: &'t Transaction,
    ) -> impl Future<Output = Result<Outcome<()>, Error>> + Send + 't {
        tx.take_advisory_lock(self.key, self.mode, self.shared, false)
    }
    fn blockers(&self, _: &Error) -> Option<BlockerQuery<'_>> {
        self.pg_locks_key.as_ref().map(BlockerQuery::advisory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_keys_are_fnv1a_64() {
        // Reference values of 64-bit FNV-1a.
        assert_eq!(
            AdvisoryKey::from_name(""),
            AdvisoryKey::single(0xcbf2_9ce4_8422_2325_u64 as i64)
        );
        assert_eq!(
            AdvisoryKey::from_name("a"),
            AdvisoryKey::single(0xaf63_dc4c_8601_ec8c_u64 as i64)
        );
        assert_eq!(
            AdvisoryKey::from_name("foobar"),
            AdvisoryKey::single(0x8594_4171_f739_67e8_u64 as i64)
        );
        assert_ne!(AdvisoryKey::from_name("a"), AdvisoryKey::from_name("b"));
    }
}
