//! `HeldConnection`: one SQLite connection kept for the life of a store, instead of in a pool.

use std::ops::{Deref, DerefMut};

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::Connection;
use tokio::sync::{Mutex, MutexGuard};

use super::StoreError;

/// One SQLite connection, handed from one user to the next behind an async lock.
///
/// A pool pings a connection (a round trip to its SQLite thread, and a task to run it) every time
/// the connection returns to it: once per group commit for the store's one write connection,
/// which no one else could use meanwhile. Held, it goes back without that.
///
/// A pool also replaces a connection whose thread is gone; this does the same: after an
/// operation fails with [`sqlx::Error::WorkerCrashed`], the next [`lock`](Self::lock) opens a new
/// connection. Except for an in-memory database, whose data would not survive that: its
/// connection keeps reporting the error. Once [closed](Self::close), it refuses every use, as a
/// closed pool does.
#[derive(Debug)]
pub(crate) struct HeldConnection {
    options: SqliteConnectOptions,
    reopen: bool,
    conn: Mutex<Slot>,
}

/// What the lock guards.
#[derive(Debug)]
enum Slot {
    Open(SqliteConnection),
    /// The last use found the connection's thread gone: the next use opens a new one.
    Broken,
    Closed,
}

/// The held connection, locked for one user: dereferences to the connection.
pub(crate) struct Held<'a> {
    guard: MutexGuard<'a, Slot>,
    reopen: bool,
}

impl HeldConnection {
    /// Opens the connection. `reopen`: whether a broken connection may be replaced by a new one
    /// (not for an in-memory database).
    pub(crate) async fn open(
        options: SqliteConnectOptions,
        reopen: bool,
    ) -> Result<Self, StoreError> {
        let conn = SqliteConnection::connect_with(&options).await?;
        Ok(Self {
            options,
            reopen,
            conn: Mutex::new(Slot::Open(conn)),
        })
    }

    /// Waits for the connection, opening it again first if the last use found it broken.
    /// Fails with [`sqlx::Error::PoolClosed`] once the connection is closed.
    pub(crate) async fn lock(&self) -> Result<Held<'_>, StoreError> {
        let mut guard = self.conn.lock().await;
        match *guard {
            Slot::Closed => return Err(StoreError::Database(sqlx::Error::PoolClosed)),
            Slot::Broken => {
                *guard = Slot::Open(SqliteConnection::connect_with(&self.options).await?);
                tracing::warn!("the SQLite connection was broken; opened a new one");
            }
            Slot::Open(_) => {}
        }
        Ok(Held {
            guard,
            reopen: self.reopen,
        })
    }

    /// Closes the connection once its current user is done; later uses fail.
    pub(crate) async fn close(&self) {
        let mut guard = self.conn.lock().await;
        if let Slot::Open(conn) = std::mem::replace(&mut *guard, Slot::Closed) {
            let _ = conn.close().await;
        }
    }
}

impl Held<'_> {
    /// Passes `result` through, and lets the connection go when it says that the connection's
    /// thread is gone, so that the next user gets a new one.
    pub(crate) fn check<T>(mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if self.reopen
            && matches!(
                result,
                Err(StoreError::Database(sqlx::Error::WorkerCrashed))
            )
        {
            *self.guard = Slot::Broken;
        }
        result
    }
}

impl Deref for Held<'_> {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        match &*self.guard {
            Slot::Open(conn) => conn,
            Slot::Broken | Slot::Closed => {
                unreachable!("a Held is made only around an open connection")
            }
        }
    }
}

impl DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        match &mut *self.guard {
            Slot::Open(conn) => conn,
            Slot::Broken | Slot::Closed => {
                unreachable!("a Held is made only around an open connection")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use sqlx::sqlite::SqliteConnectOptions;

    use super::HeldConnection;
    use crate::store::StoreError;

    /// Whether the connection that `held` hands out now is the one that made the `TEMP` table
    /// (temporary tables belong to their connection).
    async fn same_connection(held: &HeldConnection) -> bool {
        let mut conn = held.lock().await.expect("lock");
        sqlx::query("SELECT count(*) FROM temp.mark")
            .execute(&mut *conn)
            .await
            .is_ok()
    }

    async fn marked(options: SqliteConnectOptions, reopen: bool) -> HeldConnection {
        let held = HeldConnection::open(options, reopen).await.expect("open");
        let mut conn = held.lock().await.expect("lock");
        sqlx::query("CREATE TEMP TABLE mark (x)")
            .execute(&mut *conn)
            .await
            .expect("create the mark");
        drop(conn);
        held
    }

    fn crashed() -> Result<(), StoreError> {
        Err(StoreError::Database(sqlx::Error::WorkerCrashed))
    }

    #[tokio::test]
    async fn a_connection_whose_thread_is_gone_is_replaced_on_next_use() {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("held.db"))
            .create_if_missing(true);
        let held = marked(options, true).await;

        // Other errors keep the connection.
        let conn = held.lock().await.expect("lock");
        let other = conn.check::<()>(Err(StoreError::Database(sqlx::Error::RowNotFound)));
        assert!(other.is_err());
        assert!(same_connection(&held).await);

        let conn = held.lock().await.expect("lock");
        assert!(matches!(
            conn.check(crashed()),
            Err(StoreError::Database(sqlx::Error::WorkerCrashed))
        ));
        assert!(!same_connection(&held).await, "a new connection");
        held.close().await;
    }

    #[tokio::test]
    async fn a_closed_connection_refuses_every_use() {
        let held = marked(SqliteConnectOptions::new().in_memory(true), false).await;
        held.close().await;
        assert!(matches!(
            held.lock().await.err(),
            Some(StoreError::Database(sqlx::Error::PoolClosed))
        ));
    }

    #[tokio::test]
    async fn an_in_memory_database_keeps_its_one_connection() {
        let held = marked(SqliteConnectOptions::new().in_memory(true), false).await;
        let conn = held.lock().await.expect("lock");
        assert!(conn.check(crashed()).is_err());
        assert!(
            same_connection(&held).await,
            "its data lives in that connection"
        );
        held.close().await;
    }
}
