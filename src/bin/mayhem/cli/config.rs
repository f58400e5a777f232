//! What the parsed flags mean: the library's configuration sections built from them, the
//! checks across flags, and the log level.

use std::time::Duration;

use log::LevelFilter;
use mayhem::layer::{BreakerConfig, LayerConfig};
use mayhem::{Config, HandlerConfig, LeaseConfig, MemoryConfig, PublishConfig, RunConfig};

#[cfg(feature = "redis")]
use super::parse::default_consumer_name;
use super::{
    AckDeadline, Cli, LogLevel, MaxInFlight, SourceKind, AUTO_START_DEADLINE,
    DEFAULT_BREAKER_COOLDOWN,
};

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
        // A queue name RabbitMQ refuses fails only once connected: refused here.
        #[cfg(feature = "amqp")]
        if let SourceKind::Amqp(_) = &self.source {
            check_queue(&self.stream)?;
        }
        // Read by the source only once connecting, and then retried until the reconnect
        // limit: a value that can never work is refused here.
        #[cfg(feature = "pubsub")]
        if let SourceKind::PubSub(_) = &self.source {
            check_emulator_host()?;
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

/// Checks `--stream` as the name of a RabbitMQ queue.
///
/// # Errors
///
/// One line naming the value and what is wrong with it.
#[cfg(feature = "amqp")]
pub(crate) fn check_queue(stream: &str) -> Result<(), String> {
    mayhem::source::amqp::check_queue_name(stream)
        .map_err(|reason| format!("invalid value '{stream}' for '--stream': {reason}"))
}

/// Checks `PUBSUB_EMULATOR_HOST`, when set, as the Pub/Sub source reads it.
///
/// # Errors
///
/// One line naming the value and what is wrong with it.
#[cfg(feature = "pubsub")]
pub(crate) fn check_emulator_host() -> Result<(), String> {
    match std::env::var("PUBSUB_EMULATOR_HOST") {
        Ok(host) if !host.trim().is_empty() => mayhem::source::pubsub::check_emulator_host(&host)
            .map_err(|error| match error {
                mayhem::SourceError::Backend(text) => text,
                other => other.to_string(),
            }),
        _ => Ok(()),
    }
}
