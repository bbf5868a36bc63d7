//! A room's presence: client id -> (clock, JSON state, owning connection, last renewal).
//!
//! Pure logic, no I/O: callers pass the time. It decides which incoming entries are news (so the
//! message is relayed as it came, encoded once), builds the full state for joiners, and produces
//! the null states to broadcast when a connection closes or a state is not renewed in time
//! (yrs has no such sweep; y-protocols clients expect one).

use std::time::Duration;

use tandem_protocol::awareness::{encode_entries, AwarenessEntry, AwarenessUpdate};
use tokio::time::Instant;

use crate::hashing::FastMap;
use crate::ids::{ConnId, NodeId};
use crate::metrics::METRICS;

/// Who announced a client's state: a connection on this node, or another node (which relayed
/// it from one of its connections).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    /// A connection on this node.
    Local(ConnId),
    /// Another node.
    Node(NodeId),
}

/// How long a state lives without renewal; y-protocols clients renew every 15 s.
pub const AWARENESS_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct ClientState {
    clock: u64,
    /// `None` once the client announced it left (kept so that older clocks stay refused).
    state: Option<Box<str>>,
    owner: Owner,
    renewed: Instant,
}

/// The awareness states of one room.
#[derive(Debug, Default)]
pub struct Awareness {
    clients: FastMap<u64, ClientState>,
}

impl Awareness {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies an update received from `owner`. Returns whether any entry was news (a newer
    /// clock, or the same clock turning the state to null), i.e. whether the message should be
    /// relayed.
    pub fn apply(&mut self, owner: &Owner, update: &AwarenessUpdate<'_>, now: Instant) -> bool {
        let mut news = false;
        // Change in live states, for the process-wide gauge.
        let mut live_delta = 0i64;
        for entry in &update.entries {
            let removal = entry.is_removal();
            let (accept, was_live) = match self.clients.get(&entry.client_id) {
                None => (true, false),
                Some(cur) => (
                    entry.clock > cur.clock
                        || (entry.clock == cur.clock && removal && cur.state.is_some()),
                    cur.state.is_some(),
                ),
            };
            if !accept {
                continue;
            }
            news = true;
            live_delta += i64::from(!removal) - i64::from(was_live);
            self.clients.insert(
                entry.client_id,
                ClientState {
                    clock: entry.clock,
                    state: (!removal).then(|| entry.state.into()),
                    owner: owner.clone(),
                    renewed: now,
                },
            );
        }
        if live_delta != 0 {
            METRICS.awareness_states.add(live_delta);
        }
        news
    }

    /// An awareness payload with every live state, for a joiner or a query; `None` if there is
    /// none.
    pub fn full_state(&self) -> Option<Vec<u8>> {
        self.encode_live(|_| true)
    }

    /// An awareness payload with the live states of this node's own connections (what another
    /// node that just loaded the room needs from us); `None` if there is none.
    pub fn local_state(&self) -> Option<Vec<u8>> {
        self.encode_live(|o| matches!(o, Owner::Local(_)))
    }

    fn encode_live(&self, mut keep: impl FnMut(&Owner) -> bool) -> Option<Vec<u8>> {
        let live: Vec<AwarenessEntry<'_>> = self
            .clients
            .iter()
            .filter(|(_, c)| keep(&c.owner))
            .filter_map(|(&client_id, c)| {
                c.state.as_deref().map(|state| AwarenessEntry {
                    client_id,
                    clock: c.clock,
                    state,
                })
            })
            .collect();
        if live.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        encode_entries(&mut out, live.into_iter());
        Some(out)
    }

    /// Forgets every client announced by `owner` and returns the null states to broadcast for
    /// those that were still live.
    pub fn remove_owner(&mut self, owner: &Owner) -> Option<Vec<u8>> {
        self.remove_where(|c| c.owner == *owner)
    }

    /// Drops states not renewed within `timeout` and returns the null states to broadcast. Null
    /// entries older than the timeout are forgotten entirely.
    pub fn sweep(&mut self, now: Instant, timeout: Duration) -> Option<Vec<u8>> {
        self.remove_where(|c| now.saturating_duration_since(c.renewed) >= timeout)
    }

    /// Number of live (non-null) states.
    pub fn live(&self) -> usize {
        self.clients.values().filter(|c| c.state.is_some()).count()
    }

    fn remove_where(&mut self, mut pred: impl FnMut(&ClientState) -> bool) -> Option<Vec<u8>> {
        let mut gone: Vec<(u64, u64)> = Vec::new();
        self.clients.retain(|&id, c| {
            if !pred(c) {
                return true;
            }
            if c.state.is_some() {
                gone.push((id, c.clock + 1));
            }
            false
        });
        if gone.is_empty() {
            return None;
        }
        METRICS.awareness_states.add(-(gone.len() as i64));
        gone.sort_unstable();
        let mut out = Vec::new();
        encode_entries(
            &mut out,
            gone.iter().map(|&(client_id, clock)| AwarenessEntry {
                client_id,
                clock,
                state: "null",
            }),
        );
        Some(out)
    }
}

impl Drop for Awareness {
    /// The room is unloading: its live states are no longer held.
    fn drop(&mut self) {
        let live = self.live();
        if live > 0 {
            METRICS.awareness_states.add(-(live as i64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L1: Owner = Owner::Local(ConnId(1));
    const L2: Owner = Owner::Local(ConnId(2));

    fn update(entries: &[(u64, u64, &'static str)]) -> AwarenessUpdate<'static> {
        AwarenessUpdate {
            entries: entries
                .iter()
                .map(|&(client_id, clock, state)| AwarenessEntry {
                    client_id,
                    clock,
                    state,
                })
                .collect(),
        }
    }

    fn decode(payload: &[u8]) -> Vec<(u64, u64, String)> {
        AwarenessUpdate::decode(payload)
            .unwrap()
            .entries
            .iter()
            .map(|e| (e.client_id, e.clock, e.state.to_string()))
            .collect()
    }

    #[test]
    fn newer_clock_wins_and_older_is_refused() {
        let mut a = Awareness::new();
        let now = Instant::now();
        assert!(a.apply(&L1, &update(&[(5, 2, r#"{"n":1}"#)]), now));
        assert!(!a.apply(&L1, &update(&[(5, 1, r#"{"n":0}"#)]), now));
        assert!(!a.apply(&L1, &update(&[(5, 2, r#"{"n":9}"#)]), now));
        assert!(a.apply(&L1, &update(&[(5, 3, r#"{"n":2}"#)]), now));
        assert_eq!(
            decode(&a.full_state().unwrap()),
            vec![(5, 3, r#"{"n":2}"#.to_string())]
        );
    }

    #[test]
    fn equal_clock_with_null_removes() {
        let mut a = Awareness::new();
        let now = Instant::now();
        a.apply(&L1, &update(&[(5, 2, "{}")]), now);
        assert!(a.apply(&L1, &update(&[(5, 2, "null")]), now));
        assert_eq!(a.live(), 0);
        assert!(a.full_state().is_none());
        // A stale state for a client that left stays refused.
        assert!(!a.apply(&L1, &update(&[(5, 1, "{}")]), now));
    }

    #[test]
    fn closing_a_connection_nulls_only_its_clients_with_a_newer_clock() {
        let mut a = Awareness::new();
        let now = Instant::now();
        a.apply(&L1, &update(&[(5, 2, "{}"), (6, 7, "{}")]), now);
        a.apply(&L2, &update(&[(9, 1, "{}")]), now);
        let gone = decode(&a.remove_owner(&L1).unwrap());
        assert_eq!(gone, vec![(5, 3, "null".into()), (6, 8, "null".into())]);
        assert_eq!(a.live(), 1);
        assert!(a.remove_owner(&L1).is_none());
    }

    #[test]
    fn local_state_leaves_out_other_nodes_clients_and_node_loss_nulls_them() {
        let mut a = Awareness::new();
        let now = Instant::now();
        let remote = Owner::Node(NodeId::new("n2"));
        a.apply(&L1, &update(&[(5, 1, "{}")]), now);
        a.apply(&remote, &update(&[(6, 1, "{}")]), now);
        assert_eq!(decode(&a.local_state().unwrap()), vec![(5, 1, "{}".into())]);
        assert_eq!(
            decode(&a.remove_owner(&remote).unwrap()),
            vec![(6, 2, "null".into())]
        );
        assert_eq!(a.live(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn states_not_renewed_expire_after_the_timeout() {
        let mut a = Awareness::new();
        a.apply(&L1, &update(&[(5, 1, "{}")]), Instant::now());
        tokio::time::advance(Duration::from_secs(20)).await;
        a.apply(&L2, &update(&[(6, 1, "{}")]), Instant::now());
        assert!(a.sweep(Instant::now(), AWARENESS_TIMEOUT).is_none());
        tokio::time::advance(Duration::from_secs(10)).await;
        let gone = decode(&a.sweep(Instant::now(), AWARENESS_TIMEOUT).unwrap());
        assert_eq!(gone, vec![(5, 2, "null".into())]);
        // Renewal (a newer clock) keeps a state alive.
        a.apply(&L2, &update(&[(6, 2, "{}")]), Instant::now());
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(a.sweep(Instant::now(), AWARENESS_TIMEOUT).is_none());
        assert_eq!(a.live(), 1);
    }
}
