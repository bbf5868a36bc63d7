//! `SqliteStore`: the embedded [`Store`], one SQLite file under the data dir (WAL, fully synced).

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Row, Sqlite};

use super::held::HeldConnection;
use super::{
    fold_rows, nothing_folded, Append, Compacted, Fold, Snapshot, Store, StoreError, StoredRoom,
};
use crate::ids::RoomId;

/// How long a statement waits for another process's write lock before failing with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Read connections. WAL readers never block the writer nor each other, so a few let loads of
/// different rooms proceed while a batch commits.
const READ_CONNECTIONS: u32 = 4;

/// Rows per multi-row `INSERT`. Each row binds 4 parameters, so a statement binds at most 960:
/// under SQLite's bound-parameter limit even on builds that keep the pre-3.32 limit of 999 (the
/// bundled SQLite allows 32,766). Larger statements would save little: the commit's fsync
/// dominates.
const ROWS_PER_INSERT: usize = 240;

/// Row ids per `DELETE … IN (…)` of a compaction (1 parameter each, plus the room).
const IDS_PER_DELETE: usize = 900;

/// `BEGIN IMMEDIATE` takes the write lock up front, so a write transaction that reads first
/// (compaction) can never fail on a lock upgrade, and waits `busy_timeout` for another process
/// instead of failing at once. It is also compaction's per-room exclusive lock: SQLite's one write
/// lock covers every room, in this process and any other on the same file.
const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// A [`Store`] in one SQLite database file.
///
/// Durability: WAL journal with `synchronous = FULL`, so a commit is on disk before `append`
/// returns. Ids come from an `AUTOINCREMENT` key: one sequence for the whole store, never reused.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// One connection. SQLite admits one writer at a time; funnelling this process's writes
    /// through a single connection queues them on its lock instead of having several connections
    /// contend for the file lock (busy waits, `SQLITE_BUSY`), and the group-commit writer already
    /// turns many small appends into one transaction.
    write: Arc<HeldConnection>,
    /// Connections for `load`, `rooms` and `ping`. `None` for an in-memory database, whose data
    /// lives only in its one connection: everything goes through `write`.
    read: Option<SqlitePool>,
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
        if !in_memory {
            if let Some(parent) = options.get_filename().parent() {
                if !parent.as_os_str().is_empty() {
                    tokio::fs::create_dir_all(parent).await?;
                }
            }
        }
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT);
        // One connection, kept for the life of the process, and opened again if it breaks (the
        // writer retries meanwhile).
        let write = HeldConnection::open(options.clone(), !in_memory).await?;
        {
            let mut conn = write.lock().await?;
            let migrated = sqlx::migrate!("./migrations/sqlite")
                .run(&mut *conn)
                .await
                .map_err(StoreError::from);
            conn.check(migrated)?;
        }
        let read = if in_memory {
            None
        } else {
            // All of them open from the start and kept: a node's open files do not grow with its
            // first loads (the soak scenario checks that they return to where they started).
            SqlitePoolOptions::new()
                .max_connections(READ_CONNECTIONS)
                .min_connections(READ_CONNECTIONS)
                .idle_timeout(None)
                .connect_with(options)
                .await
                .map(Some)?
        };
        Ok(Self {
            write: Arc::new(write),
            read,
        })
    }
}

impl SqliteStore {
    /// Runs `op` on a read connection, or on the write connection for an in-memory database.
    async fn reading<T>(
        &self,
        op: impl for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match &self.read {
            Some(pool) => op(&mut *pool.acquire().await?).await,
            None => {
                let mut conn = self.write.lock().await?;
                let result = op(&mut conn).await;
                conn.check(result)
            }
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn load(&self, room: &RoomId) -> Result<StoredRoom, StoreError> {
        let room = room.clone();
        let (snapshot, updates) = self
            .reading(move |conn| Box::pin(async move { load_in(conn, &room).await }))
            .await?;
        Ok(StoredRoom { snapshot, updates })
    }

    async fn append(&self, batch: &[Append]) -> Result<Vec<i64>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.write.lock().await?;
        let appended = if batch.len() <= ROWS_PER_INSERT {
            // One statement, atomic on its own (SQLite runs it in a transaction of its own, and
            // a trigger marks the rooms in it): one round trip to the database's thread instead
            // of four (begin, insert, mark the rooms, commit).
            insert_rows(&mut conn, batch).await
        } else {
            append_in_chunks(&mut conn, batch).await
        };
        conn.check(appended)
    }

    async fn compact(&self, room: &RoomId, fold: &dyn Fold) -> Result<Compacted, StoreError> {
        let mut conn = self.write.lock().await?;
        let compacted = compact_in(&mut conn, room, fold).await;
        conn.check(compacted)
    }

    async fn rooms(&self) -> Result<Vec<RoomId>, StoreError> {
        // BINARY collation compares UTF-8 bytes, the same order as `RoomId`'s `Ord`.
        let names: Vec<String> = self
            .reading(|conn| {
                Box::pin(async move {
                    Ok(sqlx::query_scalar("SELECT room FROM rooms ORDER BY room")
                        .fetch_all(conn)
                        .await?)
                })
            })
            .await?;
        names
            .iter()
            .map(|name| {
                RoomId::new(name)
                    .map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))
            })
            .collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.reading(|conn| {
            Box::pin(async move {
                sqlx::query("SELECT 1").execute(conn).await?;
                Ok(())
            })
        })
        .await
    }

    async fn close(&self) {
        if let Some(pool) = &self.read {
            pool.close().await;
        }
        self.write.close().await;
    }
}

/// One read transaction: both SELECTs see the same WAL snapshot, so a compaction committing in
/// between cannot make us pair an old snapshot with an already-pruned log.
async fn load_in(conn: &mut SqliteConnection, room: &RoomId) -> Result<Loaded, StoreError> {
    let mut tx = conn.begin().await?;
    let loaded = read_room(&mut tx, room).await?;
    tx.commit().await?;
    Ok(loaded)
}

/// Appends a batch larger than one statement takes, in one transaction.
async fn append_in_chunks(
    conn: &mut SqliteConnection,
    batch: &[Append],
) -> Result<Vec<i64>, StoreError> {
    let mut tx = conn.begin_with(BEGIN_WRITE).await?;
    let mut ids = Vec::with_capacity(batch.len());
    for chunk in batch.chunks(ROWS_PER_INSERT) {
        ids.extend(insert_rows(&mut tx, chunk).await?);
    }
    tx.commit().await?;
    Ok(ids)
}

/// Folds `room`'s log into its snapshot through `conn`: see [`Store::compact`].
async fn compact_in(
    conn: &mut SqliteConnection,
    room: &RoomId,
    fold: &dyn Fold,
) -> Result<Compacted, StoreError> {
    // The write lock, held from the first read to the commit: no other compaction, in this
    // process or another, can fold or delete these rows meanwhile, and no append can slip a
    // row in between the read and the delete (deleting by id would be safe even if it could).
    let mut tx = conn.begin_with(BEGIN_WRITE).await?;
    let (stored, rows) = read_room(&mut tx, room).await?;
    let Some((snapshot, compacted)) = fold_rows(fold, stored.as_ref(), &rows)? else {
        tx.rollback().await?;
        return Ok(nothing_folded(stored.as_ref()));
    };
    sqlx::query(
        "INSERT INTO snapshots (room, upto_id, state, state_vector) VALUES (?, ?, ?, ?) \
         ON CONFLICT (room) DO UPDATE SET upto_id = excluded.upto_id, state = excluded.state, \
         state_vector = excluded.state_vector, updated_at = excluded.updated_at",
    )
    .bind(room.as_str())
    .bind(snapshot.upto_id)
    .bind(snapshot.state.as_ref())
    .bind(snapshot.state_vector.as_ref())
    .execute(&mut *tx)
    .await?;
    // Exactly the rows read, by id (chunked under the bound-parameter limit).
    let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
    for chunk in ids.chunks(IDS_PER_DELETE) {
        let mut delete = QueryBuilder::<Sqlite>::new("DELETE FROM updates WHERE room = ");
        delete.push_bind(room.as_str()).push(" AND id IN (");
        let mut list = delete.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        list.push_unseparated(")");
        let deleted = delete.build().execute(&mut *tx).await?.rows_affected();
        if deleted != chunk.len() as u64 {
            // Impossible while we hold the write lock; refuse rather than store a snapshot
            // that disagrees with the log.
            return Err(StoreError::Database(sqlx::Error::Protocol(format!(
                "compaction deleted {deleted} of {} folded rows",
                chunk.len()
            ))));
        }
    }
    tx.commit().await?;
    Ok(compacted)
}

/// A room's snapshot and log as read by [`read_room`].
type Loaded = (Option<Snapshot>, Vec<(i64, Bytes)>);

/// Reads a room's snapshot and every row of its log, in id order, inside `tx`.
async fn read_room(tx: &mut SqliteConnection, room: &RoomId) -> Result<Loaded, StoreError> {
    let snapshot = sqlx::query("SELECT upto_id, state, state_vector FROM snapshots WHERE room = ?")
        .bind(room.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| -> Result<Snapshot, sqlx::Error> {
            Ok(Snapshot {
                upto_id: row.try_get("upto_id")?,
                state: Bytes::from(row.try_get::<Vec<u8>, _>("state")?),
                state_vector: Bytes::from(row.try_get::<Vec<u8>, _>("state_vector")?),
            })
        })
        .transpose()?;
    let updates = sqlx::query("SELECT id, data FROM updates WHERE room = ? ORDER BY id")
        .bind(room.as_str())
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|row| {
            Ok((
                row.try_get("id")?,
                Bytes::from(row.try_get::<Vec<u8>, _>("data")?),
            ))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok((snapshot, updates))
}

/// Inserts `rows` (at most [`ROWS_PER_INSERT`]) in one statement and returns their ids in order.
/// The `updates_touch_room` trigger registers each row's room, with the row's `created_at`.
async fn insert_rows(conn: &mut SqliteConnection, rows: &[Append]) -> Result<Vec<i64>, StoreError> {
    // The schema's default, `strftime('%Y-%m-%dT%H:%M:%fZ', 'now')`, in the same format, formatted
    // once per statement here: SQLite's formatting of the milliseconds cost more than the rest of
    // a one-row insert (docs/benchmarks.md, session 11).
    let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    if let [append] = rows {
        // The usual group commit at a low rate. No RETURNING: SQLite collects RETURNING rows in
        // an ephemeral table, opened and closed with its own pager for each statement, which
        // cost about a quarter of a one-row append's instructions. The connection's last rowid
        // is this row's (a trigger's inserts do not change it once the trigger ends).
        let done =
            sqlx::query("INSERT INTO updates (room, data, origin, created_at) VALUES (?, ?, ?, ?)")
                .bind(append.room.as_str())
                .bind(append.data.as_ref())
                .bind(&*append.origin)
                .bind(now.as_str())
                .execute(&mut *conn)
                .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Database(sqlx::Error::Protocol(format!(
                "inserted {} rows instead of 1",
                done.rows_affected()
            ))));
        }
        return Ok(vec![done.last_insert_rowid()]);
    }
    let mut insert =
        QueryBuilder::<Sqlite>::new("INSERT INTO updates (room, data, origin, created_at) ");
    insert.push_values(rows, |mut row, append| {
        row.push_bind(append.room.as_str())
            .push_bind(append.data.as_ref())
            .push_bind(&*append.origin)
            .push_bind(now.as_str());
    });
    insert.push(" RETURNING id");
    // SQLite does not promise RETURNING rows in insertion order, but it inserts the VALUES rows in
    // order and AUTOINCREMENT ids only grow, so sorted ids are the rows' ids.
    let mut ids = insert
        .build()
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|row| row.try_get::<i64, _>(0))
        .collect::<Result<Vec<_>, _>>()?;
    if ids.len() != rows.len() {
        return Err(StoreError::Database(sqlx::Error::Protocol(format!(
            "inserted {} rows but got {} ids back",
            rows.len(),
            ids.len()
        ))));
    }
    ids.sort_unstable();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use tempfile::TempDir;

    use super::SqliteStore;
    use crate::doc::YrsFold;
    use crate::ids::RoomId;
    use crate::store::suite::{assert_holds_exactly, keyed_update};
    use crate::store::{Append, DynStore, Store, StoreError};

    async fn sqlite_store() -> (DynStore, TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("tandem.db"))
            .await
            .expect("open store");
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
            let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
                .fetch_one(&mut *store.write.lock().await.expect("lock"))
                .await
                .expect("count migrations");
            let embedded = sqlx::migrate!("./migrations/sqlite").migrations.len();
            assert_eq!(applied as usize, embedded);
            store.close().await;
        }
        let store = SqliteStore::open(&path).await.expect("open");
        assert_eq!(store.load(&room("a")).await.expect("load").updates.len(), 3);
        store.close().await;
    }

    #[tokio::test]
    async fn appends_stamp_rows_and_new_rooms_in_the_schemas_format() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("tandem.db"))
            .await
            .expect("open");
        store.append(&[append("a", b"1")]).await.expect("append");
        let (created, shaped, recent, room_created, room_updated): (String, bool, bool, String, String) =
            sqlx::query_as(
                "SELECT u.created_at, \
                 u.created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z', \
                 abs(julianday(u.created_at) - julianday('now')) < 1.0 / 1440, \
                 r.created_at, r.updated_at \
                 FROM updates u JOIN rooms r ON r.room = u.room",
            )
            .fetch_one(&mut *store.write.lock().await.expect("lock"))
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
        // Three log rows and one room, then a new room: the trigger inserts `rooms` row 2
        // inside the append of `updates` row 4.
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

    #[tokio::test]
    async fn a_rooms_updated_at_moves_once_a_second_and_never_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("tandem.db"))
            .await
            .expect("open");
        let mut stamps = Vec::new();
        for at in [
            "2030-01-01T00:00:00.100Z",
            "2030-01-01T00:00:00.900Z",
            "2030-01-01T00:00:01.000Z",
            "2029-12-31T23:59:59.999Z",
        ] {
            sqlx::query(
                "INSERT INTO updates (room, data, origin, created_at) VALUES ('r', x'00', 'test', ?)",
            )
            .bind(at)
            .execute(&mut *store.write.lock().await.expect("lock"))
            .await
            .expect("insert");
            let stamp: (String, String) =
                sqlx::query_as("SELECT created_at, updated_at FROM rooms WHERE room = 'r'")
                    .fetch_one(&mut *store.write.lock().await.expect("lock"))
                    .await
                    .expect("read the room");
            stamps.push(stamp);
        }
        let first = "2030-01-01T00:00:00.100Z".to_owned();
        let next_second = "2030-01-01T00:00:01.000Z".to_owned();
        assert_eq!(
            stamps,
            [
                (first.clone(), first.clone()),
                (first.clone(), first.clone()),
                (first.clone(), next_second.clone()),
                (first, next_second),
            ]
        );
        store.close().await;
    }

    #[tokio::test]
    async fn opens_in_wal_mode_with_full_sync() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("tandem.db"))
            .await
            .expect("open");
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut *store.write.lock().await.expect("lock"))
            .await
            .expect("journal_mode");
        assert_eq!(mode, "wal");
        // FULL is 2.
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *store.write.lock().await.expect("lock"))
            .await
            .expect("synchronous");
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

    #[tokio::test]
    async fn connect_rejects_other_schemes() {
        let err = SqliteStore::connect("postgres://localhost/tandem")
            .await
            .expect_err("not sqlite");
        assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    }
}
