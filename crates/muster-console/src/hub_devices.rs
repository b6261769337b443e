//! The built-in hub's devices: list, and per device its identity, twin and last telemetry
//! messages. The pages call the hub's REST router with its `iothubowner` token, so they are
//! offered only to policies holding [`crate::api::HUB_RIGHT`] (`ServiceConfig`).

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use serde_json::Value;

use crate::api::HUB_RIGHT;
use crate::page::{render_status, seg, PageCtx};
use crate::session::forbidden_page;
use crate::Console;

/// Most devices listed.
const MAX_DEVICES: usize = 1000;
/// Telemetry messages shown per device.
const LAST_MESSAGES: usize = 20;

#[derive(Debug)]
pub struct DeviceRow {
    pub id: String,
    pub id_seg: String,
    pub status: String,
    pub connection: String,
    pub auth: String,
    pub last_activity: String,
}

#[derive(Template)]
#[template(path = "hub_devices.html")]
struct DevicesPage {
    page: PageCtx,
    hub: String,
    rows: Vec<DeviceRow>,
    error: Option<String>,
}

#[derive(Debug)]
pub struct Message {
    pub sequence: String,
    pub enqueued: String,
    pub body: String,
    pub properties: String,
}

#[derive(Template)]
#[template(path = "hub_device.html")]
struct DevicePage {
    page: PageCtx,
    id: String,
    device: String,
    twin: String,
    messages: Vec<Message>,
    error: Option<String>,
}

fn device_row(v: &Value) -> DeviceRow {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let id = s("deviceId");
    DeviceRow {
        id_seg: seg(&id),
        id,
        status: s("status"),
        connection: s("connectionState"),
        auth: v
            .pointer("/authentication/type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        last_activity: s("lastActivityTime"),
    }
}

pub async fn list(State(c): State<Console>, headers: HeaderMap) -> Response {
    let s = match c.require_session(&headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(f) = c.has_right(&s, HUB_RIGHT) {
        return forbidden_page(&c, &s, "hub-devices", f.text());
    }
    let (rows, error) = match c
        .hub(&s, Method::GET, &format!("/devices?top={MAX_DEVICES}"))
        .await
    {
        Ok(r) => (
            r.body
                .as_array()
                .map(|a| a.iter().map(device_row).collect())
                .unwrap_or_default(),
            None,
        ),
        Err(f) => (Vec::new(), Some(f.text())),
    };
    render_status(
        StatusCode::OK,
        &DevicesPage {
            page: c.page_ctx(&s, "Hub devices", "hub-devices"),
            hub: c.inner.hub.host_name().to_string(),
            rows,
            error,
        },
    )
}

pub async fn details(
    State(c): State<Console>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let s = match c.require_session(&headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(f) = c.has_right(&s, HUB_RIGHT) {
        return forbidden_page(&c, &s, "hub-devices", f.text());
    }
    let mut error = None;
    let device = match c
        .hub(&s, Method::GET, &format!("/devices/{}", seg(&id)))
        .await
    {
        Ok(r) => {
            let mut v = r.body;
            // The device's keys are not shown here.
            if let Some(a) = v.pointer_mut("/authentication/symmetricKey") {
                *a = Value::String("(hidden)".into());
            }
            serde_json::to_string_pretty(&v).unwrap_or_default()
        }
        Err(f) => {
            let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::BAD_REQUEST);
            return crate::page::message_page(
                c.page_ctx(&s, "Hub device", "hub-devices"),
                status,
                &format!("Cannot show device '{id}'"),
                f.text(),
            );
        }
    };
    let twin = match c
        .hub(&s, Method::GET, &format!("/twins/{}", seg(&id)))
        .await
    {
        Ok(r) => serde_json::to_string_pretty(&r.body).unwrap_or_default(),
        Err(f) => {
            error = Some(f.text());
            String::new()
        }
    };
    // Telemetry is read oldest first; keep the last few (retention bounds the walk).
    let mut messages: Vec<Message> = Vec::new();
    let mut after = 0u64;
    loop {
        match c
            .hub(
                &s,
                Method::GET,
                &format!("/devices/{}/telemetry?after={after}&limit=1000", seg(&id)),
            )
            .await
        {
            Ok(r) => {
                let page = r.body.as_array().cloned().unwrap_or_default();
                let n = page.len();
                for m in page {
                    let seq = m.get("sequenceNumber").and_then(Value::as_u64).unwrap_or(0);
                    after = after.max(seq);
                    messages.push(Message {
                        sequence: seq.to_string(),
                        enqueued: m
                            .get("enqueuedTime")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        body: m
                            .get("body")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        properties: m
                            .get("properties")
                            .map(|p| p.to_string())
                            .unwrap_or_default(),
                    });
                    if messages.len() > LAST_MESSAGES {
                        messages.remove(0);
                    }
                }
                if n < 1000 {
                    break;
                }
            }
            Err(f) => {
                error.get_or_insert(f.text());
                break;
            }
        }
    }
    messages.reverse();
    render_status(
        StatusCode::OK,
        &DevicePage {
            page: c.page_ctx(&s, format!("Device {id}"), "hub-devices"),
            id,
            device,
            twin,
            messages,
            error,
        },
    )
}
