//! `/certificates/issued` (Muster's extension): the certificates Muster's issuing CAs signed
//! for devices' CSRs (`muster_store::issued`).
//!
//! - `GET /certificates/issued[?registrationId=ID]`: by serial number, paged with
//!   `x-ms-max-item-count` / `x-ms-continuation` like the queries. RegistrationStatusRead.
//! - `GET /certificates/issued/{serial}`: one; 404207 when Muster issued none with it.
//!   RegistrationStatusRead.
//! - `POST /certificates/issued/{serial}/revoke` with `{"reason": "..."}` (optional): marks it
//!   revoked and, when it is its registration's current certificate, takes it off the hub
//!   device ([`crate::CertificateIssuer`]). Revoking again answers the record unchanged.
//!   RegistrationStatusWrite.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use muster_proto::issued_certificate::{normalize_serial, RevokeRequest, MAX_REASON_CHARS};
use muster_proto::{AccessRight, ErrorCode, IssuedCertificate, RegistrationId};
use muster_store::issued;

use super::generic::admit;
use crate::error::ApiError;
use crate::request::{json_ok, page_request, paginate, read_body, require_json, Path, QueryParams};
use crate::ServiceApi;

/// Continuation tokens of this route name this scope.
const SCOPE: &str = "issuedCertificates";

pub(super) fn routes() -> Router<ServiceApi> {
    Router::new()
        .route("/certificates/issued", get(list))
        .route("/certificates/issued/{serial}", get(show))
        .route("/certificates/issued/{serial}/revoke", post(revoke))
}

fn serial(raw: &str) -> Result<String, ApiError> {
    normalize_serial(raw).ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidField,
            format!("serial number '{raw}' is not hexadecimal (up to 64 digits)"),
        )
    })
}

fn not_found(serial: &str) -> ApiError {
    ApiError::new(
        ErrorCode::IssuedCertificateNotFound,
        format!("no issued certificate has serial number {serial}"),
    )
}

async fn list(
    State(api): State<ServiceApi>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::RegistrationStatusRead)?;
    let registration = match params.get("registrationId").filter(|v| !v.is_empty()) {
        Some(id) => Some(
            RegistrationId::new(id)
                .map_err(|e| ApiError::new(ErrorCode::InvalidRegistrationId, e.to_string()))?,
        ),
        None => None,
    };
    let page = page_request(
        &headers,
        SCOPE,
        api.limits.default_page_size,
        api.limits.max_page_size,
    )?;
    // One more than the page tells whether another page follows.
    let (rows, _) = issued::list(
        &*api.store,
        registration.as_ref().map(RegistrationId::as_str),
        page.after.clone(),
        page.limit + 1,
    )
    .await?;
    let (rows, continuation) = paginate(rows, &page, SCOPE, |c: &IssuedCertificate| {
        Some(c.serial_number.clone())
    });
    let mut resp = json_ok(&rows);
    if let Some(c) = continuation.and_then(|c| c.parse().ok()) {
        resp.headers_mut()
            .insert(muster_proto::query::HEADER_CONTINUATION, c);
    }
    Ok(resp)
}

async fn show(
    State(api): State<ServiceApi>,
    Path(raw): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::RegistrationStatusRead)?;
    let serial = serial(&raw)?;
    match issued::get(&*api.store, &serial).await? {
        Some(cert) => Ok(json_ok(&cert)),
        None => Err(not_found(&serial)),
    }
}

async fn revoke(
    State(api): State<ServiceApi>,
    Path(raw): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(
        &api,
        &headers,
        &params,
        AccessRight::RegistrationStatusWrite,
    )?;
    let serial = serial(&raw)?;
    require_json(&headers)?;
    let bytes = read_body(body, api.limits.max_body_bytes).await?;
    let request: RevokeRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        RevokeRequest::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(
                ErrorCode::MalformedBody,
                format!("the body is not {{\"reason\": \"...\"}}: {e}"),
            )
        })?
    };
    let reason = request.reason.filter(|r| !r.trim().is_empty());
    if let Some(r) = &reason {
        if r.chars().count() > MAX_REASON_CHARS || r.chars().any(char::is_control) {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                format!("reason must be at most {MAX_REASON_CHARS} characters without control characters"),
            ));
        }
    }
    let Some(issuer) = api.certificates.clone() else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "this server does not revoke certificates (no registration engine)",
        ));
    };
    let cert = issuer.revoke(&serial, reason).await?;
    Ok(json_ok(&cert))
}
