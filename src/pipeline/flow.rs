//! Flow control: the window of leases held (and reserved for a pull).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use std::sync::{Condvar, Mutex};

use crate::metrics::Striped;
use crate::sync;
use std::time::{Duration, Instant};

/// Longest wait of a consumer for bytes before it looks again (see [`Gate::take_bytes`]).
const BYTES_RECHECK: Duration = Duration::from_millis(5);

/// Bounds the messages in flight: pulled and not yet acked or nacked.
///
/// Consumers take permits before they pull (blocking while none is free); whoever settles a
/// delivery gives its permit back. The count is an atomic, so the per-message path takes no
/// lock; the mutex and condition variable serve only threads that must wait, and a release
/// notifies only when some thread waits (the SeqCst pair `in_flight`/`waiters` makes a lost
/// wake-up impossible: a waiter re-checks `in_flight` after announcing itself).
///
/// A blocked consumer waits for `wake_at` free permits, not one: it then pulls a batch, and a
/// full window costs one wake-up per batch instead of one per message.
#[derive(Debug)]
pub(crate) struct Gate {
    /// The most permits out at once. An atomic because `--max-in-flight auto` moves it
    /// while consumers take permits (see `window`); fixed otherwise.
    limit: AtomicUsize,
    /// The most permits a blocked `acquire` waits for: it wakes once this many (at most an
    /// eighth of the current limit, at least one) are free.
    batch: usize,
    /// Permits out now: leases held plus permits reserved by consumers for a pull. (The
    /// service's in-flight gauge counts leases held only; the lease manager keeps it.)
    in_flight: AtomicUsize,
    /// Bytes ever handed to handlers ([`PubSubMessage::size`](crate::PubSubMessage::size)):
    /// consumers add a pull's worth at once, with a compare-and-swap, so that two consumers
    /// never take the same room.
    bytes_taken: AtomicU64,
    /// Bytes ever given back by settled messages: striped, as every settled message gives
    /// its bytes back from its executor thread (one shared atomic would bounce between
    /// them). `bytes_taken` minus this is what handlers hold.
    bytes_given: Striped,
    /// Most bytes handed to handlers at once (flow control by size); a single message
    /// larger than this is handed over alone.
    max_bytes: usize,
    /// Threads waiting for permits or for idleness.
    waiters: AtomicUsize,
    /// Consumers waiting for bytes ([`Gate::take_bytes`]): a release of bytes notifies only
    /// when there are some, so that settling a message wakes no consumer that waits for
    /// permits (a wake-up per message took a context switch per message).
    byte_waiters: AtomicUsize,
    /// Set on shutdown: `acquire` returns 0 from then on.
    closed: AtomicBool,
    /// Guards the waits on `changed`.
    lock: Mutex<()>,
    /// Signalled when permits come back or the gate closes.
    changed: Condvar,
}

impl Gate {
    /// A gate allowing `limit` permits; blocked takers wake once `batch` permits (at most an
    /// eighth of the window, at least one) are free.
    #[cfg(test)]
    pub(crate) fn new(limit: usize, batch: usize) -> Self {
        Gate::with_bytes(limit, batch, usize::MAX)
    }

    /// [`Gate::new`], also waiting while the messages held count `max_bytes` or more.
    pub(crate) fn with_bytes(limit: usize, batch: usize, max_bytes: usize) -> Self {
        Gate {
            limit: AtomicUsize::new(limit),
            batch,
            in_flight: AtomicUsize::new(0),
            bytes_taken: AtomicU64::new(0),
            bytes_given: Striped::default(),
            max_bytes,
            waiters: AtomicUsize::new(0),
            byte_waiters: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            lock: Mutex::new(()),
            changed: Condvar::new(),
        }
    }

    /// Takes between 1 and `max` permits; 0 once closed. While the window is full it blocks
    /// until `wake_at` permits are free (or the gate closes).
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread (a consumer thread).
    pub(crate) fn acquire(&self, max: usize) -> usize {
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return 0;
            }
            let limit = self.limit();
            let current = self.in_flight.load(Ordering::SeqCst);
            if current < limit {
                let take = max.min(limit - current);
                if self
                    .in_flight
                    .compare_exchange(current, current + take, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    return take;
                }
                continue;
            }
            let guard = sync::lock(&self.lock);
            self.waiters.fetch_add(1, Ordering::SeqCst);
            let limit = self.limit();
            if self.in_flight.load(Ordering::SeqCst) + self.wake_at(limit) > limit
                && !self.closed.load(Ordering::SeqCst)
            {
                drop(sync::wait(&self.changed, guard));
            }
            self.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Gives `count` permits back.
    pub(crate) fn release(&self, count: usize) {
        if count == 0 {
            return;
        }
        let before = self.in_flight.fetch_sub(count, Ordering::SeqCst);
        let after = before - count;
        // Wake only on the edges a waiter waits for: enough room for a batch, or idle. (A
        // limit lowered below the permits out has no such edge until they come back; a
        // limit raised wakes the waiters itself, in `set_limit`.)
        let limit = self.limit();
        let threshold = limit.saturating_sub(self.wake_at(limit));
        let edge = (before > threshold && after <= threshold) || after == 0;
        if edge && self.waiters.load(Ordering::SeqCst) > 0 {
            let _guard = sync::lock(&self.lock);
            self.changed.notify_all();
        }
    }

    /// The most permits out at once now.
    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::SeqCst)
    }

    /// How many free permits wake a blocked `acquire` under `limit`.
    fn wake_at(&self, limit: usize) -> usize {
        self.batch.min(limit / 8).max(1)
    }

    /// Moves the limit (`--max-in-flight auto`). Lowered, it takes effect as permits come
    /// back (none is taken away); raised, it wakes the blocked takers at once.
    pub(crate) fn set_limit(&self, limit: usize) {
        let before = self.limit.swap(limit.max(1), Ordering::SeqCst);
        if limit > before && self.waiters.load(Ordering::SeqCst) > 0 {
            let _guard = sync::lock(&self.lock);
            self.changed.notify_all();
        }
    }

    /// Counts the first messages of `sizes` as handed to handlers: as many as fit under
    /// `max_bytes` with the bytes already handed over, and at least one when nothing is
    /// handed over (a message larger than the limit goes alone, so no size deadlocks).
    /// Returns how many; 0 once closed. While none fits it blocks until settled messages
    /// make room.
    ///
    /// The leases waiting here are held and extended like the others, as python-pubsub
    /// holds the messages its byte limit keeps from the callbacks.
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread (a consumer thread).
    pub(crate) fn take_bytes(&self, sizes: &[usize]) -> usize {
        loop {
            if self.closed.load(Ordering::SeqCst) || sizes.is_empty() {
                return 0;
            }
            let taken = self.bytes_taken.load(Ordering::SeqCst);
            let current = self.held_bytes(taken);
            let mut total = current;
            let mut fit = 0;
            for &size in sizes {
                match total.checked_add(size) {
                    Some(next) if next <= self.max_bytes || (fit == 0 && current == 0) => {
                        total = next;
                        fit += 1;
                    }
                    _ => break,
                }
            }
            if fit > 0 {
                let added = (total - current) as u64;
                if self
                    .bytes_taken
                    .compare_exchange(
                        taken,
                        taken.wrapping_add(added),
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    )
                    .is_ok()
                {
                    return fit;
                }
                continue;
            }
            let guard = sync::lock(&self.lock);
            self.byte_waiters.fetch_add(1, Ordering::SeqCst);
            if self.held_bytes(self.bytes_taken.load(Ordering::SeqCst)) == current
                && !self.closed.load(Ordering::SeqCst)
            {
                // Bounded: the bytes given back are counted in relaxed stripes, so a release
                // racing with this check may not be seen by it and skip the notify; the
                // next look is then at most this late. (A fence per settled message would
                // close the race at a cost to every message.)
                drop(sync::wait_timeout(&self.changed, guard, BYTES_RECHECK));
            }
            self.byte_waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Counts `bytes` as handed to handlers when they fit under the limit with what is
    /// handed over already; returns whether they did (nothing is counted otherwise).
    pub(crate) fn try_take_all(&self, bytes: usize) -> bool {
        loop {
            let taken = self.bytes_taken.load(Ordering::SeqCst);
            match self.held_bytes(taken).checked_add(bytes) {
                Some(total) if total <= self.max_bytes => {}
                _ => return false,
            }
            if self
                .bytes_taken
                .compare_exchange(
                    taken,
                    taken.wrapping_add(bytes as u64),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
            {
                return true;
            }
        }
    }

    /// Counts `count` bytes fewer handed to handlers; wakes the consumers waiting in
    /// [`Gate::take_bytes`].
    pub(crate) fn release_bytes(&self, count: usize) {
        if count == 0 {
            return;
        }
        self.bytes_given.add(count as u64);
        if self.byte_waiters.load(Ordering::SeqCst) > 0 {
            let _guard = sync::lock(&self.lock);
            self.changed.notify_all();
        }
    }

    /// Bytes handed to handlers and not given back, with `taken` read by the caller.
    fn held_bytes(&self, taken: u64) -> usize {
        usize::try_from(taken.wrapping_sub(self.bytes_given.sum())).unwrap_or(usize::MAX)
    }

    /// Bytes of the messages held now.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.held_bytes(self.bytes_taken.load(Ordering::SeqCst))
    }

    /// Permits out now.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Makes `acquire` return 0 and wakes the threads blocked in it.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _guard = sync::lock(&self.lock);
        self.changed.notify_all();
    }

    /// Blocks until no permit is out or `timeout` passes; returns whether it became idle.
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread (the thread of `run`).
    pub(crate) fn wait_idle(&self, timeout: Duration) -> bool {
        let end = Instant::now().checked_add(timeout);
        let mut guard = sync::lock(&self.lock);
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
            guard = sync::wait_timeout(&self.changed, guard, left).0;
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        idle
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;

    #[test]
    fn acquire_takes_what_is_free_up_to_max() {
        let gate = Gate::new(10, 1);
        assert_eq!(gate.acquire(4), 4);
        assert_eq!(gate.acquire(100), 6);
        assert_eq!(gate.in_flight(), 10);
        gate.release(3);
        assert_eq!(gate.acquire(2), 2);
        assert_eq!(gate.in_flight(), 9);
    }

    #[test]
    fn a_blocked_acquire_waits_for_a_batch_of_free_permits() {
        // Window 64, batch 8: a taker blocked on a full window needs 8 free permits.
        let gate = Arc::new(Gate::new(64, 8));
        assert_eq!(gate.acquire(64), 64);
        let taker = {
            let gate = gate.clone();
            thread::spawn(move || gate.acquire(64))
        };
        for _ in 0..8 {
            gate.release(1);
        }
        assert_eq!(taker.join().unwrap(), 8);
        assert_eq!(gate.in_flight(), 64);
    }

    #[test]
    fn a_raised_limit_wakes_a_blocked_acquire_and_a_lowered_one_waits_for_permits() {
        let gate = Arc::new(Gate::new(4, 1));
        assert_eq!(gate.acquire(4), 4);
        let taker = {
            let gate = gate.clone();
            thread::spawn(move || gate.acquire(10))
        };
        gate.set_limit(8);
        assert_eq!(taker.join().unwrap(), 4);
        // Lowered below the permits out: nothing more until enough come back.
        gate.set_limit(2);
        gate.release(7);
        assert_eq!(gate.in_flight(), 1);
        assert_eq!(gate.acquire(10), 1);
    }

    #[test]
    fn bytes_are_handed_over_up_to_the_limit_and_a_large_message_alone() {
        let gate = Arc::new(Gate::with_bytes(100, 1, 1000));
        assert_eq!(gate.take_bytes(&[400, 400, 400]), 2);
        assert_eq!(gate.bytes(), 800);
        gate.release_bytes(800);
        // Larger than the whole limit: it goes, alone, when nothing else is handed over.
        assert_eq!(gate.take_bytes(&[5000, 10]), 1);
        let taker = {
            let gate = gate.clone();
            thread::spawn(move || gate.take_bytes(&[10, 990, 1]))
        };
        // The taker can only go once the large one is settled; then two of three fit.
        gate.release_bytes(5000);
        assert_eq!(taker.join().unwrap(), 2);
        assert_eq!(gate.bytes(), 1000);
    }

    #[test]
    fn close_wakes_a_consumer_waiting_for_bytes() {
        let gate = Arc::new(Gate::with_bytes(100, 1, 10));
        assert_eq!(gate.take_bytes(&[10]), 1);
        let taker = {
            let gate = gate.clone();
            thread::spawn(move || gate.take_bytes(&[5]))
        };
        gate.close();
        assert_eq!(taker.join().unwrap(), 0);
    }

    #[test]
    fn close_wakes_a_blocked_acquire_with_zero() {
        let gate = Arc::new(Gate::new(2, 1));
        assert_eq!(gate.acquire(2), 2);
        let taker = {
            let gate = gate.clone();
            thread::spawn(move || gate.acquire(1))
        };
        gate.close();
        assert_eq!(taker.join().unwrap(), 0);
        assert_eq!(gate.acquire(1), 0);
    }

    #[test]
    fn wait_idle_reports_whether_every_permit_came_back() {
        let gate = Arc::new(Gate::new(4, 1));
        assert!(gate.wait_idle(Duration::ZERO));
        gate.acquire(3);
        assert!(!gate.wait_idle(Duration::from_millis(1)));
        let releaser = {
            let gate = gate.clone();
            thread::spawn(move || (0..3).for_each(|_| gate.release(1)))
        };
        assert!(gate.wait_idle(Duration::from_secs(60)));
        releaser.join().unwrap();
    }
}
