//! The in-process bus: several nodes in one process (tests, embedded clusters) share one
//! [`MemoryBus`]. It keeps Redis pub/sub's contract: asynchronous, at most once, a full receiver
//! loses envelopes and is told so with [`Inbound::gap`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Broker, BrokerError, Inbound, PublishError};
use crate::ids::{NodeId, RoomId};

/// Envelopes waiting for one node's inbound handler before it counts as lagging.
pub const NODE_QUEUE: usize = 4096;

/// What a node's delivery task hands to its handler.
enum Delivery {
    Room(RoomId, Bytes),
    Node(Bytes),
}

struct Member {
    tx: mpsc::Sender<Delivery>,
    rooms: HashSet<RoomId>,
    /// Set when an envelope could not be queued; the delivery task reports a gap.
    lagged: Arc<AtomicBool>,
    /// A disconnected member neither sends nor receives (fault injection for tests).
    connected: bool,
}

/// A bus shared by the nodes of one process.
#[derive(Default, Clone)]
pub struct MemoryBus {
    members: Arc<Mutex<HashMap<NodeId, Member>>>,
}

impl MemoryBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Joins the bus as `node`; envelopes for it go to `inbound`. Must be called inside a Tokio
    /// runtime (it starts the node's delivery task).
    pub fn join(&self, node: NodeId, inbound: Arc<dyn Inbound>) -> MemoryBroker {
        let (tx, mut rx) = mpsc::channel(NODE_QUEUE);
        let lagged = Arc::new(AtomicBool::new(false));
        let flag = lagged.clone();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                if flag.swap(false, Ordering::AcqRel) {
                    inbound.gap();
                }
                match d {
                    Delivery::Room(room, bytes) => inbound.envelope(&room, bytes),
                    Delivery::Node(bytes) => inbound.node_event(bytes),
                }
            }
        });
        let member = Member {
            tx,
            rooms: HashSet::new(),
            lagged,
            connected: true,
        };
        self.lock().insert(node.clone(), member);
        MemoryBroker {
            bus: Arc::downgrade(&self.members),
            node,
        }
    }

    /// Cuts `node` off the bus (`false`) or reconnects it (`true`). While cut off it loses
    /// everything in both directions; on reconnect it is told about the gap.
    pub fn set_connected(&self, node: &NodeId, connected: bool) {
        if let Some(m) = self.lock().get_mut(node) {
            if connected && !m.connected {
                m.lagged.store(true, Ordering::Release);
                // Wake the delivery task so the gap is reported even with no traffic.
                let _ = m.tx.try_send(Delivery::Node(Bytes::new()));
            }
            m.connected = connected;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Member>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One node's handle on a [`MemoryBus`].
pub struct MemoryBroker {
    bus: Weak<Mutex<HashMap<NodeId, Member>>>,
    node: NodeId,
}

impl MemoryBroker {
    fn with_members<T>(&self, f: impl FnOnce(&mut HashMap<NodeId, Member>) -> T) -> Option<T> {
        let bus = self.bus.upgrade()?;
        let mut members = bus.lock().unwrap_or_else(|e| e.into_inner());
        Some(f(&mut members))
    }

    fn fan_out(&self, room: Option<&RoomId>, bytes: Bytes) -> Result<(), PublishError> {
        self.with_members(|members| {
            if !members.get(&self.node).is_some_and(|m| m.connected) {
                return; // A cut-off node's publishes are lost, as with a dead Redis link.
            }
            for (id, m) in members.iter() {
                if *id == self.node || !m.connected {
                    continue;
                }
                let delivery = match room {
                    Some(r) if m.rooms.contains(r) => Delivery::Room(r.clone(), bytes.clone()),
                    Some(_) => continue,
                    None => Delivery::Node(bytes.clone()),
                };
                if m.tx.try_send(delivery).is_err() {
                    m.lagged.store(true, Ordering::Release);
                }
            }
        })
        .ok_or(PublishError::Closed)
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn subscribe(&self, room: &RoomId) -> Result<(), BrokerError> {
        self.with_members(|m| {
            if let Some(me) = m.get_mut(&self.node) {
                me.rooms.insert(room.clone());
            }
        });
        Ok(())
    }

    async fn unsubscribe(&self, room: &RoomId) -> Result<(), BrokerError> {
        self.with_members(|m| {
            if let Some(me) = m.get_mut(&self.node) {
                me.rooms.remove(room);
            }
        });
        Ok(())
    }

    fn publish(&self, room: &RoomId, envelope: Bytes) -> Result<(), PublishError> {
        self.fan_out(Some(room), envelope)
    }

    fn publish_node(&self, envelope: Bytes) -> Result<(), PublishError> {
        self.fan_out(None, envelope)
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        match self.with_members(|m| m.get(&self.node).is_some_and(|me| me.connected)) {
            Some(true) => Ok(()),
            _ => Err(BrokerError::Unavailable(
                "cut off the in-process bus".into(),
            )),
        }
    }

    async fn close(&self) {
        self.with_members(|m| m.remove(&self.node));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Default)]
    struct Recorder {
        got: Mutex<Vec<(String, Bytes)>>,
        gaps: std::sync::atomic::AtomicUsize,
    }

    impl Inbound for Recorder {
        fn envelope(&self, room: &RoomId, envelope: Bytes) {
            self.got.lock().unwrap().push((room.to_string(), envelope));
        }
        fn node_event(&self, envelope: Bytes) {
            if !envelope.is_empty() {
                self.got.lock().unwrap().push(("*".into(), envelope));
            }
        }
        fn gap(&self) {
            self.gaps.fetch_add(1, Ordering::SeqCst);
        }
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn only_other_subscribed_nodes_receive() {
        let bus = MemoryBus::new();
        let (ra, rb, rc) = (
            Arc::new(Recorder::default()),
            Arc::new(Recorder::default()),
            Arc::new(Recorder::default()),
        );
        let a = bus.join(NodeId::new("a"), ra.clone());
        let b = bus.join(NodeId::new("b"), rb.clone());
        let _c = bus.join(NodeId::new("c"), rc.clone());
        let room = RoomId::new("r").unwrap();
        a.subscribe(&room).await.unwrap();
        b.subscribe(&room).await.unwrap();
        a.publish(&room, Bytes::from_static(b"x")).unwrap();
        a.publish_node(Bytes::from_static(b"hb")).unwrap();
        settle().await;
        assert!(
            ra.got.lock().unwrap().is_empty(),
            "a node never hears itself"
        );
        assert_eq!(rb.got.lock().unwrap().len(), 2);
        assert_eq!(
            rc.got.lock().unwrap().len(),
            1,
            "c only hears the node channel"
        );
        b.unsubscribe(&room).await.unwrap();
        a.publish(&room, Bytes::from_static(b"y")).unwrap();
        settle().await;
        assert_eq!(rb.got.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_cut_off_node_loses_traffic_and_hears_of_the_gap_on_return() {
        let bus = MemoryBus::new();
        let (ra, rb) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
        let a = bus.join(NodeId::new("a"), ra.clone());
        let b = bus.join(NodeId::new("b"), rb.clone());
        let room = RoomId::new("r").unwrap();
        b.subscribe(&room).await.unwrap();
        bus.set_connected(&NodeId::new("b"), false);
        a.publish(&room, Bytes::from_static(b"lost")).unwrap();
        assert!(b.ping().await.is_err());
        bus.set_connected(&NodeId::new("b"), true);
        settle().await;
        assert!(rb.got.lock().unwrap().is_empty());
        assert_eq!(rb.gaps.load(Ordering::SeqCst), 1);
        a.publish(&room, Bytes::from_static(b"kept")).unwrap();
        settle().await;
        assert_eq!(rb.got.lock().unwrap().len(), 1);
    }
}
