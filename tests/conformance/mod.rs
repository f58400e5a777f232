//! The `Source` conformance suite: the lease semantics every broker must have, written once
//! and run against each broker (`tests/subscription.rs` runs it on the in-memory pub/sub,
//! `tests/redis.rs` on a real Redis).
//!
//! A broker is brought in through a [`Harness`]; [`conformance_tests!`] expands to one
//! `#[test]` per behaviour.

#![allow(dead_code)]

use std::time::Duration;

use mayhem::{Attributes, Lease, LeaseId, PubSubMessage, Publish, Source, SourceError};

/// What the suite needs of a broker.
pub trait Harness {
    /// The broker client under test: it publishes and consumes.
    type Broker: Source + Publish;

    /// A fresh, empty broker whose leases last [`Harness::deadline`] and whose messages are
    /// dead-lettered after `max_attempts` deliveries.
    fn broker(&self, max_attempts: u32) -> Self::Broker;

    /// The ack deadline of the brokers this harness makes.
    fn deadline(&self) -> Duration;

    /// Lets `by` pass for the broker's leases (a manual clock moves; a real broker waits).
    fn pass(&self, broker: &Self::Broker, by: Duration);

    /// How long a pull may wait for messages that are there (a remote broker needs a round
    /// trip; a local one none).
    fn pull_wait(&self) -> Duration {
        Duration::from_millis(500)
    }

    /// The attribute keys the broker's wire format reserves (refused when publishing).
    fn reserved(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether a message published without an id may be consumed without one (a broker
    /// with no ids of its own).
    fn ids_optional(&self) -> bool {
        false
    }
}

/// Asserts that a consumed message is the published one: the same id, data, attributes and
/// ordering key (the broker adds the publish time), and that it has a publish time.
#[track_caller]
pub fn assert_same(got: &PubSubMessage, sent: &PubSubMessage) {
    assert_eq!(
        (got.id(), got.data(), got.attributes(), got.ordering_key()),
        (
            sent.id(),
            sent.data(),
            sent.attributes(),
            sent.ordering_key()
        )
    );
    assert!(got.publish_time().is_some(), "no publish time: {got:?}");
}

/// Publishes `count` messages drawn from `seed`, in one batch; returns them.
pub fn publish<B: Publish + ?Sized>(broker: &B, count: usize, seed: u64) -> Vec<PubSubMessage> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let sent: Vec<PubSubMessage> = (0..count)
        .map(|_| PubSubMessage::random(&mut rng))
        .collect();
    broker.publish(&sent).expect("publish");
    assert_eq!(
        broker.wait_confirmed(Duration::from_secs(10)),
        0,
        "published messages left unconfirmed"
    );
    sent
}

/// Pulls until `want` leases came or the harness's pull wait passed with nothing new.
pub fn pull<H: Harness>(harness: &H, broker: &H::Broker, want: usize) -> Vec<Lease> {
    let mut out = Vec::new();
    while out.len() < want {
        let before = out.len();
        broker
            .pull(want - out.len(), harness.pull_wait(), &mut out)
            .expect("pull");
        if out.len() == before {
            break;
        }
    }
    out
}

/// Pulls without waiting: for "nothing is there" checks. (A wait would let the deadlines of
/// the leases a test holds run on.)
pub fn pull_none<H: Harness>(_harness: &H, broker: &H::Broker) -> Vec<Lease> {
    let mut out = Vec::new();
    broker.pull(10, Duration::ZERO, &mut out).expect("pull");
    out
}

/// Acks leases; returns the refused ones.
pub fn ack(broker: &impl Source, ids: &[LeaseId]) -> Vec<LeaseId> {
    let mut refused = Vec::new();
    broker.ack(ids, &mut refused).expect("ack");
    broker.flush(Duration::from_secs(5));
    refused
}

/// Nacks leases; returns the refused ones.
pub fn nack(broker: &impl Source, ids: &[LeaseId]) -> Vec<LeaseId> {
    let mut refused = Vec::new();
    broker.nack(ids, &mut refused).expect("nack");
    broker.flush(Duration::from_secs(5));
    refused
}

/// Extends leases by `by`; returns the refused ones.
pub fn extend(broker: &impl Source, ids: &[LeaseId], by: Duration) -> Vec<LeaseId> {
    let mut refused = Vec::new();
    broker.extend(ids, by, &mut refused).expect("extend");
    broker.flush(Duration::from_secs(5));
    refused
}

pub fn ack_removes_the_message<H: Harness>(h: &H) {
    let b = h.broker(5);
    let sent = publish(&b, 2, 1);
    let leases = pull(h, &b, 2);
    assert_eq!(leases.len(), 2);
    assert_same(&leases[0].message, &sent[0]);
    assert_same(&leases[1].message, &sent[1]);
    assert!(leases.iter().all(|lease| lease.attempt == 1));
    assert!(ack(&b, &[leases[0].id, leases[1].id]).is_empty());
    assert_eq!(b.settled(), 2);
    assert_eq!(b.stats().remaining, 0);
    assert!(pull_none(h, &b).is_empty());
}

pub fn a_leased_message_is_not_delivered_twice<H: Harness>(h: &H) {
    let b = h.broker(5);
    publish(&b, 1, 2);
    assert_eq!(pull(h, &b, 1).len(), 1);
    assert!(pull_none(h, &b).is_empty());
    assert_eq!(b.stats().remaining, 1);
}

pub fn nack_redelivers_with_the_attempt_counted<H: Harness>(h: &H) {
    let b = h.broker(5);
    let sent = publish(&b, 1, 3);
    let first = pull(h, &b, 1).remove(0);
    assert!(nack(&b, &[first.id]).is_empty());
    let second = pull(h, &b, 1).remove(0);
    assert_same(&second.message, &sent[0]);
    assert_eq!(second.attempt, 2);
    assert_ne!(second.id, first.id);
}

pub fn an_expired_lease_is_redelivered_and_its_ack_refused<H: Harness>(h: &H) {
    let b = h.broker(5);
    publish(&b, 1, 4);
    let lease = pull(h, &b, 1).remove(0);
    h.pass(&b, h.deadline());
    let again = pull(h, &b, 1).remove(0);
    assert_same(&again.message, &lease.message);
    assert_eq!(again.attempt, 2);
    assert_eq!(ack(&b, &[lease.id]), [lease.id], "a stale ack is refused");
    assert!(ack(&b, &[again.id]).is_empty());
    assert_eq!(b.stats().remaining, 0);
    assert!(b.stats().expired >= 1);
}

pub fn extension_keeps_the_lease<H: Harness>(h: &H) {
    let b = h.broker(5);
    publish(&b, 1, 6);
    let lease = pull(h, &b, 1).remove(0);
    for _ in 0..3 {
        h.pass(&b, h.deadline() * 2 / 3);
        assert!(extend(&b, &[lease.id], h.deadline()).is_empty());
    }
    assert!(
        pull_none(h, &b).is_empty(),
        "an extended lease must not be redelivered"
    );
    assert!(ack(&b, &[lease.id]).is_empty());
    assert_eq!(b.stats().expired, 0);
    assert_eq!(b.settled(), 1);
}

pub fn extending_an_expired_lease_is_refused<H: Harness>(h: &H) {
    let b = h.broker(5);
    publish(&b, 1, 7);
    let lease = pull(h, &b, 1).remove(0);
    h.pass(&b, h.deadline() + h.deadline() / 2);
    assert_eq!(extend(&b, &[lease.id], h.deadline()), [lease.id]);
    assert_eq!(nack(&b, &[lease.id]), [lease.id]);
}

pub fn messages_over_max_attempts_are_dead_lettered<H: Harness>(h: &H) {
    let b = h.broker(3);
    publish(&b, 1, 9);
    // Attempt 1 nacked, attempt 2 expires, attempt 3 nacked: dead.
    let first = pull(h, &b, 1).remove(0);
    assert!(nack(&b, &[first.id]).is_empty());
    let second = pull(h, &b, 1).remove(0);
    assert_eq!(second.attempt, 2);
    h.pass(&b, h.deadline());
    let third = pull(h, &b, 1).remove(0);
    assert_eq!(third.attempt, 3);
    assert!(nack(&b, &[third.id]).is_empty());
    assert!(pull_none(h, &b).is_empty());
    let stats = b.stats();
    assert_eq!(
        (stats.dead_lettered, stats.remaining, b.settled()),
        (1, 0, 1)
    );
}

pub fn a_rejected_message_is_dead_lettered_at_once<H: Harness>(h: &H) {
    let b = h.broker(5);
    publish(&b, 2, 10);
    let leases = pull(h, &b, 2);
    assert_eq!(leases[0].attempt, 1);
    let mut refused = Vec::new();
    b.reject(leases[0].id, "data is not a host name", &mut refused)
        .expect("reject");
    assert!(refused.is_empty());
    // A second rejection of the same lease is refused: it is not held any more.
    b.reject(leases[0].id, "again", &mut refused)
        .expect("reject");
    assert_eq!(refused, [leases[0].id]);
    assert!(ack(&b, &[leases[1].id]).is_empty());
    assert!(
        pull_none(h, &b).is_empty(),
        "a rejected message is not retried"
    );
    let stats = b.stats();
    assert_eq!(
        (stats.dead_lettered, stats.remaining, b.settled()),
        (1, 0, 2)
    );
}

pub fn a_stale_lease_id_cannot_settle_the_next_delivery<H: Harness>(h: &H) {
    let b = h.broker(5);
    publish(&b, 1, 10);
    let first = pull(h, &b, 1).remove(0);
    assert!(nack(&b, &[first.id]).is_empty());
    let second = pull(h, &b, 1).remove(0);
    assert_eq!(ack(&b, &[first.id]), [first.id]);
    assert!(ack(&b, &[second.id]).is_empty());
    assert_eq!(b.settled(), 1);
}

pub fn a_batch_settles_what_is_held_and_refuses_the_rest<H: Harness>(h: &H) {
    let b = h.broker(5);
    publish(&b, 3, 11);
    let leases = pull(h, &b, 3);
    assert_eq!(leases.len(), 3);
    assert!(ack(&b, &[leases[0].id]).is_empty());
    // One acked already, two held: the batch settles the two and refuses the first.
    let ids = [leases[0].id, leases[1].id, leases[2].id];
    assert_eq!(ack(&b, &ids), [leases[0].id]);
    assert_eq!(b.settled(), 3);
    assert_eq!(b.stats().remaining, 0);
}

pub fn a_batch_extension_keeps_every_lease<H: Harness>(h: &H) {
    let b = h.broker(5);
    publish(&b, 20, 12);
    let leases = pull(h, &b, 20);
    assert_eq!(leases.len(), 20);
    let ids: Vec<LeaseId> = leases.iter().map(|lease| lease.id).collect();
    h.pass(&b, h.deadline() * 2 / 3);
    assert!(extend(&b, &ids, h.deadline()).is_empty());
    h.pass(&b, h.deadline() * 2 / 3);
    assert!(pull_none(h, &b).is_empty());
    assert!(nack(&b, &ids).is_empty());
    let again = pull(h, &b, 20);
    assert_eq!(again.len(), 20);
    assert!(again.iter().all(|lease| lease.attempt == 2));
}

pub fn attributes_travel_with_the_message<H: Harness>(h: &H) {
    let b = h.broker(5);
    let message = PubSubMessage::random(&mut fastrand::Rng::with_seed(13));
    let attributes: Attributes = [("origin", "billing"), ("trace", "7f3a")]
        .into_iter()
        .collect();
    let message = message.with_attributes(attributes);
    b.publish(std::slice::from_ref(&message)).expect("publish");
    let lease = pull(h, &b, 1).remove(0);
    assert_same(&lease.message, &message);
    let got = lease.message.attributes();
    assert_eq!(got.get("origin"), Some("billing"));
    assert_eq!(got.get("trace"), Some("7f3a"));
    assert_eq!(got.len(), 2);
    // A redelivery carries them too, and the same id and publish time.
    assert!(nack(&b, &[lease.id]).is_empty());
    let again = pull(h, &b, 1).remove(0);
    assert_same(&again.message, &message);
    assert_eq!(again.message.publish_time(), lease.message.publish_time());
    assert_eq!(again.message.attributes().get("origin"), Some("billing"));
}

/// Any data travels byte for byte (NUL bytes, invalid UTF-8, 1 MiB), with an ordering key;
/// a message whose data is empty and has no id gets one from the broker.
pub fn any_payload_travels_byte_for_byte<H: Harness>(h: &H) {
    let b = h.broker(5);
    let mut big = vec![0u8; 1 << 20];
    fastrand::Rng::with_seed(5).fill(&mut big);
    let sent = [
        PubSubMessage::new(&b"\0\xff\xfe not utf-8 \0"[..])
            .with_id("bin-1")
            .with_ordering_key("key-1"),
        PubSubMessage::new(big).with_id("big-1"),
        PubSubMessage::new("web-01"),
    ];
    b.publish(&sent).expect("publish");
    assert_eq!(b.wait_confirmed(Duration::from_secs(10)), 0);
    let leases = pull(h, &b, 3);
    assert_same(&leases[0].message, &sent[0]);
    assert_same(&leases[1].message, &sent[1]);
    assert_eq!(leases[2].message.data(), b"web-01");
    assert!(!leases[2].message.id().is_empty() || h.ids_optional());
    let ids: Vec<LeaseId> = leases.iter().map(|lease| lease.id).collect();
    assert!(ack(&b, &ids).is_empty());
}

/// Pub/Sub's limits and the broker's reserved names are refused when publishing, before
/// anything is sent.
pub fn over_the_limits_is_refused_when_publishing<H: Harness>(h: &H) {
    let b = h.broker(5);
    let over = PubSubMessage::new("x").with_attribute("k", "v".repeat(1025));
    let error = b.publish(&[over]).unwrap_err();
    assert!(matches!(error, SourceError::Message(_)), "{error}");
    for key in h.reserved() {
        let reserved = PubSubMessage::new("x").with_attribute(*key, "v");
        let error = b.publish(&[reserved]).unwrap_err();
        assert!(error.to_string().contains("reserved"), "{key}: {error}");
    }
    assert_eq!(b.stats().published, 0);
}

pub fn interrupt_ends_pulls_but_not_settling<H: Harness>(h: &H) {
    let b = h.broker(5);
    publish(&b, 1, 14);
    let lease = pull(h, &b, 1).remove(0);
    Source::interrupt(&b);
    assert_eq!(
        b.pull(1, Duration::from_secs(3600), &mut Vec::new()),
        Err(SourceError::Closed)
    );
    assert!(ack(&b, &[lease.id]).is_empty());
    assert_eq!(b.settled(), 1);
}

/// One `#[test]` per behaviour of the suite, each on a harness built by `$harness`.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@each $harness;
            ack_removes_the_message,
            a_leased_message_is_not_delivered_twice,
            nack_redelivers_with_the_attempt_counted,
            an_expired_lease_is_redelivered_and_its_ack_refused,
            extension_keeps_the_lease,
            extending_an_expired_lease_is_refused,
            messages_over_max_attempts_are_dead_lettered,
            a_stale_lease_id_cannot_settle_the_next_delivery,
            a_batch_settles_what_is_held_and_refuses_the_rest,
            a_batch_extension_keeps_every_lease,
            attributes_travel_with_the_message,
            any_payload_travels_byte_for_byte,
            over_the_limits_is_refused_when_publishing,
            a_rejected_message_is_dead_lettered_at_once,
            interrupt_ends_pulls_but_not_settling
        );
    };
    (@each $harness:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                if let Some(harness) = $harness {
                    conformance::$name(&harness);
                }
            }
        )*
    };
}
