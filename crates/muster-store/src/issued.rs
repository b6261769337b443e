//! Issued-certificate records: one [`IssuedCertificate`] per certificate Muster's issuing CA
//! signed, in [`Collection::IssuedCertificates`], keyed by its serial number (upper-case hex)
//! and partitioned by the lower-cased registration id, so one registration's certificates are
//! a partition listing.
//!
//! A record is written before the certificate can leave the server ([`record_write`] goes in
//! the batch that first saves the registration with it), and revoking sets
//! `revokedDateTimeUtc` and the reason once (the etag guards against two revocations racing).

use muster_proto::issued_certificate::IssuedCertificate;
use muster_proto::Timestamp;

use crate::{Collection, Expect, ListQuery, Record, Store, StoreError, Write};

fn corrupt(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        collection: Collection::IssuedCertificates.as_str(),
        key: key.to_string(),
        reason: e.to_string(),
    }
}

fn decode(record: Record) -> Result<IssuedCertificate, StoreError> {
    serde_json::from_value(record.body).map_err(|e| corrupt(&record.key, e))
}

/// The write that records `cert` (it must not exist yet: serials are never reused).
pub fn record_write(cert: &IssuedCertificate) -> Result<Write, StoreError> {
    let key = cert.serial_number.to_ascii_uppercase();
    let body = serde_json::to_value(cert).map_err(|e| corrupt(&key, e))?;
    Ok(
        Write::put(Collection::IssuedCertificates, key, Expect::Absent, body)
            .with_partition(Some(cert.registration_id.to_ascii_lowercase())),
    )
}

/// The certificate with this serial (upper-case hex), if Muster issued it.
pub async fn get(store: &dyn Store, serial: &str) -> Result<Option<IssuedCertificate>, StoreError> {
    match store
        .get(Collection::IssuedCertificates, &serial.to_ascii_uppercase())
        .await?
    {
        Some(r) => decode(r).map(Some),
        None => Ok(None),
    }
}

/// Up to `limit` certificates after the serial `after`, by serial; only `registration_id`'s
/// when given. The second value is the serial to continue after when the page is full.
pub async fn list(
    store: &dyn Store,
    registration_id: Option<&str>,
    after: Option<String>,
    limit: usize,
) -> Result<(Vec<IssuedCertificate>, Option<String>), StoreError> {
    let limit = limit.max(1);
    let records = store
        .list(
            Collection::IssuedCertificates,
            ListQuery {
                partition: registration_id.map(str::to_ascii_lowercase),
                after,
                limit,
            },
        )
        .await?;
    let next = (records.len() >= limit)
        .then(|| records.last().map(|r| r.key.clone()))
        .flatten();
    let certs = records
        .into_iter()
        .map(decode)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((certs, next))
}

/// What [`revoke`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// Revoked now; the record as stored.
    Now(IssuedCertificate),
    /// It was revoked before; the record unchanged (the first reason and time stay).
    Already(IssuedCertificate),
    NotFound,
}

/// Marks the certificate with `serial` revoked at `at` with `reason`.
pub async fn revoke(
    store: &dyn Store,
    serial: &str,
    at: Timestamp,
    reason: Option<String>,
) -> Result<Revoked, StoreError> {
    let key = serial.to_ascii_uppercase();
    // Two revocations racing: the loser reads the winner's record and reports `Already`.
    for _ in 0..3 {
        let Some(record) = store.get(Collection::IssuedCertificates, &key).await? else {
            return Ok(Revoked::NotFound);
        };
        let etag = record.etag.clone();
        let partition = record.partition.clone();
        let mut cert = decode(record)?;
        if cert.is_revoked() {
            return Ok(Revoked::Already(cert));
        }
        cert.revoked_date_time_utc = Some(at);
        cert.revocation_reason = reason.clone();
        let body = serde_json::to_value(&cert).map_err(|e| corrupt(&key, e))?;
        let write = Write::put(
            Collection::IssuedCertificates,
            key.clone(),
            Expect::Etag(etag),
            body,
        )
        .with_partition(partition);
        let outcome = store.write(vec![write]).await?;
        if outcome.first().is_some_and(|o| o.is_applied()) {
            return Ok(Revoked::Now(cert));
        }
    }
    Err(StoreError::Backend(format!(
        "revoking issued certificate {key}: the record kept changing"
    )))
}
