//! The writer thread: the only connection that writes, with group commit.
//!
//! Callers send a [`Request`] (a prepared batch and a oneshot for the answer) over an
//! unbounded channel. The thread blocks for the first request, then drains whatever else is
//! queued (up to [`MAX_GROUP`]) and applies the whole group in one `BEGIN IMMEDIATE`
//! transaction, each batch inside its own savepoint, so one batch failing with a database
//! error rolls back only that batch. Answers are sent only after `COMMIT` returned, i.e. after
//! the WAL was synced (`synchronous=FULL`). When every sender is gone the thread finishes the
//! queued requests, closes its connection and exits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use muster_proto::log_limit::LogLimiter;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::oneshot;

use super::body::StoredBody;
use super::db_err;
use crate::{Collection, Expect, Lease, StoreError, WriteOutcome};

/// One counter per collection, moved by every group that wrote to it (see `Store::changes`).
pub(super) struct ChangeCounters(Vec<AtomicU64>);

impl ChangeCounters {
    pub(super) fn new() -> Self {
        Self(Collection::ALL.iter().map(|_| AtomicU64::new(0)).collect())
    }

    pub(super) fn get(&self, collection: Collection) -> u64 {
        self.0
            .get(collection.index())
            .map_or(0, |c| c.load(Ordering::Acquire))
    }

    fn bump(&self, name: &str) {
        if let Some(i) = Collection::ALL.iter().position(|c| c.as_str() == name) {
            if let Some(c) = self.0.get(i) {
                c.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

/// Most batches committed in one transaction; bounds the latency one group adds.
const MAX_GROUP: usize = 256;

pub(super) type Reply = Result<Vec<WriteOutcome>, StoreError>;

/// A batch on its way to the writer thread, with its bodies already serialized.
pub(super) struct Request {
    pub(super) writes: Vec<PreparedWrite>,
    pub(super) reply: oneshot::Sender<Reply>,
}

pub(super) struct PreparedWrite {
    pub(super) collection: &'static str,
    pub(super) key: String,
    pub(super) expect: Expect,
    pub(super) op: PreparedOp,
    pub(super) lease: Option<Lease>,
    pub(super) required: bool,
}

pub(super) enum PreparedOp {
    Put {
        partition: Option<String>,
        body: StoredBody,
    },
    Delete,
}

/// The per-database etag counter; `last` is the value of the last etag handed out.
pub(super) struct EtagCounter {
    last: u64,
}

impl EtagCounter {
    pub(super) fn load(conn: &Connection) -> Result<Self, StoreError> {
        let last: i64 = conn
            .query_row(
                "SELECT value FROM counters WHERE name = 'etag'",
                [],
                |row| row.get(0),
            )
            .map_err(|e| db_err("reading the etag counter", e))?;
        let last = u64::try_from(last)
            .map_err(|_| StoreError::Backend(format!("the etag counter is negative ({last})")))?;
        Ok(Self { last })
    }

    /// A new etag, never handed out before by this database.
    fn issue(&mut self) -> String {
        self.last += 1;
        format_etag(self.last)
    }
}

/// DPS-style opaque etag: base64 of a quoted GUID-like string carrying the counter.
pub(crate) fn format_etag(counter: u64) -> String {
    let text = format!(
        "\"{:08x}-0000-0000-0000-{:012x}\"",
        counter >> 48,
        counter & 0xffff_ffff_ffff
    );
    base64(text.as_bytes())
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sextet = |n: u32, shift: u32| char::from(ALPHABET[((n >> shift) & 63) as usize]);
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        out.push(sextet(n, 18));
        out.push(sextet(n, 12));
        out.push(if chunk.len() > 1 { sextet(n, 6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(n, 0) } else { '=' });
    }
    out
}

static GROUP_FAILED: LogLimiter = LogLimiter::new(Duration::from_secs(10));
static BATCH_FAILED: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// The writer thread's main loop.
pub(super) fn run(
    mut conn: Connection,
    requests: Receiver<Request>,
    mut etags: EtagCounter,
    changes: std::sync::Arc<ChangeCounters>,
    checkpoints: std::sync::Arc<super::checkpointer::Signal>,
) {
    while let Ok(first) = requests.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match requests.try_recv() {
                Ok(request) => group.push(request),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let started = Instant::now();
        let result = commit_group(&mut conn, &group, &mut etags);
        let (elapsed, batches, ok) = (started.elapsed(), group.len(), result.is_ok());
        // Before anyone hears of the write, and also after a failed commit (conservative).
        for request in &group {
            for w in &request.writes {
                changes.bump(w.collection);
            }
        }
        match result {
            Ok(replies) => {
                for (request, reply) in group.into_iter().zip(replies) {
                    // The caller may have gone away; its write is committed regardless.
                    let _ = request.reply.send(reply);
                }
            }
            Err(e) => {
                // A full disk fails every commit: one line per interval, with the count.
                if let Some(suppressed) = GROUP_FAILED.admit() {
                    tracing::warn!(error = %e, batches = group.len(), suppressed, "store group commit failed");
                }
                for request in group {
                    let _ = request.reply.send(Err(e.duplicate()));
                }
            }
        }
        record_commit(elapsed, batches, ok, &checkpoints);
        super::checkpointer::catch_up(&conn, &checkpoints);
    }
    tracing::debug!("store writer thread exiting");
}

/// Histogram of each group commit on the writer thread (the transaction and its fsync), by
/// `result` (`ok`, `error`).
pub const COMMIT_SECONDS: &str = "muster_store_commit_duration_seconds";

/// A commit slower than this is logged at debug level with its size.
const SLOW_COMMIT: Duration = Duration::from_millis(10);

/// Records a group commit's duration (after its callers were answered) and tells the checkpointer of it.
fn record_commit(
    elapsed: Duration,
    batches: usize,
    ok: bool,
    checkpoints: &super::checkpointer::Signal,
) {
    let result = if ok { "ok" } else { "error" };
    metrics::histogram!(COMMIT_SECONDS, "result" => result).record(elapsed);
    if elapsed >= SLOW_COMMIT {
        tracing::debug!(
            batches,
            micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            "slow store group commit"
        );
    }
    if ok {
        checkpoints.committed();
    }
}

/// Applies every batch of the group in one transaction. `Err` means nothing was committed.
///
/// Each batch must be undone alone when it fails, but a savepoint per batch makes SQLite copy
/// every page the batch touches into a statement journal first (8 KiB a page, several pages a
/// registration, and a temporary file once it outgrows memory). So batches go straight into
/// the transaction, and only when one fails with a database error is the whole transaction
/// rolled back and the group applied again with a savepoint per batch. A refused
/// [required](crate::Write::required) write needs no savepoint when it is its batch's first
/// write (nothing of the batch was applied yet); a batch with a required write further on
/// gets one.
fn commit_group(
    conn: &mut Connection,
    group: &[Request],
    etags: &mut EtagCounter,
) -> Result<Vec<Reply>, StoreError> {
    let first_etag = etags.last;
    match commit_group_in(conn, group, etags, Undo::WhenNeeded)? {
        Some(replies) => Ok(replies),
        None => {
            // Rolled back: the etags drawn in it were never committed.
            etags.last = first_etag;
            Ok(commit_group_in(conn, group, etags, Undo::EveryBatch)?.unwrap_or_default())
        }
    }
}

/// Which batches of a group run inside a savepoint of their own.
#[derive(Clone, Copy, PartialEq)]
enum Undo {
    /// Only batches with a required write after their first write; a database error in any
    /// other batch abandons the attempt (`Ok(None)`).
    WhenNeeded,
    /// Every batch: a failed batch is undone alone.
    EveryBatch,
}

fn needs_savepoint(writes: &[PreparedWrite]) -> bool {
    writes.iter().skip(1).any(|w| w.required)
}

fn commit_group_in(
    conn: &mut Connection,
    group: &[Request],
    etags: &mut EtagCounter,
    undo: Undo,
) -> Result<Option<Vec<Reply>>, StoreError> {
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| db_err("beginning the write transaction", e))?;
    let first_etag = etags.last;
    let mut replies = Vec::with_capacity(group.len());
    for request in group {
        if undo == Undo::WhenNeeded && !needs_savepoint(&request.writes) {
            match apply_batch(&tx, &request.writes, etags) {
                Ok(Applied::All(outcomes) | Applied::None(outcomes)) => {
                    replies.push(Ok(outcomes));
                }
                // Dropping the transaction rolls it back.
                Err(_) => return Ok(None),
            }
            continue;
        }
        let savepoint = tx
            .savepoint()
            .map_err(|e| db_err("opening a batch savepoint", e))?;
        match apply_batch(&savepoint, &request.writes, etags) {
            Ok(Applied::All(outcomes)) => {
                savepoint
                    .commit()
                    .map_err(|e| db_err("releasing a batch savepoint", e))?;
                replies.push(Ok(outcomes));
            }
            Ok(Applied::None(outcomes)) => {
                savepoint
                    .finish()
                    .map_err(|e| db_err("rolling back a refused batch", e))?;
                replies.push(Ok(outcomes));
            }
            Err(e) => {
                if let Some(suppressed) = BATCH_FAILED.admit() {
                    tracing::warn!(error = %e, suppressed, "store batch failed and was rolled back");
                }
                // Rolls back to the savepoint and releases it.
                savepoint
                    .finish()
                    .map_err(|e| db_err("rolling back a failed batch", e))?;
                replies.push(Err(e));
            }
        }
    }
    if etags.last != first_etag {
        let last = i64::try_from(etags.last)
            .map_err(|_| StoreError::Backend("the etag counter overflowed".into()))?;
        tx.execute(
            "UPDATE counters SET value = ?1 WHERE name = 'etag'",
            params![last],
        )
        .map_err(|e| db_err("saving the etag counter", e))?;
    }
    tx.commit()
        .map_err(|e| db_err("committing the write transaction", e))?;
    tracing::trace!(batches = group.len(), "store group committed");
    Ok(Some(replies))
}

/// What became of a batch: applied, or rolled back because a required write was refused.
enum Applied {
    All(Vec<WriteOutcome>),
    None(Vec<WriteOutcome>),
}

/// Applies one batch, each write seeing the effect of the earlier ones.
fn apply_batch(
    conn: &Connection,
    writes: &[PreparedWrite],
    etags: &mut EtagCounter,
) -> Result<Applied, StoreError> {
    let mut outcomes = Vec::with_capacity(writes.len());
    for write in writes {
        let context = |what: &str| format!("{what} {}/{}", write.collection, write.key);
        let current: Option<String> = conn
            .prepare_cached("SELECT etag FROM records WHERE collection = ?1 AND key = ?2")
            .and_then(|mut stmt| {
                stmt.query_row(params![write.collection, write.key], |row| row.get(0))
                    .optional()
            })
            .map_err(|e| db_err(&context("reading"), e))?;

        let refused = match (&write.expect, &current) {
            (Expect::Any, _) | (Expect::Absent, None) => None,
            (Expect::Absent, Some(_)) => Some(WriteOutcome::AlreadyExists),
            (Expect::Etag(_), None) => Some(WriteOutcome::NotFound),
            (Expect::Etag(expected), Some(actual)) if expected != actual => {
                Some(WriteOutcome::EtagMismatch)
            }
            (Expect::Etag(_), Some(_)) => None,
        };
        if let Some(outcome) = refused {
            if write.required {
                return Ok(Applied::None(crate::rolled_back(
                    writes.len(),
                    outcomes.len(),
                    outcome,
                )));
            }
            outcomes.push(outcome);
            continue;
        }

        let outcome = match &write.op {
            PreparedOp::Delete if current.is_none() => WriteOutcome::NotFound,
            PreparedOp::Delete => {
                conn.prepare_cached("DELETE FROM records WHERE collection = ?1 AND key = ?2")
                    .and_then(|mut stmt| stmt.execute(params![write.collection, write.key]))
                    .map_err(|e| db_err(&context("deleting"), e))?;
                WriteOutcome::Deleted
            }
            PreparedOp::Put { partition, body } => {
                let etag = etags.issue();
                let (owner, until) = write
                    .lease
                    .as_ref()
                    .map(|l| (l.owner.as_str(), l.until_ms))
                    .unzip();
                // A put without a lease keeps the record's claim (see `Store::claim`).
                conn.prepare_cached(
                    "INSERT INTO records
                         (collection, key, partition, etag, body, claim_owner, claim_until)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (collection, key) DO UPDATE SET
                         partition = excluded.partition,
                         etag = excluded.etag,
                         body = excluded.body,
                         claim_owner = COALESCE(excluded.claim_owner, records.claim_owner),
                         claim_until = COALESCE(excluded.claim_until, records.claim_until)",
                )
                .and_then(|mut stmt| {
                    stmt.execute(params![
                        write.collection,
                        write.key,
                        partition,
                        etag,
                        body,
                        owner,
                        until
                    ])
                })
                .map_err(|e| db_err(&context("writing"), e))?;
                WriteOutcome::Written { etag }
            }
        };
        outcomes.push(outcome);
    }
    Ok(Applied::All(outcomes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("\"a\"", "ImEi"),
        ];
        for (input, expected) in cases {
            assert_eq!(base64(input.as_bytes()), expected, "base64({input:?})");
        }
    }

    fn put(key: &str, required: bool) -> PreparedWrite {
        PreparedWrite {
            collection: "enrollments",
            key: key.into(),
            expect: if required {
                Expect::Absent
            } else {
                Expect::Any
            },
            op: PreparedOp::Put {
                partition: None,
                body: StoredBody::Text("{}".into()),
            },
            lease: None,
            required,
        }
    }

    fn request(writes: Vec<PreparedWrite>) -> (Request, oneshot::Receiver<Reply>) {
        let (reply, answer) = oneshot::channel();
        (Request { writes, reply }, answer)
    }

    /// Batches share the group's transaction without savepoints; a database error in one of
    /// them reruns the group with a savepoint per batch, so only that batch is lost.
    #[test]
    fn a_failing_batch_is_undone_alone_without_savepoints_for_the_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.db");
        let mut conn = super::super::open_writer(&path).expect("open");
        let entropy: std::sync::Arc<dyn muster_proto::runtime::Entropy> =
            std::sync::Arc::new(muster_proto::runtime::SeededEntropy::new(1));
        let sealer = crate::sealing::Sealer::load_or_create_with(&dir.path().join("k"), entropy)
            .expect("sealer");
        super::super::schema::migrate(&mut conn, &path, &sealer).expect("migrate");
        conn.execute_batch(
            "CREATE TEMP TRIGGER boom BEFORE INSERT ON records WHEN NEW.key = 'boom'
             BEGIN SELECT RAISE(ABORT, 'boom'); END;",
        )
        .expect("trigger");
        let mut etags = EtagCounter::load(&conn).expect("etags");
        let existing = request(vec![put("taken", false)]).0;
        commit_group(&mut conn, &[existing], &mut etags).expect("seed");

        let group = [
            request(vec![put("a", false)]).0,
            request(vec![put("x", false), put("boom", false)]).0,
            // Refused first write: nothing of the batch applied, no savepoint needed.
            request(vec![put("taken", true), put("y", false)]).0,
            // Refused later write: the savepoint undoes `z`.
            request(vec![put("z", false), put("taken", true)]).0,
            request(vec![put("c", false)]).0,
        ];
        let replies = commit_group(&mut conn, &group, &mut etags).expect("group");
        assert!(
            matches!(&replies[0], Ok(o) if o[0].is_applied()),
            "{:?}",
            replies[0]
        );
        assert!(replies[1].is_err(), "{:?}", replies[1]);
        assert!(
            matches!(&replies[2], Ok(o) if *o == [WriteOutcome::AlreadyExists, WriteOutcome::RolledBack]),
            "{:?}",
            replies[2]
        );
        assert!(
            matches!(&replies[3], Ok(o) if *o == [WriteOutcome::RolledBack, WriteOutcome::AlreadyExists]),
            "{:?}",
            replies[3]
        );
        assert!(
            matches!(&replies[4], Ok(o) if o[0].is_applied()),
            "{:?}",
            replies[4]
        );
        let keys: Vec<String> = conn
            .prepare("SELECT key FROM records WHERE collection = 'enrollments' ORDER BY key")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .expect("keys");
        assert_eq!(keys, ["a", "c", "taken"]);
        // The attempt abandoned for the error drew etags; the rerun draws them again, and the
        // saved counter is the in-memory one.
        let stored: i64 = conn
            .query_row("SELECT value FROM counters WHERE name = 'etag'", [], |r| {
                r.get(0)
            })
            .expect("counter");
        assert_eq!(u64::try_from(stored).ok(), Some(etags.last));
    }

    #[test]
    fn etags_are_distinct_and_dps_shaped() {
        assert_eq!(
            format_etag(1),
            base64(b"\"00000000-0000-0000-0000-000000000001\"")
        );
        assert_ne!(format_etag(1), format_etag(2));
        assert_ne!(format_etag(1), format_etag(1 << 48));
    }
}
