//! The Google Cloud Pub/Sub source against the official emulator, which this file starts
//! once for the whole test binary on a free loopback port (about 4 s; Java 17): the shared
//! conformance suite through `PubSubSource`, ordering keys under random latency and
//! failures, and the `mayhem` binary end to end.
//!
//! The emulator runs under a watchdog shell that kills its whole process group and removes
//! its directory when this test binary exits (the shell's standard input closes).
//!
//! Every test skips only when the emulator is not installed (Debian package
//! `google-cloud-cli-pubsub-emulator`): it prints `SKIPPED` on stderr and appends a line to
//! `target/tmp/skipped.log`, which `make test` counts. With `MAYHEM_REQUIRE_PUBSUB=1` (as
//! `.ci/run` sets it) a skip fails the test instead.
#![cfg(all(feature = "pubsub", feature = "cli"))]

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

mod common;
mod conformance;

use common::pubsub::{Emulator, EMULATOR};
use common::{acked_names, field, pull_all, skip, Service};
use mayhem::{
    Config, Context, HandleError, Handler, PubSubConfig, PubSubMessage, PubSubSource, Publish,
    Shutdown, Source,
};

/// Upper bound for anything a test waits for; only reached when something is broken.
const PATIENCE: Duration = Duration::from_secs(60);
/// The project of every test.
const PROJECT: &str = "mayhem-test";
/// The ack deadline of the conformance brokers: Pub/Sub's shortest.
const DEADLINE: Duration = Duration::from_secs(10);

/// The emulator shared by the tests of this binary ([`common::pubsub`] starts it).
impl Emulator {
    /// The shared emulator, started by the first test that asks; `None` (said loudly by
    /// every test that asks) when it is not installed.
    fn get() -> Option<&'static Emulator> {
        static CELL: OnceLock<Option<Emulator>> = OnceLock::new();
        let emulator = CELL.get_or_init(|| {
            common::pubsub::installed()
                .then(|| Emulator::start().expect("start the pubsub emulator"))
        });
        if emulator.is_none() {
            skip(&format!(
                "{EMULATOR} not found (apt-get install google-cloud-cli-pubsub-emulator)"
            ));
        }
        emulator.as_ref()
    }

    /// A source on `subscription` (created with its topic), dead-lettering after
    /// `max_attempts`.
    fn source(&self, subscription: &str, max_attempts: u32) -> PubSubSource {
        PubSubSource::connect(PubSubConfig {
            url: format!("pubsub://{PROJECT}/{subscription}"),
            emulator_host: Some(self.host.clone()),
            ack_deadline: DEADLINE,
            max_attempts,
            ..PubSubConfig::default()
        })
        .expect("connect to the emulator")
    }
}

/// A name no other test of this run uses (subscriptions live as long as the emulator).
fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// The emulator for the conformance suite: one subscription (and topic) per broker.
struct Emulated(&'static Emulator);

impl conformance::Harness for Emulated {
    type Broker = PubSubSource;

    fn broker(&self, max_attempts: u32) -> PubSubSource {
        self.0.source(&unique("conf"), max_attempts)
    }

    fn deadline(&self) -> Duration {
        DEADLINE
    }

    fn pass(&self, _broker: &PubSubSource, by: Duration) {
        // The emulator starts a deadline when it answers a pull, a little after the source
        // sent it: the slack makes sure a deadline that passed here passed there too.
        thread::sleep(by + Duration::from_millis(300));
    }

    fn pull_wait(&self) -> Duration {
        // The emulator checks deadlines every few hundred milliseconds.
        Duration::from_secs(3)
    }

    fn reserved(&self) -> &'static [&'static str] {
        &["mayhem_message_id", "googclient_key"]
    }
}

/// A conformance harness, or `None` (said loudly) without the emulator.
fn emulated() -> Option<Emulated> {
    Emulator::get().map(Emulated)
}

conformance_tests!(emulated());

/// Starts `mayhem --source pubsub://...` with `args`, on the emulator.
fn start(emulator: &Emulator, subscription: &str, args: &[&str]) -> Service {
    let source = format!("pubsub://{PROJECT}/{subscription}");
    let flags = [
        "--source",
        &source,
        "--log-level",
        "info",
        "--ack-deadline",
        "10s",
    ];
    let args = [&flags[..], &["--extend-interval", "5s"], args].concat();
    Service::start_with_env(&args, &[("PUBSUB_EMULATOR_HOST", &emulator.host)])
        .with_patience(PATIENCE)
}

#[test]
fn the_service_handles_what_it_publishes_end_to_end() {
    let Some(emulator) = Emulator::get() else {
        return;
    };
    let mut service = start(
        emulator,
        &unique("e2e"),
        &[
            "--messages",
            "300",
            "--publish-interval",
            "0",
            "--handler-latency",
            "5ms",
            "--report",
            "json",
            "--seed",
            "3",
        ],
    );
    service.wait_for_count("Successfully shutdown the Mayhem service.", 1);
    let (status, _, lines, report) = service.finish();
    assert!(status.success(), "{status:?}:\n{}", lines.join("\n"));
    assert_eq!(field(&report, "published"), 300.0, "{report}");
    // A message whose five attempts all failed (a failure rate of 0.25 per step) is
    // dead-lettered.
    let acked = field(&report, "acked");
    assert_eq!(acked + field(&report, "dead_lettered"), 300.0, "{report}");
    let mut names = acked_names(&lines);
    names.sort();
    names.dedup();
    assert_eq!(
        names.len() as f64,
        acked,
        "each message acked once, by name"
    );
}

#[test]
fn the_service_consumes_what_another_client_published_and_gives_back_on_sigterm() {
    let Some(emulator) = Emulator::get() else {
        return;
    };
    let subscription = unique("e2e-consume");
    let publisher = emulator.source(&subscription, 5);
    let mut rng = mayhem::Rng::with_seed(11);
    let sent: Vec<PubSubMessage> = (0..100).map(|_| PubSubMessage::random(&mut rng)).collect();
    publisher.publish(&sent).expect("publish");
    drop(publisher);
    let mut service = start(
        emulator,
        &subscription,
        &[
            "--publishers",
            "0",
            "--restart-failure-rate",
            "0",
            "--save-failure-rate",
            "0",
            "--handler-latency",
            "5ms",
            "--report",
            "json",
        ],
    );
    service.wait_for_count("Done. Acked", 100);
    service.signal("TERM");
    let (status, _, lines, report) = service.finish();
    assert!(status.success(), "{status:?}:\n{}", lines.join("\n"));
    assert_eq!(field(&report, "acked"), 100.0, "{report}");
    let mut names = acked_names(&lines);
    names.sort();
    let mut expected: Vec<String> = sent
        .iter()
        .map(|m| m.instance_name().unwrap().to_owned())
        .collect();
    expected.sort();
    assert_eq!(names, expected);
}

#[test]
fn messages_over_max_attempts_reach_the_dead_letter_topic_with_their_reason() {
    let Some(emulator) = Emulator::get() else {
        return;
    };
    let subscription = unique("e2e-dead");
    // A subscription on the dead-letter topic before anything is dead-lettered: Pub/Sub
    // keeps messages only for the subscriptions a topic has when they are published.
    let source = emulator.source(&subscription, 5);
    let watch = PubSubSource::connect(PubSubConfig {
        url: format!("pubsub://{PROJECT}/watch-{subscription}?topic={subscription}-dead"),
        emulator_host: Some(emulator.host.clone()),
        ..PubSubConfig::default()
    })
    .expect("watch the dead-letter topic");
    drop(source);
    let service = start(
        emulator,
        &subscription,
        &[
            "--messages",
            "20",
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
        ],
    );
    let (status, _, lines, report) = service.finish();
    assert!(status.success(), "{status:?}:\n{}", lines.join("\n"));
    assert_eq!(field(&report, "dead_lettered"), 20.0, "{report}");
    let dead = pull_all(&watch, 20);
    for lease in &dead {
        let attributes = lease.message.attributes();
        assert_eq!(attributes.get("mayhem_attempt"), Some("2"), "{lease:?}");
        assert_eq!(
            attributes.get("mayhem_dead_reason"),
            Some("nacked on attempt 2 of 2"),
            "{lease:?}"
        );
    }
}

#[test]
fn a_bad_url_is_one_line_naming_it_and_exit_2() {
    let output = Command::new(env!("CARGO_BIN_EXE_mayhem"))
        .args(["--source", "pubsub://Demo/orders"])
        .output()
        .expect("run mayhem");
    assert_eq!(output.status.code(), Some(2));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("invalid value 'pubsub://Demo/orders'") && text.contains("project 'Demo'"),
        "{text}"
    );
}

#[test]
fn a_bad_emulator_host_is_one_line_naming_it_and_exit_2() {
    for args in [
        &["--source", "pubsub://demo/orders"][..],
        &["publish", "--source", "pubsub://demo/orders", "web-03"],
    ] {
        for host in ["localhost", "127.0.0.1:99999", "127.0.0.1:1/x y", ":::"] {
            let output = Command::new(env!("CARGO_BIN_EXE_mayhem"))
                .args(args)
                .env("PUBSUB_EMULATOR_HOST", host)
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run mayhem");
            let text = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{args:?} {host}: {text}");
            assert_eq!(text.trim_end().lines().count(), 1, "{text}");
            assert!(
                text.contains(&format!("invalid PUBSUB_EMULATOR_HOST '{host}'")),
                "{text}"
            );
        }
    }
}

#[test]
fn a_host_published_by_mayhem_publish_is_restarted_by_a_service_started_afterwards() {
    let Some(emulator) = Emulator::get() else {
        return;
    };
    let subscription = unique("published");
    let source = format!("pubsub://{PROJECT}/{subscription}");
    // Before any service ran: `publish` creates the subscription, so the messages are kept.
    let output = Command::new(env!("CARGO_BIN_EXE_mayhem"))
        .args(["publish", "--source", &source, "web-03", "db-7.eu-west"])
        .env("PUBSUB_EMULATOR_HOST", &emulator.host)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run mayhem publish");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.lines().count(), 2, "one id per message: {stdout}");
    let mut service = start(
        emulator,
        &subscription,
        &[
            "--publishers",
            "0",
            "--messages",
            "2",
            "--restart-failure-rate",
            "0",
            "--save-failure-rate",
            "0",
        ],
    );
    service.wait_for("Restarted web-03.example.net");
    service.wait_for("Restarted db-7.eu-west.example.net");
    let (status, _, lines, _) = service.finish();
    assert!(status.success(), "{}", lines.join("\n"));
}

/// A handler that checks the ordering contract: messages of one key are handled one at a
/// time, each only after the one before it succeeded; other keys run concurrently. Latency
/// and failures are drawn from the message id and the attempt, so a run is reproducible.
#[derive(Default)]
struct OrderChecker {
    /// Per key: the sequence numbers handled successfully, in the order they finished.
    done: Mutex<HashMap<String, Vec<u32>>>,
    /// Per key: handlers running now.
    running: Mutex<HashMap<String, u32>>,
    /// What broke the contract.
    violations: Mutex<Vec<String>>,
    /// Most handlers running at once, over all keys.
    most_at_once: AtomicUsize,
    /// Handlers running now, over all keys.
    at_once: AtomicUsize,
    /// Failures injected.
    failures: AtomicUsize,
}

impl Handler for OrderChecker {
    async fn handle(&self, ctx: &Context<'_>) -> Result<(), HandleError> {
        let message = ctx.message();
        let key = message.ordering_key().unwrap_or_default().to_owned();
        let seq: u32 = message
            .attributes()
            .get("seq")
            .and_then(|seq| seq.parse().ok())
            .unwrap_or(u32::MAX);
        {
            let mut running = self.running.lock().unwrap();
            let count = running.entry(key.clone()).or_insert(0);
            *count += 1;
            if *count > 1 {
                self.violations
                    .lock()
                    .unwrap()
                    .push(format!("{key}: {seq} ran beside another of its key"));
            }
            let done = self.done.lock().unwrap();
            let last = done.get(&key).and_then(|seqs| seqs.last().copied());
            if last.map_or(0, |last| last + 1) != seq {
                self.violations
                    .lock()
                    .unwrap()
                    .push(format!("{key}: {seq} started after {last:?}"));
            }
        }
        let now = self.at_once.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        let draw = message.id().digest() ^ u64::from(ctx.attempt()).wrapping_mul(0x9e37_79b9);
        let mut rng = fastrand::Rng::with_seed(draw);
        smol::Timer::after(Duration::from_millis(rng.u64(0..20))).await;
        // One attempt in ten fails.
        let fails = rng.u32(0..10) == 0;
        self.at_once.fetch_sub(1, Ordering::SeqCst);
        *self.running.lock().unwrap().get_mut(&key).unwrap() -= 1;
        if fails {
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(HandleError::Other(format!(
                "injected failure of {key}/{seq}"
            )));
        }
        self.done.lock().unwrap().entry(key).or_default().push(seq);
        Ok(())
    }
}

#[test]
fn ordering_keys_are_handled_in_publish_order_under_latency_and_failures() {
    let Some(emulator) = Emulator::get() else {
        return;
    };
    const KEYS: u32 = 50;
    const PER_KEY: u32 = 40;
    let source = PubSubSource::connect(PubSubConfig {
        url: format!("pubsub://{PROJECT}/{}?ordering=true", unique("ordered")),
        emulator_host: Some(emulator.host.clone()),
        ack_deadline: DEADLINE,
        // A nack gives back the rest of its key, and each of those redeliveries counts as an
        // attempt: Pub/Sub's most, so that no message is dead-lettered for its neighbours'
        // failures.
        max_attempts: 99,
        ..PubSubConfig::default()
    })
    .expect("connect");
    // Interleaved keys, in sequence order per key.
    let batch: Vec<PubSubMessage> = (0..PER_KEY)
        .flat_map(|seq| {
            (0..KEYS).map(move |key| {
                PubSubMessage::new(format!("host-{key}-{seq}"))
                    .with_id(format!("k{key}-{seq}"))
                    .with_ordering_key(format!("key-{key}"))
                    .with_attribute("seq", seq.to_string())
            })
        })
        .collect();
    source.publish(&batch).expect("publish");
    let mut config = Config::default();
    config.publish.publishers = 0;
    config.run.messages = Some(u64::from(KEYS * PER_KEY));
    config.run.consumers = 2;
    config.run.workers = 2;
    config.run.max_in_flight = 400;
    config.run.seed = Some(17);
    config.run.grace_period = Duration::from_secs(1);
    config.lease.ack_deadline = DEADLINE;
    config.lease.extend_interval = Duration::from_secs(5);
    config.lease.max_attempts = 99;
    let checker = OrderChecker::default();
    let report = mayhem::Runner::new(&config)
        .publisher(&source)
        .run(&source, &checker, &Shutdown::new())
        .expect("run");
    let violations = checker.violations.lock().unwrap();
    assert!(
        violations.is_empty(),
        "{} violations: {:?}",
        violations.len(),
        &violations[..violations.len().min(20)]
    );
    let done = checker.done.lock().unwrap();
    assert_eq!(done.len(), KEYS as usize);
    for (key, seqs) in done.iter() {
        assert_eq!(*seqs, (0..PER_KEY).collect::<Vec<u32>>(), "{key}");
    }
    assert_eq!(report.acked, u64::from(KEYS * PER_KEY), "{report:?}");
    assert!(
        checker.failures.load(Ordering::SeqCst) > 0,
        "failures were injected"
    );
    assert!(
        checker.most_at_once.load(Ordering::SeqCst) > 1,
        "keys were handled concurrently"
    );
}

/// Sends `DELETE /v1/{path}` to the emulator; returns the status line.
fn delete(emulator: &Emulator, path: &str) -> String {
    request(emulator, "DELETE", path, None)
}

/// Sends `METHOD /v1/{path}` (with a JSON body, if any) to the emulator; returns the status
/// line.
fn request(emulator: &Emulator, method: &str, path: &str, body: Option<&str>) -> String {
    use std::io::Write;
    let mut stream = TcpStream::connect(&emulator.host).expect("connect to the emulator");
    let mut request =
        format!("{method} /v1/{path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or_default());
    stream.write_all(request.as_bytes()).expect("send");
    // The status line is all that is read: the emulator may keep the connection open.
    let mut answer = [0u8; 64];
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a timeout");
    let read = stream.read(&mut answer).unwrap_or(0);
    let answer = String::from_utf8_lossy(&answer[..read]);
    answer.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn a_subscription_lost_mid_run_is_created_again() {
    // The emulator keeps everything in memory: a restart loses the subscription. The source
    // creates it again, with one line, and goes on.
    let Some(emulator) = Emulator::get() else {
        return;
    };
    let subscription = unique("lost");
    let source = emulator.source(&subscription, 5);
    conformance::publish(&source, 3, 21);
    let leases = pull_all(&source, 3);
    let mut refused = Vec::new();
    let ids: Vec<mayhem::LeaseId> = leases.iter().map(|lease| lease.id).collect();
    source.ack(&ids, &mut refused).expect("ack");
    assert_eq!(source.flush(Duration::from_secs(5)), 0);
    let status = delete(
        emulator,
        &format!("projects/{PROJECT}/subscriptions/{subscription}"),
    );
    assert!(status.contains("200"), "{status}");
    // The first pull finds it missing and creates it; what is published afterwards arrives.
    source
        .pull(10, Duration::from_millis(200), &mut Vec::new())
        .expect("pull");
    let sent = conformance::publish(&source, 5, 22);
    let again = pull_all(&source, 5);
    let mut got: Vec<String> = again.iter().map(|l| l.message.id().to_string()).collect();
    let mut want: Vec<String> = sent.iter().map(|m| m.id().to_string()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn a_batch_of_several_requests_in_flight_arrives_once_each_and_a_missing_topic_fails_it() {
    let Some(emulator) = Emulator::get() else {
        return;
    };
    // 5,500 messages: six requests, four in flight at once.
    let subscription = unique("lanes");
    let source = emulator.source(&subscription, 5);
    let mut rng = mayhem::Rng::with_seed(61);
    let sent: Vec<PubSubMessage> = (0..5500).map(|_| PubSubMessage::random(&mut rng)).collect();
    source.publish(&sent).expect("publish");
    assert_eq!(source.stats().published, 5500);
    let leases = pull_all(&source, sent.len());
    let mut got: Vec<String> = leases.iter().map(|l| l.message.id().to_string()).collect();
    let mut want: Vec<String> = sent.iter().map(|m| m.id().to_string()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "each message once");
    // A topic deleted under the source: every request is refused, and the batch fails at
    // once with the server's reason instead of being tried again.
    let status = delete(emulator, source.topic());
    assert!(status.contains("200"), "{status}");
    let started = Instant::now();
    let error = source.publish(&sent[..3500]).expect_err("a missing topic");
    assert!(started.elapsed() < Duration::from_secs(10), "{error}");
    let text = error.to_string();
    assert!(
        text.contains("pubsub publish to") && text.contains("404"),
        "{text}"
    );
    assert_eq!(source.stats().published, 5500);
}

#[test]
fn names_with_percent_signs_are_the_names_pubsub_keeps() {
    // Pub/Sub's names may hold `%` (and `+` and `~`). In a request's path a `%` starts an
    // escape: `or%41ders` unescaped is `orAders`, so the topic must be asked for as
    // `or%2541ders`, while the JSON bodies name it as it is. (Not `%25` itself: the
    // emulator decodes `%2525` twice, to `%`.)
    let Some(emulator) = Emulator::get() else {
        return;
    };
    for prefix in ["pct%41x", "pct%7e%y", "pct+~z"] {
        let subscription = unique(prefix);
        let source = emulator.source(&subscription, 5);
        assert_eq!(
            source.topic(),
            format!("projects/{PROJECT}/topics/{subscription}")
        );
        let sent = conformance::publish(&source, 3, 23);
        let leases = pull_all(&source, 3);
        let mut got: Vec<String> = leases.iter().map(|l| l.message.id().to_string()).collect();
        let mut want: Vec<String> = sent.iter().map(|m| m.id().to_string()).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{subscription}");
        let ids: Vec<mayhem::LeaseId> = leases.iter().map(|lease| lease.id).collect();
        source.ack(&ids, &mut Vec::new()).expect("ack");
        assert_eq!(source.flush(Duration::from_secs(5)), 0, "{subscription}");
        // Nothing was made under the unescaped name.
        let unescaped = subscription.replace("%41", "A").replace("%7e", "~");
        if unescaped != subscription {
            let status = delete(
                emulator,
                &format!(
                    "projects/{PROJECT}/topics/{}",
                    unescaped.replace('%', "%25")
                ),
            );
            assert!(status.contains("404"), "{unescaped}: {status}");
        }
    }
}

#[test]
fn a_subscription_attached_to_a_deleted_topic_is_consumed_and_publish_says_why_it_cannot() {
    // Deleting a topic leaves its subscriptions, attached to `_deleted-topic_`: what they
    // hold can still be pulled, but nothing can be published to them.
    let Some(emulator) = Emulator::get() else {
        return;
    };
    let subscription = unique("orphan");
    let source = emulator.source(&subscription, 5);
    conformance::publish(&source, 2, 24);
    let status = delete(emulator, source.topic());
    assert!(status.contains("200"), "{status}");
    drop(source);
    let source = emulator.source(&subscription, 5);
    assert_eq!(pull_all(&source, 2).len(), 2);
    let error = source
        .publish(&[PubSubMessage::new("web-01")])
        .expect_err("no topic to publish to");
    let text = error.to_string();
    assert!(
        text.contains(&subscription) && text.contains("topic was deleted"),
        "{text}"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_mayhem"))
        .args([
            "publish",
            "--source",
            &format!("pubsub://{PROJECT}/{subscription}"),
            "web-01",
        ])
        .env("PUBSUB_EMULATOR_HOST", &emulator.host)
        .stdin(Stdio::null())
        .output()
        .expect("run mayhem publish");
    let text = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert_eq!(text.trim_end().lines().count(), 1, "{text}");
    assert!(text.contains("topic was deleted"), "{text}");
    assert!(output.stdout.is_empty());
}

#[test]
fn a_subscription_name_too_long_for_its_dead_letter_topic_is_refused_before_connecting() {
    // Names may be 255 characters, and the dead-letter topic is `{subscription}-dead`: a
    // subscription of more than 250 would need a topic name Pub/Sub refuses.
    let long = format!("s{}", "x".repeat(250));
    for args in [
        &["--source", &format!("pubsub://{PROJECT}/{long}")][..],
        &[
            "publish",
            "--source",
            &format!("pubsub://{PROJECT}/{long}"),
            "web-03",
        ],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_mayhem"))
            .args(args)
            // Nothing listens there: the URL must be refused before connecting.
            .env("PUBSUB_EMULATOR_HOST", "127.0.0.1:9")
            .stdin(Stdio::null())
            .output()
            .expect("run mayhem");
        let text = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{text}");
        assert_eq!(text.trim_end().lines().count(), 1, "{text}");
        assert!(text.contains("dead-letter topic"), "{text}");
    }
    // 250 characters are fine.
    assert!(mayhem::source::pubsub::PubSubUrl::parse(&format!(
        "pubsub://{PROJECT}/s{}",
        "x".repeat(249)
    ))
    .is_ok());
}

/// `PUT /v1/{path}` of a JSON body on the emulator; the status line.
fn put(emulator: &Emulator, path: &str, body: &str) -> String {
    request(emulator, "PUT", path, Some(body))
}

#[test]
fn a_subscription_made_elsewhere_that_sends_messages_elsewhere_is_said_at_start() {
    // Another program made the subscription: on another topic than `?topic=` names, and
    // with a dead-letter policy that forwards after 5 deliveries to a topic of its own.
    // With --max-attempts 10, Pub/Sub would forward a message before the source's tenth
    // attempt, and publishing goes to the subscription's topic: each is one warning.
    let Some(emulator) = Emulator::get() else {
        return;
    };
    let subscription = unique("foreign");
    for topic in ["their-topic", "their-dlq"] {
        let status = put(
            emulator,
            &format!("projects/{PROJECT}/topics/{topic}-{subscription}"),
            "{}",
        );
        assert!(status.contains("200"), "{status}");
    }
    let body = serde_json::json!({
        "topic": format!("projects/{PROJECT}/topics/their-topic-{subscription}"),
        "deadLetterPolicy": {
            "deadLetterTopic": format!("projects/{PROJECT}/topics/their-dlq-{subscription}"),
            "maxDeliveryAttempts": 5,
        },
    });
    let status = put(
        emulator,
        &format!("projects/{PROJECT}/subscriptions/{subscription}"),
        &body.to_string(),
    );
    assert!(status.contains("200"), "{status}");
    let output = Command::new(env!("CARGO_BIN_EXE_mayhem"))
        .args([
            "--source",
            &format!("pubsub://{PROJECT}/{subscription}?topic=ours-{subscription}"),
            "--max-attempts",
            "10",
            "--publishers",
            "0",
            "--messages",
            "0",
            "--log-level",
            "warn",
        ])
        .env("PUBSUB_EMULATOR_HOST", &emulator.host)
        .stdin(Stdio::null())
        .output()
        .expect("run mayhem");
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    let attached = format!(
        "is attached to projects/{PROJECT}/topics/their-topic-{subscription}, not to \
         projects/{PROJECT}/topics/ours-{subscription}"
    );
    assert_eq!(text.matches(&attached).count(), 1, "{text}");
    let forwards = format!(
        "forwards a message to projects/{PROJECT}/topics/their-dlq-{subscription} after 5 \
         deliveries, fewer than the 11 that --max-attempts 10 needs"
    );
    assert_eq!(text.matches(&forwards).count(), 1, "{text}");
    // With --max-attempts 4 the policy's 5 deliveries leave the source its attempts, and
    // without ?topic= the subscription's topic is the one meant: no warning.
    let output = Command::new(env!("CARGO_BIN_EXE_mayhem"))
        .args([
            "--source",
            &format!("pubsub://{PROJECT}/{subscription}"),
            "--max-attempts",
            "4",
            "--publishers",
            "0",
            "--messages",
            "0",
            "--log-level",
            "warn",
        ])
        .env("PUBSUB_EMULATOR_HOST", &emulator.host)
        .stdin(Stdio::null())
        .output()
        .expect("run mayhem");
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    assert!(!text.contains(&subscription), "{text}");
}

#[test]
fn a_subscription_with_a_filter_is_said_at_start() {
    // A subscription another program made with a filter: what is published without the
    // attribute it asks for never reaches it (what the built-in publishers send would
    // never come back, and `mayhem publish` prints the id all the same). The service says
    // so in one line.
    let Some(emulator) = Emulator::get() else {
        return;
    };
    let subscription = unique("filtered");
    let status = put(
        emulator,
        &format!("projects/{PROJECT}/topics/{subscription}"),
        "{}",
    );
    assert!(status.contains("200"), "{status}");
    let body = serde_json::json!({
        "topic": format!("projects/{PROJECT}/topics/{subscription}"),
        "filter": "attributes.origin = \"ops\"",
    });
    let status = put(
        emulator,
        &format!("projects/{PROJECT}/subscriptions/{subscription}"),
        &body.to_string(),
    );
    assert!(status.contains("200"), "{status}");
    let output = Command::new(env!("CARGO_BIN_EXE_mayhem"))
        .args([
            "--source",
            &format!("pubsub://{PROJECT}/{subscription}"),
            "--publishers",
            "0",
            "--messages",
            "0",
            "--log-level",
            "warn",
        ])
        .env("PUBSUB_EMULATOR_HOST", &emulator.host)
        .stdin(Stdio::null())
        .output()
        .expect("run mayhem");
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    let said = "keeps only the messages of its filter attributes.origin = \"ops\"";
    assert_eq!(text.matches(said).count(), 1, "{text}");
}

/// The Python with Google's client (`MAYHEM_PUBSUB_PYTHON`, else `python3`), or `None`
/// (said loudly) when `google.cloud.pubsub_v1` cannot be imported.
fn python_pubsub() -> Option<String> {
    let python = std::env::var("MAYHEM_PUBSUB_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let imported = Command::new(&python)
        .args(["-c", "import google.cloud.pubsub_v1"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !imported {
        skip(&format!(
            "{python} cannot import google.cloud.pubsub_v1 (pip install google-cloud-pubsub, \
             and MAYHEM_PUBSUB_PYTHON naming that python)"
        ));
        return None;
    }
    Some(python)
}

/// Runs `tests/pubsub_interop.py` with `args` and `input` on stdin; returns its stdout lines.
fn python(python: &str, emulator: &Emulator, args: &[&str], input: &str) -> Vec<String> {
    use std::io::Write;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pubsub_interop.py");
    let mut child = Command::new(python)
        .arg(script)
        .args(args)
        .env("PUBSUB_EMULATOR_HOST", &emulator.host)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .expect("write to python");
    let output = child.wait_with_output().expect("run python");
    assert!(
        output.status.success(),
        "python {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Messages with binary data, attributes and ordering keys, as both sides send them.
fn interop_messages() -> Vec<PubSubMessage> {
    (0..30u8)
        .map(|n| {
            PubSubMessage::new(vec![n, 0, 0xff, b'x', n.wrapping_mul(7)])
                .with_attribute("origin", format!("side-{}", n % 3))
                .with_attribute("n", n.to_string())
                .with_ordering_key(format!("key-{}", n % 4))
        })
        .collect()
}

#[test]
fn python_pubsub_and_mayhem_read_each_others_messages() {
    use base64::Engine;
    let Some(emulator) = Emulator::get() else {
        return;
    };
    let Some(interpreter) = python_pubsub() else {
        return;
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let subscription = unique("interop");
    let source = PubSubSource::connect(PubSubConfig {
        url: format!("pubsub://{PROJECT}/{subscription}?ordering=true"),
        emulator_host: Some(emulator.host.clone()),
        ..PubSubConfig::default()
    })
    .expect("connect");
    let sent = interop_messages();

    // Python publishes, Mayhem reads: data, attributes, ordering keys, and Pub/Sub's ids.
    let input: String = sent
        .iter()
        .map(|message| {
            let attributes: HashMap<&str, &str> = message.attributes().iter().collect();
            let line = serde_json::json!({
                "data": b64.encode(message.data()),
                "attributes": attributes,
                "ordering_key": message.ordering_key(),
            });
            format!("{line}\n")
        })
        .collect();
    let ids = python(
        &interpreter,
        emulator,
        &["publish", PROJECT, &subscription],
        &input,
    );
    assert_eq!(ids.len(), sent.len());
    // One key at a time: the source hands out the next of a key once the one before is acked.
    let mut got = Vec::new();
    let end = Instant::now() + PATIENCE;
    while got.len() < sent.len() {
        assert!(Instant::now() < end, "got {} of {}", got.len(), sent.len());
        let mut leases = Vec::new();
        source
            .pull(100, Duration::from_millis(200), &mut leases)
            .expect("pull");
        let lease_ids: Vec<mayhem::LeaseId> = leases.iter().map(|lease| lease.id).collect();
        source.ack(&lease_ids, &mut Vec::new()).expect("ack");
        got.extend(leases.into_iter().map(|lease| lease.message));
    }
    for message in &got {
        let n: usize = message.attributes().get("n").unwrap().parse().unwrap();
        let original = &sent[n];
        assert_eq!(message.data(), original.data());
        // Pub/Sub's attributes are a map: compared without their order.
        let sorted = |message: &PubSubMessage| {
            let mut pairs: Vec<(String, String)> = message
                .attributes()
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            pairs.sort();
            pairs
        };
        assert_eq!(sorted(message), sorted(original));
        assert_eq!(message.ordering_key(), original.ordering_key());
        assert_eq!(message.id().to_string(), ids[n], "the id is Pub/Sub's");
    }
    for key in 0..4 {
        let order: Vec<&str> = got
            .iter()
            .filter(|m| m.ordering_key() == Some(&format!("key-{key}")))
            .map(|m| m.attributes().get("n").unwrap())
            .collect();
        let mut sorted = order.clone();
        sorted.sort_by_key(|n| n.parse::<u32>().unwrap());
        assert_eq!(order, sorted, "key-{key} in publish order");
    }

    // Mayhem publishes, Python reads: the same, with Mayhem's id as an attribute.
    let reader = format!("py-{subscription}");
    python(
        &interpreter,
        emulator,
        &["subscribe", PROJECT, &subscription, &reader],
        "",
    );
    let ours: Vec<PubSubMessage> = sent
        .iter()
        .enumerate()
        .map(|(n, message)| message.clone().with_id(format!("ours-{n}")))
        .collect();
    source.publish(&ours).expect("publish");
    let lines = python(
        &interpreter,
        emulator,
        &["pull", PROJECT, &reader, "30"],
        "",
    );
    assert_eq!(lines.len(), ours.len());
    let mut last_of_key: HashMap<String, usize> = HashMap::new();
    for line in lines {
        let read: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        let n: usize = read["attributes"]["n"].as_str().unwrap().parse().unwrap();
        let original = &ours[n];
        assert_eq!(
            b64.decode(read["data"].as_str().unwrap()).unwrap(),
            original.data()
        );
        assert_eq!(read["ordering_key"].as_str(), original.ordering_key());
        assert_eq!(
            read["attributes"]["origin"].as_str(),
            original.attributes().get("origin")
        );
        assert_eq!(read["attributes"]["mayhem_message_id"], format!("ours-{n}"));
        let key = read["ordering_key"].as_str().unwrap().to_owned();
        if let Some(before) = last_of_key.insert(key, n) {
            assert!(before < n, "publish order kept within a key");
        }
    }
}

/// Holds every message for `hold`, then succeeds.
struct Holding {
    /// How long.
    hold: Duration,
}

impl Handler for Holding {
    async fn handle(&self, _ctx: &Context<'_>) -> Result<(), HandleError> {
        smol::Timer::after(self.hold).await;
        Ok(())
    }
}

#[test]
fn twenty_thousand_leases_held_a_minute_past_a_ten_second_deadline_are_never_redelivered() {
    let Some(emulator) = Emulator::get() else {
        return;
    };
    const COUNT: usize = 20_000;
    let source = emulator.source(&unique("held"), 5);
    let mut rng = mayhem::Rng::with_seed(31);
    let batch: Vec<PubSubMessage> = (0..COUNT)
        .map(|_| PubSubMessage::random(&mut rng))
        .collect();
    source.publish(&batch).expect("publish");
    let mut config = Config::default();
    config.publish.publishers = 0;
    config.run.messages = Some(COUNT as u64);
    config.run.max_in_flight = COUNT;
    config.run.consumers = 2;
    config.run.workers = 2;
    config.run.grace_period = Duration::from_secs(1);
    config.lease.ack_deadline = DEADLINE;
    config.lease.extend_interval = Duration::from_secs(5);
    let started = Instant::now();
    let report = mayhem::Runner::new(&config)
        .publisher(&source)
        .run(
            &source,
            &Holding {
                hold: Duration::from_secs(60),
            },
            &Shutdown::new(),
        )
        .expect("run");
    assert!(started.elapsed() >= Duration::from_secs(60));
    assert_eq!(report.acked, COUNT as u64, "{report:?}");
    assert_eq!(
        (report.redelivered, report.expired, report.lost_leases),
        (0, 0, 0),
        "{report:?}"
    );
    assert!(report.extended > 0, "{report:?}");
}

#[test]
fn a_killed_instance_s_messages_are_handled_by_the_next_after_the_ack_deadline() {
    let Some(emulator) = Emulator::get() else {
        return;
    };
    let subscription = unique("killed");
    let publisher = emulator.source(&subscription, 5);
    let mut rng = mayhem::Rng::with_seed(41);
    let sent: Vec<PubSubMessage> = (0..50).map(|_| PubSubMessage::random(&mut rng)).collect();
    publisher.publish(&sent).expect("publish");
    drop(publisher);
    let quiet = [
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
    ];
    // The first instance takes every message and holds it (its handlers' three steps take up
    // to a minute each: with this seed none ends before the kill, a fraction of a second in).
    let mut first = start(
        emulator,
        &subscription,
        &[&quiet[..], &["--handler-latency", "60s"]].concat(),
    );
    first.wait_for_count("Handling PubSubMessage", 50);
    first.signal("KILL");
    let _ = first.finish();
    // The next one gets them once their ack deadline (10 s) passed, and acks each.
    let started = Instant::now();
    let mut second = start(
        emulator,
        &subscription,
        &[&quiet[..], &["--handler-latency", "5ms"]].concat(),
    );
    second.wait_for_count("Done. Acked", 50);
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "redelivered only after the deadline"
    );
    second.signal("TERM");
    let (status, _, lines, report) = second.finish();
    assert!(status.success(), "{status:?}:\n{}", lines.join("\n"));
    let mut names = acked_names(&lines);
    names.sort();
    let mut expected: Vec<String> = sent
        .iter()
        .map(|m| m.instance_name().unwrap().to_owned())
        .collect();
    expected.sort();
    assert_eq!(names, expected);
    assert_eq!(field(&report, "redelivered"), 50.0, "{report}");
}

#[test]
fn a_frozen_emulator_delays_the_service_but_loses_nothing() {
    // An emulator of its own: freezing the shared one would stall the other tests.
    if Emulator::get().is_none() {
        return;
    }
    let emulator = Emulator::start().expect("a second emulator");
    // The emulator's Java (its launcher execs it), whose process id the watchdog wrote.
    let pid = std::fs::read_to_string(emulator.dir.join("pid"))
        .expect("the emulator's pid")
        .trim()
        .to_owned();
    let subscription = unique("frozen");
    let publisher = emulator.source(&subscription, 5);
    let mut rng = mayhem::Rng::with_seed(51);
    let sent: Vec<PubSubMessage> = (0..200).map(|_| PubSubMessage::random(&mut rng)).collect();
    publisher.publish(&sent).expect("publish");
    drop(publisher);
    let mut service = start(
        &emulator,
        &subscription,
        &[
            "--publishers",
            "0",
            "--restart-failure-rate",
            "0",
            "--save-failure-rate",
            "0",
            "--handler-latency",
            "200ms",
            "--max-in-flight",
            "20",
            "--seed",
            "9",
            "--report",
            "json",
        ],
    );
    service.wait_for_count("Done. Acked", 20);
    let signal = |name: &str| {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid}");
    };
    signal("STOP");
    thread::sleep(Duration::from_secs(3));
    signal("CONT");
    service.wait_for_count("Done. Acked", 200);
    service.signal("TERM");
    let (status, _, lines, _) = service.finish();
    assert!(status.success(), "{status:?}:\n{}", lines.join("\n"));
    let mut names = acked_names(&lines);
    names.sort();
    names.dedup();
    let mut expected: Vec<String> = sent
        .iter()
        .map(|m| m.instance_name().unwrap().to_owned())
        .collect();
    expected.sort();
    assert_eq!(names, expected, "every message acked, by name");
}

#[test]
fn the_binary_restarts_or_rejects_at_once_what_google_s_python_client_publishes() {
    // Another program's messages, published with Google's client: a host name in capitals
    // with an attribute, one with an ordering key, empty data with attributes only (Pub/Sub
    // allows that), and data that is no host name. The valid ones are restarted; the
    // others are dead-lettered on their first delivery, with their reason and their own
    // attributes, never retried.
    use base64::Engine;
    let Some(emulator) = Emulator::get() else {
        return;
    };
    let Some(interpreter) = python_pubsub() else {
        return;
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let subscription = unique("hostile");
    let source = emulator.source(&subscription, 5);
    let watch = PubSubSource::connect(PubSubConfig {
        url: format!("pubsub://{PROJECT}/watch-{subscription}?topic={subscription}-dead"),
        emulator_host: Some(emulator.host.clone()),
        ..PubSubConfig::default()
    })
    .expect("watch the dead-letter topic");
    drop(source);
    let lines = [
        serde_json::json!({"data": b64.encode("WEB-01"), "attributes": {"origin": "python"}}),
        serde_json::json!({"data": b64.encode("web-02"), "ordering_key": "rack-7"}),
        serde_json::json!({"data": "", "attributes": {"only": "attributes"}}),
        serde_json::json!({"data": b64.encode("not a host!"), "attributes": {"why": "bad"}}),
    ];
    let input: String = lines.iter().map(|line| format!("{line}\n")).collect();
    let ids = python(
        &interpreter,
        emulator,
        &["publish", PROJECT, &subscription],
        &input,
    );
    assert_eq!(ids.len(), 4);
    let service = start(
        emulator,
        &subscription,
        &[
            "--publishers",
            "0",
            "--messages",
            "4",
            "--handler-latency",
            "0",
            "--restart-failure-rate",
            "0",
            "--save-failure-rate",
            "0",
            "--report",
            "json",
        ],
    );
    let (status, _, lines, report) = service.finish();
    let log = lines.join("\n");
    assert!(status.success(), "{status:?}:\n{log}");
    assert!(report.contains("\"reason\":\"completed\""), "{report}");
    assert_eq!(field(&report, "acked"), 2.0, "{report}");
    assert_eq!(field(&report, "rejected"), 2.0, "{report}");
    assert_eq!(field(&report, "dead_lettered"), 2.0, "{report}");
    assert_eq!(field(&report, "nacked"), 0.0, "{report}");
    assert_eq!(field(&report, "redelivered"), 0.0, "{report}");
    for host in ["web-01", "web-02"] {
        let line = format!("Restarted {host}.example.net");
        assert!(
            lines.iter().any(|l| l.ends_with(&line)),
            "no {line:?}:\n{log}"
        );
    }
    // A dead letter: its data and its attributes, sorted.
    type Letter = (Vec<u8>, Vec<(String, String)>);
    let mut dead: Vec<Letter> = pull_all(&watch, 2)
        .into_iter()
        .map(|lease| {
            let mut attributes: Vec<(String, String)> = lease
                .message
                .attributes()
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            attributes.sort();
            (lease.message.data().to_vec(), attributes)
        })
        .collect();
    dead.sort();
    let reason = |attributes: &[(String, String)]| {
        attributes
            .iter()
            .find(|(k, _)| k == "mayhem_dead_reason")
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let attempt = |attributes: &[(String, String)]| {
        attributes
            .iter()
            .find(|(k, _)| k == "mayhem_attempt")
            .map(|(_, v)| v.clone())
    };
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].0, b"");
    assert!(
        dead[0]
            .1
            .contains(&("only".to_owned(), "attributes".to_owned())),
        "{dead:?}"
    );
    assert!(reason(&dead[0].1).contains("it is empty"), "{dead:?}");
    assert_eq!(attempt(&dead[0].1).as_deref(), Some("1"), "{dead:?}");
    assert_eq!(dead[1].0, b"not a host!");
    assert!(
        dead[1].1.contains(&("why".to_owned(), "bad".to_owned())),
        "{dead:?}"
    );
    assert!(reason(&dead[1].1).contains("not a host name"), "{dead:?}");
    assert_eq!(attempt(&dead[1].1).as_deref(), Some("1"), "{dead:?}");
}

mod pubsub_soak;

#[test]
fn a_fast_pubsub_soak_with_fixed_seeds_loses_nothing() {
    // The fast subset of `make soak`'s Pub/Sub runs: two fixed seeds, three waves each, run
    // side by side, each on an emulator of its own (a run freezes its emulator, which would
    // stall the other tests on the shared one). Together they inject every kind of fault:
    // seed 21 two SIGTERMs, seed 22 a freeze, a SIGKILL and a freeze.
    if !common::pubsub::installed() {
        skip(&format!(
            "{EMULATOR} not found (apt-get install google-cloud-cli-pubsub-emulator)"
        ));
        return;
    }
    let runs: Vec<_> = [21u64, 22]
        .into_iter()
        .map(|seed| {
            thread::spawn(move || {
                let emulator = Emulator::start().expect("an emulator for the soak");
                let outcome = pubsub_soak::run(env!("CARGO_BIN_EXE_mayhem"), &emulator, seed, 3);
                (seed, outcome)
            })
        })
        .collect();
    for run in runs {
        let (seed, outcome) = run.join().expect("soak run");
        eprintln!("seed {seed}: {outcome:?}");
        assert!(
            outcome.problems.is_empty(),
            "seed {seed}: {:#?}",
            outcome.problems
        );
        assert!(outcome.published > 0);
        assert_eq!(outcome.lost, 0, "seed {seed}");
        assert!(
            outcome.acked + outcome.dead >= outcome.published,
            "seed {seed}"
        );
    }
}
