//! The settings of a Redis source, and the checks of its address and messages made before
//! connecting.

use std::fmt;
use std::time::Duration;

use super::reply::RESERVED_FIELDS;
#[cfg(doc)]
use super::RedisSource;
use crate::error::{ConfigError, SourceError};
use crate::message::{MessageError, PubSubMessage};
use crate::source::kit::Secrets;
#[cfg(doc)]
use crate::source::Publish;
use crate::source::{check_batch, redact_url};

/// Checks that `url` is a Redis address the client accepts, without connecting.
///
/// ```
/// use mayhem::source::redis::parse_url;
/// assert!(parse_url("redis://127.0.0.1:6379/0").is_ok());
/// assert!(parse_url("redis://127.0.0.1:notaport").is_err());
/// assert!(parse_url("redis://127.0.0.1:0/0").is_err());
/// ```
///
/// # Errors
///
/// [`SourceError::Backend`] saying what is wrong with the address (the address itself, which
/// may hold a password, is not repeated).
pub fn parse_url(url: &str) -> Result<(), SourceError> {
    use redis::{ConnectionAddr, IntoConnectionInfo};
    let info = url.into_connection_info().map_err(|error| {
        SourceError::Backend(format!(
            "invalid redis url: {}",
            Secrets::of(url).scrub(&error.to_string())
        ))
    })?;
    // Nothing listens on port 0: connecting would be retried as an outage.
    if let ConnectionAddr::Tcp(_, 0) | ConnectionAddr::TcpTls { port: 0, .. } = info.addr() {
        return Err(SourceError::Backend(
            "invalid redis url: port 0 cannot be connected to".to_owned(),
        ));
    }
    Ok(())
}

/// Checks a message as [`Publish::publish`] does before sending anything: Pub/Sub's limits
/// ([`PubSubMessage::check`]), and the field names the entry layout keeps for the message
/// itself (`data`, `message_id`, `publish_time`, `ordering_key`, `attempts`, `dead_reason`),
/// which are refused as attribute keys. A program can check its messages before connecting.
///
/// # Errors
///
/// The first rule the message breaks.
///
/// ```
/// use mayhem::source::redis::check_message;
/// use mayhem::{MessageError, PubSubMessage};
/// assert_eq!(check_message(&PubSubMessage::new("web-03").with_attribute("origin", "ops")), Ok(()));
/// let reserved = PubSubMessage::new("web-03").with_attribute("data", "x");
/// assert!(matches!(check_message(&reserved), Err(MessageError::ReservedKey { .. })));
/// ```
pub fn check_message(message: &PubSubMessage) -> Result<(), MessageError> {
    crate::source::check_message(message, &RESERVED_FIELDS, "redis")
}

/// [`check_message`] for every message of a batch.
pub(super) fn check_message_batch(batch: &[PubSubMessage]) -> Result<(), SourceError> {
    check_batch(batch, &RESERVED_FIELDS, "redis")
}

/// Settings of a [`RedisSource`].
///
/// `Debug` shows the URL with its password replaced by `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// Server address, like `redis://127.0.0.1:6379/0` or `redis://:PASSWORD@host:6379/0`.
    pub url: String,
    /// The stream messages are published to and consumed from.
    pub stream: String,
    /// The consumer group; instances sharing it split the messages.
    pub group: String,
    /// This consumer's name in the group; one live instance per name.
    pub consumer: String,
    /// How long a pulled entry stays leased without an extension; entries idle longer are
    /// claimed by the next pull of any consumer of the group.
    pub ack_deadline: Duration,
    /// Deliveries of one message before it is dead-lettered to `{stream}:dead`.
    pub max_attempts: u32,
    /// Longest time one `XREADGROUP` blocks; short, so that shutdown is prompt.
    pub block: Duration,
    /// How long the server may stay unreachable (or keep failing) before `pull` and
    /// `publish` fail with [`SourceError::Unavailable`]; start-up retries as long.
    pub reconnect_limit: Duration,
    /// Time to live of the consumer name's liveness key: a restart under the same name
    /// waits at most this long for a killed predecessor's key to expire.
    pub liveness_ttl: Duration,
    /// How often entries every group has acked are trimmed from the stream (zero: never).
    pub trim_interval: Duration,
    /// Approximate bound of the dead-letter stream's length (`XADD ... MAXLEN ~`).
    pub dead_letter_max: u64,
}

/// Shortest [`RedisConfig::liveness_ttl`]: the key is refreshed five times per time to live.
pub const MIN_LIVENESS_TTL: Duration = Duration::from_millis(100);
/// Shortest [`RedisConfig::trim_interval`] above zero: each pass is a script call on the
/// server (at most a hundred a second).
pub const MIN_TRIM_INTERVAL: Duration = Duration::from_millis(10);
/// Longest [`RedisConfig::liveness_ttl`] and [`RedisConfig::trim_interval`].
pub const MAX_REDIS_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

impl RedisConfig {
    /// Checks the intervals: [`liveness_ttl`](Self::liveness_ttl) between
    /// [`MIN_LIVENESS_TTL`] and [`MAX_REDIS_INTERVAL`], [`trim_interval`](Self::trim_interval)
    /// zero (never) or between [`MIN_TRIM_INTERVAL`] and [`MAX_REDIS_INTERVAL`].
    /// [`RedisSource::connect`] checks them too.
    ///
    /// # Errors
    ///
    /// The first bad value, named by its command-line flag (`--consumer-ttl`,
    /// `--trim-interval`).
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = mayhem::RedisConfig {
    ///     trim_interval: Duration::from_nanos(1),
    ///     ..mayhem::RedisConfig::default()
    /// };
    /// assert_eq!(config.validate().unwrap_err().option, "--trim-interval");
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::config::duration(
            "--consumer-ttl",
            self.liveness_ttl,
            MIN_LIVENESS_TTL,
            MAX_REDIS_INTERVAL,
        )?;
        if !self.trim_interval.is_zero()
            && !(MIN_TRIM_INTERVAL..=MAX_REDIS_INTERVAL).contains(&self.trim_interval)
        {
            return Err(ConfigError::new(
                "--trim-interval",
                humantime::format_duration(self.trim_interval),
                format!(
                    "must be 0 (never) or between {} and {}",
                    humantime::format_duration(MIN_TRIM_INTERVAL),
                    humantime::format_duration(MAX_REDIS_INTERVAL)
                ),
            ));
        }
        Ok(())
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/0".to_owned(),
            stream: "mayhem".to_owned(),
            group: "mayhem".to_owned(),
            consumer: "mayhem".to_owned(),
            ack_deadline: Duration::from_secs(3),
            max_attempts: 5,
            block: Duration::from_millis(100),
            reconnect_limit: Duration::from_secs(30),
            liveness_ttl: Duration::from_secs(5),
            trim_interval: Duration::from_secs(1),
            dead_letter_max: 100_000,
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("ack_deadline", &self.ack_deadline)
            .field("max_attempts", &self.max_attempts)
            .field("block", &self.block)
            .field("reconnect_limit", &self.reconnect_limit)
            .field("liveness_ttl", &self.liveness_ttl)
            .field("trim_interval", &self.trim_interval)
            .field("dead_letter_max", &self.dead_letter_max)
            .finish()
    }
}

/// The address with its password replaced, the stream, the group and the consumer.
impl fmt::Display for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} stream {} group {} consumer {}",
            redact_url(&self.url),
            self.stream,
            self.group,
            self.consumer
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::redis::RedisSource;

    #[test]
    fn intervals_are_checked_against_their_bounds() {
        let with = |liveness_ttl, trim_interval| RedisConfig {
            liveness_ttl,
            trim_interval,
            ..RedisConfig::default()
        };
        let ms = Duration::from_millis;
        for (ttl, trim, refused) in [
            (MIN_LIVENESS_TTL, Duration::ZERO, None),
            (MAX_REDIS_INTERVAL, MIN_TRIM_INTERVAL, None),
            (ms(100), MAX_REDIS_INTERVAL, None),
            (ms(99), ms(1000), Some("--consumer-ttl")),
            (MAX_REDIS_INTERVAL + ms(1), ms(1000), Some("--consumer-ttl")),
            (ms(5000), ms(9), Some("--trim-interval")),
            (
                ms(5000),
                MAX_REDIS_INTERVAL + ms(1),
                Some("--trim-interval"),
            ),
        ] {
            let checked = with(ttl, trim).validate();
            assert_eq!(
                checked.as_ref().err().map(|e| e.option),
                refused,
                "{checked:?}"
            );
        }
        // Connecting checks them too, before any connection attempt.
        assert!(matches!(
            RedisSource::connect(with(ms(5000), Duration::from_nanos(1))),
            Err(SourceError::Backend(text)) if text.contains("--trim-interval")
        ));
    }

    #[test]
    fn connect_refuses_bad_urls_and_settings() {
        let bad_url = RedisConfig {
            url: "http://localhost".to_owned(),
            ..RedisConfig::default()
        };
        assert!(matches!(
            RedisSource::connect(bad_url),
            Err(SourceError::Backend(text)) if text.starts_with("invalid redis url")
        ));
        let empty_group = RedisConfig {
            group: String::new(),
            ..RedisConfig::default()
        };
        assert!(matches!(
            RedisSource::connect(empty_group),
            Err(SourceError::Backend(text)) if text.contains("group")
        ));
    }

    #[test]
    fn the_password_never_shows() {
        let config = RedisConfig {
            url: "redis://user:s3cret@127.0.0.1:1/0".to_owned(),
            ..RedisConfig::default()
        };
        for shown in [format!("{config:?}"), config.to_string()] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("redis://user:***@127.0.0.1:1/0"), "{shown}");
        }
    }
}
