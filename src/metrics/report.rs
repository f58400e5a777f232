//! The final [`Report`]: one table of counters (the `counters!` macro) driving the text
//! report, the JSON report, the stats line and the Prometheus exposition.

use std::fmt;
use std::fmt::Write as _;
use std::time::Duration;

use super::{load, Metrics};
use crate::source::SourceStats;

impl Metrics {
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
