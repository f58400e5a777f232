//! `--messages N`: the run is complete once N messages are settled.

use crate::shutdown::{Shutdown, ShutdownReason};
use crate::source::Source;

/// Triggers the shutdown once the source has settled the target number of messages.
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
}

impl Completion<'_> {
    /// Triggers the shutdown if the target is reached.
    pub(crate) fn check(&self) {
        if let Some(target) = self.target {
            if self.source.settled() >= target {
                self.shutdown.trigger(ShutdownReason::Completed);
            }
        }
    }
}
