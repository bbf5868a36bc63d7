//! The read half of a server's WebSocket: a client's bytes, through a buffer of the worker
//! thread (an idle connection keeps none), into whole messages.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::net::TcpStream;

use super::inbound::{Inbound, Incoming, ReadError};

/// Bytes one read takes at most.
const READ_BYTES: usize = 16 << 10;

thread_local! {
    /// The worker thread's read buffer.
    static READ: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_BYTES].into_boxed_slice());
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

/// A server WebSocket's read half.
#[derive(Debug)]
pub struct WsReader {
    stream: Arc<TcpStream>,
    /// Bytes the HTTP server read past the upgrade request (a client may send its first
    /// message without waiting for `101`): they come before anything read from the stream.
    early: Bytes,
    inbound: Inbound,
    /// The stream ended or failed: nothing more to read.
    done: bool,
}

impl WsReader {
    /// Reads `stream`, after `early`, refusing messages over `max_message` bytes.
    pub fn new(stream: Arc<TcpStream>, early: Bytes, max_message: usize) -> Self {
        Self {
            stream,
            // A copy: the bytes given are a view into the HTTP server's read buffer (kilobytes),
            // which must not stay allocated for as long as the connection lives.
            early: Bytes::copy_from_slice(&early),
            inbound: Inbound::new(max_message),
            done: false,
        }
    }

    /// Reads into `buf`: first what came early, then the stream. `Ready(0)` is the end.
    fn poll_fill(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.len());
            buf[..n].copy_from_slice(&self.early[..n]);
            self.early.advance(n);
            if self.early.is_empty() {
                self.early = Bytes::new();
            }
            return Poll::Ready(Ok(n));
        }
        loop {
            // Each wait for readiness also spends the task's cooperative budget, so a client
            // that keeps its socket full cannot hold the worker thread.
            ready!(self.stream.poll_read_ready(cx))?;
            match self.stream.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    /// Reads until at least one message is whole, appending them to `out`.
    pub fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut VecDeque<Incoming>,
    ) -> Poll<Result<(), SocketError>> {
        if self.done {
            return Poll::Ready(Err(SocketError::Eof));
        }
        READ.with(|buf| {
            let mut buf = buf.borrow_mut();
            loop {
                let n = match ready!(self.poll_fill(cx, &mut buf[..])) {
                    Ok(0) => {
                        self.done = true;
                        return Poll::Ready(Err(SocketError::Eof));
                    }
                    Ok(n) => n,
                    Err(e) => {
                        self.done = true;
                        return Poll::Ready(Err(e.into()));
                    }
                };
                if let Err(e) = self.inbound.feed(&mut buf[..n], out) {
                    self.done = true;
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
                let n = match ready!(self.poll_fill(cx, &mut buf[..])) {
                    Ok(n) if n > 0 => n,
                    _ => return Poll::Ready(()),
                };
                if !self.done {
                    // Frames still parse: the client's close frame ends the wait.
                    match self.inbound.feed(&mut buf[..n], &mut frames) {
                        Ok(()) if frames.contains(&Incoming::Close) => return Poll::Ready(()),
                        Ok(()) => frames.clear(),
                        Err(_) => self.done = true,
                    }
                }
            }
        })
    }
}
