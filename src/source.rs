//! The subscription abstraction: a synchronous, blocking pull of leased deliveries.
//!
//! A [`Source`] is what a sync pub/sub client library offers: `publish`, a blocking `pull`
//! that leases messages until an ack deadline, and `ack`, `nack` and `extend` of a lease.
//! The embedded in-memory pub/sub ([`Subscription`](crate::Subscription)) is the default
//! implementation.
//!
//! [`Delivery`] wraps one lease with a drop guard: a delivery dropped without `ack` or `nack`
//! is nacked, so no code path can lose a message.

use std::fmt;
use std::time::Duration;

use crate::error::{LeaseError, SourceError};
use crate::message::PubSubMessage;

/// Identifies one lease of one message; a new delivery of the same message gets a new id.
pub type LeaseId = u64;

/// A message leased to this consumer, as a [`Source`] returns it from `pull`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The message.
    pub message: PubSubMessage,
    /// Which delivery of the message this is, counting from 1.
    pub attempt: u32,
    /// The id to ack, nack or extend this lease with.
    pub id: LeaseId,
}

/// Counters a source keeps of what happened to its messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Messages published.
    pub published: u64,
    /// Deliveries handed out by `pull` (a redelivered message counts again).
    pub delivered: u64,
    /// Messages acked (each message at most once).
    pub acked: u64,
    /// Leases nacked (explicitly, or by a dropped [`Delivery`]).
    pub nacked: u64,
    /// Deliveries of a message that had been delivered before.
    pub redelivered: u64,
    /// Leases whose deadline passed without ack or extension.
    pub expired: u64,
    /// Successful lease extensions.
    pub extended: u64,
    /// Messages moved to the dead-letter list after `max_attempts` deliveries.
    pub dead_lettered: u64,
    /// Acks refused because the lease had already expired.
    pub stale_acks: u64,
    /// Messages still in the subscription: ready to deliver or leased.
    pub remaining: u64,
}

impl SourceStats {
    /// Messages that reached a final state: acked or dead-lettered.
    pub fn settled(&self) -> u64 {
        self.acked + self.dead_lettered
    }
}

/// A pub/sub subscription with lease semantics, used from plain threads.
///
/// # Blocking
///
/// `publish` and `pull` may block the calling thread; call them from `std::thread`s (the
/// publishers and consumers), never inside a future. `ack`, `nack` and `extend` must return
/// promptly, as handlers on the executor call them.
pub trait Source: Send + Sync + 'static {
    /// Publishes one message, blocking while the backend has no room for it.
    ///
    /// # Errors
    ///
    /// [`SourceError::Closed`] once [`interrupt`](Source::interrupt) was called.
    fn publish(&self, message: PubSubMessage) -> Result<(), SourceError>;

    /// Leases up to `max` messages into `out`, blocking up to `wait` while none is ready.
    ///
    /// Returns with `out` unchanged when `wait` passes with nothing to deliver.
    ///
    /// # Errors
    ///
    /// [`SourceError::Closed`] once [`interrupt`](Source::interrupt) was called.
    fn pull(&self, max: usize, wait: Duration, out: &mut Vec<Lease>) -> Result<(), SourceError>;

    /// Acknowledges a lease: the message is done and leaves the subscription.
    ///
    /// # Errors
    ///
    /// [`LeaseError::Expired`] if the lease's deadline already passed (the ack is refused and
    /// counted: the message is or will be delivered again).
    fn ack(&self, lease: LeaseId) -> Result<(), LeaseError>;

    /// Gives a lease back: the message is delivered again (or dead-lettered when it used up
    /// its delivery attempts).
    ///
    /// # Errors
    ///
    /// [`LeaseError::Expired`] if the lease is not held any more.
    fn nack(&self, lease: LeaseId) -> Result<(), LeaseError>;

    /// Moves a lease's deadline to `by` from now.
    ///
    /// # Errors
    ///
    /// [`LeaseError::Expired`] if the lease is not held any more.
    fn extend(&self, lease: LeaseId, by: Duration) -> Result<(), LeaseError>;

    /// Wakes every thread blocked in `publish` or `pull`; from now on both return
    /// [`SourceError::Closed`]. Acks, nacks and extensions keep working.
    fn interrupt(&self);

    /// Nacks every lease this consumer holds; used on a forced exit. Returns how many.
    fn nack_all(&self) -> usize;

    /// Messages that reached a final state (acked or dead-lettered); cheap to call often.
    fn settled(&self) -> u64;

    /// The source's counters.
    fn stats(&self) -> SourceStats;
}

/// One leased message with a drop guard: dropping it without `ack` or `nack` nacks it.
///
/// ```
/// use std::time::Duration;
/// use mayhem::{Delivery, Source, Subscription, SubscriptionConfig};
///
/// let source = Subscription::new(SubscriptionConfig::default());
/// let mut rng = fastrand::Rng::with_seed(1);
/// source.publish(mayhem::PubSubMessage::random(&mut rng)).unwrap();
///
/// let mut leases = Vec::new();
/// source.pull(1, Duration::ZERO, &mut leases).unwrap();
/// let delivery = Delivery::new(leases[0], &source);
/// drop(delivery); // neither acked nor nacked: the guard nacks it
/// assert_eq!(source.stats().nacked, 1);
/// assert_eq!(source.stats().remaining, 1);
/// ```
pub struct Delivery<'a> {
    /// The lease this delivery settles.
    lease: Lease,
    /// Where to send the ack, nack or extension. A borrow, not an `Arc`: the runner's
    /// threads are scoped, so a delivery costs no reference count traffic.
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
    /// [`LeaseError::Expired`] when the lease had expired: the ack is refused.
    pub fn ack(mut self) -> Result<(), LeaseError> {
        self.settled = true;
        self.source.ack(self.lease.id)
    }

    /// Gives the message back for another delivery.
    ///
    /// # Errors
    ///
    /// [`LeaseError::Expired`] when the lease had expired (the message went back already).
    pub fn nack(mut self) -> Result<(), LeaseError> {
        self.settled = true;
        self.source.nack(self.lease.id)
    }

    /// Extends the lease to `by` from now.
    ///
    /// # Errors
    ///
    /// [`LeaseError::Expired`] when the lease had expired.
    pub fn extend(&self, by: Duration) -> Result<(), LeaseError> {
        self.source.extend(self.lease.id, by)
    }
}

impl Drop for Delivery<'_> {
    fn drop(&mut self) {
        if !self.settled {
            // The only failure is a lease that expired already, which put the message back
            // by itself: either way the message is not lost.
            let _ = self.source.nack(self.lease.id);
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
