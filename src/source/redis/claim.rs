//! Claiming: `pull` takes over entries idle past the ack deadline, then reads new ones, and
//! turns what it got into leases.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{error, warn, Level};
use redis::Value;

use super::acker::{Op, OpKind};
use super::connection::{Class, Failure};
use super::reply::{claim_reply, Entry};
use super::wire;
use super::{lock, Core, Held};
use crate::pipeline::throttle::Throttle;
use crate::source::Lease;

/// Tries to dead-letter a pull's entries that are not messages before they are left for the
/// claim path (a try waits for the reconnection backoff, at most two seconds).
const MALFORMED_TRIES: u32 = 3;

/// About how many bytes of entries one read asks for: `XREADGROUP` and `XAUTOCLAIM` take a
/// count, not a size, so the count is this over the mean size of the last read's entries.
/// Large entries (a stream of 10 MB payloads) would otherwise make a reply of gigabytes,
/// over the longest reply the connection reads, and no read would ever succeed. It bounds
/// only entries over 1 KiB (smaller ones are read 1,024 at a time). At 64 MB, a read of
/// 64 KiB entries kept the client idle while the server wrote the whole reply, and the
/// server idle while the client framed and copied it; at 1 MiB the two overlap, and the
/// bench's 64 KiB consume went from 360-409 MB/s to 814-848 MB/s (1 or 2 consumers, on a
/// loaded machine), and the read buffer stays near 2 MiB where it grew to 128 MiB.
const READ_BYTES: usize = 1024 * 1024;
/// The most entries the first read asks for, before any size is known: 32 entries of
/// Pub/Sub's largest 10 MB data fit in the longest reply.
const FIRST_READ: usize = 32;

/// Aggregates the warnings about entries that are not messages, of every Redis source.
pub(super) static MALFORMED_LOG: Throttle =
    Throttle::new("entries that are not messages dead-lettered", Level::Warn);
/// Aggregates the warnings about entries deleted from the stream while pending.
pub(super) static DELETED_LOG: Throttle = Throttle::new(
    "entries deleted while pending dead-lettered as tombstones",
    Level::Warn,
);

/// A connection's id in [`Core::blocked_reads`] for as long as its read blocks.
struct BlockedRead<'a> {
    registry: &'a Mutex<Vec<i64>>,
    id: i64,
}

impl<'a> BlockedRead<'a> {
    fn enter(registry: &'a Mutex<Vec<i64>>, id: i64) -> Self {
        lock(registry).push(id);
        BlockedRead { registry, id }
    }
}

impl Drop for BlockedRead<'_> {
    fn drop(&mut self) {
        let mut ids = lock(self.registry);
        if let Some(at) = ids.iter().position(|&id| id == self.id) {
            ids.swap_remove(at);
        }
    }
}

impl Core {
    /// At most `room` entries, bounded by [`READ_BYTES`] over the mean size of the last
    /// read's entries.
    fn read_count(&self, room: usize) -> usize {
        read_count(self.entry_bytes.load(Ordering::Relaxed), room)
    }

    /// Claims entries idle past the ack deadline, then reads new ones (up to `max` in all:
    /// `XREADGROUP COUNT` is the free part of the caller's flow-control window), blocking up
    /// to `wait` in steps of the configured block while nothing comes.
    pub(super) fn pull_into(
        &self,
        max: usize,
        wait: Duration,
        out: &mut Vec<Lease>,
    ) -> Result<(), Failure> {
        let end = Instant::now() + wait;
        loop {
            self.claim_due(max, out)?;
            let room = self.read_count(max.saturating_sub(out.len()));
            if room == 0 {
                return Ok(());
            }
            // Block only when nothing was claimed, and never longer than the configured block,
            // so that an interrupt and the next sweep are noticed promptly.
            let left = end.saturating_duration_since(Instant::now());
            let block = if out.is_empty() {
                left.min(self.config.block)
            } else {
                Duration::ZERO
            };
            let sent_at = Instant::now();
            // Encoded by hand and read in place (see `wire`): no reply tree is built.
            let mut packed = Vec::with_capacity(128);
            wire::command(&mut packed, if block.is_zero() { 9 } else { 11 });
            for part in [
                &b"XREADGROUP"[..],
                b"GROUP",
                self.config.group.as_bytes(),
                self.config.consumer.as_bytes(),
                b"COUNT",
                room.to_string().as_bytes(),
            ] {
                wire::arg(&mut packed, part);
            }
            // BLOCK 0 would block forever: no wait means no BLOCK argument.
            if !block.is_zero() {
                wire::arg(&mut packed, b"BLOCK");
                wire::arg(
                    &mut packed,
                    (block.as_millis().max(1) as u64).to_string().as_bytes(),
                );
            }
            for part in [&b"STREAMS"[..], self.config.stream.as_bytes(), b">"] {
                wire::arg(&mut packed, part);
            }
            let entries = self.with_connection(Class::Read, |con| {
                if block.is_zero() {
                    return con.read_group(&packed);
                }
                // Registered before the interrupt flag is checked, and `interrupt` sets the
                // flag before it reads the registry: a read that blocks after an interrupt
                // is unblocked, unless its command reaches the server after the
                // `CLIENT UNBLOCK` (then it ends with its block).
                let _blocked = BlockedRead::enter(&self.blocked_reads, con.client_id()?);
                if self.interrupted.load(Ordering::SeqCst) {
                    return Ok(Vec::new());
                }
                con.read_group(&packed)
            })?;
            self.lease_all_from(entries, sent_at, out);
            if !out.is_empty() || Instant::now() >= end || self.interrupted.load(Ordering::SeqCst) {
                return Ok(());
            }
        }
    }

    /// Runs one step of the sweep for expired entries when it is due. A sweep walks the
    /// whole pending list, one bounded `XAUTOCLAIM` per pull; after a sweep that found
    /// nothing, the next one waits a tenth of the ack deadline (10 ms to 200 ms): an
    /// `XAUTOCLAIM` over a long pending list costs the server far more than reading new
    /// entries, and an expired entry waits at most that much longer.
    fn claim_due(&self, max: usize, out: &mut Vec<Lease>) -> Result<(), Failure> {
        let start = {
            let cursor = lock(&self.claim_cursor);
            if cursor.start == "0-0" && Instant::now() < cursor.due {
                return Ok(());
            }
            cursor.start.clone()
        };
        let (next, entries) = self.claim(&start, self.read_count(max))?;
        let found = !entries.is_empty();
        self.lease_all_from(entries, Instant::now(), out);
        let mut cursor = lock(&self.claim_cursor);
        if next == "0-0" && !found {
            let pause = (self.config.ack_deadline / 10)
                .clamp(Duration::from_millis(10), Duration::from_millis(200));
            cursor.due = Instant::now() + pause;
        }
        cursor.start = next;
        Ok(())
    }

    /// Runs the claim script from `start`; returns the next start and the entries.
    fn claim(&self, start: &str, count: usize) -> Result<(String, Vec<Entry>), Failure> {
        let min_idle = self.config.ack_deadline.as_millis() as u64;
        let reply: Value = self.with_connection(Class::Read, |con| {
            self.scripts
                .claim
                .key(&self.config.stream)
                .key(&self.dead_stream)
                .arg(&self.config.group)
                .arg(&self.config.consumer)
                .arg(self.config.max_attempts)
                .arg(min_idle)
                .arg(start)
                .arg(count)
                .arg(self.config.dead_letter_max)
                .invoke(con)
        })?;
        let claimed = claim_reply(reply);
        if !claimed.past.is_empty() {
            let ops: Vec<Op> = claimed
                .past
                .iter()
                .map(|&(entry, deliveries, attempt)| Op {
                    kind: OpKind::Dead,
                    lease: 0,
                    entry,
                    deliveries,
                    attempt,
                    reason: None,
                })
                .collect();
            warn!(
                "dead-lettering {} messages past their attempts to {}",
                ops.len(),
                self.dead_stream
            );
            self.dead_letter_now(&ops);
        }
        if claimed.gone > 0 {
            self.deleted_while_pending(claimed.gone, &claimed.first_gone);
        }
        Ok((claimed.next, claimed.entries))
    }

    /// Counts entries found deleted from the stream while pending (trimmed, `XDEL`), which a
    /// script recorded as tombstones in the dead-letter stream; logs them, aggregated.
    pub(super) fn deleted_while_pending(&self, count: u64, first: &str) {
        lock(&self.stats).dead_lettered += count;
        self.settled.fetch_add(count, Ordering::Relaxed);
        DELETED_LOG.log(count, || {
            format!(
                "{count} entries of {} were deleted from the stream while pending (trimmed, or \
                 XDEL), their content gone (the first: {first}); dead-lettered as tombstones to {}",
                self.config.stream, self.dead_stream
            )
        });
    }

    /// Turns entries delivered at `since` into leases; dead-letters entries that are not
    /// messages at all, with the reason.
    fn lease_all_from(&self, entries: Vec<Entry>, since: Instant, out: &mut Vec<Lease>) {
        if entries.is_empty() {
            return;
        }
        let deadline = since + self.config.ack_deadline;
        let bytes: usize = entries
            .iter()
            .map(|(_, fields, _)| fields.message.as_ref().map_or(0, |m| m.size()))
            .sum();
        self.entry_bytes
            .store((bytes / entries.len()).max(1), Ordering::Relaxed);
        // Parsed before the lease table is locked: the table is shared with every handler's
        // ack, so it is held only to insert.
        let mut malformed = Vec::new();
        let mut parsed = Vec::with_capacity(entries.len());
        for (entry, fields, deliveries) in entries {
            let attempt = fields.attempts.saturating_add(deliveries);
            match fields.message {
                Ok(message) => parsed.push((entry, message, deliveries, attempt)),
                Err(reason) => malformed.push(Op {
                    kind: OpKind::Undecodable,
                    lease: 0,
                    entry,
                    deliveries: 0,
                    attempt,
                    reason: Some(reason.into()),
                }),
            }
        }
        let mut leases = lock(&self.leases);
        out.reserve(parsed.len());
        for (entry, message, deliveries, attempt) in parsed {
            let id = leases.insert(Held {
                entry,
                deliveries,
                attempt,
                deadline,
            });
            out.push(Lease {
                message,
                attempt,
                id,
            });
        }
        drop(leases);
        if !malformed.is_empty() {
            // Aggregated: a stream full of another program's entries logged a line per read.
            MALFORMED_LOG.log(malformed.len() as u64, || {
                format!(
                    "dead-lettering {} entries of {} that are not messages (the first: {})",
                    malformed.len(),
                    self.config.stream,
                    malformed[0].reason.as_deref().unwrap_or("")
                )
            });
            self.dead_letter_now(&malformed);
        }
    }

    /// Dead-letters entries that are not messages, or past their attempts. Sent on this
    /// thread: a pull may block. (Past their attempts: a claim script that dead-lettered
    /// them itself and whose answer was lost left them uncounted.)
    ///
    /// A try whose answer is lost may have done its work all the same: the script copying
    /// huge entries can outlast the socket timeout (ten entries of 16 MiB did), and is then
    /// taken for a lost connection although Redis ran it to the end. So a failed try is
    /// followed by another marked as a retry, which counts an entry no longer pending as
    /// dead-lettered, as the acker's retries do; else the dead letters went uncounted and a
    /// `--messages N` that counts them never completed. When every try fails, the entries
    /// stay pending: they are claimed (and dead-lettered) again after the ack deadline.
    fn dead_letter_now(&self, ops: &[Op]) {
        let mut retried = false;
        for tried in 1..=MALFORMED_TRIES {
            match self.send_ops(ops, retried) {
                Ok(()) => return,
                Err(Failure::Down { retry_in })
                    if tried < MALFORMED_TRIES && !self.interrupted.load(Ordering::SeqCst) =>
                {
                    retried = true;
                    self.nap(retry_in);
                }
                Err(_) => break,
            }
        }
        error!(
            "could not dead-letter {} entries yet; they are claimed again after the ack deadline",
            ops.len()
        );
    }

    /// Drops leases whose local deadline passed: their entries are claimed again (by any
    /// consumer) once idle past the ack deadline.
    pub(super) fn expire_local(&self) {
        let now = Instant::now();
        let mut leases = lock(&self.leases);
        let before = leases.len();
        leases.retain(|_, held| held.deadline > now);
        let expired = (before - leases.len()) as u64;
        drop(leases);
        if expired > 0 {
            lock(&self.stats).expired += expired;
        }
    }
}

/// At most `room` entries of `mean` bytes each (0: not known yet), about [`READ_BYTES`] in
/// all, and at least one.
fn read_count(mean: usize, room: usize) -> usize {
    match mean {
        0 => room.min(FIRST_READ),
        mean => room.min((READ_BYTES / mean).max(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::read_count;

    #[test]
    fn a_read_asks_for_about_a_mebibyte_of_large_entries_and_the_room_of_small_ones() {
        assert_eq!(read_count(0, 1024), 32, "size unknown: the first read");
        assert_eq!(read_count(0, 5), 5);
        assert_eq!(read_count(100, 1024), 1024, "small entries: the room");
        assert_eq!(read_count(1024, 1024), 1024);
        assert_eq!(read_count(64 * 1024, 1024), 16, "64 KiB entries: 1 MiB");
        assert_eq!(read_count(64 * 1024, 3), 3);
        assert_eq!(
            read_count(10_000_000, 1024),
            1,
            "10 MB entries: one at a time"
        );
    }
}
