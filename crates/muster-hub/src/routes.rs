//! What every hub route does before its own work: path id, token, api-version.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use crate::auth::{HubRight, Scope};
use crate::error::{HubError, HubErrorCode};
use crate::registry::HubRegistry;
use crate::request::{api_version, QueryParams};

/// The `{id}` path segment, percent-decoded.
pub(crate) fn path_id(path: Result<Path<String>, PathRejection>) -> Result<String, HubError> {
    path.map(|Path(id)| id)
        .map_err(|e| HubError::invalid(format!("the device id in the path is invalid: {e}")))
}

/// Authorizes the request for `right` on `scope`, then checks the api-version. Returns the
/// query parameters.
pub(crate) fn admit(
    hub: &HubRegistry,
    headers: &HeaderMap,
    query: Result<Query<QueryParams>, QueryRejection>,
    right: HubRight,
    scope: Scope<'_>,
) -> Result<QueryParams, HubError> {
    let now = hub.clock().now().unix_seconds();
    hub.authorizer().authorize(headers, right, scope, now)?;
    let Query(params) = query.map_err(|e| {
        HubError::new(
            HubErrorCode::InvalidProtocolVersion,
            format!("the query string is invalid: {e}"),
        )
    })?;
    api_version(&params)?;
    Ok(params)
}

/// Fallback for paths the hub doesn't serve (404, hub error body).
pub async fn not_found() -> Response {
    HubError::new(
        HubErrorCode::NotFound,
        "The requested resource does not exist.",
    )
    .into_response()
}

/// Fallback for a known path with another method (405, hub error body).
pub async fn method_not_allowed() -> Response {
    HubError::new(
        HubErrorCode::MethodNotAllowed,
        "The requested method is not allowed on this resource.",
    )
    .into_response()
}
