//! A message's id ([`MessageId`]): a UUID kept in 16 bytes, or any other text; and the
//! UUID helpers (a random one, the check of the usual text form).

use std::fmt;

use uuid::Uuid;

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
            IdRepr::Text(text) => fnv1a(text.as_bytes()),
        }
    }

    /// Heap bytes the id holds (for flow control by bytes).
    pub(super) fn heap_len(&self) -> usize {
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

/// FNV-1a over `bytes`: a 64-bit digest that is the same in every run.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
