//! The pluggable async handler, and the Mayhem handler that is the default.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_lite::future;
use log::{error, info};

use crate::config::Config;
use crate::database::{Database, Outage, Unavailable};
use crate::error::HandleError;
use crate::message::{Attributes, PubSubMessage};
use crate::metrics::Metrics;

/// What a handler gets to know about the message it handles.
pub struct Context<'a> {
    /// The message, with its data and attributes.
    message: &'a PubSubMessage,
    /// Which delivery of the message this is, counting from 1.
    attempt: u32,
    /// Lease extensions made so far while the message was held; the lease manager counts
    /// them (or a test's counter does).
    extended: &'a dyn ExtensionCount,
    /// Counters the handler may update.
    metrics: &'a Metrics,
    /// Runs of the handler for this delivery before the current one: a layer that runs it
    /// again (the breaker) counts them, so that a handler drawing random outcomes draws anew.
    reruns: AtomicU32,
}

/// Where a [`Context`] reads how often its lease was extended.
pub(crate) trait ExtensionCount: Sync {
    /// Extensions so far.
    fn extensions(&self) -> u32;
}

impl ExtensionCount for AtomicU32 {
    fn extensions(&self) -> u32 {
        self.load(Ordering::Relaxed)
    }
}

impl<'a> Context<'a> {
    /// A context for handling `message`; tests of a handler can make their own (the runner
    /// makes one per delivery).
    pub fn new(
        message: &'a PubSubMessage,
        attempt: u32,
        extended: &'a AtomicU32,
        metrics: &'a Metrics,
    ) -> Self {
        Context {
            message,
            attempt,
            extended,
            metrics,
            reruns: AtomicU32::new(0),
        }
    }

    /// The runner's context of a held lease.
    pub(crate) fn of_lease(
        message: &'a PubSubMessage,
        attempt: u32,
        extended: &'a dyn ExtensionCount,
        metrics: &'a Metrics,
    ) -> Self {
        Context {
            message,
            attempt,
            extended,
            metrics,
            reruns: AtomicU32::new(0),
        }
    }

    /// The message: its [`data`](PubSubMessage::data), attributes, id, publish time and
    /// ordering key.
    pub fn message(&self) -> &PubSubMessage {
        self.message
    }

    /// The message's data.
    pub fn data(&self) -> &[u8] {
        self.message.data()
    }

    /// Which delivery of the message this is, counting from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Which run of the handler this is within this delivery, counting from 1: more than 1
    /// when a layer runs the handler again without a new delivery, as the
    /// [`Breaker`](crate::layer::Breaker) does with a message that failed while the
    /// downstream was down. A handler that draws outcomes at random (the chaos monkey's
    /// simulated failures) mixes it in, so that a run again is not the same run replayed.
    pub fn run(&self) -> u32 {
        self.reruns.load(Ordering::Relaxed).saturating_add(1)
    }

    /// Counts a run of the handler again for this delivery (see [`run`](Self::run)): a
    /// layer calls it before it runs the inner handler once more.
    pub fn run_again(&self) {
        self.reruns.fetch_add(1, Ordering::Relaxed);
    }

    /// The attributes the message was published with (empty for the chaos monkey's own).
    pub fn attributes(&self) -> &Attributes {
        self.message.attributes()
    }

    /// How often the lease has been extended so far while the message was held (waiting for
    /// its handler, or being handled).
    pub fn extended(&self) -> u32 {
        self.extended.extensions()
    }

    /// The service's counters.
    pub fn metrics(&self) -> &Metrics {
        self.metrics
    }
}

impl fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("message", self.message)
            .field("attempt", &self.attempt)
            .field("run", &self.run())
            .field("extended", &self.extended())
            .finish()
    }
}

/// Handles one message; the runner acks it on `Ok`, nacks it on an `Err` to retry, and
/// dead-letters it at once on [`HandleError::Rejected`] (see [`HandleError`]).
///
/// While the returned future runs, the runner keeps the message's lease alive, so a handler
/// need not care about ack deadlines. The future must not block its thread: it runs on the
/// executor with the handlers of other messages. A panic inside it is caught by the runner
/// and starts a graceful shutdown.
///
/// ```
/// use mayhem::{Context, HandleError, Handler};
///
/// struct Accept;
///
/// impl Handler for Accept {
///     async fn handle(&self, ctx: &Context<'_>) -> Result<(), HandleError> {
///         assert!(ctx.attempt() >= 1);
///         if ctx.data().is_empty() {
///             // Retrying cannot help: dead-letter it now, with the reason.
///             return Err(HandleError::reject("empty data"));
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Handles the message of `ctx`.
    fn handle(&self, ctx: &Context<'_>) -> impl Future<Output = Result<(), HandleError>> + Send;
}

/// Settings of the [`MayhemHandler`].
///
/// Settings may be added in minor releases (`#[non_exhaustive]`): start from
/// [`MayhemConfig::default`] or [`MayhemConfig::from_config`] and set fields.
///
/// ```
/// let mut settings = mayhem::MayhemConfig::default();
/// settings.restart_failure_rate = 0.0;
/// settings.seed = 42;
/// let handler = mayhem::MayhemHandler::new(settings);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MayhemConfig {
    /// Upper bound of each simulated I/O step (restart, save, cleanup); zero = none.
    pub latency: Duration,
    /// Probability that one restart attempt fails.
    pub restart_failure_rate: f64,
    /// Probability that the save fails.
    pub save_failure_rate: f64,
    /// Probability that handling panics (fault injection).
    pub panic_rate: f64,
    /// Probability that handling blocks the executor thread for `stall` (fault injection).
    pub stall_rate: f64,
    /// How long an injected stall blocks the thread.
    pub stall: Duration,
    /// Retries of a failed restart before giving up.
    pub restart_retries: u32,
    /// Seed of the handler's random choices; each message draws from its own stream derived
    /// from this seed, its id, its attempt and the handler's [`run`](Context::run) within
    /// the attempt, so outcomes do not depend on scheduling.
    pub seed: u64,
    /// Connections of the simulated database (`--db-capacity`): past this many saves at once,
    /// saves wait in line for one, so their latency grows with the line. `None` = unlimited.
    /// [`MayhemHandler::set_db_capacity`] changes it while the service runs.
    pub db_capacity: Option<usize>,
    /// How long a save waits for a connection before it fails (`--db-patience`).
    pub db_patience: Duration,
    /// When every save fails (`--db-outage AT+FOR`), counted from the handler's creation.
    pub db_outage: Option<Outage>,
    /// The domain of the hosts: a message with data `web-01` restarts `web-01.{domain}`.
    pub domain: String,
}

/// The default [`MayhemConfig::domain`].
pub const DEFAULT_DOMAIN: &str = "example.net";

impl Default for MayhemConfig {
    /// The handler settings of the default [`Config`], with seed 0.
    fn default() -> Self {
        MayhemConfig::from_config(&Config::default(), 0)
    }
}

impl MayhemConfig {
    /// The handler settings of a service configuration, with the given seed.
    pub fn from_config(config: &Config, seed: u64) -> Self {
        MayhemConfig {
            latency: config.handler.latency,
            restart_failure_rate: config.handler.restart_failure_rate,
            save_failure_rate: config.handler.save_failure_rate,
            panic_rate: config.handler.panic_rate,
            stall_rate: config.handler.stall_rate,
            stall: config.handler.stall,
            restart_retries: config.handler.restart_retries,
            seed,
            db_capacity: None,
            db_patience: DEFAULT_DB_PATIENCE,
            db_outage: None,
            domain: config.handler.domain.clone(),
        }
    }
}

/// How long a save waits for a database connection before it fails, by default.
pub const DEFAULT_DB_PATIENCE: Duration = Duration::from_secs(1);

/// The chaos monkey: restarts the host and saves a record, concurrently, with simulated
/// latency and failures.
///
/// The instance name is the message data, a host name ([`PubSubMessage::instance_name`]);
/// the host is `{instance_name}.{domain}`, in lower case. Data that is no host name can never
/// succeed: it is rejected ([`HandleError::Rejected`]), so the runner dead-letters it at once.
///
/// A failed restart is retried up to `restart_retries` times with exponential backoff;
/// a restart that still fails, or a failed save, is an error (the message is nacked and
/// delivered again, until it is dead-lettered).
#[derive(Debug, Clone)]
pub struct MayhemHandler {
    /// The settings.
    config: MayhemConfig,
    /// The simulated database the saves go to (its pool is shared by the clones).
    database: Database,
}

impl MayhemHandler {
    /// A handler with these settings; a `db_outage` counts from now.
    pub fn new(config: MayhemConfig) -> Self {
        let database = Database::new(config.db_capacity, config.db_patience, config.db_outage);
        MayhemHandler { config, database }
    }

    /// The connections of the simulated database now (`db_capacity`, or what
    /// [`set_db_capacity`](Self::set_db_capacity) made it); `None` for an unlimited database.
    pub fn db_capacity(&self) -> Option<usize> {
        self.database.capacity()
    }

    /// Changes the connections of the simulated database while the service runs, as a
    /// downstream that degrades (or recovers) would: every clone of this handler shares the
    /// database, so an embedder keeps one and calls this from any thread while
    /// [`Runner::run`](crate::Runner::run) borrows it. Returns the capacity before.
    ///
    /// A capacity of 0 is taken as 1, as at creation. A larger pool lets saves waiting in
    /// line in at once; a smaller one takes no connection away (saves holding one finish as
    /// they would), new saves wait until fewer than the new capacity are in use.
    ///
    /// A handler made without `db_capacity` has an unlimited database, without a pool:
    /// this returns `None` and changes nothing.
    ///
    /// ```
    /// let mut settings = mayhem::MayhemConfig::default();
    /// settings.db_capacity = Some(2000);
    /// let handler = mayhem::MayhemHandler::new(settings);
    /// assert_eq!(handler.set_db_capacity(500), Some(2000));
    /// assert_eq!(handler.clone().db_capacity(), Some(500), "shared by the clones");
    /// let unlimited = mayhem::MayhemHandler::new(mayhem::MayhemConfig::default());
    /// assert_eq!(unlimited.set_db_capacity(500), None);
    /// ```
    pub fn set_db_capacity(&self, capacity: usize) -> Option<usize> {
        self.database.set_capacity(capacity)
    }

    /// A random stream for one run of the handler on one delivery of one message: the same
    /// seed replays the same outcomes, and a run again (a message the breaker held) draws
    /// new ones instead of failing again the same way for ever.
    ///
    /// A message without an id (RabbitMQ producers need not set `message-id`) draws from its
    /// data, its first 64 bytes and its length: with the empty id's digest alone, every such
    /// message drew the same outcomes, so all of them failed, or none, on each attempt.
    fn rng_for(&self, message: &PubSubMessage, attempt: u32, run: u32) -> fastrand::Rng {
        let identity = if message.id().is_empty() {
            let data = message.data();
            crate::message::fnv1a(&data[..data.len().min(64)]) ^ (data.len() as u64)
        } else {
            message.id().digest()
        };
        fastrand::Rng::with_seed(
            self.config.seed
                ^ identity
                ^ u64::from(attempt).rotate_left(40)
                ^ u64::from(run.saturating_sub(1)).rotate_left(20),
        )
    }

    /// Restarts the host, retrying failures with backoff.
    async fn restart_host(
        &self,
        ctx: &Context<'_>,
        hostname: Host<'_>,
        rng: &mut fastrand::Rng,
    ) -> Result<(), HandleError> {
        let mut backoff = (self.config.latency / 10).max(Duration::from_millis(1));
        let mut retries_left = self.config.restart_retries;
        loop {
            sleep_up_to(self.config.latency, rng).await;
            if !chance(rng, self.config.restart_failure_rate) {
                info!("Restarted {hostname}");
                return Ok(());
            }
            ctx.metrics().count_restart_failed();
            if retries_left == 0 {
                return Err(HandleError::RestartFailed {
                    hostname: hostname.to_string(),
                });
            }
            retries_left -= 1;
            error!("Retrying for failure to restart: {hostname}");
            ctx.metrics().count_restart_retried();
            if !self.config.latency.is_zero() {
                async_io::Timer::after(backoff).await;
                backoff = backoff.saturating_mul(2);
            }
        }
    }

    /// Saves a record of the message.
    async fn save(&self, ctx: &Context<'_>, rng: &mut fastrand::Rng) -> Result<(), HandleError> {
        // The connection is held for the whole save, as a pool's would be. Without a pool or
        // an outage there is none to take: no future is made, and the handler's own future
        // (in every task) does not grow by the pool's (boxed, so it is a pointer in it).
        let connection = if self.database.is_simulated() {
            match Box::pin(self.database.connect()).await {
                Ok((connection, waited)) => {
                    if waited {
                        ctx.metrics().count_db_queued();
                    }
                    Some(connection)
                }
                Err(unavailable) => return Err(self.unavailable(ctx, unavailable)),
            }
        } else {
            None
        };
        sleep_up_to(self.config.latency, rng).await;
        // A save still running when the outage begins fails too.
        if self.database.is_down() {
            return Err(self.unavailable(ctx, Unavailable::Outage));
        }
        drop(connection);
        if chance(rng, self.config.save_failure_rate) {
            ctx.metrics().count_save_failed();
            return Err(HandleError::SaveFailed {
                message: ctx.message().to_string(),
            });
        }
        info!("Saved {} into database", ctx.message());
        Ok(())
    }
}

impl MayhemHandler {
    /// Counts a save the database could not take, as a failed save.
    fn unavailable(&self, ctx: &Context<'_>, why: Unavailable) -> HandleError {
        match why {
            Unavailable::Outage => ctx.metrics().count_db_outage(),
            Unavailable::Busy => ctx.metrics().count_db_gave_up(),
        }
        ctx.metrics().count_save_failed();
        HandleError::SaveFailed {
            message: ctx.message().to_string(),
        }
    }
}

impl Handler for MayhemHandler {
    async fn handle(&self, ctx: &Context<'_>) -> Result<(), HandleError> {
        let name = ctx.message().instance_name().map_err(HandleError::reject)?;
        // Displayed, not built: no allocation per message unless a line is really logged.
        let hostname = Host {
            name,
            domain: &self.config.domain,
        };
        let mut rng = self.rng_for(ctx.message(), ctx.attempt(), ctx.run());
        if chance(&mut rng, self.config.panic_rate) {
            panic!("injected fault while handling {}", ctx.message());
        }
        if chance(&mut rng, self.config.stall_rate) {
            // Deliberately wrong: a blocking call inside a future. It stops this executor
            // thread, so leases go unextended; the fault tests rely on exactly that.
            std::thread::sleep(self.config.stall);
        }
        let mut restart_rng = rng.fork();
        let mut save_rng = rng.fork();
        let (restarted, saved) = future::zip(
            self.restart_host(ctx, hostname, &mut restart_rng),
            self.save(ctx, &mut save_rng),
        )
        .await;
        // Examine the results, as the reference's handle_results does.
        for result in [&restarted, &saved] {
            if let Err(error) = result {
                error!("Handling general error: {error}");
            }
        }
        // Cleanup: simulated latency; the runner acks (or nacks) afterwards.
        sleep_up_to(self.config.latency, &mut rng).await;
        restarted.and(saved)
    }
}

/// The host to restart, `{instance_name}.{domain}` in lower case, displayed on demand.
#[derive(Debug, Clone, Copy)]
pub struct Host<'a> {
    /// The instance name: a host name, checked.
    name: &'a str,
    /// The domain.
    domain: &'a str,
}

impl fmt::Display for Host<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        // Host names compare case-insensitively: shown in their canonical lower case.
        for c in self.name.chars() {
            f.write_char(c.to_ascii_lowercase())?;
        }
        f.write_char('.')?;
        f.write_str(self.domain)
    }
}

/// Whether an event of probability `rate` happens; exact at 0 and 1.
fn chance(rng: &mut fastrand::Rng, rate: f64) -> bool {
    rate >= 1.0 || (rate > 0.0 && rng.f64() < rate)
}

/// Sleeps a random time in `[0, max)`; no timer at all when `max` is zero.
async fn sleep_up_to(max: Duration, rng: &mut fastrand::Rng) {
    if max.is_zero() {
        return;
    }
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    async_io::Timer::after(Duration::from_nanos(rng.u64(..nanos))).await;
}
