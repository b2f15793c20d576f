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

/// Runs `call_future` inside a `rowlock.locked_call` span naming the call and its table, or
/// as it is when `call` is `None` (calls without a span of their own). A plain function, not
/// an `async fn`, so the call's future is not copied into a wrapper of its own.
#[inline]
pub(crate) fn locked_call<F: Future>(
    call: Option<(&'static str, &str)>,
    call_future: F,
) -> impl Future<Output = F::Output> {
    #[cfg(feature = "tracing")]
    {
        use futures_util::future::Either;
        use tracing::Instrument as _;
        match call {
            Some((call, table)) => {
                let span = tracing::info_span!(
                    "rowlock.locked_call",
                    call,
                    table,
                    attempts = tracing::field::Empty,
                    lock_wait_ms = tracing::field::Empty,
                    hold_ms = tracing::field::Empty,
                    outcome = tracing::field::Empty,
                );
                Either::Left(call_future.instrument(span))
            }
            None => Either::Right(call_future),
        }
    }
    #[cfg(not(feature = "tracing"))]
    {
        let _ = call;
        call_future
    }
}

/// Records a locked call's fields on the current span (the call's own, from
/// [`locked_call`]); does nothing for calls without a span.
#[derive(Clone, Copy)]
pub(crate) struct Recorder {
    #[cfg(feature = "tracing")]
    on: bool,
}

impl Recorder {
    #[inline]
    pub(crate) fn new(on: bool) -> Self {
        #[cfg(not(feature = "tracing"))]
        let _ = on;
        Recorder {
            #[cfg(feature = "tracing")]
            on,
        }
    }

    /// Records the attempt number (1-based).
    #[inline]
    pub(crate) fn attempt(self, n: u32) {
        #[cfg(feature = "tracing")]
        if self.on {
            tracing::Span::current().record("attempts", n);
        }
        #[cfg(not(feature = "tracing"))]
        let _ = n;
    }

    /// Records how long the lock step took (waiting included), since `started`.
    #[inline]
    pub(crate) fn lock_wait(self, started: Mark) {
        #[cfg(feature = "tracing")]
        if self.on {
            tracing::Span::current().record("lock_wait_ms", started.elapsed_ms());
        }
        #[cfg(not(feature = "tracing"))]
        let _ = started;
    }

    /// Records how long the lock was held (closure and commit or rollback), since `locked`.
    #[inline]
    pub(crate) fn hold(self, locked: Mark) {
        #[cfg(feature = "tracing")]
        if self.on {
            tracing::Span::current().record("hold_ms", locked.elapsed_ms());
        }
        #[cfg(not(feature = "tracing"))]
        let _ = locked;
    }

    /// Records the call's outcome (`done`, `not_found`, `skipped`, `lock_not_available`,
    /// `lock_timeout`, `empty`, `error`).
    #[inline]
    pub(crate) fn outcome(self, label: &'static str) {
        #[cfg(feature = "tracing")]
        if self.on {
            tracing::Span::current().record("outcome", label);
        }
        #[cfg(not(feature = "tracing"))]
        let _ = label;
    }
}
