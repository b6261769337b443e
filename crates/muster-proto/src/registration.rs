//! `DeviceRegistrationState`: the record of a device's registration.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::device::X509RegistrationResult;
use crate::ids::RegistrationId;
use crate::str_enum;
use crate::time::Timestamp;

str_enum! {
    RegistrationStatus, "registration status" {
        Unassigned => "unassigned",
        Assigning => "assigning",
        Assigned => "assigned",
        Failed => "failed",
        Disabled => "disabled",
    }
}

str_enum! {
    RegistrationSubstatus, "registration substatus" {
        InitialAssignment => "initialAssignment",
        DeviceDataMigrated => "deviceDataMigrated",
        DeviceDataReset => "deviceDataReset",
        ReprovisionedToInitialAssignment => "reprovisionedToInitialAssignment",
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistrationState {
    pub registration_id: RegistrationId,
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
    /// X.509 devices: the leaf's and the signing certificate's info and the group (Muster adds
    /// this to the record; DPS shows it only in the device's answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509RegistrationResult>,
    /// Muster extension: the certificate issued for the device's last CSR (public data only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_certificate: Option<IssuedCertificateInfo>,
}

/// What Muster records of a certificate it issued for a device's CSR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCertificateInfo {
    /// Upper-case hex, as `x509.certificateInfo.serialNumber`.
    pub serial_number: String,
    /// Upper-case hex SHA-256 of the DER: the thumbprint the device's hub identity carries.
    pub sha256_thumbprint: String,
    pub subject_name: String,
    pub issuer_name: String,
    pub not_before_utc: Timestamp,
    pub not_after_utc: Timestamp,
}

impl DeviceRegistrationState {
    /// What an individual enrollment's GET embeds before its device ever registered.
    pub fn unassigned(registration_id: RegistrationId) -> Self {
        Self {
            registration_id,
            created_date_time_utc: None,
            assigned_hub: None,
            device_id: None,
            status: RegistrationStatus::Unassigned,
            substatus: None,
            error_code: None,
            error_message: None,
            last_updated_date_time_utc: None,
            etag: None,
            payload: None,
            x509: None,
            issued_certificate: None,
        }
    }
}
