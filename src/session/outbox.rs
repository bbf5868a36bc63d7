//! A connection's outbox: frames on their way to one socket, bounded in bytes, and the socket's
//! write half.
//!
//! The room hands over shared, encoded-once frames ([`Bytes`]) without ever waiting, and writes
//! them to the socket itself when the socket takes them at once: no wake-up of the connection's
//! task, and no second thread, for a delivery. Only what the socket does not take stays queued,
//! and the connection's task writes it when the socket has room. When a connection's queued bytes
//! would pass its budget, the push fails and the connection is told to close with 1013 (try
//! again later): a slow reader costs only itself, and no CRDT frame is ever dropped silently —
//! the client resyncs when it reconnects.
//!
//! A room that writes to all its peers itself and has nothing queued for them encodes an update
//! as a WebSocket frame once and offers those bytes to each socket ([`Outbox::offer`]): a peer
//! with nothing queued gets them at once, without the per-connection framing and copy of a
//! flush, and a peer with frames queued gets the message queued behind them.

use std::borrow::Cow;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tandem_protocol::CloseCode;

use super::frames::Frames;
use crate::metrics::METRICS;
use crate::ws::{Source, Written, WsWriter};

/// Why and how a connection is being closed by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    /// The close code sent to the client.
    pub code: CloseCode,
    /// A short human reason (at most 123 bytes on the wire).
    pub reason: Cow<'static, str>,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The connection's byte budget is spent; it has been told to close with 1013.
    #[error("outbox over its byte budget")]
    Overflow,
    /// The connection is closing or gone.
    #[error("outbox closed")]
    Closed,
}

/// The queue and the socket's write half, under one lock: whoever holds it may write, so frames
/// never interleave. The lock is held only to queue or to hand bytes to the socket, never to
/// wait. An idle outbox costs a few hundred bytes (a channel's first block alone took a
/// kilobyte), which matters at hundreds of thousands of idle connections.
struct Wire {
    /// Frames queued and not yet written.
    frames: Frames,
    /// Their bytes.
    queued: usize,
    writer: WsWriter,
    /// Frames were queued with [`Outbox::queue`] since the last flush.
    corked: bool,
    /// The receiver is gone or gave up: pushes fail.
    receiver_gone: bool,
}

/// The queue as the writer sees it; nothing more is taken once a close is requested.
struct Queue<'a> {
    frames: &'a mut Frames,
    queued: &'a mut usize,
    closing: bool,
}

impl Source for Queue<'_> {
    fn next_message(&mut self) -> Option<Bytes> {
        if self.closing {
            return None;
        }
        self.frames.pop_front()
    }

    fn taken(&mut self, len: usize) {
        *self.queued -= len;
    }
}

impl Wire {
    /// Writes what is queued, waiting for the socket with `cx` (the connection's task) or not
    /// at all (anyone else).
    fn write(
        &mut self,
        cx: Option<&mut Context<'_>>,
        closing: bool,
        batch: usize,
        written: &mut Written,
    ) -> Poll<io::Result<()>> {
        let Wire {
            frames,
            queued,
            writer,
            ..
        } = self;
        let mut queue = Queue {
            frames,
            queued,
            closing,
        };
        writer.write(cx, &mut queue, batch, written)
    }

    /// Refuses further pushes and frees the queued frames now, not when the last sender goes.
    fn abandon(&mut self) {
        self.receiver_gone = true;
        self.frames = Frames::Empty;
        self.queued = 0;
    }

    /// Whether something is left for the connection's task to write.
    fn has_backlog(&self, closing: bool) -> bool {
        !self.writer.is_idle() || (!closing && !self.frames.is_empty())
    }
}

/// How [`Outbox::offer`] took a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Handed to the socket (what it did not take at once is the connection task's to write).
    Sent,
    /// Queued; `first` as [`Outbox::queue`] returns it: the caller owes a flush.
    Queued {
        /// The first frame queued since the last flush.
        first: bool,
    },
}

/// What both ends share.
struct Shared {
    wire: Mutex<Wire>,
    /// The connection waiting for a backlog, a close request or the end.
    waker: AtomicWaker,
    /// Live [`Outbox`] handles; none left means the end.
    senders: AtomicUsize,
    budget: usize,
    /// Queued frames are coalesced into writes of about this many bytes.
    batch: usize,
    /// Set once, by the first close request; later requests are ignored.
    close: OnceLock<CloseRequest>,
}

impl Shared {
    fn wire(&self) -> MutexGuard<'_, Wire> {
        // Nothing panics while holding the lock; recover the state if something ever did.
        self.wire.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn closing(&self) -> bool {
        self.close.get().is_some()
    }
}

/// The sending side, held by the room (and cloned for the connection itself).
pub struct Outbox {
    shared: Arc<Shared>,
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // Frames queued for a flush that will not come now (the room let the peer go).
        if self.shared.wire().corked {
            self.flush();
        }
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.waker.wake();
        }
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("queued", &self.queued_bytes())
            .finish_non_exhaustive()
    }
}

/// The receiving side, owned by the connection.
pub struct OutboxReceiver {
    shared: Arc<Shared>,
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        let mut wire = self.shared.wire();
        wire.abandon();
        // The room's handle must not keep the socket open.
        wire.writer.release();
    }
}

/// Creates an outbox with a budget of `budget` queued bytes that writes through `writer` in
/// writes of about `batch` bytes. The queue is unbounded in count but bounded in bytes by
/// [`Outbox::push`]; a single frame larger than the budget is still accepted into an empty
/// outbox so that a large document can always be delivered.
pub fn outbox(budget: usize, batch: usize, writer: WsWriter) -> (Outbox, OutboxReceiver) {
    let shared = Arc::new(Shared {
        wire: Mutex::new(Wire {
            frames: Frames::Empty,
            queued: 0,
            writer,
            corked: false,
            receiver_gone: false,
        }),
        waker: AtomicWaker::new(),
        senders: AtomicUsize::new(1),
        budget,
        batch,
        close: OnceLock::new(),
    });
    (
        Outbox {
            shared: shared.clone(),
        },
        OutboxReceiver { shared },
    )
}

impl Outbox {
    /// Asks the CPU to start loading the state [`Outbox::offer`] and [`Outbox::queue`] read,
    /// without waiting for it. A broadcast calls it for every peer before it writes to the first: a
    /// room's peers' outboxes are cold by its next update (the sends in between, its own and
    /// other rooms', evict them), and fetched one by one, each behind a `send`, every first
    /// touch was a miss that nothing overlapped (docs/benchmarks.md, session 19). Does nothing
    /// on architectures without a prefetch instruction here.
    #[inline]
    pub fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            const LINE: usize = 64;
            let base = Arc::as_ptr(&self.shared).cast::<i8>();
            let size = std::mem::size_of::<Shared>();
            // Every line from the first byte to the last, wherever the allocation starts.
            let offsets = (0..size).step_by(LINE).chain(std::iter::once(size - 1));
            for offset in offsets {
                // SAFETY: a prefetch reads and writes nothing the program sees and never
                // faults, whatever the address; this one is inside a live allocation anyway.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(offset)) };
            }
        }
    }

    /// Queues a frame and writes what the socket takes at once; the connection's task is woken
    /// only for what is left. On overflow the connection is closed with 1013.
    pub fn push(&self, frame: Bytes) -> Result<(), PushError> {
        self.queue(frame)?;
        let written = self.flush();
        METRICS.frames_out.add(written.messages);
        METRICS.bytes_out.add(written.bytes);
        Ok(())
    }

    /// Queues a frame without writing it: the caller owes a [`Outbox::flush`], which writes
    /// every frame queued until then at once. Returns whether this frame is the first since the
    /// last flush (so that the caller remembers this outbox once). On overflow the connection
    /// is closed with 1013.
    pub fn queue(&self, frame: Bytes) -> Result<bool, PushError> {
        if self.shared.closing() {
            return Err(PushError::Closed);
        }
        let wire = self.shared.wire();
        self.queue_locked(wire, frame)
    }

    /// [`Outbox::queue`] with the lock taken.
    fn queue_locked(
        &self,
        mut wire: MutexGuard<'_, Wire>,
        frame: Bytes,
    ) -> Result<bool, PushError> {
        if wire.receiver_gone {
            return Err(PushError::Closed);
        }
        let len = frame.len();
        if wire.queued > 0 && wire.queued + len > self.shared.budget {
            drop(wire);
            self.close(
                CloseCode::TryAgainLater,
                "slow consumer: outbox over budget",
            );
            return Err(PushError::Overflow);
        }
        wire.queued += len;
        wire.frames.push_back(frame);
        Ok(!std::mem::replace(&mut wire.corked, true))
    }

    /// Sends `message` now when nothing waits before it, as `encoded`: the same message as one
    /// whole WebSocket frame, encoded once for every peer. This skips the queue, the
    /// per-connection framing and the copy of a write through [`Outbox::flush`]. What the socket
    /// does not take is left to the connection's task, which is woken. Otherwise (frames
    /// queued, or anything else due first) the message is queued as [`Outbox::queue`] queues
    /// it, and the caller owes a flush.
    pub fn offer(&self, message: &Bytes, encoded: &Bytes) -> Result<Offered, PushError> {
        if self.shared.closing() {
            return Err(PushError::Closed);
        }
        let mut wire = self.shared.wire();
        if !wire.receiver_gone && wire.frames.is_empty() {
            if let Some(result) = wire.writer.try_send_encoded(encoded) {
                let backlog = !wire.writer.is_idle();
                drop(wire);
                if backlog || result.is_err() {
                    self.shared.waker.wake();
                }
                return Ok(Offered::Sent);
            }
        }
        self.queue_locked(wire, message.clone())
            .map(|first| Offered::Queued { first })
    }

    /// Writes what is queued as far as the socket takes it without waiting, and wakes the
    /// connection's task for the rest. More than one write's worth (a large document, or a
    /// backlog behind a full socket) is left to the connection's task at once: the caller's
    /// thread serves a whole room and must not spend itself on one peer. Returns what was
    /// written.
    pub fn flush(&self) -> Written {
        let mut written = Written::default();
        let closing = self.shared.closing();
        let mut wire = self.shared.wire();
        wire.corked = false;
        let failed = if closing || wire.queued > self.shared.batch {
            false
        } else {
            matches!(
                wire.write(None, false, self.shared.batch, &mut written),
                Poll::Ready(Err(_))
            )
        };
        let backlog = wire.has_backlog(closing);
        drop(wire);
        if backlog || failed {
            self.shared.waker.wake();
        }
        written
    }

    /// Leaves what is queued to the connection's task instead of writing it here: the task is
    /// woken, and writes it on whichever worker thread runs it.
    pub fn hand_over(&self) {
        self.shared.wire().corked = false;
        self.shared.waker.wake();
    }

    /// Asks the connection to close with `code`. The first request wins.
    pub fn close(&self, code: CloseCode, reason: impl Into<Cow<'static, str>>) {
        if self
            .shared
            .close
            .set(CloseRequest {
                code,
                reason: reason.into(),
            })
            .is_ok()
        {
            self.shared.waker.wake();
        }
    }

    /// The close request, once one was made.
    pub fn close_request(&self) -> Option<&CloseRequest> {
        self.shared.close.get()
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.shared.wire().queued
    }
}

/// What [`OutboxReceiver::poll_signal`] found.
#[derive(Debug)]
pub enum Signal {
    /// Frames are queued.
    Frames,
    /// Close with this request; queued frames are abandoned.
    Close(CloseRequest),
    /// Every sender is gone.
    Ended,
}

impl OutboxReceiver {
    /// Whether the outbox has something for the connection; if not, the task in `cx` is woken
    /// when it does. The task is woken whenever something is left unwritten and on every close
    /// request, so a connection whose socket is full still hears of a close request.
    pub fn poll_signal(&mut self, cx: &mut Context<'_>) -> Poll<Signal> {
        self.shared.waker.register(cx.waker());
        if let Some(req) = self.shared.close.get() {
            return Poll::Ready(Signal::Close(req.clone()));
        }
        if !self.shared.wire().frames.is_empty() {
            return Poll::Ready(Signal::Frames);
        }
        if self.shared.senders.load(Ordering::Acquire) == 0 {
            return Poll::Ready(Signal::Ended);
        }
        Poll::Pending
    }

    /// Writes control frames and queued frames until nothing is left (`Ready`) or the socket
    /// is full (`Pending`: the task in `cx` is woken when it has room). Once a close is
    /// requested, queued frames stay unwritten.
    pub fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        written: &mut Written,
    ) -> Poll<io::Result<()>> {
        let closing = self.shared.closing();
        self.shared
            .wire()
            .write(Some(cx), closing, self.shared.batch, written)
    }

    /// Sends a ping with the next write.
    pub fn ping(&mut self) {
        self.shared.wire().writer.ping();
    }

    /// Answers a ping with the next write.
    pub fn pong(&mut self, payload: Bytes) {
        self.shared.wire().writer.pong(payload);
    }

    /// Starts closing the socket (see [`WsWriter::close`]) and abandons the queued frames:
    /// later pushes fail.
    pub fn start_close(&mut self, code: u16, reason: &str, farewell: Option<Bytes>) {
        let mut wire = self.shared.wire();
        wire.abandon();
        wire.writer.close(code, reason, farewell);
    }

    /// Whether the close frame has left.
    pub fn close_sent(&self) -> bool {
        self.shared.wire().writer.close_sent()
    }

    /// The next queued frame, taken without writing it: for an outbox whose writer has no
    /// socket ([`WsWriter::detached`]), where frames only queue.
    pub fn take(&mut self) -> Option<Bytes> {
        let mut wire = self.shared.wire();
        let frame = wire.frames.pop_front()?;
        wire.queued -= frame.len();
        Some(frame)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    fn detached(budget: usize) -> (Outbox, OutboxReceiver) {
        outbox(budget, 16 << 10, WsWriter::detached())
    }

    async fn signal(rx: &mut OutboxReceiver) -> Signal {
        poll_fn(|cx| rx.poll_signal(cx)).await
    }

    #[tokio::test]
    async fn frames_stay_in_order_while_the_socket_cannot_take_them() {
        let (tx, mut rx) = detached(1024);
        tx.push(Bytes::from_static(b"a")).unwrap();
        tx.push(Bytes::from_static(b"b")).unwrap();
        assert!(matches!(signal(&mut rx).await, Signal::Frames));
        assert_eq!(rx.take().unwrap(), "a");
        assert_eq!(rx.take().unwrap(), "b");
        assert_eq!(tx.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn queue_reports_the_first_frame_since_the_last_flush() {
        let (tx, _rx) = detached(1024);
        assert_eq!(tx.queue(Bytes::from_static(b"a")), Ok(true));
        assert_eq!(tx.queue(Bytes::from_static(b"b")), Ok(false));
        tx.flush();
        assert_eq!(tx.queue(Bytes::from_static(b"c")), Ok(true));
    }

    #[tokio::test]
    async fn over_budget_push_fails_and_requests_try_again_later() {
        let (tx, mut rx) = detached(10);
        tx.push(Bytes::from(vec![0; 6])).unwrap();
        assert_eq!(tx.push(Bytes::from(vec![0; 6])), Err(PushError::Overflow));
        assert_eq!(tx.close_request().unwrap().code, CloseCode::TryAgainLater);
        assert!(
            matches!(signal(&mut rx).await, Signal::Close(r) if r.code == CloseCode::TryAgainLater)
        );
        assert_eq!(tx.push(Bytes::from_static(b"x")), Err(PushError::Closed));
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_budget_fits_an_empty_outbox() {
        let (tx, mut rx) = detached(10);
        tx.push(Bytes::from(vec![0; 100])).unwrap();
        rx.take().unwrap();
        assert_eq!(tx.queued_bytes(), 0);
        tx.push(Bytes::from(vec![0; 8])).unwrap();
    }

    #[tokio::test]
    async fn written_bytes_free_budget() {
        let (tx, mut rx) = detached(10);
        tx.push(Bytes::from(vec![0; 8])).unwrap();
        rx.take().unwrap();
        tx.push(Bytes::from(vec![0; 8])).unwrap();
    }

    #[tokio::test]
    async fn first_close_request_wins() {
        let (tx, mut rx) = detached(10);
        tx.close(CloseCode::InvalidData, "bad");
        tx.close(CloseCode::Restarting, "later");
        assert!(
            matches!(signal(&mut rx).await, Signal::Close(r) if r.code == CloseCode::InvalidData)
        );
    }

    #[tokio::test]
    async fn a_push_after_the_receiver_is_gone_fails_and_frees_the_queue() {
        let (tx, rx) = detached(10);
        tx.push(Bytes::from_static(b"queued")).unwrap();
        drop(rx);
        assert_eq!(tx.push(Bytes::from_static(b"x")), Err(PushError::Closed));
        assert_eq!(tx.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn a_push_after_the_close_started_fails() {
        let (tx, mut rx) = detached(10);
        tx.push(Bytes::from_static(b"queued")).unwrap();
        rx.start_close(1000, "bye", None);
        assert_eq!(tx.queued_bytes(), 0, "abandoned");
        assert_eq!(tx.push(Bytes::from_static(b"x")), Err(PushError::Closed));
    }

    /// A connected pair on loopback: the server's end in an outbox, the client's end raw.
    async fn on_socket(budget: usize) -> (Outbox, OutboxReceiver, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let server = Arc::new(accepted.unwrap().0);
        let (tx, rx) = outbox(budget, 16 << 10, WsWriter::new(server));
        (tx, rx, client.unwrap())
    }

    /// Reads `n` unmasked binary frames of at most 125 bytes from the client's end.
    async fn read_frames(client: &mut tokio::net::TcpStream, n: usize) -> Vec<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut frames = Vec::new();
        for _ in 0..n {
            let mut head = [0; 2];
            client.read_exact(&mut head).await.unwrap();
            assert_eq!(head[0], 0x82, "a whole binary frame");
            let mut payload = vec![0; usize::from(head[1])];
            client.read_exact(&mut payload).await.unwrap();
            frames.push(payload);
        }
        frames
    }

    /// The connection's task, woken for a backlog, writes it all: the client reads frames
    /// `0..count` (numbers padded to 100 bytes) complete and in order.
    async fn drains_in_order(
        tx: &Outbox,
        mut rx: OutboxReceiver,
        client: &mut tokio::net::TcpStream,
        count: usize,
    ) {
        assert!(matches!(signal(&mut rx).await, Signal::Frames));
        let conn = tokio::spawn(async move {
            let mut written = Written::default();
            poll_fn(|cx| rx.poll_write(cx, &mut written)).await.unwrap();
            rx
        });
        let frames = read_frames(client, count).await;
        for (i, frame) in frames.iter().enumerate() {
            assert_eq!(frame, format!("{i:0>100}").as_bytes(), "frame {i}");
        }
        let _rx = conn.await.unwrap();
        assert_eq!(tx.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn a_flush_writes_to_the_socket_without_waking_the_connection() {
        let (tx, mut rx, mut client) = on_socket(1024).await;
        assert_eq!(tx.queue(Bytes::from_static(b"one")), Ok(true));
        assert_eq!(tx.queue(Bytes::from_static(b"two")), Ok(false));
        let written = tx.flush();
        assert_eq!((written.messages, written.bytes), (2, 6));
        assert_eq!(tx.queued_bytes(), 0);
        assert_eq!(read_frames(&mut client, 2).await, [b"one", b"two"]);
        // Nothing is left for the connection's task: it is not woken and has nothing to do.
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(rx.poll_signal(&mut cx).is_pending());
    }

    #[tokio::test]
    async fn what_a_full_socket_does_not_take_is_left_to_the_connection_in_order() {
        let (tx, rx, mut client) = on_socket(usize::MAX).await;
        // Far more than the socket buffers hold while the client reads nothing.
        let count = 200_000;
        for i in 0..count {
            let frame = Bytes::from(format!("{i:0>100}"));
            tx.push(frame).unwrap();
        }
        assert!(tx.queued_bytes() > 0, "the socket filled up");
        drains_in_order(&tx, rx, &mut client, count).await;
    }

    fn encoded(message: &Bytes) -> Bytes {
        Bytes::from(crate::ws::frame::binary_frame(message))
    }

    #[tokio::test]
    async fn an_offer_to_an_idle_outbox_goes_straight_to_the_socket() {
        let (tx, mut rx, mut client) = on_socket(1024).await;
        let one = Bytes::from_static(b"one");
        assert_eq!(tx.offer(&one, &encoded(&one)), Ok(Offered::Sent));
        assert_eq!(tx.queued_bytes(), 0);
        assert_eq!(
            tx.queue(Bytes::from_static(b"x")),
            Ok(true),
            "nothing was queued, so no flush is owed for the offer"
        );
        tx.flush();
        assert_eq!(read_frames(&mut client, 2).await, [&b"one"[..], b"x"]);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(
            rx.poll_signal(&mut cx).is_pending(),
            "nothing left to write"
        );
    }

    #[tokio::test]
    async fn an_offer_behind_queued_frames_is_queued_after_them() {
        let (tx, _rx, mut client) = on_socket(1024).await;
        assert_eq!(tx.queue(Bytes::from_static(b"ack")), Ok(true));
        let two = Bytes::from_static(b"two");
        assert_eq!(
            tx.offer(&two, &encoded(&two)),
            Ok(Offered::Queued { first: false })
        );
        assert_eq!(tx.queued_bytes(), 6);
        tx.flush();
        assert_eq!(read_frames(&mut client, 2).await, [&b"ack"[..], b"two"]);
    }

    #[tokio::test]
    async fn an_offer_after_the_close_or_to_a_detached_writer_does_not_send() {
        let (tx, _rx) = detached(1024);
        let m = Bytes::from_static(b"m");
        assert_eq!(
            tx.offer(&m, &encoded(&m)),
            Ok(Offered::Queued { first: true }),
            "no socket: queued for whoever writes"
        );
        let (tx, _rx, _client) = on_socket(1024).await;
        tx.close(CloseCode::Restarting, "bye");
        assert_eq!(tx.offer(&m, &encoded(&m)), Err(PushError::Closed));
    }

    #[tokio::test]
    async fn what_an_offer_leaves_unsent_the_connection_writes_first_and_in_order() {
        let (tx, rx, mut client) = on_socket(usize::MAX).await;
        // Offers while the client reads nothing: the socket fills up, and what it did not take
        // of the frame it stopped in stays with the writer.
        let count = 200_000;
        let mut sent = 0;
        let mut queued = 0;
        for i in 0..count {
            let m = Bytes::from(format!("{i:0>100}"));
            match tx.offer(&m, &encoded(&m)).unwrap() {
                Offered::Sent => sent += 1,
                Offered::Queued { .. } => queued += 1,
            }
        }
        assert!(sent > 0 && queued > 0, "sent {sent}, queued {queued}");
        drains_in_order(&tx, rx, &mut client, count).await;
    }

    #[tokio::test]
    async fn handed_over_frames_are_written_by_the_connection() {
        let (tx, mut rx, mut client) = on_socket(1024).await;
        assert_eq!(tx.queue(Bytes::from_static(b"later")), Ok(true));
        tx.hand_over();
        assert!(matches!(signal(&mut rx).await, Signal::Frames));
        assert_eq!(tx.queued_bytes(), 5, "not written by the sender");
        let mut written = Written::default();
        poll_fn(|cx| rx.poll_write(cx, &mut written)).await.unwrap();
        assert_eq!(written.messages, 1);
        assert_eq!(read_frames(&mut client, 1).await, [b"later"]);
        assert_eq!(
            tx.queue(Bytes::from_static(b"x")),
            Ok(true),
            "no flush owed"
        );
    }

    #[tokio::test]
    async fn the_socket_closes_when_the_connection_lets_go_though_the_room_holds_the_outbox() {
        use tokio::io::AsyncReadExt;
        let (tx, rx, mut client) = on_socket(1024).await;
        drop(rx);
        let mut buf = [0; 1];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0, "end of stream");
        assert_eq!(tx.push(Bytes::from_static(b"x")), Err(PushError::Closed));
    }

    #[tokio::test]
    async fn a_waiting_connection_wakes_for_a_backlog_a_close_and_the_end() {
        let (tx, mut rx) = detached(1024);
        let pushed = tx.clone();
        let push = tokio::spawn(async move {
            tokio::task::yield_now().await;
            pushed.push(Bytes::from_static(b"late")).unwrap();
        });
        assert!(matches!(signal(&mut rx).await, Signal::Frames));
        push.await.unwrap();
        rx.take().unwrap();
        let closer = tx.clone();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            closer.close(CloseCode::Normal, "bye");
        });
        assert!(matches!(signal(&mut rx).await, Signal::Close(r) if r.reason == "bye"));
        let (tx, mut rx) = detached(1024);
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            drop(tx);
        });
        assert!(matches!(signal(&mut rx).await, Signal::Ended));
    }
}
