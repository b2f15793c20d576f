//! Locking rows of several tables in one call, in one global order: "lock the user, then the
//! wallet, always in the same order, or deadlock" built in.
//!
//! Whatever order the caller adds rows in, a [`LockSet`] locks its tables in the order of the
//! relations the server resolves them to (schema, then name: `items`, `public.items` and
//! `"public"."items"` are one table), and the rows of each table in key order (one statement
//! per table, `ORDER BY` the key). Two calls that lock overlapping sets, written in any order
//! and with any spelling, take their locks in the same order, so they cannot deadlock each
//! other.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::scoped::ScopedBoxFuture;

use crate::api::rows::{holders_of, sorted_keys};
use crate::attempt::{LockStep, run_locked};
use crate::db::Db;
use crate::diagnostics::{BlockerQuery, RowRef};
use crate::error::{Error, Step};
use crate::lock::{Lock, LockMode};
use crate::outcome::Outcome;
use crate::row::{LockableRow, Names, quote_ident};
use crate::transaction::Transaction;

/// What locking one table of a set produced: its rows (a `Vec<R>`, type-erased) or why not.
type TableOutcome = Outcome<Box<dyn Any + Send>>;

/// The rows of one table in a set: type-erased so that a set can hold several row types.
trait TableRows: Send + Sync {
    /// The names as the row type spells them (checked when the rows were added).
    fn names(&self) -> &Names;
    /// The handle's names of the row type: its statements, the relation it resolves to.
    fn shared(&self, db: &Db) -> Result<Arc<Names>, Error>;
    fn row_type(&self) -> TypeId;
    fn set_mode(&mut self, mode: LockMode);
    fn add(&mut self, other: Box<dyn TableRows>) -> Result<(), Error>;
    fn as_any_box(self: Box<Self>) -> Box<dyn Any>;
    /// Whether `row` is one of this table's rows.
    fn has(&self, row: &RowRef) -> bool;
    /// How to find the holders of this table's rows.
    fn holders(&self) -> BlockerQuery<'_>;
    fn lock<'t>(
        &'t self,
        tx: &'t Transaction,
        names: &'t Names,
        options: &'t Lock,
        in_callers_tx: bool,
    ) -> BoxFuture<'t, Result<TableOutcome, Error>>;
}

struct Rows<R: LockableRow> {
    names: Names,
    keys: Vec<R::Key>,
    /// This table's own mode, when it differs from the call's.
    mode: Option<LockMode>,
}

impl<R: LockableRow> TableRows for Rows<R> {
    fn names(&self) -> &Names {
        &self.names
    }

    fn shared(&self, db: &Db) -> Result<Arc<Names>, Error> {
        db.names::<R>()
    }

    fn set_mode(&mut self, mode: LockMode) {
        self.mode = Some(mode);
    }

    fn row_type(&self) -> TypeId {
        TypeId::of::<R>()
    }

    fn add(&mut self, other: Box<dyn TableRows>) -> Result<(), Error> {
        let other = other
            .as_any_box()
            .downcast::<Rows<R>>()
            .expect("entries are merged by row type");
        self.keys.extend(other.keys);
        self.keys = sorted_keys::<R>(&self.keys)?;
        self.mode = self.mode.or(other.mode);
        Ok(())
    }

    fn as_any_box(self: Box<Self>) -> Box<dyn Any> {
        self
    }

    fn has(&self, row: &RowRef) -> bool {
        self.keys.iter().any(|key| row.is::<R>(key))
    }

    fn holders(&self) -> BlockerQuery<'_> {
        holders_of::<R>(&self.names, &self.keys)
    }

    fn lock<'t>(
        &'t self,
        tx: &'t Transaction,
        names: &'t Names,
        options: &'t Lock,
        in_callers_tx: bool,
    ) -> BoxFuture<'t, Result<TableOutcome, Error>> {
        Box::pin(async move {
            let own;
            let options = match self.mode {
                Some(mode) if mode != options.mode => {
                    own = options.clone().mode(mode);
                    &own
                }
                _ => options,
            };
            let outcome = tx
                .lock_many_as_asked::<R>(names, &self.keys, options, in_callers_tx)
                .await?;
            Ok(outcome.map(|(rows, as_asked)| {
                Box::new(SetRows::<R> { rows, as_asked }) as Box<dyn Any + Send>
            }))
        })
    }
}

/// Rows of one or more tables to lock together, in one order that does not depend on the order
/// they were added in nor on how a table is spelled: tables by the relation the server
/// resolves (schema, then name; looked up once per row type, riding with `BEGIN`), rows of a
/// table by key.
///
/// Add rows with [`row`](Self::row) and [`rows`](Self::rows) (duplicates are locked once), give
/// a table its own mode with [`mode`](Self::mode) if it needs one, then lock them with
/// [`Db::with_locked_set`]. A bad table or column name, or a key count over
/// PostgreSQL's limit, is refused when added; two row types naming the same table, or an empty
/// set, when locked. In both cases with [`ErrorKind::InvalidArgument`] and before anything is
/// sent.
///
/// ```
/// # use rowlock::{LockableRow, Table, tokio_postgres::{Row, Error as PgError}};
/// # struct User { id: i64 }
/// # impl LockableRow for User {
/// #     type Key = i64;
/// #     const TABLE: Table = Table::new("users");
/// #     const KEY_COLUMNS: &'static [&'static str] = &["id"];
/// #     fn from_row(row: &Row) -> Result<Self, PgError> { Ok(User { id: row.try_get("id")? }) }
/// #     fn key(&self) -> i64 { self.id }
/// # }
/// # struct Wallet { user_id: i64 }
/// # impl LockableRow for Wallet {
/// #     type Key = i64;
/// #     const TABLE: Table = Table::new("wallets");
/// #     const KEY_COLUMNS: &'static [&'static str] = &["user_id"];
/// #     fn from_row(row: &Row) -> Result<Self, PgError> { Ok(Wallet { user_id: row.try_get("user_id")? }) }
/// #     fn key(&self) -> i64 { self.user_id }
/// # }
/// use rowlock::LockSet;
///
/// // Written wallet-first here and user-first elsewhere: both lock "users", then "wallets".
/// let set = LockSet::new().row::<Wallet>(&7)?.row::<User>(&7)?;
/// # Ok::<(), rowlock::Error>(())
/// ```
///
/// [`ErrorKind::InvalidArgument`]: crate::ErrorKind::InvalidArgument
#[derive(Default)]
pub struct LockSet {
    tables: Vec<Box<dyn TableRows>>,
}

impl fmt::Debug for LockSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.tables.iter().map(|t| &t.names().table))
            .finish()
    }
}

impl LockSet {
    /// An empty set.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the row of `R` with this key.
    pub fn row<R: LockableRow>(self, key: &R::Key) -> Result<Self, Error> {
        self.rows::<R>(std::slice::from_ref(key))
    }

    /// Adds the rows of `R` with these keys.
    pub fn rows<R: LockableRow>(mut self, keys: &[R::Key]) -> Result<Self, Error> {
        let rows = Rows::<R> {
            names: Names::render::<R>()?,
            keys: sorted_keys::<R>(keys)?,
            mode: None,
        };
        match self
            .tables
            .iter_mut()
            .find(|t| t.row_type() == TypeId::of::<R>())
        {
            Some(same) => same.add(Box::new(rows))?,
            None => self.tables.push(Box::new(rows)),
        }
        Ok(self)
    }

    /// Locks the rows of `R` in this set with `mode`, whatever the call's: a hot parent that
    /// every caller waits for (`Wait`) with a contended child that should fail fast
    /// (`NoWait`) or be passed over (`SkipLocked`). The order of the locks does not change.
    /// Refused with [`ErrorKind::InvalidArgument`] when the set has no rows of `R` yet.
    ///
    /// ```
    /// # use rowlock::{LockableRow, Table, tokio_postgres::{Row, Error as PgError}};
    /// # struct Room { id: i64 }
    /// # impl LockableRow for Room {
    /// #     type Key = i64;
    /// #     const TABLE: Table = Table::new("rooms");
    /// #     const KEY_COLUMNS: &'static [&'static str] = &["id"];
    /// #     fn from_row(row: &Row) -> Result<Self, PgError> { Ok(Room { id: row.try_get("id")? }) }
    /// #     fn key(&self) -> i64 { self.id }
    /// # }
    /// # struct Slot { id: i64 }
    /// # impl LockableRow for Slot {
    /// #     type Key = i64;
    /// #     const TABLE: Table = Table::new("slots");
    /// #     const KEY_COLUMNS: &'static [&'static str] = &["id"];
    /// #     fn from_row(row: &Row) -> Result<Self, PgError> { Ok(Slot { id: row.try_get("id")? }) }
    /// #     fn key(&self) -> i64 { self.id }
    /// # }
    /// use rowlock::{LockMode, LockSet};
    ///
    /// // Wait for the room (every booking passes through it), but a taken slot is "busy" at once.
    /// let set = LockSet::new()
    ///     .row::<Room>(&1)?
    ///     .row::<Slot>(&42)?
    ///     .mode::<Slot>(LockMode::NoWait)?;
    /// # Ok::<(), rowlock::Error>(())
    /// ```
    ///
    /// [`ErrorKind::InvalidArgument`]: crate::ErrorKind::InvalidArgument
    pub fn mode<R: LockableRow>(mut self, mode: LockMode) -> Result<Self, Error> {
        match self
            .tables
            .iter_mut()
            .find(|t| t.row_type() == TypeId::of::<R>())
        {
            Some(rows) => {
                rows.set_mode(mode);
                Ok(self)
            }
            None => Err(Error::invalid(format!(
                "LockSet::mode for {}, which has no rows in the set: add its rows first",
                R::TABLE.name()
            ))),
        }
    }

    /// The tables, in the order of their spelled names; refuses an empty set and two types on
    /// one spelled table. [`in_server_order`] orders them for locking.
    fn ordered(&self) -> Result<Vec<&dyn TableRows>, Error> {
        if self.tables.is_empty() {
            return Err(Error::invalid("an empty LockSet: add rows to lock"));
        }
        let mut tables: Vec<&dyn TableRows> = self.tables.iter().map(|t| &**t).collect();
        tables.sort_by(|a, b| a.names().table.cmp(&b.names().table));
        for pair in tables.windows(2) {
            if pair[0].names().table == pair[1].names().table {
                return Err(Error::invalid(format!(
                    "two row types of a LockSet name the same table {}; their rows could not \
                     be locked in one order",
                    pair[0].names().table
                )));
            }
        }
        Ok(tables)
    }
}

/// The rows a [`Db::with_locked_set`] call locked, by row type and key.
#[derive(Default)]
pub struct LockedRows {
    by_type: HashMap<TypeId, Box<dyn Any + Send>>,
}

impl fmt::Debug for LockedRows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockedRows")
            .field("row_types", &self.by_type.len())
            .finish()
    }
}

/// The locked rows of one row type, in key order, and the keys found under another spelling.
struct SetRows<R: LockableRow> {
    rows: Vec<R>,
    /// A key asked for and the key of the row the server found for it, where they differ
    /// (`citext`, a nondeterministic collation).
    as_asked: Vec<(R::Key, R::Key)>,
}

impl<R: LockableRow> SetRows<R> {
    /// Where the row asked for as `key` is in `rows`.
    fn position(&self, key: &R::Key) -> Option<usize> {
        let key = self
            .as_asked
            .iter()
            .find(|(asked, _)| asked == key)
            .map_or(key, |(_, found)| found);
        self.rows.binary_search_by(|r| r.key().cmp(key)).ok()
    }
}

impl LockedRows {
    fn of<R: LockableRow>(&self) -> Option<&SetRows<R>> {
        self.by_type.get(&TypeId::of::<R>())?.downcast_ref()
    }

    fn of_mut<R: LockableRow>(&mut self) -> Option<&mut SetRows<R>> {
        self.by_type.get_mut(&TypeId::of::<R>())?.downcast_mut()
    }

    /// The locked row of `R` with this key, if the set had it: by the key as it was added to
    /// the set, or as the row holds it (they differ where the server compares keys more
    /// coarsely: `ALICE@x.io` added, the `citext` row `alice@x.io` locked).
    pub fn get<R: LockableRow>(&self, key: &R::Key) -> Option<&R> {
        let rows = self.of::<R>()?;
        rows.rows.get(rows.position(key)?)
    }

    /// Takes the locked row of `R` with this key out of the set, if it had it (the key as
    /// [`get`](Self::get) reads it).
    pub fn take<R: LockableRow>(&mut self, key: &R::Key) -> Option<R> {
        let rows = self.of_mut::<R>()?;
        let at = rows.position(key)?;
        Some(rows.rows.remove(at))
    }

    /// Takes every locked row of `R`, in key order.
    pub fn take_all<R: LockableRow>(&mut self) -> Vec<R> {
        self.of_mut::<R>()
            .map(|rows| std::mem::take(&mut rows.rows))
            .unwrap_or_default()
    }
}

/// Each spelling's relation as the server resolves it, in the order given (`NULL`s for one that
/// names no table: its lock statement then reports it).
/// A partition resolves to the root of its partition tree too (`pg_partition_root`, `NULL`
/// for a relation that is not in one), so that a row locked through a partition and through
/// its partitioned table takes the same place in every set's order.
const RESOLVE_SQL: &str = "SELECT rn.nspname, r.relname, n.nspname, c.relname \
     FROM unnest($1::text[]) WITH ORDINALITY AS s(spelled, i) \
     LEFT JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(s.spelled) \
     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     LEFT JOIN pg_catalog.pg_class r \
       ON r.oid = coalesce(pg_catalog.pg_partition_root(c.oid), c.oid) \
     LEFT JOIN pg_catalog.pg_namespace rn ON rn.oid = r.relnamespace \
     ORDER BY s.i";

/// `tables` in locking order, with the handle's names of each: by the relation the server
/// resolves each spelling to, asked once per row type and handle (the first query of the
/// transaction, riding with `BEGIN`). Two row types that turn out to name one table are
/// refused: their rows could not be locked in one order.
async fn in_server_order<'a>(
    tx: &Transaction,
    tables: &[&'a dyn TableRows],
) -> Result<Vec<(&'a dyn TableRows, Arc<Names>)>, Error> {
    let mut tables = tables
        .iter()
        .map(|t| Ok((*t, t.shared(tx.db())?)))
        .collect::<Result<Vec<_>, Error>>()?;
    if tables.len() < 2 {
        return Ok(tables);
    }
    let unknown: Vec<&Names> = tables
        .iter()
        .map(|(_, n)| &**n)
        .filter(|n| n.relation.get().is_none())
        .collect();
    if !unknown.is_empty() {
        let spelled: Vec<&str> = unknown.iter().map(|n| n.table.as_str()).collect();
        let (conn, params) = (tx.conn(), &[&spelled as &(dyn ToSql + Sync)]);
        let rows: Vec<Row> = tx
            .run_sql(Step::Lock, RESOLVE_SQL, params, |statement| {
                statement.rows(conn, params)
            })
            .await?;
        for (names, row) in unknown.iter().zip(&rows) {
            let part = |i| row.try_get::<_, Option<String>>(i).ok().flatten();
            let qualified = |schema: &str, name: &str| -> Result<String, Error> {
                Ok(format!("{}.{}", quote_ident(schema)?, quote_ident(name)?))
            };
            if let (Some(rs), Some(rn), Some(s), Some(n)) = (part(0), part(1), part(2), part(3)) {
                let _ = names
                    .relation
                    .set((qualified(&rs, &rn)?, qualified(&s, &n)?));
            }
        }
    }
    // A table the server did not resolve sorts by its spelling (its statement reports it).
    let key = |names: &Names| {
        names
            .relation
            .get()
            .cloned()
            .unwrap_or_else(|| (names.table.clone(), names.table.clone()))
    };
    tables.sort_by_cached_key(|(_, names)| key(names));
    for pair in tables.windows(2) {
        if key(&pair[0].1).1 == key(&pair[1].1).1 {
            return Err(Error::invalid(format!(
                "two row types of a LockSet name the same table {} (spelled {} and {}); their \
                 rows could not be locked in one order",
                key(&pair[0].1).1,
                pair[0].1.table,
                pair[1].1.table
            )));
        }
    }
    Ok(tables)
}

/// The lock step of [`Db::with_locked_set`]: one statement per table, in the set's order.
struct SetLock<'a> {
    tables: Vec<&'a dyn TableRows>,
    options: &'a Lock,
}

impl SetLock<'_> {
    async fn lock_in(
        &self,
        tx: &Transaction,
        in_callers_tx: bool,
    ) -> Result<Outcome<LockedRows>, Error> {
        let mut locked = LockedRows::default();
        for (table, names) in in_server_order(tx, &self.tables).await? {
            match table.lock(tx, &names, self.options, in_callers_tx).await? {
                Outcome::Done(rows) => {
                    locked.by_type.insert(table.row_type(), rows);
                }
                other => return Ok(other.map(|_| unreachable!("Done is matched above"))),
            }
        }
        Ok(Outcome::Done(locked))
    }
}

impl LockStep for SetLock<'_> {
    type Locked = Outcome<LockedRows>;
    async fn lock(&self, tx: &Transaction) -> Result<Self::Locked, Error> {
        self.lock_in(tx, false).await
    }
    /// The holders of the rows of the table whose statement failed (the one that names them).
    fn blockers(&self, failed: &Error) -> Option<BlockerQuery<'_>> {
        let row = failed
            .rows()
            .first()
            .filter(|_| self.options.find_blockers)?;
        let table = self.tables.iter().find(|t| t.has(row))?;
        Some(table.holders())
    }
}

impl Transaction {
    /// Locks every row of `set` inside this transaction, in the set's order, and returns them;
    /// outcomes as for [`Db::with_locked_set`]. As for
    /// [`lock_row`](Transaction::lock_row), the transaction goes on after every outcome: a
    /// table locked with `NoWait` or under a lock timeout is locked in a savepoint (sent in
    /// the same flush) that is rolled back if its rows were not all locked; rows of tables
    /// locked before stay locked until the transaction ends.
    pub async fn lock_set(
        &self,
        set: &LockSet,
        options: impl Into<Lock>,
    ) -> Result<Outcome<LockedRows>, Error> {
        let options = options.into();
        options.validate()?;
        let step = SetLock {
            tables: set.ordered()?,
            options: &options,
        };
        step.lock_in(self, true).await
    }
}

impl Db {
    /// Opens a pooled transaction, locks every row of `set` in the set's global order (tables
    /// by the relation the server resolves, rows by key), runs `f` with the transaction and
    /// the [`LockedRows`], and commits if `f` returns `Ok`.
    ///
    /// Each table is locked with its own mode if the set gave it one
    /// ([`LockSet::mode`]), else with the call's. Outcomes are those of
    /// [`Db::with_locked_rows`](Self::with_locked_rows), per table: `f` runs only when every row
    /// was locked; otherwise [`Outcome::NotFound`] / [`Outcome::Skipped`] list the rows of
    /// the first table that had missing or skipped rows, or the lock was not available or
    /// timed out ([`Error::rows`] names the table and the keys its statement asked for), and
    /// nothing was committed. Round trips: one per table, then the closure's own, then
    /// `COMMIT`. With [`Lock::find_blockers`], [`Error::blockers`] names who holds the rows of
    /// the table whose lock failed. Retries, drops and errors as for
    /// [`Db::with_locked_row`](Self::with_locked_row).
    ///
    /// ```no_run
    /// # use rowlock::{LockableRow, Table, tokio_postgres::{Row, Error as PgError}};
    /// # struct User { id: i64 }
    /// # impl LockableRow for User {
    /// #     type Key = i64;
    /// #     const TABLE: Table = Table::new("users");
    /// #     const KEY_COLUMNS: &'static [&'static str] = &["id"];
    /// #     fn from_row(row: &Row) -> Result<Self, PgError> { Ok(User { id: row.try_get("id")? }) }
    /// #     fn key(&self) -> i64 { self.id }
    /// # }
    /// # struct Wallet { user_id: i64, cents: i64 }
    /// # impl LockableRow for Wallet {
    /// #     type Key = i64;
    /// #     const TABLE: Table = Table::new("wallets");
    /// #     const KEY_COLUMNS: &'static [&'static str] = &["user_id"];
    /// #     fn from_row(row: &Row) -> Result<Self, PgError> {
    /// #         Ok(Wallet { user_id: row.try_get("user_id")?, cents: row.try_get("cents")? })
    /// #     }
    /// #     fn key(&self) -> i64 { self.user_id }
    /// # }
    /// # async fn demo(db: &rowlock::Db) -> Result<(), rowlock::Error> {
    /// use rowlock::{Lock, LockSet, LockedRows};
    ///
    /// let set = LockSet::new().row::<User>(&7)?.row::<Wallet>(&7)?;
    /// let paid = db
    ///     .with_locked_set(&set, Lock::new(), |tx, mut rows: LockedRows| Box::pin(async move {
    ///         let wallet: Wallet = rows.take(&7).expect("locked");
    ///         tx.execute("UPDATE wallets SET cents = $2 WHERE user_id = $1",
    ///                    &[&wallet.user_id, &(wallet.cents - 100)]).await?;
    ///         Ok::<_, rowlock::Error>(wallet.cents - 100)
    ///     }))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn with_locked_set<'a, T, E, F>(
        &self,
        set: &LockSet,
        options: impl Into<Lock>,
        f: F,
    ) -> Result<Outcome<T>, E>
    where
        E: From<Error>,
        F: for<'t> FnMut(&'t Transaction, LockedRows) -> ScopedBoxFuture<'a, 't, Result<T, E>>,
    {
        let options = options.into();
        options.validate()?;
        let step = SetLock {
            tables: set.ordered()?,
            options: &options,
        };
        let table = step
            .tables
            .iter()
            .map(|t| &*t.names().spelled)
            .collect::<Vec<_>>()
            .join(", ");
        run_locked(
            Some(("with_locked_set", &table)),
            self,
            &options.transaction,
            &step,
            f,
        )
        .await
    }
}
