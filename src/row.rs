//! Lockable rows: how a row type names its table and key, and how it is built from a `Row`.

use std::borrow::Cow;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::error::{Error, ErrorKind, Step};
use crate::lock::{Lock, LockMode, LockStrength};

/// A table name, optionally schema-qualified. Names are used verbatim (case-sensitive, never
/// case-folded) and always rendered as quoted identifiers, so no name can inject SQL.
///
/// ```
/// use rowlock::Table;
/// const ACCOUNTS: Table = Table::new("accounts");
/// const AUDIT: Table = Table::qualified("audit", "events");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Table {
    schema: Option<&'static str>,
    name: &'static str,
}

impl Table {
    /// A table found through the connection's `search_path`.
    #[must_use]
    pub const fn new(name: &'static str) -> Self {
        Table { schema: None, name }
    }

    /// A table in an explicit schema.
    #[must_use]
    pub const fn qualified(schema: &'static str, name: &'static str) -> Self {
        Table {
            schema: Some(schema),
            name,
        }
    }

    /// The schema, if qualified.
    pub fn schema(&self) -> Option<&'static str> {
        self.schema
    }

    /// The table name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// `schema.name` or `name`, unquoted: how errors ([`RowRef`](crate::RowRef)) and spans name
    /// the table.
    pub(crate) fn spelled(&self) -> Cow<'static, str> {
        match self.schema {
            Some(schema) => format!("{schema}.{}", self.name).into(),
            None => self.name.into(),
        }
    }

    /// `"schema"."name"` or `"name"`, after checking each part. A dot in the name is refused:
    /// `Table::new("app.items")` would quote it into one identifier, a table that is not
    /// there, and the server's "relation \"app.items\" does not exist" reads as if it were.
    pub(crate) fn render(&self) -> Result<String, Error> {
        if let Some((schema, name)) = self.name.split_once('.') {
            return Err(Error::invalid(format!(
                "table name {:?} contains a dot, which would make it one identifier; for table \
                 {name:?} in schema {schema:?} use Table::qualified({schema:?}, {name:?}) (in the \
                 derive: schema = {schema:?}, table = {name:?})",
                self.name
            )));
        }
        let mut out = String::new();
        if let Some(schema) = self.schema {
            out.push_str(&quote_ident(schema)?);
            out.push('.');
        }
        out.push_str(&quote_ident(self.name)?);
        Ok(out)
    }
}

/// PostgreSQL truncates identifiers longer than `NAMEDATALEN - 1` bytes; silently locking a
/// different table than named would be worse than refusing.
const MAX_IDENT_BYTES: usize = 63;

/// Quotes an identifier (`"` doubled), refusing empty, NUL-containing or over-long names.
pub(crate) fn quote_ident(ident: &str) -> Result<String, Error> {
    if ident.is_empty() {
        return Err(Error::invalid("identifier is empty"));
    }
    if ident.contains('\0') {
        return Err(Error::invalid(format!(
            "identifier {ident:?} contains a NUL byte"
        )));
    }
    if ident.len() > MAX_IDENT_BYTES {
        return Err(Error::invalid(format!(
            "identifier {ident:?} is {} bytes long; PostgreSQL allows at most {MAX_IDENT_BYTES}",
            ident.len()
        )));
    }
    Ok(format!("\"{}\"", ident.replace('"', "\"\"")))
}

/// One component of a key: a value that can be bound as a parameter and ordered.
///
/// Implemented for the integer, text, boolean and `bytea` types, and, behind the cargo feature
/// of the same name, for `uuid::Uuid` (`uuid`), `chrono`'s and `time`'s dates and timestamps
/// (`chrono`, `time`) and `rust_decimal::Decimal` (`rust_decimal`). Several rows are locked in
/// the order PostgreSQL sorts their key columns (`ORDER BY`), the same for every caller; they
/// are handed to you in this type's `Ord`.
///
/// For your own key newtypes, one line: implement it (it has no methods) for a type that
/// implements [`ToSql`], `Ord`, `Clone` and `Debug`, e.g. one with tokio-postgres's
/// `#[derive(ToSql)] #[postgres(transparent)]`:
///
/// ```
/// use bytes::BytesMut;
/// use rowlock::KeyValue;
/// use rowlock::tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
///
/// #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
/// struct AccountId(i64);
///
/// impl ToSql for AccountId {
///     fn to_sql(&self, ty: &Type, out: &mut BytesMut)
///         -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
///         self.0.to_sql(ty, out)
///     }
///     fn accepts(ty: &Type) -> bool { <i64 as ToSql>::accepts(ty) }
///     to_sql_checked!();
/// }
///
/// impl KeyValue for AccountId {}
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a rowlock key",
    label = "not a key type",
    note = "keys are integers, text, bool, bytea, uuid / chrono / time / rust_decimal values \
            (cargo features), tuples of those, or your own type with `impl rowlock::KeyValue for \
            T {{}}`; floating-point numbers have no total order, so they cannot be keys"
)]
pub trait KeyValue: ToSql + Sync + Send + Clone + Ord + Debug + 'static {}

macro_rules! key_values {
    ($($t:ty),* $(,)?) => { $(impl KeyValue for $t {})* };
}
key_values!(
    i8,
    i16,
    i32,
    i64,
    u32,
    bool,
    String,
    &'static str,
    Box<str>,
    Vec<u8>
);

#[cfg(feature = "uuid")]
key_values!(uuid::Uuid);

#[cfg(feature = "chrono")]
key_values!(
    chrono::NaiveDate,
    chrono::NaiveDateTime,
    chrono::NaiveTime,
    chrono::DateTime<chrono::Utc>,
);

#[cfg(feature = "time")]
key_values!(
    time::Date,
    time::PrimitiveDateTime,
    time::Time,
    time::OffsetDateTime,
);

#[cfg(feature = "rust_decimal")]
key_values!(rust_decimal::Decimal);

mod private {
    /// Keeps [`Key`](super::Key) closed: its implementations are the blanket ones below, so
    /// methods can be added to it without breaking anyone.
    pub trait Sealed {}
}

/// A key of a [`LockableRow`]: one [`KeyValue`], or a tuple of them for composite keys.
/// Keys are bound as parameters, never formatted into SQL.
///
/// This trait is sealed: implement [`KeyValue`] for your own key types instead.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a rowlock key",
    label = "not a key type",
    note = "a key is one `KeyValue` or a tuple of up to four; see `rowlock::KeyValue`"
)]
pub trait Key: private::Sealed + Clone + Ord + Debug + Send + Sync + 'static {
    /// The number of key columns this key binds.
    const ARITY: usize;
    /// Pushes this key's values, in key-column order.
    fn push_params<'a, E: Extend<&'a (dyn ToSql + Sync)>>(&'a self, out: &mut E);
    /// Several keys as one array parameter per key column (`= ANY($1)` for one column,
    /// `unnest($1, $2, …)` for a composite key), so that one statement serves any number of
    /// keys.
    #[doc(hidden)]
    fn arrays(keys: &[Self]) -> Vec<Box<dyn ToSql + Sync + Send + '_>>;
}

impl<T: KeyValue> private::Sealed for T {}

impl<T: KeyValue> Key for T {
    const ARITY: usize = 1;
    fn push_params<'a, E: Extend<&'a (dyn ToSql + Sync)>>(&'a self, out: &mut E) {
        out.extend([self as &(dyn ToSql + Sync)]);
    }
    fn arrays(keys: &[Self]) -> Vec<Box<dyn ToSql + Sync + Send + '_>> {
        vec![Box::new(keys.iter().collect::<Vec<&T>>())]
    }
}

macro_rules! tuple_keys {
    ($(($n:expr; $($t:ident . $i:tt),+)),*) => {$(
        impl<$($t: KeyValue),+> private::Sealed for ($($t,)+) {}
        impl<$($t: KeyValue),+> Key for ($($t,)+) {
            const ARITY: usize = $n;
            fn push_params<'a, E: Extend<&'a (dyn ToSql + Sync)>>(&'a self, out: &mut E) {
                out.extend([$(&self.$i as &(dyn ToSql + Sync)),+]);
            }
            fn arrays(keys: &[Self]) -> Vec<Box<dyn ToSql + Sync + Send + '_>> {
                vec![$(Box::new(keys.iter().map(|k| &k.$i).collect::<Vec<&$t>>())),+]
            }
        }
    )*};
}
tuple_keys!((2; A.0, B.1), (3; A.0, B.1, C.2), (4; A.0, B.1, C.2, D.3));

/// A row type that rowlock can lock: where it lives, what identifies it, how to build it.
///
/// The key columns must identify one row (a primary key or unique constraint); a key that
/// matches several rows is refused with [`ErrorKind::KeyNotUnique`](crate::ErrorKind::KeyNotUnique).
///
/// ```
/// use rowlock::{LockableRow, Table};
/// use rowlock::tokio_postgres::{Error, Row};
///
/// struct Account { id: i64, balance: i64 }
///
/// impl LockableRow for Account {
///     type Key = i64;
///     const TABLE: Table = Table::new("accounts");
///     const KEY_COLUMNS: &'static [&'static str] = &["id"];
///     fn from_row(row: &Row) -> Result<Self, Error> {
///         Ok(Account { id: row.try_get("id")?, balance: row.try_get("balance")? })
///     }
///     fn key(&self) -> i64 { self.id }
/// }
/// ```
pub trait LockableRow: Sized + Send + 'static {
    /// The key type: one [`KeyValue`] or a tuple matching [`KEY_COLUMNS`](Self::KEY_COLUMNS).
    type Key: Key;
    /// The table rows are locked in.
    const TABLE: Table;
    /// The key columns, in the order of [`Key`]'s values. Locks on several rows are taken in
    /// ascending order of these columns.
    const KEY_COLUMNS: &'static [&'static str];
    /// The columns [`from_row`](Self::from_row) reads: rowlock selects only these (so a
    /// column added, dropped or changed elsewhere in the table never touches its statements).
    /// Empty, the default, reads every column: inside a transaction, the columns the table has
    /// when a connection first locks the row type (asked once per connection, with the first
    /// statement), so that a later `ALTER TABLE … ADD COLUMN` never changes the result type of
    /// a cached statement; one-statement calls select `*` and prepare again when needed.
    /// `#[derive(LockableRow)]` lists the struct's fields.
    const COLUMNS: &'static [&'static str] = &[];
    /// Whether rows of this type carry a lease's attempt number ([`Leased`](crate::Leased)):
    /// only a claim with a lease can hand them out.
    #[doc(hidden)]
    const LEASED: bool = false;
    /// Builds the row from a result row with [`COLUMNS`](Self::COLUMNS) (every column when
    /// that is empty).
    fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error>;
    /// This row's key.
    fn key(&self) -> Self::Key;
    /// Which column of `row` [`from_row`](Self::from_row) cannot read (its name, the field it
    /// goes to, and the driver's error), asked only after `from_row` failed, so that the
    /// [`ErrorKind::Decode`](crate::ErrorKind::Decode) error names the column rather than its
    /// position in the row. `#[derive(LockableRow)]` implements it by reading each field
    /// again; the default answers `None`, and the error then carries the driver's message.
    fn misfit_column(row: &Row) -> Option<MisfitColumn> {
        let _ = row;
        None
    }
}

/// A column a row type could not read: see [`LockableRow::misfit_column`].
#[derive(Debug)]
pub struct MisfitColumn {
    /// The column's name in the table.
    pub column: &'static str,
    /// The row type's field it is read into.
    pub field: &'static str,
    /// Why: the value's type does not fit the field's, or it is `NULL` for a field that is
    /// not an `Option`, or the row has no such column.
    pub error: tokio_postgres::Error,
}

/// `R` built from `row`, a row of its table that rowlock selected; a row that does not fit is
/// [`ErrorKind::Decode`] naming the table, the row type and, when
/// [`LockableRow::misfit_column`] tells, the column and field (a column dropped, renamed,
/// retyped or made nullable under the row type).
pub(crate) fn decode_row<R: LockableRow>(row: &Row, step: Step) -> Result<R, Error> {
    R::from_row(row).map_err(|e| decode_error::<R>(e, row, step))
}

/// The values one statement binds, without a heap allocation for the usual few (a key has at
/// most four columns).
pub(crate) type Params<'a> = smallvec::SmallVec<[&'a (dyn ToSql + Sync); 8]>;

/// Every row of `rows` as an `R` (see [`decode_row`]).
pub(crate) fn decode_rows<R: LockableRow>(rows: &[Row], step: Step) -> Result<Vec<R>, Error> {
    // Sized up front: a collect through `Result` would grow the vector step by step.
    let mut decoded = Vec::with_capacity(rows.len());
    for row in rows {
        decoded.push(decode_row(row, step)?);
    }
    Ok(decoded)
}

fn decode_error<R: LockableRow>(e: tokio_postgres::Error, row: &Row, step: Step) -> Error {
    let table = R::TABLE
        .render()
        .unwrap_or_else(|_| R::TABLE.name().to_string());
    let row_type = std::any::type_name::<R>();
    let Some(misfit) = R::misfit_column(row) else {
        return Error::with_kind(
            ErrorKind::Decode,
            format!("a row of table {table} does not fit the row type {row_type}"),
        )
        .at(step)
        .with_source(e);
    };
    // The driver's error names the column by its position; its cause says what is wrong.
    let cause = match std::error::Error::source(&misfit.error) {
        Some(cause) => cause.to_string(),
        None => misfit.error.to_string(),
    };
    Error::with_kind(
        ErrorKind::Decode,
        format!(
            "column {} of table {table} does not fit field `{}` of the row type {row_type}: \
             {cause}",
            quote_ident(misfit.column).unwrap_or_else(|_| format!("{:?}", misfit.column)),
            misfit.field
        ),
    )
    .at(step)
}

/// The rendered, checked names of a `LockableRow` (table and key columns) and the lock
/// statements rendered from them: checked, quoted and formatted once per row type, not per
/// call.
pub(crate) struct Names {
    /// Quoted, as statements name it.
    pub(crate) table: String,
    /// As the row type spells it ([`Table::spelled`]): how errors and spans name the table.
    pub(crate) spelled: Cow<'static, str>,
    pub(crate) keys: Vec<String>,
    /// The row type's own [`LockableRow::COLUMNS`], or `*` when it lists none.
    declared: Arc<Columns>,
    /// Column lists learned from the server for a row type that lists none (one per table
    /// shape seen: connections to databases whose tables differ learn different lists).
    learned: Mutex<Vec<Arc<Columns>>>,
    /// A statement whose result columns are the table's (prepared per connection, never run).
    pub(crate) describe_sql: String,
    /// Lock statements by (strength, mode, key count, column list): a few dozen at most,
    /// found by a scan, which costs less than hashing the key on every call.
    lock_sql: Mutex<Vec<(LockSqlKey, Arc<str>)>>,
    /// The relation [`table`](Self::table) names as the server resolved it, once asked: the
    /// root of its partition tree (itself unless it is a partition) and itself, each as quoted
    /// schema and name through the `search_path`. The order of a lock set, the same for every
    /// spelling of one table, and for a partition as for its partitioned table.
    pub(crate) relation: OnceLock<(String, String)>,
}

/// A lock statement's strength, mode, key count and [`Columns::id`].
type LockSqlKey = (LockStrength, LockMode, usize, usize);

/// The columns a statement of a row type reads: the row type's own
/// ([`LockableRow::COLUMNS`], or `*` when it lists none: id 0), or the table's columns as the
/// server listed them on a connection (ids from 1). rowlock's statements inside a transaction
/// never read `*`: a column added later would change their result type under the cached
/// statement (`0A000`), which a caller's own transaction could not recover from.
#[derive(Debug)]
pub(crate) struct Columns {
    pub(crate) id: usize,
    /// As the table names them.
    names: Vec<String>,
    /// Quoted; empty for `*`.
    pub(crate) quoted: Vec<String>,
    /// What `SELECT` lists.
    pub(crate) select: String,
}

impl Columns {
    fn new(id: usize, names: Vec<String>) -> Result<Columns, Error> {
        let quoted = names
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Result<Vec<_>, _>>()?;
        let select = if quoted.is_empty() {
            "*".to_string()
        } else {
            quoted.join(", ")
        };
        Ok(Columns {
            id,
            names,
            quoted,
            select,
        })
    }

    /// Learned from the server rather than listed by the row type.
    pub(crate) fn learned(&self) -> bool {
        self.id > 0
    }
}

impl crate::diagnostics::RowRef {
    /// The row of `R` with this key.
    pub fn of<R: LockableRow>(key: &R::Key) -> Self {
        crate::diagnostics::RowRef {
            table: R::TABLE.spelled(),
            key: format!("{key:?}"),
        }
    }

    /// Whether this names the row of `R` with `key`.
    pub fn is<R: LockableRow>(&self, key: &R::Key) -> bool {
        *self == Self::of::<R>(key)
    }
}

impl Names {
    /// `SELECT * FROM <table> WHERE <key> = … | IN (…) [ORDER BY <key>] FOR <strength> [NOWAIT |
    /// SKIP LOCKED]` for `count` keys; several keys are locked in key order.
    pub(crate) fn lock_sql(&self, options: &Lock, count: usize, columns: &Columns) -> Arc<str> {
        let count = self.statement_count(count);
        let key = (options.strength, options.mode, count, columns.id);
        let mut cache = self.lock_sql.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, sql)) = cache.iter().find(|(k, _)| *k == key) {
            return sql.clone();
        }
        let order = if count == 1 {
            String::new()
        } else {
            format!(" {}", self.order_by())
        };
        let sql: Arc<str> = format!(
            "SELECT {} FROM {} {}{order} {}",
            columns.select,
            self.table,
            self.where_bound_keys(count),
            options.clause()
        )
        .into();
        cache.push((key, sql.clone()));
        sql
    }

    /// The number of keys a statement for `count` keys is written for: one, or any number
    /// (array parameters; 0 here).
    fn statement_count(&self, count: usize) -> usize {
        if count > 1 { 0 } else { count }
    }

    /// `WHERE` for `count` keys as [`Key::push_params`] (one key) and [`Key::arrays`] (several)
    /// bind them: `= $1` (or `= ($1, $2)`) for one key; for several, `= ANY($1)` for a key of
    /// one column, and for a composite key the rows of `unnest($1, $2, …)`, one array per key
    /// column. Each array is typed by its column (a bare `unnest($1, $2)` has no type to
    /// infer), with no lookup of the table's types:
    /// `COALESCE($i, ARRAY[COALESCE((NULL::<table>).<col>, NULL)])` makes the server infer
    /// `$i` as an array of the column's type, and of its base type when the column is of a
    /// domain (the inner `COALESCE`), as `<col> = $i` infers the base type for one key. The
    /// parameter is never `NULL`, so the outer `COALESCE` never picks its second argument.
    pub(crate) fn where_bound_keys(&self, count: usize) -> String {
        match (self.statement_count(count), self.keys.len()) {
            (0, 1) => format!("WHERE {} = ANY($1)", self.keys[0]),
            (0, _) => format!(
                "WHERE {} IN (SELECT * FROM unnest({}))",
                self.key_tuple(),
                self.typed_arrays()
            ),
            _ => format!("WHERE {}", self.key_equals()),
        }
    }

    /// `$1, $2, …` bound by [`Key::arrays`], each typed as an array of its key column (see
    /// [`where_bound_keys`](Self::where_bound_keys)), for `unnest`.
    fn typed_arrays(&self) -> String {
        let arrays: Vec<String> = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                format!(
                    "COALESCE(${}, ARRAY[COALESCE((NULL::{}).{key}, NULL)])",
                    i + 1,
                    self.table
                )
            })
            .collect();
        arrays.join(", ")
    }

    /// Which of the keys bound by [`Key::arrays`] have a row, by the server's equality of the
    /// key columns: each row found, its columns as `columns` selects them and, last,
    /// `rowlock_i`, the 1-based position of the key it matched. The server's equality may be
    /// coarser than `Key`'s `Ord` (`citext`, a nondeterministic collation: `ALICE` finds the
    /// row `alice`), so a key whose row did not come back under its own spelling is not taken
    /// for missing until the server says so.
    pub(crate) fn match_sql(&self, columns: &Columns) -> String {
        let aliases: Vec<String> = (1..=self.keys.len())
            .map(|i| format!("rowlock_k{i}"))
            .collect();
        let matched: Vec<String> = aliases.iter().map(|a| format!("k.{a}")).collect();
        let matched = if matched.len() == 1 {
            matched[0].clone()
        } else {
            format!("({})", matched.join(", "))
        };
        // The table's columns only, whatever `columns` is: never `k`'s.
        let select = if columns.quoted.is_empty() {
            format!("{}.*", self.table)
        } else {
            columns.select.clone()
        };
        format!(
            "SELECT {select}, k.rowlock_i FROM unnest({}) WITH ORDINALITY AS k({}, rowlock_i) \
             JOIN {} ON {} = {matched}",
            self.typed_arrays(),
            aliases.join(", "),
            self.table,
            self.key_tuple()
        )
    }

    pub(crate) fn render<R: LockableRow>() -> Result<Names, Error> {
        let table = R::TABLE.render()?;
        if R::KEY_COLUMNS.len() != <R::Key as Key>::ARITY {
            return Err(Error::invalid(format!(
                "{} declares {} key column(s) but its Key type binds {} value(s)",
                table,
                R::KEY_COLUMNS.len(),
                <R::Key as Key>::ARITY
            )));
        }
        let keys = R::KEY_COLUMNS
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Result<Vec<_>, _>>()?;
        let declared = Columns::new(0, R::COLUMNS.iter().map(|c| c.to_string()).collect())?;
        Ok(Names {
            describe_sql: format!("SELECT * FROM {table} LIMIT 0"),
            table,
            spelled: R::TABLE.spelled(),
            keys,
            declared: Arc::new(declared),
            learned: Mutex::default(),
            lock_sql: Mutex::default(),
            relation: OnceLock::new(),
        })
    }

    /// The row type's own columns ([`LockableRow::COLUMNS`]), or `*` when it lists none.
    pub(crate) fn declared(&self) -> &Arc<Columns> {
        &self.declared
    }

    /// Whether the row type lists no columns, so statements inside a transaction read the
    /// list the server gives for the connection ([`learned`](Self::learned)).
    pub(crate) fn needs_columns(&self) -> bool {
        self.declared.quoted.is_empty()
    }

    /// The learned list equal to `columns` (the result columns of
    /// [`describe_sql`](Self::describe_sql) prepared on a connection), added if new.
    pub(crate) fn learned(
        &self,
        columns: &[tokio_postgres::Column],
    ) -> Result<Arc<Columns>, Error> {
        let mut learned = self.learned.lock().unwrap_or_else(PoisonError::into_inner);
        let same = |c: &&Arc<Columns>| {
            c.names.len() == columns.len()
                && c.names.iter().zip(columns).all(|(a, b)| a == b.name())
        };
        if let Some(known) = learned.iter().find(same) {
            return Ok(known.clone());
        }
        let names = columns.iter().map(|c| c.name().to_string()).collect();
        let new = Arc::new(Columns::new(learned.len() + 1, names)?);
        learned.push(new.clone());
        Ok(new)
    }

    /// `e`, naming the row type's column and table if `e` says `sql` (rendered from these
    /// names and `columns`) reads a column the table no longer has (for a learned list, the
    /// error is one that preparing again cures), or saying why the table may be missing.
    pub(crate) fn missing_column(&self, e: Error, sql: &str, columns: &Columns) -> Error {
        e.naming_missing_column(sql, &self.table, &columns.quoted, columns.learned())
            .naming_missing_table(sql, &self.table)
    }

    /// The key parameter at position `index` of a lock statement, as the caller knows it:
    /// the key, the keys (one array), or one column of a composite key.
    pub(crate) fn key_param(&self, index: usize, array: bool) -> String {
        match self.keys.len() {
            1 if array => format!("a key of {}", self.table),
            1 => format!("the key of {}", self.table),
            n => format!("key column {} of {}", self.keys[index % n], self.table),
        }
    }

    /// `"a"` or `("a", "b")`.
    pub(crate) fn key_tuple(&self) -> String {
        if self.keys.len() == 1 {
            self.keys[0].clone()
        } else {
            format!("({})", self.keys.join(", "))
        }
    }

    /// `<key> = $1` or `(<a>, <b>) = ($1, $2)`: one key, bound by [`Key::push_params`].
    pub(crate) fn key_equals(&self) -> String {
        let ps: Vec<String> = (1..=self.keys.len()).map(|j| format!("${j}")).collect();
        if ps.len() == 1 {
            format!("{} = {}", self.key_tuple(), ps[0])
        } else {
            format!("{} = ({})", self.key_tuple(), ps.join(", "))
        }
    }

    /// For an `UPDATE <table> … FROM <cte> AS <alias> (<aliases>) WHERE <matches>` joined to a
    /// CTE of this row type's keys: the CTE's key columns under names of their own (so that
    /// a `SET` list may name any column without ambiguity), and the join condition.
    pub(crate) fn key_join(&self, alias: &str) -> (String, String) {
        let aliases: Vec<String> = (1..=self.keys.len())
            .map(|i| format!("rowlock_k{i}"))
            .collect();
        let matches: Vec<String> = self
            .keys
            .iter()
            .zip(&aliases)
            .map(|(k, a)| format!("{}.{k} = {alias}.{a}", self.table))
            .collect();
        (aliases.join(", "), matches.join(" AND "))
    }

    /// A `RETURNING` list of already quoted `columns`, qualified by the table; every column
    /// when `columns` is empty.
    pub(crate) fn returning(&self, columns: &[String]) -> String {
        if columns.is_empty() {
            return format!("{}.*", self.table);
        }
        columns
            .iter()
            .map(|c| format!("{}.{c}", self.table))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub(crate) fn order_by(&self) -> String {
        format!("ORDER BY {}", self.keys.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_and_checked() {
        assert_eq!(quote_ident("t").unwrap(), "\"t\"");
        assert_eq!(
            quote_ident("x\"; DROP TABLE t; --").unwrap(),
            "\"x\"\"; DROP TABLE t; --\""
        );
        assert!(quote_ident("").is_err());
        assert!(quote_ident("a\0b").is_err());
        assert!(quote_ident(&"a".repeat(64)).is_err());
        assert!(quote_ident(&"a".repeat(63)).is_ok());
        assert_eq!(Table::qualified("s", "T").render().unwrap(), "\"s\".\"T\"");
    }

    struct Pair;
    impl LockableRow for Pair {
        type Key = (i64, String);
        const TABLE: Table = Table::new("pairs");
        const KEY_COLUMNS: &'static [&'static str] = &["a", "b"];
        fn from_row(_: &Row) -> Result<Self, tokio_postgres::Error> {
            Ok(Pair)
        }
        fn key(&self) -> (i64, String) {
            (0, String::new())
        }
    }

    struct Single;
    impl LockableRow for Single {
        type Key = i64;
        const TABLE: Table = Table::new("singles");
        const KEY_COLUMNS: &'static [&'static str] = &["id"];
        fn from_row(_: &Row) -> Result<Self, tokio_postgres::Error> {
            Ok(Single)
        }
        fn key(&self) -> i64 {
            0
        }
    }

    #[test]
    fn composite_key_sql() {
        let n = Names::render::<Pair>().unwrap();
        assert_eq!(n.where_bound_keys(1), "WHERE (\"a\", \"b\") = ($1, $2)");
        assert_eq!(n.order_by(), "ORDER BY \"a\", \"b\"");
        // Several keys are one array parameter per key column, typed by the column.
        assert_eq!(
            n.where_bound_keys(2),
            "WHERE (\"a\", \"b\") IN (SELECT * FROM unnest(\
             COALESCE($1, ARRAY[COALESCE((NULL::\"pairs\").\"a\", NULL)]), \
             COALESCE($2, ARRAY[COALESCE((NULL::\"pairs\").\"b\", NULL)])))"
        );
        assert_eq!(n.where_bound_keys(999), n.where_bound_keys(2));
        let one = Names::render::<Single>().unwrap();
        assert_eq!(one.where_bound_keys(1), "WHERE \"id\" = $1");
        assert_eq!(one.where_bound_keys(2), "WHERE \"id\" = ANY($1)");
        assert_eq!(one.where_bound_keys(999), "WHERE \"id\" = ANY($1)");
        // Which keys have a row: joined to the keys, as the server compares them.
        let columns = Columns::new(1, vec!["a".into(), "b".into(), "note".into()]).unwrap();
        assert_eq!(
            n.match_sql(&columns),
            "SELECT \"a\", \"b\", \"note\", k.rowlock_i FROM unnest(\
             COALESCE($1, ARRAY[COALESCE((NULL::\"pairs\").\"a\", NULL)]), \
             COALESCE($2, ARRAY[COALESCE((NULL::\"pairs\").\"b\", NULL)])) \
             WITH ORDINALITY AS k(rowlock_k1, rowlock_k2, rowlock_i) \
             JOIN \"pairs\" ON (\"a\", \"b\") = (k.rowlock_k1, k.rowlock_k2)"
        );
        assert_eq!(
            one.match_sql(&Columns::new(0, Vec::new()).unwrap()),
            "SELECT \"singles\".*, k.rowlock_i FROM unnest(\
             COALESCE($1, ARRAY[COALESCE((NULL::\"singles\").\"id\", NULL)])) \
             WITH ORDINALITY AS k(rowlock_k1, rowlock_i) \
             JOIN \"singles\" ON \"id\" = k.rowlock_k1"
        );
        assert_eq!(
            <(i64, String)>::arrays(&[(1, "x".into()), (2, "y".into())]).len(),
            2
        );
        assert_eq!(i64::arrays(&[1, 2]).len(), 1);
        let key = (7_i64, "x".to_string());
        let mut params = Vec::new();
        key.push_params(&mut params);
        assert_eq!(params.len(), 2);
    }
}
