//! The device HTTPS API (device-protocol.md §2):
//! `PUT /{idScope}/registrations/{registrationId}/register` and
//! `GET /{idScope}/registrations/{registrationId}/operations/{operationId}`.
//!
//! The SAS token comes from `Authorization`; without one, an X.509 device is identified by the
//! TLS client chain the listener attaches as a [`ClientCertChain`] request extension. The body is optional (Node polls with `{}`, C#
//! MQTT sends nothing); every answer is JSON with `retry-after` when the device should wait.

use std::sync::Arc;

use crate::websocket::ClientCertChain;
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Extension;
use axum::Router;
use muster_proto::device::DeviceRegistration;
use muster_proto::{ErrorBody, ErrorCode, Timestamp};
use muster_registration::{
    DeviceCredential, DeviceRegistrar, DeviceReply, RegisterRequest, StatusRequest, Transport,
};

/// Largest register body (DPS allows 96 KB messages).
pub const MAX_BODY_BYTES: usize = 128 * 1024;

/// The device API routes; merge into the HTTPS router.
pub fn router(registrar: Arc<dyn DeviceRegistrar>) -> Router {
    Router::new()
        .route(
            "/{id_scope}/registrations/{registration_id}/register",
            put(register),
        )
        .route(
            "/{id_scope}/registrations/{registration_id}/operations/{operation_id}",
            get(operation_status),
        )
        .with_state(registrar)
}

/// The `Authorization` header's SAS token, else the TLS client chain, else nothing.
fn credential(headers: &HeaderMap, certs: Option<Extension<ClientCertChain>>) -> DeviceCredential {
    match headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        Some(t) if !t.trim().is_empty() => DeviceCredential::Sas(t.to_string()),
        _ => match certs {
            Some(Extension(ClientCertChain(chain))) if !chain.is_empty() => {
                DeviceCredential::X509 { chain }
            }
            _ => DeviceCredential::None,
        },
    }
}

/// Writes a [`DeviceReply`] as HTTP.
pub fn reply_response(reply: DeviceReply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(&reply.body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    if let Some(r) = reply.retry_after {
        if let Ok(v) = HeaderValue::from_str(&r.to_string()) {
            h.insert("retry-after", v);
        }
    }
    resp
}

fn bad_request(code: ErrorCode, message: String) -> Response {
    let body = ErrorBody {
        error_code: code.code(),
        tracking_id: String::new(),
        message,
        info: None,
        timestamp_utc: Timestamp(chrono_now()).to_dps_string(),
    };
    reply_response(DeviceReply {
        status: code.status(),
        retry_after: None,
        body: serde_json::to_value(&body).unwrap_or_default(),
    })
}

fn chrono_now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

/// The `api-version` of a query string (key matched ignoring case, value percent-decoded).
fn api_version(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.eq_ignore_ascii_case("api-version").then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// Parses a register body; empty means "no fields".
pub fn parse_registration(bytes: &[u8]) -> Result<DeviceRegistration, String> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(DeviceRegistration::default());
    }
    serde_json::from_slice(bytes).map_err(|e| format!("the register body is not valid JSON: {e}"))
}

/// A path segment that does not percent-decode to UTF-8 is refused in the DPS error shape
/// (axum's own rejection is plain text).
fn malformed_path(rejection: PathRejection) -> Response {
    bad_request(
        ErrorCode::InvalidField,
        format!("the request path is malformed: {}", rejection.body_text()),
    )
}

async fn register(
    State(registrar): State<Arc<dyn DeviceRegistrar>>,
    path: Result<Path<(String, String)>, PathRejection>,
    certs: Option<Extension<ClientCertChain>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Path((id_scope, registration_id)) = match path {
        Ok(p) => p,
        Err(rejection) => return malformed_path(rejection),
    };
    let bytes: Bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return bad_request(
                ErrorCode::PayloadTooLarge,
                format!("the register body is larger than {MAX_BODY_BYTES} bytes"),
            )
        }
    };
    let registration = match parse_registration(&bytes) {
        Ok(r) => r,
        Err(m) => return bad_request(ErrorCode::MalformedBody, m),
    };
    let reply = registrar
        .register(RegisterRequest {
            id_scope,
            registration_id,
            credential: credential(&headers, certs),
            body: registration,
            transport: Transport::Https,
            api_version: query.as_deref().and_then(api_version),
        })
        .await;
    reply_response(reply)
}

async fn operation_status(
    State(registrar): State<Arc<dyn DeviceRegistrar>>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    certs: Option<Extension<ClientCertChain>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Path((id_scope, registration_id, operation_id)) = match path {
        Ok(p) => p,
        Err(rejection) => return malformed_path(rejection),
    };
    // Node polls with `{}`; a body is read only to refuse a `csr` in it.
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return bad_request(
            ErrorCode::PayloadTooLarge,
            format!("the operation status body is larger than {MAX_BODY_BYTES} bytes"),
        );
    };
    let reply = registrar
        .operation_status(StatusRequest {
            id_scope,
            registration_id,
            operation_id,
            credential: credential(&headers, certs),
            csr_sent: muster_registration::body_names_csr(&bytes),
        })
        .await;
    reply_response(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_prefers_the_token_then_the_chain() {
        let chain = || Some(Extension(ClientCertChain(vec![vec![1], vec![2]])));
        let mut h = HeaderMap::new();
        assert_eq!(credential(&h, None), DeviceCredential::None);
        assert_eq!(
            credential(&h, Some(Extension(ClientCertChain(Vec::new())))),
            DeviceCredential::None
        );
        assert_eq!(
            credential(&h, chain()),
            DeviceCredential::X509 {
                chain: vec![vec![1], vec![2]]
            }
        );
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("SharedAccessSignature sr=x"),
        );
        assert_eq!(
            credential(&h, chain()),
            DeviceCredential::Sas("SharedAccessSignature sr=x".into())
        );
    }

    /// Found by the `http_device` fuzz target: a path segment that percent-decodes to
    /// invalid UTF-8 got axum's plain-text 400 instead of the DPS error shape.
    #[tokio::test]
    async fn malformed_path_answers_in_the_dps_shape() {
        use tower::ServiceExt;

        struct NeverCalled;
        #[async_trait::async_trait]
        impl DeviceRegistrar for NeverCalled {
            async fn register(&self, _: RegisterRequest) -> DeviceReply {
                panic!("a malformed path must not reach the registrar")
            }
            async fn operation_status(&self, _: StatusRequest) -> DeviceReply {
                panic!("a malformed path must not reach the registrar")
            }
        }

        for (method, uri) in [
            ("PUT", "/0ne00000A0A/registrations/hh%%ab%22e/register"),
            ("GET", "/0ne00000A0A/registrations/dev-1/operations/%FF"),
        ] {
            let req = http::Request::builder()
                .method(method)
                .uri(uri)
                .body(Body::empty())
                .unwrap();
            let resp = router(Arc::new(NeverCalled)).oneshot(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{uri}");
            let body = axum::body::to_bytes(resp.into_body(), 4096).await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["errorCode"], 400015, "{v}");
            assert!(
                v["message"].as_str().unwrap().contains("Invalid UTF-8"),
                "{v}"
            );
            assert!(v["timestampUtc"].is_string(), "{v}");
        }
    }
}
