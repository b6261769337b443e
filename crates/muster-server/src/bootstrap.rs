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

pub const OWNER_POLICY: &str = "provisioningserviceowner";

const ID_SCOPE_KEY: &str = "id_scope";
const POLICIES_KEY: &str = "access_policies";

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

pub async fn load_or_create(
    store: &dyn Store,
    entropy: &dyn Entropy,
) -> Result<ServiceIdentity, StoreError> {
    let scope = IdScope::from_random(u32::from_be_bytes(random_bytes::<4>(entropy)));
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
