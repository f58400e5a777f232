//! Randomized fault runs of the `mayhem` binary on the Google Cloud Pub/Sub emulator,
//! checked by message id.
//!
//! One run, from a seed, on an emulator the caller started (a run uses a subscription, a
//! topic and a dead-letter topic of its own, so runs may follow each other on one emulator;
//! they must not share it at the same time, as a run freezes it): two or three instances on
//! one subscription (no publishers of their own, a handler latency and a failure rate drawn
//! from the seed), waves of messages published by the harness through the library
//! (`PubSubSource::publish`, each message with a unique host name as its data), and between
//! waves one fault: an instance SIGKILLed and restarted, an instance stopped with SIGTERM and
//! restarted, or the emulator frozen with SIGSTOP for 1 to 3 s and continued. Then the run
//! waits until every message was acked or dead-lettered, the ack deadline passed since the
//! last SIGKILL, and no instance has started a handler for a second; every instance gets
//! SIGTERM, and the run is checked:
//! - every published message was acked at least once (a `Done. Acked` line) or dead-lettered
//!   (its data is in the dead-letter topic `<subscription>-dead`, which a subscription of the
//!   harness watches from the start);
//! - no message was acked twice by one instance while the emulator was healthy during its
//!   life (its leases are extended: only a freeze can let one expire);
//! - nothing is left: a pull of the harness after the instances stopped gets nothing;
//! - every SIGTERM ended its instance within the grace period plus one second, with status 0;
//! - no log has panic text.
//!
//! Messages acked more than once are allowed (delivery is at least once) and counted. On
//! Pub/Sub `Done. Acked` is logged when the ack is queued for the source's worker thread,
//! before the emulator answered it: an instance SIGKILLed in between logged an ack the
//! emulator never got, and the message comes again once its ack deadline passed (hence the
//! wait after a SIGKILL, and the duplicates, and messages both acked and dead-lettered).
//!
//! The emulator is never restarted: it keeps everything in memory, so a restart would lose
//! every message and subscription, which is no fault of the service (the source's creating
//! a lost subscription again is tested in `tests/pubsub.rs`).
//!
//! Used by `examples/pubsub_soak.rs` (`make soak`) and, with fixed seeds, by
//! `tests/pubsub.rs`. Both include [`crate::common::pubsub`] for the emulator.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mayhem::{PubSubConfig, PubSubMessage, PubSubSource, Publish, Source};

use crate::common::pubsub::Emulator;

/// The project of every run.
const PROJECT: &str = "mayhem-soak";
/// The grace period of every instance.
const GRACE: Duration = Duration::from_secs(1);
/// The ack deadline of the subscription: Pub/Sub's shortest.
const DEADLINE: Duration = Duration::from_secs(10);
/// How often the instances extend the leases they hold.
const EXTEND: &str = "3s";
/// Deliveries of one message before an instance dead-letters it.
const MAX_ATTEMPTS: u32 = 5;
/// How long the messages may take to be settled at the end of a run (a message held by a
/// SIGKILLed instance comes back only after its ack deadline).
const DRAIN_PATIENCE: Duration = Duration::from_secs(90);
/// How long no instance may start a handler before the run ends it.
const QUIET: Duration = Duration::from_secs(1);
/// Upper bound for anything else the harness waits for; only reached when something is broken.
const PATIENCE: Duration = Duration::from_secs(60);

/// What one run saw.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Messages the harness published.
    pub published: usize,
    /// Distinct published messages acked by some instance.
    pub acked: usize,
    /// Distinct published messages found in the dead-letter topic.
    pub dead: usize,
    /// Published messages neither acked nor dead-lettered.
    pub lost: usize,
    /// Faults injected.
    pub faults: usize,
    /// The faults, in order.
    pub fault_names: Vec<&'static str>,
    /// Published messages acked more than once (allowed: delivery is at least once).
    pub duplicates: usize,
    /// Published messages both acked and dead-lettered (delivered twice, at least once:
    /// allowed, and counted).
    pub acked_and_dead: usize,
    /// Messages acked twice by one instance while the emulator was healthy during its life.
    pub healthy_duplicates: usize,
    /// SIGTERMs whose instance took longer than the grace period plus one second.
    pub slow_exits: usize,
    /// What went wrong, one line each.
    pub problems: Vec<String>,
}

/// One life of one instance.
struct Instance {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
    /// Whether the emulator was frozen during this life.
    frozen: bool,
}

impl Instance {
    fn start(
        binary: &str,
        emulator: &Emulator,
        subscription: &str,
        name: &str,
        seed: u64,
    ) -> Instance {
        let mut rng = fastrand::Rng::with_seed(seed);
        let latency = format!("{}ms", rng.u64(0..15));
        // Per step (a restart, tried again three times, and a save): from none to one save
        // in two failing, so that some messages fail all their attempts and are
        // dead-lettered.
        let rate = [0.0, 0.05, 0.25, 0.5][rng.usize(0..4)].to_string();
        let mut child = Command::new(binary)
            .args(["--source", &format!("pubsub://{PROJECT}/{subscription}")])
            .args(["--publishers", "0", "--consumers", "2", "--workers", "2"])
            .args([
                "--handler-latency",
                &latency,
                "--seed",
                &rng.u64(..).to_string(),
            ])
            .args([
                "--restart-failure-rate",
                &rate,
                "--save-failure-rate",
                &rate,
            ])
            .args(["--max-attempts", &MAX_ATTEMPTS.to_string()])
            .args(["--ack-deadline", &format!("{}s", DEADLINE.as_secs())])
            .args(["--extend-interval", EXTEND])
            .args(["--grace-period", &format!("{}s", GRACE.as_secs())])
            .args(["--reconnect-limit", "30s", "--log-level", "info"])
            .args(["--report", "json", "--stats-interval", "0"])
            .env("PUBSUB_EMULATOR_HOST", &emulator.host)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mayhem");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
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
        Instance {
            name: name.to_owned(),
            child,
            lines,
            readers,
            frozen: false,
        }
    }

    /// Lines of this life that contain `pattern`.
    fn count(&self, pattern: &str) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|l| l.contains(pattern))
            .count()
    }

    /// Waits until this life logged `Starting consumer` (or exited, or `PATIENCE` passed).
    fn wait_started(&mut self) -> Result<(), String> {
        let end = Instant::now() + PATIENCE;
        while self.count("Starting consumer") == 0 {
            if Instant::now() > end {
                return Err(format!("{} did not start a consumer", self.name));
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("{} exited at its start: {status}", self.name));
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

    /// Waits for the exit, up to `limit`; returns its status and how long it took, or `None`
    /// (the process is then killed).
    fn wait(&mut self, limit: Duration) -> Option<(ExitStatus, Duration)> {
        let started = Instant::now();
        let status = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break Some((status, started.elapsed()));
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
        status
    }

    /// SIGTERM, then the checks of a clean stop: within the grace period plus one second,
    /// with status 0.
    fn terminate(&mut self, outcome: &mut Outcome) {
        self.signal("TERM");
        self.check_stop(outcome);
    }

    /// The checks of a clean stop after a SIGTERM already sent.
    fn check_stop(&mut self, outcome: &mut Outcome) {
        match self.wait(PATIENCE) {
            Some((status, took)) => {
                if took > GRACE + Duration::from_secs(1) {
                    outcome.slow_exits += 1;
                    outcome
                        .problems
                        .push(format!("{} took {took:?} to stop", self.name));
                }
                if !status.success() {
                    outcome
                        .problems
                        .push(format!("{} ended with {status} on SIGTERM", self.name));
                }
            }
            None => outcome
                .problems
                .push(format!("{} did not stop within {PATIENCE:?}", self.name)),
        }
    }

    /// Host names this life logged as acked.
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

    /// A line with panic text, if any.
    fn panic_line(&self) -> Option<String> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|line| line.contains("panicked"))
            .cloned()
    }
}

impl Drop for Instance {
    /// A run that ends early must not leave its instances running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The unique host name of the `n`th message of the run `tag`.
fn message_name(tag: u32, n: usize) -> String {
    format!("soak-{tag}-{n}")
}

/// Host names of the messages in `leases` (acked, so that the dead-letter watch gets each
/// once).
fn names_of(source: &PubSubSource, leases: Vec<mayhem::Lease>, into: &mut Vec<String>) {
    let ids: Vec<mayhem::LeaseId> = leases.iter().map(|lease| lease.id).collect();
    let _ = source.ack(&ids, &mut Vec::new());
    into.extend(
        leases
            .iter()
            .map(|lease| String::from_utf8_lossy(lease.message.data()).into_owned()),
    );
}

/// Sets the emulator running again if a run ends while it is frozen.
struct Thaw<'e>(&'e Emulator);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        self.0.signal("CONT");
    }
}

/// Runs one scenario from `seed` with `waves` waves of messages, on `emulator` (which no
/// other run may use meanwhile).
pub fn run(binary: &str, emulator: &Emulator, seed: u64, waves: usize) -> Outcome {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    let tag = RUNS.fetch_add(1, Ordering::SeqCst);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut outcome = Outcome::default();
    let _thaw = Thaw(emulator);
    if !emulator.answers() {
        outcome
            .problems
            .push("the emulator does not answer at the start".to_owned());
        return outcome;
    }
    let subscription = format!("soak-{}-{tag}", std::process::id());
    let config = |url: String| PubSubConfig {
        url,
        emulator_host: Some(emulator.host.clone()),
        ack_deadline: DEADLINE,
        max_attempts: MAX_ATTEMPTS,
        ..PubSubConfig::default()
    };
    // The harness's source creates the subscription (with the instances' deadline and
    // dead-letter policy), its topic and the dead-letter topic; the watch subscribes to the
    // dead-letter topic before anything is published (Pub/Sub keeps a message only for the
    // subscriptions its topic has when it is published).
    let connected = PubSubSource::connect(config(format!("pubsub://{PROJECT}/{subscription}")))
        .and_then(|source| {
            let watch = PubSubSource::connect(config(format!(
                "pubsub://{PROJECT}/watch-{subscription}?topic={subscription}-dead"
            )))?;
            Ok((source, watch))
        });
    let (source, watch) = match connected {
        Ok(pair) => pair,
        Err(error) => {
            outcome.problems.push(format!("connect: {error}"));
            return outcome;
        }
    };
    let count = rng.usize(2..=3);
    let mut live: Vec<Instance> = (0..count)
        .map(|i| {
            Instance::start(
                binary,
                emulator,
                &subscription,
                &format!("i{i}"),
                rng.u64(..),
            )
        })
        .collect();
    let mut ended: Vec<Instance> = Vec::new();
    for instance in &mut live {
        if let Err(problem) = instance.wait_started() {
            outcome.problems.push(problem);
        }
    }
    let mut published: Vec<String> = Vec::new();
    let mut dead: Vec<String> = Vec::new();
    let mut next_name = count;
    // When the leases of the last SIGKILLed instance have all expired: its messages (those
    // whose ack it logged but had not sent too) are delivered again by then.
    let mut expired = Instant::now();
    for _ in 0..waves {
        let size = rng.usize(20..=80);
        let names: Vec<String> = (published.len()..published.len() + size)
            .map(|n| message_name(tag, n))
            .collect();
        let batch: Vec<PubSubMessage> = names
            .iter()
            .map(|name| PubSubMessage::new(name.clone().into_bytes()))
            .collect();
        match source.publish(&batch) {
            Ok(()) => published.extend(names),
            Err(error) => outcome.problems.push(format!("publish failed: {error}")),
        }
        thread::sleep(Duration::from_millis(rng.u64(20..300)));
        match rng.u32(0..5) {
            0 => {}
            1 | 2 => {
                // An instance killed, and a new one started in its place.
                let sigkill = rng.bool();
                outcome
                    .fault_names
                    .push(if sigkill { "sigkill" } else { "sigterm" });
                let index = rng.usize(..live.len());
                let mut victim = live.swap_remove(index);
                if sigkill {
                    victim.signal("KILL");
                    expired = Instant::now() + DEADLINE + Duration::from_secs(1);
                    if victim.wait(PATIENCE).is_none() {
                        outcome
                            .problems
                            .push(format!("{} did not die of SIGKILL", victim.name));
                    }
                } else {
                    victim.terminate(&mut outcome);
                }
                ended.push(victim);
                next_name += 1;
                let mut fresh = Instance::start(
                    binary,
                    emulator,
                    &subscription,
                    &format!("i{next_name}"),
                    rng.u64(..),
                );
                if let Err(problem) = fresh.wait_started() {
                    outcome.problems.push(problem);
                }
                live.push(fresh);
            }
            _ => {
                outcome.fault_names.push("freeze");
                emulator.signal("STOP");
                thread::sleep(Duration::from_millis(rng.u64(1000..3000)));
                emulator.signal("CONT");
                live.iter_mut().for_each(|i| i.frozen = true);
            }
        }
    }
    outcome.faults = outcome.fault_names.len();
    // Wait until every message is acked or dead-lettered, the leases of the SIGKILLed
    // instances expired, and no handler started for a while (a message delivered again is
    // handled once more after it was acked).
    let published_set: HashSet<&String> = published.iter().collect();
    let end = Instant::now() + DRAIN_PATIENCE;
    let mut handled = usize::MAX;
    let mut quiet_since = Instant::now();
    let settled = loop {
        let mut leases = Vec::new();
        if let Err(error) = watch.pull(1000, Duration::from_millis(200), &mut leases) {
            outcome.problems.push(format!("dead-letter pull: {error}"));
            break false;
        }
        names_of(&watch, leases, &mut dead);
        let mut covered: HashSet<String> = dead.iter().cloned().collect();
        for instance in live.iter().chain(&ended) {
            covered.extend(instance.acked());
        }
        let now_handled: usize = live.iter().map(|i| i.count("Handling ")).sum();
        if now_handled != handled {
            handled = now_handled;
            quiet_since = Instant::now();
        }
        if published_set.iter().all(|name| covered.contains(*name))
            && quiet_since.elapsed() >= QUIET
            && Instant::now() >= expired
        {
            break true;
        }
        if Instant::now() > end {
            break false;
        }
        thread::sleep(Duration::from_millis(100));
    };
    if !settled && outcome.problems.is_empty() {
        outcome
            .problems
            .push(format!("not settled within {DRAIN_PATIENCE:?}"));
    }
    for instance in &live {
        instance.signal("TERM");
    }
    for mut instance in live.drain(..) {
        instance.check_stop(&mut outcome);
        ended.push(instance);
    }
    // Nothing may be left: the instances nacked what they held on SIGTERM, so a message
    // still in the subscription comes at once.
    let mut left = Vec::new();
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        match source.pull(1000, Duration::from_millis(500), &mut left) {
            Ok(_) => {}
            Err(error) => {
                outcome.problems.push(format!("final pull: {error}"));
                break;
            }
        }
    }
    if !left.is_empty() {
        let mut names = Vec::new();
        names_of(&source, left, &mut names);
        outcome.problems.push(format!(
            "{} messages left in the subscription at the end, like {}",
            names.len(),
            names[0]
        ));
    }
    let mut leases = Vec::new();
    let _ = watch.pull(1000, Duration::from_millis(500), &mut leases);
    names_of(&watch, leases, &mut dead);
    // Check by host name.
    let dead: HashSet<String> = dead.into_iter().collect();
    let mut acked: HashMap<String, usize> = HashMap::new();
    for instance in &ended {
        let mut mine: HashMap<String, usize> = HashMap::new();
        for name in instance.acked() {
            *mine.entry(name.clone()).or_insert(0) += 1;
            *acked.entry(name).or_insert(0) += 1;
        }
        if !instance.frozen {
            let twice = mine.values().filter(|&&n| n > 1).count();
            if twice > 0 {
                outcome.healthy_duplicates += twice;
                outcome.problems.push(format!(
                    "{} acked {twice} messages twice while the emulator was healthy",
                    instance.name
                ));
            }
        }
        if let Some(line) = instance.panic_line() {
            outcome
                .problems
                .push(format!("{} logged panic text: {line}", instance.name));
        }
    }
    outcome.published = published.len();
    outcome.acked = published.iter().filter(|n| acked.contains_key(*n)).count();
    outcome.dead = published.iter().filter(|n| dead.contains(*n)).count();
    outcome.duplicates = published
        .iter()
        .filter(|n| acked.get(*n).is_some_and(|&times| times > 1))
        .count();
    outcome.acked_and_dead = published
        .iter()
        .filter(|n| acked.contains_key(*n) && dead.contains(*n))
        .count();
    if let Ok(dir) = std::env::var("MAYHEM_SOAK_LOGS") {
        // Every life's stderr, for a look at a run: `MAYHEM_SOAK_LOGS=DIR`.
        let _ = std::fs::create_dir_all(&dir);
        for (k, instance) in ended.iter().enumerate() {
            let lines = instance.lines.lock().unwrap_or_else(|e| e.into_inner());
            let path = format!("{dir}/{subscription}-{k}-{}.log", instance.name);
            let _ = std::fs::write(path, lines.join("\n") + "\n");
        }
        let _ = std::fs::write(
            format!("{dir}/{subscription}-dead.txt"),
            dead.iter().cloned().collect::<Vec<_>>().join("\n") + "\n",
        );
    }
    let lost: Vec<&String> = published
        .iter()
        .filter(|n| !acked.contains_key(*n) && !dead.contains(*n))
        .collect();
    outcome.lost = lost.len();
    if !lost.is_empty() {
        outcome.problems.push(format!(
            "{} messages neither acked nor dead-lettered, like {}",
            lost.len(),
            lost[0]
        ));
    }
    outcome
}
