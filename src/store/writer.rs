//! `StoreWriter`: group commit. Rooms submit updates to one loop that appends them to the store in
//! batches, retries failed batches until they succeed, and tells each submitter when its update is
//! durable. The loop runs on the store's own thread when it has one (SQLite: [`Batcher`]), and as
//! a task here otherwise (Postgres, memory).
//!
//! Batching: what queued up while the previous batch was committing is committed at once, as one
//! batch (up to `max_batch`). A request that finds the writer idle waits up to `window` for
//! company when the request before it came less than a window earlier, that is while traffic is
//! dense enough to bring some; after a quieter spell it is committed at once, since waiting would
//! only delay its acknowledgement and cost the loop a second wake-up (`waits_for_company`). So a
//! busy store commits back to back without ever waiting, a steady one groups what arrives within
//! a window, and none delays an acknowledgement by more than the window.
//!
//! Guarantees: every submitted update is appended, in submission order, and acknowledged exactly
//! once, after its batch committed. Nothing is dropped: a failing store makes the loop retry the
//! same batch with backoff while the queue fills up and [`StoreWriter::submit`] starts waiting.
//! If a store reports a failure for a commit that in fact happened (a connection lost during
//! `COMMIT`), the retry stores those updates twice; Yjs updates are idempotent, so loading such a
//! log gives the same document.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::batcher::{Batcher, Idle};
use super::{Append, DynStore, StoreError};
use crate::metrics::METRICS;

/// Told when an update it submitted is durable.
pub trait CommitListener: Send + Sync + 'static {
    /// `seq` is the number the submitter gave the update; `id` is its log id in the store.
    ///
    /// Called from the writer's loop (a task, or the store's thread), in submission order: it
    /// must return quickly and never block (hand the news to the owner with a `try_send` or an
    /// atomic, for example).
    fn committed(&self, seq: u64, id: i64);
}

/// One update to make durable, and whom to tell when it is.
pub struct WriteRequest {
    /// What to append.
    pub append: Append,
    /// The submitter's number for the update, handed back to [`CommitListener::committed`].
    pub seq: u64,
    /// Told once, after the update's batch has committed.
    pub listener: Arc<dyn CommitListener>,
}

impl fmt::Debug for WriteRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteRequest")
            .field("room", &self.append.room)
            .field("bytes", &self.append.data.len())
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// How the writer batches and retries.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Most updates in one `append` (at least 1).
    pub max_batch: usize,
    /// How long a batch keeps collecting after its first update arrived, when updates come
    /// closer together than this (an update after a quieter spell is committed at once).
    pub window: Duration,
    /// Requests queued before [`StoreWriter::submit`] waits (at least 1).
    pub queue_capacity: usize,
    /// Wait after the first failed append of a batch (at least 1 ms); doubles on each failure.
    pub retry_initial: Duration,
    /// Longest wait between retries.
    pub retry_max: Duration,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            max_batch: 256,
            window: Duration::from_millis(2),
            queue_capacity: 4096,
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// Counters of the writer's work, for metrics. Updated by the writer's loop.
#[derive(Debug, Default)]
pub struct WriterStats {
    batches: AtomicU64,
    rows: AtomicU64,
    failures: AtomicU64,
    /// Set while the latest append attempt failed (the store is down); cleared on success.
    failing: std::sync::atomic::AtomicBool,
}

impl WriterStats {
    /// Batches committed.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Updates committed.
    pub fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    /// Appends that failed (and were retried).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Whether the latest append attempt failed: the store is unreachable and updates wait.
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }
}

/// The writer's loop is gone (it panicked, or its runtime or thread ended); the request was not
/// queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the store writer has stopped")]
pub struct WriterClosed;

/// A handle to the group-commit writer. Cheap to clone; the loop commits what is queued and ends
/// when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct StoreWriter {
    /// The queue into the loop. Bounded: a full queue makes `submit` wait, which is the
    /// backpressure. Dropping every clone closes it, which is how shutdown flushes.
    tx: mpsc::Sender<WriteRequest>,
    /// Shared with the loop, which updates it.
    stats: Arc<WriterStats>,
    /// The store's thread when the loop runs there. After `tx`: the last handle closes the
    /// queue first, then wakes the thread to see that.
    wake: Option<Arc<Wake>>,
}

/// How a submitter wakes the thread that runs the loop; dropped with the last handle, it wakes
/// the thread a last time, to find the queue closed and end the loop.
#[derive(Debug)]
struct Wake {
    thread: std::thread::Thread,
    /// Up while the thread sleeps with nothing to do.
    idle: Arc<Idle>,
    /// A queue this long is a full batch: worth waking the thread for before its window ends.
    full: usize,
}

impl StoreWriter {
    /// Starts the writer: on the store's own thread if it has one
    /// ([`Store::host_writer`](super::Store::host_writer)), else as a task on the current tokio
    /// runtime. Await the handle after dropping every `StoreWriter` to know that everything
    /// submitted is durable.
    pub fn spawn(store: DynStore, opts: WriterOptions) -> (StoreWriter, JoinHandle<()>) {
        let opts = clamped(opts);
        let (tx, rx) = mpsc::channel(opts.queue_capacity);
        let stats = Arc::new(WriterStats::default());
        let full = opts.max_batch;
        let batcher = Box::new(Batcher::new(rx, opts, stats.clone()));
        let idle = batcher.idle();
        match store.host_writer(batcher) {
            Ok(hosted) => {
                let handle = tokio::spawn(async move {
                    // Sent when the loop ends; dropped unsent if the thread dies first.
                    let _ = hosted.done.await;
                });
                let wake = Some(Arc::new(Wake {
                    thread: hosted.thread,
                    idle,
                    full,
                }));
                (StoreWriter { tx, stats, wake }, handle)
            }
            Err(batcher) => {
                let (rx, opts) = batcher.into_parts();
                let task = WriterTask {
                    store,
                    rx,
                    opts,
                    stats: stats.clone(),
                };
                let handle = tokio::spawn(task.run());
                (
                    StoreWriter {
                        tx,
                        stats,
                        wake: None,
                    },
                    handle,
                )
            }
        }
    }

    /// Queues an update. Waits for queue space (backpressure: the caller slows down, nothing is
    /// dropped).
    pub async fn submit(&self, req: WriteRequest) -> Result<(), WriterClosed> {
        self.tx.send(req).await.map_err(|_| WriterClosed)?;
        self.wake();
        Ok(())
    }

    /// Queues `req` if the queue has room, without waiting; gives it back if not.
    ///
    /// A thread that runs the loop is woken for it only once a full batch waits: call
    /// [`nudge`](Self::nudge) when the burst being queued is complete. So a room's turn of
    /// several updates is seen, and committed, as one group, as a task sees it.
    pub fn try_submit(&self, req: WriteRequest) -> Result<(), TrySendError<WriteRequest>> {
        self.tx.try_send(req)?;
        self.unpark_when(|wake| self.queued() >= wake.full);
        Ok(())
    }

    /// Wakes the thread that runs the loop, if a thread does and it sleeps with nothing to do,
    /// to take what [`try_submit`](Self::try_submit) queued. (A task is woken by the queue.)
    pub fn nudge(&self) {
        self.unpark_when(|wake| wake.idle.needs_wake());
    }

    /// Wakes the thread that runs the loop, if a thread does and it sleeps with nothing to do
    /// or a full batch waits.
    fn wake(&self) {
        self.unpark_when(|wake| wake.idle.needs_wake() || self.queued() >= wake.full);
    }

    /// Unparks the thread that runs the loop, if a thread does and `due` says so.
    fn unpark_when(&self, due: impl FnOnce(&Wake) -> bool) {
        if let Some(wake) = &self.wake {
            if due(wake) {
                wake.thread.unpark();
            }
        }
    }

    /// The writer's counters.
    pub fn stats(&self) -> Arc<WriterStats> {
        self.stats.clone()
    }

    /// Requests queued and not yet taken into a batch.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Whether the queue is full: the store is not keeping up (or is down) and the bound on
    /// unstored updates is reached. Rooms then refuse new writes instead of losing them.
    pub fn is_full(&self) -> bool {
        self.tx.capacity() == 0
    }
}

impl Drop for Wake {
    fn drop(&mut self) {
        self.thread.unpark();
    }
}

/// Whom to tell about one committed update: the submitter's `seq` and its listener.
pub(super) type Ack = (u64, Arc<dyn CommitListener>);

/// The task behind [`StoreWriter`].
struct WriterTask {
    store: DynStore,
    rx: mpsc::Receiver<WriteRequest>,
    opts: WriterOptions,
    stats: Arc<WriterStats>,
}

impl WriterTask {
    async fn run(mut self) {
        let max_batch = self.opts.max_batch;
        let mut requests = Vec::with_capacity(max_batch);
        // When the latest request left the queue.
        let mut last: Option<Instant> = None;
        // `recv_many` returns 0 only once the queue is closed (every `StoreWriter` dropped) and
        // empty, so everything submitted before that has been committed when the loop ends.
        while self.rx.recv_many(&mut requests, max_batch).await > 0 {
            let taken = Instant::now();
            let deadline = taken + self.opts.window;
            // Requests that queued up while the previous batch was committing are a group
            // already: they go at once. Only a request that found the writer idle waits (up to
            // the window) for company, and only while traffic is dense.
            let since = last.map(|at| taken.saturating_duration_since(at));
            let wait = requests.len() == 1 && waits_for_company(since, self.opts.window);
            last = Some(taken);
            while wait && requests.len() < max_batch {
                let room = max_batch - requests.len();
                match tokio::time::timeout_at(deadline, self.rx.recv_many(&mut requests, room))
                    .await
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) => last = Some(Instant::now()),
                }
            }
            self.commit(&mut requests, taken).await;
        }
        tracing::debug!("store writer stopped: every handle dropped and the queue is flushed");
    }

    /// Appends `requests` as one batch, retrying until the store accepts it, then acknowledges
    /// each request in order. Leaves `requests` empty. `taken` is when the batch's first request
    /// left the queue.
    async fn commit(&self, requests: &mut Vec<WriteRequest>, taken: Instant) {
        let (appends, acks): (Vec<Append>, Vec<Ack>) = requests
            .drain(..)
            .map(|req| (req.append, (req.seq, req.listener)))
            .unzip();

        let mut backoff = self.opts.retry_initial;
        let mut failures = 0u32;
        let ids = loop {
            let attempt = Instant::now();
            let appended = self.store.append(&appends).await;
            METRICS.store_append_seconds.observe(attempt.elapsed());
            match appended {
                Ok(ids) => break ids,
                Err(error) => {
                    failures += 1;
                    failed(&self.stats, &error, appends.len(), failures, backoff);
                    // Not taking new requests meanwhile lets the queue fill, so submitters wait.
                    tokio::time::sleep(backoff).await;
                    backoff = next_backoff(backoff, &self.opts);
                }
            }
        };
        committed(
            &self.stats,
            appends.len(),
            ids,
            acks,
            failures,
            taken.elapsed(),
        );
    }
}

/// Records a failed append of `rows` updates (its `failures`th) that is retried after `retry_in`.
pub(super) fn failed(
    stats: &WriterStats,
    error: &StoreError,
    rows: usize,
    failures: u32,
    retry_in: Duration,
) {
    stats.failures.fetch_add(1, Ordering::Relaxed);
    METRICS.store_errors.append.inc();
    stats.failing.store(true, Ordering::Relaxed);
    tracing::warn!(
        %error,
        rows,
        attempt = failures,
        ?retry_in,
        "store append failed; retrying the same batch",
    );
}

/// Whether a request that found the loop idle waits up to `window` for company, given how long
/// before it the previous request left the queue (`None`: it is the first). Only when that was
/// within the window: traffic that dense brings company, and a lone update after a quieter
/// spell is committed at once. Waiting for none would delay its acknowledgement and cost the
/// loop a second wake-up: in `rooms` (updates 5 ms apart), 12 % of the CPU SQLite's thread
/// spent per update (docs/benchmarks.md, session 19).
pub(super) fn waits_for_company(since_previous: Option<Duration>, window: Duration) -> bool {
    since_previous.is_some_and(|gap| gap <= window)
}

/// The wait after `backoff` for the next retry.
pub(super) fn next_backoff(backoff: Duration, opts: &WriterOptions) -> Duration {
    (backoff * 2).min(opts.retry_max)
}

/// Records a batch of `rows` updates that committed after `failures` failed attempts, `waited`
/// after its first request left the queue, and tells each submitter, in order.
pub(super) fn committed(
    stats: &WriterStats,
    rows: usize,
    ids: Vec<i64>,
    acks: Vec<Ack>,
    failures: u32,
    waited: Duration,
) {
    stats.failing.store(false, Ordering::Relaxed);
    if failures > 0 {
        tracing::info!(rows, failures, "store append succeeded after retrying");
    }
    if ids.len() != rows {
        // A broken store; retrying could store the batch twice, so acknowledge what we can.
        tracing::error!(
            rows,
            ids = ids.len(),
            "store returned the wrong number of ids for an append",
        );
    }
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.rows.fetch_add(rows as u64, Ordering::Relaxed);
    METRICS.store_group_size.observe(rows);
    METRICS.store_commit_seconds.observe(waited);
    for ((seq, listener), id) in acks.into_iter().zip(ids) {
        listener.committed(seq, id);
    }
}

/// Clamps options to what the writer needs: at least one update per batch and one queued, a
/// first retry of at least 1 ms, and a cap no shorter than it.
fn clamped(opts: WriterOptions) -> WriterOptions {
    WriterOptions {
        max_batch: opts.max_batch.max(1),
        queue_capacity: opts.queue_capacity.max(1),
        retry_initial: opts.retry_initial.max(Duration::from_millis(1)),
        retry_max: opts.retry_max.max(opts.retry_initial),
        ..opts
    }
}

/// A listener for tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use tokio::sync::mpsc;

    use super::CommitListener;

    /// Forwards every acknowledgement into a channel the test reads.
    struct ChannelListener(mpsc::UnboundedSender<(u64, i64)>);

    impl CommitListener for ChannelListener {
        fn committed(&self, seq: u64, id: i64) {
            let _ = self.0.send((seq, id));
        }
    }

    /// A listener, and the `(seq, id)` of every acknowledgement it is given, in order.
    pub(crate) fn listener() -> (Arc<dyn CommitListener>, mpsc::UnboundedReceiver<(u64, i64)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(ChannelListener(tx)), rx)
    }

    /// The acknowledgements received so far and not yet taken.
    pub(crate) fn drain(rx: &mut mpsc::UnboundedReceiver<(u64, i64)>) -> Vec<(u64, i64)> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::Mutex;

    use async_trait::async_trait;
    use bytes::Bytes;

    use super::testing::{drain, listener};
    use super::*;
    use crate::ids::RoomId;
    use crate::store::memory::MemoryStore;
    use crate::store::{Compacted, Fold, Store, StoreError, StoredRoom};

    /// The granularity of tokio's timer: sleeps end on the next tick after their deadline.
    const TICK: Duration = Duration::from_millis(1);

    fn request(room: &str, seq: u64, listener: &Arc<dyn CommitListener>) -> WriteRequest {
        WriteRequest {
            append: Append {
                room: RoomId::new(room).expect("room"),
                data: Bytes::from(format!("{room}:{seq}")),
                origin: Arc::from("test"),
            },
            seq,
            listener: listener.clone(),
        }
    }

    /// Test double for fault injection: a [`MemoryStore`] whose appends fail while told to, and
    /// which records every append call (time and size).
    #[derive(Default)]
    struct FaultyStore {
        inner: MemoryStore,
        /// Appends still to fail.
        fail_next: AtomicUsize,
        /// Fail every append while set.
        down: AtomicBool,
        /// `(when, rows, succeeded)` per append call.
        calls: Mutex<Vec<(Instant, usize, bool)>>,
    }

    impl FaultyStore {
        fn calls(&self) -> Vec<(Instant, usize, bool)> {
            self.calls.lock().expect("calls").clone()
        }

        fn committed_batch_sizes(&self) -> Vec<usize> {
            self.calls()
                .into_iter()
                .filter(|(_, _, ok)| *ok)
                .map(|(_, rows, _)| rows)
                .collect()
        }
    }

    #[async_trait]
    impl Store for FaultyStore {
        async fn load(&self, room: &RoomId) -> Result<StoredRoom, StoreError> {
            self.inner.load(room).await
        }

        async fn append(&self, batch: &[Append]) -> Result<Vec<i64>, StoreError> {
            let fail = self.down.load(Ordering::SeqCst)
                || self
                    .fail_next
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            self.calls
                .lock()
                .expect("calls")
                .push((Instant::now(), batch.len(), !fail));
            if fail {
                return Err(StoreError::Io(std::io::Error::other("injected failure")));
            }
            self.inner.append(batch).await
        }

        async fn compact(&self, room: &RoomId, fold: &dyn Fold) -> Result<Compacted, StoreError> {
            self.inner.compact(room, fold).await
        }

        async fn rooms(&self) -> Result<Vec<RoomId>, StoreError> {
            self.inner.rooms().await
        }

        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }

        async fn close(&self) {}
    }

    fn spawn(store: &Arc<FaultyStore>, opts: WriterOptions) -> (StoreWriter, JoinHandle<()>) {
        StoreWriter::spawn(store.clone(), opts)
    }

    async fn stored_data(store: &FaultyStore, room: &str) -> Vec<(i64, Bytes)> {
        store
            .load(&RoomId::new(room).expect("room"))
            .await
            .expect("load")
            .updates
    }

    #[tokio::test]
    async fn group_commit_groups_quick_submissions() {
        tokio::time::pause();
        let store = Arc::new(FaultyStore::default());
        let (writer, task) = spawn(&store, WriterOptions::default());
        let (listener, mut acks) = listener();

        for seq in 0..100 {
            let room = if seq % 2 == 0 { "even" } else { "odd" };
            writer
                .submit(request(room, seq, &listener))
                .await
                .expect("submit");
        }
        let stats = writer.stats();
        drop(writer);
        task.await.expect("writer task");

        let batches = store.committed_batch_sizes();
        assert!(batches.len() < 100, "no grouping: {batches:?}");
        assert_eq!(batches.iter().sum::<usize>(), 100);
        assert_eq!(stats.batches(), batches.len() as u64);
        assert_eq!(stats.rows(), 100);

        let acks = drain(&mut acks);
        assert_eq!(
            acks.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            (0..100).collect::<Vec<u64>>(),
            "acknowledged once each, in submission order",
        );
        assert!(
            acks.windows(2).all(|w| w[0].1 < w[1].1),
            "ids increase: {acks:?}"
        );
        // Each acknowledged id names the update that was submitted with that seq.
        let even = stored_data(&store, "even").await;
        let expected: Vec<(i64, Bytes)> = acks
            .iter()
            .filter(|(seq, _)| seq % 2 == 0)
            .map(|(seq, id)| (*id, Bytes::from(format!("even:{seq}"))))
            .collect();
        assert_eq!(even, expected);
    }

    #[tokio::test]
    async fn batches_never_exceed_max_batch() {
        tokio::time::pause();
        let store = Arc::new(FaultyStore::default());
        let opts = WriterOptions {
            max_batch: 16,
            ..WriterOptions::default()
        };
        let (writer, task) = spawn(&store, opts);
        let (listener, mut acks) = listener();
        for seq in 0..100 {
            writer
                .submit(request("doc", seq, &listener))
                .await
                .expect("submit");
        }
        drop(writer);
        task.await.expect("writer task");

        let batches = store.committed_batch_sizes();
        assert!(batches.iter().all(|rows| *rows <= 16), "{batches:?}");
        assert_eq!(batches.iter().sum::<usize>(), 100);
        assert_eq!(drain(&mut acks).len(), 100);
        assert_eq!(stored_data(&store, "doc").await.len(), 100);
    }

    #[tokio::test]
    async fn an_update_after_a_quiet_spell_goes_at_once_and_one_soon_after_waits_the_window() {
        tokio::time::pause();
        let store = Arc::new(FaultyStore::default());
        let window = Duration::from_millis(20);
        let opts = WriterOptions {
            window,
            ..WriterOptions::default()
        };
        let (writer, _task) = spawn(&store, opts);
        let (listener, mut acks) = listener();
        // Submits update `seq` and returns how long (virtual time) it took to be acknowledged
        // as row `row`.
        let mut stored = async |seq: u64, row: i64| {
            let submitted = Instant::now();
            writer
                .submit(request("doc", seq, &listener))
                .await
                .expect("submit");
            let ack = tokio::time::timeout(Duration::from_secs(60), acks.recv()).await;
            assert_eq!(ack.expect("acknowledged"), Some((seq, row)));
            submitted.elapsed()
        };

        // Nothing came within a window before it: committed without waiting.
        let waited = stored(7, 1).await;
        assert!(waited <= TICK, "{waited:?}");
        // Within a window of it: the batch waits its window for company, and no longer.
        let waited = stored(8, 2).await;
        assert!(waited >= window && waited <= window + TICK, "{waited:?}");
        // Quiet for longer than the window: at once again.
        tokio::time::sleep(window * 2).await;
        let waited = stored(9, 3).await;
        assert!(waited <= TICK, "{waited:?}");
        assert_eq!(store.committed_batch_sizes(), vec![1, 1, 1]);
    }

    #[tokio::test]
    async fn failed_appends_are_retried_without_loss_or_duplication() {
        tokio::time::pause();
        let store = Arc::new(FaultyStore {
            fail_next: AtomicUsize::new(3),
            ..FaultyStore::default()
        });
        let (writer, task) = spawn(&store, WriterOptions::default());
        let (listener, mut acks) = listener();
        for seq in 0..10 {
            writer
                .submit(request("doc", seq, &listener))
                .await
                .expect("submit");
        }
        let stats = writer.stats();
        drop(writer);
        task.await.expect("writer task");

        assert_eq!(stats.failures(), 3);
        assert_eq!(stats.rows(), 10);
        let acks = drain(&mut acks);
        assert_eq!(
            acks,
            (0..10).map(|seq| (seq, seq as i64 + 1)).collect::<Vec<_>>()
        );
        let stored = stored_data(&store, "doc").await;
        assert_eq!(
            stored,
            (0..10)
                .map(|seq| (seq as i64 + 1, Bytes::from(format!("doc:{seq}"))))
                .collect::<Vec<_>>()
        );
        // The retries carried the same batch: every failed call had the size of the one that
        // finally succeeded.
        let calls = store.calls();
        assert_eq!(calls.len(), 4);
        assert!(calls.iter().all(|(_, rows, _)| *rows == calls[3].1));
    }

    #[tokio::test]
    async fn retries_back_off_exponentially_up_to_the_cap() {
        tokio::time::pause();
        let store = Arc::new(FaultyStore {
            fail_next: AtomicUsize::new(5),
            ..FaultyStore::default()
        });
        let opts = WriterOptions {
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_millis(150),
            ..WriterOptions::default()
        };
        let (writer, task) = spawn(&store, opts);
        let (listener, _acks) = listener();
        writer
            .submit(request("doc", 0, &listener))
            .await
            .expect("submit");
        drop(writer);
        task.await.expect("writer task");

        let calls = store.calls();
        let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].0 - w[0].0).collect();
        // The timer wheel rounds sleeps up to its next millisecond tick.
        let expected = [50, 100, 150, 150, 150].map(Duration::from_millis);
        assert_eq!(gaps.len(), expected.len(), "{gaps:?}");
        for (gap, want) in gaps.iter().zip(expected) {
            assert!(*gap >= want && *gap <= want + TICK, "{gaps:?}");
        }
        assert_eq!(calls.last().map(|c| c.2), Some(true));
    }

    #[tokio::test]
    async fn submitters_wait_while_the_store_is_down() {
        tokio::time::pause();
        let store = Arc::new(FaultyStore {
            down: AtomicBool::new(true),
            ..FaultyStore::default()
        });
        let opts = WriterOptions {
            max_batch: 2,
            queue_capacity: 4,
            ..WriterOptions::default()
        };
        let (writer, task) = spawn(&store, opts);
        let (listener, mut acks) = listener();

        // Two go into the failing batch, four fill the queue.
        for seq in 0..6 {
            writer
                .submit(request("doc", seq, &listener))
                .await
                .expect("submit");
        }
        assert_eq!(writer.queued(), 4);
        let blocked = tokio::time::timeout(
            Duration::from_secs(60),
            writer.submit(request("doc", 99, &listener)),
        )
        .await;
        assert!(blocked.is_err(), "submit must wait while the store is down");
        assert!(
            drain(&mut acks).is_empty(),
            "nothing acknowledged before it is durable"
        );

        store.down.store(false, Ordering::SeqCst);
        writer
            .submit(request("doc", 6, &listener))
            .await
            .expect("submit");
        drop(writer);
        task.await.expect("writer task");

        let acks = drain(&mut acks);
        assert_eq!(
            acks,
            (0..7).map(|seq| (seq, seq as i64 + 1)).collect::<Vec<_>>()
        );
        assert_eq!(stored_data(&store, "doc").await.len(), 7);
    }

    #[tokio::test]
    async fn dropping_every_writer_flushes_the_queue_without_waiting_out_the_window() {
        tokio::time::pause();
        let store = Arc::new(FaultyStore::default());
        let window = Duration::from_secs(3600);
        let opts = WriterOptions {
            window,
            max_batch: 1000,
            ..WriterOptions::default()
        };
        let (writer, task) = spawn(&store, opts);
        let second = writer.clone();
        let (listener, mut acks) = listener();
        for seq in 0..50 {
            let handle = if seq % 2 == 0 { &writer } else { &second };
            handle
                .submit(request("doc", seq, &listener))
                .await
                .expect("submit");
            if seq <= 1 {
                // The first, alone after a quiet spell, is committed at once; the second finds
                // the writer idle right after it, so its batch waits the window for company.
                tokio::task::yield_now().await;
            }
        }

        let started = Instant::now();
        drop(writer);
        // One handle left: the batch is still collecting, nothing more is committed yet.
        tokio::task::yield_now().await;
        assert_eq!(drain(&mut acks), vec![(0, 1)]);
        drop(second);
        task.await.expect("writer task");

        assert!(started.elapsed() < window, "closing ends the batch window");
        assert_eq!(drain(&mut acks).len(), 49);
        assert_eq!(stored_data(&store, "doc").await.len(), 50);
    }

    #[tokio::test]
    async fn a_backlog_is_committed_without_waiting_for_the_window() {
        tokio::time::pause();
        let store = Arc::new(FaultyStore::default());
        let window = Duration::from_secs(3600);
        let opts = WriterOptions {
            window,
            max_batch: 1000,
            ..WriterOptions::default()
        };
        let (listener, mut acks) = listener();
        let (writer, task) = spawn(&store, opts);
        // Queued before the writer task first runs: a backlog, as after a long commit.
        for seq in 0..10 {
            writer
                .submit(request("doc", seq, &listener))
                .await
                .expect("submit");
        }
        let all_acked = async {
            for _ in 0..10 {
                acks.recv().await.expect("ack");
            }
        };
        // Virtual time: it would jump to the timeout if the batch waited for its window.
        tokio::time::timeout(window / 2, all_acked)
            .await
            .expect("the backlog was committed without waiting for the window");
        drop(writer);
        task.await.expect("writer task");
        assert_eq!(stored_data(&store, "doc").await.len(), 10);
    }

    #[tokio::test]
    async fn submit_fails_once_the_task_is_gone() {
        let store = Arc::new(FaultyStore::default());
        let (writer, task) = spawn(&store, WriterOptions::default());
        task.abort();
        let _ = task.await;
        let (listener, _acks) = listener();
        assert_eq!(
            writer.submit(request("doc", 0, &listener)).await,
            Err(WriterClosed)
        );
    }
}
