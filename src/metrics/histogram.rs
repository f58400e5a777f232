//! The lock-free latency histogram: log-linear buckets of handling times, striped per thread,
//! its quantiles, and its Prometheus exposition.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::striped::stripe;
use super::{load, Metrics};

/// Sub-buckets per power of two of the latency histogram: values are kept to within 1/16.
const SUB_BUCKETS: u32 = 16;
/// Powers of two covered, in microseconds: up to 2^40 µs (about 12 days).
const POWERS: u32 = 40;
/// Number of histogram buckets.
pub(super) const BUCKETS: usize = ((POWERS + 1) * SUB_BUCKETS) as usize;

impl Metrics {
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
    pub(super) fn max_latency_ms(&self) -> f64 {
        load(&self.latency_max_micros) as f64 / 1000.0
    }

    /// Appends the `mayhem_handling_seconds` histogram in Prometheus text format.
    pub(super) fn write_histogram(&self, out: &mut String) {
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
        quantile_ms(&self.bucket_counts(), q)
    }

    /// A copy of the histogram of handling times now; [`LatencySnapshot::since`] an
    /// earlier copy gives the handling times of the messages acked in between, as a
    /// Prometheus server's `rate` over the histogram would, at the histogram's own
    /// resolution (within 1/16) rather than its exposition's twelve buckets.
    ///
    /// ```
    /// let metrics = mayhem::Metrics::default();
    /// let before = metrics.latency_snapshot();
    /// // ... the service runs, and acks ...
    /// let span = metrics.latency_snapshot().since(&before);
    /// assert_eq!((span.count(), span.quantile_ms(0.99)), (0, 0.0));
    /// ```
    pub fn latency_snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            counts: self.bucket_counts(),
        }
    }
}

/// Handling times of acked messages, counted by bucket: [`Metrics::latency_snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Messages per bucket of the histogram.
    counts: Vec<u64>,
}

impl LatencySnapshot {
    /// The messages acked after `earlier` (a snapshot of the same metrics, taken before)
    /// and up to this one, with their handling times.
    pub fn since(&self, earlier: &LatencySnapshot) -> LatencySnapshot {
        LatencySnapshot {
            counts: self
                .counts
                .iter()
                .zip(earlier.counts.iter().chain(std::iter::repeat(&0)))
                .map(|(now, before)| now.saturating_sub(*before))
                .collect(),
        }
    }

    /// Messages counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The handling time at quantile `q` (0..=1) in milliseconds: the upper bound of its
    /// bucket, within 1/16 of the time itself; 0 with no messages.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        quantile_ms(&self.counts, q)
    }
}

/// The latency at quantile `q` of a histogram's counts, in milliseconds (0 with none).
fn quantile_ms(counts: &[u64], q: f64) -> f64 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceStats;

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
    fn a_snapshot_since_an_earlier_one_holds_the_times_in_between() {
        let metrics = Metrics::default();
        for _ in 0..1000 {
            metrics.record_latency(Duration::from_secs(10));
        }
        let before = metrics.latency_snapshot();
        for ms in 1..=100u64 {
            metrics.record_latency(Duration::from_millis(ms));
        }
        let span = metrics.latency_snapshot().since(&before);
        assert_eq!(span.count(), 100);
        let p99 = span.quantile_ms(0.99);
        assert!((99.0..=105.2).contains(&p99), "p99 {p99}");
        // The whole run's p99 is the earlier samples'.
        assert!(metrics.latency_snapshot().quantile_ms(0.99) >= 10_000.0);
        // Nothing in between, or a snapshot taken the wrong way round: empty.
        assert_eq!(before.since(&before).count(), 0);
        assert_eq!(
            before.since(&metrics.latency_snapshot()).quantile_ms(0.5),
            0.0
        );
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
}
