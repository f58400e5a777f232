//! The lease state machine of the in-memory pub/sub, driven by a manual clock: the shared
//! conformance suite, then what only the in-memory broker has (backlog, dead-letter list).

mod conformance;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use mayhem::{
    Lease, ManualClock, PubSubMessage, Publish, Source, SourceError, Subscription,
    SubscriptionConfig,
};

const DEADLINE: Duration = Duration::from_secs(3);

/// The in-memory broker on a manual clock: time passes only when a test says so.
struct Memory {
    /// The clock of every broker this harness makes.
    clock: Arc<ManualClock>,
}

impl conformance::Harness for Memory {
    type Broker = Subscription;

    fn broker(&self, max_attempts: u32) -> Subscription {
        let config = SubscriptionConfig {
            ack_deadline: DEADLINE,
            max_attempts,
            max_backlog: 100,
        };
        Subscription::with_clock(config, self.clock.clone())
    }

    fn deadline(&self) -> Duration {
        DEADLINE
    }

    fn pass(&self, _broker: &Subscription, by: Duration) {
        self.clock.advance(by);
    }

    fn pull_wait(&self) -> Duration {
        Duration::ZERO
    }
}

conformance_tests!(Some(Memory {
    clock: Arc::new(ManualClock::new())
}));

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
    conformance::publish(sub, count, seed)
}

fn pull(sub: &Subscription, max: usize) -> Vec<Lease> {
    let mut out = Vec::new();
    sub.pull(max, Duration::ZERO, &mut out).unwrap();
    out
}

fn ack(sub: &Subscription, lease: &Lease) -> bool {
    conformance::ack(sub, &[lease.id]).is_empty()
}

fn nack(sub: &Subscription, lease: &Lease) -> bool {
    conformance::nack(sub, &[lease.id]).is_empty()
}

fn one(_sub: &Subscription, seed: u64) -> PubSubMessage {
    PubSubMessage::random(&mut fastrand::Rng::with_seed(seed))
}

#[test]
fn a_lease_just_before_its_deadline_is_still_held() {
    let (sub, clock) = setup(5);
    publish(&sub, 1, 5);
    let lease = pull(&sub, 1).remove(0);
    clock.advance(DEADLINE - Duration::from_millis(1));
    assert!(ack(&sub, &lease));
    assert_eq!(sub.stats().expired, 0);
}

#[test]
fn expiry_is_noticed_by_a_pull_without_touching_the_lease() {
    let (sub, clock) = setup(5);
    publish(&sub, 3, 8);
    let leases = pull(&sub, 3);
    assert!(ack(&sub, &leases[1]));
    clock.advance(DEADLINE);
    let again = pull(&sub, 10);
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|lease| lease.attempt == 2));
    assert_eq!(sub.stats().expired, 2);
}

#[test]
fn dead_letters_keep_the_message_and_its_attempts() {
    let (sub, clock) = setup(3);
    let sent = publish(&sub, 1, 9);
    assert!(nack(&sub, &pull(&sub, 1)[0]));
    assert_eq!(pull(&sub, 1)[0].attempt, 2);
    clock.advance(DEADLINE);
    let third = pull(&sub, 1).remove(0);
    assert_eq!(third.attempt, 3);
    assert!(nack(&sub, &third));
    let stats = sub.stats();
    let dead = sub.dead_letters();
    assert_eq!(dead.len(), 1);
    conformance::assert_same(&dead[0].message, &sent[0]);
    assert_eq!((dead[0].attempts, dead[0].reason.as_deref()), (3, None));
    assert_eq!(
        stats.published,
        sub.settled() + stats.remaining,
        "every published message is settled or still there"
    );
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
    Source::interrupt(&sub);
    assert_eq!(puller.join().unwrap(), Err(SourceError::Closed));
    assert_eq!(sub.publish(&[one(&sub, 1)]), Err(SourceError::Closed));
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
        thread::spawn(move || sub.publish(&[one(&sub, 2)]))
    };
    Publish::interrupt(&sub);
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
        thread::spawn(move || sub.publish(&[one(&sub, 3)]))
    };
    let mut got = pull(&sub, 1);
    // The second message arrives once the publisher got room; a blocking pull waits for it.
    sub.pull(1, Duration::from_secs(60), &mut got).unwrap();
    assert_eq!(got.len(), 2);
    publisher.join().unwrap().unwrap();
}

#[test]
fn a_batch_larger_than_the_backlog_is_published_as_room_is_made() {
    let clock = Arc::new(ManualClock::new());
    let config = SubscriptionConfig {
        ack_deadline: DEADLINE,
        max_attempts: 5,
        max_backlog: 4,
    };
    let sub = Subscription::with_clock(config, clock);
    let publisher = {
        let sub = sub.clone();
        thread::spawn(move || publish(&sub, 10, 14))
    };
    let mut got = Vec::new();
    while got.len() < 10 {
        sub.pull(10, Duration::from_secs(60), &mut got).unwrap();
    }
    let sent = publisher.join().unwrap();
    assert_eq!(got.len(), sent.len());
    for (lease, sent) in got.iter().zip(&sent) {
        conformance::assert_same(&lease.message, sent);
    }
}

#[test]
fn a_pull_with_a_wait_returns_empty_when_nothing_comes() {
    let (sub, _clock) = setup(5);
    let mut out = Vec::new();
    sub.pull(5, Duration::from_millis(5), &mut out).unwrap();
    assert!(out.is_empty());
}
