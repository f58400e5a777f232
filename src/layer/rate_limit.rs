//! The rate-limit layer: at most N handler starts a second, with a small burst.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::HandleError;
use crate::handler::{Context, Handler};
use crate::layer::Pass;
use crate::sync;

/// The burst, in seconds of the rate: a limit of N starts a second lets `ceil(N / 5)` (at
/// least 1) start at once after a quiet spell, a fifth of a second's worth.
pub const BURST_SECONDS: f64 = 0.2;

/// Starts the inner handler at most `per_second` times a second.
///
/// A token bucket in its "generic cell rate" form (GCRA): one instant, the theoretical
/// arrival time, says when the bucket is next empty. Each message reserves the next start
/// under a mutex held for a few arithmetic operations, then sleeps once, on an `async-io`
/// timer, until its start (a handler never blocks its thread, and waiters are not woken in a
/// herd to compete for a token). The burst is [`BURST_SECONDS`] of the rate: `ceil(N / 5)`
/// starts at once (at least 1), then one every `1/N` s. A message that waits holds its lease,
/// which the lease manager keeps extending. Each delayed start is counted in
/// [`Metrics::rate_limited`](crate::Metrics::rate_limited).
///
/// A message whose handler is dropped while it waits (a cancellation at shutdown) has used
/// its reserved start: the limit is never exceeded, only undershot by that one start.
///
/// ```
/// use std::sync::atomic::AtomicU32;
/// use std::time::{Duration, Instant};
/// use mayhem::layer::RateLimit;
/// use mayhem::{Context, HandleError, Handler, Metrics, PubSubMessage};
///
/// struct Accept;
/// impl Handler for Accept {
///     async fn handle(&self, _ctx: &Context<'_>) -> Result<(), HandleError> {
///         Ok(())
///     }
/// }
///
/// // 50 a second: a burst of 10, then one every 20 ms.
/// let handler = RateLimit::new(Accept, 50);
/// let (message, extended, metrics) = (PubSubMessage::random(&mut mayhem::Rng::with_seed(1)),
///     AtomicU32::new(0), Metrics::default());
/// let started = Instant::now();
/// for _ in 0..15 {
///     smol::block_on(handler.handle(&Context::new(&message, 1, &extended, &metrics))).unwrap();
/// }
/// // The 15th start comes 5 intervals after the burst: at least 100 ms in.
/// assert!(started.elapsed() >= Duration::from_millis(100));
/// // The starts after the burst waited (fewer only if the burst itself took 20 ms).
/// assert!((1..=5).contains(&metrics.rate_limited()));
/// ```
#[derive(Debug)]
pub struct RateLimit<H> {
    /// The handler whose starts are limited.
    inner: H,
    /// The limit; `None` passes every message straight through.
    cell: Option<Cell>,
}

/// The settings and state of one limit.
#[derive(Debug)]
struct Cell {
    /// Time between two starts at the steady rate.
    interval: Duration,
    /// How far ahead of the theoretical arrival time a start may come: `(burst − 1)`
    /// intervals.
    tolerance: Duration,
    /// The theoretical arrival time: when the bucket is empty again. A mutex, not an atomic:
    /// a reservation reads and writes it together, and it is held for a few operations.
    arrival: Mutex<Option<Instant>>,
}

impl<H> RateLimit<H> {
    /// `inner`, started at most `per_second` times a second (at least 1).
    pub fn new(inner: H, per_second: u32) -> Self {
        Self::optional(inner, Some(per_second))
    }

    /// `inner` with a limit only when `per_second` is `Some`: `None` passes every message
    /// straight through, which is how the binary composes its flags (default: no limit).
    pub fn optional(inner: H, per_second: Option<u32>) -> Self {
        let cell = per_second.map(|rate| {
            let rate = rate.max(1);
            let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
            let burst = burst_of(rate);
            Cell {
                interval,
                tolerance: interval.saturating_mul(burst - 1),
                arrival: Mutex::new(None),
            }
        });
        RateLimit { inner, cell }
    }

    /// The handler inside.
    pub fn inner(&self) -> &H {
        &self.inner
    }
}

/// The burst of a limit of `rate` starts a second: [`BURST_SECONDS`] of it, at least 1.
///
/// ```
/// assert_eq!(mayhem::layer::rate_limit::burst_of(200), 40);
/// assert_eq!(mayhem::layer::rate_limit::burst_of(3), 1);
/// ```
pub fn burst_of(rate: u32) -> u32 {
    ((f64::from(rate) * BURST_SECONDS).ceil() as u32).max(1)
}

impl Cell {
    /// Reserves the next start at or after `now` and returns it.
    fn reserve(&self, now: Instant) -> Instant {
        let mut arrival = sync::lock(&self.arrival);
        let due = arrival.map_or(now, |at| at.max(now));
        let start = due
            .checked_sub(self.tolerance)
            .map_or(now, |earliest| earliest.max(now));
        *arrival = Some(due + self.interval);
        start
    }
}

impl<H: Handler> Handler for RateLimit<H> {
    fn handle(
        &self,
        ctx: &Context<'_>,
    ) -> impl std::future::Future<Output = Result<(), HandleError>> + Send {
        match &self.cell {
            None => Pass::Through {
                inner: self.inner.handle(ctx),
            },
            Some(cell) => Pass::Layered {
                layered: Box::pin(self.limited(cell, ctx)),
            },
        }
    }
}

impl<H: Handler> RateLimit<H> {
    /// Waits for a start, then runs the handler.
    async fn limited(&self, cell: &Cell, ctx: &Context<'_>) -> Result<(), HandleError> {
        let now = Instant::now();
        let start = cell.reserve(now);
        if start > now {
            ctx.metrics().count_rate_limited();
            async_io::Timer::at(start).await;
        }
        self.inner.handle(ctx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_start_per_interval() {
        let cell = RateLimit::new((), 10).cell.expect("a limit");
        // 10 a second: a burst of 2, then one every 100 ms.
        let now = Instant::now();
        let starts: Vec<_> = (0..5).map(|_| cell.reserve(now) - now).collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(starts, [ms(0), ms(0), ms(100), ms(200), ms(300)]);
        // After a quiet spell the bucket is full again, not fuller.
        let later = now + Duration::from_secs(10);
        let starts: Vec<_> = (0..3).map(|_| cell.reserve(later) - later).collect();
        assert_eq!(starts, [ms(0), ms(0), ms(100)]);
    }
}
