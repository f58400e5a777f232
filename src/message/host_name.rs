//! Host names: the chaos monkey's instance names ([`host_name`]) and why data is not one
//! ([`HostNameError`]).

use std::fmt;

use super::{MAX_HOST_NAME_BYTES, MAX_LABEL_BYTES};

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
                // Escaped as a byte: 0xff is `\xff`, not the character U+00FF.
                write!(f, "byte {at} is '{}'", byte.escape_ascii())
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
