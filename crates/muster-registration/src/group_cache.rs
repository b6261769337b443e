//! Every enrollment group, as attestation reads them: decoded once, with each symmetric-key
//! group's keys prepared for HMAC, and kept until the store reports a write to the collection.
//!
//! A symmetric-key or X.509 group device does not say which group it belongs to, so
//! attestation may have to try the groups in id order ([`crate::group_search`]). Listing and
//! decoding all of them for each registration was the largest share of a registration burst's
//! CPU; with the cache it is a lookup, and a device whose record names its group finds it by
//! id ([`GroupCache::group`]) without touching the others. Correctness rests on
//! [`Store::changes`]: the counter moves before a write's caller hears it committed, and it is
//! read *before* the groups are listed, so a write racing with a reload leaves a stale counter
//! behind and the next call reloads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use muster_attestation::symmetric_key;
use muster_proto::{AttestationType, EnrollmentGroup};
use muster_store::records::{self, Stored};
use muster_store::{Collection, Store, StoreError};
use sha2::Sha256;

use crate::group_search::GroupSearch;

/// More groups than this are read page by page each time instead of being held in memory.
const MAX_CACHED_GROUPS: usize = 10_000;
const PAGE: usize = 500;

type Groups = Arc<[Stored<EnrollmentGroup>]>;

/// A symmetric-key group's primary and secondary keys, each as an HMAC already keyed with it:
/// deriving a device key (`HMAC(group key, registration id)`) then costs two SHA-256 blocks
/// instead of a base64 decode and a key schedule.
#[derive(Clone)]
pub struct GroupKeys {
    pub primary: Hmac<Sha256>,
    pub secondary: Hmac<Sha256>,
}

impl GroupKeys {
    /// `None` unless the group is a symmetric-key group with both keys decodable (a group
    /// without both cannot derive the device keys its devices and the hub need).
    fn of(group: &EnrollmentGroup) -> Option<Self> {
        if group.attestation.kind != AttestationType::SymmetricKey {
            return None;
        }
        let sk = group.attestation.symmetric_key.as_ref()?;
        let keyed = |k: Option<&str>| {
            let bytes = symmetric_key::decode_key(k?).ok()?;
            Hmac::<Sha256>::new_from_slice(&bytes).ok()
        };
        Some(Self {
            primary: keyed(sk.primary_key.as_deref())?,
            secondary: keyed(sk.secondary_key.as_deref())?,
        })
    }

    /// The raw device keys of `registration_id` (as the device sends it): primary, secondary.
    pub fn derive(&self, registration_id: &str) -> ([u8; 32], [u8; 32]) {
        let derive = |keyed: &Hmac<Sha256>| {
            let mut mac = keyed.clone();
            mac.update(registration_id.as_bytes());
            mac.finalize().into_bytes().into()
        };
        (derive(&self.primary), derive(&self.secondary))
    }
}

/// The base64 device key the hub identity gets, from its raw bytes.
pub fn device_key_b64(raw: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// Every enrollment group in id order, with an index by id and the symmetric keys prepared.
pub struct GroupSet {
    groups: Groups,
    by_id: HashMap<String, usize>,
    keys: Vec<Option<GroupKeys>>,
}

impl GroupSet {
    pub(crate) fn new(groups: Vec<Stored<EnrollmentGroup>>) -> Self {
        let by_id = groups
            .iter()
            .enumerate()
            .map(|(i, g)| (g.value.enrollment_group_id.as_str().to_ascii_lowercase(), i))
            .collect();
        let keys = groups.iter().map(|g| GroupKeys::of(&g.value)).collect();
        Self {
            groups: groups.into(),
            by_id,
            keys,
        }
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The symmetric-key groups with usable keys, in id order.
    pub fn symmetric(&self) -> impl Iterator<Item = (&Stored<EnrollmentGroup>, &GroupKeys)> {
        self.groups
            .iter()
            .zip(&self.keys)
            .filter_map(|(g, k)| Some((g, k.as_ref()?)))
    }

    /// How many groups [`Self::symmetric`] yields: the work of a search.
    pub fn symmetric_count(&self) -> usize {
        self.keys.iter().filter(|k| k.is_some()).count()
    }

    fn get(&self, group_id: &str) -> Option<(Stored<EnrollmentGroup>, Option<GroupKeys>)> {
        let i = *self.by_id.get(&group_id.to_ascii_lowercase())?;
        Some((self.groups[i].clone(), self.keys[i].clone()))
    }
}

#[derive(Default)]
struct Cached {
    /// The groups as of a change counter.
    set: Option<(u64, Arc<GroupSet>)>,
    /// The change counter at which the groups were last found to be too many to keep.
    oversized_at: Option<u64>,
}

/// The groups, cached, and the bound on how many searches through them run at once.
pub struct GroupCache {
    cached: Mutex<Cached>,
    search: GroupSearch,
}

impl Default for GroupCache {
    fn default() -> Self {
        Self::with_search(GroupSearch::default())
    }
}

impl GroupCache {
    pub fn with_search(search: GroupSearch) -> Self {
        Self {
            cached: Mutex::new(Cached::default()),
            search,
        }
    }

    /// The bound on searches through every group (devices whose group is unknown).
    pub fn search(&self) -> &GroupSearch {
        &self.search
    }

    /// Every enrollment group, in id order.
    pub async fn all(&self, store: &dyn Store) -> Result<Groups, StoreError> {
        Ok(self.set(store).await?.groups.clone())
    }

    /// Every enrollment group with its prepared keys.
    pub async fn set(&self, store: &dyn Store) -> Result<Arc<GroupSet>, StoreError> {
        let generation = store.changes(Collection::EnrollmentGroups);
        if let Some(set) = self.current(generation) {
            return Ok(set);
        }
        let groups = records::list_all(store, Collection::EnrollmentGroups, PAGE)
            .await?
            .into_iter()
            .map(|r| records::decode(Collection::EnrollmentGroups, r))
            .collect::<Result<Vec<Stored<EnrollmentGroup>>, _>>()?;
        let set = Arc::new(GroupSet::new(groups));
        if let (Some(g), Ok(mut cached)) = (generation, self.cached.lock()) {
            if set.len() <= MAX_CACHED_GROUPS {
                cached.set = Some((g, set.clone()));
            } else {
                cached.set = None;
                cached.oversized_at = Some(g);
            }
        }
        Ok(set)
    }

    /// One group by id (any case), with its prepared keys: from the cache, or when the groups
    /// are too many to cache, one read of the store. Never lists the groups more than [`Self::set`].
    pub async fn group(
        &self,
        store: &dyn Store,
        group_id: &str,
    ) -> Result<Option<(Stored<EnrollmentGroup>, Option<GroupKeys>)>, StoreError> {
        let generation = store.changes(Collection::EnrollmentGroups);
        let oversized = match (generation, self.cached.lock()) {
            (Some(g), Ok(cached)) => cached.oversized_at == Some(g),
            _ => false,
        };
        if oversized {
            let group = records::get::<EnrollmentGroup>(
                store,
                Collection::EnrollmentGroups,
                &group_id.to_ascii_lowercase(),
            )
            .await?;
            return Ok(group.map(|g| {
                let keys = GroupKeys::of(&g.value);
                (g, keys)
            }));
        }
        Ok(self.set(store).await?.get(group_id))
    }

    /// Whether [`Self::set`] would keep what it reads: the store counts its changes and the
    /// groups were not found too many to cache at the current count.
    pub fn would_cache(&self, store: &dyn Store) -> bool {
        match (
            store.changes(Collection::EnrollmentGroups),
            self.cached.lock(),
        ) {
            (Some(g), Ok(cached)) => cached.oversized_at != Some(g),
            _ => false,
        }
    }

    /// The cached groups if they are current; `None` when [`Self::set`] would read the store.
    pub fn cached_set(&self, store: &dyn Store) -> Option<Arc<GroupSet>> {
        self.current(store.changes(Collection::EnrollmentGroups))
    }

    fn current(&self, generation: Option<u64>) -> Option<Arc<GroupSet>> {
        let g = generation?;
        let cached = self.cached.lock().ok()?;
        match &cached.set {
            Some((at, set)) if *at == g => Some(set.clone()),
            _ => None,
        }
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
