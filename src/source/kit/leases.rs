//! The lease table every broker keeps: the deliveries a source holds, each under a lease id
//! that a settled slot's later lease can never answer to.
//!
//! A lease id is a slot of the table in its low 32 bits and the generation of the lease in
//! that slot in its high 32 bits. The packing lives here and nowhere else.

use std::time::Instant;

use slab::Slab;

use crate::source::LeaseId;

/// The slot and the generation of a lease id.
fn unpack(id: LeaseId) -> (usize, u32) {
    // The low half is the slot, the high half the generation: both casts keep exactly the
    // 32 bits they are meant to.
    ((id & u64::from(u32::MAX)) as usize, (id >> 32) as u32)
}

/// The lease id of `slot` under `generation` (slots stay below 2^32: a table that large
/// would hold more deliveries than any flow-control window allows).
fn pack(slot: usize, generation: u32) -> LeaseId {
    (u64::from(generation) << 32) | slot as u64
}

/// Held deliveries of type `T`, keyed by lease id.
#[derive(Debug)]
pub(crate) struct LeaseTable<T> {
    /// Each held delivery with the generation of its lease.
    slots: Slab<(u32, T)>,
    /// Generation of the next lease.
    next_generation: u32,
}

impl<T> Default for LeaseTable<T> {
    fn default() -> Self {
        LeaseTable {
            slots: Slab::new(),
            next_generation: 0,
        }
    }
}

impl<T> LeaseTable<T> {
    /// An empty table.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Deliveries held.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Holds `held` under a new lease id.
    pub(crate) fn insert(&mut self, held: T) -> LeaseId {
        let generation = self.next_generation;
        self.next_generation = generation.wrapping_add(1);
        pack(self.slots.insert((generation, held)), generation)
    }

    /// The lease id the next [`insert`](Self::insert) returns.
    pub(crate) fn next_id(&self) -> LeaseId {
        pack(self.slots.vacant_key(), self.next_generation)
    }

    /// The delivery held under `id`; `None` for a lease settled already, or never made.
    pub(crate) fn get(&self, id: LeaseId) -> Option<&T> {
        let (slot, generation) = unpack(id);
        match self.slots.get(slot) {
            Some((current, held)) if *current == generation => Some(held),
            _ => None,
        }
    }

    /// [`get`](Self::get), to change it.
    pub(crate) fn get_mut(&mut self, id: LeaseId) -> Option<&mut T> {
        let (slot, generation) = unpack(id);
        match self.slots.get_mut(slot) {
            Some((current, held)) if *current == generation => Some(held),
            _ => None,
        }
    }

    /// Removes and returns the delivery held under `id`.
    pub(crate) fn remove(&mut self, id: LeaseId) -> Option<T> {
        self.remove_if(id, |_| true)
    }

    /// [`remove`](Self::remove), only when `take` says so of the delivery; otherwise
    /// it stays held and `None` is returned.
    pub(crate) fn remove_if(&mut self, id: LeaseId, take: impl FnOnce(&T) -> bool) -> Option<T> {
        let (slot, generation) = unpack(id);
        match self.slots.get(slot) {
            Some((current, held)) if *current == generation && take(held) => {
                self.slots.try_remove(slot).map(|(_, held)| held)
            }
            _ => None,
        }
    }

    /// Removes each of `ids` that is held; an id that is not, or whose `deadline` is not
    /// after `now`, goes to `refused`. Returns the removed live ones, and how many of the
    /// refused had expired (removed as well).
    pub(crate) fn take_live(
        &mut self,
        ids: &[LeaseId],
        now: Instant,
        deadline: impl Fn(&T) -> Instant,
        refused: &mut Vec<LeaseId>,
    ) -> (Vec<(LeaseId, T)>, u64) {
        let mut live = Vec::with_capacity(ids.len());
        let mut expired = 0;
        for &id in ids {
            match self.remove(id) {
                Some(held) if deadline(&held) > now => live.push((id, held)),
                Some(_) => {
                    expired += 1;
                    refused.push(id);
                }
                None => refused.push(id),
            }
        }
        (live, expired)
    }

    /// Keeps only the deliveries for which `keep` answers `true`.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(LeaseId, &mut T) -> bool) {
        self.slots
            .retain(|slot, (generation, held)| keep(pack(slot, *generation), held));
    }

    /// Every held delivery with its lease id.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (LeaseId, &T)> {
        self.slots
            .iter()
            .map(|(slot, (generation, held))| (pack(slot, *generation), held))
    }

    /// [`iter`](Self::iter), to change them.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (LeaseId, &mut T)> {
        self.slots
            .iter_mut()
            .map(|(slot, (generation, held))| (pack(slot, *generation), held))
    }

    /// Removes and returns every held delivery.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.slots.drain().map(|(_, held)| held)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_slot_reused_answers_only_to_its_new_lease() {
        let mut table = LeaseTable::new();
        let first = table.insert("a");
        assert_eq!(table.remove(first), Some("a"));
        let second = table.insert("b");
        assert_ne!(first, second, "same slot, new generation");
        assert_eq!(unpack(first).0, unpack(second).0, "the slot was reused");
        assert_eq!(table.get(first), None);
        assert_eq!(table.remove(first), None);
        assert_eq!(table.get(second), Some(&"b"));
        assert_eq!(table.len(), 1);
        assert_eq!(table.remove_if(second, |held| *held == "a"), None);
        assert_eq!(
            table.get(second),
            Some(&"b"),
            "refused by the predicate: still held"
        );
        assert_eq!(table.remove_if(second, |held| *held == "b"), Some("b"));
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn next_id_is_the_id_insert_gives() {
        let mut table = LeaseTable::new();
        table.insert(1);
        let gone = table.insert(2);
        table.remove(gone);
        let expected = table.next_id();
        assert_eq!(table.insert(3), expected);
    }

    #[test]
    fn the_packing_round_trips_at_the_edges() {
        for (slot, generation) in [(0, 0), (1, u32::MAX), (u32::MAX as usize, 7)] {
            assert_eq!(unpack(pack(slot, generation)), (slot, generation));
        }
    }

    #[test]
    fn the_generation_wraps_without_a_panic() {
        let mut table = LeaseTable::new();
        table.next_generation = u32::MAX;
        let last = table.insert(());
        let wrapped = table.insert(());
        assert_eq!(unpack(last).1, u32::MAX);
        assert_eq!(unpack(wrapped).1, 0);
    }

    #[test]
    fn take_live_splits_live_expired_and_unknown() {
        let now = Instant::now();
        let mut table = LeaseTable::new();
        let live = table.insert(now + Duration::from_secs(1));
        let expired = table.insert(now);
        let unknown = table.insert(now + Duration::from_secs(1));
        table.remove(unknown);
        let mut refused = Vec::new();
        let (taken, count) = table.take_live(&[live, expired, unknown], now, |d| *d, &mut refused);
        assert_eq!(taken.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [live]);
        assert_eq!(count, 1);
        assert_eq!(refused, [expired, unknown]);
        assert_eq!(table.len(), 0, "the expired lease is removed too");
    }

    #[test]
    fn retain_and_iter_see_the_lease_ids() {
        let mut table = LeaseTable::new();
        let ids: Vec<LeaseId> = (0..4).map(|n| table.insert(n)).collect();
        table.retain(|id, n| id != ids[1] && *n != 3);
        let left: Vec<(LeaseId, i32)> = table.iter().map(|(id, n)| (id, *n)).collect();
        assert_eq!(left, [(ids[0], 0), (ids[2], 2)]);
        assert_eq!(table.drain().count(), 2);
        assert_eq!(table.len(), 0);
    }
}
