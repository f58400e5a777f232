//! Publisher threads: create "restart this host" messages and publish them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use log::{error, info};

use crate::error::SourceError;
use crate::message::PubSubMessage;
use crate::shutdown::Shutdown;
use crate::source::Source;

/// Pause after a backend error before publishing again.
const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What one publisher thread needs.
pub(crate) struct Publisher<'a> {
    /// Where messages go.
    pub(crate) source: &'a dyn Source,
    /// Ends the loop; also interrupts the pause between messages.
    pub(crate) shutdown: &'a Shutdown,
    /// Upper bound of the random pause between two messages.
    pub(crate) interval: Duration,
    /// Messages still to publish, shared by all publishers; `None` = no limit.
    pub(crate) budget: Option<&'a AtomicU64>,
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
        while !self.shutdown.is_triggered() {
            if let Some(budget) = self.budget {
                let claimed = budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                    left.checked_sub(1)
                });
                if claimed.is_err() {
                    break;
                }
            }
            let message = PubSubMessage::random(&mut rng);
            match self.source.publish(message) {
                Ok(()) => info!("Published {message}"),
                Err(SourceError::Closed) => break,
                Err(other) => {
                    error!("Could not publish {message}: {other}");
                    if let Some(budget) = self.budget {
                        budget.fetch_add(1, Ordering::SeqCst);
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
    }
}
