//! `/registrations`: device registration records (get, delete, query by enrollment group).

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use muster_proto::{
    AccessRight, DeviceRegistrationState, EnrollmentGroupId, ErrorCode, ItemType, RegistrationId,
};
use muster_store::records;
use muster_store::{Collection, Expect, ListQuery, Write, WriteOutcome};

use super::generic::admit;
use crate::error::ApiError;
use crate::request::Path;
use crate::request::{
    check_query_body, if_match, json_ok, page_request, page_response, paginate, read_body, IfMatch,
    QueryParams,
};
use crate::ServiceApi;

pub(super) fn routes() -> Router<ServiceApi> {
    Router::new()
        .route("/registrations/{id}", get(get_state).delete(delete_state))
        .route("/registrations/{id}/query", post(query_group))
}

fn registration_key(id: &str) -> Result<String, ApiError> {
    RegistrationId::new(id)
        .map(|r| r.key())
        .map_err(|e| ApiError::new(ErrorCode::InvalidRegistrationId, e.to_string()))
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::RegistrationNotFound,
        format!("registration '{id}' not found"),
    )
}

async fn get_state(
    State(api): State<ServiceApi>,
    Path(id): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::RegistrationStatusRead)?;
    let key = registration_key(&id)?;
    let state =
        records::get::<DeviceRegistrationState>(&*api.store, Collection::Registrations, &key)
            .await?
            .ok_or_else(|| not_found(&id))?;
    Ok(json_ok(&state.value))
}

async fn delete_state(
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
    let key = registration_key(&id)?;
    let expect = match if_match(&headers) {
        IfMatch::Etag(e) => Expect::Etag(e),
        IfMatch::None | IfMatch::Any => Expect::Any,
    };
    let outcome = api
        .store
        .write(vec![Write::delete(Collection::Registrations, key, expect)])
        .await?
        .into_iter()
        .next();
    match outcome {
        Some(WriteOutcome::Deleted) => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(WriteOutcome::EtagMismatch) => Err(ApiError::new(
            ErrorCode::PreconditionFailed,
            format!("If-Match does not match the current etag of registration '{id}'"),
        )),
        _ => Err(not_found(&id)),
    }
}

async fn query_group(
    State(api): State<ServiceApi>,
    Path(group_id): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::RegistrationStatusRead)?;
    let group_key = EnrollmentGroupId::new(group_id.as_str())
        .map(|g| g.key())
        .map_err(|e| ApiError::new(ErrorCode::InvalidEnrollmentGroupId, e.to_string()))?;
    // Python and the CLI send no body; Node and C# send a query specification.
    let bytes = read_body(body, api.limits.max_body_bytes).await?;
    check_query_body(&bytes)?;
    let scope = format!("registrations:{group_key}");
    let page = page_request(
        &headers,
        &scope,
        api.limits.default_page_size,
        api.limits.max_page_size,
    )?;
    let rows = records::list::<DeviceRegistrationState>(
        &*api.store,
        Collection::Registrations,
        ListQuery {
            partition: Some(group_key),
            after: page.after.clone(),
            limit: page.limit + 1,
        },
    )
    .await?;
    let (rows, continuation) =
        paginate(rows, &page, &scope, |r| Some(r.value.registration_id.key()));
    let items: Vec<DeviceRegistrationState> = rows.into_iter().map(|r| r.value).collect();
    Ok(page_response(
        &items,
        ItemType::DeviceRegistration,
        continuation,
    ))
}
