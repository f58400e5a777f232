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

use super::{Backoff, End, Held, Holds, HttpError, Outage, Placed, Refused, Worker};
use crate::error::SourceError;
use crate::message::PubSubMessage;
use crate::shutdown::{Shutdown, ShutdownReason};
use crate::source::{Lease, LeaseId, SourceStats};
use crate::sync::{lock, Outstanding};

/// How long `stats`, `nack_all` and the drop wait for queued operations once interrupted.
const SHUTDOWN_WAIT: Duration = Duration::from_millis(250);
/// Longest pause of a pull that found nothing before it asks again.
const POLL_MAX: Duration = Duration::from_millis(50);
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
/// to `limit`, or until `stop`; `health` records the failures and the recovery. Errors are
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
                        "{what}: {} failed for {}: {error}",
                        B::NAME,
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
        for chunk in acks.chunks(B::PER_REQUEST) {
            if self
                .retry("acknowledge", || self.broker.ack(chunk))
                .is_some()
            {
                self.settled.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        }
        for (seconds, handles) in &modify {
            for chunk in handles.chunks(B::PER_REQUEST) {
                self.retry("modify ack deadlines", || {
                    self.broker.modify(chunk, *seconds)
                });
            }
        }
    }

    /// Runs `call` until it succeeds, with backoff while it fails in a way that may pass, and
    /// until the source is dropped; `None` when it was given up (then the deliveries expire
    /// and are delivered again).
    fn retry<T>(&self, what: &str, call: impl Fn() -> Result<T, HttpError>) -> Option<T> {
        let mut backoff = BACKOFF;
        loop {
            match call() {
                Ok(value) => {
                    self.recovered();
                    return Some(value);
                }
                Err(error) if error.is_transient() && !self.closing.load(Ordering::SeqCst) => {
                    self.failed(&error);
                    self.nap(backoff.next_pause());
                }
                Err(error) => {
                    if self.closing.load(Ordering::SeqCst) {
                        debug!("gave up trying to {what}: {error}");
                    } else {
                        warn!("{} refused to {what}: {error}", B::NAME);
                    }
                    return None;
                }
            }
        }
    }
}

impl<B: Broker> Leasing<B> {
    /// Starts the worker thread of `shared`, named `mayhem-{name}-acks`.
    ///
    /// # Errors
    ///
    /// [`SourceError::Backend`] when the thread cannot be started.
    pub(crate) fn start(shared: Shared<B>) -> Result<Self, SourceError> {
        let shared = Arc::new(shared);
        let worker_shared = Arc::clone(&shared);
        let worker = Worker::spawn(&format!("mayhem-{}-acks", B::NAME), move |queue| {
            worker_shared.run_ops(&queue);
        })?;
        Ok(Leasing { shared, worker })
    }

    /// Queues lease operations for the worker thread.
    ///
    /// Once the worker is gone (only while dropping), the deliveries expire and are
    /// delivered again, so nothing is lost.
    fn enqueue(&self, ops: Vec<Op<B::Handle>>) {
        self.worker.send(&self.shared.queued, ops);
    }

    /// Ends leases: each held one becomes the operation `op` makes of it (the leases held
    /// back behind a returned one are given back), the rest are refused.
    fn end_all(
        &self,
        ids: &[LeaseId],
        refused: &mut Vec<LeaseId>,
        op: impl Fn(&Held<B::Handle>) -> (End, Op<B::Handle>),
        end_of: impl Fn(u32) -> End,
    ) {
        let now = Instant::now();
        let mut ops = Vec::with_capacity(ids.len());
        let mut expired = 0;
        let mut table = lock(&self.shared.holds);
        for &id in ids {
            let end = table.attempt_of(id).map_or(End::Returned, &end_of);
            match table.take(id, now, end) {
                Ok((held, behind)) => {
                    let (end, first) = op(&held);
                    if end == End::Settled {
                        table.forget(&held);
                    }
                    ops.push(first);
                    ops.extend(give_back(behind));
                }
                Err(Refused::Expired(behind)) => {
                    ops.extend(give_back(behind));
                    expired += 1;
                    refused.push(id);
                }
                Err(Refused::Unknown) => refused.push(id),
            }
        }
        drop(table);
        if expired > 0 {
            lock(&self.shared.stats).expired += expired;
        }
        self.enqueue(ops);
    }

    /// Removes expired leases (counted), giving back the ones held behind them.
    fn expire(&self) {
        let (expired, behind) = lock(&self.shared.holds).expire(Instant::now());
        if expired > 0 {
            lock(&self.shared.stats).expired += expired;
        }
        self.enqueue(give_back(behind).collect());
    }

    /// One fetch into the table; the leases that may be handed out go to `out`, deliveries
    /// over their attempts and unreadable ones to the dead letters.
    fn fetch_once(&self, max: usize, out: &mut Vec<Lease>) -> Result<(), HttpError> {
        let shared = &*self.shared;
        let terms = shared.terms;
        let _turn = terms.ordering.then(|| lock(&shared.fetch_turn));
        let sent = Instant::now();
        let deliveries = shared.broker.fetch(max.min(B::FETCH_MAX))?;
        let mut ops = Vec::new();
        let mut table = lock(&shared.holds);
        for delivery in deliveries {
            let attempt = table.attempt(delivery.attempt, &delivery.origin);
            let (message, reason, undecodable) = match delivery.message {
                Ok(message) if attempt > terms.max_attempts => {
                    let reason = format!(
                        "delivered {attempt} times, over the maximum of {}",
                        terms.max_attempts
                    );
                    (message, Some(reason), false)
                }
                Ok(message) => (message, None, false),
                Err(reason) => (
                    PubSubMessage::new("").with_id(delivery.origin.as_str()),
                    Some(reason),
                    true,
                ),
            };
            if let Some(reason) = reason {
                table.not_coming(&message, &delivery.origin);
                ops.push(Op::Dead(Box::new(DeadLetter {
                    handle: delivery.handle,
                    message,
                    reason: reason.into(),
                    attempt,
                    undecodable,
                })));
                continue;
            }
            // Local deadlines start when the fetch was sent, so they end before the server's.
            let deadline = sent + terms.deadline;
            match table.insert(delivery.handle, delivery.origin, message, attempt, deadline) {
                Placed::Handed(lease) => out.push(lease),
                Placed::Held => {}
                Placed::GiveBack(handle) => ops.push(Op::Modify(handle, 0)),
            }
        }
        drop(table);
        self.enqueue(ops);
        Ok(())
    }

    /// `Source::pull`: hands out held-back messages whose turn came, then fetches, and polls
    /// again with growing pauses (up to 50 ms) until something came or `wait` passed.
    pub(crate) fn pull(
        &self,
        max: usize,
        wait: Duration,
        out: &mut Vec<Lease>,
    ) -> Result<(), SourceError> {
        let shared = &*self.shared;
        let end = Instant::now() + wait;
        let before = out.len();
        let mut pause = Duration::from_millis(5);
        loop {
            if shared.interrupted.is_triggered() {
                return if out.len() > before {
                    Ok(())
                } else {
                    Err(SourceError::Closed)
                };
            }
            self.expire();
            let want = {
                let mut table = lock(&shared.holds);
                table.released(before + max, out);
                // Messages held back count against the window, or a busy key would make the
                // source fetch without bound.
                (before + max).saturating_sub(out.len() + table.on_hold())
            };
            if want > 0 {
                match self.fetch_once(want, out) {
                    Ok(()) => shared.recovered(),
                    Err(error) if error.is_not_found() => {
                        if let Err(error) = shared.broker.recreate() {
                            shared.failed(&error);
                        }
                    }
                    Err(error) if error.is_transient() => {
                        if shared.failed(&error) >= shared.terms.reconnect_limit {
                            return Err(SourceError::Unavailable(format!(
                                "{} at {} failed for {}: {error}",
                                B::NAME,
                                shared.broker.endpoint(),
                                humantime::format_duration(shared.terms.reconnect_limit)
                            )));
                        }
                    }
                    Err(error) => {
                        return Err(SourceError::Backend(format!(
                            "{} pull from {}: {error}",
                            B::NAME,
                            shared.broker.queue()
                        )))
                    }
                }
            }
            let now = Instant::now();
            if out.len() > before || now >= end {
                return Ok(());
            }
            // Returns early on the interrupt; the loop's first check then ends the pull.
            shared.interrupted.wait_timeout(pause.min(end - now));
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// `Source::pull_batch`: the most one fetch asks for (each is a round trip).
    pub(crate) fn pull_batch(&self) -> usize {
        B::FETCH_MAX
    }

    /// `Source::ack`.
    pub(crate) fn ack(
        &self,
        leases: &[LeaseId],
        refused: &mut Vec<LeaseId>,
    ) -> Result<(), SourceError> {
        self.end_all(
            leases,
            refused,
            |held| (End::Settled, Op::Ack(held.handle.clone())),
            |_| End::Settled,
        );
        Ok(())
    }

    /// `Source::nack`: gives leases back; on the last attempt, dead-letters them.
    pub(crate) fn nack(
        &self,
        leases: &[LeaseId],
        refused: &mut Vec<LeaseId>,
    ) -> Result<(), SourceError> {
        let max = self.shared.terms.max_attempts;
        let end_of = |attempt| {
            if attempt >= max {
                End::Settled
            } else {
                End::Returned
            }
        };
        self.end_all(
            leases,
            refused,
            |held| match end_of(held.attempt) {
                End::Settled => {
                    let reason = format!("nacked on attempt {} of {max}", held.attempt);
                    (End::Settled, dead(held, reason))
                }
                End::Returned => (End::Returned, Op::Modify(held.handle.clone(), 0)),
            },
            end_of,
        );
        Ok(())
    }

    /// `Source::reject`: dead-letters the lease with `reason`.
    pub(crate) fn reject(
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

    /// `Source::extend`: by `by`, at most [`Broker::MAX_EXTENSION`], in whole seconds
    /// rounded up.
    pub(crate) fn extend(
        &self,
        leases: &[LeaseId],
        by: Duration,
        refused: &mut Vec<LeaseId>,
    ) -> Result<(), SourceError> {
        let by = by.min(B::MAX_EXTENSION);
        let seconds = by.as_secs() + u64::from(by.subsec_nanos() > 0);
        let seconds = seconds.clamp(1, u64::from(u32::MAX)) as u32;
        let now = Instant::now();
        let mut ops = Vec::with_capacity(leases.len());
        {
            let mut table = lock(&self.shared.holds);
            for &id in leases {
                match table.extend(id, now, now + by) {
                    Some(handle) => ops.push(Op::Modify(handle.clone(), seconds)),
                    None => refused.push(id),
                }
            }
        }
        self.enqueue(ops);
        Ok(())
    }

    /// `Source::interrupt`.
    pub(crate) fn interrupt(&self) {
        self.shared.interrupted.trigger(ShutdownReason::Requested);
    }

    /// `Source::flush`: waits for the queued lease operations; once interrupted, at most a
    /// quarter of a second.
    pub(crate) fn flush(&self, timeout: Duration) -> usize {
        let shared = &self.shared;
        let timeout = if shared.interrupted.is_triggered() {
            timeout.min(SHUTDOWN_WAIT)
        } else {
            timeout
        };
        // Reported by the caller: the drop's report leaves them out.
        shared.queued.told(shared.flush(timeout))
    }

    /// `Source::nack_all`.
    pub(crate) fn nack_all(&self) -> usize {
        let held = lock(&self.shared.holds).drain();
        let count = held.len();
        self.enqueue(give_back(held).collect());
        self.shared.flush(SHUTDOWN_WAIT);
        count
    }

    /// `Source::settled`.
    pub(crate) fn settled(&self) -> u64 {
        self.shared.settled.load(Ordering::SeqCst)
    }

    /// `Source::stats`: `remaining` is what this source holds (handed out or held back).
    /// Waits (at most a quarter of a second) for queued lease operations.
    pub(crate) fn stats(&self) -> SourceStats {
        self.shared.flush(SHUTDOWN_WAIT);
        self.expire();
        let mut stats = *lock(&self.shared.stats);
        stats.remaining = lock(&self.shared.holds).len() as u64;
        stats
    }
}

impl<B: Broker> Drop for Leasing<B> {
    fn drop(&mut self) {
        let shared = &self.shared;
        let unsent = shared.queued.untold(shared.flush(SHUTDOWN_WAIT));
        shared.closing.store(true, Ordering::SeqCst);
        // Closing the queue ends the worker once it has sent what is queued.
        self.worker.close();
        if unsent > 0 {
            warn!(
                "{unsent} lease operations were left unsent to {}; their messages are \
                 delivered again after the ack deadline",
                B::NAME
            );
        }
        // A request in flight ends by itself at its timeout; the exit does not wait.
        self.worker
            .join_by(Instant::now() + SHUTDOWN_WAIT, &format!("{} ack", B::NAME));
    }
}

/// Implements [`Source`](crate::source::Source) for a broker's source type `$source`, whose
/// field `$field` is its [`Leasing`]: every method is the kit's.
macro_rules! leasing_source {
    ($source:ty, $field:ident) => {
        impl $crate::source::Source for $source {
            fn pull_batch(&self) -> usize {
                self.$field.pull_batch()
            }

            fn pull(
                &self,
                max: usize,
                wait: ::std::time::Duration,
                out: &mut Vec<$crate::source::Lease>,
            ) -> Result<(), $crate::error::SourceError> {
                self.$field.pull(max, wait, out)
            }

            fn ack(
                &self,
                leases: &[$crate::source::LeaseId],
                refused: &mut Vec<$crate::source::LeaseId>,
            ) -> Result<(), $crate::error::SourceError> {
                self.$field.ack(leases, refused)
            }

            fn nack(
                &self,
                leases: &[$crate::source::LeaseId],
                refused: &mut Vec<$crate::source::LeaseId>,
            ) -> Result<(), $crate::error::SourceError> {
                self.$field.nack(leases, refused)
            }

            fn reject(
                &self,
                lease: $crate::source::LeaseId,
                reason: &str,
                refused: &mut Vec<$crate::source::LeaseId>,
            ) -> Result<(), $crate::error::SourceError> {
                self.$field.reject(lease, reason, refused)
            }

            fn extend(
                &self,
                leases: &[$crate::source::LeaseId],
                by: ::std::time::Duration,
                refused: &mut Vec<$crate::source::LeaseId>,
            ) -> Result<(), $crate::error::SourceError> {
                self.$field.extend(leases, by, refused)
            }

            fn interrupt(&self) {
                self.$field.interrupt()
            }

            fn flush(&self, timeout: ::std::time::Duration) -> usize {
                self.$field.flush(timeout)
            }

            fn nack_all(&self) -> usize {
                self.$field.nack_all()
            }

            fn settled(&self) -> u64 {
                self.$field.settled()
            }

            fn stats(&self) -> $crate::source::SourceStats {
                self.$field.stats()
            }
        }
    };
}
pub(crate) use leasing_source;

/// The operations that give back held deliveries.
fn give_back<H>(held: Vec<Held<H>>) -> impl Iterator<Item = Op<H>> {
    held.into_iter().map(|held| Op::Modify(held.handle, 0))
}

/// The dead letter of a held lease.
fn dead<H: Clone>(held: &Held<H>, reason: String) -> Op<H> {
    Op::Dead(Box::new(DeadLetter {
        handle: held.handle.clone(),
        message: held.message.clone(),
        reason: reason.into(),
        attempt: held.attempt,
        undecodable: false,
    }))
}

/// Sends `chunks` with `call`, up to `lanes` at once on threads named `name` (the caller's
/// own thread is one); after a failure no lane takes another, and the first error is
/// returned.
pub(crate) fn in_lanes<T: Sync>(
    chunks: &[T],
    lanes: usize,
    name: &str,
    call: impl Fn(&T) -> Result<(), SourceError> + Sync,
) -> Result<(), SourceError> {
    let lanes = lanes.min(chunks.len());
    if lanes <= 1 {
        return chunks.iter().try_for_each(call);
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let lane = || -> Result<(), SourceError> {
        while !failed.load(Ordering::SeqCst) {
            let Some(chunk) = chunks.get(next.fetch_add(1, Ordering::SeqCst)) else {
                return Ok(());
            };
            if let Err(error) = call(chunk) {
                failed.store(true, Ordering::SeqCst);
                return Err(error);
            }
        }
        Ok(())
    };
    thread::scope(|scope| {
        // A thread the system refuses leaves fewer lanes; the caller's own always runs.
        let others: Vec<_> = (1..lanes)
            .filter_map(|_| {
                thread::Builder::new()
                    .name(name.into())
                    .spawn_scoped(scope, lane)
                    .ok()
            })
            .collect();
        let mut result = lane();
        for other in others {
            let outcome = other.join().unwrap_or_else(|_| {
                Err(SourceError::Backend(format!("the {name} thread panicked")))
            });
            result = result.and(outcome);
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// What the fake broker was asked to do.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Ack(Vec<u32>),
        Modify(Vec<u32>, u32),
        Dead(u32, String, bool),
    }

    /// A broker in memory: hands out what `waiting` holds, records every call, and fails
    /// the next `failures` calls of each kind with `failure` (503: transient; 400: for good).
    #[derive(Debug, Default)]
    struct Fake {
        waiting: Mutex<VecDeque<Fetched<u32>>>,
        calls: Mutex<Vec<Call>>,
        failures: Mutex<u32>,
        failure: u16,
        dead_refused_unless_stripped: bool,
    }

    impl Fake {
        fn fail(&self) -> Result<(), HttpError> {
            let mut failures = lock(&self.failures);
            if *failures == 0 {
                return Ok(());
            }
            *failures -= 1;
            Err(HttpError::Status {
                code: self.failure,
                status: String::new(),
                message: "injected".into(),
            })
        }
    }

    impl Broker for Fake {
        type Handle = u32;
        const NAME: &'static str = "fake";
        const FETCH_MAX: usize = 10;
        const PER_REQUEST: usize = 2;
        const MAX_EXTENSION: Duration = Duration::from_secs(600);

        fn endpoint(&self) -> &str {
            "memory"
        }

        fn queue(&self) -> &str {
            "queue"
        }

        fn fetch(&self, max: usize) -> Result<Vec<Fetched<u32>>, HttpError> {
            let mut waiting = lock(&self.waiting);
            let take = max.min(waiting.len());
            Ok(waiting.drain(..take).collect())
        }

        fn recreate(&self) -> Result<(), HttpError> {
            Ok(())
        }

        fn ack(&self, handles: &[u32]) -> Result<(), HttpError> {
            self.fail()?;
            lock(&self.calls).push(Call::Ack(handles.to_vec()));
            Ok(())
        }

        fn modify(&self, handles: &[u32], seconds: u32) -> Result<(), HttpError> {
            self.fail()?;
            lock(&self.calls).push(Call::Modify(handles.to_vec(), seconds));
            Ok(())
        }

        fn dead_letter(&self, letter: &DeadLetter<u32>, stripped: bool) -> Result<(), HttpError> {
            if self.dead_refused_unless_stripped && !stripped {
                return Err(HttpError::Status {
                    code: 400,
                    status: "INVALID_ARGUMENT".into(),
                    message: "too large".into(),
                });
            }
            let call = Call::Dead(letter.handle, letter.reason.to_string(), stripped);
            lock(&self.calls).push(call);
            Ok(())
        }
    }

    fn delivery(handle: u32, attempt: Option<u32>, data: Result<&str, &str>) -> Fetched<u32> {
        Fetched {
            handle,
            origin: format!("m{handle}"),
            attempt,
            message: data
                .map(|data| PubSubMessage::new(data.to_owned()))
                .map_err(str::to_owned),
        }
    }

    fn leasing(fake: Fake, max_attempts: u32) -> Leasing<Fake> {
        let terms = Terms {
            max_attempts,
            reconnect_limit: Duration::from_secs(30),
            deadline: Duration::from_secs(10),
            ordering: false,
        };
        Leasing::start(Shared::new(fake, terms)).unwrap()
    }

    fn pull(leasing: &Leasing<Fake>) -> Vec<Lease> {
        let mut out = Vec::new();
        leasing.pull(10, Duration::ZERO, &mut out).unwrap();
        out
    }

    fn calls(leasing: &Leasing<Fake>) -> Vec<Call> {
        assert_eq!(leasing.flush(Duration::from_secs(10)), 0, "all sent");
        lock(&leasing.shared.broker.calls).clone()
    }

    #[test]
    fn acks_nacks_and_rejects_become_the_brokers_requests_in_batches() {
        let fake = Fake::default();
        lock(&fake.waiting).extend((1..=5).map(|n| delivery(n, Some(1), Ok("web-01"))));
        let leasing = leasing(fake, 5);
        let leases = pull(&leasing);
        assert_eq!(leases.len(), 5);
        let ids: Vec<LeaseId> = leases.iter().map(|lease| lease.id).collect();
        let mut refused = Vec::new();
        leasing.ack(&ids[..3], &mut refused).unwrap();
        leasing.nack(&ids[3..4], &mut refused).unwrap();
        leasing.reject(ids[4], "bad host", &mut refused).unwrap();
        // Settled leases are refused the second time.
        leasing.ack(&ids[..1], &mut refused).unwrap();
        assert_eq!(refused, [ids[0]]);
        let calls = calls(&leasing);
        let acks: Vec<&Vec<u32>> = calls
            .iter()
            .filter_map(|call| match call {
                Call::Ack(handles) => Some(handles),
                _ => None,
            })
            .collect();
        assert!(acks.iter().all(|handles| handles.len() <= 2), "{calls:?}");
        let mut acked: Vec<u32> = acks.into_iter().flatten().copied().collect();
        acked.sort_unstable();
        assert_eq!(acked, [1, 2, 3, 5], "{calls:?}");
        assert!(calls.contains(&Call::Modify(vec![4], 0)), "{calls:?}");
        // The dead letter is published before its delivery is acked.
        let dead_at = calls
            .iter()
            .position(|call| *call == Call::Dead(5, "bad host".into(), false));
        let acked_at = calls
            .iter()
            .position(|call| matches!(call, Call::Ack(handles) if handles.contains(&5)));
        assert!(dead_at.is_some() && dead_at < acked_at, "{calls:?}");
        assert_eq!(
            calls
                .iter()
                .filter(|call| !matches!(call, Call::Ack(_)))
                .count(),
            2,
            "one give-back and one dead letter: {calls:?}"
        );
        assert_eq!(leasing.settled(), 4);
        let stats = leasing.stats();
        assert_eq!((stats.dead_lettered, stats.remaining), (1, 0));
    }

    #[test]
    fn the_last_attempt_unreadable_data_and_too_many_deliveries_are_dead_letters() {
        let fake = Fake::default();
        lock(&fake.waiting).extend([
            delivery(1, Some(3), Ok("web-01")),
            delivery(2, Some(4), Ok("web-02")),
            delivery(3, None, Err("its data is not base64")),
        ]);
        let leasing = leasing(fake, 3);
        let leases = pull(&leasing);
        assert_eq!(leases.len(), 1, "only the first is handed out");
        assert_eq!(leases[0].attempt, 3);
        leasing.nack(&[leases[0].id], &mut Vec::new()).unwrap();
        let calls = calls(&leasing);
        let dead: Vec<&Call> = calls
            .iter()
            .filter(|call| matches!(call, Call::Dead(..)))
            .collect();
        assert_eq!(dead.len(), 3, "{calls:?}");
        assert!(calls.contains(&Call::Dead(
            2,
            "delivered 4 times, over the maximum of 3".into(),
            false
        )));
        assert!(calls.contains(&Call::Dead(1, "nacked on attempt 3 of 3".into(), false)));
        let stats = leasing.stats();
        assert_eq!((stats.dead_lettered, stats.undecodable), (3, 1));
        assert_eq!(leasing.settled(), 3, "each dead letter acked once");
    }

    #[test]
    fn transient_failures_are_retried_and_a_refused_dead_letter_goes_stripped() {
        let fake = Fake {
            failure: 503,
            dead_refused_unless_stripped: true,
            ..Fake::default()
        };
        *lock(&fake.failures) = 2;
        lock(&fake.waiting).extend([delivery(1, Some(1), Ok("a")), delivery(2, None, Ok("b"))]);
        let leasing = leasing(fake, 5);
        let leases = pull(&leasing);
        let mut refused = Vec::new();
        leasing.ack(&[leases[0].id], &mut refused).unwrap();
        leasing.reject(leases[1].id, "why", &mut refused).unwrap();
        // `flush` gives up while the broker fails; wait for the retries instead.
        let end = Instant::now() + Duration::from_secs(10);
        while leasing.settled() < 2 && Instant::now() < end {
            thread::sleep(Duration::from_millis(5));
        }
        let calls = calls(&leasing);
        assert!(
            calls.contains(&Call::Dead(2, "why".into(), true)),
            "{calls:?}"
        );
        let acked: Vec<u32> = calls
            .iter()
            .flat_map(|call| match call {
                Call::Ack(handles) => handles.clone(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(acked.len(), 2, "both acked once, after two 503s: {calls:?}");
        assert_eq!(leasing.settled(), 2);
    }

    #[test]
    fn extensions_are_whole_seconds_up_to_the_brokers_limit_and_expired_leases_are_refused() {
        let fake = Fake::default();
        lock(&fake.waiting).extend([delivery(1, Some(1), Ok("a"))]);
        let leasing = leasing(fake, 5);
        let lease = pull(&leasing).remove(0);
        let mut refused = Vec::new();
        leasing
            .extend(&[lease.id], Duration::from_millis(1500), &mut refused)
            .unwrap();
        leasing
            .extend(&[lease.id], Duration::from_secs(3600), &mut refused)
            .unwrap();
        assert!(refused.is_empty());
        let calls = calls(&leasing);
        assert_eq!(
            calls,
            [Call::Modify(vec![1], 2), Call::Modify(vec![1], 600)],
            "rounded up, and capped at MAX_EXTENSION"
        );
        // Past its local deadline the lease is refused and counted as expired.
        lock(&leasing.shared.holds)
            .extend(lease.id, Instant::now(), Instant::now())
            .unwrap();
        leasing.ack(&[lease.id], &mut refused).unwrap();
        assert_eq!(refused, [lease.id]);
        assert_eq!(leasing.stats().expired, 1);
    }
}
