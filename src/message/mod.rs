//! The message: Google Pub/Sub's `PubsubMessage`, one type for every broker.
//!
//! A message has an [`id`](PubSubMessage::id), [`data`](PubSubMessage::data) (bytes of any
//! content, shared without copying), [`attributes`](PubSubMessage::attributes) (a string
//! map), a [`publish_time`](PubSubMessage::publish_time) when the broker knows it, and an
//! optional [`ordering_key`](PubSubMessage::ordering_key). The delivery attempt is not part of
//! the message: it belongs to the lease ([`Lease::attempt`](crate::Lease)).
//!
//! Pub/Sub's limits are checked when publishing ([`PubSubMessage::check`]), so a message
//! one broker accepts is one every broker accepts.
//!
//! The chaos monkey is one handler among others: its instance name is the message data, a
//! host name ([`PubSubMessage::instance_name`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

mod attributes;
mod data;
mod display;
mod error;
mod host_name;
mod id;
#[cfg(test)]
mod tests;

pub use attributes::Attributes;
use data::{Data, INLINE};
pub(crate) use display::Label;
pub use error::MessageError;
pub(crate) use host_name::host_name;
pub use host_name::HostNameError;
pub use id::MessageId;
pub(crate) use id::{fnv1a, random_uuid};

/// Most bytes of data in one message (Pub/Sub's limit: 10 MB).
pub const MAX_DATA_BYTES: usize = 10_000_000;
/// Most attributes on one message (Pub/Sub's limit).
pub const MAX_ATTRIBUTES: usize = 100;
/// Longest attribute key, in bytes (Pub/Sub's limit).
pub const MAX_KEY_BYTES: usize = 256;
/// Longest attribute value, in bytes (Pub/Sub's limit).
pub const MAX_VALUE_BYTES: usize = 1024;
/// Longest ordering key, in bytes (Pub/Sub's limit).
pub const MAX_ORDERING_KEY_BYTES: usize = 1024;
/// Longest host name, in bytes.
pub const MAX_HOST_NAME_BYTES: usize = 253;
/// Longest label of a host name, in bytes.
pub const MAX_LABEL_BYTES: usize = 63;

/// The fixed prefix of the names the built-in publishers draw.
const PREFIX: &[u8; 7] = b"cattle-";
/// Length of the random suffix of a drawn name.
const SUFFIX_LEN: usize = 4;
/// The characters the random suffix is drawn from.
const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A message: data, attributes, an id, a publish time and an ordering key.
///
/// ```
/// use mayhem::PubSubMessage;
/// let msg = PubSubMessage::new("web-01").with_attribute("origin", "ops");
/// assert_eq!(msg.data(), b"web-01");
/// assert_eq!(msg.attributes().get("origin"), Some("ops"));
/// assert_eq!(msg.instance_name(), Ok("web-01"));
/// assert_eq!(msg.to_string(), "PubSubMessage(instance_name='web-01')");
///
/// let mut rng = mayhem::Rng::with_seed(7);
/// let drawn = PubSubMessage::random(&mut rng);
/// assert!(drawn.instance_name().unwrap().starts_with("cattle-"));
/// assert!(drawn.id().as_uuid().is_some());
///
/// let binary = PubSubMessage::new(vec![0u8, 159, 146, 150]);
/// assert!(binary.instance_name().is_err());
/// assert_eq!(binary.to_string(), "PubSubMessage(message_id='', data=4 bytes)");
/// ```
#[derive(Clone, Default)]
pub struct PubSubMessage {
    /// The producer's id, or the broker's when the producer gave none; empty before publishing
    /// when the broker gives ids.
    id: MessageId,
    /// The payload: any bytes; small ones in place, larger ones shared without copying
    /// where the broker allows it.
    data: Data,
    /// When the broker took the message, in nanoseconds since the Unix epoch (0: it did not
    /// say): 8 bytes, where an `Option<SystemTime>` takes 16.
    publish_nanos: u64,
    /// The attributes and the ordering key, boxed and absent when there are none: the chaos
    /// monkey's messages have neither, and one word is moved around instead of four.
    extras: Option<Box<Extras>>,
}

impl PartialEq for PubSubMessage {
    /// Equal when every field is: id, data, attributes, publish time and ordering key.
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.data == other.data
            && self.publish_nanos == other.publish_nanos
            && self.attributes() == other.attributes()
            && self.ordering_key() == other.ordering_key()
    }
}

impl Eq for PubSubMessage {}

/// The parts of a message most messages do without.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Extras {
    /// String attributes.
    attributes: Attributes,
    /// Messages of one ordering key are delivered in order where the broker supports it.
    ordering_key: Option<Box<str>>,
}

/// No attributes, for messages without any.
static NO_ATTRIBUTES: Attributes = Attributes::new();

impl PubSubMessage {
    /// A message carrying `data`, with no id yet (publishing gives it one), no attributes and
    /// no ordering key.
    pub fn new(data: impl Into<Bytes>) -> Self {
        PubSubMessage {
            data: Data::from_bytes(data.into()),
            ..PubSubMessage::default()
        }
    }

    /// A message carrying a copy of `data` (kept in place when small, without allocating),
    /// with no id yet, no attributes and no ordering key.
    ///
    /// ```
    /// let msg = mayhem::PubSubMessage::copy_from_slice(b"web-01");
    /// assert_eq!(msg.data(), b"web-01");
    /// ```
    pub fn copy_from_slice(data: &[u8]) -> Self {
        PubSubMessage {
            data: if data.len() <= INLINE {
                Data::inline(data)
            } else {
                Data::Shared(Box::new(Bytes::copy_from_slice(data)))
            },
            ..PubSubMessage::default()
        }
    }

    /// A chaos monkey message as the built-in publishers make it: a random (version 4) UUID
    /// id and data `cattle-` plus four characters of `[a-z0-9]`, drawn from `rng` (a
    /// [`Rng`](crate::Rng), re-exported from fastrand).
    ///
    /// The same seed gives the same messages, which keeps tests reproducible.
    pub fn random(rng: &mut crate::Rng) -> Self {
        let id = random_uuid(rng);
        let mut name = [0u8; PREFIX.len() + SUFFIX_LEN];
        name[..PREFIX.len()].copy_from_slice(PREFIX);
        for byte in &mut name[PREFIX.len()..] {
            *byte = ALPHABET[rng.usize(..ALPHABET.len())];
        }
        PubSubMessage {
            id: MessageId::from(id),
            data: Data::inline(&name),
            ..PubSubMessage::default()
        }
    }

    /// The same message with id `id`.
    pub fn with_id(mut self, id: impl Into<MessageId>) -> Self {
        self.id = id.into();
        self
    }

    /// The same message with attribute `key` set to `value`.
    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes_mut().insert(key, value);
        self
    }

    /// The same message with these attributes (replacing any it had).
    pub fn with_attributes(mut self, attributes: Attributes) -> Self {
        if attributes.is_empty() && self.extras.is_none() {
            return self;
        }
        *self.attributes_mut() = attributes;
        self
    }

    /// The same message with this ordering key.
    pub fn with_ordering_key(mut self, key: impl Into<String>) -> Self {
        let key: String = key.into();
        if key.is_empty() && self.extras.is_none() {
            return self;
        }
        self.extras.get_or_insert_default().ordering_key =
            (!key.is_empty()).then(|| key.into_boxed_str());
        self
    }

    /// The same message with this publish time (brokers set it when delivering).
    pub fn with_publish_time(mut self, time: SystemTime) -> Self {
        // Times before the epoch, or past the year 2554, are not publish times: kept as
        // none rather than wrapped.
        self.publish_nanos = time
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|since| u64::try_from(since.as_nanos()).ok())
            .unwrap_or(0);
        self
    }

    /// The message's id (empty before publishing when the broker gives ids).
    pub fn id(&self) -> &MessageId {
        &self.id
    }

    /// The payload.
    pub fn data(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// The payload as [`Bytes`]: shared without copying when it is large, copied when it is
    /// small enough to be kept in place.
    pub fn data_bytes(&self) -> Bytes {
        match &self.data {
            Data::Inline(..) => Bytes::copy_from_slice(self.data()),
            Data::Shared(bytes) => (**bytes).clone(),
        }
    }

    /// The attributes.
    pub fn attributes(&self) -> &Attributes {
        self.extras
            .as_ref()
            .map_or(&NO_ATTRIBUTES, |extras| &extras.attributes)
    }

    /// The attributes, to change.
    pub fn attributes_mut(&mut self) -> &mut Attributes {
        &mut self.extras.get_or_insert_default().attributes
    }

    /// When the broker took the message, if it says so.
    pub fn publish_time(&self) -> Option<SystemTime> {
        (self.publish_nanos > 0).then(|| UNIX_EPOCH + Duration::from_nanos(self.publish_nanos))
    }

    /// The ordering key, if any.
    pub fn ordering_key(&self) -> Option<&str> {
        self.extras.as_ref()?.ordering_key.as_deref()
    }

    /// Bytes the message counts for in flow control: its data, its attributes' keys and
    /// values, its id and ordering key.
    pub fn size(&self) -> usize {
        self.data().len()
            + self.attributes().byte_len()
            + self.id.heap_len()
            + self.ordering_key().map_or(0, str::len)
    }

    /// The chaos monkey's instance name: the data, when it is a host name (1 to 253 bytes of
    /// dot-separated labels of `[a-zA-Z0-9-]`, each 1 to 63 bytes, not starting or ending
    /// with `-`; letters compare case-insensitively).
    ///
    /// # Errors
    ///
    /// [`HostNameError`] saying why the data is no host name.
    ///
    /// ```
    /// use mayhem::PubSubMessage;
    /// assert_eq!(PubSubMessage::new("db-7.eu-west").instance_name(), Ok("db-7.eu-west"));
    /// assert!(PubSubMessage::new("-web").instance_name().is_err());
    /// assert!(PubSubMessage::new("").instance_name().is_err());
    /// assert!(PubSubMessage::new("a..b").instance_name().is_err());
    /// assert!(PubSubMessage::new("x".repeat(64)).instance_name().is_err());
    /// ```
    pub fn instance_name(&self) -> Result<&str, HostNameError> {
        host_name(self.data())
    }

    /// Checks Pub/Sub's limits: data up to [`MAX_DATA_BYTES`], at most [`MAX_ATTRIBUTES`]
    /// attributes, non-empty keys up to [`MAX_KEY_BYTES`], values up to [`MAX_VALUE_BYTES`],
    /// an ordering key up to [`MAX_ORDERING_KEY_BYTES`].
    ///
    /// # Errors
    ///
    /// The first limit the message exceeds.
    ///
    /// ```
    /// use mayhem::{MessageError, PubSubMessage};
    /// assert_eq!(PubSubMessage::new("web-01").check(), Ok(()));
    /// let long = PubSubMessage::new("x").with_attribute("k", "v".repeat(1025));
    /// assert!(matches!(long.check(), Err(MessageError::ValueTooLong { .. })));
    /// ```
    pub fn check(&self) -> Result<(), MessageError> {
        if self.data().len() > MAX_DATA_BYTES {
            return Err(MessageError::DataTooLarge {
                bytes: self.data().len(),
            });
        }
        let attributes = self.attributes();
        if attributes.len() > MAX_ATTRIBUTES {
            return Err(MessageError::TooManyAttributes {
                count: attributes.len(),
            });
        }
        for (key, value) in attributes.iter() {
            if key.is_empty() {
                return Err(MessageError::EmptyKey);
            }
            if key.len() > MAX_KEY_BYTES {
                return Err(MessageError::KeyTooLong {
                    key: shorten(key),
                    bytes: key.len(),
                });
            }
            if value.len() > MAX_VALUE_BYTES {
                return Err(MessageError::ValueTooLong {
                    key: key.to_owned(),
                    bytes: value.len(),
                });
            }
        }
        if let Some(key) = self.ordering_key() {
            if key.len() > MAX_ORDERING_KEY_BYTES {
                return Err(MessageError::OrderingKeyTooLong { bytes: key.len() });
            }
        }
        Ok(())
    }
}

/// The first 40 characters of `text`, marked when cut.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}
