//! Awareness updates: `varUint(n)` then, per client, `varUint(id) varUint(clock) varString(json)`.

use crate::lib0::{write_var_string, write_var_uint, DecodeError, Decoder};

/// One client's entry in an awareness update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwarenessEntry<'a> {
    /// The Yjs client id the state belongs to.
    pub client_id: u64,
    /// Increases with every change the client makes to its state.
    pub clock: u64,
    /// The state as JSON text; `null` means the client left.
    pub state: &'a str,
}

impl AwarenessEntry<'_> {
    /// Whether this entry announces that the client left (a JSON `null` state).
    pub fn is_removal(&self) -> bool {
        self.state.trim() == "null"
    }
}

/// A decoded awareness update; states borrow from the payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AwarenessUpdate<'a> {
    /// The entries in the order they were encoded.
    pub entries: Vec<AwarenessEntry<'a>>,
}

impl<'a> AwarenessUpdate<'a> {
    /// Decodes an awareness update payload; every state must be valid JSON and nothing may follow
    /// the last entry.
    pub fn decode(payload: &'a [u8]) -> Result<Self, DecodeError> {
        let mut dec = Decoder::new(payload);
        let n = dec.read_var_uint()?;
        // Each entry takes at least three bytes: never pre-allocate more than the input allows.
        let mut entries = Vec::with_capacity((n as usize).min(payload.len() / 3));
        for _ in 0..n {
            let client_id = dec.read_var_uint()?;
            let clock = dec.read_var_uint()?;
            let state = dec.read_var_string()?;
            if serde_json::from_str::<&serde_json::value::RawValue>(state).is_err() {
                return Err(DecodeError::InvalidJson);
            }
            entries.push(AwarenessEntry {
                client_id,
                clock,
                state,
            });
        }
        if !dec.is_empty() {
            return Err(DecodeError::TrailingBytes(dec.remaining().len()));
        }
        Ok(Self { entries })
    }

    /// Appends this update's encoding (the payload, without the message header) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_entries(out, self.entries.iter().copied());
    }
}

/// Appends an awareness update payload made of `entries` to `out`.
pub fn encode_entries<'e>(
    out: &mut Vec<u8>,
    entries: impl ExactSizeIterator<Item = AwarenessEntry<'e>>,
) {
    write_var_uint(out, entries.len() as u64);
    for e in entries {
        write_var_uint(out, e.client_id);
        write_var_uint(out, e.clock);
        write_var_string(out, e.state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lib0::MAX_VAR_UINT;
    use crate::message::{Message, MessageReader};

    /// PROTOCOLS.md: client 1234567, clock 3, state `{"name":"a"}`, as a whole message frame.
    const EXAMPLE_FRAME: [u8; 20] = [
        0x01, 0x12, 0x01, 0x87, 0xad, 0x4b, 0x03, 0x0c, 0x7b, 0x22, 0x6e, 0x61, 0x6d, 0x65, 0x22,
        0x3a, 0x22, 0x61, 0x22, 0x7d,
    ];

    #[test]
    fn protocols_md_example_decodes_and_re_encodes_byte_identically() {
        let mut reader = MessageReader::new(&EXAMPLE_FRAME);
        let Some(Ok(Message::Awareness(payload))) = reader.next() else {
            panic!("not awareness")
        };
        assert!(reader.next().is_none());

        let update = AwarenessUpdate::decode(payload).unwrap();
        assert_eq!(
            update.entries,
            [AwarenessEntry {
                client_id: 1_234_567,
                clock: 3,
                state: r#"{"name":"a"}"#
            }]
        );
        assert!(!update.entries[0].is_removal());

        let mut reencoded = Vec::new();
        update.encode(&mut reencoded);
        assert_eq!(reencoded, payload);
        assert_eq!(Message::Awareness(&reencoded).to_frame(), EXAMPLE_FRAME);
    }

    #[test]
    fn several_entries_round_trip_in_order() {
        let entries = [
            AwarenessEntry {
                client_id: 1,
                clock: 0,
                state: "{}",
            },
            AwarenessEntry {
                client_id: MAX_VAR_UINT,
                clock: MAX_VAR_UINT,
                state: "null",
            },
            AwarenessEntry {
                client_id: 300,
                clock: 7,
                state: r#"{"cursor":{"x":1.5},"u":"é"}"#,
            },
        ];
        let mut out = Vec::new();
        encode_entries(&mut out, entries.iter().copied());
        let update = AwarenessUpdate::decode(&out).unwrap();
        assert_eq!(update.entries, entries);
    }

    #[test]
    fn empty_update_is_a_single_zero() {
        let mut out = Vec::new();
        AwarenessUpdate::default().encode(&mut out);
        assert_eq!(out, [0]);
        assert_eq!(
            AwarenessUpdate::decode(&[0]),
            Ok(AwarenessUpdate::default())
        );
    }

    #[test]
    fn null_state_is_a_removal() {
        for state in ["null", " null", "null\n"] {
            assert!(
                AwarenessEntry {
                    client_id: 1,
                    clock: 1,
                    state
                }
                .is_removal(),
                "{state:?}"
            );
        }
        for state in ["{}", "\"null\"", "[null]", "0"] {
            assert!(
                !AwarenessEntry {
                    client_id: 1,
                    clock: 1,
                    state
                }
                .is_removal(),
                "{state:?}"
            );
        }
    }

    #[test]
    fn any_json_value_is_a_valid_state() {
        for state in [
            "null",
            "{}",
            "[]",
            "1",
            "-0.5e10",
            "\"x\"",
            "true",
            " { \"a\" : [1, {}] } ",
        ] {
            let mut out = Vec::new();
            encode_entries(
                &mut out,
                [AwarenessEntry {
                    client_id: 5,
                    clock: 1,
                    state,
                }]
                .into_iter(),
            );
            assert_eq!(
                AwarenessUpdate::decode(&out).unwrap().entries[0].state,
                state
            );
        }
    }

    #[test]
    fn invalid_json_state_is_rejected() {
        for state in ["", "{", "{\"a\":}", "nul", "{} {}", "'x'", "\"\u{1}\""] {
            let mut out = Vec::new();
            encode_entries(
                &mut out,
                [AwarenessEntry {
                    client_id: 5,
                    clock: 1,
                    state,
                }]
                .into_iter(),
            );
            assert_eq!(
                AwarenessUpdate::decode(&out),
                Err(DecodeError::InvalidJson),
                "{state:?}"
            );
        }
    }

    #[test]
    fn deeply_nested_json_is_validated_without_recursion() {
        // Validation skips over the value with an explicit stack, so depth cannot overflow ours.
        let state = "[".repeat(100_000) + &"]".repeat(100_000);
        let mut out = Vec::new();
        encode_entries(
            &mut out,
            [AwarenessEntry {
                client_id: 5,
                clock: 1,
                state: &state,
            }]
            .into_iter(),
        );
        assert!(AwarenessUpdate::decode(&out).is_ok());
        let unbalanced = "[".repeat(100_000);
        let mut out = Vec::new();
        encode_entries(
            &mut out,
            [AwarenessEntry {
                client_id: 5,
                clock: 1,
                state: &unbalanced,
            }]
            .into_iter(),
        );
        assert_eq!(AwarenessUpdate::decode(&out), Err(DecodeError::InvalidJson));
    }

    #[test]
    fn invalid_utf8_state_is_rejected() {
        assert_eq!(
            AwarenessUpdate::decode(&[1, 1, 1, 1, 0xff]),
            Err(DecodeError::InvalidUtf8)
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut out = EXAMPLE_FRAME[2..].to_vec();
        out.extend_from_slice(&[0xaa, 0xbb]);
        assert_eq!(
            AwarenessUpdate::decode(&out),
            Err(DecodeError::TrailingBytes(2))
        );
        assert_eq!(
            AwarenessUpdate::decode(&[0, 0]),
            Err(DecodeError::TrailingBytes(1))
        );
    }

    #[test]
    fn truncated_entries_are_rejected() {
        let payload = &EXAMPLE_FRAME[2..];
        for cut in 0..payload.len() {
            let err = AwarenessUpdate::decode(&payload[..cut]).unwrap_err();
            assert!(
                matches!(
                    err,
                    DecodeError::UnexpectedEnd | DecodeError::LengthTooLarge(_)
                ),
                "cut {cut}: {err:?}"
            );
        }
        // Claims two entries, holds one.
        let mut two = payload.to_vec();
        two[0] = 2;
        assert_eq!(
            AwarenessUpdate::decode(&two),
            Err(DecodeError::UnexpectedEnd)
        );
    }

    #[test]
    fn huge_claimed_entry_count_with_tiny_input_fails_fast() {
        // 2^53 - 1 entries claimed, 8 bytes given: pre-allocating the claim would abort.
        let payload = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert_eq!(
            AwarenessUpdate::decode(&payload),
            Err(DecodeError::UnexpectedEnd)
        );
        let mut payload = payload.to_vec();
        payload.extend_from_slice(&[1, 1, 2, b'{', b'}']);
        assert_eq!(
            AwarenessUpdate::decode(&payload),
            Err(DecodeError::UnexpectedEnd)
        );
    }

    #[test]
    fn overlong_client_id_is_rejected() {
        assert_eq!(
            AwarenessUpdate::decode(&[1, 0x80, 0x00, 1, 2, b'{', b'}']),
            Err(DecodeError::VarUintOverflow)
        );
    }
}
