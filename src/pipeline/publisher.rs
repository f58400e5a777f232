//! Publisher threads: create "restart this host" messages and publish them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use log::{info, Level};

use crate::error::SourceError;
use crate::message::PubSubMessage;
use crate::pause::Pause;
use crate::pipeline::throttle::Throttle;
use crate::shutdown::Shutdown;
use crate::source::Publish;

/// Pause after a backend error before publishing again.
const ERROR_PAUSE: Duration = Duration::from_millis(100);
/// How often a quiet publisher looks at the shutdown.
const QUIET_CHECK: Duration = Duration::from_millis(50);
/// Most messages published in one call when there is no pause between messages: one call
/// (one lock, or one round trip to a remote broker) serves many messages.
const PUBLISH_BATCH: u64 = 256;
/// Longest one wait for the confirms of a spent budget, between two looks at the shutdown.
const CONFIRM_STEP: Duration = Duration::from_millis(200);

/// Aggregates the errors of every publisher thread.
static ERRORS: Throttle = Throttle::new("publish errors", Level::Error);

/// What one publisher thread needs.
pub(crate) struct Publisher<'a> {
    /// Where messages go.
    pub(crate) sink: &'a dyn Publish,
    /// Ends the loop; also interrupts the pause between messages.
    pub(crate) shutdown: &'a Shutdown,
    /// Holds publishing back in quiet mode.
    pub(crate) pause: &'a Pause,
    /// Upper bound of the random pause between two messages.
    pub(crate) interval: Duration,
    /// Messages still to publish, shared by all publishers; `None` = no limit.
    pub(crate) budget: Option<&'a AtomicU64>,
    /// Messages published by every publisher, counted once their publish returned.
    pub(crate) published: &'a AtomicU64,
    /// Seed of this publisher's messages and pauses.
    pub(crate) seed: u64,
}

impl Publisher<'_> {
    /// Publishes until shutdown, the budget is spent, or the source closes.
    ///
    /// # Blocking
    ///
    /// Runs on its own `std::thread`: publishing and pausing block.
    pub(crate) fn run(self) {
        info!("Starting publisher");
        let mut rng = fastrand::Rng::with_seed(self.seed);
        let interval_nanos = u64::try_from(self.interval.as_nanos()).unwrap_or(u64::MAX);
        let batch_size = if interval_nanos == 0 {
            PUBLISH_BATCH
        } else {
            1
        };
        let mut batch: Vec<PubSubMessage> = Vec::with_capacity(batch_size as usize);
        let mut spent = false;
        while !self.shutdown.is_triggered() {
            // A bounded wait, so that the shutdown is seen within it.
            if self.pause.publishing_paused() {
                self.pause.wait_while(Pause::publishing_paused, QUIET_CHECK);
                continue;
            }
            let count = match self.budget {
                Some(budget) => {
                    match budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                        (left > 0).then(|| left - left.min(batch_size))
                    }) {
                        Ok(left) => left.min(batch_size),
                        Err(_) => {
                            spent = true;
                            break;
                        }
                    }
                }
                None => batch_size,
            };
            batch.clear();
            batch.extend((0..count).map(|_| PubSubMessage::random(&mut rng)));
            match self.sink.publish(&batch) {
                Ok(()) => {
                    self.published.fetch_add(count, Ordering::SeqCst);
                    for message in &batch {
                        info!("Published {message}");
                    }
                }
                Err(SourceError::Closed) => break,
                Err(other) => {
                    ERRORS.log(count, || {
                        format!("Could not publish {count} messages: {other}")
                    });
                    // Publishing is at least once: the budget gets the batch back, which may
                    // publish a message twice if the backend took part of the batch.
                    if let Some(budget) = self.budget {
                        budget.fetch_add(count, Ordering::SeqCst);
                    }
                    if self.shutdown.wait_timeout(ERROR_PAUSE) {
                        break;
                    }
                }
            }
            if interval_nanos > 0
                && self
                    .shutdown
                    .wait_timeout(Duration::from_nanos(rng.u64(..interval_nanos)))
            {
                break;
            }
        }
        // With `--messages N` spent: what was published is confirmed before the thread ends,
        // so that a batch the broker refused or returned, or one a lost connection left
        // unconfirmed, is sent again now. A broker whose confirms are awaited lazily, by
        // the next batch, would otherwise hold such a batch until the shutdown, and the run
        // would never settle its N (a RabbitMQ queue full under `reject-publish` did that).
        if spent {
            while !self.shutdown.is_triggered() && self.sink.wait_confirmed(CONFIRM_STEP) > 0 {
                // A broker failing fast (past its reconnect limit) is not asked in a loop.
                if self.shutdown.wait_timeout(ERROR_PAUSE) {
                    break;
                }
            }
        }
    }
}
