//! `tracing` spans for locked calls (feature `tracing`): one `rowlock.locked_call` span per
//! call, with the lock wait, the hold time, the outcome and the number of attempts. Without
//! the feature every helper here is an empty inline function.

use std::future::Future;

/// A point in time, taken only when spans are recorded.
#[derive(Clone, Copy)]
pub(crate) struct Mark(#[cfg(feature = "tracing")] std::time::Instant);

impl Mark {
    #[inline]
    pub(crate) fn now() -> Self {
        Mark(
            #[cfg(feature = "tracing")]
            std::time::Instant::now(),
        )
    }

    #[cfg(feature = "tracing")]
    fn elapsed_ms(self) -> f64 {
        self.0.elapsed().as_secs_f64() * 1000.0
    }
}

/// Runs `call` inside a `rowlock.locked_call` span naming the call and its table.
#[inline]
pub(crate) async fn locked_call<F: Future>(
    call: &'static str,
    table: &str,
    call_future: F,
) -> F::Output {
    #[cfg(feature = "tracing")]
    {
        use tracing::Instrument as _;
        let span = tracing::info_span!(
            "rowlock.locked_call",
            call,
            table,
            attempts = tracing::field::Empty,
            lock_wait_ms = tracing::field::Empty,
            hold_ms = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        call_future.instrument(span).await
    }
    #[cfg(not(feature = "tracing"))]
    {
        let _ = (call, table);
        call_future.await
    }
}

/// Records the attempt number (1-based) on the current call's span.
#[inline]
pub(crate) fn attempt(n: u32) {
    #[cfg(feature = "tracing")]
    tracing::Span::current().record("attempts", n);
    #[cfg(not(feature = "tracing"))]
    let _ = n;
}

/// Records how long the lock step took (waiting included), since `started`.
#[inline]
pub(crate) fn lock_wait(started: Mark) {
    #[cfg(feature = "tracing")]
    tracing::Span::current().record("lock_wait_ms", started.elapsed_ms());
    #[cfg(not(feature = "tracing"))]
    let _ = started;
}

/// Records how long the lock was held (closure and commit or rollback), since `locked`.
#[inline]
pub(crate) fn hold(locked: Mark) {
    #[cfg(feature = "tracing")]
    tracing::Span::current().record("hold_ms", locked.elapsed_ms());
    #[cfg(not(feature = "tracing"))]
    let _ = locked;
}

/// Records the call's outcome (`done`, `not_found`, `skipped`, `lock_not_available`,
/// `lock_timeout`, `empty`, `error`).
#[inline]
pub(crate) fn outcome(label: &'static str) {
    #[cfg(feature = "tracing")]
    tracing::Span::current().record("outcome", label);
    #[cfg(not(feature = "tracing"))]
    let _ = label;
}
