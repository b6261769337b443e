//! The audit log page: the service API's `GET /audit` (ServiceConfig), filtered by start time,
//! policy and affected id, [`PAGE_SIZE`] entries a page, the next page through the API's
//! continuation token.

use askama::Template;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;

use crate::page::{q, render_status, PageCtx};
use crate::Console;

/// Entries per page.
const PAGE_SIZE: usize = 50;

#[derive(Deserialize, Default)]
pub struct Filter {
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    page: Option<String>,
}

/// One row, as shown.
pub struct AuditRow {
    pub time: String,
    pub policy: String,
    pub source: String,
    pub method: String,
    pub route: String,
    pub id: String,
    pub status: String,
    pub error_code: String,
}

fn row(v: &Value) -> AuditRow {
    let s = |k: &str| match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    AuditRow {
        time: s("time"),
        policy: s("policy"),
        source: s("source"),
        method: s("method"),
        route: s("route"),
        id: s("id"),
        status: s("status"),
        error_code: s("errorCode"),
    }
}

#[derive(Template)]
#[template(path = "audit_log.html")]
struct AuditPage {
    page: PageCtx,
    from: String,
    policy: String,
    id: String,
    rows: Vec<AuditRow>,
    next: Option<String>,
    error: Option<String>,
}

impl AuditPage {
    fn next_url(&self, token: &str) -> String {
        format!(
            "/console/audit?from={}&policy={}&id={}&page={}",
            q(&self.from),
            q(&self.policy),
            q(&self.id),
            q(token)
        )
    }
}

pub async fn list(
    State(c): State<Console>,
    Query(f): Query<Filter>,
    headers: HeaderMap,
) -> Response {
    let s = match c.require_session(&headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let from = f.from.unwrap_or_default().trim().to_string();
    let policy = f.policy.unwrap_or_default().trim().to_string();
    let id = f.id.unwrap_or_default().trim().to_string();
    let mut query = Vec::new();
    for (name, value) in [("from", &from), ("policy", &policy), ("id", &id)] {
        if !value.is_empty() {
            query.push(format!("{name}={}", q(value)));
        }
    }
    let path = if query.is_empty() {
        "/audit".to_string()
    } else {
        format!("/audit?{}", query.join("&"))
    };
    let mut extra = vec![("x-ms-max-item-count", PAGE_SIZE.to_string())];
    if let Some(t) = f.page.filter(|t| !t.is_empty()) {
        extra.push(("x-ms-continuation", t));
    }
    let (rows, next, error, status) = match c.service(&s, Method::GET, &path, None, &extra).await {
        Ok(r) => (
            r.body
                .as_array()
                .map(|a| a.iter().map(row).collect())
                .unwrap_or_default(),
            r.continuation(),
            None,
            StatusCode::OK,
        ),
        Err(f) => (Vec::new(), None, Some(f.text()), f.status_code()),
    };
    render_status(
        status,
        &AuditPage {
            page: c.page_ctx(&s, "Audit log", "audit"),
            from,
            policy,
            id,
            rows,
            next,
            error,
        },
    )
}
