//! The broker kit: what every source needs and writes once, here.
//!
//! - [`LeaseTable`]: the held deliveries, under lease ids a settled slot's later lease
//!   never answers to.
//! - [`Outage`] and [`Backoff`]: a run of failures, each kind logged once, and the
//!   doubling pauses between tries.
//! - [`redact_url`] and [`Secrets`]: one rule that keeps a URL's secrets out of log lines.
//! - [`Holds`]: held deliveries with local deadlines, and the holds of ordering keys.
//! - [`Prefix`]: cumulative acks on a broker that numbers the deliveries of a channel.
//! - [`Worker`]: the thread that sends queued lease operations, and its counted queue;
//!   [`join_by`], the bounded wait for a source's threads when it is dropped.

#[cfg(feature = "pubsub")]
mod holds;
mod leases;
#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
mod outage;
#[cfg(feature = "amqp")]
mod prefix;
mod redact;
#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
mod worker;

#[cfg(feature = "pubsub")]
pub(crate) use self::holds::{End, Held, Holds, Placed, Refused};
pub(crate) use self::leases::LeaseTable;
#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
pub(crate) use self::outage::{Backoff, Outage};
#[cfg(feature = "amqp")]
pub(crate) use self::prefix::{Prefix, Settle};
pub use self::redact::redact_url;
pub(crate) use self::redact::Secrets;
#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
pub(crate) use self::worker::{join_by, spawn, Worker};
