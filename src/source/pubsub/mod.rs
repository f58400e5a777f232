//! A [`Source`](crate::source::Source) on Google Cloud Pub/Sub (feature `pubsub`, off by
//! default), over its REST API v1 with a blocking HTTP/1.1 client: each consumer thread
//! makes its own `pull`, as a sync client library gives you. The lease semantics are the
//! broker kit's (`source/kit/remote.rs`); this folder says how Pub/Sub fetches, settles,
//! publishes and is set up. `stats().remaining` is what this source holds (handed out or
//! held back): Pub/Sub's API has no count of a subscription's backlog.
//!
//! # Mapping
//!
//! | `Source` | Pub/Sub |
//! |---|---|
//! | start | `GET` the subscription; when missing, `PUT` its topic (`?topic=`, else the subscription's name), the dead-letter topic `{subscription}-dead` and the subscription (ack deadline, dead-letter policy, message ordering with `?ordering=true`) |
//! | `publish` | `topics/T:publish`, at most 1,000 messages and about 9.5 MB of JSON per request, to the subscription's topic, up to 4 requests of a batch in flight at once (one after the other when a message of the batch has an ordering key); a message's own id travels as the attribute `mayhem_message_id` (Pub/Sub's ids are the server's, used for messages without one) |
//! | `pull` | `subscriptions/S:pull` with `returnImmediately`, polled within the caller's wait |
//! | `ack` | `:acknowledge`, up to 2,500 ack ids per request |
//! | `nack` | `:modifyAckDeadline` to 0 |
//! | `extend` | `:modifyAckDeadline` to the seconds asked (at most 600) |
//! | attempt | `deliveryAttempt` (set on subscriptions with a dead-letter policy), else counted by the source |
//! | dead letter | published by the source to `{subscription}-dead` with the attributes `mayhem_dead_reason` and `mayhem_attempt`, then acked; counted once |
//!
//! The subscription's own dead-letter policy allows one delivery more than
//! [`PubSubConfig::max_attempts`] (5 to 100, Pub/Sub's bounds), so the source dead-letters
//! first, with its reason: the emulator's forwarding does not work, and the service's needs
//! IAM grants the source cannot check. The policy is what makes Pub/Sub count
//! `deliveryAttempt`.
//!
//! # Leases
//!
//! `ack`, `nack`, `extend` and `reject` check the lease in a local table and queue the
//! operation for a worker thread, which sends each kind in batched requests; they return at
//! once. The table refuses stale leases, since Pub/Sub answers an ack of an expired ack id
//! with success. Local deadlines start when a pull was sent, so they end before the server's.
//!
//! # Ordering keys
//!
//! On a subscription with message ordering, a message is handed out only once the message
//! before it of the same ordering key was settled; messages of other keys go on
//! concurrently. A nack (or an expiry) gives back the messages held behind it too, as
//! Pub/Sub then delivers the rest of the key again, in order. The source extends the
//! messages it holds back itself.
//!
//! # Failures
//!
//! A request that gets no answer, a server error or throttling is tried again with backoff
//! (50 ms to 2 s), logged once per kind and once on recovery; past
//! [`PubSubConfig::reconnect_limit`] `pull` and `publish` fail with
//! [`SourceError::Unavailable`]. A subscription found missing by a pull (the emulator keeps
//! everything in memory and loses it on a restart) is created again, with one line.

mod auth;
mod publish;
mod rest;
mod topology;
mod url;

use std::fmt;
use std::time::Duration;

use log::warn;

use crate::error::SourceError;
use crate::message::PubSubMessage;
use crate::shutdown::Shutdown;
use crate::source::kit::remote::{self, Broker, DeadLetter, Fetched, Leasing, Shared, Terms};
use crate::source::kit::HttpError;

use self::rest::{Rest, ACK_IDS_PER_REQUEST};

pub use self::auth::AuthError;
pub use self::publish::check_message;
pub use self::rest::RestError as PubSubError;
pub use self::url::{check_emulator_host, endpoint, PubSubUrl, UrlError, SERVICE_ENDPOINT};

/// The shortest ack deadline Pub/Sub accepts, in seconds.
const DEADLINE_MIN: u64 = 10;
/// The longest ack deadline Pub/Sub accepts (and the longest extension), in seconds.
const DEADLINE_MAX: u64 = 600;
/// The attribute of a dead letter that says why it is one.
const REASON_ATTRIBUTE: &str = "mayhem_dead_reason";
/// The attribute of a dead letter that gives its delivery attempt.
const ATTEMPT_ATTRIBUTE: &str = "mayhem_attempt";
/// The attribute of a dead letter that carries neither the data nor the attributes of its
/// message: with them it was over Pub/Sub's limits.
const STRIPPED_ATTRIBUTE: &str = "mayhem_dead_letter_stripped";

/// Checks that `url` is a `pubsub://PROJECT/SUBSCRIPTION[?topic=NAME&ordering=true]` URL.
///
/// # Errors
///
/// [`SourceError::Backend`] with one line naming the URL and what is wrong with it.
pub fn parse_url(url: &str) -> Result<(), SourceError> {
    PubSubUrl::parse(url)
        .map(drop)
        .map_err(|error| SourceError::Backend(error.to_string()))
}

/// Settings of a [`PubSubSource`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubSubConfig {
    /// `pubsub://PROJECT/SUBSCRIPTION[?topic=NAME&ordering=true]`.
    pub url: String,
    /// The emulator's `host:port`; `None` reads `PUBSUB_EMULATOR_HOST`, as Google's clients
    /// do, and without it the source talks to [`SERVICE_ENDPOINT`] with credentials.
    pub emulator_host: Option<String>,
    /// The ack deadline of a subscription the source creates (Pub/Sub takes 10 s to 600 s).
    pub ack_deadline: Duration,
    /// Deliveries of one message before the source dead-letters it.
    pub max_attempts: u32,
    /// How long Pub/Sub may stay unreachable (or keep failing) before `pull` and `publish`
    /// fail with [`SourceError::Unavailable`]; start-up retries as long.
    pub reconnect_limit: Duration,
    /// Longest time one request may take.
    pub request_timeout: Duration,
}

impl Default for PubSubConfig {
    fn default() -> Self {
        PubSubConfig {
            url: "pubsub://mayhem/mayhem".to_owned(),
            emulator_host: None,
            ack_deadline: Duration::from_secs(10),
            max_attempts: 5,
            reconnect_limit: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// A Pub/Sub subscription with the lease semantics of [`Source`](crate::source::Source),
/// and a publisher to its topic; see the [module docs](self).
pub struct PubSubSource {
    /// The kit's lease semantics on [`PubSub`], with its worker thread.
    leasing: Leasing<PubSub>,
    /// The settings.
    config: PubSubConfig,
}

/// What the kit's [`Leasing`] asks of Pub/Sub.
struct PubSub {
    /// What the URL names.
    url: PubSubUrl,
    /// `projects/P/subscriptions/S`.
    subscription: String,
    /// The subscription's topic, published to.
    topic: String,
    /// The dead-letter topic.
    dead_topic: String,
    /// The ack deadline of a subscription the source creates, in seconds.
    ack_deadline: u64,
    /// Deliveries of one message before the source dead-letters it.
    max_attempts: u32,
    /// The HTTP client.
    rest: Rest,
}

impl PubSubSource {
    /// Finds (or creates) the subscription, its topic and the dead-letter topic, retrying
    /// within [`PubSubConfig::reconnect_limit`], and starts the worker thread.
    ///
    /// # Errors
    ///
    /// As [`connect_with`](Self::connect_with).
    pub fn connect(config: PubSubConfig) -> Result<Self, SourceError> {
        Self::connect_with(config, &Shutdown::new())
    }

    /// [`connect`](Self::connect), giving up early (with [`SourceError::Closed`]) once `stop`
    /// is triggered.
    ///
    /// # Errors
    ///
    /// [`SourceError::Backend`] for an invalid URL or settings, missing credentials, or a
    /// request Pub/Sub refused; [`SourceError::Unavailable`] when it could not be reached for
    /// the whole reconnect limit; [`SourceError::Closed`] when `stop` was triggered first.
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread while retrying; do not call it inside a future.
    pub fn connect_with(config: PubSubConfig, stop: &Shutdown) -> Result<Self, SourceError> {
        let url = PubSubUrl::parse(&config.url)
            .map_err(|error| SourceError::Backend(error.to_string()))?;
        if config.max_attempts == 0 || config.ack_deadline.is_zero() {
            return Err(SourceError::Backend(
                "ack deadline and max attempts must be above zero".to_owned(),
            ));
        }
        let emulator = config
            .emulator_host
            .clone()
            .or_else(|| std::env::var("PUBSUB_EMULATOR_HOST").ok())
            .filter(|host| !host.trim().is_empty());
        if let Some(host) = &emulator {
            check_emulator_host(host)?;
        }
        let credentials = match &emulator {
            Some(_) => auth::Credentials::None,
            None => auth::Credentials::from_environment()
                .map_err(|error| SourceError::Backend(format!("pubsub credentials: {error}")))?,
        };
        let rest = Rest::new(
            endpoint(emulator.as_deref()),
            credentials,
            config.request_timeout,
        );
        let broker = PubSub {
            subscription: url.subscription_path(),
            topic: url.topic_path(),
            dead_topic: url.dead_topic_path(),
            ack_deadline: config
                .ack_deadline
                .as_secs()
                .clamp(DEADLINE_MIN, DEADLINE_MAX),
            max_attempts: config.max_attempts,
            url,
            rest,
        };
        let mut shared = Shared::new(
            broker,
            Terms {
                max_attempts: config.max_attempts,
                reconnect_limit: config.reconnect_limit,
                deadline: Duration::from_secs(DEADLINE_MIN),
                ordering: false,
            },
        );
        let what = format!(
            "pubsub at {}, setting up {}",
            shared.broker.rest.base(),
            shared.broker.url
        );
        let info = remote::within(&shared, stop, config.reconnect_limit, &what, || {
            shared.broker.ensure()
        })?;
        // The topic, the ack deadline and the ordering are the subscription's, which may be
        // older than these settings.
        shared.broker.topic = info.topic;
        let deadline = Duration::from_secs(info.ack_deadline_seconds.max(DEADLINE_MIN));
        shared.agreed(deadline, info.enable_message_ordering);
        Ok(PubSubSource {
            leasing: Leasing::start(shared)?,
            config,
        })
    }

    /// The settings.
    pub fn config(&self) -> &PubSubConfig {
        &self.config
    }

    /// The subscription's topic, which `publish` sends to (`projects/P/topics/T`).
    pub fn topic(&self) -> &str {
        &self.leasing.shared.broker.topic
    }
}

impl Broker for PubSub {
    type Handle = String;
    const NAME: &'static str = "pubsub";
    /// 1,000, the most one `pull` request returns: each is an HTTP round trip, and a
    /// consumer asking for the default 256 made four times as many.
    const FETCH_MAX: usize = 1000;
    const PER_REQUEST: usize = ACK_IDS_PER_REQUEST;
    const MAX_EXTENSION: Duration = Duration::from_secs(DEADLINE_MAX);

    fn endpoint(&self) -> &str {
        self.rest.base()
    }

    fn queue(&self) -> &str {
        &self.subscription
    }

    fn fetch(&self, max: usize) -> Result<Vec<Fetched<String>>, HttpError> {
        self.rest.pull(&self.subscription, max)
    }

    fn recreate(&self) -> Result<(), HttpError> {
        warn!(
            "subscription {} is missing (an emulator restarted?); creating it again",
            self.subscription
        );
        self.ensure().map(drop)
    }

    fn ack(&self, handles: &[String]) -> Result<(), HttpError> {
        self.rest.acknowledge(&self.subscription, handles)
    }

    fn modify(&self, handles: &[String], seconds: u32) -> Result<(), HttpError> {
        self.rest.modify(&self.subscription, handles, seconds)
    }

    /// Publishes the message to `{subscription}-dead` with the attributes
    /// `mayhem_dead_reason` (cut to Pub/Sub's limit) and `mayhem_attempt`; stripped, only
    /// its id goes, marked `mayhem_dead_letter_stripped`.
    fn dead_letter(&self, letter: &DeadLetter<String>, stripped: bool) -> Result<(), HttpError> {
        let attempt = letter.attempt.to_string();
        let reason = cut(&letter.reason, crate::message::MAX_VALUE_BYTES);
        let mut extra = vec![
            (REASON_ATTRIBUTE, reason),
            (ATTEMPT_ATTRIBUTE, attempt.as_str()),
        ];
        let bare;
        let message = if stripped {
            bare = PubSubMessage::new(Vec::new()).with_id(letter.message.id().clone());
            extra.push((
                STRIPPED_ATTRIBUTE,
                "data and attributes over Pub/Sub's limits",
            ));
            &bare
        } else {
            &letter.message
        };
        self.rest
            .publish(&self.dead_topic, std::slice::from_ref(message), &extra)
            .map(drop)
    }
}

remote::leasing_source!(PubSubSource, leasing);

impl fmt::Debug for PubSubSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PubSubSource")
            .field("config", &self.config)
            .field("rest", &self.leasing.shared.broker.rest)
            .finish_non_exhaustive()
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
