//! Device-to-cloud messages (telemetry): stored per device with a retention limit, read
//! page by page and streamed live as Server-Sent Events. This is Muster's equivalent of IoT
//! Hub's built-in Event Hubs endpoint.
//!
//! Storage: one record per message in `Collection::HubTelemetry`, key
//! `"{hub host}/{device id}/{sequence number as 20 digits}"` (lower-cased), partition
//! `"{hub host}/{device id}"`, so listing a partition after a key reads one device's messages
//! in order. The device's last sequence number is kept in `Collection::HubCounters`
//! (`telemetry/{hub host}/{device id}`) and written in the same transaction as the message,
//! so numbers are never reused, also after a restart or when old messages were dropped.
//! Sequence numbers start at 1 and grow by one per message of that device.
//!
//! Retention: at most [`DeviceEndpointLimits::telemetry_retention`] messages per device
//! (default 10,000): the write of message `n` deletes message `n - retention` in the same
//! transaction. When a lower retention is configured, the surplus is deleted the first time
//! the device sends after the restart (up to 1,000 per device at a time). Telemetry outlives
//! its device: deleting a device keeps its messages (until the id sends again, numbering
//! continues).
//!
//! Devices send over MQTT ([`crate::device_mqtt`]) or HTTPS ([`crate::device_http`]). The
//! reading routes below are Muster's extensions, on paths of their own (IoT Hub's device path
//! `/devices/{id}/messages/events` is the HTTPS send).
//!
//! Live: every stored message is also sent on a broadcast channel
//! ([`HubRegistry::subscribe_telemetry`]), after it is durable and in per-device order.
//!
//! | Method | Path | Right | Success |
//! |---|---|---|---|
//! | GET | `/devices/{id}/telemetry?after={seq}&limit={n}` | ServiceConnect | 200 `[TelemetryMessage]`, oldest first, sequence numbers > `after` (default 0), at most `limit` (1..=1000, default 100) |
//! | GET | `/devices/{id}/telemetry/stream` | ServiceConnect | 200 `text/event-stream`: `id: {seq}`, `data: {TelemetryMessage}`; `Last-Event-ID: {seq}` (or `?after={seq}`) first replays the stored messages after it, then goes live; without it, live only |
//! | GET | `/telemetry/stream` | ServiceConnect | 200 `text/event-stream` of every device: `id: {deviceId}/{seq}`, live only (`Last-Event-ID` is ignored; resume per device with the list above) |
//!
//! [`DeviceEndpointLimits::telemetry_retention`]: crate::DeviceEndpointLimits::telemetry_retention

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_store::{Collection, Expect, ListQuery, Record, Write};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::broadcast;

use crate::auth::{HubRight, Scope};
use crate::endpoint::seq_lock;
use crate::error::HubError;
use crate::model::validate_device_id;
use crate::request::{json_ok, QueryParams};
use crate::routes::{admit, path_id};
use crate::HubRegistry;

/// A failing store ends every open stream at once: bounded lines.
static STREAM_FAILED_LOG: muster_proto::log_limit::LogLimiter =
    muster_proto::log_limit::LogLimiter::new(std::time::Duration::from_secs(10));

/// Most messages one `GET /devices/{id}/telemetry` returns.
pub const MAX_PAGE: usize = 1000;
/// Messages one `GET /devices/{id}/telemetry` returns without `limit`.
pub const DEFAULT_PAGE: usize = 100;
/// Conditional writes retried this often.
const MAX_ATTEMPTS: usize = 16;

/// One stored device-to-cloud message, as the REST API and the event stream show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryMessage {
    /// As the device is registered (original casing).
    pub device_id: String,
    /// Per device, from 1, one more per message.
    pub sequence_number: u64,
    /// When the hub stored it (the injected clock), `YYYY-MM-DDTHH:MM:SS.fffffffZ`.
    pub enqueued_time: String,
    /// The payload: the text itself when it is valid UTF-8 (`bodyEncoding: "utf-8"`), else
    /// base64 (`bodyEncoding: "base64"`).
    pub body: String,
    pub body_encoding: BodyEncoding,
    /// Application properties from the topic's property bag (a key without `=` has `null`).
    pub properties: Map<String, Value>,
    /// System properties: `messageId` (`$.mid`), `correlationId` (`$.cid`), `userId`
    /// (`$.uid`), `to` (`$.to`), `contentType` (`$.ct`), `contentEncoding` (`$.ce`),
    /// `expiryTimeUtc` (`$.exp`), `interfaceId` (`$.ifid`), `outputName` (`$.on`); other
    /// `$.` keys keep their name.
    pub system_properties: Map<String, Value>,
}

/// How [`TelemetryMessage::body`] holds the payload bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyEncoding {
    #[serde(rename = "utf-8")]
    Utf8,
    #[serde(rename = "base64")]
    Base64,
}

impl TelemetryMessage {
    /// The payload bytes.
    pub fn body_bytes(&self) -> Vec<u8> {
        match self.body_encoding {
            BodyEncoding::Utf8 => self.body.as_bytes().to_vec(),
            BodyEncoding::Base64 => B64.decode(&self.body).unwrap_or_default(),
        }
    }
}

/// Which per-device counter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    Telemetry,
    CloudToDevice,
}

impl Counter {
    fn key(self, device_key: &str) -> String {
        let kind = match self {
            Counter::Telemetry => "telemetry",
            Counter::CloudToDevice => "c2d",
        };
        format!("{kind}/{device_key}")
    }
}

/// The store key of message `seq` in a device partition.
pub(crate) fn message_key(partition: &str, seq: u64) -> String {
    format!("{partition}/{seq:020}")
}

/// The sequence number at the end of a message key.
pub(crate) fn key_seq(key: &str) -> Option<u64> {
    key.rsplit('/').next()?.parse().ok()
}

impl HubRegistry {
    /// Subscribes to every telemetry message of this hub as it is stored. A receiver that
    /// falls more than [`crate::DeviceEndpointLimits::telemetry_channel_capacity`] behind
    /// gets `RecvError::Lagged` and can catch up with [`Self::read_telemetry`].
    pub fn subscribe_telemetry(&self) -> broadcast::Receiver<Arc<TelemetryMessage>> {
        self.endpoint().telemetry_tx.subscribe()
    }

    /// Stores one device-to-cloud message with the device's next sequence number (and drops
    /// the message that falls out of retention), then publishes it live.
    pub async fn store_telemetry(
        &self,
        device_id: &str,
        body: &[u8],
        properties: Map<String, Value>,
        system_properties: Map<String, Value>,
    ) -> Result<Arc<TelemetryMessage>, HubError> {
        validate_device_id(device_id)?;
        let partition = self.device_partition(device_id);
        let lock = seq_lock(&self.endpoint().telemetry_seqs, &partition);
        let mut guard = lock.lock().await;
        let mut last = match *guard {
            Some(n) => n,
            None => {
                let n = self.load_counter(Counter::Telemetry, &partition).await?;
                self.prune_telemetry(&partition, n).await?;
                *guard = Some(n);
                n
            }
        };
        let (text, body_encoding) = match std::str::from_utf8(body) {
            Ok(s) => (s.to_string(), BodyEncoding::Utf8),
            Err(_) => (B64.encode(body), BodyEncoding::Base64),
        };
        let retention = self.limits().telemetry_retention.max(1);
        for _ in 0..MAX_ATTEMPTS {
            let seq = last + 1;
            let message = TelemetryMessage {
                device_id: device_id.to_string(),
                sequence_number: seq,
                enqueued_time: self.clock().now().to_dps_string(),
                body: text.clone(),
                body_encoding,
                properties: properties.clone(),
                system_properties: system_properties.clone(),
            };
            let json = serde_json::to_value(&message)
                .map_err(|e| HubError::internal("encoding a telemetry message", e))?;
            let mut writes = vec![
                Write::put(
                    Collection::HubTelemetry,
                    message_key(&partition, seq),
                    Expect::Absent,
                    json,
                )
                .with_partition(Some(partition.clone())),
                counter_write(Counter::Telemetry, &partition, seq),
            ];
            if seq > retention {
                writes.push(Write::delete(
                    Collection::HubTelemetry,
                    message_key(&partition, seq - retention),
                    Expect::Any,
                ));
            }
            let outcomes = self.store().write(writes).await?;
            *guard = Some(seq);
            if outcomes.first().is_some_and(|o| o.is_applied()) {
                let message = Arc::new(message);
                // No subscriber is not an error.
                let _ = self.endpoint().telemetry_tx.send(message.clone());
                self.share_telemetry(&message);
                return Ok(message);
            }
            // Another writer (a second node on the same store) took this number.
            last = seq;
        }
        Err(HubError::new(
            crate::HubErrorCode::ServerError,
            format!("could not number a telemetry message of device '{device_id}'; retry"),
        ))
    }

    /// A device's stored messages with sequence numbers greater than `after`, oldest first,
    /// at most `limit`.
    pub async fn read_telemetry(
        &self,
        device_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<TelemetryMessage>, HubError> {
        validate_device_id(device_id)?;
        let partition = self.device_partition(device_id);
        let records = self
            .store()
            .list(
                Collection::HubTelemetry,
                ListQuery {
                    after: Some(message_key(&partition, after)),
                    partition: Some(partition),
                    limit,
                },
            )
            .await?;
        records.into_iter().map(decode_message).collect()
    }

    /// The device's last sequence number of a counter (0 when it never had one).
    pub(crate) async fn load_counter(
        &self,
        counter: Counter,
        device_key: &str,
    ) -> Result<u64, HubError> {
        let record = self
            .store()
            .get(Collection::HubCounters, &counter.key(device_key))
            .await?;
        Ok(record
            .and_then(|r| r.body.get("last").and_then(Value::as_u64))
            .unwrap_or(0))
    }

    /// Deletes stored messages that are out of retention (a lower retention configured
    /// since they were written).
    async fn prune_telemetry(&self, partition: &str, last: u64) -> Result<(), HubError> {
        let retention = self.limits().telemetry_retention.max(1);
        if last <= retention {
            return Ok(());
        }
        let keep_from = last - retention + 1;
        let records = self
            .store()
            .list(
                Collection::HubTelemetry,
                ListQuery {
                    partition: Some(partition.to_string()),
                    after: None,
                    limit: 1000,
                },
            )
            .await?;
        let writes: Vec<Write> = records
            .into_iter()
            .filter(|r| key_seq(&r.key).is_some_and(|s| s < keep_from))
            .map(|r| Write::delete(Collection::HubTelemetry, r.key, Expect::Any))
            .collect();
        if !writes.is_empty() {
            tracing::debug!(
                partition,
                count = writes.len(),
                "dropping telemetry out of retention"
            );
            self.store().write(writes).await?;
        }
        Ok(())
    }
}

/// The counter write that goes with message `value`.
pub(crate) fn counter_write(counter: Counter, device_key: &str, value: u64) -> Write {
    Write::put(
        Collection::HubCounters,
        counter.key(device_key),
        Expect::Any,
        serde_json::json!({ "last": value }),
    )
}

fn decode_message(record: Record) -> Result<TelemetryMessage, HubError> {
    serde_json::from_value(record.body).map_err(|e| {
        HubError::internal(
            "reading a telemetry message",
            format!("record {} is corrupt: {e}", record.key),
        )
    })
}

fn parse_u64(params: &QueryParams, name: &str) -> Result<Option<u64>, HubError> {
    params
        .get(name)
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| HubError::invalid(format!("'{name}' must be a non-negative integer")))
        })
        .transpose()
}

/// `GET /devices/{id}/telemetry?after=&limit=`.
pub(crate) async fn list(
    State(hub): State<HubRegistry>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<QueryParams>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let id = path_id(path)?;
        let params = admit(
            &hub,
            &headers,
            query,
            HubRight::ServiceConnect,
            Scope::Device(&id),
        )?;
        validate_device_id(&id)?;
        let after = parse_u64(&params, "after")?.unwrap_or(0);
        let limit = match parse_u64(&params, "limit")? {
            None => DEFAULT_PAGE,
            Some(n) if (1..=MAX_PAGE as u64).contains(&n) => n as usize,
            Some(_) => {
                return Err(HubError::invalid(format!(
                    "'limit' must be between 1 and {MAX_PAGE}"
                )))
            }
        };
        let messages = hub.read_telemetry(&id, after, limit).await?;
        Ok::<_, HubError>(json_ok(&messages, None))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// State of one event stream.
struct StreamState {
    hub: HubRegistry,
    /// `Some(device id)` for a per-device stream.
    device: Option<String>,
    /// Last sequence number sent (per-device streams).
    last: u64,
    backlog: VecDeque<TelemetryMessage>,
    /// Whether stored messages after `last` still have to be read.
    replay: bool,
    rx: broadcast::Receiver<Arc<TelemetryMessage>>,
}

const REPLAY_PAGE: usize = 500;

fn event(message: &TelemetryMessage, per_device: bool) -> Event {
    let id = if per_device {
        message.sequence_number.to_string()
    } else {
        format!("{}/{}", message.device_id, message.sequence_number)
    };
    let data = serde_json::to_string(message).unwrap_or_else(|_| "{}".into());
    Event::default().id(id).data(data)
}

async fn next_event(mut st: StreamState) -> Option<(Result<Event, Infallible>, StreamState)> {
    loop {
        if let Some(m) = st.backlog.pop_front() {
            st.last = m.sequence_number;
            return Some((Ok(event(&m, true)), st));
        }
        if st.replay {
            let device = st.device.clone().unwrap_or_default();
            match st.hub.read_telemetry(&device, st.last, REPLAY_PAGE).await {
                Ok(page) => {
                    st.replay = page.len() == REPLAY_PAGE;
                    st.backlog.extend(page);
                    continue;
                }
                Err(e) => {
                    if let Some(suppressed) = STREAM_FAILED_LOG.admit() {
                        tracing::warn!(error = %e, suppressed, "telemetry stream ended: reading the store failed");
                    }
                    return None;
                }
            }
        }
        match st.rx.recv().await {
            Ok(m) => match &st.device {
                Some(d) => {
                    if m.device_id.eq_ignore_ascii_case(d) && m.sequence_number > st.last {
                        st.last = m.sequence_number;
                        return Some((Ok(event(&m, true)), st));
                    }
                }
                None => return Some((Ok(event(&m, false)), st)),
            },
            Err(broadcast::error::RecvError::Lagged(n)) => {
                if st.device.is_some() {
                    // Catch up from the store.
                    st.replay = true;
                } else {
                    let comment = format!("lagged: {n} messages were skipped");
                    return Some((Ok(Event::default().comment(comment)), st));
                }
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

fn sse(st: StreamState) -> Response {
    let stream = futures_util::stream::unfold(st, next_event);
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `GET /devices/{id}/telemetry/stream`.
pub(crate) async fn device_stream(
    State(hub): State<HubRegistry>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<QueryParams>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let result = (|| {
        let id = path_id(path)?;
        let params = admit(
            &hub,
            &headers,
            query,
            HubRight::ServiceConnect,
            Scope::Device(&id),
        )?;
        validate_device_id(&id)?;
        let last_event_id = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    HubError::invalid("Last-Event-ID must be a sequence number of this device")
                })
            })
            .transpose()?;
        let resume = match last_event_id {
            Some(n) => Some(n),
            None => parse_u64(&params, "after")?,
        };
        // Subscribe before reading the store, so nothing falls between the two.
        let rx = hub.subscribe_telemetry();
        Ok::<_, HubError>(StreamState {
            hub: hub.clone(),
            device: Some(id),
            last: resume.unwrap_or(0),
            backlog: VecDeque::new(),
            replay: resume.is_some(),
            rx,
        })
    })();
    match result {
        Ok(st) => sse(st),
        Err(e) => e.into_response(),
    }
}

/// `GET /telemetry/stream`.
pub(crate) async fn all_stream(
    State(hub): State<HubRegistry>,
    query: Result<Query<QueryParams>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = admit(
        &hub,
        &headers,
        query,
        HubRight::ServiceConnect,
        Scope::Devices,
    ) {
        return e.into_response();
    }
    sse(StreamState {
        rx: hub.subscribe_telemetry(),
        hub,
        device: None,
        last: 0,
        backlog: VecDeque::new(),
        replay: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_sequence() {
        let a = message_key("hub/dev", 9);
        let b = message_key("hub/dev", 10);
        assert!(a < b);
        assert_eq!(key_seq(&b), Some(10));
        assert_eq!(a, "hub/dev/00000000000000000009");
    }

    #[test]
    fn body_round_trip() {
        let m = TelemetryMessage {
            device_id: "d".into(),
            sequence_number: 1,
            enqueued_time: String::new(),
            body: B64.encode([0xff, 0]),
            body_encoding: BodyEncoding::Base64,
            properties: Map::new(),
            system_properties: Map::new(),
        };
        assert_eq!(m.body_bytes(), vec![0xff, 0]);
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["bodyEncoding"], "base64");
    }
}
