//! One run in progress: the threads of the service, and its shutdown as one method per step,
//! each named after the step (and its log line) in the README's "Architecture" section.

use std::cell::RefCell;
use std::sync::atomic::AtomicU64;
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use async_executor::Executor;
use log::{error, info, warn};

use super::acker::Acks;
use super::completion::Completion;
use super::consumer::Consumer;
use super::leaser::Leaser;
use super::publisher::Publisher;
use super::task::panic_text;
use super::{bridge, flow, window, Shared};
use crate::config::Config;
use crate::handler::Handler;
use crate::metrics::{Metrics, Report};
use crate::pause::Pause;
use crate::shutdown::{Shutdown, ShutdownReason};
use crate::source::{Publish, Source};

/// How long cancelled handlers get to give their messages back before the executor stops.
const CANCEL_WAIT: Duration = Duration::from_secs(1);
/// Spreads the seeds of the publishers apart (the golden ratio in 64 bits).
const SEED_STEP: u64 = 0x9E37_79B9_7F4A_7C15;
/// How long the end of a run waits for a remote source to send the lease operations it
/// accepted.
const FLUSH_WAIT: Duration = Duration::from_secs(1);
/// How often the main thread checks `--messages N` completion itself (see
/// `wait_reporting_stats`): at most this late, at a cost of a wake-up per period.
const COMPLETION_POLL: Duration = Duration::from_millis(5);

/// One run in progress: what its threads are given, and one method per step of the shutdown,
/// each named after the step (and its log line) in the README's "Architecture" section.
pub(super) struct Service<'s, 'r, H> {
    /// Every setting.
    pub(super) config: &'r Config,
    /// Where leases come from.
    pub(super) source: &'r dyn Source,
    /// Where the publisher threads publish, if anywhere.
    pub(super) publisher: Option<&'r dyn Publish>,
    /// What every loop checks.
    pub(super) shutdown: &'r Shutdown,
    /// Quiet mode and open breakers.
    pub(super) pause: &'r Pause,
    /// The counters.
    pub(super) metrics: &'r Metrics,
    /// The lease manager, which also holds the flow-control gate.
    pub(super) leaser: &'r Leaser<'r>,
    /// What the handler tasks share.
    pub(super) shared: &'s Shared<'r, H>,
    /// The executor threads' ack buffers.
    pub(super) acks: &'s Acks<'r>,
    /// The seed of the lease manager's jitter and of the publishers.
    pub(super) seed: u64,
    /// Messages the run's publishers published.
    pub(super) published: &'r AtomicU64,
    /// What is left of `--messages N` to publish.
    pub(super) budget: Option<&'r AtomicU64>,
    /// The hand-off channel, consumers to executor threads.
    pub(super) handoff: async_channel::Sender<bridge::Batch<'r>>,
    /// Its receiving end: the executor threads', and the shutdown's, which drains it.
    pub(super) handoff_rx: async_channel::Receiver<bridge::Batch<'r>>,
    /// Never sent to: closing it tells the executor threads to return.
    pub(super) stop: async_channel::Sender<()>,
    /// Its receiving end, one clone per executor thread.
    pub(super) stop_rx: async_channel::Receiver<()>,
    /// The first thread that could not be started; nothing more is started after it.
    pub(super) spawn_error: RefCell<Option<std::io::Error>>,
}

impl<'s, 'r: 's, H: Handler> Service<'s, 'r, H> {
    /// Starts every thread, waits for the shutdown, and runs its steps up to the lease
    /// manager's stop (every thread joined); returns why it shut down.
    ///
    /// Two scopes: the lease manager's thread in the outer one, the rest in the inner one, and
    /// the executor between them. It is dropped once its threads are joined, and so are the
    /// tasks the cancellation did not reach (a large window leaves many queued): each gives its
    /// lease back while the lease manager still extends it, instead of after it stopped, when
    /// the lease could expire first.
    pub(super) fn serve(&self) -> ShutdownReason {
        thread::scope(|outer| {
            let keepers = self.start_lease_manager(outer);
            // Declared after `shared`, so they are dropped first: their tasks borrow `shared`.
            // One executor per executor thread (see `start_executor_threads`).
            let executors: Vec<Executor<'_>> = (0..self.config.run.workers)
                .map(|_| Executor::new())
                .collect();
            let reason = thread::scope(|scope| {
                let workers = self.start_executor_threads(scope, &executors);
                let feeders = self.start_consumers_and_publishers(scope);
                // `--messages 0` is done before it starts.
                self.shared.completion.check();

                let reason = self.receive_exit_signal();
                self.close_database_connections(feeders);
                self.nack_outstanding_messages();
                self.wait_for_handlers();
                self.cancel_outstanding_tasks();
                self.shut_down_executor(workers);
                reason
            });
            self.stop_lease_manager(executors, keepers);
            reason
        })
    }

    /// Starts a scoped thread, unless one could not be started already (see [`spawn_in`]).
    fn spawn<'scope>(
        &self,
        scope: &'scope Scope<'scope, '_>,
        name: String,
        handles: &mut Vec<ScopedJoinHandle<'scope, ()>>,
        body: Body<'scope>,
    ) {
        spawn_in(
            scope,
            name,
            handles,
            &mut self.spawn_error.borrow_mut(),
            self.shutdown,
            body,
        );
    }

    /// Starts the lease manager's thread, and the adaptive window's.
    fn start_lease_manager<'scope>(
        &self,
        outer: &'scope Scope<'scope, '_>,
    ) -> Vec<ScopedJoinHandle<'scope, ()>>
    where
        'r: 'scope,
    {
        let (leaser, metrics, shutdown, config) =
            (self.leaser, self.metrics, self.shutdown, self.config);
        let seed = self.seed;
        let mut keepers = Vec::new();
        self.spawn(
            outer,
            "mayhem-leaser".to_owned(),
            &mut keepers,
            Box::new(move || leaser.run(seed.rotate_left(7))),
        );
        if config.run.adaptive_window {
            self.spawn(
                outer,
                "mayhem-window".to_owned(),
                &mut keepers,
                Box::new(move || {
                    tune_window(leaser.gate(), metrics, shutdown, config.run.max_in_flight)
                }),
            );
        }
        keepers
    }

    /// Starts the executor threads, each running an executor of its own.
    ///
    /// The hand-off channel balances the load: a thread takes a pull's batch only when few of
    /// the tasks it spawned wait to start (see `bridge`), so a busy thread leaves the next
    /// batch to another. A task then stays on the thread that spawned it, with its lease
    /// guard, its ack buffer and its wake-ups: one executor shared by every thread let them
    /// steal each other's tasks, and every task's end locked one task table for all of them.
    /// Measured with `MAYHEM_BENCH=noop` on 2 CPUs, with two executor threads: 2.07 M/s and
    /// 812 ns of CPU per message shared, 2.65 M/s and 679 ns one per thread (README).
    fn start_executor_threads<'scope>(
        &self,
        scope: &'scope Scope<'scope, '_>,
        executors: &'scope [Executor<'s>],
    ) -> Vec<ScopedJoinHandle<'scope, ()>>
    where
        's: 'scope,
    {
        let mut workers = Vec::new();
        for (index, executor) in executors.iter().enumerate() {
            let (shared, acks, handoff_rx, stop_rx) = (
                self.shared,
                self.acks,
                self.handoff_rx.clone(),
                self.stop_rx.clone(),
            );
            self.spawn(
                scope,
                format!("mayhem-worker-{index}"),
                &mut workers,
                Box::new(move || {
                    bridge::run_executor_thread(executor, shared, acks, index, handoff_rx, stop_rx)
                }),
            );
        }
        workers
    }

    /// Starts the consumer threads, then the publisher threads.
    fn start_consumers_and_publishers<'scope>(
        &self,
        scope: &'scope Scope<'scope, '_>,
    ) -> Vec<ScopedJoinHandle<'scope, ()>>
    where
        'r: 'scope,
    {
        let mut feeders = Vec::new();
        for index in 0..self.config.run.consumers {
            let consumer = Consumer {
                source: self.source,
                shutdown: self.shutdown,
                pause: self.pause,
                leaser: self.leaser,
                handoff: self.handoff.clone(),
                completion: self.shared.completion,
            };
            self.spawn(
                scope,
                format!("mayhem-consumer-{index}"),
                &mut feeders,
                Box::new(move || consumer.run()),
            );
        }
        if let Some(sink) = self.publisher {
            for index in 0..self.config.publish.publishers {
                let publisher = Publisher {
                    sink,
                    shutdown: self.shutdown,
                    pause: self.pause,
                    interval: self.config.publish.interval,
                    budget: self.budget,
                    published: self.published,
                    seed: self.seed ^ SEED_STEP.wrapping_mul(index as u64 + 1),
                };
                self.spawn(
                    scope,
                    format!("mayhem-publisher-{index}"),
                    &mut feeders,
                    Box::new(move || publisher.run()),
                );
            }
        }
        feeders
    }

    /// Step 1, `Received exit signal ...` (or the reason): the main thread waits for the
    /// shutdown, logging the stats lines meanwhile, then logs why.
    fn receive_exit_signal(&self) -> ShutdownReason {
        let reason = wait_reporting_stats(
            self.shutdown,
            self.source,
            self.metrics,
            self.config.run.stats_interval,
            self.config.run.adaptive_window,
            &self.shared.completion,
        );
        match &reason {
            ShutdownReason::Signal(name) => info!("Received exit signal {name}..."),
            ShutdownReason::Requested => info!("Received shutdown request..."),
            ShutdownReason::Completed => {
                info!(
                    "Settled all {} messages...",
                    self.config.run.messages.unwrap_or_default()
                )
            }
            // The task that caught the panic logged it.
            ShutdownReason::Panicked(_) => {}
            // The consumer that saw the failure logged it.
            ShutdownReason::Failed(_) => {}
        }
        reason
    }

    /// Step 2, `Closing database connections`: interrupts the source and the publishing
    /// client, closes flow control, joins the publisher and consumer threads, and gives the
    /// publishing client up to the grace period to receive the confirms it still waits for.
    fn close_database_connections(&self, feeders: Vec<ScopedJoinHandle<'_, ()>>) {
        info!("Closing database connections");
        self.source.interrupt();
        if let Some(sink) = self.publisher {
            sink.interrupt();
        }
        self.leaser.gate().close();
        join_all(feeders);
        if let Some(sink) = self.publisher {
            // A broker that pipelines its publisher confirms still holds some: the messages
            // the publishers were told were published are confirmed (or counted) here.
            let unconfirmed = sink.wait_confirmed(self.config.run.grace_period);
            if unconfirmed > 0 {
                warn!(
                    "{unconfirmed} published messages were not confirmed by the broker: \
                     they may be lost or published twice"
                );
            }
        }
    }

    /// Step 3, `Nacking outstanding messages`: closes and drains the hand-off channel, and
    /// nacks its leases in one batch.
    fn nack_outstanding_messages(&self) {
        info!("Nacking outstanding messages");
        self.handoff.close();
        let mut waiting = Vec::new();
        while let Ok(batch) = self.handoff_rx.try_recv() {
            waiting.extend(batch.guards);
        }
        self.leaser.nack_all(waiting);
    }

    /// Step 4: handlers in flight get the grace period to finish; the lease manager keeps
    /// extending their leases.
    fn wait_for_handlers(&self) {
        let in_flight = self.leaser.gate().in_flight();
        if in_flight > 0 {
            info!(
                "Waiting up to {} for {in_flight} handlers to finish",
                humantime::format_duration(self.config.run.grace_period)
            );
            self.leaser.gate().wait_idle(self.config.run.grace_period);
        }
    }

    /// Step 5, `Cancelling N outstanding tasks`: the rest are cancelled, and nack their
    /// messages.
    fn cancel_outstanding_tasks(&self) {
        info!(
            "Cancelling {} outstanding tasks",
            self.leaser.gate().in_flight()
        );
        self.leaser.cancel();
        if !self.leaser.gate().wait_idle(CANCEL_WAIT) {
            // Mostly tasks not polled since the cancellation (a large window leaves many
            // queued): dropped with the executor, each nacks its message. A handler that
            // blocks its thread is the other case; the binary's watchdog bounds it.
            info!(
                "{} cancelled tasks had not stopped after {}: they are dropped with the \
                 executor, which nacks their messages",
                self.leaser.gate().in_flight(),
                humantime::format_duration(CANCEL_WAIT)
            );
        }
    }

    /// Step 6, `Shutting down executor`: closes the executor threads' stop channel and joins
    /// them.
    fn shut_down_executor(&self, workers: Vec<ScopedJoinHandle<'_, ()>>) {
        info!("Shutting down executor");
        self.stop.close();
        join_all(workers);
    }

    /// Step 6, its end: the lease manager stops. First the executors are dropped with the
    /// tasks still queued (each nacks its lease), and what the ack buffers still hold (their
    /// flushers were tasks too) is acked.
    fn stop_lease_manager(
        &self,
        executors: Vec<Executor<'_>>,
        keepers: Vec<ScopedJoinHandle<'_, ()>>,
    ) {
        drop(executors);
        self.shared.ack_finished(&mut self.acks.take_all());
        self.leaser.stop();
        join_all(keepers);
    }

    /// Step 7: a remote source sends the lease operations it accepted (at most
    /// [`FLUSH_WAIT`]; what is left unsent is logged), and the lease manager's aggregated
    /// warnings are written out.
    pub(super) fn flush_source(&self) {
        let unsent = self.source.flush(FLUSH_WAIT);
        if unsent > 0 {
            // The same words as a source's own report at drop, so that either says it.
            warn!("{unsent} lease operations were left unsent: their messages will be delivered again after their ack deadline");
        }
        self.leaser.flush_logs();
    }

    /// Step 7, its end, `Flushing metrics`: the report.
    pub(super) fn flush_metrics(&self, started: Instant, reason: ShutdownReason) -> Report {
        info!("Flushing metrics");
        let report = Report::new(
            self.source.stats(),
            self.metrics,
            started.elapsed(),
            self.seed,
            reason.kind(),
        );
        info!("Successfully shutdown the Mayhem service.");
        report
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
/// it is zero). With `--messages N` it also checks completion every [`COMPLETION_POLL`]: a
/// remote source confirms the last acks on a thread of its own after the handlers settled
/// them, and a consumer may not come back from its pull (and check) for up to a pull's wait.
fn wait_reporting_stats(
    shutdown: &Shutdown,
    source: &dyn Source,
    metrics: &Metrics,
    interval: Duration,
    adaptive: bool,
    completion: &Completion<'_>,
) -> ShutdownReason {
    let poll = completion.target.map(|_| COMPLETION_POLL);
    if interval.is_zero() && poll.is_none() {
        return shutdown.wait();
    }
    let mut last_acked = metrics.acked();
    let mut last_time = Instant::now();
    loop {
        let until_stats = if interval.is_zero() {
            None
        } else {
            Some((last_time + interval).saturating_duration_since(Instant::now()))
        };
        let step = match (until_stats, poll) {
            (Some(stats), Some(poll)) => stats.min(poll),
            (Some(stats), None) => stats,
            (None, Some(poll)) => poll,
            (None, None) => return shutdown.wait(),
        };
        if shutdown.wait_timeout(step) {
            return shutdown.wait();
        }
        completion.check();
        let now = Instant::now();
        if interval.is_zero() || now < last_time + interval {
            continue;
        }
        let acked = metrics.acked();
        let rate = (acked - last_acked) as f64 / (now - last_time).as_secs_f64().max(1e-9);
        let window = if adaptive {
            format!(" (window {})", metrics.window())
        } else {
            String::new()
        };
        info!(
            "Stats: {rate:.1} acked/s, in flight {}{window}, acked {acked}, nacked {}, redelivered {}, dead-lettered {}, lost leases {}{}",
            metrics.in_flight(),
            metrics.nacked(),
            metrics.redelivered(),
            source.stats().dead_lettered,
            metrics.lost(),
            metrics.stats_line_extras(),
        );
        (last_acked, last_time) = (acked, now);
    }
}

/// The thread of `--max-in-flight auto`: samples the acks and handling times at the
/// controller's pace and moves the window, until the shutdown begins (the window then stays
/// where it is).
///
/// # Blocking
///
/// Runs on its own `std::thread`; it sleeps between samples.
fn tune_window(gate: &flow::Gate, metrics: &Metrics, shutdown: &Shutdown, ceiling: usize) {
    let mut controller = window::Controller::new(ceiling);
    let (mut acked, mut micros) = metrics.latency_totals();
    let mut last = Instant::now();
    loop {
        if shutdown.wait_timeout(controller.pace()) {
            return;
        }
        let now = Instant::now();
        let (acked_now, micros_now) = metrics.latency_totals();
        let count = acked_now.saturating_sub(acked);
        let sample = window::Sample {
            acked: count,
            latency: Duration::from_micros(micros_now.saturating_sub(micros) / count.max(1)),
            span: now - last,
            in_flight: metrics.in_flight(),
        };
        let before = gate.limit();
        let window = controller.sample(sample);
        if window != before {
            gate.set_limit(window);
            metrics.set_window(window);
            log::debug!(
                "Window {before} -> {window} ({count} acked in {:?}, mean handling {:?}, {} held)",
                sample.span,
                sample.latency,
                sample.in_flight
            );
        }
        (acked, micros, last) = (acked_now, micros_now, now);
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
