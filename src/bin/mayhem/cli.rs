//! The command line: every flag, also readable from a `MAYHEM_*` environment variable.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use log::LevelFilter;
use mayhem::database::Outage;
use mayhem::layer::{BreakerConfig, LayerConfig};
use mayhem::{Config, HandlerConfig, LeaseConfig, MemoryConfig, PublishConfig, RunConfig};

/// How long an open circuit breaker waits before its probe, unless `--breaker-cooldown` says.
const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(5);

/// What `-h` and `--help` show after the flags (one page for both: a long form would
/// double the length of the help for little gain).
const AFTER_HELP: &str = "\
Durations read like 250ms, 2s or 1m30s; a bare 0 means none. Every flag can also be set by its
MAYHEM_* variable; the command line wins. --report and --log-level ignore case.

Signals: SIGINT, SIGTERM, SIGHUP and SIGQUIT start the graceful shutdown (stop pulling, give
handlers --grace-period, nack the rest, print the report); a second one exits 130 at once.
SIGTSTP makes the service quiet (no pulling, no publishing; held messages are handled and
settled; /readyz answers 503), SIGCONT resumes. SIGUSR1 and SIGUSR2 are logged and ignored.

Exit codes: 0 graceful shutdown (after a signal, also during start-up, or --messages settled),
1 a handler panicked, the source failed for good, or the shutdown took longer than
--grace-period + 5s (a handler blocking its thread), 2 bad flags or environment variables,
130 forced by a second signal.

Logs go to stderr in local time and never block the service: lines stderr cannot take are
dropped and counted (\"N log lines dropped\").";

/// Mayhem: a mock chaos monkey that consumes "restart this host" messages from an in-memory
/// pub/sub subscription (or a Redis stream) and handles each one concurrently.
#[derive(Debug, Parser)]
#[command(
    name = "mayhem",
    version,
    about,
    long_about = None,
    allow_negative_numbers = true,
    max_term_width = 100,
    after_help = AFTER_HELP,
    // `mayhem --workers 2 publish ...` is refused: the service's flags mean nothing there.
    args_conflicts_with_subcommands = true
)]
pub(crate) struct Cli {
    /// Publisher threads, 0 to 1024 (0 = none).
    #[arg(long, env = "MAYHEM_PUBLISHERS", value_name = "N", default_value_t = PublishConfig::default().publishers)]
    publishers: usize,
    /// Consumer threads, 1 to 1024.
    #[arg(long, env = "MAYHEM_CONSUMERS", value_name = "N", default_value_t = RunConfig::default().consumers)]
    consumers: usize,
    /// Executor worker threads, 1 to 1024 [default: number of CPUs].
    #[arg(long, env = "MAYHEM_WORKERS", value_name = "N")]
    workers: Option<usize>,
    /// Most messages pulled and not yet acked or nacked, 1 to 10000000; auto: a window that
    /// tunes itself for goodput, 256 to 2000000.
    #[arg(
        long,
        env = "MAYHEM_MAX_IN_FLIGHT",
        value_name = "N|auto",
        default_value = RunConfig::default().max_in_flight.to_string(),
        value_parser = max_in_flight
    )]
    max_in_flight: MaxInFlight,
    /// Most bytes of data and attributes handed to handlers at once; the rest of a pull
    /// waits, held; a larger message is still handled, alone.
    #[arg(
        long,
        env = "MAYHEM_MAX_IN_FLIGHT_BYTES",
        value_name = "BYTES",
        default_value_t = RunConfig::default().max_in_flight_bytes
    )]
    max_in_flight_bytes: usize,
    /// Most messages waiting in the subscription before publishers block, 1 to 10000000.
    #[arg(
        long,
        env = "MAYHEM_MAX_BACKLOG",
        value_name = "N",
        default_value_t = MemoryConfig::default().max_backlog
    )]
    max_backlog: usize,
    /// Upper bound of a publisher's random pause between messages, up to 24h (0 = none).
    #[arg(long, env = "MAYHEM_PUBLISH_INTERVAL", value_name = "DUR", default_value = human(PublishConfig::default().interval), value_parser = duration, allow_hyphen_values = true)]
    publish_interval: Duration,
    /// Upper bound of each simulated I/O step of a handler, up to 24h (0 = none).
    #[arg(long, env = "MAYHEM_HANDLER_LATENCY", value_name = "DUR", default_value = human(HandlerConfig::default().latency), value_parser = duration, allow_hyphen_values = true)]
    handler_latency: Duration,
    /// Probability that one restart attempt fails, 0 to 1.
    #[arg(long, env = "MAYHEM_RESTART_FAILURE_RATE", value_name = "P", default_value_t = HandlerConfig::default().restart_failure_rate, value_parser = rate)]
    restart_failure_rate: f64,
    /// Probability that saving a record fails, 0 to 1.
    #[arg(long, env = "MAYHEM_SAVE_FAILURE_RATE", value_name = "P", default_value_t = HandlerConfig::default().save_failure_rate, value_parser = rate)]
    save_failure_rate: f64,
    /// Probability that handling a message panics, 0 to 1 (fault injection).
    #[arg(long, env = "MAYHEM_PANIC_RATE", value_name = "P", default_value_t = HandlerConfig::default().panic_rate, value_parser = rate)]
    panic_rate: f64,
    /// Probability that a handler blocks its thread for --stall, 0 to 1 (fault injection).
    #[arg(long, env = "MAYHEM_STALL_RATE", value_name = "P", default_value_t = HandlerConfig::default().stall_rate, value_parser = rate)]
    stall_rate: f64,
    /// How long an injected stall blocks an executor thread, up to 1h.
    #[arg(long, env = "MAYHEM_STALL", value_name = "DUR", default_value = human(HandlerConfig::default().stall), value_parser = duration, allow_hyphen_values = true)]
    stall: Duration,
    /// Retries of a failed restart before the message is nacked, 0 to 100.
    #[arg(
        long,
        env = "MAYHEM_RESTART_RETRIES",
        value_name = "N",
        default_value_t = HandlerConfig::default().restart_retries
    )]
    restart_retries: u32,
    /// Domain of the hosts restarted: data `web-01` restarts `web-01.DOMAIN`.
    #[arg(long, env = "MAYHEM_DOMAIN", value_name = "DOMAIN", default_value_t = HandlerConfig::default().domain)]
    domain: String,
    /// How long a pulled message stays leased without an extension, 10ms to 10m; auto: the
    /// p99 of handling times, within 10s..10m.
    #[arg(long, env = "MAYHEM_ACK_DEADLINE", value_name = "DUR|auto", default_value = human(LeaseConfig::default().ack_deadline), value_parser = ack_deadline, allow_hyphen_values = true)]
    ack_deadline: AckDeadline,
    /// How often a held lease is extended, from 1ms to below --ack-deadline.
    #[arg(long, env = "MAYHEM_EXTEND_INTERVAL", value_name = "DUR", default_value = human(LeaseConfig::default().extend_interval), value_parser = duration, allow_hyphen_values = true)]
    extend_interval: Duration,
    /// Deliveries of one message before it is dead-lettered, 1 to 1000.
    #[arg(
        long,
        env = "MAYHEM_MAX_ATTEMPTS",
        value_name = "N",
        default_value_t = LeaseConfig::default().max_attempts
    )]
    max_attempts: u32,
    /// Past this time since its pull a lease is no longer extended (a warning names the
    /// message); at least --ack-deadline, up to 24h.
    #[arg(long, env = "MAYHEM_MAX_LEASE", value_name = "DUR", default_value = human(LeaseConfig::default().max_lease), value_parser = duration, allow_hyphen_values = true)]
    max_lease: Duration,
    /// On shutdown, how long handlers in flight may take before they are cancelled, up to 1h.
    #[arg(long, env = "MAYHEM_GRACE_PERIOD", value_name = "DUR", default_value = human(RunConfig::default().grace_period), value_parser = duration, allow_hyphen_values = true)]
    grace_period: Duration,
    /// Publish N messages, handle them all, then exit [default: run until a signal].
    #[arg(long, env = "MAYHEM_MESSAGES", value_name = "N")]
    messages: Option<u64>,
    /// Seed of every random choice [default: random].
    #[arg(long, env = "MAYHEM_SEED", value_name = "N")]
    seed: Option<u64>,
    /// Drop a handler still running after DUR and nack its message, 1ms to 24h [default: none].
    #[arg(long, env = "MAYHEM_HANDLER_TIMEOUT", value_name = "DUR", value_parser = duration, allow_hyphen_values = true)]
    handler_timeout: Option<Duration>,
    /// Most handler starts a second, 1 to 10000000; a burst of N/5 (at least 1) [default: none].
    #[arg(long, env = "MAYHEM_RATE_LIMIT", value_name = "N")]
    rate_limit: Option<u32>,
    /// Circuit breaker: open after N handler failures in a row, 1 to 1000000 [default: off].
    #[arg(long, env = "MAYHEM_BREAKER_FAILURES", value_name = "N")]
    breaker_failures: Option<u32>,
    /// How long an open circuit breaker waits before it lets one message through as a probe,
    /// 1ms to 24h (with --breaker-failures).
    #[arg(long, env = "MAYHEM_BREAKER_COOLDOWN", value_name = "DUR", value_parser = duration, allow_hyphen_values = true)]
    breaker_cooldown: Option<Duration>,
    /// Connections of the simulated database, 1 to 10000000: past N saves at once, saves wait
    /// in line for one [default: unlimited].
    #[arg(long, env = "MAYHEM_DB_CAPACITY", value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    db_capacity: Option<u64>,
    /// How long a save waits for a database connection before it fails, 1ms to 24h.
    #[arg(long, env = "MAYHEM_DB_PATIENCE", value_name = "DUR", default_value = human(mayhem::handler::DEFAULT_DB_PATIENCE), value_parser = duration, allow_hyphen_values = true)]
    db_patience: Duration,
    /// Every save fails for FOR, starting AT after start-up, like 30s+10s [default: none].
    #[arg(long, env = "MAYHEM_DB_OUTAGE", value_name = "AT+FOR", value_parser = outage)]
    db_outage: Option<Outage>,
    /// Interval of the stats line logged at info level, up to 24h (0 = off).
    #[arg(long, env = "MAYHEM_STATS_INTERVAL", value_name = "DUR", default_value = human(RunConfig::default().stats_interval), value_parser = duration, allow_hyphen_values = true)]
    stats_interval: Duration,
    /// Warn about each handler still running after DUR [default: off].
    #[arg(long, env = "MAYHEM_DEBUG_SLOW", value_name = "DUR", value_parser = duration, allow_hyphen_values = true)]
    debug_slow: Option<Duration>,
    /// Warn about each handler poll that blocks an executor thread longer than DUR [default: off].
    #[arg(long, env = "MAYHEM_BLOCKING_THRESHOLD", value_name = "DUR", value_parser = duration, allow_hyphen_values = true)]
    blocking_threshold: Option<Duration>,
    /// Serve Prometheus metrics on /metrics and health on /healthz at HOST:PORT [default: off].
    #[arg(long, env = "MAYHEM_METRICS_ADDR", value_name = "HOST:PORT", value_parser = socket_addr)]
    pub(crate) metrics_addr: Option<SocketAddr>,
    /// Format of the final report on stdout.
    #[arg(long, env = "MAYHEM_REPORT", value_name = "FORMAT", value_enum, ignore_case = true, default_value_t = ReportFormat::Text)]
    pub(crate) report: ReportFormat,
    /// Where messages come from: memory (the embedded pub/sub), redis://HOST:PORT/DB,
    /// amqp://USER:PASS@HOST:PORT/VHOST (RabbitMQ, feature amqp; amqps://, feature amqp-tls)
    /// or pubsub://PROJECT/SUBSCRIPTION (Google Cloud Pub/Sub, feature pubsub; parameters
    /// ?topic=NAME and &ordering=true; PUBSUB_EMULATOR_HOST selects the emulator).
    #[arg(long, env = "MAYHEM_SOURCE", value_name = "SOURCE", default_value = "memory", value_parser = SourceParser)]
    pub(crate) source: SourceKind,
    /// PEM file of CA certificates to trust for an amqps:// source, besides the system's.
    #[cfg(feature = "amqp")]
    #[arg(long, env = "MAYHEM_AMQP_CA_FILE", value_name = "PATH", value_parser = ca_file)]
    amqp_ca_file: Option<std::path::PathBuf>,
    /// Connections publishing to RabbitMQ, 1 to 16, taken in turn by the batches (more than
    /// one gives up the order between batches) [default: 2].
    #[cfg(feature = "amqp")]
    #[arg(long, env = "MAYHEM_AMQP_PUBLISH_CONNECTIONS", value_name = "N", value_parser = clap::value_parser!(u8).range(1..=mayhem::source::amqp::MAX_PUBLISH_CONNECTIONS as i64))]
    amqp_publish_connections: Option<u8>,
    /// Redis stream, or RabbitMQ quorum queue, published to and consumed from (dead letters
    /// go to `{stream}:dead`).
    #[arg(long, env = "MAYHEM_STREAM", value_name = "NAME", default_value = "mayhem", value_parser = name)]
    stream: String,
    /// Redis consumer group; instances sharing it split the messages (RabbitMQ: unused, every
    /// consumer of a queue competes).
    #[arg(long, env = "MAYHEM_GROUP", value_name = "NAME", default_value = "mayhem", value_parser = name)]
    group: String,
    /// This instance's consumer name in the group [default: hostname-pid].
    #[arg(long, env = "MAYHEM_CONSUMER_NAME", value_name = "NAME", value_parser = name)]
    consumer_name: Option<String>,
    /// How long Redis or RabbitMQ may stay unreachable (or keep failing) before the service gives up
    /// and exits 1; start-up retries as long.
    #[arg(long, env = "MAYHEM_RECONNECT_LIMIT", value_name = "DUR", default_value = "30s", value_parser = duration, allow_hyphen_values = true)]
    reconnect_limit: Duration,
    /// Time to live of the Redis consumer name's liveness key: a restart under the same name
    /// waits at most this long for a killed predecessor's key to expire.
    #[arg(long, env = "MAYHEM_CONSUMER_TTL", value_name = "DUR", default_value = "5s", value_parser = duration, allow_hyphen_values = true)]
    consumer_ttl: Duration,
    /// How often entries every Redis consumer group has acked are trimmed (0 = never).
    #[arg(long, env = "MAYHEM_TRIM_INTERVAL", value_name = "DUR", default_value = "1s", value_parser = duration, allow_hyphen_values = true)]
    trim_interval: Duration,
    /// Approximate bound of the Redis dead-letter stream `{stream}:dead`.
    #[arg(
        long,
        env = "MAYHEM_DEAD_LETTER_MAX",
        value_name = "N",
        default_value_t = 100_000
    )]
    dead_letter_max: u64,
    /// Most verbose log level written to stderr.
    #[arg(long, env = "MAYHEM_LOG_LEVEL", value_name = "LEVEL", value_enum, ignore_case = true, default_value_t = LogLevel::Info)]
    log_level: LogLevel,
    /// Per-module levels over --log-level, RUST_LOG-style, like mayhem::pipeline::consumer=debug,warn.
    #[arg(long, env = "MAYHEM_LOG_FILTER", value_name = "DIRECTIVES")]
    pub(crate) log_filter: Option<String>,
    /// Without a command, mayhem runs the service.
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

/// The subcommands; without one, mayhem runs the service.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Publish messages to a broker (Redis or RabbitMQ) and print their ids once confirmed.
    Publish(crate::publish::PublishArgs),
}

/// Where messages come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SourceKind {
    /// The embedded in-memory pub/sub.
    Memory,
    /// A Redis server at this URL.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Redis(String),
    /// A RabbitMQ server at this URL.
    #[cfg_attr(not(feature = "amqp"), allow(dead_code))]
    Amqp(String),
    /// A Google Cloud Pub/Sub subscription, `pubsub://PROJECT/SUBSCRIPTION`.
    #[cfg_attr(not(feature = "pubsub"), allow(dead_code))]
    PubSub(String),
}

/// `--max-in-flight`: a fixed window, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MaxInFlight {
    /// A fixed window.
    Fixed(usize),
    /// A window that tunes itself, up to `mayhem::AUTO_CEILING`.
    Auto,
}

/// `--ack-deadline`: a fixed duration, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckDeadline {
    /// The same deadline for every lease.
    Fixed(Duration),
    /// The p99 of the handling times, within 10 s..10 min.
    Auto,
}

/// The source's deadline at the pull with `--ack-deadline auto`: the least the lease manager
/// then asks for.
const AUTO_START_DEADLINE: Duration = Duration::from_secs(10);

/// How the final report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ReportFormat {
    // Plain comments, not doc comments: clap would show doc comments as a long help and
    // turn `--help` into a page twice as long.
    // One `name value` line per counter.
    Text,
    // One JSON object on one line.
    Json,
}

/// The log levels a user can pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Cli {
    /// The service configuration; the seed is drawn here when not given, so the handler and
    /// the publishers share it.
    pub(crate) fn config(&self) -> Config {
        let defaults = Config::default();
        Config {
            run: RunConfig {
                consumers: self.consumers,
                workers: self.workers.unwrap_or(defaults.run.workers),
                max_in_flight: match self.max_in_flight {
                    MaxInFlight::Fixed(window) => window,
                    MaxInFlight::Auto => mayhem::AUTO_CEILING,
                },
                adaptive_window: self.max_in_flight == MaxInFlight::Auto,
                max_in_flight_bytes: self.max_in_flight_bytes,
                messages: self.messages,
                seed: Some(self.seed.unwrap_or_else(|| fastrand::u64(..))),
                grace_period: self.grace_period,
                stats_interval: self.stats_interval,
                debug_slow: self.debug_slow,
                blocking_threshold: self.blocking_threshold,
            },
            publish: PublishConfig {
                publishers: self.publishers,
                interval: self.publish_interval,
            },
            lease: LeaseConfig {
                ack_deadline: match self.ack_deadline {
                    AckDeadline::Fixed(deadline) => deadline,
                    AckDeadline::Auto => AUTO_START_DEADLINE,
                },
                auto_ack_deadline: self.ack_deadline == AckDeadline::Auto,
                extend_interval: self.extend_interval,
                max_lease: self.max_lease,
                max_attempts: self.max_attempts,
            },
            handler: HandlerConfig {
                latency: self.handler_latency,
                restart_failure_rate: self.restart_failure_rate,
                save_failure_rate: self.save_failure_rate,
                panic_rate: self.panic_rate,
                stall_rate: self.stall_rate,
                stall: self.stall,
                restart_retries: self.restart_retries,
                domain: self.domain.clone(),
            },
            memory: MemoryConfig {
                max_backlog: self.max_backlog,
            },
        }
    }

    /// The layers around the chaos monkey; a `--handler-timeout` of 0 means none.
    pub(crate) fn layers(&self) -> LayerConfig {
        LayerConfig {
            handler_timeout: self.handler_timeout.filter(|limit| !limit.is_zero()),
            rate_limit: self.rate_limit,
            breaker: self.breaker_failures.map(|failures| BreakerConfig {
                failures,
                cooldown: self.breaker_cooldown.unwrap_or(DEFAULT_BREAKER_COOLDOWN),
            }),
        }
    }

    /// The chaos monkey's settings: those of `config`, and its simulated database's.
    pub(crate) fn handler(&self, config: &Config, seed: u64) -> mayhem::MayhemConfig {
        let mut settings = mayhem::MayhemConfig::from_config(config, seed);
        settings.db_capacity = self
            .db_capacity
            .map(|capacity| usize::try_from(capacity).unwrap_or(usize::MAX));
        settings.db_patience = self.db_patience;
        settings.db_outage = self.db_outage;
        settings
    }

    /// The settings of the Redis source (the URL is taken from `--source`).
    #[cfg(feature = "redis")]
    pub(crate) fn redis_config(&self, url: &str, config: &Config) -> mayhem::RedisConfig {
        mayhem::RedisConfig {
            url: url.to_owned(),
            stream: self.stream.clone(),
            group: self.group.clone(),
            consumer: self
                .consumer_name
                .clone()
                .unwrap_or_else(default_consumer_name),
            ack_deadline: config.lease.ack_deadline,
            max_attempts: config.lease.max_attempts,
            reconnect_limit: self.reconnect_limit,
            liveness_ttl: self.consumer_ttl,
            trim_interval: self.trim_interval,
            dead_letter_max: self.dead_letter_max,
            ..mayhem::RedisConfig::default()
        }
    }

    /// The settings of the RabbitMQ source (the URL is taken from `--source`); the prefetch
    /// is the flow-control window, `--max-in-flight` (at most 65535).
    #[cfg(feature = "amqp")]
    pub(crate) fn amqp_config(&self, url: &str, config: &Config) -> mayhem::AmqpConfig {
        mayhem::AmqpConfig {
            url: url.to_owned(),
            queue: self.stream.clone(),
            ack_deadline: config.lease.ack_deadline,
            max_attempts: config.lease.max_attempts,
            prefetch: u16::try_from(config.run.max_in_flight).unwrap_or(u16::MAX),
            reconnect_limit: self.reconnect_limit,
            ca_file: self.amqp_ca_file.clone(),
            publish_connections: self.amqp_publish_connections.map_or(
                mayhem::AmqpConfig::default().publish_connections,
                usize::from,
            ),
        }
    }

    /// The settings of the Pub/Sub source (the URL is taken from `--source`; the emulator
    /// from `PUBSUB_EMULATOR_HOST`).
    #[cfg(feature = "pubsub")]
    pub(crate) fn pubsub_config(&self, url: &str, config: &Config) -> mayhem::PubSubConfig {
        mayhem::PubSubConfig {
            url: url.to_owned(),
            ack_deadline: config.lease.ack_deadline,
            max_attempts: config.lease.max_attempts,
            reconnect_limit: self.reconnect_limit,
            ..mayhem::PubSubConfig::default()
        }
    }

    /// Checks what clap and `Config::validate` cannot: combinations that can never finish.
    ///
    /// # Errors
    ///
    /// A one-line description naming the flags.
    pub(crate) fn check(&self) -> Result<(), String> {
        #[cfg(feature = "amqp")]
        if self.amqp_ca_file.is_some()
            && !matches!(&self.source, SourceKind::Amqp(url) if url.starts_with("amqps://"))
        {
            return Err("--amqp-ca-file is only used with an amqps:// --source".to_owned());
        }
        #[cfg(feature = "amqp")]
        if self.amqp_publish_connections.is_some() && !matches!(&self.source, SourceKind::Amqp(_)) {
            return Err(
                "--amqp-publish-connections is only used with an amqp:// or amqps:// --source"
                    .to_owned(),
            );
        }
        if self.breaker_cooldown.is_some() && self.breaker_failures.is_none() {
            return Err(
                "--breaker-cooldown is only used with --breaker-failures (the breaker is off)"
                    .to_owned(),
            );
        }
        if !(Duration::from_millis(1)..=Duration::from_secs(24 * 3600)).contains(&self.db_patience)
        {
            return Err(format!(
                "invalid value '{}' for '--db-patience': must be between 1ms and 1day",
                humantime::format_duration(self.db_patience)
            ));
        }
        // Only the binary refuses this: a library embedder may publish by itself.
        if let (SourceKind::Memory, Some(messages @ 1..), 0) =
            (&self.source, self.messages, self.publishers)
        {
            return Err(format!(
                "--messages {messages} can never finish with --publishers 0 on the in-memory \
                 source: nothing publishes (use --publishers 1 or more)"
            ));
        }
        // The Redis settings the source would refuse only once connecting, or that would
        // hammer the server: refused here, named by their flags, before anything starts.
        #[cfg(feature = "redis")]
        mayhem::RedisConfig {
            liveness_ttl: self.consumer_ttl,
            trim_interval: self.trim_interval,
            ..mayhem::RedisConfig::default()
        }
        .validate()
        .map_err(|error| error.to_string())?;
        Ok(())
    }

    /// The log level filter.
    pub(crate) fn log_level(&self) -> LevelFilter {
        match self.log_level {
            LogLevel::Off => LevelFilter::Off,
            LogLevel::Error => LevelFilter::Error,
            LogLevel::Warn => LevelFilter::Warn,
            LogLevel::Info => LevelFilter::Info,
            LogLevel::Debug => LevelFilter::Debug,
            LogLevel::Trace => LevelFilter::Trace,
        }
    }
}

/// Finds a command-line argument or `MAYHEM_*` variable that is not UTF-8, which clap
/// refuses without naming it (`invalid UTF-8 was detected in one or more arguments`).
///
/// # Errors
///
/// One line naming the flag or the variable; not the value, which may hold a password
/// (`--source`) and does not print anyway.
pub(crate) fn check_utf8(
    args: impl IntoIterator<Item = std::ffi::OsString>,
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<(), String> {
    check_utf8_for(&<Cli as clap::CommandFactory>::command(), args, env)
}

/// [`check_utf8`] for the arguments and variables of `command` (the first argument is its
/// name).
///
/// # Errors
///
/// As [`check_utf8`].
pub(crate) fn check_utf8_for(
    command: &clap::Command,
    args: impl IntoIterator<Item = std::ffi::OsString>,
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<(), String> {
    let mut previous: Option<String> = None;
    for arg in args.into_iter().skip(1) {
        let Some(text) = arg.to_str() else {
            let shown = arg.to_string_lossy();
            let flag = match shown.split_once('=') {
                Some((flag, _)) if flag.starts_with("--") => flag.to_owned(),
                _ => previous
                    .filter(|flag| flag.starts_with('-'))
                    .unwrap_or_else(|| "an argument".to_owned()),
            };
            return Err(format!("invalid value for '{flag}': not valid UTF-8"));
        };
        previous = Some(text.to_owned());
    }
    for arg in command.get_arguments() {
        let (Some(name), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        let Some(name) = name.to_str() else { continue };
        if env(name).is_some_and(|value| value.to_str().is_none()) {
            return Err(format!(
                "invalid value for '{name}' (the variable of '--{long}'): not valid UTF-8"
            ));
        }
    }
    Ok(())
}

/// Parses a duration like `250ms`, `2s` or `1m 30s`; a bare `0` means none.
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text.trim())
        .map_err(|error| format!("{error} (write a duration like 250ms or 2s)"))
}

/// Checks `--amqp-ca-file`: a readable file holding a PEM certificate.
#[cfg(feature = "amqp")]
pub(crate) fn ca_file(text: &str) -> Result<std::path::PathBuf, String> {
    let path = std::path::PathBuf::from(text);
    mayhem::source::amqp::read_ca_file(&path)
        .map(|_| path)
        .map_err(|error| match error {
            mayhem::SourceError::Backend(text) => text,
            other => other.to_string(),
        })
}

/// Parses `--max-in-flight`: a count, or `auto` (any case).
fn max_in_flight(text: &str) -> Result<MaxInFlight, String> {
    if text.trim().eq_ignore_ascii_case("auto") {
        return Ok(MaxInFlight::Auto);
    }
    text.trim()
        .parse()
        .map(MaxInFlight::Fixed)
        .map_err(|error| format!("{error} (write a count, or auto)"))
}

/// Parses `--ack-deadline`: a duration, or `auto` (any case).
fn ack_deadline(text: &str) -> Result<AckDeadline, String> {
    if text.trim().eq_ignore_ascii_case("auto") {
        return Ok(AckDeadline::Auto);
    }
    duration(text)
        .map(AckDeadline::Fixed)
        .map_err(|error| format!("{error}, or auto"))
}

/// Parses `--db-outage AT+FOR`.
fn outage(text: &str) -> Result<Outage, String> {
    text.parse()
}

/// Parses `HOST:PORT` (a name is resolved once, at start).
fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    match text.to_socket_addrs().map(|mut addrs| addrs.next()) {
        Ok(Some(addr)) => Ok(addr),
        _ => Err("expected HOST:PORT, like 127.0.0.1:9090".to_owned()),
    }
}

/// Parses a probability between 0 and 1.
fn rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err("must be a number between 0 and 1".to_owned()),
    }
}

/// The parser of `--source`: its error repeats the value with any password replaced.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SourceParser;

impl clap::builder::TypedValueParser for SourceParser {
    type Value = SourceKind;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<SourceKind, clap::Error> {
        let flag = arg.map_or_else(|| "--source".to_owned(), ToString::to_string);
        let invalid = |shown: &str, reason: &str| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value '{shown}' for '{flag}': {reason}\n"),
            )
            .with_cmd(cmd)
        };
        let Some(text) = value.to_str() else {
            return Err(invalid(
                "(not utf-8)",
                "write memory, redis://HOST:PORT/DB, amqp://USER:PASS@HOST:PORT/VHOST or pubsub://PROJECT/SUBSCRIPTION",
            ));
        };
        let shown = redact(text);
        source(text).map_err(|reason| invalid(&shown, &reason))
    }
}

/// `--source` with any password replaced by `***`, for error messages.
fn redact(text: &str) -> String {
    if text.trim().starts_with("amqp") {
        // The same rule as the Redis source's: the password between `user:` and `@`.
        #[cfg(feature = "amqp")]
        return mayhem::source::amqp::redact_url(text);
    }
    #[cfg(feature = "redis")]
    return mayhem::source::redis::redact_url(text);
    #[cfg(not(feature = "redis"))]
    text.split_once('@')
        .map_or_else(|| text.to_owned(), |(_, host)| format!("***@{host}"))
}

/// Parses `--source`: `memory`, a `redis://` URL the Redis client accepts, or an `amqp://`
/// URL.
fn source(text: &str) -> Result<SourceKind, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("memory") {
        return Ok(SourceKind::Memory);
    }
    if text.starts_with("amqps://") && !cfg!(feature = "amqp-tls") {
        return Err(
            "amqps:// needs TLS, which this build lacks: build with the cargo feature amqp-tls"
                .to_owned(),
        );
    }
    if text.starts_with("pubsub://") {
        #[cfg(feature = "pubsub")]
        return mayhem::source::pubsub::PubSubUrl::parse(text)
            .map(|_| SourceKind::PubSub(text.to_owned()))
            .map_err(|error| error.reason);
        #[cfg(not(feature = "pubsub"))]
        return Err("this build has no pubsub support (feature pubsub)".to_owned());
    }
    if text.starts_with("amqp://") || text.starts_with("amqps://") {
        #[cfg(feature = "amqp")]
        return mayhem::source::amqp::parse_url(text)
            .map(|()| SourceKind::Amqp(text.to_owned()))
            .map_err(|error| format!("{error} (write amqp://USER:PASS@HOST:PORT/VHOST)"));
        #[cfg(not(feature = "amqp"))]
        return Err("this build has no amqp support (feature amqp)".to_owned());
    }
    if !text.starts_with("redis://") {
        return Err(
            "write memory, redis://HOST:PORT/DB, amqp://USER:PASS@HOST:PORT/VHOST or pubsub://PROJECT/SUBSCRIPTION".to_owned(),
        );
    }
    #[cfg(feature = "redis")]
    {
        use mayhem::source::redis::parse_url;
        parse_url(text)
            .map(|()| SourceKind::Redis(text.to_owned()))
            .map_err(|error| format!("{error} (write redis://HOST:PORT/DB)"))
    }
    #[cfg(not(feature = "redis"))]
    Err("this build has no redis support (feature redis)".to_owned())
}

/// A duration as the command line writes it, for the defaults `--help` shows: the defaults
/// themselves live in the library's configuration sections, stated once.
fn human(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// Parses a stream, group or consumer name: not empty, no whitespace.
pub(crate) fn name(text: &str) -> Result<String, String> {
    if text.is_empty() || text.chars().any(char::is_whitespace) {
        return Err("must be a non-empty name without spaces".to_owned());
    }
    Ok(text.to_owned())
}

/// `hostname-pid`: unique per running instance on a host. A hostname that is empty or not
/// valid UTF-8 is replaced by `mayhem`.
#[cfg(feature = "redis")]
fn default_consumer_name() -> String {
    let host = gethostname::gethostname()
        .into_string()
        .ok()
        .map(|host| host.trim().to_owned())
        .filter(|host| !host.is_empty() && !host.chars().any(char::is_whitespace))
        .unwrap_or_else(|| "mayhem".to_owned());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn arguments_and_variables_that_are_not_utf8_are_named() {
        let bad = || OsString::from_vec(vec![b'a', 0xff]);
        let args = |rest: Vec<OsString>| {
            std::iter::once(OsString::from("mayhem"))
                .chain(rest)
                .collect::<Vec<_>>()
        };
        let none = |_: &str| None;
        assert_eq!(
            check_utf8(args(vec!["--stream".into(), bad()]), none),
            Err("invalid value for '--stream': not valid UTF-8".to_owned())
        );
        // A password in `--source` is never shown.
        let mut joined = OsString::from("--source=amqp://user:s3cret");
        joined.push(bad());
        let error = check_utf8(args(vec![joined]), none).expect_err("refused");
        assert_eq!(error, "invalid value for '--source': not valid UTF-8");
        let error = check_utf8(args(vec![]), |name| {
            (name == "MAYHEM_CONSUMER_NAME").then(bad)
        })
        .expect_err("refused");
        assert!(
            error.contains("'MAYHEM_CONSUMER_NAME' (the variable of '--consumer-name')"),
            "{error}"
        );
        assert_eq!(
            check_utf8(args(vec!["--stream".into(), "x".into()]), none),
            Ok(())
        );
    }

    #[test]
    fn the_command_line_defaults_are_the_library_defaults() {
        // Parsed without flags and with no MAYHEM_* variable that would stand for one (the
        // test harness's own variables, MAYHEM_REQUIRE_* and the like, stand for none).
        let harness = |key: &str| {
            key.starts_with("MAYHEM_REQUIRE_")
                || key.starts_with("MAYHEM_BENCH")
                || key == "MAYHEM_PUBSUB_PYTHON"
        };
        if std::env::vars().any(|(key, _)| key.starts_with("MAYHEM_") && !harness(&key)) {
            panic!("a MAYHEM_* variable is set: this test needs the defaults");
        }
        let cli = Cli::try_parse_from(["mayhem"]).expect("no flags parse");
        let mut config = cli.config();
        // The seed is drawn when not given.
        assert!(config.run.seed.is_some());
        config.run.seed = None;
        assert_eq!(config, Config::default());
    }
}

/// Whatever the features, `amqps://` says which feature it needs when the build lacks it.
#[cfg(all(test, not(feature = "amqp-tls")))]
mod amqps_tests {
    use super::*;

    #[test]
    fn amqps_names_the_feature_it_needs_and_hides_the_password() {
        let error = Cli::try_parse_from([
            "mayhem",
            "--source",
            "amqps://guest:s3cret@127.0.0.1:5671/%2f",
        ])
        .expect_err("amqps is refused without the feature")
        .to_string();
        assert!(!error.contains("s3cret"), "{error}");
        assert!(error.contains("guest:***@127.0.0.1"), "{error}");
        assert!(error.contains("cargo feature amqp-tls"), "{error}");
        assert_eq!(error.trim_end().lines().count(), 1, "{error}");
    }
}

#[cfg(all(test, feature = "amqp"))]
mod amqp_tests {
    use super::*;

    #[test]
    fn amqp_sources_parse_and_bad_ones_hide_the_password() {
        let cli = Cli::try_parse_from([
            "mayhem",
            "--source",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "--max-in-flight",
            "100000",
        ])
        .expect("an amqp url parses");
        let SourceKind::Amqp(url) = &cli.source else {
            panic!("not an amqp source: {:?}", cli.source);
        };
        // The prefetch is the window, capped at what AMQP can say.
        assert_eq!(cli.amqp_config(url, &cli.config()).prefetch, u16::MAX);
        let bad = "amqp://guest:s3cret@127.0.0.1:notaport/%2f";
        let error = Cli::try_parse_from(["mayhem", "--source", bad])
            .expect_err("a bad url is refused")
            .to_string();
        assert!(!error.contains("s3cret"), "{error}");
        assert!(error.contains("guest:***@127.0.0.1"), "{error}");
        assert!(error.contains("amqp"), "{error}");
        // A password that is part of words of the message leaves them whole ("invalid ***ort
        // number" said nothing).
        let error = Cli::try_parse_from(["mayhem", "--source", "amqp://u:p@127.0.0.1:99999/%2f"])
            .expect_err("a bad port is refused")
            .to_string();
        assert!(error.contains("invalid port number"), "{error}");
        assert!(error.contains("u:***@127.0.0.1"), "{error}");
    }

    #[test]
    fn amqps_needs_the_tls_feature_and_a_ca_file_needs_amqps() {
        let tls = "amqps://guest:s3cret@127.0.0.1:5671/%2f";
        let parsed = Cli::try_parse_from(["mayhem", "--source", tls]);
        // Without the feature, `amqps_tests` checks the refusal.
        assert_eq!(parsed.is_ok(), cfg!(feature = "amqp-tls"));
        let error = Cli::try_parse_from(["mayhem", "--amqp-ca-file", "/nonexistent/ca.pem"])
            .expect_err("a missing CA file is refused")
            .to_string();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
        let not_pem = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let error = Cli::try_parse_from(["mayhem", "--amqp-ca-file", not_pem])
            .expect_err("a file without a certificate is refused")
            .to_string();
        assert!(error.contains("holds no PEM certificate"), "{error}");
        // A CA file is refused with a source that is not amqps://.
        let pem = std::env::temp_dir().join(format!("mayhem-cli-ca-{}.pem", std::process::id()));
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\n").expect("write a CA file");
        let cli = Cli::try_parse_from([
            "mayhem",
            "--source",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "--amqp-ca-file",
            pem.to_str().expect("a utf-8 path"),
        ]);
        let _ = std::fs::remove_file(&pem);
        let error = cli.expect("parses").check().expect_err("refused");
        assert!(
            error.contains("--amqp-ca-file") && error.contains("amqps://"),
            "{error}"
        );
    }

    #[test]
    fn publish_connections_take_1_to_16_and_only_an_amqp_source() {
        for bad in ["0", "17", "two", "-1"] {
            let error = Cli::try_parse_from(["mayhem", "--amqp-publish-connections", bad])
                .expect_err("refused")
                .to_string();
            assert!(
                error.contains(&format!("'{bad}'")) && error.contains("--amqp-publish-connections"),
                "{error}"
            );
        }
        let amqp = "amqp://guest:guest@127.0.0.1:5672/%2f";
        let cli = Cli::try_parse_from(["mayhem", "--source", amqp]).expect("parses");
        assert_eq!(
            cli.amqp_config(amqp, &Config::default())
                .publish_connections,
            mayhem::AmqpConfig::default().publish_connections
        );
        let cli = Cli::try_parse_from([
            "mayhem",
            "--source",
            amqp,
            "--amqp-publish-connections",
            "5",
        ])
        .expect("parses");
        assert!(cli.check().is_ok());
        assert_eq!(
            cli.amqp_config(amqp, &Config::default())
                .publish_connections,
            5
        );
        let error = Cli::try_parse_from(["mayhem", "--amqp-publish-connections", "3"])
            .expect("parses")
            .check()
            .expect_err("refused without an amqp source");
        assert!(error.contains("--amqp-publish-connections"), "{error}");
    }
}
