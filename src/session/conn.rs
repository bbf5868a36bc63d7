//! The connection task: join, read and check frames, write the outbox, leave.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tandem_protocol::{AwarenessUpdate, CloseCode, Message, MessageReader, SyncMessage};
use tracing::{debug, info, warn, Instrument};

use super::outbox::{outbox, Next, Outbox, OutboxReceiver};
use crate::doc::{check_state_vector, DecodedUpdate};
use crate::hub::Hub;
use crate::ids::{ConnId, RoomId};
use crate::metrics::METRICS;
use crate::room::{JoinError, RoomCommand, RoomHandle};

/// Per-connection limits and timings.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Largest WebSocket message accepted; larger ones close the connection with 1009.
    pub max_message_bytes: usize,
    /// Bytes that may wait in a connection's outbox before it is closed with 1013.
    pub outbox_bytes: usize,
    /// How often the server pings; a connection silent for a whole interval is closed.
    pub ping_interval: Duration,
    /// Socket read buffer (tungstenite's default of 128 KiB is a trap at 100k connections).
    pub read_buffer_bytes: usize,
    /// Bytes buffered before a write reaches the socket; frames are coalesced up to this.
    pub write_buffer_bytes: usize,
    /// Most frames coalesced into one flush.
    pub max_coalesce_frames: usize,
    /// How long a close frame may take to leave before the socket is simply dropped.
    pub close_timeout: Duration,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 << 20,
            outbox_bytes: 32 << 20,
            ping_interval: Duration::from_secs(30),
            read_buffer_bytes: 4 << 10,
            write_buffer_bytes: 16 << 10,
            max_coalesce_frames: 256,
            close_timeout: Duration::from_secs(1),
        }
    }
}

/// Serves one upgraded socket until it closes.
pub async fn serve(
    socket: WebSocket,
    hub: Hub,
    settings: Arc<SessionSettings>,
    room: RoomId,
    peer: SocketAddr,
) {
    let conn = ConnId::next();
    let span = tracing::info_span!("conn", conn = %conn, room = %room, peer = %peer);
    run(socket, hub, settings, room, conn)
        .instrument(span)
        .await;
}

async fn run(
    socket: WebSocket,
    hub: Hub,
    settings: Arc<SessionSettings>,
    room: RoomId,
    conn: ConnId,
) {
    METRICS.connections_opened.inc();
    METRICS.connections_open.inc();
    let (sink, stream) = socket.split();
    let (out, out_rx) = outbox(settings.outbox_bytes);
    let seen = Arc::new(AtomicBool::new(true));
    let writer = tokio::spawn(write_loop(sink, out_rx, settings.clone(), seen.clone()));

    match hub.join(&room, conn, out.clone()).await {
        Ok(membership) => {
            debug!("joined");
            read_loop(stream, membership.handle(), &out, conn, &seen).await;
            drop(membership);
        }
        Err(e) => {
            let (code, reason) = match e {
                JoinError::ShuttingDown => (CloseCode::Restarting, "server restarting"),
                JoinError::LoadFailed => (
                    CloseCode::TryAgainLater,
                    "document could not be loaded, try again",
                ),
                JoinError::Unloading => (CloseCode::TryAgainLater, "room busy, try again"),
            };
            warn!(error = %e, "join refused");
            METRICS.closes.inc(code);
            out.close(code, reason);
        }
    }
    out.close(CloseCode::Normal, "");
    drop(out);
    let _ = writer.await;
    METRICS.connections_open.dec();
    debug!("closed");
}

/// Reads frames until the client goes, breaks the protocol, or the server asks to close.
async fn read_loop<S>(
    mut stream: S,
    room: &RoomHandle,
    out: &Outbox,
    conn: ConnId,
    seen: &AtomicBool,
) where
    S: Stream<Item = Result<WsMessage, axum::Error>> + Unpin,
{
    loop {
        let msg = tokio::select! {
            msg = stream.next() => msg,
            () = out.closed() => return,
        };
        seen.store(true, Ordering::Relaxed);
        let refusal = match msg {
            None => return,
            Some(Ok(WsMessage::Binary(frame))) => {
                METRICS.frames_in.inc();
                METRICS.bytes_in.add(frame.len() as u64);
                match handle_frame(frame, room, conn).await {
                    Ok(()) => continue,
                    Err(FrameError::RoomGone) => {
                        (CloseCode::Restarting, "room restarting".to_string())
                    }
                    Err(FrameError::Refused(code, reason)) => (code, reason),
                }
            }
            Some(Ok(WsMessage::Text(_))) => (
                CloseCode::InvalidData,
                "text frames are not part of the protocol".to_string(),
            ),
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
            Some(Ok(WsMessage::Close(_))) => return,
            Some(Err(e)) => match classify(&e) {
                Some(refusal) => refusal,
                None => {
                    debug!(error = %e, "socket error");
                    return;
                }
            },
        };
        let (code, reason) = refusal;
        info!(code = code.code(), reason = %reason, "closing connection");
        if code != CloseCode::Restarting {
            METRICS.closes.inc(code);
        }
        out.close(code, reason);
        return;
    }
}

/// Maps a socket read error to a refusal, or `None` when the socket is simply gone.
fn classify(e: &axum::Error) -> Option<(CloseCode, String)> {
    use std::error::Error as _;
    use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
    match e.source().and_then(|s| s.downcast_ref::<WsError>()) {
        Some(WsError::Capacity(CapacityError::MessageTooLong { size, max_size })) => Some((
            CloseCode::TooBig,
            format!("message of {size} bytes exceeds the {max_size}-byte limit"),
        )),
        Some(WsError::Capacity(c)) => Some((CloseCode::TooBig, c.to_string())),
        Some(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => None,
        Some(WsError::Protocol(p)) => Some((CloseCode::ProtocolError, p.to_string())),
        Some(WsError::Utf8(_)) => Some((CloseCode::InvalidData, "invalid UTF-8".to_string())),
        _ => None,
    }
}

/// Why a frame was not accepted.
enum FrameError {
    Refused(CloseCode, String),
    RoomGone,
}

impl From<crate::room::RoomGone> for FrameError {
    fn from(_: crate::room::RoomGone) -> Self {
        FrameError::RoomGone
    }
}

/// Checks each message of a frame and hands it to the room. Nothing of a message that fails its
/// check reaches the room; messages before it in the same frame already did.
async fn handle_frame(frame: Bytes, room: &RoomHandle, conn: ConnId) -> Result<(), FrameError> {
    let mut reader = MessageReader::new(&frame);
    while let Some(next) = reader.next_raw() {
        let (msg, raw) = next.map_err(|e| {
            FrameError::Refused(CloseCode::InvalidData, format!("malformed message: {e}"))
        })?;
        let cmd = match msg {
            Message::Sync(SyncMessage::Step1(sv)) => {
                check_state_vector(sv)
                    .map_err(|e| FrameError::Refused(CloseCode::InvalidData, e.to_string()))?;
                RoomCommand::SyncStep1 {
                    conn,
                    state_vector: frame.slice_ref(sv),
                }
            }
            Message::Sync(SyncMessage::Step2(u) | SyncMessage::Update(u)) => {
                let update = DecodedUpdate::decode(frame.slice_ref(u))
                    .map_err(|e| FrameError::Refused(CloseCode::InvalidData, e.to_string()))?;
                RoomCommand::Update { conn, update }
            }
            Message::Awareness(payload) => {
                AwarenessUpdate::decode(payload).map_err(|e| {
                    FrameError::Refused(CloseCode::InvalidData, format!("malformed awareness: {e}"))
                })?;
                RoomCommand::Awareness {
                    conn,
                    message: frame.slice_ref(raw),
                    payload: frame.slice_ref(payload),
                }
            }
            Message::QueryAwareness => RoomCommand::QueryAwareness { conn },
            Message::AckRequest => RoomCommand::AckRequest { conn },
            Message::Stored(_) => {
                return Err(FrameError::Refused(
                    CloseCode::InvalidData,
                    "acknowledgements only go from server to client".to_string(),
                ))
            }
            Message::AuthDenied(_) => {
                return Err(FrameError::Refused(
                    CloseCode::InvalidData,
                    "auth messages only go from server to client".to_string(),
                ))
            }
        };
        room.send(cmd).await?;
    }
    Ok(())
}

/// Writes the outbox to the socket, coalescing queued frames into one flush, and pings.
async fn write_loop<S>(
    mut sink: S,
    mut rx: OutboxReceiver,
    settings: Arc<SessionSettings>,
    seen: Arc<AtomicBool>,
) where
    S: Sink<WsMessage, Error = axum::Error> + Unpin,
{
    let close_signal = rx.close_signal();
    let mut ping = tokio::time::interval(settings.ping_interval);
    ping.tick().await;
    let close = loop {
        let next = tokio::select! {
            next = rx.next() => next,
            _ = ping.tick() => {
                if !seen.swap(false, Ordering::Relaxed) {
                    break Some((CloseCode::GoingAway, "ping timeout".into()));
                }
                if sink.send(WsMessage::Ping(Bytes::new())).await.is_err() {
                    break None;
                }
                continue;
            }
        };
        match next {
            Next::Frame(first) => {
                // A blocked socket (a reader that stopped reading) must not keep a close waiting.
                let written = tokio::select! {
                    r = write_batch(&mut sink, &mut rx, first, settings.max_coalesce_frames) => r,
                    req = close_signal.requested() => break Some((req.code, req.reason)),
                };
                if written.is_err() {
                    break None;
                }
            }
            Next::Close(req) => break Some((req.code, req.reason)),
            Next::Ended => break None,
        }
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code: code.code(),
            reason: clip_reason(&reason).into(),
        };
        let _ = tokio::time::timeout(settings.close_timeout, async {
            let _ = sink.send(WsMessage::Close(Some(frame))).await;
            let _ = sink.close().await;
        })
        .await;
    }
}

/// A close reason must fit in 123 bytes; cut at a character boundary.
fn clip_reason(reason: &str) -> &str {
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

/// Feeds `first` and whatever else is already queued, then flushes once.
async fn write_batch<S>(
    sink: &mut S,
    rx: &mut OutboxReceiver,
    first: Bytes,
    max: usize,
) -> Result<(), axum::Error>
where
    S: Sink<WsMessage, Error = axum::Error> + Unpin,
{
    let mut frame = Some(first);
    let mut n = 0;
    while let Some(f) = frame.take() {
        let len = f.len();
        sink.feed(WsMessage::Binary(f)).await?;
        rx.written(len);
        METRICS.frames_out.inc();
        METRICS.bytes_out.add(len as u64);
        n += 1;
        if n < max {
            frame = rx.try_next_frame();
        }
    }
    sink.flush().await
}

#[cfg(test)]
mod tests {
    use super::clip_reason;

    #[test]
    fn close_reasons_are_clipped_to_123_bytes_on_a_char_boundary() {
        assert_eq!(clip_reason("short"), "short");
        let long = "é".repeat(100);
        let clipped = clip_reason(&long);
        assert!(clipped.len() <= 123);
        assert_eq!(clipped.len(), 122);
    }
}
