//! Device AMQP on one port (5671, and `AMQPWSB10` on `/$iothub/websocket`): the connection is
//! opened up to its first link (`muster_device_api::amqp::open`), then the SASL identity or
//! that link's address decides who serves it (`muster_device_api::amqp::dispatch`): the
//! registration session, or the built-in hub's device session (`muster_hub::device_amqp`:
//! CBS, X.509 or SASL PLAIN, then telemetry, cloud-to-device, twin and method links).

use std::sync::Arc;

use muster_device_api::amqp::dispatch::Destination;
use muster_device_api::amqp::{self, registration, AmqpLimits};
use muster_device_api::pre_auth::PreAuthHold;
use muster_registration::DeviceRegistrar;
use tokio::io::{AsyncRead, AsyncWrite};

/// What an AMQP connection can be handed to, and the sessions' limits.
#[derive(Clone)]
pub struct AmqpServices {
    pub registrar: Arc<dyn DeviceRegistrar>,
    pub hub: muster_hub::HubRegistry,
    pub limits: AmqpLimits,
}

/// Serves one AMQP connection. `pre_auth` is let go once the device authenticated (by the
/// registration session, or by the hub session).
pub async fn serve<S>(
    stream: S,
    services: AmqpServices,
    client_certs: Vec<Vec<u8>>,
    pre_auth: PreAuthHold,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug + 'static,
{
    let opened = match amqp::open(
        stream,
        client_certs,
        &services.limits,
        Some(&services.registrar),
    )
    .await
    {
        Ok(o) => o,
        Err(e) => {
            tracing::debug!(error = %e, "AMQP connection closed before its first link");
            return;
        }
    };
    let first_address = amqp::link_address(&opened.first_attach);
    match Destination::of(&opened.peer.sasl, first_address) {
        Destination::Dps => {
            registration::serve(opened, services.registrar, services.limits, pre_auth).await
        }
        Destination::Hub => {
            muster_hub::device_amqp::serve(opened, services.hub, services.limits, pre_auth).await
        }
    }
}
