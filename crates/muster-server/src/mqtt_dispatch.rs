//! Device MQTT on one port for two services: registration (DPS) and the built-in hub's device
//! endpoint. The first packet's user name decides (`muster_device_api::mqtt::dispatch`); the
//! chosen session gets the whole stream. The same dispatch serves MQTT over WebSocket at
//! `/$iothub/websocket` (and `/` for C#).

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use muster_device_api::mqtt::dispatch::{peek_connect, Destination, Rewind};
use muster_device_api::mqtt::{self, MqttLimits};
use muster_device_api::pre_auth::PreAuthHold;
use muster_device_api::websocket::{mqtt_subprotocol, ClientCertChain, WsByteStream};
use muster_registration::DeviceRegistrar;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

/// What an MQTT connection can be handed to, and the registration sessions' limits.
#[derive(Clone)]
pub struct MqttServices {
    pub registrar: Arc<dyn DeviceRegistrar>,
    pub hub: muster_hub::HubRegistry,
    pub limits: MqttLimits,
}

/// Serves one MQTT connection, whichever service it is for. `pre_auth` is let go once the
/// device authenticated: by the registration session, or here for the hub, which
/// authenticates the CONNECT it is handed before anything else.
pub async fn serve<S>(
    mut stream: S,
    services: MqttServices,
    client_certs: Vec<Vec<u8>>,
    pre_auth: PreAuthHold,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = services.limits.clone();
    let deadline = Instant::now() + limits.connect_timeout;
    let Some((prefix, username)) =
        peek_connect(&mut stream, limits.max_packet_size, deadline).await
    else {
        tracing::debug!("MQTT connection closed before a CONNECT");
        return;
    };
    let stream = Rewind::new(prefix, stream);
    match Destination::of(username.as_deref()) {
        Destination::Dps => {
            mqtt::serve_connection(stream, services.registrar, client_certs, limits, pre_auth).await
        }
        Destination::Hub => {
            pre_auth.release();
            muster_hub::device_mqtt::serve_connection(stream, services.hub, client_certs).await
        }
    }
}

/// `GET /$iothub/websocket`: MQTT over WebSocket for either service. The connection's first
/// request carries its [`PreAuthHold`] (`listener.rs`); the MQTT session takes it over.
pub async fn websocket(
    State(services): State<MqttServices>,
    chain: Option<Extension<ClientCertChain>>,
    pre_auth: Option<Extension<PreAuthHold>>,
    ws: WebSocketUpgrade,
) -> Response {
    let certs = chain.map(|Extension(c)| c.0).unwrap_or_default();
    // Taken now: the request (and the extension's other clones) is dropped before the upgrade.
    let pre_auth = pre_auth.map(|Extension(h)| h.take()).unwrap_or_default();
    let Some(protocol) = mqtt_subprotocol(&ws) else {
        return (
            StatusCode::BAD_REQUEST,
            "MQTT over WebSocket needs the subprotocol `mqtt` (Sec-WebSocket-Protocol)",
        )
            .into_response();
    };
    let max = 512 * 1024;
    let mut ws = ws.max_message_size(max).max_frame_size(max);
    ws.set_selected_protocol(protocol);
    ws.on_upgrade(move |socket| async move {
        serve(WsByteStream::new(socket), services, certs, pre_auth).await;
    })
}
