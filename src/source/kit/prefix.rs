//! Cumulative acks: the fewest frames per message that at-least-once allows on a broker
//! that numbers the deliveries of a channel (or partition) and settles a whole run of them
//! at once.
//!
//! RabbitMQ numbers the deliveries of a channel 1, 2, 3, … and `basic.ack` (or `basic.nack`)
//! with `multiple` settles every outstanding delivery up to a tag in one frame; Kafka's
//! offset commits and JetStream's `AckAll` have the same shape. Handlers finish out of
//! order, so a tag can be covered that way only once every tag before it is settled:
//! [`Prefix`] keeps what each delivery became since the last frame, and turns the settled
//! run at its front into one frame per kind.
//!
//! A straggler at the front (a delivery still with its handler) holds the others back; past
//! [`STRAGGLER_WAIT`] those behind it are sent one frame each, as they would be without the
//! prefix, so that neither the broker's prefetch nor a flush waits on one slow handler.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Longest a settled delivery waits behind an unsettled one before it is sent alone.
///
/// Held-back deliveries count against the broker's prefetch: at 100,000 messages a second
/// 25 ms is 2,500 of them, a quarter of the default window of 10,000.
pub(crate) const STRAGGLER_WAIT: Duration = Duration::from_millis(25);

/// What a delivery became.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Acked (RabbitMQ: `basic.ack`).
    Ack,
    /// Given back to be delivered again (`basic.nack` with requeue).
    Requeue,
    /// Dead-lettered (`basic.nack` without requeue).
    Dead,
}

/// One frame to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    /// What it does.
    pub(crate) kind: Settle,
    /// The delivery tag.
    pub(crate) tag: u64,
    /// Whether it covers every outstanding delivery up to `tag`.
    pub(crate) multiple: bool,
    /// How many deliveries it settles.
    pub(crate) count: u64,
}

/// The state of one delivery since the last frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// With its handler, or not pulled yet.
    Open,
    /// Settled, not sent.
    Due(Settle),
    /// Sent alone past [`STRAGGLER_WAIT`]; a later `multiple` frame skips it.
    Sent,
}

/// The deliveries of one channel from the first one not covered by a frame.
#[derive(Debug)]
pub(crate) struct Prefix {
    /// The link (channel) the tags belong to.
    epoch: u64,
    /// The tag of `states[0]`.
    base: u64,
    /// What each delivery from `base` on became.
    states: VecDeque<State>,
    /// How many of `states` are `Due`.
    due: u64,
    /// Since when a `Due` delivery waits behind an `Open` one.
    held_since: Option<Instant>,
}

/// What [`Prefix::reset`] dropped: settled deliveries whose frame was never sent.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Dropped {
    /// Acks among them (the broker gives their messages back: late refusals).
    pub(crate) acks: u64,
    /// All of them.
    pub(crate) all: u64,
}

impl Prefix {
    /// An empty prefix for the channel of link `epoch` (its first delivery tag is 1).
    pub(crate) fn new(epoch: u64) -> Prefix {
        Prefix {
            epoch,
            base: 1,
            states: VecDeque::new(),
            due: 0,
            held_since: None,
        }
    }

    /// The link the tags belong to.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How many settled deliveries wait for a frame.
    #[cfg(test)]
    pub(crate) fn due(&self) -> u64 {
        self.due
    }

    /// Starts over for link `epoch` (the old channel is gone, and with it its outstanding
    /// deliveries); returns what was settled and never sent.
    pub(crate) fn reset(&mut self, epoch: u64) -> Dropped {
        let mut dropped = Dropped::default();
        for state in &self.states {
            if let State::Due(kind) = state {
                dropped.all += 1;
                dropped.acks += u64::from(*kind == Settle::Ack);
            }
        }
        *self = Prefix::new(epoch);
        dropped
    }

    /// Records that delivery `tag` became `kind`; returns false (and records nothing) for a
    /// tag already settled: sending it again would be a channel error.
    pub(crate) fn settle(&mut self, tag: u64, kind: Settle) -> bool {
        let Some(index) = tag
            .checked_sub(self.base)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return false;
        };
        if index >= self.states.len() {
            self.states.resize(index + 1, State::Open);
        }
        match self.states.get_mut(index) {
            Some(state @ State::Open) => {
                *state = State::Due(kind);
                self.due += 1;
                true
            }
            _ => false,
        }
    }

    /// The frames for what is settled at the front, one per run of one kind, each with
    /// `multiple`; and, once the oldest delivery held back has waited [`STRAGGLER_WAIT`]
    /// (or `force`), one frame for each delivery behind the front.
    pub(crate) fn frames(&mut self, now: Instant, force: bool, out: &mut Vec<Frame>) {
        self.front(out);
        if self.due == 0 {
            self.held_since = None;
            return;
        }
        let since = *self.held_since.get_or_insert(now);
        if !force && now.duration_since(since) < STRAGGLER_WAIT {
            return;
        }
        for (tag, state) in (self.base..).zip(self.states.iter_mut()) {
            if let State::Due(kind) = *state {
                *state = State::Sent;
                out.push(Frame {
                    kind,
                    tag,
                    multiple: false,
                    count: 1,
                });
            }
        }
        self.due = 0;
        self.held_since = None;
        // What was sent alone may now lead the front.
        while self.states.front() == Some(&State::Sent) {
            self.states.pop_front();
            self.base += 1;
        }
    }

    /// When the oldest delivery held back behind the front is due to be sent alone.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.held_since.map(|since| since + STRAGGLER_WAIT)
    }

    /// Covers the settled run at the front.
    fn front(&mut self, out: &mut Vec<Frame>) {
        loop {
            // Deliveries sent alone lead nothing: skip them.
            while self.states.front() == Some(&State::Sent) {
                self.states.pop_front();
                self.base += 1;
            }
            let Some(&State::Due(kind)) = self.states.front() else {
                return;
            };
            let mut last = self.base;
            let mut count = 0;
            let mut covered = 0;
            for (i, (tag, state)) in (self.base..).zip(self.states.iter()).enumerate() {
                match *state {
                    State::Due(k) if k == kind => {
                        last = tag;
                        count += 1;
                        covered = i + 1;
                    }
                    State::Sent => {}
                    _ => break,
                }
            }
            // `Sent` ones after the run's last delivery stay: they may join the next run.
            self.states.drain(..covered);
            self.base = last + 1;
            self.due -= count;
            out.push(Frame {
                kind,
                tag: last,
                multiple: true,
                count,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(prefix: &mut Prefix, now: Instant, force: bool) -> Vec<Frame> {
        let mut out = Vec::new();
        prefix.frames(now, force, &mut out);
        out
    }

    fn multiple(kind: Settle, tag: u64, count: u64) -> Frame {
        Frame {
            kind,
            tag,
            multiple: true,
            count,
        }
    }

    fn single(kind: Settle, tag: u64) -> Frame {
        Frame {
            kind,
            tag,
            multiple: false,
            count: 1,
        }
    }

    #[test]
    fn an_in_order_run_is_one_frame() {
        let mut prefix = Prefix::new(1);
        let now = Instant::now();
        for tag in 1..=100 {
            assert!(prefix.settle(tag, Settle::Ack));
        }
        assert_eq!(
            frames(&mut prefix, now, false),
            [multiple(Settle::Ack, 100, 100)]
        );
        assert_eq!(prefix.due(), 0);
        assert!(frames(&mut prefix, now, false).is_empty());
    }

    #[test]
    fn out_of_order_waits_for_the_front_then_covers_all() {
        let mut prefix = Prefix::new(1);
        let now = Instant::now();
        for tag in [3, 2, 5] {
            prefix.settle(tag, Settle::Ack);
        }
        assert!(frames(&mut prefix, now, false).is_empty());
        assert_eq!(prefix.deadline(), Some(now + STRAGGLER_WAIT));
        prefix.settle(1, Settle::Ack);
        assert_eq!(
            frames(&mut prefix, now, false),
            [multiple(Settle::Ack, 3, 3)]
        );
        // 4 is still open: 5 waits, and the clock it waits on started when it was held.
        assert_eq!(prefix.deadline(), Some(now + STRAGGLER_WAIT));
        prefix.settle(4, Settle::Ack);
        assert_eq!(
            frames(&mut prefix, now, false),
            [multiple(Settle::Ack, 5, 2)]
        );
        assert_eq!(prefix.deadline(), None);
    }

    #[test]
    fn runs_of_different_kinds_are_a_frame_each_in_order() {
        let mut prefix = Prefix::new(1);
        let now = Instant::now();
        let kinds = [
            Settle::Ack,
            Settle::Ack,
            Settle::Requeue,
            Settle::Dead,
            Settle::Dead,
            Settle::Ack,
        ];
        for (tag, kind) in (1..).zip(kinds) {
            prefix.settle(tag, kind);
        }
        assert_eq!(
            frames(&mut prefix, now, false),
            [
                multiple(Settle::Ack, 2, 2),
                multiple(Settle::Requeue, 3, 1),
                multiple(Settle::Dead, 5, 2),
                multiple(Settle::Ack, 6, 1),
            ]
        );
    }

    #[test]
    fn a_straggler_holds_the_others_back_only_until_the_bound() {
        let mut prefix = Prefix::new(1);
        let start = Instant::now();
        for tag in 2..=4 {
            prefix.settle(tag, Settle::Ack);
        }
        prefix.settle(5, Settle::Dead);
        assert!(frames(&mut prefix, start, false).is_empty());
        let late = start + STRAGGLER_WAIT;
        assert_eq!(
            frames(&mut prefix, late, false),
            [
                single(Settle::Ack, 2),
                single(Settle::Ack, 3),
                single(Settle::Ack, 4),
                single(Settle::Dead, 5),
            ]
        );
        assert_eq!(prefix.due(), 0);
        // Settled after the bound: 7 waits on a clock of its own.
        prefix.settle(7, Settle::Ack);
        assert!(frames(&mut prefix, late, false).is_empty());
        assert_eq!(prefix.deadline(), Some(late + STRAGGLER_WAIT));
        // The straggler ends: one frame covers it and 6 and 7, skipping those sent alone
        // (a multiple frame settles only what is outstanding).
        prefix.settle(1, Settle::Requeue);
        assert_eq!(
            frames(&mut prefix, late, false),
            [multiple(Settle::Requeue, 1, 1)]
        );
        prefix.settle(6, Settle::Ack);
        assert_eq!(
            frames(&mut prefix, late, false),
            [multiple(Settle::Ack, 7, 2)]
        );
        assert_eq!(prefix.due(), 0);
    }

    #[test]
    fn a_run_never_covers_an_open_delivery_behind_a_sent_one() {
        let mut prefix = Prefix::new(1);
        let start = Instant::now();
        prefix.settle(2, Settle::Ack);
        assert!(frames(&mut prefix, start, false).is_empty());
        assert_eq!(
            frames(&mut prefix, start + STRAGGLER_WAIT, false),
            [single(Settle::Ack, 2)]
        );
        // 2 was sent alone; 3 is open. 1 settling must cover 1 only, not 3.
        prefix.settle(1, Settle::Ack);
        assert_eq!(
            frames(&mut prefix, start + STRAGGLER_WAIT, false),
            [multiple(Settle::Ack, 1, 1)]
        );
        prefix.settle(4, Settle::Ack);
        assert!(frames(&mut prefix, start + STRAGGLER_WAIT, false).is_empty());
        prefix.settle(3, Settle::Ack);
        assert_eq!(
            frames(&mut prefix, start + STRAGGLER_WAIT, false),
            [multiple(Settle::Ack, 4, 2)]
        );
    }

    #[test]
    fn force_sends_what_is_held_back_at_once() {
        let mut prefix = Prefix::new(1);
        let now = Instant::now();
        prefix.settle(3, Settle::Ack);
        assert_eq!(frames(&mut prefix, now, true), [single(Settle::Ack, 3)]);
    }

    #[test]
    fn a_tag_settled_twice_or_already_covered_is_refused() {
        let mut prefix = Prefix::new(1);
        let now = Instant::now();
        assert!(prefix.settle(2, Settle::Ack));
        assert!(!prefix.settle(2, Settle::Ack));
        assert!(prefix.settle(1, Settle::Ack));
        frames(&mut prefix, now, false);
        assert!(!prefix.settle(1, Settle::Requeue));
        assert!(!prefix.settle(0, Settle::Ack));
        assert_eq!(prefix.due(), 0);
    }

    #[test]
    fn reset_drops_what_was_never_sent() {
        let mut prefix = Prefix::new(1);
        prefix.settle(2, Settle::Ack);
        prefix.settle(3, Settle::Dead);
        prefix.settle(4, Settle::Ack);
        assert_eq!(prefix.reset(2), Dropped { acks: 2, all: 3 });
        assert_eq!(prefix.epoch(), 2);
        assert_eq!(prefix.due(), 0);
        assert!(prefix.settle(1, Settle::Ack));
    }

    /// Every delivery is settled exactly once, in any order and with any kinds: the frames
    /// cover each tag exactly once and never one that was open when they were made.
    #[test]
    fn any_order_covers_every_tag_once() {
        let mut rng = fastrand::Rng::with_seed(17);
        for _ in 0..200 {
            let n = rng.u64(1..200);
            let mut tags: Vec<u64> = (1..=n).collect();
            rng.shuffle(&mut tags);
            let mut prefix = Prefix::new(1);
            let mut now = Instant::now();
            let mut outstanding: std::collections::BTreeMap<u64, Settle> = Default::default();
            let mut open: std::collections::BTreeSet<u64> = (1..=n).collect();
            let mut covered = 0;
            for tag in tags {
                let kind = [Settle::Ack, Settle::Requeue, Settle::Dead][rng.usize(0..3)];
                assert!(prefix.settle(tag, kind));
                open.remove(&tag);
                outstanding.insert(tag, kind);
                if rng.bool() {
                    now += Duration::from_millis(rng.u64(0..40));
                }
                let mut out = Vec::new();
                prefix.frames(now, false, &mut out);
                for frame in out {
                    if frame.multiple {
                        // The broker settles every outstanding delivery up to the tag: none
                        // may be open, each must be of the frame's kind.
                        assert!(open.range(..=frame.tag).next().is_none());
                        let settled: Vec<u64> =
                            outstanding.range(..=frame.tag).map(|(t, _)| *t).collect();
                        assert_eq!(settled.len() as u64, frame.count);
                        for t in settled {
                            assert_eq!(outstanding.remove(&t), Some(frame.kind));
                        }
                    } else {
                        assert_eq!(outstanding.remove(&frame.tag), Some(frame.kind));
                    }
                    covered += frame.count;
                }
            }
            let mut out = Vec::new();
            prefix.frames(now, true, &mut out);
            for frame in out {
                let settled: Vec<u64> = if frame.multiple {
                    outstanding.range(..=frame.tag).map(|(t, _)| *t).collect()
                } else {
                    vec![frame.tag]
                };
                for t in settled {
                    assert_eq!(outstanding.remove(&t), Some(frame.kind));
                    covered += 1;
                }
            }
            assert!(outstanding.is_empty());
            assert_eq!(covered, n);
            assert_eq!(prefix.due(), 0);
        }
    }
}
