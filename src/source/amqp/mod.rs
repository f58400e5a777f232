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
//! A queue another program declared with other arguments (`PRECONDITION_FAILED` on the
//! source's declare) is consumed as it is: the source publishes its dead letters to
//! `{queue}:dead` itself and counts deliveries where the queue does not (see the README,
//! "A queue another program declared").
//!
//! A lost connection is reopened with exponential backoff (50 ms doubling to 2 s): the first
//! failure logs one line, a different failure another, and the first success after them
//! `reconnected to amqp ...`. When the failure lasts longer than
//! [`AmqpConfig::reconnect_limit`], `pull` and `publish` return
//! [`SourceError::Unavailable`] and the runner shuts the service down. Start-up retries the
//! same way within the same limit, except for a refusal retrying cannot cure (credentials,
//! a missing vhost, an exchange of another type), which ends it at once
//! ([`AmqpSource::connect_with`] also stops early when its
//! [`Shutdown`] is triggered). A publish retried after a lost connection may add the same
//! message twice (at least once). A batch the broker nacks (a queue full under
//! `overflow: reject-publish`) is sent again on the same connection after the same backoff,
//! and refusals lasting past the reconnect limit end publishing the same way.
//!
//! # Shutdown
//!
//! Every broker call is bounded; dropping the source waits at most a quarter of a second
//! for queued frames and for the connection to close. The password of the URL is never
//! logged: every address and error text goes through one redaction.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::uri::AMQPUri;
use log::warn;

mod adopted;
mod config;
mod consume;
mod link;
mod publish;
mod url;

use self::adopted::Adopted;
pub use self::config::{check_queue_name, AmqpConfig};
use self::consume::{expiry_kind, Held, Leases, Op};
use self::link::{Failure, Link};
pub use self::publish::check_message;
use self::publish::Unconfirmed;
use self::url::parse_uri;
pub use self::url::{parse_url, read_ca_file};
use crate::error::SourceError;
use crate::message::PubSubMessage;
use crate::shutdown::Shutdown;
use crate::source::kit::{Backoff, Outage, Secrets, Settle, Worker};
pub use crate::source::redact_url;
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
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));

/// A RabbitMQ quorum queue with the lease semantics of [`Source`]; see the
/// [module docs](self).
pub struct AmqpSource {
    /// The state shared with the worker thread.
    core: Arc<Core>,
    /// The connections that publish ([`AmqpConfig::publish_connections`]), each a lane of
    /// its own that never consumes and holds no lease; connected at their first `publish`.
    /// `core` never publishes: RabbitMQ blocks a connection that publishes during a resource
    /// alarm, and a consumer on it would stall with it, its acks included.
    lanes: Vec<Lane>,
    /// Which publishing connection the next `publish` takes.
    next_lane: AtomicUsize,
    /// What the last [`Publish::wait_confirmed`] returned: its caller reports those.
    told_unconfirmed: AtomicUsize,
    /// The thread sending queued operations and requeueing expired leases, and its queue.
    worker: Worker<Op>,
}

/// One connection of the source with its reconnection, shared with the calls that use it:
/// the consuming one ([`Core`]) and each publishing one ([`Lane`]); `side` holds what only
/// one of them needs.
struct Conn<S> {
    /// The settings.
    config: AmqpConfig,
    /// The parsed address.
    uri: AMQPUri,
    /// The PEM text of [`AmqpConfig::ca_file`], read once at start.
    ca: Option<String>,
    /// The URL with its password replaced, for log lines and errors.
    shown_url: String,
    /// The URL's secrets, removed from every error text.
    secrets: Secrets,
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
    /// Held by the one thread trying to connect.
    connecting: Mutex<()>,
    /// Connection health and the reconnect schedule.
    health: Mutex<Outage>,
    /// Set by `interrupt`: publishes and pulls return `Closed`.
    interrupted: AtomicBool,
    /// Set by the first pull: from then on every new link consumes.
    consuming: AtomicBool,
    /// Whether a publish last saw the broker blocking this connection (logged on change).
    blocked: AtomicBool,
    /// Set by a connection attempt the broker refused for good (see [`refused_for_good`]).
    refused: AtomicBool,
    /// Set once a link was established.
    connected_once: AtomicBool,
    /// Set when the queue exists with other arguments, declared by another program: it is
    /// consumed as it is (see `adopted.rs`).
    adopted: AtomicBool,
    /// Set when the source is dropped: blocked calls give up.
    closing: AtomicBool,
    /// What only the consuming or only a publishing connection keeps.
    side: S,
}

/// The consuming connection: what the source and its worker share.
type Core = Conn<Consuming>;

/// A publishing connection.
type Lane = Conn<Publishing>;

/// What the consuming connection keeps besides the connection: the leases and the counters.
struct Consuming {
    /// The queue's ready messages as the broker last told them (for `stats` while the broker
    /// does not answer).
    last_ready: AtomicU64,
    /// Leases this consumer holds; a lease id is the slot index plus the slot's generation.
    leases: Mutex<Leases>,
    /// The counters (`remaining` is asked of the broker; `published` is the lanes').
    stats: Mutex<SourceStats>,
    /// Acks sent and dead letters, readable without a lock.
    settled: AtomicU64,
    /// Lease operations queued and not yet sent.
    queued: Outstanding,
    /// Set once the worker cancelled the consumer after an interrupt.
    cancelled: AtomicBool,
    /// Messages given back to the queue (`basic.nack` with requeue) since the consumer was
    /// cancelled: the last count of ready messages waits until it holds them.
    given_back: AtomicU64,
    /// Held while the consumer is being cancelled.
    cancelling: Mutex<()>,
    /// When the lease table was created: [`Consuming::next_scan`] counts from it.
    born: Instant,
    /// Nanoseconds after `born` before which [`Core::expire_local`] does not scan the lease
    /// table again: a scan walks every lease, and pulls and the worker's every pass ask for
    /// one (a window of 10,000 made it 3 % of the client's CPU).
    next_scan: AtomicU64,
    /// Messages that could not be read (no message id, not a uuid, a bad instance name):
    /// dead-lettered, the first one logged.
    malformed: AtomicU64,
    /// The held deliveries' messages and the counted returns, on an adopted queue.
    adopted: Mutex<Adopted>,
    /// Closed by `interrupt`: a pull waiting for its first delivery wakes at once, rather
    /// than at the end of its [`TICK`] (a run of `--messages N` waited up to 50 ms there
    /// after its last ack).
    wake: async_channel::Sender<()>,
    /// What a waiting pull listens on: `recv` returns once `wake` is closed.
    woken: async_channel::Receiver<()>,
}

/// What a publishing connection keeps besides the connection.
#[derive(Default)]
struct Publishing {
    /// Published batches whose confirms are outstanding. A mutex held through a whole
    /// `publish`: see there.
    unconfirmed: Mutex<Unconfirmed>,
    /// Messages whose confirms arrived.
    published: AtomicU64,
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
        config.validate()?;
        let uri = parse_uri(&config.url)?;
        let ca = config.ca_file.as_deref().map(read_ca_file).transpose()?;
        let lanes = (0..config.publish_connections)
            .map(|_| {
                Lane::new(
                    config.clone(),
                    uri.clone(),
                    ca.clone(),
                    Publishing::default(),
                )
            })
            .collect();
        let core = Arc::new(Core::new(config, uri, ca, Consuming::new()));
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
                // (`link` never answers `Refused`: that is an answer to a publish.)
                Err(Failure::GaveUp(text) | Failure::Refused(text)) => {
                    return Err(SourceError::Unavailable(text))
                }
                Err(Failure::Closed) => return Err(SourceError::Closed),
            }
        }
        let worker_core = Arc::clone(&core);
        // A thread, not a task: the source is used from plain threads and owns no executor,
        // and the frames are sent with `block_on` on lapin's own smol reactor.
        let worker = Worker::spawn("mayhem-amqp-acks", move |queue| worker_core.run_ops(&queue))?;
        Ok(AmqpSource {
            core,
            lanes,
            next_lane: AtomicUsize::new(0),
            told_unconfirmed: AtomicUsize::new(0),
            worker,
        })
    }
}

impl<S> Conn<S> {
    /// The state of a connection that has not connected yet.
    fn new(config: AmqpConfig, uri: AMQPUri, ca: Option<String>, side: S) -> Conn<S> {
        Conn {
            ca,
            shown_url: redact_url(&config.url),
            secrets: Secrets::of(&config.url),
            dead: format!("{}:dead", config.queue),
            uri,
            config,
            link: Mutex::new(None),
            next_epoch: AtomicU64::new(1),
            live_epoch: AtomicU64::new(0),
            connecting: Mutex::new(()),
            health: Mutex::new(Outage::new(BACKOFF)),
            interrupted: AtomicBool::new(false),
            consuming: AtomicBool::new(false),
            blocked: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            connected_once: AtomicBool::new(false),
            adopted: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            side,
        }
    }
}

impl Consuming {
    /// The state of a consumer that holds no lease yet.
    fn new() -> Consuming {
        let (wake, woken) = async_channel::bounded(1);
        Consuming {
            last_ready: AtomicU64::new(0),
            leases: Mutex::new(Leases::new()),
            stats: Mutex::new(SourceStats::default()),
            settled: AtomicU64::new(0),
            queued: Outstanding::default(),
            cancelled: AtomicBool::new(false),
            given_back: AtomicU64::new(0),
            cancelling: Mutex::new(()),
            born: Instant::now(),
            next_scan: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            adopted: Mutex::default(),
            wake,
            woken,
        }
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
            .map(|lane| lane.confirm_all(end.saturating_duration_since(Instant::now())))
            .sum();
        self.told_unconfirmed.store(unconfirmed, Ordering::SeqCst);
        unconfirmed
    }
}

impl Source for AmqpSource {
    /// Takes the deliveries the broker pushed ahead, up to `max` (the free part of the
    /// window); waits up to `wait` for the first.
    fn pull(&self, max: usize, wait: Duration, out: &mut Vec<Lease>) -> Result<(), SourceError> {
        self.pull_deliveries(max, wait, out)
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

    /// Rejects the delivery without requeue: the broker dead-letters it to `{queue}:dead`
    /// at once (its `x-death` header says `rejected`; the reason itself is logged by the
    /// runner, as RabbitMQ's dead-lettering cannot add a header).
    fn reject(
        &self,
        lease: LeaseId,
        reason: &str,
        refused: &mut Vec<LeaseId>,
    ) -> Result<(), SourceError> {
        let ops = self.take_all(&[lease], refused, |_| Settle::Dead);
        if self.core.adopted.load(Ordering::Relaxed) {
            let reason: Arc<str> = reason.into();
            let mut adopted = lock(&self.core.side.adopted);
            for op in &ops {
                adopted.set_reason(op.epoch, op.tag, &reason);
            }
        }
        self.enqueue(ops);
        Ok(())
    }

    /// Moves the local deadlines: RabbitMQ has no lease extension.
    fn extend(
        &self,
        leases: &[LeaseId],
        by: Duration,
        refused: &mut Vec<LeaseId>,
    ) -> Result<(), SourceError> {
        let now = Instant::now();
        let epoch = self.core.current_epoch();
        let mut table = lock(&self.core.side.leases);
        for &lease in leases {
            match table.get_mut(lease) {
                Some(held) if held.epoch == epoch && held.deadline > now => {
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
        self.core.side.wake.close();
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
        // Reported by the caller: the drop's report leaves them out.
        self.core.side.queued.told(self.core.flush(timeout))
    }

    fn nack_all(&self) -> usize {
        let held: Vec<Held> = lock(&self.core.side.leases).drain().collect();
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
        self.core.side.settled.load(Ordering::SeqCst)
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
        let mut stats = *lock(&core.side.stats);
        stats.undecodable = core.side.malformed.load(Ordering::Relaxed);
        stats.published += self
            .lanes
            .iter()
            .map(|lane| lane.side.published.load(Ordering::SeqCst))
            .sum::<u64>();
        let held = lock(&core.side.leases).len() as u64;
        let ready = if core.interrupted.load(Ordering::SeqCst) {
            // The deliveries pushed ahead that no pull took are given back first, then
            // counted once the broker holds them as ready.
            let prefetched = core.prefetched();
            if !prefetched.is_empty() {
                self.enqueue(prefetched);
                core.flush(SHUTDOWN_WAIT);
            }
            core.settled_count(
                &core.config.queue,
                core.side.given_back.load(Ordering::SeqCst),
            )
        } else {
            core.count(&core.config.queue)
        };
        // A broker that does not answer (stalled, unreachable) does not empty the queue:
        // its last answer stands, else `remaining` (and `mayhem_remaining`) read 0 as if the
        // queue had drained.
        let ready = match ready {
            Some(ready) => {
                core.side.last_ready.store(ready, Ordering::SeqCst);
                ready
            }
            None => core.side.last_ready.load(Ordering::SeqCst),
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
            .map(|lane| lane.confirm_connected(end.saturating_duration_since(Instant::now())))
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
        self.worker.close();
        let unsent = core.side.queued.untold(core.flush(SHUTDOWN_WAIT));
        if unsent > 0 {
            warn!(
                "{unsent} lease operations were left unsent to amqp; closing the connection \
                 gives their messages back"
            );
        }
        core.closing.store(true, Ordering::SeqCst);
        self.worker
            .join_by(Instant::now() + SHUTDOWN_WAIT, "amqp ack");
        // Closing the connection gives every unacked delivery back to the queue. Every
        // connection waits until the same instant, so many take no longer than one.
        let end = Instant::now() + SHUTDOWN_WAIT;
        core.closing.store(true, Ordering::SeqCst);
        core.close(end);
        for lane in &self.lanes {
            lane.closing.store(true, Ordering::SeqCst);
            lane.close(end);
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

#[cfg(test)]
mod tests {
    use super::*;

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
