//! A message's data ([`Data`]): small data kept in place, larger data shared.

use bytes::Bytes;

/// Most bytes of data kept inside the message itself, with no allocation: every host name
/// the built-in publishers draw, and short ones like `db-7.eu-west`. The rest is shared.
pub(super) const INLINE: usize = 22;

/// A message's data: up to [`INLINE`] bytes in place, larger data shared without copying.
///
/// The chaos monkey's messages are eleven bytes: kept in place, a message is copied with
/// no allocation and no reference count, and creating one allocates nothing. Larger data is
/// a boxed [`Bytes`]: 24 bytes for the enum instead of 40, as every message in flight is
/// moved through the pipeline several times (the box costs one small allocation per large
/// message, next to the data's own).
#[derive(Clone)]
pub(super) enum Data {
    /// Small data, in place: its length and bytes.
    Inline(u8, [u8; INLINE]),
    /// Larger data, shared.
    Shared(Box<Bytes>),
}

impl Data {
    /// Data from `bytes`, in place when small.
    pub(super) fn from_bytes(bytes: Bytes) -> Self {
        if bytes.len() <= INLINE {
            Data::inline(&bytes)
        } else {
            Data::Shared(Box::new(bytes))
        }
    }

    /// Small data in place; `bytes` is at most [`INLINE`] long.
    pub(super) fn inline(bytes: &[u8]) -> Self {
        let mut buffer = [0; INLINE];
        let len = bytes.len().min(INLINE);
        buffer[..len].copy_from_slice(&bytes[..len]);
        // `len` is at most `INLINE` (38), so it fits a byte.
        Data::Inline(len as u8, buffer)
    }

    /// The bytes.
    pub(super) fn as_slice(&self) -> &[u8] {
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
