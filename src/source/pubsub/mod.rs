//! A [`Source`] on Google Cloud Pub/Sub (feature `pubsub`, off by default), over its REST
//! API v1 with a blocking HTTP/1.1 client: each consumer thread makes its own `pull`, as a
//! sync client library gives you.
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
mod health;
mod leases;
mod ops;
mod publish;
mod rest;
mod topology;
mod url;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use log::warn;

use crate::error::SourceError;
use crate::message::PubSubMessage;
use crate::shutdown::{Shutdown, ShutdownReason};
use crate::source::kit::{Backoff, Worker};
use crate::source::{Lease, LeaseId, Source, SourceStats};
use crate::sync::{lock, Outstanding};

use self::health::Health;
use self::leases::{End, Held, Placed, Refused, Table};
use self::ops::{DeadLetter, Op};
use self::rest::{Rest, RestError};

pub use self::auth::AuthError;
pub use self::publish::check_message;
pub use self::rest::RestError as PubSubError;
pub use self::url::{check_emulator_host, endpoint, PubSubUrl, UrlError, SERVICE_ENDPOINT};

/// The shortest ack deadline Pub/Sub accepts, in seconds.
const DEADLINE_MIN: u64 = 10;
/// The longest ack deadline Pub/Sub accepts (and the longest extension), in seconds.
const DEADLINE_MAX: u64 = 600;
/// How long `stats`, `nack_all` and the drop wait for queued operations once interrupted.
const SHUTDOWN_WAIT: Duration = Duration::from_millis(250);
/// Longest pause of a pull that found nothing before it asks again.
const POLL_MAX: Duration = Duration::from_millis(50);
/// Most messages one pull asks for.
const PULL_MAX: usize = 1000;
/// Pauses between tries of a request that failed in a way that may pass: 50 ms, doubling
/// up to 2 s.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));

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

/// A Pub/Sub subscription with the lease semantics of [`Source`], and a publisher to its
/// topic; see the [module docs](self).
pub struct PubSubSource {
    /// The state shared with the worker thread.
    core: Arc<Core>,
    /// The thread sending queued lease operations, and its queue.
    worker: Worker<Op>,
}

/// What the source and its worker share.
struct Core {
    /// The settings.
    config: PubSubConfig,
    /// What the URL names.
    url: PubSubUrl,
    /// `projects/P/subscriptions/S`.
    subscription: String,
    /// The subscription's topic, published to.
    topic: String,
    /// The dead-letter topic.
    dead_topic: String,
    /// The subscription's ack deadline: the local deadline of a pulled message.
    deadline: Duration,
    /// Whether the subscription delivers messages of one ordering key in order.
    ordering: bool,
    /// Held across a pull and the insertion of its messages when `ordering` is on: two
    /// consumers' pulls answered in one order and put in the table in the other would hand
    /// out a key's later message first.
    pull_turn: Mutex<()>,
    /// The HTTP client.
    rest: Rest,
    /// Leases held. A mutex: every operation takes it once per batch.
    leases: Mutex<Table>,
    /// The counters.
    stats: Mutex<SourceStats>,
    /// Acks (and dead letters' acks) the server answered.
    settled: AtomicU64,
    /// Lease operations queued and not yet sent.
    queued: Outstanding,
    /// Triggered by `interrupt`: pulls and publishes return `Closed`, and a pull pausing
    /// between polls wakes at once, rather than at the end of its pause (up to 50 ms after
    /// the last ack of a `--messages N` run).
    interrupted: Shutdown,
    /// Set when the source is dropped: the worker stops retrying.
    closing: AtomicBool,
    /// Failures, logged once per kind.
    health: Health,
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
        let mut core = Core {
            subscription: url.subscription_path(),
            topic: url.topic_path(),
            dead_topic: url.dead_topic_path(),
            deadline: Duration::from_secs(DEADLINE_MIN),
            leases: Mutex::new(Table::new(url.ordering, Duration::from_secs(DEADLINE_MIN))),
            ordering: url.ordering,
            pull_turn: Mutex::new(()),
            url,
            config,
            rest,
            stats: Mutex::new(SourceStats::default()),
            settled: AtomicU64::new(0),
            queued: Outstanding::default(),
            interrupted: Shutdown::new(),
            closing: AtomicBool::new(false),
            health: Health::default(),
        };
        let start = Instant::now();
        let mut backoff = BACKOFF;
        loop {
            if stop.is_triggered() {
                return Err(SourceError::Closed);
            }
            match core.ensure() {
                Ok(info) => {
                    // The topic and the ack deadline are the subscription's, which may be
                    // older than these settings.
                    core.topic = info.topic;
                    core.deadline =
                        Duration::from_secs(info.ack_deadline_seconds.max(DEADLINE_MIN));
                    core.ordering = info.enable_message_ordering;
                    lock(&core.leases).set_ordering(core.ordering);
                    break;
                }
                Err(error) if error.is_transient() => {
                    core.health.failed(core.rest.base(), &error);
                    if start.elapsed() >= core.config.reconnect_limit {
                        return Err(SourceError::Unavailable(format!(
                            "pubsub at {} did not answer for {}: {error}",
                            core.rest.base(),
                            humantime::format_duration(core.config.reconnect_limit)
                        )));
                    }
                    thread::sleep(backoff.next_pause());
                }
                Err(error) => {
                    return Err(SourceError::Backend(format!(
                        "pubsub at {} refused to set up {}: {error}",
                        core.rest.base(),
                        core.url
                    )))
                }
            }
        }
        core.health.recovered(core.rest.base());
        let core = Arc::new(core);
        let worker_core = Arc::clone(&core);
        let worker = Worker::spawn("mayhem-pubsub-acks", move |queue| {
            worker_core.run_ops(queue)
        })?;
        Ok(PubSubSource { core, worker })
    }

    /// The settings.
    pub fn config(&self) -> &PubSubConfig {
        &self.core.config
    }

    /// The subscription's topic, which `publish` sends to (`projects/P/topics/T`).
    pub fn topic(&self) -> &str {
        &self.core.topic
    }

    /// Queues lease operations for the worker thread.
    ///
    /// Once the worker is gone (only while dropping), the deliveries expire and are
    /// delivered again, so nothing is lost.
    fn enqueue(&self, ops: Vec<Op>) {
        self.worker.send(&self.core.queued, ops);
    }

    /// Ends leases: each held one becomes the operation `op` makes of it (the leases held
    /// back behind a returned one are given back), the rest are refused.
    fn end_all(
        &self,
        ids: &[LeaseId],
        refused: &mut Vec<LeaseId>,
        op: impl Fn(&Held) -> (End, Op),
        end_of: impl Fn(u32) -> End,
    ) {
        let now = Instant::now();
        let mut ops = Vec::with_capacity(ids.len());
        let mut expired = 0;
        let mut table = lock(&self.core.leases);
        for &id in ids {
            let end = table.attempt_of(id).map_or(End::Returned, &end_of);
            match table.take(id, now, end) {
                Ok((held, behind)) => {
                    let (end, first) = op(&held);
                    if end == End::Settled {
                        table.forget(&held);
                    }
                    ops.push(first);
                    ops.extend(behind.into_iter().map(|held| Op::Modify(held.handle, 0)));
                }
                Err(Refused::Expired(behind)) => {
                    ops.extend(behind.into_iter().map(|held| Op::Modify(held.handle, 0)));
                    expired += 1;
                    refused.push(id);
                }
                Err(Refused::Unknown) => refused.push(id),
            }
        }
        drop(table);
        if expired > 0 {
            lock(&self.core.stats).expired += expired;
        }
        self.enqueue(ops);
    }

    /// Removes expired leases (counted), giving back the ones held behind them.
    fn expire(&self) {
        let (expired, behind) = lock(&self.core.leases).expire(Instant::now());
        if expired > 0 {
            lock(&self.core.stats).expired += expired;
        }
        self.enqueue(
            behind
                .into_iter()
                .map(|held| Op::Modify(held.handle, 0))
                .collect(),
        );
    }

    /// One pull from the server into the table; the leases that may be handed out go to
    /// `out`, deliveries over the attempts and unreadable ones to the dead-letter topic.
    fn pull_once(&self, max: usize, out: &mut Vec<Lease>) -> Result<(), RestError> {
        let core = &self.core;
        let _turn = core.ordering.then(|| lock(&core.pull_turn));
        let sent = Instant::now();
        let deliveries = core.rest.pull(&core.subscription, max.min(PULL_MAX))?;
        let mut ops = Vec::new();
        let mut table = lock(&core.leases);
        for delivery in deliveries {
            let attempt = table.attempt(delivery.attempt, &delivery.server_id);
            let (message, reason, undecodable) = match delivery.message {
                Ok(message) if attempt > core.config.max_attempts => {
                    let reason = format!(
                        "delivered {attempt} times, over the maximum of {}",
                        core.config.max_attempts
                    );
                    (message, Some(reason), false)
                }
                Ok(message) => (message, None, false),
                Err(reason) => (
                    PubSubMessage::new("").with_id(delivery.server_id.as_str()),
                    Some(reason),
                    true,
                ),
            };
            if let Some(reason) = reason {
                table.not_coming(&message, &delivery.server_id);
                ops.push(Op::Dead(Box::new(DeadLetter {
                    ack_id: delivery.ack_id,
                    message,
                    reason: reason.into(),
                    attempt,
                    undecodable,
                })));
                continue;
            }
            match table.insert(
                delivery.ack_id,
                delivery.server_id,
                message,
                attempt,
                sent + core.deadline,
            ) {
                Placed::Handed(lease) => out.push(lease),
                Placed::Held => {}
                Placed::GiveBack(ack_id) => ops.push(Op::Modify(ack_id, 0)),
            }
        }
        drop(table);
        self.enqueue(ops);
        Ok(())
    }
}

impl Source for PubSubSource {
    /// 1,000, the most one `pull` request returns: each is an HTTP round trip, and a
    /// consumer asking for the default 256 made four times as many.
    fn pull_batch(&self) -> usize {
        PULL_MAX
    }

    /// Hands out held-back messages whose turn came, then pulls (`returnImmediately`), and
    /// polls again with growing pauses (up to 50 ms) until something came or `wait` passed.
    fn pull(&self, max: usize, wait: Duration, out: &mut Vec<Lease>) -> Result<(), SourceError> {
        let core = &self.core;
        let end = Instant::now() + wait;
        let before = out.len();
        let mut pause = Duration::from_millis(5);
        loop {
            if core.interrupted.is_triggered() {
                return if out.len() > before {
                    Ok(())
                } else {
                    Err(SourceError::Closed)
                };
            }
            self.expire();
            let want = {
                let mut table = lock(&core.leases);
                table.released(before + max, out);
                // Messages held back count against the window, or a busy key would make the
                // source pull without bound.
                (before + max).saturating_sub(out.len() + table.on_hold())
            };
            if want > 0 {
                match self.pull_once(want, out) {
                    Ok(()) => core.health.recovered(core.rest.base()),
                    Err(error) if error.is_not_found() => {
                        warn!(
                            "subscription {} is missing (an emulator restarted?); creating it again",
                            core.subscription
                        );
                        if let Err(error) = core.ensure().map(drop) {
                            core.health.failed(core.rest.base(), &error);
                        }
                    }
                    Err(error) if error.is_transient() => {
                        if core.health.failed(core.rest.base(), &error)
                            >= core.config.reconnect_limit
                        {
                            return Err(SourceError::Unavailable(format!(
                                "pubsub at {} failed for {}: {error}",
                                core.rest.base(),
                                humantime::format_duration(core.config.reconnect_limit)
                            )));
                        }
                    }
                    Err(error) => {
                        return Err(SourceError::Backend(format!(
                            "pubsub pull from {}: {error}",
                            core.subscription
                        )))
                    }
                }
            }
            let now = Instant::now();
            if out.len() > before || now >= end {
                return Ok(());
            }
            // Returns early on the interrupt; the loop's first check then ends the pull.
            core.interrupted.wait_timeout(pause.min(end - now));
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    fn ack(&self, leases: &[LeaseId], refused: &mut Vec<LeaseId>) -> Result<(), SourceError> {
        self.end_all(
            leases,
            refused,
            |held| (End::Settled, Op::Ack(held.handle.clone())),
            |_| End::Settled,
        );
        Ok(())
    }

    /// Gives leases back (`modifyAckDeadline` 0); on the last attempt, dead-letters them.
    fn nack(&self, leases: &[LeaseId], refused: &mut Vec<LeaseId>) -> Result<(), SourceError> {
        let max = self.core.config.max_attempts;
        self.end_all(
            leases,
            refused,
            |held| {
                if held.attempt >= max {
                    let reason = format!("nacked on attempt {} of {max}", held.attempt);
                    (End::Settled, dead(held, reason))
                } else {
                    (End::Returned, Op::Modify(held.handle.clone(), 0))
                }
            },
            |attempt| {
                if attempt >= max {
                    End::Settled
                } else {
                    End::Returned
                }
            },
        );
        Ok(())
    }

    fn reject(
        &self,
        lease: LeaseId,
        reason: &str,
        refused: &mut Vec<LeaseId>,
    ) -> Result<(), SourceError> {
        self.end_all(
            &[lease],
            refused,
            |held| (End::Settled, dead(held, reason.to_owned())),
            |_| End::Settled,
        );
        Ok(())
    }

    /// Extends leases by `by` (at most 600 s, Pub/Sub's limit; whole seconds, rounded up).
    fn extend(
        &self,
        leases: &[LeaseId],
        by: Duration,
        refused: &mut Vec<LeaseId>,
    ) -> Result<(), SourceError> {
        let by = by.min(Duration::from_secs(DEADLINE_MAX));
        let seconds = by.as_secs() + u64::from(by.subsec_nanos() > 0);
        let seconds = seconds.max(1) as u32;
        let now = Instant::now();
        let mut ops = Vec::with_capacity(leases.len());
        {
            let mut table = lock(&self.core.leases);
            for &id in leases {
                match table.extend(id, now, now + by) {
                    Some(ack_id) => ops.push(Op::Modify(ack_id.to_owned(), seconds)),
                    None => refused.push(id),
                }
            }
        }
        self.enqueue(ops);
        Ok(())
    }

    fn interrupt(&self) {
        self.core.interrupted.trigger(ShutdownReason::Requested);
    }

    /// Waits for the queued lease operations; once interrupted, at most a quarter of a
    /// second.
    fn flush(&self, timeout: Duration) -> usize {
        let timeout = if self.core.interrupted.is_triggered() {
            timeout.min(SHUTDOWN_WAIT)
        } else {
            timeout
        };
        // Reported by the caller: the drop's report leaves them out.
        self.core.queued.told(self.core.flush(timeout))
    }

    fn nack_all(&self) -> usize {
        let held = lock(&self.core.leases).drain();
        let count = held.len();
        self.enqueue(
            held.into_iter()
                .map(|held| Op::Modify(held.handle, 0))
                .collect(),
        );
        self.core.flush(SHUTDOWN_WAIT);
        count
    }

    fn settled(&self) -> u64 {
        self.core.settled.load(Ordering::SeqCst)
    }

    /// The counters; `remaining` is what this source holds (handed out or held back):
    /// Pub/Sub's API has no count of a subscription's backlog (Cloud Monitoring has).
    ///
    /// # Blocking
    ///
    /// Waits (at most a quarter of a second) for queued lease operations.
    fn stats(&self) -> SourceStats {
        self.core.flush(SHUTDOWN_WAIT);
        self.expire();
        let mut stats = *lock(&self.core.stats);
        stats.remaining = lock(&self.core.leases).len() as u64;
        stats
    }
}

impl Drop for PubSubSource {
    fn drop(&mut self) {
        let core = &self.core;
        let unsent = core.queued.untold(core.flush(SHUTDOWN_WAIT));
        core.closing.store(true, Ordering::SeqCst);
        // Closing the queue ends the worker once it has sent what is queued.
        self.worker.close();
        if unsent > 0 {
            warn!(
                "{unsent} lease operations were left unsent to pubsub; their messages are \
                 delivered again after the ack deadline"
            );
        }
        // A request in flight ends by itself at its timeout; the exit does not wait.
        self.worker
            .join_by(Instant::now() + SHUTDOWN_WAIT, "pubsub ack");
    }
}

impl fmt::Debug for PubSubSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PubSubSource")
            .field("config", &self.core.config)
            .field("rest", &self.core.rest)
            .finish_non_exhaustive()
    }
}

/// The dead letter of a held lease.
fn dead(held: &Held, reason: String) -> Op {
    Op::Dead(Box::new(DeadLetter {
        ack_id: held.handle.clone(),
        message: held.message.clone(),
        reason: reason.into(),
        attempt: held.attempt,
        undecodable: false,
    }))
}

impl Core {
    /// Waits until the queue of lease operations is empty, up to `timeout` or until requests
    /// are found failing; returns how many are left.
    fn flush(&self, timeout: Duration) -> usize {
        self.queued
            .wait_drained(timeout, || self.health.is_failing())
    }

    /// Sleeps `duration`, in steps, unless the source is being dropped.
    fn nap(&self, duration: Duration) {
        let end = Instant::now() + duration;
        while !self.closing.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= end {
                return;
            }
            thread::sleep((end - now).min(POLL_MAX));
        }
    }
}
