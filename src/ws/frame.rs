//! The WebSocket frame format (RFC 6455, section 5.2): reading a client's frame header and
//! writing the server's frames.

/// A frame's opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// 0x0: the next fragment of a message.
    Continue,
    /// 0x1: a text message (or its first fragment).
    Text,
    /// 0x2: a binary message (or its first fragment).
    Binary,
    /// 0x8: close.
    Close,
    /// 0x9: ping.
    Ping,
    /// 0xA: pong.
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => OpCode::Continue,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            OpCode::Continue => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, ping and pong: at most 125 bytes, never fragmented.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A client frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The last fragment of its message.
    pub fin: bool,
    /// What the frame is.
    pub opcode: OpCode,
    /// The key its payload is masked with.
    pub mask: [u8; 4],
    /// The payload's length.
    pub len: u64,
    /// The header's own length in bytes.
    pub header_len: usize,
}

/// A frame that breaks RFC 6455.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// RSV bits set, but no extension was negotiated.
    #[error("reserved bits set without an extension")]
    Reserved,
    /// An opcode RFC 6455 does not define.
    #[error("unknown opcode {0:#x}")]
    OpCode(u8),
    /// A client frame without a mask.
    #[error("client frames must be masked")]
    Unmasked,
    /// A control frame that is fragmented or longer than 125 bytes.
    #[error("control frames must be whole and at most 125 bytes")]
    Control,
    /// A 64-bit length with the top bit set, or a length written longer than needed.
    #[error("malformed payload length")]
    Length,
}

/// Reads the header at the start of `buf`: `None` until all of it is there.
pub fn read_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    let opcode = OpCode::from_bits(b0 & 0x0f).ok_or(FrameError::OpCode(b0 & 0x0f))?;
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 == 0 {
        return Err(FrameError::Unmasked);
    }
    let (len, at) = match b1 & 0x7f {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            let len = u64::from(u16::from_be_bytes([b[0], b[1]]));
            if len < 126 {
                return Err(FrameError::Length);
            }
            (len, 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let len = u64::from_be_bytes(b.try_into().expect("8 bytes"));
            if len >> 63 != 0 || len <= 0xffff {
                return Err(FrameError::Length);
            }
            (len, 10)
        }
        short => (u64::from(short), 2),
    };
    if opcode.is_control() && (!fin || len > 125) {
        return Err(FrameError::Control);
    }
    let Some(mask) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask: mask.try_into().expect("4 bytes"),
        len,
        header_len: at + 4,
    }))
}

/// Unmasks `payload` in place; `offset` is how far into the frame's payload it starts.
pub fn unmask(payload: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[(offset + i) % 4];
    }
}

/// Appends a server frame's header (unmasked) for a payload of `len` bytes.
pub fn write_header(out: &mut Vec<u8>, fin: bool, opcode: OpCode, len: usize) {
    out.push(u8::from(fin) << 7 | opcode.bits());
    match len {
        0..=125 => out.push(len as u8),
        126..=0xffff => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// One whole, unfragmented binary server frame carrying `payload`: the bytes a server sends for
/// it to any client, since server frames are not masked.
pub fn binary_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    write_header(&mut out, true, OpCode::Binary, payload.len());
    out.extend_from_slice(payload);
    out
}

/// The payload of a close frame: the code, then the reason (cut to 123 bytes at a character
/// boundary).
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + reason.len().min(123));
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(clip_reason(reason).as_bytes());
    out
}

/// A close reason must fit in 123 bytes; cut at a character boundary.
pub fn clip_reason(reason: &str) -> &str {
    const MAX: usize = 123;
    if reason.len() <= MAX {
        return reason;
    }
    let mut end = MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// A client's frame (masked with `mask`), for tests.
#[cfg(test)]
pub(crate) fn masked(fin: bool, opcode: OpCode, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::new();
    write_header(&mut out, fin, opcode, payload.len());
    out[1] |= 0x80;
    out.extend_from_slice(&mask);
    let mut body = payload.to_vec();
    unmask(&mut body, mask, 0);
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame whose first header byte is `b0` (FIN, RSV, opcode as given).
    fn client_frame(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = masked(b0 & 0x80 != 0, OpCode::Binary, payload, mask);
        out[0] = b0;
        out
    }

    #[test]
    fn headers_of_each_length_form_read_back() {
        for len in [0usize, 1, 125, 126, 0xffff, 0x10000, 300_000] {
            let payload = vec![7u8; len];
            let frame = client_frame(0x82, &payload, [1, 2, 3, 4]);
            let header = read_header(&frame).unwrap().unwrap();
            assert_eq!(header.len, len as u64);
            assert!(header.fin);
            assert_eq!(header.opcode, OpCode::Binary);
            assert_eq!(header.mask, [1, 2, 3, 4]);
            let mut body = frame[header.header_len..].to_vec();
            // Unmasking in two pieces gives the same as in one.
            let split = body.len() / 3;
            let (a, b) = body.split_at_mut(split);
            unmask(a, header.mask, 0);
            unmask(b, header.mask, split);
            assert_eq!(body, payload);
            // Any prefix of the header is "not yet".
            for cut in 0..header.header_len {
                assert_eq!(read_header(&frame[..cut]), Ok(None), "cut at {cut}");
            }
        }
    }

    #[test]
    fn frames_that_break_the_rfc_are_named() {
        let ok = client_frame(0x82, b"x", [0; 4]);
        let mut reserved = ok.clone();
        reserved[0] |= 0x40;
        assert_eq!(read_header(&reserved), Err(FrameError::Reserved));
        let mut unknown = ok.clone();
        unknown[0] = 0x83;
        assert_eq!(read_header(&unknown), Err(FrameError::OpCode(3)));
        let mut unmasked = ok.clone();
        unmasked[1] &= 0x7f;
        assert_eq!(read_header(&unmasked), Err(FrameError::Unmasked));
        let fragmented_ping = client_frame(0x09, b"", [0; 4]);
        assert_eq!(read_header(&fragmented_ping), Err(FrameError::Control));
        let long_ping = client_frame(0x89, &[0; 126], [0; 4]);
        assert_eq!(read_header(&long_ping), Err(FrameError::Control));
        // 5 written in the 16-bit form; a 64-bit length with its top bit set.
        let overlong = [0x82, 0x80 | 126, 0, 5, 0, 0, 0, 0];
        assert_eq!(read_header(&overlong), Err(FrameError::Length));
        let mut huge = vec![0x82, 0x80 | 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert_eq!(read_header(&huge), Err(FrameError::Length));
    }

    #[test]
    fn server_headers_use_the_shortest_length_form() {
        for (len, header_len) in [(0, 2), (125, 2), (126, 4), (0xffff, 4), (0x10000, 10)] {
            let mut out = Vec::new();
            write_header(&mut out, true, OpCode::Binary, len);
            assert_eq!(out.len(), header_len, "{len}");
            assert_eq!(out[0], 0x82);
            assert_eq!(out[1] & 0x80, 0, "server frames are not masked");
        }
    }

    #[test]
    fn close_reasons_are_clipped_to_123_bytes_on_a_char_boundary() {
        assert_eq!(clip_reason("short"), "short");
        let long = "é".repeat(100);
        let clipped = clip_reason(&long);
        assert_eq!(clipped.len(), 122);
        assert_eq!(close_payload(1009, &long).len(), 124);
    }
}
