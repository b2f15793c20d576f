//! Sending several requests in one flush.
//!
//! tokio-postgres writes a request to the connection when its future is first polled and
//! matches replies in order, so futures that are polled together share round trips. The
//! server runs them in the order they were sent, so that order must be the order of first
//! polls: `join_in_order` polls every future, every time, in index order (unlike fair joins
//! that rotate their starting point).

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::Poll;

pub(crate) type Request<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs the futures concurrently, first-polling them in index order; returns their outputs in
/// the same order.
pub(crate) async fn join_in_order<T>(mut futures: Vec<Request<'_, T>>) -> Vec<T> {
    let mut outputs: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(v) => *output = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn first_polls_happen_in_index_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut futures: Vec<Request<'_, usize>> = Vec::new();
        for i in 0..40 {
            let log = log.clone();
            futures.push(Box::pin(async move {
                log.lock().unwrap().push(i);
                // Yield a different number of times so completions interleave.
                for _ in 0..(40 - i) % 3 {
                    tokio::task::yield_now().await;
                }
                i * 2
            }));
        }
        let out = join_in_order(futures).await;
        assert_eq!(out, (0..40).map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(*log.lock().unwrap(), (0..40).collect::<Vec<_>>());
    }
}
