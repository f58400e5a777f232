//! The sync-to-async bridge: the loop each executor thread runs.
//!
//! Consumer threads push the held leases of each pull, as one batch, into an `async_channel`
//! with `send_blocking`; here, inside `Executor::run`, each executor thread receives batches
//! with `recv().await` and spawns one task per message, as fast as the executor starts them.

use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use async_executor::{Executor, Task};
use futures_lite::future;

use crate::handler::Handler;
use crate::pipeline::acker::Acks;
use crate::pipeline::leaser::LeaseGuard;
use crate::pipeline::Shared;
use crate::source::PULL_BATCH;

/// One pull's leases handed to the executor threads, and when: the handling time of each
/// (in the report and `/metrics`) runs from there to its ack, so that it counts the wait for
/// a first poll, in the channel or in the executor's queue.
pub(crate) struct Batch<'l> {
    pub(crate) guards: Vec<LeaseGuard<'l>>,
    pub(crate) handed: Instant,
}

/// Tasks spawned and not yet first polled above which an executor thread waits before it
/// spawns the next batch: a few batches, enough to keep the thread busy. Meanwhile the
/// other threads take the next batches from the channel.
const UNSTARTED_LIMIT: isize = 4 * PULL_BATCH as isize;

/// The most rounds of the executor (up to 200 tasks run each) an executor thread waits for
/// the tasks spawned before to start.
const MAX_YIELDS: usize = 64;

/// Tasks spawned and not yet first polled, counted per executor thread. Each thread runs an
/// executor of its own, so a task starts on the thread that spawned it: each count is exact,
/// and only its own thread's tasks can bring it down.
pub(crate) struct Unstarted {
    counts: Box<[Count]>,
}

/// One executor thread's count, on a cache line of its own.
#[repr(align(128))]
struct Count(AtomicIsize);

impl Unstarted {
    /// Counts for `workers` executor threads.
    pub(crate) fn new(workers: usize) -> Self {
        Unstarted {
            counts: (0..workers.max(1))
                .map(|_| Count(AtomicIsize::new(0)))
                .collect(),
        }
    }

    /// The calling executor thread's count.
    fn own(&self) -> &AtomicIsize {
        &self.counts[Acks::worker() % self.counts.len()].0
    }

    /// Adds `delta` to the calling executor thread's count.
    fn add(&self, delta: isize) {
        self.own().fetch_add(delta, Ordering::Relaxed);
    }

    /// A task's first poll: one fewer waits to start.
    pub(crate) fn started(&self) {
        self.add(-1);
    }

    /// How many tasks of the calling executor thread wait for their first poll.
    fn waiting(&self) -> isize {
        self.own().load(Ordering::Relaxed)
    }
}

/// Runs executor thread `index` on its own `executor`: spawns its ack flusher, then a task
/// per lease of each batch received, until the hand-off channel is closed and drained; then
/// keeps running the tasks until `stop` is closed.
///
/// # Blocking
///
/// Blocks the calling thread (an executor thread) until `stop` is closed.
pub(crate) fn run_executor_thread<'a, 'l: 'a, H: Handler>(
    executor: &Executor<'a>,
    shared: &'a Shared<'a, H>,
    acks: &'a Acks<'l>,
    index: usize,
    handoff: async_channel::Receiver<Batch<'l>>,
    stop: async_channel::Receiver<()>,
) {
    Acks::enter(index);
    executor.spawn(shared.flush_acks(acks, index)).detach();
    future::block_on(executor.run(async {
        let mut tasks = Vec::with_capacity(PULL_BATCH);
        // A batch is the leases of one pull: one receive, and one lock of the executor's
        // task table, serve all of them.
        while let Ok(Batch { guards, handed }) = handoff.recv().await {
            if shared.shutdown.is_triggered() {
                shared.leaser.nack_all(guards);
                continue;
            }
            // Each task's future is boxed: between here and the task's allocation the
            // executor moves it several times, and a boxed future (its state is most of a
            // kilobyte) moves as a pointer. One allocation more per message cost less than
            // the copies: the process's CPU time for 3M no-op messages fell by about 9 %.
            let spawned = Instant::now();
            executor.spawn_many(
                guards
                    .into_iter()
                    .map(|guard| Box::pin(shared.handle(acks, guard, handed, spawned))),
                &mut tasks,
            );
            shared.unstarted.add(tasks.len() as isize);
            tasks.drain(..).for_each(Task::detach);
            // `Executor::run` polls this loop before the tasks it runs: without a yield, a
            // hand-off channel that never runs dry (a large window filling up) would have the
            // thread spawn tasks and never run them, so no handler would finish until the
            // window was full. Yielding after each batch lets the executor run its tasks (up
            // to 200 between two polls of this loop). It yields until few tasks wait for
            // their first poll: the executor's queue is first in, first out, so a task woken
            // (its handler's timer fired) runs after every task spawned before it. Spawning a
            // large window at once (2,000,000 leases pulled in a second) put the wake-ups of
            // the first handlers behind all of them, and the acks waited seconds for the
            // window's first polls. The leases not spawned yet stay held in the channel.
            // At most MAX_YIELDS rounds: tasks started is what it waits for, and each round
            // starts up to 200; a count that cannot fall must not stop the spawning.
            for _ in 0..MAX_YIELDS {
                future::yield_now().await;
                if shared.unstarted.waiting() <= UNSTARTED_LIMIT {
                    break;
                }
            }
        }
        // The channel is closed and drained: keep running the tasks until stopped.
        let _ = stop.recv().await;
    }));
}
