//! The connection task: join, read and check frames, write the outbox, leave; one task per
//! connection, polling its socket for both directions.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tandem_protocol::{AwarenessUpdate, CloseCode, Message, MessageReader, SyncMessage};
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn, Instrument};

use super::limits::{AddressSlot, TokenBucket};
use super::outbox::{outbox, Outbox, OutboxReceiver, Signal};
use crate::auth::{Access, Grant};
use crate::doc::{check_state_vector, DecodedUpdate};
use crate::hub::Hub;
use crate::ids::{ConnId, RoomId};
use crate::metrics::{Refused, METRICS};
use crate::room::{JoinError, RoomCommand, RoomHandle};
use crate::ws::{Incoming, ReadError, SocketError, Written, WsReader, WsSocket};

/// Per-connection limits and timings.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Largest WebSocket message accepted; larger ones close the connection with 1009.
    pub max_message_bytes: usize,
    /// Bytes that may wait in a connection's outbox before it is closed with 1013.
    pub outbox_bytes: usize,
    /// How often the server pings; a connection silent for a whole interval is closed.
    pub ping_interval: Duration,
    /// Queued frames are coalesced into one write of about this many bytes.
    pub write_buffer_bytes: usize,
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
            write_buffer_bytes: 16 << 10,
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
/// A plain function that returns the connection's future, which captures only what it needs:
/// an async function keeps its arguments in its future for as long as it runs, even after
/// they were moved on, and every idle connection's task is that future.
pub fn serve(
    socket: Box<WsSocket>,
    hub: Hub,
    settings: Arc<SessionSettings>,
    admission: Admission,
) -> impl Future<Output = ()> + Send {
    let conn = ConnId::next();
    let Admission {
        room,
        peer,
        verdict,
        readonly_awareness,
        slot,
    } = admission;
    let user = verdict.as_ref().map_or("-", |g| g.user.as_str());
    let span = tracing::info_span!("conn", conn = %conn, room = %room, peer = %peer, user = %user);
    // The refusal boxed: the rare path must not size every connection's task.
    let outcome = match verdict {
        Ok(grant) => Ok(Permissions {
            write: grant.access == Access::ReadWrite,
            awareness: grant.access == Access::ReadWrite || readonly_awareness,
        }),
        Err(refusal) => Err(Box::new(refusal)),
    };
    async move {
        match outcome {
            Ok(perms) => run(socket, hub, settings, room, conn, perms).await,
            Err(refusal) => Box::pin(refuse(socket, &settings, *refusal)).await,
        }
        drop(slot);
    }
    .instrument(span)
}

/// Tells a refused client why and closes.
async fn refuse(socket: Box<WsSocket>, settings: &SessionSettings, refusal: Refusal) {
    info!(code = refusal.code.code(), reason = %refusal.reason, "connection refused");
    METRICS.closes.inc(refusal.code);
    METRICS.refused.inc(refusal.metric);
    let farewell = refusal
        .auth_message
        .then(|| Bytes::from(Message::AuthDenied(&refusal.reason).to_frame()));
    let WsSocket { mut reader, writer } = *socket;
    let (_out, mut rx) = outbox(settings.outbox_bytes, settings.write_buffer_bytes, writer);
    rx.start_close(refusal.code.code(), &refusal.reason, farewell);
    finish(&mut reader, &mut rx, settings, false).await;
}

/// Sends the close frame (after what the socket has not taken yet), then reads and drops what
/// the client still sends until it answers the close, so that the socket is not reset with our
/// close frame unread; all within twice the close timeout.
async fn finish(
    reader: &mut WsReader,
    rx: &mut OutboxReceiver,
    settings: &SessionSettings,
    answered: bool,
) {
    let _ = tokio::time::timeout(
        settings.close_timeout * 2,
        poll_fn(|cx| {
            if !rx.close_sent() {
                let mut written = Written::default();
                match rx.poll_write(cx, &mut written) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if answered {
                return Poll::Ready(());
            }
            reader.poll_drain(cx)
        }),
    )
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
    socket: Box<WsSocket>,
    hub: Hub,
    settings: Arc<SessionSettings>,
    room: RoomId,
    conn: ConnId,
    perms: Permissions,
) {
    METRICS.connections_opened.inc();
    METRICS.connections_open.inc();
    let mut session = Session::new(socket, &settings, conn, perms);

    // Boxed: joining takes more state than waiting for messages, for a moment only.
    let answered = match Box::pin(hub.join(&room, conn, session.out.clone())).await {
        Ok(membership) => {
            debug!("joined");
            let answered = session.serve(membership.handle()).await;
            drop(membership);
            answered
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
            session.out.close(code, reason);
            Some(false)
        }
    };
    if let Some(answered) = answered {
        let request = session.out.close_request().cloned();
        let (code, reason) = request.map_or((CloseCode::Normal, "".into()), |r| (r.code, r.reason));
        // Frames nobody will write are freed now.
        session.rx.start_close(code.code(), &reason, None);
        let Session { reader, rx, .. } = &mut *session;
        finish(reader, rx, &settings, answered).await;
    }
    METRICS.connections_open.dec();
    debug!("closed");
}

/// An admitted connection: its socket, its outbox and its limits, served by one task.
struct Session {
    reader: WsReader,
    /// Messages read and not handled yet.
    inbox: VecDeque<Incoming>,
    rx: OutboxReceiver,
    /// The connection's own handle on its outbox, to ask itself to close.
    out: Outbox,
    /// One timer for every deadline: the next ping and `limit_at`.
    timer: Pin<Box<Sleep>>,
    ping_at: Instant,
    /// The deadline for a first valid message, then the idle check.
    limit_at: Instant,
    /// The client sent something since the last ping.
    seen: bool,
    admitted: bool,
    last_frame: Instant,
    messages: TokenBucket,
    bytes: TokenBucket,
    settings: Arc<SessionSettings>,
    conn: ConnId,
    perms: Permissions,
}

/// What woke the connection.
enum Step {
    /// Messages are in the inbox.
    Read,
    /// The client's bytes cannot be read on.
    ReadFailed(SocketError),
    /// A deadline passed.
    Timer,
    /// A close was requested (by the room, the server, or the connection itself).
    Close,
    /// The socket is gone (a write failed, or every outbox handle went).
    Gone,
}

impl Session {
    /// A session over `socket`, moved out of its box here so that the box is freed at once
    /// (a box moved out of in an async function is freed only when the function ends).
    #[allow(clippy::boxed_local)] // the box is the point: see above
    fn new(
        socket: Box<WsSocket>,
        settings: &Arc<SessionSettings>,
        conn: ConnId,
        perms: Permissions,
    ) -> Box<Self> {
        let WsSocket { reader, writer } = *socket;
        let (out, rx) = outbox(settings.outbox_bytes, settings.write_buffer_bytes, writer);
        let now = Instant::now();
        let mut session = Box::new(Session {
            reader,
            inbox: VecDeque::new(),
            rx,
            out,
            timer: Box::pin(tokio::time::sleep(settings.first_message_timeout)),
            ping_at: now + settings.ping_interval,
            limit_at: now + settings.first_message_timeout,
            seen: true,
            admitted: false,
            last_frame: now,
            messages: TokenBucket::new(
                settings.rate_messages,
                settings.rate_messages.saturating_mul(2),
            ),
            bytes: TokenBucket::new(
                settings.rate_bytes,
                (settings.max_message_bytes as u64).max(settings.rate_bytes),
            ),
            settings: settings.clone(),
            conn,
            perms,
        });
        session.arm();
        session
    }

    /// Serves the connection until it is to close. Returns `None` when the socket is gone,
    /// else whether the client already sent its close frame.
    async fn serve(&mut self, room: &RoomHandle) -> Option<bool> {
        loop {
            while let Some(incoming) = self.inbox.pop_front() {
                self.seen = true;
                match incoming {
                    Incoming::Binary(frame) => self.on_message(frame, room).await,
                    Incoming::Text => self.close(
                        CloseCode::InvalidData,
                        "text frames are not part of the protocol".to_string(),
                    ),
                    Incoming::Ping(payload) => self.rx.pong(payload),
                    Incoming::Pong => {}
                    Incoming::Close => return Some(true),
                }
                if self.out.close_request().is_some() {
                    self.inbox.clear();
                }
            }
            // An idle connection keeps no buffer, not even the inbox's.
            if self.inbox.capacity() > 0 {
                self.inbox = VecDeque::new();
            }
            match poll_fn(|cx| self.poll_step(cx)).await {
                Step::Read => {}
                Step::ReadFailed(e) => match classify(&e) {
                    Some((code, reason)) => self.close(code, reason),
                    None => {
                        debug!(error = %e, "socket ends");
                        return None;
                    }
                },
                Step::Timer => self.on_timer(),
                Step::Close => return Some(false),
                Step::Gone => return None,
            }
        }
    }

    /// Writes what is queued, then waits for the outbox, the timer or the client.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
        let mut written = Written::default();
        let step = loop {
            let blocked = match self.rx.poll_write(cx, &mut written) {
                Poll::Ready(Ok(())) => false,
                Poll::Ready(Err(e)) => {
                    debug!(error = %e, "write failed");
                    break Some(Step::Gone);
                }
                Poll::Pending => true,
            };
            match self.rx.poll_signal(cx) {
                Poll::Ready(Signal::Close(_)) => break Some(Step::Close),
                Poll::Ready(Signal::Ended) => break Some(Step::Gone),
                Poll::Ready(Signal::Frames) if !blocked => continue,
                _ => break None,
            }
        };
        if written.messages > 0 {
            METRICS.frames_out.add(written.messages);
            METRICS.bytes_out.add(written.bytes);
        }
        if let Some(step) = step {
            return Poll::Ready(step);
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Step::Timer);
        }
        match self.reader.poll_read(cx, &mut self.inbox) {
            Poll::Ready(Ok(())) => Poll::Ready(Step::Read),
            Poll::Ready(Err(e)) => Poll::Ready(Step::ReadFailed(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Sets the timer to the nearest deadline.
    fn arm(&mut self) {
        let at = self.ping_at.min(self.limit_at);
        self.timer.as_mut().reset(at);
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        let s = &self.settings;
        if now >= self.limit_at {
            if !self.admitted {
                METRICS.refused.inc(Refused::FirstMessageTimeout);
                let reason = format!(
                    "no valid message within {:?} of connecting",
                    s.first_message_timeout
                );
                self.close(CloseCode::Policy, reason);
                return;
            }
            match s.idle_timeout {
                Some(idle) if self.last_frame + idle <= now => {
                    METRICS.refused.inc(Refused::IdleTimeout);
                    self.close(CloseCode::GoingAway, format!("idle for {idle:?}"));
                    return;
                }
                Some(idle) => self.limit_at = self.last_frame + idle,
                None => self.limit_at = far_future(),
            }
        }
        if now >= self.ping_at {
            if !std::mem::take(&mut self.seen) {
                self.close(CloseCode::GoingAway, "ping timeout".to_string());
                return;
            }
            self.rx.ping();
            self.ping_at = now + s.ping_interval;
        }
        self.arm();
    }

    /// Checks a binary message against the rate limits and hands it to the room.
    async fn on_message(&mut self, frame: Bytes, room: &RoomHandle) {
        let s = &self.settings;
        METRICS.frames_in.inc();
        METRICS.bytes_in.add(frame.len() as u64);
        self.last_frame = Instant::now();
        let refusal = if !self.messages.take(1, self.last_frame) {
            METRICS.refused.inc(Refused::RateLimit);
            (
                CloseCode::RateLimited,
                format!("more than {} messages per second", s.rate_messages),
            )
        } else if !self.bytes.take(frame.len() as u64, self.last_frame) {
            METRICS.refused.inc(Refused::RateLimit);
            (
                CloseCode::RateLimited,
                format!("more than {} bytes per second", s.rate_bytes),
            )
        } else {
            // Boxed: its state (about 800 bytes) would otherwise sit in every idle
            // connection's task.
            match Box::pin(handle_frame(frame, room, self.conn, self.perms)).await {
                Ok(()) => {
                    if !self.admitted {
                        self.admitted = true;
                        self.limit_at = match s.idle_timeout {
                            Some(idle) => self.last_frame + idle,
                            None => far_future(),
                        };
                        self.arm();
                    }
                    return;
                }
                Err(FrameError::RoomGone) => (CloseCode::Restarting, "room restarting".to_string()),
                Err(FrameError::Refused(code, reason)) => (code, reason),
            }
        };
        self.close(refusal.0, refusal.1);
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

/// Maps a failed read to a refusal, or `None` when the socket is simply gone.
fn classify(e: &SocketError) -> Option<(CloseCode, String)> {
    match e {
        SocketError::Read(ReadError::TooBig { .. }) => Some((CloseCode::TooBig, e.to_string())),
        SocketError::Read(e) => Some((CloseCode::ProtocolError, e.to_string())),
        SocketError::Io(_) | SocketError::Eof => None,
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
                RoomCommand::Update {
                    conn,
                    update: Box::new(update),
                }
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
                    // Within one frame of at most the message size limit.
                    payload_at: (payload.as_ptr() as usize - raw.as_ptr() as usize) as u32,
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
