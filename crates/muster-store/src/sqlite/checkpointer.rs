//! The checkpointer thread: copies the WAL back into the database file, off the writer.
//!
//! # Why
//!
//! SQLite's default (`wal_autocheckpoint=1000`) runs a checkpoint inside the commit that
//! pushes the WAL past 1,000 pages: the committing connection writes those pages into the
//! database file and fsyncs it before `COMMIT` returns. Here that connection is the writer
//! thread, so every registration waiting in the next group commit waited for the checkpoint
//! too. Measured under `https-keepalive` at half the maximum rate (release build, `perf trace`
//! of the writer's fsyncs): a checkpoint every 88 ms (median), each adding 1.5 ms (median,
//! 6.2 ms at most) to its commit. Real, but small beside the WAL's own fsync spikes (up to
//! 98 ms) and CPU contention on a shared machine; this module takes what it can of it off
//! the writer: the copy and its fsync run here, the writer keeps a catch-up of about 1 ms
//! (median) per cycle (see below).
//!
//! # How
//!
//! Every read-write connection opens with `wal_autocheckpoint=0` (see `super::open_writer`),
//! so a commit only appends to the WAL and fsyncs it. This thread owns one more read-write
//! connection. The writer tells it of every committed group ([`Signal::committed`]); once
//! [`Policy::commits`] groups have committed since its last pass it runs a `PASSIVE`
//! checkpoint, which copies what no reader still needs and fsyncs the database file without
//! waiting for (or blocking) the writer or the readers.
//!
//! Copying is not enough to keep the file small: SQLite starts the WAL over from its
//! beginning only when a write transaction begins while *every* frame is copied. Under load
//! the writer commits again while this thread copies, so that moment never comes, and a
//! `RESTART` or `TRUNCATE` checkpoint from this thread starves (the writer holds its lock
//! almost all the time; measured: the WAL grew to 90 MB and each `TRUNCATE` waited out its
//! busy timeout, stalling the writer 100-300 ms). So once a pass finds at least
//! [`Policy::restart_frames`] frames in the WAL, this thread asks the writer to catch up:
//! between two groups the writer runs a `PASSIVE` checkpoint itself ([`catch_up`]), which
//! copies only the frames committed since this thread's pass (typically a few groups' worth)
//! and fsyncs the database file once; its next transaction then starts the WAL over. Should
//! that keep failing (a reader holding an old snapshot), the file could grow without bound:
//! past [`Policy::truncate_above`] bytes the writer's catch-up is a `TRUNCATE`, which waits
//! for readers at most [`TRUNCATE_BUSY_TIMEOUT`] and empties the file.
//!
//! # Durability is unchanged
//!
//! With `synchronous=FULL` a transaction is durable once its frames are in the WAL and the
//! WAL is fsynced, which `COMMIT` does before the writer answers anyone. A checkpoint only
//! copies frames that are already durable into the database file; SQLite advances the
//! "backfilled" mark only after fsyncing the database file, and truncates or overwrites the
//! WAL only past that mark. A crash at any moment (mid-checkpoint included) leaves every
//! committed frame either in the WAL, from which the next open recovers it, or already in the
//! fsynced database file. Who runs the checkpoint, and when, changes none of that; it only
//! changes whose latency pays for it.
//!
//! # Shutdown
//!
//! `Checkpointer::stop` (called after the writer thread has exited) wakes the thread, which
//! runs a final `TRUNCATE` checkpoint, closes its connection (the last one, so SQLite removes
//! the WAL) and exits; `stop` joins it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::{db_err, open_writer, sidecar};
use crate::StoreError;

/// Longest a `TRUNCATE` catch-up on the writer waits for readers (only when the WAL is past
/// its size limit); then the writer's usual busy timeout applies again.
pub const TRUNCATE_BUSY_TIMEOUT: Duration = Duration::from_millis(200);

/// When the checkpointer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Group commits since the last checkpoint that start a `PASSIVE` checkpoint.
    pub commits: u64,
    /// Frames in the WAL after a pass that make the writer catch up, so the WAL starts over.
    pub restart_frames: u64,
    /// A WAL file larger than this (bytes) makes the writer's catch-up a `TRUNCATE`.
    pub truncate_above: u64,
}

impl Default for Policy {
    /// A group commit of a registration burst writes 10-30 pages of 8 KiB: a pass every 32
    /// groups, the WAL starting over at about SQLite's own 1,000 pages, truncated past 64 MiB.
    fn default() -> Self {
        Self {
            commits: 32,
            restart_frames: 1000,
            truncate_above: 64 * 1024 * 1024,
        }
    }
}

/// Histogram of each checkpoint's duration, by `mode` (`passive`, `truncate`).
pub const CHECKPOINT_SECONDS: &str = "muster_store_checkpoint_duration_seconds";

#[derive(Default)]
struct State {
    /// Group commits since the checkpointer last looked.
    commits: u64,
    stop: bool,
}

/// What the writer thread uses to tell the checkpointer of its commits, and the
/// checkpointer to ask the writer for a catch-up.
pub(super) struct Signal {
    state: Mutex<State>,
    wake: Condvar,
    /// Group commits that make a checkpoint due: the checkpointer is woken only then, not on
    /// every commit of the writer's hot path.
    threshold: u64,
    /// `NO_CATCH_UP`, `CATCH_UP` or `TRUNCATE`: what the writer does after its next group.
    catch_up: AtomicU8,
}

const NO_CATCH_UP: u8 = 0;
const CATCH_UP: u8 = 1;
const TRUNCATE: u8 = 2;

impl Signal {
    fn new(threshold: u64) -> Self {
        Self {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            threshold: threshold.max(1),
            catch_up: AtomicU8::new(NO_CATCH_UP),
        }
    }

    /// One group committed.
    pub(super) fn committed(&self) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.commits += 1;
        if state.commits >= self.threshold {
            self.wake.notify_one();
        }
    }

    /// Waits until the threshold of commits accumulated or stop was asked; returns whether
    /// to stop.
    fn wait(&self) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return true;
        };
        while !state.stop && state.commits < self.threshold {
            state = match self.wake.wait(state) {
                Ok(state) => state,
                Err(_) => return true,
            };
        }
        state.commits = 0;
        state.stop
    }

    fn stop(&self) {
        let mut state = match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        state.stop = true;
        self.wake.notify_one();
    }
}

/// The running checkpointer thread.
pub(super) struct Checkpointer {
    signal: Arc<Signal>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Opens the checkpointer's connection and starts its thread.
    pub(super) fn start(path: &Path, policy: Policy) -> Result<Self, StoreError> {
        let conn = open_writer(path)?;
        let signal = Arc::new(Signal::new(policy.commits));
        let wal = sidecar(path, "-wal");
        let thread_signal = signal.clone();
        let thread = std::thread::Builder::new()
            .name("muster-store-checkpointer".into())
            .spawn(move || run(conn, &wal, &thread_signal, policy))
            .map_err(|e| {
                StoreError::Backend(format!("starting the store checkpointer thread: {e}"))
            })?;
        Ok(Self {
            signal,
            thread: Some(thread),
        })
    }

    /// The writer's end.
    pub(super) fn signal(&self) -> Arc<Signal> {
        self.signal.clone()
    }

    /// Final checkpoint, then the thread exits; waits for it.
    pub(super) fn stop(&mut self) {
        self.signal.stop();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the store checkpointer thread panicked");
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Clone, Copy)]
enum Mode {
    /// The checkpointer's pass.
    Passive,
    /// The writer's `PASSIVE` catch-up.
    CatchUp,
    /// Empties the WAL: the writer's catch-up past the size limit, or the final one.
    Truncate,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Passive => "passive",
            Mode::CatchUp => "catch_up",
            Mode::Truncate => "truncate",
        }
    }
}

fn run(conn: Connection, wal: &Path, signal: &Signal, policy: Policy) {
    loop {
        let stop = signal.wait();
        if stop {
            if let Err(e) = checkpoint(&conn, Mode::Truncate) {
                tracing::warn!(error = %e, "final WAL checkpoint failed");
            }
            break;
        }
        let frames = match checkpoint(&conn, Mode::Passive) {
            Ok(frames) => frames,
            Err(e) => {
                tracing::warn!(error = %e, "WAL checkpoint failed");
                continue;
            }
        };
        let wanted = if wal_size(wal) > policy.truncate_above {
            TRUNCATE
        } else if frames >= policy.restart_frames {
            CATCH_UP
        } else {
            NO_CATCH_UP
        };
        if wanted != NO_CATCH_UP {
            signal.catch_up.fetch_max(wanted, Ordering::AcqRel);
        }
    }
    drop(conn);
    tracing::debug!("store checkpointer thread exiting");
}

/// Called by the writer between two groups: runs the catch-up the checkpointer asked for, if
/// any (see the module doc). Copies only what the checkpointer's last pass left.
pub(super) fn catch_up(conn: &Connection, signal: &Signal) {
    let mode = match signal.catch_up.swap(NO_CATCH_UP, Ordering::AcqRel) {
        NO_CATCH_UP => return,
        TRUNCATE => Mode::Truncate,
        _ => Mode::CatchUp,
    };
    if let Err(e) = checkpoint(conn, mode) {
        tracing::warn!(error = %e, "WAL catch-up checkpoint on the writer failed");
    }
    if matches!(mode, Mode::Truncate) {
        if let Err(e) = conn.busy_timeout(super::BUSY_TIMEOUT) {
            tracing::warn!(error = %e, "restoring the writer's busy timeout failed");
        }
    }
}

/// Runs one checkpoint; records its duration; returns the frames in the WAL. A checkpoint that
/// could not finish because a reader or the writer held on (busy) is not an error: the next
/// one continues.
fn checkpoint(conn: &Connection, mode: Mode) -> Result<u64, StoreError> {
    let started = Instant::now();
    let sql = match mode {
        Mode::Passive | Mode::CatchUp => "PRAGMA wal_checkpoint(PASSIVE)",
        Mode::Truncate => {
            conn.busy_timeout(TRUNCATE_BUSY_TIMEOUT)
                .map_err(|e| db_err("setting the checkpoint busy timeout", e))?;
            "PRAGMA wal_checkpoint(TRUNCATE)"
        }
    };
    let (busy, log, copied): (i64, i64, i64) = conn
        .query_row(sql, [], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .map_err(|e| db_err("checkpointing the WAL", e))?;
    let elapsed = started.elapsed();
    metrics::histogram!(CHECKPOINT_SECONDS, "mode" => mode.as_str()).record(elapsed);
    tracing::debug!(
        mode = mode.as_str(),
        busy = busy != 0,
        wal_frames = log,
        copied_frames = copied,
        micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        "WAL checkpoint"
    );
    Ok(u64::try_from(log).unwrap_or(0))
}

/// The WAL file's size in bytes (0 when it does not exist).
fn wal_size(wal: &Path) -> u64 {
    fs::metadata(wal).map_or(0, |m| m.len())
}

/// The WAL file of the database at `db` (for tests and diagnostics).
pub fn wal_path(db: &Path) -> PathBuf {
    sidecar(db, "-wal")
}
