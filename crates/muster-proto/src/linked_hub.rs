//! Linked IoT hubs, managed through Muster's service-API extension `/linkedHubs` (DPS keeps
//! them in the Azure management plane, which a self-hosted server has no equivalent of).

use serde::{Deserialize, Serialize};

/// A hub the DPS may assign devices to, as the API shows it: the key is never returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkedHubInfo {
    /// The hub's host name, e.g. `myhub.azure-devices.net`; what devices are told to connect to.
    pub name: String,
    /// Policy name from the connection string (the key itself is not shown).
    pub key_name: String,
    pub allocation_weight: u32,
    pub apply_allocation_policy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Registrations per second Muster sends to this hub at most; `None` = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_registrations_per_second: Option<u32>,
    /// True for the hub Muster itself runs.
    #[serde(default)]
    pub built_in: bool,
}

/// `PUT /linkedHubs/{name}` body. Omitted fields keep their current value on update.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkedHubRequest {
    /// `HostName=..;SharedAccessKeyName=..;SharedAccessKey=..` of a policy with RegistryWrite
    /// and ServiceConnect. Required when the hub is new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_string: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_allocation_policy: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_registrations_per_second: Option<u32>,
    /// Link (or change the connection string) without first checking that the connection
    /// string works (a registry read against the hub); for a hub that is not up yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_check: Option<bool>,
}

/// A linked hub as stored, with its connection string (a secret: never logged, never
/// returned by the API).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkedHub {
    pub name: String,
    pub connection_string: String,
    pub allocation_weight: u32,
    pub apply_allocation_policy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_registrations_per_second: Option<u32>,
    #[serde(default)]
    pub built_in: bool,
}

impl std::fmt::Debug for LinkedHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkedHub")
            .field("name", &self.name)
            .field("allocation_weight", &self.allocation_weight)
            .field("apply_allocation_policy", &self.apply_allocation_policy)
            .finish_non_exhaustive()
    }
}

impl LinkedHub {
    /// The lookup key: host names are case-insensitive.
    pub fn key(name: &str) -> String {
        name.to_ascii_lowercase()
    }

    pub fn info(&self) -> LinkedHubInfo {
        let key_name = crate::ConnectionString::parse(&self.connection_string)
            .map(|c| c.key_name)
            .unwrap_or_default();
        LinkedHubInfo {
            name: self.name.clone(),
            key_name,
            allocation_weight: self.allocation_weight,
            apply_allocation_policy: self.apply_allocation_policy,
            location: self.location.clone(),
            max_registrations_per_second: self.max_registrations_per_second,
            built_in: self.built_in,
        }
    }
}
