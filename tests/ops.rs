//! Operations: the metrics and health endpoint, the stats line and the debugging aids (the
//! container image is tested in tests/container.rs).
// These tests start the binary, which only the `cli` feature builds.
#![cfg(feature = "cli")]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

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
    let (status, _, body) = request(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    );
    (status, body)
}

/// Sends `raw` and reads the whole response; returns the status code, the head and the body.
fn request(addr: &str, raw: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the endpoint");
    stream
        .set_read_timeout(Some(PATIENCE))
        .expect("set a read timeout");
    stream.write_all(raw.as_bytes()).expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .map(|(head, body)| (head.to_owned(), body.to_owned()))
        .unwrap_or_default();
    (status, head, body)
}

/// The threads of a process, from `/proc/PID/status`.
fn threads(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|count| count.trim().parse().ok())
        .expect("a Threads: line")
}

/// Polls `/metrics` until `series` reaches `at_least`; panics after `PATIENCE`.
fn wait_for_sample(addr: &str, series: &str, at_least: f64) -> String {
    let end = Instant::now() + PATIENCE;
    loop {
        if let Ok(mut stream) = TcpStream::connect(addr) {
            let _ = stream.set_read_timeout(Some(PATIENCE));
            let _ = write!(stream, "GET /metrics HTTP/1.0\r\n\r\n");
            let mut response = String::new();
            let _ = stream.read_to_string(&mut response);
            if let Some((_, body)) = response.split_once("\r\n\r\n") {
                let samples = parse_exposition(body);
                if samples
                    .iter()
                    .any(|(name, value)| name == series && *value >= at_least)
                {
                    return body.to_owned();
                }
            }
        }
        assert!(
            Instant::now() < end,
            "{series} did not reach {at_least} within {PATIENCE:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
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
    // The source's counters come from a snapshot refreshed every second.
    wait_for_sample(&addr, "mayhem_published_total", 1.0);
    // The first ack comes a few milliseconds after the first publish (three handler steps
    // of up to 2 ms): waited for, not assumed.
    let body = wait_for_sample(&addr, "mayhem_acked_total", 1.0);
    let samples = parse_exposition(&body);
    let age = sample(&samples, "mayhem_source_stats_age_seconds");
    assert!((0.0..5.0).contains(&age), "{body}");
    let acked = sample(&samples, "mayhem_acked_total");
    assert!(acked >= 1.0, "{body}");
    // `published` is the source's count, from the snapshot (up to a second old); `acked` is
    // the runner's own count, read live: they are not compared.
    assert!(sample(&samples, "mayhem_published_total") >= 1.0, "{body}");
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
    // Every handler blocks: 200 blocking polls within about half a second, reported in one
    // or two lines with a count, not in 200.
    let (status, _, lines, stdout) = Service::start(&[
        "--blocking-threshold",
        "1ms",
        "--stall-rate",
        "1",
        "--stall",
        "5ms",
        "--messages",
        "200",
        "--report",
        "json",
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
    let reported = lines
        .iter()
        .filter(|line| {
            line.contains("blocked an executor thread for") || line.contains("more blocking polls")
        })
        .count();
    assert!((1..=4).contains(&reported), "{reported} lines: {lines:#?}");
    assert_eq!(field(&stdout, "blocking_polls"), 200.0, "{stdout}");
}
#[test]
fn one_signal_ends_the_process_even_when_a_handler_never_returns() {
    // Every handler blocks its executor thread for an hour: it can be neither awaited nor
    // cancelled, so only the watchdog can end the shutdown, at --grace-period + 5 s.
    let mut service = Service::start(&[
        "--stall-rate",
        "1",
        "--stall",
        "1h",
        "--grace-period",
        "1s",
        "--publish-interval",
        "100ms",
        "--handler-latency",
        "0",
    ]);
    service.wait_for("Handling ");
    service.signal("SIGTERM");
    let (status, took, lines, _) = service.finish();
    assert_eq!(status.code(), Some(1), "{lines:#?}");
    // 6 s after the trigger; `took` starts a little after it, hence the second of slack.
    assert!(
        took >= Duration::from_secs(5),
        "forced before its time: {took:?}"
    );
    let forced = lines
        .iter()
        .position(|line| line.contains("The shutdown did not finish within 6s (--grace-period plus 5s): a handler blocks its thread; forcing exit"))
        .unwrap_or_else(|| panic!("no watchdog line: {lines:#?}"));
    assert!(
        lines[forced..]
            .iter()
            .any(|line| line.contains("Nacked") && line.contains("leased messages")),
        "the held leases were not given back: {lines:#?}"
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

/// Starts a lively service with the endpoint; returns it and the endpoint's address.
fn service_with_endpoint() -> (Service, String) {
    let mut service = Service::start(&[
        "--metrics-addr",
        "127.0.0.1:0",
        "--publish-interval",
        "5ms",
        "--handler-latency",
        "5ms",
        "--report",
        "json",
    ]);
    let addr = endpoint(&mut service);
    (service, addr)
}

#[test]
fn a_client_holding_a_partial_request_blocks_neither_other_clients_nor_the_exit() {
    let (service, addr) = service_with_endpoint();
    // A huge announced body, a few bytes of it, and the socket held open.
    let mut huge = TcpStream::connect(&addr).expect("connect");
    huge.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\nabc")
        .expect("send");
    // A request head that never ends, held open.
    let mut partial = TcpStream::connect(&addr).expect("connect");
    partial
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .expect("send");
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_owned()));
        assert_eq!(get(&addr, "/metrics").0, 200);
        // Well below the 5 s a request may take to arrive: nobody waited for the two above.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    // The announced body is refused at once.
    huge.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let mut answer = [0u8; 12];
    huge.read_exact(&mut answer)
        .expect("an answer to the huge request");
    assert_eq!(&answer, b"HTTP/1.1 413");
    // Both clients still hold their sockets while the service stops.
    service.signal("SIGTERM");
    let (status, took, lines, stdout) = service.finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    assert!(took < Duration::from_secs(3), "the exit took {took:?}");
    assert_shutdown_sequence(&lines, "Received exit signal SIGTERM...");
    assert!(stdout.contains("\"published\":"), "no report: {stdout}");
    drop((huge, partial));
}

#[test]
fn many_idle_connections_keep_the_thread_count_bounded() {
    let (mut service, addr) = service_with_endpoint();
    // Every thread of the service is up once a message was handled (the endpoint starts
    // before the pipeline, and the timer thread with the first handler).
    service.wait_for("Done. Acked ");
    let pid = service.child.id();
    assert_eq!(get(&addr, "/healthz").0, 200);
    let before = threads(pid);
    let idle: Vec<TcpStream> = (0..900)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    // Accepted in order: once this request is answered, the 900 were accepted before it.
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_owned()));
    let during = threads(pid);
    assert!(
        during <= before + 1,
        "{before} threads before, {during} with 900 idle connections"
    );
    assert!(during < 64, "{during} threads");
    drop(idle);
    service.signal("SIGTERM");
    let (status, _, lines, _) = service.finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
}

#[test]
fn methods_paths_and_queries_are_answered_as_http_asks() {
    let (service, addr) = service_with_endpoint();
    let (status, head, _) = request(
        &addr,
        "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
    );
    assert_eq!(status, 405, "{head}");
    assert!(head.contains("\r\nAllow: GET, HEAD, OPTIONS"), "{head}");
    let (status, head, _) = request(&addr, "DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 405, "{head}");
    for target in ["*", "/readyz"] {
        let request_line = format!("OPTIONS {target} HTTP/1.1\r\nHost: x\r\n\r\n");
        let (status, head, body) = request(&addr, &request_line);
        assert_eq!(status, 200, "{target}: {head}");
        assert!(head.contains("\r\nAllow: GET, HEAD, OPTIONS"), "{head}");
        assert!(body.is_empty(), "{body}");
    }
    for path in ["/metrics?x=1", "/metrics/", "/metrics/?x=1"] {
        let (status, body) = get(&addr, path);
        assert_eq!(status, 200, "{path}");
        assert!(body.contains("mayhem_acked_total"), "{path}: {body}");
    }
    assert_eq!(get(&addr, "/healthz?probe=1"), (200, "ok\n".to_owned()));
    assert_eq!(get(&addr, "/healthz/"), (200, "ok\n".to_owned()));
    assert_eq!(get(&addr, "/nope").0, 404);
    assert_eq!(get(&addr, "/metricsx").0, 404);
    let (status, head, body) = request(&addr, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200, "{head}");
    assert!(body.is_empty(), "{body}");
    assert!(!head.contains("Content-Length: 0\r"), "{head}");
    assert_eq!(request(&addr, "garbage\r\n\r\n").0, 400);
    let big_head = format!("GET /healthz HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
    assert_eq!(request(&addr, &big_head).0, 431);
    service.signal("SIGTERM");
    let (status, _, lines, _) = service.finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
}

#[test]
fn a_request_target_in_absolute_form_is_the_path_it_names() {
    // RFC 9112 3.2.2: a server must accept `GET http://host/path` (what a client sends
    // through a forward proxy, and some probes send directly).
    let (service, addr) = service_with_endpoint();
    for target in [
        format!("http://{addr}/healthz"),
        format!("HTTP://{addr}/healthz?probe=1"),
        "https://mayhem.example/healthz/".to_owned(),
    ] {
        let (status, head, body) =
            request(&addr, &format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert_eq!((status, body.as_str()), (200, "ok\n"), "{target}: {head}");
    }
    let (status, head, body) = request(
        &addr,
        &format!("GET http://{addr}/metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
    );
    assert_eq!(status, 200, "{head}");
    assert!(body.contains("mayhem_acked_total"), "{body}");
    for target in [format!("http://{addr}"), format!("http://{addr}/nope")] {
        let (status, head, _) =
            request(&addr, &format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert_eq!(status, 404, "{target}: {head}");
    }
    service.signal("SIGTERM");
    let (status, _, lines, _) = service.finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
}

#[test]
fn a_second_signal_exits_130_even_with_a_full_unread_stderr() {
    // A free port: the address cannot be read from a stderr nobody reads.
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_mayhem"))
        .args([
            "--metrics-addr",
            &addr,
            "--publish-interval",
            "0",
            "--handler-latency",
            "60s",
            "--ack-deadline",
            "120s",
            "--extend-interval",
            "60s",
            "--grace-period",
            "60s",
            "--max-in-flight",
            "50",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mayhem");
    // Never read: 3000 "Published" lines are about 270 KB, far beyond a 64 KiB pipe.
    let unread = child.stderr.take().expect("piped stderr");
    wait_for_sample(&addr, "mayhem_published_total", 3000.0);
    let signal = |name: &str| {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    };
    signal("SIGTERM");
    // Handlers are in their 60 s grace period once health turns 503.
    let end = Instant::now() + PATIENCE;
    while get(&addr, "/healthz").0 != 503 {
        assert!(Instant::now() < end, "health never turned 503");
        thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    signal("SIGINT");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for mayhem") {
            break status;
        }
        if started.elapsed() > PATIENCE {
            let _ = child.kill();
            panic!("no exit within {PATIENCE:?} of the second signal");
        }
        thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(status.code(), Some(130));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    drop(unread);
}

/// The timestamp of a log line (`HH:MM:SS,mmm`), in milliseconds of the day.
fn logged_at(line: &str) -> u64 {
    let stamp = line.split_whitespace().next().unwrap_or_default();
    let (clock, millis) = stamp.split_once(',').unwrap_or((stamp, "0"));
    let millis: u64 = millis[..3.min(millis.len())].parse().unwrap_or(0);
    let seconds = clock
        .split(':')
        .map(|part| part.parse::<u64>().unwrap_or(0))
        .fold(0, |total, part| total * 60 + part);
    seconds * 1000 + millis
}

/// The first line seen that contains `pattern`.
fn line_with<'a>(lines: &'a [String], pattern: &str) -> &'a str {
    lines
        .iter()
        .find(|line| line.contains(pattern))
        .unwrap_or_else(|| panic!("no {pattern:?} in {lines:#?}"))
}

#[test]
fn quiet_mode_stops_pulls_drains_held_messages_and_resumes_on_sigcont() {
    let mut service = Service::start_with_env(
        &[
            "--metrics-addr",
            "127.0.0.1:0",
            "--publish-interval",
            "5ms",
            "--handler-latency",
            "200ms",
            "--restart-failure-rate",
            "0",
            "--save-failure-rate",
            "0",
            "--max-in-flight",
            "20",
            "--stats-interval",
            "0",
        ],
        &[("TZ", "UTC")],
    );
    let addr = endpoint(&mut service);
    service.wait_for("Handling");
    assert_eq!(get(&addr, "/readyz"), (200, "ready\n".to_owned()));
    service.signal("TSTP");
    service.wait_for("Received SIGTSTP: quiet");
    // Not ready while quiet, and still alive.
    assert_eq!(get(&addr, "/readyz"), (503, "quiet\n".to_owned()));
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_owned()));
    service.wait_for("Quiet: pulls stopped");
    service.wait_for("Quiet: every held message is settled");
    // Pulls stopped within 100 ms of the signal (the log's millisecond stamps).
    let took = logged_at(line_with(&service.seen, "Quiet: pulls stopped"))
        - logged_at(line_with(&service.seen, "Received SIGTSTP"));
    assert!(took <= 100, "pulls stopped {took} ms after SIGTSTP");
    // Held messages were settled: nothing in flight. (The source's counters in /metrics are
    // a snapshot of up to a second ago, so the log lines tell what was published.)
    let samples = parse_exposition(&get(&addr, "/metrics").1);
    assert_eq!(sample(&samples, "mayhem_in_flight"), 0.0);
    let consumed = sample(&samples, "mayhem_consumed_total");
    service.signal("CONT");
    service.wait_for("Received SIGCONT: resuming");
    assert_eq!(get(&addr, "/readyz"), (200, "ready\n".to_owned()));
    let resumed = service.seen.len();
    // Work resumes: pulls and handling again.
    service.wait_for_after(resumed, "Published");
    service.wait_for_after(resumed, "Consumed");
    service.wait_for_after(resumed, "Done. Acked");
    // Between the drain and the resume, nothing was pulled or published.
    let settled = service
        .seen
        .iter()
        .position(|line| line.contains("Quiet: every held message is settled"))
        .expect("seen");
    for line in &service.seen[settled..resumed] {
        assert!(
            !line.contains("Consumed") && !line.contains("Published"),
            "{line}"
        );
    }
    let samples = parse_exposition(&get(&addr, "/metrics").1);
    assert!(sample(&samples, "mayhem_consumed_total") > consumed);
    service.signal("SIGTERM");
    let (status, _, lines, _) = service.finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    assert_shutdown_sequence(&lines, "Received exit signal SIGTERM...");
}

#[test]
fn sigterm_during_quiet_mode_still_shuts_down_cleanly() {
    let mut service = Service::start(&[
        "--metrics-addr",
        "127.0.0.1:0",
        "--publish-interval",
        "5ms",
        "--handler-latency",
        "50ms",
        "--max-in-flight",
        "20",
        "--report",
        "json",
    ]);
    let addr = endpoint(&mut service);
    service.wait_for("Handling");
    service.signal("TSTP");
    service.wait_for("Quiet: every held message is settled");
    assert_eq!(get(&addr, "/readyz").0, 503);
    service.signal("SIGTERM");
    let (status, _, lines, json) = service.finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    assert_shutdown_sequence(&lines, "Received exit signal SIGTERM...");
    assert_no_panic_text(&lines);
    assert_balanced(&json);
    assert_eq!(field(&json, "cancelled"), 0.0, "{json}");
}

#[test]
fn an_automatic_window_is_shown_in_the_stats_line_and_in_metrics() {
    let mut service = Service::start(&[
        "--metrics-addr",
        "127.0.0.1:0",
        "--max-in-flight",
        "auto",
        "--publish-interval",
        "0",
        "--handler-latency",
        "20ms",
        "--stats-interval",
        "100ms",
    ]);
    let addr = endpoint(&mut service);
    service.wait_for("(window ");
    let window = sample(
        &parse_exposition(&get(&addr, "/metrics").1),
        "mayhem_window",
    );
    assert!((256.0..=2_000_000.0).contains(&window), "{window}");
    service.signal("SIGTERM");
    let (status, _, lines, _) = service.finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
}

#[test]
fn handlers_past_the_handler_timeout_are_nacked_until_dead_lettered_and_none_is_lost() {
    // The issue's own figures: 1 s steps against a 100 ms timeout. A handler's steps are
    // drawn from the seed (three of up to 1 s each, two of them one after the other), so
    // the outcome is the same at every run.
    let output = run(&[
        "--handler-timeout",
        "100ms",
        "--handler-latency",
        "1s",
        "--messages",
        "20",
        "--max-attempts",
        "3",
        "--publish-interval",
        "0",
        "--restart-failure-rate",
        "0",
        "--save-failure-rate",
        "0",
        "--seed",
        "7",
        "--stats-interval",
        "0",
        "--report",
        "json",
    ]);
    let report = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{}\n{stderr}", output.status);
    assert_eq!(field(&report, "published"), 20.0, "{report}");
    assert_eq!(field(&report, "acked"), 0.0, "{report}");
    assert_eq!(field(&report, "timed_out"), 60.0, "{report}");
    assert_eq!(field(&report, "nacked"), 60.0, "{report}");
    assert_eq!(field(&report, "dead_lettered"), 20.0, "{report}");
    assert_eq!(field(&report, "remaining"), 0.0, "{report}");
    assert_balanced(&report);
    // One aggregated warning, not a line per message.
    let warnings = stderr
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("timed out after 100ms"))
        .count();
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} timeout warnings:\n{stderr}"
    );
}
