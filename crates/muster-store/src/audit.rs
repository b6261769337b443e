//! The audit log: one [`AuditEntry`] per service-API or console write, in
//! [`Collection::AuditLog`].
//!
//! Keys are `{unix milliseconds, 15 digits}-{sequence, 10 digits}-{8 random hex}`, so listing
//! by key is listing by time, and two nodes sharing a store never write the same key. An entry
//! says who (the policy), from where (api, console, cli), what (method, route template, the
//! affected id), when and with which result; it never holds a key, a token or a body.
//!
//! Retention: [`prune_before`] deletes every entry older than a cutoff, in batches, walking
//! the keys from the oldest (so it reads only what it deletes).

use std::sync::atomic::{AtomicU64, Ordering};

use muster_proto::runtime::{random_hex, Clock, Entropy};
use muster_proto::Timestamp;

pub use muster_proto::audit::{AuditEntry, AuditSource};

use crate::{Collection, Expect, ListQuery, Store, StoreError, Write};

/// Orders entries written by this process within one millisecond.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// The key prefix of every entry written at or after `time` (and before the next
/// millisecond): a bound for listing from a time.
pub fn time_prefix(time: Timestamp) -> String {
    format!("{:015}", time.0.timestamp_millis().max(0))
}

/// The time an entry key starts with.
pub fn key_time(key: &str) -> Option<Timestamp> {
    key.get(..15)
        .and_then(|ms| ms.parse().ok())
        .and_then(Timestamp::from_unix_millis)
}

fn entry_key(time: Timestamp, entropy: &dyn Entropy) -> String {
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed) % 10_000_000_000;
    format!("{}-{seq:010}-{}", time_prefix(time), random_hex(entropy, 4))
}

/// The store write that records `entry` (to go in a batch of its own or with the change).
pub fn append_write(entry: &AuditEntry, entropy: &dyn Entropy) -> Result<Write, StoreError> {
    let key = entry_key(entry.time, entropy);
    let body = serde_json::to_value(entry).map_err(|e| StoreError::Corrupt {
        collection: Collection::AuditLog.as_str(),
        key: key.clone(),
        reason: e.to_string(),
    })?;
    Ok(Write::put(Collection::AuditLog, key, Expect::Any, body))
}

/// Records `entry`; durable when this returns.
pub async fn append(
    store: &dyn Store,
    entry: &AuditEntry,
    entropy: &dyn Entropy,
) -> Result<(), StoreError> {
    store.write(vec![append_write(entry, entropy)?]).await?;
    Ok(())
}

/// Which entries [`list`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Entries at or after this time.
    pub from: Option<Timestamp>,
    /// Entries before this time.
    pub to: Option<Timestamp>,
    /// Only this policy (case-insensitive).
    pub policy: Option<String>,
    /// Only this affected id (case-insensitive).
    pub id: Option<String>,
}

impl AuditFilter {
    fn matches(&self, e: &AuditEntry) -> bool {
        let same = |want: &Option<String>, have: &Option<String>| match want {
            None => true,
            Some(w) => have.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(w)),
        };
        same(&self.policy, &e.policy) && same(&self.id, &e.id)
    }
}

/// A page of entries, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    pub entries: Vec<(String, AuditEntry)>,
    /// The last key examined when more entries may follow: pass it as `after` for the next
    /// page. A page may hold fewer than `limit` entries and still have a next one, because
    /// each call examines at most `scan_limit` records (the filter is applied while reading).
    pub next_after: Option<String>,
}

/// Entries matching `filter` after the key `after`, at most `limit` of them, examining at
/// most `scan_limit` records so a narrow filter over a long log stays cheap per call.
pub async fn list(
    store: &dyn Store,
    filter: &AuditFilter,
    after: Option<String>,
    limit: usize,
    scan_limit: usize,
) -> Result<AuditPage, StoreError> {
    let limit = limit.max(1);
    // Every key of a millisecond sorts after its bare 15-digit prefix, every earlier one
    // before it, so the prefix is the exclusive bound that starts at `from`.
    let from_bound = filter.from.map(time_prefix);
    let mut cursor = match (after, from_bound) {
        (Some(a), Some(f)) => Some(a.max(f)),
        (a, f) => a.or(f),
    };
    let to_prefix = filter.to.map(time_prefix);
    let mut entries = Vec::new();
    let mut scanned = 0usize;
    loop {
        let batch = (scan_limit - scanned).clamp(1, 500);
        let rows = store
            .list(
                Collection::AuditLog,
                ListQuery {
                    partition: None,
                    after: cursor.clone(),
                    limit: batch,
                },
            )
            .await?;
        let short = rows.len() < batch;
        for row in rows {
            scanned += 1;
            if to_prefix
                .as_deref()
                .is_some_and(|to| row.key.as_str() >= to)
            {
                return Ok(AuditPage {
                    entries,
                    next_after: None,
                });
            }
            cursor = Some(row.key.clone());
            let entry: AuditEntry =
                serde_json::from_value(row.body).map_err(|e| StoreError::Corrupt {
                    collection: Collection::AuditLog.as_str(),
                    key: row.key.clone(),
                    reason: e.to_string(),
                })?;
            if filter.matches(&entry) {
                entries.push((row.key, entry));
                if entries.len() == limit {
                    return Ok(AuditPage {
                        entries,
                        next_after: cursor,
                    });
                }
            }
        }
        if short {
            return Ok(AuditPage {
                entries,
                next_after: None,
            });
        }
        if scanned >= scan_limit {
            return Ok(AuditPage {
                entries,
                next_after: cursor,
            });
        }
    }
}

/// Deletes every entry written before `cutoff`, oldest first, `batch` at a time; returns how
/// many were deleted.
pub async fn prune_before(
    store: &dyn Store,
    cutoff: Timestamp,
    batch: usize,
) -> Result<usize, StoreError> {
    let bound = time_prefix(cutoff);
    let batch = batch.max(1);
    let mut deleted = 0;
    loop {
        let rows = store
            .list(
                Collection::AuditLog,
                ListQuery {
                    partition: None,
                    after: None,
                    limit: batch,
                },
            )
            .await?;
        let old: Vec<Write> = rows
            .iter()
            .filter(|r| r.key.as_str() < bound.as_str())
            .map(|r| Write::delete(Collection::AuditLog, r.key.clone(), Expect::Any))
            .collect();
        if old.is_empty() {
            return Ok(deleted);
        }
        let n = old.len();
        store.write(old).await?;
        deleted += n;
        if n < batch {
            return Ok(deleted);
        }
    }
}

/// Deletes the entries older than `retention_days` by `clock`; returns how many.
pub async fn prune_expired(
    store: &dyn Store,
    clock: &dyn Clock,
    retention_days: u32,
) -> Result<usize, StoreError> {
    let cutoff = Timestamp(clock.now().0 - chrono::Duration::days(i64::from(retention_days)));
    prune_before(store, cutoff, 500).await
}
