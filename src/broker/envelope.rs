//! What crosses the broker between nodes: a small binary envelope in lib0 encoding.
//!
//! `varUint(version) varString(origin node) varUint(kind) [varString(target node)] varUint8Array(payload)`
//!
//! The target is present only for [`Kind::SyncStep2`], which answers one node's state vector.

use bytes::Bytes;
use tandem_protocol::lib0::{write_var_bytes, write_var_string, write_var_uint};
use tandem_protocol::{DecodeError, Decoder};

/// The envelope format version this node writes and reads.
pub const VERSION: u64 = 1;

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A Yjs update (v1) that changed the origin's document. Each update crosses once.
    Update,
    /// An awareness update payload (entries of clients connected to the origin node).
    Awareness,
    /// "This is what I have": `varUint8Array(state vector) varUint8Array(delete-set digest)`.
    /// A node holding more (a newer clock, or a different delete set) answers with
    /// [`Kind::SyncStep2`].
    SyncStep1,
    /// The diff answering one node's [`Kind::SyncStep1`]; only the target applies it.
    SyncStep2,
    /// Node channel: the origin is alive.
    Heartbeat,
    /// Node channel: the origin is shutting down; drop its clients' presence now.
    NodeLeft,
}

impl Kind {
    fn code(self) -> u64 {
        match self {
            Kind::Update => 0,
            Kind::Awareness => 1,
            Kind::SyncStep1 => 2,
            Kind::SyncStep2 => 3,
            Kind::Heartbeat => 4,
            Kind::NodeLeft => 5,
        }
    }

    fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0 => Kind::Update,
            1 => Kind::Awareness,
            2 => Kind::SyncStep1,
            3 => Kind::SyncStep2,
            4 => Kind::Heartbeat,
            5 => Kind::NodeLeft,
            _ => return None,
        })
    }
}

/// A decoded envelope borrowing from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The node that published it.
    pub origin: &'a str,
    /// What it carries.
    pub kind: Kind,
    /// For [`Kind::SyncStep2`]: the node it answers.
    pub target: Option<&'a str>,
    /// The carried bytes.
    pub payload: &'a [u8],
}

/// Why bytes are not an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Malformed lib0.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Written by a newer (or unknown) format version.
    #[error("unsupported envelope version {0}")]
    Version(u64),
    /// A kind this node does not know.
    #[error("unknown envelope kind {0}")]
    Kind(u64),
}

impl<'a> Envelope<'a> {
    /// Encodes the envelope once; the bytes are published as they are.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.payload.len() + self.origin.len() + 16);
        write_var_uint(&mut out, VERSION);
        write_var_string(&mut out, self.origin);
        write_var_uint(&mut out, self.kind.code());
        if self.kind == Kind::SyncStep2 {
            write_var_string(&mut out, self.target.unwrap_or_default());
        }
        write_var_bytes(&mut out, self.payload);
        Bytes::from(out)
    }

    /// Decodes an envelope; trailing bytes are refused.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, EnvelopeError> {
        let mut dec = Decoder::new(bytes);
        let version = dec.read_var_uint()?;
        if version != VERSION {
            return Err(EnvelopeError::Version(version));
        }
        let origin = dec.read_var_string()?;
        let code = dec.read_var_uint()?;
        let kind = Kind::from_code(code).ok_or(EnvelopeError::Kind(code))?;
        let target = if kind == Kind::SyncStep2 {
            Some(dec.read_var_string()?)
        } else {
            None
        };
        let payload = dec.read_var_bytes()?;
        if !dec.is_empty() {
            return Err(DecodeError::TrailingBytes(dec.remaining().len()).into());
        }
        Ok(Self {
            origin,
            kind,
            target,
            payload,
        })
    }
}

/// The payload of a [`Kind::SyncStep1`]: a state vector and a digest of the delete set.
pub fn encode_sync_step1(state_vector: &[u8], delete_set_digest: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(state_vector.len() + delete_set_digest.len() + 4);
    write_var_bytes(&mut out, state_vector);
    write_var_bytes(&mut out, delete_set_digest);
    out
}

/// Splits a [`Kind::SyncStep1`] payload into state vector and delete-set digest.
pub fn decode_sync_step1(payload: &[u8]) -> Result<(&[u8], &[u8]), DecodeError> {
    let mut dec = Decoder::new(payload);
    let sv = dec.read_var_bytes()?;
    let digest = dec.read_var_bytes()?;
    if !dec.is_empty() {
        return Err(DecodeError::TrailingBytes(dec.remaining().len()));
    }
    Ok((sv, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips() {
        for kind in [
            Kind::Update,
            Kind::Awareness,
            Kind::SyncStep1,
            Kind::Heartbeat,
            Kind::NodeLeft,
        ] {
            let e = Envelope {
                origin: "node-a",
                kind,
                target: None,
                payload: b"\x01\x02",
            };
            assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
        }
        let e = Envelope {
            origin: "a",
            kind: Kind::SyncStep2,
            target: Some("b"),
            payload: b"",
        };
        assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
    }

    #[test]
    fn malformed_envelopes_are_refused() {
        assert!(Envelope::decode(&[]).is_err());
        assert_eq!(
            Envelope::decode(&[2, 0]).unwrap_err(),
            EnvelopeError::Version(2)
        );
        assert_eq!(
            Envelope::decode(&[1, 1, b'a', 9, 0]).unwrap_err(),
            EnvelopeError::Kind(9)
        );
        let mut ok = Envelope {
            origin: "a",
            kind: Kind::Update,
            target: None,
            payload: b"x",
        }
        .encode()
        .to_vec();
        ok.push(0);
        assert!(Envelope::decode(&ok).is_err());
        for cut in 0..ok.len() - 1 {
            assert!(Envelope::decode(&ok[..cut]).is_err());
        }
    }

    #[test]
    fn sync_step1_payload_round_trips() {
        let p = encode_sync_step1(b"sv", b"digest");
        assert_eq!(decode_sync_step1(&p).unwrap(), (&b"sv"[..], &b"digest"[..]));
    }
}
