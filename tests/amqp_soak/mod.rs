//! Randomized fault runs of the `mayhem` binary on RabbitMQ, checked by message id.
//!
//! One run, from a seed: a `rabbitmq-server` of its own (started once, about 5 s, and kept
//! for the whole run), two or three instances sharing the queue `mayhem`, waves of messages
//! published by the harness through the library (`AmqpSource::publish`, each message with a
//! unique instance name), and between waves one fault: an instance SIGKILLed and restarted,
//! an instance stopped with SIGTERM and restarted, the broker frozen with SIGSTOP for 1 to 3 s
//! and continued, the broker stopped cleanly and started again on the same data, a memory
//! alarm for 1 to 3 s, or foreign (non-mayhem) messages published raw. Then the queue drains,
//! every instance gets SIGTERM, and the run is checked:
//! - every published message was acked at least once (a `Done. Acked` line) or dead-lettered
//!   (its body is in the dead-letter queue `mayhem:dead`);
//! - every foreign message is in the dead-letter queue;
//! - nothing is ready or unacked in the queue at the end;
//! - every SIGTERM ended its instance within the grace period plus one second, with status 0;
//! - no log has panic text.
//!
//! Messages acked more than once are allowed (delivery is at least once) and counted.
//!
//! One run in three (seeds divisible by 3) declares the queue first itself, as another
//! program would: a classic durable queue without arguments. The instances and the
//! harness's publisher then find it declared with other arguments and consume it as it is:
//! no dead-letter exchange and no delivery count, so the dead letters are the ones the
//! instances publish themselves, and the same checks hold.
//!
//! The broker is never SIGKILLed: a single RabbitMQ 3.10 node killed that way leaves its
//! quorum queues without a leader after the restart, which is no fault of the service.
//!
//! Used by `examples/amqp_soak.rs` (`make soak`) and, with fixed seeds, by `tests/amqp.rs`.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mayhem::{AmqpConfig, AmqpSource, PubSubMessage, Publish};

/// The server script of Debian's package (the copy under /usr/sbin insists on a service
/// user).
pub const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// `rabbitmqctl`, next to the server script.
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
/// The queue every instance consumes.
const QUEUE: &str = "mayhem";
/// The dead-letter queue of [`QUEUE`].
const DEAD: &str = "mayhem:dead";
/// The grace period of every instance.
const GRACE: Duration = Duration::from_secs(1);
/// The delivery limit of every instance (and of the harness's publisher, which declares the
/// same queue and must ask for the same arguments).
const MAX_ATTEMPTS: u32 = 5;
/// How long the queue may take to drain at the end of a run.
const DRAIN_PATIENCE: Duration = Duration::from_secs(60);
/// Upper bound for anything else the harness waits for; only reached when something is broken.
const PATIENCE: Duration = Duration::from_secs(60);

/// What one run saw.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Messages the harness published.
    pub published: usize,
    /// Distinct published messages acked by some instance.
    pub acked: usize,
    /// Distinct published messages found in the dead-letter queue.
    pub dead: usize,
    /// Foreign messages published raw.
    pub foreign: usize,
    /// Whether the queue was declared first as another program's (classic, no arguments).
    pub adopted: bool,
    /// Faults injected.
    pub faults: usize,
    /// The faults, in order.
    pub fault_names: Vec<&'static str>,
    /// Published messages acked more than once (allowed: delivery is at least once).
    pub duplicates: usize,
    /// SIGTERMs whose instance took longer than the grace period plus one second.
    pub slow_exits: usize,
    /// What went wrong, one line each.
    pub problems: Vec<String>,
}

// Also loaded by `common` in the test binaries that load both (see `port.rs`).
#[allow(clippy::duplicate_mod)]
#[path = "../common/port.rs"]
mod port;
use self::port::free_port;

/// A `rabbitmq-server` of one run, on free loopback ports, with its data in a temporary
/// directory.
struct Server {
    /// The AMQP port.
    port: u16,
    /// The Erlang distribution port.
    dist: u16,
    /// The node's data, logs and settings.
    dir: PathBuf,
    /// How many times it was started (each start logs to its own file).
    starts: u32,
    /// The watchdog shell and its standard input: it kills the server's process group when
    /// this closes (on a stop, on drop, or when the harness exits however it ends), then
    /// removes the directory unless the server is to be started again.
    watchdog: Option<(Child, ChildStdin)>,
}

impl Server {
    fn start(tag: u64) -> Result<Server, String> {
        if !Path::new(SERVER).exists() {
            return Err(format!(
                "{SERVER} not found (apt-get install rabbitmq-server)"
            ));
        }
        let dir =
            std::env::temp_dir().join(format!("mayhem-amqp-soak-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir: {e}"))?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")
            .map_err(|e| format!("plugins file: {e}"))?;
        let mut server = Server {
            port: free_port()?,
            dist: free_port()?,
            dir,
            starts: 0,
            watchdog: None,
        };
        server.spawn()?;
        Ok(server)
    }

    /// Starts the server (on the data of the previous start, if any) and waits until it
    /// accepts AMQP connections.
    fn spawn(&mut self) -> Result<(), String> {
        let log = self.dir.join(format!("server-{}.log", self.starts));
        self.starts += 1;
        // `setsid` runs the server in a session and process group of its own, which
        // `kill -KILL -$!` ends whole once standard input closes (see `tests/amqp.rs`).
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(
                "setsid \"$0\" >\"$1\" 2>&1 </dev/null & echo $! >\"$2/group\"; \
                 cat >/dev/null; kill -KILL -$!; sleep 0.2; \
                 [ -e \"$2/keep\" ] || rm -rf \"$2\"",
            )
            .arg(SERVER)
            .arg(&log)
            .arg(&self.dir)
            .env("HOME", &self.dir)
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_LOGS", "-")
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist.to_string())
            .env("RABBITMQ_NODENAME", self.node())
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_PID_FILE", self.dir.join("pid"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                self.dir.join("advanced.config"),
            )
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("start rabbitmq-server: {e}"))?;
        let Some(stdin) = watchdog.stdin.take() else {
            let _ = watchdog.kill();
            return Err("the watchdog has no standard input".to_owned());
        };
        self.watchdog = Some((watchdog, stdin));
        let end = Instant::now() + PATIENCE;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Server startup complete")
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return Ok(());
            }
            let exited = match &mut self.watchdog {
                Some((child, _)) => matches!(child.try_wait(), Ok(Some(_))),
                None => true,
            };
            if exited || Instant::now() > end {
                let tail: Vec<&str> = text.lines().rev().take(5).collect();
                return Err(format!(
                    "rabbitmq-server did not start (start {}): {}",
                    self.starts,
                    tail.join(" | ")
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's process group, as `kill` takes it.
    fn group(&self) -> Option<String> {
        let group = std::fs::read_to_string(self.dir.join("group")).ok()?;
        Some(format!("-{}", group.trim()))
    }

    /// Sends `signal` to the server's whole process group (the script and the Erlang VM).
    fn signal(&self, signal: &str) {
        if let Some(group) = self.group() {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), "--", &group])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Stops the server the way a service manager does (SIGTERM to its process group: the
    /// script stops the node cleanly) and keeps its data for [`Server::spawn`].
    fn stop(&mut self) -> Result<(), String> {
        std::fs::write(self.dir.join("keep"), "").map_err(|e| format!("keep mark: {e}"))?;
        let group = self
            .group()
            .ok_or("the server's process group is unknown")?;
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let end = Instant::now() + PATIENCE;
        let mut result = Ok(());
        while Command::new("kill")
            .args(["-0", "--", &group])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
        {
            if Instant::now() > end {
                result = Err(format!("rabbitmq-server did not stop within {PATIENCE:?}"));
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        if let Some((mut watchdog, stdin)) = self.watchdog.take() {
            drop(stdin);
            let _ = watchdog.wait();
        }
        let _ = std::fs::remove_file(self.dir.join("keep"));
        result
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The Erlang node name of the server.
    fn node(&self) -> String {
        let name = self
            .dir
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("mayhem-amqp-soak");
        format!("{name}@localhost")
    }

    /// Runs `rabbitmqctl` on the server; its standard output, or the failure.
    fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new(CTL)
            .arg("-n")
            .arg(self.node())
            .args(args)
            .env("HOME", &self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run rabbitmqctl: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "rabbitmqctl {args:?}: {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The ready and unacknowledged messages of [`QUEUE`], when the broker answers.
    fn counts(&self) -> Option<(u64, u64)> {
        let text = self
            .ctl(&[
                "list_queues",
                "-q",
                "--no-table-headers",
                "name",
                "messages_ready",
                "messages_unacknowledged",
            ])
            .ok()?;
        text.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields[..] {
                [name, ready, unacked] if name == QUEUE => {
                    Some((ready.parse().ok()?, unacked.parse().ok()?))
                }
                _ => None,
            }
        })
    }

    /// Declares [`QUEUE`] as another program would first: classic, durable, no arguments.
    fn declare_classic(&self) -> Result<(), String> {
        self.on_channel(|channel| async move {
            channel
                .queue_declare(
                    QUEUE.into(),
                    lapin::options::QueueDeclareOptions::durable(),
                    Default::default(),
                )
                .await
                .map(drop)
                .map_err(|e| format!("declare a classic queue: {e}"))
        })
    }

    /// Runs `work` on a channel of a plain lapin connection to the server (another AMQP
    /// client, no mayhem), then closes the connection.
    fn on_channel<T, F: std::future::Future<Output = Result<T, String>>>(
        &self,
        work: impl FnOnce(lapin::Channel) -> F,
    ) -> Result<T, String> {
        smol::block_on(async {
            let connection = lapin::Connection::connect(&self.url(), Default::default())
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| format!("channel: {e}"))?;
            let result = work(channel).await;
            let _ = connection.close(200, "done".into()).await;
            result
        })
    }

    /// Publishes `count` foreign messages raw (through lapin, with confirms), numbered from
    /// `first`: without a message id, with a message id that is no UUID, and with a UUID but
    /// a body that is no instance name. Each body holds `foreign-N`.
    fn publish_foreign(&self, first: usize, count: usize) -> Result<(), String> {
        self.on_channel(|channel| async move {
            channel
                .confirm_select(Default::default())
                .await
                .map_err(|e| format!("confirm mode: {e}"))?;
            for n in first..first + count {
                let (body, properties) = match n % 3 {
                    // Data that is no host name: the chaos monkey rejects it, so it is
                    // dead-lettered at once.
                    0 => (
                        format!("no host foreign-{n}").into_bytes(),
                        lapin::BasicProperties::default(),
                    ),
                    1 => (
                        format!("no host foreign-{n}").into_bytes(),
                        lapin::BasicProperties::default()
                            .with_message_id(format!("not-a-uuid-{n}").into()),
                    ),
                    _ => (
                        [&b"\xff"[..], format!("foreign-{n}").as_bytes()].concat(),
                        lapin::BasicProperties::default().with_message_id(
                            mayhem::Uuid::from_u128(n as u128 + 1).to_string().into(),
                        ),
                    ),
                };
                let confirmation = channel
                    .basic_publish(
                        "".into(),
                        QUEUE.into(),
                        lapin::options::BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &body,
                        properties.with_delivery_mode(2),
                    )
                    .await
                    .map_err(|e| format!("publish: {e}"))?
                    .await
                    .map_err(|e| format!("confirm: {e}"))?;
                // A message returned unroutable is acked too, with the message attached.
                if !confirmation.is_ack() {
                    return Err(format!("foreign message {n} nacked: {confirmation:?}"));
                }
                if confirmation.take_message().is_some() {
                    return Err(format!("foreign message {n} returned unroutable"));
                }
            }
            Ok(())
        })
    }

    /// Takes every message of the dead-letter queue; their bodies.
    fn take_dead_letters(&self) -> Result<Vec<Vec<u8>>, String> {
        self.on_channel(|channel| async move {
            let mut bodies = Vec::new();
            while let Some(message) = channel
                .basic_get(
                    DEAD.into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .map_err(|e| format!("basic.get {DEAD}: {e}"))?
            {
                bodies.push(message.delivery.data);
            }
            Ok(bodies)
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.signal("CONT");
        if let Some((mut watchdog, stdin)) = self.watchdog.take() {
            // The watchdog kills the process group and removes the directory.
            drop(stdin);
            let _ = watchdog.wait();
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One life of one instance.
struct Instance {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Instance {
    fn start(binary: &str, server: &Server, name: &str, seed: u64) -> Result<Instance, String> {
        // Slow enough that a fault often finds messages in flight, fast enough to drain.
        let latency = format!("{}ms", 5 + seed % 46);
        let in_flight = (10 + seed % 91).to_string();
        let mut child = Command::new(binary)
            .args(["--source", &server.url(), "--stream", QUEUE])
            .args(["--publishers", "0", "--workers", "2"])
            .args(["--handler-latency", &latency, "--seed", &seed.to_string()])
            .args([
                "--restart-failure-rate",
                "0.05",
                "--save-failure-rate",
                "0.05",
            ])
            .args(["--max-attempts", &MAX_ATTEMPTS.to_string()])
            .args(["--max-in-flight", &in_flight])
            .args(["--grace-period", "1s", "--reconnect-limit", "30s"])
            .args(["--log-level", "info"])
            .args(["--report", "json", "--stats-interval", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("start {binary}: {e}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        // A thread per pipe: an instance writes both, and a full pipe would stall it.
        if let Some(pipe) = child.stderr.take() {
            let lines = Arc::clone(&lines);
            readers.push(thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            }));
        }
        if let Some(mut pipe) = child.stdout.take() {
            readers.push(thread::spawn(move || {
                let mut sink = String::new();
                let _ = pipe.read_to_string(&mut sink);
            }));
        }
        Ok(Instance {
            name: name.to_owned(),
            child,
            lines,
            readers,
        })
    }

    fn has_line(&self, pattern: &str) -> bool {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|l| l.contains(pattern))
    }

    /// Waits until the instance consumes, or says why not.
    fn wait_started(&mut self) -> Result<(), String> {
        let end = Instant::now() + PATIENCE;
        while !self.has_line("Starting consumer") {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("{} exited at start-up: {status}", self.name));
            }
            if Instant::now() > end {
                return Err(format!("{} did not start consuming", self.name));
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn count_lines(&self, pattern: &str) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|l| l.contains(pattern))
            .count()
    }

    /// Waits until the instance logged more reconnections than `before`, or says why not.
    fn wait_reconnected(&mut self, before: usize) -> Result<(), String> {
        let end = Instant::now() + PATIENCE;
        while self.count_lines("reconnected to amqp") <= before {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited with {status} instead of reconnecting: {}",
                    self.name,
                    self.tail(2)
                ));
            }
            if Instant::now() > end {
                return Err(format!(
                    "{} did not reconnect within {PATIENCE:?} of the broker's restart",
                    self.name
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn signal(&self, name: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status();
    }

    /// Waits for the exit, up to `limit`; returns how long it took and the status, or
    /// `None` (the process is then killed).
    fn wait(&mut self, limit: Duration) -> Option<(Duration, ExitStatus)> {
        let started = Instant::now();
        let result = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break Some((started.elapsed(), status));
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(5));
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        result
    }

    /// Sends SIGTERM and checks the exit: within the grace period plus one second, with
    /// status 0.
    fn terminate(&mut self, outcome: &mut Outcome) {
        if let Ok(Some(status)) = self.child.try_wait() {
            outcome.problems.push(format!(
                "{} had exited on its own with {status} before its SIGTERM: {}",
                self.name,
                self.tail(2)
            ));
            self.wait(PATIENCE);
            return;
        }
        self.signal("TERM");
        match self.wait(PATIENCE) {
            Some((took, status)) => {
                if took > GRACE + Duration::from_secs(1) {
                    outcome.slow_exits += 1;
                    outcome
                        .problems
                        .push(format!("{} took {took:?} to stop after SIGTERM", self.name));
                }
                if !status.success() {
                    outcome.problems.push(format!(
                        "{} ended with {status} after SIGTERM: {}",
                        self.name,
                        self.tail(3)
                    ));
                }
            }
            None => outcome
                .problems
                .push(format!("{} did not stop after SIGTERM", self.name)),
        }
    }

    /// The last `count` lines of the log, joined.
    fn tail(&self, count: usize) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let start = lines.len().saturating_sub(count);
        lines[start..].join(" | ")
    }

    /// Names this life logged as acked.
    fn acked(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|line| {
                line.split("Done. Acked PubSubMessage(instance_name='")
                    .nth(1)
            })
            .filter_map(|rest| rest.split('\'').next())
            .map(str::to_owned)
            .collect()
    }

    /// The first line with panic text, if any.
    fn panic_line(&self) -> Option<String> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|line| line.contains("panicked at") || line.contains("RUST_BACKTRACE"))
            .cloned()
    }
}

/// The unique instance name of the `n`th message of a run.
fn message_name(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut name = String::from("cattle-");
    let mut rest = n;
    let mut chars = [b'a'; 4];
    for slot in chars.iter_mut().rev() {
        *slot = ALPHABET[rest % 36];
        rest /= 36;
    }
    name.push_str(std::str::from_utf8(&chars).unwrap_or("aaaa"));
    name
}

/// Publishes `names` through the library (one batch, then every confirm awaited).
fn publish(server: &Server, names: &[String], rng: &mut fastrand::Rng) -> Result<(), String> {
    let batch: Vec<PubSubMessage> = names
        .iter()
        .map(|name| PubSubMessage::new(name.clone()).with_id(mayhem::Uuid::from_u128(rng.u128(..))))
        .collect();
    if batch.len() != names.len() {
        return Err("an instance name of the harness is invalid".to_owned());
    }
    let source = AmqpSource::connect(AmqpConfig {
        url: server.url(),
        queue: QUEUE.to_owned(),
        max_attempts: MAX_ATTEMPTS,
        reconnect_limit: Duration::from_secs(30),
        publish_connections: 1,
        ..AmqpConfig::default()
    })
    .map_err(|e| format!("connect the publisher: {e}"))?;
    source
        .publish(&batch)
        .map_err(|e| format!("publish: {e}"))?;
    match source.wait_confirmed(PATIENCE) {
        0 => Ok(()),
        left => Err(format!(
            "{left} of {} published messages unconfirmed",
            batch.len()
        )),
    }
}

/// Starts an instance and waits until it consumes; a failure is a problem of the run.
fn start(
    binary: &str,
    server: &Server,
    name: &str,
    seed: u64,
    live: &mut Vec<Instance>,
    outcome: &mut Outcome,
) {
    match Instance::start(binary, server, name, seed) {
        Ok(mut instance) => {
            if let Err(error) = instance.wait_started() {
                outcome.problems.push(error);
            }
            live.push(instance);
        }
        Err(error) => outcome.problems.push(error),
    }
}

/// Runs one scenario from `seed` with `waves` waves of messages.
pub fn run(binary: &str, seed: u64, waves: usize) -> Outcome {
    let mut rng = fastrand::Rng::with_seed(seed);
    // The kind of each fault comes from a generator of its own, one draw per wave: the
    // sequence of faults of a seed does not depend on the sizes of the waves or on the other
    // draws (the fixed seeds of `tests/amqp.rs` are chosen for their faults).
    let mut kinds = fastrand::Rng::with_seed(seed ^ 0x5EED_FA17);
    let mut outcome = Outcome::default();
    let mut server = match Server::start(seed) {
        Ok(server) => server,
        Err(error) => {
            outcome.problems.push(error);
            return outcome;
        }
    };
    outcome.adopted = seed.is_multiple_of(3);
    if outcome.adopted {
        if let Err(error) = server.declare_classic() {
            outcome.problems.push(error);
            return outcome;
        }
    }
    let mut live: Vec<Instance> = Vec::new();
    let mut ended: Vec<Instance> = Vec::new();
    let count = rng.usize(2..=3);
    for i in 0..count {
        start(
            binary,
            &server,
            &format!("i{i}"),
            rng.u64(..),
            &mut live,
            &mut outcome,
        );
    }
    let mut next_name = count;
    let mut published: Vec<String> = Vec::new();
    let mut foreign = 0;
    for _ in 0..waves {
        let size = rng.usize(20..=80);
        let names: Vec<String> = (published.len()..published.len() + size)
            .map(message_name)
            .collect();
        if let Err(error) = publish(&server, &names, &mut rng) {
            outcome
                .problems
                .push(format!("wave publish failed: {error}"));
        }
        published.extend(names);
        // The fault comes while the wave is being handled, or just after.
        thread::sleep(Duration::from_millis(rng.u64(0..150)));
        let fault = match kinds.u32(0..7) {
            0 => "none",
            1 if !live.is_empty() => {
                let index = rng.usize(..live.len());
                let mut victim = live.swap_remove(index);
                victim.signal("KILL");
                if victim.wait(PATIENCE).is_none() {
                    outcome
                        .problems
                        .push(format!("{} did not die of SIGKILL", victim.name));
                }
                ended.push(victim);
                next_name += 1;
                let name = format!("i{next_name}");
                start(binary, &server, &name, rng.u64(..), &mut live, &mut outcome);
                "instance SIGKILLed and restarted"
            }
            2 if !live.is_empty() => {
                let index = rng.usize(..live.len());
                let mut victim = live.swap_remove(index);
                victim.terminate(&mut outcome);
                ended.push(victim);
                next_name += 1;
                let name = format!("i{next_name}");
                start(binary, &server, &name, rng.u64(..), &mut live, &mut outcome);
                "instance SIGTERMed and restarted"
            }
            3 => {
                server.signal("STOP");
                thread::sleep(Duration::from_millis(rng.u64(1000..=3000)));
                server.signal("CONT");
                "broker frozen (SIGSTOP, SIGCONT)"
            }
            4 => {
                let before: Vec<usize> = live
                    .iter()
                    .map(|i| i.count_lines("reconnected to amqp"))
                    .collect();
                if let Err(error) = server.stop() {
                    outcome.problems.push(error);
                }
                if let Err(error) = server.spawn() {
                    outcome.problems.push(error);
                    break;
                }
                // Every instance reconnects before the next fault: two restarts in a row,
                // each with the broker up for a moment, would otherwise add up to an outage
                // longer than the reconnect limit, which ends the instances by design.
                for (instance, before) in live.iter_mut().zip(before) {
                    if let Err(error) = instance.wait_reconnected(before) {
                        outcome.problems.push(error);
                    }
                }
                "broker stopped and started again"
            }
            5 => {
                let alarm = server.ctl(&["set_vm_memory_high_watermark", "0.00001"]);
                thread::sleep(Duration::from_millis(rng.u64(1000..=3000)));
                let clear = server.ctl(&["set_vm_memory_high_watermark", "0.4"]);
                for result in [alarm, clear] {
                    if let Err(error) = result {
                        outcome.problems.push(error);
                    }
                }
                "memory alarm"
            }
            _ => {
                let count = rng.usize(1..=5);
                match server.publish_foreign(foreign, count) {
                    Ok(()) => foreign += count,
                    Err(error) => outcome
                        .problems
                        .push(format!("foreign publish failed: {error}")),
                }
                "foreign messages"
            }
        };
        if fault != "none" {
            outcome.faults += 1;
            outcome.fault_names.push(fault);
        }
    }
    // Drain (two readings of nothing in a row: a quorum queue's counts follow its log a
    // moment behind), then stop every instance.
    let end = Instant::now() + DRAIN_PATIENCE;
    let mut last = None;
    let mut zeros = 0;
    while Instant::now() < end && zeros < 2 {
        last = server.counts();
        zeros = if last == Some((0, 0)) { zeros + 1 } else { 0 };
        thread::sleep(Duration::from_millis(300));
    }
    if zeros < 2 {
        outcome.problems.push(format!(
            "the queue never drained: ready and unacked {last:?}"
        ));
    }
    for mut instance in live.drain(..) {
        instance.terminate(&mut outcome);
        ended.push(instance);
    }
    match server.counts() {
        Some((0, 0)) => {}
        other => outcome.problems.push(format!(
            "left in the queue after every instance stopped: ready and unacked {other:?}"
        )),
    }
    for instance in &ended {
        if let Some(line) = instance.panic_line() {
            outcome
                .problems
                .push(format!("{} logged panic text: {line}", instance.name));
        }
    }
    // Check by message id (the instance name is unique per message).
    let dead_bodies = match server.take_dead_letters() {
        Ok(bodies) => bodies,
        Err(error) => {
            outcome
                .problems
                .push(format!("reading the dead letters failed: {error}"));
            Vec::new()
        }
    };
    let dead: HashSet<String> = dead_bodies
        .iter()
        .map(|body| String::from_utf8_lossy(body).into_owned())
        .collect();
    let dead_foreign: HashSet<String> = dead
        .iter()
        .filter_map(|body| body.split("foreign-").nth(1).map(str::to_owned))
        .collect();
    outcome.foreign = foreign;
    let missing_foreign = (0..foreign)
        .filter(|n| !dead_foreign.contains(&n.to_string()))
        .count();
    if missing_foreign > 0 {
        outcome.problems.push(format!(
            "{missing_foreign} of {foreign} foreign messages not in {DEAD}"
        ));
    }
    let mut acked: HashMap<String, usize> = HashMap::new();
    for instance in &ended {
        for name in instance.acked() {
            *acked.entry(name).or_insert(0) += 1;
        }
    }
    outcome.published = published.len();
    outcome.acked = published.iter().filter(|n| acked.contains_key(*n)).count();
    outcome.dead = published.iter().filter(|n| dead.contains(*n)).count();
    outcome.duplicates = published
        .iter()
        .filter(|n| acked.get(*n).is_some_and(|&times| times > 1))
        .count();
    let lost: Vec<&String> = published
        .iter()
        .filter(|n| !acked.contains_key(*n) && !dead.contains(*n))
        .collect();
    if !lost.is_empty() {
        outcome.problems.push(format!(
            "{} messages neither acked nor dead-lettered, like {} (faults: {})",
            lost.len(),
            lost[0],
            outcome.fault_names.join(", ")
        ));
    }
    if !outcome.problems.is_empty() {
        match keep_logs(seed, &server, &ended) {
            Ok(dir) => outcome
                .problems
                .push(format!("the logs of this run are in {}", dir.display())),
            Err(error) => outcome
                .problems
                .push(format!("the logs of this run could not be kept: {error}")),
        }
    }
    drop(server);
    outcome
}

/// Copies the log of every instance life and of every server start to a directory of its
/// own (the server's directory goes with the server); returns the directory.
fn keep_logs(seed: u64, server: &Server, ended: &[Instance]) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!(
        "mayhem-amqp-soak-{}-{seed}-logs",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    for (life, instance) in ended.iter().enumerate() {
        let lines = instance.lines.lock().unwrap_or_else(|e| e.into_inner());
        let file = dir.join(format!("{life:02}-{}.log", instance.name));
        std::fs::write(&file, lines.join("\n") + "\n")
            .map_err(|e| format!("write {}: {e}", file.display()))?;
    }
    for start in 0..server.starts {
        let name = format!("server-{start}.log");
        let _ = std::fs::copy(server.dir.join(&name), dir.join(&name));
    }
    Ok(dir)
}
