//! The two small synchronisation helpers the brokers share: a lock that takes over a poisoned
//! mutex, and a count of outstanding operations that a thread can wait to drain.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Locks a mutex, taking over a poisoned one: the callers' code does not panic while holding
/// their locks, and leaves the guarded state consistent after every statement.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Operations accepted and not yet done (a remote broker's queued acks, nacks and extensions),
/// with a wait for the count to reach zero.
#[derive(Debug, Default)]
pub(crate) struct Outstanding {
    /// How many.
    count: Mutex<u64>,
    /// Signalled when `count` drops to zero.
    drained: Condvar,
}

/// How often a waiter looks at its `give_up` condition while the count does not move.
const RECHECK: Duration = Duration::from_millis(20);

impl Outstanding {
    /// Counts `n` more.
    pub(crate) fn add(&self, n: u64) {
        *lock(&self.count) += n;
    }

    /// Counts `n` done, and wakes the waiters once none is left.
    pub(crate) fn done(&self, n: u64) {
        let mut count = lock(&self.count);
        *count = count.saturating_sub(n);
        if *count == 0 {
            self.drained.notify_all();
        }
    }

    /// How many now (the Redis source's graceful stop reads it; a build with only the
    /// RabbitMQ source does not).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn count(&self) -> u64 {
        *lock(&self.count)
    }

    /// Waits until none is left, `timeout` passes, or `give_up` says so (checked every 20 ms);
    /// returns how many are left.
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread.
    pub(crate) fn wait_drained(&self, timeout: Duration, give_up: impl Fn() -> bool) -> usize {
        let end = Instant::now() + timeout;
        let mut count = lock(&self.count);
        while *count > 0 {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || give_up() {
                break;
            }
            count = self
                .drained
                .wait_timeout(count, left.min(RECHECK))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        usize::try_from(*count).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;

    #[test]
    fn a_wait_ends_when_the_last_operation_is_done() {
        let outstanding = Arc::new(Outstanding::default());
        outstanding.add(3);
        let worker = {
            let outstanding = Arc::clone(&outstanding);
            thread::spawn(move || (0..3).for_each(|_| outstanding.done(1)))
        };
        assert_eq!(
            outstanding.wait_drained(Duration::from_secs(60), || false),
            0
        );
        worker.join().unwrap();
    }

    #[test]
    fn a_wait_gives_up_and_says_how_many_are_left() {
        let outstanding = Outstanding::default();
        outstanding.add(5);
        outstanding.done(2);
        assert_eq!(
            outstanding.wait_drained(Duration::from_secs(60), || true),
            3
        );
        assert_eq!(outstanding.wait_drained(Duration::ZERO, || false), 3);
        assert_eq!(outstanding.count(), 3);
    }
}
