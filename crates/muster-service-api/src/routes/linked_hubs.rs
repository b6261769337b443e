//! `/linkedHubs`: Muster's service-API extension for the hubs devices may be assigned to
//! (DPS manages them in the Azure management plane). Needs the `ServiceConfig` right. The hub's
//! connection string is accepted but never returned. A new or changed connection string is
//! first checked with a registry read against the hub ([`crate::HubCheck`]) unless the body
//! says `"skipCheck": true`; a failed check is a 400 that says what failed.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use muster_proto::linked_hub::{LinkedHub, LinkedHubInfo, LinkedHubRequest};
use muster_proto::{AccessRight, ConnectionString, ErrorCode};
use muster_store::{Collection, Expect, ListQuery, Write, WriteOutcome};

use super::generic::admit;
use crate::error::ApiError;
use crate::request::Path;
use crate::request::{json_ok, read_body, require_json, QueryParams};
use crate::ServiceApi;

pub(super) fn routes() -> Router<ServiceApi> {
    Router::new().route("/linkedHubs", get(list)).route(
        "/linkedHubs/{name}",
        get(get_one).put(put_one).delete(delete_one),
    )
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::LinkedHubNotFound,
        format!("no linked IoT hub '{name}'"),
    )
}

fn decode(body: serde_json::Value) -> Result<LinkedHub, ApiError> {
    serde_json::from_value(body).map_err(|e| ApiError::internal("reading a linked hub", e))
}

async fn list(
    State(api): State<ServiceApi>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    let mut out: Vec<LinkedHubInfo> = Vec::new();
    let mut after = None;
    loop {
        let page = api
            .store
            .list(
                Collection::LinkedHubs,
                ListQuery {
                    partition: None,
                    after: after.clone(),
                    limit: 500,
                },
            )
            .await?;
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        for r in page {
            out.push(decode(r.body)?.info());
        }
    }
    Ok(json_ok(&out))
}

async fn get_one(
    State(api): State<ServiceApi>,
    Path(name): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    let r = api
        .store
        .get(Collection::LinkedHubs, &LinkedHub::key(&name))
        .await?
        .ok_or_else(|| not_found(&name))?;
    Ok(json_ok(&decode(r.body)?.info()))
}

async fn put_one(
    State(api): State<ServiceApi>,
    Path(name): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    require_json(&headers)?;
    let bytes = read_body(body, api.limits.max_body_bytes).await?;
    let req: LinkedHubRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::MalformedBody,
            format!("the body is not a valid linked hub: {e}"),
        )
    })?;
    let key = LinkedHub::key(&name);
    let existing = api.store.get(Collection::LinkedHubs, &key).await?;
    let (mut hub, expect) = match existing {
        Some(r) => {
            let etag = r.etag.clone();
            (decode(r.body)?, Expect::Etag(etag))
        }
        None => {
            let cs = req.connection_string.clone().ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidField,
                    "connectionString is required to link a new hub",
                )
            })?;
            (
                LinkedHub {
                    name: name.clone(),
                    connection_string: cs,
                    allocation_weight: 1,
                    apply_allocation_policy: true,
                    location: None,
                    max_registrations_per_second: None,
                    built_in: false,
                },
                Expect::Absent,
            )
        }
    };
    if let Some(cs) = req.connection_string {
        let parsed = ConnectionString::parse(&cs).map_err(|e| {
            ApiError::new(ErrorCode::InvalidField, format!("connectionString: {e}"))
        })?;
        if !parsed.host_name.eq_ignore_ascii_case(&name) {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                format!(
                    "connectionString names HostName '{}', not '{name}'",
                    parsed.host_name
                ),
            ));
        }
        if req.skip_check != Some(true) && !hub.built_in {
            if let Some(checker) = &api.hub_check {
                checker.check(&cs).await.map_err(|why| {
                    ApiError::new(
                        ErrorCode::InvalidField,
                        format!(
                            "connectionString: a registry read against hub '{name}' failed \
                             ({why}); give a connection string of a policy with RegistryWrite \
                             and ServiceConnect of a reachable hub, or send \"skipCheck\": true \
                             (`--skip-check`) to link a hub that is not up yet"
                        ),
                    )
                })?;
            }
        }
        hub.connection_string = cs;
    }
    if let Some(w) = req.allocation_weight {
        if !(1..=1000).contains(&w) {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                "allocationWeight must be 1 to 1000",
            ));
        }
        hub.allocation_weight = w;
    }
    if let Some(a) = req.apply_allocation_policy {
        hub.apply_allocation_policy = a;
    }
    if req.location.is_some() {
        hub.location = req.location.filter(|l| !l.trim().is_empty());
    }
    if let Some(r) = req.max_registrations_per_second {
        hub.max_registrations_per_second = (r > 0).then_some(r);
    }
    let body =
        serde_json::to_value(&hub).map_err(|e| ApiError::internal("encoding a linked hub", e))?;
    match api
        .store
        .write(vec![Write::put(Collection::LinkedHubs, key, expect, body)])
        .await?
        .first()
    {
        Some(WriteOutcome::Written { .. }) => Ok(json_ok(&hub.info())),
        _ => Err(ApiError::new(
            ErrorCode::PreconditionFailed,
            format!("linked hub '{name}' changed concurrently; retry"),
        )),
    }
}

async fn delete_one(
    State(api): State<ServiceApi>,
    Path(name): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    let key = LinkedHub::key(&name);
    let r = api
        .store
        .get(Collection::LinkedHubs, &key)
        .await?
        .ok_or_else(|| not_found(&name))?;
    if decode(r.body)?.built_in {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "the built-in hub cannot be unlinked; set applyAllocationPolicy to false to keep new devices off it",
        ));
    }
    api.store
        .write(vec![Write::delete(
            Collection::LinkedHubs,
            key,
            Expect::Etag(r.etag),
        )])
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
