//! The message Mayhem consumes: "restart this host".

use std::fmt;

use uuid::Uuid;

/// The fixed prefix of every instance name.
const PREFIX: &[u8; 7] = b"cattle-";
/// Length of the random suffix of an instance name.
const SUFFIX_LEN: usize = 4;
/// Length of a whole instance name (`cattle-` and four characters).
const NAME_LEN: usize = PREFIX.len() + SUFFIX_LEN;
/// The characters the random suffix is drawn from.
const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A "restart this host" message.
///
/// The instance name is stored inline (eleven ASCII bytes), so a message is a small `Copy`
/// value and creating one allocates nothing.
///
/// ```
/// let mut rng = mayhem::Rng::with_seed(7);
/// let msg = mayhem::PubSubMessage::random(&mut rng);
/// assert!(msg.instance_name().starts_with("cattle-"));
/// assert_eq!(msg.hostname(), format!("{}.example.net", msg.instance_name()));
/// assert_eq!(msg.to_string(), format!("PubSubMessage(instance_name='{}')", msg.instance_name()));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PubSubMessage {
    /// A random (version 4) identifier, unique per published message.
    message_id: Uuid,
    /// `cattle-` and four characters of `[a-z0-9]`; always ASCII, so always valid UTF-8.
    instance_name: [u8; NAME_LEN],
}

impl PubSubMessage {
    /// Creates a message with a random id and instance name drawn from `rng` (a
    /// [`Rng`](crate::Rng), re-exported from fastrand).
    ///
    /// The same seed gives the same messages, which keeps tests reproducible.
    pub fn random(rng: &mut crate::Rng) -> Self {
        let message_id = uuid::Builder::from_random_bytes(rng.u128(..).to_le_bytes()).into_uuid();
        let mut instance_name = [0u8; NAME_LEN];
        instance_name[..PREFIX.len()].copy_from_slice(PREFIX);
        for byte in &mut instance_name[PREFIX.len()..] {
            *byte = ALPHABET[rng.usize(..ALPHABET.len())];
        }
        PubSubMessage {
            message_id,
            instance_name,
        }
    }

    /// Creates a message from its parts, as a pub/sub backend stores them.
    ///
    /// Returns `None` unless `instance_name` is `cattle-` followed by four characters of
    /// `[a-z0-9]`.
    ///
    /// ```
    /// use mayhem::PubSubMessage;
    /// let id = mayhem::Uuid::nil();
    /// assert!(PubSubMessage::from_parts(id, "cattle-ab12").is_some());
    /// assert!(PubSubMessage::from_parts(id, "cattle-AB12").is_none());
    /// assert!(PubSubMessage::from_parts(id, "pet-ab12").is_none());
    /// ```
    pub fn from_parts(message_id: Uuid, instance_name: &str) -> Option<Self> {
        let bytes = instance_name.as_bytes();
        let valid = bytes.len() == NAME_LEN
            && bytes.starts_with(PREFIX)
            && bytes[PREFIX.len()..].iter().all(|b| ALPHABET.contains(b));
        if !valid {
            return None;
        }
        let mut name = [0u8; NAME_LEN];
        name.copy_from_slice(bytes);
        Some(PubSubMessage {
            message_id,
            instance_name: name,
        })
    }

    /// The message's unique id.
    pub fn message_id(&self) -> Uuid {
        self.message_id
    }

    /// The instance to restart, like `cattle-ae2t`.
    pub fn instance_name(&self) -> &str {
        // The bytes are ASCII by construction (`random` and `from_parts` only store ASCII),
        // so this never takes the fallback; it exists to avoid an `unwrap` in library code.
        std::str::from_utf8(&self.instance_name).unwrap_or("cattle-????")
    }

    /// The host to restart: `{instance_name}.example.net`.
    pub fn hostname(&self) -> String {
        self.host().to_string()
    }

    /// The host to restart, as a value that displays it without allocating.
    ///
    /// ```
    /// let msg = mayhem::PubSubMessage::random(&mut mayhem::Rng::with_seed(7));
    /// assert_eq!(format!("{}", msg.host()), msg.hostname());
    /// ```
    pub fn host(&self) -> Host<'_> {
        Host(self)
    }
}

/// The hostname of a message, `{instance_name}.example.net`, displayed on demand.
#[derive(Debug, Clone, Copy)]
pub struct Host<'a>(&'a PubSubMessage);

impl fmt::Display for Host<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.example.net", self.0.instance_name())
    }
}

impl fmt::Display for PubSubMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PubSubMessage(instance_name='{}')", self.instance_name())
    }
}

impl fmt::Debug for PubSubMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PubSubMessage")
            .field("message_id", &self.message_id)
            .field("instance_name", &self.instance_name())
            .finish()
    }
}
