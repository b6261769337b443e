//! Several Muster nodes serving one hub: what a node keeps in memory (device sessions, method
//! calls waiting for their answer, the live telemetry channel) reaches the other nodes over
//! the store's [`Bus`] (PostgreSQL `LISTEN`/`NOTIFY`; none with SQLite, where this module does
//! nothing and everything stays in the process).
//!
//! Every message is a [`HubEvent`] in JSON on the topic [`TOPIC`]:
//!
//! | Event | Sent when | A receiving node |
//! |---|---|---|
//! | `c2dWake` | a cloud-to-device message was queued or abandoned | wakes the device's session, if it holds it; the message itself is in the store |
//! | `sessionOpened` | a device connected here | closes its own session of that device (a device has one connection) |
//! | `closeSession` | a device was deleted or disabled | closes its session and drops its saved MQTT session |
//! | `desired` | a twin's desired properties changed | pushes the patch to its session of the device, or queues it in a persistent session it keeps |
//! | `telemetry` | a device-to-cloud message was stored | sends it to its live streams (`/telemetry/stream`) |
//! | `sessionWanted` | a device reconnected with CleanSession=0 and this node has no session of it | hands its persistent session over (`sessionHandoff`) and forgets it |
//! | `methodCall` | a direct method was invoked for a device with no session here | if it holds the session: `methodAccepted`, runs it, `methodAnswer`; connected but not subscribed: `methodRefused` |
//!
//! Direct methods: the invoking node gives the call a request id unique across nodes
//! (`{node id}-{n}`), publishes it and waits for `methodAccepted`. It publishes the call again
//! every [`PROBE_INTERVAL`] (nodes run a request id once) until a node accepts or the
//! discovery window ends: the request's connect timeout, and at least [`DISCOVERY`], the time
//! the other nodes get to say they hold the session. Then it answers 404 `DeviceNotOnline`
//! (with the "not subscribed" message when a node said so). Once accepted it waits for the
//! answer up to the response timeout (504 `GatewayTimeout`); the node holding the session
//! applies the same timeout to the device and reports its own timeout or the session closing.
//!
//! Guarantees: the bus is at most once, so a lost wake leaves a message in the store until
//! the device's next connection or wake (never lost); a lost method call or answer ends in
//! 404 or 504, as a device that vanished would; a lost telemetry event is missing from
//! another node's live stream but not from the store (`GET /devices/{id}/telemetry`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_store::bus::{Bus, BusMessage};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::endpoint::{lock, SessionState};
use crate::telemetry::TelemetryMessage;

/// The bus topic of hub events.
pub const TOPIC: &str = "hub";
/// How long the invoking node waits for another node to accept a method call, at least.
pub const DISCOVERY: Duration = Duration::from_secs(1);
/// How often a method call not yet accepted is published again.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long a reconnecting device's node waits for another node to hand its session over.
pub const HANDOFF_WAIT: Duration = Duration::from_millis(500);
/// How long a node remembers a request id it ran (repeats of the call are ignored): longer
/// than the longest connect plus response timeout.
const SEEN_FOR: Duration = Duration::from_secs(2 * crate::methods::MAX_TIMEOUT_SECS + 60);

/// One message between the nodes of a hub (see the module doc). Device keys are the
/// registry's store keys (`"{hub}/{device id}"`, lower-cased), so hubs do not mix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub(crate) enum HubEvent {
    #[serde(rename_all = "camelCase")]
    C2dWake { device: String },
    #[serde(rename_all = "camelCase")]
    SessionOpened { device: String },
    #[serde(rename_all = "camelCase")]
    CloseSession { device: String },
    #[serde(rename_all = "camelCase")]
    Desired {
        device: String,
        device_id: String,
        version: u64,
        patch: serde_json::Map<String, Value>,
    },
    #[serde(rename_all = "camelCase")]
    Telemetry {
        hub: String,
        message: TelemetryMessage,
    },
    #[serde(rename_all = "camelCase")]
    MethodCall {
        rid: String,
        device: String,
        method: String,
        /// The payload as JSON text.
        payload: String,
        timeout_ms: u64,
    },
    #[serde(rename_all = "camelCase")]
    MethodAccepted { rid: String },
    #[serde(rename_all = "camelCase")]
    MethodRefused { rid: String },
    #[serde(rename_all = "camelCase")]
    MethodAnswer {
        rid: String,
        status: u16,
        payload: Value,
    },
    /// A device reconnected with CleanSession=0 to the sending node, which has no session
    /// of it: the node that has one hands it over.
    #[serde(rename_all = "camelCase")]
    SessionWanted { rid: String, device: String },
    #[serde(rename_all = "camelCase")]
    SessionHandoff { rid: String, state: SessionState },
    /// The holding node gave up: its session closed (`timed_out` false) or the device did not
    /// answer in time.
    #[serde(rename_all = "camelCase")]
    MethodFailed { rid: String, timed_out: bool },
}

/// What the invoking node hears about its call.
#[derive(Debug)]
pub(crate) enum Reply {
    Accepted,
    Refused,
    Answer { status: u16, payload: Value },
    Failed { timed_out: bool },
    Session(SessionState),
}

/// A node's part of the hub's cluster.
pub(crate) struct Cluster {
    bus: Arc<dyn Bus>,
    /// Calls this node published, by request id.
    waiting: Mutex<HashMap<String, mpsc::UnboundedSender<Reply>>>,
    /// Calls of other nodes this node accepted, with when, so repeats are ignored.
    seen: Mutex<HashMap<String, Instant>>,
    next: AtomicU64,
}

/// The invoking side of one call; stops listening for replies when dropped.
pub(crate) struct Waiting<'a> {
    cluster: &'a Cluster,
    pub rid: String,
    pub replies: mpsc::UnboundedReceiver<Reply>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.cluster.waiting).remove(&self.rid);
    }
}

impl Cluster {
    pub(crate) fn new(bus: Arc<dyn Bus>) -> Self {
        Self {
            bus,
            waiting: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<BusMessage>> {
        self.bus.subscribe()
    }

    pub(crate) fn publish(&self, event: &HubEvent) {
        match serde_json::to_vec(event) {
            Ok(bytes) => self.bus.publish(TOPIC, bytes),
            Err(e) => tracing::warn!(error = %e, "hub event not sent: encoding failed"),
        }
    }

    /// A request id no other node uses, and the channel its replies arrive on.
    pub(crate) fn expect(&self) -> Waiting<'_> {
        let rid = format!(
            "{:x}-{:x}",
            self.bus.node_id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.waiting).insert(rid.clone(), tx);
        Waiting {
            cluster: self,
            rid,
            replies: rx,
        }
    }

    /// Routes a reply to the call waiting for it (if it still waits).
    pub(crate) fn reply(&self, rid: &str, reply: Reply) {
        if let Some(tx) = lock(&self.waiting).get(rid) {
            let _ = tx.send(reply);
        }
    }

    /// `true` the first time a node sees another node's call `rid` (then it runs it).
    pub(crate) fn first_sight(&self, rid: &str) -> bool {
        let now = Instant::now();
        let mut seen = lock(&self.seen);
        seen.retain(|_, at| now.duration_since(*at) < SEEN_FOR);
        seen.insert(rid.to_string(), now).is_none()
    }
}

impl crate::HubRegistry {
    /// Registers a new session of `device_key` on this node and tells the other nodes, which
    /// close theirs.
    pub(crate) fn register_session(&self, device_key: &str) -> crate::endpoint::SessionHandles {
        let handles = self.endpoint().register(device_key);
        if let Some(c) = self.cluster() {
            c.publish(&HubEvent::SessionOpened {
                device: device_key.to_string(),
            });
        }
        handles
    }

    /// Wakes the device's cloud-to-device delivery, here and on the other nodes.
    pub(crate) fn wake_c2d_everywhere(&self, device_key: &str) {
        self.endpoint().wake_c2d(device_key);
        if let Some(c) = self.cluster() {
            c.publish(&HubEvent::C2dWake {
                device: device_key.to_string(),
            });
        }
    }

    /// Sends a stored telemetry message to the other nodes' live streams.
    pub(crate) fn share_telemetry(&self, message: &TelemetryMessage) {
        if let Some(c) = self.cluster() {
            c.publish(&HubEvent::Telemetry {
                hub: self.hub_partition().to_string(),
                message: message.clone(),
            });
        }
    }

    /// Before a CleanSession=0 connection of a device this node keeps no session of: if the
    /// device was connected within the session expiry (so another node may keep its
    /// session), asks the other nodes for it and waits up to [`HANDOFF_WAIT`]; what arrives
    /// is kept here for the connection to resume.
    pub(crate) async fn fetch_session(&self, device_id: &str, device_key: &str) {
        let Some(cluster) = self.cluster() else {
            return;
        };
        if self.endpoint().has_saved_session(device_key) {
            return;
        }
        let now = self.clock().now();
        let recent = match self.get_device(device_id).await {
            Ok(d) => d.connection_state_updated_time.0.is_some_and(|at| {
                (now.0 - at.0).to_std().unwrap_or_default() < self.limits().session_expiry
            }),
            Err(_) => false,
        };
        if !recent {
            return;
        }
        let mut waiting = cluster.expect();
        cluster.publish(&HubEvent::SessionWanted {
            rid: waiting.rid.clone(),
            device: device_key.to_string(),
        });
        let deadline = Instant::now() + HANDOFF_WAIT;
        while let Ok(Some(reply)) = tokio::time::timeout_at(deadline, waiting.replies.recv()).await
        {
            if let Reply::Session(state) = reply {
                self.endpoint()
                    .adopt_session(device_key, state, now.0.timestamp_millis());
                return;
            }
        }
    }

    /// What this node does with another node's event.
    pub(crate) fn on_hub_event(&self, event: HubEvent) {
        let Some(cluster) = self.cluster() else {
            return;
        };
        match event {
            HubEvent::C2dWake { device } => self.endpoint().wake_c2d(&device),
            HubEvent::SessionOpened { device } => self.endpoint().close_session(&device),
            HubEvent::CloseSession { device } => {
                self.endpoint().close_session(&device);
                self.endpoint().forget_session(&device);
            }
            HubEvent::Desired {
                device,
                device_id,
                version,
                patch,
            } => self.deliver_desired(&device, &device_id, version, patch),
            HubEvent::Telemetry { hub, message } => {
                if hub == self.hub_partition() {
                    let _ = self.endpoint().telemetry_tx.send(Arc::new(message));
                }
            }
            HubEvent::MethodCall {
                rid,
                device,
                method,
                payload,
                timeout_ms,
            } => {
                let Some(sender) = self.endpoint().method_sender(&device) else {
                    if self.endpoint().is_connected(&device) {
                        cluster.publish(&HubEvent::MethodRefused { rid });
                    }
                    return;
                };
                if !cluster.first_sight(&rid) {
                    return;
                }
                cluster.publish(&HubEvent::MethodAccepted { rid: rid.clone() });
                let hub = self.clone();
                let timeout = Duration::from_millis(timeout_ms);
                tokio::spawn(async move {
                    let deadline = Instant::now() + timeout;
                    let result = hub
                        .call_session(&device, sender, &method, payload.into_bytes(), deadline)
                        .await;
                    let Some(cluster) = hub.cluster() else {
                        return;
                    };
                    cluster.publish(&match result {
                        Ok((status, payload)) => HubEvent::MethodAnswer {
                            rid,
                            status,
                            payload,
                        },
                        Err(timed_out) => HubEvent::MethodFailed { rid, timed_out },
                    });
                });
            }
            HubEvent::SessionWanted { rid, device } => {
                let now_ms = self.clock().now().0.timestamp_millis();
                if let Some(state) = self.endpoint().take_saved_session(&device, now_ms) {
                    tracing::debug!(device, "persistent session handed to another node");
                    cluster.publish(&HubEvent::SessionHandoff { rid, state });
                }
            }
            HubEvent::SessionHandoff { rid, state } => cluster.reply(&rid, Reply::Session(state)),
            HubEvent::MethodAccepted { rid } => cluster.reply(&rid, Reply::Accepted),
            HubEvent::MethodRefused { rid } => cluster.reply(&rid, Reply::Refused),
            HubEvent::MethodAnswer {
                rid,
                status,
                payload,
            } => cluster.reply(&rid, Reply::Answer { status, payload }),
            HubEvent::MethodFailed { rid, timed_out } => {
                cluster.reply(&rid, Reply::Failed { timed_out })
            }
        }
    }
}

/// Decodes a bus message as a hub event (`None`: another topic, or not understood).
pub(crate) fn decode(message: &BusMessage) -> Option<HubEvent> {
    if message.topic != TOPIC {
        return None;
    }
    match serde_json::from_slice(&message.payload) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::debug!(error = %e, "ignored a hub event this node does not understand");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_tagged_json() {
        let e = HubEvent::C2dWake {
            device: "hub/d1".into(),
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(text, r#"{"event":"c2dWake","device":"hub/d1"}"#);
        let back: HubEvent = serde_json::from_str(&text).unwrap();
        assert_eq!(back, e);
    }
}
