//! The audit middleware: every write through a router it wraps (the service API's, and the
//! built-in hub's REST router in the server) is recorded in the store's audit log
//! (`muster_store::audit`) with who, from where, what, when and the result.
//!
//! It runs as a route layer, so the route template (`MatchedPath`) and the path's id are
//! known. Writes are `PUT`, `PATCH`, `DELETE` and `POST`, except the `POST …/query` routes,
//! which read. The entry is written right after the handler answered and before the answer
//! leaves, in its own store write: a write the client saw acknowledged has its entry unless the
//! process died in between (the change and its entry are two commits; see ARCHITECTURE.md).
//! A failed audit write does not turn a done change into an error: it is logged (rate-limited).
//!
//! What it must never record: a key, a token or a body. Error bodies are read only for their
//! code (at most [`MAX_ERROR_BODY_BYTES`]) and passed on unchanged.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use muster_proto::audit::CLI_USER_AGENT_PREFIX;
use muster_proto::runtime::{Clock, Entropy};
use muster_store::audit::{self, AuditEntry, AuditSource};
use muster_store::Store;
use serde_json::Value;

use crate::ServiceApi;

/// Error bodies larger than this are passed on without reading their code.
pub const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Names the policy that signed a request (its token verified), whatever its rights.
pub type Identify = Arc<dyn Fn(&HeaderMap, i64) -> Option<String> + Send + Sync>;

/// Marks a request the console sends in process, with the signed-in policy. A request
/// extension, so no client on the network can claim it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromConsole {
    pub policy: String,
}

/// What the middleware needs: where to write, the clock and random source, and how the
/// wrapped router's tokens name their policy.
#[derive(Clone)]
pub struct Auditor {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    entropy: Arc<dyn Entropy>,
    identify: Identify,
}

impl Auditor {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        entropy: Arc<dyn Entropy>,
        identify: Identify,
    ) -> Self {
        Self {
            store,
            clock,
            entropy,
            identify,
        }
    }

    /// The auditor of the service API: policies are the service's shared access policies.
    pub fn for_service_api(api: &ServiceApi) -> Self {
        let auth = api.auth.clone();
        Self::new(
            api.store.clone(),
            api.clock.clone(),
            api.entropy.clone(),
            Arc::new(move |headers, now| auth.identify(headers, now)),
        )
    }

    /// Wraps every route `router` has so far.
    pub fn wrap<S: Clone + Send + Sync + 'static>(self, router: Router<S>) -> Router<S> {
        router.route_layer(axum::middleware::from_fn_with_state(self, record))
    }
}

fn is_write(method: &Method, route: &str) -> bool {
    let writes = [Method::PUT, Method::PATCH, Method::DELETE, Method::POST];
    writes.contains(method) && !route.ends_with("/query")
}

/// The middleware (see the module doc).
pub async fn record(State(auditor): State<Auditor>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    if !is_write(req.method(), &route) {
        return next.run(req).await;
    }
    let method = req.method().to_string();
    let (mut parts, body) = req.into_parts();
    let id = RawPathParams::from_request_parts(&mut parts, &())
        .await
        .ok()
        .and_then(|params| params.iter().next().map(|(_, v)| v.to_string()));
    let console = parts.extensions.get::<FromConsole>().cloned();
    let source = if console.is_some() {
        AuditSource::Console
    } else if parts
        .headers
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ua| ua.starts_with(CLI_USER_AGENT_PREFIX))
    {
        AuditSource::Cli
    } else {
        AuditSource::Api
    };
    let now = auditor.clock.now().unix_seconds();
    let policy = match console {
        Some(c) => Some(c.policy),
        None => (auditor.identify)(&parts.headers, now),
    };

    let response = next.run(Request::from_parts(parts, body)).await;

    let status = response.status();
    let (response, error_code) = if status.is_client_error() || status.is_server_error() {
        error_code(response).await
    } else {
        (response, None)
    };
    let entry = AuditEntry {
        time: auditor.clock.now(),
        policy,
        source,
        method,
        route,
        id,
        status: status.as_u16(),
        error_code,
    };
    if let Err(e) = audit::append(&*auditor.store, &entry, &*auditor.entropy).await {
        if let Some(suppressed) = AUDIT_WRITE_LOG.admit() {
            tracing::warn!(error = %e, route = %entry.route, suppressed, "could not write the audit entry");
        }
    }
    response
}

static AUDIT_WRITE_LOG: muster_proto::log_limit::LogLimiter =
    muster_proto::log_limit::LogLimiter::new(std::time::Duration::from_secs(10));

/// Reads the error code of a DPS error body (`errorCode`) or a hub one
/// (`Message: "ErrorCode:<code>;…"`), and rebuilds the response with the same bytes.
async fn error_code(response: Response) -> (Response, Option<String>) {
    use axum::body::HttpBody;
    let (parts, body) = response.into_parts();
    // Only a body known to be small is read (Muster's error bodies always are); anything
    // else streams on untouched.
    let small = body
        .size_hint()
        .upper()
        .is_some_and(|n| n <= MAX_ERROR_BODY_BYTES as u64);
    if !small {
        return (Response::from_parts(parts, body), None);
    }
    let Ok(bytes) = axum::body::to_bytes(body, MAX_ERROR_BODY_BYTES).await else {
        return (Response::from_parts(parts, Body::empty()), None);
    };
    let code = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| code_of(&v));
    (Response::from_parts(parts, Body::from(bytes)), code)
}

fn code_of(body: &Value) -> Option<String> {
    match body.get("errorCode") {
        Some(Value::Number(n)) => return Some(n.to_string()),
        Some(Value::String(s)) => return Some(s.clone()),
        _ => {}
    }
    let message = body.get("Message")?.as_str()?;
    let rest = message.strip_prefix("ErrorCode:")?;
    Some(rest.split(';').next().unwrap_or(rest).to_string())
}
