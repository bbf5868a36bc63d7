//! A server-side WebSocket over any byte stream, driven by polling from the connection's one
//! task. Reads and writes go through buffers of the worker thread, not of the connection: an
//! idle connection keeps no buffer at all, only bytes that the socket has not yet taken or a
//! frame that has not fully arrived.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::frame::{close_payload, write_header, OpCode};
use super::inbound::{Inbound, Incoming, ReadError};

/// Messages larger than this leave in fragments of this size, so that no buffer ever holds a
/// whole large message twice.
pub const FRAGMENT_BYTES: usize = 16 << 10;

/// Bytes one read takes at most.
const READ_BYTES: usize = 16 << 10;

thread_local! {
    /// The worker thread's read buffer.
    static READ: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_BYTES].into_boxed_slice());
    /// The worker thread's write buffer.
    static WRITE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Why a socket cannot be read on.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The client's frames break the protocol or a limit.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The stream failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The client closed the stream.
    #[error("the client closed the connection")]
    Eof,
}

/// What the writer takes frames from.
pub trait Source {
    /// The next queued message, without waiting.
    fn next_message(&mut self) -> Option<Bytes>;
    /// Called once `len` bytes of a message are on their way.
    fn taken(&mut self, len: usize);
}

/// A server's WebSocket.
#[derive(Debug)]
pub struct WsSocket<IO> {
    io: IO,
    inbound: Inbound,
    /// Formatted bytes the stream has not taken yet, from `unsent_at`.
    unsent: Vec<u8>,
    unsent_at: usize,
    /// The rest of a large message leaving in fragments.
    fragments: Option<Bytes>,
    /// No fragment of it has left yet.
    first_fragment: bool,
    /// A pong to send (only the latest ping is answered).
    pong: Option<Bytes>,
    /// A ping to send.
    ping: bool,
    /// The close frame to send; once it is formatted nothing else is written.
    close: Option<Vec<u8>>,
    close_sent: bool,
    /// The stream ended or failed: nothing more to read.
    read_done: bool,
}

/// How many frames and bytes of messages a write took.
#[derive(Debug, Default, Clone, Copy)]
pub struct Written {
    /// Messages.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> WsSocket<IO> {
    /// A socket over `io` (after the handshake) that refuses messages over `max_message` bytes.
    pub fn new(io: IO, max_message: usize) -> Self {
        Self {
            io,
            inbound: Inbound::new(max_message),
            unsent: Vec::new(),
            unsent_at: 0,
            fragments: None,
            first_fragment: false,
            pong: None,
            ping: false,
            close: None,
            close_sent: false,
            read_done: false,
        }
    }

    /// Reads until at least one message is whole, appending them to `out`.
    pub fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut VecDeque<Incoming>,
    ) -> Poll<Result<(), SocketError>> {
        if self.read_done {
            return Poll::Ready(Err(SocketError::Eof));
        }
        READ.with(|buf| {
            let mut buf = buf.borrow_mut();
            loop {
                let mut read = ReadBuf::new(&mut buf[..]);
                match ready!(Pin::new(&mut self.io).poll_read(cx, &mut read)) {
                    Ok(()) => {}
                    Err(e) => {
                        self.read_done = true;
                        return Poll::Ready(Err(e.into()));
                    }
                }
                let n = read.filled().len();
                if n == 0 {
                    self.read_done = true;
                    return Poll::Ready(Err(SocketError::Eof));
                }
                if let Err(e) = self.inbound.feed(&mut buf[..n], out) {
                    self.read_done = true;
                    return Poll::Ready(Err(e.into()));
                }
                if !out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
            }
        })
    }

    /// Reads and drops whatever the client still sends, until it closes, the stream ends, or
    /// it fails (after the server sent its close frame).
    pub fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        READ.with(|buf| {
            let mut buf = buf.borrow_mut();
            let mut frames = VecDeque::new();
            loop {
                let mut read = ReadBuf::new(&mut buf[..]);
                match ready!(Pin::new(&mut self.io).poll_read(cx, &mut read)) {
                    Ok(()) if !read.filled().is_empty() => {}
                    _ => return Poll::Ready(()),
                }
                let n = read.filled().len();
                if !self.read_done {
                    // Frames still parse: the client's close frame ends the wait.
                    match self.inbound.feed(&mut buf[..n], &mut frames) {
                        Ok(()) if frames.contains(&Incoming::Close) => return Poll::Ready(()),
                        Ok(()) => frames.clear(),
                        Err(_) => self.read_done = true,
                    }
                }
            }
        })
    }

    /// Sends a ping with the next write.
    pub fn ping(&mut self) {
        self.ping = true;
    }

    /// Answers a ping with the next write.
    pub fn pong(&mut self, payload: Bytes) {
        self.pong = Some(payload);
    }

    /// Starts closing: `farewell` (a last binary message, if any) and the close frame go out
    /// after what the stream has not taken yet; a large message still leaving is cut short.
    pub fn close(&mut self, code: u16, reason: &str, farewell: Option<Bytes>) {
        if self.close.is_some() {
            return;
        }
        self.fragments = farewell;
        self.first_fragment = true;
        self.close = Some(close_payload(code, reason));
    }

    /// Whether the close frame has left.
    pub fn close_sent(&self) -> bool {
        self.close_sent
    }

    /// Writes control frames and messages from `source` until both are exhausted (`Ready`) or
    /// the stream takes no more (`Pending`). Up to `batch` bytes go out in one write.
    pub fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut dyn Source,
        batch: usize,
        written: &mut Written,
    ) -> Poll<io::Result<()>> {
        loop {
            while self.unsent_at < self.unsent.len() {
                let n =
                    ready!(Pin::new(&mut self.io).poll_write(cx, &self.unsent[self.unsent_at..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.unsent_at += n;
            }
            if !self.unsent.is_empty() {
                self.unsent = Vec::new();
                self.unsent_at = 0;
            }
            let step = WRITE.with(|buf| {
                let mut buf = buf.borrow_mut();
                buf.clear();
                self.format(&mut buf, source, batch, written);
                if buf.is_empty() {
                    return None;
                }
                let result = match Pin::new(&mut self.io).poll_write(cx, &buf) {
                    Poll::Ready(Ok(0)) => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        if n < buf.len() {
                            self.unsent = buf[n..].to_vec();
                        }
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => {
                        self.unsent = buf.to_vec();
                        Poll::Pending
                    }
                };
                // A large batch once must not stay with the thread.
                if buf.capacity() > 4 * batch.max(FRAGMENT_BYTES) {
                    *buf = Vec::new();
                }
                Some(result)
            });
            match step {
                None => return ready!(Pin::new(&mut self.io).poll_flush(cx)).into(),
                Some(Poll::Ready(Ok(()))) => {}
                Some(other) => return other,
            }
        }
    }

    /// Formats what is due into `buf`: control frames, then fragments and messages up to
    /// `batch` bytes.
    fn format(
        &mut self,
        buf: &mut Vec<u8>,
        source: &mut dyn Source,
        batch: usize,
        written: &mut Written,
    ) {
        if self.close_sent {
            return;
        }
        if let Some(payload) = self.pong.take() {
            write_header(buf, true, OpCode::Pong, payload.len());
            buf.extend_from_slice(&payload);
        }
        if std::mem::take(&mut self.ping) {
            write_header(buf, true, OpCode::Ping, 0);
        }
        loop {
            if let Some(rest) = self.fragments.as_mut() {
                // The first fragment of a message is a binary frame, the rest continue it.
                let part = rest.split_to(rest.len().min(FRAGMENT_BYTES));
                let last = rest.is_empty();
                let opcode = if self.first_fragment {
                    OpCode::Binary
                } else {
                    OpCode::Continue
                };
                write_header(buf, last, opcode, part.len());
                buf.extend_from_slice(&part);
                if last {
                    self.fragments = None;
                }
                self.first_fragment = false;
            } else if self.close.is_some() {
                let payload = self.close.take().expect("checked");
                write_header(buf, true, OpCode::Close, payload.len());
                buf.extend_from_slice(&payload);
                self.close_sent = true;
                return;
            } else if let Some(message) = source.next_message() {
                source.taken(message.len());
                written.messages += 1;
                written.bytes += message.len() as u64;
                if message.len() <= FRAGMENT_BYTES {
                    write_header(buf, true, OpCode::Binary, message.len());
                    buf.extend_from_slice(&message);
                } else {
                    self.fragments = Some(message);
                    self.first_fragment = true;
                    continue;
                }
            } else {
                return;
            }
            if buf.len() >= batch {
                return;
            }
        }
    }
}
