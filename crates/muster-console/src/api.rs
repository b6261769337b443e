//! In-process calls into Muster's own APIs.
//!
//! [`Console::service`] sends a request to the service API router with a SAS token minted from
//! the session's policy and key (`sr` = the service host, five minutes of validity by the
//! injected clock), so the API decides rights and validation exactly as for any SDK.
//! [`Console::hub`] calls the built-in hub's REST router with a token of the hub's
//! `iothubowner` policy; pages that use it first require the signed-in policy to hold
//! [`HUB_RIGHT`].

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_proto::audit::{AuditEntry, AuditSource};
use muster_proto::{AccessRight, ErrorCode, SasToken};
use muster_service_api::audit::FromConsole;
use serde_json::Value;
use tower::ServiceExt;

use crate::session::Session;
use crate::Console;

/// The api-version the console sends to the service API.
pub const SERVICE_API_VERSION: &str = "2021-10-01";
/// The api-version the console sends to the hub.
pub const HUB_API_VERSION: &str = "2021-04-12";
/// The service right the built-in hub pages need: they act with the hub's owner key, so only
/// an administrator of the DPS (who can already see every linked hub) may use them.
pub const HUB_RIGHT: AccessRight = AccessRight::ServiceConfig;
/// How long minted tokens live.
const TOKEN_TTL_SECS: i64 = 300;

/// A successful answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    /// `x-ms-continuation`, when there is a next page.
    pub fn continuation(&self) -> Option<String> {
        self.headers
            .get(muster_proto::query::HEADER_CONTINUATION)
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }
}

/// A refusal, as the API described it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub status: u16,
    /// The DPS `errorCode` (or the hub's `ErrorCode:` name).
    pub code: Option<String>,
    pub message: String,
}

impl Failure {
    pub fn code_num(&self) -> u64 {
        self.code
            .as_deref()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    pub fn is_not_found(&self) -> bool {
        self.status == 404
    }

    /// The HTTP status a page showing this failure answers with.
    pub fn status_code(&self) -> axum::http::StatusCode {
        axum::http::StatusCode::from_u16(self.status)
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// One line for the user.
    pub fn text(&self) -> String {
        match &self.code {
            Some(c) => format!("{} (error {c})", self.message),
            None => self.message.clone(),
        }
    }

    fn local(message: impl Into<String>) -> Self {
        Failure {
            status: 500,
            code: None,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

impl Console {
    /// The Authorization header value for the session's policy.
    pub(crate) fn service_token(&self, s: &Session) -> String {
        let key = B64.decode(s.key.as_bytes()).unwrap_or_default();
        SasToken::generate(
            &self.config().service_host,
            &key,
            Some(&s.policy),
            self.now_unix() + TOKEN_TTL_SECS,
        )
    }

    /// Whether the session's policy (still) holds `right`, judged by the service API's own
    /// Authorizer on a freshly minted token.
    pub fn has_right(&self, s: &Session, right: AccessRight) -> Result<(), Failure> {
        let mut h = HeaderMap::new();
        if let Ok(v) = self.service_token(s).parse() {
            h.insert(http::header::AUTHORIZATION, v);
        }
        self.api()
            .auth
            .authorize(&h, right, self.now_unix())
            .map(|_| ())
            .map_err(|e| Failure {
                status: e.code.status(),
                code: Some(e.code.code().to_string()),
                message: e.message,
            })
    }

    /// Calls the service API. `path` may carry a query string (without api-version); `extra`
    /// are more headers. The request says it comes from the console (an in-process request
    /// extension the audit log reads; no network client can set it).
    pub async fn service(
        &self,
        s: &Session,
        method: Method,
        path: &str,
        body: Option<&Value>,
        extra: &[(&str, String)],
    ) -> Result<Reply, Failure> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let uri = format!("{path}{sep}api-version={SERVICE_API_VERSION}");
        let token = self.service_token(s);
        let router = self.inner.service.clone();
        let from = FromConsole {
            policy: s.policy.clone(),
        };
        call(router, method, &uri, token, body, extra, from).await
    }

    /// Deprovisions one registration (record and hub device) for a cascade delete, through
    /// the engine rather than the service API router, and records it in the audit log as the
    /// console's `POST /deprovisions/{id}` would be (200, or 404 with 404203 when there was no
    /// record, or 500 when it stopped).
    pub(crate) async fn deprovision(
        &self,
        s: &Session,
        registration_id: &str,
    ) -> Result<Option<usize>, String> {
        let result = self.inner.remover.deprovision(registration_id).await;
        let (status, error_code) = match &result {
            Ok(Some(_)) => (200, None),
            Ok(None) => (
                404,
                Some(ErrorCode::RegistrationNotFound.code().to_string()),
            ),
            Err(_) => (500, None),
        };
        let api = self.api();
        let entry = AuditEntry {
            time: api.clock.now(),
            policy: Some(s.policy.clone()),
            source: AuditSource::Console,
            method: "POST".into(),
            route: "/deprovisions/{id}".into(),
            id: Some(registration_id.to_string()),
            status,
            error_code,
        };
        if let Err(e) = muster_store::audit::append(&*api.store, &entry, &*api.entropy).await {
            tracing::warn!(error = %e, "could not write the audit entry of a console deprovision");
        }
        result
    }

    /// Calls the built-in hub's REST API with its owner policy, on behalf of the session's
    /// policy (which the audit log names). `path_query` may carry a query string (without
    /// api-version).
    pub async fn hub(
        &self,
        s: &Session,
        method: Method,
        path_query: &str,
    ) -> Result<Reply, Failure> {
        let hub = &self.inner.hub;
        let policy = hub
            .authorizer()
            .policies()
            .iter()
            .find(|p| {
                p.rights.contains(muster_hub::HubRight::RegistryWrite)
                    && p.rights.contains(muster_hub::HubRight::ServiceConnect)
            })
            .cloned()
            .ok_or_else(|| Failure::local("the built-in hub has no owner policy"))?;
        let key = B64
            .decode(policy.primary_key.as_bytes())
            .map_err(|_| Failure::local("the built-in hub's owner key is not base64"))?;
        let token = SasToken::generate(
            hub.host_name(),
            &key,
            Some(&policy.key_name),
            self.now_unix() + TOKEN_TTL_SECS,
        );
        let sep = if path_query.contains('?') { '&' } else { '?' };
        let uri = format!("{path_query}{sep}api-version={HUB_API_VERSION}");
        call(
            self.inner.hub_router.clone(),
            method,
            &uri,
            token,
            None,
            &[],
            FromConsole {
                policy: s.policy.clone(),
            },
        )
        .await
    }
}

async fn call(
    router: axum::Router,
    method: Method,
    uri: &str,
    token: String,
    body: Option<&Value>,
    extra: &[(&str, String)],
    from: FromConsole,
) -> Result<Reply, Failure> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(uri)
        .header(http::header::AUTHORIZATION, token);
    let body = match body {
        Some(v) => {
            b = b.header(http::header::CONTENT_TYPE, "application/json");
            Body::from(serde_json::to_vec(v).unwrap_or_default())
        }
        None => Body::empty(),
    };
    for (k, v) in extra {
        b = b.header(*k, v.as_str());
    }
    let req = b
        .extension(from)
        .body(body)
        .map_err(|e| Failure::local(format!("building the request: {e}")))?;
    let resp = router
        .oneshot(req)
        .await
        .map_err(|e| Failure::local(format!("calling the API: {e}")))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 64 * 1024 * 1024)
        .await
        .map_err(|e| Failure::local(format!("reading the API's answer: {e}")))?;
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    if status.is_success() {
        return Ok(Reply {
            status,
            headers,
            body,
        });
    }
    Err(failure(status, &body))
}

/// Reads a DPS error body (`errorCode`, `message`) or a hub error body
/// (`Message: "ErrorCode:<code>;<text>"`).
fn failure(status: StatusCode, body: &Value) -> Failure {
    if let Some(code) = body.get("errorCode") {
        let code = match code {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        return Failure {
            status: status.as_u16(),
            code: Some(code),
            message: body
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("the request was refused")
                .to_string(),
        };
    }
    if let Some(m) = body.get("Message").and_then(Value::as_str) {
        if let Some(rest) = m.strip_prefix("ErrorCode:") {
            let (code, text) = rest.split_once(';').unwrap_or((rest, ""));
            return Failure {
                status: status.as_u16(),
                code: Some(code.to_string()),
                message: text.to_string(),
            };
        }
        return Failure {
            status: status.as_u16(),
            code: None,
            message: m.to_string(),
        };
    }
    Failure {
        status: status.as_u16(),
        code: None,
        message: format!("the API answered {status}"),
    }
}
