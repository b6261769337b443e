//! PostgreSQL implementation of [`crate::Store`], for several Muster nodes sharing one
//! database (feature `postgres`).
//!
//! # Layout
//!
//! The same document model as the SQLite store: one table,
//! `muster_records(collection, key, partition, etag, body)`, primary key `(collection, key)`,
//! an index on `(collection, partition, key)`. Keys and partitions use the `C` collation, so
//! listing is in byte order like SQLite's and Rust's `str`. A body is JSON text in `body`,
//! except in secret collections: there it is sealed bytes ([`Sealer::seal_bytes`], as the
//! SQLite store keeps them) in `sealed` (`BYTEA`), sealed before it leaves the process with the
//! key file every node is given (the database keeps only the key check, in `muster_sealing`).
//! Exactly one of the two columns is set (a `CHECK`). Sealing nonces come from the
//! [`Entropy`] passed to [`PostgresStore::open_with_entropy`].
//! Etags come from the sequence `muster_etag`, which every node shares, rendered as the SQLite
//! store renders its counter. Collections are stored under [`Collection::as_str`], the one
//! place that names them.
//!
//! - `connect` — the URL, its TLS options (rustls) and the password kept out of messages;
//! - `schema` — migrations and the key check, once per database under an advisory lock;
//! - `errors` — which PostgreSQL errors are [`StoreError::Unavailable`].
//!
//! # Writes
//!
//! A batch is one transaction (read committed). Each item first locks its row
//! (`SELECT ... FOR UPDATE`), so an etag expectation is checked against a row nobody else can
//! change before the commit; a create (`Expect::Absent`) is an `INSERT ... ON CONFLICT DO
//! NOTHING`, so of two nodes creating the same key exactly one wins. Two batches that lock
//! the same rows in opposite order may deadlock: PostgreSQL aborts one, and it is retried
//! whole a few times before the caller hears [`StoreError::Unavailable`]. The commit returns
//! once PostgreSQL has made the transaction durable (`synchronous_commit`, per the server).
//!
//! # Claims
//!
//! `claim_owner`/`claim_until` (migration 2) say which node works on a record until when.
//! [`Store::claim`] is one `UPDATE` over a `SELECT ... FOR UPDATE SKIP LOCKED`: rows another
//! node is claiming or writing are skipped, so each row goes to exactly one claimer and
//! none waits. A write locks its rows `FOR UPDATE` as above, so a claim never interleaves
//! with one.
//!
//! # Shared rate limits
//!
//! [`Store::take_token`] keeps one token bucket per name in `muster_rate_limits` (migration
//! 3) and takes a token with one `INSERT ... ON CONFLICT DO UPDATE ... WHERE ... RETURNING`:
//! the row lock orders the nodes, so their sum never exceeds the rate.
//!
//! # Several processes
//!
//! [`Store::changes`] counts the writes of every node to the configuration collections
//! (enrollment groups, linked hubs, settings, CA certificates) through `LISTEN`/`NOTIFY`, so
//! callers may cache what they decoded of those; see `changes` for what it guarantees. For
//! every other collection it answers `None`: callers keep no decoded copy.
//!
//! - `changes` — the cross-node change counters and their listening connection.
//! - `bus` — [`Store::bus`]: messages between the nodes (`NOTIFY muster_bus`, large ones
//!   through `muster_bus_spill`), for what lives in a node's memory.

mod bus;
mod changes;
mod connect;
mod errors;
mod schema;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use muster_proto::runtime::{Entropy, OsEntropy};

use crate::sealing::Sealer;
use crate::sqlite::format_etag;
use crate::{
    Collection, Expect, Lease, ListQuery, Record, SearchField, SearchQuery, Store, StoreError,
    Write, WriteOp, WriteOutcome,
};
pub use bus::{BUS_LISTENER_NAME, INLINE_MAX as BUS_INLINE_MAX};
use changes::Changes;
pub use changes::LISTENER_NAME;
pub use connect::is_postgres_url;
use errors::{is_retryable_conflict, pg_err, pool_err};

/// Connections each node keeps to the database at most.
const POOL_SIZE: usize = 16;
/// How long a request waits for a free connection before the store reports unavailable.
const POOL_WAIT: Duration = Duration::from_secs(5);
/// Whole-transaction retries after a deadlock or serialization failure.
const CONFLICT_RETRIES: usize = 3;

/// The PostgreSQL store. Cheap to clone; all clones share one connection pool.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    sealer: Sealer,
    /// The URL without its password.
    display: String,
    changes: Arc<Changes>,
    /// Listens for other nodes' changes; aborted when the store goes.
    listener: tokio::task::JoinHandle<()>,
    /// This node's end of the bus between the nodes.
    bus: Arc<bus::PgBus>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("database", &self.inner.display)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// The schema version this build creates and understands.
    pub const SCHEMA_VERSION: u32 = schema::SCHEMA_VERSION;

    /// Connects to the database at `url`, applies any missing migrations (once, whichever
    /// node gets there first) and checks the sealing key.
    ///
    /// `key_path` is the sealing key file every node of the installation shares. A database
    /// that has a key check opens only with the key that made it
    /// ([`StoreError::SealingKeyMismatch`], or [`StoreError::SealingKeyMissing`] when the file
    /// is absent); a new database takes the key at `key_path`, created if missing. Fails on a
    /// database written by a newer Muster. Sealing nonces (and a new key file's key) come
    /// from the operating system.
    pub async fn open(url: &str, key_path: &Path) -> Result<PostgresStore, StoreError> {
        Self::open_with_entropy(url, key_path, Arc::new(OsEntropy)).await
    }

    /// [`PostgresStore::open`], with sealing nonces and a new key file's key from `entropy`.
    pub async fn open_with_entropy(
        url: &str,
        key_path: &Path,
        entropy: Arc<dyn Entropy>,
    ) -> Result<PostgresStore, StoreError> {
        let target = connect::parse(url)?;
        let database = target.display.clone();
        let context = |what: &str| format!("opening PostgreSQL database {database}: {what}");
        let (mut client, connection) = target
            .config
            .connect(target.tls.clone())
            .await
            .map_err(|e| pg_err(&context("connecting"), &e))?;
        let connection = tokio::spawn(connection);
        let entropy_for_bus = entropy.clone();
        let sealer = schema::prepare(&mut client, &database, key_path, entropy).await;
        drop(client);
        // The connection ends once the client is gone; its own error is of no interest then.
        let _ = connection.await;
        let sealer = sealer?;

        let manager = Manager::from_config(
            target.config.clone(),
            target.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .recycle_timeout(Some(POOL_WAIT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Backend(context(&format!("building the pool: {e}"))))?;
        let changes = Arc::new(Changes::default());
        let listener = changes::spawn_listener(&target, changes.clone());
        let mut node_id = [0u8; 8];
        entropy_for_bus.fill(&mut node_id);
        let bus = Arc::new(bus::PgBus::start(
            &target,
            pool.clone(),
            u64::from_be_bytes(node_id),
        ));
        tracing::debug!(database = %database, "opened PostgreSQL store");
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                pool,
                sealer,
                display: database,
                changes,
                listener,
                bus,
            }),
        })
    }

    /// The database, as `postgres://user@host:port/dbname` (no password).
    pub fn display(&self) -> &str {
        &self.inner.display
    }

    /// Copies records of `collection` into the store as they are, etags included (the
    /// `muster store migrate` path; bodies are sealed here like any write). Every key must be
    /// new: an existing one fails the whole call and nothing of it is written. The etag
    /// sequence is moved past every imported etag, so etags stay unique.
    pub async fn import(
        &self,
        collection: Collection,
        records: &[Record],
    ) -> Result<(), StoreError> {
        let context = |what: &str| format!("importing into {}: {what}", collection.as_str());
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| pg_err(&context("beginning"), &e))?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO muster_records (collection, key, partition, etag, body, sealed)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await
            .map_err(|e| pg_err(&context("preparing"), &e))?;
        let mut highest = 0u64;
        for record in records {
            let body = serialize(&self.inner.sealer, collection, &record.key, &record.body)?;
            tx.execute(
                &insert,
                &[
                    &collection.as_str(),
                    &record.key,
                    &record.partition,
                    &record.etag,
                    &body.text(),
                    &body.sealed(),
                ],
            )
            .await
            .map_err(|e| pg_err(&context(&format!("writing {}", record.key)), &e))?;
            highest = highest.max(etag_counter(&record.etag).unwrap_or(0));
        }
        if Changes::counts(collection) {
            notify(&tx, collection.as_str()).await?;
            self.inner.changes.bump(collection);
        }
        if highest > 0 {
            let highest = i64::try_from(highest)
                .map_err(|_| StoreError::Backend(context("an etag counter overflows")))?;
            tx.execute(
                "SELECT setval('muster_etag', GREATEST($1::BIGINT, \
                 (SELECT last_value FROM muster_etag)))",
                &[&highest],
            )
            .await
            .map_err(|e| pg_err(&context("moving the etag sequence"), &e))?;
        }
        tx.commit()
            .await
            .map_err(|e| pg_err(&context("committing"), &e))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.inner
            .pool
            .get()
            .await
            .map_err(|e| pool_err("getting a database connection", e))
    }

    async fn write_once(&self, writes: &[PreparedWrite]) -> Result<Vec<WriteOutcome>, StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| pg_err("beginning the write transaction", &e))?;
        let puts = writes
            .iter()
            .filter(|w| matches!(w.op, PreparedOp::Put { .. }))
            .count();
        let mut etags = Vec::with_capacity(puts);
        if puts > 0 {
            let reserve = tx
                .prepare_cached("SELECT nextval('muster_etag') FROM generate_series(1, $1::BIGINT)")
                .await
                .map_err(|e| pg_err("preparing the etag query", &e))?;
            let rows = tx
                .query(&reserve, &[&i64::try_from(puts).unwrap_or(i64::MAX)])
                .await
                .map_err(|e| pg_err("drawing etags", &e))?;
            etags.extend(rows.iter().map(|row| row.get::<_, i64>(0)));
        }
        let mut etags = etags.into_iter();
        let lock = tx
            .prepare_cached(
                "SELECT etag FROM muster_records WHERE collection = $1 AND key = $2 FOR UPDATE",
            )
            .await
            .map_err(|e| pg_err("preparing the row lock", &e))?;

        let mut outcomes = Vec::with_capacity(writes.len());
        for write in writes {
            let context = |what: &str| format!("{what} {}/{}", write.collection, write.key);
            let current: Option<String> = tx
                .query_opt(&lock, &[&write.collection, &write.key])
                .await
                .map_err(|e| pg_err(&context("reading"), &e))?
                .map(|row| row.get(0));
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
                    return rolled_back_tx(tx, writes.len(), outcomes.len(), outcome).await;
                }
                outcomes.push(outcome);
                continue;
            }
            let outcome = match &write.op {
                PreparedOp::Delete if current.is_none() => WriteOutcome::NotFound,
                PreparedOp::Delete => {
                    let delete = tx
                        .prepare_cached(
                            "DELETE FROM muster_records WHERE collection = $1 AND key = $2",
                        )
                        .await
                        .map_err(|e| pg_err(&context("preparing to delete"), &e))?;
                    tx.execute(&delete, &[&write.collection, &write.key])
                        .await
                        .map_err(|e| pg_err(&context("deleting"), &e))?;
                    WriteOutcome::Deleted
                }
                PreparedOp::Put { partition, body } => {
                    let counter = etags.next().ok_or_else(|| {
                        StoreError::Backend(context("no etag was drawn for writing"))
                    })?;
                    let etag = format_etag(u64::try_from(counter).unwrap_or(0));
                    let (owner, until) = write
                        .lease
                        .as_ref()
                        .map(|l| (l.owner.as_str(), l.until_ms))
                        .unzip();
                    // A create must not overwrite a row another node inserted since the lock
                    // found none; an unconditional put overwrites it. A put without a lease
                    // keeps the record's claim (see `Store::claim`).
                    let sql = if write.expect == Expect::Absent {
                        "INSERT INTO muster_records
                             (collection, key, partition, etag, body, sealed, claim_owner, claim_until)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                         ON CONFLICT (collection, key) DO NOTHING"
                    } else {
                        "INSERT INTO muster_records
                             (collection, key, partition, etag, body, sealed, claim_owner, claim_until)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                         ON CONFLICT (collection, key) DO UPDATE SET
                             partition = excluded.partition,
                             etag = excluded.etag,
                             body = excluded.body,
                             sealed = excluded.sealed,
                             claim_owner = COALESCE(excluded.claim_owner, muster_records.claim_owner),
                             claim_until = COALESCE(excluded.claim_until, muster_records.claim_until)"
                    };
                    let put = tx
                        .prepare_cached(sql)
                        .await
                        .map_err(|e| pg_err(&context("preparing to write"), &e))?;
                    let written = tx
                        .execute(
                            &put,
                            &[
                                &write.collection,
                                &write.key,
                                partition,
                                &etag,
                                &body.text(),
                                &body.sealed(),
                                &owner,
                                &until,
                            ],
                        )
                        .await
                        .map_err(|e| pg_err(&context("writing"), &e))?;
                    if written == 0 && write.required {
                        let refusal = WriteOutcome::AlreadyExists;
                        return rolled_back_tx(tx, writes.len(), outcomes.len(), refusal).await;
                    } else if written == 0 {
                        WriteOutcome::AlreadyExists
                    } else {
                        WriteOutcome::Written { etag }
                    }
                }
            };
            outcomes.push(outcome);
        }
        // Other nodes hear of a counted collection's change when this commits; this node's
        // counter moves before.
        let mut notified: Vec<Collection> = Vec::new();
        for write in writes {
            if Changes::counts(write.kind) && !notified.contains(&write.kind) {
                notify(&tx, write.collection).await?;
                notified.push(write.kind);
            }
        }
        for collection in notified {
            self.inner.changes.bump(collection);
        }
        tx.commit()
            .await
            .map_err(|e| pg_err("committing the write transaction", &e))?;
        Ok(outcomes)
    }

    /// A row (`partition, etag, body, sealed` from column `first` on) as a record.
    fn decode(
        &self,
        collection: Collection,
        key: String,
        row: &tokio_postgres::Row,
        first: usize,
    ) -> Result<Record, StoreError> {
        let corrupt = |key: &str, reason: String| StoreError::Corrupt {
            collection: collection.as_str(),
            key: key.to_string(),
            reason,
        };
        let text: Option<String> = row.get(first + 2);
        let sealed: Option<Vec<u8>> = row.get(first + 3);
        let parsed = match (collection.is_secret(), text, sealed) {
            (true, None, Some(sealed)) => {
                let plain = self.inner.sealer.open_bytes(collection, &key, &sealed)?;
                serde_json::from_slice(&plain)
            }
            (false, Some(text), None) => serde_json::from_str(&text),
            (secret, _, _) => {
                let reason = if secret {
                    "a secret collection's body is not sealed"
                } else {
                    "a body of a collection kept in clear is sealed"
                };
                return Err(corrupt(&key, reason.into()));
            }
        };
        match parsed {
            Ok(body) => Ok(Record {
                partition: row.get(first),
                etag: row.get(first + 1),
                key,
                body,
            }),
            Err(e) => Err(corrupt(&key, format!("body is not valid JSON: {e}"))),
        }
    }
}

/// A body as it is stored: JSON text, or sealed bytes for a secret collection.
enum StoredBody {
    Text(String),
    Sealed(Vec<u8>),
}

impl StoredBody {
    /// The `body` column.
    fn text(&self) -> Option<&str> {
        match self {
            StoredBody::Text(text) => Some(text),
            StoredBody::Sealed(_) => None,
        }
    }

    /// The `sealed` column.
    fn sealed(&self) -> Option<&[u8]> {
        match self {
            StoredBody::Text(_) => None,
            StoredBody::Sealed(bytes) => Some(bytes),
        }
    }
}

/// A write with its body serialized and, for a secret collection, sealed.
struct PreparedWrite {
    kind: Collection,
    collection: &'static str,
    key: String,
    expect: Expect,
    op: PreparedOp,
    lease: Option<Lease>,
    required: bool,
}

enum PreparedOp {
    Put {
        partition: Option<String>,
        body: StoredBody,
    },
    Delete,
}

fn serialize(
    sealer: &Sealer,
    collection: Collection,
    key: &str,
    body: &serde_json::Value,
) -> Result<StoredBody, StoreError> {
    let text = serde_json::to_string(body).map_err(|e| {
        StoreError::Backend(format!(
            "serializing the body of {}/{key}: {e}",
            collection.as_str()
        ))
    })?;
    stored_text(sealer, collection, key, text)
}

/// A body's JSON text as it is kept: sealed in secret collections.
fn stored_text(
    sealer: &Sealer,
    collection: Collection,
    key: &str,
    text: String,
) -> Result<StoredBody, StoreError> {
    if collection.is_secret() {
        sealer
            .seal_bytes(collection, key, text.as_bytes())
            .map(StoredBody::Sealed)
    } else {
        Ok(StoredBody::Text(text))
    }
}

/// Ends a batch whose required write was refused: nothing of it is committed.
async fn rolled_back_tx(
    tx: deadpool_postgres::Transaction<'_>,
    writes: usize,
    refused_at: usize,
    refusal: WriteOutcome,
) -> Result<Vec<WriteOutcome>, StoreError> {
    tx.rollback()
        .await
        .map_err(|e| pg_err("rolling back a refused batch", &e))?;
    Ok(crate::rolled_back(writes, refused_at, refusal))
}

fn prepare(sealer: &Sealer, write: Write) -> Result<PreparedWrite, StoreError> {
    let op = match write.op {
        WriteOp::Put { partition, body } => PreparedOp::Put {
            partition,
            body: serialize(sealer, write.collection, &write.key, &body)?,
        },
        WriteOp::PutJson { partition, json } => PreparedOp::Put {
            partition,
            body: stored_text(sealer, write.collection, &write.key, json)?,
        },
        WriteOp::Delete => PreparedOp::Delete,
    };
    Ok(PreparedWrite {
        kind: write.collection,
        collection: write.collection.as_str(),
        key: write.key,
        expect: write.expect,
        op,
        lease: write.lease,
        required: write.required,
    })
}

/// Tells every listening node, when `tx` commits, that collection `name` changed.
async fn notify(tx: &deadpool_postgres::Transaction<'_>, name: &str) -> Result<(), StoreError> {
    tx.execute("SELECT pg_notify($1, $2)", &[&changes::CHANNEL, &name])
        .await
        .map_err(|e| pg_err(&format!("notifying other nodes of a change to {name}"), &e))?;
    Ok(())
}

/// The counter an etag of [`format_etag`] carries; `None` for any other etag.
fn etag_counter(etag: &str) -> Option<u64> {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(etag)
        .ok()?;
    let text = std::str::from_utf8(&raw).ok()?;
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    let parts: Vec<&str> = inner.split('-').collect();
    let [high, _, _, _, low] = parts.as_slice() else {
        return None;
    };
    let counter =
        (u64::from_str_radix(high, 16).ok()? << 48) | u64::from_str_radix(low, 16).ok()?;
    (format_etag(counter) == etag).then_some(counter)
}

/// The statement [`Store::search`] runs for `field` (`$1` collection, `$2` lower bound, `$3`
/// exclusive upper bound, `$4` limit); public so tests can check its plan. The device id
/// expression must match the index `muster_records_registrations_by_device` exactly, and the
/// collection is named literally, for the planner to use that partial index.
#[doc(hidden)]
pub fn search_sql(field: SearchField) -> &'static str {
    match field {
        SearchField::Key => {
            "SELECT key, partition, etag, body, sealed FROM muster_records
             WHERE collection = $1 AND key >= $2 AND key < $3 ORDER BY key LIMIT $4"
        }
        SearchField::DeviceId => {
            "SELECT key, partition, etag, body, sealed FROM muster_records
             WHERE collection = 'registrations' AND $1::text IS NOT NULL
               AND lower(((body::jsonb) ->> 'deviceId') COLLATE \"C\") >= $2
               AND lower(((body::jsonb) ->> 'deviceId') COLLATE \"C\") < $3
             ORDER BY lower(((body::jsonb) ->> 'deviceId') COLLATE \"C\"), key LIMIT $4"
        }
    }
}

const GET_SQL: &str = "SELECT partition, etag, body, sealed FROM muster_records
     WHERE collection = $1 AND key = $2";

#[async_trait]
impl Store for PostgresStore {
    async fn get(&self, collection: Collection, key: &str) -> Result<Option<Record>, StoreError> {
        let context = || format!("reading {}/{key}", collection.as_str());
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(GET_SQL)
            .await
            .map_err(|e| pg_err(&context(), &e))?;
        let row = client
            .query_opt(&stmt, &[&collection.as_str(), &key])
            .await
            .map_err(|e| pg_err(&context(), &e))?;
        match row {
            Some(row) => self.decode(collection, key.to_owned(), &row, 0).map(Some),
            None => Ok(None),
        }
    }

    async fn write(&self, writes: Vec<Write>) -> Result<Vec<WriteOutcome>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let writes = writes
            .into_iter()
            .map(|w| prepare(&self.inner.sealer, w))
            .collect::<Result<Vec<_>, _>>()?;
        let mut attempt = 0;
        loop {
            match self.write_once(&writes).await {
                Err(e) if is_retryable_conflict(&e) && attempt < CONFLICT_RETRIES => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "store batch conflicted; retrying");
                }
                result => return result,
            }
        }
    }

    async fn list(
        &self,
        collection: Collection,
        query: ListQuery,
    ) -> Result<Vec<Record>, StoreError> {
        let context = || format!("listing {}", collection.as_str());
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let name = collection.as_str();
        let client = self.client().await?;
        let select =
            "SELECT key, partition, etag, body, sealed FROM muster_records WHERE collection = $1";
        let sql = match (&query.partition, &query.after) {
            (None, None) => format!("{select} ORDER BY key LIMIT $2"),
            (None, Some(_)) => format!("{select} AND key > $2 ORDER BY key LIMIT $3"),
            (Some(_), None) => format!("{select} AND partition = $2 ORDER BY key LIMIT $3"),
            (Some(_), Some(_)) => {
                format!("{select} AND partition = $2 AND key > $3 ORDER BY key LIMIT $4")
            }
        };
        let stmt = client
            .prepare_cached(&sql)
            .await
            .map_err(|e| pg_err(&context(), &e))?;
        let rows = match (&query.partition, &query.after) {
            (None, None) => client.query(&stmt, &[&name, &limit]).await,
            (None, Some(after)) => client.query(&stmt, &[&name, after, &limit]).await,
            (Some(partition), None) => client.query(&stmt, &[&name, partition, &limit]).await,
            (Some(partition), Some(after)) => {
                client
                    .query(&stmt, &[&name, partition, after, &limit])
                    .await
            }
        }
        .map_err(|e| pg_err(&context(), &e))?;
        rows.iter()
            .map(|row| self.decode(collection, row.get(0), row, 1))
            .collect()
    }

    async fn claim(
        &self,
        collection: Collection,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let context = || format!("claiming {}", collection.as_str());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client().await?;
        // Rows another node is claiming (or writing) right now are skipped, not waited for:
        // of two claimers each row goes to one, and neither blocks on the other.
        let stmt = client
            .prepare_cached(
                "UPDATE muster_records r SET claim_owner = $2, claim_until = $4
                 FROM (SELECT key FROM muster_records
                       WHERE collection = $1 AND (claim_owner IS NULL
                           OR claim_owner = $2 OR claim_until <= $3)
                       ORDER BY key LIMIT $5
                       FOR UPDATE SKIP LOCKED) c
                 WHERE r.collection = $1 AND r.key = c.key
                 RETURNING r.key, r.partition, r.etag, r.body, r.sealed",
            )
            .await
            .map_err(|e| pg_err(&context(), &e))?;
        let rows = client
            .query(
                &stmt,
                &[&collection.as_str(), &owner, &now_ms, &until_ms, &limit],
            )
            .await
            .map_err(|e| pg_err(&context(), &e))?;
        let mut records = rows
            .iter()
            .map(|row| self.decode(collection, row.get(0), row, 1))
            .collect::<Result<Vec<_>, _>>()?;
        records.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(records)
    }

    async fn renew(
        &self,
        collection: Collection,
        owner: &str,
        keys: &[String],
        until_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let context = || format!("renewing claims on {}", collection.as_str());
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE muster_records SET claim_until = $3
                 WHERE collection = $1 AND claim_owner = $2 AND key = ANY($4)
                 RETURNING key",
            )
            .await
            .map_err(|e| pg_err(&context(), &e))?;
        let rows = client
            .query(&stmt, &[&collection.as_str(), &owner, &until_ms, &keys])
            .await
            .map_err(|e| pg_err(&context(), &e))?;
        let mut renewed: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        renewed.sort();
        Ok(renewed)
    }

    async fn release(
        &self,
        collection: Collection,
        owner: &str,
        keys: &[String],
    ) -> Result<(), StoreError> {
        let context = || format!("releasing claims on {}", collection.as_str());
        if keys.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE muster_records SET claim_owner = NULL, claim_until = NULL
                 WHERE collection = $1 AND claim_owner = $2 AND key = ANY($3)",
            )
            .await
            .map_err(|e| pg_err(&context(), &e))?;
        client
            .execute(&stmt, &[&collection.as_str(), &owner, &keys])
            .await
            .map_err(|e| pg_err(&context(), &e))?;
        Ok(())
    }

    async fn take_token(
        &self,
        name: &str,
        rate: u32,
        now_ms: i64,
    ) -> Result<Option<bool>, StoreError> {
        let context = || format!("taking a token of rate limit {name}");
        let capacity = f64::from(rate.max(1));
        let client = self.client().await?;
        // One statement: the row lock orders concurrent takers, the refill is computed from
        // the last update, and a bucket without a whole token is left as it was (its refill
        // is recomputed next time from the same instant).
        let stmt = client
            .prepare_cached(
                "INSERT INTO muster_rate_limits AS b (name, tokens, updated_ms)
                 VALUES ($1::TEXT, $2::DOUBLE PRECISION - 1, $3::BIGINT)
                 ON CONFLICT (name) DO UPDATE SET
                     tokens = LEAST($2::DOUBLE PRECISION, b.tokens
                         + GREATEST(0, $3::BIGINT - b.updated_ms)::DOUBLE PRECISION
                           * $2::DOUBLE PRECISION / 1000.0) - 1,
                     updated_ms = GREATEST(b.updated_ms, $3::BIGINT)
                 WHERE LEAST($2::DOUBLE PRECISION, b.tokens
                         + GREATEST(0, $3::BIGINT - b.updated_ms)::DOUBLE PRECISION
                           * $2::DOUBLE PRECISION / 1000.0) >= 1
                 RETURNING tokens",
            )
            .await
            .map_err(|e| pg_err(&context(), &e))?;
        let taken = client
            .query_opt(&stmt, &[&name, &capacity, &now_ms])
            .await
            .map_err(|e| pg_err(&context(), &e))?
            .is_some();
        Ok(Some(taken))
    }

    async fn search(
        &self,
        collection: Collection,
        query: SearchQuery,
    ) -> Result<Vec<Record>, StoreError> {
        query.check(collection)?;
        let context = || format!("searching {}", collection.as_str());
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let low = query.folded_prefix();
        let high = SearchQuery::upper_bound(&low);
        let client = self.client().await?;
        let sql = search_sql(query.field);
        let stmt = client
            .prepare_cached(sql)
            .await
            .map_err(|e| pg_err(&context(), &e))?;
        let rows = client
            .query(&stmt, &[&collection.as_str(), &low, &high, &limit])
            .await
            .map_err(|e| pg_err(&context(), &e))?;
        rows.iter()
            .map(|row| self.decode(collection, row.get(0), row, 1))
            .collect()
    }

    fn changes(&self, collection: Collection) -> Option<u64> {
        self.inner.changes.get(collection)
    }

    fn bus(&self) -> Option<Arc<dyn crate::bus::Bus>> {
        Some(self.inner.bus.clone())
    }

    async fn count(
        &self,
        collection: Collection,
        partition: Option<&str>,
    ) -> Result<u64, StoreError> {
        let context = || format!("counting {}", collection.as_str());
        let client = self.client().await?;
        let row = match partition {
            None => {
                let stmt = client
                    .prepare_cached("SELECT COUNT(*) FROM muster_records WHERE collection = $1")
                    .await
                    .map_err(|e| pg_err(&context(), &e))?;
                client.query_one(&stmt, &[&collection.as_str()]).await
            }
            Some(partition) => {
                let stmt = client
                    .prepare_cached(
                        "SELECT COUNT(*) FROM muster_records WHERE collection = $1 AND partition = $2",
                    )
                    .await
                    .map_err(|e| pg_err(&context(), &e))?;
                client
                    .query_one(&stmt, &[&collection.as_str(), &partition])
                    .await
            }
        }
        .map_err(|e| pg_err(&context(), &e))?;
        let count: i64 = row.get(0);
        u64::try_from(count)
            .map_err(|_| StoreError::Backend(format!("{}: negative count", context())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_counters_round_trip() {
        for n in [1u64, 2, 0xffff_ffff_ffff, 1 << 48, (7 << 48) | 42] {
            assert_eq!(etag_counter(&format_etag(n)), Some(n), "{n}");
        }
        assert_eq!(etag_counter("not-an-etag"), None);
        assert_eq!(etag_counter("ImEi"), None);
    }
}
