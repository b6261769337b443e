//! The built-in hub's device endpoint: one device's MQTT 3.1.1 session (service-api.md §10),
//! for any byte stream (TLS on 8883, or MQTT over WebSocket adapted by the server). Packets
//! are read with the DPS session's reader (`muster_device_api::mqtt::PacketReader`, rumqttc's
//! v4 codec under a size limit).
//!
//! A connection goes:
//!
//! 1. **CONNECT** within [`DeviceEndpointLimits::connect_timeout`]; protocol level 4 (another
//!    level gets CONNACK 1). Who may connect and the refusal codes: see [`connect`].
//!    CONNACK is 0 with session-present 1 when a CleanSession=0 connection resumes a saved
//!    session (see `crate::endpoint`): its subscriptions are restored without a SUBSCRIBE,
//!    the QoS 1 twin responses and desired patches it had not PUBACKed are sent again (same
//!    packet id, DUP), then the desired patches queued while it was away, then waiting
//!    cloud-to-device messages (those are redelivered from the store on every connection that
//!    subscribes, clean or not). CleanSession=1 discards any saved session and keeps nothing
//!    after it closes; a saved session expires [`DeviceEndpointLimits::session_expiry`]
//!    (1 h) after its device left. A SAS-authenticated connection is closed when its token
//!    expires (the SDKs reconnect with a fresh one before). A second connection of the same
//!    device replaces (closes) the first, and takes its session over. The device's
//!    `connectionState`, `connectionStateUpdatedTime` and `lastActivityTime` are written on
//!    connect and disconnect (not on every message).
//!    Deleting or disabling the device closes its connection. The Will message is ignored.
//! 2. **SUBSCRIBE** (granted QoS ≤ 1, other filters `0x80`): `devices/{id}/messages/devicebound/#`,
//!    `$iothub/twin/res/#`, `$iothub/twin/PATCH/properties/desired/#`, `$iothub/methods/POST/#`.
//! 3. **PUBLISH** (QoS 0/1; QoS 2 closes the connection):
//!    - telemetry `devices/{id}/messages/events/[{property bag}]` → stored
//!      ([`crate::telemetry`]), then PUBACKed (a failed write closes the connection without
//!      PUBACK, so the device resends). RETAIN adds the application property `mqtt-retain`.
//!    - `$iothub/twin/GET/?$rid=` → `$iothub/twin/res/200/?$rid=` with
//!      `{"desired":{..},"reported":{..}}`;
//!    - `$iothub/twin/PATCH/properties/reported/?$rid=` (JSON object, `null` deletes) →
//!      `$iothub/twin/res/204/?$rid=&$version={reported version}`; not a JSON object → `res/400`;
//!    - `$iothub/methods/res/{status}/?$rid=` → the waiting invoker
//!      ([`HubRegistry::invoke_method`]).
//!
//!    Any other topic, or another device's topic, closes the connection (logged; nothing
//!    stored). Responses and pushes go only to matching subscriptions, at their granted QoS.
//! 4. **Pushed by the hub**: desired-property patches
//!    `$iothub/twin/PATCH/properties/desired/?$version={v}` (patch with `$version`; after
//!    the change channel lagged, the whole desired collection), cloud-to-device messages
//!    (see [`crate::c2d`]), method calls `$iothub/methods/POST/{name}/?$rid={rid}`.
//! 5. **PINGREQ** → PINGRESP. Nothing received for 1.5 × keep-alive (at most
//!    [`DeviceEndpointLimits::max_idle`], 1767 s, which is also the limit with keep-alive 0)
//!    closes the connection. **DISCONNECT** closes it. Malformed bytes, a packet over
//!    [`DeviceEndpointLimits::max_packet_size`], a second CONNECT or packets only a server
//!    sends close the connection (debug log); nothing else is affected.
//!
//! Not implemented: modules (`{host}/{deviceId}/{moduleId}`, refused with CONNACK 5),
//! the 5-subscription limit, `certificateAuthority` devices; method calls are not part of
//! a persistent session (IoT Hub does not queue them either).
//!
//! [`DeviceEndpointLimits::connect_timeout`]: crate::DeviceEndpointLimits::connect_timeout
//! [`DeviceEndpointLimits::max_idle`]: crate::DeviceEndpointLimits::max_idle
//! [`DeviceEndpointLimits::session_expiry`]: crate::DeviceEndpointLimits::session_expiry
//! [`DeviceEndpointLimits::max_packet_size`]: crate::DeviceEndpointLimits::max_packet_size

pub mod connect;
mod session;
mod topic;

use std::time::Duration;

use bytes::BytesMut;
use muster_device_api::mqtt::{ConnectProtocol, PacketReader};
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet};
use rumqttc::mqttbytes::Protocol;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};
use tokio::time::{sleep_until, timeout, Instant};

use crate::model::ConnectionState;
use crate::HubRegistry;

use session::{Flow, Session};

/// Packets queued for the writer; the session waits (and stops reading) when it is full.
const OUTGOING_QUEUE: usize = 64;

/// One line per interval, with a count, for store failures every connection or message would
/// repeat (a full disk would otherwise flood the log).
pub(crate) static STORE_FAILED: muster_proto::log_limit::LogLimiter =
    muster_proto::log_limit::LogLimiter::new(Duration::from_secs(10));

/// Serves one device's MQTT connection until it closes. The stream starts with the CONNECT
/// packet. `client_certs` is the TLS client certificate chain (leaf first, DER), empty when
/// none was presented or there is no TLS.
pub async fn serve_connection<S>(stream: S, hub: HubRegistry, client_certs: Vec<Vec<u8>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = hub.limits().clone();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut reader = PacketReader::new(limits.max_packet_size);

    // CONNECT
    let connect_deadline = Instant::now() + limits.connect_timeout;
    let connect = match reader.next_frame(&mut rd, connect_deadline).await {
        Ok(()) => match reader.connect_protocol() {
            ConnectProtocol::NotConnect => {
                tracing::debug!("hub MQTT connection closed: first packet is not CONNECT");
                return;
            }
            ConnectProtocol::Unsupported(level) => {
                tracing::debug!(
                    level,
                    "hub MQTT connection refused: unsupported protocol level"
                );
                refuse(&mut wr, ConnectReturnCode::RefusedProtocolVersion, &limits).await;
                return;
            }
            ConnectProtocol::V311 => match reader.take_packet() {
                Ok(Packet::Connect(c)) if c.protocol == Protocol::V4 => c,
                Ok(_) => {
                    refuse(&mut wr, ConnectReturnCode::RefusedProtocolVersion, &limits).await;
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "hub MQTT connection closed: malformed CONNECT");
                    return;
                }
            },
        },
        Err(end) => {
            tracing::debug!("hub MQTT connection closed before CONNECT: {end}");
            return;
        }
    };
    reader.expect_connect = false;
    let identity = match connect::authenticate(&hub, &connect, &client_certs).await {
        Ok(identity) => identity,
        Err((code, why)) => {
            tracing::debug!(client_id = %connect.client_id, ?code, "hub MQTT CONNECT refused: {why}");
            refuse(&mut wr, code, &limits).await;
            return;
        }
    };
    tracing::info!(
        device = %identity.device_id,
        api_version = identity.username.param("api-version").unwrap_or(""),
        client = identity.username.param("DeviceClientType").unwrap_or(""),
        "device connected to the hub"
    );
    let idle = if connect.keep_alive > 0 {
        Duration::from_millis(u64::from(connect.keep_alive) * 1500).min(limits.max_idle)
    } else {
        limits.max_idle
    };
    let token_deadline = match identity.token_expiry {
        Some(expiry) => {
            let left = expiry - hub.clock().now().unix_seconds() + crate::auth::CLOCK_SKEW_SECS;
            Instant::now() + Duration::from_secs(left.max(0) as u64)
        }
        // Far enough never to matter.
        None => Instant::now() + Duration::from_secs(100 * 365 * 86_400),
    };

    let device_key = hub.store_key(&identity.device_id);
    if !connect.clean_session {
        // Its session may be on another node (a reconnect the load balancer sent here).
        hub.fetch_session(&identity.device_id, &device_key).await;
    }
    // Subscribe before anything can change, so no desired change falls in between.
    let mut desired_rx = hub.subscribe_desired();
    let handles = hub.register_session(&device_key);
    let mut methods_rx = handles.methods;
    let resumed = hub.endpoint().open_session(
        &device_key,
        handles.conn_id,
        connect.clean_session,
        hub.clock().now().0.timestamp_millis(),
    );

    // Recorded before CONNACK, so a service reading the device once the device has its
    // CONNACK finds it connected.
    if let Err(e) = hub
        .set_connection_state(&identity.device_id, ConnectionState::Connected)
        .await
    {
        if let Some(suppressed) = STORE_FAILED.admit() {
            tracing::warn!(error = %e, suppressed, "could not record the device as connected");
        }
    }
    let (tx, rx) = mpsc::channel(OUTGOING_QUEUE);
    let writer = tokio::spawn(write_loop(wr, rx, limits.write_timeout));
    let _ = tx
        .send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            resumed.is_some(),
        )))
        .await;

    let mut session = Session::new(
        hub.clone(),
        identity.device_id.clone(),
        handles.conn_id,
        tx.clone(),
        handles.methods_subscribed.clone(),
    );
    let mut resume_flow = match resumed {
        Some(state) => {
            tracing::debug!(device = %identity.device_id, "persistent session resumed");
            session.resume(state).await
        }
        None => Flow::Continue,
    };
    let token_sleep = sleep_until(token_deadline);
    tokio::pin!(token_sleep);
    let mut last_rx = Instant::now();
    let reason = loop {
        if let Flow::Close(reason) = std::mem::replace(&mut resume_flow, Flow::Continue) {
            break reason;
        }
        let flow = tokio::select! {
            () = handles.close.notified() => {
                break "replaced by a new connection, or the device was deleted or disabled".to_string();
            }
            () = &mut token_sleep => break "the SAS token expired".to_string(),
            () = tx.closed() => break "writer gone".to_string(),
            read = reader.next_packet(&mut rd, last_rx + idle) => match read {
                Ok(packet) => {
                    last_rx = Instant::now();
                    session.handle(packet).await
                }
                Err(end) => break end.to_string(),
            },
            () = handles.c2d_wake.notified() => session.deliver_c2d().await,
            Some(call) = methods_rx.recv() => session.send_method(call).await,
            change = desired_rx.recv() => match change {
                Ok(change) => session.on_desired(&change).await,
                Err(broadcast::error::RecvError::Lagged(_)) => session.resync_desired().await,
                Err(broadcast::error::RecvError::Closed) => break "hub shut down".to_string(),
            },
        };
        if let Flow::Close(reason) = flow {
            break reason;
        }
    };
    tracing::info!(device = %identity.device_id, "device disconnected from the hub: {reason}");

    // Calls that never reached the device: their invokers hear DeviceNotOnline now.
    methods_rx.close();
    while let Ok(call) = methods_rx.try_recv() {
        hub.endpoint().forget_method(&call.rid);
    }
    hub.endpoint().close_saved_session(
        session.device_key(),
        handles.conn_id,
        hub.clock().now().0.timestamp_millis(),
    );
    if hub
        .endpoint()
        .unregister(session.device_key(), handles.conn_id)
    {
        if let Err(e) = hub
            .set_connection_state(&identity.device_id, ConnectionState::Disconnected)
            .await
        {
            if let Some(suppressed) = STORE_FAILED.admit() {
                tracing::warn!(error = %e, suppressed, "could not record the device as disconnected");
            }
        }
    }
    drop(session);
    drop(tx);
    // Let the writer flush what was queued, then close.
    let _ = timeout(limits.write_timeout, writer).await;
}

/// Writes a refusing CONNACK and closes.
async fn refuse<W: AsyncWrite + Unpin>(
    wr: &mut W,
    code: ConnectReturnCode,
    limits: &crate::DeviceEndpointLimits,
) {
    let mut buf = BytesMut::new();
    if Packet::ConnAck(ConnAck::new(code, false))
        .write(&mut buf, usize::MAX)
        .is_ok()
    {
        let _ = timeout(limits.write_timeout, async {
            wr.write_all(&buf).await?;
            wr.flush().await?;
            wr.shutdown().await
        })
        .await;
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Packet>,
    write_timeout: Duration,
) {
    let mut buf = BytesMut::with_capacity(1024);
    while let Some(packet) = rx.recv().await {
        if !muster_device_api::mqtt::write_packet(&mut wr, &mut buf, &packet, write_timeout).await {
            return;
        }
    }
    let _ = timeout(write_timeout, wr.shutdown()).await;
}
