//! DPS registration over AMQP (device-protocol.md §5.3–§5.6): one device per connection.
//!
//! 1. **Links.** The device attaches a receiver (our sender, responses) and a sender (our
//!    receiver, requests), both on `[amqps://host/]{idScope}/registrations/{registrationId}`.
//!    Every link must name the same device, and that device must be the SASL PLAIN identity
//!    when there is one; anything else closes the connection with `amqp:unauthorized-access`.
//!    The credential is the PLAIN password (a SAS token), else the TLS client chain, else
//!    none: the registrar checks it on every request, as over MQTT and HTTPS.
//! 2. **Requests.** Application property `iotdps-operation-type` is `iotdps-register` (body:
//!    the register JSON in a Data section, or empty) or `iotdps-get-operationstatus` (with
//!    `iotdps-operation-id`; the body is ignored). Requests run concurrently, at most
//!    [`AmqpLimits::max_inflight`] per connection (beyond: throttled).
//! 3. **Answers.** A 2xx reply accepts the request delivery, then sends one message on the
//!    device's receiver link: a Data section with the reply JSON, the request's
//!    `correlation-id`, and `retry-after` / `Retry-After` application properties when the
//!    device is to poll. An error reply **rejects** the delivery with an AMQP error whose
//!    description is the DPS error JSON (`errorCode`, `trackingId`, `message`,
//!    `timestampUtc`), condition by status (429 `com.microsoft:device-container-throttled`,
//!    5xx `amqp:internal-error`, which the SDKs retry, with `retry-after` in the info; 401/403
//!    `amqp:unauthorized-access`; 404 `amqp:not-found`; else `com.microsoft:argument-error`).
//! 4. **Authentication.** Until the registrar accepted one of its requests the connection is
//!    unauthenticated: a 401 or 403 closes it once the rejection is sent (after the device
//!    detached, or 1 s), and one not authenticated within [`AmqpLimits::auth_timeout`] is
//!    closed (once the requests it has in flight are answered). Authenticating releases the
//!    listener's [`PreAuthHold`]. A connection with no request for
//!    [`AmqpLimits::idle_timeout`] is closed.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::acceptor::{LinkAcceptor, LinkEndpoint};
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::types::definitions::{self, AmqpError, ErrorCondition, Fields};
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Data, Message, MessageId, Properties, Source, Target,
};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Value};
use muster_proto::ErrorCode;
use muster_registration::{
    DeviceCredential, DeviceRegistrar, DeviceReply, RegisterRequest, StatusRequest,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::address::RegistrationAddress;
use super::sasl::SaslIdentity;
use super::{link_address, AmqpLimits, Opened};
use crate::mqtt::session::{error_reply, parse_register_body};
use crate::pre_auth::PreAuthHold;

const OPERATION_TYPE: &str = "iotdps-operation-type";
const OPERATION_ID: &str = "iotdps-operation-id";
const REGISTER: &str = "iotdps-register";
const GET_OPERATION_STATUS: &str = "iotdps-get-operationstatus";

/// How long a connection whose attestation failed stays open after the rejection, for the
/// device to detach and close first (SDKs complain when the socket is already gone).
const ATTESTATION_FAILED_LINGER: Duration = Duration::from_secs(1);

/// How long the response link waits for the device to detach it before closing it itself.
const LINK_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Responses queued for the sender link.
const RESPONSE_QUEUE: usize = 32;

/// The device of a connection and how it authenticated.
struct Identity {
    device: RegistrationAddress,
    credential: DeviceCredential,
    /// The first link's `com.microsoft:api-version` property.
    api_version: Option<String>,
}

/// A request answered by the registrar, to be settled and answered on the connection.
struct Answered {
    delivery: DeliveryInfo,
    correlation_id: Option<MessageId>,
    reply: DeviceReply,
}

/// Serves one registration connection until it closes.
pub async fn serve(
    opened: Opened,
    registrar: Arc<dyn DeviceRegistrar>,
    limits: AmqpLimits,
    pre_auth: PreAuthHold,
) {
    let start = Instant::now();
    let Opened {
        mut connection,
        mut session,
        first_attach,
        peer,
    } = opened;
    let identity = match identify(&first_attach, &peer.sasl, peer.client_certs) {
        Ok(i) => i,
        Err(reason) => {
            tracing::debug!(%reason, "AMQP registration connection refused");
            let _ = connection.close_with_error(unauthorized(&reason)).await;
            return;
        }
    };
    tracing::debug!(
        id_scope = %identity.device.id_scope,
        registration_id = %identity.device.registration_id,
        credential = ?identity.credential,
        "AMQP device connected"
    );
    let link_acceptor = LinkAcceptor::builder()
        .max_message_size(u64::from(limits.max_message_size))
        .build();
    let mut links = Links::default();
    let mut pending_attach = Some(first_attach);
    let max_inflight = limits.max_inflight.max(1);
    let (answered_tx, mut answered_rx) = mpsc::channel::<Answered>(max_inflight);
    // Requests handed to the registrar whose answer has not come back yet.
    let mut in_flight = 0usize;
    let mut authenticated = false;
    let auth_deadline = start + limits.auth_timeout;

    let reason: String = 'session: loop {
        if let Some(attach) = pending_attach.take() {
            if let Err(reason) = links
                .attach(attach, &identity.device, &link_acceptor, &mut session)
                .await
            {
                let _ = connection.close_with_error(unauthorized(&reason)).await;
                return;
            }
        }
        let mut deadline = Instant::now() + limits.idle_timeout;
        // Requests still being answered may yet authenticate the device (a slow webhook,
        // say): the auth deadline waits for them.
        if !authenticated && in_flight == 0 {
            deadline = deadline.min(auth_deadline);
        }
        tokio::select! {
            attach = session.next_incoming_attach() => match attach {
                Some(a) => pending_attach = Some(a),
                None => break "the session ended".into(),
            },
            delivery = next_delivery(&mut links.receiver) => match delivery {
                Ok(delivery) => {
                    let (info, message) = delivery.into_parts();
                    if in_flight < max_inflight {
                        in_flight += 1;
                        let registrar = registrar.clone();
                        let tx = answered_tx.clone();
                        let request = Request::of(&message, &identity);
                        let correlation_id = message.properties.and_then(|p| p.correlation_id);
                        tokio::spawn(async move {
                            let reply = request.run(&*registrar).await;
                            let _ = tx.send(Answered { delivery: info, correlation_id, reply }).await;
                        });
                    } else {
                        let reply = error_reply(
                            ErrorCode::Throttled,
                            "too many requests in flight on this connection",
                        );
                        links.reject(info, &reply).await;
                    }
                }
                Err(reason) => break reason,
            },
            Some(done) = answered_rx.recv() => {
                in_flight = in_flight.saturating_sub(1);
                let status = done.reply.status;
                if (200..300).contains(&status) {
                    if !authenticated {
                        authenticated = true;
                        pre_auth.release();
                    }
                    links.answer(done).await;
                } else {
                    links.reject(done.delivery, &done.reply).await;
                    if matches!(status, 401 | 403) && !authenticated {
                        // The device detaches and closes once it read the rejection.
                        let linger = Instant::now() + ATTESTATION_FAILED_LINGER;
                        while tokio::time::timeout_at(linger, next_delivery(&mut links.receiver))
                            .await
                            .is_ok_and(|d| d.is_ok())
                        {}
                        break 'session "attestation failed on an unauthenticated connection".into();
                    }
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                if !authenticated && Instant::now() >= auth_deadline {
                    break format!("not authenticated within {:?}", limits.auth_timeout);
                }
                break "idle".into();
            }
        }
    };
    tracing::debug!("AMQP registration connection closing: {reason}");
    links.close().await;
    let _ = session.end().await;
    let _ = connection.close().await;
}

/// The device named by the first link, checked against the SASL identity.
fn identify(
    first_attach: &Attach,
    sasl: &SaslIdentity,
    client_certs: Vec<Vec<u8>>,
) -> Result<Identity, String> {
    let address = link_address(first_attach).unwrap_or_default();
    let device = RegistrationAddress::parse(address)
        .ok_or_else(|| format!("{address:?} is not a registration address"))?;
    let credential = match sasl {
        SaslIdentity::Plain { authcid, password } => {
            let signed_in = RegistrationAddress::parse(authcid)
                .ok_or_else(|| format!("SASL user {authcid:?} is not a registration"))?;
            if !signed_in.same_device(&device) {
                return Err(format!(
                    "the link address {address:?} is not the SASL user {authcid:?}"
                ));
            }
            DeviceCredential::Sas(password.clone())
        }
        _ if !client_certs.is_empty() => DeviceCredential::X509 {
            chain: client_certs,
        },
        _ => DeviceCredential::None,
    };
    Ok(Identity {
        device,
        credential,
        api_version: link_api_version(first_attach),
    })
}

/// The `com.microsoft:api-version` property every SDK puts on its links.
fn link_api_version(attach: &Attach) -> Option<String> {
    attach
        .properties
        .as_ref()?
        .iter()
        .find_map(|(k, v)| match v {
            Value::String(s) if k.as_str() == "com.microsoft:api-version" => Some(s.clone()),
            _ => None,
        })
}

fn unauthorized(reason: &str) -> definitions::Error {
    definitions::Error::new(AmqpError::UnauthorizedAccess, reason.to_string(), None)
}

/// fe2o3's link acceptor with its default handling of dynamic termini (none here).
type DefaultLinkAcceptor = LinkAcceptor<fn(Source) -> Option<Source>, fn(Target) -> Option<Target>>;

/// The device's two links: requests come in on `receiver`, responses go out through the
/// task that owns the sender.
#[derive(Default)]
struct Links {
    receiver: Option<Receiver>,
    responses: Option<mpsc::Sender<Message<Data>>>,
    response_task: Option<tokio::task::JoinHandle<()>>,
}

impl Links {
    async fn attach(
        &mut self,
        attach: Attach,
        device: &RegistrationAddress,
        acceptor: &DefaultLinkAcceptor,
        session: &mut fe2o3_amqp::acceptor::ListenerSessionHandle,
    ) -> Result<(), String> {
        let address = link_address(&attach).unwrap_or_default().to_string();
        match RegistrationAddress::parse(&address) {
            Some(a) if a.same_device(device) => {}
            _ => {
                return Err(format!(
                    "link {:?} on {address:?}: not this device's registration address",
                    attach.name
                ))
            }
        }
        let link = acceptor
            .accept_incoming_attach(attach, session)
            .await
            .map_err(|e| format!("link attach failed: {e}"))?;
        match link {
            LinkEndpoint::Receiver(r) => {
                if self.receiver.replace(r).is_some() {
                    return Err("a second request link".into());
                }
            }
            LinkEndpoint::Sender(s) => {
                if self.responses.is_some() {
                    return Err("a second response link".into());
                }
                let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
                self.response_task = Some(tokio::spawn(send_responses(s, rx)));
                self.responses = Some(tx);
            }
        }
        Ok(())
    }

    /// Closes both links, the response link once what was queued is sent (or the device
    /// detached it).
    async fn close(mut self) {
        if let Some(r) = self.receiver.take() {
            let _ = r.close().await;
        }
        self.responses = None;
        if let Some(task) = self.response_task.take() {
            let _ = task.await;
        }
    }

    /// Accepts the request, then sends its response.
    async fn answer(&mut self, done: Answered) {
        let Some(receiver) = &self.receiver else {
            return;
        };
        if let Err(e) = receiver.accept(done.delivery).await {
            tracing::debug!(error = %e, "AMQP request could not be accepted");
            return;
        }
        let Some(responses) = &self.responses else {
            tracing::debug!("AMQP response dropped: the device has no receiver link");
            return;
        };
        let _ = responses
            .send(response_message(done.correlation_id, &done.reply))
            .await;
    }

    async fn reject(&mut self, delivery: DeliveryInfo, reply: &DeviceReply) {
        if let Some(receiver) = &self.receiver {
            if let Err(e) = receiver.reject(delivery, rejection(reply)).await {
                tracing::debug!(error = %e, "AMQP request could not be rejected");
            }
        }
    }
}

/// The next request on the request link (never resolves before that link is attached).
async fn next_delivery(
    receiver: &mut Option<Receiver>,
) -> Result<fe2o3_amqp::link::delivery::Delivery<Body<Value>>, String> {
    match receiver {
        Some(r) => r
            .recv::<Body<Value>>()
            .await
            .map_err(|e| format!("request link: {e}")),
        None => std::future::pending().await,
    }
}

/// Sends responses in order; each waits for link credit (the device grants it). A detach from
/// the device is answered at once (fe2o3 answers it in `on_detach`), so the answer never
/// trails the device's end of the session. When the queue closes, the device, which is
/// usually leaving too, gets [`LINK_CLOSE_GRACE`] to detach first; then we close the link.
async fn send_responses(mut sender: Sender, mut rx: mpsc::Receiver<Message<Data>>) {
    loop {
        tokio::select! {
            message = rx.recv() => match message {
                Some(message) => {
                    if let Err(e) = sender.send(message).await {
                        tracing::debug!(error = %e, "AMQP response could not be sent");
                        return;
                    }
                }
                None => break,
            },
            _ = sender.on_detach() => return,
        }
    }
    if tokio::time::timeout(LINK_CLOSE_GRACE, sender.on_detach())
        .await
        .is_err()
    {
        let _ = sender.close().await;
    }
}

/// What a request message asks.
enum Request {
    Register(RegisterRequest),
    Status(StatusRequest),
    /// Answered without the registrar (a malformed request).
    Refused(DeviceReply),
}

impl Request {
    fn of(message: &Message<Body<Value>>, identity: &Identity) -> Self {
        let property = |name: &str| {
            message
                .application_properties
                .as_ref()
                .and_then(|p| p.0.get(name))
                .and_then(|v| match v {
                    SimpleValue::String(s) => Some(s.clone()),
                    _ => None,
                })
        };
        let device = &identity.device;
        match property(OPERATION_TYPE).as_deref() {
            Some(REGISTER) => match parse_register_body(&body_bytes(&message.body)) {
                Ok(body) => Request::Register(RegisterRequest {
                    id_scope: device.id_scope.clone(),
                    registration_id: device.registration_id.clone(),
                    credential: identity.credential.clone(),
                    body,
                    transport: muster_registration::Transport::Amqp,
                    api_version: identity.api_version.clone(),
                }),
                Err(reply) => Request::Refused(reply),
            },
            Some(GET_OPERATION_STATUS) => match property(OPERATION_ID) {
                Some(operation_id) => Request::Status(StatusRequest {
                    id_scope: device.id_scope.clone(),
                    registration_id: device.registration_id.clone(),
                    operation_id,
                    credential: identity.credential.clone(),
                    csr_sent: muster_registration::body_names_csr(&body_bytes(&message.body)),
                }),
                None => Request::Refused(error_reply(
                    ErrorCode::InvalidField,
                    format!("the operation status request has no {OPERATION_ID} property"),
                )),
            },
            other => Request::Refused(error_reply(
                ErrorCode::InvalidField,
                format!(
                    "{OPERATION_TYPE} must be {REGISTER} or {GET_OPERATION_STATUS}, not {:?}",
                    other.unwrap_or("")
                ),
            )),
        }
    }

    async fn run(self, registrar: &dyn DeviceRegistrar) -> DeviceReply {
        match self {
            Request::Register(r) => registrar.register(r).await,
            Request::Status(r) => registrar.operation_status(r).await,
            Request::Refused(reply) => reply,
        }
    }
}

/// The body's bytes: Data sections (register JSON), or a string or binary value (C# and
/// Node send the poll's body as a value; it is ignored).
fn body_bytes(body: &Body<Value>) -> Vec<u8> {
    match body {
        Body::Data(sections) => sections.iter().flat_map(|d| d.0.iter().copied()).collect(),
        Body::Value(AmqpValue(Value::String(s))) => s.as_bytes().to_vec(),
        Body::Value(AmqpValue(Value::Binary(b))) => b.to_vec(),
        _ => Vec::new(),
    }
}

/// `retry-after` and `Retry-After` (Node and C read the first, C# the second), as strings.
fn retry_after_entries(seconds: u32) -> [(&'static str, String); 2] {
    let s = seconds.to_string();
    [("retry-after", s.clone()), ("Retry-After", s)]
}

fn response_message(correlation_id: Option<MessageId>, reply: &DeviceReply) -> Message<Data> {
    let json = serde_json::to_vec(&reply.body).unwrap_or_else(|_| b"{}".to_vec());
    let mut properties = ApplicationProperties::default();
    if let Some(seconds) = reply.retry_after {
        for (k, v) in retry_after_entries(seconds) {
            properties.0.insert(k.to_string(), SimpleValue::String(v));
        }
    }
    Message::builder()
        .properties(Properties {
            correlation_id,
            ..Default::default()
        })
        .application_properties(properties)
        .data(Binary::from(json))
        .build()
}

/// The AMQP error that rejects a request (device-protocol.md §5.6).
fn rejection(reply: &DeviceReply) -> definitions::Error {
    let condition = match reply.status {
        429 => ErrorCondition::Custom(Symbol::from("com.microsoft:device-container-throttled")),
        500..=599 => ErrorCondition::AmqpError(AmqpError::InternalError),
        401 | 403 => ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess),
        404 => ErrorCondition::AmqpError(AmqpError::NotFound),
        _ => ErrorCondition::Custom(Symbol::from("com.microsoft:argument-error")),
    };
    let transient = reply.status == 429 || reply.status >= 500;
    let info = reply.retry_after.filter(|_| transient).map(|seconds| {
        let mut info = Fields::default();
        for (k, v) in retry_after_entries(seconds) {
            info.insert(Symbol::from(k), Value::String(v));
        }
        info
    });
    definitions::Error::new(
        condition,
        serde_json::to_string(&reply.body).unwrap_or_default(),
        info,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_carry_the_dps_error_and_the_retryable_conditions() {
        let reply = error_reply(ErrorCode::Throttled, "slow down");
        let e = rejection(&reply);
        assert_eq!(
            e.condition,
            ErrorCondition::Custom(Symbol::from("com.microsoft:device-container-throttled"))
        );
        let body: serde_json::Value =
            serde_json::from_str(e.description.as_deref().unwrap()).unwrap();
        assert_eq!(body["errorCode"], 429001);
        let info = e.info.unwrap();
        assert_eq!(
            info.get(&Symbol::from("Retry-After")),
            Some(&Value::String("1".into()))
        );

        let reply = error_reply(ErrorCode::InvalidField, "bad");
        let e = rejection(&reply);
        assert_eq!(
            e.condition,
            ErrorCondition::Custom(Symbol::from("com.microsoft:argument-error"))
        );
        assert!(e.info.is_none());
    }

    #[test]
    fn responses_copy_the_correlation_id_and_carry_both_retry_after_keys() {
        let reply = DeviceReply {
            status: 202,
            retry_after: Some(3),
            body: serde_json::json!({"operationId": "op", "status": "assigning"}),
        };
        let m = response_message(Some(MessageId::String("c-1".into())), &reply);
        assert_eq!(
            m.properties.unwrap().correlation_id,
            Some(MessageId::String("c-1".into()))
        );
        let props = m.application_properties.unwrap();
        for key in ["retry-after", "Retry-After"] {
            assert_eq!(props.0.get(key), Some(&SimpleValue::String("3".into())));
        }
        let body: serde_json::Value = serde_json::from_slice(&m.body.0).unwrap();
        assert_eq!(body["operationId"], "op");
    }
}
