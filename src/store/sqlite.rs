//! `SqliteStore`: the embedded [`Store`], one SQLite file under the data dir (WAL, fully synced).
//!
//! Each connection lives on a thread of its own ([`SqliteThread`]) and runs whole operations
//! there, synchronously: an append is one hand-off to the write connection's thread and one back,
//! whatever it holds. The group-commit writer runs on the write connection's thread itself
//! ([`Store::host_writer`]), so the updates it commits need no hand-off at all.

use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use sqlx::Connection as _;
use tokio::sync::oneshot;

use super::batcher::{Batcher, HostedWriter};
use super::sqlite_thread::SqliteThread;
use super::{
    fold_rows, nothing_folded, Append, Compacted, Fold, Snapshot, Store, StoreError, StoredRoom,
};
use crate::hashing::FastSet;
use crate::ids::RoomId;

/// How long a statement waits for another process's write lock before failing with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Read connections. WAL readers never block the writer nor each other, so a few let loads of
/// different rooms proceed while a batch commits.
const READ_CONNECTIONS: usize = 4;

/// The schema, embedded. sqlx applies it to a database file and records what it applied in
/// `_sqlx_migrations`; a new in-memory database gets every migration's SQL in order.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Appends a row.
const INSERT_UPDATE: &str =
    "INSERT INTO updates (room, data, origin, created_at) VALUES (?1, ?2, ?3, ?4)";

/// Registers a room appended to at `?2`: a new room gets `created_at` and `updated_at` `?2`; a
/// known one moves its `updated_at` to `?2` only when the second changes, so `updated_at` is the
/// time of the room's first append in the second of its latest one, and never moves backwards.
const TOUCH_ROOM: &str = "INSERT INTO rooms (room, created_at, updated_at) VALUES (?1, ?2, ?2) \
     ON CONFLICT (room) DO UPDATE SET updated_at = excluded.updated_at \
     WHERE substr(excluded.updated_at, 1, 19) > substr(rooms.updated_at, 1, 19)";

/// The rooms whose `rooms` row this process's appends have registered within one second: an
/// append to one of them in the same second would change nothing there, and skips it. Filled
/// only after a commit, so a rolled-back append never marks its room.
#[derive(Debug, Default)]
struct Touched {
    /// Seconds since the Unix epoch that `rooms` belongs to.
    second: u64,
    rooms: FastSet<RoomId>,
}

/// A [`Store`] in one SQLite database file.
///
/// Durability: WAL journal with `synchronous = FULL`, so a commit is on disk before `append`
/// returns. Ids come from an `AUTOINCREMENT` key: one sequence for the whole store, never reused.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The one write connection. SQLite admits one writer at a time; funnelling this process's
    /// writes through a single connection queues them on its thread instead of having several
    /// connections contend for the file lock (busy waits, `SQLITE_BUSY`), and the group-commit
    /// writer already turns many small appends into one transaction.
    write: Arc<SqliteThread>,
    /// Connections for `load`, `rooms` and `ping`. Empty for an in-memory database, whose data
    /// lives only in its one connection: everything goes through `write`.
    read: Arc<[SqliteThread]>,
    /// Used by appends, on `write`'s thread only (the lock is never contended).
    touched: Arc<Mutex<Touched>>,
}

impl SqliteStore {
    /// Opens (creating it and its parent directories if needed) the database file at `path` and
    /// applies the migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new().filename(path);
        Self::with_options(options, false).await
    }

    /// Connects to a `sqlite:` URL (`sqlite://path/to/file.db`, `sqlite:file.db`), creating the
    /// file and its parent directories if needed, and applies the migrations.
    /// `sqlite::memory:` gives a private in-memory database, for tests.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        if !url.starts_with("sqlite:") {
            let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
            return Err(StoreError::Config(format!(
                "the SQLite store cannot open a {scheme:?} URL"
            )));
        }
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("bad SQLite URL: {e}")))?;
        Self::with_options(options, in_memory).await
    }

    async fn with_options(
        options: SqliteConnectOptions,
        in_memory: bool,
    ) -> Result<Self, StoreError> {
        if in_memory {
            let write = SqliteThread::start("tandem-sqlite", || {
                let mut conn = Connection::open_in_memory()?;
                configure(&conn)?;
                migrate_in_memory(&mut conn)?;
                Ok(conn)
            })
            .await?;
            return Ok(Self {
                write: Arc::new(write),
                read: Arc::new([]),
                touched: Arc::default(),
            });
        }
        let path = options.get_filename().to_owned();
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                tokio::fs::create_dir_all(parent).await?;
            }
        }
        // sqlx creates the file, switches it to WAL (which the file remembers) and migrates it.
        let mut migrating = SqliteConnection::connect_with(
            &options
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(BUSY_TIMEOUT),
        )
        .await?;
        let migrated = MIGRATOR.run(&mut migrating).await;
        migrating.close().await?;
        migrated?;
        let open = |path: std::path::PathBuf| {
            move || {
                let conn = Connection::open(path)?;
                configure(&conn)?;
                Ok(conn)
            }
        };
        let write = SqliteThread::start("tandem-sqlite", open(path.clone())).await?;
        // All of them open from the start and kept: a node's open files do not grow with its
        // first loads (the soak scenario checks that they return to where they started).
        let mut read = Vec::with_capacity(READ_CONNECTIONS);
        for _ in 0..READ_CONNECTIONS {
            read.push(SqliteThread::start("tandem-sqlite-read", open(path.clone())).await?);
        }
        Ok(Self {
            write: Arc::new(write),
            read: read.into(),
            touched: Arc::default(),
        })
    }

    /// The connection for a read: the least busy read connection, or the write connection of an
    /// in-memory database.
    fn reader(&self) -> &SqliteThread {
        self.read
            .iter()
            .min_by_key(|thread| thread.queued())
            .unwrap_or(&self.write)
    }
}

/// Sets up a new connection: waits for other processes' locks, commits durably (WAL with
/// `synchronous = FULL`: every commit is synced before it returns), checks foreign keys as sqlx's
/// connections do.
fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    // An in-memory database keeps its journal in memory whatever is asked.
    if mode != "wal" && mode != "memory" {
        return Err(StoreError::Config(format!(
            "the SQLite database is in journal mode {mode:?}, not WAL"
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

/// Applies every migration to a new in-memory database, in one transaction.
fn migrate_in_memory(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    for migration in MIGRATOR.iter() {
        if !migration.migration_type.is_down_migration() {
            tx.execute_batch(&migration.sql)?;
        }
    }
    tx.commit()?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn load(&self, room: &RoomId) -> Result<StoredRoom, StoreError> {
        let room = room.clone();
        let (snapshot, updates) = self.reader().run(move |conn| load_on(conn, &room)).await?;
        Ok(StoredRoom { snapshot, updates })
    }

    async fn append(&self, batch: &[Append]) -> Result<Vec<i64>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let batch = batch.to_vec();
        let touched = self.touched.clone();
        self.write
            .run(move |conn| append_on(conn, &batch, &touched, SystemTime::now()))
            .await
    }

    async fn compact(&self, room: &RoomId, fold: &dyn Fold) -> Result<Compacted, StoreError> {
        // The thread reads the room under the write lock and hands the rows over; the fold runs
        // here, off that thread; the thread then writes what it sends back, or rolls back.
        let (read_tx, read) = oneshot::channel();
        let (plan, plan_rx) = oneshot::channel();
        let job_room = room.clone();
        let done = self
            .write
            .submit(move |conn| compact_on(conn, &job_room, read_tx, plan_rx))
            .await?;
        let finished = |done: oneshot::Receiver<Result<(), StoreError>>| async move {
            done.await.map_err(|_| StoreError::Closed)?
        };
        let Ok((stored, rows)) = read.await else {
            // The job failed before it could read (the lock, a read): its error.
            finished(done).await?;
            return Err(StoreError::Internal(
                "a compaction ended without reading the room".into(),
            ));
        };
        match fold_rows(fold, stored.as_ref(), &rows) {
            Ok(Some((snapshot, compacted))) => {
                // If the thread is gone, `finished` says so.
                let _ = plan.send(snapshot);
                finished(done).await?;
                Ok(compacted)
            }
            Ok(None) => {
                drop(plan);
                finished(done).await?;
                Ok(nothing_folded(stored.as_ref()))
            }
            Err(e) => {
                // Dropping the plan rolls the transaction back; the fold's error is the answer.
                drop(plan);
                let _ = finished(done).await;
                Err(e)
            }
        }
    }

    async fn rooms(&self) -> Result<Vec<RoomId>, StoreError> {
        self.reader()
            .run(|conn| {
                // BINARY collation compares UTF-8 bytes, the same order as `RoomId`'s `Ord`.
                let mut select = conn.prepare_cached("SELECT room FROM rooms ORDER BY room")?;
                let rooms = select.query_map([], |row| {
                    let name: String = row.get(0)?;
                    RoomId::new(&name).map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(0, Type::Text, Box::new(e))
                    })
                })?;
                Ok(rooms.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.reader()
            .run(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }

    async fn close(&self) {
        for thread in self.read.iter() {
            thread.close().await;
        }
        self.write.close().await;
    }

    fn host_writer(&self, batcher: Box<Batcher>) -> Result<HostedWriter, Box<Batcher>> {
        let touched = self.touched.clone();
        self.write.host(
            batcher,
            Box::new(move |conn, batch| append_on(conn, batch, &touched, SystemTime::now())),
        )
    }
}

/// A room's snapshot and log as read by [`read_room`].
type Loaded = (Option<Snapshot>, Vec<(i64, Bytes)>);

/// One read transaction: both SELECTs see the same WAL snapshot, so a compaction committing in
/// between cannot make us pair an old snapshot with an already-pruned log.
fn load_on(conn: &mut Connection, room: &RoomId) -> Result<Loaded, StoreError> {
    let tx = conn.transaction()?;
    let loaded = read_room(&tx, room)?;
    tx.commit()?;
    Ok(loaded)
}

/// Appends `batch`, stamped `at`, and returns the rows' ids, in order. A room not yet registered
/// in `at`'s second is registered in the same transaction; a one-row append to a room that is
/// needs no transaction of its own (the statement is atomic).
fn append_on(
    conn: &mut Connection,
    batch: &[Append],
    touched: &Mutex<Touched>,
    at: SystemTime,
) -> Result<Vec<i64>, StoreError> {
    // The schema's default, `strftime('%Y-%m-%dT%H:%M:%fZ', 'now')`, in the same format, formatted
    // once per batch here: SQLite's formatting of the milliseconds cost more than the rest of a
    // one-row insert (docs/benchmarks.md, session 11).
    let now = humantime::format_rfc3339_millis(at).to_string();
    let second = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut touched = touched.lock().unwrap_or_else(PoisonError::into_inner);
    if touched.second != second {
        touched.second = second;
        touched.rooms.clear();
    }
    let mut new: Vec<&RoomId> = Vec::new();
    for append in batch {
        if !touched.rooms.contains(&append.room) && !new.contains(&&append.room) {
            new.push(&append.room);
        }
    }
    if let ([append], []) = (batch, new.as_slice()) {
        return Ok(vec![insert_row(conn, append, &now)?]);
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let ids = batch
        .iter()
        .map(|append| insert_row(&tx, append, &now))
        .collect::<Result<Vec<_>, _>>()?;
    for room in &new {
        touch_room(&tx, room, &now)?;
    }
    tx.commit()?;
    touched.rooms.extend(new.into_iter().cloned());
    Ok(ids)
}

/// Registers `room` as appended to at `at` ([`TOUCH_ROOM`]).
fn touch_room(conn: &Connection, room: &RoomId, at: &str) -> Result<(), StoreError> {
    conn.prepare_cached(TOUCH_ROOM)?
        .execute(params![room.as_str(), at])?;
    Ok(())
}

/// Inserts one row and returns its id. No `RETURNING`: SQLite collects RETURNING rows in an
/// ephemeral table, opened and closed with its own pager for each statement. The connection's last
/// rowid is the row's.
fn insert_row(conn: &Connection, append: &Append, now: &str) -> Result<i64, StoreError> {
    let mut insert = conn.prepare_cached(INSERT_UPDATE)?;
    let inserted = insert.execute(params![
        append.room.as_str(),
        &append.data[..],
        &*append.origin,
        now
    ])?;
    if inserted != 1 {
        return Err(StoreError::Internal(format!(
            "inserted {inserted} rows instead of 1"
        )));
    }
    Ok(conn.last_insert_rowid())
}

/// The thread's half of [`Store::compact`]: takes the write lock, reads `room`, sends what it read
/// to `read`, and stores the snapshot `plan` then brings, deleting exactly the rows read. Rolls
/// back if `plan` brings nothing (an empty log, a failed fold, a caller that went away).
fn compact_on(
    conn: &mut Connection,
    room: &RoomId,
    read: oneshot::Sender<Loaded>,
    plan: oneshot::Receiver<Snapshot>,
) -> Result<(), StoreError> {
    // `BEGIN IMMEDIATE` takes the write lock up front, held from the first read to the commit, and
    // waits `busy_timeout` for another process instead of failing at once. It is also compaction's
    // per-room exclusive lock: SQLite's one write lock covers every room, in this process and any
    // other on the same file. No other compaction can fold or delete these rows meanwhile, and no
    // append can slip a row in between the read and the delete.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (stored, rows) = read_room(&tx, room)?;
    let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
    if read.send((stored, rows)).is_err() {
        return Ok(());
    }
    let Ok(snapshot) = plan.blocking_recv() else {
        return Ok(());
    };
    tx.prepare_cached(
        "INSERT INTO snapshots (room, upto_id, state, state_vector) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (room) DO UPDATE SET upto_id = excluded.upto_id, state = excluded.state, \
         state_vector = excluded.state_vector, updated_at = excluded.updated_at",
    )?
    .execute(params![
        room.as_str(),
        snapshot.upto_id,
        &snapshot.state[..],
        &snapshot.state_vector[..]
    ])?;
    // Exactly the rows read, by id.
    let mut delete = tx.prepare_cached("DELETE FROM updates WHERE room = ?1 AND id = ?2")?;
    let mut deleted = 0;
    for id in &ids {
        deleted += delete.execute(params![room.as_str(), id])?;
    }
    drop(delete);
    if deleted != ids.len() {
        // Impossible while we hold the write lock; refuse rather than store a snapshot that
        // disagrees with the log.
        return Err(StoreError::Internal(format!(
            "compaction deleted {deleted} of {} folded rows",
            ids.len()
        )));
    }
    tx.commit()?;
    Ok(())
}

/// Reads a room's snapshot and every row of its log, in id order.
fn read_room(conn: &Connection, room: &RoomId) -> Result<Loaded, StoreError> {
    let snapshot = conn
        .prepare_cached("SELECT upto_id, state, state_vector FROM snapshots WHERE room = ?1")?
        .query_row([room.as_str()], |row| {
            Ok(Snapshot {
                upto_id: row.get(0)?,
                state: Bytes::from(row.get::<_, Vec<u8>>(1)?),
                state_vector: Bytes::from(row.get::<_, Vec<u8>>(2)?),
            })
        })
        .optional()?;
    let mut select =
        conn.prepare_cached("SELECT id, data FROM updates WHERE room = ?1 ORDER BY id")?;
    let updates = select
        .query_map([room.as_str()], |row| {
            Ok((row.get(0)?, Bytes::from(row.get::<_, Vec<u8>>(1)?)))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok((snapshot, updates))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use tempfile::TempDir;

    use super::{append_on, SqliteStore};
    use crate::doc::YrsFold;
    use crate::ids::RoomId;
    use crate::store::suite::{assert_holds_exactly, keyed_update};
    use crate::store::writer::testing::listener;
    use crate::store::writer::{StoreWriter, WriteRequest, WriterOptions};
    use crate::store::{Append, DynStore, Store, StoreError};

    /// A store in a new file, as its own type (for the tests that reach its threads).
    async fn file_store() -> (SqliteStore, TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("tandem.db"))
            .await
            .expect("open store");
        (store, dir)
    }

    async fn sqlite_store() -> (DynStore, TempDir) {
        let (store, dir) = file_store().await;
        (Arc::new(store), dir)
    }

    crate::store::suite::store_suite!(sqlite_store);

    fn room(name: &str) -> RoomId {
        RoomId::new(name).expect("valid room name")
    }

    fn append(room_name: &str, data: &'static [u8]) -> Append {
        keyed(room_name, Bytes::from_static(data))
    }

    fn keyed(room_name: &str, data: Bytes) -> Append {
        Append {
            room: room(room_name),
            data,
            origin: Arc::from("test-node"),
        }
    }

    #[tokio::test]
    async fn the_writer_runs_on_the_stores_thread_and_closing_commits_what_it_holds() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tandem.db");
        let store: DynStore = Arc::new(SqliteStore::open(&path).await.expect("open"));
        // A window far longer than the test: only closing the store commits the second update.
        let opts = WriterOptions {
            window: Duration::from_secs(600),
            ..WriterOptions::default()
        };
        let (writer, _task) = StoreWriter::spawn(store.clone(), opts);
        let (listener, mut acks) = listener();
        let submit = |seq: u64, data: &'static [u8]| {
            writer.try_submit(WriteRequest {
                append: append("a", data),
                seq,
                listener: listener.clone(),
            })
        };
        submit(1, b"one").expect("queued");
        submit(2, b"two").expect("queued");
        writer.nudge();
        // Two requests queued together are a group: committed at once, window or not.
        let first = tokio::time::timeout(Duration::from_secs(5), acks.recv()).await;
        assert_eq!(first.expect("acknowledged"), Some((1, 1)));
        assert_eq!(acks.recv().await, Some((2, 2)));
        submit(3, b"three").expect("queued");
        writer.nudge();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            acks.try_recv().is_err(),
            "a lone update right after others waits for its window"
        );
        store.close().await;
        assert_eq!(acks.try_recv(), Ok((3, 3)), "closing committed it first");
        assert_eq!(writer.stats().batches(), 2);

        let store = SqliteStore::open(&path).await.expect("reopen");
        let stored = store.load(&room("a")).await.expect("load");
        let data: Vec<(i64, Bytes)> = stored.updates;
        assert_eq!(
            data,
            vec![
                (1, Bytes::from_static(b"one")),
                (2, Bytes::from_static(b"two")),
                (3, Bytes::from_static(b"three")),
            ]
        );
    }

    /// A writer for `store` that commits as soon as it takes something.
    fn writer_without_window(store: &DynStore) -> (StoreWriter, tokio::task::JoinHandle<()>) {
        let opts = WriterOptions {
            window: Duration::ZERO,
            ..WriterOptions::default()
        };
        StoreWriter::spawn(store.clone(), opts)
    }

    #[tokio::test]
    async fn a_burst_queued_before_the_nudge_is_one_commit_even_without_a_window() {
        let (store, _dir) = sqlite_store().await;
        let (writer, _task) = writer_without_window(&store);
        let (listener, mut acks) = listener();
        // Let the loop go to sleep with nothing to do.
        tokio::time::sleep(Duration::from_millis(20)).await;
        for (seq, data) in [(1, b"one"), (2, b"two"), (3, b"six")] {
            writer
                .try_submit(WriteRequest {
                    append: append("a", data),
                    seq,
                    listener: listener.clone(),
                })
                .expect("queued");
        }
        writer.nudge();
        for seq in 1..=3 {
            let ack = tokio::time::timeout(Duration::from_secs(5), acks.recv()).await;
            assert_eq!(ack.expect("acknowledged"), Some((seq, seq as i64)));
        }
        assert_eq!(writer.stats().batches(), 1, "the burst was one group");
    }

    #[tokio::test]
    async fn the_writers_loop_ends_once_every_handle_is_dropped() {
        let (store, _dir) = sqlite_store().await;
        let (writer, task) = writer_without_window(&store);
        let (listener, mut acks) = listener();
        writer
            .submit(WriteRequest {
                append: append("a", b"one"),
                seq: 7,
                listener,
            })
            .await
            .expect("queued");
        let ack = tokio::time::timeout(Duration::from_secs(5), acks.recv()).await;
        assert_eq!(ack.expect("acknowledged"), Some((7, 1)));
        // The loop sleeps with nothing to do: dropping the last handle must wake it to end.
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(writer);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the loop ended")
            .expect("the task ended cleanly");
        assert_eq!(store.load(&room("a")).await.expect("load").updates.len(), 1);
    }

    #[tokio::test]
    async fn everything_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nested/dirs/tandem.db");
        let snapshot = {
            let store = SqliteStore::open(&path).await.expect("open");
            let ids = store
                .append(&[
                    keyed("a", keyed_update(1)),
                    keyed("a", keyed_update(2)),
                    append("b", b"3"),
                ])
                .await
                .expect("append");
            assert_eq!(ids, vec![1, 2, 3]);
            let compacted = store.compact(&room("a"), &YrsFold).await.expect("compact");
            assert_eq!((compacted.rows, compacted.upto_id), (2, 2));
            store
                .append(&[keyed("a", keyed_update(4))])
                .await
                .expect("append");
            let snapshot = store.load(&room("a")).await.expect("load").snapshot;
            store.close().await;
            snapshot.expect("a snapshot")
        };

        let store = SqliteStore::open(&path).await.expect("reopen");
        let a = store.load(&room("a")).await.expect("load a");
        assert_eq!(a.snapshot, Some(snapshot));
        assert_eq!(a.updates, vec![(4, keyed_update(4))]);
        assert_holds_exactly(&a, &[1, 2, 4].into());
        let b = store.load(&room("b")).await.expect("load b");
        assert_eq!(b.updates, vec![(3, Bytes::from_static(b"3"))]);
        assert_eq!(
            store.rooms().await.expect("rooms"),
            vec![room("a"), room("b")]
        );
        // The id sequence carries on where it stopped; nothing is reused.
        assert_eq!(
            store.append(&[append("c", b"5")]).await.expect("append"),
            vec![5]
        );
        store.close().await;
    }

    #[tokio::test]
    async fn ids_are_never_reused_after_the_newest_rows_are_compacted_away() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tandem.db");
        let store = SqliteStore::open(&path).await.expect("open");
        store
            .append(&[keyed("a", keyed_update(1)), keyed("a", keyed_update(2))])
            .await
            .expect("append");
        store.compact(&room("a"), &YrsFold).await.expect("compact");
        store.close().await;

        // The log table is now empty; a plain rowid would restart at 1 and reuse folded ids.
        let store = SqliteStore::open(&path).await.expect("reopen");
        assert_eq!(
            store
                .append(&[keyed("a", keyed_update(3))])
                .await
                .expect("append"),
            vec![3]
        );
        let loaded = store.load(&room("a")).await.expect("load");
        assert_eq!(loaded.updates, vec![(3, keyed_update(3))]);
        assert_holds_exactly(&loaded, &[1, 2, 3].into());
        store.close().await;
    }

    #[tokio::test]
    async fn reopening_applies_migrations_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tandem.db");
        for _ in 0..3 {
            let store = SqliteStore::open(&path).await.expect("open");
            store.append(&[append("a", b"x")]).await.expect("append");
            let applied: i64 = store
                .write
                .run(|conn| {
                    Ok(
                        conn.query_row("SELECT count(*) FROM _sqlx_migrations", [], |row| {
                            row.get(0)
                        })?,
                    )
                })
                .await
                .expect("count migrations");
            let embedded = super::MIGRATOR.migrations.len();
            assert_eq!(applied as usize, embedded);
            store.close().await;
        }
        let store = SqliteStore::open(&path).await.expect("open");
        assert_eq!(store.load(&room("a")).await.expect("load").updates.len(), 3);
        store.close().await;
    }

    #[tokio::test]
    async fn appends_stamp_rows_and_new_rooms_in_the_schemas_format() {
        let (store, _dir) = file_store().await;
        store.append(&[append("a", b"1")]).await.expect("append");
        let (created, shaped, recent, room_created, room_updated): (String, bool, bool, String, String) =
            store.write.run(|conn| Ok(conn.query_row(
                "SELECT u.created_at, \
                 u.created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z', \
                 abs(julianday(u.created_at) - julianday('now')) < 1.0 / 1440, \
                 r.created_at, r.updated_at \
                 FROM updates u JOIN rooms r ON r.room = u.room",
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
            )?))
            .await
            .expect("read the stamps");
        assert!(shaped, "{created} is not %Y-%m-%dT%H:%M:%fZ");
        assert!(recent, "{created} is not within a minute of now");
        assert_eq!(
            (room_created.as_str(), room_updated.as_str()),
            (created.as_str(), created.as_str())
        );
        store.close().await;
    }

    #[tokio::test]
    async fn a_one_row_append_that_registers_its_room_returns_the_updates_id() {
        let (store, _dir) = sqlite_store().await;
        // Three log rows and one room, then a new room: its `rooms` row is inserted in the
        // append of `updates` row 4, after it.
        let first = store
            .append(&[append("z", b"1"), append("z", b"2"), append("z", b"3")])
            .await
            .expect("append");
        assert_eq!(first, [1, 2, 3]);
        let ids = store.append(&[append("a", b"4")]).await.expect("append");
        assert_eq!(ids, [4]);
        let loaded = store.load(&room("a")).await.expect("load");
        assert_eq!(loaded.updates, [(4, Bytes::from_static(b"4"))]);
        store.close().await;
    }

    /// `append_on` at `at` (RFC 3339) to room `r`, then `r`'s `(created_at, updated_at)`.
    async fn append_at(store: &SqliteStore, at: &'static str) -> (String, String) {
        let touched = store.touched.clone();
        store
            .write
            .run(move |conn| {
                let at = humantime::parse_rfc3339(at).expect("a time");
                append_on(conn, &[append("r", b"\x00")], &touched, at)?;
                Ok(conn.query_row(
                    "SELECT created_at, updated_at FROM rooms WHERE room = 'r'",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )?)
            })
            .await
            .expect("append and read the room")
    }

    #[tokio::test]
    async fn a_rooms_updated_at_moves_once_a_second_and_never_back() {
        let (store, _dir) = file_store().await;
        let mut stamps = Vec::new();
        for at in [
            "2030-01-01T00:00:00.100Z",
            "2030-01-01T00:00:00.900Z",
            "2030-01-01T00:00:01.000Z",
            "2029-12-31T23:59:59.999Z",
            "2030-01-01T00:00:01.500Z",
        ] {
            stamps.push(append_at(&store, at).await);
        }
        let first = "2030-01-01T00:00:00.100Z".to_owned();
        let next_second = "2030-01-01T00:00:01.000Z".to_owned();
        assert_eq!(
            stamps,
            [
                (first.clone(), first.clone()),
                (first.clone(), first.clone()),
                (first.clone(), next_second.clone()),
                (first.clone(), next_second.clone()),
                (first, next_second),
            ]
        );
        store.close().await;
    }

    #[tokio::test]
    async fn a_room_is_registered_by_the_first_append_after_a_rolled_back_one() {
        let (store, _dir) = file_store().await;
        // The first append of room `r` fails inside its transaction (the log's table is gone),
        // so its registration rolls back with it and must not be remembered.
        let touched = store.touched.clone();
        let failed = store
            .write
            .run(move |conn| {
                conn.execute_batch("ALTER TABLE updates RENAME TO updates_away")?;
                let at = humantime::parse_rfc3339("2030-01-01T00:00:00.100Z").expect("a time");
                let failed = append_on(conn, &[append("r", b"1")], &touched, at).is_err();
                conn.execute_batch("ALTER TABLE updates_away RENAME TO updates")?;
                Ok(failed)
            })
            .await
            .expect("the failing append ran");
        assert!(failed, "an append without the log's table succeeded");
        // The same second: the room is registered now.
        assert_eq!(
            append_at(&store, "2030-01-01T00:00:00.200Z").await,
            (
                "2030-01-01T00:00:00.200Z".to_owned(),
                "2030-01-01T00:00:00.200Z".to_owned()
            )
        );
        assert_eq!(store.rooms().await.expect("rooms"), [room("r")]);
        store.close().await;
    }

    #[tokio::test]
    async fn opens_in_wal_mode_with_full_sync() {
        let (store, _dir) = file_store().await;
        // On the write connection, which makes every commit.
        let (mode, sync): (String, i64) = store
            .write
            .run(|conn| {
                let mode = conn.query_row("PRAGMA journal_mode", [], |row| row.get(0))?;
                let sync = conn.query_row("PRAGMA synchronous", [], |row| row.get(0))?;
                Ok((mode, sync))
            })
            .await
            .expect("pragmas");
        assert_eq!(mode, "wal");
        // FULL is 2.
        assert_eq!(sync, 2);
        store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_stores_on_one_file_share_one_log() {
        // Two handles on one file stand in for two processes: each has its own write connection,
        // so they contend for SQLite's file lock and must wait for each other, not fail.
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tandem.db");
        let first = Arc::new(SqliteStore::open(&path).await.expect("open first"));
        let second = Arc::new(SqliteStore::open(&path).await.expect("open second"));

        let mut tasks = Vec::new();
        for store in [first.clone(), second.clone()] {
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for _ in 0..50 {
                    let batch = [append("shared", b"u"), append("shared", b"u")];
                    ids.extend(store.append(&batch).await.expect("append"));
                }
                ids
            }));
        }
        let mut ids = Vec::new();
        for task in tasks {
            ids.extend(task.await.expect("task"));
        }
        ids.sort_unstable();
        assert_eq!(ids, (1..=200).collect::<Vec<i64>>());
        first.close().await;
        second.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_stores_on_one_file_append_and_compact_one_room_without_loss() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tandem.db");
        let first: DynStore = Arc::new(SqliteStore::open(&path).await.expect("open first"));
        let second: DynStore = Arc::new(SqliteStore::open(&path).await.expect("open second"));
        crate::store::suite::two_nodes_racing_lose_and_duplicate_nothing(
            first.clone(),
            second.clone(),
        )
        .await;
        first.close().await;
        second.close().await;
    }

    #[tokio::test]
    async fn connect_accepts_an_in_memory_url() {
        let store = SqliteStore::connect("sqlite::memory:")
            .await
            .expect("connect");
        assert_eq!(
            store.append(&[append("a", b"1")]).await.expect("append"),
            vec![1]
        );
        let loaded = store.load(&room("a")).await.expect("load");
        assert_eq!(loaded.updates, vec![(1, Bytes::from_static(b"1"))]);
        store.close().await;
    }

    #[tokio::test]
    async fn connect_accepts_a_file_url() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("new/tandem.db").display());
        let store = SqliteStore::connect(&url).await.expect("connect");
        store.append(&[append("a", b"1")]).await.expect("append");
        store.close().await;
        let reopened = SqliteStore::open(&dir.path().join("new/tandem.db"))
            .await
            .expect("open");
        assert_eq!(
            reopened.load(&room("a")).await.expect("load").updates.len(),
            1
        );
        reopened.close().await;
    }

    /// A fold that panics: the compaction's caller dies while the write thread waits for it.
    struct PanickingFold;

    impl crate::store::Fold for PanickingFold {
        fn fold(&self, _: Option<&[u8]>, _: &[Bytes]) -> Result<crate::store::Folded, String> {
            panic!("the fold's caller dies here");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_compaction_whose_caller_dies_changes_nothing_and_the_store_carries_on() {
        let (store, _dir) = sqlite_store().await;
        store
            .append(&[keyed("a", keyed_update(1)), keyed("a", keyed_update(2))])
            .await
            .expect("append");
        let compacting = store.clone();
        let died =
            tokio::spawn(async move { compacting.compact(&room("a"), &PanickingFold).await })
                .await
                .expect_err("the compaction's task panicked");
        assert!(died.is_panic());
        // The write thread rolled the compaction back and released the write lock.
        let ids = store
            .append(&[keyed("a", keyed_update(3))])
            .await
            .expect("append after the dead compaction");
        assert_eq!(ids, [3]);
        let loaded = store.load(&room("a")).await.expect("load");
        assert_eq!(loaded.snapshot, None, "nothing was folded");
        assert_eq!(loaded.updates.len(), 3, "nothing was deleted");
        let compacted = store.compact(&room("a"), &YrsFold).await.expect("compact");
        assert_eq!(compacted.rows, 3);
        store.close().await;
    }

    #[tokio::test]
    async fn connect_rejects_other_schemes() {
        let err = SqliteStore::connect("postgres://localhost/tandem")
            .await
            .expect_err("not sqlite");
        assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    }
}
