//! [`DeviceReply`]: the transport-neutral answer to a device.

use muster_proto::device::RegistrationOperationStatus;
use muster_proto::{ErrorBody, ErrorCode, RegistrationStatus, Timestamp};
use serde_json::Value;

/// `retry-after` (seconds) for 503 answers (the store or the hub unavailable).
pub const STORE_RETRY_AFTER_SECS: u32 = 5;

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceReply {
    /// HTTP status, also the `{status}` of the MQTT response topic.
    pub status: u16,
    /// Seconds the device should wait before polling or retrying.
    pub retry_after: Option<u32>,
    /// `RegistrationOperationStatus` or the DPS error body; always JSON.
    pub body: Value,
}

impl DeviceReply {
    /// The answer to a register request: always 202 (C# accepts nothing else), carrying
    /// `assigned` and the full state when assignment already completed.
    pub fn registered(op: &RegistrationOperationStatus, retry_after: Option<u32>) -> Self {
        Self {
            status: 202,
            retry_after: if op.status == RegistrationStatus::Assigning {
                retry_after
            } else {
                None
            },
            body: serde_json::to_value(op).unwrap_or(Value::Null),
        }
    }

    /// The answer to a poll: 202 while assigning, 200 once settled.
    pub fn polled(op: &RegistrationOperationStatus, retry_after: Option<u32>) -> Self {
        let assigning = op.status == RegistrationStatus::Assigning;
        Self {
            status: if assigning { 202 } else { 200 },
            retry_after: if assigning { retry_after } else { None },
            body: serde_json::to_value(op).unwrap_or(Value::Null),
        }
    }

    /// The TPM challenge (device-protocol.md §7.1): 401 with the activation blob and the key
    /// name, and no `status` (the C SDK reads a body without one as the challenge).
    pub fn tpm_challenge(authentication_key: String, key_name: &str) -> Self {
        Self {
            status: 401,
            retry_after: None,
            body: serde_json::json!({
                "authenticationKey": authentication_key,
                "keyName": key_name,
                "message": "activate the authenticationKey in the TPM and sign the SAS token with the imported key",
            }),
        }
    }

    /// An error in the DPS error shape; `tracking_id` and `now` come from the caller.
    pub fn error(
        code: ErrorCode,
        message: impl Into<String>,
        tracking_id: String,
        now: Timestamp,
    ) -> Self {
        let body = ErrorBody {
            error_code: code.code(),
            tracking_id,
            message: message.into(),
            info: None,
            timestamp_utc: now.to_dps_string(),
        };
        Self {
            status: code.status(),
            retry_after: match code.status() {
                429 => Some(1),
                // A full disk or a locked database rarely clears within a second.
                503 => Some(STORE_RETRY_AFTER_SECS),
                _ => None,
            },
            body: serde_json::to_value(&body).unwrap_or(Value::Null),
        }
    }
}
