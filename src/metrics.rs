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
    /// Leases acked.
    acked: AtomicU64,
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
    /// Messages pulled and not yet settled (the flow-control window in use).
    pub(crate) in_flight: AtomicUsize,
    /// Messages handled to an ack, by handling time in microseconds (log-linear buckets).
    latency: Box<[AtomicU64]>,
    /// Sum of the handling times in `latency`, in microseconds.
    latency_sum_micros: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            delivered: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            acked: AtomicU64::new(0),
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
            in_flight: AtomicUsize::new(0),
            latency: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            latency_sum_micros: AtomicU64::new(0),
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

    /// Counts deliveries pulled, `redelivered` of them delivered before.
    pub(crate) fn count_delivered(&self, delivered: u64, redelivered: u64) {
        self.delivered.fetch_add(delivered, Ordering::Relaxed);
        if redelivered > 0 {
            self.redelivered.fetch_add(redelivered, Ordering::Relaxed);
        }
    }

    pub(crate) fn count_acked(&self, count: u64) {
        self.acked.fetch_add(count, Ordering::Relaxed);
    }

    pub(crate) fn count_nacked(&self, count: u64) {
        self.nacked.fetch_add(count, Ordering::Relaxed);
    }

    pub(crate) fn count_extended(&self, count: u64) {
        self.extended.fetch_add(count, Ordering::Relaxed);
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
        self.acked.load(Ordering::Relaxed)
    }

    /// Leases nacked so far.
    pub fn nacked(&self) -> u64 {
        self.nacked.load(Ordering::Relaxed)
    }

    /// Redeliveries so far.
    pub fn redelivered(&self) -> u64 {
        self.redelivered.load(Ordering::Relaxed)
    }

    /// Leases lost so far (the source refused to extend them while held).
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
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
        self.in_flight.load(Ordering::Relaxed)
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
        self.latency[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of these metrics and of a source's counters.
    ///
    /// ```
    /// let metrics = mayhem::Metrics::default();
    /// let text = metrics.prometheus(&mayhem::SourceStats::default());
    /// assert!(text.contains("# TYPE mayhem_acked_total counter\nmayhem_acked_total 0\n"));
    /// assert!(text.contains("mayhem_handling_seconds_bucket{le=\"+Inf\"} 0\n"));
    /// ```
    pub fn prometheus(&self, stats: &SourceStats) -> String {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let counters = [
            ("published", "Messages published.", stats.published),
            (
                "consumed",
                "Deliveries pulled by the consumers.",
                load(&self.delivered),
            ),
            ("acked", "Messages acked.", load(&self.acked)),
            ("nacked", "Leases nacked.", load(&self.nacked)),
            (
                "redelivered",
                "Deliveries of a message delivered before.",
                load(&self.redelivered),
            ),
            (
                "expired",
                "Leases that expired without ack or extension.",
                stats.expired,
            ),
            ("extended", "Lease extensions.", load(&self.extended)),
            (
                "lost_leases",
                "Leases the source took back while they were held.",
                load(&self.lost),
            ),
            (
                "max_lease_reached",
                "Leases held past --max-lease and no longer extended.",
                load(&self.max_lease),
            ),
            (
                "dead_lettered",
                "Messages dead-lettered.",
                stats.dead_lettered,
            ),
            (
                "stale_acks",
                "Acks refused because the lease had expired.",
                load(&self.stale_acks) + stats.late_refusals,
            ),
            (
                "restart_failed",
                "Failed restart attempts.",
                load(&self.restart_failed),
            ),
            (
                "restart_retried",
                "Restart retries.",
                load(&self.restart_retried),
            ),
            ("save_failed", "Failed saves.", load(&self.save_failed)),
            ("panicked", "Handlers that panicked.", load(&self.panicked)),
            (
                "cancelled",
                "Handlers cancelled after the grace period.",
                load(&self.cancelled),
            ),
            (
                "slow_handlers",
                "Handlers that ran longer than --debug-slow.",
                load(&self.slow),
            ),
            (
                "blocking_polls",
                "Handler polls that blocked an executor thread.",
                load(&self.blocking),
            ),
        ];
        let mut out = String::new();
        for (name, help, value) in counters {
            let _ = write!(out, "# HELP mayhem_{name}_total {help}\n# TYPE mayhem_{name}_total counter\nmayhem_{name}_total {value}\n");
        }
        let gauges = [
            (
                "in_flight",
                "Messages pulled and not yet settled.",
                self.in_flight() as u64,
            ),
            (
                "remaining",
                "Messages ready or leased in the subscription.",
                stats.remaining,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = write!(
                out,
                "# HELP mayhem_{name} {help}\n# TYPE mayhem_{name} gauge\nmayhem_{name} {value}\n"
            );
        }
        let _ = write!(out, "# HELP mayhem_handling_seconds Handling time of acked messages.\n# TYPE mayhem_handling_seconds histogram\n");
        let counts: Vec<u64> = self.latency.iter().map(load).collect();
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
            load(&self.latency_sum_micros) as f64 / 1e6
        );
        out
    }

    /// The latency at quantile `q` (0..=1) in milliseconds, or 0 with no samples.
    pub(crate) fn latency_quantile_ms(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self
            .latency
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
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

/// What the service did, printed when it ends.
///
/// The accounting invariant `published == acked + dead_lettered + remaining` holds in every
/// report: every message is acked, dead-lettered, or still in the subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Messages published.
    pub published: u64,
    /// Deliveries pulled by the consumers (a redelivered message counts again).
    pub consumed: u64,
    /// Messages acked.
    pub acked: u64,
    /// Leases nacked (handler errors, panics, cancellations, shutdown).
    pub nacked: u64,
    /// Deliveries of a message delivered before.
    pub redelivered: u64,
    /// Leases that expired without ack or extension.
    pub expired: u64,
    /// Lease extensions.
    pub extended: u64,
    /// Messages dead-lettered after `max_attempts` deliveries.
    pub dead_lettered: u64,
    /// Acks refused because the lease had expired.
    pub stale_acks: u64,
    /// Leases the source took back while they were held (their handlers were dropped).
    pub lost_leases: u64,
    /// Failed restart attempts.
    pub restart_failed: u64,
    /// Restart retries.
    pub restart_retried: u64,
    /// Failed saves.
    pub save_failed: u64,
    /// Handlers that panicked.
    pub panicked: u64,
    /// Handlers cancelled after the grace period.
    pub cancelled: u64,
    /// Messages left in the subscription at exit.
    pub remaining: u64,
    /// Wall time of the run in seconds.
    pub elapsed_secs: f64,
    /// Acked messages per second of the run.
    pub acked_per_sec: f64,
    /// Median handling time of acked messages, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile handling time, in milliseconds.
    pub p99_ms: f64,
    /// Longest handling time, in milliseconds.
    pub max_ms: f64,
    /// The seed of the run's random choices, to reproduce it.
    pub seed: u64,
    /// Why the service stopped: `signal`, `requested`, `completed` or `panicked`.
    pub reason: &'static str,
}

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
        Report {
            published: stats.published,
            consumed: metrics.delivered.load(Ordering::Relaxed),
            acked: metrics.acked.load(Ordering::Relaxed),
            nacked: metrics.nacked.load(Ordering::Relaxed),
            redelivered: metrics.redelivered.load(Ordering::Relaxed),
            expired: stats.expired,
            extended: metrics.extended.load(Ordering::Relaxed),
            dead_lettered: stats.dead_lettered,
            stale_acks: metrics.stale_acks.load(Ordering::Relaxed) + stats.late_refusals,
            lost_leases: metrics.lost.load(Ordering::Relaxed),
            restart_failed: metrics.restart_failed.load(Ordering::Relaxed),
            restart_retried: metrics.restart_retried.load(Ordering::Relaxed),
            save_failed: metrics.save_failed.load(Ordering::Relaxed),
            panicked: metrics.panicked.load(Ordering::Relaxed),
            cancelled: metrics.cancelled.load(Ordering::Relaxed),
            remaining: stats.remaining,
            elapsed_secs,
            acked_per_sec: if elapsed_secs > 0.0 {
                metrics.acked.load(Ordering::Relaxed) as f64 / elapsed_secs
            } else {
                0.0
            },
            p50_ms: metrics.latency_quantile_ms(0.50),
            p99_ms: metrics.latency_quantile_ms(0.99),
            max_ms: metrics.latency_quantile_ms(1.0),
            seed,
            reason,
        }
    }

    /// Whether every published message is accounted for:
    /// `published == acked + dead_lettered + remaining`.
    pub fn is_balanced(&self) -> bool {
        self.published == self.acked + self.dead_lettered + self.remaining
    }

    /// The report as one JSON object on one line.
    pub fn to_json(&self) -> String {
        let mut out = String::from("{");
        for (i, (name, value)) in self.fields().iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&format!("\"{name}\":{value}"));
        }
        out.push_str(&format!(",\"reason\":\"{}\"}}", self.reason));
        out
    }

    /// The numeric fields by name, formatted.
    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("published", self.published.to_string()),
            ("consumed", self.consumed.to_string()),
            ("acked", self.acked.to_string()),
            ("nacked", self.nacked.to_string()),
            ("redelivered", self.redelivered.to_string()),
            ("expired", self.expired.to_string()),
            ("extended", self.extended.to_string()),
            ("dead_lettered", self.dead_lettered.to_string()),
            ("stale_acks", self.stale_acks.to_string()),
            ("lost_leases", self.lost_leases.to_string()),
            ("restart_failed", self.restart_failed.to_string()),
            ("restart_retried", self.restart_retried.to_string()),
            ("save_failed", self.save_failed.to_string()),
            ("panicked", self.panicked.to_string()),
            ("cancelled", self.cancelled.to_string()),
            ("remaining", self.remaining.to_string()),
            ("elapsed_secs", format!("{:.3}", self.elapsed_secs)),
            ("acked_per_sec", format!("{:.1}", self.acked_per_sec)),
            ("p50_ms", format!("{:.3}", self.p50_ms)),
            ("p99_ms", format!("{:.3}", self.p99_ms)),
            ("max_ms", format!("{:.3}", self.max_ms)),
            ("seed", self.seed.to_string()),
        ]
    }
}

impl fmt::Display for Report {
    /// One `name: value` line per field.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, value) in self.fields() {
            writeln!(f, "{name:<16}{value}")?;
        }
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
}
