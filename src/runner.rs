//! `run`: wires publishers, consumers and the executor together, and shuts them down in a
//! fixed order.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::Poll;
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use async_executor::{Executor, Task};
use futures_lite::{future, FutureExt};
use log::{debug, error, info, warn};
use pin_project_lite::pin_project;

use crate::config::Config;
use crate::consumer::Consumer;
use crate::error::{HandleError, RunError};
use crate::flow::{Cancel, Gate};
use crate::handler::{Context, Handler};
use crate::message::PubSubMessage;
use crate::metrics::{Metrics, Report};
use crate::publisher::Publisher;
use crate::shutdown::{Shutdown, ShutdownReason};
use crate::source::{Delivery, Source};

/// How long cancelled handlers get to give their messages back before the executor stops.
const CANCEL_WAIT: Duration = Duration::from_secs(1);
/// Most deliveries a worker takes from the hand-off channel and spawns at once.
const SPAWN_BATCH: usize = 32;
/// Spreads the seeds of the publishers apart (the golden ratio in 64 bits).
const SEED_STEP: u64 = 0x9E37_79B9_7F4A_7C15;

/// Runs the service until `shutdown` is triggered (or, with `config.messages`, until every
/// message is settled), then shuts down in a fixed order and returns the [`Report`].
///
/// Threads: `config.publishers` publisher threads publish random messages into `source`;
/// `config.consumers` consumer threads pull from it and hand deliveries over a bounded
/// `async_channel` (`send_blocking`) to `config.workers` executor threads, which run one
/// `handler` task per message while extending its lease every `config.extend_interval`.
///
/// Shutdown order: stop publishers and consumers; nack what sits in the hand-off channel;
/// give handlers in flight `config.grace_period` to finish (their leases still extended);
/// cancel and nack the rest; stop the executor threads; build the report. Every thread is
/// joined before `run` returns: none outlives it.
///
/// # Blocking
///
/// Blocks the calling thread until the service has shut down. Do not call it inside a future
/// that other work shares a thread with; inside `smol::block_on` it is fine (see the crate
/// example).
///
/// # Errors
///
/// [`RunError::Config`] for an invalid configuration (nothing is started);
/// [`RunError::Spawn`] if a thread cannot be started (what did start is shut down first).
///
/// ```
/// use mayhem::{run, Config, MayhemConfig, MayhemHandler, Shutdown, Subscription};
/// use std::time::Duration;
///
/// let mut config = Config::default();
/// config.messages = Some(50);
/// config.publish_interval = Duration::ZERO;
/// config.handler_latency = Duration::ZERO;
/// config.restart_failure_rate = 0.0;
/// config.save_failure_rate = 0.0;
/// config.seed = Some(1);
/// let subscription = Subscription::new((&config).into());
/// let handler = MayhemHandler::new(MayhemConfig::from_config(&config, 1));
/// let report = run(&config, &subscription, &handler, &Shutdown::new()).unwrap();
/// assert_eq!(report.acked, 50);
/// assert!(report.is_balanced());
/// ```
pub fn run<H: Handler>(
    config: &Config,
    source: &dyn Source,
    handler: &H,
    shutdown: &Shutdown,
) -> Result<Report, RunError> {
    run_with_metrics(config, source, handler, shutdown, &Metrics::default())
}

/// [`run`], updating `metrics` as it goes, so that another thread can watch them (the
/// binary's `/metrics` endpoint does).
///
/// # Errors
///
/// As [`run`].
///
/// ```
/// use mayhem::{run_with_metrics, Config, MayhemConfig, MayhemHandler, Metrics, Shutdown, Subscription};
/// use std::time::Duration;
///
/// let config = Config {
///     messages: Some(20),
///     publish_interval: Duration::ZERO,
///     handler_latency: Duration::ZERO,
///     restart_failure_rate: 0.0,
///     save_failure_rate: 0.0,
///     ..Config::default()
/// };
/// let subscription = Subscription::new((&config).into());
/// let handler = MayhemHandler::new(MayhemConfig::from_config(&config, 1));
/// let metrics = Metrics::default();
/// let report = run_with_metrics(&config, &subscription, &handler, &Shutdown::new(), &metrics).unwrap();
/// assert_eq!(report.acked, 20);
/// assert_eq!(metrics.in_flight(), 0);
/// ```
pub fn run_with_metrics<H: Handler>(
    config: &Config,
    source: &dyn Source,
    handler: &H,
    shutdown: &Shutdown,
    metrics: &Metrics,
) -> Result<Report, RunError> {
    config.validate()?;
    let started = Instant::now();
    let seed = config.seed.unwrap_or_else(|| fastrand::u64(..));
    let shared = Shared {
        source,
        handler,
        shutdown,
        metrics,
        gate: Gate::new(
            config.max_in_flight,
            crate::consumer::PULL_BATCH,
            &metrics.in_flight,
        ),
        cancel: Cancel::default(),
        config,
    };
    let budget = config.messages.map(AtomicU64::new);
    // Declared after `shared`, so it is dropped first: its tasks borrow `shared`.
    let executor = Executor::new();
    // Bounded: the hand-off never holds more than the flow-control window.
    let (handoff, handoff_rx) = async_channel::bounded::<Delivery<'_>>(config.max_in_flight);
    // Never sent to: closing it tells the executor threads to return.
    let (stop, stop_rx) = async_channel::bounded::<()>(1);

    let mut spawn_error = None;
    let reason = thread::scope(|scope| {
        let mut workers = Vec::new();
        let mut feeders = Vec::new();
        let mut spawn = |name: String, handles: &mut Vec<_>, body| {
            spawn_in(scope, name, handles, &mut spawn_error, shutdown, body);
        };
        for index in 0..config.workers {
            let (executor, shared, handoff_rx, stop_rx) =
                (&executor, &shared, handoff_rx.clone(), stop_rx.clone());
            let body = move || {
                future::block_on(executor.run(async {
                    // Each executor thread also receives from the hand-off channel and spawns
                    // one task per delivery, taking what else is queued in the same go so that
                    // the executor's task table is locked once per batch; after shutdown
                    // began it nacks instead.
                    let mut batch = Vec::with_capacity(SPAWN_BATCH);
                    let mut tasks = Vec::with_capacity(SPAWN_BATCH);
                    while let Ok(first) = handoff_rx.recv().await {
                        batch.push(first);
                        while batch.len() < SPAWN_BATCH {
                            match handoff_rx.try_recv() {
                                Ok(next) => batch.push(next),
                                Err(_) => break,
                            }
                        }
                        if shared.shutdown.is_triggered() {
                            batch
                                .drain(..)
                                .for_each(|delivery| shared.give_back(delivery));
                            continue;
                        }
                        executor.spawn_many(
                            batch.drain(..).map(|delivery| shared.handle(delivery)),
                            &mut tasks,
                        );
                        tasks.drain(..).for_each(Task::detach);
                    }
                    // The channel is closed and drained: keep running the tasks until stopped.
                    let _ = stop_rx.recv().await;
                }));
            };
            spawn(
                format!("mayhem-worker-{index}"),
                &mut workers,
                Box::new(body) as Body<'_>,
            );
        }
        for index in 0..config.consumers {
            let consumer = Consumer {
                source,
                shutdown,
                gate: &shared.gate,
                handoff: handoff.clone(),
                messages: config.messages,
            };
            spawn(
                format!("mayhem-consumer-{index}"),
                &mut feeders,
                Box::new(move || consumer.run()),
            );
        }
        for index in 0..config.publishers {
            let publisher = Publisher {
                source,
                shutdown,
                interval: config.publish_interval,
                budget: budget.as_ref(),
                seed: seed ^ SEED_STEP.wrapping_mul(index as u64 + 1),
            };
            spawn(
                format!("mayhem-publisher-{index}"),
                &mut feeders,
                Box::new(move || publisher.run()),
            );
        }
        // `--messages 0` is done before it starts.
        shared.check_done();

        let reason = wait_reporting_stats(shutdown, source, metrics, config.stats_interval);
        match &reason {
            ShutdownReason::Signal(name) => info!("Received exit signal {name}..."),
            ShutdownReason::Requested => info!("Received shutdown request..."),
            ShutdownReason::Completed => {
                info!(
                    "Settled all {} messages...",
                    config.messages.unwrap_or_default()
                )
            }
            // The task that caught the panic logged it.
            ShutdownReason::Panicked(_) => {}
            // The consumer that saw the failure logged it.
            ShutdownReason::Failed(_) => {}
        }

        info!("Closing database connections");
        source.interrupt();
        shared.gate.close();
        join_all(feeders);

        info!("Nacking outstanding messages");
        handoff.close();
        while let Ok(delivery) = handoff_rx.try_recv() {
            shared.give_back(delivery);
        }
        let in_flight = shared.gate.in_flight();
        if in_flight > 0 {
            info!(
                "Waiting up to {} for {in_flight} handlers to finish",
                humantime::format_duration(config.grace_period)
            );
            shared.gate.wait_idle(config.grace_period);
        }
        info!("Cancelling {} outstanding tasks", shared.gate.in_flight());
        shared.cancel.trigger();
        if !shared.gate.wait_idle(CANCEL_WAIT) {
            warn!(
                "{} handlers did not stop when cancelled",
                shared.gate.in_flight()
            );
        }

        info!("Shutting down executor");
        stop.close();
        join_all(workers);
        reason
    });
    // No task is left: each ended, or was cancelled and gave its message back.
    drop(executor);
    if let Some(error) = spawn_error {
        return Err(RunError::Spawn(error));
    }

    info!("Flushing metrics");
    let report = Report::new(
        source.stats(),
        shared.metrics,
        started.elapsed(),
        seed,
        reason.kind(),
    );
    info!("Successfully shutdown the Mayhem service.");
    Ok(report)
}

/// What the handler tasks share; borrowed by them, never reference-counted, because every
/// task ends before `run` returns.
struct Shared<'a, H> {
    /// The subscription.
    source: &'a dyn Source,
    /// The handler run for each message.
    handler: &'a H,
    /// Triggered by a panic or by the last settled message.
    shutdown: &'a Shutdown,
    /// The handlers' counters.
    metrics: &'a Metrics,
    /// Flow control: one permit per message pulled and not yet settled.
    gate: Gate<'a>,
    /// Tells handlers still running after the grace period to stop.
    cancel: Cancel,
    /// The settings: ack deadline and extension period, `--messages`, the debugging aids.
    config: &'a Config,
}

pin_project! {
    /// A handler's future (with panics caught), measuring each poll when `threshold` is set:
    /// a poll that holds the thread longer is a handler that blocks instead of awaiting,
    /// which starves every task on that executor thread.
    struct Handling<'a, F> {
        #[pin]
        inner: F,
        threshold: Option<Duration>,
        metrics: &'a Metrics,
        message: &'a PubSubMessage,
    }
}

impl<F> Future for Handling<'_, F>
where
    F: Future<Output = std::thread::Result<Result<(), HandleError>>>,
{
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Outcome> {
        let this = self.project();
        let Some(threshold) = *this.threshold else {
            return this.inner.poll(cx).map(Outcome::Finished);
        };
        let started = Instant::now();
        let poll = this.inner.poll(cx);
        let took = started.elapsed();
        if took > threshold {
            this.metrics.count_blocking();
            warn!(
                "Handler of {} blocked an executor thread for {took:?}",
                this.message
            );
        }
        poll.map(Outcome::Finished)
    }
}

/// How handling one message ended.
enum Outcome {
    /// The handler returned, or panicked (the `Err` holds the panic's payload).
    Finished(std::thread::Result<Result<(), HandleError>>),
    /// The handler was cancelled after the grace period.
    Cancelled,
    /// The lease could not be extended (it expired while the task could not run): the
    /// message is back in the subscription already, so the handler is dropped.
    LeaseLost,
}

impl<H: Handler> Shared<'_, H> {
    /// Handles one delivery: runs the handler while extending the lease, then acks or nacks.
    async fn handle(&self, delivery: Delivery<'_>) {
        let message = *delivery.message();
        // A task first polled after the cancellation never starts its handler: a handler
        // could block its thread on its first poll, which would hold up the shutdown.
        if self.cancel.is_cancelled() {
            self.metrics.count_cancelled();
            self.give_back(delivery);
            return;
        }
        info!("Handling {message}");
        let started = Instant::now();
        let extended = AtomicU32::new(0);
        let outcome = {
            let ctx = Context::new(&message, delivery.attempt(), &extended, self.metrics);
            // The handler is polled first: one that finishes at once never starts a timer.
            // One timer per message in flight serves both the lease extension and the slow
            // handler warning. The three futures are built inside the awaited expression,
            // not bound to locals first: a local moved into a future that is then awaited
            // would be stored twice in this task (most of its memory is the handler's future).
            Handling {
                inner: AssertUnwindSafe(self.handler.handle(&ctx)).catch_unwind(),
                threshold: self.config.blocking_threshold,
                metrics: self.metrics,
                message: &message,
            }
            .or(self.watch(&delivery, &extended))
            .or(self.cancelled())
            .await
        };
        match outcome {
            Outcome::Finished(Ok(Ok(()))) => match delivery.ack() {
                Ok(()) => {
                    self.metrics.record_latency(started.elapsed());
                    info!("Done. Acked {message}");
                }
                Err(error) => warn!("Ack of {message} refused: {error}"),
            },
            Outcome::Finished(Ok(Err(error))) => {
                debug!("Nacking {message}: {error}");
                let _ = delivery.nack();
            }
            Outcome::Finished(Err(panic)) => {
                let text = panic_text(panic.as_ref());
                error!("Caught exception: {text}");
                self.metrics.count_panicked();
                let _ = delivery.nack();
                if self.shutdown.trigger(ShutdownReason::Panicked(text)) {
                    info!("Shutting down...");
                }
            }
            Outcome::Cancelled => {
                self.metrics.count_cancelled();
                let _ = delivery.nack();
            }
            Outcome::LeaseLost => {
                warn!("Lost the lease of {message}: dropped its handler, the message will be delivered again");
                // The nack is refused (the lease is gone); it only marks the delivery settled.
                let _ = delivery.nack();
            }
        }
        self.gate.release(1);
        self.check_done();
    }

    /// Extends the lease every `extend_interval` while the message is handled, and warns once
    /// when it has run longer than `debug_slow`. Completes only when an extension is refused:
    /// then the lease is lost.
    async fn watch(&self, delivery: &Delivery<'_>, extended: &AtomicU32) -> Outcome {
        let started = Instant::now();
        let mut extend_at = started + self.config.extend_interval;
        let mut slow_at = self.config.debug_slow.map(|limit| started + limit);
        loop {
            async_io::Timer::at(slow_at.map_or(extend_at, |slow| slow.min(extend_at))).await;
            let now = Instant::now();
            if let Some(slow) = slow_at.filter(|slow| *slow <= now) {
                self.metrics.count_slow();
                warn!(
                    "Slow handler: {} (message id {}) still running after {}",
                    delivery.message(),
                    delivery.message().message_id(),
                    humantime::format_duration(slow - started)
                );
                slow_at = None;
            }
            if extend_at <= now {
                match delivery.extend(self.config.ack_deadline) {
                    Ok(()) => {
                        extended.fetch_add(1, Ordering::Relaxed);
                        info!(
                            "Extended deadline by {} for {}",
                            seconds(self.config.ack_deadline),
                            delivery.message()
                        );
                    }
                    Err(_) => return Outcome::LeaseLost,
                }
                extend_at = now + self.config.extend_interval;
            }
        }
    }

    /// Completes with `Outcome::Cancelled` once the handlers are cancelled.
    async fn cancelled(&self) -> Outcome {
        self.cancel.cancelled().await;
        Outcome::Cancelled
    }

    /// Nacks a delivery that never reached a handler and returns its permit.
    fn give_back(&self, delivery: Delivery<'_>) {
        let _ = delivery.nack();
        self.gate.release(1);
    }

    /// With `--messages N`, triggers the shutdown once N messages are settled.
    fn check_done(&self) {
        check_done(self.source, self.shutdown, self.config.messages);
    }
}

/// With `messages` set, triggers the shutdown once that many messages are settled.
pub(crate) fn check_done(source: &dyn Source, shutdown: &Shutdown, messages: Option<u64>) {
    if let Some(target) = messages {
        if source.settled() >= target {
            shutdown.trigger(ShutdownReason::Completed);
        }
    }
}

/// The body of a thread of the service.
type Body<'a> = Box<dyn FnOnce() + Send + 'a>;

/// Starts a scoped thread. After a failure nothing more is started: the error is kept and the
/// shutdown triggered, so what did start stops in the usual order.
fn spawn_in<'scope>(
    scope: &'scope Scope<'scope, '_>,
    name: String,
    handles: &mut Vec<ScopedJoinHandle<'scope, ()>>,
    failed: &mut Option<std::io::Error>,
    shutdown: &Shutdown,
    body: Body<'scope>,
) {
    if failed.is_some() {
        return;
    }
    match thread::Builder::new().name(name).spawn_scoped(scope, body) {
        Ok(handle) => handles.push(handle),
        Err(error) => {
            error!("Could not start a thread: {error}");
            *failed = Some(error);
            shutdown.trigger(ShutdownReason::Requested);
        }
    }
}

/// Blocks until the shutdown is triggered, logging a stats line every `interval` (never when
/// it is zero).
fn wait_reporting_stats(
    shutdown: &Shutdown,
    source: &dyn Source,
    metrics: &Metrics,
    interval: Duration,
) -> ShutdownReason {
    if interval.is_zero() {
        return shutdown.wait();
    }
    let mut last_acked = source.stats().acked;
    let mut last_time = Instant::now();
    loop {
        if shutdown.wait_timeout(interval) {
            return shutdown.wait();
        }
        let stats = source.stats();
        let now = Instant::now();
        let rate = (stats.acked - last_acked) as f64 / (now - last_time).as_secs_f64().max(1e-9);
        info!(
            "Stats: {rate:.1} acked/s, in flight {}, acked {}, nacked {}, redelivered {}, dead-lettered {}",
            metrics.in_flight(),
            stats.acked,
            stats.nacked,
            stats.redelivered,
            stats.dead_lettered
        );
        (last_acked, last_time) = (stats.acked, now);
    }
}

/// Joins threads; a panic in one is logged (the library's threads do not panic by design).
fn join_all(handles: Vec<ScopedJoinHandle<'_, ()>>) {
    for handle in handles {
        let name = handle.thread().name().unwrap_or("mayhem").to_owned();
        if let Err(panic) = handle.join() {
            error!("Thread {name} panicked: {}", panic_text(panic.as_ref()));
        }
    }
}

/// The text of a panic's payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "unknown panic".to_owned()
    }
}

/// A duration as the reference logs it: `3 seconds`, or `1.5s` when not whole.
fn seconds(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{} seconds", duration.as_secs())
    } else {
        humantime::format_duration(duration).to_string()
    }
}
