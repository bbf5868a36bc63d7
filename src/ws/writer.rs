//! The write half of a server's WebSocket: frames formatted into a buffer of the calling thread
//! and handed to the socket without waiting. Whoever holds the writer may write: the
//! connection's task (which waits for the socket when it is full) or the room that produced
//! the frames (which never waits, and leaves what the socket did not take to the connection).

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::net::TcpStream;

use super::frame::{close_payload, write_header, OpCode};

/// Messages larger than this leave in fragments of this size, so that no buffer ever holds a
/// whole large message twice.
pub const FRAGMENT_BYTES: usize = 16 << 10;

thread_local! {
    /// The calling thread's write buffer.
    static WRITE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What the writer takes messages from.
pub trait Source {
    /// The next queued message, without waiting.
    fn next_message(&mut self) -> Option<Bytes>;
    /// Called once `len` bytes of a message are on their way.
    fn taken(&mut self, len: usize);
}

/// How many messages and bytes of messages a write took.
#[derive(Debug, Default, Clone, Copy)]
pub struct Written {
    /// Messages.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Written {
    /// Adds `other` to these counts.
    pub fn add(&mut self, other: Written) {
        self.messages += other.messages;
        self.bytes += other.bytes;
    }
}

/// Control frames and the close, rare enough to live in a box of their own.
#[derive(Debug, Default)]
struct Control {
    /// A pong to send (only the latest ping is answered).
    pong: Option<Bytes>,
    /// A ping to send.
    ping: bool,
    /// The close frame to send; once it is formatted nothing else is written.
    close: Option<Vec<u8>>,
}

/// A server WebSocket's write half.
#[derive(Debug)]
pub struct WsWriter {
    /// The socket; `None` once released, or for a writer that never had one.
    stream: Option<Arc<TcpStream>>,
    /// The socket's descriptor, kept here so that a write without waiting reads nothing of the
    /// stream's own allocations (valid while `stream` is `Some`).
    fd: RawFd,
    /// Formatted bytes the socket has not taken yet.
    unsent: Bytes,
    /// The rest of a large message leaving in fragments, and whether none has left yet (boxed:
    /// rare, and every idle connection would carry it).
    fragments: Option<Box<(Bytes, bool)>>,
    control: Option<Box<Control>>,
    close_sent: bool,
    /// A write failed: the socket is broken and every later write fails too.
    failed: bool,
}

impl WsWriter {
    /// Writes to `stream`.
    pub fn new(stream: Arc<TcpStream>) -> Self {
        Self {
            fd: stream.as_raw_fd(),
            stream: Some(stream),
            ..Self::detached()
        }
    }

    /// A writer without a socket: it never writes, so messages stay with their source.
    pub fn detached() -> Self {
        Self {
            stream: None,
            fd: -1,
            unsent: Bytes::new(),
            fragments: None,
            control: None,
            close_sent: false,
            failed: false,
        }
    }

    /// Lets go of the socket (it closes once the reader lets go too).
    pub fn release(&mut self) {
        self.stream = None;
        self.fd = -1;
        self.unsent = Bytes::new();
        self.fragments = None;
    }

    fn control(&mut self) -> &mut Control {
        self.control.get_or_insert_with(Default::default)
    }

    /// Sends a ping with the next write.
    pub fn ping(&mut self) {
        self.control().ping = true;
    }

    /// Answers a ping with the next write.
    pub fn pong(&mut self, payload: Bytes) {
        self.control().pong = Some(payload);
    }

    /// Starts closing: `farewell` (a last binary message, if any) and the close frame go out
    /// after what the socket has not taken yet; a large message still leaving is cut short.
    pub fn close(&mut self, code: u16, reason: &str, farewell: Option<Bytes>) {
        if self.close_sent || self.control.as_ref().is_some_and(|c| c.close.is_some()) {
            return;
        }
        self.fragments = farewell.map(|f| Box::new((f, true)));
        self.control().close = Some(close_payload(code, reason));
    }

    /// Whether the close frame has left.
    pub fn close_sent(&self) -> bool {
        self.close_sent
    }

    /// Whether nothing formatted waits for the socket and no message is half sent, so that the
    /// next message may be written by anyone.
    pub fn is_idle(&self) -> bool {
        self.unsent.is_empty() && self.fragments.is_none()
    }

    /// Sends `frame`, one whole WebSocket frame already encoded (header and payload, the same
    /// bytes for every peer), without waiting and without copying it: what the socket does not
    /// take stays as this writer's unsent bytes, a slice of `frame`, for the connection's task
    /// ([`WsWriter::is_idle`] is then false). `None` when the frame may not go now: something
    /// is unsent or due before it (a control frame, a close), the writer failed, or it has no
    /// socket; the caller queues the message instead.
    pub fn try_send_encoded(&mut self, frame: &Bytes) -> Option<io::Result<()>> {
        if self.failed || self.close_sent || self.control.is_some() || !self.is_idle() {
            return None;
        }
        // The stream stays in place for the call: the descriptor is open while it is held.
        self.stream.as_ref()?;
        match send_now(self.fd, frame) {
            Poll::Ready(Ok(n)) => {
                if n < frame.len() {
                    self.unsent = frame.slice(n..);
                }
                Some(Ok(()))
            }
            Poll::Pending => {
                self.unsent = frame.clone();
                Some(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }

    /// Writes control frames and messages from `source` until both are exhausted (`Ready`) or
    /// the socket takes no more (`Pending`). Up to `batch` bytes go out in one write.
    ///
    /// With a context, a full socket wakes its task when it has room again; without one (a
    /// room writing on the connection's behalf), `Pending` only says that something is left.
    pub fn write(
        &mut self,
        cx: Option<&mut Context<'_>>,
        source: &mut dyn Source,
        batch: usize,
        written: &mut Written,
    ) -> Poll<io::Result<()>> {
        if self.failed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // Taken out for the write (no reference count touched on this per-delivery path).
        let Some(stream) = self.stream.take() else {
            return Poll::Pending;
        };
        let result = self.write_to(&stream, cx, source, batch, written);
        self.stream = Some(stream);
        if let Poll::Ready(Err(_)) = result {
            self.failed = true;
        }
        result
    }

    fn write_to(
        &mut self,
        stream: &TcpStream,
        mut cx: Option<&mut Context<'_>>,
        source: &mut dyn Source,
        batch: usize,
        written: &mut Written,
    ) -> Poll<io::Result<()>> {
        loop {
            while !self.unsent.is_empty() {
                let n = ready!(send(stream, self.fd, cx.as_deref_mut(), &self.unsent))?;
                self.unsent.advance(n);
                if self.unsent.is_empty() {
                    // Frees the copy.
                    self.unsent = Bytes::new();
                }
            }
            let fd = self.fd;
            let step = WRITE.with(|buf| {
                let mut buf = buf.borrow_mut();
                buf.clear();
                self.format(&mut buf, source, batch, written);
                if buf.is_empty() {
                    return None;
                }
                let result = match send(stream, fd, cx.as_deref_mut(), &buf) {
                    Poll::Ready(Ok(n)) => {
                        if n < buf.len() {
                            self.unsent = Bytes::copy_from_slice(&buf[n..]);
                        }
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => {
                        self.unsent = Bytes::copy_from_slice(&buf);
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
                None => return Poll::Ready(Ok(())),
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
        let mut closing = false;
        if let Some(control) = self.control.as_mut() {
            if let Some(payload) = control.pong.take() {
                write_header(buf, true, OpCode::Pong, payload.len());
                buf.extend_from_slice(&payload);
            }
            if std::mem::take(&mut control.ping) {
                write_header(buf, true, OpCode::Ping, 0);
            }
            closing = control.close.is_some();
            if !closing {
                self.control = None;
            }
        }
        loop {
            if let Some((rest, first)) = self.fragments.as_deref_mut() {
                // The first fragment of a message is a binary frame, the rest continue it.
                let part = rest.split_to(rest.len().min(FRAGMENT_BYTES));
                let last = rest.is_empty();
                let opcode = if *first {
                    OpCode::Binary
                } else {
                    OpCode::Continue
                };
                *first = false;
                write_header(buf, last, opcode, part.len());
                buf.extend_from_slice(&part);
                if last {
                    self.fragments = None;
                }
            } else if closing {
                let payload = self
                    .control
                    .take()
                    .and_then(|c| c.close)
                    .unwrap_or_default();
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
                    self.fragments = Some(Box::new((message, true)));
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

/// Hands `bytes` to the socket `fd` of `stream`. With a context, waits (registering the task)
/// while the socket is full; without one, a full socket is `Pending` at once.
fn send(
    stream: &TcpStream,
    fd: RawFd,
    cx: Option<&mut Context<'_>>,
    bytes: &[u8],
) -> Poll<io::Result<usize>> {
    let Some(cx) = cx else {
        return send_now(fd, bytes);
    };
    loop {
        ready!(stream.poll_write_ready(cx))?;
        match stream.try_write(bytes) {
            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// One `send` without waiting, for a writer that is not the connection's task (a room writing
/// to its peers): the descriptor alone, and none of tokio's readiness bookkeeping, whose
/// per-socket allocations are a cache miss each on this per-delivery path. Skipping the
/// bookkeeping is safe: when the socket is full the connection's task takes over, and its
/// first write finds the socket full itself and waits for it as usual.
fn send_now(fd: RawFd, bytes: &[u8]) -> Poll<io::Result<usize>> {
    loop {
        // SAFETY: `fd` is the descriptor of the stream the writer holds for the whole write
        // (`WsWriter::write` takes it out of `stream` and puts it back;
        // `WsWriter::try_send_encoded` checks that it is there and holds `&mut self`), so it is
        // open and is that socket; the pointer and length describe `bytes`, which the call only reads.
        let n = unsafe {
            libc::send(
                fd,
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        match usize::try_from(n) {
            Ok(0) if !bytes.is_empty() => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => return Poll::Pending,
                    _ => return Poll::Ready(Err(e)),
                }
            }
        }
    }
}
