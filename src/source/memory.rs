//! The embedded in-memory pub/sub: one topic with one subscription, with real lease semantics.
//!
//! A pull leases a message until its ack deadline. An ack removes it. A nack, or a deadline
//! that passes without ack or extension, makes it deliverable again with its delivery attempt
//! counted. An ack of a lease that already expired is refused and counted. A message whose
//! delivery attempts reach `max_attempts` goes to the dead-letter list instead of back.
//!
//! Time comes from a [`Clock`], so tests drive expiry with a [`ManualClock`] instead of
//! sleeping.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::error::SourceError;
use crate::message::PubSubMessage;
use crate::source::kit::LeaseTable;
use crate::source::{check_batch, Lease, LeaseId, Publish, Source, SourceStats};

/// A source of the current time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to, for deterministic tests.
///
/// ```
/// use std::time::Duration;
/// use mayhem::{Clock, ManualClock};
/// let clock = ManualClock::new();
/// let before = clock.now();
/// clock.advance(Duration::from_secs(3));
/// assert_eq!(clock.now() - before, Duration::from_secs(3));
/// ```
#[derive(Debug)]
pub struct ManualClock {
    /// The instant the clock started at.
    start: Instant,
    /// How far the clock was advanced from `start`.
    offset: Mutex<Duration>,
}

impl ManualClock {
    /// A clock standing at the current real instant.
    pub fn new() -> Self {
        ManualClock {
            start: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap_or_else(PoisonError::into_inner) += by;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + *self.offset.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Settings of the in-memory subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionConfig {
    /// How long a pulled message stays leased without an extension.
    pub ack_deadline: Duration,
    /// Deliveries of one message before it is dead-lettered instead of delivered again.
    pub max_attempts: u32,
    /// Most messages held ready for delivery; `publish` blocks while that many wait.
    pub max_backlog: usize,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        SubscriptionConfig {
            ack_deadline: Duration::from_secs(3),
            max_attempts: 5,
            max_backlog: 10_000,
        }
    }
}

/// A message on the dead-letter list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message, with its attributes.
    pub message: PubSubMessage,
    /// How often it was delivered.
    pub attempts: u32,
    /// Why it was rejected at once; `None` when it used up its delivery attempts.
    pub reason: Option<String>,
}

/// The in-memory pub/sub; a cheap handle, clones share one subscription.
///
/// ```
/// use std::time::Duration;
/// use mayhem::{PubSubMessage, Publish, Source, Subscription, SubscriptionConfig};
///
/// let sub = Subscription::new(SubscriptionConfig::default());
/// let message = PubSubMessage::random(&mut fastrand::Rng::with_seed(3));
/// sub.publish(&[message]).unwrap();
/// let mut leases = Vec::new();
/// sub.pull(10, Duration::ZERO, &mut leases).unwrap();
/// assert_eq!(leases.len(), 1);
/// let mut refused = Vec::new();
/// sub.ack(&[leases[0].id], &mut refused).unwrap();
/// assert!(refused.is_empty());
/// assert_eq!(sub.settled(), 1);
/// assert_eq!(sub.stats().remaining, 0);
/// sub.ack(&[leases[0].id], &mut refused).unwrap(); // settled already: refused
/// assert_eq!(refused, [leases[0].id]);
/// ```
#[derive(Clone)]
pub struct Subscription {
    /// The state shared by every clone.
    inner: Arc<Inner>,
}

/// What the clones of a [`Subscription`] share.
struct Inner {
    /// All message state behind one lock: a message moves between "ready", "leased" and
    /// "dead" atomically, so it is always in exactly one place.
    state: Mutex<State>,
    /// Signalled when messages become ready (for blocked pulls) or on interrupt.
    ready: Condvar,
    /// Signalled when the backlog has room (for blocked publishes) or on interrupt.
    room: Condvar,
    /// The time source of lease deadlines.
    clock: Arc<dyn Clock>,
    /// The settings.
    config: SubscriptionConfig,
    /// Acked plus dead-lettered, readable without the lock (the runner polls it per message).
    settled: AtomicU64,
}

/// A message waiting for delivery.
#[derive(Debug, Clone)]
struct Ready {
    /// The message.
    message: PubSubMessage,
    /// How often it was delivered so far.
    attempts: u32,
}

/// A message leased to a consumer.
#[derive(Debug, Clone)]
struct Leased {
    /// The message.
    message: PubSubMessage,
    /// Deliveries so far, this one included.
    attempts: u32,
    /// When the lease expires unless extended.
    deadline: Instant,
}

/// The message state of the subscription.
struct State {
    /// Messages ready for delivery, oldest first.
    ready: VecDeque<Ready>,
    /// Messages leased.
    leases: LeaseTable<Leased>,
    /// No lease expires before this instant (a lower bound: it may belong to a lease that was
    /// settled since). Expiry scans run only once the clock passes it, so the common case
    /// costs one comparison and never a per-lease timer.
    earliest_deadline: Option<Instant>,
    /// Messages that used up their delivery attempts.
    dead: Vec<DeadLetter>,
    /// Set by `interrupt`: publishes and pulls return `Closed`.
    interrupted: bool,
    /// Threads blocked in `pull`; the lock holder notifies only when some wait, which saves a
    /// system call per message.
    pull_waiters: usize,
    /// Threads blocked in `publish`.
    publish_waiters: usize,
    /// The counters (`remaining` is computed when read).
    stats: SourceStats,
}

impl Subscription {
    /// An empty subscription on the system clock.
    pub fn new(config: SubscriptionConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// An empty subscription whose lease deadlines follow `clock`.
    pub fn with_clock(config: SubscriptionConfig, clock: Arc<dyn Clock>) -> Self {
        Subscription {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    ready: VecDeque::new(),
                    leases: LeaseTable::new(),
                    earliest_deadline: None,
                    dead: Vec::new(),
                    interrupted: false,
                    pull_waiters: 0,
                    publish_waiters: 0,
                    stats: SourceStats::default(),
                }),
                ready: Condvar::new(),
                room: Condvar::new(),
                clock,
                config,
                settled: AtomicU64::new(0),
            }),
        }
    }

    /// The messages on the dead-letter list, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.lock().dead.clone()
    }

    /// Locks the state. A poisoned lock is taken over: no code panics while holding it, and
    /// the state is consistent after every statement that changes it.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts a message whose lease ended back for delivery, or on the dead-letter list when it
    /// used up its attempts. Returns whether it became ready again.
    fn release(&self, state: &mut State, leased: Leased) -> bool {
        if leased.attempts >= self.inner.config.max_attempts {
            state.dead.push(DeadLetter {
                message: leased.message,
                attempts: leased.attempts,
                reason: None,
            });
            state.stats.dead_lettered += 1;
            self.inner.settled.fetch_add(1, Ordering::Relaxed);
            false
        } else {
            state.ready.push_back(Ready {
                message: leased.message,
                attempts: leased.attempts,
            });
            true
        }
    }

    /// Expires every lease whose deadline is not after `now`.
    fn expire(&self, state: &mut State, now: Instant) {
        match state.earliest_deadline {
            Some(earliest) if earliest <= now => {}
            _ => return,
        }
        let expired: Vec<LeaseId> = state
            .leases
            .iter()
            .filter(|(_, leased)| leased.deadline <= now)
            .map(|(id, _)| id)
            .collect();
        let mut woke = false;
        for id in expired {
            if let Some(leased) = state.leases.remove(id) {
                state.stats.expired += 1;
                woke |= self.release(state, leased);
            }
        }
        state.earliest_deadline = state.leases.iter().map(|(_, l)| l.deadline).min();
        if woke {
            self.wake_pullers(state);
        }
    }

    /// Wakes blocked pulls, if any.
    fn wake_pullers(&self, state: &State) {
        if state.pull_waiters > 0 {
            self.inner.ready.notify_all();
        }
    }

    /// Whether the lease `id` is live; one whose deadline passed is expired first.
    fn live_lease(&self, state: &mut State, id: LeaseId, now: Instant) -> bool {
        match state.leases.get(id) {
            Some(leased) if leased.deadline > now => true,
            Some(_) => {
                if let Some(leased) = state.leases.remove(id) {
                    state.stats.expired += 1;
                    if self.release(state, leased) {
                        self.wake_pullers(state);
                    }
                }
                false
            }
            None => false,
        }
    }

    /// Removes and returns the live lease `id` ([`live_lease`](Self::live_lease)).
    fn take_live(&self, state: &mut State, id: LeaseId, now: Instant) -> Option<Leased> {
        if self.live_lease(state, id, now) {
            state.leases.remove(id)
        } else {
            None
        }
    }
}

impl Publish for Subscription {
    /// Publishes the batch; a message without an id gets a random (version 4) UUID.
    fn publish(&self, batch: &[PubSubMessage]) -> Result<(), SourceError> {
        check_batch(batch, &[], "in-memory")?;
        let mut state = self.lock();
        let max_backlog = self.inner.config.max_backlog;
        let mut rest = batch;
        while !rest.is_empty() {
            while state.ready.len() >= max_backlog && !state.interrupted {
                state.publish_waiters += 1;
                state = self
                    .inner
                    .room
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                state.publish_waiters -= 1;
            }
            if state.interrupted {
                return Err(SourceError::Closed);
            }
            let fit = (max_backlog - state.ready.len()).min(rest.len());
            let published = std::time::SystemTime::now();
            for message in &rest[..fit] {
                let mut message = message.clone().with_publish_time(published);
                if message.id().is_empty() {
                    message =
                        message.with_id(crate::message::random_uuid(&mut fastrand::Rng::new()));
                }
                state.ready.push_back(Ready {
                    message,
                    attempts: 0,
                });
            }
            state.stats.published += fit as u64;
            rest = &rest[fit..];
            self.wake_pullers(&state);
        }
        Ok(())
    }

    fn interrupt(&self) {
        Source::interrupt(self);
    }
}

impl Source for Subscription {
    fn pull(&self, max: usize, wait: Duration, out: &mut Vec<Lease>) -> Result<(), SourceError> {
        let mut state = self.lock();
        let mut now = self.inner.clock.now();
        // The wait is real time; lease deadlines follow the clock (which tests may drive).
        let give_up = Instant::now().checked_add(wait);
        loop {
            if state.interrupted {
                return Err(SourceError::Closed);
            }
            self.expire(&mut state, now);
            if !state.ready.is_empty() || max == 0 {
                break;
            }
            // Sleep until the wait ends or the next lease may expire, whichever is first.
            let mut timeout = match give_up {
                Some(end) => end.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if timeout.is_zero() {
                return Ok(());
            }
            if let Some(earliest) = state.earliest_deadline {
                // At least a millisecond, so a clock that does not move cannot make us spin.
                timeout = timeout.min(
                    earliest
                        .saturating_duration_since(now)
                        .max(Duration::from_millis(1)),
                );
            }
            state.pull_waiters += 1;
            state = self
                .inner
                .ready
                .wait_timeout(state, timeout)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            state.pull_waiters -= 1;
            now = self.inner.clock.now();
        }
        let deadline = now + self.inner.config.ack_deadline;
        let count = max.min(state.ready.len());
        for _ in 0..count {
            let Some(ready) = state.ready.pop_front() else {
                break;
            };
            let attempts = ready.attempts.saturating_add(1);
            out.push(Lease {
                message: ready.message.clone(),
                attempt: attempts,
                id: state.leases.next_id(),
            });
            state.leases.insert(Leased {
                message: ready.message,
                attempts,
                deadline,
            });
        }
        if state
            .earliest_deadline
            .is_none_or(|earliest| deadline < earliest)
        {
            state.earliest_deadline = Some(deadline);
        }
        // Blocked publishers wake once a quarter of the backlog is free, not per message.
        let low_water = self.inner.config.max_backlog - (self.inner.config.max_backlog / 4).max(1);
        if state.publish_waiters > 0 && state.ready.len() <= low_water {
            self.inner.room.notify_all();
        }
        Ok(())
    }

    fn ack(&self, leases: &[LeaseId], refused: &mut Vec<LeaseId>) -> Result<(), SourceError> {
        let mut state = self.lock();
        let now = self.inner.clock.now();
        for &lease in leases {
            match self.take_live(&mut state, lease, now) {
                Some(_) => {
                    self.inner.settled.fetch_add(1, Ordering::Relaxed);
                }
                None => refused.push(lease),
            }
        }
        Ok(())
    }

    fn nack(&self, leases: &[LeaseId], refused: &mut Vec<LeaseId>) -> Result<(), SourceError> {
        let mut state = self.lock();
        let now = self.inner.clock.now();
        let mut woke = false;
        for &lease in leases {
            match self.take_live(&mut state, lease, now) {
                Some(leased) => woke |= self.release(&mut state, leased),
                None => refused.push(lease),
            }
        }
        if woke {
            self.wake_pullers(&state);
        }
        Ok(())
    }

    fn reject(
        &self,
        lease: LeaseId,
        reason: &str,
        refused: &mut Vec<LeaseId>,
    ) -> Result<(), SourceError> {
        let mut state = self.lock();
        let now = self.inner.clock.now();
        match self.take_live(&mut state, lease, now) {
            Some(leased) => {
                state.dead.push(DeadLetter {
                    message: leased.message,
                    attempts: leased.attempts,
                    reason: Some(reason.to_owned()),
                });
                state.stats.dead_lettered += 1;
                self.inner.settled.fetch_add(1, Ordering::Relaxed);
            }
            None => refused.push(lease),
        }
        Ok(())
    }

    fn extend(
        &self,
        leases: &[LeaseId],
        by: Duration,
        refused: &mut Vec<LeaseId>,
    ) -> Result<(), SourceError> {
        let mut state = self.lock();
        let now = self.inner.clock.now();
        let deadline = now + by;
        for &lease in leases {
            if !self.live_lease(&mut state, lease, now) {
                refused.push(lease);
            } else if let Some(leased) = state.leases.get_mut(lease) {
                leased.deadline = deadline;
            }
        }
        // The earliest deadline stays a valid lower bound unless the new one is earlier.
        if !leases.is_empty()
            && state
                .earliest_deadline
                .is_none_or(|earliest| deadline < earliest)
        {
            state.earliest_deadline = Some(deadline);
        }
        Ok(())
    }

    fn interrupt(&self) {
        let mut state = self.lock();
        state.interrupted = true;
        self.inner.ready.notify_all();
        self.inner.room.notify_all();
    }

    fn nack_all(&self) -> usize {
        let mut state = self.lock();
        let leases: Vec<Leased> = state.leases.drain().collect();
        let count = leases.len();
        for leased in leases {
            self.release(&mut state, leased);
        }
        state.earliest_deadline = None;
        self.wake_pullers(&state);
        count
    }

    fn settled(&self) -> u64 {
        self.inner.settled.load(Ordering::Relaxed)
    }

    fn stats(&self) -> SourceStats {
        let mut state = self.lock();
        let now = self.inner.clock.now();
        self.expire(&mut state, now);
        let mut stats = state.stats;
        stats.remaining = (state.ready.len() + state.leases.len()) as u64;
        stats
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish()
    }
}
