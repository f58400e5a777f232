//! The extension thread: each round extends, in batched calls to the source, every lease
//! whose deadline falls within the margin, and logs what it extended, capped or lost.

use std::sync::atomic::Ordering;
use std::sync::MutexGuard;
use std::task::Waker;
use std::time::{Duration, Instant};

use log::{debug, info, log_enabled, Level};
use slab::Slab;

use super::{Clock, Entry, LeaseSettings, Leaser, State, Tick, EXTEND_CHUNK, INFO_LINES_PER_ROUND};
use crate::message::Label;
use crate::source::LeaseId;
use crate::sync;

impl<'a> Leaser<'a> {
    /// The extension thread: one round every period until stopped.
    ///
    /// # Blocking
    ///
    /// Runs on its own `std::thread`: it calls the source and sleeps between rounds.
    pub(crate) fn run(&self, seed: u64) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut round = Round::default();
        loop {
            // Read every round: with `auto` the deadline, and so the period, follows the
            // handling times.
            let period = self.settings.period(self.deadline());
            // Jitter of up to a tenth of the period, so that several instances sharing a
            // broker do not send their batches in step.
            let jitter = period.mul_f64(rng.f64() / 10.0);
            let wake_at = Instant::now() + period - jitter;
            let mut stopped = sync::lock(&self.stopped);
            loop {
                if *stopped {
                    return;
                }
                let left = wake_at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                stopped = sync::wait_timeout(&self.wake, stopped, left).0;
            }
            drop(stopped);
            self.round(Instant::now(), &mut round);
        }
    }

    /// With `auto`, sets the deadline to the p99 of the handling times so far, within
    /// 10 s..10 min, as Google's clients do (their leaser reads its histogram of ack
    /// latencies). The histogram holds every handling time since the start, so the p99 moves
    /// slowly. A change of whole seconds is logged.
    pub(super) fn follow_handling_times(&self) {
        if !self.settings.auto {
            return;
        }
        let p99_ms = self.metrics.latency_quantile_ms(0.99);
        if p99_ms <= 0.0 {
            // Nothing acked yet: keep the start value.
            return;
        }
        let p99 = Duration::from_secs_f64(p99_ms / 1000.0);
        let chosen = LeaseSettings::auto_deadline(p99);
        let before = self.deadline();
        if chosen.as_secs() != before.as_secs() {
            info!(
                "Ack deadline now {} (p99 of handling times {p99:.1?}, within 10s..10m)",
                seconds(chosen)
            );
        }
        self.deadline_ms
            .store(Clock::ticks(chosen), Ordering::Relaxed);
    }

    /// One extension round: extends every lease whose deadline falls within the margin.
    fn round(&self, now: Instant, round: &mut Round) {
        self.follow_handling_times();
        let deadline = self.deadline();
        let margin = self.settings.margin(deadline);
        let horizon = self.clock.tick(now + margin);
        let now_tick = self.clock.tick(now);
        let max_lease = Clock::ticks(self.settings.max_lease);
        round.clear();
        for (shard, table) in self.shards.iter().enumerate() {
            let mut table = sync::lock(table);
            for (slot, entry) in table.iter_mut() {
                if entry.state != State::Held {
                    continue;
                }
                if entry.deadline > horizon {
                    continue;
                }
                if now_tick.saturating_sub(entry.pulled) >= max_lease {
                    entry.state = State::Capped;
                    round.capped.push(entry.label.clone());
                    continue;
                }
                round.ids.push(entry.id);
                round.keys.push((shard as u32, slot as u32));
            }
        }
        self.report_round_warnings(round);
        let mut refused = Vec::new();
        let (all_ids, all_keys) = (
            std::mem::take(&mut round.ids),
            std::mem::take(&mut round.keys),
        );
        for (ids, keys) in all_ids
            .chunks(EXTEND_CHUNK)
            .zip(all_keys.chunks(EXTEND_CHUNK))
        {
            refused.clear();
            let sent = Instant::now();
            if let Err(error) = self.source.extend(ids, deadline, &mut refused) {
                // Left as they are: the next round tries again while the deadlines last.
                self.error_log.log(ids.len() as u64, || {
                    format!("Could not extend {} leases: {error}", ids.len())
                });
                continue;
            }
            self.metrics
                .count_extended((ids.len() - refused.len()) as u64);
            let until = self.clock.tick(sent + deadline);
            self.apply(ids, keys, &refused, until, round);
        }
        (round.ids, round.keys) = (all_ids, all_keys);
        self.log_extensions(round);
    }

    /// Records the outcome of one `extend` call in the table.
    fn apply(
        &self,
        ids: &[LeaseId],
        keys: &[(u32, u32)],
        refused: &[LeaseId],
        deadline: Tick,
        round: &mut Round,
    ) {
        // Refusals are rare; a sorted copy makes each check a binary search.
        let mut refused = refused.to_vec();
        refused.sort_unstable();
        let mut lost = 0;
        let mut wakers = Vec::new();
        let mut current: Option<(u32, MutexGuard<'_, Slab<Entry>>)> = None;
        for (&id, &(shard, slot)) in ids.iter().zip(keys) {
            if current.as_ref().map(|(index, _)| *index) != Some(shard) {
                current = Some((shard, self.shard(shard)));
            }
            let Some((_, table)) = current.as_mut() else {
                continue;
            };
            let Some(entry) = table.get_mut(slot as usize) else {
                continue;
            };
            // Settled (and the slot reused) while the call was made: nothing to record.
            if entry.id != id || entry.state != State::Held {
                continue;
            }
            if refused.binary_search(&id).is_ok() {
                entry.state = State::Lost;
                lost += 1;
                round.lost.push(entry.label.clone());
                if let Some(waker) = entry.waker.take() {
                    wakers.push(waker);
                }
                continue;
            }
            entry.deadline = deadline;
            entry.extended += 1;
            if entry.handling {
                round.handled.push(entry.label.clone());
            } else {
                round.waiting += 1;
            }
        }
        drop(current);
        if lost > 0 {
            self.metrics.sub_held(lost);
            self.metrics.count_lost(lost as u64);
            self.lost_epoch.fetch_add(1, Ordering::SeqCst);
            wakers.into_iter().for_each(Waker::wake);
        }
    }

    /// Logs the warnings a round found: leases past `max_lease`.
    fn report_round_warnings(&self, round: &Round) {
        if let Some(first) = round.capped.first() {
            self.metrics.count_max_lease(round.capped.len() as u64);
            self.max_lease_log.log(round.capped.len() as u64, || {
                format!(
                    "Lease of {first} (message id {}) held past --max-lease {}: no longer extended, it will be delivered again{}",
                    first.id(),
                    humantime::format_duration(self.settings.max_lease),
                    others(round.capped.len())
                )
            });
        }
    }

    /// Logs the extensions of a round: one info line per message being handled when few,
    /// else a summary (each line at debug level).
    fn log_extensions(&self, round: &Round) {
        let by = seconds(self.deadline());
        if round.handled.len() <= INFO_LINES_PER_ROUND {
            for message in &round.handled {
                info!("Extended deadline by {by} for {message}");
            }
        } else {
            info!(
                "Extended deadline by {by} for {} messages being handled",
                round.handled.len()
            );
            if log_enabled!(Level::Debug) {
                for message in &round.handled {
                    debug!("Extended deadline by {by} for {message}");
                }
            }
        }
        if round.waiting > 0 {
            debug!(
                "Extended deadline by {by} for {} messages waiting for a handler",
                round.waiting
            );
        }
        if let Some(first) = round.lost.first() {
            self.lost_log.log(round.lost.len() as u64, || {
                format!(
                    "Lost the lease of {first}: dropped its handler; the source took the message back (delivered again, or dead-lettered when the broker no longer holds it or it is out of attempts){}",
                    others(round.lost.len())
                )
            });
        }
    }
}

/// Scratch space of one extension round, kept between rounds to avoid reallocating.
#[derive(Debug, Default)]
struct Round {
    /// Leases to extend.
    ids: Vec<LeaseId>,
    /// Where each of `ids` is in the table.
    keys: Vec<(u32, u32)>,
    /// Messages being handled whose leases were extended.
    handled: Vec<Label>,
    /// Leases extended while waiting for a handler.
    waiting: usize,
    /// Messages whose leases were lost.
    lost: Vec<Label>,
    /// Messages whose leases reached `max_lease`.
    capped: Vec<Label>,
}

impl Round {
    /// Empties the scratch space, and gives back most of it when it is far larger than the
    /// last round needed (a burst of a million leases must not keep its memory for good).
    fn clear(&mut self) {
        let used = self.ids.len();
        if self.ids.capacity() > 4 * used + 1024 {
            self.ids.shrink_to(2 * used);
            self.keys.shrink_to(2 * used);
            self.handled.shrink_to(2 * used);
        }
        self.ids.clear();
        self.keys.clear();
        self.handled.clear();
        self.waiting = 0;
        self.lost.clear();
        self.capped.clear();
    }
}

/// ` and N others` for a line that stands for several messages.
fn others(count: usize) -> String {
    match count {
        0 | 1 => String::new(),
        2 => " (and 1 other)".to_owned(),
        _ => format!(" (and {} others)", count - 1),
    }
}

/// A duration as the reference logs it: `3 seconds`, or `1.5s` when not whole.
pub(crate) fn seconds(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{} seconds", duration.as_secs())
    } else {
        humantime::format_duration(duration).to_string()
    }
}
