//! The service API's routes, one module per route family.

mod access_policies;
mod audit_log;
mod ca_certificates;
mod deprovisions;
mod enrollment_groups;
mod enrollments;
mod generic;
mod issued_certificates;
mod linked_hubs;
mod registrations;
mod service_settings;

use axum::Router;

pub use access_policies::{OWNER_POLICY, POLICIES_KEY};
pub(crate) use generic::admit;

use crate::error::ApiError;
use crate::ServiceApi;
use muster_proto::ErrorCode;

/// The service API router. Wrap the final application in [`crate::normalize_path`].
/// Every write through it is recorded in the audit log ([`crate::audit`]).
pub fn router(api: ServiceApi) -> Router {
    let routes = Router::new()
        .merge(enrollments::routes())
        .merge(enrollment_groups::routes())
        .merge(registrations::routes())
        .merge(linked_hubs::routes())
        .merge(access_policies::routes())
        .merge(service_settings::routes())
        .merge(ca_certificates::routes())
        .merge(deprovisions::routes())
        .merge(audit_log::routes())
        .merge(issued_certificates::routes())
        // A route layer: only matched routes, whose template labels the metrics.
        .route_layer(axum::middleware::from_fn(crate::metrics::record));
    crate::audit::Auditor::for_service_api(&api)
        .wrap(routes)
        .with_state(api)
}

/// Fallback for paths no route serves, in the DPS error shape.
pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such resource")
}

/// Fallback for a known path with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this method is not allowed on this resource",
    )
}
