//! The broker abstraction: a publishing client and a consuming client with lease semantics.
//!
//! Real brokers give publishing and consuming to different clients, so there are two traits:
//! [`Publish`] sends batches of messages, and [`Source`] is what a sync pub/sub client library
//! offers a consumer: a blocking `pull` that leases messages until an ack deadline, and `ack`,
//! `nack` and `extend` over many leases at once. Every operation takes a batch because every
//! real broker can do a batch in one round trip (one Lua script call on Redis, one
//! `ModifyAckDeadline` request on Google Pub/Sub, one `basic.ack` with `multiple` or a
//! pipelined run of them on RabbitMQ, one `+WPI`/`+NAK` run on NATS JetStream).
//!
//! The runner's lease manager owns every lease it pulls until it settles it: it extends them
//! in batches, so a source never extends by itself, and it counts what happened (delivered,
//! acked, nacked, extended, refused). A source reports only what it alone knows in
//! [`SourceStats`].
//!
//! Implementations:
//! - [`memory`]: [`Subscription`](memory::Subscription), the embedded in-memory pub/sub;
//! - `redis` (feature `redis`): a Redis stream with a consumer group;
//! - `amqp` (feature `amqp`): a RabbitMQ quorum queue;
//! - `pubsub` (feature `pubsub`): a Google Cloud Pub/Sub subscription, over REST.
//!
//! [`Delivery`] wraps one lease with a drop guard, for programs that use a source directly:
//! a delivery dropped without `ack` or `nack` is nacked, so no code path can lose a message.

#[cfg(feature = "amqp")]
pub mod amqp;
// A build with fewer brokers uses fewer of the kit's parts.
#[cfg_attr(
    not(all(feature = "redis", feature = "amqp", feature = "pubsub")),
    allow(dead_code, unused_imports)
)]
mod kit;
pub mod memory;
#[cfg(feature = "pubsub")]
pub mod pubsub;
#[cfg(feature = "redis")]
pub mod redis;

use std::fmt;
use std::time::Duration;

pub use self::kit::redact_url;
use crate::error::{LeaseError, SourceError};
pub use crate::message::Attributes;
use crate::message::{MessageError, PubSubMessage};

/// Identifies one lease of one message; a new delivery of the same message gets a new id.
///
/// Opaque to the runner: a source packs into it whatever it needs to find the lease again.
pub type LeaseId = u64;

/// Checks one message before a broker publishes it: Pub/Sub's limits
/// ([`PubSubMessage::check`]), then the attribute keys the broker's wire format reserves for
/// the message's own fields (`reserved`, named with `broker` in the error).
pub(crate) fn check_message(
    message: &PubSubMessage,
    reserved: &[&str],
    broker: &'static str,
) -> Result<(), MessageError> {
    message.check()?;
    if let Some((key, _)) = message
        .attributes()
        .iter()
        .find(|(key, _)| reserved.contains(key))
    {
        return Err(MessageError::ReservedKey {
            key: key.to_owned(),
            broker,
        });
    }
    Ok(())
}

/// [`check_message`] for every message of a batch, as [`Publish::publish`] refuses it.
pub(crate) fn check_batch(
    batch: &[PubSubMessage],
    reserved: &[&str],
    broker: &'static str,
) -> Result<(), SourceError> {
    for message in batch {
        check_message(message, reserved, broker).map_err(SourceError::Message)?;
    }
    Ok(())
}

/// A message leased to this consumer, as a [`Source`] returns it from `pull`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The message, with its attributes.
    pub message: PubSubMessage,
    /// Which delivery of the message this is, counting from 1.
    pub attempt: u32,
    /// The id to ack, nack or extend this lease with.
    pub id: LeaseId,
}

/// What a source alone knows of its messages.
///
/// The runner counts everything it does itself (deliveries, acks, nacks, extensions and
/// refusals), once, for every source; a source only adds what the runner cannot see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Messages published through this client.
    pub published: u64,
    /// Messages still in the subscription: ready to deliver or leased.
    pub remaining: u64,
    /// Messages moved to the dead-letter list: after `max_attempts` deliveries, rejected by a
    /// handler, or not decodable as a message at all.
    pub dead_lettered: u64,
    /// Entries the source dead-lettered on their first delivery because no decoding of its
    /// wire format could read them (counted in `dead_lettered` too).
    pub undecodable: u64,
    /// Leases the source took back because their deadline passed (or another consumer
    /// claimed them).
    pub expired: u64,
    /// Acks the source refused after it had accepted them (a remote source that queues its
    /// acks learns of a refusal only when it sends them); refusals reported synchronously
    /// through `refused` are counted by the runner, not here.
    pub late_refusals: u64,
}

/// The publishing client of a broker.
///
/// # Blocking
///
/// `publish` may block the calling thread; call it from a `std::thread`, never inside a
/// future.
pub trait Publish: Send + Sync {
    /// Publishes a batch of messages, in order, blocking while the backend has no room.
    ///
    /// `Ok` means the backend accepted every message of the batch, or, for a backend that
    /// pipelines its confirms across calls, sent it and holds it until it is confirmed: such
    /// a backend sends a batch again when its confirms fail, and confirms everything before
    /// [`wait_confirmed`](Publish::wait_confirmed) returns (or says how many it could not).
    /// A remote backend sends the batch in one round trip (pipelined), not one per message.
    ///
    /// # Errors
    ///
    /// [`SourceError::Message`], before anything is sent, when a message of the batch exceeds
    /// Pub/Sub's limits ([`PubSubMessage::check`]) or uses an attribute key the broker's wire
    /// format reserves; [`SourceError::Closed`] once [`interrupt`](Publish::interrupt) was
    /// called; a backend error when the batch (or part of it: publishing is at least once) was
    /// not accepted.
    fn publish(&self, batch: &[PubSubMessage]) -> Result<(), SourceError>;

    /// Wakes every thread blocked in `publish`; from now on it returns
    /// [`SourceError::Closed`].
    fn interrupt(&self);

    /// Waits until the backend confirmed every message `publish` accepted, up to `timeout`,
    /// also after [`interrupt`](Publish::interrupt); returns how many are still unconfirmed.
    ///
    /// A backend that confirms within `publish` has nothing to wait for (the default). One
    /// that keeps confirms outstanding across calls, to pipeline them, awaits them here.
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread up to `timeout`.
    fn wait_confirmed(&self, timeout: Duration) -> usize {
        let _ = timeout;
        0
    }
}

/// What [`Source::pull_batch`] returns unless a source says otherwise.
pub const PULL_BATCH: usize = 256;

/// The consuming client of a broker: a subscription with lease semantics, used from plain
/// threads.
///
/// `ack`, `nack` and `extend` take a batch of leases. A lease the source knows is no longer
/// held by this consumer (its deadline passed, another consumer claimed it, it was settled
/// already, or the id is unknown) is pushed to `refused`; every other lease of the batch is
/// accepted.
///
/// `Ok` means *accepted*. A local source has done the operation when it returns; a remote
/// source may queue and pipeline it, and must send it before [`flush`](Source::flush)
/// returns (or say how many it could not send). A lease whose ack is lost that way is not
/// lost: the broker delivers it again after its deadline.
///
/// # Blocking
///
/// `pull` may block the calling thread; call it from a `std::thread` (the consumers), never
/// inside a future. `ack`, `nack` and `extend` must return promptly, as handler tasks on the
/// executor call them.
pub trait Source: Send + Sync {
    /// Leases up to `max` messages into `out`, blocking up to `wait` while none is ready.
    ///
    /// Returns with `out` unchanged when `wait` passes with nothing to deliver.
    ///
    /// # Errors
    ///
    /// [`SourceError::Closed`] once [`interrupt`](Source::interrupt) was called; a backend
    /// error otherwise ([`SourceError::Unavailable`] makes the runner shut down).
    fn pull(&self, max: usize, wait: Duration, out: &mut Vec<Lease>) -> Result<(), SourceError>;

    /// Most leases one pull should take: each consumer asks for up to this many at a time
    /// (fewer when the flow-control window has less room). The default, 256, suits a source
    /// whose pull costs little; a broker whose every read costs a command and a round trip
    /// reads more at once.
    fn pull_batch(&self) -> usize {
        PULL_BATCH
    }

    /// Acknowledges leases: their messages are done and leave the subscription.
    ///
    /// # Errors
    ///
    /// A backend error when the batch could not be accepted at all.
    fn ack(&self, leases: &[LeaseId], refused: &mut Vec<LeaseId>) -> Result<(), SourceError>;

    /// Gives leases back: their messages are delivered again (or dead-lettered when they used
    /// up their delivery attempts).
    ///
    /// # Errors
    ///
    /// A backend error when the batch could not be accepted at all.
    fn nack(&self, leases: &[LeaseId], refused: &mut Vec<LeaseId>) -> Result<(), SourceError>;

    /// Dead-letters a lease at once, whatever its attempt, recording `reason` with the dead
    /// letter: its message can never succeed (a handler said so with
    /// [`HandleError::Rejected`](crate::HandleError::Rejected)). The message counts in
    /// [`SourceStats::dead_lettered`]. Rejections are rare, so this takes one lease.
    ///
    /// # Errors
    ///
    /// A backend error when the rejection could not be accepted (the lease then expires and
    /// its message is delivered again).
    fn reject(
        &self,
        lease: LeaseId,
        reason: &str,
        refused: &mut Vec<LeaseId>,
    ) -> Result<(), SourceError>;

    /// Moves the deadlines of leases to `by` from now.
    ///
    /// # Errors
    ///
    /// A backend error when the batch could not be accepted at all.
    fn extend(
        &self,
        leases: &[LeaseId],
        by: Duration,
        refused: &mut Vec<LeaseId>,
    ) -> Result<(), SourceError>;

    /// Wakes every thread blocked in `pull`; from now on it returns
    /// [`SourceError::Closed`]. Acks, nacks and extensions keep working.
    fn interrupt(&self);

    /// Sends what was accepted but not sent yet, waiting at most `timeout`. Returns how many
    /// lease operations are left unsent (always 0 for a local source).
    fn flush(&self, timeout: Duration) -> usize {
        let _ = timeout;
        0
    }

    /// Gives back every lease this client holds, at once; used on a forced exit, when there
    /// is no time to settle leases one by one. Returns how many.
    fn nack_all(&self) -> usize;

    /// Messages that reached a final state (acked or dead-lettered), as far as this source
    /// can tell; `--messages N` completes when it reaches N (and the run's publishers
    /// published N). Cheap to call often.
    fn settled(&self) -> u64;

    /// What the source alone knows.
    fn stats(&self) -> SourceStats;
}

/// One leased message with a drop guard: dropping it without `ack` or `nack` nacks it.
///
/// For programs that use a [`Source`] directly; the runner has its own lease manager.
///
/// ```
/// use std::time::Duration;
/// use mayhem::{Delivery, Publish, Source, Subscription, SubscriptionConfig};
///
/// let source = Subscription::new(SubscriptionConfig::default());
/// let mut rng = fastrand::Rng::with_seed(1);
/// source.publish(&[mayhem::PubSubMessage::random(&mut rng)]).unwrap();
///
/// let mut leases = Vec::new();
/// source.pull(1, Duration::ZERO, &mut leases).unwrap();
/// let delivery = Delivery::new(leases.pop().unwrap(), &source);
/// drop(delivery); // neither acked nor nacked: the guard nacks it
/// assert_eq!(source.stats().remaining, 1);
/// source.pull(1, Duration::ZERO, &mut leases).unwrap();
/// assert_eq!(leases[0].attempt, 2);
/// ```
pub struct Delivery<'a> {
    /// The lease this delivery settles.
    lease: Lease,
    /// Where to send the ack, nack or extension. A borrow, not an `Arc`: the delivery lives
    /// no longer than the source.
    source: &'a dyn Source,
    /// Set once acked or nacked, so the drop guard does nothing.
    settled: bool,
}

impl<'a> Delivery<'a> {
    /// Wraps a lease pulled from `source`.
    pub fn new(lease: Lease, source: &'a dyn Source) -> Self {
        Delivery {
            lease,
            source,
            settled: false,
        }
    }

    /// The message.
    pub fn message(&self) -> &PubSubMessage {
        &self.lease.message
    }

    /// Which delivery of the message this is, counting from 1.
    pub fn attempt(&self) -> u32 {
        self.lease.attempt
    }

    /// The lease id.
    pub fn lease_id(&self) -> LeaseId {
        self.lease.id
    }

    /// Acknowledges the message.
    ///
    /// # Errors
    ///
    /// [`LeaseError::Expired`] when the lease was not held any more: the ack is refused.
    pub fn ack(mut self) -> Result<(), LeaseError> {
        self.settled = true;
        one(self.lease.id, |ids, refused| self.source.ack(ids, refused))
    }

    /// Gives the message back for another delivery.
    ///
    /// # Errors
    ///
    /// [`LeaseError::Expired`] when the lease was not held any more (the message went back
    /// already).
    pub fn nack(mut self) -> Result<(), LeaseError> {
        self.settled = true;
        one(self.lease.id, |ids, refused| self.source.nack(ids, refused))
    }

    /// Dead-letters the message at once with `reason`: it can never succeed.
    ///
    /// # Errors
    ///
    /// [`LeaseError::Expired`] when the lease was not held any more.
    pub fn reject(mut self, reason: &str) -> Result<(), LeaseError> {
        self.settled = true;
        one(self.lease.id, |ids, refused| {
            self.source.reject(ids[0], reason, refused)
        })
    }

    /// Extends the lease to `by` from now.
    ///
    /// # Errors
    ///
    /// [`LeaseError::Expired`] when the lease was not held any more.
    pub fn extend(&self, by: Duration) -> Result<(), LeaseError> {
        one(self.lease.id, |ids, refused| {
            self.source.extend(ids, by, refused)
        })
    }
}

/// Runs a batch operation of a [`Source`] on one lease, and turns its outcome into that
/// lease's result: for programs that settle leases one at a time.
///
/// # Errors
///
/// [`LeaseError::Expired`] when the source refused the lease; [`LeaseError::Source`] when the
/// batch failed.
///
/// ```
/// use std::time::Duration;
/// use mayhem::{source::one, LeaseError, Publish, Source, Subscription, SubscriptionConfig};
///
/// let source = Subscription::new(SubscriptionConfig::default());
/// source.publish(&[mayhem::PubSubMessage::random(&mut mayhem::Rng::with_seed(4))]).unwrap();
/// let mut leases = Vec::new();
/// source.pull(1, Duration::ZERO, &mut leases).unwrap();
/// let id = leases[0].id;
/// assert_eq!(one(id, |ids, refused| source.ack(ids, refused)), Ok(()));
/// assert_eq!(one(id, |ids, refused| source.ack(ids, refused)), Err(LeaseError::Expired));
/// ```
pub fn one(
    id: LeaseId,
    op: impl FnOnce(&[LeaseId], &mut Vec<LeaseId>) -> Result<(), SourceError>,
) -> Result<(), LeaseError> {
    let mut refused = Vec::new();
    op(&[id], &mut refused).map_err(LeaseError::Source)?;
    if refused.is_empty() {
        Ok(())
    } else {
        Err(LeaseError::Expired)
    }
}

impl Drop for Delivery<'_> {
    fn drop(&mut self) {
        if !self.settled {
            // A refusal means the lease expired already, which put the message back by
            // itself; a backend error leaves it to expire: either way the message is not lost.
            let _ = one(self.lease.id, |ids, refused| self.source.nack(ids, refused));
        }
    }
}

impl fmt::Debug for Delivery<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("lease", &self.lease)
            .field("settled", &self.settled)
            .finish()
    }
}
