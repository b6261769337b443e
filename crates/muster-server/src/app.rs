//! The HTTPS application: every route family merged into one router (their paths do not
//! overlap), wrapped so routing is case-insensitive.
//!
//! - service API: `/enrollments`, `/enrollmentGroups`, `/registrations`, `/linkedHubs`
//! - device API: `/{idScope}/registrations/{registrationId}/...`
//! - built-in hub REST: `/devices`, `/twins`
//! - MQTT over WebSocket: `/$iothub/websocket`
//! - web console: `/console` (`muster-console`)
//! - live registration events: `/events/registrations`
//!
//! Writes through the service API and the hub REST router are recorded in the audit log
//! (`muster_service_api::audit`; the service API router wraps itself, the hub's is wrapped
//! here).

use axum::extract::Request;
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

use muster_registration::DeviceRegistrar;
use muster_service_api::events::RegistrationFeed;
use muster_service_api::ServiceApi;
use tower::ServiceExt;

use crate::mqtt_dispatch::{self, MqttServices};

/// The router served on the HTTPS port.
pub fn https_app(
    service_api: ServiceApi,
    https_registrar: Arc<dyn DeviceRegistrar>,
    mqtt: MqttServices,
    console: muster_console::Console,
    events: RegistrationFeed,
) -> Router {
    let hub = mqtt.hub.clone();
    let hub_auditor = muster_console::hub_auditor(&service_api, hub.clone());
    let inner = Router::new()
        .merge(muster_service_api::router(service_api.clone()))
        .merge(muster_service_api::events::router(service_api, events))
        .merge(muster_device_api::https::router(https_registrar))
        .merge(
            Router::new()
                .route("/$iothub/websocket", get(mqtt_dispatch::websocket))
                // C# connects its WebSocket to `/`.
                .route("/", get(mqtt_dispatch::websocket))
                .with_state(mqtt),
        )
        .merge(hub_auditor.wrap(muster_hub::router(hub)))
        .merge(muster_console::router(console))
        .fallback(muster_service_api::not_found)
        .method_not_allowed_fallback(muster_service_api::method_not_allowed);
    // Path normalisation must run before routing, so it wraps the whole router.
    Router::new()
        .fallback_service(inner.map_request(|req: Request| muster_service_api::normalize_path(req)))
}
