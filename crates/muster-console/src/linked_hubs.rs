//! Linked IoT hubs (Muster's `/linkedHubs` extension, `ServiceConfig` right): list, link a hub
//! by connection string, change its allocation weight, whether the allocation policy applies
//! to it, its location, and unlink it. Connection strings are sent to the API, never shown.

use askama::Template;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use serde_json::{json, Map, Value};

use crate::csrf::Fields;
use crate::page::{redirect, render_status, seg, PageCtx};
use crate::session::Session;
use crate::Console;

#[derive(Debug, Clone)]
pub struct HubRow {
    pub name: String,
    pub name_seg: String,
    pub key_name: String,
    pub weight: String,
    pub apply: bool,
    pub location: String,
    pub max_rps: String,
    pub built_in: bool,
    /// An error from this row's form.
    pub error: Option<String>,
}

/// The add form, as typed.
#[derive(Debug, Clone, Default)]
pub struct AddForm {
    pub connection_string_given: bool,
    pub weight: String,
    pub apply: bool,
    pub location: String,
    pub max_rps: String,
    pub error: Option<String>,
}

#[derive(Template)]
#[template(path = "linked_hubs.html")]
struct LinkedHubsPage {
    page: PageCtx,
    rows: Vec<HubRow>,
    error: Option<String>,
    add: AddForm,
}

fn row(v: &Value) -> HubRow {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let name = s("name");
    HubRow {
        name_seg: seg(&name),
        name,
        key_name: s("keyName"),
        weight: v
            .get("allocationWeight")
            .map(|w| w.to_string())
            .unwrap_or_default(),
        apply: v
            .get("applyAllocationPolicy")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        location: s("location"),
        max_rps: v
            .get("maxRegistrationsPerSecond")
            .map(|w| w.to_string())
            .unwrap_or_default(),
        built_in: v.get("builtIn").and_then(Value::as_bool).unwrap_or(false),
        error: None,
    }
}

async fn view(
    c: &Console,
    s: &Session,
    add: AddForm,
    row_error: Option<(String, HubRow)>,
    status: StatusCode,
) -> Response {
    let (mut rows, mut error) = (Vec::new(), None);
    let mut error_status = StatusCode::OK;
    match c.service(s, Method::GET, "/linkedHubs", None, &[]).await {
        Ok(r) => {
            rows = r
                .body
                .as_array()
                .map(|a| a.iter().map(row).collect())
                .unwrap_or_default()
        }
        Err(f) => {
            error_status = f.status_code();
            error = Some(f.text());
        }
    }
    if let Some((name, typed)) = row_error {
        if let Some(r) = rows.iter_mut().find(|r| r.name.eq_ignore_ascii_case(&name)) {
            *r = typed;
        }
    }
    let status = if error.is_some() && status == StatusCode::OK {
        error_status
    } else {
        status
    };
    render_status(
        status,
        &LinkedHubsPage {
            page: c.page_ctx(s, "Linked IoT hubs", "linked-hubs"),
            rows,
            error,
            add,
        },
    )
}

pub async fn list(State(c): State<Console>, headers: HeaderMap) -> Response {
    let s = match c.require_session(&headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    view(
        &c,
        &s,
        AddForm {
            weight: "1".into(),
            apply: true,
            ..AddForm::default()
        },
        None,
        StatusCode::OK,
    )
    .await
}

/// The request body for the settings in `f`; numbers are checked here so the message names
/// the field.
fn settings_body(f: &Fields, obj: &mut Map<String, Value>) -> Result<(), String> {
    let weight = f.get("weight").trim();
    if !weight.is_empty() {
        let w: u32 = weight
            .parse()
            .map_err(|_| format!("Allocation weight must be a whole number, not {weight:?}."))?;
        obj.insert("allocationWeight".into(), json!(w));
    }
    obj.insert("applyAllocationPolicy".into(), json!(f.has("apply")));
    obj.insert("location".into(), json!(f.get("location").trim()));
    let rps = f.get("max_rps").trim();
    let rps: u32 = if rps.is_empty() {
        0
    } else {
        rps.parse()
            .map_err(|_| format!("Registrations per second must be a whole number, not {rps:?}."))?
    };
    obj.insert("maxRegistrationsPerSecond".into(), json!(rps));
    Ok(())
}

pub async fn add(State(c): State<Console>, req: Request) -> Response {
    let (s, f, _) = match c.guard(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let cs = f.get("connection_string").trim().to_string();
    let mut form = AddForm {
        connection_string_given: !cs.is_empty(),
        weight: f.get("weight").to_string(),
        apply: f.has("apply"),
        location: f.get("location").to_string(),
        max_rps: f.get("max_rps").to_string(),
        error: None,
    };
    let host = muster_proto::ConnectionString::parse(&cs).map(|p| p.host_name);
    let result = match host {
        Err(e) => Err(format!("The connection string is not valid: {e}")),
        Ok(host) => {
            let mut obj = Map::new();
            obj.insert("connectionString".into(), json!(cs));
            match settings_body(&f, &mut obj) {
                Err(e) => Err(e),
                Ok(()) => c
                    .service(
                        &s,
                        Method::PUT,
                        &format!("/linkedHubs/{}", seg(&host)),
                        Some(&Value::Object(obj)),
                        &[],
                    )
                    .await
                    .map(|_| host)
                    .map_err(|f| f.text()),
            }
        }
    };
    match result {
        Ok(host) => {
            c.sessions()
                .set_flash(&s.id, format!("Linked IoT hub '{host}'."));
            redirect("/console/linked-hubs")
        }
        Err(e) => {
            // The connection string holds a key: it is not sent back to the browser.
            form.error = Some(e);
            view(&c, &s, form, None, StatusCode::BAD_REQUEST).await
        }
    }
}

pub async fn update(State(c): State<Console>, Path(name): Path<String>, req: Request) -> Response {
    let (s, f, _) = match c.guard(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut obj = Map::new();
    let result = match settings_body(&f, &mut obj) {
        Err(e) => Err(e),
        Ok(()) => c
            .service(
                &s,
                Method::PUT,
                &format!("/linkedHubs/{}", seg(&name)),
                Some(&Value::Object(obj)),
                &[],
            )
            .await
            .map_err(|f| f.text()),
    };
    match result {
        Ok(_) => {
            c.sessions()
                .set_flash(&s.id, format!("Saved IoT hub '{name}'."));
            redirect("/console/linked-hubs")
        }
        Err(e) => {
            let typed = HubRow {
                name_seg: seg(&name),
                name: name.clone(),
                key_name: String::new(),
                weight: f.get("weight").to_string(),
                apply: f.has("apply"),
                location: f.get("location").to_string(),
                max_rps: f.get("max_rps").to_string(),
                built_in: f.has("built_in"),
                error: Some(e),
            };
            view(
                &c,
                &s,
                AddForm {
                    weight: "1".into(),
                    apply: true,
                    ..AddForm::default()
                },
                Some((name, typed)),
                StatusCode::BAD_REQUEST,
            )
            .await
        }
    }
}

pub async fn remove(State(c): State<Console>, Path(name): Path<String>, req: Request) -> Response {
    let (s, f, _) = match c.guard(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match c
        .service(
            &s,
            Method::DELETE,
            &format!("/linkedHubs/{}", seg(&name)),
            None,
            &[],
        )
        .await
    {
        Ok(_) => {
            c.sessions()
                .set_flash(&s.id, format!("Unlinked IoT hub '{name}'."));
            redirect("/console/linked-hubs")
        }
        Err(e) => {
            let typed = HubRow {
                name_seg: seg(&name),
                name: name.clone(),
                key_name: String::new(),
                weight: f.get("weight").to_string(),
                apply: f.has("apply"),
                location: f.get("location").to_string(),
                max_rps: f.get("max_rps").to_string(),
                built_in: f.has("built_in"),
                error: Some(e.text()),
            };
            view(
                &c,
                &s,
                AddForm {
                    weight: "1".into(),
                    apply: true,
                    ..AddForm::default()
                },
                Some((name, typed)),
                StatusCode::BAD_REQUEST,
            )
            .await
        }
    }
}
