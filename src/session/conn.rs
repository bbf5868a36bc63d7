//! The connection task: join, read and check frames, write the outbox, leave.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tandem_protocol::{AwarenessUpdate, CloseCode, Message, MessageReader, SyncMessage};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tracing::{debug, info, warn, Instrument};

use super::limits::{AddressSlot, TokenBucket};
use super::outbox::{outbox, Next, Outbox, OutboxReceiver};
use crate::auth::{Access, Grant};
use crate::doc::{check_state_vector, DecodedUpdate};
use crate::http::upgrade::Socket as WebSocket;
use crate::hub::Hub;
use crate::ids::{ConnId, RoomId};
use crate::metrics::{Refused, METRICS};
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
    /// Socket read buffer: the most one read takes, kept by every connection while it is idle
    /// (tungstenite's default of 128 KiB is a trap at 100k connections). Client messages are
    /// mostly small; a larger one takes several reads.
    pub read_buffer_bytes: usize,
    /// Bytes buffered before a write reaches the socket; frames are coalesced up to this.
    pub write_buffer_bytes: usize,
    /// Most frames coalesced into one flush.
    pub max_coalesce_frames: usize,
    /// How long a close frame may take to leave before the socket is simply dropped.
    pub close_timeout: Duration,
    /// Time allowed between the upgrade and the first valid message (1008 after it).
    pub first_message_timeout: Duration,
    /// A connection that sends nothing for this long is closed (1001); `None`: never.
    pub idle_timeout: Option<Duration>,
    /// WebSocket messages a connection may send per second (4429 beyond); 0: unlimited.
    pub rate_messages: u64,
    /// Bytes a connection may send per second (4429 beyond); 0: unlimited. The bucket holds at
    /// least one message of the maximum size.
    pub rate_bytes: u64,
    /// Connections open at once from one client address (1013 beyond); 0: unlimited.
    pub max_connections_per_address: usize,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 << 20,
            outbox_bytes: 32 << 20,
            ping_interval: Duration::from_secs(30),
            read_buffer_bytes: 1 << 10,
            write_buffer_bytes: 16 << 10,
            max_coalesce_frames: 256,
            close_timeout: Duration::from_secs(1),
            first_message_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(15 * 60)),
            rate_messages: 500,
            rate_bytes: 16 << 20,
            max_connections_per_address: 1024,
        }
    }
}

/// Who connects where, and what the upgrade decided about them.
pub struct Admission {
    /// The room the connection joins.
    pub room: RoomId,
    /// The client's address.
    pub peer: SocketAddr,
    /// What the connection may do, or why it is refused.
    pub verdict: Result<Grant, Refusal>,
    /// Whether read-only connections may publish presence.
    pub readonly_awareness: bool,
    /// The connection's place in the per-address count, held while it is open.
    pub slot: Option<AddressSlot>,
}

/// A connection refused at the door: told why (auth refusals also with the y-websocket
/// "permission denied" message, which stock providers log) and closed.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The close code.
    pub code: CloseCode,
    /// The close reason.
    pub reason: String,
    /// Whether to send the y-websocket permission-denied message first.
    pub auth_message: bool,
    /// The metric label.
    pub metric: Refused,
}

/// Serves one upgraded socket until it closes.
///
/// The socket comes boxed: every async function it passes through keeps a slot for its
/// arguments for as long as it runs, so a socket moved by value would take its size (about
/// 370 bytes) once per level in every idle connection's task.
pub async fn serve(
    socket: Box<WebSocket>,
    hub: Hub,
    settings: Arc<SessionSettings>,
    admission: Admission,
) {
    let conn = ConnId::next();
    let user = admission
        .verdict
        .as_ref()
        .map_or("-", |g| g.user.as_str())
        .to_string();
    let span = tracing::info_span!("conn", conn = %conn, room = %admission.room, peer = %admission.peer, user = %user);
    async move {
        match admission.verdict {
            Ok(grant) => {
                let perms = Permissions {
                    write: grant.access == Access::ReadWrite,
                    awareness: grant.access == Access::ReadWrite || admission.readonly_awareness,
                };
                run(socket, hub, settings, admission.room, conn, perms).await;
            }
            // Boxed: the rare path must not size every connection's task.
            Err(refusal) => Box::pin(refuse(socket, &settings, refusal)).await,
        }
        drop(admission.slot);
    }
    .instrument(span)
    .await;
}

/// Tells a refused client why and closes.
async fn refuse(socket: Box<WebSocket>, settings: &SessionSettings, refusal: Refusal) {
    let mut socket = *socket;
    info!(code = refusal.code.code(), reason = %refusal.reason, "connection refused");
    METRICS.closes.inc(refusal.code);
    METRICS.refused.inc(refusal.metric);
    let _ = tokio::time::timeout(settings.close_timeout, async {
        if refusal.auth_message {
            let frame = Message::AuthDenied(&refusal.reason).to_frame();
            socket.send(WsMessage::Binary(frame.into())).await?;
        }
        socket
            .send(WsMessage::Close(Some(CloseFrame {
                code: refusal.code.code().into(),
                reason: clip_reason(&refusal.reason).into(),
            })))
            .await?;
        // Wait briefly for the client's close so the reason is not lost to a reset.
        while let Some(Ok(msg)) = socket.next().await {
            if matches!(msg, WsMessage::Close(_)) {
                break;
            }
        }
        Ok::<_, WsError>(())
    })
    .await;
}

/// What an admitted connection may send.
#[derive(Debug, Clone, Copy)]
struct Permissions {
    /// Document updates are applied (else dropped and counted).
    write: bool,
    /// Awareness updates are relayed (else dropped and counted).
    awareness: bool,
}

async fn run(
    socket: Box<WebSocket>,
    hub: Hub,
    settings: Arc<SessionSettings>,
    room: RoomId,
    conn: ConnId,
    perms: Permissions,
) {
    METRICS.connections_opened.inc();
    METRICS.connections_open.inc();
    let (sink, mut stream) = (*socket).split();
    let (out, out_rx) = outbox(settings.outbox_bytes);
    let seen = Arc::new(AtomicBool::new(true));
    let writer = tokio::spawn(write_loop(sink, out_rx, settings.clone(), seen.clone()));

    // Boxed: joining takes more state than waiting for messages, for a moment only.
    match Box::pin(hub.join(&room, conn, out.clone())).await {
        Ok(membership) => {
            debug!("joined");
            let reader = Reader {
                room: membership.handle(),
                out: &out,
                conn,
                seen: &seen,
                settings: &settings,
                perms,
            };
            reader.run(&mut stream).await;
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
                JoinError::Full => (CloseCode::TryAgainLater, "room is full"),
                JoinError::TooManyRooms => {
                    (CloseCode::TryAgainLater, "server has too many rooms open")
                }
            };
            warn!(error = %e, "join refused");
            METRICS.closes.inc(code);
            match e {
                JoinError::Full => METRICS.refused.inc(Refused::RoomFull),
                JoinError::TooManyRooms => METRICS.refused.inc(Refused::TooManyRooms),
                _ => {}
            }
            out.close(code, reason);
        }
    }
    // Refused for something it sent: it may still be sending, and its bytes go unread.
    let refused = out
        .close_request()
        .is_some_and(|r| r.code != CloseCode::Normal);
    out.close(CloseCode::Normal, "");
    drop(out);
    // Keep reading while the writer sends the close frame, until the client answers it: a
    // socket closed with unread bytes in it is reset, and the client would never see why it
    // was closed (a bot flooding past its rate limit, say).
    let drain = async {
        loop {
            match stream.next().await {
                Some(Ok(WsMessage::Close(_))) => break,
                Some(Ok(_)) => {}
                end => {
                    // The stream cannot go on (after an oversize frame, say, whose bytes stay
                    // unread). Dropping a socket with unread bytes makes the kernel reset it,
                    // which can destroy our close frame before the client reads it: give a
                    // refused client a moment to read it first.
                    if refused || end.is_some() {
                        tokio::time::sleep(settings.close_timeout).await;
                    }
                    break;
                }
            }
        }
    };
    let (_, _) = tokio::join!(
        writer,
        tokio::time::timeout(settings.close_timeout * 2, drain)
    );
    METRICS.connections_open.dec();
    debug!("closed");
}

/// The reading half of an admitted connection.
struct Reader<'a> {
    room: &'a RoomHandle,
    out: &'a Outbox,
    conn: ConnId,
    seen: &'a AtomicBool,
    settings: &'a SessionSettings,
    perms: Permissions,
}

impl Reader<'_> {
    /// Reads frames until the client goes, breaks the protocol or a limit, or the server asks
    /// to close.
    async fn run<S>(self, stream: &mut S)
    where
        S: Stream<Item = Result<WsMessage, WsError>> + Unpin,
    {
        let s = self.settings;
        let mut messages = TokenBucket::new(s.rate_messages, s.rate_messages.saturating_mul(2));
        let mut bytes =
            TokenBucket::new(s.rate_bytes, (s.max_message_bytes as u64).max(s.rate_bytes));
        // One timer: first the deadline for a first valid message, then the idle check, which
        // re-arms itself from the last frame instead of being reset on every frame.
        let timer = tokio::time::sleep(s.first_message_timeout);
        tokio::pin!(timer);
        let mut admitted = false;
        let mut last_frame = Instant::now();
        loop {
            let msg = tokio::select! {
                msg = stream.next() => msg,
                () = self.out.closed() => return,
                () = &mut timer => {
                    let refusal = if !admitted {
                        Some((Refused::FirstMessageTimeout, CloseCode::Policy, format!(
                            "no valid message within {:?} of connecting", s.first_message_timeout)))
                    } else {
                        match s.idle_timeout {
                            Some(idle) if last_frame + idle <= Instant::now() => Some((
                                Refused::IdleTimeout, CloseCode::GoingAway,
                                format!("idle for {idle:?}"))),
                            Some(idle) => {
                                timer.as_mut().reset(last_frame + idle);
                                None
                            }
                            None => {
                                timer.as_mut().reset(far_future());
                                None
                            }
                        }
                    };
                    match refusal {
                        Some((metric, code, reason)) => {
                            METRICS.refused.inc(metric);
                            self.close(code, reason);
                            return;
                        }
                        None => continue,
                    }
                }
            };
            self.seen.store(true, Ordering::Relaxed);
            let refusal = match msg {
                None => return,
                Some(Ok(WsMessage::Binary(frame))) => {
                    METRICS.frames_in.inc();
                    METRICS.bytes_in.add(frame.len() as u64);
                    last_frame = Instant::now();
                    if !messages.take(1, last_frame) {
                        METRICS.refused.inc(Refused::RateLimit);
                        (
                            CloseCode::RateLimited,
                            format!("more than {} messages per second", s.rate_messages),
                        )
                    } else if !bytes.take(frame.len() as u64, last_frame) {
                        METRICS.refused.inc(Refused::RateLimit);
                        (
                            CloseCode::RateLimited,
                            format!("more than {} bytes per second", s.rate_bytes),
                        )
                    } else {
                        // Boxed: its state (about 800 bytes) would otherwise sit in every
                        // idle connection's task, which waits for the next message here.
                        let handled =
                            Box::pin(handle_frame(frame, self.room, self.conn, self.perms)).await;
                        match handled {
                            Ok(()) => {
                                if !admitted {
                                    admitted = true;
                                    timer.as_mut().reset(match s.idle_timeout {
                                        Some(idle) => last_frame + idle,
                                        None => far_future(),
                                    });
                                }
                                continue;
                            }
                            Err(FrameError::RoomGone) => {
                                (CloseCode::Restarting, "room restarting".to_string())
                            }
                            Err(FrameError::Refused(code, reason)) => (code, reason),
                        }
                    }
                }
                Some(Ok(WsMessage::Text(_))) => (
                    CloseCode::InvalidData,
                    "text frames are not part of the protocol".to_string(),
                ),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => continue,
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
            self.close(code, reason);
            return;
        }
    }

    fn close(&self, code: CloseCode, reason: String) {
        info!(code = code.code(), reason = %reason, "closing connection");
        if code != CloseCode::Restarting {
            METRICS.closes.inc(code);
        }
        self.out.close(code, reason);
    }
}

/// A deadline that never comes in practice (a year away).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

/// Maps a socket read error to a refusal, or `None` when the socket is simply gone.
fn classify(e: &WsError) -> Option<(CloseCode, String)> {
    use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => Some((
            CloseCode::TooBig,
            format!("message of {size} bytes exceeds the {max_size}-byte limit"),
        )),
        WsError::Capacity(c) => Some((CloseCode::TooBig, c.to_string())),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(p) => Some((CloseCode::ProtocolError, p.to_string())),
        WsError::Utf8(_) => Some((CloseCode::InvalidData, "invalid UTF-8".to_string())),
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
async fn handle_frame(
    frame: Bytes,
    room: &RoomHandle,
    conn: ConnId,
    perms: Permissions,
) -> Result<(), FrameError> {
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
            Message::Sync(SyncMessage::Step2(_) | SyncMessage::Update(_)) if !perms.write => {
                METRICS.readonly_writes_dropped.inc();
                debug!("dropped a document update from a read-only connection");
                continue;
            }
            Message::Sync(SyncMessage::Step2(u) | SyncMessage::Update(u)) => {
                let update = DecodedUpdate::decode(frame.slice_ref(u))
                    .map_err(|e| FrameError::Refused(CloseCode::InvalidData, e.to_string()))?;
                RoomCommand::Update { conn, update }
            }
            Message::Awareness(_) if !perms.awareness => {
                METRICS.readonly_writes_dropped.inc();
                debug!("dropped an awareness update from a read-only connection");
                continue;
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
            // Nothing a read-only connection sends is stored, so nothing is acknowledged.
            Message::AckRequest if !perms.write => continue,
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
    S: Sink<WsMessage, Error = WsError> + Unpin,
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
            code: code.code().into(),
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
) -> Result<(), WsError>
where
    S: Sink<WsMessage, Error = WsError> + Unpin,
{
    let mut frame = Some(first);
    let (mut frames, mut bytes) = (0, 0);
    while let Some(f) = frame.take() {
        let len = f.len();
        feed_fragmented(sink, f).await?;
        rx.written(len);
        frames += 1;
        bytes += len as u64;
        if frames < max {
            frame = rx.try_next_frame();
        }
    }
    METRICS.frames_out.add(frames as u64);
    METRICS.bytes_out.add(bytes);
    sink.flush().await
}

/// Messages larger than this leave in fragments of this size. tungstenite formats each frame
/// whole into the connection's write buffer and keeps the buffer's capacity: one frame per
/// message would leave every connection that was once sent a large document holding a buffer
/// that large.
const FRAGMENT_BYTES: usize = 16 << 10;

/// Feeds one binary message, in fragments if it is large.
async fn feed_fragmented<S>(sink: &mut S, message: Bytes) -> Result<(), WsError>
where
    S: Sink<WsMessage, Error = WsError> + Unpin,
{
    if message.len() <= FRAGMENT_BYTES {
        return sink.feed(WsMessage::Binary(message)).await;
    }
    let mut rest = message;
    let mut opcode = OpCode::Data(Data::Binary);
    while !rest.is_empty() {
        let part = rest.split_to(rest.len().min(FRAGMENT_BYTES));
        let last = rest.is_empty();
        sink.feed(WsMessage::Frame(Frame::message(part, opcode, last)))
            .await?;
        opcode = OpCode::Data(Data::Continue);
    }
    Ok(())
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
