//! The maintenance thread: keeps the consumer name alive, trims what every group acked,
//! and watches whether the group has drained; and the graceful release of the consumer.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{error, info};
use redis::Value;

use super::connection::{Class, Failure};
use super::reply::{int, text};
use super::{lock, Core};

/// How often the group's state is read.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// The state of the consumer group.
#[derive(Debug, Clone, Copy)]
pub(super) struct GroupState {
    /// Entries delivered and not yet acked.
    pub(super) pending: u64,
    /// Entries not yet delivered.
    pub(super) undelivered: u64,
    /// Every entry of the stream delivered and none pending.
    pub(super) drained: bool,
}

impl Core {
    /// The maintenance thread's loop, until the source is dropped.
    pub(super) fn run_maintenance(&self) {
        let refresh_every = self.config.liveness_ttl / 5;
        let now = Instant::now();
        let mut refresh_at = now + refresh_every;
        let mut trim_at = now + self.config.trim_interval;
        loop {
            let now = Instant::now();
            if now >= refresh_at {
                self.refresh_name();
                refresh_at = now + refresh_every;
            }
            if !self.config.trim_interval.is_zero() && now >= trim_at {
                self.trim();
                trim_at = now + self.config.trim_interval;
            }
            self.watch_drain();
            let next = refresh_at.min(now + DRAIN_POLL);
            let next = if self.config.trim_interval.is_zero() {
                next
            } else {
                next.min(trim_at)
            };
            let closing = lock(&self.closing);
            if *closing {
                return;
            }
            let wait = next.saturating_duration_since(Instant::now());
            let (closing, _) = self
                .closing_signal
                .wait_timeout(closing, wait)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *closing {
                return;
            }
        }
    }

    /// Refreshes the liveness key; notices when another instance took the name over.
    fn refresh_name(&self) {
        let ttl_ms = self.config.liveness_ttl.as_millis().max(1) as u64;
        let held = self.with_connection(Class::Liveness, |con| {
            self.scripts
                .liveness
                .key(&self.live_key)
                .arg(&self.token)
                .arg(ttl_ms)
                .invoke::<i64>(con)
        });
        if let Ok(0) = held {
            if !self.name_lost.swap(true, Ordering::SeqCst) {
                error!(
                    "consumer name {} was taken over by another instance (this one did not \
                     refresh {} in time); stopping",
                    self.config.consumer, self.live_key
                );
            }
        }
    }

    /// Trims the entries every group acked and records this group's floor.
    fn trim(&self) {
        let trimmed = self.with_connection(Class::Maintenance, |con| {
            self.scripts
                .retention
                .key(&self.config.stream)
                .key(&self.floor_key)
                .arg(&self.config.group)
                .invoke::<Value>(con)
        });
        if let Ok(Value::Array(parts)) = trimmed {
            let count = parts.first().and_then(int).unwrap_or(0);
            if count > 0 {
                log::debug!(
                    "trimmed {count} acked entries of {} (floor {})",
                    self.config.stream,
                    parts.get(1).and_then(text).unwrap_or_default()
                );
            }
        }
    }

    /// Reads the group's state: what it has left, and whether it drained; if so, every
    /// message published here before the question is settled.
    fn watch_drain(&self) {
        let published = self.published.load(Ordering::SeqCst);
        if let Some(state) = self.group_state() {
            self.remaining
                .store(state.pending + state.undelivered, Ordering::SeqCst);
            if state.drained && published > self.group_settled.load(Ordering::SeqCst) {
                self.group_settled.fetch_max(published, Ordering::SeqCst);
            }
        }
    }

    /// The group's pending and undelivered entries, read in one step.
    pub(super) fn group_state(&self) -> Option<GroupState> {
        let reply: Vec<i64> = self
            .with_connection(Class::Maintenance, |con| {
                self.scripts
                    .group_state
                    .key(&self.config.stream)
                    .arg(&self.config.group)
                    .invoke(con)
            })
            .ok()?;
        match reply[..] {
            [pending, undelivered, drained] if pending >= 0 => Some(GroupState {
                pending: pending as u64,
                undelivered: u64::try_from(undelivered).unwrap_or(0),
                drained: drained == 1,
            }),
            _ => None,
        }
    }

    /// On a graceful stop: gives the consumer name up and, when this consumer holds nothing
    /// (no local lease, no queued operation, nothing pending in the group), removes it from
    /// the group. Skipped while the server fails: the exit does not wait for it.
    pub(super) fn release(&self) {
        if self.failing.load(Ordering::SeqCst) {
            return;
        }
        let holds = lock(&self.leases).len() as u64 + self.queued.count();
        let removed = self.with_connection(Class::Maintenance, |con| {
            self.scripts
                .release
                .key(&self.config.stream)
                .key(&self.live_key)
                .arg(&self.config.group)
                .arg(&self.config.consumer)
                .arg(&self.token)
                // A consumer holding leases only gives its name up.
                .arg(u8::from(holds == 0))
                .invoke::<i64>(con)
        });
        match removed {
            Ok(1) => info!(
                "removed consumer {} from group {}",
                self.config.consumer, self.config.group
            ),
            Ok(_) => info!(
                "kept consumer {} in group {}: it still has pending entries",
                self.config.consumer, self.config.group
            ),
            Err(Failure::Down { .. } | Failure::GaveUp(_)) => {}
        }
    }
}
