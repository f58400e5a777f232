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
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use log::{debug, info, log_enabled, Level};
use slab::Slab;

use crate::error::SourceError;
use crate::handler::ExtensionCount;
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

/// The least deadline `--ack-deadline auto` asks for, as Google's clients do.
pub(crate) const AUTO_MIN_DEADLINE: Duration = Duration::from_secs(10);
/// The most deadline `--ack-deadline auto` asks for (Google Cloud Pub/Sub's maximum).
pub(crate) const AUTO_MAX_DEADLINE: Duration = Duration::from_secs(600);

/// The lease manager's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseSettings {
    /// How far a lease is extended each time; with `auto`, the source's own deadline at the
    /// pull, and the deadline until the first handling times are known.
    pub(crate) ack_deadline: Duration,
    /// `--ack-deadline auto`: each round, the deadline asked of the source is the p99 of the
    /// handling times so far, within [`AUTO_MIN_DEADLINE`]..[`AUTO_MAX_DEADLINE`], and a
    /// lease is extended once a third of it is left (`extend_interval` is not used).
    pub(crate) auto: bool,
    /// A lease is extended once it is this old since its last extension (below
    /// `ack_deadline`); what is left of the deadline then is the margin a round has.
    pub(crate) extend_interval: Duration,
    /// Past this time since the pull a lease is no longer extended.
    pub(crate) max_lease: Duration,
}

impl LeaseSettings {
    /// What is left of a lease's deadline when it is extended, for a deadline of `deadline`:
    /// fixed, `ack_deadline − extend_interval`; auto, a third of it (the ratio of the
    /// defaults, 1 s left of 3 s).
    fn margin(&self, deadline: Duration) -> Duration {
        if self.auto {
            deadline / 3
        } else {
            self.ack_deadline.saturating_sub(self.extend_interval)
        }
    }

    /// Time between two extension rounds: half the margin, so that a lease is extended with
    /// at least half the margin left for the call to the source.
    fn period(&self, deadline: Duration) -> Duration {
        (self.margin(deadline) / 2).max(Duration::from_millis(1))
    }

    /// The deadline auto mode asks for when the p99 of the handling times is `p99`: in whole
    /// seconds (rounded up), as Pub/Sub's deadlines are, within the bounds.
    fn auto_deadline(p99: Duration) -> Duration {
        let whole = p99.as_secs() + u64::from(p99.subsec_nanos() > 0);
        Duration::from_secs(whole).clamp(AUTO_MIN_DEADLINE, AUTO_MAX_DEADLINE)
    }
}

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
    /// When its task was spawned, for the handling time.
    pub(crate) started: Instant,
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

    /// Removes a lease from the table and nacks it at the source. (Acks are coalesced, see
    /// [`Leaser::ack_all`]; a nack is sent at once, to give the message back without delay.)
    fn settle_nack(&self, guard: &LeaseGuard<'_>) -> Settle {
        let settle = self.settle_one(guard, |id, refused| self.source.nack(&[id], refused));
        if settle == Settle::Done {
            self.metrics.count_nacked(1);
        }
        settle
    }

    /// Removes a lease from the table and dead-letters it at the source with `reason`.
    fn settle_reject(&self, guard: &LeaseGuard<'_>, reason: &str) -> Settle {
        let settle = self.settle_one(guard, |id, refused| self.source.reject(id, reason, refused));
        if settle == Settle::Done {
            self.metrics.count_rejected(1);
        }
        settle
    }

    /// Removes a lease from the table and settles it at the source with `op`, at once.
    fn settle_one(
        &self,
        guard: &LeaseGuard<'_>,
        op: impl FnOnce(LeaseId, &mut Vec<LeaseId>) -> Result<(), SourceError>,
    ) -> Settle {
        let Some(entry) = guard.take_entry(&mut self.shard(guard.shard)) else {
            return Settle::Lost;
        };
        if entry.state == State::Lost {
            // The gauge and the counters were updated when it was lost.
            return Settle::Lost;
        }
        self.metrics.sub_held(1);
        let mut refused = Vec::new();
        match op(guard.id, &mut refused) {
            Ok(()) if refused.is_empty() => Settle::Done,
            Ok(()) => Settle::Refused,
            Err(error) => {
                let text = error.to_string();
                self.error_log
                    .log(1, || format!("Could not settle a lease: {text}"));
                Settle::Failed(text)
            }
        }
    }

    /// Acks a buffer of finished leases: one lock per run of leases of the same shard (the
    /// leases of one pull share a shard), one call to the source per [`EXTEND_CHUNK`]. Fills
    /// `outcomes` with how each went, in order; the guards are marked settled, so dropping
    /// them only returns their permits.
    pub(crate) fn ack_all(&self, batch: &mut [Finished<'_>], outcomes: &mut Vec<Settle>) {
        outcomes.clear();
        let mut ids = Vec::with_capacity(batch.len());
        let mut rest = &mut batch[..];
        while let Some(first) = rest.first() {
            let shard = first.guard.shard;
            let run = rest
                .iter()
                .position(|finished| finished.guard.shard != shard)
                .unwrap_or(rest.len());
            let (same, after) = std::mem::take(&mut rest).split_at_mut(run);
            let mut table = self.shard(shard);
            for finished in same {
                let guard = &mut finished.guard;
                guard.settled = true;
                let outcome = match guard.take_entry(&mut table) {
                    Some(entry) if entry.state != State::Lost => {
                        ids.push(entry.id);
                        Settle::Done
                    }
                    // Lost: the gauge and the counters were updated then.
                    _ => Settle::Lost,
                };
                outcomes.push(outcome);
            }
            drop(table);
            rest = after;
        }
        if ids.is_empty() {
            return;
        }
        self.metrics.sub_held(ids.len());
        let mut refused = Vec::new();
        let mut failed: Vec<(LeaseId, String)> = Vec::new();
        for chunk in ids.chunks(EXTEND_CHUNK) {
            let before = refused.len();
            match self.source.ack(chunk, &mut refused) {
                Ok(()) => self
                    .metrics
                    .count_acked((chunk.len() - (refused.len() - before)) as u64),
                Err(error) => {
                    refused.truncate(before);
                    let text = error.to_string();
                    self.error_log.log(chunk.len() as u64, || {
                        format!("Could not ack {} leases: {text}", chunk.len())
                    });
                    failed.extend(chunk.iter().map(|&id| (id, text.clone())));
                }
            }
        }
        if refused.is_empty() && failed.is_empty() {
            return;
        }
        self.metrics.count_stale_acks(refused.len() as u64);
        refused.sort_unstable();
        failed.sort_unstable_by_key(|(id, _)| *id);
        for (finished, outcome) in batch.iter().zip(outcomes.iter_mut()) {
            if *outcome != Settle::Done {
                continue;
            }
            let id = finished.guard.id;
            if refused.binary_search(&id).is_ok() {
                *outcome = Settle::Refused;
            } else if let Ok(at) = failed.binary_search_by_key(&id, |(id, _)| *id) {
                *outcome = Settle::Failed(failed[at].1.clone());
            }
        }
    }

    /// Nacks many guards in one call to the source (the hand-off channel's leftovers at
    /// shutdown). Returns how many leases went back.
    pub(crate) fn nack_all(&self, guards: Vec<LeaseGuard<'_>>) -> usize {
        let mut ids = Vec::with_capacity(guards.len());
        for mut guard in guards {
            guard.settled = true;
            if let Some(entry) = guard.take_entry(&mut self.shard(guard.shard)) {
                if entry.state != State::Lost {
                    ids.push(entry.id);
                }
            }
            // Dropping the guard returns its permit.
        }
        self.metrics.sub_held(ids.len());
        let mut refused = Vec::new();
        for chunk in ids.chunks(EXTEND_CHUNK) {
            refused.clear();
            match self.source.nack(chunk, &mut refused) {
                Ok(()) => self
                    .metrics
                    .count_nacked((chunk.len() - refused.len()) as u64),
                Err(error) => self.error_log.log(chunk.len() as u64, || {
                    format!("Could not nack {} leases: {error}", chunk.len())
                }),
            }
        }
        ids.len()
    }

    /// Nacks leases a source returned beyond what was asked for; they never enter the table.
    pub(crate) fn give_back_unadmitted(&self, ids: &[LeaseId]) {
        let mut refused = Vec::new();
        match self.source.nack(ids, &mut refused) {
            Ok(()) => self
                .metrics
                .count_nacked((ids.len() - refused.len()) as u64),
            Err(error) => self.error_log.log(ids.len() as u64, || {
                format!("Could not nack {} leases: {error}", ids.len())
            }),
        }
    }

    /// Marks a lease's handler as started and registers the waker of its task; returns
    /// whether the lease was lost already.
    fn start_handling(&self, guard: &LeaseGuard<'_>, waker: &Waker) -> bool {
        let mut table = self.shard(guard.shard);
        match table.get_mut(guard.slot as usize) {
            Some(entry) if entry.id == guard.id => {
                entry.handling = true;
                entry.waker = Some(waker.clone());
                entry.state == State::Lost
            }
            _ => true,
        }
    }

    /// Whether a lease was lost.
    fn is_lost(&self, guard: &LeaseGuard<'_>) -> bool {
        let table = self.shard(guard.shard);
        match table.get(guard.slot as usize) {
            Some(entry) if entry.id == guard.id => entry.state == State::Lost,
            _ => true,
        }
    }

    /// The extension thread: one round every period until stopped.
    ///
    /// # Blocking
    ///
    /// Runs on its own `std::thread`: it calls the source and sleeps between rounds.
    pub(crate) fn run(&self, seed: u64) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut round = Round::default();
        loop {
            // Read every round: with `auto` the deadline, and so the period, follows the
            // handling times.
            let period = self.settings.period(self.deadline());
            // Jitter of up to a tenth of the period, so that several instances sharing a
            // broker do not send their batches in step.
            let jitter = period.mul_f64(rng.f64() / 10.0);
            let wake_at = Instant::now() + period - jitter;
            let mut stopped = sync::lock(&self.stopped);
            loop {
                if *stopped {
                    return;
                }
                let left = wake_at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                stopped = sync::wait_timeout(&self.wake, stopped, left).0;
            }
            drop(stopped);
            self.round(Instant::now(), &mut round);
        }
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

    /// With `auto`, sets the deadline to the p99 of the handling times so far, within
    /// 10 s..10 min, as Google's clients do (their leaser reads its histogram of ack
    /// latencies). The histogram holds every handling time since the start, so the p99 moves
    /// slowly. A change of whole seconds is logged.
    fn follow_handling_times(&self) {
        if !self.settings.auto {
            return;
        }
        let p99_ms = self.metrics.latency_quantile_ms(0.99);
        if p99_ms <= 0.0 {
            // Nothing acked yet: keep the start value.
            return;
        }
        let p99 = Duration::from_secs_f64(p99_ms / 1000.0);
        let chosen = LeaseSettings::auto_deadline(p99);
        let before = self.deadline();
        if chosen.as_secs() != before.as_secs() {
            info!(
                "Ack deadline now {} (p99 of handling times {p99:.1?}, within 10s..10m)",
                seconds(chosen)
            );
        }
        self.deadline_ms
            .store(Clock::ticks(chosen), Ordering::Relaxed);
    }

    /// One extension round: extends every lease whose deadline falls within the margin.
    fn round(&self, now: Instant, round: &mut Round) {
        self.follow_handling_times();
        let deadline = self.deadline();
        let margin = self.settings.margin(deadline);
        let horizon = self.clock.tick(now + margin);
        let now_tick = self.clock.tick(now);
        let max_lease = Clock::ticks(self.settings.max_lease);
        round.clear();
        for (shard, table) in self.shards.iter().enumerate() {
            let mut table = sync::lock(table);
            for (slot, entry) in table.iter_mut() {
                if entry.state != State::Held {
                    continue;
                }
                if entry.deadline > horizon {
                    continue;
                }
                if now_tick.saturating_sub(entry.pulled) >= max_lease {
                    entry.state = State::Capped;
                    round.capped.push(entry.label.clone());
                    continue;
                }
                round.ids.push(entry.id);
                round.keys.push((shard as u32, slot as u32));
            }
        }
        self.report_round_warnings(round);
        let mut refused = Vec::new();
        let (all_ids, all_keys) = (
            std::mem::take(&mut round.ids),
            std::mem::take(&mut round.keys),
        );
        for (ids, keys) in all_ids
            .chunks(EXTEND_CHUNK)
            .zip(all_keys.chunks(EXTEND_CHUNK))
        {
            refused.clear();
            let sent = Instant::now();
            if let Err(error) = self.source.extend(ids, deadline, &mut refused) {
                // Left as they are: the next round tries again while the deadlines last.
                self.error_log.log(ids.len() as u64, || {
                    format!("Could not extend {} leases: {error}", ids.len())
                });
                continue;
            }
            self.metrics
                .count_extended((ids.len() - refused.len()) as u64);
            let until = self.clock.tick(sent + deadline);
            self.apply(ids, keys, &refused, until, round);
        }
        (round.ids, round.keys) = (all_ids, all_keys);
        self.log_extensions(round);
    }

    /// Records the outcome of one `extend` call in the table.
    fn apply(
        &self,
        ids: &[LeaseId],
        keys: &[(u32, u32)],
        refused: &[LeaseId],
        deadline: Tick,
        round: &mut Round,
    ) {
        // Refusals are rare; a sorted copy makes each check a binary search.
        let mut refused = refused.to_vec();
        refused.sort_unstable();
        let mut lost = 0;
        let mut wakers = Vec::new();
        let mut current: Option<(u32, MutexGuard<'_, Slab<Entry>>)> = None;
        for (&id, &(shard, slot)) in ids.iter().zip(keys) {
            if current.as_ref().map(|(index, _)| *index) != Some(shard) {
                current = Some((shard, self.shard(shard)));
            }
            let Some((_, table)) = current.as_mut() else {
                continue;
            };
            let Some(entry) = table.get_mut(slot as usize) else {
                continue;
            };
            // Settled (and the slot reused) while the call was made: nothing to record.
            if entry.id != id || entry.state != State::Held {
                continue;
            }
            if refused.binary_search(&id).is_ok() {
                entry.state = State::Lost;
                lost += 1;
                round.lost.push(entry.label.clone());
                if let Some(waker) = entry.waker.take() {
                    wakers.push(waker);
                }
                continue;
            }
            entry.deadline = deadline;
            entry.extended += 1;
            if entry.handling {
                round.handled.push(entry.label.clone());
            } else {
                round.waiting += 1;
            }
        }
        drop(current);
        if lost > 0 {
            self.metrics.sub_held(lost);
            self.metrics.count_lost(lost as u64);
            self.lost_epoch.fetch_add(1, Ordering::SeqCst);
            wakers.into_iter().for_each(Waker::wake);
        }
    }

    /// Logs the warnings a round found: leases past `max_lease`.
    fn report_round_warnings(&self, round: &Round) {
        if let Some(first) = round.capped.first() {
            self.metrics.count_max_lease(round.capped.len() as u64);
            self.max_lease_log.log(round.capped.len() as u64, || {
                format!(
                    "Lease of {first} (message id {}) held past --max-lease {}: no longer extended, it will be delivered again{}",
                    first.id(),
                    humantime::format_duration(self.settings.max_lease),
                    others(round.capped.len())
                )
            });
        }
    }

    /// Logs the extensions of a round: one info line per message being handled when few,
    /// else a summary (each line at debug level).
    fn log_extensions(&self, round: &Round) {
        let by = seconds(self.deadline());
        if round.handled.len() <= INFO_LINES_PER_ROUND {
            for message in &round.handled {
                info!("Extended deadline by {by} for {message}");
            }
        } else {
            info!(
                "Extended deadline by {by} for {} messages being handled",
                round.handled.len()
            );
            if log_enabled!(Level::Debug) {
                for message in &round.handled {
                    debug!("Extended deadline by {by} for {message}");
                }
            }
        }
        if round.waiting > 0 {
            debug!(
                "Extended deadline by {by} for {} messages waiting for a handler",
                round.waiting
            );
        }
        if let Some(first) = round.lost.first() {
            self.lost_log.log(round.lost.len() as u64, || {
                format!(
                    "Lost the lease of {first}: dropped its handler, the message will be delivered again{}",
                    others(round.lost.len())
                )
            });
        }
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

/// Scratch space of one extension round, kept between rounds to avoid reallocating.
#[derive(Debug, Default)]
struct Round {
    /// Leases to extend.
    ids: Vec<LeaseId>,
    /// Where each of `ids` is in the table.
    keys: Vec<(u32, u32)>,
    /// Messages being handled whose leases were extended.
    handled: Vec<Label>,
    /// Leases extended while waiting for a handler.
    waiting: usize,
    /// Messages whose leases were lost.
    lost: Vec<Label>,
    /// Messages whose leases reached `max_lease`.
    capped: Vec<Label>,
}

impl Round {
    /// Empties the scratch space, and gives back most of it when it is far larger than the
    /// last round needed (a burst of a million leases must not keep its memory for good).
    fn clear(&mut self) {
        let used = self.ids.len();
        if self.ids.capacity() > 4 * used + 1024 {
            self.ids.shrink_to(2 * used);
            self.keys.shrink_to(2 * used);
            self.handled.shrink_to(2 * used);
        }
        self.ids.clear();
        self.keys.clear();
        self.handled.clear();
        self.waiting = 0;
        self.lost.clear();
        self.capped.clear();
    }
}

/// ` and N others` for a line that stands for several messages.
fn others(count: usize) -> String {
    match count {
        0 | 1 => String::new(),
        2 => " (and 1 other)".to_owned(),
        _ => format!(" (and {} others)", count - 1),
    }
}

/// A duration as the reference logs it: `3 seconds`, or `1.5s` when not whole.
pub(crate) fn seconds(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{} seconds", duration.as_secs())
    } else {
        humantime::format_duration(duration).to_string()
    }
}

impl<'a> LeaseGuard<'a> {
    /// The message.
    pub(crate) fn message(&self) -> &PubSubMessage {
        &self.message
    }

    /// Which delivery of the message this is.
    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The bytes the message counts for in flow control.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// Records that the consumer counted this lease's size in the bytes handed to
    /// handlers ([`Gate::take_bytes`] and the gauge); dropping the guard takes it off
    /// again.
    pub(crate) fn count_size(&mut self) {
        self.size_counted = true;
    }

    /// Removes this guard's entry from its shard's `table` (locked by the caller), if the slot
    /// still holds it. Only the guard removes its entry, and it settles once, so `None` is
    /// not reached in practice; it is treated as a lost lease.
    fn take_entry(&self, table: &mut Slab<Entry>) -> Option<Entry> {
        match table.get(self.slot as usize) {
            Some(entry) if entry.id == self.id => Some(table.remove(self.slot as usize)),
            _ => None,
        }
    }

    /// Gives the message back for another delivery.
    pub(crate) fn nack(mut self) -> Settle {
        self.settled = true;
        self.leaser.settle_nack(&self)
    }

    /// Dead-letters the message at once with `reason`: it can never succeed.
    pub(crate) fn reject(mut self, reason: &str) -> Settle {
        self.settled = true;
        self.leaser.settle_reject(&self, reason)
    }

    /// Completes when the lease is lost (the source refused to extend it) or the handlers
    /// are cancelled. Its first poll marks the handler as started.
    pub(crate) fn interrupted(&self) -> Interruption<'_, 'a> {
        Interruption {
            guard: self,
            seen_epoch: None,
        }
    }
}

impl ExtensionCount for LeaseGuard<'_> {
    fn extensions(&self) -> u32 {
        let table = self.leaser.shard(self.shard);
        match table.get(self.slot as usize) {
            Some(entry) if entry.id == self.id => entry.extended,
            _ => 0,
        }
    }
}

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.settled = true;
            // Whatever the outcome, the message is not lost: a refused or failed nack leaves
            // the lease to expire at the source.
            let _ = self.leaser.settle_nack(self);
        }
        self.leaser.gate.release(1);
        if self.size_counted {
            // The gauge first, then the gate: a consumer adds to the gauge only after the
            // gate let it take, so the gauge never shows more than the gate holds.
            self.leaser.metrics.sub_held_bytes(self.size);
            self.leaser.gate.release_bytes(self.size);
        }
    }
}

/// Why a handler was interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interrupted {
    /// The source took its lease back.
    Lost,
    /// The grace period is over.
    Cancelled,
}

/// The future of [`LeaseGuard::interrupted`].
#[derive(Debug)]
pub(crate) struct Interruption<'g, 'a> {
    /// The lease watched.
    guard: &'g LeaseGuard<'a>,
    /// The lost epoch when last checked; `None` before the first poll.
    seen_epoch: Option<u64>,
}

impl Future for Interruption<'_, '_> {
    type Output = Interrupted;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Interrupted> {
        let leaser = self.guard.leaser;
        // Read before the table: a loss recorded after this load bumps the epoch again, so
        // the next poll looks at the table.
        let epoch = leaser.lost_epoch.load(Ordering::SeqCst);
        let lost = match self.seen_epoch {
            None => leaser.start_handling(self.guard, cx.waker()),
            Some(seen) if seen == epoch => false,
            Some(_) => leaser.is_lost(self.guard),
        };
        self.seen_epoch = Some(epoch);
        if lost {
            Poll::Ready(Interrupted::Lost)
        } else if leaser.is_cancelled() {
            // Checked after the waker is registered: a cancellation that came before saw no
            // waker to wake, but set the flag first.
            Poll::Ready(Interrupted::Cancelled)
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{ManualClock, Publish, Subscription, SubscriptionConfig};

    const DEADLINE: Duration = Duration::from_secs(3);

    #[test]
    fn the_automatic_deadline_follows_the_p99_within_its_bounds() {
        let subscription = Subscription::new(SubscriptionConfig {
            ack_deadline: Duration::from_secs(10),
            max_attempts: 5,
            max_backlog: 100,
        });
        let metrics = Metrics::default();
        let settings = LeaseSettings {
            ack_deadline: Duration::from_secs(10),
            auto: true,
            extend_interval: Duration::from_secs(2),
            max_lease: Duration::from_secs(3600),
        };
        let leaser = Leaser::new(&subscription, &metrics, 10, usize::MAX, 1, settings);
        // No handling time yet: the least deadline, extended with a third of it left.
        leaser.follow_handling_times();
        assert_eq!(leaser.deadline(), AUTO_MIN_DEADLINE);
        assert_eq!(settings.margin(leaser.deadline()), AUTO_MIN_DEADLINE / 3);
        // Short handlers keep the least deadline.
        for _ in 0..100 {
            metrics.record_latency(Duration::from_millis(700));
        }
        leaser.follow_handling_times();
        assert_eq!(leaser.deadline(), AUTO_MIN_DEADLINE);
        // Long ones: the p99 (a bucket bound, at most 1/16 above), in whole seconds.
        for _ in 0..1000 {
            metrics.record_latency(Duration::from_secs(30));
        }
        leaser.follow_handling_times();
        let deadline = leaser.deadline();
        assert!(
            (Duration::from_secs(30)..=Duration::from_secs(32)).contains(&deadline),
            "{deadline:?}"
        );
        assert_eq!(deadline.subsec_nanos(), 0);
        assert_eq!(settings.period(deadline), deadline / 6);
        // Never above 10 minutes.
        for _ in 0..100_000 {
            metrics.record_latency(Duration::from_secs(3600));
        }
        leaser.follow_handling_times();
        assert_eq!(leaser.deadline(), AUTO_MAX_DEADLINE);
    }

    #[test]
    fn a_buffer_of_acks_spanning_shards_reports_each_lease() {
        let clock = Arc::new(ManualClock::new());
        let config = SubscriptionConfig {
            ack_deadline: DEADLINE,
            max_attempts: 5,
            max_backlog: 100,
        };
        let subscription = Subscription::with_clock(config, clock.clone());
        let mut rng = fastrand::Rng::with_seed(3);
        let envelopes: Vec<PubSubMessage> =
            (0..3).map(|_| PubSubMessage::random(&mut rng)).collect();
        subscription.publish(&envelopes).unwrap();
        let metrics = Metrics::default();
        let settings = LeaseSettings {
            ack_deadline: DEADLINE,
            auto: false,
            extend_interval: Duration::from_secs(1),
            max_lease: Duration::from_secs(3600),
        };
        let leaser = Leaser::new(&subscription, &metrics, 10, usize::MAX, 1, settings);
        // Two pulls, two shards: the first pull's leases expire at the source before the
        // acks, the second's do not.
        let mut guards = Vec::new();
        for count in [2, 1] {
            assert_eq!(leaser.gate().acquire(count), count);
            let mut leases = Vec::new();
            subscription
                .pull(count, Duration::ZERO, &mut leases)
                .unwrap();
            assert_eq!(leases.len(), count);
            leaser.admit(leases.into_iter(), Instant::now(), &mut guards);
            clock.advance(DEADLINE - Duration::from_secs(1));
        }
        assert_ne!(guards[0].shard, guards[2].shard);
        // Interleaved, so that the shards alternate within the buffer.
        let order = [0, 2, 1];
        let mut slots: Vec<Option<LeaseGuard<'_>>> = guards.into_iter().map(Some).collect();
        let mut batch: Vec<Finished<'_>> = order
            .iter()
            .map(|&index| Finished {
                guard: slots[index].take().unwrap(),
                started: Instant::now(),
            })
            .collect();
        let mut outcomes = Vec::new();
        leaser.ack_all(&mut batch, &mut outcomes);
        assert_eq!(outcomes, [Settle::Refused, Settle::Done, Settle::Refused]);
        let report = metrics.report(&crate::source::SourceStats::default());
        assert_eq!((report.acked, report.stale_acks), (1, 2), "{report:?}");
        assert_eq!(leaser.held(), 0, "every lease left the table");
        assert_eq!(
            leaser.gate().in_flight(),
            3,
            "the guards still hold their permits"
        );
        drop(batch);
        assert_eq!(leaser.gate().in_flight(), 0);
    }
}
