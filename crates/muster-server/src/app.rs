//! The HTTPS application: every route family merged into one router, wrapped so routing is
//! case-insensitive.

use axum::extract::Request;
use axum::Router;
use muster_service_api::ServiceApi;
use tower::ServiceExt;

/// The router served on the HTTPS port.
pub fn https_app(service_api: ServiceApi) -> Router {
    let inner = Router::new()
        .merge(muster_service_api::router(service_api))
        .fallback(muster_service_api::not_found)
        .method_not_allowed_fallback(muster_service_api::method_not_allowed);
    // Path normalisation must run before routing, so it wraps the whole router.
    Router::new()
        .fallback_service(inner.map_request(|req: Request| muster_service_api::normalize_path(req)))
}
