//! `/accessPolicies`: Muster's service-API extension for shared access policies (DPS manages
//! them in the Azure management plane). Needs `ServiceConfig`. Keys are generated here, shown
//! once by `PUT` and afterwards only by `POST /accessPolicies/{name}/keys`. The owner policy
//! cannot be deleted or lose `ServiceConfig`, so the service can't be locked out.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_proto::runtime::random_bytes;
use muster_proto::{AccessRight, AccessRights, ErrorCode};
use muster_store::{Collection, Expect, Write, WriteOutcome};
use serde::{Deserialize, Serialize};

use super::generic::admit;
use crate::auth::AccessPolicy;
use crate::error::ApiError;
use crate::request::Path;
use crate::request::{json_ok, read_body, require_json, QueryParams};
use crate::ServiceApi;

/// The settings key the policies live under (sealed at rest by the store).
pub const POLICIES_KEY: &str = "access_policies";
/// The policy every service starts with.
pub const OWNER_POLICY: &str = "provisioningserviceowner";

pub(super) fn routes() -> Router<ServiceApi> {
    Router::new()
        .route("/accessPolicies", get(list))
        .route(
            "/accessPolicies/{name}",
            get(get_one).put(put_one).delete(delete_one),
        )
        .route("/accessPolicies/{name}/keys", post(keys))
        .route("/accessPolicies/{name}/regenerateKey", post(regenerate_key))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegenerateRequest {
    key_type: String,
}

/// A policy as listed: no keys.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PolicyInfo {
    key_name: String,
    rights: AccessRights,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicyRequest {
    rights: String,
}

fn info(p: &AccessPolicy) -> PolicyInfo {
    PolicyInfo {
        key_name: p.key_name.clone(),
        rights: p.rights.clone(),
    }
}

async fn load(api: &ServiceApi) -> Result<(Vec<AccessPolicy>, String), ApiError> {
    let r = api
        .store
        .get(Collection::Settings, POLICIES_KEY)
        .await?
        .ok_or_else(|| ApiError::internal("reading access policies", "missing"))?;
    let policies = serde_json::from_value(r.body)
        .map_err(|e| ApiError::internal("reading access policies", e))?;
    Ok((policies, r.etag))
}

async fn save(api: &ServiceApi, policies: Vec<AccessPolicy>, etag: String) -> Result<(), ApiError> {
    let body = serde_json::to_value(&policies)
        .map_err(|e| ApiError::internal("encoding access policies", e))?;
    let outcome = api
        .store
        .write(vec![Write::put(
            Collection::Settings,
            POLICIES_KEY,
            Expect::Etag(etag),
            body,
        )])
        .await?;
    match outcome.first() {
        Some(WriteOutcome::Written { .. }) => {
            api.auth.set_policies(policies);
            Ok(())
        }
        _ => Err(ApiError::new(
            ErrorCode::PreconditionFailed,
            "access policies changed concurrently; retry",
        )),
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no shared access policy '{name}'"),
    )
}

fn valid_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidField,
            "a policy name has 1 to 64 letters, digits, '-', '_' or '.'",
        ))
    }
}

async fn list(
    State(api): State<ServiceApi>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    let (policies, _) = load(&api).await?;
    Ok(json_ok(&policies.iter().map(info).collect::<Vec<_>>()))
}

async fn get_one(
    State(api): State<ServiceApi>,
    Path(name): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    let (policies, _) = load(&api).await?;
    let p = policies
        .iter()
        .find(|p| p.key_name == name)
        .ok_or_else(|| not_found(&name))?;
    Ok(json_ok(&info(p)))
}

/// Creates a policy with fresh keys (returned once) or changes an existing policy's rights.
async fn put_one(
    State(api): State<ServiceApi>,
    Path(name): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    valid_name(&name)?;
    require_json(&headers)?;
    let bytes = read_body(body, api.limits.max_body_bytes).await?;
    let req: PolicyRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::MalformedBody,
            format!("the body must be {{\"rights\": \"EnrollmentRead, ...\"}}: {e}"),
        )
    })?;
    let rights = AccessRights::parse(&req.rights)
        .map_err(|m| ApiError::new(ErrorCode::InvalidField, format!("rights: {m}")))?;
    if rights == AccessRights::default() {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "rights: name at least one right",
        ));
    }
    if name == OWNER_POLICY && !rights.contains(AccessRight::ServiceConfig) {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "the owner policy keeps ServiceConfig, so the service can't be locked out",
        ));
    }
    let (mut policies, etag) = load(&api).await?;
    let policy = match policies.iter_mut().find(|p| p.key_name == name) {
        Some(p) => {
            p.rights = rights;
            p.clone()
        }
        None => {
            let key = |api: &ServiceApi| B64.encode(random_bytes::<32>(&*api.entropy));
            let p = AccessPolicy {
                key_name: name.clone(),
                primary_key: key(&api),
                secondary_key: key(&api),
                rights,
            };
            policies.push(p.clone());
            p
        }
    };
    save(&api, policies, etag).await?;
    Ok(json_ok(&policy))
}

/// The policy's keys (the only read path that shows them).
async fn keys(
    State(api): State<ServiceApi>,
    Path(name): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    let (policies, _) = load(&api).await?;
    let p = policies
        .into_iter()
        .find(|p| p.key_name == name)
        .ok_or_else(|| not_found(&name))?;
    Ok(json_ok(&p))
}

/// `POST /accessPolicies/{name}/regenerateKey` `{"keyType": "primary"|"secondary"}`: a fresh
/// random key replaces that one (the other keeps working, so clients can roll over); answers
/// the policy with both keys, as `POST …/keys` does.
async fn regenerate_key(
    State(api): State<ServiceApi>,
    Path(name): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    require_json(&headers)?;
    let bytes = read_body(body, api.limits.max_body_bytes).await?;
    let req: RegenerateRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::MalformedBody,
            format!("the body must be {{\"keyType\": \"primary\" or \"secondary\"}}: {e}"),
        )
    })?;
    let (mut policies, etag) = load(&api).await?;
    let p = policies
        .iter_mut()
        .find(|p| p.key_name == name)
        .ok_or_else(|| not_found(&name))?;
    let key = B64.encode(random_bytes::<32>(&*api.entropy));
    match req.key_type.to_ascii_lowercase().as_str() {
        "primary" => p.primary_key = key,
        "secondary" => p.secondary_key = key,
        other => {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                format!("keyType: '{other}' is neither primary nor secondary"),
            ))
        }
    }
    let policy = p.clone();
    save(&api, policies, etag).await?;
    Ok(json_ok(&policy))
}

async fn delete_one(
    State(api): State<ServiceApi>,
    Path(name): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    if name == OWNER_POLICY {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "the owner policy can't be deleted, so the service can't be locked out",
        ));
    }
    let (mut policies, etag) = load(&api).await?;
    let before = policies.len();
    policies.retain(|p| p.key_name != name);
    if policies.len() == before {
        return Err(not_found(&name));
    }
    save(&api, policies, etag).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
