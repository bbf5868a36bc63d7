//! The frames queued for one connection, in order: one frame without a heap allocation, more in
//! a `VecDeque`.
//!
//! Most writes carry a single frame (at 10 updates per second per room, every delivery is its own
//! write), so a queue that allocated for its first frame and freed its buffer once written cost
//! a `malloc` and a `free` per delivery. The one-frame case lives inline instead, and a drained
//! queue keeps no buffer, so an idle connection holds none.

use std::collections::VecDeque;

use bytes::Bytes;

/// A FIFO of frames that needs no allocation while it holds at most one.
#[derive(Debug, Default)]
pub(super) enum Frames {
    /// Nothing queued.
    #[default]
    Empty,
    /// One frame.
    One(Bytes),
    /// Two or more frames (never empty: a drained queue goes back to `Empty`).
    Many(VecDeque<Bytes>),
}

impl Frames {
    /// Queues `frame` last.
    pub(super) fn push_back(&mut self, frame: Bytes) {
        *self = match std::mem::take(self) {
            Frames::Empty => Frames::One(frame),
            Frames::One(first) => Frames::Many(VecDeque::from([first, frame])),
            Frames::Many(mut queue) => {
                queue.push_back(frame);
                Frames::Many(queue)
            }
        };
    }

    /// Takes the first frame.
    pub(super) fn pop_front(&mut self) -> Option<Bytes> {
        match std::mem::take(self) {
            Frames::Empty => None,
            Frames::One(frame) => Some(frame),
            Frames::Many(mut queue) => {
                let frame = queue.pop_front();
                if !queue.is_empty() {
                    *self = Frames::Many(queue);
                }
                frame
            }
        }
    }

    /// Whether nothing is queued.
    pub(super) fn is_empty(&self) -> bool {
        matches!(self, Frames::Empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_leave_in_the_order_they_came_and_a_drained_queue_holds_no_buffer() {
        let mut frames = Frames::default();
        assert!(frames.is_empty());
        assert_eq!(frames.pop_front(), None);
        for round in 0..3u8 {
            // One, two and three frames at a time, popped in between.
            for i in 0..=round {
                frames.push_back(Bytes::from(vec![round, i]));
                assert!(!frames.is_empty());
            }
            for i in 0..=round {
                assert_eq!(frames.pop_front().as_deref(), Some(&[round, i][..]));
            }
            assert!(frames.is_empty());
            assert!(matches!(frames, Frames::Empty));
            assert_eq!(frames.pop_front(), None);
        }
        // Interleaved: a frame pushed while others wait still comes last.
        frames.push_back(Bytes::from_static(b"a"));
        frames.push_back(Bytes::from_static(b"b"));
        assert_eq!(frames.pop_front().as_deref(), Some(&b"a"[..]));
        frames.push_back(Bytes::from_static(b"c"));
        assert_eq!(frames.pop_front().as_deref(), Some(&b"b"[..]));
        assert_eq!(frames.pop_front().as_deref(), Some(&b"c"[..]));
        assert!(matches!(frames, Frames::Empty));
    }

    #[test]
    fn one_frame_needs_no_queue() {
        let mut frames = Frames::default();
        frames.push_back(Bytes::from_static(b"only"));
        assert!(matches!(frames, Frames::One(_)));
        frames.push_back(Bytes::from_static(b"next"));
        assert!(matches!(frames, Frames::Many(ref q) if q.len() == 2));
    }
}
