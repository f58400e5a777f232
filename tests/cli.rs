//! The `mayhem` binary end to end: signals, exit codes, shutdown lines, bad input.
// These tests start the binary, which only the `cli` feature builds.
#![cfg(feature = "cli")]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Starts a lively service, sends `signal` once handling began, checks a clean exit.
fn shuts_down_on(signal: &str) {
    let mut service = Service::start(&[
        "--publish-interval",
        "10ms",
        "--handler-latency",
        "20ms",
        "--seed",
        "1",
        "--report",
        "json",
    ]);
    service.wait_for("Handling");
    service.signal(signal);
    let (status, _, lines, stdout) = service.finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    assert_shutdown_sequence(&lines, &format!("Received exit signal {signal}..."));
    assert_no_panic_text(&lines);
    assert_eq!(field(&stdout, "panicked"), 0.0);
    assert!(stdout.contains("\"reason\":\"signal\""), "{stdout}");
    assert_balanced(&stdout);
}

#[test]
fn sigint_shuts_down_cleanly() {
    shuts_down_on("SIGINT");
}

#[test]
fn sigterm_shuts_down_cleanly() {
    shuts_down_on("SIGTERM");
}

#[test]
fn sighup_shuts_down_cleanly() {
    shuts_down_on("SIGHUP");
}

#[test]
fn sigquit_shuts_down_cleanly() {
    shuts_down_on("SIGQUIT");
}

#[test]
fn sigusr1_and_sigusr2_are_logged_and_ignored() {
    // Their default action ended the process at once: no shutdown, no report.
    let mut service = Service::start(&[
        "--publish-interval",
        "10ms",
        "--handler-latency",
        "20ms",
        "--seed",
        "1",
        "--report",
        "json",
    ]);
    service.wait_for("Handling");
    service.signal("SIGUSR1");
    service.wait_for("Ignoring signal SIGUSR1");
    // More than one a second is not logged line by line; SIGUSR2 is ignored as well, and
    // neither counts as a first signal of the shutdown.
    for _ in 0..20 {
        service.signal("SIGUSR2");
    }
    assert!(
        matches!(service.child.try_wait(), Ok(None)),
        "{:#?}",
        service.seen
    );
    service.signal("SIGTERM");
    let (status, _, lines, stdout) = service.finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    assert_shutdown_sequence(&lines, "Received exit signal SIGTERM...");
    assert!(stdout.contains("\"reason\":\"signal\""), "{stdout}");
    assert_balanced(&stdout);
    let ignored = lines
        .iter()
        .filter(|line| line.contains("Ignoring signal"))
        .count();
    // One line, or a few on a machine so slow that the twenty `kill`s took seconds.
    assert!((1..=5).contains(&ignored), "{lines:#?}");
}

#[test]
fn a_second_signal_forces_exit_130() {
    let mut service = Service::start(&[
        "--publish-interval",
        "0",
        "--handler-latency",
        "60s",
        "--ack-deadline",
        "60s",
        "--extend-interval",
        "30s",
        "--grace-period",
        "60s",
        "--max-in-flight",
        "50",
    ]);
    service.wait_for("Handling");
    service.signal("SIGINT");
    service.wait_for("Waiting up to");
    service.signal("SIGTERM");
    let (status, took, lines, _) = service.finish();
    assert_eq!(status.code(), Some(130), "{lines:#?}");
    assert!(took < Duration::from_secs(5), "forced exit took {took:?}");
    assert!(
        lines.iter().any(|line| line.contains("forcing exit")),
        "{lines:#?}"
    );
    assert_no_panic_text(&lines);
}

#[test]
fn a_signal_under_load_ends_within_the_grace_period_and_nacks_the_rest() {
    let mut service = Service::start(&[
        "--publish-interval",
        "0",
        "--handler-latency",
        "20s",
        "--ack-deadline",
        "30s",
        "--extend-interval",
        "10s",
        "--grace-period",
        "1s",
        "--max-in-flight",
        "5000",
        "--report",
        "json",
    ]);
    for _ in 0..3 {
        service.wait_for("Handling");
        service.seen.clear();
    }
    service.signal("SIGTERM");
    let (status, took, lines, stdout) = service.finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    assert!(
        took < Duration::from_secs(2),
        "took {took:?} with a 1 s grace period"
    );
    assert_no_panic_text(&lines);
    assert_balanced(&stdout);
    assert!(field(&stdout, "cancelled") >= 1.0, "{stdout}");
    assert!(
        field(&stdout, "remaining") >= field(&stdout, "cancelled"),
        "{stdout}"
    );
    assert!(
        field(&stdout, "nacked") >= field(&stdout, "cancelled"),
        "{stdout}"
    );
}

#[test]
fn a_counted_run_exits_by_itself_with_every_message_accounted_for() {
    let service = Service::start(&[
        "--messages",
        "5000",
        "--publish-interval",
        "0",
        "--handler-latency",
        "0",
        "--max-attempts",
        "2",
        "--report",
        "json",
        "--log-level",
        "warn",
        "--seed",
        "9",
    ]);
    let (status, _, lines, stdout) = service.finish();
    assert_eq!(status.code(), Some(0), "{lines:?}");
    assert_eq!(field(&stdout, "published"), 5000.0);
    assert_eq!(field(&stdout, "remaining"), 0.0);
    assert!(field(&stdout, "dead_lettered") > 0.0, "{stdout}");
    assert_balanced(&stdout);
    assert_no_panic_text(&lines);
}

#[test]
fn a_handler_panic_is_caught_and_ends_with_exit_1() {
    let service = Service::start(&[
        "--messages",
        "20",
        "--publish-interval",
        "0",
        "--handler-latency",
        "0",
        "--panic-rate",
        "1",
        "--report",
        "json",
    ]);
    let (status, _, lines, stdout) = service.finish();
    assert_eq!(status.code(), Some(1), "{lines:#?}");
    assert_shutdown_sequence(
        &lines,
        "Caught exception: injected fault while handling PubSubMessage(",
    );
    assert!(
        lines
            .iter()
            .any(|line| line.ends_with("INFO: Shutting down...")),
        "{lines:#?}"
    );
    assert_no_panic_text(&lines);
    assert!(field(&stdout, "panicked") >= 1.0);
    assert_balanced(&stdout);
}

#[test]
fn log_lines_follow_the_reference_format() {
    let service = Service::start(&[
        "--messages",
        "3",
        "--publish-interval",
        "0",
        "--handler-latency",
        "0",
    ]);
    let (status, _, lines, _) = service.finish();
    assert_eq!(status.code(), Some(0));
    for line in &lines {
        // `18:46:39,660 INFO: message`
        let bytes = line.as_bytes();
        assert!(
            bytes.len() > 13 && bytes[2] == b':' && bytes[5] == b':' && bytes[8] == b',',
            "{line}"
        );
        assert!(line[13..].split_once(": ").is_some(), "{line}");
    }
    for expected in [
        "Starting publisher",
        "Starting consumer",
        "Published PubSubMessage(instance_name='cattle-",
        "Consumed PubSubMessage(",
        "Handling PubSubMessage(",
        "Done. Acked PubSubMessage(",
    ] {
        assert!(
            lines.iter().any(|line| line.contains(expected)),
            "no {expected:?} in {lines:#?}"
        );
    }
}

/// Runs the binary with bad input; expects exit 2 and a first line naming `needle`. Errors
/// found by clap keep clap's whole message (tips, possible values, usage: a few more lines);
/// the service's own checks are one line.
fn refuses(args: &[&str], env: &[(&str, &str)], needle: &str) -> Vec<String> {
    let service = Service::start_with_env(args, env);
    let (status, _, lines, stdout) = service.finish();
    assert_eq!(status.code(), Some(2), "{args:?} {env:?}: {lines:?}");
    let lines: Vec<_> = lines
        .into_iter()
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert!(
        !lines.is_empty() && lines.len() <= 6,
        "{args:?} {env:?}: expected a short error, got {lines:?}"
    );
    assert!(
        lines[0].contains(needle),
        "{args:?} {env:?}: {:?} does not name {needle:?}",
        lines[0]
    );
    assert!(lines[0].starts_with("error: "), "{lines:?}");
    assert_no_panic_text(&lines);
    assert!(stdout.is_empty(), "{stdout}");
    lines
}

/// Like `refuses`, for the service's own checks: exactly one line.
fn refuses_in_one_line(args: &[&str], needle: &str) -> String {
    let lines = refuses(args, &[], needle);
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {lines:?}");
    lines[0].clone()
}

#[test]
fn bad_flags_exit_2_with_one_line_naming_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["--workers", "abc"], "--workers"),
        (&["--workers", "0"], "--workers"),
        (&["--consumers", "-1"], "--consumers"),
        (&["--max-in-flight", "0"], "--max-in-flight"),
        (
            &["--max-in-flight", "99999999999999999999"],
            "--max-in-flight",
        ),
        (&["--restart-failure-rate", "1.5"], "--restart-failure-rate"),
        (&["--save-failure-rate", "NaN"], "--save-failure-rate"),
        (&["--publish-interval", "banana"], "--publish-interval"),
        (&["--handler-latency", "-1s"], "--handler-latency"),
        (&["--ack-deadline", "0"], "--ack-deadline"),
        (&["--extend-interval", "3s"], "--extend-interval"),
        (
            &["--ack-deadline", "1s", "--extend-interval", "2s"],
            "--extend-interval",
        ),
        (&["--grace-period", "1000000h"], "--grace-period"),
        (&["--max-attempts", "0"], "--max-attempts"),
        (&["--messages", "many"], "--messages"),
        (&["--seed", "x"], "--seed"),
        (&["--report", "xml"], "--report"),
        (&["--log-level", "loud"], "--log-level"),
        (&["--bogus"], "--bogus"),
        (&["--publishers", "100000"], "--publishers"),
        (&["--max-backlog", "0"], "--max-backlog"),
        (&["--restart-retries", "101"], "--restart-retries"),
        (&["--stall-rate", "2"], "--stall-rate"),
        (&["--panic-rate", "-0.1"], "--panic-rate"),
        (&["--grace-period", "-5s"], "--grace-period"),
        (
            &["--publish-interval", "99999999999999999999h"],
            "--publish-interval",
        ),
        (&["--ack-deadline", "11m"], "--ack-deadline"),
        (&["--messages", "-3"], "--messages"),
        (&["--workers", ""], "--workers"),
        // Intervals whose floor keeps a log line or a server call from running flat out.
        (&["--stats-interval", "1ns"], "--stats-interval"),
        (&["--consumer-ttl", "1ns"], "--consumer-ttl"),
        (&["--trim-interval", "1ns"], "--trim-interval"),
        (&["--consumer-ttl", "400d"], "--consumer-ttl"),
        // The layers.
        (&["--handler-timeout", "banana"], "--handler-timeout"),
        (&["--handler-timeout", "2days"], "--handler-timeout"),
        (&["--rate-limit", "0"], "--rate-limit"),
        (&["--rate-limit", "-5"], "--rate-limit"),
        (&["--rate-limit", "20000000"], "--rate-limit"),
        (&["--breaker-failures", "0"], "--breaker-failures"),
        (
            &["--breaker-failures", "3", "--breaker-cooldown", "0"],
            "--breaker-cooldown",
        ),
        (&["--breaker-cooldown", "1s"], "--breaker-cooldown"),
        (&["--ack-deadline", "automatic"], "--ack-deadline"),
        (&["--max-in-flight", "automatic"], "--max-in-flight"),
        // The simulated database.
        (&["--db-capacity", "0"], "--db-capacity"),
        (&["--db-capacity", "many"], "--db-capacity"),
        (&["--db-outage", "30s"], "--db-outage"),
        (&["--db-outage", "banana+1s"], "--db-outage"),
        (&["--db-outage", "1s+0"], "--db-outage"),
        (&["--db-patience", "0"], "--db-patience"),
    ];
    for (args, needle) in cases {
        refuses(args, &[], needle);
    }
}

#[test]
fn bad_environment_variables_exit_2_naming_the_setting() {
    refuses(&[], &[("MAYHEM_WORKERS", "lots")], "--workers");
    refuses(
        &[],
        &[("MAYHEM_RESTART_FAILURE_RATE", "2")],
        "--restart-failure-rate",
    );
    refuses(
        &[],
        &[("MAYHEM_EXTEND_INTERVAL", "10s")],
        "--extend-interval",
    );
}

#[test]
fn values_that_are_not_utf8_are_refused_naming_the_flag_or_variable() {
    // Clap said only "invalid UTF-8 was detected in one or more arguments".
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    let bad = || OsString::from_vec(vec![b'x', 0xff]);
    let run = |command: &mut Command| {
        let output = command.stdin(Stdio::null()).output().expect("run mayhem");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(Command::new(env!("CARGO_BIN_EXE_mayhem"))
        .args(["--messages", "1"])
        .env("MAYHEM_STREAM", bad()));
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        stderr,
        "error: invalid value for 'MAYHEM_STREAM' (the variable of '--stream'): not valid \
         UTF-8\n"
    );
    let (code, stderr) = run(Command::new(env!("CARGO_BIN_EXE_mayhem"))
        .arg("--workers")
        .arg(bad()));
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        stderr,
        "error: invalid value for '--workers': not valid UTF-8\n"
    );
}

#[test]
fn help_exits_0() {
    let (status, _, _, stdout) = Service::start(&["--help"]).finish();
    assert_eq!(status.code(), Some(0));
    assert!(stdout.contains("--max-in-flight"), "{stdout}");
}

#[test]
fn the_service_s_own_checks_are_one_line() {
    refuses_in_one_line(&["--workers", "0"], "--workers");
    refuses_in_one_line(&["--ack-deadline", "11m"], "--ack-deadline");
    refuses_in_one_line(&["--log-filter", "mayhem=loud"], "--log-filter");
    let line = refuses_in_one_line(&["--rate-limit", "0"], "--rate-limit");
    assert!(line.contains("'0'"), "{line}");
    refuses_in_one_line(
        &["--breaker-failures", "3", "--breaker-cooldown", "0"],
        "--breaker-cooldown",
    );
    refuses_in_one_line(&["--breaker-cooldown", "1s"], "--breaker-failures");
    refuses_in_one_line(&["--db-patience", "0"], "--db-patience");
}

#[test]
fn an_automatic_ack_deadline_is_accepted_in_any_case() {
    for value in ["auto", "AUTO"] {
        let service = Service::start(&[
            "--messages",
            "3",
            "--publish-interval",
            "0",
            "--handler-latency",
            "0",
            "--ack-deadline",
            value,
            "--report",
            "json",
        ]);
        let (status, _, lines, json) = service.finish();
        assert_eq!(status.code(), Some(0), "{value}: {lines:#?}");
        assert_balanced(&json);
    }
}

#[test]
fn a_database_outage_fails_every_save_and_is_counted() {
    let service = Service::start(&[
        "--messages",
        "5",
        "--publish-interval",
        "0",
        "--handler-latency",
        "0",
        "--restart-failure-rate",
        "0",
        "--save-failure-rate",
        "0",
        "--max-attempts",
        "2",
        "--db-outage",
        "0s+1h",
        "--db-capacity",
        "10",
        "--report",
        "json",
    ]);
    let (status, _, lines, json) = service.finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    assert_eq!(field(&json, "db_outage"), 10.0, "{json}");
    assert_eq!(field(&json, "dead_lettered"), 5.0, "{json}");
    assert_balanced(&json);
}

#[test]
fn usage_errors_keep_clap_s_suggestions_and_possible_values() {
    let lines = refuses(&["--workres", "2"], &[], "--workres");
    assert!(
        lines
            .iter()
            .any(|line| line.contains("a similar argument exists: '--workers'")),
        "{lines:#?}"
    );
    let lines = refuses(&["--report", "xml"], &[], "--report");
    assert!(
        lines
            .iter()
            .any(|line| line.contains("[possible values: text, json]")),
        "{lines:#?}"
    );
}

#[test]
fn enumerated_values_ignore_case() {
    let (status, _, lines, stdout) = Service::start(&[
        "--messages",
        "3",
        "--publish-interval",
        "0",
        "--handler-latency",
        "0",
        "--log-level",
        "WARN",
        "--report",
        "JSON",
        "--source",
        "Memory",
    ])
    .finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    assert!(stdout.starts_with('{'), "{stdout}");
    assert!(
        lines.iter().all(|line| !line.contains(" INFO: ")),
        "{lines:#?}"
    );
}

#[test]
fn help_fits_100_columns_states_ranges_exit_codes_and_signals() {
    for flag in ["-h", "--help"] {
        // Without a terminal, clap wraps to 100 columns; COLUMNS is what a terminal reports.
        let service = Service::start_with_env(&[flag], &[("COLUMNS", "300")]);
        let (status, _, _, stdout) = service.finish();
        assert_eq!(status.code(), Some(0));
        for line in stdout.lines() {
            assert!(line.chars().count() <= 100, "{flag}: {line:?} is too long");
        }
        // One line or two per flag: about fifty flags (the layers, the adaptive window and
        // the simulated database of issue 20 among them) and the notes after them.
        assert!(stdout.lines().count() <= 160, "{flag}: {stdout}");
        let words = stdout.split_whitespace().collect::<Vec<_>>().join(" ");
        for expected in [
            "Consumer threads, 1 to 1024",
            "0 to 1",
            "10ms to 10m",
            "Exit codes: 0",
            "130",
            "SIGTERM",
            "SIGHUP",
            "SIGQUIT",
        ] {
            assert!(
                words.contains(expected),
                "{flag}: no {expected:?} in {stdout}"
            );
        }
    }
    let (_, _, _, narrow) = Service::start_with_env(&["--help"], &[("COLUMNS", "60")]).finish();
    for line in narrow.lines() {
        assert!(
            line.chars().count() <= 60,
            "{line:?} is not wrapped to 60 columns"
        );
    }
}

/// Nobody listens on port 1: a publish that got past its checks would fail to connect
/// (exit 1), so these exits 2 also show that bad input is refused before connecting.
const NOWHERE: &str = "redis://127.0.0.1:1/0";

#[test]
fn publish_refuses_bad_input_in_one_line_with_exit_2() {
    let long_value = format!("k={}", "v".repeat(1025));
    let long_key = "o".repeat(1025);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        // Not KEY=VALUE.
        (vec!["--attribute", "origin", "web-03"], "'origin'"),
        (
            vec!["--attribute", "=ops", "web-03"],
            "an attribute key is empty",
        ),
        (
            vec!["--attribute", "a=1", "--attribute", "a=2", "web-03"],
            "attribute 'a' is given twice",
        ),
        // Reserved by the Redis entry layout.
        (
            vec!["--attribute", "data=x", "web-03"],
            "'data' is reserved",
        ),
        (
            vec!["--attribute", "message_id=x", "web-03"],
            "'message_id' is reserved",
        ),
        // Over Pub/Sub's limits.
        (
            vec!["--attribute", &long_value, "web-03"],
            "attribute 'k' has 1025 bytes",
        ),
        (
            vec!["--ordering-key", &long_key, "web-03"],
            "--ordering-key",
        ),
    ];
    for (args, needle) in cases {
        let mut full = vec!["publish", "--source", NOWHERE];
        full.extend(args);
        let line = refuses_in_one_line(&full, needle);
        // A long value is named, not repeated whole.
        assert!(line.len() < 200, "{line}");
    }
}

#[test]
fn publish_refuses_the_in_memory_source_in_one_line() {
    // Explicit, by the variable the service reads too, and by default.
    for (args, env) in [
        (&["publish", "--source", "memory", "web-03"][..], &[][..]),
        (
            &["publish", "web-03"][..],
            &[("MAYHEM_SOURCE", "memory")][..],
        ),
        (&["publish", "web-03"][..], &[][..]),
    ] {
        let lines = refuses(args, env, "--source memory");
        assert_eq!(lines.len(), 1, "{lines:?}");
    }
}

#[test]
fn publish_flags_found_bad_by_clap_exit_2() {
    refuses(&["publish", "--bogus", "x"], &[], "--bogus");
    refuses(
        &["publish", "--source", NOWHERE, "--max-attempts", "0", "x"],
        &[],
        "--max-attempts",
    );
    refuses(
        &["publish", "--reconnect-limit", "soon", "x"],
        &[],
        "--reconnect-limit",
    );
    // The service's flags mean nothing to publish.
    refuses(&["--workers", "2", "publish", "x"], &[], "publish");
    // The service's variables are not read by publish, even one the service would refuse.
    let lines = refuses(
        &["publish", "x"],
        &[("MAYHEM_WORKERS", "2"), ("MAYHEM_PUBLISHERS", "abc")],
        "--source memory",
    );
    assert_eq!(lines.len(), 1, "{lines:?}");
}

#[test]
fn publish_has_its_own_help_and_the_service_s_help_names_it() {
    let (status, _, _, stdout) = Service::start(&["publish", "--help"]).finish();
    assert_eq!(status.code(), Some(0));
    assert!(
        stdout.contains("Usage: mayhem publish [OPTIONS] [DATA]..."),
        "{stdout}"
    );
    for expected in ["--attribute <KEY=VALUE>", "--ordering-key", "Exit codes: 0"] {
        assert!(stdout.contains(expected), "no {expected:?} in {stdout}");
    }
    for line in stdout.lines() {
        assert!(line.chars().count() <= 100, "{line:?} is too long");
    }
    let (status, _, _, stdout) = Service::start(&["--help"]).finish();
    assert_eq!(status.code(), Some(0));
    assert!(stdout.contains("publish  Publish messages"), "{stdout}");
}

#[test]
fn a_signal_ends_a_publish_waiting_for_its_broker_with_130() {
    // Retrying for the default 30 s (said at warn level): the signal ends it at once.
    let mut service = Service::start(&[
        "publish",
        "--source",
        NOWHERE,
        "--log-level",
        "warn",
        "web-03",
    ]);
    service.wait_for("retrying for up to 30s");
    service.signal("SIGTERM");
    let (status, took, lines, stdout) = service.finish();
    assert_eq!(status.code(), Some(130), "{lines:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].starts_with("error: interrupted by SIGTERM"),
        "{lines:?}"
    );
    assert!(stdout.is_empty(), "{stdout}");
}

#[test]
fn a_broker_address_on_port_0_is_bad_input_not_an_outage() {
    // Nothing can be reached on port 0: the address is refused before connecting (exit 2),
    // as PUBSUB_EMULATOR_HOST=host:0 is, instead of being retried as a broker that is down
    // for the whole --reconnect-limit and then exit 1.
    let mut urls = vec!["redis://127.0.0.1:0/0", "redis://:pw@[::1]:0/0"];
    if cfg!(feature = "amqp") {
        urls.push("amqp://guest:guest@127.0.0.1:0/%2f");
    }
    for url in urls {
        for args in [
            &["--source", url][..],
            &["publish", "--source", url, "web-03"],
        ] {
            let line = refuses_in_one_line(args, "port 0");
            assert!(!line.contains("pw@"), "{line}");
        }
    }
}

#[cfg(feature = "amqp")]
#[test]
fn publish_refuses_headers_rabbitmq_keeps() {
    let url = "amqp://guest:guest@127.0.0.1:1/%2f";
    refuses_in_one_line(
        &[
            "publish",
            "--source",
            url,
            "--attribute",
            "x-death=1",
            "web-03",
        ],
        "'x-death' is reserved",
    );
}

#[test]
fn messages_without_publishers_on_the_embedded_pub_sub_are_refused() {
    let line = refuses_in_one_line(&["--messages", "5", "--publishers", "0"], "--messages 5");
    assert!(line.contains("--publishers 0"), "{line}");
    // Nothing to wait for: `--messages 0` is done at once.
    let (status, _, lines, _) = Service::start(&["--messages", "0", "--publishers", "0"]).finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
}

#[test]
fn log_lines_carry_the_local_offset_when_it_is_not_utc() {
    let args = [
        "--messages",
        "2",
        "--publish-interval",
        "0",
        "--handler-latency",
        "0",
    ];
    // A POSIX TZ rule needs no time zone database: 3 hours east of UTC, all year.
    let (status, _, lines, _) = Service::start_with_env(&args, &[("TZ", "XYZ-3")]).finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    for line in &lines {
        // `21:46:39,660+03:00 INFO: message`
        assert_eq!(line.get(12..19), Some("+03:00 "), "{line}");
    }
    let (status, _, lines, _) = Service::start_with_env(&args, &[("TZ", "UTC")]).finish();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    for line in &lines {
        assert_eq!(line.as_bytes().get(12), Some(&b' '), "{line}");
    }
}

#[test]
fn a_tz_naming_a_fifo_or_a_device_is_refused_not_read() {
    // The time zone library reads the file `TZ` names whole: a FIFO nobody writes to hung
    // the start for good (one signal could not end it), and `TZ=/dev/zero` took memory
    // until the kernel killed the process. The FIFO is what this test sends: a regression
    // hangs (and is killed), it does not eat the machine's memory.
    let fifo = std::env::temp_dir().join(format!("mayhem-tz-fifo-{}", std::process::id()));
    let _ = std::fs::remove_file(&fifo);
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo {}", fifo.display());
    let tz = fifo.to_str().expect("a utf-8 path").to_owned();
    let args = [
        "--messages",
        "2",
        "--publish-interval",
        "0",
        "--handler-latency",
        "0",
    ];
    let (status, took, lines, _) = Service::start_with_env(&args, &[("TZ", &tz)]).finish();
    let _ = std::fs::remove_file(&fifo);
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let warning = format!("WARN: TZ={tz} is not a time zone file");
    assert!(
        lines.iter().any(|line| line.contains(&warning)),
        "{lines:#?}"
    );
    // UTC: no offset after the time.
    for line in &lines {
        assert_eq!(line.as_bytes().get(12), Some(&b' '), "{line}");
    }
}

#[test]
fn a_log_filter_sets_levels_per_module() {
    let run = |level: &str, filter: &str| {
        let (status, _, lines, _) = Service::start(&[
            "--messages",
            "3",
            "--publish-interval",
            "0",
            "--handler-latency",
            "0",
            "--log-level",
            level,
            "--log-filter",
            filter,
        ])
        .finish();
        assert_eq!(status.code(), Some(0), "{lines:#?}");
        let has = |text: &str| lines.iter().any(|line| line.contains(text));
        (has("Published "), has("Done. Acked "))
    };
    // The publisher is quieter than the rest, then louder than the rest.
    assert_eq!(
        run("info", "mayhem::pipeline::publisher=warn"),
        (false, true)
    );
    assert_eq!(
        run("warn", "mayhem::pipeline::publisher=info"),
        (true, false)
    );
}

#[test]
fn a_closed_stdout_does_not_turn_a_clean_run_into_a_failure() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mayhem"))
        .args([
            "--messages",
            "200",
            "--publish-interval",
            "0",
            "--handler-latency",
            "0",
            "--report",
            "json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mayhem");
    // Like `mayhem --report json | head -c0`: the reader is gone before the report is written.
    drop(child.stdout.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    let status = child.wait().expect("wait for mayhem");
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("Successfully shutdown the Mayhem service."));
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_closed_stderr_does_not_turn_a_clean_run_into_a_failure() {
    let output = Command::new("sh")
        .arg("-c")
        .arg("exec 2>&-; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_mayhem"))
        .args([
            "--messages",
            "200",
            "--publish-interval",
            "0",
            "--handler-latency",
            "0",
            "--report",
            "json",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run mayhem");
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        field(&stdout, "acked") + field(&stdout, "dead_lettered"),
        200.0,
        "{stdout}"
    );
}

#[test]
fn as_pid_1_in_a_new_pid_namespace_sigterm_stops_cleanly() {
    let probe = Command::new("unshare")
        .args(["--fork", "--pid", "--mount-proc", "true"])
        .output();
    if !matches!(probe, Ok(ref output) if output.status.success()) {
        eprintln!("skipping: unshare --fork --pid is not permitted here ({probe:?})");
        return;
    }
    let mut child = Command::new("unshare")
        .args([
            "--fork",
            "--pid",
            "--mount-proc",
            env!("CARGO_BIN_EXE_mayhem"),
        ])
        .args([
            "--publish-interval",
            "10ms",
            "--handler-latency",
            "10ms",
            "--report",
            "json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start unshare");
    let stderr = child.stderr.take().expect("piped stderr");
    let (sender, lines) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = sender.send(line.clone());
            all.push(line);
        }
        all
    });
    let end = Instant::now() + PATIENCE;
    while !lines
        .recv_timeout(end.saturating_duration_since(Instant::now()))
        .expect("a log line")
        .contains("Handling")
    {}
    // The service is PID 1 of the namespace; from here it is unshare's only child.
    let pgrep = Command::new("pgrep")
        .args(["-P", &child.id().to_string()])
        .output()
        .expect("run pgrep");
    let pid = String::from_utf8_lossy(&pgrep.stdout).trim().to_owned();
    assert!(!pid.is_empty(), "no child of unshare found");
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(status.success());
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut stdout)
        .expect("read stdout");
    let status = child.wait().expect("wait for unshare");
    let lines = reader.join().expect("stderr reader");
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    assert_shutdown_sequence(&lines, "Received exit signal SIGTERM...");
    assert_balanced(&stdout);
}

/// Starts the binary with the handled signals blocked, as a supervisor that wants no window
/// before `main` does: a signal sent at once stays pending until the binary installed its
/// handlers and unblocked them. (Without the mask, a signal in the first millisecond after
/// exec meets the loader and the runtime start-up, before any code of the program runs.)
fn spawn_with_signals_blocked(args: &[&str]) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(env!("CARGO_BIN_EXE_mayhem"));
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only async-signal-safe calls are made (sigemptyset,
    // sigaddset and pthread_sigmask on a local set), as `pre_exec` requires.
    unsafe {
        command.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                libc::sigaddset(&mut set, signal);
            }
            match libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) {
                0 => Ok(()),
                error => Err(std::io::Error::from_raw_os_error(error)),
            }
        });
    }
    command.spawn().expect("start mayhem")
}

/// Reads a pipe to its end on a thread of its own.
fn read_in_background(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Waits for a child's exit, killing it after `PATIENCE`; returns the status and the time.
fn wait_bounded(child: &mut std::process::Child) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for mayhem") {
            return (status, started.elapsed());
        }
        if started.elapsed() > PATIENCE {
            let _ = child.kill();
            panic!("mayhem did not exit within {PATIENCE:?}");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_signal_sent_right_after_spawn_takes_the_graceful_path() {
    use std::os::unix::process::ExitStatusExt;
    let signals = [
        ("SIGTERM", libc::SIGTERM),
        ("SIGINT", libc::SIGINT),
        ("SIGHUP", libc::SIGHUP),
        ("SIGQUIT", libc::SIGQUIT),
    ];
    for round in 0..20 {
        let (name, signal) = signals[round % signals.len()];
        let mut child = spawn_with_signals_blocked(&[
            "--publish-interval",
            "10ms",
            "--handler-latency",
            "10ms",
            "--report",
            "json",
        ]);
        // SAFETY: `kill` on our own child's pid, which cannot be reused before `wait`.
        let sent = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        assert_eq!(sent, 0, "kill failed");
        let stderr = read_in_background(child.stderr.take().expect("piped stderr"));
        let stdout = read_in_background(child.stdout.take().expect("piped stdout"));
        let (status, _) = wait_bounded(&mut child);
        let stderr = stderr.join().expect("stderr reader");
        let stdout = stdout.join().expect("stdout reader");
        assert_eq!(
            status.signal(),
            None,
            "round {round}: killed by {name}: {stderr}"
        );
        assert_eq!(status.code(), Some(0), "round {round}: {stderr}");
        assert!(
            stderr.contains(&format!("Received exit signal {name}...")),
            "round {round}: {stderr}"
        );
        assert!(
            stdout.contains("\"reason\":\"signal\""),
            "round {round}: {stdout}"
        );
    }
}

#[cfg(feature = "redis")]
#[test]
fn a_signal_during_a_stalled_source_connect_exits_gracefully() {
    use std::os::unix::process::ExitStatusExt;
    // A "Redis" that accepts connections and never answers.
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let url = format!("redis://{}/0", stalled.local_addr().expect("local address"));
    let service = Service::start(&["--source", &url, "--reconnect-limit", "60s"]);
    let (accepted, connected) = mpsc::channel();
    thread::spawn(move || {
        // Held open until the test ends, never answered.
        let connection = stalled.accept();
        let _ = accepted.send(());
        thread::sleep(PATIENCE);
        drop(connection);
    });
    connected
        .recv_timeout(PATIENCE)
        .expect("the service connects to the stalled server");
    // The service is now inside its start-up connect.
    service.signal("SIGTERM");
    let (status, took, lines, stdout) = service.finish();
    assert_eq!(status.signal(), None, "killed by a signal: {lines:#?}");
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    for expected in [
        "Received exit signal SIGTERM...",
        "Start-up interrupted before the source was connected",
        "Successfully shutdown the Mayhem service.",
    ] {
        assert!(
            lines.iter().any(|line| line.contains(expected)),
            "no {expected:?} in {lines:#?}"
        );
    }
    assert!(stdout.is_empty(), "{stdout}");
}

#[test]
fn a_stderr_nobody_reads_does_not_stop_the_service() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mayhem"))
        .args([
            "--messages",
            "20000",
            "--publish-interval",
            "0",
            "--handler-latency",
            "0",
            "--report",
            "json",
            "--seed",
            "3",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mayhem");
    // Held open and never read: about 7 MB of log lines meet a 64 KiB pipe.
    let unread = child.stderr.take().expect("piped stderr");
    let report = read_in_background(child.stdout.take().expect("piped stdout"));
    let (status, _) = wait_bounded(&mut child);
    let stdout = report.join().expect("stdout reader");
    assert_eq!(status.code(), Some(0), "{stdout}");
    assert_eq!(field(&stdout, "published"), 20000.0, "{stdout}");
    assert_eq!(field(&stdout, "remaining"), 0.0, "{stdout}");
    assert_balanced(&stdout);
    drop(unread);
}

/// The flags of the service's table in the README, the first under "Command line" (the
/// first column, up to a space).
fn readme_flags() -> std::collections::BTreeSet<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## Command line\n")
        .nth(1)
        .expect("a Command line section");
    section
        .lines()
        .skip_while(|line| !line.starts_with("| flag |"))
        .take_while(|line| line.starts_with('|'))
        .filter_map(|line| line.strip_prefix("| `--"))
        .map(|rest| {
            let flag: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            format!("--{flag}")
        })
        .collect()
}

#[test]
fn the_readme_flag_table_lists_exactly_the_flags_of_help() {
    let (status, _, _, stdout) = Service::start(&["--help"]).finish();
    assert_eq!(status.code(), Some(0));
    let help: std::collections::BTreeSet<String> = stdout
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("--"))
        .map(|rest| {
            let flag: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            format!("--{flag}")
        })
        .filter(|flag| flag != "--help" && flag != "--version")
        .collect();
    let readme = readme_flags();
    let missing: Vec<_> = help.difference(&readme).collect();
    assert!(
        missing.is_empty(),
        "flags of --help not in the README's table: {missing:?}"
    );
    // The README documents every build; a build without a feature lacks its flags.
    let feature_flags = ["--amqp-ca-file", "--amqp-publish-connections"];
    let extra: Vec<_> = readme
        .difference(&help)
        .filter(|flag| cfg!(feature = "amqp") || !feature_flags.contains(&flag.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "flags of the README's table not in --help: {extra:?}"
    );
}
