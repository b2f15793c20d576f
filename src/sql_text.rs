//! What rowlock reads in SQL text that the caller wrote: claim predicates and marks,
//! transition `SET` lists and conditions, and statements sent through a transaction. One lexer
//! knows where literals (`'…'`, `E'…'`), quoted identifiers (`"…"`), dollar quotes
//! (`$$…$$`, `$tag$…$tag$`) and comments (`--`, nested `/* */`) start and end; placeholder
//! renumbering, identifier mentions, statement splitting and the reading of the caller's
//! statements by the transaction guard are built on it. Pure: no I/O, unit-tested below.
//!
//! What the guard reads in text sent through its own methods ([`caller_commands`]; one
//! statement or several separated by `;`, in any case, with comments anywhere; text inside
//! literals, quoted identifiers, dollar quotes and comments is never taken for a command):
//! - it follows the top-level `SAVEPOINT`, `RELEASE [SAVEPOINT]` and
//!   `ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT]` commands;
//! - it refuses the commands that would end or restart its transaction under it (`COMMIT`,
//!   `END`, `ROLLBACK` without `TO`, `ABORT`, `PREPARE TRANSACTION`, `BEGIN`, `START`) and
//!   `SET` without `LOCAL` (other than `SET TRANSACTION` and `SET CONSTRAINTS`), which would
//!   change the pooled session for every later transaction on the connection;
//! - it runs the commands that leave state in the session on purpose (`LISTEN`, `PREPARE`,
//!   `DEALLOCATE`, `DECLARE … WITH HOLD`, `CREATE TEMP …` without `ON COMMIT DROP`, `LOAD`,
//!   and calls of `pg_advisory_lock`, `pg_try_advisory_lock` and their `_shared` forms, and
//!   of `set_config` whose third argument is not the word `true`) and has the connection
//!   closed when the transaction ends, instead of pooled.
//!
//! Not seen: text sent through the raw client
//! ([`Transaction::client`](crate::Transaction::client); the guard then checks the
//! transaction's state in the same flush as `COMMIT`), commands and calls inside functions
//! and `DO` blocks, and temporary tables made by `SELECT … INTO TEMP`.

use crate::error::Error;

/// A savepoint command found in SQL text, with its name as the server folds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SavepointCommand {
    Savepoint(String),
    Release(String),
    RollbackTo(String),
}

/// The length of the literal, quoted identifier, dollar-quoted string or comment that starts
/// `rest`; 0 when none starts there. `what` names the text in the error for one that never
/// ends.
fn opaque(rest: &str, what: &str) -> Result<usize, Error> {
    let unterminated = |thing: &str| Error::invalid(format!("{what} has an unterminated {thing}"));
    if rest.starts_with("--") {
        Ok(rest.find('\n').unwrap_or(rest.len()))
    } else if rest.starts_with("/*") {
        block_comment(rest).ok_or_else(|| unterminated("comment"))
    } else if rest.starts_with('\'') || rest.starts_with("E'") || rest.starts_with("e'") {
        quoted(rest, '\'').ok_or_else(|| unterminated("quote"))
    } else if rest.starts_with('"') {
        quoted(rest, '"').ok_or_else(|| unterminated("quoted identifier"))
    } else {
        dollar_quote(rest)
            .map(Option::unwrap_or_default)
            .ok_or_else(|| unterminated("dollar quote"))
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
        let skip = opaque(rest, what)?;
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
        let skip = opaque(rest, "").unwrap_or(rest.len());
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
fn quoted(s: &str, quote: char) -> Option<usize> {
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
                return Some(start + at + 1);
            }
        }
    }
    None
}

/// The length of a (nested) block comment at the start of `s`.
fn block_comment(s: &str) -> Option<usize> {
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
                return Some(i);
            }
        } else {
            i += s[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    None
}

/// The length of a dollar-quoted string (`$$…$$`, `$tag$…$tag$`) at the start of `s`:
/// `Some(None)` when none starts there, `None` when it does not end.
fn dollar_quote(s: &str) -> Option<Option<usize>> {
    let Some(after) = s.strip_prefix('$') else {
        return Some(None);
    };
    let tag_len = after
        .char_indices()
        .take_while(|(i, c)| c.is_alphabetic() || *c == '_' || (*i > 0 && c.is_ascii_digit()))
        .map(|(i, c)| i + c.len_utf8())
        .last()
        .unwrap_or(0);
    if !after[tag_len..].starts_with('$') {
        return Some(None);
    }
    let delimiter = &s[..tag_len + 2];
    let body = &s[delimiter.len()..];
    let end = body.find(delimiter)?;
    Some(Some(delimiter.len() + end + delimiter.len()))
}

/// The statements of `sql`: split at each `;` outside literals, quoted identifiers, dollar
/// quotes and comments, trimmed, empty ones left out. Text after an unterminated quote or
/// comment belongs to the statement it starts in.
pub(crate) fn statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < sql.len() {
        let rest = &sql[i..];
        let skip = opaque(rest, "").unwrap_or(rest.len());
        if skip > 0 {
            i += skip;
        } else if rest.starts_with(';') {
            out.push(&sql[start..i]);
            i += 1;
            start = i;
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    out.push(&sql[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// A word of a statement, as the savepoint scanner sees it.
#[derive(Debug, PartialEq)]
enum Token<'a> {
    /// An unquoted keyword or identifier.
    Word(&'a str),
    /// A quoted identifier, quotes included.
    Quoted(&'a str),
    /// One character of punctuation: `(`, `,`, `)`, `;`, ….
    Punct(char),
    /// Anything else: a literal, a number.
    Other,
}

/// The tokens of one statement, comments and white space left out.
fn tokens(statement: &str) -> Vec<Token<'_>> {
    let ident = |c: char| c.is_alphanumeric() || c == '_' || c == '$';
    let mut out = Vec::new();
    let mut i = 0;
    while i < statement.len() {
        let rest = &statement[i..];
        let c = rest.chars().next().expect("not at the end");
        if c.is_whitespace() {
            i += c.len_utf8();
            continue;
        }
        let skip = opaque(rest, "").unwrap_or(rest.len());
        if skip > 0 {
            if rest.starts_with('"') {
                out.push(Token::Quoted(&rest[..skip]));
            } else if !(rest.starts_with("--") || rest.starts_with("/*")) {
                out.push(Token::Other);
            }
            i += skip;
        } else if ident(c) {
            let len = rest.find(|c: char| !ident(c)).unwrap_or(rest.len());
            out.push(Token::Word(&rest[..len]));
            i += len;
        } else {
            out.push(Token::Punct(c));
            i += c.len_utf8();
        }
    }
    out
}

/// A savepoint name as the server folds it: quoted kept as written (`""` is `"`), unquoted
/// in lower case (ASCII letters, as PostgreSQL folds them).
fn name(token: &Token<'_>) -> Option<String> {
    match token {
        Token::Word(w) => Some(w.to_ascii_lowercase()),
        Token::Quoted(q) => {
            let inner = &q[1..q.len() - 1];
            (!inner.is_empty()).then(|| inner.replace("\"\"", "\""))
        }
        Token::Punct(_) | Token::Other => None,
    }
}

fn is(token: &Token<'_>, keyword: &str) -> bool {
    matches!(token, Token::Word(w) if w.eq_ignore_ascii_case(keyword))
}

/// The savepoint command one statement is, if it is one.
fn savepoint_command(tokens: &[Token<'_>]) -> Option<SavepointCommand> {
    match tokens {
        [s, n] if is(s, "SAVEPOINT") => name(n).map(SavepointCommand::Savepoint),
        [r, n] if is(r, "RELEASE") => name(n).map(SavepointCommand::Release),
        [r, s, n] if is(r, "RELEASE") && is(s, "SAVEPOINT") => {
            name(n).map(SavepointCommand::Release)
        }
        [r, rest @ ..] if is(r, "ROLLBACK") => {
            let rest = match rest {
                [w, rest @ ..] if is(w, "WORK") || is(w, "TRANSACTION") => rest,
                rest => rest,
            };
            match rest {
                [t, n] if is(t, "TO") => name(n).map(SavepointCommand::RollbackTo),
                [t, s, n] if is(t, "TO") && is(s, "SAVEPOINT") => {
                    name(n).map(SavepointCommand::RollbackTo)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Why the guard refuses a statement with these tokens, if it does: it would end or restart
/// the guard's transaction, or change the pooled session.
fn refusal(tokens: &[Token<'_>]) -> Option<&'static str> {
    const ENDS: &str = "would end the transaction while rowlock still holds it open (its \
                        locks released, later statements run outside any transaction, and the \
                        call reported as if they had not): return Ok from your code to commit, \
                        an error to roll back, or use tx.savepoint() to undo part of it";
    match tokens {
        [first, ..] if is(first, "COMMIT") || is(first, "END") || is(first, "ABORT") => Some(ENDS),
        [first, rest @ ..] if is(first, "ROLLBACK") => match rest {
            [w, t, ..] if (is(w, "WORK") || is(w, "TRANSACTION")) && is(t, "TO") => None,
            [t, ..] if is(t, "TO") => None,
            _ => Some(ENDS),
        },
        [first, second, ..] if is(first, "PREPARE") && is(second, "TRANSACTION") => Some(ENDS),
        [first, ..] if is(first, "BEGIN") || is(first, "START") => Some(
            "would start a transaction inside the one rowlock opened (the server ignores it \
             with a warning); your code already runs inside a transaction",
        ),
        [first, second, ..]
            if is(first, "SET")
                && !(is(second, "LOCAL")
                    || is(second, "TRANSACTION")
                    || is(second, "CONSTRAINTS")) =>
        {
            Some(
                "would change the pooled session for every later transaction on this \
                 connection: use SET LOCAL (undone when the transaction ends), or give every \
                 connection the setting where the pool creates it",
            )
        }
        _ => None,
    }
}

/// Whether a statement with these tokens leaves state in the session that outlives the
/// transaction and is meant to: a `LISTEN`, an SQL-level prepared statement (`PREPARE`, or
/// `DEALLOCATE`, which may remove rowlock's own), a cursor `WITH HOLD`, a temporary table,
/// view or sequence (a table with `ON COMMIT DROP` ends with the transaction), a `LOAD`ed
/// library, a session-level advisory lock (`pg_advisory_lock` and its shared and `try` forms:
/// held until the session ends, so pooled it would block every other caller of the key), or
/// a setting made by `set_config` for the session (a third argument other than `true`).
/// The guard runs it and closes the connection when the transaction ends, so the next
/// borrower finds a clean session.
fn changes_session(tokens: &[Token<'_>]) -> bool {
    let has = |seq: &[&str]| {
        tokens
            .windows(seq.len())
            .any(|w| w.iter().zip(seq).all(|(t, k)| is(t, k)))
    };
    // Calls: a word followed by `(` (one pass; most statements have none).
    const SESSION_LOCKS: [&str; 4] = [
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
    ];
    for (at, pair) in tokens.windows(2).enumerate() {
        let [Token::Word(_), Token::Punct('(')] = pair else {
            continue;
        };
        let function = &pair[0];
        if SESSION_LOCKS.iter().any(|f| is(function, f))
            || (is(function, "set_config") && !third_argument_is_true(&tokens[at + 2..]))
        {
            return true;
        }
    }
    match tokens {
        [first, ..] if is(first, "LISTEN") || is(first, "DEALLOCATE") || is(first, "LOAD") => true,
        [first, second, ..] if is(first, "PREPARE") => !is(second, "TRANSACTION"),
        [first, ..] if is(first, "DECLARE") => {
            let before_for = tokens
                .iter()
                .position(|t| is(t, "FOR"))
                .unwrap_or(tokens.len());
            tokens[..before_for]
                .windows(2)
                .any(|w| is(&w[0], "WITH") && is(&w[1], "HOLD"))
        }
        [first, rest @ ..] if is(first, "CREATE") => {
            let rest = match rest {
                [scope, rest @ ..] if is(scope, "GLOBAL") || is(scope, "LOCAL") => rest,
                rest => rest,
            };
            matches!(rest, [temp, ..] if is(temp, "TEMP") || is(temp, "TEMPORARY"))
                && !has(&["ON", "COMMIT", "DROP"])
        }
        _ => false,
    }
}

/// Whether the third argument of a call whose arguments start `args` is the word `true`
/// (`set_config(name, value, true)`: for the transaction only).
fn third_argument_is_true(args: &[Token<'_>]) -> bool {
    let mut depth = 0_usize;
    let mut commas = 0;
    for (at, token) in args.iter().enumerate() {
        match token {
            Token::Punct('(') => depth += 1,
            Token::Punct(')') if depth == 0 => return false,
            Token::Punct(')') => depth -= 1,
            Token::Punct(',') if depth == 0 => {
                commas += 1;
                if commas == 2 {
                    let third = &args[at + 1..];
                    return matches!(third, [value, Token::Punct(')'), ..] if is(value, "true"));
                }
            }
            _ => {}
        }
    }
    false
}

/// What the guard does with SQL text sent through it ([`caller_commands`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Read {
    /// The savepoint commands to follow once the text succeeded, in order.
    pub(crate) savepoints: Vec<SavepointCommand>,
    /// A statement leaves state in the session ([`changes_session`]): the connection is
    /// closed when the transaction ends.
    pub(crate) changes_session: bool,
}

/// What the guard does with `sql` sent through it ([`Read`]), or an
/// [`InvalidArgument`](crate::ErrorKind::InvalidArgument) error naming the first statement it
/// refuses (see the module docs).
pub(crate) fn caller_commands(sql: &str) -> Result<Read, Error> {
    let mut read = Read::default();
    for statement in statements(sql) {
        let tokens = tokens(statement);
        if let Some(why) = refusal(&tokens) {
            let shown: String = statement.chars().take(60).collect();
            let more = if shown.len() < statement.len() {
                "…"
            } else {
                ""
            };
            return Err(Error::invalid(format!(
                "`{shown}{more}` is refused inside a rowlock transaction: it {why}"
            )));
        }
        read.savepoints.extend(savepoint_command(&tokens));
        read.changes_session |= changes_session(&tokens);
    }
    Ok(read)
}

/// The savepoint commands in `sql`, in order, for tests of the scanner.
#[cfg(test)]
fn savepoint_commands(sql: &str) -> Vec<SavepointCommand> {
    statements(sql)
        .into_iter()
        .filter_map(|statement| savepoint_command(&tokens(statement)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use SavepointCommand::*;

    #[test]
    fn savepoint_commands_are_found_as_the_server_reads_them() {
        let one = |c: SavepointCommand| vec![c];
        let cases: Vec<(&str, Vec<SavepointCommand>)> = vec![
            ("SAVEPOINT s", one(Savepoint("s".into()))),
            ("  savepoint S1 ;", one(Savepoint("s1".into()))),
            ("SAVEPOINT \"MyPoint\"", one(Savepoint("MyPoint".into()))),
            ("SAVEPOINT \"My Point\"", one(Savepoint("My Point".into()))),
            ("SAVEPOINT \"a;b\"", one(Savepoint("a;b".into()))),
            ("SAVEPOINT \"a\"\"b\"", one(Savepoint("a\"b".into()))),
            ("release savepoint S", one(Release("s".into()))),
            ("RELEASE s", one(Release("s".into()))),
            ("ROLLBACK WORK TO SAVEPOINT s", one(RollbackTo("s".into()))),
            ("rollback transaction to s", one(RollbackTo("s".into()))),
            ("ROLLBACK", vec![]),
            ("ROLLBACK TO", vec![]),
            ("SELECT 'SAVEPOINT s'", vec![]),
            ("ROLLBACK PREPARED 'x'", vec![]),
            ("SAVEPOINT a-b", vec![]),
            ("SELECT 1", vec![]),
            (
                "SAVEPOINT a; INSERT INTO t VALUES (1)",
                one(Savepoint("a".into())),
            ),
        ];
        for (sql, want) in cases {
            assert_eq!(savepoint_commands(sql), want, "{sql}");
        }
    }

    #[test]
    fn comments_quotes_dollar_quotes_and_several_statements() {
        let sql = "/* a */ ROLLBACK -- to x\n TO /* nested /* c */ */ SAVEPOINT s1; \
                   SELECT ';', E'\\';', \"x;y\", $$; SAVEPOINT no$$, $t$ RELEASE no $t$; \
                   -- SAVEPOINT no\n\
                   UPDATE t SET a = 1; release \"S2\"; SAVEPOINT s3";
        assert_eq!(
            savepoint_commands(sql),
            [
                RollbackTo("s1".into()),
                Release("S2".into()),
                Savepoint("s3".into())
            ]
        );
        assert_eq!(statements("a; 'b;c' ;; d").len(), 3);
        assert_eq!(
            statements("SELECT $$;").len(),
            1,
            "an unterminated dollar quote"
        );
        assert!(savepoint_commands("SAVEPOINT 'x'").is_empty());
        assert!(savepoint_commands("SAVEPOINT").is_empty());
        assert!(savepoint_commands("SAVEPOINT a b").is_empty());
    }

    #[test]
    fn statements_that_end_the_transaction_or_change_the_session_are_refused() {
        let refused = [
            "COMMIT",
            "commit;",
            "COMMIT AND CHAIN",
            "END",
            "end work",
            "ABORT",
            "ROLLBACK",
            "rollback work",
            "ROLLBACK AND CHAIN",
            "ROLLBACK PREPARED 'x'",
            "COMMIT PREPARED 'x'",
            "PREPARE TRANSACTION 'x'",
            "BEGIN",
            "START TRANSACTION",
            "SET statement_timeout = '5ms'",
            "set search_path to app",
            "SET SESSION lock_timeout = 0",
            "SET ROLE other",
            "SET SESSION AUTHORIZATION other",
            "SET TIME ZONE 'UTC'",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "UPDATE t SET a = 1; COMMIT",
            "/* first */ COMMIT -- then nothing",
        ];
        for sql in refused {
            let err = caller_commands(sql).expect_err(sql);
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{sql}");
            assert!(err.to_string().contains("refused"), "{sql}: {err}");
        }
        let allowed = [
            ("SET LOCAL statement_timeout = '5ms'", vec![]),
            ("set local role other", vec![]),
            ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", vec![]),
            ("SET CONSTRAINTS ALL DEFERRED", vec![]),
            ("ROLLBACK TO s", vec![RollbackTo("s".into())]),
            (
                "rollback transaction to savepoint s",
                vec![RollbackTo("s".into())],
            ),
            ("SELECT 'COMMIT'", vec![]),
            ("/* COMMIT */ SELECT 1", vec![]),
            ("SELECT $$; COMMIT$$", vec![]),
            ("UPDATE t SET ended = true", vec![]),
            ("UPDATE t SET \"end\" = 1", vec![]),
            ("SELECT 1 -- ; COMMIT", vec![]),
            ("DO $$ BEGIN PERFORM 1; END $$", vec![]),
            ("RESET statement_timeout", vec![]),
            ("\"commit\"", vec![]),
            ("committed", vec![]),
            (
                "SAVEPOINT a; UPDATE t SET a = 1",
                vec![Savepoint("a".into())],
            ),
        ];
        for (sql, want) in allowed {
            let read = caller_commands(sql).expect(sql);
            assert_eq!(read.savepoints, want, "{sql}");
            assert!(!read.changes_session, "{sql}");
        }
        let long = format!("SET application_name = '{}'", "x".repeat(100));
        let err = caller_commands(&long).unwrap_err().to_string();
        assert!(err.contains("…` is refused"), "{err}");
    }

    #[test]
    fn statements_that_leave_state_in_the_session_are_told_apart() {
        let lasting = [
            "LISTEN jobs",
            "prepare p (int) AS SELECT $1",
            "DEALLOCATE ALL",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "declare c no scroll cursor with hold for select 1",
            "CREATE TEMP TABLE t (x int)",
            "CREATE TEMPORARY TABLE t (x int) ON COMMIT DELETE ROWS",
            "create local temporary table t as select 1",
            "CREATE TEMP VIEW v AS SELECT 1",
            "CREATE TEMP SEQUENCE s",
            "LOAD 'auto_explain'",
            "SELECT 1; LISTEN jobs",
            "SELECT pg_advisory_lock(42)",
            "select PG_TRY_ADVISORY_LOCK_SHARED(1, 2)",
            "SELECT pg_advisory_lock ($1), 1",
            "SELECT set_config('application_name', 'x', false)",
            "SELECT set_config('a.b', lower('X'), $3)",
            "SELECT set_config('a.b', 'x', true OR false)",
        ];
        for sql in lasting {
            assert!(caller_commands(sql).expect(sql).changes_session, "{sql}");
        }
        let ending = [
            "CREATE TEMP TABLE t (x int) ON COMMIT DROP",
            "CREATE TABLE temp (x int)",
            "CREATE TABLE t (temp int)",
            "DECLARE c CURSOR FOR SELECT 'WITH HOLD'",
            "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
            "DECLARE c CURSOR FOR SELECT * FROM t WITH HOLD",
            "SELECT 'LISTEN x'",
            "UNLISTEN *",
            "PREPARE TRANSACTION 'x'",
            "SELECT pg_advisory_xact_lock(42)",
            "SELECT pg_advisory_unlock(42)",
            "SELECT 'pg_advisory_lock(1)'",
            "SELECT \"pg_advisory_lock\" FROM t",
            "SELECT set_config('app.user', $1, true)",
            "SELECT set_config('app.user', coalesce($1, 'x'), TRUE)",
            "SELECT current_setting('a.b') -- set_config('a', 'b', false)",
        ];
        for sql in ending {
            let read = caller_commands(sql);
            assert!(!read.is_ok_and(|r| r.changes_session), "{sql}");
        }
    }
}
