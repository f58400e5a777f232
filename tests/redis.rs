//! The Redis Streams source against a real `redis-server` this file starts on a free
//! loopback port: lease semantics through `RedisSource`, and the `mayhem` binary end to end
//! (two instances sharing a group, a killed instance, SIGTERM, a Redis restart, dead letters).
//!
//! Every test skips (with a line on stderr) only when `redis-server` is not installed.
#![cfg(feature = "redis")]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mayhem::{LeaseError, PubSubMessage, RedisConfig, RedisSource, Source, SourceError};
use redis::Value;

/// Upper bound for anything a test waits for; only reached when something is broken.
const PATIENCE: Duration = Duration::from_secs(20);

/// A `redis-server` on a free loopback port, killed (and its directory removed) on drop.
struct Server {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    persistent: bool,
}

impl Server {
    /// Starts a server, or returns `None` (saying so) when `redis-server` is not installed.
    /// `persistent` servers write an append-only file synced on every write, so they keep
    /// their data across a `restart`.
    fn start(persistent: bool) -> Option<Server> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            eprintln!("skipping: redis-server not found");
            return None;
        }
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mayhem-redis-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("find a free port")
            .port();
        let mut server = Server {
            child: None,
            port,
            dir,
            persistent,
        };
        server.spawn(false);
        Some(server)
    }

    /// Starts `redis-server` on `self.port` and waits until it answers PING. Another test may
    /// have taken the same free port between our probe and the server's bind; then our server
    /// exits, and (unless this is a restart, which must keep its port) a new port is tried.
    fn spawn(&mut self, keep_port: bool) {
        for _ in 0..5 {
            let mut command = Command::new("redis-server");
            command
                .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
                .args(["--save", "", "--dir"])
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if self.persistent {
                command.args(["--appendonly", "yes", "--appendfsync", "always"]);
            } else {
                command.args(["--appendonly", "no"]);
            }
            let mut child = command.spawn().expect("start redis-server");
            let end = Instant::now() + PATIENCE;
            let answered = loop {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break false;
                }
                // PING, not just a connect: the port may belong to another test's server for a
                // moment, and a persistent server accepts connections before it loaded its data.
                let pong = redis::Client::open(self.url())
                    .and_then(|client| {
                        client.get_connection_with_timeout(Duration::from_millis(500))
                    })
                    .and_then(|mut con| redis::cmd("PING").query::<String>(&mut con));
                if pong.is_ok() && matches!(child.try_wait(), Ok(None)) {
                    break true;
                }
                assert!(Instant::now() < end, "redis-server did not start");
                thread::sleep(Duration::from_millis(10));
            };
            if answered {
                self.child = Some(child);
                return;
            }
            let _ = child.wait();
            if keep_port {
                // A restart keeps its port (the service's URL names it); try it again.
                thread::sleep(Duration::from_millis(50));
                continue;
            }
            self.port = TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .expect("find a free port")
                .port();
        }
        panic!("could not start redis-server on a free port");
    }

    /// Kills the server hard (SIGKILL).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("connect to the test server")
    }

    /// Adds `count` messages named `cattle-0000`, `cattle-0001`, ... to `stream`.
    fn publish(&self, stream: &str, count: usize) -> Vec<String> {
        let mut con = self.connection();
        let names: Vec<String> = (0..count).map(|i| format!("cattle-{i:04}")).collect();
        let mut pipe = redis::pipe();
        for (i, name) in names.iter().enumerate() {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("message_id")
                .arg(mayhem::Uuid::from_u128(i as u128 + 1).to_string())
                .arg("instance_name")
                .arg(name)
                .ignore();
        }
        pipe.query::<()>(&mut con).expect("XADD");
        names
    }

    /// `XINFO GROUPS` of `stream` for `group`: (pending, lag, entries-read).
    fn group(&self, stream: &str, group: &str) -> Option<(i64, i64, i64)> {
        let reply: Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query(&mut self.connection())
            .ok()?;
        let Value::Array(groups) = reply else {
            return None;
        };
        for entry in groups {
            let Value::Array(pairs) = entry else { continue };
            let fields: HashMap<String, Value> = pairs
                .chunks(2)
                .filter_map(|pair| {
                    Some((
                        redis::from_redis_value(&pair[0]).ok()?,
                        pair.get(1)?.clone(),
                    ))
                })
                .collect();
            let name: String = redis::from_redis_value(fields.get("name")?).ok()?;
            if name != group {
                continue;
            }
            let number = |key: &str| match fields.get(key) {
                Some(Value::Int(n)) => *n,
                _ => -1,
            };
            return Some((number("pending"), number("lag"), number("entries-read")));
        }
        None
    }

    /// Pending entries of one consumer.
    fn pending_of(&self, stream: &str, group: &str, consumer: &str) -> usize {
        let reply: Vec<Value> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg("-")
            .arg("+")
            .arg(10_000)
            .arg(consumer)
            .query(&mut self.connection())
            .expect("XPENDING");
        reply.len()
    }

    /// Polls until the group has delivered and acked everything in `stream`.
    fn wait_until_drained(&self, stream: &str, group: &str) {
        let end = Instant::now() + PATIENCE;
        loop {
            if let Some((0, 0, read)) = self.group(stream, group) {
                if read > 0 {
                    return;
                }
            }
            assert!(
                Instant::now() < end,
                "group never drained: {:?}",
                self.group(stream, group)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The distinct instance names in `stream`, sorted.
    fn instance_names(&self, stream: &str) -> Vec<String> {
        let reply: Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query(&mut self.connection())
            .expect("XRANGE");
        let Value::Array(entries) = reply else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .iter()
            .filter_map(|entry| {
                let Value::Array(parts) = entry else {
                    return None;
                };
                let fields: HashMap<String, String> =
                    redis::from_redis_value(parts.get(1)?).ok()?;
                fields.get("instance_name").cloned()
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    fn xlen(&self, stream: &str) -> i64 {
        redis::cmd("XLEN")
            .arg(stream)
            .query(&mut self.connection())
            .expect("XLEN")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `mayhem` process; its stderr lines are collected as they come.
struct Service {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: JoinHandle<()>,
    stdout: JoinHandle<String>,
}

impl Service {
    fn start(server: &Server, args: &[&str]) -> Service {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mayhem"))
            .args(["--source", &server.url(), "--log-level", "info"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mayhem");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = {
            let pipe = child.stderr.take().expect("piped stderr");
            let lines = Arc::clone(&lines);
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            })
        };
        let mut pipe = child.stdout.take().expect("piped stdout");
        let stdout = thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        });
        Service {
            child,
            lines,
            stderr,
            stdout,
        }
    }

    /// Polls the stderr lines until one contains `pattern`.
    fn wait_for(&self, pattern: &str) {
        let end = Instant::now() + PATIENCE;
        while !self
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(pattern))
        {
            assert!(
                Instant::now() < end,
                "no line with {pattern:?} in:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the exit; returns the status, the stderr lines and stdout.
    fn finish(mut self) -> (ExitStatus, Vec<String>, String) {
        let end = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for mayhem") {
                break status;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "mayhem did not exit:\n{}",
                    self.lines.lock().unwrap().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        self.stderr.join().expect("stderr reader");
        let stdout = self.stdout.join().expect("stdout reader");
        let lines = self.lines.lock().unwrap().clone();
        (status, lines, stdout)
    }
}

/// Instance names of the messages a process logged as acked.
fn acked_names(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|line| {
            line.split("Done. Acked PubSubMessage(instance_name='")
                .nth(1)
        })
        .filter_map(|rest| rest.split('\'').next())
        .map(str::to_owned)
        .collect()
}

/// A numeric field of the one-line JSON report.
fn field(json: &str, name: &str) -> f64 {
    let key = format!("\"{name}\":");
    let start = json
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {json}"))
        + key.len();
    json[start..]
        .split([',', '}'])
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad {name} in {json}"))
}

/// Flags of a fast, failure-free handler run without own publishers.
const QUIET: [&str; 12] = [
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

fn source_config(server: &Server, stream: &str, ack_deadline: Duration) -> RedisConfig {
    RedisConfig {
        url: server.url(),
        stream: stream.to_owned(),
        group: "g".to_owned(),
        consumer: "c1".to_owned(),
        ack_deadline,
        max_attempts: 3,
        ..RedisConfig::default()
    }
}

fn pull_one(source: &RedisSource) -> mayhem::Lease {
    let end = Instant::now() + PATIENCE;
    let mut leases = Vec::new();
    while leases.is_empty() {
        assert!(Instant::now() < end, "nothing to pull");
        source
            .pull(1, Duration::from_millis(100), &mut leases)
            .expect("pull");
    }
    leases[0]
}

#[test]
fn ack_settles_and_a_second_ack_is_refused() {
    let Some(server) = Server::start(false) else {
        return;
    };
    let source =
        RedisSource::connect(source_config(&server, "s", Duration::from_secs(5))).expect("connect");
    let mut rng = fastrand::Rng::with_seed(1);
    let message = PubSubMessage::random(&mut rng);
    source.publish(message).expect("publish");
    let lease = pull_one(&source);
    assert_eq!(lease.message, message);
    assert_eq!(lease.attempt, 1);
    source.ack(lease.id).expect("ack");
    assert_eq!(source.ack(lease.id), Err(LeaseError::Expired));
    assert!(source.flush(PATIENCE));
    let stats = source.stats();
    assert_eq!((stats.acked, stats.stale_acks, stats.remaining), (1, 1, 0));
    assert_eq!(source.settled(), 1);
    assert_eq!(server.group("s", "g").map(|g| g.0), Some(0));
}

#[test]
fn nack_redelivers_with_the_next_attempt_then_dead_letters() {
    let Some(server) = Server::start(false) else {
        return;
    };
    let source =
        RedisSource::connect(source_config(&server, "s", Duration::from_secs(5))).expect("connect");
    let message = PubSubMessage::random(&mut fastrand::Rng::with_seed(2));
    source.publish(message).expect("publish");
    for attempt in 1..=3 {
        let lease = pull_one(&source);
        assert_eq!((lease.message, lease.attempt), (message, attempt));
        source.nack(lease.id).expect("nack");
        assert!(source.flush(PATIENCE));
    }
    // The third nack used up max_attempts = 3: the message is dead-lettered, not delivered.
    let mut leases = Vec::new();
    source
        .pull(1, Duration::from_millis(150), &mut leases)
        .expect("pull");
    assert!(leases.is_empty());
    let stats = source.stats();
    assert_eq!(
        (stats.nacked, stats.dead_lettered, stats.redelivered),
        (3, 1, 2)
    );
    assert_eq!(server.xlen("s:dead"), 1);
    assert_eq!(server.group("s", "g").map(|g| (g.0, g.1)), Some((0, 0)));
}

#[test]
fn extend_keeps_the_lease_and_expiry_redelivers() {
    let Some(server) = Server::start(false) else {
        return;
    };
    let deadline = Duration::from_millis(300);
    let source = RedisSource::connect(source_config(&server, "s", deadline)).expect("connect");
    let other = RedisSource::connect(RedisConfig {
        consumer: "c2".to_owned(),
        ..source_config(&server, "s", deadline)
    })
    .expect("connect");
    let message = PubSubMessage::random(&mut fastrand::Rng::with_seed(3));
    source.publish(message).expect("publish");
    let kept = pull_one(&source);
    // Extended past three deadlines: the other consumer cannot claim it.
    for _ in 0..6 {
        thread::sleep(deadline / 2);
        source.extend(kept.id, deadline).expect("extend");
        assert!(source.flush(PATIENCE));
        let mut leases = Vec::new();
        other.pull(1, Duration::ZERO, &mut leases).expect("pull");
        assert!(leases.is_empty(), "an extended lease was claimed");
    }
    // Not extended any more: after the deadline the other consumer claims it, attempt 2,
    // and the first holder's ack is refused.
    let claimed = pull_one(&other);
    assert_eq!((claimed.message, claimed.attempt), (message, 2));
    assert_eq!(source.ack(kept.id), Err(LeaseError::Expired));
    other.ack(claimed.id).expect("ack");
    assert!(other.flush(PATIENCE));
    assert_eq!(other.stats().acked, 1);
    assert_eq!(source.stats().acked, 0);
    assert_eq!(server.group("s", "g").map(|g| g.0), Some(0));
}

#[test]
fn a_restarted_consumer_recovers_its_own_pending_entries() {
    let Some(server) = Server::start(false) else {
        return;
    };
    let config = source_config(&server, "s", Duration::from_secs(60));
    let message = PubSubMessage::random(&mut fastrand::Rng::with_seed(4));
    {
        let first = RedisSource::connect(config.clone()).expect("connect");
        first.publish(message).expect("publish");
        pull_one(&first);
        // Dropped without ack: the entry stays pending for consumer c1.
    }
    let again = RedisSource::connect(config).expect("connect");
    let lease = pull_one(&again);
    assert_eq!((lease.message, lease.attempt), (message, 2));
    again.ack(lease.id).expect("ack");
    assert!(again.flush(PATIENCE));
    assert_eq!(server.group("s", "g").map(|g| g.0), Some(0));
}

#[test]
fn interrupt_closes_pull_and_publish_but_acks_still_work() {
    let Some(server) = Server::start(false) else {
        return;
    };
    let source =
        RedisSource::connect(source_config(&server, "s", Duration::from_secs(5))).expect("connect");
    source
        .publish(PubSubMessage::random(&mut fastrand::Rng::with_seed(5)))
        .expect("publish");
    let lease = pull_one(&source);
    source.interrupt();
    let mut leases = Vec::new();
    assert_eq!(
        source.pull(1, Duration::ZERO, &mut leases),
        Err(SourceError::Closed)
    );
    assert_eq!(
        source.publish(PubSubMessage::random(&mut fastrand::Rng::with_seed(6))),
        Err(SourceError::Closed)
    );
    source.ack(lease.id).expect("ack after interrupt");
    assert!(source.flush(PATIENCE));
    assert_eq!(source.stats().acked, 1);
}

#[test]
fn two_instances_share_the_work_and_ack_each_message_once() {
    let Some(server) = Server::start(false) else {
        return;
    };
    let flags = ["--handler-latency", "20ms", "--max-in-flight", "10"];
    let a = Service::start(
        &server,
        &[&QUIET[..], &flags[..], &["--consumer-name", "a"]].concat(),
    );
    let b = Service::start(
        &server,
        &[&QUIET[..], &flags[..], &["--consumer-name", "b"]].concat(),
    );
    a.wait_for("Starting consumer");
    b.wait_for("Starting consumer");
    let names = server.publish("mayhem", 300);
    server.wait_until_drained("mayhem", "mayhem");
    a.signal("TERM");
    b.signal("TERM");
    let (status_a, lines_a, report_a) = a.finish();
    let (status_b, lines_b, report_b) = b.finish();
    assert!(
        status_a.success() && status_b.success(),
        "{status_a} {status_b}"
    );
    let (acked_a, acked_b) = (acked_names(&lines_a), acked_names(&lines_b));
    assert!(
        !acked_a.is_empty() && !acked_b.is_empty(),
        "one instance got nothing"
    );
    let mut all = [acked_a, acked_b].concat();
    all.sort();
    assert_eq!(all, names, "each message acked exactly once");
    assert_eq!(field(&report_a, "acked") + field(&report_b, "acked"), 300.0);
    assert_eq!(
        field(&report_a, "stale_acks") + field(&report_b, "stale_acks"),
        0.0
    );
}

#[test]
fn a_killed_instance_s_messages_are_claimed_by_the_other() {
    let Some(server) = Server::start(false) else {
        return;
    };
    let flags = [
        "--handler-latency",
        "300ms",
        "--max-in-flight",
        "20",
        "--ack-deadline",
        "1s",
        "--extend-interval",
        "300ms",
    ];
    let victim = Service::start(
        &server,
        &[&QUIET[..], &flags[..], &["--consumer-name", "victim"]].concat(),
    );
    victim.wait_for("Starting consumer");
    let names = server.publish("mayhem", 60);
    let end = Instant::now() + PATIENCE;
    while server.pending_of("mayhem", "mayhem", "victim") < 5 {
        assert!(Instant::now() < end, "the victim never leased anything");
        thread::sleep(Duration::from_millis(5));
    }
    let survivor = Service::start(
        &server,
        &[&QUIET[..], &flags[..], &["--consumer-name", "survivor"]].concat(),
    );
    victim.signal("KILL");
    let (status, lines_victim, _) = victim.finish();
    assert!(!status.success());
    server.wait_until_drained("mayhem", "mayhem");
    survivor.signal("TERM");
    let (status, lines_survivor, report) = survivor.finish();
    assert!(status.success(), "{status}");
    assert!(
        field(&report, "redelivered") >= 1.0,
        "nothing was claimed: {report}"
    );
    let mut all = [acked_names(&lines_victim), acked_names(&lines_survivor)].concat();
    all.sort();
    all.dedup();
    assert_eq!(all, names, "a message was lost");
    assert_eq!(server.group("mayhem", "mayhem").map(|g| g.0), Some(0));
}

#[test]
fn sigterm_leaves_nothing_pending() {
    let Some(server) = Server::start(false) else {
        return;
    };
    let service = Service::start(
        &server,
        &[
            "--publish-interval",
            "0",
            "--handler-latency",
            "300ms",
            "--max-in-flight",
            "50",
            "--grace-period",
            "0",
            "--report",
            "json",
            "--seed",
            "9",
        ],
    );
    let end = Instant::now() + PATIENCE;
    while server.group("mayhem", "mayhem").map_or(0, |g| g.0) < 20 {
        assert!(Instant::now() < end, "nothing in flight");
        thread::sleep(Duration::from_millis(5));
    }
    service.signal("TERM");
    let (status, lines, report) = service.finish();
    assert!(status.success(), "{status}\n{}", lines.join("\n"));
    assert!(field(&report, "nacked") >= 1.0, "{report}");
    assert_eq!(server.group("mayhem", "mayhem").map(|g| g.0), Some(0));
}

#[test]
fn the_service_recovers_from_a_redis_restart() {
    let Some(mut server) = Server::start(true) else {
        return;
    };
    let service = Service::start(
        &server,
        &[
            "--messages",
            "200",
            "--publish-interval",
            "4ms",
            "--handler-latency",
            "10ms",
            "--restart-failure-rate",
            "0",
            "--save-failure-rate",
            "0",
            "--report",
            "json",
            "--seed",
            "11",
        ],
    );
    service.wait_for("Done. Acked");
    server.kill();
    service.wait_for("lost connection to redis");
    server.spawn(true);
    service.wait_for("reconnected to redis");
    let (status, lines, report) = service.finish();
    assert!(status.success(), "{status}\n{}", lines.join("\n"));
    assert!(report.contains("\"reason\":\"completed\""), "{report}");
    assert_eq!(field(&report, "published"), 200.0, "{report}");
    assert!(field(&report, "acked") >= 200.0, "{report}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("lost connection to redis"))
            .count(),
        1
    );
    // At least once: a delivery or publish whose reply the crash swallowed may leave an
    // entry pending (or a duplicate). Another instance claims it after the ack deadline;
    // then every message in the stream has been acked by one of the two.
    let sweeper = Service::start(
        &server,
        &[
            &QUIET[..],
            &["--ack-deadline", "1s", "--extend-interval", "300ms"],
        ]
        .concat(),
    );
    sweeper.wait_for("Starting consumer");
    server.wait_until_drained("mayhem", "mayhem");
    sweeper.signal("TERM");
    let (status, sweeper_lines, _) = sweeper.finish();
    assert!(status.success(), "{status}");
    let mut acked = [acked_names(&lines), acked_names(&sweeper_lines)].concat();
    acked.sort();
    acked.dedup();
    assert_eq!(acked, server.instance_names("mayhem"));
}

#[test]
fn dead_letters_go_to_the_dead_stream() {
    let Some(server) = Server::start(false) else {
        return;
    };
    let service = Service::start(
        &server,
        &[
            "--messages",
            "50",
            "--publish-interval",
            "0",
            "--handler-latency",
            "0",
            "--restart-failure-rate",
            "1",
            "--restart-retries",
            "0",
            "--max-attempts",
            "2",
            "--report",
            "json",
            "--seed",
            "13",
        ],
    );
    let (status, _, report) = service.finish();
    assert!(status.success(), "{status}");
    assert_eq!(field(&report, "dead_lettered"), 50.0, "{report}");
    assert_eq!(field(&report, "acked"), 0.0, "{report}");
    assert_eq!(server.xlen("mayhem:dead"), 50);
    assert_eq!(
        server.group("mayhem", "mayhem").map(|g| (g.0, g.1)),
        Some((0, 0))
    );
}

#[test]
fn a_server_gone_for_good_ends_the_service_with_exit_1() {
    let Some(mut server) = Server::start(false) else {
        return;
    };
    let service = Service::start(&server, &["--reconnect-limit", "1s", "--publishers", "0"]);
    service.wait_for("Starting consumer");
    server.kill();
    let (status, lines, _) = service.finish();
    assert_eq!(status.code(), Some(1), "{}", lines.join("\n"));
    assert!(
        lines.iter().any(|l| l.contains("unreachable")),
        "{}",
        lines.join("\n")
    );
    assert!(lines
        .iter()
        .any(|l| l.contains("Successfully shutdown the Mayhem service.")));
}

#[test]
fn an_unreachable_server_at_start_exits_1_and_a_bad_url_exits_2() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let run = |source: &str| {
        Command::new(env!("CARGO_BIN_EXE_mayhem"))
            .args(["--source", source])
            .stdin(Stdio::null())
            .output()
            .expect("run mayhem")
    };
    let down = run(&format!("redis://127.0.0.1:{port}/0"));
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("cannot connect to redis"));
    for bad in ["redis://127.0.0.1:notaport", "http://127.0.0.1:6379"] {
        let refused = run(bad);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{bad}: {stderr}");
        // clap's whole message: the first line names the flag, then clap's hint.
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error: ") && first.contains("--source"),
            "{stderr}"
        );
    }
}
