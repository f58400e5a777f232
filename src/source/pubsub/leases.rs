//! The lease table: the kit's [`Holds`] (local deadlines, ordering-key holds) under Pub/Sub's
//! ack ids, and the attempts the source counts itself on a subscription without a
//! dead-letter policy, where Pub/Sub gives no `deliveryAttempt`.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use crate::source::kit::Holds;

pub(super) use crate::source::kit::{End, Placed, Refused};

/// A delivery held, under its ack id.
pub(super) type Held = crate::source::kit::Held<String>;

/// The table.
#[derive(Debug)]
pub(super) struct Table {
    /// The held deliveries, under their ack ids.
    holds: Holds<String>,
    /// Deliveries counted per server message id, for subscriptions where Pub/Sub does not
    /// count them (no dead-letter policy); forgotten once settled.
    seen: HashMap<String, u32>,
}

impl Table {
    /// An empty table; a key whose message was returned waits up to `wait_redelivery` for
    /// it to come again.
    pub(super) fn new(ordering: bool, wait_redelivery: Duration) -> Self {
        Table {
            holds: Holds::new(ordering, wait_redelivery),
            seen: HashMap::new(),
        }
    }

    /// The attempt of a delivery: Pub/Sub's when it counts, else counted here by message id.
    pub(super) fn attempt(&mut self, given: Option<u32>, server_id: &str) -> u32 {
        match given {
            Some(attempt) => attempt.max(1),
            None => {
                let count = self.seen.entry(server_id.to_owned()).or_insert(0);
                *count += 1;
                *count
            }
        }
    }

    /// Forgets the attempts counted for a message that is done.
    pub(super) fn forget(&mut self, held: &Held) {
        if !self.seen.is_empty() {
            self.seen.remove(&held.origin);
        }
    }
}

impl Deref for Table {
    type Target = Holds<String>;

    fn deref(&self) -> &Holds<String> {
        &self.holds
    }
}

impl DerefMut for Table {
    fn deref_mut(&mut self) -> &mut Holds<String> {
        &mut self.holds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_pubsubs_where_given_else_counted_until_forgotten() {
        let mut table = Table::new(false, Duration::from_secs(10));
        assert_eq!(table.attempt(Some(3), "m"), 3);
        assert_eq!(table.attempt(Some(0), "m"), 1, "an attempt is at least 1");
        assert_eq!(table.attempt(None, "m"), 1);
        assert_eq!(table.attempt(None, "m"), 2);
        assert_eq!(table.attempt(None, "other"), 1);
        let held = Held {
            handle: "ack".into(),
            origin: "m".into(),
            message: crate::message::PubSubMessage::new("x"),
            attempt: 2,
            deadline: std::time::Instant::now(),
            on_hold: false,
        };
        table.forget(&held);
        assert_eq!(table.attempt(None, "m"), 1, "forgotten once settled");
    }
}
