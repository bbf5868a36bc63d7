//! Which other nodes are alive, judged by their heartbeats on the broker's node channel.
//!
//! Pure bookkeeping: the hub feeds it heartbeats and departures and asks it, on its own clock,
//! which nodes fell silent; the rooms then drop the presence of those nodes' clients.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::ids::NodeId;

/// How often a node announces itself.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// A node not heard from for this long is taken for dead (well inside the 15 s in which its
/// clients' presence must disappear elsewhere).
pub const NODE_TIMEOUT: Duration = Duration::from_secs(8);

/// The other nodes this node has heard from, and when.
#[derive(Debug)]
pub struct NodeTracker {
    last_seen: HashMap<NodeId, Instant>,
    timeout: Duration,
}

impl NodeTracker {
    /// A tracker that declares a node dead after `timeout` of silence.
    pub fn new(timeout: Duration) -> Self {
        Self {
            last_seen: HashMap::new(),
            timeout,
        }
    }

    /// Records a heartbeat; returns whether the node is new (or back).
    pub fn heard(&mut self, node: &NodeId, now: Instant) -> bool {
        self.last_seen.insert(node.clone(), now).is_none()
    }

    /// Records a graceful departure; returns whether the node was known.
    pub fn left(&mut self, node: &NodeId) -> bool {
        self.last_seen.remove(node).is_some()
    }

    /// Forgets and returns the nodes silent for longer than the timeout.
    pub fn expire(&mut self, now: Instant) -> Vec<NodeId> {
        let timeout = self.timeout;
        let mut dead = Vec::new();
        self.last_seen.retain(|node, seen| {
            let alive = now.saturating_duration_since(*seen) < timeout;
            if !alive {
                dead.push(node.clone());
            }
            alive
        });
        dead.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        dead
    }

    /// Number of other nodes believed alive.
    pub fn alive(&self) -> usize {
        self.last_seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn silent_nodes_expire_and_heartbeats_keep_them() {
        let mut t = NodeTracker::new(Duration::from_secs(8));
        let (a, b) = (NodeId::new("a"), NodeId::new("b"));
        assert!(t.heard(&a, Instant::now()));
        assert!(t.heard(&b, Instant::now()));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!t.heard(&a, Instant::now()));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(t.expire(Instant::now()), vec![b.clone()]);
        assert_eq!(t.alive(), 1);
        assert!(
            t.heard(&b, Instant::now()),
            "a node that comes back is new again"
        );
        assert!(t.left(&a));
        assert!(!t.left(&a));
    }
}
