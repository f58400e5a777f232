//! Randomized fault runs of the `mayhem` binary on Redis, checked by message id.
//!
//! One run, from a seed: a `redis-server` of its own (with an append-only file or not), two
//! or three instances sharing a group, waves of messages published by the harness (each with
//! a unique instance name), and between waves one fault: an instance SIGKILLed and restarted
//! (under the same name or a new one), an instance stopped with SIGTERM and restarted, Redis
//! stopped with SIGSTOP and continued, Redis killed and restarted (with its append-only file,
//! or without one: then the messages published before the restart are gone with the data and
//! are not counted), the group destroyed, or foreign entries added to the stream. Then the group drains,
//! every instance gets SIGTERM, and the run is checked:
//! - every published message was acked at least once (a `Done. Acked` line) or dead-lettered;
//! - no message was acked twice by one instance while Redis was healthy during its life;
//! - nothing is pending and nothing undelivered at the end;
//! - every SIGTERM ended its instance within the grace period plus one second.
//!
//! Used by `examples/redis_soak.rs` (`make soak`) and, with fixed seeds, by `tests/redis.rs`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use redis::Value;

// Also loaded by `common` in the test binaries that load both (see `port.rs`).
#[allow(clippy::duplicate_mod)]
#[path = "../common/port.rs"]
mod port;

/// The grace period of every instance.
const GRACE: Duration = Duration::from_secs(1);
/// How long the group may take to drain at the end of a run.
const DRAIN_PATIENCE: Duration = Duration::from_secs(40);

/// What one run saw.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Messages the harness published.
    pub published: usize,
    /// Distinct messages acked by some instance.
    pub acked: usize,
    /// Distinct messages dead-lettered.
    pub dead: usize,
    /// Faults injected.
    pub faults: usize,
    /// Messages acked twice by one instance while Redis was healthy.
    pub duplicates: usize,
    /// SIGTERMs whose instance took longer than the grace period plus one second.
    pub slow_exits: usize,
    /// What went wrong, one line each.
    pub problems: Vec<String>,
}

/// A `redis-server` on a loopback port.
struct Server {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    aof: bool,
}

impl Server {
    fn start(aof: bool, tag: u64) -> Result<Server, String> {
        let dir =
            std::env::temp_dir().join(format!("mayhem-redis-soak-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir: {e}"))?;
        let port = port::free_port()?;
        let mut server = Server {
            child: None,
            port,
            dir,
            aof,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.aof {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        let child = command
            .spawn()
            .map_err(|e| format!("start redis-server: {e}"))?;
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(20);
        while self.cmd(&["PING"]).is_none() {
            if Instant::now() > end {
                return Err("redis-server did not answer".to_owned());
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn cmd(&self, args: &[&str]) -> Option<Value> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut con = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .ok()?;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut con).ok()
    }

    fn signal(&self, name: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{name}"), &child.id().to_string()])
                .status();
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Pending and undelivered entries of the group, when it exists.
    fn group(&self) -> Option<(i64, i64)> {
        let Value::Array(groups) = self.cmd(&["XINFO", "GROUPS", "mayhem"])? else {
            return None;
        };
        for group in groups {
            let Value::Array(pairs) = group else { continue };
            let fields: HashMap<String, Value> = pairs
                .chunks(2)
                .filter_map(|pair| {
                    Some((
                        redis::from_redis_value_ref(pair.first()?).ok()?,
                        pair.get(1)?.clone(),
                    ))
                })
                .collect();
            let name: String = redis::from_redis_value_ref(fields.get("name")?).ok()?;
            if name != "mayhem" {
                continue;
            }
            let number = |key: &str| match fields.get(key) {
                Some(Value::Int(n)) => *n,
                _ => -1,
            };
            return Some((number("pending"), number("lag")));
        }
        None
    }

    /// Instance names of the dead-letter stream's entries.
    fn dead_names(&self) -> Vec<String> {
        let Some(Value::Array(entries)) = self.cmd(&["XRANGE", "mayhem:dead", "-", "+"]) else {
            return Vec::new();
        };
        entries
            .iter()
            .filter_map(|entry| {
                let Value::Array(parts) = entry else {
                    return None;
                };
                let fields: HashMap<String, String> =
                    redis::from_redis_value_ref(parts.get(1)?).ok()?;
                fields.get("data").cloned()
            })
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.signal("CONT");
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One life of one instance.
struct Instance {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
    /// Whether Redis failed (stopped, restarted, lost the group) during this life.
    redis_fault: bool,
}

impl Instance {
    fn start(binary: &str, server: &Server, name: &str, seed: u64) -> Instance {
        let latency = format!("{}ms", seed % 15);
        let mut child = Command::new(binary)
            .args(["--source", &server.url(), "--consumer-name", name])
            .args(["--publishers", "0", "--consumers", "2", "--workers", "2"])
            .args(["--handler-latency", &latency, "--seed", &seed.to_string()])
            .args([
                "--restart-failure-rate",
                "0.05",
                "--save-failure-rate",
                "0.05",
            ])
            .args(["--max-attempts", "5", "--ack-deadline", "1s"])
            .args(["--extend-interval", "300ms", "--consumer-ttl", "1s"])
            .args(["--grace-period", "1s", "--reconnect-limit", "30s"])
            .args(["--trim-interval", "200ms", "--log-level", "info"])
            .args(["--report", "json", "--stats-interval", "0"])
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
            redis_fault: false,
        }
    }

    fn has_line(&self, pattern: &str) -> bool {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|l| l.contains(pattern))
    }

    fn signal(&self, name: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status();
    }

    /// Waits for the exit, up to `limit`; returns how long it took, or `None` (the process is
    /// then killed).
    fn wait(&mut self, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return Some(started.elapsed());
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
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

/// Runs one scenario from `seed` with `waves` waves of messages.
pub fn run(binary: &str, seed: u64, waves: usize) -> Outcome {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut outcome = Outcome::default();
    let aof = rng.bool();
    let mut server = match Server::start(aof, seed) {
        Ok(server) => server,
        Err(error) => {
            outcome.problems.push(error);
            return outcome;
        }
    };
    let count = rng.usize(2..=3);
    let mut next_name = count;
    let mut live: Vec<Instance> = (0..count)
        .map(|i| Instance::start(binary, &server, &format!("i{i}"), rng.u64(..)))
        .collect();
    let mut ended: Vec<Instance> = Vec::new();
    let wait_started = |instance: &Instance| {
        let end = Instant::now() + Duration::from_secs(20);
        while !instance.has_line("Starting consumer") && Instant::now() < end {
            thread::sleep(Duration::from_millis(10));
        }
    };
    live.iter().for_each(wait_started);
    let mut published = Vec::new();
    // Messages before this index were lost with a Redis restarted without persistence.
    let mut exempt = 0;
    for _ in 0..waves {
        let size = rng.usize(20..=80);
        let names: Vec<String> = (published.len()..published.len() + size)
            .map(message_name)
            .collect();
        let mut pipe = redis::pipe();
        for name in &names {
            let id = mayhem::Uuid::from_u128(rng.u128(..)).to_string();
            pipe.cmd("XADD")
                .arg("mayhem")
                .arg("*")
                .arg("data")
                .arg(name)
                .arg("message_id")
                .arg(id)
                .ignore();
        }
        let sent = redis::Client::open(server.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .and_then(|mut con| pipe.query::<()>(&mut con));
        if let Err(error) = sent {
            outcome.problems.push(format!("publish failed: {error}"));
        }
        published.extend(names);
        thread::sleep(Duration::from_millis(rng.u64(20..200)));
        outcome.faults += 1;
        match rng.u32(0..7) {
            0 => outcome.faults -= 1,
            1 | 2 => {
                // An instance killed, restarted under the same name or a new one.
                let index = rng.usize(..live.len());
                let mut victim = live.swap_remove(index);
                let sigkill = rng.bool();
                victim.signal(if sigkill { "KILL" } else { "TERM" });
                match victim.wait(Duration::from_secs(20)) {
                    Some(took) if !sigkill && took > GRACE + Duration::from_secs(1) => {
                        outcome.slow_exits += 1;
                        outcome
                            .problems
                            .push(format!("{} took {took:?} to stop", victim.name));
                    }
                    None => outcome
                        .problems
                        .push(format!("{} did not stop", victim.name)),
                    _ => {}
                }
                let name = if rng.bool() {
                    victim.name.clone()
                } else {
                    next_name += 1;
                    format!("i{next_name}")
                };
                ended.push(victim);
                let fresh = Instance::start(binary, &server, &name, rng.u64(..));
                wait_started(&fresh);
                live.push(fresh);
            }
            3 => {
                server.signal("STOP");
                thread::sleep(Duration::from_millis(rng.u64(200..1500)));
                server.signal("CONT");
                live.iter_mut().for_each(|i| i.redis_fault = true);
            }
            4 => {
                server.cmd(&["XGROUP", "DESTROY", "mayhem", "mayhem"]);
                live.iter_mut().for_each(|i| i.redis_fault = true);
            }
            5 => {
                for _ in 0..3 {
                    server.cmd(&["XADD", "mayhem", "*", "foreign", "entry"]);
                }
            }
            _ => {
                // Redis killed and restarted. Without an append-only file it restarts empty:
                // what was published before is gone with it, so only later messages count.
                server.kill();
                if let Err(error) = server.spawn() {
                    outcome.problems.push(error);
                    break;
                }
                if !aof {
                    exempt = published.len();
                }
                live.iter_mut().for_each(|i| i.redis_fault = true);
            }
        }
    }
    // Drain, then stop every instance.
    let end = Instant::now() + DRAIN_PATIENCE;
    let mut drained = false;
    while Instant::now() < end {
        if matches!(server.group(), Some((0, 0))) {
            drained = true;
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    if !drained {
        outcome
            .problems
            .push(format!("the group never drained: {:?}", server.group()));
    }
    for instance in &live {
        instance.signal("TERM");
    }
    for mut instance in live.drain(..) {
        match instance.wait(Duration::from_secs(20)) {
            Some(took) if took > GRACE + Duration::from_secs(1) => {
                outcome.slow_exits += 1;
                outcome
                    .problems
                    .push(format!("{} took {took:?} to stop", instance.name));
            }
            None => outcome
                .problems
                .push(format!("{} did not stop", instance.name)),
            _ => {}
        }
        ended.push(instance);
    }
    match server.group() {
        Some((0, 0)) => {}
        other => outcome
            .problems
            .push(format!("left pending or undelivered at the end: {other:?}")),
    }
    // Check by message id.
    let dead: Vec<String> = server.dead_names();
    let mut acked: HashMap<String, usize> = HashMap::new();
    for instance in &ended {
        let mut mine: HashMap<String, usize> = HashMap::new();
        for name in instance.acked() {
            *mine.entry(name.clone()).or_insert(0) += 1;
            *acked.entry(name).or_insert(0) += 1;
        }
        if !instance.redis_fault {
            let twice = mine.values().filter(|&&n| n > 1).count();
            if twice > 0 {
                outcome.duplicates += twice;
                outcome.problems.push(format!(
                    "{} acked {twice} messages twice while redis was healthy",
                    instance.name
                ));
            }
        }
    }
    let published = &published[exempt..];
    outcome.published = published.len();
    outcome.acked = published.iter().filter(|n| acked.contains_key(*n)).count();
    outcome.dead = published.iter().filter(|n| dead.contains(n)).count();
    let lost: Vec<&String> = published
        .iter()
        .filter(|n| !acked.contains_key(*n) && !dead.contains(n))
        .collect();
    if !lost.is_empty() {
        outcome.problems.push(format!(
            "{} messages neither acked nor dead-lettered, like {}",
            lost.len(),
            lost[0]
        ));
    }
    outcome
}
