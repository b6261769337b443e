//! The hub's device HTTPS API: telemetry and cloud-to-device messages as IoT Hub serves them
//! to the SDKs' HTTP transports (Node `azure-iot-device-http`, the C SDK's
//! `HTTP_Protocol`). Query `api-version` required (the SDKs send 2021-04-12).
//!
//! | Method | Path | Success | Failures |
//! |---|---|---|---|
//! | POST | `/devices/{id}/messages/events` | 204 | 400, 401, 413 |
//! | GET | `/devices/{id}/messages/devicebound` | 200 one message, 204 none waiting | 401 |
//! | DELETE | `/devices/{id}/messages/devicebound/{lockToken}` (complete; `?reject` rejects) | 204 | 401, 412 `DeviceMessageLockLost` |
//! | POST | `/devices/{id}/messages/devicebound/{lockToken}/abandon` | 204 | 401, 412 `DeviceMessageLockLost` |
//!
//! (`deviceBound` is accepted too.) Errors have the hub's error shape ([`crate::error`]).
//!
//! **Authentication**, as IoT Hub's: `Authorization: SharedAccessSignature sr={host}/devices/{id}&sig=…&se=…`
//! signed with one of the device's keys (or with `skn` a policy holding DeviceConnect), or,
//! without the header, the TLS client certificate of an X.509 (`selfSigned`) device whose
//! thumbprint is registered — the same checks as the MQTT CONNECT ([`crate::device_mqtt`]).
//! The token's `sr` names the device in the path, so a device only touches its own
//! messages. Unknown, disabled and unauthenticated devices all get 401
//! `IotHubUnauthorizedAccess`. Nothing is read or written before the device is authenticated
//! (the body neither).
//!
//! **Telemetry** (`POST .../messages/events`): the body is the payload (at most
//! [`DeviceEndpointLimits::d2c_max_body`], 256 KB), stored like an MQTT publish
//! ([`crate::telemetry`]). Application properties come from `iothub-app-{name}` headers
//! (header names arrive lower-cased, so names do too); system properties from
//! `iothub-messageid` (`messageId`), `iothub-correlationid` (`correlationId`),
//! `iothub-userid` (`userId`), `iothub-to` (`to`), `iothub-contenttype` (`contentType`),
//! `iothub-contentencoding` (`contentEncoding`), `iothub-expiry` (`expiryTimeUtc`),
//! `iothub-interface-id` (`interfaceId`); `iothub-ack` is ignored. With
//! `Content-Type: application/vnd.microsoft.iothub.json` the body is a batch
//! (`sendEventBatch`): a JSON array of `{"body": base64, "properties": {"iothub-app-{name}": value}}`
//! (the C and Java SDKs add `"base64Encoded": true`), every element checked before any is
//! stored, each stored as one message with the request's system-property headers.
//!
//! **Cloud-to-device** ([`crate::c2d`], the same queue MQTT sessions drain): a receive takes
//! the first waiting message no other receive holds, locks it for
//! [`DeviceEndpointLimits::c2d_lock_timeout`] (1 minute) and answers it: the payload as
//! body, `ETag: "{lockToken}"`, `iothub-messageid`, `iothub-sequencenumber`,
//! `iothub-enqueuedtime`, `iothub-deliverycount`, `iothub-to`, `iothub-expiry` (when the
//! sender set one), `iothub-correlationid`, `iothub-userid`, `iothub-contenttype` and
//! `Content-Type`, `iothub-contentencoding` (when set) and `iothub-app-{name}` per property.
//! Complete and reject delete it, abandon unlocks it (its delivery count stays); a lock that
//! expired frees the message for the next receive. A message received
//! [`DeviceEndpointLimits::c2d_max_delivery_count`] (10) times without completion is dropped.
//! A message locked here is not sent over MQTT until its lock ends (abandon wakes the
//! device's MQTT session; an expired lock is noticed at the session's next delivery: a new
//! message or a reconnect); one an MQTT session has in flight (not yet PUBACKed) can still be
//! received here (at least once, either way).
//!
//! [`DeviceEndpointLimits::d2c_max_body`]: crate::DeviceEndpointLimits::d2c_max_body
//! [`DeviceEndpointLimits::c2d_lock_timeout`]: crate::DeviceEndpointLimits::c2d_lock_timeout
//! [`DeviceEndpointLimits::c2d_max_delivery_count`]: crate::DeviceEndpointLimits::c2d_max_delivery_count

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Router};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_device_api::websocket::ClientCertChain;
use muster_proto::SasToken;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::auth::strip_port;
use crate::c2d::{CloudToDeviceMessage, Settlement};
use crate::device_mqtt::connect::{verify_certificate, verify_sas};
use crate::error::{HubError, HubErrorCode};
use crate::model::{validate_device_id, DeviceStatus};
use crate::request::{api_version, read_body, QueryParams};
use crate::HubRegistry;

/// The `Content-Type` of a `sendEventBatch` body.
pub const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.json";

/// Header prefix of application properties.
const APP_PREFIX: &str = "iothub-app-";

/// The device routes. Merge them beside [`crate::router`], outside the service audit (these
/// are device traffic, not service writes).
pub fn router(hub: HubRegistry) -> Router {
    let mut router = Router::new().route("/devices/{id}/messages/events", post(send_event));
    for bound in ["devicebound", "deviceBound"] {
        router = router
            .route(&format!("/devices/{{id}}/messages/{bound}"), get(receive))
            .route(
                &format!("/devices/{{id}}/messages/{bound}/{{lock}}"),
                delete(complete_or_reject),
            )
            .route(
                &format!("/devices/{{id}}/messages/{bound}/{{lock}}/abandon"),
                post(abandon),
            );
    }
    router.with_state(hub)
}

/// Checks the api-version and the device's credential; returns the device id as registered.
async fn admit_device(
    hub: &HubRegistry,
    id: &str,
    headers: &HeaderMap,
    query: Result<Query<QueryParams>, QueryRejection>,
    certs: Option<Extension<ClientCertChain>>,
) -> Result<(String, QueryParams), HubError> {
    let Query(params) = query.map_err(|e| {
        HubError::new(
            HubErrorCode::InvalidProtocolVersion,
            format!("the query string is invalid: {e}"),
        )
    })?;
    api_version(&params)?;
    validate_device_id(id)?;
    let device = match hub.get_device(id).await {
        Ok(d) => d,
        Err(e) if e.code == HubErrorCode::DeviceNotFound => {
            return Err(HubError::unauthorized(format!(
                "device '{id}' is not registered"
            )))
        }
        Err(e) => return Err(e),
    };
    if device.status == DeviceStatus::Disabled {
        return Err(HubError::unauthorized(format!("device '{id}' is disabled")));
    }
    let hub_host = strip_port(&hub.host_name().to_ascii_lowercase()).to_string();
    let now = hub.clock().now().unix_seconds();
    match headers.get(http::header::AUTHORIZATION) {
        Some(value) => {
            let value = value.to_str().map_err(|_| {
                HubError::unauthorized("the Authorization header is not valid text")
            })?;
            let token = SasToken::parse(value)
                .map_err(|e| HubError::unauthorized(format!("Authorization: {e}")))?;
            verify_sas(hub, &hub_host, &device, &token, now)
                .map_err(|(_, why)| HubError::unauthorized(why))?;
        }
        None => {
            let leaf = certs
                .as_ref()
                .and_then(|Extension(ClientCertChain(chain))| chain.first())
                .ok_or_else(|| {
                    HubError::unauthorized(
                        "the request has neither an Authorization header nor a client certificate",
                    )
                })?;
            verify_certificate(&device, leaf).map_err(|(_, why)| HubError::unauthorized(why))?;
            if hub.certificate_revoked(leaf).await? {
                return Err(HubError::unauthorized(
                    "the client certificate was issued by Muster and has been revoked",
                ));
            }
        }
    }
    Ok((device.device_id, params))
}

fn path_device(path: Result<Path<String>, PathRejection>) -> Result<String, HubError> {
    path.map(|Path(id)| id)
        .map_err(|e| HubError::invalid(format!("the device id in the path is invalid: {e}")))
}

fn header(headers: &HeaderMap, name: &str) -> Result<Option<String>, HubError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.to_string()))
            .map_err(|_| HubError::invalid(format!("the {name} header is not valid text"))),
    }
}

/// System property name ← request header.
const SYSTEM_HEADERS: [(&str, &str); 8] = [
    ("messageId", "iothub-messageid"),
    ("correlationId", "iothub-correlationid"),
    ("userId", "iothub-userid"),
    ("to", "iothub-to"),
    ("contentType", "iothub-contenttype"),
    ("contentEncoding", "iothub-contentencoding"),
    ("expiryTimeUtc", "iothub-expiry"),
    ("interfaceId", "iothub-interface-id"),
];

/// A message's properties (application or system).
type Properties = Map<String, Value>;

/// Application and system properties of a posted message.
fn properties_from_headers(headers: &HeaderMap) -> Result<(Properties, Properties), HubError> {
    let mut app = Map::new();
    for (name, value) in headers {
        if let Some(prop) = name.as_str().strip_prefix(APP_PREFIX) {
            if prop.is_empty() {
                continue;
            }
            let value = value.to_str().map_err(|_| {
                HubError::invalid(format!("the {} header is not valid text", name.as_str()))
            })?;
            app.insert(prop.to_string(), Value::String(value.to_string()));
        }
    }
    let mut system = Map::new();
    for (prop, name) in SYSTEM_HEADERS {
        if let Some(v) = header(headers, name)? {
            system.insert(prop.to_string(), Value::String(v));
        }
    }
    Ok((app, system))
}

/// One element of a `sendEventBatch` body. Node sends `body` and `properties`; the C and Java
/// SDKs add `"base64Encoded": true` (`false` would make `body` the text itself).
#[derive(Debug, Deserialize)]
struct BatchItem {
    body: String,
    #[serde(default = "base64_default", rename = "base64Encoded")]
    base64_encoded: bool,
    #[serde(default)]
    properties: Map<String, Value>,
}

fn base64_default() -> bool {
    true
}

/// The messages of a batch body: payload bytes and application properties.
fn parse_batch(bytes: &[u8]) -> Result<Vec<(Vec<u8>, Properties)>, HubError> {
    let items: Vec<BatchItem> = serde_json::from_slice(bytes).map_err(|e| {
        HubError::new(
            HubErrorCode::IotHubFormatError,
            format!("the batch body is not a JSON array of {{\"body\",\"properties\"}}: {e}"),
        )
    })?;
    if items.is_empty() {
        return Err(HubError::new(
            HubErrorCode::IotHubFormatError,
            "the batch holds no messages",
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let body = if item.base64_encoded {
                B64.decode(item.body.as_bytes()).map_err(|_| {
                    HubError::new(
                        HubErrorCode::IotHubFormatError,
                        format!("batch message {i}: 'body' is not base64"),
                    )
                })?
            } else {
                item.body.into_bytes()
            };
            let mut props = Map::new();
            for (k, v) in item.properties {
                let name = k.strip_prefix(APP_PREFIX).unwrap_or(&k).to_string();
                let Value::String(s) = v else {
                    return Err(HubError::new(
                        HubErrorCode::IotHubFormatError,
                        format!("batch message {i}: property '{name}' is not a string"),
                    ));
                };
                props.insert(name, Value::String(s));
            }
            Ok((body, props))
        })
        .collect()
}

/// `POST /devices/{id}/messages/events`.
pub(crate) async fn send_event(
    State(hub): State<HubRegistry>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<QueryParams>, QueryRejection>,
    certs: Option<Extension<ClientCertChain>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let id = path_device(path)?;
        let (device_id, _) = admit_device(&hub, &id, &headers, query, certs).await?;
        let bytes = read_body(body, hub.limits().d2c_max_body).await?;
        let (app, system) = properties_from_headers(&headers)?;
        let batch = header(&headers, "content-type")?.is_some_and(|ct| {
            ct.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case(BATCH_CONTENT_TYPE))
        });
        if batch {
            for (payload, props) in parse_batch(&bytes)? {
                hub.store_telemetry(&device_id, &payload, props, system.clone())
                    .await?;
            }
        } else {
            hub.store_telemetry(&device_id, &bytes, app, system).await?;
        }
        Ok::<_, HubError>(StatusCode::NO_CONTENT.into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /devices/{id}/messages/devicebound`.
pub(crate) async fn receive(
    State(hub): State<HubRegistry>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<QueryParams>, QueryRejection>,
    certs: Option<Extension<ClientCertChain>>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let id = path_device(path)?;
        let (device_id, _) = admit_device(&hub, &id, &headers, query, certs).await?;
        Ok::<_, HubError>(match hub.receive_cloud_to_device(&device_id).await? {
            None => StatusCode::NO_CONTENT.into_response(),
            Some(message) => message_response(&message),
        })
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// A received message as IoT Hub answers it.
fn message_response(m: &CloudToDeviceMessage) -> Response {
    let mut resp = (StatusCode::OK, m.body_bytes()).into_response();
    let h = resp.headers_mut();
    let mut put = |name: &str, value: &str| {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            h.append(n, v);
        }
    };
    if let Some(lock) = &m.lock_token {
        put("etag", &format!("\"{lock}\""));
    }
    put("iothub-sequencenumber", &m.sequence_number.to_string());
    put("iothub-enqueuedtime", &m.enqueued_time);
    put("iothub-deliverycount", &m.delivery_count.to_string());
    let system = |name: &str| m.system_properties.get(name).and_then(Value::as_str);
    for (prop, name) in [
        ("messageId", "iothub-messageid"),
        ("correlationId", "iothub-correlationid"),
        ("userId", "iothub-userid"),
        ("to", "iothub-to"),
        ("expiryTimeUtc", "iothub-expiry"),
        ("contentType", "iothub-contenttype"),
        ("contentType", "content-type"),
        ("contentEncoding", "iothub-contentencoding"),
    ] {
        if let Some(v) = system(prop) {
            put(name, v);
        }
    }
    for (k, v) in &m.properties {
        let value = match v {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        put(&format!("{APP_PREFIX}{k}"), &value);
    }
    resp
}

/// `DELETE /devices/{id}/messages/devicebound/{lockToken}[?reject]`.
pub(crate) async fn complete_or_reject(
    State(hub): State<HubRegistry>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<QueryParams>, QueryRejection>,
    certs: Option<Extension<ClientCertChain>>,
    headers: HeaderMap,
) -> Response {
    settle(hub, path, query, certs, headers, None).await
}

/// `POST /devices/{id}/messages/devicebound/{lockToken}/abandon`.
pub(crate) async fn abandon(
    State(hub): State<HubRegistry>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<QueryParams>, QueryRejection>,
    certs: Option<Extension<ClientCertChain>>,
    headers: HeaderMap,
) -> Response {
    settle(hub, path, query, certs, headers, Some(Settlement::Abandon)).await
}

async fn settle(
    hub: HubRegistry,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<QueryParams>, QueryRejection>,
    certs: Option<Extension<ClientCertChain>>,
    headers: HeaderMap,
    settlement: Option<Settlement>,
) -> Response {
    let result = async {
        let (id, lock) = path
            .map(|Path(p)| p)
            .map_err(|e| HubError::invalid(format!("the path is invalid: {e}")))?;
        let (device_id, params) = admit_device(&hub, &id, &headers, query, certs).await?;
        let settlement = settlement.unwrap_or(if params.contains_key("reject") {
            Settlement::Reject
        } else {
            Settlement::Complete
        });
        hub.settle_cloud_to_device(&device_id, lock.trim_matches('"'), settlement)
            .await?;
        Ok::<_, HubError>(StatusCode::NO_CONTENT.into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_bodies() {
        let items = parse_batch(
            br#"[{"body":"aGk=","properties":{"iothub-app-color":"red"}},{"body":"eA=="}]"#,
        )
        .unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].0, b"hi");
        assert_eq!(items[0].1["color"], "red");
        assert_eq!(items[1].0, b"x");
        assert!(items[1].1.is_empty());
        // The C and Java SDKs' form.
        let items = parse_batch(
            br#"[{"body":"aGk=","base64Encoded":true},{"body":"plain","base64Encoded":false}]"#,
        )
        .unwrap();
        assert_eq!(items[0].0, b"hi");
        assert_eq!(items[1].0, b"plain");
        for bad in [
            &b"[]"[..],
            b"{}",
            br#"[{"body":"***"}]"#,
            br#"[{"body":"aGk=","properties":{"a":1}}]"#,
        ] {
            let e = parse_batch(bad).unwrap_err();
            assert_eq!(e.code, HubErrorCode::IotHubFormatError);
        }
    }
}
