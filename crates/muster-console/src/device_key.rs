//! A helper that derives a device's symmetric key from an enrollment group key, as
//! `muster compute-device-key` and `az iot dps enrollment-group compute-device-key` do:
//! base64(HMAC-SHA256(base64-decoded group key, registration id)). Computed here, stored
//! nowhere; the page is never cached.

use askama::Template;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use crate::page::{render, render_status, PageCtx};
use crate::Console;

#[derive(Template)]
#[template(path = "device_key.html")]
struct DeviceKeyPage {
    page: PageCtx,
    group_key: String,
    registration_id: String,
    device_key: Option<String>,
    key_error: Option<String>,
    id_error: Option<String>,
}

pub async fn page(State(c): State<Console>, headers: HeaderMap) -> Response {
    let s = match c.require_session(&headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    render(&DeviceKeyPage {
        page: c.page_ctx(&s, "Compute a device key", "device-key"),
        group_key: String::new(),
        registration_id: String::new(),
        device_key: None,
        key_error: None,
        id_error: None,
    })
}

pub async fn compute(State(c): State<Console>, req: Request) -> Response {
    let (s, fields, _) = match c.guard(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let group_key = fields.get("group_key").trim().to_string();
    let registration_id = fields.get("registration_id").trim().to_string();
    let mut p = DeviceKeyPage {
        page: c.page_ctx(&s, "Compute a device key", "device-key"),
        group_key,
        registration_id,
        device_key: None,
        key_error: None,
        id_error: None,
    };
    if let Err(e) = muster_proto::RegistrationId::new(p.registration_id.as_str()) {
        p.id_error = Some(e.to_string());
    }
    if p.id_error.is_none() {
        match muster_attestation::symmetric_key::derive_device_key(&p.group_key, &p.registration_id)
        {
            Ok(k) => p.device_key = Some(k),
            Err(e) => p.key_error = Some(e.to_string()),
        }
    }
    let status = if p.device_key.is_some() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    render_status(status, &p)
}
