//! What the device endpoint shares with the service side, inside one [`HubRegistry`]:
//! limits, the table of connected device sessions, direct-method invocations waiting for
//! their answer, the live telemetry channel and the per-device sequence counters.
//!
//! Everything here is in memory and per process: a device's session lives on the node it
//! is connected to, so invoking a method or waking a cloud-to-device delivery only reaches
//! devices connected to this process (one Muster node; a shared store between nodes would
//! need a message bus for these).
//!
//! [`HubRegistry`]: crate::HubRegistry

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
            max_packet_size: 256 * 1024 + 64 * 1024,
            connect_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            max_idle: Duration::from_secs(1767),
            method_max_payload: 128 * 1024,
        }
    }
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
        }
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
