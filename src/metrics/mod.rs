//! Counters of the handlers, a lock-free latency histogram, and the final [`Report`].

use std::sync::atomic::{AtomicU64, Ordering};

mod histogram;
mod report;
mod striped;

pub use histogram::LatencySnapshot;
use histogram::BUCKETS;
pub use report::{Report, REPORT_SCHEMA_VERSION};
pub(crate) use striped::Striped;
use striped::STRIPES;

/// Counters the handlers and the runner update while the service runs.
///
/// All of them are atomics updated with relaxed ordering: they are statistics, read once the
/// threads that write them have been joined (or approximately, while running).
#[derive(Debug)]
pub struct Metrics {
    /// Deliveries pulled by the consumers (a redelivered message counts again).
    delivered: AtomicU64,
    /// Deliveries of a message that had been delivered before.
    redelivered: AtomicU64,
    /// Leases acked (striped: every handler task adds to it).
    acked: Striped,
    /// Leases nacked (handler errors, panics, cancellations, shutdown).
    nacked: AtomicU64,
    /// Successful lease extensions.
    extended: AtomicU64,
    /// Acks the source refused because the lease was not held any more.
    stale_acks: AtomicU64,
    /// Leases whose extension the source refused while they were held (their handler was
    /// dropped; the message is delivered again).
    lost: AtomicU64,
    /// Leases held past `--max-lease`, which the lease manager stopped extending.
    max_lease: AtomicU64,
    /// Restart attempts that failed (each try counts).
    restart_failed: AtomicU64,
    /// Restart attempts made again after a failure.
    restart_retried: AtomicU64,
    /// Saves that failed.
    save_failed: AtomicU64,
    /// Handlers that panicked.
    panicked: AtomicU64,
    /// Handlers cancelled at the end of the grace period.
    cancelled: AtomicU64,
    /// Handlers that ran longer than `--debug-slow`.
    slow: AtomicU64,
    /// Polls of a handler that blocked an executor thread longer than `--blocking-threshold`.
    blocking: AtomicU64,
    /// Handlers dropped by the [`Timeout`](crate::layer::Timeout) layer.
    timed_out: AtomicU64,
    /// Handler starts the [`RateLimit`](crate::layer::RateLimit) layer delayed.
    rate_limited: AtomicU64,
    /// Times a [`Breaker`](crate::layer::Breaker) opened.
    breaker_opened: AtomicU64,
    /// Messages a [`Breaker`](crate::layer::Breaker) held back while it was open.
    breaker_held: AtomicU64,
    /// Saves that waited for a connection of the simulated database.
    db_queued: AtomicU64,
    /// Saves that gave up waiting for a connection.
    db_gave_up: AtomicU64,
    /// Saves that failed because the simulated database was down.
    db_outage: AtomicU64,
    /// Messages rejected by their handler ([`HandleError::Rejected`](crate::HandleError)):
    /// dead-lettered at once.
    rejected: AtomicU64,
    /// Messages pulled and not yet settled (the flow-control window in use).
    in_flight: Striped,
    /// Bytes of the messages held ([`PubSubMessage::size`](crate::PubSubMessage::size)).
    in_flight_bytes: Striped,
    /// The flow-control window: `--max-in-flight`, or where `auto` has moved it.
    window: AtomicU64,
    /// Messages handled to an ack, by handling time in microseconds (log-linear buckets).
    /// One histogram per stripe, side by side: threads recording the same bucket write to
    /// different cache lines.
    latency: Box<[AtomicU64]>,
    /// Sum of the handling times in `latency`, in microseconds.
    latency_sum_micros: Striped,
    /// Sum of the same messages' times from their task's spawn to the ack, in
    /// microseconds: the adaptive window's latency signal (see [`Metrics::latency_totals`]).
    running_sum_micros: Striped,
    /// The longest handling time in `latency`, in microseconds (exact, not a bucket bound).
    latency_max_micros: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            delivered: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            acked: Striped::default(),
            nacked: AtomicU64::new(0),
            extended: AtomicU64::new(0),
            stale_acks: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            max_lease: AtomicU64::new(0),
            restart_failed: AtomicU64::new(0),
            restart_retried: AtomicU64::new(0),
            save_failed: AtomicU64::new(0),
            panicked: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            slow: AtomicU64::new(0),
            blocking: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            breaker_opened: AtomicU64::new(0),
            breaker_held: AtomicU64::new(0),
            db_queued: AtomicU64::new(0),
            db_gave_up: AtomicU64::new(0),
            db_outage: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            in_flight: Striped::default(),
            in_flight_bytes: Striped::default(),
            window: AtomicU64::new(0),
            latency: (0..BUCKETS * STRIPES).map(|_| AtomicU64::new(0)).collect(),
            latency_sum_micros: Striped::default(),
            running_sum_micros: Striped::default(),
            latency_max_micros: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Counts one failed restart attempt.
    pub fn count_restart_failed(&self) {
        self.restart_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one retry of a restart.
    pub fn count_restart_retried(&self) {
        self.restart_retried.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one failed save.
    pub fn count_save_failed(&self) {
        self.save_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one handler dropped past its time limit (the [`Timeout`](crate::layer::Timeout)
    /// layer).
    pub fn count_timed_out(&self) {
        self.timed_out.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one handler start delayed by a rate limit (the
    /// [`RateLimit`](crate::layer::RateLimit) layer).
    pub fn count_rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one opening of a circuit breaker (the [`Breaker`](crate::layer::Breaker) layer).
    pub fn count_breaker_opened(&self) {
        self.breaker_opened.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one message held back by an open circuit breaker.
    pub fn count_breaker_held(&self) {
        self.breaker_held.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one save that waited for a database connection.
    pub fn count_db_queued(&self) {
        self.db_queued.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one save that gave up waiting for a database connection.
    pub fn count_db_gave_up(&self) {
        self.db_gave_up.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one save failed by a database outage.
    pub fn count_db_outage(&self) {
        self.db_outage.fetch_add(1, Ordering::Relaxed);
    }

    /// Handlers dropped past their time limit so far.
    pub fn timed_out(&self) -> u64 {
        load(&self.timed_out)
    }

    /// Handler starts delayed by a rate limit so far.
    pub fn rate_limited(&self) -> u64 {
        load(&self.rate_limited)
    }

    /// Openings of a circuit breaker so far.
    pub fn breaker_opened(&self) -> u64 {
        load(&self.breaker_opened)
    }

    /// Messages held back by an open circuit breaker so far.
    pub fn breaker_held(&self) -> u64 {
        load(&self.breaker_held)
    }

    /// Counts deliveries pulled, `redelivered` of them delivered before.
    pub(crate) fn count_delivered(&self, delivered: u64, redelivered: u64) {
        self.delivered.fetch_add(delivered, Ordering::Relaxed);
        if redelivered > 0 {
            self.redelivered.fetch_add(redelivered, Ordering::Relaxed);
        }
    }

    pub(crate) fn count_acked(&self, count: u64) {
        self.acked.add(count);
    }

    pub(crate) fn count_nacked(&self, count: u64) {
        self.nacked.fetch_add(count, Ordering::Relaxed);
    }

    pub(crate) fn count_extended(&self, count: u64) {
        self.extended.fetch_add(count, Ordering::Relaxed);
    }

    pub(crate) fn count_rejected(&self, count: u64) {
        self.rejected.fetch_add(count, Ordering::Relaxed);
    }

    pub(crate) fn count_stale_acks(&self, count: u64) {
        self.stale_acks.fetch_add(count, Ordering::Relaxed);
    }

    pub(crate) fn count_lost(&self, count: u64) {
        self.lost.fetch_add(count, Ordering::Relaxed);
    }

    pub(crate) fn count_max_lease(&self, count: u64) {
        self.max_lease.fetch_add(count, Ordering::Relaxed);
    }

    /// Leases acked so far.
    pub fn acked(&self) -> u64 {
        self.acked.sum()
    }

    /// Leases nacked so far.
    pub fn nacked(&self) -> u64 {
        load(&self.nacked)
    }

    /// Redeliveries so far.
    pub fn redelivered(&self) -> u64 {
        load(&self.redelivered)
    }

    /// Leases lost so far (the source refused to extend them while held).
    pub fn lost(&self) -> u64 {
        load(&self.lost)
    }

    pub(crate) fn count_panicked(&self) {
        self.panicked.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_slow_many(&self, count: u64) {
        self.slow.fetch_add(count, Ordering::Relaxed);
    }

    pub(crate) fn count_blocking(&self) {
        self.blocking.fetch_add(1, Ordering::Relaxed);
    }

    /// Leases held now: pulled and not yet acked, nacked or lost (permits a consumer reserved
    /// for a pull that has not returned yet do not count).
    pub fn in_flight(&self) -> usize {
        usize::try_from(self.in_flight.sum()).unwrap_or(0)
    }

    /// The flow-control window now: `--max-in-flight`, or where `auto` has moved it (0 before
    /// a run set it).
    pub fn window(&self) -> usize {
        usize::try_from(load(&self.window)).unwrap_or(usize::MAX)
    }

    /// Records the flow-control window.
    pub(crate) fn set_window(&self, window: usize) {
        self.window.store(window as u64, Ordering::Relaxed);
    }

    /// Messages acked so far and the sum of their times from the spawn of their task to
    /// the ack, in microseconds: the adaptive window reads their growth between two samples.
    /// Not the handling time of the report, which starts earlier, at the hand-off to the
    /// executor threads: the wait before a spawn is the window's own backlog (the executor
    /// threads spawn only as fast as they start tasks), and counting it in the base latency
    /// anchored the window where it was already congested (a CPU-bound handler of 50 µs:
    /// a window of 2,500-3,000 and a p99 of 82 ms, against 256 and under 5 ms).
    pub(crate) fn latency_totals(&self) -> (u64, u64) {
        (self.acked.sum(), self.running_sum_micros.sum())
    }

    /// Records the time from a task's spawn to its ack (see [`Metrics::latency_totals`]).
    pub(crate) fn record_running(&self, took: std::time::Duration) {
        self.running_sum_micros
            .add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    /// Counts leases taken into the lease manager.
    pub(crate) fn add_held(&self, count: usize) {
        self.in_flight.add(count as u64);
    }

    /// Counts leases that left the lease manager.
    pub(crate) fn sub_held(&self, count: usize) {
        self.in_flight.sub(count as u64);
    }

    /// Counts bytes of messages taken into the lease manager.
    pub(crate) fn add_held_bytes(&self, bytes: usize) {
        self.in_flight_bytes.add(bytes as u64);
    }

    /// Counts bytes of messages whose permits came back.
    pub(crate) fn sub_held_bytes(&self, bytes: usize) {
        if bytes > 0 {
            self.in_flight_bytes.sub(bytes as u64);
        }
    }

    /// Bytes of the messages held now.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes.sum()
    }

    /// Messages rejected by their handler so far.
    pub fn rejected(&self) -> u64 {
        load(&self.rejected)
    }

    /// Starts the gauges of leases held from zero (a new run).
    pub(crate) fn reset_held(&self) {
        self.in_flight.reset();
        self.in_flight_bytes.reset();
    }

    /// Failed restart attempts so far.
    pub fn restart_failed(&self) -> u64 {
        self.restart_failed.load(Ordering::Relaxed)
    }

    /// Restart retries so far.
    pub fn restart_retried(&self) -> u64 {
        self.restart_retried.load(Ordering::Relaxed)
    }

    /// Failed saves so far.
    pub fn save_failed(&self) -> u64 {
        self.save_failed.load(Ordering::Relaxed)
    }
}

/// Reads a counter (relaxed: the values are statistics).
fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}
