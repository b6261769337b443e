//! WAL checkpoints run on the store's checkpointer thread, never inside a commit: the WAL
//! grows past SQLite's automatic checkpoint size while the database file stays as it was,
//! then the checkpointer copies it back and empties it; closing the store checkpoints too.

use std::path::Path;
use std::time::{Duration, Instant};

use muster_store::sqlite::{wal_path, CheckpointPolicy};
use muster_store::{Collection, Expect, SqliteStore, Store, Write, WriteOutcome};
use serde_json::json;

/// SQLite's default `wal_autocheckpoint`, in pages, and Muster's page size.
const SQLITE_AUTOCHECKPOINT_PAGES: u64 = 1000;
const PAGE: u64 = muster_store::sqlite::PAGE_SIZE as u64;

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// One write per call, so one group commit each: a 40 KB body spills over several pages.
async fn put(store: &SqliteStore, i: usize) {
    let body = json!({ "registrationId": format!("dev-{i}"), "filler": "x".repeat(40_000) });
    let write = Write::put(
        Collection::Registrations,
        format!("dev-{i}"),
        Expect::Any,
        body,
    );
    match store.write(vec![write]).await.expect("write").as_slice() {
        [WriteOutcome::Written { .. }] => {}
        other => panic!("unexpected outcome {other:?}"),
    }
}

/// Polls `what` until it holds or ten seconds pass.
async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_leave_the_wal_to_the_checkpointer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ckpt.db");
    let policy = CheckpointPolicy {
        commits: 300,
        restart_frames: u64::MAX,
        truncate_above: 6 * 1024 * 1024,
    };
    let store = SqliteStore::open_with_policy(&path, policy).expect("open");
    let wal = wal_path(&path);
    let db_before = size(&path);

    // 200 commits, fewer than the policy's 300: no checkpoint may have run, by anyone.
    for i in 0..200 {
        put(&store, i).await;
    }
    let wal_grown = size(&wal);
    assert!(
        wal_grown > SQLITE_AUTOCHECKPOINT_PAGES * PAGE,
        "the WAL ({wal_grown} bytes) should have grown past SQLite's automatic checkpoint"
    );
    assert_eq!(
        size(&path),
        db_before,
        "a commit copied pages into the database file (a checkpoint ran inside a commit)"
    );

    // The 300th commit wakes the checkpointer: it copies the WAL into the database file.
    for i in 200..300 {
        put(&store, i).await;
    }
    wait_for("the checkpointer to copy the WAL", || {
        size(&path) > db_before + 200 * 40_000
    })
    .await;
    // The file being over the limit, it asks the writer to empty it after its next group (the
    // writer answers first, then truncates). The request follows the copy by a moment, so a
    // commit may come too early: then the next one triggers it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut next = 300;
    loop {
        assert!(Instant::now() < deadline, "the WAL was never emptied");
        put(&store, next).await;
        next += 1;
        let settle = Instant::now() + Duration::from_secs(1);
        while size(&wal) != 0 && Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if size(&wal) == 0 {
            break;
        }
    }

    // Still one store: reads and writes carry on, and everything is there after a reopen.
    let record = store
        .get(Collection::Registrations, "dev-150")
        .await
        .expect("get")
        .expect("dev-150");
    assert_eq!(record.body["registrationId"], "dev-150");
    drop(store);
    assert_eq!(
        reopened_count(&path).await,
        u64::try_from(next).expect("count")
    );
}

/// The number of registration records a fresh open of `path` finds.
async fn reopened_count(path: &std::path::Path) -> u64 {
    let store = SqliteStore::open(path).expect("reopen");
    store
        .count(Collection::Registrations, None)
        .await
        .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_store_checkpoints_and_removes_the_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("close.db");
    let policy = CheckpointPolicy {
        commits: u64::MAX,
        restart_frames: u64::MAX,
        truncate_above: u64::MAX,
    };
    let store = SqliteStore::open_with_policy(&path, policy).expect("open");
    for i in 0..50 {
        put(&store, i).await;
    }
    let wal = wal_path(&path);
    assert!(size(&wal) > 50 * 40_000, "the commits are in the WAL");
    drop(store);
    assert!(
        !wal.exists(),
        "the last connection to close removes the WAL"
    );
    assert!(
        size(&path) > 50 * 40_000,
        "the records are in the database file"
    );
    assert_eq!(reopened_count(&path).await, 50);
}
