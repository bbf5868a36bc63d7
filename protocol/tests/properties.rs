//! Property tests: no input makes a decoder panic, and encode then decode is the identity.

use proptest::prelude::*;
use tandem_protocol::awareness::{encode_entries, AwarenessEntry, AwarenessUpdate};
use tandem_protocol::lib0::{var_uint_len, write_var_uint, MAX_VAR_UINT};
use tandem_protocol::{Decoder, Message, MessageReader, SyncMessage};

/// An owned message, so that proptest can generate it; `as_message` borrows it back.
#[derive(Debug, Clone)]
enum OwnedMessage {
    Step1(Vec<u8>),
    Step2(Vec<u8>),
    Update(Vec<u8>),
    Awareness(Vec<u8>),
    AuthDenied(String),
    QueryAwareness,
}

impl OwnedMessage {
    fn as_message(&self) -> Message<'_> {
        match self {
            OwnedMessage::Step1(p) => Message::Sync(SyncMessage::Step1(p)),
            OwnedMessage::Step2(p) => Message::Sync(SyncMessage::Step2(p)),
            OwnedMessage::Update(p) => Message::Sync(SyncMessage::Update(p)),
            OwnedMessage::Awareness(p) => Message::Awareness(p),
            OwnedMessage::AuthDenied(r) => Message::AuthDenied(r),
            OwnedMessage::QueryAwareness => Message::QueryAwareness,
        }
    }
}

fn owned_message() -> impl Strategy<Value = OwnedMessage> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        bytes().prop_map(OwnedMessage::Step1),
        bytes().prop_map(OwnedMessage::Step2),
        bytes().prop_map(OwnedMessage::Update),
        bytes().prop_map(OwnedMessage::Awareness),
        ".{0,40}".prop_map(OwnedMessage::AuthDenied),
        Just(OwnedMessage::QueryAwareness),
    ]
}

/// A JSON state, as text, from a small set of shapes (any JSON value is valid).
fn json_state() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        ".{0,20}".prop_map(|s| serde_json::Value::String(s).to_string()),
        (".{0,10}", any::<bool>()).prop_map(|(k, v)| serde_json::json!({ k: v }).to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut reader = MessageReader::new(&bytes);
        while let Some(item) = reader.next_raw() {
            if let Ok((Message::Awareness(payload), raw)) = item {
                prop_assert!(raw.len() <= bytes.len());
                let _ = AwarenessUpdate::decode(payload);
            }
        }
        let _ = MessageReader::new(&bytes).count();
        let _ = AwarenessUpdate::decode(&bytes);
        let mut dec = Decoder::new(&bytes);
        while dec.read_var_uint().is_ok() {}
        let mut dec = Decoder::new(&bytes);
        while dec.read_var_string().is_ok() {}
    }

    #[test]
    fn var_uint_round_trips(value in 0..=MAX_VAR_UINT) {
        let mut out = Vec::new();
        write_var_uint(&mut out, value);
        prop_assert_eq!(out.len(), var_uint_len(value));
        let mut dec = Decoder::new(&out);
        prop_assert_eq!(dec.read_var_uint(), Ok(value));
        prop_assert!(dec.is_empty());
    }

    #[test]
    fn messages_round_trip_alone_and_concatenated(msgs in proptest::collection::vec(owned_message(), 1..8)) {
        let mut frame = Vec::new();
        let mut singles = Vec::new();
        for m in &msgs {
            let single = m.as_message().to_frame();
            let mut dec = Decoder::new(&single);
            prop_assert_eq!(Message::decode(&mut dec), Ok(m.as_message()));
            prop_assert!(dec.is_empty());
            m.as_message().encode(&mut frame);
            singles.push(single);
        }
        let mut reader = MessageReader::new(&frame);
        for (m, single) in msgs.iter().zip(&singles) {
            let (decoded, raw) = reader.next_raw().expect("message").expect("valid");
            prop_assert_eq!(decoded, m.as_message());
            prop_assert_eq!(raw, &single[..]);
        }
        prop_assert!(reader.next_raw().is_none());
    }

    #[test]
    fn awareness_updates_round_trip(
        raw in proptest::collection::vec((0..=MAX_VAR_UINT, 0..=MAX_VAR_UINT, json_state()), 0..10)
    ) {
        let entries: Vec<_> = raw
            .iter()
            .map(|(client_id, clock, state)| AwarenessEntry { client_id: *client_id, clock: *clock, state })
            .collect();
        let mut out = Vec::new();
        encode_entries(&mut out, entries.iter().copied());
        let decoded = AwarenessUpdate::decode(&out).expect("valid update");
        prop_assert_eq!(&decoded.entries, &entries);
        let mut again = Vec::new();
        decoded.encode(&mut again);
        prop_assert_eq!(again, out);
    }
}
