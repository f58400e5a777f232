//! The pipeline: publishers, consumers, the lease manager and the executor, wired together
//! by [`Runner`], which also shuts them down in a fixed order.
//!
//! - [`service`]: one run in progress: its threads, and one method per shutdown step;
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
mod service;
mod task;
pub(crate) mod throttle;
pub(crate) mod window;

use std::cell::RefCell;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use crate::config::Config;
use crate::error::{ConfigError, RunError};
use crate::handler::Handler;
use crate::metrics::{Metrics, Report};
use crate::pause::Pause;
use crate::shutdown::Shutdown;
use crate::source::{Publish, Source};
use acker::Acks;
use completion::Completion;
use leaser::{LeaseSettings, Leaser};
use service::Service;

/// A broker client that both publishes and consumes, as the in-memory [`Subscription`]
/// does; every type that implements both traits is one.
///
/// [`Subscription`]: crate::Subscription
pub trait Broker: Source + Publish {}

impl<T: Source + Publish + ?Sized> Broker for T {}

/// The one entry point: runs the service until the shutdown is triggered (or, with
/// `config.run.messages`, until every message is settled), then shuts down in a fixed order
/// and returns the [`Report`].
///
/// Built from the [`Config`]; what else a run may be given is set by a method each, all
/// optional:
///
/// - [`metrics`](Runner::metrics): the [`Metrics`] to update as it goes, so that another
///   thread can watch them (the binary's `/metrics` endpoint does); without it, a run keeps
///   its own;
/// - [`publisher`](Runner::publisher): the publishing client of `config.publish.publishers`
///   publisher threads; without it, `config.publish.publishers` must be 0 (the program
///   publishes by other means). A client that both publishes and consumes, as the in-memory
///   [`Subscription`](crate::Subscription) does, is given as both;
/// - [`pause`](Runner::pause): a [`Pause`] the program (and the
///   [`Breaker`](crate::layer::Breaker) layers built with the same pause) can use to stop
///   taking work without shutting down.
///
/// Threads: `config.publish.publishers` publisher threads publish random messages into the
/// publishing client; `config.run.consumers` consumer threads pull from the source, put each
/// lease under the lease manager, and hand it over a channel (`send_blocking`) to
/// `config.run.workers` executor threads, which run one `handler` task per message; one
/// lease-manager thread extends every lease held, in batches, from pull to settle.
///
/// Shutdown order (the README's "Architecture" section; one method each inside): stop
/// publishers and consumers; await the publisher confirms the publishing client still holds
/// (up to `config.run.grace_period`); nack what sits in the hand-off channel; give handlers in
/// flight `config.run.grace_period` to finish (their leases still extended); cancel and nack
/// the rest; stop the executor threads and the lease manager; build the report. Every thread
/// is joined before [`run`](Runner::run) returns: none outlives it.
///
/// ```
/// use mayhem::{Config, MayhemConfig, MayhemHandler, Metrics, Runner, Shutdown, Subscription};
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
/// let metrics = Metrics::default();
/// let report = Runner::new(&config)
///     .metrics(&metrics)
///     .publisher(&subscription)
///     .run(&subscription, &handler, &Shutdown::new())
///     .unwrap();
/// assert_eq!(report.acked, 50);
/// assert!(report.is_balanced());
/// assert_eq!(metrics.in_flight(), 0);
/// ```
///
/// Without a publishing client, the program publishes by other means:
///
/// ```
/// use mayhem::{Config, MayhemConfig, MayhemHandler, Publish, PubSubMessage, Runner, Shutdown,
///     Subscription};
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
/// let report = Runner::new(&config).run(&subscription, &handler, &Shutdown::new()).unwrap();
/// assert_eq!(report.acked, 3);
/// ```
#[derive(Clone, Copy)]
pub struct Runner<'a> {
    /// Every setting.
    config: &'a Config,
    /// The counters another thread may watch; `None`: the run keeps its own.
    metrics: Option<&'a Metrics>,
    /// The client the publisher threads publish into.
    publisher: Option<&'a dyn Publish>,
    /// Quiet mode and open breakers; `None`: the run keeps its own, never paused.
    pause: Option<&'a Pause>,
}

impl std::fmt::Debug for Runner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("config", self.config)
            .field("metrics", &self.metrics.is_some())
            .field("publisher", &self.publisher.is_some())
            .field("pause", &self.pause)
            .finish()
    }
}

impl<'a> Runner<'a> {
    /// A run of `config`, with metrics and a pause of its own and no publishing client.
    pub fn new(config: &'a Config) -> Self {
        Runner {
            config,
            metrics: None,
            publisher: None,
            pause: None,
        }
    }

    /// Updates `metrics` as the run goes, so that another thread can watch them.
    #[must_use]
    pub fn metrics(self, metrics: &'a Metrics) -> Self {
        Runner {
            metrics: Some(metrics),
            ..self
        }
    }

    /// Publishes through `publisher`: `config.publish.publishers` threads publish random
    /// messages into it. A broker client that also consumes is given to
    /// [`run`](Runner::run) as the source too.
    #[must_use]
    pub fn publisher(self, publisher: &'a dyn Publish) -> Self {
        Runner {
            publisher: Some(publisher),
            ..self
        }
    }

    /// Stops taking work while `pause` says so, without shutting down: while it pauses
    /// pulling, consumers pull nothing (they look again every 50 ms, and at the shutdown);
    /// while it is quiet, publishers publish nothing too. What is held meanwhile is handled
    /// and settled as usual. The run also marks on it whether the last pull failed (see
    /// [`Pause::is_ready`]).
    ///
    /// ```
    /// use mayhem::{Config, MayhemConfig, MayhemHandler, Pause, Runner, Shutdown, ShutdownReason,
    ///     Subscription};
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
    /// let report = Runner::new(&config)
    ///     .publisher(&subscription)
    ///     .pause(&pause)
    ///     .run(&subscription, &handler, &shutdown)
    ///     .unwrap();
    /// assert_eq!((report.published, report.consumed), (0, 0));
    /// ```
    #[must_use]
    pub fn pause(self, pause: &'a Pause) -> Self {
        Runner {
            pause: Some(pause),
            ..self
        }
    }

    /// Runs the service on `source`, one `handler` task per message, until `shutdown` is
    /// triggered (or every message of `config.run.messages` is settled); then shuts down in
    /// the fixed order and returns the [`Report`].
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread until the service has shut down. Call it from a plain thread
    /// (or from the future of a `block_on` that runs nothing else, as
    /// `examples/embed_smol.rs` does), never from a task that shares its thread with other
    /// tasks.
    ///
    /// # Errors
    ///
    /// [`RunError::Config`] for an invalid configuration, or publishers asked for without a
    /// publishing client (nothing is started); [`RunError::Spawn`] if a thread cannot be
    /// started (what did start is shut down first).
    pub fn run<H: Handler>(
        &self,
        source: &dyn Source,
        handler: &H,
        shutdown: &Shutdown,
    ) -> Result<Report, RunError> {
        let own_metrics;
        let metrics = match self.metrics {
            Some(metrics) => metrics,
            None => {
                own_metrics = Metrics::default();
                &own_metrics
            }
        };
        let own_pause;
        let pause = match self.pause {
            Some(pause) => pause,
            None => {
                own_pause = Pause::new();
                &own_pause
            }
        };
        let (config, publisher) = (self.config, self.publisher);
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
        // What is left of `--messages N` for the publishers to publish.
        let budget = config.run.messages.map(AtomicU64::new);
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
                published: (publisher.is_some() && config.publish.publishers > 0)
                    .then_some(&published),
            },
            unstarted: bridge::Unstarted::new(config.run.workers),
        };
        if config.run.adaptive_window {
            leaser
                .gate()
                .set_limit(window::START_WINDOW.min(config.run.max_in_flight));
        }
        metrics.set_window(leaser.gate().limit());
        // Unbounded in type, bounded in fact: every lease in it holds a flow-control permit,
        // so it never holds more than the window. A bounded channel would allocate the whole
        // window up front (800 MB for `--max-in-flight 10000000`, whatever the traffic); this
        // one grows in blocks as leases come.
        let (handoff, handoff_rx) = async_channel::unbounded();
        // Never sent to: closing it tells the executor threads to return.
        let (stop, stop_rx) = async_channel::bounded::<()>(1);
        let service = Service {
            config,
            source,
            publisher,
            shutdown,
            pause,
            metrics,
            leaser: &leaser,
            shared: &shared,
            acks: &acks,
            seed,
            published: &published,
            budget: budget.as_ref(),
            handoff,
            handoff_rx,
            stop,
            stop_rx,
            spawn_error: RefCell::new(None),
        };
        let reason = service.serve();
        if let Some(error) = service.spawn_error.take() {
            return Err(RunError::Spawn(error));
        }
        service.flush_source();
        Ok(service.flush_metrics(started, reason))
    }
}

/// Runs the service on a client that both publishes and consumes.
///
/// # Errors
///
/// As [`Runner::run`].
#[deprecated(note = "use `Runner::new(config).publisher(broker).run(broker, handler, shutdown)`")]
pub fn run<H: Handler>(
    config: &Config,
    broker: &dyn Broker,
    handler: &H,
    shutdown: &Shutdown,
) -> Result<Report, RunError> {
    let publisher: &dyn Publish = broker;
    let source: &dyn Source = broker;
    Runner::new(config)
        .publisher(publisher)
        .run(source, handler, shutdown)
}

/// Runs the service on a client that both publishes and consumes, updating `metrics`.
///
/// # Errors
///
/// As [`Runner::run`].
#[deprecated(
    note = "use `Runner::new(config).metrics(metrics).publisher(broker).run(broker, handler, shutdown)`"
)]
pub fn run_with_metrics<H: Handler>(
    config: &Config,
    broker: &dyn Broker,
    handler: &H,
    shutdown: &Shutdown,
    metrics: &Metrics,
) -> Result<Report, RunError> {
    let publisher: &dyn Publish = broker;
    let source: &dyn Source = broker;
    Runner::new(config)
        .metrics(metrics)
        .publisher(publisher)
        .run(source, handler, shutdown)
}

/// Runs the service with the consuming and the publishing client given apart.
///
/// # Errors
///
/// As [`Runner::run`].
#[deprecated(note = "use `Runner`, with `publisher` when there is a publishing client")]
pub fn run_clients<H: Handler>(
    config: &Config,
    source: &dyn Source,
    publisher: Option<&dyn Publish>,
    handler: &H,
    shutdown: &Shutdown,
    metrics: &Metrics,
) -> Result<Report, RunError> {
    Runner {
        config,
        metrics: Some(metrics),
        publisher,
        pause: None,
    }
    .run(source, handler, shutdown)
}

/// Runs the service with the consuming and the publishing client given apart, and a
/// [`Pause`].
///
/// # Errors
///
/// As [`Runner::run`].
#[deprecated(
    note = "use `Runner`, with `publisher` when there is a publishing client, and `pause`"
)]
pub fn run_controlled<H: Handler>(
    config: &Config,
    source: &dyn Source,
    publisher: Option<&dyn Publish>,
    handler: &H,
    shutdown: &Shutdown,
    pause: &Pause,
    metrics: &Metrics,
) -> Result<Report, RunError> {
    Runner {
        config,
        metrics: Some(metrics),
        publisher,
        pause: Some(pause),
    }
    .run(source, handler, shutdown)
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
    /// Tasks spawned and not yet first polled.
    unstarted: bridge::Unstarted,
}
