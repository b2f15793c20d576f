//! What a claim's filters bind and splice: filter values that fit the column PostgreSQL
//! infers (a text label for an enum column, an integer of another width), and raw predicates
//! whose `$n` placeholders are renumbered into the claim's.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use tokio_postgres::types::ToSql;

use crate::error::Error;
use crate::transaction::OwnedParam;

/// A bound value a claim keeps: shared, so that a claim can be cloned.
pub(crate) type SharedParam = Arc<dyn ToSql + Send + Sync>;

/// The caller's boxed values, kept shared.
pub(crate) fn shared(params: Vec<OwnedParam>) -> Vec<SharedParam> {
    params.into_iter().map(Arc::from).collect()
}

/// A filter value as the claim uses it. Text and integers are written into the claim's SQL
/// as literals, so that the statement matches a partial index on the same condition under a
/// generic plan (a prepared statement's parameter never matches one), and PostgreSQL gives
/// the literal the column's type: `filter("status", Eq, "pending")` works on a `job_status`
/// enum column and `filter("attempts", Lt, 3_i32)` on an `int8` one. Other values are bound as
/// parameters, as they are.
#[derive(Clone)]
pub(crate) enum FilterValue {
    Text(String),
    Int(i64),
    Param(SharedParam),
}

impl fmt::Debug for FilterValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterValue::Text(t) => write!(f, "{t:?}"),
            FilterValue::Int(i) => write!(f, "{i}"),
            FilterValue::Param(p) => write!(f, "{p:?}"),
        }
    }
}

pub(crate) fn filter_value<V: ToSql + Send + Sync + 'static>(value: V) -> FilterValue {
    let any: &dyn Any = &value;
    if let Some(s) = any.downcast_ref::<&'static str>() {
        return FilterValue::Text((*s).to_owned());
    }
    if let Some(s) = any.downcast_ref::<String>() {
        return FilterValue::Text(s.clone());
    }
    let int = (any.downcast_ref::<i16>().map(|v| i64::from(*v)))
        .or_else(|| any.downcast_ref::<i32>().map(|v| i64::from(*v)))
        .or_else(|| any.downcast_ref::<i64>().copied());
    match int {
        Some(int) => FilterValue::Int(int),
        None => FilterValue::Param(Arc::new(value)),
    }
}

impl FilterValue {
    /// The SQL literal, or `None` for a value bound as a parameter.
    pub(crate) fn literal(&self) -> Result<Option<String>, Error> {
        match self {
            FilterValue::Text(t) => literal(t).map(Some),
            FilterValue::Int(i) => Ok(Some(i.to_string())),
            FilterValue::Param(_) => Ok(None),
        }
    }
}

/// `text` as an SQL string literal of unknown type (PostgreSQL gives it the type the context
/// asks for): `'…'` with quotes doubled, or `E'…'` with backslashes doubled too when it has
/// any (so it reads the same whatever `standard_conforming_strings` says). Text with a NUL is
/// refused: PostgreSQL text cannot hold one.
pub(crate) fn literal(text: &str) -> Result<String, Error> {
    if text.contains('\0') {
        return Err(Error::invalid(
            "a claim filter value contains a NUL character, which PostgreSQL text cannot hold",
        ));
    }
    let quoted = text.replace('\'', "''");
    Ok(if text.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    })
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

/// `sql` with every `$n` placeholder outside literals, quoted identifiers and comments shifted
/// by `offset`, and the placeholder numbers it uses (sorted, without repeats). Refuses a `;`
/// outside literals and comments (`what` is one expression or statement) and `$0`.
pub(crate) fn renumber(
    sql: &str,
    offset: usize,
    what: &str,
) -> Result<(String, Vec<usize>), Error> {
    let mut used = Vec::new();
    let mut out = String::with_capacity(sql.len() + 8);
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &sql[i..];
        let skip = if rest.starts_with("--") {
            rest.find('\n').unwrap_or(rest.len())
        } else if rest.starts_with("/*") {
            block_comment(rest)?
        } else if rest.starts_with('\'') || rest.starts_with("E'") || rest.starts_with("e'") {
            quoted(rest, '\'')?
        } else if rest.starts_with('"') {
            quoted(rest, '"')?
        } else {
            dollar_quote(rest)?.unwrap_or_default()
        };
        if skip > 0 {
            out.push_str(&rest[..skip]);
            i += skip;
            continue;
        }
        let c = rest.chars().next().expect("not at the end");
        if c == ';' {
            return Err(Error::invalid(format!(
                "{what} is one expression or statement: it may not contain ';'"
            )));
        }
        if c == '$' {
            let digits = rest[1..].bytes().take_while(u8::is_ascii_digit).count();
            if digits > 0 {
                let n: usize = rest[1..=digits].parse().unwrap_or(0);
                if n == 0 {
                    return Err(Error::invalid(format!(
                        "{what} uses $0; placeholders start at $1"
                    )));
                }
                if let Err(at) = used.binary_search(&n) {
                    used.insert(at, n);
                }
                out.push_str(&format!("${}", n + offset));
                i += 1 + digits;
                continue;
            }
        }
        out.push(c);
        i += c.len_utf8();
    }
    Ok((out, used))
}

/// Whether `word` appears in `sql` as an identifier of its own (not inside a longer name, a
/// literal or a comment), case-insensitively.
pub(crate) fn mentions(sql: &str, word: &str) -> bool {
    let bytes = sql.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$';
    let mut i = 0;
    while i < bytes.len() {
        let rest = &sql[i..];
        let skip = if rest.starts_with("--") {
            rest.find('\n').unwrap_or(rest.len())
        } else if rest.starts_with("/*") {
            block_comment(rest).unwrap_or(rest.len())
        } else if rest.starts_with('\'') {
            quoted(rest, '\'').unwrap_or(rest.len())
        } else {
            0
        };
        if skip > 0 {
            i += skip;
            continue;
        }
        if ident(bytes[i]) {
            let len = bytes[i..].iter().take_while(|&&b| ident(b)).count();
            if sql[i..i + len].eq_ignore_ascii_case(word) {
                return true;
            }
            i += len;
        } else {
            i += 1;
        }
    }
    false
}

/// The length of a quoted literal or identifier at the start of `s` (`''` / `""` escape the
/// quote; `E'…'` also takes backslash escapes).
fn quoted(s: &str, quote: char) -> Result<usize, Error> {
    let escapes = s.starts_with(['E', 'e']);
    let start = if escapes { 2 } else { 1 };
    let mut chars = s[start..].char_indices();
    while let Some((at, c)) = chars.next() {
        if escapes && c == '\\' {
            chars.next();
        } else if c == quote {
            if s[start + at + 1..].starts_with(quote) {
                chars.next();
            } else {
                return Ok(start + at + 1);
            }
        }
    }
    Err(Error::invalid(
        "the claim predicate has an unterminated quote",
    ))
}

/// The length of a (nested) block comment at the start of `s`.
fn block_comment(s: &str) -> Result<usize, Error> {
    let mut depth = 0;
    let mut i = 0;
    while i < s.len() {
        if s[i..].starts_with("/*") {
            depth += 1;
            i += 2;
        } else if s[i..].starts_with("*/") {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Ok(i);
            }
        } else {
            i += s[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    Err(Error::invalid(
        "the claim predicate has an unterminated comment",
    ))
}

/// The length of a dollar-quoted string (`$$…$$`, `$tag$…$tag$`) at the start of `s`, if
/// one starts there.
fn dollar_quote(s: &str) -> Result<Option<usize>, Error> {
    let Some(after) = s.strip_prefix('$') else {
        return Ok(None);
    };
    let tag_len = after
        .char_indices()
        .take_while(|(i, c)| c.is_alphabetic() || *c == '_' || (*i > 0 && c.is_ascii_digit()))
        .map(|(i, c)| i + c.len_utf8())
        .last()
        .unwrap_or(0);
    if !after[tag_len..].starts_with('$') {
        return Ok(None);
    }
    let delimiter = &s[..tag_len + 2];
    let body = &s[delimiter.len()..];
    match body.find(delimiter) {
        Some(end) => Ok(Some(delimiter.len() + end + delimiter.len())),
        None => Err(Error::invalid(
            "the claim predicate has an unterminated dollar quote",
        )),
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
    fn text_and_integers_become_literals() {
        assert_eq!(literal("pending").unwrap(), "'pending'");
        assert_eq!(literal("it's").unwrap(), "'it''s'");
        assert_eq!(literal("a\\b'c").unwrap(), "E'a\\\\b''c'");
        assert!(literal("a\0b").unwrap_err().is_invalid_argument());
        assert_eq!(filter_value(7_i16).literal().unwrap().unwrap(), "7");
        assert_eq!(filter_value(-7_i64).literal().unwrap().unwrap(), "-7");
        assert_eq!(
            filter_value(String::from("x")).literal().unwrap().unwrap(),
            "'x'"
        );
        assert!(filter_value(true).literal().unwrap().is_none());
    }
}
