//! The REST calls of Pub/Sub v1 and their JSON, over the kit's [`Http`] client (each
//! consumer's pull takes a kept-alive connection of its own from the agent's pool).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::auth::Credentials;
use crate::message::PubSubMessage;
use crate::source::kit::remote::Fetched;
use crate::source::kit::{Http, HttpError};

/// The attribute that carries a message's own id across Pub/Sub, whose ids are the server's.
pub(super) const ID_ATTRIBUTE: &str = "mayhem_message_id";
/// Most messages in one publish request (the API's limit).
pub(super) const PUBLISH_MAX_MESSAGES: usize = 1000;
/// Most bytes of one publish request's JSON: the API takes 10 MB; the rest is margin.
pub(super) const PUBLISH_MAX_BYTES: usize = 9_500_000;
/// Most ack ids in one acknowledge or modifyAckDeadline request: python-pubsub's choice,
/// which keeps a request well under the API's 512 kB limit with ack ids of ~180 bytes.
pub(super) const ACK_IDS_PER_REQUEST: usize = 2500;
/// Why a call failed.
pub type RestError = HttpError;

/// A message as the API sends it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InMessage {
    /// Base64 of the data.
    #[serde(default)]
    data: String,
    /// The attributes (a map, without order: read sorted by key).
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    /// The server's id.
    #[serde(default)]
    message_id: String,
    /// RFC 3339, in UTC.
    #[serde(default)]
    publish_time: String,
    /// Empty when none.
    #[serde(default)]
    ordering_key: String,
}

/// One message of a pull.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Received {
    /// The id to ack, nack or extend this delivery with.
    ack_id: String,
    /// The message.
    message: InMessage,
    /// Set by Pub/Sub on subscriptions with a dead-letter policy.
    delivery_attempt: Option<u32>,
}

/// A pull's answer.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PullResponse {
    /// Absent when nothing was delivered.
    #[serde(default)]
    received_messages: Vec<Received>,
}

/// The topic of a subscription whose topic was deleted: it can be pulled from, not
/// published to.
pub(super) const DELETED_TOPIC: &str = "_deleted-topic_";

/// A subscription as the API describes it (only what the source reads).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SubscriptionInfo {
    /// `projects/P/topics/T` (`_deleted-topic_` once the topic was deleted).
    pub(super) topic: String,
    /// The ack deadline of a delivery.
    #[serde(default)]
    pub(super) ack_deadline_seconds: u64,
    /// Whether messages of one ordering key are delivered in order.
    #[serde(default)]
    pub(super) enable_message_ordering: bool,
    /// Where Pub/Sub forwards a message after some deliveries; none when absent.
    #[serde(default)]
    pub(super) dead_letter_policy: Option<DeadLetterPolicy>,
    /// The messages of the topic the subscription keeps (`attributes.origin = "ops"`);
    /// empty when it keeps them all.
    #[serde(default)]
    pub(super) filter: String,
}

/// A subscription's dead-letter policy.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct DeadLetterPolicy {
    /// `projects/P/topics/T`.
    #[serde(default)]
    pub(super) dead_letter_topic: String,
    /// Deliveries before forwarding; Pub/Sub reads 0 (absent) as 5.
    #[serde(default)]
    pub(super) max_delivery_attempts: u32,
}

/// A message to publish.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutMessage<'a> {
    /// Base64 of the data.
    data: String,
    /// The attributes, with the message's id under [`ID_ATTRIBUTE`].
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    attributes: BTreeMap<&'a str, Cow<'a, str>>,
    /// The ordering key, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    ordering_key: Option<&'a str>,
}

/// The HTTP client of one source.
#[derive(Debug)]
pub(super) struct Rest {
    /// The calls, to `{endpoint}/v1`.
    http: Http,
    /// `http://host:port` or `https://pubsub.googleapis.com`.
    base: String,
}

impl Rest {
    /// A client of `base`, whose calls give up after `timeout`.
    pub(super) fn new(base: String, credentials: Credentials, timeout: Duration) -> Self {
        let http = Http::new(format!("{base}/v1"), Box::new(credentials), timeout);
        Rest { http, base }
    }

    /// The endpoint, for log lines (it holds no secret).
    pub(super) fn base(&self) -> &str {
        &self.base
    }

    /// The subscription's settings.
    pub(super) fn get_subscription(&self, path: &str) -> Result<SubscriptionInfo, RestError> {
        self.http.get(path)
    }

    /// Creates a topic; one that exists already is fine.
    pub(super) fn create_topic(&self, path: &str) -> Result<(), RestError> {
        self.http.create(path, &serde_json::json!({}))
    }

    /// Creates a subscription; one that exists already is fine.
    pub(super) fn create_subscription(
        &self,
        path: &str,
        settings: &serde_json::Value,
    ) -> Result<(), RestError> {
        self.http.create(path, settings)
    }

    /// Publishes one request's worth of messages (see [`publish_chunks`]), with extra
    /// attributes on each; returns the server's ids.
    pub(super) fn publish(
        &self,
        topic: &str,
        batch: &[PubSubMessage],
        extra: &[(&str, &str)],
    ) -> Result<Vec<String>, RestError> {
        let messages: Vec<OutMessage<'_>> = batch
            .iter()
            .map(|message| out_message(message, extra))
            .collect();
        #[derive(Serialize)]
        struct Body<'a> {
            messages: Vec<OutMessage<'a>>,
        }
        let body = Body { messages };
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Ids {
            #[serde(default)]
            message_ids: Vec<String>,
        }
        let ids: Ids = self.http.post_for(&format!("{topic}:publish"), &body)?;
        Ok(ids.message_ids)
    }

    /// Pulls up to `max` messages without waiting for more to arrive.
    pub(super) fn pull(
        &self,
        subscription: &str,
        max: usize,
    ) -> Result<Vec<Fetched<String>>, RestError> {
        // `returnImmediately`: a pull that waits is held by the server until a message comes
        // (over 40 s on the emulator), and one the client gives up on stays registered and
        // takes the next message, which then waits out its ack deadline.
        let body = serde_json::json!({ "maxMessages": max, "returnImmediately": true });
        let answer: PullResponse = self.http.post_for(&format!("{subscription}:pull"), &body)?;
        Ok(answer.received_messages.into_iter().map(decode).collect())
    }

    /// Acknowledges ack ids (at most [`ACK_IDS_PER_REQUEST`]).
    pub(super) fn acknowledge(&self, subscription: &str, ids: &[String]) -> Result<(), RestError> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Body<'a> {
            ack_ids: &'a [String],
        }
        let body = Body { ack_ids: ids };
        self.http
            .post(&format!("{subscription}:acknowledge"), &body)
            .map(drop)
    }

    /// Sets the deadline of ack ids (at most [`ACK_IDS_PER_REQUEST`]) to `seconds` from now.
    pub(super) fn modify(
        &self,
        subscription: &str,
        ids: &[String],
        seconds: u32,
    ) -> Result<(), RestError> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Body<'a> {
            ack_ids: &'a [String],
            ack_deadline_seconds: u32,
        }
        let body = Body {
            ack_ids: ids,
            ack_deadline_seconds: seconds,
        };
        self.http
            .post(&format!("{subscription}:modifyAckDeadline"), &body)
            .map(drop)
    }
}

/// Splits a batch into publish requests: at most [`PUBLISH_MAX_MESSAGES`] messages and about
/// [`PUBLISH_MAX_BYTES`] of JSON each (a larger message goes alone).
pub(super) fn publish_chunks(batch: &[PubSubMessage]) -> impl Iterator<Item = &[PubSubMessage]> {
    let mut rest = batch;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut take = 0;
        for message in rest.iter().take(PUBLISH_MAX_MESSAGES) {
            // Base64 takes 4 bytes per 3, and each attribute some quoting.
            let size = message.data().len() * 4 / 3 + message.size() + 64;
            if take > 0 && bytes + size > PUBLISH_MAX_BYTES {
                break;
            }
            bytes += size;
            take += 1;
        }
        let (chunk, after) = rest.split_at(take);
        rest = after;
        Some(chunk)
    })
}

/// The JSON of one message to publish.
fn out_message<'a>(message: &'a PubSubMessage, extra: &[(&'a str, &'a str)]) -> OutMessage<'a> {
    let mut attributes: BTreeMap<&str, Cow<'_, str>> = message
        .attributes()
        .iter()
        .map(|(key, value)| (key, Cow::Borrowed(value)))
        .collect();
    if !message.id().is_empty() {
        attributes.insert(ID_ATTRIBUTE, Cow::Owned(message.id().to_string()));
    }
    attributes.extend(
        extra
            .iter()
            .map(|&(key, value)| (key, Cow::Borrowed(value))),
    );
    OutMessage {
        data: STANDARD.encode(message.data()),
        attributes,
        ordering_key: message.ordering_key(),
    }
}

/// Turns a delivery's JSON into a message.
fn decode(received: Received) -> Fetched<String> {
    let Received {
        ack_id,
        message: wire,
        delivery_attempt,
    } = received;
    let server_id = wire.message_id.clone();
    let message = STANDARD
        .decode(wire.data.as_bytes())
        .map_err(|error| format!("its data is not base64: {error}"))
        .map(|data| {
            let mut attributes = wire.attributes;
            let id = attributes
                .remove(ID_ATTRIBUTE)
                .unwrap_or_else(|| wire.message_id.clone());
            let mut message = PubSubMessage::new(data)
                .with_id(id)
                .with_attributes(attributes.into_iter().collect())
                .with_ordering_key(wire.ordering_key);
            if let Some(time) = parse_time(&wire.publish_time) {
                message = message.with_publish_time(time);
            }
            message
        });
    Fetched {
        handle: ack_id,
        origin: server_id,
        attempt: delivery_attempt,
        message,
    }
}

/// Parses RFC 3339 in UTC as Pub/Sub writes it (`2026-12-06T20:26:58.332Z`, up to 9 digits
/// of fraction), by `humantime`; `None` for anything else.
pub(super) fn parse_time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(text).ok()
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn publish_times_parse_to_the_nanosecond() {
        // `date -u -d 2026-12-06T20:26:58Z +%s` says 1796588818.
        let time = parse_time("2026-12-06T20:26:58.332Z").unwrap();
        let since = time.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(since, Duration::new(1_796_588_818, 332_000_000));
        assert_eq!(
            parse_time("1970-01-01T00:00:00.000000001Z"),
            Some(UNIX_EPOCH + Duration::from_nanos(1))
        );
        assert_eq!(parse_time("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn publish_requests_stay_under_the_limits() {
        let small: Vec<PubSubMessage> = (0..2500).map(|_| PubSubMessage::new("web-01")).collect();
        let sizes: Vec<usize> = publish_chunks(&small).map(<[_]>::len).collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        let big: Vec<PubSubMessage> = (0..3)
            .map(|_| PubSubMessage::new(vec![0u8; 4_000_000]))
            .collect();
        assert_eq!(
            publish_chunks(&big).map(<[_]>::len).collect::<Vec<_>>(),
            [1, 1, 1]
        );
    }
}
