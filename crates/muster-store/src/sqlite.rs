//! Embedded SQLite implementation of [`crate::Store`]: one database file under the data dir.
//!
//! # Layout
//!
//! All records live in one table, `records(collection, key, partition, etag, body)`, keyed by
//! `(collection, key)` (`WITHOUT ROWID`, so rows are stored in key order) with an index on
//! `(collection, partition, key)` for partition-filtered listing and counting, and a partial
//! expression index on registration records' lower-cased `deviceId` for `Store::search`. Bodies are JSON
//! text, except those of secret collections: sealed bytes, kept as a `BLOB` (`body`). Keys compare with SQLite's default `BINARY` collation, i.e. byte order, the same order
//! as Rust's `str`. Etags come from a per-database counter in the `counters` table, rendered
//! DPS-style (base64 of a quoted GUID-like string); every put gets a fresh one, even when the
//! body did not change. The schema is versioned by `schema_migrations` (see `schema`).
//!
//! # Sealing and files
//!
//! Bodies of secret collections are sealed before they reach the writer and opened after a
//! read (`crate::sealing`); the key check lives in the `sealing` table. On open, a key file
//! is created only for a database that holds nothing sealed; migration 2 seals what an older
//! build left in clear, then a `VACUUM` and a truncating checkpoint leave no old page behind.
//! Migration 3 rewrites sealed bodies kept as base64 text (version 1) as sealed bytes, a
//! quarter smaller, so a hub device record fits one page instead of needing an overflow page.
//! The database, `-wal`, `-shm` and key file are owner-only (`files`).
//!
//! # Writes: one writer thread, group commit
//!
//! SQLite allows one writer at a time, and with `synchronous=FULL` every commit costs an
//! fsync. A dedicated writer thread owns the only read-write connection; [`Store::write`]
//! serializes the bodies on the caller's task, sends the batch over a channel and awaits the
//! answer. The thread takes everything queued at that moment and commits it in a single
//! transaction, so many concurrent registrations share one fsync, then answers each caller.
//! Each batch runs in its own savepoint: expectations are checked against the state left by
//! the writes before it (earlier items of the same batch, and earlier batches of the group),
//! and a batch that hits a database error is rolled back alone. An answer is sent only once
//! the transaction is committed and synced, so a write is durable before `write` returns.
//!
//! # Checkpoints: a thread of their own
//!
//! Every read-write connection has `wal_autocheckpoint=0`, so a commit never copies the WAL
//! back into the database file (SQLite's default does that inside the commit that crosses
//! 1,000 pages, and every registration in the next group waited for it). The `checkpointer`
//! thread, with its own connection, runs a `PASSIVE` checkpoint every [`CheckpointPolicy`]
//! number of group commits; once the WAL is long it asks the writer for a small catch-up
//! between two groups (the frames committed since the pass), so the WAL starts over, and a
//! bounded `TRUNCATE` when the file grew past its limit. Its module doc says why, and why
//! durability is unchanged. The writer's group commits and the
//! checkpoints are timed ([`COMMIT_SECONDS`], [`CHECKPOINT_SECONDS`], through `metrics`).
//!
//! # Claims
//!
//! [`Store::claim`] and its kin only set `records.claim_owner`/`claim_until` (added by
//! migration 4), so they run on a second read-write connection (`claims`), not through the
//! writer thread; a put carrying a lease sets them in the writer's statement.
//!
//! # Reads: a small pool
//!
//! Reads use a few read-only connections on the blocking thread pool. In WAL mode readers see
//! the last committed state and neither block the writer nor wait for it.
//!
//! # Backups
//!
//! [`snapshot`] copies the database with `VACUUM INTO` through its own read-only
//! connection: a reader like any other, so the server keeps serving and the copy is the last
//! committed state. [`schema_version`] reads a copy's version without migrating it.
//!
//! # Lifetime
//!
//! [`SqliteStore`] is a cheap handle (`Arc` inside). When the last clone is dropped the idle
//! read connections are closed, the channel closes, the writer finishes what is queued, closes
//! its connection and the drop waits for it to exit; then the checkpointer runs a final
//! `TRUNCATE` checkpoint, closes the last connection (SQLite removes the WAL) and exits.

mod body;
mod checkpointer;
mod claims;
mod files;
mod readers;
mod schema;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use muster_proto::runtime::{Entropy, OsEntropy};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::oneshot;

use crate::sealing::Sealer;
use crate::{
    Collection, ListQuery, Record, SearchField, SearchQuery, Store, StoreError, Unavailability,
    Write, WriteOp, WriteOutcome,
};
use body::StoredBody;
use readers::ReadPool;
// The PostgreSQL store renders its etags the same way.
#[cfg(feature = "postgres")]
pub(crate) use writer::format_etag;
use writer::{EtagCounter, PreparedOp, PreparedWrite, Request};

pub use checkpointer::{wal_path, Policy as CheckpointPolicy, CHECKPOINT_SECONDS};
pub use writer::COMMIT_SECONDS;

/// Read-only connections kept open for reads.
const READ_POOL_SIZE: usize = 4;
/// Lists of at most this many rows are short enough to read inline (see `readers`).
const INLINE_LIST_LIMIT: usize = 32;
/// How long a connection waits for a lock held by another connection (for example another
/// process holding the database) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite store. Cheap to clone; all clones share one writer thread and read pool.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    readers: Arc<ReadPool>,
    /// Claims on records (`Store::claim`), on a connection of their own (see `claims`).
    claims: claims::Claims,
    changes: Arc<writer::ChangeCounters>,
    /// Seals the bodies of secret collections (see `crate::sealing`).
    sealer: Arc<Sealer>,
    /// `None` only while dropping.
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    /// Copies the WAL into the database file, off the writer thread (see `checkpointer`).
    checkpointer: checkpointer::Checkpointer,
}

impl SqliteStore {
    /// The schema version this build creates and understands.
    pub const SCHEMA_VERSION: u32 = schema::SCHEMA_VERSION;

    /// Opens (creating it and its parent directories if missing) the database at `path`,
    /// applies any missing migrations and starts the writer thread.
    ///
    /// Fails if the database was written by a newer Muster (a schema version this build does
    /// not know). Blocking; call it at startup, not from a busy async task. Sealing nonces
    /// (and a new key file's key) come from the operating system.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with_entropy(path, Arc::new(OsEntropy))
    }

    /// [`SqliteStore::open`], with sealing nonces and a new key file's key from `entropy`.
    pub fn open_with_entropy(
        path: &Path,
        entropy: Arc<dyn Entropy>,
    ) -> Result<SqliteStore, StoreError> {
        Self::open_with(path, entropy, CheckpointPolicy::default())
    }

    /// [`SqliteStore::open`] with WAL checkpoints run as `policy` says (see
    /// [`CheckpointPolicy`]).
    pub fn open_with_policy(
        path: &Path,
        policy: CheckpointPolicy,
    ) -> Result<SqliteStore, StoreError> {
        Self::open_with(path, Arc::new(OsEntropy), policy)
    }

    fn open_with(
        path: &Path,
        entropy: Arc<dyn Entropy>,
        policy: CheckpointPolicy,
    ) -> Result<SqliteStore, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            files::create_private_dir(parent)?;
        }
        let explain = |e| explain_open_failure(path, e);
        files::create_private_file(path).map_err(explain)?;
        let key_path = key_file_path(path);
        files::restrict(&[
            path.to_path_buf(),
            sidecar(path, "-wal"),
            sidecar(path, "-shm"),
            key_path.clone(),
        ])
        .map_err(explain)?;
        let mut conn = open_writer(path).map_err(explain)?;
        let sealer = if schema::holds_sealed_data(&conn, path).map_err(explain)? {
            Sealer::load_with(&key_path, entropy).map_err(explain)?
        } else {
            Sealer::load_or_create_with(&key_path, entropy).map_err(explain)?
        };
        schema::migrate(&mut conn, path, &sealer).map_err(explain)?;
        check_sealing_key(&conn, path, &sealer).map_err(explain)?;
        vacuum_if_pending(&conn, path).map_err(explain)?;
        let sealer = Arc::new(sealer);
        let etags = EtagCounter::load(&conn).map_err(explain)?;
        let readers =
            ReadPool::open(path.to_path_buf(), READ_POOL_SIZE, BUSY_TIMEOUT).map_err(explain)?;
        let claims = claims::Claims::open(path).map_err(explain)?;
        let checkpointer = checkpointer::Checkpointer::start(path, policy).map_err(explain)?;

        let (requests, queue) = mpsc::channel();
        let changes = Arc::new(writer::ChangeCounters::new());
        let writer_changes = changes.clone();
        let committed = checkpointer.signal();
        let writer = std::thread::Builder::new()
            .name("muster-store-writer".into())
            .spawn(move || writer::run(conn, queue, etags, writer_changes, committed))
            .map_err(|e| StoreError::Backend(format!("starting the store writer thread: {e}")))?;
        tracing::debug!(path = %path.display(), "opened SQLite store");

        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                readers,
                claims,
                changes,
                sealer,
                requests: Some(requests),
                writer: Some(writer),
                checkpointer,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Readers and writers first, so the checkpointer's connection is the last one: its
        // final checkpoint copies everything and empties the WAL.
        self.readers.close_idle();
        self.claims.close();
        drop(self.requests.take());
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!(path = %self.path.display(), "the store writer thread panicked");
            }
        }
        self.checkpointer.stop();
    }
}

/// The page size of a database Muster creates (see `open_writer`).
pub const PAGE_SIZE: u32 = 8192;

fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    let context = |what: &str| format!("opening SQLite database {}: {what}", path.display());
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| db_err(&context("open"), e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| db_err(&context("setting the busy timeout"), e))?;
    // Only a new, empty database takes this (an existing one keeps its page size). With 4 KiB
    // pages a `WITHOUT ROWID` cell holds at most 1,002 bytes before it spills to an overflow
    // page, and a sealed hub device record (identity + twin) is just over that: every
    // registration wrote and read one more page. 8 KiB pages keep such records in one cell.
    conn.pragma_update(None, "page_size", PAGE_SIZE)
        .map_err(|e| db_err(&context("setting the page size"), e))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| db_err(&context("enabling WAL"), e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Backend(context(&format!(
            "could not enable WAL journal mode (the file system may not support it); got {mode}"
        ))));
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| db_err(&context("setting synchronous=FULL"), e))?;
    // A batch's savepoint journal (see writer.rs) stays in memory instead of spilling into a
    // temporary file that is created and deleted with each group commit.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(|e| db_err(&context("setting temp_store=MEMORY"), e))?;
    // Commits never checkpoint: the checkpointer thread does, off the writer (see
    // `checkpointer`, which also says why durability is unchanged).
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .map_err(|e| db_err(&context("turning off automatic checkpoints"), e))?;
    Ok(conn)
}

/// A backend error with context. Never pass record bodies as context. SQLite's codes for a
/// store that may work again later (full, locked, read-only, I/O, cannot open) become
/// [`StoreError::Unavailable`]; everything else stays a backend error.
fn db_err(context: &str, error: rusqlite::Error) -> StoreError {
    match unavailability(&error) {
        Some(cause) => StoreError::Unavailable {
            cause,
            detail: format!("{context}: {error}"),
        },
        None => StoreError::Backend(format!("{context}: {error}")),
    }
}

/// Which SQLite result codes mean "not now" rather than "wrong".
fn unavailability(error: &rusqlite::Error) -> Option<Unavailability> {
    use rusqlite::ErrorCode as C;
    let rusqlite::Error::SqliteFailure(e, _) = error else {
        return None;
    };
    Some(match e.code {
        C::DiskFull => Unavailability::DiskFull,
        C::DatabaseBusy | C::DatabaseLocked => Unavailability::Locked,
        C::ReadOnly => Unavailability::ReadOnly,
        C::SystemIoFailure => Unavailability::Io,
        C::CannotOpen => Unavailability::CannotOpen,
        _ => return None,
    })
}

/// An open that failed for lack of space often surfaces as a plain I/O error (creating the
/// WAL or shared-memory file), so when opening fails as unavailable, a small probe write
/// next to the database says whether the file system is full, and the message says so plainly.
fn explain_open_failure(path: &Path, error: StoreError) -> StoreError {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (cause, detail) = match error {
        StoreError::Unavailable { cause, detail } => (cause, detail),
        // The key file or the directory may have hit the full disk first.
        StoreError::Backend(detail) if disk_is_full(dir) => (Unavailability::DiskFull, detail),
        other => return other,
    };
    let cause = if cause == Unavailability::DiskFull || disk_is_full(dir) {
        Unavailability::DiskFull
    } else {
        cause
    };
    let advice = match cause {
        Unavailability::DiskFull => format!(
            "no space is left on the file system holding {}: free some space, then start Muster again",
            dir.display()
        ),
        Unavailability::ReadOnly => format!(
            "{} or its directory is read-only: make them writable for the user running Muster",
            path.display()
        ),
        Unavailability::Locked => format!(
            "{} is locked by another process (is another Muster running on the same data dir?)",
            path.display()
        ),
        Unavailability::Io | Unavailability::CannotOpen | Unavailability::Unreachable => format!(
            "{} cannot be opened or written: check the disk and the file's permissions",
            path.display()
        ),
    };
    StoreError::Unavailable {
        cause,
        detail: format!("{advice} ({detail})"),
    }
}

/// Whether a 64 KiB write into `dir` fails for lack of space.
fn disk_is_full(dir: &Path) -> bool {
    use std::io::Write as _;
    let probe = dir.join(".muster-space-probe");
    let result = std::fs::File::create(&probe).and_then(|mut f| {
        f.write_all(&[0u8; 64 * 1024])?;
        f.sync_all()
    });
    let _ = std::fs::remove_file(&probe);
    matches!(result, Err(e) if e.kind() == std::io::ErrorKind::StorageFull)
}

/// Writes a consistent copy of the database at `db` to `out` with `VACUUM INTO`, through
/// a separate read-only connection, so a running server keeps serving (WAL: the copy is the
/// last committed state when it starts, as any reader sees it). `out` must not exist; it is
/// created owner-only. Returns the copy's schema version. Bodies stay sealed: the copy is
/// useless without the key file ([`key_file_path`]).
pub fn snapshot(db: &Path, out: &Path) -> Result<u32, StoreError> {
    let fail = |what: &str, e: &dyn fmt::Display| {
        StoreError::Backend(format!(
            "snapshot of {} into {}: {what}: {e}",
            db.display(),
            out.display()
        ))
    };
    if !db.is_file() {
        return Err(StoreError::Backend(format!(
            "no database at {} (is this the data dir?)",
            db.display()
        )));
    }
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| fail("opening the database", &e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| fail("setting the busy timeout", &e))?;
    // SQLite fills an existing empty file, so the copy is owner-only from its first byte.
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(out).map_err(|e| fail("creating the copy", &e))?;
    let target = out
        .to_str()
        .ok_or_else(|| fail("path", &"not valid UTF-8"))?;
    if let Err(e) = conn.execute("VACUUM INTO ?1", params![target]) {
        let _ = std::fs::remove_file(out);
        return Err(fail("VACUUM INTO", &e));
    }
    drop(conn);
    schema_version(out)
}

/// The schema version of the database at `path` (0 for an empty file), read without
/// migrating it, e.g. to refuse a backup from a newer Muster before restoring it.
pub fn schema_version(path: &Path) -> Result<u32, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| db_err(&format!("opening {}", path.display()), e))?;
    let has_table: bool = conn
        .query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
            [],
            |row| row.get(0),
        )
        .map_err(|e| db_err(&format!("reading {}", path.display()), e))?;
    if !has_table {
        return Ok(0);
    }
    let version: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |row| row.get(0),
        )
        .map_err(|e| {
            db_err(
                &format!("reading the schema version of {}", path.display()),
                e,
            )
        })?;
    Ok(u32::try_from(version).unwrap_or(u32::MAX))
}

/// The key file that seals secret collections: `muster.db` → `muster.db.key`.
pub fn key_file_path(db: &Path) -> PathBuf {
    sidecar(db, ".key")
}

/// A file SQLite or Muster keeps beside the database: `muster.db` → `muster.db{suffix}`.
fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    db.with_file_name(name)
}

/// Fails unless the key check stored with the database opens with `sealer`.
fn check_sealing_key(conn: &Connection, path: &Path, sealer: &Sealer) -> Result<(), StoreError> {
    let check: Option<String> = conn
        .query_row(
            "SELECT value FROM sealing WHERE name = ?1",
            params![schema::KEY_CHECK],
            |row| row.get(0),
        )
        .optional()
        .map_err(|e| db_err("reading the sealing key check", e))?;
    match check {
        Some(check) => sealer.verify_key_check(&check, path),
        None => Err(StoreError::Backend(format!(
            "SQLite database {} has no sealing key check",
            path.display()
        ))),
    }
}

/// After migration 2 sealed bodies that were in clear, the pages that held them are free but
/// not overwritten, and old WAL frames may still hold them: `VACUUM` rewrites every page and
/// the truncating checkpoint empties the WAL. The marker is removed only once that is done,
/// so a crash in between repeats it on the next start.
fn vacuum_if_pending(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let context = |what: &str| format!("rewriting SQLite database {}: {what}", path.display());
    let pending: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sealing WHERE name = ?1)",
            params![schema::VACUUM_PENDING],
            |row| row.get(0),
        )
        .map_err(|e| db_err(&context("reading the marker"), e))?;
    if !pending {
        return Ok(());
    }
    conn.execute_batch("VACUUM")
        .map_err(|e| db_err(&context("VACUUM"), e))?;
    let (busy, _, _): (i64, i64, i64) = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .map_err(|e| db_err(&context("checkpointing"), e))?;
    if busy != 0 {
        // Another process reads the database; the marker stays, so the next start retries.
        tracing::warn!(path = %path.display(), "could not empty the WAL after sealing: another connection holds it; retrying on the next start");
        return Ok(());
    }
    conn.execute(
        "DELETE FROM sealing WHERE name = ?1",
        params![schema::VACUUM_PENDING],
    )
    .map_err(|e| db_err(&context("clearing the marker"), e))?;
    tracing::info!(path = %path.display(), "rewrote the database so no page keeps a key in clear");
    Ok(())
}

fn decode_record(
    sealer: &Sealer,
    collection: Collection,
    key: String,
    partition: Option<String>,
    etag: String,
    body: &StoredBody,
) -> Result<Record, StoreError> {
    let body = body.open(sealer, collection, &key)?;
    Ok(Record {
        key,
        partition,
        etag,
        body,
    })
}

fn prepare(sealer: &Sealer, write: Write) -> Result<PreparedWrite, StoreError> {
    let op = match write.op {
        WriteOp::Put { partition, body } => {
            let text = serde_json::to_string(&body).map_err(|e| {
                StoreError::Backend(format!(
                    "serializing the body of {}/{}: {e}",
                    write.collection.as_str(),
                    write.key
                ))
            })?;
            let body = StoredBody::seal(sealer, write.collection, &write.key, text)?;
            PreparedOp::Put { partition, body }
        }
        WriteOp::PutJson { partition, json } => {
            let body = StoredBody::seal(sealer, write.collection, &write.key, json)?;
            PreparedOp::Put { partition, body }
        }
        WriteOp::Delete => PreparedOp::Delete,
    };
    Ok(PreparedWrite {
        collection: write.collection.as_str(),
        key: write.key,
        expect: write.expect,
        op,
        lease: write.lease,
        required: write.required,
    })
}

const GET_SQL: &str =
    "SELECT partition, etag, body FROM records WHERE collection = ?1 AND key = ?2";

/// Parameters are always `?1` collection, `?2` partition, `?3` after, `?4` limit; a variant
/// that does not filter on one still binds it (SQLite ignores unreferenced parameters).
fn list_sql(by_partition: bool, after: bool) -> &'static str {
    match (by_partition, after) {
        (false, false) => {
            "SELECT key, partition, etag, body FROM records
             WHERE collection = ?1 ORDER BY key LIMIT ?4"
        }
        (false, true) => {
            "SELECT key, partition, etag, body FROM records
             WHERE collection = ?1 AND key > ?3 ORDER BY key LIMIT ?4"
        }
        (true, false) => {
            "SELECT key, partition, etag, body FROM records
             WHERE collection = ?1 AND partition = ?2 ORDER BY key LIMIT ?4"
        }
        (true, true) => {
            "SELECT key, partition, etag, body FROM records
             WHERE collection = ?1 AND partition = ?2 AND key > ?3 ORDER BY key LIMIT ?4"
        }
    }
}

/// `?1` collection, `?2` lower bound, `?3` upper bound (exclusive), `?4` limit. The device id
/// variant names the collection literally, so the partial index
/// `records_registrations_by_device` applies (its expression must match the index's exactly),
/// and `INDEXED BY` keeps the planner from preferring the primary key's `collection` prefix
/// (a scan of every registration record) when the table has no statistics.
fn search_sql(field: SearchField) -> &'static str {
    match field {
        SearchField::Key => {
            "SELECT key, partition, etag, body FROM records
             WHERE collection = ?1 AND key >= ?2 AND key < ?3 ORDER BY key LIMIT ?4"
        }
        SearchField::DeviceId => {
            "SELECT key, partition, etag, body FROM records
             INDEXED BY records_registrations_by_device
             WHERE collection = 'registrations'
               AND (CASE WHEN json_valid(body)
                    THEN lower(json_extract(body, '$.deviceId')) END) >= ?2
               AND (CASE WHEN json_valid(body)
                    THEN lower(json_extract(body, '$.deviceId')) END) < ?3
             ORDER BY (CASE WHEN json_valid(body)
                    THEN lower(json_extract(body, '$.deviceId')) END), key
             LIMIT ?4"
        }
    }
}

/// Reads the rows of a `SELECT key, partition, etag, body` statement.
fn read_records(
    sealer: &Sealer,
    collection: Collection,
    stmt: &mut rusqlite::CachedStatement<'_>,
    params: impl rusqlite::Params,
    context: &dyn Fn() -> String,
) -> Result<Vec<Record>, StoreError> {
    let rows = stmt
        .query_map(params, |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, Option<String>>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, StoredBody>(3)?,
            ))
        })
        .map_err(|e| db_err(&context(), e))?;
    let mut records = Vec::new();
    for row in rows {
        let (key, partition, etag, body) = row.map_err(|e| db_err(&context(), e))?;
        records.push(decode_record(
            sealer, collection, key, partition, etag, &body,
        )?);
    }
    Ok(records)
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(&self, collection: Collection, key: &str) -> Result<Option<Record>, StoreError> {
        let key = key.to_owned();
        let sealer = self.inner.sealer.clone();
        self.inner
            .readers
            .run_inline(move |conn| {
                let context = || format!("reading {}/{key}", collection.as_str());
                let row = conn
                    .prepare_cached(GET_SQL)
                    .and_then(|mut stmt| {
                        stmt.query_row(params![collection.as_str(), key], |row| {
                            Ok((
                                row.get::<_, Option<String>>(0)?,
                                row.get::<_, String>(1)?,
                                row.get::<_, StoredBody>(2)?,
                            ))
                        })
                        .optional()
                    })
                    .map_err(|e| db_err(&context(), e))?;
                match row {
                    Some((partition, etag, body)) => {
                        decode_record(&sealer, collection, key, partition, etag, &body).map(Some)
                    }
                    None => Ok(None),
                }
            })
            .await
    }

    async fn write(&self, writes: Vec<Write>) -> Result<Vec<WriteOutcome>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let writes = writes
            .into_iter()
            .map(|w| prepare(&self.inner.sealer, w))
            .collect::<Result<Vec<_>, _>>()?;
        let (reply, answer) = oneshot::channel();
        self.inner
            .requests
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(Request { writes, reply })
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn list(
        &self,
        collection: Collection,
        query: ListQuery,
    ) -> Result<Vec<Record>, StoreError> {
        let sealer = self.inner.sealer.clone();
        let read = move |conn: &Connection| {
            let context = || format!("listing {}", collection.as_str());
            let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
            let sql = list_sql(query.partition.is_some(), query.after.is_some());
            let mut stmt = conn
                .prepare_cached(sql)
                .map_err(|e| db_err(&context(), e))?;
            read_records(
                &sealer,
                collection,
                &mut stmt,
                params![collection.as_str(), query.partition, query.after, limit],
                &context,
            )
        };
        if query.limit <= INLINE_LIST_LIMIT {
            self.inner.readers.run_inline(read).await
        } else {
            self.inner.readers.run(read).await
        }
    }

    async fn claim(
        &self,
        collection: Collection,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        self.inner
            .claims
            .claim(
                self.inner.sealer.clone(),
                collection,
                owner.to_owned(),
                now_ms,
                until_ms,
                limit,
            )
            .await
    }

    async fn renew(
        &self,
        collection: Collection,
        owner: &str,
        keys: &[String],
        until_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.inner
            .claims
            .renew(collection, owner.to_owned(), keys.to_vec(), until_ms)
            .await
    }

    async fn release(
        &self,
        collection: Collection,
        owner: &str,
        keys: &[String],
    ) -> Result<(), StoreError> {
        self.inner
            .claims
            .release(collection, owner.to_owned(), keys.to_vec())
            .await
    }

    async fn search(
        &self,
        collection: Collection,
        query: SearchQuery,
    ) -> Result<Vec<Record>, StoreError> {
        query.check(collection)?;
        let query_limit = query.limit;
        let sealer = self.inner.sealer.clone();
        let read = move |conn: &Connection| {
            let context = || format!("searching {}", collection.as_str());
            let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
            let low = query.folded_prefix();
            let high = SearchQuery::upper_bound(&low);
            let mut stmt = conn
                .prepare_cached(search_sql(query.field))
                .map_err(|e| db_err(&context(), e))?;
            read_records(
                &sealer,
                collection,
                &mut stmt,
                params![collection.as_str(), low, high, limit],
                &context,
            )
        };
        if query_limit <= INLINE_LIST_LIMIT {
            self.inner.readers.run_inline(read).await
        } else {
            self.inner.readers.run(read).await
        }
    }

    fn changes(&self, collection: Collection) -> Option<u64> {
        // Only this process writes the database while it is open (the server holds it).
        Some(self.inner.changes.get(collection))
    }

    async fn count(
        &self,
        collection: Collection,
        partition: Option<&str>,
    ) -> Result<u64, StoreError> {
        let partition = partition.map(str::to_owned);
        self.inner
            .readers
            .run(move |conn| {
                let context = || format!("counting {}", collection.as_str());
                let count: i64 = match &partition {
                    None => conn
                        .prepare_cached("SELECT COUNT(*) FROM records WHERE collection = ?1")
                        .and_then(|mut stmt| {
                            stmt.query_row(params![collection.as_str()], |row| row.get(0))
                        }),
                    Some(partition) => conn
                        .prepare_cached(
                            "SELECT COUNT(*) FROM records WHERE collection = ?1 AND partition = ?2",
                        )
                        .and_then(|mut stmt| {
                            stmt.query_row(params![collection.as_str(), partition], |row| {
                                row.get(0)
                            })
                        }),
                }
                .map_err(|e| db_err(&context(), e))?;
                u64::try_from(count)
                    .map_err(|_| StoreError::Backend(format!("{}: negative count", context())))
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both searches are index range scans, never a scan of the table: what keeps one answer
    /// quick at a million registration records.
    #[test]
    fn searches_use_an_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("plan.db");
        drop(SqliteStore::open(&path).expect("open"));
        let conn = Connection::open(&path).expect("connection");
        for (field, index) in [
            (
                SearchField::Key,
                "USING PRIMARY KEY (collection=? AND key>? AND key<?)",
            ),
            (
                SearchField::DeviceId,
                "USING INDEX records_registrations_by_device (<expr>>? AND <expr><?)",
            ),
        ] {
            let sql = format!("EXPLAIN QUERY PLAN {}", search_sql(field));
            let mut stmt = conn.prepare(&sql).expect("prepare");
            let plan: Vec<String> = stmt
                .query_map(params!["registrations", "a", "b", 10], |row| row.get(3))
                .expect("plan")
                .collect::<Result<_, _>>()
                .expect("rows");
            let plan = plan.join("; ");
            assert!(plan.contains(index), "{field:?}: {plan}");
            assert!(!plan.contains("USE TEMP B-TREE"), "{field:?} sorts: {plan}");
        }
    }
}
