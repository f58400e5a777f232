//! The test harness, shared by the test files (each includes it with `mod common;`): a
//! running service whose stderr is read line by line, signals, checks of the shutdown lines
//! and the JSON report, the skip-or-require rule, free ports, a fault proxy, and the broker
//! servers the tests start ([`redis::RedisServer`], [`rabbit::Rabbit`]) behind one
//! trait, [`BrokerServer`], and the Pub/Sub emulator ([`pubsub::Emulator`]).

#![allow(dead_code)]

// Also loaded by `pubsub` and by the soaks (see `port.rs`).
#[allow(clippy::duplicate_mod)]
mod port;
pub mod proxy;
#[cfg(feature = "pubsub")]
pub mod pubsub;
#[cfg(feature = "amqp")]
pub mod rabbit;
#[cfg(feature = "redis")]
pub mod redis;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The shutdown lines, in the order they must appear (after `Received exit signal ...`).
pub const SHUTDOWN_LINES: [&str; 6] = [
    "Closing database connections",
    "Nacking outstanding messages",
    "Cancelling ",
    "Shutting down executor",
    "Flushing metrics",
    "Successfully shutdown the Mayhem service.",
];

/// Upper bound for anything a test waits for; only reached when something is broken.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The variable that turns this test binary's skips into failures: `MAYHEM_REQUIRE_` and the
/// binary's name (`MAYHEM_REQUIRE_REDIS` for tests/redis.rs, `MAYHEM_REQUIRE_AMQP` for
/// tests/amqp.rs, and so on); `.ci/run` sets them.
pub fn require_variable() -> String {
    format!(
        "MAYHEM_REQUIRE_{}",
        env!("CARGO_CRATE_NAME").to_ascii_uppercase()
    )
}

/// The skip-or-require rule. Says loudly that a test is skipped (`SKIPPED` on stderr) and
/// records it in `target/tmp/skipped.log`, which `make test` counts; with the binary's
/// [`require_variable`] set to 1 a skip is a failure instead.
pub fn skip(reason: &str) {
    let variable = require_variable();
    let test = thread::current().name().map_or_else(
        || format!("{} test", env!("CARGO_CRATE_NAME")),
        str::to_owned,
    );
    if std::env::var(&variable).is_ok_and(|v| v == "1") {
        panic!("{test}: {reason}, and {variable}=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: {reason}");
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("skipped.log");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        // One write per line: appends of whole lines from parallel tests do not interleave.
        let _ = file.write_all(format!("{test}: {reason}\n").as_bytes());
    }
}

/// A free loopback port (free when asked; a server started on it may still find it taken).
pub fn free_port() -> u16 {
    port::free_port().expect("find a free port")
}

/// Polls `condition` until it holds, failing with `what` after `PATIENCE`.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let end = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// A broker server a test starts: its address, and the faults a test puts it through.
pub trait BrokerServer {
    /// The port it listens on.
    fn port(&self) -> u16;

    /// Its URL as reached on `port`: its own, or that of a proxy in front of it.
    fn url_on(&self, port: u16) -> String;

    /// Its URL.
    fn url(&self) -> String {
        self.url_on(self.port())
    }

    /// Stops it, keeping its data for [`BrokerServer::restart`].
    fn stop(&self);

    /// Starts it again after [`BrokerServer::stop`], on the same port.
    fn restart(&self);

    /// Freezes it (SIGSTOP): it keeps its connections and answers nothing.
    fn freeze(&self);

    /// Lets a frozen server run on (SIGCONT).
    fn thaw(&self);
}

/// Sends `kill -{name}` to `target` (a process id, or `-group` for a process group).
pub fn kill(name: &str, target: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), "--", target])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {target} failed");
}

/// A running `mayhem` process whose stderr is read line by line.
pub struct Service {
    pub child: Child,
    /// The stderr lines, as they are read.
    incoming: Receiver<String>,
    /// The stderr lines read so far.
    pub seen: Vec<String>,
    stdout: Option<JoinHandle<String>>,
    /// How long a wait lasts before the test fails.
    patience: Duration,
}

impl Service {
    pub fn start(args: &[&str]) -> Service {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Service {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mayhem"));
        command.args(args);
        for (key, value) in env {
            command.env(key, value);
        }
        Self::spawn(command)
    }

    /// Starts `mayhem --source {source} --log-level info` with `args`.
    pub fn start_on(source: &str, args: &[&str]) -> Service {
        Self::start(&[&["--source", source, "--log-level", "info"][..], args].concat())
    }

    /// Starts `command` (the binary, or a container engine running it) with stdout and
    /// stderr piped and no stdin.
    pub fn spawn(mut command: Command) -> Service {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start mayhem");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let (sender, incoming) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stdout = thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        Service {
            child,
            incoming,
            seen: Vec::new(),
            stdout: Some(stdout),
            patience: PATIENCE,
        }
    }

    /// The same service, waiting up to `patience` instead of [`PATIENCE`].
    pub fn with_patience(mut self, patience: Duration) -> Service {
        self.patience = patience;
        self
    }

    /// The stderr lines so far (those written and not read yet included).
    pub fn lines(&mut self) -> &[String] {
        self.seen.extend(self.incoming.try_iter());
        &self.seen
    }

    /// Reads stderr until a line contains `pattern`; panics after its patience.
    pub fn wait_for(&mut self, pattern: &str) {
        self.wait_for_count_after(0, pattern, 1);
    }

    /// Reads stderr until `count` lines contain `pattern`.
    pub fn wait_for_count(&mut self, pattern: &str, count: usize) {
        self.wait_for_count_after(0, pattern, count);
    }

    /// Reads stderr until a line after the first `skip` lines seen contains `pattern`.
    pub fn wait_for_after(&mut self, skip: usize, pattern: &str) {
        self.wait_for_count_after(skip, pattern, 1);
    }

    fn wait_for_count_after(&mut self, skip: usize, pattern: &str, count: usize) {
        let patience = self.patience;
        let end = Instant::now() + patience;
        let mut found = self
            .seen
            .iter()
            .skip(skip)
            .filter(|line| line.contains(pattern))
            .count();
        while found < count {
            let left = end.saturating_duration_since(Instant::now());
            match self.incoming.recv_timeout(left) {
                Ok(line) => {
                    found += usize::from(line.contains(pattern));
                    self.seen.push(line);
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "{found} of {count} lines with {pattern:?} after line {skip} within \
                         {patience:?}; seen: {:?}",
                        self.seen
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("stderr closed before {pattern:?}; seen: {:?}", self.seen)
                }
            }
        }
    }

    pub fn signal(&self, name: &str) {
        kill(name, &self.child.id().to_string());
    }

    /// Waits for the exit (killing the process after its patience); returns the status, the
    /// time it took, all stderr lines and stdout.
    pub fn finish(mut self) -> (ExitStatus, Duration, Vec<String>, String) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for mayhem") {
                break status;
            }
            if started.elapsed() > self.patience {
                let _ = self.child.kill();
                panic!(
                    "mayhem did not exit within {:?}; seen: {:?}",
                    self.patience, self.seen
                );
            }
            match self.incoming.recv_timeout(Duration::from_millis(10)) {
                Ok(line) => self.seen.push(line),
                Err(_) => continue,
            }
        };
        let took = started.elapsed();
        self.seen.extend(self.incoming.iter());
        let stdout = self
            .stdout
            .take()
            .map(|reader| reader.join().expect("stdout reader"))
            .unwrap_or_default();
        (status, took, std::mem::take(&mut self.seen), stdout)
    }
}

impl Drop for Service {
    /// A test that fails before `finish` must not leave the service running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Asserts that `lines` hold `first` and then the shutdown lines, in that order.
pub fn assert_shutdown_sequence(lines: &[String], first: &str) {
    let mut expected = vec![first];
    expected.extend(SHUTDOWN_LINES);
    let mut position = 0;
    for pattern in expected {
        match lines[position..]
            .iter()
            .position(|line| line.contains(pattern))
        {
            Some(offset) => position += offset + 1,
            None => panic!("{pattern:?} missing or out of order in {lines:#?}"),
        }
    }
}

pub fn assert_no_panic_text(lines: &[String]) {
    for line in lines {
        assert!(!line.contains("panicked"), "panic text on stderr: {line}");
    }
}

/// The value of a numeric field of the JSON report.
pub fn field(json: &str, name: &str) -> f64 {
    let key = format!("\"{name}\":");
    let start = json
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {json}"))
        + key.len();
    let rest = &json[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number in {json}"))
}

pub fn assert_balanced(json: &str) {
    let published = field(json, "published");
    let settled = field(json, "acked") + field(json, "dead_lettered") + field(json, "remaining");
    assert_eq!(
        published, settled,
        "published != acked + dead_lettered + remaining: {json}"
    );
}

/// Instance names of the messages a process logged as acked.
pub fn acked_names(lines: &[String]) -> Vec<String> {
    names_in(lines, "Done. Acked PubSubMessage(instance_name='")
}

/// Instance names that follow `prefix` in the lines.
pub fn names_in(lines: &[String], prefix: &str) -> Vec<String> {
    lines
        .iter()
        .filter_map(|line| line.split(prefix).nth(1))
        .filter_map(|rest| rest.split('\'').next())
        .map(str::to_owned)
        .collect()
}

/// Flags of a fast, failure-free handler run without own publishers.
pub const QUIET: [&str; 12] = [
    "--publishers",
    "0",
    "--restart-failure-rate",
    "0",
    "--save-failure-rate",
    "0",
    "--report",
    "json",
    "--seed",
    "7",
    "--workers",
    "2",
];

/// [`QUIET`]'s flags followed by `args`.
pub fn quiet<'a>(args: &[&'a str]) -> Vec<&'a str> {
    [&QUIET[..], args].concat()
}

/// Flags of a handler that never fails (no failed restarts, no failed saves).
pub const NO_FAILURES: [&str; 4] = ["--restart-failure-rate", "0", "--save-failure-rate", "0"];

/// How many of `lines` contain `text`.
pub fn count_said(lines: &[String], text: &str) -> usize {
    lines.iter().filter(|line| line.contains(text)).count()
}

/// Asserts that one of `lines` contains `text`, showing them all when none does.
#[track_caller]
pub fn assert_said(lines: &[String], text: &str) {
    let found = lines.iter().any(|line| line.contains(text));
    assert!(found, "{text:?} missing:\n{}", lines.join("\n"));
}

/// The instance names acked by any of the processes whose stderr lines are `each`, sorted,
/// each once.
pub fn distinct_acked(each: &[&[String]]) -> Vec<String> {
    let mut all: Vec<String> = each.iter().flat_map(|lines| acked_names(lines)).collect();
    all.sort();
    all.dedup();
    all
}

/// Reads `service`'s stderr until it acked each of `names` (at least once); fails after
/// [`PATIENCE`] with how many it acked and its warnings, errors and broker lines.
pub fn wait_all_acked(service: &mut Service, names: &[String]) {
    let end = Instant::now() + PATIENCE;
    loop {
        let acked = distinct_acked(&[service.lines()]);
        let done = names.iter().filter(|name| acked.contains(name)).count();
        if done == names.len() {
            return;
        }
        let noted = |line: &&String| {
            ["WARN", "ERROR", "amqp", "redis"]
                .iter()
                .any(|w| line.contains(w))
        };
        let notes: Vec<&String> = service.lines().iter().filter(noted).collect();
        assert!(
            Instant::now() < end,
            "only {done} of {} acked:\n{notes:#?}",
            names.len()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Stops `server` under `service` and starts it again, waiting until `service` says `lost`
/// and then `back`.
pub fn restart_under(service: &mut Service, server: &impl BrokerServer, lost: &str, back: &str) {
    server.stop();
    service.wait_for(lost);
    server.restart();
    service.wait_for(back);
}

/// Runs `run` for each of `seeds` side by side, on a thread each; returns the outcomes, in
/// the order of `seeds`.
pub fn run_seeds<T: Send + 'static>(seeds: &[u64], run: fn(u64) -> T) -> Vec<(u64, T)> {
    let runs: Vec<_> = seeds
        .iter()
        .map(|&seed| thread::spawn(move || (seed, run(seed))))
        .collect();
    runs.into_iter()
        .map(|run| run.join().expect("soak run"))
        .collect()
}

/// Publishes `message` through `source`.
pub fn publish_one(source: &impl mayhem::Publish, message: &mayhem::PubSubMessage) {
    source
        .publish(std::slice::from_ref(message))
        .expect("publish");
}

/// Runs `mayhem publish --source {url} ARGS...` with `stdin` as its standard input (none
/// when `None`); returns the exit code, stdout and stderr.
pub fn run_publish(
    url: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> (Option<i32>, String, String) {
    let args = [&["publish", "--source", url][..], args].concat();
    let output = run_with_input(&args, stdin);
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The ids `mayhem publish` printed: one UUID v4 per line.
pub fn printed_ids(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|line| {
            let uuid = mayhem::Uuid::parse_str(line)
                .unwrap_or_else(|error| panic!("{line:?} is no uuid: {error}"));
            assert_eq!(uuid.get_version_num(), 4, "{line}");
            assert_eq!(uuid.hyphenated().to_string(), line);
            line.to_owned()
        })
        .collect()
}

/// Pulls one lease from `source`, waiting up to [`PATIENCE`].
pub fn pull_one(source: &impl mayhem::Source) -> mayhem::Lease {
    let end = Instant::now() + PATIENCE;
    let mut leases = Vec::new();
    while leases.is_empty() {
        assert!(Instant::now() < end, "nothing to pull");
        source
            .pull(1, Duration::from_millis(100), &mut leases)
            .expect("pull");
    }
    leases.remove(0)
}

/// Pulls from `source` until `count` leases came (or panics after [`PATIENCE`]).
pub fn pull_all(source: &impl mayhem::Source, count: usize) -> Vec<mayhem::Lease> {
    let end = Instant::now() + PATIENCE;
    let mut leases = Vec::new();
    while leases.len() < count {
        assert!(Instant::now() < end, "pulled {} of {count}", leases.len());
        source
            .pull(
                count - leases.len(),
                Duration::from_millis(100),
                &mut leases,
            )
            .expect("pull");
    }
    leases
}

/// Runs `mayhem` with `args` to its end, without standard input.
pub fn run(args: &[&str]) -> std::process::Output {
    run_with_input(args, None)
}

/// Runs `mayhem` with `args` to its end, with `input` as its standard input (none when
/// `None`).
pub fn run_with_input(args: &[&str], input: Option<&[u8]>) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mayhem"))
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mayhem");
    if let Some(input) = input {
        let mut pipe = child.stdin.take().expect("piped stdin");
        // A run that stops at a bad line reads no further: the rest cannot be written.
        let _ = pipe.write_all(input);
        // Dropped: the end of the input.
    }
    child.wait_with_output().expect("wait for mayhem")
}
