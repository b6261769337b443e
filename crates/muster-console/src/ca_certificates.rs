//! CA certificates (Muster's `/caCertificates` extension, `ServiceConfig` right): list with
//! subject, thumbprint, expiry and verification state; upload a PEM; generate a verification
//! code (shown once, on the answer); verify with a PEM certificate whose CN is the code and
//! which the CA signed; delete. The proof-of-possession flow Azure users know.

use askama::Template;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use crate::page::{redirect, render_status, seg, PageCtx};
use crate::session::Session;
use crate::Console;

#[derive(Debug, Clone)]
pub struct CaRow {
    pub name: String,
    pub name_seg: String,
    pub subject: String,
    pub thumbprint: String,
    pub not_after: String,
    pub verified: bool,
}

#[derive(Template)]
#[template(path = "ca_certificates.html")]
struct CaPage {
    page: PageCtx,
    rows: Vec<CaRow>,
    error: Option<String>,
    form_error: Option<String>,
    /// `(name, code)` right after "Generate verification code".
    code: Option<(String, String)>,
}

fn row(v: &Value) -> CaRow {
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let name = s("/name");
    CaRow {
        name_seg: seg(&name),
        subject: s("/info/subjectName"),
        thumbprint: s("/info/sha256Thumbprint"),
        not_after: s("/info/notAfterUtc"),
        verified: v
            .get("isVerified")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        name,
    }
}

async fn view(
    c: &Console,
    s: &Session,
    form_error: Option<String>,
    code: Option<(String, String)>,
    status: StatusCode,
) -> Response {
    let (mut rows, mut error, mut status) = (Vec::new(), None, status);
    match c
        .service(s, Method::GET, "/caCertificates", None, &[])
        .await
    {
        Ok(r) => {
            rows = r
                .body
                .as_array()
                .map(|a| a.iter().map(row).collect())
                .unwrap_or_default()
        }
        Err(f) => {
            if status == StatusCode::OK {
                status = f.status_code();
            }
            error = Some(f.text());
        }
    }
    render_status(
        status,
        &CaPage {
            page: c.page_ctx(s, "CA certificates", "ca-certificates"),
            rows,
            error,
            form_error,
            code,
        },
    )
}

pub async fn list(State(c): State<Console>, headers: HeaderMap) -> Response {
    let s = match c.require_session(&headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    view(&c, &s, None, None, StatusCode::OK).await
}

/// `POST /console/ca-certificates`: uploads a CA certificate (PEM, pasted or as a file).
pub async fn upload(State(c): State<Console>, req: Request) -> Response {
    let (s, fields, _) = match c.guard(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let name = fields.get("name").trim().to_string();
    let pem = fields.get("certificate").trim().to_string();
    let body = json!({ "certificate": pem });
    match c
        .service(
            &s,
            Method::PUT,
            &format!("/caCertificates/{}", seg(&name)),
            Some(&body),
            &[],
        )
        .await
    {
        Ok(_) => {
            c.sessions().set_flash(
                &s.id,
                format!("Uploaded CA certificate '{name}'. Generate a verification code to prove you hold its key."),
            );
            redirect("/console/ca-certificates")
        }
        Err(f) => view(&c, &s, Some(f.text()), None, f.status_code()).await,
    }
}

/// `POST /console/ca-certificates/{name}`: `action` is `code` (generate a verification code),
/// `verify` (with `certificate`, a PEM) or `delete`.
pub async fn update(State(c): State<Console>, Path(name): Path<String>, req: Request) -> Response {
    let (s, fields, _) = match c.guard(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let path = format!("/caCertificates/{}", seg(&name));
    match fields.get("action") {
        "code" => match c
            .service(
                &s,
                Method::POST,
                &format!("{path}/verificationCode"),
                None,
                &[],
            )
            .await
        {
            Ok(r) => {
                let code = r
                    .body
                    .get("verificationCode")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                view(&c, &s, None, Some((name, code)), StatusCode::OK).await
            }
            Err(f) => view(&c, &s, Some(f.text()), None, f.status_code()).await,
        },
        "verify" => {
            let body = json!({ "certificate": fields.get("certificate").trim() });
            match c
                .service(
                    &s,
                    Method::POST,
                    &format!("{path}/verify"),
                    Some(&body),
                    &[],
                )
                .await
            {
                Ok(_) => {
                    c.sessions().set_flash(
                        &s.id,
                        format!("Verified CA certificate '{name}': enrollment groups may now reference it."),
                    );
                    redirect("/console/ca-certificates")
                }
                Err(f) => view(&c, &s, Some(f.text()), None, f.status_code()).await,
            }
        }
        "delete" => match c.service(&s, Method::DELETE, &path, None, &[]).await {
            Ok(_) => {
                c.sessions()
                    .set_flash(&s.id, format!("Deleted CA certificate '{name}'."));
                redirect("/console/ca-certificates")
            }
            Err(f) => view(&c, &s, Some(f.text()), None, f.status_code()).await,
        },
        other => {
            view(
                &c,
                &s,
                Some(format!("unknown action '{other}'")),
                None,
                StatusCode::BAD_REQUEST,
            )
            .await
        }
    }
}
