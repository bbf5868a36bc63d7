//! `PostgresStore`: the production [`Store`], one database shared by every node of a cluster.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Row};

use super::{
    fold_rows, nothing_folded, Append, Compacted, Fold, Snapshot, Store, StoreError, StoredRoom,
};
use crate::ids::RoomId;

/// Most rows in one `INSERT … SELECT FROM UNNEST(…)`. The statement binds four arrays whatever
/// its size, so this only bounds how much one message carries.
const ROWS_PER_INSERT: usize = 1_000;

/// Most update bytes in one `INSERT`: far below Postgres' 1 GiB limit on one bound value (an
/// array of `bytea` is one value), whatever the size of single updates.
const BYTES_PER_INSERT: usize = 64 << 20;

/// How the pool connects and how long anything may wait.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Most connections this node opens. Every node has its own pool: the database's
    /// `max_connections` must cover all of them.
    pub max_connections: u32,
    /// How long an operation waits for a connection (also bounds the first connect).
    pub acquire_timeout: Duration,
    /// Server-side limit on one statement, waits for the compaction lock included.
    pub statement_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
        }
    }
}

/// A [`Store`] in a Postgres database, safe to share between nodes.
///
/// - Durability: `append` returns after `COMMIT`, with the server's `synchronous_commit`.
/// - Ids: one identity sequence; a batch reserves its ids first, so ids follow batch order.
/// - Loads read the snapshot and the log in one statement: one round trip, one point in time.
/// - Compaction takes a transaction-scoped advisory lock keyed by a 64-bit hash of the room name
///   (`pg_advisory_xact_lock(hashtextextended(room, 0))`, computed by the server, so every node
///   agrees whatever it runs), then folds and deletes exactly the rows it read. Appends take no
///   such lock: a row committing meanwhile is simply not folded.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    /// Shared by every operation; each operation is one transaction on one connection.
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to a `postgres://` or `postgresql://` URL with [`PostgresOptions::default`] and
    /// applies the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// Connects to `url` with `options` and applies the migrations (sqlx's migrator holds an
    /// advisory lock meanwhile, so nodes starting together apply them once).
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
            return Err(StoreError::Config(format!(
                "the Postgres store cannot open a {scheme:?} URL"
            )));
        }
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("bad Postgres URL: {e}")))?
            .application_name("tandem")
            .options([
                (
                    "statement_timeout",
                    format!("{}ms", options.statement_timeout.as_millis()),
                ),
                // A room's log is a queue: compaction deletes what it folded, and the dead rows
                // stay in the `(room, id)` index until vacuum. A bitmap scan (which the planner
                // picks on stale statistics) walks every dead entry on every load, 15 ms for
                // 260,000 of them; an index scan marks them dead as it passes, so that the next
                // load skips them (1.5 ms). Every query here reads one room by key.
                ("enable_bitmapscan", "off".to_string()),
            ]);
        // One direct connection first, so that a refused connection or a failed login says why:
        // the pool retries until its acquire timeout and then reports only that it timed out.
        let probe = tokio::time::timeout(
            options.acquire_timeout,
            PgConnection::connect_with(&connect),
        )
        .await
        .map_err(|_| StoreError::Database(sqlx::Error::PoolTimedOut))??;
        probe.close().await?;
        // No ping before each use (sqlx's default): it cost a round trip per group commit. A
        // connection that broke fails its statement, which the writer retries; sqlx pings every
        // connection when it is released and closes a broken one, so the retry gets a new one.
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .test_before_acquire(false)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Self { pool })
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn load(&self, room: &RoomId) -> Result<StoredRoom, StoreError> {
        // One statement, so no transaction: it sees one point in time by itself.
        let mut conn = self.pool.acquire().await?;
        let (snapshot, updates) = read_room(&mut conn, room).await?;
        Ok(StoredRoom { snapshot, updates })
    }

    async fn append(&self, batch: &[Append]) -> Result<Vec<i64>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        // Postgres promises neither the order of RETURNING rows nor that identity values follow
        // the order of an INSERT's input. So reserve the ids first, sort them, and insert each
        // row with its own: ids[i] names batch[i], and ids grow in batch order.
        let count = i64::try_from(batch.len()).unwrap_or(i64::MAX);
        let mut ids: Vec<i64> = sqlx::query_scalar(
            "SELECT nextval(pg_get_serial_sequence('updates', 'id')) FROM generate_series(1, $1)",
        )
        .bind(count)
        .fetch_all(&mut *tx)
        .await?;
        if ids.len() != batch.len() {
            return Err(protocol(format!(
                "reserved {} ids for {} rows",
                ids.len(),
                batch.len()
            )));
        }
        ids.sort_unstable();

        let mut start = 0;
        while start < batch.len() {
            let end = chunk_end(batch, start);
            let chunk = &batch[start..end];
            let inserted = sqlx::query(
                "INSERT INTO updates (id, room, data, origin) OVERRIDING SYSTEM VALUE \
                 SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::bytea[], $4::text[])",
            )
            .bind(&ids[start..end])
            .bind(chunk.iter().map(|a| a.room.as_str()).collect::<Vec<_>>())
            .bind(chunk.iter().map(|a| a.data.as_ref()).collect::<Vec<_>>())
            .bind(chunk.iter().map(|a| &*a.origin).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted != chunk.len() as u64 {
                return Err(protocol(format!(
                    "inserted {inserted} of {} rows",
                    chunk.len()
                )));
            }
            start = end;
        }

        // Sorted: concurrent appends lock existing `rooms` rows in the same order, so they
        // wait for each other instead of deadlocking. A room's `updated_at` moves only when the
        // second changes (as in the SQLite store): rewriting the row on every group commit left
        // a dead row version behind each time.
        let mut rooms: Vec<&str> = batch.iter().map(|a| a.room.as_str()).collect();
        rooms.sort_unstable();
        rooms.dedup();
        sqlx::query(
            "INSERT INTO rooms (room) SELECT * FROM UNNEST($1::text[]) \
             ON CONFLICT (room) DO UPDATE SET updated_at = excluded.updated_at \
             WHERE date_trunc('second', rooms.updated_at) < date_trunc('second', excluded.updated_at)",
        )
        .bind(rooms)
        .execute(&mut *tx)
        .await?;

        tx.commit().await?;
        Ok(ids)
    }

    async fn compact(&self, room: &RoomId, fold: &dyn Fold) -> Result<Compacted, StoreError> {
        // READ COMMITTED on purpose: every statement sees what committed before it started, so
        // the reads below, which run once the lock is ours, see the previous holder's compaction.
        // (REPEATABLE READ would keep the point in time of the lock statement, from before the
        // wait, and fold rows that are already gone.)
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(room.as_str())
            .execute(&mut *tx)
            .await?;
        let (stored, rows) = read_room(&mut tx, room).await?;
        let Some((snapshot, compacted)) = fold_rows(fold, stored.as_ref(), &rows)? else {
            tx.rollback().await?;
            return Ok(nothing_folded(stored.as_ref()));
        };
        sqlx::query(
            "INSERT INTO snapshots (room, upto_id, state, state_vector) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (room) DO UPDATE SET upto_id = excluded.upto_id, state = excluded.state, \
             state_vector = excluded.state_vector, updated_at = now()",
        )
        .bind(room.as_str())
        .bind(snapshot.upto_id)
        .bind(snapshot.state.as_ref())
        .bind(snapshot.state_vector.as_ref())
        .execute(&mut *tx)
        .await?;
        let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
        let deleted = sqlx::query("DELETE FROM updates WHERE room = $1 AND id = ANY($2::bigint[])")
            .bind(room.as_str())
            .bind(&ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted != ids.len() as u64 {
            // Only another compaction deletes rows, and it waits for our lock: refuse rather than
            // store a snapshot that disagrees with the log.
            return Err(protocol(format!(
                "compaction deleted {deleted} of {} folded rows",
                ids.len()
            )));
        }
        tx.commit().await?;
        Ok(compacted)
    }

    async fn rooms(&self) -> Result<Vec<RoomId>, StoreError> {
        // "C" compares bytes, the order of `RoomId`'s `Ord`, whatever the database's collation.
        let names: Vec<String> =
            sqlx::query_scalar(r#"SELECT room FROM rooms ORDER BY room COLLATE "C""#)
                .fetch_all(&self.pool)
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
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// Where the `INSERT` chunk starting at `start` ends: at most [`ROWS_PER_INSERT`] rows and
/// [`BYTES_PER_INSERT`] bytes, and at least one row.
fn chunk_end(batch: &[Append], start: usize) -> usize {
    let mut end = start;
    let mut bytes = 0;
    while end < batch.len() && end - start < ROWS_PER_INSERT {
        bytes += batch[end].data.len();
        if bytes > BYTES_PER_INSERT && end > start {
            break;
        }
        end += 1;
    }
    end
}

/// An answer from the database that contradicts what the statement must do.
fn protocol(message: String) -> StoreError {
    StoreError::Database(sqlx::Error::Protocol(message))
}

/// A room's snapshot and its whole log in one statement, so one round trip and one point in
/// time: a statement sees a single snapshot of the database at every isolation level, so no
/// compaction can commit between the two reads. Always one row: the snapshot's columns are null
/// when the room was never compacted. The log is an array, in id order (`ARRAY(subquery)` keeps the
/// subquery's order, and the `(room, id)` index delivers it unsorted), whose elements are each
/// row's id (8 bytes, big-endian: `int8send`) followed by its data.
const READ_ROOM: &str = "SELECT s.upto_id, s.state, s.state_vector, \
     ARRAY(SELECT int8send(u.id) || u.data FROM updates u WHERE u.room = $1 ORDER BY u.id) AS log \
     FROM (VALUES (1)) AS one (one) LEFT JOIN snapshots s ON s.room = $1";

/// Reads a room's snapshot and every row of its log, in id order, through `conn`.
async fn read_room(
    conn: &mut PgConnection,
    room: &RoomId,
) -> Result<(Option<Snapshot>, Vec<(i64, Bytes)>), StoreError> {
    let row = sqlx::query(READ_ROOM)
        .bind(room.as_str())
        .fetch_one(&mut *conn)
        .await?;
    let snapshot = match row.try_get::<Option<i64>, _>("upto_id")? {
        Some(upto_id) => Some(Snapshot {
            upto_id,
            state: Bytes::from(row.try_get::<Vec<u8>, _>("state")?),
            state_vector: Bytes::from(row.try_get::<Vec<u8>, _>("state_vector")?),
        }),
        None => None,
    };
    let updates = row
        .try_get::<Vec<Vec<u8>>, _>("log")?
        .into_iter()
        .map(split_log_row)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((snapshot, updates))
}

/// Splits one element of [`READ_ROOM`]'s log array into the row's id and its data, without
/// copying the data.
fn split_log_row(element: Vec<u8>) -> Result<(i64, Bytes), StoreError> {
    let Some(id) = element.first_chunk::<8>().map(|id| i64::from_be_bytes(*id)) else {
        return Err(protocol(format!(
            "a log element of {} bytes has no 8-byte id",
            element.len()
        )));
    };
    Ok((id, Bytes::from(element).slice(8..)))
}

#[cfg(test)]
mod tests {
    //! Against a real server: `TANDEM_TEST_POSTGRES_URL` (default below) names a database to
    //! connect to as a superuser (or a role with CREATEDB); every test creates a database of its
    //! own there and drops it at the end. An unreachable server fails the tests, loudly.

    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use sqlx::{Connection, Executor};

    use super::{chunk_end, PostgresOptions, PostgresStore, BYTES_PER_INSERT, ROWS_PER_INSERT};
    use crate::doc::YrsFold;
    use crate::ids::RoomId;
    use crate::store::suite::{assert_holds_exactly, keyed_update};
    use crate::store::{Append, Compacted, DynStore, Store, StoreError};

    const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

    /// A small pool per test: tests run in parallel, and the server's `max_connections`
    /// (100 by default) must cover all of them. Still several connections, so operations of one
    /// test do run concurrently.
    fn test_options() -> PostgresOptions {
        PostgresOptions {
            max_connections: 4,
            ..PostgresOptions::default()
        }
    }

    fn admin_url() -> String {
        std::env::var("TANDEM_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
    }

    /// `url` with its database name replaced by `database`.
    fn with_database(url: &str, database: &str) -> String {
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (url, String::new()),
        };
        let authority = base.find("://").map_or(0, |i| i + 3);
        let base = match base[authority..].find('/') {
            Some(slash) => &base[..authority + slash],
            None => base,
        };
        format!("{base}/{database}{query}")
    }

    /// A fresh database for one test; dropped, with any connection left to it, when this is.
    struct TestDatabase {
        admin_url: String,
        name: String,
        url: String,
    }

    impl TestDatabase {
        async fn create() -> Self {
            let admin_url = admin_url();
            let mut admin = tokio::time::timeout(
                Duration::from_secs(10),
                sqlx::PgConnection::connect(&admin_url),
            )
            .await
            .map_err(|_| "timed out after 10 s".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .unwrap_or_else(|e| {
                panic!(
                    "the Postgres store tests need a Postgres server: cannot connect to \
                     {admin_url}: {e}\nStart one (scripts/test.sh does), or point \
                     TANDEM_TEST_POSTGRES_URL at one."
                )
            });
            let name = format!("tandem_test_{:016x}", rand::random::<u64>());
            admin
                .execute(format!("CREATE DATABASE {name}").as_str())
                .await
                .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
            let _ = admin.close().await;
            let url = with_database(&admin_url, &name);
            Self {
                admin_url,
                name,
                url,
            }
        }
    }

    impl Drop for TestDatabase {
        fn drop(&mut self) {
            // Drop cannot await, and blocking the test's runtime on a future would panic: drop the
            // database from a thread and a runtime of our own.
            let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
            let dropped = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(async {
                    let mut admin = sqlx::PgConnection::connect(&admin_url)
                        .await
                        .map_err(|e| e.to_string())?;
                    admin
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await
                        .map_err(|e| e.to_string())?;
                    let _ = admin.close().await;
                    Ok::<(), String>(())
                })
            })
            .join();
            if !matches!(dropped, Ok(Ok(()))) {
                // Not a panic: this may run while a failed test unwinds.
                eprintln!(
                    "warning: test database {} was not dropped: {dropped:?}",
                    self.name
                );
            }
        }
    }

    async fn postgres_store() -> (DynStore, TestDatabase) {
        let db = TestDatabase::create().await;
        let store = PostgresStore::connect_with(&db.url, test_options())
            .await
            .expect("connect to the test database");
        (Arc::new(store), db)
    }

    crate::store::suite::store_suite!(postgres_store);

    #[tokio::test]
    async fn a_rooms_updated_at_moves_once_a_second_and_never_back() {
        let db = TestDatabase::create().await;
        let store = PostgresStore::connect_with(&db.url, test_options())
            .await
            .expect("connect to the test database");
        store.append(&[keyed("a", 1)]).await.expect("append");
        let row = |sql: &'static str| {
            let pool = store.pool.clone();
            async move {
                sqlx::query_as::<_, (String, String)>(sql)
                    .fetch_one(&pool)
                    .await
                    .expect("read the room")
            }
        };
        let version_and_stamp = "SELECT xmin::text, updated_at::text FROM rooms WHERE room = 'a'";

        // Ahead of this append's second: the append leaves the row as it is, no new version.
        sqlx::query("UPDATE rooms SET updated_at = now() + interval '1 hour' WHERE room = 'a'")
            .execute(&store.pool)
            .await
            .expect("move updated_at ahead");
        let ahead = row(version_and_stamp).await;
        store.append(&[keyed("a", 2)]).await.expect("append");
        assert_eq!(row(version_and_stamp).await, ahead);

        // Behind it: the append moves it to its own time.
        sqlx::query("UPDATE rooms SET updated_at = '2000-01-01T00:00:00Z' WHERE room = 'a'")
            .execute(&store.pool)
            .await
            .expect("move updated_at back");
        store.append(&[keyed("a", 3)]).await.expect("append");
        let (recent, _) = row(
            "SELECT (updated_at > now() - interval '1 minute')::text, '' FROM rooms WHERE room = 'a'",
        )
        .await;
        assert_eq!(recent, "true");
        store.close().await;
    }

    fn room(name: &str) -> RoomId {
        RoomId::new(name).expect("valid room name")
    }

    fn keyed(room_name: &str, client: u64) -> Append {
        Append {
            room: room(room_name),
            data: keyed_update(client),
            origin: Arc::from("test-node"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_append_and_compact_one_room_without_loss_or_duplication() {
        let db = TestDatabase::create().await;
        let first: DynStore = Arc::new(
            PostgresStore::connect_with(&db.url, test_options())
                .await
                .expect("connect first node"),
        );
        let second: DynStore = Arc::new(
            PostgresStore::connect_with(&db.url, test_options())
                .await
                .expect("connect second node"),
        );
        crate::store::suite::two_nodes_racing_lose_and_duplicate_nothing(
            first.clone(),
            second.clone(),
        )
        .await;
        first.close().await;
        second.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_committing_after_a_compaction_with_a_smaller_id_is_kept_and_folded_later() {
        let db = TestDatabase::create().await;
        let store = PostgresStore::connect_with(&db.url, test_options())
            .await
            .expect("connect");

        // Another node's append: its id is handed out now, but it commits only later.
        let mut late = store.pool.begin().await.expect("begin");
        let late_id: i64 = sqlx::query_scalar(
            "INSERT INTO updates (room, data, origin) VALUES ($1, $2, 'other-node') RETURNING id",
        )
        .bind("doc")
        .bind(keyed_update(1).as_ref())
        .fetch_one(&mut *late)
        .await
        .expect("insert");
        let ids = store.append(&[keyed("doc", 2)]).await.expect("append");
        assert!(ids[0] > late_id);

        let compacted = store
            .compact(&room("doc"), &YrsFold)
            .await
            .expect("compact");
        assert_eq!(
            compacted,
            Compacted {
                rows: 1,
                bytes: keyed_update(2).len(),
                upto_id: ids[0]
            },
            "the uncommitted row is not folded"
        );
        late.commit().await.expect("commit");

        // The late row has an id below upto_id and is still loaded (no `id > upto_id` filter).
        let loaded = store.load(&room("doc")).await.expect("load");
        assert_eq!(loaded.snapshot.as_ref().map(|s| s.upto_id), Some(ids[0]));
        assert_eq!(loaded.updates, vec![(late_id, keyed_update(1))]);
        assert_holds_exactly(&loaded, &[1, 2].into());

        // The next compaction folds it; upto_id stays the largest id folded so far.
        let compacted = store
            .compact(&room("doc"), &YrsFold)
            .await
            .expect("compact");
        assert_eq!((compacted.rows, compacted.upto_id), (1, ids[0]));
        let loaded = store.load(&room("doc")).await.expect("load");
        assert!(loaded.updates.is_empty());
        assert_holds_exactly(&loaded, &[1, 2].into());
        store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_compaction_waits_for_the_room_lock_and_then_sees_the_previous_one() {
        let db = TestDatabase::create().await;
        let store = Arc::new(
            PostgresStore::connect_with(&db.url, test_options())
                .await
                .expect("connect"),
        );
        store
            .append(&[keyed("doc", 1), keyed("doc", 2)])
            .await
            .expect("append");

        // Hold the room's lock as a compaction on another node would.
        let mut holder = store.pool.begin().await.expect("begin");
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind("doc")
            .execute(&mut *holder)
            .await
            .expect("lock");
        let waiting = {
            let store = store.clone();
            tokio::spawn(async move { store.compact(&room("doc"), &YrsFold).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "the compaction must wait for the lock"
        );
        // Meanwhile the holder folds everything (its own compaction, done by hand).
        let other = store.compact(&room("other"), &YrsFold).await;
        assert_eq!(other.expect("other rooms are not blocked").rows, 0);
        sqlx::query("DELETE FROM updates WHERE room = 'doc'")
            .execute(&mut *holder)
            .await
            .expect("delete");
        holder.commit().await.expect("commit");

        let compacted = waiting.await.expect("task").expect("compact");
        assert_eq!(
            compacted.rows, 0,
            "it read the log after the holder's commit"
        );
        store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_starting_together_apply_the_migrations_once() {
        let db = TestDatabase::create().await;
        let connects: Vec<_> = (0..4)
            .map(|_| {
                let url = db.url.clone();
                tokio::spawn(async move { PostgresStore::connect_with(&url, test_options()).await })
            })
            .collect();
        let mut stores = Vec::new();
        for connect in connects {
            stores.push(connect.await.expect("task").expect("connect"));
        }
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
            .fetch_one(&stores[0].pool)
            .await
            .expect("count migrations");
        let migrations = sqlx::migrate!("./migrations/postgres").migrations.len();
        assert_eq!(applied as usize, migrations);
        for store in stores {
            store.close().await;
        }
    }

    /// A large snapshot is stored compressed with lz4, which decompresses on every cold load
    /// several times faster than Postgres's default, wherever the server offers it.
    #[tokio::test]
    async fn snapshots_are_compressed_with_lz4_where_the_server_has_it() {
        let db = TestDatabase::create().await;
        let store = PostgresStore::connect_with(&db.url, test_options())
            .await
            .expect("connect");
        let appends: Vec<Append> = (0..2_000).map(|client| keyed("doc", client)).collect();
        store.append(&appends).await.expect("append");
        store
            .compact(&room("doc"), &YrsFold)
            .await
            .expect("compact");
        let (size, stored, compression): (i32, i32, Option<String>) = sqlx::query_as(
            "SELECT length(state), pg_column_size(state), pg_column_compression(state) \
             FROM snapshots WHERE room = 'doc'",
        )
        .fetch_one(&store.pool)
        .await
        .expect("snapshot");
        let offered: bool = sqlx::query_scalar(
            "SELECT 'lz4' = ANY (enumvals) FROM pg_settings WHERE name = 'default_toast_compression'",
        )
        .fetch_one(&store.pool)
        .await
        .expect("settings");
        let default: String = sqlx::query_scalar("SHOW default_toast_compression")
            .fetch_one(&store.pool)
            .await
            .expect("default");
        let want = if offered { "lz4" } else { default.as_str() };
        assert_eq!(
            compression.as_deref(),
            Some(want),
            "a {size}-byte snapshot stored in {stored} bytes"
        );
        assert_eq!(
            store
                .load(&room("doc"))
                .await
                .expect("load")
                .snapshot
                .map(|s| s.state.len()),
            Some(size as usize)
        );
        store.close().await;
    }

    #[tokio::test]
    async fn connect_rejects_other_schemes() {
        for url in [
            "sqlite://tandem.db",
            "mysql://localhost/tandem",
            "localhost",
        ] {
            let err = PostgresStore::connect(url).await.expect_err("not postgres");
            assert!(matches!(err, StoreError::Config(_)), "{url}: {err:?}");
        }
    }

    #[tokio::test]
    async fn connect_fails_within_the_acquire_timeout_when_nothing_listens() {
        // Port 1 on loopback: nothing listens there.
        let started = Instant::now();
        let options = PostgresOptions {
            acquire_timeout: Duration::from_secs(2),
            ..test_options()
        };
        let err = PostgresStore::connect_with("postgres://postgres@127.0.0.1:1/postgres", options)
            .await
            .expect_err("nothing listens");
        assert!(matches!(err, StoreError::Database(_)), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn test_urls_name_the_test_database() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database("postgresql://u:p@h/db?sslmode=disable", "t1"),
            "postgresql://u:p@h/t1?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:5432", "t1"),
            "postgres://h:5432/t1"
        );
    }

    #[test]
    fn insert_chunks_are_bounded_by_rows_and_bytes() {
        let small = |n: usize| -> Vec<Append> {
            (0..n)
                .map(|_| Append {
                    room: room("r"),
                    data: Bytes::from_static(b"x"),
                    origin: Arc::from("t"),
                })
                .collect()
        };
        let batch = small(ROWS_PER_INSERT * 2 + 1);
        assert_eq!(chunk_end(&batch, 0), ROWS_PER_INSERT);
        assert_eq!(chunk_end(&batch, ROWS_PER_INSERT * 2), batch.len());

        let big = Bytes::from(vec![0u8; BYTES_PER_INSERT / 2 + 1]);
        let batch: Vec<Append> = (0..3)
            .map(|_| Append {
                room: room("r"),
                data: big.clone(),
                origin: Arc::from("t"),
            })
            .collect();
        assert_eq!(chunk_end(&batch, 0), 1, "two halves and a byte do not fit");
        // A single update larger than the limit still goes, alone.
        let huge = [Append {
            room: room("r"),
            data: Bytes::from(vec![0u8; BYTES_PER_INSERT + 1]),
            origin: Arc::from("t"),
        }];
        assert_eq!(chunk_end(&huge, 0), 1);
    }

    /// A room's log after many compactions is mostly dead rows that only vacuum removes. Loads
    /// and compactions must read it with the `(room, id)` index scan, which marks dead entries as
    /// it passes, and never with a bitmap scan, which walks all of them every time; the planner
    /// picks the latter on the statistics such a log has before autovacuum comes by (its default
    /// guess for a table it never analyzed).
    #[tokio::test]
    async fn a_compacted_log_is_read_by_index_scan_even_on_stale_statistics() {
        let db = TestDatabase::create().await;
        let store = PostgresStore::connect_with(&db.url, test_options())
            .await
            .expect("connect");
        // A fresh table that autovacuum has not analyzed yet, as on a new deployment.
        let folded_away: Vec<Append> = (0..5_000).map(|client| keyed("doc", client)).collect();
        store.append(&folded_away).await.expect("append");
        let compacted = store
            .compact(&room("doc"), &YrsFold)
            .await
            .expect("compact");
        assert_eq!(compacted.rows, folded_away.len());

        let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {}", super::READ_ROOM))
            .bind("doc")
            .fetch_all(&store.pool)
            .await
            .expect("explain");
        let plan = plan.join("\n");
        assert!(
            plan.contains("Index Scan using updates_room_id")
                && !plan.contains("Bitmap")
                && !plan.contains("Sort"),
            "the log query's plan:\n{plan}"
        );
        assert!(store
            .load(&room("doc"))
            .await
            .expect("load")
            .updates
            .is_empty());
    }
}
