//! A [`Source`] on a broker with an HTTP API that settles each delivery by its handle: the
//! whole of the lease semantics, written once. The broker says how to fetch, acknowledge,
//! move a deadline and dead-letter ([`Broker`]); [`Leasing`] does the rest:
//!
//! - the held deliveries ([`Holds`]): local deadlines that end before the server's, stale
//!   leases refused, ordering keys handed out one message at a time, attempts counted where
//!   the broker does not count them;
//! - `pull`: held-back messages whose turn came, then fetches with growing pauses within
//!   the caller's wait; deliveries over their attempts, and unreadable ones, dead-lettered as
//!   they come;
//! - `ack`, `nack`, `reject` and `extend` queue operations for a worker thread and return
//!   at once; the worker sends each kind in batched requests, dead letters first (published,
//!   then acknowledged), and extends the messages held back behind their key itself;
//! - failures: retried with backoff, each kind logged once and once on recovery, given up
//!   past the reconnect limit ([`SourceError::Unavailable`]);
//! - `flush`, `stats`, `nack_all` and the drop, bounded once interrupted.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::{Backoff, Holds, HttpError, Outage, Worker};
use crate::error::SourceError;
use crate::message::PubSubMessage;
use crate::shutdown::Shutdown;
use crate::source::SourceStats;
use crate::sync::{lock, Outstanding};

mod leasing;
#[cfg(test)]
mod tests;

pub(crate) use self::leasing::{in_lanes, leasing_source};

/// How long `stats`, `nack_all` and the drop wait for queued operations once interrupted.
const SHUTDOWN_WAIT: Duration = Duration::from_millis(250);
/// Longest pause of a pull that found nothing before it asks again.
const POLL_MAX: Duration = Duration::from_millis(50);
/// Most requests one pass of lease operations adds by splitting requests refused for good
/// (see [`Shared::each_taken`]): a handful of stale handles among thousands are found in
/// about 2 x log2(thousands) requests each, and a batch that is refused whole costs a
/// bounded number of requests, not two per handle.
const SPLIT_BUDGET: usize = 64;
/// Pauses between tries of a request that failed in a way that may pass: 50 ms, doubling
/// up to 2 s.
pub(crate) const BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));

/// One delivery as the broker gave it.
#[derive(Debug)]
pub(crate) struct Fetched<H> {
    /// The handle to settle it with.
    pub(crate) handle: H,
    /// The broker's id of the message, the same on every delivery.
    pub(crate) origin: String,
    /// The broker's count of deliveries, where it counts them.
    pub(crate) attempt: Option<u32>,
    /// The message, or why it could not be read.
    pub(crate) message: Result<PubSubMessage, String>,
}

/// A message to dead-letter.
#[derive(Debug)]
pub(crate) struct DeadLetter<H> {
    /// The delivery to acknowledge once the dead letter is published.
    pub(crate) handle: H,
    /// The message.
    pub(crate) message: PubSubMessage,
    /// Why.
    pub(crate) reason: Arc<str>,
    /// Its delivery attempt.
    pub(crate) attempt: u32,
    /// Whether its data could not be read at all.
    pub(crate) undecodable: bool,
}

/// A queued lease operation.
#[derive(Debug)]
pub(crate) enum Op<H> {
    /// Acknowledge the delivery.
    Ack(H),
    /// Set the delivery's deadline to this many seconds from now (0: give it back).
    Modify(H, u32),
    /// Publish the message to the dead-letter destination, then acknowledge the delivery.
    Dead(Box<DeadLetter<H>>),
}

/// What a broker does; [`Leasing`] does the rest.
pub(crate) trait Broker: Send + Sync + 'static {
    /// The handle of a delivery (Pub/Sub: its ack id).
    type Handle: Clone + fmt::Debug + Send + Sync + 'static;
    /// The broker's name in log lines.
    const NAME: &'static str;
    /// Most deliveries one fetch asks for.
    const FETCH_MAX: usize;
    /// Most handles one acknowledge or deadline request carries.
    const PER_REQUEST: usize;
    /// The longest deadline one extension may set.
    const MAX_EXTENSION: Duration;

    /// Where the broker is, for log lines (no secret).
    fn endpoint(&self) -> &str;
    /// What is consumed (Pub/Sub: the subscription's path), for error texts.
    fn queue(&self) -> &str;
    /// Fetches up to `max` deliveries without waiting for more to arrive.
    fn fetch(&self, max: usize) -> Result<Vec<Fetched<Self::Handle>>, HttpError>;
    /// Sets up again what a fetch found missing (an emulator restarted and lost it).
    fn recreate(&self) -> Result<(), HttpError>;
    /// Acknowledges deliveries (at most [`Broker::PER_REQUEST`]).
    fn ack(&self, handles: &[Self::Handle]) -> Result<(), HttpError>;
    /// Sets the deadline of deliveries (at most [`Broker::PER_REQUEST`]) to `seconds` from
    /// now; 0 gives them back.
    fn modify(&self, handles: &[Self::Handle], seconds: u32) -> Result<(), HttpError>;
    /// Publishes a dead letter (without the message's data and attributes when `stripped`:
    /// with them it was refused for good).
    fn dead_letter(
        &self,
        letter: &DeadLetter<Self::Handle>,
        stripped: bool,
    ) -> Result<(), HttpError>;
}

/// The settings [`Leasing`] reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Terms {
    /// Deliveries of one message before it is dead-lettered.
    pub(crate) max_attempts: u32,
    /// How long the broker may fail before `pull` and `publish` give up.
    pub(crate) reconnect_limit: Duration,
    /// The ack deadline: the local deadline of a fetched delivery.
    pub(crate) deadline: Duration,
    /// Whether the broker delivers the messages of an ordering key in order.
    pub(crate) ordering: bool,
}

/// What the source and its worker thread share.
pub(crate) struct Shared<B: Broker> {
    /// The broker.
    pub(crate) broker: B,
    /// The settings.
    terms: Terms,
    /// Held across a fetch and the insertion of its messages when ordering is on: two
    /// consumers' fetches answered in one order and put in the table in the other would
    /// hand out a key's later message first.
    fetch_turn: Mutex<()>,
    /// Leases held. A mutex: every operation takes it once per batch.
    holds: Mutex<Holds<B::Handle>>,
    /// The counters.
    pub(crate) stats: Mutex<SourceStats>,
    /// Acks (and dead letters' acks) the broker answered.
    settled: AtomicU64,
    /// Lease operations queued and not yet sent.
    queued: Outstanding,
    /// Triggered by `interrupt`: pulls and publishes return `Closed`, and a pull pausing
    /// between polls wakes at once.
    interrupted: Shutdown,
    /// Set when the source is dropped: the worker stops retrying.
    closing: AtomicBool,
    /// The current run of failures, each kind logged once.
    outage: Mutex<Outage>,
}

/// The lease semantics of [`Source`](crate::source::Source) on a [`Broker`], with its
/// worker thread.
pub(crate) struct Leasing<B: Broker> {
    /// The state shared with the worker thread.
    pub(crate) shared: Arc<Shared<B>>,
    /// The thread sending queued lease operations, and its queue.
    worker: Worker<Op<B::Handle>>,
}

/// Runs `call` until it succeeds, with backoff while it fails in a way that may pass, for up
/// to `limit`, or until `stop`; `shared` records the failures and the recovery. Errors are
/// `what` with the last failure.
pub(crate) fn within<B: Broker, T>(
    shared: &Shared<B>,
    stop: &Shutdown,
    limit: Duration,
    what: &str,
    mut call: impl FnMut() -> Result<T, HttpError>,
) -> Result<T, SourceError> {
    let start = Instant::now();
    let mut backoff = BACKOFF;
    loop {
        if stop.is_triggered() {
            return Err(SourceError::Closed);
        }
        match call() {
            Ok(value) => {
                shared.recovered();
                return Ok(value);
            }
            Err(error) if error.is_transient() => {
                shared.failed(&error);
                if start.elapsed() >= limit {
                    return Err(SourceError::Unavailable(format!(
                        "{what}: failed for {}: {error}",
                        humantime::format_duration(limit)
                    )));
                }
                thread::sleep(backoff.next_pause());
            }
            Err(error) => return Err(SourceError::Backend(format!("{what}: {error}"))),
        }
    }
}

impl<B: Broker> Shared<B> {
    /// The shared state of `broker` under `terms`, not started yet.
    pub(crate) fn new(broker: B, terms: Terms) -> Self {
        let wait_redelivery = terms.deadline;
        Shared {
            broker,
            terms,
            fetch_turn: Mutex::new(()),
            holds: Mutex::new(Holds::new(terms.ordering, wait_redelivery)),
            stats: Mutex::new(SourceStats::default()),
            settled: AtomicU64::new(0),
            queued: Outstanding::default(),
            interrupted: Shutdown::new(),
            closing: AtomicBool::new(false),
            outage: Mutex::new(Outage::new(BACKOFF)),
        }
    }

    /// The settings, as found at start.
    pub(crate) fn terms(&self) -> Terms {
        self.terms
    }

    /// Sets what the broker said at start: its ack deadline and whether it keeps order.
    pub(crate) fn agreed(&mut self, deadline: Duration, ordering: bool) {
        self.terms.deadline = deadline;
        self.terms.ordering = ordering;
        lock(&self.holds).set_ordering(ordering);
    }

    /// The interrupt, which publishing also heeds.
    pub(crate) fn interrupted(&self) -> &Shutdown {
        &self.interrupted
    }

    /// Records a failure: logs it when its kind changed; returns how long requests have
    /// been failing.
    pub(crate) fn failed(&self, error: &HttpError) -> Duration {
        let now = Instant::now();
        let mut outage = lock(&self.outage);
        if outage.failed(now, &error.kind(), error.to_string()).0 {
            warn!(
                "{} at {} unavailable: {error}; retrying",
                B::NAME,
                self.broker.endpoint()
            );
        }
        outage.over(now, Duration::ZERO).unwrap_or_default()
    }

    /// Records a success: logs the recovery after failures.
    pub(crate) fn recovered(&self) {
        if lock(&self.outage).recovered(Instant::now()).is_some() {
            info!("reconnected to {} at {}", B::NAME, self.broker.endpoint());
        }
    }

    /// Waits until the queue of lease operations is empty, up to `timeout` or until requests
    /// are found failing; returns how many are left.
    fn flush(&self, timeout: Duration) -> usize {
        self.queued
            .wait_drained(timeout, || lock(&self.outage).since().is_some())
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

    /// The worker thread: sends queued operations in batches until the queue closes; in
    /// between, every third of the ack deadline, extends the deliveries held back.
    fn run_ops(&self, queue: &mpsc::Receiver<Vec<Op<B::Handle>>>) {
        let deadline = self.terms.deadline;
        let tick = deadline / 3;
        let mut next_tick = Instant::now() + tick;
        let mut pass = Vec::new();
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match queue.recv_timeout(wait) {
                Ok(ops) => pass.extend(ops),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            while pass.len() < 4 * B::PER_REQUEST {
                match queue.try_recv() {
                    Ok(ops) => pass.extend(ops),
                    Err(_) => break,
                }
            }
            // Only the queued operations count as answered; the extensions added below are
            // the worker's own.
            let queued = pass.len() as u64;
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + tick;
                let due = lock(&self.holds).due_on_hold(now + tick * 2, now + deadline);
                let seconds = deadline.as_secs().max(1) as u32;
                pass.extend(due.into_iter().map(|handle| Op::Modify(handle, seconds)));
            }
            self.send(std::mem::take(&mut pass));
            self.queued.done(queued);
        }
    }

    /// Sends one pass: the dead letters first (published, then acked with the acks), then the
    /// acks, then the deadline changes grouped by their seconds; each request in chunks of
    /// [`Broker::PER_REQUEST`] handles.
    fn send(&self, pass: Vec<Op<B::Handle>>) {
        let mut acks = Vec::new();
        let mut modify: BTreeMap<u32, Vec<B::Handle>> = BTreeMap::new();
        let mut dead = Vec::new();
        for op in pass {
            match op {
                Op::Ack(handle) => acks.push(handle),
                Op::Modify(handle, seconds) => modify.entry(seconds).or_default().push(handle),
                Op::Dead(letter) => dead.push(letter),
            }
        }
        for letter in dead {
            let broker = &self.broker;
            let mut published = self.retry("publish a dead letter", || {
                broker.dead_letter(&letter, false)
            });
            if published.is_none() && !self.closing.load(Ordering::SeqCst) {
                // Refused for good: the message with the dead letter's attributes is over
                // the broker's limits. Its id and the reason alone still go, so that the
                // delivery is settled instead of delivered again without end.
                published = self.retry("publish a dead letter without its data", || {
                    broker.dead_letter(&letter, true)
                });
            }
            if published.is_some() {
                let mut stats = lock(&self.stats);
                stats.dead_lettered += 1;
                stats.undecodable += u64::from(letter.undecodable);
                drop(stats);
                acks.push(letter.handle);
            }
        }
        let acked = self.each_taken("acknowledge", &acks, |chunk| self.broker.ack(chunk));
        self.settled.fetch_add(acked as u64, Ordering::SeqCst);
        for (seconds, handles) in &modify {
            self.each_taken("modify ack deadlines", handles, |chunk| {
                self.broker.modify(chunk, *seconds)
            });
        }
    }

    /// Sends `handles` by `call` in requests of the broker's size; returns how many it took.
    /// A request refused for good is split in halves, down to single handles, within
    /// [`SPLIT_BUDGET`] more requests: a handle the broker refuses (the emulator refuses a
    /// whole request for one unknown ack id; Google documents that exactly-once delivery
    /// refuses acks of expired ones) does not void the others. What is still refused is
    /// logged in one line.
    fn each_taken(
        &self,
        what: &str,
        handles: &[B::Handle],
        call: impl Fn(&[B::Handle]) -> Result<(), HttpError>,
    ) -> usize {
        let mut taken = 0;
        let mut refused = 0;
        let mut first_refusal = None;
        let mut budget = SPLIT_BUDGET;
        let mut pending: Vec<&[B::Handle]> = handles.chunks(B::PER_REQUEST).rev().collect();
        while let Some(chunk) = pending.pop() {
            match self.retry_quietly(|| call(chunk)) {
                Ok(()) => taken += chunk.len(),
                Err(error) => {
                    if chunk.len() > 1 && budget >= 2 && !self.closing.load(Ordering::SeqCst) {
                        budget -= 2;
                        let (first, second) = chunk.split_at(chunk.len() / 2);
                        pending.push(second);
                        pending.push(first);
                    } else {
                        refused += chunk.len();
                        first_refusal.get_or_insert(error);
                    }
                }
            }
        }
        if let Some(error) = first_refusal {
            if self.closing.load(Ordering::SeqCst) {
                debug!(
                    "gave up trying to {what} {refused} of {}: {error}",
                    handles.len()
                );
            } else {
                warn!(
                    "{} refused to {what} {refused} of {}: {error}",
                    B::NAME,
                    handles.len()
                );
            }
        }
        taken
    }

    /// Runs `call` until it succeeds, with backoff while it fails in a way that may pass, and
    /// until the source is dropped; `None` when it was given up (then the deliveries expire
    /// and are delivered again).
    fn retry<T>(&self, what: &str, call: impl Fn() -> Result<T, HttpError>) -> Option<T> {
        match self.retry_quietly(call) {
            Ok(value) => Some(value),
            Err(error) => {
                if self.closing.load(Ordering::SeqCst) {
                    debug!("gave up trying to {what}: {error}");
                } else {
                    warn!("{} refused to {what}: {error}", B::NAME);
                }
                None
            }
        }
    }

    /// [`Shared::retry`] without a log line: the error that ended it.
    fn retry_quietly<T>(&self, call: impl Fn() -> Result<T, HttpError>) -> Result<T, HttpError> {
        let mut backoff = BACKOFF;
        loop {
            match call() {
                Ok(value) => {
                    self.recovered();
                    return Ok(value);
                }
                Err(error) if error.is_transient() && !self.closing.load(Ordering::SeqCst) => {
                    self.failed(&error);
                    self.nap(backoff.next_pause());
                }
                Err(error) => return Err(error),
            }
        }
    }
}
