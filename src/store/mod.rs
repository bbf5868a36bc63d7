//! Persistence: the [`Store`] trait and its implementations.
//!
//! Every implementation keeps the same three tables and the same semantics, checked by one test
//! suite (`store::suite`):
//!
//! - `updates` is an append-only log of encoded Yjs updates, the write path;
//! - `snapshots` holds, per room, one encoded document state: every update that compaction ever
//!   folded, and nothing else;
//! - loading a room is its snapshot plus every row still in its log;
//! - compaction folds the rows it reads into the snapshot and deletes exactly those rows, in one
//!   transaction under a per-room exclusive lock.
//!
//! Why compaction works on row ids and not on an id range: several nodes append to and compact the
//! same room, and on Postgres identity values are handed out before commit, so a row with a smaller
//! id can become visible after one with a larger id. Deleting `id <= upto_id` could then delete a
//! row the snapshot never saw; deleting exactly the folded ids cannot.
//!
//! Store implementations know nothing of rooms or CRDTs: they move bytes, and ask a [`Fold`]
//! (implemented by the document engine) to merge them.

pub mod batcher;
pub mod memory;
pub mod postgres;
pub mod sqlite;
mod sqlite_thread;
pub mod writer;

#[cfg(test)]
mod suite;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::ids::RoomId;
use batcher::{Batcher, HostedWriter};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The embedded SQLite database refused.
    #[error("sqlite error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The store was closed (or the thread serving its database is gone).
    #[error("the store is closed")]
    Closed,
    /// A bug: an operation panicked, or the database did not do what it was just told (a row
    /// count that cannot be). Nothing the operation did was kept.
    #[error("internal store error: {0}")]
    Internal(String),
    /// Migrations could not be applied.
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The store's files could not be created.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The [`Fold`] refused the stored snapshot or log rows; the compaction changed nothing.
    #[error("compaction fold failed: {0}")]
    Fold(String),
    /// The store configuration is not usable (e.g. an unknown URL scheme).
    #[error("invalid store configuration: {0}")]
    Config(String),
}

/// One update to append to a room's log.
#[derive(Debug, Clone)]
pub struct Append {
    /// The room the update belongs to.
    pub room: RoomId,
    /// The encoded update (Yjs v1 encoding).
    pub data: Bytes,
    /// Who produced it: the node id (later: the user). Free text, for audit and debugging.
    pub origin: Arc<str>,
}

/// A room's stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The largest log id ever folded into `state`. Informational: it does not say that every
    /// smaller id is contained (on Postgres a smaller id can commit later and still be in the log).
    pub upto_id: i64,
    /// The encoded document state (`encode_state_as_update_v1`).
    pub state: Bytes,
    /// The encoded state vector of `state`.
    pub state_vector: Bytes,
}

/// What a room's load returns: its snapshot, if any, and every row still in its log. The document
/// is the merge of both; no update is in both (compaction deletes exactly the rows it folded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredRoom {
    /// The latest snapshot, if the room was ever compacted.
    pub snapshot: Option<Snapshot>,
    /// `(id, data)` of every row in the room's log, in id order.
    pub updates: Vec<(i64, Bytes)>,
}

impl StoredRoom {
    /// Whether nothing at all is stored for the room.
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.updates.is_empty()
    }

    /// The largest id this load covers (snapshot or log), 0 if none.
    pub fn last_id(&self) -> i64 {
        let logged = self.updates.last().map_or(0, |(id, _)| *id);
        let folded = self.snapshot.as_ref().map_or(0, |s| s.upto_id);
        logged.max(folded)
    }
}

/// Merges a stored snapshot and log rows into one new snapshot (implemented by the doc engine;
/// the store never knows CRDTs).
///
/// Called by [`Store::compact`] inside its transaction, while the room's compaction lock is held:
/// it is synchronous CPU work and must not block on anything else.
pub trait Fold: Send + Sync {
    /// Merges `snapshot` (the stored state, if any) and `updates` (log rows, in id order) into one
    /// state. An `Err` aborts the compaction, which then changes nothing.
    fn fold(&self, snapshot: Option<&[u8]>, updates: &[Bytes]) -> Result<Folded, String>;
}

/// What a [`Fold`] produces: the new snapshot's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folded {
    /// The encoded document state, containing the old snapshot and every folded row.
    pub state: Bytes,
    /// The encoded state vector of `state`.
    pub state_vector: Bytes,
}

/// What one compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Log rows folded into the snapshot and deleted; 0 if the log was empty (nothing changed).
    pub rows: usize,
    /// The bytes of those rows' data.
    pub bytes: usize,
    /// The snapshot's `upto_id` afterwards (0 if the room has no snapshot).
    pub upto_id: i64,
}

/// Durable storage for room documents. Implementations must be safe to call from many tasks at
/// once; every method is one transaction.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Loads a room: its snapshot and every row of its log, as of one consistent point in time
    /// (a compaction committing meanwhile is seen entirely or not at all).
    async fn load(&self, room: &RoomId) -> Result<StoredRoom, StoreError>;

    /// Appends updates, possibly of many rooms, in one transaction, and returns the id given to
    /// each, in order. Ids grow with every append across the whole store. When this returns `Ok`,
    /// the updates are durable.
    async fn append(&self, batch: &[Append]) -> Result<Vec<i64>, StoreError>;

    /// Folds a room's log into its snapshot. In one transaction holding the room's exclusive
    /// compaction lock: reads the snapshot and every log row of the room, and, if there is at
    /// least one row, stores `fold`'s merge of them as the new snapshot and deletes exactly the
    /// rows it read. Rows appended meanwhile are neither folded nor deleted; concurrent
    /// compactions of one room (from any node) run one after the other.
    ///
    /// With an empty log, returns `Compacted { rows: 0, .. }` and changes nothing. If `fold`
    /// fails, returns [`StoreError::Fold`] and changes nothing.
    async fn compact(&self, room: &RoomId, fold: &dyn Fold) -> Result<Compacted, StoreError>;

    /// Every room that has anything stored, in name order.
    async fn rooms(&self) -> Result<Vec<RoomId>, StoreError>;

    /// Checks that the store answers (for readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Closes pools and files; called once at shutdown after the last write.
    async fn close(&self);

    /// Runs the group-commit loop on the thread this store appends on, if it has one, and says
    /// which thread that is; otherwise gives `batcher` back and a task runs the loop.
    fn host_writer(&self, batcher: Box<Batcher>) -> Result<HostedWriter, Box<Batcher>> {
        Err(batcher)
    }
}

/// A shared, type-erased store.
pub type DynStore = Arc<dyn Store>;

/// Runs `fold` over what a compaction read under its lock: the stored snapshot and the room's log
/// rows. Returns the snapshot to store and what the compaction folds, or `None` when there are no
/// rows (then the compaction changes nothing).
///
/// The new snapshot's `upto_id` is the largest id it contains: the largest folded id or the old
/// snapshot's, whichever is larger (on Postgres a late-committing row can have a smaller id).
pub(crate) fn fold_rows(
    fold: &dyn Fold,
    stored: Option<&Snapshot>,
    rows: &[(i64, Bytes)],
) -> Result<Option<(Snapshot, Compacted)>, StoreError> {
    let Some(newest) = rows.iter().map(|(id, _)| *id).max() else {
        return Ok(None);
    };
    let data: Vec<Bytes> = rows.iter().map(|(_, data)| data.clone()).collect();
    let folded =
        cpu_bound(|| fold.fold(stored.map(|s| &s.state[..]), &data)).map_err(StoreError::Fold)?;
    let upto_id = newest.max(stored.map_or(0, |s| s.upto_id));
    let compacted = Compacted {
        rows: rows.len(),
        bytes: data.iter().map(Bytes::len).sum(),
        upto_id,
    };
    let snapshot = Snapshot {
        upto_id,
        state: folded.state,
        state_vector: folded.state_vector,
    };
    Ok(Some((snapshot, compacted)))
}

/// What a compaction that found an empty log reports.
pub(crate) fn nothing_folded(stored: Option<&Snapshot>) -> Compacted {
    Compacted {
        upto_id: stored.map_or(0, |s| s.upto_id),
        ..Compacted::default()
    }
}

/// Runs CPU-heavy `f` without stalling the other tasks of a multi-threaded runtime (their worker
/// moves to another thread meanwhile); runs it inline anywhere else.
fn cpu_bound<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
