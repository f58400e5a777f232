//! The lease manager: one owner for every lease from the moment it is pulled until it is
//! acked, nacked, lost or given back.
//!
//! Modelled on the leaser of Google Cloud Pub/Sub's client libraries, and stricter:
//! - a lease enters the table when it is pulled, *before* the hand-off to the executor, so a
//!   delivery waiting in the channel or in a task not yet polled keeps its lease (when only
//!   running tasks extended their own leases, a large window let waiting leases expire, each
//!   expiry added a delivery, and the service collapsed under its own queue);
//! - one thread extends, in one batched call to the source, every lease whose deadline falls
//!   before the next round, then sleeps until the next round;
//! - a lease held longer than `max_lease` is no longer extended (one warning, aggregated);
//! - flow control counts the leases held: the [`Gate`] permit of a lease travels with its
//!   [`LeaseGuard`] and is released when the guard drops, on every path.
//!
//! The table is split into shards, each a slab behind its own mutex: a consumer takes one
//! shard lock per pulled batch, a handler task one at start and one at settle, and the
//! extension round one per shard; with many shards the executor threads rarely meet.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use log::Level;
use slab::Slab;

use crate::message::{Label, PubSubMessage};
use crate::metrics::Metrics;
use crate::pipeline::flow::Gate;
use crate::pipeline::throttle::Throttle;
use crate::source::{Lease, LeaseId, Source};
use crate::sync;

/// Shards of the lease table (a power of two, more than executor threads plus consumers on
/// any machine we target, so that two threads rarely need the same one).
const SHARDS: usize = 32;
/// Most lease ids sent to the source in one `extend` call: bounds how long a local source
/// holds its lock, and the size of one request to a remote one.
const EXTEND_CHUNK: usize = 8192;
/// Up to this many extensions of messages being handled are logged one line each at info
/// level in a round; above it, one summary line (the per-message lines go to debug).
const INFO_LINES_PER_ROUND: usize = 16;

mod extend;
mod guard;
mod settings;
mod settle;
#[cfg(test)]
mod tests;

pub(crate) use guard::{Interrupted, Interruption};
pub(crate) use settings::LeaseSettings;

/// A point in time as milliseconds since the lease manager started: 8 bytes instead of an
/// `Instant`'s 16, in a table that holds every lease in flight (a million, with a large
/// window). Millisecond precision suits deadlines of at least 10 ms. (`u64`, not `u32`: a
/// service runs longer than the 49 days a `u32` would cover.)
type Tick = u64;

/// Converts instants to [`Tick`]s, rounding down, so that a recorded deadline is never later
/// than the real one.
#[derive(Debug, Clone, Copy)]
struct Clock {
    /// Tick 0.
    start: Instant,
}

impl Clock {
    /// The tick of an instant (0 before the start).
    fn tick(&self, at: Instant) -> Tick {
        Self::ticks(at.saturating_duration_since(self.start))
    }

    /// A duration in ticks, saturating.
    fn ticks(duration: Duration) -> Tick {
        Tick::try_from(duration.as_millis()).unwrap_or(Tick::MAX)
    }
}

/// Where a lease is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Held and extended.
    Held,
    /// Held past `max_lease`: no longer extended, it will expire at the source.
    Capped,
    /// The source refused to extend it: it is not held any more.
    Lost,
}

/// One lease in the table.
#[derive(Debug)]
struct Entry {
    /// The source's id of the lease.
    id: LeaseId,
    /// What log lines show of the message (its id and data; the guard holds the message).
    label: Label,
    /// When it was pulled (for `max_lease`), in [`Clock`] ticks.
    pulled: Tick,
    /// The deadline the source holds it until, as far as we know (a lower bound: measured
    /// before the call that set it).
    deadline: Tick,
    /// Successful extensions.
    extended: u32,
    /// Whether its handler started.
    handling: bool,
    /// Wakes its task when the lease is lost.
    waker: Option<Waker>,
    /// Held, capped or lost.
    state: State,
}

/// The lease manager. Owned by `run`; its thread is started with [`Leaser::run`].
pub(crate) struct Leaser<'a> {
    /// Where leases are extended, acked and nacked.
    source: &'a dyn Source,
    /// Counters: delivered, acked, nacked, extended, refused, lost; and the in-flight gauge.
    metrics: &'a Metrics,
    /// Flow control: a permit per lease held, plus those consumers reserved for a pull.
    gate: Gate,
    /// The lease table.
    shards: Box<[Mutex<Slab<Entry>>]>,
    /// Round-robin choice of the shard of the next pulled batch.
    next_shard: AtomicUsize,
    /// Bumped whenever a lease is lost, so that a task learns of it with one atomic load
    /// instead of a lock per poll.
    lost_epoch: AtomicU64,
    /// Set once the handlers still running are cancelled (after the grace period).
    cancelled: AtomicBool,
    /// The settings.
    settings: LeaseSettings,
    /// The deadline asked of the source at each extension, in milliseconds: the fixed
    /// `--ack-deadline`, or with `auto` the one the last round chose. Written only by the
    /// extension thread; an atomic so that the rest may read it.
    deadline_ms: AtomicU64,
    /// Turns instants into the table's compact ticks.
    clock: Clock,
    /// Set to stop the extension thread; with `wake`, interrupts its sleep.
    stopped: Mutex<bool>,
    /// Wakes the extension thread when stopped.
    wake: Condvar,
    /// Aggregates the warnings about lost leases.
    pub(crate) lost_log: Throttle,
    /// Aggregates the warnings about refused acks.
    pub(crate) refused_log: Throttle,
    /// Aggregates the warnings about messages rejected by their handler.
    pub(crate) rejected_log: Throttle,
    /// Aggregates the warnings about leases past `max_lease`.
    max_lease_log: Throttle,
    /// Aggregates the warnings about failed calls to the source.
    error_log: Throttle,
    /// Aggregates the warnings about slow handlers.
    pub(crate) slow_log: Throttle,
    /// Aggregates the warnings about handlers that block their executor thread.
    pub(crate) blocking_log: Throttle,
}

/// A lease held by the lease manager, with its flow-control permit: dropping it without
/// `ack` or `nack` nacks it, and dropping it always returns the permit.
#[derive(Debug)]
pub(crate) struct LeaseGuard<'a> {
    /// The manager holding the lease.
    leaser: &'a Leaser<'a>,
    /// The lease's shard.
    shard: u32,
    /// The lease's slot in its shard.
    slot: u32,
    /// The message.
    message: PubSubMessage,
    /// The source's id of the lease.
    id: LeaseId,
    /// Which delivery of the message this is.
    attempt: u32,
    /// The bytes it counts for in flow control.
    size: usize,
    /// Whether `size` was counted in the bytes handed to handlers (the consumer counts it
    /// when it hands the lease over; the drop takes it off again).
    size_counted: bool,
    /// Set once acked or nacked, so the drop guard only returns the permit.
    settled: bool,
}

/// A lease whose handler succeeded, waiting in an executor thread's buffer for its ack
/// (see `acker`).
#[derive(Debug)]
pub(crate) struct Finished<'a> {
    /// The lease, still in the table and holding its permit.
    pub(crate) guard: LeaseGuard<'a>,
    /// When the consumer handed it to the executor threads: the handling time runs from
    /// there.
    pub(crate) handed: Instant,
    /// When its task was spawned: the adaptive window's latency runs from there.
    pub(crate) spawned: Instant,
}

/// How a settle went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settle {
    /// The source accepted it.
    Done,
    /// The source refused it: the lease was not held any more.
    Refused,
    /// The lease was lost before (the source refused an extension).
    Lost,
    /// The source failed; the lease will expire and its message be delivered again.
    Failed(String),
}

impl<'a> Leaser<'a> {
    /// A lease manager over `source` with a flow-control window of `max_in_flight` (blocked
    /// consumers wake once `batch` permits are free).
    pub(crate) fn new(
        source: &'a dyn Source,
        metrics: &'a Metrics,
        max_in_flight: usize,
        max_in_flight_bytes: usize,
        batch: usize,
        settings: LeaseSettings,
    ) -> Self {
        metrics.reset_held();
        Leaser {
            source,
            metrics,
            gate: Gate::with_bytes(max_in_flight, batch, max_in_flight_bytes),
            shards: (0..SHARDS).map(|_| Mutex::new(Slab::new())).collect(),
            next_shard: AtomicUsize::new(0),
            lost_epoch: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            settings,
            deadline_ms: AtomicU64::new(Clock::ticks(if settings.auto {
                LeaseSettings::auto_deadline(settings.ack_deadline)
            } else {
                settings.ack_deadline
            })),
            clock: Clock {
                start: Instant::now(),
            },
            stopped: Mutex::new(false),
            wake: Condvar::new(),
            lost_log: Throttle::new("leases lost", Level::Warn),
            refused_log: Throttle::new("acks refused", Level::Warn),
            rejected_log: Throttle::new("messages rejected", Level::Warn),
            max_lease_log: Throttle::new("leases past --max-lease", Level::Warn),
            error_log: Throttle::new("failed lease operations", Level::Warn),
            slow_log: Throttle::new("slow handlers", Level::Warn),
            blocking_log: Throttle::new("blocking polls", Level::Warn),
        }
    }

    /// Adds `bytes` handed to handlers to the gauge (the gate counted them already).
    pub(crate) fn count_handed_bytes(&self, bytes: usize) {
        self.metrics.add_held_bytes(bytes);
    }

    /// The flow-control gate.
    pub(crate) fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Leases held now.
    pub(crate) fn held(&self) -> usize {
        self.metrics.in_flight()
    }

    /// Locks a shard. A poisoned lock is taken over: no code panics while holding it, and
    /// every statement leaves the table consistent.
    fn shard(&self, index: u32) -> MutexGuard<'_, Slab<Entry>> {
        sync::lock(&self.shards[index as usize])
    }

    /// Takes the leases of one pull into the table, each with one of the permits the consumer
    /// reserved for it, and pushes their guards to `out`. `pulled` is a time taken before the
    /// pull, so the deadlines recorded are never later than the source's.
    pub(crate) fn admit(
        &'a self,
        leases: impl ExactSizeIterator<Item = Lease>,
        pulled: Instant,
        out: &mut Vec<LeaseGuard<'a>>,
    ) {
        let count = leases.len();
        if count == 0 {
            return;
        }
        let shard = (self.next_shard.fetch_add(1, Ordering::Relaxed) % SHARDS) as u32;
        let deadline = self.clock.tick(pulled + self.settings.ack_deadline);
        let pulled = self.clock.tick(pulled);
        let mut redelivered = 0;
        {
            let mut table = self.shard(shard);
            for lease in leases {
                redelivered += u64::from(lease.attempt > 1);
                let size = lease.message.size();
                let slot = table.insert(Entry {
                    id: lease.id,
                    label: lease.message.label(),
                    pulled,
                    deadline,
                    extended: 0,
                    handling: false,
                    waker: None,
                    state: State::Held,
                });
                out.push(LeaseGuard {
                    leaser: self,
                    shard,
                    // A slab never holds more entries than the flow-control window, which the
                    // configuration bounds far below `u32::MAX`.
                    slot: slot as u32,
                    message: lease.message,
                    id: lease.id,
                    attempt: lease.attempt,
                    size,
                    size_counted: false,
                    settled: false,
                });
            }
        }
        self.metrics.add_held(count);
        self.metrics.count_delivered(count as u64, redelivered);
    }

    /// Cancels the handlers still running: wakes every task that registered its waker (the
    /// others see the flag when they are first polled). One flag and the wakers the table
    /// holds anyway, rather than a listener per task on a broadcast event.
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let mut wakers = Vec::new();
        for table in self.shards.iter() {
            let table = sync::lock(table);
            wakers.extend(table.iter().filter_map(|(_, entry)| entry.waker.clone()));
        }
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Whether the handlers were cancelled.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Stops the extension thread.
    pub(crate) fn stop(&self) {
        *sync::lock(&self.stopped) = true;
        self.wake.notify_all();
    }

    /// Prints the counts of aggregated warnings not printed yet.
    pub(crate) fn flush_logs(&self) {
        for throttle in [
            &self.lost_log,
            &self.refused_log,
            &self.rejected_log,
            &self.max_lease_log,
            &self.error_log,
            &self.slow_log,
            &self.blocking_log,
        ] {
            throttle.flush();
        }
    }

    /// The deadline asked of the source at each extension now.
    pub(crate) fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms.load(Ordering::Relaxed))
    }
}

impl fmt::Debug for Leaser<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leaser")
            .field("held", &self.held())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}
