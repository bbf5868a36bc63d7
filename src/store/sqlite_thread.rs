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
use std::thread;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::StoreError;

/// Jobs queued for the thread before a sender waits for room (the queue's overflow policy). Every
/// caller awaits its job's answer before sending another, so the queue never holds more than one
/// job per concurrent caller: the group-commit writer, a compaction per room, a load per room
/// being opened.
const QUEUE: usize = 64;

/// What the thread receives.
enum Job {
    /// Run this on the connection.
    Run(Box<dyn FnOnce(&mut Connection) + Send>),
    /// Close the connection, answer, and refuse everything after.
    Close(oneshot::Sender<()>),
}

/// A connection on its own thread. Dropping the last handle (or [`close`](Self::close)) closes
/// the connection once the jobs queued before have run.
pub(crate) struct SqliteThread {
    jobs: mpsc::Sender<Job>,
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
        thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || serve(open, queue, opened))?;
        ready.await.map_err(|_| StoreError::Closed)??;
        Ok(Self { jobs })
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
            let result = catch_unwind(AssertUnwindSafe(|| op(conn))).unwrap_or_else(|panic| {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(StoreError::Internal(format!(
                    "an SQLite job panicked: {why}"
                )))
            });
            // The caller may have stopped waiting (its task was cancelled): nothing to tell.
            let _ = answer.send(result);
        };
        self.jobs
            .send(Job::Run(Box::new(job)))
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(answered)
    }

    /// Closes the connection after the jobs queued before this call; every later job fails with
    /// [`StoreError::Closed`]. Returns once the connection is closed.
    pub(crate) async fn close(&self) {
        let (closed, done) = oneshot::channel();
        if self.jobs.send(Job::Close(closed)).await.is_ok() {
            let _ = done.await;
        }
    }
}

/// The thread's body: open, then run jobs until closed or every handle is dropped.
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
    while let Some(job) = queue.blocking_recv() {
        match job {
            Job::Run(job) => {
                job(&mut conn);
                if !conn.is_autocommit() {
                    // Only a panicking job can leave a transaction open (rusqlite's
                    // `Transaction` rolls back when dropped); the next job must not run in it.
                    tracing::error!("an SQLite job left a transaction open; rolling it back");
                    let _ = conn.execute_batch("ROLLBACK");
                }
            }
            Job::Close(closed) => {
                queue.close();
                drop(conn);
                let _ = closed.send(());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn jobs_run_in_order_on_one_connection() {
        let thread = memory_with_table().await;
        for x in 0..10 {
            thread
                .run(move |conn| Ok(conn.execute("INSERT INTO t VALUES (?1)", [x])?))
                .await
                .expect("insert");
        }
        let xs: Vec<i64> = thread
            .run(|conn| {
                let mut select = conn.prepare("SELECT x FROM t ORDER BY rowid")?;
                let xs = select.query_map([], |row| row.get(0))?;
                Ok(xs.collect::<Result<_, _>>()?)
            })
            .await
            .expect("select");
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
    async fn after_close_every_job_is_refused() {
        let thread = memory().await;
        thread.close().await;
        let err = thread.run(|_| Ok(())).await.expect_err("closed");
        assert!(matches!(err, StoreError::Closed), "{err:?}");
        // Closing twice is harmless.
        thread.close().await;
    }
}
