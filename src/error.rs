//! Typed errors of the library.
//!
//! Every error is a small `enum` with a lowercase `Display` text and no trailing period, so a
//! caller can match on the case and a binary can print it as one line. They are all
//! `#[non_exhaustive]`: new cases may come in minor releases, so a `match` needs a `_` arm.

use std::fmt;

use crate::message::MessageError;

/// A configuration value out of range, or two values that contradict each other.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigError {
    /// The option the bad value belongs to, spelled as the command-line flag.
    pub option: &'static str,
    /// The bad value as the user wrote it (or as the library printed it).
    pub value: String,
    /// Why the value is refused, for example `must be between 0 and 1`.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(
        option: &'static str,
        value: impl fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError {
            option,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid value '{}' for '{}': {}",
            self.value, self.option, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

/// An error of a [`Source`](crate::Source) operation that is not about one lease.
///
/// A backend failure carries its text, not the broker client's error: those errors can hold
/// the URL with its password (a `redis::RedisError` of a bad address, a lapin error of a
/// refused login), and every source scrubs the secret from their text before it becomes a
/// `SourceError`. A cause kept as `source()` would hand an embedder's error reporter (which
/// prints the whole chain) the unscrubbed text. [`source()`](std::error::Error::source)
/// returns the [`MessageError`] of a refused message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceError {
    /// The source was interrupted for shutdown: no more publishes or pulls are served.
    Closed,
    /// The backend failed; the text says how. The operation may succeed when tried again.
    Backend(String),
    /// The backend has been unreachable for longer than the source tolerates; trying again
    /// will not help, and the runner shuts the service down.
    Unavailable(String),
    /// A message of a batch to publish may not be published (nothing of the batch was sent).
    Message(MessageError),
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::Closed => f.write_str("source is closed"),
            SourceError::Backend(text) => write!(f, "source backend failed: {text}"),
            SourceError::Unavailable(text) => write!(f, "source backend unavailable: {text}"),
            SourceError::Message(error) => write!(f, "message refused: {error}"),
        }
    }
}

impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SourceError::Message(error) => Some(error),
            _ => None,
        }
    }
}

/// Why an ack, nack or extension of a lease was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseError {
    /// The lease is not held any more: its deadline passed (the message went back to the
    /// subscription or to the dead-letter list), or it was already settled.
    Expired,
    /// The source could not be reached.
    Source(SourceError),
}

impl fmt::Display for LeaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseError::Expired => f.write_str("lease expired or already settled"),
            LeaseError::Source(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for LeaseError {}

/// The outcome of a handler that did not finish its work.
///
/// Two kinds, and the runner treats them apart:
/// - [`HandleError::Rejected`]: the message can never succeed (its data is no host name, a
///   payload the handler cannot decode). The runner dead-letters it at once, on its first
///   attempt, with the reason, and counts it `rejected`.
/// - every other variant: a failure that may pass. The runner nacks the message, so it is
///   delivered again (and dead-lettered once it used up its delivery attempts).
///
/// ```
/// use mayhem::HandleError;
/// assert!(HandleError::reject("not json").is_rejection());
/// assert!(!HandleError::Other("database down".into()).is_rejection());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandleError {
    /// The host could not be restarted, even after the bounded retries.
    RestartFailed {
        /// The host that did not restart.
        hostname: String,
    },
    /// The record of the message could not be saved.
    SaveFailed {
        /// The message, as displayed.
        message: String,
    },
    /// The handler ran longer than the [`Timeout`](crate::layer::Timeout) layer allows and
    /// was dropped; the message is delivered again.
    TimedOut {
        /// The time limit it ran past.
        after: std::time::Duration,
    },
    /// Any other failure of a custom handler; the message is delivered again.
    Other(String),
    /// The message can never succeed: it is dead-lettered at once with this reason, never
    /// retried.
    Rejected(String),
}

impl HandleError {
    /// A rejection: the message is dead-lettered at once with `reason`.
    pub fn reject(reason: impl fmt::Display) -> Self {
        HandleError::Rejected(reason.to_string())
    }

    /// Whether this is a rejection rather than a failure to retry.
    pub fn is_rejection(&self) -> bool {
        matches!(self, HandleError::Rejected(_))
    }
}

impl fmt::Display for HandleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandleError::RestartFailed { hostname } => write!(f, "Could not restart {hostname}"),
            HandleError::SaveFailed { message } => write!(f, "Could not save {message}"),
            HandleError::TimedOut { after } => write!(
                f,
                "handler timed out after {}",
                humantime::format_duration(*after)
            ),
            HandleError::Other(text) => f.write_str(text),
            HandleError::Rejected(reason) => write!(f, "rejected: {reason}"),
        }
    }
}

impl std::error::Error for HandleError {}

/// Why [`Runner::run`](crate::Runner::run) could not run the service.
#[derive(Debug)]
#[non_exhaustive]
pub enum RunError {
    /// The configuration is invalid.
    Config(ConfigError),
    /// A worker thread could not be started.
    Spawn(std::io::Error),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Config(error) => error.fmt(f),
            RunError::Spawn(error) => write!(f, "cannot start a worker thread: {error}"),
        }
    }
}

impl std::error::Error for RunError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RunError::Config(error) => Some(error),
            RunError::Spawn(error) => Some(error),
        }
    }
}

impl From<ConfigError> for RunError {
    fn from(error: ConfigError) -> Self {
        RunError::Config(error)
    }
}
