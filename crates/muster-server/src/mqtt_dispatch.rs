//! Device MQTT on one port for two services: registration (DPS) and the built-in hub's device
//! endpoint. The first packet's user name decides (`muster_device_api::mqtt::dispatch`); the
//! chosen session gets the whole stream. The same dispatch serves MQTT over WebSocket at
//! `/$iothub/websocket` (and `/` for C#; `device_websocket.rs`).

use std::sync::Arc;

use muster_device_api::mqtt::dispatch::{peek_connect, Destination, Rewind};
use muster_device_api::mqtt::{self, MqttLimits};
use muster_device_api::pre_auth::PreAuthHold;
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
