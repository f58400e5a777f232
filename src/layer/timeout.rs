//! The timeout layer: a handler still running past a time limit is dropped, and its message
//! nacked.

use std::time::Duration;

use futures_lite::future;
use log::Level;

use crate::error::HandleError;
use crate::handler::{Context, Handler};
use crate::layer::Pass;
use crate::pipeline::throttle::Throttle;

/// Drops the inner handler once it has run for `limit`, and fails the message with
/// [`HandleError::TimedOut`], a retryable error: the runner nacks it, so it is delivered again
/// (and dead-lettered once it used up its attempts). Each time-out is counted in
/// [`Metrics::timed_out`](crate::Metrics::timed_out) and warned about, aggregated to one line
/// a second.
///
/// The limit is separate from the shutdown's grace period: it bounds one handler, while the
/// grace period bounds all of them at the end. Dropping the handler's future cancels it at
/// its current await; a handler that blocks its thread instead of awaiting cannot be
/// dropped until it returns.
///
/// ```
/// use std::sync::atomic::AtomicU32;
/// use std::time::Duration;
/// use mayhem::layer::Timeout;
/// use mayhem::{Context, HandleError, Handler, Metrics, PubSubMessage};
///
/// struct Forever;
/// impl Handler for Forever {
///     async fn handle(&self, _ctx: &Context<'_>) -> Result<(), HandleError> {
///         std::future::pending().await
///     }
/// }
///
/// let handler = Timeout::new(Forever, Duration::from_millis(10));
/// let (message, extended, metrics) = (PubSubMessage::random(&mut mayhem::Rng::with_seed(1)),
///     AtomicU32::new(0), Metrics::default());
/// let result = smol::block_on(handler.handle(&Context::new(&message, 1, &extended, &metrics)));
/// assert!(matches!(result, Err(HandleError::TimedOut { .. })));
/// assert_eq!(metrics.timed_out(), 1);
/// ```
#[derive(Debug)]
pub struct Timeout<H> {
    /// The handler that is timed.
    inner: H,
    /// The time limit; `None` passes every message straight through.
    limit: Option<Duration>,
    /// Aggregates the warnings: a slow downstream times out every handler at once.
    log: Throttle,
}

impl<H> Timeout<H> {
    /// `inner`, dropped when it runs longer than `limit`.
    pub fn new(inner: H, limit: Duration) -> Self {
        Self::optional(inner, Some(limit))
    }

    /// `inner` with a time limit only when `limit` is `Some`: `None` passes every message
    /// straight through, which is how the binary composes its flags (default: no limit).
    pub fn optional(inner: H, limit: Option<Duration>) -> Self {
        Timeout {
            inner,
            limit,
            log: Throttle::new("handler timeouts", Level::Warn),
        }
    }

    /// The handler inside.
    pub fn inner(&self) -> &H {
        &self.inner
    }
}

impl<H: Handler> Handler for Timeout<H> {
    fn handle(
        &self,
        ctx: &Context<'_>,
    ) -> impl std::future::Future<Output = Result<(), HandleError>> + Send {
        match self.limit {
            None => Pass::Through {
                inner: self.inner.handle(ctx),
            },
            Some(limit) => Pass::Layered {
                layered: Box::pin(self.timed(ctx, limit)),
            },
        }
    }
}

impl<H: Handler> Timeout<H> {
    /// Runs the handler, dropped past `limit`.
    async fn timed(&self, ctx: &Context<'_>, limit: Duration) -> Result<(), HandleError> {
        // The handler first: `or` polls it before the timer, so a handler that is ready at the
        // limit still succeeds.
        future::or(self.inner.handle(ctx), async {
            async_io::Timer::after(limit).await;
            ctx.metrics().count_timed_out();
            self.log.log(1, || {
                format!(
                    "Handler of {} timed out after {}: dropped, the message will be delivered again",
                    ctx.message(),
                    humantime::format_duration(limit)
                )
            });
            Err(HandleError::TimedOut { after: limit })
        })
        .await
    }
}

impl<H> Drop for Timeout<H> {
    /// Prints the count of time-outs the last aggregated line did not report.
    fn drop(&mut self) {
        self.log.flush();
    }
}
