//! The service's settings, one struct for all of them.

use std::time::Duration;

use crate::error::ConfigError;
use crate::source::memory::SubscriptionConfig;

/// Longest duration any setting accepts (one day); longer values are surely mistakes.
const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);
/// Largest thread count for publishers, consumers and executor workers.
const MAX_THREADS: usize = 1024;
/// Largest flow-control window.
const MAX_IN_FLIGHT: usize = 10_000_000;
/// Longest ack deadline, as in Google Cloud Pub/Sub.
const MAX_ACK_DEADLINE: Duration = Duration::from_secs(600);

/// Every setting of the service, with the defaults of the command line.
///
/// Build one with [`Config::default`], change fields, then hand it to [`run`](crate::run),
/// which calls [`Config::validate`] first.
///
/// ```
/// use std::time::Duration;
/// let mut config = mayhem::Config::default();
/// config.extend_interval = Duration::from_secs(5); // not below the 3 s ack deadline
/// let error = config.validate().unwrap_err();
/// assert_eq!(error.option, "--extend-interval");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Publisher threads that create messages and publish them (0 = none: the embedder
    /// publishes itself).
    pub publishers: usize,
    /// Consumer threads that pull deliveries and hand them to the executor.
    pub consumers: usize,
    /// Executor worker threads that run the async handlers.
    pub workers: usize,
    /// Flow control: the most messages pulled and not yet settled (acked or nacked).
    pub max_in_flight: usize,
    /// Upper bound of a publisher's random pause between two messages (zero = no pause).
    pub publish_interval: Duration,
    /// Upper bound of each simulated I/O step of the Mayhem handler (zero = no latency).
    pub handler_latency: Duration,
    /// Probability that one restart attempt fails.
    pub restart_failure_rate: f64,
    /// Probability that saving the record fails.
    pub save_failure_rate: f64,
    /// Probability that handling a message panics (fault injection; 0 in normal use).
    pub panic_rate: f64,
    /// Probability that a handler blocks its executor thread for `stall` (fault injection of
    /// a misbehaving handler: its lease cannot be extended meanwhile; 0 in normal use).
    pub stall_rate: f64,
    /// How long an injected stall blocks the thread.
    pub stall: Duration,
    /// Retries of a failed restart before the handler gives up (the reference only logs).
    pub restart_retries: u32,
    /// How long a pulled message stays leased without an extension.
    pub ack_deadline: Duration,
    /// How often a message being handled has its lease extended (below `ack_deadline`).
    pub extend_interval: Duration,
    /// Deliveries of one message before it is dead-lettered.
    pub max_attempts: u32,
    /// Past this time since its pull, a lease is no longer extended (a warning names the
    /// message): a handler stuck for that long gives its message to another consumer.
    pub max_lease: Duration,
    /// On shutdown, how long handlers in flight may take to finish before they are cancelled.
    pub grace_period: Duration,
    /// Publish this many messages, wait until each is acked or dead-lettered, then stop.
    /// `None` runs until shut down.
    pub messages: Option<u64>,
    /// Seed of every random choice (message contents, latencies, failures); `None` draws one.
    pub seed: Option<u64>,
    /// Most messages the in-memory subscription holds ready before publishing blocks
    /// (backpressure on the publishers).
    pub max_backlog: usize,
    /// How often a stats line is logged at info level (zero = never).
    pub stats_interval: Duration,
    /// Warn about each handler still running after this long (`None` = never).
    pub debug_slow: Option<Duration>,
    /// Warn about each handler poll that blocks an executor thread longer than this
    /// (`None` = not measured, which saves two clock reads per poll).
    pub blocking_threshold: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            publishers: 1,
            consumers: 1,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_in_flight: 1000,
            publish_interval: Duration::from_secs(1),
            handler_latency: Duration::from_secs(1),
            restart_failure_rate: 0.25,
            save_failure_rate: 0.25,
            panic_rate: 0.0,
            stall_rate: 0.0,
            stall: Duration::from_secs(5),
            restart_retries: 3,
            ack_deadline: Duration::from_secs(3),
            extend_interval: Duration::from_secs(2),
            max_attempts: 5,
            max_lease: Duration::from_secs(3600),
            grace_period: Duration::from_secs(5),
            messages: None,
            seed: None,
            max_backlog: 10_000,
            stats_interval: Duration::from_secs(10),
            debug_slow: None,
            blocking_threshold: None,
        }
    }
}

impl Config {
    /// The settings of the in-memory subscription that this configuration describes.
    pub fn subscription(&self) -> SubscriptionConfig {
        SubscriptionConfig {
            ack_deadline: self.ack_deadline,
            max_attempts: self.max_attempts,
            max_backlog: self.max_backlog,
        }
    }

    /// Checks every value and every relation between values.
    ///
    /// # Errors
    ///
    /// The first bad setting, named by its command-line flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        count("--publishers", self.publishers, 0, MAX_THREADS)?;
        count("--consumers", self.consumers, 1, MAX_THREADS)?;
        count("--workers", self.workers, 1, MAX_THREADS)?;
        count("--max-in-flight", self.max_in_flight, 1, MAX_IN_FLIGHT)?;
        count("--max-backlog", self.max_backlog, 1, MAX_IN_FLIGHT)?;
        duration(
            "--publish-interval",
            self.publish_interval,
            Duration::ZERO,
            MAX_DURATION,
        )?;
        duration(
            "--handler-latency",
            self.handler_latency,
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
        count("--max-attempts", self.max_attempts as usize, 1, 1000)?;
        duration(
            "--max-lease",
            self.max_lease,
            self.ack_deadline,
            MAX_DURATION,
        )?;
        duration(
            "--grace-period",
            self.grace_period,
            Duration::ZERO,
            Duration::from_secs(3600),
        )?;
        duration(
            "--stats-interval",
            self.stats_interval,
            Duration::ZERO,
            MAX_DURATION,
        )?;
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
fn duration(
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
