//! Parsing of Redis replies: entry ids, entry fields, and the shapes of `XREADGROUP`,
//! `XINFO` and the scripts' answers.

use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use redis::Value;

use crate::message::{Attributes, MessageId, PubSubMessage};

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

/// The fields of an entry that are the message's own; every other field is an attribute.
/// Publishing refuses them as attribute keys.
pub(super) const RESERVED_FIELDS: [&str; 6] = [
    "data",
    "message_id",
    "publish_time",
    "ordering_key",
    "attempts",
    "dead_reason",
];

/// What an entry's fields hold.
#[derive(Debug)]
pub(super) struct Fields {
    /// The message, or why the entry is not one (it is then dead-lettered with that reason).
    pub(super) message: Result<PubSubMessage, String>,
    /// `attempts` of earlier deliveries (0 when absent or not a number).
    pub(super) attempts: u32,
}

impl Fields {
    /// Reads the `(field, value)` pairs of entry `id`. The entry id stands in for a missing
    /// `message_id`, and its milliseconds for a missing `publish_time`.
    pub(super) fn from_pairs<'a>(
        id: EntryId,
        pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Self {
        let mut attempts = 0;
        let mut data = None;
        let mut message_id = None;
        let mut publish_ms = None;
        let mut ordering_key = None;
        let mut attributes = Attributes::new();
        let mut problem = None;
        let mut old_layout = false;
        for (key, value) in pairs {
            match key {
                // Two: which one is the message is anybody's guess (the last one won, and a
                // host the producer may not have meant was restarted).
                b"data" if data.is_some() => {
                    problem = Some("field 'data' is given twice".to_owned());
                }
                b"data" => data = Some(value),
                b"message_id" => match std::str::from_utf8(value) {
                    Ok(text) => message_id = Some(MessageId::from(text)),
                    Err(_) => problem = Some("field 'message_id' is not UTF-8".to_owned()),
                },
                b"publish_time" => {
                    publish_ms = std::str::from_utf8(value)
                        .ok()
                        .and_then(|n| n.parse::<u64>().ok());
                }
                b"ordering_key" => match std::str::from_utf8(value) {
                    Ok(text) => ordering_key = Some(text.to_owned()),
                    Err(_) => problem = Some("field 'ordering_key' is not UTF-8".to_owned()),
                },
                b"attempts" => {
                    attempts = std::str::from_utf8(value)
                        .ok()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                }
                b"dead_reason" => {}
                _ => match (std::str::from_utf8(key), std::str::from_utf8(value)) {
                    (Ok(key), Ok(value)) => {
                        old_layout |= key == "instance_name";
                        attributes.insert(key, value);
                    }
                    (Err(_), _) => {
                        problem = Some(format!(
                            "field name {:?} is not UTF-8 (attributes are strings)",
                            key.escape_ascii().to_string()
                        ))
                    }
                    (Ok(key), Err(_)) => {
                        problem = Some(format!(
                            "the value of field '{key}' is not UTF-8 (attributes are strings)"
                        ))
                    }
                },
            }
        }
        let message = match (data, problem) {
            (_, Some(problem)) => Err(problem),
            (None, None) if old_layout => Err(
                "entry has no 'data' field (the message_id/instance_name layout of earlier builds is not read: write the instance name as 'data')".to_owned(),
            ),
            (None, None) => Err("entry has no 'data' field".to_owned()),
            (Some(data), None) => {
                let ms = publish_ms.unwrap_or(id.ms);
                let mut message = PubSubMessage::copy_from_slice(data).with_attributes(attributes);
                if let Some(time) = UNIX_EPOCH.checked_add(Duration::from_millis(ms)) {
                    message = message.with_publish_time(time);
                }
                let mut message = message
                    .with_id(message_id.unwrap_or_else(|| MessageId::from(id.to_string())));
                if let Some(key) = ordering_key {
                    message = message.with_ordering_key(key);
                }
                Ok(message)
            }
        };
        Fields { message, attempts }
    }
}

/// Reads an entry's flat `field value ...` list.
pub(super) fn fields(id: EntryId, list: &[Value]) -> Fields {
    Fields::from_pairs(
        id,
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
            entries.push((id, self::fields(id, &fields), 1));
        }
    }
}

/// What one run of the claim script answered.
#[derive(Debug)]
pub(super) struct Claimed {
    /// Where the next run starts (`0-0`: the sweep went round).
    pub(super) next: String,
    /// The entries claimed, to lease.
    pub(super) entries: Vec<Entry>,
    /// Entries claimed past their attempts, to dead-letter: id, deliveries, attempts so far.
    pub(super) past: Vec<(EntryId, u32, u32)>,
    /// Entries found deleted from the stream while pending (tombstones were written).
    pub(super) gone: u64,
    /// The first of them.
    pub(super) first_gone: String,
}

/// Reads the claim script's answer; odd shapes read as nothing claimed.
pub(super) fn claim_reply(reply: Value) -> Claimed {
    let mut claimed = Claimed {
        next: "0-0".to_owned(),
        entries: Vec::new(),
        past: Vec::new(),
        gone: 0,
        first_gone: String::new(),
    };
    let Value::Array(parts) = reply else {
        return claimed;
    };
    if let Some(next) = parts.first().and_then(text) {
        claimed.next = next;
    }
    let count = |value: &Value| int(value).map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    if let Some(Value::Array(rows)) = parts.get(1) {
        for row in rows {
            if let Value::Array(cells) = row {
                if let (Some(id), Some(Value::Array(fields)), Some(n)) = (
                    cells.first().and_then(entry_id),
                    cells.get(1),
                    cells.get(2).and_then(count),
                ) {
                    claimed.entries.push((id, self::fields(id, fields), n));
                }
            }
        }
    }
    if let Some(Value::Array(rows)) = parts.get(2) {
        for row in rows {
            if let Value::Array(cells) = row {
                if let (Some(id), Some(n), Some(attempts)) = (
                    cells.first().and_then(entry_id),
                    cells.get(1).and_then(count),
                    cells.get(2).and_then(count),
                ) {
                    claimed.past.push((id, n, attempts));
                }
            }
        }
    }
    claimed.gone = parts
        .get(3)
        .and_then(int)
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0);
    claimed.first_gone = parts.get(4).and_then(text).unwrap_or_default();
    claimed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_with_data_twice_is_not_a_message() {
        let id = EntryId { ms: 5, seq: 0 };
        let pairs: [(&[u8], &[u8]); 2] = [(b"data", b"web-03"), (b"data", b"web-04")];
        let fields = Fields::from_pairs(id, pairs.into_iter());
        assert_eq!(
            fields.message.err().as_deref(),
            Some("field 'data' is given twice")
        );
        let once: [(&[u8], &[u8]); 1] = [(b"data", b"web-03")];
        let fields = Fields::from_pairs(id, once.into_iter());
        assert_eq!(
            fields.message.map(|m| m.data().to_vec()),
            Ok(b"web-03".to_vec())
        );
    }

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
        let reason = fields.message.as_ref().unwrap_err();
        assert!(reason.contains("no 'data' field"), "{reason}");
        assert!(reason.contains("earlier builds"), "{reason}");
        assert_eq!(fields.attempts, 0);
        assert!(read_reply_entries(Value::Nil).is_empty());
    }

    #[test]
    fn any_producer_entry_is_a_message_and_the_entry_id_stands_in() {
        let id = EntryId::parse("1700000000123-7").unwrap();
        let pairs: [(&[u8], &[u8]); 3] = [
            (b"data", b"\0\xff bin"),
            (b"origin", b"ops"),
            (b"attempts", b"2"),
        ];
        let fields = Fields::from_pairs(id, pairs.into_iter());
        let message = fields.message.unwrap();
        assert_eq!(message.data(), b"\0\xff bin");
        assert_eq!(message.id().to_string(), "1700000000123-7");
        assert_eq!(message.attributes().get("origin"), Some("ops"));
        assert_eq!(message.attributes().len(), 1);
        assert_eq!(
            message.publish_time(),
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123))
        );
        assert_eq!(fields.attempts, 2);
        let pairs: [(&[u8], &[u8]); 4] = [
            (b"data", b"web-01"),
            (b"message_id", b"m-1"),
            (b"publish_time", b"5"),
            (b"ordering_key", b"k"),
        ];
        let message = Fields::from_pairs(id, pairs.into_iter()).message.unwrap();
        assert_eq!(message.id().to_string(), "m-1");
        assert_eq!(message.ordering_key(), Some("k"));
        assert_eq!(
            message.publish_time(),
            Some(UNIX_EPOCH + Duration::from_millis(5))
        );
        let pairs: [(&[u8], &[u8]); 2] = [(b"data", b"x"), (b"k", b"\xff")];
        let reason = Fields::from_pairs(id, pairs.into_iter())
            .message
            .unwrap_err();
        assert!(reason.contains("not UTF-8"), "{reason}");
    }

    #[test]
    fn claim_reply_tolerates_odd_shapes() {
        assert_eq!(claim_reply(Value::Nil).next, "0-0");
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
        let claimed = claim_reply(reply);
        assert_eq!(
            (
                claimed.next.as_str(),
                claimed.entries.len(),
                claimed.entries[0].2
            ),
            ("3-0", 1, 4)
        );
        assert_eq!(claimed.past.len(), 0, "{:?}", claimed.past);
        let reply = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![]),
            Value::Array(vec![Value::Array(vec![
                bulk("5-1"),
                Value::Int(6),
                Value::Int(5),
            ])]),
            Value::Int(2),
            bulk("1-0"),
        ]);
        let claimed = claim_reply(reply);
        assert_eq!(claimed.past.len(), 1);
        assert_eq!((claimed.past[0].1, claimed.past[0].2), (6, 5));
        assert_eq!(claimed.past[0].0.to_string(), "5-1");
        assert_eq!((claimed.gone, claimed.first_gone.as_str()), (2, "1-0"));
    }
}
