//! `SqliteThread`: one SQLite connection, owned by a thread of its own, that async code hands
//! jobs to.
//!
//! A job is a closure run on the connection, synchronously, one at a time, in the order they were
//! sent; its caller awaits the answer. That is one hand-off to the thread and one back per job,
//! however many statements and rows the job has. (sqlx's SQLite driver also keeps each connection
//! on a thread, but sends every statement, argument list, row and result across separately; for a
//! one-row append that machinery cost about as much as SQLite itself: docs/benchmarks.md,
//! session 14.)

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::{self, Thread};
use std::time::Instant;

use rusqlite::Connection;
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};
use tokio::sync::{mpsc, oneshot};

use super::batcher::{Batcher, HostedWriter, Turn};
use super::{Append, StoreError};

/// Jobs queued for the thread before a sender waits for room (the queue's overflow policy). Every
/// caller awaits its job's answer before sending another, so the queue never holds more than one
/// job per concurrent caller: the group-commit writer when it runs as a task, a compaction per
/// room, a load per room being opened. A writer hosted here sends one job, once, and then its
/// updates come through its own queue.
const QUEUE: usize = 64;

/// Appends a batch on the connection: what a hosted [`Batcher`] commits with.
pub(crate) type AppendOn =
    Box<dyn FnMut(&mut Connection, &[Append]) -> Result<Vec<i64>, StoreError> + Send>;

/// What the thread receives.
enum Job {
    /// Run this on the connection.
    Run(Box<dyn FnOnce(&mut Connection) + Send>),
    /// Turn this group-commit loop between jobs.
    Host(Hosted),
    /// Close the connection, answer, and refuse everything after.
    Close(oneshot::Sender<()>),
}

/// A connection on its own thread. Dropping the last handle (or [`close`](Self::close)) closes
/// the connection once the jobs queued before have run.
pub(crate) struct SqliteThread {
    jobs: mpsc::Sender<Job>,
    /// The thread, which sleeps (parked) when it has nothing to do: every sender unparks it.
    thread: Thread,
}

/// A group-commit loop the thread turns, with what it appends with and whom to tell when the
/// loop is over.
struct Hosted {
    batcher: Box<Batcher>,
    append: AppendOn,
    done: oneshot::Sender<()>,
}

impl fmt::Debug for SqliteThread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteThread")
            .field("queued", &(self.jobs.max_capacity() - self.jobs.capacity()))
            .finish()
    }
}

impl SqliteThread {
    /// Starts a thread named `name` and opens its connection there with `open`. Fails with
    /// `open`'s error.
    pub(crate) async fn start(
        name: &str,
        open: impl FnOnce() -> Result<Connection, StoreError> + Send + 'static,
    ) -> Result<Self, StoreError> {
        let (jobs, queue) = mpsc::channel(QUEUE);
        let (opened, ready) = oneshot::channel();
        let handle = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || serve(open, queue, opened))?;
        ready.await.map_err(|_| StoreError::Closed)??;
        Ok(Self {
            jobs,
            thread: handle.thread().clone(),
        })
    }

    /// Has the thread turn `batcher` between jobs, committing with `append`. Gives it back if
    /// the thread is closed or its queue is full.
    pub(crate) fn host(
        &self,
        batcher: Box<Batcher>,
        append: AppendOn,
    ) -> Result<HostedWriter, Box<Batcher>> {
        let (done, finished) = oneshot::channel();
        let job = Job::Host(Hosted {
            batcher,
            append,
            done,
        });
        match self.jobs.try_send(job) {
            Ok(()) => {
                self.thread.unpark();
                Ok(HostedWriter {
                    thread: self.thread.clone(),
                    done: finished,
                })
            }
            Err(TrySendError::Full(Job::Host(hosted)))
            | Err(TrySendError::Closed(Job::Host(hosted))) => Err(hosted.batcher),
            Err(_) => unreachable!("the job sent is a Host"),
        }
    }

    /// Jobs sent and not yet taken up by the thread.
    pub(crate) fn queued(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }

    /// Runs `op` on the connection and returns its result. A panic in `op` is caught and
    /// reported as [`StoreError::Internal`]; a transaction it left open is rolled back.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.submit(op)
            .await?
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Queues `op` and returns, without waiting for it to run, the receiver of its result. For a
    /// job that talks to its caller while it runs (compaction hands its rows over, then waits for
    /// the fold).
    pub(crate) async fn submit<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<oneshot::Receiver<Result<T, StoreError>>, StoreError> {
        let (answer, answered) = oneshot::channel();
        let job = move |conn: &mut Connection| {
            let result = caught(|| op(conn));
            // The caller may have stopped waiting (its task was cancelled): nothing to tell.
            let _ = answer.send(result);
        };
        self.jobs
            .send(Job::Run(Box::new(job)))
            .await
            .map_err(|_| StoreError::Closed)?;
        self.thread.unpark();
        Ok(answered)
    }

    /// Closes the connection after the jobs queued before this call; every later job fails with
    /// [`StoreError::Closed`]. Returns once the connection is closed.
    pub(crate) async fn close(&self) {
        let (closed, done) = oneshot::channel();
        if self.jobs.send(Job::Close(closed)).await.is_ok() {
            self.thread.unpark();
            let _ = done.await;
        }
    }
}

/// The thread's body: open, then run jobs and turn the hosted writer until closed or every
/// handle is dropped, sleeping (parked) whenever neither has anything to do.
fn serve(
    open: impl FnOnce() -> Result<Connection, StoreError>,
    mut queue: mpsc::Receiver<Job>,
    opened: oneshot::Sender<Result<(), StoreError>>,
) {
    let mut conn = match open() {
        Ok(conn) => conn,
        Err(e) => {
            let _ = opened.send(Err(e));
            return;
        }
    };
    if opened.send(Ok(())).is_err() {
        return;
    }
    let mut hosted: Option<Hosted> = None;
    loop {
        // Jobs first, in the order they were sent; then one turn of the writer.
        let disconnected = loop {
            match queue.try_recv() {
                Ok(Job::Run(job)) => run(&mut conn, job),
                Ok(Job::Host(h)) => hosted = Some(h),
                Ok(Job::Close(closed)) => {
                    queue.close();
                    if let Some(hosted) = hosted.take() {
                        finish(&mut conn, hosted);
                    }
                    drop(conn);
                    let _ = closed.send(());
                    return;
                }
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        let turn = match &mut hosted {
            Some(h) => {
                let append = &mut h.append;
                h.batcher.turn(Instant::now(), &mut |batch| {
                    append_caught(&mut conn, append, batch)
                })
            }
            None => Turn::Idle,
        };
        match turn {
            Turn::Until(at) => {
                let wait = at.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    thread::park_timeout(wait);
                }
            }
            Turn::Done => {
                if let Some(hosted) = hosted.take() {
                    let _ = hosted.done.send(());
                }
            }
            Turn::Idle if disconnected => return,
            Turn::Idle => thread::park(),
        }
    }
}

/// Runs `op`, turning a panic into [`StoreError::Internal`].
fn caught<T>(op: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    catch_unwind(AssertUnwindSafe(op)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(StoreError::Internal(format!(
            "an SQLite job panicked: {why}"
        )))
    })
}

/// Appends with `append`, as a job does: a panic is an error, and a transaction it left open is
/// rolled back.
fn append_caught(
    conn: &mut Connection,
    append: &mut AppendOn,
    batch: &[Append],
) -> Result<Vec<i64>, StoreError> {
    let result = caught(|| append(conn, batch));
    roll_back_leftover(conn);
    result
}

/// Rolls back a transaction a panicking job left open.
fn roll_back_leftover(conn: &mut Connection) {
    if !conn.is_autocommit() {
        // Only a panicking job can leave a transaction open (rusqlite's `Transaction` rolls back
        // when dropped); the next job must not run in it.
        tracing::error!("an SQLite job left a transaction open; rolling it back");
        let _ = conn.execute_batch("ROLLBACK");
    }
}

/// Runs one job, rolling back a transaction it left open.
fn run(conn: &mut Connection, job: Box<dyn FnOnce(&mut Connection) + Send>) {
    job(conn);
    roll_back_leftover(conn);
}

/// Commits what a hosted writer holds and has queued before the connection closes (at shutdown
/// every room has waited for its updates, so this is normally nothing).
fn finish(conn: &mut Connection, mut hosted: Hosted) {
    let append = &mut hosted.append;
    if !hosted
        .batcher
        .flush(&mut |batch| append_caught(conn, append, batch))
    {
        tracing::error!("the store closed with updates it could not commit; none was acknowledged");
    }
    let _ = hosted.done.send(());
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::ids::RoomId;
    use crate::store::writer::testing::listener;
    use crate::store::writer::{WriteRequest, WriterOptions, WriterStats};

    async fn memory() -> SqliteThread {
        SqliteThread::start("test-sqlite", || Ok(Connection::open_in_memory()?))
            .await
            .expect("start")
    }

    /// An in-memory connection holding an empty table `t (x INTEGER)`.
    async fn memory_with_table() -> SqliteThread {
        let thread = memory().await;
        thread
            .run(|conn| Ok(conn.execute_batch("CREATE TABLE t (x INTEGER)")?))
            .await
            .expect("create");
        thread
    }

    /// Every `x` of the table `t`, in insertion order.
    async fn column(thread: &SqliteThread) -> Vec<i64> {
        thread
            .run(|conn| {
                let mut select = conn.prepare("SELECT x FROM t ORDER BY rowid")?;
                let xs = select.query_map([], |row| row.get(0))?;
                Ok(xs.collect::<Result<_, _>>()?)
            })
            .await
            .expect("select")
    }

    #[tokio::test]
    async fn jobs_run_in_order_on_one_connection() {
        let thread = memory_with_table().await;
        for x in 0..10 {
            thread
                .run(move |conn| Ok(conn.execute("INSERT INTO t VALUES (?1)", [x])?))
                .await
                .expect("insert");
        }
        let xs = column(&thread).await;
        assert_eq!(xs, (0..10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_failed_open_is_the_error_of_start() {
        let err = SqliteThread::start("test-sqlite", || {
            Err(StoreError::Config("no such database".into()))
        })
        .await
        .expect_err("open fails");
        assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_panicking_job_is_an_error_and_its_transaction_is_rolled_back() {
        let thread = memory_with_table().await;
        let err = thread
            .run(|conn| -> Result<(), StoreError> {
                conn.execute_batch("BEGIN; INSERT INTO t VALUES (1);")?;
                panic!("boom");
            })
            .await
            .expect_err("the job panicked");
        assert!(
            matches!(&err, StoreError::Internal(why) if why.contains("boom")),
            "{err:?}"
        );
        let rows: i64 = thread
            .run(|conn| Ok(conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?))
            .await
            .expect("the thread still serves");
        assert_eq!(rows, 0, "the panicking job's insert was rolled back");
    }

    #[tokio::test]
    async fn a_hosted_writer_commits_between_jobs_and_outlives_a_panicking_append() {
        let thread = memory_with_table().await;
        let opts = WriterOptions {
            window: Duration::ZERO,
            retry_initial: Duration::from_millis(1),
            retry_max: Duration::from_millis(1),
            ..WriterOptions::default()
        };
        let (tx, rx) = mpsc::channel(16);
        let stats = Arc::new(WriterStats::default());
        let batcher = Box::new(Batcher::new(rx, opts, stats.clone()));
        let mut calls = 0;
        let append: AppendOn = Box::new(move |conn, batch| {
            calls += 1;
            let tx = conn.transaction()?;
            let mut ids = Vec::new();
            for a in batch {
                tx.execute("INSERT INTO t VALUES (?1)", [a.data.len() as i64])?;
                ids.push(tx.last_insert_rowid());
            }
            assert!(calls > 1, "the first append panics inside its transaction");
            tx.commit()?;
            Ok(ids)
        });
        let hosted = thread.host(batcher, append).expect("the thread takes it");
        let (listener, mut acks) = listener();
        for seq in 1..=3u64 {
            tx.send(WriteRequest {
                append: Append {
                    room: RoomId::new("r").expect("room"),
                    data: Bytes::from(vec![0; seq as usize]),
                    origin: Arc::from("test"),
                },
                seq,
                listener: listener.clone(),
            })
            .await
            .expect("queued");
            hosted.thread.unpark();
            // Jobs keep running on the thread while it hosts the writer.
            thread.run(|_| Ok(())).await.expect("a job runs");
        }
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let ack = tokio::time::timeout(Duration::from_secs(5), acks.recv()).await;
            seen.push(ack.expect("acknowledged").expect("listener alive"));
        }
        assert_eq!(
            seen.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert!(
            stats.failures() >= 1,
            "the panic counted as a failed append"
        );
        let rows = column(&thread).await;
        assert_eq!(
            rows,
            [1, 2, 3],
            "each update once, in order, nothing of the panic"
        );
        drop(tx);
        hosted.thread.unpark();
        tokio::time::timeout(Duration::from_secs(5), hosted.done)
            .await
            .expect("the loop ends once every handle is dropped")
            .expect("said so");
    }

    #[tokio::test]
    async fn after_close_every_job_is_refused() {
        let thread = memory().await;
        thread.close().await;
        let err = thread.run(|_| Ok(())).await.expect_err("closed");
        assert!(matches!(err, StoreError::Closed), "{err:?}");
        // Closing twice is harmless.
        thread.close().await;
    }
}
