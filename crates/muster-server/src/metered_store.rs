//! [`MeteredStore`]: the server's store, timed. Wraps whichever [`Store`] the server runs on
//! and records how long each write takes to commit (`muster_store_write_duration_seconds`), so
//! no store implementation needs to know about metrics.

use std::sync::Arc;

use async_trait::async_trait;
use muster_store::{Collection, ListQuery, Record, Store, StoreError, Write, WriteOutcome};

pub struct MeteredStore {
    inner: Arc<dyn Store>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self { inner }
    }
}

#[async_trait]
impl Store for MeteredStore {
    async fn get(&self, collection: Collection, key: &str) -> Result<Option<Record>, StoreError> {
        self.inner.get(collection, key).await
    }

    async fn write(&self, writes: Vec<Write>) -> Result<Vec<WriteOutcome>, StoreError> {
        let started = tokio::time::Instant::now();
        let result = self.inner.write(writes).await;
        let label = match &result {
            Ok(_) => "ok",
            Err(e) if e.is_unavailable() => "unavailable",
            Err(_) => "error",
        };
        crate::metrics::store_write(label, started.elapsed());
        result
    }

    async fn list(
        &self,
        collection: Collection,
        query: ListQuery,
    ) -> Result<Vec<Record>, StoreError> {
        self.inner.list(collection, query).await
    }

    async fn count(
        &self,
        collection: Collection,
        partition: Option<&str>,
    ) -> Result<u64, StoreError> {
        self.inner.count(collection, partition).await
    }

    async fn claim(
        &self,
        collection: Collection,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        self.inner
            .claim(collection, owner, now_ms, until_ms, limit)
            .await
    }

    async fn renew(
        &self,
        collection: Collection,
        owner: &str,
        keys: &[String],
        until_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.inner.renew(collection, owner, keys, until_ms).await
    }

    async fn release(
        &self,
        collection: Collection,
        owner: &str,
        keys: &[String],
    ) -> Result<(), StoreError> {
        self.inner.release(collection, owner, keys).await
    }

    // Forwarded: a shared store's rate limits hold across nodes.
    async fn take_token(
        &self,
        name: &str,
        rate: u32,
        now_ms: i64,
    ) -> Result<Option<bool>, StoreError> {
        self.inner.take_token(name, rate, now_ms).await
    }

    async fn search(
        &self,
        collection: Collection,
        query: muster_store::SearchQuery,
    ) -> Result<Vec<Record>, StoreError> {
        self.inner.search(collection, query).await
    }

    // Forwarded: the group cache keeps decoded groups only while this stands still.
    fn changes(&self, collection: Collection) -> Option<u64> {
        self.inner.changes(collection)
    }

    fn bus(&self) -> Option<Arc<dyn muster_store::bus::Bus>> {
        self.inner.bus()
    }
}
