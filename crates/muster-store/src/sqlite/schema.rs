//! Schema migrations.
//!
//! Migrations are an append-only list: migration `n` (1-based) is `MIGRATIONS[n - 1]`, and
//! `schema_migrations` records which ones a database has. Never edit or reorder a released
//! migration; add a new one instead.

use std::path::Path;

use rusqlite::{params, Connection, TransactionBehavior};

use super::db_err;
use crate::StoreError;

/// The ordered migrations; index `i` is version `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: records and the etag counter.
    "CREATE TABLE records (
        collection TEXT NOT NULL,
        key        TEXT NOT NULL,
        partition  TEXT,
        etag       TEXT NOT NULL,
        body       TEXT NOT NULL,
        PRIMARY KEY (collection, key)
    ) WITHOUT ROWID;
    CREATE INDEX records_by_partition ON records (collection, partition, key);
    CREATE TABLE counters (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO counters (name, value) VALUES ('etag', 0);",
];

/// The schema version this build creates and understands.
pub(super) const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Brings the database up to [`SCHEMA_VERSION`] in one transaction, applying only the
/// migrations it lacks. Refuses a database from a newer build.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let context = |what: &str| format!("migrating SQLite database {}: {what}", path.display());
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| db_err(&context("beginning transaction"), e))?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    INTEGER PRIMARY KEY,
            applied_at TEXT NOT NULL
        )",
    )
    .map_err(|e| db_err(&context("creating schema_migrations"), e))?;
    let current: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |row| row.get(0),
        )
        .map_err(|e| db_err(&context("reading the schema version"), e))?;
    if current > i64::from(SCHEMA_VERSION) {
        return Err(StoreError::Backend(format!(
            "SQLite database {} has schema version {current}, but this build of Muster only \
             knows versions up to {SCHEMA_VERSION}; it was written by a newer Muster. Refusing \
             to open it: upgrade Muster (or restore a backup made with this version)",
            path.display()
        )));
    }
    let already = usize::try_from(current.max(0)).unwrap_or(0);
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(already) {
        let version = index + 1;
        tx.execute_batch(sql)
            .map_err(|e| db_err(&context(&format!("applying migration {version}")), e))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at)
             VALUES (?1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            params![i64::try_from(version).unwrap_or(i64::MAX)],
        )
        .map_err(|e| db_err(&context(&format!("recording migration {version}")), e))?;
        tracing::info!(version, path = %path.display(), "applied store schema migration");
    }
    tx.commit().map_err(|e| db_err(&context("committing"), e))
}
