//! What the device endpoint shares with the service side, inside one [`HubRegistry`]:
//! limits, the table of connected device sessions, direct-method invocations waiting for
//! their answer, the live telemetry channel and the per-device sequence counters.
//!
//! Everything here is in memory and per process: a device's session lives on the node it
//! is connected to. With several nodes, `cluster.rs` carries method calls, cloud-to-device
//! wakes, live telemetry and persistent sessions between them over the store's bus.
//!
//! **Persistent MQTT sessions** (CleanSession=0, MQTT 3.1.1 §3.1.2.4): the table of
//! [`SavedSession`]s keeps, per device, the granted subscriptions, the QoS 1 publishes sent
//! and not yet PUBACKed (twin responses, desired-property patches) and the desired patches
//! published while the device was away. The connection writes its state through to the table
//! on every change, so a reconnect (an SDK renewing its SAS token) resumes it even when the
//! old connection has not finished closing. A session not resumed within
//! [`DeviceEndpointLimits::session_expiry`] after its device disconnected is dropped; a
//! CleanSession=1 connection discards it and keeps nothing after it closes. Cloud-to-device
//! messages are not part of it: they wait in the store until PUBACKed. A device that
//! reconnects to another node gets its session from the node that had it
//! (`HubRegistry::fetch_session`, over the bus).
//!
//! [`HubRegistry`]: crate::HubRegistry

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};

use crate::telemetry::TelemetryMessage;

/// Limits and retention of the device endpoint. Every field has an IoT Hub-like default.
#[derive(Debug, Clone)]
pub struct DeviceEndpointLimits {
    /// Telemetry messages kept per device; writing one more deletes the oldest.
    pub telemetry_retention: u64,
    /// Capacity of the live telemetry channel (SSE subscribers further behind are caught up
    /// from the store, per-device streams, or skip, the all-devices stream).
    pub telemetry_channel_capacity: usize,
    /// Cloud-to-device messages waiting per device (IoT Hub: 50); one more is refused with
    /// 403 `DeviceMaximumQueueDepthExceeded`.
    pub c2d_queue_depth: usize,
    /// Time a cloud-to-device message waits for delivery when the sender gives no expiry
    /// (IoT Hub: 1 hour).
    pub c2d_default_ttl: Duration,
    /// Longest a sender may ask a cloud-to-device message to wait (IoT Hub: 48 hours).
    pub c2d_max_ttl: Duration,
    /// Largest cloud-to-device message body (IoT Hub: 64 KB).
    pub c2d_max_body: usize,
    /// Cloud-to-device messages delivered to one device and not yet PUBACKed.
    pub c2d_max_inflight: usize,
    /// How long a message received over HTTPS stays locked (invisible to further receives)
    /// waiting for its complete, abandon or reject (IoT Hub: 1 minute).
    pub c2d_lock_timeout: Duration,
    /// Receives over HTTPS after which a message that was never completed is dropped
    /// instead of delivered again (IoT Hub's default max delivery count: 10).
    pub c2d_max_delivery_count: u32,
    /// Largest device-to-cloud message (or batch) posted over HTTPS (IoT Hub: 256 KB).
    pub d2c_max_body: usize,
    /// Largest MQTT packet accepted from a device (remaining length). IoT Hub allows
    /// 256 KB device-to-cloud messages; the rest is room for the topic and property bag.
    pub max_packet_size: usize,
    /// Time allowed from the start of the stream to a complete CONNECT.
    pub connect_timeout: Duration,
    /// Time allowed to write one packet before the device counts as gone.
    pub write_timeout: Duration,
    /// Upper bound of the keep-alive timeout (1.5 × the client's keep-alive), and the idle
    /// limit of clients that disable keep-alive (IoT Hub: 1767 s).
    pub max_idle: Duration,
    /// Largest direct-method payload (request or response, IoT Hub: 128 KB).
    pub method_max_payload: usize,
    /// How long a persistent (CleanSession=0) session is kept after its device disconnected.
    /// IoT Hub documents no figure; one hour covers the SDKs' token renewal and ordinary
    /// network drops, as AWS IoT's default does.
    pub session_expiry: Duration,
    /// QoS 1 publishes a persistent session holds for a disconnected device (desired-property
    /// patches published while it was away, plus the ones it had not acknowledged); beyond
    /// this the oldest are dropped and the device is sent its whole desired collection when
    /// it comes back.
    pub session_queue_depth: usize,
}

impl Default for DeviceEndpointLimits {
    fn default() -> Self {
        Self {
            telemetry_retention: 10_000,
            telemetry_channel_capacity: 4096,
            c2d_queue_depth: 50,
            c2d_default_ttl: Duration::from_secs(3600),
            c2d_max_ttl: Duration::from_secs(48 * 3600),
            c2d_max_body: 64 * 1024,
            c2d_max_inflight: 16,
            c2d_lock_timeout: Duration::from_secs(60),
            c2d_max_delivery_count: 10,
            d2c_max_body: 256 * 1024,
            max_packet_size: 256 * 1024 + 64 * 1024,
            connect_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            max_idle: Duration::from_secs(1767),
            method_max_payload: 128 * 1024,
            session_expiry: Duration::from_secs(3600),
            session_queue_depth: 50,
        }
    }
}

/// A QoS 1 publish a persistent session owes its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PendingPublish {
    pub topic: String,
    pub payload: Vec<u8>,
    /// The packet id it was sent with; `None` when it was queued while the device was away
    /// (then it has not been sent yet and goes out without DUP).
    pub pkid: Option<u16>,
}

/// What a session keeps between connections: granted subscriptions (QoS 0 or 1; `None` =
/// not subscribed) and the QoS 1 publishes the device has not acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SessionState {
    pub twin_responses: Option<u8>,
    pub desired: Option<u8>,
    pub methods: Option<u8>,
    pub c2d: Option<u8>,
    pub unacked: Vec<PendingPublish>,
    /// Publishes were dropped from `unacked` (queue full): send the whole desired collection
    /// on resume.
    pub desired_resync: bool,
}

/// One device's session in the table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SavedSession {
    pub state: SessionState,
    /// CleanSession=0: kept after the connection closes.
    pub persistent: bool,
    /// The connection that owns it (writes from a replaced connection are ignored); `None`
    /// while the device is disconnected.
    #[serde(skip)]
    pub owner: Option<u64>,
    /// Unix milliseconds when the device disconnected (expiry counts from here).
    pub disconnected_at_ms: Option<i64>,
}

/// A direct-method call on its way to a device session.
#[derive(Debug)]
pub(crate) struct MethodCall {
    pub rid: String,
    pub method_name: String,
    pub payload: Vec<u8>,
}

/// The device's answer to a direct method.
#[derive(Debug)]
pub(crate) struct MethodAnswer {
    pub status: u16,
    pub payload: Value,
}

/// What the hub knows about one connected session.
pub(crate) struct SessionEntry {
    pub conn_id: u64,
    /// Notified to close the session (replaced by a new connection, device deleted or
    /// disabled).
    pub close: Arc<Notify>,
    /// Notified when a cloud-to-device message was queued for the device.
    pub c2d_wake: Arc<Notify>,
    pub methods: mpsc::Sender<MethodCall>,
    /// Whether the session holds a `$iothub/methods/POST/#` subscription.
    pub methods_subscribed: Arc<AtomicBool>,
}

/// The session's side of its [`SessionEntry`].
pub(crate) struct SessionHandles {
    pub conn_id: u64,
    pub close: Arc<Notify>,
    pub c2d_wake: Arc<Notify>,
    pub methods: mpsc::Receiver<MethodCall>,
    pub methods_subscribed: Arc<AtomicBool>,
}

struct PendingMethod {
    device_key: String,
    answer: oneshot::Sender<MethodAnswer>,
}

pub(crate) struct EndpointState {
    pub limits: DeviceEndpointLimits,
    /// Connected sessions by lower-cased device id.
    sessions: Mutex<HashMap<String, SessionEntry>>,
    next_conn_id: AtomicU64,
    pending_methods: Mutex<HashMap<String, PendingMethod>>,
    next_rid: AtomicU64,
    pub telemetry_tx: broadcast::Sender<Arc<TelemetryMessage>>,
    /// Per device (store key), the last telemetry sequence number once loaded.
    pub telemetry_seqs: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<u64>>>>>,
    /// Per device (store key), the last cloud-to-device sequence number once loaded.
    pub c2d_seqs: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<u64>>>>>,
    /// MQTT session state by store key (see the module doc).
    saved_sessions: Mutex<HashMap<String, SavedSession>>,
}

/// Method calls queued per session before invokers wait.
const METHOD_QUEUE: usize = 32;

impl EndpointState {
    pub fn new(limits: DeviceEndpointLimits) -> Self {
        let (telemetry_tx, _) = broadcast::channel(limits.telemetry_channel_capacity.max(1));
        Self {
            limits,
            sessions: Mutex::new(HashMap::new()),
            next_conn_id: AtomicU64::new(1),
            pending_methods: Mutex::new(HashMap::new()),
            next_rid: AtomicU64::new(1),
            telemetry_tx,
            telemetry_seqs: Mutex::new(HashMap::new()),
            c2d_seqs: Mutex::new(HashMap::new()),
            saved_sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Starts connection `conn_id`'s session: a CleanSession=1 connection discards any saved
    /// one and starts empty; a CleanSession=0 connection resumes the saved session if it has
    /// not expired. Returns the resumed state (`Some` = session present).
    pub fn open_session(
        &self,
        device_key: &str,
        conn_id: u64,
        clean: bool,
        now_ms: i64,
    ) -> Option<SessionState> {
        let expiry_ms = i64::try_from(self.limits.session_expiry.as_millis()).unwrap_or(i64::MAX);
        let mut sessions = lock(&self.saved_sessions);
        let saved = sessions.remove(device_key).filter(|s| {
            !clean
                && s.disconnected_at_ms
                    .is_none_or(|at| now_ms.saturating_sub(at) < expiry_ms)
        });
        let resumed = saved.map(|s| s.state);
        sessions.insert(
            device_key.to_string(),
            SavedSession {
                state: resumed.clone().unwrap_or_default(),
                persistent: !clean,
                owner: Some(conn_id),
                disconnected_at_ms: None,
            },
        );
        resumed
    }

    /// Writes the connection's session state through to the table (ignored once another
    /// connection of the device took the session over).
    pub fn save_session(&self, device_key: &str, conn_id: u64, state: &SessionState) {
        if let Some(s) = lock(&self.saved_sessions).get_mut(device_key) {
            if s.owner == Some(conn_id) {
                s.state = state.clone();
            }
        }
    }

    /// The connection closed: a persistent session starts its expiry, another is dropped.
    /// Expired sessions of other devices are swept on the way.
    pub fn close_saved_session(&self, device_key: &str, conn_id: u64, now_ms: i64) {
        let expiry_ms = i64::try_from(self.limits.session_expiry.as_millis()).unwrap_or(i64::MAX);
        let mut sessions = lock(&self.saved_sessions);
        if let Some(s) = sessions.get_mut(device_key) {
            if s.owner == Some(conn_id) {
                if s.persistent {
                    s.owner = None;
                    s.disconnected_at_ms = Some(now_ms);
                } else {
                    sessions.remove(device_key);
                }
            }
        }
        sessions.retain(|_, s| {
            s.disconnected_at_ms
                .is_none_or(|at| now_ms.saturating_sub(at) < expiry_ms)
        });
    }

    /// Whether this node keeps a session of the device (connected or not).
    pub fn has_saved_session(&self, device_key: &str) -> bool {
        lock(&self.saved_sessions).contains_key(device_key)
    }

    /// Hands a persistent, unexpired session over to another node: removed here (writes of
    /// the connection that owned it are ignored from now on) and returned.
    pub fn take_saved_session(&self, device_key: &str, now_ms: i64) -> Option<SessionState> {
        let expiry_ms = i64::try_from(self.limits.session_expiry.as_millis()).unwrap_or(i64::MAX);
        let mut sessions = lock(&self.saved_sessions);
        let live = sessions.get(device_key).is_some_and(|s| {
            s.persistent
                && s.disconnected_at_ms
                    .is_none_or(|at| now_ms.saturating_sub(at) < expiry_ms)
        });
        if !live {
            return None;
        }
        sessions.remove(device_key).map(|s| s.state)
    }

    /// Keeps a session another node handed over, as if its device had just disconnected
    /// here (the next CleanSession=0 connection resumes it).
    pub fn adopt_session(&self, device_key: &str, state: SessionState, now_ms: i64) {
        lock(&self.saved_sessions).insert(
            device_key.to_string(),
            SavedSession {
                state,
                persistent: true,
                owner: None,
                disconnected_at_ms: Some(now_ms),
            },
        );
    }

    /// Drops the device's session (device deleted).
    pub fn forget_session(&self, device_key: &str) {
        lock(&self.saved_sessions).remove(device_key);
    }

    /// Queues a desired-property patch for a device that is away but holds a persistent
    /// session subscribed to desired patches at QoS 1 (delivered when it resumes).
    pub fn queue_for_absent(&self, device_key: &str, topic: String, payload: Vec<u8>) {
        let depth = self.limits.session_queue_depth.max(1);
        let mut sessions = lock(&self.saved_sessions);
        let Some(s) = sessions.get_mut(device_key) else {
            return;
        };
        if s.owner.is_some() || s.state.desired != Some(1) {
            return;
        }
        if s.state.unacked.len() >= depth {
            s.state.unacked.remove(0);
            s.state.desired_resync = true;
        }
        s.state.unacked.push(PendingPublish {
            topic,
            payload,
            pkid: None,
        });
    }

    /// Registers a new session for `device_key`, closing the one it replaces.
    pub fn register(&self, device_key: &str) -> SessionHandles {
        let conn_id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        let c2d_wake = Arc::new(Notify::new());
        let (tx, rx) = mpsc::channel(METHOD_QUEUE);
        let methods_subscribed = Arc::new(AtomicBool::new(false));
        let entry = SessionEntry {
            conn_id,
            close: close.clone(),
            c2d_wake: c2d_wake.clone(),
            methods: tx,
            methods_subscribed: methods_subscribed.clone(),
        };
        let old = lock(&self.sessions).insert(device_key.to_string(), entry);
        if let Some(old) = old {
            tracing::info!(
                device = device_key,
                "a new connection replaces the device's current one"
            );
            old.close.notify_one();
        }
        SessionHandles {
            conn_id,
            close,
            c2d_wake,
            methods: rx,
            methods_subscribed,
        }
    }

    /// Removes the session if it is still the registered one; `true` when it was.
    pub fn unregister(&self, device_key: &str, conn_id: u64) -> bool {
        let mut sessions = lock(&self.sessions);
        if sessions
            .get(device_key)
            .is_some_and(|e| e.conn_id == conn_id)
        {
            sessions.remove(device_key);
            true
        } else {
            false
        }
    }

    /// Closes the device's session, if it has one (device deleted or disabled).
    pub fn close_session(&self, device_key: &str) {
        if let Some(e) = lock(&self.sessions).remove(device_key) {
            e.close.notify_one();
        }
    }

    pub fn is_connected(&self, device_key: &str) -> bool {
        lock(&self.sessions).contains_key(device_key)
    }

    pub fn wake_c2d(&self, device_key: &str) {
        if let Some(e) = lock(&self.sessions).get(device_key) {
            e.c2d_wake.notify_one();
        }
    }

    /// The method channel of the device's session if it subscribed to methods.
    pub fn method_sender(&self, device_key: &str) -> Option<mpsc::Sender<MethodCall>> {
        lock(&self.sessions)
            .get(device_key)
            .filter(|e| e.methods_subscribed.load(Ordering::SeqCst))
            .map(|e| e.methods.clone())
    }

    /// A fresh request id and the receiver of its answer.
    pub fn pending_method(&self, device_key: &str) -> (String, oneshot::Receiver<MethodAnswer>) {
        let rid = format!("{:x}", self.next_rid.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        lock(&self.pending_methods).insert(
            rid.clone(),
            PendingMethod {
                device_key: device_key.to_string(),
                answer: tx,
            },
        );
        (rid, rx)
    }

    pub fn forget_method(&self, rid: &str) {
        lock(&self.pending_methods).remove(rid);
    }

    /// Routes a device's answer to its invoker; `false` when no invocation of this device
    /// waits for `rid` (answered twice, timed out, or someone else's).
    pub fn answer_method(&self, device_key: &str, rid: &str, answer: MethodAnswer) -> bool {
        let mut pending = lock(&self.pending_methods);
        match pending.get(rid) {
            Some(p) if p.device_key == device_key => {}
            _ => return false,
        }
        let Some(p) = pending.remove(rid) else {
            return false;
        };
        p.answer.send(answer).is_ok()
    }
}

/// The counter lock of one device in one of the sequence tables.
pub(crate) fn seq_lock(
    table: &Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<u64>>>>>,
    key: &str,
) -> Arc<tokio::sync::Mutex<Option<u64>>> {
    lock(table)
        .entry(key.to_string())
        .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(None)))
        .clone()
}

/// Locks a std mutex, recovering from poisoning (every critical section here leaves the
/// data consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_live_persistent_session_is_handed_over_and_then_it_is_gone_here() {
        let limits = DeviceEndpointLimits {
            session_expiry: Duration::from_secs(60),
            ..DeviceEndpointLimits::default()
        };
        let e = EndpointState::new(limits);
        let subscribed = SessionState {
            methods: Some(0),
            ..SessionState::default()
        };
        // Persistent and connected: handed over, and writes of its connection are ignored.
        e.open_session("hub/a", 1, false, 0);
        e.save_session("hub/a", 1, &subscribed);
        assert_eq!(
            e.take_saved_session("hub/a", 1_000),
            Some(subscribed.clone())
        );
        assert!(!e.has_saved_session("hub/a"));
        e.save_session("hub/a", 1, &SessionState::default());
        assert!(!e.has_saved_session("hub/a"));
        // A CleanSession=1 session is never handed over.
        e.open_session("hub/b", 2, true, 0);
        assert_eq!(e.take_saved_session("hub/b", 1_000), None);
        // Persistent but expired: not handed over.
        e.open_session("hub/c", 3, false, 0);
        e.close_saved_session("hub/c", 3, 0);
        assert_eq!(e.take_saved_session("hub/c", 61_000), None);
        // Adopted: the next CleanSession=0 connection resumes it.
        e.adopt_session("hub/d", subscribed.clone(), 5_000);
        assert_eq!(e.open_session("hub/d", 4, false, 6_000), Some(subscribed));
    }
}
