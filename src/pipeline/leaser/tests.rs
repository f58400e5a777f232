//! Unit tests of the lease manager: the automatic deadline, and acks spanning shards.

use std::sync::Arc;

use super::settings::{AUTO_MAX_DEADLINE, AUTO_MIN_DEADLINE};
use super::*;
use crate::{ManualClock, Publish, Subscription, SubscriptionConfig};

const DEADLINE: Duration = Duration::from_secs(3);

#[test]
fn the_automatic_deadline_follows_the_p99_within_its_bounds() {
    let subscription = Subscription::new(SubscriptionConfig {
        ack_deadline: Duration::from_secs(10),
        max_attempts: 5,
        max_backlog: 100,
    });
    let metrics = Metrics::default();
    let settings = LeaseSettings {
        ack_deadline: Duration::from_secs(10),
        auto: true,
        extend_interval: Duration::from_secs(2),
        max_lease: Duration::from_secs(3600),
    };
    let leaser = Leaser::new(&subscription, &metrics, 10, usize::MAX, 1, settings);
    // No handling time yet: the least deadline, extended with a third of it left.
    leaser.follow_handling_times();
    assert_eq!(leaser.deadline(), AUTO_MIN_DEADLINE);
    assert_eq!(settings.margin(leaser.deadline()), AUTO_MIN_DEADLINE / 3);
    // Short handlers keep the least deadline.
    for _ in 0..100 {
        metrics.record_latency(Duration::from_millis(700));
    }
    leaser.follow_handling_times();
    assert_eq!(leaser.deadline(), AUTO_MIN_DEADLINE);
    // Long ones: the p99 (a bucket bound, at most 1/16 above), in whole seconds.
    for _ in 0..1000 {
        metrics.record_latency(Duration::from_secs(30));
    }
    leaser.follow_handling_times();
    let deadline = leaser.deadline();
    assert!(
        (Duration::from_secs(30)..=Duration::from_secs(32)).contains(&deadline),
        "{deadline:?}"
    );
    assert_eq!(deadline.subsec_nanos(), 0);
    assert_eq!(settings.period(deadline), deadline / 6);
    // Never above 10 minutes.
    for _ in 0..100_000 {
        metrics.record_latency(Duration::from_secs(3600));
    }
    leaser.follow_handling_times();
    assert_eq!(leaser.deadline(), AUTO_MAX_DEADLINE);
}

#[test]
fn a_buffer_of_acks_spanning_shards_reports_each_lease() {
    let clock = Arc::new(ManualClock::new());
    let config = SubscriptionConfig {
        ack_deadline: DEADLINE,
        max_attempts: 5,
        max_backlog: 100,
    };
    let subscription = Subscription::with_clock(config, clock.clone());
    let mut rng = fastrand::Rng::with_seed(3);
    let envelopes: Vec<PubSubMessage> = (0..3).map(|_| PubSubMessage::random(&mut rng)).collect();
    subscription.publish(&envelopes).unwrap();
    let metrics = Metrics::default();
    let settings = LeaseSettings {
        ack_deadline: DEADLINE,
        auto: false,
        extend_interval: Duration::from_secs(1),
        max_lease: Duration::from_secs(3600),
    };
    let leaser = Leaser::new(&subscription, &metrics, 10, usize::MAX, 1, settings);
    // Two pulls, two shards: the first pull's leases expire at the source before the
    // acks, the second's do not.
    let mut guards = Vec::new();
    for count in [2, 1] {
        assert_eq!(leaser.gate().acquire(count), count);
        let mut leases = Vec::new();
        subscription
            .pull(count, Duration::ZERO, &mut leases)
            .unwrap();
        assert_eq!(leases.len(), count);
        leaser.admit(leases.into_iter(), Instant::now(), &mut guards);
        clock.advance(DEADLINE - Duration::from_secs(1));
    }
    assert_ne!(guards[0].shard, guards[2].shard);
    // Interleaved, so that the shards alternate within the buffer.
    let order = [0, 2, 1];
    let mut slots: Vec<Option<LeaseGuard<'_>>> = guards.into_iter().map(Some).collect();
    let mut batch: Vec<Finished<'_>> = order
        .iter()
        .map(|&index| Finished {
            guard: slots[index].take().unwrap(),
            handed: Instant::now(),
            spawned: Instant::now(),
        })
        .collect();
    let mut outcomes = Vec::new();
    leaser.ack_all(&mut batch, &mut outcomes);
    assert_eq!(outcomes, [Settle::Refused, Settle::Done, Settle::Refused]);
    let report = metrics.report(&crate::source::SourceStats::default());
    assert_eq!((report.acked, report.stale_acks), (1, 2), "{report:?}");
    assert_eq!(leaser.held(), 0, "every lease left the table");
    assert_eq!(
        leaser.gate().in_flight(),
        3,
        "the guards still hold their permits"
    );
    drop(batch);
    assert_eq!(leaser.gate().in_flight(), 0);
}
