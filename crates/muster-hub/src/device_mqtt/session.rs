//! One connected device: how each packet it sends is answered, and what the hub pushes to it
//! (twin responses, desired-property patches, cloud-to-device messages, method calls).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rumqttc::mqttbytes::v4::{
    Packet, PubAck, Publish, SubAck, Subscribe, SubscribeReasonCode, UnsubAck, Unsubscribe,
};
use rumqttc::mqttbytes::QoS;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::endpoint::{MethodAnswer, MethodCall, PendingPublish, SessionState};
use crate::error::HubError;
use crate::registry::DesiredChange;
use crate::HubRegistry;

use super::topic::{self, DeviceTopic, Filter};

/// What the reader does after a packet.
#[derive(Debug)]
pub(crate) enum Flow {
    Continue,
    /// Close the connection; the reason is logged.
    Close(String),
}

impl Flow {
    fn closed(reason: impl Into<String>) -> Self {
        Flow::Close(reason.into())
    }
}

pub(crate) struct Session {
    hub: HubRegistry,
    /// As registered.
    device_id: String,
    /// Lower-cased store key / partition.
    device_key: String,
    /// This connection's id in the endpoint tables.
    conn_id: u64,
    tx: mpsc::Sender<Packet>,
    twin_res: Option<QoS>,
    desired: Option<QoS>,
    methods: Option<QoS>,
    methods_subscribed: Arc<AtomicBool>,
    c2d: Option<QoS>,
    /// Our packet id → store key of a cloud-to-device message awaiting PUBACK.
    c2d_inflight: HashMap<u16, String>,
    c2d_sent: HashSet<String>,
    /// QoS 1 twin responses and desired patches sent and not yet PUBACKed, in order: the
    /// part of the session state a reconnect must redeliver.
    unacked: Vec<PendingPublish>,
    last_pkid: u16,
}

fn qos_code(q: Option<QoS>) -> Option<u8> {
    q.map(|q| q as u8)
}

fn qos_of(code: Option<u8>) -> Option<QoS> {
    match code {
        Some(0) => Some(QoS::AtMostOnce),
        Some(_) => Some(QoS::AtLeastOnce),
        None => None,
    }
}

/// Granted QoS: never more than 1, never more than asked.
fn grant(asked: QoS) -> QoS {
    if asked == QoS::AtMostOnce {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

impl Session {
    pub(crate) fn new(
        hub: HubRegistry,
        device_id: String,
        conn_id: u64,
        tx: mpsc::Sender<Packet>,
        methods_subscribed: Arc<AtomicBool>,
    ) -> Self {
        let device_key = hub.store_key(&device_id);
        Self {
            hub,
            device_id,
            device_key,
            conn_id,
            tx,
            twin_res: None,
            desired: None,
            methods: None,
            methods_subscribed,
            c2d: None,
            c2d_inflight: HashMap::new(),
            c2d_sent: HashSet::new(),
            unacked: Vec::new(),
            last_pkid: 0,
        }
    }

    /// The state to keep; `desired_resync` is only ever set by the endpoint table, for a
    /// device that missed patches while away.
    fn snapshot(&self) -> SessionState {
        SessionState {
            twin_responses: qos_code(self.twin_res),
            desired: qos_code(self.desired),
            methods: qos_code(self.methods),
            c2d: qos_code(self.c2d),
            unacked: self.unacked.clone(),
            desired_resync: false,
        }
    }

    /// Writes the session state through to the endpoint's table.
    fn persist(&self) {
        self.hub
            .endpoint()
            .save_session(&self.device_key, self.conn_id, &self.snapshot());
    }

    /// Resumes a saved session: its subscriptions, then what it still owes the device
    /// (unacknowledged publishes again with DUP, publishes queued while it was away, the
    /// whole desired collection if some were dropped, waiting cloud-to-device messages).
    pub(crate) async fn resume(&mut self, state: SessionState) -> Flow {
        self.twin_res = qos_of(state.twin_responses);
        self.desired = qos_of(state.desired);
        self.methods = qos_of(state.methods);
        self.c2d = qos_of(state.c2d);
        self.methods_subscribed
            .store(self.methods.is_some(), Ordering::SeqCst);
        self.last_pkid = state
            .unacked
            .iter()
            .filter_map(|p| p.pkid)
            .max()
            .unwrap_or(0);
        self.unacked = Vec::with_capacity(state.unacked.len());
        for pending in state.unacked {
            let (pkid, dup) = match pending.pkid {
                Some(p) => (p, true),
                None => (self.next_pkid(), false),
            };
            let mut p = Publish::from_bytes(
                pending.topic.clone(),
                QoS::AtLeastOnce,
                Bytes::from(pending.payload.clone()),
            );
            p.pkid = pkid;
            p.dup = dup;
            self.unacked.push(PendingPublish {
                pkid: Some(pkid),
                ..pending
            });
            if let Flow::Close(r) = self.send(Packet::Publish(p)).await {
                return Flow::Close(r);
            }
        }
        self.persist();
        if state.desired_resync {
            if let Flow::Close(r) = self.resync_desired().await {
                return Flow::Close(r);
            }
        }
        self.deliver_c2d().await
    }

    pub(crate) fn device_key(&self) -> &str {
        &self.device_key
    }

    pub(crate) async fn handle(&mut self, packet: Packet) -> Flow {
        match packet {
            Packet::Publish(p) => self.on_publish(p).await,
            Packet::Subscribe(s) => self.on_subscribe(s).await,
            Packet::Unsubscribe(u) => self.on_unsubscribe(u).await,
            Packet::PingReq => self.send(Packet::PingResp).await,
            Packet::PubAck(ack) => self.on_puback(ack.pkid).await,
            Packet::Disconnect => Flow::closed("client sent DISCONNECT"),
            Packet::Connect(_) => Flow::closed("second CONNECT"),
            other => Flow::closed(format!("unexpected packet from a client: {other:?}")),
        }
    }

    async fn send(&self, packet: Packet) -> Flow {
        match self.tx.send(packet).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::closed("writer gone"),
        }
    }

    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.checked_add(1).unwrap_or(1);
            let pkid = self.last_pkid;
            if !self.c2d_inflight.contains_key(&pkid)
                && !self.unacked.iter().any(|p| p.pkid == Some(pkid))
            {
                return pkid;
            }
        }
    }

    /// Publishes to the device at `qos`; returns the packet id (0 for QoS 0).
    async fn publish(&mut self, topic: String, payload: Bytes, qos: QoS) -> Result<u16, Flow> {
        let mut p = Publish::from_bytes(topic, qos, payload);
        if qos != QoS::AtMostOnce {
            p.pkid = self.next_pkid();
        }
        let pkid = p.pkid;
        self.send_publish(p).await.map(|()| pkid)
    }

    /// Publishes at `qos` and, at QoS 1, keeps the publish in the session state until the
    /// device acknowledges it (twin responses and desired patches).
    async fn publish_kept(&mut self, topic: String, payload: Bytes, qos: QoS) -> Result<u16, Flow> {
        if qos == QoS::AtMostOnce {
            return self.publish(topic, payload, qos).await;
        }
        let pkid = self.next_pkid();
        if self.unacked.len() >= self.hub.limits().session_queue_depth.max(1) {
            // A device that never acknowledges must not grow the session without bound.
            self.unacked.remove(0);
        }
        self.unacked.push(PendingPublish {
            topic: topic.clone(),
            payload: payload.to_vec(),
            pkid: Some(pkid),
        });
        self.persist();
        let mut p = Publish::from_bytes(topic, qos, payload);
        p.pkid = pkid;
        self.send_publish(p).await.map(|()| pkid)
    }

    async fn send_publish(&mut self, p: Publish) -> Result<(), Flow> {
        match self.send(Packet::Publish(p)).await {
            Flow::Continue => Ok(()),
            close => Err(close),
        }
    }

    async fn on_publish(&mut self, p: Publish) -> Flow {
        if p.qos == QoS::ExactlyOnce {
            return Flow::closed("QoS 2 publish (IoT Hub supports QoS 0 and 1)");
        }
        let parsed = match topic::parse_publish_topic(&p.topic) {
            Ok(t) => t,
            Err(why) => return Flow::closed(format!("{why}: {:?}", p.topic)),
        };
        match parsed {
            DeviceTopic::Telemetry { device_id, bag } => {
                if !device_id.eq_ignore_ascii_case(&self.device_id) {
                    return Flow::closed(format!(
                        "publish to another device's topic {:?}",
                        p.topic
                    ));
                }
                let (mut app, system) = topic::telemetry_properties(bag);
                if p.retain {
                    app.insert("mqtt-retain".into(), Value::String("true".into()));
                }
                let hub = self.hub.clone();
                if let Err(e) = hub
                    .store_telemetry(&self.device_id, &p.payload, app, system)
                    .await
                {
                    // Not acknowledged: the device sends it again after reconnecting.
                    return Flow::closed(format!("storing telemetry failed: {e}"));
                }
                self.puback(&p).await
            }
            DeviceTopic::TwinGet { rid } => {
                if let Flow::Close(r) = self.puback(&p).await {
                    return Flow::Close(r);
                }
                let reply = self.hub.device_twin_document(&self.device_id).await;
                match reply {
                    Ok(doc) => {
                        let body = serde_json::to_vec(&doc).unwrap_or_default();
                        self.twin_response(format!("$iothub/twin/res/200/?$rid={rid}"), body)
                            .await
                    }
                    Err(e) => self.twin_error(&rid, &e).await,
                }
            }
            DeviceTopic::TwinPatchReported { rid } => {
                if let Flow::Close(r) = self.puback(&p).await {
                    return Flow::Close(r);
                }
                let patch = match serde_json::from_slice::<Value>(&p.payload) {
                    Ok(Value::Object(m)) => m,
                    _ => {
                        let e = HubError::new(
                            crate::HubErrorCode::IotHubFormatError,
                            "the reported-properties patch must be a JSON object",
                        );
                        return self.twin_error(&rid, &e).await;
                    }
                };
                match self.hub.update_reported(&self.device_id, patch).await {
                    Ok(version) => {
                        self.twin_response(
                            format!("$iothub/twin/res/204/?$rid={rid}&$version={version}"),
                            Vec::new(),
                        )
                        .await
                    }
                    Err(e) => self.twin_error(&rid, &e).await,
                }
            }
            DeviceTopic::MethodResponse { status, rid } => {
                if let Flow::Close(r) = self.puback(&p).await {
                    return Flow::Close(r);
                }
                let payload = if p.payload.iter().all(u8::is_ascii_whitespace) {
                    Value::Null
                } else {
                    serde_json::from_slice(&p.payload).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(&p.payload).into_owned())
                    })
                };
                let answered = self.hub.endpoint().answer_method(
                    &self.device_key,
                    &rid,
                    MethodAnswer { status, payload },
                );
                if !answered {
                    tracing::debug!(
                        device = %self.device_id,
                        rid,
                        "method response for no waiting invocation (late or unknown $rid)"
                    );
                }
                Flow::Continue
            }
        }
    }

    async fn puback(&self, p: &Publish) -> Flow {
        if p.qos == QoS::AtLeastOnce {
            self.send(Packet::PubAck(PubAck::new(p.pkid))).await
        } else {
            Flow::Continue
        }
    }

    /// Twin responses only go to a device subscribed to `$iothub/twin/res/#`.
    async fn twin_response(&mut self, topic: String, body: Vec<u8>) -> Flow {
        let Some(qos) = self.twin_res else {
            tracing::debug!(device = %self.device_id, topic, "twin response dropped: not subscribed");
            return Flow::Continue;
        };
        match self.publish_kept(topic, Bytes::from(body), qos).await {
            Ok(_) => Flow::Continue,
            Err(f) => f,
        }
    }

    async fn twin_error(&mut self, rid: &str, e: &HubError) -> Flow {
        let body = serde_json::json!({ "Message": e.wire_message() });
        self.twin_response(
            format!("$iothub/twin/res/{}/?$rid={rid}", e.code.status()),
            serde_json::to_vec(&body).unwrap_or_default(),
        )
        .await
    }

    async fn on_subscribe(&mut self, s: Subscribe) -> Flow {
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut c2d_now = false;
        for f in &s.filters {
            let qos = grant(f.qos);
            match topic::parse_filter(&f.path, &self.device_id) {
                Some(Filter::TwinResponses) => self.twin_res = Some(qos),
                Some(Filter::DesiredPatches) => self.desired = Some(qos),
                Some(Filter::Methods) => {
                    self.methods = Some(qos);
                    self.methods_subscribed.store(true, Ordering::SeqCst);
                }
                Some(Filter::CloudToDevice) => {
                    self.c2d = Some(qos);
                    c2d_now = true;
                }
                None => {
                    tracing::debug!(device = %self.device_id, filter = %f.path, "subscription refused");
                    codes.push(SubscribeReasonCode::Failure);
                    continue;
                }
            }
            codes.push(SubscribeReasonCode::Success(qos));
        }
        self.persist();
        if let Flow::Close(r) = self.send(Packet::SubAck(SubAck::new(s.pkid, codes))).await {
            return Flow::Close(r);
        }
        if c2d_now {
            return self.deliver_c2d().await;
        }
        Flow::Continue
    }

    async fn on_unsubscribe(&mut self, u: Unsubscribe) -> Flow {
        for t in &u.topics {
            match topic::parse_filter(t, &self.device_id) {
                Some(Filter::TwinResponses) => self.twin_res = None,
                Some(Filter::DesiredPatches) => self.desired = None,
                Some(Filter::Methods) => {
                    self.methods = None;
                    self.methods_subscribed.store(false, Ordering::SeqCst);
                }
                Some(Filter::CloudToDevice) => self.c2d = None,
                None => {}
            }
        }
        self.persist();
        self.send(Packet::UnsubAck(UnsubAck::new(u.pkid))).await
    }

    async fn on_puback(&mut self, pkid: u16) -> Flow {
        let Some(key) = self.c2d_inflight.remove(&pkid) else {
            // A twin response or desired patch leaves the session state; a method call
            // was never kept.
            let before = self.unacked.len();
            self.unacked.retain(|p| p.pkid != Some(pkid));
            if self.unacked.len() != before {
                self.persist();
            }
            return Flow::Continue;
        };
        if let Err(e) = self.hub.complete_cloud_to_device(&key).await {
            if let Some(suppressed) = super::STORE_FAILED.admit() {
                tracing::warn!(error = %e, suppressed, "could not remove a delivered cloud-to-device message");
            }
        }
        self.c2d_sent.remove(&key);
        self.deliver_c2d().await
    }

    /// Sends queued cloud-to-device messages not yet in flight, in order.
    pub(crate) async fn deliver_c2d(&mut self) -> Flow {
        let Some(qos) = self.c2d else {
            return Flow::Continue;
        };
        let max = self.hub.limits().c2d_max_inflight.max(1);
        if self.c2d_inflight.len() >= max {
            return Flow::Continue;
        }
        let now_ms = self.hub.clock().now().0.timestamp_millis();
        let queue = match self
            .hub
            .queued_cloud_to_device(&self.device_id, now_ms)
            .await
        {
            Ok(q) => q,
            Err(e) => {
                if let Some(suppressed) = super::STORE_FAILED.admit() {
                    tracing::warn!(error = %e, suppressed, "reading the cloud-to-device queue failed");
                }
                return Flow::Continue;
            }
        };
        for q in queue {
            let (key, message) = (q.key, q.message);
            // Held by an HTTPS receive of the same device until settled or expired.
            if self.c2d_sent.contains(&key) || message.is_locked(now_ms) {
                continue;
            }
            if self.c2d_inflight.len() >= max {
                break;
            }
            let topic = topic::c2d_topic(&self.device_id, &message);
            let body = Bytes::from(message.body_bytes());
            let pkid = match self.publish(topic, body, qos).await {
                Ok(p) => p,
                Err(f) => return f,
            };
            if qos == QoS::AtMostOnce {
                // No acknowledgement will come: written is delivered.
                if let Err(e) = self.hub.complete_cloud_to_device(&key).await {
                    if let Some(suppressed) = super::STORE_FAILED.admit() {
                        tracing::warn!(error = %e, suppressed, "could not remove a delivered cloud-to-device message");
                    }
                }
            } else {
                self.c2d_inflight.insert(pkid, key.clone());
                self.c2d_sent.insert(key);
            }
        }
        Flow::Continue
    }

    /// Forwards a method call, or refuses it (the invoker hears `DeviceNotOnline`).
    pub(crate) async fn send_method(&mut self, call: MethodCall) -> Flow {
        let Some(qos) = self.methods else {
            self.hub.endpoint().forget_method(&call.rid);
            return Flow::Continue;
        };
        let topic = format!(
            "$iothub/methods/POST/{}/?$rid={}",
            call.method_name, call.rid
        );
        match self.publish(topic, Bytes::from(call.payload), qos).await {
            Ok(_) => Flow::Continue,
            Err(f) => {
                self.hub.endpoint().forget_method(&call.rid);
                f
            }
        }
    }

    /// Forwards a desired-properties change of this device.
    pub(crate) async fn on_desired(&mut self, change: &DesiredChange) -> Flow {
        if !change.device_id.eq_ignore_ascii_case(&self.device_id) {
            return Flow::Continue;
        }
        self.push_desired(change.version, &change.patch).await
    }

    async fn push_desired(&mut self, version: u64, patch: &Map<String, Value>) -> Flow {
        let Some(qos) = self.desired else {
            return Flow::Continue;
        };
        let body = serde_json::to_vec(patch).unwrap_or_default();
        let topic = format!("$iothub/twin/PATCH/properties/desired/?$version={version}");
        match self.publish_kept(topic, Bytes::from(body), qos).await {
            Ok(_) => Flow::Continue,
            Err(f) => f,
        }
    }

    /// After missing desired changes (the channel lagged): the whole desired collection.
    pub(crate) async fn resync_desired(&mut self) -> Flow {
        if self.desired.is_none() {
            return Flow::Continue;
        }
        let doc = match self.hub.device_twin_document(&self.device_id).await {
            Ok(d) => d,
            Err(e) => return Flow::closed(format!("reading the twin failed: {e}")),
        };
        let Some(desired) = doc.get("desired").and_then(Value::as_object).cloned() else {
            return Flow::Continue;
        };
        let version = desired.get("$version").and_then(Value::as_u64).unwrap_or(0);
        self.push_desired(version, &desired).await
    }
}
