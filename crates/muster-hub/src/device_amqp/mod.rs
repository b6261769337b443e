//! The built-in hub's device endpoint over AMQP 1.0 (TLS on 5671, or `AMQPWSB10` on
//! `/$iothub/websocket`), as IoT Hub offers it to devices. The connection arrives opened up to
//! its first link ([`muster_device_api::amqp::open`], which also bounds the time to get
//! there); the server's AMQP dispatch hands it here when the SASL identity or that first link
//! is not a DPS registration.
//!
//! 1. **Authentication**, one device per connection, before any device link:
//!    - CBS (`cbs.rs`): a put-token on `$cbs` with the device's SAS token (audience
//!      `{host}/devices/{deviceId}`), checked exactly as the MQTT CONNECT checks its password
//!      (`device_mqtt::connect`): the device must exist, be enabled and the token must be
//!      valid for it. A renewed token (another put-token for the same device) moves the
//!      connection's deadline; when the last token expires the connection is closed.
//!    - X.509: a TLS client certificate (no SASL, or SASL `EXTERNAL`); the device is the one
//!      the first device link names, and the certificate must match its thumbprint.
//!    - SASL PLAIN with user `{deviceId}@sas.{hubName}` and the SAS token as password.
//!
//!    A refused put-token is answered (`status-code` 401, or 503 when the store failed)
//!    and, on a connection not yet authenticated, the connection is closed (after 1 s for the
//!    device to read the answer). A device link before authentication, or one naming another
//!    device, closes the connection with `amqp:unauthorized-access`. A connection not
//!    authenticated within [`AmqpLimits::auth_timeout`] is closed; authenticating releases
//!    the listener's [`PreAuthHold`].
//! 2. **Links** (`links.rs`): telemetry, cloud-to-device messages, twin and direct methods,
//!    at most one of each kind and [`MAX_LINKS`] in all. An unknown address (modules
//!    included) closes the connection with `amqp:not-found`.
//! 3. **Session state**: the connection registers in the same table as MQTT sessions (a new
//!    connection of the device, on either transport, replaces it; deleting or disabling the
//!    device closes it), records `connectionState`, and gets desired-property changes and
//!    method calls the same way. AMQP has no persistent session: nothing is kept after the
//!    connection closes, except queued cloud-to-device messages, which stay in the store.

mod cbs;
mod links;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::acceptor::{LinkAcceptor, LinkEndpoint, ListenerSessionHandle};
use fe2o3_amqp::link::Receiver;
use fe2o3_amqp::types::definitions::{self, AmqpError};
use fe2o3_amqp::types::messaging::{Body, Data, Message, Source, Target};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::Value;
use muster_device_api::amqp::{link_address, AmqpLimits, Opened, SaslIdentity};
use muster_device_api::pre_auth::PreAuthHold;
use muster_proto::SasToken;
use serde_json::Value as Json;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::auth::strip_port;
use crate::device_mqtt::connect::{authenticate_device, DeviceCredential};
use crate::endpoint::MethodCall;
use crate::model::ConnectionState;
use crate::registry::DesiredChange;
use crate::HubRegistry;

/// Links one connection may attach (CBS, telemetry, C2D, twin and methods take 8).
pub const MAX_LINKS: usize = 16;

/// How long a connection whose authentication failed stays open for the device to read why.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Messages queued for one sender link (twin responses and patches, CBS replies).
const OUT_QUEUE: usize = 32;

/// What a device link is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum LinkKind {
    Telemetry,
    CloudToDevice,
    Twin,
    Methods,
}

/// `[amqps://{host}]/devices/{deviceId}/{what}`: the device id (percent-decoded) and what
/// the link is for; `None` for anything else.
fn parse_device_link(address: &str) -> Option<(String, LinkKind)> {
    let path = match address.split_once("://") {
        Some((_, rest)) => &rest[rest.find('/')?..],
        None => address,
    };
    let path = path.trim_start_matches('/').trim_end_matches('/');
    let rest = path.strip_prefix("devices/")?;
    let (id, what) = rest.split_once('/')?;
    let kind = match what.to_ascii_lowercase().as_str() {
        "messages/events" => LinkKind::Telemetry,
        "messages/devicebound" => LinkKind::CloudToDevice,
        "twin" => LinkKind::Twin,
        "methods/devicebound" => LinkKind::Methods,
        _ => return None,
    };
    let id = percent_encoding::percent_decode_str(id)
        .decode_utf8()
        .ok()?;
    Some((id.into_owned(), kind))
}

/// An authenticated device and its place in the endpoint's session table.
struct Connected {
    device_id: String,
    device_key: String,
    conn_id: u64,
    c2d_wake: Arc<tokio::sync::Notify>,
    /// The endpoint's method calls for this device, until the methods link takes them.
    methods: Option<(mpsc::Receiver<MethodCall>, Arc<AtomicBool>)>,
    close: Arc<tokio::sync::Notify>,
    /// The SAS token's expiry (unix seconds); `None` for X.509.
    token_expiry: Option<i64>,
    desired_rx: broadcast::Receiver<DesiredChange>,
    /// Set while the device asked for desired-property notifications.
    desired_wanted: Arc<AtomicBool>,
    twin_out: mpsc::Sender<Message<Data>>,
    twin_out_rx: Option<mpsc::Receiver<Message<Data>>>,
}

/// fe2o3's link acceptor with its default handling of dynamic termini (none here).
type DefaultLinkAcceptor = LinkAcceptor<fn(Source) -> Option<Source>, fn(Target) -> Option<Target>>;

struct Conn {
    hub: HubRegistry,
    hub_host: String,
    client_certs: Vec<Vec<u8>>,
    acceptor: DefaultLinkAcceptor,
    connected: Option<Connected>,
    cbs_rx: Option<Receiver>,
    cbs_out: Option<mpsc::Sender<Message<Data>>>,
    cbs_task: Option<JoinHandle<()>>,
    kinds: std::collections::HashSet<(LinkKind, bool)>,
    links: usize,
    tasks: Vec<JoinHandle<()>>,
    pre_auth: PreAuthHold,
}

/// Why the connection is closed: logged, and sent to the device as the close error when set.
struct Closing {
    reason: String,
    error: Option<definitions::Error>,
}

fn closing(condition: AmqpError, reason: impl Into<String>) -> Closing {
    let reason = reason.into();
    Closing {
        error: Some(definitions::Error::new(condition, reason.clone(), None)),
        reason,
    }
}

impl Conn {
    /// Records the device as authenticated (the first time), or checks that a renewed token
    /// is for the same device.
    async fn authenticated(
        &mut self,
        device_id: String,
        token_expiry: Option<i64>,
    ) -> Result<(), String> {
        if let Some(c) = &mut self.connected {
            if !c.device_id.eq_ignore_ascii_case(&device_id) {
                return Err(format!(
                    "this connection is device {:?}, not {device_id:?}",
                    c.device_id
                ));
            }
            if token_expiry.is_some() {
                c.token_expiry = token_expiry;
            }
            return Ok(());
        }
        let hub = &self.hub;
        let device_key = hub.store_key(&device_id);
        // Subscribe before anything can change, so no desired change falls in between.
        let desired_rx = hub.subscribe_desired();
        let handles = hub.register_session(&device_key);
        hub.endpoint().open_session(
            &device_key,
            handles.conn_id,
            true,
            hub.clock().now().0.timestamp_millis(),
        );
        if let Err(e) = hub
            .set_connection_state(&device_id, ConnectionState::Connected)
            .await
        {
            if let Some(suppressed) = crate::device_mqtt::STORE_FAILED.admit() {
                tracing::warn!(error = %e, suppressed, "could not record the device as connected");
            }
        }
        tracing::info!(device = %device_id, transport = "amqp", "device connected to the hub");
        self.pre_auth.release();
        let (twin_out, twin_out_rx) = mpsc::channel(OUT_QUEUE);
        self.connected = Some(Connected {
            device_id,
            device_key,
            conn_id: handles.conn_id,
            close: handles.close,
            c2d_wake: handles.c2d_wake,
            methods: Some((handles.methods, handles.methods_subscribed)),
            token_expiry,
            desired_rx,
            desired_wanted: Arc::new(AtomicBool::new(false)),
            twin_out,
            twin_out_rx: Some(twin_out_rx),
        });
        Ok(())
    }

    /// Answers a put-token; `Err` closes the connection.
    async fn put_token(&mut self, message: &Message<Body<Value>>) -> Result<(), Closing> {
        let (reply, refused) = match cbs::parse_put_token(message, &self.hub_host) {
            Ok(put) => {
                let id = put.message_id.clone();
                match authenticate_device(
                    &self.hub,
                    &put.device_id,
                    DeviceCredential::Sas(put.token),
                )
                .await
                {
                    Ok((device_id, expiry)) => match self.authenticated(device_id, expiry).await {
                        Ok(()) => (cbs::reply(id, 200, "OK"), None),
                        Err(why) => (cbs::reply(id, 401, &why), Some(why)),
                    },
                    Err((code, why)) => {
                        (cbs::reply(id, cbs::refusal_status(code), &why), Some(why))
                    }
                }
            }
            Err((id, (status, why))) => (cbs::reply(id, status, &why), Some(why)),
        };
        if let Some(out) = &self.cbs_out {
            let _ = out.send(reply).await;
        }
        match refused {
            Some(why) if self.connected.is_none() => {
                // Let the device read the answer, then close.
                self.cbs_out = None;
                if let Some(task) = self.cbs_task.take() {
                    let _ = tokio::time::timeout(REFUSAL_LINGER, task).await;
                }
                Err(closing(
                    AmqpError::UnauthorizedAccess,
                    format!("put-token refused: {why}"),
                ))
            }
            Some(why) => {
                tracing::debug!("AMQP put-token refused on an authenticated connection: {why}");
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn attach(
        &mut self,
        attach: Attach,
        session: &mut ListenerSessionHandle,
    ) -> Result<(), Closing> {
        let address = link_address(&attach).unwrap_or_default().to_string();
        if self.links >= MAX_LINKS {
            return Err(closing(
                AmqpError::ResourceLimitExceeded,
                format!("more than {MAX_LINKS} links on one connection"),
            ));
        }
        self.links += 1;
        if address == cbs::CBS_ADDRESS {
            let link = self.accept(attach, session).await?;
            match link {
                LinkEndpoint::Receiver(r) if self.cbs_rx.is_none() => self.cbs_rx = Some(r),
                LinkEndpoint::Sender(s) if self.cbs_out.is_none() => {
                    let (tx, rx) = mpsc::channel(OUT_QUEUE);
                    self.cbs_task = Some(tokio::spawn(links::send_queued(s, rx)));
                    self.cbs_out = Some(tx);
                }
                _ => {
                    return Err(closing(
                        AmqpError::NotAllowed,
                        "a second $cbs link in the same direction",
                    ))
                }
            }
            return Ok(());
        }
        let Some((device_id, kind)) = parse_device_link(&address) else {
            return Err(closing(
                AmqpError::NotFound,
                format!("no such node {address:?} (devices attach /devices/{{id}}/messages/events, /messages/devicebound, /twin or /methods/devicebound)"),
            ));
        };
        if self.connected.is_none() {
            let Some(leaf) = self.client_certs.first() else {
                return Err(closing(
                    AmqpError::UnauthorizedAccess,
                    "authenticate first: a CBS put-token or a TLS client certificate",
                ));
            };
            match authenticate_device(&self.hub, &device_id, DeviceCredential::Certificate(leaf))
                .await
            {
                Ok((id, _)) => self
                    .authenticated(id, None)
                    .await
                    .map_err(|why| closing(AmqpError::UnauthorizedAccess, why))?,
                Err((_, why)) => return Err(closing(AmqpError::UnauthorizedAccess, why)),
            }
        }
        let Some(connected) = &self.connected else {
            return Err(closing(AmqpError::UnauthorizedAccess, "not authenticated"));
        };
        if !connected.device_id.eq_ignore_ascii_case(&device_id) {
            return Err(closing(
                AmqpError::UnauthorizedAccess,
                format!(
                    "link {address:?} names another device than this connection's {:?}",
                    connected.device_id
                ),
            ));
        }
        let link = self.accept(attach, session).await?;
        let ours_sends = matches!(link, LinkEndpoint::Sender(_));
        if !self.kinds.insert((kind, ours_sends)) {
            return Err(closing(
                AmqpError::NotAllowed,
                format!("a second {kind:?} link in the same direction"),
            ));
        }
        let Some(c) = &mut self.connected else {
            return Err(closing(AmqpError::UnauthorizedAccess, "not authenticated"));
        };
        let hub = self.hub.clone();
        let device_id = c.device_id.clone();
        let task = match (kind, link) {
            (LinkKind::Telemetry, LinkEndpoint::Receiver(r)) => {
                tokio::spawn(links::telemetry(r, hub, device_id))
            }
            (LinkKind::CloudToDevice, LinkEndpoint::Sender(s)) => tokio::spawn(
                links::cloud_to_device(s, hub, device_id, c.c2d_wake.clone()),
            ),
            (LinkKind::Twin, LinkEndpoint::Receiver(r)) => tokio::spawn(links::twin_requests(
                r,
                hub,
                device_id,
                c.twin_out.clone(),
                c.desired_wanted.clone(),
            )),
            (LinkKind::Twin, LinkEndpoint::Sender(s)) => match c.twin_out_rx.take() {
                Some(rx) => tokio::spawn(links::send_queued(s, rx)),
                None => return Err(closing(AmqpError::NotAllowed, "a second twin link")),
            },
            (LinkKind::Methods, LinkEndpoint::Receiver(r)) => {
                tokio::spawn(links::method_responses(r, hub, c.device_key.clone()))
            }
            (LinkKind::Methods, LinkEndpoint::Sender(s)) => {
                let Some((calls, subscribed)) = c.methods.take() else {
                    return Err(closing(AmqpError::NotAllowed, "a second method link"));
                };
                tokio::spawn(links::method_calls(s, calls, hub, subscribed))
            }
            (kind, _) => {
                return Err(closing(
                    AmqpError::NotAllowed,
                    format!("{kind:?} links go the other way ({address:?})"),
                ))
            }
        };
        self.tasks.push(task);
        Ok(())
    }

    async fn accept(
        &self,
        attach: Attach,
        session: &mut ListenerSessionHandle,
    ) -> Result<LinkEndpoint, Closing> {
        self.acceptor
            .accept_incoming_attach(attach, session)
            .await
            .map_err(|e| Closing {
                reason: format!("link attach failed: {e}"),
                error: None,
            })
    }

    /// Pushes a desired-properties change of this device, if it asked for them.
    async fn on_desired(&mut self, change: Result<DesiredChange, broadcast::error::RecvError>) {
        let Some(c) = &self.connected else { return };
        if !c.desired_wanted.load(Ordering::SeqCst) {
            return;
        }
        let message = match change {
            Ok(change) => {
                if !change.device_id.eq_ignore_ascii_case(&c.device_id) {
                    return;
                }
                links::desired_patch(change.version, &change.patch)
            }
            Err(_) => {
                // Lagged: the whole desired collection.
                let Ok(doc) = self.hub.device_twin_document(&c.device_id).await else {
                    return;
                };
                let Some(desired) = doc.get("desired").and_then(Json::as_object) else {
                    return;
                };
                let version = desired.get("$version").and_then(Json::as_u64).unwrap_or(0);
                links::desired_patch(version, desired)
            }
        };
        let _ = c.twin_out.send(message).await;
    }
}

/// The device id of a SASL PLAIN user `{deviceId}@sas.{hubName}`.
fn plain_device(authcid: &str) -> Option<&str> {
    let (device, rest) = authcid.split_once('@')?;
    rest.strip_prefix("sas.")?;
    (!device.is_empty()).then_some(device)
}

async fn next_delivery(
    receiver: &mut Option<Receiver>,
) -> Result<fe2o3_amqp::link::delivery::Delivery<Body<Value>>, String> {
    match receiver {
        Some(r) => r.recv().await.map_err(|e| format!("$cbs link: {e}")),
        None => std::future::pending().await,
    }
}

async fn next_desired(
    connected: &mut Option<Connected>,
) -> Result<DesiredChange, broadcast::error::RecvError> {
    match connected {
        Some(c) => c.desired_rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Serves one hub device's AMQP connection until it closes.
pub async fn serve(opened: Opened, hub: HubRegistry, limits: AmqpLimits, pre_auth: PreAuthHold) {
    let start = Instant::now();
    let Opened {
        mut connection,
        mut session,
        first_attach,
        peer,
    } = opened;
    let mut conn = Conn {
        hub_host: strip_port(&hub.host_name().to_ascii_lowercase()).to_string(),
        hub: hub.clone(),
        client_certs: peer.client_certs,
        acceptor: LinkAcceptor::builder()
            .max_message_size(u64::from(limits.max_message_size))
            .build(),
        connected: None,
        cbs_rx: None,
        cbs_out: None,
        cbs_task: None,
        kinds: Default::default(),
        links: 0,
        tasks: Vec::new(),
        pre_auth,
    };
    let mut pending_attach = Some(first_attach);
    let first: Result<(), Closing> = match &peer.sasl {
        SaslIdentity::Plain { authcid, password } => {
            match (plain_device(authcid), SasToken::parse(password)) {
                (Some(device), Ok(token)) => {
                    match authenticate_device(&hub, device, DeviceCredential::Sas(token)).await {
                        Ok((id, expiry)) => conn
                            .authenticated(id, expiry)
                            .await
                            .map_err(|why| closing(AmqpError::UnauthorizedAccess, why)),
                        Err((_, why)) => Err(closing(AmqpError::UnauthorizedAccess, why)),
                    }
                }
                _ => Err(closing(
                    AmqpError::UnauthorizedAccess,
                    format!(
                        "SASL user {authcid:?} is not {{deviceId}}@sas.{{hub}} with a SAS token"
                    ),
                )),
            }
        }
        _ => Ok(()),
    };
    let auth_deadline = start + limits.auth_timeout;
    let never = Instant::now() + Duration::from_secs(100 * 365 * 86_400);

    let closed: Closing = match first {
        Err(c) => c,
        Ok(()) => loop {
            if let Some(attach) = pending_attach.take() {
                if let Err(c) = conn.attach(attach, &mut session).await {
                    break c;
                }
            }
            let (deadline, why) = match &conn.connected {
                None => (auth_deadline, "not authenticated in time"),
                Some(c) => match c.token_expiry {
                    Some(expiry) => {
                        let left = expiry - hub.clock().now().unix_seconds()
                            + crate::auth::CLOCK_SKEW_SECS;
                        (
                            Instant::now() + Duration::from_secs(left.max(0) as u64),
                            "the SAS token expired",
                        )
                    }
                    None => (never, ""),
                },
            };
            let close = conn.connected.as_ref().map(|c| c.close.clone());
            tokio::select! {
                attach = session.next_incoming_attach() => match attach {
                    Some(a) => pending_attach = Some(a),
                    None => break Closing { reason: "the session ended".into(), error: None },
                },
                request = next_delivery(&mut conn.cbs_rx) => match request {
                    Ok(delivery) => {
                        if let Some(r) = &conn.cbs_rx {
                            let _ = r.accept(&delivery).await;
                        }
                        if let Err(c) = conn.put_token(delivery.message()).await {
                            break c;
                        }
                    }
                    Err(reason) => {
                        // The device detached `$cbs` (fe2o3 answered the detach): the
                        // connection goes on with the token it has.
                        tracing::debug!("AMQP hub connection: {reason}");
                        conn.cbs_rx = None;
                    }
                },
                change = next_desired(&mut conn.connected) => conn.on_desired(change).await,
                () = async {
                    match &close {
                        Some(n) => n.notified().await,
                        None => std::future::pending().await,
                    }
                } => break closing(
                    AmqpError::UnauthorizedAccess,
                    "replaced by a new connection, or the device was deleted or disabled",
                ),
                () = tokio::time::sleep_until(deadline) => {
                    break closing(AmqpError::UnauthorizedAccess, why);
                }
            }
        },
    };

    let device = conn.connected.as_ref().map(|c| c.device_id.clone());
    match &device {
        Some(d) => {
            tracing::info!(device = %d, "AMQP device disconnected from the hub: {}", closed.reason)
        }
        None => tracing::debug!("AMQP hub connection closed: {}", closed.reason),
    }
    // Closing the connection ends every link; each task then finishes on its own (method
    // calls not yet sent are forgotten, so their invokers hear DeviceNotOnline).
    conn.cbs_out = None;
    conn.cbs_rx = None;
    drop(session);
    let _ = match closed.error {
        Some(e) => connection.close_with_error(e).await,
        None => connection.close().await,
    };
    for task in conn.tasks.drain(..) {
        let abort = task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .is_err()
        {
            tracing::debug!("an AMQP link task outlived its connection: stopped");
            abort.abort();
        }
    }
    if let Some(c) = conn.connected.take() {
        let now_ms = hub.clock().now().0.timestamp_millis();
        hub.endpoint()
            .close_saved_session(&c.device_key, c.conn_id, now_ms);
        if let Some((mut rx, _)) = c.methods {
            // The methods link never attached.
            rx.close();
            while let Ok(call) = rx.try_recv() {
                hub.endpoint().forget_method(&call.rid);
            }
        }
        if hub.endpoint().unregister(&c.device_key, c.conn_id) {
            if let Err(e) = hub
                .set_connection_state(&c.device_id, ConnectionState::Disconnected)
                .await
            {
                if let Some(suppressed) = crate::device_mqtt::STORE_FAILED.admit() {
                    tracing::warn!(error = %e, suppressed, "could not record the device as disconnected");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_link_addresses() {
        assert_eq!(
            parse_device_link("/devices/dev-1/messages/events"),
            Some(("dev-1".into(), LinkKind::Telemetry))
        );
        assert_eq!(
            parse_device_link("amqps://hub.local/devices/dev%231/messages/deviceBound"),
            Some(("dev#1".into(), LinkKind::CloudToDevice))
        );
        assert_eq!(
            parse_device_link("/devices/d/twin/"),
            Some(("d".into(), LinkKind::Twin))
        );
        assert_eq!(
            parse_device_link("/devices/d/methods/devicebound"),
            Some(("d".into(), LinkKind::Methods))
        );
        assert_eq!(
            parse_device_link("/devices/d/modules/m/messages/events"),
            None
        );
        assert_eq!(parse_device_link("0ne0001/registrations/d"), None);
        assert_eq!(parse_device_link("$cbs"), None);
    }

    #[test]
    fn plain_users() {
        assert_eq!(plain_device("dev-1@sas.hub"), Some("dev-1"));
        assert_eq!(plain_device("dev-1@other"), None);
        assert_eq!(plain_device("@sas.hub"), None);
    }
}
