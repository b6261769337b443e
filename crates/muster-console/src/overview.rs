//! The overview: ID scope, endpoints, the CA certificate to download, counts of enrollments
//! and of registration records by status, and registrations per minute.
//!
//! Counts of enrollments and groups come from the store's `count` (an index lookup). Counting
//! registration records by status and by recency needs their bodies, so the console scans the
//! `registrations` collection in pages of 1,000 up to [`SCAN_CAP`] records and caches the
//! result for [`CACHE_SECS`]: a page view costs at most one scan every 15 seconds, and beyond
//! the cap the numbers are marked as a lower bound. "Registrations per minute" is the number
//! of records whose `lastUpdatedDateTimeUtc` falls in the last five minutes, divided by five
//! (plus the count of the last minute alone). Each number needs the right its API needs:
//! `EnrollmentRead` for enrollment counts, `RegistrationStatusRead` for registrations.

use std::sync::Mutex;

use askama::Template;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use muster_proto::{AccessRight, DeviceRegistrationState};
use muster_store::{Collection, ListQuery};

use crate::page::{render, PageCtx};
use crate::Console;

/// Most registration records one overview scan reads.
pub const SCAN_CAP: usize = 200_000;
/// How long a scan's result is reused.
pub const CACHE_SECS: i64 = 15;

#[derive(Debug, Clone, Default)]
pub struct RegistrationStats {
    pub total: u64,
    /// (status, count), in a fixed order.
    pub by_status: Vec<(String, u64)>,
    pub last_minute: u64,
    pub per_minute_5: String,
    /// The scan stopped at the cap: numbers are lower bounds.
    pub partial: bool,
}

/// The last scan and when it ran.
#[derive(Default)]
pub struct StatsCache(Mutex<Option<(i64, RegistrationStats)>>);

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    page: PageCtx,
    id_scope: String,
    device_endpoint: String,
    service_endpoint: String,
    enrollments: Option<(u64, u64)>,
    enrollments_error: Option<String>,
    registrations: Option<RegistrationStats>,
    registrations_error: Option<String>,
}

pub async fn page(State(c): State<Console>, headers: HeaderMap) -> Response {
    let s = match c.require_session(&headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let store = &c.api().store;
    let (enrollments, enrollments_error) = match c.has_right(&s, AccessRight::EnrollmentRead) {
        Ok(()) => match (
            store.count(Collection::Enrollments, None).await,
            store.count(Collection::EnrollmentGroups, None).await,
        ) {
            (Ok(i), Ok(g)) => (Some((i, g)), None),
            (Err(e), _) | (_, Err(e)) => (None, Some(e.to_string())),
        },
        Err(f) => (None, Some(f.text())),
    };
    let (registrations, registrations_error) =
        match c.has_right(&s, AccessRight::RegistrationStatusRead) {
            Ok(()) => match c.registration_stats().await {
                Ok(r) => (Some(r), None),
                Err(e) => (None, Some(e)),
            },
            Err(f) => (None, Some(f.text())),
        };
    let cfg = c.config();
    render(&OverviewPage {
        page: c.page_ctx(&s, "Overview", "overview"),
        id_scope: cfg.id_scope.clone(),
        device_endpoint: cfg.device_endpoint.clone(),
        service_endpoint: cfg.service_endpoint.clone(),
        enrollments,
        enrollments_error,
        registrations,
        registrations_error,
    })
}

impl Console {
    async fn registration_stats(&self) -> Result<RegistrationStats, String> {
        let now = self.now_unix();
        if let Ok(g) = self.inner.stats.0.lock() {
            if let Some((at, stats)) = &*g {
                if now - at < CACHE_SECS {
                    return Ok(stats.clone());
                }
            }
        }
        let store = &self.api().store;
        let order = ["assigned", "assigning", "failed", "disabled", "unassigned"];
        let mut counts: Vec<(String, u64)> = order.iter().map(|s| (s.to_string(), 0)).collect();
        let mut stats = RegistrationStats::default();
        let mut last5 = 0u64;
        let mut after = None;
        let mut seen = 0usize;
        loop {
            let page = store
                .list(
                    Collection::Registrations,
                    ListQuery {
                        partition: None,
                        after: after.clone(),
                        limit: 1000,
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            let n = page.len();
            for r in page {
                seen += 1;
                let Ok(state) = serde_json::from_value::<DeviceRegistrationState>(r.body) else {
                    continue;
                };
                stats.total += 1;
                let status = serde_json::to_value(state.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_else(|| "unknown".into());
                match counts.iter_mut().find(|(s, _)| *s == status) {
                    Some((_, c)) => *c += 1,
                    None => counts.push((status, 1)),
                }
                if let Some(t) = state.last_updated_date_time_utc {
                    let age = now - t.unix_seconds();
                    if (0..300).contains(&age) {
                        last5 += 1;
                    }
                    if (0..60).contains(&age) {
                        stats.last_minute += 1;
                    }
                }
            }
            if n < 1000 {
                break;
            }
            if seen >= SCAN_CAP {
                stats.partial = true;
                break;
            }
        }
        stats.by_status = counts;
        stats.per_minute_5 = format!("{:.1}", last5 as f64 / 5.0);
        if let Ok(mut g) = self.inner.stats.0.lock() {
            *g = Some((now, stats.clone()));
        }
        Ok(stats)
    }
}

/// `GET /console/ca.pem`: the local CA certificate (public), for signed-in users.
pub async fn ca_pem(State(c): State<Console>, headers: HeaderMap) -> Response {
    if let Err(r) = c.require_session(&headers) {
        return r;
    }
    match tokio::fs::read(&c.config().ca_pem_path).await {
        Ok(pem) => {
            let mut r = pem.into_response();
            let h = r.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-pem-file"),
            );
            h.insert(
                http::header::CONTENT_DISPOSITION,
                HeaderValue::from_static("attachment; filename=\"muster-ca.pem\""),
            );
            r
        }
        Err(_) => (
            StatusCode::NOT_FOUND,
            "this server has no local CA certificate (it serves its own chain)",
        )
            .into_response(),
    }
}
