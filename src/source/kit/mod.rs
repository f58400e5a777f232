//! The broker kit: what every source needs and writes once, here.
//!
//! - [`LeaseTable`]: the held deliveries, under lease ids a settled slot's later lease
//!   never answers to.
//! - [`Outage`] and [`Backoff`]: a run of failures, each kind logged once, and the
//!   doubling pauses between tries.
//! - [`redact_url`] and [`Secrets`]: one rule that keeps a URL's secrets out of log lines.
//! - [`Worker`]: the thread that sends queued lease operations, and its counted queue;
//!   [`join_by`], the bounded wait for a source's threads when it is dropped.

mod leases;
#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
mod outage;
mod redact;
#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
mod worker;

pub(crate) use self::leases::LeaseTable;
#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
pub(crate) use self::outage::{Backoff, Outage};
pub use self::redact::redact_url;
pub(crate) use self::redact::Secrets;
#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
pub(crate) use self::worker::{join_by, spawn, Worker};
