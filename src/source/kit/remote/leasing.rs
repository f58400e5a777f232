//! [`Leasing`]: the `Source` methods on a [`Broker`], the `Source` impl they make
//! ([`leasing_source!`]), and a batch's publish requests sent several at once ([`in_lanes`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::warn;

use super::{Broker, DeadLetter, Leasing, Op, Shared, POLL_MAX, SHUTDOWN_WAIT};
use crate::error::SourceError;
use crate::message::PubSubMessage;
use crate::shutdown::ShutdownReason;
use crate::source::kit::{End, Held, HttpError, Placed, Refused, Worker};
use crate::source::{Lease, LeaseId, SourceStats};
use crate::sync::lock;

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

    /// Ends leases: each held one ends as `end_of` its attempt says, and becomes the
    /// operation `op` makes of it (the leases held back behind a returned one are given
    /// back); the rest are refused.
    fn end_all(
        &self,
        ids: &[LeaseId],
        refused: &mut Vec<LeaseId>,
        end_of: impl Fn(u32) -> End,
        op: impl Fn(&Held<B::Handle>, End) -> Op<B::Handle>,
    ) {
        let now = Instant::now();
        let mut ops = Vec::with_capacity(ids.len());
        let mut expired = 0;
        let mut table = lock(&self.shared.holds);
        for &id in ids {
            let end = table.attempt_of(id).map_or(End::Returned, &end_of);
            match table.take(id, now, end) {
                Ok((held, behind)) => {
                    if end == End::Settled {
                        table.forget(&held);
                    }
                    ops.push(op(&held, end));
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
            |_| End::Settled,
            |held, _| Op::Ack(held.handle.clone()),
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
        self.end_all(
            leases,
            refused,
            |attempt| {
                if attempt >= max {
                    End::Settled
                } else {
                    End::Returned
                }
            },
            |held, end| match end {
                End::Settled => dead(held, format!("nacked on attempt {} of {max}", held.attempt)),
                End::Returned => Op::Modify(held.handle.clone(), 0),
            },
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
            |_| End::Settled,
            |held, _| dead(held, reason.to_owned()),
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
