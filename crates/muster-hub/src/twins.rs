//! `/twins`: device twins.
//!
//! | Method | Path | Right | Success | Failures |
//! |---|---|---|---|---|
//! | GET | `/twins/{id}` | ServiceConnect | 200 Twin | 400, 401, 404 |
//! | PATCH | `/twins/{id}` | ServiceConnect | 200 Twin | 400, 401, 404, 412, 413 |
//! | PUT | `/twins/{id}` | ServiceConnect | 200 Twin | 400, 401, 404, 412, 413 |
//!
//! IoT Hub documents twin access (read, update tags and desired properties) under
//! ServiceConnect, not the registry permissions, so `registryRead`/`registryReadWrite` tokens
//! are refused here and the `service` policy is accepted.

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use crate::auth::{HubRight, Scope};
use crate::error::HubError;
use crate::model::{Twin, TwinUpdate};
use crate::registry::{HubRegistry, MAX_BODY_BYTES};
use crate::request::{if_match, json_ok, parse_json, read_body, QueryParams};
use crate::routes::{admit, path_id};

fn reply(twin: &Twin) -> Response {
    json_ok(twin, Some(&twin.etag))
}

pub(crate) async fn get(
    State(hub): State<HubRegistry>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<QueryParams>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let id = path_id(path)?;
        admit(
            &hub,
            &headers,
            query,
            HubRight::ServiceConnect,
            Scope::Device(&id),
        )?;
        let twin = hub.get_twin(&id).await?;
        Ok::<_, HubError>(reply(&twin))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Clone, Copy)]
enum Mode {
    Patch,
    Replace,
}

async fn write(
    hub: HubRegistry,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<QueryParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
    mode: Mode,
) -> Result<Response, HubError> {
    let id = path_id(path)?;
    admit(
        &hub,
        &headers,
        query,
        HubRight::ServiceConnect,
        Scope::Device(&id),
    )?;
    crate::model::validate_device_id(&id)?;
    let bytes = read_body(body, MAX_BODY_BYTES).await?;
    let json = parse_json(&bytes)?;
    if let Some(body_id) = json
        .get("deviceId")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
    {
        if !body_id.eq_ignore_ascii_case(&id) {
            return Err(HubError::invalid(format!(
                "the deviceId in the body ('{body_id}') is not the device id in the path ('{id}')"
            )));
        }
    }
    let update = TwinUpdate::from_json(&json)?;
    let if_match = if_match(&headers);
    let twin = match mode {
        Mode::Patch => hub.update_twin(&id, update, &if_match).await?,
        Mode::Replace => hub.replace_twin(&id, update, &if_match).await?,
    };
    Ok(reply(&twin))
}

pub(crate) async fn patch(
    State(hub): State<HubRegistry>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<QueryParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    write(hub, path, query, headers, body, Mode::Patch)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn replace(
    State(hub): State<HubRegistry>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<QueryParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    write(hub, path, query, headers, body, Mode::Replace)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}
