//! Service-wide settings the service API's `/serviceSettings` route writes and the
//! registration engine reads: today the default allocation policy, used by enrollments that
//! set none (DPS's portal calls it the service's allocation policy; Azure's default is hashed).

use serde::{Deserialize, Serialize};

use crate::AllocationPolicy;

/// The store key (in the settings collection) the service settings live under.
pub const SERVICE_SETTINGS_KEY: &str = "service_settings";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSettings {
    /// `None`: the server's configured default (hashed unless configured otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<AllocationPolicy>,
}
