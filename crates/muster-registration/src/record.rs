//! The registration record as stored: the `DeviceRegistrationState` the service API shows,
//! plus what the engine needs to answer polls and finish throttled assignments. The extra
//! fields are ignored by readers that decode only the state.

use muster_proto::{DeviceRegistrationState, InitialTwin};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationRecord {
    #[serde(flatten)]
    pub state: DeviceRegistrationState,
    /// The operation the device polls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    /// Set when the device registered through a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// An accepted assignment still waiting for its hub (throttled); finished in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingAssignment>,
}

/// Where the device's hub credentials come from, so they are recomputed rather than stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", content = "id")]
pub enum EnrollmentRef {
    Individual(String),
    Group(String),
}

/// What to do with the twin on the target hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "action")]
pub enum TwinPlan {
    /// Write the initial twin (first assignment, or reset).
    Initial { twin: Option<InitialTwin> },
    /// Copy tags and desired properties from the device on the previous hub.
    Migrate { from_hub: String },
    /// Leave the twin as it is.
    Keep,
}

/// Everything needed to finish an assignment after a crash or a throttling delay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingAssignment {
    pub enrollment: EnrollmentRef,
    pub hub: String,
    pub device_id: String,
    pub iot_edge: bool,
    pub twin: TwinPlan,
    /// The hub to remove the device from once it is on `hub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_from: Option<String>,
    /// Whether this is an initial assignment (substatus decided by whether the hub knew the device).
    pub initial: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<muster_proto::RegistrationSubstatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// X.509 devices: the leaf's SHA-256 thumbprint, the hub identity's `selfSigned`
    /// thumbprint (the certificate itself is not kept, so it can't be recomputed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbprint: Option<String>,
}
