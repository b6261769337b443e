//! Service API request metrics: one middleware on the service API's routes counts every
//! request by route template (`/enrollments/{id}`, never the id itself), method and status,
//! and times it.

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

pub const REQUESTS_TOTAL: &str = "muster_service_api_requests_total";
pub const REQUEST_SECONDS: &str = "muster_service_api_request_duration_seconds";

/// HELP texts for the exporter; call once after installing a recorder.
pub fn describe() {
    metrics::describe_counter!(
        REQUESTS_TOTAL,
        "Service API requests by route template, method and status"
    );
    metrics::describe_histogram!(
        REQUEST_SECONDS,
        metrics::Unit::Seconds,
        "Service API request duration by route template and method"
    );
}

/// The middleware (a route layer, so the route template is known).
pub async fn record(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = method_label(request.method());
    let started = tokio::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(REQUEST_SECONDS, "route" => route.clone(), "method" => method)
        .record(started.elapsed());
    metrics::counter!(REQUESTS_TOTAL, "route" => route, "method" => method, "status" => status)
        .increment(1);
    response
}

/// Methods outside the standard set are one label value, so clients cannot invent new ones.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
