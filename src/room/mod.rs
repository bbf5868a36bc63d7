//! Rooms: one actor task per room owns its document, its peers and their awareness.
//!
//! Connections talk to a room only through its [`RoomHandle`] (a bounded inbox). Nothing outside
//! the actor touches room state, so no lock guards it.

mod actor;
pub mod awareness;
mod mailbox;
pub mod peer;
pub mod policy;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

pub(crate) use actor::spawn;
pub use actor::RoomContext;

use crate::doc::DecodedUpdate;
use crate::ids::{ConnId, NodeId, RoomId};
use crate::session::outbox::Outbox;
use policy::CompactionPolicy;

/// How rooms behave; shared by every room of a node.
#[derive(Debug, Clone)]
pub struct RoomSettings {
    /// Capacity of a room's inbox, in commands. A full inbox makes senders wait.
    pub inbox_capacity: usize,
    /// How long a room with no peers stays loaded before it unloads (once everything is stored).
    pub idle_grace: Duration,
    /// How often a room sweeps awareness and checks for idleness and compaction.
    pub tick: Duration,
    /// How long an awareness state lives without renewal.
    pub awareness_timeout: Duration,
    /// When the update log is folded into a snapshot.
    pub compaction: CompactionPolicy,
    /// How often a room with recent activity repeats the state exchange with other nodes, so
    /// that a lost broker message never leaves two nodes different for longer.
    pub sync_interval: Duration,
    /// Send each connection its own updates back once they are stored (for y-websocket v4
    /// providers, whose sync status counts that echo as confirmation). Off by default.
    pub echo_own_updates: bool,
    /// Connections one room serves at once on this node; 0: unlimited.
    pub max_peers: usize,
    /// Rooms loaded at once on this node; 0: unlimited.
    pub max_rooms: usize,
    /// Largest document, in encoded bytes: updates that would grow it past this are refused
    /// (the sender is closed with 1009; what is stored stays). 0: unlimited.
    pub max_document_bytes: usize,
}

impl Default for RoomSettings {
    fn default() -> Self {
        Self {
            inbox_capacity: 256,
            idle_grace: Duration::from_secs(30),
            tick: Duration::from_secs(2),
            awareness_timeout: awareness::AWARENESS_TIMEOUT,
            compaction: CompactionPolicy::default(),
            sync_interval: Duration::from_secs(10),
            echo_own_updates: false,
            max_peers: 5000,
            max_rooms: 100_000,
            max_document_bytes: 64 << 20,
        }
    }
}

/// Why a join did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// The room is unloading or restarting; joining again spawns a fresh actor.
    #[error("the room is unloading")]
    Unloading,
    /// The room's stored state could not be loaded.
    #[error("the room's document could not be loaded from the store")]
    LoadFailed,
    /// The node is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The room has as many connections as it may.
    #[error("the room is full")]
    Full,
    /// The node has as many rooms loaded as it may.
    #[error("the node has too many rooms loaded")]
    TooManyRooms,
}

/// A message to a room actor.
#[derive(Debug)]
pub enum RoomCommand {
    /// A connection joins; the room sends it sync step 1 and every awareness state.
    Join {
        /// The joining connection.
        conn: ConnId,
        /// Where the room writes frames for it.
        outbox: Outbox,
        /// Told once the join took effect, or why it did not.
        reply: oneshot::Sender<Result<(), JoinError>>,
    },
    /// A connection left; its awareness states are nulled for the others.
    Leave {
        /// The leaving connection.
        conn: ConnId,
    },
    /// Sync step 1 from a client: answer with step 2.
    SyncStep1 {
        /// The sender.
        conn: ConnId,
        /// Its encoded state vector (already checked to decode).
        state_vector: Bytes,
    },
    /// Sync step 2 or update from a client: apply, relay, store.
    Update {
        /// The sender.
        conn: ConnId,
        /// The decoded update.
        update: Box<DecodedUpdate>,
    },
    /// An awareness message from a client.
    Awareness {
        /// The sender.
        conn: ConnId,
        /// The whole message as it arrived (relayed unchanged).
        message: Bytes,
        /// Where the awareness update payload (already checked to decode) starts in `message`:
        /// an offset rather than a second `Bytes`, to keep commands small.
        payload_at: u32,
    },
    /// Query awareness: send the client every known state.
    QueryAwareness {
        /// The sender.
        conn: ConnId,
    },
    /// The connection asks for storage acknowledgements of its updates.
    AckRequest {
        /// The sender.
        conn: ConnId,
    },
    /// An envelope another node published for this room (see `broker::envelope`).
    Remote {
        /// The envelope as it arrived.
        envelope: Bytes,
    },
    /// Another node died or left: drop the presence of its clients.
    NodeGone {
        /// The node.
        node: NodeId,
    },
}

/// A cheap, cloneable address of a running room actor.
#[derive(Debug, Clone)]
pub struct RoomHandle {
    room: RoomId,
    /// Distinguishes successive actors of the same room, so that an unloading actor removes
    /// only its own entry from the hub.
    generation: u64,
    tx: mpsc::Sender<RoomCommand>,
    /// Set when something for this room may have been lost (a full inbox, a broker gap); the
    /// actor then repeats the state exchange with the other nodes.
    resync: Arc<AtomicBool>,
}

impl RoomHandle {
    /// The room this handle addresses.
    pub fn room(&self) -> &RoomId {
        &self.room
    }

    /// Which actor of the room this is.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Sends a command, waiting while the inbox is full (only the sender slows down).
    /// Fails if the actor has exited.
    pub async fn send(&self, cmd: RoomCommand) -> Result<(), RoomGone> {
        self.tx.send(cmd).await.map_err(|_| RoomGone)
    }

    /// Hands an envelope from another node to the room without waiting. A full inbox marks the
    /// room for resync instead: the broker's reader never blocks, and the next state exchange
    /// carries what was dropped.
    pub fn offer_remote(&self, envelope: Bytes) {
        match self.tx.try_send(RoomCommand::Remote { envelope }) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.mark_resync(),
        }
    }

    /// Asks the room to repeat the state exchange with other nodes.
    pub fn mark_resync(&self) {
        self.resync.store(true, Ordering::Release);
    }

    /// Tells the room that `node` is gone. This must not be lost, so a full inbox is waited on
    /// in a task of its own.
    pub fn node_gone(&self, node: NodeId) {
        if let Err(mpsc::error::TrySendError::Full(cmd)) =
            self.tx.try_send(RoomCommand::NodeGone { node })
        {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(cmd).await;
            });
        }
    }

    /// Joins the room with `outbox` and returns a guard whose drop leaves it.
    pub async fn join(&self, conn: ConnId, outbox: Outbox) -> Result<Membership, JoinError> {
        let (reply, rx) = oneshot::channel();
        self.send(RoomCommand::Join {
            conn,
            outbox,
            reply,
        })
        .await
        .map_err(|_| JoinError::Unloading)?;
        rx.await.map_err(|_| JoinError::Unloading)??;
        Ok(Membership {
            handle: self.clone(),
            conn,
        })
    }
}

/// The room actor has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the room actor has exited")]
pub struct RoomGone;

/// Proof that a connection is in a room; dropping it sends the leave (even on panic or
/// cancellation), so a room never keeps a dead connection's presence.
#[derive(Debug)]
pub struct Membership {
    handle: RoomHandle,
    conn: ConnId,
}

impl Membership {
    /// The room's handle.
    pub fn handle(&self) -> &RoomHandle {
        &self.handle
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let cmd = RoomCommand::Leave { conn: self.conn };
        match self.handle.tx.try_send(cmd) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(cmd)) => {
                let tx = self.handle.tx.clone();
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = tx.send(cmd).await;
                    });
                }
            }
        }
    }
}

/// Called by an actor on its way out so that the hub forgets exactly that actor.
pub type OnExit = Box<dyn FnOnce(&RoomId, u64) + Send + Sync>;

/// The actor's end of a room's channels.
pub(crate) struct Inbox {
    pub(crate) rx: mpsc::Receiver<RoomCommand>,
    pub(crate) resync: Arc<AtomicBool>,
}

/// Builds a handle and the receiving end of its inbox.
pub(crate) fn channel(room: RoomId, generation: u64, capacity: usize) -> (RoomHandle, Inbox) {
    let (tx, rx) = mpsc::channel(capacity);
    let resync = Arc::new(AtomicBool::new(false));
    let handle = RoomHandle {
        room,
        generation,
        tx,
        resync: resync.clone(),
    };
    (handle, Inbox { rx, resync })
}

#[cfg(test)]
mod tests {
    use super::RoomCommand;

    /// A room's command queue (tokio's bounded channel) allocates 32 commands at a time and
    /// keeps two such blocks: at 217 bytes a command, that was about 14 KB per idle room. Large
    /// payloads go boxed.
    #[test]
    fn a_room_command_stays_small() {
        let size = std::mem::size_of::<RoomCommand>();
        assert!(size <= 48, "RoomCommand is {size} bytes");
    }
}
