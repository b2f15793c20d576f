//! Leases on claimed rows (a visibility timeout): a claim-and-mark whose caller vanishes
//! (dropped, crashed, killed) leaves its rows marked with nobody working on them; with a
//! lease they are claimable again once it expires. Built on the claim and transition paths:
//! a leased claim is a claim with one more condition and one more `SET`, and extending,
//! releasing and completing a lease are transitions fenced by the lease's attempt number.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::api::claim_sql::SharedParam;
use crate::api::transition::{Transition, refine_bind_error};
use crate::db::Db;
use crate::error::{Error, Step};
use crate::options::validate_timeout;
use crate::outcome::Outcome;
use crate::row::{LockableRow, Table, quote_ident};

/// The column a leased claim returns the lease's attempt number in.
pub(crate) const ATTEMPT_ALIAS: &str = "rowlock_lease_attempt";

/// A lease on claimed rows: a claim with [`Claim::lease`](crate::Claim::lease) marks each row
/// it claims as the claimer's until `now() + duration` (the server's clock) and counts the
/// attempt; a row whose lease has expired is eligible again, for any claimer.
///
/// The table needs two columns for it, by default `leased_until timestamptz` (`NULL`: never
/// leased or released) and `attempts integer NOT NULL DEFAULT 0`; name others with
/// [`until_column`](Self::until_column) and [`attempts_column`](Self::attempts_column).
///
/// **Semantics: at least once.** A worker that dies holding a lease leaves its rows to the
/// next claimer after the lease expires; a worker that is merely slow can find, when it
/// completes, that its lease expired and the row was claimed again (its attempt number no
/// longer matches): [`Leased::complete`] then changes nothing and answers
/// [`Outcome::Conflict`]. Work done outside the database may therefore run more than
/// once: make it idempotent, or extend the lease ([`Leased::extend`]) well before it expires.
/// The attempt number also tells how often a row was tried: filter on it to give up on rows
/// that keep failing.
///
/// ```
/// use std::time::Duration;
/// use rowlock::{Claim, Compare, Direction, Lease};
///
/// let claim = Claim::new()
///     .filter("status", Compare::Eq, "pending")
///     .order_by("id", Direction::Asc)
///     .lease(Lease::new(Duration::from_secs(30)));
/// ```
#[derive(Clone)]
pub struct Lease {
    pub(crate) duration: Duration,
    /// The duration in seconds, bound as a parameter.
    pub(crate) seconds: SharedParam,
    pub(crate) until: String,
    pub(crate) attempts: String,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("duration", &self.duration)
            .field("until", &self.until)
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl Lease {
    /// A lease of `duration` on the columns `leased_until` and `attempts`. A duration under
    /// 1 ms is refused with [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument)
    /// when the claim is used.
    #[must_use]
    pub fn new(duration: Duration) -> Self {
        Lease {
            duration,
            seconds: Arc::new(duration.as_secs_f64()),
            until: "leased_until".into(),
            attempts: "attempts".into(),
        }
    }

    /// The `timestamptz` column holding when the lease ends. Defaults to `leased_until`.
    #[must_use]
    pub fn until_column(mut self, column: impl Into<String>) -> Self {
        self.until = column.into();
        self
    }

    /// The integer column counting the attempts. Defaults to `attempts`.
    #[must_use]
    pub fn attempts_column(mut self, column: impl Into<String>) -> Self {
        self.attempts = column.into();
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        validate_timeout("a lease's duration", self.duration)
    }

    /// The claim's extra condition: never leased, released, or expired.
    pub(crate) fn eligible(&self) -> Result<String, Error> {
        let until = quote_ident(&self.until)?;
        Ok(format!("({until} IS NULL OR {until} <= now())"))
    }

    /// The claim's extra `SET`, its lease parameter numbered `$n`.
    pub(crate) fn set(&self, n: usize) -> Result<String, Error> {
        let (until, attempts) = (quote_ident(&self.until)?, quote_ident(&self.attempts)?);
        Ok(format!(
            "{until} = now() + make_interval(secs => ${n}), {attempts} = {attempts} + 1"
        ))
    }

    /// What the claim returns besides the row: the attempt number, as `bigint`.
    pub(crate) fn returning(&self, table: &str) -> Result<String, Error> {
        Ok(format!(
            "{table}.{}::int8 AS {ATTEMPT_ALIAS}",
            quote_ident(&self.attempts)?
        ))
    }

    /// `AND` the lease is still this attempt's: its number and not expired; `$n` is the
    /// attempt number.
    fn held(&self, n: usize) -> Result<String, Error> {
        let (until, attempts) = (quote_ident(&self.until)?, quote_ident(&self.attempts)?);
        Ok(format!("{attempts}::int8 = ${n} AND {until} > now()"))
    }
}

/// A row claimed with a lease, and the lease's attempt number (1 for the first claim of the
/// row, 2 after a lease expired and the row was claimed again, …): the fencing token that
/// [`extend`](Self::extend), [`release`](Self::release) and [`complete`](Self::complete) check,
/// so a worker whose lease expired and was taken over changes nothing.
///
/// Claim it with [`Db::claim_and_mark`](crate::Db::claim_and_mark)`::<Leased<R>>` and a claim that has
/// a [`Lease`]; a claim without one is refused with
/// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) before anything is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive] // more about the lease (its end) may be reported.
pub struct Leased<R> {
    /// The claimed row, as the claim marked it.
    pub row: R,
    /// The lease's attempt number.
    pub attempt: i64,
}

impl<R: LockableRow> LockableRow for Leased<R> {
    type Key = R::Key;
    const TABLE: Table = R::TABLE;
    const KEY_COLUMNS: &'static [&'static str] = R::KEY_COLUMNS;
    const COLUMNS: &'static [&'static str] = R::COLUMNS;
    const LEASED: bool = true;
    fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Leased {
            row: R::from_row(row)?,
            attempt: row.try_get(ATTEMPT_ALIAS)?,
        })
    }
    fn key(&self) -> R::Key {
        self.row.key()
    }
    fn misfit_column(row: &Row) -> Option<crate::MisfitColumn> {
        R::misfit_column(row).or_else(|| {
            let error = row.try_get::<_, i64>(ATTEMPT_ALIAS).err()?;
            Some(crate::MisfitColumn {
                column: ATTEMPT_ALIAS,
                field: "attempt",
                error,
            })
        })
    }
}

impl<R: LockableRow> Leased<R> {
    /// Extends the lease to `now() + duration` of `lease`, if it is still this attempt's.
    /// [`Outcome::Done`] with the row; [`Outcome::Conflict`] with the row as it is
    /// when the lease expired (whether or not another claimer took it); `NotFound` when the
    /// row is gone; `LockTimeout` when another transaction held the row longer than the
    /// handle's lock timeout (nothing changed). One statement, committed on its own.
    pub async fn extend(&self, db: &Db, lease: &Lease) -> Result<Outcome<R>, Error> {
        lease.validate()?;
        let renew = Transition::new(format!(
            "{} = now() + make_interval(secs => $2)",
            quote_ident(&lease.until)?
        ))
        .when(lease.held(1)?);
        let result = db
            .transition::<R>(&self.row.key(), &renew, &[&self.attempt, &*lease.seconds])
            .await;
        result.map_err(|e| e.within(Step::Lease))
    }

    /// Gives the row back at once (its lease ends now; the attempt stays counted), if the
    /// lease is still this attempt's: for a worker that cannot finish and wants another to
    /// try. Outcomes as for [`extend`](Self::extend).
    pub async fn release(&self, db: &Db, lease: &Lease) -> Result<Outcome<R>, Error> {
        let release =
            Transition::new(format!("{} = NULL", quote_ident(&lease.until)?)).when(lease.held(1)?);
        let result = db
            .transition::<R>(&self.row.key(), &release, &[&self.attempt])
            .await;
        result.map_err(|e| e.within(Step::Lease))
    }

    /// Completes the work: applies `set` (an SQL `SET` list whose `$1`, `$2`, … are `params`,
    /// e.g. `status = 'done', result = $1`, which should take the row out of the claim's
    /// filter) and ends the lease, if it is still this attempt's; outcomes as for
    /// [`extend`](Self::extend). A lease that expired meanwhile is a `Conflict`, and nothing
    /// is changed: another claimer may be doing the work again.
    pub async fn complete(
        &self,
        db: &Db,
        lease: &Lease,
        set: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Outcome<R>, Error> {
        let done = Transition::new(format!("{set}, {} = NULL", quote_ident(&lease.until)?))
            .when(lease.held(params.len() + 1)?);
        let mut all = params.to_vec();
        all.push(&self.attempt);
        let result = db.transition::<R>(&self.row.key(), &done, &all).await;
        result.map_err(|e| refine_bind_error::<R>(e.within(Step::Lease), "complete's set"))
    }
}
