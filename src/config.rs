//! The service's settings: one section per component, each with its defaults and its checks.

use std::time::Duration;

use crate::error::ConfigError;
use crate::source::memory::SubscriptionConfig;

/// Longest duration any setting accepts (one day); longer values are surely mistakes.
const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);
/// Shortest interval of the stats line (at most 20 lines a second).
const MIN_STATS_INTERVAL: Duration = Duration::from_millis(50);
/// Largest thread count for publishers, consumers and executor workers.
const MAX_THREADS: usize = 1024;
/// Largest flow-control window.
const MAX_IN_FLIGHT: usize = 10_000_000;
/// The default [`RunConfig::max_in_flight_bytes`]: 100 MiB, as Pub/Sub's clients.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 100 * 1024 * 1024;
/// Longest ack deadline, as in Google Cloud Pub/Sub.
const MAX_ACK_DEADLINE: Duration = Duration::from_secs(600);

/// Every setting of the service, in one section per component; the defaults are those of the
/// command line, stated once in each section's `Default`.
///
/// Build one with [`Config::default`], change fields, then hand it to [`Runner`](crate::Runner),
/// whose `run` calls [`Config::validate`] first. Each section also checks itself
/// ([`RunConfig::validate`] and so on), so a component built from one section alone can refuse
/// bad values where it is built.
///
/// ```
/// use std::time::Duration;
/// let mut config = mayhem::Config::default();
/// config.lease.extend_interval = Duration::from_secs(5); // not below the 3 s ack deadline
/// let error = config.validate().unwrap_err();
/// assert_eq!(error.option, "--extend-interval");
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    /// Threads, flow control and the end of the run.
    pub run: RunConfig,
    /// The publisher threads.
    pub publish: PublishConfig,
    /// Leases: how long they last, how they are extended, when a message is dead.
    pub lease: LeaseConfig,
    /// The chaos monkey's handler.
    pub handler: HandlerConfig,
    /// The embedded in-memory broker.
    pub memory: MemoryConfig,
}

/// Threads, flow control and the end of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// Consumer threads that pull deliveries and hand them to the executor.
    pub consumers: usize,
    /// Executor worker threads that run the async handlers.
    pub workers: usize,
    /// Flow control: the most leases held (pulled and not yet settled); with
    /// `adaptive_window`, the most the window may grow to.
    pub max_in_flight: usize,
    /// `--max-in-flight auto`: the window tunes itself for goodput, from 1,000 up to
    /// `max_in_flight`, on the measured handling times and acks (see the README).
    pub adaptive_window: bool,
    /// Flow control by size: the most bytes of messages handed to handlers and not settled
    /// yet ([`PubSubMessage::size`](crate::PubSubMessage::size): data and attributes). A
    /// pulled message that would go past it waits, held and extended, until handlers settle
    /// enough; a single message larger than the limit is still handed over, alone, so that
    /// nothing deadlocks.
    pub max_in_flight_bytes: usize,
    /// Publish this many messages, wait until each is acked or dead-lettered, then stop.
    /// `None` runs until shut down.
    pub messages: Option<u64>,
    /// Seed of every random choice (message contents, latencies, failures); `None` draws one.
    pub seed: Option<u64>,
    /// On shutdown, how long handlers in flight may take to finish before they are cancelled.
    pub grace_period: Duration,
    /// How often a stats line is logged at info level (zero = never).
    pub stats_interval: Duration,
    /// Warn about each handler still running after this long (`None` = never).
    pub debug_slow: Option<Duration>,
    /// Warn about each handler poll that blocks an executor thread longer than this
    /// (`None` = not measured, which saves two clock reads per poll).
    pub blocking_threshold: Option<Duration>,
}

/// The publisher threads.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishConfig {
    /// Publisher threads that create messages and publish them (0 = none: the embedder
    /// publishes itself).
    pub publishers: usize,
    /// Upper bound of a publisher's random pause between two messages (zero = no pause).
    pub interval: Duration,
}

/// Leases: how long they last, how the lease manager extends them, when a message is dead.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseConfig {
    /// How long a pulled message stays leased without an extension. With
    /// `auto_ack_deadline`, the source's deadline at the pull only.
    pub ack_deadline: Duration,
    /// `--ack-deadline auto`: the lease manager asks the source for the p99 of the handling
    /// times so far, within 10 s..10 min, as Google's client libraries do, and extends a lease
    /// once a third of that is left (`extend_interval` is then not used).
    pub auto_ack_deadline: bool,
    /// A held lease is extended once it is this old since its last extension (below
    /// `ack_deadline`).
    pub extend_interval: Duration,
    /// Past this time since its pull, a lease is no longer extended (a warning names the
    /// message): a handler stuck for that long gives its message to another consumer.
    pub max_lease: Duration,
    /// Deliveries of one message before it is dead-lettered.
    pub max_attempts: u32,
}

/// The chaos monkey's handler ([`MayhemHandler`](crate::MayhemHandler)).
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerConfig {
    /// Upper bound of each simulated I/O step (zero = no latency).
    pub latency: Duration,
    /// Probability that one restart attempt fails.
    pub restart_failure_rate: f64,
    /// Probability that saving the record fails.
    pub save_failure_rate: f64,
    /// Probability that handling a message panics (fault injection; 0 in normal use).
    pub panic_rate: f64,
    /// Probability that a handler blocks its executor thread for `stall` (fault injection of
    /// a misbehaving handler; 0 in normal use).
    pub stall_rate: f64,
    /// How long an injected stall blocks the thread.
    pub stall: Duration,
    /// Retries of a failed restart before the handler gives up (the reference only logs).
    pub restart_retries: u32,
    /// The domain of the hosts restarted: data `web-01` restarts `web-01.{domain}`.
    pub domain: String,
}

/// The embedded in-memory broker.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryConfig {
    /// Most messages held ready before publishing blocks (backpressure on the publishers).
    pub max_backlog: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            consumers: 1,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_in_flight: 1000,
            adaptive_window: false,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            messages: None,
            seed: None,
            grace_period: Duration::from_secs(5),
            stats_interval: Duration::from_secs(10),
            debug_slow: None,
            blocking_threshold: None,
        }
    }
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig {
            publishers: 1,
            interval: Duration::from_secs(1),
        }
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ack_deadline: Duration::from_secs(3),
            auto_ack_deadline: false,
            extend_interval: Duration::from_secs(2),
            max_lease: Duration::from_secs(3600),
            max_attempts: 5,
        }
    }
}

impl Default for HandlerConfig {
    fn default() -> Self {
        HandlerConfig {
            latency: Duration::from_secs(1),
            restart_failure_rate: 0.25,
            save_failure_rate: 0.25,
            panic_rate: 0.0,
            stall_rate: 0.0,
            stall: Duration::from_secs(5),
            restart_retries: 3,
            domain: crate::handler::DEFAULT_DOMAIN.to_owned(),
        }
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            max_backlog: 10_000,
        }
    }
}

impl Config {
    /// The settings of the in-memory subscription that this configuration describes.
    pub fn subscription(&self) -> SubscriptionConfig {
        SubscriptionConfig {
            ack_deadline: self.lease.ack_deadline,
            max_attempts: self.lease.max_attempts,
            max_backlog: self.memory.max_backlog,
        }
    }

    /// Checks every section.
    ///
    /// # Errors
    ///
    /// The first bad setting, named by its command-line flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.run.validate()?;
        self.publish.validate()?;
        self.lease.validate()?;
        self.handler.validate()?;
        self.memory.validate()
    }
}

impl RunConfig {
    /// Checks every value.
    ///
    /// # Errors
    ///
    /// The first bad setting, named by its command-line flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        count("--consumers", self.consumers, 1, MAX_THREADS)?;
        count("--workers", self.workers, 1, MAX_THREADS)?;
        count("--max-in-flight", self.max_in_flight, 1, MAX_IN_FLIGHT)?;
        count(
            "--max-in-flight-bytes",
            self.max_in_flight_bytes,
            1,
            usize::MAX,
        )?;
        duration(
            "--grace-period",
            self.grace_period,
            Duration::ZERO,
            Duration::from_secs(3600),
        )?;
        // Zero turns the line off; above zero, a floor: the line is logged at that pace, and
        // a nanosecond would be a log storm (a million lines a second).
        if !self.stats_interval.is_zero() {
            duration(
                "--stats-interval",
                self.stats_interval,
                MIN_STATS_INTERVAL,
                MAX_DURATION,
            )
            .map_err(|error| ConfigError {
                reason: format!(
                    "must be 0 (off) or between {} and {}",
                    humantime::format_duration(MIN_STATS_INTERVAL),
                    humantime::format_duration(MAX_DURATION)
                ),
                ..error
            })?;
        }
        if let Some(limit) = self.debug_slow {
            duration(
                "--debug-slow",
                limit,
                Duration::from_millis(1),
                MAX_DURATION,
            )?;
        }
        if let Some(threshold) = self.blocking_threshold {
            duration(
                "--blocking-threshold",
                threshold,
                Duration::from_micros(1),
                MAX_DURATION,
            )?;
        }
        Ok(())
    }
}

impl PublishConfig {
    /// Checks every value.
    ///
    /// # Errors
    ///
    /// The first bad setting, named by its command-line flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        count("--publishers", self.publishers, 0, MAX_THREADS)?;
        duration(
            "--publish-interval",
            self.interval,
            Duration::ZERO,
            MAX_DURATION,
        )
    }
}

impl LeaseConfig {
    /// Checks every value and the relations between them.
    ///
    /// # Errors
    ///
    /// The first bad setting, named by its command-line flag.
    ///
    /// ```
    /// use std::time::Duration;
    /// let lease = mayhem::LeaseConfig {
    ///     max_lease: Duration::from_secs(1), // shorter than the 3 s ack deadline
    ///     ..mayhem::LeaseConfig::default()
    /// };
    /// assert_eq!(lease.validate().unwrap_err().option, "--max-lease");
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        duration(
            "--ack-deadline",
            self.ack_deadline,
            Duration::from_millis(10),
            MAX_ACK_DEADLINE,
        )?;
        duration(
            "--extend-interval",
            self.extend_interval,
            Duration::from_millis(1),
            MAX_ACK_DEADLINE,
        )?;
        if self.extend_interval >= self.ack_deadline {
            return Err(ConfigError::new(
                "--extend-interval",
                humantime::format_duration(self.extend_interval),
                format!(
                    "must be below --ack-deadline ({})",
                    humantime::format_duration(self.ack_deadline)
                ),
            ));
        }
        duration(
            "--max-lease",
            self.max_lease,
            self.ack_deadline,
            MAX_DURATION,
        )?;
        count("--max-attempts", self.max_attempts as usize, 1, 1000)
    }
}

impl HandlerConfig {
    /// Checks every value.
    ///
    /// # Errors
    ///
    /// The first bad setting, named by its command-line flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        duration(
            "--handler-latency",
            self.latency,
            Duration::ZERO,
            MAX_DURATION,
        )?;
        rate("--restart-failure-rate", self.restart_failure_rate)?;
        rate("--save-failure-rate", self.save_failure_rate)?;
        rate("--panic-rate", self.panic_rate)?;
        rate("--stall-rate", self.stall_rate)?;
        duration(
            "--stall",
            self.stall,
            Duration::ZERO,
            Duration::from_secs(3600),
        )?;
        count("--restart-retries", self.restart_retries as usize, 0, 100)?;
        crate::message::host_name(self.domain.as_bytes())
            .map(|_| ())
            .map_err(|error| {
                let reason = error.to_string();
                let reason = reason
                    .strip_prefix("data is not a host name: ")
                    .unwrap_or(&reason);
                ConfigError::new(
                    "--domain",
                    &self.domain,
                    format!("must be a host name: {reason}"),
                )
            })
    }
}

impl MemoryConfig {
    /// Checks every value.
    ///
    /// # Errors
    ///
    /// The first bad setting, named by its command-line flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        count("--max-backlog", self.max_backlog, 1, MAX_IN_FLIGHT)
    }
}

/// Checks that a count lies in `min..=max`.
fn count(option: &'static str, value: usize, min: usize, max: usize) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::new(
            option,
            value,
            format!("must be between {min} and {max}"),
        ))
    }
}

/// Checks that a duration lies in `min..=max`.
pub(crate) fn duration(
    option: &'static str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::new(
            option,
            humantime::format_duration(value),
            format!(
                "must be between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ))
    }
}

/// Checks that a probability lies in `0..=1`.
fn rate(option: &'static str, value: f64) -> Result<(), ConfigError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::new(option, value, "must be between 0 and 1"))
    }
}

impl From<&Config> for SubscriptionConfig {
    fn from(config: &Config) -> Self {
        config.subscription()
    }
}
