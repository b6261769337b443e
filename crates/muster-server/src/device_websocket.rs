//! `GET /$iothub/websocket` (and `/` for C#): devices' MQTT and AMQP over WebSocket on the
//! HTTPS port. The offered subprotocol decides: `mqtt` (any case) goes to `mqtt_dispatch`,
//! `AMQPWSB10` to `amqp_dispatch`; the chosen one is echoed. The connection's first request
//! carries its [`PreAuthHold`] (`listener.rs`); the session takes it over.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use muster_device_api::pre_auth::PreAuthHold;
use muster_device_api::websocket::{mqtt_subprotocol, ClientCertChain, WsByteStream};

use crate::amqp_dispatch::{self, AmqpServices};
use crate::mqtt_dispatch::{self, MqttServices};

/// The WebSocket subprotocol of AMQP 1.0 (OASIS AMQP WebSocket binding).
pub const AMQP_SUBPROTOCOL: &str = "AMQPWSB10";

/// Largest WebSocket message or frame accepted.
const MAX_MESSAGE: usize = 512 * 1024;

#[derive(Clone)]
pub struct DeviceServices {
    pub mqtt: MqttServices,
    pub amqp: AmqpServices,
}

fn amqp_subprotocol(ws: &WebSocketUpgrade) -> Option<HeaderValue> {
    ws.requested_protocols()
        .find(|p| p.as_bytes() == AMQP_SUBPROTOCOL.as_bytes())
        .cloned()
}

pub async fn websocket(
    State(services): State<DeviceServices>,
    chain: Option<Extension<ClientCertChain>>,
    pre_auth: Option<Extension<PreAuthHold>>,
    ws: WebSocketUpgrade,
) -> Response {
    let certs = chain.map(|Extension(c)| c.0).unwrap_or_default();
    // Taken now: the request (and the extension's other clones) is dropped before the upgrade.
    let pre_auth = pre_auth.map(|Extension(h)| h.take()).unwrap_or_default();
    let mut ws = ws.max_message_size(MAX_MESSAGE).max_frame_size(MAX_MESSAGE);
    if let Some(protocol) = mqtt_subprotocol(&ws) {
        ws.set_selected_protocol(protocol);
        return ws.on_upgrade(move |socket| async move {
            mqtt_dispatch::serve(WsByteStream::new(socket), services.mqtt, certs, pre_auth).await;
        });
    }
    if let Some(protocol) = amqp_subprotocol(&ws) {
        ws.set_selected_protocol(protocol);
        return ws.on_upgrade(move |socket| async move {
            amqp_dispatch::serve(WsByteStream::new(socket), services.amqp, certs, pre_auth).await;
        });
    }
    (
        StatusCode::BAD_REQUEST,
        "a device WebSocket needs the subprotocol `mqtt` or `AMQPWSB10` (Sec-WebSocket-Protocol)",
    )
        .into_response()
}
