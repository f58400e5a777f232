//! `--messages N`: the run is complete once its publishers published N messages and N
//! messages are settled.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::shutdown::{Shutdown, ShutdownReason};
use crate::source::Source;

/// Triggers the shutdown once the run's publishers published the target number of messages
/// and the source has settled as many.
///
/// Its own type, shared by the consumers (which check after each pull: expired leases may
/// dead-letter the last messages without any handler running) and the handler tasks (which
/// check after each settle).
#[derive(Clone, Copy)]
pub(crate) struct Completion<'a> {
    /// Whose settled count is checked.
    pub(crate) source: &'a dyn Source,
    /// What is triggered.
    pub(crate) shutdown: &'a Shutdown,
    /// `--messages N`; `None` never completes.
    pub(crate) target: Option<u64>,
    /// Messages the run's publishers published (each counted once its publish returned);
    /// `None` when the run has no publishers. A source's settled count may include messages
    /// the run did not publish (entries already in a Redis stream, foreign entries
    /// dead-lettered, another instance's messages), so it alone cannot say that the run's
    /// own N were published.
    pub(crate) published: Option<&'a AtomicU64>,
}

impl Completion<'_> {
    /// Triggers the shutdown if the target is reached: the source settled N messages, and
    /// the run's publishers (if any) published N.
    pub(crate) fn check(&self) {
        let Some(target) = self.target else { return };
        let published = self
            .published
            .map_or(target, |published| published.load(Ordering::SeqCst));
        if published >= target && self.source.settled() >= target {
            self.shutdown.trigger(ShutdownReason::Completed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::PubSubMessage;
    use crate::source::memory::{Subscription, SubscriptionConfig};
    use crate::source::Publish;
    use std::time::Duration;

    /// A subscription whose one message was settled (acked), so `settled()` is 1.
    fn one_settled() -> Subscription {
        let source = Subscription::new(SubscriptionConfig::default());
        let mut rng = fastrand::Rng::with_seed(3);
        source
            .publish(&[PubSubMessage::random(&mut rng)])
            .expect("publish");
        let mut leases = Vec::new();
        source.pull(1, Duration::ZERO, &mut leases).expect("pull");
        let mut refused = Vec::new();
        source.ack(&[leases[0].id], &mut refused).expect("ack");
        assert_eq!(source.settled(), 1);
        source
    }

    #[test]
    fn settled_messages_the_publishers_did_not_publish_do_not_complete_the_run() {
        let source = one_settled();
        let shutdown = Shutdown::new();
        let published = AtomicU64::new(0);
        let completion = Completion {
            source: &source,
            shutdown: &shutdown,
            target: Some(1),
            published: Some(&published),
        };
        // One message settled, but not one the run's publishers published.
        completion.check();
        assert!(!shutdown.is_triggered());
        published.store(1, Ordering::SeqCst);
        completion.check();
        assert_eq!(shutdown.reason(), Some(ShutdownReason::Completed));
    }

    #[test]
    fn without_publishers_the_settled_count_alone_completes_the_run() {
        let source = one_settled();
        let shutdown = Shutdown::new();
        let completion = Completion {
            source: &source,
            shutdown: &shutdown,
            target: Some(1),
            published: None,
        };
        completion.check();
        assert_eq!(shutdown.reason(), Some(ShutdownReason::Completed));
    }
}
