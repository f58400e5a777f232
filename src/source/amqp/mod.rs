//! A [`Source`] on a RabbitMQ quorum queue (feature `amqp`, off by default), through
//! `lapin` on smol (no tokio). `amqps://` addresses need the feature `amqp-tls` (rustls);
//! a private CA is trusted through [`AmqpConfig::ca_file`].
//!
//! # Mapping
//!
//! | `Source` | RabbitMQ |
//! |---|---|
//! | start | `exchange.declare {queue}:dead` (fanout), `queue.declare {queue}:dead` bound to it, `queue.declare {queue}` as a quorum queue (`x-queue-type quorum`, `x-delivery-limit`, `x-dead-letter-exchange {queue}:dead`, `x-dead-letter-strategy at-least-once`, `x-overflow reject-publish`); `basic.qos` with the prefetch |
//! | `publish` | `basic.publish` to the default exchange with routing key `{queue}` (mandatory, persistent, `message-id` the message id, the body the instance name, attributes as headers) on a channel in confirm mode; the confirms are pipelined across batches (see below), never one round trip per message; a message returned unroutable (its queue was deleted) counts as a failed confirm |
//! | `pull` | the first pull starts `basic.consume` (a client that only publishes takes no deliveries; after it, every reconnection consumes again before it counts as recovered); every pull drains the deliveries the broker pushed ahead (the prefetch, [`AmqpConfig::prefetch`], which the binary ties to `--max-in-flight`, the flow-control window) |
//! | attempt | `x-delivery-count` + 1 (absent on the first delivery; `x-acquired-count` where present, whichever is higher) |
//! | `ack` | `basic.ack`; refused after the channel was lost (the broker gave the message back already) |
//! | `nack` | `basic.reject` with requeue; on the last attempt `basic.reject` without requeue, which dead-letters it to `{queue}:dead` |
//! | `extend` | local only: RabbitMQ has no lease extension (see below) |
//! | expiry | a lease whose local deadline passed is rejected with requeue by the source itself (dead-lettered on its last attempt) |
//! | `interrupt` | the worker cancels the consumer (`basic.cancel`) before it sends any later frame, so that a nack during the shutdown does not bring its message back into this consumer's prefetch |
//! | give-back on shutdown | closing the connection: the broker requeues every unacked delivery |
//!
//! The quorum queue's `x-delivery-limit` is the broker's own backstop: a message given back
//! by lost channels (killed consumers) more than `max_attempts` times is dead-lettered by the
//! broker (reason `delivery_limit`) without any consumer deciding it. On RabbitMQ 3.10 every
//! give-back counts as a delivery attempt, closing the channel included, even for messages
//! that were only prefetched and never handed to a handler.
//!
//! # Publishing
//!
//! `publish` sends its batch and returns without waiting for the batch's confirms: it
//! awaits the oldest outstanding confirms, in order, only when the new batch would take more
//! than its connection's share of [`PUBLISH_WINDOW`] messages past them, so the broker
//! always has confirms to send while the next batch goes out. A confirmed batch counts in
//! [`SourceStats::published`]. A nack, an error or a lost connection while a batch's
//! confirms are awaited makes the source reconnect and send that batch and every later
//! unconfirmed one of the same connection again (at least once, as before).
//! [`Publish::wait_confirmed`] awaits what is left (the runner calls it with the grace
//! period once the publishers stopped, and says how many stayed unconfirmed); dropping the
//! source waits at most a quarter of a second for them.
//!
//! Batches take [`AmqpConfig::publish_connections`] connections in turn (2 by default),
//! each with its own confirm channel and its own reconnection, apart from the connection
//! that consumes; they open at their first `publish`. On one channel RabbitMQ 3.10's flow
//! control toward a quorum queue stalls the publisher before the CPUs are busy; a second
//! connection measured about a fifth more messages per second (see the README). The order
//! between batches holds only with one connection.
//!
//! # Resource alarms
//!
//! During a memory or disk alarm RabbitMQ stops reading from every connection that
//! publishes. Publishing then waits, logging one line when the broker blocks it and one
//! when it unblocks; the time blocked does not count as a broker that does not answer, so
//! nothing is reconnected or sent again. Consuming goes on: it has a connection of its own,
//! and its acks are not held up behind blocked publishes.
//!
//! # TLS
//!
//! With the feature `amqp-tls`, `amqps://` URLs connect through rustls (ring), trusting the
//! system's CA certificates and those of [`AmqpConfig::ca_file`]; the host name of the URL
//! is checked against the broker's certificate. Without the feature `amqps://` is refused,
//! naming the feature.
//!
//! # Extensions and `consumer_timeout`
//!
//! RabbitMQ cannot extend a lease: the only time limit on an unacked delivery is the
//! server-wide `consumer_timeout` (30 minutes by default), which closes the whole channel
//! when it fires. The source keeps each lease's deadline locally: `extend` moves it, and a
//! lease whose deadline passed is requeued by the source (and any later ack of it refused).
//! Set `consumer_timeout` in `rabbitmq.conf` above the longest handler (`--max-lease`),
//! or a slow handler costs every lease of the channel.
//!
//! # Acks are queued
//!
//! `ack`, `nack` and `extend` check the lease in a local table (an unknown lease, one whose
//! local deadline passed, or one from a channel that was lost since is refused at once),
//! queue the frames and return; a worker thread sends them, and requeues expired leases.
//! An ack that cannot be sent because the channel was lost meanwhile is counted in
//! [`SourceStats::late_refusals`]: the broker delivers the message again.
//!
//! # Failures
//!
//! A lost connection is reopened with exponential backoff (50 ms doubling to 2 s): the first
//! failure logs one line, a different failure another, and the first success after them
//! `reconnected to amqp ...`. When the failure lasts longer than
//! [`AmqpConfig::reconnect_limit`], `pull` and `publish` return
//! [`SourceError::Unavailable`] and the runner shuts the service down. Start-up retries the
//! same way within the same limit, except for a refusal retrying cannot cure (credentials,
//! a missing vhost, a queue declared with other arguments), which ends it at once
//! ([`AmqpSource::connect_with`] also stops early when its
//! [`Shutdown`] is triggered). A publish retried after a lost connection may add the same
//! message twice (at least once).
//!
//! # Shutdown
//!
//! Every broker call is bounded; dropping the source waits at most a quarter of a second
//! for queued frames and for the connection to close. The password of the URL is never
//! logged: every address and error text goes through one redaction.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use async_io::Timer;
use futures_lite::{future, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ExchangeKind, PublisherConfirm,
};
use log::{error, info, warn};
use slab::Slab;

mod acks;

use self::acks::{Prefix, Settle};
use crate::error::SourceError;
use crate::message::PubSubMessage;
use crate::message::{Attributes, MessageError, MessageId};
use crate::shutdown::Shutdown;
use crate::source::{Lease, LeaseId, Publish, Source, SourceStats};
use crate::sync::{lock, Outstanding};

/// How long `stats`, `flush` after an interrupt, and dropping the source wait on the broker.
const SHUTDOWN_WAIT: Duration = Duration::from_millis(250);
/// Longest wait for a connection, its channels and the topology.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The heartbeat asked of the broker, in seconds, unless the URL asks for one
/// (`?heartbeat=N`). A broker that stops answering without closing the connection (stopped,
/// or behind a network that drops packets) is found out only when nothing arrived for two
/// heartbeats; RabbitMQ's own default, 60 s, left a consuming instance two minutes before
/// `--reconnect-limit` even began to count. Five seconds is the low end of the range
/// RabbitMQ's documentation recommends.
const HEARTBEAT_SECS: u16 = 5;
/// Longest wait for the confirms of one published batch before the link counts as lost.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Most published messages whose confirms are outstanding: `publish` returns once its batch is
/// sent and awaits the oldest confirms only when the next batch would pass this. It bounds the
/// messages held for sending again (about 100 bytes each) and how many a lost connection
/// makes the source send twice.
pub const PUBLISH_WINDOW: usize = 10_000;
/// Most connections [`AmqpConfig::publish_connections`] may ask for.
pub const MAX_PUBLISH_CONNECTIONS: usize = 16;
/// How often the worker looks for leases whose deadline passed, and how often a blocked
/// call looks at the interrupt flag.
const TICK: Duration = Duration::from_millis(50);
/// Longest a pull that took a delivery waits for more (up to its `max`), in sleeps of
/// [`LINGER_STEP`] while each brings more: deliveries arrive one by one from the connection's
/// thread, and a pull that took only those already buffered took about 9 of them, measured at
/// 80,000 a second; each pull then costs the consumer thread, the lease manager and the
/// executor a wake-up, more than its deliveries cost.
const LINGER: Duration = Duration::from_millis(1);
/// One sleep of [`LINGER`].
const LINGER_STEP: Duration = Duration::from_micros(200);
/// Shortest time between two scans of the lease table for expired leases (10 ms).
const SCAN_EVERY_NANOS: u64 = 10_000_000;
/// First and longest pause between reconnection attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));

/// The URL with its password replaced by `***` (the address is left as written otherwise).
///
/// ```
/// use mayhem::source::amqp::redact_url;
/// assert_eq!(redact_url("amqp://guest:s3cret@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
/// assert_eq!(redact_url("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
/// ```
pub fn redact_url(url: &str) -> String {
    match credentials(url) {
        Some((start, end)) if url[start..end].contains(':') => {
            let colon = start + url[start..end].find(':').unwrap_or(0);
            format!("{}:***{}", &url[..colon], &url[end..])
        }
        _ => url.to_owned(),
    }
}

/// The byte range of `user[:password]` in `url` (before the authority's last `@`).
fn credentials(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let at = url[start..authority_end].rfind('@')?;
    Some((start, start + at))
}

/// The host as written in the URL's authority (brackets of an IPv6 address removed).
fn written_host(url: &str) -> Option<String> {
    let start = url.find("://")? + 3;
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let authority = &url[start..end];
    let host_port = authority
        .rfind('@')
        .map_or(authority, |at| &authority[at + 1..]);
    let host = if let Some(rest) = host_port.strip_prefix('[') {
        rest.split(']').next()?
    } else {
        host_port.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_owned())
}

/// Replaces `secret` in `text` (see [`hide_secret`](crate::source::hide_secret)) and joins
/// its lines into one.
fn scrub(text: &str, secret: &str) -> String {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    crate::source::hide_secret(&text, secret)
}

/// Parses an `amqp://USER:PASS@HOST:PORT/VHOST` address (or `amqps://` with the feature
/// `amqp-tls`), without connecting.
///
/// ```
/// use mayhem::source::amqp::parse_url;
/// assert!(parse_url("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
/// assert!(parse_url("amqp://127.0.0.1:notaport").is_err());
/// // `amqps://` needs the feature `amqp-tls`.
/// assert_eq!(parse_url("amqps://127.0.0.1").is_ok(), cfg!(feature = "amqp-tls"));
/// ```
///
/// # Errors
///
/// [`SourceError::Backend`] saying what is wrong (the address itself, which may hold a
/// password, is not repeated).
pub fn parse_url(url: &str) -> Result<(), SourceError> {
    parse_uri(url).map(|_| ())
}

/// The parsed address. lapin's parser takes the host from the URL's domain only, so an IP
/// address would become `localhost`: the host is set again as written. The heartbeat is
/// [`HEARTBEAT_SECS`] unless the URL sets one.
fn parse_uri(url: &str) -> Result<AMQPUri, SourceError> {
    let secret = password(url);
    if url.starts_with("amqps://") && !cfg!(feature = "amqp-tls") {
        return Err(SourceError::Backend(
            "amqps:// needs TLS, which this build lacks: build with the cargo feature amqp-tls"
                .to_owned(),
        ));
    }
    if !url.starts_with("amqp://") && !url.starts_with("amqps://") {
        return Err(SourceError::Backend(
            "invalid amqp url: the scheme must be amqp:// or amqps://".to_owned(),
        ));
    }
    let mut uri = AMQPUri::from_str(url).map_err(|error| {
        SourceError::Backend(format!("invalid amqp url: {}", scrub(&error, &secret)))
    })?;
    if let Some(host) = written_host(url) {
        uri.authority.host = host;
    }
    uri.query.heartbeat.get_or_insert(HEARTBEAT_SECS);
    Ok(uri)
}

/// Reads a PEM file of CA certificates for [`AmqpConfig::ca_file`].
///
/// ```
/// use mayhem::source::amqp::read_ca_file;
/// let error = read_ca_file("/nonexistent/ca.pem".as_ref()).unwrap_err();
/// assert!(error.to_string().contains("/nonexistent/ca.pem"));
/// ```
///
/// # Errors
///
/// [`SourceError::Backend`] naming the file when it cannot be read or holds no PEM
/// certificate.
pub fn read_ca_file(path: &Path) -> Result<String, SourceError> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        SourceError::Backend(format!(
            "cannot read the amqp CA file {}: {error}",
            path.display()
        ))
    })?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(SourceError::Backend(format!(
            "the amqp CA file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(text)
}

/// The URL's password (empty when there is none).
fn password(url: &str) -> String {
    credentials(url)
        .and_then(|(start, end)| url[start..end].split_once(':').map(|(_, p)| p.to_owned()))
        .unwrap_or_default()
}

/// Settings of an [`AmqpSource`].
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
    /// them in turn (see [Publishing](self#publishing)). They are apart from the connection
    /// that consumes and open at their first `publish`, so a source that only consumes opens
    /// one connection.
    pub publish_connections: usize,
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

/// A RabbitMQ quorum queue with the lease semantics of [`Source`]; see the
/// [module docs](self).
pub struct AmqpSource {
    /// The state shared with the worker thread.
    core: Arc<Core>,
    /// The connections that publish ([`AmqpConfig::publish_connections`]), each a core of
    /// its own that never consumes and holds no lease; connected at their first `publish`.
    /// `core` never publishes: RabbitMQ blocks a connection that publishes during a resource
    /// alarm, and a consumer on it would stall with it, its acks included.
    lanes: Vec<Core>,
    /// Which publishing connection the next `publish` takes.
    next_lane: AtomicUsize,
    /// What the last [`Publish::wait_confirmed`] returned: its caller reports those.
    told_unconfirmed: AtomicUsize,
    /// The queue of lease operations; `None` only while dropping.
    ops: Option<mpsc::Sender<Vec<Op>>>,
    /// The worker thread sending queued operations and requeueing expired leases.
    worker: Option<JoinHandle<()>>,
}

/// One connection with its two channels.
struct Link {
    /// Which link this is: leases remember it, and a lease of a lost link is void.
    epoch: u64,
    /// The connection.
    connection: Connection,
    /// The channel in confirm mode that publishes.
    publish: Channel,
    /// The channel that consumes, acks and rejects (a delivery tag belongs to its channel).
    consume: Channel,
    /// The consumer's deliveries, started by the first pull (a client that only publishes
    /// never takes deliveries). A mutex: one puller drains it at a time.
    consumer: Mutex<Option<Consumer>>,
}

/// What the source and its worker share.
struct Core {
    /// The settings.
    config: AmqpConfig,
    /// The parsed address.
    uri: AMQPUri,
    /// The PEM text of [`AmqpConfig::ca_file`], read once at start.
    ca: Option<String>,
    /// The URL with its password replaced, for log lines and errors.
    shown_url: String,
    /// The URL's password, removed from every error text (empty when there is none).
    secret: String,
    /// `{queue}:dead`, the dead-letter exchange and queue.
    dead: String,
    /// The current link; `None` while the broker is unreachable. A mutex, not a lock-free
    /// cell: it is held only to clone the link out or to replace it.
    link: Mutex<Option<Arc<Link>>>,
    /// The epoch of the next link.
    next_epoch: AtomicU64,
    /// The epoch of the current link, 0 while there is none: acks check leases against it
    /// without taking any lock a connection attempt may hold.
    live_epoch: AtomicU64,
    /// The queue's ready messages as the broker last told them (for `stats` while the broker
    /// does not answer).
    last_ready: AtomicU64,
    /// Held by the one thread trying to connect.
    connecting: Mutex<()>,
    /// Connection health and the reconnect schedule.
    health: Mutex<Health>,
    /// Leases this consumer holds; a lease id is the slot index plus the slot's generation.
    leases: Mutex<Leases>,
    /// The counters (`remaining` is asked of the broker).
    stats: Mutex<SourceStats>,
    /// Acks sent and dead letters, readable without a lock.
    settled: AtomicU64,
    /// Lease operations queued and not yet sent.
    queued: Outstanding,
    /// Published batches whose confirms are outstanding. A mutex held through a whole
    /// `publish`: see there.
    unconfirmed: Mutex<Unconfirmed>,
    /// Set by `interrupt`: publishes and pulls return `Closed`.
    interrupted: AtomicBool,
    /// Set by the first pull: from then on every new link consumes.
    consuming: AtomicBool,
    /// Set once the worker cancelled the consumer after an interrupt.
    cancelled: AtomicBool,
    /// Held while the consumer is being cancelled.
    cancelling: Mutex<()>,
    /// Whether a publish last saw the broker blocking this connection (logged on change).
    blocked: AtomicBool,
    /// Set by a connection attempt the broker refused for good (see [`refused_for_good`]).
    refused: AtomicBool,
    /// Set once a link was established.
    connected_once: AtomicBool,
    /// Set when the source is dropped: blocked calls give up.
    closing: AtomicBool,
    /// When the lease table was created: [`Core::next_scan`] counts from it.
    born: Instant,
    /// Nanoseconds after `born` before which [`Core::expire_local`] does not scan the lease
    /// table again: a scan walks every lease, and pulls and the worker's every pass ask for
    /// one (a window of 10,000 made it 3 % of the client's CPU).
    next_scan: AtomicU64,
    /// Messages that could not be read (no message id, not a uuid, a bad instance name):
    /// dead-lettered, the first one logged.
    malformed: AtomicU64,
}

/// The lease table.
struct Leases {
    /// Held leases.
    slots: Slab<Held>,
    /// Generation of the next lease.
    next_generation: u32,
}

/// One lease this consumer holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// The delivery tag on the consume channel of link `epoch`.
    tag: u64,
    /// The link the delivery came on.
    epoch: u64,
    /// Delivery attempt of the message.
    attempt: u32,
    /// Local deadline; past it the source requeues the message.
    deadline: Instant,
    /// Tells this lease from earlier ones of the same slot.
    generation: u32,
}

/// One queued lease operation.
#[derive(Debug, Clone, Copy)]
struct Op {
    /// What to send.
    kind: Settle,
    /// The delivery tag.
    tag: u64,
    /// The link the delivery came on.
    epoch: u64,
}

/// Why a broker call did not succeed.
enum Failure {
    /// The broker is unreachable; try again after `retry_in`.
    Down {
        /// When the next attempt is due.
        retry_in: Duration,
    },
    /// It stayed unreachable past the reconnect limit.
    GaveUp(String),
    /// The source was interrupted or is closing.
    Closed,
}

/// Connection health and the reconnect schedule.
struct Health {
    /// Since when the broker has been failing; `None` while it answers.
    failing_since: Option<Instant>,
    /// The last failure's text (logged once per different text).
    last_error: String,
    /// No reconnection attempt before this instant.
    next_try: Instant,
    /// The pause after the next failure.
    delay: Duration,
}

impl AmqpSource {
    /// Connects (retrying within [`AmqpConfig::reconnect_limit`]) and declares the
    /// topology; see [`AmqpSource::connect_with`].
    ///
    /// # Errors
    ///
    /// As [`AmqpSource::connect_with`].
    pub fn connect(config: AmqpConfig) -> Result<Self, SourceError> {
        AmqpSource::connect_with(config, &Shutdown::new())
    }

    /// Connects, retrying within [`AmqpConfig::reconnect_limit`] unless `stop` is triggered
    /// first, declares the queues and starts consuming.
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread while retrying; do not call it inside a future.
    ///
    /// # Errors
    ///
    /// [`SourceError::Backend`] for bad settings; [`SourceError::Unavailable`] when the
    /// broker stayed unreachable (or kept refusing the topology) past the limit;
    /// [`SourceError::Closed`] when `stop` was triggered.
    pub fn connect_with(config: AmqpConfig, stop: &Shutdown) -> Result<Self, SourceError> {
        if config.queue.is_empty() || config.queue.len() > 200 {
            return Err(SourceError::Backend(format!(
                "the queue name '{}' must have 1 to 200 bytes",
                config.queue
            )));
        }
        if config.ack_deadline.is_zero() || config.max_attempts == 0 || config.prefetch == 0 {
            return Err(SourceError::Backend(
                "ack deadline, max attempts and prefetch must be above zero".to_owned(),
            ));
        }
        let uri = parse_uri(&config.url)?;
        let ca = match &config.ca_file {
            Some(_) if !config.url.starts_with("amqps://") => {
                return Err(SourceError::Backend(
                    "a CA file is only used with amqps:// urls".to_owned(),
                ))
            }
            Some(path) => Some(read_ca_file(path)?),
            None => None,
        };
        if !(1..=MAX_PUBLISH_CONNECTIONS).contains(&config.publish_connections) {
            return Err(SourceError::Backend(format!(
                "publish connections {} must be between 1 and {MAX_PUBLISH_CONNECTIONS}",
                config.publish_connections
            )));
        }
        let lanes = (0..config.publish_connections)
            .map(|_| Core::new(config.clone(), uri.clone(), ca.clone()))
            .collect();
        let core = Arc::new(Core::new(config, uri, ca));
        loop {
            if stop.is_triggered() {
                return Err(SourceError::Closed);
            }
            match core.link() {
                Ok(_) => break,
                Err(Failure::Down { retry_in }) => {
                    // Wakes early for a shutdown.
                    stop.wait_timeout(retry_in.min(TICK));
                }
                Err(Failure::GaveUp(text)) => return Err(SourceError::Unavailable(text)),
                Err(Failure::Closed) => return Err(SourceError::Closed),
            }
        }
        let (ops, queue) = mpsc::channel();
        let worker_core = Arc::clone(&core);
        // A thread, not a task: the source is used from plain threads and owns no executor,
        // and the frames are sent with `block_on` on lapin's own smol reactor.
        let worker = thread::Builder::new()
            .name("mayhem-amqp-acks".into())
            .spawn(move || worker_core.run_ops(&queue))
            .map_err(|error| SourceError::Backend(format!("cannot start a thread: {error}")))?;
        Ok(AmqpSource {
            core,
            lanes,
            next_lane: AtomicUsize::new(0),
            told_unconfirmed: AtomicUsize::new(0),
            ops: Some(ops),
            worker: Some(worker),
        })
    }
}

impl Core {
    /// The state of a source that has not connected yet.
    fn new(config: AmqpConfig, uri: AMQPUri, ca: Option<String>) -> Core {
        Core {
            ca,
            shown_url: redact_url(&config.url),
            secret: password(&config.url),
            dead: format!("{}:dead", config.queue),
            uri,
            config,
            link: Mutex::new(None),
            next_epoch: AtomicU64::new(1),
            live_epoch: AtomicU64::new(0),
            last_ready: AtomicU64::new(0),
            connecting: Mutex::new(()),
            health: Mutex::new(Health {
                failing_since: None,
                last_error: String::new(),
                next_try: Instant::now(),
                delay: BACKOFF.0,
            }),
            leases: Mutex::new(Leases {
                slots: Slab::new(),
                next_generation: 0,
            }),
            stats: Mutex::new(SourceStats::default()),
            settled: AtomicU64::new(0),
            queued: Outstanding::default(),
            unconfirmed: Mutex::new(Unconfirmed::default()),
            interrupted: AtomicBool::new(false),
            consuming: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            cancelling: Mutex::new(()),
            blocked: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            connected_once: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            born: Instant::now(),
            next_scan: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
        }
    }
}

impl AmqpSource {
    /// Queues lease operations for the worker.
    fn enqueue(&self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        self.core.queued.add(ops.len() as u64);
        let count = ops.len() as u64;
        let sent = self
            .ops
            .as_ref()
            .is_some_and(|queue| queue.send(ops).is_ok());
        if !sent {
            // The worker is gone (only while dropping): the frames are not sent, and the
            // connection's close gives the messages back.
            self.core.answered(count);
        }
    }

    /// Removes the leases of `ids` from the table and turns each into an operation; an
    /// unknown lease, or one of a lost link, is refused; one whose deadline passed is
    /// refused and requeued.
    fn take_all(
        &self,
        ids: &[LeaseId],
        refused: &mut Vec<LeaseId>,
        kind: impl Fn(&Held) -> Settle,
    ) -> Vec<Op> {
        let now = Instant::now();
        let epoch = self.core.current_epoch();
        let max_attempts = self.core.config.max_attempts;
        let mut ops = Vec::with_capacity(ids.len());
        let mut expired = 0;
        let mut leases = lock(&self.core.leases);
        for &id in ids {
            let index = (id & u64::from(u32::MAX)) as usize;
            match leases.slots.get(index) {
                Some(held) if held.generation == (id >> 32) as u32 && held.epoch == epoch => {
                    let held = leases.slots.remove(index);
                    if held.deadline <= now {
                        expired += 1;
                        refused.push(id);
                        ops.push(Op {
                            kind: expiry_kind(&held, max_attempts),
                            tag: held.tag,
                            epoch: held.epoch,
                        });
                    } else {
                        ops.push(Op {
                            kind: kind(&held),
                            tag: held.tag,
                            epoch: held.epoch,
                        });
                    }
                }
                _ => refused.push(id),
            }
        }
        drop(leases);
        if expired > 0 {
            lock(&self.core.stats).expired += expired;
        }
        ops
    }
}

impl AmqpSource {
    /// How many messages the dead-letter queue `{queue}:dead` holds (asked of the broker).
    ///
    /// # Blocking
    ///
    /// One round trip, at most a quarter of a second: call it from a thread.
    ///
    /// # Errors
    ///
    /// [`SourceError::Unavailable`] when the broker did not answer.
    pub fn dead_letter_count(&self) -> Result<u64, SourceError> {
        self.core.count(&self.core.dead).ok_or_else(|| {
            SourceError::Unavailable(format!("amqp {} did not answer", self.core.shown_url))
        })
    }
}

/// What an expired lease becomes: requeued, or dead-lettered on its last attempt.
fn expiry_kind(held: &Held, max_attempts: u32) -> Settle {
    if held.attempt >= max_attempts {
        Settle::Dead
    } else {
        Settle::Requeue
    }
}

impl AmqpSource {
    /// Every core: the consuming one, then the publishing ones.
    fn cores(&self) -> impl Iterator<Item = &Core> {
        std::iter::once(&*self.core).chain(&self.lanes)
    }
}

impl Publish for AmqpSource {
    /// Sends the batch on the confirm channel of the next publishing connection (they are
    /// taken in turn) and returns once it is sent, without waiting for its confirms: they
    /// are awaited in order by later calls on the same connection, which keep at most its
    /// share of [`PUBLISH_WINDOW`] messages unconfirmed, and by
    /// [`Publish::wait_confirmed`]. A batch whose confirms fail (a nack, a lost connection)
    /// is sent again, with every later one of its connection, once the broker answers:
    /// publishing is at least once.
    fn publish(&self, batch: &[PubSubMessage]) -> Result<(), SourceError> {
        for message in batch {
            check_message(message).map_err(SourceError::Message)?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        let lane = self.next_lane.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        self.lanes[lane].publish(batch, PUBLISH_WINDOW / self.lanes.len())
    }

    fn interrupt(&self) {
        for lane in &self.lanes {
            lane.interrupted.store(true, Ordering::SeqCst);
        }
    }

    /// Awaits the outstanding confirms of every publishing connection, in order, up to
    /// `timeout` in all, also after an interrupt. Batches of a lost connection are sent
    /// again while the source is not interrupted; after an interrupt they count as
    /// unconfirmed.
    fn wait_confirmed(&self, timeout: Duration) -> usize {
        let end = Instant::now() + timeout;
        let unconfirmed = self
            .lanes
            .iter()
            .map(|lane| lane.confirm_all(end.saturating_duration_since(Instant::now()), true))
            .sum();
        self.told_unconfirmed.store(unconfirmed, Ordering::SeqCst);
        unconfirmed
    }
}

impl Core {
    /// `publish` on this connection, keeping at most `window` messages unconfirmed.
    fn publish(&self, batch: &[PubSubMessage], window: usize) -> Result<(), SourceError> {
        // One publisher at a time: the unconfirmed batches are settled in the order they
        // were sent, and a thread waiting for room would wait for the same confirms anyway.
        let mut unconfirmed = lock(&self.unconfirmed);
        let room = window.saturating_sub(batch.len());
        loop {
            if self.interrupted.load(Ordering::SeqCst) {
                return Err(SourceError::Closed);
            }
            let link = match self.link() {
                Ok(link) => link,
                Err(Failure::Down { retry_in }) => {
                    thread::sleep(retry_in.min(TICK));
                    continue;
                }
                Err(Failure::GaveUp(text)) => return Err(SourceError::Unavailable(text)),
                Err(Failure::Closed) => return Err(SourceError::Closed),
            };
            match self.settle(&mut unconfirmed, &link, room, CONFIRM_TIMEOUT, true) {
                Ok(()) => {}
                Err(Failure::Closed) => return Err(SourceError::Closed),
                Err(failure) => {
                    self.lost(&link, &failure_text(&failure));
                    continue;
                }
            }
            match self.send_batch(&link, batch.to_vec(), CONFIRM_TIMEOUT, true) {
                Ok(sent) => {
                    unconfirmed.count += batch.len();
                    unconfirmed.batches.push_back(sent);
                    return Ok(());
                }
                Err(Failure::Closed) => return Err(SourceError::Closed),
                Err(failure) => self.lost(&link, &failure_text(&failure)),
            }
        }
    }
}

/// Published batches whose confirms are outstanding, oldest first.
#[derive(Default)]
struct Unconfirmed {
    /// The batches.
    batches: VecDeque<Sent>,
    /// The messages of `batches`.
    count: usize,
}

/// One published batch.
struct Sent {
    /// Its messages, to send again when its confirms fail.
    envelopes: Vec<PubSubMessage>,
    /// The link it was sent on; a batch of a lost link is sent again.
    epoch: u64,
    /// One confirm per message, in order.
    confirms: Vec<PublisherConfirm>,
    /// How many leading `confirms` arrived as acks (those futures are spent).
    acked: usize,
}

impl Sent {
    /// Whether every confirm arrived as an ack, looking without waiting. A nack or an
    /// error marks the batch to be sent again (epoch 0).
    fn arrived(&mut self) -> bool {
        while self.acked < self.confirms.len() {
            match future::block_on(future::poll_once(&mut self.confirms[self.acked])) {
                Some(Ok(confirmation)) if stored(&confirmation) => self.acked += 1,
                Some(_) => {
                    self.epoch = 0;
                    return false;
                }
                None => return false,
            }
        }
        self.epoch != 0
    }
}

impl Core {
    /// Sends `envelopes` on the publish channel of `link`, waiting at most `limit` for lapin
    /// to write them; the `basic.publish` methods are started together (see [`in_order`]).
    fn send_batch(
        &self,
        link: &Link,
        envelopes: Vec<PubSubMessage>,
        limit: Duration,
        interruptible: bool,
    ) -> Result<Sent, Failure> {
        let done = Cell::new(0);
        // The publish time, in the `timestamp` property's whole seconds.
        let published = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let confirms = self.bounded_publishing(
            link,
            limit,
            interruptible,
            in_order(
                envelopes.iter().map(|envelope| {
                    link.publish.basic_publish(
                        ShortString::from(""),
                        ShortString::from(self.config.queue.as_str()),
                        // Mandatory: a message the queue is not there to take (deleted
                        // behind the service's back) comes back instead of vanishing.
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        envelope.data(),
                        properties(envelope, published),
                    )
                }),
                &done,
            ),
        )?;
        Ok(Sent {
            envelopes,
            epoch: link.epoch,
            confirms,
            acked: 0,
        })
    }

    /// Awaits the oldest batches' confirms until at most `room` messages are unconfirmed;
    /// first sends again, on `link`, every batch of an earlier link. Each waits at most
    /// `limit`. A confirmed batch is counted as published; a nack or a failure leaves its
    /// batch (and every later one) to be sent again on the next link.
    fn settle(
        &self,
        unconfirmed: &mut Unconfirmed,
        link: &Link,
        room: usize,
        limit: Duration,
        interruptible: bool,
    ) -> Result<(), Failure> {
        // A batch of a lost link whose confirms all came before the loss is not sent again.
        // (Only then: while the link holds, the loop below takes confirms in order.)
        if unconfirmed
            .batches
            .iter()
            .any(|sent| sent.epoch != link.epoch)
        {
            self.collect_arrived(unconfirmed);
        }
        for index in 0..unconfirmed.batches.len() {
            if unconfirmed.batches[index].epoch != link.epoch {
                let envelopes = std::mem::take(&mut unconfirmed.batches[index].envelopes);
                // Within the caller's limit: at shutdown, what is left of the grace period.
                match self.send_batch(
                    link,
                    envelopes.clone(),
                    limit.min(CONFIRM_TIMEOUT),
                    interruptible,
                ) {
                    Ok(sent) => unconfirmed.batches[index] = sent,
                    Err(failure) => {
                        unconfirmed.batches[index].envelopes = envelopes;
                        return Err(failure);
                    }
                }
            }
        }
        while unconfirmed.count > room {
            let Some(sent) = unconfirmed.batches.front_mut() else {
                break;
            };
            let answered = self.bounded_publishing(link, limit, interruptible, async {
                while sent.acked < sent.confirms.len() {
                    let confirmation = (&mut sent.confirms[sent.acked])
                        .await
                        .map_err(|error| error.to_string())?;
                    if !stored(&confirmation) {
                        return Err(refusal(&confirmation, &self.config.queue));
                    }
                    sent.acked += 1;
                }
                Ok(())
            });
            if let Err(failure) = answered {
                // The confirms still missing are void: the whole batch is sent again.
                sent.epoch = 0;
                return Err(failure);
            }
            let count = sent.envelopes.len();
            unconfirmed.batches.pop_front();
            unconfirmed.count -= count;
            lock(&self.stats).published += count as u64;
        }
        Ok(())
    }

    /// Counts as published, and forgets, every batch whose confirms all arrived as acks,
    /// wherever it stands in the queue and whatever link it came on.
    fn collect_arrived(&self, unconfirmed: &mut Unconfirmed) {
        let mut published = 0;
        unconfirmed.batches.retain_mut(|sent| {
            if sent.arrived() {
                published += sent.envelopes.len();
                false
            } else {
                true
            }
        });
        if published > 0 {
            unconfirmed.count -= published;
            lock(&self.stats).published += published as u64;
        }
    }

    /// Awaits every outstanding confirm, up to `timeout`; returns the messages left
    /// unconfirmed (the caller says so): those whose confirms did not all arrive.
    /// Without `reconnect` only a connected link is used (dropping the source must not
    /// wait for a connection attempt).
    fn confirm_all(&self, timeout: Duration, reconnect: bool) -> usize {
        let end = Instant::now() + timeout;
        let mut unconfirmed = lock(&self.unconfirmed);
        while unconfirmed.count > 0 {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let link = if reconnect {
                self.link()
            } else {
                self.healthy().ok_or(Failure::Closed)
            };
            let link = match link {
                Ok(link) => link,
                Err(Failure::Down { retry_in }) => {
                    thread::sleep(retry_in.min(TICK).min(left));
                    continue;
                }
                Err(Failure::GaveUp(_) | Failure::Closed) => break,
            };
            match self.settle(&mut unconfirmed, &link, 0, left, false) {
                Ok(()) => {}
                Err(Failure::Closed) => break,
                // A broker that blocks publishing (a resource alarm) confirms nothing until
                // it unblocks: the time is up, and reconnecting would not change that.
                Err(_) if link.connection.status().blocked() => break,
                Err(failure) => self.lost(&link, &failure_text(&failure)),
            }
        }
        // Without a link (or time) left, what arrived still counts.
        self.collect_arrived(&mut unconfirmed);
        unconfirmed.count
    }
}

/// Runs lapin methods in order, started together: polls each future once, in order, then
/// awaits each in order; counts in `done` the leading ones that succeeded, and stops at the
/// first error.
///
/// lapin queues a method's frames on the first poll, and the future then waits for its I/O
/// thread to write them. Awaiting each before starting the next costs a wake-up of that
/// thread, and a write, per method (measured: publishing at about 25k msg/s at most, and
/// about 30 µs of CPU per consumed message, most of it in futex and sendto); started
/// together, the frames are written in bulk.
async fn in_order<T, F>(
    methods: impl Iterator<Item = F>,
    done: &Cell<usize>,
) -> Result<Vec<T>, String>
where
    F: Future<Output = lapin::Result<T>>,
{
    let mut started = Vec::with_capacity(methods.size_hint().0);
    for method in methods {
        let mut method = Box::pin(method);
        let ready = future::poll_once(&mut method).await;
        started.push((method, ready));
    }
    let mut results = Vec::with_capacity(started.len());
    for (method, ready) in started {
        let result = match ready {
            Some(result) => result,
            None => method.await,
        };
        results.push(result.map_err(|error| error.to_string())?);
        done.set(done.get() + 1);
    }
    Ok(results)
}

/// Whether the broker took a published message: acked and not returned. A mandatory
/// message that no queue took (its queue was deleted) comes back before its ack.
fn stored(confirmation: &Confirmation) -> bool {
    matches!(confirmation, Confirmation::Ack(None))
}

/// Why a published message was not taken, for the log.
fn refusal(confirmation: &Confirmation, queue: &str) -> String {
    match confirmation {
        Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => format!(
            "a published message was returned unroutable: the queue {queue} is gone \
             (declared again on reconnecting)"
        ),
        _ => "the broker refused a published message".to_owned(),
    }
}

/// Whether the broker refused for a reason retrying cannot cure: `ACCESS_REFUSED` (403:
/// credentials, permissions), `PRECONDITION_FAILED` (406: a queue or exchange declared with
/// other arguments) or `NOT_ALLOWED` (530: a vhost that does not exist).
fn refused_for_good(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.get_id(), 403 | 406 | 530))
}

/// The text a failure carries, for the log.
fn failure_text(failure: &Failure) -> String {
    match failure {
        Failure::Down { .. } => "the broker did not answer in time".to_owned(),
        Failure::GaveUp(text) => text.clone(),
        Failure::Closed => "closed".to_owned(),
    }
}

/// Checks a message as [`Publish::publish`] does before sending anything: Pub/Sub's limits
/// ([`PubSubMessage::check`]), and the header names RabbitMQ cannot carry as attributes:
/// `x-...` (the broker's own, and the ordering key's `x-mayhem-ordering-key`) and names over
/// 255 bytes (an AMQP short string). A program can check its messages before connecting.
///
/// # Errors
///
/// The first rule the message breaks.
///
/// ```
/// use mayhem::source::amqp::check_message;
/// use mayhem::{MessageError, PubSubMessage};
/// assert_eq!(check_message(&PubSubMessage::new("web-03").with_attribute("origin", "ops")), Ok(()));
/// let reserved = PubSubMessage::new("web-03").with_attribute("x-death", "1");
/// assert!(matches!(check_message(&reserved), Err(MessageError::ReservedKey { .. })));
/// ```
pub fn check_message(message: &PubSubMessage) -> Result<(), MessageError> {
    crate::source::check_message(message, &[ORDERING_KEY_HEADER], "rabbitmq")?;
    if let Some((key, _)) = message
        .attributes()
        .iter()
        .find(|(key, _)| key.starts_with("x-"))
    {
        return Err(MessageError::ReservedKey {
            key: key.to_owned(),
            broker: "rabbitmq (x-... headers are the broker's)",
        });
    }
    if message.attributes().iter().any(|(key, _)| key.len() > 255) {
        return Err(MessageError::Unsupported(
            "an attribute key over 255 bytes cannot be an AMQP header name".to_owned(),
        ));
    }
    Ok(())
}

/// The header that carries a message's ordering key (RabbitMQ has no field for it).
const ORDERING_KEY_HEADER: &str = "x-mayhem-ordering-key";

/// The AMQP properties of a published message: persistent, its id as `message-id`, the
/// publish time as `timestamp` (seconds), its attributes as string headers, its ordering key
/// as [`ORDERING_KEY_HEADER`].
fn properties(message: &PubSubMessage, published: u64) -> BasicProperties {
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_timestamp(published);
    if !message.id().is_empty() {
        properties = properties
            .with_message_id(message.id().with_str(|id| ShortString::from(id.to_owned())));
    }
    if message.attributes().is_empty() && message.ordering_key().is_none() {
        return properties;
    }
    let mut headers = FieldTable::default();
    for (key, value) in message.attributes().iter() {
        headers.insert(
            ShortString::from(key),
            AMQPValue::LongString(value.as_bytes().into()),
        );
    }
    if let Some(key) = message.ordering_key() {
        headers.insert(
            ShortString::from(ORDERING_KEY_HEADER),
            AMQPValue::LongString(key.as_bytes().into()),
        );
    }
    properties.with_headers(headers)
}

/// An integer header, if it is one.
fn integer(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        _ => None,
    }
}

/// A header value as an attribute string: strings as they are, numbers and booleans written
/// out; `Ok(None)` for other types (left out); an error for a string that is not UTF-8.
fn text(value: &AMQPValue) -> Result<Option<String>, ()> {
    match value {
        AMQPValue::LongString(v) => std::str::from_utf8(v.as_bytes())
            .map(|v| Some(v.to_owned()))
            .map_err(|_| ()),
        AMQPValue::ShortString(v) => Ok(Some(v.as_str().to_owned())),
        AMQPValue::Boolean(v) => Ok(Some(v.to_string())),
        other => Ok(integer(other).map(|v| v.to_string())),
    }
}

/// Reads a delivery: the message (its body is the data, taken over without a copy) and its
/// attempt; or why it is not a message (it is then dead-lettered).
fn read(delivery: lapin::message::Delivery) -> Result<(PubSubMessage, u32), String> {
    let properties = &delivery.properties;
    let id = properties
        .message_id()
        .as_ref()
        .map(|id| MessageId::from(id.as_str()))
        .unwrap_or_default();
    let mut attributes = Attributes::new();
    let mut ordering_key = None;
    let mut returned = 0u64;
    if let Some(headers) = properties.headers() {
        for (key, value) in headers.inner() {
            let key = key.as_str();
            if key == "x-delivery-count" || key == "x-acquired-count" {
                returned = returned.max(integer(value).unwrap_or(0));
            } else if key == ORDERING_KEY_HEADER {
                ordering_key = text(value).ok().flatten();
            } else if !key.starts_with("x-") {
                match text(value) {
                    Ok(Some(value)) => attributes.insert(key, value),
                    Ok(None) => {}
                    Err(()) => {
                        return Err(format!(
                            "header '{key}' is not UTF-8 (attributes are strings)"
                        ))
                    }
                }
            }
        }
    }
    let publish_time = properties
        .timestamp()
        .map(|seconds| std::time::UNIX_EPOCH + Duration::from_secs(seconds));
    let mut message = PubSubMessage::new(bytes::Bytes::from(delivery.data))
        .with_id(id)
        .with_attributes(attributes);
    if let Some(time) = publish_time {
        message = message.with_publish_time(time);
    }
    if let Some(key) = ordering_key {
        message = message.with_ordering_key(key);
    }
    let attempt = u32::try_from(returned.saturating_add(1)).unwrap_or(u32::MAX);
    Ok((message, attempt))
}

impl Source for AmqpSource {
    /// Takes the deliveries the broker pushed ahead, up to `max` (the free part of the
    /// window); waits up to `wait` for the first.
    fn pull(&self, max: usize, wait: Duration, out: &mut Vec<Lease>) -> Result<(), SourceError> {
        let core = &self.core;
        if core.interrupted.load(Ordering::SeqCst) {
            return Err(SourceError::Closed);
        }
        if max == 0 {
            return Ok(());
        }
        self.enqueue(core.expire_local());
        let link = match core.link() {
            Ok(link) => link,
            Err(Failure::Down { retry_in }) => {
                // Nothing to deliver while the broker is away; the consumer loop comes back.
                thread::sleep(retry_in.min(wait));
                return Ok(());
            }
            Err(Failure::GaveUp(text)) => return Err(SourceError::Unavailable(text)),
            Err(Failure::Closed) => return Err(SourceError::Closed),
        };
        let end = Instant::now() + wait;
        let mut slot = lock(&link.consumer);
        if slot.is_none() {
            core.consuming.store(true, Ordering::SeqCst);
            match core.consume(&link) {
                Ok(consumer) => *slot = Some(consumer),
                Err(failure) => {
                    drop(slot);
                    if let Failure::Closed = failure {
                        return Err(SourceError::Closed);
                    }
                    core.lost(&link, &failure_text(&failure));
                    return Ok(());
                }
            }
        }
        let Some(consumer) = slot.as_mut() else {
            return Ok(());
        };
        let mut taken = 0;
        let mut bad = Vec::new();
        // How long this pull waited for more deliveries once it had one.
        let mut lingered = Duration::ZERO;
        // What was taken when the last linger began.
        let mut before_linger = 0;
        while taken < max {
            // What is buffered already, without a timer or a wake-up.
            let mut next = future::block_on(future::poll_once(consumer.next()));
            if next.is_none() {
                if taken + bad.len() > 0 {
                    // None buffered, and the connection's thread may be reading more of the
                    // same burst: a short sleep, then what came meanwhile, while something
                    // comes and `LINGER` lasts. A sleep, not a wait on the consumer: that
                    // wait would be woken by each delivery, one at a time.
                    if lingered >= LINGER || taken + bad.len() == before_linger {
                        break;
                    }
                    before_linger = taken + bad.len();
                    thread::sleep(LINGER_STEP);
                    lingered += LINGER_STEP;
                    continue;
                }
                if Instant::now() >= end || core.interrupted.load(Ordering::SeqCst) {
                    break;
                }
                // Nothing yet: waits for the first in short slices, so that an interrupt
                // ends the pull promptly.
                let left = end.saturating_duration_since(Instant::now());
                next = future::block_on(future::or(async { Some(consumer.next().await) }, async {
                    Timer::after(left.min(TICK)).await;
                    None
                }));
            }
            match next {
                None => {}
                Some(Some(Ok(delivery))) => {
                    let tag = delivery.delivery_tag;
                    match read(delivery) {
                        Ok((message, attempt)) => {
                            let id = core.hold(tag, link.epoch, attempt);
                            out.push(Lease {
                                message,
                                attempt,
                                id,
                            });
                            taken += 1;
                        }
                        Err(reason) => {
                            if core.malformed.fetch_add(1, Ordering::Relaxed) == 0 {
                                warn!(
                                    "a message on amqp queue {} is not a message ({reason}); \
                                 it is dead-lettered (further ones are only counted)",
                                    core.config.queue
                                );
                            }
                            // Counted once the dead letter is sent, as every other one (the
                            // worker's count): counting it here too counted it twice.
                            bad.push(Op {
                                kind: Settle::Dead,
                                tag,
                                epoch: link.epoch,
                            });
                        }
                    }
                }
                Some(Some(Err(error))) => {
                    drop(slot);
                    self.enqueue(bad);
                    core.lost(&link, &error.to_string());
                    return Ok(());
                }
                Some(None) => {
                    drop(slot);
                    self.enqueue(bad);
                    core.lost(&link, "the broker cancelled the consumer");
                    return Ok(());
                }
            }
        }
        drop(slot);
        self.enqueue(bad);
        Ok(())
    }

    fn ack(&self, leases: &[LeaseId], refused: &mut Vec<LeaseId>) -> Result<(), SourceError> {
        let ops = self.take_all(leases, refused, |_| Settle::Ack);
        self.enqueue(ops);
        Ok(())
    }

    fn nack(&self, leases: &[LeaseId], refused: &mut Vec<LeaseId>) -> Result<(), SourceError> {
        let max_attempts = self.core.config.max_attempts;
        let ops = self.take_all(leases, refused, |held| expiry_kind(held, max_attempts));
        self.enqueue(ops);
        Ok(())
    }

    /// Moves the local deadlines: RabbitMQ has no lease extension.
    /// Rejects the delivery without requeue: the broker dead-letters it to `{queue}:dead`
    /// at once (its `x-death` header says `rejected`; the reason itself is logged by the
    /// runner, as RabbitMQ's dead-lettering cannot add a header).
    fn reject(
        &self,
        lease: LeaseId,
        _reason: &str,
        refused: &mut Vec<LeaseId>,
    ) -> Result<(), SourceError> {
        let ops = self.take_all(&[lease], refused, |_| Settle::Dead);
        self.enqueue(ops);
        Ok(())
    }

    fn extend(
        &self,
        leases: &[LeaseId],
        by: Duration,
        refused: &mut Vec<LeaseId>,
    ) -> Result<(), SourceError> {
        let now = Instant::now();
        let epoch = self.core.current_epoch();
        let mut table = lock(&self.core.leases);
        for &lease in leases {
            let index = (lease & u64::from(u32::MAX)) as usize;
            match table.slots.get_mut(index) {
                Some(held)
                    if held.generation == (lease >> 32) as u32
                        && held.epoch == epoch
                        && held.deadline > now =>
                {
                    held.deadline = now + by;
                }
                _ => refused.push(lease),
            }
        }
        Ok(())
    }

    /// Also stops publishing, as [`Publish::interrupt`] does.
    fn interrupt(&self) {
        self.core.interrupted.store(true, Ordering::SeqCst);
        Publish::interrupt(self);
    }

    /// Waits for the queued frames; once the source is interrupted, at most a quarter of a
    /// second.
    fn flush(&self, timeout: Duration) -> usize {
        let timeout = if self.core.interrupted.load(Ordering::SeqCst) {
            timeout.min(SHUTDOWN_WAIT)
        } else {
            timeout
        };
        self.core.flush(timeout)
    }

    fn nack_all(&self) -> usize {
        let held: Vec<Held> = lock(&self.core.leases).slots.drain().collect();
        let count = held.len();
        self.enqueue(
            held.into_iter()
                .map(|held| Op {
                    kind: Settle::Requeue,
                    tag: held.tag,
                    epoch: held.epoch,
                })
                .collect(),
        );
        self.core.flush(SHUTDOWN_WAIT);
        count
    }

    /// Acks this instance sent and messages it dead-lettered.
    fn settled(&self) -> u64 {
        self.core.settled.load(Ordering::SeqCst)
    }

    /// The counters; `remaining` is the queue's ready messages (asked of the broker, at
    /// most a quarter of a second; its last answer while it does not answer) plus the leases
    /// this instance holds. Deliveries
    /// prefetched but not pulled yet, and other instances' leases, are not counted.
    ///
    /// After an interrupt (the last count of a run) the deliveries prefetched and never
    /// pulled are given back first, and the count is read until it holds still (at most a
    /// second): a quorum queue counts what was given back only once it applied the return.
    /// With one instance on the queue, `published == acked + dead_lettered + remaining`
    /// then holds.
    ///
    /// # Blocking
    ///
    /// Waits for queued frames and the broker: call it from a thread, not inside a future.
    fn stats(&self) -> SourceStats {
        let core = &self.core;
        core.flush(SHUTDOWN_WAIT);
        let mut stats = *lock(&core.stats);
        stats.undecodable = core.malformed.load(Ordering::Relaxed);
        stats.published += self
            .lanes
            .iter()
            .map(|lane| lock(&lane.stats).published)
            .sum::<u64>();
        let held = lock(&core.leases).slots.len() as u64;
        let ready = if core.interrupted.load(Ordering::SeqCst) {
            // The deliveries pushed ahead that no pull took are given back first, then
            // counted once the broker holds them as ready.
            let prefetched = core.prefetched();
            if !prefetched.is_empty() {
                self.enqueue(prefetched);
                core.flush(SHUTDOWN_WAIT);
            }
            core.settled_count(&core.config.queue)
        } else {
            core.count(&core.config.queue)
        };
        // A broker that does not answer (stalled, unreachable) does not empty the queue:
        // its last answer stands, else `remaining` (and `mayhem_remaining`) read 0 as if the
        // queue had drained.
        let ready = match ready {
            Some(ready) => {
                core.last_ready.store(ready, Ordering::SeqCst);
                ready
            }
            None => core.last_ready.load(Ordering::SeqCst),
        };
        stats.remaining = ready + held;
        stats
    }
}

impl Drop for AmqpSource {
    fn drop(&mut self) {
        let core = &self.core;
        // A source dropped without `wait_confirmed` still waits briefly for its confirms.
        let end = Instant::now() + SHUTDOWN_WAIT;
        let unconfirmed: usize = self
            .lanes
            .iter()
            .map(|lane| lane.confirm_all(end.saturating_duration_since(Instant::now()), false))
            .sum();
        // Those the last `wait_confirmed` returned, its caller has reported already.
        let unconfirmed = unconfirmed.saturating_sub(self.told_unconfirmed.load(Ordering::SeqCst));
        if unconfirmed > 0 {
            warn!(
                "{unconfirmed} messages published to amqp {} were not confirmed; \
                 they may be lost or published twice",
                core.shown_url
            );
        }
        // Closing the queue ends the worker once it has sent what is queued.
        self.ops = None;
        let unsent = core.flush(SHUTDOWN_WAIT);
        if unsent > 0 {
            warn!(
                "{unsent} lease operations were left unsent to amqp; closing the connection \
                 gives their messages back"
            );
        }
        core.closing.store(true, Ordering::SeqCst);
        let end = Instant::now() + SHUTDOWN_WAIT;
        if let Some(handle) = self.worker.take() {
            while !handle.is_finished() && Instant::now() < end {
                thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                if handle.join().is_err() {
                    error!("the amqp ack thread panicked");
                }
            } else {
                warn!("the amqp ack thread is still waiting on the broker; not waiting for it");
            }
        }
        // Closing the connection gives every unacked delivery back to the queue. Every
        // connection waits until the same instant, so many take no longer than one.
        let end = Instant::now() + SHUTDOWN_WAIT;
        for core in self.cores() {
            core.closing.store(true, Ordering::SeqCst);
            core.close(end);
        }
    }
}

impl fmt::Debug for AmqpSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSource")
            .field("config", &self.core.config)
            .finish_non_exhaustive()
    }
}

impl Core {
    /// Closes the current link, waiting for the broker at most until `end`.
    fn close(&self, end: Instant) {
        if let Some(link) = lock(&self.link).take() {
            let closed = future::block_on(future::or(
                async {
                    link.connection
                        .close(200, ShortString::from("shutdown"))
                        .await
                        .is_ok()
                },
                async {
                    Timer::at(end).await;
                    false
                },
            ));
            // Only the consuming connection holds deliveries; a publishing one that the
            // broker blocks (a resource alarm) cannot send its close, and holds nothing.
            if !closed && self.consuming.load(Ordering::SeqCst) {
                warn!("the amqp connection did not close in time; the broker gives the messages back when it notices");
            } else if !closed {
                log::debug!("an amqp publishing connection did not close in time");
            }
        }
    }

    /// The current link if it is still connected; a broken one is forgotten.
    fn healthy(&self) -> Option<Arc<Link>> {
        let slot = lock(&self.link);
        let link = Arc::clone(slot.as_ref()?);
        drop(slot);
        if link.connection.status().connected() && link.consume.status().connected() {
            return Some(link);
        }
        self.lost(&link, "the connection was closed");
        None
    }

    /// The current link, connecting when there is none and the backoff allows.
    fn link(&self) -> Result<Arc<Link>, Failure> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(Failure::Closed);
        }
        if let Some(link) = self.healthy() {
            return Ok(link);
        }
        // One connection attempt at a time; the `link` mutex itself is never held across
        // one, so that acks (which read only `live_epoch`) and the worker never wait on it.
        let _connecting = lock(&self.connecting);
        if let Some(link) = self.healthy() {
            return Ok(link);
        }
        let now = Instant::now();
        {
            let health = lock(&self.health);
            if let Some(since) = health.failing_since {
                if now.duration_since(since) >= self.config.reconnect_limit {
                    return Err(Failure::GaveUp(format!(
                        "amqp {} unavailable for more than {}: {}",
                        self.shown_url,
                        humantime::format_duration(self.config.reconnect_limit),
                        health.last_error
                    )));
                }
                if now < health.next_try {
                    return Err(Failure::Down {
                        retry_in: health.next_try - now,
                    });
                }
            }
        }
        let epoch = self.next_epoch.fetch_add(1, Ordering::SeqCst);
        match self.bounded(CONNECT_TIMEOUT, true, self.open(epoch)) {
            Ok(link) => {
                let link = Arc::new(link);
                self.connected_once.store(true, Ordering::SeqCst);
                *lock(&self.link) = Some(Arc::clone(&link));
                self.live_epoch.store(epoch, Ordering::SeqCst);
                let mut health = lock(&self.health);
                if health.failing_since.take().is_some() {
                    info!("reconnected to amqp {}", self.shown_url);
                }
                health.last_error.clear();
                health.delay = BACKOFF.0;
                Ok(link)
            }
            Err(Failure::Closed) => Err(Failure::Closed),
            Err(failure) => {
                let text = match failure {
                    Failure::Down { .. } => format!(
                        "no answer within {}",
                        humantime::format_duration(CONNECT_TIMEOUT)
                    ),
                    Failure::GaveUp(text) => text,
                    Failure::Closed => String::new(),
                };
                // A refusal that retrying cannot cure (credentials, a missing vhost, a queue
                // declared with other arguments) ends the start at once; once connected, a
                // refusal may be a broker being reconfigured, and is retried as any failure.
                if self.refused.swap(false, Ordering::SeqCst)
                    && !self.connected_once.load(Ordering::SeqCst)
                {
                    return Err(Failure::GaveUp(format!(
                        "amqp {} refused the connection: {text}",
                        self.shown_url
                    )));
                }
                Err(self.failed(&text))
            }
        }
    }

    /// Records a failure and schedules the next attempt.
    fn failed(&self, text: &str) -> Failure {
        let text = scrub(text, &self.secret);
        let now = Instant::now();
        let mut health = lock(&self.health);
        if health.last_error != text {
            warn!(
                "amqp {} unavailable: {text}; retrying for up to {}",
                self.shown_url,
                humantime::format_duration(self.config.reconnect_limit)
            );
            health.last_error = text;
        }
        health.failing_since.get_or_insert(now);
        let delay = health.delay;
        health.next_try = now + delay;
        health.delay = (delay * 2).min(BACKOFF.1);
        Failure::Down { retry_in: delay }
    }

    /// Forgets a link found broken: its leases are void (the broker gives their messages
    /// back) and counted as expired; the next call reconnects.
    fn lost(&self, link: &Arc<Link>, text: &str) {
        {
            let mut slot = lock(&self.link);
            match &*slot {
                Some(current) if Arc::ptr_eq(current, link) => *slot = None,
                _ => return,
            }
            self.live_epoch.store(0, Ordering::SeqCst);
        }
        let mut leases = lock(&self.leases);
        let before = leases.slots.len();
        leases.slots.retain(|_, held| held.epoch != link.epoch);
        let void = (before - leases.slots.len()) as u64;
        drop(leases);
        lock(&self.stats).expired += void;
        self.failed(text);
        // Closing frees the broker's side at once if the socket still works.
        let _ = self.bounded(SHUTDOWN_WAIT, false, async {
            let _ = link.connection.close(320, ShortString::from("lost")).await;
            Ok(())
        });
    }

    /// The ready messages of a queue (a passive `queue.declare`), at most a quarter of a
    /// second; `None` without an answer.
    fn count(&self, queue: &str) -> Option<u64> {
        let link = lock(&self.link).clone()?;
        self.bounded(SHUTDOWN_WAIT, false, async {
            link.consume
                .queue_declare(
                    ShortString::from(queue),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|queue| u64::from(queue.message_count()))
                .map_err(|error| error.to_string())
        })
        .ok()
    }

    /// The ready messages of a queue once the broker has taken back what this instance gave
    /// back: the count read again every 50 ms until two reads agree, at most a second (a
    /// quorum queue counts a returned message as ready only once it applied the return).
    fn settled_count(&self, queue: &str) -> Option<u64> {
        let end = Instant::now() + Duration::from_secs(1);
        let mut last = self.count(queue)?;
        while Instant::now() < end {
            thread::sleep(Duration::from_millis(50));
            let now = self.count(queue)?;
            if now == last {
                break;
            }
            last = now;
        }
        Some(last)
    }

    /// After an interrupt: cancels the consumer (or waits for the cancel under way) and
    /// returns rejects with requeue for every delivery it received that no pull took.
    fn prefetched(&self) -> Vec<Op> {
        self.cancel_after_interrupt();
        let Some(link) = lock(&self.link).clone() else {
            return Vec::new();
        };
        let mut slot = lock(&link.consumer);
        let Some(consumer) = slot.as_mut() else {
            return Vec::new();
        };
        let mut ops = Vec::new();
        // The consumer is cancelled: the broker sends it nothing more, and what it sent
        // before the cancel was answered is buffered already.
        while let Some(Some(Ok(delivery))) = future::block_on(future::poll_once(consumer.next())) {
            ops.push(Op {
                kind: Settle::Requeue,
                tag: delivery.delivery_tag,
                epoch: link.epoch,
            });
        }
        ops
    }

    /// The epoch of the current link (0 when there is none: no lease matches it).
    fn current_epoch(&self) -> u64 {
        self.live_epoch.load(Ordering::SeqCst)
    }

    /// Opens a connection, its channels and the topology.
    async fn open(&self, epoch: u64) -> Result<Link, String> {
        let scrubbed = |error: lapin::Error| {
            if refused_for_good(&error) {
                self.refused.store(true, Ordering::SeqCst);
            }
            scrub(&error.to_string(), &self.secret)
        };
        // `amqps://` takes the TLS settings (built with `amqp-tls`); `amqp://` ignores them.
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.ca.clone(),
        };
        let connection = Connection::connect_uri_with_config(
            self.uri.clone(),
            ConnectionProperties::default().with_connection_name("mayhem".into()),
            tls,
            lapin::runtime::default_runtime().map_err(scrubbed)?,
        )
        .await
        .map_err(scrubbed)?;
        let publish = connection.create_channel().await.map_err(scrubbed)?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(scrubbed)?;
        let consume = connection.create_channel().await.map_err(scrubbed)?;
        let dead = ShortString::from(self.dead.as_str());
        let queue = ShortString::from(self.config.queue.as_str());
        consume
            .exchange_declare(
                dead.clone(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(scrubbed)?;
        consume
            .queue_declare(
                dead.clone(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .map_err(scrubbed)?;
        consume
            .queue_bind(
                dead.clone(),
                dead.clone(),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(scrubbed)?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.config.max_attempts)),
        );
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead.as_str().into()),
        );
        // Dead letters at least once: the quorum queue keeps a dead-lettered message until
        // the dead-letter queue confirmed it. The default, at most once, drops it when the
        // dead-letter queue cannot take it at that moment, as while the broker stops (on
        // 3.10 every give-back of a clean stop counts as a delivery, so messages cross the
        // limit then) or after `{queue}:dead` was deleted. RabbitMQ takes this strategy only
        // with `x-overflow` `reject-publish`; no length limit is set, so nothing is rejected.
        arguments.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        consume
            .queue_declare(queue.clone(), QueueDeclareOptions::durable(), arguments)
            .await
            .map_err(|error| {
                format!(
                    "{} (a queue named {} with other arguments exists already?)",
                    scrubbed(error),
                    self.config.queue
                )
            })?;
        consume
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(scrubbed)?;
        // A client that consumed before consumes again as part of the reconnection: a broker
        // that takes connections but cannot serve the queue (a quorum queue without a
        // leader) is still failing, and counts against the reconnect limit.
        let consumer = if self.consuming.load(Ordering::SeqCst) {
            Some(
                consume
                    .basic_consume(
                        ShortString::from(self.config.queue.as_str()),
                        ShortString::from(""),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(scrubbed)?,
            )
        } else {
            None
        };
        Ok(Link {
            epoch,
            connection,
            publish,
            consume,
            consumer: Mutex::new(consumer),
        })
    }

    /// Starts consuming the queue on `link`.
    fn consume(&self, link: &Link) -> Result<Consumer, Failure> {
        self.bounded(CONNECT_TIMEOUT, true, async {
            link.consume
                .basic_consume(
                    ShortString::from(self.config.queue.as_str()),
                    ShortString::from(""),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|error| scrub(&error.to_string(), &self.secret))
        })
    }

    /// Runs `work` to completion, at most `limit`; gives up early when the source closes,
    /// or, when `interruptible` (publishing and connecting, not lease operations, which
    /// keep working after an interrupt), when it is interrupted.
    fn bounded<T>(
        &self,
        limit: Duration,
        interruptible: bool,
        work: impl Future<Output = Result<T, String>>,
    ) -> Result<T, Failure> {
        self.bounded_unless(limit, interruptible, None, work)
    }

    /// [`Core::bounded`] for a publish on `link`: when `interruptible` (a `publish`, not the
    /// shutdown's `wait_confirmed`), the time the broker blocks the connection (a memory or
    /// disk alarm: it reads nothing from a publishing connection then) does not count
    /// against `limit`. A blocked broker is not a lost connection: reconnecting would only
    /// send the same batches again into the same block.
    fn bounded_publishing<T>(
        &self,
        link: &Link,
        limit: Duration,
        interruptible: bool,
        work: impl Future<Output = Result<T, String>>,
    ) -> Result<T, Failure> {
        let blocking = interruptible.then_some(&link.connection);
        self.bounded_unless(limit, interruptible, blocking, work)
    }

    /// [`Core::bounded`], not counting the time `blocking` is blocked by the broker; logs
    /// when the broker blocks and unblocks it.
    fn bounded_unless<T>(
        &self,
        limit: Duration,
        interruptible: bool,
        blocking: Option<&Connection>,
        work: impl Future<Output = Result<T, String>>,
    ) -> Result<T, Failure> {
        let mut end = Instant::now() + limit;
        let mut checked = Instant::now();
        future::block_on(future::or(
            async { work.await.map_err(Failure::GaveUp) },
            async {
                loop {
                    let now = Instant::now();
                    if let Some(connection) = blocking {
                        let blocked = connection.status().blocked();
                        if blocked {
                            end += now - checked;
                        }
                        self.note_blocked(blocked);
                    }
                    checked = now;
                    let left = end.saturating_duration_since(now);
                    if left.is_zero() {
                        return Err(Failure::Down {
                            retry_in: Duration::ZERO,
                        });
                    }
                    if self.closing.load(Ordering::SeqCst)
                        || (interruptible && self.interrupted.load(Ordering::SeqCst))
                    {
                        return Err(Failure::Closed);
                    }
                    Timer::after(left.min(TICK)).await;
                }
            },
        ))
    }

    /// Logs once when the broker blocks this publishing connection, and once when it is
    /// seen unblocked again.
    fn note_blocked(&self, blocked: bool) {
        if self.blocked.swap(blocked, Ordering::SeqCst) == blocked {
            return;
        }
        if blocked {
            warn!(
                "amqp {} blocked publishing (a memory or disk alarm on the broker); publishing \
                 waits until it unblocks",
                self.shown_url
            );
        } else {
            info!("amqp {} unblocked publishing", self.shown_url);
        }
    }

    /// Takes a delivery as a lease; returns its id.
    fn hold(&self, tag: u64, epoch: u64, attempt: u32) -> LeaseId {
        let mut leases = lock(&self.leases);
        let generation = leases.next_generation;
        leases.next_generation = generation.wrapping_add(1);
        let index = leases.slots.insert(Held {
            tag,
            epoch,
            attempt,
            deadline: Instant::now() + self.config.ack_deadline,
            generation,
        });
        (u64::from(generation) << 32) | index as u64
    }

    /// Removes the leases whose deadline passed; returns the rejects that give them back.
    fn expire_local(&self) -> Vec<Op> {
        let now = Instant::now();
        let since = u64::try_from(now.duration_since(self.born).as_nanos()).unwrap_or(u64::MAX);
        let due = self.next_scan.load(Ordering::Relaxed);
        // One scan per `SCAN_EVERY` whoever asks: a lease expires at most that much late.
        if since < due
            || self
                .next_scan
                .compare_exchange(
                    due,
                    since + SCAN_EVERY_NANOS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return Vec::new();
        }
        let max_attempts = self.config.max_attempts;
        let mut leases = lock(&self.leases);
        let expired: Vec<usize> = leases
            .slots
            .iter()
            .filter(|(_, held)| held.deadline <= now)
            .map(|(index, _)| index)
            .collect();
        if expired.is_empty() {
            return Vec::new();
        }
        let ops: Vec<Op> = expired
            .into_iter()
            .map(|index| {
                let held = leases.slots.remove(index);
                Op {
                    kind: expiry_kind(&held, max_attempts),
                    tag: held.tag,
                    epoch: held.epoch,
                }
            })
            .collect();
        drop(leases);
        lock(&self.stats).expired += ops.len() as u64;
        ops
    }

    /// The worker: sends queued operations, and every tick requeues expired leases.
    fn run_ops(&self, queue: &mpsc::Receiver<Vec<Op>>) {
        let mut prefix = Prefix::new(0);
        loop {
            // Wakes for the tick, or sooner when deliveries held back behind a straggler
            // are due to be sent alone.
            let wait = prefix.deadline().map_or(TICK, |due| {
                due.saturating_duration_since(Instant::now()).min(TICK)
            });
            let next = queue.recv_timeout(wait);
            self.cancel_after_interrupt();
            match next {
                Ok(mut ops) => {
                    // Takes everything queued meanwhile: one pass sends it all.
                    while let Ok(more) = queue.try_recv() {
                        ops.extend(more);
                    }
                    self.send(&ops, &mut prefix, false);
                }
                Err(RecvTimeoutError::Timeout) => self.send(&[], &mut prefix, false),
                Err(RecvTimeoutError::Disconnected) => {
                    // The source is dropped: nothing is held back any longer.
                    self.send(&[], &mut prefix, true);
                    return;
                }
            }
            let expired = self.expire_local();
            if !expired.is_empty() {
                self.queued.add(expired.len() as u64);
                self.send(&expired, &mut prefix, false);
            }
        }
    }

    /// After an interrupt, cancels the consumer once, before any later frame: a nack sent
    /// after the interrupt must not bring its message straight back into this consumer's
    /// prefetch, where the connection's close would give it back a second time (and count
    /// a second attempt).
    fn cancel_after_interrupt(&self) {
        if !self.interrupted.load(Ordering::SeqCst) {
            return;
        }
        // A second caller waits here until the first one's cancel is answered.
        let _cancelling = lock(&self.cancelling);
        if self.cancelled.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(link) = lock(&self.link).clone() else {
            return;
        };
        let tag = lock(&link.consumer).as_ref().map(Consumer::tag);
        if let Some(tag) = tag {
            let _ = self.bounded(SHUTDOWN_WAIT, false, async {
                link.consume
                    .basic_cancel(tag, BasicCancelOptions::default())
                    .await
                    .map_err(|error| error.to_string())
            });
        }
    }

    /// Sends lease operations on the current link, as few frames as the ack prefix allows
    /// (see [`acks`]); an operation of a lost link is void (the broker gave its message
    /// back), and an ack among them is a late refusal. `force` sends what the prefix holds
    /// back at once.
    fn send(&self, ops: &[Op], prefix: &mut Prefix, force: bool) {
        let link = lock(&self.link).clone();
        let epoch = link.as_ref().map_or(0, |link| link.epoch);
        let mut void_acks = 0;
        // Operations done with: sent, or void.
        let mut answered = 0;
        if prefix.epoch() != epoch {
            // The old channel is gone, and the broker gave back what it held.
            let dropped = prefix.reset(epoch);
            void_acks += dropped.acks;
            answered += dropped.all;
        }
        for op in ops {
            if !(epoch != 0 && op.epoch == epoch && prefix.settle(op.tag, op.kind)) {
                void_acks += u64::from(op.kind == Settle::Ack);
                answered += 1;
            }
        }
        let mut frames = Vec::new();
        prefix.frames(Instant::now(), force, &mut frames);
        let mut settled = 0;
        let mut dead = 0;
        if let Some(link) = link.filter(|_| !frames.is_empty()) {
            // The frames are written in order; none waits for an answer (acks and nacks
            // have none), so the whole batch costs no round trip.
            let done = Cell::new(0);
            let sent = self.bounded(
                CONFIRM_TIMEOUT,
                false,
                in_order(
                    frames.iter().map(|frame| {
                        let consume = &link.consume;
                        async move {
                            match frame.kind {
                                Settle::Ack => {
                                    consume
                                        .basic_ack(
                                            frame.tag,
                                            BasicAckOptions {
                                                multiple: frame.multiple,
                                            },
                                        )
                                        .await
                                }
                                Settle::Requeue | Settle::Dead => {
                                    consume
                                        .basic_nack(
                                            frame.tag,
                                            BasicNackOptions {
                                                multiple: frame.multiple,
                                                requeue: frame.kind == Settle::Requeue,
                                            },
                                        )
                                        .await
                                }
                            }
                        }
                    }),
                    &done,
                ),
            );
            match sent {
                Ok(_) => {}
                Err(Failure::Closed) => {}
                Err(failure) => self.lost(&link, &failure_text(&failure)),
            }
            let failed_at = done.get();
            for (i, frame) in frames.iter().enumerate() {
                answered += frame.count;
                if i < failed_at {
                    match frame.kind {
                        Settle::Ack => settled += frame.count,
                        Settle::Dead => dead += frame.count,
                        Settle::Requeue => {}
                    }
                } else if frame.kind == Settle::Ack {
                    void_acks += frame.count;
                }
            }
        } else {
            // No link: whatever the prefix made frames of is void.
            for frame in &frames {
                answered += frame.count;
                if frame.kind == Settle::Ack {
                    void_acks += frame.count;
                }
            }
        }
        if settled + dead + void_acks > 0 {
            let mut stats = lock(&self.stats);
            stats.dead_lettered += dead;
            stats.late_refusals += void_acks;
            drop(stats);
            self.settled.fetch_add(settled + dead, Ordering::SeqCst);
        }
        self.answered(answered);
    }

    /// Waits until the queue of lease operations is empty, up to `timeout`; returns how
    /// many are left.
    fn flush(&self, timeout: Duration) -> usize {
        self.queued.wait_drained(timeout, || false)
    }

    /// Counts sent lease operations and wakes `flush` when none is left.
    fn answered(&self, count: u64) {
        self.queued.done(count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_shows() {
        let config = AmqpConfig {
            url: "amqp://user:s3cret@127.0.0.1:1/%2f".to_owned(),
            ..AmqpConfig::default()
        };
        for shown in [format!("{config:?}"), config.to_string()] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("amqp://user:***@127.0.0.1:1/%2f"), "{shown}");
        }
        assert_eq!(password(&config.url), "s3cret");
        assert_eq!(scrub("bad s3cret\nthing", "s3cret"), "bad *** thing");
    }

    #[test]
    fn an_ip_host_is_kept_as_written() {
        let uri = parse_uri("amqp://guest:guest@127.0.0.1:5673/v").expect("parses");
        assert_eq!(
            (
                uri.authority.host.as_str(),
                uri.authority.port,
                uri.vhost.as_str()
            ),
            ("127.0.0.1", 5673, "v")
        );
        let uri = parse_uri("amqp://[::1]:5673").expect("parses");
        assert_eq!(uri.authority.host, "::1");
    }

    #[test]
    fn the_heartbeat_is_short_unless_the_url_sets_one() {
        let uri = parse_uri("amqp://guest:guest@127.0.0.1:5673/v").expect("parses");
        assert_eq!(uri.query.heartbeat, Some(HEARTBEAT_SECS));
        let uri = parse_uri("amqp://127.0.0.1:5673/v?heartbeat=30").expect("parses");
        assert_eq!(uri.query.heartbeat, Some(30));
    }

    #[test]
    fn connect_refuses_bad_urls_and_settings() {
        let bad_url = AmqpConfig {
            url: "amqp://h:notaport".to_owned(),
            ..AmqpConfig::default()
        };
        assert!(matches!(
            AmqpSource::connect(bad_url),
            Err(SourceError::Backend(text)) if text.starts_with("invalid amqp url")
        ));
        let empty_queue = AmqpConfig {
            queue: String::new(),
            ..AmqpConfig::default()
        };
        assert!(matches!(
            AmqpSource::connect(empty_queue),
            Err(SourceError::Backend(text)) if text.contains("queue")
        ));
        let ca_on_plain_amqp = AmqpConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..AmqpConfig::default()
        };
        assert!(matches!(
            AmqpSource::connect(ca_on_plain_amqp),
            Err(SourceError::Backend(text)) if text.contains("amqps://")
        ));
        let missing_ca = AmqpConfig {
            url: "amqps://guest:s3cret@127.0.0.1:1/%2f".to_owned(),
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..AmqpConfig::default()
        };
        // Without TLS the scheme is refused first, naming the feature.
        let want = if cfg!(feature = "amqp-tls") {
            "/nonexistent/ca.pem"
        } else {
            "amqp-tls"
        };
        assert!(matches!(
            AmqpSource::connect(missing_ca),
            Err(SourceError::Backend(text)) if text.contains(want) && !text.contains("s3cret")
        ));
    }
}
