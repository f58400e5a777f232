//! Parsing of Redis replies: entry ids, entry fields, and the shapes of `XREADGROUP`,
//! `XINFO` and the scripts' answers.

use std::fmt;

use redis::Value;

use crate::message::PubSubMessage;

/// A stream entry id, `ms-seq`, stored without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct EntryId {
    /// Milliseconds part.
    pub(super) ms: u64,
    /// Sequence part.
    pub(super) seq: u64,
}

impl EntryId {
    /// Parses `ms-seq`.
    pub(super) fn parse(text: &str) -> Option<Self> {
        let (ms, seq) = text.split_once('-')?;
        Some(EntryId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// The id just before this one (`0-0` stays `0-0`): a group created there delivers this
    /// entry and every later one.
    pub(super) fn predecessor(self) -> Self {
        match (self.ms, self.seq) {
            (0, 0) => self,
            (ms, 0) => EntryId {
                ms: ms - 1,
                seq: u64::MAX,
            },
            (ms, seq) => EntryId { ms, seq: seq - 1 },
        }
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A delivered entry: its id, what its fields hold, and its delivery count.
pub(super) type Entry = (EntryId, Fields, u32);

/// The bytes of a string reply.
fn bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

/// An entry id reply.
fn entry_id(value: &Value) -> Option<EntryId> {
    EntryId::parse(std::str::from_utf8(bytes(value)?).ok()?)
}

/// What an entry's fields hold, read without allocating for the fields every entry has.
#[derive(Debug, Default)]
pub(super) struct Fields {
    /// The message, when `message_id` is a uuid and `instance_name` a valid name.
    pub(super) message: Option<PubSubMessage>,
    /// `attempts` of earlier deliveries (0 when absent or not a number).
    pub(super) attempts: u32,
    /// Every other field, in the entry's order.
    pub(super) others: Vec<(String, String)>,
}

impl Fields {
    /// Reads an entry's `(field, value)` pairs.
    pub(super) fn from_pairs<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Self {
        let mut fields = Fields::default();
        let mut message_id = None;
        let mut instance_name = None;
        for (key, value) in pairs {
            match key {
                b"message_id" => message_id = uuid::Uuid::try_parse_ascii(value).ok(),
                b"instance_name" => instance_name = std::str::from_utf8(value).ok(),
                b"attempts" => {
                    fields.attempts = std::str::from_utf8(value)
                        .ok()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                }
                _ => {
                    if let (Ok(key), Ok(value)) =
                        (std::str::from_utf8(key), std::str::from_utf8(value))
                    {
                        fields.others.push((key.to_owned(), value.to_owned()));
                    }
                }
            }
        }
        fields.message = message_id
            .zip(instance_name)
            .and_then(|(id, name)| PubSubMessage::from_parts(id, name));
        fields
    }
}

/// Reads an entry's flat `field value ...` list.
pub(super) fn fields(list: &[Value]) -> Fields {
    Fields::from_pairs(
        list.chunks(2)
            .filter_map(|pair| Some((bytes(pair.first()?)?, bytes(pair.get(1)?)?))),
    )
}

/// A string reply as text.
pub(super) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// An integer reply (or a string holding one).
pub(super) fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

/// The entries of an `XREADGROUP` reply on one stream: `[[stream, [[id, fields]...]]]`, or
/// nil when the block timed out. Every entry read is delivered for the first time.
pub(super) fn read_reply_entries(reply: Value) -> Vec<Entry> {
    let mut entries = Vec::new();
    match reply {
        Value::Array(streams) => {
            for stream in streams {
                if let Value::Array(parts) = stream {
                    if let Some(rows) = parts.into_iter().nth(1) {
                        push_rows(rows, &mut entries);
                    }
                }
            }
        }
        // RESP3 servers answer with a map of stream to entries.
        Value::Map(pairs) => {
            for (_, rows) in pairs {
                push_rows(rows, &mut entries);
            }
        }
        _ => {}
    }
    entries
}

/// Appends the `[[id, fields]...]` rows of one stream, taking the field lists over.
fn push_rows(rows: Value, entries: &mut Vec<Entry>) {
    let Value::Array(rows) = rows else { return };
    entries.reserve(rows.len());
    for row in rows {
        let Value::Array(cells) = row else { continue };
        let mut cells = cells.into_iter();
        if let (Some(Some(id)), Some(Value::Array(fields))) =
            (cells.next().as_ref().map(entry_id), cells.next())
        {
            entries.push((id, self::fields(&fields), 1));
        }
    }
}

/// The claim script's answer: `{next start id, {{id, fields, deliveries}...}, dead-lettered}`.
pub(super) fn claim_reply(reply: Value) -> (String, Vec<Entry>, u64) {
    let Value::Array(parts) = reply else {
        return ("0-0".to_owned(), Vec::new(), 0);
    };
    let next = parts
        .first()
        .and_then(text)
        .unwrap_or_else(|| "0-0".to_owned());
    let dead = parts
        .get(2)
        .and_then(int)
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0);
    let mut entries = Vec::new();
    if let Some(Value::Array(rows)) = parts.get(1) {
        for row in rows {
            if let Value::Array(cells) = row {
                if let (Some(id), Some(Value::Array(fields)), Some(n)) = (
                    cells.first().and_then(entry_id),
                    cells.get(1),
                    cells.get(2).and_then(int),
                ) {
                    entries.push((
                        id,
                        self::fields(fields),
                        u32::try_from(n).unwrap_or(u32::MAX),
                    ));
                }
            }
        }
    }
    (next, entries, dead)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_round_trip_and_step_back() {
        let id = EntryId::parse("1700000000000-42").expect("a valid id");
        assert_eq!(
            id,
            EntryId {
                ms: 1_700_000_000_000,
                seq: 42
            }
        );
        assert_eq!(id.to_string(), "1700000000000-42");
        assert_eq!(id.predecessor().to_string(), "1700000000000-41");
        assert_eq!(
            EntryId::parse("5-0").map(|id| id.predecessor().to_string()),
            Some(format!("4-{}", u64::MAX))
        );
        assert_eq!(
            EntryId::parse("0-0").map(EntryId::predecessor),
            EntryId::parse("0-0")
        );
        assert_eq!(EntryId::parse("17-x"), None);
        assert_eq!(EntryId::parse("17"), None);
    }

    #[test]
    fn read_reply_parses_entries_and_timeouts() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("mayhem"),
            Value::Array(vec![Value::Array(vec![
                bulk("1-0"),
                Value::Array(vec![bulk("instance_name"), bulk("cattle-ab12")]),
            ])]),
        ])]);
        let entries = read_reply_entries(reply);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].0.to_string(), "1-0");
        let fields = &entries[0].1;
        assert!(fields.message.is_none(), "no message id");
        assert_eq!(fields.attempts, 0);
        assert!(read_reply_entries(Value::Nil).is_empty());
    }

    #[test]
    fn claim_reply_tolerates_odd_shapes() {
        assert_eq!(claim_reply(Value::Nil).0, "0-0");
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![
            bulk("3-0"),
            Value::Array(vec![Value::Array(vec![
                bulk("2-0"),
                Value::Array(vec![]),
                Value::Int(4),
            ])]),
            Value::Int(1),
        ]);
        let (next, entries, dead) = claim_reply(reply);
        assert_eq!(
            (next.as_str(), entries.len(), entries[0].2, dead),
            ("3-0", 1, 4, 1)
        );
    }
}
