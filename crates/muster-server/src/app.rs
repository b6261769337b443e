//! The HTTPS application: every route family merged into one router (their paths do not
//! overlap), wrapped so routing is case-insensitive.
//!
//! - service API: `/enrollments`, `/enrollmentGroups`, `/registrations`, `/linkedHubs`
//! - device API: `/{idScope}/registrations/{registrationId}/...`
//! - built-in hub REST: `/devices`, `/twins`
//! - MQTT and AMQP over WebSocket: `/$iothub/websocket` (`device_websocket`)
//! - web console: `/console` (`muster-console`)

use axum::extract::Request;
use axum::routing::get;
use axum::Router;
use muster_service_api::ServiceApi;
use tower::ServiceExt;

use crate::amqp_dispatch::AmqpServices;
use crate::device_websocket::{self, DeviceServices};
use crate::mqtt_dispatch::MqttServices;

/// The router served on the HTTPS port.
pub fn https_app(
    service_api: ServiceApi,
    mqtt: MqttServices,
    amqp: AmqpServices,
    console: muster_console::Console,
) -> Router {
    let hub = mqtt.hub.clone();
    let inner = Router::new()
        .merge(muster_service_api::router(service_api))
        .merge(muster_device_api::https::router(mqtt.registrar.clone()))
        .merge(
            Router::new()
                .route("/$iothub/websocket", get(device_websocket::websocket))
                // C# connects its WebSocket to `/`.
                .route("/", get(device_websocket::websocket))
                .with_state(DeviceServices { mqtt, amqp }),
        )
        .merge(muster_hub::router(hub))
        .merge(muster_console::router(console))
        .fallback(muster_service_api::not_found)
        .method_not_allowed_fallback(muster_service_api::method_not_allowed);
    // Path normalisation must run before routing, so it wraps the whole router.
    Router::new()
        .fallback_service(inner.map_request(|req: Request| muster_service_api::normalize_path(req)))
}
