//! Consumer threads: pull leases (a blocking, synchronous pull), put them under the lease
//! manager, and hand each pull's leases to the executor, as one batch, through the hand-off
//! channel with `send_blocking`.

use std::time::{Duration, Instant};

use log::{error, info, log_enabled, Level};

use crate::error::SourceError;
use crate::pause::Pause;
use crate::pipeline::bridge::Batch;
use crate::pipeline::completion::Completion;
use crate::pipeline::leaser::{LeaseGuard, Leaser};
use crate::pipeline::throttle::Throttle;
use crate::shutdown::{Shutdown, ShutdownReason};
use crate::source::{Lease, Source};

/// How long a pull blocks with nothing to deliver before the loop looks around again.
const PULL_WAIT: Duration = Duration::from_millis(50);
/// Pause after a backend error before pulling again.
const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Aggregates the pull errors of every consumer thread.
static ERRORS: Throttle = Throttle::new("pull errors", Level::Error);

/// What one consumer thread needs.
pub(crate) struct Consumer<'a> {
    /// Where leases come from.
    pub(crate) source: &'a dyn Source,
    /// Ends the loop.
    pub(crate) shutdown: &'a Shutdown,
    /// Holds the pulls back (quiet mode, an open circuit breaker); told when pulls fail.
    pub(crate) pause: &'a Pause,
    /// The lease manager, which also holds the flow-control gate.
    pub(crate) leaser: &'a Leaser<'a>,
    /// The hand-off channel to the executor.
    pub(crate) handoff: async_channel::Sender<Batch<'a>>,
    /// Checked after each pull: expired leases may dead-letter the last messages without any
    /// handler running.
    pub(crate) completion: Completion<'a>,
}

impl<'a> Consumer<'a> {
    /// Hands a pull's leases to the executor, as many at a time as the byte limit lets
    /// through (one send when they all fit, the usual case): the others wait here, held and
    /// extended, until handlers settle enough bytes.
    ///
    /// # Blocking
    ///
    /// Waits for room under the byte limit, and in `send_blocking`.
    fn hand_over(&self, mut guards: Vec<LeaseGuard<'a>>) {
        let gate = self.leaser.gate();
        let total: usize = guards.iter().map(LeaseGuard::size).sum();
        if !guards.is_empty() && gate.try_take_all(total) {
            // The usual case: the whole pull fits, one send.
            for guard in &mut guards {
                guard.count_size();
            }
            self.leaser.count_handed_bytes(total);
            let handed = Instant::now();
            if let Err(refused) = self.handoff.send_blocking(Batch { guards, handed }) {
                drop(refused.0);
            }
            return;
        }
        let mut sizes: Vec<usize> = guards.iter().map(LeaseGuard::size).collect();
        while !guards.is_empty() {
            let fit = gate.take_bytes(&sizes);
            if fit == 0 {
                // Closed for shutdown: the drop of each guard nacks its lease.
                return;
            }
            let rest = if fit < guards.len() {
                let rest = guards.split_off(fit);
                sizes.drain(..fit);
                rest
            } else {
                Vec::new()
            };
            let mut bytes = 0;
            for guard in &mut guards {
                guard.count_size();
                bytes += guard.size();
            }
            self.leaser.count_handed_bytes(bytes);
            // The channel closes only during shutdown; the batch comes back, and the drop of
            // each guard nacks its lease and returns its permit and its bytes.
            let handed = Instant::now();
            if let Err(refused) = self.handoff.send_blocking(Batch { guards, handed }) {
                drop(refused.0);
                return;
            }
            guards = rest;
        }
    }

    /// Pulls and hands off until shutdown.
    ///
    /// # Blocking
    ///
    /// Runs on its own `std::thread`: pulling, waiting for permits and `send_blocking` block.
    pub(crate) fn run(self) {
        info!("Starting consumer");
        let gate = self.leaser.gate();
        // Most messages leased in one pull: one lock of the subscription (or one round trip)
        // serves many messages.
        let batch = self.source.pull_batch().max(1);
        let mut leases: Vec<Lease> = Vec::with_capacity(batch);
        while !self.shutdown.is_triggered() {
            // Checked before the permits are taken: a paused consumer holds none. A bounded
            // wait, so that the shutdown is seen within one pull's wait.
            if self.pause.pulling_paused() {
                self.pause.wait_while(Pause::pulling_paused, PULL_WAIT);
                continue;
            }
            let permits = gate.acquire(batch);
            if permits == 0 {
                break;
            }
            // Checked again once the permits are taken (taking them may have blocked for a
            // long time): a pull that begins is counted until its leases are handed off.
            let Some(_pull) = self.pause.begin_pull() else {
                gate.release(permits);
                continue;
            };
            leases.clear();
            let pulled = Instant::now();
            let pulled_result = self.source.pull(permits, PULL_WAIT, &mut leases);
            self.pause.set_source_failing(matches!(
                pulled_result,
                Err(SourceError::Backend(_) | SourceError::Unavailable(_))
            ));
            match pulled_result {
                Ok(()) => {}
                Err(SourceError::Closed) => {
                    gate.release(permits);
                    break;
                }
                Err(SourceError::Unavailable(text)) => {
                    // Retrying will not help: shut the service down, with a reason that makes
                    // the binary exit 1.
                    error!("Could not pull: {text}");
                    gate.release(permits);
                    if self.shutdown.trigger(ShutdownReason::Failed(text)) {
                        info!("Shutting down...");
                    }
                    break;
                }
                Err(other) => {
                    ERRORS.log(1, || format!("Could not pull: {other}"));
                    gate.release(permits);
                    if self.shutdown.wait_timeout(ERROR_PAUSE) {
                        break;
                    }
                    continue;
                }
            }
            // A source must not return more than asked; if one does, the extra leases are
            // given back at once rather than overrunning the flow-control window.
            if leases.len() > permits {
                let extra: Vec<_> = leases.drain(permits..).map(|lease| lease.id).collect();
                self.leaser.give_back_unadmitted(&extra);
            }
            gate.release(permits - leases.len());
            let mut guards = Vec::with_capacity(leases.len());
            self.leaser.admit(leases.drain(..), pulled, &mut guards);
            if log_enabled!(Level::Info) {
                for guard in &guards {
                    info!("Consumed {}", guard.message());
                }
            }
            self.hand_over(guards);
            self.completion.check();
        }
    }
}
