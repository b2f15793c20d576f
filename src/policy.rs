//! The retry schedule: which failures are retried, how many times, and the delays between
//! attempts. It knows nothing of transactions: the attempt loop ([`crate::attempt`]) asks it
//! whether a failure is retried and waits on its [`Backoff`].
//!
//! Each attempt runs the caller's closure again in a **new transaction** (never a savepoint
//! loop), so the decision that chose the writes is re-made on fresh data. Whether an attempt
//! is retried is decided from what the server did to the transaction, which rowlock tracks on
//! its own path: a closure that maps a `40001` into its own error, or ignores it and returns
//! `Ok`, is still known to have failed retryably, and the root cause is found even when a
//! pipelined statement reported `25P02` first.
//!
//! The delay schedule comes from [`backon`]'s exponential builder (well kept, seedable jitter,
//! and usable as a plain iterator, so the schedule is unit-tested without sleeping).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_postgres::error::SqlState;

use crate::error::{Error, ErrorKind};

/// When and how often to retry a transaction.
///
/// **Schedule.** Retry *n* (n = 1, 2, …) waits `dₙ·(1 + u)`, where
/// `dₙ = min(base_delay · factorⁿ⁻¹, max_delay)` and `u` is uniform in `[0, 1)` when jitter is
/// on (so between `dₙ` and `2·dₙ`), exactly `dₙ` when it is off. With the defaults (5 attempts,
/// base 5 ms, factor 2, cap 500 ms, jitter on) the four retries wait 5–10 ms, 10–20 ms,
/// 20–40 ms and 40–80 ms: database conflicts clear in milliseconds, not seconds.
///
/// **What is retried.** Serialization failures (`40001`) and deadlocks (`40P01`), including
/// when the closure swallowed them; a lost connection before `COMMIT` was sent (nothing was
/// committed); and, only with [`retry_lock_contention`](Self::retry_lock_contention),
/// lock-not-available and lock timeouts (`55P03`). Never: constraint violations, the caller's
/// own errors, [`ErrorKind::CommitOutcomeUnknown`] (the transaction may have committed), or
/// anything else.
///
/// **When attempts run out** (or the [`deadline`](Self::deadline) would pass during the next
/// delay): [`ErrorKind::RetriesExhausted`], with [`Error::attempts`], the last failure's
/// SQLSTATE, and the last failure as [`Error::last_attempt`] (printed by its `Display`).
///
/// Invalid settings (zero attempts, a factor below 1, a base delay above the cap, a zero
/// deadline) are refused with [`ErrorKind::InvalidArgument`] when the policy is used, before
/// any connection is taken.
///
/// ```
/// use std::time::Duration;
/// use rowlock::RetryPolicy;
///
/// let policy = RetryPolicy::new()
///     .max_attempts(4)
///     .base_delay(Duration::from_millis(10))
///     .jitter(false)
///     .on_retry(|event| eprintln!("retry {} after {:?}", event.attempt, event.delay));
/// let delays: Vec<_> = policy.delays().collect();
/// assert_eq!(delays, [10, 20, 40].map(Duration::from_millis));
/// ```
#[derive(Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    deadline: Option<Duration>,
    base_delay: Duration,
    max_delay: Duration,
    factor: f32,
    jitter: bool,
    seed: Option<u64>,
    retry_lock_contention: bool,
    on_retry: Option<RetryHook>,
}

type RetryHook = Arc<dyn Fn(&RetryEvent) + Send + Sync>;

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("deadline", &self.deadline)
            .field("base_delay", &self.base_delay)
            .field("max_delay", &self.max_delay)
            .field("factor", &self.factor)
            .field("jitter", &self.jitter)
            .field("seed", &self.seed)
            .field("retry_lock_contention", &self.retry_lock_contention)
            .field("on_retry", &self.on_retry.as_ref().map(|_| "callback"))
            .finish()
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            // Conflicts between a handful of transactions resolve in a few rounds; more
            // attempts mostly prolong an overload.
            max_attempts: 5,
            deadline: None,
            // About one short transaction's duration: long enough for the winner to commit.
            base_delay: Duration::from_millis(5),
            // Keeps a long conflict from stalling a request for seconds.
            max_delay: Duration::from_millis(500),
            factor: 2.0,
            // Spreads retrying transactions apart so they do not collide again in lockstep.
            jitter: true,
            seed: None,
            retry_lock_contention: false,
            on_retry: None,
        }
    }
}

/// What a retry hook is told before each retry.
#[derive(Debug, Clone)]
#[non_exhaustive] // more details (e.g. elapsed time) may be added.
pub struct RetryEvent {
    /// The attempt that just failed, counting from 1.
    pub attempt: u32,
    /// What made it fail.
    pub kind: ErrorKind,
    /// The failure's SQLSTATE, when the server sent one.
    pub sql_state: Option<SqlState>,
    /// How long rowlock waits before the next attempt.
    pub delay: Duration,
}

/// A number of attempts: the defaults with [`max_attempts`](RetryPolicy::max_attempts) set and
/// [`retry_lock_contention`](RetryPolicy::retry_lock_contention) on, so that
/// `Lock::no_wait().retry(3)` tries a busy row three times, as it reads.
impl From<u32> for RetryPolicy {
    fn from(max_attempts: u32) -> Self {
        RetryPolicy::new()
            .max_attempts(max_attempts)
            .retry_lock_contention(true)
    }
}

/// A copy of the policy (its hook is shared), so a policy kept in a variable can be passed as
/// `.retry(&policy)`.
impl From<&RetryPolicy> for RetryPolicy {
    fn from(policy: &RetryPolicy) -> Self {
        policy.clone()
    }
}

impl RetryPolicy {
    /// The defaults described on [`RetryPolicy`].
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// One attempt, no retry: what the non-retrying functions use.
    pub(crate) fn once() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Total attempts, the first included (1 means no retry). Defaults to 5.
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Stops retrying when the next delay would end later than this long after the first
    /// attempt started. Defaults to none.
    #[must_use]
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The delay before the first retry, before jitter. Defaults to 5 ms.
    #[must_use]
    pub fn base_delay(mut self, delay: Duration) -> Self {
        self.base_delay = delay;
        self
    }

    /// The cap on the delay before jitter. Defaults to 500 ms.
    #[must_use]
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// The growth factor between delays (at least 1). Defaults to 2.
    #[must_use]
    pub fn factor(mut self, factor: f32) -> Self {
        self.factor = factor;
        self
    }

    /// Random jitter: each delay is stretched by a factor uniform in `[1, 2)`. Defaults to on.
    #[must_use]
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// Seeds the jitter, for reproducible schedules in tests. Defaults to a random seed.
    #[must_use]
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Also retry lock-not-available and lock timeouts (`55P03`), e.g. to turn
    /// [`LockMode::NoWait`](crate::LockMode::NoWait) into "try a few times, then report busy".
    /// Defaults to off.
    #[must_use]
    pub fn retry_lock_contention(mut self, retry: bool) -> Self {
        self.retry_lock_contention = retry;
        self
    }

    /// Calls `hook` before each retry with the attempt number, the failure and the delay.
    /// With the `tracing` feature, each retry also emits a `tracing` event at INFO level.
    /// Defaults to none.
    #[must_use]
    pub fn on_retry(mut self, hook: impl Fn(&RetryEvent) + Send + Sync + 'static) -> Self {
        self.on_retry = Some(Arc::new(hook));
        self
    }

    /// Checks the settings without touching the database.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_attempts == 0 {
            return Err(Error::invalid("max_attempts must be at least 1"));
        }
        if !(self.factor >= 1.0 && self.factor.is_finite()) {
            return Err(Error::invalid(format!(
                "factor must be a finite number of at least 1 (got {})",
                self.factor
            )));
        }
        if self.base_delay > self.max_delay {
            return Err(Error::invalid(format!(
                "base_delay ({:?}) must not exceed max_delay ({:?})",
                self.base_delay, self.max_delay
            )));
        }
        if self.deadline == Some(Duration::ZERO) {
            return Err(Error::invalid("a deadline must be longer than zero"));
        }
        Ok(())
    }

    /// The delays this policy waits before retries 1, 2, … (at most `max_attempts - 1` of
    /// them), ignoring the deadline. With jitter and no seed, each call gives new draws.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + use<> {
        let mut builder = ExponentialBuilder::new()
            .with_min_delay(self.base_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.factor.max(1.0))
            .with_max_times(self.max_attempts.saturating_sub(1) as usize);
        if self.jitter {
            builder = builder.with_jitter();
        }
        if let Some(seed) = self.seed {
            builder = builder.with_jitter_seed(seed);
        }
        // backon scales in f32; round to whole microseconds so 10 ms · 2² is 40 ms, not
        // 39.999999 ms.
        builder
            .build()
            .map(|d| Duration::from_micros(((d.as_nanos() + 500) / 1000) as u64))
    }

    /// Whether this policy allows a second attempt at all.
    pub(crate) fn may_retry(&self) -> bool {
        self.max_attempts > 1
    }

    /// Whether this policy retries a failure: what [`Error::is_retryable`] says (serialization
    /// failures, deadlocks, a standby's `25006`, a connection lost before `COMMIT` or not made,
    /// also when they aborted the transaction), and lock contention
    /// ([`ErrorKind::LockNotAvailable`], [`ErrorKind::LockTimeout`]) when the policy asks for
    /// it.
    pub fn retries(&self, error: &Error) -> bool {
        match error.kind() {
            ErrorKind::LockNotAvailable | ErrorKind::LockTimeout => self.retry_lock_contention,
            _ => error.is_retryable(),
        }
    }
}

/// Counts attempts and waits between them, under a [`RetryPolicy`].
pub(crate) struct Backoff<'p> {
    policy: &'p RetryPolicy,
    /// Built at the first retry: a call that succeeds at once pays nothing for it.
    delays: Option<Box<dyn Iterator<Item = Duration> + Send>>,
    started: tokio::time::Instant,
    attempts: u32,
}

impl<'p> Backoff<'p> {
    /// Refuses an invalid policy before the first attempt.
    pub(crate) fn new(policy: &'p RetryPolicy) -> Result<Self, Error> {
        policy.validate()?;
        Ok(Backoff {
            policy,
            delays: None,
            started: tokio::time::Instant::now(),
            attempts: 0,
        })
    }

    /// The number of attempts that have failed so far.
    pub(crate) fn failed_attempts(&self) -> u32 {
        self.attempts
    }

    /// After a failed attempt: waits and returns `Ok` if another attempt should run, or the
    /// exhaustion error.
    pub(crate) async fn wait(&mut self, cause: Error) -> Result<(), Error> {
        self.attempts += 1;
        let delay = if self.attempts < self.policy.max_attempts {
            let policy = self.policy;
            self.delays
                .get_or_insert_with(|| Box::new(policy.delays()))
                .next()
        } else {
            None
        };
        let delay = delay.filter(|d| {
            self.policy
                .deadline
                .is_none_or(|deadline| self.started.elapsed() + *d <= deadline)
        });
        let Some(delay) = delay else {
            if self.policy.max_attempts == 1 {
                // No retry was ever on offer: report the failure itself.
                return Err(cause);
            }
            // The cause (the source) says how the last attempt failed; this error only says
            // that the policy gave up.
            return Err(Error::new(ErrorKind::RetriesExhausted)
                .with_attempts(self.attempts)
                .with_sql_state(cause.sql_state().cloned())
                .with_source(cause));
        };
        let event = RetryEvent {
            attempt: self.attempts,
            kind: cause.kind(),
            sql_state: cause.sql_state().cloned(),
            delay,
        };
        #[cfg(feature = "tracing")]
        tracing::info!(
            attempt = event.attempt,
            kind = %event.kind,
            sql_state = event.sql_state.as_ref().map(SqlState::code),
            delay_ms = delay.as_secs_f64() * 1000.0,
            "rowlock: retrying transaction"
        );
        if let Some(hook) = &self.policy.on_retry {
            hook(&event);
        }
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn failure_with(state: SqlState) -> Error {
        let kind = crate::error::classify_db(&state, None);
        Error::with_kind(kind, "fake").with_sql_state(Some(state))
    }

    #[test]
    fn the_policy_retries_what_the_error_calls_retryable() {
        use ErrorKind::*;
        let kinds = [
            InvalidArgument,
            PoolTimeout,
            Pool,
            Unreachable,
            AuthenticationFailed,
            UnknownDatabase,
            Closed,
            LockNotAvailable,
            LockTimeout,
            SerializationFailure,
            Deadlock,
            StatementTimeout,
            ReadOnly,
            IdleInTransactionTimeout,
            TransactionAborted,
            CommitOutcomeUnknown,
            KeyNotUnique,
            Decode,
            RowNotFound,
            RowSkipped,
            RetriesExhausted,
            Db,
            Driver,
        ];
        let policy = RetryPolicy::new();
        for kind in kinds {
            let e = Error::with_kind(kind, "x");
            assert_eq!(policy.retries(&e), e.is_retryable(), "{kind:?}");
        }
        for state in [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
        ] {
            let swallowed = Error::with_kind(TransactionAborted, "x").with_sql_state(Some(state));
            assert!(swallowed.is_retryable() && policy.retries(&swallowed));
        }
        assert!(!Error::with_kind(CommitOutcomeUnknown, "x").is_retryable());
        let contention = RetryPolicy::new().retry_lock_contention(true);
        assert!(contention.retries(&Error::with_kind(LockNotAvailable, "x")));
        assert!(!Error::with_kind(LockNotAvailable, "x").is_retryable());
    }

    #[test]
    fn schedule_without_jitter_doubles_up_to_the_cap() {
        let policy = RetryPolicy::new()
            .max_attempts(7)
            .base_delay(Duration::from_millis(5))
            .max_delay(Duration::from_millis(30))
            .jitter(false);
        let delays: Vec<u64> = policy.delays().map(|d| d.as_millis() as u64).collect();
        assert_eq!(
            delays,
            [5, 10, 20, 30, 30, 30],
            "max_attempts - 1 delays, capped"
        );
        let defaults: Vec<u64> = RetryPolicy::new()
            .jitter(false)
            .delays()
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(defaults, [5, 10, 20, 40], "the documented default schedule");
    }

    #[test]
    fn seeded_jitter_is_reproducible_and_stays_within_one_to_two_times() {
        let policy = RetryPolicy::new().max_attempts(8).jitter_seed(42);
        let a: Vec<Duration> = policy.delays().collect();
        let b: Vec<Duration> = policy.delays().collect();
        assert_eq!(a, b);
        let base: Vec<Duration> = policy.clone().jitter(false).delays().collect();
        for (d, base) in a.iter().zip(&base) {
            assert!(*d >= *base && *d < *base * 2, "{d:?} vs {base:?}");
        }
        let other: Vec<Duration> = policy.jitter_seed(7).delays().collect();
        assert_ne!(a, other);
    }

    #[test]
    fn invalid_policies_are_refused() {
        let bad = [
            RetryPolicy::new().max_attempts(0),
            RetryPolicy::new().factor(0.5),
            RetryPolicy::new().factor(f32::NAN),
            RetryPolicy::new().base_delay(Duration::from_secs(2)),
            RetryPolicy::new().deadline(Duration::ZERO),
        ];
        for policy in bad {
            assert!(
                policy.validate().unwrap_err().is_invalid_argument(),
                "{policy:?}"
            );
        }
        assert!(RetryPolicy::new().validate().is_ok());
    }

    #[test]
    fn what_is_retried() {
        let policy = RetryPolicy::new();
        assert!(policy.retries(&failure_with(SqlState::T_R_SERIALIZATION_FAILURE)));
        assert!(policy.retries(&failure_with(SqlState::T_R_DEADLOCK_DETECTED)));
        assert!(policy.retries(&Error::with_kind(ErrorKind::Closed, "lost")));
        let swallowed = Error::with_kind(ErrorKind::TransactionAborted, "x")
            .with_sql_state(Some(SqlState::T_R_SERIALIZATION_FAILURE));
        assert!(policy.retries(&swallowed));
        assert!(!policy.retries(&failure_with(SqlState::UNIQUE_VIOLATION)));
        assert!(!policy.retries(&failure_with(SqlState::LOCK_NOT_AVAILABLE)));
        assert!(!policy.retries(&Error::with_kind(ErrorKind::CommitOutcomeUnknown, "?")));
        assert!(!policy.retries(&Error::invalid("x")));
        let contention = RetryPolicy::new().retry_lock_contention(true);
        assert!(contention.retries(&failure_with(SqlState::LOCK_NOT_AVAILABLE)));
    }

    /// A fake operation that fails `n` times with `state`, driven through the real backoff
    /// on a paused clock (sleeps advance virtual time instantly), as the attempt loop drives
    /// it: a failure the policy does not retry is returned as it is.
    async fn fake(policy: &RetryPolicy, n: u32, state: SqlState) -> Result<u32, Error> {
        let mut backoff = Backoff::new(policy)?;
        let mut calls = 0;
        loop {
            calls += 1;
            if calls > n {
                return Ok(calls);
            }
            let failure = failure_with(state.clone());
            if !policy.retries(&failure) {
                return Err(failure);
            }
            backoff.wait(failure).await?;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fake_failures_are_retried_until_success_with_events() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let policy = RetryPolicy::new().jitter(false).on_retry(move |e| {
            seen.lock()
                .unwrap()
                .push((e.attempt, e.sql_state.clone(), e.delay))
        });
        let started = tokio::time::Instant::now();
        let calls = fake(&policy, 3, SqlState::T_R_DEADLOCK_DETECTED)
            .await
            .unwrap();
        assert_eq!(calls, 4);
        assert_eq!(started.elapsed(), Duration::from_millis(5 + 10 + 20));
        let events = events.lock().unwrap();
        let attempts: Vec<u32> = events.iter().map(|e| e.0).collect();
        assert_eq!(attempts, [1, 2, 3]);
        assert!(
            events
                .iter()
                .all(|e| e.1 == Some(SqlState::T_R_DEADLOCK_DETECTED))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn exhaustion_reports_attempts_and_keeps_the_last_cause() {
        let policy = RetryPolicy::new().max_attempts(3);
        let err = fake(&policy, 10, SqlState::T_R_SERIALIZATION_FAILURE)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::RetriesExhausted);
        assert_eq!(err.attempts(), Some(3));
        assert_eq!(err.sql_state(), Some(&SqlState::T_R_SERIALIZATION_FAILURE));
        let last = err.last_attempt().unwrap();
        assert_eq!(last.kind(), ErrorKind::SerializationFailure);
        assert!(
            err.to_string()
                .ends_with(&format!("; the last failed with: {last}"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_stops_retries_early() {
        let policy = RetryPolicy::new()
            .max_attempts(100)
            .jitter(false)
            .deadline(Duration::from_millis(12));
        let err = fake(&policy, 100, SqlState::T_R_SERIALIZATION_FAILURE)
            .await
            .unwrap_err();
        // Waits 5 ms, then the next 10 ms would end at 15 ms > 12 ms.
        assert_eq!(err.attempts(), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn non_retryable_failures_and_one_attempt_policies_return_the_cause() {
        let err = fake(&RetryPolicy::new(), 1, SqlState::UNIQUE_VIOLATION)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Db);
        let err = fake(&RetryPolicy::once(), 1, SqlState::T_R_SERIALIZATION_FAILURE)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::SerializationFailure, "not wrapped");
    }
}
