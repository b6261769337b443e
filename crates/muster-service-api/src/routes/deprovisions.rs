//! `POST /deprovisions/{registrationId}`: Muster's service-API extension that removes a
//! device completely, its registration record and its identity in the linked hub that holds
//! it (the cascade DPS lacks). The server carries it out through the registration engine,
//! which records its intent before touching the hub (see [`crate::Deprovisioner`]).

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use muster_proto::{AccessRight, ErrorCode};

use super::generic::admit;
use crate::error::ApiError;
use crate::request::{if_match, json_ok, IfMatch, QueryParams};
use crate::ServiceApi;

pub(super) fn routes() -> Router<ServiceApi> {
    Router::new().route("/deprovisions/{id}", post(deprovision))
}

async fn deprovision(
    State(api): State<ServiceApi>,
    Path(id): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(
        &api,
        &headers,
        &params,
        AccessRight::RegistrationStatusWrite,
    )?;
    let Some(deprovisioner) = api.deprovisioner.clone() else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "this server does not deprovision devices (no registration engine)",
        ));
    };
    let etag = match if_match(&headers) {
        IfMatch::Etag(e) => Some(e),
        IfMatch::None | IfMatch::Any => None,
    };
    let done = deprovisioner.deprovision(&id, etag.as_deref()).await?;
    Ok(json_ok(&done))
}
