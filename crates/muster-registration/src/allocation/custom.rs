//! Custom allocation: POST an `AllocationRequest` to the enrollment's webhook and use the hub
//! it names (service-api.md §7). Results map to DPS's codes: 401 → 400209, no hub named →
//! 400208, any other failure → 400207; statuses ≥ 429, timeouts and connection failures are
//! retried a bounded number of times first.

use std::time::Duration;

use muster_proto::ErrorCode;
use serde_json::{json, Map, Value};

use crate::metrics::webhook_call;
use crate::DeviceFailure;

/// How Muster calls webhooks.
#[derive(Debug, Clone, Copy)]
pub struct WebhookPolicy {
    /// Per attempt.
    pub timeout: Duration,
    /// Further attempts after a retryable failure.
    pub retries: u32,
    /// Wait before the first retry; each later retry waits this much longer.
    pub backoff: Duration,
}

impl Default for WebhookPolicy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            retries: 3,
            backoff: Duration::from_secs(1),
        }
    }
}

/// The webhook's decision.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocationResponse {
    pub iot_hub_host_name: String,
    pub initial_twin: Option<Value>,
    pub payload: Option<Value>,
}

/// What the device context says about the device.
#[derive(Debug, Clone)]
pub struct DeviceRuntimeContext {
    pub registration_id: String,
    pub current_hub: Option<String>,
    pub current_device_id: Option<String>,
    /// `"symmetricKey"`, `"x509"` or `"tpm"` with its details (never secrets).
    pub attestation: (&'static str, Value),
    pub payload: Option<Value>,
}

/// Builds the `AllocationRequest` body.
pub fn request_body(
    enrollment_field: &str,
    enrollment: Value,
    device: &DeviceRuntimeContext,
    linked_hubs: &[String],
) -> Value {
    let mut ctx = Map::new();
    ctx.insert("registrationId".into(), json!(device.registration_id));
    if let Some(h) = &device.current_hub {
        ctx.insert("currentIotHubHostName".into(), json!(h));
    }
    if let Some(d) = &device.current_device_id {
        ctx.insert("currentDeviceId".into(), json!(d));
    }
    ctx.insert(device.attestation.0.into(), device.attestation.1.clone());
    if let Some(p) = &device.payload {
        ctx.insert("payload".into(), p.clone());
    }
    json!({
        enrollment_field: enrollment,
        "deviceRuntimeContext": Value::Object(ctx),
        "linkedHubs": linked_hubs,
    })
}

/// Calls the webhook under `policy`.
pub async fn call(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
    policy: WebhookPolicy,
) -> Result<AllocationResponse, DeviceFailure> {
    let mut attempt = 0;
    loop {
        let outcome = http
            .post(url)
            .timeout(policy.timeout)
            .json(body)
            .send()
            .await;
        let retryable_reason = match outcome {
            Ok(resp) => {
                let status = resp.status().as_u16();
                if status == 200 {
                    let bytes = resp.bytes().await.unwrap_or_default();
                    let parsed = parse_response(&bytes);
                    webhook_call(if parsed.is_ok() {
                        "ok"
                    } else {
                        "invalid_answer"
                    });
                    return parsed;
                }
                webhook_call(match status {
                    401 => "unauthorized",
                    s if s < 429 => "client_error",
                    429 => "throttled",
                    _ => "server_error",
                });
                if status == 401 {
                    return Err(DeviceFailure::new(
                        ErrorCode::CustomAllocationUnauthorizedAccess,
                        "the custom allocation webhook refused Muster's call (401)",
                    ));
                }
                if status < 429 {
                    return Err(DeviceFailure::new(
                        ErrorCode::CustomAllocationFailed,
                        format!("the custom allocation webhook answered {status}"),
                    ));
                }
                format!("answered {status}")
            }
            Err(e) if e.is_timeout() => {
                webhook_call("timeout");
                format!("did not answer within {:?}", policy.timeout)
            }
            Err(e) if e.is_connect() => {
                webhook_call("unreachable");
                "could not be reached".to_string()
            }
            Err(e) => {
                webhook_call("error");
                return Err(DeviceFailure::new(
                    ErrorCode::CustomAllocationFailed,
                    format!("calling the custom allocation webhook failed: {e}"),
                ));
            }
        };
        if attempt >= policy.retries {
            return Err(DeviceFailure::new(
                ErrorCode::CustomAllocationFailed,
                format!(
                    "the custom allocation webhook {retryable_reason} ({} attempts)",
                    attempt + 1
                ),
            ));
        }
        attempt += 1;
        tokio::time::sleep(policy.backoff * attempt).await;
    }
}

fn parse_response(bytes: &[u8]) -> Result<AllocationResponse, DeviceFailure> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        DeviceFailure::new(
            ErrorCode::CustomAllocationFailed,
            format!("the custom allocation webhook answered with invalid JSON: {e}"),
        )
    })?;
    let obj = v.as_object().ok_or_else(|| {
        DeviceFailure::new(
            ErrorCode::CustomAllocationFailed,
            "the custom allocation webhook's answer is not a JSON object",
        )
    })?;
    // Documentation spells it both `iotHubHostName` and `iotHubHostname`.
    let field = |name: &str| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_null())
    };
    let hub = field("iotHubHostName")
        .and_then(|v| v.as_str().map(str::trim).map(str::to_string))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            DeviceFailure::new(
                ErrorCode::CustomAllocationIotHubNotSpecified,
                "the custom allocation webhook named no iotHubHostName",
            )
        })?;
    Ok(AllocationResponse {
        iot_hub_host_name: hub,
        initial_twin: field("initialTwin"),
        payload: field("payload"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_either_spelling_and_requires_a_hub() {
        let r = parse_response(br#"{"iotHubHostname":"h1","payload":{"a":1}}"#).unwrap();
        assert_eq!(r.iot_hub_host_name, "h1");
        assert_eq!(r.payload, Some(json!({"a": 1})));
        let e = parse_response(br#"{"iotHubHostName":""}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::CustomAllocationIotHubNotSpecified);
        let e = parse_response(b"nope").unwrap_err();
        assert_eq!(e.code, ErrorCode::CustomAllocationFailed);
    }
}
