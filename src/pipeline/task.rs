//! The per-message task: runs the handler of one held lease, then acks or nacks it.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use log::{debug, error, info};
use pin_project_lite::pin_project;

use crate::error::HandleError;
use crate::handler::{Context, Handler};
use crate::message::PubSubMessage;
use crate::metrics::Metrics;
use crate::pipeline::acker::Acks;
use crate::pipeline::leaser::{Finished, Interrupted, Interruption, LeaseGuard, Settle};
use crate::pipeline::throttle::Throttle;
use crate::pipeline::Shared;
use crate::shutdown::ShutdownReason;

pin_project! {
    /// A handler's future under supervision, in one future rather than a chain of
    /// combinators (each of which would move the handler's state once more on the way to the
    /// task):
    /// - panics of the handler are caught;
    /// - each poll is measured when `threshold` is set: a poll that holds the thread longer is
    ///   a handler that blocks instead of awaiting, which starves every task on that thread;
    /// - it ends early when the lease is lost or the handlers are cancelled;
    /// - `slow` runs beside it (the `--debug-slow` warning; it never completes).
    struct Supervised<'a, 'g, 'l, F, S> {
        #[pin]
        handler: F,
        #[pin]
        interruption: Interruption<'g, 'l>,
        #[pin]
        slow: S,
        threshold: Option<Duration>,
        metrics: &'a Metrics,
        blocking_log: &'a Throttle,
        message: &'a PubSubMessage,
    }
}

impl<F, S> Future for Supervised<'_, '_, '_, F, S>
where
    F: Future<Output = Result<(), HandleError>>,
    S: Future<Output = ()>,
{
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Outcome> {
        let this = self.project();
        let started = this.threshold.map(|_| Instant::now());
        let mut handler = this.handler;
        let poll = std::panic::catch_unwind(AssertUnwindSafe(|| handler.as_mut().poll(cx)));
        if let (Some(threshold), Some(started)) = (*this.threshold, started) {
            let took = started.elapsed();
            if took > threshold {
                this.metrics.count_blocking();
                // Aggregated: with a low threshold every poll could warn.
                this.blocking_log.log(1, || {
                    format!(
                        "Handler of {} blocked an executor thread for {took:?}",
                        this.message
                    )
                });
            }
        }
        match poll {
            Ok(Poll::Ready(result)) => return Poll::Ready(Outcome::Finished(Ok(result))),
            Err(panic) => return Poll::Ready(Outcome::Finished(Err(panic))),
            Ok(Poll::Pending) => {}
        }
        // Polled only once the handler is pending: a handler that finishes on its first poll
        // never registers with the lease manager.
        match this.interruption.poll(cx) {
            Poll::Ready(Interrupted::Lost) => return Poll::Ready(Outcome::LeaseLost),
            Poll::Ready(Interrupted::Cancelled) => return Poll::Ready(Outcome::Cancelled),
            Poll::Pending => {}
        }
        let _ = this.slow.poll(cx);
        Poll::Pending
    }
}

/// How handling one message ended.
enum Outcome {
    /// The handler returned, or panicked (the `Err` holds the panic's payload).
    Finished(std::thread::Result<Result<(), HandleError>>),
    /// The handler was cancelled after the grace period.
    Cancelled,
    /// The source refused to extend the lease (it expired while the lease manager could not
    /// reach the source in time): the message is back in the subscription already, so the
    /// handler is dropped.
    LeaseLost,
}

impl<H: Handler> Shared<'_, H> {
    /// Handles one held lease: runs the handler, then acks or nacks. The lease manager
    /// extends the lease meanwhile; the guard returns the flow-control permit when it drops.
    ///
    /// `handed` is when the consumer handed the lease's batch to the executor threads: the
    /// handling time counts from there, so it includes any wait to be spawned and for an
    /// executor thread. `spawned` is when the task was spawned, read once for the whole
    /// batch: the adaptive window's latency counts from there (see
    /// [`Metrics::latency_totals`]).
    pub(crate) async fn handle<'l>(
        &self,
        acks: &Acks<'l>,
        guard: LeaseGuard<'l>,
        handed: Instant,
        spawned: Instant,
    ) {
        self.unstarted.started();
        // A task first polled after the cancellation never starts its handler: a handler
        // could block its thread on its first poll, which would hold up the shutdown.
        if self.leaser.is_cancelled() {
            self.metrics.count_cancelled();
            drop(guard);
            return;
        }
        info!("Handling {}", guard.message());
        let outcome = {
            let message = guard.message();
            let ctx = Context::of_lease(message, guard.attempt(), &guard, self.metrics);
            // Built inside the awaited expression, not bound to a local first: a local moved
            // into a future that is then awaited would be stored twice in this task (most of
            // its memory is the handler's future).
            Supervised {
                handler: self.handler.handle(&ctx),
                interruption: guard.interrupted(),
                slow: self.slow_warning(message),
                threshold: self.config.run.blocking_threshold,
                metrics: self.metrics,
                blocking_log: &self.leaser.blocking_log,
                message,
            }
            .await
        };
        match outcome {
            // The ack is coalesced with those of the other tasks of this thread (see
            // `acker`); the flush logs it and checks the completion.
            Outcome::Finished(Ok(Ok(()))) => {
                if let Some(mut full) = acks.push(Finished {
                    guard,
                    handed,
                    spawned,
                }) {
                    self.ack_finished(&mut full);
                }
                return;
            }
            Outcome::Finished(Ok(Err(HandleError::Rejected(reason)))) => {
                // A label, not the displayed text: it is formatted only when a line is due.
                let shown = guard.message().label();
                if guard.reject(&reason) == Settle::Done {
                    self.leaser.rejected_log.log(1, || {
                        format!("Rejected {shown}: {reason}; dead-lettered without retry")
                    });
                }
            }
            Outcome::Finished(Ok(Err(error))) => {
                debug!("Nacking {}: {error}", guard.message());
                guard.nack();
            }
            Outcome::Finished(Err(panic)) => {
                let text = panic_text(panic.as_ref());
                error!("Caught exception: {text}");
                self.metrics.count_panicked();
                guard.nack();
                if self.shutdown.trigger(ShutdownReason::Panicked(text)) {
                    info!("Shutting down...");
                }
            }
            Outcome::Cancelled => {
                self.metrics.count_cancelled();
                guard.nack();
            }
            // The lease manager logged it (aggregated); dropping the guard only returns the
            // permit, as the lease is not held any more.
            Outcome::LeaseLost => drop(guard),
        }
        self.completion.check();
    }
}

impl<H: Handler> Shared<'_, H> {
    /// Acks a buffer of finished leases in one batched call, logs each, records their
    /// handling times (against one reading of the clock), and empties the buffer, which
    /// returns their permits.
    pub(crate) fn ack_finished(&self, batch: &mut Vec<Finished<'_>>) {
        let mut outcomes = Vec::with_capacity(batch.len());
        self.leaser.ack_all(batch, &mut outcomes);
        let now = Instant::now();
        for (finished, outcome) in batch.iter().zip(outcomes) {
            let message = finished.guard.message();
            match outcome {
                Settle::Done => {
                    self.metrics
                        .record_latency(now.saturating_duration_since(finished.handed));
                    // Read by the adaptive window only.
                    if self.config.run.adaptive_window {
                        self.metrics
                            .record_running(now.saturating_duration_since(finished.spawned));
                    }
                    info!("Done. Acked {message}");
                }
                Settle::Refused | Settle::Lost => self.leaser.refused_log.log(1, || {
                    format!("Ack of {message} refused: the lease had expired, the message will be delivered again")
                }),
                Settle::Failed(text) => debug!("Ack of {message} not sent: {text}"),
            }
        }
        batch.clear();
        self.completion.check();
    }

    /// The flusher task of executor thread `index`: acks its buffer whenever it holds
    /// leases. Never completes; it is dropped with the executor, once no lease is held.
    pub(crate) async fn flush_acks(&self, acks: &Acks<'_>, index: usize) {
        let mut batch = Vec::new();
        loop {
            acks.next_batch(index, &mut batch).await;
            self.ack_finished(&mut batch);
        }
    }
}

impl<H: Handler> Shared<'_, H> {
    /// With `--debug-slow`, warns once when the handler has run that long; never completes.
    /// Without it, no timer is made: the lease manager's rounds are too coarse for this
    /// debugging aid, and a timer per message would cost every run. The timer's future is
    /// boxed, so that without the option it takes no room in every task.
    fn slow_warning<'m>(
        &'m self,
        message: &'m PubSubMessage,
    ) -> impl Future<Output = ()> + Send + 'm {
        let warning = self.config.run.debug_slow.map(|limit| {
            Box::pin(async move {
                async_io::Timer::after(limit).await;
                self.metrics.count_slow_many(1);
                self.leaser.slow_log.log(1, || {
                    format!(
                        "Slow handler: {message} (message id {}) still running after {}",
                        message.id(),
                        humantime::format_duration(limit)
                    )
                });
            })
        });
        async move {
            if let Some(warning) = warning {
                warning.await;
            }
            std::future::pending().await
        }
    }
}

/// The text of a panic's payload.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "unknown panic".to_owned()
    }
}
