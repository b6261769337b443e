//! `SqliteStore` against the shared conformance suite, plus SQLite-specific behaviour:
//! durability across reopen, migrations, refusing a newer schema, corrupt bodies.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use muster_store::{
    Collection, Expect, ListQuery, SqliteStore, Store, StoreError, Write, WriteOutcome,
};
use serde_json::json;

fn open(path: &Path) -> SqliteStore {
    SqliteStore::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn raw(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).expect("raw connection")
}

fn migrations(path: &Path) -> Vec<(i64, String)> {
    let conn = raw(path);
    let mut stmt = conn
        .prepare("SELECT version, applied_at FROM schema_migrations ORDER BY version")
        .expect("prepare");
    let rows = stmt
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .expect("query");
    rows.collect::<Result<_, _>>().expect("rows")
}

async fn put(
    store: &SqliteStore,
    key: &str,
    partition: Option<&str>,
    body: serde_json::Value,
) -> String {
    let write = Write::put(Collection::Registrations, key, Expect::Any, body)
        .with_partition(partition.map(str::to_owned));
    match store.write(vec![write]).await.expect("write").as_slice() {
        [WriteOutcome::Written { etag }] => etag.clone(),
        other => panic!("unexpected outcome {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let next = AtomicUsize::new(0);
    muster_store::conformance::run_all(|| {
        let path = dir
            .path()
            .join(format!("store-{}.db", next.fetch_add(1, Ordering::Relaxed)));
        async move { open(&path) }
    })
    .await;
}

/// The suite also passes on a current-thread runtime (the writer thread and read pool must
/// not depend on runtime worker threads).
#[tokio::test(flavor = "current_thread")]
async fn conformance_current_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let next = AtomicUsize::new(0);
    muster_store::conformance::run_all(|| {
        let path = dir
            .path()
            .join(format!("store-{}.db", next.fetch_add(1, Ordering::Relaxed)));
        async move { open(&path) }
    })
    .await;
}

#[tokio::test]
async fn data_survives_close_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("muster.db");
    let store = open(&path);
    let clone = store.clone();
    let a = put(&store, "a", Some("g"), json!({"v": "a"})).await;
    let b = put(&clone, "b", None, json!({"v": "b"})).await;
    let deleted = put(&store, "gone", None, json!({})).await;
    let outcome = store
        .write(vec![Write::delete(
            Collection::Registrations,
            "gone",
            Expect::Etag(deleted),
        )])
        .await
        .expect("delete");
    assert_eq!(outcome, [WriteOutcome::Deleted]);
    drop(store);
    // The clone keeps the store working.
    let c = put(&clone, "c", None, json!({"v": "c"})).await;
    drop(clone);

    // Every connection closed cleanly: the checkpointer, last to close, checkpointed and
    // removed the WAL.
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    assert!(
        !wal.exists(),
        "the WAL should be checkpointed and removed once all clones are dropped"
    );

    let store = open(&path);
    let records = store
        .list(
            Collection::Registrations,
            ListQuery {
                limit: 10,
                ..ListQuery::default()
            },
        )
        .await
        .expect("list");
    let summary: Vec<_> = records
        .iter()
        .map(|r| {
            (
                r.key.as_str(),
                r.partition.as_deref(),
                r.etag.as_str(),
                r.body.clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("a", Some("g"), a.as_str(), json!({"v": "a"})),
            ("b", None, b.as_str(), json!({"v": "b"})),
            ("c", None, c.as_str(), json!({"v": "c"})),
        ]
    );

    // The etag counter survived too: new etags are unlike any handed out before.
    let next = put(&store, "a", Some("g"), json!({"v": "a2"})).await;
    assert!(
        ![&a, &b, &c].contains(&&next),
        "etag {next} reused after reopen"
    );
}

#[tokio::test]
async fn migrations_are_recorded_and_not_reapplied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("muster.db");
    let store = open(&path);
    put(&store, "k", None, json!({})).await;
    drop(store);

    let applied = migrations(&path);
    let versions: Vec<i64> = applied.iter().map(|(v, _)| *v).collect();
    let expected: Vec<i64> = (1..=i64::from(SqliteStore::SCHEMA_VERSION)).collect();
    assert_eq!(
        versions, expected,
        "every migration recorded once, in order"
    );
    assert!(
        applied
            .iter()
            .all(|(_, at)| at.ends_with('Z') && at.len() >= 20),
        "{applied:?}"
    );

    let store = open(&path);
    assert!(store
        .get(Collection::Registrations, "k")
        .await
        .expect("get")
        .is_some());
    drop(store);
    assert_eq!(
        migrations(&path),
        applied,
        "reopening must not re-apply or re-record migrations"
    );
}

#[tokio::test]
async fn missing_migrations_are_applied_to_an_old_database() {
    // A database that only has the bookkeeping table (as if created by a build with no
    // migrations yet) gets every migration.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("muster.db");
    raw(&path)
        .execute_batch(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
        )
        .expect("create");
    let store = open(&path);
    put(&store, "k", None, json!({})).await;
    drop(store);
    assert_eq!(
        migrations(&path).len(),
        SqliteStore::SCHEMA_VERSION as usize
    );
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("muster.db");
    drop(open(&path));
    let future = i64::from(SqliteStore::SCHEMA_VERSION) + 1;
    raw(&path)
        .execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 'later')",
            [future],
        )
        .expect("insert future version");

    let err = SqliteStore::open(&path).expect_err("a database from a newer build must be refused");
    let message = err.to_string();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    assert!(
        message.contains(&format!("schema version {future}")) && message.contains("newer"),
        "the error should say the schema is newer: {message}"
    );
    // Nothing was changed by the refused open.
    assert_eq!(migrations(&path).last().map(|(v, _)| *v), Some(future));
}

#[tokio::test]
async fn creates_missing_parent_directories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("does/not/exist/yet/muster.db");
    let store = open(&path);
    put(&store, "k", None, json!({})).await;
    assert!(path.is_file());
    assert_eq!(store.path(), path);
    let mode: String = raw(&path)
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .expect("journal_mode");
    assert_eq!(mode, "wal", "the database must be in WAL mode");
}

#[tokio::test]
async fn corrupt_body_is_reported_without_its_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("muster.db");
    let store = open(&path);
    put(&store, "bad", None, json!({})).await;
    raw(&path)
        .execute(
            "UPDATE records SET body = 'secret-not-json{' WHERE key = 'bad'",
            [],
        )
        .expect("corrupt the body");

    let err = store
        .get(Collection::Registrations, "bad")
        .await
        .expect_err("get of a corrupt record");
    match &err {
        StoreError::Corrupt {
            collection, key, ..
        } => {
            assert_eq!((*collection, key.as_str()), ("registrations", "bad"));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(
        !err.to_string().contains("secret"),
        "the body leaked: {err}"
    );

    let err = store
        .list(
            Collection::Registrations,
            ListQuery {
                limit: 10,
                ..ListQuery::default()
            },
        )
        .await
        .expect_err("list over a corrupt record");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    // Writes still work and repair the record.
    put(&store, "bad", None, json!({"fixed": true})).await;
    assert!(store.get(Collection::Registrations, "bad").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_run_alongside_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir.path().join("muster.db"));
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                put(&store, &format!("k{i:03}"), None, json!({"i": i})).await;
            }
        })
    };
    let mut readers = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        readers.push(tokio::spawn(async move {
            let mut last = 0;
            for _ in 0..50 {
                let n = store
                    .count(Collection::Registrations, None)
                    .await
                    .expect("count");
                assert!(
                    n >= last,
                    "a reader saw the count go backwards ({last} -> {n})"
                );
                last = n;
            }
        }));
    }
    writer.await.expect("writer");
    for reader in readers {
        reader.await.expect("reader");
    }
    assert_eq!(
        store
            .count(Collection::Registrations, None)
            .await
            .expect("count"),
        200
    );
}

/// Rough throughput: 10,000 single-item writes from 100 concurrent tasks.
/// Run with `cargo test -p muster-store --test sqlite -- --ignored --nocapture throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "ad-hoc measurement"]
async fn throughput_10k_concurrent_single_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(&dir.path().join("muster.db")));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..100 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                let body = json!({"registrationId": format!("device-{t}-{i}"), "status": "assigned", "assignedHub": "hub.example"});
                let write = Write::put(Collection::Registrations, format!("device-{t}-{i}"), Expect::Absent, body)
                    .with_partition(Some(format!("group-{}", t % 10)));
                let outcome = store.write(vec![write]).await.expect("write");
                assert!(outcome[0].is_applied());
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let elapsed = started.elapsed();
    assert_eq!(
        store
            .count(Collection::Registrations, None)
            .await
            .expect("count"),
        10_000
    );
    eprintln!(
        "10000 single-item writes from 100 tasks: {:.2?} ({:.0} writes/s)",
        elapsed,
        10_000.0 / elapsed.as_secs_f64()
    );

    // For comparison: one task writing serially, one commit (and fsync) per write.
    let started = Instant::now();
    for i in 0..1_000 {
        let write = Write::put(
            Collection::Operations,
            format!("op-{i}"),
            Expect::Absent,
            json!({"i": i}),
        );
        store.write(vec![write]).await.expect("write");
    }
    let elapsed = started.elapsed();
    eprintln!(
        "1000 serial single-item writes from 1 task: {:.2?} ({:.0} writes/s)",
        elapsed,
        1_000.0 / elapsed.as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// Sealing at rest, file modes, old databases

/// The database file and the files SQLite keeps beside it, as a copy of the data dir would
/// hold them.
fn bytes_at_rest(path: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        if let Ok(b) = std::fs::read(&file) {
            bytes.extend_from_slice(&b);
        }
    }
    bytes
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_secrets_sealed_at_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("muster.db");
    let store = open(&path);
    muster_store::conformance::secrets_sealed_at_rest(store, || bytes_at_rest(&path)).await;
}

/// Schema version 1 exactly as the build before sealing wrote it.
const V1_SCHEMA: &str = "
    CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);
    CREATE TABLE records (
        collection TEXT NOT NULL,
        key        TEXT NOT NULL,
        partition  TEXT,
        etag       TEXT NOT NULL,
        body       TEXT NOT NULL,
        PRIMARY KEY (collection, key)
    ) WITHOUT ROWID;
    CREATE INDEX records_by_partition ON records (collection, partition, key);
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO counters (name, value) VALUES ('etag', 10);
    INSERT INTO schema_migrations (version, applied_at) VALUES (1, '2026-11-01T00:00:00.000Z');
";

const OLD_ENROLLMENT_KEY: &str = "b2xkLWVucm9sbG1lbnQta2V5LTAxMjM0NTY3ODlhYmNkZWY=";
const OLD_GROUP_KEY: &str = "b2xkLWdyb3VwLWtleS0wMTIzNDU2Nzg5YWJjZGVmZ2hpams=";
const OLD_DEVICE_KEY: &str = "b2xkLWRldmljZS1rZXktMDEyMzQ1Njc4OWFiY2RlZmdoaWo=";
const OLD_POLICY_KEY: &str = "b2xkLXBvbGljeS1rZXktMDEyMzQ1Njc4OWFiY2RlZmdoaWo=";

/// A database and key file as the build before this one left them: settings sealed, the
/// enrollment, group and hub device keys in clear, every file readable by all.
fn write_v1_database(path: &Path) -> (String, serde_json::Value) {
    use muster_store::sealing::Sealer;
    let sealer = Sealer::create(&muster_store::sqlite::key_file_path(path)).expect("key file");
    let conn = raw(path);
    conn.execute_batch(V1_SCHEMA).expect("v1 schema");
    let enrollment = json!({"registrationId": "dev-1", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": OLD_ENROLLMENT_KEY, "secondaryKey": OLD_ENROLLMENT_KEY}}});
    // Long enough to need overflow pages, with the key in them: replaced, those go to the
    // free list as they are, which is why the migration ends with a VACUUM.
    let group = json!({"aaPadding": "x".repeat(9000), "enrollmentGroupId": "g1", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": OLD_GROUP_KEY, "secondaryKey": OLD_GROUP_KEY}}});
    let device = json!({"device": {"deviceId": "dev-1", "authentication": {"type": "sas",
        "symmetricKey": {"primaryKey": OLD_DEVICE_KEY}}}, "twin": {}});
    let policies = json!([{"keyName": "provisioningserviceowner", "primaryKey": OLD_POLICY_KEY}]);
    let sealed_policies = sealer
        .seal(Collection::Settings, "policies", &policies.to_string())
        .expect("seal");
    let rows: [(&str, &str, Option<&str>, &str, String); 5] = [
        (
            "enrollments",
            "dev-1",
            None,
            "ZXRhZzE=",
            enrollment.to_string(),
        ),
        (
            "enrollment_groups",
            "g1",
            None,
            "ZXRhZzI=",
            group.to_string(),
        ),
        (
            "hub_devices",
            "hub.local/dev-1",
            Some("hub.local"),
            "ZXRhZzM=",
            device.to_string(),
        ),
        ("settings", "policies", None, "ZXRhZzQ=", sealed_policies),
        (
            "registrations",
            "dev-1",
            Some("g1"),
            "ZXRhZzU=",
            json!({"registrationId": "dev-1"}).to_string(),
        ),
    ];
    for (collection, key, partition, etag, body) in rows {
        conn.execute(
            "INSERT INTO records (collection, key, partition, etag, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![collection, key, partition, etag, body],
        )
        .expect("insert");
    }
    drop(conn);
    assert!(
        contains(&bytes_at_rest(path), OLD_GROUP_KEY.as_bytes()),
        "the old format keeps keys in clear"
    );
    (enrollment.to_string(), group)
}

fn old_keys() -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let b64 = &base64::engine::general_purpose::STANDARD;
    [
        OLD_ENROLLMENT_KEY,
        OLD_GROUP_KEY,
        OLD_DEVICE_KEY,
        OLD_POLICY_KEY,
    ]
    .iter()
    .flat_map(|k| [k.as_bytes().to_vec(), b64.decode(k).expect("base64")])
    .collect()
}

#[tokio::test]
async fn an_old_database_is_sealed_on_first_start_and_reads_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("muster.db");
    let (enrollment, group) = write_v1_database(&path);

    let store = open(&path);
    let e = store
        .get(Collection::Enrollments, "dev-1")
        .await
        .expect("get")
        .expect("enrollment");
    assert_eq!(e.body.to_string(), enrollment);
    assert_eq!(e.etag, "ZXRhZzE=", "sealing keeps etags");
    let g = store
        .get(Collection::EnrollmentGroups, "g1")
        .await
        .expect("get")
        .expect("group");
    assert_eq!(g.body, group);
    let d = store
        .list(
            Collection::HubDevices,
            ListQuery {
                partition: Some("hub.local".into()),
                after: None,
                limit: 10,
            },
        )
        .await
        .expect("list");
    assert_eq!(d.len(), 1);
    assert_eq!(
        d[0].body["device"]["authentication"]["symmetricKey"]["primaryKey"],
        OLD_DEVICE_KEY
    );
    let s = store
        .get(Collection::Settings, "policies")
        .await
        .expect("get")
        .expect("policies");
    assert_eq!(s.body[0]["primaryKey"], OLD_POLICY_KEY);
    let r = store
        .get(Collection::Registrations, "dev-1")
        .await
        .expect("get")
        .expect("record");
    assert_eq!(r.partition.as_deref(), Some("g1"));
    // Writes still work and the etag counter continues.
    let etag = put(&store, "dev-2", None, json!({})).await;
    assert!(!["ZXRhZzE=", "ZXRhZzI="].contains(&etag.as_str()));
    drop(store);

    let versions: Vec<i64> = migrations(&path).iter().map(|(v, _)| *v).collect();
    assert_eq!(
        versions,
        (1..=i64::from(SqliteStore::SCHEMA_VERSION)).collect::<Vec<_>>()
    );
    let bytes = bytes_at_rest(&path);
    for key in old_keys() {
        assert!(
            !contains(&bytes, &key),
            "a key survived the migration in clear: {}",
            String::from_utf8_lossy(&key)
        );
    }
    // And it opens again (no second migration, no second VACUUM needed).
    let store = open(&path);
    assert!(store
        .get(Collection::Enrollments, "dev-1")
        .await
        .expect("get")
        .is_some());
}

#[tokio::test]
async fn a_failure_midway_through_sealing_leaves_the_old_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("muster.db");
    write_v1_database(&path);
    let before: Vec<(String, String)> = {
        let conn = raw(&path);
        let mut stmt = conn
            .prepare("SELECT key, body FROM records ORDER BY collection, key")
            .expect("prepare");
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query");
        rows.collect::<Result<_, _>>().expect("rows")
    };
    // The group is sealed after the enrollment: fail there, as a crash would stop it.
    raw(&path)
        .execute_batch(
            "CREATE TRIGGER fail_midway BEFORE UPDATE ON records WHEN old.collection = 'enrollment_groups'
             BEGIN SELECT RAISE(ABORT, 'simulated failure'); END;",
        )
        .expect("trigger");
    let err = SqliteStore::open(&path).expect_err("the migration must fail");
    assert!(err.to_string().contains("simulated failure"), "{err}");

    let conn = raw(&path);
    let after: Vec<(String, String)> = {
        let mut stmt = conn
            .prepare("SELECT key, body FROM records ORDER BY collection, key")
            .expect("prepare");
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query");
        rows.collect::<Result<_, _>>().expect("rows")
    };
    assert_eq!(
        after, before,
        "nothing of the failed migration was committed"
    );
    assert_eq!(migrations(&path).len(), 1, "still schema version 1");
    conn.execute_batch("DROP TRIGGER fail_midway")
        .expect("drop trigger");
    drop(conn);
    let store = open(&path);
    let e = store
        .get(Collection::EnrollmentGroups, "g1")
        .await
        .expect("get")
        .expect("group");
    assert_eq!(
        e.body["attestation"]["symmetricKey"]["primaryKey"],
        OLD_GROUP_KEY
    );
}

#[tokio::test]
async fn a_missing_sealing_key_is_reported_as_that() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("muster.db");
    let store = open(&path);
    store
        .write(vec![Write::put(
            Collection::Enrollments,
            "dev-1",
            Expect::Any,
            json!({"k": 1}),
        )])
        .await
        .expect("write");
    drop(store);
    let key_file = muster_store::sqlite::key_file_path(&path);
    std::fs::remove_file(&key_file).expect("remove key");

    let err = SqliteStore::open(&path).expect_err("must not open without its key");
    assert!(
        matches!(err, StoreError::SealingKeyMissing { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.starts_with("sealing key missing: ") && message.contains("muster.db.key"),
        "{message}"
    );
    assert!(
        !key_file.exists(),
        "a missing key must not be replaced by a new one"
    );

    // Also a database of the old format, whose settings were sealed.
    let old = dir.path().join("old.db");
    write_v1_database(&old);
    std::fs::remove_file(muster_store::sqlite::key_file_path(&old)).expect("remove key");
    let err = SqliteStore::open(&old).expect_err("must not open without its key");
    assert!(
        matches!(err, StoreError::SealingKeyMissing { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_wrong_sealing_key_is_reported_as_that() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("muster.db");
    drop(open(&path));
    let other = dir.path().join("other.db");
    drop(open(&other));
    let key_file = muster_store::sqlite::key_file_path(&path);
    std::fs::copy(muster_store::sqlite::key_file_path(&other), &key_file).expect("swap key");

    let err = SqliteStore::open(&path).expect_err("must not open with another key");
    assert!(
        matches!(err, StoreError::SealingKeyMismatch { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("sealing key does not open this database"),
        "{err}"
    );

    // An old database with another key file is refused before anything is sealed.
    let old = dir.path().join("old.db");
    write_v1_database(&old);
    std::fs::copy(
        muster_store::sqlite::key_file_path(&other),
        muster_store::sqlite::key_file_path(&old),
    )
    .expect("swap key");
    let err = SqliteStore::open(&old).expect_err("must not open with another key");
    assert!(
        matches!(err, StoreError::SealingKeyMismatch { .. }),
        "{err:?}"
    );
    assert_eq!(migrations(&old).len(), 1, "nothing migrated");
}

#[cfg(unix)]
#[tokio::test]
async fn store_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("new/muster.db");
    let store = open(&path);
    put(&store, "k", None, json!({})).await;
    let files = |p: &Path| {
        ["", "-wal", "-shm", ".key"].map(|s| PathBuf::from(format!("{}{s}", p.display())))
    };
    for f in files(&path) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    assert_eq!(mode(path.parent().expect("parent")), 0o700);
    drop(store);

    // Files an older build left readable by all are restricted on open.
    let old = dir.path().join("old.db");
    write_v1_database(&old);
    for f in files(&old) {
        if f.exists() {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
    }
    let store = open(&old);
    put(&store, "k", None, json!({})).await;
    for f in files(&old) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
}

/// What the build before migration 3 left: every secret body sealed as base64 text.
fn write_v2_database(path: &Path) -> Vec<(Collection, &'static str, serde_json::Value)> {
    use muster_store::sealing::Sealer;
    let sealer = Sealer::create(&muster_store::sqlite::key_file_path(path)).expect("key file");
    let conn = raw(path);
    conn.execute_batch(V1_SCHEMA).expect("v1 schema");
    conn.execute_batch(
        "CREATE TABLE sealing (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
         INSERT INTO schema_migrations (version, applied_at) VALUES (2, '2026-12-01T00:00:00.000Z');",
    )
    .expect("v2 schema");
    conn.execute(
        "INSERT INTO sealing (name, value) VALUES ('key_check', ?1)",
        [sealer.key_check().expect("key check")],
    )
    .expect("key check");
    let records = vec![
        (
            Collection::HubDevices,
            "hub.local/dev-1",
            json!({"device": {"deviceId": "dev-1", "authentication": {"type": "sas",
                "symmetricKey": {"primaryKey": OLD_DEVICE_KEY}}}, "twin": {}}),
        ),
        (
            Collection::EnrollmentGroups,
            "g1",
            json!({"enrollmentGroupId": "g1", "attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": OLD_GROUP_KEY, "secondaryKey": OLD_GROUP_KEY}}}),
        ),
        (
            Collection::Registrations,
            "dev-1",
            json!({"registrationId": "dev-1"}),
        ),
    ];
    for (i, (collection, key, body)) in records.iter().enumerate() {
        let text = body.to_string();
        let stored = if collection.is_secret() {
            sealer.seal(*collection, key, &text).expect("seal")
        } else {
            text
        };
        conn.execute(
            "INSERT INTO records (collection, key, partition, etag, body) VALUES (?1, ?2, NULL, ?3, ?4)",
            rusqlite::params![collection.as_str(), key, format!("etag{i}"), stored],
        )
        .expect("insert");
    }
    records
}

/// `(collection, typeof(body))` of every record.
fn body_types(path: &Path) -> Vec<(String, String)> {
    let conn = raw(path);
    let mut stmt = conn
        .prepare("SELECT collection, typeof(body) FROM records ORDER BY collection, key")
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query");
    rows.collect::<Result<_, _>>().expect("rows")
}

#[tokio::test]
async fn sealed_bodies_kept_as_text_are_rewritten_as_bytes_and_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("muster.db");
    let records = write_v2_database(&path);

    let store = open(&path);
    for (i, (collection, key, body)) in records.iter().enumerate() {
        let record = store
            .get(*collection, key)
            .await
            .expect("get")
            .expect("record");
        assert_eq!(&record.body, body, "{key}");
        assert_eq!(record.etag, format!("etag{i}"), "the rewrite keeps etags");
    }
    // New writes are sealed as bytes too.
    store
        .write(vec![Write::put(
            Collection::Enrollments,
            "dev-2",
            Expect::Any,
            json!({"registrationId": "dev-2", "attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": OLD_ENROLLMENT_KEY}}}),
        )])
        .await
        .expect("write");
    drop(store);

    assert_eq!(
        body_types(&path),
        [
            ("enrollment_groups".into(), "blob".into()),
            ("enrollments".into(), "blob".into()),
            ("hub_devices".into(), "blob".into()),
            ("registrations".into(), "text".into()),
        ]
    );
    assert_eq!(
        migrations(&path).len(),
        SqliteStore::SCHEMA_VERSION as usize
    );
    let bytes = bytes_at_rest(&path);
    for key in old_keys() {
        assert!(!contains(&bytes, &key), "a key is in clear");
    }
    // And it opens again without another rewrite.
    let store = open(&path);
    assert!(store
        .get(Collection::HubDevices, "hub.local/dev-1")
        .await
        .expect("get")
        .is_some());
}

/// A new database gets 8 KiB pages, so a sealed hub device record stays in one b-tree cell
/// instead of spilling to an overflow page; an existing database keeps the page size it has.
#[tokio::test]
async fn new_databases_use_8k_pages_and_old_ones_keep_theirs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let page_size = |path: &Path| -> u32 {
        raw(path)
            .query_row("PRAGMA page_size", [], |row| row.get(0))
            .expect("page_size")
    };

    let fresh = dir.path().join("fresh.db");
    let store = open(&fresh);
    put(&store, "dev-1", None, json!({"body": "x".repeat(1_100)})).await;
    drop(store);
    assert_eq!(page_size(&fresh), muster_store::sqlite::PAGE_SIZE);
    assert_eq!(muster_store::sqlite::PAGE_SIZE, 8192);

    let old = dir.path().join("old.db");
    {
        let conn = raw(&old);
        conn.pragma_update(None, "page_size", 4096)
            .expect("page_size");
        conn.execute_batch("CREATE TABLE placeholder (x INTEGER)")
            .expect("create");
    }
    let store = open(&old);
    let etag = put(&store, "dev-2", None, json!({"n": 2})).await;
    assert!(!etag.is_empty());
    drop(store);
    assert_eq!(page_size(&old), 4096);
}

/// Search at fleet scale: 1,000,000 registration records (device ids differing from
/// registration ids), then searches by registration id and by device id, exact and by prefix.
/// Figures in BENCHMARKS.md ("Registration record search"); run with
/// `cargo test -p muster-store --release --test sqlite search_at_a_million -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "ad-hoc measurement"]
async fn search_at_a_million_records() {
    use muster_store::{SearchField, SearchQuery};
    const N: usize = 1_000_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir.path().join("muster.db"));
    let started = Instant::now();
    for chunk in 0..N / 5_000 {
        let writes = (chunk * 5_000..(chunk + 1) * 5_000)
            .map(|i| {
                let rid = format!("sensor-{i:07}");
                let body = json!({"registrationId": rid, "deviceId": format!("Dev-{:07}", N - i), "status": "assigned", "assignedHub": "hub.example", "lastUpdatedDateTimeUtc": "2026-12-03T20:00:00.0000000Z"});
                Write::put(Collection::Registrations, rid, Expect::Any, body)
                    .with_partition(Some(format!("group-{}", i % 100)))
            })
            .collect();
        store.write(writes).await.expect("write");
    }
    eprintln!(
        "seeded {N} registration records in {:.1?}",
        started.elapsed()
    );
    for (field, prefix, want) in [
        (SearchField::Key, "sensor-0765432", 1),
        (SearchField::Key, "sensor-07654", 51),
        (SearchField::DeviceId, "dev-0234568", 1),
        (SearchField::DeviceId, "DEV-02345", 51),
        (SearchField::DeviceId, "nothing", 0),
    ] {
        // The first run of each warms the page cache; the figure is the best of five.
        let mut best = std::time::Duration::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            let found = store
                .search(
                    Collection::Registrations,
                    SearchQuery {
                        field,
                        prefix: prefix.into(),
                        limit: 51,
                    },
                )
                .await
                .expect("search");
            best = best.min(t.elapsed());
            assert_eq!(found.len(), want, "{field:?} {prefix}");
        }
        eprintln!("search {field:?} {prefix:?} among {N}: {best:.2?}");
    }
}
