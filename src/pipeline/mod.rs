//! The pipeline: publishers, consumers, the lease manager and the executor, wired together
//! by [`run`], which also shuts them down in a fixed order.
//!
//! - [`publisher`]: publisher threads;
//! - [`consumer`]: consumer threads (blocking pull, then `send_blocking`);
//! - [`bridge`]: the executor-thread loop that turns channel receives into tasks;
//! - [`task`]: the per-message task (handler, then ack or nack);
//! - [`acker`]: the per-thread buffers that coalesce the acks of the tasks;
//! - [`leaser`]: the lease manager, which holds and extends every lease from pull to settle;
//! - [`flow`]: flow control;
//! - [`completion`]: `--messages N`;
//! - [`throttle`]: aggregation of repeated log lines.

mod acker;
mod bridge;
mod completion;
mod consumer;
mod flow;
mod leaser;
mod publisher;
mod task;
pub(crate) mod throttle;
pub(crate) mod window;

use std::sync::atomic::AtomicU64;
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use async_executor::Executor;
use log::{error, info, warn};

use crate::config::Config;
use crate::error::{ConfigError, RunError};
use crate::handler::Handler;
use crate::metrics::{Metrics, Report};
use crate::pause::Pause;
use crate::shutdown::{Shutdown, ShutdownReason};
use crate::source::{Publish, Source};
use acker::Acks;
use completion::Completion;
use consumer::Consumer;
use leaser::{LeaseSettings, Leaser};
use publisher::Publisher;
use task::panic_text;

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

/// A broker client that both publishes and consumes, as the in-memory [`Subscription`]
/// does; every type that implements both traits is one.
///
/// [`Subscription`]: crate::Subscription
pub trait Broker: Source + Publish {}

impl<T: Source + Publish + ?Sized> Broker for T {}

/// Runs the service until `shutdown` is triggered (or, with `config.run.messages`, until every
/// message is settled), then shuts down in a fixed order and returns the [`Report`].
///
/// Threads: `config.publish.publishers` publisher threads publish random messages into `broker`;
/// `config.run.consumers` consumer threads pull from it, put each lease under the lease manager,
/// and hand it over a bounded `async_channel` (`send_blocking`) to `config.run.workers` executor
/// threads, which run one `handler` task per message; one lease-manager thread extends every
/// lease held, in batches, from pull to settle.
///
/// Shutdown order: stop publishers and consumers; await the publisher confirms the publishing
/// client still holds (up to `config.run.grace_period`); nack what sits in the hand-off channel;
/// give handlers in flight `config.run.grace_period` to finish (their leases still extended);
/// cancel and nack the rest; stop the executor threads and the lease manager; build the
/// report. Every thread is joined before `run` returns: none outlives it.
///
/// # Blocking
///
/// Blocks the calling thread until the service has shut down. Call it from a plain thread
/// (or from the future of a `block_on` that runs nothing else, as `examples/embed_smol.rs`
/// does), never from a task that shares its thread with other tasks.
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
/// config.run.messages = Some(50);
/// config.publish.interval = Duration::ZERO;
/// config.handler.latency = Duration::ZERO;
/// config.handler.restart_failure_rate = 0.0;
/// config.handler.save_failure_rate = 0.0;
/// config.run.seed = Some(1);
/// let subscription = Subscription::new(config.subscription());
/// let handler = MayhemHandler::new(MayhemConfig::from_config(&config, 1));
/// let report = run(&config, &subscription, &handler, &Shutdown::new()).unwrap();
/// assert_eq!(report.acked, 50);
/// assert!(report.is_balanced());
/// ```
pub fn run<H: Handler>(
    config: &Config,
    broker: &dyn Broker,
    handler: &H,
    shutdown: &Shutdown,
) -> Result<Report, RunError> {
    run_with_metrics(config, broker, handler, shutdown, &Metrics::default())
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
/// let mut config = Config::default();
/// config.run.messages = Some(20);
/// config.publish.interval = Duration::ZERO;
/// config.handler.latency = Duration::ZERO;
/// config.handler.restart_failure_rate = 0.0;
/// config.handler.save_failure_rate = 0.0;
/// let subscription = Subscription::new(config.subscription());
/// let handler = MayhemHandler::new(MayhemConfig::from_config(&config, 1));
/// let metrics = Metrics::default();
/// let report = run_with_metrics(&config, &subscription, &handler, &Shutdown::new(), &metrics).unwrap();
/// assert_eq!(report.acked, 20);
/// assert_eq!(metrics.in_flight(), 0);
/// ```
pub fn run_with_metrics<H: Handler>(
    config: &Config,
    broker: &dyn Broker,
    handler: &H,
    shutdown: &Shutdown,
    metrics: &Metrics,
) -> Result<Report, RunError> {
    run_clients(config, broker, Some(broker), handler, shutdown, metrics)
}

/// [`run_with_metrics`] with the consuming and the publishing client given apart, as real
/// brokers have them. Without a publishing client, `config.publish.publishers` must be 0 (the
/// program publishes by other means).
///
/// # Errors
///
/// As [`run`]; [`RunError::Config`] also when publishers are asked for without a publishing
/// client.
///
/// ```
/// use mayhem::{run_clients, Config, MayhemConfig, MayhemHandler, Metrics, Publish,
///     PubSubMessage, Shutdown, Subscription};
/// use std::time::Duration;
///
/// let mut config = Config::default();
/// config.publish.publishers = 0;
/// config.run.messages = Some(3);
/// config.handler.latency = Duration::ZERO;
/// config.handler.restart_failure_rate = 0.0;
/// config.handler.save_failure_rate = 0.0;
/// let subscription = Subscription::new(config.subscription());
/// let mut rng = fastrand::Rng::with_seed(5);
/// let batch: Vec<PubSubMessage> = (0..3).map(|_| PubSubMessage::random(&mut rng)).collect();
/// subscription.publish(&batch).unwrap();
/// let handler = MayhemHandler::new(MayhemConfig::from_config(&config, 1));
/// let report = run_clients(&config, &subscription, None, &handler, &Shutdown::new(),
///     &Metrics::default()).unwrap();
/// assert_eq!(report.acked, 3);
/// ```
pub fn run_clients<H: Handler>(
    config: &Config,
    source: &dyn Source,
    publisher: Option<&dyn Publish>,
    handler: &H,
    shutdown: &Shutdown,
    metrics: &Metrics,
) -> Result<Report, RunError> {
    run_controlled(
        config,
        source,
        publisher,
        handler,
        shutdown,
        &Pause::new(),
        metrics,
    )
}

/// [`run_clients`] with a [`Pause`] the program (and the [`Breaker`](crate::layer::Breaker)
/// layers built with the same pause) can use to stop taking work without shutting down:
/// while it pauses pulling, consumers pull nothing (they look again every 50 ms, and at
/// the shutdown); while it is quiet, publishers publish nothing too. What is held meanwhile
/// is handled and settled as usual. The runner also marks on it whether the last pull
/// failed (see [`Pause::is_ready`]).
///
/// # Errors
///
/// As [`run_clients`].
///
/// ```
/// use mayhem::{run_controlled, Config, MayhemConfig, MayhemHandler, Metrics, Pause, Shutdown,
///     ShutdownReason, Subscription};
/// use std::time::Duration;
///
/// let mut config = Config::default();
/// config.publish.interval = Duration::ZERO;
/// config.handler.latency = Duration::ZERO;
/// let subscription = Subscription::new(config.subscription());
/// let handler = MayhemHandler::new(MayhemConfig::from_config(&config, 1));
/// let (shutdown, pause) = (Shutdown::new(), Pause::new());
/// // Quiet from the start: nothing is published or pulled.
/// pause.set_quiet(true);
/// let stopper = shutdown.clone();
/// std::thread::spawn(move || {
///     std::thread::sleep(Duration::from_millis(100));
///     stopper.trigger(ShutdownReason::Requested);
/// });
/// let report = run_controlled(&config, &subscription, Some(&subscription), &handler,
///     &shutdown, &pause, &Metrics::default()).unwrap();
/// assert_eq!((report.published, report.consumed), (0, 0));
/// ```
pub fn run_controlled<H: Handler>(
    config: &Config,
    source: &dyn Source,
    publisher: Option<&dyn Publish>,
    handler: &H,
    shutdown: &Shutdown,
    pause: &Pause,
    metrics: &Metrics,
) -> Result<Report, RunError> {
    config.validate()?;
    if publisher.is_none() && config.publish.publishers > 0 {
        return Err(RunError::Config(ConfigError::new(
            "--publishers",
            config.publish.publishers,
            "must be 0 without a publishing client",
        )));
    }
    let started = Instant::now();
    // Messages the run's publishers published: `--messages N` completes only once they
    // published their N (the source's settled count may include messages they did not).
    let published = AtomicU64::new(0);
    let seed = config.run.seed.unwrap_or_else(|| fastrand::u64(..));
    let leaser = Leaser::new(
        source,
        metrics,
        config.run.max_in_flight,
        config.run.max_in_flight_bytes,
        source.pull_batch().max(1),
        LeaseSettings {
            ack_deadline: config.lease.ack_deadline,
            auto: config.lease.auto_ack_deadline,
            extend_interval: config.lease.extend_interval,
            max_lease: config.lease.max_lease,
        },
    );
    // Outside `shared`: it holds lease guards, whose lifetime is the lease manager's.
    let acks = Acks::new(config.run.workers);
    let shared = Shared {
        handler,
        shutdown,
        metrics,
        leaser: &leaser,
        config,
        completion: Completion {
            source,
            shutdown,
            target: config.run.messages,
            published: (publisher.is_some() && config.publish.publishers > 0).then_some(&published),
        },
    };
    if config.run.adaptive_window {
        leaser
            .gate()
            .set_limit(window::START_WINDOW.min(config.run.max_in_flight));
    }
    metrics.set_window(leaser.gate().limit());
    let budget = config.run.messages.map(AtomicU64::new);
    // Unbounded in type, bounded in fact: every lease in it holds a flow-control permit, so it
    // never holds more than the window. A bounded channel would allocate the whole window up
    // front (800 MB for `--max-in-flight 10000000`, whatever the traffic); this one grows in
    // blocks as leases come.
    let (handoff, handoff_rx) = async_channel::unbounded();
    // Never sent to: closing it tells the executor threads to return.
    let (stop, stop_rx) = async_channel::bounded::<()>(1);

    let mut spawn_error = None;
    // Two scopes: the lease manager's thread in the outer one, the rest in the inner one, and
    // the executor between them. It is dropped once its threads are joined, and so are the
    // tasks the cancellation did not reach (a large window leaves many queued): each gives its
    // lease back while the lease manager still extends it, instead of after it stopped, when
    // the lease could expire first.
    let reason = thread::scope(|outer| {
        let mut keepers = Vec::new();
        spawn_in(
            outer,
            "mayhem-leaser".to_owned(),
            &mut keepers,
            &mut spawn_error,
            shutdown,
            Box::new(|| leaser.run(seed.rotate_left(7))),
        );
        if config.run.adaptive_window {
            spawn_in(
                outer,
                "mayhem-window".to_owned(),
                &mut keepers,
                &mut spawn_error,
                shutdown,
                Box::new(|| {
                    tune_window(leaser.gate(), metrics, shutdown, config.run.max_in_flight)
                }),
            );
        }
        // Declared after `shared`, so it is dropped first: its tasks borrow `shared`.
        let executor = Executor::new();
        let reason = thread::scope(|scope| {
            let mut workers = Vec::new();
            let mut feeders = Vec::new();
            let mut spawn = |name: String, handles: &mut Vec<_>, body| {
                spawn_in(scope, name, handles, &mut spawn_error, shutdown, body);
            };
            for index in 0..config.run.workers {
                let (executor, shared, acks, handoff_rx, stop_rx) = (
                    &executor,
                    &shared,
                    &acks,
                    handoff_rx.clone(),
                    stop_rx.clone(),
                );
                spawn(
                    format!("mayhem-worker-{index}"),
                    &mut workers,
                    Box::new(move || {
                        bridge::run_executor_thread(
                            executor, shared, acks, index, handoff_rx, stop_rx,
                        )
                    }),
                );
            }
            for index in 0..config.run.consumers {
                let consumer = Consumer {
                    source,
                    shutdown,
                    pause,
                    leaser: &leaser,
                    handoff: handoff.clone(),
                    completion: shared.completion,
                };
                spawn(
                    format!("mayhem-consumer-{index}"),
                    &mut feeders,
                    Box::new(move || consumer.run()),
                );
            }
            if let Some(sink) = publisher {
                for index in 0..config.publish.publishers {
                    let publisher = Publisher {
                        sink,
                        shutdown,
                        pause,
                        interval: config.publish.interval,
                        budget: budget.as_ref(),
                        published: &published,
                        seed: seed ^ SEED_STEP.wrapping_mul(index as u64 + 1),
                    };
                    spawn(
                        format!("mayhem-publisher-{index}"),
                        &mut feeders,
                        Box::new(move || publisher.run()),
                    );
                }
            }
            // `--messages 0` is done before it starts.
            shared.completion.check();

            let reason = wait_reporting_stats(
                shutdown,
                source,
                metrics,
                config.run.stats_interval,
                config.run.adaptive_window,
                &shared.completion,
            );
            match &reason {
                ShutdownReason::Signal(name) => info!("Received exit signal {name}..."),
                ShutdownReason::Requested => info!("Received shutdown request..."),
                ShutdownReason::Completed => {
                    info!(
                        "Settled all {} messages...",
                        config.run.messages.unwrap_or_default()
                    )
                }
                // The task that caught the panic logged it.
                ShutdownReason::Panicked(_) => {}
                // The consumer that saw the failure logged it.
                ShutdownReason::Failed(_) => {}
            }

            info!("Closing database connections");
            source.interrupt();
            if let Some(sink) = publisher {
                sink.interrupt();
            }
            leaser.gate().close();
            join_all(feeders);
            if let Some(sink) = publisher {
                // A broker that pipelines its publisher confirms still holds some: the messages
                // the publishers were told were published are confirmed (or counted) here.
                let unconfirmed = sink.wait_confirmed(config.run.grace_period);
                if unconfirmed > 0 {
                    warn!(
                        "{unconfirmed} published messages were not confirmed by the broker: \
                     they may be lost or published twice"
                    );
                }
            }

            info!("Nacking outstanding messages");
            handoff.close();
            let mut waiting = Vec::new();
            while let Ok(batch) = handoff_rx.try_recv() {
                waiting.extend(batch);
            }
            leaser.nack_all(waiting);
            let in_flight = leaser.gate().in_flight();
            if in_flight > 0 {
                info!(
                    "Waiting up to {} for {in_flight} handlers to finish",
                    humantime::format_duration(config.run.grace_period)
                );
                leaser.gate().wait_idle(config.run.grace_period);
            }
            info!("Cancelling {} outstanding tasks", leaser.gate().in_flight());
            leaser.cancel();
            if !leaser.gate().wait_idle(CANCEL_WAIT) {
                // Mostly tasks not polled since the cancellation (a large window leaves many
                // queued): dropped with the executor below, each nacks its message. A handler
                // that blocks its thread is the other case; the binary's watchdog bounds it.
                info!(
                    "{} cancelled tasks had not stopped after {}: they are dropped with the \
                     executor, which nacks their messages",
                    leaser.gate().in_flight(),
                    humantime::format_duration(CANCEL_WAIT)
                );
            }

            info!("Shutting down executor");
            stop.close();
            join_all(workers);
            reason
        });
        // Tasks still queued are dropped: each nacks its lease. Then what the ack buffers
        // still hold (their flushers were tasks too) is acked.
        drop(executor);
        shared.ack_finished(&mut acks.take_all());
        leaser.stop();
        join_all(keepers);
        reason
    });
    if let Some(error) = spawn_error {
        return Err(RunError::Spawn(error));
    }

    let unsent = source.flush(FLUSH_WAIT);
    if unsent > 0 {
        // The same words as a source's own report at drop, so that either says it.
        warn!("{unsent} lease operations were left unsent: their messages will be delivered again after their ack deadline");
    }
    leaser.flush_logs();
    info!("Flushing metrics");
    let report = Report::new(
        source.stats(),
        metrics,
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
    /// The handler run for each message.
    handler: &'a H,
    /// Triggered by a panic or by the last settled message.
    shutdown: &'a Shutdown,
    /// The handlers' counters.
    metrics: &'a Metrics,
    /// The lease manager: holds, extends and settles every lease; owns flow control.
    leaser: &'a Leaser<'a>,
    /// The settings: `--blocking-threshold` and the debugging aids.
    config: &'a Config,
    /// `--messages N`.
    completion: Completion<'a>,
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
