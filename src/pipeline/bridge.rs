//! The sync-to-async bridge: the loop each executor thread runs.
//!
//! Consumer threads push held leases into a bounded `async_channel` with `send_blocking`;
//! here, inside `Executor::run`, each executor thread receives them with `recv().await` and
//! spawns one task per message.

use async_executor::{Executor, Task};
use futures_lite::future;

use crate::handler::Handler;
use crate::pipeline::leaser::LeaseGuard;
use crate::pipeline::Shared;

/// Most deliveries a worker takes from the hand-off channel and spawns at once.
const SPAWN_BATCH: usize = 32;

/// Runs one executor thread: spawns a task per received lease until the hand-off channel is
/// closed and drained, then keeps running the tasks until `stop` is closed.
///
/// # Blocking
///
/// Blocks the calling thread (an executor thread) until `stop` is closed.
pub(crate) fn run_executor_thread<'a, H: Handler>(
    executor: &Executor<'a>,
    shared: &'a Shared<'a, H>,
    handoff: async_channel::Receiver<LeaseGuard<'a>>,
    stop: async_channel::Receiver<()>,
) {
    future::block_on(executor.run(async {
        // Taking what else is queued in the same go locks the executor's task table once per
        // batch; after shutdown began the batch is given back instead.
        let mut batch = Vec::with_capacity(SPAWN_BATCH);
        let mut tasks = Vec::with_capacity(SPAWN_BATCH);
        while let Ok(first) = handoff.recv().await {
            batch.push(first);
            while batch.len() < SPAWN_BATCH {
                match handoff.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            if shared.shutdown.is_triggered() {
                shared.leaser.nack_all(std::mem::take(&mut batch));
                continue;
            }
            executor.spawn_many(
                batch.drain(..).map(|guard| shared.handle(guard)),
                &mut tasks,
            );
            tasks.drain(..).for_each(Task::detach);
            // `Executor::run` polls this loop before the tasks it runs: without a yield, a
            // hand-off channel that never runs dry (a large window filling up) would have the
            // thread spawn tasks and never run them, so no handler would finish until the
            // window was full. Yielding after each batch lets the executor run its tasks (up
            // to 200 between two polls of this loop).
            future::yield_now().await;
        }
        // The channel is closed and drained: keep running the tasks until stopped.
        let _ = stop.recv().await;
    }));
}
