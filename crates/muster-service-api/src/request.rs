//! Request plumbing shared by every route: path parameters, api-version, bodies, If-Match and
//! paging.

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use muster_proto::query::{HEADER_CONTINUATION, HEADER_ITEM_TYPE, HEADER_MAX_ITEM_COUNT};
use muster_proto::{ApiVersion, ErrorCode, ItemType, QuerySpecification};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;

pub type QueryParams = HashMap<String, String>;

/// axum's `Path` with its rejection (a segment that percent-decodes to invalid UTF-8) in the
/// DPS error shape, 400 / 400015; axum's own answer is plain text. Found by fuzzing.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(ApiError::new(
                ErrorCode::InvalidField,
                format!("the request path is malformed: {}", rejection.body_text()),
            )),
        }
    }
}

/// The request's `api-version`, which must be one Muster speaks.
pub fn api_version(params: &QueryParams) -> Result<ApiVersion, ApiError> {
    let v = params.get("api-version").ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidApiVersion,
            "the api-version query parameter is required",
        )
    })?;
    ApiVersion::parse(v).map_err(|m| ApiError::new(ErrorCode::InvalidApiVersion, m))
}

/// Reads the body up to `limit` bytes; a larger body is refused with 413, not truncated.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let inner = e.into_inner();
        if inner.is::<http_body_util::LengthLimitError>() {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the request body is larger than the limit of {limit} bytes"),
            )
        } else {
            ApiError::new(
                ErrorCode::MalformedBody,
                format!("could not read the request body: {inner}"),
            )
        }
    })
}

/// Refuses bodies that declare a non-JSON content type (a missing one is fine: Node and
/// Python send some requests without it).
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers.get(http::header::CONTENT_TYPE) {
        None => Ok(()),
        Some(v) => {
            let ct = v.to_str().unwrap_or("").to_ascii_lowercase();
            if ct.starts_with("application/json") || ct.is_empty() {
                Ok(())
            } else {
                Err(ApiError::new(
                    ErrorCode::UnsupportedMediaType,
                    format!("Content-Type {ct:?} is not supported; send application/json"),
                ))
            }
        }
    }
}

/// Parses a JSON body into a `serde_json::Value` object.
pub fn parse_json_object(
    bytes: &[u8],
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::MalformedBody,
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    match v {
        serde_json::Value::Object(m) => Ok(m),
        other => Err(ApiError::new(
            ErrorCode::MalformedBody,
            format!(
                "the request body must be a JSON object, not {}",
                json_kind(&other)
            ),
        )),
    }
}

pub fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

pub use muster_proto::IfMatch;

/// The request's `If-Match`.
pub fn if_match(headers: &HeaderMap) -> IfMatch {
    IfMatch::from_header(
        headers
            .get(http::header::IF_MATCH)
            .and_then(|v| v.to_str().ok()),
    )
}

/// A 200 JSON response.
pub fn json_ok<T: Serialize>(value: &T) -> Response {
    let mut resp = (StatusCode::OK, crate::json_response_body(value)).into_response();
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// A page request: `x-ms-max-item-count` and `x-ms-continuation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub limit: usize,
    pub after: Option<String>,
}

/// Continuation tokens are opaque to clients: `v1`, the scope they belong to (so a token from
/// one query can't be replayed on another) and the last key returned.
pub fn page_request(
    headers: &HeaderMap,
    scope: &str,
    default_size: usize,
    max_size: usize,
) -> Result<PageRequest, ApiError> {
    let limit = match headers.get(HEADER_MAX_ITEM_COUNT) {
        None => default_size,
        Some(v) => {
            let n: i64 = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::InvalidPageSize,
                        "x-ms-max-item-count must be a whole number",
                    )
                })?;
            if n <= 0 {
                // The CLI sends its remaining --top, never 0; a non-positive count means "default".
                default_size
            } else {
                (n as usize).min(max_size)
            }
        }
    };
    let after = match headers
        .get(HEADER_CONTINUATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        None => None,
        Some(token) => Some(decode_continuation(token, scope)?),
    };
    Ok(PageRequest { limit, after })
}

/// Splits a fetched `limit + 1` rows into the page and the continuation token (present only
/// when there was a further row).
pub fn paginate<T>(
    mut rows: Vec<T>,
    page: &PageRequest,
    scope: &str,
    key_of: impl Fn(&T) -> Option<String>,
) -> (Vec<T>, Option<String>) {
    let more = rows.len() > page.limit;
    rows.truncate(page.limit);
    let continuation = if more {
        rows.last()
            .and_then(key_of)
            .map(|k| encode_continuation(scope, &k))
    } else {
        None
    };
    (rows, continuation)
}

pub fn encode_continuation(scope: &str, last_key: &str) -> String {
    B64URL.encode(format!("v1\n{scope}\n{last_key}"))
}

fn decode_continuation(token: &str, scope: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::new(
            ErrorCode::InvalidContinuationToken,
            "x-ms-continuation is not a continuation token this query returned",
        )
    };
    let raw = B64URL.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let mut parts = text.splitn(3, '\n');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("v1"), Some(s), Some(key)) if s == scope => Ok(key.to_string()),
        _ => Err(bad()),
    }
}

/// A page of results: always a JSON array, `x-ms-item-type` always, `x-ms-continuation` only
/// when another page exists (C# loops forever on an empty one).
pub fn page_response<T: Serialize>(
    items: &[T],
    item_type: ItemType,
    continuation: Option<String>,
) -> Response {
    let mut resp = json_ok(&items);
    let h = resp.headers_mut();
    h.insert(
        HEADER_ITEM_TYPE,
        HeaderValue::from_static(item_type.as_str()),
    );
    if let Some(c) = continuation.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(HEADER_CONTINUATION, c);
    }
    resp
}

/// Checks an optional QuerySpecification body against the query forms Muster accepts
/// (`muster_proto::query`). Anything else is refused rather than silently ignored.
pub fn check_query_body(bytes: &[u8]) -> Result<(), ApiError> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(());
    }
    let spec: QuerySpecification = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::MalformedBody,
            format!("the body must be a query specification {{\"query\": \"SELECT *\"}}: {e}"),
        )
    })?;
    spec.check()
        .map_err(|e| ApiError::new(ErrorCode::InvalidQuery, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(if_match(&h), IfMatch::None);
        h.insert(http::header::IF_MATCH, "\"*\"".parse().unwrap());
        assert_eq!(if_match(&h), IfMatch::Any);
        h.insert(http::header::IF_MATCH, "\"abc=\"".parse().unwrap());
        assert_eq!(if_match(&h), IfMatch::Etag("abc=".into()));
        h.insert(http::header::IF_MATCH, "W/\"abc=\"".parse().unwrap());
        assert_eq!(if_match(&h), IfMatch::Etag("abc=".into()));
        h.insert(http::header::IF_MATCH, "abc=".parse().unwrap());
        assert_eq!(if_match(&h), IfMatch::Etag("abc=".into()));
    }

    #[test]
    fn continuation_is_scoped() {
        let t = encode_continuation("enrollments", "dev-9");
        let mut h = HeaderMap::new();
        h.insert(HEADER_CONTINUATION, t.parse().unwrap());
        h.insert(HEADER_MAX_ITEM_COUNT, "10".parse().unwrap());
        let p = page_request(&h, "enrollments", 100, 1000).unwrap();
        assert_eq!(
            p,
            PageRequest {
                limit: 10,
                after: Some("dev-9".into())
            }
        );
        let e = page_request(&h, "registrations:g1", 100, 1000).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidContinuationToken);
        h.insert(HEADER_MAX_ITEM_COUNT, "5000".parse().unwrap());
        assert_eq!(
            page_request(&h, "enrollments", 100, 1000).unwrap().limit,
            1000
        );
        h.insert(HEADER_MAX_ITEM_COUNT, "ten".parse().unwrap());
        assert_eq!(
            page_request(&h, "enrollments", 100, 1000).unwrap_err().code,
            ErrorCode::InvalidPageSize
        );
    }

    #[test]
    fn query_bodies() {
        check_query_body(b"").unwrap();
        check_query_body(br#"{"query":"SELECT *"}"#).unwrap();
        check_query_body(br#"{"query":"select  * from enrollments"}"#).unwrap();
        check_query_body(br#"{"query":"*"}"#).unwrap();
        assert_eq!(
            check_query_body(br#"{"query":"SELECT * WHERE x = 1"}"#)
                .unwrap_err()
                .code,
            ErrorCode::InvalidQuery
        );
        assert_eq!(
            check_query_body(b"{").unwrap_err().code,
            ErrorCode::MalformedBody
        );
    }
}
