//! The connection task: owns the WebSocket, applies what the server sends, writes what the
//! handles and the document observer queue, renews and expires awareness, and records how the
//! connection ended.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tandem_protocol::{AwarenessUpdate, CloseCode, Message, MessageReader, SyncMessage};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::updates::decoder::Decode;
use yrs::{Doc, Origin, ReadTxn, StateVector, Transact, Update};

use crate::awareness::Applied;
use crate::client::{Shared, REMOTE_ORIGIN};
use crate::error::{CloseInfo, CloseOrigin, Failure};

/// The socket type the client connects with.
type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Most frames written before one flush when the outbox holds a burst.
const MAX_BATCH: usize = 256;

/// What the handles and the observer ask the connection task to do, in order.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// Send this binary frame.
    Frame(Bytes),
    /// Send this binary frame, a sync update carrying a local edit: it is counted as sent.
    Update(Bytes),
    /// Send a close frame (1000) and finish.
    Close,
}

/// Runs the connection until it ends, then publishes how it ended.
pub(crate) async fn run(
    ws: Socket,
    doc: Doc,
    shared: Arc<Shared>,
    outbox: mpsc::Receiver<Outbound>,
    alive: oneshot::Receiver<()>,
) {
    let mut conn = Connection {
        ws,
        doc,
        shared,
        outbox,
        remote: Origin::from(REMOTE_ORIGIN),
        sent_updates: 0,
        sent_local: 0,
    };
    let info = conn.serve(alive).await;
    conn.finish(info);
}

/// One event the task reacts to.
enum Event {
    /// A WebSocket message, an error, or the end of the stream.
    Incoming(Option<Result<WsMessage, WsError>>),
    /// Something queued by a handle or the observer.
    Outbound(Option<Outbound>),
    /// The last handle was dropped.
    Dropped,
    /// A fault was recorded outside the task.
    Woken,
    /// Time to renew our awareness and expire stale remote states.
    Tick,
}

/// What to do after an event.
enum Next {
    /// Keep serving.
    Continue,
    /// Send a close frame with this code and reason, then finish.
    Close(CloseCode, String),
    /// The connection has ended.
    Ended(CloseInfo),
}

/// The task's state.
struct Connection {
    ws: Socket,
    doc: Doc,
    shared: Arc<Shared>,
    outbox: mpsc::Receiver<Outbound>,
    /// Origin of the transactions applying remote updates, so the observer skips them.
    remote: Origin,
    /// Sync step 2 and update messages written so far (mirrored in the status).
    sent_updates: u64,
    /// Of those, the local update frames taken from the outbox (mirrored in the status).
    sent_local: u64,
}

impl Connection {
    /// Serves events until the connection ends; returns how it ended.
    async fn serve(&mut self, mut alive: oneshot::Receiver<()>) -> CloseInfo {
        let timeout = self.shared.options.awareness_timeout;
        let mut tick = tokio::time::interval(timeout / 10);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                msg = self.ws.next() => Event::Incoming(msg),
                cmd = self.outbox.recv() => Event::Outbound(cmd),
                _ = &mut alive => Event::Dropped,
                () = self.shared.wake.notified() => Event::Woken,
                _ = tick.tick() => Event::Tick,
            };
            let next = match event {
                Event::Incoming(msg) => self.on_incoming(msg).await,
                Event::Outbound(cmd) => self.on_outbound(cmd).await,
                Event::Dropped => Next::Close(CloseCode::Normal, "client dropped".into()),
                Event::Woken => self.on_woken(),
                Event::Tick => self.on_tick().await,
            };
            match next {
                Next::Continue => {}
                Next::Close(code, reason) => return self.close(code, reason).await,
                Next::Ended(info) => return info,
            }
        }
    }

    /// Reacts to what the socket produced.
    async fn on_incoming(&mut self, msg: Option<Result<WsMessage, WsError>>) -> Next {
        match msg {
            Some(Ok(WsMessage::Binary(frame))) => self.on_frame(&frame).await,
            Some(Ok(WsMessage::Text(_))) => self.invalid("text frame".into()),
            Some(Ok(WsMessage::Close(frame))) => {
                let (code, reason) = match frame {
                    Some(f) => (u16::from(f.code), f.reason.to_string()),
                    None => (1005, String::new()),
                };
                tracing::debug!(
                    client_id = self.shared.client_id,
                    code,
                    reason,
                    "server closed"
                );
                // tungstenite answers the close frame on the next read; read to the end.
                self.drain().await;
                Next::Ended(CloseInfo {
                    code,
                    reason,
                    origin: CloseOrigin::Server,
                })
            }
            // tungstenite answers pings itself while reading.
            Some(Ok(_)) => Next::Continue,
            Some(Err(e)) => Next::Ended(lost(e.to_string())),
            None => Next::Ended(lost("connection ended without a close frame".into())),
        }
    }

    /// Handles every message of one binary frame, then sends the replies.
    async fn on_frame(&mut self, frame: &[u8]) -> Next {
        // Every reply but the step 2 answering a step 1 is awareness: only that one is counted.
        let mut replies: Vec<(Vec<u8>, bool)> = Vec::new();
        let mut changed = false;
        for item in MessageReader::new(frame) {
            let msg = match item {
                Ok(msg) => msg,
                Err(e) => return self.invalid(format!("malformed message: {e}")),
            };
            let handled = match msg {
                Message::Sync(SyncMessage::Step1(sv)) => self.answer_step1(sv).await.map(|reply| {
                    replies.push((reply, true));
                }),
                Message::Sync(SyncMessage::Step2(update)) => {
                    self.apply_update(update).await.map(|()| {
                        self.shared.status.send_modify(|s| s.synced = true);
                    })
                }
                Message::Sync(SyncMessage::Update(update)) => {
                    self.apply_update(update).await.map(|()| changed = true)
                }
                Message::Awareness(payload) => self.apply_awareness(payload).map(|reply| {
                    replies.extend(reply.map(|r| (r, false)));
                    changed = true;
                }),
                Message::QueryAwareness => {
                    let payload = self.shared.awareness().encode_states();
                    replies.push((Message::Awareness(&payload).to_frame(), false));
                    Ok(())
                }
                Message::Stored(n) => self.on_stored(n),
                Message::AckRequest => {
                    Err("an acknowledgement request from the server".to_string())
                }
                Message::AuthDenied(reason) => {
                    // The server closes the socket itself; keep reading for its close code.
                    tracing::warn!(
                        client_id = self.shared.client_id,
                        reason,
                        "permission denied"
                    );
                    self.shared
                        .fail(Failure::PermissionDenied(reason.to_owned()));
                    Ok(())
                }
            };
            if let Err(reason) = handled {
                return self.invalid(reason);
            }
        }
        if changed {
            self.shared.changed();
        }
        let counted = replies.iter().any(|(_, is_update)| *is_update);
        for (reply, is_update) in replies {
            // Counted before it can reach the server, so its acknowledgement never finds the
            // count behind.
            self.sent_updates += u64::from(is_update);
            if let Err(e) = self.ws.feed(WsMessage::Binary(Bytes::from(reply))).await {
                return Next::Ended(lost(e.to_string()));
            }
        }
        if counted {
            self.publish_counts();
        }
        match self.ws.flush().await {
            Ok(()) => Next::Continue,
            Err(e) => Next::Ended(lost(e.to_string())),
        }
    }

    /// Records a storage acknowledgement: the first `n` update messages we sent are stored.
    /// Acknowledgements are cumulative; one below the highest seen changes nothing. One for more
    /// than we sent is invalid data.
    fn on_stored(&self, n: u64) -> Result<(), String> {
        if n > self.sent_updates {
            return Err(format!(
                "acknowledged {n} update messages, only {} were sent",
                self.sent_updates
            ));
        }
        self.shared.status.send_if_modified(|s| {
            let news = n > s.stored;
            if news {
                s.stored = n;
            }
            news
        });
        Ok(())
    }

    /// Publishes the send counters to the status, waking `wait_stored` calls.
    fn publish_counts(&self) {
        let (sent_updates, sent_local) = (self.sent_updates, self.sent_local);
        self.shared.status.send_if_modified(|s| {
            let news = (s.sent_updates, s.sent_local) != (sent_updates, sent_local);
            s.sent_updates = sent_updates;
            s.sent_local = sent_local;
            news
        });
    }

    /// The step 2 answering the server's step 1: everything we have that its state vector lacks.
    async fn answer_step1(&self, state_vector: &[u8]) -> Result<Vec<u8>, String> {
        let sv = StateVector::decode_v1(state_vector)
            .map_err(|e| format!("state vector does not decode: {e}"))?;
        // Blocking acquisition on purpose: an async acquisition reserves the lock from a future
        // that may not be polled while another thread blocks on the same document (a user's
        // `transact_mut` from async code), which can deadlock both.
        let txn = self.doc.transact();
        let diff = txn.encode_diff_v1(&sv);
        Ok(Message::Sync(SyncMessage::Step2(&diff)).to_frame())
    }

    /// Applies a v1 update from the server in a transaction the update observer skips.
    async fn apply_update(&self, update: &[u8]) -> Result<(), String> {
        let update =
            Update::decode_v1(update).map_err(|e| format!("update does not decode: {e}"))?;
        let mut txn = self.doc.transact_mut_with(self.remote.clone());
        txn.apply_update(update)
            .map_err(|e| format!("update does not apply: {e}"))
    }

    /// Merges an awareness update into the map. Returns a frame re-announcing our state if a peer
    /// tried to remove it. A state that is valid JSON but does not fit a `serde_json::Value`
    /// (nested deeper than 128) is skipped with a warning rather than closing the connection.
    fn apply_awareness(&self, payload: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let update =
            AwarenessUpdate::decode(payload).map_err(|e| format!("awareness update: {e}"))?;
        let now = Instant::now().into_std();
        let mut map = self.shared.awareness();
        let mut reassert = false;
        for entry in &update.entries {
            let state = if entry.is_removal() {
                None
            } else {
                match serde_json::from_str::<Value>(entry.state) {
                    Ok(state) => Some(state),
                    Err(e) => {
                        tracing::warn!(client = entry.client_id, error = %e, "awareness state skipped");
                        continue;
                    }
                }
            };
            reassert |=
                map.apply(entry.client_id, entry.clock, state, now) == Applied::LocalReasserted;
        }
        Ok(reassert
            .then(|| {
                map.encode_local()
                    .map(|p| Message::Awareness(&p).to_frame())
            })
            .flatten())
    }

    /// Writes what was queued, coalescing a burst into one flush.
    async fn on_outbound(&mut self, cmd: Option<Outbound>) -> Next {
        let mut next = match cmd {
            Some(Outbound::Close) => return Next::Close(CloseCode::Normal, "client closed".into()),
            Some(outbound) => outbound,
            // The sender lives in `Shared`, which this task holds; treat it as a drop anyway.
            None => return Next::Close(CloseCode::Normal, "client dropped".into()),
        };
        let mut then = Next::Continue;
        let mut counted = false;
        let mut fed = 0;
        loop {
            let frame = match next {
                Outbound::Frame(frame) => frame,
                Outbound::Update(frame) => {
                    // Counted before it can reach the server (see `on_frame`).
                    self.sent_updates += 1;
                    self.sent_local += 1;
                    counted = true;
                    frame
                }
                Outbound::Close => {
                    then = Next::Close(CloseCode::Normal, "client closed".into());
                    break;
                }
            };
            if let Err(e) = self.ws.feed(WsMessage::Binary(frame)).await {
                return Next::Ended(lost(e.to_string()));
            }
            fed += 1;
            // Take the next item only when it will be written in this batch: one taken and
            // then left behind would be lost.
            if fed == MAX_BATCH {
                break;
            }
            next = match self.outbox.try_recv() {
                Ok(outbound) => outbound,
                Err(_) => break,
            };
        }
        if counted {
            self.publish_counts();
        }
        match self.ws.flush().await {
            Ok(()) => then,
            Err(e) => Next::Ended(lost(e.to_string())),
        }
    }

    /// A fault was recorded by the observer or a handle: close if it calls for it.
    fn on_woken(&self) -> Next {
        let failure = self.shared.status.borrow().failure.clone();
        match failure {
            Some(Failure::OutboxFull { .. }) => {
                Next::Close(CloseCode::InternalError, "client outbox full".into())
            }
            // Permission denied: the server closes. Invalid data closes where it is detected.
            _ => Next::Continue,
        }
    }

    /// Renews our awareness state when due and drops remote states that were not renewed.
    async fn on_tick(&mut self) -> Next {
        let timeout = self.shared.options.awareness_timeout;
        let now = Instant::now().into_std();
        let (renewal, expired) = {
            let mut map = self.shared.awareness();
            let renewal = if map.renewal_due(now, timeout) {
                let state = map.local_state().cloned();
                map.set_local(state, now);
                map.encode_local()
            } else {
                None
            };
            (renewal, map.expire(now, timeout))
        };
        if !expired.is_empty() {
            tracing::debug!(
                client_id = self.shared.client_id,
                ?expired,
                "awareness expired"
            );
            self.shared.changed();
        }
        if let Some(payload) = renewal {
            let frame = Bytes::from(Message::Awareness(&payload).to_frame());
            if let Err(e) = self.ws.send(WsMessage::Binary(frame)).await {
                return Next::Ended(lost(e.to_string()));
            }
        }
        Next::Continue
    }

    /// Records invalid data from the server and asks to close with 1007.
    fn invalid(&self, reason: String) -> Next {
        tracing::error!(
            client_id = self.shared.client_id,
            reason,
            "invalid data from server"
        );
        self.shared.fail(Failure::InvalidData(reason));
        Next::Close(
            CloseCode::InvalidData,
            CloseCode::InvalidData.reason().into(),
        )
    }

    /// Sends a close frame and waits (bounded) for the server's answer and the end of the stream.
    async fn close(&mut self, code: CloseCode, reason: String) -> CloseInfo {
        let frame = CloseFrame {
            code: WsCloseCode::from(code.code()),
            reason: reason.as_str().into(),
        };
        match self.ws.close(Some(frame)).await {
            Ok(()) => self.drain().await,
            Err(e) => {
                tracing::debug!(client_id = self.shared.client_id, error = %e, "close frame not sent")
            }
        }
        CloseInfo {
            code: code.code(),
            reason,
            origin: CloseOrigin::Client,
        }
    }

    /// Reads until the stream ends, at most for the close timeout, so that the closing handshake
    /// completes (tungstenite writes the answer to a close frame while reading).
    async fn drain(&mut self) {
        let limit: Duration = self.shared.options.close_timeout;
        let read_to_end = async { while let Some(Ok(_)) = self.ws.next().await {} };
        if tokio::time::timeout(limit, read_to_end).await.is_err() {
            tracing::debug!(
                client_id = self.shared.client_id,
                "server did not finish closing"
            );
        }
    }

    /// Publishes the end: remote awareness states are gone with the connection. The update
    /// observer stays: it keeps counting local edits (which find the outbox closed), so that
    /// `wait_stored` reports an edit made after the end as not stored instead of overlooking it.
    fn finish(self, info: CloseInfo) {
        tracing::debug!(client_id = self.shared.client_id, %info, "connection ended");
        self.shared.awareness().clear_remote();
        self.shared.status.send_modify(|s| s.closed = Some(info));
    }
}

/// A connection that broke without a close frame.
fn lost(reason: String) -> CloseInfo {
    CloseInfo {
        code: 1006,
        reason,
        origin: CloseOrigin::Lost,
    }
}
