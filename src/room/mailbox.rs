//! A room's second inbox: news from other tasks (the store writer's commits, finished
//! compactions) for the room's own task, in the order it was sent.
//!
//! Unbounded like the channel it replaces, and bounded in practice the same way: one commit
//! per update the room submitted, one fold per compaction it started. Unlike tokio's channels it
//! allocates nothing until something is sent: a channel's first block cost every room about
//! 1.5 KB, although most rooms spend their life idle (docs/benchmarks.md, session 10).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

struct Inner<T> {
    queue: Mutex<Queue<T>>,
    /// Woken on every send (and every post while eager); holds one permit when nobody waits, so
    /// no such send is missed.
    ready: Notify,
}

struct Queue<T> {
    items: VecDeque<T>,
    /// Whether [`Mailbox::post`] wakes the receiver.
    eager: bool,
}

/// Both ends: any clone sends, and the owner receives.
pub(super) struct Mailbox<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Mailbox<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T> Mailbox<T> {
    /// An empty mailbox; no queue is allocated until the first send.
    pub(super) fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                queue: Mutex::new(Queue {
                    items: VecDeque::new(),
                    eager: true,
                }),
                ready: Notify::new(),
            }),
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue<T>> {
        // Nothing panics while holding the lock; recover the queue if something ever did.
        self.inner
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item` and wakes the receiver.
    pub(super) fn send(&self, item: T) {
        self.queue().items.push_back(item);
        self.inner.ready.notify_one();
    }

    /// Queues `item`, waking the receiver only if it asked for that ([`set_eager`]); otherwise
    /// the item waits for the receiver's next look at the queue.
    ///
    /// [`set_eager`]: Self::set_eager
    pub(super) fn post(&self, item: T) {
        let wake = {
            let mut queue = self.queue();
            queue.items.push_back(item);
            queue.eager
        };
        if wake {
            self.inner.ready.notify_one();
        }
    }

    /// Whether later [`post`](Self::post)s wake the receiver (at first they do). Set it before
    /// looking at the queue: what was posted quietly before is found by that look, and what is
    /// posted after wakes the receiver.
    pub(super) fn set_eager(&self, eager: bool) {
        self.queue().eager = eager;
    }

    /// The next item, if one is queued.
    pub(super) fn try_recv(&self) -> Option<T> {
        let mut queue = self.queue();
        let item = queue.items.pop_front();
        if queue.items.is_empty() && queue.items.capacity() > 0 {
            // An idle room keeps no buffer.
            queue.items = VecDeque::new();
        }
        item
    }

    /// Waits for the next item. Cancel-safe: an item is taken only when this returns.
    pub(super) async fn recv(&self) -> T {
        loop {
            if let Some(item) = self.try_recv() {
                return item;
            }
            // A send between the check above and this wait leaves a permit, so it is not
            // missed; a stale permit only costs one more look at the queue.
            self.inner.ready.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn items_arrive_in_order_from_any_clone() {
        let mailbox = Mailbox::new();
        let sender = mailbox.clone();
        assert_eq!(mailbox.try_recv(), None::<u32>);
        for i in 0..5 {
            sender.send(i);
        }
        mailbox.send(5);
        for i in 0..6 {
            assert_eq!(mailbox.recv().await, i);
        }
        assert_eq!(mailbox.try_recv(), None);
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_send_from_another_task() {
        let mailbox = Mailbox::new();
        let sender = mailbox.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            sender.send("late");
        });
        let got = tokio::time::timeout(Duration::from_secs(5), mailbox.recv()).await;
        assert_eq!(got.expect("woken"), "late");
        task.await.expect("sender");
    }

    #[tokio::test]
    async fn a_quiet_post_waits_for_a_look_and_an_eager_one_wakes() {
        let mailbox = Mailbox::new();
        let sender = mailbox.clone();
        mailbox.set_eager(false);
        sender.post(1u8);
        // Posted quietly: a waiting receiver is not woken...
        let waited =
            tokio::time::timeout(Duration::from_millis(20), mailbox.inner.ready.notified());
        assert!(waited.await.is_err(), "a quiet post woke the receiver");
        // ...but finds it at its next look.
        assert_eq!(mailbox.try_recv(), Some(1));
        mailbox.set_eager(true);
        let task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            sender.post(2u8);
        });
        let got = tokio::time::timeout(Duration::from_secs(5), mailbox.recv()).await;
        assert_eq!(got.expect("an eager post wakes"), 2);
        task.await.expect("sender");
    }

    #[tokio::test]
    async fn a_cancelled_receive_loses_nothing() {
        let mailbox = Mailbox::new();
        // Cancelled while waiting, as in a `select!` whose other branch won.
        let cancelled = tokio::time::timeout(Duration::from_millis(10), mailbox.recv()).await;
        assert!(cancelled.is_err());
        mailbox.send(1u8);
        mailbox.send(2u8);
        // Cancelled after the sends, before it was polled again: both items stay queued.
        drop(mailbox.recv());
        assert_eq!(mailbox.recv().await, 1);
        assert_eq!(mailbox.recv().await, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_item_from_racing_senders_arrives_once() {
        let mailbox = Mailbox::new();
        let senders: Vec<_> = (0..4u64)
            .map(|s| {
                let tx = mailbox.clone();
                tokio::spawn(async move {
                    for i in 0..2_000u64 {
                        tx.send(s * 1_000_000 + i);
                        if i % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        let mut last = [None::<u64>; 4];
        for _ in 0..8_000 {
            let item = tokio::time::timeout(Duration::from_secs(10), mailbox.recv())
                .await
                .expect("every item arrives");
            let (s, i) = ((item / 1_000_000) as usize, item % 1_000_000);
            // Each sender's items in the order it sent them.
            assert_eq!(last[s].map_or(0, |l| l + 1), i);
            last[s] = Some(i);
        }
        for s in senders {
            s.await.expect("sender");
        }
        assert_eq!(mailbox.try_recv(), None);
    }
}
