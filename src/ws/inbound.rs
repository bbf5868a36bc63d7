//! Reading a client's frames: bytes from the socket in, whole messages out. Nothing is kept
//! between reads but the bytes of a frame that has not fully arrived and the fragments of a
//! message that has not ended, so an idle connection holds no buffer.

use std::collections::VecDeque;

use bytes::Bytes;

use super::frame::{read_header, unmask, FrameError, OpCode};

/// The most reserved for a frame on the word of its header alone.
const RESERVE_AHEAD: usize = 1 << 20;

/// What a client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A whole binary message.
    Binary(Bytes),
    /// A text message (its content is not kept: the protocol has none).
    Text,
    /// A ping, to be answered with a pong carrying its payload.
    Ping(Bytes),
    /// A pong.
    Pong,
    /// The client closes.
    Close,
}

/// Why a client's bytes cannot be read on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// A frame that breaks RFC 6455.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A message larger than the limit (known from its frame headers, before its payload is
    /// buffered).
    #[error("message of {size} bytes exceeds the {max}-byte limit")]
    TooBig {
        /// The message's size so far, with the frame that passed the limit.
        size: u64,
        /// The limit.
        max: usize,
    },
    /// A continuation frame with no message to continue, or a new message before the last one
    /// ended.
    #[error("{0}")]
    Fragments(&'static str),
}

/// A client's frames being read.
#[derive(Debug)]
pub struct Inbound {
    /// Bytes of a frame that has not fully arrived (empty, without capacity, otherwise).
    partial: Vec<u8>,
    /// A fragmented message that has not ended: its payload so far, and whether it is text.
    assembling: Option<(Vec<u8>, bool)>,
    max_message: usize,
    /// The client's close frame came: nothing after it counts.
    closed: bool,
}

impl Inbound {
    /// Reads messages of at most `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self {
            partial: Vec::new(),
            assembling: None,
            max_message,
            closed: false,
        }
    }

    /// Takes `data` just read from the socket (it is unmasked in place) and appends each
    /// message it completes to `out`.
    pub fn feed(&mut self, data: &mut [u8], out: &mut VecDeque<Incoming>) -> Result<(), ReadError> {
        if self.closed {
            return Ok(());
        }
        if self.partial.is_empty() {
            let used = self.frames(data, out)?;
            if used < data.len() {
                self.keep(&data[used..]);
            }
            return Ok(());
        }
        let mut partial = std::mem::take(&mut self.partial);
        partial.extend_from_slice(data);
        let used = self.frames(&mut partial, out)?;
        if used < partial.len() {
            partial.drain(..used);
            if partial.capacity() > 2 * partial.len() + 4096 {
                partial.shrink_to_fit();
            }
            self.partial = partial;
        }
        Ok(())
    }

    /// Keeps the start of a frame that has not fully arrived.
    fn keep(&mut self, rest: &[u8]) {
        // Room for the whole frame at once when its header is here (its size is checked), up
        // to a bound: a header alone must not reserve megabytes.
        let whole = read_header(rest)
            .ok()
            .flatten()
            .map_or(0, |h| h.header_len + h.len as usize);
        self.partial
            .reserve_exact(whole.min(RESERVE_AHEAD).max(rest.len()));
        self.partial.extend_from_slice(rest);
    }

    /// Reads whole frames from the start of `buf`; returns how many bytes they took.
    fn frames(&mut self, buf: &mut [u8], out: &mut VecDeque<Incoming>) -> Result<usize, ReadError> {
        let mut at = 0;
        while let Some(header) = read_header(&buf[at..])? {
            let so_far = self.assembling.as_ref().map_or(0, |(m, _)| m.len() as u64);
            if !header.opcode.is_control() {
                let size = so_far + header.len;
                if size > self.max_message as u64 {
                    return Err(ReadError::TooBig {
                        size,
                        max: self.max_message,
                    });
                }
            }
            let start = at + header.header_len;
            // Within the limit, so it fits in usize.
            let end = start + header.len as usize;
            if buf.len() < end {
                break;
            }
            let payload = &mut buf[start..end];
            unmask(payload, header.mask, 0);
            at = end;
            match header.opcode {
                OpCode::Binary | OpCode::Text if self.assembling.is_some() => {
                    return Err(ReadError::Fragments(
                        "a new message began before the last one ended",
                    ));
                }
                OpCode::Binary | OpCode::Text => {
                    let text = header.opcode == OpCode::Text;
                    if !header.fin {
                        self.assembling = Some((payload.to_vec(), text));
                    } else if text {
                        out.push_back(Incoming::Text);
                    } else {
                        out.push_back(Incoming::Binary(Bytes::copy_from_slice(payload)));
                    }
                }
                OpCode::Continue => {
                    let Some((message, _)) = self.assembling.as_mut() else {
                        return Err(ReadError::Fragments(
                            "a continuation frame without a message to continue",
                        ));
                    };
                    message.extend_from_slice(payload);
                    if header.fin {
                        let (message, text) = self.assembling.take().expect("checked above");
                        out.push_back(if text {
                            Incoming::Text
                        } else {
                            Incoming::Binary(Bytes::from(message))
                        });
                    }
                }
                OpCode::Ping => out.push_back(Incoming::Ping(Bytes::copy_from_slice(payload))),
                OpCode::Pong => out.push_back(Incoming::Pong),
                OpCode::Close => {
                    out.push_back(Incoming::Close);
                    self.closed = true;
                    self.partial = Vec::new();
                    self.assembling = None;
                    return Ok(buf.len());
                }
            }
        }
        Ok(at)
    }

    /// Bytes held for an incomplete frame or message (for tests and accounting).
    pub fn held(&self) -> usize {
        self.partial.capacity() + self.assembling.as_ref().map_or(0, |(m, _)| m.capacity())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::masked;

    fn frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        masked(fin, opcode, payload, [0x12, 0x34, 0x56, 0x78])
    }

    /// Feeds `bytes` in pieces of `step`.
    fn read(inbound: &mut Inbound, bytes: &[u8], step: usize) -> Result<Vec<Incoming>, ReadError> {
        let mut out = VecDeque::new();
        for piece in bytes.chunks(step) {
            inbound.feed(&mut piece.to_vec(), &mut out)?;
        }
        Ok(out.into())
    }

    #[test]
    fn messages_arrive_whole_however_the_bytes_are_cut() {
        let big = vec![9u8; 70_000];
        let mut stream = frame(true, OpCode::Binary, b"one");
        stream.extend(frame(true, OpCode::Ping, b"p"));
        stream.extend(frame(false, OpCode::Binary, &big[..30_000]));
        stream.extend(frame(true, OpCode::Pong, b""));
        stream.extend(frame(true, OpCode::Continue, &big[30_000..]));
        stream.extend(frame(true, OpCode::Text, "é".as_bytes()));
        stream.extend(frame(true, OpCode::Close, &[3, 232]));
        stream.extend(b"ignored after the close");
        let expected = vec![
            Incoming::Binary(Bytes::from_static(b"one")),
            Incoming::Ping(Bytes::from_static(b"p")),
            Incoming::Pong,
            Incoming::Binary(Bytes::from(big.clone())),
            Incoming::Text,
            Incoming::Close,
        ];
        for step in [1, 2, 3, 7, 100, 4096, stream.len()] {
            let mut inbound = Inbound::new(1 << 20);
            assert_eq!(
                read(&mut inbound, &stream, step).unwrap(),
                expected,
                "{step}"
            );
            assert_eq!(
                inbound.held(),
                0,
                "nothing kept after whole frames ({step})"
            );
        }
    }

    #[test]
    fn a_message_past_the_limit_is_refused_from_its_header() {
        let mut inbound = Inbound::new(100);
        let header_only = &frame(true, OpCode::Binary, &[0; 101])[..8];
        assert_eq!(
            read(&mut inbound, header_only, 8),
            Err(ReadError::TooBig {
                size: 101,
                max: 100
            })
        );
        // Fragments count together.
        let mut inbound = Inbound::new(100);
        let mut two = frame(false, OpCode::Binary, &[0; 60]);
        two.extend(frame(true, OpCode::Continue, &[0; 60]));
        assert_eq!(
            read(&mut inbound, &two, 1000),
            Err(ReadError::TooBig {
                size: 120,
                max: 100
            })
        );
        // Control frames do not count toward it.
        let mut inbound = Inbound::new(0);
        assert!(read(&mut inbound, &frame(true, OpCode::Ping, &[0; 125]), 9).is_ok());
    }

    #[test]
    fn fragments_out_of_order_are_refused() {
        let mut inbound = Inbound::new(100);
        let stray = frame(true, OpCode::Continue, b"x");
        assert!(matches!(
            read(&mut inbound, &stray, 100),
            Err(ReadError::Fragments(_))
        ));
        let mut inbound = Inbound::new(100);
        let mut two_starts = frame(false, OpCode::Binary, b"x");
        two_starts.extend(frame(true, OpCode::Binary, b"y"));
        assert!(matches!(
            read(&mut inbound, &two_starts, 100),
            Err(ReadError::Fragments(_))
        ));
    }
}
