//! The client-side awareness map: every known client's clock and state, merged with y-protocols'
//! rules. Pure and synchronous; time comes in as an argument.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_protocol::awareness::{encode_entries, AwarenessEntry};
use tandem_protocol::lib0::MAX_VAR_UINT;

/// What [`AwarenessMap::apply`] did with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The entry was not newer than what we know; nothing changed.
    Ignored,
    /// The client's state was set or replaced.
    Updated,
    /// The client's state was removed (or a removal was recorded for a client we never saw).
    Removed,
    /// A peer removed *our* state while we still have one. As in y-protocols we keep it and bump our
    /// clock past the removal; the caller must broadcast our state again.
    LocalReasserted,
}

/// What the map knows about one client. The clock survives the state's removal so that an old
/// message cannot bring a removed state back.
#[derive(Debug, Clone)]
struct Meta {
    clock: u64,
    state: Option<Value>,
    last_updated: Instant,
}

/// Awareness states by client id, including our own, with y-protocols' merge rules.
#[derive(Debug, Clone)]
pub struct AwarenessMap {
    local_id: u64,
    clients: HashMap<u64, Meta>,
}

impl AwarenessMap {
    /// An empty map for the client `local_id`.
    pub fn new(local_id: u64) -> Self {
        Self {
            local_id,
            clients: HashMap::new(),
        }
    }

    /// Our own client id.
    pub fn local_id(&self) -> u64 {
        self.local_id
    }

    /// Our own state, if set.
    pub fn local_state(&self) -> Option<&Value> {
        self.clients.get(&self.local_id)?.state.as_ref()
    }

    /// The clock last seen for `client_id` (ours included).
    pub fn clock(&self, client_id: u64) -> Option<u64> {
        self.clients.get(&client_id).map(|m| m.clock)
    }

    /// Every non-null state, ours included.
    pub fn states(&self) -> HashMap<u64, Value> {
        self.clients
            .iter()
            .filter_map(|(&id, m)| Some((id, m.state.clone()?)))
            .collect()
    }

    /// Applies one received entry (`state` `None` for JSON `null`), as y-protocols'
    /// `applyAwarenessUpdate` does: the entry wins if its clock is newer, or equal with a null state
    /// for a client that has a state. A client never seen before starts at clock 0, so a first
    /// entry with clock 0 is ignored.
    pub fn apply(
        &mut self,
        client_id: u64,
        clock: u64,
        state: Option<Value>,
        now: Instant,
    ) -> Applied {
        let known = self.clients.get(&client_id);
        let current_clock = known.map_or(0, |m| m.clock);
        let has_state = known.is_some_and(|m| m.state.is_some());
        let newer =
            current_clock < clock || (current_clock == clock && state.is_none() && has_state);
        if !newer {
            return Applied::Ignored;
        }
        let (clock, state, applied) = match state {
            None if client_id == self.local_id && self.local_state().is_some() => (
                bump(clock),
                self.local_state().cloned(),
                Applied::LocalReasserted,
            ),
            None => (clock, None, Applied::Removed),
            Some(state) => (clock, Some(state), Applied::Updated),
        };
        self.clients.insert(
            client_id,
            Meta {
                clock,
                state,
                last_updated: now,
            },
        );
        applied
    }

    /// Sets our own state (`None` to leave) and returns the new clock. Our first clock is 1, not
    /// y-protocols' 0: peers ignore a clock-0 entry from a client they have not seen, and unlike a
    /// stock client we do not announce an empty state first.
    pub fn set_local(&mut self, state: Option<Value>, now: Instant) -> u64 {
        let clock = self.clock(self.local_id).map_or(1, bump);
        self.clients.insert(
            self.local_id,
            Meta {
                clock,
                state,
                last_updated: now,
            },
        );
        clock
    }

    /// Whether our own state is due for renewal: set, and not renewed for half of `timeout`.
    pub fn renewal_due(&self, now: Instant, timeout: Duration) -> bool {
        self.clients.get(&self.local_id).is_some_and(|m| {
            m.state.is_some() && now.saturating_duration_since(m.last_updated) >= timeout / 2
        })
    }

    /// Removes remote states not updated for `timeout` and returns their ids. Clocks are kept.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<u64> {
        let local_id = self.local_id;
        let mut removed = Vec::new();
        for (&id, meta) in &mut self.clients {
            if id != local_id
                && meta.state.is_some()
                && now.saturating_duration_since(meta.last_updated) >= timeout
            {
                meta.state = None;
                removed.push(id);
            }
        }
        removed
    }

    /// Removes every remote state (the connection is gone) and returns their ids. Clocks are kept.
    pub fn clear_remote(&mut self) -> Vec<u64> {
        let local_id = self.local_id;
        let mut removed = Vec::new();
        for (&id, meta) in &mut self.clients {
            if id != local_id && meta.state.take().is_some() {
                removed.push(id);
            }
        }
        removed
    }

    /// An awareness update payload carrying our own clock and state (`null` if unset), or `None`
    /// if we never set a state.
    pub fn encode_local(&self) -> Option<Vec<u8>> {
        self.clients
            .contains_key(&self.local_id)
            .then(|| self.encode([self.local_id]))
    }

    /// An awareness update payload with every non-null state, as a stock provider answers a query.
    pub fn encode_states(&self) -> Vec<u8> {
        let ids: Vec<u64> = self
            .clients
            .iter()
            .filter(|(_, m)| m.state.is_some())
            .map(|(&id, _)| id)
            .collect();
        self.encode(ids)
    }

    /// An awareness update payload for the given clients; ids the map does not know are skipped.
    fn encode(&self, ids: impl IntoIterator<Item = u64>) -> Vec<u8> {
        let texts: Vec<(u64, u64, String)> = ids
            .into_iter()
            .filter_map(|id| {
                let meta = self.clients.get(&id)?;
                let text = meta
                    .state
                    .as_ref()
                    .map_or_else(|| "null".to_owned(), Value::to_string);
                Some((id, meta.clock, text))
            })
            .collect();
        let entries = texts
            .iter()
            .map(|(client_id, clock, state)| AwarenessEntry {
                client_id: *client_id,
                clock: *clock,
                state,
            });
        let mut out = Vec::new();
        encode_entries(&mut out, entries);
        out
    }
}

/// The next clock, held at the largest value the wire can carry.
fn bump(clock: u64) -> u64 {
    (clock + 1).min(MAX_VAR_UINT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tandem_protocol::AwarenessUpdate;

    const ME: u64 = 1;
    const PEER: u64 = 2;

    fn decode(payload: &[u8]) -> Vec<(u64, u64, Option<Value>)> {
        AwarenessUpdate::decode(payload)
            .unwrap()
            .entries
            .iter()
            .map(|e| {
                let v: Value = serde_json::from_str(e.state).unwrap();
                (e.client_id, e.clock, (!v.is_null()).then_some(v))
            })
            .collect()
    }

    #[test]
    fn newer_clock_wins() {
        let now = Instant::now();
        let mut map = AwarenessMap::new(ME);
        assert_eq!(
            map.apply(PEER, 1, Some(json!({"n": 1})), now),
            Applied::Updated
        );
        assert_eq!(
            map.apply(PEER, 3, Some(json!({"n": 3})), now),
            Applied::Updated
        );
        assert_eq!(map.states()[&PEER], json!({"n": 3}));
        assert_eq!(map.clock(PEER), Some(3));
    }

    #[test]
    fn older_or_equal_clock_with_a_state_is_ignored() {
        let now = Instant::now();
        let mut map = AwarenessMap::new(ME);
        map.apply(PEER, 5, Some(json!("five")), now);
        assert_eq!(
            map.apply(PEER, 4, Some(json!("four")), now),
            Applied::Ignored
        );
        assert_eq!(
            map.apply(PEER, 5, Some(json!("other five")), now),
            Applied::Ignored
        );
        assert_eq!(map.states()[&PEER], json!("five"));
    }

    #[test]
    fn equal_clock_with_null_removes() {
        let now = Instant::now();
        let mut map = AwarenessMap::new(ME);
        map.apply(PEER, 5, Some(json!({})), now);
        assert_eq!(map.apply(PEER, 5, None, now), Applied::Removed);
        assert!(!map.states().contains_key(&PEER));
        // Once removed, the same null again changes nothing.
        assert_eq!(map.apply(PEER, 5, None, now), Applied::Ignored);
    }

    #[test]
    fn older_null_is_ignored() {
        let now = Instant::now();
        let mut map = AwarenessMap::new(ME);
        map.apply(PEER, 5, Some(json!({})), now);
        assert_eq!(map.apply(PEER, 4, None, now), Applied::Ignored);
        assert!(map.states().contains_key(&PEER));
    }

    #[test]
    fn removed_state_is_not_resurrected_by_an_old_message() {
        let now = Instant::now();
        let mut map = AwarenessMap::new(ME);
        map.apply(PEER, 2, Some(json!("a")), now);
        map.apply(PEER, 3, None, now);
        assert_eq!(map.apply(PEER, 2, Some(json!("a")), now), Applied::Ignored);
        assert!(map.states().is_empty());
        assert_eq!(
            map.apply(PEER, 4, Some(json!("back")), now),
            Applied::Updated
        );
        assert_eq!(map.states()[&PEER], json!("back"));
    }

    #[test]
    fn first_entry_with_clock_zero_is_ignored_like_y_protocols() {
        let now = Instant::now();
        let mut map = AwarenessMap::new(ME);
        assert_eq!(map.apply(PEER, 0, Some(json!({})), now), Applied::Ignored);
        assert!(map.states().is_empty());
    }

    #[test]
    fn own_state_starts_at_clock_one_and_bumps() {
        let now = Instant::now();
        let mut map = AwarenessMap::new(ME);
        assert_eq!(map.encode_local(), None);
        assert_eq!(map.set_local(Some(json!({"name": "bot"})), now), 1);
        assert_eq!(map.set_local(Some(json!({"name": "bot2"})), now), 2);
        assert_eq!(map.local_state(), Some(&json!({"name": "bot2"})));
        assert_eq!(
            decode(&map.encode_local().unwrap()),
            [(ME, 2, Some(json!({"name": "bot2"})))]
        );
        assert_eq!(map.set_local(None, now), 3);
        assert_eq!(map.local_state(), None);
        assert_eq!(decode(&map.encode_local().unwrap()), [(ME, 3, None)]);
    }

    #[test]
    fn echo_of_our_own_state_is_ignored() {
        let now = Instant::now();
        let mut map = AwarenessMap::new(ME);
        let clock = map.set_local(Some(json!("me")), now);
        assert_eq!(
            map.apply(ME, clock, Some(json!("me")), now),
            Applied::Ignored
        );
        let clock = map.set_local(None, now);
        assert_eq!(map.apply(ME, clock, None, now), Applied::Ignored);
        assert!(map.states().is_empty());
    }

    #[test]
    fn peer_removing_our_state_is_reasserted_with_a_newer_clock() {
        let now = Instant::now();
        let mut map = AwarenessMap::new(ME);
        map.set_local(Some(json!("here")), now);
        assert_eq!(map.apply(ME, 7, None, now), Applied::LocalReasserted);
        assert_eq!(map.local_state(), Some(&json!("here")));
        assert_eq!(map.clock(ME), Some(8));
        assert_eq!(
            decode(&map.encode_local().unwrap()),
            [(ME, 8, Some(json!("here")))]
        );
    }

    #[test]
    fn remote_states_expire_but_ours_does_not() {
        let start = Instant::now();
        let timeout = Duration::from_secs(30);
        let mut map = AwarenessMap::new(ME);
        map.set_local(Some(json!("me")), start);
        map.apply(PEER, 1, Some(json!("old")), start);
        map.apply(3, 1, Some(json!("fresh")), start + Duration::from_secs(20));

        assert!(map
            .expire(start + Duration::from_secs(29), timeout)
            .is_empty());
        assert_eq!(map.expire(start + timeout, timeout), [PEER]);
        let states = map.states();
        assert_eq!(states.len(), 2);
        assert!(states.contains_key(&ME) && states.contains_key(&3));
        // The expired client's clock is kept: its old message cannot come back.
        assert_eq!(
            map.apply(PEER, 1, Some(json!("old")), start + timeout),
            Applied::Ignored
        );
    }

    #[test]
    fn renewal_is_due_after_half_the_timeout_only_with_a_state() {
        let start = Instant::now();
        let timeout = Duration::from_secs(30);
        let mut map = AwarenessMap::new(ME);
        assert!(!map.renewal_due(start + timeout, timeout));
        map.set_local(Some(json!({})), start);
        assert!(!map.renewal_due(start + Duration::from_secs(14), timeout));
        assert!(map.renewal_due(start + Duration::from_secs(15), timeout));
        map.set_local(None, start);
        assert!(!map.renewal_due(start + timeout, timeout));
    }

    #[test]
    fn clear_remote_keeps_only_our_state() {
        let now = Instant::now();
        let mut map = AwarenessMap::new(ME);
        map.set_local(Some(json!("me")), now);
        map.apply(PEER, 1, Some(json!("p")), now);
        assert_eq!(map.clear_remote(), [PEER]);
        assert_eq!(map.states().keys().copied().collect::<Vec<_>>(), [ME]);
    }

    #[test]
    fn encode_states_carries_every_non_null_state_with_its_clock() {
        let now = Instant::now();
        let mut map = AwarenessMap::new(ME);
        map.set_local(Some(json!("me")), now);
        map.apply(PEER, 4, Some(json!({"x": 1})), now);
        map.apply(3, 2, Some(json!("gone")), now);
        map.apply(3, 2, None, now);
        let mut entries = decode(&map.encode_states());
        entries.sort_by_key(|e| e.0);
        assert_eq!(
            entries,
            [(ME, 1, Some(json!("me"))), (PEER, 4, Some(json!({"x": 1})))]
        );
    }

    #[test]
    fn clock_saturates_at_the_wire_limit() {
        let now = Instant::now();
        let mut map = AwarenessMap::new(ME);
        map.apply(ME, MAX_VAR_UINT, Some(json!(1)), now);
        assert_eq!(map.set_local(Some(json!(2)), now), MAX_VAR_UINT);
        assert!(AwarenessUpdate::decode(&map.encode_local().unwrap()).is_ok());
    }
}
