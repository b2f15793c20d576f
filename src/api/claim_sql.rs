//! What a claim's filters bind: filter values that fit the column PostgreSQL infers (a text
//! label for an enum column, an integer of another width), always as parameters, and raw
//! predicates whose `$n` placeholders are renumbered into the claim's.

use std::fmt;
use std::sync::Arc;

use bytes::BytesMut;
use tokio_postgres::types::{IsNull, Kind, ToSql, Type, WrongType};

use crate::error::Error;
use crate::sql_text::renumber;
use crate::transaction::OwnedParam;

/// A bound value a claim keeps: shared, so that a claim can be cloned.
pub(crate) type SharedParam = Arc<dyn ToSql + Send + Sync>;

/// The caller's boxed values, kept shared.
pub(crate) fn shared(params: Vec<OwnedParam>) -> Vec<SharedParam> {
    params.into_iter().map(Arc::from).collect()
}

/// A filter value, always bound as a parameter of the type PostgreSQL infers from its column
/// (never written into the SQL), wrapped in [`Fit`] so that values whose bytes are the
/// column's also bind: text for an enum column, an integer of another width.
pub(crate) type FilterValue = SharedParam;

/// Wraps a filter value for binding.
pub(crate) fn filter_value<V: ToSql + Send + Sync + 'static>(value: V) -> FilterValue {
    Arc::new(Fit(value))
}

/// A value bound to a parameter of the type PostgreSQL inferred from a column, also where
/// the value's own type refuses that type but writes the same bytes: text for an enum column
/// (an enum's binary form is its label, so `filter("status", Eq, "pending")` works on a
/// `job_status` column) and an integer for an integer column of another width (checked for
/// range, so `3_i32` fits an `int8` column and `70_000_i64` an `int2` one does not). Anything
/// else is refused as the value's own type refuses it.
#[derive(Debug)]
pub(crate) struct Fit<V>(pub(crate) V);

/// The integer types, widest first: the width a value is read in before it is narrowed.
const INTEGERS: [Type; 3] = [Type::INT8, Type::INT4, Type::INT2];

impl<V: ToSql> Fit<V> {
    /// The integer type `V` writes, if it writes one.
    fn integer() -> Option<&'static Type> {
        INTEGERS.iter().find(|t| V::accepts(t))
    }

    fn is_integer(ty: &Type) -> bool {
        INTEGERS.contains(ty)
    }
}

impl<V: ToSql> Fit<V> {
    fn write(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if V::accepts(ty) {
            return self.0.to_sql(ty, out);
        }
        if matches!(ty.kind(), Kind::Enum(_)) {
            return self.0.to_sql(&Type::TEXT, out);
        }
        let from = Self::integer().ok_or("not an integer")?;
        let mut own = BytesMut::new();
        if let IsNull::Yes = self.0.to_sql(from, &mut own)? {
            return Ok(IsNull::Yes);
        }
        let value = match own.as_ref() {
            [a, b] => i64::from(i16::from_be_bytes([*a, *b])),
            [a, b, c, d] => i64::from(i32::from_be_bytes([*a, *b, *c, *d])),
            bytes => i64::from_be_bytes(bytes.try_into()?),
        };
        let out_of_range = || format!("{value} is out of range for {ty}");
        match *ty {
            Type::INT2 => i16::try_from(value)
                .map_err(|_| out_of_range())?
                .to_sql(ty, out),
            Type::INT4 => i32::try_from(value)
                .map_err(|_| out_of_range())?
                .to_sql(ty, out),
            _ => value.to_sql(ty, out),
        }
    }
}

impl<V: ToSql> ToSql for Fit<V> {
    /// Refuses `NULL`: `column = NULL` (or any comparison with `NULL`) is never true, so the
    /// filter would match no row; `filter_null` / `filter_not_null` say what is meant.
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.write(ty, out)? {
            IsNull::No => Ok(IsNull::No),
            IsNull::Yes => Err(
                "it is NULL, and a comparison with NULL matches no row: use \
                                Claim::filter_null or Claim::filter_not_null"
                    .into(),
            ),
        }
    }

    fn accepts(ty: &Type) -> bool {
        V::accepts(ty)
            || (matches!(ty.kind(), Kind::Enum(_)) && V::accepts(&Type::TEXT))
            || (Self::is_integer(ty) && Self::integer().is_some())
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if !Self::accepts(ty) {
            // Named by the caller's type, not this wrapper's.
            return Err(Box::new(WrongType::new::<V>(ty.clone())));
        }
        self.to_sql(ty, out)
    }
}

/// A raw SQL predicate and the values for its `$1`, `$2`, … placeholders.
#[derive(Clone)]
pub(crate) struct Predicate {
    pub(crate) sql: String,
    pub(crate) params: Vec<SharedParam>,
}

impl fmt::Debug for Predicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}) with {} parameter(s)", self.sql, self.params.len())
    }
}

impl Predicate {
    /// The predicate with its placeholders shifted by `offset` (the claim's parameters before
    /// it). Refuses a `;` outside literals and comments, a placeholder with no value, and a
    /// value no placeholder uses (PostgreSQL could not infer its type).
    pub(crate) fn renumbered(&self, offset: usize) -> Result<String, Error> {
        let count = self.params.len();
        let (out, used) = renumber(&self.sql, offset, "the claim predicate")?;
        if let Some(&n) = used.iter().find(|&&n| n > count) {
            return Err(Error::invalid(format!(
                "the claim predicate uses ${n} but has {count} parameter(s)"
            )));
        }
        if let Some(unused) = (1..=count).find(|n| !used.contains(n)) {
            return Err(Error::invalid(format!(
                "parameter ${unused} of the claim predicate is not used in it"
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn predicate(sql: &str, params: usize) -> Predicate {
        Predicate {
            sql: sql.to_owned(),
            params: (0..params)
                .map(|i| Arc::new(i as i64) as SharedParam)
                .collect(),
        }
    }

    #[test]
    fn placeholders_are_renumbered_outside_literals_and_comments() {
        let p = predicate(
            "run_at <= now() AND (queue = $1 OR note = '$1; x' OR tag = $tag$ $2 ; $tag$) \
             -- $9;\n AND \"weird$1\" = $2 /* $3; /* nested */ */",
            2,
        );
        assert_eq!(
            p.renumbered(3).unwrap(),
            "run_at <= now() AND (queue = $4 OR note = '$1; x' OR tag = $tag$ $2 ; $tag$) \
             -- $9;\n AND \"weird$1\" = $5 /* $3; /* nested */ */"
        );
        assert_eq!(
            predicate("a = E'it\\'s $1' AND b = $1", 1)
                .renumbered(1)
                .unwrap(),
            "a = E'it\\'s $1' AND b = $2"
        );
    }

    #[test]
    fn bad_predicates_are_refused() {
        for (sql, params) in [
            ("a = $2", 1),
            ("a = $0", 1),
            ("a = 1", 1),
            ("a = $1; DROP TABLE jobs", 1),
            ("a = 'open", 0),
            ("a = $q$ open", 0),
            ("a = 1 /* open", 0),
        ] {
            let err = predicate(sql, params).renumbered(0).unwrap_err();
            assert!(err.is_invalid_argument(), "{sql}");
        }
    }

    #[test]
    fn values_fit_the_column_type_postgres_infers() {
        let bytes = |v: &dyn ToSql, ty: &Type| {
            let mut out = BytesMut::new();
            v.to_sql_checked(ty, &mut out).map(|_| out.to_vec())
        };
        // An integer of another width, checked for range.
        assert_eq!(
            bytes(&Fit(3_i32), &Type::INT8).unwrap(),
            3_i64.to_be_bytes()
        );
        assert_eq!(
            bytes(&Fit(-2_i64), &Type::INT2).unwrap(),
            (-2_i16).to_be_bytes()
        );
        assert!(bytes(&Fit(70_000_i64), &Type::INT2).is_err());
        assert!(bytes(&Fit(i64::MAX), &Type::INT4).is_err());
        // Text for an enum column: the label's bytes.
        let status = Type::new(
            "job_status".into(),
            90_000,
            Kind::Enum(vec!["pending".into()]),
            "public".into(),
        );
        assert_eq!(bytes(&Fit("pending"), &status).unwrap(), b"pending");
        assert_eq!(bytes(&Fit(String::from("x")), &Type::TEXT).unwrap(), b"x");
        // Anything else as the value's own type says.
        let refused = bytes(&Fit(2.5_f64), &Type::INT8).unwrap_err().to_string();
        assert!(
            refused.contains("`f64`") && !refused.contains("Fit"),
            "{refused}"
        );
        assert!(bytes(&Fit(1_i64), &status).is_err());
        assert!(bytes(&Fit(true), &Type::TEXT).is_err());
        let null = bytes(&Fit(None::<i32>), &Type::INT8)
            .unwrap_err()
            .to_string();
        assert!(null.contains("filter_null"), "{null}");
        assert!(bytes(&Fit(None::<&str>), &status).is_err());
        assert_eq!(
            bytes(&Fit(Some(4_i32)), &Type::INT8).unwrap(),
            4_i64.to_be_bytes()
        );
    }
}
