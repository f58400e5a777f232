//! Randomized fault runs shared by the soak (`make soak`, `examples/soak.rs`) and its fast
//! subset with fixed seeds (`tests/chaos_fast.rs`, part of `make test`).
//!
//! Every run draws its settings from a seed: failure rates, handler panics, handler stalls
//! longer than the ack deadline, flow-control windows, thread counts, and a signal (SIGINT,
//! SIGTERM, SIGHUP or SIGQUIT, sometimes twice) at a random moment. Each run is checked for
//! the exit code, the shutdown lines in order, no panic text, the accounting invariant, and an
//! exit within the grace period plus one second.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use mayhem::{Config, MayhemConfig, MayhemHandler, Runner, Shutdown, ShutdownReason, Subscription};

/// The shutdown lines after the first (reason) line, in order.
pub const SHUTDOWN_LINES: [&str; 6] = [
    "Closing database connections",
    "Nacking outstanding messages",
    "Cancelling ",
    "Shutting down executor",
    "Flushing metrics",
    "Successfully shutdown the Mayhem service.",
];

/// Silences the default panic message of executor threads: handler panics there are injected
/// on purpose, caught by the runner and logged as `Caught exception`. Other panics still print.
pub fn quiet_handler_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !thread::current()
                .name()
                .unwrap_or("")
                .starts_with("mayhem-worker")
            {
                default(info);
            }
        }));
    });
}

/// Longest a run may take before it counts as hung.
const HUNG: Duration = Duration::from_secs(60);

/// What one run did, and what was wrong with it.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Signals sent to the process.
    pub signals: u64,
    /// Handler panics, handler failures (restart and save) and lease expiries seen.
    pub panics: u64,
    pub failures: u64,
    pub expired: u64,
    /// Messages published, and those neither acked, dead-lettered nor remaining.
    pub published: u64,
    pub lost: u64,
    /// Runs ended by a second signal (exit 130; no report to account).
    pub forced: u64,
    /// Every violated expectation, with the seed and settings to reproduce it.
    pub problems: Vec<String>,
}

impl Outcome {
    /// Adds another outcome's figures to this one.
    pub fn add(&mut self, other: &Outcome) {
        self.signals += other.signals;
        self.panics += other.panics;
        self.failures += other.failures;
        self.expired += other.expired;
        self.published += other.published;
        self.lost += other.lost;
        self.forced += other.forced;
        self.problems.extend(other.problems.iter().cloned());
    }

    /// Takes the counters of a JSON report and checks its invariant.
    fn account(&mut self, json: &str, context: &str) {
        let field = |name: &str| -> Option<u64> {
            let key = format!("\"{name}\":");
            let rest = &json[json.find(&key)? + key.len()..];
            rest[..rest.find([',', '}'])?].parse().ok()
        };
        let (Some(published), Some(acked), Some(dead), Some(remaining)) = (
            field("published"),
            field("acked"),
            field("dead_lettered"),
            field("remaining"),
        ) else {
            self.problems
                .push(format!("{context}: no complete report on stdout: {json:?}"));
            return;
        };
        self.published += published;
        self.panics += field("panicked").unwrap_or(0);
        self.failures += field("restart_failed").unwrap_or(0) + field("save_failed").unwrap_or(0);
        self.expired += field("expired").unwrap_or(0);
        let settled = acked + dead + remaining;
        if settled != published {
            self.lost += published.abs_diff(settled);
            self.problems.push(format!("{context}: published {published} != acked {acked} + dead {dead} + remaining {remaining}"));
        }
    }
}

/// Random settings shared by binary and library runs.
struct Settings {
    config: Config,
    /// Signal names to send and the pause before each; empty = a counted run.
    signals: Vec<(Duration, &'static str)>,
}

fn settings(seed: u64) -> Settings {
    let mut rng = fastrand::Rng::with_seed(seed);
    let ack_deadline = Duration::from_millis(rng.u64(200..=800));
    let mut config = Config::default();
    config.publish.publishers = rng.usize(1..=3);
    config.run.consumers = rng.usize(1..=3);
    config.run.workers = rng.usize(1..=4);
    config.run.max_in_flight = [5, 50, 1000][rng.usize(..3)];
    config.memory.max_backlog = [10, 1000][rng.usize(..2)];
    config.publish.interval = Duration::from_micros([0, 200, 2000][rng.usize(..3)]);
    config.handler.latency = Duration::from_millis([0, 5, 20, 100][rng.usize(..4)]);
    config.handler.restart_failure_rate = rng.f64();
    config.handler.save_failure_rate = rng.f64() * 0.5;
    config.handler.restart_retries = rng.u32(0..=3);
    config.handler.panic_rate = if rng.u8(..10) < 3 {
        rng.f64() * 0.02
    } else {
        0.0
    };
    config.handler.stall_rate = if rng.u8(..10) < 3 {
        rng.f64() * 0.05
    } else {
        0.0
    };
    // Stalls longer than the ack deadline, but short enough that a stalled executor thread
    // does not hold the shutdown past grace period + 1 s.
    config.handler.stall = Duration::from_millis(rng.u64(300..=500));
    config.lease.ack_deadline = ack_deadline;
    config.lease.extend_interval = ack_deadline / 3;
    config.lease.max_attempts = rng.u32(1..=5);
    config.run.grace_period = Duration::from_millis(rng.u64(50..=1000));
    config.run.messages = None;
    config.run.seed = Some(seed);
    let mut signals = Vec::new();
    if rng.u8(..10) < 3 {
        config.run.messages = Some(rng.u64(1..=500));
    } else {
        let names = ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"];
        signals.push((
            Duration::from_millis(rng.u64(20..=800)),
            names[rng.usize(..4)],
        ));
        if rng.u8(..10) < 2 {
            signals.push((
                Duration::from_millis(rng.u64(0..=300)),
                names[rng.usize(..4)],
            ));
        }
    }
    Settings { config, signals }
}

/// The flags that give `config` to the binary.
fn flags(config: &Config) -> Vec<String> {
    let ms = |d: Duration| format!("{}us", d.as_micros());
    let mut args = vec![
        ("--publishers", config.publish.publishers.to_string()),
        ("--consumers", config.run.consumers.to_string()),
        ("--workers", config.run.workers.to_string()),
        ("--max-in-flight", config.run.max_in_flight.to_string()),
        ("--max-backlog", config.memory.max_backlog.to_string()),
        ("--publish-interval", ms(config.publish.interval)),
        ("--handler-latency", ms(config.handler.latency)),
        (
            "--restart-failure-rate",
            config.handler.restart_failure_rate.to_string(),
        ),
        (
            "--save-failure-rate",
            config.handler.save_failure_rate.to_string(),
        ),
        (
            "--restart-retries",
            config.handler.restart_retries.to_string(),
        ),
        ("--panic-rate", config.handler.panic_rate.to_string()),
        ("--stall-rate", config.handler.stall_rate.to_string()),
        ("--stall", ms(config.handler.stall)),
        ("--ack-deadline", ms(config.lease.ack_deadline)),
        ("--extend-interval", ms(config.lease.extend_interval)),
        ("--max-attempts", config.lease.max_attempts.to_string()),
        ("--grace-period", ms(config.run.grace_period)),
        ("--seed", config.run.seed.unwrap_or(0).to_string()),
        ("--report", "json".to_owned()),
    ];
    if let Some(messages) = config.run.messages {
        args.push(("--messages", messages.to_string()));
    }
    args.into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect()
}

/// Starts the binary with `args` and a thread that collects its stdout (the report).
fn start(
    binary: &str,
    args: &[impl AsRef<std::ffi::OsStr>],
    stderr: Stdio,
) -> Result<(Child, thread::JoinHandle<String>), String> {
    let mut child = Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|error| format!("cannot start: {error}"))?;
    let mut stdout = child.stdout.take();
    let report = thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.as_mut().map(|out| out.read_to_string(&mut text));
        text
    });
    Ok((child, report))
}

/// One run of the binary at `binary` with settings drawn from `seed`.
pub fn binary_run(binary: &str, seed: u64) -> Outcome {
    let Settings { config, signals } = settings(seed);
    let args = flags(&config);
    let context = format!("binary seed {seed} ({} {})", binary, args.join(" "));
    let mut outcome = Outcome::default();
    let (mut child, report) = match start(binary, &args, Stdio::piped()) {
        Ok(started) => started,
        Err(error) => {
            outcome.problems.push(format!("{context}: {error}"));
            return outcome;
        }
    };
    let stderr = child.stderr.take();
    let (started_tx, started_rx) = mpsc::channel();
    let lines = thread::spawn(move || {
        let mut lines = Vec::new();
        let mut told = false;
        for line in BufReader::new(stderr.expect("piped stderr"))
            .lines()
            .map_while(Result::ok)
        {
            if !told && line.contains("Starting consumer") {
                let _ = started_tx.send(());
                told = true;
            }
            lines.push(line);
        }
        lines
    });

    let _ = started_rx.recv_timeout(HUNG);
    let mut first_signal = None;
    let mut sent_second_while_running = false;
    for (index, (pause, name)) in signals.iter().enumerate() {
        thread::sleep(*pause);
        let running = matches!(child.try_wait(), Ok(None));
        if !running {
            break;
        }
        let _ = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .status();
        outcome.signals += 1;
        if index == 0 {
            first_signal = Some(Instant::now());
        } else {
            sent_second_while_running = true;
        }
    }
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() > HUNG => {
                let _ = child.kill();
                outcome
                    .problems
                    .push(format!("{context}: hung for {HUNG:?}"));
                break None;
            }
            Ok(None) => thread::sleep(Duration::from_millis(1)),
            Err(error) => {
                outcome
                    .problems
                    .push(format!("{context}: wait failed: {error}"));
                break None;
            }
        }
    };
    let exited = Instant::now();
    let lines = lines.join().unwrap_or_default();
    let stdout = report.join().unwrap_or_default();
    let Some(status) = status else {
        return outcome;
    };
    let code = status.code();

    if let Some(line) = lines
        .iter()
        .find(|line| line.contains("panicked at") || line.contains("RUST_BACKTRACE"))
    {
        outcome
            .problems
            .push(format!("{context}: panic text on stderr: {line}"));
    }
    if code == Some(130) {
        // A second signal forced the exit: only allowed if one was sent while running.
        outcome.forced += 1;
        if !sent_second_while_running || !lines.iter().any(|line| line.contains("forcing exit")) {
            outcome
                .problems
                .push(format!("{context}: exit 130 without a second signal"));
        }
        return outcome;
    }
    outcome.account(&stdout, &context);
    let panicked = !stdout.contains("\"panicked\":0,");
    let expected = if panicked { 1 } else { 0 };
    if code != Some(expected) {
        outcome.problems.push(format!(
            "{context}: exit code {code:?}, expected {expected}; last lines: {:?}",
            tail(&lines)
        ));
    }
    let reason_line = lines.iter().position(|line| {
        line.contains("Received exit signal")
            || line.contains("Settled all")
            || line.contains("Caught exception")
    });
    match reason_line {
        Some(start) => {
            let mut position = start;
            for pattern in SHUTDOWN_LINES {
                match lines[position..]
                    .iter()
                    .position(|line| line.contains(pattern))
                {
                    Some(offset) => position += offset + 1,
                    None => {
                        outcome.problems.push(format!(
                            "{context}: {pattern:?} missing or out of order; last lines: {:?}",
                            tail(&lines)
                        ));
                        break;
                    }
                }
            }
        }
        None => outcome.problems.push(format!(
            "{context}: no shutdown reason line; last lines: {:?}",
            tail(&lines)
        )),
    }
    if let Some(signalled) = first_signal {
        let took = exited - signalled;
        if took > config.run.grace_period + Duration::from_secs(1) {
            outcome.problems.push(format!(
                "{context}: exit took {took:?} after the signal, grace period {:?}",
                config.run.grace_period
            ));
        }
    }
    outcome
}

/// The last lines of a log, for problem reports.
fn tail(lines: &[String]) -> &[String] {
    &lines[lines.len().saturating_sub(8)..]
}

/// One run of the library with settings drawn from `seed`; the signal becomes a programmatic
/// trigger after the same pause.
pub fn library_run(seed: u64) -> Outcome {
    let Settings { config, signals } = settings(seed);
    let context = format!("library seed {seed} ({config:?})");
    let mut outcome = Outcome::default();
    let subscription = Subscription::new((&config).into());
    let handler = MayhemHandler::new(MayhemConfig::from_config(&config, seed));
    let shutdown = Shutdown::new();
    let result = thread::scope(|scope| {
        let trigger = signals.first().map(|(pause, _)| *pause).map(|pause| {
            let shutdown = shutdown.clone();
            scope.spawn(move || {
                thread::sleep(pause);
                shutdown.trigger(ShutdownReason::Requested);
                Instant::now()
            })
        });
        let result =
            Runner::new(&config)
                .publisher(&subscription)
                .run(&subscription, &handler, &shutdown);
        let returned = Instant::now();
        let triggered = trigger.map(|handle| handle.join().expect("trigger thread"));
        (result, returned, triggered)
    });
    match result {
        (Ok(report), returned, triggered) => {
            outcome.signals += u64::from(triggered.is_some());
            outcome.account(&report.to_json(), &context);
            let expected = if report.panicked > 0 && report.reason == "panicked" {
                "panicked"
            } else if config.run.messages.is_some() {
                "completed"
            } else {
                "requested"
            };
            if report.reason != expected && report.reason != "panicked" {
                outcome.problems.push(format!(
                    "{context}: reason {}, expected {expected}",
                    report.reason
                ));
            }
            if let Some(triggered) = triggered {
                let took = returned.saturating_duration_since(triggered);
                if report.reason == "requested"
                    && took > config.run.grace_period + Duration::from_secs(1)
                {
                    outcome.problems.push(format!(
                        "{context}: run returned {took:?} after the trigger"
                    ));
                }
            }
        }
        (Err(error), _, _) => outcome
            .problems
            .push(format!("{context}: run failed: {error}")),
    }
    outcome
}

/// Peak RSS (kB) of the binary under overload: unthrottled publishers, slow handlers, for
/// `length`; then SIGTERM. Returns the peak and the outcome of the run.
pub fn overload_run(binary: &str, length: Duration) -> (u64, Outcome) {
    let context = format!("overload run of {length:?}");
    let mut outcome = Outcome::default();
    let args = [
        "--publishers",
        "2",
        "--publish-interval",
        "0",
        "--handler-latency",
        "1s",
        "--max-in-flight",
        "1000",
        "--restart-failure-rate",
        "0.2",
        "--save-failure-rate",
        "0.2",
        "--grace-period",
        "1s",
        "--log-level",
        "warn",
        "--report",
        "json",
        "--seed",
        "1",
    ];
    let (mut child, report) = match start(binary, &args, Stdio::null()) {
        Ok(started) => started,
        Err(error) => {
            outcome.problems.push(format!("{context}: {error}"));
            return (0, outcome);
        }
    };
    let status_path = format!("/proc/{}/status", child.id());
    let end = Instant::now() + length;
    let mut peak = 0;
    while Instant::now() < end {
        let rss = std::fs::read_to_string(&status_path)
            .ok()
            .and_then(|status| {
                status.lines().find_map(|line| {
                    line.strip_prefix("VmRSS:")?
                        .trim()
                        .strip_suffix("kB")?
                        .trim()
                        .parse()
                        .ok()
                })
            })
            .unwrap_or(0);
        peak = peak.max(rss);
        thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    outcome.signals += 1;
    match child.wait() {
        Ok(status) if status.code() == Some(0) => {}
        other => outcome.problems.push(format!("{context}: exit {other:?}")),
    }
    outcome.account(&report.join().unwrap_or_default(), &context);
    (peak, outcome)
}
