//! Typed access to the store: enrollments, groups and registration records as
//! `muster_proto` types, with the etag the store assigned.

use muster_proto::{DeviceRegistrationState, EnrollmentGroup, IndividualEnrollment};
use serde::de::DeserializeOwned;

use crate::{Collection, ListQuery, Record, Store, StoreError};

/// A typed record and its etag.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored<T> {
    pub value: T,
    pub etag: String,
    pub partition: Option<String>,
}

/// Records that carry their etag inside their JSON body on the wire.
pub trait Etagged {
    fn set_etag(&mut self, etag: Option<String>);
}

impl Etagged for IndividualEnrollment {
    fn set_etag(&mut self, etag: Option<String>) {
        self.etag = etag;
    }
}

impl Etagged for EnrollmentGroup {
    fn set_etag(&mut self, etag: Option<String>) {
        self.etag = etag;
    }
}

impl Etagged for DeviceRegistrationState {
    fn set_etag(&mut self, etag: Option<String>) {
        self.etag = etag;
    }
}

pub fn decode<T: DeserializeOwned + Etagged>(
    collection: Collection,
    record: Record,
) -> Result<Stored<T>, StoreError> {
    let mut value: T = serde_json::from_value(record.body).map_err(|e| StoreError::Corrupt {
        collection: collection.as_str(),
        key: record.key.clone(),
        reason: e.to_string(),
    })?;
    value.set_etag(Some(record.etag.clone()));
    Ok(Stored {
        value,
        etag: record.etag,
        partition: record.partition,
    })
}

pub async fn get<T: DeserializeOwned + Etagged>(
    store: &dyn Store,
    collection: Collection,
    key: &str,
) -> Result<Option<Stored<T>>, StoreError> {
    match store.get(collection, key).await? {
        Some(r) => decode(collection, r).map(Some),
        None => Ok(None),
    }
}

/// Every record of a collection known to be small (linked hubs, enrollment groups, pending
/// markers), in key order, read in pages of `page`; a short page is the last one.
pub async fn list_all(
    store: &dyn Store,
    collection: Collection,
    page: usize,
) -> Result<Vec<Record>, StoreError> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let records = store
            .list(
                collection,
                ListQuery {
                    partition: None,
                    after: after.take(),
                    limit: page,
                },
            )
            .await?;
        let full = records.len() >= page;
        after = records.last().map(|r| r.key.clone());
        out.extend(records);
        if !full {
            return Ok(out);
        }
    }
}

pub async fn list<T: DeserializeOwned + Etagged>(
    store: &dyn Store,
    collection: Collection,
    query: ListQuery,
) -> Result<Vec<Stored<T>>, StoreError> {
    store
        .list(collection, query)
        .await?
        .into_iter()
        .map(|r| decode(collection, r))
        .collect()
}
