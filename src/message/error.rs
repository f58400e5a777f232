//! Why a message may not be published ([`MessageError`]).

use std::fmt;

use super::{
    MAX_ATTRIBUTES, MAX_DATA_BYTES, MAX_KEY_BYTES, MAX_ORDERING_KEY_BYTES, MAX_VALUE_BYTES,
};

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
