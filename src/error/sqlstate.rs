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

#[cfg(test)]
mod tests {
    use super::*;

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
