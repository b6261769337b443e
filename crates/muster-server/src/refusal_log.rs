//! A debug line for every refused HTTPS request: routing's 404 and 405, extractor rejections
//! (400), failed checks of every API, 503s. One layer around the whole HTTPS app sees them
//! all, whichever router or extractor refused.
//!
//! The line carries the method, the path (never the query), the status, and from a DPS error
//! body its `errorCode` and `message` (the check that failed; messages never hold secrets),
//! else the start of a plain-text body. Only computed when debug is enabled for this module:
//! the error body is read and put back then.

use axum::body::Body;
use axum::body::HttpBody as _;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use serde_json::Value;

/// Error bodies are small; a body larger than this (or of unknown size) is not read.
const MAX_LOGGED_BODY: u64 = 16 * 1024;
/// How much of a plain-text error body the line quotes.
const MAX_QUOTED_CHARS: usize = 200;

pub async fn log_refusals(req: Request, next: Next) -> Response {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let small = body
        .size_hint()
        .upper()
        .is_some_and(|n| n <= MAX_LOGGED_BODY);
    if !small {
        tracing::debug!(%method, path, status = status.as_u16(), "request refused");
        return Response::from_parts(parts, body);
    }
    let bytes = match axum::body::to_bytes(body, MAX_LOGGED_BODY as usize).await {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(%method, path, status = status.as_u16(), error = %e, "request refused; its body could not be read");
            return Response::from_parts(parts, Body::empty());
        }
    };
    let (error_code, check) = describe(&bytes);
    tracing::debug!(
        %method,
        path,
        status = status.as_u16(),
        error_code,
        check,
        "request refused"
    );
    Response::from_parts(parts, Body::from(bytes))
}

/// The DPS error code (0 when the body has none) and the failed check a body describes.
fn describe(body: &[u8]) -> (u64, String) {
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) {
        let code = ["errorCode", "ErrorCode"]
            .iter()
            .find_map(|k| map.get(*k).and_then(Value::as_u64))
            .unwrap_or(0);
        let message = ["message", "Message"]
            .iter()
            .find_map(|k| map.get(*k).and_then(Value::as_str))
            .unwrap_or_default();
        return (code, message.to_string());
    }
    let text = String::from_utf8_lossy(body);
    (0, text.chars().take(MAX_QUOTED_CHARS).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dps_error_body_gives_its_code_and_message_and_text_is_quoted() {
        let body = br#"{"errorCode":401003,"trackingId":"t","message":"token expired","timestampUtc":"x"}"#;
        assert_eq!(describe(body), (401003, "token expired".to_string()));
        assert_eq!(
            describe(b"Failed to parse the request body as JSON"),
            (0, "Failed to parse the request body as JSON".to_string())
        );
    }
}
