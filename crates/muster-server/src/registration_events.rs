//! Feeds the live registration events (`muster_service_api::events`): each device transport
//! gets the engine behind a [`ReportingRegistrar`] that names the transport, times the
//! request by the injected clock and publishes what the engine answered. Polls are not
//! registrations and pass through unreported.
//!
//! Several nodes: each event also goes on the store's bus (topic [`TOPIC`], the event's JSON),
//! and [`relay`] feeds the other nodes' events into this node's stream, so a viewer on any
//! node sees every registration (at most once: the bus may drop an event under load).

use std::sync::Arc;

use async_trait::async_trait;
use muster_proto::runtime::Clock;
use muster_registration::{DeviceRegistrar, DeviceReply, RegisterRequest, StatusRequest};
use muster_service_api::events::{RegistrationEvent, RegistrationFeed};
use muster_store::bus::{Bus, BusMessage};
use serde_json::Value;
use tokio::sync::{broadcast, watch};

/// The bus topic of registration events.
pub const TOPIC: &str = "registrations";

/// The engine as one transport sees it.
pub struct ReportingRegistrar {
    pub inner: Arc<dyn DeviceRegistrar>,
    pub transport: &'static str,
    pub feed: RegistrationFeed,
    pub clock: Arc<dyn Clock>,
    /// The other nodes' way to this event, when there are any.
    pub bus: Option<Arc<dyn Bus>>,
}

#[async_trait]
impl DeviceRegistrar for ReportingRegistrar {
    async fn register(&self, request: RegisterRequest) -> DeviceReply {
        let started = self.clock.now();
        let registration_id = request.registration_id.clone();
        let reply = self.inner.register(request).await;
        let time = self.clock.now();
        let duration_ms = (time.0 - started.0).num_milliseconds().max(0) as u64;
        let event = event_of(&reply, registration_id, self.transport, time, duration_ms);
        if let Some(bus) = &self.bus {
            match serde_json::to_vec(&event) {
                Ok(bytes) => bus.publish(TOPIC, bytes),
                Err(e) => {
                    tracing::warn!(error = %e, "registration event not shared: encoding failed")
                }
            }
        }
        self.feed.publish(event);
        reply
    }

    async fn operation_status(&self, request: StatusRequest) -> DeviceReply {
        self.inner.operation_status(request).await
    }
}

/// Feeds the other nodes' registration events into this node's stream until `shutdown`.
pub async fn relay(
    mut events: broadcast::Receiver<Arc<BusMessage>>,
    feed: RegistrationFeed,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let message = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            m = events.recv() => m,
        };
        match message {
            Ok(m) if m.topic == TOPIC => match serde_json::from_slice(&m.payload) {
                Ok(event) => feed.publish(event),
                Err(e) => {
                    tracing::debug!(error = %e, "ignored a registration event this node does not understand")
                }
            },
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    lost = n,
                    "registration events of other nodes lost: this node fell behind the bus"
                )
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// What a reply says: an operation status (`assigned`, `assigning`, `failed`, with the hub
/// and any error code of its registration state) or a DPS error body (`failed`).
fn event_of(
    reply: &DeviceReply,
    registration_id: String,
    transport: &str,
    time: muster_proto::Timestamp,
    duration_ms: u64,
) -> RegistrationEvent {
    let body = &reply.body;
    let state = body.get("registrationState");
    let outcome = match body.get("status").and_then(Value::as_str) {
        Some(s) if reply.status < 400 => s.to_string(),
        _ => "failed".to_string(),
    };
    let error_code = body
        .get("errorCode")
        .or_else(|| state.and_then(|s| s.get("errorCode")))
        .and_then(Value::as_u64);
    RegistrationEvent {
        time,
        outcome,
        registration_id,
        hub: state
            .and_then(|s| s.get("assignedHub"))
            .and_then(Value::as_str)
            .map(str::to_string),
        transport: transport.to_string(),
        duration_ms,
        error_code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_proto::{ErrorCode, Timestamp};
    use serde_json::json;

    fn at() -> Timestamp {
        Timestamp::from_unix_millis(1_800_000_000_000).expect("time")
    }

    #[test]
    fn assigned_and_refused_replies_become_events() {
        let assigned = DeviceReply {
            status: 202,
            retry_after: None,
            body: json!({"operationId": "op", "status": "assigned",
                "registrationState": {"registrationId": "d1", "assignedHub": "hub.local"}}),
        };
        let e = event_of(&assigned, "d1".into(), "mqtt", at(), 12);
        assert_eq!(
            (e.outcome.as_str(), e.hub.as_deref(), e.error_code),
            ("assigned", Some("hub.local"), None)
        );
        let refused = DeviceReply::error(ErrorCode::DeviceNotAttested, "no", "t".into(), at());
        let e = event_of(&refused, "d2".into(), "https", at(), 3);
        assert_eq!(
            (e.outcome.as_str(), e.hub, e.error_code),
            ("failed", None, Some(401005))
        );
    }
}
