//! The batching acker: a worker thread that sends queued acks, nacks and extensions, one
//! script call per batch, and counts what Redis answered.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use log::debug;
use redis::{ConnectionLike, Value};

use super::connection::{Class, Failure, BACKOFF_MAX};
use super::reply::{int, EntryId};
use super::wire;
use super::{lock, Core, Held};
use crate::source::LeaseId;

/// Most queued lease operations sent in one round trip. Acks go as one `XACK` of them all:
/// every command costs the server a fixed part besides its entries, and under load the queue
/// fills while a batch is out, so the next `XACK` is larger.
const OPS_BATCH: usize = 4096;
/// Most checked operations in one script call (a script blocks the server while it runs).
const SCRIPT_BATCH: usize = 512;

/// A queued lease operation.
#[derive(Debug, Clone)]
pub(super) struct Op {
    /// What to do.
    pub(super) kind: OpKind,
    /// The lease (to expire it locally when Redis says it is not ours any more).
    pub(super) lease: LeaseId,
    /// The entry.
    pub(super) entry: EntryId,
    /// Delivery count the entry must still have.
    pub(super) deliveries: u32,
    /// Attempts so far, stored with a requeued or dead-lettered copy.
    pub(super) attempt: u32,
    /// Why a rejected or undecodable entry is dead-lettered (stored with its dead letter).
    pub(super) reason: Option<Arc<str>>,
}

/// The kinds of lease operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpKind {
    /// Ack the entry.
    Ack,
    /// Reset the entry's idle time.
    Extend,
    /// Add a copy for another delivery and ack the entry.
    Requeue,
    /// Add a copy to the dead-letter stream and ack the entry: it used up its attempts.
    Dead,
    /// [`OpKind::Dead`] on any attempt, with a reason: its handler rejected it.
    Reject,
    /// [`OpKind::Dead`] on its first delivery, with a reason: no decoding can read it.
    Undecodable,
}

impl Op {
    /// An operation on a held lease.
    pub(super) fn new(kind: OpKind, lease: LeaseId, held: Held) -> Self {
        Op {
            kind,
            lease,
            entry: held.entry,
            deliveries: held.deliveries,
            attempt: held.attempt,
            reason: None,
        }
    }

    /// The script's name of the operation.
    fn name(&self) -> &'static str {
        match self.kind {
            OpKind::Ack => "ack",
            OpKind::Extend => "extend",
            OpKind::Requeue => "requeue",
            OpKind::Dead | OpKind::Reject | OpKind::Undecodable => "dead",
        }
    }
}

impl Core {
    /// Sends lease operations in one round trip and counts what Redis answered: the acks
    /// as one `XACK` of many ids, the rest in one script call that checks ownership first.
    ///
    /// Acks need no ownership check: an entry is acked at most once whoever acks it, and a
    /// message whose handler succeeded is done even when its lease passed to another
    /// consumer meanwhile (that consumer's ack then counts as a late refusal). Extensions,
    /// requeues and dead letters are checked, as they must never touch an entry another
    /// consumer holds.
    ///
    /// `retried` says that an earlier try of the same batch failed: an ack or dead letter
    /// that now finds its entry no longer pending was most likely done by that try, so it
    /// counts as done, not as refused. The rare exception, an entry that sat idle past the
    /// ack deadline meanwhile and was claimed and acked by another consumer, is then counted
    /// by both: the count can be one high, the entry is still acked once.
    pub(super) fn send_ops(&self, ops: &[Op], retried: bool) -> Result<(), Failure> {
        let acks: Vec<EntryId> = ops
            .iter()
            .filter(|op| op.kind == OpKind::Ack)
            .map(|op| op.entry)
            .collect();
        let checked: Vec<&Op> = ops.iter().filter(|op| op.kind != OpKind::Ack).collect();
        // One pipeline: the script calls for the checked operations, then one XACK of every
        // acked id (encoded by hand: no string per id).
        let mut packed = Vec::new();
        let mut commands = 0;
        for checked in checked.chunks(SCRIPT_BATCH) {
            let mut command = redis::cmd("EVALSHA");
            command
                .arg(self.scripts.lease.get_hash())
                .arg(2)
                .arg(&self.config.stream)
                .arg(&self.dead_stream)
                .arg(&self.config.group)
                .arg(&self.config.consumer)
                .arg(self.config.dead_letter_max);
            for op in checked {
                command
                    .arg(op.name())
                    .arg(op.entry.to_string())
                    .arg(op.deliveries)
                    .arg(op.attempt)
                    .arg(op.reason.as_deref().unwrap_or(""));
            }
            command.write_packed_command(&mut packed);
            commands += 1;
        }
        if !acks.is_empty() {
            packed.reserve(40 + acks.len() * 24);
            wire::command(&mut packed, 3 + acks.len());
            wire::arg(&mut packed, b"XACK");
            wire::arg(&mut packed, self.config.stream.as_bytes());
            wire::arg(&mut packed, self.config.group.as_bytes());
            for &id in &acks {
                wire::arg_id(&mut packed, id);
            }
            commands += 1;
        }
        let replies: Vec<Value> = self.with_connection(Class::Leases, |con| {
            let replies = con.req_packed_commands(&packed, 0, commands)?;
            // An error reply of either command fails the batch, as a pipeline query does.
            replies
                .into_iter()
                .map(Value::extract_error)
                .collect::<Result<Vec<Value>, _>>()
        })?;
        let mut replies = replies.into_iter();
        // `None` for an operation its script call did not answer: nothing is counted for it.
        let mut answers: Vec<Option<i64>> = Vec::with_capacity(checked.len());
        for chunk in checked.chunks(SCRIPT_BATCH) {
            let before = answers.len();
            if let Some(Value::Array(items)) = replies.next() {
                answers.extend(items.iter().map(|item| Some(int(item).unwrap_or(0))));
            }
            answers.resize(before + chunk.len(), None);
        }
        if !acks.is_empty() {
            let done = replies
                .next()
                .as_ref()
                .and_then(int)
                .and_then(|n| u64::try_from(n).ok())
                .unwrap_or(0);
            let sent = acks.len() as u64;
            let done = if retried { sent } else { done.min(sent) };
            self.settled.fetch_add(done, Ordering::Relaxed);
            lock(&self.stats).late_refusals += sent - done;
        }
        let mut stats = lock(&self.stats);
        let mut expired = Vec::new();
        let mut gone = Vec::new();
        for (op, answer) in checked.iter().zip(answers) {
            let Some(answer) = answer else { continue };
            match (op.kind, answer) {
                // Acks went by XACK, above.
                (OpKind::Ack, _) => {}
                (OpKind::Dead | OpKind::Reject | OpKind::Undecodable, 1 | 2)
                    if answer == 1 || retried =>
                {
                    stats.dead_lettered += 1;
                    stats.undecodable += u64::from(op.kind == OpKind::Undecodable);
                    self.settled.fetch_add(1, Ordering::Relaxed);
                }
                // Deleted from the stream while pending: a tombstone was dead-lettered, and
                // an extended lease ends (its ack would find nothing pending).
                (_, 3) => {
                    gone.push(op.entry.to_string());
                    if op.kind == OpKind::Extend {
                        expired.push(op.lease);
                    }
                }
                (OpKind::Extend, 1)
                | (OpKind::Requeue, _)
                | (OpKind::Dead | OpKind::Reject | OpKind::Undecodable, _) => {}
                (OpKind::Extend, _) => expired.push(op.lease),
            }
        }
        drop(stats);
        if let Some(first) = gone.first() {
            self.deleted_while_pending(gone.len() as u64, first);
        }
        if !expired.is_empty() {
            // Another consumer claimed these entries: the local leases end now, so that
            // their acks are refused.
            let mut leases = lock(&self.leases);
            let now = Instant::now();
            for lease in expired {
                if let Some(held) = leases.get_mut(lease) {
                    held.deadline = now;
                }
            }
        }
        Ok(())
    }

    /// The worker thread: sends queued lease operations in batches until the queue closes.
    /// While the server fails, a batch is retried with backoff; once the source is dropped,
    /// a batch that cannot be sent is given up (its entries are claimed again after the ack
    /// deadline) and counted in the warning.
    pub(super) fn run_ops(&self, queue: mpsc::Receiver<Vec<Op>>) {
        let mut waiting: Vec<Op> = Vec::new();
        let mut batch = Vec::with_capacity(OPS_BATCH);
        loop {
            if waiting.is_empty() {
                match queue.recv() {
                    Ok(ops) => waiting = ops,
                    Err(_) => return,
                }
            }
            // Whatever else is queued joins the batch, up to its bound.
            while waiting.len() < OPS_BATCH {
                match queue.try_recv() {
                    Ok(mut ops) => waiting.append(&mut ops),
                    Err(_) => break,
                }
            }
            let take = waiting.len().min(OPS_BATCH);
            batch.extend(waiting.drain(..take));
            let mut retried = false;
            loop {
                match self.send_ops(&batch, retried) {
                    Ok(()) => break,
                    Err(Failure::Down { retry_in }) => {
                        retried = true;
                        if self.is_closing() {
                            self.give_up(&batch, &waiting, &queue);
                            return;
                        }
                        self.nap(retry_in);
                    }
                    Err(Failure::GaveUp(text)) => {
                        if self.is_closing() {
                            debug!("{text}");
                            self.give_up(&batch, &waiting, &queue);
                            return;
                        }
                        retried = true;
                        self.nap(BACKOFF_MAX);
                    }
                }
            }
            self.answered(batch.len() as u64);
            batch.clear();
        }
    }

    /// Gives up every operation not yet sent, once the source is dropped while the server
    /// fails: their entries are claimed again after the ack deadline. The drop logs the
    /// count.
    fn give_up(&self, batch: &[Op], waiting: &[Op], queue: &mpsc::Receiver<Vec<Op>>) {
        let left =
            batch.len() + waiting.len() + queue.try_iter().map(|ops| ops.len()).sum::<usize>();
        debug!("gave up {left} lease operations");
        self.answered(left as u64);
    }
}
