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
use crate::room::{JoinError, Membership, RoomCommand, RoomHandle};
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
    // Exported, a connection is a span of its own. Otherwise the span only gives log lines
    // their context, and every idle connection would hold about 490 bytes of it (the registry's
    // slot, the formatted fields and the map that keeps them): then it exists only at `debug`,
    // and the connection's `info` and `warn` lines carry `conn`, `room`, `peer` and `user`.
    let span = if crate::telemetry::exporting_spans() {
        tracing::info_span!("conn", conn = %conn, room = %room, peer = %peer, user = %user)
    } else {
        tracing::debug_span!("conn", conn = %conn, room = %room, peer = %peer, user = %user)
    };
    let who = Who {
        conn,
        room: room.clone(),
        peer,
        user: user.into(),
    };
    // The refusal boxed: the rare path must not size every connection's task.
    let outcome = match verdict {
        Ok(grant) => Ok(Permissions {
            write: grant.access == Access::ReadWrite,
            awareness: grant.access == Access::ReadWrite || readonly_awareness,
        }),
        Err(refusal) => Err(Box::new(refusal)),
    };
    // Everything the connection starts with, in one box: what an async block captures stays in
    // its future for as long as it runs, and every idle connection's task is that future.
    let start = Box::new(Start {
        socket,
        hub,
        settings,
        who,
        outcome,
        slot,
    });
    async move {
        // Boxed: admitting and joining take more state than serving, for a moment only.
        let Some(mut session) = Box::pin(admit(start)).await else {
            return;
        };
        let answered = session.serve().await;
        Box::pin(session.close_down(answered)).await;
    }
    .instrument(span)
}

/// What a connection starts with.
struct Start {
    socket: Box<WsSocket>,
    hub: Hub,
    settings: Arc<SessionSettings>,
    who: Who,
    outcome: Result<Permissions, Box<Refusal>>,
    slot: Option<AddressSlot>,
}

/// Who a connection is, for its log lines.
struct Who {
    conn: ConnId,
    room: RoomId,
    peer: SocketAddr,
    user: Box<str>,
}

/// Tells a refused client why and closes.
async fn refuse(socket: Box<WsSocket>, settings: &SessionSettings, who: &Who, refusal: Refusal) {
    info!(
        conn = %who.conn, room = %who.room, peer = %who.peer, user = %who.user,
        code = refusal.code.code(), reason = %refusal.reason, "connection refused"
    );
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

/// Refuses the connection, or joins its room: the session to serve, or `None` when the
/// connection was refused or could not join and has been closed.
#[allow(clippy::boxed_local)] // unpacked here, in one place, so that the task's future holds a box
async fn admit(start: Box<Start>) -> Option<Box<Session>> {
    let Start {
        socket,
        hub,
        settings,
        mut who,
        outcome,
        slot,
    } = *start;
    let perms = match outcome {
        Ok(perms) => perms,
        Err(refusal) => {
            refuse(socket, &settings, &who, *refusal).await;
            return None;
        }
    };
    METRICS.connections_opened.inc();
    METRICS.connections_open.inc();
    // The first message's deadline counts from here, not from the end of the join.
    let opened = Instant::now();
    let WsSocket { mut reader, writer } = *socket;
    let (out, mut rx) = outbox(settings.outbox_bytes, settings.write_buffer_bytes, writer);
    match hub.join(&who.room, who.conn, out.clone()).await {
        Ok(membership) => {
            debug!("joined");
            // The room's own name, shared: the one parsed from this connection's path is freed.
            who.room = membership.handle().room().clone();
            Some(Session::new(
                reader, rx, out, membership, slot, settings, who, perms, opened,
            ))
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
            warn!(
                conn = %who.conn, room = %who.room, peer = %who.peer, user = %who.user,
                error = %e, "join refused"
            );
            METRICS.closes.inc(code);
            match e {
                JoinError::Full => METRICS.refused.inc(Refused::RoomFull),
                JoinError::TooManyRooms => METRICS.refused.inc(Refused::TooManyRooms),
                _ => {}
            }
            rx.start_close(code.code(), reason, None);
            finish(&mut reader, &mut rx, &settings, false).await;
            METRICS.connections_open.dec();
            debug!("closed");
            None
        }
    }
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
    who: Who,
    perms: Permissions,
    /// The connection's place in its room, left when the session ends.
    membership: Membership,
    /// The connection's place in the per-address count.
    slot: Option<AddressSlot>,
}

/// What the inbox holds next.
enum Next {
    /// A binary message, to check and hand to the room.
    Binary(Bytes),
    /// The client's close frame.
    Close,
    /// Nothing more.
    Empty,
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
    /// A joined connection's session; its deadlines count from `opened`.
    #[allow(clippy::too_many_arguments)] // the parts of one connection, each moved in once
    fn new(
        reader: WsReader,
        rx: OutboxReceiver,
        out: Outbox,
        membership: Membership,
        slot: Option<AddressSlot>,
        settings: Arc<SessionSettings>,
        who: Who,
        perms: Permissions,
        opened: Instant,
    ) -> Box<Self> {
        let now = opened;
        let mut session = Box::new(Session {
            reader,
            inbox: VecDeque::new(),
            rx,
            out,
            timer: Box::pin(tokio::time::sleep_until(
                now + settings.first_message_timeout,
            )),
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
            settings,
            who,
            perms,
            membership,
            slot,
        });
        session.arm();
        session
    }

    /// Serves the connection until it is to close. Returns `None` when the socket is gone,
    /// else whether the client already sent its close frame.
    ///
    /// This future is what every idle connection's task holds: everything it keeps across an
    /// await is in the session's box instead, and handing a message to the room is boxed.
    async fn serve(&mut self) -> Option<bool> {
        loop {
            loop {
                // Only a box lives across the await: the message and its handling are in it.
                let handling = match self.next_binary() {
                    Next::Binary(frame) => self.on_binary(frame),
                    Next::Empty => break,
                    Next::Close => return Some(true),
                };
                handling.await;
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

    /// Leaves the room, then (unless the socket is gone) sends the close frame and waits for
    /// the client's answer; `answered` is what [`Session::serve`] returned.
    async fn close_down(self: Box<Self>, answered: Option<bool>) {
        let Session {
            mut reader,
            mut rx,
            out,
            settings,
            membership,
            slot,
            ..
        } = *self;
        drop(membership);
        if let Some(answered) = answered {
            let request = out.close_request().cloned();
            let (code, reason) =
                request.map_or((CloseCode::Normal, "".into()), |r| (r.code, r.reason));
            // Frames nobody will write are freed now.
            rx.start_close(code.code(), &reason, None);
            finish(&mut reader, &mut rx, &settings, answered).await;
        }
        METRICS.connections_open.dec();
        drop(slot);
        debug!("closed");
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

    /// Handles the inbox's messages up to its next binary one, which it returns.
    fn next_binary(&mut self) -> Next {
        while let Some(incoming) = self.inbox.pop_front() {
            self.seen = true;
            match incoming {
                Incoming::Binary(frame) => return Next::Binary(frame),
                Incoming::Close => return Next::Close,
                other => self.on_control(other),
            }
            if self.out.close_request().is_some() {
                self.inbox.clear();
            }
        }
        Next::Empty
    }

    /// Checks a binary message against the rate limits and hands it to the room: boxed, since
    /// a connection waiting for messages must not hold its state.
    fn on_binary(&mut self, frame: Bytes) -> Pin<Box<impl Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let handled = match self.check_rates(frame.len()) {
                Ok(()) => {
                    let (conn, perms) = (self.who.conn, self.perms);
                    handle_frame(frame, self.membership.handle(), conn, perms).await
                }
                Err((code, reason)) => Err(FrameError::Refused(code, reason)),
            };
            self.handled(handled);
        })
    }

    /// A message other than a binary one or a close.
    fn on_control(&mut self, incoming: Incoming) {
        match incoming {
            Incoming::Text => self.close(
                CloseCode::InvalidData,
                "text frames are not part of the protocol".to_string(),
            ),
            Incoming::Ping(payload) => self.rx.pong(payload),
            // Binary messages and the close frame never come here: see `next_binary`.
            Incoming::Pong | Incoming::Binary(_) | Incoming::Close => {}
        }
    }

    /// Counts a binary message of `len` bytes and checks it against the rate limits.
    fn check_rates(&mut self, len: usize) -> Result<(), (CloseCode, String)> {
        let s = &self.settings;
        METRICS.frames_in.inc();
        METRICS.bytes_in.add(len as u64);
        self.last_frame = Instant::now();
        if !self.messages.take(1, self.last_frame) {
            METRICS.refused.inc(Refused::RateLimit);
            return Err((
                CloseCode::RateLimited,
                format!("more than {} messages per second", s.rate_messages),
            ));
        }
        if !self.bytes.take(len as u64, self.last_frame) {
            METRICS.refused.inc(Refused::RateLimit);
            return Err((
                CloseCode::RateLimited,
                format!("more than {} bytes per second", s.rate_bytes),
            ));
        }
        Ok(())
    }

    /// What follows a binary message: the first valid one admits the connection (its deadline
    /// becomes the idle check); a refused one closes it.
    fn handled(&mut self, handled: Result<(), FrameError>) {
        let (code, reason) = match handled {
            Ok(()) => {
                if !self.admitted {
                    self.admitted = true;
                    self.limit_at = match self.settings.idle_timeout {
                        Some(idle) => self.last_frame + idle,
                        None => far_future(),
                    };
                    self.arm();
                }
                return;
            }
            Err(FrameError::RoomGone) => (CloseCode::Restarting, "room restarting".to_string()),
            Err(FrameError::Refused(code, reason)) => (code, reason),
        };
        self.close(code, reason);
    }

    fn close(&self, code: CloseCode, reason: String) {
        let who = &self.who;
        info!(
            conn = %who.conn, room = %who.room, peer = %who.peer, user = %who.user,
            code = code.code(), reason = %reason, "closing connection"
        );
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
