//! What the transaction guard knows about the server's side of its transaction, as a small
//! state machine: each method is one transition, so impossible combinations (an aborted
//! transaction that was never begun, a lost connection with a pending `BEGIN`) cannot be
//! written. Pure: no I/O here, unit-tested below.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Instant;

use tokio_postgres::Statement;
use tokio_postgres::error::SqlState;

use crate::error::ErrorKind;
use crate::flush::Writes;
use crate::sql_text::SavepointCommand;

/// Where the transaction stands on the server.
#[derive(Debug)]
pub(super) enum Phase {
    /// Nothing sent yet: `BEGIN …` (with its `SET LOCAL`s) leaves with the first request.
    NotBegun { begin: Cow<'static, str> },
    /// `BEGIN` was sent: the server has a transaction open.
    Open {
        /// The first error that aborted the transaction on the server.
        aborted: Option<Failure>,
        /// What the guard may have missed.
        blind: Blind,
    },
    /// The connection is gone; the server rolled back.
    Broken,
}

/// What the guard may not have seen of an open transaction, least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Blind {
    /// Every request's reply was seen.
    No,
    /// The caller used the raw client, whose errors the guard does not see.
    RawClient,
    /// A request was dropped before its reply arrived: it may still be running.
    InFlight,
}

/// The root cause of an aborted transaction.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Failure {
    pub(super) kind: ErrorKind,
    pub(super) sql_state: Option<SqlState>,
    /// A statement prepared on the connection that no longer served
    /// ([`Error::is_stale_plan`](crate::Error)): a fresh attempt cures it.
    pub(super) stale: bool,
}

/// The connection is gone (returned by [`State::start_request`]).
#[derive(Debug)]
pub(super) struct Lost;

/// How a transaction that is not committed must be ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// Nothing was sent: the connection is clean and goes back to the pool.
    Release,
    /// The connection is gone: close it.
    Discard,
    /// `ROLLBACK`; with `cancel_first`, a request may still run: cancel it first and close
    /// the connection afterwards.
    Rollback { cancel_first: bool },
}

/// Simple statements that go out in the same flush as the next request, ahead of it: `BEGIN`
/// (when the transaction has not begun), and queued `SET LOCAL` and savepoint commands.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Prelude {
    /// One simple-query string, `;`-separated.
    pub(super) sql: Cow<'static, str>,
    /// It starts with `BEGIN`.
    pub(super) begins: bool,
}

/// An open savepoint, innermost last.
#[derive(Debug)]
struct OpenSavepoint {
    /// The name as the server folds it.
    name: String,
    /// rowlock's own savepoint (`rowlock_sp_<id>`), or `None` for one the caller opened
    /// with SQL.
    id: Option<u32>,
    /// How many writes were queued when it opened: rolling back to it drops those queued
    /// after, as the server undoes the statements sent after it.
    writes: usize,
}

/// Why a savepoint could not be opened.
#[derive(Debug, PartialEq)]
pub(super) enum NoSavepoint {
    /// The connection is gone.
    Lost,
    /// An earlier statement aborted the transaction; the root cause.
    Aborted(Failure),
}

/// What [`commit`](super::Transaction::commit) must do.
#[derive(Debug)]
pub(super) enum CommitPlan {
    /// The connection was lost earlier: nothing to send, nothing committed.
    Lost,
    /// The server closed the connection before `COMMIT` could leave.
    ClosedByServer,
    /// An earlier statement aborted the transaction: roll back, report this root cause.
    Aborted(Failure),
    /// Nothing was ever sent or queued: there is nothing to commit.
    Nothing,
    /// Send `[BEGIN and queued statements] [queued writes…] [probe;] COMMIT` in one flush.
    Send {
        prelude: Option<Prelude>,
        writes: Writes,
        /// Errors may have gone unseen: a probe in the `COMMIT` string checks the state.
        verify: bool,
        /// Close the connection afterwards instead of returning it to the pool.
        close: bool,
    },
}

/// The guard's mutable state, behind one mutex in [`Transaction`](super::Transaction).
pub(super) struct State {
    phase: Phase,
    /// Writes to send in the same flush as `COMMIT`.
    writes: Writes,
    /// The statements this transaction prepared ([`StatementCache::Transaction`]), closed
    /// before the transaction ends.
    ///
    /// [`StatementCache::Transaction`]: crate::StatementCache::Transaction
    statements: HashMap<String, Statement>,
    /// When the last request finished (tracked only with an idle timeout).
    idle_since: Option<Instant>,
    /// Statements to send ahead of the next request (after `BEGIN`, if that is pending).
    queued: Vec<String>,
    /// Open savepoints, innermost last.
    savepoints: Vec<OpenSavepoint>,
    /// The id of the next savepoint rowlock opens (`rowlock_sp_<id>`).
    next_savepoint: u32,
    /// Close the connection at the end instead of returning it to the pool: the server
    /// refused a write as read-only (`25006`: a standby now, after a failover), or the
    /// caller's SQL left state in the session ([`crate::sql_text::Read`]).
    close_at_end: bool,
}

fn savepoint_name(id: u32) -> String {
    format!("rowlock_sp_{id}")
}

impl State {
    pub(super) fn new(begin: Cow<'static, str>, writes: Writes) -> Self {
        State {
            phase: Phase::NotBegun { begin },
            writes,
            statements: HashMap::new(),
            idle_since: None,
            queued: Vec::new(),
            savepoints: Vec::new(),
            next_savepoint: 1,
            close_at_end: false,
        }
    }

    pub(super) fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Before a request: what must go out ahead of it in the same flush (`BEGIN`, from here
    /// on the transaction is open, and queued statements), or [`Lost`] if the connection is
    /// gone.
    pub(super) fn start_request(&mut self) -> Result<Option<Prelude>, Lost> {
        let begin = match &mut self.phase {
            Phase::Broken => return Err(Lost),
            Phase::Open { .. } => None,
            Phase::NotBegun { begin } => {
                let begin = std::mem::take(begin);
                self.phase = Phase::Open {
                    aborted: None,
                    blind: Blind::No,
                };
                Some(begin)
            }
        };
        Ok(self.prelude(begin))
    }

    /// `begin` followed by the queued statements, as one string.
    fn prelude(&mut self, begin: Option<Cow<'static, str>>) -> Option<Prelude> {
        let begins = begin.is_some();
        if self.queued.is_empty() {
            // The common case: `BEGIN` alone, or nothing.
            return begin.map(|sql| Prelude { sql, begins });
        }
        let mut parts = begin
            .into_iter()
            .chain(self.queued.drain(..).map(Cow::Owned));
        let mut sql = parts.next()?;
        for part in parts {
            let joined = sql.to_mut();
            joined.push_str("; ");
            joined.push_str(&part);
        }
        Some(Prelude { sql, begins })
    }

    /// Queues a simple statement (`SET LOCAL …`) to go ahead of the next request.
    pub(super) fn queue_statement(&mut self, sql: String) {
        self.queued.push(sql);
    }

    /// Opens a savepoint: `SAVEPOINT` is queued to go ahead of the next request. Refused in
    /// an aborted transaction (the server would refuse it too) and on a lost connection.
    pub(super) fn open_savepoint(&mut self) -> Result<u32, NoSavepoint> {
        match &self.phase {
            Phase::Broken => return Err(NoSavepoint::Lost),
            Phase::Open {
                aborted: Some(root),
                ..
            } => return Err(NoSavepoint::Aborted(root.clone())),
            _ => {}
        }
        let id = self.next_savepoint;
        self.next_savepoint += 1;
        let name = savepoint_name(id);
        self.queued.push(format!("SAVEPOINT {name}"));
        self.push_savepoint(name, Some(id));
        Ok(id)
    }

    /// Opens savepoint `name` on the stack, marking how many writes are queued so far.
    fn push_savepoint(&mut self, name: String, id: Option<u32>) {
        let writes = self.writes.len();
        self.savepoints.push(OpenSavepoint { name, id, writes });
    }

    /// Drops the writes queued since the savepoint at `at` opened (it is being rolled back).
    fn drop_writes_after(&mut self, at: usize) {
        self.writes.truncate(self.savepoints[at].writes);
    }

    /// Where rowlock's savepoint `id` is on the stack, if still open (releasing or rolling
    /// back to an outer savepoint also ends the inner ones).
    fn position(&self, id: u32) -> Option<usize> {
        self.savepoints.iter().rposition(|s| s.id == Some(id))
    }

    /// If `SAVEPOINT name` is the last queued statement, nothing was sent inside the
    /// savepoint: drop both instead of sending an empty savepoint and its end.
    fn unqueue_empty(&mut self, name: &str) -> bool {
        let empty = self
            .queued
            .last()
            .is_some_and(|q| q.strip_prefix("SAVEPOINT ") == Some(name));
        if empty {
            self.queued.pop();
        }
        empty
    }

    /// Releases savepoint `id` (and any inside it), keeping their work: `RELEASE` is queued.
    /// Returns the root cause instead, leaving the savepoint open, if the transaction was
    /// aborted inside it.
    pub(super) fn release_savepoint(&mut self, id: u32) -> Result<(), Failure> {
        let Some(at) = self.position(id) else {
            return Ok(());
        };
        if let Some(root) = self.aborted() {
            return Err(root.clone());
        }
        let name = self.savepoints[at].name.clone();
        self.savepoints.truncate(at);
        if !self.unqueue_empty(&name) {
            self.queued.push(format!("RELEASE SAVEPOINT {name}"));
        }
        Ok(())
    }

    /// Rolls back to savepoint `id` and ends it: `ROLLBACK TO` and `RELEASE` are queued, the
    /// writes queued inside it are dropped, and the transaction is healthy again (a savepoint
    /// is only opened in a healthy one).
    pub(super) fn rollback_to_savepoint(&mut self, id: u32) {
        let Some(at) = self.position(id) else {
            return;
        };
        let name = self.savepoints[at].name.clone();
        self.drop_writes_after(at);
        self.savepoints.truncate(at);
        if !self.unqueue_empty(&name) {
            self.queued.push(format!(
                "ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}"
            ));
        }
        self.recovered();
    }

    /// Closes the connection when the transaction ends, whether it commits or not.
    pub(super) fn close_at_end(&mut self) {
        self.close_at_end = true;
    }

    /// The caller's own savepoint command succeeded on the server.
    pub(super) fn observe(&mut self, command: SavepointCommand) {
        match command {
            SavepointCommand::Savepoint(name) => self.push_savepoint(name, None),
            SavepointCommand::Release(name) => {
                if let Some(at) = self.savepoints.iter().rposition(|s| s.name == name) {
                    self.savepoints.truncate(at);
                }
            }
            SavepointCommand::RollbackTo(name) => {
                if let Some(at) = self.savepoints.iter().rposition(|s| s.name == name) {
                    self.drop_writes_after(at);
                    self.savepoints.truncate(at + 1);
                }
                // The server accepted it: the transaction is healthy again, whichever
                // savepoint it was.
                self.recovered();
            }
        }
    }

    fn recovered(&mut self) {
        if let Phase::Open { aborted, .. } = &mut self.phase {
            *aborted = None;
        }
    }

    fn see_less(&mut self, less: Blind) {
        if let Phase::Open { blind, .. } = &mut self.phase {
            *blind = (*blind).max(less);
        }
    }

    /// A request was dropped before its reply arrived.
    pub(super) fn request_dropped(&mut self) {
        self.see_less(Blind::InFlight);
    }

    /// The caller took the raw client.
    pub(super) fn used_raw_client(&mut self) {
        self.see_less(Blind::RawClient);
    }

    /// A request finished (for the idle-in-transaction clock).
    pub(super) fn request_done(&mut self, now: Instant) {
        self.idle_since = Some(now);
    }

    pub(super) fn idle_since(&self) -> Option<Instant> {
        self.idle_since
    }

    /// Notes what a request's error means for the transaction. Returns the root cause's
    /// SQLSTATE when the error only echoes an earlier failure (`25P02`), so the caller can
    /// report the cause instead.
    pub(super) fn record(
        &mut self,
        kind: ErrorKind,
        sql_state: Option<&SqlState>,
        stale: bool,
    ) -> Option<Option<SqlState>> {
        match kind {
            ErrorKind::Closed | ErrorKind::IdleInTransactionTimeout => {
                self.phase = Phase::Broken;
                None
            }
            // Driver-side errors (a parameter that does not serialize…) happen before
            // anything is sent; the server's transaction is unaffected.
            ErrorKind::Driver | ErrorKind::Decode => None,
            kind => {
                if kind == ErrorKind::ReadOnly {
                    self.close_at_end = true;
                }
                let Phase::Open { aborted, .. } = &mut self.phase else {
                    return None;
                };
                match aborted {
                    Some(root) if kind == ErrorKind::TransactionAborted => {
                        Some(root.sql_state.clone())
                    }
                    // The first real cause stays the root.
                    Some(root) if root.kind != ErrorKind::TransactionAborted => None,
                    _ => {
                        *aborted = Some(Failure {
                            kind,
                            sql_state: sql_state.cloned(),
                            stale,
                        });
                        None
                    }
                }
            }
        }
    }

    /// The root cause of an abort, if the server aborted the transaction.
    pub(super) fn aborted(&self) -> Option<&Failure> {
        match &self.phase {
            Phase::Open { aborted, .. } => aborted.as_ref(),
            _ => None,
        }
    }

    pub(super) fn is_broken(&self) -> bool {
        matches!(self.phase, Phase::Broken)
    }

    /// How to end the transaction without committing. Drops the queued writes and
    /// statements.
    pub(super) fn ending(&mut self) -> Ending {
        self.writes.clear();
        self.queued.clear();
        if self.close_at_end {
            // Never reuse a connection to a server that refuses writes, or whose session the
            // caller changed; closing it rolls the transaction back.
            return Ending::Discard;
        }
        match self.phase {
            Phase::NotBegun { .. } => Ending::Release,
            Phase::Broken => Ending::Discard,
            Phase::Open { blind, .. } => Ending::Rollback {
                cancel_first: blind == Blind::InFlight,
            },
        }
    }

    /// Decides how to commit, taking the queued writes (and the `BEGIN` if it is still
    /// pending). `closed`: the driver already knows the connection is closed.
    pub(super) fn plan_commit(&mut self, closed: bool) -> CommitPlan {
        let writes = self.writes.take();
        match &mut self.phase {
            Phase::Broken => CommitPlan::Lost,
            _ if closed => CommitPlan::ClosedByServer,
            Phase::Open {
                aborted: Some(root),
                ..
            } => CommitPlan::Aborted(root.clone()),
            // Savepoint commands alone change nothing: nothing to commit.
            Phase::NotBegun { .. } if writes.is_empty() => CommitPlan::Nothing,
            Phase::NotBegun { begin } => {
                let begin = std::mem::take(begin);
                self.phase = Phase::Open {
                    aborted: None,
                    blind: Blind::No,
                };
                CommitPlan::Send {
                    prelude: self.prelude(Some(begin)),
                    writes,
                    verify: false,
                    close: self.close_at_end,
                }
            }
            Phase::Open {
                aborted: None,
                blind,
            } => {
                let verify = *blind != Blind::No;
                CommitPlan::Send {
                    prelude: self.prelude(None),
                    writes,
                    verify,
                    close: self.close_at_end,
                }
            }
        }
    }

    /// The writes queued for `COMMIT`.
    pub(super) fn writes(&mut self) -> &mut Writes {
        &mut self.writes
    }

    pub(super) fn queued(&self) -> usize {
        self.writes.len()
    }

    /// Takes the queued writes, if the transaction is healthy (for sending them ahead of
    /// `COMMIT`).
    pub(super) fn take_queued_if_healthy(&mut self) -> Writes {
        if self.aborted().is_some() || self.is_broken() {
            return Writes::default();
        }
        self.writes.take()
    }

    /// A statement this transaction prepared for `query`.
    pub(super) fn statement(&self, query: &str) -> Option<Statement> {
        self.statements.get(query).cloned()
    }

    pub(super) fn remember(&mut self, query: &str, statement: Statement) {
        self.statements.insert(query.to_owned(), statement);
    }

    /// This transaction's own prepared statements, to be closed.
    pub(super) fn take_statements(&mut self) -> HashMap<String, Statement> {
        std::mem::take(&mut self.statements)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> State {
        let mut st = State::new("BEGIN".into(), Writes::default());
        assert_eq!(st.start_request().unwrap().unwrap().sql, "BEGIN");
        st
    }

    #[test]
    fn begin_leaves_once_and_nothing_sent_means_nothing_to_end() {
        let mut st = State::new("BEGIN".into(), Writes::default());
        assert_eq!(st.ending(), Ending::Release);
        assert!(matches!(st.plan_commit(false), CommitPlan::Nothing));
        let mut st = open();
        assert_eq!(st.start_request().unwrap(), None, "BEGIN is sent once");
        assert_eq!(
            st.ending(),
            Ending::Rollback {
                cancel_first: false
            }
        );
    }

    #[test]
    fn the_first_real_error_is_the_root_cause() {
        let mut st = open();
        let serialization = SqlState::T_R_SERIALIZATION_FAILURE;
        assert_eq!(st.record(ErrorKind::Driver, None, false), None);
        assert_eq!(st.aborted(), None, "driver errors do not abort");
        assert_eq!(
            st.record(ErrorKind::SerializationFailure, Some(&serialization), false),
            None
        );
        // Later echoes (25P02) are answered with the root cause's state.
        assert_eq!(
            st.record(
                ErrorKind::TransactionAborted,
                Some(&SqlState::IN_FAILED_SQL_TRANSACTION),
                false
            ),
            Some(Some(serialization.clone()))
        );
        st.record(ErrorKind::Db, Some(&SqlState::UNIQUE_VIOLATION), false);
        let root = st.aborted().unwrap();
        assert_eq!(root.kind, ErrorKind::SerializationFailure);
        assert!(
            matches!(st.plan_commit(false), CommitPlan::Aborted(f) if f.sql_state == Some(serialization))
        );
    }

    #[test]
    fn an_echo_seen_first_is_replaced_by_a_real_cause() {
        let mut st = open();
        st.record(
            ErrorKind::TransactionAborted,
            Some(&SqlState::IN_FAILED_SQL_TRANSACTION),
            false,
        );
        st.record(
            ErrorKind::Deadlock,
            Some(&SqlState::T_R_DEADLOCK_DETECTED),
            false,
        );
        assert_eq!(st.aborted().unwrap().kind, ErrorKind::Deadlock);
    }

    #[test]
    fn a_lost_connection_wins_over_everything() {
        let mut st = open();
        st.record(ErrorKind::Db, Some(&SqlState::UNIQUE_VIOLATION), false);
        st.record(ErrorKind::Closed, None, false);
        assert!(st.is_broken());
        assert!(st.start_request().is_err());
        assert!(matches!(st.plan_commit(false), CommitPlan::Lost));
        assert_eq!(st.ending(), Ending::Discard);
    }

    #[test]
    fn blindness_only_grows_and_decides_probe_and_cancel() {
        let mut st = open();
        st.used_raw_client();
        assert!(matches!(
            st.plan_commit(false),
            CommitPlan::Send { verify: true, .. }
        ));
        let mut st = open();
        st.request_dropped();
        st.used_raw_client();
        assert_eq!(st.ending(), Ending::Rollback { cancel_first: true });
        let mut st = State::new("BEGIN".into(), Writes::default());
        st.request_dropped();
        assert_eq!(st.ending(), Ending::Release, "nothing was in flight yet");
    }

    #[test]
    fn a_connection_known_closed_is_reported_before_commit_leaves() {
        let mut st = State::new("BEGIN".into(), Writes::default());
        assert!(matches!(st.plan_commit(true), CommitPlan::ClosedByServer));
        let mut st = open();
        st.record(ErrorKind::Db, Some(&SqlState::UNIQUE_VIOLATION), false);
        assert!(matches!(st.plan_commit(true), CommitPlan::ClosedByServer));
    }

    #[test]
    fn a_savepoint_rides_with_the_next_request_and_recovers_the_transaction() {
        let mut st = State::new("BEGIN".into(), Writes::default());
        let outer = st.open_savepoint().unwrap();
        let inner = st.open_savepoint().unwrap();
        let prelude = st.start_request().unwrap().unwrap();
        assert_eq!(
            prelude,
            Prelude {
                sql: "BEGIN; SAVEPOINT rowlock_sp_1; SAVEPOINT rowlock_sp_2".into(),
                begins: true
            }
        );
        st.record(ErrorKind::Db, Some(&SqlState::UNIQUE_VIOLATION), false);
        assert!(matches!(st.open_savepoint(), Err(NoSavepoint::Aborted(_))));
        assert!(st.release_savepoint(inner).is_err(), "aborted inside");
        st.rollback_to_savepoint(inner);
        assert_eq!(st.aborted(), None, "healthy again");
        assert_eq!(
            st.start_request().unwrap().unwrap().sql,
            "ROLLBACK TO SAVEPOINT rowlock_sp_2; RELEASE SAVEPOINT rowlock_sp_2"
        );
        st.release_savepoint(outer).unwrap();
        assert!(matches!(
            st.plan_commit(false),
            CommitPlan::Send { prelude: Some(Prelude { ref sql, begins: false }), .. }
                if sql == "RELEASE SAVEPOINT rowlock_sp_1"
        ));
    }

    #[test]
    fn an_empty_savepoint_sends_nothing_and_an_outer_end_ends_the_inner() {
        let mut st = open();
        let sp = st.open_savepoint().unwrap();
        st.release_savepoint(sp).unwrap();
        let sp = st.open_savepoint().unwrap();
        st.rollback_to_savepoint(sp);
        assert_eq!(st.start_request().unwrap(), None);
        let outer = st.open_savepoint().unwrap();
        let inner = st.open_savepoint().unwrap();
        st.start_request().unwrap();
        st.release_savepoint(outer).unwrap();
        st.rollback_to_savepoint(inner); // already released with the outer one
        assert_eq!(
            st.start_request().unwrap().unwrap().sql,
            "RELEASE SAVEPOINT rowlock_sp_3"
        );
    }

    #[test]
    fn the_callers_own_savepoint_sql_recovers_the_transaction_too() {
        let mut st = open();
        st.observe(SavepointCommand::Savepoint("s".into()));
        st.record(ErrorKind::Db, Some(&SqlState::UNIQUE_VIOLATION), false);
        st.observe(SavepointCommand::RollbackTo("s".into()));
        assert_eq!(st.aborted(), None);
        st.observe(SavepointCommand::Release("s".into()));
        st.record(ErrorKind::Db, Some(&SqlState::UNIQUE_VIOLATION), false);
        assert!(matches!(st.plan_commit(false), CommitPlan::Aborted(_)));
    }
}
