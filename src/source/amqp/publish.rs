//! Publishing: batches on the confirm channel, their confirms, and sending again what a
//! lost connection left unconfirmed.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use futures_lite::future;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, PublisherConfirm};
use log::info;

use super::link::{failure_text, in_order, Abort, Failure, Link, Side};
use super::{Lane, Publishing, CONFIRM_TIMEOUT, TICK};
use crate::error::SourceError;
use crate::message::{MessageError, PubSubMessage};
use crate::sync::lock;

impl Lane {
    /// `publish` on this connection, keeping at most `window` messages unconfirmed.
    pub(super) fn publish(
        &self,
        batch: &[PubSubMessage],
        window: usize,
    ) -> Result<(), SourceError> {
        // One publisher at a time: the unconfirmed batches are settled in the order they
        // were sent, and a thread waiting for room would wait for the same confirms anyway.
        let mut unconfirmed = lock(&self.side.unconfirmed);
        let room = window.saturating_sub(batch.len());
        // After the broker refused a batch: when it is sent again.
        let mut retry_at: Option<Instant> = None;
        loop {
            if self.interrupted.load(Ordering::SeqCst) {
                return Err(SourceError::Closed);
            }
            if let Some(at) = retry_at {
                let left = at.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    // In steps, so that an interrupt is seen.
                    thread::sleep(left.min(TICK));
                    continue;
                }
                retry_at = None;
            }
            let link = match self.link() {
                Ok(link) => link,
                Err(Failure::Down { retry_in }) => {
                    thread::sleep(retry_in.min(TICK));
                    continue;
                }
                // (`link` never answers `Refused`: that is an answer to a publish.)
                Err(Failure::GaveUp(text) | Failure::Refused(text)) => {
                    return Err(SourceError::Unavailable(text))
                }
                Err(Failure::Closed) => return Err(SourceError::Closed),
            };
            match self.settle(
                &mut unconfirmed,
                &link,
                room,
                CONFIRM_TIMEOUT,
                Abort::OnInterrupt,
            ) {
                Ok(()) => {}
                Err(Failure::Closed) => return Err(SourceError::Closed),
                Err(Failure::Refused(text)) => {
                    retry_at = Some(self.refused_publish(&text)?);
                    continue;
                }
                Err(failure) => {
                    self.lost(&link, &failure_text(&failure));
                    continue;
                }
            }
            match self.send_batch(&link, batch.to_vec(), CONFIRM_TIMEOUT, Abort::OnInterrupt) {
                Ok(sent) => {
                    unconfirmed.count += batch.len();
                    unconfirmed.batches.push_back(sent);
                    return Ok(());
                }
                Err(Failure::Closed) => return Err(SourceError::Closed),
                Err(failure) => self.lost(&link, &failure_text(&failure)),
            }
        }
    }
}

impl Lane {
    /// Records that the broker refused published messages (one warning per kind of
    /// failure, as for a lost connection); returns when to send them again, or, once the
    /// refusals have lasted past the reconnect limit, the error that ends publishing. Each
    /// refusal used to be taken for a lost connection: the source reconnected, logged two
    /// lines and sent again at once, 16 times a second without end (the reconnection ended
    /// each outage before the limit could run out).
    fn refused_publish(&self, text: &str) -> Result<Instant, SourceError> {
        let Failure::Down { retry_in } = self.failed(text) else {
            return Ok(Instant::now());
        };
        let health = lock(&self.health);
        if let Some(lasted) = health.over(Instant::now(), self.config.reconnect_limit) {
            return Err(SourceError::Unavailable(format!(
                "amqp {} refused published messages for {}: {}",
                self.shown_url,
                humantime::format_duration(Duration::from_secs(lasted.as_secs())),
                health.last_error()
            )));
        }
        Ok(Instant::now() + retry_in)
    }

    /// Ends a run of refusals once a batch is confirmed again (one line; nothing when none
    /// was going on).
    fn published_again(&self) {
        if let Some(after) = lock(&self.health).recovered(Instant::now()) {
            info!(
                "amqp {} takes published messages again after {}",
                self.shown_url,
                humantime::format_duration(Duration::from_millis(after.as_millis() as u64))
            );
        }
    }
}

impl Side for Publishing {
    const CONSUMES: bool = false;

    /// Nothing: a publishing connection holds no lease, and its batches of a lost link are
    /// sent again on the next.
    fn forget(&self, _epoch: u64) {}
}

/// Published batches whose confirms are outstanding, oldest first.
#[derive(Default)]
pub(super) struct Unconfirmed {
    /// The batches.
    batches: VecDeque<Sent>,
    /// The messages of `batches`.
    count: usize,
}

/// One published batch.
pub(super) struct Sent {
    /// Its messages, to send again when its confirms fail.
    envelopes: Vec<PubSubMessage>,
    /// The link it was sent on; a batch of a lost link is sent again.
    epoch: u64,
    /// One confirm per message, in order.
    confirms: Vec<PublisherConfirm>,
    /// How many leading `confirms` arrived as acks (those futures are spent).
    acked: usize,
}

impl Sent {
    /// Whether every confirm arrived as an ack, looking without waiting. A nack or an
    /// error marks the batch to be sent again (epoch 0).
    pub(super) fn arrived(&mut self) -> bool {
        while self.acked < self.confirms.len() {
            match future::block_on(future::poll_once(&mut self.confirms[self.acked])) {
                Some(Ok(confirmation)) if stored(&confirmation) => self.acked += 1,
                Some(_) => {
                    self.epoch = 0;
                    return false;
                }
                None => return false,
            }
        }
        self.epoch != 0
    }
}

impl Lane {
    /// Sends `envelopes` on the publish channel of `link`, waiting at most `limit` for lapin
    /// to write them; the `basic.publish` methods are started together (see [`in_order`]).
    pub(super) fn send_batch(
        &self,
        link: &Link,
        envelopes: Vec<PubSubMessage>,
        limit: Duration,
        abort: Abort,
    ) -> Result<Sent, Failure> {
        let abort = match abort {
            Abort::OnInterrupt => Abort::IfBlockedOnInterrupt,
            other => other,
        };
        let done = Cell::new(0);
        let published = now_secs();
        let confirms = self.bounded_publishing(
            link,
            limit,
            abort,
            in_order(
                envelopes.iter().map(|envelope| {
                    link.publish.basic_publish(
                        ShortString::from(""),
                        ShortString::from(self.config.queue.as_str()),
                        // Mandatory: a message the queue is not there to take (deleted
                        // behind the service's back) comes back instead of vanishing.
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        envelope.data(),
                        properties(envelope, published),
                    )
                }),
                &done,
            ),
        )?;
        Ok(Sent {
            envelopes,
            epoch: link.epoch,
            confirms,
            acked: 0,
        })
    }

    /// Awaits the oldest batches' confirms until at most `room` messages are unconfirmed;
    /// first sends again, on `link`, every batch of an earlier link. Each waits at most
    /// `limit`. A confirmed batch is counted as published; a nack or a failure leaves its
    /// batch (and every later one) to be sent again on the next link.
    pub(super) fn settle(
        &self,
        unconfirmed: &mut Unconfirmed,
        link: &Link,
        room: usize,
        limit: Duration,
        abort: Abort,
    ) -> Result<(), Failure> {
        // A batch of a lost link whose confirms all came before the loss is not sent again.
        // (Only then: while the link holds, the loop below takes confirms in order.)
        if unconfirmed
            .batches
            .iter()
            .any(|sent| sent.epoch != link.epoch)
        {
            self.collect_arrived(unconfirmed);
        }
        for index in 0..unconfirmed.batches.len() {
            if unconfirmed.batches[index].epoch != link.epoch {
                // The leading messages whose confirms came as acks before the failure are
                // stored: they count as published, and only the rest is sent again (a nack
                // in the middle of a batch sent the whole batch again, duplicating its head).
                let stored = {
                    let sent = &mut unconfirmed.batches[index];
                    let stored = sent.acked.min(sent.envelopes.len());
                    sent.envelopes.drain(..stored);
                    sent.confirms.clear();
                    sent.acked = 0;
                    stored
                };
                self.count_published(unconfirmed, stored);
                let envelopes = std::mem::take(&mut unconfirmed.batches[index].envelopes);
                // Within the caller's limit: at shutdown, what is left of the grace period.
                match self.send_batch(link, envelopes.clone(), limit.min(CONFIRM_TIMEOUT), abort) {
                    Ok(sent) => unconfirmed.batches[index] = sent,
                    Err(failure) => {
                        unconfirmed.batches[index].envelopes = envelopes;
                        return Err(failure);
                    }
                }
            }
        }
        while unconfirmed.count > room {
            let Some(sent) = unconfirmed.batches.front_mut() else {
                break;
            };
            let answered = self.bounded_publishing(link, limit, abort, async {
                while sent.acked < sent.confirms.len() {
                    let confirmation = (&mut sent.confirms[sent.acked])
                        .await
                        .map_err(|error| error.to_string())?;
                    if let Confirmation::Nack(None) = confirmation {
                        return Ok(Some(refusal(&confirmation, &self.config.queue)));
                    }
                    if !stored(&confirmation) {
                        return Err(refusal(&confirmation, &self.config.queue));
                    }
                    sent.acked += 1;
                }
                Ok(None)
            });
            match answered {
                Ok(None) => {}
                // The confirms still missing are void: the whole batch is sent again.
                Ok(Some(refused)) => {
                    sent.epoch = 0;
                    return Err(Failure::Refused(refused));
                }
                Err(failure) => {
                    sent.epoch = 0;
                    return Err(failure);
                }
            }
            self.published_again();
            let count = sent.envelopes.len();
            unconfirmed.batches.pop_front();
            self.count_published(unconfirmed, count);
        }
        Ok(())
    }

    /// Counts as published, and forgets, every batch whose confirms all arrived as acks,
    /// wherever it stands in the queue and whatever link it came on.
    pub(super) fn collect_arrived(&self, unconfirmed: &mut Unconfirmed) {
        let mut published = 0;
        unconfirmed.batches.retain_mut(|sent| {
            if sent.arrived() {
                published += sent.envelopes.len();
                false
            } else {
                true
            }
        });
        self.count_published(unconfirmed, published);
    }

    /// Moves `count` messages of `unconfirmed` to the published count: their confirms came.
    fn count_published(&self, unconfirmed: &mut Unconfirmed, count: usize) {
        if count > 0 {
            unconfirmed.count -= count;
            self.side
                .published
                .fetch_add(count as u64, Ordering::SeqCst);
        }
    }

    /// Awaits every outstanding confirm, up to `timeout`, reconnecting when the link is
    /// lost; returns the messages left unconfirmed (the caller says so): those whose
    /// confirms did not all arrive.
    pub(super) fn confirm_all(&self, timeout: Duration) -> usize {
        self.confirm_on(timeout, Lane::link)
    }

    /// [`Core::confirm_all`] on the connected link only, never reconnecting: dropping the
    /// source must not wait for a connection attempt.
    pub(super) fn confirm_connected(&self, timeout: Duration) -> usize {
        self.confirm_on(timeout, |core| core.healthy().ok_or(Failure::Closed))
    }

    /// Awaits every outstanding confirm, up to `timeout`, on the links `link` gives; returns
    /// the messages left unconfirmed.
    fn confirm_on(
        &self,
        timeout: Duration,
        link: impl Fn(&Lane) -> Result<Arc<Link>, Failure>,
    ) -> usize {
        let end = Instant::now() + timeout;
        let mut unconfirmed = lock(&self.side.unconfirmed);
        while unconfirmed.count > 0 {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let link = match link(self) {
                Ok(link) => link,
                Err(Failure::Down { retry_in }) => {
                    thread::sleep(retry_in.min(TICK).min(left));
                    continue;
                }
                Err(Failure::GaveUp(_) | Failure::Refused(_) | Failure::Closed) => break,
            };
            match self.settle(&mut unconfirmed, &link, 0, left, Abort::OnClose) {
                Ok(()) => {}
                Err(Failure::Closed) => break,
                // Sent again on the same connection after a pause, within the time left.
                Err(Failure::Refused(text)) => match self.refused_publish(&text) {
                    Ok(at) => thread::sleep(
                        at.saturating_duration_since(Instant::now())
                            .min(end.saturating_duration_since(Instant::now())),
                    ),
                    Err(_) => break,
                },
                // A broker that blocks publishing (a resource alarm) confirms nothing until
                // it unblocks: the time is up, and reconnecting would not change that.
                Err(_) if link.connection.status().blocked() => break,
                Err(failure) => self.lost(&link, &failure_text(&failure)),
            }
        }
        // Without a link (or time) left, what arrived still counts.
        self.collect_arrived(&mut unconfirmed);
        unconfirmed.count
    }
}

/// Whether the broker took a published message: acked and not returned. A mandatory
/// message that no queue took (its queue was deleted) comes back before its ack.
pub(super) fn stored(confirmation: &Confirmation) -> bool {
    matches!(confirmation, Confirmation::Ack(None))
}

/// Why a published message was not taken, for the log.
pub(super) fn refusal(confirmation: &Confirmation, queue: &str) -> String {
    match confirmation {
        Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => format!(
            "a published message was returned unroutable: the queue {queue} is gone \
             (declared again on reconnecting)"
        ),
        _ => format!(
            "the broker refused a published message (a full queue {queue} with \
             x-overflow reject-publish, or a broker error)"
        ),
    }
}

/// Checks a message as [`Publish::publish`](crate::source::Publish::publish) does before
/// sending anything: Pub/Sub's limits ([`PubSubMessage::check`]), and the header names
/// RabbitMQ cannot carry as attributes: `x-...` (the broker's own, and the ordering key's
/// `x-mayhem-ordering-key`) and names over 255 bytes (an AMQP short string). A program can
/// check its messages before connecting.
///
/// # Errors
///
/// The first rule the message breaks.
///
/// ```
/// use mayhem::source::amqp::check_message;
/// use mayhem::{MessageError, PubSubMessage};
/// assert_eq!(check_message(&PubSubMessage::new("web-03").with_attribute("origin", "ops")), Ok(()));
/// let reserved = PubSubMessage::new("web-03").with_attribute("x-death", "1");
/// assert!(matches!(check_message(&reserved), Err(MessageError::ReservedKey { .. })));
/// ```
pub fn check_message(message: &PubSubMessage) -> Result<(), MessageError> {
    crate::source::check_message(message, &[ORDERING_KEY_HEADER], "rabbitmq")?;
    if let Some((key, _)) = message
        .attributes()
        .iter()
        .find(|(key, _)| key.starts_with("x-"))
    {
        return Err(MessageError::ReservedKey {
            key: key.to_owned(),
            broker: "rabbitmq (x-... headers are the broker's)",
        });
    }
    if message.attributes().iter().any(|(key, _)| key.len() > 255) {
        return Err(MessageError::Unsupported(
            "an attribute key over 255 bytes cannot be an AMQP header name".to_owned(),
        ));
    }
    Ok(())
}

/// Now, in the `timestamp` property's whole seconds.
pub(super) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// The header that carries a message's ordering key (RabbitMQ has no field for it).
pub(super) const ORDERING_KEY_HEADER: &str = "x-mayhem-ordering-key";

/// The AMQP properties of a published message: persistent, its id as `message-id`, the
/// publish time as `timestamp` (seconds), its attributes as string headers, its ordering key
/// as [`ORDERING_KEY_HEADER`].
pub(super) fn properties(message: &PubSubMessage, published: u64) -> BasicProperties {
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_timestamp(published);
    if !message.id().is_empty() {
        properties = properties
            .with_message_id(message.id().with_str(|id| ShortString::from(id.to_owned())));
    }
    if message.attributes().is_empty() && message.ordering_key().is_none() {
        return properties;
    }
    let mut headers = FieldTable::default();
    for (key, value) in message.attributes().iter() {
        headers.insert(
            ShortString::from(key),
            AMQPValue::LongString(value.as_bytes().into()),
        );
    }
    if let Some(key) = message.ordering_key() {
        headers.insert(
            ShortString::from(ORDERING_KEY_HEADER),
            AMQPValue::LongString(key.as_bytes().into()),
        );
    }
    properties.with_headers(headers)
}
