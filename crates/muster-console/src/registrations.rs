//! Registration records: filter by status, enrollment group and assigned hub, paged.
//!
//! With a group the page is the service API's `POST /registrations/{groupId}/query`, paged
//! with `x-ms-continuation` (status and hub filter each page). Without one, the DPS API has no
//! "all records" query, so the console reads the store's `registrations` collection in key
//! order after checking, with the API's own Authorizer, that the policy holds
//! `RegistrationStatusRead`; each request reads at most [`SCAN_LIMIT`] records and the next
//! link continues after the last key read, so large sets page without a full scan.
//!
//! Search (`q`, by registration id or device id) is one indexed lookup in the store
//! ([`muster_store::Store::search`]: a prefix of the key, or of the lower-cased `deviceId`),
//! answered in one request however many records there are; status, group and hub filter its
//! results. Each row has a Delete action (with confirmation): the service API's
//! `DELETE /registrations/{id}`, or with "also remove its device" the engine's deprovisioning
//! (record and hub device, intent first).

use askama::Template;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use muster_proto::AccessRight;
use muster_store::{Collection, ListQuery, SearchField, SearchQuery};
use serde::Deserialize;
use serde_json::Value;

use crate::enrollments::{reg_row, RegRow};
use crate::page::{q, redirect, render_status, seg, PageCtx};
use crate::Console;

/// Rows per page.
const PAGE_SIZE: usize = 50;
/// Most records one request reads from the store when filtering.
const SCAN_LIMIT: usize = 10_000;

#[derive(Deserialize, Default)]
pub struct Filter {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    hub: Option<String>,
    #[serde(default)]
    page: Option<String>,
    /// Search text: a registration id or device id, or the start of one.
    #[serde(default)]
    q: Option<String>,
    /// `registrationId` (default) or `deviceId`.
    #[serde(default)]
    by: Option<String>,
}

/// Most matches a search shows; more say "refine the search".
const SEARCH_LIMIT: usize = PAGE_SIZE;

#[derive(Template)]
#[template(path = "registrations.html")]
struct RegistrationsPage {
    page: PageCtx,
    status: String,
    group: String,
    hub: String,
    rows: Vec<RegRow>,
    next: Option<String>,
    error: Option<String>,
    hubs: Vec<String>,
    query: String,
    by_device: bool,
    /// The search found more than it shows.
    more: bool,
}

impl RegistrationsPage {
    /// The current list's URL, for returning after a delete.
    fn here(&self) -> String {
        format!(
            "/console/registrations?status={}&group={}&hub={}&q={}&by={}",
            q(&self.status),
            q(&self.group),
            q(&self.hub),
            q(&self.query),
            if self.by_device {
                "deviceId"
            } else {
                "registrationId"
            }
        )
    }

    fn id_seg(&self, id: &str) -> String {
        seg(id)
    }

    fn statuses(&self) -> [&'static str; 5] {
        ["assigned", "assigning", "failed", "disabled", "unassigned"]
    }

    /// The next page's URL.
    fn next_url(&self, token: &str) -> String {
        format!(
            "/console/registrations?status={}&group={}&hub={}&page={}",
            q(&self.status),
            q(&self.group),
            q(&self.hub),
            q(token)
        )
    }
}

fn keep(r: &RegRow, status: &str, hub: &str) -> bool {
    (status.is_empty() || r.status == status)
        && (hub.is_empty() || r.assigned_hub.eq_ignore_ascii_case(hub))
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
    let status = f.status.unwrap_or_default().trim().to_string();
    let group = f.group.unwrap_or_default().trim().to_string();
    let hub = f.hub.unwrap_or_default().trim().to_string();
    let token = f.page.unwrap_or_default();
    let query = f.q.unwrap_or_default().trim().to_string();
    let by_device = f.by.as_deref() == Some("deviceId");
    let mut rows = Vec::new();
    let mut next = None;
    let mut error = None;
    let mut error_status = StatusCode::OK;
    let mut more = false;
    if !query.is_empty() {
        match search(&c, &s, &query, by_device).await {
            Ok((found, truncated)) => {
                more = truncated;
                rows = found
                    .into_iter()
                    .filter(|(partition, r)| {
                        keep(r, &status, &hub)
                            && (group.is_empty()
                                || partition.as_deref() == Some(&*group.to_ascii_lowercase()))
                    })
                    .map(|(_, r)| r)
                    .collect();
            }
            Err((code, text)) => {
                error_status = code;
                error = Some(text);
            }
        }
    } else if !group.is_empty() {
        let mut extra = vec![("x-ms-max-item-count", PAGE_SIZE.to_string())];
        if let Some(t) = token.strip_prefix("c:") {
            extra.push(("x-ms-continuation", t.to_string()));
        }
        match c
            .service(
                &s,
                Method::POST,
                &format!("/registrations/{}/query", seg(&group)),
                None,
                &extra,
            )
            .await
        {
            Ok(r) => {
                next = r.continuation().map(|t| format!("c:{t}"));
                rows = r
                    .body
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(reg_row)
                            .filter(|r| keep(r, &status, &hub))
                            .collect()
                    })
                    .unwrap_or_default();
            }
            Err(f) => {
                error_status = f.status_code();
                error = Some(f.text());
            }
        }
    } else {
        match c.has_right(&s, AccessRight::RegistrationStatusRead) {
            Err(f) => {
                error_status = f.status_code();
                error = Some(f.text());
            }
            Ok(()) => {
                let mut after = token.strip_prefix("k:").map(str::to_string);
                let mut scanned = 0usize;
                'scan: loop {
                    let page = match c
                        .api()
                        .store
                        .list(
                            Collection::Registrations,
                            ListQuery {
                                partition: None,
                                after: after.clone(),
                                limit: 500,
                            },
                        )
                        .await
                    {
                        Ok(p) => p,
                        Err(e) => {
                            error_status = StatusCode::INTERNAL_SERVER_ERROR;
                            error = Some(e.to_string());
                            break;
                        }
                    };
                    let n = page.len();
                    for rec in page {
                        scanned += 1;
                        after = Some(rec.key.clone());
                        let row = reg_row(&rec.body);
                        if keep(&row, &status, &hub) {
                            rows.push(row);
                            if rows.len() == PAGE_SIZE {
                                next = after.as_ref().map(|k| format!("k:{k}"));
                                break 'scan;
                            }
                        }
                    }
                    if n < 500 {
                        break;
                    }
                    if scanned >= SCAN_LIMIT {
                        next = after.as_ref().map(|k| format!("k:{k}"));
                        break;
                    }
                }
            }
        }
    }
    let hubs = linked_hub_names(&c).await;
    let code = if error.is_some() {
        error_status
    } else {
        StatusCode::OK
    };
    render_status(
        code,
        &RegistrationsPage {
            page: c.page_ctx(&s, "Registration records", "registrations"),
            status,
            group,
            hub,
            rows,
            next,
            error,
            hubs,
            query,
            by_device,
            more,
        },
    )
}

/// One indexed lookup: the records whose registration id (or device id) starts with `text`,
/// at most [`SEARCH_LIMIT`], each with its partition (the group); `true` when there are more.
async fn search(
    c: &Console,
    s: &crate::session::Session,
    text: &str,
    by_device: bool,
) -> Result<(Vec<(Option<String>, RegRow)>, bool), (StatusCode, String)> {
    c.has_right(s, AccessRight::RegistrationStatusRead)
        .map_err(|f| (f.status_code(), f.text()))?;
    let field = if by_device {
        SearchField::DeviceId
    } else {
        SearchField::Key
    };
    let found = c
        .api()
        .store
        .search(
            Collection::Registrations,
            SearchQuery {
                field,
                // Keys are lower-cased registration ids.
                prefix: text.to_ascii_lowercase(),
                limit: SEARCH_LIMIT + 1,
            },
        )
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let more = found.len() > SEARCH_LIMIT;
    Ok((
        found
            .into_iter()
            .take(SEARCH_LIMIT)
            .map(|r| (r.partition, reg_row(&r.body)))
            .collect(),
        more,
    ))
}

/// `POST /console/registrations/{id}/delete`: deletes one registration record through the
/// service API, or with `device` set deprovisions it (record and hub device) through the
/// engine, which needs `RegistrationStatusWrite` all the same; then back to the list
/// (`back`, a console path) with what was removed.
pub async fn delete(State(c): State<Console>, Path(id): Path<String>, req: Request) -> Response {
    let (s, fields, _) = match c.guard(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let back = fields.get("back");
    let back = if back.starts_with("/console/registrations") && !back.contains("//") {
        back.to_string()
    } else {
        "/console/registrations".to_string()
    };
    let message = if fields.has("device") {
        match c.has_right(&s, AccessRight::RegistrationStatusWrite) {
            Err(f) => f.text(),
            Ok(()) => match c.deprovision(&s, &id).await {
                Ok(Some(n)) => format!(
                    "Deleted the registration record of '{id}' and {n} device(s) in its IoT hub."
                ),
                Ok(None) => format!("There is no registration record '{id}'."),
                Err(e) => format!("Deleting '{id}' stopped: {e}"),
            },
        }
    } else {
        match c
            .service(
                &s,
                Method::DELETE,
                &format!("/registrations/{}", seg(&id)),
                None,
                &[],
            )
            .await
        {
            Ok(_) => format!(
                "Deleted the registration record of '{id}' (its device stays in its IoT hub)."
            ),
            Err(f) => f.text(),
        }
    };
    c.sessions().set_flash(&s.id, message);
    redirect(&back)
}

/// Host names of the linked hubs (not secret), for the hub filter's suggestions.
pub async fn linked_hub_names(c: &Console) -> Vec<String> {
    c.api()
        .store
        .list(
            Collection::LinkedHubs,
            ListQuery {
                partition: None,
                after: None,
                limit: 1000,
            },
        )
        .await
        .map(|rows| {
            rows.iter()
                .filter_map(|r| {
                    r.body
                        .get("name")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default()
}
