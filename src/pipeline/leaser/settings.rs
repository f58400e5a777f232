//! The lease manager's settings ([`LeaseSettings`]): how far and how often leases are
//! extended, fixed or following the handling times (`--ack-deadline auto`).

use std::time::Duration;

/// The least deadline `--ack-deadline auto` asks for, as Google's clients do.
pub(crate) const AUTO_MIN_DEADLINE: Duration = Duration::from_secs(10);
/// The most deadline `--ack-deadline auto` asks for (Google Cloud Pub/Sub's maximum).
pub(crate) const AUTO_MAX_DEADLINE: Duration = Duration::from_secs(600);

/// The lease manager's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseSettings {
    /// How far a lease is extended each time; with `auto`, the source's own deadline at the
    /// pull, and the deadline until the first handling times are known.
    pub(crate) ack_deadline: Duration,
    /// `--ack-deadline auto`: each round, the deadline asked of the source is the p99 of the
    /// handling times so far, within [`AUTO_MIN_DEADLINE`]..[`AUTO_MAX_DEADLINE`], and a
    /// lease is extended once a third of it is left (`extend_interval` is not used).
    pub(crate) auto: bool,
    /// A lease is extended once it is this old since its last extension (below
    /// `ack_deadline`); what is left of the deadline then is the margin a round has.
    pub(crate) extend_interval: Duration,
    /// Past this time since the pull a lease is no longer extended.
    pub(crate) max_lease: Duration,
}

impl LeaseSettings {
    /// What is left of a lease's deadline when it is extended, for a deadline of `deadline`:
    /// fixed, `ack_deadline − extend_interval`; auto, a third of it (the ratio of the
    /// defaults, 1 s left of 3 s).
    pub(super) fn margin(&self, deadline: Duration) -> Duration {
        if self.auto {
            deadline / 3
        } else {
            self.ack_deadline.saturating_sub(self.extend_interval)
        }
    }

    /// Time between two extension rounds: half the margin, so that a lease is extended with
    /// at least half the margin left for the call to the source.
    pub(super) fn period(&self, deadline: Duration) -> Duration {
        (self.margin(deadline) / 2).max(Duration::from_millis(1))
    }

    /// The deadline auto mode asks for when the p99 of the handling times is `p99`: in whole
    /// seconds (rounded up), as Pub/Sub's deadlines are, within the bounds.
    pub(super) fn auto_deadline(p99: Duration) -> Duration {
        let whole = p99.as_secs() + u64::from(p99.subsec_nanos() > 0);
        Duration::from_secs(whole).clamp(AUTO_MIN_DEADLINE, AUTO_MAX_DEADLINE)
    }
}
