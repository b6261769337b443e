//! One device's MQTT session after CONNECT: who it is, what it subscribed to, and how each
//! packet it sends is answered.
//!
//! Answers go to the connection's writer through one ordered channel. A request's PUBACK is
//! queued by the reader before the request is even started, and its response is queued by the
//! request's own task when the registrar answers, so the PUBACK always precedes the response
//! (C#'s strict state machine), while slow requests don't hold up the others.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use muster_proto::device::DeviceRegistration;
use muster_proto::runtime::{random_bytes, Clock, OsEntropy, SystemClock};
use muster_proto::ErrorCode;
use muster_registration::{
    DeviceCredential, DeviceRegistrar, DeviceReply, RegisterRequest, StatusRequest, Transport,
};
use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, Subscribe, SubscribeReasonCode,
    UnsubAck, Unsubscribe,
};
use rumqttc::mqttbytes::QoS;
use tokio::sync::{mpsc, Notify, Semaphore};

use super::topic::{self, RequestTopic, RESPONSE_FILTER};
use crate::pre_auth::PreAuthHold;

/// What the connection's writer sends, in queue order.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A packet written as is (CONNACK, PUBACK, SUBACK, UNSUBACK, PINGRESP).
    Packet(Packet),
    /// A response publish; the writer assigns its packet id when QoS is 1.
    Response {
        topic: String,
        payload: Bytes,
        qos: QoS,
    },
    /// Flush what came before, then close the connection.
    Close,
}

/// The device, as established by CONNECT.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub id_scope: String,
    pub registration_id: String,
    pub credential: DeviceCredential,
    /// The `api-version` of the CONNECT user name.
    pub api_version: Option<String>,
}

/// Checks a CONNECT (protocol level already known to be 4) and derives the device identity.
///
/// Refusals: no username or one not of the form `{scope}/registrations/{id}/...` → 4 (bad user
/// name or password); a client id other than the registration id (compared ignoring ASCII case,
/// as registration ids are case-insensitive) → 2 (identifier rejected). Credentials are not
/// checked here: the registrar verifies them on every request and answers 401, as DPS does.
pub(crate) fn accept_connect(
    connect: &Connect,
    client_certs: Vec<Vec<u8>>,
) -> Result<Identity, ConnectReturnCode> {
    let Some(login) = connect.login.as_ref() else {
        return Err(ConnectReturnCode::BadUserNamePassword);
    };
    let username = topic::parse_username(&login.username)
        .map_err(|_| ConnectReturnCode::BadUserNamePassword)?;
    let client_id = percent_encoding::percent_decode_str(&connect.client_id).decode_utf8_lossy();
    if !client_id.eq_ignore_ascii_case(&username.registration_id) {
        return Err(ConnectReturnCode::BadClientId);
    }
    let credential = if !login.password.is_empty() {
        DeviceCredential::Sas(login.password.clone())
    } else if !client_certs.is_empty() {
        DeviceCredential::X509 {
            chain: client_certs,
        }
    } else {
        DeviceCredential::None
    };
    tracing::debug!(
        id_scope = %username.id_scope,
        registration_id = %username.registration_id,
        api_version = username.api_version.as_deref().unwrap_or(""),
        client_version = username.client_version.as_deref().unwrap_or(""),
        credential = ?credential,
        "MQTT device connected"
    );
    Ok(Identity {
        id_scope: username.id_scope,
        registration_id: username.registration_id,
        credential,
        api_version: username.api_version,
    })
}

/// Whether the device has authenticated: the registrar accepted one of its requests.
pub(crate) struct AuthState {
    authenticated: AtomicBool,
    /// Attestation failed before the device ever authenticated: the connection is to close.
    failed: AtomicBool,
    failure: Notify,
    pre_auth: PreAuthHold,
}

impl AuthState {
    pub(crate) fn new(pre_auth: PreAuthHold) -> Self {
        Self {
            authenticated: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            failure: Notify::new(),
            pre_auth,
        }
    }

    pub(crate) fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::SeqCst)
    }

    pub(crate) fn failed_now(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Resolves once attestation failed on this never-authenticated connection (the reader is
    /// the only waiter).
    pub(crate) async fn failed(&self) {
        while !self.failed.load(Ordering::SeqCst) {
            self.failure.notified().await;
        }
    }

    /// Takes note of a reply's status; true when the connection must close after the reply:
    /// attestation failed (401, or 403) on a connection that never authenticated.
    fn observe(&self, status: u16) -> bool {
        if (200..300).contains(&status) {
            if !self.authenticated.swap(true, Ordering::SeqCst) {
                self.pre_auth.release();
            }
            return false;
        }
        matches!(status, 401 | 403) && !self.is_authenticated()
    }
}

/// What the reader does after a packet.
#[derive(Debug)]
pub(crate) enum Flow {
    Continue,
    /// Close the connection; the reason is logged at debug level.
    Close(String),
}

/// No subscription to [`RESPONSE_FILTER`].
const NOT_SUBSCRIBED: u8 = u8::MAX;

pub(crate) struct Session {
    identity: Arc<Identity>,
    registrar: Arc<dyn DeviceRegistrar>,
    tx: mpsc::Sender<Outgoing>,
    inflight: Arc<Semaphore>,
    max_inflight: u32,
    auth: Arc<AuthState>,
    /// Granted QoS of the response subscription, or [`NOT_SUBSCRIBED`]; shared with request
    /// tasks, which read it when their answer is ready.
    subscription: Arc<AtomicU8>,
}

impl Session {
    pub(crate) fn new(
        identity: Identity,
        registrar: Arc<dyn DeviceRegistrar>,
        tx: mpsc::Sender<Outgoing>,
        max_inflight: usize,
        auth: Arc<AuthState>,
    ) -> Self {
        let max_inflight = max_inflight.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Self {
            identity: Arc::new(identity),
            registrar,
            tx,
            inflight: Arc::new(Semaphore::new(max_inflight)),
            max_inflight: max_inflight as u32,
            auth,
            subscription: Arc::new(AtomicU8::new(NOT_SUBSCRIBED)),
        }
    }

    /// Waits until no request of this connection is being answered.
    pub(crate) async fn settled(&self) {
        let _all = self.inflight.acquire_many(self.max_inflight).await;
    }

    pub(crate) async fn handle(&mut self, packet: Packet) -> Flow {
        match packet {
            Packet::Publish(publish) => self.publish(publish).await,
            Packet::Subscribe(subscribe) => self.subscribe(subscribe).await,
            Packet::Unsubscribe(unsubscribe) => self.unsubscribe(unsubscribe).await,
            Packet::PingReq => self.send(Packet::PingResp).await,
            // Acknowledges one of our responses; nothing is redelivered, so nothing to do.
            Packet::PubAck(_) => Flow::Continue,
            Packet::Disconnect => Flow::Close("client sent DISCONNECT".into()),
            Packet::Connect(_) => Flow::Close("second CONNECT".into()),
            // We never send QoS 2, so PUBREC/PUBREL/PUBCOMP are protocol errors, as are the
            // packets only a server sends.
            other => Flow::Close(format!("unexpected packet from a client: {other:?}")),
        }
    }

    async fn send(&self, packet: Packet) -> Flow {
        match self.tx.send(Outgoing::Packet(packet)).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close("writer gone".into()),
        }
    }

    async fn subscribe(&mut self, subscribe: Subscribe) -> Flow {
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        for filter in &subscribe.filters {
            if filter.path == RESPONSE_FILTER {
                // Never more than QoS 1 (DPS grants 1 to QoS 2 requests), never more than asked.
                let granted = if filter.qos == QoS::AtMostOnce {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                };
                self.subscription.store(granted as u8, Ordering::SeqCst);
                codes.push(SubscribeReasonCode::Success(granted));
            } else {
                tracing::debug!(filter = %filter.path, "MQTT subscription refused");
                codes.push(SubscribeReasonCode::Failure);
            }
        }
        self.send(Packet::SubAck(SubAck::new(subscribe.pkid, codes)))
            .await
    }

    async fn unsubscribe(&mut self, unsubscribe: Unsubscribe) -> Flow {
        if unsubscribe.topics.iter().any(|t| t == RESPONSE_FILTER) {
            self.subscription.store(NOT_SUBSCRIBED, Ordering::SeqCst);
        }
        self.send(Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)))
            .await
    }

    async fn publish(&mut self, publish: Publish) -> Flow {
        if publish.qos == QoS::ExactlyOnce {
            return Flow::Close("QoS 2 publish (DPS supports QoS 0 and 1)".into());
        }
        let request = match topic::parse_request_topic(&publish.topic) {
            Ok(r) => r,
            Err(e) => return Flow::Close(format!("{e}: {:?}", publish.topic)),
        };
        // The PUBACK is queued before anything else about this request.
        if publish.qos == QoS::AtLeastOnce {
            if let Flow::Close(r) = self.send(Packet::PubAck(PubAck::new(publish.pkid))).await {
                return Flow::Close(r);
            }
        }
        let responder = Responder {
            rid: request.rid().to_owned(),
            tx: self.tx.clone(),
            subscription: self.subscription.clone(),
            auth: self.auth.clone(),
        };
        let Ok(permit) = self.inflight.clone().try_acquire_owned() else {
            let reply = error_reply(
                ErrorCode::Throttled,
                "too many requests in flight on this connection",
            );
            return responder.respond(reply).await;
        };
        let identity = &self.identity;
        match request {
            RequestTopic::Register { .. } => {
                let body = match parse_register_body(&publish.payload) {
                    Ok(b) => b,
                    Err(reply) => return responder.respond(reply).await,
                };
                let request = RegisterRequest {
                    id_scope: identity.id_scope.clone(),
                    registration_id: identity.registration_id.clone(),
                    credential: identity.credential.clone(),
                    body,
                    transport: Transport::Mqtt,
                    api_version: identity.api_version.clone(),
                };
                let registrar = self.registrar.clone();
                tokio::spawn(async move {
                    let reply = registrar.register(request).await;
                    responder.respond(reply).await;
                    drop(permit);
                });
            }
            RequestTopic::Status { operation_id, .. } => {
                // The payload is ignored — " " (Python, Node), the register JSON (C), empty
                // (C#) — except a `csr` in it, which a lookup must not carry.
                let Some(operation_id) = operation_id else {
                    let reply = error_reply(
                        ErrorCode::InvalidField,
                        "the operation status topic has no operationId",
                    );
                    return responder.respond(reply).await;
                };
                let request = StatusRequest {
                    id_scope: identity.id_scope.clone(),
                    registration_id: identity.registration_id.clone(),
                    operation_id,
                    credential: identity.credential.clone(),
                    csr_sent: muster_registration::body_names_csr(&publish.payload),
                };
                let registrar = self.registrar.clone();
                tokio::spawn(async move {
                    let reply = registrar.operation_status(request).await;
                    responder.respond(reply).await;
                    drop(permit);
                });
            }
        }
        Flow::Continue
    }
}

/// Sends the response to one request.
struct Responder {
    rid: String,
    tx: mpsc::Sender<Outgoing>,
    subscription: Arc<AtomicU8>,
    auth: Arc<AuthState>,
}

impl Responder {
    /// Queues the response publish, unless the device holds no subscription it would match
    /// (an MQTT server only delivers to subscribers); then the close, when attestation failed
    /// on a connection that never authenticated, tells the reader to close.
    async fn respond(self, reply: DeviceReply) -> Flow {
        if reply.status >= 400 {
            // The error body says which check failed; it never holds a secret.
            tracing::debug!(
                rid = %self.rid,
                status = reply.status,
                error_code = reply.body["errorCode"].as_u64().unwrap_or(0),
                check = reply.body["message"].as_str().unwrap_or_default(),
                "MQTT request refused"
            );
        }
        let failed = self.auth.observe(reply.status);
        let flow = self.publish(reply).await;
        if failed {
            // After the answer is queued: the reader then closes the connection.
            self.auth.failed.store(true, Ordering::SeqCst);
            self.auth.failure.notify_one();
        }
        flow
    }

    async fn publish(&self, reply: DeviceReply) -> Flow {
        let qos = match self.subscription.load(Ordering::SeqCst) {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => {
                tracing::debug!(rid = %self.rid, "MQTT response dropped: no subscription");
                return Flow::Continue;
            }
        };
        let payload = serde_json::to_vec(&reply.body).unwrap_or_else(|_| b"{}".to_vec());
        let out = Outgoing::Response {
            topic: topic::response_topic(reply.status, &self.rid, reply.retry_after),
            payload: Bytes::from(payload),
            qos,
        };
        match self.tx.send(out).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close("writer gone".into()),
        }
    }
}

/// The register payload: empty (C#) or blank → an empty registration; JSON `null` likewise;
/// anything else must be a JSON `DeviceRegistration`, or the answer is 400 / 400001.
pub(crate) fn parse_register_body(payload: &[u8]) -> Result<DeviceRegistration, DeviceReply> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(DeviceRegistration::default());
    }
    let value: serde_json::Value = serde_json::from_slice(payload).map_err(|e| {
        error_reply(
            ErrorCode::MalformedBody,
            format!("the register payload is not valid JSON: {e}"),
        )
    })?;
    if value.is_null() {
        return Ok(DeviceRegistration::default());
    }
    serde_json::from_value(value).map_err(|e| {
        error_reply(
            ErrorCode::MalformedBody,
            format!("the register payload is not a DeviceRegistration: {e}"),
        )
    })
}

/// A DPS error reply. The tracking id and timestamp are diagnostics only, so (as in the
/// service API) they come from the system clock and random source.
pub(crate) fn error_reply(code: ErrorCode, message: impl Into<String>) -> DeviceReply {
    let b: [u8; 16] = random_bytes(&OsEntropy);
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let tracking_id = format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    );
    DeviceReply::error(code, message, tracking_id, SystemClock.now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::Login;

    fn connect(client_id: &str, username: &str, password: &str) -> Connect {
        let mut c = Connect::new(client_id);
        if !username.is_empty() || !password.is_empty() {
            c.login = Some(Login::new(username, password));
        }
        c
    }

    #[test]
    fn credentials() {
        let u = "0ne1/registrations/dev-1/api-version=2019-03-31";
        let id = accept_connect(
            &connect("dev-1", u, "SharedAccessSignature sr=x"),
            vec![vec![1]],
        )
        .unwrap();
        assert_eq!(
            id.credential,
            DeviceCredential::Sas("SharedAccessSignature sr=x".into())
        );
        let id = accept_connect(&connect("dev-1", u, ""), vec![vec![1], vec![2]]).unwrap();
        assert_eq!(
            id.credential,
            DeviceCredential::X509 {
                chain: vec![vec![1], vec![2]]
            }
        );
        let id = accept_connect(&connect("DEV-1", u, ""), vec![]).unwrap();
        assert_eq!(id.credential, DeviceCredential::None);
        assert_eq!(
            (id.id_scope.as_str(), id.registration_id.as_str()),
            ("0ne1", "dev-1")
        );
    }

    #[test]
    fn refusals() {
        let u = "0ne1/registrations/dev-1/api-version=2019-03-31";
        assert_eq!(
            accept_connect(&connect("other", u, "p"), vec![]).unwrap_err(),
            ConnectReturnCode::BadClientId
        );
        assert_eq!(
            accept_connect(&connect("", u, "p"), vec![]).unwrap_err(),
            ConnectReturnCode::BadClientId
        );
        assert_eq!(
            accept_connect(&connect("dev-1", "", ""), vec![]).unwrap_err(),
            ConnectReturnCode::BadUserNamePassword
        );
        assert_eq!(
            accept_connect(&connect("dev-1", "dev-1", "p"), vec![]).unwrap_err(),
            ConnectReturnCode::BadUserNamePassword
        );
    }

    #[test]
    fn register_bodies() {
        assert_eq!(
            parse_register_body(b"").unwrap(),
            DeviceRegistration::default()
        );
        assert_eq!(
            parse_register_body(b" \n").unwrap(),
            DeviceRegistration::default()
        );
        assert_eq!(
            parse_register_body(b"null").unwrap(),
            DeviceRegistration::default()
        );
        let b = parse_register_body(br#"{"payload": null, "registrationId": "d"}"#).unwrap();
        assert_eq!(b.registration_id.as_deref(), Some("d"));
        let b = parse_register_body(br#"{"payload":{"modelId":"dtmi:x;1"}}"#).unwrap();
        assert_eq!(b.payload, Some(serde_json::json!({"modelId": "dtmi:x;1"})));
        for bad in [&b"{"[..], b"[1]", br#"{"registrationId": 5}"#, b"\xff"] {
            let reply = parse_register_body(bad).unwrap_err();
            assert_eq!(reply.status, 400);
            assert_eq!(reply.body["errorCode"], 400001);
            assert!(reply.body["trackingId"].is_string());
            assert!(reply.body["timestampUtc"].is_string());
        }
    }
}
