//! Consuming: the pull, reading a delivery, the lease table with its expiry, and the
//! worker that sends the lease operations.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use async_io::Timer;
use futures_lite::{future, StreamExt};
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::Consumer;
use log::warn;

use super::link::{failure_text, in_order, Abort, Failure, Link, Side};
use super::publish::ORDERING_KEY_HEADER;
use super::{
    AmqpSource, Consuming, Core, CONFIRM_TIMEOUT, CONNECT_TIMEOUT, LINGER, LINGER_STEP,
    SCAN_EVERY_NANOS, SHUTDOWN_WAIT, TICK,
};
use crate::error::SourceError;
use crate::message::{Attributes, MessageId, PubSubMessage};
use crate::source::kit::{LeaseTable, Prefix, Settle};
use crate::source::{Lease, LeaseId};
use crate::sync::lock;

/// How long the ack worker gathers lease operations after the first of a pass, unless
/// [`GATHER_OPS`] came first or the source is interrupted. Measured on 200,000 messages:
/// frames of about 200 acks cost the broker 8.8 to 10.8 µs of CPU per message, a peer acking
/// 1,000 a frame 8.4 to 9.6.
const GATHER: Duration = Duration::from_millis(5);
/// Most lease operations the worker waits to gather before a pass.
const GATHER_OPS: usize = 2048;

/// The lease table.
pub(super) type Leases = LeaseTable<Held>;

/// One lease this consumer holds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Held {
    /// The delivery tag on the consume channel of link `epoch`.
    pub(super) tag: u64,
    /// The link the delivery came on.
    pub(super) epoch: u64,
    /// Delivery attempt of the message.
    pub(super) attempt: u32,
    /// Local deadline; past it the source requeues the message.
    pub(super) deadline: Instant,
}

/// One queued lease operation.
#[derive(Debug, Clone, Copy)]
pub(super) struct Op {
    /// What to send.
    pub(super) kind: Settle,
    /// The delivery tag.
    pub(super) tag: u64,
    /// The link the delivery came on.
    pub(super) epoch: u64,
}

/// What an expired lease becomes: requeued, or dead-lettered on its last attempt.
pub(super) fn expiry_kind(held: &Held, max_attempts: u32) -> Settle {
    if held.attempt >= max_attempts {
        Settle::Dead
    } else {
        Settle::Requeue
    }
}

/// An integer header, if it is one.
pub(super) fn integer(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        _ => None,
    }
}

/// A header value as an attribute string: strings as they are, numbers of every type and
/// booleans written out (`-5`, `1.5`, `true`), byte arrays that are UTF-8 as text; `Ok(None)`
/// for tables, arrays, void and other byte arrays (left out: an attribute is one string, and
/// a byte array is binary by type); an error for a string that is not UTF-8.
pub(super) fn text(value: &AMQPValue) -> Result<Option<String>, ()> {
    let utf8 = |bytes: &[u8]| {
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| ())
    };
    Ok(Some(match value {
        AMQPValue::LongString(v) => utf8(v.as_bytes())?,
        AMQPValue::ByteArray(v) => match utf8(v.as_slice()) {
            Ok(text) => text,
            Err(()) => return Ok(None),
        },
        AMQPValue::ShortString(v) => v.as_str().to_owned(),
        AMQPValue::Boolean(v) => v.to_string(),
        AMQPValue::ShortShortInt(v) => v.to_string(),
        AMQPValue::ShortInt(v) => v.to_string(),
        AMQPValue::LongInt(v) => v.to_string(),
        AMQPValue::LongLongInt(v) => v.to_string(),
        AMQPValue::Float(v) => v.to_string(),
        AMQPValue::Double(v) => v.to_string(),
        AMQPValue::DecimalValue(v) => decimal(v.value, v.scale),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) | AMQPValue::Void => return Ok(None),
        unsigned => match integer(unsigned) {
            Some(v) => v.to_string(),
            None => return Ok(None),
        },
    }))
}

/// An AMQP decimal, `value` × 10^-`scale`, written out (`12345`, scale 2: `123.45`).
fn decimal(value: u32, scale: u8) -> String {
    let digits = format!("{value:0>width$}", width = usize::from(scale) + 1);
    let (whole, fraction) = digits.split_at(digits.len() - usize::from(scale));
    if fraction.is_empty() {
        whole.to_owned()
    } else {
        format!("{whole}.{fraction}")
    }
}

/// Reads a delivery: the message (its body is the data, taken over without a copy) and its
/// attempt; or why it is not a message (it is then dead-lettered), with its body.
pub(super) fn read(
    delivery: lapin::message::Delivery,
) -> Result<(PubSubMessage, u32), (String, Vec<u8>)> {
    let properties = &delivery.properties;
    let id = properties
        .message_id()
        .as_ref()
        .map(|id| MessageId::from(id.as_str()))
        .unwrap_or_default();
    let mut attributes = Attributes::new();
    let mut ordering_key = None;
    let mut returned = 0u64;
    if let Some(headers) = properties.headers() {
        for (key, value) in headers.inner() {
            let key = key.as_str();
            if key == "x-delivery-count" || key == "x-acquired-count" {
                returned = returned.max(integer(value).unwrap_or(0));
            } else if key == ORDERING_KEY_HEADER {
                ordering_key = text(value).ok().flatten();
            } else if !key.starts_with("x-") {
                match text(value) {
                    Ok(Some(value)) => attributes.insert(key, value),
                    Ok(None) => {}
                    Err(()) => {
                        let reason =
                            format!("header '{key}' is not UTF-8 (attributes are strings)");
                        return Err((reason, delivery.data));
                    }
                }
            }
        }
    }
    let publish_time = properties
        .timestamp()
        // Any 64-bit number a producer wrote: one past what `SystemTime` holds is no time.
        .and_then(|seconds| std::time::UNIX_EPOCH.checked_add(Duration::from_secs(seconds)));
    let mut message = PubSubMessage::new(bytes::Bytes::from(delivery.data))
        .with_id(id)
        .with_attributes(attributes);
    if let Some(time) = publish_time {
        message = message.with_publish_time(time);
    }
    if let Some(key) = ordering_key {
        message = message.with_ordering_key(key);
    }
    let attempt = u32::try_from(returned.saturating_add(1)).unwrap_or(u32::MAX);
    Ok((message, attempt))
}

impl AmqpSource {
    /// [`Source::pull`](crate::source::Source::pull): see there.
    pub(super) fn pull_deliveries(
        &self,
        max: usize,
        wait: Duration,
        out: &mut Vec<Lease>,
    ) -> Result<(), SourceError> {
        let core = &self.core;
        if core.interrupted.load(Ordering::SeqCst) {
            return Err(SourceError::Closed);
        }
        if max == 0 {
            return Ok(());
        }
        self.enqueue(core.expire_local());
        let link = match core.link() {
            Ok(link) => link,
            Err(Failure::Down { retry_in }) => {
                // Nothing to deliver while the broker is away; the consumer loop comes back.
                thread::sleep(retry_in.min(wait));
                return Ok(());
            }
            // (`link` never answers `Refused`: that is an answer to a publish.)
            Err(Failure::GaveUp(text) | Failure::Refused(text)) => {
                return Err(SourceError::Unavailable(text))
            }
            Err(Failure::Closed) => return Err(SourceError::Closed),
        };
        let end = Instant::now() + wait;
        let mut slot = lock(&link.consumer);
        if slot.is_none() {
            core.consuming.store(true, Ordering::SeqCst);
            match core.consume(&link) {
                Ok(consumer) => *slot = Some(consumer),
                Err(failure) => {
                    drop(slot);
                    if let Failure::Closed = failure {
                        return Err(SourceError::Closed);
                    }
                    core.lost(&link, &failure_text(&failure));
                    return Ok(());
                }
            }
        }
        let Some(consumer) = slot.as_mut() else {
            return Ok(());
        };
        let mut taken = 0;
        let mut bad = Vec::new();
        // How long this pull waited for more deliveries once it had one.
        let mut lingered = Duration::ZERO;
        // What was taken when the last linger began.
        let mut before_linger = 0;
        while taken < max {
            // What is buffered already, without a timer or a wake-up.
            let mut next = future::block_on(future::poll_once(consumer.next()));
            if next.is_none() {
                if taken + bad.len() > 0 {
                    // None buffered, and the connection's thread may be reading more of the
                    // same burst: a short sleep, then what came meanwhile, while something
                    // comes and `LINGER` lasts. A sleep, not a wait on the consumer: that
                    // wait would be woken by each delivery, one at a time.
                    if lingered >= LINGER || taken + bad.len() == before_linger {
                        break;
                    }
                    before_linger = taken + bad.len();
                    thread::sleep(LINGER_STEP);
                    lingered += LINGER_STEP;
                    continue;
                }
                if Instant::now() >= end || core.interrupted.load(Ordering::SeqCst) {
                    break;
                }
                // Nothing yet: waits for the first, in slices of `TICK`; an interrupt wakes
                // the wait at once (it closes `wake`).
                let left = end.saturating_duration_since(Instant::now());
                let woken = &core.side.woken;
                next = future::block_on(future::or(
                    async { Some(consumer.next().await) },
                    future::or(
                        async {
                            Timer::after(left.min(TICK)).await;
                            None
                        },
                        async {
                            // Only ever closed, never sent to: returns on the interrupt.
                            let _ = woken.recv().await;
                            None
                        },
                    ),
                ));
            }
            match next {
                None => {}
                Some(Some(Ok(delivery))) => {
                    let tag = delivery.delivery_tag;
                    let adopted = core.adopted.load(Ordering::Relaxed);
                    let redelivered = delivery.redelivered;
                    match read(delivery) {
                        Ok((message, attempt)) => {
                            let attempt = if adopted {
                                lock(&core.side.adopted).hold(
                                    link.epoch,
                                    tag,
                                    &message,
                                    attempt,
                                    redelivered,
                                )
                            } else {
                                attempt
                            };
                            let id = core.hold(tag, link.epoch, attempt);
                            out.push(Lease {
                                message,
                                attempt,
                                id,
                            });
                            taken += 1;
                        }
                        Err((reason, body)) => {
                            if core.side.malformed.fetch_add(1, Ordering::Relaxed) == 0 {
                                warn!(
                                    "a message on amqp queue {} is not a message ({reason}); \
                                 it is dead-lettered (further ones are only counted)",
                                    core.config.queue
                                );
                            }
                            // An adopted queue's dead letters are published by the source,
                            // this one with its body.
                            if adopted {
                                lock(&core.side.adopted).hold_unreadable(
                                    link.epoch,
                                    tag,
                                    body.into(),
                                    redelivered,
                                    &reason,
                                );
                            }
                            // Counted once the dead letter is sent, as every other one (the
                            // worker's count): counting it here too counted it twice.
                            bad.push(Op {
                                kind: Settle::Dead,
                                tag,
                                epoch: link.epoch,
                            });
                        }
                    }
                }
                Some(Some(Err(error))) => {
                    drop(slot);
                    self.enqueue(bad);
                    core.lost(&link, &error.to_string());
                    return Ok(());
                }
                Some(None) => {
                    drop(slot);
                    self.enqueue(bad);
                    core.lost(&link, "the broker cancelled the consumer");
                    return Ok(());
                }
            }
        }
        drop(slot);
        self.enqueue(bad);
        Ok(())
    }

    /// Queues lease operations for the worker.
    ///
    /// Once the worker is gone (only while dropping), the frames are not sent, and the
    /// connection's close gives the messages back.
    pub(super) fn enqueue(&self, ops: Vec<Op>) {
        self.worker.send(&self.core.side.queued, ops);
    }

    /// Removes the leases of `ids` from the table and turns each into an operation; an
    /// unknown lease, or one of a lost link, is refused; one whose deadline passed is
    /// refused and requeued.
    pub(super) fn take_all(
        &self,
        ids: &[LeaseId],
        refused: &mut Vec<LeaseId>,
        kind: impl Fn(&Held) -> Settle,
    ) -> Vec<Op> {
        let now = Instant::now();
        let epoch = self.core.current_epoch();
        let max_attempts = self.core.config.max_attempts;
        let mut ops = Vec::with_capacity(ids.len());
        let mut expired = 0;
        let mut leases = lock(&self.core.side.leases);
        for &id in ids {
            // A lease of a lost link stays for `forget`, which counts it.
            match leases.remove_if(id, |held| held.epoch == epoch) {
                Some(held) => {
                    if held.deadline <= now {
                        expired += 1;
                        refused.push(id);
                        ops.push(Op {
                            kind: expiry_kind(&held, max_attempts),
                            tag: held.tag,
                            epoch: held.epoch,
                        });
                    } else {
                        ops.push(Op {
                            kind: kind(&held),
                            tag: held.tag,
                            epoch: held.epoch,
                        });
                    }
                }
                _ => refused.push(id),
            }
        }
        drop(leases);
        if expired > 0 {
            lock(&self.core.side.stats).expired += expired;
        }
        ops
    }
}

impl Side for Consuming {
    const CONSUMES: bool = true;

    /// Voids the leases of the lost link (the broker gives their messages back) and counts
    /// them as expired.
    fn forget(&self, epoch: u64) {
        let mut leases = lock(&self.leases);
        let before = leases.len();
        leases.retain(|_, held| held.epoch != epoch);
        let void = (before - leases.len()) as u64;
        drop(leases);
        lock(&self.adopted).forget(epoch);
        lock(&self.stats).expired += void;
    }
}

impl Core {
    /// Starts consuming the queue on `link`.
    pub(super) fn consume(&self, link: &Link) -> Result<Consumer, Failure> {
        self.bounded(CONNECT_TIMEOUT, Abort::OnInterrupt, async {
            link.consume
                .basic_consume(
                    ShortString::from(self.config.queue.as_str()),
                    ShortString::from(""),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|error| self.secrets.scrub(&error.to_string()))
        })
    }

    /// After an interrupt: cancels the consumer (or waits for the cancel under way) and
    /// returns rejects with requeue for every delivery it received that no pull took.
    pub(super) fn prefetched(&self) -> Vec<Op> {
        self.cancel_after_interrupt();
        let Some(link) = lock(&self.link).clone() else {
            return Vec::new();
        };
        let mut slot = lock(&link.consumer);
        let Some(consumer) = slot.as_mut() else {
            return Vec::new();
        };
        let mut ops = Vec::new();
        // The consumer is cancelled: the broker sends it nothing more, and what it sent
        // before the cancel was answered is buffered already.
        while let Some(Some(Ok(delivery))) = future::block_on(future::poll_once(consumer.next())) {
            ops.push(Op {
                kind: Settle::Requeue,
                tag: delivery.delivery_tag,
                epoch: link.epoch,
            });
        }
        ops
    }

    /// Takes a delivery as a lease; returns its id.
    pub(super) fn hold(&self, tag: u64, epoch: u64, attempt: u32) -> LeaseId {
        lock(&self.side.leases).insert(Held {
            tag,
            epoch,
            attempt,
            deadline: Instant::now() + self.config.ack_deadline,
        })
    }

    /// Removes the leases whose deadline passed; returns the rejects that give them back.
    pub(super) fn expire_local(&self) -> Vec<Op> {
        let now = Instant::now();
        let since =
            u64::try_from(now.duration_since(self.side.born).as_nanos()).unwrap_or(u64::MAX);
        let due = self.side.next_scan.load(Ordering::Relaxed);
        // One scan per `SCAN_EVERY` whoever asks: a lease expires at most that much late.
        if since < due
            || self
                .side
                .next_scan
                .compare_exchange(
                    due,
                    since + SCAN_EVERY_NANOS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return Vec::new();
        }
        let max_attempts = self.config.max_attempts;
        let mut ops = Vec::new();
        lock(&self.side.leases).retain(|_, held| {
            if held.deadline > now {
                return true;
            }
            ops.push(Op {
                kind: expiry_kind(held, max_attempts),
                tag: held.tag,
                epoch: held.epoch,
            });
            false
        });
        if ops.is_empty() {
            return ops;
        }
        lock(&self.side.stats).expired += ops.len() as u64;
        ops
    }

    /// The worker: sends queued operations, and every tick requeues expired leases.
    pub(super) fn run_ops(&self, queue: &mpsc::Receiver<Vec<Op>>) {
        let mut prefix = Prefix::new(0);
        loop {
            // Wakes for the tick, or sooner when deliveries held back behind a straggler
            // are due to be sent alone.
            let wait = prefix.deadline().map_or(TICK, |due| {
                due.saturating_duration_since(Instant::now()).min(TICK)
            });
            let next = queue.recv_timeout(wait);
            self.cancel_after_interrupt();
            match next {
                Ok(mut ops) => {
                    // Takes everything queued meanwhile: one pass sends it all.
                    while let Ok(more) = queue.try_recv() {
                        ops.extend(more);
                    }
                    // And what comes within `GATHER`, up to `GATHER_OPS`: fewer, larger
                    // frames. A quorum queue appends each settle frame to its log, and the
                    // broker's CPU per message follows the number of frames.
                    let until = Instant::now() + GATHER;
                    let mut closed = false;
                    while ops.len() < GATHER_OPS && !self.interrupted.load(Ordering::Relaxed) {
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        match queue.recv_timeout(left) {
                            Ok(more) => ops.extend(more),
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => {
                                closed = true;
                                break;
                            }
                        }
                    }
                    self.send(&mut ops, &mut prefix);
                    if closed {
                        self.send_held(&mut prefix);
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => self.send(&mut [], &mut prefix),
                Err(RecvTimeoutError::Disconnected) => {
                    // The source is dropped: nothing is held back any longer.
                    self.send_held(&mut prefix);
                    return;
                }
            }
            let mut expired = self.expire_local();
            if !expired.is_empty() {
                self.side.queued.add(expired.len() as u64);
                self.send(&mut expired, &mut prefix);
            }
        }
    }

    /// After an interrupt, cancels the consumer once, before any later frame: a nack sent
    /// after the interrupt must not bring its message straight back into this consumer's
    /// prefetch, where the connection's close would give it back a second time (and count
    /// a second attempt).
    pub(super) fn cancel_after_interrupt(&self) {
        if !self.interrupted.load(Ordering::SeqCst) {
            return;
        }
        // A second caller waits here until the first one's cancel is answered.
        let _cancelling = lock(&self.side.cancelling);
        if self.side.cancelled.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(link) = lock(&self.link).clone() else {
            return;
        };
        let tag = lock(&link.consumer).as_ref().map(Consumer::tag);
        if let Some(tag) = tag {
            let _ = self.bounded(SHUTDOWN_WAIT, Abort::OnClose, async {
                link.consume
                    .basic_cancel(tag, BasicCancelOptions::default())
                    .await
                    .map_err(|error| error.to_string())
            });
        }
    }

    /// Sends lease operations on the current link, as few frames as the ack prefix allows
    /// (see [`acks`]); an operation of a lost link is void (the broker gave its message
    /// back), and an ack among them is a late refusal.
    fn send(&self, ops: &mut [Op], prefix: &mut Prefix) {
        self.send_frames(ops, prefix, false);
    }

    /// Sends at once what the ack prefix holds back (the source is dropped).
    fn send_held(&self, prefix: &mut Prefix) {
        self.send_frames(&mut [], prefix, true);
    }

    /// [`Core::send`]; `force` sends what the prefix holds back at once.
    fn send_frames(&self, ops: &mut [Op], prefix: &mut Prefix, force: bool) {
        let link = lock(&self.link).clone();
        if self.adopted.load(Ordering::Relaxed) && !ops.is_empty() {
            self.dead_letter_adopted(link.as_deref(), ops);
        }
        let epoch = link.as_ref().map_or(0, |link| link.epoch);
        let mut void_acks = 0;
        // Operations done with: sent, or void.
        let mut answered = 0;
        if prefix.epoch() != epoch {
            // The old channel is gone, and the broker gave back what it held.
            let dropped = prefix.reset(epoch);
            void_acks += dropped.acks;
            answered += dropped.all;
        }
        for op in ops {
            if !(epoch != 0 && op.epoch == epoch && prefix.settle(op.tag, op.kind)) {
                void_acks += u64::from(op.kind == Settle::Ack);
                answered += 1;
            }
        }
        let mut frames = Vec::new();
        prefix.frames(Instant::now(), force, &mut frames);
        let mut settled = 0;
        let mut dead = 0;
        let mut requeued = 0;
        if let Some(link) = link.filter(|_| !frames.is_empty()) {
            // The frames are written in order; none waits for an answer (acks and nacks
            // have none), so the whole batch costs no round trip.
            let done = Cell::new(0);
            let sent = self.bounded(
                CONFIRM_TIMEOUT,
                Abort::OnClose,
                in_order(
                    frames.iter().map(|frame| {
                        let consume = &link.consume;
                        async move {
                            match frame.kind {
                                Settle::Ack => {
                                    consume
                                        .basic_ack(
                                            frame.tag,
                                            BasicAckOptions {
                                                multiple: frame.multiple,
                                            },
                                        )
                                        .await
                                }
                                Settle::Requeue | Settle::Dead => {
                                    consume
                                        .basic_nack(
                                            frame.tag,
                                            BasicNackOptions {
                                                multiple: frame.multiple,
                                                requeue: frame.kind == Settle::Requeue,
                                            },
                                        )
                                        .await
                                }
                            }
                        }
                    }),
                    &done,
                ),
            );
            match sent {
                Ok(_) => {}
                Err(Failure::Closed) => {}
                Err(failure) => self.lost(&link, &failure_text(&failure)),
            }
            let failed_at = done.get();
            for (i, frame) in frames.iter().enumerate() {
                answered += frame.count;
                if i < failed_at {
                    match frame.kind {
                        Settle::Ack => settled += frame.count,
                        Settle::Dead => dead += frame.count,
                        Settle::Requeue => requeued += frame.count,
                    }
                } else if frame.kind == Settle::Ack {
                    void_acks += frame.count;
                }
            }
        } else {
            // No link: whatever the prefix made frames of is void.
            for frame in &frames {
                answered += frame.count;
                if frame.kind == Settle::Ack {
                    void_acks += frame.count;
                }
            }
        }
        if requeued > 0 && self.side.cancelled.load(Ordering::SeqCst) {
            self.side.given_back.fetch_add(requeued, Ordering::SeqCst);
        }
        if settled + dead + void_acks > 0 {
            let mut stats = lock(&self.side.stats);
            stats.dead_lettered += dead;
            stats.late_refusals += void_acks;
            drop(stats);
            self.side
                .settled
                .fetch_add(settled + dead, Ordering::SeqCst);
        }
        self.answered(answered);
    }

    /// Waits until the queue of lease operations is empty, up to `timeout`; returns how
    /// many are left.
    pub(super) fn flush(&self, timeout: Duration) -> usize {
        self.side.queued.wait_drained(timeout, || false)
    }

    /// Counts sent lease operations and wakes `flush` when none is left.
    pub(super) fn answered(&self, count: u64) {
        self.side.queued.done(count);
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::{ByteArray, DecimalValue, FieldArray, LongString};

    use super::*;

    #[test]
    fn every_scalar_header_is_written_out_and_tables_are_left_out() {
        let cases = [
            (
                AMQPValue::LongString(LongString::from("plain")),
                Some("plain"),
            ),
            (
                AMQPValue::ShortString(ShortString::from("short")),
                Some("short"),
            ),
            (
                AMQPValue::ByteArray(ByteArray::from(&b"bytes"[..])),
                Some("bytes"),
            ),
            (AMQPValue::Boolean(true), Some("true")),
            (AMQPValue::ShortShortInt(-5), Some("-5")),
            (AMQPValue::ShortInt(-300), Some("-300")),
            (AMQPValue::LongInt(i32::MIN), Some("-2147483648")),
            (AMQPValue::LongLongInt(-7), Some("-7")),
            (AMQPValue::ShortShortUInt(255), Some("255")),
            (AMQPValue::LongUInt(42), Some("42")),
            (AMQPValue::Timestamp(u64::MAX), Some("18446744073709551615")),
            (AMQPValue::Float(1.5), Some("1.5")),
            (AMQPValue::Double(-0.25), Some("-0.25")),
            (
                AMQPValue::DecimalValue(DecimalValue {
                    scale: 2,
                    value: 12345,
                }),
                Some("123.45"),
            ),
            (
                AMQPValue::DecimalValue(DecimalValue { scale: 3, value: 5 }),
                Some("0.005"),
            ),
            (
                AMQPValue::DecimalValue(DecimalValue { scale: 0, value: 7 }),
                Some("7"),
            ),
            (AMQPValue::FieldArray(FieldArray::default()), None),
            (AMQPValue::FieldTable(FieldTable::default()), None),
            (AMQPValue::Void, None),
        ];
        for (value, want) in cases {
            assert_eq!(text(&value), Ok(want.map(str::to_owned)), "{value:?}");
        }
        let latin1 = AMQPValue::LongString(LongString::from(&b"\xff"[..]));
        assert_eq!(
            text(&latin1),
            Err(()),
            "a string that is not UTF-8 is refused"
        );
        let binary = AMQPValue::ByteArray(ByteArray::from(&b"\xff\x00"[..]));
        assert_eq!(text(&binary), Ok(None), "binary bytes are left out");
        assert_eq!(
            integer(&AMQPValue::LongInt(-1)),
            None,
            "no count is negative"
        );
    }
}
