//! Individual enrollments and enrollment groups, and the settings they share.
//!
//! Null and absent fields follow DPS (service-api.md §4.2): a field sent as `null` is treated as
//! absent and omitted on output, except `provisioningStatus`, which defaults to `enabled` when
//! absent and is echoed as `null` when sent as `null` (and then behaves as enabled).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::attestation::AttestationMechanism;
use crate::ids::{EnrollmentGroupId, RegistrationId};
use crate::registration::DeviceRegistrationState;
use crate::str_enum;
use crate::time::Timestamp;
use crate::twin::InitialTwin;

str_enum! {
    /// Whether an enrollment lets devices register.
    ProvisioningStatus, "provisioning status" {
        Enabled => "enabled",
        Disabled => "disabled",
    }
}

str_enum! {
    /// How a hub is chosen among the candidates (service-api.md §8.2).
    AllocationPolicy, "allocation policy" {
        Hashed => "hashed",
        GeoLatency => "geoLatency",
        Static => "static",
        Custom => "custom",
    }
}

fn enabled() -> Option<ProvisioningStatus> {
    Some(ProvisioningStatus::Enabled)
}

/// `provisioningStatus` is always written, `null` included.
fn is_never(_: &Option<ProvisioningStatus>) -> bool {
    false
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    #[serde(default = "yes")]
    pub update_hub_assignment: bool,
    #[serde(default = "yes")]
    pub migrate_device_data: bool,
}

fn yes() -> bool {
    true
}

impl Default for ReprovisionPolicy {
    /// DPS's behaviour for enrollments without a policy: re-evaluate and migrate.
    fn default() -> Self {
        Self {
            update_hub_assignment: true,
            migrate_device_data: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCapabilities {
    #[serde(default)]
    pub iot_edge: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomAllocationDefinition {
    pub webhook_url: String,
    pub api_version: String,
}

/// One device's enrollment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndividualEnrollment {
    pub registration_id: RegistrationId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional_device_information: Option<Value>,
    pub attestation: AttestationMechanism,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<InitialTwin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default = "enabled", skip_serializing_if = "is_never")]
    pub provisioning_status: Option<ProvisioningStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<AllocationPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
    /// Muster extension: whether devices of this enrollment may send a CSR with their
    /// registration and get a certificate (absent: CSRs are refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_issuance: Option<CertificateIssuance>,
}

/// Many devices sharing one attestation (a group key, a signing certificate or a CA).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentGroup {
    pub enrollment_group_id: EnrollmentGroupId,
    pub attestation: AttestationMechanism,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<InitialTwin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default = "enabled", skip_serializing_if = "is_never")]
    pub provisioning_status: Option<ProvisioningStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<AllocationPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
    /// Muster extension: whether devices of this enrollment may send a CSR with their
    /// registration and get a certificate (absent: CSRs are refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_issuance: Option<CertificateIssuance>,
}

/// Muster's `certificateIssuance` extension of enrollments and groups: the device sends a
/// PKCS #10 CSR with its registration (`csr`, api-version `2025-07-01-preview` or later) and
/// gets an X.509 chain issued by Muster's issuing CA (device-protocol.md §9.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateIssuance {
    /// Whether CSRs are accepted (`false` keeps the settings but refuses CSRs).
    pub enabled: bool,
    /// Days the issued certificate is valid ([`CertificateIssuance::DEFAULT_VALIDITY_DAYS`]
    /// when absent; 1 to [`CertificateIssuance::MAX_VALIDITY_DAYS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validity_days: Option<u32>,
    /// The key types a CSR may carry (every supported one when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_types: Option<Vec<CsrKeyType>>,
    /// Which issuing CA signs: `local` (Muster's intermediate, also when absent) or the name
    /// of an operator CA the server is configured with (`--issuing-ca NAME=CERT,KEY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuing_ca: Option<String>,
}

impl CertificateIssuance {
    pub const DEFAULT_VALIDITY_DAYS: u32 = 30;
    /// What public-CA rules allow for a leaf (397 days).
    pub const MAX_VALIDITY_DAYS: u32 = 397;

    /// The issuing CA's name ([`crate::issued_certificate::LOCAL_ISSUING_CA`] when unset).
    pub fn issuing_ca(&self) -> &str {
        self.issuing_ca
            .as_deref()
            .unwrap_or(crate::issued_certificate::LOCAL_ISSUING_CA)
    }

    pub fn validity_days(&self) -> u32 {
        self.validity_days.unwrap_or(Self::DEFAULT_VALIDITY_DAYS)
    }

    /// Whether a CSR with a key of `kind` is allowed.
    pub fn allows(&self, kind: CsrKeyType) -> bool {
        self.key_types.as_ref().is_none_or(|k| k.contains(&kind))
    }

    /// The settings' own check, for the service API: the validity range.
    pub fn validate(&self) -> Result<(), String> {
        match self.validity_days {
            Some(d) if d == 0 || d > Self::MAX_VALIDITY_DAYS => Err(format!(
                "certificateIssuance.validityDays must be 1 to {}, not {d}",
                Self::MAX_VALIDITY_DAYS
            )),
            _ => Ok(()),
        }
    }
}

str_enum! {
    /// The key types a CSR may carry: RSA of at least 2048 bits, ECDSA on P-256 or P-384,
    /// Ed25519.
    CsrKeyType, "CSR key type" {
        Rsa => "rsa",
        EcP256 => "ecP256",
        EcP384 => "ecP384",
        Ed25519 => "ed25519",
    }
}

impl IndividualEnrollment {
    /// `null` behaves as enabled (a real group with `provisioningStatus: null` provisions).
    pub fn is_enabled(&self) -> bool {
        self.provisioning_status != Some(ProvisioningStatus::Disabled)
    }
}

impl EnrollmentGroup {
    pub fn is_enabled(&self) -> bool {
        self.provisioning_status != Some(ProvisioningStatus::Disabled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn provisioning_status_absent_defaults_null_echoes() {
        let absent: IndividualEnrollment = serde_json::from_value(json!({
            "registrationId": "a", "attestation": {"type": "symmetricKey"}
        }))
        .unwrap();
        assert_eq!(
            absent.provisioning_status,
            Some(ProvisioningStatus::Enabled)
        );
        let null: IndividualEnrollment = serde_json::from_value(json!({
            "registrationId": "a", "attestation": {"type": "symmetricKey"}, "provisioningStatus": null,
            "capabilities": null, "iotHubs": null, "initialTwin": null
        }))
        .unwrap();
        let out = serde_json::to_value(&null).unwrap();
        assert_eq!(out["provisioningStatus"], Value::Null);
        assert!(out.get("capabilities").is_none());
        assert!(null.is_enabled());
    }

    #[test]
    fn enums_parse_case_insensitively_and_print_exactly() {
        let e: EnrollmentGroup = serde_json::from_value(json!({
            "enrollmentGroupId": "g", "attestation": {"type": "SYMMETRICKEY"},
            "allocationPolicy": "geolatency", "provisioningStatus": "Disabled"
        }))
        .unwrap();
        let out = serde_json::to_value(&e).unwrap();
        assert_eq!(out["allocationPolicy"], "geoLatency");
        assert_eq!(out["attestation"]["type"], "symmetricKey");
        assert_eq!(out["provisioningStatus"], "disabled");
    }

    #[test]
    fn unknown_attestation_type_names_the_choices() {
        let err = serde_json::from_value::<IndividualEnrollment>(json!({
            "registrationId": "a", "attestation": {"type": "password"}
        }))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("unknown attestation type \"password\""),
            "{err}"
        );
        assert!(err.contains("symmetricKey"), "{err}");
    }
}
