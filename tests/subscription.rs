//! The lease state machine of the in-memory pub/sub, driven by a manual clock.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use mayhem::{
    Lease, LeaseError, ManualClock, PubSubMessage, Source, SourceError, Subscription,
    SubscriptionConfig,
};

const DEADLINE: Duration = Duration::from_secs(3);

fn setup(max_attempts: u32) -> (Subscription, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let config = SubscriptionConfig {
        ack_deadline: DEADLINE,
        max_attempts,
        max_backlog: 100,
    };
    (Subscription::with_clock(config, clock.clone()), clock)
}

fn publish(sub: &Subscription, count: usize, seed: u64) -> Vec<PubSubMessage> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..count)
        .map(|_| {
            let message = PubSubMessage::random(&mut rng);
            sub.publish(message).unwrap();
            message
        })
        .collect()
}

fn pull(sub: &Subscription, max: usize) -> Vec<Lease> {
    let mut out = Vec::new();
    sub.pull(max, Duration::ZERO, &mut out).unwrap();
    out
}

#[test]
fn ack_removes_the_message() {
    let (sub, _clock) = setup(5);
    let sent = publish(&sub, 2, 1);
    let leases = pull(&sub, 10);
    assert_eq!(leases.len(), 2);
    assert_eq!(leases[0].message, sent[0]);
    assert_eq!(leases[0].attempt, 1);
    sub.ack(leases[0].id).unwrap();
    sub.ack(leases[1].id).unwrap();
    let stats = sub.stats();
    assert_eq!(
        (
            stats.published,
            stats.delivered,
            stats.acked,
            stats.remaining
        ),
        (2, 2, 2, 0)
    );
    assert!(pull(&sub, 10).is_empty());
}

#[test]
fn a_leased_message_is_not_delivered_twice() {
    let (sub, _clock) = setup(5);
    publish(&sub, 1, 2);
    assert_eq!(pull(&sub, 10).len(), 1);
    assert!(pull(&sub, 10).is_empty());
    assert_eq!(sub.stats().remaining, 1);
}

#[test]
fn nack_redelivers_with_the_attempt_counted() {
    let (sub, _clock) = setup(5);
    let sent = publish(&sub, 1, 3);
    let first = pull(&sub, 1)[0];
    sub.nack(first.id).unwrap();
    let second = pull(&sub, 1)[0];
    assert_eq!(second.message, sent[0]);
    assert_eq!(second.attempt, 2);
    assert_ne!(second.id, first.id);
    let stats = sub.stats();
    assert_eq!(
        (stats.nacked, stats.redelivered, stats.delivered),
        (1, 1, 2)
    );
}

#[test]
fn an_expired_lease_is_redelivered_and_its_ack_refused() {
    let (sub, clock) = setup(5);
    publish(&sub, 1, 4);
    let lease = pull(&sub, 1)[0];
    clock.advance(DEADLINE);
    assert_eq!(sub.ack(lease.id), Err(LeaseError::Expired));
    let stats = sub.stats();
    assert_eq!((stats.expired, stats.stale_acks, stats.acked), (1, 1, 0));
    let again = pull(&sub, 1)[0];
    assert_eq!(again.attempt, 2);
    sub.ack(again.id).unwrap();
    assert_eq!(sub.stats().remaining, 0);
}

#[test]
fn a_lease_just_before_its_deadline_is_still_held() {
    let (sub, clock) = setup(5);
    publish(&sub, 1, 5);
    let lease = pull(&sub, 1)[0];
    clock.advance(DEADLINE - Duration::from_millis(1));
    sub.ack(lease.id).unwrap();
    assert_eq!(sub.stats().expired, 0);
}

#[test]
fn extension_keeps_the_lease() {
    let (sub, clock) = setup(5);
    publish(&sub, 1, 6);
    let lease = pull(&sub, 1)[0];
    for _ in 0..5 {
        clock.advance(Duration::from_secs(2));
        sub.extend(lease.id, DEADLINE).unwrap();
        assert!(
            pull(&sub, 1).is_empty(),
            "an extended lease must not be redelivered"
        );
    }
    sub.ack(lease.id).unwrap();
    let stats = sub.stats();
    assert_eq!((stats.extended, stats.expired, stats.acked), (5, 0, 1));
}

#[test]
fn extending_an_expired_lease_is_refused() {
    let (sub, clock) = setup(5);
    publish(&sub, 1, 7);
    let lease = pull(&sub, 1)[0];
    clock.advance(DEADLINE + Duration::from_secs(1));
    assert_eq!(sub.extend(lease.id, DEADLINE), Err(LeaseError::Expired));
    assert_eq!(sub.nack(lease.id), Err(LeaseError::Expired));
    assert_eq!(sub.stats().expired, 1);
}

#[test]
fn expiry_is_noticed_by_a_pull_without_touching_the_lease() {
    let (sub, clock) = setup(5);
    publish(&sub, 3, 8);
    let leases = pull(&sub, 3);
    sub.ack(leases[1].id).unwrap();
    clock.advance(DEADLINE);
    let again = pull(&sub, 10);
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|lease| lease.attempt == 2));
    assert_eq!(sub.stats().expired, 2);
}

#[test]
fn messages_over_max_attempts_are_dead_lettered() {
    let (sub, clock) = setup(3);
    let sent = publish(&sub, 1, 9);
    // Attempt 1 nacked, attempt 2 expires, attempt 3 nacked: dead.
    sub.nack(pull(&sub, 1)[0].id).unwrap();
    assert_eq!(pull(&sub, 1)[0].attempt, 2);
    clock.advance(DEADLINE);
    let third = pull(&sub, 1)[0];
    assert_eq!(third.attempt, 3);
    sub.nack(third.id).unwrap();
    assert!(pull(&sub, 1).is_empty());
    let stats = sub.stats();
    assert_eq!(
        (stats.dead_lettered, stats.remaining, sub.settled()),
        (1, 0, 1)
    );
    let dead = sub.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].message, dead[0].attempts), (sent[0], 3));
    assert_eq!(
        stats.published,
        stats.acked + stats.dead_lettered + stats.remaining
    );
}

#[test]
fn a_stale_lease_id_cannot_settle_the_next_delivery() {
    let (sub, _clock) = setup(5);
    publish(&sub, 1, 10);
    let first = pull(&sub, 1)[0];
    sub.nack(first.id).unwrap();
    let second = pull(&sub, 1)[0];
    assert_eq!(sub.ack(first.id), Err(LeaseError::Expired));
    sub.ack(second.id).unwrap();
    assert_eq!(sub.stats().acked, 1);
}

#[test]
fn nack_all_gives_every_lease_back() {
    let (sub, _clock) = setup(5);
    publish(&sub, 4, 11);
    assert_eq!(pull(&sub, 3).len(), 3);
    assert_eq!(sub.nack_all(), 3);
    assert_eq!(pull(&sub, 10).len(), 4);
}

#[test]
fn interrupt_wakes_a_blocked_pull() {
    let (sub, _clock) = setup(5);
    let puller = {
        let sub = sub.clone();
        thread::spawn(move || sub.pull(1, Duration::from_secs(3600), &mut Vec::new()))
    };
    // Whether the pull blocked already or not, it must end with `Closed`.
    sub.interrupt();
    assert_eq!(puller.join().unwrap(), Err(SourceError::Closed));
    // Settling keeps working after an interrupt.
    assert_eq!(
        sub.publish(PubSubMessage::random(&mut fastrand::Rng::with_seed(1))),
        Err(SourceError::Closed)
    );
}

#[test]
fn interrupt_wakes_a_publisher_blocked_by_a_full_backlog() {
    let clock = Arc::new(ManualClock::new());
    let config = SubscriptionConfig {
        ack_deadline: DEADLINE,
        max_attempts: 5,
        max_backlog: 2,
    };
    let sub = Subscription::with_clock(config, clock);
    publish(&sub, 2, 12);
    let publisher = {
        let sub = sub.clone();
        thread::spawn(move || sub.publish(PubSubMessage::random(&mut fastrand::Rng::with_seed(2))))
    };
    sub.interrupt();
    assert_eq!(publisher.join().unwrap(), Err(SourceError::Closed));
    assert_eq!(sub.stats().published, 2);
}

#[test]
fn a_pull_makes_room_for_a_blocked_publisher() {
    let clock = Arc::new(ManualClock::new());
    let config = SubscriptionConfig {
        ack_deadline: DEADLINE,
        max_attempts: 5,
        max_backlog: 1,
    };
    let sub = Subscription::with_clock(config, clock);
    publish(&sub, 1, 13);
    let publisher = {
        let sub = sub.clone();
        thread::spawn(move || sub.publish(PubSubMessage::random(&mut fastrand::Rng::with_seed(3))))
    };
    let mut got = pull(&sub, 1);
    // The second message arrives once the publisher got room; a blocking pull waits for it.
    sub.pull(1, Duration::from_secs(60), &mut got).unwrap();
    assert_eq!(got.len(), 2);
    publisher.join().unwrap().unwrap();
}

#[test]
fn a_pull_with_a_wait_returns_empty_when_nothing_comes() {
    let (sub, _clock) = setup(5);
    let mut out = Vec::new();
    sub.pull(5, Duration::from_millis(5), &mut out).unwrap();
    assert!(out.is_empty());
}
