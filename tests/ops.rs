//! Operations: the metrics and health endpoint, the stats line and the debugging aids (the
//! container image is tested in tests/container.rs).
// These tests start the binary, which only the `cli` feature builds.
#![cfg(feature = "cli")]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;

/// Waits for the endpoint's log line and returns its `HOST:PORT`.
fn endpoint(service: &mut Service) -> String {
    service.wait_for("Serving metrics on http://");
    let line = service
        .seen
        .iter()
        .find(|line| line.contains("Serving metrics on http://"))
        .cloned()
        .unwrap_or_default();
    let start = line
        .find("http://")
        .map(|i| i + "http://".len())
        .unwrap_or(0);
    let rest = &line[start..];
    rest[..rest.find('/').unwrap_or(rest.len())].to_owned()
}

/// A plain HTTP/1.0 GET; returns the status code and the body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the endpoint");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Parses a Prometheus text exposition into (series, value) pairs; panics on a bad line.
fn parse_exposition(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|line| !line.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            assert!(
                comment.starts_with("HELP mayhem_") || comment.starts_with("TYPE mayhem_"),
                "{line}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(
            series[..name_end]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        samples.push((series.to_owned(), value));
    }
    samples
}

fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(name, _)| name == series)
        .map(|(_, value)| *value)
        .unwrap_or_else(|| panic!("no {series}"))
}

#[test]
fn metrics_are_served_in_prometheus_format() {
    let mut service = Service::start(&[
        "--metrics-addr",
        "127.0.0.1:0",
        "--publish-interval",
        "1ms",
        "--handler-latency",
        "2ms",
        "--restart-failure-rate",
        "0",
        "--save-failure-rate",
        "0",
        "--seed",
        "4",
    ]);
    let addr = endpoint(&mut service);
    service.wait_for("Done. Acked");
    let (status, body) = get(&addr, "/metrics");
    assert_eq!(status, 200);
    let samples = parse_exposition(&body);
    let acked = sample(&samples, "mayhem_acked_total");
    assert!(acked >= 1.0, "{body}");
    assert!(sample(&samples, "mayhem_published_total") >= acked);
    assert!(sample(&samples, "mayhem_in_flight") >= 0.0);
    assert!(body.contains("# TYPE mayhem_handling_seconds histogram"));
    let buckets: Vec<f64> = samples
        .iter()
        .filter(|(name, _)| name.starts_with("mayhem_handling_seconds_bucket"))
        .map(|(_, v)| *v)
        .collect();
    assert!(
        buckets.windows(2).all(|pair| pair[0] <= pair[1]),
        "buckets not cumulative: {buckets:?}"
    );
    assert_eq!(
        buckets.last().copied(),
        Some(sample(&samples, "mayhem_handling_seconds_count"))
    );
    assert!(sample(&samples, "mayhem_handling_seconds_count") >= 1.0);
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(&addr, "/nope").0, 404);
    service.signal("SIGTERM");
    let (status, _, lines, _) = service.finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
}

#[test]
fn health_turns_503_once_the_shutdown_begins() {
    let mut service = Service::start(&[
        "--metrics-addr",
        "127.0.0.1:0",
        "--publish-interval",
        "0",
        "--handler-latency",
        "30s",
        "--ack-deadline",
        "60s",
        "--extend-interval",
        "20s",
        "--grace-period",
        "1s",
        "--max-in-flight",
        "10",
    ]);
    let addr = endpoint(&mut service);
    service.wait_for("Handling");
    assert_eq!(get(&addr, "/healthz").0, 200);
    service.signal("SIGTERM");
    // Handlers are in their grace period now: the endpoint still answers, with 503.
    service.wait_for("Waiting up to");
    assert_eq!(get(&addr, "/healthz"), (503, "shutting down\n".to_owned()));
    assert_eq!(get(&addr, "/metrics").0, 200);
    let (status, _, lines, _) = service.finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    assert_shutdown_sequence(&lines, "Received exit signal SIGTERM...");
}

#[test]
fn a_busy_address_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("local address").to_string();
    let (status, _, lines, _) =
        Service::start(&["--metrics-addr", &addr, "--messages", "1"]).finish();
    assert_eq!(status.code(), Some(1));
    assert!(
        lines
            .iter()
            .any(|line| line.contains(&format!("cannot serve metrics on {addr}"))),
        "{lines:#?}"
    );
    assert_no_panic_text(&lines);
}

#[test]
fn a_stats_line_is_logged_periodically() {
    let mut service = Service::start(&[
        "--stats-interval",
        "50ms",
        "--publish-interval",
        "1ms",
        "--handler-latency",
        "1ms",
    ]);
    service.wait_for("Stats: ");
    service.wait_for("Stats: ");
    let line = service
        .seen
        .iter()
        .rev()
        .find(|line| line.contains("Stats: "))
        .cloned()
        .unwrap_or_default();
    for part in [
        "acked/s, in flight ",
        ", acked ",
        ", nacked ",
        ", redelivered ",
        ", dead-lettered ",
    ] {
        assert!(line.contains(part), "{line}");
    }
    service.signal("SIGINT");
    assert_eq!(service.finish().0.code(), Some(0));
}

#[test]
fn slow_handlers_are_reported_with_their_message_id() {
    let (status, _, lines, _) = Service::start(&[
        "--debug-slow",
        "5ms",
        "--handler-latency",
        "100ms",
        "--messages",
        "3",
        "--publish-interval",
        "0",
        "--restart-failure-rate",
        "0",
        "--save-failure-rate",
        "0",
        "--seed",
        "2",
    ])
    .finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    let slow = lines
        .iter()
        .find(|line| line.contains("WARN: Slow handler: PubSubMessage("))
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert!(
        slow.contains("(message id ") && slow.contains("still running after 5ms"),
        "{slow}"
    );
}

#[test]
fn a_handler_blocking_its_thread_is_reported() {
    let (status, _, lines, _) = Service::start(&[
        "--blocking-threshold",
        "20ms",
        "--stall-rate",
        "1",
        "--stall",
        "60ms",
        "--messages",
        "2",
        "--publish-interval",
        "0",
        "--handler-latency",
        "0",
        "--restart-failure-rate",
        "0",
        "--save-failure-rate",
        "0",
    ])
    .finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|line| line.contains("blocked an executor thread for")),
        "{lines:#?}"
    );
}
#[test]
fn repeated_warnings_are_aggregated_not_a_storm() {
    // Every lease is capped by --max-lease before its handler ends, so every ack is refused:
    // thousands of warnings of two kinds, which must come out as at most one line a second
    // each, with counts.
    let (status, took, lines, stdout) = Service::start(&[
        "--messages",
        "3000",
        "--max-attempts",
        "1",
        "--publish-interval",
        "0",
        "--handler-latency",
        "400ms",
        "--ack-deadline",
        "100ms",
        "--extend-interval",
        "50ms",
        "--max-lease",
        "100ms",
        "--restart-failure-rate",
        "0",
        "--save-failure-rate",
        "0",
        "--log-level",
        "warn",
        "--report",
        "json",
        "--seed",
        "9",
    ])
    .finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    assert_balanced(&stdout);
    assert!(field(&stdout, "stale_acks") >= 1000.0, "{stdout}");
    let warnings = lines.iter().filter(|line| line.contains("WARN")).count();
    // Two kinds of warning, at most one line a second each, plus the closing counts.
    let bound = 2 * (took.as_secs() as usize + 2) + 4;
    assert!(
        warnings <= bound,
        "{warnings} warning lines in {took:?} (bound {bound}): {lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|line| line.contains("more acks refused in the last second")
                || line.contains("more acks refused")),
        "{lines:#?}"
    );
}
