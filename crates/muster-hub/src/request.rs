//! Request plumbing shared by the hub routes: api-version, If-Match, bodies, JSON replies.

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::{HubError, HubErrorCode};

pub type QueryParams = HashMap<String, String>;

/// The oldest api-version the hub accepts.
pub const MIN_API_VERSION: &str = "2018-06-30";

/// Checks `api-version`: any `YYYY-MM-DD` or `YYYY-MM-DD-preview` that is a real date on or
/// after [`MIN_API_VERSION`]. The SDKs send `2021-04-12` (Python azure-iot-hub 2.7.0, Node
/// azure-iothub 1.16.x, C#), the Azure CLI `2024-03-31`; the registry surface used here has
/// not changed shape across these versions.
pub fn api_version(params: &QueryParams) -> Result<String, HubError> {
    let v = params.get("api-version").ok_or_else(|| {
        HubError::new(
            HubErrorCode::InvalidProtocolVersion,
            "the api-version query parameter is required",
        )
    })?;
    let date = v.strip_suffix("-preview").unwrap_or(v);
    let ok = date.len() == 10
        && chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").is_ok()
        && date >= MIN_API_VERSION;
    if ok {
        Ok(v.clone())
    } else {
        Err(HubError::new(
            HubErrorCode::InvalidProtocolVersion,
            format!(
                "api-version {v:?} is not supported; use a YYYY-MM-DD[-preview] version from {MIN_API_VERSION} on (for example 2021-04-12)"
            ),
        ))
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

/// Reads the body up to `limit` bytes; a larger body is refused with 413, not truncated.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, HubError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let inner = e.into_inner();
        if inner.is::<http_body_util::LengthLimitError>() {
            HubError::new(
                HubErrorCode::MessageTooLarge,
                format!("the request body is larger than the limit of {limit} bytes"),
            )
        } else {
            HubError::new(
                HubErrorCode::IotHubFormatError,
                format!("could not read the request body: {inner}"),
            )
        }
    })
}

/// Parses a JSON body.
pub fn parse_json(bytes: &[u8]) -> Result<serde_json::Value, HubError> {
    serde_json::from_slice(bytes).map_err(|e| {
        HubError::new(
            HubErrorCode::IotHubFormatError,
            format!("the request body is not valid JSON: {e}"),
        )
    })
}

/// A 200 JSON response, with `ETag: "<etag>"` when given.
pub fn json_ok<T: Serialize>(value: &T, etag: Option<&str>) -> Response {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = (StatusCode::OK, bytes).into_response();
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    if let Some(v) = etag.and_then(|e| HeaderValue::from_str(&format!("\"{e}\"")).ok()) {
        h.insert(http::header::ETAG, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: &str) -> QueryParams {
        [("api-version".to_string(), v.to_string())].into()
    }

    #[test]
    fn api_versions() {
        for ok in [
            "2021-04-12",
            "2024-03-31",
            "2018-06-30",
            "2020-06-30-preview",
            "2030-01-01",
        ] {
            api_version(&params(ok)).unwrap();
        }
        for bad in [
            "2018-06-29",
            "2021-4-12",
            "2021-02-30",
            "latest",
            "2021-04-12-beta",
            "",
        ] {
            let e = api_version(&params(bad)).unwrap_err();
            assert_eq!(e.code, HubErrorCode::InvalidProtocolVersion, "{bad}");
        }
        assert!(api_version(&QueryParams::new()).is_err());
    }

    #[test]
    fn if_match_forms() {
        assert_eq!(IfMatch::parse(""), IfMatch::None);
        assert_eq!(IfMatch::parse("\"*\""), IfMatch::Any);
        assert_eq!(IfMatch::parse("*"), IfMatch::Any);
        assert_eq!(IfMatch::parse("\"abc=\""), IfMatch::Etag("abc=".into()));
        assert_eq!(IfMatch::parse("W/\"abc=\""), IfMatch::Etag("abc=".into()));
    }
}
