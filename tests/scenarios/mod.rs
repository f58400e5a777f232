//! The scenarios tests/redis.rs and tests/amqp.rs share, written once over [`Broker`] (what a
//! scenario needs of a broker: a stream or queue of its own, the service on it, a source on
//! it, messages published to it, and waits until the broker settled them). Each test file
//! runs each scenario with a one-line test of the same name as before (a scenario given no
//! broker, where its server is not installed, does nothing: the server's start said so), and
//! keeps what only its broker can check in a short tail.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use mayhem::{PubSubMessage, Publish, Source};

use crate::common::{
    acked_names, distinct_acked, field, names_in, publish_one, pull_one, quiet, wait_all_acked,
    wait_until, Service, QUIET,
};
use crate::conformance;

/// A broker server as the shared scenarios use it.
pub trait Broker {
    /// The source on one of its streams (queues).
    type Source: Source + Publish;

    /// A stream (RabbitMQ: a queue) for one test, named after `tag` where it must be apart.
    fn stream(&self, tag: &str) -> String;

    /// Starts `mayhem --source {url} --stream {stream} --log-level info` with `args`.
    fn start(&self, stream: &str, args: &[&str]) -> Service;

    /// A source on `stream` (Redis: group `g`, consumer `c1`).
    fn source(&self, stream: &str, ack_deadline: Duration, max_attempts: u32) -> Self::Source;

    /// Publishes `count` messages named `cattle-0000`, `cattle-0001`, ... to `stream`
    /// (`max_attempts` is the queue's, as the service declares it).
    fn publish(&self, stream: &str, count: usize, max_attempts: u32) -> Vec<String>;

    /// Polls until the broker settled everything in `stream`: nothing waits, nothing is
    /// leased (Redis: the service's group has read it all and nothing is pending).
    fn wait_settled(&self, stream: &str, max_attempts: u32);

    /// Checks that `stream`'s dead letters number `count` (RabbitMQ, which routes them
    /// asynchronously: polls until they do).
    fn wait_dead_letters(&self, stream: &str, max_attempts: u32, count: u64);

    /// Flags under which a killed instance's leases pass to another (Redis: a short ack
    /// deadline, after which the other claims them).
    fn claim_flags(&self) -> &'static [&'static str] {
        &[]
    }

    /// Waits until the broker counts `count` leases of the instance `consumer` (Redis: its
    /// pending entries; RabbitMQ counts none per instance).
    fn wait_held(&self, _stream: &str, _consumer: &str, _count: usize) {}
}

/// Nacks one message up to the limit of 3 attempts: it is dead-lettered, once. Returns the
/// stream and the source for the broker's own checks.
pub fn nacks_past_max_attempts_are_dead_lettered<B: Broker>(broker: &B) -> (String, B::Source) {
    let stream = broker.stream("dead");
    let source = broker.source(&stream, Duration::from_secs(5), 3);
    let message = PubSubMessage::random(&mut fastrand::Rng::with_seed(2));
    publish_one(&source, &message);
    for attempt in 1..=3 {
        let lease = pull_one(&source);
        conformance::assert_same(&lease.message, &message);
        assert_eq!(lease.attempt, attempt);
        assert!(conformance::nack(&source, &[lease.id]).is_empty());
    }
    assert_eq!(source.stats().dead_lettered, 1);
    broker.wait_dead_letters(&stream, 3, 1);
    (stream, source)
}

/// A source dropped without acking what it pulled: a new one (Redis: under the same
/// consumer name) gets it again, as attempt 2. Returns the stream.
pub fn a_dropped_source_s_lease_comes_back(broker: &impl Broker, max_attempts: u32) -> String {
    let stream = broker.stream("dropped");
    let message = PubSubMessage::random(&mut fastrand::Rng::with_seed(4));
    {
        let first = broker.source(&stream, Duration::from_secs(60), max_attempts);
        publish_one(&first, &message);
        pull_one(&first);
        // Dropped without ack.
    }
    let again = broker.source(&stream, Duration::from_secs(60), max_attempts);
    let lease = pull_one(&again);
    conformance::assert_same(&lease.message, &message);
    assert_eq!(lease.attempt, 2);
    assert!(conformance::ack(&again, &[lease.id]).is_empty());
    stream
}

/// Two instances on one stream: both get work, and each message is acked exactly once.
pub fn two_instances_share_the_work_and_ack_each_message_once(broker: Option<&impl Broker>) {
    let Some(broker) = broker else { return };
    let stream = broker.stream("shared");
    // A prefetch of 10 (--max-in-flight) and slow handlers: both instances get work.
    let flags = ["--handler-latency", "20ms", "--max-in-flight", "10"];
    let start = |name| {
        broker.start(
            &stream,
            &[&QUIET[..], &flags, &["--consumer-name", name]].concat(),
        )
    };
    let (mut a, mut b) = (start("a"), start("b"));
    a.wait_for("Starting consumer");
    b.wait_for("Starting consumer");
    let names = broker.publish(&stream, 300, 5);
    wait_until("300 acks", || {
        acked_names(a.lines()).len() + acked_names(b.lines()).len() >= 300
    });
    broker.wait_settled(&stream, 5);
    a.signal("TERM");
    b.signal("TERM");
    let (status_a, _, lines_a, report_a) = a.finish();
    let (status_b, _, lines_b, report_b) = b.finish();
    assert!(
        status_a.success() && status_b.success(),
        "{status_a} {status_b}"
    );
    let (acked_a, acked_b) = (acked_names(&lines_a), acked_names(&lines_b));
    assert!(
        !acked_a.is_empty() && !acked_b.is_empty(),
        "one instance got nothing: {} {}",
        acked_a.len(),
        acked_b.len()
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

/// An instance SIGKILLed while it holds leases: another instance handles what it held, and
/// no message is lost.
pub fn a_killed_instance_s_messages_are_handled_by_the_other(broker: Option<&impl Broker>) {
    let Some(broker) = broker else { return };
    let stream = broker.stream("killed");
    let flags = ["--handler-latency", "300ms", "--max-in-flight", "20"];
    let victim_flags = [
        &flags[..],
        broker.claim_flags(),
        &["--consumer-name", "victim"],
    ];
    let mut victim = broker.start(&stream, &[&QUIET[..], &victim_flags.concat()].concat());
    victim.wait_for("Starting consumer");
    let names = broker.publish(&stream, 60, 5);
    // The victim holds leases (handlers started) when it is killed.
    victim.wait_for_count("Consumed PubSubMessage", 5);
    broker.wait_held(&stream, "victim", 5);
    victim.signal("KILL");
    let (status, _, victim_lines, _) = victim.finish();
    assert!(!status.success());
    let survivor_flags = [broker.claim_flags(), &["--consumer-name", "survivor"]].concat();
    let latency = ["--handler-latency", "5ms"];
    let mut survivor = broker.start(&stream, &[&QUIET[..], &latency, &survivor_flags].concat());
    let acked_by_both = |survivor: &[String]| distinct_acked(&[&victim_lines, survivor]);
    wait_until("every message acked", || {
        acked_by_both(survivor.lines()).len() >= names.len()
    });
    survivor.signal("TERM");
    let (status, _, lines, report) = survivor.finish();
    assert!(status.success(), "{status}: {}", lines.join("\n"));
    assert_eq!(acked_by_both(&lines), names, "a message was lost");
    assert!(
        field(&report, "redelivered") >= 1.0,
        "nothing was claimed: {report}"
    );
    // What the victim held and had not acked is handled by the survivor.
    let victim_acked = acked_names(&victim_lines);
    let held: Vec<String> = names_in(&victim_lines, "Consumed PubSubMessage(instance_name='")
        .into_iter()
        .filter(|name| !victim_acked.contains(name))
        .collect();
    let survivor_acked = acked_names(&lines);
    assert!(!held.is_empty());
    assert!(
        held.iter().all(|name| survivor_acked.contains(name)),
        "{held:?} not all in {survivor_acked:?}"
    );
    assert_eq!(
        field(&report, "acked") as usize,
        survivor_acked.len(),
        "{report}"
    );
    broker.wait_settled(&stream, 5);
}

/// An instance stopped mid-run (acks still being sent, deliveries prefetched and not pulled
/// yet): its last report balances, the last count asked of the broker after them.
pub fn the_last_report_of_a_lone_instance_balances(broker: Option<&impl Broker>) {
    let Some(broker) = broker else { return };
    let stream = broker.stream("balance");
    let flags = ["--restart-failure-rate", "0", "--save-failure-rate", "0"];
    let more = ["--publish-interval", "1ms", "--grace-period", "1s"];
    let mut service = broker.start(
        &stream,
        &[&flags[..], &more, &["--report", "json"]].concat(),
    );
    service.wait_for_count("Done. Acked", 200);
    service.signal("TERM");
    let (status, _, lines, report) = service.finish();
    assert!(status.success(), "{status}: {}", lines.join("\n"));
    let published = field(&report, "published");
    assert!(published >= 200.0, "{report}");
    assert_eq!(
        published,
        field(&report, "acked") + field(&report, "dead_lettered") + field(&report, "remaining"),
        "{report}"
    );
}

/// Every restart fails and is not retried: each of `count` messages is nacked on every
/// attempt until the last, `max_attempts`, dead-letters it; nothing is acked.
pub fn messages_failing_every_time_are_dead_lettered_by_the_service(
    broker: Option<&impl Broker>,
    count: usize,
    max_attempts: u32,
) {
    let Some(broker) = broker else { return };
    let stream = broker.stream("svcdead");
    let attempts = max_attempts.to_string();
    let mut service = broker.start(
        &stream,
        &[
            "--publishers",
            "0",
            "--restart-failure-rate",
            "1",
            "--restart-retries",
            "0",
            "--save-failure-rate",
            "0",
            "--handler-latency",
            "0",
            "--max-attempts",
            &attempts,
            "--report",
            "json",
            "--seed",
            "7",
        ],
    );
    service.wait_for("Starting consumer");
    broker.publish(&stream, count, max_attempts);
    broker.wait_settled(&stream, max_attempts);
    service.signal("TERM");
    let (status, _, lines, report) = service.finish();
    assert!(status.success(), "{status}: {}", lines.join("\n"));
    assert_eq!(field(&report, "dead_lettered"), count as f64, "{report}");
    assert_eq!(field(&report, "acked"), 0.0, "{report}");
    broker.wait_dead_letters(&stream, max_attempts, count as u64);
}

/// SIGTERM while every handler is busy (for 10 s): the service exits within its grace period,
/// and what it had not acked is given back (at least 20 of 30). Returns the stream, how many
/// it gave back, and the report.
pub fn sigterm_gives_back_within_the_grace_period(broker: &impl Broker) -> (String, usize, String) {
    let stream = broker.stream("term");
    let flags = ["--handler-latency", "10s", "--max-in-flight", "20"];
    let more = ["--grace-period", "500ms", "--consumer-name", "term"];
    let mut service = broker.start(&stream, &[&QUIET[..], &flags, &more].concat());
    service.wait_for("Starting consumer");
    broker.publish(&stream, 30, 5);
    service.wait_for_count("Consumed PubSubMessage", 20);
    broker.wait_held(&stream, "term", 20);
    let sent = Instant::now();
    service.signal("TERM");
    let (status, _, lines, report) = service.finish();
    let took = sent.elapsed();
    assert!(status.success(), "{status}: {}", lines.join("\n"));
    assert!(
        took < Duration::from_millis(1500),
        "the shutdown took {took:?}, more than the grace period + 1 s"
    );
    let back = 30 - field(&report, "acked") as usize;
    assert!(back >= 20, "{report}");
    (stream, back, report)
}

/// The service on `url` (the broker's, or a proxy's in front of it), handling 200 messages,
/// is cut off from the broker by `outage` (given the service, to wait on it) once it acked 30,
/// and reconnects: every message is acked at least once (the broker kept what was not acked;
/// acks lost with the connection make a few handled twice), counted by message name, and
/// nothing is left.
pub fn an_outage_loses_nothing(broker: &impl Broker, url: &str, outage: impl FnOnce(&mut Service)) {
    let stream = broker.stream("outage");
    let flags = [
        "--stream",
        &stream,
        "--handler-latency",
        "20ms",
        "--max-in-flight",
        "20",
    ];
    let mut service = Service::start_on(url, &quiet(&flags));
    service.wait_for("Starting consumer");
    let names = broker.publish(&stream, 200, 5);
    service.wait_for_count("Done. Acked", 30);
    outage(&mut service);
    wait_all_acked(&mut service, &names);
    assert_eq!(distinct_acked(&[service.lines()]), names);
    broker.wait_settled(&stream, 5);
    service.signal("TERM");
    let (status, _, lines, _) = service.finish();
    assert!(status.success(), "{status}: {}", lines.join("\n"));
}

/// The service on `url` (the broker's, or a proxy's in front of it) with `--reconnect-limit
/// 1s`; `fault` cuts it off from the broker once it consumes: it says `gave_up`, shuts down
/// and exits 1, within `within`.
pub fn gives_up_after_the_limit(
    broker: &impl Broker,
    url: &str,
    fault: impl FnOnce(),
    gave_up: &str,
    within: Duration,
) {
    let stream = broker.stream("giveup");
    let flags = ["--stream", &stream, "--reconnect-limit", "1s"];
    let mut service = Service::start_on(url, &[&flags[..], &QUIET].concat());
    service.wait_for("Starting consumer");
    let broken = Instant::now();
    fault();
    let (status, _, lines, _) = service.finish();
    assert_eq!(status.code(), Some(1), "{}", lines.join("\n"));
    for said in [gave_up, "Successfully shutdown the Mayhem service."] {
        let found = lines.iter().any(|line| line.contains(said));
        assert!(found, "{said:?} missing: {}", lines.join("\n"));
    }
    assert!(broken.elapsed() < within, "{:?}", broken.elapsed());
}

/// The service on `url` (with `args`) and `--reconnect-limit 60s`, which the broker refuses
/// for good: it exits 1 at once (retrying cannot cure it), naming `refusal`, without
/// `secret`. Returns its stderr.
pub fn refused_at_once(url: &str, args: &[&str], refusal: &str, secret: &str) -> String {
    let started = Instant::now();
    let output =
        crate::common::run(&[&["--source", url, "--reconnect-limit", "60s"], args].concat());
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    // Not retried for the 60 s of the limit.
    assert!(started.elapsed() < Duration::from_secs(20), "{stderr}");
    assert!(
        stderr.contains("refused the connection") && stderr.contains(refusal),
        "{stderr}"
    );
    assert!(!stderr.contains("retrying"), "{stderr}");
    assert!(!stderr.contains(secret), "{stderr}");
    stderr
}

/// `mayhem publish --source {url} ARGS web-03`, which fails: exit 1, nothing on stdout, one
/// line `error: ...` on stderr (without `secret`, when given). Returns how long it took and
/// stderr.
pub fn publish_fails(url: &str, args: &[&str], secret: Option<&str>) -> (Duration, String) {
    let started = Instant::now();
    let output = crate::common::run(&[&["publish", "--source", url], args, &["web-03"]].concat());
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(output.stdout.is_empty(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    if let Some(secret) = secret {
        assert!(!stderr.contains(secret), "{stderr}");
    }
    (started.elapsed(), stderr)
}

#[cfg(feature = "redis")]
impl Broker for crate::common::redis::RedisServer {
    type Source = mayhem::RedisSource;

    /// Every Redis test has a server of its own: the service's default stream.
    fn stream(&self, _tag: &str) -> String {
        "mayhem".to_owned()
    }

    fn start(&self, stream: &str, args: &[&str]) -> Service {
        use crate::common::BrokerServer;
        let args = [&["--stream", stream][..], args].concat();
        Service::start_on(&self.url(), &args).with_patience(Duration::from_secs(20))
    }

    fn source(&self, stream: &str, ack_deadline: Duration, max_attempts: u32) -> Self::Source {
        mayhem::RedisSource::connect(mayhem::RedisConfig {
            max_attempts,
            ..self.config(stream, ack_deadline)
        })
        .expect("connect")
    }

    fn publish(&self, stream: &str, count: usize, _max_attempts: u32) -> Vec<String> {
        crate::common::redis::RedisServer::publish(self, stream, count)
    }

    fn wait_settled(&self, stream: &str, _max_attempts: u32) {
        self.wait_until_drained(stream, "mayhem");
    }

    fn wait_dead_letters(&self, stream: &str, _max_attempts: u32, count: u64) {
        // Written with the nack or the ack that made them: nothing to wait for.
        assert_eq!(self.xlen(&format!("{stream}:dead")), count as i64);
    }

    fn claim_flags(&self) -> &'static [&'static str] {
        &["--ack-deadline", "1s", "--extend-interval", "300ms"]
    }

    fn wait_held(&self, stream: &str, consumer: &str, count: usize) {
        wait_until("the victim leased entries", || {
            self.pending_of(stream, "mayhem", consumer) >= count
        });
    }
}

#[cfg(feature = "amqp")]
impl Broker for crate::common::rabbit::Rabbit {
    type Source = mayhem::AmqpSource;

    fn stream(&self, tag: &str) -> String {
        self.queue(tag)
    }

    fn start(&self, stream: &str, args: &[&str]) -> Service {
        use crate::common::BrokerServer;
        Service::start_on(&self.url(), &[&["--stream", stream][..], args].concat())
    }

    fn source(&self, stream: &str, ack_deadline: Duration, max_attempts: u32) -> Self::Source {
        crate::common::rabbit::Rabbit::source(self, stream, ack_deadline, max_attempts)
    }

    fn publish(&self, stream: &str, count: usize, max_attempts: u32) -> Vec<String> {
        self.publish_names(stream, count, max_attempts)
    }

    fn wait_settled(&self, stream: &str, max_attempts: u32) {
        self.wait_until_empty(stream, max_attempts);
    }

    fn wait_dead_letters(&self, stream: &str, max_attempts: u32, count: u64) {
        let probe = self.source(stream, Duration::from_secs(60), max_attempts);
        // The broker routes dead letters asynchronously.
        wait_until("the dead letters", || {
            probe.dead_letter_count() == Ok(count)
        });
    }
}
