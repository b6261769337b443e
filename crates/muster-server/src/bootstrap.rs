//! First start and every start: the service's identity kept in the store (ID scope, shared
//! access policies). Created once with `Expect::Absent`, so a second node sharing the store
//! adopts the first node's values instead of overwriting them.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_proto::runtime::{random_bytes, Entropy};
use muster_proto::{AccessRights, IdScope};
use muster_service_api::AccessPolicy;
use muster_store::{Collection, Expect, Store, StoreError, Write};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

pub use muster_service_api::OWNER_POLICY;
pub const HUB_OWNER_POLICY: &str = "iothubowner";
const HUB_POLICIES_KEY: &str = "hub_policies";
const HUB_STORAGE_NAME_KEY: &str = "built_in_hub_storage_name";

const ID_SCOPE_KEY: &str = "id_scope";
use muster_service_api::POLICIES_KEY;

/// The service identity read from (or created in) the store.
#[derive(Debug, Clone)]
pub struct ServiceIdentity {
    pub id_scope: IdScope,
    pub policies: Vec<AccessPolicy>,
}

impl ServiceIdentity {
    pub fn owner(&self) -> Option<&AccessPolicy> {
        self.policies.iter().find(|p| p.key_name == OWNER_POLICY)
    }
}

fn new_key(entropy: &dyn Entropy) -> String {
    B64.encode(random_bytes::<32>(entropy))
}

/// `id_scope` is the scope a new store takes (a random one when `None`); a store that has
/// one keeps it, whatever `id_scope` says (the caller compares).
pub async fn load_or_create(
    store: &dyn Store,
    entropy: &dyn Entropy,
    id_scope: Option<&IdScope>,
) -> Result<ServiceIdentity, StoreError> {
    let scope = match id_scope {
        Some(scope) => scope.clone(),
        None => IdScope::from_random(u32::from_be_bytes(random_bytes::<4>(entropy))),
    };
    let id_scope: IdScope = get_or_insert(store, ID_SCOPE_KEY, &scope).await?;
    let owner = vec![AccessPolicy {
        key_name: OWNER_POLICY.into(),
        primary_key: new_key(entropy),
        secondary_key: new_key(entropy),
        rights: AccessRights::all(),
    }];
    let policies: Vec<AccessPolicy> = get_or_insert(store, POLICIES_KEY, &owner).await?;
    Ok(ServiceIdentity { id_scope, policies })
}

/// Returns the stored setting, storing `default` first when there is none.
async fn get_or_insert<T: Serialize + DeserializeOwned>(
    store: &dyn Store,
    key: &str,
    default: &T,
) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        collection: Collection::Settings.as_str(),
        key: key.to_string(),
        reason,
    };
    if let Some(r) = store.get(Collection::Settings, key).await? {
        return serde_json::from_value(r.body).map_err(|e| corrupt(e.to_string()));
    }
    let body: Value = serde_json::to_value(default).map_err(|e| corrupt(e.to_string()))?;
    store
        .write(vec![Write::put(
            Collection::Settings,
            key,
            Expect::Absent,
            body,
        )])
        .await?;
    // Whoever won a race, the stored value is the one to use.
    let r = store
        .get(Collection::Settings, key)
        .await?
        .ok_or_else(|| corrupt("missing right after it was written".into()))?;
    serde_json::from_value(r.body).map_err(|e| corrupt(e.to_string()))
}

/// The built-in hub's shared access policies, created on first start.
pub async fn hub_policies(
    store: &dyn Store,
    entropy: &dyn Entropy,
) -> Result<Vec<muster_hub::HubPolicy>, StoreError> {
    let defaults = muster_hub::default_policies(entropy);
    get_or_insert(store, HUB_POLICIES_KEY, &defaults).await
}

/// The name the built-in hub's records are stored under: the host it had when this was
/// first asked (kept in the settings), so its devices, twins and messages stay put when its
/// address changes. A store from before this setting takes the built-in linked hub's name,
/// which is what its records are keyed by.
pub async fn built_in_hub_storage_name(
    store: &dyn Store,
    hub_name: &str,
) -> Result<String, StoreError> {
    use muster_proto::linked_hub::LinkedHub;
    if let Some(r) = store
        .get(Collection::Settings, HUB_STORAGE_NAME_KEY)
        .await?
    {
        if let Some(name) = r.body.as_str() {
            return Ok(name.to_string());
        }
    }
    let mut current = hub_name.to_ascii_lowercase();
    for r in muster_store::records::list_all(store, Collection::LinkedHubs, 500).await? {
        if let Ok(hub) = serde_json::from_value::<LinkedHub>(r.body) {
            if hub.built_in {
                current = hub.name.to_ascii_lowercase();
            }
        }
    }
    get_or_insert(store, HUB_STORAGE_NAME_KEY, &current).await
}

/// Links the built-in hub and the configured hubs. The built-in hub keeps its weight and
/// allocation flag if an operator changed them; its connection string follows the config.
pub async fn link_hubs(
    store: &dyn Store,
    built_in_name: &str,
    built_in_connection_string: &str,
    configured: &[crate::config::LinkedHubConfig],
) -> Result<(), StoreError> {
    use muster_proto::linked_hub::LinkedHub;
    let mut wanted = vec![LinkedHub {
        name: built_in_name.to_string(),
        connection_string: built_in_connection_string.to_string(),
        allocation_weight: 1,
        apply_allocation_policy: true,
        location: None,
        max_registrations_per_second: None,
        built_in: true,
    }];
    for h in configured {
        let Ok(cs) = muster_proto::ConnectionString::parse(&h.connection_string) else {
            continue;
        };
        wanted.push(LinkedHub {
            name: cs.host_name,
            connection_string: h.connection_string.clone(),
            allocation_weight: h.allocation_weight,
            apply_allocation_policy: h.apply_allocation_policy,
            location: h.location.clone(),
            max_registrations_per_second: h.max_registrations_per_second,
            built_in: false,
        });
    }
    // A built-in hub that was renamed (new host or port, a restore on another host) takes
    // every reference to its old name along (see `hub_rename`).
    for r in muster_store::records::list_all(store, Collection::LinkedHubs, 500).await? {
        if let Ok(old) = serde_json::from_value::<LinkedHub>(r.body.clone()) {
            if old.built_in && !old.name.eq_ignore_ascii_case(built_in_name) {
                crate::hub_rename::rename_built_in_hub(store, r, &old, built_in_name).await?;
            }
        }
    }
    for mut hub in wanted {
        let key = LinkedHub::key(&hub.name);
        let existing = store.get(Collection::LinkedHubs, &key).await?;
        let expect = match &existing {
            Some(r) => {
                if hub.built_in {
                    if let Ok(old) = serde_json::from_value::<LinkedHub>(r.body.clone()) {
                        hub.allocation_weight = old.allocation_weight;
                        hub.apply_allocation_policy = old.apply_allocation_policy;
                        hub.location = old.location;
                        hub.max_registrations_per_second = old.max_registrations_per_second;
                    }
                }
                Expect::Etag(r.etag.clone())
            }
            None => Expect::Absent,
        };
        let body = serde_json::to_value(&hub).map_err(|e| StoreError::Backend(e.to_string()))?;
        if existing.as_ref().map(|r| &r.body) != Some(&body) {
            store
                .write(vec![Write::put(Collection::LinkedHubs, key, expect, body)])
                .await?;
        }
    }
    Ok(())
}
