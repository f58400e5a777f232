//! Counters of the handlers, a lock-free latency histogram, and the final [`Report`].

use std::fmt;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::source::SourceStats;

/// Sub-buckets per power of two of the latency histogram: values are kept to within 1/16.
const SUB_BUCKETS: u32 = 16;
/// Powers of two covered, in microseconds: up to 2^40 µs (about 12 days).
const POWERS: u32 = 40;
/// Number of histogram buckets.
const BUCKETS: usize = ((POWERS + 1) * SUB_BUCKETS) as usize;

/// Stripes of the counters that every handler task updates.
const STRIPES: usize = 8;

/// A counter split into cache-line-sized stripes, one per thread (modulo [`STRIPES`]): the
/// executor threads add to it for every message, and a single atomic would bounce between
/// their cores. Reads sum the stripes.
#[derive(Debug, Default)]
pub(crate) struct Striped([Padded; STRIPES]);

/// One stripe, alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Padded(AtomicU64);

impl Striped {
    pub(crate) fn add(&self, count: u64) {
        self.0[stripe()].0.fetch_add(count, Ordering::Relaxed);
    }

    /// Takes `count` away; a stripe may wrap below zero, the sum does not.
    pub(crate) fn sub(&self, count: u64) {
        self.0[stripe()].0.fetch_sub(count, Ordering::Relaxed);
    }

    fn reset(&self) {
        self.0
            .iter()
            .for_each(|padded| padded.0.store(0, Ordering::Relaxed));
    }

    /// The total. Wrapping: a gauge's stripes may each be "negative" (one thread adds what
    /// another takes away), while their sum never is.
    pub(crate) fn sum(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |sum, padded| sum.wrapping_add(load(&padded.0)))
    }
}

/// The stripe of the calling thread: threads get consecutive stripes as they first count.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|stripe| *stripe)
}

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

    /// Messages acked so far and the sum of their handling times in microseconds: the
    /// adaptive window reads their growth between two samples.
    pub(crate) fn latency_totals(&self) -> (u64, u64) {
        (self.acked.sum(), self.latency_sum_micros.sum())
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

    /// Records how long handling one message took.
    pub(crate) fn record_latency(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.latency[stripe() * BUCKETS + bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.add(micros);
        // A read first: the maximum rarely changes, and a read leaves the line shared.
        if micros > self.latency_max_micros.load(Ordering::Relaxed) {
            self.latency_max_micros.fetch_max(micros, Ordering::Relaxed);
        }
    }

    /// The longest handling time recorded, in milliseconds (0 with no samples).
    fn max_latency_ms(&self) -> f64 {
        load(&self.latency_max_micros) as f64 / 1000.0
    }

    /// A report of the service so far: these metrics with a source's counters, as the
    /// `reason` `running`, with no elapsed time and seed 0.
    pub fn report(&self, stats: &SourceStats) -> Report {
        Report::new(*stats, self, Duration::ZERO, 0, "running")
    }

    /// The Prometheus text exposition of these metrics and of a source's counters: every
    /// counter of the [`Report`] (from the one table that also drives the text and JSON
    /// reports), the `mayhem_in_flight` gauge and the `mayhem_handling_seconds` histogram.
    ///
    /// ```
    /// let metrics = mayhem::Metrics::default();
    /// let text = metrics.prometheus(&mayhem::SourceStats::default());
    /// assert!(text.contains("# TYPE mayhem_acked_total counter\nmayhem_acked_total 0\n"));
    /// assert!(text.contains("# TYPE mayhem_remaining gauge\nmayhem_remaining 0\n"));
    /// assert!(text.contains("mayhem_handling_seconds_bucket{le=\"+Inf\"} 0\n"));
    /// ```
    pub fn prometheus(&self, stats: &SourceStats) -> String {
        self.report(stats).prometheus(self)
    }

    /// Appends the `mayhem_handling_seconds` histogram in Prometheus text format.
    fn write_histogram(&self, out: &mut String) {
        let _ = write!(out, "# HELP mayhem_handling_seconds Handling time of acked messages.\n# TYPE mayhem_handling_seconds histogram\n");
        let counts = self.bucket_counts();
        for le in [
            0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ] {
            // A fine bucket counts below `le` when all its values are (a conservative count).
            let below: u64 = counts
                .iter()
                .enumerate()
                .filter(|(bucket, _)| (upper_bound_of(*bucket) as f64) < le * 1e6)
                .map(|(_, count)| count)
                .sum();
            let _ = writeln!(out, "mayhem_handling_seconds_bucket{{le=\"{le}\"}} {below}");
        }
        let total: u64 = counts.iter().sum();
        let _ = write!(
            out,
            "mayhem_handling_seconds_bucket{{le=\"+Inf\"}} {total}\nmayhem_handling_seconds_sum {}\nmayhem_handling_seconds_count {total}\n",
            self.latency_sum_micros.sum() as f64 / 1e6
        );
    }

    /// The histogram's counts per bucket, summed over the stripes.
    fn bucket_counts(&self) -> Vec<u64> {
        let mut counts = vec![0; BUCKETS];
        for stripe in self.latency.chunks(BUCKETS) {
            for (count, cell) in counts.iter_mut().zip(stripe) {
                *count += load(cell);
            }
        }
        counts
    }

    /// The latency at quantile `q` (0..=1) in milliseconds, or 0 with no samples.
    pub(crate) fn latency_quantile_ms(&self, q: f64) -> f64 {
        let counts = self.bucket_counts();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        // The rank of the sample at quantile q, counting from 1.
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return upper_bound_of(bucket) as f64 / 1000.0;
            }
        }
        upper_bound_of(BUCKETS - 1) as f64 / 1000.0
    }
}

/// The histogram bucket of a value in microseconds.
fn bucket_of(micros: u64) -> usize {
    if micros < u64::from(SUB_BUCKETS) {
        return micros as usize;
    }
    // Values in [2^p, 2^(p+1)) with p >= 4 split into SUB_BUCKETS equal parts.
    let power = 63 - micros.leading_zeros();
    let sub = (micros >> (power - SUB_BUCKETS.trailing_zeros())) - u64::from(SUB_BUCKETS);
    let bucket = (power - SUB_BUCKETS.trailing_zeros()) * SUB_BUCKETS + SUB_BUCKETS + sub as u32;
    (bucket as usize).min(BUCKETS - 1)
}

/// The largest value in microseconds that falls into `bucket`.
fn upper_bound_of(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    let sub_buckets = u64::from(SUB_BUCKETS);
    if bucket < sub_buckets {
        return bucket;
    }
    let shift = bucket / sub_buckets - 1;
    let sub = bucket % sub_buckets;
    ((sub_buckets + sub + 1) << shift) - 1
}

/// The kind of a value in the counter table: how `/metrics` exposes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Only ever grows: exposed as `mayhem_<name>_total`, a Prometheus counter.
    Total,
    /// A level that goes up and down: exposed as `mayhem_<name>`, a Prometheus gauge.
    Level,
}

/// One row of the counter table.
struct Counter {
    /// The field of [`Report`], the name in the text and JSON reports, and (with the prefix
    /// `mayhem_` and, for a [`Kind::Total`], the suffix `_total`) the name in `/metrics`.
    name: &'static str,
    /// How `/metrics` exposes it.
    kind: Kind,
    /// One sentence saying what it counts: the field's documentation and the `# HELP` text.
    help: &'static str,
    /// Reads it from a report.
    get: fn(&Report) -> u64,
    /// Its label in the `Stats: ...` line, where it is shown once it is not zero; `None`
    /// leaves it out (the line's fixed part names the usual counters itself).
    line: Option<&'static str>,
}

/// The optional stats-line label of a row of [`counters!`]: `None` unless the row gives one.
macro_rules! stats_label {
    () => {
        None
    };
    ($label:literal) => {
        Some($label)
    };
}

/// Declares every counter of the service once. Each row gives its name, its [`Kind`], its
/// help text, and how it is read from the source's counters (`stats`) and the handlers'
/// metrics (`metrics`); a row may add `["label"]` after its kind to appear in the stats
/// line under that label once it is not zero. From the rows come the counter fields of [`Report`], their values in
/// [`Report::new`], and the table that the text report, the JSON report and the Prometheus
/// exposition iterate: adding a counter is one row (plus the code that counts it).
macro_rules! counters {
    ($(
        $name:ident: $kind:ident $([$label:literal])?, $help:literal, |$stats:ident, $metrics:ident| $read:expr;
    )*) => {
        /// What the service did, printed when it ends.
        ///
        /// The accounting invariant `published == acked + dead_lettered + remaining` holds in
        /// every report of the in-memory source: every message is acked, dead-lettered, or
        /// still in the subscription. Fields may be added in minor releases, so the struct is
        /// `#[non_exhaustive]`; [`Report::to_json`] carries a `schema_version`.
        #[derive(Debug, Clone, PartialEq)]
        #[non_exhaustive]
        pub struct Report {
            $(
                #[doc = $help]
                pub $name: u64,
            )*
            /// Wall time of the run in seconds (to the microsecond).
            pub elapsed_secs: f64,
            /// Acked messages per second of the run.
            pub acked_per_sec: f64,
            /// Median handling time of acked messages, in milliseconds.
            ///
            /// This is the upper bound of the histogram bucket that holds the median, capped
            /// at `max_ms`: never below the true median and at most 1/16 (6.25 %) above it
            /// (exact below 16 µs). 0 when no message was acked.
            pub p50_ms: f64,
            /// 99th percentile handling time of acked messages, in milliseconds, with the
            /// precision of `p50_ms`.
            pub p99_ms: f64,
            /// Longest handling time of an acked message, in milliseconds: exact to the
            /// microsecond (not a bucket bound).
            pub max_ms: f64,
            /// The seed of the run's random choices, to reproduce it with `--seed`.
            pub seed: u64,
            /// Why the service stopped: `signal`, `requested`, `completed`, `panicked` or
            /// `failed` (see [`ShutdownReason::kind`](crate::ShutdownReason::kind)); `running`
            /// in a snapshot taken with [`Metrics::report`] while it runs.
            pub reason: &'static str,
        }

        /// Every counter of [`Report`], in report order.
        const COUNTERS: &[Counter] = &[
            $(
                Counter {
                    name: stringify!($name),
                    kind: Kind::$kind,
                    help: $help,
                    get: |report| report.$name,
                    line: stats_label!($($label)?),
                },
            )*
        ];

        impl Report {
            /// Builds the report from the source's counters and the handlers' metrics.
            pub(crate) fn new(
                stats: SourceStats,
                metrics: &Metrics,
                elapsed: Duration,
                seed: u64,
                reason: &'static str,
            ) -> Self {
                let elapsed_secs = elapsed.as_secs_f64();
                let max_ms = metrics.max_latency_ms();
                let acked = metrics.acked.sum();
                Report {
                    $(
                        $name: {
                            let $stats = &stats;
                            let $metrics = metrics;
                            $read
                        },
                    )*
                    elapsed_secs,
                    acked_per_sec: if elapsed_secs > 0.0 {
                        acked as f64 / elapsed_secs
                    } else {
                        0.0
                    },
                    p50_ms: metrics.latency_quantile_ms(0.50).min(max_ms),
                    p99_ms: metrics.latency_quantile_ms(0.99).min(max_ms),
                    max_ms,
                    seed,
                    reason,
                }
            }
        }
    };
}

counters! {
    published: Total, "Messages published.", |stats, _metrics| stats.published;
    consumed: Total, "Deliveries pulled by the consumers (a redelivered message counts again).",
        |_stats, metrics| load(&metrics.delivered);
    acked: Total, "Messages acked.", |_stats, metrics| metrics.acked.sum();
    nacked: Total, "Leases nacked (handler errors, panics, cancellations, shutdown).",
        |_stats, metrics| load(&metrics.nacked);
    redelivered: Total, "Deliveries of a message delivered before.",
        |_stats, metrics| load(&metrics.redelivered);
    expired: Total, "Leases that expired at the source without ack or extension.",
        |stats, _metrics| stats.expired;
    extended: Total, "Lease extensions.", |_stats, metrics| load(&metrics.extended);
    dead_lettered: Total, "Messages dead-lettered (after max_attempts deliveries, or rejected).",
        |stats, _metrics| stats.dead_lettered;
    rejected: Total, "Messages dead-lettered at once: rejected by their handler, or not decodable.",
        |stats, metrics| load(&metrics.rejected) + stats.undecodable;
    stale_acks: Total, "Acks refused because the lease had expired.",
        |stats, metrics| load(&metrics.stale_acks) + stats.late_refusals;
    lost_leases: Total, "Leases the source took back while they were held (their handlers were dropped).",
        |_stats, metrics| load(&metrics.lost);
    capped_leases: Total, "Leases held past --max-lease and no longer extended.",
        |_stats, metrics| load(&metrics.max_lease);
    restart_failed: Total, "Failed restart attempts.",
        |_stats, metrics| load(&metrics.restart_failed);
    restart_retried: Total, "Restart retries.", |_stats, metrics| load(&metrics.restart_retried);
    save_failed: Total, "Failed saves.", |_stats, metrics| load(&metrics.save_failed);
    panicked: Total, "Handlers that panicked.", |_stats, metrics| load(&metrics.panicked);
    cancelled: Total, "Handlers cancelled after the grace period.",
        |_stats, metrics| load(&metrics.cancelled);
    slow_handlers: Total, "Handlers that ran longer than --debug-slow.",
        |_stats, metrics| load(&metrics.slow);
    blocking_polls: Total, "Handler polls that blocked a thread past --blocking-threshold.",
        |_stats, metrics| load(&metrics.blocking);
    timed_out: Total ["timed out"], "Handlers dropped past --handler-timeout (their messages nacked).",
        |_stats, metrics| load(&metrics.timed_out);
    rate_limited: Total ["rate-limited"], "Handler starts delayed by --rate-limit.",
        |_stats, metrics| load(&metrics.rate_limited);
    breaker_opened: Total ["breaker opened"], "Times the circuit breaker opened.",
        |_stats, metrics| load(&metrics.breaker_opened);
    breaker_held: Total ["breaker held"], "Messages the open circuit breaker held back (they waited instead of failing).",
        |_stats, metrics| load(&metrics.breaker_held);
    db_queued: Total ["db queued"], "Saves that waited for a connection (--db-capacity).",
        |_stats, metrics| load(&metrics.db_queued);
    db_gave_up: Total ["db gave up"], "Saves that failed after waiting --db-patience for a connection.",
        |_stats, metrics| load(&metrics.db_gave_up);
    db_outage: Total ["db outage"], "Saves that failed during --db-outage.",
        |_stats, metrics| load(&metrics.db_outage);
    remaining: Level, "Messages ready or leased in the subscription (at exit: left in it).",
        |stats, _metrics| stats.remaining;
}

/// Reads a counter (relaxed: the values are statistics).
fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl Metrics {
    /// The part of the `Stats: ...` line that the counter table adds: `, {label} {value}`
    /// for every row with a stats-line label whose value is not zero (empty when none is).
    ///
    /// ```
    /// let metrics = mayhem::Metrics::default();
    /// assert_eq!(metrics.stats_line_extras(), "");
    /// metrics.count_timed_out();
    /// assert_eq!(metrics.stats_line_extras(), ", timed out 1");
    /// ```
    pub fn stats_line_extras(&self) -> String {
        let report = self.report(&SourceStats::default());
        let mut out = String::new();
        for counter in COUNTERS {
            let value = (counter.get)(&report);
            if let (Some(label), 1..) = (counter.line, value) {
                let _ = write!(out, ", {label} {value}");
            }
        }
        out
    }
}

/// The version of the JSON report's layout, incremented when a field changes meaning or
/// type, or is removed (adding a field does not change it).
pub const REPORT_SCHEMA_VERSION: u32 = 1;

impl Report {
    /// Whether every published message is accounted for:
    /// `published == acked + dead_lettered + remaining`.
    pub fn is_balanced(&self) -> bool {
        self.published == self.acked + self.dead_lettered + self.remaining
    }

    /// The report as one JSON object on one line.
    ///
    /// The first field is `schema_version` ([`REPORT_SCHEMA_VERSION`]); then every counter
    /// as an integer, `elapsed_secs`, `acked_per_sec`, `p50_ms`, `p99_ms` and `max_ms` as
    /// numbers, and `seed` and `reason` as strings. The seed is a string because it is a
    /// 64-bit integer, which JSON readers that hold numbers as doubles (jq, JavaScript) would
    /// round above 2^53.
    ///
    /// ```
    /// let metrics = mayhem::Metrics::default();
    /// let json = metrics.report(&mayhem::SourceStats::default()).to_json();
    /// assert!(json.starts_with("{\"schema_version\":1,\"published\":0,"), "{json}");
    /// assert!(json.ends_with(",\"seed\":\"0\",\"reason\":\"running\"}"), "{json}");
    /// ```
    pub fn to_json(&self) -> String {
        let mut out = format!("{{\"schema_version\":{REPORT_SCHEMA_VERSION}");
        for (name, value) in self.fields() {
            let _ = write!(out, ",\"{name}\":{value}");
        }
        let _ = write!(
            out,
            ",\"seed\":\"{}\",\"reason\":\"{}\"}}",
            self.seed, self.reason
        );
        out
    }

    /// The Prometheus text exposition of the report's counters, plus the live values only
    /// `metrics` has: the `mayhem_in_flight` gauge and the `mayhem_handling_seconds`
    /// histogram.
    pub fn prometheus(&self, metrics: &Metrics) -> String {
        let mut out = String::new();
        for counter in COUNTERS {
            let (name, help, value) = (counter.name, counter.help, (counter.get)(self));
            let (series, kind) = match counter.kind {
                Kind::Total => (format!("mayhem_{name}_total"), "counter"),
                Kind::Level => (format!("mayhem_{name}"), "gauge"),
            };
            let _ = write!(
                out,
                "# HELP {series} {help}\n# TYPE {series} {kind}\n{series} {value}\n"
            );
        }
        let _ = write!(
            out,
            concat!(
                "# HELP mayhem_in_flight Messages pulled and not yet settled.\n",
                "# TYPE mayhem_in_flight gauge\nmayhem_in_flight {}\n",
                "# HELP mayhem_in_flight_bytes Bytes of the messages pulled and not yet settled.\n",
                "# TYPE mayhem_in_flight_bytes gauge\nmayhem_in_flight_bytes {}\n",
                "# HELP mayhem_window The flow-control window (--max-in-flight, or where auto moved it).\n",
                "# TYPE mayhem_window gauge\nmayhem_window {}\n"
            ),
            metrics.in_flight(),
            metrics.in_flight_bytes(),
            metrics.window()
        );
        metrics.write_histogram(&mut out);
        out
    }

    /// The numeric fields by name, formatted: every counter, then the timings.
    fn fields(&self) -> Vec<(&'static str, String)> {
        let mut fields: Vec<(&'static str, String)> = COUNTERS
            .iter()
            .map(|counter| (counter.name, (counter.get)(self).to_string()))
            .collect();
        fields.extend([
            ("elapsed_secs", format!("{:.6}", self.elapsed_secs)),
            ("acked_per_sec", format!("{:.1}", self.acked_per_sec)),
            ("p50_ms", format!("{:.3}", self.p50_ms)),
            ("p99_ms", format!("{:.3}", self.p99_ms)),
            ("max_ms", format!("{:.3}", self.max_ms)),
        ]);
        fields
    }
}

impl fmt::Display for Report {
    /// One `name: value` line per field.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, value) in self.fields() {
            writeln!(f, "{name:<16}{value}")?;
        }
        writeln!(f, "{:<16}{}", "seed", self.seed)?;
        write!(f, "{:<16}{}", "reason", self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_their_values() {
        for micros in (0..5000u64).chain([65_535, 1_000_000, 3_600_000_000]) {
            let bucket = bucket_of(micros);
            assert!(
                upper_bound_of(bucket) >= micros,
                "{micros} in bucket {bucket}"
            );
            if bucket > 0 {
                assert!(
                    upper_bound_of(bucket - 1) < micros,
                    "{micros} in bucket {bucket}"
                );
            }
            // Relative error stays within one sixteenth.
            assert!(upper_bound_of(bucket) as f64 <= micros as f64 * 1.0625 + 1.0);
        }
    }

    #[test]
    fn quantiles_follow_samples() {
        let metrics = Metrics::default();
        for ms in 1..=100u64 {
            metrics.record_latency(Duration::from_millis(ms));
        }
        let p50 = metrics.latency_quantile_ms(0.5);
        let p99 = metrics.latency_quantile_ms(0.99);
        assert!((50.0..=53.2).contains(&p50), "p50 {p50}");
        assert!((99.0..=105.2).contains(&p99), "p99 {p99}");
        assert!(metrics.latency_quantile_ms(1.0) >= 100.0);
    }

    #[test]
    fn max_is_exact_and_bounds_the_quantiles() {
        let metrics = Metrics::default();
        for micros in [100, 1_234, 65_537] {
            metrics.record_latency(Duration::from_micros(micros));
        }
        let report = metrics.report(&SourceStats::default());
        // 65.537 ms falls in the bucket up to 67.583 ms: the maximum is not that bound.
        assert_eq!(report.max_ms, 65.537);
        assert_eq!(report.p99_ms, 65.537, "capped at the maximum");
        assert!(report.p50_ms >= 1.234 && report.p50_ms <= 1.234 * 1.0625);
    }

    fn sample_report() -> Report {
        let stats = SourceStats {
            published: 11,
            remaining: 3,
            dead_lettered: 1,
            expired: 2,
            late_refusals: 1,
            undecodable: 0,
        };
        let metrics = Metrics::default();
        metrics.count_delivered(12, 3);
        metrics.count_acked(7);
        metrics.count_nacked(5);
        metrics.count_extended(9);
        metrics.count_stale_acks(3);
        metrics.count_restart_failed();
        metrics.count_slow_many(1);
        metrics.record_latency(Duration::from_micros(2_500));
        Report::new(
            stats,
            &metrics,
            Duration::from_micros(123),
            u64::MAX - 1,
            "completed",
        )
    }

    #[test]
    fn json_has_a_schema_version_a_string_seed_and_fine_elapsed_time() {
        let json = sample_report().to_json();
        assert!(json.starts_with("{\"schema_version\":1,"), "{json}");
        // Above 2^53: a number would be rounded by jq and JavaScript.
        assert!(
            json.contains(",\"seed\":\"18446744073709551614\","),
            "{json}"
        );
        assert!(json.contains(",\"elapsed_secs\":0.000123,"), "{json}");
        assert!(json.contains(",\"consumed\":12,"), "{json}");
        assert!(json.contains(",\"max_ms\":2.500,"), "{json}");
        assert!(json.ends_with(",\"reason\":\"completed\"}"), "{json}");
    }

    #[test]
    fn one_table_drives_the_text_the_json_and_the_exposition() {
        let report = sample_report();
        let metrics = Metrics::default();
        let (text, json, exposition) = (
            report.to_string(),
            report.to_json(),
            report.prometheus(&metrics),
        );
        assert_eq!(COUNTERS.len(), 27);
        // Counted by the runner and by the source, added once.
        assert_eq!(report.stale_acks, 4);
        for counter in COUNTERS {
            let value = (counter.get)(&report);
            let name = counter.name;
            assert!(
                text.lines()
                    .any(|line| line.split_whitespace().collect::<Vec<_>>()
                        == [name, &value.to_string()]),
                "{name} in {text}"
            );
            assert!(
                json.contains(&format!("\"{name}\":{value},")),
                "{name} in {json}"
            );
            let series = match counter.kind {
                Kind::Total => format!("mayhem_{name}_total"),
                Kind::Level => format!("mayhem_{name}"),
            };
            assert!(
                exposition.contains(&format!("# HELP {series} {}\n", counter.help))
                    && exposition.contains(&format!("\n{series} {value}\n")),
                "{series} in {exposition}"
            );
        }
        assert!(exposition.contains("\nmayhem_slow_handlers_total 1\n"));
        assert!(exposition.contains("\nmayhem_restart_failed_total 1\n"));
    }
}
