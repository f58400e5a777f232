//! Publishing: one pipeline of `XADD`s per batch, for a consuming [`RedisSource`] and for a
//! [`RedisPublisher`] that only publishes.

use std::fmt;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use redis::Client;

use super::config::{check_message_batch, parse_url};
use super::connection::{Class, Failure};
use super::{wire, Core, RedisConfig, RedisSource};
use crate::error::SourceError;
use crate::message::PubSubMessage;
use crate::shutdown::Shutdown;
use crate::source::kit::Secrets;
use crate::source::Publish;
use crate::sync::lock;

/// Longest sleep of a publish waiting for the server, so an interrupt is noticed promptly.
const RETRY_NAP: Duration = Duration::from_millis(50);

/// A client that only publishes to a Redis stream (`XADD`), for a program that injects
/// messages and consumes none, such as `mayhem publish`.
///
/// Unlike [`RedisSource::connect`] it claims no consumer name, creates no consumer group and
/// starts no thread: it opens connections (retrying within
/// [`RedisConfig::reconnect_limit`]) and publishes with the same entry layout as
/// [`RedisSource`]. Of its [`RedisConfig`] it uses `url`, `stream`, `block` (socket
/// timeouts) and `reconnect_limit`. The stream is created by the first `XADD` when it does
/// not exist; a group created later by a consuming [`RedisSource`] starts at `0` (or at a
/// floor recorded before any of these entries was added), so it delivers the entries
/// published before it existed. Creating no group matters: a group nobody consumes would
/// hold back the retention of every other group's acked entries.
///
/// ```
/// use std::time::Duration;
/// use mayhem::source::redis::RedisPublisher;
/// use mayhem::{PubSubMessage, Publish, RedisConfig, SourceError};
///
/// /// Asks the chaos monkey consuming `mayhem` at `url` to restart `host`.
/// fn restart(url: &str, host: &str) -> Result<(), SourceError> {
///     let config = RedisConfig { url: url.to_owned(), ..RedisConfig::default() };
///     let publisher = RedisPublisher::connect(config)?;
///     publisher.publish(&[PubSubMessage::new(host.to_owned()).with_attribute("origin", "ops")])
/// }
///
/// // Nobody listens on port 1: with no time left to retry, connecting gives up at once.
/// let config = RedisConfig {
///     url: "redis://127.0.0.1:1/0".to_owned(),
///     reconnect_limit: Duration::ZERO,
///     ..RedisConfig::default()
/// };
/// assert!(matches!(RedisPublisher::connect(config), Err(SourceError::Unavailable(_))));
/// # let _ = restart;
/// ```
pub struct RedisPublisher {
    /// The connections and their health; never shared with a thread.
    core: Core,
}

impl RedisPublisher {
    /// Connects to the server, retrying within [`RedisConfig::reconnect_limit`].
    ///
    /// # Errors
    ///
    /// As [`connect_with`](Self::connect_with).
    pub fn connect(config: RedisConfig) -> Result<Self, SourceError> {
        Self::connect_with(config, &Shutdown::new())
    }

    /// [`connect`](Self::connect), giving up early (with [`SourceError::Closed`]) once `stop`
    /// is triggered.
    ///
    /// # Errors
    ///
    /// [`SourceError::Backend`] for an invalid URL, an empty stream name or refused
    /// credentials; [`SourceError::Unavailable`] when the server could not be reached for
    /// the whole reconnect limit; [`SourceError::Closed`] when `stop` was triggered first.
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread while retrying; do not call it inside a future.
    pub fn connect_with(config: RedisConfig, stop: &Shutdown) -> Result<Self, SourceError> {
        if config.stream.is_empty() {
            return Err(SourceError::Backend("the stream name is empty".to_owned()));
        }
        parse_url(&config.url)?;
        let client = Client::open(config.url.as_str()).map_err(|error| {
            SourceError::Backend(format!(
                "invalid redis url: {}",
                Secrets::of(&config.url).scrub(&error.to_string())
            ))
        })?;
        let core = Core::new(config, client, true);
        core.start(stop)?;
        Ok(RedisPublisher { core })
    }

    /// The settings.
    pub fn config(&self) -> &RedisConfig {
        &self.core.config
    }

    /// Messages published through this client.
    pub fn published(&self) -> u64 {
        self.core.published.load(Ordering::SeqCst)
    }
}

impl Publish for RedisPublisher {
    /// As [`RedisSource`]'s: one pipeline of `XADD`s per batch, sent again after a failure
    /// (at least once); `Ok` once Redis added every entry.
    fn publish(&self, batch: &[PubSubMessage]) -> Result<(), SourceError> {
        self.core.publish(batch)
    }

    fn interrupt(&self) {
        self.core.interrupted.store(true, Ordering::SeqCst);
    }
}

impl fmt::Debug for RedisPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPublisher")
            .field("config", &self.core.config)
            .finish_non_exhaustive()
    }
}

impl Publish for RedisSource {
    /// Adds the batch with one pipeline of `XADD`s (one round trip), whose replies are only
    /// checked, not kept. After a failure the
    /// whole batch is sent again once the server answers: publishing is at least once.
    ///
    /// Each message is one entry: `data`, then `message_id` when the message has one, then
    /// `ordering_key` when set, then its attributes; a message without an id gets the entry
    /// id as its id when consumed.
    fn publish(&self, batch: &[PubSubMessage]) -> Result<(), SourceError> {
        self.core.publish(batch)
    }

    fn interrupt(&self) {
        self.core.interrupted.store(true, Ordering::SeqCst);
    }
}

impl Core {
    /// [`Publish::publish`] of a [`RedisSource`] or a [`RedisPublisher`].
    fn publish(&self, batch: &[PubSubMessage]) -> Result<(), SourceError> {
        check_message_batch(batch)?;
        if batch.is_empty() {
            return Ok(());
        }
        let core = self;
        // Encoded once, by hand (no argument vectors, no uuid string), and sent again as is
        // after a failure.
        let size: usize = batch.iter().map(|m| m.size() + 160).sum();
        let mut packed = Vec::with_capacity(size);
        for message in batch {
            let has_id = !message.id().is_empty();
            let key = message.ordering_key();
            let argc = 5
                + 2 * usize::from(has_id)
                + 2 * usize::from(key.is_some())
                + 2 * message.attributes().len();
            wire::command(&mut packed, argc);
            wire::arg(&mut packed, b"XADD");
            wire::arg(&mut packed, core.config.stream.as_bytes());
            wire::arg(&mut packed, b"*");
            wire::arg(&mut packed, b"data");
            wire::arg(&mut packed, message.data());
            if has_id {
                wire::arg(&mut packed, b"message_id");
                message
                    .id()
                    .with_str(|id| wire::arg(&mut packed, id.as_bytes()));
            }
            if let Some(key) = key {
                wire::arg(&mut packed, b"ordering_key");
                wire::arg(&mut packed, key.as_bytes());
            }
            for (key, value) in message.attributes().iter() {
                wire::arg(&mut packed, key.as_bytes());
                wire::arg(&mut packed, value.as_bytes());
            }
        }
        loop {
            if core.interrupted.load(Ordering::SeqCst) {
                return Err(SourceError::Closed);
            }
            let added =
                core.with_connection(Class::Publish, |con| con.pipeline_ok(&packed, batch.len()));
            match added {
                Ok(()) => {
                    let count = batch.len() as u64;
                    lock(&core.stats).published += count;
                    core.published.fetch_add(count, Ordering::SeqCst);
                    return Ok(());
                }
                Err(Failure::Down { retry_in }) => thread::sleep(retry_in.min(RETRY_NAP)),
                Err(Failure::GaveUp(text)) => return Err(SourceError::Unavailable(text)),
            }
        }
    }
}
