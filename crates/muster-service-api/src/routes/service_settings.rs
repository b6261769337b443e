//! `/serviceSettings`: Muster's service-API extension for service-wide settings (DPS keeps
//! them in the Azure management plane). Needs `ServiceConfig`.
//!
//! * `GET /serviceSettings` → `{"allocationPolicy": "hashed"}`: the policy enrollments that
//!   set none are allocated with (the server's default until one is saved).
//! * `PUT /serviceSettings` `{"allocationPolicy": "hashed" | "geoLatency" | "static"}` → the
//!   same. `custom` is refused: a custom policy needs a webhook, which only an enrollment
//!   carries. The registration engine reads the setting on its next registration.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use muster_proto::service_settings::{ServiceSettings, SERVICE_SETTINGS_KEY};
use muster_proto::{AccessRight, AllocationPolicy, ErrorCode};
use muster_store::{Collection, Expect, Write};
use serde_json::{json, Value};

use super::generic::admit;
use crate::error::ApiError;
use crate::request::{json_ok, read_body, require_json, QueryParams};
use crate::ServiceApi;

/// The policy shown when none was saved: DPS's default.
const DEFAULT_POLICY: AllocationPolicy = AllocationPolicy::Hashed;

pub(super) fn routes() -> Router<ServiceApi> {
    Router::new().route("/serviceSettings", get(get_settings).put(put_settings))
}

fn answer(settings: &ServiceSettings) -> Response {
    json_ok(&json!({
        "allocationPolicy": settings.allocation_policy.unwrap_or(DEFAULT_POLICY).as_str(),
    }))
}

async fn get_settings(
    State(api): State<ServiceApi>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    let settings = match api
        .store
        .get(Collection::Settings, SERVICE_SETTINGS_KEY)
        .await?
    {
        Some(r) => serde_json::from_value(r.body)
            .map_err(|e| ApiError::internal("reading the service settings", e))?,
        None => ServiceSettings::default(),
    };
    Ok(answer(&settings))
}

async fn put_settings(
    State(api): State<ServiceApi>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    require_json(&headers)?;
    let bytes = read_body(body, api.limits.max_body_bytes).await?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::MalformedBody,
            format!("the body must be {{\"allocationPolicy\": \"hashed\"}}: {e}"),
        )
    })?;
    let text = body
        .get("allocationPolicy")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidField,
                "allocationPolicy: required, one of hashed, geoLatency, static",
            )
        })?;
    let policy = AllocationPolicy::parse(text)
        .map_err(|m| ApiError::new(ErrorCode::InvalidField, format!("allocationPolicy: {m}")))?;
    if policy == AllocationPolicy::Custom {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "allocationPolicy: custom needs a webhook, which only an enrollment carries; \
             choose hashed, geoLatency or static",
        ));
    }
    let settings = ServiceSettings {
        allocation_policy: Some(policy),
    };
    let value = serde_json::to_value(&settings)
        .map_err(|e| ApiError::internal("encoding the service settings", e))?;
    api.store
        .write(vec![Write::put(
            Collection::Settings,
            SERVICE_SETTINGS_KEY,
            Expect::Any,
            value,
        )])
        .await?;
    Ok(answer(&settings))
}
