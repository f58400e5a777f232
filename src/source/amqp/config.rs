//! The settings of an [`AmqpSource`](super::AmqpSource) and their checks.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::url::parse_url;
use super::MAX_PUBLISH_CONNECTIONS;
use crate::error::SourceError;
use crate::source::redact_url;

/// Settings of an [`AmqpSource`](super::AmqpSource).
///
/// `Debug` shows the URL with its password replaced by `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpConfig {
    /// Server address, like `amqp://guest:guest@127.0.0.1:5672/%2f` (`%2f` is the vhost `/`).
    pub url: String,
    /// The quorum queue messages are published to and consumed from; dead letters go to
    /// `{queue}:dead`.
    pub queue: String,
    /// How long a pulled message stays leased without an extension (kept locally).
    pub ack_deadline: Duration,
    /// Deliveries of one message before it is dead-lettered.
    pub max_attempts: u32,
    /// Deliveries the broker may push ahead of acks (`basic.qos`), 1 to 65535.
    pub prefetch: u16,
    /// How long the server may stay unreachable before `pull` and `publish` fail with
    /// [`SourceError::Unavailable`]; start-up retries as long.
    pub reconnect_limit: Duration,
    /// A PEM file of CA certificates to trust for `amqps://` besides the system's (a broker
    /// whose certificate a private CA signed); only with `amqps://` URLs.
    pub ca_file: Option<PathBuf>,
    /// Connections that publish, 1 to [`MAX_PUBLISH_CONNECTIONS`]: `publish` calls take
    /// them in turn (see [Publishing](super#publishing)). They are apart from the connection
    /// that consumes and open at their first `publish`, so a source that only consumes opens
    /// one connection.
    pub publish_connections: usize,
}

impl AmqpConfig {
    /// Checks the settings without connecting: the queue name (1 to 200 bytes), an ack
    /// deadline, max attempts and prefetch above zero, the address (see [`parse_url`]), a
    /// CA file only with `amqps://`, and 1 to [`MAX_PUBLISH_CONNECTIONS`] publishing
    /// connections. [`AmqpSource::connect_with`](super::AmqpSource::connect_with) checks
    /// them first; it reads the CA file afterwards.
    ///
    /// ```
    /// use mayhem::source::amqp::AmqpConfig;
    /// assert!(AmqpConfig::default().validate().is_ok());
    /// let none = AmqpConfig { publish_connections: 0, ..AmqpConfig::default() };
    /// assert!(none.validate().is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// [`SourceError::Backend`] saying what is wrong (the address itself, which may hold a
    /// password, is not repeated).
    pub fn validate(&self) -> Result<(), SourceError> {
        check_queue_name(&self.queue).map_err(|reason| {
            SourceError::Backend(format!("the queue name '{}' {reason}", self.queue))
        })?;
        if self.ack_deadline.is_zero() || self.max_attempts == 0 || self.prefetch == 0 {
            return Err(SourceError::Backend(
                "ack deadline, max attempts and prefetch must be above zero".to_owned(),
            ));
        }
        parse_url(&self.url)?;
        if self.ca_file.is_some() && !self.url.starts_with("amqps://") {
            return Err(SourceError::Backend(
                "a CA file is only used with amqps:// urls".to_owned(),
            ));
        }
        if !(1..=MAX_PUBLISH_CONNECTIONS).contains(&self.publish_connections) {
            return Err(SourceError::Backend(format!(
                "publish connections {} must be between 1 and {MAX_PUBLISH_CONNECTIONS}",
                self.publish_connections
            )));
        }
        Ok(())
    }
}

/// Checks a queue name as RabbitMQ and this source take it: 1 to 200 bytes (the
/// dead-letter exchange `{queue}:dead` and queue must fit RabbitMQ's 255), not starting
/// with `amq.`, which RabbitMQ keeps for itself (`ACCESS_REFUSED` when declared). A program
/// can check a name before connecting.
///
/// ```
/// use mayhem::source::amqp::check_queue_name;
/// assert!(check_queue_name("restarts").is_ok());
/// assert!(check_queue_name("amq.restarts").is_err());
/// assert!(check_queue_name(&"q".repeat(201)).is_err());
/// ```
///
/// # Errors
///
/// What is wrong with the name (without the name), e.g. `must have 1 to 200 bytes`.
pub fn check_queue_name(queue: &str) -> Result<(), String> {
    if queue.is_empty() || queue.len() > 200 {
        return Err(format!("must have 1 to 200 bytes, not {}", queue.len()));
    }
    if queue.starts_with("amq.") {
        return Err("must not start with 'amq.', which RabbitMQ keeps for itself".to_owned());
    }
    Ok(())
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            queue: "mayhem".to_owned(),
            ack_deadline: Duration::from_secs(3),
            max_attempts: 5,
            prefetch: 200,
            reconnect_limit: Duration::from_secs(30),
            ca_file: None,
            publish_connections: 2,
        }
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact_url(&self.url))
            .field("queue", &self.queue)
            .field("ack_deadline", &self.ack_deadline)
            .field("max_attempts", &self.max_attempts)
            .field("prefetch", &self.prefetch)
            .field("reconnect_limit", &self.reconnect_limit)
            .field("ca_file", &self.ca_file)
            .field("publish_connections", &self.publish_connections)
            .finish()
    }
}

/// The address with its password replaced, and the queue.
impl fmt::Display for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} queue {}", redact_url(&self.url), self.queue)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_refuses_each_bad_setting_without_connecting() {
        assert_eq!(AmqpConfig::default().validate(), Ok(()));
        let tls = AmqpConfig {
            url: "amqps://guest:s3cret@127.0.0.1:1/%2f".to_owned(),
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..AmqpConfig::default()
        };
        // The CA file is read by `connect`, not by `validate`.
        assert_eq!(tls.validate().is_ok(), cfg!(feature = "amqp-tls"));
        let bad = [
            (
                AmqpConfig {
                    queue: String::new(),
                    ..AmqpConfig::default()
                },
                "queue name",
            ),
            (
                AmqpConfig {
                    queue: "q".repeat(201),
                    ..AmqpConfig::default()
                },
                "queue name",
            ),
            (
                AmqpConfig {
                    ack_deadline: Duration::ZERO,
                    ..AmqpConfig::default()
                },
                "above zero",
            ),
            (
                AmqpConfig {
                    max_attempts: 0,
                    ..AmqpConfig::default()
                },
                "above zero",
            ),
            (
                AmqpConfig {
                    prefetch: 0,
                    ..AmqpConfig::default()
                },
                "above zero",
            ),
            (
                AmqpConfig {
                    url: "amqp://guest:s3cret@h:notaport".to_owned(),
                    ..AmqpConfig::default()
                },
                "invalid amqp url",
            ),
            (
                AmqpConfig {
                    ca_file: Some("/nonexistent/ca.pem".into()),
                    ..AmqpConfig::default()
                },
                "amqps://",
            ),
            (
                AmqpConfig {
                    publish_connections: 0,
                    ..AmqpConfig::default()
                },
                "publish connections",
            ),
            (
                AmqpConfig {
                    publish_connections: MAX_PUBLISH_CONNECTIONS + 1,
                    ..AmqpConfig::default()
                },
                "publish connections",
            ),
        ];
        for (config, want) in bad {
            match config.validate() {
                Err(SourceError::Backend(text)) => {
                    assert!(text.contains(want), "{text}");
                    assert!(!text.contains("s3cret"), "{text}");
                }
                other => panic!("{config:?}: {other:?}"),
            }
        }
    }
}
