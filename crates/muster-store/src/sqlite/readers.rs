//! A small pool of read-only connections.
//!
//! Reads that may take long (pages of records, counts) run on the blocking thread pool.
//! Point reads that are bounded to a few rows run inline on the calling task when a connection
//! is idle: in WAL mode a reader never waits for the writer, and a primary-key lookup takes a
//! few microseconds, less than the hand-off to a blocking thread and back (which profiling
//! showed as a third of the server's CPU time during a registration burst).
//!
//! A semaphore with one permit per connection bounds the number of concurrent reads, so a
//! burst of reads waits asynchronously instead of piling up blocking threads. A permit
//! guarantees a pooled connection is free; should one have been lost (a panic while it was
//! out), a fresh one is opened in its place.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::Semaphore;

use super::db_err;
use crate::StoreError;

pub(super) struct ReadPool {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl ReadPool {
    pub(super) fn open(
        path: PathBuf,
        size: usize,
        busy_timeout: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let mut idle = Vec::with_capacity(size);
        for _ in 0..size {
            idle.push(open_reader(&path, busy_timeout)?);
        }
        Ok(Arc::new(Self {
            path,
            busy_timeout,
            idle: Mutex::new(idle),
            permits: Arc::new(Semaphore::new(size)),
        }))
    }

    /// Runs `f` on a pooled connection on the blocking thread pool.
    pub(super) async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let pool = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = pool.take()?;
            let result = f(&conn);
            pool.give_back(conn);
            result
        })
        .await
        .map_err(|e| StoreError::Backend(format!("SQLite read task failed: {e}")))?
    }

    /// Runs `f` on the calling task if a connection is free at once, else as [`Self::run`].
    /// Only for reads bounded to a few rows.
    pub(super) async fn run_inline<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let Ok(_permit) = self.permits.try_acquire() else {
            return self.run(f).await;
        };
        let conn = self.take()?;
        let result = f(&conn);
        self.give_back(conn);
        result
    }

    /// Closes the idle connections (in-flight reads keep theirs until they finish).
    pub(super) fn close_idle(&self) {
        match self.idle.lock() {
            Ok(mut idle) => idle.clear(),
            Err(poisoned) => poisoned.into_inner().clear(),
        }
    }

    fn take(&self) -> Result<Connection, StoreError> {
        let pooled = self
            .idle
            .lock()
            .map_err(|_| StoreError::Backend("SQLite read pool lock poisoned".into()))?
            .pop();
        match pooled {
            Some(conn) => Ok(conn),
            None => open_reader(&self.path, self.busy_timeout),
        }
    }

    fn give_back(&self, conn: Connection) {
        // A poisoned pool just loses this connection; `take` opens a new one when needed.
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
    }
}

fn open_reader(path: &std::path::Path, busy_timeout: Duration) -> Result<Connection, StoreError> {
    let context = || {
        format!(
            "opening read connection to SQLite database {}",
            path.display()
        )
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| db_err(&context(), e))?;
    conn.busy_timeout(busy_timeout)
        .map_err(|e| db_err(&context(), e))?;
    Ok(conn)
}
