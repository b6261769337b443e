//! The HTTPS application: every route family merged into one router (their paths do not
//! overlap), wrapped so routing is case-insensitive.
//!
//! - service API: `/enrollments`, `/enrollmentGroups`, `/registrations`, `/linkedHubs`
//! - device API: `/{idScope}/registrations/{registrationId}/...`
//! - built-in hub REST: `/devices`, `/twins`
//! - MQTT over WebSocket: `/$iothub/websocket`
//! - web console: `/console` (`muster-console`)
//! - Prometheus metrics: `/metrics`, behind a service SAS token (`metrics.rs`)

use axum::extract::Request;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use muster_service_api::ServiceApi;
use tower::ServiceExt;

use crate::mqtt_dispatch::{self, MqttServices};

/// The router served on the HTTPS port.
pub fn https_app(
    service_api: ServiceApi,
    mqtt: MqttServices,
    console: muster_console::Console,
    metrics: PrometheusHandle,
) -> Router {
    let hub = mqtt.hub.clone();
    let metrics = crate::metrics::authenticated_router(
        metrics,
        service_api.auth.clone(),
        service_api.clock.clone(),
    );
    let inner = Router::new()
        .merge(metrics)
        .merge(muster_service_api::router(service_api))
        .merge(muster_device_api::https::router(mqtt.registrar.clone()))
        .merge(
            Router::new()
                .route("/$iothub/websocket", get(mqtt_dispatch::websocket))
                // C# connects its WebSocket to `/`.
                .route("/", get(mqtt_dispatch::websocket))
                .with_state(mqtt),
        )
        .merge(muster_hub::router(hub))
        .merge(muster_console::router(console))
        .fallback(muster_service_api::not_found)
        .method_not_allowed_fallback(muster_service_api::method_not_allowed);
    // Path normalisation must run before routing, so it wraps the whole router.
    Router::new()
        .fallback_service(inner.map_request(|req: Request| muster_service_api::normalize_path(req)))
}
