//! The command line: every flag, also readable from a `MAYHEM_*` environment variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use mayhem::database::Outage;
use mayhem::{HandlerConfig, LeaseConfig, MemoryConfig, PublishConfig, RunConfig};

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
    /// How long the broker (Redis, RabbitMQ, Pub/Sub) may stay unreachable (or keep failing)
    /// before the service gives up and exits 1; start-up retries as long.
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
    /// Publish messages to a broker (Redis, RabbitMQ or Google Cloud Pub/Sub) and print their
    /// ids once confirmed.
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

#[cfg(all(test, feature = "amqp"))]
mod amqp_tests;
#[cfg(all(test, not(feature = "amqp-tls")))]
mod amqps_tests;
mod config;
mod parse;
#[cfg(test)]
mod tests;
mod utf8;

#[cfg(feature = "pubsub")]
pub(crate) use config::check_emulator_host;
#[cfg(feature = "amqp")]
pub(crate) use config::check_queue;
#[cfg(feature = "amqp")]
pub(crate) use parse::ca_file;
use parse::{ack_deadline, human, max_in_flight, outage, rate, socket_addr};
pub(crate) use parse::{duration, name, SourceParser};
pub(crate) use utf8::{check_utf8, check_utf8_for};
