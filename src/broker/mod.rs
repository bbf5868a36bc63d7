//! Cross-node fan-out: the [`Broker`] trait, the [`envelope`] format, an in-process bus and Redis.
//!
//! Delivery is **at most once**, like Redis pub/sub: an envelope can be lost (a reconnect, a
//! subscriber cut off for lagging) but is never corrupted. CRDT updates are idempotent and
//! commutative, so duplicates are harmless, and gaps are healed by the Yjs sync protocol between
//! nodes (a state-vector exchange, see [`envelope::Kind::SyncStep1`]): a broker reports every
//! possible loss through [`Inbound::gap`], and the hub then makes every room resync.
//!
//! Brokers never know about rooms' state: they push inbound traffic into an [`Inbound`] handler
//! that the hub implements.

pub mod envelope;
pub mod memory;
pub mod redis;

use async_trait::async_trait;
use bytes::Bytes;

use crate::ids::RoomId;

/// Why a broker operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker's server could not be reached or refused the command.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The configuration is not usable (e.g. a malformed URL).
    #[error("invalid broker configuration: {0}")]
    Config(String),
}

/// Why an envelope was not queued for publishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The outgoing queue is full: the envelope was not sent. Policy: the caller marks the room
    /// for resync, so the next state-vector exchange carries what this envelope would have.
    #[error("broker outgoing queue full")]
    Full,
    /// The broker has shut down.
    #[error("broker closed")]
    Closed,
}

/// Receives what other nodes publish. Implementations must return quickly and never block: the
/// broker's reader calls them for every envelope.
pub trait Inbound: Send + Sync + 'static {
    /// An envelope published by another node for `room`.
    fn envelope(&self, room: &RoomId, envelope: Bytes);
    /// An envelope on the node channel (heartbeats, node departures).
    fn node_event(&self, envelope: Bytes);
    /// Envelopes may have been lost (reconnect, lagging reader): every room should resync.
    fn gap(&self);
}

/// Publishes and subscribes to room channels shared by every node.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Starts delivering `room`'s envelopes to this node's [`Inbound`]. Idempotent.
    async fn subscribe(&self, room: &RoomId) -> Result<(), BrokerError>;

    /// Stops delivering `room`'s envelopes. Idempotent.
    async fn unsubscribe(&self, room: &RoomId) -> Result<(), BrokerError>;

    /// Queues `envelope` for every other node subscribed to `room`, without waiting.
    fn publish(&self, room: &RoomId, envelope: Bytes) -> Result<(), PublishError>;

    /// Queues `envelope` on the node channel (heartbeats), without waiting.
    fn publish_node(&self, envelope: Bytes) -> Result<(), PublishError>;

    /// Checks that the broker's server answers (for readiness).
    async fn ping(&self) -> Result<(), BrokerError>;

    /// Stops the broker's tasks; queued envelopes are sent first when possible.
    async fn close(&self);
}

/// The channel name of a room. The hash tag (`{…}`) keeps a room on one Redis Cluster shard, so
/// sharded pub/sub (SSUBSCRIBE/SPUBLISH) can be used.
pub fn room_channel(room: &RoomId) -> String {
    format!("tandem:{{{}}}", room.as_str())
}

/// The room a channel name belongs to, if it is a room channel.
pub fn channel_room(channel: &str) -> Option<RoomId> {
    let inner = channel.strip_prefix("tandem:{")?.strip_suffix('}')?;
    RoomId::new(inner).ok()
}

/// The channel every node publishes heartbeats on.
pub const NODE_CHANNEL: &str = "tandem:nodes";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_channels_round_trip_even_with_braces_and_slashes() {
        for name in ["a", "team/doc-1", "we{ird}", "}{"] {
            let room = RoomId::new(name).unwrap();
            assert_eq!(channel_room(&room_channel(&room)), Some(room));
        }
        assert_eq!(channel_room(NODE_CHANNEL), None);
    }
}
