//! A connection's outbox: frames on their way to one socket, bounded in bytes.
//!
//! The room pushes shared, encoded-once frames ([`Bytes`]) without ever waiting. When a
//! connection's queued bytes would pass its budget, the push fails and the connection is told to
//! close with 1013 (try again later): a slow reader costs only itself, and no CRDT frame is ever
//! dropped silently — the client resyncs when it reconnects.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tandem_protocol::CloseCode;

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

/// What both ends share. The queue is a plain deque behind a mutex that is held only to push or
/// pop: one connection's outbox costs a few hundred bytes while it is idle (a channel's first
/// block alone took a kilobyte), which matters at hundreds of thousands of idle connections.
struct Shared {
    /// Frames pushed and not yet taken by the connection.
    frames: Mutex<VecDeque<Bytes>>,
    /// The connection waiting for a frame, a close request or the end.
    waker: AtomicWaker,
    /// Live [`Outbox`] handles; none left means the end.
    senders: AtomicUsize,
    /// The receiver is gone: pushes fail.
    receiver_gone: AtomicBool,
    /// Bytes pushed but not yet handed to the socket.
    queued: AtomicUsize,
    budget: usize,
    /// Set once, by the first close request; later requests are ignored.
    close: OnceLock<CloseRequest>,
}

impl Shared {
    fn frames(&self) -> std::sync::MutexGuard<'_, VecDeque<Bytes>> {
        // Nothing panics while holding the lock; recover the deque if something ever did.
        self.frames.lock().unwrap_or_else(PoisonError::into_inner)
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
        self.shared.receiver_gone.store(true, Ordering::Release);
        // Frames nobody will write: free them now, not when the last sender goes.
        self.shared.frames().clear();
    }
}

/// Creates an outbox with a budget of `budget` queued bytes. The queue is unbounded in count
/// but bounded in bytes by [`Outbox::push`]; a single frame larger than the budget is still
/// accepted into an empty outbox so that a large document can always be delivered.
pub fn outbox(budget: usize) -> (Outbox, OutboxReceiver) {
    let shared = Arc::new(Shared {
        frames: Mutex::new(VecDeque::new()),
        waker: AtomicWaker::new(),
        senders: AtomicUsize::new(1),
        receiver_gone: AtomicBool::new(false),
        queued: AtomicUsize::new(0),
        budget,
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
    /// Queues a frame without waiting. On overflow the connection is closed with 1013.
    pub fn push(&self, frame: Bytes) -> Result<(), PushError> {
        if self.shared.close.get().is_some() {
            return Err(PushError::Closed);
        }
        let len = frame.len();
        let before = self.shared.queued.fetch_add(len, Ordering::AcqRel);
        if before > 0 && before + len > self.shared.budget {
            self.shared.queued.fetch_sub(len, Ordering::AcqRel);
            self.close(
                CloseCode::TryAgainLater,
                "slow consumer: outbox over budget",
            );
            return Err(PushError::Overflow);
        }
        if self.shared.receiver_gone.load(Ordering::Acquire) {
            self.shared.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(PushError::Closed);
        }
        self.shared.frames().push_back(frame);
        self.shared.waker.wake();
        Ok(())
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
        self.shared.queued.load(Ordering::Acquire)
    }
}

/// What the connection should do next.
#[derive(Debug)]
pub enum Next {
    /// Write this frame.
    Frame(Bytes),
    /// Close with this request; queued frames are abandoned.
    Close(CloseRequest),
    /// Every sender is gone.
    Ended,
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
    /// Waits for the next frame or close request; a close request wins over queued frames.
    pub async fn next(&mut self) -> Next {
        poll_fn(|cx| {
            if let Some(next) = self.ready() {
                return Poll::Ready(next);
            }
            self.shared.waker.register(cx.waker());
            // Whatever happened between the first look and the registration is seen now.
            match self.ready() {
                Some(next) => Poll::Ready(next),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// What [`OutboxReceiver::next`] returns if it need not wait.
    fn ready(&self) -> Option<Next> {
        if let Some(req) = self.shared.close.get() {
            return Some(Next::Close(req.clone()));
        }
        if let Some(frame) = self.shared.frames().pop_front() {
            return Some(Next::Frame(frame));
        }
        (self.shared.senders.load(Ordering::Acquire) == 0).then_some(Next::Ended)
    }

    /// Whether the outbox has something for the connection; if not, the task in `cx` is woken
    /// when it does. The task is woken on every push and close request either way, so a
    /// connection whose socket is full still hears of a close request.
    pub fn poll_signal(&mut self, cx: &mut Context<'_>) -> Poll<Signal> {
        self.shared.waker.register(cx.waker());
        if let Some(req) = self.shared.close.get() {
            return Poll::Ready(Signal::Close(req.clone()));
        }
        if !self.shared.frames().is_empty() {
            return Poll::Ready(Signal::Frames);
        }
        if self.shared.senders.load(Ordering::Acquire) == 0 {
            return Poll::Ready(Signal::Ended);
        }
        Poll::Pending
    }

    /// A frame that is already queued, without waiting (for coalescing writes).
    pub fn try_next_frame(&mut self) -> Option<Bytes> {
        if self.shared.close.get().is_some() {
            return None;
        }
        self.shared.frames().pop_front()
    }

    /// Records that `len` bytes left the outbox for the socket.
    pub fn written(&self, len: usize) {
        self.shared.queued.fetch_sub(len, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_arrive_in_order() {
        let (tx, mut rx) = outbox(1024);
        tx.push(Bytes::from_static(b"a")).unwrap();
        tx.push(Bytes::from_static(b"b")).unwrap();
        assert!(matches!(rx.next().await, Next::Frame(f) if f == "a"));
        assert_eq!(rx.try_next_frame().unwrap(), "b");
    }

    #[tokio::test]
    async fn over_budget_push_fails_and_requests_try_again_later() {
        let (tx, mut rx) = outbox(10);
        tx.push(Bytes::from(vec![0; 6])).unwrap();
        assert_eq!(tx.push(Bytes::from(vec![0; 6])), Err(PushError::Overflow));
        assert_eq!(tx.close_request().unwrap().code, CloseCode::TryAgainLater);
        assert!(matches!(rx.next().await, Next::Close(r) if r.code == CloseCode::TryAgainLater));
        assert_eq!(tx.push(Bytes::from_static(b"x")), Err(PushError::Closed));
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_budget_fits_an_empty_outbox() {
        let (tx, mut rx) = outbox(10);
        tx.push(Bytes::from(vec![0; 100])).unwrap();
        let Next::Frame(f) = rx.next().await else {
            panic!("expected a frame")
        };
        rx.written(f.len());
        assert_eq!(tx.queued_bytes(), 0);
        tx.push(Bytes::from(vec![0; 8])).unwrap();
    }

    #[tokio::test]
    async fn written_bytes_free_budget() {
        let (tx, mut rx) = outbox(10);
        tx.push(Bytes::from(vec![0; 8])).unwrap();
        let Next::Frame(f) = rx.next().await else {
            panic!("expected a frame")
        };
        rx.written(f.len());
        tx.push(Bytes::from(vec![0; 8])).unwrap();
    }

    #[tokio::test]
    async fn first_close_request_wins() {
        let (tx, rx) = outbox(10);
        tx.close(CloseCode::InvalidData, "bad");
        tx.close(CloseCode::Restarting, "later");
        let mut rx = rx;
        assert!(matches!(rx.next().await, Next::Close(r) if r.code == CloseCode::InvalidData));
    }

    #[tokio::test]
    async fn a_push_after_the_receiver_is_gone_fails_and_frees_its_budget() {
        let (tx, rx) = outbox(10);
        tx.push(Bytes::from_static(b"queued")).unwrap();
        drop(rx);
        assert_eq!(tx.push(Bytes::from_static(b"x")), Err(PushError::Closed));
        assert_eq!(tx.queued_bytes(), 6);
    }

    #[tokio::test]
    async fn a_waiting_writer_wakes_for_a_frame_a_close_and_the_end() {
        let (tx, mut rx) = outbox(1024);
        let pushed = tx.clone();
        let push = tokio::spawn(async move {
            tokio::task::yield_now().await;
            pushed.push(Bytes::from_static(b"late")).unwrap();
        });
        assert!(matches!(rx.next().await, Next::Frame(f) if f == "late"));
        push.await.unwrap();
        let closer = tx.clone();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            closer.close(CloseCode::Normal, "bye");
        });
        assert!(matches!(rx.next().await, Next::Close(r) if r.reason == "bye"));
        let (tx, mut rx) = outbox(1024);
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            drop(tx);
        });
        assert!(matches!(rx.next().await, Next::Ended));
    }

    #[tokio::test]
    async fn ended_when_every_sender_is_gone() {
        let (tx, mut rx) = outbox(10);
        drop(tx);
        assert!(matches!(rx.next().await, Next::Ended));
    }
}
