//! Publishing: a batch in requests of at most 1,000 messages, several in flight when no
//! ordering key asks for order; and the check of a message before anything is sent.

use super::rest::{self, DELETED_TOPIC, ID_ATTRIBUTE};
use super::PubSubSource;
use crate::error::SourceError;
use crate::message::{MessageError, PubSubMessage};
use crate::source::kit::remote;
use crate::source::{check_batch, Publish};
use crate::sync::lock;

/// Most publish requests of one batch in flight at once.
const PUBLISH_IN_FLIGHT: usize = 4;

/// Checks a message as [`Publish::publish`] does before sending anything: Pub/Sub's limits
/// ([`PubSubMessage::check`]), and the attribute keys Pub/Sub or this source keep for
/// themselves (`goog...`, `mayhem_message_id`). A program can check its messages before
/// connecting.
///
/// # Errors
///
/// The first rule the message breaks.
///
/// ```
/// use mayhem::source::pubsub::check_message;
/// use mayhem::{MessageError, PubSubMessage};
/// assert_eq!(check_message(&PubSubMessage::new("web-03").with_attribute("origin", "ops")), Ok(()));
/// let reserved = PubSubMessage::new("web-03").with_attribute("googclient_x", "1");
/// assert!(matches!(check_message(&reserved), Err(MessageError::ReservedKey { .. })));
/// ```
pub fn check_message(message: &PubSubMessage) -> Result<(), MessageError> {
    crate::source::check_message(message, &[ID_ATTRIBUTE], "pubsub")?;
    no_goog_key(message)
}

/// Refuses an attribute key starting with `goog`, which Pub/Sub keeps for itself.
fn no_goog_key(message: &PubSubMessage) -> Result<(), MessageError> {
    match message
        .attributes()
        .iter()
        .map(|(key, _)| key)
        .find(|key| key.starts_with("goog"))
    {
        Some(key) => Err(MessageError::ReservedKey {
            key: key.to_owned(),
            broker: "pubsub",
        }),
        None => Ok(()),
    }
}

impl Publish for PubSubSource {
    /// Publishes the batch in requests of at most 1,000 messages and about 9.5 MB, each
    /// tried again while Pub/Sub fails (at least once); returns once the server confirmed
    /// every request. A batch of several requests without ordering keys keeps up to
    /// 4 of them in flight, on connections of their own; a batch with
    /// an ordering key is sent one request after the other, in order.
    fn publish(&self, batch: &[PubSubMessage]) -> Result<(), SourceError> {
        check_batch(batch, &[ID_ATTRIBUTE], "pubsub")?;
        for message in batch {
            no_goog_key(message).map_err(SourceError::Message)?;
        }
        if self.topic() == DELETED_TOPIC {
            // A publish there is answered 404 with no reason; say what the 404 would mean.
            return Err(SourceError::Backend(format!(
                "pubsub cannot publish to {}: its topic was deleted (the subscription is \
                 attached to {DELETED_TOPIC}; what it holds can still be pulled)",
                self.leasing.shared.broker.subscription
            )));
        }
        let chunks: Vec<&[PubSubMessage]> = rest::publish_chunks(batch).collect();
        let ordered = batch.iter().any(|message| message.ordering_key().is_some());
        let lanes = if ordered { 1 } else { PUBLISH_IN_FLIGHT };
        // Each request is tried again while Pub/Sub fails, up to the reconnect limit; after a
        // failure no lane takes another, and the batch fails with the first error (the
        // caller publishes it again: at least once).
        let shared = &*self.leasing.shared;
        let what = format!("pubsub publish to {}", shared.broker.topic);
        let limit = shared.terms().reconnect_limit;
        remote::in_lanes(&chunks, lanes, "mayhem-pubsub-publish", |chunk| {
            remote::within(shared, shared.interrupted(), limit, &what, || {
                shared.broker.rest.publish(&shared.broker.topic, chunk, &[])
            })?;
            lock(&shared.stats).published += chunk.len() as u64;
            Ok(())
        })
    }

    fn interrupt(&self) {
        self.leasing.interrupt();
    }
}
