//! The device's links once it authenticated, one task per link, each on the same hub
//! operations as the MQTT session (`crate::device_mqtt`):
//!
//! | Link (address) | Device role | What flows |
//! |---|---|---|
//! | `/devices/{id}/messages/events` | sender | telemetry: stored ([`HubRegistry::store_telemetry`]), then accepted; a failed write rejects it (`amqp:internal-error`) |
//! | `/devices/{id}/messages/devicebound` | receiver | cloud-to-device messages, one at a time in queue order; accepted = complete (deleted), rejected = deleted, released / modified = abandoned (sent again; deleted after [`MAX_DELIVERIES`]) |
//! | `/devices/{id}/twin` | sender + receiver | requests with message annotations `operation` / `resource` and a `correlation-id`; responses with annotations `status` (and `version` after a reported patch); desired-property patches without a correlation id once the device sent `PUT /notifications/twin/properties/desired` |
//! | `/devices/{id}/methods/devicebound` | sender + receiver | calls with application property `IoThub-methodname` and `correlation-id` = the request id; answers with `IoThub-status` and the same `correlation-id` |

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::types::definitions::{self, AmqpError};
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageAnnotations, MessageId, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Timestamp, Value};
use serde_json::{Map, Value as Json};
use tokio::sync::{mpsc, Notify};

use super::cbs::body_bytes;
use crate::c2d::CloudToDeviceMessage;
use crate::endpoint::{MethodAnswer, MethodCall};
use crate::error::HubError;
use crate::HubRegistry;

/// A cloud-to-device message the device released (abandoned) this often is deleted, as IoT
/// Hub dead-letters it after its maximum delivery count.
pub(crate) const MAX_DELIVERIES: u32 = 10;

const METHOD_NAME: &str = "IoThub-methodname";
const METHOD_STATUS: &str = "IoThub-status";
const DESIRED_RESOURCE: &str = "/notifications/twin/properties/desired";
const REPORTED_RESOURCE: &str = "/properties/reported";

type Incoming = fe2o3_amqp::link::delivery::Delivery<Body<Value>>;

/// A message id as text (`correlation-id`s and `message-id`s of any AMQP type).
pub(crate) fn id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => {
            let b = u.as_inner();
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!(
                "{}-{}-{}-{}-{}",
                &hex[0..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..32]
            )
        }
        MessageId::Binary(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

fn simple_text(v: &SimpleValue) -> Option<String> {
    Some(match v {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.to_string(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Timestamp(t) => t.milliseconds().to_string(),
        SimpleValue::Null => return None,
        _ => return None,
    })
}

fn simple_int(v: &SimpleValue) -> Option<i64> {
    match v {
        SimpleValue::Ubyte(n) => Some(i64::from(*n)),
        SimpleValue::Ushort(n) => Some(i64::from(*n)),
        SimpleValue::Uint(n) => Some(i64::from(*n)),
        SimpleValue::Ulong(n) => i64::try_from(*n).ok(),
        SimpleValue::Byte(n) => Some(i64::from(*n)),
        SimpleValue::Short(n) => Some(i64::from(*n)),
        SimpleValue::Int(n) => Some(i64::from(*n)),
        SimpleValue::Long(n) => Some(*n),
        SimpleValue::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn annotation(message: &Message<Body<Value>>, name: &str) -> Option<String> {
    let annotations = message.message_annotations.as_ref()?;
    match annotations.0.get(&OwnedKey::Symbol(Symbol::from(name)))? {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.to_string()),
        _ => None,
    }
}

/// Application and system properties of a device-to-cloud message, named as the MQTT
/// endpoint names them (`messageId`, `correlationId`, `userId`, `to`, `contentType`,
/// `contentEncoding`).
pub(crate) fn telemetry_properties(
    message: &Message<Body<Value>>,
) -> (Map<String, Json>, Map<String, Json>) {
    let mut app = Map::new();
    if let Some(props) = &message.application_properties {
        for (k, v) in props.0.iter() {
            let v = simple_text(v).map_or(Json::Null, Json::String);
            app.insert(k.clone(), v);
        }
    }
    let mut system = Map::new();
    if let Some(p) = &message.properties {
        let mut put = |name: &str, v: Option<String>| {
            if let Some(v) = v {
                system.insert(name.to_string(), Json::String(v));
            }
        };
        put("messageId", p.message_id.as_ref().map(id_text));
        put("correlationId", p.correlation_id.as_ref().map(id_text));
        put(
            "userId",
            p.user_id
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned()),
        );
        put("to", p.to.clone());
        put(
            "contentType",
            p.content_type.as_ref().map(|s| s.to_string()),
        );
        put(
            "contentEncoding",
            p.content_encoding.as_ref().map(|s| s.to_string()),
        );
    }
    (app, system)
}

/// Telemetry: every message is stored, then accepted.
pub(crate) async fn telemetry(mut receiver: Receiver, hub: HubRegistry, device_id: String) {
    loop {
        let delivery: Incoming = match receiver.recv().await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(device = %device_id, error = %e, "AMQP telemetry link ended");
                return;
            }
        };
        let (app, system) = telemetry_properties(delivery.message());
        let body = body_bytes(delivery.body());
        let settled = match hub.store_telemetry(&device_id, &body, app, system).await {
            Ok(_) => receiver.accept(&delivery).await,
            Err(e) => {
                if let Some(suppressed) = crate::device_mqtt::STORE_FAILED.admit() {
                    tracing::warn!(error = %e, suppressed, "storing AMQP telemetry failed");
                }
                let error = definitions::Error::new(
                    AmqpError::InternalError,
                    "the message could not be stored; send it again".to_string(),
                    None,
                );
                receiver.reject(&delivery, error).await
            }
        };
        if let Err(e) = settled {
            tracing::debug!(device = %device_id, error = %e, "AMQP telemetry could not be settled");
            return;
        }
    }
}

/// A queued cloud-to-device message as an AMQP message.
pub(crate) fn c2d_message(message: &CloudToDeviceMessage) -> Message<Data> {
    let system = |name: &str| {
        message
            .system_properties
            .get(name)
            .and_then(Json::as_str)
            .map(str::to_string)
    };
    let properties = Properties {
        message_id: system("messageId").map(MessageId::String),
        to: system("to"),
        correlation_id: system("correlationId").map(MessageId::String),
        user_id: system("userId").map(|u| Binary::from(u.into_bytes())),
        content_type: system("contentType").map(Symbol::from),
        content_encoding: system("contentEncoding").map(Symbol::from),
        absolute_expiry_time: message
            .explicit_expiry
            .then(|| Timestamp::from_milliseconds(message.expiry_unix_ms)),
        ..Default::default()
    };
    let mut app = ApplicationProperties::default();
    for (k, v) in &message.properties {
        let v = match v {
            Json::String(s) => SimpleValue::String(s.clone()),
            Json::Null => SimpleValue::Null,
            other => SimpleValue::String(other.to_string()),
        };
        app.0.insert(k.clone(), v);
    }
    Message::builder()
        .properties(properties)
        .application_properties(app)
        .data(Binary::from(message.body_bytes()))
        .build()
}

/// Cloud-to-device messages, one at a time in queue order, each settled by the device
/// before the next is sent.
pub(crate) async fn cloud_to_device(
    mut sender: Sender,
    hub: HubRegistry,
    device_id: String,
    wake: Arc<Notify>,
) {
    let mut released: HashMap<String, u32> = HashMap::new();
    loop {
        let now_ms = hub.clock().now().0.timestamp_millis();
        let next = match hub.queued_cloud_to_device(&device_id, now_ms).await {
            // A message an HTTPS receive holds locked waits until it is settled or abandoned.
            Ok(queue) => queue
                .into_iter()
                .find(|q| !q.message.is_locked(now_ms))
                .map(|q| (q.key, q.message)),
            Err(e) => {
                if let Some(suppressed) = crate::device_mqtt::STORE_FAILED.admit() {
                    tracing::warn!(error = %e, suppressed, "reading the cloud-to-device queue failed");
                }
                None
            }
        };
        let Some((key, message)) = next else {
            tokio::select! {
                () = wake.notified() => continue,
                _ = sender.on_detach() => return,
            }
        };
        let outcome = match sender.send(c2d_message(&message)).await {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(device = %device_id, error = %e, "AMQP cloud-to-device link ended");
                return;
            }
        };
        let delete = match outcome {
            Outcome::Accepted(_) | Outcome::Rejected(_) => true,
            Outcome::Released(_) | Outcome::Modified(_) => {
                let count = released.entry(key.clone()).or_insert(0);
                *count += 1;
                *count >= MAX_DELIVERIES
            }
            #[allow(unreachable_patterns)]
            _ => false,
        };
        if delete {
            released.remove(&key);
            if let Err(e) = hub.complete_cloud_to_device(&key).await {
                if let Some(suppressed) = crate::device_mqtt::STORE_FAILED.admit() {
                    tracing::warn!(error = %e, suppressed, "could not remove a settled cloud-to-device message");
                }
                // Not sent again on this connection: wait for the next message.
                tokio::select! {
                    () = wake.notified() => {},
                    _ = sender.on_detach() => return,
                }
            }
        }
    }
}

/// Sends the queued messages in order (twin responses and desired patches).
pub(crate) async fn send_queued(mut sender: Sender, mut rx: mpsc::Receiver<Message<Data>>) {
    loop {
        tokio::select! {
            message = rx.recv() => match message {
                Some(m) => {
                    if let Err(e) = sender.send(m).await {
                        tracing::debug!(error = %e, "AMQP message to the device could not be sent");
                        return;
                    }
                }
                None => {
                    let _ = sender.close().await;
                    return;
                }
            },
            _ = sender.on_detach() => return,
        }
    }
}

fn twin_response(
    correlation_id: Option<MessageId>,
    status: i32,
    version: Option<u64>,
    body: Vec<u8>,
) -> Message<Data> {
    let mut annotations = MessageAnnotations::default();
    annotations
        .0
        .insert(OwnedKey::Symbol(Symbol::from("status")), Value::Int(status));
    if let Some(v) = version {
        annotations.0.insert(
            OwnedKey::Symbol(Symbol::from("version")),
            Value::Long(i64::try_from(v).unwrap_or(i64::MAX)),
        );
    }
    Message::builder()
        .properties(Properties {
            correlation_id,
            ..Default::default()
        })
        .message_annotations(annotations)
        .data(Binary::from(body))
        .build()
}

fn twin_error(correlation_id: Option<MessageId>, e: &HubError) -> Message<Data> {
    let body = serde_json::json!({ "Message": e.wire_message() });
    twin_response(
        correlation_id,
        i32::from(e.code.status()),
        None,
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

/// A desired-properties patch (with `$version`) pushed to the device.
pub(crate) fn desired_patch(version: u64, patch: &Map<String, Json>) -> Message<Data> {
    let mut annotations = MessageAnnotations::default();
    annotations.0.insert(
        OwnedKey::Symbol(Symbol::from("version")),
        Value::Long(i64::try_from(version).unwrap_or(i64::MAX)),
    );
    Message::builder()
        .message_annotations(annotations)
        .data(Binary::from(serde_json::to_vec(patch).unwrap_or_default()))
        .build()
}

/// Answers one twin request.
async fn twin_request(
    message: &Message<Body<Value>>,
    hub: &HubRegistry,
    device_id: &str,
    desired: &AtomicBool,
) -> Message<Data> {
    let correlation_id = message
        .properties
        .as_ref()
        .and_then(|p| p.correlation_id.clone());
    let operation = annotation(message, "operation").unwrap_or_default();
    let resource = annotation(message, "resource").unwrap_or_default();
    match (operation.as_str(), resource.as_str()) {
        ("GET", "") => match hub.device_twin_document(device_id).await {
            Ok(doc) => twin_response(
                correlation_id,
                200,
                None,
                serde_json::to_vec(&doc).unwrap_or_default(),
            ),
            Err(e) => twin_error(correlation_id, &e),
        },
        ("PATCH", REPORTED_RESOURCE) => {
            let patch = match serde_json::from_slice::<Json>(&body_bytes(&message.body)) {
                Ok(Json::Object(m)) => m,
                _ => {
                    let e = HubError::new(
                        crate::HubErrorCode::IotHubFormatError,
                        "the reported-properties patch must be a JSON object",
                    );
                    return twin_error(correlation_id, &e);
                }
            };
            match hub.update_reported(device_id, patch).await {
                Ok(version) => twin_response(correlation_id, 204, Some(version), Vec::new()),
                Err(e) => twin_error(correlation_id, &e),
            }
        }
        ("PUT", DESIRED_RESOURCE) => {
            desired.store(true, Ordering::SeqCst);
            twin_response(correlation_id, 200, None, Vec::new())
        }
        ("DELETE", DESIRED_RESOURCE) => {
            desired.store(false, Ordering::SeqCst);
            twin_response(correlation_id, 200, None, Vec::new())
        }
        (op, res) => {
            let e = HubError::new(
                crate::HubErrorCode::ArgumentInvalid,
                format!("twin operation {op:?} on resource {res:?} is not supported"),
            );
            twin_error(correlation_id, &e)
        }
    }
}

/// Twin requests: each is accepted, answered on the twin sender link through `out`.
pub(crate) async fn twin_requests(
    mut receiver: Receiver,
    hub: HubRegistry,
    device_id: String,
    out: mpsc::Sender<Message<Data>>,
    desired: Arc<AtomicBool>,
) {
    loop {
        let delivery: Incoming = match receiver.recv().await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(device = %device_id, error = %e, "AMQP twin link ended");
                return;
            }
        };
        if receiver.accept(&delivery).await.is_err() {
            return;
        }
        let response = twin_request(delivery.message(), &hub, &device_id, &desired).await;
        if out.send(response).await.is_err() {
            return;
        }
    }
}

/// A method call as the device receives it.
pub(crate) fn method_message(call: &MethodCall) -> Message<Data> {
    let mut app = ApplicationProperties::default();
    app.0.insert(
        METHOD_NAME.to_string(),
        SimpleValue::String(call.method_name.clone()),
    );
    Message::builder()
        .properties(Properties {
            correlation_id: Some(MessageId::String(call.rid.clone())),
            ..Default::default()
        })
        .application_properties(app)
        .data(Binary::from(call.payload.clone()))
        .build()
}

/// Method calls to the device; a call that cannot be sent is forgotten (its invoker hears
/// that the device is not online).
pub(crate) async fn method_calls(
    mut sender: Sender,
    mut rx: mpsc::Receiver<MethodCall>,
    hub: HubRegistry,
    subscribed: Arc<AtomicBool>,
) {
    subscribed.store(true, Ordering::SeqCst);
    loop {
        tokio::select! {
            call = rx.recv() => match call {
                Some(call) => {
                    if let Err(e) = sender.send(method_message(&call)).await {
                        tracing::debug!(error = %e, "AMQP method call could not be sent");
                        hub.endpoint().forget_method(&call.rid);
                        break;
                    }
                }
                None => break,
            },
            _ = sender.on_detach() => break,
        }
    }
    subscribed.store(false, Ordering::SeqCst);
    rx.close();
    while let Ok(call) = rx.try_recv() {
        hub.endpoint().forget_method(&call.rid);
    }
}

/// The answer a method response message carries: its request id, status and payload.
pub(crate) fn method_answer(message: &Message<Body<Value>>) -> Option<(String, MethodAnswer)> {
    let rid = message
        .properties
        .as_ref()
        .and_then(|p| p.correlation_id.as_ref())
        .map(id_text)?;
    let status = message
        .application_properties
        .as_ref()
        .and_then(|p| p.0.get(METHOD_STATUS))
        .and_then(simple_int)
        .and_then(|s| u16::try_from(s).ok())?;
    let body = body_bytes(&message.body);
    let payload = if body.iter().all(u8::is_ascii_whitespace) {
        Json::Null
    } else {
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&body).into_owned()))
    };
    Some((rid, MethodAnswer { status, payload }))
}

/// Method responses: each goes to its waiting invoker, then is accepted.
pub(crate) async fn method_responses(mut receiver: Receiver, hub: HubRegistry, device_key: String) {
    loop {
        let delivery: Incoming = match receiver.recv().await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(device = %device_key, error = %e, "AMQP method response link ended");
                return;
            }
        };
        match method_answer(delivery.message()) {
            Some((rid, answer)) => {
                if !hub.endpoint().answer_method(&device_key, &rid, answer) {
                    tracing::debug!(device = %device_key, rid, "method response for no waiting invocation");
                }
                if receiver.accept(&delivery).await.is_err() {
                    return;
                }
            }
            None => {
                let error = definitions::Error::new(
                    AmqpError::InvalidField,
                    format!(
                        "a method response needs a correlation-id and an integer {METHOD_STATUS}"
                    ),
                    None,
                );
                if receiver.reject(&delivery, error).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::messaging::AmqpValue;

    #[test]
    fn uuids_print_hyphenated() {
        let id = MessageId::Uuid(
            [
                0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
                0xcd, 0xef,
            ]
            .into(),
        );
        assert_eq!(id_text(&id), "12345678-9abc-def0-0123-456789abcdef");
    }

    #[test]
    fn method_answers_need_an_id_and_a_status() {
        let mut app = ApplicationProperties::default();
        app.0.insert(METHOD_STATUS.into(), SimpleValue::Int(201));
        let m: Message<Body<Value>> = Message::builder()
            .properties(Properties {
                correlation_id: Some(MessageId::String("1f".into())),
                ..Default::default()
            })
            .application_properties(app)
            .body(Body::Value(AmqpValue(Value::String(
                "{\"ok\":true}".into(),
            ))))
            .build();
        let (rid, answer) = method_answer(&m).unwrap();
        assert_eq!((rid.as_str(), answer.status), ("1f", 201));
        assert_eq!(answer.payload, serde_json::json!({"ok": true}));

        let no_status: Message<Body<Value>> = Message::builder()
            .properties(Properties {
                correlation_id: Some(MessageId::String("1f".into())),
                ..Default::default()
            })
            .body(Body::Value(AmqpValue(Value::Null)))
            .build();
        assert!(method_answer(&no_status).is_none());
    }

    #[test]
    fn telemetry_properties_split_system_from_application() {
        let mut app = ApplicationProperties::default();
        app.0
            .insert("color".into(), SimpleValue::String("red".into()));
        app.0.insert("n".into(), SimpleValue::Int(3));
        let m: Message<Body<Value>> = Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::String("m1".into())),
                content_type: Some(Symbol::from("application/json")),
                ..Default::default()
            })
            .application_properties(app)
            .body(Body::Value(AmqpValue(Value::Null)))
            .build();
        let (app, system) = telemetry_properties(&m);
        assert_eq!(app["color"], "red");
        assert_eq!(app["n"], "3");
        assert_eq!(system["messageId"], "m1");
        assert_eq!(system["contentType"], "application/json");
    }
}
