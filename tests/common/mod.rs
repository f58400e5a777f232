//! Helpers shared by the end-to-end tests of the binary: a running service whose stderr is
//! read line by line, signals, and checks of the shutdown lines and the JSON report.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
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

/// A running `mayhem` process whose stderr is read line by line.
pub struct Service {
    pub child: Child,
    pub lines: Receiver<String>,
    pub seen: Vec<String>,
    stdout: Option<JoinHandle<String>>,
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
        let (sender, lines) = mpsc::channel();
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
            lines,
            seen: Vec::new(),
            stdout: Some(stdout),
        }
    }

    /// Reads stderr until a line contains `pattern`; panics after `PATIENCE`.
    pub fn wait_for(&mut self, pattern: &str) {
        let end = Instant::now() + PATIENCE;
        if self.seen.iter().any(|line| line.contains(pattern)) {
            return;
        }
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(pattern);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "no line with {pattern:?} within {PATIENCE:?}; seen: {:?}",
                        self.seen
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("stderr closed before {pattern:?}; seen: {:?}", self.seen)
                }
            }
        }
    }

    /// Reads stderr until a line after the first `skip` lines seen contains `pattern`.
    pub fn wait_for_after(&mut self, skip: usize, pattern: &str) {
        let end = Instant::now() + PATIENCE;
        if self
            .seen
            .iter()
            .skip(skip)
            .any(|line| line.contains(pattern))
        {
            return;
        }
        while Instant::now() < end {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(pattern);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        panic!(
            "no line with {pattern:?} after line {skip} within {PATIENCE:?}; seen: {:?}",
            self.seen
        );
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the exit (killing the process after `PATIENCE`); returns the status, the
    /// time it took, all stderr lines and stdout.
    pub fn finish(mut self) -> (ExitStatus, Duration, Vec<String>, String) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for mayhem") {
                break status;
            }
            if started.elapsed() > PATIENCE {
                let _ = self.child.kill();
                panic!(
                    "mayhem did not exit within {PATIENCE:?}; seen: {:?}",
                    self.seen
                );
            }
            match self.lines.recv_timeout(Duration::from_millis(10)) {
                Ok(line) => self.seen.push(line),
                Err(_) => continue,
            }
        };
        let took = started.elapsed();
        self.seen.extend(self.lines.iter());
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
