//! Issued certificates (Muster's `/certificates/issued` extension): the certificates Muster
//! issued for devices' CSRs, filtered by registration id, [`PAGE_SIZE`] a page through the
//! API's continuation token; a policy with RegistrationStatusWrite gets a revoke form per
//! certificate (with a reason, confirmed in the browser before it is sent).

use askama::Template;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use muster_proto::AccessRight;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::page::{q, redirect, render_status, seg, PageCtx};
use crate::session::Session;
use crate::Console;

/// Certificates per page.
const PAGE_SIZE: usize = 50;

#[derive(Deserialize, Default)]
pub struct Filter {
    #[serde(default)]
    registration_id: Option<String>,
    #[serde(default)]
    page: Option<String>,
}

/// One row, as shown.
pub struct CertRow {
    pub serial: String,
    pub serial_seg: String,
    pub registration_id: String,
    pub group: String,
    pub issuing_ca: String,
    pub issued: String,
    pub not_after: String,
    pub revoked: String,
    pub reason: String,
}

fn row(v: &Value) -> CertRow {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let serial = s("serialNumber");
    CertRow {
        serial_seg: seg(&serial),
        serial,
        registration_id: s("registrationId"),
        group: s("enrollmentGroupId"),
        issuing_ca: s("issuingCa"),
        issued: s("issuedDateTimeUtc"),
        not_after: s("notAfterUtc"),
        revoked: s("revokedDateTimeUtc"),
        reason: s("revocationReason"),
    }
}

#[derive(Template)]
#[template(path = "issued_certificates.html")]
struct IssuedPage {
    page: PageCtx,
    registration_id: String,
    rows: Vec<CertRow>,
    next: Option<String>,
    error: Option<String>,
    can_revoke: bool,
}

impl IssuedPage {
    fn next_url(&self, token: &str) -> String {
        format!(
            "/console/certificates?registration_id={}&page={}",
            q(&self.registration_id),
            q(token)
        )
    }
}

async fn view(
    c: &Console,
    s: &Session,
    registration_id: String,
    page_token: Option<String>,
    error: Option<String>,
    status: StatusCode,
) -> Response {
    let path = if registration_id.is_empty() {
        "/certificates/issued".to_string()
    } else {
        format!(
            "/certificates/issued?registrationId={}",
            q(&registration_id)
        )
    };
    let mut extra = vec![("x-ms-max-item-count", PAGE_SIZE.to_string())];
    if let Some(t) = page_token.filter(|t| !t.is_empty()) {
        extra.push(("x-ms-continuation", t));
    }
    let (rows, next, list_error, list_status) =
        match c.service(s, Method::GET, &path, None, &extra).await {
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
    let status = if status == StatusCode::OK {
        list_status
    } else {
        status
    };
    render_status(
        status,
        &IssuedPage {
            page: c.page_ctx(s, "Issued certificates", "certificates"),
            registration_id,
            rows,
            next,
            error: error.or(list_error),
            can_revoke: c.has_right(s, AccessRight::RegistrationStatusWrite).is_ok(),
        },
    )
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
    let registration_id = f.registration_id.unwrap_or_default().trim().to_string();
    view(&c, &s, registration_id, f.page, None, StatusCode::OK).await
}

pub async fn revoke(
    State(c): State<Console>,
    Path(serial): Path<String>,
    req: Request,
) -> Response {
    let (s, f, _) = match c.guard(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let reason = f.get("reason").trim().to_string();
    let body = if reason.is_empty() {
        json!({})
    } else {
        json!({ "reason": reason })
    };
    match c
        .service(
            &s,
            Method::POST,
            &format!("/certificates/issued/{}/revoke", seg(&serial)),
            Some(&body),
            &[],
        )
        .await
    {
        Ok(_) => {
            c.sessions()
                .set_flash(&s.id, format!("Revoked certificate {serial}."));
            redirect("/console/certificates")
        }
        Err(e) => {
            let status = e.status_code();
            view(&c, &s, String::new(), None, Some(e.text()), status).await
        }
    }
}
