//! Cloud-to-device messages: a bounded, expiring queue per device, delivered over MQTT and
//! received over HTTPS ([`crate::device_http`]).
//!
//! Microsoft's service SDKs send these over AMQP (`ServiceClient.SendAsync`); Muster's hub
//! takes them through a REST extension until AMQP arrives. Its path keeps off IoT Hub's
//! device path `/devices/{id}/messages/devicebound`:
//!
//! | Method | Path | Right | Success | Failures |
//! |---|---|---|---|---|
//! | POST | `/devices/{id}/messages/cloudToDevice` | ServiceConnect | 204 | 400, 401, 403 `DeviceMaximumQueueDepthExceeded`, 404 `DeviceNotFound`, 413 |
//!
//! The request body is the message payload (bytes, at most
//! [`DeviceEndpointLimits::c2d_max_body`], 64 KB). Headers set the properties, as IoT Hub's
//! HTTPS device API names them: `iothub-messageid`, `iothub-correlationid`, `iothub-to`
//! (default `/devices/{id}/messages/deviceBound`), `iothub-userid`, `content-type`,
//! `content-encoding`, `iothub-expiry` (absolute RFC 3339 time; default now +
//! [`DeviceEndpointLimits::c2d_default_ttl`], at most now + `c2d_max_ttl`), and
//! `iothub-app-{name}: {value}` for each application property (HTTP header names arrive
//! lower-cased, so property names do too).
//!
//! Storage: one record per waiting message in `Collection::HubC2dMessages`, key
//! `"{hub host}/{device id}/{sequence number as 20 digits}"`, partition
//! `"{hub host}/{device id}"` (lower-cased); the last sequence number is in
//! `Collection::HubCounters` (`c2d/{hub host}/{device id}`). At most
//! [`DeviceEndpointLimits::c2d_queue_depth`] (50) unexpired messages wait per device.
//! A connected session that subscribed to `devices/{id}/messages/devicebound/#` gets the
//! queue in order (at QoS 1, at most `c2d_max_inflight` unacknowledged); a message is
//! deleted when the device PUBACKs it (or, on a QoS 0 subscription, when it is written).
//! Unacknowledged messages are delivered again on the next connection (at least once).
//! An HTTPS receive ([`HubRegistry::receive_cloud_to_device`]) instead writes a lock into the
//! record (`lockToken`, `lockedUntilMs`, conditional on the record's etag) and counts the
//! delivery (`deliveryCount`); [`HubRegistry::settle_cloud_to_device`] deletes it (complete,
//! reject) or clears the lock (abandon, which wakes an MQTT session). While a lock holds,
//! neither another receive nor an MQTT session takes the message; after
//! [`DeviceEndpointLimits::c2d_max_delivery_count`] receives it is dropped.
//!
//! [`DeviceEndpointLimits::c2d_max_delivery_count`]: crate::DeviceEndpointLimits::c2d_max_delivery_count
//! Expired messages are deleted instead of delivered. Deleting a device leaves its queue
//! until the messages expire and are dropped by a later send or delivery; there is no
//! feedback channel (`iothub-ack` is ignored) and `cloudToDeviceMessageCount` stays 0.
//!
//! [`DeviceEndpointLimits::c2d_max_body`]: crate::DeviceEndpointLimits::c2d_max_body
//! [`DeviceEndpointLimits::c2d_default_ttl`]: crate::DeviceEndpointLimits::c2d_default_ttl
//! [`DeviceEndpointLimits::c2d_queue_depth`]: crate::DeviceEndpointLimits::c2d_queue_depth

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_proto::Timestamp;
use muster_store::{Collection, Expect, ListQuery, Record, Write};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::auth::{HubRight, Scope};
use crate::endpoint::seq_lock;
use crate::error::{HubError, HubErrorCode};
use crate::model::validate_device_id;
use crate::request::{read_body, QueryParams};
use crate::routes::{admit, path_id};
use crate::telemetry::{counter_write, message_key, Counter};
use crate::HubRegistry;

/// Conditional writes of one HTTPS receive retried this often.
const RECEIVE_ATTEMPTS: usize = 16;

/// Every delivery attempt meets a corrupt message again until it is gone: bounded lines.
static CORRUPT_MESSAGE_LOG: muster_proto::log_limit::LogLimiter =
    muster_proto::log_limit::LogLimiter::new(std::time::Duration::from_secs(10));

/// A cloud-to-device message to send.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CloudToDeviceInput {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    /// Default `/devices/{id}/messages/deviceBound`.
    pub to: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// Absolute expiry; default now + `c2d_default_ttl`.
    pub expiry: Option<Timestamp>,
    /// Application properties, in order.
    pub properties: Vec<(String, String)>,
}

/// A queued cloud-to-device message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudToDeviceMessage {
    pub device_id: String,
    pub sequence_number: u64,
    pub enqueued_time: String,
    /// Unix milliseconds after which the message is dropped instead of delivered.
    pub expiry_unix_ms: i64,
    /// Whether the sender set the expiry (then it is sent to the device as `$.exp`).
    pub explicit_expiry: bool,
    /// base64 of the payload.
    pub body: String,
    /// Application properties.
    pub properties: Map<String, Value>,
    /// `messageId`, `correlationId`, `userId`, `to`, `contentType`, `contentEncoding`,
    /// `expiryTimeUtc` (only the ones set).
    pub system_properties: Map<String, Value>,
    /// Times an HTTPS receive handed the message out (IoT Hub's `iothub-deliverycount`).
    #[serde(default)]
    pub delivery_count: u32,
    /// The lock token of the HTTPS receive that holds the message (its `ETag`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_token: Option<String>,
    /// Unix milliseconds until which that lock holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until_ms: Option<i64>,
}

impl CloudToDeviceMessage {
    pub fn body_bytes(&self) -> Vec<u8> {
        B64.decode(&self.body).unwrap_or_default()
    }

    /// Whether an HTTPS receive holds the message locked at `now_ms`.
    pub fn is_locked(&self, now_ms: i64) -> bool {
        self.lock_token.is_some() && self.locked_until_ms.is_some_and(|until| until > now_ms)
    }
}

/// A waiting message with its store key and record etag.
#[derive(Debug, Clone)]
pub(crate) struct Queued {
    pub key: String,
    pub etag: String,
    pub message: CloudToDeviceMessage,
}

/// How a device settles a message it received over HTTPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Done with it: the message is deleted.
    Complete,
    /// Give it back: the lock is released and the message is delivered again (its delivery
    /// count stays).
    Abandon,
    /// Refuse it: the message is deleted (there is no feedback channel to record it on).
    Reject,
}

impl HubRegistry {
    /// Queues a cloud-to-device message for a device and wakes its session. Fails with
    /// `DeviceNotFound`, `MessageTooLarge` or `DeviceMaximumQueueDepthExceeded`.
    pub async fn send_cloud_to_device(
        &self,
        device_id: &str,
        input: CloudToDeviceInput,
    ) -> Result<CloudToDeviceMessage, HubError> {
        let device = self.get_device(device_id).await?;
        let limits = self.limits().clone();
        if input.body.len() > limits.c2d_max_body {
            return Err(HubError::new(
                HubErrorCode::MessageTooLarge,
                format!(
                    "the message is {} bytes; cloud-to-device messages are at most {} bytes",
                    input.body.len(),
                    limits.c2d_max_body
                ),
            ));
        }
        let now = self.clock().now();
        let now_ms = now.0.timestamp_millis();
        let max_ms = now_ms + limits.c2d_max_ttl.as_millis() as i64;
        let expiry_ms = match input.expiry {
            Some(t) => {
                let ms = t.0.timestamp_millis();
                if ms <= now_ms {
                    return Err(HubError::invalid("the message expiry is in the past"));
                }
                ms.min(max_ms)
            }
            None => now_ms + limits.c2d_default_ttl.as_millis() as i64,
        };
        let mut system = Map::new();
        let mut put = |name: &str, v: &Option<String>| {
            if let Some(v) = v {
                system.insert(name.into(), Value::String(v.clone()));
            }
        };
        put("messageId", &input.message_id);
        put("correlationId", &input.correlation_id);
        put("userId", &input.user_id);
        let to = input
            .to
            .clone()
            .unwrap_or_else(|| format!("/devices/{}/messages/deviceBound", device.device_id));
        put("to", &Some(to));
        put("contentType", &input.content_type);
        put("contentEncoding", &input.content_encoding);
        if input.expiry.is_some() {
            let t = Timestamp::from_unix_millis(expiry_ms).unwrap_or(now);
            system.insert("expiryTimeUtc".into(), Value::String(t.to_dps_string()));
        }
        let properties: Map<String, Value> = input
            .properties
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();

        let partition = self.device_partition(device_id);
        let lock = seq_lock(&self.endpoint().c2d_seqs, &partition);
        let mut guard = lock.lock().await;
        let last = match *guard {
            Some(n) => n,
            None => {
                let n = self
                    .load_counter(Counter::CloudToDevice, &partition)
                    .await?;
                *guard = Some(n);
                n
            }
        };
        let waiting = self.queued_cloud_to_device(device_id, now_ms).await?;
        if waiting.len() >= limits.c2d_queue_depth {
            return Err(HubError::new(
                HubErrorCode::DeviceMaximumQueueDepthExceeded,
                format!(
                    "device '{}' already has {} cloud-to-device messages waiting",
                    device.device_id,
                    waiting.len()
                ),
            ));
        }
        // Numbers above anything still queued (another node may have written some).
        let seq = last.max(waiting.last().map_or(0, |q| q.message.sequence_number)) + 1;
        let message = CloudToDeviceMessage {
            device_id: device.device_id.clone(),
            sequence_number: seq,
            enqueued_time: now.to_dps_string(),
            expiry_unix_ms: expiry_ms,
            explicit_expiry: input.expiry.is_some(),
            body: B64.encode(&input.body),
            properties,
            system_properties: system,
            delivery_count: 0,
            lock_token: None,
            locked_until_ms: None,
        };
        let json = serde_json::to_value(&message)
            .map_err(|e| HubError::internal("encoding a cloud-to-device message", e))?;
        let outcomes = self
            .store()
            .write(vec![
                Write::put(
                    Collection::HubC2dMessages,
                    message_key(&partition, seq),
                    Expect::Absent,
                    json,
                )
                .with_partition(Some(partition.clone())),
                counter_write(Counter::CloudToDevice, &partition, seq),
            ])
            .await?;
        *guard = Some(seq);
        if !outcomes.first().is_some_and(|o| o.is_applied()) {
            return Err(HubError::new(
                HubErrorCode::ServerError,
                "another writer queued a message at the same time; retry",
            ));
        }
        drop(guard);
        self.wake_c2d_everywhere(&partition);
        Ok(message)
    }

    /// The device's unexpired queued messages in order, with their store keys; expired
    /// ones are deleted on the way.
    pub(crate) async fn queued_cloud_to_device(
        &self,
        device_id: &str,
        now_ms: i64,
    ) -> Result<Vec<Queued>, HubError> {
        validate_device_id(device_id)?;
        let partition = self.device_partition(device_id);
        let limit = self.limits().c2d_queue_depth + 256;
        let records = self
            .store()
            .list(
                Collection::HubC2dMessages,
                ListQuery {
                    partition: Some(partition),
                    after: None,
                    limit,
                },
            )
            .await?;
        let mut live = Vec::with_capacity(records.len());
        let mut expired = Vec::new();
        for record in records {
            let key = record.key.clone();
            let etag = record.etag.clone();
            match decode(record) {
                Ok(message) if message.expiry_unix_ms > now_ms => {
                    live.push(Queued { key, etag, message })
                }
                Ok(_) => expired.push(Write::delete(Collection::HubC2dMessages, key, Expect::Any)),
                Err(e) => {
                    if let Some(suppressed) = CORRUPT_MESSAGE_LOG.admit() {
                        tracing::warn!(error = %e, suppressed, "dropping a corrupt cloud-to-device message");
                    }
                    expired.push(Write::delete(Collection::HubC2dMessages, key, Expect::Any));
                }
            }
        }
        if !expired.is_empty() {
            tracing::debug!(
                device_id,
                count = expired.len(),
                "dropping expired cloud-to-device messages"
            );
            self.store().write(expired).await?;
        }
        Ok(live)
    }

    /// Receives one message for an HTTPS device: the first waiting message no other receive
    /// holds locked, locked for [`crate::DeviceEndpointLimits::c2d_lock_timeout`] under a
    /// fresh lock token, its delivery count one higher. A message already handed out
    /// `c2d_max_delivery_count` times is dropped instead. `None` when nothing waits.
    pub async fn receive_cloud_to_device(
        &self,
        device_id: &str,
    ) -> Result<Option<CloudToDeviceMessage>, HubError> {
        let limits = self.limits().clone();
        for _ in 0..RECEIVE_ATTEMPTS {
            let now_ms = self.clock().now().0.timestamp_millis();
            let queue = self.queued_cloud_to_device(device_id, now_ms).await?;
            let Some(q) = queue.into_iter().find(|q| !q.message.is_locked(now_ms)) else {
                return Ok(None);
            };
            let partition = self.device_partition(device_id);
            if q.message.delivery_count >= limits.c2d_max_delivery_count.max(1) {
                tracing::debug!(
                    device_id,
                    sequence_number = q.message.sequence_number,
                    "dropping a cloud-to-device message delivered the maximum number of times"
                );
                self.store()
                    .write(vec![Write::delete(
                        Collection::HubC2dMessages,
                        q.key,
                        Expect::Etag(q.etag),
                    )])
                    .await?;
                continue;
            }
            let mut message = q.message;
            message.delivery_count += 1;
            message.lock_token = Some(self.lock_token());
            message.locked_until_ms =
                Some(now_ms.saturating_add(limits.c2d_lock_timeout.as_millis() as i64));
            let json = serde_json::to_value(&message)
                .map_err(|e| HubError::internal("encoding a cloud-to-device message", e))?;
            let outcomes = self
                .store()
                .write(vec![Write::put(
                    Collection::HubC2dMessages,
                    q.key,
                    Expect::Etag(q.etag),
                    json,
                )
                .with_partition(Some(partition))])
                .await?;
            if outcomes.first().is_some_and(|o| o.is_applied()) {
                return Ok(Some(message));
            }
            // Another receive, a settlement or an MQTT delivery changed it: look again.
        }
        Err(HubError::new(
            HubErrorCode::ServerError,
            "the cloud-to-device queue kept changing during the receive; retry",
        ))
    }

    /// Settles the message an HTTPS receive locked under `lock_token`. Fails with
    /// `DeviceMessageLockLost` when no message of the device holds that lock now (unknown
    /// token, settled already, lock expired).
    pub async fn settle_cloud_to_device(
        &self,
        device_id: &str,
        lock_token: &str,
        settlement: Settlement,
    ) -> Result<(), HubError> {
        let now_ms = self.clock().now().0.timestamp_millis();
        let queue = self.queued_cloud_to_device(device_id, now_ms).await?;
        let lost = || {
            HubError::new(
                HubErrorCode::DeviceMessageLockLost,
                format!(
                    "no cloud-to-device message of device '{device_id}' is locked with this lock token (unknown, already settled or its lock expired)"
                ),
            )
        };
        let q = queue
            .into_iter()
            .find(|q| {
                q.message.is_locked(now_ms) && q.message.lock_token.as_deref() == Some(lock_token)
            })
            .ok_or_else(lost)?;
        let write = match settlement {
            Settlement::Complete | Settlement::Reject => {
                Write::delete(Collection::HubC2dMessages, q.key, Expect::Etag(q.etag))
            }
            Settlement::Abandon => {
                let mut message = q.message;
                message.lock_token = None;
                message.locked_until_ms = None;
                let json = serde_json::to_value(&message)
                    .map_err(|e| HubError::internal("encoding a cloud-to-device message", e))?;
                Write::put(
                    Collection::HubC2dMessages,
                    q.key,
                    Expect::Etag(q.etag),
                    json,
                )
                .with_partition(Some(self.device_partition(device_id)))
            }
        };
        let outcomes = self.store().write(vec![write]).await?;
        if !outcomes.first().is_some_and(|o| o.is_applied()) {
            return Err(lost());
        }
        if settlement == Settlement::Abandon {
            // An MQTT session of the device may take it now.
            self.wake_c2d_everywhere(&self.device_partition(device_id));
        }
        Ok(())
    }

    /// A fresh lock token: a random UUID (version 4 form), safe in a URL path.
    fn lock_token(&self) -> String {
        let mut b = [0u8; 16];
        self.entropy().fill(&mut b);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    /// Removes a delivered message.
    pub(crate) async fn complete_cloud_to_device(&self, key: &str) -> Result<(), HubError> {
        self.store()
            .write(vec![Write::delete(
                Collection::HubC2dMessages,
                key.to_string(),
                Expect::Any,
            )])
            .await?;
        Ok(())
    }
}

fn decode(record: Record) -> Result<CloudToDeviceMessage, HubError> {
    serde_json::from_value(record.body).map_err(|e| {
        HubError::internal(
            "reading a cloud-to-device message",
            format!("record {} is corrupt: {e}", record.key),
        )
    })
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

/// Reads the message properties from the request headers.
fn input_from_headers(headers: &HeaderMap, body: Vec<u8>) -> Result<CloudToDeviceInput, HubError> {
    let expiry = match header(headers, "iothub-expiry")? {
        None => None,
        Some(v) => Some(
            chrono::DateTime::parse_from_rfc3339(v.trim())
                .map(|t| Timestamp(t.with_timezone(&chrono::Utc)))
                .map_err(|_| {
                    HubError::invalid(
                        "iothub-expiry must be an RFC 3339 time (UTC, e.g. 2030-01-01T00:00:00Z)",
                    )
                })?,
        ),
    };
    let mut properties = Vec::new();
    for (name, value) in headers {
        if let Some(prop) = name.as_str().strip_prefix("iothub-app-") {
            if prop.is_empty() {
                continue;
            }
            let value = value.to_str().map_err(|_| {
                HubError::invalid(format!("the {} header is not valid text", name.as_str()))
            })?;
            properties.push((prop.to_string(), value.to_string()));
        }
    }
    Ok(CloudToDeviceInput {
        body,
        message_id: header(headers, "iothub-messageid")?,
        correlation_id: header(headers, "iothub-correlationid")?,
        user_id: header(headers, "iothub-userid")?,
        to: header(headers, "iothub-to")?,
        content_type: header(headers, "content-type")?,
        content_encoding: header(headers, "content-encoding")?,
        expiry,
        properties,
    })
}

/// `POST /devices/{id}/messages/cloudToDevice`.
pub(crate) async fn send(
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
        let bytes = read_body(body, hub.limits().c2d_max_body).await?;
        let input = input_from_headers(&headers, bytes.to_vec())?;
        hub.send_cloud_to_device(&id, input).await?;
        Ok::<_, HubError>(StatusCode::NO_CONTENT.into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
