//! The hub: room id -> running room actor, with race-free get-or-spawn.
//!
//! The handle is inserted into the map synchronously, inside the entry guard, and the actor
//! loads its snapshot inside its own task: two first joiners can never load two copies. Nothing
//! is awaited while a map guard is held.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::Bytes;
use dashmap::DashMap;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::broker::envelope::{Envelope, Kind};
use crate::broker::Inbound;
use crate::ids::{ConnId, NodeId, RoomId};
use crate::metrics::METRICS;
use crate::nodes::{NodeTracker, HEARTBEAT_INTERVAL, NODE_TIMEOUT};
use crate::room::{self, JoinError, Membership, RoomContext, RoomHandle};
use crate::session::outbox::Outbox;

/// How many times a join retries when it meets a room that is unloading.
const JOIN_ATTEMPTS: usize = 5;

/// Every room loaded on this node.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    rooms: DashMap<RoomId, RoomHandle>,
    ctx: Arc<RoomContext>,
    /// Tracks room actors so that shutdown can wait for every room to flush.
    tracker: TaskTracker,
    next_generation: AtomicU64,
}

impl Hub {
    /// A hub whose rooms share `ctx`; room tasks are spawned on `tracker`.
    pub fn new(ctx: Arc<RoomContext>, tracker: TaskTracker) -> Self {
        Self {
            inner: Arc::new(Inner {
                rooms: DashMap::new(),
                ctx,
                tracker,
                next_generation: AtomicU64::new(1),
            }),
        }
    }

    /// The running actor of `room`, spawning (and loading) it if there is none.
    pub fn room(&self, room: &RoomId) -> RoomHandle {
        if let Some(h) = self.inner.rooms.get(room) {
            return h.clone();
        }
        self.inner
            .rooms
            .entry(room.clone())
            .or_insert_with(|| {
                let generation = self.inner.next_generation.fetch_add(1, Ordering::Relaxed);
                let (handle, inbox) = room::channel(
                    room.clone(),
                    generation,
                    self.inner.ctx.settings.inbox_capacity,
                );
                let weak: Weak<Inner> = Arc::downgrade(&self.inner);
                let on_exit: room::OnExit = Box::new(move |id, generation| {
                    if let Some(inner) = weak.upgrade() {
                        inner
                            .rooms
                            .remove_if(id, |_, h| h.generation() == generation);
                    }
                });
                room::spawn(
                    self.inner.ctx.clone(),
                    &self.inner.tracker,
                    room.clone(),
                    generation,
                    inbox,
                    on_exit,
                );
                handle
            })
            .clone()
    }

    /// Joins `conn` to `room`, retrying when the actor it meets is unloading.
    pub async fn join(
        &self,
        room: &RoomId,
        conn: ConnId,
        outbox: Outbox,
    ) -> Result<Membership, JoinError> {
        let mut last = JoinError::Unloading;
        for _ in 0..JOIN_ATTEMPTS {
            if self.inner.ctx.shutdown.is_cancelled() {
                return Err(JoinError::ShuttingDown);
            }
            let max_rooms = self.inner.ctx.settings.max_rooms;
            if max_rooms > 0 && self.len() >= max_rooms && !self.is_loaded(room) {
                return Err(JoinError::TooManyRooms);
            }
            match self.room(room).join(conn, outbox.clone()).await {
                Err(JoinError::Unloading) => {
                    last = JoinError::Unloading;
                    tokio::task::yield_now().await;
                }
                Err(JoinError::LoadFailed) => {
                    // The connection closes with 1013.
                    METRICS.try_again_later.load_failed.inc();
                    return Err(JoinError::LoadFailed);
                }
                other => return other,
            }
        }
        // The connection closes with 1013.
        METRICS.try_again_later.room_busy.inc();
        Err(last)
    }

    /// Number of rooms loaded.
    pub fn len(&self) -> usize {
        self.inner.rooms.len()
    }

    /// Whether no room is loaded.
    pub fn is_empty(&self) -> bool {
        self.inner.rooms.is_empty()
    }

    /// Whether `room` is loaded.
    pub fn is_loaded(&self, room: &RoomId) -> bool {
        self.inner.rooms.contains_key(room)
    }

    /// Publishes heartbeats and watches other nodes' until the node shuts down; then announces
    /// the departure so the others drop this node's presence at once. Does nothing without a
    /// broker.
    pub fn spawn_heartbeats(&self, inbound: &HubInbound, tracker: &TaskTracker) {
        let Some(broker) = self.inner.ctx.broker.clone() else {
            return;
        };
        let node = self.inner.ctx.node.clone();
        let shutdown = self.inner.ctx.shutdown.clone();
        let nodes = inbound.nodes.clone();
        let hub = self.clone();
        tracker.spawn(async move {
            let beat = Envelope {
                origin: node.as_str(),
                kind: Kind::Heartbeat,
                target: None,
                payload: &[],
            }
            .encode();
            let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let _ = broker.publish_node(beat.clone());
                        let dead = lock(&nodes).expire(Instant::now());
                        for gone in dead {
                            warn!(node = %gone, "node fell silent; dropping its clients' presence");
                            hub.node_gone(&gone);
                        }
                    }
                    () = shutdown.cancelled() => break,
                }
            }
            let left = Envelope {
                origin: node.as_str(),
                kind: Kind::NodeLeft,
                target: None,
                payload: &[],
            }
            .encode();
            let _ = broker.publish_node(left);
        });
    }

    fn node_gone(&self, node: &NodeId) {
        for entry in self.inner.rooms.iter() {
            entry.value().node_gone(node.clone());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The hub's side of the broker: routes other nodes' envelopes to loaded rooms without ever
/// blocking the broker's reader. Created before the hub (the broker needs it to connect) and
/// attached with [`HubInbound::attach`].
pub struct HubInbound {
    node: NodeId,
    hub: OnceLock<Weak<Inner>>,
    nodes: Arc<Mutex<NodeTracker>>,
}

impl HubInbound {
    /// An inbound handler for node `node`, not yet attached to a hub.
    pub fn new(node: NodeId) -> Arc<Self> {
        Arc::new(Self {
            node,
            hub: OnceLock::new(),
            nodes: Arc::new(Mutex::new(NodeTracker::new(NODE_TIMEOUT))),
        })
    }

    /// Routes inbound traffic to `hub` from now on.
    pub fn attach(&self, hub: &Hub) {
        let _ = self.hub.set(Arc::downgrade(&hub.inner));
    }

    fn hub(&self) -> Option<Hub> {
        self.hub.get()?.upgrade().map(|inner| Hub { inner })
    }
}

impl Inbound for HubInbound {
    fn envelope(&self, room: &RoomId, envelope: Bytes) {
        METRICS.broker_received.inc();
        let Ok(env) = Envelope::decode(&envelope) else {
            debug!(room = %room, "ignoring a malformed envelope");
            return;
        };
        if env.origin == self.node.as_str() {
            return; // Redis hands a subscriber its own publishes.
        }
        let Some(hub) = self.hub() else { return };
        // Only loaded rooms: a node never loads a room because another node wrote to it.
        let handle = hub.inner.rooms.get(room).map(|h| h.clone());
        if let Some(handle) = handle {
            handle.offer_remote(envelope);
        }
    }

    fn node_event(&self, envelope: Bytes) {
        let Ok(env) = Envelope::decode(&envelope) else {
            return;
        };
        if env.origin == self.node.as_str() {
            return;
        }
        let node = NodeId::new(env.origin);
        match env.kind {
            Kind::Heartbeat if lock(&self.nodes).heard(&node, Instant::now()) => {
                info!(node = %node, "node joined");
            }
            Kind::NodeLeft => {
                if lock(&self.nodes).left(&node) {
                    info!(node = %node, "node left");
                }
                if let Some(hub) = self.hub() {
                    hub.node_gone(&node);
                }
            }
            _ => {}
        }
    }

    fn gap(&self) {
        METRICS.broker_gaps.inc();
        if let Some(hub) = self.hub() {
            for entry in hub.inner.rooms.iter() {
                entry.value().mark_resync();
            }
        }
    }
}
