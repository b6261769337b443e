//! Muster's storage interface and its embedded SQLite implementation.
//!
//! The store is a small document store: records live in [`Collection`]s, each record has a
//! key (the case-folded id), an optional partition (for example the enrollment group of a
//! registration record), a JSON body and an etag that the store assigns on every write.
//! Typed meaning (enrollments, groups, registration records, ...) belongs to the callers; this
//! keeps the interface small enough that a PostgreSQL implementation can follow without
//! touching them.
//!
//! Layout:
//! - [`Store`]: the interface every implementation provides, including what several nodes
//!   sharing a store need: claims with leases on records ([`Store::claim`], [`Lease`]) and
//!   shared rate limits ([`Store::take_token`]).
//! - [`audit`] — the audit log of service-API and console writes: entries, chronological
//!   keys, filtered listing and retention pruning.
//! - [`bus`] — [`bus::Bus`], messages between the nodes sharing a store (sessions, method
//!   calls, live streams), and [`bus::MemoryBus`] for several nodes in one process.
//! - [`issued`] — issued-certificate records: record one, look one up by serial, list them
//!   (optionally one registration's) in pages, revoke one.
//! - [`records`] — typed access (enrollments, groups, registration records) with etags.
//! - [`sealing`] — every collection that holds a key (enrollments, groups, hub devices,
//!   settings, linked hubs) sealed at rest, with the key check that tells a wrong key file.
//! - [`sqlite`] — the default implementation (one file under the data dir, WAL, migrations;
//!   a writer thread with group commit, a checkpointer thread copying the WAL back;
//!   `sqlite::snapshot` copies it consistently while a server runs, for `muster backup`).
//! - `postgres` (feature `postgres`) — PostgreSQL, for several nodes sharing one database;
//!   `postgres::changes` tells every node of writes to cached collections (LISTEN/NOTIFY),
//!   `postgres::bus` carries the [`bus::Bus`] over LISTEN/NOTIFY.
//! - [`conformance`] (feature `conformance`): the shared test suite every implementation
//!   must pass; with `postgres` too, `test_cluster` starts a throwaway PostgreSQL.
//!
//! Guarantees every implementation must keep:
//! - a write is durable before the call returns;
//! - a batch is applied in one transaction: items whose expectation fails are reported and
//!   skipped, the others are applied together or not at all;
//! - a store that cannot serve now but may later (full disk, locked, read-only, I/O error)
//!   answers [`StoreError::Unavailable`], never a partial write, so callers answer 503;
//! - listing is ordered by key, so key-based paging is stable;
//! - [`Store::search`] finds registration records by a prefix of their key or of their
//!   `deviceId` through an index, never a scan;
//! - the body of a record in a secret collection ([`Collection::is_secret`]) never reaches
//!   storage in clear: it is sealed with [`sealing::Sealer`], and a database that holds sealed
//!   records opens only with its own key file.

use async_trait::async_trait;
use serde_json::Value;

pub mod audit;
pub mod bus;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod issued;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod records;
pub mod sealing;
pub mod sqlite;
#[cfg(all(feature = "conformance", feature = "postgres"))]
pub mod test_cluster;

#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// The kinds of record Muster keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Collection {
    /// Individual enrollments, keyed by lower-cased registration id.
    Enrollments,
    /// Enrollment groups, keyed by lower-cased group id.
    EnrollmentGroups,
    /// Device registration records, keyed by lower-cased registration id, partitioned by the
    /// lower-cased enrollment group id when the device registered through a group.
    Registrations,
    /// Service settings (ID scope, access policies, ...), keyed by name.
    Settings,
    /// Hubs linked to the DPS, keyed by host name.
    LinkedHubs,
    /// Registration operations in flight or recently finished, keyed by operation id.
    Operations,
    /// Devices of the built-in hub, keyed by lower-cased device id, partitioned by hub.
    HubDevices,
    /// Verified and unverified CA certificates, keyed by name.
    CaCertificates,
    /// Device-to-cloud messages (telemetry) of the built-in hub, keyed
    /// `{hub host}/{device id}/{sequence number, 20 digits}` (lower-cased), partitioned by
    /// `{hub host}/{device id}`.
    HubTelemetry,
    /// Cloud-to-device messages of the built-in hub waiting for delivery, keyed and
    /// partitioned as [`Collection::HubTelemetry`].
    HubC2dMessages,
    /// Per-device counters of the built-in hub (the last telemetry and cloud-to-device
    /// sequence numbers), keyed `{kind}/{hub host}/{device id}` (lower-cased).
    HubCounters,
    /// One marker per registration whose assignment was accepted but not finished (a
    /// throttled hub, or a crash in between), keyed like its registration record; written and
    /// removed in the same transaction as the record, so a restart reads only these.
    PendingAssignments,
    /// Hub devices about to be removed by a deprovisioning whose record is already gone,
    /// keyed `{hub host}/{device id}` (lower-cased); written in the same transaction as the
    /// record's removal and deleted once the hub confirms, so a restart finishes them.
    HubRemovals,
    /// Service-API and console writes (who, what, when, result), keyed
    /// `{unix milliseconds, 15 digits}-{sequence, 10 digits}-{random}` so key order is time
    /// order; see [`audit`]. Holds no keys or bodies.
    AuditLog,
    /// Certificates Muster issued for CSRs, keyed by serial number (upper-case hex),
    /// partitioned by the lower-cased registration id; see [`issued`].
    IssuedCertificates,
}

impl Collection {
    pub const ALL: &'static [Collection] = &[
        Collection::Enrollments,
        Collection::EnrollmentGroups,
        Collection::Registrations,
        Collection::Settings,
        Collection::LinkedHubs,
        Collection::Operations,
        Collection::HubDevices,
        Collection::CaCertificates,
        Collection::HubTelemetry,
        Collection::HubC2dMessages,
        Collection::HubCounters,
        Collection::PendingAssignments,
        Collection::HubRemovals,
        Collection::AuditLog,
        Collection::IssuedCertificates,
    ];

    /// Position in [`Collection::ALL`].
    pub fn index(&self) -> usize {
        Collection::ALL
            .iter()
            .position(|c| c == self)
            .unwrap_or_default()
    }

    /// Stable name used in storage; never change one once released.
    pub fn as_str(&self) -> &'static str {
        match self {
            Collection::Enrollments => "enrollments",
            Collection::EnrollmentGroups => "enrollment_groups",
            Collection::Registrations => "registrations",
            Collection::Settings => "settings",
            Collection::LinkedHubs => "linked_hubs",
            Collection::Operations => "operations",
            Collection::HubDevices => "hub_devices",
            Collection::CaCertificates => "ca_certificates",
            Collection::HubTelemetry => "hub_telemetry",
            Collection::HubC2dMessages => "hub_c2d_messages",
            Collection::HubCounters => "hub_counters",
            Collection::PendingAssignments => "pending_assignments",
            Collection::HubRemovals => "hub_removals",
            Collection::AuditLog => "audit_log",
            Collection::IssuedCertificates => "issued_certificates",
        }
    }
}

/// A stored record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub key: String,
    pub partition: Option<String>,
    /// Assigned by the store; changes on every write.
    pub etag: String,
    pub body: Value,
}

/// What must hold for a write to be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Apply unconditionally.
    Any,
    /// Apply only if no record has this key.
    Absent,
    /// Apply only if the record exists with exactly this etag.
    Etag(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum WriteOp {
    Put {
        partition: Option<String>,
        body: Value,
    },
    /// A put whose body the caller serialized itself ([`Write::put_serialized`]): no
    /// `Value` tree is built for bodies written on every registration.
    PutJson {
        partition: Option<String>,
        json: String,
    },
    Delete,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    pub collection: Collection,
    pub key: String,
    pub expect: Expect,
    pub op: WriteOp,
    /// For a put: the record is claimed with this lease as it is written (see
    /// [`Store::claim`]), so work a node saves for itself is never claimable by another
    /// node in between. `None` keeps whatever claim the record has (none for a new one).
    pub lease: Option<Lease>,
    /// When this write's expectation fails, the whole batch is rolled back: its outcome
    /// says why and every other write's is [`WriteOutcome::RolledBack`]. For batches whose
    /// writes only make sense together (a registration record and the hub device it names).
    /// Cheapest as a batch's first write: SQLite then needs no savepoint for the batch.
    pub required: bool,
}

/// A node's claim on a record: the node's id and when the claim lapses, in Unix
/// milliseconds of the caller's clock (every node must use the same time base).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    pub until_ms: i64,
}

impl Write {
    pub fn put(
        collection: Collection,
        key: impl Into<String>,
        expect: Expect,
        body: Value,
    ) -> Self {
        Self {
            collection,
            key: key.into(),
            expect,
            op: WriteOp::Put {
                partition: None,
                body,
            },
            lease: None,
            required: false,
        }
    }

    /// A put of `body` serialized straight to JSON text.
    pub fn put_serialized<T: serde::Serialize + ?Sized>(
        collection: Collection,
        key: impl Into<String>,
        expect: Expect,
        body: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            collection,
            key: key.into(),
            expect,
            op: WriteOp::PutJson {
                partition: None,
                json: serde_json::to_string(body)?,
            },
            lease: None,
            required: false,
        })
    }

    pub fn delete(collection: Collection, key: impl Into<String>, expect: Expect) -> Self {
        Self {
            collection,
            key: key.into(),
            expect,
            op: WriteOp::Delete,
            lease: None,
            required: false,
        }
    }

    /// Makes the whole batch depend on this write's expectation (see [`Write::required`]).
    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }

    /// Claims the record for `lease.owner` as it is written (puts only).
    pub fn with_lease(mut self, lease: Lease) -> Self {
        self.lease = Some(lease);
        self
    }

    pub fn with_partition(mut self, partition: Option<String>) -> Self {
        match &mut self.op {
            WriteOp::Put { partition: p, .. } | WriteOp::PutJson { partition: p, .. } => {
                *p = partition;
            }
            WriteOp::Delete => {}
        }
        self
    }
}

/// The result of one write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Put applied; the record's new etag.
    Written { etag: String },
    /// Delete applied.
    Deleted,
    /// `Expect::Absent` failed: the record exists.
    AlreadyExists,
    /// `Expect::Etag` failed: the record has another etag.
    EtagMismatch,
    /// `Expect::Etag` failed, or a delete found nothing: no such record.
    NotFound,
    /// Not applied: a [required](Write::required) write of the same batch was refused.
    RolledBack,
}

/// The outcomes of a batch rolled back because its write `refused_at` was refused with
/// `refusal`: that refusal, and [`WriteOutcome::RolledBack`] for every other write.
pub(crate) fn rolled_back(
    writes: usize,
    refused_at: usize,
    refusal: WriteOutcome,
) -> Vec<WriteOutcome> {
    let mut outcomes = vec![WriteOutcome::RolledBack; writes];
    if let Some(o) = outcomes.get_mut(refused_at) {
        *o = refusal;
    }
    outcomes
}

impl WriteOutcome {
    pub fn is_applied(&self) -> bool {
        matches!(self, WriteOutcome::Written { .. } | WriteOutcome::Deleted)
    }
}

/// Which records `list` returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only records with this partition.
    pub partition: Option<String>,
    /// Only records whose key sorts after this one (the previous page's last key).
    pub after: Option<String>,
    /// At most this many records.
    pub limit: usize,
}

/// The field [`Store::search`] matches a prefix of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchField {
    /// The record key, compared byte-wise with the prefix as given (keys of registration
    /// records are already lower-cased registration ids).
    Key,
    /// The body's `deviceId`, ASCII-lower-cased; the prefix is lower-cased too. Indexed for
    /// [`Collection::Registrations`] only: any other collection is refused.
    DeviceId,
}

/// Which records [`Store::search`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchQuery {
    pub field: SearchField,
    /// Records whose field starts with this (empty: every record).
    pub prefix: String,
    /// At most this many records.
    pub limit: usize,
}

impl SearchQuery {
    /// The exclusive upper bound of the prefix range: every string that starts with `prefix`
    /// sorts (byte-wise) below `prefix` followed by U+10FFFF, the largest code point.
    pub fn upper_bound(prefix: &str) -> String {
        format!("{prefix}\u{10FFFF}")
    }

    /// Refuses a field the store keeps no index for in `collection`.
    pub fn check(&self, collection: Collection) -> Result<(), StoreError> {
        match (self.field, collection) {
            (SearchField::DeviceId, c) if c != Collection::Registrations => {
                Err(StoreError::Backend(format!(
                    "{} cannot be searched by device id (only registration records can)",
                    c.as_str()
                )))
            }
            _ => Ok(()),
        }
    }

    /// The prefix as the store compares it.
    pub fn folded_prefix(&self) -> String {
        match self.field {
            SearchField::Key => self.prefix.clone(),
            SearchField::DeviceId => self.prefix.to_ascii_lowercase(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Backend(String),
    #[error("stored record {collection}/{key} is corrupt: {reason}")]
    Corrupt {
        collection: &'static str,
        key: String,
        reason: String,
    },
    #[error("the store is closed")]
    Closed,
    /// The database holds sealed records but the key file beside it is gone.
    #[error(
        "sealing key missing: {} (the database holds sealed records; restore the key file \
         that was kept with it)",
        path.display()
    )]
    SealingKeyMissing { path: std::path::PathBuf },
    /// The key file is not the one the database was sealed with.
    #[error(
        "sealing key does not open this database: {} was not sealed with {}",
        db.display(),
        key.display()
    )]
    SealingKeyMismatch {
        key: std::path::PathBuf,
        db: std::path::PathBuf,
    },
    /// The store cannot serve the request now but may later without a restart: a full disk,
    /// a database locked by another process, a read-only file, an I/O error. Devices and
    /// service clients get 503 with `retry-after` for it, never a 500.
    #[error("the store is unavailable: {cause}: {detail}")]
    Unavailable {
        cause: Unavailability,
        /// What was being done and the backend's own words; never record bodies.
        detail: String,
    },
}

impl StoreError {
    /// Whether retrying later may succeed (see [`StoreError::Unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// A copy for each caller of a failed group commit (the error itself is not `Clone`
    /// because backends may carry sources).
    pub fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Unavailable { cause, detail } => StoreError::Unavailable {
                cause: *cause,
                detail: detail.clone(),
            },
            StoreError::Closed => StoreError::Closed,
            other => StoreError::Backend(other.to_string()),
        }
    }
}

/// Why the store is unavailable; each says in plain words what an operator can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailability {
    /// No space left on the file system holding the database.
    DiskFull,
    /// Another connection or process holds a lock for longer than the busy timeout.
    Locked,
    /// The database file or its directory is read-only.
    ReadOnly,
    /// The file system reported an I/O error.
    Io,
    /// The database file (or its WAL) cannot be opened.
    CannotOpen,
    /// The database server cannot be reached, refuses connections now or is shutting down.
    Unreachable,
}

impl std::fmt::Display for Unavailability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unavailability::DiskFull => "the disk holding the database is full",
            Unavailability::Locked => "the database is locked by another connection or process",
            Unavailability::ReadOnly => "the database is read-only",
            Unavailability::Io => "the disk reported an I/O error",
            Unavailability::CannotOpen => "the database file cannot be opened",
            Unavailability::Unreachable => "the database server cannot be reached",
        })
    }
}

/// The storage interface. Implementations are cheap to clone (`Arc` inside) and usable from
/// any task.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, collection: Collection, key: &str) -> Result<Option<Record>, StoreError>;

    /// Applies `writes` in one transaction and returns one outcome per write, in order.
    async fn write(&self, writes: Vec<Write>) -> Result<Vec<WriteOutcome>, StoreError>;

    /// Records ordered by key.
    async fn list(
        &self,
        collection: Collection,
        query: ListQuery,
    ) -> Result<Vec<Record>, StoreError>;

    /// Records whose [`SearchField`] starts with the query's prefix, ordered by that field,
    /// then by key: an index range scan in every implementation (the key's primary index; an
    /// expression index on registration records' `deviceId`), so one answer costs the same at
    /// a million records as at ten.
    async fn search(
        &self,
        collection: Collection,
        query: SearchQuery,
    ) -> Result<Vec<Record>, StoreError>;

    /// Number of records, optionally within one partition.
    async fn count(
        &self,
        collection: Collection,
        partition: Option<&str>,
    ) -> Result<u64, StoreError>;

    /// Claims up to `limit` records of `collection` for `owner` until `until_ms`, and returns
    /// them in key order: records nobody claimed, records whose lease lapsed (`until_ms <=
    /// now_ms`) and records `owner` already holds. Of several nodes claiming at once, each
    /// record goes to exactly one (PostgreSQL: `FOR UPDATE SKIP LOCKED`; SQLite: one write
    /// transaction). A claim does not change a record's etag or body; a put keeps it unless
    /// the put carries its own lease ([`Write::with_lease`]); a delete ends it.
    async fn claim(
        &self,
        collection: Collection,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError>;

    /// Extends `owner`'s leases on `keys` to `until_ms` and returns the keys it still holds
    /// (in key order). A key another node claimed after the lease lapsed, or that is gone,
    /// is not renewed: the caller must stop working on it.
    async fn renew(
        &self,
        collection: Collection,
        owner: &str,
        keys: &[String],
        until_ms: i64,
    ) -> Result<Vec<String>, StoreError>;

    /// Ends `owner`'s leases on `keys` (others' leases are left alone), so any node may
    /// claim them at once.
    async fn release(
        &self,
        collection: Collection,
        owner: &str,
        keys: &[String],
    ) -> Result<(), StoreError>;

    /// Takes one token of the shared rate limit `name`: at most `rate` per second, with a
    /// burst of one second's worth, counted over every process using this store, at time
    /// `now_ms` (Unix milliseconds; a time before the bucket's last refill counts as that
    /// time). `Ok(Some(taken))` when the store shares limits between processes; `Ok(None)`
    /// (the default) when it does not, so the caller limits in process (a store only one
    /// process uses, like SQLite).
    async fn take_token(
        &self,
        name: &str,
        rate: u32,
        now_ms: i64,
    ) -> Result<Option<bool>, StoreError> {
        let _ = (name, rate, now_ms);
        Ok(None)
    }

    /// A counter that moves whenever a write to `collection` may have committed, before the
    /// writer hears of it; callers may keep what they decoded from the collection while it
    /// stands still. `None` (the default) means this store cannot tell, so nothing may be
    /// kept: a store shared by several processes must return `None` or a shared counter.
    fn changes(&self, collection: Collection) -> Option<u64> {
        let _ = collection;
        None
    }

    /// The message bus between the nodes sharing this store ([`bus`]); `None` (the default)
    /// for a store one process uses alone, where everything stays in that process.
    fn bus(&self) -> Option<std::sync::Arc<dyn bus::Bus>> {
        None
    }
}
