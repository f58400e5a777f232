//! Coalesced acks: a handler task that succeeded does not ack its lease itself. It puts the
//! lease in its executor thread's buffer, and the buffer is acked in one batched call to the
//! source: by the task that fills it to [`FLUSH_AT`], or else by the thread's flusher task,
//! which the first lease put in an empty buffer wakes.
//!
//! One call and one lock of each lease-table shard serve a whole buffer instead of one
//! message, and the time of the ack is read once per buffer. A lease waits in a buffer for
//! at most the polls of the tasks queued ahead of the flusher, and never more than
//! [`FLUSH_AT`] of them: it stays in the lease table meanwhile, so it is extended as any
//! other lease, and holds its flow-control permit until the source took the ack.
//!
//! Nacks stay one call per message: they are the rare path (handler errors, panics,
//! cancellations), and a nack should give the message back at once.

use std::cell::Cell;
use std::sync::{Mutex, MutexGuard};
use std::task::{Poll, Waker};

use futures_lite::future;

use crate::pipeline::leaser::Finished;
use crate::sync;

/// A buffer holding this many finished leases is acked by the task that filled it (the
/// consumers' pull batch: one flush per pulled batch when handlers finish at once).
pub(crate) const FLUSH_AT: usize = 256;

thread_local! {
    /// The index of the executor thread running on this thread (0 elsewhere): which buffer
    /// the tasks polled here use. A thread runs the executor of one run only.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// One executor thread's buffer.
#[derive(Default)]
struct Buffer<'a> {
    /// Leases whose handler succeeded, in the order they finished.
    finished: Vec<Finished<'a>>,
    /// The flusher task, when it waits for an empty buffer to fill.
    flusher: Option<Waker>,
}

/// The buffers of finished leases, one per executor thread.
pub(crate) struct Acks<'a> {
    /// Indexed by the executor thread's index. Each has its own lock, which only the tasks of
    /// that thread and its flusher take (each thread runs an executor of its own: tasks are
    /// not stolen), so it is never contended.
    buffers: Box<[Mutex<Buffer<'a>>]>,
}

impl<'a> Acks<'a> {
    /// Buffers for `workers` executor threads.
    pub(crate) fn new(workers: usize) -> Self {
        Acks {
            buffers: (0..workers.max(1))
                .map(|_| Mutex::new(Buffer::default()))
                .collect(),
        }
    }

    /// Marks the calling thread as executor thread `index`.
    pub(crate) fn enter(index: usize) {
        WORKER.with(|worker| worker.set(index));
    }

    /// The index of the executor thread calling (0 on any other thread).
    pub(crate) fn worker() -> usize {
        WORKER.with(Cell::get)
    }

    /// Locks buffer `index`. A poisoned lock is taken over: nothing panics while holding it.
    fn buffer(&self, index: usize) -> MutexGuard<'_, Buffer<'a>> {
        sync::lock(&self.buffers[index % self.buffers.len()])
    }

    /// Puts a finished lease in the calling thread's buffer. Returns the buffer's content
    /// when it reached [`FLUSH_AT`]: the caller acks it at once.
    pub(crate) fn push(&self, finished: Finished<'a>) -> Option<Vec<Finished<'a>>> {
        let mut buffer = self.buffer(Self::worker());
        buffer.finished.push(finished);
        if buffer.finished.len() >= FLUSH_AT {
            return Some(std::mem::replace(
                &mut buffer.finished,
                Vec::with_capacity(FLUSH_AT),
            ));
        }
        let flusher = if buffer.finished.len() == 1 {
            buffer.flusher.take()
        } else {
            None
        };
        drop(buffer);
        // Woken outside the lock: waking schedules the task, which takes other locks.
        if let Some(flusher) = flusher {
            flusher.wake();
        }
        None
    }

    /// Takes what every buffer holds (the end of a run, once no task is left).
    pub(crate) fn take_all(&self) -> Vec<Finished<'a>> {
        let mut all = Vec::new();
        for index in 0..self.buffers.len() {
            all.append(&mut self.buffer(index).finished);
        }
        all
    }

    /// Waits until buffer `index` holds leases, then swaps them into `batch` (empty).
    pub(crate) async fn next_batch(&self, index: usize, batch: &mut Vec<Finished<'a>>) {
        future::poll_fn(|cx| {
            let mut buffer = self.buffer(index);
            if buffer.finished.is_empty() {
                buffer.flusher = Some(cx.waker().clone());
                Poll::Pending
            } else {
                std::mem::swap(&mut buffer.finished, batch);
                Poll::Ready(())
            }
        })
        .await;
    }
}
