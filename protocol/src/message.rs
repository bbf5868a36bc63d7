//! y-websocket messages: one or more per binary frame, each starting with `varUint(type)`.

use crate::lib0::{write_var_bytes, write_var_string, write_var_uint, DecodeError, Decoder};

/// Message type: a sync sub-message follows.
pub const MSG_SYNC: u64 = 0;
/// Message type: `varUint8Array(awareness update)` follows.
pub const MSG_AWARENESS: u64 = 1;
/// Message type: an auth message follows (server -> client).
pub const MSG_AUTH: u64 = 2;
/// Message type: query awareness, no payload.
pub const MSG_QUERY_AWARENESS: u64 = 3;

/// Message type of tandem's extension (not part of y-websocket): storage acknowledgements. Stock
/// clients never send it, so they never receive it either.
pub const MSG_TANDEM_ACK: u64 = 100;
/// Ack sub-type, client -> server: "acknowledge my updates from now on".
pub const ACK_REQUEST: u64 = 0;
/// Ack sub-type, server -> client: `varUint(n)`: the first `n` sync step 2 / update messages
/// this connection sent are stored (or were already known to the document and stored).
pub const ACK_STORED: u64 = 1;

/// Sync sub-type: step 1, carrying a state vector.
pub const SYNC_STEP1: u64 = 0;
/// Sync sub-type: step 2, carrying the update the receiver lacks.
pub const SYNC_STEP2: u64 = 1;
/// Sync sub-type: an incremental update.
pub const SYNC_UPDATE: u64 = 2;

/// Auth sub-type: permission denied, followed by a reason string.
pub const AUTH_PERMISSION_DENIED: u64 = 0;

/// A y-sync sub-message; payloads borrow from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMessage<'a> {
    /// Step 1: the sender's encoded state vector.
    Step1(&'a [u8]),
    /// Step 2: an encoded update (v1) answering a step 1.
    Step2(&'a [u8]),
    /// An incremental encoded update (v1).
    Update(&'a [u8]),
}

/// One y-websocket message; payloads borrow from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// A sync sub-message.
    Sync(SyncMessage<'a>),
    /// An encoded awareness update (see [`crate::awareness`]).
    Awareness(&'a [u8]),
    /// Permission denied, with the server's reason.
    AuthDenied(&'a str),
    /// A request for every known awareness state.
    QueryAwareness,
    /// tandem extension, client -> server: acknowledge my updates.
    AckRequest,
    /// tandem extension, server -> client: the first `n` updates sent are stored.
    Stored(u64),
}

impl<'a> Message<'a> {
    /// Reads one message from `dec`.
    pub fn decode(dec: &mut Decoder<'a>) -> Result<Self, DecodeError> {
        match dec.read_var_uint()? {
            MSG_SYNC => {
                // The sub-type is checked before the payload is read, so that an unknown sub-type
                // is reported as such rather than as whatever its bytes fail to be.
                let make: fn(&'a [u8]) -> SyncMessage<'a> = match dec.read_var_uint()? {
                    SYNC_STEP1 => SyncMessage::Step1,
                    SYNC_STEP2 => SyncMessage::Step2,
                    SYNC_UPDATE => SyncMessage::Update,
                    other => return Err(DecodeError::UnknownSyncType(other)),
                };
                Ok(Message::Sync(make(dec.read_var_bytes()?)))
            }
            MSG_AWARENESS => Ok(Message::Awareness(dec.read_var_bytes()?)),
            MSG_AUTH => match dec.read_var_uint()? {
                AUTH_PERMISSION_DENIED => Ok(Message::AuthDenied(dec.read_var_string()?)),
                other => Err(DecodeError::UnknownAuthType(other)),
            },
            MSG_QUERY_AWARENESS => Ok(Message::QueryAwareness),
            MSG_TANDEM_ACK => match dec.read_var_uint()? {
                ACK_REQUEST => Ok(Message::AckRequest),
                ACK_STORED => Ok(Message::Stored(dec.read_var_uint()?)),
                other => Err(DecodeError::UnknownAckType(other)),
            },
            other => Err(DecodeError::UnknownMessageType(other)),
        }
    }

    /// Appends this message's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Message::Sync(sync) => {
                write_var_uint(out, MSG_SYNC);
                let (sub, payload) = match sync {
                    SyncMessage::Step1(p) => (SYNC_STEP1, p),
                    SyncMessage::Step2(p) => (SYNC_STEP2, p),
                    SyncMessage::Update(p) => (SYNC_UPDATE, p),
                };
                write_var_uint(out, sub);
                write_var_bytes(out, payload);
            }
            Message::Awareness(update) => {
                write_var_uint(out, MSG_AWARENESS);
                write_var_bytes(out, update);
            }
            Message::AuthDenied(reason) => {
                write_var_uint(out, MSG_AUTH);
                write_var_uint(out, AUTH_PERMISSION_DENIED);
                write_var_string(out, reason);
            }
            Message::QueryAwareness => write_var_uint(out, MSG_QUERY_AWARENESS),
            Message::AckRequest => {
                write_var_uint(out, MSG_TANDEM_ACK);
                write_var_uint(out, ACK_REQUEST);
            }
            Message::Stored(n) => {
                write_var_uint(out, MSG_TANDEM_ACK);
                write_var_uint(out, ACK_STORED);
                write_var_uint(out, n);
            }
        }
    }

    /// This message encoded on its own, as one frame.
    pub fn to_frame(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        self.encode(&mut out);
        out
    }

    fn encoded_len_hint(&self) -> usize {
        let payload = match self {
            Message::Sync(SyncMessage::Step1(p))
            | Message::Sync(SyncMessage::Step2(p))
            | Message::Sync(SyncMessage::Update(p))
            | Message::Awareness(p) => p.len(),
            Message::AuthDenied(r) => r.len(),
            Message::QueryAwareness | Message::AckRequest | Message::Stored(_) => 0,
        };
        payload + 12
    }
}

/// Iterates over the messages of one frame. v1-v3 clients send one message a frame, v4 may send
/// several back to back. After the first error the iterator ends: without a length prefix per
/// message there is no way to resynchronise inside a frame.
#[derive(Debug, Clone)]
pub struct MessageReader<'a> {
    frame: &'a [u8],
    dec: Decoder<'a>,
    failed: bool,
}

impl<'a> MessageReader<'a> {
    /// A reader over the messages in `frame`.
    pub fn new(frame: &'a [u8]) -> Self {
        Self {
            frame,
            dec: Decoder::new(frame),
            failed: false,
        }
    }

    /// The next message together with its own encoded bytes (a sub-slice of the frame), so that
    /// a relay can forward exactly what arrived without encoding it again.
    pub fn next_raw(&mut self) -> Option<Result<(Message<'a>, &'a [u8]), DecodeError>> {
        let start = self.frame.len() - self.dec.remaining().len();
        let msg = match self.next()? {
            Ok(msg) => msg,
            Err(e) => return Some(Err(e)),
        };
        let end = self.frame.len() - self.dec.remaining().len();
        Some(Ok((msg, &self.frame[start..end])))
    }
}

impl<'a> Iterator for MessageReader<'a> {
    type Item = Result<Message<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.dec.is_empty() {
            return None;
        }
        let item = Message::decode(&mut self.dec);
        self.failed = item.is_err();
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_one(frame: &[u8]) -> Result<Message<'_>, DecodeError> {
        let mut dec = Decoder::new(frame);
        let msg = Message::decode(&mut dec)?;
        assert!(dec.is_empty(), "left {:?}", dec.remaining());
        Ok(msg)
    }

    #[test]
    fn empty_document_step1_is_00_00_01_00() {
        let empty_state_vector = [0u8];
        let msg = Message::Sync(SyncMessage::Step1(&empty_state_vector));
        assert_eq!(msg.to_frame(), [0x00, 0x00, 0x01, 0x00]);
        assert_eq!(decode_one(&[0x00, 0x00, 0x01, 0x00]), Ok(msg));
    }

    #[test]
    fn every_message_kind_round_trips() {
        let payload = [0xde, 0xad, 0xbe, 0xef];
        let msgs = [
            Message::Sync(SyncMessage::Step1(&payload)),
            Message::Sync(SyncMessage::Step2(&payload)),
            Message::Sync(SyncMessage::Update(&payload)),
            Message::Sync(SyncMessage::Update(&[])),
            Message::Awareness(&payload),
            Message::AuthDenied("no entry"),
            Message::AuthDenied(""),
            Message::QueryAwareness,
        ];
        for msg in msgs {
            let frame = msg.to_frame();
            assert_eq!(decode_one(&frame), Ok(msg), "{frame:02x?}");
        }
    }

    #[test]
    fn wire_bytes_match_y_protocols() {
        assert_eq!(
            Message::Sync(SyncMessage::Step2(&[7])).to_frame(),
            [0, 1, 1, 7]
        );
        assert_eq!(
            Message::Sync(SyncMessage::Update(&[7, 8])).to_frame(),
            [0, 2, 2, 7, 8]
        );
        assert_eq!(Message::Awareness(&[0]).to_frame(), [1, 1, 0]);
        assert_eq!(Message::AuthDenied("no").to_frame(), [2, 0, 2, b'n', b'o']);
        assert_eq!(Message::QueryAwareness.to_frame(), [3]);
        assert_eq!(Message::AckRequest.to_frame(), [100, 0]);
        assert_eq!(Message::Stored(300).to_frame(), [100, 1, 0xac, 0x02]);
        for m in [
            Message::AckRequest,
            Message::Stored(0),
            Message::Stored(1 << 40),
        ] {
            let frame = m.to_frame();
            assert_eq!(MessageReader::new(&frame).next().unwrap().unwrap(), m);
        }
    }

    #[test]
    fn large_payload_gets_a_multi_byte_length() {
        let payload = vec![0xab; 300];
        let frame = Message::Sync(SyncMessage::Update(&payload)).to_frame();
        assert_eq!(&frame[..4], &[0x00, 0x02, 0xac, 0x02]);
        assert_eq!(frame.len(), 4 + 300);
        assert_eq!(
            decode_one(&frame),
            Ok(Message::Sync(SyncMessage::Update(&payload)))
        );
    }

    #[test]
    fn unknown_message_type_is_rejected() {
        assert_eq!(decode_one(&[0x04]), Err(DecodeError::UnknownMessageType(4)));
        assert_eq!(
            decode_one(&[0x7f, 0x00]),
            Err(DecodeError::UnknownMessageType(127))
        );
        assert_eq!(
            decode_one(&[0xac, 0x02]),
            Err(DecodeError::UnknownMessageType(300))
        );
    }

    #[test]
    fn unknown_sync_type_is_rejected_even_without_a_payload() {
        assert_eq!(
            decode_one(&[0x00, 0x03, 0x01, 0x00]),
            Err(DecodeError::UnknownSyncType(3))
        );
        assert_eq!(
            decode_one(&[0x00, 0x09]),
            Err(DecodeError::UnknownSyncType(9))
        );
    }

    #[test]
    fn unknown_auth_type_is_rejected() {
        assert_eq!(
            decode_one(&[0x02, 0x01, 0x00]),
            Err(DecodeError::UnknownAuthType(1))
        );
    }

    #[test]
    fn truncated_messages_are_rejected() {
        assert_eq!(decode_one(&[]), Err(DecodeError::UnexpectedEnd));
        assert_eq!(decode_one(&[0x00]), Err(DecodeError::UnexpectedEnd));
        assert_eq!(decode_one(&[0x00, 0x00]), Err(DecodeError::UnexpectedEnd));
        assert_eq!(
            decode_one(&[0x00, 0x02, 0x03, 1, 2]),
            Err(DecodeError::LengthTooLarge(3))
        );
        assert_eq!(decode_one(&[0x01]), Err(DecodeError::UnexpectedEnd));
        assert_eq!(decode_one(&[0x01, 0x80]), Err(DecodeError::UnexpectedEnd));
        assert_eq!(
            decode_one(&[0x02, 0x00, 0x05, b'a']),
            Err(DecodeError::LengthTooLarge(5))
        );
    }

    #[test]
    fn malformed_header_varints_are_rejected() {
        assert_eq!(decode_one(&[0x80, 0x00]), Err(DecodeError::VarUintOverflow));
        assert_eq!(
            decode_one(&[0x00, 0x80, 0x00, 0x00]),
            Err(DecodeError::VarUintOverflow)
        );
        assert_eq!(
            decode_one(&[0x00, 0x02, 0x80, 0x00]),
            Err(DecodeError::VarUintOverflow)
        );
    }

    #[test]
    fn auth_reason_must_be_utf8() {
        assert_eq!(
            decode_one(&[0x02, 0x00, 0x01, 0xff]),
            Err(DecodeError::InvalidUtf8)
        );
    }

    #[test]
    fn reader_yields_every_message_of_a_frame_with_exact_sub_slices() {
        let step1 = Message::Sync(SyncMessage::Step1(&[0])).to_frame();
        let update = Message::Sync(SyncMessage::Update(&[1, 2, 3])).to_frame();
        let awareness = Message::Awareness(&[0]).to_frame();
        let query = Message::QueryAwareness.to_frame();
        let frame = [
            step1.clone(),
            update.clone(),
            awareness.clone(),
            query.clone(),
        ]
        .concat();

        let mut reader = MessageReader::new(&frame);
        let mut raws: Vec<&[u8]> = Vec::new();
        let mut msgs = Vec::new();
        while let Some(item) = reader.next_raw() {
            let (msg, raw) = item.unwrap();
            msgs.push(msg);
            raws.push(raw);
        }
        assert_eq!(
            msgs,
            [
                Message::Sync(SyncMessage::Step1(&[0])),
                Message::Sync(SyncMessage::Update(&[1, 2, 3])),
                Message::Awareness(&[0]),
                Message::QueryAwareness,
            ]
        );
        assert_eq!(raws, [&step1[..], &update[..], &awareness[..], &query[..]]);
        // The raw slices tile the frame exactly, so a relay can forward them untouched.
        assert_eq!(raws.concat(), frame);
        let first = raws[0].as_ptr() as usize - frame.as_ptr() as usize;
        assert_eq!(first, 0);
        assert!(reader.next_raw().is_none());
    }

    #[test]
    fn reader_iterator_and_next_raw_agree() {
        let frame = [
            Message::Sync(SyncMessage::Step2(&[9])).to_frame(),
            Message::AuthDenied("x").to_frame(),
        ]
        .concat();
        let via_iter: Vec<_> = MessageReader::new(&frame)
            .collect::<Result<_, _>>()
            .unwrap();
        let mut reader = MessageReader::new(&frame);
        let mut via_raw = Vec::new();
        while let Some(item) = reader.next_raw() {
            via_raw.push(item.unwrap().0);
        }
        assert_eq!(via_iter, via_raw);
        assert_eq!(via_iter.len(), 2);
    }

    #[test]
    fn reader_stops_after_the_first_error() {
        let good = Message::Sync(SyncMessage::Update(&[1])).to_frame();
        let frame = [good.clone(), vec![0x09], good.clone()].concat();
        let mut reader = MessageReader::new(&frame);
        assert_eq!(
            reader.next_raw(),
            Some(Ok((Message::Sync(SyncMessage::Update(&[1])), &good[..])))
        );
        assert_eq!(
            reader.next_raw(),
            Some(Err(DecodeError::UnknownMessageType(9)))
        );
        assert_eq!(reader.next_raw(), None);
        assert_eq!(reader.next(), None);
    }

    #[test]
    fn reader_reports_a_truncated_last_message() {
        let good = Message::Awareness(&[0]).to_frame();
        let frame = [good, vec![0x00, 0x02, 0x05, 1]].concat();
        let results: Vec<_> = MessageReader::new(&frame).collect();
        assert_eq!(results.len(), 2);
        assert!(results[0].is_ok());
        assert_eq!(results[1], Err(DecodeError::LengthTooLarge(5)));
    }

    #[test]
    fn empty_frame_has_no_messages() {
        assert_eq!(MessageReader::new(&[]).count(), 0);
        assert!(MessageReader::new(&[]).next_raw().is_none());
    }
}
