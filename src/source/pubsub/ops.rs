//! The lease-operation worker: a thread that sends queued acks, nacks, extensions and dead
//! letters in batched requests, so that `ack`, `nack` and `extend` return at once; and that
//! keeps extending the deliveries held back behind an earlier message of their ordering key.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use log::{debug, warn};

use super::rest::{RestError, ACK_IDS_PER_REQUEST};
use super::{Core, BACKOFF};
use crate::message::PubSubMessage;
use crate::sync::lock;

/// Most queued operations taken into one pass.
const PASS_MAX: usize = 4 * ACK_IDS_PER_REQUEST;
/// The attribute of a dead letter that says why it is one.
pub(super) const REASON_ATTRIBUTE: &str = "mayhem_dead_reason";
/// The attribute of a dead letter that gives its delivery attempt.
pub(super) const ATTEMPT_ATTRIBUTE: &str = "mayhem_attempt";
/// The attribute of a dead letter that carries neither the data nor the attributes of its
/// message: with them it was over Pub/Sub's limits.
pub(super) const STRIPPED_ATTRIBUTE: &str = "mayhem_dead_letter_stripped";

/// A queued lease operation.
#[derive(Debug)]
pub(super) enum Op {
    /// Acknowledge the delivery.
    Ack(String),
    /// Set the delivery's deadline to this many seconds from now (0: give it back).
    Modify(String, u32),
    /// Publish the message to the dead-letter topic, then acknowledge the delivery.
    Dead(Box<DeadLetter>),
}

/// A message to dead-letter.
#[derive(Debug)]
pub(super) struct DeadLetter {
    /// The delivery to acknowledge once the dead letter is published.
    pub(super) ack_id: String,
    /// The message.
    pub(super) message: PubSubMessage,
    /// Why, stored as [`REASON_ATTRIBUTE`].
    pub(super) reason: Arc<str>,
    /// Its delivery attempt, stored as [`ATTEMPT_ATTRIBUTE`].
    pub(super) attempt: u32,
    /// Whether its data could not be read at all.
    pub(super) undecodable: bool,
}

impl Core {
    /// The worker thread: sends queued operations in batches until the queue closes; in
    /// between, every third of the ack deadline, extends the deliveries held back.
    pub(super) fn run_ops(&self, queue: mpsc::Receiver<Vec<Op>>) {
        let tick = self.deadline / 3;
        let mut next_tick = Instant::now() + tick;
        let mut pass: Vec<Op> = Vec::new();
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match queue.recv_timeout(wait) {
                Ok(ops) => pass.extend(ops),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            while pass.len() < PASS_MAX {
                match queue.try_recv() {
                    Ok(ops) => pass.extend(ops),
                    Err(_) => break,
                }
            }
            // Only the queued operations count as answered; the extensions added below are
            // the worker's own.
            let queued = pass.len() as u64;
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + tick;
                let now = Instant::now();
                let due = lock(&self.leases).due_on_hold(now + tick * 2, now + self.deadline);
                let seconds = self.deadline.as_secs().max(1) as u32;
                pass.extend(due.into_iter().map(|ack_id| Op::Modify(ack_id, seconds)));
            }
            self.send(std::mem::take(&mut pass));
            self.queued.done(queued);
        }
    }

    /// Sends one pass: the dead letters first (published, then acked with the acks), then the
    /// acks, then the deadline changes grouped by their seconds; each request in chunks of
    /// [`ACK_IDS_PER_REQUEST`] ids.
    fn send(&self, pass: Vec<Op>) {
        let mut acks = Vec::new();
        let mut modify: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        let mut dead = Vec::new();
        for op in pass {
            match op {
                Op::Ack(ack_id) => acks.push(ack_id),
                Op::Modify(ack_id, seconds) => modify.entry(seconds).or_default().push(ack_id),
                Op::Dead(letter) => dead.push(letter),
            }
        }
        for letter in dead {
            let attempt = letter.attempt.to_string();
            // The reason is cut to Pub/Sub's limit for attribute values.
            let reason = cut(&letter.reason, crate::message::MAX_VALUE_BYTES);
            let extra = [
                (REASON_ATTRIBUTE, reason),
                (ATTEMPT_ATTRIBUTE, attempt.as_str()),
            ];
            let mut published = self.retry("publish a dead letter", || {
                self.rest.publish(
                    &self.dead_topic,
                    std::slice::from_ref(&letter.message),
                    &extra,
                )
            });
            if published.is_none() && !self.closing.load(Ordering::SeqCst) {
                // Refused for good: the message with the dead letter's two attributes is
                // over Pub/Sub's limits (100 attributes, 10 MB per request once in base64).
                // Its id and the reason alone still go, so that the delivery is settled
                // instead of delivered again without end.
                let bare = PubSubMessage::new(Vec::new()).with_id(letter.message.id().clone());
                let extra = [
                    (REASON_ATTRIBUTE, reason),
                    (ATTEMPT_ATTRIBUTE, attempt.as_str()),
                    (
                        STRIPPED_ATTRIBUTE,
                        "data and attributes over Pub/Sub's limits",
                    ),
                ];
                published = self.retry("publish a dead letter without its data", || {
                    self.rest
                        .publish(&self.dead_topic, std::slice::from_ref(&bare), &extra)
                });
            }
            if published.is_some() {
                let mut stats = lock(&self.stats);
                stats.dead_lettered += 1;
                stats.undecodable += u64::from(letter.undecodable);
                drop(stats);
                acks.push(letter.ack_id);
            }
        }
        for chunk in acks.chunks(ACK_IDS_PER_REQUEST) {
            let ids: Vec<&str> = chunk.iter().map(String::as_str).collect();
            if self
                .retry("acknowledge", || {
                    self.rest.acknowledge(&self.subscription, &ids)
                })
                .is_some()
            {
                self.settled.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        }
        for (seconds, ids) in &modify {
            for chunk in ids.chunks(ACK_IDS_PER_REQUEST) {
                let ids: Vec<&str> = chunk.iter().map(String::as_str).collect();
                self.retry("modify ack deadlines", || {
                    self.rest.modify(&self.subscription, &ids, *seconds)
                });
            }
        }
    }

    /// Runs `call` until it succeeds, with backoff while it fails in a way that may pass, and
    /// until the source is dropped; `None` when it was given up (then the deliveries expire
    /// and are delivered again).
    fn retry<T>(&self, what: &str, call: impl Fn() -> Result<T, RestError>) -> Option<T> {
        let mut backoff = BACKOFF;
        loop {
            match call() {
                Ok(value) => {
                    self.health.recovered(self.rest.base());
                    return Some(value);
                }
                Err(error) if error.is_transient() && !self.closing.load(Ordering::SeqCst) => {
                    self.health.failed(self.rest.base(), &error);
                    self.nap(backoff.next_pause());
                }
                Err(error) => {
                    if self.closing.load(Ordering::SeqCst) {
                        debug!("gave up trying to {what}: {error}");
                    } else {
                        warn!("pubsub refused to {what}: {error}");
                    }
                    return None;
                }
            }
        }
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
