//! Shared access policies (Muster's `/accessPolicies` extension, `ServiceConfig` right): list
//! with rights, create (the keys are shown once, on the page that answers the form), edit
//! rights, show keys, regenerate the primary or secondary key, delete. The owner policy can't
//! be deleted or lose `ServiceConfig` (the API refuses; the page says so).

use askama::Template;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use muster_proto::AccessRight;
use serde_json::{json, Value};

use crate::csrf::Fields;
use crate::page::{redirect, render_status, seg, PageCtx};
use crate::session::Session;
use crate::Console;

#[derive(Debug, Clone)]
pub struct PolicyRow {
    pub name: String,
    pub name_seg: String,
    pub rights: Vec<&'static str>,
    pub owner: bool,
    pub own: bool,
}

impl PolicyRow {
    pub fn has(&self, right: &str) -> bool {
        self.rights.contains(&right)
    }
}

/// Keys shown once, after a create, a regeneration or "Show keys".
pub struct ShownKeys {
    pub name: String,
    pub primary: String,
    pub secondary: String,
}

#[derive(Template)]
#[template(path = "access_policies.html")]
struct PoliciesPage {
    page: PageCtx,
    rows: Vec<PolicyRow>,
    error: Option<String>,
    form_error: Option<String>,
    keys: Option<ShownKeys>,
}

impl PoliciesPage {
    /// The right the owner policy always keeps.
    fn is_config(&self, right: &str) -> bool {
        right == AccessRight::ServiceConfig.as_str()
    }

    fn all_rights(&self) -> Vec<&'static str> {
        AccessRight::ALL.iter().map(|r| r.as_str()).collect()
    }
}

fn row(v: &Value, signed_in: &str) -> PolicyRow {
    let name = v
        .get("keyName")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let rights = v.get("rights").and_then(Value::as_str).unwrap_or("");
    PolicyRow {
        name_seg: seg(&name),
        owner: name == muster_service_api::OWNER_POLICY,
        own: name.eq_ignore_ascii_case(signed_in),
        rights: AccessRight::ALL
            .iter()
            .map(|r| r.as_str())
            .filter(|r| rights.split(',').any(|x| x.trim().eq_ignore_ascii_case(r)))
            .collect(),
        name,
    }
}

fn keys_of(v: &Value) -> Option<ShownKeys> {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    Some(ShownKeys {
        name: s("keyName")?,
        primary: s("primaryKey")?,
        secondary: s("secondaryKey")?,
    })
}

async fn view(
    c: &Console,
    s: &Session,
    form_error: Option<String>,
    keys: Option<ShownKeys>,
    status: StatusCode,
) -> Response {
    let (mut rows, mut error, mut code) = (Vec::new(), None, status);
    match c
        .service(s, Method::GET, "/accessPolicies", None, &[])
        .await
    {
        Ok(r) => {
            rows = r
                .body
                .as_array()
                .map(|a| a.iter().map(|v| row(v, &s.policy)).collect())
                .unwrap_or_default()
        }
        Err(f) => {
            if code == StatusCode::OK {
                code = f.status_code();
            }
            error = Some(f.text());
        }
    }
    render_status(
        code,
        &PoliciesPage {
            page: c.page_ctx(s, "Access policies", "access-policies"),
            rows,
            error,
            form_error,
            keys,
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

/// The rights ticked in a form, as the API writes them.
fn rights_of(fields: &Fields) -> String {
    AccessRight::ALL
        .iter()
        .map(|r| r.as_str())
        .filter(|r| fields.has(&format!("right_{r}")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `POST /console/access-policies`: creates a policy; its keys are shown once on the answer.
pub async fn create(State(c): State<Console>, req: Request) -> Response {
    let (s, fields, _) = match c.guard(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let name = fields.get("name").trim().to_string();
    let path = format!("/accessPolicies/{}", seg(&name));
    // PUT also edits: refuse a name that exists so a create never changes another policy.
    if c.service(&s, Method::GET, &path, None, &[]).await.is_ok() {
        let msg = format!("a policy named '{name}' exists: edit its rights in the table");
        return view(&c, &s, Some(msg), None, StatusCode::CONFLICT).await;
    }
    let body = json!({ "rights": rights_of(&fields) });
    match c.service(&s, Method::PUT, &path, Some(&body), &[]).await {
        Ok(r) => {
            c.sessions()
                .set_flash(&s.id, format!("Created access policy '{name}'."));
            view(&c, &s, None, keys_of(&r.body), StatusCode::OK).await
        }
        Err(f) => view(&c, &s, Some(f.text()), None, f.status_code()).await,
    }
}

/// `POST /console/access-policies/{name}`: `action` is `rights` (save the ticked rights),
/// `keys` (show), `regenerate` (with `key` primary or secondary) or `delete`.
pub async fn update(State(c): State<Console>, Path(name): Path<String>, req: Request) -> Response {
    let (s, fields, _) = match c.guard(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let path = format!("/accessPolicies/{}", seg(&name));
    let action = fields.get("action");
    // The session signs with this policy's key: re-keying or deleting it would end the
    // session mid-page. Use another ServiceConfig policy (or the CLI) for that.
    if matches!(action, "regenerate" | "delete") && name.eq_ignore_ascii_case(&s.policy) {
        let msg = format!(
            "you are signed in with '{name}': sign in with another policy that has ServiceConfig to re-key or delete it"
        );
        return view(&c, &s, Some(msg), None, StatusCode::CONFLICT).await;
    }
    let result = match action {
        "rights" => {
            let body = json!({ "rights": rights_of(&fields) });
            c.service(&s, Method::PUT, &path, Some(&body), &[])
                .await
                .map(|_| (format!("Saved the rights of '{name}'."), None))
        }
        "keys" => c
            .service(&s, Method::POST, &format!("{path}/keys"), None, &[])
            .await
            .map(|r| (String::new(), keys_of(&r.body))),
        "regenerate" => {
            let key = if fields.get("key") == "secondary" {
                "secondary"
            } else {
                "primary"
            };
            let body = json!({ "keyType": key });
            c.service(
                &s,
                Method::POST,
                &format!("{path}/regenerateKey"),
                Some(&body),
                &[],
            )
            .await
            .map(|r| {
                (
                    format!("Regenerated the {key} key of '{name}'; the old one no longer works."),
                    keys_of(&r.body),
                )
            })
        }
        "delete" => c
            .service(&s, Method::DELETE, &path, None, &[])
            .await
            .map(|_| (format!("Deleted access policy '{name}'."), None)),
        other => {
            return view(
                &c,
                &s,
                Some(format!("unknown action '{other}'")),
                None,
                StatusCode::BAD_REQUEST,
            )
            .await
        }
    };
    match result {
        Ok((message, None)) => {
            c.sessions().set_flash(&s.id, message);
            redirect("/console/access-policies")
        }
        Ok((message, keys)) => {
            if !message.is_empty() {
                c.sessions().set_flash(&s.id, message);
            }
            view(&c, &s, None, keys, StatusCode::OK).await
        }
        Err(f) => view(&c, &s, Some(f.text()), None, f.status_code()).await,
    }
}
