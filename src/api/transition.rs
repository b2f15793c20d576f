//! Transitions: "change this row only if it still is in the expected state", as one
//! conditional statement with a typed outcome.

use std::any::TypeId;
use std::fmt;
use std::sync::{Arc, OnceLock};

use crate::transaction::Rows;
use tokio_postgres::types::ToSql;

use crate::db::Db;
use crate::error::{Error, ErrorKind, Step};
use crate::options::{StatementCache, TransactionOptions};
use crate::outcome::{Outcome, RowRef};
use crate::policy::Backoff;
use crate::row::{Columns, Key, LockableRow, Names, Params, decode_row};
use crate::sql_text::{mentions, renumber};
use crate::transaction::Transaction;
use crate::transaction::run_alone;

/// A conditional change of one row, run as one statement: the physical limit of a
/// read-check-write when the decision is a predicate on the row (and, with
/// [`guard`](Self::guard), on rows it reaches).
///
/// ```
/// use rowlock::Transition;
///
/// // "Assign the project to $1, only while it is open."
/// let assign = Transition::new("status = 'assigned', assignee = $1").when("status = 'open'");
/// ```
///
/// What it runs, for a row type `R` and its key (rendered once per transition and row type,
/// then a prepared statement on each connection):
///
/// ```sql
/// WITH changed AS (UPDATE <R's table> SET <set> WHERE <key> = $1 AND (<when>) RETURNING <R's columns>),
///      <each `then` statement>,
///      -- read only when nothing changed: the row as the statement saw it, not matching
///      current AS (SELECT <R's columns> FROM <R's table> WHERE <key> = $1 AND (<when>) IS NOT TRUE)
/// SELECT … FROM changed UNION ALL SELECT … FROM current WHERE NOT EXISTS (SELECT 1 FROM changed)
/// ```
///
/// When that returns nothing (no such row, or the row met `when` and still did not change:
/// another transaction changed it meanwhile, or a guard failed), a second statement reads the
/// row's latest committed state: `NotFound` or `Conflict`.
///
/// With guards, the row is first locked (`FOR NO KEY UPDATE`, the `when` checked on its
/// latest version), then each guard runs, then the update:
///
/// ```sql
/// WITH target AS MATERIALIZED (SELECT … FROM <table> WHERE <key> = $1 AND (<when>) FOR NO KEY UPDATE),
///      guarded AS MATERIALIZED (SELECT <key> FROM target WHERE EXISTS (<guard>) AND …),
///      changed AS (UPDATE <table> SET <set> FROM guarded WHERE <key matches> RETURNING …), …
/// ```
///
/// **Placeholders.** `$1`, `$2`, … in every fragment are the `params` of the call, in order
/// (rowlock shifts them past the key's own placeholders). Every fragment is one expression or
/// statement: a `;` outside literals and comments is refused.
///
/// **When a transition is enough, and when to lock instead.** A transition decides with what
/// SQL can see in the same statement: the row, and rows its guards reach. It holds no lock
/// across a round trip, so it cannot be blocked by a slow client and it is about twice the
/// lock path's throughput. Use [`Db::with_locked_row`](crate::Db::with_locked_row) instead when the
/// decision needs data from elsewhere (another service, a computation in Rust), or when side
/// effects must happen while the row is held.
///
/// **Semantics** (READ COMMITTED, the default): if another transaction is changing the row,
/// the statement waits for it and then checks `when` again on the row's new version, so two
/// concurrent transitions from the same state never both succeed. The `then` statements run
/// only if the row changed, all in the same statement (one atomic commit): each sees the
/// database as of the statement's start (plus the rows it locks), so they must not depend on
/// each other's effects.
///
/// **Keys must be unique.** The lock paths read rows before writing and refuse a key that
/// matches several ([`ErrorKind::KeyNotUnique`]); a transition writes in the same statement
/// that reads, so on a key that is not unique (no primary key or unique constraint on
/// [`LockableRow::KEY_COLUMNS`]) it changes every matching row and then reports
/// [`ErrorKind::KeyNotUnique`].
///
/// **Invalid transitions** (an empty `SET`, a `;`, `$0`, a guard that does not mention `target`,
/// a `then` that does not mention `changed`, a bad identifier in `R`) give
/// [`ErrorKind::InvalidArgument`] before anything is sent; SQL the server rejects is a
/// [`ErrorKind::Db`] error from preparing it, before it runs.
#[derive(Clone)]
pub struct Transition {
    set: String,
    when: Option<String>,
    guards: Vec<String>,
    then: Vec<String>,
    /// The SQL rendered for a row type, once (the setters take the transition by value and
    /// start afresh).
    rendered: OnceLock<(TypeId, usize, Rendered)>,
}

#[derive(Clone)]
struct Rendered {
    sql: Arc<str>,
    /// The row's latest state by key, for an outcome the statement could not tell.
    read_sql: Arc<str>,
    /// How many parameters the fragments use ($1..=params, every one of them).
    params: usize,
}

impl fmt::Debug for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transition")
            .field("set", &self.set)
            .field("when", &self.when)
            .field("guards", &self.guards)
            .field("then", &self.then)
            .finish()
    }
}

impl Transition {
    /// A transition that sets `set` (the body of an `UPDATE … SET`, e.g.
    /// `"status = 'done', n = n + 1"`), unconditionally until [`when`](Self::when) adds a
    /// condition.
    #[must_use]
    pub fn new(set: impl Into<String>) -> Self {
        Transition {
            set: set.into(),
            when: None,
            guards: Vec::new(),
            then: Vec::new(),
            rendered: OnceLock::new(),
        }
    }

    /// The condition the row must meet (a predicate on its columns, e.g. `"status = 'open'"`).
    /// Calling it again replaces the condition. A row that exists but does not meet it is a
    /// [`Outcome::Conflict`](crate::Outcome::Conflict).
    #[must_use]
    pub fn when(mut self, predicate: impl Into<String>) -> Self {
        self.when = Some(predicate.into());
        self.rendered = OnceLock::new();
        self
    }

    /// A query that must return a row for the transition to happen, run after the row is
    /// locked: it sees the locked row as `target` (e.g.
    /// `"SELECT 1 FROM proposals p WHERE p.id = $1 AND p.project_id = target.id AND
    /// p.status = 'pending' FOR UPDATE OF p"`). Add `FOR UPDATE` to keep what it found from
    /// changing before the transaction commits. It must mention `target`, so that it runs
    /// after the row's lock (locks always in the same order: the row, then what guards lock).
    /// A failed guard is a [`Outcome::Conflict`](crate::Outcome::Conflict) with the row as it is.
    #[must_use]
    pub fn guard(mut self, query: impl Into<String>) -> Self {
        self.guards.push(query.into());
        self.rendered = OnceLock::new();
        self
    }

    /// A data-modifying statement that runs in the same statement, only when the row changed:
    /// it must read the changed row as `changed` (e.g.
    /// `"UPDATE proposals SET status = 'accepted' FROM changed WHERE proposals.id = $1"`).
    /// Its results are not returned.
    #[must_use]
    pub fn then(mut self, statement: impl Into<String>) -> Self {
        self.then.push(statement.into());
        self.rendered = OnceLock::new();
        self
    }

    /// The statement for `R`, rendered and checked once per transition and row type.
    /// `columns` are those the statement reads (see [`Columns`]); only the first list a
    /// transition is used with is kept.
    fn render<R: LockableRow>(&self, columns: &Columns) -> Result<Rendered, Error> {
        match self.rendered.get() {
            Some((row_type, id, r)) if *row_type == TypeId::of::<R>() && *id == columns.id => {
                Ok(r.clone())
            }
            _ => {
                let r = self.render_sql::<R>(columns)?;
                let _ = self
                    .rendered
                    .set((TypeId::of::<R>(), columns.id, r.clone()));
                Ok(r)
            }
        }
    }

    fn render_sql<R: LockableRow>(&self, columns: &Columns) -> Result<Rendered, Error> {
        let names = Names::render::<R>()?;
        let offset = R::KEY_COLUMNS.len();
        let mut used: Vec<usize> = Vec::new();
        let mut shift = |sql: &str, what: &str| -> Result<String, Error> {
            let (out, numbers) = renumber(sql, offset, what)?;
            used.extend(numbers);
            Ok(out)
        };
        if self.set.trim().is_empty() {
            return Err(Error::invalid("a transition's SET list is empty"));
        }
        let set = shift(&self.set, "a transition's SET list")?;
        let when_sql = match &self.when {
            Some(w) if w.trim().is_empty() => {
                return Err(Error::invalid("a transition's `when` condition is empty"));
            }
            Some(w) => shift(w, "a transition's `when` condition")?,
            None => String::new(),
        };
        let when = if self.when.is_some() {
            format!(" AND ({when_sql})")
        } else {
            String::new()
        };
        let mut guards = Vec::with_capacity(self.guards.len());
        for g in &self.guards {
            if !mentions(g, "target") {
                return Err(Error::invalid(format!(
                    "a transition guard must read the locked row as `target` (so that it runs \
                     after the row is locked): {g:?}"
                )));
            }
            guards.push(format!("EXISTS ({})", shift(g, "a transition guard")?));
        }
        let mut then = Vec::with_capacity(self.then.len());
        for (i, t) in self.then.iter().enumerate() {
            if !mentions(t, "changed") {
                return Err(Error::invalid(format!(
                    "a transition's `then` statement must read the changed row as `changed` \
                     (so that it runs only when the row changed): {t:?}"
                )));
            }
            then.push(format!(
                ", rowlock_then_{} AS ({})",
                i + 1,
                shift(t, "a transition's `then` statement")?
            ));
        }
        used.sort_unstable();
        used.dedup();
        let params = used.last().copied().unwrap_or(0);
        if let Some(missing) = (1..=params).find(|n| used.binary_search(n).is_err()) {
            return Err(Error::invalid(format!(
                "a transition uses ${params} but not ${missing}: PostgreSQL could not infer \
                 the type of an unused parameter"
            )));
        }
        let table = &names.table;
        let key = names.key_equals();
        let returning = names.returning(&columns.quoted);
        let select = &columns.select;
        let changed = if guards.is_empty() {
            format!("changed AS (UPDATE {table} SET {set} WHERE {key}{when} RETURNING {returning})")
        } else {
            let (aliases, matches) = names.key_join("rowlock_g");
            format!(
                "target AS MATERIALIZED (SELECT {select} FROM {table} WHERE {key}{when} \
                 FOR NO KEY UPDATE), \
                 rowlock_guarded AS MATERIALIZED (SELECT {keys} FROM target WHERE {guards}), \
                 changed AS (UPDATE {table} SET {set} FROM rowlock_guarded AS rowlock_g ({aliases}) \
                 WHERE {matches} RETURNING {returning})",
                keys = names.keys.join(", "),
                guards = guards.join(" AND "),
            )
        };
        // What nothing changing means, read in the same statement when it is cheap: the row
        // as the statement saw it, not meeting `when` (no lock needed: that is what the update
        // decided on). A CTE runs only when read, and the `NOT EXISTS` is a one-time filter:
        // the success path reads nothing more. Nothing at all comes back when the row is
        // missing, or met `when` and still did not change (another transaction changed it
        // meanwhile, or a guard failed): `read_sql` then reads its latest state.
        let not_when = match &self.when {
            Some(_) => format!("{key} AND ({when_sql}) IS NOT TRUE"),
            None => "false".to_string(),
        };
        let sql = format!(
            "WITH {changed}{then}, \
             rowlock_current AS (SELECT {select} FROM {table} WHERE {not_when}) \
             SELECT *, true AS rowlock_done FROM changed \
             UNION ALL SELECT *, false FROM rowlock_current WHERE NOT EXISTS (SELECT 1 FROM changed)",
            then = then.concat(),
        );
        let read_sql = format!("SELECT {select}, false AS rowlock_done FROM {table} WHERE {key}");
        Ok(Rendered {
            sql: sql.into(),
            read_sql: read_sql.into(),
            params,
        })
    }

    /// The statement for `R` and its parameters (the key's, then the caller's), checked.
    fn bind<'a, R: LockableRow>(
        &self,
        key: &'a R::Key,
        params: &[&'a (dyn ToSql + Sync)],
        columns: &Columns,
    ) -> Result<(Rendered, Params<'a>), Error> {
        let rendered = self.render::<R>(columns)?;
        if params.len() != rendered.params {
            return Err(Error::invalid(format!(
                "the transition uses {} parameter(s) ($1..${}) but the call passed {}",
                rendered.params,
                rendered.params,
                params.len()
            )));
        }
        let mut all = Params::new();
        key.push_params(&mut all);
        all.extend_from_slice(params);
        Ok((rendered, all))
    }
}

/// The outcome in `rows`, or `None` when they do not tell (no row: missing, or changed
/// meanwhile).
fn decode<R: LockableRow>(rows: Rows) -> Result<Option<Outcome<R>>, Error> {
    let mut rows = rows.into_iter();
    let Some(row) = rows.next() else {
        return Ok(None);
    };
    if rows.next().is_some() {
        return Err(Error::with_kind(
            ErrorKind::KeyNotUnique,
            format!(
                "the key columns {:?} of {} matched more than one row, and the transition \
                 changed every one that met its condition",
                R::KEY_COLUMNS,
                R::TABLE.name()
            ),
        )
        .at(Step::Transition));
    }
    let done: bool = row
        .try_get(row.len() - 1)
        .map_err(|e| Error::decode(e).at(Step::Transition))?;
    let r = decode_row(&row, Step::Transition)?;
    Ok(Some(if done {
        Outcome::Done(r)
    } else {
        Outcome::Conflict(r)
    }))
}

/// The outcome of a statement that returned nothing, from the row's latest state.
fn settle<R: LockableRow>(rows: Rows, key: &R::Key) -> Result<Outcome<R>, Error> {
    Ok(decode(rows)?.unwrap_or_else(|| Outcome::NotFound(vec![RowRef::of::<R>(key)])))
}

impl Db {
    /// Runs `transition` on the row of `R` with `key`, as one statement outside any transaction
    /// (PostgreSQL commits it on its own), and returns what it did: [`Outcome::Done`] with the
    /// new row, [`Outcome::NotFound`], [`Outcome::Conflict`] with the row as it is, or
    /// [`Outcome::LockTimeout`] when another transaction held the row longer than the handle's
    /// lock timeout allows (nothing changed), as every locking call answers a lock timeout.
    ///
    /// - **Round trips:** one (the statement is prepared once per connection; the first call on a
    ///   connection costs one more); two for `NotFound`, and for a `Conflict` whose row met the
    ///   condition (changed meanwhile, or a guard failed). With a lock or statement timeout on
    ///   the handle ([`Builder::lock_timeout`](crate::Builder::lock_timeout),
    ///   [`Builder::statement_timeout`](crate::Builder::statement_timeout)), and behind a
    ///   pooler ([`StatementCache::Transaction`] for the pool), it runs in a transaction of its
    ///   own instead: `BEGIN` with its `SET LOCAL`s and the statement, then `COMMIT` (one round
    ///   trip more).
    /// - **Invalid arguments** (see [`Transition`], or `params` not matching its placeholders):
    ///   [`ErrorKind::InvalidArgument`] before a connection is taken. A value whose Rust type does
    ///   not fit the type PostgreSQL gives its placeholder (an `i32` for a `bigint` column) is
    ///   refused when the statement is bound, before it is sent: [`ErrorKind::InvalidArgument`]
    ///   naming the caller's `$n` (or the key).
    /// - **Errors** from the server (a constraint the change violates, a deadlock between guards,
    ///   the handle's statement timeout: [`ErrorKind::StatementTimeout`]…) are returned as they
    ///   are, and nothing changed.
    /// - **A connection lost** before the statement was sent is [`ErrorKind::Closed`] (nothing
    ///   ran: retry freely); lost after it was sent, [`ErrorKind::CommitOutcomeUnknown`]: it may
    ///   have committed. Running the same transition again is safe when its `when` excludes the
    ///   new state: a second run is an [`Outcome::Conflict`].
    /// - **Retries:** with a retry policy on the handle ([`Builder::retry`](crate::Builder::retry)),
    ///   a failure after which nothing ran ([`Error::is_retryable`]: a connection lost before
    ///   the statement was sent, a server that no longer accepts writes after a failover, a
    ///   serialization failure) runs the statement again, on the policy's schedule; a
    ///   possible commit never does. Without one, one attempt.
    /// - **Dropping the future** after the statement was sent does not stop it: it runs to its
    ///   end on the server, and commits if it succeeds.
    /// - A migration that changed the table under a cached statement is handled: the statement
    ///   is prepared again once.
    ///
    /// ```no_run
    /// # use rowlock::{LockableRow, Table, tokio_postgres::{Row, Error as PgError}};
    /// # struct Project { id: i64, status: String }
    /// # impl LockableRow for Project {
    /// #     type Key = i64;
    /// #     const TABLE: Table = Table::new("projects");
    /// #     const KEY_COLUMNS: &'static [&'static str] = &["id"];
    /// #     fn from_row(row: &Row) -> Result<Self, PgError> {
    /// #         Ok(Project { id: row.try_get("id")?, status: row.try_get("status")? })
    /// #     }
    /// #     fn key(&self) -> i64 { self.id }
    /// # }
    /// # async fn demo(db: &rowlock::Db) -> Result<(), rowlock::Error> {
    /// use rowlock::{Outcome, Transition};
    ///
    /// let close = Transition::new("status = 'closed'").when("status = 'open'");
    /// match db.transition::<Project>(&7, &close, &[]).await? {
    ///     Outcome::Done(project) => println!("closed {}", project.id),
    ///     Outcome::Conflict(project) => println!("not open: {}", project.status),
    ///     Outcome::NotFound(_) => println!("no project 7"),
    ///     other => println!("{other}"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn transition<R: LockableRow>(
        &self,
        key: &R::Key,
        transition: &Transition,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Outcome<R>, Error> {
        let defaults = self.options(&TransactionOptions::new());
        // The handle's lock and statement timeouts are `SET LOCAL`s: they need a transaction.
        let own_transaction = !defaults.is_plain();
        let Some(policy) = defaults.retry else {
            let result = self
                .transition_alone(key, transition, params, own_transaction)
                .await;
            return timed_out(
                result.map_err(|e| refine_bind_error::<R>(e, "the transition")),
                key,
            );
        };
        // The handle's retry policy: a failure after which nothing ran (a connection lost
        // before the statement was sent, a server that no longer accepts writes, a
        // serialization failure) runs the statement again; a possible commit
        // (`CommitOutcomeUnknown`) never does.
        let mut backoff = Backoff::new(&policy)?;
        loop {
            match self
                .transition_alone(key, transition, params, own_transaction)
                .await
            {
                Err(e) if policy.retries(&e) => backoff.wait(e).await?,
                result => {
                    return timed_out(
                        result.map_err(|e| refine_bind_error::<R>(e, "the transition")),
                        key,
                    );
                }
            }
        }
    }

    /// One attempt: the statement alone, or in a transaction of its own when
    /// `own_transaction` (the handle's timeouts) or behind a pooler.
    async fn transition_alone<R: LockableRow>(
        &self,
        key: &R::Key,
        transition: &Transition,
        params: &[&(dyn ToSql + Sync)],
        own_transaction: bool,
    ) -> Result<Outcome<R>, Error> {
        // One statement on its own (or, behind a pooler, in a transaction whose statements are
        // its own): a statement made stale by a migration is prepared again, so the row type's
        // own columns (`*` when it lists none) are safe here.
        let names = self.names::<R>()?;
        let columns = names.declared();
        let (rendered, all) = transition.bind::<R>(key, params, columns)?;
        if own_transaction || self.statement_cache() == StatementCache::Transaction {
            // With the handle's lock or statement timeout, set for the transaction. Behind a
            // pooler, a statement prepared outside a transaction may not exist on the server
            // that runs the next message: prepare and run it inside one. Not retried inside:
            // `transition` applies the handle's retry policy around this attempt.
            let (rendered, all) = (&rendered, &all);
            let mut once = TransactionOptions::new();
            once.retry = Some(crate::RetryPolicy::once());
            // Boxed: a whole transaction's future, which would otherwise size this call's
            // future on the common path too.
            return Box::pin(self.with_transaction(once, |tx| {
                Box::pin(async move { tx.run_transition::<R>(rendered, all, columns, key).await })
            }))
            .await;
        }
        let rows = run_alone(self, &rendered.sql, &all, Step::Transition, false)
            .await
            .map_err(|e| names.missing_column(e, &rendered.sql, columns))?;
        if let Some(outcome) = decode(rows)? {
            return Ok(outcome);
        }
        let key_params = &all[..<R::Key as Key>::ARITY];
        let rows = run_alone(
            self,
            &rendered.read_sql,
            key_params,
            Step::Transition,
            false,
        )
        .await?;
        settle(rows, key)
    }
}

impl Transaction {
    /// Runs `transition` on the row of `R` with `key` inside this transaction, and returns
    /// what it did (see [`Db::transition`]). Nothing is committed until the
    /// transaction is; the changed row stays locked until then (and rows a guard locked).
    ///
    /// **A lock timeout** set on this transaction (its options, or the handle's) ends a wait
    /// for a row another transaction holds with [`Outcome::LockTimeout`], and the transaction
    /// goes on: the statement runs in a savepoint that rides in the same flush and is rolled
    /// back then, as [`lock_row`](Self::lock_row) does. A lock timeout rowlock did not set
    /// (`SET LOCAL lock_timeout` sent by the caller, a role's default) is an
    /// [`ErrorKind::LockTimeout`] error that aborts the transaction, as PostgreSQL does.
    pub async fn transition<R: LockableRow>(
        &self,
        key: &R::Key,
        transition: &Transition,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Outcome<R>, Error> {
        let names = self.db().names::<R>()?;
        transition.bind::<R>(key, params, names.declared())?; // refused before anything is sent
        let columns = self.columns_for(&names).await?;
        let (rendered, all) = transition.bind::<R>(key, params, &columns)?;
        let savepoint = if self.lock_may_time_out(false) {
            Some(self.open_savepoint()?)
        } else {
            None
        };
        let result = self
            .run_transition::<R>(&rendered, &all, &columns, key)
            .await
            .map_err(|e| refine_bind_error::<R>(e, "the transition"));
        let Some(id) = savepoint else {
            return result;
        };
        let result = timed_out(result, key);
        self.end_savepoint(id, matches!(result, Ok(Outcome::LockTimeout(_))));
        result
    }

    /// Runs a bound transition in this transaction.
    async fn run_transition<R: LockableRow>(
        &self,
        rendered: &Rendered,
        all: &[&(dyn ToSql + Sync)],
        columns: &Columns,
        key: &R::Key,
    ) -> Result<Outcome<R>, Error> {
        let names = self.db().names::<R>()?;
        let conn = self.conn();
        let rows = self
            .run_sql(Step::Transition, &rendered.sql, all, |statement| {
                statement.rows(conn, all)
            })
            .await
            .map_err(|e| self.missing_column(&names, e, &rendered.sql, columns))?;
        if let Some(outcome) = decode(rows)? {
            return Ok(outcome);
        }
        let key_params = &all[..<R::Key as Key>::ARITY];
        let rows = self
            .run_sql(
                Step::Transition,
                &rendered.read_sql,
                key_params,
                |statement| statement.rows(conn, key_params),
            )
            .await?;
        settle(rows, key)
    }
}

/// A wait for the row that exceeded the lock timeout, as every locking call answers it:
/// [`Outcome::LockTimeout`] naming the row (nothing changed).
fn timed_out<R: LockableRow>(
    result: Result<Outcome<R>, Error>,
    key: &R::Key,
) -> Result<Outcome<R>, Error> {
    match result {
        Err(e) if e.kind() == ErrorKind::LockTimeout => {
            Ok(Outcome::LockTimeout(e.about_rows([RowRef::of::<R>(key)])))
        }
        result => result,
    }
}

/// A value the driver could not bind (nothing was sent), named in the caller's terms: the
/// statement's parameters start with the key's, then the caller's `$1`, `$2`, … of `written`
/// (what the caller wrote them in: "the transition").
pub(crate) fn refine_bind_error<R: LockableRow>(e: Error, written: &str) -> Error {
    let arity = <R::Key as Key>::ARITY;
    e.misfit_named(|index| match index.checked_sub(arity) {
        None => format!(
            "the key of {}",
            R::TABLE.render().unwrap_or_else(|_| R::TABLE.name().into())
        ),
        Some(i) => format!("parameter ${} of {written}", i + 1),
    })
}
