//! The lease-operation worker every remote source runs: handlers queue their acks, nacks
//! and extensions without waiting for a round trip, and one thread sends them in batches.
//!
//! The queue counts what it holds in an [`Outstanding`], which the thread counts down as
//! the broker answers, so `flush` can wait for the queue to drain. A source's threads end
//! within a bounded wait when it is dropped: one stuck on a stalled broker is left to end
//! at its socket timeout.

use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{error, warn};

use crate::error::SourceError;
use crate::sync::Outstanding;

/// A thread that sends queued lease operations of type `Op`, and its queue.
#[derive(Debug)]
pub(crate) struct Worker<Op> {
    /// The queue; `None` once closed.
    queue: Option<mpsc::Sender<Vec<Op>>>,
    /// The thread; `None` once joined.
    thread: Option<JoinHandle<()>>,
}

impl<Op: Send + 'static> Worker<Op> {
    /// Starts the thread `name`, which runs `run` on the receiving end of the queue; `run`
    /// returns once the queue is closed and drained.
    ///
    /// # Errors
    ///
    /// [`SourceError::Backend`] when the thread cannot be started.
    pub(crate) fn spawn(
        name: &str,
        run: impl FnOnce(mpsc::Receiver<Vec<Op>>) + Send + 'static,
    ) -> Result<Self, SourceError> {
        let (queue, receiver) = mpsc::channel();
        let thread = spawn(name, move || run(receiver))?;
        Ok(Worker {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Queues `ops`, counted in `queued`. When the thread is gone (only while the source is
    /// dropped) they are counted as answered at once: the caller's broker gives their
    /// messages back by itself (an ack deadline, a closed connection), so none is lost.
    pub(crate) fn send(&self, queued: &Outstanding, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        let count = ops.len() as u64;
        queued.add(count);
        let sent = self
            .queue
            .as_ref()
            .is_some_and(|queue| queue.send(ops).is_ok());
        if !sent {
            queued.done(count);
        }
    }

    /// Closes the queue: the thread ends once it has sent what is queued.
    pub(crate) fn close(&mut self) {
        self.queue = None;
    }

    /// Waits for the thread until `end` ([`join_by`]).
    pub(crate) fn join_by(&mut self, end: Instant, what: &str) {
        if let Some(thread) = self.thread.take() {
            join_by(thread, end, what);
        }
    }
}

/// Starts a thread named `name`.
///
/// # Errors
///
/// [`SourceError::Backend`] when it cannot be started.
pub(crate) fn spawn(
    name: &str,
    run: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, SourceError> {
    thread::Builder::new()
        .name(name.into())
        .spawn(run)
        .map_err(|error| SourceError::Backend(format!("cannot start a thread: {error}")))
}

/// Joins `thread` if it ends by `end`; else leaves it (one blocked on a stalled broker
/// ends by itself at its socket timeout, and the exit does not wait for it). Logs a panic
/// of the thread, or that it was left, naming it `what`.
pub(crate) fn join_by(thread: JoinHandle<()>, end: Instant, what: &str) {
    while !thread.is_finished() && Instant::now() < end {
        thread::sleep(Duration::from_millis(5));
    }
    if !thread.is_finished() {
        warn!("the {what} thread is still waiting on the broker; not waiting for it");
    } else if thread.join().is_err() {
        error!("the {what} thread panicked");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn what_is_queued_reaches_the_thread_and_is_counted_until_answered() {
        let queued = Arc::new(Outstanding::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (thread_queued, thread_seen) = (Arc::clone(&queued), Arc::clone(&seen));
        let mut worker = Worker::spawn("kit-test", move |receiver| {
            for ops in receiver {
                let count = ops.len() as u64;
                thread_seen.lock().unwrap().extend(ops);
                thread_queued.done(count);
            }
        })
        .unwrap();
        worker.send(&queued, vec![1, 2]);
        worker.send(&queued, Vec::new());
        worker.send(&queued, vec![3]);
        assert_eq!(queued.wait_drained(Duration::from_secs(10), || false), 0);
        worker.close();
        worker.join_by(Instant::now() + Duration::from_secs(10), "kit test");
        assert_eq!(*seen.lock().unwrap(), [1, 2, 3]);
        // Closed: what is sent now is counted as answered at once.
        worker.send(&queued, vec![4]);
        assert_eq!(queued.count(), 0);
    }

    #[test]
    fn a_thread_that_does_not_end_is_left_by_the_deadline() {
        let (release, blocked) = mpsc::channel::<()>();
        let thread = spawn("kit-stuck", move || {
            let _ = blocked.recv();
        })
        .unwrap();
        let start = Instant::now();
        join_by(thread, start + Duration::from_millis(20), "kit test");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "it did not wait for the thread"
        );
        release.send(()).unwrap();
    }
}
