//! Schema migrations.
//!
//! Migrations are an append-only list: migration `n` (1-based) is `MIGRATIONS[n - 1]`, and
//! `schema_migrations` records which ones a database has. Never edit or reorder a released
//! migration; add a new one instead. A migration is SQL, optionally followed by a Rust step
//! (for what SQL cannot do, such as sealing), in the same transaction.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::db_err;
use crate::sealing::{self, Sealer};
use crate::{Collection, StoreError};

/// A migration's Rust step, run after its SQL in the same transaction.
type Step = fn(&Transaction<'_>, &Sealer, &Path) -> Result<(), StoreError>;

struct Migration {
    sql: &'static str,
    then: Option<Step>,
}

/// The ordered migrations; index `i` is version `i + 1`.
const MIGRATIONS: &[Migration] = &[
    // 1: records and the etag counter.
    Migration {
        sql: "CREATE TABLE records (
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
        then: None,
    },
    // 2: every collection that holds a key sealed (before: only settings and linked hubs);
    // the key check that tells a wrong key file.
    Migration {
        sql: "CREATE TABLE sealing (
            name  TEXT PRIMARY KEY,
            value TEXT NOT NULL
        ) WITHOUT ROWID;",
        then: Some(seal_existing),
    },
    // 3: sealed bodies kept as bytes (a BLOB in `records.body`) instead of base64 text, a
    // quarter smaller: a hub device record then fits one page instead of spilling into an
    // overflow page on every write and read (BENCHMARKS.md, "Sealing every key at rest").
    Migration {
        sql: "",
        then: Some(sealed_text_to_bytes),
    },
    // 4: claims (`Store::claim`): which node works on a record, until when (Unix ms).
    Migration {
        sql: "ALTER TABLE records ADD COLUMN claim_owner TEXT;
        ALTER TABLE records ADD COLUMN claim_until INTEGER;",
        then: None,
    },
    // 5: registration records found by device id (`Store::search`): a partial expression
    // index over the lower-cased `deviceId` of registration bodies (kept in clear), then key.
    // A body that is not JSON (a corrupt record) indexes as NULL instead of failing every
    // later write of that record, so it can still be repaired or removed.
    Migration {
        sql: "CREATE INDEX records_registrations_by_device ON records
            ((CASE WHEN json_valid(body) THEN lower(json_extract(body, '$.deviceId')) END), key)
            WHERE collection = 'registrations';",
        then: None,
    },
];

/// `sealing` row holding [`Sealer::key_check`].
pub(super) const KEY_CHECK: &str = "key_check";
/// `sealing` row present while pages that held keys in clear may remain in the file (after
/// [`seal_existing`] sealed them, before the `VACUUM` that rewrites every page).
pub(super) const VACUUM_PENDING: &str = "vacuum_pending";
/// Rows sealed per statement batch by [`seal_existing`].
const SEAL_PAGE: i64 = 500;

/// The schema version this build creates and understands.
pub(super) const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Brings the database up to [`SCHEMA_VERSION`] in one transaction, applying only the
/// migrations it lacks. Refuses a database from a newer build.
pub(super) fn migrate(
    conn: &mut Connection,
    path: &Path,
    sealer: &Sealer,
) -> Result<(), StoreError> {
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
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(already) {
        let version = index + 1;
        tx.execute_batch(migration.sql)
            .map_err(|e| db_err(&context(&format!("applying migration {version}")), e))?;
        if let Some(then) = migration.then {
            then(&tx, sealer, path)?;
        }
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

/// Whether the database holds anything sealed: then its key file must exist, never be
/// replaced by a new one. Works on a database of any schema version, even an empty file.
pub(super) fn holds_sealed_data(conn: &Connection, path: &Path) -> Result<bool, StoreError> {
    let context = |what: &str| format!("inspecting SQLite database {}: {what}", path.display());
    let has_table = |name: &str| -> Result<bool, StoreError> {
        conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            params![name],
            |row| row.get(0),
        )
        .map_err(|e| db_err(&context("listing tables"), e))
    };
    if has_table("sealing")? {
        let checked: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sealing WHERE name = ?1)",
                params![KEY_CHECK],
                |row| row.get(0),
            )
            .map_err(|e| db_err(&context("reading the key check"), e))?;
        if checked {
            return Ok(true);
        }
    }
    if has_table("records")? {
        return conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM records
                 WHERE typeof(body) = 'blob' OR substr(body, 1, ?1) = ?2)",
                params![sealing::SEALED_PREFIX.len(), sealing::SEALED_PREFIX],
                |row| row.get(0),
            )
            .map_err(|e| db_err(&context("looking for sealed records"), e));
    }
    Ok(false)
}

/// Migration 2's step: proves the key opens what is already sealed, seals every body of a
/// secret collection still in clear (etags unchanged: the content is the same), and stores the
/// key check. All in the migration's transaction: a crash leaves the old, readable database.
fn seal_existing(tx: &Transaction<'_>, sealer: &Sealer, path: &Path) -> Result<(), StoreError> {
    let context = |what: &str| format!("sealing SQLite database {}: {what}", path.display());
    let prefix_len = sealing::SEALED_PREFIX.len();
    // Before this version settings and linked hubs were sealed already: one of them proves
    // whether the key file is the database's own.
    let sealed_one: Option<(String, String, String)> = tx
        .query_row(
            "SELECT collection, key, body FROM records WHERE substr(body, 1, ?1) = ?2 LIMIT 1",
            params![prefix_len, sealing::SEALED_PREFIX],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .optional()
        .map_err(|e| db_err(&context("reading a sealed record"), e))?;
    if let Some((name, key, body)) = sealed_one {
        let collection = Collection::ALL.iter().find(|c| c.as_str() == name);
        if let Some(collection) = collection {
            sealer
                .open(*collection, &key, &body)
                .map_err(|_| sealer.mismatch(path))?;
        }
    }

    let mut sealed_count = 0u64;
    for collection in Collection::ALL.iter().filter(|c| c.is_secret()) {
        let mut after = String::new();
        loop {
            let page: Vec<(String, String)> = {
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT key, body FROM records
                         WHERE collection = ?1 AND key > ?2 AND substr(body, 1, ?3) <> ?4
                         ORDER BY key LIMIT ?5",
                    )
                    .map_err(|e| db_err(&context("reading records in clear"), e))?;
                let rows = stmt
                    .query_map(
                        params![
                            collection.as_str(),
                            after,
                            prefix_len,
                            sealing::SEALED_PREFIX,
                            SEAL_PAGE
                        ],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .map_err(|e| db_err(&context("reading records in clear"), e))?;
                rows.collect::<Result<_, _>>()
                    .map_err(|e| db_err(&context("reading records in clear"), e))?
            };
            let Some((last, _)) = page.last() else { break };
            after = last.clone();
            for (key, body) in &page {
                let sealed = sealer.seal(*collection, key, body)?;
                tx.prepare_cached(
                    "UPDATE records SET body = ?3 WHERE collection = ?1 AND key = ?2",
                )
                .and_then(|mut stmt| stmt.execute(params![collection.as_str(), key, sealed]))
                .map_err(|e| db_err(&context("writing a sealed record"), e))?;
                sealed_count += 1;
            }
        }
    }

    tx.execute(
        "INSERT INTO sealing (name, value) VALUES (?1, ?2)",
        params![KEY_CHECK, sealer.key_check()?],
    )
    .map_err(|e| db_err(&context("storing the key check"), e))?;
    if sealed_count > 0 {
        // The pages that held those bodies in clear are free now but not overwritten.
        tx.execute(
            "INSERT INTO sealing (name, value) VALUES (?1, '')",
            params![VACUUM_PENDING],
        )
        .map_err(|e| db_err(&context("marking the database for VACUUM"), e))?;
        tracing::info!(records = sealed_count, path = %path.display(), "sealed the keys kept in clear by an older Muster");
    }
    Ok(())
}

/// Migration 3's step: rewrites every sealed body kept as text (version 1) as sealed bytes
/// ([`Sealer::seal_bytes`]), etags unchanged (the content is the same). In the migration's
/// transaction: a crash leaves the old, readable database. Neither form holds a key in clear,
/// so no page needs rewriting afterwards.
fn sealed_text_to_bytes(
    tx: &Transaction<'_>,
    sealer: &Sealer,
    path: &Path,
) -> Result<(), StoreError> {
    let context = |what: &str| format!("rewriting sealed bodies in {}: {what}", path.display());
    let mut rewritten = 0u64;
    for collection in Collection::ALL.iter().filter(|c| c.is_secret()) {
        let mut after = String::new();
        loop {
            let page: Vec<(String, String)> = {
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT key, body FROM records
                         WHERE collection = ?1 AND key > ?2 AND typeof(body) = 'text'
                         ORDER BY key LIMIT ?3",
                    )
                    .map_err(|e| db_err(&context("reading sealed text"), e))?;
                let rows = stmt
                    .query_map(params![collection.as_str(), after, SEAL_PAGE], |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })
                    .map_err(|e| db_err(&context("reading sealed text"), e))?;
                rows.collect::<Result<_, _>>()
                    .map_err(|e| db_err(&context("reading sealed text"), e))?
            };
            let Some((last, _)) = page.last() else { break };
            after = last.clone();
            for (key, body) in &page {
                let plain = sealer.open(*collection, key, body)?;
                let sealed = sealer.seal_bytes(*collection, key, plain.as_bytes())?;
                tx.prepare_cached(
                    "UPDATE records SET body = ?3 WHERE collection = ?1 AND key = ?2",
                )
                .and_then(|mut stmt| stmt.execute(params![collection.as_str(), key, sealed]))
                .map_err(|e| db_err(&context("writing sealed bytes"), e))?;
                rewritten += 1;
            }
        }
    }
    if rewritten > 0 {
        tracing::info!(records = rewritten, path = %path.display(), "rewrote sealed bodies as bytes");
    }
    Ok(())
}
