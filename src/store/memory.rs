//! `MemoryStore`: the in-process [`Store`], for unit tests and as a fallback when no database is
//! configured. Nothing survives the process.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    fold_rows, nothing_folded, Append, Compacted, Fold, Snapshot, Store, StoreError, StoredRoom,
};
use crate::ids::RoomId;

/// A [`Store`] that keeps everything in memory, with the same semantics as the SQL stores: one id
/// sequence for the whole store starting at 1, and compaction that folds and deletes exactly the
/// rows it read, atomically.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// Every operation is one short critical section, which makes each of them atomic exactly like
    /// a transaction. Never held across an `.await` (there is none inside).
    inner: Mutex<Inner>,
}

/// The store's state, behind [`MemoryStore::inner`].
#[derive(Debug, Default)]
struct Inner {
    /// The last id handed out; 0 before the first append.
    last_id: i64,
    /// Rooms with anything stored, by name (so `rooms()` is already in name order).
    rooms: BTreeMap<RoomId, RoomData>,
}

/// One room's snapshot and log.
#[derive(Debug, Default)]
struct RoomData {
    snapshot: Option<Snapshot>,
    /// `(id, data)` in id order: ids are handed out increasing and only ever pushed at the end.
    updates: Vec<(i64, Bytes)>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-updated in a way that matters
        // more than losing the whole store would, so keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn load(&self, room: &RoomId) -> Result<StoredRoom, StoreError> {
        let inner = self.lock();
        Ok(inner
            .rooms
            .get(room)
            .map(|data| StoredRoom {
                snapshot: data.snapshot.clone(),
                updates: data.updates.clone(),
            })
            .unwrap_or_default())
    }

    async fn append(&self, batch: &[Append]) -> Result<Vec<i64>, StoreError> {
        let mut inner = self.lock();
        let mut ids = Vec::with_capacity(batch.len());
        for append in batch {
            inner.last_id += 1;
            let id = inner.last_id;
            inner
                .rooms
                .entry(append.room.clone())
                .or_default()
                .updates
                .push((id, append.data.clone()));
            ids.push(id);
        }
        Ok(ids)
    }

    async fn compact(&self, room: &RoomId, fold: &dyn Fold) -> Result<Compacted, StoreError> {
        // The fold runs inside the critical section: that is what makes read, fold and delete one
        // atomic step, like the SQL stores' transaction under the room lock.
        let mut inner = self.lock();
        let Some(data) = inner.rooms.get_mut(room) else {
            return Ok(Compacted::default());
        };
        let Some((snapshot, compacted)) = fold_rows(fold, data.snapshot.as_ref(), &data.updates)?
        else {
            return Ok(nothing_folded(data.snapshot.as_ref()));
        };
        // Every row was read, so every row was folded.
        data.updates.clear();
        data.snapshot = Some(snapshot);
        Ok(compacted)
    }

    async fn rooms(&self) -> Result<Vec<RoomId>, StoreError> {
        Ok(self.lock().rooms.keys().cloned().collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn close(&self) {}
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::MemoryStore;
    use crate::store::DynStore;

    async fn memory_store() -> (DynStore, ()) {
        (Arc::new(MemoryStore::new()), ())
    }

    crate::store::suite::store_suite!(memory_store);
}
