//! Consumer threads: pull leased deliveries (a blocking, synchronous pull) and hand each one
//! to the executor through the bounded hand-off channel with `send_blocking`.

use std::time::Duration;

use log::{error, info};

use crate::error::SourceError;
use crate::flow::Gate;
use crate::shutdown::{Shutdown, ShutdownReason};
use crate::source::{Delivery, Source};

/// Most messages leased in one pull: one lock of the subscription serves many messages.
pub(crate) const PULL_BATCH: usize = 64;
/// How long a pull blocks with nothing to deliver before the loop looks around again.
const PULL_WAIT: Duration = Duration::from_millis(50);
/// Pause after a backend error before pulling again.
const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What one consumer thread needs.
pub(crate) struct Consumer<'a> {
    /// Where deliveries come from.
    pub(crate) source: &'a dyn Source,
    /// Ends the loop.
    pub(crate) shutdown: &'a Shutdown,
    /// Flow control: a permit per delivery, taken before pulling.
    pub(crate) gate: &'a Gate<'a>,
    /// The hand-off channel to the executor.
    pub(crate) handoff: async_channel::Sender<Delivery<'a>>,
    /// With `--messages N`: checked after each pull, as expired leases may dead-letter the
    /// last messages without any handler running.
    pub(crate) messages: Option<u64>,
}

impl Consumer<'_> {
    /// Pulls and hands off until shutdown.
    ///
    /// # Blocking
    ///
    /// Runs on its own `std::thread`: pulling, waiting for permits and `send_blocking` block.
    pub(crate) fn run(self) {
        info!("Starting consumer");
        let mut leases = Vec::with_capacity(PULL_BATCH);
        while !self.shutdown.is_triggered() {
            let permits = self.gate.acquire(PULL_BATCH);
            if permits == 0 {
                break;
            }
            leases.clear();
            match self.source.pull(permits, PULL_WAIT, &mut leases) {
                Ok(()) => {}
                Err(SourceError::Closed) => {
                    self.gate.release(permits);
                    break;
                }
                Err(SourceError::Unavailable(text)) => {
                    // Retrying will not help: shut the service down, with a reason that makes
                    // the binary exit 1.
                    error!("Could not pull: {text}");
                    self.gate.release(permits);
                    if self.shutdown.trigger(ShutdownReason::Failed(text)) {
                        info!("Shutting down...");
                    }
                    break;
                }
                Err(other) => {
                    error!("Could not pull: {other}");
                    self.gate.release(permits);
                    if self.shutdown.wait_timeout(ERROR_PAUSE) {
                        break;
                    }
                    continue;
                }
            }
            // A source must not return more than asked; if one does, the extra leases are
            // given back at once rather than overrunning the flow-control window.
            if leases.len() > permits {
                for extra in leases.drain(permits..) {
                    let _ = self.source.nack(extra.id);
                }
            }
            self.gate.release(permits - leases.len());
            for lease in leases.drain(..) {
                info!("Consumed {}", lease.message);
                let delivery = Delivery::new(lease, self.source);
                // The channel closes only during shutdown; the delivery comes back and its drop
                // guard nacks it.
                if let Err(refused) = self.handoff.send_blocking(delivery) {
                    drop(refused.0);
                    self.gate.release(1);
                }
            }
            crate::runner::check_done(self.source, self.shutdown, self.messages);
        }
    }
}
