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

    // Every connection closed cleanly: the writer, last to close, checkpointed and removed the WAL.
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
