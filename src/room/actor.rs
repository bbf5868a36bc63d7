//! The room actor: load, then serve the inbox until idle or shutdown, then flush and exit.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tandem_protocol::{AwarenessUpdate, CloseCode, Message, SyncMessage};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError::{Closed, Full};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use super::awareness::{Awareness, Owner};
use super::mailbox::Mailbox;
use super::peer::Peer;
use super::policy::LogState;
use super::{Inbox, JoinError, OnExit, RoomCommand, RoomSettings};
use crate::broker::envelope::{decode_sync_step1, encode_sync_step1, Envelope, Kind};
use crate::broker::{Broker, PublishError};
use crate::doc::{Applied, DecodedUpdate, DocError, YDoc, YrsFold};
use crate::hashing::FastMap;
use crate::ids::{ConnId, NodeId, RoomId};
use crate::metrics::{Refused, METRICS};
use crate::session::outbox::{Offered, Outbox, PushError};
use crate::store::writer::{CommitListener, StoreWriter, WriteRequest};
use crate::store::{Append, Compacted, DynStore};
use crate::ws::frame::binary_frame;
use crate::ws::{Written, FRAGMENT_BYTES};

/// Commands handled in one turn at most before the frames they produced are written.
const COMMANDS_PER_TURN: usize = 64;

/// Peers a room flushes itself in one turn before it shares the writing with other threads.
/// Past it, half of the peers' frames go to their connections' tasks, so that another worker
/// writes them while the room writes the rest: `fanout`'s 1,500 peers need that for their tail
/// latency. Below it each handed-over peer costs a wake-up and a cross-thread hand-off for one
/// small write: in `rooms` (50 peers each), writing all from the room's thread takes about 10 %
/// off the CPU per delivery with the same latency (docs/benchmarks.md, session 13).
const DIRECT_FLUSHES: usize = 128;

/// What every room of a node shares.
pub struct RoomContext {
    /// Where documents are loaded from and compacted into.
    pub store: DynStore,
    /// The group-commit writer every room appends through.
    pub writer: StoreWriter,
    /// Written as the `origin` of every appended update: this node's id.
    pub origin: Arc<str>,
    /// This node, as named in envelopes.
    pub node: NodeId,
    /// Fan-out to other nodes; `None` when this node is alone.
    pub broker: Option<Arc<dyn Broker>>,
    /// Behaviour shared by all rooms.
    pub settings: RoomSettings,
    /// Cancelled when the node shuts down: rooms close their peers with 1012, flush and exit.
    pub shutdown: CancellationToken,
}

/// Starts the actor of `room` reading `inbox`; `on_exit` runs when it stops serving.
pub(crate) fn spawn(
    ctx: Arc<RoomContext>,
    tracker: &TaskTracker,
    room: RoomId,
    generation: u64,
    inbox: Inbox,
    on_exit: OnExit,
) {
    let span = tracing::info_span!("room", room = %room);
    tracker.spawn(
        async move {
            let notices = Mailbox::new();
            // Boxed: the task's future keeps only a pointer to the room's state, not a copy of
            // it in each of its suspended states.
            let actor = Box::new(Actor {
                listener: Arc::new(Notices(notices.clone())),
                ctx,
                room,
                generation,
                inbox: inbox.rx,
                resync: inbox.resync,
                last_exchange: Instant::now(),
                dirty: false,
                full_state: None,
                known_nodes: HashSet::new(),
                notices,
                doc: YDoc::new(),
                peers: FastMap::default(),
                ack_waiters: HashSet::new(),
                unflushed: Vec::new(),
                awareness: Awareness::new(),
                log: LogState::default(),
                next_seq: 0,
                inflight: VecDeque::new(),
                unnudged: false,
                empty_since: Some(Instant::now()),
                approx_bytes: 0,
                on_exit: Some(on_exit),
            });
            actor.run().await;
        }
        .instrument(span),
    );
}

/// Events the room receives besides its inbox: commits and finished compactions.
#[derive(Debug)]
enum Notice {
    Committed { seq: u64, id: i64 },
    Folded { folded: Option<Compacted> },
}

/// Feeds the writer's commit callbacks into the room's notices.
struct Notices(Mailbox<Notice>);

impl CommitListener for Notices {
    fn committed(&self, seq: u64, id: i64) {
        // Wakes the room only while it waits on a commit (`Actor::settle_notices`).
        self.0.post(Notice::Committed { seq, id });
    }
}

/// Why the serve loop ended.
enum Exit {
    Idle,
    Shutdown,
    /// The engine panicked; the in-memory document is discarded and reloaded by the next join.
    Poisoned,
}

struct Actor {
    ctx: Arc<RoomContext>,
    room: RoomId,
    generation: u64,
    inbox: mpsc::Receiver<RoomCommand>,
    /// Set by the hub when something for this room may have been lost.
    resync: Arc<AtomicBool>,
    /// When this room last published its state summary to the other nodes.
    last_exchange: Instant,
    /// Whether the document changed since the last exchange.
    dirty: bool,
    /// The sync step 2 frame for a client that holds nothing (the whole document), encoded at
    /// most once per version of the document: in a join storm every newcomer gets the same
    /// shared bytes instead of its own encoding. Cleared by every change.
    full_state: Option<Bytes>,
    /// Nodes that have shown they hold this room; a new one gets our local presence.
    known_nodes: HashSet<NodeId>,
    /// Commit and compaction notices. Unbounded, but bounded in practice by the writer's queue
    /// capacity (one notice per submitted update) plus one per compaction.
    notices: Mailbox<Notice>,
    listener: Arc<Notices>,
    doc: YDoc,
    peers: FastMap<ConnId, Peer>,
    /// Peers with acknowledgements or echoes waiting for a commit.
    ack_waiters: HashSet<ConnId>,
    /// Peers with frames queued and not yet flushed: the frames of every command handled in
    /// one turn leave together, in one write per peer, at the end of the turn.
    unflushed: Vec<ConnId>,
    awareness: Awareness,
    log: LogState,
    next_seq: u64,
    /// `(seq, len)` of updates submitted and not yet committed, oldest first.
    inflight: VecDeque<(u64, usize)>,
    /// Updates were queued for the store this turn: the writer is nudged once, at its end.
    unnudged: bool,
    /// When the last peer left; `None` while anyone is here.
    empty_since: Option<Instant>,
    /// An upper bound of the document's encoded size: exact after a measure, then grown by
    /// every change (updates overlap, so the sum overestimates; it is measured again before
    /// refusing anything).
    approx_bytes: usize,
    on_exit: Option<OnExit>,
}

impl Actor {
    async fn run(mut self: Box<Self>) {
        // Subscribe before loading, so nothing published meanwhile falls between the two; what
        // other nodes hold beyond the store comes with the state exchange right after.
        if let Some(broker) = &self.ctx.broker {
            if let Err(e) = broker.subscribe(&self.room).await {
                warn!(error = %e, "broker subscribe failed; the room resyncs after reconnect");
            }
        }
        if let Err(e) = self.load().await {
            warn!(error = %e, "room load failed");
            METRICS.room_load_failures.inc();
            self.refuse_remaining(JoinError::LoadFailed);
            self.unsubscribe().await;
            return;
        }
        self.publish_summary();
        METRICS.rooms_loaded.inc();
        let exit = self.serve().await;
        METRICS.rooms_loaded.dec();
        match exit {
            Exit::Idle => debug!("room unloaded"),
            Exit::Shutdown => debug!("room flushed for shutdown"),
            Exit::Poisoned => warn!(
                "room set its document aside after an engine panic (leaked, not freed: \
                 see tandem_engine_panics_total) and will reload from the store"
            ),
        }
        self.refuse_remaining(JoinError::Unloading);
        self.unsubscribe().await;
    }

    async fn unsubscribe(&self) {
        if let Some(broker) = &self.ctx.broker {
            if let Err(e) = broker.unsubscribe(&self.room).await {
                debug!(error = %e, "broker unsubscribe failed");
            }
        }
    }

    async fn load(&mut self) -> Result<(), LoadError> {
        let stored = self
            .ctx
            .store
            .load(&self.room)
            .await
            .inspect_err(|_| METRICS.store_errors.load.inc())?;
        let tail: Vec<Bytes> = stored.updates.iter().map(|(_, b)| b.clone()).collect();
        let bytes = tail.iter().map(Bytes::len).sum();
        self.doc = YDoc::load(stored.snapshot.as_ref().map(|s| &s.state[..]), &tail)?;
        self.full_state = None;
        self.log = LogState::loaded(tail.len(), bytes, stored.last_id());
        self.approx_bytes = bytes + stored.snapshot.as_ref().map_or(0, |s| s.state.len());
        debug!(rows = tail.len(), "room loaded");
        Ok(())
    }

    async fn serve(&mut self) -> Exit {
        let mut tick = tokio::time::interval(self.ctx.settings.tick);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let shutdown = self.ctx.shutdown.clone();
        loop {
            // Between turns: read what committed, write what the turn (and the commits) queued
            // for the peers, and hand the turn's updates to the store writer as one group.
            self.settle_notices();
            self.flush_peers();
            self.nudge_writer();
            tokio::select! {
                cmd = self.inbox.recv() => {
                    // The hub holds a sender for as long as this actor is registered.
                    let Some(mut cmd) = cmd else { return Exit::Idle };
                    // Commands already waiting are handled in the same turn, up to a bound.
                    let mut turn = COMMANDS_PER_TURN;
                    loop {
                        // Boxed for the time it runs: inline, handling's state (1.2 KB) would
                        // size every idle room's task.
                        if Box::pin(self.handle(cmd)).await.is_err() || self.doc.is_poisoned() {
                            self.flush_peers();
                            self.close_all(CloseCode::Restarting, "room restarting");
                            // Never snapshot a document yrs panicked inside: only wait for the
                            // log.
                            self.flush(Fold::Skip).await;
                            return Exit::Poisoned;
                        }
                        turn -= 1;
                        // At the bound the turn ends even if more wait: commit notices, the
                        // tick and shutdown get their turn in between.
                        if turn == 0 {
                            break;
                        }
                        match self.inbox.try_recv() {
                            Ok(next) => cmd = next,
                            Err(_) => break,
                        }
                    }
                }
                // The rest queued after it is read between turns, above.
                notice = self.notices.recv() => self.on_notice(notice),
                _ = tick.tick() => {
                    self.sweep();
                    self.flush_peers();
                    self.maybe_exchange();
                    if self.log.wants_compaction(&self.ctx.settings.compaction) {
                        self.start_compaction();
                    }
                    if self.idle_long_enough() {
                        self.flush(Fold::IfTail).await;
                        if self.inbox.is_empty() && self.peers.is_empty() {
                            return Exit::Idle;
                        }
                    }
                }
                () = shutdown.cancelled() => {
                    self.close_all(CloseCode::Restarting, "server restarting");
                    self.flush(Fold::IfTail).await;
                    return Exit::Shutdown;
                }
            }
        }
    }

    /// Handles one command. `Err` means the engine panicked and the document must be dropped.
    async fn handle(&mut self, cmd: RoomCommand) -> Result<(), Poisoned> {
        match cmd {
            RoomCommand::Join {
                conn,
                outbox,
                reply,
            } => self.join(conn, outbox, reply),
            RoomCommand::Leave { conn } => self.leave(conn),
            RoomCommand::SyncStep1 { conn, state_vector } => {
                self.answer_step1(conn, &state_vector)?
            }
            RoomCommand::Update { conn, update } => self.apply(conn, *update).await?,
            RoomCommand::Awareness {
                conn,
                message,
                payload_at,
            } => {
                let payload = message.slice(payload_at as usize..);
                self.relay_awareness(conn, message, &payload)
            }
            RoomCommand::Remote { envelope } => self.remote(envelope)?,
            RoomCommand::NodeGone { node } => {
                self.known_nodes.remove(&node);
                if let Some(nulls) = self.awareness.remove_owner(&Owner::Node(node)) {
                    let frame = Bytes::from(Message::Awareness(&nulls).to_frame());
                    self.broadcast(&frame, None);
                }
            }
            RoomCommand::AckRequest { conn } => {
                if let Some(peer) = self.peers.get_mut(&conn) {
                    peer.request_acks();
                }
            }
            RoomCommand::QueryAwareness { conn } => {
                if let (Some(Peer { outbox: out, .. }), Some(state)) =
                    (self.peers.get(&conn), self.awareness.full_state())
                {
                    let frame = Message::Awareness(&state).to_frame();
                    let _ = out.push(Bytes::from(frame));
                }
            }
        }
        Ok(())
    }

    fn join(
        &mut self,
        conn: ConnId,
        outbox: Outbox,
        reply: tokio::sync::oneshot::Sender<Result<(), JoinError>>,
    ) {
        if self.ctx.shutdown.is_cancelled() {
            let _ = reply.send(Err(JoinError::ShuttingDown));
            return;
        }
        let max_peers = self.ctx.settings.max_peers;
        if max_peers > 0 && self.peers.len() >= max_peers {
            let _ = reply.send(Err(JoinError::Full));
            return;
        }
        // Our step 1 first, then presence: the same order as the stock server.
        let step1 = Message::Sync(SyncMessage::Step1(&self.doc.state_vector())).to_frame();
        if outbox.push(Bytes::from(step1)).is_err() {
            return;
        }
        if let Some(state) = self.awareness.full_state() {
            let _ = outbox.push(Bytes::from(Message::Awareness(&state).to_frame()));
        }
        if reply.send(Ok(())).is_ok() {
            self.peers.insert(conn, Peer::new(outbox));
            self.empty_since = None;
            METRICS.peers_joined.inc();
            METRICS.room_peers.observe(self.peers.len());
        }
    }

    fn leave(&mut self, conn: ConnId) {
        if self.peers.remove(&conn).is_none() {
            return;
        }
        self.ack_waiters.remove(&conn);
        if let Some(nulls) = self.awareness.remove_owner(&Owner::Local(conn)) {
            let frame = Bytes::from(Message::Awareness(&nulls).to_frame());
            self.broadcast(&frame, None);
            self.publish(Kind::Awareness, None, &nulls);
        }
        if self.peers.is_empty() {
            self.empty_since = Some(Instant::now());
        }
    }

    fn answer_step1(&mut self, conn: ConnId, state_vector: &[u8]) -> Result<(), Poisoned> {
        let Some(Peer { outbox: out, .. }) = self.peers.get(&conn) else {
            return Ok(());
        };
        // The encoding of an empty state vector: a client that holds nothing.
        let holds_nothing = state_vector == [0];
        if let (true, Some(frame)) = (holds_nothing, &self.full_state) {
            let _ = out.push(frame.clone());
            return Ok(());
        }
        match self.doc.diff(state_vector) {
            Ok(diff) => {
                let frame = Bytes::from(Message::Sync(SyncMessage::Step2(&diff)).to_frame());
                if holds_nothing {
                    self.full_state = Some(frame.clone());
                }
                let _ = out.push(frame);
                Ok(())
            }
            Err(DocError::Panicked) => {
                out.close(CloseCode::InvalidData, "state vector crashed the engine");
                Err(Poisoned)
            }
            Err(e) => {
                refuse(out, conn, &e);
                self.leave(conn);
                Ok(())
            }
        }
    }

    async fn apply(&mut self, conn: ConnId, update: DecodedUpdate) -> Result<(), Poisoned> {
        if !self.peers.contains_key(&conn) {
            return Ok(());
        }
        if !self.fits(update.raw().len()) {
            warn!(conn = %conn, limit = self.ctx.settings.max_document_bytes, "document at its size limit; refusing a write with 1009");
            METRICS.closes.inc(CloseCode::TooBig);
            METRICS.refused.inc(Refused::DocumentTooLarge);
            if let Some(peer) = self.peers.get(&conn) {
                peer.outbox
                    .close(CloseCode::TooBig, "document size limit reached");
            }
            self.leave(conn);
            return Ok(());
        }
        let Some(peer) = self.peers.get(&conn) else {
            return Ok(());
        };
        if self.ctx.writer.is_full() {
            // The bound on unstored updates is reached (the store is down or far behind):
            // refuse the write rather than hold more than we can promise to store. The client
            // keeps its edit and sends it again when it reconnects.
            warn!(conn = %conn, "store not keeping up; refusing a write with 1013");
            METRICS.closes.inc(CloseCode::TryAgainLater);
            METRICS.try_again_later.store_backlog.inc();
            peer.outbox.close(
                CloseCode::TryAgainLater,
                "storage unavailable, try again later",
            );
            // Its later frames must not be applied without this one: it is out of the room.
            self.leave(conn);
            return Ok(());
        }
        let wants_acks = peer.wants_acks();
        let raw = update.raw().clone();
        let started = Instant::now();
        let (effective, complete) = match self.doc.apply_checked(update) {
            Ok(Applied::Unchanged) if wants_acks && self.ctx.broker.is_some() => {
                // Already in the document, but maybe only from another node that has not stored
                // it yet: store it again (updates are idempotent) and acknowledge that write.
                let seq = self.next_seq;
                self.owe(conn, Some(seq), None);
                self.persist(raw).await;
                return Ok(());
            }
            Ok(Applied::Unchanged) => {
                // Already in the document, and everything in it came through this node's
                // writes: stored once every write before it is.
                let needs = (!self.log.all_committed()).then(|| self.next_seq - 1);
                self.owe(conn, needs, None);
                return Ok(());
            }
            // Waiting for a missing predecessor: not stored, so never acknowledged (and, as
            // acknowledgements are cumulative, neither is anything after it on this connection).
            Ok(Applied::Pending) => {
                // Waiting data is held in memory: it counts against the size limit.
                self.approx_bytes += raw.len();
                self.owe(conn, Some(NEVER), None);
                return Ok(());
            }
            Ok(Applied::Changed {
                effective,
                complete,
            }) => {
                self.approx_bytes += effective.len();
                (effective, complete)
            }
            Err(DocError::PartlyApplied { reason, effective }) => {
                // The sender is refused, but what yrs integrated before refusing stays in the
                // document: relay and store it like any change, so nobody differs from the room.
                if let Some(p) = self.peers.get(&conn) {
                    refuse(
                        &p.outbox,
                        conn,
                        &format_args!("applied only in part: {reason}"),
                    );
                }
                // Out of the room at once: what it sent after this (later messages of the
                // same frame, already on their way) is not handled.
                self.leave(conn);
                self.approx_bytes += effective.len();
                (effective, false)
            }
            Err(e) => {
                if let Some(p) = self.peers.get(&conn) {
                    refuse(&p.outbox, conn, &e);
                }
                self.leave(conn);
                return if matches!(e, DocError::Panicked) {
                    Err(Poisoned)
                } else {
                    Ok(())
                };
            }
        };
        // Encoded once; every peer's outbox shares these bytes.
        let frame = Bytes::from(Message::Sync(SyncMessage::Update(&effective)).to_frame());
        self.broadcast(&frame, Some(conn));
        self.publish(Kind::Update, None, &effective);
        self.dirty = true;
        self.full_state = None;
        METRICS.updates_applied.inc();
        METRICS.fanout_seconds.observe(started.elapsed());
        let seq = if complete { self.next_seq } else { NEVER };
        let echo = self
            .ctx
            .settings
            .echo_own_updates
            .then(|| effective.clone());
        self.owe(conn, Some(seq), echo);
        self.persist(effective).await;
        Ok(())
    }

    /// Records that `conn` is owed an acknowledgement (and maybe an echo) once write `needs`
    /// commits, sending it at once when nothing is pending.
    fn owe(&mut self, conn: ConnId, needs: Option<u64>, echo: Option<Bytes>) {
        let Some(peer) = self.peers.get_mut(&conn) else {
            return;
        };
        for frame in peer.received_update(needs, echo) {
            if peer.outbox.queue(frame) == Ok(true) {
                self.unflushed.push(conn);
            }
        }
        if peer.is_waiting() {
            self.ack_waiters.insert(conn);
        }
    }

    async fn persist(&mut self, data: Bytes) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.inflight.push_back((seq, data.len()));
        self.log.submitted();
        let req = WriteRequest {
            append: Append {
                room: self.room.clone(),
                data,
                origin: self.ctx.origin.clone(),
            },
            seq,
            listener: self.listener.clone(),
        };
        let req = match self.ctx.writer.try_submit(req) {
            Ok(()) => {
                self.unnudged = true;
                return;
            }
            Err(Full(req)) => req,
            Err(Closed(_)) => {
                warn!("store writer is gone; update kept in memory only");
                return;
            }
        };
        // Waits while the writer's queue is full: the store's pace bounds the room's. What this
        // turn queued for the peers leaves first.
        self.flush_peers();
        if self.ctx.writer.submit(req).await.is_err() {
            warn!("store writer is gone; update kept in memory only");
        }
    }

    /// Writes what this turn queued for each peer, as far as each socket takes it at once. In a
    /// large room, part of the peers' frames are handed to their connections' tasks first, so
    /// that the other worker threads write them while this one writes the rest.
    fn flush_peers(&mut self) {
        if self.unflushed.is_empty() {
            return;
        }
        let mut written = Written::default();
        let direct = if self.unflushed.len() > DIRECT_FLUSHES {
            self.unflushed.len() / 2
        } else {
            self.unflushed.len()
        };
        for id in &self.unflushed[direct..] {
            if let Some(peer) = self.peers.get(id) {
                peer.outbox.hand_over();
            }
        }
        for id in &self.unflushed[..direct] {
            if let Some(peer) = self.peers.get(id) {
                written.add(peer.outbox.flush());
            }
        }
        self.unflushed.clear();
        METRICS.frames_out.add(written.messages);
        METRICS.bytes_out.add(written.bytes);
    }

    fn relay_awareness(&mut self, conn: ConnId, message: Bytes, payload: &[u8]) {
        if !self.peers.contains_key(&conn) {
            return;
        }
        let Ok(update) = AwarenessUpdate::decode(payload) else {
            return;
        };
        if self
            .awareness
            .apply(&Owner::Local(conn), &update, Instant::now())
        {
            // Everyone, the sender included: stock providers count the echo as liveness.
            self.broadcast(&message, None);
            self.publish(Kind::Awareness, None, payload);
        }
    }

    /// Pushes `frame` to every peer except `skip`; peers over budget are dropped from the room
    /// (their outbox already asked them to close with 1013).
    ///
    /// When this is likely the turn's only frame for the peers (nothing queued for them yet
    /// and no command waiting) and the room writes to all its peers itself, the frame is
    /// encoded as a WebSocket frame once and offered to each socket as it is
    /// ([`Outbox::offer`]); otherwise it is queued, and the turn's frames leave together.
    fn broadcast(&mut self, frame: &Bytes, skip: Option<ConnId>) {
        let mut overflowed = Vec::new();
        let mut delivered = 0;
        // Offers handed to a socket: no flush will count them.
        let mut sent: u64 = 0;
        let encoded = (self.unflushed.is_empty()
            && self.inbox.is_empty()
            && self.peers.len() <= DIRECT_FLUSHES
            && frame.len() <= FRAGMENT_BYTES)
            .then(|| Bytes::from(binary_frame(frame)));
        // The peers and their outboxes are cold by now. Touched in a loop of their own, their
        // misses overlap, where behind each send they would follow one another.
        for peer in self.peers.values() {
            peer.outbox.prefetch();
        }
        for (&id, peer) in &self.peers {
            if Some(id) == skip {
                continue;
            }
            let offered = match &encoded {
                Some(encoded) => peer.outbox.offer(frame, encoded),
                None => peer
                    .outbox
                    .queue(frame.clone())
                    .map(|first| Offered::Queued { first }),
            };
            match offered {
                Ok(Offered::Sent) => {
                    delivered += 1;
                    sent += 1;
                }
                Ok(Offered::Queued { first }) => {
                    delivered += 1;
                    if first {
                        self.unflushed.push(id);
                    }
                }
                Err(PushError::Overflow) => {
                    warn!(conn = %id, "slow consumer closed with 1013");
                    METRICS.closes.inc(CloseCode::TryAgainLater);
                    METRICS.try_again_later.slow_consumer.inc();
                    overflowed.push(id);
                }
                Err(PushError::Closed) => overflowed.push(id),
            }
        }
        METRICS.deliveries.add(delivered);
        METRICS.frames_out.add(sent);
        METRICS.bytes_out.add(sent * frame.len() as u64);
        for id in overflowed {
            self.leave(id);
        }
    }

    /// Publishes an envelope to the other nodes, encoded once. A full queue marks the room for
    /// resync: the next state exchange carries what this envelope would have.
    fn publish(&self, kind: Kind, target: Option<&str>, payload: &[u8]) {
        let Some(broker) = &self.ctx.broker else {
            return;
        };
        let env = Envelope {
            origin: self.ctx.node.as_str(),
            kind,
            target,
            payload,
        };
        match broker.publish(&self.room, env.encode()) {
            Ok(()) => METRICS.broker_published.inc(),
            Err(PublishError::Full) => {
                METRICS.broker_publish_dropped.inc();
                self.resync.store(true, Ordering::Release);
            }
            Err(PublishError::Closed) => {}
        }
    }

    /// Publishes this room's state summary: nodes holding more answer with a diff.
    fn publish_summary(&mut self) {
        if self.ctx.broker.is_none() {
            return;
        }
        let (sv, digest) = self.doc.sync_summary();
        self.publish(Kind::SyncStep1, None, &encode_sync_step1(&sv, &digest));
        self.last_exchange = Instant::now();
        self.dirty = false;
        METRICS.broker_resyncs.inc();
    }

    /// Repeats the exchange when something may have been lost, and periodically while active.
    fn maybe_exchange(&mut self) {
        let lost = self.resync.swap(false, Ordering::AcqRel);
        let due = self.dirty && self.last_exchange.elapsed() >= self.ctx.settings.sync_interval;
        if lost || due {
            self.publish_summary();
        }
    }

    /// Handles an envelope from another node. `Err` means the engine panicked.
    fn remote(&mut self, bytes: Bytes) -> Result<(), Poisoned> {
        let Ok(env) = Envelope::decode(&bytes) else {
            return Ok(());
        };
        let origin = NodeId::new(env.origin);
        match env.kind {
            Kind::Update => self.apply_remote(bytes.slice_ref(env.payload))?,
            Kind::SyncStep2 if env.target == Some(self.ctx.node.as_str()) => {
                self.apply_remote(bytes.slice_ref(env.payload))?
            }
            Kind::SyncStep2 => {}
            Kind::Awareness => {
                let Ok(update) = AwarenessUpdate::decode(env.payload) else {
                    return Ok(());
                };
                if self
                    .awareness
                    .apply(&Owner::Node(origin), &update, Instant::now())
                {
                    let frame = Bytes::from(Message::Awareness(env.payload).to_frame());
                    self.broadcast(&frame, None);
                }
            }
            Kind::SyncStep1 => {
                let Ok((sv, digest)) = decode_sync_step1(env.payload) else {
                    return Ok(());
                };
                let cmp = match self.doc.compare(sv, digest) {
                    Ok(c) => c,
                    Err(DocError::Panicked) => return Err(Poisoned),
                    Err(_) => return Ok(()),
                };
                if cmp.we_have_more {
                    match self.doc.diff(sv) {
                        Ok(diff) => self.publish(Kind::SyncStep2, Some(env.origin), &diff),
                        Err(DocError::Panicked) => return Err(Poisoned),
                        Err(_) => {}
                    }
                }
                if cmp.they_have_more && self.last_exchange.elapsed() >= EXCHANGE_DEBOUNCE {
                    self.publish_summary();
                }
                if self.known_nodes.insert(origin) {
                    if let Some(local) = self.awareness.local_state() {
                        self.publish(Kind::Awareness, None, &local);
                    }
                }
            }
            Kind::Heartbeat | Kind::NodeLeft => {}
        }
        Ok(())
    }

    /// Applies an update another node already stored, relaying what is new to local peers.
    /// It is not appended again: its origin logged it.
    fn apply_remote(&mut self, payload: Bytes) -> Result<(), Poisoned> {
        let Ok(update) = DecodedUpdate::decode(payload) else {
            return Ok(());
        };
        match self.doc.apply_checked(update) {
            Ok(Applied::Changed { effective, .. }) => {
                self.full_state = None;
                self.approx_bytes += effective.len();
                let frame = Bytes::from(Message::Sync(SyncMessage::Update(&effective)).to_frame());
                self.broadcast(&frame, None);
                Ok(())
            }
            Ok(Applied::Unchanged | Applied::Pending) => Ok(()),
            Err(DocError::Panicked) => Err(Poisoned),
            // It arrived before something it depends on (pub/sub orders each node's messages,
            // not different nodes'): the state exchange brings both.
            Err(DocError::Dependencies(e)) => {
                debug!(error = %e, "an update from another node arrived early; resyncing");
                self.resync.store(true, Ordering::Release);
                Ok(())
            }
            Err(DocError::PartlyApplied { reason, effective }) => {
                warn!(error = %reason, "an update from another node applied only in part");
                self.full_state = None;
                self.approx_bytes += effective.len();
                let frame = Bytes::from(Message::Sync(SyncMessage::Update(&effective)).to_frame());
                self.broadcast(&frame, None);
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "ignoring an update from another node that does not apply");
                Ok(())
            }
        }
    }

    /// Whether the document may take an update of `len` bytes without passing its size limit.
    /// The estimate is checked first; only when it says no is the document measured.
    fn fits(&mut self, len: usize) -> bool {
        let max = self.ctx.settings.max_document_bytes;
        if max == 0 || self.approx_bytes + len <= max {
            return true;
        }
        // On a panic the document is set aside and the room restarts (`serve` checks).
        self.approx_bytes = self.doc.encoded_len().unwrap_or(usize::MAX);
        self.approx_bytes.saturating_add(len) <= max
    }

    fn on_notice(&mut self, notice: Notice) {
        match notice {
            Notice::Committed { seq, id } => {
                let len = match self.inflight.pop_front() {
                    Some((s, len)) if s == seq => len,
                    other => {
                        warn!(?other, seq, "commit notices out of order");
                        other.map_or(0, |(_, len)| len)
                    }
                };
                self.log.committed(id, len);
                let peers = &mut self.peers;
                let unflushed = &mut self.unflushed;
                self.ack_waiters.retain(|&conn| {
                    let Some(peer) = peers.get_mut(&conn) else {
                        return false;
                    };
                    for frame in peer.committed(seq) {
                        if peer.outbox.queue(frame) == Ok(true) {
                            unflushed.push(conn);
                        }
                    }
                    peer.is_waiting()
                });
            }
            Notice::Folded { folded } => self.log.finish_fold(folded),
        }
    }

    fn sweep(&mut self) {
        let timeout = self.ctx.settings.awareness_timeout;
        if let Some(nulls) = self.awareness.sweep(Instant::now(), timeout) {
            let frame = Bytes::from(Message::Awareness(&nulls).to_frame());
            self.broadcast(&frame, None);
        }
    }

    fn idle_long_enough(&self) -> bool {
        self.empty_since
            .is_some_and(|since| since.elapsed() >= self.ctx.settings.idle_grace)
    }

    /// The store folds what it has logged (it never sees the in-memory document, which may hold
    /// updates not yet committed, or lack other nodes' ones).
    fn fold_request(&mut self) -> CompactionJob {
        self.log.start_fold();
        CompactionJob {
            store: self.ctx.store.clone(),
            room: self.room.clone(),
        }
    }

    /// Folds the log in the background; the room keeps serving meanwhile.
    fn start_compaction(&mut self) {
        let job = self.fold_request();
        let notices = self.notices.clone();
        tokio::spawn(async move {
            let folded = job.run().await;
            notices.send(Notice::Folded { folded });
        });
    }

    /// Reads the commit notices posted since the last look. Later ones wake the room only
    /// while a peer waits on a commit (an acknowledgement or an echo); otherwise they queue
    /// quietly until the room's next turn, and a commit costs no wake-up of its own.
    fn settle_notices(&mut self) {
        self.notices.set_eager(true);
        while let Some(notice) = self.notices.try_recv() {
            self.on_notice(notice);
        }
        if self.ack_waiters.is_empty() {
            self.notices.set_eager(false);
        }
    }

    /// Has the store writer take what this turn queued: the turn's updates are one group.
    fn nudge_writer(&mut self) {
        if std::mem::take(&mut self.unnudged) {
            self.ctx.writer.nudge();
        }
    }

    /// Waits until every submitted update is committed (processing notices only), then folds
    /// the log if asked and it has a tail. Commands keep queueing in the inbox meanwhile.
    async fn flush(&mut self, fold: Fold) {
        self.nudge_writer();
        self.notices.set_eager(true);
        while !self.log.all_committed() || self.log.is_folding() {
            let notice = self.notices.recv().await;
            self.on_notice(notice);
        }
        if fold == Fold::IfTail && self.log.has_tail() {
            let folded = self.fold_request().run().await;
            self.log.finish_fold(folded);
        }
    }

    fn close_all(&mut self, code: CloseCode, reason: &'static str) {
        for peer in self.peers.values() {
            peer.outbox.close(code, reason);
        }
        self.peers.clear();
    }

    /// Unregisters from the hub, then refuses whatever still arrives so that joiners retry
    /// against a fresh actor (which loads from the now up-to-date store).
    fn refuse_remaining(&mut self, why: JoinError) {
        if let Some(on_exit) = self.on_exit.take() {
            on_exit(&self.room, self.generation);
        }
        self.inbox.close();
        while let Ok(cmd) = self.inbox.try_recv() {
            if let RoomCommand::Join { reply, .. } = cmd {
                let _ = reply.send(Err(why));
            }
        }
    }
}

/// A compaction to run against the store.
struct CompactionJob {
    store: DynStore,
    room: RoomId,
}

impl CompactionJob {
    /// What the store folded, or `None` if the compaction failed (then nothing changed).
    async fn run(self) -> Option<Compacted> {
        match self.store.compact(&self.room, &YrsFold).await {
            Ok(folded) if folded.rows == 0 => {
                debug!(room = %self.room, "nothing to compact: another node folded the log");
                Some(folded)
            }
            Ok(folded) => {
                METRICS.compactions.inc();
                info!(room = %self.room, rows = folded.rows, bytes = folded.bytes, upto_id = folded.upto_id, "compacted");
                Some(folded)
            }
            Err(e) => {
                METRICS.store_errors.compact.inc();
                warn!(room = %self.room, error = %e, "compaction failed");
                None
            }
        }
    }
}

/// Closes a connection whose bytes the engine refused.
fn refuse(out: &Outbox, conn: ConnId, e: &dyn std::fmt::Display) {
    warn!(conn = %conn, error = %e, "refusing update");
    METRICS.closes.inc(CloseCode::InvalidData);
    out.close(CloseCode::InvalidData, "update cannot be applied");
}

/// A room asks again with its own summary at most this often when another node shows it has
/// more, so two nodes that differ settle in one round trip instead of echoing summaries.
const EXCHANGE_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(250);

/// A write sequence number no commit ever reaches: what an update that is not (fully) stored
/// waits for.
const NEVER: u64 = u64::MAX;

/// The engine panicked on some input.
struct Poisoned;

/// Whether a flush ends with a compaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fold {
    IfTail,
    Skip,
}

#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Doc(#[from] DocError),
}
