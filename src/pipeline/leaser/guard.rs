//! A lease's guard ([`LeaseGuard`]): the message, its settle, its drop (nack and permit back),
//! and the future telling its handler that the lease was lost or cancelled ([`Interruption`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};

use slab::Slab;

use super::{Entry, LeaseGuard, Leaser, Settle, State};
use crate::handler::ExtensionCount;
use crate::message::PubSubMessage;

impl<'a> Leaser<'a> {
    /// Marks a lease's handler as started and registers the waker of its task; returns
    /// whether the lease was lost already.
    pub(super) fn start_handling(&self, guard: &LeaseGuard<'_>, waker: &Waker) -> bool {
        let mut table = self.shard(guard.shard);
        match table.get_mut(guard.slot as usize) {
            Some(entry) if entry.id == guard.id => {
                entry.handling = true;
                entry.waker = Some(waker.clone());
                entry.state == State::Lost
            }
            _ => true,
        }
    }

    /// Whether a lease was lost.
    pub(super) fn is_lost(&self, guard: &LeaseGuard<'_>) -> bool {
        let table = self.shard(guard.shard);
        match table.get(guard.slot as usize) {
            Some(entry) if entry.id == guard.id => entry.state == State::Lost,
            _ => true,
        }
    }
}

impl<'a> LeaseGuard<'a> {
    /// The message.
    pub(crate) fn message(&self) -> &PubSubMessage {
        &self.message
    }

    /// Which delivery of the message this is.
    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The bytes the message counts for in flow control.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// Records that the consumer counted this lease's size in the bytes handed to
    /// handlers ([`Gate::take_bytes`](crate::pipeline::flow::Gate::take_bytes) and the
    /// gauge); dropping the guard takes it off again.
    pub(crate) fn count_size(&mut self) {
        self.size_counted = true;
    }

    /// Removes this guard's entry from its shard's `table` (locked by the caller), if the slot
    /// still holds it. Only the guard removes its entry, and it settles once, so `None` is
    /// not reached in practice; it is treated as a lost lease.
    pub(super) fn take_entry(&self, table: &mut Slab<Entry>) -> Option<Entry> {
        match table.get(self.slot as usize) {
            Some(entry) if entry.id == self.id => Some(table.remove(self.slot as usize)),
            _ => None,
        }
    }

    /// Gives the message back for another delivery.
    pub(crate) fn nack(mut self) -> Settle {
        self.settled = true;
        self.leaser.settle_nack(&self)
    }

    /// Dead-letters the message at once with `reason`: it can never succeed.
    pub(crate) fn reject(mut self, reason: &str) -> Settle {
        self.settled = true;
        self.leaser.settle_reject(&self, reason)
    }

    /// Completes when the lease is lost (the source refused to extend it) or the handlers
    /// are cancelled. Its first poll marks the handler as started.
    pub(crate) fn interrupted(&self) -> Interruption<'_, 'a> {
        Interruption {
            guard: self,
            seen_epoch: None,
        }
    }
}

impl ExtensionCount for LeaseGuard<'_> {
    fn extensions(&self) -> u32 {
        let table = self.leaser.shard(self.shard);
        match table.get(self.slot as usize) {
            Some(entry) if entry.id == self.id => entry.extended,
            _ => 0,
        }
    }
}

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.settled = true;
            // Whatever the outcome, the message is not lost: a refused or failed nack leaves
            // the lease to expire at the source.
            let _ = self.leaser.settle_nack(self);
        }
        self.leaser.gate.release(1);
        if self.size_counted {
            // The gauge first, then the gate: a consumer adds to the gauge only after the
            // gate let it take, so the gauge never shows more than the gate holds.
            self.leaser.metrics.sub_held_bytes(self.size);
            self.leaser.gate.release_bytes(self.size);
        }
    }
}

/// Why a handler was interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interrupted {
    /// The source took its lease back.
    Lost,
    /// The grace period is over.
    Cancelled,
}

/// The future of [`LeaseGuard::interrupted`].
#[derive(Debug)]
pub(crate) struct Interruption<'g, 'a> {
    /// The lease watched.
    guard: &'g LeaseGuard<'a>,
    /// The lost epoch when last checked; `None` before the first poll.
    seen_epoch: Option<u64>,
}

impl Future for Interruption<'_, '_> {
    type Output = Interrupted;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Interrupted> {
        let leaser = self.guard.leaser;
        // Read before the table: a loss recorded after this load bumps the epoch again, so
        // the next poll looks at the table.
        let epoch = leaser.lost_epoch.load(Ordering::SeqCst);
        let lost = match self.seen_epoch {
            None => leaser.start_handling(self.guard, cx.waker()),
            Some(seen) if seen == epoch => false,
            Some(_) => leaser.is_lost(self.guard),
        };
        self.seen_epoch = Some(epoch);
        if lost {
            Poll::Ready(Interrupted::Lost)
        } else if leaser.is_cancelled() {
            // Checked after the waker is registered: a cancellation that came before saw no
            // waker to wake, but set the flag first.
            Poll::Ready(Interrupted::Cancelled)
        } else {
            Poll::Pending
        }
    }
}
