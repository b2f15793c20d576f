//! Claiming work with `SKIP LOCKED`: many workers, each gets different rows, exactly once.
//!
//! The claim statement has the shape every PostgreSQL job queue converged on:
//!
//! ```sql
//! WITH claimed AS MATERIALIZED (
//!     SELECT * FROM "jobs"
//!     WHERE "status" = $1 AND "run_at" <= $2          -- every filter before the LIMIT
//!     ORDER BY "priority" DESC, "id"                   -- includes the key: a total order
//!     LIMIT $3
//!     FOR NO KEY UPDATE SKIP LOCKED                    -- never waits for another worker
//! )
//! SELECT * FROM claimed ORDER BY "priority" DESC, "id" -- the requested order, restated
//! ```
//!
//! - Every eligibility predicate is inside the locking query, before the `LIMIT`, so a row is
//!   locked only if it is eligible, and at most `n` rows are locked.
//! - The `MATERIALIZED` CTE fences the `LIMIT`: the locking scan runs exactly once, even if
//!   the planner would otherwise re-run a sub-select (a `LIMIT` inside `IN (SELECT …)` can be
//!   executed more than once and lock more than `n` rows).
//! - The outer `ORDER BY` restates the order: rows re-checked after a concurrent update can
//!   come out of the scan out of order. It sorts at most `n` rows.
//! - Filter values are bound parameters; table and column names are quoted identifiers.
//! - The claim runs with `SET LOCAL plan_cache_mode = force_custom_plan`, so the planner sees
//!   the filter values and can use a partial index (a generic plan for `status = $1` cannot
//!   prove `WHERE status = 'pending'`). The setting goes back to the default in the same
//!   flush as the claim, so the closure's statements keep their cached plans.
//!
//! # Indexing, batch size and lock strength
//!
//! - Give the claim a partial index whose predicate is the filter's constant part and whose
//!   columns are the order, e.g. for the claim above
//!   `CREATE INDEX jobs_claimable ON jobs (priority DESC, id) WHERE status = 'pending'`.
//!   The claim is then an index scan that stops after `n` unlocked rows, with no sort under the
//!   lock; [`Db::explain_claim`](crate::Db::explain_claim) shows the plan. The index stays small because finished rows leave
//!   it.
//! - Batch size: a claim of `n` costs about one round trip however large `n` is, so batches
//!   multiply throughput when each job is cheap; but a batch is held (and redone after a
//!   failure) as a unit, and a worker holding a large batch leaves less for the others. Start
//!   with `n` around 10–100 and keep `workers × n` below the backlog you expect.
//! - Many batch claimers: claims that all start at the head of the order meet there, each
//!   walking past (and trying to lock) the rows the others hold. [`Claim::start_at`] starts
//!   each claim at a different point and wraps around; with random starts 16 claimers of 100
//!   rows claimed 4.6–6.5× more jobs per second than head-first claims in the bench.
//! - Strength: [`LockStrength::NoKeyUpdate`] (the default here) is what the later
//!   `UPDATE … SET status = 'done'` needs anyway, and unlike `Update` it does not block inserts
//!   of rows that reference the job through a foreign key (those take `KEY SHARE`).

use std::any::TypeId;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

use crate::scoped::ScopedBoxFuture;
use tokio_postgres::types::ToSql;

use crate::api::claim_sql::{FilterValue, Predicate, SharedParam, filter_value, shared};
use crate::api::lease::Lease;
use crate::attempt::{LockStep, run_locked};
use crate::db::Db;
use crate::error::{Error, ErrorKind, Refusal, Step, refusal};
use crate::flush::{Flush, Side};
use crate::lock::LockStrength;
use crate::options::{StatementCache, TransactionOptions};
use crate::outcome::Outcome;
use crate::row::{Columns, LockableRow, Names, Params, decode_rows, quote_ident};
use crate::transaction::run_alone;
use crate::transaction::{OwnedParam, Transaction};

/// A comparison operator in a claim filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive] // more operators may come.
pub enum Compare {
    /// `=`
    Eq,
    /// `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl Compare {
    fn sql(self) -> &'static str {
        match self {
            Compare::Eq => "=",
            Compare::Ne => "<>",
            Compare::Lt => "<",
            Compare::Le => "<=",
            Compare::Gt => ">",
            Compare::Ge => ">=",
        }
    }
}

/// Sort direction of an order column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive] // e.g. NULLS FIRST / LAST variants may come.
pub enum Direction {
    /// Ascending (the default).
    #[default]
    Asc,
    /// Descending.
    Desc,
}

#[derive(Clone)]
enum Condition {
    Compare(String, Compare, FilterValue),
    IsNull(String),
    IsNotNull(String),
    Predicate(Predicate),
}

/// What to claim: which rows are eligible, in which order, with which lock strength.
///
/// The number of rows is given per call ([`Db::claim`](crate::Db::claim), [`Transaction::claim`]).
/// Invalid claims (no order, an order that lacks a key column, a bad identifier)
/// are refused with [`ErrorKind::InvalidArgument`] before anything is locked, and so is a
/// filter, predicate, order or mark naming a column the table does not have (SQLSTATE
/// `42703`, found when the statement is prepared, before it runs).
///
/// ```
/// use rowlock::{Claim, Compare, Direction};
///
/// let claim = Claim::new()
///     .filter("status", Compare::Eq, "pending")
///     .filter_null("worker")
///     .order_by("priority", Direction::Desc)
///     .order_by("id", Direction::Asc);
/// ```
///
/// A claim is `Clone`: the clone shares the bound values (they are reference-counted) and
/// keeps the SQL already rendered, so one claim can be built at start-up and cloned per worker
/// or per call.
#[derive(Clone)]
pub struct Claim {
    conditions: Vec<Condition>,
    order: Vec<(String, Direction)>,
    strength: LockStrength,
    transaction: TransactionOptions,
    /// `SET` list applied to the claimed rows in the claim's statement (claim-and-mark).
    mark: Option<Predicate>,
    /// Where the scan starts in the first order column, wrapping around (see
    /// [`start_at`](Claim::start_at)).
    start: Option<SharedParam>,
    /// Claimed rows are leased (see [`lease`](Claim::lease)).
    lease: Option<Lease>,
    /// The SQL rendered for a row type, once (the setters take the claim by value and start
    /// afresh).
    rendered: OnceLock<(TypeId, usize, Arc<str>)>,
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let conditions: Vec<String> = self
            .conditions
            .iter()
            .map(|c| match c {
                Condition::Compare(col, op, v) => format!("{col} {} {v:?}", op.sql()),
                Condition::IsNull(col) => format!("{col} IS NULL"),
                Condition::IsNotNull(col) => format!("{col} IS NOT NULL"),
                Condition::Predicate(p) => format!("{p:?}"),
            })
            .collect();
        f.debug_struct("Claim")
            .field("conditions", &conditions)
            .field("order", &self.order)
            .field("strength", &self.strength)
            .field("mark", &self.mark)
            .field("start", &self.start)
            .field("lease", &self.lease)
            .field("transaction", &self.transaction)
            .finish()
    }
}

impl Default for Claim {
    fn default() -> Self {
        Claim {
            conditions: Vec::new(),
            order: Vec::new(),
            // What the usual follow-up UPDATE needs, without blocking foreign-key inserts.
            strength: LockStrength::NoKeyUpdate,
            transaction: TransactionOptions::new(),
            mark: None,
            start: None,
            lease: None,
            rendered: OnceLock::new(),
        }
    }
}

impl Claim {
    /// No filter (every row is eligible), no order yet, `FOR NO KEY UPDATE SKIP LOCKED`.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `column <op> value` to the filter (all conditions are ANDed). The value is always
    /// bound as a parameter of the column's type, never written into the SQL, so one prepared
    /// statement serves every value. Text also fits a PostgreSQL enum column (`status =
    /// 'pending'` on a `job_status`), an integer any integer column its value fits. A claim
    /// with filters is planned for each call's values, so that it matches a partial index on
    /// the same condition. A value that does not fit its column, or a `NULL` (`None`: a
    /// comparison with `NULL` matches no row; use [`filter_null`](Self::filter_null)), is
    /// refused with [`ErrorKind::InvalidArgument`] naming the filter when the claim runs,
    /// before anything is locked.
    ///
    /// For a condition that never changes and that a partial index matches (`status =
    /// 'pending'` on the queue's index), write it as SQL with
    /// [`where_sql`](Self::where_sql)`("status = 'pending'", vec![])`: a constant in the
    /// statement lets PostgreSQL keep one generic plan that uses the index, and the claim is
    /// not planned per call (fewer allocations and less server time per claim).
    #[must_use]
    pub fn filter(
        mut self,
        column: impl Into<String>,
        op: Compare,
        value: impl ToSql + Send + Sync + 'static,
    ) -> Self {
        self.rendered.take();
        self.conditions
            .push(Condition::Compare(column.into(), op, filter_value(value)));
        self
    }

    /// Adds a predicate in SQL, ANDed with the other filters, for what `filter` cannot say:
    /// `run_at <= now()`, `queue = ANY($1)`, an `OR`. Its own placeholders count from `$1`;
    /// `params` are their values, bound as parameters. It stays inside the fenced,
    /// custom-planned claim, before the `LIMIT`.
    ///
    /// Refused with [`ErrorKind::InvalidArgument`] when the claim is used: a `;` outside
    /// literals and comments, a placeholder without a value, or a value no placeholder uses.
    /// Write column names as SQL (quote them if they need it); never format values into the
    /// text.
    ///
    /// ```
    /// use rowlock::{Claim, Compare, Direction};
    ///
    /// let claim = Claim::new()
    ///     .filter("status", Compare::Eq, "pending")
    ///     .where_sql("run_at <= now() AND queue = ANY($1)", vec![Box::new(vec!["mail", "sms"])])
    ///     .order_by("run_at", Direction::Asc)
    ///     .order_by("id", Direction::Asc);
    /// ```
    #[must_use]
    pub fn where_sql(mut self, sql: impl Into<String>, params: Vec<OwnedParam>) -> Self {
        self.rendered.take();
        self.conditions.push(Condition::Predicate(Predicate {
            sql: sql.into(),
            params: shared(params),
        }));
        self
    }

    /// Adds `column IS NULL` to the filter.
    #[must_use]
    pub fn filter_null(mut self, column: impl Into<String>) -> Self {
        self.rendered.take();
        self.conditions.push(Condition::IsNull(column.into()));
        self
    }

    /// Adds `column IS NOT NULL` to the filter.
    #[must_use]
    pub fn filter_not_null(mut self, column: impl Into<String>) -> Self {
        self.rendered.take();
        self.conditions.push(Condition::IsNotNull(column.into()));
        self
    }

    /// Appends a column to the claim order. The order must include every key column of the
    /// row type (anywhere in it, in either direction), so that it is total and every worker
    /// sees the same order: a claim on a table keyed by `(id, day)` may order by `day`, then
    /// `id`.
    #[must_use]
    pub fn order_by(mut self, column: impl Into<String>, direction: Direction) -> Self {
        self.rendered.take();
        self.order.push((column.into(), direction));
        self
    }

    /// The lock strength. Defaults to [`LockStrength::NoKeyUpdate`].
    #[must_use]
    pub fn strength(mut self, strength: LockStrength) -> Self {
        self.rendered.take();
        self.strength = strength;
        self
    }

    /// Marks the claimed rows in the claim's own statement: `set` is the body of an
    /// `UPDATE … SET` (e.g. `"status = 'running', worker = $1, attempts = attempts + 1"`), its
    /// placeholders count from `$1` and `params` are their values. The claimed rows are
    /// returned as they are after the update. Calling it again replaces the mark.
    ///
    /// One statement instead of a claim and an `UPDATE` (one round trip fewer, and the rows
    /// leave the claimable set at once if the mark changes a filtered column):
    ///
    /// ```sql
    /// WITH claimed AS MATERIALIZED (SELECT <key> FROM <table> WHERE <filter> ORDER BY <order>
    ///                               LIMIT $n FOR NO KEY UPDATE SKIP LOCKED),
    ///      marked AS (UPDATE <table> SET <set> FROM claimed WHERE <key matches> RETURNING …)
    /// SELECT * FROM marked ORDER BY <order>
    /// ```
    ///
    /// (never `UPDATE … WHERE id IN (SELECT … SKIP LOCKED)`, which can lock more rows than the
    /// limit). Use it with [`Db::claim_and_mark`](crate::Db::claim_and_mark) (one statement, committed on its own, for work
    /// that does not need the rows held) or with [`Db::claim`](crate::Db::claim) (the closure runs on
    /// the marked rows while they are locked). The same checks as
    /// [`where_sql`](Self::where_sql) apply, and an empty `set` is refused.
    #[must_use]
    pub fn mark(mut self, set: impl Into<String>, params: Vec<OwnedParam>) -> Self {
        self.rendered.take();
        self.mark = Some(Predicate {
            sql: set.into(),
            params: shared(params),
        });
        self
    }

    /// Leases the claimed rows (a visibility timeout): the claim marks each row it takes as
    /// the claimer's until `now() + duration` and counts the attempt, and only rows whose
    /// lease is unset or expired are eligible. Claim with
    /// [`Db::claim_and_mark`](crate::Db::claim_and_mark)`::<`[`Leased`](crate::Leased)`<R>>` to get each row's attempt
    /// number, and end the lease with [`Leased::complete`](crate::Leased::complete) (or
    /// [`release`](crate::Leased::release); [`extend`](crate::Leased::extend) keeps it).
    /// A leased claim needs no [`mark`](Self::mark) of its own (the lease is one); with one,
    /// both are applied. See [`Lease`] for the columns and the at-least-once semantics.
    #[must_use]
    pub fn lease(mut self, lease: Lease) -> Self {
        self.rendered.take();
        self.lease = Some(lease);
        self
    }

    /// Starts the claim at `value` of the first order column instead of at the head of the
    /// order, wrapping around: the claim takes the first free eligible rows at or after `value`
    /// (at or before it for a [`Direction::Desc`] column), then, if fewer than `n` were found,
    /// those before it, then those whose first order column is `NULL`. `value` is bound as a
    /// parameter and must be of the column's type (an `i64` for `bigint`); a `NULL` value
    /// (`None::<i64>`) starts at the head.
    ///
    /// For many workers claiming batches at once: every claim that starts at the head walks
    /// past the rows the others hold (they still match the filter and its index until they
    /// commit), so with 16 claimers of 100 rows each claim skips up to 1,500 locked rows, and
    /// they all clean the same index pages. Claimers that start at different points (a random
    /// point between the lowest and highest claimable key, or one per worker) rarely meet.
    /// The price is order: a started claim is not oldest-first (the rows it returns are still
    /// sorted by the claim's order). Exactly-once is unchanged: a row is still locked by one
    /// claimer at a time, and the mark or the closure's update takes it out of the claimable
    /// set.
    ///
    /// The start is a parameter of the claim's SQL, so moving the start of a claim that
    /// already has one keeps the SQL rendered: a worker can move its claim's start before
    /// every call (`claim = claim.start_at(next)`, one allocation), or start a clone of a
    /// shared claim (`shared.clone().start_at(next)`).
    ///
    /// ```no_run
    /// # use rowlock::{LockableRow, Table, tokio_postgres::{Row, Error as PgError}};
    /// # struct Job { id: i64 }
    /// # impl LockableRow for Job {
    /// #     type Key = i64;
    /// #     const TABLE: Table = Table::new("jobs");
    /// #     const KEY_COLUMNS: &'static [&'static str] = &["id"];
    /// #     fn from_row(row: &Row) -> Result<Self, PgError> { Ok(Job { id: row.try_get("id")? }) }
    /// #     fn key(&self) -> i64 { self.id }
    /// # }
    /// # fn random_between(lo: i64, hi: i64) -> i64 { lo }
    /// # async fn demo(db: &rowlock::Db) -> Result<(), rowlock::Error> {
    /// use rowlock::{Claim, Compare, Direction};
    ///
    /// let mut claim = Claim::new()
    ///     .filter("status", Compare::Eq, "pending")
    ///     .order_by("id", Direction::Asc)
    ///     .mark("status = 'running'", vec![])
    ///     .start_at(0_i64);
    /// loop {
    ///     // Somewhere in the backlog (here: the ids a producer has handed out so far).
    ///     claim = claim.start_at(random_between(1, 500_000));
    ///     let jobs: Vec<Job> = db.claim_and_mark(&claim, 100).await?;
    ///     if jobs.is_empty() {
    ///         break;
    ///     }
    ///     // … process them …
    /// }
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn start_at(mut self, value: impl ToSql + Send + Sync + 'static) -> Self {
        if self.start.is_none() {
            self.rendered.take();
        }
        self.start = Some(Arc::new(value));
        self
    }

    /// Options of the transaction [`Db::claim`](crate::Db::claim) opens. Defaults to
    /// [`TransactionOptions::new`]. A `lock_timeout` bounds waits for the table lock (row
    /// locks are never waited for).
    #[must_use]
    pub fn transaction(mut self, transaction: TransactionOptions) -> Self {
        self.rendered.take();
        self.transaction = transaction;
        self
    }

    /// Retries the claim under `policy` (a [`RetryPolicy`](crate::RetryPolicy), or a number of
    /// attempts): the same as [`TransactionOptions::retry`] on
    /// [`transaction`](Self::transaction).
    #[must_use]
    pub fn retry(mut self, policy: impl Into<crate::RetryPolicy>) -> Self {
        self.transaction.retry = Some(policy.into());
        self
    }

    /// The claim's SQL for `R` (checked and rendered once per claim and row type, since a
    /// claim does not change once built) and its parameters (the last one is the limit).
    fn render<'a, R: LockableRow>(
        &'a self,
        n: &'a i64,
        columns: &Columns,
    ) -> Result<(Arc<str>, Params<'a>), Error> {
        let sql = match self.rendered.get() {
            Some((row_type, id, sql)) if *row_type == TypeId::of::<R>() && *id == columns.id => {
                sql.clone()
            }
            _ => {
                let sql: Arc<str> = self.render_sql::<R>(columns)?.into();
                let _ = self
                    .rendered
                    .set((TypeId::of::<R>(), columns.id, sql.clone()));
                sql
            }
        };
        let mut params = Params::new();
        for c in &self.conditions {
            match c {
                Condition::Compare(_, _, value) => params.push(&**value),
                Condition::Predicate(p) => {
                    params.extend(p.params.iter().map(|v| &**v as &(dyn ToSql + Sync)))
                }
                Condition::IsNull(_) | Condition::IsNotNull(_) => {}
            }
        }
        if let Some(start) = &self.start {
            params.push(&**start);
        }
        if let Some(mark) = &self.mark {
            params.extend(mark.params.iter().map(|v| &**v as &(dyn ToSql + Sync)));
        }
        if let Some(lease) = &self.lease {
            params.push(&*lease.seconds);
        }
        params.push(n);
        Ok((sql, params))
    }

    /// The claim's parameter at position `index` (as [`render`](Self::render) binds them), as
    /// the caller wrote it.
    fn param_name(&self, index: usize) -> String {
        let mut names = Vec::new();
        for c in &self.conditions {
            match c {
                Condition::Compare(col, _, _) => {
                    names.push(format!("the value of the filter on {col:?}"))
                }
                Condition::Predicate(p) => names.extend(
                    (1..=p.params.len()).map(|n| format!("parameter ${n} of a where_sql filter")),
                ),
                _ => {}
            }
        }
        if self.start.is_some() {
            names.push("the claim's start value".to_string());
        }
        if let Some(mark) = &self.mark {
            names.extend((1..=mark.params.len()).map(|n| format!("parameter ${n} of the mark")));
        }
        if self.lease.is_some() {
            names.push("the lease's duration".to_string());
        }
        names
            .into_iter()
            .nth(index)
            .unwrap_or_else(|| "the claim's limit".to_string())
    }

    /// Whether the claim must be planned for each call's values: a filter value or predicate
    /// bound as a parameter could keep a generic plan from using a partial index. The limit
    /// alone does not change the plan's shape, so a claim without filters runs as a plain
    /// prepared statement.
    fn needs_custom_plans(&self) -> bool {
        self.conditions.iter().any(|c| match c {
            Condition::Compare(..) => true,
            Condition::Predicate(p) => !p.params.is_empty(),
            Condition::IsNull(_) | Condition::IsNotNull(_) => false,
        })
    }

    /// Renders the claim for `R`, checking everything that can be checked without the server.
    /// Parameters are numbered in the order [`render`](Self::render) lists them.
    fn render_sql<R: LockableRow>(&self, read: &Columns) -> Result<String, Error> {
        self.transaction.validate()?;
        if R::LEASED && self.lease.is_none() {
            return Err(Error::invalid(
                "leased rows come only from a claim with a lease (Claim::lease)",
            ));
        }
        if self.transaction.read_only {
            return Err(Error::invalid(
                "a claim locks rows and cannot run in a read-only transaction",
            ));
        }
        let names = Names::render::<R>()?;
        if self.order.is_empty() {
            return Err(Error::invalid(format!(
                "a claim needs an order that includes the key column(s) {:?}; add order_by(..)",
                R::KEY_COLUMNS
            )));
        }
        // Rows that differ in a key column differ in the order: it is total, and every
        // worker sees the same one. Where the key columns stand in it is the caller's choice.
        let missing: Vec<&str> = R::KEY_COLUMNS
            .iter()
            .copied()
            .filter(|k| !self.order.iter().any(|(c, _)| c == k))
            .collect();
        if !missing.is_empty() {
            return Err(Error::invalid(format!(
                "the claim order must include the key column(s) {:?} so that it is total; \
                 it lacks {missing:?}",
                R::KEY_COLUMNS
            )));
        }
        let mut bound = 0;
        let mut conditions = Vec::with_capacity(self.conditions.len());
        for c in &self.conditions {
            conditions.push(match c {
                Condition::Compare(col, op, _) => {
                    bound += 1;
                    format!("{} {} ${bound}", quote_ident(col)?, op.sql())
                }
                Condition::IsNull(col) => format!("{} IS NULL", quote_ident(col)?),
                Condition::IsNotNull(col) => format!("{} IS NOT NULL", quote_ident(col)?),
                Condition::Predicate(p) => {
                    let sql = p.renumbered(bound)?;
                    bound += p.params.len();
                    format!("({sql})")
                }
            });
        }
        let order = self
            .order
            .iter()
            .map(|(col, dir)| {
                quote_ident(col).map(|q| match dir {
                    Direction::Asc => q,
                    Direction::Desc => format!("{q} DESC"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?
            .join(", ");
        if let Some(lease) = &self.lease {
            conditions.push(lease.eligible()?);
        }
        let filter = if conditions.is_empty() {
            "TRUE".to_string()
        } else {
            conditions.join(" AND ")
        };
        // The row type's columns, and the order's, which the outer ORDER BY needs.
        let mut columns: Vec<String> = Vec::new();
        if !read.quoted.is_empty() {
            columns.extend_from_slice(&read.quoted);
            for (col, _) in &self.order {
                let col = quote_ident(col)?;
                if !columns.contains(&col) {
                    columns.push(col);
                }
            }
        }
        let select = if columns.is_empty() {
            "*".to_string()
        } else {
            columns.join(", ")
        };
        let strength = self.strength.clause();
        let table = &names.table;
        let start = match &self.start {
            Some(_) => {
                bound += 1;
                let (col, dir) = &self.order[0];
                Some((quote_ident(col)?, *dir, bound))
            }
            None => None,
        };
        let mut mark = match &self.mark {
            Some(mark) if mark.sql.trim().is_empty() => {
                return Err(Error::invalid("a claim's mark (its SET list) is empty"));
            }
            Some(mark) => {
                let set = mark.renumbered(bound)?;
                bound += mark.params.len();
                Some(set)
            }
            None => None,
        };
        let mut returning_extra = String::new();
        if let Some(lease) = &self.lease {
            lease.validate()?;
            bound += 1;
            let set = lease.set(bound)?;
            mark = Some(match mark {
                Some(own) => format!("{own}, {set}"),
                None => set,
            });
            returning_extra = format!(", {}", lease.returning(table)?);
        }
        let limit = bound + 1;
        let keys = names.keys.join(", ");
        // The locking query: what it selects, and the rows it may lock.
        let locking = |what: &str| {
            let scan = |condition: &str| {
                format!(
                    "SELECT {what} FROM {table} WHERE {filter}{condition} ORDER BY {order} LIMIT \
                     ${limit} {strength} SKIP LOCKED"
                )
            };
            match &start {
                None => scan(""),
                // Each branch stops at the limit, and the outer LIMIT stops pulling branches
                // once it has `n` rows: a later branch locks only what is still missing.
                Some((col, dir, p)) => {
                    let (from, before) = match dir {
                        Direction::Asc => (">=", "<"),
                        Direction::Desc => ("<=", ">"),
                    };
                    // A locking clause is not allowed on a UNION's own branches: each is a
                    // subquery.
                    let branch = |condition: String| {
                        format!("SELECT * FROM ({}) AS rowlock_branch", scan(&condition))
                    };
                    format!(
                        "SELECT * FROM ({} UNION ALL {} UNION ALL {} UNION ALL {}) AS \
                         rowlock_wrapped LIMIT ${limit}",
                        branch(format!(" AND {col} {from} ${p}")),
                        branch(format!(" AND {col} {before} ${p}")),
                        branch(format!(" AND {col} IS NULL AND ${p} IS NOT NULL")),
                        branch(format!(" AND ${p} IS NULL")),
                    )
                }
            }
        };
        let Some(set) = mark else {
            return Ok(format!(
                "WITH claimed AS MATERIALIZED ({}) SELECT * FROM claimed ORDER BY {order}",
                locking(&select)
            ));
        };
        let (aliases, matches) = names.key_join("claimed");
        let returning = names.returning(&columns) + &returning_extra;
        Ok(format!(
            "WITH claimed AS MATERIALIZED ({}), \
             marked AS (UPDATE {table} SET {set} FROM claimed AS claimed ({aliases}) \
             WHERE {matches} RETURNING {returning}) SELECT * FROM marked ORDER BY {order}",
            locking(&keys)
        ))
    }
}

fn limit(n: usize) -> Result<i64, Error> {
    if n == 0 {
        return Err(Error::invalid(
            "a claim of 0 rows would lock nothing; ask for at least 1",
        ));
    }
    i64::try_from(n).map_err(|_| Error::invalid(format!("a claim of {n} rows is too large")))
}

impl Transaction {
    /// Claims up to `n` eligible rows of `R` that no other transaction has locked, locks them
    /// with the claim's strength and `SKIP LOCKED`, and returns them in the claim's order.
    /// An empty result is an ordinary outcome: nothing eligible was free.
    ///
    /// The claim's transaction options are not used here (the transaction is open), and
    /// custom plans are not forced for claims with bound filter values;
    /// [`Db::claim`](crate::Db::claim) does both. Invalid claims (see
    /// [`Claim`]) and `n = 0` give [`ErrorKind::InvalidArgument`] before anything is sent.
    pub async fn claim<R: LockableRow>(&self, claim: &Claim, n: usize) -> Result<Vec<R>, Error> {
        let n = limit(n)?;
        let names = self.db().names::<R>()?;
        claim.render::<R>(&n, names.declared())?; // refused before anything is sent
        let columns = self.columns_for(&names).await?;
        let (sql, params) = claim.render::<R>(&n, &columns)?;
        self.claim_rendered(&sql, &params, false, &columns)
            .await
            .map_err(|e| e.misfit_named(|i| claim.param_name(i)))
    }

    /// Runs a rendered claim. With `restore_plans`, the `plan_cache_mode` forced by
    /// [`Db::claim`](crate::Db::claim) is set back to the default in the same flush as the claim, so
    /// the caller's own statements keep their cached plans.
    async fn claim_rendered<R: LockableRow>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        restore_plans: bool,
        columns: &Columns,
    ) -> Result<Vec<R>, Error> {
        let conn = self.conn();
        // Prepared first (a cache hit sends nothing), so the claim's Bind leaves before the
        // SET that follows it.
        let sent = self.run_sql(Step::Claim, sql, params, |statement| async move {
            if restore_plans {
                Flush::new(conn)
                    .send_then(
                        statement.rows(conn, params),
                        Side::Simple("SET LOCAL plan_cache_mode TO DEFAULT"),
                    )
                    .await
                    .map_err(|f| f.error)
            } else {
                statement.rows(conn, params).await
            }
        });
        let rows: Vec<tokio_postgres::Row> = match sent.await {
            Ok(rows) => rows,
            Err(e) => {
                let e = refine_claim_error(e);
                return Err(match self.db().names::<R>() {
                    Ok(names) => self.missing_column(&names, e, sql, columns),
                    Err(_) => e,
                });
            }
        };
        decode_claimed(&rows)
    }
}

/// The claimed rows as `R`s; a row that does not decode fails the claim.
fn decode_claimed<R: LockableRow>(rows: &[tokio_postgres::Row]) -> Result<Vec<R>, Error> {
    decode_rows(rows, Step::Claim)
}

/// A claim's failure in the caller's terms: a column the table lacks (`42703`, in any part of
/// the claim), or a value that does not fit its column (`42883`, `22P02`, or the driver's refusal), is the
/// claim's fault ([`ErrorKind::InvalidArgument`]; nothing was
/// locked).
fn refine_claim_error(e: Error) -> Error {
    let refused_as = refusal(e.sql_state());
    if refused_as == Some(Refusal::UndefinedColumn) {
        e.reclassified(
            ErrorKind::InvalidArgument,
            "the claim names a column the table does not have (in a filter, a where_sql \
             predicate, the order, the mark or the lease)",
        )
    } else if e.kind() == ErrorKind::Driver || refused_as == Some(Refusal::ValueMisfit) {
        // A value the driver could not bind as its column's type (nothing was sent), or a
        // literal the server could not compare with or read as the column's type (refused
        // when the statement was prepared, before it ran).
        e.reclassified(
            ErrorKind::InvalidArgument,
            "a value of the claim (a filter's, the start's, or one in a where_sql predicate or \
             the mark) does not fit its column",
        )
    } else {
        e
    }
}

impl Db {
    /// Opens a pooled transaction, claims up to `n` eligible unlocked rows of `R` (see [`Claim`]
    /// for the SQL), and runs `f` on them while their locks are held; commits if `f` returns `Ok`.
    ///
    /// - `Ok(Outcome::Done(v))`: rows were claimed, `f` returned `Ok(v)`, and the transaction
    ///   committed.
    /// - `Ok(Outcome::NotFound(rows))`, `rows` empty: no eligible row was free; `f` did not run.
    ///   Not an error: a worker sleeps or polls again.
    /// - With a retry policy (the claim's [`Claim::transaction`] options, or the handle's),
    ///   serialization failures and deadlocks claim again in a new transaction and run `f`
    ///   again (so `f` is `FnMut`).
    /// - `Err(e)` from `f`, a panic in `f`, or dropping the future: the transaction rolls back and
    ///   the rows become claimable again.
    /// - `Err(E::from(rowlock::Error))`: an invalid claim or `n = 0`
    ///   ([`ErrorKind::InvalidArgument`], before anything is locked), pool or connection
    ///   failures, a failed commit (including [`ErrorKind::TransactionAborted`]).
    ///
    /// Round trips: one for `BEGIN` and the claim, the closure's own, one for `COMMIT` with any
    /// writes queued by [`Transaction::execute_on_commit`].
    ///
    /// ```no_run
    /// # use rowlock::{LockableRow, Table, tokio_postgres::{Row, Error as PgError}};
    /// # struct Job { id: i64 }
    /// # impl LockableRow for Job {
    /// #     type Key = i64;
    /// #     const TABLE: Table = Table::new("jobs");
    /// #     const KEY_COLUMNS: &'static [&'static str] = &["id"];
    /// #     fn from_row(row: &Row) -> Result<Self, PgError> { Ok(Job { id: row.try_get("id")? }) }
    /// #     fn key(&self) -> i64 { self.id }
    /// # }
    /// # async fn demo(db: &rowlock::Db) -> Result<(), rowlock::Error> {
    /// use rowlock::{Claim, Compare, Direction, Outcome};
    ///
    /// let claim = Claim::new()
    ///     .filter("status", Compare::Eq, "pending")
    ///     .order_by("id", Direction::Asc);
    /// while let Outcome::Done(done) = db
    ///     .claim(&claim, 50, |tx, jobs: Vec<Job>| Box::pin(async move {
    ///         let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
    ///         // … do the work …
    ///         tx.execute("UPDATE jobs SET status = 'done' WHERE id = ANY($1)", &[&ids]).await?;
    ///         Ok::<_, rowlock::Error>(ids.len())
    ///     }))
    ///     .await?
    /// {
    ///     println!("processed {done} jobs");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn claim<'a, R, T, E, F>(
        &self,
        claim: &Claim,
        n: usize,
        f: F,
    ) -> Result<Outcome<T>, E>
    where
        R: LockableRow,
        E: From<Error>,
        F: for<'t> FnMut(&'t Transaction, Vec<R>) -> ScopedBoxFuture<'a, 't, Result<T, E>>,
    {
        // Everything that can be refused without the server is refused before a connection is
        // taken.
        let n = limit(n)?;
        let names = self.names::<R>()?;
        let (sql, params) = claim.render::<R>(&n, names.declared())?;
        let mut options = claim.transaction.clone();
        options.force_custom_plans = claim.needs_custom_plans();
        let step = ClaimStep::<R> {
            sql,
            params,
            custom_plans: options.force_custom_plans,
            columns: names.declared().clone(),
            claim,
            row: PhantomData,
        };
        let table = R::TABLE.spelled();
        run_locked(Some(("claim", &table)), self, &options, &step, f).await
    }

    /// [`claim`](Self::claim) for one row at a time: the plain worker loop.
    ///
    /// ```no_run
    /// # use rowlock::{LockableRow, Table, tokio_postgres::{Row, Error as PgError}};
    /// # struct Job { id: i64 }
    /// # impl LockableRow for Job {
    /// #     type Key = i64;
    /// #     const TABLE: Table = Table::new("jobs");
    /// #     const KEY_COLUMNS: &'static [&'static str] = &["id"];
    /// #     fn from_row(row: &Row) -> Result<Self, PgError> { Ok(Job { id: row.try_get("id")? }) }
    /// #     fn key(&self) -> i64 { self.id }
    /// # }
    /// # async fn demo(db: &rowlock::Db) -> Result<(), rowlock::Error> {
    /// use rowlock::{Claim, Compare, Direction};
    ///
    /// let claim = Claim::new().filter("status", Compare::Eq, "pending").order_by("id", Direction::Asc);
    /// let processed = db
    ///     .claim_one(&claim, |tx, job: Job| Box::pin(async move {
    ///         tx.execute("UPDATE jobs SET status = 'done' WHERE id = $1", &[&job.id]).await?;
    ///         Ok::<_, rowlock::Error>(job.id)
    ///     }))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn claim_one<'a, R, T, E, F>(&self, claim: &Claim, mut f: F) -> Result<Outcome<T>, E>
    where
        R: LockableRow,
        E: From<Error>,
        F: for<'t> FnMut(&'t Transaction, R) -> ScopedBoxFuture<'a, 't, Result<T, E>>,
    {
        self.claim(claim, 1, move |tx, mut rows: Vec<R>| {
            let row = rows.pop().expect("a non-empty claim of one row");
            f(tx, row)
        })
        .await
    }

    /// Claims up to `n` eligible unlocked rows of `R` and marks them with the claim's
    /// [`mark`](Claim::mark), in one statement committed on its own; returns the marked rows in
    /// the claim's order (empty when nothing eligible was free). For workers whose processing
    /// does not need the rows held: the mark takes them out of the claimable set (e.g.
    /// `status = 'running'`), and the worker records the result later.
    ///
    /// - **Round trips:** one. The statement is planned for the call's values each time (as
    ///   [`claim`](Self::claim) does), so partial indexes on the filter are used. A claim with
    ///   transaction options other than the default, or a pool behind a pooler
    ///   ([`StatementCache::Transaction`](crate::StatementCache::Transaction)), runs in a
    ///   transaction of its own instead (`BEGIN` with the statement, then `COMMIT`).
    /// - **Invalid arguments:** a claim without a mark, an invalid claim (see [`Claim`]), or
    ///   `n = 0`: [`ErrorKind::InvalidArgument`] before a connection is taken.
    /// - **A connection lost** before the statement was sent is [`ErrorKind::Closed`]; after it,
    ///   [`ErrorKind::CommitOutcomeUnknown`]: the rows may have been marked.
    /// - **Dropping the future** after the statement was sent does not stop it.
    ///
    /// ```no_run
    /// # use rowlock::{LockableRow, Table, tokio_postgres::{Row, Error as PgError}};
    /// # struct Job { id: i64 }
    /// # impl LockableRow for Job {
    /// #     type Key = i64;
    /// #     const TABLE: Table = Table::new("jobs");
    /// #     const KEY_COLUMNS: &'static [&'static str] = &["id"];
    /// #     fn from_row(row: &Row) -> Result<Self, PgError> { Ok(Job { id: row.try_get("id")? }) }
    /// #     fn key(&self) -> i64 { self.id }
    /// # }
    /// # async fn demo(db: &rowlock::Db) -> Result<(), rowlock::Error> {
    /// use rowlock::{Claim, Compare, Direction};
    ///
    /// let claim = Claim::new()
    ///     .filter("status", Compare::Eq, "pending")
    ///     .order_by("id", Direction::Asc)
    ///     .mark("status = 'running', worker = $1", vec![Box::new("worker-7")]);
    /// let jobs: Vec<Job> = db.claim_and_mark(&claim, 10).await?;
    /// # Ok(()) }
    /// ```
    pub async fn claim_and_mark<R: LockableRow>(
        &self,
        claim: &Claim,
        n: usize,
    ) -> Result<Vec<R>, Error> {
        if claim.mark.is_none() && claim.lease.is_none() {
            return Err(Error::invalid(
                "claim_and_mark needs a claim with a mark (Claim::mark); use Db::claim to \
                 claim without one",
            ));
        }
        let n = limit(n)?;
        let names = self.names::<R>()?;
        let (sql, params) = claim.render::<R>(&n, names.declared())?;
        let options = self.options(&claim.transaction);
        let alone = options.is_plain()
            && options.retry.is_none()
            && options.statement_cache == Some(StatementCache::Connection);
        if !alone {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            // Boxed: a whole transaction's future, which would otherwise size this call's
            // future on the common path too.
            return Box::pin(self.claim(claim, n, |_, rows: Vec<R>| {
                Box::pin(async move { Ok::<_, Error>(rows) })
            }))
            .await
            .map(|o| o.done().unwrap_or_default());
        }
        // A vector: a batch's rows grow it in fewer steps than an inline one.
        let rows: Vec<_> = run_alone(self, &sql, &params, Step::Claim, claim.needs_custom_plans())
            .await
            .map_err(|e| {
                let e = refine_claim_error(e).misfit_named(|i| claim.param_name(i));
                names.missing_column(e, &sql, names.declared())
            })?;
        decode_claimed(&rows)
    }

    /// The server's plan for claiming `n` rows of `R` with `claim` (`EXPLAIN`, as the claim runs:
    /// custom plans forced), one line per element, in a transaction that is rolled back. Use it
    /// to check that your index makes the claim an index scan under the lock.
    pub async fn explain_claim<R: LockableRow>(
        &self,
        claim: &Claim,
        n: usize,
    ) -> Result<Vec<String>, Error> {
        let n = limit(n)?;
        let names = self.names::<R>()?;
        let (sql, params) = claim.render::<R>(&n, names.declared())?;
        let mut options = self.options(&claim.transaction);
        options.validate()?;
        options.force_custom_plans = true;
        let tx = Transaction::begin_unchecked(self, &options).await?;
        let rows = tx.query(&format!("EXPLAIN {sql}"), &params).await;
        tx.rollback_quietly().await;
        rows?
            .iter()
            .map(|r| {
                r.try_get::<_, String>(0)
                    .map_err(|e| Error::decode(e).at(Step::Statement))
            })
            .collect()
    }
}

/// The lock step of [`Db::claim`]: the rendered claim.
struct ClaimStep<'a, R> {
    sql: Arc<str>,
    params: Params<'a>,
    /// Whether `BEGIN` forced custom plans, to be restored after the claim.
    custom_plans: bool,
    /// The columns `sql` reads.
    columns: Arc<Columns>,
    /// What `sql` was rendered from, to name a value that does not fit.
    claim: &'a Claim,
    row: PhantomData<fn() -> R>,
}

impl<R: LockableRow> LockStep for ClaimStep<'_, R> {
    type Locked = Vec<R>;
    async fn lock(&self, tx: &Transaction) -> Result<Vec<R>, Error> {
        // Rendered before the transaction, with the row type's own columns (`*` when it
        // lists none): a statement a migration made stale restarts the attempt.
        tx.claim_rendered::<R>(&self.sql, &self.params, self.custom_plans, &self.columns)
            .await
            .map_err(|e| e.misfit_named(|i| self.claim.param_name(i)))
    }
}
