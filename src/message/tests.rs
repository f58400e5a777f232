//! Unit tests of the message: host names, Pub/Sub's limits, ids and the message's size.

use uuid::Uuid;

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
