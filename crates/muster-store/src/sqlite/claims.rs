//! Claims ([`crate::Store::claim`], `renew`, `release`) on a connection of their own.
//!
//! A claim changes only the `claim_owner`/`claim_until` columns, never a body or an etag, so
//! it needs neither the writer thread's etag counter nor its group commit: a second
//! read-write connection, behind a mutex and used on the blocking thread pool, runs each
//! claim as one statement (one write transaction; SQLite lets one writer in at a time, the
//! busy timeout makes this connection and the writer thread wait for each other). Only one
//! process opens the database, so "exactly one claimer wins" holds between the tasks of
//! that process; the statement's `WHERE` keeps it true whatever their order.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection};

use super::body::StoredBody;
use super::{db_err, decode_record, open_writer};
use crate::sealing::Sealer;
use crate::{Collection, Record, StoreError};

pub(super) struct Claims {
    /// `None` once closed.
    conn: Arc<Mutex<Option<Connection>>>,
}

impl Claims {
    pub(super) fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            conn: Arc::new(Mutex::new(Some(open_writer(path)?))),
        })
    }

    /// Closes the connection (before the writer's, which then checkpoints the WAL).
    pub(super) fn close(&self) {
        if let Ok(mut conn) = self.conn.lock() {
            conn.take();
        }
    }

    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let conn = conn
                .lock()
                .map_err(|_| StoreError::Backend("the claims connection was poisoned".into()))?;
            f(conn.as_ref().ok_or(StoreError::Closed)?)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("claim task failed: {e}")))?
    }

    pub(super) async fn claim(
        &self,
        sealer: Arc<Sealer>,
        collection: Collection,
        owner: String,
        now_ms: i64,
        until_ms: i64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut records = self
            .run(move |conn| {
                let context = || format!("claiming {}", collection.as_str());
                let mut stmt = conn
                    .prepare_cached(
                        "UPDATE records SET claim_owner = ?2, claim_until = ?4
                         WHERE collection = ?1 AND key IN (
                             SELECT key FROM records
                             WHERE collection = ?1 AND (claim_owner IS NULL
                                 OR claim_owner = ?2 OR claim_until <= ?3)
                             ORDER BY key LIMIT ?5)
                         RETURNING key, partition, etag, body",
                    )
                    .map_err(|e| db_err(&context(), e))?;
                let rows = stmt
                    .query_map(
                        params![collection.as_str(), owner, now_ms, until_ms, limit],
                        |row| {
                            Ok((
                                row.get::<_, String>(0)?,
                                row.get::<_, Option<String>>(1)?,
                                row.get::<_, String>(2)?,
                                row.get::<_, StoredBody>(3)?,
                            ))
                        },
                    )
                    .map_err(|e| db_err(&context(), e))?;
                let mut out = Vec::new();
                for row in rows {
                    let (key, partition, etag, body) = row.map_err(|e| db_err(&context(), e))?;
                    out.push(decode_record(
                        &sealer, collection, key, partition, etag, &body,
                    )?);
                }
                Ok(out)
            })
            .await?;
        records.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(records)
    }

    pub(super) async fn renew(
        &self,
        collection: Collection,
        owner: String,
        keys: Vec<String>,
        until_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut renewed = self
            .run(move |conn| {
                let context = || format!("renewing claims on {}", collection.as_str());
                let tx = conn
                    .unchecked_transaction()
                    .map_err(|e| db_err(&context(), e))?;
                let mut renewed = Vec::new();
                {
                    let mut stmt = tx
                        .prepare_cached(
                            "UPDATE records SET claim_until = ?3
                             WHERE collection = ?1 AND key = ?4 AND claim_owner = ?2",
                        )
                        .map_err(|e| db_err(&context(), e))?;
                    for key in keys {
                        let n = stmt
                            .execute(params![collection.as_str(), owner, until_ms, key])
                            .map_err(|e| db_err(&context(), e))?;
                        if n > 0 {
                            renewed.push(key);
                        }
                    }
                }
                tx.commit().map_err(|e| db_err(&context(), e))?;
                Ok(renewed)
            })
            .await?;
        renewed.sort();
        Ok(renewed)
    }

    pub(super) async fn release(
        &self,
        collection: Collection,
        owner: String,
        keys: Vec<String>,
    ) -> Result<(), StoreError> {
        self.run(move |conn| {
            let context = || format!("releasing claims on {}", collection.as_str());
            let tx = conn
                .unchecked_transaction()
                .map_err(|e| db_err(&context(), e))?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "UPDATE records SET claim_owner = NULL, claim_until = NULL
                         WHERE collection = ?1 AND key = ?3 AND claim_owner = ?2",
                    )
                    .map_err(|e| db_err(&context(), e))?;
                for key in keys {
                    stmt.execute(params![collection.as_str(), owner, key])
                        .map_err(|e| db_err(&context(), e))?;
                }
            }
            tx.commit().map_err(|e| db_err(&context(), e))
        })
        .await
    }
}
