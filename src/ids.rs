//! Newtypes for the identifiers that cross module boundaries.

use std::fmt;
use std::sync::Arc;

/// A room's name: the URL path after the leading `/`, without the query string. May contain `/`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(Arc<str>);

impl RoomId {
    /// Longest room name accepted, in bytes.
    pub const MAX_LEN: usize = 512;

    /// Validates and wraps a room name: non-empty, at most [`RoomId::MAX_LEN`] bytes, no control
    /// characters.
    pub fn new(name: &str) -> Result<Self, InvalidRoomId> {
        if name.is_empty() {
            return Err(InvalidRoomId::Empty);
        }
        if name.len() > Self::MAX_LEN {
            return Err(InvalidRoomId::TooLong);
        }
        if name.chars().any(char::is_control) {
            return Err(InvalidRoomId::ControlCharacter);
        }
        Ok(Self(Arc::from(name)))
    }

    /// The room name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoomId({:?})", &*self.0)
    }
}

/// Why a string is not a room name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRoomId {
    /// The name is empty.
    #[error("room name is empty")]
    Empty,
    /// The name is longer than [`RoomId::MAX_LEN`] bytes.
    #[error("room name is longer than 512 bytes")]
    TooLong,
    /// The name holds a control character.
    #[error("room name contains a control character")]
    ControlCharacter,
}

/// One WebSocket connection on this node; unique for the life of the process.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl ConnId {
    /// A fresh id, never handed out before in this process.
    pub fn next() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// This node's name in logs, envelopes and metrics.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct NodeId(Arc<str>);

impl NodeId {
    /// Wraps a node name.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(name.into())
    }

    /// A random node name, `node-` and 8 hex digits.
    pub fn random() -> Self {
        Self::new(format!("node-{:08x}", rand::random::<u32>()))
    }

    /// The node name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
