//! y-sync, awareness, auth, query-awareness and tandem-ack messages, one or several back to back
//! in a frame, read with `MessageReader` exactly as the server reads a frame.
//!
//! Checked: no panic; `next_raw` hands out consecutive sub-slices of the frame that cover it up
//! to the first error; each message re-encodes to exactly its raw bytes and decodes alone to the
//! same value; the iterator and `next_raw` agree; nothing is yielded after an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_protocol::{AwarenessUpdate, Decoder, Message, MessageReader, SyncMessage};

fuzz_target!(|frame: &[u8]| {
    let mut reader = MessageReader::new(frame);
    let mut offset = 0usize;
    let mut ok = Vec::new();
    let mut failed = false;
    while let Some(item) = reader.next_raw() {
        assert!(!failed, "a message after an error");
        match item {
            Ok((msg, raw)) => {
                assert!(!raw.is_empty());
                assert_eq!(
                    raw.as_ptr() as usize,
                    frame.as_ptr() as usize + offset,
                    "raw slices are not consecutive"
                );
                offset += raw.len();
                assert!(offset <= frame.len());
                assert_eq!(
                    msg.to_frame(),
                    raw,
                    "re-encoding differs from the wire bytes"
                );
                let mut alone = Decoder::new(raw);
                assert_eq!(Message::decode(&mut alone), Ok(msg));
                assert!(alone.is_empty());
                // Payloads are sub-slices of the frame.
                let payload: Option<&[u8]> = match msg {
                    Message::Sync(
                        SyncMessage::Step1(p) | SyncMessage::Step2(p) | SyncMessage::Update(p),
                    )
                    | Message::Awareness(p) => Some(p),
                    Message::AuthDenied(s) => Some(s.as_bytes()),
                    _ => None,
                };
                if let Some(p) = payload {
                    let start = p.as_ptr() as usize;
                    assert!(start >= raw.as_ptr() as usize);
                    assert!(start + p.len() <= raw.as_ptr() as usize + raw.len());
                }
                if let Message::Awareness(p) = msg {
                    // What the server does next with an awareness payload.
                    let _ = AwarenessUpdate::decode(p);
                }
                ok.push(msg);
            }
            Err(_) => failed = true,
        }
    }
    assert!(reader.next_raw().is_none());
    if !failed {
        assert_eq!(
            offset,
            frame.len(),
            "the reader stopped early without an error"
        );
    }
    // The plain iterator yields the same messages, then the same error (if any).
    let via_iter: Vec<_> = MessageReader::new(frame).collect();
    assert_eq!(via_iter.len(), ok.len() + usize::from(failed));
    for (a, b) in via_iter.iter().zip(&ok) {
        assert_eq!(a.as_ref().ok(), Some(b));
    }
    if failed {
        assert!(via_iter.last().unwrap().is_err());
    }
});
