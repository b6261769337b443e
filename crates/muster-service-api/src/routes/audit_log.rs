//! `GET /audit`: the audit log (Muster's extension), oldest first, filtered by
//! `from`/`to` (RFC 3339, `to` exclusive), `policy` and `id`, paged with `x-ms-continuation`
//! like the queries. Needs ServiceConfig: the log shows who administers the service.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use muster_proto::query::HEADER_CONTINUATION;
use muster_proto::{AccessRight, ErrorCode, Timestamp};
use muster_store::audit::{self, AuditEntry, AuditFilter};

use super::generic::admit;
use crate::error::ApiError;
use crate::request::{encode_continuation, json_ok, page_request, QueryParams};
use crate::ServiceApi;

/// Continuation tokens of this route name this scope.
const SCOPE: &str = "audit";
/// Records one request examines at most, whatever the filter (a narrow filter over a long log
/// answers a short page with a continuation rather than reading everything).
const SCAN_LIMIT: usize = 10_000;

pub(super) fn routes() -> Router<ServiceApi> {
    Router::new().route("/audit", get(list))
}

fn time_param(params: &QueryParams, name: &str) -> Result<Option<Timestamp>, ApiError> {
    let Some(v) = params.get(name).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| Some(Timestamp(t.with_timezone(&chrono::Utc))))
        .map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidQuery,
                format!("'{name}' must be an RFC 3339 time such as 2026-12-03T10:00:00Z: {e}"),
            )
        })
}

async fn list(
    State(api): State<ServiceApi>,
    Query(params): Query<QueryParams>,
    mut headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    // `top` is the same as x-ms-max-item-count, for clients that only build URLs.
    if let Some(top) = params.get("top") {
        let value = HeaderValue::from_str(top)
            .map_err(|_| ApiError::new(ErrorCode::InvalidPageSize, "top must be a whole number"))?;
        headers.insert(muster_proto::query::HEADER_MAX_ITEM_COUNT, value);
    }
    let page = page_request(
        &headers,
        SCOPE,
        api.limits.default_page_size,
        api.limits.max_page_size,
    )?;
    let filter = AuditFilter {
        from: time_param(&params, "from")?,
        to: time_param(&params, "to")?,
        policy: params.get("policy").filter(|v| !v.is_empty()).cloned(),
        id: params.get("id").filter(|v| !v.is_empty()).cloned(),
    };
    let found = audit::list(&*api.store, &filter, page.after, page.limit, SCAN_LIMIT).await?;
    let entries: Vec<AuditEntry> = found.entries.into_iter().map(|(_, e)| e).collect();
    let mut resp = json_ok(&entries);
    if let Some(token) = found
        .next_after
        .and_then(|k| HeaderValue::from_str(&encode_continuation(SCOPE, &k)).ok())
    {
        resp.headers_mut().insert(HEADER_CONTINUATION, token);
    }
    Ok(resp)
}
