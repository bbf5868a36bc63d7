//! One connection as its room sees it: where its frames go, and the acknowledgements (and
//! optional echoes) it is owed once its updates are stored.
//!
//! Acknowledgements are cumulative: `Stored(n)` says the first `n` update messages the
//! connection sent are stored. An update is stored when the write that holds it commits; an
//! update that changed nothing is stored once every write submitted before it commits.

use std::collections::VecDeque;

use bytes::Bytes;
use tandem_protocol::{Message, SyncMessage};

use crate::session::outbox::Outbox;

/// An update message waiting for its write to commit.
#[derive(Debug)]
struct Waiting {
    /// Its number among the connection's update messages (1-based).
    count: u64,
    /// The room's write sequence number that must commit first.
    needs: u64,
    /// The update to echo back after the commit, when echoes are on.
    echo: Option<Bytes>,
}

/// A connection in a room.
#[derive(Debug)]
pub struct Peer {
    /// Where the room writes this connection's frames.
    pub outbox: Outbox,
    /// Whether the connection asked for acknowledgements.
    acks: bool,
    /// Update messages received from it.
    received: u64,
    /// What waits for a commit, boxed: most connections never ask for acknowledgements or
    /// echoes, and every room keeps one entry per connection (a deque inline is 32 bytes).
    #[allow(clippy::box_collection)] // the box is the point: see above
    waiting: Option<Box<VecDeque<Waiting>>>,
}

impl Peer {
    /// A peer that asked for nothing yet.
    pub fn new(outbox: Outbox) -> Self {
        Self {
            outbox,
            acks: false,
            received: 0,
            waiting: None,
        }
    }

    /// The connection asked for acknowledgements from now on.
    pub fn request_acks(&mut self) {
        self.acks = true;
    }

    /// Whether the connection asked for acknowledgements.
    pub fn wants_acks(&self) -> bool {
        self.acks
    }

    /// Whether anything waits for a commit.
    pub fn is_waiting(&self) -> bool {
        self.waiting.as_ref().is_some_and(|w| !w.is_empty())
    }

    /// Records an update message from this connection. `needs` is the write that must commit
    /// before it counts as stored (`None`: already stored); `echo` is the update to send back
    /// after that, when echoes are on. Returns the frames to send now.
    pub fn received_update(&mut self, needs: Option<u64>, echo: Option<Bytes>) -> Vec<Bytes> {
        self.received += 1;
        if !self.acks && echo.is_none() {
            return Vec::new();
        }
        let count = self.received;
        if needs.is_none() && !self.is_waiting() {
            return self.frames(count, echo.into_iter().collect());
        }
        let waiting = self.waiting.get_or_insert_with(Box::default);
        // Acknowledgements are in order: an already-stored update still waits behind others.
        let needs = needs.unwrap_or_else(|| waiting.back().map_or(0, |w| w.needs));
        waiting.push_back(Waiting { count, needs, echo });
        Vec::new()
    }

    /// The room's writes up to `seq` (inclusive) committed: returns the echoes and the
    /// acknowledgement now due, in that order.
    pub fn committed(&mut self, seq: u64) -> Vec<Bytes> {
        let mut echoes = Vec::new();
        let mut last = None;
        let Some(waiting) = self.waiting.as_mut() else {
            return Vec::new();
        };
        while waiting.front().is_some_and(|w| w.needs <= seq) {
            let Some(w) = waiting.pop_front() else {
                break;
            };
            echoes.extend(w.echo);
            last = Some(w.count);
        }
        match last {
            Some(count) => self.frames(count, echoes),
            None => Vec::new(),
        }
    }

    fn frames(&self, count: u64, echoes: Vec<Bytes>) -> Vec<Bytes> {
        let mut out: Vec<Bytes> = echoes
            .iter()
            .map(|u| Bytes::from(Message::Sync(SyncMessage::Update(u)).to_frame()))
            .collect();
        if self.acks {
            out.push(Bytes::from(Message::Stored(count).to_frame()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::outbox::outbox;
    use tandem_protocol::MessageReader;

    fn peer(acks: bool) -> Peer {
        let (tx, _rx) = outbox(1 << 20, 16 << 10, crate::ws::WsWriter::detached());
        let mut p = Peer::new(tx);
        if acks {
            p.request_acks();
        }
        p
    }

    fn decode(frames: &[Bytes]) -> Vec<String> {
        frames
            .iter()
            .map(|f| match MessageReader::new(f).next().unwrap().unwrap() {
                Message::Stored(n) => format!("stored {n}"),
                Message::Sync(SyncMessage::Update(u)) => format!("echo {}", u.len()),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn acknowledgements_wait_for_their_commit_and_are_cumulative() {
        let mut p = peer(true);
        assert!(p.received_update(Some(1), None).is_empty());
        assert!(p.received_update(Some(2), None).is_empty());
        assert!(
            p.received_update(None, None).is_empty(),
            "in order behind the others"
        );
        assert!(p.committed(0).is_empty());
        assert_eq!(decode(&p.committed(1)), ["stored 1"]);
        assert_eq!(decode(&p.committed(2)), ["stored 3"]);
        assert!(!p.is_waiting());
        assert_eq!(decode(&p.received_update(None, None)), ["stored 4"]);
    }

    #[test]
    fn echoes_follow_the_commit_and_come_before_the_ack() {
        let mut p = peer(true);
        p.received_update(Some(5), Some(Bytes::from_static(b"abc")));
        assert_eq!(decode(&p.committed(5)), ["echo 3", "stored 1"]);
        let mut quiet = peer(false);
        quiet.received_update(Some(1), Some(Bytes::from_static(b"ab")));
        assert_eq!(
            decode(&quiet.committed(1)),
            ["echo 2"],
            "echo without acknowledgements"
        );
    }

    #[test]
    fn peers_that_ask_nothing_keep_nothing() {
        let mut p = peer(false);
        assert!(p.received_update(Some(1), None).is_empty());
        assert!(!p.is_waiting());
    }
}
