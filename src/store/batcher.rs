//! `Batcher`: the group-commit loop of [`StoreWriter`](super::writer::StoreWriter), turned by a
//! thread instead of a task.
//!
//! A store that appends on a thread of its own (SQLite) runs the loop on that thread
//! ([`Store::host_writer`](super::Store::host_writer)). A room's update then costs one hand-off,
//! the room's to that thread, instead of three through the runtime: to the writer task, from it
//! to the store's thread and back, plus the window's timer on a worker (docs/benchmarks.md,
//! session 18).
//!
//! It batches, retries and acknowledges exactly as the writer task does: a request that finds
//! the loop idle while traffic is dense waits up to the window for company, a backlog or a lone
//! update after a quiet spell is committed at once, a failed batch is retried with backoff while
//! new requests wait in the queue, and every request is acknowledged once, in order, after its
//! batch committed. The thread calls [`Batcher::turn`] whenever it is woken and sleeps for as
//! long as the answer says.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

use super::writer::{
    committed, failed, next_backoff, waits_for_company, Ack, WriteRequest, WriterOptions,
    WriterStats,
};
use super::{Append, StoreError};
use crate::metrics::METRICS;

/// Appends a batch and returns the rows' ids, in order ([`Store::append`](super::Store::append),
/// synchronously).
pub type AppendBatch<'a> = dyn FnMut(&[Append]) -> Result<Vec<i64>, StoreError> + 'a;

/// What the thread should do after a [`Batcher::turn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Nothing to do until a request is submitted (the submitter wakes the thread).
    Idle,
    /// Turn again at this instant (the window closes, or a retry is due), or when woken.
    Until(Instant),
    /// Every handle is dropped and everything submitted is committed: the loop is over.
    Done,
}

/// Whether the loop's thread sleeps with nothing to do, so that a submit must wake it. While it
/// collects a batch or waits to retry it wakes by itself, and submitters leave it alone: at 1,000
/// updates a second and a 2 ms window, waking it for each would be most of its wake-ups.
#[derive(Debug, Default)]
pub struct Idle(AtomicBool);

impl Idle {
    /// For a submitter, after queueing: whether the thread must be woken to see the request.
    pub fn needs_wake(&self) -> bool {
        // Pairs with the fence in `Batcher::turn`: either the thread's second look finds the
        // request, or this sees the flag it set before looking.
        fence(Ordering::SeqCst);
        self.0.load(Ordering::Relaxed)
    }
}

/// A [`Batcher`] a store's thread has taken on.
#[derive(Debug)]
pub struct HostedWriter {
    /// The thread that turns the batcher; submitters unpark it.
    pub thread: std::thread::Thread,
    /// Completed when the batcher is done (every handle dropped, everything committed), or
    /// dropped if the thread ends first.
    pub done: oneshot::Receiver<()>,
}

/// The receiving end of a writer's queue, with the batch being collected or retried.
pub struct Batcher {
    rx: mpsc::Receiver<WriteRequest>,
    opts: WriterOptions,
    stats: Arc<WriterStats>,
    idle: Arc<Idle>,
    appends: Vec<Append>,
    acks: Vec<Ack>,
    /// When the batch's first request left the queue.
    taken: Instant,
    /// When the latest request left the queue.
    last: Option<Instant>,
    /// When the batch is committed even if it is not full.
    deadline: Instant,
    /// Failed attempts at the current batch, the wait before the next one and when it is due.
    failures: u32,
    backoff: Duration,
    retry_at: Option<Instant>,
    /// Every handle is dropped: commit what is left without waiting.
    closed: bool,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("batch", &self.appends.len())
            .field("failures", &self.failures)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Batcher {
    pub(super) fn new(
        rx: mpsc::Receiver<WriteRequest>,
        opts: WriterOptions,
        stats: Arc<WriterStats>,
    ) -> Self {
        let now = Instant::now();
        Self {
            rx,
            backoff: opts.retry_initial,
            appends: Vec::with_capacity(opts.max_batch),
            acks: Vec::with_capacity(opts.max_batch),
            opts,
            stats,
            idle: Arc::default(),
            taken: now,
            last: None,
            deadline: now,
            failures: 0,
            retry_at: None,
            closed: false,
        }
    }

    /// Takes what is queued, commits the batch with `append` when it is due (full, its window
    /// closed, the queue closed, or a backlog), and says when to turn again. Commits at most
    /// once per call, so the thread can serve its other work in between.
    pub fn turn(&mut self, now: Instant, append: &mut AppendBatch<'_>) -> Turn {
        self.idle.0.store(false, Ordering::Relaxed);
        if let Some(at) = self.retry_at {
            // Not taking new requests meanwhile lets the queue fill, so submitters wait.
            if now < at {
                return Turn::Until(at);
            }
        } else {
            let fresh = self.appends.is_empty();
            let mut taken = self.take();
            if fresh {
                if taken == 0 && !self.closed {
                    // About to sleep: from here a submit wakes the thread. Look once more for
                    // one that came before the flag was up.
                    self.idle.0.store(true, Ordering::Relaxed);
                    fence(Ordering::SeqCst);
                    taken = self.take();
                    if taken > 0 {
                        self.idle.0.store(false, Ordering::Relaxed);
                    }
                }
                if taken == 0 {
                    return if self.closed { Turn::Done } else { Turn::Idle };
                }
                self.taken = now;
                // Requests that queued up while the previous batch was committing are a group
                // already: they go at once. Only one that found the loop idle waits for company,
                // and only while traffic is dense.
                let since = self.last.map(|at| now.saturating_duration_since(at));
                self.deadline = if taken == 1 && waits_for_company(since, self.opts.window) {
                    now + self.opts.window
                } else {
                    now
                };
            }
            if taken > 0 {
                self.last = Some(now);
            }
            if self.appends.len() < self.opts.max_batch && !self.closed && now < self.deadline {
                return Turn::Until(self.deadline);
            }
        }
        let attempt = Instant::now();
        let appended = append(&self.appends);
        METRICS.store_append_seconds.observe(attempt.elapsed());
        match appended {
            Ok(ids) => {
                let rows = self.appends.len();
                self.appends.clear();
                let acks = std::mem::replace(&mut self.acks, Vec::with_capacity(rows));
                committed(
                    &self.stats,
                    rows,
                    ids,
                    acks,
                    self.failures,
                    self.taken.elapsed(),
                );
                self.failures = 0;
                self.backoff = self.opts.retry_initial;
                self.retry_at = None;
                // More may have queued while this batch committed.
                Turn::Until(now)
            }
            Err(error) => {
                self.failures += 1;
                failed(
                    &self.stats,
                    &error,
                    self.appends.len(),
                    self.failures,
                    self.backoff,
                );
                let at = now + self.backoff;
                self.retry_at = Some(at);
                self.backoff = next_backoff(self.backoff, &self.opts);
                Turn::Until(at)
            }
        }
    }

    /// The flag submitters read to know whether to wake the thread.
    pub(super) fn idle(&self) -> Arc<Idle> {
        self.idle.clone()
    }

    /// Commits the batch and everything queued, at once, for a store that is closing. Stops at
    /// the first failure, leaving the rest unacknowledged; returns whether everything committed.
    pub fn flush(&mut self, append: &mut AppendBatch<'_>) -> bool {
        self.closed = true;
        loop {
            self.retry_at = None;
            match self.turn(Instant::now(), append) {
                Turn::Done => return true,
                Turn::Until(_) if self.retry_at.is_some() => return false,
                Turn::Until(_) | Turn::Idle => {}
            }
        }
    }

    /// The queue and the options back, for a writer task to run the loop instead.
    pub(super) fn into_parts(self) -> (mpsc::Receiver<WriteRequest>, WriterOptions) {
        (self.rx, self.opts)
    }

    /// Moves queued requests into the batch, up to its bound; returns how many.
    fn take(&mut self) -> usize {
        let mut taken = 0;
        while self.appends.len() < self.opts.max_batch {
            match self.rx.try_recv() {
                Ok(req) => {
                    self.appends.push(req.append);
                    self.acks.push((req.seq, req.listener));
                    taken += 1;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.closed = true;
                    break;
                }
            }
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::ids::RoomId;
    use crate::store::writer::testing::{drain, listener};
    use crate::store::writer::CommitListener;

    fn opts(window: Duration, max_batch: usize) -> WriterOptions {
        WriterOptions {
            max_batch,
            window,
            queue_capacity: 64,
            retry_initial: Duration::from_millis(10),
            retry_max: Duration::from_millis(40),
        }
    }

    fn batcher(opts: WriterOptions) -> (mpsc::Sender<WriteRequest>, Batcher) {
        let (tx, rx) = mpsc::channel(opts.queue_capacity);
        (tx, Batcher::new(rx, opts, Arc::new(WriterStats::default())))
    }

    fn submit(tx: &mpsc::Sender<WriteRequest>, listener: &Arc<dyn CommitListener>, seq: u64) {
        let listener = listener.clone();
        tx.try_send(WriteRequest {
            append: Append {
                room: RoomId::new("r").expect("room"),
                data: Bytes::from(seq.to_string()),
                origin: Arc::from("test"),
            },
            seq,
            listener,
        })
        .expect("queued");
    }

    /// A store that keeps every committed row and numbers them from 1; it fails while
    /// `failing` is above zero, counting down.
    #[derive(Default)]
    struct Log {
        rows: Vec<Bytes>,
        batches: Vec<usize>,
        failing: u32,
    }

    impl Log {
        fn append(&mut self, batch: &[Append]) -> Result<Vec<i64>, StoreError> {
            if self.failing > 0 {
                self.failing -= 1;
                return Err(StoreError::Internal("the disk is away".into()));
            }
            self.batches.push(batch.len());
            Ok(batch
                .iter()
                .map(|a| {
                    self.rows.push(a.data.clone());
                    self.rows.len() as i64
                })
                .collect())
        }
    }

    #[test]
    fn a_request_after_a_quiet_spell_goes_at_once_and_one_soon_after_waits_for_company() {
        let window = Duration::from_millis(5);
        let (tx, mut b) = batcher(opts(window, 16));
        let (acks, mut acked) = listener();
        let mut log = Log::default();
        let t0 = Instant::now();
        let idle = b.idle();
        assert!(!idle.needs_wake(), "not asleep before its first turn");
        assert_eq!(b.turn(t0, &mut |a| log.append(a)), Turn::Idle);
        assert!(
            idle.needs_wake(),
            "asleep with nothing to do: a submit wakes it"
        );
        // The first request: nothing came within a window before it, so nothing waits.
        submit(&tx, &acks, 1);
        assert_eq!(b.turn(t0, &mut |a| log.append(a)), Turn::Until(t0));
        assert_eq!(log.batches, vec![1], "committed in the turn that took it");
        assert_eq!(drain(&mut acked), vec![(1, 1)]);
        assert_eq!(b.turn(t0, &mut |a| log.append(a)), Turn::Idle);

        // The next, within a window of the first: traffic is dense, so it waits for company.
        let t1 = t0 + window / 2;
        submit(&tx, &acks, 2);
        assert_eq!(b.turn(t1, &mut |a| log.append(a)), Turn::Until(t1 + window));
        assert!(
            !idle.needs_wake(),
            "collecting: it wakes by itself when the window closes"
        );
        submit(&tx, &acks, 3);
        let early = t1 + window / 2;
        assert_eq!(
            b.turn(early, &mut |a| log.append(a)),
            Turn::Until(t1 + window)
        );
        assert!(
            log.batches == [1] && drain(&mut acked).is_empty(),
            "nothing more before the window"
        );
        let late = t1 + window;
        assert_eq!(b.turn(late, &mut |a| log.append(a)), Turn::Until(late));
        assert_eq!(log.batches, vec![1, 2], "both in one commit");
        assert_eq!(drain(&mut acked), vec![(2, 2), (3, 3)]);
        assert_eq!(b.turn(late, &mut |a| log.append(a)), Turn::Idle);

        // One more than a window after the latest: quiet again, committed at once.
        let t2 = early + window + Duration::from_millis(1);
        submit(&tx, &acks, 4);
        assert_eq!(b.turn(t2, &mut |a| log.append(a)), Turn::Until(t2));
        assert_eq!(log.batches, vec![1, 2, 1]);
        assert_eq!(drain(&mut acked), vec![(4, 4)]);
        drop(tx);
        assert_eq!(b.turn(t2, &mut |a| log.append(a)), Turn::Done);
    }

    #[test]
    fn a_backlog_and_a_full_batch_go_at_once_in_bounded_batches() {
        let (tx, mut b) = batcher(opts(Duration::from_secs(60), 3));
        let (acks, mut acked) = listener();
        let mut log = Log::default();
        for seq in 1..=7 {
            submit(&tx, &acks, seq);
        }
        let t0 = Instant::now();
        while b.turn(t0, &mut |a| log.append(a)) != Turn::Until(t0 + Duration::from_secs(60)) {}
        // Two full batches went without waiting; the seventh found the loop idle and waits.
        assert_eq!(log.batches, vec![3, 3]);
        drop(tx);
        assert_eq!(b.turn(t0, &mut |a| log.append(a)), Turn::Until(t0));
        assert_eq!(
            log.batches,
            vec![3, 3, 1],
            "closing commits the rest at once"
        );
        assert_eq!(b.turn(t0, &mut |a| log.append(a)), Turn::Done);
        let seen = drain(&mut acked);
        assert_eq!(seen, (1..=7).map(|s| (s, s as i64)).collect::<Vec<_>>());
    }

    #[test]
    fn a_failed_batch_is_retried_with_backoff_without_loss_or_duplication() {
        let o = opts(Duration::ZERO, 16);
        let (tx, mut b) = batcher(o.clone());
        let stats = b.stats.clone();
        let (acks, mut acked) = listener();
        let mut log = Log {
            failing: 3,
            ..Log::default()
        };
        submit(&tx, &acks, 1);
        let mut now = Instant::now();
        let mut waits = Vec::new();
        loop {
            match b.turn(now, &mut |a| log.append(a)) {
                Turn::Until(at) if at > now => {
                    waits.push(at - now);
                    // A request submitted during the retries waits for the next batch.
                    if waits.len() == 1 {
                        submit(&tx, &acks, 2);
                    }
                    now = at;
                }
                Turn::Until(_) => {}
                Turn::Idle => break,
                Turn::Done => panic!("the queue is open"),
            }
        }
        assert_eq!(waits.len(), 3, "three failures: {waits:?}");
        for (wait, floor) in waits.iter().zip([10, 20, 40]) {
            assert!(*wait >= Duration::from_millis(floor), "{waits:?}");
            assert!(*wait < Duration::from_millis(floor + 20), "{waits:?}");
        }
        assert_eq!(
            log.batches,
            vec![1, 1],
            "the failed batch alone, then the next"
        );
        assert_eq!(log.rows, vec![Bytes::from("1"), Bytes::from("2")]);
        assert_eq!(drain(&mut acked), vec![(1, 1), (2, 2)]);
        assert_eq!(stats.failures(), 3);
        assert!(!stats.is_failing());
        assert_eq!((stats.batches(), stats.rows()), (2, 2));
    }
}
