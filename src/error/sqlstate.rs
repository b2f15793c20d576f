//! The one place where SQLSTATEs (and driver errors) are classified into [`ErrorKind`]s: pure
//! functions, unit-tested without a server.

use std::error::Error as StdError;

use tokio_postgres::error::SqlState;

use super::ErrorKind;

/// Maps a driver error to a kind. The only place in the crate that looks at SQLSTATEs.
pub(crate) fn classify(e: &tokio_postgres::Error) -> ErrorKind {
    if let Some(db) = e.as_db_error() {
        return classify_db(db.code(), db.routine());
    }
    if e.is_closed() {
        return ErrorKind::Closed;
    }
    let mut source = e.source();
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return ErrorKind::Closed;
        }
        source = s.source();
    }
    ErrorKind::Driver
}

/// `routine` tells the two causes of `55P03` apart: PostgreSQL raises the lock-timeout error
/// from `ProcessInterrupts` (the interrupt handler), while `NOWAIT` failures come from the
/// lock manager's callers. The routine is the server's C function name, not translated text.
pub(crate) fn classify_db(code: &SqlState, routine: Option<&str>) -> ErrorKind {
    let c = code.code();
    if *code == SqlState::T_R_SERIALIZATION_FAILURE {
        ErrorKind::SerializationFailure
    } else if *code == SqlState::T_R_DEADLOCK_DETECTED {
        ErrorKind::Deadlock
    } else if *code == SqlState::LOCK_NOT_AVAILABLE {
        if routine == Some("ProcessInterrupts") {
            ErrorKind::LockTimeout
        } else {
            ErrorKind::LockNotAvailable
        }
    } else if *code == SqlState::QUERY_CANCELED {
        ErrorKind::StatementTimeout
    } else if *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT {
        ErrorKind::IdleInTransactionTimeout
    } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
        ErrorKind::ReadOnly
    } else if *code == SqlState::IN_FAILED_SQL_TRANSACTION {
        ErrorKind::TransactionAborted
    } else if c.starts_with("08")
        || *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
    {
        ErrorKind::Closed
    } else {
        ErrorKind::Db
    }
}

/// Whether a failure of this kind leaves nothing committed and may not recur on a fresh
/// attempt with a fresh connection: the one rule behind [`Error::is_retryable`] and
/// [`RetryPolicy::retries`](crate::RetryPolicy::retries).
pub(crate) fn retryable(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::SerializationFailure
            | ErrorKind::Deadlock
            | ErrorKind::ReadOnly
            | ErrorKind::Closed
            | ErrorKind::Unreachable
    )
}

/// What a failure to connect means, from the SQLSTATE the server sent (if it answered) and
/// the driver's cause: an I/O error before any answer is [`ErrorKind::Unreachable`].
pub(crate) fn connect_kind(e: &tokio_postgres::Error) -> ErrorKind {
    let io = || {
        StdError::source(e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some()
    };
    match e.code() {
        Some(c)
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            ErrorKind::AuthenticationFailed
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => ErrorKind::UnknownDatabase,
        Some(c) if classify_db(c, None) == ErrorKind::Closed => ErrorKind::Unreachable,
        Some(_) => ErrorKind::Pool,
        None if e.is_closed() => ErrorKind::Closed,
        None if io() => ErrorKind::Unreachable,
        None => ErrorKind::Pool,
    }
}

/// Why the server refused a statement rowlock rendered from the caller's input, before it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `42703`: a column the table does not have.
    UndefinedColumn,
    /// `42883` (no operator for the value's type) or `22P02` (a value that does not read as
    /// the column's type).
    ValueMisfit,
}

/// What a SQLSTATE says about a statement built from the caller's input, if it is a refusal.
pub(crate) fn refusal(state: Option<&SqlState>) -> Option<Refusal> {
    match state? {
        s if *s == SqlState::UNDEFINED_COLUMN => Some(Refusal::UndefinedColumn),
        s if *s == SqlState::UNDEFINED_FUNCTION || *s == SqlState::INVALID_TEXT_REPRESENTATION => {
            Some(Refusal::ValueMisfit)
        }
        _ => None,
    }
}

/// A statement prepared on this connection that no longer serves, which preparing it again
/// cures: `0A000` "cached plan must not change result type", raised by the server's plan
/// cache (told apart from other `0A000`s by the routine, the server's C function name, not
/// text), or `26000` "prepared statement … does not exist" (the connection's statements were
/// deallocated: `DISCARD ALL` or `DEALLOCATE ALL`, say as a pool's recycling query).
pub(crate) fn is_stale_plan(db: &tokio_postgres::error::DbError) -> bool {
    (*db.code() == SqlState::FEATURE_NOT_SUPPORTED && db.routine() == Some("RevalidateCachedQuery"))
        || is_deallocated(db)
}

/// `26000` "prepared statement … does not exist".
pub(crate) fn is_deallocated(db: &tokio_postgres::error::DbError) -> bool {
    *db.code() == SqlState::INVALID_SQL_STATEMENT_NAME
}

/// A failure after which the parameter types learned for a statement may be what is wrong,
/// not the data it ran on: class `42` (syntax error or access rule violation: a column's,
/// type's or operator's types no longer fit what was learned; an array or composite value
/// naming an element type that was dropped and created again is `42804`).
pub(crate) fn may_be_stale_types(code: &SqlState) -> bool {
    code.code().starts_with("42")
}

/// `25P01` "… can only be used in transaction blocks": the session was outside a transaction
/// block where rowlock's guard expected its transaction.
pub(crate) fn is_no_transaction(db: &tokio_postgres::error::DbError) -> bool {
    *db.code() == SqlState::NO_ACTIVE_SQL_TRANSACTION
}

/// `57014`: a statement was cancelled (by a cancel request, or `statement_timeout`).
pub(crate) fn is_cancel(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::QUERY_CANCELED)
}

/// `22023` from `pg_xact_status`: "transaction ID … is in the future", the server never
/// assigned it.
pub(crate) fn is_future_transaction(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::INVALID_PARAMETER_VALUE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_types_are_suspected_after_class_42_errors() {
        for code in [
            SqlState::UNDEFINED_FUNCTION,
            SqlState::DATATYPE_MISMATCH,
            SqlState::UNDEFINED_COLUMN,
            SqlState::SYNTAX_ERROR,
        ] {
            assert!(may_be_stale_types(&code), "{code:?}");
        }
        for code in [
            SqlState::UNIQUE_VIOLATION,
            SqlState::INVALID_TEXT_REPRESENTATION,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::FEATURE_NOT_SUPPORTED,
            SqlState::INTERNAL_ERROR,
        ] {
            assert!(!may_be_stale_types(&code), "{code:?}");
        }
    }

    #[test]
    fn sqlstates_map_to_kinds() {
        let cases = [
            (
                SqlState::T_R_SERIALIZATION_FAILURE,
                None,
                ErrorKind::SerializationFailure,
            ),
            (SqlState::T_R_DEADLOCK_DETECTED, None, ErrorKind::Deadlock),
            (
                SqlState::READ_ONLY_SQL_TRANSACTION,
                None,
                ErrorKind::ReadOnly,
            ),
            (
                SqlState::LOCK_NOT_AVAILABLE,
                Some("heap_lock_tuple"),
                ErrorKind::LockNotAvailable,
            ),
            (
                SqlState::LOCK_NOT_AVAILABLE,
                Some("ProcessInterrupts"),
                ErrorKind::LockTimeout,
            ),
            (SqlState::QUERY_CANCELED, None, ErrorKind::StatementTimeout),
            (
                SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                None,
                ErrorKind::IdleInTransactionTimeout,
            ),
            (
                SqlState::IN_FAILED_SQL_TRANSACTION,
                None,
                ErrorKind::TransactionAborted,
            ),
            (SqlState::CONNECTION_FAILURE, None, ErrorKind::Closed),
            (SqlState::ADMIN_SHUTDOWN, None, ErrorKind::Closed),
            (SqlState::UNIQUE_VIOLATION, None, ErrorKind::Db),
        ];
        for (state, routine, kind) in cases {
            assert_eq!(classify_db(&state, routine), kind, "{}", state.code());
        }
    }
}
