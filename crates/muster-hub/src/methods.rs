//! Direct methods: the service invokes, the connected device answers.
//!
//! | Method | Path | Right | Success | Failures |
//! |---|---|---|---|---|
//! | POST | `/twins/{id}/methods` | ServiceConnect | 200 `{"status": <device status>, "payload": <device payload>}` | 400, 401, 404 `DeviceNotFound` / `DeviceNotOnline`, 413, 504 `GatewayTimeout` |
//!
//! Request body, as Python `azure-iot-hub` 2.7.0 (`CloudToDeviceMethod`) and Node
//! `azure-iothub` (`Client.invokeDeviceMethod`) send it:
//! `{"methodName": "..", "payload": <any JSON>, "responseTimeoutInSeconds": n,
//! "connectTimeoutInSeconds": m}`. `responseTimeoutInSeconds` missing or 0 means 30, at most
//! 300 (IoT Hub's minimum is 5; Muster accepts from 1). `connectTimeoutInSeconds` (default 0,
//! at most 300) is how long to wait for a device that is not connected (and subscribed to
//! `$iothub/methods/POST/#`) before answering 404 `DeviceNotOnline` (IoT Hub's 404103). A
//! device that is connected but has not subscribed gets the same code, with a message that
//! says so rather than "waiting for the device to connect". A persistent session resumed
//! after a reconnect keeps its subscription, so the SDKs' token renewal does not lose it.
//!
//! The device gets `$iothub/methods/POST/{methodName}/?$rid={rid}` with the payload JSON and
//! answers `$iothub/methods/res/{status}/?$rid={rid}` with a JSON body (empty → `null`; text
//! that is not JSON is returned as a JSON string). Request ids are unique per hub process; an
//! answer counts only from the device the request was sent to.
//!
//! Several nodes: a device with no session on the invoking node is called through the node
//! that holds its session (`cluster.rs`); with no node holding one, `DeviceNotOnline` comes
//! after the discovery window ([`crate::cluster::DISCOVERY`], 1 s) instead of at once.

use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::time::Instant;

use crate::auth::{HubRight, Scope};
use crate::cluster::{Cluster, HubEvent, Reply, DISCOVERY, PROBE_INTERVAL};
use crate::endpoint::MethodCall;
use crate::error::{HubError, HubErrorCode};
use crate::model::validate_device_id;
use crate::registry::MAX_BODY_BYTES;
use crate::request::{json_ok, parse_json, read_body, QueryParams};
use crate::routes::{admit, path_id};
use crate::HubRegistry;

/// Response timeout when the request gives none.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest response or connect timeout a request may ask for.
pub const MAX_TIMEOUT_SECS: u64 = 300;
/// Longest method name.
pub const MAX_METHOD_NAME_LEN: usize = 128;

fn validate_method_name(name: &str) -> Result<(), HubError> {
    if name.is_empty() || name.len() > MAX_METHOD_NAME_LEN {
        return Err(HubError::invalid(format!(
            "the method name must be 1 to {MAX_METHOD_NAME_LEN} characters"
        )));
    }
    if name
        .chars()
        .any(|c| c.is_control() || matches!(c, '/' | '?' | '#' | '+' | '$'))
    {
        return Err(HubError::invalid(
            "the method name must not contain control characters, '/', '?', '#', '+' or '$'",
        ));
    }
    Ok(())
}

impl HubRegistry {
    /// Invokes a direct method on a connected device and waits up to `response_timeout` for
    /// its answer: `(status, payload)` as the device sent them. A device that exists but has
    /// no session subscribed to methods → `DeviceNotOnline` (404); no answer in time →
    /// `GatewayTimeout` (504).
    pub async fn invoke_method(
        &self,
        device_id: &str,
        method_name: &str,
        payload: Value,
        response_timeout: Duration,
    ) -> Result<(u16, Value), HubError> {
        self.invoke_method_with_connect_timeout(
            device_id,
            method_name,
            payload,
            response_timeout,
            Duration::ZERO,
        )
        .await
    }

    /// As [`Self::invoke_method`], first waiting up to `connect_timeout` for the device to
    /// connect and subscribe.
    pub async fn invoke_method_with_connect_timeout(
        &self,
        device_id: &str,
        method_name: &str,
        payload: Value,
        response_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<(u16, Value), HubError> {
        validate_device_id(device_id)?;
        validate_method_name(method_name)?;
        let device = self.get_device(device_id).await?;
        let payload = serde_json::to_vec(&payload)
            .map_err(|e| HubError::internal("encoding a method payload", e))?;
        let max = self.limits().method_max_payload;
        if payload.len() > max {
            return Err(HubError::new(
                HubErrorCode::MessageTooLarge,
                format!("the method payload is larger than {max} bytes"),
            ));
        }
        let key = self.store_key(device_id);
        let connect_deadline = Instant::now() + connect_timeout;
        let sender = loop {
            if let Some(s) = self.endpoint().method_sender(&key) {
                break s;
            }
            if let Some(cluster) = self.cluster() {
                return self
                    .invoke_elsewhere(
                        cluster,
                        &key,
                        &device.device_id,
                        method_name,
                        payload,
                        response_timeout,
                        connect_deadline,
                    )
                    .await;
            }
            if Instant::now() >= connect_deadline {
                if self.endpoint().is_connected(&key) {
                    return Err(not_subscribed(&device.device_id));
                }
                return Err(not_online(&device.device_id));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.call_session(
            &key,
            sender,
            method_name,
            payload,
            Instant::now() + response_timeout,
        )
        .await
        .map_err(|timed_out| failed(&device.device_id, method_name, timed_out))
    }

    /// Runs the call on this node's session of `device_key` until `deadline`; `Err(true)`
    /// when the device did not answer in time, `Err(false)` when the session closed first.
    pub(crate) async fn call_session(
        &self,
        device_key: &str,
        sender: tokio::sync::mpsc::Sender<MethodCall>,
        method_name: &str,
        payload: Vec<u8>,
        deadline: Instant,
    ) -> Result<(u16, Value), bool> {
        let (rid, answer) = self.endpoint().pending_method(device_key);
        let call = MethodCall {
            rid: rid.clone(),
            method_name: method_name.to_string(),
            payload,
        };
        let result = tokio::time::timeout_at(deadline, async {
            if sender.send(call).await.is_err() {
                return Err(false);
            }
            // The sender side is dropped without an answer when the session could not
            // deliver the call (it closed or unsubscribed).
            answer.await.map_err(|_| false)
        })
        .await;
        match result {
            Ok(Ok(a)) => Ok((a.status, a.payload)),
            Ok(Err(e)) => {
                self.endpoint().forget_method(&rid);
                Err(e)
            }
            Err(_) => {
                self.endpoint().forget_method(&rid);
                Err(true)
            }
        }
    }

    /// The device has no session here: asks the other nodes (`cluster.rs`). Waits for one to
    /// accept until the connect deadline (at least [`DISCOVERY`]), publishing the call again
    /// every [`PROBE_INTERVAL`] and running it here if the device connects here meanwhile;
    /// then for the answer up to `response_timeout`.
    #[allow(clippy::too_many_arguments)]
    async fn invoke_elsewhere(
        &self,
        cluster: &Cluster,
        key: &str,
        device_id: &str,
        method_name: &str,
        payload: Vec<u8>,
        response_timeout: Duration,
        connect_deadline: Instant,
    ) -> Result<(u16, Value), HubError> {
        let mut waiting = cluster.expect();
        let call = HubEvent::MethodCall {
            rid: waiting.rid.clone(),
            device: key.to_string(),
            method: method_name.to_string(),
            payload: String::from_utf8_lossy(&payload).into_owned(),
            timeout_ms: u64::try_from(response_timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let discovery_end = connect_deadline.max(Instant::now() + DISCOVERY);
        let mut refused = false;
        loop {
            if let Some(sender) = self.endpoint().method_sender(key) {
                drop(waiting);
                return self
                    .call_session(
                        key,
                        sender,
                        method_name,
                        payload,
                        Instant::now() + response_timeout,
                    )
                    .await
                    .map_err(|timed_out| failed(device_id, method_name, timed_out));
            }
            let now = Instant::now();
            if now >= discovery_end {
                if refused || self.endpoint().is_connected(key) {
                    return Err(not_subscribed(device_id));
                }
                return Err(not_online(device_id));
            }
            cluster.publish(&call);
            let probe_end = (now + PROBE_INTERVAL).min(discovery_end);
            let accepted = loop {
                match tokio::time::timeout_at(probe_end, waiting.replies.recv()).await {
                    Ok(Some(Reply::Accepted)) => break true,
                    Ok(Some(Reply::Refused)) => refused = true,
                    Ok(Some(Reply::Session(_))) => {}
                    // Replies to a call not accepted yet come from a node that accepted it:
                    // keep them for below.
                    Ok(Some(r @ (Reply::Answer { .. } | Reply::Failed { .. }))) => {
                        return settle(r, device_id, method_name);
                    }
                    Ok(None) | Err(_) => break false,
                }
            };
            if accepted {
                break;
            }
        }
        let deadline = Instant::now() + response_timeout;
        loop {
            match tokio::time::timeout_at(deadline, waiting.replies.recv()).await {
                // Another node held a session too (a reconnect in between): the first answer counts.
                Ok(Some(Reply::Accepted | Reply::Refused | Reply::Session(_))) => continue,
                Ok(Some(r)) => return settle(r, device_id, method_name),
                Ok(None) | Err(_) => return Err(failed(device_id, method_name, true)),
            }
        }
    }
}

/// The answer or failure another node reported.
fn settle(reply: Reply, device_id: &str, method_name: &str) -> Result<(u16, Value), HubError> {
    match reply {
        Reply::Answer { status, payload } => Ok((status, payload)),
        Reply::Failed { timed_out } => Err(failed(device_id, method_name, timed_out)),
        Reply::Accepted | Reply::Refused | Reply::Session(_) => Err(not_online(device_id)),
    }
}

/// A call that got no answer: 504 when the device took too long, else 404 (session gone).
fn failed(device_id: &str, method_name: &str, timed_out: bool) -> HubError {
    if timed_out {
        HubError::new(
            HubErrorCode::GatewayTimeout,
            format!(
                "Timed out waiting for the response from device '{device_id}' to method '{method_name}'."
            ),
        )
    } else {
        not_online(device_id)
    }
}

fn not_online(device_id: &str) -> HubError {
    HubError::new(
        HubErrorCode::DeviceNotOnline,
        format!("Timed out waiting for device '{device_id}' to connect."),
    )
}

/// Connected, but no `$iothub/methods/POST/#` subscription: IoT Hub answers this with the
/// same 404 `DeviceNotOnline` (404103), as the device cannot receive the call.
fn not_subscribed(device_id: &str) -> HubError {
    HubError::new(
        HubErrorCode::DeviceNotOnline,
        format!(
            "Device '{device_id}' is connected but has not subscribed to direct methods ($iothub/methods/POST/#)."
        ),
    )
}

fn timeout_secs(body: &Value, name: &str) -> Result<Option<u64>, HubError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= MAX_TIMEOUT_SECS => Ok(Some(n)),
            _ => Err(HubError::invalid(format!(
                "{name} must be an integer from 0 to {MAX_TIMEOUT_SECS}"
            ))),
        },
    }
}

/// `POST /twins/{id}/methods`.
pub(crate) async fn invoke(
    State(hub): State<HubRegistry>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<QueryParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let id = path_id(path)?;
        admit(
            &hub,
            &headers,
            query,
            HubRight::ServiceConnect,
            Scope::Device(&id),
        )?;
        validate_device_id(&id)?;
        let bytes = read_body(body, MAX_BODY_BYTES).await?;
        let json = parse_json(&bytes)?;
        if !json.is_object() {
            return Err(HubError::new(
                HubErrorCode::IotHubFormatError,
                "the request body must be a JSON object (a CloudToDeviceMethod)",
            ));
        }
        let method_name = json
            .get("methodName")
            .and_then(Value::as_str)
            .ok_or_else(|| HubError::invalid("methodName is required"))?;
        let payload = json.get("payload").cloned().unwrap_or(Value::Null);
        let response_timeout = match timeout_secs(&json, "responseTimeoutInSeconds")? {
            None | Some(0) => DEFAULT_RESPONSE_TIMEOUT,
            Some(n) => Duration::from_secs(n),
        };
        let connect_timeout =
            Duration::from_secs(timeout_secs(&json, "connectTimeoutInSeconds")?.unwrap_or(0));
        let (status, payload) = hub
            .invoke_method_with_connect_timeout(
                &id,
                method_name,
                payload,
                response_timeout,
                connect_timeout,
            )
            .await?;
        Ok::<_, HubError>(json_ok(
            &serde_json::json!({ "status": status, "payload": payload }),
            None,
        ))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names() {
        validate_method_name("reboot").unwrap();
        validate_method_name("get-status.v2").unwrap();
        for bad in ["", "a/b", "a#", "x+y", "$sys", "a?b"] {
            assert!(validate_method_name(bad).is_err(), "{bad}");
        }
    }
}
