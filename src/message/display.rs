//! How a message shows in logs: its `Display` and `Debug`, and the [`Label`] a log line keeps
//! of it.

use std::fmt;

use super::data::Data;
use super::host_name::host_name;
use super::{MessageId, PubSubMessage};

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
