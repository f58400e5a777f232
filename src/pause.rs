//! The pause handle: a value a program passes into a run ([`Runner::pause`](crate::Runner::pause))
//! to stop taking work without shutting down, and that tells whether the service is ready.
//!
//! Three things hold the service back, each counted here:
//! - **quiet mode**, set by the program ([`Pause::set_quiet`]; the binary does it on SIGTSTP
//!   and undoes it on SIGCONT): consumers stop pulling and publishers stop publishing, while
//!   the messages already held are handled and settled;
//! - **open circuit breakers** ([`Breaker`](crate::layer::Breaker) holds the pause while it
//!   is open): consumers stop pulling until its cooldown ends, and pull again then only
//!   until a message arrives to be its probe, in case none is held to be it;
//! - **a failing source**: the runner marks it when a pull fails and clears it at the next
//!   pull that succeeds. It pauses nothing (the consumers keep retrying) but makes the service
//!   not ready.
//!
//! Like [`Shutdown`](crate::Shutdown), the library never changes quiet mode by itself and
//! never installs a signal handler: the program decides.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sync;

/// A cloneable handle that pauses consumers (and, in quiet mode, publishers) of a run.
///
/// ```
/// use mayhem::Pause;
/// let pause = Pause::new();
/// assert!(pause.is_ready() && !pause.pulling_paused());
/// assert!(pause.set_quiet(true)); // changed
/// assert!(!pause.set_quiet(true)); // already quiet
/// assert!(pause.pulling_paused() && pause.publishing_paused() && !pause.is_ready());
/// pause.set_quiet(false);
/// assert!(pause.is_ready());
/// ```
#[derive(Clone, Default)]
pub struct Pause {
    /// The state shared by every clone.
    inner: Arc<Inner>,
}

/// What the clones of a [`Pause`] share.
#[derive(Default)]
struct Inner {
    /// Quiet mode: no pulling, no publishing.
    quiet: AtomicBool,
    /// Circuit breakers open now (or letting their probe through): the length of
    /// `breaker_holds`, read without its lock.
    breakers_open: AtomicUsize,
    /// What each open breaker asks of the consumers, by the breaker's id.
    breaker_holds: Mutex<Vec<BreakerHold>>,
    /// Whether the last pull failed: the source is reconnecting (or down).
    source_failing: AtomicBool,
    /// Pulls begun and not yet handed off (see [`Pause::begin_pull`]).
    pulling: AtomicUsize,
    /// Guards the waits on `changed`; the flags are atomics read without it, and every
    /// change takes it before notifying, so a waiter that re-checks under it misses none.
    lock: Mutex<()>,
    /// Signalled at every change of `quiet` or `breakers_open`.
    changed: Condvar,
}

/// One open circuit breaker's hold on the consumers.
#[derive(Debug, Clone, Copy)]
struct BreakerHold {
    /// The breaker's id.
    id: u64,
    /// No pulling until then; after it, pulling until the breaker has a probe (which it
    /// may need to pull, when no message is held). `None`: no pulling at all (probing).
    until: Option<Instant>,
}

impl Pause {
    /// A handle with nothing paused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Turns quiet mode on or off; returns whether it changed. In quiet mode consumers stop
    /// pulling and publishers stop publishing; what is held is still handled and settled.
    pub fn set_quiet(&self, quiet: bool) -> bool {
        let changed = self.inner.quiet.swap(quiet, Ordering::SeqCst) != quiet;
        if changed {
            self.notify();
        }
        changed
    }

    /// Whether quiet mode is on.
    pub fn is_quiet(&self) -> bool {
        self.inner.quiet.load(Ordering::SeqCst)
    }

    /// How many circuit breakers hold the consumers now.
    pub fn breakers_open(&self) -> usize {
        self.inner.breakers_open.load(Ordering::SeqCst)
    }

    /// Whether the last pull failed (the source is reconnecting, or down). A source that
    /// retries inside its pull without returning an error cannot be seen here.
    pub fn source_failing(&self) -> bool {
        self.inner.source_failing.load(Ordering::SeqCst)
    }

    /// Whether consumers must not pull now: quiet mode, or a circuit breaker open (in its
    /// cooldown, or with its probe running).
    pub fn pulling_paused(&self) -> bool {
        self.is_quiet() || self.breakers_hold_pulls(Instant::now())
    }

    /// Whether an open breaker keeps the consumers from pulling at `now`.
    fn breakers_hold_pulls(&self, now: Instant) -> bool {
        self.breakers_open() > 0
            && sync::lock(&self.inner.breaker_holds)
                .iter()
                .any(|hold| hold.until.is_none_or(|until| now < until))
    }

    /// The end of the first breaker cooldown still to come, when one is.
    fn next_cooldown_end(&self, now: Instant) -> Option<Instant> {
        if self.breakers_open() == 0 {
            return None;
        }
        sync::lock(&self.inner.breaker_holds)
            .iter()
            .filter_map(|hold| hold.until)
            .filter(|&until| now < until)
            .min()
    }

    /// Whether publishers must not publish now: quiet mode.
    pub fn publishing_paused(&self) -> bool {
        self.is_quiet()
    }

    /// Whether the service should get traffic: not quiet, no breaker open, and the last pull
    /// did not fail. This is what the binary's `/readyz` answers.
    pub fn is_ready(&self) -> bool {
        !self.is_quiet() && self.breakers_open() == 0 && !self.source_failing()
    }

    /// Pulls in progress: begun before pulling was paused and not yet handed to the executor.
    /// Once pulling is paused and this is 0, no more leases come in until it resumes, so a
    /// program can tell when the pulls have stopped (the binary logs it in quiet mode).
    pub fn pulls_in_progress(&self) -> usize {
        self.inner.pulling.load(Ordering::SeqCst)
    }

    /// Begins a pull unless pulling is paused; the pull counts as in progress until the
    /// guard drops.
    pub(crate) fn begin_pull(&self) -> Option<PullGuard<'_>> {
        // SeqCst on both sides: a pause set before this increment is seen by the check below,
        // and one set after it sees the increment, so `pulls_in_progress` reaching 0 after the
        // pause means no pull can still begin.
        self.inner.pulling.fetch_add(1, Ordering::SeqCst);
        let guard = PullGuard { pause: self };
        if self.pulling_paused() {
            return None;
        }
        Some(guard)
    }

    /// Circuit breaker `id` is open: consumers stop pulling until `until`, then pull only
    /// until the breaker holds them again (`None`: until it is released). Replaces the
    /// breaker's earlier hold.
    pub(crate) fn hold_breaker(&self, id: u64, until: Option<Instant>) {
        {
            let mut holds = sync::lock(&self.inner.breaker_holds);
            match holds.iter_mut().find(|hold| hold.id == id) {
                Some(hold) => hold.until = until,
                None => {
                    holds.push(BreakerHold { id, until });
                    self.inner
                        .breakers_open
                        .store(holds.len(), Ordering::SeqCst);
                }
            }
        }
        self.notify();
    }

    /// Circuit breaker `id` closed again (nothing, if it held nothing).
    pub(crate) fn release_breaker(&self, id: u64) {
        {
            let mut holds = sync::lock(&self.inner.breaker_holds);
            holds.retain(|hold| hold.id != id);
            self.inner
                .breakers_open
                .store(holds.len(), Ordering::SeqCst);
        }
        self.notify();
    }

    /// Records whether the last pull failed.
    pub(crate) fn set_source_failing(&self, failing: bool) {
        // A plain store: readiness reads it, nothing waits on it.
        if self.inner.source_failing.load(Ordering::Relaxed) != failing {
            self.inner.source_failing.store(failing, Ordering::SeqCst);
        }
    }

    /// Blocks while `paused(self)` holds, at most `timeout`; returns whether it still holds.
    /// The callers loop and check the shutdown in between, so a bounded wait is all they need.
    /// The end of a breaker's cooldown notifies nobody: the wait ends then too.
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread (a consumer or publisher thread).
    pub(crate) fn wait_while(&self, paused: fn(&Pause) -> bool, timeout: Duration) -> bool {
        let guard = sync::lock(&self.inner.lock);
        if !paused(self) {
            return false;
        }
        let now = Instant::now();
        let timeout = match self.next_cooldown_end(now) {
            Some(end) => timeout.min(end - now),
            None => timeout,
        };
        drop(sync::wait_timeout(&self.inner.changed, guard, timeout));
        paused(self)
    }

    /// Wakes the threads waiting in [`Pause::wait_while`].
    fn notify(&self) {
        let _guard = sync::lock(&self.inner.lock);
        self.inner.changed.notify_all();
    }
}

/// A pull in progress; dropping it ends it.
pub(crate) struct PullGuard<'a> {
    /// The pause that counts it.
    pause: &'a Pause,
}

impl Drop for PullGuard<'_> {
    fn drop(&mut self) {
        self.pause.inner.pulling.fetch_sub(1, Ordering::SeqCst);
    }
}

impl fmt::Debug for Pause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pause")
            .field("quiet", &self.is_quiet())
            .field("breakers_open", &self.breakers_open())
            .field("source_failing", &self.source_failing())
            .field("pulls_in_progress", &self.pulls_in_progress())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_breaker_pauses_pulling_but_not_publishing() {
        let pause = Pause::new();
        pause.hold_breaker(1, None);
        assert!(pause.pulling_paused() && !pause.publishing_paused() && !pause.is_ready());
        pause.release_breaker(1);
        pause.release_breaker(1);
        assert_eq!(pause.breakers_open(), 0);
        assert!(pause.is_ready());
    }

    #[test]
    fn after_its_cooldown_an_open_breaker_lets_the_consumers_pull_a_probe() {
        let pause = Pause::new();
        let now = Instant::now();
        pause.hold_breaker(1, Some(now + Duration::from_secs(3600)));
        pause.hold_breaker(2, Some(now));
        assert_eq!(pause.breakers_open(), 2);
        assert!(pause.pulling_paused(), "breaker 1 is in its cooldown");
        pause.hold_breaker(1, Some(now));
        // Both cooldowns are over: pulls go on, for a probe, but the service is not ready.
        assert!(!pause.pulling_paused() && !pause.is_ready());
        assert_eq!(pause.breakers_open(), 2);
        // Breaker 2 has its probe: no pulling while it runs.
        pause.hold_breaker(2, None);
        assert!(pause.pulling_paused());
        pause.release_breaker(2);
        pause.release_breaker(1);
        assert!(!pause.pulling_paused() && pause.is_ready());
    }

    #[test]
    fn a_wait_ends_when_a_cooldown_does() {
        let pause = Pause::new();
        pause.hold_breaker(1, Some(Instant::now() + Duration::from_millis(20)));
        // Nobody notifies: the cooldown's end alone ends a wait of an hour.
        while pause.wait_while(Pause::pulling_paused, Duration::from_secs(3600)) {}
        assert!(!pause.pulling_paused());
    }

    #[test]
    fn no_pull_begins_once_paused_and_the_ones_begun_are_counted() {
        let pause = Pause::new();
        let pull = pause.begin_pull().expect("not paused");
        pause.set_quiet(true);
        assert_eq!(pause.pulls_in_progress(), 1);
        assert!(pause.begin_pull().is_none());
        assert_eq!(pause.pulls_in_progress(), 1);
        drop(pull);
        assert_eq!(pause.pulls_in_progress(), 0);
    }

    #[test]
    fn a_failing_source_is_not_ready_but_pauses_nothing() {
        let pause = Pause::new();
        pause.set_source_failing(true);
        assert!(!pause.is_ready() && !pause.pulling_paused());
        pause.set_source_failing(false);
        assert!(pause.is_ready());
    }

    #[test]
    fn resuming_wakes_a_waiting_thread() {
        let pause = Pause::new();
        pause.set_quiet(true);
        let waiter = {
            let pause = pause.clone();
            std::thread::spawn(move || {
                while pause.wait_while(Pause::pulling_paused, Duration::from_secs(60)) {}
            })
        };
        pause.set_quiet(false);
        waiter.join().expect("the waiter returns once resumed");
    }
}
