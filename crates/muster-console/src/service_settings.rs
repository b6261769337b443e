//! The service's default allocation policy (the service API's `/serviceSettings`,
//! `ServiceConfig` right): the policy enrollments that set none are allocated with.

use askama::Template;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use crate::page::{redirect, render_status, PageCtx};
use crate::session::Session;
use crate::Console;

#[derive(Template)]
#[template(path = "service_settings.html")]
struct SettingsPage {
    page: PageCtx,
    policy: String,
    error: Option<String>,
}

impl SettingsPage {
    fn choices(&self) -> [(&'static str, &'static str); 3] {
        [
            ("hashed", "Evenly weighted distribution (hashed)"),
            ("geoLatency", "Lowest latency (geoLatency)"),
            ("static", "Static configuration (static)"),
        ]
    }
}

async fn view(c: &Console, s: &Session, error: Option<String>, status: StatusCode) -> Response {
    let (mut policy, mut error, mut status) = (String::new(), error, status);
    match c
        .service(s, Method::GET, "/serviceSettings", None, &[])
        .await
    {
        Ok(r) => {
            policy = r
                .body
                .get("allocationPolicy")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        }
        Err(f) => {
            if status == StatusCode::OK {
                status = f.status_code();
            }
            error.get_or_insert(f.text());
        }
    }
    render_status(
        status,
        &SettingsPage {
            page: c.page_ctx(s, "Allocation policy", "settings"),
            policy,
            error,
        },
    )
}

pub async fn page(State(c): State<Console>, headers: HeaderMap) -> Response {
    let s = match c.require_session(&headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    view(&c, &s, None, StatusCode::OK).await
}

pub async fn save(State(c): State<Console>, req: Request) -> Response {
    let (s, fields, _) = match c.guard(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let body = json!({ "allocationPolicy": fields.get("allocation_policy") });
    match c
        .service(&s, Method::PUT, "/serviceSettings", Some(&body), &[])
        .await
    {
        Ok(_) => {
            c.sessions().set_flash(
                &s.id,
                format!(
                    "Saved: enrollments without their own policy now use {}.",
                    fields.get("allocation_policy")
                ),
            );
            redirect("/console/settings")
        }
        Err(f) => view(&c, &s, Some(f.text()), f.status_code()).await,
    }
}
