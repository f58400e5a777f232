//! A queue another program declared first, with other arguments (a pika script's classic
//! queue, one without a dead-letter exchange, another delivery limit): RabbitMQ refuses the
//! source's own `queue.declare` (`PRECONDITION_FAILED`), and the source consumes the queue as
//! it is instead, after one WARN line.
//!
//! Such a queue may drop what the source rejects (no dead-letter exchange), and a classic
//! queue counts no deliveries (no `x-delivery-count`). So on an adopted queue the source
//! keeps each held delivery's message, publishes every dead letter to `{queue}:dead` itself
//! (with `mayhem_dead_reason` and `mayhem_attempt` headers, awaiting the broker's confirm)
//! and then acks it; a dead letter the broker did not confirm is requeued instead. Where the
//! broker does not count deliveries, the source counts the ones it gave back, by message id
//! (by data for messages without one); a delivery the broker marks `redelivered` that the
//! source never gave back (another instance did, or a lost connection) counts as the
//! second.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, ShortString};
use log::warn;

use super::consume::Op;
use super::link::{Abort, Link};
use super::publish::{now_secs, properties, stored};
use super::{Core, CONFIRM_TIMEOUT};
use crate::message::PubSubMessage;
use crate::source::kit::Settle;
use crate::sync::lock;

/// Most messages whose returns are counted; past it the counts start over (a message then
/// gets up to `--max-attempts` more deliveries).
const MAX_COUNTED: usize = 1 << 20;

/// A held delivery of an adopted queue.
struct Letter {
    /// The message, published as the dead letter when it is one.
    message: PubSubMessage,
    /// What its returns are counted under.
    key: u64,
    /// Its delivery attempt.
    attempt: u32,
    /// Why it is dead-lettered, when `reject` said.
    reason: Option<Arc<str>>,
}

/// What the consumer of an adopted queue keeps.
#[derive(Default)]
pub(super) struct Adopted {
    /// The held deliveries, by link epoch and delivery tag.
    letters: HashMap<(u64, u64), Letter>,
    /// The attempt at which each message was last given back, by key.
    returns: HashMap<u64, u32>,
}

/// What a message's returns are counted under: its id, else its data.
fn key_of(message: &PubSubMessage) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    if message.id().is_empty() {
        message.data().hash(&mut hasher);
    } else {
        message.id().with_str(|id| id.hash(&mut hasher));
    }
    hasher.finish()
}

impl Adopted {
    /// Keeps a delivery of link `epoch`; returns its attempt: the broker's count
    /// (`counted`, above 1 when the broker counts), else the source's.
    pub(super) fn hold(
        &mut self,
        epoch: u64,
        tag: u64,
        message: &PubSubMessage,
        counted: u32,
        redelivered: bool,
    ) -> u32 {
        let key = key_of(message);
        let attempt = if counted > 1 {
            counted
        } else if redelivered {
            self.returns
                .get(&key)
                .map_or(2, |given_back| given_back.saturating_add(1))
        } else {
            self.returns.remove(&key);
            1
        };
        self.letters.insert(
            (epoch, tag),
            Letter {
                message: message.clone(),
                key,
                attempt,
                reason: None,
            },
        );
        attempt
    }

    /// Keeps a delivery that is not a message, to be dead-lettered with its data and why.
    pub(super) fn hold_unreadable(
        &mut self,
        epoch: u64,
        tag: u64,
        data: bytes::Bytes,
        redelivered: bool,
        why: &str,
    ) {
        self.hold(epoch, tag, &PubSubMessage::new(data), 0, redelivered);
        self.set_reason(epoch, tag, &format!("not a message: {why}").into());
    }

    /// Says why the delivery is dead-lettered.
    pub(super) fn set_reason(&mut self, epoch: u64, tag: u64, reason: &Arc<str>) {
        if let Some(letter) = self.letters.get_mut(&(epoch, tag)) {
            letter.reason = Some(reason.clone());
        }
    }

    /// Forgets the deliveries of a lost link (the broker gives them back).
    pub(super) fn forget(&mut self, epoch: u64) {
        self.letters.retain(|&(of, _), _| of != epoch);
    }

    /// Ends a delivery's keeping as `kind` ends it: a requeue counts a return.
    fn ended(&mut self, letter: &Letter, kind: Settle) {
        if kind == Settle::Requeue {
            if self.returns.len() >= MAX_COUNTED {
                self.returns.clear();
            }
            self.returns.insert(letter.key, letter.attempt);
        } else {
            self.returns.remove(&letter.key);
        }
    }
}

impl Core {
    /// On an adopted queue, publishes the dead letters among `ops` (those of `link`) to
    /// `{queue}:dead` and turns each into an ack once confirmed, or into a requeue; ends the
    /// keeping of every other delivery among them.
    pub(super) fn dead_letter_adopted(&self, link: Option<&Link>, ops: &mut [Op]) {
        let mut published = 0;
        for op in ops.iter_mut() {
            let Some(letter) = lock(&self.side.adopted).letters.remove(&(op.epoch, op.tag)) else {
                // Not kept (a lost link's): the broker may have no dead-letter exchange to
                // take a reject, so it is given back instead.
                if op.kind == Settle::Dead {
                    op.kind = Settle::Requeue;
                }
                continue;
            };
            if op.kind == Settle::Dead {
                let link = link.filter(|link| link.epoch == op.epoch);
                op.kind = match link {
                    Some(link) if self.publish_dead(link, &letter) => {
                        published += 1;
                        Settle::Ack
                    }
                    _ => Settle::Requeue,
                };
            }
            lock(&self.side.adopted).ended(&letter, op.kind);
        }
        if published > 0 {
            lock(&self.side.stats).dead_lettered += published;
        }
    }

    /// Publishes `letter` to `{queue}:dead` on `link`; whether the broker confirmed it.
    fn publish_dead(&self, link: &Link, letter: &Letter) -> bool {
        let reason = letter.reason.as_deref().map_or_else(
            || format!("delivered {} times", letter.attempt),
            str::to_owned,
        );
        let mut properties = properties(&letter.message, now_secs());
        let mut headers = properties.headers().clone().unwrap_or_default();
        for (key, value) in [
            ("mayhem_dead_reason", reason),
            ("mayhem_attempt", letter.attempt.to_string()),
        ] {
            headers.insert(
                ShortString::from(key),
                AMQPValue::LongString(value.as_bytes().into()),
            );
        }
        properties = properties.with_headers(headers);
        let confirmed = self.bounded(CONFIRM_TIMEOUT, Abort::OnClose, async {
            let confirm = link
                .publish
                .basic_publish(
                    ShortString::from(""),
                    ShortString::from(self.dead.as_str()),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    letter.message.data(),
                    properties,
                )
                .await
                .map_err(|error| error.to_string())?;
            confirm.await.map_err(|error| error.to_string())
        });
        match confirmed {
            Ok(confirmation) if stored(&confirmation) => true,
            Ok(_) => {
                warn!(
                    "amqp did not take a dead letter into {}; its message is requeued",
                    self.dead
                );
                false
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_are_counted_by_message_where_the_broker_counts_none() {
        let mut adopted = Adopted::default();
        let web = PubSubMessage::new("web-01");
        let other = PubSubMessage::new("web-02").with_id("m-2");
        // First deliveries; a redelivery the source never gave back is the second.
        assert_eq!(adopted.hold(1, 1, &web, 1, false), 1);
        assert_eq!(adopted.hold(1, 2, &other, 1, true), 2);
        // Given back at 1: the next delivery is the second, then the third.
        let letter = adopted.letters.remove(&(1, 1)).unwrap();
        adopted.ended(&letter, Settle::Requeue);
        assert_eq!(adopted.hold(1, 3, &web, 1, true), 2);
        let letter = adopted.letters.remove(&(1, 3)).unwrap();
        adopted.ended(&letter, Settle::Requeue);
        assert_eq!(adopted.hold(1, 4, &web, 1, true), 3);
        // The broker's own count wins; an ack ends the count.
        assert_eq!(adopted.hold(1, 5, &other, 7, true), 7);
        let letter = adopted.letters.remove(&(1, 4)).unwrap();
        adopted.ended(&letter, Settle::Ack);
        assert_eq!(adopted.hold(1, 6, &web, 1, true), 2);
        // A lost link's deliveries are forgotten; a reason sticks to its delivery.
        adopted.set_reason(1, 6, &Arc::from("bad"));
        assert_eq!(
            adopted.letters[&(1, 6)].reason.as_deref(),
            Some("bad"),
            "the reason is kept"
        );
        adopted.forget(1);
        assert!(adopted.letters.is_empty());
    }
}
