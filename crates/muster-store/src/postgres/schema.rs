//! Schema migrations and the sealing key check, run once per database under an advisory lock.
//!
//! Migrations are an append-only list: migration `n` (1-based) is `MIGRATIONS[n - 1]`, and
//! `muster_schema_migrations` records which ones a database has. Never edit or reorder a
//! released migration; add a new one instead. Every node runs [`prepare`] when it opens the
//! store; `pg_advisory_lock` makes the others wait while one migrates, so each migration runs
//! once, in its own transaction.

use std::path::Path;
use std::sync::Arc;

use muster_proto::runtime::Entropy;

use tokio_postgres::Client;

use super::errors::pg_err;
use crate::sealing::Sealer;
use crate::StoreError;

/// The ordered migrations; index `i` is version `i + 1`.
///
/// Keys and partitions use the `C` collation: byte order, the order of Rust's `str` and of
/// the SQLite store, whatever the database's default collation is.
const MIGRATIONS: &[&str] = &[
    // 1: records (JSON text in `body`, or sealed bytes in `sealed` for a secret collection),
    // the etag sequence and the sealing key check.
    "CREATE TABLE muster_records (
        collection TEXT NOT NULL,
        key        TEXT COLLATE \"C\" NOT NULL,
        partition  TEXT COLLATE \"C\",
        etag       TEXT NOT NULL,
        body       TEXT,
        sealed     BYTEA,
        PRIMARY KEY (collection, key),
        CHECK ((body IS NULL) <> (sealed IS NULL))
    );
    CREATE INDEX muster_records_by_partition ON muster_records (collection, partition, key);
    CREATE SEQUENCE muster_etag AS BIGINT;
    CREATE TABLE muster_sealing (
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );",
    // 2: claims (`Store::claim`): which node works on a record, until when (Unix ms).
    "ALTER TABLE muster_records ADD COLUMN claim_owner TEXT;
    ALTER TABLE muster_records ADD COLUMN claim_until BIGINT;",
    // 3: shared rate limits (`Store::take_token`): a token bucket per name.
    "CREATE TABLE muster_rate_limits (
        name       TEXT PRIMARY KEY,
        tokens     DOUBLE PRECISION NOT NULL,
        updated_ms BIGINT NOT NULL
    );",
    // 4: bus messages too large for a notification (`bus.rs`), kept a minute.
    "CREATE TABLE muster_bus_spill (
        id         BIGSERIAL PRIMARY KEY,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        payload    BYTEA NOT NULL
    );
    CREATE INDEX muster_bus_spill_by_age ON muster_bus_spill (created_at);",
    // 5: registration records found by device id (`Store::search`): a partial expression
    // index over the lower-cased `deviceId` of registration bodies (kept in clear), in byte
    // order (`C`), then key.
    "CREATE INDEX muster_records_registrations_by_device ON muster_records
        ((lower(((body::jsonb) ->> 'deviceId') COLLATE \"C\")), key)
        WHERE collection = 'registrations';",
];

/// The schema version this build creates and understands.
pub(super) const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// `pg_advisory_lock` key held while a node migrates ("muster" in ASCII).
const MIGRATION_LOCK: i64 = 0x6d75_7374_6572;

/// `muster_sealing` row holding [`Sealer::key_check`].
const KEY_CHECK: &str = "key_check";

/// Brings the database to [`SCHEMA_VERSION`] and returns the sealer for it: the key file at
/// `key_path` must open the database's key check; a database without one gets the key
/// check of `key_path` (created when missing). Refuses a database from a newer build.
pub(super) async fn prepare(
    client: &mut Client,
    database: &str,
    key_path: &Path,
    entropy: Arc<dyn Entropy>,
) -> Result<Sealer, StoreError> {
    let context = |what: &str| format!("preparing PostgreSQL database {database}: {what}");
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| pg_err(&context("taking the migration lock"), &e))?;
    let result = migrate_and_check_key(client, database, key_path, entropy).await;
    // Also on failure; the lock would go with the connection anyway.
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| pg_err(&context("releasing the migration lock"), &e));
    let sealer = result?;
    unlocked?;
    Ok(sealer)
}

async fn migrate_and_check_key(
    client: &mut Client,
    database: &str,
    key_path: &Path,
    entropy: Arc<dyn Entropy>,
) -> Result<Sealer, StoreError> {
    let context = |what: &str| format!("migrating PostgreSQL database {database}: {what}");
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS muster_schema_migrations (
                version    INTEGER PRIMARY KEY,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )",
        )
        .await
        .map_err(|e| pg_err(&context("creating muster_schema_migrations"), &e))?;
    let current = schema_version(client)
        .await
        .map_err(|e| pg_err(&context("reading the schema version"), &e))?;
    if current > i64::from(SCHEMA_VERSION) {
        return Err(StoreError::Backend(format!(
            "PostgreSQL database {database} has schema version {current}, but this build of \
             Muster only knows versions up to {SCHEMA_VERSION}; it was written by a newer \
             Muster. Refusing to join it: upgrade this node first"
        )));
    }
    let already = usize::try_from(current.max(0)).unwrap_or(0);
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(already) {
        let version = i32::try_from(index + 1).unwrap_or(i32::MAX);
        let step = |what: &str| context(&format!("{what} migration {version}"));
        let tx = client
            .transaction()
            .await
            .map_err(|e| pg_err(&step("beginning"), &e))?;
        tx.batch_execute(sql)
            .await
            .map_err(|e| pg_err(&step("applying"), &e))?;
        tx.execute(
            "INSERT INTO muster_schema_migrations (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(|e| pg_err(&step("recording"), &e))?;
        tx.commit()
            .await
            .map_err(|e| pg_err(&step("committing"), &e))?;
        tracing::info!(version, database = %database, "applied store schema migration");
    }

    let check: Option<String> = client
        .query_opt(
            "SELECT value FROM muster_sealing WHERE name = $1",
            &[&KEY_CHECK],
        )
        .await
        .map_err(|e| pg_err(&context("reading the sealing key check"), &e))?
        .map(|row| row.get(0));
    match check {
        Some(check) => {
            // The database holds (or may hold) sealed records: only its own key opens it.
            let sealer = Sealer::load_with(key_path, entropy)?;
            sealer.verify_key_check(&check, Path::new(database))?;
            Ok(sealer)
        }
        None => {
            let sealer = Sealer::load_or_create_with(key_path, entropy)?;
            client
                .execute(
                    "INSERT INTO muster_sealing (name, value) VALUES ($1, $2)",
                    &[&KEY_CHECK, &sealer.key_check()?],
                )
                .await
                .map_err(|e| pg_err(&context("storing the sealing key check"), &e))?;
            Ok(sealer)
        }
    }
}

async fn schema_version(client: &Client) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM muster_schema_migrations",
            &[],
        )
        .await?;
    Ok(row.get(0))
}
