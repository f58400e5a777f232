//! The broker kit: what every source needs and writes once, here.
//!
//! - [`LeaseTable`]: the held deliveries, under lease ids a settled slot's later lease
//!   never answers to.
//! - [`Outage`] and [`Backoff`]: a run of failures, each kind logged once, and the
//!   doubling pauses between tries.
//! - [`redact_url`] and [`Secrets`]: one rule that keeps a URL's secrets out of log lines.
//! - [`Holds`]: held deliveries with local deadlines, and the holds of ordering keys.
//! - [`Http`]: a broker's HTTP API: JSON calls on kept-alive connections, bearer tokens
//!   renewed before they expire, RS256 JWTs, errors that say whether to try again.
//! - [`remote`]: a whole `Source` on a broker with an HTTP API that settles deliveries by
//!   handle, over [`Holds`] and [`Http`]: the broker writes only what it fetches and sends.
//! - [`Prefix`]: cumulative acks on a broker that numbers the deliveries of a channel.
//! - [`Worker`]: the thread that sends queued lease operations, and its counted queue;
//!   [`join_by`], the bounded wait for a source's threads when it is dropped.

#[cfg(feature = "pubsub")]
mod holds;
#[cfg(feature = "pubsub")]
pub(crate) mod http;
mod leases;
#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
mod outage;
#[cfg(feature = "amqp")]
mod prefix;
mod redact;
#[cfg(feature = "pubsub")]
pub(crate) mod remote;
#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
mod worker;

#[cfg(feature = "pubsub")]
pub(crate) use self::holds::{End, Held, Holds, Placed, Refused};
#[cfg(feature = "pubsub")]
pub use self::http::HttpError;
#[cfg(feature = "pubsub")]
pub(crate) use self::http::{fetch_token, jwt_rs256, Bearer, Http, Renewing, Token};
pub(crate) use self::leases::LeaseTable;
#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
pub(crate) use self::outage::{Backoff, Outage};
#[cfg(feature = "amqp")]
pub(crate) use self::prefix::{Prefix, Settle};
pub use self::redact::redact_url;
pub(crate) use self::redact::Secrets;
#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
pub(crate) use self::worker::{join_by, spawn, Worker};
