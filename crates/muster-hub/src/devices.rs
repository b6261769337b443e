//! `/devices`: device identities.
//!
//! | Method | Path | Right | Success | Failures |
//! |---|---|---|---|---|
//! | PUT | `/devices/{id}` | RegistryWrite | 200 Device | 400, 401, 409 (exists, no If-Match), 412, 413 |
//! | GET | `/devices/{id}` | RegistryRead | 200 Device | 400, 401, 404 |
//! | DELETE | `/devices/{id}` | RegistryWrite | 204 | 400, 401, 404, 412 |
//! | GET | `/devices`, `/devices/` (Node) | RegistryRead | 200 [Device] | 400, 401 |

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::auth::{HubRight, Scope};
use crate::error::HubError;
use crate::model::DeviceInput;
use crate::registry::{HubRegistry, MAX_BODY_BYTES};
use crate::request::{if_match, json_ok, parse_json, read_body, QueryParams};
use crate::routes::{admit, path_id};

pub(crate) async fn put(
    State(hub): State<HubRegistry>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<QueryParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let id = path_id(path)?;
        admit(
            &hub,
            &headers,
            query,
            HubRight::RegistryWrite,
            Scope::Device(&id),
        )?;
        crate::model::validate_device_id(&id)?;
        let bytes = read_body(body, MAX_BODY_BYTES).await?;
        let mut input = DeviceInput::from_json(parse_json(&bytes)?)?;
        if input.device_id.is_empty() {
            input.device_id = id.clone();
        } else if !input.device_id.eq_ignore_ascii_case(&id) {
            return Err(HubError::invalid(format!(
                "the deviceId in the body ('{}') is not the device id in the path ('{id}')",
                input.device_id
            )));
        }
        let device = hub
            .create_or_update_device(input, &if_match(&headers))
            .await?;
        Ok(json_ok(&device, Some(&device.etag)))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
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
            HubRight::RegistryRead,
            Scope::Device(&id),
        )?;
        let device = hub.get_device(&id).await?;
        Ok::<_, HubError>(json_ok(&device, Some(&device.etag)))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn delete(
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
            HubRight::RegistryWrite,
            Scope::Device(&id),
        )?;
        hub.delete_device(&id, &if_match(&headers)).await?;
        Ok::<_, HubError>(StatusCode::NO_CONTENT.into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn list(
    State(hub): State<HubRegistry>,
    query: Result<Query<QueryParams>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let params = admit(
            &hub,
            &headers,
            query,
            HubRight::RegistryRead,
            Scope::Devices,
        )?;
        let top = match params.get("top").map(|t| t.trim()) {
            None | Some("") => None,
            Some(t) => Some(t.parse::<i64>().map_err(|_| {
                HubError::invalid(format!("top must be a whole number, not {t:?}"))
            })?),
        };
        let devices = hub.list_devices(top).await?;
        Ok::<_, HubError>(json_ok(&devices, None))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
