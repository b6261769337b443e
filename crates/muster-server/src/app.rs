//! The HTTPS application: every route family merged into one router (their paths do not
//! overlap), wrapped so routing is case-insensitive and every refusal leaves a debug line.
//!
//! - service API: `/enrollments`, `/enrollmentGroups`, `/registrations`, `/linkedHubs`
//! - device API: `/{idScope}/registrations/{registrationId}/...`
//! - built-in hub REST: `/devices`, `/twins`
//! - MQTT and AMQP over WebSocket: `/$iothub/websocket` (`device_websocket`), and `/` for a
//!   WebSocket upgrade (C#)
//! - web console: `/console` (`muster-console`); `/` without an upgrade redirects there, and
//!   `/favicon.ico` is the console's icon
//! - health: `/healthz`, `/readyz` (`health.rs`), no auth
//! - Prometheus metrics: `/metrics`, behind a service SAS token (`metrics.rs`)
//! - live registration events: `/events/registrations`
//!
//! Writes through the service API and the hub REST router are recorded in the audit log
//! (`muster_service_api::audit`; the service API router wraps itself, the hub's is wrapped
//! here).

use axum::extract::{Request, State};
use axum::handler::Handler;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;

use muster_registration::DeviceRegistrar;
use muster_service_api::events::RegistrationFeed;
use muster_service_api::ServiceApi;
use tower::ServiceExt;

use crate::device_websocket::{self, DeviceServices};
use crate::health::{self, Health};
use crate::{refusal_log, unread_body};

/// Where a browser opening `https://host/` is sent.
pub const FRONT_DOOR_TARGET: &str = "/console/";

/// The router served on the HTTPS port.
// One argument per service the port carries; a struct of them would only be unpacked here.
pub fn https_app(
    service_api: ServiceApi,
    https_registrar: Arc<dyn DeviceRegistrar>,
    devices: DeviceServices,
    console: muster_console::Console,
    health: Health,
    metrics: PrometheusHandle,
    events: RegistrationFeed,
) -> Router {
    let hub = devices.mqtt.hub.clone();
    let hub_auditor = muster_console::hub_auditor(&service_api, hub.clone());
    let metrics = crate::metrics::authenticated_router(
        metrics,
        service_api.auth.clone(),
        service_api.clock.clone(),
    );
    let inner = Router::new()
        .merge(metrics)
        .merge(muster_service_api::router(service_api.clone()))
        .merge(muster_service_api::events::router(service_api, events))
        .merge(muster_device_api::https::router(https_registrar))
        .merge(
            Router::new()
                .route("/$iothub/websocket", get(device_websocket::websocket))
                .route("/", get(front_door))
                .with_state(devices),
        )
        .merge(hub_auditor.wrap(muster_hub::router(hub.clone())))
        // Device traffic, not service writes: outside the audit.
        .merge(muster_hub::device_http::router(hub))
        .merge(muster_console::router(console))
        .route("/favicon.ico", get(muster_console::assets::favicon))
        .merge(health::routes(health))
        .fallback(muster_service_api::not_found)
        .method_not_allowed_fallback(muster_service_api::method_not_allowed);
    // Path normalisation must run before routing, so it wraps the whole router.
    Router::new()
        .fallback_service(inner.map_request(|req: Request| muster_service_api::normalize_path(req)))
        .layer(axum::middleware::from_fn(refusal_log::log_refusals))
        .layer(axum::middleware::from_fn(
            unread_body::close_when_body_unread,
        ))
}

/// `GET /`: C# opens its MQTT WebSocket here; anyone else (a browser) goes to the console.
async fn front_door(State(devices): State<DeviceServices>, req: Request) -> Response {
    if is_websocket_upgrade(req.headers()) {
        return device_websocket::websocket.call(req, devices).await;
    }
    Redirect::to(FRONT_DOOR_TARGET).into_response()
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
        })
}
