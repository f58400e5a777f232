//! Settling leases: acks coalesced per shard and chunk, nacks and dead letters at once, and
//! the leases given back at shutdown or never admitted.

use super::{Finished, LeaseGuard, Leaser, Settle, State, EXTEND_CHUNK};
use crate::error::SourceError;
use crate::source::LeaseId;

impl<'a> Leaser<'a> {
    /// Removes a lease from the table and nacks it at the source. (Acks are coalesced, see
    /// [`Leaser::ack_all`]; a nack is sent at once, to give the message back without delay.)
    pub(super) fn settle_nack(&self, guard: &LeaseGuard<'_>) -> Settle {
        let settle = self.settle_one(guard, |id, refused| self.source.nack(&[id], refused));
        if settle == Settle::Done {
            self.metrics.count_nacked(1);
        }
        settle
    }

    /// Removes a lease from the table and dead-letters it at the source with `reason`.
    pub(super) fn settle_reject(&self, guard: &LeaseGuard<'_>, reason: &str) -> Settle {
        let settle = self.settle_one(guard, |id, refused| self.source.reject(id, reason, refused));
        if settle == Settle::Done {
            self.metrics.count_rejected(1);
        }
        settle
    }

    /// Removes a lease from the table and settles it at the source with `op`, at once.
    fn settle_one(
        &self,
        guard: &LeaseGuard<'_>,
        op: impl FnOnce(LeaseId, &mut Vec<LeaseId>) -> Result<(), SourceError>,
    ) -> Settle {
        let Some(entry) = guard.take_entry(&mut self.shard(guard.shard)) else {
            return Settle::Lost;
        };
        if entry.state == State::Lost {
            // The gauge and the counters were updated when it was lost.
            return Settle::Lost;
        }
        self.metrics.sub_held(1);
        let mut refused = Vec::new();
        match op(guard.id, &mut refused) {
            Ok(()) if refused.is_empty() => Settle::Done,
            Ok(()) => Settle::Refused,
            Err(error) => {
                let text = error.to_string();
                self.error_log
                    .log(1, || format!("Could not settle a lease: {text}"));
                Settle::Failed(text)
            }
        }
    }

    /// Acks a buffer of finished leases: one lock per run of leases of the same shard (the
    /// leases of one pull share a shard), one call to the source per [`EXTEND_CHUNK`]. Fills
    /// `outcomes` with how each went, in order; the guards are marked settled, so dropping
    /// them only returns their permits.
    pub(crate) fn ack_all(&self, batch: &mut [Finished<'_>], outcomes: &mut Vec<Settle>) {
        outcomes.clear();
        let mut ids = Vec::with_capacity(batch.len());
        let mut rest = &mut batch[..];
        while let Some(first) = rest.first() {
            let shard = first.guard.shard;
            let run = rest
                .iter()
                .position(|finished| finished.guard.shard != shard)
                .unwrap_or(rest.len());
            let (same, after) = std::mem::take(&mut rest).split_at_mut(run);
            let mut table = self.shard(shard);
            for finished in same {
                let guard = &mut finished.guard;
                guard.settled = true;
                let outcome = match guard.take_entry(&mut table) {
                    Some(entry) if entry.state != State::Lost => {
                        ids.push(entry.id);
                        Settle::Done
                    }
                    // Lost: the gauge and the counters were updated then.
                    _ => Settle::Lost,
                };
                outcomes.push(outcome);
            }
            drop(table);
            rest = after;
        }
        if ids.is_empty() {
            return;
        }
        self.metrics.sub_held(ids.len());
        let mut refused = Vec::new();
        let mut failed: Vec<(LeaseId, String)> = Vec::new();
        for chunk in ids.chunks(EXTEND_CHUNK) {
            let before = refused.len();
            match self.source.ack(chunk, &mut refused) {
                Ok(()) => self
                    .metrics
                    .count_acked((chunk.len() - (refused.len() - before)) as u64),
                Err(error) => {
                    refused.truncate(before);
                    let text = error.to_string();
                    self.error_log.log(chunk.len() as u64, || {
                        format!("Could not ack {} leases: {text}", chunk.len())
                    });
                    failed.extend(chunk.iter().map(|&id| (id, text.clone())));
                }
            }
        }
        if refused.is_empty() && failed.is_empty() {
            return;
        }
        self.metrics.count_stale_acks(refused.len() as u64);
        refused.sort_unstable();
        failed.sort_unstable_by_key(|(id, _)| *id);
        for (finished, outcome) in batch.iter().zip(outcomes.iter_mut()) {
            if *outcome != Settle::Done {
                continue;
            }
            let id = finished.guard.id;
            if refused.binary_search(&id).is_ok() {
                *outcome = Settle::Refused;
            } else if let Ok(at) = failed.binary_search_by_key(&id, |(id, _)| *id) {
                *outcome = Settle::Failed(failed[at].1.clone());
            }
        }
    }

    /// Nacks many guards in one call to the source (the hand-off channel's leftovers at
    /// shutdown). Returns how many leases went back.
    pub(crate) fn nack_all(&self, guards: Vec<LeaseGuard<'_>>) -> usize {
        let mut ids = Vec::with_capacity(guards.len());
        for mut guard in guards {
            guard.settled = true;
            if let Some(entry) = guard.take_entry(&mut self.shard(guard.shard)) {
                if entry.state != State::Lost {
                    ids.push(entry.id);
                }
            }
            // Dropping the guard returns its permit.
        }
        self.metrics.sub_held(ids.len());
        let mut refused = Vec::new();
        for chunk in ids.chunks(EXTEND_CHUNK) {
            refused.clear();
            match self.source.nack(chunk, &mut refused) {
                Ok(()) => self
                    .metrics
                    .count_nacked((chunk.len() - refused.len()) as u64),
                Err(error) => self.error_log.log(chunk.len() as u64, || {
                    format!("Could not nack {} leases: {error}", chunk.len())
                }),
            }
        }
        ids.len()
    }

    /// Nacks leases a source returned beyond what was asked for; they never enter the table.
    pub(crate) fn give_back_unadmitted(&self, ids: &[LeaseId]) {
        let mut refused = Vec::new();
        match self.source.nack(ids, &mut refused) {
            Ok(()) => self
                .metrics
                .count_nacked((ids.len() - refused.len()) as u64),
            Err(error) => self.error_log.log(ids.len() as u64, || {
                format!("Could not nack {} leases: {error}", ids.len())
            }),
        }
    }
}
