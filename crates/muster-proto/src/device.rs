//! Device-facing registration messages (device-protocol.md §1), identical on HTTPS, MQTT and
//! AMQP: the register request body, the operation status answer and the registration result.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::attestation::X509CertificateInfo;
use crate::registration::{RegistrationStatus, RegistrationSubstatus};
use crate::time::Timestamp;

/// The register request body. Every field is optional: the registration id is authoritative
/// from the path, topic or link, and C# sends an empty body over MQTT.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<DeviceTpm>,
    /// Any JSON the device sends for a custom allocation webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// `2025-07-01-preview`+: a PKCS #10 certificate signing request, base64 DER without PEM
    /// armour, CN = the registration id (device-protocol.md §9.2). `null` is the same as absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceTpm {
    pub endorsement_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_root_key: Option<String>,
}

/// The answer to register and to operation status polls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationOperationStatus {
    pub operation_id: String,
    pub status: RegistrationStatus,
    /// Always present: C# dereferences it unconditionally and iot-identity-service needs it.
    pub registration_state: DeviceRegistrationResult,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistrationResult {
    pub registration_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub status: RegistrationStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<RegistrationSubstatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyRegistrationResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509RegistrationResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmRegistrationResult>,
    /// `2025-07-01-preview`+: the certificate issued for the device's CSR and its issuers,
    /// base64 DER each, leaf first, ending with the root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_certificate_chain: Option<Vec<String>>,
}

impl DeviceRegistrationResult {
    pub fn new(registration_id: impl Into<String>, status: RegistrationStatus) -> Self {
        Self {
            registration_id: registration_id.into(),
            created_date_time_utc: None,
            assigned_hub: None,
            device_id: None,
            status,
            substatus: None,
            error_code: None,
            error_message: None,
            last_updated_date_time_utc: None,
            etag: None,
            payload: None,
            symmetric_key: None,
            x509: None,
            tpm: None,
            issued_certificate_chain: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyRegistrationResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509RegistrationResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_info: Option<X509CertificateInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificate_info: Option<X509CertificateInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmRegistrationResult {
    pub authentication_key: String,
}
