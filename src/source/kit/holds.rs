//! Held deliveries with local deadlines, and ordering-key holds: every delivery a broker
//! source holds, from pull to settle, under a generational [`LeaseId`]; and, when the
//! broker delivers an ordering key's messages in order, the deliveries of a key held back
//! until the one before them is settled (python-pubsub's `messages_on_hold`).
//!
//! A broker whose handles stay valid past their deadline (Pub/Sub answers an ack of an
//! expired ack id with success) relies on this table to refuse a stale lease: the
//! [`LeaseTable`] under it never answers to the id of a slot's earlier lease. `H` is the
//! broker's handle of a delivery (Pub/Sub: its ack id).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::LeaseTable;
use crate::message::PubSubMessage;
use crate::source::{Lease, LeaseId};

/// One delivery held.
#[derive(Debug, Clone)]
pub(crate) struct Held<H> {
    /// The broker's handle of the delivery.
    pub(crate) handle: H,
    /// The broker's id of the message, the same on every delivery of it.
    pub(crate) origin: String,
    /// The message (kept for a dead letter, and to hand out a message held back).
    pub(crate) message: PubSubMessage,
    /// Which delivery this is.
    pub(crate) attempt: u32,
    /// Past it, the server may have delivered the message again: the lease is refused.
    pub(crate) deadline: Instant,
    /// Held back behind an earlier message of its ordering key, not handed out yet.
    on_hold: bool,
}

/// What the end of a lease means for the messages held back behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Acked or dead-lettered: the next message of the key is handed out.
    Settled,
    /// Nacked or expired: the broker delivers it again, and every later message of its
    /// key after it (Pub/Sub does), so those held back are given back too.
    Returned,
}

/// An ended lease, and the leases held back behind it that are given back with it.
pub(crate) type Ended<H> = (Held<H>, Vec<Held<H>>);

/// Where a new delivery goes.
#[derive(Debug)]
pub(crate) enum Placed<H> {
    /// Handed out now.
    Handed(Lease),
    /// Held back behind an earlier message of its ordering key.
    Held,
    /// Given back at once (this handle): its key waits for the redelivery of a message
    /// returned before it, which the broker sends first.
    GiveBack(H),
}

/// Why a lease was refused.
#[derive(Debug)]
pub(crate) enum Refused<H> {
    /// Not held (settled already, or never).
    Unknown,
    /// Its deadline passed: it is removed, with the leases held back behind it, which
    /// must be given back.
    Expired(Vec<Held<H>>),
}

/// The table.
#[derive(Debug)]
pub(crate) struct Holds<H> {
    /// Held deliveries.
    slots: LeaseTable<Held<H>>,
    /// Whether deliveries of one ordering key are handed out one at a time.
    ordering: bool,
    /// Ordering keys with a message handed out, each with the ids held back behind it, in
    /// delivery order.
    keys: HashMap<Box<str>, VecDeque<LeaseId>>,
    /// Held-back leases whose turn came, for the next pull to hand out.
    released: VecDeque<LeaseId>,
    /// How many leases are held back.
    on_hold: usize,
    /// Ordering keys whose handed-out message was returned: until its redelivery comes
    /// (its origin), or the time passes, every other message of the key is given back.
    returned: HashMap<Box<str>, (String, Instant)>,
    /// How long a key waits for the redelivery of its returned message.
    wait_redelivery: Duration,
    /// Deliveries counted per origin, for a broker that does not count them (Pub/Sub on a
    /// subscription without a dead-letter policy); forgotten once settled.
    seen: HashMap<String, u32>,
}

impl<H: Clone> Holds<H> {
    /// An empty table; a key whose message was returned waits up to `wait_redelivery` for
    /// it to come again.
    pub(crate) fn new(ordering: bool, wait_redelivery: Duration) -> Self {
        Holds {
            returned: HashMap::new(),
            wait_redelivery,
            slots: LeaseTable::new(),
            ordering,
            keys: HashMap::new(),
            released: VecDeque::new(),
            on_hold: 0,
            seen: HashMap::new(),
        }
    }

    /// Leases held, handed out or held back.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether messages of one ordering key are handed out one at a time (the broker's
    /// setting, read at start).
    pub(crate) fn set_ordering(&mut self, ordering: bool) {
        self.ordering = ordering;
    }

    /// The attempt of a handed-out lease, if held.
    pub(crate) fn attempt_of(&self, id: LeaseId) -> Option<u32> {
        self.get(id).map(|held| held.attempt)
    }

    /// The attempt of a delivery: the broker's when it counts, else counted here by origin.
    pub(crate) fn attempt(&mut self, given: Option<u32>, origin: &str) -> u32 {
        match given {
            Some(attempt) => attempt.max(1),
            None => {
                let count = self.seen.entry(origin.to_owned()).or_insert(0);
                *count += 1;
                *count
            }
        }
    }

    /// Forgets the attempts counted for a message that is done.
    pub(crate) fn forget(&mut self, held: &Held<H>) {
        if !self.seen.is_empty() {
            self.seen.remove(&held.origin);
        }
    }

    /// Leases held back.
    pub(crate) fn on_hold(&self) -> usize {
        self.on_hold
    }

    /// Adds a delivery: handed out now, held back behind an earlier message of its ordering
    /// key, or given back when its key waits for the redelivery of a returned message.
    pub(crate) fn insert(
        &mut self,
        handle: H,
        origin: String,
        message: PubSubMessage,
        attempt: u32,
        deadline: Instant,
    ) -> Placed<H> {
        if let Some(key) = message.ordering_key().filter(|_| self.ordering) {
            if let Some((awaited, until)) = self.returned.get(key) {
                if *awaited == origin || *until <= Instant::now() {
                    self.returned.remove(key);
                } else {
                    return Placed::GiveBack(handle);
                }
            }
        }
        let key = message
            .ordering_key()
            .filter(|_| self.ordering)
            .map(Box::<str>::from);
        let busy = key.as_ref().is_some_and(|key| self.keys.contains_key(key));
        let lease_message = message.clone();
        let id = self.slots.insert(Held {
            handle,
            origin,
            message,
            attempt,
            deadline,
            on_hold: busy,
        });
        let lease = Lease {
            message: lease_message,
            attempt,
            id,
        };
        match key {
            Some(key) if busy => {
                self.on_hold += 1;
                if let Some(queue) = self.keys.get_mut(&key) {
                    queue.push_back(id);
                }
                Placed::Held
            }
            Some(key) => {
                self.keys.insert(key, VecDeque::new());
                Placed::Handed(lease)
            }
            None => Placed::Handed(lease),
        }
    }

    /// Stops waiting for the redelivery of a message that will not be handed out (it is
    /// dead-lettered as it arrives).
    pub(crate) fn not_coming(&mut self, message: &PubSubMessage, origin: &str) {
        if let Some(key) = message.ordering_key() {
            if self
                .returned
                .get(key)
                .is_some_and(|(awaited, _)| awaited == origin)
            {
                self.returned.remove(key);
            }
        }
    }

    /// Hands out up to `max` held-back leases whose turn came.
    pub(crate) fn released(&mut self, max: usize, out: &mut Vec<Lease>) {
        while out.len() < max {
            let Some(id) = self.released.pop_front() else {
                break;
            };
            out.extend(self.lease(id));
        }
    }

    /// Takes a handed-out lease out of the table to end it; `Err` when it is not held (or
    /// its deadline passed: then it is removed as expired). Returns the lease, and the
    /// leases held back behind it that must be given back with it.
    pub(crate) fn take(
        &mut self,
        id: LeaseId,
        now: Instant,
        end: End,
    ) -> Result<Ended<H>, Refused<H>> {
        let held = self.get(id).ok_or(Refused::Unknown)?;
        if held.on_hold {
            return Err(Refused::Unknown);
        }
        if held.deadline <= now {
            let behind = self
                .finish(id, End::Returned)
                .map(|(_, behind)| behind)
                .unwrap_or_default();
            return Err(Refused::Expired(behind));
        }
        self.finish(id, end).ok_or(Refused::Unknown)
    }

    /// Moves the deadline of a handed-out lease; `None` when it is not held or expired.
    pub(crate) fn extend(&mut self, id: LeaseId, now: Instant, deadline: Instant) -> Option<&H> {
        let held = self.get_mut(id)?;
        if held.on_hold || held.deadline <= now {
            return None;
        }
        held.deadline = deadline;
        Some(&held.handle)
    }

    /// Removes every handed-out lease whose deadline passed; returns how many, and the
    /// leases held back behind them, to give back.
    pub(crate) fn expire(&mut self, now: Instant) -> (u64, Vec<Held<H>>) {
        let expired: Vec<LeaseId> = self
            .slots
            .iter()
            .filter(|(_, held)| !held.on_hold && held.deadline <= now)
            .map(|(id, _)| id)
            .collect();
        let mut behind = Vec::new();
        for &id in &expired {
            if let Some((_, later)) = self.finish(id, End::Returned) {
                behind.extend(later);
            }
        }
        (expired.len() as u64, behind)
    }

    /// The handles of held-back leases whose deadline comes before `before`, their deadline
    /// moved to `deadline`: the source extends these itself, as the runner does not know them.
    pub(crate) fn due_on_hold(&mut self, before: Instant, deadline: Instant) -> Vec<H> {
        self.slots
            .iter_mut()
            .filter(|(_, held)| held.on_hold && held.deadline < before)
            .map(|(_, held)| {
                held.deadline = deadline;
                held.handle.clone()
            })
            .collect()
    }

    /// Empties the table (a forced exit gives everything back).
    pub(crate) fn drain(&mut self) -> Vec<Held<H>> {
        self.keys.clear();
        self.returned.clear();
        self.released.clear();
        self.on_hold = 0;
        self.slots.drain().collect()
    }

    /// The lease of a held entry, if the id is current.
    fn lease(&self, id: LeaseId) -> Option<Lease> {
        self.get(id).map(|held| Lease {
            message: held.message.clone(),
            attempt: held.attempt,
            id,
        })
    }

    /// The held entry of `id`, if the id is current.
    fn get(&self, id: LeaseId) -> Option<&Held<H>> {
        self.slots.get(id)
    }

    /// The held entry of `id`, to change, if the id is current.
    fn get_mut(&mut self, id: LeaseId) -> Option<&mut Held<H>> {
        self.slots.get_mut(id)
    }

    /// Removes a handed-out lease and settles its ordering key: the next one held back is
    /// released, or, when the lease was returned, every one held back is removed too.
    /// `None` when the id is not current.
    fn finish(&mut self, id: LeaseId, end: End) -> Option<Ended<H>> {
        let held = self.slots.remove(id)?;
        let mut behind = Vec::new();
        let Some(key) = held.message.ordering_key().filter(|_| self.ordering) else {
            return Some((held, behind));
        };
        let Some(queue) = self.keys.get_mut(key) else {
            return Some((held, behind));
        };
        match end {
            End::Settled => match queue.pop_front() {
                Some(next) => {
                    self.on_hold = self.on_hold.saturating_sub(1);
                    if let Some(next_held) = self.get_mut(next) {
                        next_held.on_hold = false;
                    }
                    self.released.push_back(next);
                }
                None => {
                    self.keys.remove(key);
                }
            },
            End::Returned => {
                let until = Instant::now() + self.wait_redelivery;
                self.returned
                    .insert(key.into(), (held.origin.clone(), until));
                if let Some(queue) = self.keys.remove(key) {
                    self.on_hold = self.on_hold.saturating_sub(queue.len());
                    for later in queue {
                        behind.extend(self.slots.remove(later));
                    }
                }
            }
        }
        Some((held, behind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(key: &str, n: u32) -> PubSubMessage {
        PubSubMessage::new(format!("m{n}"))
            .with_id(format!("{key}-{n}"))
            .with_ordering_key(key)
    }

    fn handed(placed: Placed<String>) -> Lease {
        match placed {
            Placed::Handed(lease) => lease,
            other => panic!("not handed out: {other:?}"),
        }
    }

    #[test]
    fn a_key_is_handed_out_one_message_at_a_time() {
        let now = Instant::now();
        let later = now + Duration::from_secs(10);
        let mut table = Holds::<String>::new(true, Duration::from_secs(10));
        let first = handed(table.insert("a1".into(), "1".into(), keyed("a", 1), 1, later));
        let held = |placed| matches!(placed, Placed::Held);
        assert!(held(table.insert(
            "a2".into(),
            "2".into(),
            keyed("a", 2),
            1,
            later
        )));
        assert!(held(table.insert(
            "a3".into(),
            "3".into(),
            keyed("a", 3),
            1,
            later
        )));
        // Another key goes on.
        handed(table.insert("b1".into(), "b".into(), keyed("b", 1), 1, later));
        assert_eq!(table.on_hold(), 2);
        let mut out = Vec::new();
        table.released(10, &mut out);
        assert!(out.is_empty());
        // Acked: the second comes out, not the third.
        table.take(first.id, now, End::Settled).unwrap();
        table.released(10, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].message.id().to_string(), "a-2");
        // Nacked: the third is given back with it.
        let (nacked, behind) = table.take(out[0].id, now, End::Returned).unwrap();
        assert_eq!(nacked.handle, "a2");
        assert_eq!(behind.len(), 1);
        assert_eq!(behind[0].handle, "a3");
        assert_eq!((table.on_hold(), table.len()), (0, 1));
        // Until the returned message comes again, a later one of its key is given back.
        assert!(matches!(
            table.insert("a4".into(), "4".into(), keyed("a", 4), 1, later),
            Placed::GiveBack(id) if id == "a4"
        ));
        // Its redelivery is handed out at once.
        handed(table.insert("a2'".into(), "2".into(), keyed("a", 2), 2, later));
    }

    #[test]
    fn a_stale_or_expired_lease_is_refused() {
        let now = Instant::now();
        let mut table = Holds::<String>::new(false, Duration::from_secs(10));
        let lease = handed(table.insert(
            "x".into(),
            "1".into(),
            PubSubMessage::new("x"),
            1,
            now + Duration::from_secs(1),
        ));
        table.take(lease.id, now, End::Settled).unwrap();
        let again = handed(table.insert("y".into(), "1".into(), PubSubMessage::new("x"), 2, now));
        assert_ne!(again.id, lease.id, "the reused slot has a new lease id");
        assert!(matches!(
            table.take(lease.id, now, End::Settled),
            Err(Refused::Unknown)
        ));
        assert!(matches!(
            table.take(again.id, now, End::Settled),
            Err(Refused::Expired(behind)) if behind.is_empty()
        ));
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn an_expired_head_gives_back_the_messages_held_behind_it() {
        let now = Instant::now();
        let mut table = Holds::<String>::new(true, Duration::from_secs(10));
        let head = handed(table.insert("a1".into(), "1".into(), keyed("a", 1), 1, now));
        let later = now + Duration::from_secs(10);
        assert!(matches!(
            table.insert("a2".into(), "2".into(), keyed("a", 2), 1, later),
            Placed::Held
        ));
        match table.take(head.id, now, End::Settled) {
            Err(Refused::Expired(behind)) => assert_eq!(behind[0].handle, "a2"),
            other => panic!("{other:?}"),
        }
        assert_eq!((table.len(), table.on_hold()), (0, 0));
    }

    #[test]
    fn attempts_are_the_brokers_where_given_else_counted_until_forgotten() {
        let mut table = Holds::<String>::new(false, Duration::from_secs(10));
        assert_eq!(table.attempt(Some(3), "m"), 3);
        assert_eq!(table.attempt(Some(0), "m"), 1, "an attempt is at least 1");
        assert_eq!(table.attempt(None, "m"), 1);
        assert_eq!(table.attempt(None, "m"), 2);
        assert_eq!(table.attempt(None, "other"), 1);
        let lease = handed(table.insert(
            "ack".into(),
            "m".into(),
            PubSubMessage::new("x"),
            2,
            Instant::now() + Duration::from_secs(10),
        ));
        let (held, _) = table.take(lease.id, Instant::now(), End::Settled).unwrap();
        table.forget(&held);
        assert_eq!(table.attempt(None, "m"), 1, "forgotten once settled");
    }
}
