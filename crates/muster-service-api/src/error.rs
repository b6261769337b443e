//! [`ApiError`]: every failure of the service API, mapped once to the DPS error body.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use muster_proto::{ErrorBody, ErrorCode, Timestamp};

/// A failed request: the code says which check failed, the message says how, in words that
/// never include secrets.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        if let Some(suppressed) = INTERNAL_ERROR_LOG.admit() {
            tracing::error!(%err, suppressed, "{context}");
        }
        Self::new(
            ErrorCode::Internal,
            format!("internal error while {context}"),
        )
    }
}

impl From<muster_store::StoreError> for ApiError {
    fn from(e: muster_store::StoreError) -> Self {
        if e.is_unavailable() {
            if let Some(suppressed) = STORE_UNAVAILABLE_LOG.admit() {
                tracing::warn!(error = %e, suppressed, "store unavailable; service API answers 503");
            }
            return ApiError::new(
                ErrorCode::StoreUnavailable,
                "Muster's store is temporarily unavailable; retry after the time in Retry-After",
            );
        }
        ApiError::internal("accessing the store", e)
    }
}

/// A full disk fails every request: one warning per interval, with the count held back.
static STORE_UNAVAILABLE_LOG: muster_proto::log_limit::LogLimiter =
    muster_proto::log_limit::LogLimiter::new(std::time::Duration::from_secs(10));

/// An internal error repeats on every request that meets it: one line per interval.
static INTERNAL_ERROR_LOG: muster_proto::log_limit::LogLimiter =
    muster_proto::log_limit::LogLimiter::new(std::time::Duration::from_secs(10));

/// `Retry-After` (seconds) on 503 answers.
pub const UNAVAILABLE_RETRY_AFTER_SECS: u32 = 5;

/// Renders the DPS error body. Tracking ids and the timestamp are diagnostics only, so they
/// come from the system clock and random source rather than the injected ones.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error_code: self.code.code(),
            tracking_id: tracking_id(),
            message: self.message,
            info: None,
            timestamp_utc: Timestamp(chrono::Utc::now()).to_dps_string(),
        };
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, crate::json_response_body(&body)).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        if let Ok(v) = HeaderValue::from_str(&self.code.code().to_string()) {
            headers.insert("x-ms-error-code", v);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(UNAVAILABLE_RETRY_AFTER_SECS),
            );
        }
        resp
    }
}

fn tracking_id() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
