//! Every enrollment group, as attestation reads them: decoded once and kept until the store
//! reports a write to the collection.
//!
//! A symmetric-key or X.509 group device does not say which group it belongs to, so
//! attestation tries the groups in id order. Listing and decoding all of them for each
//! registration was the largest share of a registration burst's CPU; with the cache it is a
//! lookup. Correctness rests on [`Store::changes`]: the counter moves before a write's caller
//! hears it committed, and it is read *before* the groups are listed, so a write racing with a
//! reload leaves a stale counter behind and the next call reloads.

use std::sync::{Arc, Mutex};

use muster_proto::EnrollmentGroup;
use muster_store::records::{self, Stored};
use muster_store::{Collection, Store, StoreError};

/// More groups than this are read page by page each time instead of being held in memory.
const MAX_CACHED_GROUPS: usize = 10_000;
const PAGE: usize = 500;

type Groups = Arc<[Stored<EnrollmentGroup>]>;

#[derive(Default)]
pub struct GroupCache {
    cached: Mutex<Option<(u64, Groups)>>,
}

impl GroupCache {
    /// Every enrollment group, in id order.
    pub async fn all(&self, store: &dyn Store) -> Result<Groups, StoreError> {
        let generation = store.changes(Collection::EnrollmentGroups);
        if let (Some(g), Ok(cached)) = (generation, self.cached.lock()) {
            if let Some((at, groups)) = cached.as_ref() {
                if *at == g {
                    return Ok(groups.clone());
                }
            }
        }
        let groups: Groups = records::list_all(store, Collection::EnrollmentGroups, PAGE)
            .await?
            .into_iter()
            .map(|r| records::decode(Collection::EnrollmentGroups, r))
            .collect::<Result<Vec<Stored<EnrollmentGroup>>, _>>()?
            .into();
        if let (Some(g), true) = (generation, groups.len() <= MAX_CACHED_GROUPS) {
            if let Ok(mut cached) = self.cached.lock() {
                *cached = Some((g, groups.clone()));
            }
        }
        Ok(groups)
    }
}

#[cfg(test)]
mod tests {
    use muster_store::{Expect, SqliteStore, Write};
    use serde_json::json;

    use super::*;

    fn group(id: &str, key: &str) -> Write {
        Write::put(
            Collection::EnrollmentGroups,
            id,
            Expect::Any,
            json!({
                "enrollmentGroupId": id,
                "attestation": {"type": "symmetricKey",
                    "symmetricKey": {"primaryKey": key, "secondaryKey": key}},
            }),
        )
    }

    fn ids_and_keys(groups: &[Stored<EnrollmentGroup>]) -> Vec<(String, String)> {
        groups
            .iter()
            .map(|g| {
                let key = g
                    .value
                    .attestation
                    .symmetric_key
                    .as_ref()
                    .and_then(|k| k.primary_key.clone())
                    .unwrap_or_default();
                (g.value.enrollment_group_id.to_string(), key)
            })
            .collect()
    }

    #[tokio::test]
    async fn every_write_to_the_groups_is_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("db")).expect("store");
        let cache = GroupCache::default();
        assert!(cache.all(&store).await.expect("all").is_empty());

        store
            .write(vec![group("a", "k1"), group("b", "k1")])
            .await
            .expect("write");
        let first = cache.all(&store).await.expect("all");
        assert_eq!(
            ids_and_keys(&first),
            [("a".into(), "k1".into()), ("b".into(), "k1".into())]
        );
        // Unchanged: the same decoded list, not a new read.
        assert!(Arc::ptr_eq(&first, &cache.all(&store).await.expect("all")));

        // A key rotation, a deletion and an unrelated collection.
        store.write(vec![group("a", "k2")]).await.expect("rotate");
        assert_eq!(
            ids_and_keys(&cache.all(&store).await.expect("all"))[0].1,
            "k2"
        );
        store
            .write(vec![Write::delete(
                Collection::EnrollmentGroups,
                "b",
                Expect::Any,
            )])
            .await
            .expect("delete");
        let after_delete = cache.all(&store).await.expect("all");
        assert_eq!(ids_and_keys(&after_delete), [("a".into(), "k2".into())]);
        store
            .write(vec![Write::put(
                Collection::Settings,
                "x",
                Expect::Any,
                json!({}),
            )])
            .await
            .expect("settings");
        assert!(Arc::ptr_eq(
            &after_delete,
            &cache.all(&store).await.expect("all")
        ));
    }

    #[tokio::test]
    async fn more_groups_than_a_page_are_all_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("db")).expect("store");
        let writes = (0..PAGE + 3)
            .map(|i| group(&format!("g{i:04}"), "k"))
            .collect();
        store.write(writes).await.expect("write");
        assert_eq!(
            GroupCache::default().all(&store).await.expect("all").len(),
            PAGE + 3
        );
    }
}
