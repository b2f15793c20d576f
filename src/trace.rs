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

/// A locked call's measurements, recorded on its span (the current one, from
/// [`locked_call`]) once, when the call ends: a field recorded twice is printed twice by some
/// subscribers (tracing-subscriber's `fmt` appends), so each attempt overwrites these values
/// instead of the span's. Does nothing for calls without a span.
#[derive(Default)]
pub(crate) struct Recorder {
    #[cfg(feature = "tracing")]
    on: bool,
    #[cfg(feature = "tracing")]
    attempts: u32,
    #[cfg(feature = "tracing")]
    lock_wait_ms: Option<f64>,
    #[cfg(feature = "tracing")]
    hold_ms: Option<f64>,
}

impl Recorder {
    #[inline]
    pub(crate) fn new(on: bool) -> Self {
        #[cfg(feature = "tracing")]
        {
            Recorder {
                on,
                ..Recorder::default()
            }
        }
        #[cfg(not(feature = "tracing"))]
        {
            let _ = on;
            Recorder {}
        }
    }

    /// A new attempt (1-based): the previous one's times are dropped.
    #[inline]
    pub(crate) fn attempt(&mut self, n: u32) {
        #[cfg(feature = "tracing")]
        {
            self.attempts = n;
            self.lock_wait_ms = None;
            self.hold_ms = None;
        }
        #[cfg(not(feature = "tracing"))]
        let _ = n;
    }

    /// How long the lock step took (waiting included), since `started`.
    #[inline]
    pub(crate) fn lock_wait(&mut self, started: Mark) {
        #[cfg(feature = "tracing")]
        if self.on {
            self.lock_wait_ms = Some(started.elapsed_ms());
        }
        #[cfg(not(feature = "tracing"))]
        let _ = started;
    }

    /// How long the lock was held (closure and commit or rollback), since `locked`.
    #[inline]
    pub(crate) fn hold(&mut self, locked: Mark) {
        #[cfg(feature = "tracing")]
        if self.on {
            self.hold_ms = Some(locked.elapsed_ms());
        }
        #[cfg(not(feature = "tracing"))]
        let _ = locked;
    }

    /// Records the number of attempts, the last attempt's lock wait and hold time, and the
    /// call's outcome (`done`, `not_found`, `skipped`, `lock_not_available`, `lock_timeout`,
    /// `empty`, `error`).
    #[inline]
    pub(crate) fn finish(&self, outcome: &'static str) {
        #[cfg(feature = "tracing")]
        if self.on {
            let span = tracing::Span::current();
            span.record("attempts", self.attempts);
            if let Some(ms) = self.lock_wait_ms {
                span.record("lock_wait_ms", ms);
            }
            if let Some(ms) = self.hold_ms {
                span.record("hold_ms", ms);
            }
            span.record("outcome", outcome);
        }
        #[cfg(not(feature = "tracing"))]
        let _ = outcome;
    }
}
