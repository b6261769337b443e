//! A real full disk: a small tmpfs (needs root; skipped, saying why, where it cannot be
//! mounted). Opening on it says plainly that the disk is full; a write that runs out of space
//! is `StoreError::Unavailable` (retryable), and the same store writes again once space returns.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use muster_store::{Collection, Expect, SqliteStore, Store, StoreError, Unavailability, Write};
use serde_json::json;

/// A mounted tmpfs, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Writes a filler file until the file system is full.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).expect("filler");
    let chunk = vec![0u8; 16 * 1024];
    loop {
        match f.write_all(&chunk).and_then(|()| f.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => return,
            Err(e) => panic!("filling the tmpfs: {e}"),
        }
    }
}

#[tokio::test]
async fn a_full_disk_is_reported_plainly_and_is_retryable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _tmpfs = match Tmpfs::mount(dir.path(), "4m") {
        Ok(t) => t,
        Err(why) => {
            println!("skipped: cannot mount a tmpfs here ({why})");
            return;
        }
    };
    let db = dir.path().join("muster.db");
    let filler = dir.path().join("filler");

    // Start-up on a full disk: the first one (nothing there yet), and a restart.
    let full_start = |what: &str| {
        let err = SqliteStore::open(&db).expect_err("no space to open");
        let text = err.to_string();
        assert!(
            matches!(
                err,
                StoreError::Unavailable {
                    cause: Unavailability::DiskFull,
                    ..
                }
            ),
            "{what}: {text}"
        );
        assert!(text.contains("no space is left"), "{what}: {text}");
        println!("{what} on a full disk: {text}");
    };
    fill(&filler);
    full_start("first start");
    std::fs::remove_file(&filler).expect("free space");
    for f in std::fs::read_dir(dir.path()).expect("list").flatten() {
        std::fs::remove_file(f.path()).expect("clean up");
    }
    drop(SqliteStore::open(&db).expect("opens with space"));
    fill(&filler);
    full_start("restart");

    // Space returns: the store opens and writes; then the disk fills under it.
    std::fs::remove_file(&filler).expect("free space");
    let store = SqliteStore::open(&db).expect("opens with space");
    let put = |key: &str, size: usize| {
        Write::put(
            Collection::Registrations,
            key,
            Expect::Any,
            json!({"blob": "x".repeat(size)}),
        )
    };
    store.write(vec![put("a", 10)]).await.expect("first write");
    fill(&filler);
    let err = store
        .write(vec![put("b", 512 * 1024)])
        .await
        .expect_err("no space for the write");
    assert!(err.is_unavailable(), "{err}");
    assert!(store
        .get(Collection::Registrations, "b")
        .await
        .expect("read")
        .is_none());

    // Space returns again: the same store writes, no reopening.
    std::fs::remove_file(&filler).expect("free space");
    store
        .write(vec![put("b", 512 * 1024)])
        .await
        .expect("writes once space returned");
    assert!(store
        .get(Collection::Registrations, "b")
        .await
        .expect("read")
        .is_some());
}
