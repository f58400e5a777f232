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

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use uuid::Uuid;

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

/// A message's id: the producer's, or the broker's when the producer gave none.
///
/// Ids that are UUIDs in their usual form (lowercase, hyphenated), as the built-in publishers
/// make them, are kept in 16 bytes; any other id is kept as text. Two ids are equal when their
/// text is.
///
/// ```
/// use mayhem::MessageId;
/// let uuid = mayhem::Uuid::from_u128(7);
/// let id = MessageId::from(uuid);
/// assert_eq!(id, MessageId::from(uuid.to_string()));
/// assert_eq!(id.as_uuid(), Some(uuid));
/// assert_eq!(MessageId::from("1700000000000-0").to_string(), "1700000000000-0");
/// assert!(MessageId::default().is_empty());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MessageId(IdRepr);

/// How an id is kept.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum IdRepr {
    /// A UUID whose text is its lowercase hyphenated form.
    Uuid(Uuid),
    /// Any other text (boxed: two words, not a `String`'s three).
    Text(Box<str>),
}

impl Default for IdRepr {
    fn default() -> Self {
        IdRepr::Text(Box::default())
    }
}

impl MessageId {
    /// The id as a UUID, when it is one in its usual form.
    pub fn as_uuid(&self) -> Option<Uuid> {
        match &self.0 {
            IdRepr::Uuid(uuid) => Some(*uuid),
            IdRepr::Text(_) => None,
        }
    }

    /// Whether the id is empty (a message not published yet, whose broker gives it one).
    pub fn is_empty(&self) -> bool {
        matches!(&self.0, IdRepr::Text(text) if text.is_empty())
    }

    /// Calls `f` with the id's text, formatting a UUID on the stack.
    pub fn with_str<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        match &self.0 {
            IdRepr::Uuid(uuid) => f(uuid.hyphenated().encode_lower(&mut Uuid::encode_buffer())),
            IdRepr::Text(text) => f(text),
        }
    }

    /// A 64-bit digest of the id, stable across runs (FNV-1a over the text): seeds the chaos
    /// monkey's random choices per message.
    pub fn digest(&self) -> u64 {
        match &self.0 {
            IdRepr::Uuid(uuid) => {
                let (high, low) = uuid.as_u64_pair();
                high ^ low.rotate_left(17)
            }
            IdRepr::Text(text) => text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
            }),
        }
    }

    /// Heap bytes the id holds (for flow control by bytes).
    fn heap_len(&self) -> usize {
        match &self.0 {
            IdRepr::Uuid(_) => 0,
            IdRepr::Text(text) => text.len(),
        }
    }
}

impl From<Uuid> for MessageId {
    fn from(uuid: Uuid) -> Self {
        MessageId(IdRepr::Uuid(uuid))
    }
}

impl From<&str> for MessageId {
    fn from(text: &str) -> Self {
        match canonical_uuid(text.as_bytes()) {
            Some(uuid) => MessageId(IdRepr::Uuid(uuid)),
            None => MessageId(IdRepr::Text(text.into())),
        }
    }
}

impl From<String> for MessageId {
    fn from(text: String) -> Self {
        match canonical_uuid(text.as_bytes()) {
            Some(uuid) => MessageId(IdRepr::Uuid(uuid)),
            None => MessageId(IdRepr::Text(text.into_boxed_str())),
        }
    }
}

/// A random (version 4) UUID drawn from `rng`.
pub(crate) fn random_uuid(rng: &mut crate::Rng) -> Uuid {
    uuid::Builder::from_random_bytes(rng.u128(..).to_le_bytes()).into_uuid()
}

/// The UUID whose lowercase hyphenated text is `bytes`, if it is one.
pub(crate) fn canonical_uuid(bytes: &[u8]) -> Option<Uuid> {
    if bytes.len() != 36 {
        return None;
    }
    let uuid = Uuid::try_parse_ascii(bytes).ok()?;
    let mut buffer = Uuid::encode_buffer();
    (uuid.hyphenated().encode_lower(&mut buffer).as_bytes() == bytes).then_some(uuid)
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_str(|text| f.write_str(text))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_str(|text| fmt::Debug::fmt(text, f))
    }
}

/// String attributes of a message: Redis entry fields, AMQP headers, Pub/Sub attributes.
///
/// Empty attributes allocate nothing, so the chaos monkey's own messages carry none for free.
///
/// ```
/// use mayhem::Attributes;
/// let mut attributes = Attributes::new();
/// assert!(attributes.is_empty());
/// attributes.insert("origin", "billing");
/// attributes.insert("origin", "payroll");
/// assert_eq!(attributes.get("origin"), Some("payroll"));
/// assert_eq!(attributes.len(), 1);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Attributes(
    /// A boxed slice, absent when empty: every lease carries its message through the hand-off
    /// channel and the task, so they take two words, not a `Vec`'s three (setting one
    /// reallocates, which only producers do).
    Option<Box<[(String, String)]>>,
);

impl Attributes {
    /// No attributes (allocates nothing).
    pub const fn new() -> Self {
        Attributes(None)
    }

    /// Sets `key` to `value`, replacing an earlier value of the same key.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let (key, value) = (key.into(), value.into());
        if let Some(slot) = self
            .0
            .as_deref_mut()
            .and_then(|pairs| pairs.iter_mut().find(|(k, _)| *k == key))
        {
            slot.1 = value;
            return;
        }
        let mut pairs = self.0.take().map(Vec::from).unwrap_or_default();
        pairs.push((key, value));
        self.0 = Some(pairs.into_boxed_slice());
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs()
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every attribute, in the order they were first set.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs().iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many attributes there are.
    pub fn len(&self) -> usize {
        self.pairs().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.pairs().is_empty()
    }

    /// Bytes of every key and value together.
    pub fn byte_len(&self) -> usize {
        self.pairs().iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// The pairs, empty when there are none.
    fn pairs(&self) -> &[(String, String)] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Attributes {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut attributes = Attributes::new();
        for (key, value) in iter {
            attributes.insert(key, value);
        }
        attributes
    }
}

/// Most bytes of data kept inside the message itself, with no allocation: every host name
/// the built-in publishers draw, and short ones like `db-7.eu-west`. The rest is shared.
const INLINE: usize = 22;

/// A message's data: up to [`INLINE`] bytes in place, larger data shared without copying.
///
/// The chaos monkey's messages are eleven bytes: kept in place, a message is copied with
/// no allocation and no reference count, and creating one allocates nothing. Larger data is
/// a boxed [`Bytes`]: 24 bytes for the enum instead of 40, as every message in flight is
/// moved through the pipeline several times (the box costs one small allocation per large
/// message, next to the data's own).
#[derive(Clone)]
enum Data {
    /// Small data, in place: its length and bytes.
    Inline(u8, [u8; INLINE]),
    /// Larger data, shared.
    Shared(Box<Bytes>),
}

impl Data {
    /// Data from `bytes`, in place when small.
    fn from_bytes(bytes: Bytes) -> Self {
        if bytes.len() <= INLINE {
            Data::inline(&bytes)
        } else {
            Data::Shared(Box::new(bytes))
        }
    }

    /// Small data in place; `bytes` is at most [`INLINE`] long.
    fn inline(bytes: &[u8]) -> Self {
        let mut buffer = [0; INLINE];
        let len = bytes.len().min(INLINE);
        buffer[..len].copy_from_slice(&bytes[..len]);
        // `len` is at most `INLINE` (38), so it fits a byte.
        Data::Inline(len as u8, buffer)
    }

    /// The bytes.
    fn as_slice(&self) -> &[u8] {
        match self {
            Data::Inline(len, bytes) => &bytes[..usize::from(*len)],
            Data::Shared(bytes) => bytes,
        }
    }
}

impl Default for Data {
    fn default() -> Self {
        Data::Inline(0, [0; INLINE])
    }
}

impl PartialEq for Data {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Data {}

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

/// Why a message may not be published: one of Pub/Sub's limits, or a reserved name.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageError {
    /// The data is longer than [`MAX_DATA_BYTES`].
    DataTooLarge {
        /// Its length.
        bytes: usize,
    },
    /// More than [`MAX_ATTRIBUTES`] attributes.
    TooManyAttributes {
        /// How many.
        count: usize,
    },
    /// An attribute key is empty.
    EmptyKey,
    /// An attribute key is longer than [`MAX_KEY_BYTES`].
    KeyTooLong {
        /// The key's start.
        key: String,
        /// Its length.
        bytes: usize,
    },
    /// An attribute value is longer than [`MAX_VALUE_BYTES`].
    ValueTooLong {
        /// The key of the value.
        key: String,
        /// The value's length.
        bytes: usize,
    },
    /// The ordering key is longer than [`MAX_ORDERING_KEY_BYTES`].
    OrderingKeyTooLong {
        /// Its length.
        bytes: usize,
    },
    /// An attribute key is a name the broker's wire format keeps for the message itself.
    ReservedKey {
        /// The key.
        key: String,
        /// The broker.
        broker: &'static str,
    },
    /// The broker cannot carry this message (for example an ordering key where it keeps no
    /// order).
    Unsupported(String),
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageError::DataTooLarge { bytes } => write!(
                f,
                "data of {bytes} bytes is over the limit of {MAX_DATA_BYTES} bytes"
            ),
            MessageError::TooManyAttributes { count } => write!(
                f,
                "{count} attributes are over the limit of {MAX_ATTRIBUTES}"
            ),
            MessageError::EmptyKey => f.write_str("an attribute key is empty"),
            MessageError::KeyTooLong { key, bytes } => write!(
                f,
                "attribute key '{key}' of {bytes} bytes is over the limit of {MAX_KEY_BYTES} bytes"
            ),
            MessageError::ValueTooLong { key, bytes } => write!(
                f,
                "the value of attribute '{key}' has {bytes} bytes, over the limit of {MAX_VALUE_BYTES} bytes"
            ),
            MessageError::OrderingKeyTooLong { bytes } => write!(
                f,
                "ordering key of {bytes} bytes is over the limit of {MAX_ORDERING_KEY_BYTES} bytes"
            ),
            MessageError::ReservedKey { key, broker } => write!(
                f,
                "attribute key '{key}' is reserved by the {broker} wire format"
            ),
            MessageError::Unsupported(text) => f.write_str(text),
        }
    }
}

impl std::error::Error for MessageError {}

/// Why data is not a host name.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostNameError {
    /// No bytes at all.
    Empty,
    /// Longer than [`MAX_HOST_NAME_BYTES`].
    TooLong {
        /// The length.
        bytes: usize,
    },
    /// Two dots in a row, or a dot at either end.
    EmptyLabel,
    /// A label longer than [`MAX_LABEL_BYTES`].
    LabelTooLong {
        /// The label's length.
        bytes: usize,
    },
    /// A label starts or ends with `-`.
    Hyphen {
        /// The label.
        label: String,
    },
    /// A byte outside `[a-zA-Z0-9.-]`.
    BadByte {
        /// The byte.
        byte: u8,
        /// Where, counting from 0.
        at: usize,
    },
}

impl fmt::Display for HostNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("data is not a host name: ")?;
        match self {
            HostNameError::Empty => f.write_str("it is empty"),
            HostNameError::TooLong { bytes } => {
                write!(f, "{bytes} bytes, over the limit of {MAX_HOST_NAME_BYTES}")
            }
            HostNameError::EmptyLabel => f.write_str("a label is empty"),
            HostNameError::LabelTooLong { bytes } => write!(
                f,
                "a label of {bytes} bytes, over the limit of {MAX_LABEL_BYTES}"
            ),
            HostNameError::Hyphen { label } => {
                write!(f, "label '{label}' starts or ends with '-'")
            }
            HostNameError::BadByte { byte, at } => {
                write!(f, "byte {at} is {:?}", char::from(*byte))
            }
        }
    }
}

impl std::error::Error for HostNameError {}

/// `data` as a host name.
pub(crate) fn host_name(data: &[u8]) -> Result<&str, HostNameError> {
    if data.is_empty() {
        return Err(HostNameError::Empty);
    }
    if data.len() > MAX_HOST_NAME_BYTES {
        return Err(HostNameError::TooLong { bytes: data.len() });
    }
    // One pass: the chaos monkey checks every message it handles.
    let mut start = 0;
    for (at, &byte) in data.iter().enumerate() {
        if byte == b'.' {
            check_label(&data[start..at])?;
            start = at + 1;
        } else if !(byte.is_ascii_alphanumeric() || byte == b'-') {
            return Err(HostNameError::BadByte { byte, at });
        }
    }
    check_label(&data[start..])?;
    // Every byte was checked to be ASCII above, so this never takes the error path; it
    // exists to avoid an `unwrap` in library code.
    std::str::from_utf8(data).map_err(|_| HostNameError::Empty)
}

/// Checks one label of a host name (its bytes are checked already).
fn check_label(label: &[u8]) -> Result<(), HostNameError> {
    match label {
        [] => Err(HostNameError::EmptyLabel),
        _ if label.len() > MAX_LABEL_BYTES => {
            Err(HostNameError::LabelTooLong { bytes: label.len() })
        }
        [b'-', ..] | [.., b'-'] => Err(HostNameError::Hyphen {
            label: String::from_utf8_lossy(label).into_owned(),
        }),
        _ => Ok(()),
    }
}

impl fmt::Display for PubSubMessage {
    /// `PubSubMessage(instance_name='web-01')` when the data is a host name, as the reference
    /// logs it; `PubSubMessage(message_id='...', data=N bytes)` otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        display(&self.id, self.data(), f)
    }
}

/// How a message is displayed (see its `Display`).
fn display(id: &MessageId, data: &[u8], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match host_name(data) {
        Ok(name) => write!(f, "PubSubMessage(instance_name='{name}')"),
        Err(_) => write!(
            f,
            "PubSubMessage(message_id='{id}', data={} bytes)",
            data.len()
        ),
    }
}

/// What a log line about a message shows of it, kept apart from the message: its id and
/// its data. For small data and a UUID id, as the chaos monkey's, making one copies a few
/// words and allocates nothing; larger data is shared.
#[derive(Clone)]
pub(crate) struct Label {
    /// The message's id.
    id: MessageId,
    /// What the line shows of the data.
    shown: Shown,
}

/// What a [`Label`] shows of a message's data.
#[derive(Clone)]
enum Shown {
    /// Small data, copied.
    Data(Data),
    /// Larger data that is a host name: the name.
    Name(Box<str>),
    /// Larger data that is no host name: its length.
    Len(usize),
}

impl PubSubMessage {
    /// The message's [`Label`], for log lines written where the message itself is not.
    pub(crate) fn label(&self) -> Label {
        let shown = match &self.data {
            Data::Inline(..) => Shown::Data(self.data.clone()),
            Data::Shared(bytes) => match host_name(bytes) {
                Ok(name) => Shown::Name(name.into()),
                Err(_) => Shown::Len(bytes.len()),
            },
        };
        Label {
            id: self.id.clone(),
            shown,
        }
    }
}

impl Label {
    /// The message's id.
    pub(crate) fn id(&self) -> &MessageId {
        &self.id
    }
}

impl fmt::Display for Label {
    /// As the message displays.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.shown {
            Shown::Data(data) => display(&self.id, data.as_slice(), f),
            Shown::Name(name) => write!(f, "PubSubMessage(instance_name='{name}')"),
            Shown::Len(len) => write!(
                f,
                "PubSubMessage(message_id='{}', data={len} bytes)",
                self.id
            ),
        }
    }
}

impl fmt::Debug for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Debug for PubSubMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// The data's first 64 bytes, escaped.
        struct Head<'a>(&'a [u8]);
        impl fmt::Debug for Head<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let shown = &self.0[..self.0.len().min(64)];
                write!(f, "b\"{}\"", shown.escape_ascii())?;
                if self.0.len() > shown.len() {
                    write!(f, "... ({} bytes)", self.0.len())?;
                }
                Ok(())
            }
        }
        f.debug_struct("PubSubMessage")
            .field("id", &self.id)
            .field("data", &Head(self.data()))
            .field("attributes", self.attributes())
            .field("publish_time", &self.publish_time())
            .field("ordering_key", &self.ordering_key())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_follow_the_label_rules() {
        for good in ["web-01", "db-7.eu-west", "cattle-ae2t", "WEB-01", "a", "0"] {
            assert!(host_name(good.as_bytes()).is_ok(), "{good}");
        }
        let longest = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(longest.len(), 253);
        assert!(host_name(longest.as_bytes()).is_ok());
        let cases: [(&[u8], HostNameError); 7] = [
            (b"", HostNameError::Empty),
            (
                b"web-",
                HostNameError::Hyphen {
                    label: "web-".into(),
                },
            ),
            (b"a.-b", HostNameError::Hyphen { label: "-b".into() }),
            (b".a", HostNameError::EmptyLabel),
            (b"a.", HostNameError::EmptyLabel),
            (b"we b", HostNameError::BadByte { byte: b' ', at: 2 }),
            (b"\0\xff", HostNameError::BadByte { byte: 0, at: 0 }),
        ];
        for (data, error) in cases {
            assert_eq!(host_name(data), Err(error), "{:?}", data.escape_ascii());
        }
        assert_eq!(
            host_name(format!("{longest}x").as_bytes()),
            Err(HostNameError::TooLong { bytes: 254 })
        );
        assert_eq!(
            host_name("x".repeat(64).as_bytes()),
            Err(HostNameError::LabelTooLong { bytes: 64 })
        );
    }

    #[test]
    fn limits_are_pubsubs() {
        assert!(PubSubMessage::new(vec![0; MAX_DATA_BYTES]).check().is_ok());
        assert_eq!(
            PubSubMessage::new(vec![0; MAX_DATA_BYTES + 1]).check(),
            Err(MessageError::DataTooLarge {
                bytes: MAX_DATA_BYTES + 1
            })
        );
        let many: Attributes = (0..=MAX_ATTRIBUTES).map(|i| (i.to_string(), "v")).collect();
        assert_eq!(
            PubSubMessage::new("x").with_attributes(many).check(),
            Err(MessageError::TooManyAttributes { count: 101 })
        );
        let key = "k".repeat(MAX_KEY_BYTES);
        assert!(PubSubMessage::new("x")
            .with_attribute(key.clone(), "v".repeat(MAX_VALUE_BYTES))
            .check()
            .is_ok());
        assert!(matches!(
            PubSubMessage::new("x")
                .with_attribute(format!("{key}k"), "v")
                .check(),
            Err(MessageError::KeyTooLong { bytes: 257, .. })
        ));
        assert_eq!(
            PubSubMessage::new("x").with_attribute("", "v").check(),
            Err(MessageError::EmptyKey)
        );
        assert_eq!(
            PubSubMessage::new("x")
                .with_ordering_key("o".repeat(1025))
                .check(),
            Err(MessageError::OrderingKeyTooLong { bytes: 1025 })
        );
    }

    #[test]
    fn uuid_ids_are_kept_compact_and_equal_their_text() {
        let uuid = Uuid::from_u128(0xabcd_ef12);
        assert_eq!(MessageId::from(uuid), MessageId::from(uuid.to_string()));
        // Upper case is not the usual form: kept as text, and so not equal.
        let upper = uuid.hyphenated().to_string().to_uppercase();
        assert_eq!(MessageId::from(upper.as_str()).as_uuid(), None);
        assert_eq!(MessageId::from(upper.as_str()).to_string(), upper);
        assert_ne!(MessageId::from("a").digest(), MessageId::from("b").digest());
    }

    #[test]
    fn a_message_is_small() {
        // Every message in flight is moved through the pipeline several times: an id of 24
        // bytes, data of 24 (22 in place, or shared), the publish time and the extras 8 each.
        assert_eq!(std::mem::size_of::<Data>(), 24);
        assert_eq!(std::mem::size_of::<PubSubMessage>(), 64);
        let time = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        assert_eq!(
            PubSubMessage::new("x")
                .with_publish_time(time)
                .publish_time(),
            Some(time)
        );
        assert_eq!(
            PubSubMessage::new("x")
                .with_publish_time(UNIX_EPOCH)
                .publish_time(),
            None
        );
        let keyed = PubSubMessage::new("x")
            .with_ordering_key("k")
            .with_attribute("a", "b");
        assert_eq!(
            (keyed.ordering_key(), keyed.attributes().get("a")),
            (Some("k"), Some("b"))
        );
        let small = PubSubMessage::new("x".repeat(INLINE));
        assert!(matches!(small.data, Data::Inline(..)));
        let large = PubSubMessage::new("x".repeat(INLINE + 1));
        assert!(matches!(large.data, Data::Shared(_)));
        assert_eq!(small.data_bytes(), "x".repeat(INLINE).as_bytes());
        assert_eq!(PubSubMessage::new(large.data_bytes()), large);
        let name = "a".repeat(30);
        assert_eq!(
            PubSubMessage::new(name.clone()).label().to_string(),
            format!("PubSubMessage(instance_name='{name}')")
        );
        assert_eq!(
            PubSubMessage::new(vec![0; 30])
                .with_id("i")
                .label()
                .to_string(),
            "PubSubMessage(message_id='i', data=30 bytes)"
        );
        assert_eq!(
            PubSubMessage::new("web-01").label().to_string(),
            "PubSubMessage(instance_name='web-01')"
        );
    }
}
