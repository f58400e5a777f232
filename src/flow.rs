//! Flow control and cancellation: the two small synchronisation tools of the runner.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use event_listener::Event;

/// Bounds the messages in flight: pulled and not yet acked or nacked.
///
/// Consumers take permits before they pull (blocking while none is free); whoever settles a
/// delivery gives its permit back. The count is an atomic, so the per-message path takes no
/// lock; the mutex and condition variable serve only threads that must wait, and a release
/// notifies only when some thread waits (the SeqCst pair `in_flight`/`waiters` makes a lost
/// wake-up impossible: a waiter re-checks `in_flight` after announcing itself).
#[derive(Debug)]
pub(crate) struct Gate {
    /// The most permits out at once.
    limit: usize,
    /// Permits out now.
    in_flight: AtomicUsize,
    /// Threads waiting for permits or for idleness.
    waiters: AtomicUsize,
    /// Set on shutdown: `acquire` returns 0 from then on.
    closed: AtomicBool,
    /// Guards the waits on `changed`.
    lock: Mutex<()>,
    /// Signalled when permits come back or the gate closes.
    changed: Condvar,
}

impl Gate {
    /// A gate allowing `limit` permits.
    pub(crate) fn new(limit: usize) -> Self {
        Gate {
            limit,
            in_flight: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            lock: Mutex::new(()),
            changed: Condvar::new(),
        }
    }

    /// Takes between 1 and `max` permits, blocking while none is free; 0 once closed.
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread (a consumer thread).
    pub(crate) fn acquire(&self, max: usize) -> usize {
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return 0;
            }
            let current = self.in_flight.load(Ordering::SeqCst);
            if current < self.limit {
                let take = max.min(self.limit - current);
                if self
                    .in_flight
                    .compare_exchange(current, current + take, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    return take;
                }
                continue;
            }
            let guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.waiters.fetch_add(1, Ordering::SeqCst);
            if self.in_flight.load(Ordering::SeqCst) >= self.limit
                && !self.closed.load(Ordering::SeqCst)
            {
                drop(
                    self.changed
                        .wait(guard)
                        .unwrap_or_else(PoisonError::into_inner),
                );
            }
            self.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Gives `count` permits back.
    pub(crate) fn release(&self, count: usize) {
        if count == 0 {
            return;
        }
        self.in_flight.fetch_sub(count, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.changed.notify_all();
        }
    }

    /// Permits out now.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Makes `acquire` return 0 and wakes the threads blocked in it.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.changed.notify_all();
    }

    /// Blocks until no permit is out or `timeout` passes; returns whether it became idle.
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread (the thread of `run`).
    pub(crate) fn wait_idle(&self, timeout: Duration) -> bool {
        let end = Instant::now().checked_add(timeout);
        let mut guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let idle = loop {
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                break true;
            }
            let left = match end {
                Some(end) => end.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                break false;
            }
            guard = self
                .changed
                .wait_timeout(guard, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        idle
    }
}

/// A one-shot broadcast that tells every handler task to stop at once.
#[derive(Debug, Default)]
pub(crate) struct Cancel {
    /// Set once; never cleared.
    cancelled: AtomicBool,
    /// Wakes the tasks waiting in `cancelled()`.
    event: Event,
}

impl Cancel {
    /// Cancels every task waiting now or later.
    pub(crate) fn trigger(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.event.notify(usize::MAX);
    }

    /// Completes once cancelled.
    pub(crate) async fn cancelled(&self) {
        loop {
            if self.cancelled.load(Ordering::SeqCst) {
                return;
            }
            let listener = self.event.listen();
            // Checked again after listening, so a trigger in between is not missed.
            if self.cancelled.load(Ordering::SeqCst) {
                return;
            }
            listener.await;
        }
    }
}
