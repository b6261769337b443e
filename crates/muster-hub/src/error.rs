//! [`HubError`]: every failure of the hub registry, rendered once in the IoT Hub error style.
//!
//! Body: `{"Message":"ErrorCode:DeviceNotFound;Device 'x' not found.","ExceptionMessage":"Tracking ID:<id>-TimeStamp:<MM/dd/yyyy HH:mm:ss>"}`
//! with `Content-Type: application/json; charset=utf-8` and the header `iothub-errorcode`.
//! Node's `azure-iothub` (`Http.parseErrorBody`) takes the code from `Message` up to the first
//! `;` and the text up to the second `;`, so messages never contain `;`. Python's
//! `azure-iot-hub` (msrest `HttpOperationError`) only looks at the status code.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The IoT Hub error codes Muster's hub returns (names as in the C# SDK's `ErrorCode` enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HubErrorCode {
    /// 400: the api-version is missing or not one the hub speaks.
    InvalidProtocolVersion,
    /// 400: a value in the request is invalid (device id, key, thumbprint, twin property name, ...).
    ArgumentInvalid,
    /// 400: the body is not JSON of the expected shape.
    IotHubFormatError,
    /// 400: `deviceScope` names no IoT Edge device of this hub, an IoT Edge device's own
    /// scope was set, or `parentScopes` does not agree with `deviceScope`.
    InvalidDeviceScope,
    /// 400: a bulk registry request names a device more than once.
    DeviceDefinedMultipleTimes,
    /// 400: a bulk registry request holds more operations than the hub takes at once.
    TooManyDevices,
    /// 400: one or more operations of a bulk registry request failed (the body is the
    /// `BulkRegistryOperationResult`, not an error body).
    BulkRegistryOperationFailure,
    /// 401: no token, a bad or expired token, a token for another hub, or a policy lacking the right.
    IotHubUnauthorizedAccess,
    /// 404: no device with this id.
    DeviceNotFound,
    /// 404: a direct method was invoked on a device that is not connected (or has not
    /// subscribed to `$iothub/methods/POST/#`).
    DeviceNotOnline,
    /// 404: no such route.
    NotFound,
    /// 405: the route exists but not with this method.
    MethodNotAllowed,
    /// 409: PUT without If-Match on an existing device.
    DeviceAlreadyExists,
    /// 403: the device's cloud-to-device queue is full.
    DeviceMaximumQueueDepthExceeded,
    /// 412: If-Match names another etag.
    PreconditionFailed,
    /// 412: a cloud-to-device lock token (HTTPS complete / abandon / reject) names no
    /// message this device holds locked: unknown, already settled, or its lock expired.
    DeviceMessageLockLost,
    /// 413: the body is larger than the limit.
    MessageTooLarge,
    /// 500: storage failure or contention that did not resolve.
    ServerError,
    /// 503: the hub's store is unavailable for now (full disk, locked database); retry.
    ServiceUnavailable,
    /// 504: the device did not answer a direct method in time.
    GatewayTimeout,
}

impl HubErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            HubErrorCode::InvalidProtocolVersion => "InvalidProtocolVersion",
            HubErrorCode::ArgumentInvalid => "ArgumentInvalid",
            HubErrorCode::IotHubFormatError => "IotHubFormatError",
            HubErrorCode::InvalidDeviceScope => "InvalidDeviceScope",
            HubErrorCode::DeviceDefinedMultipleTimes => "DeviceDefinedMultipleTimes",
            HubErrorCode::TooManyDevices => "TooManyDevices",
            HubErrorCode::BulkRegistryOperationFailure => "BulkRegistryOperationFailure",
            HubErrorCode::IotHubUnauthorizedAccess => "IotHubUnauthorizedAccess",
            HubErrorCode::DeviceNotFound => "DeviceNotFound",
            HubErrorCode::DeviceNotOnline => "DeviceNotOnline",
            HubErrorCode::DeviceMaximumQueueDepthExceeded => "DeviceMaximumQueueDepthExceeded",
            HubErrorCode::GatewayTimeout => "GatewayTimeout",
            HubErrorCode::NotFound => "NotFound",
            HubErrorCode::MethodNotAllowed => "MethodNotAllowed",
            HubErrorCode::DeviceAlreadyExists => "DeviceAlreadyExists",
            HubErrorCode::PreconditionFailed => "PreconditionFailed",
            HubErrorCode::DeviceMessageLockLost => "DeviceMessageLockLost",
            HubErrorCode::MessageTooLarge => "MessageTooLarge",
            HubErrorCode::ServerError => "ServerError",
            HubErrorCode::ServiceUnavailable => "ServiceUnavailable",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            HubErrorCode::InvalidProtocolVersion
            | HubErrorCode::ArgumentInvalid
            | HubErrorCode::IotHubFormatError
            | HubErrorCode::InvalidDeviceScope
            | HubErrorCode::DeviceDefinedMultipleTimes
            | HubErrorCode::TooManyDevices
            | HubErrorCode::BulkRegistryOperationFailure => 400,
            HubErrorCode::IotHubUnauthorizedAccess => 401,
            HubErrorCode::DeviceMaximumQueueDepthExceeded => 403,
            HubErrorCode::DeviceNotFound
            | HubErrorCode::DeviceNotOnline
            | HubErrorCode::NotFound => 404,
            HubErrorCode::MethodNotAllowed => 405,
            HubErrorCode::DeviceAlreadyExists => 409,
            HubErrorCode::PreconditionFailed | HubErrorCode::DeviceMessageLockLost => 412,
            HubErrorCode::MessageTooLarge => 413,
            HubErrorCode::ServerError => 500,
            HubErrorCode::ServiceUnavailable => 503,
            HubErrorCode::GatewayTimeout => 504,
        }
    }
}

impl std::fmt::Display for HubErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed hub operation: the code says which check failed, the message says how, in words
/// that never include key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct HubError {
    pub code: HubErrorCode,
    pub message: String,
}

impl HubError {
    pub fn new(code: HubErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(HubErrorCode::ArgumentInvalid, message)
    }

    pub fn device_not_found(device_id: &str) -> Self {
        Self::new(
            HubErrorCode::DeviceNotFound,
            format!("Device '{device_id}' not found."),
        )
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(HubErrorCode::IotHubUnauthorizedAccess, message)
    }

    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        if let Some(suppressed) = INTERNAL_ERROR_LOG.admit() {
            tracing::error!(%err, suppressed, "{context}");
        }
        Self::new(
            HubErrorCode::ServerError,
            format!("internal error while {context}"),
        )
    }

    /// The `Message` field: `ErrorCode:<code>;<text>` with `;` kept out of the text.
    pub fn wire_message(&self) -> String {
        format!("ErrorCode:{};{}", self.code, self.message.replace(';', ","))
    }
}

impl From<muster_store::StoreError> for HubError {
    fn from(e: muster_store::StoreError) -> Self {
        if e.is_unavailable() {
            if let Some(suppressed) = STORE_UNAVAILABLE_LOG.admit() {
                tracing::warn!(error = %e, suppressed, "store unavailable; the hub answers 503");
            }
            return HubError::new(
                HubErrorCode::ServiceUnavailable,
                "The hub's store is temporarily unavailable, retry later.",
            );
        }
        HubError::internal("accessing the store", e)
    }
}

/// A full disk fails every request: one warning per interval, with the count held back.
static STORE_UNAVAILABLE_LOG: muster_proto::log_limit::LogLimiter =
    muster_proto::log_limit::LogLimiter::new(std::time::Duration::from_secs(10));

/// An internal error repeats on every request that meets it: one line per interval.
static INTERNAL_ERROR_LOG: muster_proto::log_limit::LogLimiter =
    muster_proto::log_limit::LogLimiter::new(std::time::Duration::from_secs(10));

/// `Retry-After` (seconds) on 503 answers.
const UNAVAILABLE_RETRY_AFTER_SECS: u32 = 5;

#[derive(Serialize)]
struct HubErrorBody {
    #[serde(rename = "Message")]
    message: String,
    #[serde(rename = "ExceptionMessage")]
    exception_message: String,
}

/// Tracking ids and the timestamp are diagnostics only, so they come from the system clock
/// and random source rather than the injected ones (as in the DPS service API).
impl IntoResponse for HubError {
    fn into_response(self) -> Response {
        let body = HubErrorBody {
            message: self.wire_message(),
            exception_message: format!(
                "Tracking ID:{}-TimeStamp:{}",
                tracking_id(),
                chrono::Utc::now().format("%m/%d/%Y %H:%M:%S")
            ),
        };
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let mut resp = (status, bytes).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        headers.insert(
            "iothub-errorcode",
            HeaderValue::from_static(self.code.as_str()),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(UNAVAILABLE_RETRY_AFTER_SECS),
            );
        }
        resp
    }
}

fn tracking_id() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_message_has_one_code_and_no_extra_semicolons() {
        let e = HubError::new(HubErrorCode::DeviceNotFound, "a;b");
        assert_eq!(e.wire_message(), "ErrorCode:DeviceNotFound;a,b");
        // Node: code = parts[0].split(':')[1], message = parts[1].
        let m = e.wire_message();
        let parts: Vec<&str> = m.split(';').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].split(':').nth(1), Some("DeviceNotFound"));
    }
}
