//! The RabbitMQ source against a real `rabbitmq-server` this file starts once, on free
//! loopback ports, with its data in a temporary directory: the shared conformance suite
//! through `AmqpSource`, and the `mayhem` binary end to end (two instances competing, a
//! SIGKILLed instance, dead letters, SIGTERM, a lost connection and the reconnect limit
//! through a proxy, a server restarted mid-run on a server of its own).
//!
//! The server takes about 5 s to start, so one serves every test of this file, each on its
//! own queues (the restart test has its own). It runs under a watchdog shell that kills its
//! whole process group and removes its directory when this test binary exits (the shell's
//! standard input closes), however the binary ends.
//!
//! Every test skips only when `rabbitmq-server` is not installed: it prints `SKIPPED` on
//! stderr and appends a line to `target/tmp/skipped.log`, which `make test` counts. With
//! `MAYHEM_REQUIRE_AMQP=1` (as `.ci/run` sets it) a skip fails the test instead.
#![cfg(all(feature = "amqp", feature = "cli"))]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

mod amqp_soak;
mod common;
mod conformance;
mod scenarios;

use common::proxy::Proxy;
use common::rabbit::{config, Rabbit};
use common::{
    acked_names, count_said, field, free_port, printed_ids, pull_all, pull_one, restart_under,
    run_publish, run_seeds, wait_all_acked, BrokerServer, Service, NO_FAILURES, PATIENCE,
};
use mayhem::{AmqpConfig, AmqpSource, PubSubMessage, Publish, Source};

/// Starts `mayhem --source {server} --stream {queue} --log-level info` with `args`.
fn start(server: &Rabbit, queue: &str, args: &[&str]) -> Service {
    Service::start_on(&server.url(), &[&["--stream", queue][..], args].concat())
}

/// A real RabbitMQ for the conformance suite: the shared server, one queue per broker.
struct Amqp(&'static Rabbit);

/// The ack deadline of the conformance brokers: long enough for a round trip and the
/// harness's slack, short enough to keep the suite fast. The leases are local deadlines on
/// the real clock, so a pass of two thirds of it leaves a third for the thread to be
/// scheduled: 600 ms left 100 ms, and a lease expired before its extension once while the
/// soak and the alarm tests ran their own brokers beside the suite.
const CONFORMANCE_DEADLINE: Duration = Duration::from_secs(2);

impl conformance::Harness for Amqp {
    type Broker = AmqpSource;

    fn broker(&self, max_attempts: u32) -> AmqpSource {
        self.0.source(
            &self.0.queue("conformance"),
            CONFORMANCE_DEADLINE,
            max_attempts,
        )
    }

    fn deadline(&self) -> Duration {
        CONFORMANCE_DEADLINE
    }

    fn pass(&self, _broker: &AmqpSource, by: Duration) {
        // The source requeues an expired lease on its worker's next tick (every 50 ms).
        thread::sleep(by + Duration::from_millis(100));
    }

    fn reserved(&self) -> &'static [&'static str] {
        &["x-mayhem-ordering-key", "x-death"]
    }

    fn ids_optional(&self) -> bool {
        true
    }
}

conformance_tests!(Rabbit::get().map(Amqp));

#[test]
fn nacks_past_max_attempts_go_to_the_dead_letter_queue() {
    let Some(server) = Rabbit::get() else { return };
    let (_, source) = scenarios::nacks_past_max_attempts_are_dead_lettered(server);
    assert_eq!(source.stats().remaining, 0);
}

#[test]
fn a_dropped_source_gives_its_leases_back() {
    if let Some(server) = Rabbit::get() {
        scenarios::a_dropped_source_s_lease_comes_back(server, 5);
    }
}

#[test]
fn two_instances_share_the_work_and_ack_each_message_once() {
    scenarios::two_instances_share_the_work_and_ack_each_message_once(Rabbit::get());
}

#[test]
fn a_killed_instance_s_messages_are_redelivered_to_the_other() {
    scenarios::a_killed_instance_s_messages_are_handled_by_the_other(Rabbit::get());
}

#[test]
fn sigterm_gives_everything_back_within_the_grace_period() {
    let Some(server) = Rabbit::get() else { return };
    let (queue, back, report) = scenarios::sigterm_gives_back_within_the_grace_period(server);
    // Every message not acked is back in the queue: a new consumer gets them all.
    let source = server.source(&queue, Duration::from_secs(60), 5);
    let leases = pull_all(&source, back);
    // The messages that were leased come back as a second attempt (the ones only
    // prefetched too: on RabbitMQ 3.10 every give-back counts); the rest were never sent.
    let again = leases.iter().filter(|lease| lease.attempt == 2).count();
    let attempts: Vec<u32> = leases.iter().map(|lease| lease.attempt).collect();
    assert!(
        again >= back - 10,
        "{again} of {back}: {attempts:?} {report}"
    );
    assert!(leases.iter().all(|lease| lease.attempt <= 2));
    let ids: Vec<u64> = leases.iter().map(|lease| lease.id).collect();
    assert!(conformance::ack(&source, &ids).is_empty());
}

#[test]
fn messages_handled_and_failing_every_time_are_dead_lettered_by_the_service() {
    scenarios::messages_failing_every_time_are_dead_lettered_by_the_service(Rabbit::get(), 10, 3);
}

#[test]
fn the_password_never_reaches_the_log() {
    let Some(server) = Rabbit::get() else { return };
    // A wrong password: the broker refuses it for good, and the service says so and exits 1.
    let url = format!("amqp://guest:s3cretpw@127.0.0.1:{}/%2f", server.port);
    let flags = ["--reconnect-limit", "1s", "--log-level", "debug"];
    let child = common::run(&[&["--source", &url][..], &flags].concat());
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert!(!child.status.success(), "{stderr}");
    assert!(!stderr.contains("s3cretpw"), "{stderr}");
    assert!(stderr.contains("guest:***@"), "{stderr}");
}

#[test]
fn a_queue_name_rabbitmq_would_refuse_is_bad_input_before_connecting() {
    // No server needed: nothing listens on port 9, and the name must be refused first,
    // as bad input (exit 2, one line naming it), by the service and by publish alike.
    // RabbitMQ keeps names starting with `amq.` for itself (ACCESS_REFUSED), and the
    // source's names are at most 200 bytes (its dead-letter exchange adds `:dead`).
    let long = "q".repeat(201);
    for stream in ["amq.restarts", long.as_str()] {
        for publish in [false, true] {
            let mut args = vec![];
            if publish {
                args.push("publish");
            }
            args.extend([
                "--source",
                "amqp://guest:guest@127.0.0.1:9/%2f",
                "--stream",
                stream,
                "--reconnect-limit",
                "1s",
            ]);
            if publish {
                args.push("web-03");
            }
            let output = common::run(&args);
            let text = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{args:?}: {text}");
            assert_eq!(text.trim_end().lines().count(), 1, "{text}");
            assert!(
                text.contains(&format!("'{stream}'")) && text.contains("--stream"),
                "{text}"
            );
            assert!(output.stdout.is_empty());
        }
    }
}

#[test]
fn a_refusal_retrying_cannot_cure_ends_the_start_at_once() {
    let Some(server) = Rabbit::get() else { return };
    let port = server.port;
    for (url, stream, refusal) in [
        (
            format!("amqp://guest:s3cretpw@127.0.0.1:{port}/%2f"),
            "mayhem",
            "ACCESS_REFUSED",
        ),
        (
            format!("amqp://guest:guest@127.0.0.1:{port}/nosuchvhost"),
            "mayhem",
            "NOT_ALLOWED",
        ),
    ] {
        scenarios::refused_at_once(&url, &["--stream", stream], refusal, "s3cretpw");
    }
}

/// A queue another program declared first, as pika's tutorial does: classic, not durable,
/// no dead-letter exchange, no delivery count. The service's own declare is refused
/// (`PRECONDITION_FAILED`); it used to end the start there, with exit 1. Now the queue is
/// consumed as it is: the source counts the deliveries it gave back, and publishes each dead
/// letter to `{queue}:dead` itself (the broker would drop a rejected message), with its
/// data, id, headers, reason and attempt.
#[test]
fn a_queue_another_program_declared_is_consumed_as_it_is_and_nothing_is_dropped() {
    let Some(server) = Rabbit::get() else { return };
    let queue = server.queue("adopted");
    let name = queue.as_str();
    server.with_lapin(|channel| async move {
        channel
            .queue_declare(name.into(), Default::default(), Default::default())
            .await
            .expect("declare a classic queue");
    });
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "origin".into(),
        lapin::types::AMQPValue::LongString(b"lapin"[..].into()),
    );
    server.publish_with_lapin(
        &queue,
        [
            (&b"web-01"[..], lapin::BasicProperties::default()),
            (
                &b"web-02"[..],
                lapin::BasicProperties::default()
                    .with_message_id("m-2".into())
                    .with_headers(headers),
            ),
            (&b"not a host!"[..], lapin::BasicProperties::default()),
        ],
    );
    // Every restart fails: each host is handled twice, then dead-lettered.
    let service = start(
        server,
        &queue,
        &[
            "--publishers",
            "0",
            "--messages",
            "3",
            "--max-attempts",
            "2",
            "--restart-failure-rate",
            "1",
            "--save-failure-rate",
            "0",
            "--handler-latency",
            "0",
            "--report",
            "json",
        ],
    );
    let (status, _, lines, report) = service.finish();
    let log = lines.join("\n");
    assert!(status.success(), "{status:?}\n{log}");
    assert_eq!(
        count_said(&lines, "exists with other arguments"),
        1,
        "{log}"
    );
    for (name, want) in [
        ("consumed", 5.0),
        ("redelivered", 2.0),
        ("nacked", 4.0),
        ("acked", 0.0),
        ("rejected", 1.0),
        ("dead_lettered", 3.0),
        ("remaining", 0.0),
    ] {
        assert_eq!(field(&report, name), want, "{name}: {report}");
    }
    let dead = format!("{queue}:dead");
    let mut letters = Vec::new();
    let mut left = None;
    server.with_lapin(|channel| {
        let (dead, queue, letters, left) = (&dead, &queue, &mut letters, &mut left);
        async move {
            let no_ack = lapin::options::BasicGetOptions { no_ack: true };
            while let Some(got) = channel
                .basic_get(dead.as_str().into(), no_ack)
                .await
                .expect("get a dead letter")
            {
                let properties = &got.delivery.properties;
                let header = |key: &str| {
                    properties.headers().as_ref().and_then(|headers| {
                        headers.inner().iter().find_map(|(k, v)| match v {
                            lapin::types::AMQPValue::LongString(text) if k.as_str() == key => {
                                Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
                            }
                            _ => None,
                        })
                    })
                };
                letters.push((
                    String::from_utf8_lossy(&got.delivery.data).into_owned(),
                    properties.message_id().as_ref().map(|id| id.to_string()),
                    header("origin"),
                    header("mayhem_attempt"),
                    header("mayhem_dead_reason").unwrap_or_default(),
                ));
            }
            let passive = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let state = channel
                .queue_declare(queue.as_str().into(), passive, Default::default())
                .await
                .expect("the queue is still there");
            *left = Some(state.message_count());
        }
    });
    letters.sort();
    assert_eq!(left, Some(0), "{letters:?}");
    assert_eq!(letters.len(), 3, "{letters:?}");
    let two = Some("2".to_owned());
    assert_eq!(letters[0].0, "not a host!", "{letters:?}");
    assert_eq!(letters[0].3, Some("1".to_owned()), "{letters:?}");
    assert!(letters[0].4.contains("not a host name"), "{letters:?}");
    assert_eq!(
        (&letters[1].0[..], &letters[1].3, &letters[1].4[..]),
        ("web-01", &two, "delivered 2 times"),
        "{letters:?}"
    );
    assert_eq!(
        (
            &letters[2].0[..],
            letters[2].1.as_deref(),
            letters[2].2.as_deref()
        ),
        ("web-02", Some("m-2"), Some("lapin")),
        "{letters:?}"
    );
    assert_eq!(letters[2].3, two, "{letters:?}");
}

#[test]
fn a_lost_connection_is_reopened_and_nothing_is_lost() {
    let Some(server) = Rabbit::get() else { return };
    let proxy = Proxy::start(server);
    scenarios::an_outage_loses_nothing(server, &proxy.url(), |service| {
        proxy.cut();
        service.wait_for("unavailable");
        // Down for a few reconnection attempts.
        thread::sleep(Duration::from_millis(500));
        proxy.restore();
        service.wait_for("reconnected to amqp");
    });
}

#[test]
fn confirms_outstanding_at_an_interrupt_are_still_awaited() {
    let Some(server) = Rabbit::get() else { return };
    let queue = server.queue("interrupted");
    let source = server.source(&queue, Duration::from_secs(60), 5);
    let mut rng = fastrand::Rng::with_seed(5);
    for _ in 0..3 {
        let batch: Vec<PubSubMessage> = (0..100).map(|_| PubSubMessage::random(&mut rng)).collect();
        source.publish(&batch).expect("publish");
    }
    Publish::interrupt(&source);
    let late = [PubSubMessage::random(&mut rng)];
    assert!(matches!(
        source.publish(&late),
        Err(mayhem::SourceError::Closed)
    ));
    assert_eq!(source.wait_confirmed(PATIENCE), 0);
    assert_eq!(source.stats().published, 300);
}

#[test]
fn messages_no_decoding_can_read_are_dead_lettered_and_counted_once() {
    // Each was counted twice in `dead_lettered`: once when pulled, once when its dead
    // letter was sent. Any other producer's message is a message: no id, binary data, an
    // id that is not a UUID.
    let Some(server) = Rabbit::get() else { return };
    let queue = server.queue("foreign");
    let source = server.source(&queue, Duration::from_secs(60), 5);
    let not_utf8 = |properties: lapin::BasicProperties| {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            "origin".into(),
            lapin::types::AMQPValue::LongString(b"\xff\xfe"[..].into()),
        );
        properties.with_headers(headers)
    };
    server.publish_with_lapin(
        &queue,
        [
            (
                &b"cattle-abcd"[..],
                not_utf8(lapin::BasicProperties::default()),
            ),
            (
                &b"\xff\xfe"[..],
                not_utf8(
                    lapin::BasicProperties::default()
                        .with_message_id("00000000-0000-0000-0000-000000000001".into()),
                ),
            ),
            (
                &b"cattle-abcd"[..],
                not_utf8(lapin::BasicProperties::default().with_message_id("not-a-uuid".into())),
            ),
        ],
    );
    wait_for_dead_letters_after_pulls(&source, 3);
    let stats = source.stats();
    assert_eq!(
        (stats.dead_lettered, stats.undecodable),
        (3, 3),
        "{stats:?}"
    );
    assert_eq!(source.settled(), 3);
}

#[test]
fn any_producer_s_message_is_read_whole() {
    let Some(server) = Rabbit::get() else { return };
    let queue = server.queue("anyproducer");
    let source = server.source(&queue, Duration::from_secs(60), 5);
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "origin".into(),
        lapin::types::AMQPValue::LongString(b"ops"[..].into()),
    );
    headers.insert("count".into(), lapin::types::AMQPValue::LongInt(7));
    server.publish_with_lapin(
        &queue,
        [
            (&b"\0\xff binary"[..], lapin::BasicProperties::default()),
            (
                &b"web-01"[..],
                lapin::BasicProperties::default()
                    .with_message_id("not-a-uuid".into())
                    .with_timestamp(1_700_000_000)
                    .with_headers(headers),
            ),
        ],
    );
    let leases = pull_all(&source, 2);
    let (first, second) = (&leases[0].message, &leases[1].message);
    assert_eq!(first.data(), b"\0\xff binary");
    assert!(first.id().is_empty(), "RabbitMQ has no ids of its own");
    assert_eq!(first.publish_time(), None);
    assert_eq!(second.data(), b"web-01");
    assert_eq!(second.id().to_string(), "not-a-uuid");
    assert_eq!(second.attributes().get("origin"), Some("ops"));
    assert_eq!(second.attributes().get("count"), Some("7"));
    assert_eq!(
        second.publish_time(),
        Some(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
    );
    let ids: Vec<_> = leases.iter().map(|lease| lease.id).collect();
    assert!(conformance::ack(&source, &ids).is_empty());
}

/// A queue full under `x-overflow: reject-publish` nacks what is published to it. Each
/// refusal used to be taken for a lost connection: the source reconnected and sent again at
/// once, two log lines every 60 ms, and as each reconnection ended the outage, the
/// reconnect limit never ran out. Now the batch waits a backoff on the same connection,
/// and the refusals end the wait at the reconnect limit, not at the caller's timeout.
#[test]
fn a_full_queue_refusing_publishes_is_retried_on_the_same_connection_until_the_limit() {
    let Some(server) = Rabbit::get() else { return };
    let queue = server.queue("capped");
    server.cap(&queue, 2);
    let source = AmqpSource::connect(AmqpConfig {
        reconnect_limit: Duration::from_secs(1),
        ..config(&server.url(), &queue)
    })
    .expect("connect");
    let batch = |from: u128, count: u128| -> Vec<PubSubMessage> {
        (from..from + count)
            .map(|i| PubSubMessage::new(format!("web-{i}")).with_id(mayhem::Uuid::from_u128(i)))
            .collect()
    };
    // A quorum queue applies its length limit late (it took a batch of 10 over a limit of
    // 2 here): the limit holds from the next batch on.
    source
        .publish(&batch(1, 10))
        .expect("publish past the limit");
    assert_eq!(source.wait_confirmed(PATIENCE), 0);
    source
        .publish(&batch(11, 3))
        .expect("publish to the full queue");
    let started = Instant::now();
    let timeout = Duration::from_secs(120);
    assert_eq!(source.wait_confirmed(timeout), 3);
    let waited = started.elapsed();
    assert!(waited < timeout / 2, "waited {waited:?}");
    assert_eq!(source.stats().published, 10);
}

/// A run of `--messages N` whose publishes the broker refuses for a while (a queue full
/// under `reject-publish`, drained by slow handlers) settles its N: the publisher, its
/// budget spent, sends the refused batches again until they are confirmed. Before, they
/// waited for a next publish that never came, and the run never ended.
#[test]
fn a_counted_run_settles_every_message_the_broker_refused_for_a_while() {
    let Some(server) = Rabbit::get() else { return };
    let queue = server.queue("refusing");
    server.cap(&queue, 50);
    let service = start(
        server,
        &queue,
        &[
            &NO_FAILURES[..],
            &["--messages", "600", "--publish-interval", "0"],
            &["--handler-latency", "20ms", "--max-in-flight", "10"],
            &["--stats-interval", "0", "--report", "json"],
        ]
        .concat(),
    )
    .with_patience(Duration::from_secs(60));
    let (status, _, lines, stdout) = service.finish();
    let refused = count_said(&lines, "the broker refused a published message");
    assert_eq!(status.code(), Some(0), "{}", lines.join("\n"));
    assert!(
        refused >= 1,
        "the queue never refused: {}",
        lines.join("\n")
    );
    assert!(stdout.contains("\"reason\":\"completed\""), "{stdout}");
    // At least once: a refused batch is sent again whole, so some may be handled twice.
    assert!(field(&stdout, "acked") >= 600.0, "{stdout}");
}

/// Pulls (which dead-letters what is not a message) until the dead-letter queue holds
/// `count`.
fn wait_for_dead_letters_after_pulls(source: &AmqpSource, count: u64) {
    let end = Instant::now() + PATIENCE;
    loop {
        let mut leases = Vec::new();
        source
            .pull(10, Duration::from_millis(100), &mut leases)
            .expect("pull");
        assert!(leases.is_empty(), "{} messages pulled", leases.len());
        if source.dead_letter_count() == Ok(count) && source.settled() >= count {
            return;
        }
        assert!(
            Instant::now() < end,
            "dead letters: {:?}, settled {}",
            source.dead_letter_count(),
            source.settled()
        );
    }
}

#[test]
fn remaining_keeps_the_broker_s_last_count_while_it_does_not_answer() {
    // A broker that did not answer made `remaining` (the report's, and `/metrics`'s
    // `mayhem_remaining`) read 0, as if the queue had drained.
    let Some(server) = Rabbit::get() else { return };
    let queue = server.queue("remaining");
    let proxy = Proxy::start(server);
    let source = AmqpSource::connect(config(&proxy.url(), &queue)).expect("connect");
    source
        .publish(&numbered_batches(1)[0][..5])
        .expect("publish");
    assert_eq!(source.wait_confirmed(PATIENCE), 0);
    let end = Instant::now() + PATIENCE;
    while source.stats().remaining != 5 {
        assert!(Instant::now() < end, "{:?}", source.stats());
        thread::sleep(Duration::from_millis(20));
    }
    proxy.cut();
    assert_eq!(source.stats().remaining, 5);
}

#[test]
fn unconfirmed_batches_are_sent_again_after_a_lost_connection() {
    let Some(server) = Rabbit::get() else { return };
    let queue = server.queue("unconfirmed");
    let proxy = Proxy::start(server);
    let publisher = AmqpSource::connect(config(&proxy.url(), &queue)).expect("connect");
    let batches = numbered_batches(5);
    // Three batches go out and their confirms are not awaited; the connection is cut under
    // them, and the next publish reconnects once the proxy is back.
    for batch in &batches[..3] {
        publisher.publish(batch).expect("publish");
    }
    proxy.cut();
    let restorer = thread::spawn({
        let down = Arc::clone(&proxy.down);
        move || {
            thread::sleep(Duration::from_millis(300));
            down.store(false, Ordering::SeqCst);
        }
    });
    for batch in &batches[3..] {
        publisher
            .publish(batch)
            .expect("publish after the reconnection");
    }
    assert_eq!(publisher.wait_confirmed(PATIENCE), 0);
    restorer.join().expect("the restorer");
    // Every message arrives at least once.
    let want: Vec<PubSubMessage> = batches.iter().flatten().cloned().collect();
    consume_until(&server.source(&queue, Duration::from_secs(60), 5), &want);
}

/// `count` batches of 200 messages with ids of their own.
fn numbered_batches(count: u128) -> Vec<Vec<PubSubMessage>> {
    (0..count)
        .map(|batch| {
            (0..200u128)
                .map(|i| {
                    let id = mayhem::Uuid::from_u128(batch * 1000 + i + 1);
                    let name = format!("cattle-{batch}{i:03}");
                    PubSubMessage::new(name.to_string()).with_id(id)
                })
                .collect()
        })
        .collect()
}

/// What a consumer must see of a published message: its id and data (the broker adds the
/// publish time).
fn content(message: &PubSubMessage) -> (mayhem::MessageId, mayhem::Bytes) {
    (message.id().clone(), message.data_bytes())
}

/// Consumes through `consumer`, acking, until every message of `want` arrived; returns every
/// delivery, duplicates included, sorted by message id.
fn consume_until(consumer: &AmqpSource, want: &[PubSubMessage]) -> Vec<PubSubMessage> {
    let mut want = want.to_vec();
    want.sort_by_key(|message| message.id().clone());
    let mut seen = Vec::new();
    let end = Instant::now() + PATIENCE;
    loop {
        let mut leases = Vec::new();
        consumer
            .pull(500, Duration::from_millis(200), &mut leases)
            .expect("pull");
        let ids: Vec<_> = leases.iter().map(|lease| lease.id).collect();
        assert!(conformance::ack(consumer, &ids).is_empty());
        seen.extend(leases.into_iter().map(|lease| lease.message));
        seen.sort_by_key(|message| message.id().clone());
        let mut distinct: Vec<_> = seen.iter().map(content).collect();
        distinct.dedup();
        if distinct == want.iter().map(content).collect::<Vec<_>>() {
            return seen;
        }
        assert!(
            Instant::now() < end,
            "{} of {} messages arrived",
            distinct.len(),
            want.len()
        );
    }
}

#[test]
fn batches_take_the_publishing_connections_in_turn_and_each_message_arrives_once() {
    let Some(server) = Rabbit::get() else { return };
    let queue = server.queue("lanes");
    let proxy = Proxy::start(server);
    let publisher = AmqpSource::connect(AmqpConfig {
        url: proxy.url(),
        queue: queue.clone(),
        publish_connections: 3,
        ..AmqpConfig::default()
    })
    .expect("connect");
    // Connecting opens the consuming connection; the publishing ones open at their first
    // batch (inside `publish`, so none is on its way once `connect` returned).
    assert_eq!(proxy.connections(1), 1);
    let batches = numbered_batches(6);
    for batch in &batches {
        publisher.publish(batch).expect("publish");
    }
    assert_eq!(publisher.wait_confirmed(PATIENCE), 0);
    assert_eq!(proxy.connections(4), 4);
    // `published` counts the confirmed messages of every connection.
    assert_eq!(publisher.stats().published, 1200);
    // Without a lost connection nothing is sent twice.
    let want: Vec<PubSubMessage> = batches.iter().flatten().cloned().collect();
    let seen = consume_until(&server.source(&queue, Duration::from_secs(60), 5), &want);
    assert_eq!(seen.len(), want.len());
}

#[test]
fn a_queue_deleted_under_the_publisher_is_declared_again_and_nothing_vanishes() {
    let Some(server) = Rabbit::get() else { return };
    let queue = server.queue("deleted");
    let publisher = AmqpSource::connect(AmqpConfig {
        url: server.url(),
        queue: queue.clone(),
        publish_connections: 1,
        ..AmqpConfig::default()
    })
    .expect("connect");
    let batches = numbered_batches(4);
    publisher.publish(&batches[0]).expect("publish");
    assert_eq!(publisher.wait_confirmed(PATIENCE), 0);
    // Deleted behind the service's back, with the first batch in it: the later batches
    // must not be confirmed into nowhere.
    server.ctl(&["delete_queue", &queue]);
    for batch in &batches[1..] {
        publisher.publish(batch).expect("publish");
    }
    assert_eq!(publisher.wait_confirmed(PATIENCE), 0);
    let want: Vec<PubSubMessage> = batches[1..].iter().flatten().cloned().collect();
    consume_until(&server.source(&queue, Duration::from_secs(60), 5), &want);
}

#[test]
fn publish_connections_out_of_range_are_refused() {
    for count in [0, mayhem::source::amqp::MAX_PUBLISH_CONNECTIONS + 1] {
        let refused = AmqpSource::connect(AmqpConfig {
            url: "amqp://guest:guest@127.0.0.1:1/%2f".to_owned(),
            publish_connections: count,
            ..AmqpConfig::default()
        });
        assert!(
            matches!(&refused, Err(mayhem::SourceError::Backend(text)) if text.contains(&format!("publish connections {count}"))),
            "{refused:?}"
        );
    }
}

/// The shared server's TLS listener, or `None` (said loudly, and a failure under
/// `MAYHEM_REQUIRE_AMQP=1`) when `openssl` could not make its certificates.
#[cfg(feature = "amqp-tls")]
fn tls(server: &Rabbit) -> Option<&common::rabbit::Tls> {
    server
        .tls
        .as_ref()
        .map_err(|reason| common::skip(reason))
        .ok()
}

#[cfg(feature = "amqp-tls")]
#[test]
fn amqps_publishes_and_consumes_trusting_a_private_ca() {
    let Some(server) = Rabbit::get() else { return };
    let Some(tls) = tls(server) else { return };
    let queue = server.queue("tls");
    let config = AmqpConfig {
        url: format!("amqps://guest:s3cret-not-used@127.0.0.1:{}/%2f", tls.port),
        queue: queue.clone(),
        reconnect_limit: Duration::from_millis(500),
        ..AmqpConfig::default()
    };
    // Without the CA the broker's certificate is not trusted: no connection.
    match AmqpSource::connect(config.clone()) {
        Err(mayhem::SourceError::Unavailable(text)) => {
            assert!(text.contains("certificate"), "{text}");
            assert!(!text.contains("s3cret"), "{text}");
        }
        other => panic!("connected without trusting the CA: {other:?}"),
    }
    let source = AmqpSource::connect(AmqpConfig {
        url: format!("amqps://guest:guest@127.0.0.1:{}/%2f", tls.port),
        ca_file: Some(tls.ca.clone()),
        reconnect_limit: Duration::from_secs(10),
        ack_deadline: Duration::from_secs(60),
        ..config
    })
    .expect("connect through amqps");
    let sent = conformance::publish(&source, 50, 11);
    // Each arrived, once.
    assert_eq!(consume_until(&source, &sent).len(), sent.len());
    assert_eq!(source.stats().remaining, 0);
}

#[cfg(feature = "amqp-tls")]
#[test]
fn the_service_runs_over_amqps() {
    let Some(server) = Rabbit::get() else { return };
    let Some(tls) = tls(server) else { return };
    let queue = server.queue("tlssvc");
    let ca = tls.ca.to_str().expect("a utf-8 path");
    let url = format!("amqps://guest:guest@127.0.0.1:{}/%2f", tls.port);
    let flags = [
        "--amqp-ca-file",
        ca,
        "--stream",
        &queue,
        "--handler-latency",
        "0",
    ];
    let more = [
        "--messages",
        "40",
        "--publishers",
        "1",
        "--publish-interval",
        "0",
    ];
    let service = Service::start_on(&url, &[&flags[..], &more, &common::QUIET[2..]].concat());
    let (status, _, lines, report) = service.finish();
    assert!(status.success(), "{status}: {}", lines.join("\n"));
    assert_eq!(field(&report, "acked"), 40.0, "{report}");
}

/// Runs the service through a proxy with `--reconnect-limit 1s`, breaks the proxy with
/// `fault` once it consumes, and checks that it exits 1 within `within`, saying it gave up.
fn gives_up_after_the_limit(fault: impl FnOnce(&Proxy), within: Duration) {
    let Some(server) = Rabbit::get() else { return };
    let proxy = Proxy::start(server);
    let gave_up = "unavailable for more than 1s";
    scenarios::gives_up_after_the_limit(server, &proxy.url(), || fault(&proxy), gave_up, within);
}

#[test]
fn the_service_gives_up_after_the_reconnect_limit() {
    gives_up_after_the_limit(Proxy::cut, Duration::from_secs(10));
}

#[test]
fn the_last_report_of_a_lone_instance_balances() {
    scenarios::the_last_report_of_a_lone_instance_balances(Rabbit::get());
}

#[test]
fn a_stalled_broker_is_found_out_and_the_service_gives_up_after_the_reconnect_limit() {
    // A broker that stops answering without closing its connections was noticed only by
    // RabbitMQ's default heartbeat of 60 s: a consuming instance went on for two minutes
    // and more before `--reconnect-limit` even began to count. Now: two heartbeats of 5 s,
    // a connection attempt that times out after 5 s, the limit of 1 s, and margin.
    gives_up_after_the_limit(Proxy::stall, Duration::from_secs(25));
}

#[test]
fn messages_a_clean_stop_pushes_past_the_delivery_limit_are_dead_lettered_not_dropped() {
    // Found by the soak: on RabbitMQ 3.10 every give-back of a clean stop counts as a
    // delivery, and the quorum queue dead-lettered at most once, so the messages it pushed
    // past the limit while the broker was stopping vanished (200 of 200 here).
    let Some(server) = Rabbit::own("deadletters") else {
        return;
    };
    let queue = server.queue("limit");
    let names = server.publish_names(&queue, 200, 1);
    for _ in 0..2 {
        // Held unacked by a consumer, then given back by a clean stop of the broker.
        let holder = server.source(&queue, Duration::from_secs(600), 1);
        pull_all(&holder, names.len());
        server.stop();
        server.restart();
        drop(holder);
    }
    let probe = server.source(&queue, Duration::from_secs(600), 1);
    let end = Instant::now() + PATIENCE;
    loop {
        let dead = probe.dead_letter_count().unwrap_or(0);
        let ready = probe.stats().remaining;
        // At least: dead-lettering is at least once (`x-dead-letter-strategy
        // at-least-once`), and a stop in the middle of it once made 201 of 200.
        if ready + dead >= names.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < end,
            "{ready} ready and {dead} dead-lettered of {}",
            names.len()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_resource_alarm_blocks_publishing_but_not_consuming() {
    let Some(server) = Rabbit::own("alarm") else {
        return;
    };
    let queue = server.queue("alarm");
    let names = server.publish_names(&queue, 200, 5);
    // A memory alarm: the broker blocks every connection that publishes.
    server.ctl(&["set_vm_memory_high_watermark", "0.00001"]);
    let mut service = start(
        &server,
        &queue,
        &[
            &NO_FAILURES[..],
            &["--publish-interval", "1ms", "--report", "json"],
        ]
        .concat(),
    );
    service.wait_for("blocked publishing");
    // The consuming connection is not a publishing one: the preloaded messages are all
    // handled and acked while publishing is blocked.
    wait_all_acked(&mut service, &names);
    // A second instance stopped while the alarm blocks its publishing exits within its
    // grace period, saying how many stayed unconfirmed (it used to wait 10 s for lapin to
    // write a batch sent again, until the watchdog ended it with exit 1).
    let blocked_at = Instant::now();
    let mut second = start(
        &server,
        &queue,
        &[
            &NO_FAILURES[..],
            &["--publish-interval", "1ms", "--grace-period", "1s"],
        ]
        .concat(),
    );
    second.wait_for("blocked publishing");
    let stopped = Instant::now();
    second.signal("TERM");
    let (status, _, lines, _) = second.finish();
    assert!(status.success(), "{status}: {}", lines.join("\n"));
    assert!(
        stopped.elapsed() < Duration::from_secs(4),
        "{:?}",
        stopped.elapsed()
    );
    // Blocked longer than a publish waits for its confirms (10 s): a blocked broker is no
    // lost connection, so nothing is reconnected or sent again meanwhile.
    thread::sleep(Duration::from_secs(11).saturating_sub(blocked_at.elapsed()));
    server.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    service.wait_for("unblocked publishing");
    // Publishing resumes: messages published after the alarm are handled too.
    let acked_before = acked_names(service.lines()).len();
    service.wait_for_count("Done. Acked", acked_before + 20);
    service.signal("TERM");
    let (status, _, lines, report) = service.finish();
    assert!(status.success(), "{status}: {}", lines.join("\n"));
    let unavailable: Vec<&String> = lines.iter().filter(|l| l.contains("unavailable")).collect();
    assert!(unavailable.is_empty(), "{unavailable:?}");
    assert_eq!(field(&report, "stale_acks"), 0.0, "{report}");
}

#[test]
fn a_server_restarted_mid_run_loses_nothing() {
    let Some(server) = Rabbit::own("restart") else {
        return;
    };
    // The durable queue keeps what was not acked.
    scenarios::an_outage_loses_nothing(&server, &server.url(), |service| {
        restart_under(service, &server, "unavailable", "reconnected to amqp");
    });
}

#[test]
fn a_fast_amqp_soak_with_fixed_seeds_loses_nothing() {
    // The fast subset of `make soak`'s RabbitMQ runs: two fixed seeds, three waves each, run
    // side by side (each has its own server and instances). Together they inject every kind
    // of fault once: seed 1 stops the broker and starts it again, SIGKILLs an instance and
    // raises a memory alarm; seed 45 publishes foreign messages, freezes the broker and
    // SIGTERMs an instance, on a queue it declared first as a classic one (another program's
    // queue, consumed as it is).
    if !Rabbit::installed() {
        return;
    }
    let mut faults = Vec::new();
    for (seed, outcome) in run_seeds(&[1, 45], |seed| {
        amqp_soak::run(env!("CARGO_BIN_EXE_mayhem"), seed, 3)
    }) {
        eprintln!("seed {seed}: {outcome:?}");
        faults.extend(outcome.fault_names.iter().copied());
        assert!(
            outcome.problems.is_empty(),
            "seed {seed}: {:#?}",
            outcome.problems
        );
        assert!(outcome.published > 0);
        assert!(outcome.faults > 0, "seed {seed}: no fault");
        assert_eq!(outcome.adopted, seed == 45, "seed {seed}: {outcome:?}");
        // A message may be both acked and dead-lettered (an ack lost with the broker, then
        // the delivery limit), so the sum may pass the published count, never fall short.
        assert!(
            outcome.acked + outcome.dead >= outcome.published,
            "seed {seed}: {outcome:?}"
        );
    }
    faults.sort_unstable();
    assert_eq!(faults.len(), 6, "{faults:?}");
    faults.dedup();
    assert_eq!(faults.len(), 6, "not every kind of fault: {faults:?}");
}

#[test]
fn mayhem_publish_sends_data_attributes_and_ids_a_consumer_reads_back() {
    let Some(server) = Rabbit::get() else { return };
    let queue = server.queue("cli-publish");
    let flags = ["--attribute", "origin=ops", "--ordering-key", "web"];
    let args = [
        &["--stream", &queue][..],
        &flags,
        &["web-03", "db-7.eu-west"],
    ]
    .concat();
    let (code, stdout, stderr) = run_publish(&server.url(), &args, None);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    // One id per line, printed once the broker confirmed the messages.
    let ids = printed_ids(&stdout);
    assert_eq!(ids.len(), 2, "{stdout}");
    // The queue was declared as the service declares it (default --max-attempts 5).
    let consumer = server.source(&queue, Duration::from_secs(30), 5);
    for (id, data) in ids.iter().zip(["web-03", "db-7.eu-west"]) {
        let lease = pull_one(&consumer);
        let message = &lease.message;
        assert_eq!(message.id().to_string(), *id);
        assert_eq!(message.id().as_uuid().map(|u| u.get_version_num()), Some(4));
        assert_eq!(message.data(), data.as_bytes());
        assert_eq!(message.attributes().get("origin"), Some("ops"));
        assert_eq!(message.attributes().len(), 1);
        assert_eq!(message.ordering_key(), Some("web"));
        assert!(message.publish_time().is_some());
        assert!(conformance::ack(&consumer, &[lease.id]).is_empty());
    }
}

#[cfg(feature = "amqp-tls")]
#[test]
fn mayhem_publish_over_amqps_publishes_the_lines_of_stdin() {
    let Some(server) = Rabbit::get() else { return };
    let Some(tls) = tls(server) else { return };
    let queue = server.queue("cli-publish-tls");
    let url = format!("amqps://guest:guest@127.0.0.1:{}/%2f", tls.port);
    let ca = ["--amqp-ca-file", tls.ca.to_str().expect("a utf-8 path")];
    let flags = [
        &ca[..],
        &["--stream", &queue, "--attribute", "origin=stdin"],
    ]
    .concat();
    let (code, stdout, stderr) = run_publish(&url, &flags, Some(b"web-05\n\nweb-06"));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    let ids = printed_ids(&stdout);
    assert_eq!(ids.len(), 2, "{stdout}");
    let consumer = server.source(&queue, Duration::from_secs(30), 5);
    for (id, data) in ids.iter().zip(["web-05", "web-06"]) {
        let lease = pull_one(&consumer);
        assert_eq!(lease.message.id().to_string(), *id);
        assert_eq!(lease.message.data(), data.as_bytes());
        assert_eq!(lease.message.attributes().get("origin"), Some("stdin"));
        assert!(conformance::ack(&consumer, &[lease.id]).is_empty());
    }
}

#[test]
fn mayhem_publish_exits_1_in_one_line_on_a_refusal_or_an_unreachable_broker() {
    // Nobody listens on a port just freed: no broker needed.
    let nowhere = format!("amqp://guest:s3cretpw@127.0.0.1:{}/%2f", free_port());
    let run = |url: &str, limit| {
        scenarios::publish_fails(url, &["--reconnect-limit", limit], Some("s3cretpw"))
    };
    let (took, stderr) = run(&nowhere, "1s");
    assert!(stderr.contains("unavailable"), "{stderr}");
    assert!(
        (Duration::from_secs(1)..Duration::from_secs(5)).contains(&took),
        "took {took:?}"
    );
    // Refused credentials end it at once, not after the 60 s of the limit.
    let Some(server) = Rabbit::get() else { return };
    let refused = format!("amqp://guest:s3cretpw@127.0.0.1:{}/%2f", server.port);
    let (took, stderr) = run(&refused, "60s");
    assert!(stderr.contains("ACCESS_REFUSED"), "{stderr}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

/// Acks behind a straggler wait for it (one `multiple` frame covers them once it settles);
/// the connection drops meanwhile. Whatever the timing (the acks still held back, or sent
/// one by one past the bound), every message ends acked or back in the queue: the broker
/// delivers again each one whose ack it did not take, the source counts those acks as late
/// refusals, and the straggler's own ack, on a lost channel, is refused.
#[test]
fn a_straggler_holding_the_ack_prefix_back_while_the_connection_drops_loses_nothing() {
    let Some(server) = Rabbit::get() else { return };
    let queue = server.queue("straggler");
    let names = server.publish_names(&queue, 50, 5);
    let proxy = Proxy::start(server);
    let source = AmqpSource::connect(AmqpConfig {
        ack_deadline: Duration::from_secs(60),
        ..config(&proxy.url(), &queue)
    })
    .expect("connect");
    let leases = pull_all(&source, names.len());
    // The first delivery is the straggler: the other 49 are acked behind it, and the
    // connection is cut at once.
    let mut refused = Vec::new();
    let behind: Vec<_> = leases[1..].iter().map(|lease| lease.id).collect();
    source.ack(&behind, &mut refused).expect("ack");
    assert!(refused.is_empty(), "{refused:?}");
    proxy.cut();
    // Held back, then sent alone past the bound into a dead connection, or void once the
    // source sees it lost: either way answered.
    assert_eq!(source.flush(PATIENCE), 0);
    proxy.restore();
    let mut straggler_refused = Vec::new();
    source
        .ack(&[leases[0].id], &mut straggler_refused)
        .expect("ack");
    assert_eq!(source.flush(PATIENCE), 0);
    let settled = source.settled();
    let late = source.stats().late_refusals;
    assert_eq!(
        settled + late + straggler_refused.len() as u64,
        50,
        "each of the 50 acks is counted once: settled, refused late, or refused at once"
    );
    eprintln!(
        "{settled} acks sent, {late} refused late, {} refused at once",
        straggler_refused.len()
    );
    drop(source);
    // What the broker did not take comes back, to another consumer: nothing is lost.
    let reader = server.source(&queue, Duration::from_secs(60), 5);
    let mut back = Vec::new();
    let end = Instant::now() + PATIENCE;
    // At least the straggler, and every message whose ack did not reach the broker.
    let want = (50 - settled) as usize;
    while back.len() < want {
        assert!(
            Instant::now() < end,
            "{} of {want} came back ({settled} acks sent, {late} refused late)",
            back.len()
        );
        reader
            .pull(names.len(), Duration::from_millis(100), &mut back)
            .expect("pull");
    }
    // An ack written just as the connection died may not have reached the broker: its
    // message comes back too (at least once). Takes whatever else comes.
    reader
        .pull(names.len(), Duration::from_millis(500), &mut back)
        .expect("pull");
    let ids: Vec<_> = back.iter().map(|lease| lease.id).collect();
    reader.ack(&ids, &mut refused).expect("ack");
    assert_eq!(reader.flush(PATIENCE), 0);
    let first = leases[0].message.id().clone();
    assert!(
        back.iter().any(|lease| *lease.message.id() == first),
        "the straggler never came back"
    );
    for lease in &back {
        let name = std::str::from_utf8(lease.message.data()).expect("utf-8");
        assert!(
            names.iter().any(|n| n == name),
            "{name} was never published"
        );
    }
    Source::interrupt(&reader);
    assert_eq!(
        reader.stats().remaining,
        0,
        "messages left over: some came back twice"
    );
}

/// A handler that never ends holds the acks behind it back only briefly: past the bound they
/// go one frame each, and the broker has them while the straggler is still held.
#[test]
fn a_straggler_holds_the_acks_behind_it_back_only_briefly() {
    let Some(server) = Rabbit::get() else { return };
    let queue = server.queue("straggler-bound");
    let names = server.publish_names(&queue, 20, 5);
    let source = server.source(&queue, Duration::from_secs(60), 5);
    let leases = pull_all(&source, names.len());
    let mut refused = Vec::new();
    let behind: Vec<_> = leases[1..].iter().map(|lease| lease.id).collect();
    source.ack(&behind, &mut refused).expect("ack");
    assert!(refused.is_empty(), "{refused:?}");
    // `flush` returns once every queued ack is written: the held-back ones included.
    assert_eq!(source.flush(PATIENCE), 0);
    assert_eq!(source.settled(), 19);
    // The straggler settles last; the broker then holds nothing of the queue.
    source.ack(&[leases[0].id], &mut refused).expect("ack");
    assert_eq!(source.flush(PATIENCE), 0);
    assert_eq!(source.settled(), 20);
    assert!(refused.is_empty(), "{refused:?}");
    Source::interrupt(&source);
    assert_eq!(source.stats().remaining, 0);
}
