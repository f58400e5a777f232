//! The small synchronisation helpers the crate shares, compiled for every feature set: the
//! one place where a poisoned mutex is taken over (a lock, and the two waits on a condition
//! variable), and a count of outstanding operations that a thread can wait to drain (the
//! brokers').

#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, WaitTimeoutResult};
use std::time::Duration;
#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
use std::time::Instant;

/// Locks a mutex, taking over a poisoned one: the callers' code does not panic while holding
/// their locks, and leaves the guarded state consistent after every statement.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `condvar` with `guard`'s mutex ([`Condvar::wait`]), taking over a poisoned one
/// as [`lock`] does.
///
/// # Blocking
///
/// Blocks the calling thread until notified (or woken spuriously).
pub(crate) fn wait<'a, T>(condvar: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    condvar.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `condvar` with `guard`'s mutex for up to `timeout` ([`Condvar::wait_timeout`]),
/// taking over a poisoned one as [`lock`] does.
///
/// # Blocking
///
/// Blocks the calling thread until notified, woken spuriously, or `timeout` passes.
pub(crate) fn wait_timeout<'a, T>(
    condvar: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
    condvar
        .wait_timeout(guard, timeout)
        .unwrap_or_else(PoisonError::into_inner)
}

/// Operations accepted and not yet done (a remote broker's queued acks, nacks and extensions),
/// with a wait for the count to reach zero.
#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
#[derive(Debug, Default)]
pub(crate) struct Outstanding {
    /// How many.
    count: Mutex<u64>,
    /// Signalled when `count` drops to zero.
    drained: Condvar,
    /// How many a `Source::flush` last returned as left: its caller reports them (the
    /// runner logs them), so the source's own report when it is dropped leaves them out.
    told: AtomicU64,
}

/// How often a waiter looks at its `give_up` condition while the count does not move.
#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
const RECHECK: Duration = Duration::from_millis(20);

#[cfg(any(feature = "redis", feature = "amqp", feature = "pubsub"))]
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

    /// Records `left` as reported by whoever asked (`Source::flush` returns it); returns it.
    pub(crate) fn told(&self, left: usize) -> usize {
        self.told.store(left as u64, Ordering::SeqCst);
        left
    }

    /// Of `left`, those not reported yet: a source dropped after the runner logged its
    /// unsent operations does not log the same ones again.
    pub(crate) fn untold(&self, left: usize) -> usize {
        let told = self.told.load(Ordering::SeqCst);
        left.saturating_sub(usize::try_from(told).unwrap_or(usize::MAX))
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
            count = wait_timeout(&self.drained, count, left.min(RECHECK)).0;
        }
        usize::try_from(*count).unwrap_or(usize::MAX)
    }
}

#[cfg(all(test, any(feature = "redis", feature = "amqp", feature = "pubsub")))]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;

    #[test]
    fn what_a_flush_reported_is_not_reported_again() {
        let outstanding = Outstanding::default();
        assert_eq!(outstanding.untold(5), 5);
        assert_eq!(outstanding.told(3), 3);
        assert_eq!(outstanding.untold(3), 0);
        assert_eq!(outstanding.untold(5), 2);
        assert_eq!(outstanding.told(0), 0);
        assert_eq!(outstanding.untold(4), 4);
    }

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
