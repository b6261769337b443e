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
//!
//! A [`GroupSet`] also carries what spares searches while it stands: the groups that matched
//! recently, and fingerprints of tokens a full search refused; a write to the groups makes a
//! new set, so neither outlives the groups it was learnt from.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher as _, RandomState};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use muster_attestation::symmetric_key;
use muster_proto::{AttestationType, EnrollmentGroup, SasToken};
use muster_store::records::{self, Stored};
use muster_store::{Collection, Store, StoreError};
use sha2::Sha256;

use crate::group_search::GroupSearch;

/// More groups than this are read page by page each time instead of being held in memory.
const MAX_CACHED_GROUPS: usize = 10_000;
const PAGE: usize = 500;

type Groups = Arc<[Stored<EnrollmentGroup>]>;

/// Which of a group's two keys a device key is derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySlot {
    Primary,
    Secondary,
}

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
        let (primary, secondary) = raw_keys(group)?;
        Some(Self {
            primary: Hmac::<Sha256>::new_from_slice(&primary).ok()?,
            secondary: Hmac::<Sha256>::new_from_slice(&secondary).ok()?,
        })
    }

    fn keyed(&self, slot: KeySlot) -> &Hmac<Sha256> {
        match slot {
            KeySlot::Primary => &self.primary,
            KeySlot::Secondary => &self.secondary,
        }
    }

    /// The raw device key of `registration_id` (as the device sends it) in `slot`.
    pub fn derive_one(&self, slot: KeySlot, registration_id: &str) -> [u8; 32] {
        let mut mac = self.keyed(slot).clone();
        mac.update(registration_id.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The raw device keys of `registration_id` (as the device sends it): primary, secondary.
    pub fn derive(&self, registration_id: &str) -> ([u8; 32], [u8; 32]) {
        (
            self.derive_one(KeySlot::Primary, registration_id),
            self.derive_one(KeySlot::Secondary, registration_id),
        )
    }
}

/// A symmetric-key group's decoded primary and secondary keys.
fn raw_keys(group: &EnrollmentGroup) -> Option<(Vec<u8>, Vec<u8>)> {
    if group.attestation.kind != AttestationType::SymmetricKey {
        return None;
    }
    let sk = group.attestation.symmetric_key.as_ref()?;
    let decode = |k: Option<&str>| symmetric_key::decode_key(k?).ok();
    Some((
        decode(sk.primary_key.as_deref())?,
        decode(sk.secondary_key.as_deref())?,
    ))
}

/// The key HMAC actually uses for `raw`: longer than a block, its hash; then without trailing
/// zero bytes (HMAC pads the key with zeros, so `k` and `k || 0` sign alike). Two group keys
/// derive the same device keys exactly when these are equal.
fn hmac_equivalence(raw: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    let key = if raw.len() > 64 {
        Sha256::digest(raw).to_vec()
    } else {
        raw.to_vec()
    };
    let end = key.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    key[..end].to_vec()
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
    /// For each symmetric-key group and each of its keys: the first group in id order holding
    /// an equivalent key, the group a search in id order finds for a device key derived from
    /// it. Lets [`GroupSet::recent_signing`] answer exactly what the full search would.
    first_holder: Vec<[usize; 2]>,
    /// Groups that recently matched a search, most recent first (see [`RECENT_GROUPS`]).
    recent: Mutex<Vec<usize>>,
    /// Tokens a full search found no group for, while these groups stand (see
    /// [`GroupSet::was_refused`]).
    refused: Mutex<HashSet<u64>>,
    refused_hasher: RandomState,
}

/// How many refused tokens a group set remembers; when full it forgets them all (a flood of
/// distinct forged tokens gains nothing from the memory anyway).
const REFUSED_TOKENS: usize = 4096;

/// How many recently matched groups a search tries before all of them. Devices are usually
/// rolled out group by group, so a first registration's group is mostly one that matched a
/// moment ago; the few extra tries cost a forged token little.
pub const RECENT_GROUPS: usize = 4;

impl GroupSet {
    pub(crate) fn new(groups: Vec<Stored<EnrollmentGroup>>) -> Self {
        let by_id = groups
            .iter()
            .enumerate()
            .map(|(i, g)| (g.value.enrollment_group_id.as_str().to_ascii_lowercase(), i))
            .collect();
        let raw: Vec<_> = groups.iter().map(|g| raw_keys(&g.value)).collect();
        let keys: Vec<_> = groups.iter().map(|g| GroupKeys::of(&g.value)).collect();
        let mut holders: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut first_holder = vec![[0, 0]; groups.len()];
        for (i, pair) in raw.iter().enumerate() {
            let Some((primary, secondary)) = pair.as_ref().filter(|_| keys[i].is_some()) else {
                continue;
            };
            let mut holder = |k: &[u8]| *holders.entry(hmac_equivalence(k)).or_insert(i);
            first_holder[i] = [holder(primary), holder(secondary)];
        }
        Self {
            groups: groups.into(),
            by_id,
            keys,
            first_holder,
            recent: Mutex::new(Vec::with_capacity(RECENT_GROUPS + 1)),
            refused: Mutex::new(HashSet::new()),
            refused_hasher: RandomState::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The symmetric-key groups with usable keys, in id order, with their index.
    fn symmetric(&self) -> impl Iterator<Item = (usize, &GroupKeys)> {
        self.keys
            .iter()
            .enumerate()
            .filter_map(|(i, k)| Some((i, k.as_ref()?)))
    }

    /// How many groups a search tries at most: its work.
    pub fn symmetric_count(&self) -> usize {
        self.keys.iter().filter(|k| k.is_some()).count()
    }

    /// The first symmetric-key group in id order whose derived key signed the token (the
    /// messages are `token.signed_messages()`), with the device's raw keys in it.
    pub fn first_signing(
        &self,
        registration_id: &str,
        token: &SasToken,
        messages: &[String],
    ) -> Option<Found> {
        let (index, _) = self.symmetric().find_map(|(i, keys)| {
            signing_slot(keys, registration_id, token, messages).map(|slot| (i, slot))
        })?;
        self.note_match(index);
        self.found(index, registration_id)
    }

    /// What [`Self::first_signing`] would answer, if one of the recently matched groups
    /// signed the token; `None` otherwise (try them all).
    pub fn recent_signing(
        &self,
        registration_id: &str,
        token: &SasToken,
        messages: &[String],
    ) -> Option<Found> {
        let recent = self.recent.lock().ok()?.clone();
        let (index, slot) = recent.into_iter().find_map(|i| {
            let keys = self.keys.get(i)?.as_ref()?;
            signing_slot(keys, registration_id, token, messages).map(|slot| (i, slot))
        })?;
        let first = self.first_holder[index][slot as usize];
        self.note_match(first);
        self.found(first, registration_id)
    }

    fn found(&self, index: usize, registration_id: &str) -> Option<Found> {
        let keys = self.keys.get(index)?.as_ref()?;
        Some(Found {
            group: self.groups[index].clone(),
            device_keys: keys.derive(registration_id),
        })
    }

    fn note_match(&self, index: usize) {
        if let Ok(mut recent) = self.recent.lock() {
            recent.retain(|i| *i != index);
            recent.insert(0, index);
            recent.truncate(RECENT_GROUPS);
        }
    }

    /// Whether a full search through these groups already found no group for this exact token
    /// (a replay, or a device retrying with a wrong key): the answer cannot have changed, since
    /// a write to the groups makes a new set. Keyed by the whole token, never by the id alone,
    /// so forging tokens for a device's id cannot lock the device out.
    pub fn was_refused(&self, registration_id: &str, token: &SasToken) -> bool {
        let fingerprint = self.fingerprint(registration_id, token);
        self.refused
            .lock()
            .is_ok_and(|refused| refused.contains(&fingerprint))
    }

    /// Remembers that a full search found no group for this token.
    pub fn note_refused(&self, registration_id: &str, token: &SasToken) {
        let fingerprint = self.fingerprint(registration_id, token);
        if let Ok(mut refused) = self.refused.lock() {
            if refused.len() >= REFUSED_TOKENS {
                refused.clear();
            }
            refused.insert(fingerprint);
        }
    }

    /// A keyed 64-bit hash of what the search's answer depends on (random key per set, so
    /// nobody can aim a collision at another device's token).
    fn fingerprint(&self, registration_id: &str, token: &SasToken) -> u64 {
        self.refused_hasher.hash_one((
            registration_id,
            &token.sr_raw,
            token.expiry,
            &token.signature,
        ))
    }

    fn get(&self, group_id: &str) -> Option<(Stored<EnrollmentGroup>, Option<GroupKeys>)> {
        let i = *self.by_id.get(&group_id.to_ascii_lowercase())?;
        Some((self.groups[i].clone(), self.keys[i].clone()))
    }
}

/// A group whose derived key signed the token, and the device's raw keys in it.
pub struct Found {
    pub group: Stored<EnrollmentGroup>,
    pub device_keys: ([u8; 32], [u8; 32]),
}

/// Which of `keys` the token is signed with a device key derived from, for `registration_id`;
/// the primary is tried first and the secondary only if it does not sign. `messages` are
/// `token.signed_messages()`. No allocation: two HMAC states are cloned per key tried.
pub fn signing_slot(
    keys: &GroupKeys,
    registration_id: &str,
    token: &SasToken,
    messages: &[String],
) -> Option<KeySlot> {
    [KeySlot::Primary, KeySlot::Secondary]
        .into_iter()
        .find(|slot| {
            let device_key = keys.derive_one(*slot, registration_id);
            Hmac::<Sha256>::new_from_slice(&device_key)
                .map(|keyed| token.signature_matches(&keyed, messages))
                .unwrap_or(false)
        })
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
    use sha2::Digest as _;

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

    #[test]
    fn keys_hmac_treats_alike_are_equivalent() {
        assert_eq!(hmac_equivalence(&[1, 2, 0, 0]), hmac_equivalence(&[1, 2]));
        assert_ne!(hmac_equivalence(&[1, 2, 0, 1]), hmac_equivalence(&[1, 2]));
        let long = [9u8; 80];
        assert_eq!(hmac_equivalence(&long), Sha256::digest(long).to_vec());
        for (a, b) in [
            (vec![3u8; 20], vec![3u8; 20]),
            (vec![3u8; 20], {
                let mut k = vec![3u8; 20];
                k.extend([0, 0]);
                k
            }),
        ] {
            let (ka, kb) = (
                Hmac::<Sha256>::new_from_slice(&a).unwrap(),
                Hmac::<Sha256>::new_from_slice(&b).unwrap(),
            );
            assert_eq!(
                ka.chain_update(b"id").finalize().into_bytes(),
                kb.chain_update(b"id").finalize().into_bytes()
            );
        }
    }
}
